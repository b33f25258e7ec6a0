//! The node's Prometheus metrics, served at `GET /metrics`.
//!
//! One [`Metrics`] per node, owned by the IO shell; the sans-IO cores report what
//! happened and the shell counts it here. Every name starts with `relay_`. Label values
//! that users look for (roles, end reasons, outcomes) are created up front, so they read
//! `0` from the first scrape instead of appearing only after the first event.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use relay_codec::wire::{EndReason, ErrorCode};

use crate::rate_limit::MessageClass;
use crate::session::ShareOutcome;

/// Participant roles (`role` label).
pub const ROLES: [&str; 4] = ["host", "agent", "customer", "supervisor"];
/// Outcomes of support-key attempts (`outcome` label of `relay_support_key_attempts_total`).
pub const KEY_OUTCOMES: [&str; 6] = ["ok", "wrong", "expired", "used", "throttled", "challenged"];
/// Lock-out scopes (`scope` label of `relay_key_lockouts_total`).
pub const LOCKOUT_SCOPES: [&str; 2] = ["address", "node"];
/// Invitation outcomes (`outcome` label of `relay_invitations_total`).
pub const INVITATION_OUTCOMES: [&str; 6] = [
    "sent",
    "accepted",
    "declined",
    "cancelled",
    "expired",
    "withdrawn",
];
/// WebSocket kinds (`kind` label of `relay_ws_connections_active`).
pub const WS_KINDS: [&str; 2] = ["session", "console"];
/// Why frames were dropped for an agent (`reason` label of `relay_frames_dropped_total`).
pub const DROP_REASONS: [&str; 2] = ["queue_full", "awaiting_keyframe"];
/// Outcomes of keyframe requests (`outcome` label of `relay_keyframe_requests_total`).
pub const KEYFRAME_OUTCOMES: [&str; 3] = ["sent", "coalesced", "no_publisher"];
/// Outcomes of agents' input events (`outcome` label of `relay_input_events_total`).
pub const INPUT_OUTCOMES: [&str; 6] = [
    "delivered",
    "refused_view_only",
    "malformed",
    "no_customer",
    "customer_away",
    "rate_limited",
];
/// Outcomes of peer-connection negotiations (`outcome` label of
/// `relay_negotiations_total`).
pub const NEGOTIATION_OUTCOMES: [&str; 5] =
    ["ok", "bad_offer", "no_port", "replaced", "ice_restart"];
/// Outcomes of file transfers (`outcome` label of `relay_file_transfers_total`): the
/// labels of [`crate::transfer::Outcome`].
pub const FILE_TRANSFER_OUTCOMES: [&str; 9] = [
    "completed",
    "declined",
    "cancelled",
    "refused_forbidden",
    "refused_too_large",
    "refused_bad_name",
    "no_receivers",
    "protocol_error",
    "rate_limited",
];
/// What became of chat on `chat` data channels (`outcome` label of
/// `relay_chat_data_channel_total`).
pub const CHAT_CHANNEL_OUTCOMES: [&str; 3] = ["received", "delivered", "fallback_websocket"];
/// Why the recorder left out video frames (`reason` label of
/// `relay_recording_frames_dropped_total`).
pub const RECORDING_DROP_REASONS: [&str; 3] = ["queue_full", "awaiting_keyframe", "incomplete"];
/// Why a session was not recorded (`reason` label of `relay_recordings_skipped_total`).
pub const RECORDING_SKIP_REASONS: [&str; 1] = ["no_review_key"];
/// Why a publisher's packets were dropped before the fan-out (`reason` label of
/// `relay_publish_packets_dropped_total`).
pub const PUBLISH_DROP_REASONS: [&str; 1] = ["over_bitrate_cap"];
/// Why a new connection was closed before its first request (`reason` label of
/// `relay_handshake_failures_total`): the labels of
/// [`crate::signal::handshake::Failure`].
pub const HANDSHAKE_FAILURES: [&str; 4] = ["timeout", "tls_error", "closed", "head_too_large"];
/// Why the relay closed or refused a connection outside its first request (`reason`
/// label of `relay_connections_closed_total`): the labels of
/// [`crate::signal::listener::CloseReason`].
pub const CONNECTION_CLOSE_REASONS: [&str; 6] = [
    "node_limit",
    "address_limit",
    "idle_timeout",
    "head_timeout",
    "head_too_large",
    "body_timeout",
];
/// Data channels tracked in `relay_data_channels_open{label}`.
pub const DATA_CHANNEL_LABELS: [&str; 2] = ["chat", "files"];
/// The codes of malformed client messages, pre-created in `relay_messages_rejected_total`.
const MESSAGE_ERRORS: [ErrorCode; 5] = [
    ErrorCode::BadRequest,
    ErrorCode::InvalidField,
    ErrorCode::MessageTooLarge,
    ErrorCode::UnknownMessageType,
    ErrorCode::RateLimited,
];

