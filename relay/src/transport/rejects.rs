//! Counting what the `webrtc` stack refuses on a live connection's socket.
//!
//! Datagrams that reach a peer connection (its own port, or the UDP mux after routing)
//! are parsed inside the crate: SRTP/SRTCP decryption and authentication, RTP/RTCP,
//! STUN, DTLS and SCTP parsing. A datagram it refuses (a forged or corrupted SRTP
//! packet, a replayed index, a truncated RTP header, garbage from the peer's address)
//! is dropped there, and the crate exposes nothing countable: its handler pipeline
//! (`rtc::peer_connection::handler`) logs `<Handler>.handle_read got error: <reason>` at
//! warn level through the `log` crate, once per datagram, and errors that escape the
//! pipeline are logged by the driver as `handle_read error: <reason>` at error level. A
//! flood of bad packets would thus write one log line per packet.
//!
//! This module turns those log records into a metric, and keeps the log readable:
//!
//! - [`RejectCounter`] is a `tracing` layer (installed by the binary next to the log
//!   formatter) that counts each such record in
//!   `relay_media_datagrams_rejected_total{reason}`, with [`reason`] classifying the
//!   crate's message;
//! - [`RejectLogLimit`] is a filter for the log formatter that lets through at most one
//!   such line per reason per [`LOG_EVERY`]; the metric has the full count.
//!
//! What is not counted here: datagrams the UDP mux drops before any connection sees
//! them (`relay_udp_mux_datagrams_dropped_total`), and datagrams the kernel drops when a
//! socket's receive buffer is full.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus::{IntCounterVec, Opts};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Filter, Layer};

/// The `reason` labels of `relay_media_datagrams_rejected_total`.
pub const REASONS: [&str; 4] = ["auth_tag", "replay", "too_short", "other"];

/// How often a line is logged per reason while the stack keeps refusing datagrams.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// Where the crate's handler pipeline logs a refused datagram (warn level).
const HANDLER_TARGET: &str = "rtc::peer_connection::handler";
/// What its message holds (after the handler's name).
const HANDLER_MESSAGE: &str = ".handle_read got error: ";
/// Where the crate's driver logs an error that escaped the pipeline (error level).
const DRIVER_TARGET: &str = "webrtc::peer_connection::driver";
/// How its message starts.
const DRIVER_MESSAGE: &str = "handle_read error";

static COUNTER: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "relay_media_datagrams_rejected_total",
            "Datagrams the WebRTC stack refused on a live peer connection's socket, by \
             reason (auth_tag: SRTP/SRTCP authentication failed; replay: an SRTP index \
             seen before; too_short: truncated RTP/RTCP/SRTP; other: malformed STUN, \
             DTLS, SCTP or anything else).",
        ),
        &["reason"],
    )
    .expect("valid metric");
    for reason in REASONS {
        c.with_label_values(&[reason]);
    }
    c
});

/// The process-wide `relay_media_datagrams_rejected_total` (the crate's log is
/// process-wide too); every node's registry exports it.
pub fn counter() -> IntCounterVec {
    COUNTER.clone()
}

/// The `reason` label for the crate's error message.
pub fn reason(message: &str) -> &'static str {
    if message.contains("auth tag") {
        "auth_tag"
    } else if message.contains("duplicated") {
        "replay"
    } else if message.contains("too short")
        || message.contains("insufficient")
        || message.contains("buffer: short")
    {
        "too_short"
    } else {
        "other"
    }
}

/// The message of an event if it is the driver's record of a refused datagram.
fn refused_datagram(event: &Event<'_>) -> Option<String> {
    let level = *event.metadata().level();
    if level != Level::ERROR && level != Level::WARN {
        return None;
    }
    let mut v = Fields::default();
    event.record(&mut v);
    // Records bridged from `log` carry their real target in a field.
    let target = v.log_target.as_deref().unwrap_or(event.metadata().target());
    let message = v.message?;
    let handler = level == Level::WARN
        && target.starts_with(HANDLER_TARGET)
        && message.contains(HANDLER_MESSAGE);
    let driver = level == Level::ERROR
        && target.starts_with(DRIVER_TARGET)
        && message.starts_with(DRIVER_MESSAGE);
    (handler || driver).then_some(message)
}

