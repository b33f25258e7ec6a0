//! A participant, and the one rule of who may see whom.
//!
//! Every message the core builds about a participant goes through [`Participant::seen_by`]:
//! it returns `None` when the viewer must not learn the subject exists (a masked agent
//! or a supervisor seen by the customer, a supervisor seen by an agent), and otherwise the
//! roster entry trimmed to what that viewer may know.

use std::time::{Duration, Instant};

use relay_codec::wire::{Permission, Role, RosterEntry, Visibility};

use super::ids::{ConnId, ParticipantId, SecretDigest};

/// One participant of a session.
#[derive(Debug, Clone)]
pub(super) struct Participant {
    pub id: ParticipantId,
    pub role: Role,
    pub name: String,
    /// Account id, for agents and supervisors.
    pub agent_id: Option<String>,
    pub visibility: Visibility,
    pub permission: Permission,
    /// Digest of the one token that admits this participant's next connection: the
    /// participant token of its join until it first connects, then the resume token of
    /// its last `welcome`. Single-use: each connection replaces it.
    pub token: SecretDigest,
    /// The WebSocket currently carrying this participant, if any.
    pub conn: Option<ConnId>,
    /// Whether it has connected at least once (absent since then = reconnecting).
    pub connected_before: bool,
    /// Since when it has had no WebSocket (set at join until the first connect).
    pub disconnected_since: Option<Instant>,
    /// Whether its `chat` data channel is open: chat then reaches it there instead of
    /// on its WebSocket.
    pub chat_channel: bool,
}

impl Participant {
    /// Host or invited agent: counted against the 8 agents.
    pub fn is_agent(&self) -> bool {
        matches!(self.role, Role::Host | Role::Agent)
    }

    /// Whether `viewer` may know this participant exists.
    pub fn visible_to(&self, viewer: Role) -> bool {
        match (viewer, self.role) {
            (_, Role::Customer) => true,
            (Role::Supervisor, _) => true,
            (Role::Customer, Role::Supervisor) => false,
            (Role::Customer, _) => self.visibility == Visibility::Visible,
            (Role::Host | Role::Agent, Role::Supervisor) => false,
            (Role::Host | Role::Agent, _) => true,
        }
    }

    /// The roster entry `viewer` may see, or `None` if it may not see this participant.
    pub fn seen_by(&self, viewer: Role) -> Option<RosterEntry> {
        if !self.visible_to(viewer) {
            return None;
        }
        let agent_details = viewer != Role::Customer;
        Some(RosterEntry {
            participant_id: self.id.as_str().to_owned(),
            name: self.name.clone(),
            role: self.role,
            agent_id: self.agent_id.clone().filter(|_| agent_details),
            visibility: (agent_details && self.role != Role::Customer).then_some(self.visibility),
            permission: (self.role != Role::Customer).then_some(self.permission),
            connected: self.conn.is_some(),
            reconnecting: self.is_reconnecting(),
        })
    }

    /// Connected once, now without a connection, and still within its grace period
    /// (it is removed when that runs out).
    pub fn is_reconnecting(&self) -> bool {
        self.conn.is_none() && self.connected_before
    }

    /// When this participant's absence runs out, if it is absent.
    pub fn grace_deadline(&self, customer: Duration, agent: Duration) -> Option<Instant> {
        let grace = if self.role == Role::Customer {
            customer
        } else {
            agent
        };
        self.disconnected_since.map(|t| t + grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, visibility: Visibility) -> Participant {
        Participant {
            id: ParticipantId::from_wire("p_1"),
            role,
            name: "N".into(),
            agent_id: (role != Role::Customer).then(|| "acct".into()),
            visibility,
            permission: Permission::View,
            token: SecretDigest::of("t"),
            conn: None,
            connected_before: false,
            disconnected_since: None,
            chat_channel: false,
        }
    }

    #[test]
    fn customer_sees_only_visible_agents_and_never_account_ids() {
        assert!(
            p(Role::Agent, Visibility::Masked)
                .seen_by(Role::Customer)
                .is_none()
        );
        assert!(
            p(Role::Host, Visibility::Masked)
                .seen_by(Role::Customer)
                .is_none()
        );
        assert!(
            p(Role::Supervisor, Visibility::Masked)
                .seen_by(Role::Customer)
                .is_none()
        );
        let e = p(Role::Agent, Visibility::Visible)
            .seen_by(Role::Customer)
            .unwrap();
        assert_eq!(e.agent_id, None);
        assert_eq!(e.visibility, None);
        assert_eq!(e.permission, Some(Permission::View));
    }

    #[test]
    fn agents_see_masked_agents_but_not_supervisors() {
        let e = p(Role::Agent, Visibility::Masked)
            .seen_by(Role::Agent)
            .unwrap();
        assert_eq!(e.visibility, Some(Visibility::Masked));
        assert_eq!(e.agent_id.as_deref(), Some("acct"));
        assert!(
            p(Role::Supervisor, Visibility::Masked)
                .seen_by(Role::Host)
                .is_none()
        );
        assert!(
            p(Role::Supervisor, Visibility::Masked)
                .seen_by(Role::Supervisor)
                .is_some()
        );
    }
}
