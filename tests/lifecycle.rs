//! Life cycle of support sessions, driven against the real `relay` binary over loopback.
//!
//! Every test starts its own relay (see the `relay_e2e` harness), so they run in
//! parallel. Each asserts what a customer, an agent, a supervisor or an operator would
//! notice: answers, messages received, messages never received, metrics, exit status.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use futures_util::{StreamExt, stream};
use rand::Rng;
use relay_e2e::wire::{
    CreateSessionResponse, ErrorCode, InviteTarget, ParticipantCredentials, Permission, Visibility,
};
use relay_e2e::{
    ApiResult, Claims, ExpectRefusal, Method, Relay, RelayBuilder, Ws, mint_token, relay_binary,
};
use serde_json::{Value, json};

const PORTAL: &str = "support";
const SHORT: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn alice(relay: &Relay) -> String {
    relay.token("alice", "Alice", &[PORTAL], false)
}

/// A string at a JSON pointer, or "" when absent.
fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn is(msg: &Value, ty: &str) -> bool {
    msg["type"] == ty
}

fn is_chat(msg: &Value, body: &str) -> bool {
    is(msg, "chat") && msg["text"] == body
}

fn about(msg: &Value, ty: &str, pid: &str) -> bool {
    is(msg, ty)
        && (msg
            .pointer("/participant/participant_id")
            .and_then(Value::as_str)
            == Some(pid)
            || msg["participant_id"] == pid)
}

/// Every string value and every object key anywhere in `v`.
fn strings_and_keys(v: &Value, strings: &mut Vec<String>, keys: &mut Vec<String>) {
    match v {
        Value::String(s) => strings.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings_and_keys(x, strings, keys)),
        Value::Object(o) => {
            for (k, x) in o {
                keys.push(k.clone());
                strings_and_keys(x, strings, keys);
            }
        }
        _ => {}
    }
}

/// Fails if any raw message of `ws` mentions one of `secrets`.
fn never_saw(ws: &Ws, who: &str, secrets: &[&str]) -> Result<()> {
    for raw in ws.transcript() {
        for secret in secrets {
            ensure!(!raw.contains(secret), "{who} was sent {secret:?} in: {raw}");
        }
    }
    Ok(())
}

/// Session opened by Alice with her WebSocket open (welcome read).
async fn open_session(relay: &Relay) -> Result<(CreateSessionResponse, Ws)> {
    let s = relay
        .create_session(&alice(relay), PORTAL, Visibility::Visible)
        .await
        .context("create session")?;
    let mut host = relay.ws(&s.host.ws_url, "host").await?;
    host.recv_type("welcome").await?;
    Ok((s, host))
}

/// Carol joins `s` with its key and opens her WebSocket (welcome read).
async fn customer_joins(
    relay: &Relay,
    s: &CreateSessionResponse,
) -> Result<(ParticipantCredentials, Ws)> {
    let c = relay
        .join("Carol", &s.support_key)
        .await
        .context("customer join")?;
    let mut ws = relay.ws(&c.ws_url, "customer").await?;
    ws.recv_type("welcome").await?;
    Ok((c, ws))
}

/// The host invites `agent` directly, the agent accepts and connects (welcome read).
#[allow(clippy::too_many_arguments)]
async fn agent_joins(
    relay: &Relay,
    host_token: &str,
    sid: &str,
    agent: &str,
    name: &str,
    visibility: Visibility,
    permission: Permission,
    comment: Option<&str>,
) -> Result<(String, ParticipantCredentials, Ws, Value)> {
    let token = relay.token(agent, name, &[PORTAL], false);
    let inv = relay
        .invite(
            host_token,
            sid,
            InviteTarget::Agent(agent.into()),
            visibility,
            permission,
            comment,
        )
        .await
        .with_context(|| format!("invite {agent}"))?;
    let creds = relay
        .accept(&token, &inv.invitation_id)
        .await
        .with_context(|| format!("{agent} accepts"))?;
    let mut ws = relay.ws(&creds.ws_url, agent).await?;
    let welcome = ws.recv_type("welcome").await?;
    Ok((token, creds, ws, welcome))
}

