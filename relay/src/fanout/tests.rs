//! Simulated-time tests of the fan-out core.
//!
//! The [`Sim`] harness owns a [`Fanout`], a virtual clock (a base `Instant` plus
//! offsets) and what each subscriber's queue took; `advance_to` jumps the clock from
//! one `poll_timeout` to the next, as the shell would.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const A: SubscriberId = SubscriberId(1);
const B: SubscriberId = SubscriberId(2);
const C: SubscriberId = SubscriberId(3);

/// One packet as a subscriber's queue took it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pkt {
    Video {
        frame: u32,
        index: u8,
        of: u8,
        key: bool,
    },
    Audio(u32),
}

struct Sim {
    fanout: Fanout,
    base: Instant,
    now: Instant,
    /// Every output, with the offset at which it came.
    outputs: Vec<(Duration, FanoutOutput)>,
    /// What each subscriber's queue took, in order.
    got: HashMap<SubscriberId, Vec<Pkt>>,
    next_frame: u32,
    next_audio: u32,
}

impl Sim {
    /// A fan-out with a publisher present from offset 0.
    fn new() -> Sim {
        let mut sim = Sim::without_publisher();
        sim.fanout.set_publisher(sim.now, true);
        sim.drain();
        sim
    }

    fn without_publisher() -> Sim {
        let base = Instant::now();
        Sim {
            fanout: Fanout::new(FanoutSettings::default()),
            base,
            now: base,
            outputs: Vec::new(),
            got: HashMap::new(),
            next_frame: 0,
            next_audio: 0,
        }
    }

    fn ms(&self) -> Duration {
        self.now - self.base
    }

    fn drain(&mut self) {
        while let Some(out) = self.fanout.poll_output() {
            self.outputs.push((self.ms(), out));
        }
    }

    /// Moves the clock to `ms` after the base, running every timer due on the way.
    fn advance_to(&mut self, ms: u64) {
        let target = self.base + Duration::from_millis(ms);
        assert!(target >= self.now, "time runs forward");
        for _ in 0..10_000 {
            match self.fanout.poll_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.fanout.handle_timeout(self.now);
                    self.drain();
                }
                _ => {
                    self.now = target;
                    return;
                }
            }
        }
        panic!("a timer that never moves on");
    }

    fn add(&mut self, id: SubscriberId) {
        self.fanout.add_subscriber(self.now, id);
        self.got.entry(id).or_default();
        self.drain();
    }

    /// One video frame of `packets` packets; `full(id, index)` says which deliveries a
    /// full queue refuses.
    fn frame_with(
        &mut self,
        key: bool,
        packets: u8,
        mut full: impl FnMut(SubscriberId, u8) -> bool,
    ) {
        let frame = self.next_frame;
        self.next_frame += 1;
        for index in 0..packets {
            let info = PacketInfo {
                kind: MediaKind::Video,
                keyframe_start: key && index == 0,
                frame_end: index + 1 == packets,
            };
            let got = &mut self.got;
            self.fanout.route(self.now, &info, |id| {
                if full(id, index) {
                    return Delivery::Full;
                }
                got.entry(id).or_default().push(Pkt::Video {
                    frame,
                    index,
                    of: packets,
                    key,
                });
                Delivery::Queued
            });
            self.drain();
        }
    }

    fn frame(&mut self, key: bool, packets: u8) {
        self.frame_with(key, packets, |_, _| false);
    }

    fn audio_with(&mut self, mut full: impl FnMut(SubscriberId) -> bool) {
        let n = self.next_audio;
        self.next_audio += 1;
        let info = PacketInfo {
            kind: MediaKind::Audio,
            keyframe_start: false,
            frame_end: false,
        };
        let got = &mut self.got;
        self.fanout.route(self.now, &info, |id| {
            if full(id) {
                return Delivery::Full;
            }
            got.entry(id).or_default().push(Pkt::Audio(n));
            Delivery::Queued
        });
        self.drain();
    }

    fn audio(&mut self) {
        self.audio_with(|_| false);
    }

    /// The video frames `id` got, as (frame, packets got, packets in the frame).
    fn video_of(&self, id: SubscriberId) -> Vec<(u32, u8, u8)> {
        let mut frames: Vec<(u32, u8, u8)> = Vec::new();
        for pkt in &self.got[&id] {
            if let Pkt::Video { frame, of, .. } = *pkt {
                match frames.last_mut() {
                    Some(last) if last.0 == frame => last.1 += 1,
                    _ => frames.push((frame, 1, of)),
                }
            }
        }
        frames
    }

    fn audio_of(&self, id: SubscriberId) -> usize {
        self.got[&id]
            .iter()
            .filter(|p| matches!(p, Pkt::Audio(_)))
            .count()
    }

    /// Offsets (ms) at which a keyframe request went to the publisher.
    fn requests(&self) -> Vec<u128> {
        self.outputs
            .iter()
            .filter(|(_, o)| *o == FanoutOutput::RequestKeyframe)
            .map(|(t, _)| t.as_millis())
            .collect()
    }

    fn outcomes(&self, outcome: KeyframeOutcome) -> usize {
        let stat = FanoutOutput::Stat(FanoutStat::KeyframeRequest(outcome));
        self.outputs.iter().filter(|(_, o)| *o == stat).count()
    }

    fn stats(&self, id: SubscriberId) -> &SubscriberStats {
        self.fanout.subscriber(id).unwrap()
    }

    fn counters_dropped(&self, reason: DropReason) -> u64 {
        self.fanout
            .counters()
            .frames_dropped(reason, MediaKind::Video)
    }
}

