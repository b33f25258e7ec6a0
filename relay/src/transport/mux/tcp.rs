//! ICE-TCP on one port for every peer connection (`[media] ice_tcp_port`): the media
//! fallback for clients whose UDP is blocked.
//!
//! With the port set, every peer connection gets a passive ICE-TCP host candidate on
//! it (RFC 6544), next to its UDP candidates; ICE prefers UDP, so only a client that
//! cannot reach UDP ends up here. Chromium dials passive TCP candidates by itself; the
//! native client does with `IceTransport::Tcp`.
//!
//! The design follows the UDP mux ([`super`]): the `webrtc` crate's driver binds a
//! placeholder `TcpListener` per connection (`bind_ip:0`, whose address becomes the
//! candidate) and hands it to [`Runtime::wrap_tcp_listener`](webrtc::runtime::Runtime);
//! our runtime closes it and returns a virtual listener ([`TcpMux::attach`]) instead. The
//! node's one real listener on `media.bind_ip:ice_tcp_port` is served by one accept task:
//!
//! 1. each new stream is admitted by the sans-IO [`TcpRouter`] (bounded: at most
//!    [`TcpLimits::max_pending`] streams in their handshake, [`TcpLimits::max_pending_per_ip`]
//!    from one address) and read by a small handshake task;
//! 2. its first RFC 4571 frame (a 16-bit length, then the packet) must be a STUN
//!    request whose `USERNAME` names the relay's ufrag of a connection (the relay picks
//!    every connection's credentials, [`super::peer_setup`]); it must arrive within
//!    [`TcpLimits::handshake_timeout`] and be at most [`TcpLimits::max_first_frame`] bytes;
//! 3. the stream, with what was read replayed first, is handed to that connection's
//!    virtual listener, whose driver accepts it and runs ICE, DTLS and SRTP over it. It
//!    reports the placeholder as its local address, which is what the connection's ICE
//!    agent knows its passive candidate by.
//!
//! Everything else is closed and counted in `relay_ice_tcp_streams_total{outcome}`
//! (`routed` for the ones handed over); `relay_ice_tcp_streams_open` and
//! `relay_ice_tcp_streams_pending` are the gauges. A connection holds at most
//! [`TcpLimits::max_streams_per_pc`] streams.
//!
//! Sending never blocks the connection's driver: each stream has a writer task behind a
//! queue of [`SEND_QUEUE_FRAMES`] frames; a frame that does not fit is dropped whole
//! (`relay_ice_tcp_frames_dropped_total{reason="send_queue_full"}`), which the media
//! path recovers from as from UDP loss (NACK, keyframes), and which keeps a dead client
//! from stalling the driver until ICE consent expires. The crate writes one frame per
//! `write_all`, which is what makes dropping whole frames possible.
//!
//! The relay never dials a client: remote passive TCP candidates are refused
//! ([`super`]'s runtime), so a client cannot make the node open connections elsewhere,
//! and the relay's own active candidates are removed from its SDP ([`rewrite_tcp_candidates`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use prometheus::{IntCounterVec, IntGauge, Opts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use webrtc::runtime::{AsyncTcpListener, AsyncTcpStream};

use super::demux::{PcId, UfragInUse, request_local_ufrag};
use crate::metrics::Metrics;

/// Frames queued for sending on one stream before further frames are dropped.
pub const SEND_QUEUE_FRAMES: usize = 512;

/// Routed streams waiting for their connection's driver to accept them.
const LISTENER_BACKLOG: usize = 4;

/// Bytes read at once from a stream in its handshake.
const HANDSHAKE_READ: usize = 2048;

/// Bounds of the [`TcpRouter`].
#[derive(Debug, Clone)]
pub struct TcpLimits {
    /// How long a new stream has to deliver its first whole frame.
    pub handshake_timeout: Duration,
    /// Streams in their handshake, node-wide.
    pub max_pending: usize,
    /// Streams in their handshake from one IP address (a NAT shares one address among
    /// many clients, but each handshake lasts one round trip).
    pub max_pending_per_ip: usize,
    /// Largest first frame (a Binding request is a few hundred bytes).
    pub max_first_frame: usize,
    /// Streams one peer connection may hold (a client has a few TCP candidates at most).
    pub max_streams_per_pc: usize,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits {
            // A client sends its first check as soon as it is connected; ICE itself
            // gives a pair a few seconds.
            handshake_timeout: Duration::from_secs(5),
            max_pending: 256,
            max_pending_per_ip: 32,
            max_first_frame: 2048,
            max_streams_per_pc: 8,
        }
    }
}

/// What became of a stream (`outcome` label of `relay_ice_tcp_streams_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handed to its peer connection.
    Routed,
    /// The first frame is not a STUN request with a `USERNAME`.
    NotStun,
    /// The first frame announces more than [`TcpLimits::max_first_frame`] bytes.
    FrameTooLarge,
    /// The first frame names a ufrag no peer connection has.
    UnknownUfrag,
    /// No whole first frame within [`TcpLimits::handshake_timeout`].
    HandshakeTimeout,
    /// Closed (or failed) before a whole first frame.
    ClosedEarly,
    /// Refused at once: too many streams in their handshake (node-wide or from its IP).
    TooManyPending,
    /// Its peer connection already holds [`TcpLimits::max_streams_per_pc`] streams.
    TooManyStreams,
    /// Its peer connection's driver did not take it (backlog full, or closing).
    ListenerFull,
}

