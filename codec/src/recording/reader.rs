//! The reader: a whole or cut-off file in memory, its chunks found through the footer
//! or by a forward scan, and its records read a chunk at a time.

use std::ops::Range;

use super::chunk::{self, CHUNK_HEADER_BYTES, ChunkInfo};
use super::header::RecordingHeader;
use super::index::{self, FooterStatus};
use super::records::{Decoded, Record, TimedRecord};
use super::{CHUNK_MAGIC, ChunkError, INDEX_MAGIC, RecordingError};

/// A recording file, parsed as far as its header and the location of its chunks.
/// Chunks are read and checked when their records are asked for (or by
/// [`Recording::verify`]), so opening a long recording to seek is cheap.
#[derive(Clone)]
pub struct Recording<'a> {
    file: &'a [u8],
    header: RecordingHeader,
    header_len: usize,
    chunks: Vec<ChunkInfo>,
    footer: FooterStatus,
    /// Byte ranges where a scan found no chunk header.
    unreadable: Vec<CorruptChunk>,
    tail: Option<Tail>,
}

impl std::fmt::Debug for Recording<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the file's bytes: they may be megabytes.
        f.debug_struct("Recording")
            .field("file_len", &self.file.len())
            .field("header", &self.header)
            .field("chunks", &self.chunks.len())
            .field("footer", &self.footer)
            .field("unreadable", &self.unreadable)
            .field("tail", &self.tail)
            .finish()
    }
}

/// A chunk, or a stretch of bytes where one should be, that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptChunk {
    /// The chunk's sequence number, when its header or the index says it.
    pub seq: Option<u32>,
    /// The bytes lost.
    pub range: Range<u64>,
    /// What was wrong.
    pub error: ChunkError,
}

/// Bytes at the end of a file that are neither chunks nor a valid footer: what a crash
/// or a full disk leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// The bytes.
    pub range: Range<u64>,
    /// What they look like.
    pub kind: TailKind,
}

/// What the bytes after the last complete chunk look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailKind {
    /// The start of a chunk that was being written; `seq` if its header was complete.
    PartialChunk {
        /// The chunk's sequence number.
        seq: Option<u32>,
    },
    /// A footer that is incomplete or damaged.
    Footer,
    /// Nothing recognisable.
    Unrecognized,
}

impl<'a> Recording<'a> {
    /// Parses a recording: its header, then its chunk locations from the footer if the
    /// file has a valid one, else by a forward scan that skips damaged bytes and stops
    /// at a cut-off tail. Fails only if the header cannot be read.
    pub fn parse(file: &'a [u8]) -> Result<Self, RecordingError> {
        let (header, header_len) = RecordingHeader::decode(file)?;
        let mut recording = Self {
            file,
            header,
            header_len,
            chunks: Vec::new(),
            footer: FooterStatus::Valid,
            unreadable: Vec::new(),
            tail: None,
        };
        match index::parse(file, header_len) {
            Ok(chunks) => recording.chunks = chunks,
            Err(status) => {
                recording.footer = status;
                recording.scan();
            }
        }
        Ok(recording)
    }

    /// The file's header.
    pub fn header(&self) -> &RecordingHeader {
        &self.header
    }

