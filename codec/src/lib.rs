//! Pure wire and storage formats of the edge relay.
//!
//! This crate holds the formats that cross a process boundary, and nothing else:
//! no sockets, no tasks, no clocks, no files. Every parser takes bytes and returns a
//! typed value or a typed error, so each one can be fuzzed and property-tested alone.
//!
//! - [`wire`]: the JSON signalling messages spoken over the relay's HTTP API and
//!   WebSockets, with the stable error codes clients match on.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod wire;