impl Outcome {
    /// Every outcome, for pre-creating the metric's labels.
    pub const ALL: [Outcome; 9] = [
        Outcome::Routed,
        Outcome::NotStun,
        Outcome::FrameTooLarge,
        Outcome::UnknownUfrag,
        Outcome::HandshakeTimeout,
        Outcome::ClosedEarly,
        Outcome::TooManyPending,
        Outcome::TooManyStreams,
        Outcome::ListenerFull,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Routed => "routed",
            Outcome::NotStun => "not_stun",
            Outcome::FrameTooLarge => "frame_too_large",
            Outcome::UnknownUfrag => "unknown_ufrag",
            Outcome::HandshakeTimeout => "handshake_timeout",
            Outcome::ClosedEarly => "closed_early",
            Outcome::TooManyPending => "too_many_pending",
            Outcome::TooManyStreams => "too_many_streams",
            Outcome::ListenerFull => "listener_full",
        }
    }
}

/// A stream in its handshake, as the router knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// What to do with a stream after bytes arrived on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    /// No whole first frame yet: read on.
    Incomplete,
    /// Hand the stream to `pc`, replaying `replay` (everything read so far) first. It
    /// now counts as one of `pc`'s streams until [`TcpRouter::stream_ended`].
    Route {
        /// The peer connection.
        pc: PcId,
        /// The bytes read in the handshake.
        replay: Vec<u8>,
    },
    /// Close the stream and count the outcome.
    Drop(Outcome),
    /// The stream is no longer pending (it timed out, already counted): close it.
    Gone,
}

#[derive(Debug)]
struct Pending {
    from: IpAddr,
    deadline: Instant,
    buf: Vec<u8>,
}

/// The sans-IO core of ICE-TCP: admission of new streams, their first frame, and which
/// peer connection they belong to. No sockets and no clock of its own: the shell calls
///
/// - [`register`](Self::register) / [`forget`](Self::forget) as peer connections' virtual
///   listeners come and go;
/// - [`accept`](Self::accept) for each new stream, then [`receive`](Self::receive) with
///   what it reads until the answer is not [`Handshake::Incomplete`], or
///   [`closed`](Self::closed) if it ends first;
/// - [`poll_timeout`](Self::poll_timeout) for the next deadline and
///   [`handle_timeout`](Self::handle_timeout) once it has passed, closing what it returns;
/// - [`stream_ended`](Self::stream_ended) when a routed stream is gone.
#[derive(Debug, Default)]
pub struct TcpRouter {
    limits: TcpLimits,
    by_ufrag: HashMap<String, PcId>,
    ufrag_of: HashMap<PcId, String>,
    pending: HashMap<StreamId, Pending>,
    pending_by_ip: HashMap<IpAddr, usize>,
    /// Routed streams per peer connection; kept after `forget` until they end.
    open: HashMap<PcId, usize>,
    open_total: usize,
    next_stream: u64,
}

impl TcpRouter {
    /// An empty router.
    pub fn new(limits: TcpLimits) -> TcpRouter {
        TcpRouter {
            limits,
            ..TcpRouter::default()
        }
    }

    /// Routes streams whose first check names `ufrag` to `pc` from now on. Registering
    /// the same pair again is a no-op; a new ufrag for `pc` replaces its old one.
    pub fn register(&mut self, pc: PcId, ufrag: &str) -> Result<(), UfragInUse> {
        match self.by_ufrag.get(ufrag) {
            Some(owner) if *owner == pc => return Ok(()),
            Some(_) => return Err(UfragInUse),
            None => {}
        }
        if let Some(old) = self.ufrag_of.insert(pc, ufrag.to_owned()) {
            self.by_ufrag.remove(&old);
        }
        self.by_ufrag.insert(ufrag.to_owned(), pc);
        Ok(())
    }

    /// Forgets a peer connection's ufrag. Its routed streams still count until they end.
    pub fn forget(&mut self, pc: PcId) {
        if let Some(ufrag) = self.ufrag_of.remove(&pc) {
            self.by_ufrag.remove(&ufrag);
        }
    }

    /// Admits a new stream from `from`, or refuses it ([`Outcome::TooManyPending`]).
    pub fn accept(&mut self, now: Instant, from: IpAddr) -> Result<StreamId, Outcome> {
        let from_ip = self.pending_by_ip.get(&from).copied().unwrap_or(0);
        if self.pending.len() >= self.limits.max_pending
            || from_ip >= self.limits.max_pending_per_ip
        {
            return Err(Outcome::TooManyPending);
        }
        self.next_stream += 1;
        let id = StreamId(self.next_stream);
        self.pending.insert(
            id,
            Pending {
                from,
                deadline: now + self.limits.handshake_timeout,
                buf: Vec::new(),
            },
        );
        *self.pending_by_ip.entry(from).or_default() += 1;
        Ok(id)
    }

