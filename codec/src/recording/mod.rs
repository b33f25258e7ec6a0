//! The session recording container: a header, zstd-compressed chunks of timestamped
//! records, and a footer that indexes the chunks. Documented byte by byte in
//! `docs/recording-format.md`; this is the outline.
//!
//! ```text
//! header   magic, version, session id, portal, start time, codecs      (CRC-32)
//! chunk 0  56-byte plaintext header (sync marker, seq, time range,      (CRC-32)
//!          first keyframe, record count, lengths, payload CRC-32)
//!          payload: records, zstd-compressed (or stored if that is smaller)
//! chunk 1  ...
//! index    one 48-byte entry per chunk (offset, seq, time range, first keyframe)
//! trailer  32 bytes: where the index is, its CRC-32, the end magic       (CRC-32)
//! ```
//!
//! **Crash safety.** The writer ([`RecordingWriter`]) hands out the header, then each
//! chunk as it closes, then the footer; the caller appends them to the file. A chunk
//! closes at [`ChunkSettings::max_raw_bytes`] or [`ChunkSettings::max_media_ms`], so a
//! crash loses at most the open chunk. A file without its footer (a crash, a full
//! disk) is read by a forward scan over the chunk headers, which carry everything the
//! index holds; a damaged chunk fails its CRC and is skipped, and the scan resyncs on
//! the next chunk's marker. [`repair`] writes such a file back with a fresh footer.
//!
//! **Seeking.** Every chunk records the time of its first video keyframe, and a new
//! chunk starts at a keyframe when the encoder sends them often enough (else chunks
//! are cut anyway, and marked as not starting with one). To play from time T, a reader
//! decodes video from the last chunk whose first keyframe is at or before T
//! ([`Recording::records_from`]), reading no chunk before it.
//!
//! **Versions.** A reader refuses another major version. A minor version may add
//! record types (skipped by their length), append fields to a record's body or to the
//! header (ignored), and use reserved flag bits and bytes (ignored).
//!
//! **Limits.** Nothing is allocated from a length in the file without checking it
//! against the bytes present and a fixed maximum: [`MAX_RECORD_BYTES`] for a record's
//! body, [`MAX_CHUNK_RAW_BYTES`] for a chunk's decompressed payload (zstd output goes
//! into a buffer of the declared raw length, no more).
//!
//! Fuzzing builds (`cfg(fuzzing)`) accept any checksum, so that the fuzzer reaches
//! the decoders behind them.

mod chunk;
mod cursor;
mod header;
mod index;
mod reader;
mod records;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

pub use chunk::{CHUNK_HEADER_BYTES, ChunkInfo};
pub use header::{HEADER_PREFIX_BYTES, RecordingHeader};
pub use index::{FooterStatus, INDEX_ENTRY_BYTES, INDEX_HEADER_BYTES, TRAILER_BYTES};
pub use reader::{CorruptChunk, Recording, Records, Tail, TailKind};
pub use records::{
    AudioFrame, ChatRecord, FileDirection, FileOutcome, FileTransferRecord, GapKind, GapRecord,
    InputOutcome, InputRecord, RECORD_HEADER_BYTES, Record, RosterChange, RosterRecord, Stream,
    TimedRecord, VideoFrame,
};
pub use verify::{RecordCounts, VerifyReport, repair};
pub use writer::{ChunkSettings, RecordingWriter};

/// The first eight bytes of every recording.
pub const MAGIC: [u8; 8] = *b"\x89RLYREC\n";
/// The format's major version: readers refuse any other.
pub const VERSION_MAJOR: u8 = 1;
/// The format's minor version: additions that older readers skip.
pub const VERSION_MINOR: u8 = 0;
/// The first four bytes of every chunk header: the sync marker a scan looks for.
pub const CHUNK_MAGIC: [u8; 4] = *b"RCHK";
/// The first four bytes of the index.
pub const INDEX_MAGIC: [u8; 4] = *b"RIDX";
/// The last eight bytes of a finished recording.
pub const TRAILER_MAGIC: [u8; 8] = *b"RLYREND\n";
/// Largest record body (a video keyframe, in practice).
pub const MAX_RECORD_BYTES: usize = 8 * 1024 * 1024;
/// Largest raw (decompressed) chunk payload.
pub const MAX_CHUNK_RAW_BYTES: usize = 16 * 1024 * 1024;
/// Largest stored chunk payload: the raw maximum plus zstd's worst-case overhead.
pub const MAX_CHUNK_STORED_BYTES: usize = MAX_CHUNK_RAW_BYTES + 1024 * 1024;
/// Most codecs of one kind a header may list.
pub const MAX_CODECS: usize = 16;

