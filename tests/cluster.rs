//! End-to-end tests of scale-out (issue 8): a real `redis-server` on a loopback port and
//! real `relay` nodes sharing it as their session directory, driven by the native
//! WebRTC clients of `relay-bench` and by plain HTTP, as users and operators would.
//!
//! Each test asserts what a client or an operator notices: where a request ends up
//! (the redirects it was given), that media flows through the node that holds the
//! session, that a drain or a Redis restart leaves a live session alone, and that a
//! session whose node died is reported as `session_lost` instead of hanging.
//!
//! `redis-server` missing: every test prints a loud SKIPPED line and passes, unless
//! `CI` is set, where it fails. The tests take a lock so that one runs at a time (three
//! relays with WebRTC sessions are a lot for two cores).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use relay_bench::client::{
    Agent, AgentOptions, ClientError, Customer, CustomerOptions, FrameSource, Signalling,
    insecure_tls,
};
use relay_e2e::Relay;
use relay_e2e::wire::{ErrorCode, ParticipantCredentials, SessionList};
use reqwest::Method;
use serde_json::{Value, json};

use relay_e2e::redis_server::{RedisServer, cluster_node as node};

/// Generous wait for anything a node should do.
const WAIT: Duration = Duration::from_secs(15);
/// The portal of every agent here.
const PORTAL: &str = "support";

/// Serialises the tests of this target (see the crate docs).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An HTTP client that shows redirects instead of following them.
fn no_redirects() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Sends a request and follows `307` redirects the way a native client does (same
/// method, body and token, to `Location`). Returns the final status and body and every
/// `Location` followed; checks that each redirect's JSON body names the same place.
async fn follow(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Value, Vec<String>)> {
    let mut url = url.to_owned();
    let mut hops = Vec::new();
    loop {
        let mut req = http.request(method.clone(), &url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await?;
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("{method} {url}: {text}"))?
        };
        if status != 307 {
            return Ok((status, json, hops));
        }
        let location = location.with_context(|| format!("{method} {url}: 307 without Location"))?;
        ensure!(
            json["error"]["code"] == "redirect" && json["error"]["location"] == location.as_str(),
            "{method} {url}: the redirect's body does not name {location}: {json}"
        );
        ensure!(hops.len() < 3, "{method} {url}: redirect loop {hops:?}");
        hops.push(location.clone());
        url = location;
    }
}

/// `ws://127.0.0.1:PORT` of a node.
fn ws_base(relay: &Relay) -> String {
    relay.url().replacen("http://", "ws://", 1)
}

/// `url` (a session WebSocket URL on some node) aimed at `relay` instead: the client
/// arriving at another node than the one holding the session.
fn on(relay: &Relay, url: &str) -> Result<String> {
    let rest = url.split_once("://").context("URL without scheme")?.1;
    let path = &rest[rest.find('/').context("URL without path")?..];
    Ok(format!("{}{path}", ws_base(relay)))
}

/// Polls an async condition every 50 ms until it holds, at most `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric's value on a node (0 when absent).
async fn metric(relay: &Relay, query: &str) -> Result<f64> {
    Ok(relay.metric(query).await?.unwrap_or(0.0))
}

/// `relay cluster status --config <the node's relay.toml>`.
fn cluster_status(relay: &Relay) -> Result<String> {
    let out = std::process::Command::new(relay_e2e::relay_binary()?)
        .args(["cluster", "status", "--config"])
        .arg(relay.config_path())
        .env_remove("RELAY_CONFIG")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "relay cluster status failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// The line of `status` that starts with `first` (a node id or a session id).
fn line<'a>(status: &'a str, first: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
}