#[derive(Default)]
struct Fields {
    message: Option<String>,
    log_target: Option<String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = Some(value.to_owned()),
            "log.target" => self.log_target = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "message" => self.message = Some(format!("{value:?}")),
            "log.target" => self.log_target = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// The layer that counts refused datagrams. Give it a filter that passes warn- and
/// error-level events only (see [`RejectCounter::layer`]), so it costs nothing on
/// others.
#[derive(Clone)]
pub struct RejectCounter {
    counter: IntCounterVec,
}

impl RejectCounter {
    /// Counts into `counter` (normally [`counter`]).
    pub fn new(counter: IntCounterVec) -> RejectCounter {
        RejectCounter { counter }
    }

    /// The layer, filtered to warn- and error-level events.
    pub fn layer<S>(counter: IntCounterVec) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let warnings = tracing_subscriber::filter::LevelFilter::WARN;
        RejectCounter::new(counter).with_filter(warnings)
    }
}

impl<S: Subscriber> Layer<S> for RejectCounter {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if let Some(message) = refused_datagram(event) {
            self.counter.with_label_values(&[reason(&message)]).inc();
        }
    }
}

/// A filter for the log formatter: the crate's per-datagram lines at most once per
/// reason per [`LOG_EVERY`]; every other event passes.
#[derive(Default)]
pub struct RejectLogLimit {
    last: Mutex<HashMap<&'static str, Instant>>,
}

impl RejectLogLimit {
    /// Whether a refused datagram of `reason` seen at `now` is logged.
    fn admit(&self, reason: &'static str, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.get(reason) {
            Some(t) if now.saturating_duration_since(*t) < LOG_EVERY => false,
            _ => {
                last.insert(reason, now);
                true
            }
        }
    }
}

impl<S> Filter<S> for RejectLogLimit {
    fn enabled(&self, _meta: &tracing::Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        match refused_datagram(event) {
            Some(message) => self.admit(reason(&message), Instant::now()),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::shared::error::Error;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn the_crates_own_messages_are_classified() {
        for (e, want) in [
            (Error::ErrFailedToVerifyAuthTag, "auth_tag"),
            (Error::ErrTooShortRtp, "too_short"),
            (Error::ErrHeaderSizeInsufficient, "too_short"),
            (Error::ErrBufferShort, "too_short"),
            (Error::RtpFailedToVerifyAuthTag, "auth_tag"),
            (Error::RtcpFailedToVerifyAuthTag, "auth_tag"),
            (Error::SrtpSsrcDuplicated(1, 2), "replay"),
            (Error::ErrFailedToDecodeStun, "other"),
        ] {
            let message = format!("SrtpHandler.handle_read got error: {e}");
            assert_eq!(reason(&message), want, "{message}");
        }
    }

    #[test]
    fn driver_errors_are_counted_and_others_are_not() {
        let counter = IntCounterVec::new(Opts::new("t", "t"), &["reason"]).unwrap();
        let subscriber = tracing_subscriber::registry().with(RejectCounter::layer(counter.clone()));
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..3 {
                tracing::warn!(
                    target: "rtc::peer_connection::handler",
                    "SrtpHandler.handle_read got error: {}",
                    Error::ErrFailedToVerifyAuthTag
                );
            }
            tracing::error!(
                target: "webrtc::peer_connection::driver",
                "handle_read error: {}",
                Error::ErrTooShortRtp
            );
            tracing::warn!(target: "rtc::peer_connection::handler", "something else");
            tracing::error!(target: "webrtc::peer_connection::driver", "something else");
            tracing::error!(target: "relay", "handle_read error: not the crate's");
            tracing::info!(
                target: "rtc::peer_connection::handler",
                "IceHandler.handle_read got error: x"
            );
            tracing::warn!(target: "webrtc::peer_connection::driver", "handle_read error: x");
        });
        assert_eq!(counter.with_label_values(&["auth_tag"]).get(), 3);
        assert_eq!(counter.with_label_values(&["too_short"]).get(), 1);
        assert_eq!(counter.with_label_values(&["other"]).get(), 0);
    }

    #[test]
    fn one_line_per_reason_per_minute() {
        let limit = RejectLogLimit::default();
        let t = Instant::now();
        assert!(limit.admit("auth_tag", t));
        assert!(!limit.admit("auth_tag", t + Duration::from_secs(59)));
        assert!(limit.admit("other", t + Duration::from_secs(1)));
        assert!(limit.admit("auth_tag", t + LOG_EVERY));
    }
}
