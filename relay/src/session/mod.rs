//! The sans-IO core of the control plane: every session on this node, its roster,
//! masking, permissions, invitations, support keys and timers.
//!
//! [`Node`] knows nothing of tokio, sockets or clocks. Each input carries the current
//! [`Instant`]; the core never reads a clock, so tests drive hours of session life in
//! microseconds with a simulated one.
//!
//! # Run-loop contract
//!
//! The IO shell owns one `Node` and, for every event it sees:
//!
//! 1. calls the matching method with `now`: a request method (`create_session`, `join`,
//!    `invite`, `accept_invitation`, …) returns its answer directly; connection events
//!    (`connect`, `message`, `disconnected`, `console_opened`, `console_closed`) return
//!    nothing or a refusal;
//! 2. then drains [`Node::poll_output`] until it returns `None`, delivering every
//!    [`Output::Send`] to its connection in order, every [`Output::ChatOnChannel`] on
//!    that participant's `chat` data channel (or, if it is gone, with [`Node::deliver`]), closing connections named by
//!    [`Output::Close`] after delivering what precedes it, and counting every [`Output::Stat`];
//! 3. then asks [`Node::poll_timeout`] for the next deadline and calls
//!    [`Node::handle_timeout`] when it passes (and drains outputs again).
//!
//! Outputs are queued in the order the rules produce them; a connection sees its
//! messages in that order.
//!
//! # The rules this core enforces
//!
//! - A support key is 9 CSPRNG digits, unique among live sessions; the support link has
//!   its own 128-bit token. Unused, both expire after `key_ttl` (at most 4 h) and the
//!   session ends (`key_expired`). A key admits one customer.
//! - Support-key attempts pass the [`KeyThrottle`](crate::throttle::KeyThrottle) first; a
//!   throttled attempt is not looked up at all.
//! - At most [`MAX_AGENTS`] agents (host + invited) per session; at most
//!   `max_sessions_per_agent` sessions per agent; supervisors are counted apart.
//! - Masked agents and supervisors are never named to the customer; supervisors are not
//!   shown to agents either ([`participant`] holds that rule, in one place).
//! - Chat is decided here whichever way it travels: a message from a participant's
//!   WebSocket ([`Node::message`]) or its `chat` data channel ([`Node::channel_message`])
//!   goes through the same checks, and each recipient gets it once, trimmed to what it
//!   may see, on its `chat` data channel if it has one open ([`Node::chat_channel`]),
//!   else on its WebSocket.
//! - A portal-wide invitation is won by the first accept; the others are withdrawn.
//! - One agent at a time may show its own screen to the customer: the host or an agent
//!   with `control` ([`ClientMsg::ShareStart`](relay_codec::wire::ClientMsg::ShareStart));
//!   a second one gets `share_busy` (the host too: it takes a share over by setting the
//!   sharer to `view`), view-only agents, supervisors and the customer get `forbidden`.
//!   The share ends when the agent stops, leaves, loses `control`, its peer connection
//!   is lost ([`Node::share_lost`]) or the session ends. Everyone is told with
//!   `agent_share`; the customer learns who shares only of an agent it may see.
//! - A disconnected participant keeps its place for its grace period, then is removed;
//!   a customer who does not return ends the session, and so does the last agent leaving.
//!   Meanwhile the others see it `reconnecting` (if they may see it at all).
//! - Every message a participant sends on its WebSocket or `chat` data channel spends
//!   one token of its class's budget ([`rate_limit`](crate::rate_limit): chat,
//!   candidates, offers, share start/stop, pings; `leave` is free). Over budget it is
//!   dropped, counted ([`Stat::RateLimited`]) and answered `rate_limited` at most once a
//!   second; the budgets are per participant (and per agent console), kept across its
//!   reconnections, so one participant's flood never spends another's.
//! - A participant comes back with a single-use token: the participant token of its join
//!   admits its first connection, and every `welcome` carries the resume token for the
//!   next one; the token used stops working. When the customer's connection drops, the
//!   media plane is told ([`MediaEvent::CustomerAway`]).

mod ids;
mod invitation;
mod node;
mod participant;
mod state;
#[cfg(test)]
mod tests;

use std::time::Duration;

use relay_codec::wire::{EndReason, ErrorCode, IceCandidate, Permission, Role, ServerMsg};

