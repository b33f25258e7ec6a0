//! Building one peer connection and receiving its events.

use std::net::SocketAddr;
use std::sync::Arc;

use rtc::interceptor::Slot;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::transport::RTCIceCandidateType;
use tokio::sync::{Notify, mpsc};
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState, Registry,
};

use super::MediaSettings;
use super::feedback::{self, AppFeedback};
use super::session::{Event, PeerRef};

/// What a peer connection reports to its session's task, naming itself by
/// participant and generation (a participant that comes back gets a new peer
/// connection; the old one's late events must not touch the new one).
#[derive(Clone)]
pub(super) struct PeerEvents {
    pub peer: PeerRef,
    pub events: mpsc::WeakUnboundedSender<Event>,
    /// Notified once ICE gathering completes (a stored permit if nobody waits yet).
    pub gathered: Arc<Notify>,
}

impl PeerEvents {
    async fn send(&self, event: Event) {
        if let Some(tx) = self.events.upgrade() {
            let _ = tx.send(event);
        }
    }
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PeerEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(
            participant = %self.peer.participant.as_str(),
            generation = self.peer.generation,
            %state,
            "peer connection state"
        );
        let event = match state {
            RTCPeerConnectionState::Connected => Event::Connected(self.peer.clone()),
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                Event::Failed(self.peer.clone())
            }
            _ => return,
        };
        self.send(event).await;
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        self.send(Event::DataChannel(self.peer.clone(), channel))
            .await;
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        self.send(Event::Track(self.peer.clone(), track)).await;
    }
}

/// A new peer connection bound to `addr`, with every codec the relay forwards, the
/// default interceptors (NACK responder and generator, RTCP reports, TWCC receiver) and
/// [`AppFeedback`] on top.
pub(super) async fn build(
    settings: &MediaSettings,
    addr: SocketAddr,
    handler: PeerEvents,
) -> Result<Arc<dyn PeerConnection>, webrtc::error::Error> {
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs()?;
    let registry = register_default_interceptors(Registry::new(), &mut media_engine)?
        .with(Slot::from(feedback::SLOT), AppFeedback::default());
    let mut setting_engine = SettingEngineBuilder::new();
    if let Some(ip) = settings.public_ip {
        setting_engine =
            setting_engine.with_nat_1to1_ips(vec![ip.to_string()], RTCIceCandidateType::Host);
    }
    if addr.ip().is_loopback() {
        setting_engine = setting_engine.with_include_loopback_candidate(true);
    }
    let mut builder = PeerConnectionBuilder::new();
    if settings.udp_mux.is_some() || settings.ice_tcp.is_some() {
        // The shared media ports (see `mux.rs`): the relay picks the connection's ICE
        // credentials so the muxes can route its checks, and its runtime's socket and
        // TCP listener are the muxes'. With the UDP mux, `addr` is a placeholder naming
        // the host candidate's address; the TCP listener always is (`bind_ip:0`).
        let setup = super::mux::peer_setup(settings.udp_mux.as_ref(), settings.ice_tcp.as_ref());
        setting_engine = setting_engine.with_ice_credentials(setup.ufrag, setup.pwd);
        builder = builder.with_runtime(setup.runtime);
        if settings.ice_tcp.is_some() {
            builder = builder.with_tcp_addrs(vec![SocketAddr::new(addr.ip(), 0)]);
        }
    }
    let pc = builder
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(setting_engine.build())
        .with_handler(Arc::new(handler))
        .with_udp_addrs(vec![addr])
        .build()
        .await?;
    Ok(Arc::new(pc))
}

/// The DTLS certificate fingerprint an SDP offers (`a=fingerprint:`, session or first
/// media level), which identifies the remote peer connection: a renegotiation or an
/// ICE restart keeps it, a new peer connection (a client that came back) brings another.
pub(super) fn dtls_fingerprint(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=fingerprint:"))
        .map(str::trim)
}

/// The ICE username fragment an SDP offers (`a=ice-ufrag:`, session or first media
/// level): a new one on the same connection is an ICE restart.
pub(super) fn ice_ufrag(sdp: &str) -> Option<&str> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .map(str::trim)
}

/// Whether a trickled `candidate:` attribute is a TCP one (its third field, the
/// transport, is `tcp`).
pub(super) fn is_tcp_candidate(candidate: &str) -> bool {
    candidate
        .split_ascii_whitespace()
        .nth(2)
        .is_some_and(|t| t.eq_ignore_ascii_case("tcp"))
}

#[cfg(test)]
mod tests {
    use super::{dtls_fingerprint, ice_ufrag, is_tcp_candidate};

    #[test]
    fn tcp_candidates_are_told_from_udp_ones() {
        assert!(is_tcp_candidate(
            "candidate:2 1 TCP 1518280447 198.51.100.7 9 typ host tcptype active"
        ));
        assert!(is_tcp_candidate(
            "candidate:3 1 tcp 1518280447 10.0.0.1 443 typ host tcptype passive"
        ));
        assert!(!is_tcp_candidate(
            "candidate:1 1 udp 2130706431 192.0.2.7 50002 typ host"
        ));
        assert!(!is_tcp_candidate(""));
    }

    #[test]
    fn the_ice_ufrag_is_read_from_the_first_line_that_has_one() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=ice-ufrag:AbCd\r\na=ice-pwd:x\r\n";
        assert_eq!(ice_ufrag(sdp), Some("AbCd"));
        assert_eq!(ice_ufrag("v=0\r\n"), None);
    }

    #[test]
    fn the_fingerprint_is_read_from_session_or_media_level() {
        let session = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\na=fingerprint:sha-256 AB:CD\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=fingerprint:sha-256 EF:01\r\n";
        assert_eq!(dtls_fingerprint(session), Some("sha-256 AB:CD"));
        let media = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=fingerprint:sha-256 EF:01\r\n";
        assert_eq!(dtls_fingerprint(media), Some("sha-256 EF:01"));
        assert_eq!(dtls_fingerprint("v=0\r\nm=video 9 RTP/AVP 96\r\n"), None);
    }
}
