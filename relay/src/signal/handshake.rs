//! The deadline of a new connection: its TLS handshake and its first HTTP request head
//! (a WebSocket upgrade included) must be complete within `limits.handshake_timeout`.
//!
//! Without it a client could open TCP connections and send nothing, half a TLS
//! ClientHello or half a request, and each would hold a socket and a task for good:
//! axum-server bounds the TLS handshake alone (10 s, uncounted), and hyper, with no
//! timer, waits for a request head forever. [`HandshakeGuard`] wraps the listener's
//! acceptor (rustls, or none with `tls.mode = "off"`): it runs the inner handshake, then
//! reads until the request head is complete ([`head_end`]), all under one deadline, and
//! hands hyper a stream that replays what it read ([`Replay`]). A connection that does
//! not make it is closed and counted in `relay_handshake_failures_total{reason}`
//! ([`Failure`]); `relay_handshakes_pending` shows how many are in that phase now.
//!
//! Only the first request of a connection is guarded here; later requests on a
//! kept-alive connection are under `limits.idle_timeout` (see [`super::listener`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;

/// The largest request head accepted, blank line included; a larger one is refused
/// (`head_too_large`), whether complete or not.
pub const MAX_HEAD: usize = 64 * 1024;

/// Why a connection was closed before its first request (`reason` label of
/// `relay_handshake_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The TLS handshake and the request head took longer than `limits.handshake_timeout`.
    #[error("no complete request within the handshake timeout")]
    Timeout,
    /// The TLS handshake failed (not TLS, no shared version or cipher, a bad alert).
    #[error("TLS handshake failed")]
    TlsError,
    /// The client closed the connection before a complete request head.
    #[error("closed before a complete request")]
    Closed,
    /// The request head was longer than [`MAX_HEAD`].
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
}

impl Failure {
    /// Every failure, for the metric's labels.
    pub const ALL: [Failure; 4] = [
        Failure::Timeout,
        Failure::TlsError,
        Failure::Closed,
        Failure::HeadTooLarge,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::TlsError => "tls_error",
            Failure::Closed => "closed",
            Failure::HeadTooLarge => "head_too_large",
        }
    }
}

/// Where the head ends in `buf` (the index just past its blank line), if it is complete;
/// `from` is where the search may start (bytes before it were searched already).
pub fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    buf.get(start..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

/// An acceptor that puts `inner` and the first request head under one deadline.
#[derive(Clone)]
pub struct HandshakeGuard<A> {
    inner: A,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl<A> HandshakeGuard<A> {
    /// Guards `inner` (the TLS acceptor, or axum-server's `DefaultAcceptor`).
    pub fn new(inner: A, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        HandshakeGuard {
            inner,
            timeout,
            metrics,
        }
    }
}

/// Decrements `relay_handshakes_pending` however the handshake ends.
struct Pending(prometheus::IntGauge);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<A, I, S> Accept<I, S> for HandshakeGuard<A>
where
    A: Accept<I, S> + Clone + Send + Sync + 'static,
    A::Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A::Service: Send + 'static,
    A::Future: Send + 'static,
{
    type Stream = Replay<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let handshake = self.inner.accept(stream, service);
        let timeout = self.timeout;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            metrics.handshakes_pending.inc();
            let _pending = Pending(metrics.handshakes_pending.clone());
            let guarded = async {
                let (mut io, service) = handshake.await.map_err(|e| match e.kind() {
                    io::ErrorKind::TimedOut => Failure::Timeout,
                    _ => Failure::TlsError,
                })?;
                let head = read_head(&mut io).await?;
                Ok::<_, Failure>((Replay::new(head, io), service))
            };
            let failure = match tokio::time::timeout(timeout, guarded).await {
                Ok(Ok(accepted)) => return Ok(accepted),
                Ok(Err(failure)) => failure,
                Err(_) => Failure::Timeout,
            };
            metrics
                .handshake_failures_total
                .with_label_values(&[failure.as_str()])
                .inc();
            tracing::debug!(
                reason = failure.as_str(),
                "connection closed before its first request"
            );
            Err(io::Error::other(failure))
        })
    }
}

/// Reads until the request head is complete; returns everything read.
async fn read_head<T: AsyncRead + Unpin>(io: &mut T) -> Result<Bytes, Failure> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let searched = buf.len();
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        match io.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(Failure::Closed),
            Ok(_) => {}
        }
        match head_end(&buf, searched) {
            // A complete head is refused too if it is over the limit (it may have
            // arrived in one read).
            Some(end) if end > MAX_HEAD => return Err(Failure::HeadTooLarge),
            Some(_) => return Ok(buf.freeze()),
            None if buf.len() > MAX_HEAD => return Err(Failure::HeadTooLarge),
            None => {}
        }
    }
}

/// A stream that first replays bytes already read from it.
pub struct Replay<T> {
    read: Bytes,
    io: T,
}

