//! The sans-IO file-transfer core of one session: who may send a file to whom, which
//! receivers take it, and how far a sender may run ahead of its slowest receiver.
//!
//! [`Transfers`] knows nothing of data channels, tokio or clocks. The shell decodes
//! each message of a participant's `files` data channel ([`relay_codec::files`]) and
//! hands it in with [`Transfers::handle`]; the core answers with messages to send on
//! participants' channels ([`TransferOutput::Send`]) and statistics. A `Chunk`'s data
//! is one [`bytes::Bytes`]; every receiver's `Send` holds a clone of it (a reference
//! count), never a copy.
//!
//! # Run-loop contract
//!
//! The shell owns one `Transfers` per session and:
//!
//! 1. mirrors the session core's roster with [`Transfers::set_member`] (on join and on
//!    every role or permission change) and [`Transfers::remove_member`] (on leave), and
//!    the `files` channels with [`Transfers::channel_opened`] and
//!    [`Transfers::channel_closed`];
//! 2. calls [`Transfers::handle`] with `now` for every decoded message;
//! 3. after each of those, drains [`Transfers::poll_output`] until it returns `None`,
//!    queueing every [`TransferOutput::Send`] on its participant's channel, in order,
//!    counting every [`TransferOutput::Stat`] and logging every [`TransferOutput::Event`]
//!    (into the session's recording);
//! 4. asks [`Transfers::poll_timeout`] for the next deadline and calls
//!    [`Transfers::handle_timeout`] when it passes (and drains outputs again).
//!
//! # The rules
//!
//! - **Who sends to whom.** The customer offers files to the agents (host and invited
//!   agents with an open `files` channel; supervisors monitor silently and get none).
//!   The host and agents with `control` offer files to the customer. A `view` agent's or
//!   a supervisor's offer is refused with `Cancel{forbidden}`; an agent that loses
//!   `control` mid-transfer has its transfers to the customer cancelled the same way.
//! - **No identity.** Offers carry no sender; each receiver gets its own transfer id
//!   (relay-chosen, [`TransferId::RELAY_BIT`] set, counted per receiver), so nothing
//!   tells the customer which agent (masked or not) sends, or how many agents received
//!   its own files.
//! - **Offer rate.** Each participant may offer files at most as fast as
//!   [`TransferSettings::offer_rate`] allows (a token bucket); an offer over it is
//!   refused with `Cancel{rate_limited}` and reaches nobody, so a flood of offers
//!   cannot fill the receivers' queues.
//! - **Names.** An offer whose name (or MIME type) could spoof or hide text (control, bidi-control,
//!   tag or other invisible format characters, or nothing visible: see
//!   [`crate::text`]) is refused with `Cancel{bad_name}`: receivers see names as sent.
//! - **Size.** An offer above [`TransferSettings::max_file_bytes`] is refused with
//!   `Cancel{too_large}`. Completion checks that exactly the offered bytes were sent.
//! - **Answers.** Every receiver accepts or declines on its own. The sender hears
//!   `Accept` once every receiver has answered and at least one accepted, `Decline` if
//!   all declined. Receivers that have not answered within
//!   [`TransferSettings::answer_timeout`] get `Cancel{timeout}` and the transfer starts
//!   with those who accepted. So one hesitant agent delays the others by at most that
//!   long, and no chunk is ever sent that some receiver would miss.
//! - **Flow control and memory.** Each accepting receiver reports with `Credit` how far
//!   it has consumed the file; the sender is told the minimum over its receivers, and may
//!   send at most [`TransferSettings::window`] bytes, in at most
//!   [`TransferSettings::max_chunks_in_flight`] chunks, beyond it. Chunks must come in
//!   order, within the offered size, after `Accept`. Any violation cancels the transfer
//!   for everyone with a reason (`window_exceeded`, `out_of_order`, `past_size`,
//!   `protocol_error`); chunks for an unknown id get `Cancel{unknown_transfer}`. So the
//!   bytes the relay holds for one transfer (in its queues and the SCTP send buffers)
//!   stay below about one window per receiver, whatever the peers do.
//! - **Departures.** A receiver that leaves (or closes its channel) cancels its part; if
//!   it was the last, the sender gets `Cancel{receiver_left}`. A sender that leaves
//!   cancels the transfer for every receiver (`Cancel{sender_left}`).

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_codec::files::{CancelReason, FileMsg, TransferId};
use relay_codec::wire::{Permission, Role};

