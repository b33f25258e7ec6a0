//! The customer: shares its screen (frames from a [`FrameSource`]) with the relay,
//! receives agents' input events on its `input` data channel, an agent's screen share
//! (through the same receive path as an agent's), and chats and exchanges files on its
//! `chat` and `files` channels.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_codec::input::{InputError, InputEvent, decode};
use relay_codec::wire::{ClientMsg, ServerMsg};
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{MediaEngine, PeerConnection, RTCPeerConnectionState};

use super::channels::{CHAT_LABEL, ChatChannel, FILES_LABEL, FileTransfers};
use super::codec::{ClientCodec, VideoCodec};
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

/// How a [`Customer`] connects and publishes.
#[derive(Debug, Clone)]
pub struct CustomerOptions {
    /// Frames per second to publish.
    pub fps: f64,
    /// Local UDP address for the peer connection (one host candidate).
    pub bind: SocketAddr,
    /// How long to wait for the relay's `welcome`.
    pub welcome_timeout: Duration,
    /// Accept every file offered on the `files` channel at once.
    pub auto_accept_files: bool,
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

impl Default for CustomerOptions {
    /// 15 fps, `127.0.0.1:0`, 10 s, offers wait for an answer.
    fn default() -> Self {
        CustomerOptions {
            fps: 15.0,
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            welcome_timeout: Duration::from_secs(10),
            auto_accept_files: false,
            route: None,
            auto_ice_restart: true,
            ice_transport: IceTransport::Any,
        }
    }
}

/// An input event that arrived on the customer's `input` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedInput {
    /// The decoded event, or why the bytes are not one.
    pub event: Result<InputEvent, InputError>,
    /// When it arrived.
    pub received_at: Instant,
}

#[derive(Default)]
struct Records {
    inputs: Vec<ReceivedInput>,
}

/// A customer connected to a session: one peer connection carrying one `sendonly`
/// video track and the `input`, `chat` and `files` data channels.
///
/// [`Customer::connect`] reads `welcome`, builds the peer connection (the source's codec
/// only), sends the offer and returns; the answer and candidates are applied in the
/// background. Once the connection is up the source's frames are published at
/// [`CustomerOptions::fps`]. A keyframe request from the relay makes the next frame
/// the source's next keyframe. Everything sent and received is recorded; dropping the
/// customer stops it (call [`Customer::close`] to leave cleanly).
pub struct Customer {
    welcome: Welcome,
    codec: VideoCodec,
    pc: Arc<dyn PeerConnection>,
    shared: Arc<PeerShared>,
    signal: SignallingSender,
    transcript: Transcript,
    state: watch::Receiver<RTCPeerConnectionState>,
    input_open: watch::Receiver<bool>,
    records: Arc<Mutex<Records>>,
    published: Arc<Mutex<PublishRecords>>,
    share: Receiver,
    messages: Arc<Mutex<Vec<DataChannelMessage>>>,
    others: tokio::sync::Mutex<mpsc::Receiver<ServerMsg>>,
    publishing: Arc<AtomicBool>,
    padding: Arc<AtomicUsize>,
    chat: Arc<ChatChannel>,
    files: Arc<FileTransfers>,
    tasks: Vec<JoinHandle<()>>,
    _signalling: SignallingTasks,
}

impl Drop for Customer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.share.abort();
    }
}