// ----- joining -----------------------------------------------------------------------

#[test]
fn joining_subscriber_gets_no_video_until_a_keyframe_then_everything() {
    let mut sim = Sim::new();
    sim.add(A);
    assert!(sim.stats(A).waiting_keyframe);
    sim.frame(false, 3);
    sim.frame(false, 1);
    assert!(
        sim.video_of(A).is_empty(),
        "no delta frames before a keyframe"
    );
    sim.frame(true, 4);
    sim.frame(false, 2);
    sim.frame(false, 3);
    assert_eq!(sim.video_of(A), vec![(2, 4, 4), (3, 2, 2), (4, 3, 3)]);
    let stats = sim.stats(A);
    assert!(!stats.waiting_keyframe);
    assert_eq!(stats.frames_forwarded, 3);
    assert_eq!(stats.frames_dropped, 2);
    assert_eq!(stats.packets_forwarded, 9);
    assert_eq!(sim.fanout.counters().video_dropped_awaiting_keyframe, 2);
}

#[test]
fn joining_mid_frame_skips_that_frame_and_counts_it_once() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 1);
    // B joins after the first packet of a three-packet frame.
    let mid = |sim: &mut Sim, index: u8, end: bool| {
        let info = PacketInfo {
            kind: MediaKind::Video,
            keyframe_start: false,
            frame_end: end,
        };
        let mut offered = Vec::new();
        sim.fanout.route(sim.now, &info, |id| {
            offered.push((id, index));
            Delivery::Queued
        });
        offered
    };
    assert_eq!(mid(&mut sim, 0, false), vec![(A, 0)]);
    sim.add(B);
    assert_eq!(mid(&mut sim, 1, false), vec![(A, 1)]);
    assert_eq!(mid(&mut sim, 2, true), vec![(A, 2)]);
    assert_eq!(sim.stats(B).frames_dropped, 1);
    assert_eq!(sim.stats(B).frames_forwarded, 0);
    assert_eq!(sim.stats(A).frames_forwarded, 2);
}

#[test]
fn audio_flows_to_a_subscriber_waiting_for_a_keyframe() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.audio();
    sim.frame(false, 2);
    sim.audio();
    assert_eq!(sim.audio_of(A), 2);
    assert!(sim.video_of(A).is_empty());
    assert!(sim.stats(A).waiting_keyframe);
    assert_eq!(sim.stats(A).packets_forwarded, 2);
}

#[test]
fn eight_joins_within_one_window_send_one_request_and_coalesce_seven() {
    let mut sim = Sim::new();
    for i in 0..8 {
        sim.advance_to(i * 30);
        sim.add(SubscriberId(i));
    }
    assert_eq!(sim.requests(), vec![0]);
    assert_eq!(sim.outcomes(KeyframeOutcome::Sent), 1);
    assert_eq!(sim.outcomes(KeyframeOutcome::Coalesced), 7);
    // The keyframe answering the first request answers all eight.
    sim.advance_to(250);
    sim.frame(true, 5);
    sim.advance_to(5_000);
    assert_eq!(
        sim.requests(),
        vec![0],
        "no request after the keyframe came"
    );
    assert_eq!(sim.fanout.poll_timeout(), None);
    for i in 0..8 {
        assert_eq!(sim.video_of(SubscriberId(i)), vec![(0, 5, 5)]);
    }
}

