//! Chunks: a plaintext header and a (usually zstd-compressed) payload of records.

use bytes::Bytes;

use super::cursor::{Cursor, checksum_ok, crc32};
use super::records::{self, Decoded, TimedRecord};
use super::{CHUNK_MAGIC, ChunkError, MAX_CHUNK_RAW_BYTES, MAX_CHUNK_STORED_BYTES};

/// Size of a chunk's header.
pub const CHUNK_HEADER_BYTES: usize = 56;

/// Payload stored as is.
const COMPRESSION_NONE: u8 = 0;
/// Payload is one or more zstd frames.
const COMPRESSION_ZSTD: u8 = 1;
/// Header flag: the chunk's first video frame is a keyframe.
pub(super) const FLAG_STARTS_WITH_KEYFRAME: u8 = 1;
/// `first_keyframe_ms` when a chunk holds no keyframe.
const NO_KEYFRAME: u64 = u64::MAX;

/// Where a chunk is and what it holds: its header's fields, which the footer's index
/// repeats so that a reader can seek without reading the chunk headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Sequence number: 0 for the first chunk, then one more per chunk written.
    pub seq: u32,
    /// Where the chunk's header starts in the file.
    pub offset: u64,
    /// Bytes of header and payload.
    pub len: u32,
    /// Earliest record time in the chunk.
    pub first_ms: u64,
    /// Latest record time in the chunk.
    pub last_ms: u64,
    /// Time of the chunk's first video keyframe, if it holds one.
    pub first_keyframe_ms: Option<u64>,
    /// Whether the chunk's first video frame is a keyframe, so that video can be
    /// decoded from the chunk's start.
    pub starts_with_keyframe: bool,
    /// How many records the chunk holds.
    pub record_count: u32,
}

impl ChunkInfo {
    /// The chunk's bytes in the file.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset.saturating_add(u64::from(self.len))
    }

    pub(super) fn keyframe_field(&self) -> u64 {
        self.first_keyframe_ms.unwrap_or(NO_KEYFRAME)
    }

    pub(super) fn keyframe_from_field(field: u64) -> Option<u64> {
        (field != NO_KEYFRAME).then_some(field)
    }

    pub(super) fn flags(&self) -> u8 {
        if self.starts_with_keyframe {
            FLAG_STARTS_WITH_KEYFRAME
        } else {
            0
        }
    }

    /// Checks what the header and the index both rely on.
    pub(super) fn check(&self) -> Result<(), &'static str> {
        if self.first_ms > self.last_ms {
            return Err("first time after last time");
        }
        if self
            .first_keyframe_ms
            .is_some_and(|k| k < self.first_ms || k > self.last_ms)
        {
            return Err("keyframe time outside the chunk's time range");
        }
        if self.record_count == 0 {
            return Err("no records");
        }
        if (self.len as usize) < CHUNK_HEADER_BYTES {
            return Err("shorter than a chunk header");
        }
        Ok(())
    }
}

/// What a chunk's records add up to; the writer builds it as records arrive, the
/// reader rebuilds it to check a chunk's header against its records.
#[derive(Debug, Clone, Default)]
pub(super) struct Summary {
    pub(super) first_ms: u64,
    pub(super) last_ms: u64,
    pub(super) count: u32,
    pub(super) first_keyframe_ms: Option<u64>,
    pub(super) saw_video: bool,
    pub(super) starts_with_keyframe: bool,
}

impl Summary {
    pub(super) fn add(&mut self, at_ms: u64, video: bool, keyframe: bool) {
        if self.count == 0 {
            self.first_ms = at_ms;
            self.last_ms = at_ms;
        }
        self.first_ms = self.first_ms.min(at_ms);
        self.last_ms = self.last_ms.max(at_ms);
        self.count = self.count.saturating_add(1);
        if video && !self.saw_video {
            self.saw_video = true;
            self.starts_with_keyframe = keyframe;
        }
        if keyframe && self.first_keyframe_ms.is_none() {
            self.first_keyframe_ms = Some(at_ms);
        }
    }
}

