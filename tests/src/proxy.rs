//! A media path between one client and the relay that the test controls: datagrams lost
//! at random, delayed and reordered (jitter), or cut off entirely, in both directions.
//!
//! The machines these tests run on have no `netem` qdisc (and a network namespace of a
//! test would need one), so impairment happens in user space. A [`UdpWire`] is two UDP
//! sockets on loopback: the *client side*, which the client takes for the relay, and
//! the *relay side*, which the relay takes for the client. It is a
//! [`MediaRoute`]: the client announces the relay side instead of its own socket and
//! sends to the client side instead of the relay's candidate, so every datagram of the
//! peer connection, ICE checks included, crosses the wire and nothing can go around it
//! (the relay never learns the client's real address). A [`PathSwitch`] moves a client
//! from one wire to another, as a laptop moving from Wi-Fi to cellular does; an ICE
//! restart then has to find the new path.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use relay_bench::client::MediaRoute;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// What happens to each datagram crossing a [`UdpWire`], in each direction on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Impairment {
    /// Probability that a datagram is lost (0.0 to 1.0).
    pub loss: f64,
    /// Delay every datagram gets.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter` per datagram: datagrams overtake each other.
    pub jitter: Duration,
}

impl Impairment {
    /// Nothing lost, nothing delayed.
    pub const NONE: Impairment = Impairment {
        loss: 0.0,
        delay: Duration::ZERO,
        jitter: Duration::ZERO,
    };
}

/// What crossed a [`UdpWire`] so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Datagrams from the client forwarded to the relay.
    pub to_relay: u64,
    /// Datagrams from the relay forwarded to the client.
    pub to_client: u64,
    /// Datagrams lost on purpose ([`Impairment::loss`]), both directions.
    pub lost: u64,
    /// Datagrams dropped because the wire was cut, both directions.
    pub dropped_cut: u64,
}

#[derive(Default)]
struct Counters {
    to_relay: AtomicU64,
    to_client: AtomicU64,
    lost: AtomicU64,
    dropped_cut: AtomicU64,
}

struct Ends {
    /// The client's socket: the last source seen on the client side, else announced.
    client: Option<SocketAddr>,
    /// The relay's socket: the last source seen on the relay side, else the candidate.
    relay: Option<SocketAddr>,
}

struct WireInner {
    client_side: UdpSocket,
    relay_side: UdpSocket,
    client_side_addr: SocketAddr,
    relay_side_addr: SocketAddr,
    impairment: Mutex<Impairment>,
    cut: AtomicBool,
    ends: Mutex<Ends>,
    counters: Counters,
}

/// One impairable path between a client and the relay; see the module docs. Its tasks
/// stop when it is dropped.
pub struct UdpWire {
    inner: Arc<WireInner>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for UdpWire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpWire")
            .field("client_side", &self.inner.client_side_addr)
            .field("relay_side", &self.inner.relay_side_addr)
            .field("stats", &self.stats())
            .finish()
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToRelay,
    ToClient,
}

impl UdpWire {
    /// A wire on two fresh loopback sockets, impairing as `impairment` says.
    pub async fn start(impairment: Impairment) -> std::io::Result<Arc<UdpWire>> {
        let client_side = UdpSocket::bind("127.0.0.1:0").await?;
        let relay_side = UdpSocket::bind("127.0.0.1:0").await?;
        let inner = Arc::new(WireInner {
            client_side_addr: client_side.local_addr()?,
            relay_side_addr: relay_side.local_addr()?,
            client_side,
            relay_side,
            impairment: Mutex::new(impairment),
            cut: AtomicBool::new(false),
            ends: Mutex::new(Ends {
                client: None,
                relay: None,
            }),
            counters: Counters::default(),
        });
        let tasks = vec![
            tokio::spawn(forward(Arc::clone(&inner), Direction::ToRelay)),
            tokio::spawn(forward(Arc::clone(&inner), Direction::ToClient)),
        ];
        Ok(Arc::new(UdpWire { inner, tasks }))
    }

    /// From now on every datagram is dropped, both ways: the network is gone.
    pub fn cut(&self) {
        self.inner.cut.store(true, Ordering::SeqCst);
    }

    /// Changes the impairment of datagrams that arrive from now on.
    pub fn set_impairment(&self, impairment: Impairment) {
        *lock(&self.inner.impairment) = impairment;
    }

