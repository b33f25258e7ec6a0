//! The sans-IO routing table of the UDP mux: which peer connection a datagram that
//! arrived on the shared port belongs to.
//!
//! No sockets and no clock of its own: the shell calls
//!
//! - [`Demux::register`] when a peer connection's virtual socket comes up (with the local
//!   ICE username fragment the relay chose for it) and [`Demux::forget`] when its last
//!   virtual socket is gone;
//! - [`Demux::route`] with each received datagram and the current `Instant`, and delivers
//!   or drops it as told;
//! - [`Demux::on_send`] with each datagram a peer connection sends, so that answers to the
//!   relay's own connectivity checks find their way back.
//!
//! Routing rules, in order:
//!
//! 1. A STUN Binding request carries `USERNAME` = `<relay ufrag>:<client ufrag>`
//!    (RFC 8445 §7.2.2): it goes to the peer connection whose ufrag that is, whatever
//!    address it came from, and that address is learned for that peer connection (moved
//!    from any other one: one remote address is one ICE endpoint).
//! 2. A STUN response whose transaction id is one the relay sent to that very address
//!    goes to the peer connection that sent it, and the address is learned.
//! 3. Everything else (DTLS, SRTP/SRTCP, STUN indications, unmatched responses) goes by
//!    the sender's address alone; an address no check ever taught is dropped.
//!
//! The table never checks MESSAGE-INTEGRITY: the peer connection's ICE agent does. A
//! request that names a ufrag can only steer its own source address, and ufrags are
//! random and only ever sent to their client over TLS.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A peer connection as the mux knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PcId(pub u64);

/// What to do with a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Hand it to this peer connection.
    Deliver(PcId),
    /// Drop it, and count why.
    Drop(DropReason),
}

/// Why a datagram was dropped (`reason` label of
/// `relay_udp_mux_datagrams_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A Binding request for a ufrag no peer connection has.
    UnknownUfrag,
    /// Not a Binding request, from an address no check taught.
    UnknownSender,
    /// The peer connection's receive queue was full.
    QueueFull,
    /// The shared socket's send buffer was full.
    SendBufferFull,
}

impl DropReason {
    /// Every reason, for pre-creating the metric's labels.
    pub const ALL: [DropReason; 4] = [
        DropReason::UnknownUfrag,
        DropReason::UnknownSender,
        DropReason::QueueFull,
        DropReason::SendBufferFull,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownUfrag => "unknown_ufrag",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::QueueFull => "queue_full",
            DropReason::SendBufferFull => "send_buffer_full",
        }
    }
}

/// A peer connection's ufrag is already another's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ICE ufrag already in use by another peer connection on the UDP mux")]
pub struct UfragInUse;

/// Bounds of the table.
#[derive(Debug, Clone)]
pub struct DemuxLimits {
    /// Remote addresses remembered per peer connection (the oldest is forgotten first).
    pub addrs_per_pc: usize,
    /// Outstanding connectivity checks remembered per peer connection.
    pub transactions_per_pc: usize,
    /// How long a check's transaction id is remembered.
    pub transaction_ttl: Duration,
}

impl Default for DemuxLimits {
    fn default() -> Self {
        DemuxLimits {
            // A client rarely has more than a handful of candidates that reach us.
            addrs_per_pc: 16,
            transactions_per_pc: 256,
            // ICE gives up on a check long before this.
            transaction_ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Debug)]
struct Pc {
    ufrag: String,
    /// Learned remote addresses, oldest first.
    addrs: VecDeque<SocketAddr>,
    transactions: usize,
}

#[derive(Debug)]
struct Transaction {
    pc: PcId,
    to: SocketAddr,
    expires: Instant,
}

/// The routing table. See the module docs for the rules.
#[derive(Debug, Default)]
pub struct Demux {
    limits: DemuxLimits,
    pcs: HashMap<PcId, Pc>,
    by_ufrag: HashMap<String, PcId>,
    by_addr: HashMap<SocketAddr, PcId>,
    transactions: HashMap<[u8; 12], Transaction>,
}

impl Demux {
    /// An empty table.
    pub fn new(limits: DemuxLimits) -> Demux {
        Demux {
            limits,
            ..Demux::default()
        }
    }

