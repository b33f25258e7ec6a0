//! AV1 in WebM, per the Matroska AV1 codec mapping
//! (`ietf-wg-cellar/matroska-specification`, `codec/av1.md`).
//!
//! The track's `CodecPrivate` is the 4-byte `AV1CodecConfigurationRecord` (profile,
//! level and tier of operating point 0, bit depth, monochrome, chroma subsampling)
//! followed by the sequence header OBU it was taken from; `PixelWidth` and
//! `PixelHeight` are the sequence header's maximum frame size. Each block is one
//! temporal unit in the low-overhead format, every OBU with its size field, without
//! temporal delimiters, tile lists and padding. Sequence headers stay in band: a
//! recording may hold several coded video sequences (the customer reconnected with
//! another encoder), and a keyframe whose temporal unit lacks one gets the last one
//! seen, so that every keyframe block can start playback.
//!
//! [`SequenceHeader::parse`] reads the fields of a `sequence_header_obu()` (AV1
//! specification §5.5) that the container needs; the OBUs themselves are split by
//! [`relay_codec::frame::av1_obus`].

use relay_codec::frame::{
    OBU_FORBIDDEN_BIT, OBU_FRAME, OBU_FRAME_HEADER, OBU_PADDING, OBU_SEQUENCE_HEADER,
    OBU_TEMPORAL_DELIMITER, OBU_TILE_LIST, TruncatedObu, av1_obus,
};

use super::bitstream::Bits;

/// Why an AV1 temporal unit cannot go into WebM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Av1Error {
    /// An OBU's extension byte or size field is cut off, or its size runs past the
    /// frame.
    #[error("{0}")]
    TruncatedObu(#[from] TruncatedObu),
    /// An OBU header with `obu_forbidden_bit` set: not AV1 data.
    #[error("an OBU header has its forbidden bit set")]
    ForbiddenBit,
    /// The sequence header ends before its last field.
    #[error("the sequence header is cut off")]
    TruncatedSequenceHeader,
    /// A `seq_profile` the AV1 specification reserves (3 to 7).
    #[error("the sequence header declares reserved profile {0}")]
    ReservedProfile(u8),
    /// A temporal unit without a frame header or frame OBU.
    #[error("the temporal unit holds no frame")]
    NoFrame,
}

/// What the container needs from a sequence header OBU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceHeader {
    /// `seq_profile`: 0 main, 1 high, 2 professional.
    pub profile: u8,
    /// `seq_level_idx[0]`: the level of operating point 0 (e.g. 1 is level 2.1).
    pub level_idx: u8,
    /// `seq_tier[0]`: 1 for the high tier (only read above level 3.3).
    pub tier: u8,
    /// `max_frame_width_minus_1 + 1`.
    pub max_width: u32,
    /// `max_frame_height_minus_1 + 1`.
    pub max_height: u32,
    /// `high_bitdepth`: 10 or 12 bits.
    pub high_bitdepth: bool,
    /// `twelve_bit`: 12 bits (profile 2 only).
    pub twelve_bit: bool,
    /// `mono_chrome`.
    pub monochrome: bool,
    /// `subsampling_x`.
    pub subsampling_x: bool,
    /// `subsampling_y`.
    pub subsampling_y: bool,
    /// `chroma_sample_position` (0 unknown, 1 vertical, 2 colocated).
    pub chroma_sample_position: u8,
}

impl SequenceHeader {
    /// Reads the payload of a sequence header OBU (without its OBU header).
    pub fn parse(payload: &[u8]) -> Result<Self, Av1Error> {
        let mut r = Bits::new(payload);
        let profile = r.bits(3).ok_or(Av1Error::TruncatedSequenceHeader)? as u8;
        if profile > 2 {
            return Err(Av1Error::ReservedProfile(profile));
        }
        Self::parse_after_profile(&mut r, profile).ok_or(Av1Error::TruncatedSequenceHeader)
    }

