//! Tests of the whole container: golden layouts, round trips, chunk cutting, seeking,
//! and damaged files. The property tests are in `properties.rs`.

mod properties;

use bytes::Bytes;

use super::chunk::{self, Summary};
use super::records;
use super::*;
use crate::wire::{Audience, Permission, Role, Visibility};

fn header() -> RecordingHeader {
    RecordingHeader {
        session_id: "s1".into(),
        portal: "p".into(),
        start_unix_ms: 0x0102_0304_0506_0708,
        video_codecs: vec!["video/VP8".into()],
        audio_codecs: vec![],
    }
}

fn video(keyframe: bool, len: usize, fill: u8) -> Record {
    Record::Video(VideoFrame {
        keyframe,
        codec: 0,
        rtp_timestamp: u32::from(fill) * 3000,
        data: Bytes::from(vec![fill; len]),
    })
}

fn chat(text: &str) -> Record {
    Record::Chat(ChatRecord {
        participant_id: "a1".into(),
        name: "Ann".into(),
        role: Role::Agent,
        masked: true,
        audience: Audience::Agents,
        text: text.into(),
    })
}

fn gap(kind: GapKind, dropped: u32) -> Record {
    Record::Gap(GapRecord { kind, dropped })
}

/// A whole file and the pieces the writer handed out, in order.
struct Written {
    file: Vec<u8>,
    header_len: usize,
    chunks: Vec<ChunkInfo>,
}

impl Written {
    /// The file without its footer, as a crash would leave it.
    fn without_footer(&self) -> &[u8] {
        let end = self
            .chunks
            .last()
            .map_or(self.header_len as u64, |c| c.range().end);
        &self.file[..end as usize]
    }
}

fn write(records: &[TimedRecord], settings: ChunkSettings) -> Written {
    let (mut writer, head) = RecordingWriter::new(&header(), settings).unwrap();
    let mut file = head.to_vec();
    for r in records {
        if let Some(chunk) = writer.push(r.at_ms, &r.record).unwrap() {
            file.extend_from_slice(&chunk);
        }
    }
    let chunks = {
        let mut chunks = writer.chunks().to_vec();
        let before = writer.bytes_written();
        let tail = writer.finish();
        if let Ok((info, _)) = chunk::parse_header(&tail, before) {
            chunks.push(info);
        }
        file.extend_from_slice(&tail);
        chunks
    };
    Written {
        file,
        header_len: head.len(),
        chunks,
    }
}

fn timed(at_ms: u64, record: Record) -> TimedRecord {
    TimedRecord { at_ms, record }
}

fn all_records(recording: &Recording<'_>) -> Vec<TimedRecord> {
    recording.records().map(Result::unwrap).collect()
}

/// A session of about 3 s: 30 fps video with a keyframe every second, chat, roster,
/// input and a file transfer, cut into chunks by the default settings.
fn session() -> Vec<TimedRecord> {
    let mut out = vec![timed(
        0,
        Record::Roster(RosterRecord {
            change: RosterChange::Joined,
            participant_id: "c".into(),
            role: Role::Customer,
            name: "Carl".into(),
            visibility: Visibility::Visible,
            permission: Permission::View,
        }),
    )];
    for i in 0..90u64 {
        let at = i * 33;
        out.push(timed(
            at,
            video(i % 30 == 0, 900 + (i as usize % 7) * 50, i as u8),
        ));
        if i % 10 == 5 {
            out.push(timed(at + 1, chat(&format!("line {i}"))));
            out.push(timed(
                at + 2,
                Record::Input(InputRecord {
                    participant_id: "a1".into(),
                    outcome: InputOutcome::Delivered,
                    event: Bytes::from_static(&[1, 5, 0, 0, 0, 0]),
                }),
            ));
        }
    }
    out.push(timed(
        2000,
        Record::FileTransfer(FileTransferRecord {
            participant_id: "a1".into(),
            direction: FileDirection::ToCustomer,
            outcome: FileOutcome::Completed,
            size: 1234,
            name: "fix.reg".into(),
        }),
    ));
    out.sort_by_key(|r| r.at_ms);
    out
}

