//! Signalling messages: the JSON spoken over the relay's HTTP API and WebSockets.
//!
//! Every WebSocket message is one JSON object with a `"type"` field. Clients send
//! [`ClientMsg`] (optionally with a numeric `"id"` that the relay echoes as `"ref"` in a
//! reply or error), the relay sends [`ServerMsg`]. HTTP request and response bodies are
//! the `*Request` / `*Response` structs below. Errors everywhere carry an [`ErrorCode`]:
//! a stable, machine-readable `code` plus a human message.
//!
//! [`parse_client_msg`] is the one entry point for untrusted WebSocket input: it
//! enforces a size limit first and tells malformed JSON from an unknown message type.

use serde::{Deserialize, Serialize};

/// Largest signalling message (WebSocket frame or HTTP body) the relay accepts by default.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Longest display name (customer or agent), in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest portal name a session may be created in, in characters (it names the
/// recordings' folder, so it must fit a file name).
pub const MAX_PORTAL_CHARS: usize = 64;
/// Longest chat message, in characters.
pub const MAX_CHAT_CHARS: usize = 4000;
/// Longest invitation comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 500;

/// Stable error codes. Clients match on these; the message next to them is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request or message was not valid JSON or missed a required field.
    BadRequest,
    /// A WebSocket message had a `type` the relay does not know.
    UnknownMessageType,
    /// The request or message exceeded the size limit.
    MessageTooLarge,
    /// The request body did not arrive in full within `limits.body_timeout`.
    RequestTimeout,
    /// A field was present but its value is not acceptable (too long, empty, control characters).
    InvalidField,
    /// No credentials, or credentials that do not verify (bad signature, expired token).
    Unauthorized,
    /// Valid credentials that do not allow this action (not the host, no monitor grant, other portal).
    Forbidden,
    /// No such session, participant or invitation (or it is not visible to the caller).
    NotFound,
    /// No live session has this support key or link.
    WrongKey,
    /// The support key or link existed but expired before a customer used it.
    KeyExpired,
    /// The support key or link already admitted its customer.
    KeyUsed,
    /// Too many failed support-key attempts from this address; retry later.
    Throttled,
    /// The node's support-key budget is spent: repeat the join with a solved
    /// `challenge` (a proof of work; see [`crate::challenge`]).
    ChallengeRequired,
    /// The session already has its 8 agents.
    SessionFull,
    /// The agent is already in the maximum number of concurrent sessions.
    AgentSessionLimit,
    /// The supervisor already monitors the maximum number of sessions.
    MonitorLimit,
    /// The agent is already a participant of this session.
    AlreadyInSession,
    /// The invitation is no longer open (accepted by another agent, cancelled, expired).
    InvitationClosed,
    /// The session has ended.
    SessionEnded,
    /// The node is draining for shutdown and takes no new sessions.
    Draining,
    /// This WebSocket was replaced by a newer connection of the same participant.
    Replaced,
    /// Another agent is already sharing its screen with the customer (one at a time).
    ShareBusy,
    /// This participant sent more messages of this kind than its budget allows (chat,
    /// signalling, share, ping, file offers, input); the message was dropped. Slow down.
    RateLimited,
    /// The session (or key, link, invitation) lives on another node of the cluster:
    /// repeat the request at the URL given (`location` over HTTP, `redirect` on a
    /// WebSocket).
    Redirect,
    /// The node that held the session is gone (crashed or cut off); the session cannot
    /// be resumed. Start a new one.
    SessionLost,
    /// An unexpected failure inside the relay.
    Internal,
}