/// Builds a chunk from its raw payload: compresses it when that saves space.
pub(super) fn encode(
    seq: u32,
    offset: u64,
    summary: &Summary,
    raw: &[u8],
    compressor: Option<&mut zstd::bulk::Compressor<'static>>,
) -> (ChunkInfo, Vec<u8>) {
    // Compression only fails when zstd cannot allocate; the payload is then stored.
    let compressed = compressor
        .and_then(|c| c.compress(raw).ok())
        .filter(|c| c.len() < raw.len());
    let (compression, payload) = match &compressed {
        Some(c) => (COMPRESSION_ZSTD, c.as_slice()),
        None => (COMPRESSION_NONE, raw),
    };
    let info = ChunkInfo {
        seq,
        offset,
        // The writer keeps raw payloads under MAX_CHUNK_RAW_BYTES, and stores them
        // uncompressed unless compression makes them smaller.
        len: (CHUNK_HEADER_BYTES + payload.len()) as u32,
        first_ms: summary.first_ms,
        last_ms: summary.last_ms,
        first_keyframe_ms: summary.first_keyframe_ms,
        starts_with_keyframe: summary.starts_with_keyframe,
        record_count: summary.count,
    };
    let mut out = Vec::with_capacity(CHUNK_HEADER_BYTES + payload.len());
    out.extend_from_slice(&CHUNK_MAGIC);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&info.first_ms.to_le_bytes());
    out.extend_from_slice(&info.last_ms.to_le_bytes());
    out.extend_from_slice(&info.keyframe_field().to_le_bytes());
    out.extend_from_slice(&info.record_count.to_le_bytes());
    out.extend_from_slice(&[info.flags(), compression, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    let header_crc = crc32(&out);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(payload);
    (info, out)
}

/// A chunk header's fields beyond [`ChunkInfo`]: how to read the payload.
#[derive(Debug, Clone, Copy)]
pub(super) struct Payload {
    compression: u8,
    raw_len: u32,
    crc: u32,
}

/// Parses the chunk header at the start of `bytes`, which sit at `offset` in the file.
/// Does not look at the payload.
pub(super) fn parse_header(bytes: &[u8], offset: u64) -> Result<(ChunkInfo, Payload), ChunkError> {
    let header = bytes
        .get(..CHUNK_HEADER_BYTES)
        .ok_or(ChunkError::Truncated {
            have: bytes.len() as u64,
            need: CHUNK_HEADER_BYTES as u64,
        })?;
    if header[..4] != CHUNK_MAGIC {
        return Err(ChunkError::NoHeader);
    }
    let (covered, stored_crc) = header.split_at(CHUNK_HEADER_BYTES - 4);
    let stored_crc =
        u32::from_le_bytes([stored_crc[0], stored_crc[1], stored_crc[2], stored_crc[3]]);
    if !checksum_ok(stored_crc, crc32(covered)) {
        return Err(ChunkError::HeaderChecksum);
    }
    let field = |_| ChunkError::InvalidHeader("short");
    let mut r = Cursor::new(&covered[4..]);
    let seq = r.u32("seq").map_err(field)?;
    let first_ms = r.u64("first_ms").map_err(field)?;
    let last_ms = r.u64("last_ms").map_err(field)?;
    let first_keyframe_ms =
        ChunkInfo::keyframe_from_field(r.u64("first_keyframe_ms").map_err(field)?);
    let record_count = r.u32("record_count").map_err(field)?;
    // Flag bits other than the first, and the two reserved bytes, are for newer minor
    // versions.
    let [flags, compression, _, _] = r.array("flags").map_err(field)?;
    let stored_len = r.u32("stored_len").map_err(field)?;
    let raw_len = r.u32("raw_len").map_err(field)?;
    let crc = r.u32("payload crc").map_err(field)?;
    if stored_len as usize > MAX_CHUNK_STORED_BYTES {
        return Err(ChunkError::InvalidHeader("stored length over the limit"));
    }
    if raw_len as usize > MAX_CHUNK_RAW_BYTES {
        return Err(ChunkError::InvalidHeader("raw length over the limit"));
    }
    let info = ChunkInfo {
        seq,
        offset,
        // Bounded by MAX_CHUNK_STORED_BYTES just above.
        len: CHUNK_HEADER_BYTES as u32 + stored_len,
        first_ms,
        last_ms,
        first_keyframe_ms,
        starts_with_keyframe: flags & FLAG_STARTS_WITH_KEYFRAME != 0,
        record_count,
    };
    info.check().map_err(ChunkError::InvalidHeader)?;
    let payload = Payload {
        compression,
        raw_len,
        crc,
    };
    Ok((info, payload))
}

/// The length a damaged chunk header declares (header and payload), if its magic is
/// intact: a scan uses it to tell a damaged chunk from a cut-off one.
pub(super) fn declared_len(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..CHUNK_HEADER_BYTES)?;
    let stored = u32::from_le_bytes([header[40], header[41], header[42], header[43]]);
    (header[..4] == CHUNK_MAGIC).then(|| CHUNK_HEADER_BYTES + stored as usize)
}

