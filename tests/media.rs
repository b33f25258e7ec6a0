//! End-to-end tests of the media plane: the real `relay` binary on loopback, real
//! `webrtc` peers (the native client of `relay-bench`), real encoded frames from the
//! committed fixtures. Each test asserts what a participant would notice: frames that
//! arrive whole and in order, input that arrives or never does, a masked agent the
//! customer never learns of, a stalled agent that does not hurt the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use relay_bench::client::{
    Agent, AgentOptions, Customer, CustomerOptions, FrameSource, ReceivedFrame, SentFrame,
    tls_trusting_pem_file,
};
use relay_bench::run::measure::SentIndex;
use relay_codec::input::InputEvent;
use relay_e2e::wire::{ErrorCode, InviteTarget, Permission, Visibility};
use relay_e2e::{ExpectRefusal, Relay, RelayBuilder};

/// `relay-bench run` against the real relay (issue 3's last check).
#[path = "media/bench_run.rs"]
mod bench_run;

/// VP9 and AV1 through the relay.
#[path = "media/codecs.rs"]
mod codecs;

/// One UDP port for all media.
#[path = "media/udp_mux.rs"]
mod udp_mux;

const WAIT: Duration = Duration::from_secs(20);

/// A session with a host, seven invited agents and a customer publishing `fixture`.
struct Session {
    relay: Relay,
    customer: Customer,
    /// Host first, then the invited agents in invitation order.
    agents: Vec<(String, Agent)>,
    masked_id: String,
}

/// Names of the agents: index 1 is masked, index 2 is view-only.
const NAMES: [&str; 8] = [
    "Alice Host",
    "Mallory Masked",
    "Victor Viewonly",
    "Agent Three",
    "Agent Four",
    "Agent Five",
    "Agent Six",
    "Agent Seven",
];

async fn eight_agents_and_a_customer(fixture_name: &str) -> Result<Session> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let host_jwt = relay.token("a0", NAMES[0], &["support"], false);
    let session = relay
        .create_session(&host_jwt, "support", Visibility::Visible)
        .await?;
    let sid = session.session_id.clone();
    let mut urls = vec![(NAMES[0].to_owned(), session.host.ws_url.clone())];
    let mut masked_id = String::new();
    for (i, name) in NAMES.iter().enumerate().skip(1) {
        let id = format!("a{i}");
        let jwt = relay.token(&id, name, &["support"], false);
        let visibility = if i == 1 {
            Visibility::Masked
        } else {
            Visibility::Visible
        };
        let permission = if i == 2 {
            Permission::View
        } else {
            Permission::Control
        };
        let inv = relay
            .invite(
                &host_jwt,
                &sid,
                InviteTarget::Agent(id.clone()),
                visibility,
                permission,
                None,
            )
            .await?;
        let creds = relay.accept(&jwt, &inv.invitation_id).await?;
        if i == 1 {
            masked_id = creds.participant_id.clone();
        }
        urls.push((name.to_string(), creds.ws_url));
    }
    // A ninth agent is refused: eight is the limit.
    relay
        .invite(
            &host_jwt,
            &sid,
            InviteTarget::Agent("a8".into()),
            Visibility::Visible,
            Permission::View,
            None,
        )
        .await
        .refused(409, ErrorCode::SessionFull)?;

    // Agents connect together, before there is media (they renegotiate when it comes).
    let agents = connect_agents(&urls, &tls).await?;
    let customer = join_and_publish(&relay, &session.support_key, tls, fixture_name).await?;
    customer
        .wait_input_open(WAIT)
        .await
        .context("customer's input channel")?;
    Ok(Session {
        relay,
        customer,
        agents,
        masked_id,
    })
}

