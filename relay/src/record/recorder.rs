//! The recorder of one session: a sans-IO core that turns what happens in a session
//! (the customer's video as RTP packets, input events, chat, roster changes, file
//! transfers, gaps) into the recording container's bytes.
//!
//! It knows nothing of files, threads or clocks: every input carries its `Instant`,
//! and the bytes come out of [`Recorder::poll_output`]. The IO shell
//! ([`super::live`]) runs one on a writer thread per recording and appends what it
//! hands out to the encrypted file.
//!
//! # Run-loop contract
//!
//! 1. [`Recorder::new`] returns the header bytes, which start the file.
//! 2. For every input, call [`Recorder::handle`]; then drain [`Recorder::poll_output`]
//!    until it returns `None` and append each chunk to the file, in order.
//! 3. From a timer, call [`Recorder::handle_timeout`] (a quiet session's last records
//!    reach the file within [`ChunkSettings::max_media_ms`]) and drain again.
//! 4. End with [`Recorder::finish`]: the last chunk and the footer.
//!
//! # Video
//!
//! Frames are stored depacketized, not as RTP: packets of one RTP timestamp are run
//! through the codec's depacketizer (the `rtc` crate's) and the frame is complete at
//! the packet with the marker bit. Recording starts at the first keyframe; a lost
//! packet (a hole in the sequence numbers, which is also what the shell's
//! keyframes-only mode leaves) drops the frame it was in and everything up to the next
//! keyframe, so that every recorded frame decodes. [`RecorderCounters`] counts what
//! was recorded and dropped.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;
use relay_codec::keyframe::VideoCodec;
use relay_codec::recording::{
    ChunkSettings, Record, RecordError, RecordingHeader, RecordingWriter, Stream, VideoFrame,
};
use rtc::rtp::codec::av1::Av1Depacketizer;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;
use rtc::rtp::codec::vp9::Vp9Packet;
use rtc::rtp::packetizer::Depacketizer;

/// The video codecs a recording's header lists, in this order: a frame names its codec
/// by its position here. Every codec the relay forwards is listed, so that the header
/// can be written before the customer publishes.
pub const VIDEO_CODECS: [VideoCodec; 4] = [
    VideoCodec::Vp8,
    VideoCodec::Vp9,
    VideoCodec::H264,
    VideoCodec::Av1,
];

/// What a recording is of.
#[derive(Debug, Clone)]
pub struct RecordingInfo {
    /// The session.
    pub session_id: String,
    /// Its portal (whose review key the file is encrypted to).
    pub portal: String,
    /// When the recording starts, in Unix milliseconds.
    pub start_unix_ms: u64,
}

/// One RTP packet of the customer's video: the header fields the recorder needs and
/// the payload, shared with the fan-out (no copy).
#[derive(Debug, Clone)]
pub struct RtpVideo {
    /// The track's codec.
    pub codec: VideoCodec,
    /// RTP sequence number.
    pub sequence_number: u16,
    /// RTP timestamp (90 kHz).
    pub timestamp: u32,
    /// The marker bit: the last packet of a frame.
    pub marker: bool,
    /// The RTP payload.
    pub payload: Bytes,
}

/// Something that happened in the session.
#[derive(Debug, Clone)]
pub enum Input {
    /// A packet of the customer's screen.
    Video(RtpVideo),
    /// Any other record (input, chat, roster, file transfer, gap), as stored.
    Record(Record),
}

/// What the recorder did with its inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecorderCounters {
    /// Video frames recorded.
    pub frames_recorded: u64,
    /// Keyframes among them.
    pub keyframes_recorded: u64,
    /// Complete frames left out while waiting for a keyframe (before the first one, or
    /// after a loss).
    pub frames_awaiting_keyframe: u64,
    /// Frames left out because a packet of theirs was lost or did not depacketize.
    pub frames_incomplete: u64,
    /// Records other than video recorded.
    pub records: u64,
    /// Records the container refused (a field over its size limit).
    pub refused: u64,
    /// Raw bytes pushed into the container.
    pub raw_bytes: u64,
}