/// If this fails, the file layout changed: bump the version instead of editing the
/// expected bytes. CRCs were computed independently (Python's `zlib.crc32`).
#[test]
fn golden_header_chunk_and_footer() {
    let (mut writer, head) = RecordingWriter::new(&header(), ChunkSettings::default()).unwrap();
    #[rustfmt::skip]
    let expected_header: &[u8] = &[
        0x89, b'R', b'L', b'Y', b'R', b'E', b'C', b'\n', // magic
        1, 0,                                            // version 1.0
        28, 0,                                           // body length
        2, 0, b's', b'1',                                // session id
        1, 0, b'p',                                      // portal
        8, 7, 6, 5, 4, 3, 2, 1,                          // start, Unix ms
        1, 9, 0, b'v', b'i', b'd', b'e', b'o', b'/', b'V', b'P', b'8', // video codecs
        0,                                               // audio codecs
        0xe5, 0x2a, 0xf5, 0x92,                          // CRC-32 of the above
    ];
    assert_eq!(head.as_ref(), expected_header);

    assert_eq!(
        writer.push(5, &gap(GapKind::KeyframesOnly, 3)).unwrap(),
        None
    );
    let chunk = writer.flush().unwrap();
    #[rustfmt::skip]
    let expected_chunk: &[u8] = &[
        b'R', b'C', b'H', b'K',                          // sync marker
        0, 0, 0, 0,                                      // seq
        5, 0, 0, 0, 0, 0, 0, 0,                          // first_ms
        5, 0, 0, 0, 0, 0, 0, 0,                          // last_ms
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  // no keyframe
        1, 0, 0, 0,                                      // record count
        0, 0, 0, 0,                                      // flags, stored (zstd would grow it), reserved
        18, 0, 0, 0,                                     // stored length
        18, 0, 0, 0,                                     // raw length
        0x64, 0x90, 0x79, 0x50,                          // CRC-32 of the payload
        0xe9, 0xec, 0xcd, 0x83,                          // CRC-32 of this header
        // payload: one gap record
        7,                                               // tag
        5, 0, 0, 0, 0, 0, 0, 0,                          // at_ms
        5, 0, 0, 0,                                      // body length
        2,                                               // keyframes only
        3, 0, 0, 0,                                      // dropped
    ];
    assert_eq!(chunk.as_ref(), expected_chunk);

    #[rustfmt::skip]
    let expected_footer: &[u8] = &[
        b'R', b'I', b'D', b'X', 1, 0, 0, 0,              // index magic, chunk count
        44, 0, 0, 0, 0, 0, 0, 0,                         // offset
        0, 0, 0, 0,                                      // seq
        74, 0, 0, 0,                                     // length
        5, 0, 0, 0, 0, 0, 0, 0,                          // first_ms
        5, 0, 0, 0, 0, 0, 0, 0,                          // last_ms
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  // no keyframe
        1, 0, 0, 0,                                      // record count
        0, 0, 0, 0,                                      // flags, reserved
        118, 0, 0, 0, 0, 0, 0, 0,                        // trailer: index offset
        56, 0, 0, 0,                                     // index length
        0x68, 0xe8, 0xab, 0xd6,                          // CRC-32 of the index
        1, 0, 0, 0,                                      // chunk count
        0x55, 0x42, 0x82, 0xa8,                          // CRC-32 of the trailer so far
        b'R', b'L', b'Y', b'R', b'E', b'N', b'D', b'\n', // end magic
    ];
    assert_eq!(writer.finish().as_ref(), expected_footer);
}

