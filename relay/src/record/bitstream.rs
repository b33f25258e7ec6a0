//! The picture size of encoded video, read from the frames themselves: containers
//! (WebM's `PixelWidth`, MP4's `avc1` box) must declare it, and a recording stores
//! only the frames. AV1's sequence header, which says more than the size, is read in
//! [`super::av1`] with the same [`Bits`] reader.

use relay_codec::frame::{annex_b_nals, nal_type};

/// Width and height in pixels of a VP8 keyframe (its uncompressed data chunk).
pub fn vp8_size(frame: &[u8]) -> Option<(u32, u32)> {
    // Frame tag bit 0 is 0 for a keyframe; the start code follows the 3-byte tag.
    if frame.len() < 10 || frame[0] & 1 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u32::from(u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff);
    let height = u32::from(u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff);
    (width > 0 && height > 0).then_some((width, height))
}

/// Width and height of a VP9 keyframe (its uncompressed header).
pub fn vp9_size(frame: &[u8]) -> Option<(u32, u32)> {
    let mut r = Bits::new(frame);
    if r.bits(2)? != 2 {
        return None; // frame marker
    }
    let low = r.bit()?;
    let high = r.bit()?;
    let profile = (high << 1) | low;
    if profile == 3 {
        r.bit()?; // reserved
    }
    if r.bit()? == 1 {
        return None; // show_existing_frame
    }
    if r.bit()? != 0 {
        return None; // not a keyframe
    }
    r.bits(2)?; // show_frame, error_resilient_mode
    if r.bits(24)? != 0x49_83_42 {
        return None;
    }
    if profile >= 2 {
        r.bit()?; // ten_or_twelve_bit
    }
    let color_space = r.bits(3)?;
    if color_space != 7 {
        r.bit()?; // color_range
        if profile == 1 || profile == 3 {
            r.bits(3)?; // subsampling_x, subsampling_y, reserved
        }
    } else if profile == 1 || profile == 3 {
        r.bit()?; // reserved
    }
    let width = r.bits(16)? + 1;
    let height = r.bits(16)? + 1;
    Some((width, height))
}

/// The parameter sets of an H.264 access unit (Annex B): the first SPS and PPS.
pub fn h264_parameter_sets(access_unit: &[u8]) -> (Option<&[u8]>, Option<&[u8]>) {
    let nals = annex_b_nals(access_unit);
    let find = |t| nals.iter().copied().find(|n| nal_type(n) == Some(t));
    (find(7), find(8))
}

/// Width and height an H.264 SPS (a NAL unit with its header byte) declares.
pub fn h264_size(sps: &[u8]) -> Option<(u32, u32)> {
    let rbsp = unescape(sps.get(1..)?);
    let mut r = Bits::new(&rbsp);
    let profile = r.bits(8)?;
    r.bits(16)?; // constraint flags, level
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format = 1;
    let mut separate_planes = false;
    if [100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135].contains(&profile) {
        chroma_format = r.ue()?;
        if chroma_format == 3 {
            separate_planes = r.bit()? == 1;
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            let lists = if chroma_format == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    skip_scaling_list(&mut r, if i < 6 { 16 } else { 64 })?;
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bit()?;
            r.se()?;
            r.se()?;
            for _ in 0..r.ue()?.min(255) {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = r.ue()? + 1;
    let height_units = r.ue()? + 1;
    let frame_mbs_only = r.bit()?;
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field_flag
    }
    r.bit()?; // direct_8x8_inference_flag
    let (mut crop_x, mut crop_y) = (0, 0);
    if r.bit()? == 1 {
        let (left, right, top, bottom) = (r.ue()?, r.ue()?, r.ue()?, r.ue()?);
        let (unit_x, unit_y) = match (chroma_format, separate_planes) {
            (1, false) => (2, 2),
            (2, false) => (2, 1),
            _ => (1, 1),
        };
        crop_x = unit_x * (left + right);
        crop_y = unit_y * (2 - frame_mbs_only) * (top + bottom);
    }
    let width = (width_mbs * 16).checked_sub(crop_x)?;
    let height = ((2 - frame_mbs_only) * height_units * 16).checked_sub(crop_y)?;
    (width > 0 && height > 0).then_some((width, height))
}

fn skip_scaling_list(r: &mut Bits<'_>, size: usize) -> Option<()> {
    let (mut last, mut next) = (8i64, 8i64);
    for _ in 0..size {
        if next != 0 {
            next = (last + r.se()? + 256) % 256;
        }
        if next != 0 {
            last = next;
        }
    }
    Some(())
}

/// Removes emulation-prevention bytes (`00 00 03` → `00 00`).
fn unescape(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// A big-endian bit reader (MSB first), as VP9, H.264 and AV1 headers are written.
pub(super) struct Bits<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Bits<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(super) fn bit(&mut self) -> Option<u32> {
        let byte = self.bytes.get(self.pos / 8)?;
        let bit = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(bit))
    }

    /// `n` bits (at most 32) as an unsigned number.
    pub(super) fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |acc, _| Some((acc << 1) | self.bit()?))
    }

    /// Exp-Golomb, unsigned.
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        Some((1u32 << zeros) - 1 + self.bits(zeros)?)
    }

    /// Exp-Golomb, signed.
    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// A file of `tests/fixtures`.
#[cfg(test)]
pub(super) fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures")
            .join(name),
    )
    .expect("fixture")
}

/// The frames of an IVF fixture.
#[cfg(test)]
pub(super) fn fixture_ivf_frames(name: &str) -> Vec<Vec<u8>> {
    let ivf = fixture(name);
    let mut at = usize::from(u16::from_le_bytes([ivf[6], ivf[7]]));
    let mut frames = Vec::new();
    while at + 12 <= ivf.len() {
        let len = u32::from_le_bytes(ivf[at..at + 4].try_into().expect("4 bytes")) as usize;
        frames.push(ivf[at + 12..at + 12 + len].to_vec());
        at += 12 + len;
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_sizes_are_read_from_the_bitstream() {
        let vp8 = fixture_ivf_frames("screen-vp8.ivf");
        assert_eq!(vp8_size(&vp8[0]), Some((640, 360)));
        let vp9 = fixture_ivf_frames("screen-vp9.ivf");
        assert_eq!(vp9_size(&vp9[0]), Some((640, 360)));
        let h264 = fixture("screen-h264.h264");
        let (sps, pps) = h264_parameter_sets(&h264[..4096]);
        assert!(pps.is_some());
        assert_eq!(h264_size(sps.unwrap()), Some((640, 360)));
        assert_eq!(vp8_size(&[0; 4]), None);
        assert_eq!(vp9_size(&[0xff; 4]), None);
        assert_eq!(h264_size(&[0x67]), None);
    }
}