pub use ids::{
    ConnId, InvitationId, ParticipantId, Random, Secret, SecretDigest, SessionId, SupportKey,
};
pub use node::{
    Census, Credentials, DirectoryEntry, InvitationCreated, JoinCredential, Node, Proof,
    SessionCreated, WallClock,
};

use crate::rate_limit::{MessageClass, RateLimits};
use crate::throttle::{Scope, ThrottleSettings};

/// Most agents (host and invited, supervisors not counted) one session may hold.
pub const MAX_AGENTS: usize = 8;

/// The longest a support key may stay valid, whatever the configuration says.
pub const MAX_KEY_TTL: Duration = Duration::from_secs(4 * 3600);

/// Tunables of the core; the shell builds them from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long an unused support key and link stay valid (clamped to [`MAX_KEY_TTL`]).
    pub key_ttl: Duration,
    /// How long an invitation waits for an accept.
    pub invitation_ttl: Duration,
    /// How long a disconnected customer keeps its place.
    pub customer_grace: Duration,
    /// How long a disconnected agent or supervisor keeps its place.
    pub agent_grace: Duration,
    /// Longest a session may last.
    pub max_duration: Duration,
    /// Most sessions one agent may be in at once (at most 8).
    pub max_sessions_per_agent: usize,
    /// Most sessions one supervisor may monitor at once.
    pub max_monitored_sessions: usize,
    /// Chat messages kept per session for participants who connect later.
    pub chat_history: usize,
    /// Whether a host may invite an agent directly who shares no portal with the
    /// session (`session.cross_portal_invitations`, default off).
    pub cross_portal_invitations: bool,
    /// Support-key brute-force guard.
    pub throttle: ThrottleSettings,
    /// Per-participant message budgets (`[rate_limits]`).
    pub rate_limits: RateLimits,
}

/// Something the shell must do after an input.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Deliver a message on a WebSocket.
    Send {
        /// Which connection.
        conn: ConnId,
        /// What to send.
        msg: ServerMsg,
    },
    /// Close a WebSocket once what was queued before this has been sent.
    Close {
        /// Which connection.
        conn: ConnId,
    },
    /// Deliver a chat message on a participant's `chat` data channel (it has one open,
    /// so it does not get the message on its WebSocket). If the channel is gone by then,
    /// the shell delivers it with [`Node::deliver`] instead: exactly once either way.
    ChatOnChannel {
        /// The session.
        session: SessionId,
        /// The participant.
        participant: ParticipantId,
        /// A [`ServerMsg::Chat`], already trimmed to what this participant may see.
        msg: ServerMsg,
    },
    /// Count something.
    Stat(Stat),
    /// Tell the media plane (peer connections, fan-out) what changed.
    Media(MediaEvent),
}

/// What the media plane learns from the control plane. The session core is the one
/// source of truth for who is in a session and with which rights; the media plane
/// mirrors it from these events and never decides a permission itself.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// A participant is in the session with these rights: sent when it joins and
    /// whenever its role or permission changes.
    Member {
        /// The session.
        session: SessionId,
        /// The participant.
        participant: ParticipantId,
        /// Its role now.
        role: Role,
        /// Its permission now (`Control` lets its input reach the customer).
        permission: Permission,
    },
    /// A participant left the session (its peer connection must close).
    Left {
        /// The session.
        session: SessionId,
        /// The participant.
        participant: ParticipantId,
    },
    /// Signalling from a participant for its peer connection.
    Signal {
        /// The session.
        session: SessionId,
        /// The participant.
        participant: ParticipantId,
        /// The offer or candidate.
        signal: Signal,
    },
    /// Who may now show its own screen to the customer: `Some` when an agent's share was
    /// accepted, `None` when it ended. The media plane forwards that agent's `sendonly`
    /// video track to the customer while, and only while, it is the sharer here.
    Share {
        /// The session.
        session: SessionId,
        /// The sharing agent, or `None`.
        sharer: Option<ParticipantId>,
    },
    /// Something for the session's recording. Recordings are for supervisors: agents
    /// are named whether masked or not, with what the customer saw in the record.
    Record {
        /// The session.
        session: SessionId,
        /// What happened.
        entry: RecordEntry,
    },
    /// The customer's session WebSocket dropped: it is reconnecting (within its grace
    /// period) or gone. Its peer connection closes at once (the recording gets a gap),
    /// and agents' input is dropped, not queued, until it has resumed and publishes
    /// its screen again on a new peer connection. Agents' peer connections stay.
    CustomerAway {
        /// The session.
        session: SessionId,
        /// The customer.
        participant: ParticipantId,
    },
    /// The session ended: every peer connection of it closes.
    SessionEnded {
        /// The session.
        session: SessionId,
    },
}