impl<T> Replay<T> {
    /// `io`, whose first bytes `read` were already taken from it.
    pub fn new(read: Bytes, io: T) -> Self {
        Replay { read, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Replay<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Replay<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum_server::accept::DefaultAcceptor;
    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};

    #[test]
    fn the_head_ends_at_the_first_blank_line_even_across_reads() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody";
        assert_eq!(head_end(req, 0), Some(req.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
        // The blank line straddles two reads: the search starts 3 bytes back.
        let split = req.len() - 6;
        assert_eq!(head_end(req, split), Some(req.len() - 4));
        assert_eq!(head_end(b"", 0), None);
        assert_eq!(head_end(b"ab", 10), None);
    }

    fn guard(metrics: &Arc<Metrics>) -> HandshakeGuard<DefaultAcceptor> {
        HandshakeGuard::new(DefaultAcceptor, Duration::from_secs(10), metrics.clone())
    }

    fn failures(m: &Metrics, f: Failure) -> u64 {
        m.handshake_failures_total
            .with_label_values(&[f.as_str()])
            .get()
    }

    async fn accept(
        metrics: &Arc<Metrics>,
        server: DuplexStream,
    ) -> io::Result<(Replay<DuplexStream>, ())> {
        guard(metrics).accept(server, ()).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_is_cut_at_the_deadline_and_counted() {
        let metrics = Arc::new(Metrics::new());
        let (_client, server) = duplex(1024);
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move { accept(&metrics, server).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(metrics.handshakes_pending.get(), 1);
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), Failure::Timeout.to_string());
        assert_eq!(failures(&metrics, Failure::Timeout), 1);
        assert_eq!(metrics.handshakes_pending.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_request_is_cut_at_the_deadline_too() {
        let metrics = Arc::new(Metrics::new());
        let (mut client, server) = duplex(1024);
        client
            .write_all(b"GET /v1/agent/ws HTTP/1.1\r\nUpgrade: websocket\r\n")
            .await
            .unwrap();
        assert!(accept(&metrics, server).await.is_err());
        assert_eq!(failures(&metrics, Failure::Timeout), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_head_passes_and_is_replayed_with_what_followed() {
        let metrics = Arc::new(Metrics::new());
        let (mut client, server) = duplex(1024);
        let req = b"POST /v1/join HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        client.write_all(&req[..10]).await.unwrap();
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move { accept(&metrics, server).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(&req[10..]).await.unwrap();
        let (mut stream, ()) = task.await.unwrap().unwrap();
        let mut got = vec![0u8; req.len()];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &req[..]);
        // Writes go through to the client.
        stream.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let mut answer = [0u8; 17];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
        for f in Failure::ALL {
            assert_eq!(failures(&metrics, f), 0);
        }
        assert_eq!(metrics.handshakes_pending.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_hangs_up_or_sends_an_endless_head_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let (mut client, server) = duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        assert!(accept(&metrics, server).await.is_err());
        assert_eq!(failures(&metrics, Failure::Closed), 1);

        let (mut client, server) = duplex(MAX_HEAD * 2);
        let header = format!("X-Pad: {}\r\n", "a".repeat(1000));
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move { accept(&metrics, server).await.map(|_| ()) }
        });
        for _ in 0..70 {
            client.write_all(header.as_bytes()).await.unwrap();
        }
        assert!(task.await.unwrap().is_err());
        assert_eq!(failures(&metrics, Failure::HeadTooLarge), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_head_over_the_limit_is_refused_too() {
        let metrics = Arc::new(Metrics::new());
        let (mut client, server) = duplex(MAX_HEAD * 2);
        let head = format!(
            "GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(70_000 - 32)
        );
        // All of it (blank line included) is there at the first read.
        client.write_all(head.as_bytes()).await.unwrap();
        assert!(accept(&metrics, server).await.is_err());
        assert_eq!(failures(&metrics, Failure::HeadTooLarge), 1);

        // Just under the limit passes.
        let (mut client, server) = duplex(MAX_HEAD * 2);
        let fill = MAX_HEAD - "GET / HTTP/1.1\r\nX-Pad: \r\n\r\n".len();
        let head = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(fill));
        assert_eq!(head.len(), MAX_HEAD);
        client.write_all(head.as_bytes()).await.unwrap();
        assert!(accept(&metrics, server).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_slow_inner_handshake_is_counted() {
        #[derive(Clone)]
        struct Failing(io::ErrorKind);
        impl<I: Send + 'static> Accept<I, ()> for Failing {
            type Stream = DuplexStream;
            type Service = ();
            type Future = std::future::Ready<io::Result<(DuplexStream, ())>>;
            fn accept(&self, _: I, _: ()) -> Self::Future {
                std::future::ready(Err(io::Error::from(self.0)))
            }
        }
        let metrics = Arc::new(Metrics::new());
        for (kind, failure) in [
            (io::ErrorKind::InvalidData, Failure::TlsError),
            (io::ErrorKind::TimedOut, Failure::Timeout),
        ] {
            let g = HandshakeGuard::new(Failing(kind), Duration::from_secs(10), metrics.clone());
            assert!(g.accept((), ()).await.is_err());
            assert_eq!(failures(&metrics, failure), 1);
        }
    }
}
