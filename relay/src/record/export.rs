//! `relay recordings export`: the screen video of a recording as a file that players
//! open: VP8, VP9 and AV1 in WebM (written with `webm-iterable`; AV1 as the Matroska
//! AV1 codec mapping has it, see [`super::av1`]), H.264 in MP4 (written with `mp4`).
//!
//! Frame times come from the records: each frame's time after the first is the
//! previous one's plus the RTP timestamp difference (90 kHz, exact) when that agrees
//! with the recorded times to within [`RTP_TRUST_MS`], else plus the recorded
//! difference (the customer reconnected and its RTP clock restarted). The last frame
//! lasts as long as the one before it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use bytes::Bytes;
use relay_codec::keyframe::VideoCodec;
use relay_codec::recording::{Record, Recording};

use super::av1::{Av1Blocks, Av1Error};
use super::bitstream;

/// How far the RTP clock may disagree with the recorded times before the recorded
/// times win.
pub const RTP_TRUST_MS: u64 = 500;
/// Duration of a lone frame, in 90 kHz ticks (1/30 s).
const LONE_FRAME_TICKS: u64 = 3000;

/// The container to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// WebM: VP8, VP9, AV1.
    WebM,
    /// MP4: H.264.
    Mp4,
}

impl ExportFormat {
    /// The format a file name asks for, by its extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "webm" => Some(ExportFormat::WebM),
            "mp4" => Some(ExportFormat::Mp4),
            _ => None,
        }
    }
}

/// Why a video could not be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The output name says neither `.webm` nor `.mp4`.
    #[error("the output file must end in .webm (VP8, VP9, AV1) or .mp4 (H.264)")]
    UnknownFormat,
    /// No keyframe in the range asked for (or no video at all).
    #[error("the recording holds no decodable video in the range asked for")]
    NoVideo,
    /// The codec does not go into the container asked for.
    #[error("{codec} video cannot be written as {wanted}; use {instead}")]
    WrongContainer {
        /// The recording's codec.
        codec: String,
        /// The extension asked for.
        wanted: &'static str,
        /// The one to use.
        instead: &'static str,
    },
    /// A codec the exporter does not write.
    #[error("exporting {0} video is not supported")]
    UnsupportedCodec(String),
    /// The first keyframe does not say its picture size.
    #[error("cannot read the picture size from the first keyframe")]
    NoPictureSize,
    /// AV1 video none of whose keyframes in the range asked for carries a sequence
    /// header, so none can start it.
    #[error("no AV1 keyframe in the range asked for carries a sequence header")]
    NoSequenceHeader,
    /// An AV1 frame that cannot be read.
    #[error("the AV1 frame at {at_ms} ms cannot be read: {reason}")]
    MalformedAv1 {
        /// The frame's time, in ms since the recording started.
        at_ms: u64,
        /// What is wrong with it.
        reason: Av1Error,
    },
    /// The output exists.
    #[error("{0} exists; export does not overwrite files")]
    Exists(std::path::PathBuf),
    /// Writing failed.
    #[error("writing {path}: {detail}")]
    Write {
        /// The output.
        path: std::path::PathBuf,
        /// What went wrong.
        detail: String,
    },
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// The codec (MIME name).
    pub codec: String,
    /// Frames written.
    pub frames: u64,
    /// Of them, keyframes.
    pub keyframes: u64,
    /// Duration of the video, in milliseconds.
    pub duration_ms: u64,
    /// Time of the first frame written, in ms since the recording started.
    pub first_ms: u64,
    /// Picture size.
    pub width: u32,
    /// Picture size.
    pub height: u32,
    /// Chunks that could not be read (video resumes at the next keyframe after each).
    pub corrupt_chunks: usize,
    /// Frames left out: of another codec, or undecodable after a lost chunk.
    pub skipped_frames: u64,
}

/// One frame to write.
struct Frame {
    ticks: u64,
    keyframe: bool,
    data: Bytes,
}