/// What the session core tells the session's recorder (the media plane adds the
/// customer's video, input events and file transfers it sees itself).
#[derive(Debug, Clone, PartialEq)]
pub enum RecordEntry {
    /// The session opened: it is recorded if its portal has a review key. Comes
    /// before every other event of the session.
    Start {
        /// The session's portal.
        portal: String,
    },
    /// The roster changed.
    Roster(relay_codec::recording::RosterRecord),
    /// A chat message or an agent note was posted.
    Chat(relay_codec::recording::ChatRecord),
}

/// A participant's WebRTC signalling, as received on its WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// An SDP offer.
    Offer(String),
    /// A trickled ICE candidate.
    Candidate(IceCandidate),
}

/// Countable events, for the shell's metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// A session was opened.
    SessionCreated,
    /// A session ended.
    SessionEnded(EndReason),
    /// A participant entered a session in this role (or took this role over).
    ParticipantAdded(Role),
    /// A participant left a session in this role (or gave this role up).
    ParticipantRemoved(Role),
    /// A participant tried to get into a session (create, join, accept, monitor).
    Join {
        /// As which role.
        role: Role,
        /// `None` on success, the refusal's code otherwise.
        refused: Option<ErrorCode>,
    },
    /// A support key or link was tried.
    KeyAttempt(KeyOutcome),
    /// A support-key failure started a lock-out.
    Lockout(Scope),
    /// An invitation changed state.
    Invitation(InvitationOutcome),
    /// An agent's screen share started, was refused or ended.
    Share(ShareOutcome),
    /// A participant's (or console's) message was over its class's budget and dropped.
    RateLimited(MessageClass),
    /// A name, chat message or comment was refused by a text rule
    /// ([`crate::text`]).
    TextRefused {
        /// Which kind of text.
        field: crate::text::Field,
        /// The rule it broke.
        rule: crate::text::TextRule,
    },
}

/// What happened to a request to share an agent's screen, or how a share ended
/// (`outcome` label of `relay_agent_shares_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareOutcome {
    /// A share started.
    Started,
    /// Refused: the asker may not share (view-only, supervisor, customer).
    RefusedForbidden,
    /// Refused: another agent shares.
    RefusedBusy,
    /// Ended: the agent stopped it.
    Stopped,
    /// Ended: the agent left the session.
    Left,
    /// Ended: the agent's permission became `view`.
    LostControl,
    /// Ended: the agent's peer connection was lost.
    ConnectionLost,
    /// Ended with the session.
    SessionEnded,
}

impl ShareOutcome {
    /// Every outcome, for creating the metric's labels up front.
    pub const ALL: [ShareOutcome; 8] = [
        ShareOutcome::Started,
        ShareOutcome::RefusedForbidden,
        ShareOutcome::RefusedBusy,
        ShareOutcome::Stopped,
        ShareOutcome::Left,
        ShareOutcome::LostControl,
        ShareOutcome::ConnectionLost,
        ShareOutcome::SessionEnded,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShareOutcome::Started => "started",
            ShareOutcome::RefusedForbidden => "refused_forbidden",
            ShareOutcome::RefusedBusy => "refused_busy",
            ShareOutcome::Stopped => "stopped",
            ShareOutcome::Left => "left",
            ShareOutcome::LostControl => "lost_control",
            ShareOutcome::ConnectionLost => "connection_lost",
            ShareOutcome::SessionEnded => "session_ended",
        }
    }
}

/// Result of one support-key or support-link attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOutcome {
    /// Admitted the customer.
    Ok,
    /// No live session has it.
    Wrong,
    /// It expired unused.
    Expired,
    /// It already admitted its customer.
    Used,
    /// Refused by the throttle without being looked up.
    Throttled,
    /// Not looked up: answered with a challenge (the node budget is spent, and the
    /// attempt came without a valid proof).
    Challenged,
}

impl KeyOutcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyOutcome::Ok => "ok",
            KeyOutcome::Wrong => "wrong",
            KeyOutcome::Expired => "expired",
            KeyOutcome::Used => "used",
            KeyOutcome::Throttled => "throttled",
            KeyOutcome::Challenged => "challenged",
        }
    }
}