    /// The header's length in bytes.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The file's bytes.
    pub fn file(&self) -> &'a [u8] {
        self.file
    }

    /// Whether the chunks were found through the footer, or why not.
    pub fn footer(&self) -> FooterStatus {
        self.footer
    }

    /// Every chunk found, in file order. Their payloads are not checked yet.
    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.chunks
    }

    /// Byte ranges a scan could not read as chunks (empty when the footer was used).
    pub fn unreadable(&self) -> &[CorruptChunk] {
        &self.unreadable
    }

    /// The cut-off or damaged end of the file, if any.
    pub fn tail(&self) -> Option<&Tail> {
        self.tail.as_ref()
    }

    /// The latest record time of any chunk found, in milliseconds since the start.
    pub fn duration_ms(&self) -> u64 {
        self.chunks.iter().map(|c| c.last_ms).max().unwrap_or(0)
    }

    /// The records of chunk `index` (a position in [`Self::chunks`]), checked, with
    /// records of types this version does not know left out.
    pub fn read_chunk(&self, index: usize) -> Result<Vec<TimedRecord>, CorruptChunk> {
        let (decoded, _) = self.read_decoded(index)?;
        Ok(known(decoded))
    }

    /// Every record, in file order (within each stream, in time order). A chunk that
    /// cannot be read yields one error, and the records go on with the next chunk.
    pub fn records(&self) -> Records<'_, 'a> {
        Records::new(self, 0, 0, VideoStart::Started)
    }

    /// The records needed to play from `from_ms`, reading only the chunks needed:
    /// video from the last keyframe at or before `from_ms` (its frames before
    /// `from_ms` are for the decoder, not to be shown), or from the first keyframe
    /// after it if there is none before; every other record at or after `from_ms`.
    pub fn records_from(&self, from_ms: u64) -> Records<'_, 'a> {
        let seek = self.seek_chunk(from_ms);
        let first_late = self.chunks.iter().position(|c| c.last_ms >= from_ms);
        let start = match (seek, first_late) {
            (Some(seek), Some(late)) => seek.min(late),
            (Some(start), None) | (None, Some(start)) => start,
            (None, None) => self.chunks.len(),
        };
        let video = match seek {
            Some(chunk) => VideoStart::InChunk(chunk),
            None => VideoStart::NextKeyframe,
        };
        Records::new(self, start, from_ms, video)
    }

    /// The chunk to decode video from to show `at_ms`: the last one whose first
    /// keyframe is at or before `at_ms`.
    pub fn seek_chunk(&self, at_ms: u64) -> Option<usize> {
        self.chunks
            .iter()
            .rposition(|c| c.first_keyframe_ms.is_some_and(|k| k <= at_ms))
    }

    /// Reads and checks a chunk: its records (known and unknown) and raw length.
    pub(super) fn read_decoded(&self, index: usize) -> Result<(Vec<Decoded>, usize), CorruptChunk> {
        let Some(info) = self.chunks.get(index) else {
            return Err(CorruptChunk {
                seq: None,
                range: 0..0,
                error: ChunkError::NoHeader,
            });
        };
        let range = info.range();
        let corrupt = |error| CorruptChunk {
            seq: Some(info.seq),
            range: range.clone(),
            error,
        };
        let bytes = usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .and_then(|(start, end)| self.file.get(start..end))
            .ok_or_else(|| {
                corrupt(ChunkError::Truncated {
                    have: (self.file.len() as u64).saturating_sub(range.start),
                    need: u64::from(info.len),
                })
            })?;
        chunk::read(bytes, info).map_err(corrupt)
    }

    /// Finds chunks by walking the file from the header on. Where the bytes are not a
    /// valid chunk, looks for the next valid chunk header and marks what lies between
    /// as unreadable.
    fn scan(&mut self) {
        let file = self.file;
        let mut pos = self.header_len;
        while pos < file.len() {
            match chunk::parse_header(&file[pos..], pos as u64) {
                Ok((info, _)) => {
                    let end = pos + info.len as usize;
                    if end > file.len() {
                        self.set_tail(
                            pos,
                            TailKind::PartialChunk {
                                seq: Some(info.seq),
                            },
                        );
                        return;
                    }
                    self.chunks.push(info);
                    pos = end;
                }
                Err(error) => {
                    let declared_end =
                        chunk::declared_len(&file[pos..]).map(|len| pos.saturating_add(len));
                    match find_chunk_header(file, pos + 1) {
                        // Resync on the next valid header, even if a damaged length
                        // pointed past it.
                        Some(next) => {
                            self.unreadable.push(CorruptChunk {
                                seq: None,
                                range: pos as u64..next as u64,
                                error,
                            });
                            pos = next;
                        }
                        // A damaged header whose length ends exactly at the end of the
                        // file: a damaged last chunk, not a cut-off one.
                        None if error == ChunkError::HeaderChecksum
                            && declared_end == Some(file.len()) =>
                        {
                            self.unreadable.push(CorruptChunk {
                                seq: None,
                                range: pos as u64..file.len() as u64,
                                error,
                            });
                            return;
                        }
                        None => {
                            self.set_tail(pos, tail_kind(&file[pos..]));
                            return;
                        }
                    }
                }
            }
        }
    }

    fn set_tail(&mut self, start: usize, kind: TailKind) {
        self.tail = Some(Tail {
            range: start as u64..self.file.len() as u64,
            kind,
        });
    }
}