    /// Routes Binding requests for `ufrag` to `pc` from now on. Registering the same pair
    /// again is a no-op.
    pub fn register(&mut self, pc: PcId, ufrag: &str) -> Result<(), UfragInUse> {
        match self.by_ufrag.get(ufrag) {
            Some(owner) if *owner == pc => return Ok(()),
            Some(_) => return Err(UfragInUse),
            None => {}
        }
        if let Some(old) = self.pcs.get(&pc) {
            // A peer connection has one ufrag; a new one replaces it.
            self.by_ufrag.remove(&old.ufrag);
        }
        self.by_ufrag.insert(ufrag.to_owned(), pc);
        self.pcs
            .entry(pc)
            .and_modify(|p| p.ufrag = ufrag.to_owned())
            .or_insert_with(|| Pc {
                ufrag: ufrag.to_owned(),
                addrs: VecDeque::new(),
                transactions: 0,
            });
        Ok(())
    }

    /// Forgets a peer connection: its ufrag, the addresses it learned and its checks.
    pub fn forget(&mut self, pc: PcId) {
        let Some(entry) = self.pcs.remove(&pc) else {
            return;
        };
        self.by_ufrag.remove(&entry.ufrag);
        for addr in entry.addrs {
            if self.by_addr.get(&addr) == Some(&pc) {
                self.by_addr.remove(&addr);
            }
        }
        if entry.transactions > 0 {
            self.transactions.retain(|_, t| t.pc != pc);
        }
    }

    /// Peer connections registered.
    pub fn len(&self) -> usize {
        self.pcs.len()
    }

    /// Whether no peer connection is registered.
    pub fn is_empty(&self) -> bool {
        self.pcs.is_empty()
    }