use crate::rate_limit::{RateLimit, RateLimits, TokenBucket};
use crate::session::ParticipantId;

/// Bytes a sender may send beyond its slowest receiver's credit, by default.
pub const DEFAULT_WINDOW: u64 = 256 * 1024;

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct TransferSettings {
    /// Largest file that may be offered (`limits.max_file_bytes`).
    pub max_file_bytes: u64,
    /// Bytes a sender may send beyond the slowest receiver's credit.
    pub window: u64,
    /// Chunks a sender may have beyond the slowest receiver's credit (so tiny chunks
    /// cannot pile up message overhead within the window).
    pub max_chunks_in_flight: usize,
    /// How long receivers have to accept or decline an offer.
    pub answer_timeout: Duration,
    /// Transfers one participant may be sending at once.
    pub max_open_per_sender: usize,
    /// How fast one participant may offer files (`rate_limits.file_offer`): each offer
    /// reaches every receiver, so a flood of offers would fill their queues.
    pub offer_rate: RateLimit,
}

impl Default for TransferSettings {
    /// 100 MiB files, a 256 KiB window of at most 64 chunks, 60 s to answer, 4 transfers
    /// per sender.
    fn default() -> Self {
        TransferSettings {
            max_file_bytes: 100 * 1024 * 1024,
            window: DEFAULT_WINDOW,
            max_chunks_in_flight: 64,
            answer_timeout: Duration::from_secs(60),
            max_open_per_sender: 4,
            offer_rate: RateLimits::default().file_offer,
        }
    }
}

/// Something the shell must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferOutput {
    /// Queue `msg` on `to`'s `files` channel.
    Send {
        /// The participant.
        to: ParticipantId,
        /// What to send.
        msg: FileMsg,
    },
    /// Count something.
    Stat(TransferStat),
    /// Log something (the session's recording keeps these).
    Event(TransferEvent),
}

/// A file offered to a receiver, or one receiver's part of it ended: what the
/// session's recording keeps of file transfers (never the contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferEvent {
    /// Who offered the file.
    pub sender: ParticipantId,
    /// The receiver this is about; `None` when the offer was refused before any.
    pub receiver: Option<ParticipantId>,
    /// The file, as offered.
    pub file: FileInfo,
    /// `None`: offered to `receiver`; else how it ended.
    pub outcome: Option<Outcome>,
}

/// A file as its sender offered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it goes from an agent to the customer (else the other way).
    pub to_customer: bool,
}

/// Countable events, for `relay_file_transfers_total` and
/// `relay_file_bytes_forwarded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStat {
    /// One receiver's part of a transfer ended (or an offer was refused, once).
    Outcome(Outcome),
    /// Chunk bytes queued for receivers (counted once per receiver).
    Forwarded(u64),
}

/// How a transfer ended for one receiver, or why an offer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Every byte was forwarded and `Complete` passed on.
    Completed,
    /// The receiver declined.
    Declined,
    /// Cancelled by a person, a departure or an unanswered offer.
    Cancelled,
    /// The sender may not send in that direction.
    RefusedForbidden,
    /// The offer was above `limits.max_file_bytes`.
    RefusedTooLarge,
    /// The offered name could spoof or hide text ([`crate::text::check_file_name`]).
    RefusedBadName,
    /// Nobody had an open `files` channel to receive it.
    NoReceivers,
    /// The sender broke the protocol (window, order, size, ids).
    ProtocolError,
    /// The sender offered faster than `rate_limits.file_offer` allows.
    RateLimited,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Completed,
        Outcome::Declined,
        Outcome::Cancelled,
        Outcome::RefusedForbidden,
        Outcome::RefusedTooLarge,
        Outcome::RefusedBadName,
        Outcome::NoReceivers,
        Outcome::ProtocolError,
        Outcome::RateLimited,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Declined => "declined",
            Outcome::Cancelled => "cancelled",
            Outcome::RefusedForbidden => "refused_forbidden",
            Outcome::RefusedTooLarge => "refused_too_large",
            Outcome::RefusedBadName => "refused_bad_name",
            Outcome::NoReceivers => "no_receivers",
            Outcome::ProtocolError => "protocol_error",
            Outcome::RateLimited => "rate_limited",
        }
    }
}

