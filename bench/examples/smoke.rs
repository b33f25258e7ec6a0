//! End-to-end smoke run of the client library against a real relay: one customer
//! publishing a fixture, two agents (the host and an invited agent with control).
//!
//! ```sh
//! cargo build -p relay && RELAY_BIN=$PWD/target/debug/relay \
//!     cargo run -p relay-bench --example smoke -- [tests/fixtures/screen-vp8.ivf]
//! ```
//!
//! It prints what each side saw and exits non-zero when something a user would notice
//! went wrong: frames that do not match what the customer sent, input that did not
//! arrive in order, a paused agent that does not recover.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use relay_bench::client::{
    Agent, AgentOptions, Customer, CustomerOptions, FrameSource, ReceivedFrame, SentFrame,
    tls_trusting_pem_file,
};
use relay_codec::input::{InputEvent, InputKind};
use relay_e2e::RelayBuilder;
use relay_e2e::wire::{InviteTarget, Permission, Visibility};

const WAIT: Duration = Duration::from_secs(15);

#[tokio::main]
async fn main() -> Result<()> {
    let fixture = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/screen-vp8.ivf"),
        PathBuf::from,
    );
    let source = FrameSource::open(&fixture)?;
    println!(
        "source: {} ({} frames, codec {})",
        fixture.display(),
        source.frame_count().unwrap_or(0),
        source.codec()
    );

    let relay = RelayBuilder::new().start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let alice = relay.token("alice", "Alice", &["support"], false);
    let bob = relay.token("bob", "Bob", &["support"], false);

    let session = relay
        .create_session(&alice, "support", Visibility::Visible)
        .await?;
    let invite = relay
        .invite(
            &alice,
            &session.session_id,
            InviteTarget::Agent("bob".into()),
            Visibility::Visible,
            Permission::Control,
            None,
        )
        .await?;
    let bob_creds = relay.accept(&bob, &invite.invitation_id).await?;

    // Agents first: they negotiate before there is media, then get `renegotiate`.
    let host = Agent::connect(&session.host.ws_url, tls.clone(), AgentOptions::default()).await?;
    let agent = Agent::connect(&bob_creds.ws_url, tls.clone(), AgentOptions::default()).await?;
    let t = Instant::now();
    host.wait_connected(WAIT).await.context("host connects")?;
    agent.wait_connected(WAIT).await.context("bob connects")?;
    println!("agents connected in {:?}", t.elapsed());

    let carol = relay.join("Carol", &session.support_key).await?;
    let t = Instant::now();
    let customer = Customer::connect(
        &carol.ws_url,
        tls.clone(),
        source,
        CustomerOptions::default(),
    )
    .await?;
    customer
        .wait_connected(WAIT)
        .await
        .context("customer connects")?;
    customer
        .wait_input_open(WAIT)
        .await
        .context("customer input channel")?;
    println!("customer connected in {:?}", t.elapsed());

    let got = tokio::join!(host.wait_frames(30, WAIT), agent.wait_frames(30, WAIT));
    println!(
        "first frames: host {:?}, bob {:?} (customer sent {}, keyframe requests {})",
        got.0,
        got.1,
        customer.frames_sent(),
        customer.keyframe_request_count()
    );
    for (name, a) in [("host", &host), ("bob", &agent)] {
        println!("{name}: negotiation {:?}", a.negotiation());
        println!("{name}: receive {:?}", a.receive_stats());
    }
    println!("customer: negotiation {:?}", customer.negotiation());
    if let Some(e) = customer.publish_error() {
        println!("customer: publish error {e}");
    }
    got.0.context("host frames")?;
    got.1.context("bob frames")?;

    // Input: bob (control) sends a burst; the customer must get it in order.
    agent
        .wait_input_open(WAIT)
        .await
        .context("bob input channel")?;
    let events: Vec<InputEvent> = (0..50u32)
        .map(|seq| InputEvent {
            seq,
            kind: InputKind::MouseMove {
                x: (seq * 1000) as u16,
                y: (seq * 500) as u16,
            },
        })
        .collect();
    let t = Instant::now();
    for e in &events {
        agent.send_input(e).await?;
    }
    let deadline = Instant::now() + WAIT;
    while customer.input_events().len() < events.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received: Vec<InputEvent> = customer
        .input_events()
        .into_iter()
        .filter_map(|r| r.event.ok())
        .collect();
    // The relay restamps `seq` per customer channel (so agents cannot be told apart by
    // their counters): compare the kinds, and require consecutive sequence numbers.
    let kinds_in_order = received
        .iter()
        .map(|e| &e.kind)
        .eq(events.iter().map(|e| &e.kind));
    let seq_consecutive = received
        .windows(2)
        .all(|w| w[1].seq == w[0].seq.wrapping_add(1));
    let input_ok = kinds_in_order && seq_consecutive;
    println!(
        "input: sent {}, customer decoded {} in {:?}; kinds in order: {kinds_in_order}, seq consecutive: {seq_consecutive} (first seq {:?})",
        events.len(),
        received.len(),
        t.elapsed(),
        received.first().map(|e| e.seq),
    );

    // Pause bob until the host has read 400 more packets: more than the 256 the
    // connection's driver queues for an unread track, so some are dropped.
    let requests_before = customer.keyframe_request_count();
    let host_packets = host.receive_stats().rtp_packets;
    let paused_at = Instant::now();
    agent.pause();
    while host.receive_stats().rtp_packets < host_packets + 400 && paused_at.elapsed() < WAIT * 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.resume();
    let resumed_at = Instant::now();
    println!("bob paused for {:?}", resumed_at - paused_at);
    // Recovery: a keyframe the customer sent after the resume (so not one of the
    // packets queued while paused) reaches bob.
    let deadline = resumed_at + WAIT;
    let fresh_keyframe = |a: &Agent| {
        let sent = customer.sent_frames();
        a.frames().iter().find_map(|f| {
            let s = sent
                .iter()
                .rev()
                .find(|s| s.digest == f.digest && s.sent_at <= f.received_at)?;
            (f.is_keyframe && s.sent_at > resumed_at)
                .then(|| (f.received_at - resumed_at, s.requested))
        })
    };
    while fresh_keyframe(&agent).is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = fresh_keyframe(&agent);
    println!(
        "pause/resume: bob got a keyframe sent after the resume {:?} later (sent on request: {:?}); receive {:?}; customer keyframe requests {} -> {}",
        recovered.map(|r| r.0),
        recovered.map(|r| r.1),
        agent.receive_stats(),
        requests_before,
        customer.keyframe_request_count()
    );

    let sent = customer.sent_frames();
    let mut failed = false;
    for (name, a) in [("host", &host), ("bob", &agent)] {
        let frames = a.frames();
        let (before, after): (Vec<ReceivedFrame>, Vec<ReceivedFrame>) = frames
            .iter()
            .cloned()
            .partition(|f| f.received_at < paused_at);
        let report = match_frames(&sent, &before);
        println!("{name}, before the pause: {report}");
        failed |= report.unmatched > 0 || report.frames == 0;
        // Bob's frames right after the resume were queued while he was paused.
        let report = match_frames(&sent, &after);
        println!("{name}, from the pause on: {report}");
        failed |= report.unmatched > 0;
    }
    println!(
        "customer: {} frames sent ({} keyframes, {} on request), {} keyframe requests, {} data-channel messages",
        sent.len(),
        sent.iter().filter(|f| f.is_keyframe).count(),
        sent.iter().filter(|f| f.requested).count(),
        customer.keyframe_request_count(),
        customer.data_channel_messages().len()
    );
    println!(
        "data channel to agents: host {} messages, bob {} messages",
        host.data_channel_messages().len(),
        agent.data_channel_messages().len()
    );
    let leaked = customer.transcript().contains("\"agent_id\"");
    let mut relay_errors = 0;
    for (name, t) in [
        ("customer", customer.transcript()),
        ("host", host.transcript()),
        ("bob", agent.transcript()),
    ] {
        for text in t
            .texts()
            .iter()
            .filter(|t| t.contains("\"type\":\"error\""))
        {
            println!("{name} got an error message: {text}");
            relay_errors += 1;
        }
    }
    println!("customer transcript mentions an agent_id: {leaked}");

    customer.close().await?;
    host.close().await?;
    agent.close().await?;
    if failed || !input_ok || leaked || recovered.is_none() || relay_errors > 0 {
        bail!("smoke run found problems (see above)");
    }
    Ok(())
}

