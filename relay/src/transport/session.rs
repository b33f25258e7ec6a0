//! One session's media: its task (negotiations, members, departures, in order) and
//! the state the hot path shares with it. The data path itself (both directions) is in
//! [`forward`]; an agent's screen share to the customer in [`share`].

mod forward;
mod share;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use relay_codec::keyframe::VideoCodec;
use relay_codec::recording::{GapKind, GapRecord, InputOutcome, InputRecord, Record};
use relay_codec::wire::{ErrorCode, Permission, Role, ServerMsg};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{PeerConnection, RTCIceCandidateInit, RTCSessionDescription};

use forward::{
    Direction, MediaPath, Plane, read_feedback, read_publisher, request_keyframes, write_subscriber,
};

use super::chat::{self, CHAT_LABEL};
use super::events::EventReceiver;
use super::files::{self, FILES_LABEL, FilePlane, with_files};
use super::peer::{self, PeerEvents};
use super::ports::Lease;
use super::{Grants, Inner};
use crate::fanout::{FanoutSettings, MediaKind, SubscriberId};
use crate::rate_limit::{MessageClass, RefusalNotice, TokenBucket};
use crate::record::live::RecordingHandle;
use crate::session::{MediaEvent, ParticipantId, RecordEntry, SessionId, Signal};
use crate::transfer::Transfers;

/// The data channel agents send input events on and the customer receives them on.
pub const INPUT_LABEL: &str = "input";

/// Bytes of a malformed input message kept in the recording (enough to see what it was).
const MAX_RECORDED_MALFORMED_INPUT: usize = 256;

/// How long the relay waits for its own ICE candidates before answering anyway.
const GATHER_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest the session task sleeps between fan-out timer checks.
const TICK: Duration = Duration::from_millis(100);

/// What the session task processes, in order.
pub(crate) enum Event {
    /// From the session core.
    Control(MediaEvent),
    /// A participant's peer connection is up.
    Connected(PeerRef),
    /// A participant's peer connection failed or closed.
    Failed(PeerRef),
    /// A participant opened a data channel.
    DataChannel(PeerRef, Arc<dyn DataChannel>),
    /// A participant's track arrived (the customer's screen and voice, or an agent's
    /// screen share).
    Track(PeerRef, Arc<dyn TrackRemote>),
    /// From the session core, for the recording, stamped when it was handed over.
    Record(Instant, RecordEntry),
}

/// One peer connection of a participant: the participant, and which of its peer
/// connections (counted per session) this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerRef {
    pub participant: ParticipantId,
    pub generation: u64,
}

/// A customer's published track.
#[derive(Clone)]
struct Published {
    kind: MediaKind,
    codec: RTCRtpCodec,
}

/// What the hot path and the data-channel tasks share with the session task.
pub(super) struct Shared {
    pub(super) id: SessionId,
    pub(super) inner: Arc<Inner>,
    /// The customer's screen (and voice) to the agents.
    screen: MediaPath,
    /// The sharing agent's screen to the customer.
    share: MediaPath,
    /// File transfers: the core and the participants' `files` queues.
    pub(super) files: Mutex<FilePlane>,
    /// The customer's `input` channel, once open.
    customer_input: Mutex<Option<Arc<dyn DataChannel>>>,
    /// Every participant's rights, mirrored from the session core by
    /// [`MediaPlane::handle`](super::MediaPlane::handle) as the core decides them.
    grants: Grants,
    /// Sequence numbers of the input events the customer receives: the relay numbers
    /// them itself, so two agents' own counters cannot tell the customer that two
    /// (possibly masked) agents are sending.
    input_seq: AtomicU32,
    /// The customer's peer connection closed (it went away, or a new one replaced it)
    /// and it has not published its screen again since: agents' input is dropped and
    /// counted (`customer_away`), never queued for later.
    input_gap: AtomicBool,
    /// The session's recording, once started (never, if its portal has no review key).
    pub(super) recording: OnceLock<RecordingHandle>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// The gauge of participants' open `label` data channels (`chat`, `files`).
    pub(super) fn open_channels(&self, label: &str) -> prometheus::IntGauge {
        self.inner
            .metrics
            .data_channels_open
            .with_label_values(&[label])
    }

