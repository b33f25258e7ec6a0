//! A native client of the relay, built on the `webrtc` crate: the customer that
//! publishes its screen and the agents that watch it and send input.
//!
//! How the pieces fit:
//!
//! - [`Signalling`] is the session WebSocket (`relay_codec::wire` JSON over
//!   tokio-tungstenite and rustls, see [`insecure_tls`] and [`tls_trusting_pem_file`]),
//!   with a [`Transcript`] of every frame received.
//! - [`FrameSource`] supplies encoded frames (IVF, H.264 Annex B, or synthetic), looped,
//!   and can skip to the next keyframe the way an encoder answers PLI.
//! - [`Customer`] and [`Agent`] each hold one peer connection with the relay, as
//!   `docs/protocol.md` ("Media") describes: the client offers, the relay answers, ICE
//!   is trickled both ways, an agent re-offers on `renegotiate`. The customer publishes
//!   a `sendonly` video track and opens the `input` data channel; an agent offers a
//!   `recvonly` video transceiver and its own `input` channel.
//! - An agent may show its own screen to the customer ([`Agent::start_share`]: it asks
//!   the relay with `share_start`, adds a `sendonly` video transceiver and re-offers);
//!   the customer, asked to `renegotiate`, adds a `recvonly` one and receives the share
//!   ([`Customer::share_frames`]) through the same receive path as an agent's
//!   (`receive.rs`); both publishers share `publish.rs`.
//! - Both also open a `chat` channel ([`ChatChannel`]: chat as on the WebSocket, but
//!   delivered on the channel) and a `files` channel ([`FileTransfers`]: offering files
//!   held in memory, accepting or declining offers, collecting files received whole).
//! - Both record what happened with the instant it happened: frames sent (customer) and
//!   received (agent) with their [`frame_digest`], input events, raw data-channel
//!   messages, keyframe requests. Tests compare the records; the bench computes latency
//!   from `sent_at`/`received_at`.
//!
//! Everything waits with a timeout. Dropping a client stops its tasks; `close()` also
//! closes its peer connection and WebSocket.
//!
//! ```no_run
//! # async fn demo(customer_ws: &str, agent_ws: &str) -> Result<(), relay_bench::client::ClientError> {
//! use std::time::Duration;
//! use relay_bench::client::*;
//!
//! let tls = insecure_tls();
//! let source = FrameSource::open("tests/fixtures/screen-vp8.ivf")?;
//! let customer = Customer::connect(customer_ws, tls.clone(), source, CustomerOptions::default()).await?;
//! let agent = Agent::connect(agent_ws, tls, AgentOptions::default()).await?;
//! agent.wait_frames(10, Duration::from_secs(10)).await?;
//! let sent = customer.sent_frames();
//! assert!(agent.frames().iter().all(|f| sent.iter().any(|s| s.digest == f.digest)));
//! # Ok(()) }
//! ```

mod agent;
mod channels;
mod codec;
mod customer;
mod peer;
mod publish;
mod receive;
mod route;
mod rtcp;
mod signalling;
mod source;
mod tcp_runtime;

pub use agent::{Agent, AgentOptions};
pub use channels::{
    CHAT_LABEL, CREDIT_EVERY, ChatChannel, FILE_WINDOW, FILES_LABEL, FileOffer, FileTransfers,
    IncomingState, OutgoingState, ReceivedFile, file_sha256,
};
pub use codec::{
    ClientCodec, CodecDepacketizer, VIDEO_CLOCK_RATE, VideoCodec, digest_hex, frame_digest,
};
pub use customer::{Customer, CustomerOptions, ReceivedInput};
pub use peer::{DataChannelMessage, IceTransport, NegotiationStats};
pub use publish::{KeyframeRequest, SentFrame};
pub use receive::{ReceiveStats, ReceivedFrame};
// RTP without a peer connection (the UDP forwarder of `compare`), cut and reassembled
// as the tracks do.
pub(crate) use codec::rtp_packetizer;
pub(crate) use peer::lock;
pub(crate) use receive::Assembler;
// The pieces `compare`'s Janus peers (signalled over Janus's HTTP API) are built from.
pub(crate) use peer::{build_peer_connection_with, wait_connected};
pub(crate) use publish::{
    PublishRecords, Publisher, publish, video_track, watch_keyframe_requests,
};
pub(crate) use receive::Receiver;
pub use route::MediaRoute;
pub use rtcp::KeyframeRequestKind;
pub(crate) use rtcp::with_keyframe_request_marker;
pub use signalling::{
    CONNECT_TIMEOUT, CloseInfo, Signalling, SignallingSender, Transcript, Welcome, insecure_tls,
    resume_url, tls_trusting_pem, tls_trusting_pem_file,
};
pub use source::{Frame, FrameSource};

use relay_codec::input::InputError;
use relay_codec::wire::ErrorCode;

/// Label of the data channel that carries input events (agent → relay → customer).
pub const INPUT_LABEL: &str = "input";

/// What went wrong in a client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The WebSocket could not be opened or failed.
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// A TLS configuration could not be built (bad PEM, no certificate).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The relay answered the connection with `error` instead of `welcome`.
    #[error("the relay refused the session socket: {code:?}: {message}")]
    Refused {
        /// The stable error code.
        code: ErrorCode,
        /// The relay's explanation.
        message: String,
    },
    /// The relay closed the session socket.
    #[error("the relay closed the session socket ({code}: {reason})")]
    ClosedByRelay {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The session socket is closed.
    #[error("the session socket is closed")]
    SignallingClosed,
    /// The outgoing queue of the session socket is full.
    #[error("the session socket's send queue is full")]
    SignallingBacklog,
    /// Something awaited did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The relay or the local stack did something this client does not expect.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The `webrtc`/`rtc` stack failed.
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
    /// The peer connection ended in a state other than `connected`.
    #[error("the peer connection is {0}")]
    PeerConnection(String),
    /// No remote track has arrived yet.
    #[error("no video track from the relay yet")]
    NoTrack,
    /// An input event could not be encoded.
    #[error("input event: {0}")]
    Input(#[from] InputError),
    /// A frame source could not be read.
    #[error("frame source ({what}): {detail}")]
    Source {
        /// What was being read.
        what: String,
        /// Why it failed.
        detail: String,
    },
}
