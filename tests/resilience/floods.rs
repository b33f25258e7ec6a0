//! Floods (issue 16): a participant sending messages as fast as it can is held to its
//! budget (`[rate_limits]`) and told `rate_limited`, while everyone else in the session
//! stays connected and served; and a candidate flood cannot delay or drop a permission
//! change on its way to the media plane.
//!
//! Both tests run the relay with its default budgets, the ones real clients get.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_bench::client::{
    Agent, AgentOptions, Customer, CustomerOptions, FrameSource, tls_trusting_pem_file,
};
use relay_codec::input::{InputEvent, InputKind};
use relay_e2e::wire::{
    Audience, ClientMsg, ErrorCode, IceCandidate, Permission, ServerMsg, Visibility,
};
use relay_e2e::{Relay, RelayBuilder};

const WAIT: Duration = Duration::from_secs(15);

/// A session on a relay with default budgets: the host and Bob (an invited agent with
/// `control`) receive the customer's screen; everyone's input channel is open.
struct Session {
    relay: Relay,
    host_jwt: String,
    session_id: String,
    host: Agent,
    bob: Agent,
    bob_id: String,
    customer: Customer,
}

impl Session {
    async fn start() -> Result<Session> {
        relay_e2e::install_crypto();
        let relay = RelayBuilder::new().start().await?;
        let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
        let set = relay
            .host_invitee_customer("Bob Agent", Visibility::Visible, Permission::Control)
            .await?;
        let host = Agent::connect(
            &set.session.host.ws_url,
            tls.clone(),
            AgentOptions::default(),
        )
        .await?;
        let bob = Agent::connect(&set.invitee.ws_url, tls.clone(), AgentOptions::default()).await?;
        let carol = set.customer;
        let source = FrameSource::open(relay_e2e::fixture("screen-vp8.ivf"))?;
        let customer = Customer::connect(&carol.ws_url, tls, source, CustomerOptions::default())
            .await
            .context("customer connects")?;
        customer.wait_connected(WAIT).await?;
        customer.wait_input_open(WAIT).await?;
        for (who, agent) in [("host", &host), ("bob", &bob)] {
            agent
                .wait_frames(10, WAIT)
                .await
                .with_context(|| format!("{who}'s first frames"))?;
            agent.wait_input_open(WAIT).await?;
            agent.chat().wait_open(WAIT).await?;
        }
        customer.chat().wait_open(WAIT).await?;
        Ok(Session {
            relay,
            host_jwt: set.host_jwt,
            session_id: set.session.session_id,
            host,
            bob,
            bob_id: set.invitee.participant_id,
            customer,
        })
    }

    async fn metric(&self, query: &str) -> Result<f64> {
        Ok(self.relay.metric(query).await?.unwrap_or(0.0))
    }
}

/// Chat messages an agent or the customer received, on its `chat` channel and its
/// WebSocket.
fn chats(channel: &relay_bench::client::ChatChannel, ws: &[ServerMsg]) -> usize {
    let on_ws = ws
        .iter()
        .filter(|m| matches!(m, ServerMsg::Chat { .. }))
        .count();
    channel.messages().len() + on_ws
}

fn chats_of(agent: &Agent) -> usize {
    chats(agent.chat(), &agent.transcript().messages())
}

