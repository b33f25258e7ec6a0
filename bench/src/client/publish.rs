//! Publishing frames from a [`FrameSource`] on a video track: the customer's screen,
//! or an agent's screen share. Frames go out at a fixed rate; a keyframe request
//! (PLI/FIR) from the relay makes the next frame the source's next keyframe; every
//! frame is recorded with its [`frame_digest`] before it is written.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::media::Sample;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::watch;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::RTCPeerConnectionState;
use webrtc::rtp_transceiver::RtpSender;

use super::ClientError;
use super::codec::{ClientCodec, VideoCodec, frame_digest};
use super::peer::lock;
use super::rtcp::{KeyframeRequestKind, keyframe_requests};
use super::source::FrameSource;

/// A new video track for publishing `codec` frames with SSRC `ssrc`; `id` names it (and
/// its stream) in the SDP.
pub(crate) fn video_track(
    id: &str,
    codec: VideoCodec,
    ssrc: u32,
) -> Result<Arc<TrackLocalStaticSample>, ClientError> {
    Ok(Arc::new(TrackLocalStaticSample::new(
        Instant::now(),
        MediaStreamTrack::new(
            id.to_owned(),
            format!("{id}-video"),
            id.to_owned(),
            RtpCodecKind::Video,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: codec.rtp_codec_parameters().rtp_codec,
                ..Default::default()
            }],
        ),
    )?))
}

/// A frame a publisher (the customer, or an agent sharing its screen) handed to its
/// video track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentFrame {
    /// Publishing order, from 0.
    pub index: u64,
    /// [`Frame::index`](super::Frame::index) of the source frame (files loop, so
    /// several sent frames share one).
    pub source_index: u64,
    /// [`frame_digest`] of the frame.
    pub digest: [u8; 32],
    /// Whether it is a keyframe.
    pub is_keyframe: bool,
    /// Whether it was sent because of a keyframe request.
    pub requested: bool,
    /// Bytes in the frame.
    pub size: usize,
    /// When it was handed to the track (just before packetization).
    pub sent_at: Instant,
}

/// A keyframe request (RTCP PLI or FIR) the relay sent to a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyframeRequest {
    /// PLI or FIR.
    pub kind: KeyframeRequestKind,
    /// When it reached the application.
    pub received_at: Instant,
}

/// What a publisher did.
#[derive(Default)]
pub(crate) struct PublishRecords {
    pub(crate) sent: Vec<SentFrame>,
    pub(crate) keyframe_requests: Vec<KeyframeRequest>,
    pub(crate) publish_error: Option<String>,
}

/// Counts the keyframe requests delivered to the track and raises `keyframe_wanted`.
pub(crate) async fn watch_keyframe_requests(
    track: Arc<TrackLocalStaticSample>,
    records: Arc<Mutex<PublishRecords>>,
    keyframe_wanted: Arc<AtomicBool>,
) {
    while let Some(event) = track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else {
            continue;
        };
        let kinds = keyframe_requests(&packets);
        if kinds.is_empty() {
            continue;
        }
        let now = Instant::now();
        lock(&records)
            .keyframe_requests
            .extend(kinds.into_iter().map(|kind| KeyframeRequest {
                kind,
                received_at: now,
            }));
        keyframe_wanted.store(true, Ordering::Relaxed);
    }
}

pub(crate) struct Publisher {
    pub(crate) track: Arc<TrackLocalStaticSample>,
    pub(crate) sender: Arc<dyn RtpSender>,
    pub(crate) ssrc: u32,
    pub(crate) source: FrameSource,
    pub(crate) fps: f64,
    pub(crate) state: watch::Receiver<RTCPeerConnectionState>,
    pub(crate) records: Arc<Mutex<PublishRecords>>,
    pub(crate) keyframe_wanted: Arc<AtomicBool>,
    pub(crate) publishing: Arc<AtomicBool>,
    /// Test hook: frames shorter than this many bytes are padded with zeros to it (0:
    /// none), so a test can publish far more than its source (see
    /// `Customer::set_frame_padding`).
    pub(crate) padding: Arc<AtomicUsize>,
}

/// Waits for the connection, then writes one frame per tick; a pending keyframe request
/// makes the frame the source's next keyframe.
pub(crate) async fn publish(mut p: Publisher) {
    if p.state
        .wait_for(|s| *s == RTCPeerConnectionState::Connected)
        .await
        .is_err()
    {
        return;
    }
    let fail = |records: &Mutex<PublishRecords>, what: String| {
        tracing::warn!(error = %what, "client: publishing stopped");
        lock(records).publish_error = Some(what);
    };
    // write_sample stamps this on every packet; the core refuses any other.
    let payload_type = match p.sender.get_parameters().await {
        Ok(params) => match params.rtp_parameters.codecs.first() {
            Some(codec) => codec.payload_type,
            None => return fail(&p.records, "the sender has no negotiated codec".into()),
        },
        Err(e) => return fail(&p.records, format!("sender parameters: {e}")),
    };
    let interval = Duration::from_secs_f64(1.0 / p.fps);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let codec = p.source.codec();
    let mut index = 0u64;
    loop {
        ticker.tick().await;
        if !p.publishing.load(Ordering::Relaxed) {
            continue;
        }
        let requested = p.keyframe_wanted.swap(false, Ordering::Relaxed);
        let mut frame = if requested {
            p.source.next_keyframe()
        } else {
            p.source.next_frame()
        };
        let padding = p.padding.load(Ordering::Relaxed);
        if padding > frame.data.len() {
            let mut padded = frame.data.to_vec();
            padded.resize(padding, 0);
            frame.data = padded.into();
        }
        let sent_at = Instant::now();
        let sample = Sample {
            data: frame.data.clone(),
            duration: interval,
            ..Sample::new(sent_at)
        };
        let record = SentFrame {
            index,
            source_index: frame.index,
            digest: frame_digest(codec, &frame.data),
            is_keyframe: frame.is_keyframe,
            requested,
            size: frame.data.len(),
            sent_at,
        };
        // Recorded before the write, so a receiver can never see a frame the record
        // does not hold yet.
        lock(&p.records).sent.push(record);
        index += 1;
        if let Err(e) = p
            .track
            .write_sample(p.ssrc, payload_type, &sample, &[])
            .await
        {
            return fail(&p.records, format!("write_sample: {e}"));
        }
    }
}
