//! The sans-IO fan-out core of one session: which agent gets which media packet, and
//! when to ask the customer's encoder for a keyframe.
//!
//! [`Fanout`] knows nothing of RTP, `webrtc`, tokio or clocks. The shell parses each
//! packet from the publisher (the customer's screen and voice) into a [`PacketInfo`] and
//! calls [`Fanout::route`], which names, through a callback, every subscriber (agent,
//! recorder) that should get it; the callback does the non-blocking enqueue and says
//! whether that subscriber's bounded queue took it ([`Delivery`]). Every input carries
//! the current [`Instant`]; tests drive minutes of media in microseconds.
//!
//! # Run-loop contract
//!
//! The shell owns one `Fanout` per session, inside that session's task, and:
//!
//! 1. calls the matching input with `now`: [`Fanout::route`] for every media packet,
//!    [`Fanout::set_publisher`], [`Fanout::add_subscriber`], [`Fanout::remove_subscriber`],
//!    [`Fanout::keyframe_requested`] (RTCP PLI/FIR from an agent) and
//!    [`Fanout::receiver_report`] as they happen;
//! 2. then drains [`Fanout::poll_output`] until it returns `None`, sending a PLI to the
//!    publisher for every [`FanoutOutput::RequestKeyframe`] and counting every
//!    [`FanoutOutput::Stat`];
//! 3. then asks [`Fanout::poll_timeout`] for the next deadline and calls
//!    [`Fanout::handle_timeout`] when it passes (and drains outputs again).
//!
//! Getters ([`Fanout::counters`], [`Fanout::subscriber`]) may be read at any time, e.g.
//! on each metrics scrape.
//!
//! # Drop to keyframe
//!
//! A slow agent must never slow the publisher or the other agents, so nothing here
//! waits: each subscriber has its own bounded queue, and when one is full the packet is
//! dropped for that subscriber alone. Dropping single video packets would leave the
//! agent's decoder with a broken frame and every frame after it referring to it, so a
//! subscriber that loses a video packet drops everything up to the next keyframe (it
//! is marked *waiting*) and a keyframe is requested. A new subscriber starts waiting
//! too, since its decoder needs a keyframe to start. Gating starts only at the first
//! packet of a keyframe, so a subscriber never gets a frame's tail without its head.
//! Audio has no such dependency: it goes to every subscriber, waiting or not; an audio
//! packet a full queue refuses is simply lost and counted.
//!
//! # Keyframe-request coalescing
//!
//! A keyframe is large and costs the customer's encoder and uplink; agents that join
//! together, or fall behind together when the customer's screen changes a lot, must not
//! cause a keyframe storm. One coalescer per session therefore lets at most one request
//! through per [`FanoutSettings::keyframe_window`]. An ask within the window is
//! *coalesced* and remembered; when the window ends and it is still unanswered (no
//! keyframe has started since) and someone still wants it, one more request goes out.
//! If subscribers still wait [`FanoutSettings::keyframe_retry`] after the last request,
//! the keyframe (or the request) was lost and the request is repeated. Without a
//! publisher an ask is counted as `no_publisher` and remembered; a publisher that
//! appears (or changes) is asked at once, since a new encoder has had no request yet.
//!
//! # Counting
//!
//! The per-packet path neither allocates nor queues outputs: it bumps plain counters,
//! session-wide in [`FanoutCounters`] (which outlive removed subscribers; the shell adds
//! [`FanoutCounters::since`] its last reading to `relay_frames_forwarded_total` and
//! `relay_frames_dropped_total{reason}`) and per subscriber in [`SubscriberStats`].
//! Keyframe requests are rare and are reported as [`FanoutStat`] outputs for
//! `relay_keyframe_requests_total{outcome}`, like the session core's stats.
//!
//! Each video frame counts once per subscriber that saw any of it, when the frame ends
//! (the packet with `frame_end`): *forwarded* if the subscriber got all its packets,
//! *dropped* with [`DropReason::AwaitingKeyframe`] if it skipped them while waiting.
//! A frame broken by a full queue is counted *dropped* with [`DropReason::QueueFull`]
//! at once, on the refused packet, and not again at its end. A frame whose end never
//! comes (its marker packet was lost, or the publisher changed) is counted when the
//! next keyframe starts or the publisher changes. An audio packet is a frame of its
//! own: only refusals are counted as frames (`QueueFull`, kind audio); every queued
//! packet, video or audio, counts in `packets_forwarded`.

