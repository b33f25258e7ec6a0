//! The forwarder's routing, without sockets: who publishes and who receives in which
//! session, what to do with each datagram, and the counters the bench reads.
//!
//! The wire protocol, all on one UDP socket of the forwarder:
//!
//! - `RECV <session>`: the sender receives that session's RTP from now on; answered
//!   with `OK`.
//! - `PUB <session>`: the sender publishes that session; answered with `OK`.
//! - `STATS`: answered with `STATS <rtp_in> <forwarded> <unrouted> <send_errors>`.
//! - RTP (version 2) from a publisher: one copy to each of its session's receivers.
//!
//! Control datagrams start with an ASCII letter, whose top two bits (`01`) can never be
//! RTP's version 2 (`10`), so one byte tells them apart.

use std::collections::HashMap;
use std::net::SocketAddrV4;

/// Reply to a registration.
pub const OK: &[u8] = b"OK";
/// Prefix of a receiver's registration.
pub const RECEIVER_HELLO: &str = "RECV ";
/// Prefix of a publisher's registration.
pub const PUBLISHER_HELLO: &str = "PUB ";
/// A request for [`Counters`], and the prefix of the answer.
pub const STATS: &str = "STATS";

/// What the forwarder has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// RTP packets received from publishers.
    pub rtp_in: u64,
    /// Copies handed to the socket (one per receiver per packet) and sent.
    pub forwarded: u64,
    /// Datagrams that were neither a known request nor RTP from a publisher.
    pub unrouted: u64,
    /// Copies the socket refused.
    pub send_errors: u64,
}

impl Counters {
    /// The `STATS ...` answer.
    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{STATS} {} {} {} {}",
            self.rtp_in, self.forwarded, self.unrouted, self.send_errors
        )
        .into_bytes()
    }

    /// Parses a `STATS ...` answer.
    pub fn decode(datagram: &[u8]) -> Option<Counters> {
        let text = std::str::from_utf8(datagram).ok()?;
        let mut fields = text.strip_prefix(STATS)?.split_whitespace();
        let mut next = || fields.next()?.parse::<u64>().ok();
        Some(Counters {
            rtp_in: next()?,
            forwarded: next()?,
            unrouted: next()?,
            send_errors: next()?,
        })
    }
}

/// What to do with one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// Send the datagram, unchanged, to each of these.
    Forward(&'a [SocketAddrV4]),
    /// Answer the sender with this.
    Reply(Vec<u8>),
    /// Nothing (counted in [`Counters::unrouted`], or an empty session).
    Drop,
}

/// The routing table and counters. Drive it with [`Fanout::route`] for each datagram
/// received, in order, then tell it with [`Fanout::sent`] how many copies went out.
#[derive(Debug, Default)]
pub struct Fanout {
    /// Session names → index in `receivers`.
    sessions: HashMap<String, usize>,
    /// Each session's receivers, in registration order.
    receivers: Vec<Vec<SocketAddrV4>>,
    /// Publisher address → session index.
    publishers: HashMap<SocketAddrV4, usize>,
    counters: Counters,
}

