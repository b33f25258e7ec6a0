//! What is intact in a recording and what was lost, and rewriting a damaged one.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;

use super::RecordingError;
use super::chunk::ChunkInfo;
use super::index::{self, FooterStatus};
use super::reader::{CorruptChunk, Recording, Tail, TailKind};
use super::records::{Decoded, Record};

/// The outcome of reading every chunk of a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Whether the footer was present and valid.
    pub footer: FooterStatus,
    /// Chunks read and checked without error.
    pub chunks_ok: usize,
    /// Chunks that failed their checks, and byte ranges where no chunk could be
    /// found, in file order.
    pub corrupt: Vec<CorruptChunk>,
    /// The cut-off or damaged end of the file.
    pub tail: Option<Tail>,
    /// Sequence numbers of chunks that no header or index entry accounts for (lost
    /// in a damaged stretch, or dropped by an earlier repair).
    pub missing_seqs: Vec<Range<u32>>,
    /// Size of the file.
    pub file_bytes: u64,
    /// Bytes of the header and the intact chunks.
    pub intact_bytes: u64,
    /// Uncompressed payload bytes of the intact chunks (for the compression ratio).
    pub raw_bytes: u64,
    /// The latest record time in an intact chunk, in milliseconds since the start.
    pub duration_ms: u64,
    /// What the intact chunks hold.
    pub counts: RecordCounts,
}

/// Records in a recording, by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordCounts {
    /// Video frames.
    pub video_frames: u64,
    /// Video frames that are keyframes.
    pub keyframes: u64,
    /// Audio frames.
    pub audio_frames: u64,
    /// Input events.
    pub input_events: u64,
    /// Chat messages and notes.
    pub chat_messages: u64,
    /// Roster changes.
    pub roster_events: u64,
    /// File-transfer records.
    pub file_transfers: u64,
    /// Gap markers.
    pub gaps: u64,
    /// Records of types this version does not know.
    pub unknown: u64,
}

impl RecordCounts {
    fn add(&mut self, decoded: &Decoded) {
        let record = match decoded {
            Decoded::Known(timed) => &timed.record,
            Decoded::Unknown { .. } => {
                self.unknown += 1;
                return;
            }
        };
        let counter = match record {
            Record::Video(frame) => {
                self.keyframes += u64::from(frame.keyframe);
                &mut self.video_frames
            }
            Record::Audio(_) => &mut self.audio_frames,
            Record::Input(_) => &mut self.input_events,
            Record::Chat(_) => &mut self.chat_messages,
            Record::Roster(_) => &mut self.roster_events,
            Record::FileTransfer(_) => &mut self.file_transfers,
            Record::Gap(_) => &mut self.gaps,
        };
        *counter += 1;
    }
}

impl VerifyReport {
    /// Whether nothing was lost: a valid footer, every chunk intact, no tail, no gap
    /// in the sequence numbers.
    pub fn is_clean(&self) -> bool {
        self.footer == FooterStatus::Valid
            && self.corrupt.is_empty()
            && self.tail.is_none()
            && self.missing_seqs.is_empty()
    }
}

impl Recording<'_> {
    /// Reads and checks every chunk, and reports what is intact and what was lost.
    pub fn verify(&self) -> VerifyReport {
        let mut report = VerifyReport {
            footer: self.footer(),
            chunks_ok: 0,
            corrupt: self.unreadable().to_vec(),
            tail: self.tail().cloned(),
            missing_seqs: missing_seqs(self.chunks()),
            file_bytes: self.file().len() as u64,
            intact_bytes: self.header_len() as u64,
            raw_bytes: 0,
            duration_ms: 0,
            counts: RecordCounts::default(),
        };
        for (index, info) in self.chunks().iter().enumerate() {
            match self.read_decoded(index) {
                Ok((records, raw_len)) => {
                    report.chunks_ok += 1;
                    report.intact_bytes += u64::from(info.len);
                    report.raw_bytes += raw_len as u64;
                    report.duration_ms = report.duration_ms.max(info.last_ms);
                    records.iter().for_each(|r| report.counts.add(r));
                }
                Err(corrupt) => report.corrupt.push(corrupt),
            }
        }
        report.corrupt.sort_by_key(|c| c.range.start);
        report
    }
}