/// Whether `session` is listed by the supervisor `token` at `relay`, with `node_url`.
async fn supervisor_sees(
    http: &reqwest::Client,
    relay: &Relay,
    token: &str,
    session: &str,
    node_url: &str,
) -> Result<bool> {
    let (status, body, _) = follow(
        http,
        Method::GET,
        &relay.endpoint("/v1/monitor/sessions"),
        Some(token),
        None,
    )
    .await?;
    ensure!(status == 200, "monitor list: {status} {body}");
    let list: SessionList = serde_json::from_value(body)?;
    Ok(list
        .sessions
        .iter()
        .any(|s| s.session_id == session && s.node_url.as_deref() == Some(node_url)))
}

/// The whole life of a session in a three-node cluster: created on A, joined by a
/// customer arriving at B and an agent arriving at C (both redirected to A, over HTTP
/// and on the session WebSocket), media flowing; placement of further sessions away
/// from a full node and a draining one; B drained and gone, Redis restarted empty,
/// without the session noticing; then A killed: the session leaves the directory within
/// the TTL and its clients, coming back through C, are told `session_lost`.
#[tokio::test]
async fn a_session_lives_on_its_node_and_is_lost_with_it() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    relay_e2e::install_crypto();
    let Some(bin) = RedisServer::find()? else {
        return Ok(());
    };
    let mut redis = RedisServer::start(bin).await?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let a = node(&redis.url(), "a", &secret).start().await?;
    let mut b = node(&redis.url(), "b", &secret).start().await?;
    let c = node(&redis.url(), "c", &secret).start().await?;
    for n in [&a, &b, &c] {
        eventually("every node to see three nodes", WAIT, || async {
            Ok(metric(n, "relay_cluster_nodes").await? == 3.0)
        })
        .await?;
    }
    let http = no_redirects()?;
    let tls = insecure_tls();

    // The host opens a session on A, which takes it and records it before answering.
    let alice = a.token("alice", "Alice", &[PORTAL], false);
    let (status, created, hops) = follow(
        &http,
        Method::POST,
        &a.endpoint("/v1/sessions"),
        Some(&alice),
        Some(&json!({ "portal": PORTAL })),
    )
    .await?;
    ensure!(
        status == 201 && hops.is_empty(),
        "create on A: {status} {hops:?} {created}"
    );
    let sid = created["session_id"]
        .as_str()
        .context("session_id")?
        .to_owned();
    let key = created["support_key"]
        .as_str()
        .context("support_key")?
        .to_owned();
    let host_ws = created["host"]["ws_url"]
        .as_str()
        .context("ws_url")?
        .to_owned();
    ensure!(redis.exists(&format!("relay:session:{sid}")).await?);

    // A browser page asks for the redirect as an answer it can read (it would follow a
    // 307 cross-origin by itself): 421 with the same body, and nothing is joined.
    let resp = http
        .post(b.endpoint("/v1/join"))
        .header("relay-redirect", "manual")
        .json(&json!({ "name": "Carol", "support_key": key }))
        .send()
        .await?;
    ensure!(resp.status() == 421, "manual redirect: {}", resp.status());
    let body: Value = resp.json().await?;
    ensure!(
        body["error"]["code"] == "redirect" && body["error"]["location"] == a.endpoint("/v1/join"),
        "manual redirect body: {body}"
    );

    // The customer types the key at B, which sends the join to A.
    let (status, body, hops) = follow(
        &http,
        Method::POST,
        &b.endpoint("/v1/join"),
        None,
        Some(&json!({ "name": "Carol", "support_key": key })),
    )
    .await?;
    ensure!(status == 200, "join through B: {status} {body}");
    ensure!(hops == [a.endpoint("/v1/join")], "join redirects: {hops:?}");
    let carol: ParticipantCredentials = serde_json::from_value(body)?;
    ensure!(carol.ws_url.starts_with(&ws_base(&a)), "{}", carol.ws_url);

    // The host invites Bob; Bob accepts at C, which sends him (token and all) to A.
    let (status, invited, _) = follow(
        &http,
        Method::POST,
        &a.endpoint(&format!("/v1/sessions/{sid}/invitations")),
        Some(&alice),
        Some(&json!({ "target": { "agent": "bob" }, "permission": "view" })),
    )
    .await?;
    ensure!(status == 201, "invite: {status} {invited}");
    let iid = invited["invitation_id"].as_str().context("invitation_id")?;
    let bob_jwt = c.token("bob", "Bob", &[PORTAL], false);
    let accept = format!("/v1/invitations/{iid}/accept");
    let (status, body, hops) = follow(
        &http,
        Method::POST,
        &c.endpoint(&accept),
        Some(&bob_jwt),
        None,
    )
    .await?;
    ensure!(status == 200, "accept through C: {status} {body}");
    ensure!(hops == [a.endpoint(&accept)], "accept redirects: {hops:?}");
    let bob_creds: ParticipantCredentials = serde_json::from_value(body)?;

    // Each opens its session WebSocket at the node it reached; B and C answer
    // `redirect`, the clients follow it, and media flows through A.
    let source = FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"))?;
    let customer = Customer::connect(
        &on(&b, &carol.ws_url)?,
        tls.clone(),
        source,
        CustomerOptions::default(),
    )
    .await
    .context("customer connects through B")?;
    let bob = Agent::connect(
        &on(&c, &bob_creds.ws_url)?,
        tls.clone(),
        AgentOptions::default(),
    )
    .await
    .context("Bob connects through C")?;
    let host = Agent::connect(&host_ws, tls.clone(), AgentOptions::default()).await?;
    for (who, url) in [
        ("customer", customer.resume_url()),
        ("bob", bob.resume_url()),
    ] {
        ensure!(
            url.is_some_and(|u| u.starts_with(&ws_base(&a))),
            "{who} resumes at A: {url:?}"
        );
    }
    customer.wait_connected(WAIT).await?;
    for (who, agent) in [("host", &host), ("bob", &bob)] {
        agent
            .wait_frames(15, WAIT)
            .await
            .with_context(|| format!("{who} receives the customer's screen"))?;
    }
    let sent = customer.sent_frames();
    ensure!(
        bob.frames()
            .iter()
            .all(|f| sent.iter().any(|s| s.digest == f.digest)),
        "Bob received frames the customer never sent"
    );
    for (n, kind) in [
        (&b, "join"),
        (&b, "websocket"),
        (&c, "invitation"),
        (&c, "websocket"),
    ] {
        let q = format!("relay_cluster_redirects_total{{kind=\"{kind}\"}}");
        ensure!(metric(n, &q).await? >= 1.0, "{q} not counted");
    }

    // A supervisor at C lists A's session, with A's URL.
    let sue = c.token("sue", "Sue", &[PORTAL], true);
    ensure!(
        supervisor_sees(&http, &c, &sue, &sid, a.url()).await?,
        "C's supervisor listing lacks A's session"
    );

    // A is full (capacity 1): the next session goes to the least-loaded node, B.
    let dave = a.token("dave", "Dave", &[PORTAL], false);
    let (status, daves, hops) = follow(
        &http,
        Method::POST,
        &a.endpoint("/v1/sessions"),
        Some(&dave),
        Some(&json!({ "portal": PORTAL })),
    )
    .await?;
    ensure!(status == 201, "second session: {status} {daves}");
    ensure!(
        hops == [b.endpoint("/v1/sessions?redirected=1")],
        "placed via {hops:?}"
    );
    let dave_sid = daves["session_id"]
        .as_str()
        .context("session_id")?
        .to_owned();

    // The operator's view: three live nodes, each session on its node.
    let status_text = cluster_status(&a)?;
    for (id, sessions) in [("a", "1/1"), ("b", "1/1"), ("c", "0/1")] {
        let l = line(&status_text, id).with_context(|| format!("no node {id}:\n{status_text}"))?;
        ensure!(
            l.contains("live") && l.contains(sessions),
            "{l}\n{status_text}"
        );
    }
    for (session, node) in [(&sid, "a"), (&dave_sid, "b")] {
        let l =
            line(&status_text, session).with_context(|| format!("{session}:\n{status_text}"))?;
        ensure!(l.split_whitespace().nth(1) == Some(node), "{l}");
    }

    // B drains: the directory says so at once, B sends new sessions elsewhere (to C,
    // the only node under its threshold) but keeps serving its own until it ends,
    // then leaves the directory and exits. A's session does not notice.
    b.sigterm()?;
    eventually("B's record to say it drains", WAIT, || async {
        Ok(redis
            .get("relay:node:b")
            .await?
            .is_some_and(|r| r.contains("\"draining\":true")))
    })
    .await?;
    let erin = b.token("erin", "Erin", &[PORTAL], false);
    let (status, body, hops) = follow(
        &http,
        Method::POST,
        &b.endpoint("/v1/sessions"),
        Some(&erin),
        Some(&json!({ "portal": PORTAL })),
    )
    .await?;
    ensure!(
        status == 201,
        "a session asked of draining B: {status} {body}"
    );
    ensure!(
        hops == [c.endpoint("/v1/sessions?redirected=1")],
        "placed via {hops:?}"
    );
    let (status, body, _) = follow(
        &http,
        Method::DELETE,
        &b.endpoint(&format!("/v1/sessions/{dave_sid}")),
        Some(&dave),
        None,
    )
    .await?;
    ensure!(status == 204, "Dave ends his session on B: {status} {body}");
    let exit = b.wait_exit(WAIT).await?;
    ensure!(exit.success(), "B exits cleanly after its drain: {exit}");
    ensure!(!redis.exists("relay:node:b").await?, "B left the directory");
    let before = bob.frames_received();
    eventually("frames to keep flowing after B left", WAIT, || async {
        Ok(bob.frames_received() >= before + 15)
    })
    .await?;

    // Redis restarts empty: the nodes count the errors meanwhile, reconnect and write
    // everything again, and routing works as before.
    redis.kill();
    eventually("A to count failed heartbeats", WAIT, || async {
        Ok(metric(&a, "relay_cluster_redis_errors_total{op=\"heartbeat\"}").await? >= 1.0)
    })
    .await?;
    redis.restart().await?;
    eventually(
        "A and C to register again, with A's session",
        WAIT,
        || async {
            Ok(redis.exists("relay:node:a").await?
                && redis.exists("relay:node:c").await?
                && redis.exists(&format!("relay:session:{sid}")).await?)
        },
    )
    .await?;
    eventually(
        "C's supervisor listing to show A's session again",
        WAIT,
        || supervisor_sees(&http, &c, &sue, &sid, a.url()),
    )
    .await?;
    let before = bob.frames_received();
    eventually(
        "frames to keep flowing across the Redis restart",
        WAIT,
        || async { Ok(bob.frames_received() >= before + 15) },
    )
    .await?;

    // A dies. Within its TTL the session leaves the directory (C's sweep leaves a
    // "lost" tombstone), and clients coming back through C are told it is lost.
    let customer_resume = customer.resume_url().context("resume url")?.to_owned();
    let bob_resume = bob.resume_url().context("resume url")?.to_owned();
    a.sigkill()?;
    eventually("A's session to leave the directory", WAIT, || async {
        Ok(!redis.exists(&format!("relay:session:{sid}")).await?
            && redis.exists(&format!("relay:lost:{sid}")).await?)
    })
    .await?;
    for (who, resume) in [("customer", &customer_resume), ("bob", &bob_resume)] {
        let mut socket = Signalling::connect(&on(&c, resume)?, tls.clone()).await?;
        match socket.welcome(WAIT).await {
            Err(ClientError::Refused {
                code: ErrorCode::SessionLost,
                ..
            }) => {}
            other => bail!("{who} resuming through C got {other:?}, not session_lost"),
        }
    }
    let (status, body, _) = follow(
        &http,
        Method::POST,
        &c.endpoint("/v1/join"),
        None,
        Some(&json!({ "name": "Carol", "support_key": key })),
    )
    .await?;
    ensure!(
        status == 410 && body["error"]["code"] == "session_lost",
        "the lost session's key at C: {status} {body}"
    );
    ensure!(metric(&c, "relay_cluster_sessions_lost_total").await? == 1.0);
    ensure!(
        !supervisor_sees(&http, &c, &sue, &sid, a.url()).await?,
        "a lost session is no longer listed"
    );
    let status_text = cluster_status(&c)?;
    ensure!(
        line(&status_text, "a").is_none() && !status_text.contains(&sid),
        "A and its session are gone from the status:\n{status_text}"
    );
    Ok(())
}