pub mod bitrate_cap;
pub mod gop_cache;
mod keyframe_requests;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use keyframe_requests::KeyframeRequests;

/// One receiver of the session's media (an agent, or the recorder), named by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriberId(pub u64);

/// Which track a packet belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    /// The customer's screen.
    Video,
    /// The customer's voice.
    Audio,
}

impl MediaKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Video => "video",
            MediaKind::Audio => "audio",
        }
    }
}

/// What the shell learnt from parsing one packet; all the core needs to route it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Which track.
    pub kind: MediaKind,
    /// Video: the first packet of a keyframe. Ignored for audio.
    pub keyframe_start: bool,
    /// Video: the last packet of a frame (the RTP marker bit). Ignored for audio.
    pub frame_end: bool,
}

/// Tunables of the fan-out; the shell builds them from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FanoutSettings {
    /// At most one keyframe request to the publisher per this window (default 300 ms).
    pub keyframe_window: Duration,
    /// Ask again if subscribers still wait this long after the last request (default
    /// 1 s; never sooner than `keyframe_window`).
    pub keyframe_retry: Duration,
}

impl Default for FanoutSettings {
    fn default() -> Self {
        FanoutSettings {
            keyframe_window: Duration::from_millis(300),
            keyframe_retry: Duration::from_secs(1),
        }
    }
}

/// What a subscriber's queue did with a packet handed to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The packet is queued for the subscriber.
    Queued,
    /// The queue is full; the packet was not queued.
    Full,
}

/// Why a subscriber did not get a frame (`reason` label of `relay_frames_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Its queue was full.
    QueueFull,
    /// It was waiting for a keyframe (it joined, or dropped earlier).
    AwaitingKeyframe,
}

impl DropReason {
    /// Every reason, for creating the metric's labels up front.
    pub const ALL: [DropReason; 2] = [DropReason::QueueFull, DropReason::AwaitingKeyframe];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::AwaitingKeyframe => "awaiting_keyframe",
        }
    }
}

/// What became of one ask for a keyframe (`outcome` label of
/// `relay_keyframe_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyframeOutcome {
    /// A request went to the publisher (at once, at the end of a window, or as a retry).
    Sent,
    /// Folded into a request made within the window.
    Coalesced,
    /// There is no publisher to ask; remembered until one appears.
    NoPublisher,
}

impl KeyframeOutcome {
    /// Every outcome, for creating the metric's labels up front.
    pub const ALL: [KeyframeOutcome; 3] = [
        KeyframeOutcome::Sent,
        KeyframeOutcome::Coalesced,
        KeyframeOutcome::NoPublisher,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyframeOutcome::Sent => "sent",
            KeyframeOutcome::Coalesced => "coalesced",
            KeyframeOutcome::NoPublisher => "no_publisher",
        }
    }
}

/// Something the shell must do after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutOutput {
    /// Ask the publisher for a keyframe (send it an RTCP PLI).
    RequestKeyframe,
    /// Count something.
    Stat(FanoutStat),
}

/// Rare countable events; per-packet counts are in [`FanoutCounters`] instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FanoutStat {
    /// Someone wanted a keyframe; this is what came of it.
    KeyframeRequest(KeyframeOutcome),
}

/// Session-wide counts, summed over every subscriber there ever was. They only grow;
/// the shell reads them and adds [`FanoutCounters::since`] its last reading to the
/// node's Prometheus counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FanoutCounters {
    /// Whole video frames delivered (`relay_frames_forwarded_total`).
    pub frames_forwarded: u64,
    /// Packets, video and audio, queued to a subscriber.
    pub packets_forwarded: u64,
    /// Video frames broken by a full queue.
    pub video_dropped_queue_full: u64,
    /// Video frames skipped while waiting for a keyframe.
    pub video_dropped_awaiting_keyframe: u64,
    /// Audio packets refused by a full queue.
    pub audio_dropped_queue_full: u64,
}

