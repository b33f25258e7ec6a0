//! The video codecs the relay forwards, as a client sees them: names, keyframe detection,
//! frame digests that survive RTP packetization, and the matching depacketizer.
//!
//! A frame is compared across the relay by its [`frame_digest`], never by its raw bytes:
//! RTP payloaders do not always carry a frame byte for byte (the H.264 one drops access
//! unit delimiters and re-emits start codes, the AV1 one drops temporal delimiters and
//! OBU size fields), so the digest hashes what survives a packetize → depacketize trip.

use bytes::Bytes;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_AV1, MIME_TYPE_H264, MIME_TYPE_VP8, MIME_TYPE_VP9,
};
use rtc::rtp::codec::av1::Av1Depacketizer;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;
use rtc::rtp::codec::vp9::Vp9Packet;
use rtc::rtp::packetizer::Depacketizer;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters};
use sha2::{Digest, Sha256};

/// RTP clock rate of every video codec.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;

/// A video codec the relay forwards without transcoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// VP8 (RFC 7741).
    Vp8,
    /// VP9 (RFC 9628 draft payload format, profile 0).
    Vp9,
    /// H.264 (RFC 6184), packetization mode 1.
    H264,
    /// AV1 (AOM RTP payload format).
    Av1,
}

impl VideoCodec {
    /// Every codec, in the order a client prefers them.
    pub const ALL: [VideoCodec; 4] = [
        VideoCodec::Vp8,
        VideoCodec::Vp9,
        VideoCodec::H264,
        VideoCodec::Av1,
    ];

    /// The SDP/RTP mime type, e.g. `video/VP8`.
    pub fn mime_type(self) -> &'static str {
        match self {
            VideoCodec::Vp8 => MIME_TYPE_VP8,
            VideoCodec::Vp9 => MIME_TYPE_VP9,
            VideoCodec::H264 => MIME_TYPE_H264,
            VideoCodec::Av1 => MIME_TYPE_AV1,
        }
    }

    /// The codec with this mime type (case-insensitive), or with this bare encoding
    /// name (`VP8`, `h264`, as in an `a=rtpmap` line).
    pub fn from_mime_type(mime: &str) -> Option<Self> {
        let name = mime.rsplit('/').next().unwrap_or(mime);
        Self::ALL.into_iter().find(|c| {
            c.mime_type()
                .rsplit('/')
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
    }

    /// The codec an IVF file declares with its FourCC (`VP80`, `VP90`, `AV01`).
    pub fn from_ivf_fourcc(fourcc: &[u8; 4]) -> Option<Self> {
        match fourcc {
            b"VP80" => Some(VideoCodec::Vp8),
            b"VP90" => Some(VideoCodec::Vp9),
            b"AV01" => Some(VideoCodec::Av1),
            _ => None,
        }
    }

    /// The codec parameters a publishing client registers: the payload types and fmtp
    /// lines of `MediaEngine::register_default_codecs`, with NACK, PLI and FIR feedback.
    /// H.264 is offered as constrained baseline (`42e01f`), packetization mode 1, as
    /// browsers offer it.
    pub fn rtp_codec_parameters(self) -> RTCRtpCodecParameters {
        let (payload_type, fmtp) = match self {
            VideoCodec::Vp8 => (96, ""),
            VideoCodec::Vp9 => (98, "profile-id=0"),
            VideoCodec::H264 => (
                125,
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            ),
            VideoCodec::Av1 => (41, "profile-id=0"),
        };
        let feedback = |typ: &str, parameter: &str| RTCPFeedback {
            typ: typ.to_owned(),
            parameter: parameter.to_owned(),
        };
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: self.mime_type().to_owned(),
                clock_rate: VIDEO_CLOCK_RATE,
                channels: 0,
                sdp_fmtp_line: fmtp.to_owned(),
                rtcp_feedback: vec![
                    feedback("ccm", "fir"),
                    feedback("nack", ""),
                    feedback("nack", "pli"),
                ],
            },
            payload_type,
        }
    }

    /// Whether `frame` (one encoded frame, as a file holds it or as the depacketizer
    /// returns it) starts a new decodable sequence.
    ///
    /// VP8: the frame tag's key-frame bit. VP9: `frame_type` of the uncompressed header
    /// (a shown keyframe; superframes are judged by their first frame). H.264: the access
    /// unit holds an IDR slice. AV1: the temporal unit carries a sequence header OBU,
    /// which is how encoders emit keyframes (telling key from intra-only frames would
    /// need the sequence header's fields, which this does not parse).
    pub fn is_keyframe(self, frame: &[u8]) -> bool {
        match self {
            VideoCodec::Vp8 => frame.first().is_some_and(|b| b & 0x01 == 0),
            VideoCodec::Vp9 => vp9_is_keyframe(frame),
            VideoCodec::H264 => annex_b_nals(frame)
                .iter()
                .any(|nal| nal_type(nal) == Some(NAL_IDR)),
            VideoCodec::Av1 => av1_obus(frame)
                .iter()
                .any(|obu| obu.obu_type == OBU_SEQUENCE_HEADER),
        }
    }

    /// A fresh depacketizer for this codec, producing frames in the format
    /// [`is_keyframe`](Self::is_keyframe) and [`frame_digest`] expect (Annex B for H.264,
    /// low-overhead OBUs with size fields for AV1).
    pub fn depacketizer(self) -> CodecDepacketizer {
        match self {
            VideoCodec::Vp8 => CodecDepacketizer::Vp8(Vp8Packet::default()),
            VideoCodec::Vp9 => CodecDepacketizer::Vp9(Vp9Packet::default()),
            VideoCodec::H264 => CodecDepacketizer::H264(H264Packet::default()),
            VideoCodec::Av1 => CodecDepacketizer::Av1(Av1Depacketizer::new()),
        }
    }
}

