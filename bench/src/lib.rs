//! `relay-bench`: a native client library for the edge relay, and (in the binary) the
//! relay's load generator and benchmark.
//!
//! The library is [`client`]: a customer that publishes encoded frames over one WebRTC
//! peer connection with the relay, agents that receive them and send input events, and
//! the session-WebSocket signalling they both speak. The end-to-end tests in `tests/`
//! use it as real peers; the benchmark drives many of them.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod client;
