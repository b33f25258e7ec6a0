//! One UDP port for all media (`media.udp_mux_port`): a customer and three agents, every
//! peer connection on the relay's single mux port. Every agent gets the customer's frames
//! whole and in order, and every candidate the relay announces names that port.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use relay_bench::client::{Transcript, tls_trusting_pem_file};
use relay_e2e::RelayBuilder;
use relay_e2e::wire::{InviteTarget, Permission, ServerMsg, Visibility};

use super::{WAIT, assert_complete_and_in_order, connect_agents, join_and_publish};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_udp_port_carries_a_customer_and_three_agents_whole_and_in_order() -> Result<()> {
    relay_e2e::install_crypto();
    let builder = RelayBuilder::new().udp_mux_port();
    let port = builder.mux_port().context("the builder set a mux port")?;
    let relay = builder.start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;

    let host_jwt = relay.token("a0", "Alice Host", &["support"], false);
    let session = relay
        .create_session(&host_jwt, "support", Visibility::Visible)
        .await?;
    let mut urls = vec![("Alice Host".to_owned(), session.host.ws_url.clone())];
    for (id, name) in [("a1", "Agent One"), ("a2", "Agent Two")] {
        let jwt = relay.token(id, name, &["support"], false);
        let inv = relay
            .invite(
                &host_jwt,
                &session.session_id,
                InviteTarget::Agent(id.to_owned()),
                Visibility::Visible,
                Permission::View,
                None,
            )
            .await?;
        let creds = relay.accept(&jwt, &inv.invitation_id).await?;
        urls.push((name.to_owned(), creds.ws_url));
    }
    let agents = connect_agents(&urls, &tls).await?;
    let customer = join_and_publish(&relay, &session.support_key, tls, "screen-vp8.ivf").await?;

    for (name, agent) in &agents {
        agent
            .wait_frames(45, WAIT)
            .await
            .with_context(|| format!("{name} receives frames"))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    customer.set_publishing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = customer.sent_frames();
    for (name, agent) in &agents {
        assert_complete_and_in_order(name, &sent, &agent.frames())?;
    }

    // Every candidate the relay announced, in answers and trickled, is the mux port.
    let transcripts = agents
        .iter()
        .map(|(name, a)| (name.as_str(), a.transcript()))
        .chain([("Carol Customer", customer.transcript())]);
    for (name, transcript) in transcripts {
        let ports = announced_ports(&transcript);
        ensure!(!ports.is_empty(), "{name} got no candidate from the relay");
        ensure!(
            ports.iter().all(|p| *p == port),
            "{name} was told of ports {ports:?}, not only the mux port {port}"
        );
    }

    // The media went through the mux: four connections, datagrams both ways.
    let metric = |q: &'static str| {
        let relay = &relay;
        async move { anyhow::Ok(relay.metric(q).await?.unwrap_or(0.0)) }
    };
    let connections = metric("relay_udp_mux_peer_connections").await?;
    ensure!(
        connections == 4.0,
        "{connections} peer connections on the mux"
    );
    for direction in [
        "relay_udp_mux_datagrams_total{direction=\"in\"}",
        "relay_udp_mux_datagrams_total{direction=\"out\"}",
    ] {
        let n = metric(direction).await?;
        ensure!(n > 100.0, "{direction} = {n}");
    }
    Ok(())
}

/// The ports of every candidate the relay sent: in `answer` SDPs and trickled.
fn announced_ports(transcript: &Transcript) -> Vec<u16> {
    let mut candidates = Vec::new();
    for msg in transcript.messages() {
        match msg {
            ServerMsg::Answer { sdp } => candidates.extend(
                sdp.lines()
                    .filter_map(|l| l.strip_prefix("a=candidate:"))
                    .map(str::to_owned),
            ),
            ServerMsg::Candidate(c) if !c.candidate.is_empty() => {
                candidates.push(c.candidate.trim_start_matches("candidate:").to_owned())
            }
            _ => {}
        }
    }
    candidates
        .iter()
        // <foundation> <component> <transport> <priority> <address> <port> typ <type>
        .map(|c| {
            c.split(' ')
                .nth(5)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}
