//! The data path of one session, in both directions: a publisher's track read into a
//! [`Fanout`], each subscriber's bounded queue emptied into its peer connection with its
//! own header rewriting, subscribers' RTCP fed back, and keyframe requests sent to the
//! publisher.
//!
//! A session has two [`MediaPath`]s with the same code: [`Direction::Screen`], the
//! customer's screen (and voice) to the agents, and [`Direction::Share`], the sharing
//! agent's screen to the customer (one publisher at a time, one subscriber).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use relay_codec::keyframe::{KeyframeStarts, VideoCodec};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtp;
use rtc::shared::marshal::MarshalSize;
use tokio::sync::{Notify, mpsc};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use super::{LocalTrack, Shared, lock};
use crate::fanout::bitrate_cap::{BitrateCap, Verdict};
use crate::fanout::{
    Delivery, DropReason, Fanout, FanoutCounters, FanoutOutput, FanoutSettings, FanoutStat,
    MediaKind, PacketInfo, SubscriberId,
};
use crate::metrics::Metrics;

/// Which way media flows through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The customer's screen (and voice) to the agents.
    Screen,
    /// The sharing agent's screen to the customer.
    Share,
}

/// One packet on its way to one subscriber: the payload is shared by every subscriber.
pub(super) struct Forward {
    kind: MediaKind,
    packet: rtp::Packet,
    keyframe_start: bool,
    arrived: Instant,
}

/// The fan-out core and the subscribers' queues, under one short lock.
pub(super) struct Plane {
    pub(super) fanout: Fanout,
    pub(super) sinks: HashMap<SubscriberId, mpsc::Sender<Forward>>,
    reported: FanoutCounters,
}

/// One direction of a session's media: its fan-out, its publisher's video track (for
/// keyframe requests) and the signal that wakes the keyframe-request task.
pub(super) struct MediaPath {
    plane: Mutex<Plane>,
    /// The publisher's video track and its SSRC, while one publishes.
    pub(super) publisher_video: Mutex<Option<(Arc<dyn TrackRemote>, u32)>>,
    keyframe: Notify,
}

impl MediaPath {
    pub(super) fn new(settings: FanoutSettings) -> MediaPath {
        MediaPath {
            plane: Mutex::new(Plane {
                fanout: Fanout::new(settings),
                sinks: HashMap::new(),
                reported: FanoutCounters::default(),
            }),
            publisher_video: Mutex::new(None),
            keyframe: Notify::new(),
        }
    }

    /// When the fan-out next wants [`Fanout::handle_timeout`].
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        lock(&self.plane).fanout.poll_timeout()
    }

    /// Runs `f` on the fan-out, then turns its outputs into keyframe requests and
    /// metrics. Both directions count in the same metrics (the relay's forwarding work,
    /// whichever way it goes).
    pub(super) fn with_plane<R>(&self, m: &Metrics, f: impl FnOnce(&mut Plane) -> R) -> R {
        let mut plane = lock(&self.plane);
        let r = f(&mut plane);
        while let Some(out) = plane.fanout.poll_output() {
            match out {
                FanoutOutput::RequestKeyframe => self.keyframe.notify_one(),
                FanoutOutput::Stat(FanoutStat::KeyframeRequest(o)) => m
                    .keyframe_requests_total
                    .with_label_values(&[o.as_str()])
                    .inc(),
            }
        }
        let now = *plane.fanout.counters();
        let d = now.since(&plane.reported);
        plane.reported = now;
        drop(plane);
        if d != FanoutCounters::default() {
            m.rtp_packets_forwarded_total.inc_by(d.packets_forwarded);
            m.frames_forwarded_total.inc_by(d.frames_forwarded);
            for reason in [DropReason::QueueFull, DropReason::AwaitingKeyframe] {
                let n = d.frames_dropped(reason, MediaKind::Video)
                    + d.frames_dropped(reason, MediaKind::Audio);
                if n > 0 {
                    m.frames_dropped_total
                        .with_label_values(&[reason.as_str()])
                        .inc_by(n);
                }
            }
        }
        r
    }
}

