//! [`Node`]: every session of this relay node, and the inputs that drive them.
//!
//! Method kinds, in the order the shell calls them (see the module docs of
//! [`session`](super) for the run-loop contract):
//!
//! - requests (`create_session`, `join`, `invite`, `accept_invitation`, …) answer at once
//!   with a `Result` and may queue outputs for others;
//! - connection events (`connect`, `message`, `disconnected`, `console_opened`,
//!   `console_closed`) and the media plane's events (`chat_channel`, `channel_message`,
//!   `share_lost`) queue outputs;
//! - `handle_timeout(now)` runs what is due; `poll_timeout()` says when that is;
//! - `poll_output()` hands the queued outputs over, one at a time.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use relay_codec::wire::{
    self, Audience, ClientEnvelope, ClientMsg, CreateSessionRequest, EndReason, ErrorCode,
    InvitationInfo, InvitationState, InviteRequest, InviteTarget, LeaveReason, Permission, Role,
    RosterEntry, ServerMsg, SessionSummary, UpdateParticipantRequest, Visibility, WithdrawReason,
};

use super::ids::{
    ConnId, InvitationId, ParticipantId, Random, Secret, SecretDigest, SessionId, SupportKey,
};
use super::invitation::Invitation;
use super::participant::Participant;
use super::state::{ChatRecord, SessionState};
use super::{
    InvitationOutcome, KeyOutcome, MAX_AGENTS, MAX_KEY_TTL, MediaEvent, Output, RecordEntry,
    SessionError, Settings, ShareOutcome, Signal, Stat,
};
use crate::identity::AgentIdentity;
use crate::rate_limit::{Admission, Budgets, MessageClass};
use crate::text::{self, Field, TextRule};
use crate::throttle::challenge::Challenges;
use crate::throttle::{KeyThrottle, Verdict};

/// How often stale tombstones and throttle entries are swept.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// How long an ended session, a closed invitation or an expired key is remembered, so
/// that late requests get `session_ended`, `invitation_closed` or `key_expired` rather
/// than `not_found`.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most tombstones of each kind kept (memory bound); the oldest go first.
const MAX_TOMBSTONES: usize = 100_000;

/// Ties the core's monotonic [`Instant`]s to wall-clock time, for the RFC 3339
/// timestamps clients are shown. Set once by the shell (or a test).
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// A monotonic instant…
    pub instant: Instant,
    /// …and the wall-clock time at that instant.
    pub system: SystemTime,
}

impl WallClock {
    /// `t` as RFC 3339 UTC, to the second.
    pub fn rfc3339(&self, t: Instant) -> String {
        let system = if t >= self.instant {
            self.system + (t - self.instant)
        } else {
            self.system - (self.instant - t)
        };
        humantime::format_rfc3339_seconds(system).to_string()
    }
}

/// What a participant needs to open its session WebSocket.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The session.
    pub session_id: SessionId,
    /// The participant.
    pub participant_id: ParticipantId,
    /// Its secret token, shown once.
    pub token: Secret,
}

/// A session just opened.
#[derive(Debug, Clone)]
pub struct SessionCreated {
    /// The host's credentials (the session id is in them).
    pub host: Credentials,
    /// The 9-digit key to read to the customer.
    pub support_key: SupportKey,
    /// The support-URL token (not derived from the key).
    pub link: Secret,
    /// When key and link stop working if no customer used them.
    pub expires_at: Instant,
}

/// What a support-key attempt brings for a spent key budget.
#[derive(Debug, Clone, Default)]
pub enum Proof {
    /// Nothing (the usual case: the budget is not spent).
    #[default]
    None,
    /// A solved challenge.
    Solution(relay_codec::wire::KeyProof),
    /// A solved challenge this node already redeemed for the same request (the cluster
    /// router redeems it before it routes the attempt).
    Redeemed,
}

/// How a customer proves it was given access.
#[derive(Debug, Clone)]
pub enum JoinCredential {
    /// The typed support key, as entered (spaces and dashes allowed).
    Key(String),
    /// The support-URL token.
    Link(String),
}

/// An invitation just sent.
#[derive(Debug, Clone)]
pub struct InvitationCreated {
    /// Its id.
    pub invitation_id: InvitationId,
    /// How many agents received it on their console.
    pub delivered_to: usize,
    /// When it lapses.
    pub expires_at: Instant,
}

/// A count of what the node holds, for gauges and drain decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    /// Live sessions.
    pub sessions: usize,
    /// Participants by role, in the order of [`Census::ROLES`].
    pub participants: [usize; 4],
    /// Open agent consoles.
    pub consoles: usize,
}

impl Census {
    /// The roles `participants` counts, in its order.
    pub const ROLES: [Role; 4] = [Role::Host, Role::Agent, Role::Customer, Role::Supervisor];

    /// Participants per role.
    pub fn by_role(&self) -> impl Iterator<Item = (Role, usize)> + '_ {
        Self::ROLES.into_iter().zip(self.participants)
    }
}

/// One live session as the cluster directory records it ([`Node::directory`]): what
/// other nodes need to route its key, link, invitations and supervisors here.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectoryEntry {
    /// The session.
    pub session_id: SessionId,
    /// SHA-256 of its support key (never the key itself).
    pub key: SecretDigest,
    /// SHA-256 of its support-link token.
    pub link: SecretDigest,
    /// Its open invitations.
    pub invitations: Vec<InvitationId>,
    /// What a supervisor's listing shows of it.
    pub summary: SessionSummary,
}

/// Which participant or console a connection carries.
#[derive(Debug, Clone)]
enum ConnTarget {
    Participant(SessionId, ParticipantId),
    Console(AgentIdentity),
}

/// Remembered-for-a-while facts about things that are gone.
#[derive(Debug)]
struct Tombstones<K: std::hash::Hash + Eq + Clone, V> {
    map: HashMap<K, (V, Instant)>,
    order: VecDeque<(Instant, K)>,
}