/// Each record type's exact encoding inside a chunk payload.
#[test]
fn golden_record_layouts() {
    let cases: Vec<(Record, &[u8])> = vec![
        (
            Record::Video(VideoFrame {
                keyframe: true,
                codec: 0,
                rtp_timestamp: 0x0403_0201,
                data: Bytes::from_static(&[0xaa, 0xbb]),
            }),
            &[1, 0, 1, 2, 3, 4, 2, 0, 0, 0, 0xaa, 0xbb],
        ),
        (
            Record::Audio(AudioFrame {
                codec: 1,
                rtp_timestamp: 9,
                data: Bytes::from_static(&[7]),
            }),
            &[1, 9, 0, 0, 0, 1, 0, 0, 0, 7],
        ),
        (
            Record::Input(InputRecord {
                participant_id: "a".into(),
                outcome: InputOutcome::RefusedViewOnly,
                event: Bytes::from_static(&[1, 5, 0, 0, 0, 0]),
            }),
            &[1, 0, b'a', 1, 6, 0, 0, 0, 1, 5, 0, 0, 0, 0],
        ),
        (
            chat("hé"),
            &[
                2, 0, b'a', b'1', 3, 0, b'A', b'n', b'n', 1, 1, 1, 3, 0, b'h', 0xc3, 0xa9,
            ],
        ),
        (
            Record::Roster(RosterRecord {
                change: RosterChange::PermissionChanged,
                participant_id: "a".into(),
                role: Role::Host,
                name: "B".into(),
                visibility: Visibility::Masked,
                permission: Permission::Control,
            }),
            &[4, 1, 0, b'a', 0, 1, 0, b'B', 1, 1],
        ),
        (
            Record::FileTransfer(FileTransferRecord {
                participant_id: "a".into(),
                direction: FileDirection::FromCustomer,
                outcome: FileOutcome::Declined,
                size: 0x0102,
                name: "f".into(),
            }),
            &[1, 0, b'a', 0, 2, 2, 1, 0, 0, 0, 0, 0, 0, 1, 0, b'f'],
        ),
        (gap(GapKind::CustomerReconnecting, 0), &[0, 0, 0, 0, 0]),
    ];
    for (tag, (record, body)) in (1u8..).zip(cases) {
        let mut out = Vec::new();
        records::encode(0x1122, &record, &mut out).unwrap();
        let mut expected = vec![tag, 0x22, 0x11, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&(body.len() as u32).to_le_bytes());
        expected.extend_from_slice(body);
        assert_eq!(out, expected, "{record:?}");
        let decoded = records::decode_all(&Bytes::from(out)).unwrap();
        assert!(
            matches!(&decoded[..], [records::Decoded::Known(r)] if r.record == record && r.at_ms == 0x1122)
        );
    }
}

#[test]
fn compressible_chunks_are_zstd() {
    let (mut writer, _) = RecordingWriter::new(&header(), ChunkSettings::default()).unwrap();
    let mut raw = Vec::new();
    for i in 0..50 {
        let record = chat("the same words again and again");
        writer.push(i, &record).unwrap();
        records::encode(i, &record, &mut raw).unwrap();
    }
    let chunk = writer.flush().unwrap();
    assert_eq!(chunk[37], 1, "compression byte: zstd");
    let stored = u32::from_le_bytes(chunk[40..44].try_into().unwrap()) as usize;
    let raw_len = u32::from_le_bytes(chunk[44..48].try_into().unwrap()) as usize;
    assert_eq!(raw_len, raw.len());
    assert!(stored * 4 < raw_len, "{stored} of {raw_len}");
    let payload = &chunk[CHUNK_HEADER_BYTES..];
    assert_eq!(payload.len(), stored);
    assert_eq!(zstd::bulk::decompress(payload, raw_len).unwrap(), raw);
}

#[test]
fn round_trip_of_a_session() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    let recording = Recording::parse(&written.file).unwrap();
    assert_eq!(recording.header(), &header());
    assert_eq!(recording.footer(), FooterStatus::Valid);
    assert_eq!(recording.chunks(), &written.chunks[..]);
    assert!(recording.chunks().len() >= 3, "1 s chunks over 3 s");
    assert_eq!(all_records(&recording), records);

    let report = recording.verify();
    assert!(report.is_clean(), "{report}");
    assert_eq!(report.chunks_ok, recording.chunks().len());
    assert_eq!(report.counts.video_frames, 90);
    assert_eq!(report.counts.keyframes, 3);
    assert_eq!(report.counts.chat_messages, 9);
    assert_eq!(report.counts.input_events, 9);
    assert_eq!(report.counts.roster_events, 1);
    assert_eq!(report.counts.file_transfers, 1);
    assert_eq!(report.duration_ms, 89 * 33);
    assert_eq!(
        report.intact_bytes + 8 + 48 * report.chunks_ok as u64 + 32,
        report.file_bytes
    );
    assert!(report.to_string().starts_with("recording intact"));
}

#[test]
fn chunks_start_at_keyframes_and_respect_the_bounds() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    for chunk in &written.chunks {
        assert!(chunk.last_ms - chunk.first_ms < 1000, "{chunk:?}");
        // Keyframes come every 990 ms, so every chunk but the first-cut ones starts
        // with one: here, each chunk starts exactly at a keyframe.
        assert!(chunk.starts_with_keyframe, "{chunk:?}");
        assert_eq!(chunk.first_keyframe_ms, Some(chunk.first_ms));
    }

    // By size: a 4 KiB bound cuts every few frames, not at keyframes.
    let small = ChunkSettings {
        max_raw_bytes: 4096,
        ..ChunkSettings::default()
    };
    let written = write(&records, small);
    let recording = Recording::parse(&written.file).unwrap();
    assert!(written.chunks.len() > 20);
    for index in 0..written.chunks.len() {
        let raw: usize = recording
            .read_chunk(index)
            .unwrap()
            .iter()
            .map(|r| {
                let mut out = Vec::new();
                records::encode(r.at_ms, &r.record, &mut out).unwrap();
                out.len()
            })
            .sum();
        assert!(raw <= 4096, "chunk {index}: {raw}");
    }
    assert!(written.chunks.iter().any(|c| !c.starts_with_keyframe));
    assert_eq!(all_records(&recording), records);
}

