//! An agent's screen share to the customer: the same fan-out as the customer's screen,
//! in the other direction ([`Direction::Share`]), one publisher at a time.
//!
//! The session core alone decides who may share and tells this task with
//! [`MediaEvent::Share`](crate::session::MediaEvent::Share); this task forwards the
//! named agent's `sendonly` video track, and nobody else's, to the customer.
//!
//! - The sharing agent adds a `sendonly` video transceiver to its peer connection and
//!   re-offers; its track arrives here ([`ShareIn`]) and is read into the share fan-out
//!   while, and only while, the core names that agent the sharer.
//! - The customer is asked to `renegotiate`; before its offer is applied the relay adds a
//!   `sendonly` transceiver carrying its share track ([`ShareOut`]), which the
//!   customer's new `recvonly` video section binds to (an answerer cannot add sections,
//!   and `add_track` would take the customer's own screen section, the first video
//!   section without a sender). The track stays for the rest of that connection, so
//!   later shares need no renegotiation (in the first sharer's codec).
//! - The customer is the share fan-out's one subscriber, with a bounded queue, drop to
//!   keyframe and coalesced keyframe requests to the sharer, like an agent's.

use std::sync::Arc;
use std::time::Instant;

use relay_codec::keyframe::VideoCodec;
use relay_codec::wire::{Role, ServerMsg};
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RtpCodecKind};
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::rtp_transceiver::RtpTransceiver;

use super::{Direction, LocalTrack, Peer, SessionMedia, lock, read_publisher, relay_track};
use crate::fanout::{MediaKind, SubscriberId};
use crate::session::ParticipantId;

/// An agent's screen-share track as it arrived.
#[derive(Clone)]
pub(in crate::transport) struct ShareIn {
    track: Arc<dyn TrackRemote>,
    ssrc: u32,
    codec: RTCRtpCodec,
}

/// The customer's side: the relay's track towards it and whether its subscription runs.
#[derive(Default)]
pub(in crate::transport) struct ShareOut {
    /// The relay's share track and the transceiver that carries it.
    track: Option<(LocalTrack, Arc<dyn RtpTransceiver>)>,
    /// Whether the customer's offer had a `recvonly` video section for it.
    negotiated: bool,
    /// Whether the customer was asked to renegotiate for it (once per track).
    asked: bool,
    pub(super) subscriber: Option<SubscriberId>,
}

impl SessionMedia {
    /// The core named a new sharer (or none).
    pub(super) async fn on_share(&mut self, sharer: Option<ParticipantId>) {
        if self.sharer == sharer {
            return;
        }
        self.stop_share_forwarding();
        self.sharer = sharer;
        self.start_share_forwarding().await;
    }

    /// A track arrived from a participant that is not the customer: an agent's share.
    pub(super) async fn on_share_track(&mut self, pid: ParticipantId, track: Arc<dyn TrackRemote>) {
        if !matches!(self.role_of(&pid), Some(Role::Host | Role::Agent)) {
            tracing::info!("ignoring a track from a supervisor");
            return;
        }
        let Some(&ssrc) = track.ssrcs().await.first() else {
            return;
        };
        let Some(codec) = track.codec(ssrc).await else {
            return;
        };
        if track.kind().await != RtpCodecKind::Video
            || VideoCodec::from_mime(&codec.mime_type).is_none()
        {
            tracing::info!(mime = %codec.mime_type, "ignoring an agent's track: not a screen");
            return;
        }
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        tracing::info!(participant = %pid.as_str(), mime = %codec.mime_type, "agent's share track");
        peer.share_in = Some(ShareIn { track, ssrc, codec });
        if self.sharer.as_ref() == Some(&pid) {
            self.stop_share_forwarding();
            self.start_share_forwarding().await;
        }
    }

    fn stop_share_forwarding(&mut self) {
        if let Some(task) = self.share_reader.take() {
            task.abort();
            *lock(&self.shared.share.publisher_video) = None;
            self.shared.with_plane(Direction::Share, |p| {
                p.fanout.set_publisher(Instant::now(), false)
            });
        }
    }

