//! What a customer and an agent share: building the one peer connection, the event
//! handler that trickles candidates over the signalling socket, the negotiation loop
//! (the client always offers, the relay always answers), and data-channel recording.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_codec::wire::{ClientMsg, IceCandidate, ServerMsg};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Registry;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{Notify, mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceGatheringState, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, SettingEngineBuilder,
};

use super::ClientError;
use super::signalling::SignallingSender;

/// Locks a mutex that only ever guards plain records: a panic elsewhere cannot leave
/// them inconsistent, so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Non-media messages kept for [`next_message`](super::Customer::next_message) before
/// older ones are dropped (they stay in the transcript either way).
pub(crate) const OTHER_MESSAGES_QUEUE: usize = 1024;

/// A message received on a data channel, as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataChannelMessage {
    /// The channel's label.
    pub label: String,
    /// Whether it was sent as text.
    pub is_string: bool,
    /// The bytes.
    pub data: Bytes,
    /// When the application got it.
    pub received_at: Instant,
}

/// Counters of the offer/answer exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NegotiationStats {
    /// Offers sent (the first one included).
    pub offers_sent: u32,
    /// Answers applied.
    pub answers_applied: u32,
    /// `renegotiate` messages received.
    pub renegotiate_requests: u32,
    /// Relay candidates added to the peer connection.
    pub remote_candidates: u32,
    /// Local candidates sent to the relay (end-of-candidates not counted).
    pub local_candidates: u32,
    /// What went wrong applying the relay's messages, in order.
    pub errors: Vec<String>,
}

/// What to do with a remote track.
pub(crate) type OnTrack = Box<dyn Fn(Arc<dyn TrackRemote>) + Send + Sync>;
/// What to do with a data channel the relay opened.
pub(crate) type OnDataChannel = Box<dyn Fn(Arc<dyn DataChannel>) + Send + Sync>;

/// State shared between the handler, the negotiation loop and the public API.
pub(crate) struct PeerShared {
    pub signal: SignallingSender,
    pub state_tx: watch::Sender<RTCPeerConnectionState>,
    /// `a=mid` of the first media section of the last local description: trickled
    /// candidates name it, because `RTCIceCandidate::to_json` leaves `sdp_mid` empty.
    pub first_mid: Mutex<Option<String>>,
    pub stats: Mutex<NegotiationStats>,
    pub on_track: Option<OnTrack>,
    pub on_data_channel: OnDataChannel,
    /// Set by the application to offer again (it added a track): the negotiation loop
    /// treats it like the relay's `renegotiate`.
    pub renegotiate: Notify,
    /// The customer's: on the relay's first `renegotiate` (an agent shares its screen),
    /// add a `recvonly` video transceiver before offering, once.
    pub recv_video_on_renegotiate: AtomicBool,
}

impl PeerShared {
    /// Shared state for a new peer connection.
    pub(crate) fn new(
        signal: SignallingSender,
        state_tx: watch::Sender<RTCPeerConnectionState>,
        on_track: Option<OnTrack>,
        on_data_channel: OnDataChannel,
    ) -> PeerShared {
        PeerShared {
            signal,
            state_tx,
            first_mid: Mutex::new(None),
            stats: Mutex::new(NegotiationStats::default()),
            on_track,
            on_data_channel,
            renegotiate: Notify::new(),
            recv_video_on_renegotiate: AtomicBool::new(false),
        }
    }

    pub(crate) fn error(&self, what: String) {
        tracing::warn!(error = %what, "client negotiation");
        lock(&self.stats).errors.push(what);
    }
}

/// The peer connection's event handler. Its callbacks run on the connection's driver,
/// so they never wait: candidates go out with `try_send`, tracks and channels are handed
/// to tasks.
struct Handler(Arc<PeerShared>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        let init = match event.candidate.to_json() {
            Ok(init) => init,
            Err(e) => return self.0.error(format!("local candidate: {e}")),
        };
        let candidate = IceCandidate {
            candidate: init.candidate,
            sdp_mid: lock(&self.0.first_mid).clone(),
            sdp_mline_index: Some(0),
        };
        match self.0.signal.try_send(&ClientMsg::Candidate(candidate)) {
            Ok(()) => lock(&self.0.stats).local_candidates += 1,
            Err(e) => self.0.error(format!("sending a candidate: {e}")),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let end = IceCandidate {
                candidate: String::new(),
                sdp_mid: lock(&self.0.first_mid).clone(),
                sdp_mline_index: Some(0),
            };
            if let Err(e) = self.0.signal.try_send(&ClientMsg::Candidate(end)) {
                self.0.error(format!("sending end-of-candidates: {e}"));
            }
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(%state, "client peer connection");
        self.0.state_tx.send_replace(state);
    }

    async fn on_data_channel(&self, data_channel: Arc<dyn DataChannel>) {
        (self.0.on_data_channel)(data_channel);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if let Some(on_track) = &self.0.on_track {
            on_track(track);
        }
    }
}

