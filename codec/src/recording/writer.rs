//! The writer: records in, finished chunks' bytes out. No IO: the caller appends every
//! byte string it returns to the file, in order.

use bytes::Bytes;

use super::chunk::{self, ChunkInfo, Summary};
use super::header::RecordingHeader;
use super::records::{self, Record, Stream};
use super::{MAX_CHUNK_RAW_BYTES, RecordError, index};

/// When the writer cuts a chunk. Chunks bound what a crash can lose (the open chunk
/// lives only in memory) and what a seek must read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSettings {
    /// Cut before a record that would take the chunk's raw (uncompressed) payload over
    /// this many bytes. A single larger record gets a chunk of its own. Values over
    /// [`MAX_CHUNK_RAW_BYTES`] count as that.
    pub max_raw_bytes: usize,
    /// Cut before a record this many milliseconds or more after the chunk's earliest
    /// record; [`RecordingWriter::poll_flush`] cuts an idle chunk this old.
    pub max_media_ms: u64,
    /// Cut before a video keyframe when the chunk already holds video and spans at
    /// least this many milliseconds, so that chunks start at keyframes whenever the
    /// encoder sends them often enough.
    pub keyframe_cut_min_ms: u64,
    /// zstd compression level for chunk payloads.
    pub zstd_level: i32,
}

impl Default for ChunkSettings {
    /// 256 KiB or 1 s per chunk, a keyframe cut after 250 ms, zstd level 3.
    fn default() -> Self {
        Self {
            max_raw_bytes: 256 * 1024,
            max_media_ms: 1000,
            keyframe_cut_min_ms: 250,
            zstd_level: 3,
        }
    }
}

/// Builds a recording from records, a chunk at a time.
///
/// Call [`RecordingWriter::new`] and write the header bytes it returns; then
/// [`push`](Self::push) each record and write any bytes it returns; call
/// [`poll_flush`](Self::poll_flush) from a timer so that an idle session's last records
/// reach the file; end with [`finish`](Self::finish) and write its bytes. A file cut
/// off at any point reads up to its last complete chunk.
pub struct RecordingWriter {
    settings: ChunkSettings,
    video_codecs: usize,
    audio_codecs: usize,
    /// `None` if zstd could not set up a context: chunks are then stored uncompressed.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// The open chunk's raw payload.
    raw: Vec<u8>,
    summary: Summary,
    last_ms: [Option<u64>; Stream::COUNT],
    next_seq: u32,
    /// Bytes handed out so far: where the next chunk starts.
    offset: u64,
    index: Vec<ChunkInfo>,
    raw_total: u64,
}

impl std::fmt::Debug for RecordingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingWriter")
            .field("settings", &self.settings)
            .field("open_records", &self.summary.count)
            .field("open_raw_bytes", &self.raw.len())
            .field("chunks", &self.index.len())
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

impl RecordingWriter {
    /// A writer for a recording with this header, and the header's bytes, which start
    /// the file. Fails only if a header field is too long to encode.
    pub fn new(
        header: &RecordingHeader,
        settings: ChunkSettings,
    ) -> Result<(Self, Bytes), RecordError> {
        let header_bytes = header.encode()?;
        let settings = ChunkSettings {
            max_raw_bytes: settings.max_raw_bytes.min(MAX_CHUNK_RAW_BYTES),
            ..settings
        };
        let writer = Self {
            settings,
            video_codecs: header.video_codecs.len(),
            audio_codecs: header.audio_codecs.len(),
            compressor: zstd::bulk::Compressor::new(settings.zstd_level).ok(),
            raw: Vec::new(),
            summary: Summary::default(),
            last_ms: [None; Stream::COUNT],
            next_seq: 0,
            offset: header_bytes.len() as u64,
            index: Vec::new(),
            raw_total: 0,
        };
        Ok((writer, Bytes::from(header_bytes)))
    }

