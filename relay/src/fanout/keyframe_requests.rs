//! The keyframe-request coalescer of one session: at most one request to the publisher
//! per window, one deferred request at the window's end for asks it swallowed, and a
//! retry while subscribers still wait. It knows subscribers only through the one
//! question the caller answers for it: does anyone still wait for a keyframe?

use std::time::{Duration, Instant};

use super::{FanoutSettings, KeyframeOutcome};

/// Request state for one publisher's video.
#[derive(Debug)]
pub(super) struct KeyframeRequests {
    window: Duration,
    retry: Duration,
    publisher: bool,
    /// When the last request went to the current publisher; `None` if none has yet.
    last_sent: Option<Instant>,
    /// An ask was coalesced (or found no publisher) and no keyframe has started since.
    pending: bool,
    /// Among those asks, one came from a subscriber's own PLI/FIR, which stands even if
    /// nobody is gated on a keyframe.
    pending_explicit: bool,
}

impl KeyframeRequests {
    pub(super) fn new(settings: &FanoutSettings) -> Self {
        KeyframeRequests {
            window: settings.keyframe_window,
            // A retry never comes sooner than the window allows.
            retry: settings.keyframe_retry.max(settings.keyframe_window),
            publisher: false,
            last_sent: None,
            pending: false,
            pending_explicit: false,
        }
    }

    /// A publisher appeared or changed (`true`) or left (`false`). A new publisher has
    /// had no request yet, so its window starts open.
    pub(super) fn set_publisher(&mut self, present: bool) {
        self.publisher = present;
        if present {
            self.last_sent = None;
        }
    }

    /// Whether an ask was swallowed and not yet answered.
    pub(super) fn pending(&self) -> bool {
        self.pending
    }

    /// Someone wants a keyframe. On `Sent` the caller emits the request.
    pub(super) fn request(&mut self, now: Instant, explicit: bool) -> KeyframeOutcome {
        if self.publisher && self.window_open(now) {
            self.sent(now);
            return KeyframeOutcome::Sent;
        }
        self.pending = true;
        self.pending_explicit |= explicit;
        if self.publisher {
            KeyframeOutcome::Coalesced
        } else {
            KeyframeOutcome::NoPublisher
        }
    }

    /// A keyframe started: every ask made so far is answered.
    pub(super) fn keyframe_started(&mut self) {
        self.pending = false;
        self.pending_explicit = false;
    }

    /// When [`Self::handle_timeout`] has something to do, given whether any subscriber
    /// waits for a keyframe.
    pub(super) fn poll_timeout(&self, anyone_waiting: bool) -> Option<Instant> {
        if !self.publisher {
            return None;
        }
        let last = self.last_sent?;
        let deferred = (self.pending && (self.pending_explicit || anyone_waiting))
            .then_some(last + self.window);
        let retry = anyone_waiting.then_some(last + self.retry);
        match (deferred, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Returns `true` when a request is due now (the deferred one or a retry); the
    /// caller emits it.
    pub(super) fn handle_timeout(&mut self, now: Instant, anyone_waiting: bool) -> bool {
        if self.poll_timeout(anyone_waiting).is_some_and(|t| t <= now) {
            self.sent(now);
            true
        } else {
            false
        }
    }

    fn window_open(&self, now: Instant) -> bool {
        self.last_sent.is_none_or(|t| now >= t + self.window)
    }

    fn sent(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.pending = false;
        self.pending_explicit = false;
    }
}