// ----- keyframe requests -------------------------------------------------------------

#[test]
fn pending_ask_is_sent_when_the_window_ends() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.advance_to(100);
    sim.add(B);
    assert_eq!(sim.requests(), vec![0]);
    assert_eq!(
        sim.fanout.poll_timeout(),
        Some(sim.base + Duration::from_millis(300))
    );
    sim.advance_to(299);
    assert_eq!(sim.requests(), vec![0]);
    sim.advance_to(600);
    assert_eq!(sim.requests(), vec![0, 300]);
    assert_eq!(sim.outcomes(KeyframeOutcome::Sent), 2);
    assert_eq!(sim.outcomes(KeyframeOutcome::Coalesced), 1);
}

#[test]
fn retry_after_keyframe_retry_while_subscribers_still_wait() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.advance_to(999);
    assert_eq!(sim.requests(), vec![0]);
    sim.advance_to(2_500);
    assert_eq!(sim.requests(), vec![0, 1_000, 2_000]);
    sim.frame(true, 2);
    sim.advance_to(10_000);
    assert_eq!(
        sim.requests(),
        vec![0, 1_000, 2_000],
        "answered: no more retries"
    );
    assert_eq!(sim.video_of(A), vec![(0, 2, 2)]);
}

#[test]
fn subscribers_own_request_is_coalesced_and_sent_at_the_window_end() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 1);
    sim.advance_to(50);
    sim.fanout.keyframe_requested(sim.now, A);
    sim.drain();
    assert_eq!(sim.outcomes(KeyframeOutcome::Coalesced), 1);
    assert!(
        !sim.stats(A).waiting_keyframe,
        "a PLI does not gate the agent's video"
    );
    sim.advance_to(1_000);
    assert_eq!(sim.requests(), vec![0, 300]);
    // Outside any window it goes at once; an unknown subscriber is ignored.
    sim.fanout.keyframe_requested(sim.now, A);
    sim.fanout.keyframe_requested(sim.now, C);
    sim.drain();
    assert_eq!(sim.requests(), vec![0, 300, 1_000]);
    assert_eq!(sim.outcomes(KeyframeOutcome::Sent), 3);
}

#[test]
fn the_recordings_ask_is_coalesced_with_the_subscribers() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 1);
    sim.advance_to(50);
    // Within the window opened by the join's request: held until its end.
    sim.fanout.recording_wants_keyframe(sim.now);
    sim.fanout.keyframe_requested(sim.now, A);
    sim.drain();
    assert_eq!(sim.outcomes(KeyframeOutcome::Coalesced), 2);
    sim.advance_to(1_000);
    assert_eq!(sim.requests(), vec![0, 300], "one request for both asks");
    // Alone, outside any window: sent at once, with no subscriber waiting.
    sim.advance_to(2_000);
    sim.fanout.recording_wants_keyframe(sim.now);
    sim.drain();
    assert_eq!(sim.requests(), vec![0, 300, 2_000]);
}

#[test]
fn a_keyframe_answers_a_coalesced_ask() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 1);
    sim.advance_to(50);
    sim.fanout.keyframe_requested(sim.now, A);
    sim.drain();
    sim.advance_to(100);
    // The keyframe for someone else's request (or the encoder's own) answers it too.
    sim.frame(true, 1);
    assert_eq!(sim.fanout.poll_timeout(), None);
    sim.advance_to(5_000);
    assert_eq!(sim.requests(), vec![0]);
}

#[test]
fn no_publisher_is_counted_and_the_publisher_is_asked_when_it_appears() {
    let mut sim = Sim::without_publisher();
    sim.add(A);
    sim.add(B);
    assert_eq!(sim.outcomes(KeyframeOutcome::NoPublisher), 2);
    assert!(sim.requests().is_empty());
    sim.advance_to(5_000);
    assert!(sim.requests().is_empty(), "no timers without a publisher");
    sim.fanout.set_publisher(sim.now, true);
    sim.drain();
    assert_eq!(sim.requests(), vec![5_000]);
    assert_eq!(sim.outcomes(KeyframeOutcome::Sent), 1);
}

