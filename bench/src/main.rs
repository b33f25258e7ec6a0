//! `relay-bench`: the ops benchmark of the edge relay.
//!
//! `relay-bench run` drives sessions (a publishing customer, up to eight agents) against
//! a relay it starts (or one given with `--relay`) and reports frames, latency, input,
//! masking and the relay's CPU and memory; see `relay_bench::run`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay_bench::compare::ceiling::forwarder::{ForwarderArgs, serve as serve_udp_forwarder};
use relay_bench::compare::{CompareArgs, compare};
use relay_bench::ramp::{RampArgs, ramp};
use relay_bench::roles::{AgentArgs, CustomerArgs, run_agent, run_customer};
use relay_bench::run::{RunArgs, run};

/// Benchmark and load generator for the edge relay.
#[derive(Debug, Parser)]
#[command(name = "relay-bench", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive sessions against a relay and report what the agents and customers saw.
    ///
    /// Starts target/release/relay (unless --relay URL is given), opens --sessions
    /// sessions of --agents agents (host with control sending input, masked agents,
    /// view-only agents sending input the relay must refuse, watchers) and a customer
    /// publishing the VP8 screen fixture, measures for --duration seconds, then prints
    /// a summary and writes --json FILE.
    Run(RunArgs),
    /// Run with 1, 2, 3... sessions (--sessions, --step, --max-sessions) until an
    /// objective breaks: a frame lost by a healthy agent, latency p99 over --max-p99-ms,
    /// relay CPU over --max-cpu of the cores. Prints the capacity, writes --chart (SVG)
    /// and --json (every step's report).
    Ramp(RampArgs),
    /// Run the same load against this relay, Janus's VideoRoom plugin (started on
    /// loopback from --janus-bin) and a plain UDP fan-out forwarder (the machine's
    /// packet ceiling), one after the other; print each one's CPU per forwarded packet
    /// and the ratios, write --json ({"runs": [...], "ratios": {...}}).
    Compare(CompareArgs),
    /// Join a session as its customer (WebSocket URL from `POST /v1/join`) and publish
    /// frames for --duration seconds, then report.
    Customer(CustomerArgs),
    /// Join a session as an agent (WebSocket URL from an accepted invitation or a new
    /// session), receive and check frames, optionally send input; exits 1 when the
    /// stream was not clean.
    Agent(AgentArgs),
    /// The plain UDP fan-out forwarder of `compare --targets udp-ceiling`, which starts
    /// it as its own process.
    #[command(hide = true)]
    UdpForwarder(ForwarderArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::UdpForwarder(args) => serve_udp_forwarder(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Command::Run(args) => run_and_report(&args).await,
        Command::Ramp(args) => ramp_and_report(&args).await,
        Command::Compare(args) => compare_and_report(&args).await,
        Command::Customer(args) => run_customer(&args)
            .await
            .map(|report| {
                println!("{report}");
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::Agent(args) => run_agent(&args)
            .await
            .map(|(report, clean)| {
                println!("{report}");
                if clean {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            })
            .map_err(anyhow::Error::from),
    };
    result.unwrap_or_else(|e| {
        eprintln!("relay-bench: {e:#}");
        ExitCode::from(2)
    })
}

async fn ramp_and_report(args: &RampArgs) -> anyhow::Result<ExitCode> {
    let report = ramp(args).await?;
    print!("{}", report.table());
    report
        .draw_chart(&args.chart)
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", args.chart.display()))?;
    println!("chart: {}", args.chart.display());
    if let Some(path) = &args.run.json {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn compare_and_report(args: &CompareArgs) -> anyhow::Result<ExitCode> {
    let report = compare(args).await?;
    print!("{}", report.table());
    if let Some(path) = &args.run.json {
        let json = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    let failures: Vec<String> = report
        .runs
        .iter()
        .flat_map(|r| {
            r.failures()
                .into_iter()
                .map(|f| format!("{}: {f}", r.target))
        })
        .collect();
    for f in &failures {
        eprintln!("relay-bench: {f}");
    }
    Ok(if args.run.check && !failures.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn run_and_report(args: &RunArgs) -> anyhow::Result<ExitCode> {
    let report = run(args).await?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let failures = report.failures();
    for f in &failures {
        eprintln!("relay-bench: {f}");
    }
    Ok(if args.check && !failures.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
