//! Encoded video frames to publish: from an IVF file (VP8, VP9, AV1), from an H.264
//! Annex B file split into access units, or made up on the fly for load tests.
//!
//! A [`FrameSource`] loops forever. [`FrameSource::next_frame`] hands out the frames in
//! order; [`FrameSource::next_keyframe`] skips ahead to the next keyframe, which is how a
//! publisher that cannot encode on demand answers a keyframe request (PLI/FIR).

use std::io::Cursor;
use std::path::Path;

use bytes::Bytes;
use rtc::media::io::ivf_reader::IVFReader;

use super::ClientError;
use relay_codec::frame::{
    NAL_AUD, NAL_IDR, NalSpan, annex_b_spans, nal_type, slice_starts_picture,
};
use relay_codec::keyframe::VideoCodec;

/// One encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Position in the file (0-based), or the counter of a synthetic source.
    pub index: u64,
    /// The encoded bytes (a whole IVF frame, or an Annex B access unit with its start
    /// codes).
    pub data: Bytes,
    /// Whether a decoder can start here.
    pub is_keyframe: bool,
}

/// An endless supply of encoded frames of one codec.
#[derive(Debug, Clone)]
pub struct FrameSource {
    codec: VideoCodec,
    frames: Frames,
    /// Frames handed out so far.
    position: u64,
}

#[derive(Debug, Clone)]
enum Frames {
    Stored {
        frames: Vec<Frame>,
        frame_rate: Option<f64>,
    },
    Synthetic {
        size: usize,
        keyframe_interval: u64,
    },
}

/// Smallest synthetic frame: the VP8 frame tag, the keyframe start code and size, and
/// the frame counter.
const MIN_SYNTHETIC_SIZE: usize = 18;