/// Connects every `(name, ws_url)` as an agent, all at once, and waits for each peer
/// connection.
async fn connect_agents(
    urls: &[(String, String)],
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Vec<(String, Agent)>> {
    let connects = urls.iter().map(|(name, url)| {
        let tls = Arc::clone(tls);
        async move {
            let agent = Agent::connect(url, tls, AgentOptions::default())
                .await
                .with_context(|| format!("{name} connects"))?;
            agent
                .wait_connected(WAIT)
                .await
                .with_context(|| format!("{name}'s peer connection"))?;
            anyhow::Ok((name.clone(), agent))
        }
    });
    futures_util::future::try_join_all(connects).await
}

/// A customer joins with `support_key` and publishes the fixture `fixture_name`, its
/// peer connection up.
async fn join_and_publish(
    relay: &Relay,
    support_key: &str,
    tls: Arc<rustls::ClientConfig>,
    fixture_name: &str,
) -> Result<Customer> {
    let carol = relay.join("Carol Customer", support_key).await?;
    let source = FrameSource::open(relay_e2e::fixture(fixture_name))?;
    let customer = Customer::connect(&carol.ws_url, tls, source, CustomerOptions::default())
        .await
        .context("customer connects")?;
    customer
        .wait_connected(WAIT)
        .await
        .context("customer's peer connection")?;
    Ok(customer)
}

/// Maps each received frame to the index of the frame the customer sent with the same
/// digest most recently before it arrived (the fixture loops, so digests repeat).
fn sent_indices(sent: &[SentFrame], received: &[ReceivedFrame]) -> Result<Vec<u64>> {
    let index = SentIndex::new(sent);
    received
        .iter()
        .enumerate()
        .map(|(i, r)| {
            index
                .find(r)
                .map(|s| s.index)
                .with_context(|| format!("received frame #{i} matches no frame the customer sent"))
        })
        .collect()
}

/// Every frame from the first one received on, complete (digest equal to the source's)
/// and in order, with none missing.
fn assert_complete_and_in_order(
    name: &str,
    sent: &[SentFrame],
    frames: &[ReceivedFrame],
) -> Result<()> {
    ensure!(
        frames.len() >= 20,
        "{name} received only {} frames",
        frames.len()
    );
    ensure!(
        frames[0].is_keyframe,
        "{name}'s first frame is not a keyframe"
    );
    let idx = sent_indices(sent, frames).with_context(|| name.to_owned())?;
    for w in idx.windows(2) {
        ensure!(
            w[1] == w[0] + 1,
            "{name}: after sent frame {} came sent frame {} (frames missing or out of order)",
            w[0],
            w[1]
        );
    }
    Ok(())
}

async fn fan_out_to_eight_agents(fixture_name: &str) -> Result<()> {
    let s = eight_agents_and_a_customer(fixture_name).await?;
    for (name, agent) in &s.agents {
        agent
            .wait_frames(45, WAIT)
            .await
            .with_context(|| format!("{name} receives frames"))?;
    }

    // Input: the host (control) sends a burst, the view-only agent another; only the
    // host's arrive, all of them, in order, renumbered by the relay without gaps.
    let (host, viewer) = (&s.agents[0].1, &s.agents[2].1);
    host.wait_input_open(WAIT).await?;
    viewer.wait_input_open(WAIT).await?;
    let from_host = relay_e2e::mouse_moves(0..100, 1111);
    let from_viewer = relay_e2e::mouse_moves(0..20, 2222);
    for e in &from_viewer {
        viewer.send_input(e).await?;
    }
    for e in &from_host {
        host.send_input(e).await?;
    }
    relay_e2e::wait_until("the host's input", WAIT, || {
        s.customer.input_events().len() >= from_host.len()
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<InputEvent> = s
        .customer
        .input_events()
        .into_iter()
        .map(|r| r.event)
        .collect::<std::result::Result<_, _>>()?;
    ensure!(
        got.iter()
            .map(|e| &e.kind)
            .eq(from_host.iter().map(|e| &e.kind)),
        "the customer got {} events, not exactly the host's 100 in order",
        got.len()
    );
    ensure!(got.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    let refused = s
        .relay
        .metric("relay_input_events_total{outcome=\"refused_view_only\"}")
        .await?;
    ensure!(
        refused == Some(20.0),
        "refused view-only events: {refused:?}"
    );
    ensure!(
        viewer.transcript().messages().iter().any(|m| matches!(
            m,
            relay_e2e::wire::ServerMsg::Error {
                code: ErrorCode::Forbidden,
                ..
            }
        )),
        "the view-only agent was not told its input is refused"
    );

    // Let more frames flow, then stop the customer and compare.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.customer.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = s.customer.sent_frames();
    for (name, agent) in &s.agents {
        assert_complete_and_in_order(name, &sent, &agent.frames())?;
    }

    // Keyframe requests of agents joining together were coalesced.
    let requests_sent = s
        .relay
        .metric("relay_keyframe_requests_total{outcome=\"sent\"}")
        .await?
        .unwrap_or(0.0);
    let coalesced = s
        .relay
        .metric("relay_keyframe_requests_total{outcome=\"coalesced\"}")
        .await?
        .unwrap_or(0.0);
    ensure!(
        requests_sent <= 3.0 && coalesced >= 5.0,
        "8 agents joining caused {requests_sent} keyframe requests ({coalesced} coalesced)"
    );
    ensure!(
        s.customer.keyframe_request_count() <= 4,
        "the customer got {} keyframe requests",
        s.customer.keyframe_request_count()
    );

    // The customer never learns of the masked agent: not in signalling, not on data
    // channels.
    for text in s.customer.transcript().texts() {
        ensure!(
            !text.contains(NAMES[1]) && !text.contains(&s.masked_id) && !text.contains("\"a1\""),
            "the customer saw the masked agent: {text}"
        );
    }
    for msg in s.customer.data_channel_messages() {
        let text = String::from_utf8_lossy(&msg.data);
        ensure!(!text.contains(NAMES[1]) && !text.contains(&s.masked_id));
    }
    let forwarded = s.relay.metric("relay_rtp_packets_forwarded_total").await?;
    ensure!(forwarded.unwrap_or(0.0) > 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vp8_reaches_eight_agents_whole_and_in_order_with_input_and_masking() -> Result<()> {
    fan_out_to_eight_agents("screen-vp8.ivf").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h264_reaches_eight_agents_whole_and_in_order_with_input_and_masking() -> Result<()> {
    fan_out_to_eight_agents("screen-h264.h264").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_agent_recovers_at_a_keyframe_and_the_others_lose_nothing() -> Result<()> {
    let s = eight_agents_and_a_customer("screen-vp8.ivf").await?;
    for (name, agent) in &s.agents {
        agent
            .wait_frames(20, WAIT)
            .await
            .with_context(|| format!("{name} receives frames"))?;
    }
    let stalled = &s.agents[3].1;
    let host = &s.agents[0].1;
    let packets = host.receive_stats().rtp_packets;
    stalled.pause();
    let paused_at = Instant::now();
    // More than the client's own track queue holds, so the stalled agent loses packets.
    relay_e2e::wait_until("the host to receive 400 more packets", WAIT, || {
        host.receive_stats().rtp_packets >= packets + 400
    })
    .await?;
    stalled.resume();
    let resumed_at = Instant::now();
    // It gets back to a whole picture: a keyframe sent after it resumed (what it reads
    // first is what its own client queued while it was stalled).
    let fresh_keyframe = |frames: &[ReceivedFrame], sent: &[SentFrame]| {
        frames.iter().position(|f| {
            f.is_keyframe
                && f.received_at > resumed_at
                && sent
                    .iter()
                    .rev()
                    .find(|x| x.digest == f.digest && x.sent_at <= f.received_at)
                    .is_some_and(|x| x.sent_at > resumed_at)
        })
    };
    relay_e2e::wait_until("a fresh keyframe at the stalled agent", WAIT, || {
        fresh_keyframe(&stalled.frames(), &s.customer.sent_frames()).is_some()
    })
    .await?;
    relay_e2e::wait_until("25 frames after the recovery", WAIT, || {
        let frames = stalled.frames();
        fresh_keyframe(&frames, &s.customer.sent_frames())
            .is_some_and(|start| frames.len() - start >= 25)
    })
    .await?;
    s.customer.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = s.customer.sent_frames();
    for (i, (name, agent)) in s.agents.iter().enumerate() {
        if i == 3 {
            continue;
        }
        assert_complete_and_in_order(name, &sent, &agent.frames())?;
    }
    // From its recovery keyframe on, the stalled agent's frames are whole and in order.
    let frames = stalled.frames();
    let start = fresh_keyframe(&frames, &sent).context("recovery keyframe")?;
    assert_complete_and_in_order("the stalled agent after recovery", &sent, &frames[start..])?;
    ensure!(paused_at < resumed_at);
    Ok(())
}

// ----- chat and file transfer on data channels ---------------------------------------

/// A smaller session for the data-channel tests: a host, a masked agent with control,
/// a view-only agent and a customer, every one with open `chat` and `files` channels
/// that the relay has taken into use.
struct Small {
    relay: Relay,
    customer: Customer,
    host: Agent,
    masked: Agent,
    viewer: Agent,
    masked_id: String,
}

/// Names in [`Small`]: the masked agent's must never reach the customer.
const HOST: &str = "Alice Host";
const MASKED: &str = "Mallory Masked";
const VIEWER: &str = "Victor Viewonly";

async fn host_masked_viewer_and_customer(
    builder: RelayBuilder,
    auto_accept: bool,
) -> Result<Small> {
    relay_e2e::install_crypto();
    let relay = builder.start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let host_jwt = relay.token("a0", HOST, &["support"], false);
    let session = relay
        .create_session(&host_jwt, "support", Visibility::Visible)
        .await?;
    let sid = session.session_id.clone();
    let mut creds = Vec::new();
    for (id, name, visibility, permission) in [
        ("a1", MASKED, Visibility::Masked, Permission::Control),
        ("a2", VIEWER, Visibility::Visible, Permission::View),
    ] {
        let jwt = relay.token(id, name, &["support"], false);
        let inv = relay
            .invite(
                &host_jwt,
                &sid,
                InviteTarget::Agent(id.into()),
                visibility,
                permission,
                None,
            )
            .await?;
        creds.push(relay.accept(&jwt, &inv.invitation_id).await?);
    }
    let masked_id = creds[0].participant_id.clone();
    let options = AgentOptions {
        auto_accept_files: auto_accept,
        ..AgentOptions::default()
    };
    let urls = [&session.host.ws_url, &creds[0].ws_url, &creds[1].ws_url];
    let agents = futures_util::future::try_join_all(urls.into_iter().map(|url| {
        let (tls, options) = (tls.clone(), options.clone());
        async move { Agent::connect(url, tls, options).await }
    }))
    .await?;
    let carol = relay.join("Carol Customer", &session.support_key).await?;
    let customer = Customer::connect(
        &carol.ws_url,
        tls,
        FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"))?,
        CustomerOptions {
            auto_accept_files: auto_accept,
            ..CustomerOptions::default()
        },
    )
    .await?;
    // No screen needed here: less work for the machine.
    customer.set_publishing(false);
    let [host, masked, viewer]: [Agent; 3] = agents
        .try_into()
        .map_err(|_| anyhow::anyhow!("three agents"))?;
    for (name, chat, files) in [
        ("the customer", customer.chat(), customer.files()),
        (HOST, host.chat(), host.files()),
        (MASKED, masked.chat(), masked.files()),
        (VIEWER, viewer.chat(), viewer.files()),
    ] {
        chat.wait_open(WAIT)
            .await
            .with_context(|| format!("{name}'s chat channel"))?;
        files
            .wait_open(WAIT)
            .await
            .with_context(|| format!("{name}'s files channel"))?;
    }
    // The relay takes a channel into use a moment after the client sees it open.
    let deadline = Instant::now() + WAIT;
    loop {
        let chat = relay
            .metric("relay_data_channels_open{label=\"chat\"}")
            .await?;
        let files = relay
            .metric("relay_data_channels_open{label=\"files\"}")
            .await?;
        if chat == Some(4.0) && files == Some(4.0) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the relay uses {chat:?} chat and {files:?} files channels, not 4 each"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Small {
        relay,
        customer,
        host,
        masked,
        viewer,
        masked_id,
    })
}

/// Fails if anything the customer received names the masked agent.
fn assert_customer_never_sees_the_masked_agent(s: &Small) -> Result<()> {
    for text in s.customer.transcript().texts() {
        ensure!(
            !text.contains(MASKED) && !text.contains(&s.masked_id) && !text.contains("\"a1\""),
            "the customer's WebSocket named the masked agent: {text}"
        );
    }
    for msg in s.customer.data_channel_messages() {
        let text = String::from_utf8_lossy(&msg.data);
        ensure!(
            !text.contains(MASKED) && !text.contains(&s.masked_id),
            "the customer's {} channel named the masked agent: {text}",
            msg.label
        );
    }
    Ok(())
}

fn random_bytes(n: usize) -> Vec<u8> {
    use rand::Rng;
    let mut v = vec![0u8; n];
    rand::rng().fill(&mut v[..]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_on_data_channels_reaches_the_right_people_once_and_never_names_the_masked_agent()
-> Result<()> {
    use relay_e2e::wire::{Audience, ClientMsg, ServerMsg};
    let s = host_masked_viewer_and_customer(RelayBuilder::new(), false).await?;
    s.masked
        .chat()
        .send("masked says hi", Audience::All)
        .await?;
    s.viewer
        .chat()
        .send("agents only: old driver", Audience::Agents)
        .await?;
    s.customer
        .chat()
        .send("customer here", Audience::All)
        .await?;
    // Chat sent on the WebSocket reaches open chat channels too.
    s.host
        .send(&ClientMsg::Chat {
            text: "host on the socket".into(),
            audience: Audience::All,
        })
        .await?;

    for (name, chat) in [
        (HOST, s.host.chat()),
        (MASKED, s.masked.chat()),
        (VIEWER, s.viewer.chat()),
    ] {
        chat.wait_messages(4, WAIT)
            .await
            .with_context(|| format!("{name}'s chat"))?;
    }
    s.customer.chat().wait_messages(3, WAIT).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The customer: three messages, no note, the masked agent's without a name.
    let got = s.customer.chat().messages();
    let texts: Vec<&str> = got.iter().map(|c| c.text.as_str()).collect();
    ensure!(texts.len() == 3, "the customer got {texts:?}");
    ensure!(
        !texts.contains(&"agents only: old driver"),
        "a note reached the customer"
    );
    let from_masked = got
        .iter()
        .find(|c| c.text == "masked says hi")
        .context("the masked agent's chat")?;
    ensure!(from_masked.from.is_none() && from_masked.from_name.is_none());
    // Agents see everything, with names.
    let host_view = s.host.chat().messages();
    ensure!(
        host_view
            .iter()
            .any(|c| c.text == "masked says hi" && c.from_name.as_deref() == Some(MASKED)),
        "the host does not see who said it: {host_view:?}"
    );
    // Exactly once: on the channel, never on the WebSocket as well.
    for (name, transcript) in [
        ("the customer", s.customer.transcript()),
        (HOST, s.host.transcript()),
        (MASKED, s.masked.transcript()),
        (VIEWER, s.viewer.transcript()),
    ] {
        let on_socket = transcript
            .messages()
            .into_iter()
            .filter(|m| matches!(m, ServerMsg::Chat(_)))
            .count();
        ensure!(
            on_socket == 0,
            "{name} got {on_socket} chat messages on the WebSocket too"
        );
    }
    for (name, chat, n) in [
        (HOST, s.host.chat(), 4),
        (MASKED, s.masked.chat(), 4),
        (VIEWER, s.viewer.chat(), 4),
    ] {
        ensure!(chat.messages().len() == n, "{name}: {:?}", chat.messages());
    }

    // Bad input on the channel: counted, answered on the WebSocket, nothing else lost.
    s.customer.chat().send_raw("{not json").await?;
    let limit = 16 * 1024;
    s.customer
        .chat()
        .send_raw(&format!(
            r#"{{"type":"chat","text":"{}","id":9}}"#,
            "x".repeat(limit)
        ))
        .await?;
    s.customer.chat().send("still here", Audience::All).await?;
    s.host.chat().wait_messages(5, WAIT).await?;
    relay_e2e::wait_until("the customer's two errors", WAIT, || {
        s.customer
            .transcript()
            .messages()
            .iter()
            .filter(|m| matches!(m, ServerMsg::Error { .. }))
            .count()
            >= 2
    })
    .await?;
    let errors: Vec<ErrorCode> = s
        .customer
        .transcript()
        .messages()
        .into_iter()
        .filter_map(|m| match m {
            ServerMsg::Error { code, .. } => Some(code),
            _ => None,
        })
        .collect();
    ensure!(
        errors == [ErrorCode::BadRequest, ErrorCode::MessageTooLarge],
        "errors: {errors:?}"
    );
    let too_large = s
        .relay
        .metric("relay_messages_rejected_total{code=\"message_too_large\"}")
        .await?;
    ensure!(
        too_large == Some(1.0),
        "message_too_large counted {too_large:?}"
    );
    let received = s
        .relay
        .metric("relay_chat_data_channel_total{outcome=\"received\"}")
        .await?;
    ensure!(
        received == Some(4.0),
        "chat received on channels: {received:?}"
    );

    assert_customer_never_sees_the_masked_agent(&s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_one_mib_file_goes_from_an_agent_to_the_customer_and_back_to_every_agent_byte_exact()
-> Result<()> {
    use relay_bench::client::{OutgoingState, file_sha256};
    let s = host_masked_viewer_and_customer(RelayBuilder::new(), true).await?;

    // The masked agent (control) sends the customer a file.
    let to_customer = random_bytes(1024 * 1024 + 123);
    let id = s
        .masked
        .files()
        .offer("driver.zip", to_customer.clone(), Some("application/zip"))
        .await?;
    ensure!(s.masked.files().wait_outgoing(id, WAIT).await? == OutgoingState::Sent);
    s.customer.files().wait_received(1, WAIT).await?;
    let got = &s.customer.files().received()[0];
    ensure!(got.offer.name == "driver.zip" && got.offer.mime.as_deref() == Some("application/zip"));
    ensure!(got.data == to_customer, "the customer's copy differs");
    ensure!(got.sha256 == file_sha256(&to_customer));

    // The customer sends a file: every agent gets it (the view-only one too).
    let to_agents = random_bytes(1024 * 1024);
    let id = s
        .customer
        .files()
        .offer("screenshot.png", to_agents.clone(), None)
        .await?;
    ensure!(s.customer.files().wait_outgoing(id, WAIT).await? == OutgoingState::Sent);
    for (name, agent) in [(HOST, &s.host), (MASKED, &s.masked), (VIEWER, &s.viewer)] {
        agent
            .files()
            .wait_received(1, WAIT)
            .await
            .with_context(|| format!("{name} receives the customer's file"))?;
        let got = &agent.files().received()[0];
        ensure!(
            got.sha256 == file_sha256(&to_agents) && got.data == to_agents,
            "{name}'s copy differs"
        );
    }
    ensure!(
        s.host.files().offers().len() == 1,
        "the host was offered its colleague's file to the customer"
    );

    let completed = s
        .relay
        .metric("relay_file_transfers_total{outcome=\"completed\"}")
        .await?;
    ensure!(completed == Some(4.0), "completed transfers: {completed:?}");
    let bytes = s.relay.metric("relay_file_bytes_forwarded_total").await?;
    let expected = (to_customer.len() + 3 * to_agents.len()) as f64;
    ensure!(
        bytes == Some(expected),
        "bytes forwarded {bytes:?}, expected {expected}"
    );

    assert_customer_never_sees_the_masked_agent(&s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_view_only_offer_and_offers_above_the_size_limit_are_refused() -> Result<()> {
    use relay_bench::client::OutgoingState;
    use relay_codec::files::CancelReason;
    let builder = RelayBuilder::new().extra_toml("[limits]\nmax_file_bytes = 100000\n");
    let s = host_masked_viewer_and_customer(builder, true).await?;

    let refused = |state: OutgoingState, reason: CancelReason| {
        ensure!(
            state == OutgoingState::Cancelled(reason),
            "expected a refusal ({reason:?}), got {state:?}"
        );
        Ok(())
    };
    // A view-only agent may not send the customer files.
    let id = s
        .viewer
        .files()
        .offer("innocent.txt", random_bytes(1000), None)
        .await?;
    refused(
        s.viewer.files().wait_outgoing(id, WAIT).await?,
        CancelReason::Forbidden,
    )?;
    // Above `limits.max_file_bytes`, either way.
    let id = s
        .host
        .files()
        .offer("big.iso", random_bytes(100_001), None)
        .await?;
    refused(
        s.host.files().wait_outgoing(id, WAIT).await?,
        CancelReason::TooLarge,
    )?;
    let id = s
        .customer
        .files()
        .offer("big.mov", random_bytes(150_000), None)
        .await?;
    refused(
        s.customer.files().wait_outgoing(id, WAIT).await?,
        CancelReason::TooLarge,
    )?;
    // At the limit it goes through: the refusals were about the rules, not a broken path.
    let ok = random_bytes(100_000);
    let id = s.host.files().offer("fits.bin", ok.clone(), None).await?;
    ensure!(s.host.files().wait_outgoing(id, WAIT).await? == OutgoingState::Sent);
    s.customer.files().wait_received(1, WAIT).await?;
    let offers = s.customer.files().offers();
    ensure!(
        offers.len() == 1 && offers[0].name == "fits.bin",
        "the customer was offered {offers:?}"
    );
    ensure!(s.customer.files().received()[0].data == ok);
    for agent in [&s.host, &s.masked, &s.viewer] {
        ensure!(
            agent.files().offers().is_empty(),
            "an agent was offered a refused file"
        );
    }
    for (outcome, n) in [
        ("refused_forbidden", 1.0),
        ("refused_too_large", 2.0),
        ("completed", 1.0),
    ] {
        let got = s
            .relay
            .metric(&format!(
                "relay_file_transfers_total{{outcome=\"{outcome}\"}}"
            ))
            .await?;
        ensure!(got == Some(n), "{outcome}: {got:?}, expected {n}");
    }
    Ok(())
}

// ----- agent screen share --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_masked_agent_shows_its_screen_to_the_customer_anonymously_and_one_at_a_time()
-> Result<()> {
    use relay_bench::client::ClientError;
    use relay_e2e::wire::ServerMsg;
    let s = host_masked_viewer_and_customer(RelayBuilder::new(), false).await?;
    let screen = || FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"));
    let refused_with = |r: std::result::Result<(), ClientError>, want: ErrorCode| match r {
        Err(ClientError::Refused { code, .. }) if code == want => Ok(()),
        other => bail!("expected a refusal with {want:?}, got {other:?}"),
    };

    // A view-only agent may not share.
    refused_with(s.viewer.start_share(screen()?).await, ErrorCode::Forbidden)?;
    // The masked agent (control) shares; while it does, nobody else may (the host
    // neither: one at a time, no take-over).
    s.masked.start_share(screen()?).await?;
    refused_with(s.host.start_share(screen()?).await, ErrorCode::ShareBusy)?;

    // The customer receives the masked agent's frames whole and in order.
    s.customer
        .wait_share_frames(22, WAIT)
        .await
        .context("the customer receives the share")?;
    assert_complete_and_in_order(
        "the customer's view of the share",
        &s.masked.shared_frames(),
        &s.customer.share_frames(),
    )?;

    // Stopping ends the customer's stream.
    s.masked.stop_share().await?;
    let stopped = |m: &ServerMsg| matches!(m, ServerMsg::AgentShare { active: false, .. });
    relay_e2e::wait_until("the customer to learn the share stopped", WAIT, || {
        s.customer.transcript().messages().iter().any(stopped)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_stop = s.customer.share_frames().len();
    tokio::time::sleep(Duration::from_millis(700)).await;
    ensure!(
        s.customer.share_frames().len() == at_stop,
        "share frames kept arriving after the stop"
    );

    // The next share (the visible host's) reaches the customer on the same track, from
    // a keyframe, without a new negotiation.
    // (The masked agent's last frame is released by the customer's reassembly only when
    // the next packet arrives: frames are told apart by when their packets came.)
    let offers = s.customer.negotiation().offers_sent;
    let second = Instant::now();
    s.host.start_share(screen()?).await?;
    s.customer.wait_share_frames(at_stop + 21, WAIT).await?;
    let frames = s.customer.share_frames();
    let first = frames
        .iter()
        .position(|f| f.received_at > second)
        .context("a frame of the host's share")?;
    ensure!(first >= at_stop, "frames of the first share arrived late");
    assert_complete_and_in_order(
        "the customer's view of the host's share",
        &s.host.shared_frames(),
        &frames[first..],
    )?;
    ensure!(s.customer.negotiation().offers_sent == offers);
    s.host.stop_share().await?;
    relay_e2e::wait_until(
        "the customer to learn the second share stopped",
        WAIT,
        || {
            s.customer
                .transcript()
                .messages()
                .iter()
                .filter(|m| stopped(m))
                .count()
                == 2
        },
    )
    .await?;

    // The customer learnt that an agent shared, never which one; agents learnt who.
    let customer_shares: Vec<ServerMsg> = s
        .customer
        .transcript()
        .messages()
        .into_iter()
        .filter(|m| matches!(m, ServerMsg::AgentShare { .. }))
        .collect();
    ensure!(
        customer_shares
            == [
                ServerMsg::AgentShare {
                    active: true,
                    by: None
                },
                ServerMsg::AgentShare {
                    active: false,
                    by: None
                },
                ServerMsg::AgentShare {
                    active: true,
                    by: Some(s.host.welcome().you.participant_id.clone())
                },
                ServerMsg::AgentShare {
                    active: false,
                    by: Some(s.host.welcome().you.participant_id.clone())
                },
            ],
        "the customer was told {customer_shares:?}"
    );
    ensure!(
        s.host
            .transcript()
            .messages()
            .contains(&ServerMsg::AgentShare {
                active: true,
                by: Some(s.masked_id.clone()),
            }),
        "the host was not told who shares"
    );
    assert_customer_never_sees_the_masked_agent(&s)?;
    for (outcome, n) in [
        ("started", 2.0),
        ("refused_forbidden", 1.0),
        ("refused_busy", 1.0),
        ("stopped", 2.0),
    ] {
        let got = s
            .relay
            .metric(&format!(
                "relay_agent_shares_total{{outcome=\"{outcome}\"}}"
            ))
            .await?;
        ensure!(got == Some(n), "{outcome}: {got:?}, expected {n}");
    }
    Ok(())
}