#[test]
fn publisher_change_makes_everyone_wait_and_asks_the_new_one_at_once() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 2);
    sim.advance_to(100);
    // A reconnect within the old window: the new encoder has had no request yet.
    sim.fanout.set_publisher(sim.now, false);
    sim.fanout.set_publisher(sim.now, true);
    sim.drain();
    assert_eq!(sim.requests(), vec![0, 100]);
    assert!(sim.stats(A).waiting_keyframe);
    sim.frame(false, 2);
    sim.frame(true, 1);
    assert_eq!(sim.video_of(A), vec![(0, 2, 2), (2, 1, 1)]);
}

#[test]
fn a_publisher_without_subscribers_is_not_asked() {
    let sim = Sim::new();
    assert!(sim.requests().is_empty());
    assert_eq!(sim.fanout.poll_timeout(), None);
}

// ----- slow subscribers --------------------------------------------------------------

#[test]
fn slow_subscriber_drops_to_the_next_keyframe_while_the_others_get_everything() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.add(B);
    sim.add(C);
    sim.frame(true, 3);
    sim.advance_to(1_000);
    // B's queue fills in the middle of frame 1.
    sim.frame_with(false, 4, |id, index| id == B && index == 2);
    assert!(sim.stats(B).waiting_keyframe);
    assert_eq!(sim.requests(), vec![0, 1_000]);
    // B's queue has room again, but the rest of its GOP is useless to it.
    sim.frame(false, 3);
    sim.audio();
    sim.frame(false, 2);
    sim.advance_to(1_300);
    sim.frame(true, 3);
    sim.frame(false, 2);

    let all = vec![
        (0, 3, 3),
        (1, 4, 4),
        (2, 3, 3),
        (3, 2, 2),
        (4, 3, 3),
        (5, 2, 2),
    ];
    assert_eq!(sim.video_of(A), all);
    assert_eq!(sim.video_of(C), all);
    // B: frame 1's head (before the full queue), nothing until frame 4's head.
    assert_eq!(
        sim.video_of(B),
        vec![(0, 3, 3), (1, 2, 4), (4, 3, 3), (5, 2, 2)]
    );
    assert_eq!(sim.audio_of(B), 1, "audio kept flowing to B");

    let b = sim.stats(B);
    assert_eq!(b.frames_forwarded, 3);
    assert_eq!(
        b.frames_dropped, 3,
        "frame 1 (queue full), 2 and 3 (awaiting keyframe)"
    );
    let counters = *sim.fanout.counters();
    assert_eq!(
        counters.frames_dropped(DropReason::QueueFull, MediaKind::Video),
        1
    );
    assert_eq!(
        counters.frames_dropped(DropReason::AwaitingKeyframe, MediaKind::Video),
        2
    );
    assert_eq!(counters.frames_forwarded, 6 + 6 + 3);
}

#[test]
fn two_subscribers_falling_behind_together_cause_one_request() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.add(B);
    sim.frame(true, 1);
    sim.advance_to(2_000);
    sim.frame_with(false, 2, |_, index| index == 0);
    assert_eq!(sim.requests(), vec![0, 2_000]);
    assert_eq!(
        sim.outcomes(KeyframeOutcome::Coalesced),
        2,
        "B's join and B's drop"
    );
    sim.frame(true, 1);
    sim.advance_to(10_000);
    assert_eq!(sim.requests(), vec![0, 2_000]);
    assert_eq!(sim.counters_dropped(DropReason::QueueFull), 2);
}

#[test]
fn full_on_a_keyframe_head_waits_for_the_next_keyframe() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame_with(true, 3, |_, index| index == 0);
    sim.frame(false, 2);
    assert!(sim.video_of(A).is_empty());
    sim.frame(true, 2);
    assert_eq!(sim.video_of(A), vec![(2, 2, 2)]);
    assert_eq!(sim.counters_dropped(DropReason::QueueFull), 1);
    assert_eq!(sim.counters_dropped(DropReason::AwaitingKeyframe), 1);
}