/// Sends a PLI to the path's publisher each time its fan-out asks for a keyframe.
pub(super) async fn request_keyframes(shared: Arc<Shared>, direction: Direction) {
    let path = shared.path(direction);
    loop {
        path.keyframe.notified().await;
        let target = lock(&path.publisher_video).clone();
        if let Some((track, media_ssrc)) = target {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            };
            if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
                tracing::debug!(error = %e, "keyframe request not sent");
            }
        }
    }
}

/// The hot path: every RTP packet of one published track (the customer's screen or
/// voice, or the sharing agent's screen), routed to the subscribers' queues.
pub(super) async fn read_publisher(
    shared: Arc<Shared>,
    direction: Direction,
    track: Arc<dyn TrackRemote>,
    kind: MediaKind,
    codec: Option<VideoCodec>,
) {
    // The customer's screen is recorded (from the first keyframe on); a share is not.
    let mut recording = match (direction, kind, codec) {
        (Direction::Screen, MediaKind::Video, Some(c)) => {
            shared.recording.get().map(|r| r.video(c))
        }
        _ => None,
    };
    let mut starts = match (kind, codec) {
        (MediaKind::Video, Some(c)) => Some(KeyframeStarts::new(c)),
        _ => None,
    };
    let metrics = &shared.inner.metrics;
    let mut cap = BitrateCap::new(shared.inner.settings.max_publish_bitrate);
    let mut episodes = 0;
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(mut packet) = event else {
            continue;
        };
        let arrived = Instant::now();
        // Over the publisher's bitrate cap: dropped before the recorder and the fan-out
        // see it; the first packet back under the cap makes the subscribers wait for a
        // keyframe, which is requested (`publisher_gap`).
        let size = packet.header.marshal_size() + packet.payload.len();
        let resumed = match cap.packet(arrived, size) {
            Verdict::Pass => false,
            Verdict::Resume => true,
            Verdict::Drop => {
                if cap.counters().episodes != episodes {
                    episodes = cap.counters().episodes;
                    metrics.publish_cap_exceeded_total.inc();
                    tracing::warn!(
                        kind = kind.as_str(),
                        cap = shared.inner.settings.max_publish_bitrate,
                        "publisher over limits.max_publish_bitrate: dropping its packets"
                    );
                }
                metrics
                    .publish_packets_dropped_total
                    .with_label_values(&["over_bitrate_cap"])
                    .inc();
                continue;
            }
        };
        // The publisher leg's header extensions mean nothing on the subscribers' legs;
        // they are removed once here, so the per-subscriber header copies below
        // allocate nothing.
        packet.header.extension = false;
        packet.header.extensions.clear();
        let keyframe_start = starts.as_mut().is_some_and(|s| {
            s.observe(
                packet.header.timestamp,
                packet.header.marker,
                &packet.payload,
            )
        });
        let info = PacketInfo {
            kind,
            keyframe_start,
            frame_end: packet.header.marker,
        };
        let recording_wants_keyframe = recording.as_mut().is_some_and(|tap| {
            tap.packet(arrived, &packet.header, &packet.payload, keyframe_start)
        });
        shared.with_plane(direction, |plane| {
            let Plane { fanout, sinks, .. } = plane;
            if resumed && kind == MediaKind::Video {
                fanout.publisher_gap(arrived);
            }
            if recording_wants_keyframe {
                fanout.recording_wants_keyframe(arrived);
            }
            fanout.route(arrived, &info, |id| {
                let Some(sink) = sinks.get(&id) else {
                    return Delivery::Full;
                };
                let forward = Forward {
                    kind,
                    packet: packet.clone(),
                    keyframe_start,
                    arrived,
                };
                match sink.try_send(forward) {
                    Ok(()) => Delivery::Queued,
                    Err(_) => Delivery::Full,
                }
            });
        });
    }
}