/// The recorder of one session. See the module docs for the run-loop contract.
pub struct Recorder {
    start: Instant,
    writer: RecordingWriter,
    out: VecDeque<Bytes>,
    video: FrameAssembly,
    /// Latest time per stream: inputs from several tasks may arrive a little out of
    /// order, and the container wants each stream's times to go forward.
    last_ms: [u64; Stream::COUNT],
    counters: RecorderCounters,
    last_refusal: Option<RecordError>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("writer", &self.writer)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder whose record times count from `start` (the moment
    /// `info.start_unix_ms` names), and the header bytes that start the file.
    pub fn new(
        info: &RecordingInfo,
        start: Instant,
        settings: ChunkSettings,
    ) -> Result<(Recorder, Bytes), RecordError> {
        let header = RecordingHeader {
            session_id: info.session_id.clone(),
            portal: info.portal.clone(),
            start_unix_ms: info.start_unix_ms,
            video_codecs: VIDEO_CODECS
                .iter()
                .map(|c| c.mime_type().to_owned())
                .collect(),
            audio_codecs: Vec::new(),
        };
        let (writer, header_bytes) = RecordingWriter::new(&header, settings)?;
        let recorder = Recorder {
            start,
            writer,
            out: VecDeque::new(),
            video: FrameAssembly::default(),
            last_ms: [0; Stream::COUNT],
            counters: RecorderCounters::default(),
            last_refusal: None,
        };
        Ok((recorder, header_bytes))
    }

    /// Takes one input that happened at `at`.
    pub fn handle(&mut self, at: Instant, input: Input) {
        match input {
            Input::Video(packet) => {
                if let Some(frame) = self.video.push(at, packet, &mut self.counters) {
                    let keyframe = frame.keyframe;
                    let at = frame.at;
                    if self.push(at, &Record::Video(frame.into_record())) {
                        self.counters.frames_recorded += 1;
                        self.counters.keyframes_recorded += u64::from(keyframe);
                    }
                }
            }
            Input::Record(record) => {
                if self.push(at, &record) {
                    self.counters.records += 1;
                }
            }
        }
    }

    /// Closes the open chunk if it is old enough (see
    /// [`RecordingWriter::poll_flush`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(chunk) = self.writer.poll_flush(self.ms(now)) {
            self.out.push_back(chunk);
        }
    }

    /// The next bytes to append to the file.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// What was recorded and dropped so far.
    pub fn counters(&self) -> &RecorderCounters {
        &self.counters
    }

    /// Bytes handed out so far (header and closed chunks).
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }

    /// Takes the last refusal of the container, to log it once.
    pub fn take_refusal(&mut self) -> Option<RecordError> {
        self.last_refusal.take()
    }

    /// The file's last bytes: any chunk not yet handed out, the open chunk and the
    /// footer. A frame still being assembled is left out (it never completed).
    pub fn finish(mut self) -> Bytes {
        let mut rest: Vec<u8> = Vec::new();
        while let Some(chunk) = self.out.pop_front() {
            rest.extend_from_slice(&chunk);
        }
        if rest.is_empty() {
            return self.writer.finish();
        }
        rest.extend_from_slice(&self.writer.finish());
        Bytes::from(rest)
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Pushes one record into the container; `false` if it was refused.
    fn push(&mut self, at: Instant, record: &Record) -> bool {
        let stream = record.stream() as usize;
        let at_ms = self.ms(at).max(self.last_ms[stream]);
        match self.writer.push(at_ms, record) {
            Ok(closed) => {
                self.last_ms[stream] = at_ms;
                if let Some(chunk) = closed {
                    self.out.push_back(chunk);
                }
                self.counters.raw_bytes = self.writer.raw_bytes_total();
                true
            }
            Err(e) => {
                self.counters.refused += 1;
                self.last_refusal = Some(e);
                false
            }
        }
    }
}

/// A frame as assembled, before it becomes a record.
struct AssembledFrame {
    at: Instant,
    codec: VideoCodec,
    keyframe: bool,
    timestamp: u32,
    data: Vec<u8>,
}

impl AssembledFrame {
    fn into_record(self) -> VideoFrame {
        let codec = VIDEO_CODECS
            .iter()
            .position(|&c| c == self.codec)
            .unwrap_or(0) as u8;
        VideoFrame {
            keyframe: self.keyframe,
            codec,
            rtp_timestamp: self.timestamp,
            data: Bytes::from(self.data),
        }
    }
}