struct MatchReport {
    frames: usize,
    keyframes: usize,
    unmatched: usize,
    latency_ms: Vec<f64>,
}

impl std::fmt::Display for MatchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = self.latency_ms.clone();
        l.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            l.get(((l.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        write!(
            f,
            "{} frames ({} keyframes), {} not among the sent ones; latency ms p50 {:.1} p95 {:.1} max {:.1}",
            self.frames,
            self.keyframes,
            self.unmatched,
            pct(0.5),
            pct(0.95),
            pct(1.0)
        )
    }
}

/// Matches each received frame to the latest sent frame with the same digest sent
/// before it arrived (files loop, so digests repeat once per pass).
fn match_frames(sent: &[SentFrame], received: &[ReceivedFrame]) -> MatchReport {
    let mut by_digest: HashMap<[u8; 32], Vec<&SentFrame>> = HashMap::new();
    for s in sent {
        by_digest.entry(s.digest).or_default().push(s);
    }
    let mut report = MatchReport {
        frames: received.len(),
        keyframes: received.iter().filter(|f| f.is_keyframe).count(),
        unmatched: 0,
        latency_ms: Vec::new(),
    };
    for r in received {
        let sent_before = by_digest
            .get(&r.digest)
            .and_then(|v| v.iter().rev().find(|s| s.sent_at <= r.received_at));
        match sent_before {
            Some(s) => report
                .latency_ms
                .push((r.received_at - s.sent_at).as_secs_f64() * 1000.0),
            None => report.unmatched += 1,
        }
    }
    report
}
