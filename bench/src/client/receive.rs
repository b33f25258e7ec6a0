//! The receive path of a remote video track, shared by the agent (the customer's
//! screen) and the customer (an agent's screen share): RTP reassembled into whole
//! frames with the rtc crate's `SampleBuilder` and the depacketizer of the packet's
//! payload type, each frame identified by its [`frame_digest`]; pause/resume to
//! simulate a receiver that stops reading, and PLIs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::media::io::sample_builder::SampleBuilder;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use super::ClientError;
use super::codec::{ClientCodec, CodecDepacketizer, VIDEO_CLOCK_RATE, VideoCodec, frame_digest};
use super::peer::lock;

/// RTP packets a frame may wait for a missing one before the frame is given up.
const MAX_LATE_PACKETS: u16 = 512;
/// Media time a frame may wait for a missing packet before it is given up. NACK
/// recovery takes a round trip plus the NACK interval: milliseconds on loopback, a few
/// hundred on a lossy, jittery path, which a browser's jitter buffer also waits out.
const MAX_LATE_TIME: Duration = Duration::from_millis(600);
/// After a resume ([`Agent::resume`](super::Agent::resume)), how long a jump in sequence numbers still counts as packets
/// lost while paused (and triggers a PLI).
const RESUME_GAP_WINDOW: Duration = Duration::from_secs(2);
/// Frames whose last-packet arrival time is remembered, by RTP timestamp.
const ARRIVALS_KEPT: usize = 256;

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
    /// up in [`Agent::frames`](super::Agent::frames) one frame interval later than this. Packets queued while
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
    /// PLIs sent (after a pause that lost packets, or by
    /// [`Agent::request_keyframe`](super::Agent::request_keyframe)).
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

/// One receiver of remote video tracks: every track handed to [`Receiver::on_track`]
/// is read into the same records. Cloning shares it; [`Receiver::abort`] stops its
/// tasks.
#[derive(Clone)]
pub(crate) struct Receiver(Arc<ReceiveContext>);

