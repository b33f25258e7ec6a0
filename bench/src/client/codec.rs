//! The video codecs the relay forwards, as a WebRTC client registers and depacketizes
//! them. The formats themselves (names, keyframe detection on whole frames, the digest
//! that identifies a frame across the relay) are `relay_codec`'s: [`VideoCodec`],
//! [`relay_codec::frame`].

use std::time::Instant;

use bytes::Bytes;
use rtc::rtp::codec::av1::Av1Depacketizer;
use rtc::rtp::codec::h264::H264Packet;
use rtc::rtp::codec::vp8::Vp8Packet;
use rtc::rtp::codec::vp9::Vp9Packet;
use rtc::rtp::packetizer::{Depacketizer, Packetizer, new_packetizer};
use rtc::rtp::sequence::new_random_sequencer;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters};

pub use relay_codec::frame::{digest_hex, frame_digest};
pub use relay_codec::keyframe::VideoCodec;

/// RTP clock rate of every video codec.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;

/// Largest RTP packet, header included, that the publishers' video tracks send: the
/// `webrtc` crate's `TrackLocalStaticSample` packetizes at this MTU.
pub(crate) const RTP_OUTBOUND_MTU: usize = 1200;

/// A packetizer that cuts `codec` frames into RTP as the publishers' video tracks do
/// (the codec's payloader, [`RTP_OUTBOUND_MTU`], its default payload type, a random
/// first sequence number and timestamp), for RTP sent without a peer connection.
pub(crate) fn rtp_packetizer(
    codec: VideoCodec,
    ssrc: u32,
    now: Instant,
) -> Result<impl Packetizer, webrtc::error::Error> {
    let params = codec.rtp_codec_parameters();
    Ok(new_packetizer(
        now,
        RTP_OUTBOUND_MTU,
        params.payload_type,
        ssrc,
        params.rtp_codec.payloader()?,
        Box::new(new_random_sequencer()),
        VIDEO_CLOCK_RATE,
    ))
}

/// What a WebRTC client needs of a [`VideoCodec`]: the parameters it registers and the
/// depacketizer that reassembles its frames.
pub trait ClientCodec {
    /// The codec parameters a publishing client registers: the payload types and fmtp
    /// lines of `MediaEngine::register_default_codecs`, with NACK, PLI and FIR feedback.
    /// H.264 is offered as constrained baseline (`42e01f`), packetization mode 1, as
    /// browsers offer it.
    fn rtp_codec_parameters(self) -> RTCRtpCodecParameters;

    /// A fresh depacketizer for this codec, producing frames in the format
    /// [`VideoCodec::is_keyframe`] and [`frame_digest`] expect (Annex B for H.264,
    /// low-overhead OBUs with size fields for AV1).
    fn depacketizer(self) -> CodecDepacketizer;
}

impl ClientCodec for VideoCodec {
    fn rtp_codec_parameters(self) -> RTCRtpCodecParameters {
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

    fn depacketizer(self) -> CodecDepacketizer {
        match self {
            VideoCodec::Vp8 => CodecDepacketizer::Vp8(Vp8Packet::default()),
            VideoCodec::Vp9 => CodecDepacketizer::Vp9(Vp9Packet::default()),
            VideoCodec::H264 => CodecDepacketizer::H264(H264Packet::default()),
            VideoCodec::Av1 => CodecDepacketizer::Av1(Av1Depacketizer::new()),
        }
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

/// The frame digest survives the rtc crates' payloaders and depacketizers, in memory.
#[cfg(test)]
mod round_trip_tests {
    use std::time::Duration;

    use rtc::media::io::sample_builder::SampleBuilder;

    use super::*;
    use crate::client::source::FrameSource;
    use crate::client::source::tests::fixture;

    /// Packetizes `frames` as `TrackLocalStaticSample` does ([`rtp_packetizer`]) and
    /// reassembles them with a `SampleBuilder`, returning the frames it releases.
    fn round_trip(codec: VideoCodec, frames: &[Bytes]) -> Vec<Bytes> {
        let now = Instant::now();
        let mut packetizer = rtp_packetizer(codec, 0x1234_5678, now).expect("payloader");
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