/// Per-subscriber RTP header rewriting: its own SSRC and payload type, sequence numbers
/// without the holes left by packets it skipped, and one continuous stream across a
/// publisher's new stream (the customer back on a new peer connection: new SSRC, new
/// random sequence and timestamp bases).
///
/// Timestamps continue forward across such a change because a receiver compares them:
/// Chromium drops, until its frame ids catch up, a keyframe whose frame id and timestamp
/// both look older than the last frame it decoded, so an agent watching through a resume
/// would freeze about half the time (the new random base lands "behind" the old one).
struct Rewrite {
    ssrc: u32,
    payload_type: u8,
    /// RTP clock rate of the lane (90 kHz video, 48 kHz Opus), to turn the wall-clock gap
    /// of a stream change into timestamp ticks.
    clock_rate: u32,
    offset: u16,
    next_in: Option<u16>,
    timestamp_offset: u32,
    /// The publisher's SSRC of the last packet, to notice a new stream.
    input_ssrc: Option<u32>,
    /// The last timestamp sent and when its packet arrived.
    last_out: Option<(u32, Instant)>,
}

impl Rewrite {
    fn new(ssrc: u32, payload_type: u8, clock_rate: u32) -> Rewrite {
        Rewrite {
            ssrc,
            payload_type,
            clock_rate,
            offset: 0,
            next_in: None,
            timestamp_offset: 0,
            input_ssrc: None,
            last_out: None,
        }
    }

    fn apply(&mut self, header: &mut rtp::header::Header, keyframe_start: bool, arrived: Instant) {
        let seq = header.sequence_number;
        let new_stream = self.input_ssrc.is_some_and(|s| s != header.ssrc);
        self.input_ssrc = Some(header.ssrc);
        if let Some(next_in) = self
            .next_in
            .filter(|&n| (keyframe_start || new_stream) && n != seq)
        {
            // Resuming after a drop or on a new stream: continue right after the last
            // packet sent, whose outgoing number was `next_in - 1 + offset`.
            self.offset = next_in.wrapping_add(self.offset).wrapping_sub(seq);
        }
        if let Some((last, at)) = self.last_out.filter(|_| new_stream) {
            // The new stream's first timestamp follows the last one sent by the time
            // that passed between them (at least one tick, so it is never "older").
            let gap = arrived.saturating_duration_since(at);
            let ticks =
                (gap.as_secs_f64() * f64::from(self.clock_rate)).min(f64::from(u32::MAX / 4));
            let ticks = (ticks as u32).max(1);
            self.timestamp_offset = last.wrapping_add(ticks).wrapping_sub(header.timestamp);
        }
        self.next_in = Some(seq.wrapping_add(1));
        header.sequence_number = seq.wrapping_add(self.offset);
        header.timestamp = header.timestamp.wrapping_add(self.timestamp_offset);
        header.ssrc = self.ssrc;
        header.payload_type = self.payload_type;
        self.last_out = Some((header.timestamp, arrived));
    }
}

/// Empties one subscriber's queue into its peer connection.
pub(super) async fn write_subscriber(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Forward>,
    tracks: Vec<LocalTrack>,
    depth: prometheus::IntGauge,
) {
    let mut lanes = Vec::new();
    for LocalTrack {
        kind,
        mime,
        ssrc,
        track,
        sender,
    } in tracks
    {
        let negotiated = match sender.get_parameters().await {
            Ok(p) => p
                .rtp_parameters
                .codecs
                .iter()
                .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&mime))
                .map(|c| (c.payload_type, c.rtp_codec.clock_rate)),
            Err(_) => None,
        };
        let Some((payload_type, clock_rate)) = negotiated else {
            tracing::warn!(%mime, "the subscriber did not negotiate the publisher's codec");
            continue;
        };
        lanes.push((
            kind,
            track,
            Rewrite::new(ssrc, payload_type, clock_rate),
            false,
        ));
    }
    let latency = shared.inner.metrics.forward_latency_seconds.clone();
    while let Some(mut f) = rx.recv().await {
        depth.set(rx.len() as i64);
        let Some((_, track, rewrite, bound)) = lanes.iter_mut().find(|l| l.0 == f.kind) else {
            continue;
        };
        rewrite.apply(&mut f.packet.header, f.keyframe_start, f.arrived);
        let result = if *bound {
            track.write_rtp(f.packet).await
        } else {
            // Right after negotiation the sender may not be bound yet: until its first
            // write succeeds, wait briefly and retry (only then is the packet cloned).
            let mut result = track.write_rtp(f.packet.clone()).await;
            for _ in 0..50 {
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                result = track.write_rtp(f.packet.clone()).await;
            }
            result
        };
        if result.is_err() {
            continue;
        }
        *bound = true;
        latency.observe(f.arrived.elapsed().as_secs_f64());
    }
    depth.set(0);
}