#[test]
fn full_audio_is_counted_and_leaves_video_alone() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 2);
    sim.audio_with(|_| true);
    sim.frame(false, 2);
    assert_eq!(sim.video_of(A), vec![(0, 2, 2), (1, 2, 2)]);
    assert!(!sim.stats(A).waiting_keyframe);
    assert_eq!(sim.stats(A).audio_dropped, 1);
    assert_eq!(sim.stats(A).frames_dropped, 0);
    let counters = sim.fanout.counters();
    assert_eq!(
        counters.frames_dropped(DropReason::QueueFull, MediaKind::Audio),
        1
    );
    assert_eq!(
        counters.frames_dropped(DropReason::QueueFull, MediaKind::Video),
        0
    );
    assert_eq!(
        sim.requests(),
        vec![0],
        "a lost audio packet asks for nothing"
    );
}

#[test]
fn lost_marker_frame_is_counted_when_the_next_keyframe_starts() {
    let mut sim = Sim::new();
    sim.add(A);
    // A delta frame whose marker packet never arrives, then a keyframe.
    sim.frame(false, 1);
    let no_end = PacketInfo {
        kind: MediaKind::Video,
        keyframe_start: false,
        frame_end: false,
    };
    sim.fanout.route(sim.now, &no_end, |_| Delivery::Queued);
    sim.frame(true, 1);
    assert_eq!(sim.stats(A).frames_dropped, 2);
    assert_eq!(sim.stats(A).frames_forwarded, 1);
}

// ----- leaving, reports, labels ------------------------------------------------------

#[test]
fn removed_subscriber_gets_nothing_more_and_its_counts_stay() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.add(B);
    sim.frame(true, 2);
    sim.fanout.remove_subscriber(A);
    sim.frame(false, 2);
    sim.audio();
    assert_eq!(sim.video_of(A), vec![(0, 2, 2)]);
    assert_eq!(sim.audio_of(A), 0);
    assert_eq!(sim.video_of(B), vec![(0, 2, 2), (1, 2, 2)]);
    assert!(sim.fanout.subscriber(A).is_none());
    assert_eq!(sim.fanout.counters().frames_forwarded, 3);
    // Asks from a removed subscriber are ignored.
    sim.advance_to(5_000);
    sim.fanout.keyframe_requested(sim.now, A);
    sim.drain();
    assert_eq!(sim.requests(), vec![0]);
}

#[test]
fn removing_the_last_waiting_subscriber_stops_retries() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.fanout.remove_subscriber(A);
    assert_eq!(sim.fanout.poll_timeout(), None);
    sim.advance_to(5_000);
    assert_eq!(sim.requests(), vec![0]);
}

#[test]
fn re_adding_an_id_starts_it_over() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 1);
    sim.advance_to(1_000);
    sim.add(A);
    assert!(sim.stats(A).waiting_keyframe);
    assert_eq!(sim.stats(A).frames_forwarded, 0);
    sim.frame(false, 1);
    assert_eq!(sim.video_of(A), vec![(0, 1, 1)]);
    assert_eq!(sim.requests(), vec![0, 1_000]);
}

#[test]
fn receiver_reports_are_kept_per_subscriber() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.add(B);
    assert_eq!(sim.stats(A).receiver_report, None);
    sim.fanout.receiver_report(A, 12, 340, 90);
    sim.fanout.receiver_report(C, 1, 1, 1);
    assert_eq!(
        sim.stats(A).receiver_report,
        Some(ReceiverReport {
            fraction_lost: 12,
            cumulative_lost: 340,
            jitter: 90
        })
    );
    assert_eq!(sim.stats(B).receiver_report, None);
}

#[test]
fn counters_since_an_earlier_reading_give_the_increments() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.frame(true, 2);
    let earlier = *sim.fanout.counters();
    sim.frame(false, 3);
    sim.audio_with(|_| true);
    let delta = sim.fanout.counters().since(&earlier);
    assert_eq!(
        delta,
        FanoutCounters {
            frames_forwarded: 1,
            packets_forwarded: 3,
            video_dropped_queue_full: 0,
            video_dropped_awaiting_keyframe: 0,
            audio_dropped_queue_full: 1,
        }
    );
}

#[test]
fn metric_labels() {
    let reasons: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(reasons, ["queue_full", "awaiting_keyframe"]);
    let outcomes: Vec<_> = KeyframeOutcome::ALL.iter().map(|o| o.as_str()).collect();
    assert_eq!(outcomes, ["sent", "coalesced", "no_publisher"]);
}

// ----- property: whole frames, every frame, and no storm -----------------------------

