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