/// Rewrites a readable recording: its header, the chunks that pass every check
/// (byte for byte, so they keep their sequence numbers and a later verify still
/// shows what was dropped), and a fresh footer. Fails only if the header cannot be
/// read.
pub fn repair(file: &[u8]) -> Result<Bytes, RecordingError> {
    let recording = Recording::parse(file)?;
    let mut out = file[..recording.header_len()].to_vec();
    let mut kept = Vec::with_capacity(recording.chunks().len());
    for (index, info) in recording.chunks().iter().enumerate() {
        if recording.read_decoded(index).is_err() {
            continue;
        }
        // read_decoded checked that the range is inside the file.
        let range = info.range();
        let moved = ChunkInfo {
            offset: out.len() as u64,
            ..*info
        };
        out.extend_from_slice(&file[range.start as usize..range.end as usize]);
        kept.push(moved);
    }
    let index_offset = out.len() as u64;
    out.extend_from_slice(&index::encode(&kept, index_offset));
    Ok(Bytes::from(out))
}

/// Gaps in the sequence numbers of the chunks found, which count from 0.
fn missing_seqs(chunks: &[ChunkInfo]) -> Vec<Range<u32>> {
    let mut missing = Vec::new();
    let mut expected = 0u32;
    for chunk in chunks {
        if chunk.seq > expected {
            missing.push(expected..chunk.seq);
        }
        expected = expected.max(chunk.seq.saturating_add(1));
    }
    missing
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.is_clean() { "intact" } else { "damaged" };
        writeln!(f, "recording {verdict}: {} bytes", self.file_bytes)?;
        match self.footer {
            FooterStatus::Valid => writeln!(f, "footer: valid")?,
            FooterStatus::Absent => writeln!(f, "footer: absent (chunks found by a scan)")?,
            FooterStatus::Invalid(why) => {
                writeln!(f, "footer: invalid, {why} (chunks found by a scan)")?
            }
        }
        writeln!(
            f,
            "chunks: {} intact ({} bytes, {} uncompressed), {} corrupt",
            self.chunks_ok,
            self.intact_bytes,
            self.raw_bytes,
            self.corrupt.len()
        )?;
        for corrupt in &self.corrupt {
            let Range { start, end } = corrupt.range;
            match corrupt.seq {
                Some(seq) => writeln!(f, "  chunk {seq}, bytes {start}..{end}: {}", corrupt.error)?,
                None => writeln!(f, "  bytes {start}..{end}: {}", corrupt.error)?,
            }
        }
        for Range { start, end } in &self.missing_seqs {
            writeln!(f, "missing chunks: {start}..{end}")?;
        }
        if let Some(tail) = &self.tail {
            let Range { start, end } = tail.range;
            let what = match tail.kind {
                TailKind::PartialChunk { seq: Some(seq) } => format!("partial chunk {seq}"),
                TailKind::PartialChunk { seq: None } => "partial chunk".to_owned(),
                TailKind::Footer => "incomplete or damaged footer".to_owned(),
                TailKind::Unrecognized => "unrecognised bytes".to_owned(),
            };
            writeln!(f, "lost tail: bytes {start}..{end} ({what})")?;
        }
        let c = &self.counts;
        writeln!(
            f,
            "duration: {}.{:03} s",
            self.duration_ms / 1000,
            self.duration_ms % 1000
        )?;
        write!(
            f,
            "records: {} video frames ({} keyframes), {} audio frames, {} input events, \
             {} chat messages, {} roster events, {} file transfers, {} gap markers, {} unknown",
            c.video_frames,
            c.keyframes,
            c.audio_frames,
            c.input_events,
            c.chat_messages,
            c.roster_events,
            c.file_transfers,
            c.gaps,
            c.unknown
        )
    }
}
