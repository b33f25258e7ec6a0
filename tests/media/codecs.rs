//! VP9 and AV1 pass through the relay untouched, like VP8 and H.264 (the eight-agent
//! tests): a customer publishes a real encoded clip and two agents get every frame whole
//! and in order from their first keyframe on.

use anyhow::{Context, Result, ensure};
use relay_bench::client::{Agent, AgentOptions, FrameSource, VideoCodec, tls_trusting_pem_file};
use relay_e2e::RelayBuilder;
use relay_e2e::wire::{InviteTarget, Permission, Visibility};

use super::{WAIT, assert_complete_and_in_order, join_and_publish};

async fn passes_through(fixture_name: &str, codec: VideoCodec) -> Result<()> {
    relay_e2e::install_crypto();
    let relay = RelayBuilder::new().start().await?;
    let tls = tls_trusting_pem_file(relay.data_dir().join("tls/cert.pem"))?;
    let host_jwt = relay.token("a0", "Alice Host", &["support"], false);
    let bob_jwt = relay.token("a1", "Bob Agent", &["support"], false);
    let session = relay
        .create_session(&host_jwt, "support", Visibility::Visible)
        .await?;
    let invitation = relay
        .invite(
            &host_jwt,
            &session.session_id,
            InviteTarget::Agent("a1".into()),
            Visibility::Visible,
            Permission::View,
            None,
        )
        .await?;
    let bob = relay.accept(&bob_jwt, &invitation.invitation_id).await?;

    let source = FrameSource::open(relay_e2e::fixture(fixture_name))?;
    ensure!(
        source.codec() == codec,
        "{fixture_name} is {}",
        source.codec()
    );
    let customer =
        join_and_publish(&relay, &session.support_key, tls.clone(), fixture_name).await?;

    let mut agents = Vec::new();
    for (name, url) in [("host", &session.host.ws_url), ("bob", &bob.ws_url)] {
        let agent = Agent::connect(url, tls.clone(), AgentOptions::default())
            .await
            .with_context(|| format!("{name} connects"))?;
        agents.push((name, agent));
    }
    for (name, agent) in &agents {
        agent
            .wait_frames(24, WAIT)
            .await
            .with_context(|| format!("{name} receives {codec} frames"))?;
    }
    let sent = customer.sent_frames();
    for (name, agent) in &agents {
        let frames = agent.frames();
        ensure!(
            frames.iter().all(|f| f.codec == codec),
            "{name} got frames of another codec"
        );
        assert_complete_and_in_order(name, &sent, &frames)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vp9_passes_through_whole_and_in_order() -> Result<()> {
    passes_through("screen-vp9.ivf", VideoCodec::Vp9).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn av1_passes_through_whole_and_in_order() -> Result<()> {
    passes_through("screen-av1.ivf", VideoCodec::Av1).await
}
