use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use relay_bench::client::{
    Agent, AgentOptions, ClientError, Customer, CustomerOptions, FrameSource, MediaRoute,
    ReceivedFrame, SentFrame, Signalling, tls_trusting_pem_file,
};
use relay_bench::run::measure::SentIndex;
use relay_e2e::proxy::{Impairment, PathSwitch, UdpWire};
use relay_e2e::wire::{Permission, ServerMsg, Visibility};
use relay_e2e::{Relay, RelayBuilder};

const WAIT: Duration = Duration::from_secs(20);

/// A session on `relay`: its host (a control agent) and a second, view-only agent,
/// connected with the options given, and a customer publishing the VP8 fixture.
struct Session {
    customer: Customer,
    host: Agent,
    viewer: Agent,
}

async fn session(
    relay: &Relay,
    customer_options: CustomerOptions,
    host_options: AgentOptions,
    viewer_options: AgentOptions,
) -> Result<Session> {
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let creds = relay
        .host_invitee_customer("Victor Viewer", Visibility::Visible, Permission::View)
        .await?;
    let host = Agent::connect(&creds.session.host.ws_url, tls.clone(), host_options).await?;
    let viewer = Agent::connect(&creds.invitee.ws_url, tls.clone(), viewer_options).await?;
    let source = FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"))?;
    let customer = Customer::connect(&creds.customer.ws_url, tls, source, customer_options).await?;
    customer.wait_connected(WAIT).await?;
    customer.wait_input_open(WAIT).await?;
    host.wait_input_open(WAIT).await?;
    Ok(Session {
        customer,
        host,
        viewer,
    })
}

fn routed_agent(route: Arc<dyn MediaRoute>) -> AgentOptions {
    AgentOptions {
        route: Some(route),
        ..AgentOptions::default()
    }
}

/// How the frames an agent received from `from` on would decode: a frame decodes when
/// it is a keyframe or the frame sent just before it decoded. Counted over the frames
/// the customer sent from the agent's first keyframe after `from` to the last frame
/// the agent received. Every received frame must be one the customer sent.
#[derive(Debug)]
struct Decoding {
    /// Frames sent in the window.
    sent: u64,
    /// Frames received whole in the window.
    received: u64,
    /// Frames that decode.
    decodable: u64,
}

fn decoding(
    name: &str,
    from: Instant,
    sent: &[SentFrame],
    frames: &[ReceivedFrame],
) -> Result<Decoding> {
    let index = SentIndex::new(sent);
    let mut received = Vec::new();
    for (i, f) in frames
        .iter()
        .enumerate()
        .filter(|(_, f)| f.received_at >= from)
    {
        let Some(s) = index.find(f) else {
            bail!("{name}: received frame #{i} matches nothing the customer sent");
        };
        received.push((s.index, f.is_keyframe));
    }
    received.sort_unstable();
    received.dedup();
    let Some(first_key) = received.iter().position(|&(_, key)| key) else {
        bail!("{name} received no keyframe after the fault");
    };
    let received = &received[first_key..];
    let (first, last) = (received[0].0, received[received.len() - 1].0);
    let mut decodable = 0;
    let mut previous_decoded: Option<u64> = None;
    for &(index, key) in received {
        if key || previous_decoded == Some(index - 1) {
            decodable += 1;
            previous_decoded = Some(index);
        }
    }
    Ok(Decoding {
        sent: last - first + 1,
        received: received.len() as u64,
        decodable,
    })
}