impl ErrorCode {
    /// The `snake_case` name used on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownMessageType => "unknown_message_type",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::WrongKey => "wrong_key",
            ErrorCode::KeyExpired => "key_expired",
            ErrorCode::KeyUsed => "key_used",
            ErrorCode::Throttled => "throttled",
            ErrorCode::ChallengeRequired => "challenge_required",
            ErrorCode::SessionFull => "session_full",
            ErrorCode::AgentSessionLimit => "agent_session_limit",
            ErrorCode::MonitorLimit => "monitor_limit",
            ErrorCode::AlreadyInSession => "already_in_session",
            ErrorCode::InvitationClosed => "invitation_closed",
            ErrorCode::SessionEnded => "session_ended",
            ErrorCode::Draining => "draining",
            ErrorCode::Replaced => "replaced",
            ErrorCode::ShareBusy => "share_busy",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Redirect => "redirect",
            ErrorCode::SessionLost => "session_lost",
            ErrorCode::Internal => "internal",
        }
    }
}

/// The JSON body of every HTTP error: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// What went wrong, for a machine (`code`) and for a person (`message`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// For [`ErrorCode::Throttled`]: seconds until the next attempt may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// For [`ErrorCode::Redirect`]: the URL to repeat the request at (also in the
    /// `Location` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// For [`ErrorCode::ChallengeRequired`]: the puzzle to solve before repeating the join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<KeyChallenge>,
}

/// A proof-of-work puzzle (see [`crate::challenge`]): find a decimal `nonce` such that
/// `SHA-256(challenge ":" nonce)` starts with `bits` zero bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChallenge {
    /// The opaque challenge string (ASCII), valid for a short while and once.
    pub challenge: String,
    /// The leading zero bits a solution needs.
    pub bits: u8,
}

impl KeyChallenge {
    /// Does the work: the proof that solves this challenge (see
    /// [`crate::challenge::solve`]; `2^bits` hashes on average).
    pub fn solve(&self) -> KeyProof {
        KeyProof {
            challenge: self.challenge.clone(),
            nonce: crate::challenge::solve(&self.challenge, self.bits),
        }
    }
}

/// A solved [`KeyChallenge`], sent with a repeated join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyProof {
    /// The challenge string as received.
    pub challenge: String,
    /// The solution: 1 to 20 decimal digits.
    pub nonce: String,
}

/// Whether the customer can see an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Listed in the customer's roster and named in chat.
    #[default]
    Visible,
    /// Never revealed to the customer in any message.
    Masked,
}

/// What an agent may do with the customer's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Watch only; input events are refused by the relay.
    #[default]
    View,
    /// Watch and send input events.
    Control,
}

/// A participant's role in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The agent who opened the session (or inherited it when the host left).
    Host,
    /// An agent who joined by invitation.
    Agent,
    /// The customer sharing their screen.
    Customer,
    /// A supervisor monitoring silently: invisible to customer and agents.
    Supervisor,
}

/// Who a chat message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Everyone in the session, customer included.
    #[default]
    All,
    /// Agents and supervisors only (an agent note); never the customer.
    Agents,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The host ended it.
    EndedByHost,
    /// The customer left.
    CustomerLeft,
    /// The last agent left or did not return from a disconnect.
    AgentsLeft,
    /// The support key expired before a customer used it.
    KeyExpired,
    /// The customer's connection dropped and did not come back within the grace period.
    CustomerDidNotReturn,
    /// The session reached the configured maximum duration.
    MaxDuration,
    /// The node shut down (drain deadline reached).
    NodeShutdown,
}

impl EndReason {
    /// Every reason, for metrics pre-registration.
    pub const ALL: [EndReason; 7] = [
        EndReason::EndedByHost,
        EndReason::CustomerLeft,
        EndReason::AgentsLeft,
        EndReason::KeyExpired,
        EndReason::CustomerDidNotReturn,
        EndReason::MaxDuration,
        EndReason::NodeShutdown,
    ];

    /// The `snake_case` name used on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::EndedByHost => "ended_by_host",
            EndReason::CustomerLeft => "customer_left",
            EndReason::AgentsLeft => "agents_left",
            EndReason::KeyExpired => "key_expired",
            EndReason::CustomerDidNotReturn => "customer_did_not_return",
            EndReason::MaxDuration => "max_duration",
            EndReason::NodeShutdown => "node_shutdown",
        }
    }
}

/// Why a participant left the roster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// Left on purpose.
    Left,
    /// Disconnected and did not return within the grace period.
    TimedOut,
}

