//! The agent (host, invited agent or supervisor): receives the customer's screen,
//! sends input events on its `input` data channel, and chats and exchanges files on its
//! `chat` and `files` channels.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use relay_codec::input::{InputEvent, encode_to_vec};
use relay_codec::wire::{ClientMsg, ServerMsg};
use rtc::interceptor::Registry;
use rtc::media::io::sample_builder::SampleBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{MediaEngine, PeerConnection, RTCPeerConnectionState};

use super::channels::{CHAT_LABEL, ChatChannel, FILES_LABEL, FileTransfers};
use super::codec::{ClientCodec, CodecDepacketizer, VIDEO_CLOCK_RATE, VideoCodec, frame_digest};
use super::peer::{
    self, DataChannelMessage, NegotiationStats, OTHER_MESSAGES_QUEUE, PeerShared, lock,
};
use super::signalling::{Signalling, SignallingSender, SignallingTasks, Transcript, Welcome};
use super::{ClientError, INPUT_LABEL};

/// RTP packets a frame may wait for a missing one before the frame is given up.
const MAX_LATE_PACKETS: u16 = 512;
/// Media time a frame may wait for a missing packet (NACK recovery on loopback takes a
/// few milliseconds) before it is given up.
const MAX_LATE_TIME: Duration = Duration::from_millis(200);
/// After [`Agent::resume`], how long a jump in sequence numbers still counts as packets
/// lost while paused (and triggers a PLI).
const RESUME_GAP_WINDOW: Duration = Duration::from_secs(2);
/// Frames whose last-packet arrival time is remembered, by RTP timestamp.
const ARRIVALS_KEPT: usize = 256;

/// How an [`Agent`] connects.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Local UDP address for the peer connection (one host candidate).
    pub bind: SocketAddr,
    /// How long to wait for the relay's `welcome`.
    pub welcome_timeout: Duration,
    /// Accept every file offered on the `files` channel at once.
    pub auto_accept_files: bool,
}

impl Default for AgentOptions {
    /// `127.0.0.1:0`, 10 s, offers wait for an answer.
    fn default() -> Self {
        AgentOptions {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            welcome_timeout: Duration::from_secs(10),
            auto_accept_files: false,
        }
    }
}

/// A complete frame reassembled from the relay's RTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// Its codec.
    pub codec: VideoCodec,
    /// [`frame_digest`] of the depacketized frame.
    pub digest: [u8; 32],
    /// Whether it is a keyframe ([`VideoCodec::is_keyframe`]).
    pub is_keyframe: bool,
    /// Bytes after depacketization.
    pub size: usize,
    /// RTP timestamp of its packets.
    pub rtp_timestamp: u32,
    /// When the application read its last packet from the track. The sample builder
    /// releases a frame only when a packet of the next one arrives, so the frame shows
    /// up in [`Agent::frames`] one frame interval later than this. Packets queued while
    /// the agent was paused are stamped when they are read after the resume.
    pub received_at: Instant,
    /// Packets the sample builder dropped before this frame (incomplete frames).
    pub dropped_packets_before: u16,
}

/// Counters of the agent's receive path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Remote tracks announced (one per negotiated screen track).
    pub tracks: u32,
    /// RTP packets the application read.
    pub rtp_packets: u64,
    /// Packets missing from forward jumps of the sequence number, as the application saw
    /// them (one that arrives later, e.g. retransmitted, was still counted).
    pub sequence_gaps: u64,
    /// Packets whose payload type maps to no known video codec.
    pub unknown_payload: u64,
    /// PLIs sent (after a pause that lost packets, or by [`Agent::request_keyframe`]).
    pub plis_sent: u32,
    /// The codec of the last packet.
    pub codec: Option<VideoCodec>,
}

#[derive(Default)]
struct Records {
    frames: Vec<ReceivedFrame>,
    stats: ReceiveStats,
}

