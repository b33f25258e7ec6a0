//! Getting keyframe requests (PLI, FIR) from the relay to a publishing application.
//!
//! On the `webrtc` crate's interceptor chain inbound RTCP is for the interceptors: the
//! chain ends in a `NoopInterceptor` that drops every RTCP packet nobody marked with
//! [`Attribute::DeliverToApplication`]. [`KeyframeRequestMarker`] sits application-most
//! in the chain and marks the compound packets that hold a PLI or FIR, narrowed to
//! those; the core then routes them, by their media SSRC, to the local track that sends
//! that SSRC, where `TrackLocal::poll` yields them as `TrackLocalEvent::OnRtcpPacket`.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// Slot of the marker: after every built-in interceptor (the highest named slot is the
/// jitter buffer at 13 000), so they all see the full RTCP first.
const MARKER_SLOT: usize = 14_000;

/// What a keyframe request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyframeRequestKind {
    /// RTCP Picture Loss Indication (RFC 4585).
    Pli,
    /// RTCP Full Intra Request (RFC 5104).
    Fir,
}

/// The keyframe requests in an RTCP compound packet, in order.
pub(crate) fn keyframe_requests(
    packets: &[Box<dyn rtc::rtcp::Packet>],
) -> Vec<KeyframeRequestKind> {
    packets
        .iter()
        .filter_map(|p| {
            let any = p.as_any();
            if any.is::<PictureLossIndication>() {
                Some(KeyframeRequestKind::Pli)
            } else if any.is::<FullIntraRequest>() {
                Some(KeyframeRequestKind::Fir)
            } else {
                None
            }
        })
        .collect()
}

/// Adds [`KeyframeRequestMarker`] to `registry`.
pub(crate) fn with_keyframe_request_marker(registry: Registry) -> Registry {
    registry.with(Slot::from(MARKER_SLOT), KeyframeRequestMarker::default())
}

/// Marks inbound PLI and FIR for delivery to the application and leaves the rest of the
/// inbound RTCP to end where the chain ends it.
#[derive(Default)]
pub(crate) struct KeyframeRequestMarker {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestMarker {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if !keyframe_requests(packets).is_empty() {
                // Narrow the compound to the requests: the core routes a compound by the
                // destination SSRC of its *first* packet, which for a receiver report
                // without report blocks is none at all.
                let requests: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                    .iter()
                    .filter(|p| {
                        let any = p.as_any();
                        any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                    })
                    .cloned()
                    .collect();
                msg.message.packet = Packet::Rtcp(requests);
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeyframeRequestMarker {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