    /// Takes bytes read from a stream in its handshake.
    pub fn receive(&mut self, id: StreamId, data: &[u8]) -> Handshake {
        let Some(p) = self.pending.get_mut(&id) else {
            return Handshake::Gone;
        };
        p.buf.extend_from_slice(data);
        let decision = first_frame(&p.buf, self.limits.max_first_frame);
        let frame = match decision {
            FirstFrame::Incomplete => return Handshake::Incomplete,
            FirstFrame::Invalid(outcome) => {
                self.remove_pending(id);
                return Handshake::Drop(outcome);
            }
            FirstFrame::Frame(frame) => frame,
        };
        let pc = match request_local_ufrag(frame) {
            None => Err(Outcome::NotStun),
            Some(ufrag) => std::str::from_utf8(ufrag)
                .ok()
                .and_then(|u| self.by_ufrag.get(u))
                .copied()
                .ok_or(Outcome::UnknownUfrag),
        };
        let pending = self.remove_pending(id).expect("pending above");
        let pc = match pc {
            Ok(pc) => pc,
            Err(outcome) => return Handshake::Drop(outcome),
        };
        let open = self.open.entry(pc).or_default();
        if *open >= self.limits.max_streams_per_pc {
            return Handshake::Drop(Outcome::TooManyStreams);
        }
        *open += 1;
        self.open_total += 1;
        Handshake::Route {
            pc,
            replay: pending.buf,
        }
    }

    /// A stream ended in its handshake; `true` if it was still pending (to be counted
    /// as [`Outcome::ClosedEarly`]).
    pub fn closed(&mut self, id: StreamId) -> bool {
        self.remove_pending(id).is_some()
    }

    /// A routed stream of `pc` is gone.
    pub fn stream_ended(&mut self, pc: PcId) {
        if let Some(n) = self.open.get_mut(&pc) {
            *n -= 1;
            self.open_total -= 1;
            if *n == 0 {
                self.open.remove(&pc);
            }
        }
    }

    /// When the next handshake times out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Drops every handshake whose deadline has passed; the shell closes them and
    /// counts each as [`Outcome::HandshakeTimeout`].
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<StreamId> {
        let expired: Vec<StreamId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            self.remove_pending(*id);
        }
        expired
    }

    /// Streams in their handshake.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Routed streams not yet ended.
    pub fn open(&self) -> usize {
        self.open_total
    }

    fn remove_pending(&mut self, id: StreamId) -> Option<Pending> {
        let p = self.pending.remove(&id)?;
        if let Some(n) = self.pending_by_ip.get_mut(&p.from) {
            *n -= 1;
            if *n == 0 {
                self.pending_by_ip.remove(&p.from);
            }
        }
        Some(p)
    }
}

/// The first RFC 4571 frame of `buf`, as far as it has arrived.
enum FirstFrame<'a> {
    Incomplete,
    Frame(&'a [u8]),
    Invalid(Outcome),
}

fn first_frame(buf: &[u8], max: usize) -> FirstFrame<'_> {
    let Some(head) = buf.get(..2) else {
        return FirstFrame::Incomplete;
    };
    let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
    if len > max {
        return FirstFrame::Invalid(Outcome::FrameTooLarge);
    }
    // STUN has a 20-byte header and a first byte of 0..=3 (RFC 7983): no need to wait
    // for the rest of something that cannot be a check.
    if len < 20 || buf.get(2).is_some_and(|b| *b > 3) {
        return FirstFrame::Invalid(Outcome::NotStun);
    }
    match buf.get(2..2 + len) {
        Some(frame) => FirstFrame::Frame(frame),
        None => FirstFrame::Incomplete,
    }
}

// ---------------------------------------------------------------------------------
// The IO shell
// ---------------------------------------------------------------------------------

/// The node's ICE-TCP listener and its routing; cheap to clone.
#[derive(Clone, Debug)]
pub struct TcpMux {
    shared: Arc<Shared>,
}

struct Shared {
    local: SocketAddr,
    /// What passive candidates announce: the public or bound address, and the port.
    advertised: SocketAddr,
    state: Mutex<State>,
    next_listener: AtomicU64,
    metrics: TcpMetrics,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpMux")
            .field("local", &self.local)
            .field("advertised", &self.advertised)
            .finish_non_exhaustive()
    }
}

type Accepted = (Arc<dyn AsyncTcpStream>, SocketAddr);

/// A virtual listener as the shared state knows it.
#[derive(Clone)]
struct ListenerEntry {
    id: u64,
    /// The placeholder's address: the local address its streams report.
    local: SocketAddr,
    tx: mpsc::Sender<Accepted>,
}

struct State {
    router: TcpRouter,
    /// Each registered connection's virtual listeners, newest last (an ICE restart binds
    /// a new one); the newest gets the streams.
    listeners: HashMap<PcId, Vec<ListenerEntry>>,
    /// The handshake tasks, to stop those that time out.
    handshakes: HashMap<StreamId, tokio::task::AbortHandle>,
}

#[derive(Clone)]
struct TcpMetrics {
    streams: IntCounterVec,
    open: IntGauge,
    pending: IntGauge,
    bytes: IntCounterVec,
    frames_dropped: IntCounterVec,
}

