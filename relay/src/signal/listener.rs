//! The signalling listener: accepts TCP connections, admits each against the node's and
//! its address's connection limits, and serves HTTP/1.1 on it with a deadline for every
//! state a connection can be in.
//!
//! | state | deadline | closed as |
//! |---|---|---|
//! | TLS handshake and first request head | `limits.handshake_timeout` ([`super::handshake`]) | `relay_handshake_failures_total{reason}` |
//! | request body | `limits.body_timeout`, the whole body from its head on (`json` in [`super::http`]) | `body_timeout` |
//! | kept-alive, after a response, until the next head is complete | `limits.idle_timeout` (hyper's `header_read_timeout`, which starts when the connection goes idle) | `idle_timeout` (nothing came), `head_timeout` (part of a head came) |
//! | upgraded WebSocket | none: it lives as long as the session | — |
//!
//! A WebSocket upgrade is a request like any other, so it is under the head deadlines;
//! once answered with 101 the connection leaves hyper and no HTTP deadline applies.
//!
//! **Admission.** Every accepted TCP connection takes a [`ConnectionPermit`] from the
//! [`ConnectionGate`] in the accept loop, before TLS, or is closed at once
//! (`node_limit`, `address_limit`). The permit lives in the connection's stream
//! ([`Tracked`]), which an upgraded WebSocket keeps, so `limits.max_connections` counts
//! HTTP connections and WebSockets alike and is exact under any burst;
//! `relay_connections_open` shows the count. Later request heads are bounded to
//! [`MAX_HEAD`] by hyper's read buffer (`head_too_large`, answered `431`).
//!
//! Closures are counted in `relay_connections_closed_total{reason}` ([`CloseReason`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum_server::accept::Accept;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::handshake::MAX_HEAD;
use crate::config::LimitsConfig;
use crate::metrics::Metrics;

/// Why the relay refused or closed a connection outside its first request (`reason`
/// label of `relay_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// `limits.max_connections` connections were open already.
    NodeLimit,
    /// `limits.max_connections_per_address` connections from this address were open.
    AddressLimit,
    /// A kept-alive connection sent nothing within `limits.idle_timeout`.
    IdleTimeout,
    /// A later request head was begun but not complete within `limits.idle_timeout`.
    HeadTimeout,
    /// A later request head was larger than [`MAX_HEAD`].
    HeadTooLarge,
    /// A request body did not arrive in full within `limits.body_timeout`.
    BodyTimeout,
}

impl CloseReason {
    /// Every reason, for the metric's labels.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::NodeLimit,
        CloseReason::AddressLimit,
        CloseReason::IdleTimeout,
        CloseReason::HeadTimeout,
        CloseReason::HeadTooLarge,
        CloseReason::BodyTimeout,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::NodeLimit => "node_limit",
            CloseReason::AddressLimit => "address_limit",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HeadTimeout => "head_timeout",
            CloseReason::HeadTooLarge => "head_too_large",
            CloseReason::BodyTimeout => "body_timeout",
        }
    }

    /// Counts one closure for this reason.
    pub fn count(self, metrics: &Metrics) {
        metrics
            .connections_closed_total
            .with_label_values(&[self.as_str()])
            .inc();
    }
}

/// Counts open connections, node-wide and per client address, and admits new ones only
/// under both limits.
#[derive(Debug)]
pub struct ConnectionGate {
    max_total: usize,
    max_per_address: Option<usize>,
    open: Mutex<OpenConnections>,
    gauge: prometheus::IntGauge,
}

#[derive(Debug, Default)]
struct OpenConnections {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

impl ConnectionGate {
    /// A gate for at most `max_total` connections, and `max_per_address` from one address
    /// (`None`: no per-address limit); `gauge` follows the open count.
    pub fn new(
        max_total: usize,
        max_per_address: Option<usize>,
        gauge: prometheus::IntGauge,
    ) -> Arc<Self> {
        Arc::new(ConnectionGate {
            max_total,
            max_per_address,
            open: Mutex::new(OpenConnections::default()),
            gauge,
        })
    }

