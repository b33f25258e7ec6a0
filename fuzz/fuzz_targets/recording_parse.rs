//! The recording reader on arbitrary bytes: parse (footer or scan), verify every
//! chunk, read records from the start and from a seek point, repair.
//!
//! Fuzzing builds of relay-codec accept any checksum (`cfg(fuzzing)`), so mutated
//! files reach the chunk, zstd and record decoders instead of stopping at a CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_codec::recording::{FooterStatus, Recording, repair};

fuzz_target!(|data: &[u8]| {
    let Ok(recording) = Recording::parse(data) else {
        assert!(
            repair(data).is_err(),
            "repair reads the header as parse does"
        );
        return;
    };
    let report = recording.verify();
    assert!(report.chunks_ok <= recording.chunks().len());
    assert!(report.intact_bytes <= report.file_bytes);
    let _ = report.to_string();

    let all = recording.records().count();
    let seek_to = recording.duration_ms() / 2;
    let from = recording.records_from(seek_to).count();
    assert!(from <= all, "a seek yields a subset of the records");

    // A repaired file has a valid footer over exactly the chunks that verified.
    let repaired = repair(data).expect("the header parsed once");
    let again = Recording::parse(&repaired).expect("repair keeps the header");
    assert_eq!(again.footer(), FooterStatus::Valid);
    let after = again.verify();
    assert_eq!(after.chunks_ok, report.chunks_ok);
    assert!(after.corrupt.is_empty() && after.tail.is_none());
    assert_eq!(after.counts, report.counts);
});