impl TcpMetrics {
    fn register(metrics: &Metrics) -> TcpMetrics {
        let m = TcpMetrics {
            streams: IntCounterVec::new(
                Opts::new(
                    "relay_ice_tcp_streams_total",
                    "TCP streams on the ICE-TCP port, by outcome (routed: handed to a peer \
                     connection; the others were closed).",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            open: IntGauge::new(
                "relay_ice_tcp_streams_open",
                "ICE-TCP media streams held by peer connections.",
            )
            .expect("valid metric"),
            pending: IntGauge::new(
                "relay_ice_tcp_streams_pending",
                "ICE-TCP streams waiting for their first frame.",
            )
            .expect("valid metric"),
            bytes: IntCounterVec::new(
                Opts::new(
                    "relay_ice_tcp_bytes_total",
                    "Bytes of media over ICE-TCP streams, framing included, by direction \
                     (in, out).",
                ),
                &["direction"],
            )
            .expect("valid metric"),
            frames_dropped: IntCounterVec::new(
                Opts::new(
                    "relay_ice_tcp_frames_dropped_total",
                    "Frames not sent on an ICE-TCP stream, by reason (send_queue_full).",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        };
        for outcome in Outcome::ALL {
            m.streams.with_label_values(&[outcome.as_str()]);
        }
        for direction in ["in", "out"] {
            m.bytes.with_label_values(&[direction]);
        }
        m.frames_dropped.with_label_values(&["send_queue_full"]);
        // As the UDP mux's: registered here, they exist only with the port set.
        let _ = metrics.registry.register(Box::new(m.streams.clone()));
        let _ = metrics.registry.register(Box::new(m.open.clone()));
        let _ = metrics.registry.register(Box::new(m.pending.clone()));
        let _ = metrics.registry.register(Box::new(m.bytes.clone()));
        let _ = metrics
            .registry
            .register(Box::new(m.frames_dropped.clone()));
        m
    }

    fn count(&self, outcome: Outcome) {
        self.streams.with_label_values(&[outcome.as_str()]).inc();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TcpMux {
    /// Listens on `ip:port` and starts the accept task. Passive candidates announce
    /// `public_ip` (or `ip`) and the bound port. Must be called within a tokio runtime.
    pub fn bind(
        ip: IpAddr,
        port: u16,
        public_ip: Option<IpAddr>,
        metrics: &Metrics,
    ) -> io::Result<TcpMux> {
        Self::bind_with(ip, port, public_ip, metrics, TcpLimits::default())
    }

    fn bind_with(
        ip: IpAddr,
        port: u16,
        public_ip: Option<IpAddr>,
        metrics: &Metrics,
        limits: TcpLimits,
    ) -> io::Result<TcpMux> {
        let listener = std::net::TcpListener::bind(SocketAddr::new(ip, port))?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            local,
            advertised: SocketAddr::new(public_ip.unwrap_or(ip), local.port()),
            state: Mutex::new(State {
                router: TcpRouter::new(limits),
                listeners: HashMap::new(),
                handshakes: HashMap::new(),
            }),
            next_listener: AtomicU64::new(1),
            metrics: TcpMetrics::register(metrics),
        });
        tracing::info!(%local, "media ICE-TCP port listening");
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(TcpMux { shared })
    }

    /// The address passive candidates announce.
    pub fn advertised(&self) -> SocketAddr {
        self.shared.advertised
    }

    /// `sdp` with passive TCP host candidates announcing [`TcpMux::advertised`] and
    /// active ones removed (see [`rewrite_tcp_candidates`]).
    pub fn advertise(&self, sdp: &str) -> String {
        rewrite_tcp_candidates(sdp, self.shared.advertised)
    }

    /// A virtual listener for peer connection `pc`, whose checks name `ufrag`, in place of
    /// the placeholder bound on `local`. Dropping it forgets the ufrag.
    pub(super) fn attach(
        &self,
        pc: PcId,
        ufrag: &str,
        local: SocketAddr,
    ) -> io::Result<Arc<dyn AsyncTcpListener>> {
        let (tx, rx) = mpsc::channel(LISTENER_BACKLOG);
        let id = self.shared.next_listener.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.shared.state);
        state.router.register(pc, ufrag).map_err(io::Error::other)?;
        state
            .listeners
            .entry(pc)
            .or_default()
            .push(ListenerEntry { id, local, tx });
        Ok(Arc::new(Listener {
            mux: self.shared.clone(),
            pc,
            id,
            local,
            accepted: tokio::sync::Mutex::new(rx),
        }))
    }
}

/// Accepts on the node's listener and expires handshakes, until the process ends.
async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let deadline = lock(&shared.state).router.poll_timeout();
        let expiry = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => shared.admit(stream, from),
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "media ICE-TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = expiry => shared.expire(Instant::now()),
        }
    }
}

impl Shared {
    fn admit(self: &Arc<Self>, stream: tokio::net::TcpStream, from: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let mut state = lock(&self.state);
        match state.router.accept(Instant::now(), from.ip()) {
            Ok(id) => {
                let task = tokio::spawn(handshake(self.clone(), id, stream, from));
                state.handshakes.insert(id, task.abort_handle());
            }
            Err(outcome) => self.metrics.count(outcome),
        }
        self.metrics.pending.set(state.router.pending() as i64);
    }

    fn expire(&self, now: Instant) {
        let mut state = lock(&self.state);
        for id in state.router.handle_timeout(now) {
            if let Some(task) = state.handshakes.remove(&id) {
                // Dropping the task's stream closes it.
                task.abort();
            }
            self.metrics.count(Outcome::HandshakeTimeout);
        }
        self.metrics.pending.set(state.router.pending() as i64);
    }