    /// Forwards the sharer's track once it is here, and asks the customer to
    /// renegotiate if its connection cannot carry it yet.
    async fn start_share_forwarding(&mut self) {
        let Some(pid) = self.sharer.clone() else {
            return;
        };
        let Some(ShareIn { track, ssrc, codec }) =
            self.peers.get(&pid).and_then(|p| p.share_in.clone())
        else {
            return; // It has not re-offered yet: its track comes later.
        };
        let customer = self.customer.clone();
        let out = customer
            .as_ref()
            .and_then(|c| self.peers.get(c))
            .map(|p| &p.share_out);
        if let Some((local, _)) = out.and_then(|o| o.track.as_ref()) {
            if !local.mime.eq_ignore_ascii_case(&codec.mime_type) {
                tracing::warn!(
                    have = %local.mime, share = %codec.mime_type,
                    "the customer's share track has another codec; share not forwarded"
                );
                return;
            }
        }
        let ask_customer = out.is_some_and(|o| o.track.is_none());
        *lock(&self.shared.share.publisher_video) = Some((track.clone(), ssrc));
        self.share_reader = Some(tokio::spawn(read_publisher(
            self.shared.clone(),
            Direction::Share,
            track,
            MediaKind::Video,
            VideoCodec::from_mime(&codec.mime_type),
        )));
        self.shared.with_plane(Direction::Share, |p| {
            p.fanout.set_publisher(Instant::now(), true)
        });
        if let (Some(customer), true) = (customer, ask_customer) {
            self.shared.tell(&customer, ServerMsg::Renegotiate {}).await;
        }
    }

    /// Before the customer's offer is applied: while an agent shares and the customer's
    /// connection has no share track, add one on a `sendonly` transceiver, so that the
    /// offer's new `recvonly` video section binds to it.
    pub(super) async fn prepare_share_out(&mut self, pid: &ParticipantId) -> Result<(), String> {
        if self.customer.as_ref() != Some(pid) {
            return Ok(());
        }
        let codec = self
            .sharer
            .as_ref()
            .and_then(|s| self.peers.get(s))
            .and_then(|p| p.share_in.as_ref())
            .map(|s| s.codec.clone());
        let (Some(codec), Some(peer)) = (codec, self.peers.get_mut(pid)) else {
            return Ok(());
        };
        if peer.share_out.track.is_some() {
            return Ok(());
        }
        let (track, ssrc) = relay_track(MediaKind::Video, "share", &codec);
        let transceiver = peer
            .pc
            .add_transceiver_from_track(
                track.clone() as Arc<dyn TrackLocal>,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Sendonly,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| format!("cannot add the share track: {e}"))?;
        let sender = transceiver
            .sender()
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the share transceiver has no sender")?;
        peer.share_out = ShareOut {
            track: Some((
                LocalTrack {
                    kind: MediaKind::Video,
                    mime: codec.mime_type.clone(),
                    ssrc,
                    track,
                    sender,
                },
                transceiver,
            )),
            ..ShareOut::default()
        };
        Ok(())
    }

    /// After answering the customer: whether its share track is now negotiated; if it is
    /// not, the customer is asked (once) to renegotiate with a `recvonly` video section.
    pub(super) async fn confirm_share_out(&mut self, pid: &ParticipantId) {
        let Some(peer) = self.peers.get_mut(pid) else {
            return;
        };
        let out = &mut peer.share_out;
        let Some((_, transceiver)) = &out.track else {
            return;
        };
        if !out.negotiated {
            out.negotiated = matches!(transceiver.mid().await, Ok(Some(_)));
        }
        if !out.negotiated && !out.asked {
            out.asked = true;
            self.shared.tell(pid, ServerMsg::Renegotiate {}).await;
        }
    }

    /// Subscribes the customer to the share fan-out once its connection is up and
    /// carries the share track. It stays subscribed; it gets packets while someone
    /// shares.
    pub(super) fn subscribe_share(&mut self, pid: &ParticipantId) {
        let Some(peer) = self.peers.get_mut(pid) else {
            return;
        };
        let out = &mut peer.share_out;
        let Some((local, _)) = &out.track else {
            return;
        };
        if peer.role != Role::Customer
            || !peer.connected
            || !out.negotiated
            || out.subscriber.is_some()
        {
            return;
        }
        let id = super::start_subscriber(
            &self.shared,
            &mut self.next_subscriber,
            Direction::Share,
            pid,
            vec![local.clone()],
            &mut peer.tasks,
        );
        out.subscriber = Some(id);
        tracing::debug!("the customer receives agents' shares");
    }

    /// `pid`'s peer connection is gone (already out of `peers`): its share subscription
    /// ends, and if it was sharing, forwarding stops and the core is told the share is
    /// lost (it ends it for everyone).
    pub(super) async fn release_share(&mut self, pid: &ParticipantId, peer: &Peer) {
        if let Some(id) = peer.share_out.subscriber {
            self.shared.with_plane(Direction::Share, |p| {
                p.sinks.remove(&id);
                p.fanout.remove_subscriber(id);
            });
        }
        if self.sharer.as_ref() != Some(pid) {
            return;
        }
        self.stop_share_forwarding();
        let Some(actor) = self.shared.inner.actor.get() else {
            return;
        };
        let (sid, pid) = (self.shared.id.clone(), pid.clone());
        let _ = actor.call(move |node, _| node.share_lost(&sid, &pid)).await;
    }
}
