//! Pure wire and storage formats of the edge relay.
//!
//! This crate holds the formats that cross a process boundary, and nothing else:
//! no sockets, no tasks, no clocks, no files. Every parser takes bytes and returns a
//! typed value or a typed error, so each one can be fuzzed and property-tested alone.
//!
//! - [`wire`]: the JSON signalling messages spoken over the relay's HTTP API and
//!   WebSockets, with the stable error codes clients match on.
//! - [`input`]: the binary remote-control events (mouse, wheel, keys, Ctrl+Alt+Del,
//!   clipboard) agents send to the customer over the `input` data channel.
//! - [`challenge`]: the proof-of-work puzzle a customer solves to try a support key
//!   while the node's key budget is spent.
//! - [`files`]: the binary file-transfer messages (offer, accept, chunks, credit,
//!   completion) on the `files` data channel, in both directions.
//! - [`frame`]: whole encoded frames: keyframe detection, H.264 NAL units, AV1 OBUs
//!   and the digest that identifies a frame across packetization.
//! - [`keyframe`]: where a keyframe starts in a VP8, VP9, H.264 or AV1 RTP payload, for
//!   the relay's fan-out to start new or recovering subscribers cleanly.
//! - [`recording`]: the session recording container (zstd-compressed chunks of video
//!   frames, input, chat and roster records, with a seek index), its writer, and a
//!   reader that survives a cut-off or damaged file.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod challenge;
pub mod files;
pub mod frame;
pub mod input;
pub mod keyframe;
pub mod recording;
pub mod wire;