impl FrameSource {
    /// Reads a file: IVF when it starts with `DKIF`, otherwise H.264 Annex B.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ClientError::Source {
            what: format!("reading {}", path.display()),
            detail: e.to_string(),
        })?;
        if bytes.starts_with(b"DKIF") {
            Self::from_ivf(Bytes::from(bytes))
        } else {
            Self::from_h264_annex_b(Bytes::from(bytes))
        }
    }

    /// Frames of an IVF file held in memory; the codec comes from its FourCC.
    pub fn from_ivf(bytes: Bytes) -> Result<Self, ClientError> {
        let source_error = |detail: String| ClientError::Source {
            what: "IVF".into(),
            detail,
        };
        let (mut reader, header) =
            IVFReader::new(Cursor::new(bytes.as_ref())).map_err(|e| source_error(e.to_string()))?;
        let codec = VideoCodec::from_ivf_fourcc(&header.four_cc).ok_or_else(|| {
            source_error(format!(
                "unsupported FourCC {:?}",
                String::from_utf8_lossy(&header.four_cc)
            ))
        })?;
        let mut frames = Vec::new();
        // The reader reports the end of the file as an error; a frame cut short is one too,
        // so stop at the first error and refuse a file that yields no frame at all.
        while let Ok((payload, _)) = reader.parse_next_frame() {
            let data = payload.freeze();
            frames.push(Frame {
                index: frames.len() as u64,
                is_keyframe: codec.is_keyframe(&data),
                data,
            });
        }
        let frame_rate = (header.timebase_numerator != 0 && header.timebase_denominator != 0)
            .then(|| f64::from(header.timebase_denominator) / f64::from(header.timebase_numerator));
        Self::stored(codec, frames, frame_rate)
    }

    /// Access units of an H.264 Annex B stream held in memory.
    ///
    /// A new access unit starts at an access unit delimiter; in a stream without them,
    /// at SEI, SPS or PPS after a slice, or at a slice whose `first_mb_in_slice` is 0
    /// after a slice (H.264 7.4.1.2.3, for streams of whole pictures). Each access unit
    /// keeps its bytes as they are in the file, start codes and delimiter included.
    pub fn from_h264_annex_b(bytes: Bytes) -> Result<Self, ClientError> {
        let spans = annex_b_spans(&bytes);
        let mut frames = Vec::new();
        let mut au: Vec<NalSpan> = Vec::new();
        let mut has_slice = false;
        let push = |au: &mut Vec<NalSpan>, frames: &mut Vec<Frame>| {
            if let (Some(first), Some(last)) = (au.first(), au.last()) {
                let data = bytes.slice(first.prefix..last.end);
                let is_keyframe = au
                    .iter()
                    .any(|s| nal_type(&bytes[s.start..s.end]) == Some(NAL_IDR));
                frames.push(Frame {
                    index: frames.len() as u64,
                    data,
                    is_keyframe,
                });
            }
            au.clear();
        };
        for span in spans {
            let nal = &bytes[span.start..span.end];
            let ty = nal_type(nal).unwrap_or(0);
            let is_slice = (1..=5).contains(&ty);
            let starts_new = match ty {
                NAL_AUD => true,
                6..=8 | 14..=18 => has_slice,
                _ if is_slice => has_slice && slice_starts_picture(nal),
                _ => false,
            };
            if starts_new && !au.is_empty() {
                push(&mut au, &mut frames);
                has_slice = false;
            }
            has_slice |= is_slice;
            au.push(span);
        }
        push(&mut au, &mut frames);
        Self::stored(VideoCodec::H264, frames, None)
    }

    fn stored(
        codec: VideoCodec,
        frames: Vec<Frame>,
        frame_rate: Option<f64>,
    ) -> Result<Self, ClientError> {
        if frames.is_empty() {
            return Err(ClientError::Source {
                what: codec.to_string(),
                detail: "no frame in the input".into(),
            });
        }
        Ok(FrameSource {
            codec,
            frames: Frames::Stored { frames, frame_rate },
            position: 0,
        })
    }

    /// Made-up VP8-shaped frames of `size` bytes (at least 18), a keyframe every
    /// `keyframe_interval` frames (0 counts as 1), for load tests.
    ///
    /// They are **not** a decodable VP8 bitstream: only the 3-byte frame tag (key-frame
    /// bit and `show_frame`) and, on keyframes, the start code `9d 01 2a` and a 640×360
    /// size are real, which is what keyframe detection looks at. Then comes the frame
    /// counter (little-endian u64) and pseudo-random filler derived from it, so every
    /// frame has a distinct digest.
    pub fn synthetic(size: usize, keyframe_interval: u64) -> Self {
        FrameSource {
            codec: VideoCodec::Vp8,
            frames: Frames::Synthetic {
                size: size.max(MIN_SYNTHETIC_SIZE),
                keyframe_interval: keyframe_interval.max(1),
            },
            position: 0,
        }
    }

    /// The codec of every frame.
    pub fn codec(&self) -> VideoCodec {
        self.codec
    }

    /// Frames in one pass over the file; `None` for a synthetic source, which never
    /// repeats.
    pub fn frame_count(&self) -> Option<usize> {
        match &self.frames {
            Frames::Stored { frames, .. } => Some(frames.len()),
            Frames::Synthetic { .. } => None,
        }
    }

    /// The frames of one pass over the file (empty for a synthetic source).
    pub fn frames(&self) -> &[Frame] {
        match &self.frames {
            Frames::Stored { frames, .. } => frames,
            Frames::Synthetic { .. } => &[],
        }
    }

    /// The frame rate an IVF header declares, if any.
    pub fn frame_rate(&self) -> Option<f64> {
        match &self.frames {
            Frames::Stored { frame_rate, .. } => *frame_rate,
            Frames::Synthetic { .. } => None,
        }
    }

    /// How many frames were handed out so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The next frame, starting over at the end of the file.
    pub fn next_frame(&mut self) -> Frame {
        let frame = self.frame_at(self.position);
        self.position += 1;
        frame
    }

    /// Skips to the next keyframe (the next frame itself, if it is one) and returns it.
    /// A file without keyframes returns the next frame.
    pub fn next_keyframe(&mut self) -> Frame {
        let skip = match &self.frames {
            Frames::Stored { frames, .. } => {
                let len = frames.len() as u64;
                (0..len)
                    .find(|k| frames[((self.position + k) % len) as usize].is_keyframe)
                    .unwrap_or(0)
            }
            Frames::Synthetic {
                keyframe_interval, ..
            } => {
                let rem = self.position % keyframe_interval;
                if rem == 0 { 0 } else { keyframe_interval - rem }
            }
        };
        self.position += skip;
        self.next_frame()
    }

    fn frame_at(&self, position: u64) -> Frame {
        match &self.frames {
            Frames::Stored { frames, .. } => {
                frames[(position % frames.len() as u64) as usize].clone()
            }
            Frames::Synthetic {
                size,
                keyframe_interval,
            } => synthetic_frame(position, *size, position % keyframe_interval == 0),
        }
    }
}

impl Iterator for FrameSource {
    type Item = Frame;

    /// Never `None`: the source loops.
    fn next(&mut self) -> Option<Frame> {
        Some(self.next_frame())
    }
}

