//! One session's state, and how changes to it are told to each participant.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use relay_codec::recording::{self as rec, RosterChange};
use relay_codec::wire::{
    Audience, ChatMessage, LeaveReason, Permission, Role, RosterEntry, ServerMsg, Visibility,
};

use super::ids::{ParticipantId, Secret, SecretDigest, SessionId, SupportKey};
use super::invitation::Invitation;
use super::participant::Participant;
use super::{MediaEvent, Output, RecordEntry};

/// A chat message as stored, with everything any recipient might be shown.
#[derive(Debug, Clone)]
pub(super) struct ChatRecord {
    pub seq: u64,
    pub from: ParticipantId,
    pub from_name: String,
    pub from_role: Role,
    /// Whether the sender was hidden from the customer when it spoke.
    pub from_hidden_from_customer: bool,
    pub audience: Audience,
    pub text: String,
    pub at_ms: u64,
}

impl ChatRecord {
    /// The message as `viewer` may see it, or `None` if it is not for them.
    pub fn seen_by(&self, viewer: Role) -> Option<ChatMessage> {
        let for_customer = viewer == Role::Customer;
        if for_customer && self.audience == Audience::Agents {
            return None;
        }
        let anonymous = for_customer && self.from_hidden_from_customer;
        Some(ChatMessage {
            seq: self.seq,
            from: (!anonymous).then(|| self.from.as_str().to_owned()),
            from_name: (!anonymous).then(|| self.from_name.clone()),
            from_role: if anonymous {
                Role::Agent
            } else {
                self.from_role
            },
            audience: self.audience,
            text: self.text.clone(),
            at_ms: self.at_ms,
        })
    }
}

/// Everything the core knows about one live session.
#[derive(Debug)]
pub(super) struct SessionState {
    pub id: SessionId,
    pub portal: String,
    pub created_at: Instant,
    pub key: SupportKey,
    pub link: SecretDigest,
    pub key_expires_at: Instant,
    /// Whether the key (or link) admitted its customer.
    pub key_used: bool,
    /// In join order; the order decides who inherits the host role.
    pub participants: Vec<Participant>,
    pub invitations: Vec<Invitation>,
    pub chat: VecDeque<ChatRecord>,
    pub next_chat_seq: u64,
    /// The agent showing its own screen to the customer, if any (one at a time).
    pub sharing: Option<ParticipantId>,
}

impl SessionState {
    /// Agents counted against the limit of 8 (host and invited).
    pub fn agent_count(&self) -> usize {
        self.participants.iter().filter(|p| p.is_agent()).count()
    }

    /// Whether this account is already a participant (in any role).
    pub fn has_account(&self, agent_id: &str) -> bool {
        self.participants
            .iter()
            .any(|p| p.agent_id.as_deref() == Some(agent_id))
    }

    /// The participant with this id.
    pub fn participant(&self, id: &ParticipantId) -> Option<&Participant> {
        self.participants.iter().find(|p| p.id == *id)
    }

    /// The participant with this id, mutably.
    pub fn participant_mut(&mut self, id: &ParticipantId) -> Option<&mut Participant> {
        self.participants.iter_mut().find(|p| p.id == *id)
    }

    /// The host, if it is the account `agent_id`.
    pub fn host_is(&self, agent_id: &str) -> bool {
        self.participants
            .iter()
            .any(|p| p.role == Role::Host && p.agent_id.as_deref() == Some(agent_id))
    }

    /// The current host's display name.
    pub fn host_name(&self) -> &str {
        self.participants
            .iter()
            .find(|p| p.role == Role::Host)
            .map(|p| p.name.as_str())
            .unwrap_or("")
    }

    /// The next moment something in this session is due, given the grace periods.
    pub fn next_deadline(
        &self,
        max_duration: Duration,
        customer_grace: Duration,
        agent_grace: Duration,
    ) -> Instant {
        let mut next = self.created_at + max_duration;
        if !self.key_used {
            next = next.min(self.key_expires_at);
        }
        for inv in &self.invitations {
            next = next.min(inv.expires_at);
        }
        for p in &self.participants {
            if let Some(t) = p.grace_deadline(customer_grace, agent_grace) {
                next = next.min(t);
            }
        }
        next
    }

    /// The `welcome` for participant `who`, with the token for its next connection.
    pub fn welcome(&self, who: &Participant, resume_token: &Secret) -> ServerMsg {
        let viewer = who.role;
        ServerMsg::Welcome {
            session_id: self.id.as_str().to_owned(),
            you: who.seen_by(who.role).unwrap_or_else(|| RosterEntry {
                participant_id: who.id.as_str().to_owned(),
                name: who.name.clone(),
                role: who.role,
                agent_id: who.agent_id.clone(),
                visibility: Some(who.visibility),
                permission: Some(who.permission),
                connected: true,
                reconnecting: false,
            }),
            roster: self
                .participants
                .iter()
                .filter(|p| p.id != who.id)
                .filter_map(|p| p.seen_by(viewer))
                .collect(),
            chat: self.chat.iter().filter_map(|c| c.seen_by(viewer)).collect(),
            resume_token: Some(resume_token.reveal().to_owned()),
        }
    }

