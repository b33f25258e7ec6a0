//! The pages in a cluster of two nodes on a real `redis-server`: each person reaches
//! node B, the session lives on node A, and the pages move themselves there. Alice's
//! console asks B for a session while B is full (placement sends it to A); Carol types
//! her key at B's portal (the join is redirected to A). Carol's page then resumes
//! through B (the node she first reached), which redirects its session WebSocket to A.
//! Finally A dies: both pages, unable to reach A, ask B, and tell their person that
//! the session was lost.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use relay_e2e::Relay;
use relay_e2e::redis_server::{RedisServer, cluster_node};
use serde_json::{Value, json};

use super::driver::Chromium;
use super::{ONE_AT_A_TIME, PORTAL, VIDEO_WAIT};

/// How long the nodes may take to see each other, or a dead one to be swept.
const CLUSTER_WAIT: Duration = Duration::from_secs(15);

/// A metric's value on a node (0 when absent).
async fn metric(node: &Relay, query: &str) -> Result<f64> {
    Ok(node.metric(query).await?.unwrap_or(0.0))
}

/// Waits until a node's metric reaches `at_least`.
async fn metric_reaches(node: &Relay, query: &str, at_least: f64) -> Result<()> {
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        let got = metric(node, query).await?;
        if got >= at_least {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{query} is {got}, not {at_least} after {CLUSTER_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `home=` is believed only when the node names that origin (its own and its
/// cluster's, `GET /v1/origins`): never a host that merely shares the parent domain,
/// another port of the same host, or anything that is not an origin. Resume tokens are
/// sent to the home node, so a crafted link must not choose it.
#[tokio::test]
async fn a_crafted_home_is_not_believed() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((relay, chromium)) = super::setup().await? else {
        return Ok(());
    };
    let page = chromium.page("Carol (crafted link)").await?;
    for home in [
        "https://evil.example.com",
        "https://127.0.0.1:1",
        "javascript:alert(1)",
    ] {
        // In the query, so that each is a new page load (the fragment of `pageOn` is
        // read the same way).
        let url = format!("{}?home={}", relay.endpoint("/"), url_escape(home));
        page.goto(&url).await?;
        let got = page
            .wait_for("window.__home && window.__home()", "the portal's home")
            .await?;
        ensure!(got == json!(relay.url()), "home={home} was believed: {got}");
    }
    // The rule itself: a sibling under the same parent domain is refused, an origin the
    // node names is believed (with or without its default port).
    let verdicts = page
        .js_async(
            "const done = arguments[arguments.length - 1];
             import('/web/js/common.js').then(async (m) => {
               const p = (h) => new URLSearchParams({ home: h });
               const here = 'https://edge-fra-1.example.com/s/abc';
               const nodes = ['https://edge-fra-1.example.com', 'https://edge-fra-2.example.com:443/'];
               done({
                 trusted: await m.trustedOrigins(),
                 sibling: m.homeOrigin(p('https://support.example.com'), nodes, here),
                 node: m.homeOrigin(p('https://edge-fra-2.example.com'), nodes, here),
                 http: m.homeOrigin(p('http://edge-fra-2.example.com'), nodes, here),
                 none: m.homeOrigin(p('https://edge-fra-2.example.com'), [], here),
               });
             }, (e) => done({ error: String(e) }));",
            vec![],
        )
        .await?;
    let own = "https://edge-fra-1.example.com";
    ensure!(
        verdicts
            == json!({
                "trusted": [relay.url()],
                "sibling": own,
                "node": "https://edge-fra-2.example.com",
                "http": own,
                "none": own,
            }),
        "{verdicts}"
    );
    page.close().await
}

/// `s` with the characters a URL fragment's value must not hold raw escaped.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn pages_move_to_the_node_of_their_session() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    relay_e2e::install_crypto();
    let Some(chromium) = Chromium::start().await? else {
        return Ok(());
    };
    let Some(bin) = RedisServer::find()? else {
        return Ok(());
    };
    let redis = RedisServer::start(bin).await?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let a = cluster_node(&redis.url(), "a", &secret).start().await?;
    let b = cluster_node(&redis.url(), "b", &secret).start().await?;
    for n in [&a, &b] {
        metric_reaches(n, "relay_cluster_nodes", 2.0).await?;
    }

    // Dave fills B (room for one session), so that B places new sessions on A.
    let dave = b.token("dave", "Dave", &[PORTAL], false);
    b.create_session(&dave, PORTAL, relay_e2e::wire::Visibility::Visible)
        .await?;

    let (alice, carol) = tokio::try_join!(
        chromium.page("Alice (console at B)"),
        chromium.page("Carol (portal at B)"),
    )?;

    // --- Alice starts a session from B's console; her console moves to A -------------
    let alice_jwt = b.token("alice", "Alice Host", &[PORTAL], false);
    alice
        .goto(&b.endpoint(&format!("/agent?token={alice_jwt}")))
        .await?;
    alice
        .wait_for(
            "document.body.dataset.state === 'home'",
            "Alice signed in at B",
        )
        .await?;
    alice.click("#start-button").await?;
    alice
        .wait_for(
            &format!(
                "location.origin === '{}' && document.body.dataset.state === 'session' \
                 && document.body.dataset.role === 'host'",
                a.url()
            ),
            "Alice's console in her session, on A",
        )
        .await?;
    ensure!(
        metric(&b, "relay_cluster_redirects_total{kind=\"create\"}").await? >= 1.0,
        "B did not redirect the new session"
    );
    ensure!(
        metric(&a, "relay_sessions_active").await? == 1.0,
        "A does not hold Alice's session"
    );
    let key = alice.text("#support-key").await?.replace(' ', "");
    ensure!(key.len() == 9, "support key {key:?}");

    // --- Carol types the key at B; her portal moves to A and joins there ------------
    carol.goto(&b.endpoint("/")).await?;
    carol.fill("#name", "Carol Customer").await?;
    carol.fill("#key", &key).await?;
    carol.click("#join-button").await?;
    carol
        .wait_for(
            &format!(
                "location.origin === '{}' && document.body.dataset.state === 'joined'",
                a.url()
            ),
            "Carol's portal joined, on A",
        )
        .await?;
    ensure!(
        metric(&b, "relay_cluster_redirects_total{kind=\"join\"}").await? >= 1.0,
        "B did not redirect the join"
    );
    // A names B (they are one cluster): Carol's page believes B is her home.
    let home = carol.js("return window.__home()", vec![]).await?;
    ensure!(home == json!(b.url()), "Carol's home on A is {home}, not B");
    let address = carol.js("return location.href", vec![]).await?;
    ensure!(
        !address.as_str().unwrap_or_default().contains(&key),
        "the key stayed in the address bar: {address}"
    );
    carol.click("#share-button").await?;
    alice
        .wait_for_within(
            "window.__console.decoded() > 15",
            "Alice decoding Carol's screen",
            VIDEO_WAIT,
        )
        .await?;

    // --- Carol's connection drops; she resumes through B, which redirects her to A ---
    carol
        .js(
            "window.__resumeThroughHome = true; window.__dropConnection(); return true",
            vec![],
        )
        .await?;
    carol
        .wait_for(
            "window.__resumes === 1 && document.body.dataset.state === 'sharing'",
            "Carol's page resumed and shares again",
        )
        .await?;
    let conn = carol
        .js(
            "const c = window.__connection(); return [c.redirects, c.wsUrl.split('?')[0]]",
            vec![],
        )
        .await?;
    let a_ws = a.url().replacen("http://", "ws://", 1);
    ensure!(
        conn[0] == json!(1) && conn[1].as_str().is_some_and(|u| u.starts_with(&a_ws)),
        "Carol's resume was not redirected from B to A: {conn}"
    );
    ensure!(
        metric(&b, "relay_cluster_redirects_total{kind=\"websocket\"}").await? >= 1.0,
        "B did not redirect the session WebSocket"
    );
    let decoded = alice
        .js("return window.__console.decoded()", vec![])
        .await?
        .as_f64()
        .context("frames decoded")?;
    alice
        .wait_for_within(
            &format!("window.__console.decoded() > {}", decoded + 15.0),
            "Alice decoding Carol's screen after her resume",
            VIDEO_WAIT,
        )
        .await?;

    // --- A dies: both pages, unable to reach it, ask B, and say the session is lost --
    a.sigkill()?;
    for page in [&carol, &alice] {
        page.wait_for_within(
            "document.body.dataset.endReason === 'session_lost'",
            "the page to tell that the session was lost",
            CLUSTER_WAIT + Duration::from_secs(10),
        )
        .await?;
        let said = page.text("#session-status").await?;
        ensure!(
            said.contains("session was lost") && said.contains("new session"),
            "the page says: {said}"
        );
        let retrying: Value = page
            .js("return document.body.dataset.state", vec![])
            .await?;
        ensure!(retrying == json!("ended"), "the page is {retrying}");
    }
    ensure!(
        metric(&b, "relay_cluster_sessions_lost_total").await? == 1.0,
        "B did not sweep A's session"
    );

    for page in [carol, alice] {
        page.close().await?;
    }
    Ok(())
}
