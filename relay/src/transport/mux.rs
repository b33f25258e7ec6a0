//! One UDP port for every peer connection of the node (`[media] udp_mux_port`).
//!
//! The `webrtc` 0.21 crate has no UDP mux of its own (its `SettingEngine` lists it as a
//! to-do), but it lets each peer connection bring its own [`Runtime`]. Ours,
//! [`PeerRuntime`], is tokio in everything except [`Runtime::wrap_udp_socket`]: where the
//! crate's driver wraps the socket it bound for the connection, the runtime hands back a
//! virtual socket (`Endpoint`) instead and closes the real one. The node's one real socket,
//! bound on `media.bind_ip:udp_mux_port`, is read by a single task that asks the sans-IO
//! [`Demux`] table which connection each datagram belongs to and queues it on that
//! connection's endpoint; endpoints send straight out of the shared socket.
//!
//! How a datagram finds its connection (details in [`demux`]): the relay chooses each
//! connection's local ICE credentials itself ([`UdpMux::peer`]), so a client's first
//! Binding request, whose `USERNAME` starts with that ufrag, names its connection; the
//! address it came from is then learned, and DTLS and SRTP from that address follow it.
//! Answers to the relay's own checks come back by STUN transaction id.
//!
//! What the crate cannot be told: its host candidate is the address of the socket it
//! bound (`bind_ip` and an ephemeral port), taken before the socket is wrapped. The
//! answers the relay sends must therefore be passed through [`UdpMux::advertise`], which
//! rewrites host candidates to the mux port (and to `media.public_ip` when set).
//!
//! The same runtime serves ICE-TCP on one port ([`tcp`], `media.ice_tcp_port`): its
//! `wrap_tcp_listener` hands back a virtual listener fed by the node's one TCP listener.
//! [`peer_setup`] builds the runtime for either mux or both; without the UDP mux its UDP
//! sockets are plain tokio ones. It never dials a client (`connect_tcp` is refused).
//!
//! Bounds: each connection's receive queue holds [`PC_QUEUE`] datagrams; beyond that,
//! and when the shared socket's send buffer is full, datagrams are dropped and counted in
//! `relay_udp_mux_datagrams_dropped_total{reason}` (UDP media recovers: NACK, keyframes,
//! DTLS and ICE retransmissions).

pub mod demux;
pub mod tcp;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge, Opts};
use rand::Rng;
use rand::distr::Alphanumeric;
use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime,
    TokioRuntime, Transmit,
};

use crate::metrics::Metrics;
use demux::{Demux, DemuxLimits, DropReason, PcId, Route};

/// Datagrams queued for one peer connection before the mux drops them
/// (`reason="queue_full"`). The connection's driver empties its queue as fast as it
/// empties a real socket's; this only bounds a driver that stalls.
pub const PC_QUEUE: usize = 1024;

/// mDNS keeps a socket of its own, exactly as without the mux.
const MDNS_PORT: u16 = 5353;

/// The node's shared media socket and its routing table; cheap to clone.
#[derive(Clone, Debug)]
pub struct UdpMux {
    shared: Arc<Shared>,
}

/// What [`UdpMux::peer`] prepares for one new peer connection.
pub struct PeerSetup {
    /// Local ICE username fragment (for `SettingEngine::with_ice_credentials`).
    pub ufrag: String,
    /// Local ICE password.
    pub pwd: String,
    /// The connection's runtime (for `PeerConnectionBuilder::with_runtime`).
    pub runtime: Arc<dyn Runtime>,
}

struct Shared {
    /// Read by the receive task only.
    recv: tokio::net::UdpSocket,
    /// The same socket, for sending from any driver without waiting for readiness.
    send: std::net::UdpSocket,
    /// What host candidates announce: the public or bound address, and the mux port.
    advertised: SocketAddr,
    state: Mutex<State>,
    metrics: MuxMetrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpMux")
            .field("local", &self.recv.local_addr().ok())
            .field("advertised", &self.advertised)
            .finish_non_exhaustive()
    }
}