/// A participant as the core needs it.
#[derive(Debug)]
struct Member {
    role: Role,
    permission: Permission,
    /// Whether its `files` channel is open.
    open: bool,
    /// The next relay-chosen id for a transfer it receives (without the relay bit).
    next_id: u32,
    /// Its budget of offers.
    offers: TokenBucket,
}

impl Member {
    fn may_send(&self) -> bool {
        match self.role {
            Role::Customer | Role::Host => true,
            Role::Agent => self.permission == Permission::Control,
            Role::Supervisor => false,
        }
    }
}

/// A transfer, keyed by its sender and the sender's id.
type Key = (ParticipantId, TransferId);

/// One receiver's part of a transfer.
#[derive(Debug)]
struct Leg {
    to: ParticipantId,
    /// The id this receiver knows the transfer by.
    id: TransferId,
    accepted: bool,
    /// Bytes it has consumed (its last credit).
    consumed: u64,
}

#[derive(Debug)]
struct Transfer {
    file: FileInfo,
    /// Bytes forwarded so far: the offset the next chunk must start at.
    sent: u64,
    /// Whether the sender was told `Accept`.
    started: bool,
    /// When unanswered receivers are given up (before the start).
    deadline: Instant,
    /// Receivers that declined.
    declined: usize,
    legs: Vec<Leg>,
    /// End offsets of the chunks beyond the slowest receiver's credit.
    in_flight: VecDeque<u64>,
    /// The credit last told to the sender.
    credited: u64,
}

impl Transfer {
    /// The slowest accepting receiver's credit.
    fn floor(&self) -> u64 {
        self.legs
            .iter()
            .filter(|l| l.accepted)
            .map(|l| l.consumed)
            .min()
            .unwrap_or(0)
    }
}

/// The file transfers of one session. See the module docs for how to drive it.
#[derive(Debug)]
pub struct Transfers {
    settings: TransferSettings,
    members: BTreeMap<ParticipantId, Member>,
    transfers: BTreeMap<Key, Transfer>,
    /// A receiver's id of a transfer → the transfer.
    legs: HashMap<(ParticipantId, TransferId), Key>,
    outputs: VecDeque<TransferOutput>,
}

impl Transfers {
    /// A core with no member yet.
    pub fn new(settings: TransferSettings) -> Transfers {
        Transfers {
            settings,
            members: BTreeMap::new(),
            transfers: BTreeMap::new(),
            legs: HashMap::new(),
            outputs: VecDeque::new(),
        }
    }

    // ----- getters -------------------------------------------------------------------

    /// The settings in force.
    pub fn settings(&self) -> &TransferSettings {
        &self.settings
    }

    /// Transfers offered or under way.
    pub fn open_transfers(&self) -> usize {
        self.transfers.len()
    }

    // ----- roster and channels -------------------------------------------------------

    /// A participant is in the session with these rights (on join and every change).
    /// An agent that may no longer send has its transfers cancelled (`forbidden`).
    pub fn set_member(
        &mut self,
        _now: Instant,
        pid: &ParticipantId,
        role: Role,
        permission: Permission,
    ) {
        let offer_rate = self.settings.offer_rate;
        let member = self.members.entry(pid.clone()).or_insert_with(|| Member {
            role,
            permission,
            open: false,
            next_id: 1,
            offers: TokenBucket::new(offer_rate),
        });
        member.role = role;
        member.permission = permission;
        if !member.may_send() {
            for key in self.sent_by(pid) {
                self.abort(&key, CancelReason::Forbidden, Outcome::RefusedForbidden);
            }
        }
    }

    /// A participant left the session: as [`Transfers::channel_closed`], and forgotten.
    pub fn remove_member(&mut self, now: Instant, pid: &ParticipantId) {
        self.channel_closed(now, pid);
        self.members.remove(pid);
    }