/// All metrics of a node and the registry that exports them.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// The registry every metric below is registered in.
    pub registry: Registry,
    /// `relay_sessions_active`: sessions currently open.
    pub sessions_active: IntGauge,
    /// `relay_participants_active{role}`: participants currently in sessions.
    pub participants_active: IntGaugeVec,
    /// `relay_sessions_created_total`: sessions opened.
    pub sessions_created_total: IntCounter,
    /// `relay_sessions_ended_total{reason}`: sessions ended, by reason.
    pub sessions_ended_total: IntCounterVec,
    /// `relay_joins_total{role,outcome}`: join attempts; outcome `ok` or an error code.
    pub joins_total: IntCounterVec,
    /// `relay_support_key_attempts_total{outcome}`: customer key/link attempts.
    pub support_key_attempts_total: IntCounterVec,
    /// `relay_key_lockouts_total{scope}`: lock-outs started by the key throttle.
    pub key_lockouts_total: IntCounterVec,
    /// `relay_invitations_total{outcome}`: invitations by what became of them.
    pub invitations_total: IntCounterVec,
    /// `relay_ws_connections_active{kind}`: open WebSockets.
    pub ws_connections_active: IntGaugeVec,
    /// `relay_messages_rejected_total{code}`: client messages refused, by error code.
    pub messages_rejected_total: IntCounterVec,
    /// `relay_http_requests_total{status}`: HTTP responses, by status code.
    pub http_requests_total: IntCounterVec,
    /// `relay_draining`: 1 while the node drains before shutdown, else 0.
    pub draining: IntGauge,
    /// RTP packets sent to agents (one per agent per packet).
    pub rtp_packets_forwarded_total: IntCounter,
    /// Complete video frames sent to agents (one per agent per frame).
    pub frames_forwarded_total: IntCounter,
    /// Frames not sent to an agent, by reason.
    pub frames_dropped_total: IntCounterVec,
    /// Keyframe requests towards the customer, by outcome.
    pub keyframe_requests_total: IntCounterVec,
    /// Agents' input events, by outcome.
    pub input_events_total: IntCounterVec,
    /// Time from a packet's arrival from the customer to its hand-off to an agent's
    /// peer connection.
    pub forward_latency_seconds: Histogram,
    /// Packets waiting in each agent's send queue.
    pub agent_queue_depth: IntGaugeVec,
    /// Open WebRTC peer connections.
    pub peer_connections_active: IntGauge,
    /// Offers answered, by outcome.
    pub negotiations_total: IntCounterVec,
    /// File transfers, one per receiver's part (or per refused offer), by outcome.
    pub file_transfers_total: IntCounterVec,
    /// File bytes handed to receivers' `files` channels (one per receiver per byte).
    pub file_bytes_forwarded_total: IntCounter,
    /// Chat messages on `chat` data channels, by outcome.
    pub chat_data_channel_total: IntCounterVec,
    /// `chat` and `files` data channels in use, by label.
    pub data_channels_open: IntGaugeVec,
    /// Agents' screen shares to the customer: started, refused or ended, by outcome.
    pub agent_shares_total: IntCounterVec,
    /// `relay_messages_rate_limited_total{class}`: participants' messages over their
    /// class's budget (`[rate_limits]`), dropped.
    pub messages_rate_limited_total: IntCounterVec,
    /// `relay_text_refused_total{field, rule}`: names, chat messages and comments
    /// refused by a text rule (see `relay::text`).
    pub text_refused_total: IntCounterVec,
    /// `relay_recordings_active`: recordings being written.
    pub recordings_active: IntGauge,
    /// `relay_recording_bytes_total{stage}`: bytes recorded, raw (records before
    /// compression) and compressed (written to the file, before encryption).
    pub recording_bytes_total: IntCounterVec,
    /// `relay_recording_write_errors_total`: recordings cut short by a write error.
    pub recording_write_errors_total: IntCounter,
    /// `relay_recording_queue_depth`: items waiting for the recordings' writers.
    pub recording_queue_depth: IntGauge,
    /// `relay_recording_frames_dropped_total{reason}`: video frames not recorded.
    pub recording_frames_dropped_total: IntCounterVec,
    /// `relay_recording_records_dropped_total`: other records not recorded (the
    /// writer's queue was full even beyond video's share, or the container refused them).
    pub recording_records_dropped_total: IntCounter,
    /// `relay_recordings_skipped_total{reason}`: sessions not recorded.
    pub recordings_skipped_total: IntCounterVec,
    /// `relay_recordings_purged_total`: recordings deleted by the retention purge.
    pub recordings_purged_total: IntCounter,
    /// `relay_recording_purge_errors_total`: files the purge could not read or delete.
    pub recording_purge_errors_total: IntCounter,
    /// `relay_build_info{version}`: always 1; carries the version as a label.
    pub build_info: IntGaugeVec,
    /// `relay_publish_packets_dropped_total{reason}`: publishers' RTP packets dropped
    /// before the fan-out.
    pub publish_packets_dropped_total: IntCounterVec,
    /// `relay_publish_cap_exceeded_total`: times a published track went over
    /// `limits.max_publish_bitrate`.
    pub publish_cap_exceeded_total: IntCounter,
    /// `relay_handshake_failures_total{reason}`: connections closed before their first
    /// complete request.
    pub handshake_failures_total: IntCounterVec,
    /// `relay_handshakes_pending`: connections in their TLS handshake or first request.
    pub handshakes_pending: IntGauge,
    /// `relay_connections_open`: TCP connections to the signalling listener, HTTP and
    /// upgraded WebSockets alike (what `limits.max_connections` counts).
    pub connections_open: IntGauge,
    /// `relay_connections_closed_total{reason}`: connections the relay refused at accept
    /// or closed after their first request, by reason.
    pub connections_closed_total: IntCounterVec,
    /// `relay_media_datagrams_rejected_total{reason}`: datagrams the WebRTC stack
    /// refused on a live connection's socket (see [`crate::transport::rejects`]).
    pub media_datagrams_rejected_total: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric, with the well-known label values at 0.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric name");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric name");
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric name");
            c
        };

        let m = Metrics {
            sessions_active: gauge("relay_sessions_active", "Support sessions currently open."),
            participants_active: gauge_vec(
                "relay_participants_active",
                "Participants currently in sessions, by role (host, agent, customer, supervisor).",
                &["role"],
            ),
            sessions_created_total: counter(
                "relay_sessions_created_total",
                "Support sessions opened since the node started.",
            ),
            sessions_ended_total: counter_vec(
                "relay_sessions_ended_total",
                "Support sessions ended since the node started, by reason.",
                &["reason"],
            ),
            joins_total: counter_vec(
                "relay_joins_total",
                "Attempts to join a session, by role and outcome (\"ok\" or the error code).",
                &["role", "outcome"],
            ),
            support_key_attempts_total: counter_vec(
                "relay_support_key_attempts_total",
                "Customer attempts with a support key or link, by outcome \
                 (ok, wrong, expired, used, throttled; challenged: answered with a \
                 proof-of-work challenge while the node's key budget is spent).",
                &["outcome"],
            ),
            key_lockouts_total: counter_vec(
                "relay_key_lockouts_total",
                "Lock-outs started by the support-key throttle, by scope \
                 (address: one client address; node: the node-wide budget is spent, \
                 and key attempts need a solved challenge).",
                &["scope"],
            ),
            invitations_total: counter_vec(
                "relay_invitations_total",
                "Invitations to agents, by outcome \
                 (sent, accepted, declined, cancelled, expired, withdrawn).",
                &["outcome"],
            ),
            ws_connections_active: gauge_vec(
                "relay_ws_connections_active",
                "Open WebSocket connections, by kind (session, console).",
                &["kind"],
            ),
            messages_rejected_total: counter_vec(
                "relay_messages_rejected_total",
                "Client requests and WebSocket messages refused, by error code.",
                &["code"],
            ),
            http_requests_total: counter_vec(
                "relay_http_requests_total",
                "HTTP responses sent, by status code.",
                &["status"],
            ),
            draining: gauge(
                "relay_draining",
                "1 while the node drains before shutting down (no new sessions), else 0.",
            ),
            rtp_packets_forwarded_total: counter(
                "relay_rtp_packets_forwarded_total",
                "RTP packets handed to agents' peer connections (one per agent per packet).",
            ),
            frames_forwarded_total: counter(
                "relay_frames_forwarded_total",
                "Complete video frames handed to agents (one per agent per frame).",
            ),
            frames_dropped_total: counter_vec(
                "relay_frames_dropped_total",
                "Frames not sent to an agent, by reason (queue_full: its queue overflowed; \
                 awaiting_keyframe: it waits for the next keyframe after joining or a drop).",
                &["reason"],
            ),
            keyframe_requests_total: counter_vec(
                "relay_keyframe_requests_total",
                "Keyframe requests towards the customer, by outcome (sent; coalesced into \
                 one already sent; no_publisher).",
                &["outcome"],
            ),
            input_events_total: counter_vec(
                "relay_input_events_total",
                "Input events from agents, by outcome (delivered, refused_view_only, \
                 malformed, no_customer, customer_away: dropped while the customer is \
                 away, until it publishes again; rate_limited: over [rate_limits] input).",
                &["outcome"],
            ),
            forward_latency_seconds: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "relay_forward_latency_seconds",
                        "Time inside the relay from a packet's arrival from the customer to \
                         its hand-off to an agent's peer connection.",
                    )
                    .buckets(vec![
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025,
                        0.05, 0.1,
                    ]),
                )
                .expect("valid metric name");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric name");
                h
            },
            agent_queue_depth: gauge_vec(
                "relay_agent_queue_depth",
                "RTP packets waiting in an agent's send queue, by session and participant.",
                &["session", "participant"],
            ),
            peer_connections_active: gauge(
                "relay_peer_connections_active",
                "Open WebRTC peer connections (one per participant with media).",
            ),
            negotiations_total: counter_vec(
                "relay_negotiations_total",
                "Offers from participants, by outcome (ok, bad_offer, no_port; replaced: a new \
                 peer connection of a participant replaced its old one; ice_restart: an offer \
                 restarting ICE on the same connection, also counted ok when answered).",
                &["outcome"],
            ),
            file_transfers_total: counter_vec(
                "relay_file_transfers_total",
                "File transfers on data channels, counted once per receiver's part (or once \
                 per refused offer), by outcome (completed, declined, cancelled, \
                 refused_forbidden, refused_too_large, no_receivers, protocol_error).",
                &["outcome"],
            ),
            file_bytes_forwarded_total: counter(
                "relay_file_bytes_forwarded_total",
                "File bytes handed to receivers' files channels (one per receiver per byte).",
            ),
            chat_data_channel_total: counter_vec(
                "relay_chat_data_channel_total",
                "Chat messages on chat data channels, by outcome (received: handed to the \
                 session; delivered: sent on a channel; fallback_websocket: meant for a \
                 channel that was gone or full, sent on the WebSocket instead).",
                &["outcome"],
            ),
            data_channels_open: gauge_vec(
                "relay_data_channels_open",
                "Participants' chat and files data channels in use, by label.",
                &["label"],
            ),
            agent_shares_total: counter_vec(
                "relay_agent_shares_total",
                "Agents' screen shares to the customer, by outcome (started; refused_forbidden, \
                 refused_busy; ended: stopped, left, lost_control, connection_lost, \
                 session_ended).",
                &["outcome"],
            ),
            messages_rate_limited_total: counter_vec(
                "relay_messages_rate_limited_total",
                "Participants' messages over their budget ([rate_limits]) and dropped, by \
                 class (chat, candidate, offer, share, ping, file_offer, input).",
                &["class"],
            ),
            text_refused_total: counter_vec(
                "relay_text_refused_total",
                "Names, chat messages and invitation comments refused by a text rule \
                 (control, bidi, tag, invisible, nothing_visible, …), by field and rule.",
                &["field", "rule"],
            ),
            recordings_active: gauge(
                "relay_recordings_active",
                "Session recordings being written.",
            ),
            recording_bytes_total: counter_vec(
                "relay_recording_bytes_total",
                "Bytes recorded, by stage (raw: records before compression; compressed: \
                 the container's bytes written to files, before encryption).",
                &["stage"],
            ),
            recording_write_errors_total: counter(
                "relay_recording_write_errors_total",
                "Recordings cut short by a write error (the session went on unrecorded).",
            ),
            recording_queue_depth: gauge(
                "relay_recording_queue_depth",
                "Items waiting in the recordings' writer queues (all recordings).",
            ),
            recording_frames_dropped_total: counter_vec(
                "relay_recording_frames_dropped_total",
                "Video frames left out of recordings, by reason (queue_full: the writer \
                 fell behind and the recording kept keyframes only; awaiting_keyframe: \
                 before the first keyframe or after a loss; incomplete: a packet was lost).",
                &["reason"],
            ),
            recording_records_dropped_total: counter(
                "relay_recording_records_dropped_total",
                "Chat, roster, input and other records left out of recordings (the \
                 writer's queue was full, or the container refused the record).",
            ),
            recordings_skipped_total: counter_vec(
                "relay_recordings_skipped_total",
                "Sessions not recorded, by reason (no_review_key: their portal has none).",
                &["reason"],
            ),
            recordings_purged_total: counter(
                "relay_recordings_purged_total",
                "Recordings deleted because they were older than recording.retention.",
            ),
            recording_purge_errors_total: counter(
                "relay_recording_purge_errors_total",
                "Recording files or folders the retention purge could not read or delete.",
            ),
            build_info: gauge_vec(
                "relay_build_info",
                "Always 1; the version label says which relay build runs.",
                &["version"],
            ),
            publish_packets_dropped_total: counter_vec(
                "relay_publish_packets_dropped_total",
                "Publishers' RTP packets dropped before the fan-out, by reason \
                 (over_bitrate_cap: the track was over limits.max_publish_bitrate).",
                &["reason"],
            ),
            publish_cap_exceeded_total: counter(
                "relay_publish_cap_exceeded_total",
                "Times a published track went over limits.max_publish_bitrate (one per run \
                 of dropped packets).",
            ),
            handshake_failures_total: counter_vec(
                "relay_handshake_failures_total",
                "Connections closed before their first complete HTTP request, by reason \
                 (timeout: not within limits.handshake_timeout; tls_error; closed: by the \
                 client; head_too_large).",
                &["reason"],
            ),
            handshakes_pending: gauge(
                "relay_handshakes_pending",
                "Connections in their TLS handshake or before their first complete request.",
            ),
            connections_open: gauge(
                "relay_connections_open",
                "Open TCP connections to the signalling listener (HTTP and upgraded \
                 WebSockets), as counted against limits.max_connections.",
            ),
            connections_closed_total: counter_vec(
                "relay_connections_closed_total",
                "Connections refused at accept or closed by the relay after their first \
                 request, by reason (node_limit: limits.max_connections; address_limit: \
                 limits.max_connections_per_address; idle_timeout, head_timeout: no complete \
                 next request within limits.idle_timeout; head_too_large: a later head over \
                 64 KiB; body_timeout: limits.body_timeout).",
                &["reason"],
            ),
            media_datagrams_rejected_total: {
                let c = crate::transport::rejects::counter();
                registry
                    .register(Box::new(c.clone()))
                    .expect("unique metric name");
                c
            },
            registry: registry.clone(),
        };

        for role in ROLES {
            m.participants_active.with_label_values(&[role]);
            m.joins_total.with_label_values(&[role, "ok"]);
        }
        for reason in EndReason::ALL {
            m.sessions_ended_total.with_label_values(&[reason.as_str()]);
        }
        for outcome in KEY_OUTCOMES {
            m.support_key_attempts_total.with_label_values(&[outcome]);
        }
        for scope in LOCKOUT_SCOPES {
            m.key_lockouts_total.with_label_values(&[scope]);
        }
        for outcome in INVITATION_OUTCOMES {
            m.invitations_total.with_label_values(&[outcome]);
        }
        for kind in WS_KINDS {
            m.ws_connections_active.with_label_values(&[kind]);
        }
        for code in MESSAGE_ERRORS {
            m.messages_rejected_total
                .with_label_values(&[code.as_str()]);
        }
        m.http_requests_total.with_label_values(&["200"]);
        for reason in DROP_REASONS {
            m.frames_dropped_total.with_label_values(&[reason]);
        }
        for outcome in KEYFRAME_OUTCOMES {
            m.keyframe_requests_total.with_label_values(&[outcome]);
        }
        for outcome in INPUT_OUTCOMES {
            m.input_events_total.with_label_values(&[outcome]);
        }
        for outcome in NEGOTIATION_OUTCOMES {
            m.negotiations_total.with_label_values(&[outcome]);
        }
        for outcome in FILE_TRANSFER_OUTCOMES {
            m.file_transfers_total.with_label_values(&[outcome]);
        }
        for outcome in CHAT_CHANNEL_OUTCOMES {
            m.chat_data_channel_total.with_label_values(&[outcome]);
        }
        for label in DATA_CHANNEL_LABELS {
            m.data_channels_open.with_label_values(&[label]);
        }
        for outcome in ShareOutcome::ALL {
            m.agent_shares_total.with_label_values(&[outcome.as_str()]);
        }
        for class in MessageClass::ALL {
            m.messages_rate_limited_total
                .with_label_values(&[class.as_str()]);
        }
        for field in crate::text::Field::ALL {
            for rule in crate::text::TextRule::ALL {
                m.text_refused_total
                    .with_label_values(&[field.as_str(), rule.as_str()]);
            }
        }
        for stage in ["raw", "compressed"] {
            m.recording_bytes_total.with_label_values(&[stage]);
        }
        for reason in RECORDING_DROP_REASONS {
            m.recording_frames_dropped_total
                .with_label_values(&[reason]);
        }
        for reason in RECORDING_SKIP_REASONS {
            m.recordings_skipped_total.with_label_values(&[reason]);
        }
        for reason in PUBLISH_DROP_REASONS {
            m.publish_packets_dropped_total.with_label_values(&[reason]);
        }
        for reason in HANDSHAKE_FAILURES {
            m.handshake_failures_total.with_label_values(&[reason]);
        }
        for reason in CONNECTION_CLOSE_REASONS {
            m.connections_closed_total.with_label_values(&[reason]);
        }
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// Counts a message of `class` dropped over its budget, in
    /// `relay_messages_rate_limited_total{class}` and
    /// `relay_messages_rejected_total{code="rate_limited"}`.
    pub fn rate_limited(&self, class: MessageClass) {
        self.messages_rate_limited_total
            .with_label_values(&[class.as_str()])
            .inc();
        self.messages_rejected_total
            .with_label_values(&[ErrorCode::RateLimited.as_str()])
            .inc();
    }

    /// All metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported_from_the_start() {
        let text = Metrics::new().encode();
        for name in [
            "relay_sessions_active",
            "relay_participants_active",
            "relay_sessions_created_total",
            "relay_sessions_ended_total",
            "relay_joins_total",
            "relay_support_key_attempts_total",
            "relay_key_lockouts_total",
            "relay_invitations_total",
            "relay_ws_connections_active",
            "relay_messages_rejected_total",
            "relay_http_requests_total",
            "relay_draining",
            "relay_file_transfers_total",
            "relay_file_bytes_forwarded_total",
            "relay_chat_data_channel_total",
            "relay_data_channels_open",
            "relay_agent_shares_total",
            "relay_messages_rate_limited_total",
            "relay_text_refused_total",
            "relay_recordings_active",
            "relay_recording_bytes_total",
            "relay_recording_write_errors_total",
            "relay_recording_queue_depth",
            "relay_recording_frames_dropped_total",
            "relay_recordings_skipped_total",
            "relay_recordings_purged_total",
            "relay_recording_purge_errors_total",
            "relay_build_info",
            "relay_publish_packets_dropped_total",
            "relay_publish_cap_exceeded_total",
            "relay_handshake_failures_total",
            "relay_handshakes_pending",
            "relay_connections_open",
            "relay_connections_closed_total",
            "relay_media_datagrams_rejected_total",
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} missing:\n{text}"
            );
        }
        for line in [
            "relay_participants_active{role=\"supervisor\"} 0",
            "relay_sessions_ended_total{reason=\"customer_did_not_return\"} 0",
            "relay_joins_total{outcome=\"ok\",role=\"customer\"} 0",
            "relay_support_key_attempts_total{outcome=\"throttled\"} 0",
            "relay_key_lockouts_total{scope=\"node\"} 0",
            "relay_invitations_total{outcome=\"withdrawn\"} 0",
            "relay_ws_connections_active{kind=\"console\"} 0",
            "relay_draining 0",
            "relay_messages_rejected_total{code=\"message_too_large\"} 0",
            "relay_http_requests_total{status=\"200\"} 0",
            "relay_file_transfers_total{outcome=\"refused_too_large\"} 0",
            "relay_chat_data_channel_total{outcome=\"fallback_websocket\"} 0",
            "relay_agent_shares_total{outcome=\"refused_busy\"} 0",
            "relay_messages_rate_limited_total{class=\"chat\"} 0",
            "relay_messages_rejected_total{code=\"rate_limited\"} 0",
            "relay_input_events_total{outcome=\"rate_limited\"} 0",
            "relay_text_refused_total{field=\"chat\",rule=\"control\"} 0",
            "relay_recording_bytes_total{stage=\"compressed\"} 0",
            "relay_recording_frames_dropped_total{reason=\"queue_full\"} 0",
            "relay_recordings_skipped_total{reason=\"no_review_key\"} 0",
            "relay_publish_packets_dropped_total{reason=\"over_bitrate_cap\"} 0",
            "relay_handshake_failures_total{reason=\"timeout\"} 0",
            "relay_connections_open 0",
            "relay_connections_closed_total{reason=\"body_timeout\"} 0",
            "relay_media_datagrams_rejected_total{reason=\"auth_tag\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(text.contains(&format!(
            "relay_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
    }

    #[test]
    fn file_outcome_labels_are_the_cores() {
        let core: Vec<&str> = crate::transfer::Outcome::ALL
            .iter()
            .map(|o| o.as_str())
            .collect();
        assert_eq!(core, FILE_TRANSFER_OUTCOMES);
    }

    #[test]
    fn counts_show_up() {
        let m = Metrics::new();
        m.sessions_ended_total
            .with_label_values(&["key_expired"])
            .inc();
        m.http_requests_total.with_label_values(&["429"]).inc_by(2);
        let text = m.encode();
        assert!(text.contains("relay_sessions_ended_total{reason=\"key_expired\"} 1"));
        assert!(text.contains("relay_http_requests_total{status=\"429\"} 2"));
    }
}