/// Reassembles RTP packets into whole frames, keyed on the RTP timestamp and ended
/// by the marker bit, and keeps track of whether the next frame decodes.
#[derive(Default)]
struct FrameAssembly {
    depacketizer: Option<(VideoCodec, CodecDepacketizer)>,
    /// The frame being assembled: its timestamp and first packet's arrival.
    current: Option<(u32, Instant)>,
    data: Vec<u8>,
    /// A packet of the current frame was lost or did not depacketize.
    broken: bool,
    next_seq: Option<u16>,
    /// A keyframe was recorded since the start or the last loss.
    synced: bool,
}

impl FrameAssembly {
    fn push(
        &mut self,
        at: Instant,
        packet: RtpVideo,
        counters: &mut RecorderCounters,
    ) -> Option<AssembledFrame> {
        if self.depacketizer.as_ref().map(|d| d.0) != Some(packet.codec) {
            // A new track (or the customer changed codec): start over at a keyframe.
            self.abandon(counters);
            self.depacketizer = Some((packet.codec, CodecDepacketizer::new(packet.codec)));
            self.synced = false;
            self.next_seq = None;
        }
        if self
            .next_seq
            .is_some_and(|expected| expected != packet.sequence_number)
        {
            // Lost packets (upstream, or dropped by the shell's keyframes-only mode):
            // whatever they belonged to is gone, and later frames may refer to it.
            self.broken = self.current.is_some();
            self.synced = false;
        }
        self.next_seq = Some(packet.sequence_number.wrapping_add(1));
        if self
            .current
            .is_some_and(|(timestamp, _)| timestamp != packet.timestamp)
        {
            // The previous frame's last packet never came.
            self.broken = true;
            self.abandon(counters);
            self.synced = false;
        }
        if self.current.is_none() {
            self.current = Some((packet.timestamp, at));
            self.data.clear();
        }
        let (codec, depacketizer) = self.depacketizer.as_mut()?;
        let codec = *codec;
        match depacketizer.depacketize(&packet.payload) {
            Ok(part) => self.data.extend_from_slice(&part),
            Err(_) => self.broken = true,
        }
        if !packet.marker {
            return None;
        }
        let (timestamp, first_at) = self.current.take()?;
        let data = std::mem::take(&mut self.data);
        if std::mem::take(&mut self.broken) || data.is_empty() {
            counters.frames_incomplete += 1;
            self.synced = false;
            self.depacketizer = Some((codec, CodecDepacketizer::new(codec)));
            return None;
        }
        let keyframe = relay_codec::frame::is_keyframe(codec, &data);
        if !keyframe && !self.synced {
            counters.frames_awaiting_keyframe += 1;
            return None;
        }
        self.synced = true;
        Some(AssembledFrame {
            at: first_at,
            codec,
            keyframe,
            timestamp,
            data,
        })
    }

    /// Drops a frame in progress, counting it as incomplete.
    fn abandon(&mut self, counters: &mut RecorderCounters) {
        if self.current.take().is_some() {
            counters.frames_incomplete += 1;
            self.data.clear();
            self.broken = false;
            if let Some((codec, d)) = self.depacketizer.as_mut() {
                // Depacketizers keep fragments of a half-received NAL unit or OBU.
                *d = CodecDepacketizer::new(*codec);
            }
        }
    }
}

/// One of the `rtc` crate's depacketizers, chosen at run time from the track's codec.
enum CodecDepacketizer {
    Vp8(Vp8Packet),
    Vp9(Vp9Packet),
    H264(H264Packet),
    Av1(Av1Depacketizer),
}

impl CodecDepacketizer {
    fn new(codec: VideoCodec) -> CodecDepacketizer {
        match codec {
            VideoCodec::Vp8 => CodecDepacketizer::Vp8(Vp8Packet::default()),
            VideoCodec::Vp9 => CodecDepacketizer::Vp9(Vp9Packet::default()),
            VideoCodec::H264 => CodecDepacketizer::H264(H264Packet::default()),
            VideoCodec::Av1 => CodecDepacketizer::Av1(Av1Depacketizer::new()),
        }
    }

    fn depacketize(&mut self, payload: &Bytes) -> rtc::shared::error::Result<Bytes> {
        match self {
            CodecDepacketizer::Vp8(d) => d.depacketize(payload),
            CodecDepacketizer::Vp9(d) => d.depacketize(payload),
            CodecDepacketizer::H264(d) => d.depacketize(payload),
            CodecDepacketizer::Av1(d) => d.depacketize(payload),
        }
    }
}

#[cfg(test)]
mod tests;