impl std::fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mime_type())
    }
}

/// One of the rtc crate's depacketizers, chosen at run time from a track's codec
/// (`SampleBuilder` is generic over a single depacketizer type).
#[derive(Debug)]
pub enum CodecDepacketizer {
    /// RFC 7741.
    Vp8(Vp8Packet),
    /// VP9 payload descriptor.
    Vp9(Vp9Packet),
    /// RFC 6184, Annex B output.
    H264(H264Packet),
    /// AV1 aggregation header, low-overhead OBU output.
    Av1(Av1Depacketizer),
}

impl CodecDepacketizer {
    fn inner(&mut self) -> &mut dyn Depacketizer {
        match self {
            CodecDepacketizer::Vp8(d) => d,
            CodecDepacketizer::Vp9(d) => d,
            CodecDepacketizer::H264(d) => d,
            CodecDepacketizer::Av1(d) => d,
        }
    }

    fn inner_ref(&self) -> &dyn Depacketizer {
        match self {
            CodecDepacketizer::Vp8(d) => d,
            CodecDepacketizer::Vp9(d) => d,
            CodecDepacketizer::H264(d) => d,
            CodecDepacketizer::Av1(d) => d,
        }
    }
}

impl Depacketizer for CodecDepacketizer {
    fn depacketize(&mut self, b: &Bytes) -> rtc::shared::error::Result<Bytes> {
        self.inner().depacketize(b)
    }

    fn is_partition_head(&self, payload: &Bytes) -> bool {
        self.inner_ref().is_partition_head(payload)
    }

    fn is_partition_tail(&self, marker: bool, payload: &Bytes) -> bool {
        self.inner_ref().is_partition_tail(marker, payload)
    }
}