    /// Takes what a stream in its handshake read (`None`: it ended) and, when routed,
    /// the listener to hand it to.
    fn handshake_step(&self, id: StreamId, read: Option<&[u8]>) -> Step {
        let mut state = lock(&self.state);
        let decision = match read {
            Some(data) => state.router.receive(id, data),
            None => {
                if state.router.closed(id) {
                    self.metrics.count(Outcome::ClosedEarly);
                }
                Handshake::Gone
            }
        };
        let step = match decision {
            Handshake::Incomplete => return Step::ReadOn,
            Handshake::Route { pc, replay } => {
                let newest = state.listeners.get(&pc).and_then(|l| l.last()).cloned();
                match newest {
                    Some(listener) => Step::Deliver {
                        pc,
                        listener,
                        replay,
                    },
                    None => {
                        // Its listener went away in between: no place for the stream.
                        state.router.stream_ended(pc);
                        self.metrics.count(Outcome::UnknownUfrag);
                        Step::Close
                    }
                }
            }
            Handshake::Drop(outcome) => {
                self.metrics.count(outcome);
                Step::Close
            }
            Handshake::Gone => Step::Close,
        };
        state.handshakes.remove(&id);
        self.metrics.pending.set(state.router.pending() as i64);
        self.metrics.open.set(state.router.open() as i64);
        step
    }

    fn stream_ended(&self, pc: PcId) {
        let mut state = lock(&self.state);
        state.router.stream_ended(pc);
        self.metrics.open.set(state.router.open() as i64);
    }

    fn detach(&self, pc: PcId, id: u64) {
        let mut state = lock(&self.state);
        if let Some(list) = state.listeners.get_mut(&pc) {
            list.retain(|l| l.id != id);
            if list.is_empty() {
                state.listeners.remove(&pc);
                state.router.forget(pc);
            }
        }
    }
}

/// What a handshake task does next.
enum Step {
    ReadOn,
    Close,
    Deliver {
        pc: PcId,
        listener: ListenerEntry,
        replay: Vec<u8>,
    },
}

/// Reads a new stream until its first frame decides where it goes, and takes it there.
async fn handshake(
    shared: Arc<Shared>,
    id: StreamId,
    mut stream: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let mut buf = vec![0u8; HANDSHAKE_READ];
    let (pc, listener, replay) = loop {
        let read = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(&buf[..n]),
        };
        match shared.handshake_step(id, read) {
            Step::ReadOn => continue,
            Step::Close => return,
            Step::Deliver {
                pc,
                listener,
                replay,
            } => break (pc, listener, replay),
        }
    };
    let (read, write) = stream.into_split();
    let (out, queue) = mpsc::channel(SEND_QUEUE_FRAMES);
    let media = MediaStream {
        read,
        replay: Mutex::new(Bytes::from(replay)),
        out,
        local: listener.local,
        peer,
        metrics: shared.metrics.clone(),
        _open: OpenGuard {
            mux: shared.clone(),
            pc,
        },
    };
    match listener.tx.try_send((Arc::new(media), peer)) {
        Ok(()) => {
            shared.metrics.count(Outcome::Routed);
            write_out(write, queue, shared.metrics.clone()).await;
        }
        // Dropping the stream closes it and gives its place back.
        Err(_) => shared.metrics.count(Outcome::ListenerFull),
    }
}

/// Sends what a stream's queue holds until the stream is dropped or the socket fails.
async fn write_out(
    mut socket: tokio::net::tcp::OwnedWriteHalf,
    mut queue: mpsc::Receiver<Bytes>,
    metrics: TcpMetrics,
) {
    let out = metrics.bytes.with_label_values(&["out"]);
    while let Some(frame) = queue.recv().await {
        if socket.write_all(&frame).await.is_err() {
            // The read side sees the failure too; the driver drops the stream then.
            return;
        }
        out.inc_by(frame.len() as u64);
    }
    let _ = socket.shutdown().await;
}

/// Gives a routed stream's place back when it is dropped.
struct OpenGuard {
    mux: Arc<Shared>,
    pc: PcId,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.mux.stream_ended(self.pc);
    }
}

/// A peer connection's virtual listener: accepts the streams the router sends it.
struct Listener {
    mux: Arc<Shared>,
    pc: PcId,
    id: u64,
    local: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::Receiver<Accepted>>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("pc", &self.pc)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.mux.detach(self.pc, self.id);
    }
}

