//! Encoded frames as a whole (what a file holds and a depacketizer returns, as opposed
//! to the RTP payloads of [`crate::keyframe`]): keyframe detection per codec, H.264
//! Annex B NAL units, AV1 OBUs, and a digest that identifies a frame across the relay.
//!
//! A frame is compared across the relay by its [`frame_digest`], never by its raw bytes:
//! RTP payloaders do not always carry a frame byte for byte (the H.264 one drops access
//! unit delimiters and re-emits start codes, the AV1 one drops temporal delimiters and
//! OBU size fields), so the digest hashes what survives a packetize → depacketize trip.
//! Nothing here allocates more than a `Vec` of spans; malformed input gives `false` or
//! fewer units, never a panic.

use sha2::{Digest, Sha256};

use crate::keyframe::VideoCodec;

/// Whether `frame` (one encoded frame, as a file holds it or as a depacketizer returns
/// it) starts a new decodable sequence.
///
/// VP8: the frame tag's key-frame bit. VP9: `frame_type` of the uncompressed header
/// (a shown keyframe; superframes are judged by their first frame). H.264: the access
/// unit holds an IDR slice. AV1: the temporal unit carries a sequence header OBU,
/// which is how encoders emit keyframes (telling key from intra-only frames would
/// need the sequence header's fields, which this does not parse).
pub fn is_keyframe(codec: VideoCodec, frame: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => frame.first().is_some_and(|b| b & 0x01 == 0),
        VideoCodec::Vp9 => vp9_is_keyframe(frame),
        VideoCodec::H264 => annex_b_nals(frame)
            .iter()
            .any(|nal| nal_type(nal) == Some(NAL_IDR)),
        VideoCodec::Av1 => av1_obus(frame)
            .map_while(Result::ok)
            .any(|obu| obu.obu_type == OBU_SEQUENCE_HEADER),
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
            for obu in av1_obus(frame).map_while(Result::ok) {
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
pub const NAL_IDR: u8 = 5;
/// NAL unit type of an access unit delimiter.
pub const NAL_AUD: u8 = 9;
/// NAL unit type of filler data.
pub const NAL_FILLER: u8 = 12;

/// Where one NAL unit sits in an Annex B buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NalSpan {
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
pub fn annex_b_spans(data: &[u8]) -> Vec<NalSpan> {
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
pub fn annex_b_nals(data: &[u8]) -> Vec<&[u8]> {
    annex_b_spans(data)
        .into_iter()
        .map(|s| &data[s.start..s.end])
        .collect()
}

/// `nal_unit_type` of a NAL unit.
pub fn nal_type(nal: &[u8]) -> Option<u8> {
    nal.first().map(|b| b & 0x1f)
}

/// Whether a slice NAL unit starts a picture: its `first_mb_in_slice` (the first ue(v)
/// of the slice header) is 0, which is coded as a single `1` bit.
pub fn slice_starts_picture(nal: &[u8]) -> bool {
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

/// `obu_type` of a sequence header OBU.
pub const OBU_SEQUENCE_HEADER: u8 = 1;
/// `obu_type` of a temporal delimiter OBU.
pub const OBU_TEMPORAL_DELIMITER: u8 = 2;
/// `obu_type` of a frame header OBU.
pub const OBU_FRAME_HEADER: u8 = 3;
/// `obu_type` of a frame OBU (a frame header and its tile group).
pub const OBU_FRAME: u8 = 6;
/// `obu_type` of a tile list OBU (large-scale tile decoding only).
pub const OBU_TILE_LIST: u8 = 8;
/// `obu_type` of a padding OBU.
pub const OBU_PADDING: u8 = 15;
/// OBU header bit: `obu_forbidden_bit`, always 0 in a valid OBU.
pub const OBU_FORBIDDEN_BIT: u8 = 0x80;
/// OBU header bit: `obu_extension_flag`, an extension byte follows the header.
pub const OBU_HAS_EXTENSION: u8 = 0x04;
/// OBU header bit: `obu_has_size_field`, a LEB128 payload size follows.
pub const OBU_HAS_SIZE_FIELD: u8 = 0x02;

/// One OBU of an AV1 temporal unit, borrowed from the buffer it was split from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Obu<'a> {
    /// The header byte as it was (type, extension and size-field flags).
    pub header: u8,
    /// `obu_type`, bits 6..3 of the header.
    pub obu_type: u8,
    /// The extension byte (temporal and spatial layer), if the header announces one.
    pub extension: Option<u8>,
    /// The payload: what follows the header, extension and size field.
    pub payload: &'a [u8],
}

impl Obu<'_> {
    /// Appends the OBU in the low-overhead bitstream format with `obu_has_size_field`
    /// set: header, extension if any, the payload size as LEB128, the payload.
    pub fn write_with_size(&self, out: &mut Vec<u8>) {
        out.push(self.header | OBU_HAS_SIZE_FIELD);
        out.extend(self.extension);
        let mut size = self.payload.len();
        loop {
            let byte = (size & 0x7f) as u8;
            size >>= 7;
            if size == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(self.payload);
    }
}

/// An OBU that cannot be split off: its extension byte or size field is cut off, or
/// its size runs past the end of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the AV1 OBU at byte {offset} is cut off")]
pub struct TruncatedObu {
    /// Where the OBU's header is in the buffer.
    pub offset: usize,
}

/// The OBUs of an AV1 temporal unit in the low-overhead format, in order. An OBU
/// without a size field runs to the end of the buffer. After a [`TruncatedObu`] the
/// iterator ends; `.map_while(Result::ok)` takes the OBUs before it.
pub fn av1_obus(data: &[u8]) -> Av1Obus<'_> {
    Av1Obus { data, at: 0 }
}

/// Iterator over the OBUs of a temporal unit; see [`av1_obus`].
#[derive(Debug, Clone)]
pub struct Av1Obus<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Av1Obus<'a> {
    type Item = Result<Obu<'a>, TruncatedObu>;

    fn next(&mut self) -> Option<Self::Item> {
        let offset = self.at;
        let (&header, mut after) = self.data.get(offset..)?.split_first()?;
        // Whatever happens below, this OBU is the last one unless it is whole.
        self.at = self.data.len();
        let truncated = Some(Err(TruncatedObu { offset }));
        let extension = if header & OBU_HAS_EXTENSION != 0 {
            let Some((&ext, tail)) = after.split_first() else {
                return truncated;
            };
            after = tail;
            Some(ext)
        } else {
            None
        };
        let payload = if header & OBU_HAS_SIZE_FIELD != 0 {
            let Some((size, used)) = read_leb128(after) else {
                return truncated;
            };
            let Some(payload) = used.checked_add(size).and_then(|end| after.get(used..end)) else {
                return truncated;
            };
            self.at = self.data.len() - (after.len() - used - size);
            payload
        } else {
            after
        };
        Some(Ok(Obu {
            header,
            obu_type: (header >> 3) & 0x0f,
            extension,
            payload,
        }))
    }
}

/// A LEB128 value and the bytes it took (at most 8, as the AV1 spec allows).
fn read_leb128(data: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0u64;
    for (i, &b) in data.iter().take(8).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((usize::try_from(value).ok()?, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(is_keyframe(
            VideoCodec::Vp8,
            &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]
        ));
        assert!(!is_keyframe(VideoCodec::Vp8, &[0x11, 0x02, 0x00]));
        // VP9 profile 0: 10 0 0 | show_existing 0 | frame_type 0 (key) / 1 (inter).
        assert!(is_keyframe(VideoCodec::Vp9, &[0b1000_0000]));
        assert!(!is_keyframe(VideoCodec::Vp9, &[0b1000_0100]));
        assert!(!is_keyframe(VideoCodec::Vp9, &[0b1000_1000])); // show_existing_frame
        assert!(is_keyframe(
            VideoCodec::H264,
            &[0, 0, 1, 0x09, 0xf0, 0, 0, 1, 0x65, 0x88]
        ));
        assert!(!is_keyframe(VideoCodec::H264, &[0, 0, 1, 0x41, 0x9a]));
        // AV1: temporal delimiter, sequence header, frame.
        let key = [0x12, 0x00, 0x0a, 0x01, 0xaa, 0x32, 0x02, 0xbb, 0xcc];
        assert!(is_keyframe(VideoCodec::Av1, &key));
        assert!(!is_keyframe(
            VideoCodec::Av1,
            &[0x12, 0x00, 0x32, 0x01, 0xbb]
        ));
    }

    #[test]
    fn av1_obus_split_and_report_truncation() {
        // TD, sequence header (size 1), frame without a size field to the end.
        let tu = [0x12, 0x00, 0x0a, 0x01, 0xaa, 0x30, 0xbb, 0xcc];
        let obus: Vec<_> = av1_obus(&tu).collect::<Result<_, _>>().unwrap();
        let types: Vec<u8> = obus.iter().map(|o| o.obu_type).collect();
        assert_eq!(
            types,
            [OBU_TEMPORAL_DELIMITER, OBU_SEQUENCE_HEADER, OBU_FRAME]
        );
        assert_eq!(obus[1].payload, [0xaa]);
        assert_eq!(obus[2].payload, [0xbb, 0xcc]);

        let mut low_overhead = Vec::new();
        obus[2].write_with_size(&mut low_overhead);
        assert_eq!(low_overhead, [0x32, 0x02, 0xbb, 0xcc]);
        let big = Obu {
            header: 0x34, // frame OBU with an extension byte
            obu_type: OBU_FRAME,
            extension: Some(0x08),
            payload: &[7; 200],
        };
        let mut out = Vec::new();
        big.write_with_size(&mut out);
        assert_eq!(out[..4], [0x36, 0x08, 0xc8, 0x01]); // 200 = 0x48 | 0x80, 0x01
        let back = av1_obus(&out).next();
        assert_eq!(
            back.and_then(Result::ok).map(|o| o.payload),
            Some(big.payload)
        );

        // The size says 5 bytes, 2 follow; an extension flag with nothing after it; a
        // size field that never ends.
        for (cut, offset) in [
            (&[0x12, 0x00, 0x32, 0x05, 0xbb, 0xcc][..], 2),
            (&[0x36][..], 0),
            (&[0x32, 0x80, 0x80][..], 0),
        ] {
            let results: Vec<_> = av1_obus(cut).collect();
            assert_eq!(
                results.last(),
                Some(&Err(TruncatedObu { offset })),
                "{cut:02x?}"
            );
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, splitting never panics, and the OBUs it finds, written
        /// back with size fields, split into the same OBUs.
        #[test]
        fn av1_obus_written_with_sizes_split_the_same(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let obus: Vec<Obu<'_>> = av1_obus(&data).map_while(Result::ok).collect();
            let mut written = Vec::new();
            for obu in &obus {
                obu.write_with_size(&mut written);
            }
            let again: Vec<Obu<'_>> = av1_obus(&written)
                .collect::<Result<_, _>>()
                .map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            proptest::prop_assert_eq!(again.len(), obus.len());
            for (a, b) in again.iter().zip(&obus) {
                proptest::prop_assert_eq!(
                    (a.obu_type, a.extension, a.payload),
                    (b.obu_type, b.extension, b.payload)
                );
            }
        }
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