    fn parse_after_profile(r: &mut Bits<'_>, profile: u8) -> Option<Self> {
        r.bit()?; // still_picture
        let reduced_still_picture_header = r.bit()? == 1;
        let (level_idx, tier);
        if reduced_still_picture_header {
            level_idx = r.bits(5)? as u8;
            tier = 0;
        } else {
            let mut buffer_delay_length = 0;
            let mut decoder_model_info_present = false;
            if r.bit()? == 1 {
                // timing_info()
                r.bits(32)?; // num_units_in_display_tick
                r.bits(32)?; // time_scale
                if r.bit()? == 1 {
                    uvlc(r)?; // num_ticks_per_picture_minus_1
                }
                decoder_model_info_present = r.bit()? == 1;
                if decoder_model_info_present {
                    buffer_delay_length = r.bits(5)? + 1;
                    r.bits(32)?; // num_units_in_decoding_tick
                    r.bits(5)?; // buffer_removal_time_length_minus_1
                    r.bits(5)?; // frame_presentation_time_length_minus_1
                }
            }
            let initial_display_delay_present = r.bit()? == 1;
            let operating_points = r.bits(5)? + 1;
            let mut first = None;
            for _ in 0..operating_points {
                r.bits(12)?; // operating_point_idc
                let level = r.bits(5)? as u8;
                let tier = if level > 7 { r.bit()? as u8 } else { 0 };
                first.get_or_insert((level, tier));
                if decoder_model_info_present && r.bit()? == 1 {
                    // operating_parameters_info(): decoder and encoder buffer delays,
                    // low_delay_mode_flag.
                    r.bits(buffer_delay_length)?;
                    r.bits(buffer_delay_length)?;
                    r.bit()?;
                }
                if initial_display_delay_present && r.bit()? == 1 {
                    r.bits(4)?; // initial_display_delay_minus_1
                }
            }
            (level_idx, tier) = first?;
        }
        let width_bits = r.bits(4)? + 1;
        let height_bits = r.bits(4)? + 1;
        let max_width = r.bits(width_bits)? + 1;
        let max_height = r.bits(height_bits)? + 1;
        if !reduced_still_picture_header && r.bit()? == 1 {
            // frame_id_numbers_present_flag: delta_frame_id_length_minus_2,
            // additional_frame_id_length_minus_1.
            r.bits(7)?;
        }
        // use_128x128_superblock, enable_filter_intra, enable_intra_edge_filter
        r.bits(3)?;
        if !reduced_still_picture_header {
            // enable_interintra_compound, enable_masked_compound, enable_warped_motion,
            // enable_dual_filter
            r.bits(4)?;
            let enable_order_hint = r.bit()? == 1;
            if enable_order_hint {
                r.bits(2)?; // enable_jnt_comp, enable_ref_frame_mvs
            }
            let force_screen_content_tools = if r.bit()? == 1 {
                2 // seq_choose_screen_content_tools: SELECT_SCREEN_CONTENT_TOOLS
            } else {
                r.bit()? // seq_force_screen_content_tools
            };
            if force_screen_content_tools > 0 && r.bit()? == 0 {
                r.bit()?; // seq_force_integer_mv
            }
            if enable_order_hint {
                r.bits(3)?; // order_hint_bits_minus_1
            }
        }
        r.bits(3)?; // enable_superres, enable_cdef, enable_restoration

        // color_config()
        let high_bitdepth = r.bit()? == 1;
        let twelve_bit = profile == 2 && high_bitdepth && r.bit()? == 1;
        let monochrome = profile != 1 && r.bit()? == 1;
        let (mut primaries, mut transfer, mut matrix) = (2, 2, 2); // unspecified
        if r.bit()? == 1 {
            primaries = r.bits(8)?;
            transfer = r.bits(8)?;
            matrix = r.bits(8)?;
        }
        let (subsampling_x, subsampling_y, mut chroma_sample_position);
        if monochrome {
            r.bit()?; // color_range
            (subsampling_x, subsampling_y, chroma_sample_position) = (true, true, 0);
        } else if (primaries, transfer, matrix) == (1, 13, 0) {
            // BT.709 primaries, sRGB transfer, identity matrix: 4:4:4, full range.
            (subsampling_x, subsampling_y, chroma_sample_position) = (false, false, 0);
        } else {
            r.bit()?; // color_range
            (subsampling_x, subsampling_y) = match profile {
                0 => (true, true),
                1 => (false, false),
                _ if twelve_bit => {
                    let x = r.bit()? == 1;
                    (x, x && r.bit()? == 1)
                }
                _ => (true, false),
            };
            chroma_sample_position = 0;
            if subsampling_x && subsampling_y {
                chroma_sample_position = r.bits(2)? as u8;
            }
        }
        if !monochrome {
            r.bit()?; // separate_uv_delta_q
        }
        r.bit()?; // film_grain_params_present
        Some(Self {
            profile,
            level_idx,
            tier,
            max_width,
            max_height,
            high_bitdepth,
            twelve_bit,
            monochrome,
            subsampling_x,
            subsampling_y,
            chroma_sample_position,
        })
    }