#[derive(Debug, Clone)]
enum Op {
    /// The next video packet; `key` and `packets` shape the frame if one starts here.
    Video {
        key: bool,
        packets: u8,
    },
    Audio,
    Add(u8),
    Remove(u8),
    Pli(u8),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (prop::bool::weighted(0.15), 1u8..=4).prop_map(|(key, packets)| Op::Video { key, packets }),
        2 => Just(Op::Audio),
        2 => (0u8..4).prop_map(Op::Add),
        1 => (0u8..4).prop_map(Op::Remove),
        1 => (0u8..4).prop_map(Op::Pli),
        3 => (0u16..400).prop_map(Op::Advance),
    ]
}

/// What a subscriber should see, by the rules in their simplest form.
#[derive(Debug, Default)]
struct Expect {
    waiting: bool,
    /// Video deliveries offered to it: (frame, index, queued).
    offers: Vec<(u32, u8, bool)>,
    /// Frames that ended while it was subscribed, and frames a full queue broke (counted
    /// at once, not again at their end).
    frames_counted: u64,
    broken: Option<u32>,
}

/// Checks one subscriber's offered video: from each keyframe head, whole frames in
/// order until a full queue cuts one short; never a tail without its head.
fn check_whole_frames(
    offers: &[(u32, u8, bool)],
    shapes: &HashMap<u32, (bool, u8)>,
) -> Result<u64, TestCaseError> {
    let mut whole = 0;
    let mut expect_next: Option<(u32, u8)> = None; // None: only a keyframe head may come
    for &(frame, index, queued) in offers {
        let (key, packets) = shapes[&frame];
        match expect_next {
            Some(next) if next == (frame, index) => {}
            _ => prop_assert!(
                key && index == 0,
                "offered frame {frame} packet {index} without what precedes it: {offers:?}"
            ),
        }
        if !queued {
            expect_next = None;
        } else if index + 1 == packets {
            whole += 1;
            expect_next = Some((frame + 1, 0));
        } else {
            expect_next = Some((frame, index + 1));
        }
    }
    Ok(whole)
}

