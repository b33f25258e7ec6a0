//! An open invitation of a session, and who may take it.

use std::collections::HashSet;
use std::time::Instant;

use relay_codec::wire::{InviteTarget, Permission, Visibility};

use super::ids::InvitationId;
use crate::identity::AgentIdentity;

/// An invitation that nobody has accepted yet. Closed invitations are removed.
#[derive(Debug, Clone)]
pub(super) struct Invitation {
    pub id: InvitationId,
    pub target: InviteTarget,
    pub visibility: Visibility,
    pub permission: Permission,
    pub comment: Option<String>,
    pub expires_at: Instant,
    /// Agents it was shown to (on a console or by listing), to withdraw it from later.
    pub delivered: HashSet<String>,
    /// Agents of a portal-wide invitation who declined it.
    pub declined: HashSet<String>,
}

impl Invitation {
    /// Whether `agent` may see and accept it. Membership in the session is checked by
    /// the caller, which knows the roster.
    pub fn addressed_to(&self, agent: &AgentIdentity) -> bool {
        if self.declined.contains(&agent.agent_id) {
            return false;
        }
        match &self.target {
            InviteTarget::Agent(id) => *id == agent.agent_id,
            InviteTarget::Portal(portal) => agent.in_portal(portal),
        }
    }

    /// Whether it went to a whole portal.
    pub fn portal_wide(&self) -> bool {
        matches!(self.target, InviteTarget::Portal(_))
    }
}