// ---------------------------------------------------------------------------
// HTTP bodies
// ---------------------------------------------------------------------------

/// `POST /v1/sessions`: an agent opens a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// The portal the session belongs to; must be one of the agent's portals.
    pub portal: String,
    /// Whether the host is visible to the customer (default visible).
    #[serde(default)]
    pub visibility: Visibility,
}

/// Credentials a participant uses to open its session WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantCredentials {
    /// The session joined.
    pub session_id: String,
    /// This participant's id inside the session.
    pub participant_id: String,
    /// Secret for `GET /v1/sessions/{session_id}/ws?token=...`; treat like a password.
    /// It admits the participant's **first** connection only: every `welcome` carries
    /// the single-use [`resume_token`](ServerMsg::Welcome::resume_token) for the next one.
    pub participant_token: String,
    /// Ready-made WebSocket URL (token included).
    pub ws_url: String,
}

/// Response to `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateSessionResponse {
    /// The new session.
    pub session_id: String,
    /// Nine digits the customer types in the portal.
    pub support_key: String,
    /// A link that admits the customer without typing the key.
    pub support_url: String,
    /// When the key and link expire if no customer used them (RFC 3339, UTC).
    pub expires_at: String,
    /// The host's own credentials.
    pub host: ParticipantCredentials,
}

/// `POST /v1/join`: a customer joins with a name and either the key or the link token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The customer's display name.
    pub name: String,
    /// The nine-digit support key (spaces and dashes are ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_key: Option<String>,
    /// The token from the support URL (`/s/{token}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub support_link: Option<String>,
    /// A solved challenge, when an earlier attempt was answered `challenge_required`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<KeyProof>,
}

/// Who an invitation goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InviteTarget {
    /// One agent, by account id.
    Agent(String),
    /// Every agent signed in to this portal; the first to accept wins.
    Portal(String),
}

/// `POST /v1/sessions/{id}/invitations`: the host invites an agent or a whole portal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// The invitee(s).
    pub target: InviteTarget,
    /// How the invitee will appear to the customer (default visible).
    #[serde(default)]
    pub visibility: Visibility,
    /// What the invitee may do (default view).
    #[serde(default)]
    pub permission: Permission,
    /// A note for the invited agents only; the customer never sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Response to an invitation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InviteResponse {
    /// The invitation's id.
    pub invitation_id: String,
    /// How many signed-in agents it was delivered to right away.
    pub delivered_to: usize,
    /// When it expires if nobody accepts (RFC 3339, UTC).
    pub expires_at: String,
}

/// An open invitation as an invited agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitationInfo {
    /// The invitation's id, for accept/decline.
    pub invitation_id: String,
    /// The session it is for.
    pub session_id: String,
    /// The portal of that session.
    pub portal: String,
    /// The host's display name.
    pub from: String,
    /// Whether it went to the whole portal.
    pub portal_wide: bool,
    /// How the invitee will appear to the customer.
    pub visibility: Visibility,
    /// What the invitee may do.
    pub permission: Permission,
    /// The host's note, for agents only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When it expires (RFC 3339, UTC).
    pub expires_at: String,
}

/// `PATCH /v1/sessions/{id}/participants/{pid}`: the host changes an agent's rights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateParticipantRequest {
    /// New permission, if changing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<Permission>,
    /// New visibility, if changing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
}

/// One live session as a supervisor's listing shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    /// The session.
    pub session_id: String,
    /// Its portal.
    pub portal: String,
    /// The host's display name.
    pub host: String,
    /// The customer's name, once one joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Number of agents (host included, supervisors not).
    pub agents: usize,
    /// Seconds since the session was opened.
    pub age_s: u64,
    /// In a cluster: the URL of the node that holds the session (monitor it there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_url: Option<String>,
}

/// Response to `GET /v1/monitor/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionList {
    /// Live sessions of the supervisor's portals.
    pub sessions: Vec<SessionSummary>,
}

// ---------------------------------------------------------------------------
// WebSocket messages
// ---------------------------------------------------------------------------

