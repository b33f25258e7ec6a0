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
            .iter()
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
