//! Properties over truncated, damaged and random files: never a panic, and every
//! chunk the damage did not touch is still read.

use proptest::prelude::*;

use super::*;

/// Small settings so that a few dozen records make several chunks.
fn small_settings() -> ChunkSettings {
    ChunkSettings {
        max_raw_bytes: 300,
        max_media_ms: 100,
        keyframe_cut_min_ms: 30,
        zstd_level: 1,
    }
}

fn any_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        4 => (any::<bool>(), 0..120usize, any::<u8>()).prop_map(|(k, len, fill)| video(k, len, fill)),
        1 => "[a-z ]{0,40}".prop_map(|text| chat(&text)),
        1 => (0..5u8, any::<u32>()).prop_map(|(kind, n)| gap(GapKind::from_u8(kind), n)),
    ]
}

/// A small recording: records 0..20 ms apart, in time order.
fn any_session() -> impl Strategy<Value = Vec<TimedRecord>> {
    proptest::collection::vec((0..20u64, any_record()), 1..40).prop_map(|steps| {
        let mut at_ms = 0;
        steps
            .into_iter()
            .map(|(step, record)| {
                at_ms += step;
                timed(at_ms, record)
            })
            .collect()
    })
}

fn records_of_chunks(
    written: &Written,
    records: &[TimedRecord],
    keep: impl Fn(usize) -> bool,
) -> Vec<TimedRecord> {
    // Chunks hold consecutive records, so the records of chunk i are the next
    // record_count ones.
    let mut out = Vec::new();
    let mut next = 0;
    for (i, chunk) in written.chunks.iter().enumerate() {
        let n = chunk.record_count as usize;
        if keep(i) {
            out.extend_from_slice(&records[next..next + n]);
        }
        next += n;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn round_trips(records in any_session()) {
        let written = write(&records, small_settings());
        let recording = Recording::parse(&written.file).unwrap();
        prop_assert!(recording.verify().is_clean());
        prop_assert_eq!(all_records(&recording), records);
    }

    /// A flipped bit in a chunk loses that chunk and nothing else; in the footer, it
    /// loses nothing (the scan finds every chunk); in the header, the file is refused.
    #[test]
    fn a_bit_flip_loses_at_most_its_chunk(
        records in any_session(),
        bit in any::<prop::sample::Index>(),
        keep_footer in any::<bool>(),
    ) {
        let written = write(&records, small_settings());
        let mut file = if keep_footer { written.file.clone() } else { written.without_footer().to_vec() };
        let bit = bit.index(file.len() * 8);
        let byte = (bit / 8) as u64;
        file[bit / 8] ^= 1 << (bit % 8);

        let recording = match Recording::parse(&file) {
            Ok(recording) => recording,
            Err(err) => {
                prop_assert!(byte < written.header_len as u64, "{err:?}");
                return Ok(());
            }
        };
        let hit = written.chunks.iter().position(|c| c.range().contains(&byte));
        let report = recording.verify();
        prop_assert_eq!(report.chunks_ok, written.chunks.len() - usize::from(hit.is_some()), "{}", report);
        match hit {
            Some(i) => {
                // The chunk's bytes are reported lost: as a corrupt chunk or, for the
                // last chunk of a file without footer whose sync marker or length was
                // hit (nothing then tells it from a cut-off chunk), as the tail.
                let lost: Vec<_> = report
                    .corrupt
                    .iter()
                    .map(|c| c.range.clone())
                    .chain(report.tail.iter().map(|t| t.range.clone()))
                    .collect();
                prop_assert_eq!(lost, vec![written.chunks[i].range()], "{}", report);
                if let Some(tail) = &report.tail {
                    prop_assert!(!keep_footer && i + 1 == written.chunks.len());
                    prop_assert_eq!(tail.kind, TailKind::Unrecognized);
                }
                // A scan that cannot read a chunk's header does not know its number.
                prop_assert!(report.corrupt.iter().all(|c| c.seq == Some(written.chunks[i].seq) || c.seq.is_none()));
                let survivors: Vec<_> = recording.records().filter_map(Result::ok).collect();
                prop_assert_eq!(survivors, records_of_chunks(&written, &records, |j| j != i));
            }
            None => {
                prop_assert!(report.corrupt.is_empty(), "{}", report);
                prop_assert_eq!(all_records(&recording), records.clone());
            }
        }
        let repaired = repair(&file).unwrap();
        let again = Recording::parse(&repaired).unwrap();
        prop_assert_eq!(again.footer(), FooterStatus::Valid);
        prop_assert_eq!(again.verify().chunks_ok, report.chunks_ok);
    }

    /// Arbitrary bytes after a valid header never panic, and whatever reads as chunks
    /// is accounted for.
    #[test]
    fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..600), seed in 0..4u8) {
        let mut file = header().encode().unwrap();
        // Half the inputs carry sync markers, so the scan gets to chunk headers.
        if seed % 2 == 0 {
            file.extend_from_slice(b"RCHK");
        }
        file.extend_from_slice(&tail);
        if seed >= 2 {
            file.extend_from_slice(&TRAILER_MAGIC);
        }
        let recording = Recording::parse(&file).unwrap();
        let report = recording.verify();
        prop_assert!(report.chunks_ok + report.corrupt.len() >= recording.chunks().len());
        let _ = recording.records_from(5).count();
        let _ = repair(&file).unwrap();
    }
}

proptest! {
    // Each case reads every cut of its file: a few cases suffice.
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Every cut of a small recording reads, and yields exactly the chunks complete
    /// before the cut; a cut inside the header is reported as such.
    #[test]
    fn every_truncation_keeps_the_complete_chunks(records in any_session()) {
        let written = write(&records, small_settings());
        for len in 0..written.file.len() {
            let cut = &written.file[..len];
            let recording = match Recording::parse(cut) {
                Ok(recording) => recording,
                Err(err) => {
                    prop_assert!(len < written.header_len, "{len}: {err:?}");
                    prop_assert!(matches!(err, RecordingError::Truncated { .. }), "{err:?}");
                    continue;
                }
            };
            prop_assert!(len >= written.header_len);
            let complete = |i: usize| written.chunks[i].range().end <= len as u64;
            let expected: Vec<_> = (0..written.chunks.len()).filter(|&i| complete(i)).map(|i| written.chunks[i]).collect();
            prop_assert_eq!(recording.chunks(), &expected[..], "cut at {}", len);
            prop_assert_ne!(recording.footer(), FooterStatus::Valid);
            let report = recording.verify();
            prop_assert!(report.corrupt.is_empty(), "{}", report);
            prop_assert_eq!(report.chunks_ok, expected.len());
            prop_assert_eq!(all_records(&recording), records_of_chunks(&written, &records, complete));
        }
    }
}
