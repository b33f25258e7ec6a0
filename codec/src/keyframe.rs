//! Keyframe detection in RTP payloads, for the fan-out's keyframe gating.
//!
//! A subscriber that joins, or drops behind, may only start at the first packet of a
//! keyframe. [`is_keyframe_start`] answers that for one RTP payload (the bytes after
//! the RTP header and its extensions, padding removed) by reading the codec's payload
//! descriptor and, where needed, the first bytes of the codec data. It never
//! depacketizes and never allocates; short or malformed payloads answer `false`.
//!
//! What each rule reads:
//!
//! - **VP8** (RFC 7741 §4.2): the payload descriptor must have S=1 (start of a
//!   partition) and PID=0 (partition 0). The optional extension bytes are skipped:
//!   X=1 adds a byte of I/L/T/K flags, I=1 a PictureID of one byte (M=0, 7 bits) or two
//!   (M=1, 15 bits), L=1 the TL0PICIDX byte, T=1 or K=1 the TID/KEYIDX byte. Then the
//!   first byte of the VP8 payload header (the frame tag) must have P (bit 0) = 0: a key
//!   frame.
//! - **VP9** (RFC 9628, formerly draft-ietf-payload-vp9): the first descriptor byte must
//!   have B=1 (start of a frame) and P=0 (no inter-picture prediction). If L=1, the
//!   layer-index byte (after the one- or two-byte PictureID when I=1) must say spatial
//!   layer 0, because P=0 on a higher layer is only a layer switch-up point. The
//!   descriptor must be complete (TL0PICIDX too, in non-flexible mode; the scalability
//!   structure when V=1) and be followed by the frame's uncompressed header, whose
//!   `frame_type` must say key frame (and `show_existing_frame` 0). The header check
//!   tells key frames from intra-only frames (also P=0), and protects the gating from
//!   senders that leave P=0 on inter frames (the `rtc` 0.21 crate's VP9 payloader sets
//!   P=0 on every packet).
//! - **H.264** (RFC 6184, packetization mode 0 or 1): the NAL header's forbidden bit
//!   must be 0. A single NAL unit starts a keyframe if it is an SPS (type 7) or the
//!   first slice of an IDR picture (type 5 with `first_mb_in_slice` = 0, the top bit of
//!   the byte after the NAL header), so later slices of a multi-slice IDR do not count.
//!   A STAP-A (24) counts if it is well formed and one of its NAL units would count
//!   alone. An FU-A (28) counts if its FU header has S=1, E=0 and its original NAL
//!   would count (for type 5, the first fragment byte is checked as above). STAP-B,
//!   MTAP and FU-B belong to the interleaved mode, which WebRTC does not use: `false`.
//!   An SPS packet and the IDR's first packet after it both answer `true`.
//! - **AV1** (AOM "RTP Payload Format for AV1" §4.4): the aggregation header must have
//!   N=1 (first packet of a coded video sequence, which begins with a key frame) and
//!   Z=0 (not the continuation of an OBU), and at least one byte of OBU data follows.

/// A video codec the relay forwards without transcoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// VP8, RFC 7741.
    Vp8,
    /// VP9, RFC 9628.
    Vp9,
    /// H.264, RFC 6184.
    H264,
    /// AV1, the AOM RTP payload format.
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

    /// The SDP/WebRTC MIME type, e.g. `video/VP8`.
    pub fn mime_type(self) -> &'static str {
        match self {
            VideoCodec::Vp8 => "video/VP8",
            VideoCodec::Vp9 => "video/VP9",
            VideoCodec::H264 => "video/H264",
            VideoCodec::Av1 => "video/AV1",
        }
    }

    /// The codec of a MIME type such as `video/VP8`, or of a bare encoding name as in an
    /// `a=rtpmap` line (`VP8`, `h264`), ignoring ASCII case.
    pub fn from_mime(mime: &str) -> Option<Self> {
        let (kind, name) = mime.rsplit_once('/').unwrap_or(("video", mime));
        if !kind.eq_ignore_ascii_case("video") {
            return None;
        }
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

    /// Whether a whole encoded frame of this codec is a keyframe; see
    /// [`crate::frame::is_keyframe`].
    pub fn is_keyframe(self, frame: &[u8]) -> bool {
        crate::frame::is_keyframe(self, frame)
    }
}