    fn path(&self, direction: Direction) -> &MediaPath {
        match direction {
            Direction::Screen => &self.screen,
            Direction::Share => &self.share,
        }
    }

    /// Runs `f` on the fan-out of `direction`, then handles its outputs.
    fn with_plane<R>(&self, direction: Direction, f: impl FnOnce(&mut Plane) -> R) -> R {
        self.path(direction).with_plane(&self.inner.metrics, f)
    }

    /// Adds a record to the session's recording, if it is recorded. Never blocks.
    pub(super) fn record(&self, at: Instant, record: Record) {
        if let Some(recording) = self.recording.get() {
            recording.record(at, record);
        }
    }

    /// Sends `msg` to a participant's WebSocket (through the session core).
    pub(super) async fn tell(&self, participant: &ParticipantId, msg: ServerMsg) {
        let Some(actor) = self.inner.actor.get() else {
            return;
        };
        let (sid, pid) = (self.id.clone(), participant.clone());
        let _ = actor
            .call(move |node, _| node.deliver(&sid, &pid, msg))
            .await;
    }
}

/// One participant's peer connection.
struct Peer {
    role: Role,
    /// Which of the participant's peer connections this is.
    generation: u64,
    pc: Arc<dyn PeerConnection>,
    lease: Lease,
    gathered: Arc<Notify>,
    negotiated: bool,
    connected: bool,
    /// Local tracks towards an agent, by kind, with their SSRC and codec.
    tracks: Vec<LocalTrack>,
    subscriber: Option<SubscriberId>,
    /// The customer's side of an agent's share (see [`share`]).
    share_out: share::ShareOut,
    /// An agent's screen-share track, once it arrived (forwarded only while the session
    /// core names this agent the sharer).
    share_in: Option<share::ShareIn>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Clone)]
struct LocalTrack {
    kind: MediaKind,
    mime: String,
    ssrc: u32,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
}

/// The session task's state.
pub(crate) struct SessionMedia {
    shared: Arc<Shared>,
    events: mpsc::WeakUnboundedSender<Event>,
    peers: HashMap<ParticipantId, Peer>,
    published: Vec<Published>,
    next_subscriber: u64,
    /// The last peer connection generation handed out.
    next_generation: u64,
    customer: Option<ParticipantId>,
    /// The agent the session core lets share its screen now.
    sharer: Option<ParticipantId>,
    /// The task forwarding the sharer's track, while it runs.
    share_reader: Option<JoinHandle<()>>,
    /// The customer's connection closed while it published: the recording has a gap
    /// until its video is back.
    customer_away: bool,
}

impl SessionMedia {
    pub(super) fn new(
        id: SessionId,
        inner: Arc<Inner>,
        events: mpsc::WeakUnboundedSender<Event>,
        grants: Grants,
    ) -> SessionMedia {
        let window = inner.settings.keyframe_window;
        let transfers = inner.settings.transfers.clone();
        let settings = FanoutSettings {
            keyframe_window: window,
            keyframe_retry: FanoutSettings::default().keyframe_retry.max(window),
        };
        SessionMedia {
            shared: Arc::new(Shared {
                id,
                inner,
                screen: MediaPath::new(settings.clone()),
                share: MediaPath::new(settings),
                files: Mutex::new(FilePlane::new(Transfers::new(transfers))),
                customer_input: Mutex::new(None),
                grants,
                input_seq: AtomicU32::new(1),
                input_gap: AtomicBool::new(false),
                recording: OnceLock::new(),
            }),
            events,
            peers: HashMap::new(),
            published: Vec::new(),
            next_subscriber: 1,
            next_generation: 0,
            customer: None,
            sharer: None,
            share_reader: None,
            customer_away: false,
        }
    }