impl AsyncTcpListener for Listener {
    fn accept<'a>(
        &'a self,
    ) -> Pin<Box<dyn Future<Output = io::Result<(Arc<dyn AsyncTcpStream>, SocketAddr)>> + Send + 'a>>
    {
        Box::pin(async move {
            // The sender lives in the shared state until this listener is dropped.
            self.accepted
                .lock()
                .await
                .recv()
                .await
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A routed stream as its peer connection sees it: the bytes of the handshake first,
/// then the socket; frames written go to the writer task's queue.
struct MediaStream {
    read: tokio::net::tcp::OwnedReadHalf,
    replay: Mutex<Bytes>,
    out: mpsc::Sender<Bytes>,
    local: SocketAddr,
    peer: SocketAddr,
    metrics: TcpMetrics,
    _open: OpenGuard,
}

impl std::fmt::Debug for MediaStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaStream")
            .field("pc", &self._open.pc)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl AsyncTcpStream for MediaStream {
    fn read<'a, 'b>(
        &'a self,
        buf: &'b mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(async move {
            {
                let mut replay = lock(&self.replay);
                if !replay.is_empty() {
                    let n = replay.len().min(buf.len());
                    buf[..n].copy_from_slice(&replay[..n]);
                    replay.advance(n);
                    self.metrics
                        .bytes
                        .with_label_values(&["in"])
                        .inc_by(n as u64);
                    return Ok(n);
                }
            }
            loop {
                self.read.readable().await?;
                match self.read.try_read(buf) {
                    Ok(n) => {
                        self.metrics
                            .bytes
                            .with_label_values(&["in"])
                            .inc_by(n as u64);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        })
    }

    fn write_all<'a, 'b>(
        &'a self,
        buf: &'b [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(std::future::ready(self.queue_frame(buf)))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

impl MediaStream {
    /// Queues one whole RFC 4571 frame, or drops it whole when the queue is full. Part
    /// of a frame is refused: dropping it would break the framing.
    fn queue_frame(&self, frame: &[u8]) -> io::Result<()> {
        let whole = frame.len() >= 2
            && usize::from(u16::from_be_bytes([frame[0], frame[1]])) == frame.len() - 2;
        if !whole {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ICE-TCP streams take one whole frame per write",
            ));
        }
        match self.out.try_send(Bytes::copy_from_slice(frame)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics
                    .frames_dropped
                    .with_label_values(&["send_queue_full"])
                    .inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
        }
    }
}

/// `sdp` with every passive TCP host candidate of component 1 announcing `to`, and every
/// other TCP host candidate removed: the relay takes ICE-TCP on its one port and never
/// dials a client (no active ones), and RTCP is always muxed (a component-2 candidate
/// would only invite a second, idle connection). Every other line is kept byte for byte.
pub fn rewrite_tcp_candidates(sdp: &str, to: SocketAddr) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let Some(value) = body.strip_prefix("a=candidate:") else {
            out.push_str(line);
            continue;
        };
        let mut fields: Vec<&str> = value.split(' ').collect();
        let tcp_host = fields.len() >= 8
            && fields[2].eq_ignore_ascii_case("tcp")
            && fields[6] == "typ"
            && fields[7] == "host";
        let tcptype = fields
            .iter()
            .skip(8)
            .position(|f| *f == "tcptype")
            .and_then(|i| fields.get(8 + i + 1).copied());
        match (tcp_host, tcptype) {
            (true, Some("passive")) if fields[1] == "1" => {
                let (ip, port) = (to.ip().to_string(), to.port().to_string());
                fields[4] = &ip;
                fields[5] = &port;
                out.push_str("a=candidate:");
                out.push_str(&fields.join(" "));
                out.push_str(&line[body.len()..]);
            }
            (true, _) => {}
            (false, _) => out.push_str(line),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::mux::peer_setup;
    use crate::transport::mux::tests::binding_request;
    use proptest::prelude::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    /// `packet` with its RFC 4571 length prefix.
    fn framed(packet: &[u8]) -> Vec<u8> {
        let mut f = (packet.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(packet);
        f
    }

    fn router(limits: TcpLimits) -> (TcpRouter, Instant) {
        let mut r = TcpRouter::new(limits);
        r.register(PcId(1), "ufragone").unwrap();
        r.register(PcId(2), "ufragtwo").unwrap();
        (r, Instant::now())
    }

    #[test]
    fn a_first_check_routes_the_stream_by_the_relays_ufrag_and_replays_everything_read() {
        let (mut r, now) = router(TcpLimits::default());
        let id = r.accept(now, CLIENT).unwrap();
        let mut bytes = framed(&binding_request("ufragtwo:client"));
        // The client's next frame (DTLS) arrived in the same read as the check's end.
        bytes.extend_from_slice(&framed(b"\x16dtls"));
        assert_eq!(r.receive(id, &bytes[..1]), Handshake::Incomplete);
        assert_eq!(r.receive(id, &bytes[1..30]), Handshake::Incomplete);
        assert_eq!(
            r.receive(id, &bytes[30..]),
            Handshake::Route {
                pc: PcId(2),
                replay: bytes.clone()
            }
        );
        assert_eq!((r.pending(), r.open()), (0, 1));
        assert_eq!(r.poll_timeout(), None);
        // Done with: further bytes and a late close change nothing.
        assert_eq!(r.receive(id, b"more"), Handshake::Gone);
        assert!(!r.closed(id));
        r.stream_ended(PcId(2));
        assert_eq!(r.open(), 0);
    }

    #[test]
    fn what_is_not_a_known_check_is_dropped_with_its_reason() {
        let (mut r, now) = router(TcpLimits::default());
        let mut first = |bytes: &[u8]| {
            let id = r.accept(now, CLIENT).unwrap();
            r.receive(id, bytes)
        };
        // HTTP and TLS read as huge frame lengths.
        assert_eq!(
            first(b"GET / HTTP/1.1\r\n"),
            Handshake::Drop(Outcome::FrameTooLarge)
        );
        assert_eq!(
            first(&[0x16, 0x03, 0x01, 0x02, 0x00]),
            Handshake::Drop(Outcome::FrameTooLarge)
        );
        // A small frame that cannot be STUN is refused without waiting for the rest.
        assert_eq!(first(&[0, 200, 0x16]), Handshake::Drop(Outcome::NotStun));
        assert_eq!(first(&framed(&[0; 8])), Handshake::Drop(Outcome::NotStun));
        // STUN, but no request with a USERNAME.
        let mut indication = binding_request("ufragone:c");
        indication[1] = 0x11;
        assert_eq!(
            first(&framed(&indication)),
            Handshake::Drop(Outcome::NotStun)
        );
        // A check for nobody, or naming a relay ufrag only in the client's half.
        assert_eq!(
            first(&framed(&binding_request("nosuch:c"))),
            Handshake::Drop(Outcome::UnknownUfrag)
        );
        assert_eq!(
            first(&framed(&binding_request("c:ufragone"))),
            Handshake::Drop(Outcome::UnknownUfrag)
        );
        assert_eq!((r.pending(), r.open()), (0, 0));
    }

    #[test]
    fn handshakes_are_bounded_in_number_and_time() {
        let limits = TcpLimits {
            max_pending: 3,
            max_pending_per_ip: 2,
            ..TcpLimits::default()
        };
        let (mut r, now) = router(limits.clone());
        let other = IpAddr::from([198, 51, 100, 7]);
        let a = r.accept(now, CLIENT).unwrap();
        let later = now + Duration::from_secs(1);
        let b = r.accept(later, CLIENT).unwrap();
        assert_eq!(r.accept(later, CLIENT), Err(Outcome::TooManyPending));
        let c = r.accept(later, other).unwrap();
        assert_eq!(r.accept(later, other), Err(Outcome::TooManyPending));
        assert_eq!(r.poll_timeout(), Some(now + limits.handshake_timeout));
        // A stream that closes early gives its place back.
        assert!(r.closed(a));
        assert!(!r.closed(a));
        let d = r.accept(later, CLIENT).unwrap();
        // Half a check is not enough to stay.
        assert_eq!(r.receive(b, &[0, 60, 0, 1]), Handshake::Incomplete);
        let deadline = later + limits.handshake_timeout;
        assert_eq!(r.poll_timeout(), Some(deadline));
        assert!(
            r.handle_timeout(deadline - Duration::from_millis(1))
                .is_empty()
        );
        let mut expired = r.handle_timeout(deadline);
        expired.sort();
        assert_eq!(expired, vec![b, c, d]);
        assert_eq!((r.pending(), r.poll_timeout()), (0, None));
        assert_eq!(r.receive(b, &[0; 60]), Handshake::Gone);
        assert!(r.accept(deadline, CLIENT).is_ok());
    }

    #[test]
    fn streams_per_peer_connection_are_bounded_and_outlive_its_ufrag() {
        let (mut r, now) = router(TcpLimits {
            max_streams_per_pc: 2,
            ..TcpLimits::default()
        });
        let check = framed(&binding_request("ufragone:c"));
        let route = |r: &mut TcpRouter| {
            let id = r.accept(now, CLIENT).unwrap();
            r.receive(id, &check)
        };
        assert!(matches!(
            route(&mut r),
            Handshake::Route { pc: PcId(1), .. }
        ));
        assert!(matches!(
            route(&mut r),
            Handshake::Route { pc: PcId(1), .. }
        ));
        assert_eq!(route(&mut r), Handshake::Drop(Outcome::TooManyStreams));
        r.stream_ended(PcId(1));
        assert!(matches!(
            route(&mut r),
            Handshake::Route { pc: PcId(1), .. }
        ));
        // The connection's listener goes: its ufrag routes nothing more, its streams
        // still count until they end.
        r.forget(PcId(1));
        assert_eq!(route(&mut r), Handshake::Drop(Outcome::UnknownUfrag));
        assert_eq!(r.open(), 2);
        r.stream_ended(PcId(1));
        r.stream_ended(PcId(1));
        r.stream_ended(PcId(1));
        assert_eq!(r.open(), 0);
        // The ufrag is free for another connection; one ufrag has one owner.
        assert_eq!(r.register(PcId(2), "ufragone"), Ok(()));
        assert_eq!(r.register(PcId(3), "ufragone"), Err(UfragInUse));
        assert!(matches!(
            route(&mut r),
            Handshake::Route { pc: PcId(2), .. }
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_in_any_pieces_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            cuts in proptest::collection::vec(0usize..300, 0..6),
        ) {
            let (mut r, now) = router(TcpLimits::default());
            let id = r.accept(now, CLIENT).unwrap();
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c <= data.len()).collect();
            cuts.push(data.len());
            cuts.sort();
            let mut start = 0;
            for cut in cuts {
                if r.receive(id, &data[start..cut]) != Handshake::Incomplete {
                    break;
                }
                start = cut;
            }
            prop_assert!(r.pending() <= 1);
        }
    }

    #[test]
    fn passive_candidates_name_the_shared_port_and_the_others_go() {
        let sdp = "v=0\r\n\
                   a=candidate:1 1 udp 2130706431 10.0.0.5 40001 typ host\r\n\
                   a=candidate:2 1 tcp 1671430143 10.0.0.5 38211 typ host tcptype passive\r\n\
                   a=candidate:2 2 tcp 1671430143 10.0.0.5 38211 typ host tcptype passive\r\n\
                   a=candidate:3 1 tcp 1671430143 10.0.0.5 9 typ host tcptype active\r\n\
                   a=end-of-candidates\r\n";
        let to: SocketAddr = "203.0.113.10:3478".parse().unwrap();
        assert_eq!(
            rewrite_tcp_candidates(sdp, to),
            "v=0\r\n\
             a=candidate:1 1 udp 2130706431 10.0.0.5 40001 typ host\r\n\
             a=candidate:2 1 tcp 1671430143 203.0.113.10 3478 typ host tcptype passive\r\n\
             a=end-of-candidates\r\n"
        );
    }

    fn metric(metrics: &Metrics, line: &str) -> Option<String> {
        let prefix = format!("{line} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    async fn wait_for(metrics: &Metrics, line: &str, value: &str) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while metric(metrics, line).as_deref() != Some(value) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{line} never became {value}: {:?}", metric(metrics, line)));
    }

    /// Reads until the other end closes; what was read.
    async fn read_to_close(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut got))
            .await
            .expect("the relay closes the stream")
            .ok();
        got
    }

    /// Two virtual listeners on one port, driven through the runtime as the crate's
    /// driver would: a stream goes to the connection its first check names, with the
    /// check replayed and the placeholder as its local address; what the connection
    /// writes reaches the client; garbage, silence and unknown ufrags are closed and
    /// counted; the stream's end and the listener's are noticed.
    #[tokio::test]
    async fn routes_streams_to_their_peer_connection_over_loopback() {
        let metrics = Metrics::new();
        let lo = IpAddr::from([127, 0, 0, 1]);
        let limits = TcpLimits {
            handshake_timeout: Duration::from_millis(300),
            ..TcpLimits::default()
        };
        let mux = TcpMux::bind_with(lo, 0, None, &metrics, limits).unwrap();
        let port = mux.advertised().port();
        let (a, b) = (peer_setup(None, Some(&mux)), peer_setup(None, Some(&mux)));
        let placeholder = || std::net::TcpListener::bind((lo, 0)).unwrap();
        let (place_a, place_b) = (placeholder(), placeholder());
        let local_b = place_b.local_addr().unwrap();
        let listen_a = a.runtime.wrap_tcp_listener(place_a).unwrap();
        let listen_b = b.runtime.wrap_tcp_listener(place_b).unwrap();
        assert_eq!(listen_b.local_addr().unwrap(), local_b);
        // The relay dials nobody.
        assert!(b.runtime.connect_tcp((lo, port).into()).await.is_err());

        let mut client = tokio::net::TcpStream::connect((lo, port)).await.unwrap();
        let mut sent = framed(&binding_request(&format!("{}:client", b.ufrag)));
        sent.extend_from_slice(&framed(b"\x16dtls"));
        client.write_all(&sent).await.unwrap();
        let (stream, from) = tokio::time::timeout(Duration::from_secs(5), listen_b.accept())
            .await
            .expect("B accepts the stream")
            .unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        assert_eq!(stream.local_addr().unwrap(), local_b);
        assert_eq!(stream.peer_addr().unwrap(), from);
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let mut buf = [0u8; 7];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, sent, "the handshake's bytes are replayed, in order");
        // Later bytes come straight from the socket.
        client.write_all(&framed(b"\x80srtp")).await.unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &framed(b"\x80srtp")[..]);
        // Writes go out whole frames only.
        stream.write_all(&framed(b"reply")).await.unwrap();
        assert!(stream.write_all(b"\x00\x09half").await.is_err());
        let mut reply = vec![0u8; 7];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(reply, framed(b"reply"));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), listen_a.accept())
                .await
                .is_err(),
            "the other connection got a stream"
        );
        assert_eq!(
            metric(&metrics, "relay_ice_tcp_streams_total{outcome=\"routed\"}").as_deref(),
            Some("1")
        );
        assert_eq!(
            metric(&metrics, "relay_ice_tcp_streams_open").as_deref(),
            Some("1")
        );

        // Garbage: HTTP, silence, a check for nobody. Each is closed and counted, and
        // the live stream is untouched.
        let mut http = tokio::net::TcpStream::connect((lo, port)).await.unwrap();
        http.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut silent = tokio::net::TcpStream::connect((lo, port)).await.unwrap();
        let mut stranger = tokio::net::TcpStream::connect((lo, port)).await.unwrap();
        stranger
            .write_all(&framed(&binding_request("nosuchufrag:x")))
            .await
            .unwrap();
        for s in [&mut http, &mut silent, &mut stranger] {
            assert!(read_to_close(s).await.is_empty());
        }
        for outcome in ["frame_too_large", "handshake_timeout", "unknown_ufrag"] {
            let line = format!("relay_ice_tcp_streams_total{{outcome=\"{outcome}\"}}");
            wait_for(&metrics, &line, "1").await;
        }
        assert_eq!(
            metric(&metrics, "relay_ice_tcp_streams_pending").as_deref(),
            Some("0")
        );
        client.write_all(&framed(b"\x80again")).await.unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &framed(b"\x80again")[..]);

        // The driver drops the stream: the client sees the close, the gauge follows.
        drop(stream);
        assert!(read_to_close(&mut client).await.is_empty());
        wait_for(&metrics, "relay_ice_tcp_streams_open", "0").await;
        // The connection closes: its ufrag routes nothing any more.
        drop(listen_b);
        let mut late = tokio::net::TcpStream::connect((lo, port)).await.unwrap();
        late.write_all(&framed(&binding_request(&format!("{}:client", b.ufrag))))
            .await
            .unwrap();
        assert!(read_to_close(&mut late).await.is_empty());
        wait_for(
            &metrics,
            "relay_ice_tcp_streams_total{outcome=\"unknown_ufrag\"}",
            "2",
        )
        .await;
    }
}