/// A node whose Redis is down when it starts serves alone (sessions work as on a lone
/// node, failures are counted) and registers itself, with its sessions, once Redis
/// is up.
#[tokio::test]
async fn a_node_serves_without_redis_and_registers_when_it_comes() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    relay_e2e::install_crypto();
    let Some(bin) = RedisServer::find()? else {
        return Ok(());
    };
    let mut redis = RedisServer::start(bin).await?;
    redis.kill();
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let a = node(&redis.url(), "solo", &secret).start().await?;
    let http = no_redirects()?;
    let alice = a.token("alice", "Alice", &[PORTAL], false);
    let (status, created, hops) = follow(
        &http,
        Method::POST,
        &a.endpoint("/v1/sessions"),
        Some(&alice),
        Some(&json!({ "portal": PORTAL })),
    )
    .await?;
    ensure!(
        status == 201 && hops.is_empty(),
        "create without Redis: {status} {created}"
    );
    let sid = created["session_id"]
        .as_str()
        .context("session_id")?
        .to_owned();
    let key = created["support_key"].as_str().context("support_key")?;
    let (status, body, _) = follow(
        &http,
        Method::POST,
        &a.endpoint("/v1/join"),
        None,
        Some(&json!({ "name": "Carol", "support_key": key })),
    )
    .await?;
    ensure!(status == 200, "join without Redis: {status} {body}");
    eventually("the node to count its failed connections", WAIT, || async {
        Ok(metric(&a, "relay_cluster_redis_errors_total{op=\"connect\"}").await? >= 1.0)
    })
    .await?;

    redis.restart().await?;
    eventually(
        "the node and its session to be registered",
        WAIT,
        || async {
            Ok(redis.exists("relay:node:solo").await?
                && redis.exists(&format!("relay:session:{sid}")).await?)
        },
    )
    .await?;
    eventually("the heartbeat age to be fresh", WAIT, || async {
        Ok(metric(&a, "relay_cluster_heartbeat_age_seconds").await? < 1.0)
    })
    .await?;
    Ok(())
}

