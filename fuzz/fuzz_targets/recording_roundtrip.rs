//! The recording writer and reader together: records built from the fuzz input are
//! written with small chunk bounds, read back exactly, then the file is cut and one
//! byte damaged, and the reader must keep every chunk the damage did not touch.
//!
//! This reaches the zstd path with valid frames, which `recording_parse` rarely does.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use relay_codec::recording::{
    CHUNK_HEADER_BYTES, ChatRecord, ChunkSettings, GapKind, GapRecord, InputOutcome, InputRecord,
    Record, Recording, RecordingHeader, RecordingWriter, TimedRecord, VideoFrame,
};
use relay_codec::wire::{Audience, Role};

fn bytes(u: &mut Unstructured<'_>, max: u8) -> Result<Bytes> {
    let len = usize::from(u.int_in_range(0..=max)?);
    Ok(Bytes::copy_from_slice(u.bytes(len)?))
}

fn record(u: &mut Unstructured<'_>) -> Result<Record> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 | 1 => Record::Video(VideoFrame {
            keyframe: u.arbitrary()?,
            codec: 0,
            rtp_timestamp: u.arbitrary()?,
            data: bytes(u, 200)?,
        }),
        2 => Record::Chat(ChatRecord {
            participant_id: u.arbitrary()?,
            name: u.arbitrary()?,
            role: Role::Agent,
            masked: u.arbitrary()?,
            audience: Audience::All,
            text: u.arbitrary()?,
        }),
        _ => match u.arbitrary::<bool>()? {
            true => Record::Gap(GapRecord {
                kind: GapKind::from_u8(u.arbitrary()?),
                dropped: u.arbitrary()?,
            }),
            false => Record::Input(InputRecord {
                participant_id: u.arbitrary()?,
                outcome: InputOutcome::Malformed,
                event: bytes(u, 20)?,
            }),
        },
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let header = RecordingHeader {
        session_id: u.arbitrary()?,
        portal: u.arbitrary()?,
        start_unix_ms: u.arbitrary()?,
        video_codecs: vec!["video/VP8".into()],
        audio_codecs: vec![],
    };
    let settings = ChunkSettings {
        max_raw_bytes: usize::from(u.int_in_range(50..=2000u16)?),
        max_media_ms: u64::from(u.int_in_range(1..=200u8)?),
        keyframe_cut_min_ms: u64::from(u.int_in_range(0..=100u8)?),
        zstd_level: 1,
    };
    let Ok((mut writer, head)) = RecordingWriter::new(&header, settings) else {
        return Ok(());
    };
    let head_len = head.len();
    let mut file = head.to_vec();
    let mut written = Vec::new();
    let mut at_ms = 0u64;
    while !u.is_empty() && written.len() < 200 {
        at_ms += u64::from(u.int_in_range(0..=30u8)?);
        let record = record(u)?;
        match writer.push(at_ms, &record) {
            Ok(closed) => file.extend_from_slice(&closed.unwrap_or_default()),
            // Only a string over 64 KiB, which a long input can build.
            Err(_) => continue,
        }
        written.push(TimedRecord { at_ms, record });
    }
    file.extend_from_slice(&writer.finish());

    let recording = Recording::parse(&file).expect("a finished file");
    assert!(recording.verify().is_clean());
    let read: Vec<_> = recording.records().map(|r| r.expect("intact")).collect();
    assert_eq!(read, written);
    let chunks = recording.chunks().to_vec();

    // Cut the file and damage one payload byte before the cut. (Fuzzing builds ignore
    // checksums, so damage to a chunk header could pass for a valid header there.)
    let cut = u.int_in_range(0..=file.len())?;
    let mut damaged = file[..cut].to_vec();
    let hit = if cut > 0 {
        let at = u.int_in_range(0..=cut - 1)?;
        damaged[at] ^= u.int_in_range(1..=255u8)?;
        Some(at as u64)
    } else {
        None
    };
    let in_payload = |h: u64| {
        chunks
            .iter()
            .any(|c| h >= c.offset + CHUNK_HEADER_BYTES as u64 && h < c.range().end)
    };
    let recording = Recording::parse(&damaged);
    if cut >= head_len && hit.is_none_or(in_payload) {
        let report = recording.expect("the header is intact").verify();
        let untouched = chunks
            .iter()
            .filter(|c| c.range().end <= cut as u64 && !hit.is_some_and(|h| c.range().contains(&h)))
            .count();
        assert!(report.chunks_ok >= untouched, "{report}");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