/// One participant as another participant sees it. What is filled in depends on who
/// looks: the customer sees visible agents only, never `agent_id` or `visibility`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// Id inside the session.
    pub participant_id: String,
    /// Display name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Account id of an agent; shown to agents and supervisors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Visibility of an agent; shown to agents and supervisors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<Visibility>,
    /// Permission of an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permission: Option<Permission>,
    /// Whether its WebSocket is currently connected.
    pub connected: bool,
    /// It was connected, its connection dropped, and it may still come back (its grace
    /// period runs): for agents, "customer reconnecting". Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reconnecting: bool,
}

/// A chat message as a recipient sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Per-session sequence number, increasing.
    pub seq: u64,
    /// Sender's participant id; absent when the sender is hidden from this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Sender's name; absent when the sender is hidden from this recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_name: Option<String>,
    /// Sender's role (a masked agent shows as `agent` with no name to the customer).
    pub from_role: Role,
    /// Who it was sent to.
    pub audience: Audience,
    /// The text.
    pub text: String,
    /// Milliseconds since the session opened.
    pub at_ms: u64,
}

/// State of an invitation, as agents in the inviting session see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvitationState {
    /// Delivered, waiting for an agent.
    Pending,
    /// An agent accepted it and joined.
    Accepted,
    /// The invited agent declined it.
    Declined,
    /// The host cancelled it.
    Cancelled,
    /// Nobody accepted it in time.
    Expired,
}

/// Why an invitation was taken back from an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WithdrawReason {
    /// Another agent of the portal accepted it first.
    AcceptedByOther,
    /// The host cancelled it.
    Cancelled,
    /// Nobody accepted it in time.
    Expired,
    /// The session ended.
    SessionEnded,
}

/// Messages a client sends on its session WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Send a chat message (agents may address `agents` only, as a note).
    Chat {
        /// The text.
        text: String,
        /// Who it is for (default everyone).
        #[serde(default)]
        audience: Audience,
    },
    /// Leave the session on purpose (a customer leaving ends it).
    Leave {},
    /// Application-level keep-alive for clients that cannot send WebSocket pings.
    Ping {},
    /// An SDP offer for this participant's one peer connection with the relay (first
    /// negotiation, or a renegotiation after `renegotiate`). The relay answers with
    /// `answer`.
    Offer {
        /// The offer's SDP.
        sdp: String,
    },
    /// A trickled ICE candidate of the client (an empty `candidate` ends the list).
    Candidate(IceCandidate),
    /// An agent asks to show its own screen to the customer (host or `control` agents,
    /// one at a time). Accepted: everyone gets `agent_share` with `active: true`, and the
    /// agent then adds a `sendonly` video track and re-offers. Refused: `error`
    /// (`forbidden` or `share_busy`).
    ShareStart {},
    /// The sharing agent stops showing its screen (nothing happens if it was not).
    ShareStop {},
}

impl ClientMsg {
    /// The `type` tags this enum accepts, to tell unknown types from malformed ones.
    pub const TYPES: [&'static str; 7] = [
        "chat",
        "leave",
        "ping",
        "offer",
        "candidate",
        "share_start",
        "share_stop",
    ];
}

/// One trickled ICE candidate, as `RTCIceCandidateInit` has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    /// The `candidate:` attribute value (without `a=`); empty for end-of-candidates.
    pub candidate: String,
    /// The media section's `mid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    /// The media section's index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mline_index: Option<u16>,
}

/// A client message with its optional correlation id.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientEnvelope {
    /// Echoed back as `ref` in a reply or error.
    pub id: Option<u64>,
    /// The message.
    pub msg: ClientMsg,
}