struct State {
    demux: Demux,
    /// Each registered connection's endpoints; the newest receives (an ICE restart binds
    /// a new one before the old is gone).
    endpoints: HashMap<PcId, Vec<Arc<Queue>>>,
}

#[derive(Clone)]
struct MuxMetrics {
    dropped: IntCounterVec,
    datagrams: IntCounterVec,
    queued: IntGauge,
    peer_connections: IntGauge,
}

impl MuxMetrics {
    fn register(metrics: &Metrics) -> MuxMetrics {
        let m = MuxMetrics {
            dropped: IntCounterVec::new(
                Opts::new(
                    "relay_udp_mux_datagrams_dropped_total",
                    "Datagrams the media UDP mux dropped, by reason (unknown_ufrag, \
                     unknown_sender, queue_full, send_buffer_full).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            datagrams: IntCounterVec::new(
                Opts::new(
                    "relay_udp_mux_datagrams_total",
                    "Datagrams through the media UDP mux, by direction (in: routed to a \
                     peer connection, out: sent).",
                ),
                &["direction"],
            )
            .expect("valid metric"),
            queued: IntGauge::new(
                "relay_udp_mux_queued_datagrams",
                "Datagrams waiting in the media UDP mux's per-connection receive queues.",
            )
            .expect("valid metric"),
            peer_connections: IntGauge::new(
                "relay_udp_mux_peer_connections",
                "Peer connections registered on the media UDP mux.",
            )
            .expect("valid metric"),
        };
        for reason in DropReason::ALL {
            m.dropped.with_label_values(&[reason.as_str()]);
        }
        for direction in ["in", "out"] {
            m.datagrams.with_label_values(&[direction]);
        }
        // Registered here rather than in `Metrics::new`: they exist only in mux mode. A
        // second mux in one process (tests) keeps its own, unexported, copies.
        let _ = metrics.registry.register(Box::new(m.dropped.clone()));
        let _ = metrics.registry.register(Box::new(m.datagrams.clone()));
        let _ = metrics.registry.register(Box::new(m.queued.clone()));
        let _ = metrics
            .registry
            .register(Box::new(m.peer_connections.clone()));
        m
    }

    fn drop(&self, reason: DropReason) {
        self.dropped.with_label_values(&[reason.as_str()]).inc();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl UdpMux {
    /// Binds `ip:port` and starts the task that reads it. Host candidates announce
    /// `public_ip` (or `ip`) and the bound port. Must be called within a tokio runtime.
    pub fn bind(
        ip: IpAddr,
        port: u16,
        public_ip: Option<IpAddr>,
        metrics: &Metrics,
    ) -> io::Result<UdpMux> {
        let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, port))?;
        socket.set_nonblocking(true)?;
        let send = socket.try_clone()?;
        let recv = tokio::net::UdpSocket::from_std(socket)?;
        let local = recv.local_addr()?;
        let shared = Arc::new(Shared {
            recv,
            send,
            advertised: SocketAddr::new(public_ip.unwrap_or(ip), local.port()),
            state: Mutex::new(State {
                demux: Demux::new(DemuxLimits::default()),
                endpoints: HashMap::new(),
            }),
            metrics: MuxMetrics::register(metrics),
        });
        tracing::info!(%local, "media UDP mux listening");
        tokio::spawn(receive(shared.clone()));
        Ok(UdpMux { shared })
    }

    /// The address host candidates announce.
    pub fn advertised(&self) -> SocketAddr {
        self.shared.advertised
    }

    /// Credentials and runtime for a new peer connection. The ufrag is registered when
    /// the connection's driver binds its socket (inside `PeerConnectionBuilder::build`)
    /// and forgotten when the driver lets go of it (the connection closed).
    pub fn peer(&self) -> PeerSetup {
        peer_setup(Some(self), None)
    }

    /// `sdp` with every UDP host candidate announcing [`UdpMux::advertised`] instead of
    /// the placeholder address the crate bound.
    pub fn advertise(&self, sdp: &str) -> String {
        let to = self.shared.advertised;
        rewrite_host_candidates(sdp, to.ip(), Some(to.port()))
    }
}

/// Peer connections' ids, shared by both muxes' tables.
static NEXT_PC: AtomicU64 = AtomicU64::new(1);

/// Credentials and runtime for a new peer connection whose UDP goes through `udp` (or
/// plain sockets) and whose ICE-TCP through `tcp` (or nowhere: without it the crate
/// binds no TCP listener). The ufrag is registered with each mux when the connection's
/// driver binds its socket or listener, and forgotten when it lets go of them.
pub fn peer_setup(udp: Option<&UdpMux>, tcp: Option<&tcp::TcpMux>) -> PeerSetup {
    let ufrag = random_ice_chars(16);
    let pwd = random_ice_chars(32);
    let runtime = Arc::new(PeerRuntime {
        udp: udp.map(|m| m.shared.clone()),
        tcp: tcp.cloned(),
        pc: PcId(NEXT_PC.fetch_add(1, Ordering::Relaxed)),
        ufrag: ufrag.clone(),
    });
    PeerSetup {
        ufrag,
        pwd,
        runtime,
    }
}

/// `n` characters from ICE's alphabet (RFC 8839 `ice-char`, alphanumerics only).
fn random_ice_chars(n: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

/// Reads the shared socket until the process ends.
async fn receive(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match shared.recv.recv_from(&mut buf).await {
            Ok((n, from)) => shared.dispatch(Instant::now(), from, &buf[..n]),
            Err(e) if transient(&e) => {}
            Err(e) => {
                tracing::error!(error = %e, "media UDP mux socket cannot be read; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

impl Shared {
    fn dispatch(&self, now: Instant, from: SocketAddr, data: &[u8]) {
        let queue = {
            let mut state = lock(&self.state);
            match state.demux.route(now, from, data) {
                Route::Deliver(pc) => state.endpoints.get(&pc).and_then(|e| e.last()).cloned(),
                Route::Drop(reason) => {
                    self.metrics.drop(reason);
                    return;
                }
            }
        };
        let Some(queue) = queue else {
            self.metrics.drop(DropReason::UnknownSender);
            return;
        };
        let waker = {
            let mut q = lock(&queue.inner);
            if q.datagrams.len() >= PC_QUEUE {
                drop(q);
                self.metrics.drop(DropReason::QueueFull);
                return;
            }
            q.datagrams.push_back((Bytes::copy_from_slice(data), from));
            q.waker.take()
        };
        self.metrics.queued.inc();
        self.metrics.datagrams.with_label_values(&["in"]).inc();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn send(&self, pc: PcId, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        // Only STUN (first byte 0..=3, RFC 7983) can be a check whose answer needs a route.
        if datagram.first().is_some_and(|b| *b < 4) {
            lock(&self.state)
                .demux
                .on_send(Instant::now(), pc, to, datagram);
        }
        match self.send.send_to(datagram, to) {
            Ok(_) => {
                self.metrics.datagrams.with_label_values(&["out"]).inc();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.metrics.drop(DropReason::SendBufferFull);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn attach(self: &Arc<Self>, pc: PcId, ufrag: &str, local: SocketAddr) -> io::Result<Endpoint> {
        let queue = Arc::new(Queue::default());
        let mut state = lock(&self.state);
        state.demux.register(pc, ufrag).map_err(io::Error::other)?;
        state.endpoints.entry(pc).or_default().push(queue.clone());
        self.metrics.peer_connections.set(state.demux.len() as i64);
        Ok(Endpoint {
            mux: self.clone(),
            pc,
            local,
            queue,
        })
    }

    fn detach(&self, pc: PcId, queue: &Arc<Queue>) {
        let mut state = lock(&self.state);
        if let Some(list) = state.endpoints.get_mut(&pc) {
            list.retain(|q| !Arc::ptr_eq(q, queue));
            if list.is_empty() {
                state.endpoints.remove(&pc);
                state.demux.forget(pc);
            }
        }
        self.metrics.peer_connections.set(state.demux.len() as i64);
        let left = lock(&queue.inner).datagrams.len();
        self.metrics.queued.sub(left as i64);
    }
}

/// One endpoint's receive queue.
#[derive(Default)]
struct Queue {
    inner: Mutex<QueueInner>,
}

#[derive(Default)]
struct QueueInner {
    datagrams: VecDeque<(Bytes, SocketAddr)>,
    /// The driver's receive future, parked on an empty queue.
    waker: Option<Waker>,
}

/// A peer connection's virtual UDP socket: receives what the mux routes to it, sends out
/// of the shared socket. Its local address is the placeholder the crate bound, which is
/// what the connection's ICE agent knows its host candidate by.
struct Endpoint {
    mux: Arc<Shared>,
    pc: PcId,
    local: SocketAddr,
    queue: Arc<Queue>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("pc", &self.pc)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.mux.detach(self.pc, &self.queue);
    }
}

impl AsyncUdpSocket for Endpoint {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn poll_send(&self, _cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        // GSO is not offered (`max_gso_segments` is 1), but honour a segment size anyway.
        let contents = transmit.contents;
        let segment = transmit
            .segment_size
            .filter(|s| *s > 0)
            .unwrap_or(contents.len().max(1));
        for datagram in contents.chunks(segment) {
            if let Err(e) = self.mux.send(self.pc, transmit.destination, datagram) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(contents.len()))
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut q = lock(&self.queue.inner);
        let max = bufs.len().min(meta.len());
        let mut n = 0;
        while n < max {
            let Some((data, from)) = q.datagrams.pop_front() else {
                break;
            };
            let len = data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&data[..len]);
            let mut m = RecvMeta::default();
            m.addr = from;
            m.len = len;
            m.stride = len.max(1);
            m.dst_ip = Some(self.local.ip());
            meta[n] = m;
            n += 1;
        }
        if n == 0 {
            // The driver also probes with a no-op waker between real polls; the last
            // poll before it sleeps is always its real receive future's.
            match &q.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => q.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        drop(q);
        self.mux.metrics.queued.sub(n as i64);
        Poll::Ready(Ok(n))
    }
}

/// A peer connection's runtime: tokio, except that its UDP socket is an [`Endpoint`]
/// (with the UDP mux), its TCP listener a virtual one (with ICE-TCP), and that it never
/// dials out.
#[derive(Debug)]
struct PeerRuntime {
    udp: Option<Arc<Shared>>,
    tcp: Option<tcp::TcpMux>,
    pc: PcId,
    ufrag: String,
}

impl Runtime for PeerRuntime {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn(future)
    }

    fn spawn_reactor(
        &self,
        reactor_pool_size: usize,
        future: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> Box<dyn JoinHandle> {
        TokioRuntime.spawn_reactor(reactor_pool_size, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let local = socket.local_addr()?;
        let Some(mux) = self.udp.as_ref().filter(|_| local.port() != MDNS_PORT) else {
            return TokioRuntime.wrap_udp_socket(socket);
        };
        // The placeholder's address names the host candidate; its port is not needed.
        drop(socket);
        Ok(Arc::new(mux.attach(self.pc, &self.ufrag, local)?))
    }

    fn wrap_tcp_listener(
        &self,
        listener: std::net::TcpListener,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        let Some(tcp) = &self.tcp else {
            return TokioRuntime.wrap_tcp_listener(listener);
        };
        // As for UDP: the placeholder names the passive candidate, the shared port
        // carries its streams.
        let local = listener.local_addr()?;
        drop(listener);
        tcp.attach(self.pc, &self.ufrag, local)
    }

    fn connect_tcp<'a>(
        &'a self,
        _remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        // A client's passive TCP candidate would make the node open a connection to
        // any address it names; clients dial the relay's port instead.
        tracing::debug!("refused to dial a client's passive ICE-TCP candidate");
        Box::pin(std::future::ready(Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the relay does not dial ICE-TCP candidates",
        ))))
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { TokioRuntime.resolve_host(host).await })
    }

    fn now(&self) -> Instant {
        TokioRuntime.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        TokioRuntime.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        TokioRuntime.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        TokioRuntime.yield_now()
    }

    fn name(&self) -> &'static str {
        match (&self.udp, &self.tcp) {
            (Some(_), Some(_)) => "tokio+udp-mux+ice-tcp",
            (Some(_), None) => "tokio+udp-mux",
            (None, _) => "tokio+ice-tcp",
        }
    }
}

/// `sdp` with the address (and the port, when `port` is given) of every UDP host
/// candidate (`a=candidate:` lines) replaced; every other line is kept byte for byte.
pub fn rewrite_host_candidates(sdp: &str, ip: IpAddr, port: Option<u16>) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let rewritten = body
            .strip_prefix("a=candidate:")
            .and_then(|value| rewrite_candidate(value, ip, port));
        match rewritten {
            Some(value) => {
                out.push_str("a=candidate:");
                out.push_str(&value);
                out.push_str(&line[body.len()..]);
            }
            None => out.push_str(line),
        }
    }
    out
}

/// A candidate attribute's value (`<foundation> <component> <transport> <priority>
/// <address> <port> typ <type> …`, RFC 8839 §5.1) with the address and port replaced by
/// `ip` (and `port`, when given), if it is a UDP host candidate.
pub fn rewrite_candidate(value: &str, ip: IpAddr, port: Option<u16>) -> Option<String> {
    let mut fields: Vec<&str> = value.split(' ').collect();
    let host_udp = fields.len() >= 8
        && fields[2].eq_ignore_ascii_case("udp")
        && fields[6] == "typ"
        && fields[7] == "host";
    if !host_udp {
        return None;
    }
    let ip = ip.to_string();
    let port = port.map(|p| p.to_string());
    fields[4] = &ip;
    if let Some(port) = &port {
        fields[5] = port;
    }
    Some(fields.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_public_ip_alone_replaces_the_address_and_keeps_each_port() {
        let sdp = "a=candidate:1 1 udp 2130706431 10.0.0.5 40001 typ host\r\n\
                   a=candidate:2 1 udp 2130706431 10.0.0.6 40002 typ host\r\n";
        let ip: IpAddr = "203.0.113.10".parse().unwrap();
        assert_eq!(
            rewrite_host_candidates(sdp, ip, None),
            "a=candidate:1 1 udp 2130706431 203.0.113.10 40001 typ host\r\n\
             a=candidate:2 1 udp 2130706431 203.0.113.10 40002 typ host\r\n"
        );
    }

    #[test]
    fn host_candidates_announce_the_mux_address_and_nothing_else_changes() {
        let sdp = "v=0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
                   c=IN IP4 0.0.0.0\r\n\
                   a=candidate:1234 1 udp 2130706431 10.0.0.5 54321 typ host\r\n\
                   a=candidate:99 1 UDP 1694498815 198.51.100.7 40000 typ srflx raddr 10.0.0.5 rport 54321\r\n\
                   a=candidate:5 1 tcp 1518280447 10.0.0.5 9 typ host tcptype active\r\n\
                   a=end-of-candidates\r\n";
        let to: SocketAddr = "203.0.113.10:3478".parse().unwrap();
        let out = rewrite_host_candidates(sdp, to.ip(), Some(to.port()));
        assert_eq!(
            out,
            "v=0\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
             c=IN IP4 0.0.0.0\r\n\
             a=candidate:1234 1 udp 2130706431 203.0.113.10 3478 typ host\r\n\
             a=candidate:99 1 UDP 1694498815 198.51.100.7 40000 typ srflx raddr 10.0.0.5 rport 54321\r\n\
             a=candidate:5 1 tcp 1518280447 10.0.0.5 9 typ host tcptype active\r\n\
             a=end-of-candidates\r\n"
        );
        // A candidate with extensions keeps them; a truncated one is left alone.
        assert_eq!(
            rewrite_candidate(
                "1 1 udp 1 10.0.0.5 5 typ host generation 0 ufrag ab",
                to.ip(),
                Some(to.port())
            )
            .as_deref(),
            Some("1 1 udp 1 203.0.113.10 3478 typ host generation 0 ufrag ab")
        );
        assert_eq!(
            rewrite_candidate("1 1 udp 1 10.0.0.5", to.ip(), Some(to.port())),
            None
        );
        // No trailing newline and bare \n endings survive too.
        assert_eq!(
            rewrite_host_candidates(
                "a=candidate:1 1 udp 1 ::1 5 typ host",
                to.ip(),
                Some(to.port())
            ),
            "a=candidate:1 1 udp 1 203.0.113.10 3478 typ host"
        );
    }

    /// Two endpoints on one mux, driven through the runtime as the crate's driver would:
    /// a check names its endpoint by ufrag, the reply leaves from the shared port, the
    /// address is learned for media, an unknown sender is counted, and a closed
    /// endpoint's traffic is dropped.
    #[tokio::test]
    async fn routes_between_two_peer_connections_over_loopback() {
        let metrics = Metrics::new();
        let lo = IpAddr::from([127, 0, 0, 1]);
        let mux = UdpMux::bind(lo, 0, None, &metrics).unwrap();
        let port = mux.advertised().port();
        let (a, b) = (mux.peer(), mux.peer());
        let placeholder = || std::net::UdpSocket::bind((lo, 0)).unwrap();
        let sock_a = a.runtime.wrap_udp_socket(placeholder()).unwrap();
        let sock_b = b.runtime.wrap_udp_socket(placeholder()).unwrap();

        let client = tokio::net::UdpSocket::bind((lo, 0)).await.unwrap();
        let stranger = tokio::net::UdpSocket::bind((lo, 0)).await.unwrap();
        let check = binding_request(&format!("{}:client", b.ufrag));
        client.send_to(&check, (lo, port)).await.unwrap();

        let recv_within = |s: Arc<dyn AsyncUdpSocket>, wait: Duration| async move {
            let mut buf = [0u8; 1500];
            let r = tokio::time::timeout(wait, s.recv_from(&mut buf)).await;
            r.map(|r| r.map(|(n, from)| (buf[..n].to_vec(), from)))
        };
        let recv = |s| recv_within(s, Duration::from_secs(5));
        let (got, from) = recv(sock_b.clone()).await.unwrap().unwrap();
        assert_eq!(got, check);
        assert_eq!(from, client.local_addr().unwrap());

        // The reply leaves from the mux port.
        sock_b.send_to(b"\x16reply", from).await.unwrap();
        let mut buf = [0u8; 64];
        let (n, src) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], src.port()), (&b"\x16reply"[..], port));

        // DTLS-looking media from the learned address follows; a stranger's does not,
        // and nothing reached the other endpoint.
        client.send_to(b"\x16media", (lo, port)).await.unwrap();
        stranger.send_to(b"\x16nope", (lo, port)).await.unwrap();
        let (got, _) = recv(sock_b.clone()).await.unwrap().unwrap();
        assert_eq!(got, b"\x16media");
        assert!(
            recv_within(sock_a.clone(), Duration::from_millis(200))
                .await
                .is_err(),
            "the other connection got a datagram"
        );
        let dropped = |reason: &str| {
            let line = format!("relay_udp_mux_datagrams_dropped_total{{reason=\"{reason}\"}} ");
            metrics
                .encode()
                .lines()
                .find_map(|l| l.strip_prefix(&line).map(str::to_owned))
        };
        assert_eq!(dropped("unknown_sender").as_deref(), Some("1"));

        // Closing the connection (its driver drops the socket) forgets it.
        drop(sock_b);
        client.send_to(b"\x16late", (lo, port)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while dropped("unknown_sender").as_deref() != Some("2") {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the closed connection's traffic is dropped as unknown");
        assert_eq!(lock(&mux.shared.state).demux.len(), 1);
    }

    /// A STUN Binding request with `USERNAME` = `username` (and nothing else).
    pub(super) fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&0x0006u16.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&attrs);
        m
    }
}