impl FanoutCounters {
    /// Frames dropped for `reason` of `kind`: one series of `relay_frames_dropped_total`.
    pub fn frames_dropped(&self, reason: DropReason, kind: MediaKind) -> u64 {
        match (reason, kind) {
            (DropReason::QueueFull, MediaKind::Video) => self.video_dropped_queue_full,
            (DropReason::AwaitingKeyframe, MediaKind::Video) => {
                self.video_dropped_awaiting_keyframe
            }
            (DropReason::QueueFull, MediaKind::Audio) => self.audio_dropped_queue_full,
            // Audio never waits for a keyframe.
            (DropReason::AwaitingKeyframe, MediaKind::Audio) => 0,
        }
    }

    /// What was counted since `earlier`, a previous reading of the same counters.
    pub fn since(&self, earlier: &FanoutCounters) -> FanoutCounters {
        FanoutCounters {
            frames_forwarded: self
                .frames_forwarded
                .saturating_sub(earlier.frames_forwarded),
            packets_forwarded: self
                .packets_forwarded
                .saturating_sub(earlier.packets_forwarded),
            video_dropped_queue_full: self
                .video_dropped_queue_full
                .saturating_sub(earlier.video_dropped_queue_full),
            video_dropped_awaiting_keyframe: self
                .video_dropped_awaiting_keyframe
                .saturating_sub(earlier.video_dropped_awaiting_keyframe),
            audio_dropped_queue_full: self
                .audio_dropped_queue_full
                .saturating_sub(earlier.audio_dropped_queue_full),
        }
    }
}

/// The last RTCP receiver report a subscriber sent about the media it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiverReport {
    /// Fraction of packets lost since the previous report, in 1/256.
    pub fraction_lost: u8,
    /// Packets lost since the start.
    pub cumulative_lost: u32,
    /// Interarrival jitter, in RTP timestamp units.
    pub jitter: u32,
}

/// What one subscriber got, for its gauges and the agent console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberStats {
    /// Whole video frames delivered.
    pub frames_forwarded: u64,
    /// Video frames it did not get, for either [`DropReason`].
    pub frames_dropped: u64,
    /// Audio packets its full queue refused.
    pub audio_dropped: u64,
    /// Packets, video and audio, queued to it.
    pub packets_forwarded: u64,
    /// It gets no video until the next keyframe starts.
    pub waiting_keyframe: bool,
    /// Its last receiver report, if any.
    pub receiver_report: Option<ReceiverReport>,
}

/// Where a subscriber is within the video frame in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameState {
    /// It has seen no packet of the current frame.
    Between,
    /// It got every packet of the frame so far.
    Receiving,
    /// It skips the frame while waiting for a keyframe; counted at the frame's end.
    Skipping,
    /// A full queue broke the frame; already counted, the rest is skipped.
    Broken,
}

#[derive(Debug)]
struct Subscriber {
    id: SubscriberId,
    /// `stats.waiting_keyframe` is the gate itself, not a copy of it.
    stats: SubscriberStats,
    frame: FrameState,
}

impl Subscriber {
    fn new(id: SubscriberId) -> Self {
        Subscriber {
            id,
            stats: SubscriberStats {
                frames_forwarded: 0,
                frames_dropped: 0,
                audio_dropped: 0,
                packets_forwarded: 0,
                waiting_keyframe: true,
                receiver_report: None,
            },
            frame: FrameState::Between,
        }
    }

    /// The frame in flight ended (or was abandoned): count what became of it.
    fn close_frame(&mut self, counters: &mut FanoutCounters) {
        match self.frame {
            FrameState::Receiving => {
                self.stats.frames_forwarded += 1;
                counters.frames_forwarded += 1;
            }
            FrameState::Skipping => {
                self.stats.frames_dropped += 1;
                counters.video_dropped_awaiting_keyframe += 1;
            }
            FrameState::Between | FrameState::Broken => {}
        }
        self.frame = FrameState::Between;
    }