    /// Processes the session's events until it ends.
    pub(super) async fn run(mut self, mut rx: EventReceiver) {
        let requesters = [Direction::Screen, Direction::Share]
            .map(|d| tokio::spawn(request_keyframes(self.shared.clone(), d)));
        loop {
            let due = self.shared.screen.poll_timeout();
            let share_due = self.shared.share.poll_timeout();
            let files_due = with_files(&self.shared, |core| core.poll_timeout());
            let now = Instant::now();
            if files_due.is_some_and(|d| d <= now) {
                // Also when events keep the sleep below from ever firing.
                with_files(&self.shared, |core| core.handle_timeout(now));
            }
            let wake = [due, share_due, files_due]
                .into_iter()
                .flatten()
                .fold(now + TICK, Instant::min);
            tokio::select! {
                event = rx.recv() => match event {
                    Some(Event::Control(MediaEvent::SessionEnded { .. })) | None => break,
                    Some(event) => self.on_event(event).await,
                },
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    for d in [Direction::Screen, Direction::Share] {
                        self.shared.with_plane(d, |p| p.fanout.handle_timeout(now));
                    }
                    with_files(&self.shared, |core| core.handle_timeout(now));
                }
            }
        }
        for requester in requesters {
            requester.abort();
        }
        if let Some(recording) = self.shared.recording.get() {
            recording.end();
        }
        // The session is over: nothing is left to tell the core about a lost share.
        self.sharer = None;
        let all: Vec<ParticipantId> = self.peers.keys().cloned().collect();
        for pid in all {
            self.close_peer(&pid).await;
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Control(MediaEvent::Member {
                participant,
                role,
                permission,
                ..
            }) => {
                if role == Role::Customer {
                    self.customer = Some(participant.clone());
                }
                // `grants` was updated when the core decided (see `MediaPlane::handle`).
                with_files(&self.shared, |core| {
                    core.set_member(Instant::now(), &participant, role, permission)
                });
            }
            Event::Control(MediaEvent::Left { participant, .. }) => {
                self.close_peer(&participant).await;
                with_files(&self.shared, |core| {
                    core.remove_member(Instant::now(), &participant)
                });
            }
            Event::Control(MediaEvent::Signal {
                participant,
                signal,
                ..
            }) => match signal {
                Signal::Offer(sdp) => self.on_offer(participant, sdp).await,
                Signal::Candidate(c) if peer::is_tcp_candidate(&c.candidate) => {
                    // The relay never dials a client: a client on ICE-TCP connects to
                    // the relay's passive candidate. Adding a client's TCP candidate
                    // would let it make the node open connections to any address.
                    tracing::debug!(participant = %participant.as_str(), "TCP candidate ignored");
                }
                Signal::Candidate(c) => {
                    if let Some(peer) = self.peers.get(&participant) {
                        let init = RTCIceCandidateInit {
                            candidate: c.candidate,
                            sdp_mid: c.sdp_mid,
                            sdp_mline_index: c.sdp_mline_index,
                            ..Default::default()
                        };
                        if let Err(e) = peer.pc.add_ice_candidate(init).await {
                            self.refuse(&participant, ErrorCode::InvalidField, &e.to_string())
                                .await;
                        }
                    }
                }
            },
            Event::Control(MediaEvent::Share { sharer, .. }) => self.on_share(sharer).await,
            Event::Control(MediaEvent::CustomerAway { participant, .. }) => {
                // Its media cannot outlive its signalling: whatever comes back publishes
                // again on a new peer connection (the agents keep theirs).
                if self.customer.as_ref() == Some(&participant) {
                    self.close_peer(&participant).await;
                }
            }
            Event::Control(MediaEvent::SessionEnded { .. } | MediaEvent::Record { .. }) => {}
            Event::Record(at, entry) => self.on_record(at, entry),
            // A replaced peer connection's late events are dropped.
            Event::Connected(peer) | Event::Failed(peer) if !self.is_current(&peer) => {}
            Event::DataChannel(peer, _) | Event::Track(peer, _) if !self.is_current(&peer) => {}
            Event::Connected(PeerRef {
                participant: pid, ..
            }) => {
                if let Some(peer) = self.peers.get_mut(&pid) {
                    if peer.connected && peer.role == Role::Customer {
                        // Connected again after losing its path (an ICE restart): what
                        // was sent meanwhile is gone, so every agent waits for a
                        // keyframe, asked for now rather than at the encoder's next one.
                        tracing::info!("the customer's media path is back");
                        self.shared.with_plane(Direction::Screen, |p| {
                            p.fanout.publisher_gap(Instant::now())
                        });
                    }
                    peer.connected = true;
                }
                self.subscribe(&pid);
                self.subscribe_share(&pid);
            }
            Event::Failed(PeerRef {
                participant: pid, ..
            }) => {
                let known = self.peers.get(&pid).is_some_and(|p| p.connected);
                if known {
                    tracing::info!(participant = %pid.as_str(), "peer connection lost");
                    self.close_peer(&pid).await;
                }
            }
            Event::DataChannel(peer, channel) => {
                self.on_data_channel(peer.participant, channel).await
            }
            Event::Track(peer, track) => self.on_track(peer.participant, track).await,
        }
    }

    /// Whether `peer` is the participant's current peer connection.
    fn is_current(&self, peer: &PeerRef) -> bool {
        self.peers
            .get(&peer.participant)
            .is_some_and(|p| p.generation == peer.generation)
    }

    /// The core's part of the recording: its start, roster changes, chat.
    fn on_record(&mut self, at: Instant, entry: RecordEntry) {
        let record = match entry {
            RecordEntry::Start { portal } => {
                if let Some(handle) = self
                    .shared
                    .inner
                    .recordings
                    .start(self.shared.id.as_str(), &portal)
                {
                    let _ = self.shared.recording.set(handle);
                }
                return;
            }
            RecordEntry::Roster(r) => Record::Roster(r),
            RecordEntry::Chat(c) => Record::Chat(c),
        };
        self.shared.record(at, record);
    }

    fn role_of(&self, pid: &ParticipantId) -> Option<Role> {
        lock(&self.shared.grants).get(pid).map(|g| g.0)
    }

    async fn refuse(&self, pid: &ParticipantId, code: ErrorCode, message: &str) {
        self.shared
            .tell(
                pid,
                ServerMsg::Error {
                    code,
                    message: message.to_owned(),
                    reference: None,
                },
            )
            .await;
    }

    /// Answers an offer, creating the participant's peer connection on its first one.
    async fn on_offer(&mut self, pid: ParticipantId, sdp: String) {
        let metrics = self.shared.inner.metrics.clone();
        let Some(role) = self.role_of(&pid) else {
            return;
        };
        // An offer from another peer connection (the participant came back: a reboot, a
        // new tab, a client that reconnected) replaces the old one, which may not have
        // noticed yet; a renegotiation or ICE restart of the same one keeps it.
        if let Some(peer) = self.peers.get(&pid) {
            let current = peer.pc.remote_description().await;
            let replaced = current
                .as_ref()
                .is_some_and(|c| peer::dtls_fingerprint(&c.sdp) != peer::dtls_fingerprint(&sdp));
            let restarts_ice = current
                .as_ref()
                .is_some_and(|c| !replaced && peer::ice_ufrag(&c.sdp) != peer::ice_ufrag(&sdp));
            if restarts_ice {
                // The client's network changed (or it lost its path): same connection,
                // fresh ICE credentials; the answer restarts ICE on the relay's side.
                tracing::info!(participant = %pid.as_str(), "ICE restart");
                metrics
                    .negotiations_total
                    .with_label_values(&["ice_restart"])
                    .inc();
            }
            if replaced {
                tracing::info!(participant = %pid.as_str(), "a new peer connection replaces the old one");
                metrics
                    .negotiations_total
                    .with_label_values(&["replaced"])
                    .inc();
                self.close_peer(&pid).await;
            }
        }
        if !self.peers.contains_key(&pid) {
            let Some((lease, addr)) = self.shared.inner.ports.acquire() else {
                metrics
                    .negotiations_total
                    .with_label_values(&["no_port"])
                    .inc();
                tracing::warn!("no free media port; offer refused");
                self.refuse(
                    &pid,
                    ErrorCode::Draining,
                    "this node has no free media port; try again shortly",
                )
                .await;
                return;
            };
            let gathered = Arc::new(Notify::new());
            self.next_generation += 1;
            let generation = self.next_generation;
            let handler = PeerEvents {
                peer: PeerRef {
                    participant: pid.clone(),
                    generation,
                },
                events: self.events.clone(),
                gathered: gathered.clone(),
            };
            match peer::build(&self.shared.inner.settings, addr, handler).await {
                Ok(pc) => {
                    metrics.peer_connections_active.inc();
                    self.peers.insert(
                        pid.clone(),
                        Peer {
                            role,
                            generation,
                            pc,
                            lease,
                            gathered,
                            negotiated: false,
                            connected: false,
                            tracks: Vec::new(),
                            subscriber: None,
                            share_out: share::ShareOut::default(),
                            share_in: None,
                            tasks: Vec::new(),
                        },
                    );
                }
                Err(e) => {
                    self.shared.inner.ports.release(lease);
                    tracing::error!(error = %e, "cannot create a peer connection");
                    self.refuse(&pid, ErrorCode::Internal, "cannot create a peer connection")
                        .await;
                    return;
                }
            }
        }
        match self.negotiate(&pid, sdp).await {
            Ok(answer) => {
                metrics.negotiations_total.with_label_values(&["ok"]).inc();
                self.shared
                    .tell(&pid, ServerMsg::Answer { sdp: answer })
                    .await;
                self.subscribe(&pid);
                self.subscribe_share(&pid);
            }
            Err(e) => {
                metrics
                    .negotiations_total
                    .with_label_values(&["bad_offer"])
                    .inc();
                tracing::info!(error = %e, "offer refused");
                self.refuse(
                    &pid,
                    ErrorCode::InvalidField,
                    &format!("offer refused: {e}"),
                )
                .await;
            }
        }
    }

    async fn negotiate(&mut self, pid: &ParticipantId, sdp: String) -> Result<String, String> {
        self.prepare_share_out(pid).await?;
        let published = self.published.clone();
        let peer = self.peers.get_mut(pid).ok_or("no peer connection")?;
        let offer = RTCSessionDescription::offer(sdp).map_err(|e| e.to_string())?;
        peer.pc
            .set_remote_description(offer)
            .await
            .map_err(|e| e.to_string())?;
        if peer.role != Role::Customer {
            for p in &published {
                if peer.tracks.iter().any(|t| t.kind == p.kind) {
                    continue;
                }
                let (track, ssrc) = relay_track(p.kind, p.kind.as_str(), &p.codec);
                let sender = peer
                    .pc
                    .add_track(track.clone() as Arc<dyn TrackLocal>)
                    .await
                    .map_err(|e| format!("cannot add the {} track: {e}", p.kind.as_str()))?;
                peer.tracks.push(LocalTrack {
                    kind: p.kind,
                    mime: p.codec.mime_type.clone(),
                    ssrc,
                    track,
                    sender,
                });
            }
        }
        let answer = peer
            .pc
            .create_answer(None)
            .await
            .map_err(|e| e.to_string())?;
        peer.pc
            .set_local_description(answer)
            .await
            .map_err(|e| e.to_string())?;
        if !peer.negotiated {
            // The first answer carries every candidate: the relay gathers host
            // candidates only, which takes no network round trip.
            let _ = tokio::time::timeout(GATHER_TIMEOUT, peer.gathered.notified()).await;
            peer.negotiated = true;
        }
        let local = peer
            .pc
            .local_description()
            .await
            .ok_or("no local description")?;
        self.confirm_share_out(pid).await;
        Ok(self.shared.inner.settings.advertised_sdp(local.sdp))
    }

    /// Starts forwarding to an agent once its connection is up and carries tracks.
    fn subscribe(&mut self, pid: &ParticipantId) {
        let Some(peer) = self.peers.get_mut(pid) else {
            return;
        };
        if peer.role == Role::Customer
            || !peer.connected
            || peer.tracks.is_empty()
            || peer.subscriber.is_some()
        {
            return;
        }
        let id = start_subscriber(
            &self.shared,
            &mut self.next_subscriber,
            Direction::Screen,
            pid,
            peer.tracks.clone(),
            &mut peer.tasks,
        );
        peer.subscriber = Some(id);
        tracing::debug!(participant = %pid.as_str(), "agent receives media");
    }

    async fn on_data_channel(&mut self, pid: ParticipantId, channel: Arc<dyn DataChannel>) {
        let Some(peer) = self.peers.get_mut(&pid) else {
            return;
        };
        let label = channel.label().await.unwrap_or_default();
        match label.as_str() {
            INPUT_LABEL => {}
            CHAT_LABEL => {
                let reader = chat::open(self.shared.clone(), pid.clone(), channel).await;
                match self.peers.get_mut(&pid) {
                    Some(peer) => peer.tasks.push(reader),
                    None => {
                        reader.abort();
                        chat::release(&self.shared, &pid, None).await;
                    }
                }
                return;
            }
            FILES_LABEL => {
                peer.tasks.extend(files::open(&self.shared, &pid, channel));
                return;
            }
            _ => {
                tracing::debug!(%label, "ignoring a data channel");
                return;
            }
        }
        if peer.role == Role::Customer {
            *lock(&self.shared.customer_input) = Some(channel.clone());
            // The relay only sends on the customer's `input` channel, but its events
            // (one per message sent) must still be read: the `webrtc` crate keeps every
            // event nobody reads, which grew the node's memory with every input event
            // delivered (bench/RESULTS.md, the 30-minute soak).
            peer.tasks.push(tokio::spawn(async move {
                while let Some(event) = channel.poll().await {
                    if let DataChannelEvent::OnMessage(_) = event {
                        tracing::debug!("the customer sent on its input channel; ignored");
                    }
                }
            }));
        } else {
            peer.tasks
                .push(tokio::spawn(read_input(self.shared.clone(), pid, channel)));
        }
    }

    async fn on_track(&mut self, pid: ParticipantId, track: Arc<dyn TrackRemote>) {
        if self.customer.as_ref() != Some(&pid) {
            return self.on_share_track(pid, track).await;
        }
        let Some(&ssrc) = track.ssrcs().await.first() else {
            return;
        };
        let Some(codec) = track.codec(ssrc).await else {
            return;
        };
        let kind = match track.kind().await {
            RtpCodecKind::Audio => MediaKind::Audio,
            _ => MediaKind::Video,
        };
        let video_codec = VideoCodec::from_mime(&codec.mime_type);
        if kind == MediaKind::Video {
            if video_codec.is_none() {
                tracing::warn!(mime = %codec.mime_type, "unsupported video codec");
                return;
            }
            *lock(&self.shared.screen.publisher_video) = Some((track.clone(), ssrc));
        }
        tracing::info!(kind = kind.as_str(), mime = %codec.mime_type, "customer publishes");
        if kind == MediaKind::Video && std::mem::take(&mut self.customer_away) {
            self.shared.record(
                Instant::now(),
                Record::Gap(GapRecord {
                    kind: GapKind::CustomerReturned,
                    dropped: 0,
                }),
            );
        }
        self.published.retain(|p| p.kind != kind);
        self.published.push(Published {
            kind,
            codec: codec.clone(),
        });
        if let Some(peer) = self.peers.get_mut(&pid) {
            peer.tasks.push(tokio::spawn(read_publisher(
                self.shared.clone(),
                Direction::Screen,
                track,
                kind,
                video_codec,
            )));
        }
        if kind == MediaKind::Video {
            // Every agent waits for a keyframe of the new stream, which is requested now.
            self.shared.with_plane(Direction::Screen, |p| {
                p.fanout.set_publisher(Instant::now(), true)
            });
            self.shared.input_gap.store(false, Ordering::Relaxed);
        }
        // A customer that came back with another codec (a new browser, another
        // encoder): agents' tracks of the old codec go, and they renegotiate.
        self.drop_tracks_of_another_codec(kind, &codec.mime_type)
            .await;
        // Agents whose connection lacks this track renegotiate to get it.
        let stale: Vec<ParticipantId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.role != Role::Customer && !p.tracks.iter().any(|t| t.kind == kind))
            .map(|(id, _)| id.clone())
            .collect();
        for agent in stale {
            self.shared.tell(&agent, ServerMsg::Renegotiate {}).await;
        }
    }

    /// Removes every agent's local track of `kind` whose codec is not `mime` (the relay
    /// never transcodes, so such a track cannot carry the new stream), and stops that
    /// agent's subscriber; the renegotiation that follows adds a track of the new codec
    /// and subscribes the agent again (see [`Self::on_offer`]).
    async fn drop_tracks_of_another_codec(&mut self, kind: MediaKind, mime: &str) {
        for (pid, peer) in self.peers.iter_mut() {
            if peer.role == Role::Customer {
                continue;
            }
            let (stale, kept): (Vec<LocalTrack>, Vec<LocalTrack>) = peer
                .tracks
                .drain(..)
                .partition(|t| t.kind == kind && !t.mime.eq_ignore_ascii_case(mime));
            peer.tracks = kept;
            if stale.is_empty() {
                continue;
            }
            tracing::info!(participant = %pid.as_str(), from = %stale[0].mime, to = %mime, "the customer's codec changed");
            if let Some(id) = peer.subscriber.take() {
                self.shared.with_plane(Direction::Screen, |p| {
                    p.sinks.remove(&id);
                    p.fanout.remove_subscriber(id);
                });
            }
            for t in stale {
                if let Err(e) = peer.pc.remove_track(&t.sender).await {
                    tracing::warn!(error = %e, "cannot remove a track of the old codec");
                }
            }
        }
    }

    async fn close_peer(&mut self, pid: &ParticipantId) {
        let Some(peer) = self.peers.remove(pid) else {
            return;
        };
        // Its data channels go with it: chat back to its WebSocket, transfers cancelled.
        chat::release(&self.shared, pid, None).await;
        files::release(&self.shared, pid, None);
        self.release_share(pid, &peer).await;
        if let Some(id) = peer.subscriber {
            self.shared.with_plane(Direction::Screen, |p| {
                p.sinks.remove(&id);
                p.fanout.remove_subscriber(id);
            });
        }
        if peer.subscriber.is_some() || peer.share_out.subscriber.is_some() {
            let _ = self
                .shared
                .inner
                .metrics
                .agent_queue_depth
                .remove_label_values(&[self.shared.id.as_str(), pid.as_str()]);
        }
        if peer.role == Role::Customer {
            if !self.published.is_empty() {
                self.shared.record(
                    Instant::now(),
                    Record::Gap(GapRecord {
                        kind: GapKind::CustomerReconnecting,
                        dropped: 0,
                    }),
                );
                self.customer_away = true;
            }
            *lock(&self.shared.customer_input) = None;
            self.shared.input_gap.store(true, Ordering::Relaxed);
            *lock(&self.shared.screen.publisher_video) = None;
            self.published.clear();
            self.shared.with_plane(Direction::Screen, |p| {
                p.fanout.set_publisher(Instant::now(), false)
            });
        }
        for task in &peer.tasks {
            task.abort();
        }
        let _ = peer.pc.close().await;
        self.shared.inner.ports.release(peer.lease);
        self.shared.inner.metrics.peer_connections_active.dec();
    }
}