impl std::fmt::Display for VideoCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.mime_type())
    }
}

/// Whether `payload`, one RTP payload of `codec`, is the first packet of a keyframe:
/// the place where a new subscriber can start decoding. See the module docs for the
/// rule of each codec.
pub fn is_keyframe_start(codec: VideoCodec, payload: &[u8]) -> bool {
    match codec {
        VideoCodec::Vp8 => vp8(payload),
        VideoCodec::Vp9 => vp9(payload),
        VideoCodec::H264 => h264(payload),
        VideoCodec::Av1 => av1(payload),
    }
    .unwrap_or(false)
}

/// Finds, in one RTP stream in arrival order, the packets where a new subscriber can
/// start: [`is_keyframe_start`] packets that are also the first packet of their frame
/// (the previous packet ended a frame, or carried another timestamp).
///
/// The second condition matters for H.264, where an SPS and the first slice of the IDR
/// picture both start a keyframe: a subscriber started at the IDR slice of a frame whose
/// SPS and PPS it missed gets a frame it may not decode.
#[derive(Debug, Clone)]
pub struct KeyframeStarts {
    codec: VideoCodec,
    /// The previous packet's timestamp and marker bit.
    previous: Option<(u32, bool)>,
}

impl KeyframeStarts {
    /// Nothing seen yet.
    pub fn new(codec: VideoCodec) -> Self {
        KeyframeStarts {
            codec,
            previous: None,
        }
    }

    /// The next packet of the stream: whether a subscriber can start at it.
    pub fn observe(&mut self, timestamp: u32, marker: bool, payload: &[u8]) -> bool {
        let starts_frame = self
            .previous
            .is_none_or(|(ts, ended)| ended || ts != timestamp);
        self.previous = Some((timestamp, marker));
        starts_frame && is_keyframe_start(self.codec, payload)
    }
}

/// Bytes taken by a VP8/VP9 PictureID whose first byte is `first`: M (the top bit)
/// selects the 15-bit form.
fn picture_id_len(first: u8) -> usize {
    if first & 0x80 != 0 { 2 } else { 1 }
}

fn vp8(p: &[u8]) -> Option<bool> {
    const X: u8 = 0x80;
    const S: u8 = 0x10;
    const PID: u8 = 0x07;
    const I: u8 = 0x80;
    const L: u8 = 0x40;
    const T: u8 = 0x20;
    const K: u8 = 0x10;

    let b0 = *p.first()?;
    if b0 & S == 0 || b0 & PID != 0 {
        return Some(false);
    }
    let mut at = 1;
    if b0 & X != 0 {
        let ext = *p.get(at)?;
        at += 1;
        if ext & I != 0 {
            at += picture_id_len(*p.get(at)?);
        }
        if ext & L != 0 {
            at += 1;
        }
        if ext & (T | K) != 0 {
            at += 1;
        }
    }
    let frame_tag = *p.get(at)?;
    Some(frame_tag & 0x01 == 0)
}

fn vp9(p: &[u8]) -> Option<bool> {
    const I: u8 = 0x80;
    const P: u8 = 0x40;
    const L: u8 = 0x20;
    const F: u8 = 0x10;
    const B: u8 = 0x08;
    const V: u8 = 0x02;

    let b0 = *p.first()?;
    if b0 & B == 0 || b0 & P != 0 {
        return Some(false);
    }
    let mut at = 1;
    if b0 & I != 0 {
        at += picture_id_len(*p.get(at)?);
    }
    if b0 & L != 0 {
        let layer = *p.get(at)?;
        // TID:3 U:1 SID:3 D:1; non-flexible mode adds TL0PICIDX.
        at += if b0 & F == 0 { 2 } else { 1 };
        if (layer >> 1) & 0x07 != 0 {
            return Some(false);
        }
    }
    if b0 & V != 0 {
        at = skip_vp9_scalability_structure(p, at)?;
    }
    let header = p.get(at..).filter(|h| !h.is_empty())?;
    Some(crate::frame::is_keyframe(VideoCodec::Vp9, header))
}