/// Messages the relay sends on a session WebSocket or an agent console WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// First message on a session WebSocket: who you are and who is there.
    Welcome {
        /// The session.
        session_id: String,
        /// You.
        you: RosterEntry,
        /// Everyone else you may see.
        roster: Vec<RosterEntry>,
        /// Recent chat you may see, oldest first.
        chat: Vec<ChatMessage>,
        /// The single-use secret for your next connection
        /// (`/v1/sessions/{id}/ws?token=<resume_token>`), after a drop or a restart; each
        /// connection gets a new one and the one used stops working. Treat like a
        /// password. Absent only in messages built by other tools.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<String>,
    },
    /// Someone you may see joined (or became visible to you).
    ParticipantJoined {
        /// Who.
        participant: RosterEntry,
    },
    /// Someone you could see changed (permission, visibility, role, connection).
    ParticipantUpdated {
        /// The new state.
        participant: RosterEntry,
    },
    /// Someone you could see left (or became invisible to you).
    ParticipantLeft {
        /// Who.
        participant_id: String,
        /// Why.
        reason: LeaveReason,
    },
    /// A chat message.
    Chat(ChatMessage),
    /// An invitation of your session changed state (agents and supervisors only).
    InvitationUpdate {
        /// Which.
        invitation_id: String,
        /// New state.
        state: InvitationState,
        /// Who accepted or declined, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Agent console: you are invited to a session.
    Invitation(InvitationInfo),
    /// Agent console: an invitation you received is no longer open.
    InvitationWithdrawn {
        /// Which.
        invitation_id: String,
        /// Why.
        reason: WithdrawReason,
    },
    /// Agent console: greeting after sign-in.
    Hello {
        /// The agent's account id.
        agent_id: String,
        /// The portals it is signed in to.
        portals: Vec<String>,
    },
    /// The session is over; the relay closes the WebSocket after this.
    SessionEnded {
        /// Why.
        reason: EndReason,
    },
    /// The relay's SDP answer to the participant's last `offer`.
    Answer {
        /// The answer's SDP.
        sdp: String,
    },
    /// A trickled ICE candidate of the relay.
    Candidate(IceCandidate),
    /// The relay has media for you that your peer connection does not carry yet (the
    /// customer started publishing, or changed codec; for the customer: an agent started
    /// sharing its screen): send a new `offer` on the same peer connection.
    Renegotiate {},
    /// An agent started (`active: true`) or stopped showing its own screen to the
    /// customer. `by` is the sharing agent's participant id when the recipient may see
    /// that agent (never for a masked agent seen by the customer: then the customer only
    /// learns that an agent shares). Also sent right after `welcome` while a share is on.
    AgentShare {
        /// Whether a share is on now.
        active: bool,
        /// Who shares (or shared), if the recipient may know.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// The session lives on another node of the cluster: connect to `url` instead (the
    /// same token works there). The only message on such a socket, which then closes
    /// with code 4307.
    Redirect {
        /// The session WebSocket URL on the node that holds the session.
        url: String,
    },
    /// Reply to `ping`.
    Pong {
        /// The ping's `id`.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<u64>,
    },
    /// Something you sent was refused; the session is unaffected.
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
        /// The `id` of the message that caused it, if it had one.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<u64>,
    },
}

/// Why a client message could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than the limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size received.
        size: usize,
        /// Limit in force.
        limit: usize,
    },
    /// Not JSON, not an object, or no string `type`.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A `type` the relay does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A known `type` with missing, extra or ill-typed fields.
    #[error("invalid {kind} message: {detail}")]
    InvalidFields {
        /// The message type.
        kind: String,
        /// What serde said.
        detail: String,
    },
}

impl WireError {
    /// The error code to report for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            WireError::Malformed(_) | WireError::InvalidFields { .. } => ErrorCode::BadRequest,
            WireError::UnknownType(_) => ErrorCode::UnknownMessageType,
        }
    }
}

/// Parses one client WebSocket message, enforcing `limit` bytes before looking inside.
pub fn parse_client_msg(bytes: &[u8], limit: usize) -> Result<ClientEnvelope, WireError> {
    if bytes.len() > limit {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| WireError::Malformed("expected a JSON object".into()))?;
    let id =
        match obj.remove("id") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                WireError::Malformed("`id` must be a non-negative integer".into())
            })?),
        };
    let kind = match obj.get("type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => return Err(WireError::Malformed("missing string field `type`".into())),
    };
    if !ClientMsg::TYPES.contains(&kind.as_str()) {
        return Err(WireError::UnknownType(kind));
    }
    let msg = serde_json::from_value(value).map_err(|e| WireError::InvalidFields {
        kind,
        detail: e.to_string(),
    })?;
    Ok(ClientEnvelope { id, msg })
}

