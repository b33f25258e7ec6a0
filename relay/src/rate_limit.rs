//! Per-participant message budgets: token buckets, sans-IO like the rest of the core.
//!
//! Every message a participant sends costs one token of its class's bucket (chat,
//! ICE candidates, offers, share start/stop, pings, file offers, input events). A
//! bucket holds at most `burst` tokens and refills at `per_second`; a message that
//! finds it empty is refused (`rate_limited`) and counted, and changes nothing else.
//! Each participant has its own buckets, so one participant's flood never spends
//! another's budget.
//!
//! The bucket is the GCRA form of a token bucket: it keeps one instant (when it will
//! be full again, the "theoretical arrival time") instead of a token count, so it needs
//! no timer and no floating point. Like the rest of the core it reads no clock: every
//! call takes `now`, so tests drive it with simulated time.
//!
//! Refusals are answered sparingly: a flooder's own outbound queue must not fill with
//! `rate_limited` errors (the relay would then cut it off as a slow consumer, and the
//! errors would cost more than the messages). [`RefusalNotice`] lets at most one
//! answer through per [`NOTICE_INTERVAL`]; the rest are counted silently.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// At most one `rate_limited` answer per participant within this interval.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(1);

/// One class's budget: `burst` messages at once, then `per_second` sustained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Tokens added per second (sustained rate), at least 1.
    pub per_second: u32,
    /// Most tokens the bucket holds (messages that may come back to back), at least 1.
    pub burst: u32,
}

impl RateLimit {
    /// `burst` at once, `per_second` sustained.
    pub const fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    /// Time one token takes to come back.
    fn interval(self) -> Duration {
        Duration::from_secs(1) / self.per_second.max(1)
    }
}

/// A token bucket for one class of one participant.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Time one token takes to come back.
    interval: Duration,
    /// How far ahead of `now` the bucket may be spent: `burst - 1` intervals.
    tolerance: Duration,
    /// When the bucket will be full again; `None` while it is full.
    full_at: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> TokenBucket {
        let interval = limit.interval();
        TokenBucket {
            interval,
            tolerance: interval * limit.burst.max(1).saturating_sub(1),
            full_at: None,
        }
    }

    /// Takes one token at `now` if there is one: `true` means the message may pass.
    /// A refused message takes nothing, so a flood does not push the refill back.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let full_at = self.full_at.filter(|t| *t > now).unwrap_or(now);
        if full_at > now + self.tolerance {
            return false;
        }
        self.full_at = Some(full_at + self.interval);
        true
    }
}

/// Decides which refusals get an answer: the first, then at most one per
/// [`NOTICE_INTERVAL`].
#[derive(Debug, Clone, Default)]
pub struct RefusalNotice {
    last: Option<Instant>,
}

impl RefusalNotice {
    /// Whether the refusal at `now` should be answered (and, if so, notes it).
    pub fn due(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < NOTICE_INTERVAL)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// What a budget is for (`class` label of `relay_messages_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageClass {
    /// `chat`, on the WebSocket or the `chat` data channel (one budget for both).
    Chat,
    /// `candidate` (trickled ICE candidates).
    Candidate,
    /// `offer` (SDP offers: negotiation and renegotiation).
    Offer,
    /// `share_start` and `share_stop`.
    Share,
    /// `ping` (session WebSocket and agent console).
    Ping,
    /// `Offer` on the `files` data channel.
    FileOffer,
    /// Agents' events on the `input` data channel.
    Input,
}

impl MessageClass {
    /// Every class, for creating the metric's labels up front.
    pub const ALL: [MessageClass; 7] = [
        MessageClass::Chat,
        MessageClass::Candidate,
        MessageClass::Offer,
        MessageClass::Share,
        MessageClass::Ping,
        MessageClass::FileOffer,
        MessageClass::Input,
    ];

    /// The classes the session core enforces (the WebSocket and `chat` channel ones).
    const CORE: [MessageClass; 5] = [
        MessageClass::Chat,
        MessageClass::Candidate,
        MessageClass::Offer,
        MessageClass::Share,
        MessageClass::Ping,
    ];

    /// Metric label (and `[rate_limits]` key).
    pub fn as_str(self) -> &'static str {
        match self {
            MessageClass::Chat => "chat",
            MessageClass::Candidate => "candidate",
            MessageClass::Offer => "offer",
            MessageClass::Share => "share",
            MessageClass::Ping => "ping",
            MessageClass::FileOffer => "file_offer",
            MessageClass::Input => "input",
        }
    }
}

/// Every class's budget; built from `[rate_limits]` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    /// `chat` messages (WebSocket and `chat` data channel together).
    pub chat: RateLimit,
    /// ICE candidates.
    pub candidate: RateLimit,
    /// SDP offers.
    pub offer: RateLimit,
    /// `share_start` and `share_stop` together.
    pub share: RateLimit,
    /// `ping`s.
    pub ping: RateLimit,
    /// File offers on the `files` data channel.
    pub file_offer: RateLimit,
    /// An agent's input events on the `input` data channel.
    pub input: RateLimit,
}

impl Default for RateLimits {
    /// Far above what people and real clients do: chat 20 at once then 5/s (a person
    /// types about one message every few seconds; pasting a few lines is a burst);
    /// candidates 200 then 50/s (a browser trickles a few dozen per negotiation);
    /// offers 10 then 2/s; shares 10 then 2/s; pings 20 then 5/s; file offers 20 then
    /// 5/s; input 4,000 then 4,000/s (a 1 kHz gaming mouse is a quarter of it).
    fn default() -> Self {
        RateLimits {
            chat: RateLimit::new(5, 20),
            candidate: RateLimit::new(50, 200),
            offer: RateLimit::new(2, 10),
            share: RateLimit::new(2, 10),
            ping: RateLimit::new(5, 20),
            file_offer: RateLimit::new(5, 20),
            input: RateLimit::new(4000, 4000),
        }
    }
}

