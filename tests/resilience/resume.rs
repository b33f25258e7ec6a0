use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use relay_bench::client::{
    Agent, AgentOptions, ClientError, Customer, CustomerOptions, FrameSource, Signalling,
    VideoCodec, tls_trusting_pem_file,
};
use relay_e2e::RelayBuilder;
use relay_e2e::wire::{EndReason, ErrorCode, Permission, RosterEntry, ServerMsg, Visibility};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

async fn publish(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Customer> {
    publish_fixture(url, tls, "screen-vp8.ivf").await
}

/// A customer publishing the fixture `name` (its codec is the fixture's).
async fn publish_fixture(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<Customer> {
    let source = FrameSource::open(relay_e2e::fixture(name))?;
    let customer = Customer::connect(url, tls, source, CustomerOptions::default())
        .await
        .context("customer connects")?;
    customer.wait_connected(WAIT).await?;
    customer.wait_input_open(WAIT).await?;
    Ok(customer)
}

/// What `agent` was told about participant `pid`: (connected, reconnecting), in order.
fn presence_of(agent: &Agent, pid: &str) -> Vec<(bool, bool)> {
    agent
        .transcript()
        .messages()
        .into_iter()
        .filter_map(|m| match m {
            ServerMsg::ParticipantUpdated {
                participant:
                    RosterEntry {
                        participant_id,
                        connected,
                        reconnecting,
                        ..
                    },
            } if participant_id == pid => Some((connected, reconnecting)),
            _ => None,
        })
        .collect()
}

/// The customer's client is killed mid-session (dropped: no `leave`, no close
/// handshake) and restarted with its resume token within the grace period.
#[tokio::test]
async fn customer_killed_and_restarted_mid_session_resumes() -> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let creds = relay
        .host_invitee_customer("Bob Masked", Visibility::Masked, Permission::View)
        .await?;
    let (session, bob_creds, carol) = (&creds.session, &creds.invitee, &creds.customer);
    let host = Agent::connect(&session.host.ws_url, tls.clone(), AgentOptions::default()).await?;
    let bob = Agent::connect(&bob_creds.ws_url, tls.clone(), AgentOptions::default()).await?;
    let first = publish(&carol.ws_url, tls.clone()).await?;
    let customer_id = carol.participant_id.clone();
    let resume = first
        .resume_url()
        .context("the customer's welcome has a resume token")?
        .to_owned();
    for (name, agent) in [("host", &host), ("bob", &bob)] {
        agent
            .wait_frames(15, WAIT)
            .await
            .with_context(|| format!("{name} receives frames before the crash"))?;
    }
    host.wait_input_open(WAIT).await?;
    let peer_connections = relay.metric("relay_peer_connections_active").await?;
    let negotiated = [host.negotiation(), bob.negotiation()];

    // The customer's machine reboots: its client is gone without a word.
    drop(first);
    relay_e2e::wait_until("the agents to see the customer reconnecting", WAIT, || {
        [&host, &bob]
            .iter()
            .all(|a| presence_of(a, &customer_id).last() == Some(&(false, true)))
    })
    .await?;
    // Input sent meanwhile is dropped and counted, and never reaches the customer
    // later. The customer's peer connection is closed; the agents' stay.
    let during_gap = relay_e2e::mouse_moves(0..30, 7777);
    for e in &during_gap {
        host.send_input(e).await?;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let away = relay
            .metric("relay_input_events_total{outcome=\"customer_away\"}")
            .await?
            .unwrap_or(0.0);
        if away >= during_gap.len() as f64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "input dropped during the gap: {away}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let active = relay.metric("relay_peer_connections_active").await?;
    ensure!(
        active == peer_connections.map(|n| n - 1.0),
        "peer connections: {peer_connections:?} before, {active:?} during the gap"
    );

    // The customer comes back with its resume token and publishes again.
    let resumed_at = Instant::now();
    let second = publish(&resume, tls.clone())
        .await
        .context("the restarted customer resumes")?;
    ensure!(second.welcome().you.participant_id == customer_id);
    ensure!(
        second.resume_url().is_some_and(|u| u != resume),
        "the resumed welcome carries a new resume token"
    );
    relay_e2e::wait_until("the agents to see the customer back", WAIT, || {
        [&host, &bob]
            .iter()
            .all(|a| presence_of(a, &customer_id).last() == Some(&(true, false)))
    })
    .await?;
    // The used resume token is refused the second time.
    let mut replay = Signalling::connect(&resume, tls.clone()).await?;
    match replay.welcome(WAIT).await {
        Err(ClientError::Refused {
            code: ErrorCode::Unauthorized,
            ..
        }) => {}
        other => bail!("a used resume token was not refused: {other:?}"),
    }
    // Agents resume on their existing peer connections: no renegotiation.
    for (name, agent) in [("host", &host), ("bob", &bob)] {
        let before = agent.frames_received();
        agent
            .wait_frames(before + 30, WAIT)
            .await
            .with_context(|| format!("{name} receives the resumed stream"))?;
    }
    // Input after the resume arrives; nothing from the gap ever does.
    let after_resume = relay_e2e::mouse_moves(0..20, 8888);
    relay_e2e::input_arrives(&host, &second, &after_resume).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        second.input_events().len() == after_resume.len(),
        "the resumed customer got {:?}, not exactly the 20 events sent after it published",
        second.input_events()
    );

    second.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = second.sent_frames();
    for (name, agent) in [("host", &host), ("bob", &bob)] {
        relay_e2e::frames_whole_in_order(name, Some(resumed_at), &sent, &agent.frames(), 20)?;
    }
    // The agents kept their peer connections: the resume asked for no new offer.
    for (before, (name, agent)) in negotiated.iter().zip([("host", &host), ("bob", &bob)]) {
        let now = agent.negotiation();
        ensure!(
            now.offers_sent == before.offers_sent
                && now.renegotiate_requests == before.renegotiate_requests,
            "{name} renegotiated for the resume: {before:?} then {now:?}"
        );
    }
    // The customer never learnt of the masked agent, before or after the resume.
    ensure!(
        !second.transcript().contains(&bob_creds.participant_id)
            && !second.transcript().contains("Bob Masked")
    );

    // Agents resume the same way: the host's client dies and comes back with its own
    // resume token, on a new peer connection; its participant token is used up.
    second.set_publishing(true);
    let host_resume = host.resume_url().context("host's resume token")?.to_owned();
    drop(host);
    let host = Agent::connect(&host_resume, tls.clone(), AgentOptions::default())
        .await
        .context("the host resumes")?;
    ensure!(host.welcome().you.role == relay_e2e::wire::Role::Host);
    host.wait_frames(10, WAIT)
        .await
        .context("the resumed host receives frames")?;
    for used in [&session.host.ws_url, &host_resume] {
        let mut replay = Signalling::connect(used, tls.clone()).await?;
        ensure!(
            matches!(
                replay.welcome(WAIT).await,
                Err(ClientError::Refused {
                    code: ErrorCode::Unauthorized,
                    ..
                })
            ),
            "a used host token was accepted"
        );
    }
    Ok(())
}

/// A customer that comes back from a reboot with another encoder (VP8 before, H.264
/// after: another browser, a hardware encoder): the relay never transcodes, so each
/// agent's track of the old codec goes, the agents are asked to renegotiate, and they
/// get the new codec's frames whole, from its first keyframe, on the same peer
/// connection.
#[tokio::test]
async fn a_customer_that_comes_back_with_another_codec_is_forwarded_after_a_renegotiation()
-> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let creds = relay
        .host_invitee_customer("Victor Viewer", Visibility::Visible, Permission::View)
        .await?;
    let host = Agent::connect(
        &creds.session.host.ws_url,
        tls.clone(),
        AgentOptions::default(),
    )
    .await?;
    let viewer =
        Agent::connect(&creds.invitee.ws_url, tls.clone(), AgentOptions::default()).await?;
    let first = publish_fixture(&creds.customer.ws_url, tls.clone(), "screen-vp8.ivf").await?;
    for agent in [&host, &viewer] {
        agent.wait_frames(10, WAIT).await?;
    }
    let resume = first.resume_url().context("resume token")?.to_owned();
    let before = [host.negotiation(), viewer.negotiation()];
    drop(first);

    let resumed_at = Instant::now();
    let second = publish_fixture(&resume, tls.clone(), "screen-h264.h264")
        .await
        .context("the customer resumes with H.264")?;
    for (name, agent) in [("host", &host), ("viewer", &viewer)] {
        relay_e2e::wait_until("H.264 frames at the agent", WAIT, || {
            agent
                .frames()
                .iter()
                .filter(|f| f.received_at >= resumed_at && f.codec == VideoCodec::H264)
                .count()
                >= 30
        })
        .await
        .with_context(|| format!("{name} gets the new codec"))?;
    }
    second.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = second.sent_frames();
    for ((name, agent), before) in [("host", &host), ("viewer", &viewer)]
        .into_iter()
        .zip(before)
    {
        let n =
            relay_e2e::frames_whole_in_order(name, Some(resumed_at), &sent, &agent.frames(), 20)?;
        ensure!(n >= 30, "{name}: {n} frames of the new codec");
        let now = agent.negotiation();
        ensure!(
            now.renegotiate_requests > before.renegotiate_requests
                && now.answers_applied > before.answers_applied,
            "{name} was not asked to renegotiate for the new codec: {before:?} then {now:?}"
        );
    }
    ensure!(
        relay
            .metric("relay_negotiations_total{outcome=\"replaced\"}")
            .await?
            .unwrap_or(0.0)
            == 0.0,
        "the agents kept their peer connections (renegotiated them, none replaced)"
    );
    Ok(())
}