/// In a cluster a join's body is read first by the router (to look the key up in the
/// directory): a body that never comes is cut there by `limits.body_timeout` too, with
/// `408 request_timeout`, counted, as on a lone node.
#[tokio::test]
async fn a_join_whose_body_never_comes_is_cut_by_the_router_too() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    relay_e2e::install_crypto();
    let Some(bin) = RedisServer::find()? else {
        return Ok(());
    };
    let redis = RedisServer::start(bin).await?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let a = node(&redis.url(), "a", &secret)
        .extra_toml("[limits]\nbody_timeout = \"1s\"\n")
        .start()
        .await?;
    let to: std::net::SocketAddr = a.url().trim_start_matches("http://").parse()?;
    let mut s = tokio::net::TcpStream::connect(to).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"POST /v1/join HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"support_key\":",
    )
    .await?;
    let mut got = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
    ensure!(
        read.is_ok(),
        "the stalled join is still open after {WAIT:?}"
    );
    let text = String::from_utf8_lossy(&got);
    ensure!(
        text.starts_with("HTTP/1.1 408") && text.contains("request_timeout"),
        "the stalled join was answered {text:?}"
    );
    ensure!(
        metric(
            &a,
            "relay_connections_closed_total{reason=\"body_timeout\"}"
        )
        .await?
            >= 1.0,
        "the body deadline is not counted"
    );
    Ok(())
}