    /// Routes one video packet to this subscriber. Returns `true` if a full queue made
    /// it start waiting for a keyframe.
    fn route_video(
        &mut self,
        info: &PacketInfo,
        counters: &mut FanoutCounters,
        deliver: &mut impl FnMut(SubscriberId) -> Delivery,
    ) -> bool {
        if info.keyframe_start {
            // A keyframe starts a new frame, whether or not the last one's end came.
            self.close_frame(counters);
            self.stats.waiting_keyframe = false;
        }
        let mut broke = false;
        if self.stats.waiting_keyframe {
            if self.frame != FrameState::Broken {
                self.frame = FrameState::Skipping;
            }
        } else {
            match deliver(self.id) {
                Delivery::Queued => {
                    self.stats.packets_forwarded += 1;
                    counters.packets_forwarded += 1;
                    self.frame = FrameState::Receiving;
                }
                Delivery::Full => {
                    self.stats.frames_dropped += 1;
                    counters.video_dropped_queue_full += 1;
                    self.stats.waiting_keyframe = true;
                    self.frame = FrameState::Broken;
                    broke = true;
                }
            }
        }
        if info.frame_end {
            self.close_frame(counters);
        }
        broke
    }

    fn route_audio(
        &mut self,
        counters: &mut FanoutCounters,
        deliver: &mut impl FnMut(SubscriberId) -> Delivery,
    ) {
        match deliver(self.id) {
            Delivery::Queued => {
                self.stats.packets_forwarded += 1;
                counters.packets_forwarded += 1;
            }
            Delivery::Full => {
                self.stats.audio_dropped += 1;
                counters.audio_dropped_queue_full += 1;
            }
        }
    }
}

/// The fan-out core of one session. See the [module docs](self) for the policies and
/// the run-loop contract.
#[derive(Debug)]
pub struct Fanout {
    /// In the order they were added; `route` delivers in this order.
    subscribers: Vec<Subscriber>,
    keyframes: KeyframeRequests,
    counters: FanoutCounters,
    outputs: VecDeque<FanoutOutput>,
}

impl Fanout {
    /// A fan-out with no publisher and no subscribers.
    pub fn new(settings: FanoutSettings) -> Self {
        Fanout {
            subscribers: Vec::with_capacity(16),
            keyframes: KeyframeRequests::new(&settings),
            counters: FanoutCounters::default(),
            // Room for a burst of requests, so `route` does not allocate on a `Full`.
            outputs: VecDeque::with_capacity(32),
        }
    }

    // ----- getters -------------------------------------------------------------------

    /// Session-wide counts so far.
    pub fn counters(&self) -> &FanoutCounters {
        &self.counters
    }

    /// What subscriber `id` got so far, if it is subscribed.
    pub fn subscriber(&self, id: SubscriberId) -> Option<&SubscriberStats> {
        self.subscribers
            .iter()
            .find(|s| s.id == id)
            .map(|s| &s.stats)
    }

    // ----- inputs --------------------------------------------------------------------

    /// The publisher's video appeared or changed (new codec, reconnect): `present`
    /// `true`; or it left: `false`. On appearing, every subscriber waits for a keyframe
    /// and the new publisher is asked for one at once (if anyone is there to want it).
    pub fn set_publisher(&mut self, now: Instant, present: bool) {
        self.keyframes.set_publisher(present);
        if !present {
            return;
        }
        for sub in &mut self.subscribers {
            sub.close_frame(&mut self.counters);
            sub.stats.waiting_keyframe = true;
        }
        if !self.subscribers.is_empty() || self.keyframes.pending() {
            self.request_keyframe(now, false);
        }
    }

    /// Video packets of the publisher were dropped before the fan-out (over its
    /// bitrate cap, [`bitrate_cap`]): every subscriber waits for the next keyframe, which
    /// is requested at once (coalesced), as after a drop of its own. A frame a
    /// subscriber was receiving is counted as dropped, since its tail is gone.
    pub fn publisher_gap(&mut self, now: Instant) {
        for sub in &mut self.subscribers {
            if matches!(sub.frame, FrameState::Receiving) {
                sub.frame = FrameState::Skipping;
            }
            sub.close_frame(&mut self.counters);
            sub.stats.waiting_keyframe = true;
        }
        if !self.subscribers.is_empty() {
            self.request_keyframe(now, false);
        }
    }