/// A SHA-256 digest of one frame that is the same for the frame as the source holds it
/// and as an agent's depacketizer returns it.
///
/// VP8 and VP9 travel byte for byte: the digest is the SHA-256 of the frame. H.264 is
/// normalised: the access unit is split into NAL units at start codes, access unit
/// delimiters (type 9) and filler data (type 12) are dropped (the RTP payloader drops
/// both), and each remaining NAL unit is hashed with a 4-byte big-endian length prefix.
/// AV1 likewise: temporal delimiter, tile list and padding OBUs are dropped (so does the
/// payloader), and each remaining OBU is hashed as its header byte without the
/// `obu_has_size_field` bit, its extension byte if any, a 4-byte length and its payload.
pub fn frame_digest(codec: VideoCodec, frame: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    match codec {
        VideoCodec::Vp8 | VideoCodec::Vp9 => hash.update(frame),
        VideoCodec::H264 => {
            for nal in annex_b_nals(frame) {
                if matches!(nal_type(nal), Some(NAL_AUD | NAL_FILLER)) {
                    continue;
                }
                hash.update((nal.len() as u32).to_be_bytes());
                hash.update(nal);
            }
        }
        VideoCodec::Av1 => {
            for obu in av1_obus(frame) {
                if matches!(
                    obu.obu_type,
                    OBU_TEMPORAL_DELIMITER | OBU_TILE_LIST | OBU_PADDING
                ) {
                    continue;
                }
                hash.update([obu.header & !OBU_HAS_SIZE_FIELD]);
                if let Some(ext) = obu.extension {
                    hash.update([ext]);
                }
                hash.update((obu.payload.len() as u32).to_be_bytes());
                hash.update(obu.payload);
            }
        }
    }
    hash.finalize().into()
}

/// A digest as lowercase hex, for messages.
pub fn digest_hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------
// H.264 Annex B
// ---------------------------------------------------------------------------------

/// NAL unit type of a coded slice of an IDR picture.
pub(crate) const NAL_IDR: u8 = 5;
/// NAL unit type of an access unit delimiter.
pub(crate) const NAL_AUD: u8 = 9;
/// NAL unit type of filler data.
pub(crate) const NAL_FILLER: u8 = 12;

/// Where one NAL unit sits in an Annex B buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NalSpan {
    /// First byte of the start code (zeros included) that introduces it.
    pub prefix: usize,
    /// First byte of the NAL unit (its header).
    pub start: usize,
    /// One past its last byte; zeros before the next start code are not part of it.
    pub end: usize,
}

/// The NAL units of an Annex B buffer. Bytes before the first start code are ignored;
/// a buffer with no start code at all is one NAL unit (as the RTP payloader treats it).
/// Zero bytes in front of a start code belong to the start code, as the payloader and
/// `trailing_zero_8bits` have it.
pub(crate) fn annex_b_spans(data: &[u8]) -> Vec<NalSpan> {
    let mut spans = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    let mut zeros = 0usize;
    for (i, &b) in data.iter().enumerate() {
        if b == 0 {
            zeros += 1;
            continue;
        }
        if b == 1 && zeros >= 2 {
            let prefix = i - zeros;
            if let Some((p, s)) = current.take() {
                if prefix > s {
                    spans.push(NalSpan {
                        prefix: p,
                        start: s,
                        end: prefix,
                    });
                }
            }
            current = Some((prefix, i + 1));
        }
        zeros = 0;
    }
    match current {
        Some((p, s)) => {
            let mut end = data.len();
            while end > s && data[end - 1] == 0 {
                end -= 1;
            }
            if end > s {
                spans.push(NalSpan {
                    prefix: p,
                    start: s,
                    end,
                });
            }
        }
        None if !data.is_empty() => spans.push(NalSpan {
            prefix: 0,
            start: 0,
            end: data.len(),
        }),
        None => {}
    }
    spans
}

/// The NAL units of an Annex B buffer, without their start codes.
pub(crate) fn annex_b_nals(data: &[u8]) -> Vec<&[u8]> {
    annex_b_spans(data)
        .into_iter()
        .map(|s| &data[s.start..s.end])
        .collect()
}

