//! `relay-bench`: a native client library for the edge relay, and the relay's load
//! generator and benchmark.
//!
//! - [`client`]: a customer that publishes encoded frames over one WebRTC peer
//!   connection with the relay, agents that receive them and send input events, and
//!   the session-WebSocket signalling they both speak. The end-to-end tests in `tests/`
//!   use it as real peers; the benchmark drives many of them.
//! - [`api`]: the relay's HTTP API (tokens, sessions, invitations, joins, metrics).
//! - [`relay_process`]: a relay started by the bench, and its CPU and memory from
//!   `/proc`.
//! - [`run`]: `relay-bench run`, sessions driven side by side and scored into a
//!   [`run::report::Report`] (the JSON ops scripts read).
//! - [`ramp`]: `relay-bench ramp`, `run` with more sessions step by step until an
//!   objective breaks; the capacity and an SVG chart.
//! - [`roles`]: `relay-bench customer` / `relay-bench agent`, one client on a session
//!   URL obtained elsewhere.
//! - [`prom`]: looking series up in Prometheus text.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod compare;
pub mod prom;
pub mod ramp;
pub mod relay_process;
pub mod roles;
pub mod run;
