//! Who an authenticated agent is, as the account backend's token says.

/// An agent or supervisor, as proven by a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The account id (`sub` claim).
    pub agent_id: String,
    /// Display name (`name` claim).
    pub name: String,
    /// Portals the agent belongs to (`portals` claim).
    pub portals: Vec<String>,
    /// Whether the token carries the `monitor` grant (supervisor).
    pub monitor: bool,
}

impl AgentIdentity {
    /// Whether the agent belongs to `portal`.
    pub fn in_portal(&self, portal: &str) -> bool {
        self.portals.iter().any(|p| p == portal)
    }
}