/// What the receive tasks share with the [`Agent`].
struct ReceiveContext {
    records: Mutex<Records>,
    frame_count: watch::Sender<usize>,
    paused: watch::Sender<bool>,
    /// Payload type → codec, from the last applied answer.
    payload_types: Mutex<HashMap<u8, VideoCodec>>,
    /// The track being read and its SSRC, for PLIs.
    current: Mutex<Option<(Arc<dyn TrackRemote>, u32)>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
    receive: Arc<ReceiveContext>,
    others: tokio::sync::Mutex<mpsc::Receiver<ServerMsg>>,
    chat: Arc<ChatChannel>,
    files: Arc<FileTransfers>,
    tasks: Vec<JoinHandle<()>>,
    _signalling: SignallingTasks,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(lock(&self.receive.tasks).iter()) {
            task.abort();
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

        let (frame_count, _) = watch::channel(0usize);
        let (paused, _) = watch::channel(false);
        let receive = Arc::new(ReceiveContext {
            records: Mutex::new(Records::default()),
            frame_count,
            paused,
            payload_types: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        });
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        let on_track = {
            let receive = Arc::clone(&receive);
            move |track: Arc<dyn TrackRemote>| {
                let task = tokio::spawn(receive_track(track, Arc::clone(&receive)));
                lock(&receive.tasks).push(task);
            }
        };
        let on_data_channel = {
            let messages = Arc::clone(&messages);
            move |dc| {
                tokio::spawn(peer::record_data_channel(
                    dc,
                    Arc::clone(&messages),
                    None,
                    |_| {},
                ));
            }
        };
        let shared = Arc::new(PeerShared {
            signal: signal.clone(),
            state_tx,
            first_mid: Mutex::new(None),
            stats: Mutex::new(NegotiationStats::default()),
            on_track: Some(Box::new(on_track)),
            on_data_channel: Box::new(on_data_channel),
        });
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
                |_| {},
            )),
            tokio::spawn(peer::run_negotiation(
                Arc::clone(&pc),
                Arc::clone(&shared),
                incoming,
                others_tx,
                {
                    let receive = Arc::clone(&receive);
                    move |sdp: &str| *lock(&receive.payload_types) = video_payload_types(sdp)
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
            tasks,
            _signalling: signalling_tasks,
        })
    }

    /// The relay's `welcome`.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
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
        self.receive.paused.send_replace(true);
    }

    /// Reads the screen track again. If the packets queued before the pause are
    /// followed by a jump in sequence numbers (packets dropped while paused), the agent
    /// restarts frame assembly and sends a PLI.
    pub fn resume(&self) {
        self.receive.paused.send_replace(false);
    }

    /// Whether the agent is paused.
    pub fn is_paused(&self) -> bool {
        *self.receive.paused.borrow()
    }

    /// Sends a PLI for the screen track now. Fails when no track arrived yet.
    pub async fn request_keyframe(&self) -> Result<(), ClientError> {
        let current = lock(&self.receive.current).clone();
        let (track, ssrc) = current.ok_or(ClientError::NoTrack)?;
        send_pli(&*track, ssrc).await?;
        lock(&self.receive.records).stats.plis_sent += 1;
        Ok(())
    }

    /// Every complete frame received so far, in order.
    pub fn frames(&self) -> Vec<ReceivedFrame> {
        lock(&self.receive.records).frames.clone()
    }

    /// How many complete frames were received.
    pub fn frames_received(&self) -> usize {
        lock(&self.receive.records).frames.len()
    }

    /// Waits until at least `n` frames were received in total.
    pub async fn wait_frames(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        let mut count = self.receive.frame_count.subscribe();
        match tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ClientError::Timeout("frames from the relay")),
        }
    }

    /// Counters of the receive path.
    pub fn receive_stats(&self) -> ReceiveStats {
        lock(&self.receive.records).stats.clone()
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

    /// Closes the peer connection and the WebSocket (without `leave`).
    pub async fn close(self) -> Result<(), ClientError> {
        let closed = self.pc.close().await;
        let _ = self.signal.close().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        closed.map_err(ClientError::from)
    }
}

/// Payload type → video codec from the `a=rtpmap` lines of an SDP.
fn video_payload_types(sdp: &str) -> HashMap<u8, VideoCodec> {
    sdp.lines()
        .filter_map(|line| {
            let rest = line.trim_end().strip_prefix("a=rtpmap:")?;
            let (pt, encoding) = rest.split_once(' ')?;
            let name = encoding.split('/').next()?;
            Some((pt.parse().ok()?, VideoCodec::from_mime(name)?))
        })
        .collect()
}

async fn send_pli(track: &dyn TrackRemote, media_ssrc: u32) -> Result<(), ClientError> {
    track
        .write_rtcp(vec![Box::new(PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        })])
        .await?;
    Ok(())
}

/// Frame reassembly for one payload type.
struct Assembler {
    payload_type: u8,
    codec: VideoCodec,
    builder: SampleBuilder<CodecDepacketizer>,
    /// When the last packet of each recent RTP timestamp arrived.
    arrivals: VecDeque<(u32, Instant)>,
}

impl Assembler {
    fn new(payload_type: u8, codec: VideoCodec) -> Self {
        Assembler {
            payload_type,
            codec,
            builder: SampleBuilder::new(MAX_LATE_PACKETS, codec.depacketizer(), VIDEO_CLOCK_RATE)
                .with_max_time_delay(MAX_LATE_TIME),
            arrivals: VecDeque::new(),
        }
    }