    /// A participant's `files` channel opened. Ignored for a participant that is not a
    /// member (yet).
    pub fn channel_opened(&mut self, pid: &ParticipantId) {
        if let Some(m) = self.members.get_mut(pid) {
            m.open = true;
        }
    }

    /// A participant's `files` channel closed: what it sends is cancelled for every
    /// receiver, what it receives is cancelled for it.
    pub fn channel_closed(&mut self, _now: Instant, pid: &ParticipantId) {
        if let Some(m) = self.members.get_mut(pid) {
            m.open = false;
        }
        for key in self.sent_by(pid) {
            if let Some(t) = self.remove_transfer(&key) {
                for leg in &t.legs {
                    self.send(&leg.to, cancel(leg.id, CancelReason::SenderLeft));
                    self.ended(&key.0, &t.file, &leg.to, Outcome::Cancelled);
                }
            }
        }
        let receiving: Vec<(TransferId, Key)> = self
            .legs
            .iter()
            .filter(|((to, _), _)| to == pid)
            .map(|((_, id), key)| (*id, key.clone()))
            .collect();
        for (id, key) in receiving {
            self.leg_ended(pid, id, &key, Outcome::Cancelled);
            self.settle(&key, CancelReason::ReceiverLeft);
        }
    }

    // ----- messages ------------------------------------------------------------------

    /// A message from `from`'s `files` channel. Messages from a participant whose
    /// channel the core does not know as open are ignored.
    pub fn handle(&mut self, now: Instant, from: &ParticipantId, msg: FileMsg) {
        if !self.members.get(from).is_some_and(|m| m.open) {
            return;
        }
        // Ids say which side chose them: senders' messages name their own ids,
        // receivers' messages the relay's. Anything else is dropped and counted (a reply
        // would name an id the peer means differently).
        let relay_id = msg.id().is_relay_chosen();
        let from_receiver = matches!(
            msg,
            FileMsg::Accept { .. } | FileMsg::Decline { .. } | FileMsg::Credit { .. }
        );
        let from_sender = matches!(
            msg,
            FileMsg::Offer { .. } | FileMsg::Chunk { .. } | FileMsg::Complete { .. }
        );
        if (from_receiver && !relay_id) || (from_sender && relay_id) {
            self.stat(Outcome::ProtocolError);
            return;
        }
        match msg {
            FileMsg::Offer {
                id,
                size,
                name,
                mime,
            } => self.offer(now, from, id, size, name, mime),
            FileMsg::Chunk { id, offset, data } => self.chunk(from, id, offset, data),
            FileMsg::Complete { id, sha256 } => self.complete(from, id, sha256),
            FileMsg::Accept { id } => self.answer(from, id, true),
            FileMsg::Decline { id } => self.answer(from, id, false),
            FileMsg::Credit { id, consumed } => self.credit(from, id, consumed),
            FileMsg::Cancel { id, .. } if relay_id => {
                let Some(key) = self.legs.get(&(from.clone(), id)).cloned() else {
                    return;
                };
                self.leg_ended(from, id, &key, Outcome::Cancelled);
                self.settle(&key, CancelReason::Cancelled);
            }
            FileMsg::Cancel { id, .. } => {
                if let Some(t) = self.remove_transfer(&(from.clone(), id)) {
                    for leg in &t.legs {
                        self.send(&leg.to, cancel(leg.id, CancelReason::Cancelled));
                        self.ended(from, &t.file, &leg.to, Outcome::Cancelled);
                    }
                }
            }
        }
    }

    // ----- timers and outputs --------------------------------------------------------