/// `nal_unit_type` of a NAL unit.
pub(crate) fn nal_type(nal: &[u8]) -> Option<u8> {
    nal.first().map(|b| b & 0x1f)
}

/// Whether a slice NAL unit starts a picture: its `first_mb_in_slice` (the first ue(v)
/// of the slice header) is 0, which is coded as a single `1` bit.
pub(crate) fn slice_starts_picture(nal: &[u8]) -> bool {
    nal.get(1).is_some_and(|b| b & 0x80 != 0)
}

// ---------------------------------------------------------------------------------
// VP9 and AV1
// ---------------------------------------------------------------------------------

fn vp9_is_keyframe(frame: &[u8]) -> bool {
    // frame_marker(2) profile_low_bit(1) profile_high_bit(1) [reserved_zero(1) if
    // profile == 3] show_existing_frame(1) frame_type(1), MSB first.
    let Some(&b) = frame.first() else {
        return false;
    };
    if b >> 6 != 0b10 {
        return false;
    }
    let profile = ((b >> 5) & 1) | (((b >> 4) & 1) << 1);
    let mut bit = 4; // index (from the MSB) of the next bit: after marker and profile
    if profile == 3 {
        bit += 1;
    }
    let show_existing = (b >> (7 - bit)) & 1;
    if show_existing == 1 {
        return false;
    }
    bit += 1;
    (b >> (7 - bit)) & 1 == 0
}

const OBU_SEQUENCE_HEADER: u8 = 1;
const OBU_TEMPORAL_DELIMITER: u8 = 2;
const OBU_TILE_LIST: u8 = 8;
const OBU_PADDING: u8 = 15;
const OBU_HAS_SIZE_FIELD: u8 = 0x02;
const OBU_HAS_EXTENSION: u8 = 0x04;

struct Obu<'a> {
    header: u8,
    obu_type: u8,
    extension: Option<u8>,
    payload: &'a [u8],
}

/// The OBUs of an AV1 temporal unit in low-overhead format. An OBU without a size field
/// runs to the end of the buffer; parsing stops at the first malformed OBU.
fn av1_obus(data: &[u8]) -> Vec<Obu<'_>> {
    let mut obus = Vec::new();
    let mut rest = data;
    while let Some((&header, after)) = rest.split_first() {
        let mut after = after;
        let extension = if header & OBU_HAS_EXTENSION != 0 {
            let Some((&ext, tail)) = after.split_first() else {
                break;
            };
            after = tail;
            Some(ext)
        } else {
            None
        };
        let payload;
        if header & OBU_HAS_SIZE_FIELD != 0 {
            let Some((size, used)) = read_leb128(after) else {
                break;
            };
            let Some(p) = after.get(used..used + size) else {
                break;
            };
            payload = p;
            rest = &after[used + size..];
        } else {
            payload = after;
            rest = &[];
        }
        obus.push(Obu {
            header,
            obu_type: (header >> 3) & 0x0f,
            extension,
            payload,
        });
    }
    obus
}