    /// A new subscriber: it gets audio at once and video from the next keyframe, which
    /// is requested (coalesced with others). An `id` already subscribed starts over as
    /// a new subscriber.
    pub fn add_subscriber(&mut self, now: Instant, id: SubscriberId) {
        match self.subscribers.iter_mut().find(|s| s.id == id) {
            Some(sub) => *sub = Subscriber::new(id),
            None => self.subscribers.push(Subscriber::new(id)),
        }
        self.request_keyframe(now, false);
    }

    /// The subscriber is gone; it gets nothing more. Its counts stay in
    /// [`Fanout::counters`].
    pub fn remove_subscriber(&mut self, id: SubscriberId) {
        self.subscribers.retain(|s| s.id != id);
    }

    /// Routes one packet: calls `deliver` for each subscriber that should get it, in the
    /// order they were added, and learns from its answer. Does not allocate.
    pub fn route(
        &mut self,
        now: Instant,
        info: &PacketInfo,
        mut deliver: impl FnMut(SubscriberId) -> Delivery,
    ) {
        match info.kind {
            MediaKind::Audio => {
                for sub in &mut self.subscribers {
                    sub.route_audio(&mut self.counters, &mut deliver);
                }
            }
            MediaKind::Video => {
                if info.keyframe_start {
                    self.keyframes.keyframe_started();
                }
                let mut broken = 0;
                for sub in &mut self.subscribers {
                    if sub.route_video(info, &mut self.counters, &mut deliver) {
                        broken += 1;
                    }
                }
                // One ask per subscriber that fell behind: the first may be sent, the
                // rest are coalesced, and each is counted.
                for _ in 0..broken {
                    self.request_keyframe(now, false);
                }
            }
        }
    }

    /// Subscriber `id` asked for a keyframe itself (RTCP PLI or FIR): passed on to the
    /// publisher, coalesced with other asks. Ignored for an unknown `id`.
    pub fn keyframe_requested(&mut self, now: Instant, id: SubscriberId) {
        if self.subscriber(id).is_some() {
            self.request_keyframe(now, true);
        }
    }

    /// The session's recording needs a keyframe (it caught up after keeping keyframes
    /// only, or lost a packet): passed on to the publisher like a subscriber's own
    /// ask, coalesced with the others.
    pub fn recording_wants_keyframe(&mut self, now: Instant) {
        self.request_keyframe(now, true);
    }

    /// Subscriber `id` sent an RTCP receiver report; kept in its [`SubscriberStats`].
    /// Ignored for an unknown `id`.
    pub fn receiver_report(
        &mut self,
        id: SubscriberId,
        fraction_lost: u8,
        cumulative_lost: u32,
        jitter: u32,
    ) {
        if let Some(sub) = self.subscribers.iter_mut().find(|s| s.id == id) {
            sub.stats.receiver_report = Some(ReceiverReport {
                fraction_lost,
                cumulative_lost,
                jitter,
            });
        }
    }

    // ----- timers and outputs --------------------------------------------------------

    /// When [`Fanout::handle_timeout`] should next be called: the end of a window with
    /// an unanswered ask, or the retry while subscribers wait. `None` if nothing is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.keyframes.poll_timeout(self.anyone_waiting())
    }

    /// Sends the keyframe request due at `now`, if any.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.keyframes.handle_timeout(now, self.anyone_waiting()) {
            self.emit_request(KeyframeOutcome::Sent);
        }
    }

    /// The next thing to do, in order.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<FanoutOutput> {
        self.outputs.pop_front()
    }

    // ----- internals -----------------------------------------------------------------

    fn anyone_waiting(&self) -> bool {
        self.subscribers.iter().any(|s| s.stats.waiting_keyframe)
    }

    fn request_keyframe(&mut self, now: Instant, explicit: bool) {
        let outcome = self.keyframes.request(now, explicit);
        self.emit_request(outcome);
    }

    fn emit_request(&mut self, outcome: KeyframeOutcome) {
        if outcome == KeyframeOutcome::Sent {
            self.outputs.push_back(FanoutOutput::RequestKeyframe);
        }
        self.outputs
            .push_back(FanoutOutput::Stat(FanoutStat::KeyframeRequest(outcome)));
    }
}