    /// The 4-byte `AV1CodecConfigurationRecord` (marker 1, version 1, no initial
    /// presentation delay) that starts the track's `CodecPrivate`.
    pub fn configuration_record(&self) -> [u8; 4] {
        let flag = |b: bool, shift: u8| u8::from(b) << shift;
        [
            0x81,
            (self.profile << 5) | (self.level_idx & 0x1f),
            (self.tier << 7)
                | flag(self.high_bitdepth, 6)
                | flag(self.twelve_bit, 5)
                | flag(self.monochrome, 4)
                | flag(self.subsampling_x, 3)
                | flag(self.subsampling_y, 2)
                | (self.chroma_sample_position & 0x03),
            0,
        ]
    }
}

/// `uvlc()`: a variable-length unsigned number (AV1 specification §4.10.3).
fn uvlc(r: &mut Bits<'_>) -> Option<u32> {
    let mut leading_zeros = 0;
    while r.bit()? == 0 {
        leading_zeros += 1;
    }
    if leading_zeros >= 32 {
        return Some(u32::MAX);
    }
    Some(r.bits(leading_zeros)? + ((1u32 << leading_zeros) - 1))
}

/// What the WebM track header says about an AV1 video.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Av1Track {
    /// The first sequence header.
    pub sequence_header: SequenceHeader,
    /// `CodecPrivate`: the configuration record, then the sequence header OBU.
    pub codec_private: Vec<u8>,
}

/// Turns recorded temporal units into WebM blocks, in order, keeping the sequence
/// header in force.
#[derive(Debug, Default)]
pub struct Av1Blocks {
    track: Option<Av1Track>,
    /// The last sequence header OBU seen, with its size field.
    sequence_header_obu: Option<Vec<u8>>,
}

impl Av1Blocks {
    /// The block for one temporal unit (see the module docs), or `None` for a
    /// keyframe that comes before any sequence header and so cannot start the video.
    pub fn block(
        &mut self,
        temporal_unit: &[u8],
        keyframe: bool,
    ) -> Result<Option<Vec<u8>>, Av1Error> {
        let mut block = Vec::with_capacity(temporal_unit.len() + 8);
        // The temporal unit's own sequence header: (parsed, as written in the block).
        let mut own: Option<(SequenceHeader, Vec<u8>)> = None;
        let mut has_frame = false;
        for obu in av1_obus(temporal_unit) {
            let obu = obu?;
            if obu.header & OBU_FORBIDDEN_BIT != 0 {
                return Err(Av1Error::ForbiddenBit);
            }
            match obu.obu_type {
                OBU_TEMPORAL_DELIMITER | OBU_TILE_LIST | OBU_PADDING => continue,
                OBU_SEQUENCE_HEADER => {
                    let parsed = SequenceHeader::parse(obu.payload)?;
                    let start = block.len();
                    obu.write_with_size(&mut block);
                    own = Some((parsed, block[start..].to_vec()));
                }
                OBU_FRAME_HEADER | OBU_FRAME => {
                    has_frame = true;
                    obu.write_with_size(&mut block);
                }
                _ => obu.write_with_size(&mut block),
            }
        }
        if !has_frame {
            return Err(Av1Error::NoFrame);
        }
        match own {
            Some((parsed, written)) => {
                self.track.get_or_insert_with(|| Av1Track {
                    codec_private: [&parsed.configuration_record()[..], &written].concat(),
                    sequence_header: parsed,
                });
                self.sequence_header_obu = Some(written);
            }
            None if keyframe => {
                let Some(sequence_header) = &self.sequence_header_obu else {
                    return Ok(None);
                };
                block.splice(0..0, sequence_header.iter().copied());
            }
            None => {}
        }
        Ok(Some(block))
    }