async fn eventually_metric(relay: &Relay, query: &str, want: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = relay.metric(query).await?;
        if got == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{query} is {got:?}, expected {want}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn random_wrong_keys(n: usize, live: &str) -> Vec<String> {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| {
            loop {
                let k = format!("{:09}", rng.random_range(0..1_000_000_000u32));
                if k != live {
                    break k;
                }
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// 1. Operations
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn health_ready_and_metrics() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let health = relay.get("/healthz").await?;
    ensure!(health.status == 200, "/healthz: {health:?}");
    let ready = relay.get("/readyz").await?;
    ensure!(ready.status == 200, "/readyz: {ready:?}");
    ensure!(
        relay.metric("relay_sessions_active").await? == Some(0.0),
        "a fresh relay should report relay_sessions_active 0:\n{}",
        relay.metrics().await?
    );

    let (s, _host) = open_session(&relay).await?;
    relay.join("Carol", &s.support_key).await?;

    let text = relay.metrics().await?;
    for series in [
        "relay_sessions_active",
        "relay_participants_active{",
        "relay_joins_total",
        "relay_support_key_attempts_total",
    ] {
        ensure!(
            text.lines().any(|l| l.starts_with(series)),
            "/metrics has no {series} series:\n{text}"
        );
    }
    let get = |q: &str| relay_e2e::metric_value(&text, q);
    ensure!(
        get("relay_sessions_active") == Some(1.0),
        "sessions:\n{text}"
    );
    ensure!(
        get("relay_participants_active{role=\"customer\"}") == Some(1.0),
        "customers:\n{text}"
    );
    ensure!(
        get("relay_participants_active{role=\"host\"}") == Some(1.0),
        "hosts:\n{text}"
    );
    ensure!(
        get("relay_support_key_attempts_total{outcome=\"ok\"}") == Some(1.0),
        "key attempts:\n{text}"
    );
    ensure!(
        get("relay_joins_total").is_some_and(|n| n >= 1.0),
        "the customer's join is not counted:\n{text}"
    );
    Ok(())
}

/// The metrics count masked agents and supervisors, which the customer must not learn:
/// the public port has no `/metrics` (health only); the operations listener has it, and
/// with `ops.token_file` only for the bearer of that token.
#[tokio::test]
async fn metrics_live_on_the_operations_listener_only() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let public = relay.get("/metrics").await?;
    ensure!(
        public.status == 404 && !public.body.contains("relay_participants_active"),
        "the public port must not serve /metrics: {public:?}"
    );
    for path in ["/healthz", "/readyz"] {
        let r = relay.get(path).await?;
        ensure!(r.status == 200, "public {path}: {r:?}");
        let r = relay.get(&format!("{}{path}", relay.ops_url())).await?;
        ensure!(r.status == 200, "ops {path}: {r:?}");
    }
    ensure!(
        relay
            .metric("relay_participants_active{role=\"supervisor\"}")
            .await?
            == Some(0.0),
        "the operations listener serves the metrics"
    );
    drop(relay);

    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("metrics.token");
    std::fs::write(&token_file, "s3cret-scrape-token-0123\n")?;
    let relay = RelayBuilder::new()
        .extra_toml(&format!(
            "[ops]\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ))
        .start()
        .await?;
    let url = format!("{}/metrics", relay.ops_url());
    let without = relay.client().get(&url).send().await?;
    ensure!(without.status() == 401, "no token: {}", without.status());
    let wrong = relay
        .client()
        .get(&url)
        .bearer_auth("s3cret-scrape-token-0124")
        .send()
        .await?;
    ensure!(wrong.status() == 401, "wrong token: {}", wrong.status());
    let right = relay
        .client()
        .get(&url)
        .bearer_auth("s3cret-scrape-token-0123")
        .send()
        .await?;
    ensure!(right.status() == 200, "the token: {}", right.status());
    ensure!(
        right.text().await?.contains("relay_sessions_active"),
        "the metrics text"
    );
    let health = relay.get(&format!("{}/healthz", relay.ops_url())).await?;
    ensure!(health.status == 200, "health needs no token: {health:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// 2. Support keys
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn customer_joins_with_key_once() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let (s, _host) = open_session(&relay).await?;

    let key = &s.support_key;
    ensure!(
        key.len() == 9 && key.bytes().all(|b| b.is_ascii_digit()),
        "support key {key:?} is not 9 digits"
    );
    let link = s
        .support_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        s.support_url.starts_with(relay.url()) && link.len() >= 16,
        "support_url {:?} should be a page of this relay ending in its own token",
        s.support_url
    );
    ensure!(
        !link.contains(key.as_str()),
        "the support URL token {link:?} carries the key {key}"
    );
    let expires = humantime::parse_rfc3339(&s.expires_at)
        .with_context(|| format!("expires_at {:?} is not RFC 3339", s.expires_at))?;
    let expected = SystemTime::now() + Duration::from_secs(4 * 3600);
    let skew = expires
        .duration_since(expected)
        .or_else(|e| Ok::<_, anyhow::Error>(e.duration()))?;
    ensure!(
        skew < Duration::from_secs(120),
        "expires_at {} is not 4 h from now",
        s.expires_at
    );

    // Typed with spaces, as people read it out.
    let spaced = format!("{} {} {}", &key[0..3], &key[3..6], &key[6..9]);
    let carol = relay.join("Carol", &spaced).await?;
    ensure!(carol.session_id == s.session_id);
    let mut ws = relay.ws(&carol.ws_url, "customer").await?;
    let welcome = ws.recv_type("welcome").await?;
    ensure!(
        text(&welcome, "/you/role") == "customer" && text(&welcome, "/you/name") == "Carol",
        "welcome.you: {welcome}"
    );
    let roster = welcome["roster"].as_array().context("welcome.roster")?;
    let host = roster
        .iter()
        .find(|p| p["participant_id"] == s.host.participant_id.as_str())
        .with_context(|| format!("the customer's roster lacks the host: {welcome}"))?;
    ensure!(
        host["name"] == "Alice" && host["role"] == "host",
        "host entry: {host}"
    );
    ensure!(
        host.get("agent_id").is_none() && host.get("visibility").is_none(),
        "the customer is shown the host's agent_id/visibility: {host}"
    );

    // A used key answers like one that never was, so a guesser learns nothing; the
    // link (not guessable) may say it was used.
    relay
        .join("Mallory", key)
        .await
        .refused(404, ErrorCode::WrongKey)?;
    relay
        .join_link("Mallory", &link)
        .await
        .refused(410, ErrorCode::KeyUsed)?;

    // The link works on its own, for a second session.
    let s2 = relay
        .create_session(&alice(&relay), PORTAL, Visibility::Visible)
        .await?;
    let link2 = s2.support_url.rsplit('/').next().unwrap_or_default();
    let dave = relay.join_link("Dave", link2).await?;
    ensure!(dave.session_id == s2.session_id, "joined the wrong session");

    let page = relay.get(&s2.support_url).await?;
    ensure!(page.status == 200, "support URL page: {page:?}");
    ensure!(
        page.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "support URL page is not HTML: {:?}",
        page.headers
    );
    Ok(())
}

#[tokio::test]
async fn expired_key_is_refused() -> Result<()> {
    let relay = RelayBuilder::new().key_ttl("2s").start().await?;
    let (s, mut host) = open_session(&relay).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    relay
        .join("Carol", &s.support_key)
        .await
        .refused(404, ErrorCode::WrongKey)?;
    let link = s.support_url.rsplit('/').next().unwrap_or_default();
    relay
        .join_link("Carol", link)
        .await
        .refused(410, ErrorCode::KeyExpired)?;
    let ended = host.recv_type("session_ended").await?;
    ensure!(ended["reason"] == "key_expired", "{ended}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// 3. Brute force
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_are_throttled_and_never_find_a_live_key() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let s = relay
        .create_session(&alice(&relay), PORTAL, Visibility::Visible)
        .await?;
    let keys = random_wrong_keys(10_000, &s.support_key);

    let results: Vec<ApiResult<ParticipantCredentials>> = stream::iter(&keys)
        .map(|k| relay.join("Mallory", k))
        .buffer_unordered(32)
        .collect()
        .await;

    let (mut wrong, mut throttled, mut admitted, mut other) = (0, 0, 0, Vec::new());
    for r in results {
        match r {
            Ok(_) => admitted += 1,
            Err(e) if e.status == 404 && e.code == Some(ErrorCode::WrongKey) => wrong += 1,
            Err(e) if e.status == 429 && e.code == Some(ErrorCode::Throttled) => {
                throttled += 1;
                ensure!(
                    e.retry_after.is_some_and(|s| s >= 1)
                        && e.retry_after_s.is_some_and(|s| s >= 1),
                    "429 without Retry-After header and retry_after_s: {e:?}"
                );
            }
            Err(e) => other.push(e),
        }
    }
    ensure!(admitted == 0, "{admitted} wrong keys were admitted");
    ensure!(other.is_empty(), "unexpected answers, e.g. {}", other[0]);
    ensure!(throttled > 0, "10,000 wrong keys were never throttled");
    ensure!(
        (1..=30).contains(&wrong),
        "{wrong} wrong keys were looked up; the per-address budget is 30"
    );

    // Locked out: even the right key is refused from this address...
    relay
        .join("Carol", &s.support_key)
        .await
        .refused(429, ErrorCode::Throttled)?;
    // ...but not from another one.
    let other_address = relay.client_from(loopback(2))?;
    let carol = relay
        .join_from(&other_address, "Carol", &s.support_key)
        .await
        .context("the right key from 127.0.0.2")?;
    ensure!(carol.session_id == s.session_id);

    let text = relay.metrics().await?;
    ensure!(
        relay_e2e::metric_value(
            &text,
            "relay_support_key_attempts_total{outcome=\"throttled\"}"
        )
        .is_some_and(|n| n > 0.0),
        "no throttled attempts counted:\n{text}"
    );
    ensure!(
        relay_e2e::metric_value(&text, "relay_key_lockouts_total{scope=\"address\"}")
            .is_some_and(|n| n >= 1.0),
        "no address lock-out counted:\n{text}"
    );
    Ok(())
}

/// Ten addresses spend the node-wide key budget (30 wrong keys each, as in the attack
/// the black-box test found): nobody is locked out. A correct support link gets in
/// at once, a customer with the right key gets in after the proof of work the node asks
/// for, a guess without work is not looked up, and the node scope is counted.
#[tokio::test]
async fn ten_addresses_spending_the_node_budget_lock_no_customer_out() -> Result<()> {
    let relay = RelayBuilder::new()
        .extra_toml("[limits]\nkey_challenge_bits = 12\nkey_challenge_max_bits = 14\n")
        .start()
        .await?;
    let s = relay
        .create_session(&alice(&relay), PORTAL, Visibility::Visible)
        .await?;
    let s2 = relay
        .create_session(&alice(&relay), PORTAL, Visibility::Visible)
        .await?;
    let clients = (10..20)
        .map(|i| relay.client_from(loopback(i)))
        .collect::<Result<Vec<_>>>()?;
    let keys = random_wrong_keys(300, &s.support_key);
    for (i, key) in keys.iter().enumerate() {
        if *key == s2.support_key {
            continue;
        }
        match relay.join_from(&clients[i / 30], "Mallory", key).await {
            Err(e) if e.status == 404 && e.code == Some(ErrorCode::WrongKey) => {}
            other => bail!("wrong key {i} from address {}: {other:?}", i / 30),
        }
    }
    // The node budget (300 a minute) is spent: a guess without work is not looked up.
    let fresh = relay.client_from(loopback(40))?;
    let asked = relay
        .join_from(&fresh, "Mallory", &keys[0])
        .await
        .refused(429, ErrorCode::ChallengeRequired)?;
    let challenge = asked
        .challenge()
        .context("challenge_required carries the challenge")?;
    ensure!(challenge.bits == 12, "{challenge:?}");

    // The support link needs no work and no key budget.
    let link = s.support_url.rsplit('/').next().unwrap_or_default();
    let by_link = relay
        .join_link("Carol", link)
        .await
        .context("a correct support link while the key budget is spent")?;
    ensure!(by_link.session_id == s.session_id);
    // The right key from an address never seen: in, after the proof of work.
    let dave = relay
        .join_solving(&relay.client_from(loopback(41))?, "Dave", &s2.support_key)
        .await
        .context("a correct key with its proof while the key budget is spent")?;
    ensure!(dave.session_id == s2.session_id);

    let text = relay.metrics().await?;
    let get = |q: &str| relay_e2e::metric_value(&text, q).unwrap_or(0.0);
    ensure!(
        get("relay_key_lockouts_total{scope=\"node\"}") >= 1.0,
        "the node budget being spent is not counted:\n{text}"
    );
    ensure!(
        get("relay_key_lockouts_total{scope=\"address\"}") >= 10.0,
        "each of the ten addresses spent its own budget too:\n{text}"
    );
    ensure!(
        get("relay_support_key_attempts_total{outcome=\"challenged\"}") >= 2.0,
        "the challenged attempts are counted:\n{text}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// 4. Limits
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn ninth_agent_is_refused() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let host = alice(&relay);
    let s = relay
        .create_session(&host, PORTAL, Visibility::Visible)
        .await?;
    let sid = &s.session_id;

    // Eight invitations while there is room; the host is the first of the 8 agents.
    let mut invited = Vec::new();
    for i in 1..=8 {
        let agent = format!("a{i}");
        let inv = relay
            .invite(
                &host,
                sid,
                InviteTarget::Agent(agent.clone()),
                Visibility::Visible,
                Permission::View,
                None,
            )
            .await
            .with_context(|| format!("invite {agent}"))?;
        let token = relay.token(&agent, &format!("Agent {i}"), &[PORTAL], false);
        invited.push((agent, token, inv.invitation_id));
    }
    for (agent, token, iid) in &invited[..7] {
        relay
            .accept(token, iid)
            .await
            .with_context(|| format!("{agent} accepts"))?;
    }
    let (_, token, iid) = &invited[7];
    relay
        .accept(token, iid)
        .await
        .refused(409, ErrorCode::SessionFull)?;
    relay
        .invite(
            &host,
            sid,
            InviteTarget::Agent("a9".into()),
            Visibility::Visible,
            Permission::View,
            None,
        )
        .await
        .refused(409, ErrorCode::SessionFull)?;
    Ok(())
}

#[tokio::test]
async fn ninth_concurrent_session_is_refused() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let host = alice(&relay);
    let mut sessions = Vec::new();
    for i in 1..=8 {
        let s = relay
            .create_session(&host, PORTAL, Visibility::Visible)
            .await
            .with_context(|| format!("session {i}"))?;
        sessions.push(s.session_id);
    }
    relay
        .create_session(&host, PORTAL, Visibility::Visible)
        .await
        .refused(409, ErrorCode::AgentSessionLimit)?;

    relay.end_session(&host, &sessions[0]).await?;
    relay
        .create_session(&host, PORTAL, Visibility::Visible)
        .await
        .context("a session after ending one")?;

    // Being invited while in 8 sessions is refused the same way.
    let bob = relay.token("bob", "Bob", &[PORTAL], false);
    let other = relay
        .create_session(&bob, PORTAL, Visibility::Visible)
        .await?;
    let inv = relay
        .invite(
            &bob,
            &other.session_id,
            InviteTarget::Agent("alice".into()),
            Visibility::Visible,
            Permission::View,
            None,
        )
        .await?;
    relay
        .accept(&host, &inv.invitation_id)
        .await
        .refused(409, ErrorCode::AgentSessionLimit)?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// 5. Invitations, masking, permissions
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn portal_invite_goes_to_first_acceptor() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let (s, mut host) = open_session(&relay).await?;

    let mut consoles = Vec::new();
    for agent in ["b1", "b2", "b3"] {
        let token = relay.token(agent, &agent.to_uppercase(), &[PORTAL], false);
        let mut ws = relay.console(&token, agent).await?;
        let hello = ws.recv_type("hello").await?;
        ensure!(hello["agent_id"] == agent, "{hello}");
        consoles.push((token, ws));
    }
    let x_token = relay.token("x", "X", &["other"], false);
    let mut x = relay.console(&x_token, "x").await?;
    x.recv_type("hello").await?;

    let comment = "printer driver issue";
    let inv = relay
        .invite(
            &alice(&relay),
            &s.session_id,
            InviteTarget::Portal(PORTAL.into()),
            Visibility::Visible,
            Permission::View,
            Some(comment),
        )
        .await?;
    ensure!(inv.delivered_to == 3, "delivered_to {}", inv.delivered_to);
    let iid = inv.invitation_id.as_str();
    for (_, ws) in &mut consoles {
        let m = ws.recv_type("invitation").await?;
        ensure!(
            m["invitation_id"] == iid
                && m["comment"] == comment
                && m["session_id"] == s.session_id.as_str()
                && m["portal_wide"] == true
                && m["from"] == "Alice",
            "invitation: {m}"
        );
    }
    x.expect_silence(SHORT).await?;

    let creds = relay.accept(&consoles[1].0, iid).await?;
    ensure!(creds.session_id == s.session_id);
    for i in [0, 2] {
        let m = consoles[i].1.recv_type("invitation_withdrawn").await?;
        ensure!(
            m["invitation_id"] == iid && m["reason"] == "accepted_by_other",
            "{m}"
        );
    }
    consoles[1].1.expect_silence(SHORT).await?;
    relay
        .accept(&consoles[2].0, iid)
        .await
        .refused(410, ErrorCode::InvitationClosed)?;

    host.recv_until(|m| {
        is(m, "invitation_update") && m["invitation_id"] == iid && m["state"] == "accepted"
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn masked_agent_is_invisible_to_the_customer() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let host_token = alice(&relay);
    let (s, mut host) = open_session(&relay).await?;
    let sid = s.session_id.as_str();
    let (_, mut customer) = customer_joins(&relay, &s).await?;

    // A masked agent with control joins, chats to everyone, writes a note.
    let (_, m, mut masked, welcome) = agent_joins(
        &relay,
        &host_token,
        sid,
        "m1",
        "Mallory Masked",
        Visibility::Masked,
        Permission::Control,
        Some("secret-comment"),
    )
    .await?;
    ensure!(text(&welcome, "/you/visibility") == "masked", "{welcome}");
    let joined = host
        .recv_until(|x| about(x, "participant_joined", &m.participant_id))
        .await?;
    ensure!(
        text(&joined, "/participant/name") == "Mallory Masked",
        "the host should see the masked agent's name: {joined}"
    );

    masked.chat("masked says hello to all", "all").await?;
    host.recv_until(|x| is_chat(x, "masked says hello to all"))
        .await?;
    masked.chat("masked note for agents only", "agents").await?;
    let note = host
        .recv_until(|x| is_chat(x, "masked note for agents only"))
        .await?;
    ensure!(note["from"] == m.participant_id.as_str(), "{note}");

    let anonymous = customer
        .recv_until(|x| is_chat(x, "masked says hello to all"))
        .await?;
    ensure!(
        anonymous.get("from").is_none()
            && anonymous.get("from_name").is_none()
            && anonymous["from_role"] == "agent",
        "the customer should get the masked agent's chat anonymously: {anonymous}"
    );

    // The host changes its permission; it stays masked.
    let entry = relay
        .update_participant(
            &host_token,
            sid,
            &m.participant_id,
            Some(Permission::View),
            None,
        )
        .await?;
    ensure!(entry.visibility == Some(Visibility::Masked), "{entry:?}");
    host.recv_until(|x| {
        about(x, "participant_updated", &m.participant_id)
            && text(x, "/participant/permission") == "view"
    })
    .await?;

    // A visible agent, for contrast: it sees the masked one, the customer sees it.
    let (_, v, mut visible, welcome) = agent_joins(
        &relay,
        &host_token,
        sid,
        "v1",
        "Victor Visible",
        Visibility::Visible,
        Permission::View,
        Some("plain-comment"),
    )
    .await?;
    ensure!(
        welcome["roster"].as_array().is_some_and(|r| r
            .iter()
            .any(|p| p["participant_id"] == m.participant_id.as_str())),
        "agents should see the masked agent: {welcome}"
    );
    let joined = customer
        .recv_until(|x| about(x, "participant_joined", &v.participant_id))
        .await?;
    ensure!(
        text(&joined, "/participant/name") == "Victor Visible",
        "{joined}"
    );
    visible.chat("visible says hello", "all").await?;
    let hello = customer
        .recv_until(|x| is_chat(x, "visible says hello"))
        .await?;
    ensure!(
        hello["from"] == v.participant_id.as_str() && hello["from_name"] == "Victor Visible",
        "{hello}"
    );
    visible
        .chat("visible note for agents only", "agents")
        .await?;
    host.recv_until(|x| is_chat(x, "visible note for agents only"))
        .await?;

    // Both leave.
    masked.send_json(&json!({"type": "leave"})).await?;
    host.recv_until(|x| about(x, "participant_left", &m.participant_id))
        .await?;
    visible.send_json(&json!({"type": "leave"})).await?;
    let left = customer
        .recv_until(|x| about(x, "participant_left", &v.participant_id))
        .await?;
    ensure!(left["reason"] == "left", "{left}");

    // Masking a visible agent looks to the customer as if it left.
    let (_, w, mut wendy, _) = agent_joins(
        &relay,
        &host_token,
        sid,
        "v2",
        "Wendy Visible",
        Visibility::Visible,
        Permission::View,
        None,
    )
    .await?;
    customer
        .recv_until(|x| about(x, "participant_joined", &w.participant_id))
        .await?;
    relay
        .update_participant(
            &host_token,
            sid,
            &w.participant_id,
            None,
            Some(Visibility::Masked),
        )
        .await?;
    customer
        .recv_until(|x| about(x, "participant_left", &w.participant_id))
        .await?;
    wendy.chat("wendy speaks while masked", "all").await?;
    let anonymous = customer
        .recv_until(|x| is_chat(x, "wendy speaks while masked"))
        .await?;
    ensure!(
        anonymous.get("from").is_none() && anonymous.get("from_name").is_none(),
        "{anonymous}"
    );

    // Everything sent to the customer before this has arrived once this has.
    host.chat("final sync", "all").await?;
    customer.recv_until(|x| is_chat(x, "final sync")).await?;
    customer.drain(SHORT).await;

    never_saw(
        &customer,
        "the customer",
        &[
            &m.participant_id,
            "Mallory",
            "secret-comment",
            "plain-comment",
            "masked note for agents only",
            "visible note for agents only",
        ],
    )?;
    for msg in customer.transcript_json() {
        let (mut strings, mut keys) = (Vec::new(), Vec::new());
        strings_and_keys(&msg, &mut strings, &mut keys);
        ensure!(
            !strings.iter().any(|s| s == "m1" || s == "v1" || s == "v2"),
            "the customer was sent an agent id: {msg}"
        );
        ensure!(
            !keys.iter().any(|k| k == "agent_id" || k == "visibility"),
            "the customer was sent agent_id/visibility: {msg}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn host_changes_permission() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let host_token = alice(&relay);
    let (s, _host) = open_session(&relay).await?;
    let sid = s.session_id.as_str();
    let (c, mut customer) = customer_joins(&relay, &s).await?;
    let (_, bob, mut bob_ws, _) = agent_joins(
        &relay,
        &host_token,
        sid,
        "bob",
        "Bob",
        Visibility::Visible,
        Permission::View,
        None,
    )
    .await?;
    let (carl_token, _, _carl_ws, _) = agent_joins(
        &relay,
        &host_token,
        sid,
        "carl",
        "Carl",
        Visibility::Visible,
        Permission::View,
        None,
    )
    .await?;

    let entry = relay
        .update_participant(
            &host_token,
            sid,
            &bob.participant_id,
            Some(Permission::Control),
            None,
        )
        .await?;
    ensure!(
        entry.participant_id == bob.participant_id && entry.permission == Some(Permission::Control),
        "{entry:?}"
    );
    let controls = |x: &Value| {
        about(x, "participant_updated", &bob.participant_id)
            && text(x, "/participant/permission") == "control"
    };
    bob_ws.recv_until(controls).await?;
    let seen = customer.recv_until(controls).await?;
    ensure!(
        seen.pointer("/participant/agent_id").is_none(),
        "the customer is shown an agent id: {seen}"
    );

    relay
        .update_participant(
            &carl_token,
            sid,
            &bob.participant_id,
            Some(Permission::View),
            None,
        )
        .await
        .refused(403, ErrorCode::Forbidden)?;
    relay
        .update_participant(
            &host_token,
            sid,
            &c.participant_id,
            Some(Permission::Control),
            None,
        )
        .await
        .refused(403, ErrorCode::Forbidden)?;
    relay
        .update_participant(
            &host_token,
            sid,
            &s.host.participant_id,
            None,
            Some(Visibility::Masked),
        )
        .await
        .refused(403, ErrorCode::Forbidden)?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// 6. Supervisors
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn supervisor_monitors_silently() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let host_token = alice(&relay);
    let (s, mut host) = open_session(&relay).await?;
    let sid = s.session_id.as_str();
    let (c, mut customer) = customer_joins(&relay, &s).await?;
    let (_, bob, mut bob_ws, _) = agent_joins(
        &relay,
        &host_token,
        sid,
        "bob",
        "Bob",
        Visibility::Visible,
        Permission::View,
        None,
    )
    .await?;
    let olga = relay.token("olga", "Olga", &["other"], false);
    let elsewhere = relay
        .create_session(&olga, "other", Visibility::Visible)
        .await?;

    let sue = relay.token("sue", "Sue Supervisor", &[PORTAL], true);
    let list = relay.monitor_list(&sue).await?;
    let mine = list
        .iter()
        .find(|x| x.session_id == sid)
        .with_context(|| format!("the supervisor's list lacks the session: {list:?}"))?;
    ensure!(
        mine.host == "Alice" && mine.customer.as_deref() == Some("Carol") && mine.agents == 2,
        "{mine:?}"
    );
    ensure!(
        !list.iter().any(|x| x.session_id == elsewhere.session_id),
        "the supervisor sees another portal's session: {list:?}"
    );

    let sam = relay.token("sam", "Sam", &[PORTAL], false);
    relay
        .monitor_list(&sam)
        .await
        .refused(403, ErrorCode::Forbidden)?;
    relay
        .monitor(&sam, sid)
        .await
        .refused(403, ErrorCode::Forbidden)?;

    let creds = relay.monitor(&sue, sid).await?;
    let mut sup = relay.ws(&creds.ws_url, "supervisor").await?;
    let welcome = sup.recv_type("welcome").await?;
    ensure!(text(&welcome, "/you/role") == "supervisor", "{welcome}");
    for pid in [
        &s.host.participant_id,
        &c.participant_id,
        &bob.participant_id,
    ] {
        ensure!(
            welcome["roster"]
                .as_array()
                .is_some_and(|r| r.iter().any(|p| p["participant_id"] == pid.as_str())),
            "the supervisor's roster lacks {pid}: {welcome}"
        );
    }

    sup.chat("supervisor speaks", "all").await?;
    let err = sup.recv_type("error").await?;
    ensure!(err["code"] == "forbidden", "{err}");

    customer.chat("customer asks for help", "all").await?;
    sup.recv_until(|x| is_chat(x, "customer asks for help"))
        .await?;

    host.chat("host sync", "all").await?;
    for ws in [&mut host, &mut customer, &mut bob_ws] {
        ws.recv_until(|x| is_chat(x, "host sync")).await?;
        ws.drain(SHORT).await;
    }
    for (who, ws) in [("host", &host), ("customer", &customer), ("bob", &bob_ws)] {
        never_saw(
            ws,
            who,
            &[&creds.participant_id, "Sue Supervisor", "supervisor speaks"],
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// 7. Shutdown
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn drain_on_sigterm() -> Result<()> {
    // Generous times: the machine may be busy; only "not before the deadline" is tight,
    // and load can only make things later.
    let mut relay = RelayBuilder::new().drain_deadline("6s").start().await?;
    let (s, mut host) = open_session(&relay).await?;
    let (_, mut customer) = customer_joins(&relay, &s).await?;

    relay.sigterm()?;
    let signalled = Instant::now();
    loop {
        let ready = relay.get("/readyz").await?;
        if ready.status == 503 {
            break;
        }
        ensure!(
            signalled.elapsed() < Duration::from_secs(5),
            "/readyz still answers {} after SIGTERM",
            ready.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay
        .create_session(&alice(&relay), PORTAL, Visibility::Visible)
        .await
        .refused(503, ErrorCode::Draining)?;

    customer.chat("still here during the drain", "all").await?;
    host.recv_until(|x| is_chat(x, "still here during the drain"))
        .await?;

    for ws in [&mut host, &mut customer] {
        let ended = ws
            .recv_until_within(Duration::from_secs(20), |x| is(x, "session_ended"))
            .await?;
        ensure!(ended["reason"] == "node_shutdown", "{ended}");
    }
    ensure!(
        signalled.elapsed() >= Duration::from_secs(6),
        "sessions ended {:?} after SIGTERM, before the 6 s drain deadline",
        signalled.elapsed()
    );
    let status = relay.wait_exit(Duration::from_secs(15)).await?;
    ensure!(status.success(), "relay exited with {status}");
    Ok(())
}

#[tokio::test]
async fn drain_exits_when_idle() -> Result<()> {
    let mut relay = RelayBuilder::new().start().await?;
    relay.sigterm()?;
    let status = relay.wait_exit(Duration::from_secs(5)).await?;
    ensure!(status.success(), "relay exited with {status}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// 8. Bad input
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn bad_input_leaves_session_intact() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let (s, mut host) = open_session(&relay).await?;
    let (_, mut customer) = customer_joins(&relay, &s).await?;

    customer.send_raw("{not json").await?;
    let e = customer.recv_type("error").await?;
    ensure!(e["code"] == "bad_request", "{e}");
    customer.send_json(&json!({"type": "bogus"})).await?;
    let e = customer.recv_type("error").await?;
    ensure!(e["code"] == "unknown_message_type", "{e}");
    let big = json!({"type": "chat", "text": "x".repeat(20_000)}).to_string();
    customer.send_raw(&big).await?;
    let e = customer.recv_type("error").await?;
    ensure!(e["code"] == "message_too_large", "{e}");
    customer
        .send_json(&json!({"type": "bogus", "id": 7}))
        .await?;
    let e = customer.recv_type("error").await?;
    ensure!(e["code"] == "unknown_message_type" && e["ref"] == 7, "{e}");
    customer
        .send_json(&json!({"type": "ping", "id": 8}))
        .await?;
    let pong = customer.recv_type("pong").await?;
    ensure!(pong["ref"] == 8, "{pong}");

    customer.chat("still works", "all").await?;
    let first = host.recv_type("chat").await?;
    ensure!(first["text"] == "still works", "{first}");
    ensure!(!customer.closed(), "the customer's socket was closed");

    let token = alice(&relay);
    let post = |body: Vec<u8>, token: Option<String>| {
        let relay = &relay;
        async move {
            relay
                .raw(
                    relay.client(),
                    Method::POST,
                    "/v1/sessions",
                    token.as_deref(),
                    Some(body),
                )
                .await
        }
    };
    let expect = |r: relay_e2e::RawResponse, status: u16, code: &str| -> Result<()> {
        let e = r.error();
        ensure!(
            r.status == status && e.as_ref().is_some_and(|e| e.code.as_str() == code),
            "expected {status} {code}, got {} {:?}",
            r.status,
            r.body
        );
        Ok(())
    };
    expect(
        post(b"{".to_vec(), Some(token.clone())).await?,
        400,
        "bad_request",
    )?;
    expect(
        post(
            br#"{"portal":"support","colour":"red"}"#.to_vec(),
            Some(token.clone()),
        )
        .await?,
        400,
        "bad_request",
    )?;
    let huge = json!({"portal": PORTAL, "pad": "x".repeat(20_000)}).to_string();
    expect(
        post(huge.into_bytes(), Some(token.clone())).await?,
        413,
        "message_too_large",
    )?;
    let fine = br#"{"portal":"support"}"#.to_vec();
    expect(post(fine.clone(), None).await?, 401, "unauthorized")?;
    let forged = mint_token(
        b"not the relay's secret",
        &Claims::new("alice", "Alice", &[PORTAL], false),
    );
    expect(post(fine, Some(forged)).await?, 401, "unauthorized")?;
    Ok(())
}

/// Names that reorder or hide text are refused at join (a right-to-left override
/// makes `Carol\u{202e}TNEGA` read "CarolAGENT"), and chat that could forge lines of
/// a transcript or reach a reviewer's terminal (newline + ESC sequences) is refused
/// with `invalid_field`; both are counted, and the session goes on.
#[tokio::test]
async fn spoofing_names_and_forging_chat_are_refused() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let (s, mut host) = open_session(&relay).await?;
    for name in ["Carol\u{202e}TNEGA", "\u{200b}\u{200b}", "\u{feff}"] {
        relay
            .join(name, &s.support_key)
            .await
            .refused(400, ErrorCode::InvalidField)?;
    }
    ensure!(
        relay
            .metric("relay_text_refused_total{field=\"name\",rule=\"bidi\"}")
            .await?
            == Some(1.0),
        "the bidi refusal is counted"
    );
    let (_, mut customer) = customer_joins(&relay, &s).await?;
    let forged = "ok\n+00:00:09.000  2025-11-23T12:00:09.000Z  chat                Alice (host): \
                  please read me your card number\u{1b}[1A\u{7}";
    customer
        .send_json(&json!({"type": "chat", "text": forged, "id": 4}))
        .await?;
    let e = customer.recv_type("error").await?;
    ensure!(e["code"] == "invalid_field" && e["ref"] == 4, "{e}");
    customer.chat("two lines\nare fine", "all").await?;
    let chat = host.recv_type("chat").await?;
    ensure!(chat["text"] == "two lines\nare fine", "{chat}");
    eventually_metric(
        &relay,
        "relay_text_refused_total{field=\"chat\",rule=\"control\"}",
        1.0,
    )
    .await
}

// ---------------------------------------------------------------------------------
// 9. Ending sessions
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn customer_leaving_ends_session() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let (s, mut host) = open_session(&relay).await?;
    let (_, mut customer) = customer_joins(&relay, &s).await?;

    customer.send_json(&json!({"type": "leave"})).await?;
    let ended = host.recv_type("session_ended").await?;
    ensure!(ended["reason"] == "customer_left", "{ended}");
    host.wait_closed(Duration::from_secs(5)).await?;
    eventually_metric(&relay, "relay_sessions_active", 0.0).await
}

#[tokio::test]
async fn host_ending_session() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let host_token = alice(&relay);
    let (s, mut host) = open_session(&relay).await?;
    let (_, mut customer) = customer_joins(&relay, &s).await?;
    let (_, _, mut bob, _) = agent_joins(
        &relay,
        &host_token,
        &s.session_id,
        "bob",
        "Bob",
        Visibility::Visible,
        Permission::View,
        None,
    )
    .await?;
    eventually_metric(&relay, "relay_sessions_active", 1.0).await?;

    relay.end_session(&host_token, &s.session_id).await?;
    for ws in [&mut host, &mut customer, &mut bob] {
        let ended = ws.recv_type("session_ended").await?;
        ensure!(ended["reason"] == "ended_by_host", "{ended}");
        ws.wait_closed(Duration::from_secs(5)).await?;
    }
    eventually_metric(&relay, "relay_sessions_active", 0.0).await
}

// ---------------------------------------------------------------------------------
// 10. The token command
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn relay_token_command_mints_working_tokens() -> Result<()> {
    let relay = RelayBuilder::new().start().await?;
    let out = tokio::process::Command::new(relay_binary()?)
        .args([
            "token", "--agent", "z", "--name", "Zed", "--portal", PORTAL, "--config",
        ])
        .arg(relay.config_path())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .context("`relay token` did not finish within 10 s")?
        .context("running `relay token`")?;
    ensure!(
        out.status.success(),
        "`relay token` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    ensure!(token.split('.').count() == 3, "not a JWT: {token:?}");

    let s = relay
        .create_session(&token, PORTAL, Visibility::Visible)
        .await
        .context("creating a session with the minted token")?;
    let mut host = relay.ws(&s.host.ws_url, "host").await?;
    let welcome = host.recv_type("welcome").await?;
    ensure!(
        text(&welcome, "/you/name") == "Zed" && text(&welcome, "/you/agent_id") == "z",
        "{welcome}"
    );
    relay
        .create_session(&token, "other", Visibility::Visible)
        .await
        .refused(403, ErrorCode::Forbidden)?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// A client that stops reading
// ---------------------------------------------------------------------------------

/// An agent whose console stops reading is cut off instead of growing the relay's
/// memory; the session, the customer and the agent's place in it are unaffected.
#[tokio::test]
async fn participant_that_stops_reading_is_cut_off_not_buffered() -> Result<()> {
    // The customer's chat must outrun the host's reading: its budget is lifted here
    // (with the default one the flood is refused instead; see resilience/floods.rs).
    let relay = RelayBuilder::new()
        .extra_toml("[rate_limits]\nchat = { per_second = 1000000, burst = 1000000 }\n")
        .start()
        .await?;
    let (s, mut host) = open_session(&relay).await?;
    let (_, mut customer) = customer_joins(&relay, &s).await?;
    // The host stops reading from here on; the customer chats a lot (~24 MB in all,
    // far beyond the socket buffers and the relay's per-connection queue).
    let big = "x".repeat(3900);
    let mut cut_after = None;
    for i in 0..6000 {
        customer.chat(&big, "all").await?;
        customer.recv_until(|m| is(m, "chat")).await?;
        if i % 200 == 199
            && relay
                .metric("relay_messages_rejected_total{code=\"slow_consumer\"}")
                .await?
                .unwrap_or(0.0)
                >= 1.0
        {
            cut_after = Some(i);
            break;
        }
    }
    ensure!(
        cut_after.is_some(),
        "the relay never gave up on the non-reading host"
    );
    // The customer is still served and sees the host as disconnected, not gone.
    customer
        .send_json(&json!({"type": "ping", "id": 9}))
        .await?;
    let pong = customer.recv_until(|m| is(m, "pong")).await?;
    ensure!(pong["ref"] == 9, "{pong}");
    let seen = customer.transcript_json();
    ensure!(
        seen.iter().any(|m| is(m, "participant_updated")
            && m["participant"]["role"] == "host"
            && m["participant"]["connected"] == false),
        "the customer was not told the host disconnected"
    );
    ensure!(
        !seen
            .iter()
            .any(|m| is(m, "participant_left") || is(m, "session_ended"))
    );
    // The host's socket ends (after what was already buffered), and the host gets its
    // place back by reconnecting with the resume token of its welcome; the participant
    // token of its session has been used up.
    host.wait_closed(Duration::from_secs(30)).await?;
    let mut stale = relay.ws(&s.host.ws_url, "host, used token").await?;
    let refused = stale.recv_type("error").await?;
    ensure!(refused["code"] == "unauthorized", "{refused}");
    let mut again = relay
        .ws(&host.resume_url(&s.host.ws_url)?, "host again")
        .await?;
    let welcome = again.recv_type("welcome").await?;
    ensure!(welcome["you"]["role"] == "host", "{welcome}");
    Ok(())
}