/// A field that could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The bytes end inside the field.
    #[error("{field} is cut off")]
    Truncated {
        /// Which field.
        field: &'static str,
    },
    /// A string that is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// A byte outside the field's defined values.
    #[error("{field} has the undefined value {value}")]
    InvalidValue {
        /// Which field.
        field: &'static str,
        /// The byte.
        value: u8,
    },
    /// Longer than the field allows.
    #[error("{field} is {len} long, the limit is {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length (bytes, or items for lists).
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a file cannot be read as a recording at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordingError {
    /// It does not start with [`MAGIC`].
    #[error("not a recording (no recording magic)")]
    NotARecording,
    /// A major version this build does not read.
    #[error(
        "recording format {major}.{minor} is not supported (this build reads {VERSION_MAJOR}.x)"
    )]
    UnsupportedVersion {
        /// The file's major version.
        major: u8,
        /// The file's minor version.
        minor: u8,
    },
    /// The file ends inside its header.
    #[error("recording header cut off: {len} bytes, at least {needed} needed")]
    Truncated {
        /// Bytes in the file.
        len: usize,
        /// Bytes the header needs.
        needed: usize,
    },
    /// The header's checksum does not match.
    #[error("recording header is damaged (checksum mismatch)")]
    HeaderChecksum,
    /// The header's checksum matches but a field is invalid.
    #[error("invalid recording header: {0}")]
    InvalidHeader(FieldError),
}

/// Why one chunk could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// No chunk header where one should start.
    #[error("no chunk header")]
    NoHeader,
    /// The chunk header's checksum does not match.
    #[error("chunk header is damaged (checksum mismatch)")]
    HeaderChecksum,
    /// The chunk header's checksum matches, but its fields are impossible.
    #[error("invalid chunk header: {0}")]
    InvalidHeader(&'static str),
    /// The chunk header differs from the index entry that points to it.
    #[error("chunk header does not match the index")]
    IndexMismatch,
    /// The file ends inside the chunk.
    #[error("chunk cut off: {have} of {need} bytes")]
    Truncated {
        /// Bytes present.
        have: u64,
        /// Bytes the chunk needs.
        need: u64,
    },
    /// The payload's checksum does not match.
    #[error("chunk payload is damaged (checksum mismatch)")]
    PayloadChecksum,
    /// A compression method this version does not know.
    #[error("unknown chunk compression {0}")]
    UnknownCompression(u8),
    /// zstd refused the payload.
    #[error("chunk payload does not decompress: {0}")]
    Decompress(String),
    /// The payload decompressed to another length than declared.
    #[error("chunk payload is {actual} bytes, its header says {declared}")]
    RawLength {
        /// Length in the header.
        declared: u32,
        /// Length decompressed.
        actual: usize,
    },
    /// A record is malformed.
    #[error("record {index} of the chunk: {error}")]
    BadRecord {
        /// The record's position in the chunk.
        index: u32,
        /// What is wrong with it.
        error: FieldError,
    },
    /// The header's summary (times, keyframe, count) does not fit the records.
    #[error("chunk header does not match its records: {0}")]
    MetadataMismatch(&'static str),
}

/// Why the writer refused a record (or a header).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A frame or record body over [`MAX_RECORD_BYTES`].
    #[error("record of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A string or list field too long to encode.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// Earlier than the last record of the same stream.
    #[error("{stream:?} record at {at_ms} ms is before that stream's last record at {last_ms} ms")]
    OutOfOrder {
        /// The stream.
        stream: Stream,
        /// The record's time.
        at_ms: u64,
        /// The stream's last time.
        last_ms: u64,
    },
    /// A frame whose codec index is not in the header's list.
    #[error("{stream:?} codec {codec} is not listed in the header")]
    UnknownCodec {
        /// Video or audio.
        stream: Stream,
        /// The index.
        codec: u8,
    },
    /// A time the format cannot hold (`u64::MAX` is reserved).
    #[error("record time {0} ms is out of range")]
    TimeOutOfRange(u64),
}
