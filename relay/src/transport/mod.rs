//! The media plane's IO shell: WebRTC peer connections (the `webrtc` crate) around the
//! sans-IO [`fanout`](crate::fanout) core.
//!
//! Every participant negotiates one peer connection with the relay over its session
//! WebSocket (the client offers, the relay answers; see `docs/protocol.md`). The session
//! core decides who is in a session and with which rights and tells this plane through
//! [`MediaEvent`]s; this plane never decides a permission itself.
//!
//! - [`MediaPlane`]: the node-wide handle the signalling actor feeds. One task per
//!   session with media ([`session`]) processes that session's events in order:
//!   negotiations, members, departures.
//! - The hot path does not go through that task: the customer's track reader routes each
//!   RTP packet through the session's [`Fanout`](crate::fanout::Fanout) (behind a short
//!   `std` mutex, never held across an `.await`) into each agent's bounded queue; one
//!   writer task per agent empties its queue into its peer connection. See
//!   `docs/architecture.md` for the data path and its copies.
//! - Data channels besides media: `input` (agents' input events, checked and forwarded
//!   in `session.rs`), `chat` (the session's chat, JSON as on the WebSocket; `chat.rs`)
//!   and `files` (file transfer around the sans-IO [`transfer`](crate::transfer) core;
//!   `files.rs`).
//! - [`ports`]: the media UDP port range. [`feedback`]: the interceptor that lets agents'
//!   PLI/FIR and receiver reports reach the fan-out.
//! - [`mux`]: instead of the range, one UDP port for every peer connection
//!   (`media.udp_mux_port`), through a runtime whose sockets share it; and
//!   [`mux::tcp`], the ICE-TCP fallback on one TCP port (`media.ice_tcp_port`).
//! - [`rejects`]: counting the datagrams the `webrtc` stack refuses on a live
//!   connection's socket. Publishers are held to `limits.max_publish_bitrate` by the
//!   fan-out's [`bitrate_cap`](crate::fanout::bitrate_cap) in their track readers.

mod chat;
mod events;
pub mod feedback;
mod files;
pub mod mux;
mod peer;
pub mod ports;
pub mod rejects;
mod session;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::mpsc;
use tracing::Instrument;

use relay_codec::wire::{Permission, Role, ServerMsg};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::record::live::{RecordingSettings, Recordings};
use crate::session::{MediaEvent, ParticipantId, SessionId};
use crate::signal::Actor;
use crate::transfer::TransferSettings;

use events::{EventSender, Refused};
use ports::PortPool;
use session::{Event, SessionMedia};

/// Signals (offers, candidates) queued per session before further ones from its
/// clients are dropped and counted (`relay_messages_rejected_total{code="media_queue_full"}`):
/// a client flooding candidates must not grow the node's memory. Every other event
/// (members, departures, shares, recording entries) is always queued (see [`events`]).
const SESSION_SIGNAL_QUEUE: usize = 1024;

/// Every participant's rights in one session, mirrored from the session core.
pub(crate) type Grants =
    Arc<std::sync::Mutex<std::collections::HashMap<ParticipantId, (Role, Permission)>>>;

/// How the plane reaches one session's task.
struct SessionHandle {
    events: EventSender,
    /// Updated here, in the core's order, the moment the core decides: the input path
    /// checks an agent's permission against it, so a downgrade holds from the instant
    /// the core answered, whatever the task still has queued.
    grants: Grants,
}

/// Tunables of the media plane, from `[media]`.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    /// Address media sockets bind.
    pub bind_ip: IpAddr,
    /// Announced instead of the bound address (1:1 NAT).
    pub public_ip: Option<IpAddr>,
    /// RTP packets queued per agent.
    pub agent_queue_packets: usize,
    /// Keyframe-request coalescing window.
    pub keyframe_window: Duration,
    /// Most bits per second one published track may push into the fan-out
    /// (`limits.max_publish_bitrate`).
    pub max_publish_bitrate: u64,
    /// Largest chat message on a `chat` channel (`limits.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Each agent's budget of input events (`rate_limits.input`).
    pub input_rate: crate::rate_limit::RateLimit,
    /// File transfer on `files` channels (`limits.max_file_bytes` and the window).
    pub transfers: TransferSettings,
    /// The shared media socket, when `media.udp_mux_port` is set (bound by
    /// [`MediaPlane::new`]).
    pub udp_mux: Option<mux::UdpMux>,
    /// The shared ICE-TCP listener, when `media.ice_tcp_port` is set (bound by
    /// [`MediaPlane::new`]).
    pub ice_tcp: Option<mux::tcp::TcpMux>,
}

