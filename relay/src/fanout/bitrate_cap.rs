//! The publisher's bitrate cap (`limits.max_publish_bitrate`): what a publisher (the
//! customer's screen and voice, or a sharing agent's screen) may push into the fan-out.
//!
//! Every packet a publisher sends is copied to up to 8 agents and the recorder, so one
//! publisher at 50 Mbps would cost the node ten times that on the way out. The cap is
//! a token bucket per published track, sans-IO like the rest of the fan-out: the shell
//! calls [`BitrateCap::packet`] with the current `Instant` and the packet's size before
//! the packet reaches the recorder or [`Fanout::route`](super::Fanout::route), and does
//! what the [`Verdict`] says.
//!
//! - The bucket holds [`BURST`] worth of the cap and refills at the cap: a publisher
//!   under the cap never loses a packet, and a keyframe burst above it passes as long as
//!   the average stays under.
//! - A packet the bucket cannot pay for is dropped ([`Verdict::Drop`]), and so is every
//!   packet after it until the bucket has refilled to [`RESUME_FRACTION`] of its size:
//!   a publisher far over the cap gets bursts through, not a trickle of isolated
//!   packets that would break every frame.
//! - The first packet admitted after a drop is [`Verdict::Resume`]: for video the shell
//!   then tells the fan-out ([`Fanout::publisher_gap`](super::Fanout::publisher_gap)),
//!   so every subscriber waits for the next keyframe and one is requested, instead of
//!   decoding frames with holes.

use std::time::{Duration, Instant};

/// How much of the cap the bucket holds: a publisher may exceed the cap for this long
/// (a keyframe, a burst of screen changes) before packets are dropped.
pub const BURST: Duration = Duration::from_secs(1);

/// After a drop, packets are admitted again once the bucket has refilled to this
/// fraction of [`BURST`].
pub const RESUME_FRACTION: f64 = 0.5;

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Under the cap: forward it.
    Pass,
    /// Forward it; it is the first after packets were dropped (video: subscribers must
    /// wait for a keyframe, which must be requested).
    Resume,
    /// Over the cap: drop it and count it.
    Drop,
}

/// What the cap did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapCounters {
    /// Packets dropped.
    pub packets_dropped: u64,
    /// Bytes of the packets dropped.
    pub bytes_dropped: u64,
    /// Times the publisher went over the cap (one per run of drops).
    pub episodes: u64,
}

/// The token bucket of one published track. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct BitrateCap {
    /// Refill rate, bytes per second.
    rate: f64,
    /// Bucket size, bytes.
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
    over: bool,
    counters: CapCounters,
}

impl BitrateCap {
    /// A cap of `bits_per_second`, with a full bucket.
    pub fn new(bits_per_second: u64) -> BitrateCap {
        let rate = bits_per_second as f64 / 8.0;
        let burst = rate * BURST.as_secs_f64();
        BitrateCap {
            rate,
            burst,
            tokens: burst,
            last: None,
            over: false,
            counters: CapCounters::default(),
        }
    }

    /// Decides about one packet of `bytes` (header and payload) that arrived at `now`.
    pub fn packet(&mut self, now: Instant, bytes: usize) -> Verdict {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        let cost = bytes as f64;
        let verdict = if !self.over {
            if self.tokens >= cost {
                Verdict::Pass
            } else {
                self.over = true;
                self.counters.episodes += 1;
                Verdict::Drop
            }
        } else if self.tokens >= self.burst * RESUME_FRACTION && self.tokens >= cost {
            self.over = false;
            Verdict::Resume
        } else {
            Verdict::Drop
        };
        match verdict {
            Verdict::Pass | Verdict::Resume => self.tokens -= cost,
            Verdict::Drop => {
                self.counters.packets_dropped += 1;
                self.counters.bytes_dropped += bytes as u64;
            }
        }
        verdict
    }

    /// Whether packets are being dropped (the last packet was).
    pub fn is_over(&self) -> bool {
        self.over
    }

    /// What the cap did so far.
    pub fn counters(&self) -> CapCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET: usize = 1200;

    /// Sends `secs` of traffic at `bits_per_second` in `PACKET`-sized packets, evenly
    /// spaced from `start`; returns the verdicts and the time after the last packet.
    fn send(
        cap: &mut BitrateCap,
        start: Instant,
        bits_per_second: u64,
        secs: f64,
    ) -> (Vec<Verdict>, Instant) {
        let per_second = bits_per_second as f64 / 8.0 / PACKET as f64;
        let n = (per_second * secs).round() as u64;
        let gap = Duration::from_secs_f64(1.0 / per_second);
        let verdicts = (0..n)
            .map(|i| cap.packet(start + gap * i as u32, PACKET))
            .collect();
        (verdicts, start + gap * n as u32)
    }