    /// The track header, from the first sequence header seen.
    pub fn track(&self) -> Option<&Av1Track> {
        self.track.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_codec::frame::Obu;

    fn fixture_frames() -> Vec<Vec<u8>> {
        crate::record::bitstream::fixture_ivf_frames("screen-av1.ivf")
    }

    fn obus(data: &[u8]) -> Vec<Obu<'_>> {
        av1_obus(data)
            .collect::<Result<_, _>>()
            .expect("whole OBUs")
    }

    fn sequence_header_payload(frame: &[u8]) -> &[u8] {
        obus(frame)
            .into_iter()
            .find(|o| o.obu_type == OBU_SEQUENCE_HEADER)
            .expect("sequence header")
            .payload
    }

    /// `ffprobe -show_streams tests/fixtures/screen-av1.ivf`: profile=Main, level=1,
    /// 640x360, yuv420p (8 bits, 4:2:0), chroma_location=unspecified.
    #[test]
    fn the_fixture_sequence_header_reads_as_ffprobe_does() {
        let frames = fixture_frames();
        assert_eq!(frames.len(), 30);
        let header = SequenceHeader::parse(sequence_header_payload(&frames[0])).expect("parse");
        assert_eq!(
            header,
            SequenceHeader {
                profile: 0,
                level_idx: 1,
                tier: 0,
                max_width: 640,
                max_height: 360,
                high_bitdepth: false,
                twelve_bit: false,
                monochrome: false,
                subsampling_x: true,
                subsampling_y: true,
                chroma_sample_position: 0,
            }
        );
        // marker+version, profile 0 | level 1, 4:2:0 (subsampling x and y), no delay.
        assert_eq!(header.configuration_record(), [0x81, 0x01, 0x0c, 0x00]);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Sequence headers with the fields the fixture lacks, from libaom 3.6 through
    /// ffmpeg 5.1 (`-c:v libaom-av1 -usage realtime -pix_fmt P -aom-params
    /// timing-info=T` on `testsrc2=size=320x200`), and the `CodecPrivate` ffmpeg's
    /// Matroska muxer writes for each (`ffmpeg -i X.ivf -c copy X.webm`).
    #[test]
    fn codec_private_matches_ffmpeg_for_other_profiles_and_timing_info() {
        let cases = [
            // yuv444p10le, timing-info=model: profile 1 (High), 10 bits, 4:4:4, timing
            // and decoder model info.
            (
                "0a1d24000000040000003d780000000a530000035f915f90bc3cff1cdaf942",
                "81204000",
                (1, true, false, false),
            ),
            // gray, timing-info=constant: monochrome, equal_picture_interval (uvlc).
            (
                "0a1304000000040000003f400000bc3cff1cdaf92a",
                "81001c00",
                (0, false, true, true),
            ),
            // yuv420p10le: profile 0, 10 bits.
            (
                "0a0b000000043cff1cdaf94040",
                "81004c00",
                (0, true, false, true),
            ),
            // The fixture's, as in `screen-av1.webm` remuxed by ffmpeg.
            (
                "0a0b0000000cc4ff6736be4010",
                "81010c00",
                (0, false, false, true),
            ),
        ];
        for (obu, record, (profile, high_bitdepth, monochrome, subsampled)) in cases {
            let obu = hex(obu);
            let mut temporal_unit = obu.clone();
            temporal_unit.extend([0x32, 0x01, 0x00]); // a (fake) frame OBU
            let mut blocks = Av1Blocks::default();
            blocks.block(&temporal_unit, true).expect("block");
            let track = blocks.track().expect("track");
            assert_eq!(track.codec_private, [hex(record), obu].concat());
            let header = &track.sequence_header;
            assert_eq!(
                (header.profile, header.high_bitdepth, header.monochrome),
                (profile, high_bitdepth, monochrome)
            );
            assert_eq!(
                (header.subsampling_x, header.subsampling_y),
                (subsampled, subsampled)
            );
            let expected_size = if record == "81010c00" {
                (640, 360)
            } else {
                (320, 200)
            };
            assert_eq!((header.max_width, header.max_height), expected_size);
        }
    }

    #[test]
    fn fixture_frames_become_blocks_without_temporal_delimiters() {
        let frames = fixture_frames();
        let mut blocks = Av1Blocks::default();
        for (i, frame) in frames.iter().enumerate() {
            let keyframe = i % 15 == 0;
            let block = blocks.block(frame, keyframe).expect("block").expect("some");
            let types: Vec<u8> = obus(&block).iter().map(|o| o.obu_type).collect();
            assert!(
                !types.contains(&OBU_TEMPORAL_DELIMITER),
                "frame {i}: {types:?}"
            );
            assert_eq!(types.contains(&OBU_SEQUENCE_HEADER), keyframe, "frame {i}");
            assert!(obus(&block).iter().all(|o| o.header & 0x02 != 0));
            // The same OBUs as the source, less the temporal delimiter.
            assert_eq!(block.len(), frame.len() - 2, "frame {i}");
        }
        let track = blocks.track().expect("track");
        assert_eq!(
            (
                track.sequence_header.max_width,
                track.sequence_header.max_height
            ),
            (640, 360)
        );
        let sequence_header = obus(&frames[0])[1];
        assert_eq!(sequence_header.obu_type, OBU_SEQUENCE_HEADER);
        let mut expected = vec![0x81, 0x01, 0x0c, 0x00];
        sequence_header.write_with_size(&mut expected);
        assert_eq!(track.codec_private, expected);
    }

    #[test]
    fn a_keyframe_without_a_sequence_header_gets_the_last_one_or_waits_for_one() {
        let frames = fixture_frames();
        // Frame 15 without its sequence header (as from a sender that does not repeat
        // it) and its temporal delimiter.
        let stripped: Vec<u8> = obus(&frames[15])
            .iter()
            .filter(|o| ![OBU_SEQUENCE_HEADER, OBU_TEMPORAL_DELIMITER].contains(&o.obu_type))
            .flat_map(|o| {
                let mut out = Vec::new();
                o.write_with_size(&mut out);
                out
            })
            .collect();
        let mut blocks = Av1Blocks::default();
        assert_eq!(blocks.block(&stripped, true), Ok(None));
        assert!(blocks.track().is_none());

        blocks
            .block(&frames[0], true)
            .expect("block")
            .expect("some");
        let block = blocks.block(&stripped, true).expect("block").expect("some");
        let from_key = blocks
            .block(&frames[15], true)
            .expect("block")
            .expect("some");
        assert!(
            block == from_key,
            "the sequence header of frame 0 was not put back"
        );
        // Not marked as a keyframe, it is left as it is.
        let delta = blocks
            .block(&stripped, false)
            .expect("block")
            .expect("some");
        assert!(delta == stripped, "a delta frame was changed");
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let frames = fixture_frames();
        let key = &frames[0];
        let payload = sequence_header_payload(key);
        for len in 0..payload.len() {
            assert_eq!(
                SequenceHeader::parse(&payload[..len]),
                Err(Av1Error::TruncatedSequenceHeader),
                "cut to {len} bytes"
            );
        }
        let mut reserved = payload.to_vec();
        reserved[0] |= 0xe0;
        assert_eq!(
            SequenceHeader::parse(&reserved),
            Err(Av1Error::ReservedProfile(7))
        );

        let mut blocks = Av1Blocks::default();
        for cut in [key.len() - 1, key.len() / 2, 3] {
            assert!(
                matches!(
                    blocks.block(&key[..cut], true),
                    Err(Av1Error::TruncatedObu(_))
                ),
                "cut to {cut} bytes"
            );
        }
        assert_eq!(blocks.block(&[0x12, 0x00], true), Err(Av1Error::NoFrame));
        assert_eq!(
            blocks.block(&[0x92, 0x00], true),
            Err(Av1Error::ForbiddenBit)
        );
        assert!(blocks.track().is_none());
    }

    proptest::proptest! {
        /// Whatever the bytes, parsing and block-making return, never panic.
        #[test]
        fn random_bytes_never_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
            keyframe in proptest::prelude::any::<bool>(),
        ) {
            let _ = SequenceHeader::parse(&data);
            let _ = Av1Blocks::default().block(&data, keyframe);
        }

        /// The fixture's keyframe with one bit flipped: an error or a block, no panic.
        #[test]
        fn bit_flips_never_panic(bit in 0usize..8 * 64) {
            let mut key = fixture_frames().swap_remove(0);
            key[bit / 8] ^= 1 << (bit % 8);
            let _ = Av1Blocks::default().block(&key, true);
        }
    }
}