/// A local track of the relay towards one participant, with a fresh SSRC, carrying
/// `codec` (the publisher's: the relay never transcodes).
fn relay_track(
    kind: MediaKind,
    name: &str,
    codec: &RTCRtpCodec,
) -> (Arc<TrackLocalStaticRTP>, u32) {
    let ssrc = rand::random::<u32>();
    let rtp_kind = match kind {
        MediaKind::Video => RtpCodecKind::Video,
        MediaKind::Audio => RtpCodecKind::Audio,
    };
    let name = format!("relay-{name}");
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "relay".to_owned(),
        name.clone(),
        name,
        rtp_kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        }],
    )));
    (track, ssrc)
}

/// An agent's input events: checked against its budget (`rate_limits.input`) and its
/// permission, one by one, and forwarded unchanged to the customer. An event over the
/// budget is dropped before anything else is done with it (not recorded, not
/// forwarded), so a flooding agent cannot crowd the customer's `input` channel, which
/// every agent shares, nor the recording; the agent is told at most once a second.
async fn read_input(shared: Arc<Shared>, pid: ParticipantId, channel: Arc<dyn DataChannel>) {
    let metrics = shared.inner.metrics.clone();
    let mut budget = TokenBucket::new(shared.inner.settings.input_rate);
    let mut over_budget = RefusalNotice::default();
    let count = |outcome: &str| {
        metrics
            .input_events_total
            .with_label_values(&[outcome])
            .inc()
    };
    let mut last_warning: Option<Instant> = None;
    while let Some(event) = channel.poll().await {
        let DataChannelEvent::OnMessage(msg) = event else {
            continue;
        };
        let at = Instant::now();
        if !budget.try_take(at) {
            count("rate_limited");
            metrics.rate_limited(MessageClass::Input);
            if over_budget.due(at) {
                let limit = shared.inner.settings.input_rate;
                let message = format!(
                    "too many input events: at most {} at once and {} per second; \
                     the rest are dropped",
                    limit.burst, limit.per_second
                );
                shared
                    .tell(
                        &pid,
                        ServerMsg::Error {
                            code: ErrorCode::RateLimited,
                            message,
                            reference: None,
                        },
                    )
                    .await;
            }
            continue;
        }
        let record = |outcome, event: Bytes| {
            shared.record(
                at,
                Record::Input(InputRecord {
                    participant_id: pid.as_str().to_owned(),
                    outcome,
                    event,
                }),
            )
        };
        if msg.is_string || relay_codec::input::decode(&msg.data).is_err() {
            count("malformed");
            let mut bad = msg.data;
            bad.truncate(MAX_RECORDED_MALFORMED_INPUT);
            record(InputOutcome::Malformed, bad.freeze());
            continue;
        }
        let grant = lock(&shared.grants).get(&pid).copied();
        let allowed = matches!(grant, Some((Role::Host | Role::Agent, Permission::Control)));
        if !allowed {
            count("refused_view_only");
            record(InputOutcome::RefusedViewOnly, msg.data.freeze());
            if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                last_warning = Some(Instant::now());
                shared
                    .tell(
                        &pid,
                        ServerMsg::Error {
                            code: ErrorCode::Forbidden,
                            message: "you have view-only permission: your input is not delivered"
                                .to_owned(),
                            reference: None,
                        },
                    )
                    .await;
            }
            continue;
        }
        if shared.input_gap.load(Ordering::Relaxed) {
            // The customer is away or has not published again since it came back:
            // dropped, not replayed when it returns.
            count("customer_away");
            continue;
        }
        let customer = lock(&shared.customer_input).clone();
        let Some(customer) = customer else {
            count("no_customer");
            continue;
        };
        let mut data: BytesMut = msg.data;
        // As the agent sent it (its own sequence number), before the relay renumbers it.
        let received = Bytes::copy_from_slice(&data);
        let seq = shared.input_seq.fetch_add(1, Ordering::Relaxed);
        data[relay_codec::input::SEQ_RANGE].copy_from_slice(&seq.to_le_bytes());
        match customer.send(data).await {
            Ok(()) => {
                count("delivered");
                record(InputOutcome::Delivered, received);
            }
            Err(_) => count("no_customer"),
        }
    }
}