/// Builds a peer connection bound to one UDP socket on `bind` (host candidates only, no
/// STUN, no mDNS), wired to `shared`.
pub(crate) async fn build_peer_connection(
    bind: SocketAddr,
    media_engine: MediaEngine,
    registry: Registry,
    shared: Arc<PeerShared>,
) -> Result<Arc<dyn PeerConnection>, ClientError> {
    build_peer_connection_with(bind, media_engine, registry, Arc::new(Handler(shared))).await
}

/// [`build_peer_connection`] with another event handler, for peers not signalled over the
/// relay's session socket (the Janus peers of `compare`, signalled over its HTTP API).
pub(crate) async fn build_peer_connection_with(
    bind: SocketAddr,
    media_engine: MediaEngine,
    registry: Registry,
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> Result<Arc<dyn PeerConnection>, ClientError> {
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec![bind])
        .build()
        .await?;
    Ok(Arc::new(pc))
}

/// `a=mid` of the first media section of an SDP.
fn first_mid(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=mid:"))
        .map(str::to_owned)
}

/// Creates an offer, applies it locally and sends it.
pub(crate) async fn send_offer(
    pc: &dyn PeerConnection,
    shared: &PeerShared,
) -> Result<(), ClientError> {
    let asked = lock(&shared.stats).renegotiate_requests > 0;
    if asked
        && shared
            .recv_video_on_renegotiate
            .swap(false, Ordering::Relaxed)
    {
        // A `recvonly` section added now is new to the relay, which binds its share
        // track to it (see docs/protocol.md, "Agent screen share").
        pc.add_transceiver_from_kind(
            RtpCodecKind::Video,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            }),
        )
        .await?;
    }
    let offer = pc.create_offer(None).await?;
    *lock(&shared.first_mid) = first_mid(&offer.sdp);
    let sdp = offer.sdp.clone();
    pc.set_local_description(offer).await?;
    shared.signal.send(&ClientMsg::Offer { sdp }).await?;
    lock(&shared.stats).offers_sent += 1;
    Ok(())
}

/// Sends the first offer, then applies what the relay sends until the socket closes:
/// `answer` → remote description (then a queued renegotiation, if any); `candidate` →
/// added, or held until the first answer; `renegotiate` (or the application's
/// [`PeerShared::renegotiate`]) → a new offer on the same connection, or queued while
/// an offer is outstanding. Everything else goes to
/// `others` (dropped when nobody reads it; the transcript keeps it). `on_answer` sees
/// each applied answer's SDP.
pub(crate) async fn run_negotiation(
    pc: Arc<dyn PeerConnection>,
    shared: Arc<PeerShared>,
    mut incoming: mpsc::Receiver<ServerMsg>,
    others: mpsc::Sender<ServerMsg>,
    on_answer: impl Fn(&str) + Send,
) {
    let mut awaiting_answer = false;
    let mut renegotiate_queued = false;
    let mut have_remote = false;
    let mut held_candidates: Vec<RTCIceCandidateInit> = Vec::new();

    match send_offer(&*pc, &shared).await {
        Ok(()) => awaiting_answer = true,
        Err(e) => shared.error(format!("first offer: {e}")),
    }

    loop {
        let msg = tokio::select! {
            msg = incoming.recv() => match msg {
                Some(msg) => msg,
                None => break,
            },
            () = shared.renegotiate.notified() => {
                if awaiting_answer {
                    renegotiate_queued = true;
                } else {
                    match send_offer(&*pc, &shared).await {
                        Ok(()) => awaiting_answer = true,
                        Err(e) => shared.error(format!("renegotiation offer: {e}")),
                    }
                }
                continue;
            }
        };
        match msg {
            ServerMsg::Answer { sdp } => {
                let applied = match RTCSessionDescription::answer(sdp.clone()) {
                    Ok(desc) => pc.set_remote_description(desc).await,
                    Err(e) => Err(e),
                };
                awaiting_answer = false;
                match applied {
                    Ok(()) => {
                        have_remote = true;
                        lock(&shared.stats).answers_applied += 1;
                        on_answer(&sdp);
                        for c in held_candidates.drain(..) {
                            add_candidate(&*pc, &shared, c).await;
                        }
                    }
                    Err(e) => shared.error(format!("applying the answer: {e}")),
                }
                if renegotiate_queued {
                    renegotiate_queued = false;
                    match send_offer(&*pc, &shared).await {
                        Ok(()) => awaiting_answer = true,
                        Err(e) => shared.error(format!("renegotiation offer: {e}")),
                    }
                }
            }
            ServerMsg::Candidate(c) => {
                if c.candidate.is_empty() {
                    // End of the relay's candidates: nothing to do with host candidates.
                    continue;
                }
                let init = RTCIceCandidateInit {
                    candidate: c.candidate,
                    sdp_mid: c.sdp_mid,
                    sdp_mline_index: c.sdp_mline_index,
                    ..Default::default()
                };
                if have_remote {
                    add_candidate(&*pc, &shared, init).await;
                } else {
                    held_candidates.push(init);
                }
            }
            ServerMsg::Renegotiate {} => {
                lock(&shared.stats).renegotiate_requests += 1;
                if awaiting_answer {
                    renegotiate_queued = true;
                } else {
                    match send_offer(&*pc, &shared).await {
                        Ok(()) => awaiting_answer = true,
                        Err(e) => shared.error(format!("renegotiation offer: {e}")),
                    }
                }
            }
            other => {
                if others.try_send(other).is_err() {
                    tracing::debug!("client: non-media message dropped (nobody reads them)");
                }
            }
        }
    }
}