    /// Adds a record that happened `at_ms` after the recording started. Returns the
    /// bytes of the chunk this record closed, if it closed one (the record itself then
    /// opens the next chunk).
    ///
    /// Refused, and nothing recorded: a record earlier than the last one of its
    /// [`Stream`], a codec missing from the header, a field over its size limit.
    pub fn push(&mut self, at_ms: u64, record: &Record) -> Result<Option<Bytes>, RecordError> {
        if at_ms == u64::MAX {
            return Err(RecordError::TimeOutOfRange(at_ms));
        }
        let stream = record.stream();
        if let Some(last_ms) = self.last_ms[stream as usize].filter(|&last| at_ms < last) {
            return Err(RecordError::OutOfOrder {
                stream,
                at_ms,
                last_ms,
            });
        }
        let (codec, codecs) = match record {
            Record::Video(frame) => (frame.codec, self.video_codecs),
            Record::Audio(frame) => (frame.codec, self.audio_codecs),
            _ => (0, usize::MAX),
        };
        if usize::from(codec) >= codecs {
            return Err(RecordError::UnknownCodec { stream, codec });
        }

        let open_len = self.raw.len();
        records::encode(at_ms, record, &mut self.raw)?;
        let record_len = self.raw.len() - open_len;
        let keyframe = record.is_keyframe();
        let open = &self.summary;
        let cut = open.count > 0
            && (open_len + record_len > self.settings.max_raw_bytes
                || at_ms.saturating_sub(open.first_ms) >= self.settings.max_media_ms
                || (keyframe
                    && open.saw_video
                    && at_ms.saturating_sub(open.first_ms) >= self.settings.keyframe_cut_min_ms));
        let closed = cut.then(|| self.cut(open_len));
        self.last_ms[stream as usize] = Some(at_ms);
        self.summary.add(at_ms, stream == Stream::Video, keyframe);
        Ok(closed)
    }

    /// Closes the open chunk if its earliest record is at least
    /// [`ChunkSettings::max_media_ms`] older than `now_ms` (milliseconds since the
    /// recording started), and returns its bytes. Call it from a timer, so that a
    /// quiet session's records do not wait in memory for the next record.
    pub fn poll_flush(&mut self, now_ms: u64) -> Option<Bytes> {
        (self.summary.count > 0
            && now_ms.saturating_sub(self.summary.first_ms) >= self.settings.max_media_ms)
            .then(|| self.cut(self.raw.len()))
    }

    /// Closes the open chunk, if it holds records, and returns its bytes.
    pub fn flush(&mut self) -> Option<Bytes> {
        (self.summary.count > 0).then(|| self.cut(self.raw.len()))
    }

    /// Closes the open chunk and returns the file's last bytes: that chunk, if any,
    /// and the footer (the index of every chunk and the trailer that points to it).
    pub fn finish(mut self) -> Bytes {
        let mut out = self.flush().map(Vec::from).unwrap_or_default();
        out.extend_from_slice(&index::encode(&self.index, self.offset));
        Bytes::from(out)
    }

    /// Bytes handed out so far (header and closed chunks).
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Raw (uncompressed) payload bytes of the chunks closed so far.
    pub fn raw_bytes_total(&self) -> u64 {
        self.raw_total
    }

    /// The chunks closed so far.
    pub fn chunks(&self) -> &[ChunkInfo] {
        &self.index
    }

    /// Closes a chunk of the first `len` raw bytes, which the summary describes, and
    /// keeps the rest open.
    fn cut(&mut self, len: usize) -> Bytes {
        let (info, bytes) = chunk::encode(
            self.next_seq,
            self.offset,
            &self.summary,
            &self.raw[..len],
            self.compressor.as_mut(),
        );
        self.raw.drain(..len);
        self.summary = Summary::default();
        self.next_seq = self.next_seq.wrapping_add(1);
        self.offset += u64::from(info.len);
        self.raw_total += len as u64;
        self.index.push(info);
        Bytes::from(bytes)
    }
}
