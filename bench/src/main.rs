//! `relay-bench`: the ops benchmark of the edge relay.
//!
//! It will drive real sessions (a publishing customer, up to eight agents) against a
//! relay and a peer relay side by side and report latency, loss and the relay's CPU and
//! memory. The media plane it measures does not exist yet, so for now the binary only
//! says so; the benchmark issue fills it in.

use std::process::ExitCode;

use clap::Parser;

/// Benchmark for the edge relay (not implemented yet: it needs the media plane).
#[derive(Debug, Parser)]
#[command(name = "relay-bench", version, about)]
struct Cli {}

fn main() -> ExitCode {
    let _ = Cli::parse();
    eprintln!(
        "relay-bench: no benchmark yet; it arrives with the media plane (see the issue tracker)"
    );
    ExitCode::FAILURE
}