/// A customer that does not come back within its (short) grace period ends the
/// session for the agents with `customer_did_not_return`; its resume token then gets
/// `session_ended`.
#[tokio::test]
async fn customer_that_does_not_return_ends_the_session() -> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().customer_grace("2s").start().await?;
    let host_jwt = relay.token("a0", "Alice Host", &["support"], false);
    let s = relay
        .create_session(&host_jwt, "support", Visibility::Visible)
        .await?;
    let mut host = relay.ws(&s.host.ws_url, "host").await?;
    host.recv_type("welcome").await?;
    let carol = relay.join("Carol", &s.support_key).await?;
    let mut customer = relay.ws(&carol.ws_url, "customer").await?;
    customer.recv_type("welcome").await?;
    let resume = customer.resume_url(&carol.ws_url)?;
    let is_customer = |m: &Value, connected: bool| {
        m["type"] == "participant_updated"
            && m["participant"]["participant_id"] == carol.participant_id.as_str()
            && m["participant"]["connected"] == connected
    };
    host.recv_until(|m| is_customer(m, true)).await?;

    drop(customer);
    let away_at = Instant::now();
    let away = host.recv_until(|m| is_customer(m, false)).await?;
    ensure!(away["participant"]["reconnecting"] == true, "{away}");
    let ended = host
        .recv_until_within(Duration::from_secs(10), |m| m["type"] == "session_ended")
        .await?;
    let waited = away_at.elapsed();
    ensure!(
        ended["reason"] == EndReason::CustomerDidNotReturn.as_str(),
        "{ended}"
    );
    ensure!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(8),
        "the session ended {waited:?} after the customer left, with a 2 s grace"
    );
    host.wait_closed(Duration::from_secs(5)).await?;

    let mut late = relay.ws(&resume, "customer, too late").await?;
    let refused = late.recv_type("error").await?;
    ensure!(refused["code"] == "session_ended", "{refused}");
    Ok(())
}

