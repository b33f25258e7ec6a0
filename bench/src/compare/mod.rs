//! `relay-bench compare`: the same load against this relay, Janus's VideoRoom plugin and
//! a plain UDP fan-out forwarder (the machine's packet ceiling), one after the other in
//! one run, so that their CPU cost per forwarded packet can be compared as ratios
//! rather than as absolute times on a shared machine.
//!
//! - `relay`: [`crate::run::run`], unchanged.
//! - `janus`: [`janus::run`], Debian's `janus` started on loopback with a generated
//!   configuration, driven through its HTTP API with the same `webrtc` peers.
//! - `udp-ceiling`: [`ceiling::run`], RTP over plain UDP through a forwarder process
//!   using `recvmmsg`/`sendmmsg`, without ICE, DTLS or SRTP.
//!
//! Every target is reported in the shape of `run` ([`Report`]); what a target cannot do
//! (input events, masking: neither Janus nor the forwarder knows about them) is left at
//! zero and said in the table.

pub mod ceiling;
pub mod janus;

use clap::Args;
use serde::Serialize;

use crate::run::report::Report;
use crate::run::{RunArgs, RunError};

/// A target of `compare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompareTarget {
    /// This relay.
    Relay,
    /// Janus's VideoRoom plugin.
    Janus,
    /// The bench's own UDP fan-out forwarder.
    UdpCeiling,
}

impl CompareTarget {
    /// The `target` field of its report.
    pub fn name(self) -> &'static str {
        match self {
            CompareTarget::Relay => "relay",
            CompareTarget::Janus => "janus",
            CompareTarget::UdpCeiling => "udp-ceiling",
        }
    }
}

/// Options of `relay-bench compare`: the load of `run`, plus where Janus is.
#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// The load (sessions, agents, duration, fps, source...) and this relay's options.
    #[command(flatten)]
    pub run: RunArgs,
    /// The targets to measure, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "relay,janus,udp-ceiling"
    )]
    pub targets: Vec<CompareTarget>,
    /// The Janus binary (Debian: `apt-get install janus`).
    #[arg(long, value_name = "FILE", default_value = "/usr/bin/janus")]
    pub janus_bin: std::path::PathBuf,
    /// The `relay-bench` binary whose hidden `udp-forwarder` command is the
    /// udp-ceiling forwarder (default: this program, or `$RELAY_BENCH_BIN`).
    #[arg(long, value_name = "FILE")]
    pub forwarder_bin: Option<std::path::PathBuf>,
}

/// The result of `compare`: one report per target, and the ratios of this relay's CPU
/// per forwarded packet to the others'.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// One report per target, in the order run.
    pub runs: Vec<Report>,
    /// `relay` CPU µs per packet divided by the other target's (below 1: this relay is
    /// cheaper); absent when either figure is unknown.
    pub ratios: Ratios,
}

/// This relay's CPU per forwarded packet relative to the others.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    /// This relay / Janus.
    pub relay_over_janus: Option<f64>,
    /// This relay / the UDP ceiling.
    pub relay_over_udp_ceiling: Option<f64>,
}

/// Runs the load of `args` against every target of `args.targets`, in order.
pub async fn compare(args: &CompareArgs) -> Result<CompareReport, RunError> {
    let mut runs = Vec::new();
    for target in &args.targets {
        let report = match target {
            CompareTarget::Relay => crate::run::run(&args.run).await?,
            CompareTarget::Janus => janus::run(&args.run, &args.janus_bin).await?,
            CompareTarget::UdpCeiling => match &args.forwarder_bin {
                Some(bin) => ceiling::run_with(&args.run, bin).await?,
                None => ceiling::run(&args.run).await?,
            },
        };
        runs.push(report);
    }
    let per_packet = |name: &str| {
        runs.iter()
            .find(|r| r.target == name)
            .and_then(|r| r.relay.cpu_us_per_packet)
    };
    let ratio = |other: &str| match (per_packet("relay"), per_packet(other)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ratios = Ratios {
        relay_over_janus: ratio("janus"),
        relay_over_udp_ceiling: ratio("udp-ceiling"),
    };
    Ok(CompareReport { runs, ratios })
}

impl CompareReport {
    /// Each target's summary, then one line per target with its CPU per forwarded
    /// packet, and the ratios.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        for r in &self.runs {
            t.push_str(&r.table());
        }
        let _ = writeln!(t, "\ncompare: CPU per forwarded packet");
        let _ = writeln!(
            t,
            "  {:<12} {:>14} {:>12} {:>10} {:>10}",
            "target", "cpu us/packet", "packets", "lost", "p99 ms"
        );
        for r in &self.runs {
            let per = r
                .relay
                .cpu_us_per_packet
                .map_or("n/a".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(
                t,
                "  {:<12} {:>14} {:>12} {:>10} {:>10.2}",
                r.target, per, r.relay.packets_forwarded, r.frames.lost, r.latency_ms.p99
            );
        }
        let ratio = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}"));
        let _ = writeln!(
            t,
            "  relay/janus {}   relay/udp-ceiling {}   (below 1: this relay costs less)",
            ratio(self.ratios.relay_over_janus),
            ratio(self.ratios.relay_over_udp_ceiling)
        );
        t
    }
}