/// Starts a subscriber of `direction`'s fan-out for `pid`, sending on `tracks`: its
/// bounded queue (`media.agent_queue_packets`), its writer task and one RTCP feedback
/// reader per track (both pushed to `tasks`, which end with the peer), then adds it to
/// the fan-out.
fn start_subscriber(
    shared: &Arc<Shared>,
    next_subscriber: &mut u64,
    direction: Direction,
    pid: &ParticipantId,
    tracks: Vec<LocalTrack>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> SubscriberId {
    let id = SubscriberId(*next_subscriber);
    *next_subscriber += 1;
    let (tx, rx) = mpsc::channel(shared.inner.settings.agent_queue_packets);
    for t in &tracks {
        tasks.push(tokio::spawn(read_feedback(
            shared.clone(),
            direction,
            id,
            t.track.clone(),
        )));
    }
    let gauge = shared
        .inner
        .metrics
        .agent_queue_depth
        .with_label_values(&[shared.id.as_str(), pid.as_str()]);
    tasks.push(tokio::spawn(write_subscriber(
        shared.clone(),
        rx,
        tracks,
        gauge,
    )));
    shared.with_plane(direction, |p| {
        p.sinks.insert(id, tx);
        p.fanout.add_subscriber(Instant::now(), id);
    });
    id
}
