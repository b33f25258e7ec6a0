//! The agent (host, invited agent or supervisor): receives the customer's screen,
//! sends input events on its `input` data channel, may show its own screen to the
//! customer ([`Agent::start_share`]), and chats and exchanges files on its `chat` and
//! `files` channels.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use relay_codec::input::{InputEvent, encode_to_vec};
use relay_codec::wire::{ClientMsg, ServerMsg};
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{MediaEngine, PeerConnection, RTCPeerConnectionState};

use super::channels::{CHAT_LABEL, ChatChannel, FILES_LABEL, FileTransfers};
use super::codec::VideoCodec;
use super::peer::IceTransport;
use super::peer::{
    self, DataChannelMessage, NegotiationStats, OTHER_MESSAGES_QUEUE, PeerShared, lock,
};
use super::publish::{
    KeyframeRequest, PublishRecords, Publisher, SentFrame, publish, video_track,
    watch_keyframe_requests,
};
use super::receive::{ReceiveStats, ReceivedFrame, Receiver};
use super::route::MediaRoute;
use super::rtcp::with_keyframe_request_marker;
use super::signalling::{Signalling, SignallingSender, SignallingTasks, Transcript, Welcome};
use super::source::FrameSource;
use super::{ClientError, INPUT_LABEL};

/// How an [`Agent`] connects.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Local UDP address for the peer connection (one host candidate).
    pub bind: SocketAddr,
    /// How long to wait for the relay's `welcome`.
    pub welcome_timeout: Duration,
    /// Accept every file offered on the `files` channel at once.
    pub auto_accept_files: bool,
    /// Frames per second of a screen share ([`Agent::start_share`]).
    pub share_fps: f64,
    /// Maps the candidate addresses exchanged with the relay, to put something between
    /// the two (a test's impairing proxy); `None`: direct.
    pub route: Option<Arc<dyn MediaRoute>>,
    /// Restart ICE by itself when the media path drops after it was up (a network
    /// change, a blip), as a browser client does; on by default.
    pub auto_ice_restart: bool,
    /// The transports ICE may use: [`IceTransport::Tcp`] acts as a client behind a UDP
    /// block (the relay needs `media.ice_tcp_port`).
    pub ice_transport: IceTransport,
}

impl Default for AgentOptions {
    /// `127.0.0.1:0`, 10 s, offers wait for an answer, shares at 15 fps.
    fn default() -> Self {
        AgentOptions {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            welcome_timeout: Duration::from_secs(10),
            auto_accept_files: false,
            share_fps: 15.0,
            route: None,
            auto_ice_restart: true,
            ice_transport: IceTransport::Any,
        }
    }
}

/// How long [`Agent::start_share`] waits for the relay's verdict and the renegotiation.
const SHARE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's screen share: the track (added once, kept for later shares) and the
/// task publishing on it.
#[derive(Default)]
struct ShareState {
    track: Option<ShareTrack>,
    publisher: Option<JoinHandle<()>>,
}

struct ShareTrack {
    track: Arc<TrackLocalStaticSample>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    ssrc: u32,
    codec: VideoCodec,
    keyframe_wanted: Arc<AtomicBool>,
    watcher: JoinHandle<()>,
}