/// 5% loss and up to 100 ms of jitter (datagrams overtaking each other) on one agent's
/// path, both ways: NACK and retransmission keep its stream decodable, and the agent
/// on a clean path gets every frame.
#[tokio::test]
async fn an_agent_on_a_lossy_jittery_path_still_decodes_and_the_others_are_untouched() -> Result<()>
{
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let wire = UdpWire::start(Impairment {
        loss: 0.05,
        delay: Duration::ZERO,
        jitter: Duration::from_millis(100),
    })
    .await?;
    let s = session(
        &relay,
        CustomerOptions::default(),
        AgentOptions::default(),
        routed_agent(wire.clone()),
    )
    .await?;
    let start = Instant::now();
    s.viewer
        .wait_frames(150, Duration::from_secs(40))
        .await
        .context("the agent on the bad path keeps receiving")?;
    let sent = s.customer.sent_frames();

    let clean = decoding("the clean agent", start, &sent, &s.host.frames())?;
    ensure!(
        clean.received == clean.sent && clean.decodable == clean.sent,
        "the agent on the clean path lost frames: {clean:?}"
    );
    let lossy = decoding(
        "the agent on the bad path",
        start,
        &sent,
        &s.viewer.frames(),
    )?;
    let stats = wire.stats();
    ensure!(
        stats.lost >= 20,
        "the wire lost only {} datagrams: the test did not impair anything ({stats:?})",
        stats.lost
    );
    eprintln!("clean: {clean:?}; lossy: {lossy:?}; wire: {stats:?}");
    // Without retransmission, 5% packet loss breaks the VP8 chain every few frames
    // until the next keyframe (every 30 frames): well under half would decode.
    ensure!(
        lossy.decodable * 100 >= lossy.sent * 90,
        "the agent on the bad path decodes only {} of {} frames ({lossy:?}, {stats:?})",
        lossy.decodable,
        lossy.sent
    );
    Ok(())
}

/// An agent's network changes (its old path is cut; a new one is there): its client
/// restarts ICE on the same peer connection, over the same session socket; the relay
/// answers on its side of the same connection, and video and input flow again on the
/// new path, in the same session, with no new peer connection.
#[tokio::test]
async fn an_agent_whose_network_changes_restarts_ice_and_carries_on() -> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let wifi = UdpWire::start(Impairment::NONE).await?;
    let path = PathSwitch::new(wifi.clone());
    let s = session(
        &relay,
        CustomerOptions::default(),
        routed_agent(path.clone()),
        AgentOptions::default(),
    )
    .await?;
    s.host.wait_frames(15, WAIT).await?;
    relay_e2e::input_arrives(&s.host, &s.customer, &relay_e2e::mouse_moves(0..5, 100))
        .await
        .context("input flows before the network change")?;

    let cellular = UdpWire::start(Impairment::NONE).await?;
    path.switch_to(cellular.clone());
    wifi.cut();
    let changed_at = Instant::now();
    // The client notices by itself (the connection drops to `disconnected`).
    let before = s.host.frames_received();
    s.host
        .wait_frames(before + 45, Duration::from_secs(40))
        .await
        .context("video flows again after the network change")?;
    ensure!(
        s.host.negotiation().ice_restarts >= 1,
        "the agent got frames again without restarting ICE: {:?}",
        s.host.negotiation()
    );
    ensure!(
        cellular.stats().to_client > 0 && cellular.stats().to_relay > 0,
        "the new path carried nothing: {:?}",
        cellular.stats()
    );
    let after = decoding(
        "the agent",
        changed_at,
        &s.customer.sent_frames(),
        &s.host.frames(),
    )?;
    ensure!(after.decodable >= 30, "after the change: {after:?}");
    relay_e2e::input_arrives(&s.host, &s.customer, &relay_e2e::mouse_moves(5..10, 200))
        .await
        .context("input flows again after the network change")?;

    ensure!(
        relay
            .metric("relay_negotiations_total{outcome=\"ice_restart\"}")
            .await?
            .unwrap_or(0.0)
            >= 1.0,
        "the relay did not count the ICE restart"
    );
    ensure!(
        relay
            .metric("relay_negotiations_total{outcome=\"replaced\"}")
            .await?
            .unwrap_or(0.0)
            == 0.0,
        "the relay replaced a peer connection instead of restarting ICE on it"
    );
    // The agent on the clean path never noticed.
    let viewer = decoding(
        "the other agent",
        changed_at,
        &s.customer.sent_frames(),
        &s.viewer.frames(),
    )?;
    ensure!(
        viewer.decodable == viewer.sent,
        "the other agent lost frames: {viewer:?}"
    );
    Ok(())
}

