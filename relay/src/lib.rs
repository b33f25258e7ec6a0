//! The edge relay for remote-support sessions.
//!
//! A customer shares their screen with up to eight support agents through this node.
//! The crate is split the way the work is:
//!
//! - [`session`]: the sans-IO core of the control plane. It owns every session, its
//!   roster, invitations, permissions and timers, takes inputs stamped with an explicit
//!   `Instant` and returns outputs (messages to deliver, statistics). No tokio, no sockets.
//! - [`fanout`]: the sans-IO media fan-out of one session: which agent gets which packet,
//!   dropping a slow agent to the next keyframe, and coalesced keyframe requests.
//! - [`transfer`]: the sans-IO file-transfer core of one session: who may send a file
//!   to whom, receivers' answers, credit-based flow control and the size limit.
//! - [`throttle`]: the sans-IO support-key brute-force guard (per address and node-wide).
//! - [`rate_limit`]: per-participant message budgets (token buckets, sans-IO).
//! - [`signal`]: the IO shell: HTTPS/WSS signalling with axum and rustls, driving the core
//!   from one task and routing its outputs to WebSockets.
//! - [`transport`]: the media plane's IO shell: WebRTC peer connections (the `webrtc`
//!   crate), the customer's track readers and the agents' writers around the fan-out.
//! - [`auth`], [`config`], [`cli`], [`tls`], [`metrics`]: tokens, configuration, the
//!   command line, certificates and Prometheus metrics.
//! - [`identity`]: who an authenticated agent is.
//! - [`cluster`]: scale-out: the session directory in Redis that edge nodes share,
//!   placement of new sessions, redirects to the node that holds a session, failover.

pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod fanout;
pub mod identity;
pub mod metrics;
pub mod rate_limit;
pub mod record;
pub mod session;
pub mod signal;
pub mod text;
pub mod throttle;
pub mod tls;
pub mod transfer;
pub mod transport;