/// An agent (or supervisor) connected to a session: one peer connection with a
/// `recvonly` video transceiver and the `input` data channel.
///
/// [`Agent::connect`] reads `welcome`, offers (video codecs VP8, VP9, H.264, AV1 and
/// the rest of `register_default_codecs`) and returns; answers, candidates and
/// `renegotiate` (a new offer on the same connection) are handled in the background.
/// The screen track's RTP is reassembled into frames with the rtc crate's
/// `SampleBuilder` and the depacketizer of the packet's payload type (which indexes
/// packets by sequence number in two 65 536-entry arrays: about 12 MB per track).
pub struct Agent {
    welcome: Welcome,
    pc: Arc<dyn PeerConnection>,
    shared: Arc<PeerShared>,
    signal: SignallingSender,
    transcript: Transcript,
    state: watch::Receiver<RTCPeerConnectionState>,
    input: Arc<dyn DataChannel>,
    input_open: watch::Receiver<bool>,
    messages: Arc<Mutex<Vec<DataChannelMessage>>>,
    receive: Receiver,
    others: tokio::sync::Mutex<mpsc::Receiver<ServerMsg>>,
    chat: Arc<ChatChannel>,
    files: Arc<FileTransfers>,
    share: tokio::sync::Mutex<ShareState>,
    shared_frames: Arc<Mutex<PublishRecords>>,
    share_fps: f64,
    next_request_id: AtomicU64,
    tasks: Vec<JoinHandle<()>>,
    _signalling: SignallingTasks,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.receive.abort();
        let share = self.share.get_mut();
        if let Some(task) = &share.publisher {
            task.abort();
        }
        if let Some(t) = &share.track {
            t.watcher.abort();
        }
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("participant_id", &self.welcome.you.participant_id)
            .field("state", &*self.state.borrow())
            .field("frames", &self.frames_received())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Connects to the session WebSocket `ws_url` (from the session's credentials) and
    /// starts negotiating; see the type's documentation.
    pub async fn connect(
        ws_url: &str,
        tls: Arc<rustls::ClientConfig>,
        options: AgentOptions,
    ) -> Result<Self, ClientError> {
        let mut signalling = Signalling::connect(ws_url, tls).await?;
        let welcome = signalling.welcome(options.welcome_timeout).await?;
        let (signal, incoming, transcript, signalling_tasks) = signalling.into_parts();

        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        // Keyframe requests for its screen share reach the application.
        let registry = with_keyframe_request_marker(registry);

        let receive = Receiver::new();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let on_track = {
            let receive = receive.clone();
            move |track: Arc<dyn TrackRemote>| receive.on_track(track)
        };
        let on_data_channel = {
            let messages = Arc::clone(&messages);
            move |dc| {
                tokio::spawn(peer::record_data_channel(
                    dc,
                    Arc::clone(&messages),
                    None,
                    |_| std::future::ready(()),
                ));
            }
        };
        let shared = Arc::new(
            PeerShared::new(
                signal.clone(),
                state_tx,
                Some(Box::new(on_track)),
                Box::new(on_data_channel),
            )
            .with_media_path(options.route.clone(), options.auto_ice_restart)
            .with_ice_transport(options.ice_transport),
        );
        let pc =
            peer::build_peer_connection(options.bind, media_engine, registry, Arc::clone(&shared))
                .await?;
        pc.add_transceiver_from_kind(
            RtpCodecKind::Video,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            }),
        )
        .await?;
        let input = pc.create_data_channel(INPUT_LABEL, None).await?;
        let (chat, chat_reader) = ChatChannel::new(
            pc.create_data_channel(CHAT_LABEL, None).await?,
            Arc::clone(&messages),
        );
        let (files, files_reader) = FileTransfers::new(
            pc.create_data_channel(FILES_LABEL, None).await?,
            Arc::clone(&messages),
            options.auto_accept_files,
        );

        let (open_tx, input_open) = watch::channel(false);
        let (others_tx, others_rx) = mpsc::channel(OTHER_MESSAGES_QUEUE);
        let tasks = vec![
            tokio::spawn(chat_reader),
            tokio::spawn(files_reader),
            tokio::spawn(peer::record_data_channel(
                Arc::clone(&input),
                Arc::clone(&messages),
                Some(open_tx),
                |_| std::future::ready(()),
            )),
            tokio::spawn(peer::run_negotiation(
                Arc::clone(&pc),
                Arc::clone(&shared),
                incoming,
                others_tx,
                {
                    let receive = receive.clone();
                    move |sdp: &str| receive.set_payload_types(sdp)
                },
            )),
        ];