impl std::fmt::Debug for Customer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Customer")
            .field("participant_id", &self.welcome.you.participant_id)
            .field("codec", &self.codec)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Customer {
    /// Connects to the session WebSocket `ws_url` (from `POST /v1/join`) and starts
    /// negotiating; see the type's documentation.
    pub async fn connect(
        ws_url: &str,
        tls: Arc<rustls::ClientConfig>,
        source: FrameSource,
        options: CustomerOptions,
    ) -> Result<Self, ClientError> {
        if !(options.fps.is_finite() && options.fps > 0.0) {
            return Err(ClientError::Protocol(format!("bad fps {}", options.fps)));
        }
        let mut signalling = Signalling::connect(ws_url, tls).await?;
        let welcome = signalling.welcome(options.welcome_timeout).await?;
        let (signal, incoming, transcript, signalling_tasks) = signalling.into_parts();

        let codec = source.codec();
        let mut media_engine = MediaEngine::default();
        media_engine.register_codec(codec.rtp_codec_parameters(), RtpCodecKind::Video)?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)?;
        let registry = with_keyframe_request_marker(registry);

        let messages = Arc::new(Mutex::new(Vec::new()));
        let records = Arc::new(Mutex::new(Records::default()));
        let published = Arc::new(Mutex::new(PublishRecords::default()));
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let on_data_channel = {
            // Channels the relay opens are recorded too: nothing should arrive there.
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
        // An agent's screen share arrives as a remote track once the customer has
        // added a `recvonly` transceiver (on the relay's first `renegotiate`).
        let share = Receiver::new();
        let on_track = {
            let share = share.clone();
            move |track: Arc<dyn TrackRemote>| share.on_track(track)
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
        shared
            .recv_video_on_renegotiate
            .store(true, Ordering::Relaxed);
        let pc =
            peer::build_peer_connection(options.bind, media_engine, registry, Arc::clone(&shared))
                .await?;

        let ssrc = rand::random::<u32>();
        let track = video_track("screen", codec, ssrc)?;
        // add_track binds the track at once, so its RTCP feedback can be polled from now.
        let sender = pc
            .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
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

        let keyframe_wanted = Arc::new(AtomicBool::new(false));
        let publishing = Arc::new(AtomicBool::new(true));
        let padding = Arc::new(AtomicUsize::new(0));
        let (open_tx, input_open) = watch::channel(false);
        let (others_tx, others_rx) = mpsc::channel(OTHER_MESSAGES_QUEUE);

        let mut tasks = vec![tokio::spawn(chat_reader), tokio::spawn(files_reader)];
        tasks.push(tokio::spawn(watch_keyframe_requests(
            Arc::clone(&track),
            Arc::clone(&published),
            Arc::clone(&keyframe_wanted),
        )));
        tasks.push(tokio::spawn({
            let records = Arc::clone(&records);
            peer::record_data_channel(input, Arc::clone(&messages), Some(open_tx), move |msg| {
                lock(&records).inputs.push(ReceivedInput {
                    event: decode(&msg.data),
                    received_at: msg.received_at,
                });
                std::future::ready(())
            })
        }));
        tasks.push(tokio::spawn(peer::run_negotiation(
            Arc::clone(&pc),
            Arc::clone(&shared),
            incoming,
            others_tx,
            {
                let share = share.clone();
                move |sdp: &str| share.set_payload_types(sdp)
            },
        )));
        tasks.push(tokio::spawn(publish(Publisher {
            track,
            sender,
            ssrc,
            source,
            fps: options.fps,
            state: state.clone(),
            records: Arc::clone(&published),
            keyframe_wanted,
            publishing: Arc::clone(&publishing),
            padding: Arc::clone(&padding),
        })));

        Ok(Customer {
            welcome,
            codec,
            pc,
            shared,
            signal,
            transcript,
            state,
            input_open,
            records,
            published,
            share,
            messages,
            others: tokio::sync::Mutex::new(others_rx),
            publishing,
            padding,
            chat,
            files,
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
    /// token of this connection's `welcome`. Pass it to [`Customer::connect`].
    pub fn resume_url(&self) -> Option<&str> {
        self.welcome.resume_url.as_deref()
    }

    /// The codec published (the source's).
    pub fn codec(&self) -> VideoCodec {
        self.codec
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

    /// Test hook for an over-eager publisher: from the next frame on, frames shorter
    /// than `bytes` are padded with zeros to that size (0 turns it off). At 15 fps,
    /// 400,000 bytes a frame is about 50 Mbps. [`Customer::sent_frames`] records the
    /// padded frames.
    pub fn set_frame_padding(&self, bytes: usize) {
        self.padding.store(bytes, Ordering::Relaxed);
    }

    /// Restarts ICE on the same peer connection (fresh credentials offered over the
    /// session socket; the relay answers on its side of the same connection): what a
    /// client does when its network changes. Returns once the offer is queued; wait with
    /// `wait_connected` or for frames.
    pub fn restart_ice(&self) {
        self.shared.ice_restart.notify_one();
    }

    /// Stops (`false`) or resumes (`true`) publishing frames; the track stays.
    pub fn set_publishing(&self, on: bool) {
        self.publishing.store(on, Ordering::Relaxed);
    }

    /// Every frame handed to the track so far.
    pub fn sent_frames(&self) -> Vec<SentFrame> {
        lock(&self.published).sent.clone()
    }

    /// How many frames were handed to the track.
    pub fn frames_sent(&self) -> usize {
        lock(&self.published).sent.len()
    }

    /// Why publishing stopped, if it did (a write to the track failed).
    pub fn publish_error(&self) -> Option<String> {
        lock(&self.published).publish_error.clone()
    }

    /// Input events received on the `input` channel, decoded, in arrival order.
    pub fn input_events(&self) -> Vec<ReceivedInput> {
        lock(&self.records).inputs.clone()
    }

    /// Every data-channel message received, raw, on any channel (for leak checks).
    pub fn data_channel_messages(&self) -> Vec<DataChannelMessage> {
        lock(&self.messages).clone()
    }

    /// Keyframe requests (PLI/FIR) received from the relay.
    pub fn keyframe_requests(&self) -> Vec<KeyframeRequest> {
        lock(&self.published).keyframe_requests.clone()
    }

    /// How many keyframe requests were received.
    pub fn keyframe_request_count(&self) -> usize {
        lock(&self.published).keyframe_requests.len()
    }

    /// Every complete frame of agents' screen shares received so far, in order
    /// (reassembled and digested exactly as [`Agent::frames`](super::Agent::frames)).
    /// The customer's connection negotiates its source's codec only, so it receives
    /// shares in that codec.
    pub fn share_frames(&self) -> Vec<ReceivedFrame> {
        self.share.frames()
    }

    /// Waits until at least `n` share frames were received in total.
    pub async fn wait_share_frames(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        self.share.wait_frames(n, timeout).await
    }

    /// Counters of the share's receive path.
    pub fn share_receive_stats(&self) -> ReceiveStats {
        self.share.stats()
    }

    /// Offer/answer counters and errors.
    pub fn negotiation(&self) -> NegotiationStats {
        lock(&self.shared.stats).clone()
    }

    /// The `chat` data channel: send chat there, read what the relay delivers there.
    pub fn chat(&self) -> &Arc<ChatChannel> {
        &self.chat
    }

    /// The `files` data channel: offer files to the agents, answer their offers, read
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

    /// The next message from the relay that is not part of media negotiation (chat,
    /// roster changes, errors, `session_ended`), within `timeout`.
    pub async fn next_message(&self, timeout: Duration) -> Result<ServerMsg, ClientError> {
        let mut others = self.others.lock().await;
        match tokio::time::timeout(timeout, others.recv()).await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(ClientError::SignallingClosed),
            Err(_) => Err(ClientError::Timeout("a relay message")),
        }
    }

    /// Stops publishing, closes the peer connection and the WebSocket (without `leave`).
    pub async fn close(self) -> Result<(), ClientError> {
        self.set_publishing(false);
        let closed = self.pc.close().await;
        let _ = self.signal.close().await;
        // Give the writer a moment to send the close frame before the tasks are aborted.
        tokio::time::sleep(Duration::from_millis(20)).await;
        closed.map_err(ClientError::from)
    }
}