/// The offset just past the VP9 scalability structure that starts at `at` (RFC 9628
/// §4.2.1): `N_S:3 Y:1 G:1 -:3`, then (N_S + 1) × (width, height) as u16 if Y, then
/// N_G and N_G picture descriptions (`TID:3 U:1 R:2 -:2`, then R P_DIFF bytes) if G.
fn skip_vp9_scalability_structure(p: &[u8], mut at: usize) -> Option<usize> {
    let ss = *p.get(at)?;
    at += 1;
    let layers = usize::from(ss >> 5) + 1;
    if ss & 0x10 != 0 {
        at += layers * 4;
    }
    if ss & 0x08 != 0 {
        let pictures = *p.get(at)?;
        at += 1;
        for _ in 0..pictures {
            let description = *p.get(at)?;
            at += 1 + usize::from((description >> 2) & 0x03);
        }
    }
    (at <= p.len()).then_some(at)
}

fn h264(p: &[u8]) -> Option<bool> {
    const STAP_A: u8 = 24;
    const FU_A: u8 = 28;
    const FU_S: u8 = 0x80;
    const FU_E: u8 = 0x40;

    let (&header, body) = p.split_first()?;
    if header & 0x80 != 0 {
        return Some(false);
    }
    match header & 0x1f {
        STAP_A => {
            let mut rest = body;
            let mut starts = false;
            if rest.is_empty() {
                return Some(false);
            }
            while !rest.is_empty() {
                let (size, tail) = rest.split_first_chunk::<2>()?;
                let size = usize::from(u16::from_be_bytes(*size));
                if size == 0 || size > tail.len() {
                    return Some(false);
                }
                let (nal, tail) = tail.split_at(size);
                starts |= h264_nal_starts_keyframe(nal[0], &nal[1..]);
                rest = tail;
            }
            Some(starts)
        }
        FU_A => {
            let (&fu, fragment) = body.split_first()?;
            if fu & FU_S == 0 || fu & FU_E != 0 {
                return Some(false);
            }
            Some(h264_nal_starts_keyframe(
                (header & 0xe0) | (fu & 0x1f),
                fragment,
            ))
        }
        _ => Some(h264_nal_starts_keyframe(header, body)),
    }
}

/// Whether a NAL unit with this header, followed by `body` (all of it or its first
/// bytes), is an SPS or the first slice of an IDR picture.
fn h264_nal_starts_keyframe(header: u8, body: &[u8]) -> bool {
    const IDR: u8 = 5;
    const SPS: u8 = 7;

    if header & 0x80 != 0 {
        return false;
    }
    match (header & 0x1f, body.first()) {
        // first_mb_in_slice is ue(v): its first bit is 1 exactly when it is 0.
        (IDR, Some(&first)) => first & 0x80 != 0,
        (SPS, Some(_)) => true,
        _ => false,
    }
}