        Ok(Agent {
            welcome,
            pc,
            shared,
            signal,
            transcript,
            state,
            input,
            input_open,
            messages,
            receive,
            others: tokio::sync::Mutex::new(others_rx),
            chat,
            files,
            share: tokio::sync::Mutex::new(ShareState::default()),
            shared_frames: Arc::new(Mutex::new(PublishRecords::default())),
            share_fps: options.share_fps,
            next_request_id: AtomicU64::new(1),
            tasks,
            _signalling: signalling_tasks,
        })
    }

    /// The relay's `welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The URL that resumes this participant after this client is gone (a crash, a
    /// reboot, a network change): its session WebSocket URL with the single-use resume
    /// token of this connection's `welcome`. Pass it to [`Agent::connect`].
    pub fn resume_url(&self) -> Option<&str> {
        self.welcome.resume_url.as_deref()
    }

    /// The peer connection, for statistics and anything this type does not cover.
    pub fn peer_connection(&self) -> &Arc<dyn PeerConnection> {
        &self.pc
    }

    /// Waits until the peer connection is connected (ICE and DTLS done).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), ClientError> {
        peer::wait_connected(self.state.clone(), timeout).await
    }

    /// Waits until the `input` data channel is open.
    pub async fn wait_input_open(&self, timeout: Duration) -> Result<(), ClientError> {
        peer::wait_open(self.input_open.clone(), timeout, "the input data channel").await
    }

    /// The peer connection's state now.
    pub fn connection_state(&self) -> RTCPeerConnectionState {
        *self.state.borrow()
    }

    /// Restarts ICE on the same peer connection (fresh credentials offered over the
    /// session socket; the relay answers on its side of the same connection): what a
    /// client does when its network changes. Returns once the offer is queued; wait with
    /// `wait_connected` or for frames.
    pub fn restart_ice(&self) {
        self.shared.ice_restart.notify_one();
    }

    /// Encodes `event` with `relay_codec::input` and sends it on the `input` channel.
    pub async fn send_input(&self, event: &InputEvent) -> Result<(), ClientError> {
        let bytes = encode_to_vec(event)?;
        self.send_input_raw(&bytes).await
    }

    /// Sends bytes as they are on the `input` channel (malformed events included).
    pub async fn send_input_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.input.send(BytesMut::from(bytes)).await?;
        Ok(())
    }

    /// Stops reading the screen track, as an agent that stops consuming: the
    /// connection's driver keeps reading the socket, queues 256 packets for the track
    /// and drops the rest (so RTCP receiver reports and NACKs see no loss).
    pub fn pause(&self) {
        self.receive.pause(true);
    }

    /// Reads the screen track again. If the packets queued before the pause are
    /// followed by a jump in sequence numbers (packets dropped while paused), the agent
    /// restarts frame assembly and sends a PLI.
    pub fn resume(&self) {
        self.receive.pause(false);
    }

    /// Whether the agent is paused.
    pub fn is_paused(&self) -> bool {
        self.receive.is_paused()
    }

    /// Sends a PLI for the screen track now. Fails when no track arrived yet.
    pub async fn request_keyframe(&self) -> Result<(), ClientError> {
        self.receive.request_keyframe().await
    }

    /// Every complete frame received so far, in order.
    pub fn frames(&self) -> Vec<ReceivedFrame> {
        self.receive.frames()
    }

    /// How many complete frames were received.
    pub fn frames_received(&self) -> usize {
        self.receive.frames_received()
    }

    /// Waits until at least `n` frames were received in total.
    pub async fn wait_frames(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        self.receive.wait_frames(n, timeout).await
    }

    /// Counters of the receive path.
    pub fn receive_stats(&self) -> ReceiveStats {
        self.receive.stats()
    }

    /// Offer/answer counters and errors.
    pub fn negotiation(&self) -> NegotiationStats {
        lock(&self.shared.stats).clone()
    }

    /// Every data-channel message received, raw, on any channel (for leak checks: the
    /// relay sends agents nothing on `input`).
    pub fn data_channel_messages(&self) -> Vec<DataChannelMessage> {
        lock(&self.messages).clone()
    }

    /// The `chat` data channel: send chat there, read what the relay delivers there.
    pub fn chat(&self) -> &Arc<ChatChannel> {
        &self.chat
    }

    /// The `files` data channel: offer files to the customer, answer its offers, read
    /// received files.
    pub fn files(&self) -> &Arc<FileTransfers> {
        &self.files
    }

    /// Every text frame the relay sent on the session WebSocket.
    pub fn transcript(&self) -> Transcript {
        self.transcript.clone()
    }

    /// Sends a message on the session WebSocket (chat, leave, ping).
    pub async fn send(&self, msg: &ClientMsg) -> Result<(), ClientError> {
        self.signal.send(msg).await
    }

    /// The next message from the relay that is not part of media negotiation, within
    /// `timeout`.
    pub async fn next_message(&self, timeout: Duration) -> Result<ServerMsg, ClientError> {
        let mut others = self.others.lock().await;
        match tokio::time::timeout(timeout, others.recv()).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(ClientError::SignallingClosed),
            Err(_) => Err(ClientError::Timeout("a relay message")),
        }
    }

    /// Shows the agent's own screen (frames of `source`) to the customer: asks the relay
    /// (`share_start`), and once it agrees, adds a `sendonly` video track (the first
    /// time; later shares reuse it, in the same codec) and re-offers, then publishes at
    /// [`AgentOptions::share_fps`], answering keyframe requests like the customer.
    /// Fails with [`ClientError::Refused`] (`forbidden`, `share_busy`) if the relay
    /// says no; nothing is published then.
    pub async fn start_share(&self, source: FrameSource) -> Result<(), ClientError> {
        let mut share = self.share.lock().await;
        if share.publisher.is_some() {
            return Err(ClientError::Protocol("already sharing".into()));
        }
        let codec = source.codec();
        if share.track.as_ref().is_some_and(|t| t.codec != codec) {
            return Err(ClientError::Protocol(format!(
                "this connection shares in {:?}; a share in another codec needs a new one",
                share.track.as_ref().map(|t| t.codec)
            )));
        }
        self.ask_to_share().await?;
        if share.track.is_none() {
            share.track = Some(self.add_share_track(codec).await?);
        }
        let Some(t) = &share.track else {
            return Err(ClientError::Protocol("no share track".into()));
        };
        share.publisher = Some(tokio::spawn(publish(Publisher {
            track: Arc::clone(&t.track),
            sender: Arc::clone(&t.sender),
            ssrc: t.ssrc,
            source,
            fps: self.share_fps,
            state: self.state.clone(),
            records: Arc::clone(&self.shared_frames),
            keyframe_wanted: Arc::clone(&t.keyframe_wanted),
            publishing: Arc::new(AtomicBool::new(true)),
            padding: Default::default(),
        })));
        Ok(())
    }

    /// Stops showing the screen: no more frames, and `share_stop` to the relay. The
    /// track stays on the connection for a later [`Agent::start_share`].
    pub async fn stop_share(&self) -> Result<(), ClientError> {
        let mut share = self.share.lock().await;
        if let Some(task) = share.publisher.take() {
            task.abort();
        }
        self.signal.send(&ClientMsg::ShareStop {}).await
    }

    /// Every frame of the agent's screen shares handed to its track so far.
    pub fn shared_frames(&self) -> Vec<SentFrame> {
        lock(&self.shared_frames).sent.clone()
    }

    /// Keyframe requests (PLI/FIR) the relay sent for the agent's screen share.
    pub fn share_keyframe_requests(&self) -> Vec<KeyframeRequest> {
        lock(&self.shared_frames).keyframe_requests.clone()
    }

    /// Sends `share_start` and waits for the relay's `agent_share` naming this agent,
    /// or the `error` answering it.
    async fn ask_to_share(&self) -> Result<(), ClientError> {
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let mark = self.transcript.len();
        self.signal
            .send_with_id(&ClientMsg::ShareStart {}, id)
            .await?;
        let me = self.welcome.you.participant_id.clone();
        let deadline = Instant::now() + SHARE_TIMEOUT;
        loop {
            for msg in self.transcript.messages().into_iter().skip(mark) {
                match msg {
                    ServerMsg::AgentShare {
                        active: true,
                        by: Some(by),
                    } if by == me => return Ok(()),
                    ServerMsg::Error {
                        code,
                        message,
                        reference: Some(r),
                    } if r == id => return Err(ClientError::Refused { code, message }),
                    _ => {}
                }
            }
            if Instant::now() > deadline {
                return Err(ClientError::Timeout("the relay's answer to share_start"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Adds the `sendonly` share track and re-offers; returns once the relay's answer
    /// made it send.
    async fn add_share_track(&self, codec: VideoCodec) -> Result<ShareTrack, ClientError> {
        let ssrc = rand::random::<u32>();
        let track = video_track("agent-screen", codec, ssrc)?;
        // Its own transceiver: `add_track` would take the `recvonly` one of the
        // customer's screen.
        let transceiver = self
            .pc
            .add_transceiver_from_track(
                Arc::clone(&track) as Arc<dyn TrackLocal>,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Sendonly,
                    ..Default::default()
                }),
            )
            .await?;
        let sender = transceiver
            .sender()
            .await?
            .ok_or_else(|| ClientError::Protocol("the share transceiver has no sender".into()))?;
        let keyframe_wanted = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn(watch_keyframe_requests(
            Arc::clone(&track),
            Arc::clone(&self.shared_frames),
            Arc::clone(&keyframe_wanted),
        ));
        self.shared.renegotiate.notify_one();
        let deadline = Instant::now() + SHARE_TIMEOUT;
        while transceiver.current_direction().await? != RTCRtpTransceiverDirection::Sendonly {
            if Instant::now() > deadline {
                watcher.abort();
                return Err(ClientError::Timeout(
                    "the relay's answer for the share track",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(ShareTrack {
            track,
            sender,
            ssrc,
            codec,
            keyframe_wanted,
            watcher,
        })
    }

    /// Closes the peer connection and the WebSocket (without `leave`).
    pub async fn close(self) -> Result<(), ClientError> {
        let closed = self.pc.close().await;
        let _ = self.signal.close().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        closed.map_err(ClientError::from)
    }
}