/// What the bytes after the last chunk found look like.
fn tail_kind(rest: &[u8]) -> TailKind {
    let starts = |magic: &[u8]| magic.starts_with(&rest[..rest.len().min(magic.len())]);
    if starts(&INDEX_MAGIC) {
        TailKind::Footer
    } else if starts(&CHUNK_MAGIC) && rest.len() < CHUNK_HEADER_BYTES {
        TailKind::PartialChunk { seq: None }
    } else {
        TailKind::Unrecognized
    }
}

/// The position of the next valid chunk header at or after `from`.
fn find_chunk_header(file: &[u8], from: usize) -> Option<usize> {
    let mut pos = from;
    while let Some(found) = file
        .get(pos..)?
        .windows(CHUNK_MAGIC.len())
        .position(|w| w == CHUNK_MAGIC)
    {
        let at = pos + found;
        if chunk::parse_header(&file[at..], at as u64).is_ok() {
            return Some(at);
        }
        pos = at + 1;
    }
    None
}

fn known(decoded: Vec<Decoded>) -> Vec<TimedRecord> {
    decoded
        .into_iter()
        .filter_map(|d| match d {
            Decoded::Known(record) => Some(record),
            Decoded::Unknown { .. } => None,
        })
        .collect()
}

/// Where video starts in a [`Records`] iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VideoStart {
    /// At the last keyframe at or before the start time, in this chunk.
    InChunk(usize),
    /// At the next keyframe.
    NextKeyframe,
    /// Already started: every video frame is yielded.
    Started,
}

/// Records of a [`Recording`], read a chunk at a time; see [`Recording::records_from`].
#[derive(Debug)]
pub struct Records<'r, 'a> {
    recording: &'r Recording<'a>,
    next_chunk: usize,
    current: std::vec::IntoIter<TimedRecord>,
    from_ms: u64,
    video: VideoStart,
    chunks_read: usize,
}

impl<'r, 'a> Records<'r, 'a> {
    fn new(recording: &'r Recording<'a>, start: usize, from_ms: u64, video: VideoStart) -> Self {
        Self {
            recording,
            next_chunk: start,
            current: Vec::new().into_iter(),
            from_ms,
            video,
            chunks_read: 0,
        }
    }

    /// How many chunks this iteration has read so far.
    pub fn chunks_read(&self) -> usize {
        self.chunks_read
    }

    /// Keeps the records of chunk `index` that this iteration yields.
    fn select(&mut self, index: usize, records: Vec<TimedRecord>) -> Vec<TimedRecord> {
        let from_ms = self.from_ms;
        // In the seek chunk, video starts at the last keyframe at or before from_ms.
        let video_from = match self.video {
            VideoStart::InChunk(seek) if seek == index => records
                .iter()
                .rposition(|r| r.record.is_keyframe() && r.at_ms <= from_ms),
            _ => None,
        };
        let mut kept = Vec::with_capacity(records.len());
        for (position, record) in records.into_iter().enumerate() {
            if !matches!(record.record, Record::Video(_)) {
                if record.at_ms >= from_ms {
                    kept.push(record);
                }
                continue;
            }
            if video_from == Some(position)
                || (self.video == VideoStart::NextKeyframe && record.record.is_keyframe())
            {
                self.video = VideoStart::Started;
            }
            if self.video == VideoStart::Started {
                kept.push(record);
            }
        }
        // A seek chunk that failed its read, or held no such keyframe after all: take
        // the next keyframe instead.
        if self.video == VideoStart::InChunk(index) {
            self.video = VideoStart::NextKeyframe;
        }
        kept
    }
}

impl Iterator for Records<'_, '_> {
    type Item = Result<TimedRecord, CorruptChunk>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(record) = self.current.next() {
                return Some(Ok(record));
            }
            let index = self.next_chunk;
            if index >= self.recording.chunks.len() {
                return None;
            }
            self.next_chunk += 1;
            self.chunks_read += 1;
            match self.recording.read_chunk(index) {
                Ok(records) => self.current = self.select(index, records).into_iter(),
                Err(corrupt) => {
                    if self.video == VideoStart::InChunk(index) {
                        self.video = VideoStart::NextKeyframe;
                    }
                    return Some(Err(corrupt));
                }
            }
        }
    }
}