impl MediaSettings {
    /// From the node's configuration.
    pub fn from_config(config: &Config) -> MediaSettings {
        let c = &config.media;
        MediaSettings {
            bind_ip: c.bind_ip,
            public_ip: c.public_ip,
            agent_queue_packets: c.agent_queue_packets,
            keyframe_window: c.keyframe_window,
            max_publish_bitrate: config.limits.max_publish_bitrate,
            max_message_bytes: config.limits.max_message_bytes,
            input_rate: config.rate_limits.input,
            transfers: TransferSettings {
                max_file_bytes: config.limits.max_file_bytes,
                offer_rate: config.rate_limits.file_offer,
                ..TransferSettings::default()
            },
            udp_mux: None,
            ice_tcp: None,
        }
    }

    /// The relay's SDP as participants must see it: with the UDP mux, host candidates
    /// name the mux port instead of the placeholder the `webrtc` crate bound; with
    /// `media.public_ip`, they name that address (the crate's own NAT 1:1 setting is
    /// stored but never applied in rtc 0.21.1). With ICE-TCP, passive TCP candidates
    /// name the shared TCP port and active ones are left out.
    pub fn advertised_sdp(&self, sdp: String) -> String {
        let sdp = match (&self.udp_mux, self.public_ip) {
            (Some(mux), _) => mux.advertise(&sdp),
            (None, Some(ip)) => mux::rewrite_host_candidates(&sdp, ip, None),
            (None, None) => sdp,
        };
        match &self.ice_tcp {
            Some(tcp) => tcp.advertise(&sdp),
            None => sdp,
        }
    }
}

/// The node's media plane; cheap to clone.
#[derive(Clone)]
pub struct MediaPlane {
    inner: Arc<Inner>,
}

struct Inner {
    settings: MediaSettings,
    metrics: Arc<Metrics>,
    ports: PortPool,
    actor: OnceLock<Actor>,
    sessions: DashMap<SessionId, SessionHandle>,
    /// The writers of open `chat` channels, for the actor to hand chat to at once.
    chat: DashMap<(SessionId, ParticipantId), mpsc::Sender<ServerMsg>>,
    /// Starts each session's recording.
    recordings: Recordings,
}

