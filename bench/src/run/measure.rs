//! Turning what the customer sent and each agent received into the figures of the
//! report: which sent frame each received frame is, what was expected, lost or out of
//! order, and how long frames and input events took. Pure functions over the clients'
//! records, so they are tested without a network.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{ReceivedFrame, SentFrame};

/// Latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

/// Records `d` in a [`latency_histogram`] (clamped into its range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.clamp(1, h.high()));
}

/// Finds, for a received frame, the frame the customer sent: the most recent one with the
/// same digest sent before it arrived (a looped file repeats its digests, but never
/// within a few seconds).
pub struct SentIndex<'a> {
    sent: &'a [SentFrame],
    by_digest: HashMap<[u8; 32], Vec<usize>>,
}

impl<'a> SentIndex<'a> {
    /// Indexes `sent` (in publishing order).
    pub fn new(sent: &'a [SentFrame]) -> Self {
        let mut by_digest: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
        for (i, f) in sent.iter().enumerate() {
            by_digest.entry(f.digest).or_default().push(i);
        }
        SentIndex { sent, by_digest }
    }

    /// The sent frame `received` is, if any.
    pub fn find(&self, received: &ReceivedFrame) -> Option<&'a SentFrame> {
        let positions = self.by_digest.get(&received.digest)?;
        positions
            .iter()
            .rev()
            .map(|&i| &self.sent[i])
            .find(|s| s.sent_at <= received.received_at)
    }
}

/// What one healthy agent's frames say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFrames {
    /// Frames the customer sent from the agent's first frame to the end of the window.
    pub expected: u64,
    /// Distinct frames of those that arrived whole.
    pub received: u64,
    /// Frames that arrived after a later one.
    pub out_of_order: u64,
    /// Frames that match nothing the customer sent (corrupted or misassembled).
    pub corrupt: u64,
    /// From the agent's join to its first frame, if it got one.
    pub first_frame: Option<Duration>,
}

impl AgentFrames {
    /// Frames expected but not received.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.received)
    }

    /// Adds this agent's counts to the report's totals.
    pub fn add_to(&self, totals: &mut super::report::Frames) {
        totals.expected += self.expected;
        totals.received += self.received;
        totals.lost += self.lost();
        totals.out_of_order += self.out_of_order;
        totals.corrupt += self.corrupt;
    }
}

/// Scores one agent's `received` frames against the customer's publishing: the agent is
/// expected to get every frame from the first one it got up to the last frame sent at or
/// before `window_end`; an agent that got none lost every frame sent after it joined. The latency of each counted frame (customer's send to the
/// agent's read of its last packet) goes into `latency`.
pub fn score_agent(
    index: &SentIndex<'_>,
    received: &[ReceivedFrame],
    joined_at: Instant,
    window_end: Instant,
    latency: &mut Histogram<u64>,
) -> AgentFrames {
    let mut out = AgentFrames::default();
    let last = index
        .sent
        .iter()
        .rev()
        .find(|s| s.sent_at <= window_end)
        .map(|s| s.index);
    let mut first: Option<u64> = None;
    let mut highest: Option<u64> = None;
    let mut seen = std::collections::HashSet::new();
    for frame in received {
        let Some(sent) = index.find(frame) else {
            out.corrupt += 1;
            continue;
        };
        if first.is_none() {
            first = Some(sent.index);
            out.first_frame = Some(frame.received_at.saturating_duration_since(joined_at));
        }
        if highest.is_some_and(|h| sent.index < h) {
            out.out_of_order += 1;
        }
        highest = highest.max(Some(sent.index));
        if last.is_some_and(|l| sent.index <= l) && seen.insert(sent.index) {
            out.received += 1;
            record(
                latency,
                frame.received_at.saturating_duration_since(sent.sent_at),
            );
        }
    }
    out.expected = match (first, last) {
        (Some(first), Some(last)) => (last + 1).saturating_sub(first),
        // Nothing arrived: everything sent after the join was lost.
        (None, _) => index
            .sent
            .iter()
            .filter(|s| s.sent_at >= joined_at && s.sent_at <= window_end)
            .count() as u64,
        (Some(_), None) => 0,
    };
    out
}

/// Input events as the bench numbers them: the control agent's `n`-th event is a mouse
/// move to `(n mod 65536, n div 65536)`, which keeps `y` below [`VIEW_ONLY_MARK`]
/// for the first 2^32 - 2^16 events; a view-only agent's events all have
/// `y == VIEW_ONLY_MARK`, so one reaching the customer is recognised as a leak.
pub const VIEW_ONLY_MARK: u16 = u16::MAX;

