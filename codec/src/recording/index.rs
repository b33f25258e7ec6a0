//! The footer: an index of every chunk, then a fixed-size trailer at the very end of
//! the file that says where the index is.

use super::chunk::{ChunkInfo, FLAG_STARTS_WITH_KEYFRAME};
use super::cursor::{Cursor, checksum_ok, crc32};
use super::{INDEX_MAGIC, TRAILER_MAGIC};

/// Size of one index entry.
pub const INDEX_ENTRY_BYTES: usize = 48;
/// Size of the index's own header: magic and entry count.
pub const INDEX_HEADER_BYTES: usize = 8;
/// Size of the trailer that ends a finished file.
pub const TRAILER_BYTES: usize = 32;

/// Whether a file ends with a footer, and whether it could be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterStatus {
    /// The footer is present and its index matched the file: chunks were found
    /// through it, without a scan.
    Valid,
    /// The file does not end with a trailer (not finished, or cut off): chunks were
    /// found by a forward scan.
    Absent,
    /// The file ends with a trailer, but it or its index is damaged or does not fit
    /// the file: chunks were found by a forward scan.
    Invalid(&'static str),
}

/// The footer for `chunks`, whose index starts at `index_offset` in the file.
pub(super) fn encode(chunks: &[ChunkInfo], index_offset: u64) -> Vec<u8> {
    let index_len = INDEX_HEADER_BYTES + chunks.len() * INDEX_ENTRY_BYTES;
    let mut out = Vec::with_capacity(index_len + TRAILER_BYTES);
    out.extend_from_slice(&INDEX_MAGIC);
    // A writer produces at most one chunk per record, so the count fits in a u32.
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    for chunk in chunks {
        out.extend_from_slice(&chunk.offset.to_le_bytes());
        out.extend_from_slice(&chunk.seq.to_le_bytes());
        out.extend_from_slice(&chunk.len.to_le_bytes());
        out.extend_from_slice(&chunk.first_ms.to_le_bytes());
        out.extend_from_slice(&chunk.last_ms.to_le_bytes());
        out.extend_from_slice(&chunk.keyframe_field().to_le_bytes());
        out.extend_from_slice(&chunk.record_count.to_le_bytes());
        out.extend_from_slice(&[chunk.flags(), 0, 0, 0]);
    }
    let index_crc = crc32(&out);
    let trailer_start = out.len();
    out.extend_from_slice(&index_offset.to_le_bytes());
    out.extend_from_slice(&(index_len as u32).to_le_bytes());
    out.extend_from_slice(&index_crc.to_le_bytes());
    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
    let trailer_crc = crc32(&out[trailer_start..]);
    out.extend_from_slice(&trailer_crc.to_le_bytes());
    out.extend_from_slice(&TRAILER_MAGIC);
    out
}

/// The chunks the footer of `file` lists, if it has a footer that fits a file whose
/// header takes `header_len` bytes: the index must cover every byte between the
/// header and itself with chunks, in file order.
pub(super) fn parse(file: &[u8], header_len: usize) -> Result<Vec<ChunkInfo>, FooterStatus> {
    let invalid = FooterStatus::Invalid;
    let trailer_start = file
        .len()
        .checked_sub(TRAILER_BYTES)
        .filter(|&start| start >= header_len)
        .ok_or(FooterStatus::Absent)?;
    let trailer = &file[trailer_start..];
    if trailer[TRAILER_BYTES - TRAILER_MAGIC.len()..] != TRAILER_MAGIC {
        return Err(FooterStatus::Absent);
    }
    let mut r = Cursor::new(trailer);
    let short = |_| invalid("short trailer");
    let index_offset = r.u64("index_offset").map_err(short)?;
    let index_len = r.u32("index_len").map_err(short)?;
    let index_crc = r.u32("index_crc").map_err(short)?;
    let count = r.u32("chunk_count").map_err(short)?;
    let stored_trailer_crc = r.u32("trailer_crc").map_err(short)?;
    if !checksum_ok(stored_trailer_crc, crc32(&trailer[..20])) {
        return Err(invalid("trailer checksum mismatch"));
    }
    let index_start = usize::try_from(index_offset)
        .ok()
        .filter(|&start| start >= header_len)
        .ok_or(invalid("index offset outside the file"))?;
    let index_end = index_start
        .checked_add(index_len as usize)
        .filter(|&end| end == trailer_start)
        .ok_or(invalid("index does not end where the trailer starts"))?;
    let expected_len = (count as usize)
        .checked_mul(INDEX_ENTRY_BYTES)
        .and_then(|n| n.checked_add(INDEX_HEADER_BYTES));
    if expected_len != Some(index_len as usize) {
        return Err(invalid("index length does not match its chunk count"));
    }
    let index = &file[index_start..index_end];
    if !checksum_ok(index_crc, crc32(index)) {
        return Err(invalid("index checksum mismatch"));
    }
    if index[..4] != INDEX_MAGIC {
        return Err(invalid("no index magic"));
    }
    if index[4..8] != count.to_le_bytes() {
        return Err(invalid("index and trailer disagree on the chunk count"));
    }
    // The length check above bounds the count by the file's size.
    let mut chunks = Vec::with_capacity(count as usize);
    let mut expected_offset = header_len as u64;
    for entry in index[INDEX_HEADER_BYTES..].chunks_exact(INDEX_ENTRY_BYTES) {
        let chunk = parse_entry(entry).map_err(invalid)?;
        if chunk.offset != expected_offset {
            return Err(invalid("index leaves a gap between chunks"));
        }
        expected_offset += u64::from(chunk.len);
        if expected_offset > index_offset {
            return Err(invalid("chunks overlap the index"));
        }
        chunks.push(chunk);
    }
    if expected_offset != index_offset {
        return Err(invalid("chunks do not end where the index starts"));
    }
    Ok(chunks)
}

fn parse_entry(entry: &[u8]) -> Result<ChunkInfo, &'static str> {
    let mut r = Cursor::new(entry);
    let short = |_| "short index entry";
    let offset = r.u64("offset").map_err(short)?;
    let seq = r.u32("seq").map_err(short)?;
    let len = r.u32("len").map_err(short)?;
    let first_ms = r.u64("first_ms").map_err(short)?;
    let last_ms = r.u64("last_ms").map_err(short)?;
    let first_keyframe_ms =
        ChunkInfo::keyframe_from_field(r.u64("first_keyframe_ms").map_err(short)?);
    let record_count = r.u32("record_count").map_err(short)?;
    let [flags, _, _, _] = r.array("flags").map_err(short)?;
    let chunk = ChunkInfo {
        seq,
        offset,
        len,
        first_ms,
        last_ms,
        first_keyframe_ms,
        starts_with_keyframe: flags & FLAG_STARTS_WITH_KEYFRAME != 0,
        record_count,
    };
    chunk.check()?;
    Ok(chunk)
}
