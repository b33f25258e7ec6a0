//! The edge relay for remote-support sessions.
//!
//! A customer shares their screen with up to eight support agents through this node.
//! The crate is split the way the work is:
//!
//! - [`session`]: the sans-IO core of the control plane. It owns every session, its
//!   roster, invitations, permissions and timers, takes inputs stamped with an explicit
//!   `Instant` and returns outputs (messages to deliver, statistics). No tokio, no sockets.
//! - [`throttle`]: the sans-IO support-key brute-force guard (per address and node-wide).
//! - [`signal`]: the IO shell: HTTPS/WSS signalling with axum and rustls, driving the core
//!   from one task and routing its outputs to WebSockets.
//! - [`auth`], [`config`], [`cli`], [`tls`], [`metrics`]: tokens, configuration, the
//!   command line, certificates and Prometheus metrics.
//! - [`identity`]: who an authenticated agent is.

pub mod auth;
pub mod cli;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod session;
pub mod signal;
pub mod throttle;
pub mod tls;