fn read_leb128(data: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in data.iter().take(8).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_round_trip() {
        for codec in VideoCodec::ALL {
            assert_eq!(VideoCodec::from_mime_type(codec.mime_type()), Some(codec));
        }
        assert_eq!(
            VideoCodec::from_mime_type("video/h264"),
            Some(VideoCodec::H264)
        );
        assert_eq!(VideoCodec::from_mime_type("VP9"), Some(VideoCodec::Vp9));
        assert_eq!(VideoCodec::from_mime_type("video/H265"), None);
    }

    #[test]
    fn annex_b_spans_strip_start_codes_and_trailing_zeros() {
        let data = [
            0, 0, 0, 1, 0x09, 0xf0, // AUD
            0, 0, 1, 0x67, 0x42, 0x00, // SPS, then a zero that belongs to the next code
            0, 0, 0, 1, 0x65, 0x88, 0x00, // IDR ending in a zero byte at end of buffer
        ];
        let nals = annex_b_nals(&data);
        assert_eq!(
            nals,
            vec![&[0x09, 0xf0][..], &[0x67, 0x42][..], &[0x65, 0x88][..]]
        );
        assert_eq!(annex_b_nals(&[0x41, 0x9a]), vec![&[0x41, 0x9a][..]]);
        assert!(annex_b_nals(&[]).is_empty());
    }

    #[test]
    fn h264_digest_ignores_aud_and_start_code_length() {
        let with_aud = [0, 0, 0, 1, 0x09, 0xf0, 0, 0, 0, 1, 0x65, 0x88, 0x84];
        let without = [0, 0, 1, 0x65, 0x88, 0x84];
        assert_eq!(
            frame_digest(VideoCodec::H264, &with_aud),
            frame_digest(VideoCodec::H264, &without)
        );
        let other = [0, 0, 1, 0x65, 0x88, 0x85];
        assert_ne!(
            frame_digest(VideoCodec::H264, &other),
            frame_digest(VideoCodec::H264, &without)
        );
    }

    #[test]
    fn keyframe_detection() {
        assert!(VideoCodec::Vp8.is_keyframe(&[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]));
        assert!(!VideoCodec::Vp8.is_keyframe(&[0x11, 0x02, 0x00]));
        // VP9 profile 0: 10 0 0 | show_existing 0 | frame_type 0 (key) / 1 (inter).
        assert!(VideoCodec::Vp9.is_keyframe(&[0b1000_0000]));
        assert!(!VideoCodec::Vp9.is_keyframe(&[0b1000_0100]));
        assert!(!VideoCodec::Vp9.is_keyframe(&[0b1000_1000])); // show_existing_frame
        assert!(VideoCodec::H264.is_keyframe(&[0, 0, 1, 0x09, 0xf0, 0, 0, 1, 0x65, 0x88]));
        assert!(!VideoCodec::H264.is_keyframe(&[0, 0, 1, 0x41, 0x9a]));
        // AV1: temporal delimiter, sequence header, frame.
        let key = [0x12, 0x00, 0x0a, 0x01, 0xaa, 0x32, 0x02, 0xbb, 0xcc];
        assert!(VideoCodec::Av1.is_keyframe(&key));
        assert!(!VideoCodec::Av1.is_keyframe(&[0x12, 0x00, 0x32, 0x01, 0xbb]));
    }

    #[test]
    fn av1_digest_ignores_size_fields_and_temporal_delimiters() {
        // TD + frame OBU with size field, vs. the frame OBU without one.
        let with = [0x12, 0x00, 0x32, 0x02, 0xbb, 0xcc];
        let without = [0x30, 0xbb, 0xcc];
        assert_eq!(
            frame_digest(VideoCodec::Av1, &with),
            frame_digest(VideoCodec::Av1, &without)
        );
    }
}

/// The frame digest survives the rtc crates' payloaders and depacketizers, in memory.
#[cfg(test)]
mod round_trip_tests {
    use std::time::{Duration, Instant};

    use rtc::media::io::sample_builder::SampleBuilder;
    use rtc::rtp::packetizer::{Packetizer, new_packetizer};
    use rtc::rtp::sequence::new_random_sequencer;

    use super::*;
    use crate::client::source::FrameSource;
    use crate::client::source::tests::fixture;

