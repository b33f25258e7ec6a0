//! `relay recordings export`: the screen video of a recording as a file that players
//! open: VP8 and VP9 in WebM (written with `webm-iterable`), H.264 in MP4 (written
//! with `mp4`).
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

use super::bitstream;

/// How far the RTP clock may disagree with the recorded times before the recorded
/// times win.
pub const RTP_TRUST_MS: u64 = 500;
/// Duration of a lone frame, in 90 kHz ticks (1/30 s).
const LONE_FRAME_TICKS: u64 = 3000;

/// The container to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// WebM: VP8, VP9.
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
    #[error("the output file must end in .webm (VP8, VP9) or .mp4 (H.264)")]
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
/// ([`Recording::records_from`]), so that its first frame decodes.
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
    let mut codec_index = None;
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
        if *codec_index.get_or_insert(frame.codec) != frame.codec
            || (need_keyframe && !frame.keyframe)
        {
            skipped_frames += 1;
            continue;
        }
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
            data: frame.data,
        });
    }
    let (Some(codec_index), Some(first)) = (codec_index, frames.first()) else {
        return Err(ExportError::NoVideo);
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
    let (width, height) = match (codec, format) {
        (VideoCodec::Vp8, ExportFormat::WebM) => bitstream::vp8_size(&first.data),
        (VideoCodec::Vp9, ExportFormat::WebM) => bitstream::vp9_size(&first.data),
        (VideoCodec::H264, ExportFormat::Mp4) => bitstream::h264_parameter_sets(&first.data)
            .0
            .and_then(bitstream::h264_size),
        (VideoCodec::Av1, _) => return Err(ExportError::UnsupportedCodec(mime)),
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
        _ => write_webm(file, codec, &frames, end_ticks, width, height),
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
        M::Video(Master::Start),
        M::PixelWidth(u64::from(width)),
        M::PixelHeight(u64::from(height)),
        M::Video(Master::End),
        M::TrackEntry(Master::End),
        M::Tracks(Master::End),
    ];
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