/// Writes the video between `from_ms` and `to_ms` (ms since the recording started) to
/// `out`. The video starts at the last keyframe at or before `from_ms`
/// ([`Recording::records_from`]), so that its first frame decodes; for AV1, at the
/// first keyframe that carries a sequence header.
pub fn export_video(
    recording: &Recording<'_>,
    out: &Path,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
) -> Result<ExportSummary, ExportError> {
    let format = ExportFormat::from_path(out).ok_or(ExportError::UnknownFormat)?;
    let records = match from_ms {
        Some(from) => recording.records_from(from),
        None => recording.records(),
    };
    let to_ms = to_ms.unwrap_or(u64::MAX);
    let codec_of = |index: u8| {
        let mime = recording.header().video_codecs.get(usize::from(index));
        mime.and_then(|m| VideoCodec::from_mime(m))
    };
    let mut codec_index = None;
    // AV1 going into WebM: its temporal units become blocks as they are read, since
    // where the video can start depends on the sequence headers seen.
    let mut av1: Option<Av1Blocks> = None;
    let mut awaiting_sequence_header = false;
    let mut frames: Vec<Frame> = Vec::new();
    let (mut corrupt_chunks, mut skipped_frames) = (0, 0);
    let mut need_keyframe = true;
    let mut last: Option<(u64, u32)> = None; // (at_ms, rtp) of the previous frame
    let mut first_ms = 0;
    for record in records {
        let timed = match record {
            Ok(timed) => timed,
            Err(_) => {
                corrupt_chunks += 1;
                need_keyframe = true;
                continue;
            }
        };
        let Record::Video(frame) = timed.record else {
            continue;
        };
        if timed.at_ms > to_ms {
            break;
        }
        if codec_index.is_none()
            && format == ExportFormat::WebM
            && codec_of(frame.codec) == Some(VideoCodec::Av1)
        {
            av1 = Some(Av1Blocks::default());
        }
        if *codec_index.get_or_insert(frame.codec) != frame.codec
            || (need_keyframe && !frame.keyframe)
        {
            skipped_frames += 1;
            continue;
        }
        let data = match &mut av1 {
            None => frame.data,
            Some(blocks) => match blocks.block(&frame.data, frame.keyframe) {
                Ok(Some(block)) => Bytes::from(block),
                Ok(None) => {
                    awaiting_sequence_header = true;
                    skipped_frames += 1;
                    continue;
                }
                Err(reason) => {
                    return Err(ExportError::MalformedAv1 {
                        at_ms: timed.at_ms,
                        reason,
                    });
                }
            },
        };
        need_keyframe = false;
        let ticks = match last {
            None => {
                first_ms = timed.at_ms;
                0
            }
            Some((at_ms, rtp)) => {
                let previous = frames.last().map_or(0, |f| f.ticks);
                let recorded = timed.at_ms.saturating_sub(at_ms);
                let rtp_delta = u64::from(frame.rtp_timestamp.wrapping_sub(rtp));
                let delta = if (rtp_delta / 90).abs_diff(recorded) <= RTP_TRUST_MS {
                    rtp_delta
                } else {
                    recorded * 90
                };
                previous + delta.max(1)
            }
        };
        last = Some((timed.at_ms, frame.rtp_timestamp));
        frames.push(Frame {
            ticks,
            keyframe: frame.keyframe,
            data,
        });
    }
    let (Some(codec_index), Some(first)) = (codec_index, frames.first()) else {
        return Err(if awaiting_sequence_header {
            ExportError::NoSequenceHeader
        } else {
            ExportError::NoVideo
        });
    };
    let mime = recording
        .header()
        .video_codecs
        .get(usize::from(codec_index))
        .cloned()
        .unwrap_or_default();
    let codec = VideoCodec::from_mime(&mime).ok_or(ExportError::UnsupportedCodec(mime.clone()))?;
    let (wanted, instead) = match format {
        ExportFormat::WebM => ("WebM", ".mp4"),
        ExportFormat::Mp4 => ("MP4", ".webm"),
    };
    // The AV1 track's CodecPrivate, from the sequence header the video starts with.
    let av1_track = av1.as_ref().and_then(Av1Blocks::track);
    let (width, height) = match (codec, format) {
        (VideoCodec::Vp8, ExportFormat::WebM) => bitstream::vp8_size(&first.data),
        (VideoCodec::Vp9, ExportFormat::WebM) => bitstream::vp9_size(&first.data),
        (VideoCodec::Av1, ExportFormat::WebM) => {
            let track = av1_track.ok_or(ExportError::NoSequenceHeader)?;
            let header = &track.sequence_header;
            Some((header.max_width, header.max_height))
        }
        (VideoCodec::H264, ExportFormat::Mp4) => bitstream::h264_parameter_sets(&first.data)
            .0
            .and_then(bitstream::h264_size),
        _ => {
            return Err(ExportError::WrongContainer {
                codec: mime,
                wanted,
                instead,
            });
        }
    }
    .ok_or(ExportError::NoPictureSize)?;

    let last_ticks = match frames.as_slice() {
        [.., a, b] => b.ticks - a.ticks,
        _ => LONE_FRAME_TICKS,
    };
    let end_ticks = frames.last().map_or(0, |f| f.ticks) + last_ticks;
    let summary = ExportSummary {
        codec: mime,
        frames: frames.len() as u64,
        keyframes: frames.iter().filter(|f| f.keyframe).count() as u64,
        duration_ms: end_ticks / 90,
        first_ms,
        width,
        height,
        corrupt_chunks,
        skipped_frames,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => ExportError::Exists(out.to_owned()),
            _ => write_error(out, e),
        })?;
    let written = match (codec, format) {
        (VideoCodec::H264, _) => write_mp4(file, &frames, end_ticks, width, height),
        _ => write_webm(
            file,
            codec,
            av1_track.map(|t| t.codec_private.as_slice()),
            &frames,
            end_ticks,
            width,
            height,
        ),
    };
    if let Err(detail) = written {
        // Leave no half-written video that looks like a result.
        let _ = std::fs::remove_file(out);
        return Err(ExportError::Write {
            path: out.to_owned(),
            detail,
        });
    }
    Ok(summary)
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Write {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// Most milliseconds a WebM cluster spans: block times are i16 offsets from it.
const MAX_CLUSTER_MS: u64 = 30_000;

fn write_webm(
    file: File,
    codec: VideoCodec,
    codec_private: Option<&[u8]>,
    frames: &[Frame],
    end_ticks: u64,
    width: u32,
    height: u32,
) -> Result<(), String> {
    use webm_iterable::WebmWriter;
    use webm_iterable::matroska_spec::{Master, MatroskaSpec as M, SimpleBlock};

    let codec_id = match codec {
        VideoCodec::Vp8 => "V_VP8",
        VideoCodec::Vp9 => "V_VP9",
        VideoCodec::Av1 => "V_AV1",
        _ => return Err(format!("{codec:?} does not go into WebM here")),
    };
    let mut w = WebmWriter::new(BufWriter::new(file));
    let mut tags = vec![
        M::Ebml(Master::Start),
        M::EbmlVersion(1),
        M::EbmlReadVersion(1),
        M::EbmlMaxIdLength(4),
        M::EbmlMaxSizeLength(8),
        M::DocType("webm".into()),
        M::DocTypeVersion(4),
        M::DocTypeReadVersion(2),
        M::Ebml(Master::End),
        M::Segment(Master::Start),
        M::Info(Master::Start),
        M::TimestampScale(1_000_000),
        M::Duration(end_ticks as f64 / 90.0),
        M::MuxingApp("relay".into()),
        M::WritingApp("relay recordings export".into()),
        M::Info(Master::End),
        M::Tracks(Master::Start),
        M::TrackEntry(Master::Start),
        M::TrackNumber(1),
        M::TrackUID(1),
        M::TrackType(1),
        M::FlagLacing(0),
        M::CodecID(codec_id.into()),
    ];
    if let Some(private) = codec_private {
        tags.push(M::CodecPrivate(private.to_vec()));
    }
    tags.extend([
        M::Video(Master::Start),
        M::PixelWidth(u64::from(width)),
        M::PixelHeight(u64::from(height)),
        M::Video(Master::End),
        M::TrackEntry(Master::End),
        M::Tracks(Master::End),
    ]);
    for tag in tags.drain(..) {
        w.write(&tag).map_err(|e| e.to_string())?;
    }
    let mut cluster_ms: Option<u64> = None;
    for frame in frames {
        let ms = frame.ticks / 90;
        if cluster_ms.is_none_or(|start| frame.keyframe || ms - start > MAX_CLUSTER_MS) {
            if cluster_ms.is_some() {
                w.write(&M::Cluster(Master::End))
                    .map_err(|e| e.to_string())?;
            }
            w.write(&M::Cluster(Master::Start))
                .map_err(|e| e.to_string())?;
            w.write(&M::Timestamp(ms)).map_err(|e| e.to_string())?;
            cluster_ms = Some(ms);
        }
        // At most MAX_CLUSTER_MS after the cluster's start: fits an i16.
        let relative = (ms - cluster_ms.unwrap_or(ms)) as i16;
        let block =
            SimpleBlock::new_uncheked(&frame.data, 1, relative, false, None, false, frame.keyframe);
        w.write(&M::from(block)).map_err(|e| e.to_string())?;
    }
    if cluster_ms.is_some() {
        w.write(&M::Cluster(Master::End))
            .map_err(|e| e.to_string())?;
    }
    w.write(&M::Segment(Master::End))
        .map_err(|e| e.to_string())?;
    let mut out = w.into_inner().map_err(|e| e.to_string())?;
    out.flush().map_err(|e| e.to_string())
}

fn write_mp4(
    file: File,
    frames: &[Frame],
    end_ticks: u64,
    width: u32,
    height: u32,
) -> Result<(), String> {
    use mp4::{
        AvcConfig, FourCC, MediaConfig, Mp4Config, Mp4Sample, Mp4Writer, TrackConfig, TrackType,
    };

    let first = frames.first().ok_or("no frames")?;
    let (Some(sps), Some(pps)) = bitstream::h264_parameter_sets(&first.data) else {
        return Err("the first keyframe has no SPS and PPS".into());
    };
    let config = Mp4Config {
        major_brand: "isom".parse::<FourCC>().map_err(|e| e.to_string())?,
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"]
            .iter()
            .filter_map(|b| b.parse::<FourCC>().ok())
            .collect(),
        // The track's 90 kHz: the crate adds each sample's duration to the movie's
        // in movie units, rounding down, which a coarser scale would shorten.
        timescale: 90_000,
    };
    let mut mp4 =
        Mp4Writer::write_start(BufWriter::new(file), &config).map_err(|e| e.to_string())?;
    mp4.add_track(&TrackConfig {
        track_type: TrackType::Video,
        timescale: 90_000,
        language: "und".into(),
        media_conf: MediaConfig::AvcConfig(AvcConfig {
            width: u16::try_from(width).map_err(|e| e.to_string())?,
            height: u16::try_from(height).map_err(|e| e.to_string())?,
            seq_param_set: sps.to_vec(),
            pic_param_set: pps.to_vec(),
        }),
    })
    .map_err(|e| e.to_string())?;
    for (i, frame) in frames.iter().enumerate() {
        let next = frames.get(i + 1).map_or(end_ticks, |f| f.ticks);
        let sample = Mp4Sample {
            start_time: frame.ticks,
            duration: u32::try_from(next - frame.ticks).map_err(|e| e.to_string())?,
            rendering_offset: 0,
            is_sync: frame.keyframe,
            bytes: Bytes::from(length_prefixed(&frame.data)),
        };
        mp4.write_sample(1, &sample).map_err(|e| e.to_string())?;
    }
    mp4.write_end().map_err(|e| e.to_string())?;
    mp4.into_writer().flush().map_err(|e| e.to_string())
}

/// An Annex B access unit as MP4 wants it: each NAL unit with a 4-byte length instead
/// of a start code, access unit delimiters dropped (parameter sets stay in band too,
/// so that a stream whose SPS changes still decodes).
fn length_prefixed(access_unit: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(access_unit.len() + 16);
    for nal in relay_codec::frame::annex_b_nals(access_unit) {
        if relay_codec::frame::nal_type(nal) == Some(relay_codec::frame::NAL_AUD) {
            continue;
        }
        out.extend_from_slice(&(nal.len() as u32).to_be_bytes());
        out.extend_from_slice(nal);
    }
    out
}

#[cfg(test)]
mod tests {
    use relay_codec::frame::{OBU_SEQUENCE_HEADER, OBU_TEMPORAL_DELIMITER, av1_obus};
    use relay_codec::recording::{ChunkSettings, RecordingHeader, RecordingWriter, VideoFrame};

    use super::*;
    use crate::record::bitstream::fixture_ivf_frames;

    /// A recording's bytes: these AV1 frames at 15 fps, keyframes at 0 and 15 as in the
    /// fixture.
    fn av1_recording(frames: &[Vec<u8>]) -> Vec<u8> {
        let header = RecordingHeader {
            session_id: "sess-av1".into(),
            portal: "support".into(),
            start_unix_ms: 1_763_900_000_000,
            video_codecs: vec!["video/AV1".into()],
            audio_codecs: vec![],
        };
        let (mut writer, head) =
            RecordingWriter::new(&header, ChunkSettings::default()).expect("writer");
        let mut file = head.to_vec();
        for (i, data) in frames.iter().enumerate() {
            let i = i as u64;
            let frame = Record::Video(VideoFrame {
                keyframe: i % 15 == 0,
                codec: 0,
                rtp_timestamp: (i * 6000) as u32,
                data: Bytes::from(data.clone()),
            });
            if let Some(chunk) = writer.push(i * 1000 / 15, &frame).expect("push") {
                file.extend_from_slice(&chunk);
            }
        }
        file.extend_from_slice(&writer.finish());
        file
    }

    /// A temporal unit without its sequence header.
    fn without_sequence_header(temporal_unit: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for obu in av1_obus(temporal_unit).map(|o| o.expect("whole OBU")) {
            if obu.obu_type != OBU_SEQUENCE_HEADER {
                obu.write_with_size(&mut out);
            }
        }
        out
    }

    /// What a WebM file holds: CodecID, CodecPrivate, PixelWidth/Height, and each
    /// SimpleBlock's keyframe flag and data.
    struct WebM {
        codec_id: String,
        codec_private: Vec<u8>,
        size: (u64, u64),
        blocks: Vec<(bool, Vec<u8>)>,
    }

    fn read_webm(path: &Path) -> WebM {
        use webm_iterable::WebmIterator;
        use webm_iterable::matroska_spec::{MatroskaSpec as M, SimpleBlock};

        let mut webm = WebM {
            codec_id: String::new(),
            codec_private: Vec::new(),
            size: (0, 0),
            blocks: Vec::new(),
        };
        let file = File::open(path).expect("open webm");
        for tag in WebmIterator::new(file, &[]) {
            match tag.expect("a WebM element") {
                M::CodecID(id) => webm.codec_id = id,
                M::CodecPrivate(private) => webm.codec_private = private,
                M::PixelWidth(w) => webm.size.0 = w,
                M::PixelHeight(h) => webm.size.1 = h,
                M::SimpleBlock(data) => {
                    let block = SimpleBlock::try_from(&data).expect("a SimpleBlock");
                    webm.blocks
                        .push((block.keyframe, block.raw_frame_data().to_vec()));
                }
                _ => {}
            }
        }
        webm
    }

    #[test]
    fn av1_goes_into_webm_as_the_matroska_mapping_says() {
        let frames = fixture_ivf_frames("screen-av1.ivf");
        let bytes = av1_recording(&frames);
        let recording = Recording::parse(&bytes).expect("recording");
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("screen.webm");
        let summary = export_video(&recording, &out, None, None).expect("export");
        assert_eq!(
            (summary.frames, summary.keyframes, summary.duration_ms),
            (30, 2, 2000)
        );
        assert_eq!((summary.width, summary.height), (640, 360));

        let webm = read_webm(&out);
        assert_eq!(webm.codec_id, "V_AV1");
        assert_eq!(webm.size, (640, 360));
        // The configuration record ffmpeg writes for this stream, then the sequence
        // header OBU as the first temporal unit holds it (after its temporal delimiter).
        let sequence_header = &frames[0][2..2 + 13];
        assert_eq!(sequence_header[0] >> 3 & 0x0f, OBU_SEQUENCE_HEADER);
        assert_eq!(
            webm.codec_private,
            [&[0x81, 0x01, 0x0c, 0x00][..], sequence_header].concat()
        );
        assert_eq!(webm.blocks.len(), 30);
        for (i, ((keyframe, block), frame)) in webm.blocks.iter().zip(&frames).enumerate() {
            assert_eq!(*keyframe, i % 15 == 0, "block {i}");
            // The temporal unit less its temporal delimiter (`12 00`), byte for byte.
            assert_eq!(frame[..2], [0x12, 0x00]);
            assert!(block[..] == frame[2..], "block {i} differs from its frame");
            assert!(av1_obus(block).all(|o| o.is_ok_and(|o| o.obu_type != OBU_TEMPORAL_DELIMITER)));
        }

        // AV1 does not go into MP4.
        let mp4 = dir.path().join("screen.mp4");
        let err = export_video(&recording, &mp4, None, None).expect_err("mp4");
        assert!(err.to_string().contains("use .webm"), "{err}");
        assert!(!mp4.exists());
    }

    #[test]
    fn a_keyframe_without_a_sequence_header_gets_the_last_one_seen() {
        let mut frames = fixture_ivf_frames("screen-av1.ivf");
        let original = frames[15].clone();
        frames[15] = without_sequence_header(&frames[15]);
        let bytes = av1_recording(&frames);
        let recording = Recording::parse(&bytes).expect("recording");
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("all.webm");
        let summary = export_video(&recording, &out, None, None).expect("export");
        assert_eq!((summary.frames, summary.keyframes), (30, 2));
        let webm = read_webm(&out);
        // Both sequence headers are the same: block 15 is as the encoder made it.
        assert!(webm.blocks[15].1[..] == original[2..]);

        // Seeking to it: it cannot start the video, and no later keyframe can.
        let part = dir.path().join("part.webm");
        let err = export_video(&recording, &part, Some(1100), None).expect_err("no header");
        assert!(matches!(err, ExportError::NoSequenceHeader), "{err}");
        assert!(!part.exists());
    }

    #[test]
    fn malformed_av1_is_a_clear_error_and_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("bad.webm");

        let mut frames = fixture_ivf_frames("screen-av1.ivf");
        let cut = frames[3].len() - 1;
        frames[3].truncate(cut);
        let bytes = av1_recording(&frames);
        let err = export_video(
            &Recording::parse(&bytes).expect("recording"),
            &out,
            None,
            None,
        )
        .expect_err("truncated");
        assert!(
            matches!(
                err,
                ExportError::MalformedAv1 {
                    at_ms: 200,
                    reason: Av1Error::TruncatedObu(_)
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("200 ms"), "{err}");
        assert!(!out.exists());

        let frames: Vec<Vec<u8>> = fixture_ivf_frames("screen-av1.ivf")
            .iter()
            .map(|f| without_sequence_header(f))
            .collect();
        let bytes = av1_recording(&frames);
        let err = export_video(
            &Recording::parse(&bytes).expect("recording"),
            &out,
            None,
            None,
        )
        .expect_err("no sequence header");
        assert!(matches!(err, ExportError::NoSequenceHeader), "{err}");
        assert!(!out.exists());
    }
}
