//! The browser clients and the native ones (`relay_bench::client`) in the same sessions:
//! Chromium's WebRTC stack and the `webrtc` crate's, each way through the relay.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_bench::client::{
    Agent, AgentOptions, Customer, CustomerOptions, FrameSource, tls_trusting_pem_file,
};
use relay_e2e::wire::Visibility;

use super::{ONE_AT_A_TIME, PORTAL, VIDEO_WAIT, setup, token};

#[tokio::test]
async fn native_and_browser_clients_interoperate() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((relay, chromium)) = setup().await? else {
        return Ok(());
    };
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;

    // --- A native agent watches a browser customer ------------------------------------
    let host = token(&relay, "nina", "Nina Native");
    let s = relay
        .create_session(&host, PORTAL, Visibility::Visible)
        .await?;
    let native_agent = Agent::connect(&s.host.ws_url, tls.clone(), AgentOptions::default()).await?;
    let carol = chromium.page("Carol (browser customer)").await?;
    // She opens the support URL: the portal asks only for her name.
    carol.goto(&s.support_url).await?;
    ensure!(
        carol
            .js("return document.querySelector('#key-field').hidden", vec![])
            .await?
            == serde_json::json!(true),
        "the support URL's page asks for the key"
    );
    carol.fill("#name", "Carol Browser").await?;
    carol.click("#join-button").await?;
    carol
        .wait_for("document.body.dataset.state === 'joined'", "Carol joined")
        .await?;
    carol
        .wait_for(
            "document.querySelector('#agents').textContent.includes('Nina Native')",
            "the native host in the browser customer's roster",
        )
        .await?;
    carol.click("#share-button").await?;
    native_agent
        .wait_frames(30, VIDEO_WAIT)
        .await
        .context("the native agent receiving the browser's screen")?;
    let stats = native_agent.receive_stats();
    ensure!(
        native_agent
            .frames()
            .iter()
            .filter(|f| f.is_keyframe)
            .count()
            >= 1,
        "no keyframe among the frames from Chromium: {stats:?}"
    );

    // Her connection drops (as a network failure would): the page comes back with its
    // resume token and publishes the same screen again; the native agent, on its own
    // unchanged connection, gets frames again.
    let before = native_agent.frames_received();
    carol
        .js("window.__dropConnection(); return true", vec![])
        .await?;
    carol
        .wait_for(
            "window.__resumes === 1 && document.body.dataset.state === 'sharing'",
            "Carol's page resumed and shares again",
        )
        .await?;
    native_agent
        .wait_frames(before + 30, VIDEO_WAIT)
        .await
        .context("the native agent receiving the browser's screen after her resume")?;
    carol.close().await?;
    drop(native_agent);

    // --- A browser agent watches a native customer ------------------------------------
    let alice = chromium.page("Alice (browser agent)").await?;
    alice
        .goto(&relay.endpoint(&format!(
            "/agent?token={}",
            token(&relay, "alice", "Alice Browser")
        )))
        .await?;
    alice
        .wait_for("document.body.dataset.state === 'home'", "Alice signed in")
        .await?;
    alice.click("#start-button").await?;
    alice
        .wait_for(
            "document.body.dataset.state === 'session'",
            "Alice's session",
        )
        .await?;
    let key: String = alice.text("#support-key").await?;
    let creds = relay.join("Nate Native", &key).await?;
    let source = FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"))?;
    let customer = Customer::connect(&creds.ws_url, tls, source, CustomerOptions::default())
        .await
        .context("the native customer")?;
    customer.wait_connected(VIDEO_WAIT).await?;
    alice
        .wait_for_within(
            "Number(document.querySelector('#remote').dataset.framesDecoded) > 30",
            "30 decoded frames of the native customer's screen",
            VIDEO_WAIT,
        )
        .await?;
    let size = alice
        .js(
            "const v = document.querySelector('#remote'); return [v.videoWidth, v.videoHeight]",
            vec![],
        )
        .await?;
    ensure!(
        size[0].as_u64().unwrap_or(0) > 0 && size[1].as_u64().unwrap_or(0) > 0,
        "the video has no size: {size}"
    );

    // Alice takes control; her click reaches the native customer.
    alice.click("#control-button").await?;
    alice.click("#remote").await?;
    let started = std::time::Instant::now();
    while customer.input_events().is_empty() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = customer.input_events();
    ensure!(
        events.iter().any(|e| e.event.is_ok()),
        "the browser agent's input never reached the native customer: {events:?}"
    );
    alice.close().await?;
    drop(customer);
    Ok(())
}