/// A subscriber's RTCP feedback: PLI/FIR become coalesced keyframe requests to the
/// path's publisher, receiver reports feed its statistics.
pub(super) async fn read_feedback(
    shared: Arc<Shared>,
    direction: Direction,
    id: SubscriberId,
    track: Arc<TrackLocalStaticRTP>,
) {
    while let Some(event) = track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else {
            continue;
        };
        for packet in packets {
            let any = packet.as_any();
            if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                shared.with_plane(direction, |p| {
                    p.fanout.keyframe_requested(Instant::now(), id)
                });
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                for r in &rr.reports {
                    shared.with_plane(direction, |p| {
                        p.fanout
                            .receiver_report(id, r.fraction_lost, r.total_lost, r.jitter)
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Rewrite;
    use rtc::rtp::header::Header;

    /// Rewrites one packet of publisher stream `ssrc`; returns (seq, timestamp) out.
    fn send(r: &mut Rewrite, at: Instant, ssrc: u32, seq: u16, ts: u32, key: bool) -> (u16, u32) {
        let mut h = Header {
            ssrc,
            sequence_number: seq,
            timestamp: ts,
            ..Default::default()
        };
        r.apply(&mut h, key, at);
        assert_eq!((h.ssrc, h.payload_type), (7, 96));
        (h.sequence_number, h.timestamp)
    }

    fn out(r: &mut Rewrite, seq: u16, keyframe_start: bool) -> u16 {
        send(r, Instant::now(), 1, seq, 0, keyframe_start).0
    }

    #[test]
    fn sequence_numbers_close_the_hole_left_by_a_drop_and_keep_upstream_gaps() {
        let mut r = Rewrite::new(7, 96, 90_000);
        assert_eq!(out(&mut r, 65534, true), 65534);
        assert_eq!(out(&mut r, 65535, false), 65535);
        // Packets 0..=9 skipped (waiting for a keyframe): the keyframe follows on.
        assert_eq!(out(&mut r, 10, true), 0);
        assert_eq!(out(&mut r, 11, false), 1);
        // An upstream loss inside a frame stays visible, so the agent can NACK it.
        assert_eq!(out(&mut r, 13, false), 3);
        // A keyframe right after the previous packet changes nothing.
        assert_eq!(out(&mut r, 14, true), 4);
    }

    #[test]
    fn a_new_publisher_stream_continues_the_subscribers_sequence_and_timestamps() {
        let t0 = Instant::now();
        let mut r = Rewrite::new(7, 96, 90_000);
        // The customer's first peer connection: timestamps are passed through.
        assert_eq!(
            send(&mut r, t0, 0xA, 100, 4_000_000_000, true),
            (100, 4_000_000_000)
        );
        assert_eq!(
            send(&mut r, t0, 0xA, 101, 4_000_000_000, false),
            (101, 4_000_000_000)
        );
        let t1 = t0 + Duration::from_millis(33);
        assert_eq!(
            send(&mut r, t1, 0xA, 102, 4_000_003_000, false),
            (102, 4_000_003_000)
        );
        // She comes back 2 s later on a new connection whose random bases are both
        // "behind" the old ones: the agent sees the stream go on, 2 s (180,000 ticks) on.
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(send(&mut r, t2, 0xB, 7, 1_000, true), (103, 4_000_183_000));
        let t3 = t2 + Duration::from_millis(33);
        assert_eq!(send(&mut r, t3, 0xB, 8, 4_000, false), (104, 4_000_186_000));
        // An audio-like lane (no keyframes) on a new stream continues as well.
        let mut a = Rewrite::new(7, 96, 48_000);
        assert_eq!(send(&mut a, t0, 0xA, 50, 960, false), (50, 960));
        let (seq, ts) = send(&mut a, t0 + Duration::from_millis(20), 0xB, 9000, 5, false);
        assert_eq!((seq, ts), (51, 960 + 960));
    }
}