    /// The gate `[limits]` asks for: `max_connections`, and
    /// `max_connections_per_address` unless the peers are a proxy (`trust_forwarded_for`).
    pub fn from_limits(limits: &LimitsConfig, gauge: prometheus::IntGauge) -> Arc<Self> {
        let per_address =
            (!limits.trust_forwarded_for).then_some(limits.max_connections_per_address);
        Self::new(limits.max_connections, per_address, gauge)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // The counts stay consistent even if a holder panicked: every update is one step.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A permit for one more connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, CloseReason> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(CloseReason::NodeLimit);
        }
        let from_ip = open.per_address.get(&ip).copied().unwrap_or(0);
        if self.max_per_address.is_some_and(|max| from_ip >= max) {
            return Err(CloseReason::AddressLimit);
        }
        open.total += 1;
        open.per_address.insert(ip, from_ip + 1);
        self.gauge.inc();
        Ok(ConnectionPermit {
            gate: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Connections open now from `ip`.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.lock().per_address.get(&ip).copied().unwrap_or(0)
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_address.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.per_address.remove(&ip);
            }
        }
        self.gauge.dec();
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    gate: Arc<ConnectionGate>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.gate.release(self.ip);
    }
}

/// What a connection did last, to tell an idle connection from a slow head when
/// hyper's head deadline fires.
#[derive(Debug, Default)]
pub struct Activity {
    read_since_write: AtomicBool,
}

impl Activity {
    /// Whether bytes arrived since the relay last wrote (part of a next request).
    pub fn read_since_write(&self) -> bool {
        self.read_since_write.load(Ordering::Relaxed)
    }
}

/// A connection's stream: holds its [`ConnectionPermit`] for as long as it lives
/// (through a WebSocket upgrade too) and notes its [`Activity`].
pub struct Tracked<S> {
    io: S,
    activity: Arc<Activity>,
    _permit: ConnectionPermit,
}

impl<S> Tracked<S> {
    /// `io`, admitted with `permit`.
    pub fn new(io: S, permit: ConnectionPermit) -> Self {
        Tracked {
            io,
            activity: Arc::default(),
            _permit: permit,
        }
    }