    fn passed(v: &[Verdict]) -> usize {
        v.iter().filter(|v| **v != Verdict::Drop).count()
    }

    #[test]
    fn a_publisher_under_the_cap_loses_nothing() {
        let mut cap = BitrateCap::new(20_000_000);
        let (v, _) = send(&mut cap, Instant::now(), 15_000_000, 10.0);
        assert!(v.iter().all(|v| *v == Verdict::Pass));
        assert_eq!(cap.counters(), CapCounters::default());
    }

    #[test]
    fn a_burst_within_the_bucket_passes() {
        // A 1 MB keyframe at once, under a 20 Mbps cap (2.5 MB bucket).
        let mut cap = BitrateCap::new(20_000_000);
        let now = Instant::now();
        let verdicts: Vec<_> = (0..1_000_000 / PACKET)
            .map(|_| cap.packet(now, PACKET))
            .collect();
        assert!(verdicts.iter().all(|v| *v == Verdict::Pass));
    }

    #[test]
    fn fifty_mbps_is_held_to_the_cap_on_average() {
        let mut cap = BitrateCap::new(20_000_000);
        let (v, _) = send(&mut cap, Instant::now(), 50_000_000, 10.0);
        let admitted_bits = (passed(&v) * PACKET * 8) as f64;
        // Ten seconds at the cap, plus at most one bucket.
        assert!(admitted_bits <= 20_000_000.0 * 10.0 + 20_000_000.0 * BURST.as_secs_f64());
        assert!(
            admitted_bits >= 20_000_000.0 * 10.0 * 0.8,
            "{admitted_bits}"
        );
        let c = cap.counters();
        assert_eq!(c.packets_dropped as usize, v.len() - passed(&v));
        assert_eq!(c.bytes_dropped, c.packets_dropped * PACKET as u64);
        assert!(c.episodes >= 1);
    }

    #[test]
    fn drops_come_in_runs_and_each_run_ends_with_one_resume() {
        let mut cap = BitrateCap::new(20_000_000);
        let (v, _) = send(&mut cap, Instant::now(), 50_000_000, 10.0);
        let resumes = v.iter().filter(|v| **v == Verdict::Resume).count();
        let episodes = cap.counters().episodes as usize;
        // Every run of drops but possibly the last is followed by exactly one Resume.
        assert!(
            resumes == episodes || resumes + 1 == episodes,
            "{resumes} {episodes}"
        );
        for w in v.windows(2) {
            if w[1] == Verdict::Resume {
                assert_eq!(w[0], Verdict::Drop, "a resume follows a drop");
            }
        }
        // Runs, not a trickle: a run of admitted packets is long (half a bucket).
        let half_bucket = (20_000_000.0 / 8.0 * RESUME_FRACTION / PACKET as f64) as usize;
        let mut run = 0;
        for x in &v {
            match x {
                Verdict::Resume => run = 1,
                Verdict::Pass if run > 0 => run += 1,
                Verdict::Drop if run > 0 => {
                    assert!(run >= half_bucket / 2, "an admitted run of {run} packets");
                    run = 0;
                }
                _ => {}
            }
        }
    }

    #[test]
    fn back_under_the_cap_the_next_packet_resumes_and_then_all_pass() {
        let mut cap = BitrateCap::new(20_000_000);
        let (_, after_flood) = send(&mut cap, Instant::now(), 50_000_000, 3.0);
        let was_over = cap.is_over();
        // The publisher calms down to 5 Mbps.
        let (v, _) = send(&mut cap, after_flood, 5_000_000, 5.0);
        let first_pass = v.iter().position(|v| *v != Verdict::Drop).expect("resumes");
        let expected = if was_over {
            Verdict::Resume
        } else {
            Verdict::Pass
        };
        assert_eq!(v[first_pass], expected);
        assert!(v[first_pass..].iter().all(|v| *v != Verdict::Drop));
        assert!(!cap.is_over());
        // Within half a second at 5 Mbps the bucket is back over half full.
        assert!(first_pass as f64 <= 5_000_000.0 / 8.0 / PACKET as f64 * 0.6);
    }

    #[test]
    fn time_going_backwards_or_standing_still_refills_nothing() {
        let mut cap = BitrateCap::new(1_000_000);
        let now = Instant::now();
        let bucket = 1_000_000 / 8;
        let n = bucket / PACKET;
        for _ in 0..n {
            assert_eq!(cap.packet(now, PACKET), Verdict::Pass);
        }
        assert_eq!(cap.packet(now, PACKET), Verdict::Drop);
        assert_eq!(cap.packet(now, PACKET), Verdict::Drop);
        assert!(cap.is_over());
        assert_eq!(cap.counters().episodes, 1);
    }
}
