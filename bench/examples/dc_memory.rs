//! Does a `webrtc` data channel keep memory per message? Two bare peer connections in
//! this process, over loopback, one ordered reliable channel; one side sends small
//! messages (the size of an input event) at a steady rate, the other reads them, and
//! the process's resident memory is printed every `--every` messages. No relay, no
//! bench client: what grows here grows in the `webrtc`/`rtc` crates.
//!
//! ```sh
//! cargo run --release -p relay-bench --example dc_memory -- [messages] [every] [unordered]
//! ```
//!
//! `unordered` opens an unordered channel with no retransmissions instead, to tell the
//! reliable, ordered delivery apart from the rest of the path. `DC_MEMORY_DRAIN=1` also
//! reads the sending side's events: then memory stays flat. The crate keeps every event
//! of a channel that nobody reads (one per message sent), which is what grew the relay
//! until it read the customer's `input` channel (bench/RESULTS.md).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::BytesMut;
use tokio::sync::{Notify, mpsc};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceGatheringState, RTCSessionDescription, Registry,
    SettingEngineBuilder,
};

struct Handler {
    gathered: Arc<Notify>,
    channels: mpsc::UnboundedSender<Arc<dyn DataChannel>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let _ = self.channels.send(channel);
    }
}

async fn peer() -> Result<(
    Arc<dyn PeerConnection>,
    Arc<Notify>,
    mpsc::UnboundedReceiver<Arc<dyn DataChannel>>,
)> {
    let mut media = MediaEngine::default();
    media.register_default_codecs()?;
    let gathered = Arc::new(Notify::new());
    let (tx, rx) = mpsc::unbounded_channel();
    let settings = SettingEngineBuilder::new()
        .with_include_loopback_candidate(true)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media)
        .with_interceptor_registry(Registry::new())
        .with_setting_engine(settings)
        .with_handler(Arc::new(Handler {
            gathered: gathered.clone(),
            channels: tx,
        }))
        .with_udp_addrs(vec!["127.0.0.1:0"])
        .build()
        .await?;
    Ok((Arc::new(pc), gathered, rx))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let total: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(400_000);
    let every: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let unordered = args.next().is_some_and(|a| a == "unordered");

    let (offerer, offerer_gathered, _) = peer().await?;
    let (answerer, answerer_gathered, mut incoming) = peer().await?;
    let init = unordered.then(|| RTCDataChannelInit {
        ordered: false,
        max_retransmits: Some(0),
        ..Default::default()
    });
    let sender = offerer.create_data_channel("input", init).await?;

    let offer = offerer.create_offer(None).await?;
    offerer.set_local_description(offer).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), offerer_gathered.notified()).await;
    let offer = offerer.local_description().await.context("offer")?;
    answerer
        .set_remote_description(RTCSessionDescription::offer(offer.sdp)?)
        .await?;
    let answer = answerer.create_answer(None).await?;
    answerer.set_local_description(answer).await?;
    let _ = tokio::time::timeout(Duration::from_secs(5), answerer_gathered.notified()).await;
    let answer = answerer.local_description().await.context("answer")?;
    offerer
        .set_remote_description(RTCSessionDescription::answer(answer.sdp)?)
        .await?;

    let receiver = tokio::time::timeout(Duration::from_secs(10), incoming.recv())
        .await
        .context("no data channel arrived")?
        .context("handler gone")?;
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(event) = receiver.poll().await {
                if let DataChannelEvent::OnMessage(_) = event {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // Wait for the sender's channel to open.
    while !matches!(sender.poll().await, Some(DataChannelEvent::OnOpen) | None) {}
    // `drain`: read the sending side's events too (what an application that only sends
    // easily forgets; the crate keeps every event nobody reads).
    let drain = std::env::var_os("DC_MEMORY_DRAIN").is_some();
    let drainer = drain.then(|| {
        let sender = sender.clone();
        tokio::spawn(async move { while sender.poll().await.is_some() {} })
    });

    println!("messages  received  rss_kib");
    println!("{:>8}  {:>8}  {:>7}", 0, 0, rss_kib());
    let payload = [0u8; 12];
    let mut tick = tokio::time::interval(Duration::from_micros(200));
    for n in 1..=total {
        tick.tick().await;
        sender.send(BytesMut::from(&payload[..])).await?;
        if n % every == 0 {
            println!(
                "{:>8}  {:>8}  {:>7}",
                n,
                received.load(Ordering::Relaxed),
                rss_kib()
            );
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "{:>8}  {:>8}  {:>7}  (after 1 s idle)",
        total,
        received.load(Ordering::Relaxed),
        rss_kib()
    );
    reader.abort();
    if let Some(d) = drainer {
        d.abort();
    }
    Ok(())
}