impl Fanout {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Routes a datagram from `from`.
    pub fn route(&mut self, from: SocketAddrV4, datagram: &[u8]) -> Route<'_> {
        match datagram.first() {
            Some(b) if b >> 6 == 2 => {
                let Some(&session) = self.publishers.get(&from) else {
                    self.counters.unrouted += 1;
                    return Route::Drop;
                };
                self.counters.rtp_in += 1;
                match self.receivers[session].as_slice() {
                    [] => Route::Drop,
                    to => Route::Forward(to),
                }
            }
            _ => self.control(from, datagram),
        }
    }

    /// Records how many copies of the last [`Route::Forward`]s were sent and how many
    /// the socket refused.
    pub fn sent(&mut self, sent: u64, refused: u64) {
        self.counters.forwarded += sent;
        self.counters.send_errors += refused;
    }

    fn control(&mut self, from: SocketAddrV4, datagram: &[u8]) -> Route<'_> {
        let Ok(text) = std::str::from_utf8(datagram) else {
            self.counters.unrouted += 1;
            return Route::Drop;
        };
        if text == STATS {
            return Route::Reply(self.counters.encode());
        }
        if let Some(name) = text.strip_prefix(RECEIVER_HELLO) {
            let session = self.session(name);
            let receivers = &mut self.receivers[session];
            // A hello sent again (its answer was lost) registers nothing new.
            if !receivers.contains(&from) {
                receivers.push(from);
            }
            return Route::Reply(OK.to_vec());
        }
        if let Some(name) = text.strip_prefix(PUBLISHER_HELLO) {
            let session = self.session(name);
            self.publishers.insert(from, session);
            return Route::Reply(OK.to_vec());
        }
        self.counters.unrouted += 1;
        Route::Drop
    }

    fn session(&mut self, name: &str) -> usize {
        if let Some(&i) = self.sessions.get(name) {
            return i;
        }
        self.receivers.push(Vec::new());
        let i = self.receivers.len() - 1;
        self.sessions.insert(name.to_owned(), i);
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port)
    }

    const RTP: &[u8] = &[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xaa];

    #[test]
    fn a_publishers_rtp_reaches_every_receiver_of_its_session_only() {
        let mut f = Fanout::new();
        assert_eq!(f.route(addr(1), b"PUB s0"), Route::Reply(OK.to_vec()));
        assert_eq!(f.route(addr(2), b"PUB s1"), Route::Reply(OK.to_vec()));
        for (port, session) in [(10, "s0"), (11, "s0"), (20, "s1")] {
            let hello = format!("{RECEIVER_HELLO}{session}");
            assert_eq!(
                f.route(addr(port), hello.as_bytes()),
                Route::Reply(OK.to_vec())
            );
        }
        // A lost answer makes a receiver say hello again: it still gets one copy.
        f.route(addr(11), b"RECV s0");
        assert_eq!(f.route(addr(1), RTP), Route::Forward(&[addr(10), addr(11)]));
        assert_eq!(f.route(addr(2), RTP), Route::Forward(&[addr(20)]));
        f.sent(3, 0);
        let c = f.counters();
        assert_eq!((c.rtp_in, c.forwarded, c.unrouted), (2, 3, 0));
    }

    #[test]
    fn rtp_from_a_stranger_and_garbage_are_dropped_and_counted() {
        let mut f = Fanout::new();
        f.route(addr(10), b"RECV s0");
        assert_eq!(f.route(addr(1), RTP), Route::Drop);
        assert_eq!(f.route(addr(1), b"HELLO"), Route::Drop);
        assert_eq!(f.route(addr(1), &[0xff, 0xfe]), Route::Drop);
        assert_eq!(f.route(addr(1), b""), Route::Drop);
        // A publisher with nobody watching forwards nothing.
        f.route(addr(2), b"PUB s9");
        assert_eq!(f.route(addr(2), RTP), Route::Drop);
        let c = f.counters();
        assert_eq!((c.rtp_in, c.unrouted), (1, 4));
    }

    #[test]
    fn stats_round_trip() {
        let mut f = Fanout::new();
        f.route(addr(1), b"PUB s0");
        f.route(addr(10), b"RECV s0");
        f.route(addr(1), RTP);
        f.sent(1, 2);
        let Route::Reply(answer) = f.route(addr(99), b"STATS") else {
            panic!("no answer to STATS");
        };
        assert_eq!(
            Counters::decode(&answer),
            Some(Counters {
                rtp_in: 1,
                forwarded: 1,
                unrouted: 0,
                send_errors: 2
            })
        );
        assert_eq!(Counters::decode(b"STATS 1 2"), None);
        assert_eq!(Counters::decode(b"OK"), None);
    }
}