#[test]
fn a_long_gop_is_cut_anyway() {
    // One keyframe, then 3 s of delta frames: chunks of 1 s, only the first seekable.
    let records: Vec<_> = (0..90u64)
        .map(|i| timed(i * 33, video(i == 0, 100, i as u8)))
        .collect();
    let written = write(&records, ChunkSettings::default());
    let starts: Vec<_> = written
        .chunks
        .iter()
        .map(|c| c.starts_with_keyframe)
        .collect();
    assert_eq!(starts, [true, false, false]);
    assert_eq!(written.chunks[1].first_keyframe_ms, None);
}

#[test]
fn frequent_keyframes_do_not_make_tiny_chunks() {
    // Every frame a keyframe: a cut at most every keyframe_cut_min_ms.
    let records: Vec<_> = (0..60u64)
        .map(|i| timed(i * 33, video(true, 50, i as u8)))
        .collect();
    let written = write(&records, ChunkSettings::default());
    assert_eq!(written.chunks.len(), 60 * 33 / 264 + 1);
    assert!(written.chunks.iter().all(|c| c.starts_with_keyframe));
}

#[test]
fn an_oversized_frame_gets_its_own_chunk() {
    let settings = ChunkSettings {
        max_raw_bytes: 1000,
        ..ChunkSettings::default()
    };
    let records = vec![
        timed(0, chat("hi")),
        timed(1, video(true, 5000, 1)),
        timed(2, video(false, 10, 2)),
    ];
    let written = write(&records, settings);
    let counts: Vec<_> = written.chunks.iter().map(|c| c.record_count).collect();
    assert_eq!(counts, [1, 1, 1]);
    assert_eq!(
        all_records(&Recording::parse(&written.file).unwrap()),
        records
    );
}

#[test]
fn poll_flush_closes_an_idle_chunk() {
    let (mut writer, _) = RecordingWriter::new(&header(), ChunkSettings::default()).unwrap();
    assert_eq!(writer.poll_flush(5000), None, "nothing open");
    writer.push(100, &chat("anyone?")).unwrap();
    assert_eq!(writer.poll_flush(1099), None);
    let chunk = writer.poll_flush(1100).unwrap();
    assert_eq!(&chunk[..4], b"RCHK");
    assert_eq!(writer.flush(), None);
    assert_eq!(writer.chunks().len(), 1);
}

#[test]
fn the_writer_refuses_bad_records_and_records_nothing_of_them() {
    let (mut writer, head) = RecordingWriter::new(&header(), ChunkSettings::default()).unwrap();
    writer.push(100, &chat("a")).unwrap();
    assert_eq!(
        writer.push(99, &chat("b")),
        Err(RecordError::OutOfOrder {
            stream: Stream::Chat,
            at_ms: 99,
            last_ms: 100
        })
    );
    // Other streams may be slightly behind.
    writer.push(50, &gap(GapKind::RecordsDropped, 2)).unwrap();
    let mut other_codec = video(true, 1, 0);
    if let Record::Video(frame) = &mut other_codec {
        frame.codec = 1;
    }
    assert_eq!(
        writer.push(100, &other_codec),
        Err(RecordError::UnknownCodec {
            stream: Stream::Video,
            codec: 1
        })
    );
    assert!(matches!(
        writer.push(100, &video(true, MAX_RECORD_BYTES + 1, 0)),
        Err(RecordError::TooLarge { .. })
    ));
    assert!(matches!(
        writer.push(100, &chat(&"x".repeat(70_000))),
        Err(RecordError::Field(FieldError::TooLong {
            field: "text",
            ..
        }))
    ));
    assert_eq!(
        writer.push(u64::MAX, &chat("c")),
        Err(RecordError::TimeOutOfRange(u64::MAX))
    );
    let mut file = head.to_vec();
    file.extend_from_slice(&writer.finish());
    let recording = Recording::parse(&file).unwrap();
    assert_eq!(
        all_records(&recording),
        [
            timed(100, chat("a")),
            timed(50, gap(GapKind::RecordsDropped, 2))
        ]
    );
    assert_eq!(recording.chunks()[0].first_ms, 50);
    assert!(recording.verify().is_clean());
}

