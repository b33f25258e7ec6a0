//! The `webrtc` peers that talk to Janus: a publisher (the bench customer's track,
//! packetizer and publishing loop, `client/publish.rs`) and a subscriber (the agents'
//! receive path, `client/receive.rs`). Janus's HTTP API carries their SDP whole
//! (`"trickle": false`): each peer gathers its one host candidate (on the address Janus
//! does ICE on) before its SDP is read, and Janus puts its own candidates in its SDP.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSessionDescription,
};

use crate::client::{
    ClientCodec, ClientError, FrameSource, PublishRecords, Publisher, ReceiveStats, ReceivedFrame,
    Receiver, SentFrame, build_peer_connection_with, lock, publish, video_track, wait_connected,
    watch_keyframe_requests, with_keyframe_request_marker,
};

/// Longest wait for a peer's ICE candidates.
const GATHER_TIMEOUT: Duration = Duration::from_secs(10);

/// The events of a Janus peer: its state, the end of its gathering and, for a
/// subscriber, its remote track.
struct Handler {
    state: watch::Sender<RTCPeerConnectionState>,
    gathered: watch::Sender<bool>,
    receiver: Option<Receiver>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(%state, "janus peer connection");
        self.state.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(receiver) = &self.receiver {
            receiver.on_track(track);
        }
    }
}

/// A peer connection on one local port with its state and gathering watches.
struct JanusPeer {
    pc: Arc<dyn PeerConnection>,
    state: watch::Receiver<RTCPeerConnectionState>,
    gathered: watch::Receiver<bool>,
}

impl JanusPeer {
    async fn new(
        bind: Ipv4Addr,
        media_engine: MediaEngine,
        registry: Registry,
        receiver: Option<Receiver>,
    ) -> Result<Self, ClientError> {
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let (gathered_tx, gathered) = watch::channel(false);
        let handler = Arc::new(Handler {
            state: state_tx,
            gathered: gathered_tx,
            receiver,
        });
        let bind = SocketAddr::from((bind, 0));
        let pc = build_peer_connection_with(bind, media_engine, registry, handler).await?;
        Ok(JanusPeer {
            pc,
            state,
            gathered,
        })
    }

    /// Applies `desc` locally, waits for the candidates and returns the JSEP to send
    /// Janus (the local SDP with its candidates).
    async fn set_local(
        &self,
        desc: RTCSessionDescription,
    ) -> Result<serde_json::Value, ClientError> {
        let kind = desc.sdp_type.to_string();
        self.pc.set_local_description(desc).await?;
        let mut gathered = self.gathered.clone();
        match tokio::time::timeout(GATHER_TIMEOUT, gathered.wait_for(|g| *g)).await {
            Ok(Ok(_)) => {}
            _ => return Err(ClientError::Timeout("ICE gathering")),
        }
        let local = self
            .pc
            .local_description()
            .await
            .ok_or_else(|| ClientError::Protocol("no local description".into()))?;
        Ok(serde_json::json!({"type": kind, "sdp": local.sdp, "trickle": false}))
    }
}

/// A publisher: the frames of a [`FrameSource`] at a fixed rate, as the bench customer
/// publishes them (keyframe requests from Janus answered with the next keyframe).
pub struct JanusPublisher {
    peer: JanusPeer,
    records: Arc<Mutex<PublishRecords>>,
    publishing: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for JanusPublisher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl JanusPublisher {
    /// Builds the peer on `bind` (one video track in the source's codec) and returns it
    /// with its offer; publishing starts once the connection is up.
    pub async fn offer(
        bind: Ipv4Addr,
        source: FrameSource,
        fps: f64,
    ) -> Result<(Self, serde_json::Value), ClientError> {
        let codec = source.codec();
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(codec.rtp_codec_parameters(), RtpCodecKind::Video)?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let registry = with_keyframe_request_marker(registry);
        let peer = JanusPeer::new(bind, media_engine, registry, None).await?;

        let ssrc = rand::random::<u32>();
        let track = video_track("screen", codec, ssrc)?;
        let sender = peer
            .pc
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
            .await?;
        let records = Arc::new(Mutex::new(PublishRecords::default()));
        let keyframe_wanted = Arc::new(AtomicBool::new(false));
        let publishing = Arc::new(AtomicBool::new(true));
        let tasks = vec![
            tokio::spawn(watch_keyframe_requests(
                Arc::clone(&track),
                Arc::clone(&records),
                Arc::clone(&keyframe_wanted),
            )),
            tokio::spawn(publish(Publisher {
                track,
                sender,
                ssrc,
                source,
                fps,
                state: peer.state.clone(),
                records: Arc::clone(&records),
                keyframe_wanted,
                publishing: Arc::clone(&publishing),
                padding: Arc::default(),
            })),
        ];
        let offer = peer.pc.create_offer(None).await?;
        let jsep = peer.set_local(offer).await?;
        let publisher = JanusPublisher {
            peer,
            records,
            publishing,
            tasks,
        };
        Ok((publisher, jsep))
    }

    /// Applies Janus's answer.
    pub async fn apply_answer(&self, sdp: String) -> Result<(), ClientError> {
        let answer = RTCSessionDescription::answer(sdp)?;
        self.peer.pc.set_remote_description(answer).await?;
        Ok(())
    }

    /// Waits until the connection is up.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), ClientError> {
        wait_connected(self.peer.state.clone(), timeout).await
    }

    /// Every frame handed to the track so far.
    pub fn sent_frames(&self) -> Vec<SentFrame> {
        lock(&self.records).sent.clone()
    }

    /// Why publishing stopped, if it did.
    pub fn publish_error(&self) -> Option<String> {
        lock(&self.records).publish_error.clone()
    }

    /// Stops publishing and closes the connection.
    pub async fn close(self) {
        self.publishing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = self.peer.pc.close().await;
    }
}

/// A subscriber: answers Janus's offer and reads the video track into whole frames, as
/// an agent does.
pub struct JanusSubscriber {
    peer: JanusPeer,
    receive: Receiver,
}

impl Drop for JanusSubscriber {
    fn drop(&mut self) {
        self.receive.abort();
    }
}

impl JanusSubscriber {
    /// Builds the peer on `bind`, applies Janus's `offer` and returns it with its answer.
    pub async fn answer(
        bind: Ipv4Addr,
        offer: String,
    ) -> Result<(Self, serde_json::Value), ClientError> {
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let receive = Receiver::new();
        let peer = JanusPeer::new(bind, media_engine, registry, Some(receive.clone())).await?;
        // Frames are assembled by the payload types Janus offers.
        receive.set_payload_types(&offer);
        peer.pc
            .set_remote_description(RTCSessionDescription::offer(offer)?)
            .await?;
        let answer = peer.pc.create_answer(None).await?;
        let jsep = peer.set_local(answer).await?;
        Ok((JanusSubscriber { peer, receive }, jsep))
    }

    /// Waits until the connection is up.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), ClientError> {
        wait_connected(self.peer.state.clone(), timeout).await
    }

    /// Every complete frame received so far, in order.
    pub fn frames(&self) -> Vec<ReceivedFrame> {
        self.receive.frames()
    }

    /// How many complete frames were received.
    pub fn frames_received(&self) -> usize {
        self.receive.frames_received()
    }

    /// Counters of the receive path.
    pub fn receive_stats(&self) -> ReceiveStats {
        self.receive.stats()
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.peer.pc.close().await;
    }
}