proptest! {
    #[test]
    fn delivered_video_is_whole_frames_from_a_keyframe_on(
        ops in prop::collection::vec(op(), 1..300),
        fulls in prop::collection::vec(prop::bool::weighted(0.1), 1..64),
    ) {
        let mut sim = Sim::new();
        let window = FanoutSettings::default().keyframe_window.as_millis();
        let mut expect: HashMap<SubscriberId, Expect> = HashMap::new();
        let mut order: Vec<SubscriberId> = Vec::new(); // the order they were added
        let mut shapes: HashMap<u32, (bool, u8)> = HashMap::new();
        let mut in_frame: Option<(u32, u8, u8)> = None; // frame, next index, packets
        let mut next_frame = 0u32;
        let mut full_at = 0usize;
        let mut clock = 0u64;

        let finish = |id: SubscriberId, e: &Expect, sim: &Sim, shapes: &HashMap<u32, (bool, u8)>|
            -> Result<(), TestCaseError> {
            let whole = check_whole_frames(&e.offers, shapes)?;
            let stats = sim.stats(id);
            prop_assert_eq!(stats.frames_forwarded, whole);
            prop_assert_eq!(stats.frames_forwarded + stats.frames_dropped, e.frames_counted);
            prop_assert_eq!(stats.waiting_keyframe, e.waiting);
            Ok(())
        };

        for op in ops {
            match op {
                Op::Video { key, packets } => {
                    let (frame, index, packets) = in_frame.unwrap_or_else(|| {
                        next_frame += 1;
                        shapes.insert(next_frame, (key, packets));
                        (next_frame, 0, packets)
                    });
                    let key = shapes[&frame].0;
                    let info = PacketInfo {
                        kind: MediaKind::Video,
                        keyframe_start: key && index == 0,
                        frame_end: index + 1 == packets,
                    };
                    let mut offered = Vec::new();
                    sim.fanout.route(sim.now, &info, |id| {
                        let full = fulls[full_at % fulls.len()];
                        full_at += 1;
                        offered.push((id, !full));
                        if full { Delivery::Full } else { Delivery::Queued }
                    });
                    sim.drain();
                    // The simplest statement of the gate, subscriber by subscriber.
                    let mut want = Vec::new();
                    for &id in &order {
                        let e = expect.get_mut(&id).unwrap();
                        if info.keyframe_start {
                            e.waiting = false;
                        }
                        if !e.waiting {
                            let queued = offered.iter().find(|(o, _)| *o == id).map(|(_, q)| *q);
                            prop_assert!(queued.is_some(), "{id:?} not waiting but not offered");
                            let queued = queued.unwrap();
                            e.offers.push((frame, index, queued));
                            e.waiting = !queued;
                            if !queued {
                                e.frames_counted += 1;
                                e.broken = Some(frame);
                            }
                            want.push(id);
                        }
                        if info.frame_end && e.broken != Some(frame) {
                            e.frames_counted += 1;
                        }
                    }
                    let got: Vec<_> = offered.iter().map(|(id, _)| *id).collect();
                    prop_assert_eq!(got, want, "offered to exactly the non-waiting, in order");
                    in_frame = (!info.frame_end).then_some((frame, index + 1, packets));
                }
                Op::Audio => {
                    let mut offered = Vec::new();
                    let info = PacketInfo { kind: MediaKind::Audio, keyframe_start: false, frame_end: false };
                    sim.fanout.route(sim.now, &info, |id| { offered.push(id); Delivery::Full });
                    sim.drain();
                    prop_assert_eq!(&offered, &order, "audio goes to everyone, in order");
                }
                Op::Add(i) => {
                    let id = SubscriberId(u64::from(i));
                    if let Some(e) = expect.remove(&id) {
                        finish(id, &e, &sim, &shapes)?;
                    }
                    sim.add(id);
                    expect.insert(id, Expect { waiting: true, ..Expect::default() });
                    if !order.contains(&id) {
                        order.push(id);
                    }
                }
                Op::Remove(i) => {
                    let id = SubscriberId(u64::from(i));
                    if let Some(e) = expect.remove(&id) {
                        finish(id, &e, &sim, &shapes)?;
                    }
                    sim.fanout.remove_subscriber(id);
                    order.retain(|o| *o != id);
                }
                Op::Pli(i) => {
                    sim.fanout.keyframe_requested(sim.now, SubscriberId(u64::from(i)));
                    sim.drain();
                }
                Op::Advance(ms) => {
                    clock += u64::from(ms);
                    sim.advance_to(clock);
                }
            }
        }
        for (id, e) in &expect {
            finish(*id, e, &sim, &shapes)?;
        }
        // No keyframe storm: requests to the publisher are a window apart.
        let requests = sim.requests();
        for pair in requests.windows(2) {
            prop_assert!(pair[1] - pair[0] >= window, "requests at {requests:?}");
        }
        // Nobody waits past a retry without a request going out.
        if expect.values().any(|e| e.waiting) {
            sim.advance_to(clock + 1_000);
            prop_assert!(sim.requests().last().is_some_and(|t| *t as u64 > clock));
        }
    }
}

// ----- the publisher's bitrate cap ---------------------------------------------------

#[test]
fn a_gap_before_the_fanout_makes_everyone_wait_for_a_requested_keyframe() {
    let mut sim = Sim::new();
    sim.add(A);
    sim.add(B);
    sim.frame(true, 2);
    sim.advance_to(2_000);
    // The head of frame 1 gets through; the bitrate cap drops the rest of it.
    let head = PacketInfo {
        kind: MediaKind::Video,
        keyframe_start: false,
        frame_end: false,
    };
    sim.fanout.route(sim.now, &head, |_| Delivery::Queued);
    sim.next_frame += 1;
    let forwarded = sim.fanout.counters().frames_forwarded;
    sim.fanout.publisher_gap(sim.now);
    sim.drain();
    // Asked at once, for both (one request); the broken frame counts as dropped.
    assert_eq!(sim.requests(), vec![0, 2_000]);
    assert!(sim.stats(A).waiting_keyframe && sim.stats(B).waiting_keyframe);
    assert_eq!(sim.fanout.counters().frames_forwarded, forwarded);
    assert_eq!(sim.counters_dropped(DropReason::AwaitingKeyframe), 2);
    // A delta frame after the gap reaches nobody; the next keyframe reaches both.
    sim.frame(false, 2);
    sim.frame(true, 2);
    for id in [A, B] {
        assert_eq!(sim.video_of(id), vec![(0, 2, 2), (3, 2, 2)]);
    }
}
