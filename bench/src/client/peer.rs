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
use rtc::ice::network_type::NetworkType;
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
use super::route::{self, MediaRoute};
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

/// Which transports a client's ICE may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IceTransport {
    /// UDP host candidates, as before (a relay's TCP candidates go unused).
    #[default]
    Any,
    /// ICE-TCP only, as a client behind a UDP block: no UDP socket at all; the client
    /// dials the relay's passive TCP candidate (`media.ice_tcp_port`) from an active one.
    Tcp,
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
    /// ICE restarts offered (asked for by the application or automatic).
    pub ice_restarts: u32,
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
    /// Set by the application to offer again with an ICE restart.
    pub ice_restart: Notify,
    /// The transports ICE may use ([`PeerShared::with_ice_transport`]).
    pub ice_transport: IceTransport,
    /// The customer's: on the relay's first `renegotiate` (an agent shares its screen),
    /// add a `recvonly` video transceiver before offering, once.
    pub recv_video_on_renegotiate: AtomicBool,
    /// Maps the addresses of the candidates exchanged with the relay (see `route.rs`).
    pub route: Option<Arc<dyn MediaRoute>>,
    /// Restart ICE by itself when the connection drops to `disconnected` or `failed`
    /// after it was connected (see [`run_negotiation`]).
    pub auto_ice_restart: bool,
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
            ice_restart: Notify::new(),
            ice_transport: IceTransport::Any,
            recv_video_on_renegotiate: AtomicBool::new(false),
            route: None,
            auto_ice_restart: false,
        }
    }

    /// With `route` mapping candidate addresses and `auto_ice_restart` on or off.
    pub(crate) fn with_media_path(
        mut self,
        route: Option<Arc<dyn MediaRoute>>,
        auto_ice_restart: bool,
    ) -> PeerShared {
        self.route = route;
        self.auto_ice_restart = auto_ice_restart;
        self
    }

    /// With ICE limited to `transport`.
    pub(crate) fn with_ice_transport(mut self, transport: IceTransport) -> PeerShared {
        self.ice_transport = transport;
        self
    }

    /// A local candidate as the relay should see it.
    fn announced(&self, candidate: String) -> String {
        match &self.route {
            Some(route) => {
                route::map_candidate(&candidate, |a| route.announce_local(a)).unwrap_or(candidate)
            }
            None => candidate,
        }
    }

    /// A relay candidate as this client should use it.
    fn reached(&self, candidate: String) -> String {
        match &self.route {
            Some(route) => {
                route::map_candidate(&candidate, |a| route.reach_remote(a)).unwrap_or(candidate)
            }
            None => candidate,
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
        if is_passive_tcp(&init.candidate) {
            // The relay never dials a client; only the active candidate is of use.
            return;
        }
        let candidate = IceCandidate {
            candidate: self.0.announced(init.candidate),
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
    let transport = shared.ice_transport;
    build(
        bind,
        transport,
        media_engine,
        registry,
        Arc::new(Handler(shared)),
    )
    .await
}

/// [`build_peer_connection`] with another event handler, for peers not signalled over the
/// relay's session socket (the Janus peers of `compare`, signalled over its HTTP API).
pub(crate) async fn build_peer_connection_with(
    bind: SocketAddr,
    media_engine: MediaEngine,
    registry: Registry,
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> Result<Arc<dyn PeerConnection>, ClientError> {
    build(bind, IceTransport::Any, media_engine, registry, handler).await
}

/// One peer connection on `bind`: a UDP socket (`Any`), or only a TCP listener
/// (`Tcp`), which the crate needs to gather an active TCP candidate; it never accepts
/// anything, as the relay never dials.
async fn build(
    bind: SocketAddr,
    transport: IceTransport,
    media_engine: MediaEngine,
    registry: Registry,
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> Result<Arc<dyn PeerConnection>, ClientError> {
    let settings = SettingEngineBuilder::new().with_multicast_dns_mode(MulticastDnsMode::Disabled);
    let builder = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_handler(handler);
    let pc = match transport {
        IceTransport::Any => {
            builder
                .with_setting_engine(settings.build())
                .with_udp_addrs(vec![bind])
                .build()
                .await?
        }
        IceTransport::Tcp => {
            builder
                .with_setting_engine(
                    settings
                        .with_network_types(vec![NetworkType::Tcp4, NetworkType::Tcp6])
                        .build(),
                )
                .with_runtime(Arc::new(super::tcp_runtime::NoDelayRuntime))
                .with_udp_addrs(Vec::<SocketAddr>::new())
                .with_tcp_addrs(vec![bind])
                .build()
                .await?
        }
    };
    Ok(Arc::new(pc))
}

/// Whether an ICE candidate (`candidate:…` or its value) is a passive TCP one of
/// component 1 (RTCP is muxed: dialing a component-2 candidate would only open a
/// second, idle connection).
fn is_passive_tcp(candidate: &str) -> bool {
    let value = candidate.strip_prefix("candidate:").unwrap_or(candidate);
    let fields: Vec<&str> = value.split(' ').collect();
    fields.get(1) == Some(&"1")
        && fields.get(2).is_some_and(|t| t.eq_ignore_ascii_case("tcp"))
        && fields.windows(2).any(|w| w == ["tcptype", "passive"])
}

/// The relay's passive TCP candidates in an SDP, to add as if trickled: the crate dials
/// a passive candidate only when it is added that way, not when it comes in the SDP.
fn passive_tcp_candidates(sdp: &str) -> Vec<RTCIceCandidateInit> {
    let mut mid = None;
    let mut out = Vec::new();
    for line in sdp.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("a=mid:") {
            mid = Some(m.to_owned());
        } else if let Some(value) = line.strip_prefix("a=candidate:")
            && is_passive_tcp(value)
            && !out
                .iter()
                .any(|c: &RTCIceCandidateInit| c.candidate.ends_with(value))
        {
            out.push(RTCIceCandidateInit {
                candidate: format!("candidate:{value}"),
                sdp_mid: mid.clone(),
                sdp_mline_index: Some(0),
                ..Default::default()
            });
        }
    }
    out
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
    let sdp = match &shared.route {
        Some(route) => route::map_sdp(&offer.sdp, |a| route.announce_local(a)),
        None => offer.sdp.clone(),
    };
    pc.set_local_description(offer).await?;
    shared.signal.send(&ClientMsg::Offer { sdp }).await?;
    lock(&shared.stats).offers_sent += 1;
    Ok(())
}

/// How often an automatic ICE restart is tried again while the connection stays down
/// (the network may not be back yet).
pub(crate) const ICE_RESTART_RETRY: Duration = Duration::from_secs(3);

/// Offers now, restarting ICE first when `restart` (fresh ICE credentials: the relay
/// checks every path again, e.g. after a network change).
async fn offer(
    pc: &dyn PeerConnection,
    shared: &PeerShared,
    restart: bool,
) -> Result<(), ClientError> {
    if restart {
        pc.restart_ice().await?;
        lock(&shared.stats).ice_restarts += 1;
    }
    send_offer(pc, shared).await
}

/// Sends the first offer, then applies what the relay sends until the socket closes:
/// `answer` → remote description (then a queued offer, if any); `candidate` → added, or
/// held until the first answer; `renegotiate` (or the application's
/// [`PeerShared::renegotiate`]) → a new offer on the same connection, or queued while
/// an offer is outstanding; [`PeerShared::ice_restart`] → the same with an ICE restart.
/// With [`PeerShared::auto_ice_restart`], a connection that was connected and drops to
/// `disconnected` or `failed` restarts ICE at once and again every
/// [`ICE_RESTART_RETRY`] until it is connected. Everything else goes to `others`
/// (dropped when nobody reads it; the transcript keeps it). `on_answer` sees each
/// applied answer's SDP.
pub(crate) async fn run_negotiation(
    pc: Arc<dyn PeerConnection>,
    shared: Arc<PeerShared>,
    mut incoming: mpsc::Receiver<ServerMsg>,
    others: mpsc::Sender<ServerMsg>,
    on_answer: impl Fn(&str) + Send,
) {
    let mut awaiting_answer = false;
    let mut offer_queued = false;
    let mut restart_queued = false;
    let mut have_remote = false;
    let mut held_candidates: Vec<RTCIceCandidateInit> = Vec::new();
    // The relay's passive TCP candidates dialed, per relay ICE ufrag: a renegotiation
    // keeps the stream, an ICE restart (a new ufrag) needs a new one.
    let mut tcp_dialed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut state = shared.state_tx.subscribe();
    let mut was_connected = false;
    let mut retry_at: Option<tokio::time::Instant> = None;

    match send_offer(&*pc, &shared).await {
        Ok(()) => awaiting_answer = true,
        Err(e) => shared.error(format!("first offer: {e}")),
    }

    loop {
        let msg = tokio::select! {
            msg = incoming.recv() => match msg {
                Some(msg) => Some(msg),
                None => break,
            },
            () = shared.renegotiate.notified() => {
                offer_queued = true;
                None
            }
            () = shared.ice_restart.notified() => {
                offer_queued = true;
                restart_queued = true;
                None
            }
            Ok(()) = state.changed() => {
                let now = *state.borrow_and_update();
                match now {
                    RTCPeerConnectionState::Connected => {
                        was_connected = true;
                        retry_at = None;
                    }
                    RTCPeerConnectionState::Disconnected | RTCPeerConnectionState::Failed
                        if shared.auto_ice_restart && was_connected && retry_at.is_none() =>
                    {
                        tracing::info!(state = %now, "client: media path lost; restarting ICE");
                        offer_queued = true;
                        restart_queued = true;
                        retry_at = Some(tokio::time::Instant::now() + ICE_RESTART_RETRY);
                    }
                    _ => {}
                }
                None
            }
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() =>
            {
                // Still not connected: the answer may have been lost with the path, or
                // the new path was not there yet. Try again, answered or not.
                awaiting_answer = false;
                offer_queued = true;
                restart_queued = true;
                retry_at = Some(tokio::time::Instant::now() + ICE_RESTART_RETRY);
                None
            }
        };
        match msg {
            None => {}
            Some(ServerMsg::Answer { sdp }) => {
                let sdp = match &shared.route {
                    Some(route) => route::map_sdp(&sdp, |a| route.reach_remote(a)),
                    None => sdp,
                };
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
                        if shared.ice_transport == IceTransport::Tcp {
                            let ufrag = sdp
                                .lines()
                                .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
                                .unwrap_or_default();
                            for c in passive_tcp_candidates(&sdp) {
                                if tcp_dialed.insert(format!("{ufrag} {}", c.candidate)) {
                                    add_candidate(&*pc, &shared, c).await;
                                }
                            }
                        }
                    }
                    Err(e) => shared.error(format!("applying the answer: {e}")),
                }
            }
            Some(ServerMsg::Candidate(c)) => {
                if c.candidate.is_empty() {
                    // End of the relay's candidates: nothing to do with host candidates.
                    continue;
                }
                let init = RTCIceCandidateInit {
                    candidate: shared.reached(c.candidate),
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
            Some(ServerMsg::Renegotiate {}) => {
                lock(&shared.stats).renegotiate_requests += 1;
                offer_queued = true;
            }
            Some(other) => match others.try_send(other) {
                Ok(()) => {}
                Err(_) => tracing::debug!("client: non-media message dropped (nobody reads them)"),
            },
        }
        if offer_queued && !awaiting_answer {
            offer_queued = false;
            let restart = std::mem::take(&mut restart_queued);
            match offer(&*pc, &shared, restart).await {
                Ok(()) => awaiting_answer = true,
                Err(e) => shared.error(format!("renegotiation offer: {e}")),
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