/// The error codes a participant got on its WebSocket.
fn errors(messages: &[ServerMsg]) -> Vec<ErrorCode> {
    messages
        .iter()
        .filter_map(|m| match m {
            ServerMsg::Error { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

fn ended_or_replaced(messages: &[ServerMsg]) -> bool {
    messages.iter().any(|m| {
        matches!(
            m,
            ServerMsg::SessionEnded { .. }
                | ServerMsg::Error {
                    code: ErrorCode::Replaced,
                    ..
                }
        )
    })
}

/// Mouse moves at column `x`, rows `rows`: recognisable at the customer.
fn moves(x: u16, rows: std::ops::Range<u16>) -> Vec<InputEvent> {
    rows.map(|y| InputEvent {
        seq: u32::from(y),
        kind: InputKind::MouseMove { x, y },
    })
    .collect()
}

/// The rows of the mouse moves at column `x` the customer received.
fn rows_at(customer: &Customer, x: u16) -> Result<Vec<u16>> {
    let mut rows = Vec::new();
    for r in customer.input_events() {
        if let InputKind::MouseMove { x: got, y } = r.event?.kind {
            if got == x {
                rows.push(y);
            }
        }
    }
    Ok(rows)
}

/// 1,000 chat messages of 4 KB from the customer, as fast as it can send them (the
/// flood that used to get its host cut off as a slow consumer): the customer is told
/// `rate_limited` (a few times, not once per message), its agents get exactly the
/// chat within its budget and nothing of the rest, nobody is disconnected, and both
/// agents keep getting frames while the host's input still reaches the customer.
#[tokio::test]
async fn a_customers_chat_flood_is_refused_past_its_budget_and_its_agents_stay_served() -> Result<()>
{
    let s = Session::start().await?;
    let big = "x".repeat(3900);
    let frames = [s.host.frames_received(), s.bob.frames_received()];
    for _ in 0..1000 {
        s.customer
            .send(&ClientMsg::Chat {
                text: big.clone(),
                audience: Audience::All,
            })
            .await?;
    }
    // Every message is decided: echoed to the customer (it passed) or refused.
    let deadline = std::time::Instant::now() + WAIT;
    let limited = loop {
        let limited = s
            .metric("relay_messages_rate_limited_total{class=\"chat\"}")
            .await?;
        let echoed = chats(s.customer.chat(), &s.customer.transcript().messages());
        if limited as usize + echoed >= 1000 {
            break limited;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "after {WAIT:?}, {limited} refused and {echoed} echoed of 1000"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(limited >= 900.0, "only {limited} chat messages refused");
    let passed = 1000 - limited as usize;
    ensure!(passed >= 20, "the first 20 (the burst) pass; {passed} did");
    // Each agent gets exactly the messages that passed.
    for (who, agent) in [("host", &s.host), ("bob", &s.bob)] {
        relay_e2e::wait_until(&format!("{who} gets the chat that passed"), WAIT, || {
            chats_of(agent) >= passed
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (who, agent) in [("host", &s.host), ("bob", &s.bob)] {
        ensure!(
            chats_of(agent) == passed,
            "{who} got {} chat messages, {passed} passed",
            chats_of(agent)
        );
    }
    // The customer was told, but not 980 times.
    let told = errors(&s.customer.transcript().messages())
        .into_iter()
        .filter(|c| *c == ErrorCode::RateLimited)
        .count();
    ensure!(
        (1..=10).contains(&told),
        "{told} rate_limited answers for {limited} refusals"
    );
    ensure!(
        s.metric("relay_messages_rejected_total{code=\"slow_consumer\"}")
            .await?
            == 0.0,
        "somebody was cut off as a slow consumer"
    );
    // Everyone is still connected and served.
    for (who, agent, before) in [("host", &s.host, frames[0]), ("bob", &s.bob, frames[1])] {
        ensure!(
            !ended_or_replaced(&agent.transcript().messages()),
            "{who} was disconnected"
        );
        agent
            .wait_frames(before + 30, WAIT)
            .await
            .with_context(|| format!("{who} keeps receiving frames"))?;
    }
    relay_e2e::input_arrives(&s.host, &s.customer, &relay_e2e::mouse_moves(0..5, 1)).await?;
    // A second later the customer chats again, and its agents get it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.customer
        .send(&ClientMsg::Chat {
            text: "sorry, my cat sat on the keyboard".into(),
            audience: Audience::All,
        })
        .await?;
    relay_e2e::wait_until("the host gets the next message", WAIT, || {
        chats_of(&s.host) == passed + 1
    })
    .await?;
    Ok(())
}

/// Bob (an agent with control) floods candidates, 20,000 as fast as he can, while
/// sending input; the host downgrades him to view-only in the middle of it. No input he
/// sends after the downgrade was answered reaches the customer (it is counted as
/// refused), the flood is cut and counted, and the host's screen and input are not
/// disturbed.
#[tokio::test]
async fn a_candidate_flood_does_not_hold_up_a_downgrade() -> Result<()> {
    let s = Session::start().await?;
    const BOB_X: u16 = 77;
    relay_e2e::input_arrives(&s.bob, &s.customer, &moves(BOB_X, 0..5)).await?;
    let host_frames = s.host.frames_received();

    let sent = AtomicUsize::new(0);
    let downgraded = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let flood = async {
        for n in 0..20_000u32 {
            s.bob
                .send(&ClientMsg::Candidate(IceCandidate {
                    candidate: format!(
                        "candidate:{n} 1 udp 2130706431 192.0.2.1 {} typ host",
                        1024 + n
                    ),
                    sdp_mid: Some("0".into()),
                    sdp_mline_index: Some(0),
                }))
                .await?;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        anyhow::Ok(())
    };
    // Bob's input, about one event a millisecond, rows from 100 on. Returns the next
    // row and the first row sent after the downgrade was answered.
    let input = async {
        let mut row = 100u16;
        let mut first_after = None;
        while !stop.load(Ordering::Relaxed) && row < 60_000 {
            if first_after.is_none() && downgraded.load(Ordering::Relaxed) {
                first_after = Some(row);
            }
            s.bob
                .send_input(&InputEvent {
                    seq: u32::from(row),
                    kind: InputKind::MouseMove { x: BOB_X, y: row },
                })
                .await?;
            row += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::Ok((row, first_after))
    };
    let downgrade = async {
        relay_e2e::wait_until("the flood is under way", WAIT, || {
            sent.load(Ordering::Relaxed) >= 2_000
        })
        .await?;
        let r = s
            .relay
            .update_participant(
                &s.host_jwt,
                &s.session_id,
                &s.bob_id,
                Some(Permission::View),
                None,
            )
            .await;
        downgraded.store(true, Ordering::Relaxed);
        r?;
        // Bob's input runs on for a while after it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok(())
    };
    let (flooded, rows, downgraded_ok) = tokio::join!(flood, input, downgrade);
    flooded?;
    downgraded_ok?;
    let (end, first_after) = rows?;
    let first_after = first_after.context("no input was sent after the downgrade")?;
    ensure!(
        end > first_after + 100,
        "only {} events sent after the downgrade",
        end - first_after
    );

    // Whatever was on its way has arrived (or not) by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delivered = rows_at(&s.customer, BOB_X)?;
    let late: Vec<u16> = delivered
        .iter()
        .copied()
        .filter(|r| *r >= first_after)
        .collect();
    ensure!(
        late.is_empty(),
        "{} of Bob's events sent after the downgrade reached the customer (first {:?})",
        late.len(),
        late.first()
    );
    ensure!(
        delivered.iter().any(|r| (100..first_after).contains(r)),
        "none of Bob's input during the flood arrived before the downgrade either"
    );
    // The view-only events are counted as refused, and the flood as rate limited.
    let refused = s
        .metric("relay_input_events_total{outcome=\"refused_view_only\"}")
        .await?;
    ensure!(
        refused >= f64::from(end - first_after),
        "{refused} events refused as view-only, {} sent after the downgrade",
        end - first_after
    );
    let cut = s
        .metric("relay_messages_rate_limited_total{class=\"candidate\"}")
        .await?;
    ensure!(cut >= 15_000.0, "only {cut} of 20,000 candidates refused");
    ensure!(
        errors(&s.bob.transcript().messages()).contains(&ErrorCode::RateLimited),
        "Bob was never told he is over his budget"
    );
    // The host noticed nothing.
    ensure!(!ended_or_replaced(&s.host.transcript().messages()));
    s.host
        .wait_frames(host_frames + 30, WAIT)
        .await
        .context("the host keeps receiving frames")?;
    relay_e2e::input_arrives(&s.host, &s.customer, &relay_e2e::mouse_moves(0..5, 1)).await?;
    Ok(())
}