async fn add_candidate(pc: &dyn PeerConnection, shared: &PeerShared, init: RTCIceCandidateInit) {
    let text = init.candidate.clone();
    match pc.add_ice_candidate(init).await {
        Ok(()) => lock(&shared.stats).remote_candidates += 1,
        Err(e) => shared.error(format!("adding relay candidate {text:?}: {e}")),
    }
}

/// Waits until the peer connection is `connected`; fails early on `failed`/`closed`.
pub(crate) async fn wait_connected(
    mut state: watch::Receiver<RTCPeerConnectionState>,
    timeout: Duration,
) -> Result<(), ClientError> {
    let wait = state.wait_for(|s| {
        matches!(
            s,
            RTCPeerConnectionState::Connected
                | RTCPeerConnectionState::Failed
                | RTCPeerConnectionState::Closed
        )
    });
    let reached = match tokio::time::timeout(timeout, wait).await {
        Err(_) => return Err(ClientError::Timeout("the peer connection to connect")),
        Ok(Err(_)) => return Err(ClientError::Protocol("peer connection dropped".into())),
        Ok(Ok(s)) => *s,
    };
    match reached {
        RTCPeerConnectionState::Connected => Ok(()),
        other => Err(ClientError::PeerConnection(other.to_string())),
    }
}

/// Waits until `open` is true.
pub(crate) async fn wait_open(
    mut open: watch::Receiver<bool>,
    timeout: Duration,
    what: &'static str,
) -> Result<(), ClientError> {
    match tokio::time::timeout(timeout, open.wait_for(|o| *o)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => Err(ClientError::Protocol(format!("{what} went away"))),
        Err(_) => Err(ClientError::Timeout(what)),
    }
}

/// Reads a data channel's events until it closes: records every message in `log`
/// (labelled with `label`), reports opening on `open`, and hands each message to
/// `on_message`, waiting for the future it returns before reading the next.
pub(crate) async fn record_data_channel<Handled>(
    dc: Arc<dyn DataChannel>,
    log: Arc<Mutex<Vec<DataChannelMessage>>>,
    open: Option<watch::Sender<bool>>,
    mut on_message: impl FnMut(DataChannelMessage) -> Handled + Send,
) where
    Handled: std::future::Future<Output = ()> + Send,
{
    let label = dc.label().await.unwrap_or_default();
    // A channel announced by the remote is already open when we get it.
    if let (Some(open), Ok(webrtc::data_channel::RTCDataChannelState::Open)) =
        (&open, dc.ready_state().await)
    {
        open.send_replace(true);
    }
    while let Some(event) = dc.poll().await {
        match event {
            DataChannelEvent::OnOpen => {
                if let Some(open) = &open {
                    open.send_replace(true);
                }
            }
            DataChannelEvent::OnMessage(msg) => {
                let message = DataChannelMessage {
                    label: label.clone(),
                    is_string: msg.is_string,
                    data: msg.data.freeze(),
                    received_at: Instant::now(),
                };
                lock(&log).push(message.clone());
                on_message(message).await;
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    if let Some(open) = &open {
        open.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_mid() {
        let sdp =
            "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\nm=application 9\r\na=mid:1\r\n";
        assert_eq!(first_mid(sdp).as_deref(), Some("0"));
        assert_eq!(first_mid("v=0\r\n"), None);
    }
}
