//! End-to-end resilience tests (issue 7): the real `relay` binary on loopback, real
//! `webrtc` peers (the native client of `relay-bench`), real encoded frames. One module
//! per failure family; each test asserts what a client or an operator would notice.

/// Reboot and reconnect: a customer whose client dies mid-session comes back with the
/// single-use resume token of its last `welcome`, within its grace period; the agents
/// see it reconnecting and then back, keep their own peer connections, and get every
/// frame from the first keyframe of the resumed stream on; input sent while it was
/// away is dropped, never delivered late. A customer that does not come back ends the
/// session with `customer_did_not_return`.
#[path = "resilience/resume.rs"]
mod resume;

/// Faults on the path and of the node: a lossy, jittery path (NACK keeps the stream
/// decodable), a network change (ICE restart on the same peer connection, for both
/// roles), the relay killed and restarted.
#[path = "resilience/faults.rs"]
mod faults;

/// UDP blocked: clients whose ICE may use TCP only reach the relay's one ICE-TCP port
/// (`media.ice_tcp_port`); media and input flow over it, whole and in order, and the
/// relay's metrics show the streams went over TCP. Garbage on that port (HTTP, non-STUN
/// frames, silence, unknown ufrags) is closed, counted, and leaves live sessions alone.
#[path = "resilience/tcp.rs"]
mod tcp;

/// Bad input: garbage, STUN floods and forged SRTP on the media port, malformed
/// signalling, data-channel messages over the limit or of unknown kinds, connections
/// that never finish their handshake, 10,000 wrong support keys and a customer
/// publishing 50 Mbps. Each is refused or dropped and counted in `/metrics`, and a
/// healthy session on the same relay keeps its frames and input throughout.
#[path = "resilience/bad_input.rs"]
mod bad_input;

/// Floods: a customer's 1,000 chat messages of 4 KB as fast as it can, an agent's
/// 20,000 candidates during a downgrade. The flooder is held to its budget and told
/// `rate_limited`; nobody else is disconnected, frames and input keep flowing, and the
/// downgrade holds at once: none of the agent's later input reaches the customer.
#[path = "resilience/floods.rs"]
mod floods;

/// Connections that hold sockets (issue 16): 300 stalled request bodies and 300 idle
/// keep-alives are closed by their deadlines while the node keeps serving; bursts over
/// `limits.max_connections` and `limits.max_connections_per_address` are refused exactly
/// and counted; heads over 64 KiB are refused; an oversized WebSocket frame closes with
/// 1009; an idle WebSocket outlives every HTTP deadline.
#[path = "resilience/connections.rs"]
mod connections;

/// Soak: two minutes of the bench's load with churn; nothing lost, memory flat.
#[path = "resilience/soak.rs"]
mod soak;