    /// Its activity, readable after hyper has taken the stream.
    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity
                .read_since_write
                .store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> Tracked<S> {
    fn wrote(&self, polled: &Poll<io::Result<usize>>) {
        if matches!(polled, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity
                .read_since_write
                .store(false, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How HTTP/1.1 is served on every connection: keep-alive with `idle_timeout` from the
/// end of a response to the end of the next head, heads of at most [`MAX_HEAD`].
pub fn http_builder(idle_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(idle_timeout)
        // A complete head over the limit too (the buffer bound only catches incomplete ones).
        .max_header_size(MAX_HEAD)
        .max_buf_size(MAX_HEAD);
    builder
}

/// How long connections get to finish their request once the node shuts down.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves HTTP on one admitted connection until it closes; returns why the relay closed
/// it, if it was one of the deadlines or limits hyper enforces. From `shutdown` on, the
/// request in flight may finish within [`SHUTDOWN_GRACE`].
pub async fn serve_connection<S, T>(
    builder: &http1::Builder,
    io: Tracked<T>,
    service: S,
    mut shutdown: watch::Receiver<bool>,
) -> Option<CloseReason>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<axum::body::Body>,
        >,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    let activity = io.activity();
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown_requested(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            tokio::time::timeout(SHUTDOWN_GRACE, conn.as_mut())
                .await
                .unwrap_or(Ok(()))
        }
    };
    let error = result.err()?;
    if error.is_timeout() {
        Some(if activity.read_since_write() {
            CloseReason::HeadTimeout
        } else {
            CloseReason::IdleTimeout
        })
    } else if error.is_parse_too_large() {
        Some(CloseReason::HeadTooLarge)
    } else {
        None
    }
}

/// Resolves once shutdown is requested (or whoever could request it is gone).
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

/// The router as a hyper service that knows the connection's peer (`ConnectInfo`).
fn service_for(
    app: Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<hyper::Response<axum::body::Body>, std::convert::Infallible>>
             + Send
             + 'static,
> {
    let app = TowerToHyperService::new(app);
    hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        hyper::service::Service::call(&app, req)
    })
}

/// Accepts connections on `listener` until `shutdown`, admits each through `gate`, runs
/// `acceptor` on it (the [`super::handshake::HandshakeGuard`]) and serves `app`. Returns
/// once the listener is closed and the HTTP requests in flight are done (at most
/// [`SHUTDOWN_GRACE`]); upgraded WebSockets are not waited for.
pub async fn serve<A>(
    listener: TcpListener,
    acceptor: A,
    app: Router,
    gate: Arc<ConnectionGate>,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) where
    A: Accept<TcpStream, ()> + Clone + Send + Sync + 'static,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A::Service: Send,
    A::Future: Send + 'static,
{
    let builder = Arc::new(http_builder(idle_timeout));
    let serving = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: back off
                // briefly rather than spin.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match gate.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(reason) => {
                reason.count(&metrics);
                tracing::debug!(%peer, reason = reason.as_str(), "connection refused");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        let serving = serving.clone();
        serving.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            // Failures of the handshake phase are counted by the acceptor.
            if let Ok((stream, _)) = acceptor.accept(tcp, ()).await {
                let io = Tracked::new(stream, permit);
                let closed = serve_connection(&builder, io, service_for(app, peer), shutdown).await;
                if let Some(reason) = closed {
                    reason.count(&metrics);
                    tracing::debug!(%peer, reason = reason.as_str(), "connection closed");
                }
            }
            serving.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(listener);
    let waited = tokio::time::Instant::now();
    while serving.load(Ordering::SeqCst) > 0 && waited.elapsed() < SHUTDOWN_GRACE * 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    fn gate(total: usize, per_address: Option<usize>) -> Arc<ConnectionGate> {
        let gauge = prometheus::IntGauge::new("open", "open").expect("gauge");
        ConnectionGate::new(total, per_address, gauge)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn the_node_limit_is_exact_and_a_closed_connection_frees_its_place() {
        let g = gate(3, None);
        let held: Vec<_> = (0..3)
            .map(|i| g.admit(ip(i)).expect("under the limit"))
            .collect();
        assert_eq!(g.admit(ip(9)).unwrap_err(), CloseReason::NodeLimit);
        assert_eq!(g.open(), 3);
        assert_eq!(g.gauge.get(), 3);
        drop(held);
        assert_eq!(g.open(), 0);
        assert_eq!(g.gauge.get(), 0);
        let _again = g.admit(ip(9)).expect("room again");
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share() {
        let g = gate(100, Some(2));
        let a1 = g.admit(ip(1)).expect("first");
        let _a2 = g.admit(ip(1)).expect("second");
        assert_eq!(g.admit(ip(1)).unwrap_err(), CloseReason::AddressLimit);
        // Other addresses are not affected.
        let _b = g.admit(ip(2)).expect("another address");
        assert_eq!(g.open_from(ip(1)), 2);
        drop(a1);
        let _a3 = g.admit(ip(1)).expect("a place freed");
        assert_eq!(g.open(), 3);
    }

    #[test]
    fn with_a_trusted_proxy_there_is_no_per_address_limit() {
        let limits = LimitsConfig {
            max_connections_per_address: 1,
            trust_forwarded_for: true,
            ..LimitsConfig::default()
        };
        let gauge = prometheus::IntGauge::new("open", "open").expect("gauge");
        let g = ConnectionGate::from_limits(&limits, gauge);
        let _a = g.admit(ip(1)).expect("first");
        let _b = g.admit(ip(1)).expect("the proxy may open many");
    }

    #[test]
    fn admission_is_exact_under_concurrent_bursts() {
        let g = gate(50, None);
        let admitted = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            for t in 0..8 {
                let g = g.clone();
                let admitted = admitted.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        if let Ok(p) = g.admit(ip(t)) {
                            admitted.lock().expect("lock").push(p);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.lock().expect("lock").len(), 50);
        assert_eq!(g.open(), 50);
    }

    /// A relay-like app on one end of a duplex pipe, served with `idle` as the head
    /// deadline; returns the client end and the connection task.
    fn serve_duplex(
        idle: Duration,
        body_timeout: Duration,
    ) -> (DuplexStream, tokio::task::JoinHandle<Option<CloseReason>>) {
        use axum::routing::{get, post};
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/echo",
                post(move |body: axum::body::Body| async move {
                    use axum::response::IntoResponse;
                    let parsed: Result<serde_json::Value, _> =
                        super::super::http::parse_json_within(body, 1024, body_timeout).await;
                    match parsed {
                        Ok(v) => axum::Json(v).into_response(),
                        Err(e) => e.into_response(),
                    }
                }),
            );
        let (client, server) = duplex(256 * 1024);
        let g = gate(10, None);
        let permit = g.admit(ip(1)).expect("permit");
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _tx = _tx;
            let builder = http_builder(idle);
            let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
            serve_connection(
                &builder,
                Tracked::new(server, permit),
                service_for(app, peer),
                rx,
            )
            .await
        });
        (client, task)
    }

    async fn read_response(client: &mut DuplexStream) -> String {
        let mut buf = vec![0u8; 4096];
        let n = client.read(&mut buf).await.expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Sends one complete `GET /healthz` and checks it is answered 200.
    async fn healthz_answered(client: &mut DuplexStream) {
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        assert!(read_response(client).await.starts_with("HTTP/1.1 200"));
    }

    /// Whether the server closed its end within a minute (of paused time).
    async fn closed(client: &mut DuplexStream) -> bool {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(60), client.read(&mut buf)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_kept_alive_connection_is_closed_at_the_idle_deadline() {
        let (mut client, task) = serve_duplex(Duration::from_secs(5), Duration::from_secs(5));
        healthz_answered(&mut client).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!task.is_finished(), "closed before its deadline");
        assert!(closed(&mut client).await);
        assert_eq!(task.await.expect("task"), Some(CloseReason::IdleTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_second_request_is_closed_as_a_head_timeout() {
        let (mut client, task) = serve_duplex(Duration::from_secs(5), Duration::from_secs(5));
        healthz_answered(&mut client).await;
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        assert!(closed(&mut client).await);
        assert_eq!(task.await.expect("task"), Some(CloseReason::HeadTimeout));
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_in_use_stays_open() {
        let (mut client, task) = serve_duplex(Duration::from_secs(5), Duration::from_secs(5));
        for _ in 0..5 {
            healthz_answered(&mut client).await;
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        assert!(!task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_over_the_limit_is_refused_with_431() {
        let (mut client, task) = serve_duplex(Duration::from_secs(5), Duration::from_secs(5));
        healthz_answered(&mut client).await;
        let pad = "a".repeat(70_000);
        let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {pad}\r\n\r\n");
        client.write_all(head.as_bytes()).await.expect("write");
        let answer = read_response(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
        assert_eq!(task.await.expect("task"), Some(CloseReason::HeadTooLarge));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_is_answered_and_the_connection_closed() {
        let (mut client, task) = serve_duplex(Duration::from_secs(60), Duration::from_secs(2));
        client
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")
            .await
            .expect("write");
        // The deadline is 2 s: the answer comes then, not whenever.
        let answer = tokio::time::timeout(Duration::from_secs(3), read_response(&mut client))
            .await
            .expect("answered at the body deadline");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(closed(&mut client).await);
        assert_eq!(task.await.expect("task"), None);
    }
}
