//! `relay_codec::keyframe` and `relay_codec::frame`: the parsers that read encoded
//! media the customer sends (RTP payloads on the relay's hot path, whole frames in the
//! recorder and the exporters). The first byte picks the codec; the rest is a stream
//! of RTP payloads (2-byte length, then the payload) fed to the keyframe detector, and
//! the whole rest is also parsed as one frame. Checks besides "no panic": NAL spans lie
//! inside the buffer, in order; OBUs end once one is cut off; a frame's digest does not
//! depend on anything but its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_codec::frame;
use relay_codec::keyframe::{KeyframeStarts, VideoCodec, is_keyframe_start};

const CODECS: [VideoCodec; 4] = VideoCodec::ALL;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let codec = CODECS[usize::from(pick) % CODECS.len()];

    let mut starts = KeyframeStarts::new(codec);
    let mut stream = rest;
    let mut timestamp = 0u32;
    while stream.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([stream[0], stream[1]])) % 1500;
        let payload = &stream[2..(2 + len).min(stream.len())];
        let marker = len % 2 == 0;
        let start = starts.observe(timestamp, marker, payload);
        // A subscriber starts only where a keyframe starts.
        assert!(!start || is_keyframe_start(codec, payload));
        if marker {
            timestamp = timestamp.wrapping_add(3000);
        }
        stream = &stream[(2 + len).min(stream.len())..];
    }

    let _ = frame::is_keyframe(codec, rest);
    assert_eq!(frame::frame_digest(codec, rest), frame::frame_digest(codec, rest));
    let spans = frame::annex_b_spans(rest);
    let mut previous_end = 0;
    for s in &spans {
        assert!(s.prefix <= s.start && s.start <= s.end && s.end <= rest.len());
        assert!(s.prefix >= previous_end);
        previous_end = s.end;
        let nal = &rest[s.start..s.end];
        let _ = frame::nal_type(nal);
        let _ = frame::slice_starts_picture(nal);
    }
    assert_eq!(frame::annex_b_nals(rest).len(), spans.len());
    let mut cut = false;
    for obu in frame::av1_obus(rest) {
        assert!(!cut, "an OBU came after a cut-off one");
        match obu {
            Ok(obu) => {
                let mut out = Vec::new();
                obu.write_with_size(&mut out);
                assert!(out.len() > obu.payload.len());
            }
            Err(_) => cut = true,
        }
    }
});