    /// Tells every connected participant what it may know of a change to `subject`:
    /// `before`/`after` are the subject's state before and after (`None` = absent).
    /// A viewer that could not see it before and can now gets `participant_joined`,
    /// the reverse gets `participant_left`, and one that sees it both times gets
    /// `participant_updated` if its entry changed. The subject itself is told of its
    /// own updates, not of its own arrival or departure.
    pub fn announce(
        &self,
        before: Option<&Participant>,
        after: Option<&Participant>,
        reason: LeaveReason,
        out: &mut VecDeque<Output>,
    ) {
        let subject = match after.or(before) {
            Some(s) => s.id.clone(),
            None => return,
        };
        let rights = |p: &Participant| (p.role, p.permission);
        match after {
            Some(a) if before.map(rights) != Some(rights(a)) => {
                out.push_back(Output::Media(MediaEvent::Member {
                    session: self.id.clone(),
                    participant: a.id.clone(),
                    role: a.role,
                    permission: a.permission,
                }))
            }
            None => out.push_back(Output::Media(MediaEvent::Left {
                session: self.id.clone(),
                participant: subject.clone(),
            })),
            _ => {}
        }
        self.record_roster(before, after, out);
        for viewer in &self.participants {
            let Some(conn) = viewer.conn else { continue };
            let was = before.and_then(|s| s.seen_by(viewer.role));
            let now = after.and_then(|s| s.seen_by(viewer.role));
            let msg = match (was, now) {
                (None, Some(entry)) if viewer.id != subject => {
                    ServerMsg::ParticipantJoined { participant: entry }
                }
                (Some(old), Some(entry)) if old != entry => {
                    ServerMsg::ParticipantUpdated { participant: entry }
                }
                (Some(old), None) if viewer.id != subject => ServerMsg::ParticipantLeft {
                    participant_id: old.participant_id,
                    reason,
                },
                _ => continue,
            };
            out.push_back(Output::Send { conn, msg });
        }
    }

    /// Tells the recording what changed in the roster (nothing for a mere change of
    /// connection). Masked agents are recorded by name, with their visibility.
    pub fn record_roster(
        &self,
        before: Option<&Participant>,
        after: Option<&Participant>,
        out: &mut VecDeque<Output>,
    ) {
        let mut changes = Vec::new();
        match (before, after) {
            (None, Some(a)) => changes.push((RosterChange::Joined, a)),
            (Some(b), None) => changes.push((RosterChange::Left, b)),
            (Some(b), Some(a)) => {
                if b.role != a.role {
                    changes.push((RosterChange::RoleChanged, a));
                }
                if b.permission != a.permission {
                    changes.push((RosterChange::PermissionChanged, a));
                }
                if b.visibility != a.visibility {
                    let change = match a.visibility {
                        Visibility::Masked => RosterChange::Masked,
                        Visibility::Visible => RosterChange::Unmasked,
                    };
                    changes.push((change, a));
                }
            }
            (None, None) => {}
        }
        for (change, p) in changes {
            let customer = p.role == Role::Customer;
            out.push_back(Output::Media(MediaEvent::Record {
                session: self.id.clone(),
                entry: RecordEntry::Roster(rec::RosterRecord {
                    change,
                    participant_id: p.id.as_str().to_owned(),
                    role: p.role,
                    name: p.name.clone(),
                    visibility: if customer {
                        Visibility::Visible
                    } else {
                        p.visibility
                    },
                    permission: if customer {
                        Permission::View
                    } else {
                        p.permission
                    },
                }),
            }));
        }
    }

    /// Sends `record` to every participant it is for, once: on its `chat` data channel
    /// if it has one open, else on its WebSocket if connected; and keeps it in the
    /// bounded history.
    pub fn post_chat(&mut self, record: ChatRecord, history: usize, out: &mut VecDeque<Output>) {
        for viewer in &self.participants {
            let Some(msg) = record.seen_by(viewer.role).map(ServerMsg::Chat) else {
                continue;
            };
            if viewer.chat_channel {
                out.push_back(Output::ChatOnChannel {
                    session: self.id.clone(),
                    participant: viewer.id.clone(),
                    msg,
                });
            } else if let Some(conn) = viewer.conn {
                out.push_back(Output::Send { conn, msg });
            }
        }
        out.push_back(Output::Media(MediaEvent::Record {
            session: self.id.clone(),
            entry: RecordEntry::Chat(rec::ChatRecord {
                participant_id: record.from.as_str().to_owned(),
                name: record.from_name.clone(),
                role: record.from_role,
                masked: record.from_hidden_from_customer,
                audience: record.audience,
                text: record.text.clone(),
            }),
        }));
        self.chat.push_back(record);
        while self.chat.len() > history {
            self.chat.pop_front();
        }
    }

    /// `agent_share` as `viewer` may see it: the sharer named only if `viewer` may know
    /// it exists (the masking rule of [`Participant::visible_to`]).
    pub fn share_msg(sharer: &Participant, active: bool, viewer: Role) -> ServerMsg {
        ServerMsg::AgentShare {
            active,
            by: sharer
                .visible_to(viewer)
                .then(|| sharer.id.as_str().to_owned()),
        }
    }

    /// Tells every connected participant that `sharer` started (`active`) or stopped
    /// sharing its screen, each trimmed to what it may see of the sharer.
    pub fn announce_share(&self, sharer: &Participant, active: bool, out: &mut VecDeque<Output>) {
        for viewer in &self.participants {
            if let Some(conn) = viewer.conn {
                out.push_back(Output::Send {
                    conn,
                    msg: Self::share_msg(sharer, active, viewer.role),
                });
            }
        }
    }

    /// Sends `msg` to every connected agent and supervisor (never the customer).
    pub fn tell_agents(&self, msg: &ServerMsg, out: &mut VecDeque<Output>) {
        for p in &self.participants {
            if p.role == Role::Customer {
                continue;
            }
            if let Some(conn) = p.conn {
                out.push_back(Output::Send {
                    conn,
                    msg: msg.clone(),
                });
            }
        }
    }
}