#[test]
fn seeking_reads_only_the_chunks_needed() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    let recording = Recording::parse(&written.file).unwrap();
    let chunks = recording.chunks().len();
    for from_ms in [0, 500, 989, 990, 1500, 2500, 2937, 5000] {
        let seek = recording.seek_chunk(from_ms);
        let mut iter = recording.records_from(from_ms);
        let got: Vec<_> = iter.by_ref().map(Result::unwrap).collect();
        let start = seek.unwrap_or(chunks);
        assert_eq!(iter.chunks_read(), chunks - start, "from {from_ms}");

        // Video: from the last keyframe at or before from_ms, every frame after it.
        let last_key = records
            .iter()
            .rposition(|r| r.record.is_keyframe() && r.at_ms <= from_ms)
            .unwrap();
        let expected: Vec<_> = records
            .iter()
            .enumerate()
            .filter(|(i, r)| match r.record {
                Record::Video(_) => *i >= last_key,
                _ => r.at_ms >= from_ms,
            })
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(got, expected, "from {from_ms}");
        assert!(got[0].record.is_keyframe() || got[0].at_ms >= from_ms);
    }
}

#[test]
fn seeking_before_the_first_keyframe_starts_video_at_it() {
    let records: Vec<_> = (0..10u64)
        .map(|i| timed(i * 100, video(i == 4 || i == 8, 10, i as u8)))
        .chain([timed(250, chat("early"))])
        .collect();
    let mut records = records;
    records.sort_by_key(|r| r.at_ms);
    let written = write(&records, ChunkSettings::default());
    let recording = Recording::parse(&written.file).unwrap();
    let got: Vec<_> = recording.records_from(200).map(Result::unwrap).collect();
    let times: Vec<_> = got.iter().map(|r| r.at_ms).collect();
    assert_eq!(times, [250, 400, 500, 600, 700, 800, 900]);
    assert!(got[1].record.is_keyframe());
}

#[test]
fn a_file_without_its_footer_is_found_by_a_scan_and_repaired() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    let cut = written.without_footer();
    let recording = Recording::parse(cut).unwrap();
    assert_eq!(recording.footer(), FooterStatus::Absent);
    assert_eq!(recording.chunks(), &written.chunks[..]);
    assert_eq!(all_records(&recording), records);
    let report = recording.verify();
    assert_eq!(report.chunks_ok, written.chunks.len());
    assert!(report.corrupt.is_empty() && report.tail.is_none() && !report.is_clean());

    let repaired = repair(cut).unwrap();
    assert_eq!(
        repaired.as_ref(),
        &written.file[..],
        "the same file as a clean finish"
    );
}

#[test]
fn a_damaged_chunk_is_dropped_by_repair_and_stays_visible_as_missing() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    let mut file = written.file.clone();
    let victim = written.chunks[1];
    file[victim.offset as usize + 100] ^= 0x10;
    let repaired = repair(&file).unwrap();
    let recording = Recording::parse(&repaired).unwrap();
    let report = recording.verify();
    assert_eq!(report.footer, FooterStatus::Valid);
    assert_eq!(report.chunks_ok, written.chunks.len() - 1);
    assert_eq!(report.missing_seqs, [std::ops::Range { start: 1, end: 2 }]);
    assert!(!report.is_clean());
    assert!(
        report.to_string().contains("missing chunks: 1..2"),
        "{report}"
    );
}

#[test]
fn scan_skips_garbage_between_chunks() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    let body = written.without_footer();
    let split = written.chunks[1].offset as usize;
    let mut file = body[..split].to_vec();
    file.extend_from_slice(b"RCHK garbage that looks like a chunk for four bytes");
    file.extend_from_slice(&body[split..]);
    let recording = Recording::parse(&file).unwrap();
    let report = recording.verify();
    assert_eq!(report.chunks_ok, written.chunks.len());
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].range.start, split as u64);
    assert_eq!(
        report.corrupt[0].range.end - report.corrupt[0].range.start,
        51
    );
    assert_eq!(all_records(&recording), records);
}

