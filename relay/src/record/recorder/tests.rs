//! The recorder against the fixtures: packetized with the `rtc` crate's payloaders
//! (MTU 1200, as `TrackLocalStaticSample` does), fed with simulated time, and the
//! recording read back with the container's reader.

use std::time::{Duration, Instant};

use bytes::Bytes;
use relay_codec::frame::{NAL_AUD, annex_b_spans, frame_digest, nal_type, slice_starts_picture};
use relay_codec::keyframe::VideoCodec;
use relay_codec::recording::{
    ChatRecord, ChunkSettings, FooterStatus, GapKind, GapRecord, Record, Recording, TimedRecord,
};
use relay_codec::wire::{Audience, Role};
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::codec::vp8::Vp8Payloader;
use rtc::rtp::packetizer::Payloader;

use super::*;

fn fixture(name: &str) -> Bytes {
    let path = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

/// The frames of an IVF file.
fn ivf_frames(ivf: &Bytes) -> Vec<Bytes> {
    let mut at = usize::from(u16::from_le_bytes([ivf[6], ivf[7]]));
    let mut frames = Vec::new();
    while at + 12 <= ivf.len() {
        let len = u32::from_le_bytes(ivf[at..at + 4].try_into().expect("4 bytes")) as usize;
        frames.push(ivf.slice(at + 12..at + 12 + len));
        at += 12 + len;
    }
    frames
}

/// The access units of an Annex B stream (a new one at an AUD, or at a parameter set
/// or a picture's first slice after a slice).
fn access_units(bytes: &Bytes) -> Vec<Bytes> {
    let mut out = Vec::new();
    let (mut start, mut has_slice) = (None, false);
    for span in annex_b_spans(bytes) {
        let nal = &bytes[span.start..span.end];
        let ty = nal_type(nal).unwrap_or(0);
        let is_slice = (1..=5).contains(&ty);
        let starts_new = match ty {
            NAL_AUD => true,
            6..=8 => has_slice,
            _ if is_slice => has_slice && slice_starts_picture(nal),
            _ => false,
        };
        if starts_new && let Some(s) = start.take() {
            out.push(bytes.slice(s..span.prefix));
            has_slice = false;
        }
        start.get_or_insert(span.prefix);
        has_slice |= is_slice;
    }
    if let Some(s) = start {
        out.push(bytes.slice(s..));
    }
    out
}

/// RTP packets of `frames`, 3000 ticks (33 ms) apart.
fn packetize(codec: VideoCodec, frames: &[Bytes]) -> Vec<(u32, Vec<RtpVideo>)> {
    let mut payloader: Box<dyn Payloader> = match codec {
        VideoCodec::Vp8 => Box::new(Vp8Payloader::default()),
        VideoCodec::H264 => Box::new(H264Payloader::default()),
        _ => unreachable!("fixtures are VP8 and H.264"),
    };
    let mut seq = 65_000u16;
    frames
        .iter()
        .enumerate()
        .map(|(i, frame)| {
            let timestamp = 1000 + 3000 * i as u32;
            let payloads = payloader.payload(1200, frame).expect("payload");
            let n = payloads.len();
            let packets = payloads
                .into_iter()
                .enumerate()
                .map(|(j, payload)| {
                    seq = seq.wrapping_add(1);
                    RtpVideo {
                        codec,
                        sequence_number: seq,
                        timestamp,
                        marker: j + 1 == n,
                        payload,
                    }
                })
                .collect();
            (timestamp, packets)
        })
        .collect()
}

fn info() -> RecordingInfo {
    RecordingInfo {
        session_id: "s-1".into(),
        portal: "support".into(),
        start_unix_ms: 1_700_000_000_000,
    }
}

/// Feeds every packet, frame `i` at `i * 33` ms, keeping what `keep` says; returns the
/// file and the counters.
fn record(
    codec: VideoCodec,
    frames: &[Bytes],
    keep: impl Fn(usize, usize) -> bool,
) -> (Vec<u8>, RecorderCounters) {
    let t0 = Instant::now();
    let (mut recorder, header) = Recorder::new(&info(), t0, ChunkSettings::default()).unwrap();
    let mut file = header.to_vec();
    for (i, (_, packets)) in packetize(codec, frames).into_iter().enumerate() {
        let at = t0 + Duration::from_millis(33 * i as u64);
        for (j, p) in packets.into_iter().enumerate() {
            if keep(i, j) {
                recorder.handle(at, Input::Video(p));
            }
        }
        recorder.handle_timeout(at);
        while let Some(chunk) = recorder.poll_output() {
            file.extend_from_slice(&chunk);
        }
    }
    let counters = *recorder.counters();
    file.extend_from_slice(&recorder.finish());
    (file, counters)
}

fn video(file: &[u8]) -> Vec<(u64, VideoFrame)> {
    let recording = Recording::parse(file).expect("parses");
    assert_eq!(recording.footer(), FooterStatus::Valid);
    assert!(recording.verify().is_clean(), "{:?}", recording.verify());
    recording
        .records()
        .map(|r| r.expect("intact"))
        .filter_map(|TimedRecord { at_ms, record }| match record {
            Record::Video(v) => Some((at_ms, v)),
            _ => None,
        })
        .collect()
}

#[test]
fn every_vp8_fixture_frame_is_recorded_byte_for_byte_with_its_keyframe_flag() {
    let frames = ivf_frames(&fixture("screen-vp8.ivf"));
    assert!(frames.len() > 10 && VideoCodec::Vp8.is_keyframe(&frames[0]));
    let (file, counters) = record(VideoCodec::Vp8, &frames, |_, _| true);
    let recorded = video(&file);
    assert_eq!(recorded.len(), frames.len());
    for (i, ((at_ms, got), sent)) in recorded.iter().zip(&frames).enumerate() {
        assert_eq!(got.data, *sent, "frame {i}");
        assert_eq!(got.keyframe, VideoCodec::Vp8.is_keyframe(sent), "frame {i}");
        assert_eq!(*at_ms, 33 * i as u64);
        assert_eq!(got.rtp_timestamp, 1000 + 3000 * i as u32);
        assert_eq!(got.codec, 0, "VP8 is the header's first codec");
    }
    assert_eq!(counters.frames_recorded, frames.len() as u64);
    assert_eq!(
        (
            counters.frames_awaiting_keyframe,
            counters.frames_incomplete
        ),
        (0, 0)
    );
}

#[test]
fn every_h264_fixture_frame_is_recorded_with_its_keyframe_flag() {
    let frames = access_units(&fixture("screen-h264.h264"));
    assert!(
        frames.iter().any(|f| f.len() > 1200),
        "some frame needs FU-A"
    );
    let (file, counters) = record(VideoCodec::H264, &frames, |_, _| true);
    let recorded = video(&file);
    assert_eq!(recorded.len(), frames.len());
    let keyframes = frames
        .iter()
        .filter(|f| VideoCodec::H264.is_keyframe(f))
        .count();
    assert!(keyframes >= 1);
    for (i, ((_, got), sent)) in recorded.iter().zip(&frames).enumerate() {
        // The payloader drops delimiters and rewrites start codes: the pictures match.
        assert_eq!(
            frame_digest(VideoCodec::H264, &got.data),
            frame_digest(VideoCodec::H264, sent),
            "frame {i}"
        );
        assert_eq!(
            got.keyframe,
            VideoCodec::H264.is_keyframe(sent),
            "frame {i}"
        );
        assert_eq!(got.codec, 2, "H.264 is the header's third codec");
    }
    assert_eq!(counters.keyframes_recorded, keyframes as u64);
}

#[test]
fn recording_starts_at_the_first_keyframe_and_a_loss_waits_for_the_next() {
    let frames = ivf_frames(&fixture("screen-vp8.ivf"));
    let keys: Vec<usize> = (0..frames.len())
        .filter(|&i| VideoCodec::Vp8.is_keyframe(&frames[i]))
        .collect();
    assert!(keys.len() >= 2, "the fixture has two keyframes: {keys:?}");
    let packets = packetize(VideoCodec::Vp8, &frames);
    // Lose the second packet of a frame between the first two keyframes.
    let lossy = (keys[0] + 1..keys[1])
        .find(|&i| packets[i].1.len() >= 2)
        .expect("a delta frame of two packets");
    let (file, counters) = record(VideoCodec::Vp8, &frames, |i, j| !(i == lossy && j == 1));
    let recorded = video(&file);
    let expected: Vec<usize> = (keys[0]..lossy).chain(keys[1]..frames.len()).collect();
    assert_eq!(
        recorded
            .iter()
            .map(|(_, v)| v.rtp_timestamp)
            .collect::<Vec<_>>(),
        expected.iter().map(|&i| packets[i].0).collect::<Vec<_>>()
    );
    assert_eq!(counters.frames_incomplete, 1);
    assert_eq!(
        counters.frames_awaiting_keyframe,
        (keys[1] - lossy - 1) as u64
    );

    // Joining mid-stream: nothing before the first keyframe.
    let late = &frames[keys[0] + 1..];
    let (file, counters) = record(VideoCodec::Vp8, late, |_, _| true);
    let first_key = keys[1] - keys[0] - 1;
    assert_eq!(video(&file).len(), late.len() - first_key);
    assert!(video(&file)[0].1.keyframe);
    assert_eq!(counters.frames_awaiting_keyframe, first_key as u64);
}

#[test]
fn records_of_a_stream_arriving_out_of_order_are_kept_in_order_of_arrival() {
    let t0 = Instant::now();
    let (mut recorder, header) = Recorder::new(&info(), t0, ChunkSettings::default()).unwrap();
    let chat = |text: &str| {
        Input::Record(Record::Chat(ChatRecord {
            participant_id: "p-1".into(),
            name: "Alice".into(),
            role: Role::Host,
            masked: true,
            audience: Audience::All,
            text: text.into(),
        }))
    };
    recorder.handle(t0 + Duration::from_millis(20), chat("first"));
    // Stamped a moment earlier by another task: clamped, not refused.
    recorder.handle(t0 + Duration::from_millis(10), chat("second"));
    recorder.handle(
        t0 + Duration::from_millis(30),
        Input::Record(Record::Gap(GapRecord {
            kind: GapKind::KeyframesOnly,
            dropped: 0,
        })),
    );
    assert_eq!(recorder.counters().records, 3);
    assert!(recorder.poll_output().is_none(), "one open chunk");
    let mut file = header.to_vec();
    file.extend_from_slice(&recorder.finish());
    let records: Vec<TimedRecord> = Recording::parse(&file)
        .unwrap()
        .records()
        .map(|r| r.unwrap())
        .collect();
    let texts: Vec<(u64, String)> = records
        .iter()
        .filter_map(|r| match &r.record {
            Record::Chat(c) => Some((r.at_ms, c.text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        texts,
        vec![(20, "first".to_owned()), (20, "second".to_owned())]
    );
}

#[test]
fn a_quiet_session_s_records_reach_the_file_on_the_timer() {
    let t0 = Instant::now();
    let (mut recorder, _) = Recorder::new(&info(), t0, ChunkSettings::default()).unwrap();
    recorder.handle(
        t0,
        Input::Record(Record::Gap(GapRecord {
            kind: GapKind::CustomerReturned,
            dropped: 0,
        })),
    );
    recorder.handle_timeout(t0 + Duration::from_millis(999));
    assert!(recorder.poll_output().is_none());
    recorder.handle_timeout(t0 + Duration::from_millis(1000));
    assert!(recorder.poll_output().is_some());
}