fn av1(p: &[u8]) -> Option<bool> {
    const Z: u8 = 0x80;
    const N: u8 = 0x08;

    let header = *p.first()?;
    Some(header & N != 0 && header & Z == 0 && p.len() > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_round_trip() {
        for codec in VideoCodec::ALL {
            assert_eq!(VideoCodec::from_mime(codec.mime_type()), Some(codec));
        }
        assert_eq!(VideoCodec::from_mime("video/h264"), Some(VideoCodec::H264));
        assert_eq!(VideoCodec::from_mime("VP9"), Some(VideoCodec::Vp9));
        assert_eq!(VideoCodec::from_mime("video/H265"), None);
        assert_eq!(VideoCodec::from_mime("audio/VP8"), None);
    }

    use proptest::prelude::*;

    fn check(codec: VideoCodec, cases: &[(&[u8], bool, &str)]) {
        for &(payload, expected, what) in cases {
            assert_eq!(
                is_keyframe_start(codec, payload),
                expected,
                "{codec:?} {what}: {payload:02x?}"
            );
        }
    }

    #[test]
    fn mime_types() {
        assert_eq!(VideoCodec::from_mime("video/VP8"), Some(VideoCodec::Vp8));
        assert_eq!(VideoCodec::from_mime("VIDEO/vp9"), Some(VideoCodec::Vp9));
        assert_eq!(VideoCodec::from_mime("video/h264"), Some(VideoCodec::H264));
        assert_eq!(VideoCodec::from_mime("video/Av1"), Some(VideoCodec::Av1));
        assert_eq!(VideoCodec::from_mime("audio/opus"), None);
        assert_eq!(VideoCodec::from_mime("video/VP8 "), None);
        assert_eq!(VideoCodec::from_mime("video/H265"), None);
    }

    #[test]
    fn vp8() {
        // Frame tag of a real key frame (P=0) and of a delta frame (P=1), then the start
        // code that follows a key frame's tag.
        check(
            VideoCodec::Vp8,
            &[
                (
                    &[0x10, 0x50, 0x2f, 0x01, 0x9d, 0x01, 0x2a],
                    true,
                    "key, S=1",
                ),
                (
                    &[0x90, 0xf0, 0x81, 0x23, 0x05, 0x40, 0x50, 0x2f],
                    true,
                    "key, I (15-bit) L T K",
                ),
                (&[0x90, 0x80, 0x01, 0x00, 0x01], true, "7-bit PictureID"),
                (&[0x90, 0x80, 0x81, 0x00, 0x01], false, "15-bit PictureID"),
                (&[0x90, 0x40, 0x05, 0x50], true, "L only"),
                (&[0x90, 0x00, 0x50], true, "X with no extensions"),
                (&[0x00, 0x50, 0x2f, 0x01], false, "continuation, S=0"),
                (&[0x11, 0x50, 0x2f], false, "start of partition 1"),
                (&[0x10, 0x51, 0x2f, 0x01], false, "delta frame"),
                (&[0x90, 0x80, 0x12, 0x51], false, "delta frame, 7-bit id"),
                (&[], false, "empty"),
                (&[0x10], false, "no frame tag"),
                (&[0x90], false, "no extension byte"),
                (&[0x90, 0x80], false, "no PictureID"),
                (
                    &[0x90, 0x80, 0x81, 0x00],
                    false,
                    "no frame tag after PictureID",
                ),
                (
                    &[0x90, 0xf0, 0x81, 0x23, 0x05, 0x40],
                    false,
                    "no frame tag after TID",
                ),
            ],
        );
    }

    #[test]
    fn vp9() {
        check(
            VideoCodec::Vp9,
            &[
                (&[0x08, 0x82, 0x49], true, "B=1 P=0, no extensions"),
                (
                    &[0x8e, 0x81, 0x23, 0x00, 0x82],
                    true,
                    "key with 15-bit PictureID and a one-byte SS",
                ),
                (
                    &[0x8e, 0x81, 0x23, 0x10, 0x02, 0x80, 0x01, 0x68, 0x82],
                    true,
                    "key with SS carrying one layer's resolution",
                ),
                (
                    &[0x8e, 0x81, 0x23, 0x08, 0x01, 0x04, 0x01, 0x82],
                    true,
                    "key with SS carrying a picture group",
                ),
                (&[0x8e, 0x81, 0x23, 0x10, 0x02], false, "SS cut"),
                (
                    &[0x98, 0x81, 0x23, 0x86],
                    false,
                    "inter frame with P=0, as the rtc crate's payloader sends it",
                ),
                (&[0x08, 0x88], false, "show_existing_frame"),
                (&[0x08, 0x42], false, "not a VP9 frame header"),
                (
                    &[0xa8, 0x81, 0x23, 0x00, 0x07, 0x82],
                    true,
                    "non-flexible, SID 0",
                ),
                (&[0xb8, 0x05, 0x00, 0x82], true, "flexible, SID 0"),
                (
                    &[0xa8, 0x81, 0x23, 0x02, 0x07, 0x82],
                    false,
                    "SID 1 switch-up",
                ),
                (&[0xb8, 0x05, 0x03, 0x82], false, "flexible, SID 1"),
                (&[0x04, 0x82, 0x49], false, "continuation, B=0"),
                (&[0x48, 0x86, 0x00], false, "delta frame, P=1"),
                (&[0xc8, 0x05, 0x86], false, "delta frame with PictureID"),
                (&[], false, "empty"),
                (&[0x08], false, "no payload"),
                (&[0x88, 0x81], false, "PictureID cut"),
                (&[0xa8, 0x81, 0x23], false, "no layer index"),
                (&[0xa8, 0x81, 0x23, 0x00], false, "no TL0PICIDX"),
                (
                    &[0xa8, 0x81, 0x23, 0x00, 0x07],
                    false,
                    "no payload after TL0PICIDX",
                ),
                (&[0xb8, 0x05, 0x00], false, "flexible, no payload"),
            ],
        );
    }

    #[test]
    fn h264() {
        check(
            VideoCodec::H264,
            &[
                (&[0x67, 0x42, 0xc0, 0x1f], true, "SPS"),
                (&[0x65, 0x88, 0x84], true, "IDR, first slice"),
                (&[0x65, 0x05, 0x88], false, "IDR, later slice"),
                (&[0x68, 0xce, 0x3c, 0x80], false, "PPS"),
                (&[0x41, 0x9a, 0x02], false, "non-IDR slice"),
                (&[0x06, 0x05, 0x10], false, "SEI"),
                (&[0xe5, 0x88, 0x84], false, "forbidden bit set"),
                (&[0x67], false, "SPS without body"),
                (&[0x65], false, "IDR without body"),
                (&[], false, "empty"),
                // STAP-A: 16-bit big-endian size before each NAL unit.
                (
                    &[
                        0x78, 0x00, 0x04, 0x67, 0x42, 0xc0, 0x1f, 0x00, 0x02, 0x68, 0xce,
                    ],
                    true,
                    "STAP-A SPS+PPS",
                ),
                (
                    &[0x78, 0x00, 0x02, 0x68, 0xce, 0x00, 0x02, 0x65, 0x88],
                    true,
                    "STAP-A PPS+IDR",
                ),
                (
                    &[0x78, 0x00, 0x02, 0x06, 0x05, 0x00, 0x02, 0x68, 0xce],
                    false,
                    "STAP-A SEI+PPS",
                ),
                (
                    &[0x78, 0x00, 0x09, 0x67, 0x42],
                    false,
                    "STAP-A size overruns",
                ),
                (
                    &[0x78, 0x00, 0x02, 0x67, 0x42, 0x00],
                    false,
                    "STAP-A half a size",
                ),
                (&[0x78, 0x00, 0x00], false, "STAP-A empty unit"),
                (&[0x78], false, "STAP-A without units"),
                // FU-A: FU indicator (type 28), FU header S E R type, fragment.
                (&[0x7c, 0x85, 0x88, 0x84], true, "FU-A IDR start"),
                (&[0x7c, 0x87, 0x42, 0xc0], true, "FU-A SPS start"),
                (&[0x7c, 0x05, 0x12, 0x34], false, "FU-A IDR middle"),
                (&[0x7c, 0x45, 0x12, 0x34], false, "FU-A IDR end"),
                (&[0x7c, 0xc5, 0x88], false, "FU-A with S and E"),
                (&[0x7c, 0x85, 0x05], false, "FU-A IDR later slice"),
                (&[0x5c, 0x81, 0x9a], false, "FU-A non-IDR start"),
                (&[0x7c, 0x85], false, "FU-A without fragment"),
                (&[0x7c], false, "FU-A without header"),
                (&[0x79, 0x00, 0x00, 0x00, 0x04, 0x67], false, "STAP-B"),
                (&[0x7d, 0x85, 0x00, 0x00, 0x88], false, "FU-B"),
            ],
        );
    }

    #[test]
    fn av1() {
        check(
            VideoCodec::Av1,
            &[
                // W=1 (one OBU), then an OBU header of type 1 (sequence header).
                (&[0x18, 0x0a, 0x0b], true, "new coded video sequence"),
                (&[0x08, 0x0a, 0x0b, 0x00], true, "N=1, W=0"),
                (&[0x10, 0x32, 0x10], false, "delta frame, N=0"),
                (&[0x98, 0x12], false, "N=1 but Z=1"),
                (&[0x50, 0x12], false, "continued OBU, Y=1"),
                (&[0x18], false, "no OBU data"),
                (&[], false, "empty"),
            ],
        );
    }

    /// The committed fixtures, packetized the way a WebRTC sender does, answer `true`
    /// exactly at the keyframes their README lists (frames 0 and 30).
    #[test]
    fn fixtures_start_only_at_their_keyframes() {
        const MTU: usize = 1000;

        let ivf = include_bytes!("../../tests/fixtures/screen-vp8.ivf");
        let mut frames = Vec::new();
        let mut rest = &ivf[32..];
        while let Some((header, tail)) = rest.split_first_chunk::<12>() {
            let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
            frames.push(&tail[..len]);
            rest = &tail[len..];
        }
        assert_eq!(frames.len(), 60);
        let mut starts = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            for (j, chunk) in frame.chunks(MTU).enumerate() {
                // X=1, S on the first packet, 15-bit PictureID.
                let picture_id = (i as u16) | 0x8000;
                let mut payload = vec![if j == 0 { 0x90 } else { 0x80 }, 0x80];
                payload.extend_from_slice(&picture_id.to_be_bytes());
                payload.extend_from_slice(chunk);
                if is_keyframe_start(VideoCodec::Vp8, &payload) {
                    starts.push((i, j));
                }
            }
        }
        assert_eq!(starts, [(0, 0), (30, 0)]);

        let annex_b = include_bytes!("../../tests/fixtures/screen-h264.h264");
        let mut nals = Vec::new();
        let mut at = 0;
        while let Some(next) = annex_b[at..].windows(3).position(|w| w == [0, 0, 1]) {
            nals.push(at + next + 3);
            at += next + 3;
        }
        let mut access_unit = None::<usize>;
        let mut starts = Vec::new();
        let mut packets: Vec<(usize, u8, Vec<u8>)> = Vec::new();
        for (k, &begin) in nals.iter().enumerate() {
            let end = nals.get(k + 1).map_or(annex_b.len(), |&next| next - 3);
            let nal = annex_b[begin..end]
                .strip_suffix(&[0])
                .unwrap_or(&annex_b[begin..end]);
            let nal_type = nal[0] & 0x1f;
            if nal_type == 9 {
                access_unit = Some(access_unit.map_or(0, |au| au + 1));
                continue;
            }
            let au = access_unit.unwrap();
            let mut payloads = Vec::new();
            if nal.len() <= MTU {
                payloads.push(nal.to_vec());
            } else {
                let chunks: Vec<_> = nal[1..].chunks(MTU).collect();
                for (j, chunk) in chunks.iter().enumerate() {
                    let s = if j == 0 { 0x80 } else { 0 };
                    let e = if j == chunks.len() - 1 { 0x40 } else { 0 };
                    let mut payload = vec![(nal[0] & 0xe0) | 28, s | e | nal_type];
                    payload.extend_from_slice(chunk);
                    payloads.push(payload);
                }
            }
            for (j, payload) in payloads.iter().enumerate() {
                if is_keyframe_start(VideoCodec::H264, payload) {
                    starts.push((au, nal_type, j));
                }
                packets.push((au, nal_type, payload.clone()));
            }
        }
        assert_eq!(access_unit, Some(59));
        // The SPS and the IDR's first fragment, in the two keyframe access units.
        assert_eq!(starts, [(0, 7, 0), (0, 5, 0), (30, 7, 0), (30, 5, 0)]);
        // As a stream (one timestamp per access unit, the marker on its last packet),
        // a subscriber starts only at the SPS: the first packet of the access unit.
        let mut stream = KeyframeStarts::new(VideoCodec::H264);
        let mut at = Vec::new();
        for (i, (au, nal_type, payload)) in packets.iter().enumerate() {
            let last = packets.get(i + 1).is_none_or(|next| next.0 != *au);
            if stream.observe(*au as u32 * 6000, last, payload) {
                at.push((*au, *nal_type));
            }
        }
        assert_eq!(at, [(0, 7), (30, 7)]);
    }

    proptest! {
        #[test]
        fn random_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..48)) {
            for codec in [VideoCodec::Vp8, VideoCodec::Vp9, VideoCodec::H264, VideoCodec::Av1] {
                let _ = is_keyframe_start(codec, &payload);
            }
        }

        /// A STAP-A counts exactly when one of its units counts on its own.
        #[test]
        fn stap_a_agrees_with_its_units(
            units in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..6), 1..4),
        ) {
            let mut stap = vec![0x78];
            for unit in &units {
                stap.extend_from_slice(&(unit.len() as u16).to_be_bytes());
                stap.extend_from_slice(unit);
            }
            let alone = units.iter().any(|u| is_keyframe_start(VideoCodec::H264, u)
                && !matches!(u[0] & 0x1f, 24..=29));
            prop_assert_eq!(is_keyframe_start(VideoCodec::H264, &stap), alone);
        }
    }
}
