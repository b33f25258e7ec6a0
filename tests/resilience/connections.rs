//! Connections that hold sockets: stalled bodies, idle keep-alives, bursts over the
//! connection limits, oversized heads and WebSocket frames, against the real binary
//! (plain HTTP, `tls.mode = "off"`: the limits and deadlines are the same over TLS).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{SinkExt, StreamExt};
use relay_e2e::wire::Visibility;
use relay_e2e::{Relay, RelayBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Generous wait for what the relay does by itself.
const WAIT: Duration = Duration::from_secs(30);
const PORTAL: &str = "support";

fn plain() -> RelayBuilder {
    RelayBuilder::new().extra_toml("[tls]\nmode = \"off\"\n")
}

fn addr(relay: &Relay) -> Result<SocketAddr> {
    relay
        .url()
        .trim_start_matches("http://")
        .parse()
        .context("relay address")
}

/// Raises this process's soft file-descriptor limit to at least `need` (the relay
/// started afterwards inherits it), or fails saying why the test cannot run.
fn ensure_fds(need: u64) -> Result<()> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= need {
        return Ok(());
    }
    let max = limit.maximum.unwrap_or(u64::MAX);
    ensure!(
        max >= need,
        "this test needs {need} file descriptors; the hard limit is {max} (ulimit -Hn)"
    );
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(need),
            maximum: limit.maximum,
        },
    )
    .context("raising the soft file-descriptor limit")?;
    Ok(())
}

async fn connect_from(ip: IpAddr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    tokio::time::timeout(WAIT, socket.connect(to))
        .await
        .context("connect timed out")?
        .context("connect")
}