impl Receiver {
    pub(crate) fn new() -> Receiver {
        let (frame_count, _) = watch::channel(0usize);
        let (paused, _) = watch::channel(false);
        Receiver(Arc::new(ReceiveContext {
            records: Mutex::new(Records::default()),
            frame_count,
            paused,
            payload_types: Mutex::new(HashMap::new()),
            current: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Starts reading `track` (call it from the peer connection's `on_track`).
    pub(crate) fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let task = tokio::spawn(receive_track(track, Arc::clone(&self.0)));
        lock(&self.0.tasks).push(task);
    }

    /// Learns the payload types of an applied answer.
    pub(crate) fn set_payload_types(&self, sdp: &str) {
        *lock(&self.0.payload_types) = video_payload_types(sdp);
    }

    pub(crate) fn pause(&self, paused: bool) {
        self.0.paused.send_replace(paused);
    }

    pub(crate) fn is_paused(&self) -> bool {
        *self.0.paused.borrow()
    }

    /// Sends a PLI for the track being read. Fails when no track arrived yet.
    pub(crate) async fn request_keyframe(&self) -> Result<(), ClientError> {
        let current = lock(&self.0.current).clone();
        let (track, ssrc) = current.ok_or(ClientError::NoTrack)?;
        send_pli(&*track, ssrc).await?;
        lock(&self.0.records).stats.plis_sent += 1;
        Ok(())
    }

    pub(crate) fn frames(&self) -> Vec<ReceivedFrame> {
        lock(&self.0.records).frames.clone()
    }

    pub(crate) fn frames_received(&self) -> usize {
        lock(&self.0.records).frames.len()
    }

    /// Waits until at least `n` frames were received in total.
    pub(crate) async fn wait_frames(&self, n: usize, timeout: Duration) -> Result<(), ClientError> {
        let mut count = self.0.frame_count.subscribe();
        match tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ClientError::Timeout("frames from the relay")),
        }
    }

    pub(crate) fn stats(&self) -> ReceiveStats {
        lock(&self.0.records).stats.clone()
    }

    /// Stops every track reader.
    pub(crate) fn abort(&self) {
        for task in lock(&self.0.tasks).iter() {
            task.abort();
        }
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

/// Frame reassembly for one payload type: RTP packets in, whole frames out. It knows
/// nothing of tracks or sockets, so RTP received without a peer connection (the UDP
/// forwarder of `compare`) is reassembled the same way.
pub(crate) struct Assembler {
    payload_type: u8,
    codec: VideoCodec,
    builder: SampleBuilder<CodecDepacketizer>,
    /// When the last packet of each recent RTP timestamp arrived.
    arrivals: VecDeque<(u32, Instant)>,
}

impl Assembler {
    pub(crate) fn new(payload_type: u8, codec: VideoCodec) -> Self {
        Assembler {
            payload_type,
            codec,
            builder: SampleBuilder::new(MAX_LATE_PACKETS, codec.depacketizer(), VIDEO_CLOCK_RATE)
                .with_max_time_delay(MAX_LATE_TIME),
            arrivals: VecDeque::new(),
        }
    }

    /// Adds `packet`, read at `now`, and appends the frames it completes to `out`.
    pub(crate) fn push(&mut self, now: Instant, packet: rtp::Packet, out: &mut Vec<ReceivedFrame>) {
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

/// How long a receiver whose decode chain is broken waits for the keyframe it asked
/// for before asking again.
const PLI_REPEAT: Duration = Duration::from_millis(500);

/// Whether the frames received so far would decode, as a decoder sees it: a frame the
/// sample builder gave up (packets that never came) breaks the chain until the next
/// keyframe. Says when to send a PLI: at the break, then every [`PLI_REPEAT`] until a
/// keyframe arrives.
#[derive(Debug, Default)]
struct DecodeChain {
    /// When the chain broke and the last PLI for it was sent; `None` while intact.
    broken: Option<Instant>,
}

impl DecodeChain {
    /// Takes the frames just completed at `now`; true when a PLI is due.
    fn after(&mut self, now: Instant, frames: &[ReceivedFrame]) -> bool {
        let mut newly_broken = false;
        for f in frames {
            if f.is_keyframe {
                self.broken = None;
            } else if f.dropped_packets_before > 0 && self.broken.is_none() {
                self.broken = Some(now);
                newly_broken = true;
            }
        }
        match self.broken {
            _ if newly_broken => true,
            Some(since) if now.duration_since(since) >= PLI_REPEAT => {
                self.broken = Some(now);
                true
            }
            _ => false,
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
    let mut chain = DecodeChain::default();
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
                Err(e) => tracing::warn!(error = %e, "client: PLI after resume failed"),
            }
        }
        let Some(assembler) = assembler.as_mut() else {
            continue;
        };
        assembler.push(now, packet, &mut frames);
        if chain.after(now, &frames) {
            // A frame was given up: what follows does not decode until a keyframe,
            // which is asked for now (and again while none comes), as decoders do.
            match send_pli(&*track, ssrc).await {
                Ok(()) => lock(&ctx.records).stats.plis_sent += 1,
                Err(e) => tracing::warn!(error = %e, "client: PLI after a lost frame failed"),
            }
        }
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

    fn frame(is_keyframe: bool, dropped_packets_before: u16) -> ReceivedFrame {
        ReceivedFrame {
            codec: VideoCodec::Vp8,
            digest: [0; 32],
            is_keyframe,
            size: 1,
            rtp_timestamp: 0,
            received_at: Instant::now(),
            dropped_packets_before,
        }
    }

    #[test]
    fn a_given_up_frame_asks_for_a_keyframe_until_one_comes() {
        let t0 = Instant::now();
        let mut chain = DecodeChain::default();
        assert!(!chain.after(t0, &[frame(true, 0), frame(false, 0)]));
        assert!(
            chain.after(t0, &[frame(false, 3)]),
            "the break asks at once"
        );
        assert!(!chain.after(t0 + Duration::from_millis(100), &[frame(false, 0)]));
        assert!(!chain.after(t0 + Duration::from_millis(200), &[frame(false, 2)]));
        assert!(
            chain.after(t0 + PLI_REPEAT, &[]),
            "asked again while none comes"
        );
        assert!(!chain.after(t0 + PLI_REPEAT * 2, &[frame(true, 0)]));
        assert!(
            !chain.after(t0 + PLI_REPEAT * 4, &[frame(false, 0)]),
            "intact again"
        );
    }

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