impl<K: std::hash::Hash + Eq + Clone, V> Default for Tombstones<K, V> {
    fn default() -> Self {
        Tombstones {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Tombstones<K, V> {
    fn insert(&mut self, now: Instant, key: K, value: V) {
        if self.map.len() >= MAX_TOMBSTONES {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.map.remove(&oldest);
            }
        }
        self.map.insert(key.clone(), (value, now + TOMBSTONE_TTL));
        self.order.push_back((now + TOMBSTONE_TTL, key));
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    fn sweep(&mut self, now: Instant) {
        while let Some((t, _)) = self.order.front() {
            if *t > now {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                if self.map.get(&key).is_some_and(|(_, until)| *until <= now) {
                    self.map.remove(&key);
                }
            }
        }
    }
}

/// Every session of this node. See the module docs for how to drive it.
pub struct Node {
    settings: Settings,
    clock: WallClock,
    rng: Random,
    throttle: KeyThrottle,
    /// Unknown support links, per address only (links are never held by the key budgets).
    link_throttle: KeyThrottle,
    /// The proof-of-work challenges of a spent key budget.
    challenges: Challenges,
    sessions: HashMap<SessionId, SessionState>,
    keys: HashMap<String, SessionId>,
    links: HashMap<SecretDigest, SessionId>,
    tokens: HashMap<SecretDigest, (SessionId, ParticipantId)>,
    invitations: HashMap<InvitationId, SessionId>,
    conns: HashMap<ConnId, ConnTarget>,
    /// Timers: each session's next deadline, indexed both ways.
    deadlines: BTreeSet<(Instant, SessionId)>,
    deadline_of: HashMap<SessionId, Instant>,
    ended: Tombstones<SessionId, EndReason>,
    expired_keys: Tombstones<String, ()>,
    expired_links: Tombstones<SecretDigest, ()>,
    /// Participant and resume tokens already used, so that a second use is told so.
    used_tokens: Tombstones<SecretDigest, ()>,
    closed_invitations: Tombstones<InvitationId, ()>,
    /// Each participant's message budgets: made at its first message, kept across its
    /// reconnections, dropped when it leaves.
    budgets: HashMap<(SessionId, ParticipantId), Budgets>,
    /// Each open agent console's message budgets.
    console_budgets: HashMap<ConnId, Budgets>,
    drain_deadline: Option<Instant>,
    next_housekeeping: Instant,
    outputs: VecDeque<Output>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("sessions", &self.sessions.len())
            .field("conns", &self.conns.len())
            .field("draining", &self.drain_deadline.is_some())
            .finish_non_exhaustive()
    }
}

/// Trims, normalizes (NFC) and checks a display name: 1–64 characters, none of them
/// a control, bidi control, tag or other invisible character (see [`crate::text`]).
/// A refusal is counted in `outputs`.
fn clean_name(name: &str, outputs: &mut VecDeque<Output>) -> Result<String, SessionError> {
    text::clean_name(name, wire::MAX_NAME_CHARS)
        .map_err(|rule| refuse_text(Field::Name, rule, outputs))
}

/// Counts a refused piece of text and says why, for the sender.
fn refuse_text(field: Field, rule: TextRule, outputs: &mut VecDeque<Output>) -> SessionError {
    outputs.push_back(Output::Stat(Stat::TextRefused { field, rule }));
    SessionError::InvalidField(rule.message(field))
}

/// The slot of `role` in [`Census::participants`].
fn role_slot(role: Role) -> usize {
    Census::ROLES.iter().position(|r| *r == role).unwrap_or(0)
}

impl Node {
    /// A node with no sessions. `rng` must be a CSPRNG outside tests (support keys,
    /// ids and tokens come from it).
    pub fn new(settings: Settings, clock: WallClock, rng: Random) -> Self {
        let mut rng = rng;
        let mut settings = settings;
        settings.key_ttl = settings.key_ttl.min(MAX_KEY_TTL);
        settings.max_sessions_per_agent = settings.max_sessions_per_agent.clamp(1, MAX_AGENTS);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Node {
            throttle: KeyThrottle::new(settings.throttle.clone()),
            link_throttle: KeyThrottle::per_address_only(settings.throttle.clone()),
            challenges: Challenges::new(secret, clock.instant),
            next_housekeeping: clock.instant + HOUSEKEEPING_EVERY,
            settings,
            clock,
            rng,
            sessions: HashMap::new(),
            keys: HashMap::new(),
            links: HashMap::new(),
            tokens: HashMap::new(),
            invitations: HashMap::new(),
            conns: HashMap::new(),
            deadlines: BTreeSet::new(),
            deadline_of: HashMap::new(),
            ended: Tombstones::default(),
            expired_keys: Tombstones::default(),
            expired_links: Tombstones::default(),
            used_tokens: Tombstones::default(),
            closed_invitations: Tombstones::default(),
            budgets: HashMap::new(),
            console_budgets: HashMap::new(),
            drain_deadline: None,
            outputs: VecDeque::new(),
        }
    }

    /// The wall clock used for timestamps.
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    // ----- getters -------------------------------------------------------------------

    /// What the node holds now.
    pub fn census(&self) -> Census {
        let mut c = Census {
            sessions: self.sessions.len(),
            ..Census::default()
        };
        for s in self.sessions.values() {
            for p in &s.participants {
                c.participants[role_slot(p.role)] += 1;
            }
        }
        c.consoles = self
            .conns
            .values()
            .filter(|t| matches!(t, ConnTarget::Console(_)))
            .count();
        c
    }

    /// Whether a drain is under way.
    pub fn is_draining(&self) -> bool {
        self.drain_deadline.is_some()
    }

    /// Whether no session is live.
    pub fn is_idle(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether this node holds the session, or held it until recently (its tombstone
    /// answers late requests with `session_ended`). The cluster shell routes requests
    /// for any other session id to the node that holds it.
    pub fn knows_session(&self, session: &SessionId) -> bool {
        self.sessions.contains_key(session) || self.ended.get(session).is_some()
    }

    /// Every live session, for the cluster directory, oldest first.
    pub fn directory(&self, now: Instant) -> Vec<DirectoryEntry> {
        let mut list: Vec<&SessionState> = self.sessions.values().collect();
        list.sort_by_key(|s| s.created_at);
        list.into_iter()
            .map(|s| DirectoryEntry {
                session_id: s.id.clone(),
                key: SecretDigest::of(s.key.reveal()),
                link: s.link,
                invitations: s.invitations.iter().map(|i| i.id.clone()).collect(),
                summary: Self::summary(s, now),
            })
            .collect()
    }

    /// Gives a session whose key no customer has used a new support key, unique on this
    /// node, and returns it: the cluster shell calls this when another node already
    /// holds the key this node drew. `None` if the session is gone or its key was used.
    pub fn replace_support_key(&mut self, session: &SessionId) -> Option<SupportKey> {
        if self.sessions.get(session).is_none_or(|s| s.key_used) {
            return None;
        }
        let key = loop {
            let key = SupportKey::random(&mut *self.rng);
            if !self.keys.contains_key(key.reveal())
                && self.expired_keys.get(&key.reveal().to_owned()).is_none()
            {
                break key;
            }
        };
        let s = self.sessions.get_mut(session)?;
        self.keys.remove(s.key.reveal());
        s.key = key.clone();
        self.keys.insert(key.reveal().to_owned(), session.clone());
        Some(key)
    }

    // ----- requests ------------------------------------------------------------------

    /// An agent opens a session and becomes its host.
    pub fn create_session(
        &mut self,
        now: Instant,
        agent: &AgentIdentity,
        req: &CreateSessionRequest,
    ) -> Result<SessionCreated, SessionError> {
        let result = self.try_create_session(now, agent, req);
        self.count_join(Role::Host, &result);
        result
    }

    fn try_create_session(
        &mut self,
        now: Instant,
        agent: &AgentIdentity,
        req: &CreateSessionRequest,
    ) -> Result<SessionCreated, SessionError> {
        if self.is_draining() {
            return Err(SessionError::Draining);
        }
        if !agent.in_portal(&req.portal) {
            return Err(SessionError::Forbidden(
                "you are not a member of this portal",
            ));
        }
        // The portal names the recordings' folder and is shown to agents: a name that
        // cannot be a file name would leave the session silently unrecorded.
        match text::check_portal(&req.portal, wire::MAX_PORTAL_CHARS) {
            Ok(()) => {}
            Err(TextRule::TooLong) => {
                return Err(SessionError::InvalidField(
                    "portal must be at most 64 characters",
                ));
            }
            Err(_) => {
                return Err(SessionError::InvalidField(
                    "portal must not contain control, bidirectional or invisible characters",
                ));
            }
        }
        let name = clean_name(&agent.name, &mut self.outputs)?;
        let held = self.sessions_of(&agent.agent_id, false);
        if held >= self.settings.max_sessions_per_agent {
            return Err(SessionError::AgentSessionLimit(held));
        }

        let id = loop {
            let id = SessionId::random(&mut *self.rng);
            if !self.sessions.contains_key(&id) {
                break id;
            }
        };
        let key = loop {
            let key = SupportKey::random(&mut *self.rng);
            if !self.keys.contains_key(key.reveal())
                && self.expired_keys.get(&key.reveal().to_owned()).is_none()
            {
                break key;
            }
        };
        let link = Secret::random(&mut *self.rng);
        let token = Secret::random(&mut *self.rng);
        let host = Participant {
            id: ParticipantId::random(&mut *self.rng),
            role: Role::Host,
            name,
            agent_id: Some(agent.agent_id.clone()),
            visibility: req.visibility,
            permission: Permission::Control,
            token: token.digest(),
            conn: None,
            connected_before: false,
            disconnected_since: Some(now),
            chat_channel: false,
        };
        let host_id = host.id.clone();
        let expires_at = now + self.settings.key_ttl;
        let state = SessionState {
            id: id.clone(),
            portal: req.portal.clone(),
            created_at: now,
            key: key.clone(),
            link: link.digest(),
            key_expires_at: expires_at,
            key_used: false,
            participants: vec![host],
            invitations: Vec::new(),
            chat: VecDeque::new(),
            next_chat_seq: 1,
            sharing: None,
        };
        self.keys.insert(key.reveal().to_owned(), id.clone());
        self.links.insert(link.digest(), id.clone());
        self.tokens
            .insert(token.digest(), (id.clone(), host_id.clone()));
        self.outputs.push_back(Output::Media(MediaEvent::Record {
            session: id.clone(),
            entry: RecordEntry::Start {
                portal: req.portal.clone(),
            },
        }));
        self.outputs.push_back(Output::Media(MediaEvent::Member {
            session: id.clone(),
            participant: host_id.clone(),
            role: Role::Host,
            permission: Permission::Control,
        }));
        state.record_roster(None, Some(&state.participants[0]), &mut self.outputs);
        self.sessions.insert(id.clone(), state);
        self.stat(Stat::SessionCreated);
        self.stat(Stat::ParticipantAdded(Role::Host));
        self.reschedule(&id);
        Ok(SessionCreated {
            host: Credentials {
                session_id: id,
                participant_id: host_id,
                token,
            },
            support_key: key,
            link,
            expires_at,
        })
    }

    /// A customer joins with a support key or link, from source address `from`.
    /// The throttle is consulted before the key is looked up.
    pub fn join(
        &mut self,
        now: Instant,
        from: IpAddr,
        name: &str,
        credential: &JoinCredential,
        proof: Proof,
    ) -> Result<Credentials, SessionError> {
        let result = self.try_join(now, from, name, credential, proof);
        self.count_join(Role::Customer, &result);
        result
    }

    /// Whether a support-key attempt from `from` may be looked up now, redeeming
    /// `proof` if the key budget is spent (a refusal is answered by [`Node::join`];
    /// nothing is counted). The cluster shell asks before it looks a key up in the
    /// directory, so that the directory is no way around the throttle. `None`: not
    /// now; `Some(Proof::None)`: yes; `Some(Proof::Redeemed)`: yes, by the proof, which
    /// the attempt must then carry as [`Proof::Redeemed`] when it is joined here.
    pub fn key_lookup_allowed(
        &mut self,
        now: Instant,
        from: IpAddr,
        proof: Option<&relay_codec::wire::KeyProof>,
    ) -> Option<Proof> {
        match self.throttle.check(now, from) {
            Verdict::Allow => Some(Proof::None),
            Verdict::Throttled { .. } => None,
            Verdict::NeedsProof { .. } => proof
                .filter(|p| self.redeem(now, p))
                .map(|_| Proof::Redeemed),
        }
    }

    /// Spends a solved challenge for one key attempt, if it is a valid one of this node.
    fn redeem(&mut self, now: Instant, proof: &relay_codec::wire::KeyProof) -> bool {
        self.challenges
            .redeem(now, proof, self.settings.throttle.challenge_bits)
            .is_ok()
    }

    /// The throttle that holds key attempts, or link attempts.
    fn throttle_for(&mut self, is_link: bool) -> &mut KeyThrottle {
        if is_link {
            &mut self.link_throttle
        } else {
            &mut self.throttle
        }
    }

    /// Whether a support-link attempt from `from` may be looked up now (the links' own
    /// per-address budget; never the key budgets).
    pub fn link_lookup_allowed(&mut self, now: Instant, from: IpAddr) -> bool {
        matches!(self.link_throttle.check(now, from), Verdict::Allow)
    }

    /// The throttle's verdict on a key attempt: `Ok` to look it up, or the refusal.
    fn admit_key_attempt(
        &mut self,
        now: Instant,
        from: IpAddr,
        proof: Proof,
    ) -> Result<(), SessionError> {
        match self.throttle.check(now, from) {
            Verdict::Allow => Ok(()),
            Verdict::Throttled { retry_after, .. } => {
                self.stat(Stat::KeyAttempt(KeyOutcome::Throttled));
                Err(SessionError::Throttled { retry_after })
            }
            Verdict::NeedsProof { bits } => {
                let redeemed = match &proof {
                    Proof::Redeemed => true,
                    Proof::Solution(p) => self.redeem(now, p),
                    Proof::None => false,
                };
                if redeemed {
                    return Ok(());
                }
                self.stat(Stat::KeyAttempt(KeyOutcome::Challenged));
                Err(SessionError::ChallengeRequired(self.challenges.issue(
                    now,
                    bits,
                    &mut *self.rng,
                )))
            }
        }
    }

    fn try_join(
        &mut self,
        now: Instant,
        from: IpAddr,
        name: &str,
        credential: &JoinCredential,
        proof: Proof,
    ) -> Result<Credentials, SessionError> {
        let name = clean_name(name, &mut self.outputs)?;
        let is_link = matches!(credential, JoinCredential::Link(_));
        if is_link {
            if let Verdict::Throttled { retry_after, .. } = self.link_throttle.check(now, from) {
                self.stat(Stat::KeyAttempt(KeyOutcome::Throttled));
                return Err(SessionError::Throttled { retry_after });
            }
        } else {
            self.admit_key_attempt(now, from, proof)?;
        }
        let found = match credential {
            JoinCredential::Key(typed) => match wire::normalize_support_key(typed) {
                None => Err(KeyOutcome::Wrong),
                Some(digits) => match self.keys.get(&digits) {
                    Some(id) => Ok(id.clone()),
                    None if self.expired_keys.get(&digits).is_some() => Err(KeyOutcome::Expired),
                    None => Err(KeyOutcome::Wrong),
                },
            },
            JoinCredential::Link(token) => {
                let digest = SecretDigest::of(token);
                match self.links.get(&digest) {
                    Some(id) => Ok(id.clone()),
                    None if self.expired_links.get(&digest).is_some() => Err(KeyOutcome::Expired),
                    None => Err(KeyOutcome::Wrong),
                }
            }
        };
        let checked = found.and_then(|id| match self.sessions.get(&id) {
            None => Err(KeyOutcome::Wrong),
            Some(s) if s.key_used => Err(KeyOutcome::Used),
            Some(s) if now >= s.key_expires_at => Err(KeyOutcome::Expired),
            Some(_) => Ok(id),
        });
        let id = match checked {
            Ok(id) => id,
            Err(outcome) => {
                self.stat(Stat::KeyAttempt(outcome));
                let started = self.throttle_for(is_link).record_failure(now, from);
                for scope in started.scopes() {
                    self.stat(Stat::Lockout(scope));
                }
                // A link (128 bits, not guessable) may say what became of it; a key
                // may not: unknown, expired and used keys get one answer.
                return Err(match outcome {
                    KeyOutcome::Expired if is_link => SessionError::KeyExpired,
                    KeyOutcome::Used if is_link => SessionError::KeyUsed,
                    _ => SessionError::WrongKey,
                });
            }
        };
        self.throttle_for(is_link).record_success(now, from);
        self.stat(Stat::KeyAttempt(KeyOutcome::Ok));

        let token = Secret::random(&mut *self.rng);
        let customer = Participant {
            id: ParticipantId::random(&mut *self.rng),
            role: Role::Customer,
            name,
            agent_id: None,
            visibility: Visibility::Visible,
            permission: Permission::View,
            token: token.digest(),
            conn: None,
            connected_before: false,
            disconnected_since: Some(now),
            chat_channel: false,
        };
        let creds = Credentials {
            session_id: id.clone(),
            participant_id: customer.id.clone(),
            token,
        };
        self.add_participant(&id, customer);
        if let Some(s) = self.sessions.get_mut(&id) {
            s.key_used = true;
        }
        self.reschedule(&id);
        Ok(creds)
    }

    /// The host invites one agent or a whole portal.
    pub fn invite(
        &mut self,
        now: Instant,
        host: &AgentIdentity,
        session: &SessionId,
        req: &InviteRequest,
    ) -> Result<InvitationCreated, SessionError> {
        self.session_as_host(session, host)?;
        // A blank comment is no comment; any other is held to the message rules.
        let comment = match req.comment.as_deref().filter(|c| !c.trim().is_empty()) {
            Some(c) => Some(
                text::clean_message(c, wire::MAX_COMMENT_CHARS)
                    .map_err(|rule| refuse_text(Field::Comment, rule, &mut self.outputs))?,
            ),
            None => None,
        };
        let s = self.session_as_host(session, host)?;
        match &req.target {
            InviteTarget::Agent(id) if id.is_empty() => {
                return Err(SessionError::InvalidField("target agent must not be empty"));
            }
            InviteTarget::Agent(id) if s.has_account(id) => {
                return Err(SessionError::AlreadyInSession);
            }
            InviteTarget::Portal(p) if !host.in_portal(p) => {
                return Err(SessionError::Forbidden(
                    "you can only invite portals you are a member of",
                ));
            }
            _ => {}
        }
        if s.agent_count() >= MAX_AGENTS {
            return Err(SessionError::SessionFull);
        }
        let invitation = Invitation {
            id: InvitationId::random(&mut *self.rng),
            target: req.target.clone(),
            visibility: req.visibility,
            permission: req.permission,
            comment,
            expires_at: now + self.settings.invitation_ttl,
            delivered: Default::default(),
            declined: Default::default(),
        };
        let iid = invitation.id.clone();
        let expires_at = invitation.expires_at;
        self.invitations.insert(iid.clone(), session.clone());
        if let Some(s) = self.sessions.get_mut(session) {
            s.invitations.push(invitation);
        }
        // Deliver to every open console of an addressee not already in the session.
        let consoles: Vec<(ConnId, AgentIdentity)> = self
            .conns
            .iter()
            .filter_map(|(c, t)| match t {
                ConnTarget::Console(a) => Some((*c, a.clone())),
                ConnTarget::Participant(..) => None,
            })
            .collect();
        for (conn, agent) in consoles {
            self.deliver_invitation(session, &iid, conn, &agent);
        }
        if let Some(s) = self.sessions.get(session) {
            s.tell_agents(
                &ServerMsg::InvitationUpdate {
                    invitation_id: iid.as_str().to_owned(),
                    state: InvitationState::Pending,
                    by: None,
                },
                &mut self.outputs,
            );
        }
        self.stat(Stat::Invitation(InvitationOutcome::Sent));
        self.reschedule(session);
        // Distinct agents, however many consoles each has open.
        let delivered_to = self
            .sessions
            .get(session)
            .and_then(|s| s.invitations.iter().find(|i| i.id == iid))
            .map_or(0, |i| i.delivered.len());
        Ok(InvitationCreated {
            invitation_id: iid,
            delivered_to,
            expires_at,
        })
    }

    /// The host takes an open invitation back.
    pub fn cancel_invitation(
        &mut self,
        now: Instant,
        host: &AgentIdentity,
        session: &SessionId,
        invitation: &InvitationId,
    ) -> Result<(), SessionError> {
        let s = self.session_as_host(session, host)?;
        if !s.invitations.iter().any(|i| i.id == *invitation) {
            return Err(self.invitation_gone(invitation));
        }
        self.close_invitation(
            now,
            session,
            invitation,
            InvitationState::Cancelled,
            None,
            Some((WithdrawReason::Cancelled, None)),
        );
        self.stat(Stat::Invitation(InvitationOutcome::Cancelled));
        Ok(())
    }

    /// The open invitations addressed to `agent` (marks them delivered to it).
    pub fn pending_invitations(
        &mut self,
        now: Instant,
        agent: &AgentIdentity,
    ) -> Vec<InvitationInfo> {
        let mut found = Vec::new();
        for s in self.sessions.values_mut() {
            if s.has_account(&agent.agent_id) {
                continue;
            }
            let from = s.host_name().to_owned();
            let cross_portal = self.settings.cross_portal_invitations || agent.in_portal(&s.portal);
            for inv in &mut s.invitations {
                if inv.expires_at > now
                    && inv.addressed_to(agent)
                    && (cross_portal || inv.portal_wide())
                {
                    inv.delivered.insert(agent.agent_id.clone());
                    found.push(invitation_info(&self.clock, &s.id, &s.portal, &from, inv));
                }
            }
        }
        found.sort_by(|a, b| a.expires_at.cmp(&b.expires_at));
        found
    }

    /// An invited agent accepts: it joins the session, and a portal-wide invitation is
    /// withdrawn from everyone else.
    pub fn accept_invitation(
        &mut self,
        now: Instant,
        agent: &AgentIdentity,
        invitation: &InvitationId,
    ) -> Result<Credentials, SessionError> {
        let result = self.try_accept(now, agent, invitation);
        self.count_join(Role::Agent, &result);
        result
    }

    fn try_accept(
        &mut self,
        now: Instant,
        agent: &AgentIdentity,
        invitation: &InvitationId,
    ) -> Result<Credentials, SessionError> {
        let (session, inv) = self.open_invitation_for(now, agent, invitation)?;
        let s = self
            .sessions
            .get(&session)
            .ok_or(SessionError::InvitationClosed)?;
        if s.has_account(&agent.agent_id) {
            return Err(SessionError::AlreadyInSession);
        }
        if s.agent_count() >= MAX_AGENTS {
            return Err(SessionError::SessionFull);
        }
        let held = self.sessions_of(&agent.agent_id, false);
        if held >= self.settings.max_sessions_per_agent {
            return Err(SessionError::AgentSessionLimit(held));
        }
        let name = clean_name(&agent.name, &mut self.outputs)?;

        let token = Secret::random(&mut *self.rng);
        let participant = Participant {
            id: ParticipantId::random(&mut *self.rng),
            role: Role::Agent,
            name: name.clone(),
            agent_id: Some(agent.agent_id.clone()),
            visibility: inv.visibility,
            permission: inv.permission,
            token: token.digest(),
            conn: None,
            connected_before: false,
            disconnected_since: Some(now),
            chat_channel: false,
        };
        let creds = Credentials {
            session_id: session.clone(),
            participant_id: participant.id.clone(),
            token,
        };
        // The winner is told nothing on its consoles (it has its answer); everyone else
        // it reached loses it.
        self.close_invitation(
            now,
            &session,
            invitation,
            InvitationState::Accepted,
            Some(name),
            Some((
                WithdrawReason::AcceptedByOther,
                Some(agent.agent_id.as_str()),
            )),
        );
        self.stat(Stat::Invitation(InvitationOutcome::Accepted));
        self.add_participant(&session, participant);
        self.reschedule(&session);
        Ok(creds)
    }

    /// An invited agent declines. A direct invitation closes; a portal-wide one stays
    /// open for the others.
    pub fn decline_invitation(
        &mut self,
        now: Instant,
        agent: &AgentIdentity,
        invitation: &InvitationId,
    ) -> Result<(), SessionError> {
        let (session, inv) = self.open_invitation_for(now, agent, invitation)?;
        let name = text::clean_name(&agent.name, wire::MAX_NAME_CHARS)
            .unwrap_or_else(|_| agent.agent_id.clone());
        if inv.portal_wide() {
            if let Some(i) = self
                .sessions
                .get_mut(&session)
                .and_then(|s| s.invitations.iter_mut().find(|i| i.id == *invitation))
            {
                i.declined.insert(agent.agent_id.clone());
            }
            if let Some(s) = self.sessions.get(&session) {
                s.tell_agents(
                    &ServerMsg::InvitationUpdate {
                        invitation_id: invitation.as_str().to_owned(),
                        state: InvitationState::Declined,
                        by: Some(name),
                    },
                    &mut self.outputs,
                );
            }
        } else {
            self.close_invitation(
                now,
                &session,
                invitation,
                InvitationState::Declined,
                Some(name),
                None,
            );
        }
        self.stat(Stat::Invitation(InvitationOutcome::Declined));
        Ok(())
    }

    /// The host changes an invited agent's permission and/or visibility.
    pub fn update_participant(
        &mut self,
        _now: Instant,
        host: &AgentIdentity,
        session: &SessionId,
        participant: &ParticipantId,
        req: &UpdateParticipantRequest,
    ) -> Result<RosterEntry, SessionError> {
        let s = self.session_as_host(session, host)?;
        let before = s
            .participant(participant)
            .ok_or(SessionError::NotFound("participant"))?
            .clone();
        if before.role != Role::Agent {
            return Err(SessionError::Forbidden(
                "only invited agents' rights can be changed",
            ));
        }
        if req.permission.is_none() && req.visibility.is_none() {
            return Err(SessionError::InvalidField(
                "give `permission` and/or `visibility`",
            ));
        }
        let mut after = before.clone();
        if let Some(p) = req.permission {
            after.permission = p;
        }
        if let Some(v) = req.visibility {
            after.visibility = v;
        }
        let Some(s) = self.sessions.get_mut(session) else {
            return Err(SessionError::NotFound("session"));
        };
        if let Some(p) = s.participant_mut(participant) {
            *p = after.clone();
        }
        s.announce(
            Some(&before),
            Some(&after),
            LeaveReason::Left,
            &mut self.outputs,
        );
        if s.sharing.as_ref() == Some(participant) {
            if after.permission == Permission::View {
                self.end_share(session, participant, ShareOutcome::LostControl);
            } else if after.visibility != before.visibility {
                // Those who now see the sharer differently (the customer) learn who
                // shares, or that an agent does.
                for viewer in &s.participants {
                    let (was, now) = (
                        SessionState::share_msg(&before, true, viewer.role),
                        SessionState::share_msg(&after, true, viewer.role),
                    );
                    if let (Some(conn), true) = (viewer.conn, was != now) {
                        self.outputs.push_back(Output::Send { conn, msg: now });
                    }
                }
            }
        }
        after
            .seen_by(Role::Host)
            .ok_or(SessionError::NotFound("participant"))
    }

    /// The host ends the session for everyone.
    pub fn end_session(
        &mut self,
        now: Instant,
        host: &AgentIdentity,
        session: &SessionId,
    ) -> Result<(), SessionError> {
        self.session_as_host(session, host)?;
        self.finish(now, session, EndReason::EndedByHost);
        Ok(())
    }

    /// A supervisor lists the live sessions of its portals.
    pub fn list_sessions(
        &self,
        now: Instant,
        supervisor: &AgentIdentity,
    ) -> Result<Vec<SessionSummary>, SessionError> {
        if !supervisor.monitor {
            return Err(SessionError::Forbidden("your token has no monitor grant"));
        }
        let mut list: Vec<(Instant, SessionSummary)> = self
            .sessions
            .values()
            .filter(|s| supervisor.in_portal(&s.portal))
            .map(|s| (s.created_at, Self::summary(s, now)))
            .collect();
        list.sort_by_key(|(t, _)| *t);
        Ok(list.into_iter().map(|(_, s)| s).collect())
    }

    fn summary(s: &SessionState, now: Instant) -> SessionSummary {
        SessionSummary {
            session_id: s.id.as_str().to_owned(),
            portal: s.portal.clone(),
            host: s.host_name().to_owned(),
            customer: s
                .participants
                .iter()
                .find(|p| p.role == Role::Customer)
                .map(|p| p.name.clone()),
            agents: s.agent_count(),
            age_s: now.saturating_duration_since(s.created_at).as_secs(),
            node_url: None,
        }
    }

    /// A supervisor joins a session silently: masked, view-only, seen by nobody but
    /// other supervisors, not counted against the agents.
    pub fn monitor(
        &mut self,
        now: Instant,
        supervisor: &AgentIdentity,
        session: &SessionId,
    ) -> Result<Credentials, SessionError> {
        let result = self.try_monitor(now, supervisor, session);
        self.count_join(Role::Supervisor, &result);
        result
    }

    fn try_monitor(
        &mut self,
        now: Instant,
        supervisor: &AgentIdentity,
        session: &SessionId,
    ) -> Result<Credentials, SessionError> {
        if !supervisor.monitor {
            return Err(SessionError::Forbidden("your token has no monitor grant"));
        }
        let s = self.session(session)?;
        if !supervisor.in_portal(&s.portal) {
            return Err(SessionError::NotFound("session"));
        }
        if s.has_account(&supervisor.agent_id) {
            return Err(SessionError::AlreadyInSession);
        }
        let held = self.sessions_of(&supervisor.agent_id, true);
        if held >= self.settings.max_monitored_sessions {
            return Err(SessionError::MonitorLimit(held));
        }
        let token = Secret::random(&mut *self.rng);
        let participant = Participant {
            id: ParticipantId::random(&mut *self.rng),
            role: Role::Supervisor,
            name: clean_name(&supervisor.name, &mut self.outputs)?,
            agent_id: Some(supervisor.agent_id.clone()),
            visibility: Visibility::Masked,
            permission: Permission::View,
            token: token.digest(),
            conn: None,
            connected_before: false,
            disconnected_since: Some(now),
            chat_channel: false,
        };
        let creds = Credentials {
            session_id: session.clone(),
            participant_id: participant.id.clone(),
            token,
        };
        self.add_participant(session, participant);
        self.reschedule(session);
        Ok(creds)
    }

    // ----- connection events ---------------------------------------------------------

    /// A participant opened its session WebSocket `conn` with `token`: the participant
    /// token of its join for its first connection, the resume token of its last
    /// `welcome` after that. On success the token is used up and the `welcome` carries
    /// the next one (rotation: a token admits one connection, so a token seen by someone
    /// else stops working once its owner has used it); an older connection of the same
    /// participant is replaced. A used token is refused with
    /// [`SessionError::TokenUsed`] and changes nothing.
    pub fn connect(
        &mut self,
        now: Instant,
        session: &SessionId,
        token: &str,
        conn: ConnId,
    ) -> Result<(), SessionError> {
        let digest = SecretDigest::of(token);
        let Some((sid, pid)) = self.tokens.get(&digest).cloned() else {
            if self.ended.get(session).is_some() {
                return Err(SessionError::SessionEnded);
            }
            if self.used_tokens.get(&digest).is_some() {
                return Err(SessionError::TokenUsed);
            }
            return Err(SessionError::Unauthorized);
        };
        if sid != *session {
            return Err(SessionError::Unauthorized);
        }
        let next = Secret::random(&mut *self.rng);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Err(SessionError::SessionEnded);
        };
        let Some(p) = s.participant_mut(&pid) else {
            return Err(SessionError::Unauthorized);
        };
        let before = p.clone();
        if let Some(old) = p.conn.replace(conn) {
            self.outputs.push_back(Output::Send {
                conn: old,
                msg: ServerMsg::Error {
                    code: ErrorCode::Replaced,
                    message: "a newer connection of this participant took over".into(),
                    reference: None,
                },
            });
            self.outputs.push_back(Output::Close { conn: old });
            self.conns.remove(&old);
        }
        p.disconnected_since = None;
        p.connected_before = true;
        p.token = next.digest();
        let after = p.clone();
        self.tokens.remove(&digest);
        self.used_tokens.insert(now, digest, ());
        self.tokens
            .insert(next.digest(), (sid.clone(), pid.clone()));
        let welcome = s.welcome(&after, &next);
        self.outputs.push_back(Output::Send { conn, msg: welcome });
        if let Some(sharer) = s.sharing.as_ref().and_then(|id| s.participant(id)) {
            self.outputs.push_back(Output::Send {
                conn,
                msg: SessionState::share_msg(sharer, true, after.role),
            });
        }
        s.announce(
            Some(&before),
            Some(&after),
            LeaveReason::Left,
            &mut self.outputs,
        );
        self.conns
            .insert(conn, ConnTarget::Participant(sid.clone(), pid));
        self.reschedule(&sid);
        Ok(())
    }

    /// An agent opened its console WebSocket `conn`: it is greeted and sent the open
    /// invitations addressed to it.
    pub fn console_opened(&mut self, now: Instant, conn: ConnId, agent: &AgentIdentity) {
        self.conns.insert(conn, ConnTarget::Console(agent.clone()));
        self.outputs.push_back(Output::Send {
            conn,
            msg: ServerMsg::Hello {
                agent_id: agent.agent_id.clone(),
                portals: agent.portals.clone(),
            },
        });
        let open: Vec<(SessionId, InvitationId)> = self
            .sessions
            .values()
            .flat_map(|s| {
                s.invitations
                    .iter()
                    .filter(|i| i.expires_at > now)
                    .map(|i| (s.id.clone(), i.id.clone()))
            })
            .collect();
        for (sid, iid) in open {
            self.deliver_invitation(&sid, &iid, conn, agent);
        }
    }

    /// A message arrived on `conn` (already parsed by the shell; parse errors never
    /// reach the core).
    pub fn message(&mut self, now: Instant, conn: ConnId, envelope: ClientEnvelope) {
        let reference = envelope.id;
        let target = match self.conns.get(&conn) {
            Some(t) => t.clone(),
            None => return,
        };
        let (sid, pid) = match target {
            ConnTarget::Console(_) => {
                // Every console message is answered, so each one spends the ping budget.
                let limits = self.settings.rate_limits;
                let admission = self
                    .console_budgets
                    .entry(conn)
                    .or_insert_with(|| Budgets::new(&limits))
                    .check(MessageClass::Ping, now);
                if !self.admitted(admission, MessageClass::Ping) {
                    if admission == Admission::RefuseAndTell {
                        let msg = self.rate_limited_msg(MessageClass::Ping, reference);
                        self.outputs.push_back(Output::Send { conn, msg });
                    }
                    return;
                }
                let msg = match envelope.msg {
                    ClientMsg::Ping {} => ServerMsg::Pong { reference },
                    _ => error_msg(
                        ErrorCode::UnknownMessageType,
                        "the agent console accepts only `ping`",
                        reference,
                    ),
                };
                self.outputs.push_back(Output::Send { conn, msg });
                return;
            }
            ConnTarget::Participant(sid, pid) => (sid, pid),
        };
        let class = match &envelope.msg {
            ClientMsg::Ping {} => Some(MessageClass::Ping),
            // Leaving ends the participant's part: there is nothing to flood with.
            ClientMsg::Leave {} => None,
            ClientMsg::Offer { .. } => Some(MessageClass::Offer),
            ClientMsg::Candidate(_) => Some(MessageClass::Candidate),
            ClientMsg::Chat { .. } => Some(MessageClass::Chat),
            ClientMsg::ShareStart {} | ClientMsg::ShareStop {} => Some(MessageClass::Share),
        };
        if let Some(class) = class {
            if !self.admit(now, &sid, &pid, class, reference) {
                return;
            }
        }
        match envelope.msg {
            ClientMsg::Ping {} => self.outputs.push_back(Output::Send {
                conn,
                msg: ServerMsg::Pong { reference },
            }),
            ClientMsg::Leave {} => self.remove_participant(now, &sid, &pid, LeaveReason::Left),
            ClientMsg::Offer { sdp } => self.signal(&sid, &pid, Signal::Offer(sdp)),
            ClientMsg::Candidate(c) => self.signal(&sid, &pid, Signal::Candidate(c)),
            ClientMsg::Chat { text, audience } => {
                if let Err(e) = self.chat(now, &sid, &pid, text, audience) {
                    self.outputs.push_back(Output::Send {
                        conn,
                        msg: error_msg(e.code(), &e.to_string(), reference),
                    });
                }
            }
            ClientMsg::ShareStart {} => {
                if let Err(e) = self.start_share(&sid, &pid) {
                    self.outputs.push_back(Output::Send {
                        conn,
                        msg: error_msg(e.code(), &e.to_string(), reference),
                    });
                }
            }
            ClientMsg::ShareStop {} => self.end_share(&sid, &pid, ShareOutcome::Stopped),
        }
    }

    /// The media plane lost the peer connection of participant `pid`: if it was sharing
    /// its screen, the share ends (it must ask again once it is back).
    pub fn share_lost(&mut self, sid: &SessionId, pid: &ParticipantId) {
        self.end_share(sid, pid, ShareOutcome::ConnectionLost);
    }

    /// A message arrived on a participant's `chat` data channel (already parsed by the
    /// shell with the same size limit as the WebSocket). Only `chat` is accepted there;
    /// it goes through the same rules as on the WebSocket. A refusal is sent to the
    /// participant's WebSocket as `error` (with the message's `id` as `ref`).
    pub fn channel_message(
        &mut self,
        now: Instant,
        sid: &SessionId,
        pid: &ParticipantId,
        envelope: ClientEnvelope,
    ) {
        let reference = envelope.id;
        // Whatever comes on the chat channel costs a chat token (the WebSocket's chat
        // and the channel's share one budget).
        if !self.admit(now, sid, pid, MessageClass::Chat, reference) {
            return;
        }
        let refusal = match envelope.msg {
            ClientMsg::Chat { text, audience } => self
                .chat(now, sid, pid, text, audience)
                .err()
                .map(|e| (e.code(), e.to_string())),
            _ => Some((
                ErrorCode::BadRequest,
                "the chat data channel carries only `chat` messages".to_owned(),
            )),
        };
        if let Some((code, message)) = refusal {
            self.deliver(sid, pid, error_msg(code, &message, reference));
        }
    }

    /// A participant's `chat` data channel opened (`open`) or closed: from now on, chat
    /// for it goes there (or back to its WebSocket).
    pub fn chat_channel(&mut self, sid: &SessionId, pid: &ParticipantId, open: bool) {
        if let Some(p) = self
            .sessions
            .get_mut(sid)
            .and_then(|s| s.participant_mut(pid))
        {
            p.chat_channel = open;
        }
    }

    /// `pid` asks to show its screen to the customer. See the module docs for the rules.
    fn start_share(&mut self, sid: &SessionId, pid: &ParticipantId) -> Result<(), SessionError> {
        let result = self.try_start_share(sid, pid);
        match &result {
            Err(SessionError::ShareBusy) => self.stat(Stat::Share(ShareOutcome::RefusedBusy)),
            Err(SessionError::Forbidden(_)) => {
                self.stat(Stat::Share(ShareOutcome::RefusedForbidden))
            }
            _ => {}
        }
        result
    }

    fn try_start_share(
        &mut self,
        sid: &SessionId,
        pid: &ParticipantId,
    ) -> Result<(), SessionError> {
        let s = self
            .sessions
            .get_mut(sid)
            .ok_or(SessionError::SessionEnded)?;
        let sharer = s
            .participant(pid)
            .ok_or(SessionError::NotFound("participant"))?;
        match (sharer.role, sharer.permission) {
            (Role::Host | Role::Agent, Permission::Control) => {}
            (Role::Host | Role::Agent, Permission::View) => {
                return Err(SessionError::Forbidden(
                    "you have view-only permission: you cannot share your screen",
                ));
            }
            (Role::Supervisor, _) => {
                return Err(SessionError::Forbidden(
                    "supervisors monitor silently and cannot share a screen",
                ));
            }
            (Role::Customer, _) => {
                return Err(SessionError::Forbidden(
                    "only agents can share their own screen with the customer",
                ));
            }
        }
        match &s.sharing {
            // Asking again changes nothing; the asker is reminded that it shares.
            Some(current) if current == pid => {
                if let Some(conn) = sharer.conn {
                    self.outputs.push_back(Output::Send {
                        conn,
                        msg: SessionState::share_msg(sharer, true, sharer.role),
                    });
                }
                return Ok(());
            }
            Some(_) => return Err(SessionError::ShareBusy),
            None => {}
        }
        let sharer = sharer.clone();
        s.sharing = Some(pid.clone());
        s.announce_share(&sharer, true, &mut self.outputs);
        self.outputs.push_back(Output::Media(MediaEvent::Share {
            session: sid.clone(),
            sharer: Some(pid.clone()),
        }));
        self.stat(Stat::Share(ShareOutcome::Started));
        Ok(())
    }

    /// Ends `pid`'s screen share, if it has one, telling everyone and the media plane.
    fn end_share(&mut self, sid: &SessionId, pid: &ParticipantId, why: ShareOutcome) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        if s.sharing.as_ref() != Some(pid) {
            return;
        }
        s.sharing = None;
        if let Some(sharer) = s.participant(pid) {
            s.announce_share(sharer, false, &mut self.outputs);
        }
        self.outputs.push_back(Output::Media(MediaEvent::Share {
            session: sid.clone(),
            sharer: None,
        }));
        self.stat(Stat::Share(why));
    }

    /// Hands a participant's WebRTC signalling to the media plane.
    fn signal(&mut self, sid: &SessionId, pid: &ParticipantId, signal: Signal) {
        self.outputs.push_back(Output::Media(MediaEvent::Signal {
            session: sid.clone(),
            participant: pid.clone(),
            signal,
        }));
    }

    /// Sends `msg` to a participant if it is connected (the media plane's answers and
    /// candidates). Returns whether it was queued.
    pub fn deliver(&mut self, sid: &SessionId, pid: &ParticipantId, msg: ServerMsg) -> bool {
        let conn = self
            .sessions
            .get(sid)
            .and_then(|s| s.participant(pid))
            .and_then(|p| p.conn);
        if let Some(conn) = conn {
            self.outputs.push_back(Output::Send { conn, msg });
        }
        conn.is_some()
    }

    /// `conn` closed. A participant keeps its place for its grace period (seen as
    /// `reconnecting`); for the customer the media plane is told
    /// ([`MediaEvent::CustomerAway`]).
    pub fn disconnected(&mut self, now: Instant, conn: ConnId) {
        let Some(ConnTarget::Participant(sid, pid)) = self.conns.remove(&conn) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(p) = s.participant_mut(&pid) else {
            return;
        };
        if p.conn != Some(conn) {
            return;
        }
        let before = p.clone();
        p.conn = None;
        p.disconnected_since = Some(now);
        let after = p.clone();
        s.announce(
            Some(&before),
            Some(&after),
            LeaveReason::Left,
            &mut self.outputs,
        );
        if after.role == Role::Customer {
            // Its screen and its input channel go with it until it resumes and
            // publishes again; the recording marks the gap.
            self.outputs
                .push_back(Output::Media(MediaEvent::CustomerAway {
                    session: sid.clone(),
                    participant: pid,
                }));
        }
        self.reschedule(&sid);
    }

    /// An agent console closed.
    pub fn console_closed(&mut self, _now: Instant, conn: ConnId) {
        if matches!(self.conns.get(&conn), Some(ConnTarget::Console(_))) {
            self.conns.remove(&conn);
        }
        self.console_budgets.remove(&conn);
    }

    /// Starts a graceful drain: no new sessions from now on; live sessions may finish
    /// until `now + deadline`, when the rest end with `node_shutdown`.
    pub fn start_drain(&mut self, now: Instant, deadline: Duration) {
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + deadline);
        }
    }