impl RateLimits {
    /// The budget of `class`.
    pub fn of(&self, class: MessageClass) -> RateLimit {
        match class {
            MessageClass::Chat => self.chat,
            MessageClass::Candidate => self.candidate,
            MessageClass::Offer => self.offer,
            MessageClass::Share => self.share,
            MessageClass::Ping => self.ping,
            MessageClass::FileOffer => self.file_offer,
            MessageClass::Input => self.input,
        }
    }

    /// Every class with its budget, in [`MessageClass::ALL`] order.
    pub fn all(&self) -> impl Iterator<Item = (MessageClass, RateLimit)> + '_ {
        MessageClass::ALL.into_iter().map(|c| (c, self.of(c)))
    }
}

/// One participant's (or console's) buckets for the classes the session core enforces,
/// and when it was last told it is over one.
#[derive(Debug, Clone)]
pub struct Budgets {
    buckets: [TokenBucket; MessageClass::CORE.len()],
    notice: RefusalNotice,
}

/// What [`Budgets::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within budget: handle the message.
    Pass,
    /// Over budget: drop it and answer `rate_limited`.
    RefuseAndTell,
    /// Over budget: drop it and count it, without an answer (one was sent recently).
    RefuseSilently,
}

impl Budgets {
    /// Full buckets.
    pub fn new(limits: &RateLimits) -> Budgets {
        Budgets {
            buckets: MessageClass::CORE.map(|c| TokenBucket::new(limits.of(c))),
            notice: RefusalNotice::default(),
        }
    }

    /// Spends one token of `class` at `now`. Classes the core does not enforce
    /// ([`MessageClass::FileOffer`], [`MessageClass::Input`]) always pass here.
    pub fn check(&mut self, class: MessageClass, now: Instant) -> Admission {
        let Some(i) = MessageClass::CORE.iter().position(|c| *c == class) else {
            return Admission::Pass;
        };
        if self.buckets[i].try_take(now) {
            Admission::Pass
        } else if self.notice.due(now) {
            Admission::RefuseAndTell
        } else {
            Admission::RefuseSilently
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// How many of `n` messages at `now` pass.
    fn take(bucket: &mut TokenBucket, now: Instant, n: usize) -> usize {
        (0..n).filter(|_| bucket.try_take(now)).count()
    }

    #[test]
    fn a_full_bucket_lets_its_burst_through_then_refuses() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(5, 20));
        assert_eq!(take(&mut b, t0, 1000), 20);
        assert!(!b.try_take(t0 + ms(199)), "no token back before 200 ms");
    }

    #[test]
    fn tokens_come_back_at_the_sustained_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(5, 20));
        assert_eq!(take(&mut b, t0, 20), 20);
        // One token every 200 ms.
        assert!(b.try_take(t0 + ms(200)));
        assert!(!b.try_take(t0 + ms(200)));
        assert!(!b.try_take(t0 + ms(399)));
        assert!(b.try_take(t0 + ms(400)));
        // Ten seconds of a flood at 1 kHz: 5 per second pass, not more.
        let passed = (1..=10_000u64)
            .filter(|i| b.try_take(t0 + ms(400) + ms(*i)))
            .count();
        assert_eq!(passed, 50);
    }

    #[test]
    fn a_refused_flood_does_not_delay_the_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(1, 2));
        assert_eq!(take(&mut b, t0, 2), 2);
        assert_eq!(take(&mut b, t0 + ms(500), 10_000), 0);
        assert!(b.try_take(t0 + ms(1000)), "refused messages cost nothing");
    }

    #[test]
    fn an_idle_bucket_refills_to_its_burst_and_no_further() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit::new(5, 20));
        assert_eq!(take(&mut b, t0, 20), 20);
        // An hour later it holds its burst again, not an hour's worth.
        assert_eq!(take(&mut b, t0 + Duration::from_secs(3600), 1000), 20);
    }

    #[test]
    fn a_steady_stream_under_the_rate_is_never_refused() {
        // A 1 kHz mouse against the input budget: every event passes, for a minute.
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimits::default().input);
        assert!((0..60_000u64).all(|i| b.try_take(t0 + ms(i))));
        // Someone typing a message a second.
        let mut chat = TokenBucket::new(RateLimits::default().chat);
        assert!((0..600u64).all(|i| chat.try_take(t0 + Duration::from_secs(i))));
    }

    #[test]
    fn refusals_are_answered_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut n = RefusalNotice::default();
        assert!(n.due(t0));
        assert!(!n.due(t0 + ms(999)));
        assert!(n.due(t0 + ms(1000)));
        assert!(!n.due(t0 + ms(1500)));
    }

    #[test]
    fn budgets_are_kept_per_class() {
        let t0 = Instant::now();
        let limits = RateLimits {
            chat: RateLimit::new(1, 3),
            ..RateLimits::default()
        };
        let mut b = Budgets::new(&limits);
        for _ in 0..3 {
            assert_eq!(b.check(MessageClass::Chat, t0), Admission::Pass);
        }
        assert_eq!(b.check(MessageClass::Chat, t0), Admission::RefuseAndTell);
        assert_eq!(b.check(MessageClass::Chat, t0), Admission::RefuseSilently);
        // Chat is spent; candidates and pings are not.
        assert_eq!(b.check(MessageClass::Candidate, t0), Admission::Pass);
        assert_eq!(b.check(MessageClass::Ping, t0), Admission::Pass);
        // The shell's classes are not the core's to refuse.
        assert_eq!(b.check(MessageClass::Input, t0), Admission::Pass);
    }
}