/// Extracts a correlation id from raw input on a best-effort basis, for error replies
/// to messages that failed to parse further.
pub fn peek_id(bytes: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    value.get("id")?.as_u64()
}

/// Normalises a typed support key: digits only, spaces and dashes dropped.
/// Returns `None` unless exactly nine digits remain.
pub fn normalize_support_key(input: &str) -> Option<String> {
    let mut digits = String::with_capacity(9);
    for c in input.chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' => {}
            _ => return None,
        }
        if digits.len() > 9 {
            return None;
        }
    }
    (digits.len() == 9).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_chat_with_id() {
        let env = parse_client_msg(br#"{"type":"chat","text":"hi","id":7}"#, 1024).unwrap();
        assert_eq!(env.id, Some(7));
        assert_eq!(
            env.msg,
            ClientMsg::Chat {
                text: "hi".into(),
                audience: Audience::All
            }
        );
    }

    #[test]
    fn tells_unknown_type_from_malformed() {
        assert_eq!(
            parse_client_msg(br#"{"type":"fly"}"#, 1024).unwrap_err(),
            WireError::UnknownType("fly".into())
        );
        assert!(matches!(
            parse_client_msg(b"{not json", 1024).unwrap_err(),
            WireError::Malformed(_)
        ));
        assert!(matches!(
            parse_client_msg(br#"[1,2]"#, 1024).unwrap_err(),
            WireError::Malformed(_)
        ));
        assert!(matches!(
            parse_client_msg(br#"{"type":"chat"}"#, 1024).unwrap_err(),
            WireError::InvalidFields { .. }
        ));
        assert!(matches!(
            parse_client_msg(br#"{"type":"chat","text":"x","extra":1}"#, 1024).unwrap_err(),
            WireError::InvalidFields { .. }
        ));
    }

    #[test]
    fn enforces_size_before_parsing() {
        let big = vec![b' '; 2000];
        assert_eq!(
            parse_client_msg(&big, 1000).unwrap_err().code(),
            ErrorCode::MessageTooLarge
        );
    }

    #[test]
    fn server_messages_serialize_with_type_tag() {
        let s = serde_json::to_string(&ServerMsg::SessionEnded {
            reason: EndReason::EndedByHost,
        })
        .unwrap();
        assert_eq!(s, r#"{"type":"session_ended","reason":"ended_by_host"}"#);
        let s = serde_json::to_string(&ServerMsg::Pong { reference: Some(3) }).unwrap();
        assert_eq!(s, r#"{"type":"pong","ref":3}"#);
    }

    #[test]
    fn welcome_carries_the_resume_token_and_roster_the_reconnecting_flag() {
        let entry = RosterEntry {
            participant_id: "p_1".into(),
            name: "Carol".into(),
            role: Role::Customer,
            agent_id: None,
            visibility: None,
            permission: None,
            connected: false,
            reconnecting: true,
        };
        let s = serde_json::to_string(&entry).unwrap();
        assert!(
            s.ends_with(r#""connected":false,"reconnecting":true}"#),
            "{s}"
        );
        let back = RosterEntry {
            connected: true,
            reconnecting: false,
            ..entry.clone()
        };
        let s = serde_json::to_string(&back).unwrap();
        assert!(!s.contains("reconnecting"), "{s}");
        let welcome = ServerMsg::Welcome {
            session_id: "s_1".into(),
            you: back,
            roster: vec![],
            chat: vec![],
            resume_token: Some("abc".into()),
        };
        let s = serde_json::to_string(&welcome).unwrap();
        assert!(s.contains(r#""resume_token":"abc""#), "{s}");
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), welcome);
    }

    #[test]
    fn parses_share_start_and_stop_and_refuses_fields() {
        let env = parse_client_msg(br#"{"type":"share_start","id":4}"#, 1024).unwrap();
        assert_eq!(env.id, Some(4));
        assert_eq!(env.msg, ClientMsg::ShareStart {});
        let env = parse_client_msg(br#"{"type":"share_stop"}"#, 1024).unwrap();
        assert_eq!(env.msg, ClientMsg::ShareStop {});
        assert!(matches!(
            parse_client_msg(br#"{"type":"share_start","by":"p_1"}"#, 1024).unwrap_err(),
            WireError::InvalidFields { .. }
        ));
        let round = serde_json::to_string(&ClientMsg::ShareStop {}).unwrap();
        assert_eq!(round, r#"{"type":"share_stop"}"#);
    }

    #[test]
    fn redirect_message_and_error_location() {
        let msg = ServerMsg::Redirect {
            url: "wss://a.example:8443/v1/sessions/s_1/ws?token=t".into(),
        };
        let s = serde_json::to_string(&msg).unwrap();
        assert_eq!(
            s,
            r#"{"type":"redirect","url":"wss://a.example:8443/v1/sessions/s_1/ws?token=t"}"#
        );
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), msg);
        let body: ErrorBody = serde_json::from_str(
            r#"{"error":{"code":"redirect","message":"m","location":"https://a/v1/join"}}"#,
        )
        .unwrap();
        assert_eq!(body.error.code, ErrorCode::Redirect);
        assert_eq!(body.error.location.as_deref(), Some("https://a/v1/join"));
        // Absent when not a redirect, so single-node answers are unchanged.
        let plain = ErrorDetail {
            code: ErrorCode::NotFound,
            message: "m".into(),
            retry_after_s: None,
            location: None,
            challenge: None,
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("location"));
    }

    #[test]
    fn agent_share_names_the_sharer_only_when_given() {
        let anonymous = ServerMsg::AgentShare {
            active: true,
            by: None,
        };
        let s = serde_json::to_string(&anonymous).unwrap();
        assert_eq!(s, r#"{"type":"agent_share","active":true}"#);
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), anonymous);
        let named = ServerMsg::AgentShare {
            active: false,
            by: Some("p_7".into()),
        };
        let s = serde_json::to_string(&named).unwrap();
        assert_eq!(s, r#"{"type":"agent_share","active":false,"by":"p_7"}"#);
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).unwrap(), named);
    }

    #[test]
    fn error_code_names_match_serde() {
        for code in [
            ErrorCode::Redirect,
            ErrorCode::SessionLost,
            ErrorCode::ShareBusy,
            ErrorCode::RateLimited,
            ErrorCode::BadRequest,
            ErrorCode::WrongKey,
            ErrorCode::AgentSessionLimit,
            ErrorCode::InvitationClosed,
        ] {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
        for reason in EndReason::ALL {
            assert_eq!(
                serde_json::to_string(&reason).unwrap(),
                format!("\"{}\"", reason.as_str())
            );
        }
    }

    #[test]
    fn support_key_normalization() {
        assert_eq!(
            normalize_support_key("123 456-789").as_deref(),
            Some("123456789")
        );
        assert_eq!(normalize_support_key("12345678"), None);
        assert_eq!(normalize_support_key("1234567890"), None);
        assert_eq!(normalize_support_key("12345678a"), None);
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_client_msg(&bytes, 256);
            let _ = peek_id(&bytes);
        }

        #[test]
        fn chat_round_trips(text in ".{0,200}", id in proptest::option::of(any::<u64>())) {
            let mut v = serde_json::to_value(ClientMsg::Chat { text: text.clone(), audience: Audience::Agents }).unwrap();
            if let Some(id) = id { v["id"] = id.into(); }
            let bytes = serde_json::to_vec(&v).unwrap();
            let env = parse_client_msg(&bytes, 1 << 20).unwrap();
            prop_assert_eq!(env.id, id);
            prop_assert_eq!(env.msg, ClientMsg::Chat { text, audience: Audience::Agents });
        }
    }
}