    /// When the next offer runs out of answer time, if any waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.transfers
            .values()
            .filter(|t| !t.started)
            .map(|t| t.deadline)
            .min()
    }

    /// Gives up on receivers that did not answer in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<Key> = self
            .transfers
            .iter()
            .filter(|(_, t)| !t.started && t.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let silent: Vec<(ParticipantId, TransferId)> = self.transfers[&key]
                .legs
                .iter()
                .filter(|l| !l.accepted)
                .map(|l| (l.to.clone(), l.id))
                .collect();
            for (to, id) in silent {
                self.leg_ended(&to, id, &key, Outcome::Cancelled);
                self.send(&to, cancel(id, CancelReason::Timeout));
            }
            self.settle(&key, CancelReason::Timeout);
        }
    }

    /// The next thing to do, in order.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<TransferOutput> {
        self.outputs.pop_front()
    }

    // ----- internals -----------------------------------------------------------------

    fn offer(
        &mut self,
        now: Instant,
        from: &ParticipantId,
        id: TransferId,
        size: u64,
        name: String,
        mime: Option<String>,
    ) {
        let key = (from.clone(), id);
        if self.transfers.contains_key(&key) {
            // The sender reused a live id: both are void.
            self.abort(&key, CancelReason::ProtocolError, Outcome::ProtocolError);
            return;
        }
        let Some(sender) = self.members.get_mut(from) else {
            return;
        };
        if !sender.offers.try_take(now) {
            // Refused before anything happened: counted, not logged (a flood of offers
            // must not flood the recording either).
            return self.refuse(from, id, CancelReason::RateLimited, Outcome::RateLimited);
        }
        let (may_send, to_agents) = (sender.may_send(), sender.role == Role::Customer);
        let file = FileInfo {
            name,
            size,
            to_customer: !to_agents,
        };
        if !may_send {
            let o = Outcome::RefusedForbidden;
            return self.refuse_offer(from, id, file, CancelReason::Forbidden, o);
        }
        if size > self.settings.max_file_bytes {
            let o = Outcome::RefusedTooLarge;
            return self.refuse_offer(from, id, file, CancelReason::TooLarge, o);
        }
        // The MIME type is shown next to the name: the same rules.
        let bad_mime = mime
            .as_deref()
            .is_some_and(|m| crate::text::check_file_name(m).is_err());
        if crate::text::check_file_name(&file.name).is_err() || bad_mime {
            let o = Outcome::RefusedBadName;
            return self.refuse_offer(from, id, file, CancelReason::BadName, o);
        }
        if self.sent_by(from).len() >= self.settings.max_open_per_sender {
            let o = Outcome::ProtocolError;
            return self.refuse_offer(from, id, file, CancelReason::ProtocolError, o);
        }
        let receivers: Vec<ParticipantId> = self
            .members
            .iter()
            .filter(|(pid, m)| {
                *pid != from
                    && m.open
                    && if to_agents {
                        matches!(m.role, Role::Host | Role::Agent)
                    } else {
                        m.role == Role::Customer
                    }
            })
            .map(|(pid, _)| pid.clone())
            .collect();
        if receivers.is_empty() {
            let o = Outcome::NoReceivers;
            return self.refuse_offer(from, id, file, CancelReason::NoReceivers, o);
        }
        let mut legs = Vec::with_capacity(receivers.len());
        for to in receivers {
            let leg_id = self.next_id(&to);
            self.legs.insert((to.clone(), leg_id), key.clone());
            self.send(
                &to,
                FileMsg::Offer {
                    id: leg_id,
                    size,
                    name: file.name.clone(),
                    mime: mime.clone(),
                },
            );
            self.event(from, &file, Some(&to), None);
            legs.push(Leg {
                to,
                id: leg_id,
                accepted: false,
                consumed: 0,
            });
        }
        self.transfers.insert(
            key,
            Transfer {
                file,
                sent: 0,
                started: false,
                deadline: now + self.settings.answer_timeout,
                declined: 0,
                legs,
                in_flight: VecDeque::new(),
                credited: 0,
            },
        );
    }

    fn answer(&mut self, from: &ParticipantId, id: TransferId, accept: bool) {
        let Some(key) = self.legs.get(&(from.clone(), id)).cloned() else {
            return;
        };
        let Some(t) = self.transfers.get_mut(&key) else {
            return;
        };
        let Some(leg) = t.legs.iter_mut().find(|l| l.id == id && l.to == *from) else {
            return;
        };
        if leg.accepted {
            return;
        }
        if accept {
            leg.accepted = true;
        } else {
            t.declined += 1;
            self.leg_ended(from, id, &key, Outcome::Declined);
        }
        self.settle(&key, CancelReason::Cancelled);
    }

    fn chunk(&mut self, from: &ParticipantId, id: TransferId, offset: u64, data: Bytes) {
        let key = (from.clone(), id);
        let (window, max_chunks) = (self.settings.window, self.settings.max_chunks_in_flight);
        let Some(t) = self.transfers.get_mut(&key) else {
            return self.refuse(
                from,
                id,
                CancelReason::UnknownTransfer,
                Outcome::ProtocolError,
            );
        };
        let len = data.len() as u64;
        let end = offset.saturating_add(len);
        let refusal = if !t.started {
            Some(CancelReason::ProtocolError)
        } else if offset != t.sent {
            Some(CancelReason::OutOfOrder)
        } else if end > t.file.size {
            Some(CancelReason::PastSize)
        } else if end > t.floor().saturating_add(window) || t.in_flight.len() >= max_chunks {
            Some(CancelReason::WindowExceeded)
        } else {
            t.sent = end;
            t.in_flight.push_back(end);
            None
        };
        let receivers: Vec<(ParticipantId, TransferId)> =
            t.legs.iter().map(|l| (l.to.clone(), l.id)).collect();
        if let Some(reason) = refusal {
            return self.abort(&key, reason, Outcome::ProtocolError);
        }
        let forwarded = len * receivers.len() as u64;
        for (to, leg_id) in receivers {
            self.send(
                &to,
                FileMsg::Chunk {
                    id: leg_id,
                    offset,
                    data: data.clone(),
                },
            );
        }
        self.outputs
            .push_back(TransferOutput::Stat(TransferStat::Forwarded(forwarded)));
    }

    fn complete(&mut self, from: &ParticipantId, id: TransferId, sha256: [u8; 32]) {
        let key = (from.clone(), id);
        let Some(t) = self.transfers.get(&key) else {
            return self.refuse(
                from,
                id,
                CancelReason::UnknownTransfer,
                Outcome::ProtocolError,
            );
        };
        if !t.started {
            return self.abort(&key, CancelReason::ProtocolError, Outcome::ProtocolError);
        }
        if t.sent != t.file.size {
            return self.abort(&key, CancelReason::Incomplete, Outcome::ProtocolError);
        }
        if let Some(t) = self.remove_transfer(&key) {
            for leg in &t.legs {
                self.send(&leg.to, FileMsg::Complete { id: leg.id, sha256 });
                self.ended(from, &t.file, &leg.to, Outcome::Completed);
            }
        }
    }

    fn credit(&mut self, from: &ParticipantId, id: TransferId, consumed: u64) {
        let Some(key) = self.legs.get(&(from.clone(), id)).cloned() else {
            return;
        };
        let Some(t) = self.transfers.get_mut(&key) else {
            return;
        };
        let sent = t.sent;
        let Some(leg) = t.legs.iter_mut().find(|l| l.id == id && l.to == *from) else {
            return;
        };
        // A receiver cannot have consumed what was never sent; credits never go back.
        let consumed = consumed.min(sent);
        if !leg.accepted || consumed <= leg.consumed {
            return;
        }
        leg.consumed = consumed;
        self.update_credit(&key);
    }

    /// Tells the sender when the slowest receiver's credit moved on.
    fn update_credit(&mut self, key: &Key) {
        let Some(t) = self.transfers.get_mut(key) else {
            return;
        };
        if !t.started {
            return;
        }
        let floor = t.floor();
        while t.in_flight.front().is_some_and(|end| *end <= floor) {
            t.in_flight.pop_front();
        }
        if floor > t.credited {
            t.credited = floor;
            let msg = FileMsg::Credit {
                id: key.1,
                consumed: floor,
            };
            self.send(&key.0, msg);
        }
    }

    /// After a receiver answered or left: ends a transfer nobody receives any more
    /// (telling the sender `Decline`, or `Cancel{reason}`), starts one every remaining
    /// receiver accepted, and moves the credit on if the slowest receiver went.
    fn settle(&mut self, key: &Key, reason: CancelReason) {
        let Some(t) = self.transfers.get_mut(key) else {
            return;
        };
        if t.legs.is_empty() {
            let declined = !t.started && t.declined > 0;
            self.remove_transfer(key);
            let msg = if declined {
                FileMsg::Decline { id: key.1 }
            } else {
                cancel(key.1, reason)
            };
            return self.send(&key.0, msg);
        }
        if !t.started && t.legs.iter().all(|l| l.accepted) {
            t.started = true;
            return self.send(&key.0, FileMsg::Accept { id: key.1 });
        }
        self.update_credit(key);
    }

    /// Cancels a transfer for its sender and every receiver, counting `outcome` once
    /// per receiver.
    fn abort(&mut self, key: &Key, reason: CancelReason, outcome: Outcome) {
        let Some(t) = self.remove_transfer(key) else {
            return;
        };
        self.send(&key.0, cancel(key.1, reason));
        for leg in &t.legs {
            self.send(&leg.to, cancel(leg.id, reason));
            self.ended(&key.0, &t.file, &leg.to, outcome);
        }
    }

    /// Refuses an offer: no receiver gets it.
    fn refuse_offer(
        &mut self,
        from: &ParticipantId,
        id: TransferId,
        file: FileInfo,
        reason: CancelReason,
        outcome: Outcome,
    ) {
        self.refuse(from, id, reason, outcome);
        self.event(from, &file, None, Some(outcome));
    }

    /// Refuses a message about `id` that has no transfer (or gets none).
    fn refuse(&mut self, to: &ParticipantId, id: TransferId, reason: CancelReason, o: Outcome) {
        self.send(to, cancel(id, reason));
        self.stat(o);
    }

    fn remove_transfer(&mut self, key: &Key) -> Option<Transfer> {
        let t = self.transfers.remove(key)?;
        for leg in &t.legs {
            self.legs.remove(&(leg.to.clone(), leg.id));
        }
        Some(t)
    }

    /// One receiver's part of a transfer that goes on for the others ended.
    fn leg_ended(&mut self, to: &ParticipantId, id: TransferId, key: &Key, outcome: Outcome) {
        self.legs.remove(&(to.clone(), id));
        let Some(t) = self.transfers.get_mut(key) else {
            return self.stat(outcome);
        };
        t.legs.retain(|l| !(l.id == id && l.to == *to));
        let file = t.file.clone();
        self.ended(&key.0, &file, to, outcome);
    }

    /// Transfers `pid` is sending.
    fn sent_by(&self, pid: &ParticipantId) -> Vec<Key> {
        self.transfers
            .keys()
            .filter(|(sender, _)| sender == pid)
            .cloned()
            .collect()
    }

    /// A fresh relay-chosen id for a transfer `to` receives.
    fn next_id(&mut self, to: &ParticipantId) -> TransferId {
        let Some(m) = self.members.get_mut(to) else {
            return TransferId(TransferId::RELAY_BIT);
        };
        loop {
            let id = TransferId(TransferId::RELAY_BIT | m.next_id);
            m.next_id = (m.next_id + 1) & !TransferId::RELAY_BIT;
            if !self.legs.contains_key(&(to.clone(), id)) {
                return id;
            }
        }
    }

    fn send(&mut self, to: &ParticipantId, msg: FileMsg) {
        self.outputs.push_back(TransferOutput::Send {
            to: to.clone(),
            msg,
        });
    }

    fn stat(&mut self, outcome: Outcome) {
        self.outputs
            .push_back(TransferOutput::Stat(TransferStat::Outcome(outcome)));
    }

    /// `to`'s part of `sender`'s transfer of `file` ended: counted and logged.
    fn ended(&mut self, sender: &ParticipantId, file: &FileInfo, to: &ParticipantId, o: Outcome) {
        self.stat(o);
        self.event(sender, file, Some(to), Some(o));
    }

    fn event(
        &mut self,
        sender: &ParticipantId,
        file: &FileInfo,
        receiver: Option<&ParticipantId>,
        outcome: Option<Outcome>,
    ) {
        self.outputs.push_back(TransferOutput::Event(TransferEvent {
            sender: sender.clone(),
            receiver: receiver.cloned(),
            file: file.clone(),
            outcome,
        }));
    }
}

fn cancel(id: TransferId, reason: CancelReason) -> FileMsg {
    FileMsg::Cancel { id, reason }
}