/// The mouse position that encodes the control agent's event `n`.
pub fn control_position(n: u32) -> (u16, u16) {
    ((n & 0xffff) as u16, (n >> 16) as u16)
}

/// The event number a control agent's mouse position encodes; `None` for the
/// view-only mark.
pub fn control_number(x: u16, y: u16) -> Option<u32> {
    (y != VIEW_ONLY_MARK).then(|| (u32::from(y) << 16) | u32::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::VideoCodec;

    fn sent(n: u64, t0: Instant) -> Vec<SentFrame> {
        (0..n)
            .map(|i| SentFrame {
                index: i,
                source_index: i % 4,
                // A 4-frame loop: digests repeat every 4 frames.
                digest: [(i % 4) as u8; 32],
                is_keyframe: i % 4 == 0,
                requested: false,
                size: 100,
                sent_at: t0 + Duration::from_millis(100 * i),
            })
            .collect()
    }

    fn got(s: &SentFrame, after: Duration) -> ReceivedFrame {
        ReceivedFrame {
            codec: VideoCodec::Vp8,
            digest: s.digest,
            is_keyframe: s.is_keyframe,
            size: s.size,
            rtp_timestamp: 0,
            received_at: s.sent_at + after,
            dropped_packets_before: 0,
        }
    }

    #[test]
    fn looped_digests_match_the_latest_send_before_arrival() {
        let t0 = Instant::now();
        let sent = sent(12, t0);
        let index = SentIndex::new(&sent);
        // Frame 9 has the digest of 1 and 5 too.
        assert_eq!(
            index
                .find(&got(&sent[9], Duration::from_millis(5)))
                .unwrap()
                .index,
            9
        );
        assert_eq!(
            index
                .find(&got(&sent[5], Duration::from_millis(5)))
                .unwrap()
                .index,
            5
        );
    }

    #[test]
    fn a_complete_agent_loses_nothing() {
        let t0 = Instant::now();
        let sent = sent(12, t0);
        let index = SentIndex::new(&sent);
        let received: Vec<_> = sent[4..]
            .iter()
            .map(|s| got(s, Duration::from_millis(7)))
            .collect();
        let mut h = latency_histogram();
        // The window ends at frame 10: frame 11 is not expected.
        let r = score_agent(
            &index,
            &received,
            t0,
            t0 + Duration::from_millis(1050),
            &mut h,
        );
        assert_eq!(r.expected, 7);
        assert_eq!(r.received, 7);
        assert_eq!(r.lost(), 0);
        assert_eq!(r.out_of_order, 0);
        assert_eq!(r.first_frame, Some(Duration::from_millis(407)));
        assert_eq!(h.len(), 7);
        assert!((h.value_at_quantile(0.5) as i64 - 7000).abs() < 10);
    }

    #[test]
    fn gaps_reordering_and_garbage_are_counted() {
        let t0 = Instant::now();
        let sent = sent(12, t0);
        let index = SentIndex::new(&sent);
        let mut received = vec![
            got(&sent[0], Duration::from_millis(1)),
            got(&sent[2], Duration::from_millis(1)),
            got(&sent[1], Duration::from_millis(150)),
            got(&sent[3], Duration::from_millis(1)),
        ];
        let mut junk = got(&sent[3], Duration::from_millis(2));
        junk.digest = [0xee; 32];
        received.push(junk);
        let mut h = latency_histogram();
        let r = score_agent(&index, &received, t0, t0 + Duration::from_secs(1), &mut h);
        // Frames 0..=10 expected (10 is sent at the window's end), 0..=3 received, 1
        // came after 2.
        assert_eq!(r.expected, 11);
        assert_eq!(r.received, 4);
        assert_eq!(r.lost(), 7);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.corrupt, 1);
    }

    #[test]
    fn an_agent_that_got_nothing_lost_everything_after_its_join() {
        let t0 = Instant::now();
        let sent = sent(12, t0);
        let index = SentIndex::new(&sent);
        let joined = t0 + Duration::from_millis(250);
        let r = score_agent(
            &index,
            &[],
            joined,
            t0 + Duration::from_secs(1),
            &mut latency_histogram(),
        );
        // Frames 3..=10 were sent while it was there.
        assert_eq!(r.expected, 8);
        assert_eq!(r.lost(), 8);
        assert_eq!(r.first_frame, None);
    }

    #[test]
    fn control_positions_round_trip_and_never_look_view_only() {
        for n in [
            0,
            1,
            65_535,
            65_536,
            1_000_000,
            (u32::from(u16::MAX) << 16) - 1,
        ] {
            let (x, y) = control_position(n);
            assert_eq!(control_number(x, y), Some(n));
        }
        assert_eq!(control_number(5, VIEW_ONLY_MARK), None);
    }
}