    /// What crossed the wire so far.
    pub fn stats(&self) -> WireStats {
        let c = &self.inner.counters;
        WireStats {
            to_relay: c.to_relay.load(Ordering::Relaxed),
            to_client: c.to_client.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            dropped_cut: c.dropped_cut.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UdpWire {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl MediaRoute for UdpWire {
    fn announce_local(&self, local: SocketAddr) -> SocketAddr {
        lock(&self.inner.ends).client.get_or_insert(local);
        self.inner.relay_side_addr
    }

    fn reach_remote(&self, remote: SocketAddr) -> SocketAddr {
        lock(&self.inner.ends).relay.get_or_insert(remote);
        self.inner.client_side_addr
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads one side and sends what it reads out of the other, impaired.
async fn forward(inner: Arc<WireInner>, direction: Direction) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (from_socket, counter) = match direction {
            Direction::ToRelay => (&inner.client_side, &inner.counters.to_relay),
            Direction::ToClient => (&inner.relay_side, &inner.counters.to_client),
        };
        let Ok((n, from)) = from_socket.recv_from(&mut buf).await else {
            continue;
        };
        let to = {
            let mut ends = lock(&inner.ends);
            match direction {
                Direction::ToRelay => {
                    ends.client = Some(from);
                    ends.relay
                }
                Direction::ToClient => {
                    ends.relay = Some(from);
                    ends.client
                }
            }
        };
        let Some(to) = to else { continue };
        if inner.cut.load(Ordering::SeqCst) {
            inner.counters.dropped_cut.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let impairment = *lock(&inner.impairment);
        let (lose, extra) = {
            let mut rng = rand::rng();
            let lose = impairment.loss > 0.0 && rng.random_bool(impairment.loss.min(1.0));
            let extra = if impairment.jitter.is_zero() {
                Duration::ZERO
            } else {
                impairment.jitter.mul_f64(rng.random::<f64>())
            };
            (lose, extra)
        };
        if lose {
            inner.counters.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        let delay = impairment.delay + extra;
        let datagram = buf[..n].to_vec();
        if delay.is_zero() {
            let _ = out_socket(&inner, direction).send_to(&datagram, to).await;
        } else {
            let inner = Arc::clone(&inner);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if !inner.cut.load(Ordering::SeqCst) {
                    let _ = out_socket(&inner, direction).send_to(&datagram, to).await;
                }
            });
        }
    }
}

fn out_socket(inner: &WireInner, direction: Direction) -> &UdpSocket {
    match direction {
        Direction::ToRelay => &inner.relay_side,
        Direction::ToClient => &inner.client_side,
    }
}

/// A client's current path, which the test can move to another [`UdpWire`] (a network
/// change). Candidates exchanged from then on name the new wire; the old one keeps
/// carrying whatever still uses it until it is cut.
#[derive(Debug)]
pub struct PathSwitch {
    current: Mutex<Arc<UdpWire>>,
}

impl PathSwitch {
    /// Starting on `wire`.
    pub fn new(wire: Arc<UdpWire>) -> Arc<PathSwitch> {
        Arc::new(PathSwitch {
            current: Mutex::new(wire),
        })
    }

    /// Candidates from now on go over `wire`.
    pub fn switch_to(&self, wire: Arc<UdpWire>) {
        *lock(&self.current) = wire;
    }

    /// The wire in use.
    pub fn current(&self) -> Arc<UdpWire> {
        Arc::clone(&lock(&self.current))
    }
}

impl MediaRoute for PathSwitch {
    fn announce_local(&self, local: SocketAddr) -> SocketAddr {
        self.current().announce_local(local)
    }

    fn reach_remote(&self, remote: SocketAddr) -> SocketAddr {
        self.current().reach_remote(remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wire between two plain sockets: what one sends the other gets, from the
    /// wire's address; cut, nothing crosses.
    #[tokio::test]
    async fn forwards_both_ways_until_cut() {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let wire = UdpWire::start(Impairment::NONE).await.unwrap();
        let to_relay = wire.reach_remote(relay.local_addr().unwrap());
        let to_client = wire.announce_local(client.local_addr().unwrap());

        client.send_to(b"check", to_relay).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = relay.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"check"[..], to_client));
        relay.send_to(b"answer", from).await.unwrap();
        let (n, from) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"answer"[..], to_relay));

        wire.cut();
        client.send_to(b"lost", to_relay).await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(300), relay.recv_from(&mut buf)).await;
        assert!(got.is_err(), "a cut wire forwarded a datagram");
        let stats = wire.stats();
        assert_eq!(
            (stats.to_relay, stats.to_client, stats.dropped_cut),
            (1, 1, 1)
        );
    }

    /// With 50% loss about half of 400 datagrams arrive; all of them with 0%.
    #[tokio::test]
    async fn loses_about_the_configured_share() {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let wire = UdpWire::start(Impairment {
            loss: 0.5,
            ..Impairment::NONE
        })
        .await
        .unwrap();
        let to_relay = wire.reach_remote(relay.local_addr().unwrap());
        wire.announce_local(client.local_addr().unwrap());
        for i in 0..400u32 {
            client.send_to(&i.to_be_bytes(), to_relay).await.unwrap();
            if i % 20 == 19 {
                // Paced, so that no socket buffer overflows on the way.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let mut got = 0;
        let mut buf = [0u8; 8];
        while tokio::time::timeout(Duration::from_millis(300), relay.recv_from(&mut buf))
            .await
            .is_ok()
        {
            got += 1;
        }
        let stats = wire.stats();
        assert_eq!(stats.to_relay + stats.lost, 400);
        assert_eq!(got, stats.to_relay);
        assert!(
            (120..=280).contains(&got),
            "{got} of 400 arrived at 50% loss"
        );
    }
}