impl MediaPlane {
    /// A media plane with no session yet. With `media.udp_mux_port` or
    /// `media.ice_tcp_port` set, binds them (an error naming the port if it cannot); must
    /// then be called within a tokio runtime.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> std::io::Result<MediaPlane> {
        let media = &config.media;
        let mut settings = MediaSettings::from_config(config);
        let ports = if media.udp_mux_port != 0 {
            settings.udp_mux = Some(mux::UdpMux::bind(
                media.bind_ip,
                media.udp_mux_port,
                media.public_ip,
                &metrics,
            )?);
            PortPool::muxed(media.bind_ip)
        } else {
            PortPool::new(media.bind_ip, media.udp_port_min, media.udp_port_max)
        };
        if media.ice_tcp_port != 0 {
            let tcp = mux::tcp::TcpMux::bind(
                media.bind_ip,
                media.ice_tcp_port,
                media.public_ip,
                &metrics,
            )
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "media.ice_tcp_port {}:{}: {e}",
                        media.bind_ip, media.ice_tcp_port
                    ),
                )
            })?;
            settings.ice_tcp = Some(tcp);
        }
        Ok(MediaPlane {
            inner: Arc::new(Inner {
                settings,
                metrics: metrics.clone(),
                ports,
                actor: OnceLock::new(),
                sessions: DashMap::new(),
                chat: DashMap::new(),
                recordings: Recordings::new(RecordingSettings::from_config(config), metrics),
            }),
        })
    }

    /// Recordings whose writer has not finished yet.
    pub fn recordings_writing(&self) -> usize {
        self.inner.recordings.writers()
    }

    /// Queues a chat message (a [`ServerMsg::Chat`]) on a participant's open `chat`
    /// channel. Never blocks. Hands the message back (`Some`) when the participant has
    /// no open channel or its queue is full, for the caller to deliver on the WebSocket.
    #[must_use]
    pub fn send_chat(
        &self,
        session: &SessionId,
        participant: &ParticipantId,
        msg: ServerMsg,
    ) -> Option<ServerMsg> {
        let key = (session.clone(), participant.clone());
        let Some(tx) = self.inner.chat.get(&key).map(|tx| tx.clone()) else {
            return Some(msg);
        };
        match tx.try_send(msg) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) => {
                Some(m)
            }
        }
    }

    /// Connects the plane to the actor that delivers its answers to participants.
    pub fn attach(&self, actor: Actor) {
        let _ = self.inner.actor.set(actor);
    }

    /// Takes one event from the session core. Never blocks: the actor calls it while
    /// flushing outputs. Events reach the session's task in this order; only signalling
    /// over the session's bound is dropped (and counted), never a member or permission
    /// change, a departure, a share change, the customer's absence, the session's end
    /// or a recording entry.
    pub fn handle(&self, event: MediaEvent) {
        let session = match &event {
            MediaEvent::Member { session, .. }
            | MediaEvent::Left { session, .. }
            | MediaEvent::Signal { session, .. }
            | MediaEvent::Share { session, .. }
            | MediaEvent::Record { session, .. }
            | MediaEvent::CustomerAway { session, .. }
            | MediaEvent::SessionEnded { session } => session.clone(),
        };
        if let MediaEvent::SessionEnded { .. } = event {
            if let Some((_, handle)) = self.inner.sessions.remove(&session) {
                // The task closes every peer connection and ends (also once its sender
                // is dropped here).
                let _ = handle.events.send(Event::Control(event));
            }
            return;
        }
        let handle = self
            .inner
            .sessions
            .entry(session.clone())
            .or_insert_with(|| self.spawn_session(session.clone()));
        match &event {
            MediaEvent::Member {
                participant,
                role,
                permission,
                ..
            } => {
                session::lock(&handle.grants).insert(participant.clone(), (*role, *permission));
            }
            MediaEvent::Left { participant, .. } => {
                session::lock(&handle.grants).remove(participant);
            }
            _ => {}
        }
        let tx = handle.events.clone();
        drop(handle);
        let event = match event {
            // Stamped here: the core keeps no clock, and the actor hands its outputs
            // over as soon as it produced them.
            MediaEvent::Record { entry, .. } => Event::Record(Instant::now(), entry),
            event => Event::Control(event),
        };
        match tx.send(event) {
            Ok(()) => {}
            Err(Refused::SignalsFull) => {
                tracing::debug!(session = %session.as_str(), "media signal queue full; signal dropped");
                self.inner
                    .metrics
                    .messages_rejected_total
                    .with_label_values(&["media_queue_full"])
                    .inc();
            }
            Err(Refused::Closed) => {
                tracing::warn!(session = %session.as_str(), "media task gone; event dropped");
            }
        }
    }

    /// Media UDP ports still free.
    pub fn ports_available(&self) -> usize {
        self.inner.ports.available()
    }

    fn spawn_session(&self, id: SessionId) -> SessionHandle {
        let (tx, rx) = events::channel(SESSION_SIGNAL_QUEUE);
        let grants = Grants::default();
        let id_for_span = id.as_str().to_owned();
        let media = SessionMedia::new(id, self.inner.clone(), tx.downgrade(), grants.clone());
        let span = tracing::info_span!("media", session = %id_for_span);
        tokio::spawn(media.run(rx).instrument(span));
        SessionHandle { events: tx, grants }
    }
}