    /// Packetizes `frames` as `TrackLocalStaticSample` does (MTU 1200) and reassembles
    /// them with a `SampleBuilder`, returning the frames it releases.
    fn round_trip(codec: VideoCodec, frames: &[Bytes]) -> Vec<Bytes> {
        let params = codec.rtp_codec_parameters();
        let now = Instant::now();
        let mut packetizer = new_packetizer(
            now,
            1200,
            params.payload_type,
            0x1234_5678,
            params.rtp_codec.payloader().expect("payloader"),
            Box::new(new_random_sequencer()),
            VIDEO_CLOCK_RATE,
        );
        let mut builder = SampleBuilder::new(512, codec.depacketizer(), VIDEO_CLOCK_RATE);
        let mut out = Vec::new();
        // One extra frame at the end: the builder releases a frame when the next begins.
        for (i, frame) in frames.iter().chain(frames.first()).enumerate() {
            let at = now + Duration::from_millis(66 * i as u64);
            for packet in packetizer.packetize(at, frame, 6000).expect("packetize") {
                builder.push(at, packet);
                while let Some(sample) = builder.pop(at) {
                    assert_eq!(
                        sample.prev_dropped_packets,
                        0,
                        "frame {} dropped",
                        out.len()
                    );
                    out.push(sample.data);
                }
            }
        }
        out
    }

    fn assert_digests_survive(codec: VideoCodec, frames: &[Bytes]) {
        let received = round_trip(codec, frames);
        assert_eq!(received.len(), frames.len(), "frames released");
        for (i, (sent, got)) in frames.iter().zip(&received).enumerate() {
            assert_eq!(
                digest_hex(&frame_digest(codec, sent)),
                digest_hex(&frame_digest(codec, got)),
                "frame {i}"
            );
            assert_eq!(
                codec.is_keyframe(sent),
                codec.is_keyframe(got),
                "keyframe flag of frame {i}"
            );
        }
    }

    fn fixture_frames(name: &str) -> (VideoCodec, Vec<Bytes>) {
        let source = FrameSource::open(fixture(name)).expect("fixture");
        let frames = source.frames().iter().map(|f| f.data.clone()).collect();
        (source.codec(), frames)
    }

    #[test]
    fn vp8_fixture_frames_survive_byte_for_byte() {
        let (codec, frames) = fixture_frames("screen-vp8.ivf");
        let received = round_trip(codec, &frames);
        assert_eq!(received, frames);
        assert_digests_survive(codec, &frames);
    }

    #[test]
    fn h264_fixture_digests_survive() {
        let (codec, frames) = fixture_frames("screen-h264.h264");
        assert!(
            frames.iter().any(|f| f.len() > 1200),
            "some frame needs FU-A"
        );
        // The bytes differ (no AUD, 4-byte start codes), the digests do not.
        let received = round_trip(codec, &frames);
        assert_ne!(received, frames);
        assert_digests_survive(codec, &frames);
    }

    #[test]
    fn synthetic_frames_survive_around_the_mtu() {
        // Sizes around one and two packets' worth of payload.
        let frames: Vec<Bytes> = [18, 1000, 1183, 1184, 1185, 1186, 2368, 2369, 2370, 5000]
            .into_iter()
            .enumerate()
            .map(|(i, size)| {
                let mut source = FrameSource::synthetic(size, 3);
                source.by_ref().nth(i).expect("endless").data
            })
            .collect();
        let received = round_trip(VideoCodec::Vp8, &frames);
        assert_eq!(received, frames);
    }

    #[test]
    fn av1_digests_survive() {
        // Temporal delimiter, sequence header, and a frame OBU large enough to fragment.
        let mut tu = vec![0x12, 0x00, 0x0a, 0x03, 0x00, 0x00, 0x00];
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        tu.push(0x32);
        let mut size = payload.len();
        while size >= 0x80 {
            tu.push((size as u8 & 0x7f) | 0x80);
            size >>= 7;
        }
        tu.push(size as u8);
        tu.extend_from_slice(&payload);
        let key = Bytes::from(tu);
        let delta = Bytes::from_static(&[0x12, 0x00, 0x32, 0x03, 0x01, 0x02, 0x03]);
        assert_digests_survive(VideoCodec::Av1, &[key, delta]);
    }
}
