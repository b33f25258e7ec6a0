use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use relay_bench::client::{
    Agent, AgentOptions, Customer, CustomerOptions, FrameSource, IceTransport,
    tls_trusting_pem_file,
};
use relay_e2e::wire::{Permission, Visibility};
use relay_e2e::{Relay, RelayBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// A session on a relay with `media.ice_tcp_port`: a customer behind a UDP block (ICE
/// over TCP only), the host agent behind one too, and a second agent on UDP.
struct TcpSession {
    relay: Relay,
    port: u16,
    customer: Customer,
    host: Agent,
    udp_agent: Agent,
}

async fn tcp_session() -> Result<TcpSession> {
    relay_e2e::install_crypto();
    let builder = RelayBuilder::new().ice_tcp_port();
    let port = builder
        .tcp_port()
        .context("the builder set an ICE-TCP port")?;
    let relay = builder.start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let creds = relay
        .host_invitee_customer("Udo Udp", Visibility::Visible, Permission::View)
        .await?;
    let (session, udp_creds) = (&creds.session, &creds.invitee);

    let tcp_only = AgentOptions {
        ice_transport: IceTransport::Tcp,
        ..AgentOptions::default()
    };
    let host = Agent::connect(&session.host.ws_url, tls.clone(), tcp_only).await?;
    let udp_agent = Agent::connect(&udp_creds.ws_url, tls.clone(), AgentOptions::default()).await?;
    let carol = &creds.customer;
    let source = FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"))?;
    let options = CustomerOptions {
        ice_transport: IceTransport::Tcp,
        ..CustomerOptions::default()
    };
    let customer = Customer::connect(&carol.ws_url, tls, source, options)
        .await
        .context("customer connects")?;
    customer
        .wait_connected(WAIT)
        .await
        .context("the customer's peer connection comes up over TCP")?;
    customer.wait_input_open(WAIT).await?;
    host.wait_connected(WAIT)
        .await
        .context("the host's peer connection comes up over TCP")?;
    host.wait_input_open(WAIT).await?;
    for (name, agent) in [("host", &host), ("the UDP agent", &udp_agent)] {
        agent
            .wait_frames(20, WAIT)
            .await
            .with_context(|| format!("{name} receives frames"))?;
    }
    Ok(TcpSession {
        relay,
        port,
        customer,
        host,
        udp_agent,
    })
}

async fn metric(relay: &Relay, query: &str) -> Result<f64> {
    Ok(relay.metric(query).await?.unwrap_or(0.0))
}

fn streams(outcome: &str) -> String {
    format!("relay_ice_tcp_streams_total{{outcome=\"{outcome}\"}}")
}

/// With UDP blocked at the customer and the host (their ICE may use TCP only), media
/// and input still flow, through the relay's one ICE-TCP port: the host gets every
/// frame from its first keyframe on, its input reaches the customer, and the relay's
/// metrics show exactly those two connections on TCP streams carrying at least the
/// media's bytes (so the test fails if the media took UDP). The UDP agent in the same
/// session is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn media_and_input_flow_over_ice_tcp_when_udp_is_blocked() -> Result<()> {
    let s = tcp_session().await?;

    let events = relay_e2e::mouse_moves(0..40, 4242);
    relay_e2e::input_arrives(&s.host, &s.customer, &events).await?;
    s.host
        .wait_frames(s.host.frames_received() + 30, WAIT)
        .await?;
    s.customer.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = s.customer.sent_frames();
    let host_frames = s.host.frames();
    relay_e2e::frames_whole_in_order("host (TCP)", None, &sent, &host_frames, 30)?;
    relay_e2e::frames_whole_in_order("UDP agent", None, &sent, &s.udp_agent.frames(), 30)?;

    // The two TCP-only clients hold one ICE-TCP stream each; the UDP agent none.
    ensure!(
        metric(&s.relay, "relay_ice_tcp_streams_open").await? == 2.0,
        "open ICE-TCP streams: {}",
        metric(&s.relay, "relay_ice_tcp_streams_open").await?
    );
    ensure!(metric(&s.relay, &streams("routed")).await? >= 2.0);
    // What reached the UDP agent came in over the customer's TCP stream, and what
    // the host got went out over its own.
    let came_in: usize = s.udp_agent.frames().iter().map(|f| f.size).sum();
    let went_out: usize = host_frames.iter().map(|f| f.size).sum();
    let tcp_in = metric(&s.relay, "relay_ice_tcp_bytes_total{direction=\"in\"}").await?;
    let tcp_out = metric(&s.relay, "relay_ice_tcp_bytes_total{direction=\"out\"}").await?;
    ensure!(
        tcp_in >= came_in as f64,
        "{tcp_in} bytes in over TCP, but the UDP agent received {came_in} bytes of frames"
    );
    ensure!(
        tcp_out >= went_out as f64,
        "{tcp_out} bytes out over TCP, but the host received {went_out} bytes of frames"
    );
    Ok(())
}