    fn push(&mut self, now: Instant, packet: rtp::Packet, out: &mut Vec<ReceivedFrame>) {
        let ts = packet.header.timestamp;
        match self.arrivals.iter_mut().rev().find(|(t, _)| *t == ts) {
            Some(entry) => entry.1 = now,
            None => {
                self.arrivals.push_back((ts, now));
                if self.arrivals.len() > ARRIVALS_KEPT {
                    self.arrivals.pop_front();
                }
            }
        }
        self.builder.push(now, packet);
        while let Some(sample) = self.builder.pop(now) {
            let received_at = self
                .arrivals
                .iter()
                .find(|(t, _)| *t == sample.packet_timestamp)
                .map_or(now, |(_, at)| *at);
            out.push(ReceivedFrame {
                codec: self.codec,
                digest: frame_digest(self.codec, &sample.data),
                is_keyframe: self.codec.is_keyframe(&sample.data),
                size: sample.data.len(),
                rtp_timestamp: sample.packet_timestamp,
                received_at,
                dropped_packets_before: sample.prev_dropped_packets,
            });
        }
    }
}

/// Reads one remote track until it ends, honouring pause/resume.
async fn receive_track(track: Arc<dyn TrackRemote>, ctx: Arc<ReceiveContext>) {
    let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
    let fallback = match track.codec(ssrc).await {
        Some(codec) => VideoCodec::from_mime(&codec.mime_type),
        None => None,
    };
    *lock(&ctx.current) = Some((Arc::clone(&track), ssrc));
    lock(&ctx.records).stats.tracks += 1;

    let mut paused = ctx.paused.subscribe();
    let mut assembler: Option<Assembler> = None;
    let mut last_seq: Option<u16> = None;
    let mut gap_watch_until: Option<Instant> = None;
    let mut frames = Vec::new();
    loop {
        if *paused.borrow_and_update() {
            if paused.wait_for(|p| !*p).await.is_err() {
                return;
            }
            gap_watch_until = Some(Instant::now() + RESUME_GAP_WINDOW);
        }
        let event = tokio::select! {
            event = track.poll() => event,
            changed = paused.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let packet = match event {
            None | Some(TrackRemoteEvent::OnEnded) => break,
            Some(TrackRemoteEvent::OnRtpPacket(packet)) => packet,
            Some(_) => continue,
        };
        let now = Instant::now();
        let seq = packet.header.sequence_number;
        let pt = packet.header.payload_type;

        let mut lost_while_paused = false;
        let mut gap = 0u64;
        match last_seq {
            Some(last) => {
                let delta = seq.wrapping_sub(last);
                // 0: duplicate; >= 0x8000: older than the last one (reordered, or a
                // retransmission). Neither moves the expected sequence number.
                if delta != 0 && delta < 0x8000 {
                    gap = u64::from(delta - 1);
                    last_seq = Some(seq);
                }
            }
            None => last_seq = Some(seq),
        }
        if gap > 0 && gap_watch_until.is_some_and(|until| now <= until) {
            lost_while_paused = true;
            gap_watch_until = None;
        }

        if assembler.as_ref().map(|a| a.payload_type) != Some(pt) || lost_while_paused {
            let codec = lock(&ctx.payload_types).get(&pt).copied().or(fallback);
            assembler = codec.map(|codec| Assembler::new(pt, codec));
        }
        {
            let mut records = lock(&ctx.records);
            records.stats.rtp_packets += 1;
            records.stats.sequence_gaps += gap;
            match &assembler {
                Some(a) => records.stats.codec = Some(a.codec),
                None => records.stats.unknown_payload += 1,
            }
        }
        if lost_while_paused {
            match send_pli(&*track, ssrc).await {
                Ok(()) => lock(&ctx.records).stats.plis_sent += 1,
                Err(e) => tracing::warn!(error = %e, "agent: PLI after resume failed"),
            }
        }
        let Some(assembler) = assembler.as_mut() else {
            continue;
        };
        assembler.push(now, packet, &mut frames);
        if !frames.is_empty() {
            let count = {
                let mut records = lock(&ctx.records);
                records.frames.append(&mut frames);
                records.frames.len()
            };
            ctx.frame_count.send_replace(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_types_from_sdp() {
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96 97 125\r\na=rtpmap:96 VP8/90000\r\n\
                   a=rtpmap:97 rtx/90000\r\na=rtpmap:125 H264/90000\r\n";
        let map = video_payload_types(sdp);
        assert_eq!(map.get(&96), Some(&VideoCodec::Vp8));
        assert_eq!(map.get(&125), Some(&VideoCodec::H264));
        assert_eq!(map.get(&97), None);
    }
}