/// Reads until the relay closes `s` (end of stream or reset) or `patience` passes;
/// returns whether it closed and what it sent before.
async fn read_until_closed(s: &mut TcpStream, patience: Duration) -> (bool, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + patience;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (false, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn metric(relay: &Relay, query: &str) -> Result<f64> {
    relay
        .metric(query)
        .await?
        .with_context(|| format!("{query} is not exported"))
}

async fn metric_reaching(relay: &Relay, query: &str, want: f64) -> Result<f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(relay, query).await?;
        if now >= want || Instant::now() > deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/healthz` answers and a new session can be created.
async fn serves(relay: &Relay, when: &str) -> Result<()> {
    let health = relay.get("/healthz").await?;
    ensure!(health.status == 200, "{when}: /healthz answered {health:?}");
    let jwt = relay.token("alice", "Alice", &[PORTAL], false);
    relay
        .create_session(&jwt, PORTAL, Visibility::Visible)
        .await
        .map_err(|e| anyhow::anyhow!("{when}: creating a session failed: {e}"))?;
    Ok(())
}

const STALLED: usize = 300;

/// 300 connections that send a head whose body never comes, and 300 kept-alive
/// connections idle after one answered request: all are closed by their 2 s deadlines
/// (the stalled bodies with `408 request_timeout`) and counted, while `/healthz` and new
/// sessions keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_and_idle_keep_alives_are_closed_by_their_deadlines() -> Result<()> {
    ensure_fds(4 * STALLED as u64 + 1024)?;
    let relay = plain()
        .extra_toml(
            "[limits]\nbody_timeout = \"2s\"\nidle_timeout = \"2s\"\nhandshake_timeout = \"2s\"\nmax_connections_per_address = 1000\n",
        )
        .start()
        .await?;
    let to = addr(&relay)?;
    let localhost = IpAddr::from([127, 0, 0, 1]);
    let idle_before = metric(
        &relay,
        "relay_connections_closed_total{reason=\"idle_timeout\"}",
    )
    .await?;

    let stalled_body = b"POST /v1/join HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"support_key\":";
    let mut bodies = Vec::new();
    let mut idles = Vec::new();
    for _ in 0..STALLED {
        bodies.push(tokio::spawn(async move {
            let mut s = connect_from(localhost, to).await?;
            s.write_all(stalled_body).await?;
            Ok::<_, anyhow::Error>(s)
        }));
        idles.push(tokio::spawn(async move {
            let mut s = connect_from(localhost, to).await?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
                .await?;
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .context("no answer to the first request")??;
            ensure!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "first request answered {:?}",
                String::from_utf8_lossy(&buf[..n])
            );
            Ok::<_, anyhow::Error>(s)
        }));
    }
    let mut bodies_open = Vec::new();
    for t in bodies {
        bodies_open.push(t.await??);
    }
    let mut idles_open = Vec::new();
    for t in idles {
        idles_open.push(t.await??);
    }
    // All 600 are open (or just being closed): the node still serves.
    serves(&relay, "with 600 stalled connections").await?;

    let mut answered_408 = 0;
    for mut s in bodies_open {
        let (closed, got) = read_until_closed(&mut s, WAIT).await;
        ensure!(closed, "a connection with a stalled body is still open");
        let text = String::from_utf8_lossy(&got);
        if text.starts_with("HTTP/1.1 408") && text.contains("request_timeout") {
            answered_408 += 1;
        }
    }
    ensure!(
        answered_408 == STALLED,
        "{answered_408} of {STALLED} stalled bodies were answered 408 request_timeout"
    );
    for mut s in idles_open {
        let (closed, got) = read_until_closed(&mut s, WAIT).await;
        ensure!(closed, "an idle kept-alive connection is still open");
        ensure!(got.is_empty(), "an idle connection got {got:?}");
    }

    let body_timeouts = metric(
        &relay,
        "relay_connections_closed_total{reason=\"body_timeout\"}",
    )
    .await?;
    ensure!(
        body_timeouts == STALLED as f64,
        "body timeouts counted: {body_timeouts}"
    );
    let idle = metric_reaching(
        &relay,
        "relay_connections_closed_total{reason=\"idle_timeout\"}",
        idle_before + STALLED as f64,
    )
    .await?;
    ensure!(
        idle >= idle_before + STALLED as f64,
        "idle timeouts counted: {idle_before} -> {idle}"
    );
    let open = metric(&relay, "relay_connections_open").await?;
    ensure!(
        open <= 3.0,
        "{open} connections still open after the deadlines"
    );
    serves(&relay, "after the deadlines").await?;
    Ok(())
}

/// Opens `n` connections at once from `ips` (round robin) and keeps the ones the relay
/// did not close within a few seconds; returns them and how many were closed.
async fn burst(to: SocketAddr, ips: &[IpAddr], n: usize) -> Result<(Vec<TcpStream>, usize)> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ip = ips[i % ips.len()];
            tokio::spawn(async move { connect_from(ip, to).await })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await??);
    }
    // Connections that waited in a full accept queue get their verdict a little later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let (closed, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
                (!closed).then_some(s)
            })
        })
        .collect();
    let mut held = Vec::new();
    let mut closed = 0;
    for c in checks {
        match c.await? {
            Some(s) => held.push(s),
            None => closed += 1,
        }
    }
    Ok((held, closed))
}

/// `max_connections = 50` and `max_connections_per_address = 20` under bursts of 400
/// connections in all: one address keeps exactly 20, the node exactly 50, every other
/// connection is closed at once and counted; once they go, the node serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_are_exact_under_bursts() -> Result<()> {
    ensure_fds(2048)?;
    // The held connections send nothing; a long handshake deadline keeps them open.
    let relay = plain()
        .extra_toml(
            "[limits]\nmax_connections = 50\nmax_connections_per_address = 20\nhandshake_timeout = \"60s\"\n",
        )
        .start()
        .await?;
    let to = addr(&relay)?;
    let ip = |last: u8| IpAddr::from([127, 0, 0, last]);

    let (from_one, refused_one) = burst(to, &[ip(1)], 200).await?;
    ensure!(
        from_one.len() == 20,
        "one address kept {} connections (limit 20)",
        from_one.len()
    );
    ensure!(refused_one == 180);

    let (from_others, refused_others) = burst(to, &[ip(2), ip(3), ip(4)], 200).await?;
    ensure!(
        from_one.len() + from_others.len() == 50,
        "{} connections open at once (limit 50)",
        from_one.len() + from_others.len()
    );
    ensure!(refused_others == 170);
    // While the node is full, a new connection is closed at once.
    let mut extra = connect_from(ip(5), to).await?;
    let (closed, _) = read_until_closed(&mut extra, WAIT).await;
    ensure!(closed, "a connection over the node limit was kept");

    drop(from_one);
    drop(from_others);
    // The held connections' places are freed once the relay sees them close.
    let deadline = Instant::now() + WAIT;
    while !matches!(relay.get("/healthz").await, Ok(r) if r.status == 200) {
        ensure!(Instant::now() < deadline, "/healthz never answered again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let by_address = metric(
        &relay,
        "relay_connections_closed_total{reason=\"address_limit\"}",
    )
    .await?;
    let by_node = metric(
        &relay,
        "relay_connections_closed_total{reason=\"node_limit\"}",
    )
    .await?;
    ensure!(by_address >= 180.0, "address_limit refusals: {by_address}");
    ensure!(by_node >= 1.0, "node_limit refusals: {by_node}");
    ensure!(
        by_address + by_node >= 351.0,
        "refusals counted: {by_address} + {by_node}"
    );
    ensure!(metric(&relay, "relay_connections_open").await? <= 3.0);
    serves(&relay, "after the bursts").await?;
    Ok(())
}

fn padded_head(total: usize) -> Vec<u8> {
    let start = "GET /healthz HTTP/1.1\r\nHost: relay\r\nX-Pad: ";
    let end = "\r\n\r\n";
    let pad = total - start.len() - end.len();
    format!("{start}{}{end}", "a".repeat(pad)).into_bytes()
}

/// A 70,000-byte request head is refused (the limit is 64 KiB), as the first request of
/// a connection and as a later one (`431`), and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_heads_over_64_kib_are_refused() -> Result<()> {
    let relay = plain().start().await?;
    let to = addr(&relay)?;
    let localhost = IpAddr::from([127, 0, 0, 1]);
    let head = padded_head(70_000);

    let mut first = connect_from(localhost, to).await?;
    first.write_all(&head).await?;
    let (closed, got) = read_until_closed(&mut first, WAIT).await;
    ensure!(closed, "a 70,000-byte first head left the connection open");
    ensure!(
        !got.starts_with(b"HTTP/1.1 200"),
        "a 70,000-byte first head was answered 200"
    );
    let counted = metric(
        &relay,
        "relay_handshake_failures_total{reason=\"head_too_large\"}",
    )
    .await?;
    ensure!(counted == 1.0, "first heads refused: {counted}");

    let mut later = connect_from(localhost, to).await?;
    later
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(WAIT, later.read(&mut buf)).await??;
    ensure!(buf[..n].starts_with(b"HTTP/1.1 200"));
    later.write_all(&head).await?;
    let (closed, got) = read_until_closed(&mut later, WAIT).await;
    ensure!(closed, "a 70,000-byte later head left the connection open");
    ensure!(
        got.starts_with(b"HTTP/1.1 431"),
        "a 70,000-byte later head was answered {:?}",
        String::from_utf8_lossy(&got[..got.len().min(40)])
    );
    let counted = metric(
        &relay,
        "relay_connections_closed_total{reason=\"head_too_large\"}",
    )
    .await?;
    ensure!(counted == 1.0, "later heads refused: {counted}");

    // Just under the limit is fine.
    let mut fine = connect_from(localhost, to).await?;
    fine.write_all(&padded_head(60_000)).await?;
    let n = tokio::time::timeout(WAIT, fine.read(&mut buf)).await??;
    ensure!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "a 60,000-byte head was refused"
    );
    Ok(())
}

/// A WebSocket frame over 4 × `max_message_bytes` (64 KiB with the default 16 KiB)
/// closes the socket with 1009 (Message Too Big), as documented, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_frame_closes_with_1009() -> Result<()> {
    let relay = plain().start().await?;
    let jwt = relay.token("alice", "Alice", &[PORTAL], false);
    let session = relay
        .create_session(&jwt, PORTAL, Visibility::Visible)
        .await
        .map_err(|e| anyhow::anyhow!("creating a session: {e}"))?;
    let rejected = "relay_messages_rejected_total{code=\"message_too_large\"}";
    let before = metric(&relay, rejected).await?;
    let (mut ws, _) = tokio_tungstenite::connect_async(session.host.ws_url.as_str()).await?;
    ws.send(Message::text("x".repeat(100 * 1024))).await?;
    let code = tokio::time::timeout(WAIT, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(frame)) => return Ok(frame.map(|f| f.code)),
                Ok(_) => continue,
                Err(e) => bail!("the socket failed instead of closing: {e}"),
            }
        }
        bail!("the socket ended without a close frame")
    })
    .await
    .context("the socket stayed open")??;
    ensure!(
        code == Some(CloseCode::Size),
        "closed with {code:?}, expected 1009"
    );
    let after = metric(&relay, rejected).await?;
    ensure!(
        after == before + 1.0,
        "oversized frames counted: {before} -> {after}"
    );
    Ok(())
}

/// An upgraded WebSocket idle for longer than every HTTP deadline (handshake, idle,
/// body: 1 s each) stays open and keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_outlives_every_http_deadline() -> Result<()> {
    let relay = plain()
        .extra_toml(
            "[limits]\nhandshake_timeout = \"1s\"\nidle_timeout = \"1s\"\nbody_timeout = \"1s\"\n",
        )
        .start()
        .await?;
    let jwt = relay.token("alice", "Alice", &[PORTAL], false);
    let session = relay
        .create_session(&jwt, PORTAL, Visibility::Visible)
        .await
        .map_err(|e| anyhow::anyhow!("creating a session: {e}"))?;
    let mut host = relay.ws(&session.host.ws_url, "host").await?;
    host.recv_type("welcome").await?;
    // Four times the longest HTTP deadline without a message either way.
    host.drain(Duration::from_secs(4)).await;
    ensure!(!host.closed(), "the idle WebSocket was closed");
    // Still live: bad input gets its error answer on the same socket.
    host.send_raw("{}").await?;
    let answer = host.recv_type("error").await?;
    ensure!(
        answer["code"] == "bad_request",
        "expected a bad_request error, got {answer}"
    );
    ensure!(metric(&relay, "relay_ws_connections_active{kind=\"session\"}").await? == 1.0);
    Ok(())
}

/// The operations listener (`/metrics`) has the same deadlines as the public port: a
/// kept-alive scrape connection left idle is closed at `limits.idle_timeout`, and one
/// that never sends a request at `limits.handshake_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_listener_closes_idle_and_silent_connections() -> Result<()> {
    let relay = plain()
        .extra_toml("[limits]\nidle_timeout = \"1s\"\nhandshake_timeout = \"1s\"\n")
        .start()
        .await?;
    let ops: SocketAddr = relay
        .ops_url()
        .trim_start_matches("http://")
        .parse()
        .context("ops address")?;
    let localhost = IpAddr::from([127, 0, 0, 1]);
    let mut idle = connect_from(localhost, ops).await?;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await?;
    let mut silent = connect_from(localhost, ops).await?;
    let (closed, got) = read_until_closed(&mut idle, WAIT).await;
    ensure!(
        got.starts_with(b"HTTP/1.1 200"),
        "the scrape was answered {:?}",
        String::from_utf8_lossy(&got)
    );
    ensure!(closed, "an idle kept-alive ops connection is still open");
    let (closed, _) = read_until_closed(&mut silent, WAIT).await;
    ensure!(closed, "a silent ops connection is still open");
    Ok(())
}