    /// Where the datagram `data` from `from` goes.
    pub fn route(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> Route {
        match Stun::peek(data) {
            Some(Stun::Request {
                username: Some(username),
                ..
            }) => {
                let local = username.split(|b| *b == b':').next().unwrap_or(&[]);
                let pc = std::str::from_utf8(local)
                    .ok()
                    .and_then(|u| self.by_ufrag.get(u))
                    .copied();
                match pc {
                    Some(pc) => {
                        self.learn(pc, from);
                        Route::Deliver(pc)
                    }
                    None => Route::Drop(DropReason::UnknownUfrag),
                }
            }
            Some(Stun::Response { transaction }) => {
                match self.transactions.remove(&transaction) {
                    Some(t) if t.to == from && t.expires > now => {
                        if let Some(p) = self.pcs.get_mut(&t.pc) {
                            p.transactions = p.transactions.saturating_sub(1);
                        }
                        self.learn(t.pc, from);
                        Route::Deliver(t.pc)
                    }
                    Some(t) => {
                        // Not the address the check went to, or too late: not an answer
                        // to it. Put it back for the real one, if still current.
                        if t.expires > now {
                            self.transactions.insert(transaction, t);
                        } else if let Some(p) = self.pcs.get_mut(&t.pc) {
                            p.transactions = p.transactions.saturating_sub(1);
                        }
                        self.by_sender(from)
                    }
                    None => self.by_sender(from),
                }
            }
            _ => self.by_sender(from),
        }
    }

    /// Notes a datagram `pc` sends to `to`: a Binding request's transaction id is
    /// remembered so that its response is routed back to `pc`.
    pub fn on_send(&mut self, now: Instant, pc: PcId, to: SocketAddr, data: &[u8]) {
        let Some(Stun::Request { transaction, .. }) = Stun::peek(data) else {
            return;
        };
        let Some(entry) = self.pcs.get(&pc) else {
            return;
        };
        if entry.transactions >= self.limits.transactions_per_pc {
            self.expire(now);
            if self
                .pcs
                .get(&pc)
                .is_none_or(|p| p.transactions >= self.limits.transactions_per_pc)
            {
                // Still full: this check's answer will have to come by address.
                return;
            }
        }
        let previous = self.transactions.insert(
            transaction,
            Transaction {
                pc,
                to,
                expires: now + self.limits.transaction_ttl,
            },
        );
        if let Some(p) = previous.and_then(|prev| self.pcs.get_mut(&prev.pc)) {
            // A retransmission reuses its transaction id.
            p.transactions = p.transactions.saturating_sub(1);
        }
        if let Some(p) = self.pcs.get_mut(&pc) {
            p.transactions += 1;
        }
    }

    fn by_sender(&self, from: SocketAddr) -> Route {
        match self.by_addr.get(&from) {
            Some(pc) => Route::Deliver(*pc),
            None => Route::Drop(DropReason::UnknownSender),
        }
    }

    fn learn(&mut self, pc: PcId, addr: SocketAddr) {
        match self.by_addr.insert(addr, pc) {
            Some(owner) if owner == pc => return,
            Some(owner) => {
                if let Some(p) = self.pcs.get_mut(&owner) {
                    p.addrs.retain(|a| *a != addr);
                }
            }
            None => {}
        }
        let limit = self.limits.addrs_per_pc.max(1);
        let Some(p) = self.pcs.get_mut(&pc) else {
            return;
        };
        p.addrs.push_back(addr);
        while p.addrs.len() > limit {
            let Some(old) = p.addrs.pop_front() else {
                break;
            };
            if self.by_addr.get(&old) == Some(&pc) {
                self.by_addr.remove(&old);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let pcs = &mut self.pcs;
        self.transactions.retain(|_, t| {
            let live = t.expires > now;
            if !live {
                if let Some(p) = pcs.get_mut(&t.pc) {
                    p.transactions = p.transactions.saturating_sub(1);
                }
            }
            live
        });
    }
}

/// The relay's half of the `USERNAME` (`<relay ufrag>:<client ufrag>`) of a STUN
/// request, if `data` is a well-formed one that carries it. ICE-TCP routes a new
/// stream's first frame by it (`super::tcp`), as rule 1 above routes a datagram.
pub(super) fn request_local_ufrag(data: &[u8]) -> Option<&[u8]> {
    match Stun::peek(data)? {
        Stun::Request {
            username: Some(username),
            ..
        } => username.split(|b| *b == b':').next(),
        _ => None,
    }
}

/// What the table needs to know of a STUN message (RFC 8489 §5–6): parsed, never
/// trusted, and `None` for anything that is not well-formed STUN.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stun<'a> {
    Request {
        transaction: [u8; 12],
        username: Option<&'a [u8]>,
    },
    Response {
        transaction: [u8; 12],
    },
    Indication,
}

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;

impl<'a> Stun<'a> {
    fn peek(data: &'a [u8]) -> Option<Stun<'a>> {
        // RFC 7983: STUN is the only protocol on the port whose first byte is 0..=3.
        let header = data.get(..20)?;
        if header[0] & 0xc0 != 0 || header[4..8] != MAGIC_COOKIE {
            return None;
        }
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if length % 4 != 0 {
            return None;
        }
        let body = data.get(20..20 + length)?;
        let mut transaction = [0u8; 12];
        transaction.copy_from_slice(&header[8..20]);
        // The class is bits C1 (0x0100) and C0 (0x0010) of the message type.
        match ((kind >> 7) & 0b10) | ((kind >> 4) & 0b01) {
            0b00 => Some(Stun::Request {
                transaction,
                username: attribute(body, ATTR_USERNAME)?,
            }),
            0b01 => Some(Stun::Indication),
            _ => Some(Stun::Response { transaction }),
        }
    }
}

/// The first attribute of type `wanted`: `Some(None)` when the attributes are well formed
/// but it is absent, `None` when they are not well formed.
fn attribute(mut body: &[u8], wanted: u16) -> Option<Option<&[u8]>> {
    while !body.is_empty() {
        let head = body.get(..4)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = body.get(4..4 + len)?;
        if kind == wanted {
            return Some(Some(value));
        }
        let padded = 4 + len.div_ceil(4) * 4;
        body = body.get(padded..)?;
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// A STUN message of class `class` (0 request, 1 indication, 2 success, 3 error)
    /// with the given transaction id and, if any, a USERNAME.
    fn stun(class: u16, transaction: u8, username: Option<&str>) -> Vec<u8> {
        let kind: u16 = 0x0001 | ((class & 0b10) << 7) | ((class & 0b01) << 4);
        let mut attrs = Vec::new();
        if let Some(u) = username {
            attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
            attrs.extend_from_slice(&(u.len() as u16).to_be_bytes());
            attrs.extend_from_slice(u.as_bytes());
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
        }
        // An attribute after USERNAME, as real checks carry (PRIORITY).
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        let mut m = Vec::new();
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[transaction; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    const DTLS: &[u8] = &[22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0];
    const SRTP: &[u8] = &[0x80, 96, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 9, 9];

    fn table() -> (Demux, Instant) {
        let mut d = Demux::new(DemuxLimits::default());
        d.register(PcId(1), "ufragone").unwrap();
        d.register(PcId(2), "ufragtwo").unwrap();
        (d, Instant::now())
    }

    #[test]
    fn binding_requests_go_by_ufrag_and_teach_the_sender() {
        let (mut d, now) = table();
        // Media from a client nobody has checked yet goes nowhere.
        assert_eq!(
            d.route(now, addr(5000), DTLS),
            Route::Drop(DropReason::UnknownSender)
        );
        let check = stun(0, 7, Some("ufragtwo:clientufrag"));
        assert_eq!(d.route(now, addr(5000), &check), Route::Deliver(PcId(2)));
        // Now DTLS and SRTP from that address follow it; another address still does not.
        assert_eq!(d.route(now, addr(5000), DTLS), Route::Deliver(PcId(2)));
        assert_eq!(d.route(now, addr(5000), SRTP), Route::Deliver(PcId(2)));
        assert_eq!(
            d.route(now, addr(5001), SRTP),
            Route::Drop(DropReason::UnknownSender)
        );
        // A keepalive indication (no USERNAME) goes by address too.
        assert_eq!(
            d.route(now, addr(5000), &stun(1, 8, None)),
            Route::Deliver(PcId(2))
        );
    }

    #[test]
    fn unknown_ufrags_and_requests_without_username_are_dropped_or_go_by_address() {
        let (mut d, now) = table();
        assert_eq!(
            d.route(now, addr(5000), &stun(0, 1, Some("nosuchufrag:x"))),
            Route::Drop(DropReason::UnknownUfrag)
        );
        // The remote half of USERNAME does not count.
        assert_eq!(
            d.route(now, addr(5000), &stun(0, 1, Some("x:ufragone"))),
            Route::Drop(DropReason::UnknownUfrag)
        );
        assert_eq!(
            d.route(now, addr(5000), &stun(0, 1, None)),
            Route::Drop(DropReason::UnknownSender)
        );
        d.route(now, addr(5000), &stun(0, 2, Some("ufragone:x")));
        assert_eq!(
            d.route(now, addr(5000), &stun(0, 1, None)),
            Route::Deliver(PcId(1))
        );
    }

    #[test]
    fn a_request_for_another_ufrag_moves_the_address() {
        let (mut d, now) = table();
        d.route(now, addr(5000), &stun(0, 1, Some("ufragone:a")));
        assert_eq!(d.route(now, addr(5000), DTLS), Route::Deliver(PcId(1)));
        // The same client port now checks the other peer connection (a reconnect).
        d.route(now, addr(5000), &stun(0, 2, Some("ufragtwo:b")));
        assert_eq!(d.route(now, addr(5000), DTLS), Route::Deliver(PcId(2)));
        // Forgetting the first one must not take the address from the second.
        d.forget(PcId(1));
        assert_eq!(d.route(now, addr(5000), DTLS), Route::Deliver(PcId(2)));
    }

    #[test]
    fn responses_to_the_relays_own_checks_come_back_by_transaction() {
        let (mut d, now) = table();
        // PC 1 checks a client candidate the client has not yet checked from.
        d.on_send(
            now,
            PcId(1),
            addr(6000),
            &stun(0, 42, Some("client:ufragone")),
        );
        // A response with that transaction from another address is not the answer.
        assert_eq!(
            d.route(now, addr(6001), &stun(2, 42, None)),
            Route::Drop(DropReason::UnknownSender)
        );
        assert_eq!(
            d.route(now, addr(6000), &stun(2, 42, None)),
            Route::Deliver(PcId(1))
        );
        // The answer taught the address.
        assert_eq!(d.route(now, addr(6000), DTLS), Route::Deliver(PcId(1)));
        // A transaction is answered once; unknown ones go by address.
        assert_eq!(
            d.route(now, addr(6002), &stun(2, 42, None)),
            Route::Drop(DropReason::UnknownSender)
        );
        // Non-STUN sends are not remembered.
        d.on_send(now, PcId(2), addr(6003), SRTP);
        assert!(d.transactions.is_empty());
    }

    #[test]
    fn transactions_expire_and_are_bounded_per_peer_connection() {
        let limits = DemuxLimits {
            transactions_per_pc: 2,
            ..DemuxLimits::default()
        };
        let mut d = Demux::new(limits.clone());
        d.register(PcId(1), "ufragone").unwrap();
        let now = Instant::now();
        d.on_send(now, PcId(1), addr(1), &stun(0, 1, Some("c:ufragone")));
        d.on_send(now, PcId(1), addr(1), &stun(0, 2, Some("c:ufragone")));
        d.on_send(now, PcId(1), addr(1), &stun(0, 3, Some("c:ufragone")));
        assert_eq!(d.transactions.len(), 2, "the third check is not remembered");
        let later = now + limits.transaction_ttl + Duration::from_millis(1);
        assert_eq!(
            d.route(later, addr(1), &stun(2, 1, None)),
            Route::Drop(DropReason::UnknownSender),
            "an expired transaction routes nothing"
        );
        // Expired entries make room again.
        d.on_send(later, PcId(1), addr(1), &stun(0, 4, Some("c:ufragone")));
        assert_eq!(
            d.route(later, addr(1), &stun(2, 4, None)),
            Route::Deliver(PcId(1))
        );
    }

    #[test]
    fn forgetting_a_peer_connection_drops_its_ufrag_addresses_and_checks() {
        let (mut d, now) = table();
        d.route(now, addr(5000), &stun(0, 1, Some("ufragone:a")));
        d.on_send(now, PcId(1), addr(5001), &stun(0, 9, Some("a:ufragone")));
        d.route(now, addr(7000), &stun(0, 1, Some("ufragtwo:b")));
        d.forget(PcId(1));
        assert_eq!(d.len(), 1);
        assert_eq!(
            d.route(now, addr(5000), DTLS),
            Route::Drop(DropReason::UnknownSender)
        );
        assert_eq!(
            d.route(now, addr(5000), &stun(0, 1, Some("ufragone:a"))),
            Route::Drop(DropReason::UnknownUfrag)
        );
        assert_eq!(
            d.route(now, addr(5001), &stun(2, 9, None)),
            Route::Drop(DropReason::UnknownSender)
        );
        assert!(d.transactions.is_empty());
        // The other peer connection is untouched.
        assert_eq!(d.route(now, addr(7000), DTLS), Route::Deliver(PcId(2)));
        // The ufrag may be used again.
        d.register(PcId(3), "ufragone").unwrap();
        d.forget(PcId(2));
        d.forget(PcId(3));
        assert!(d.is_empty() && d.by_addr.is_empty() && d.by_ufrag.is_empty());
    }

    #[test]
    fn a_ufrag_belongs_to_one_peer_connection() {
        let (mut d, _) = table();
        assert_eq!(d.register(PcId(3), "ufragone"), Err(UfragInUse));
        assert_eq!(d.register(PcId(1), "ufragone"), Ok(()));
    }

    #[test]
    fn addresses_per_peer_connection_are_bounded_oldest_forgotten_first() {
        let mut d = Demux::new(DemuxLimits {
            addrs_per_pc: 2,
            ..DemuxLimits::default()
        });
        d.register(PcId(1), "ufragone").unwrap();
        let now = Instant::now();
        for port in 1..=3 {
            d.route(now, addr(port), &stun(0, 1, Some("ufragone:c")));
        }
        assert_eq!(
            d.route(now, addr(1), DTLS),
            Route::Drop(DropReason::UnknownSender)
        );
        assert_eq!(d.route(now, addr(2), DTLS), Route::Deliver(PcId(1)));
        assert_eq!(d.route(now, addr(3), DTLS), Route::Deliver(PcId(1)));
    }

    #[test]
    fn malformed_stun_is_not_stun() {
        let good = stun(0, 1, Some("ufragone:c"));
        assert!(Stun::peek(&good).is_some());
        // Length not a multiple of 4, body shorter than the header says, attribute
        // running past the end, no magic cookie.
        let mut odd = good.clone();
        odd[3] = 3;
        assert_eq!(Stun::peek(&odd), None);
        assert_eq!(Stun::peek(&good[..good.len() - 4]), None);
        let mut long_attr = good.clone();
        long_attr[23] = 200;
        assert_eq!(Stun::peek(&long_attr), None);
        let mut cookie = good.clone();
        cookie[4] = 0;
        assert_eq!(Stun::peek(&cookie), None);
        assert_eq!(Stun::peek(DTLS), None);
        assert_eq!(Stun::peek(SRTP), None);
    }

    proptest! {
        #[test]
        fn routing_never_panics_on_any_datagram(
            data in proptest::collection::vec(any::<u8>(), 0..200),
            prefix in any::<bool>(),
        ) {
            let (mut d, now) = table();
            let mut data = data;
            if prefix && data.len() >= 8 {
                // Make it look like STUN, so the attribute parser runs.
                data[0] &= 0x3f;
                data[4..8].copy_from_slice(&MAGIC_COOKIE);
            }
            let _ = d.route(now, addr(1), &data);
            d.on_send(now, PcId(1), addr(1), &data);
        }
    }
}