fn synthetic_frame(counter: u64, size: usize, is_keyframe: bool) -> Frame {
    let mut data = Vec::with_capacity(size);
    // Frame tag: key_frame bit (0 = key), version 0, show_frame 1, first_part_size 0.
    data.extend_from_slice(&[if is_keyframe { 0x10 } else { 0x11 }, 0x00, 0x00]);
    if is_keyframe {
        data.extend_from_slice(&[0x9d, 0x01, 0x2a]);
        data.extend_from_slice(&640u16.to_le_bytes());
        data.extend_from_slice(&360u16.to_le_bytes());
    }
    data.extend_from_slice(&counter.to_le_bytes());
    // xorshift64 seeded by the counter: cheap, and different for every frame.
    let mut state = counter.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while data.len() < size {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (size - data.len()).min(8);
        data.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    Frame {
        index: counter,
        data: Bytes::from(data),
        is_keyframe,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fixture of `tests/fixtures`.
    pub(crate) fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name)
    }

    fn keyframe_indices(source: &FrameSource) -> Vec<u64> {
        source
            .frames()
            .iter()
            .filter(|f| f.is_keyframe)
            .map(|f| f.index)
            .collect()
    }

    #[test]
    fn reads_the_vp8_fixture() {
        let source = FrameSource::open(fixture("screen-vp8.ivf")).expect("fixture");
        assert_eq!(source.codec(), VideoCodec::Vp8);
        assert_eq!(source.frame_count(), Some(60));
        assert_eq!(source.frame_rate(), Some(15.0));
        assert_eq!(keyframe_indices(&source), vec![0, 30]);
        // A VP8 keyframe carries the start code after the frame tag.
        for frame in source.frames().iter().filter(|f| f.is_keyframe) {
            assert_eq!(&frame.data[3..6], &[0x9d, 0x01, 0x2a]);
        }
    }

    #[test]
    fn splits_the_h264_fixture_into_access_units() {
        let path = fixture("screen-h264.h264");
        let file = std::fs::read(&path).expect("fixture");
        let source = FrameSource::open(&path).expect("fixture");
        assert_eq!(source.codec(), VideoCodec::H264);
        assert_eq!(source.frame_count(), Some(60));
        assert_eq!(keyframe_indices(&source), vec![0, 30]);
        // Access units are contiguous and cover the file, each starting with its AUD.
        let joined: Vec<u8> = source
            .frames()
            .iter()
            .flat_map(|f| f.data.to_vec())
            .collect();
        assert_eq!(joined, file);
        for frame in source.frames() {
            let spans = annex_b_spans(&frame.data);
            let types: Vec<u8> = spans
                .iter()
                .filter_map(|s| nal_type(&frame.data[s.start..s.end]))
                .collect();
            assert_eq!(types.first(), Some(&NAL_AUD), "frame {}", frame.index);
            let slices = types.iter().filter(|t| matches!(t, 1 | 5)).count();
            assert_eq!(slices, 1, "frame {}: {types:?}", frame.index);
            if frame.is_keyframe {
                assert!(
                    types.contains(&7) && types.contains(&8),
                    "SPS/PPS before IDR"
                );
            }
        }
    }

    #[test]
    fn splits_access_units_without_delimiters() {
        // SPS, PPS, IDR; slice (first_mb 0); slice (first_mb 0); a second slice of that
        // picture (first_mb != 0, first bit 0).
        let stream = [
            0, 0, 0, 1, 0x67, 0x42, 0, 0, 0, 1, 0x68, 0xce, 0, 0, 0, 1, 0x65, 0x88, 0x84, //
            0, 0, 0, 1, 0x41, 0x9a, 0x01, //
            0, 0, 0, 1, 0x41, 0x9a, 0x02, 0, 0, 1, 0x41, 0x40, 0x03,
        ];
        let source = FrameSource::from_h264_annex_b(Bytes::copy_from_slice(&stream)).expect("h264");
        let frames = source.frames();
        assert_eq!(frames.len(), 3);
        assert!(frames[0].is_keyframe && !frames[1].is_keyframe && !frames[2].is_keyframe);
        assert_eq!(annex_b_spans(&frames[2].data).len(), 2);
    }

    #[test]
    fn loops_and_skips_to_keyframes() {
        let mut source = FrameSource::open(fixture("screen-vp8.ivf")).expect("fixture");
        let first: Vec<u64> = source.by_ref().take(5).map(|f| f.index).collect();
        assert_eq!(first, vec![0, 1, 2, 3, 4]);
        let key = source.next_keyframe();
        assert_eq!((key.index, key.is_keyframe), (30, true));
        assert_eq!(source.next_frame().index, 31);
        // The next keyframe after 31 is the first frame of the next pass.
        assert_eq!(source.next_keyframe().index, 0);
        assert_eq!(source.position(), 61);
        // At a keyframe, next_keyframe returns it.
        let mut fresh = FrameSource::open(fixture("screen-vp8.ivf")).expect("fixture");
        assert_eq!(fresh.next_keyframe().index, 0);
    }

    #[test]
    fn synthetic_frames_are_distinct_vp8_shaped_and_keyed() {
        let mut source = FrameSource::synthetic(1000, 10);
        assert_eq!(source.codec(), VideoCodec::Vp8);
        assert_eq!(source.frame_count(), None);
        let frames: Vec<Frame> = source.by_ref().take(21).collect();
        for f in &frames {
            assert_eq!(f.data.len(), 1000);
            assert_eq!(f.is_keyframe, f.index % 10 == 0);
            assert_eq!(VideoCodec::Vp8.is_keyframe(&f.data), f.is_keyframe);
        }
        let digests: std::collections::HashSet<_> = frames
            .iter()
            .map(|f| crate::client::frame_digest(VideoCodec::Vp8, &f.data))
            .collect();
        assert_eq!(digests.len(), frames.len());
        assert_eq!(source.next_keyframe().index, 30);
        assert_eq!(
            FrameSource::synthetic(1, 0).next_frame().data.len(),
            MIN_SYNTHETIC_SIZE
        );
    }
}