    // ----- timers and outputs --------------------------------------------------------

    /// When [`Node::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_housekeeping;
        if let Some((t, _)) = self.deadlines.first() {
            next = next.min(*t);
        }
        if let Some(t) = self.drain_deadline.filter(|_| !self.sessions.is_empty()) {
            next = next.min(t);
        }
        Some(next)
    }

    /// Runs everything due at `now`: key and invitation expiry, grace periods, the
    /// longest session duration, the drain deadline and housekeeping.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.drain_deadline.is_some_and(|t| t <= now) {
            let all: Vec<SessionId> = self.sessions.keys().cloned().collect();
            for sid in all {
                self.finish(now, &sid, EndReason::NodeShutdown);
            }
        }
        while let Some((t, sid)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, sid.clone()));
            self.deadline_of.remove(&sid);
            self.tick_session(now, &sid);
        }
        if now >= self.next_housekeeping {
            self.throttle.prune(now);
            self.link_throttle.prune(now);
            self.challenges.prune(now);
            self.ended.sweep(now);
            self.expired_keys.sweep(now);
            self.expired_links.sweep(now);
            self.used_tokens.sweep(now);
            self.closed_invitations.sweep(now);
            self.next_housekeeping = now + HOUSEKEEPING_EVERY;
        }
    }

    /// The next thing to do, in order.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    // ----- internals -----------------------------------------------------------------

    /// Spends one token of `class` from participant `pid`'s budget at `now`. Over
    /// budget, the message must be dropped (`false`): it is counted, and the participant
    /// is told `rate_limited` (on its WebSocket, naming `reference`) at most once a second.
    fn admit(
        &mut self,
        now: Instant,
        sid: &SessionId,
        pid: &ParticipantId,
        class: MessageClass,
        reference: Option<u64>,
    ) -> bool {
        let limits = self.settings.rate_limits;
        let admission = self
            .budgets
            .entry((sid.clone(), pid.clone()))
            .or_insert_with(|| Budgets::new(&limits))
            .check(class, now);
        if self.admitted(admission, class) {
            return true;
        }
        if admission == Admission::RefuseAndTell {
            let msg = self.rate_limited_msg(class, reference);
            self.deliver(sid, pid, msg);
        }
        false
    }

    /// Whether `admission` lets a message of `class` pass; counts it if not.
    fn admitted(&mut self, admission: Admission, class: MessageClass) -> bool {
        if admission == Admission::Pass {
            return true;
        }
        self.stat(Stat::RateLimited(class));
        false
    }

    /// The `rate_limited` error for a message of `class`.
    fn rate_limited_msg(&self, class: MessageClass, reference: Option<u64>) -> ServerMsg {
        let limit = self.settings.rate_limits.of(class);
        let message = format!(
            "too many {} messages: at most {} at once and {} per second; this one was \
             dropped (and further ones are, silently, until the budget refills)",
            class.as_str(),
            limit.burst,
            limit.per_second
        );
        error_msg(ErrorCode::RateLimited, &message, reference)
    }

    fn stat(&mut self, stat: Stat) {
        self.outputs.push_back(Output::Stat(stat));
    }

    fn count_join<T>(&mut self, role: Role, result: &Result<T, SessionError>) {
        let refused = result.as_ref().err().map(SessionError::code);
        self.stat(Stat::Join { role, refused });
    }

    /// Sessions `agent_id` is in as an agent (or, with `monitoring`, as a supervisor).
    fn sessions_of(&self, agent_id: &str, monitoring: bool) -> usize {
        self.sessions
            .values()
            .filter(|s| {
                s.participants.iter().any(|p| {
                    p.agent_id.as_deref() == Some(agent_id)
                        && (p.role == Role::Supervisor) == monitoring
                })
            })
            .count()
    }

    fn session(&self, id: &SessionId) -> Result<&SessionState, SessionError> {
        match self.sessions.get(id) {
            Some(s) => Ok(s),
            None if self.ended.get(id).is_some() => Err(SessionError::SessionEnded),
            None => Err(SessionError::NotFound("session")),
        }
    }

    /// The session, if `who` is its host. Others learn only that they may not.
    fn session_as_host(
        &self,
        id: &SessionId,
        who: &AgentIdentity,
    ) -> Result<&SessionState, SessionError> {
        let s = self.session(id)?;
        if s.host_is(&who.agent_id) {
            Ok(s)
        } else if s.has_account(&who.agent_id) {
            Err(SessionError::Forbidden("only the host can do this"))
        } else {
            Err(SessionError::NotFound("session"))
        }
    }

    fn invitation_gone(&self, id: &InvitationId) -> SessionError {
        if self.closed_invitations.get(id).is_some() {
            SessionError::InvitationClosed
        } else {
            SessionError::NotFound("invitation")
        }
    }

    /// The open invitation `id`, if it is addressed to `agent`.
    fn open_invitation_for(
        &self,
        now: Instant,
        agent: &AgentIdentity,
        id: &InvitationId,
    ) -> Result<(SessionId, Invitation), SessionError> {
        let Some(sid) = self.invitations.get(id) else {
            return Err(self.invitation_gone(id));
        };
        let inv = self
            .sessions
            .get(sid)
            .and_then(|s| s.invitations.iter().find(|i| i.id == *id))
            .ok_or_else(|| self.invitation_gone(id))?;
        if !inv.addressed_to(agent) {
            return Err(SessionError::NotFound("invitation"));
        }
        if inv.expires_at <= now {
            return Err(SessionError::InvitationClosed);
        }
        if self.across_portals(sid, inv, agent) {
            return Err(SessionError::Forbidden(
                "this session belongs to a portal you are not a member of",
            ));
        }
        Ok((sid.clone(), inv.clone()))
    }

    /// Whether `inv` is a direct invitation to an agent outside the session's portal
    /// while `session.cross_portal_invitations` is off: such an agent is not shown it
    /// and may not accept it. (The core learns an agent's portals from its token only
    /// when the agent itself calls, so this is checked on delivery and on accept.)
    fn across_portals(&self, sid: &SessionId, inv: &Invitation, agent: &AgentIdentity) -> bool {
        !self.settings.cross_portal_invitations
            && !inv.portal_wide()
            && self
                .sessions
                .get(sid)
                .is_some_and(|s| !agent.in_portal(&s.portal))
    }

    /// Sends invitation `iid` to console `conn` if it is for that agent, and notes it
    /// as delivered to that agent.
    fn deliver_invitation(
        &mut self,
        sid: &SessionId,
        iid: &InvitationId,
        conn: ConnId,
        agent: &AgentIdentity,
    ) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        if s.has_account(&agent.agent_id) {
            return;
        }
        let from = s.host_name().to_owned();
        let cross_portal = self.settings.cross_portal_invitations || agent.in_portal(&s.portal);
        let Some(inv) = s.invitations.iter_mut().find(|i| i.id == *iid) else {
            return;
        };
        if !inv.addressed_to(agent) || !(cross_portal || inv.portal_wide()) {
            return;
        }
        inv.delivered.insert(agent.agent_id.clone());
        let info = invitation_info(&self.clock, &s.id, &s.portal, &from, inv);
        self.outputs.push_back(Output::Send {
            conn,
            msg: ServerMsg::Invitation(info),
        });
    }

    /// Closes an open invitation: tells the session's agents its new `state`, and
    /// withdraws it (with `withdraw`'s reason) from every console it reached except
    /// `withdraw`'s agent to skip (the one who accepted).
    fn close_invitation(
        &mut self,
        now: Instant,
        sid: &SessionId,
        iid: &InvitationId,
        state: InvitationState,
        by: Option<String>,
        withdraw: Option<(WithdrawReason, Option<&str>)>,
    ) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let Some(pos) = s.invitations.iter().position(|i| i.id == *iid) else {
            return;
        };
        let inv = s.invitations.remove(pos);
        s.tell_agents(
            &ServerMsg::InvitationUpdate {
                invitation_id: iid.as_str().to_owned(),
                state,
                by,
            },
            &mut self.outputs,
        );
        self.invitations.remove(iid);
        self.closed_invitations.insert(now, iid.clone(), ());
        if let Some((reason, skip)) = withdraw {
            self.withdraw(&inv, reason, skip);
        }
    }

    /// Tells every console of every agent `inv` reached that it is gone.
    fn withdraw(&mut self, inv: &Invitation, reason: WithdrawReason, skip: Option<&str>) {
        let mut withdrawn = 0;
        for (conn, target) in &self.conns {
            let ConnTarget::Console(agent) = target else {
                continue;
            };
            if !inv.delivered.contains(&agent.agent_id) || Some(agent.agent_id.as_str()) == skip {
                continue;
            }
            self.outputs.push_back(Output::Send {
                conn: *conn,
                msg: ServerMsg::InvitationWithdrawn {
                    invitation_id: inv.id.as_str().to_owned(),
                    reason,
                },
            });
            withdrawn += 1;
        }
        if reason == WithdrawReason::AcceptedByOther {
            for _ in 0..withdrawn {
                self.stat(Stat::Invitation(InvitationOutcome::Withdrawn));
            }
        }
    }

    /// Adds a participant and tells everyone who may know.
    fn add_participant(&mut self, sid: &SessionId, p: Participant) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        self.tokens.insert(p.token, (sid.clone(), p.id.clone()));
        let role = p.role;
        s.participants.push(p.clone());
        s.announce(None, Some(&p), LeaveReason::Left, &mut self.outputs);
        self.stat(Stat::ParticipantAdded(role));
    }

    /// Removes a participant; ends the session if it was the customer or the last
    /// agent, and hands the host role on if it was the host.
    fn remove_participant(
        &mut self,
        now: Instant,
        sid: &SessionId,
        pid: &ParticipantId,
        reason: LeaveReason,
    ) {
        self.end_share(sid, pid, ShareOutcome::Left);
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let Some(pos) = s.participants.iter().position(|p| p.id == *pid) else {
            return;
        };
        let gone = s.participants.remove(pos);
        self.tokens.remove(&gone.token);
        self.budgets.remove(&(sid.clone(), gone.id.clone()));
        s.announce(Some(&gone), None, reason, &mut self.outputs);
        if let Some(conn) = gone.conn {
            self.conns.remove(&conn);
            self.outputs.push_back(Output::Close { conn });
        }
        self.stat(Stat::ParticipantRemoved(gone.role));

        let customer_gone = gone.role == Role::Customer;
        let no_agents = self.sessions.get(sid).is_some_and(|s| s.agent_count() == 0);
        if customer_gone {
            let why = match reason {
                LeaveReason::Left => EndReason::CustomerLeft,
                LeaveReason::TimedOut => EndReason::CustomerDidNotReturn,
            };
            self.finish(now, sid, why);
            return;
        }
        if no_agents && gone.is_agent() {
            self.finish(now, sid, EndReason::AgentsLeft);
            return;
        }
        if gone.role == Role::Host {
            self.hand_over_host(sid);
        }
        self.reschedule(sid);
    }

    /// Makes the longest-present agent the host (with control).
    fn hand_over_host(&mut self, sid: &SessionId) {
        let Some(s) = self.sessions.get_mut(sid) else {
            return;
        };
        let Some(heir) = s.participants.iter_mut().find(|p| p.role == Role::Agent) else {
            return;
        };
        let before = heir.clone();
        heir.role = Role::Host;
        heir.permission = Permission::Control;
        let after = heir.clone();
        s.announce(
            Some(&before),
            Some(&after),
            LeaveReason::Left,
            &mut self.outputs,
        );
        self.stat(Stat::ParticipantRemoved(Role::Agent));
        self.stat(Stat::ParticipantAdded(Role::Host));
    }

    /// Ends a session: everyone is told why and disconnected, its keys, tokens and
    /// invitations are forgotten.
    fn finish(&mut self, now: Instant, sid: &SessionId, reason: EndReason) {
        let Some(s) = self.sessions.remove(sid) else {
            return;
        };
        if s.sharing.is_some() {
            // Everyone is told `session_ended`; the media plane closes every connection.
            self.stat(Stat::Share(ShareOutcome::SessionEnded));
        }
        for p in &s.participants {
            self.tokens.remove(&p.token);
            self.budgets.remove(&(sid.clone(), p.id.clone()));
            if let Some(conn) = p.conn {
                self.outputs.push_back(Output::Send {
                    conn,
                    msg: ServerMsg::SessionEnded { reason },
                });
                self.outputs.push_back(Output::Close { conn });
                self.conns.remove(&conn);
            }
            self.stat(Stat::ParticipantRemoved(p.role));
        }
        for inv in &s.invitations {
            self.invitations.remove(&inv.id);
            self.closed_invitations.insert(now, inv.id.clone(), ());
            self.withdraw(inv, WithdrawReason::SessionEnded, None);
        }
        self.keys.remove(s.key.reveal());
        self.links.remove(&s.link);
        if reason == EndReason::KeyExpired {
            self.expired_keys.insert(now, s.key.reveal().to_owned(), ());
            self.expired_links.insert(now, s.link, ());
        }
        if let Some(t) = self.deadline_of.remove(sid) {
            self.deadlines.remove(&(t, sid.clone()));
        }
        self.ended.insert(now, sid.clone(), reason);
        self.outputs
            .push_back(Output::Media(MediaEvent::SessionEnded {
                session: sid.clone(),
            }));
        self.stat(Stat::SessionEnded(reason));
    }

    /// Runs what is due in one session.
    fn tick_session(&mut self, now: Instant, sid: &SessionId) {
        let Some(s) = self.sessions.get(sid) else {
            return;
        };
        if now >= s.created_at + self.settings.max_duration {
            self.finish(now, sid, EndReason::MaxDuration);
            return;
        }
        if !s.key_used && now >= s.key_expires_at {
            self.finish(now, sid, EndReason::KeyExpired);
            return;
        }
        let lapsed: Vec<InvitationId> = s
            .invitations
            .iter()
            .filter(|i| i.expires_at <= now)
            .map(|i| i.id.clone())
            .collect();
        let (customer, agent) = (self.settings.customer_grace, self.settings.agent_grace);
        let absent: Vec<ParticipantId> = s
            .participants
            .iter()
            .filter(|p| p.grace_deadline(customer, agent).is_some_and(|t| t <= now))
            .map(|p| p.id.clone())
            .collect();
        for iid in lapsed {
            self.close_invitation(
                now,
                sid,
                &iid,
                InvitationState::Expired,
                None,
                Some((WithdrawReason::Expired, None)),
            );
            self.stat(Stat::Invitation(InvitationOutcome::Expired));
        }
        for pid in absent {
            self.remove_participant(now, sid, &pid, LeaveReason::TimedOut);
        }
        self.reschedule(sid);
    }

    /// Recomputes a session's next deadline.
    fn reschedule(&mut self, sid: &SessionId) {
        if let Some(t) = self.deadline_of.remove(sid) {
            self.deadlines.remove(&(t, sid.clone()));
        }
        if let Some(s) = self.sessions.get(sid) {
            let t = s.next_deadline(
                self.settings.max_duration,
                self.settings.customer_grace,
                self.settings.agent_grace,
            );
            self.deadlines.insert((t, sid.clone()));
            self.deadline_of.insert(sid.clone(), t);
        }
    }

    fn chat(
        &mut self,
        now: Instant,
        sid: &SessionId,
        pid: &ParticipantId,
        text: String,
        audience: Audience,
    ) -> Result<(), SessionError> {
        let history = self.settings.chat_history;
        let s = self
            .sessions
            .get_mut(sid)
            .ok_or(SessionError::SessionEnded)?;
        let sender = s
            .participant(pid)
            .ok_or(SessionError::NotFound("participant"))?;
        match sender.role {
            Role::Supervisor => {
                return Err(SessionError::Forbidden(
                    "supervisors monitor silently and cannot chat",
                ));
            }
            Role::Customer if audience == Audience::Agents => {
                return Err(SessionError::Forbidden("customers cannot send agent notes"));
            }
            _ => {}
        }
        let text = text::clean_message(&text, wire::MAX_CHAT_CHARS)
            .map_err(|rule| refuse_text(Field::Chat, rule, &mut self.outputs))?;
        let record = ChatRecord {
            seq: s.next_chat_seq,
            from: sender.id.clone(),
            from_name: sender.name.clone(),
            from_role: sender.role,
            from_hidden_from_customer: !sender.visible_to(Role::Customer),
            audience,
            text,
            at_ms: u64::try_from(now.saturating_duration_since(s.created_at).as_millis())
                .unwrap_or(u64::MAX),
        };
        s.next_chat_seq += 1;
        s.post_chat(record, history, &mut self.outputs);
        Ok(())
    }
}

fn error_msg(code: ErrorCode, message: &str, reference: Option<u64>) -> ServerMsg {
    ServerMsg::Error {
        code,
        message: message.to_owned(),
        reference,
    }
}

fn invitation_info(
    clock: &WallClock,
    sid: &SessionId,
    portal: &str,
    from: &str,
    inv: &Invitation,
) -> InvitationInfo {
    InvitationInfo {
        invitation_id: inv.id.as_str().to_owned(),
        session_id: sid.as_str().to_owned(),
        portal: portal.to_owned(),
        from: from.to_owned(),
        portal_wide: inv.portal_wide(),
        visibility: inv.visibility,
        permission: inv.permission,
        comment: inv.comment.clone(),
        expires_at: clock.rfc3339(inv.expires_at),
    }
}