/// Reads and checks the chunk `expected` describes. `bytes` are its `expected.len`
/// bytes, header included. Yields the records, with frame data sliced from one buffer,
/// and the raw payload's length.
pub(super) fn read(
    bytes: &[u8],
    expected: &ChunkInfo,
) -> Result<(Vec<Decoded>, usize), ChunkError> {
    let (info, payload) = parse_header(bytes, expected.offset)?;
    if info != *expected {
        return Err(ChunkError::IndexMismatch);
    }
    let need = u64::from(info.len);
    let stored = bytes
        .get(CHUNK_HEADER_BYTES..info.len as usize)
        .ok_or(ChunkError::Truncated {
            have: bytes.len() as u64,
            need,
        })?;
    if !checksum_ok(payload.crc, crc32(stored)) {
        return Err(ChunkError::PayloadChecksum);
    }
    let raw_len = payload.raw_len as usize;
    let raw = match payload.compression {
        COMPRESSION_NONE => stored.to_vec(),
        // The output buffer is capped at the declared raw length, itself capped at
        // MAX_CHUNK_RAW_BYTES by parse_header.
        COMPRESSION_ZSTD => zstd::bulk::decompress(stored, raw_len)
            .map_err(|e| ChunkError::Decompress(e.to_string()))?,
        other => return Err(ChunkError::UnknownCompression(other)),
    };
    if raw.len() != raw_len {
        return Err(ChunkError::RawLength {
            declared: payload.raw_len,
            actual: raw.len(),
        });
    }
    let raw = Bytes::from(raw);
    let records = records::decode_all(&raw)
        .map_err(|(index, error)| ChunkError::BadRecord { index, error })?;
    check_summary(&info, &records)?;
    Ok((records, raw_len))
}

/// Whether the header's summary is what the records add up to, and whether each
/// stream's times go forward.
fn check_summary(info: &ChunkInfo, records: &[Decoded]) -> Result<(), ChunkError> {
    let mut summary = Summary::default();
    let mut last = [None; super::Stream::COUNT];
    for decoded in records {
        match decoded {
            Decoded::Known(TimedRecord { at_ms, record }) => {
                let stream = record.stream() as usize;
                if last[stream].is_some_and(|last| *at_ms < last) {
                    return Err(ChunkError::MetadataMismatch(
                        "a stream's time goes backwards",
                    ));
                }
                last[stream] = Some(*at_ms);
                summary.add(
                    *at_ms,
                    record.stream() == super::Stream::Video,
                    record.is_keyframe(),
                );
            }
            Decoded::Unknown { at_ms } => summary.add(*at_ms, false, false),
        }
    }
    let rebuilt = ChunkInfo {
        first_ms: summary.first_ms,
        last_ms: summary.last_ms,
        first_keyframe_ms: summary.first_keyframe_ms,
        starts_with_keyframe: summary.starts_with_keyframe,
        record_count: summary.count,
        ..*info
    };
    if rebuilt != *info {
        return Err(ChunkError::MetadataMismatch(
            "header's times, keyframe or count differ from its records",
        ));
    }
    Ok(())
}