/// An agent whose client dies (no `leave`, no close) comes back with its resume token
/// on a new peer connection, and everything works again there: video, its input
/// reaching the customer, and chat on its new `chat` channel. The relay keeps one
/// `chat` channel per participant, not the dead one besides the new one.
#[tokio::test]
async fn agent_killed_and_restarted_resumes_with_input_and_chat() -> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let host_jwt = relay.token("a0", "Alice Host", &["support"], false);
    let session = relay
        .create_session(&host_jwt, "support", Visibility::Visible)
        .await?;
    let host = Agent::connect(&session.host.ws_url, tls.clone(), AgentOptions::default()).await?;
    let carol = relay.join("Carol Customer", &session.support_key).await?;
    let customer = publish(&carol.ws_url, tls.clone()).await?;
    host.wait_frames(10, WAIT)
        .await
        .context("host receives frames")?;
    host.wait_input_open(WAIT).await?;
    host.chat().wait_open(WAIT).await?;
    customer.chat().wait_open(WAIT).await?;
    let before = relay_e2e::mouse_moves(0..5, 1111);
    relay_e2e::input_arrives(&host, &customer, &before)
        .await
        .context("input before the drop")?;
    let chat_channels = relay
        .metric("relay_data_channels_open{label=\"chat\"}")
        .await?;
    ensure!(
        chat_channels == Some(2.0),
        "chat channels open: {chat_channels:?}"
    );

    // The host's laptop sleeps: its client is gone without a word, and comes back.
    let resume = host.resume_url().context("host's resume token")?.to_owned();
    drop(host);
    let host = Agent::connect(&resume, tls.clone(), AgentOptions::default())
        .await
        .context("the host resumes")?;
    ensure!(host.welcome().you.permission == Some(Permission::Control));
    let frames = host.frames_received();
    host.wait_frames(frames + 10, WAIT)
        .await
        .context("the resumed host receives frames")?;
    host.wait_input_open(WAIT).await?;
    host.chat().wait_open(WAIT).await?;
    // Its dead client's peer connection was still up on the relay (nothing closed it):
    // the new one's offer replaced it, the path an agent's network blip takes.
    let replaced = relay
        .metric("relay_negotiations_total{outcome=\"replaced\"}")
        .await?;
    ensure!(replaced == Some(1.0), "replaced negotiations: {replaced:?}");

    // Its input reaches the customer again, in order.
    let after = relay_e2e::mouse_moves(0..10, 2222);
    relay_e2e::input_arrives(&host, &customer, &after)
        .await
        .context("input after the agent's resume")?;
    // Chat works both ways on the new channel.
    host.chat()
        .send("back again", relay_e2e::wire::Audience::All)
        .await?;
    relay_e2e::wait_until("the customer to get the chat", WAIT, || {
        customer
            .chat()
            .messages()
            .iter()
            .any(|m| m.text == "back again")
    })
    .await?;
    customer
        .chat()
        .send("welcome back", relay_e2e::wire::Audience::All)
        .await?;
    relay_e2e::wait_until("the host to get the chat on its new channel", WAIT, || {
        host.chat()
            .messages()
            .iter()
            .any(|m| m.text == "welcome back")
    })
    .await?;
    let chat_channels = relay
        .metric("relay_data_channels_open{label=\"chat\"}")
        .await?;
    ensure!(
        chat_channels == Some(2.0),
        "chat channels open after the resume: {chat_channels:?}"
    );
    Ok(())
}