/// The customer's network changes: it restarts ICE on the same peer connection and
/// publishes on over the new path; the relay asks for a keyframe, so the agents decode
/// again at once instead of at the encoder's next keyframe.
#[tokio::test]
async fn a_customer_whose_network_changes_restarts_ice_and_the_agents_resume() -> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let wifi = UdpWire::start(Impairment::NONE).await?;
    let path = PathSwitch::new(wifi.clone());
    let s = session(
        &relay,
        CustomerOptions {
            route: Some(path.clone()),
            ..CustomerOptions::default()
        },
        AgentOptions::default(),
        AgentOptions::default(),
    )
    .await?;
    s.host.wait_frames(15, WAIT).await?;
    let requests_before = s.customer.keyframe_request_count();

    let cellular = UdpWire::start(Impairment::NONE).await?;
    path.switch_to(cellular.clone());
    wifi.cut();
    let changed_at = Instant::now();
    relay_e2e::wait_until(
        "the customer to restart ICE",
        Duration::from_secs(40),
        || s.customer.negotiation().ice_restarts >= 1,
    )
    .await?;
    for (name, agent) in [("host", &s.host), ("viewer", &s.viewer)] {
        let before = agent.frames_received();
        agent
            .wait_frames(before + 30, Duration::from_secs(40))
            .await
            .with_context(|| format!("the {name} gets video again"))?;
        let after = decoding(name, changed_at, &s.customer.sent_frames(), &agent.frames())?;
        ensure!(after.decodable >= 20, "{name} after the change: {after:?}");
    }
    ensure!(
        s.customer.keyframe_request_count() > requests_before,
        "nobody asked the customer for a keyframe after its ICE restart"
    );
    relay_e2e::input_arrives(&s.host, &s.customer, &relay_e2e::mouse_moves(0..5, 300))
        .await
        .context("input reaches the customer on its new path")?;
    ensure!(cellular.stats().to_relay > 0, "{:?}", cellular.stats());
    Ok(())
}

/// Reads a client's session socket until it fails (whatever arrived before is skipped)
/// and returns how it failed.
async fn socket_end<Fut>(mut next: impl FnMut() -> Fut) -> ClientError
where
    Fut: std::future::Future<Output = Result<ServerMsg, ClientError>>,
{
    loop {
        if let Err(e) = next().await {
            return e;
        }
    }
}

/// The relay is killed (SIGKILL): its clients are told their session socket is gone,
/// and resuming against the dead node fails with a clear error rather than hanging.
/// Restarted by its service manager on the same port and data directory, it serves new
/// sessions at once; the old session's resume token is refused with a clear error.
#[tokio::test]
async fn a_killed_relay_is_reported_and_a_restarted_one_serves_at_once() -> Result<()> {
    relay_e2e::install_crypto();
    let mut relay = RelayBuilder::new().start().await?;
    let s = session(
        &relay,
        CustomerOptions::default(),
        AgentOptions::default(),
        AgentOptions::default(),
    )
    .await?;
    s.host.wait_frames(15, WAIT).await?;
    let resume = s
        .customer
        .resume_url()
        .context("the customer has a resume token")?
        .to_owned();
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;

    relay.sigkill()?;
    relay.wait_exit(WAIT).await?;
    let ends = [
        (
            "customer",
            socket_end(|| s.customer.next_message(WAIT)).await,
        ),
        ("host", socket_end(|| s.host.next_message(WAIT)).await),
    ];
    for (name, error) in ends {
        match error {
            ClientError::SignallingClosed
            | ClientError::WebSocket(_)
            | ClientError::ClosedByRelay { .. } => {}
            other => bail!("the {name} was not told the relay is gone: {other:?}"),
        }
    }
    let started = Instant::now();
    match Signalling::connect(&resume, tls.clone()).await {
        Err(ClientError::WebSocket(e)) => ensure!(
            e.to_lowercase().contains("refused") || e.to_lowercase().contains("connect"),
            "resuming against a dead relay: {e}"
        ),
        Err(other) => bail!("resuming against a dead relay: unexpected {other}"),
        Ok(_) => bail!("a WebSocket opened to a killed relay"),
    }
    ensure!(
        started.elapsed() < WAIT,
        "resuming against a dead relay hung"
    );
    drop(s);

    relay
        .restart()
        .await
        .context("the relay restarts on its port")?;
    let mut refused = Signalling::connect(&resume, tls.clone()).await?;
    match refused.welcome(WAIT).await {
        Err(ClientError::Refused { code, message }) => {
            ensure!(!message.is_empty(), "refused with {code:?} and no message")
        }
        other => bail!("the old session's resume token after a restart: {other:?}"),
    }
    let again = session(
        &relay,
        CustomerOptions::default(),
        AgentOptions::default(),
        AgentOptions::default(),
    )
    .await
    .context("a new session on the restarted relay")?;
    again.host.wait_frames(15, WAIT).await?;
    again.viewer.wait_frames(15, WAIT).await?;
    Ok(())
}
