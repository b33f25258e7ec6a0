//! An interceptor that hands agents' keyframe requests and receiver reports to the
//! application.
//!
//! On the `webrtc` crate's default chain, inbound RTCP stops inside the interceptors that
//! act on it (the NACK responder answers NACKs from its own cache there); nothing reaches
//! the application. The fan-out needs two kinds: PLI/FIR, which it forwards to the
//! customer as a coalesced keyframe request, and receiver reports, which feed per-agent
//! statistics. This interceptor sits application-most and marks exactly those for
//! delivery; other RTCP has already been consumed below it and ends here.

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::rtcp;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// The registry slot: above every built-in interceptor, so it sees what they leave.
pub const SLOT: usize = 14_000;

/// Marks PLI, FIR and receiver reports for delivery to the application.
#[derive(Default)]
pub struct AppFeedback {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

/// Whether the fan-out wants to see this RTCP packet.
pub fn wanted(packet: &dyn rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() || any.is::<ReceiverReport>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for AppFeedback {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let kept: Vec<Box<dyn rtcp::Packet>> = packets
                .iter()
                .filter(|p| wanted(p.as_ref()))
                .cloned()
                .collect();
            if kept.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(kept);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write.pop_front()
    }
}

impl Interceptor for AppFeedback {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}