#[test]
fn damaged_chunk_headers_in_a_file_without_footer() {
    let records = session();
    let written = write(&records, ChunkSettings::default());
    let body = written.without_footer();
    let last = *written.chunks.last().unwrap();
    let at = |field: u64| (last.offset + field) as usize;

    // A damaged seq: the header's length still fits the file, so the chunk is known
    // to be damaged, not cut off.
    let mut file = body.to_vec();
    file[at(4)] ^= 1;
    let report = Recording::parse(&file).unwrap().verify();
    assert_eq!(report.chunks_ok, written.chunks.len() - 1);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].range, last.range());
    assert_eq!(report.corrupt[0].error, ChunkError::HeaderChecksum);
    assert!(report.tail.is_none());

    // A damaged sync marker: nothing tells the chunk from a cut-off one, so its bytes
    // are the lost tail.
    let mut file = body.to_vec();
    file[at(0)] ^= 1;
    let report = Recording::parse(&file).unwrap().verify();
    assert_eq!(report.chunks_ok, written.chunks.len() - 1);
    assert!(report.corrupt.is_empty());
    let tail = report.tail.unwrap();
    assert_eq!(tail.range, last.range());
    assert_eq!(tail.kind, TailKind::Unrecognized);
}

#[test]
fn unknown_record_types_and_newer_minor_versions_are_read() {
    // A chunk with a record of a future type 200 between two known ones.
    let mut raw = Vec::new();
    records::encode(1, &chat("before"), &mut raw).unwrap();
    raw.push(200);
    raw.extend_from_slice(&2u64.to_le_bytes());
    raw.extend_from_slice(&3u32.to_le_bytes());
    raw.extend_from_slice(b"new");
    records::encode(3, &chat("after"), &mut raw).unwrap();
    let mut summary = Summary::default();
    for at in [1, 2, 3] {
        summary.add(at, false, false);
    }
    // A newer minor version with an extra header field.
    let mut head = header().encode().unwrap();
    head.truncate(head.len() - 4);
    head[9] = 7;
    head[10] += 2;
    head.extend_from_slice(&[0xab, 0xcd]);
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    let (_, chunk) = chunk::encode(0, head.len() as u64, &summary, &raw, None);
    let file = [head, chunk].concat();

    let recording = Recording::parse(&file).unwrap();
    assert_eq!(recording.header(), &header());
    assert_eq!(
        all_records(&recording),
        [timed(1, chat("before")), timed(3, chat("after"))]
    );
    assert_eq!(recording.verify().counts.unknown, 1);
}

#[test]
fn headers_that_cannot_be_read() {
    let head = header().encode().unwrap();
    assert_eq!(
        Recording::parse(b"RIFF....WAVE").unwrap_err(),
        RecordingError::NotARecording
    );
    let mut v2 = head.clone();
    v2[8] = 2;
    assert_eq!(
        Recording::parse(&v2).unwrap_err(),
        RecordingError::UnsupportedVersion { major: 2, minor: 0 }
    );
    let mut flipped = head.clone();
    flipped[20] ^= 1;
    assert_eq!(
        Recording::parse(&flipped).unwrap_err(),
        RecordingError::HeaderChecksum
    );
    assert_eq!(
        Recording::parse(&head[..20]).unwrap_err(),
        RecordingError::Truncated {
            len: 20,
            needed: head.len()
        }
    );
    // A header alone is an empty recording that was never finished.
    let empty = Recording::parse(&head).unwrap();
    assert_eq!(empty.footer(), FooterStatus::Absent);
    assert!(empty.chunks().is_empty());
}

#[test]
fn corrupt_lengths_allocate_nothing_large() {
    // A chunk header claiming 16 MiB raw and a 1 GiB payload, with valid CRCs.
    let head = header().encode().unwrap();
    let mut chunk = b"RCHK".to_vec();
    chunk.extend_from_slice(&[0; 4]);
    chunk.extend_from_slice(&[0; 16]);
    chunk.extend_from_slice(&u64::MAX.to_le_bytes());
    chunk.extend_from_slice(&1u32.to_le_bytes());
    chunk.extend_from_slice(&[0, 1, 0, 0]);
    chunk.extend_from_slice(&(1u32 << 30).to_le_bytes());
    chunk.extend_from_slice(&(MAX_CHUNK_RAW_BYTES as u32).to_le_bytes());
    chunk.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32fast::hash(&chunk);
    chunk.extend_from_slice(&crc.to_le_bytes());
    let file = [head, chunk].concat();
    let recording = Recording::parse(&file).unwrap();
    assert!(
        recording.chunks().is_empty(),
        "stored length over the limit"
    );
    assert_eq!(
        recording.verify().tail.unwrap().kind,
        TailKind::Unrecognized
    );
}