/// A STUN Binding request (RFC 8489) with `USERNAME` = `username`, as one RFC 4571
/// frame.
fn framed_check(username: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[9; 12]);
    m.extend_from_slice(&attrs);
    let mut framed = (m.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&m);
    framed
}

/// Reads until the relay closes the stream (EOF or reset); fails if it sends anything
/// or keeps it open.
async fn closed_by_the_relay(what: &str, stream: &mut TcpStream) -> Result<()> {
    let mut got = Vec::new();
    match tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await {
        Err(_) => bail!("the relay kept {what} open"),
        Ok(_) => ensure!(got.is_empty(), "the relay answered {what} with {got:?}"),
    }
    Ok(())
}

/// Garbage on the ICE-TCP port (HTTP, a frame too large to be a check, a stream that
/// never sends, a check for a ufrag nobody has) is closed without an answer and
/// counted by outcome, and the live TCP session goes on: the host keeps getting every
/// frame, and its input still reaches the customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_the_ice_tcp_port_is_dropped_counted_and_harmless() -> Result<()> {
    let s = tcp_session().await?;
    let outcomes = [
        "not_stun",
        "frame_too_large",
        "handshake_timeout",
        "unknown_ufrag",
    ];
    let mut counted = Vec::new();
    for o in outcomes {
        counted.push(metric(&s.relay, &streams(o)).await?);
    }

    let addr = ("127.0.0.1", s.port);
    let mut http = TcpStream::connect(addr).await?;
    http.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await?;
    let mut not_stun = TcpStream::connect(addr).await?;
    // A frame of the right size whose packet is DTLS, not a check.
    let mut dtls = vec![0x00, 0x40, 0x16, 0xfe, 0xfd];
    dtls.resize(2 + 0x40, 0);
    not_stun.write_all(&dtls).await?;
    let mut silent = TcpStream::connect(addr).await?;
    let mut stranger = TcpStream::connect(addr).await?;
    stranger
        .write_all(&framed_check("nosuchufrag0000:client"))
        .await?;
    let frames_before = s.host.frames_received();
    for (what, stream) in [
        ("an HTTP request", &mut http),
        ("a DTLS frame", &mut not_stun),
        ("a silent stream", &mut silent),
        ("a check for nobody", &mut stranger),
    ] {
        closed_by_the_relay(what, stream).await?;
    }
    let expected = [
        ("not_stun", 1.0),
        ("frame_too_large", 1.0),
        ("handshake_timeout", 1.0),
        ("unknown_ufrag", 1.0),
    ];
    for ((outcome, more), was) in expected.iter().zip(&counted) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let now = metric(&s.relay, &streams(outcome)).await?;
            if now >= was + more {
                ensure!(now == was + more, "{outcome}: {was} then {now}");
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{outcome} was not counted ({now})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ensure!(metric(&s.relay, "relay_ice_tcp_streams_pending").await? == 0.0);

    // The live session did not notice.
    s.host
        .wait_frames(frames_before + 30, WAIT)
        .await
        .context("the host keeps receiving over TCP")?;
    let events = relay_e2e::mouse_moves(0..20, 777);
    relay_e2e::input_arrives(&s.host, &s.customer, &events).await?;
    ensure!(metric(&s.relay, "relay_ice_tcp_streams_open").await? == 2.0);
    s.customer.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = s.customer.sent_frames();
    relay_e2e::frames_whole_in_order("host (TCP)", None, &sent, &s.host.frames(), 30)?;
    Ok(())
}