/// What happened to an invitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvitationOutcome {
    /// Created and delivered.
    Sent,
    /// Accepted by an agent.
    Accepted,
    /// Declined by its one invitee.
    Declined,
    /// Cancelled by the host.
    Cancelled,
    /// Nobody accepted in time.
    Expired,
    /// Taken back from one agent because another accepted first.
    Withdrawn,
}

impl InvitationOutcome {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            InvitationOutcome::Sent => "sent",
            InvitationOutcome::Accepted => "accepted",
            InvitationOutcome::Declined => "declined",
            InvitationOutcome::Cancelled => "cancelled",
            InvitationOutcome::Expired => "expired",
            InvitationOutcome::Withdrawn => "withdrawn",
        }
    }
}

/// Why the core refused a request. Each maps to one stable [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The participant token is unknown.
    #[error("unknown or expired participant token")]
    Unauthorized,
    /// The participant or resume token was used already: each admits one connection,
    /// and the `welcome` of that connection carried the next one.
    #[error("this token was already used; connect with the resume token of your last welcome")]
    TokenUsed,
    /// No such session, participant or invitation visible to the caller.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// A value was unacceptable.
    #[error("{0}")]
    InvalidField(&'static str),
    /// No live session has this support key or link. A support key that expired or was
    /// used gets this answer too, so that a guesser cannot tell which numbers are or
    /// were real keys.
    #[error("no live session has this support key; check it, or ask your agent for a new one")]
    WrongKey,
    /// The key or link expired before a customer used it.
    #[error("this support key has expired; ask your agent for a new one")]
    KeyExpired,
    /// The key or link already admitted its customer.
    #[error("this support key has already been used")]
    KeyUsed,
    /// Too many failures; retry after the given time.
    #[error("too many failed attempts; retry in {}s", retry_after.as_secs().max(1))]
    Throttled {
        /// When to retry.
        retry_after: Duration,
    },
    /// The node's key budget is spent: solve this challenge and repeat the join.
    #[error("solve the challenge, then repeat the join with the proof")]
    ChallengeRequired(relay_codec::wire::KeyChallenge),
    /// Already 8 agents.
    #[error("the session already has its {MAX_AGENTS} agents")]
    SessionFull,
    /// The agent is in its maximum number of sessions.
    #[error("you are already in {0} sessions, the most allowed at once")]
    AgentSessionLimit(usize),
    /// The supervisor monitors its maximum number of sessions.
    #[error("you already monitor {0} sessions, the most allowed at once")]
    MonitorLimit(usize),
    /// Already a participant.
    #[error("you are already in this session")]
    AlreadyInSession,
    /// The invitation is closed.
    #[error("this invitation is no longer open")]
    InvitationClosed,
    /// The session has ended.
    #[error("the session has ended")]
    SessionEnded,
    /// The node is draining.
    #[error("this relay node is shutting down and takes no new sessions")]
    Draining,
    /// Another agent is sharing its screen.
    #[error("another agent is already sharing its screen; one at a time")]
    ShareBusy,
}

impl SessionError {
    /// The stable wire code.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::Unauthorized | SessionError::TokenUsed => ErrorCode::Unauthorized,
            SessionError::NotFound(_) => ErrorCode::NotFound,
            SessionError::Forbidden(_) => ErrorCode::Forbidden,
            SessionError::InvalidField(_) => ErrorCode::InvalidField,
            SessionError::WrongKey => ErrorCode::WrongKey,
            SessionError::KeyExpired => ErrorCode::KeyExpired,
            SessionError::KeyUsed => ErrorCode::KeyUsed,
            SessionError::Throttled { .. } => ErrorCode::Throttled,
            SessionError::ChallengeRequired(_) => ErrorCode::ChallengeRequired,
            SessionError::SessionFull => ErrorCode::SessionFull,
            SessionError::AgentSessionLimit(_) => ErrorCode::AgentSessionLimit,
            SessionError::MonitorLimit(_) => ErrorCode::MonitorLimit,
            SessionError::AlreadyInSession => ErrorCode::AlreadyInSession,
            SessionError::InvitationClosed => ErrorCode::InvitationClosed,
            SessionError::SessionEnded => ErrorCode::SessionEnded,
            SessionError::Draining => ErrorCode::Draining,
            SessionError::ShareBusy => ErrorCode::ShareBusy,
        }
    }

    /// For [`SessionError::Throttled`]: when to retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SessionError::Throttled { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}
