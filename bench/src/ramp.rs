//! `relay-bench ramp`: `relay-bench run` with more and more sessions until a service
//! level objective breaks, to find how many sessions a node carries.
//!
//! Each step starts a fresh relay (so no step inherits another's state) and runs the
//! same workload as `run` with N sessions. A step passes when healthy agents lost no
//! frame, frame latency p99 stayed under `--max-p99-ms` and the relay's CPU stayed under
//! `--max-cpu` of the machine's cores. The capacity is the last passing step. The bench
//! measures its own CPU too: when the load generator itself is near the machine's limit,
//! the breaking point may be the bench's, and the report says so.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use plotters::prelude::*;
use serde::Serialize;

use crate::relay_process::ProcStats;
use crate::run::report::Report;
use crate::run::{RunArgs, RunError, run};

/// Options of `relay-bench ramp`.
#[derive(Debug, Clone, Args)]
pub struct RampArgs {
    /// The workload of each step; its --sessions is the first step.
    #[command(flatten)]
    pub run: RunArgs,
    /// Sessions added at each step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub step: u32,
    /// Stop after this many sessions even if nothing broke.
    #[arg(long, default_value_t = 32)]
    pub max_sessions: u32,
    /// Objective: frame latency p99 under this many milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    /// Objective: relay CPU under this share of the machine's cores (0.9 = 90%).
    #[arg(long, default_value_t = 0.9)]
    pub max_cpu: f64,
    /// Write the chart of latency, loss and CPU against sessions here (SVG).
    #[arg(long, value_name = "FILE", default_value = "ramp.svg")]
    pub chart: PathBuf,
}

/// One step of the ramp.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The `run` report of the step.
    pub report: Report,
    /// Relay CPU over the window as a share of the machine's cores.
    pub relay_cpu_share: Option<f64>,
    /// The bench's own CPU over the step as a share of the machine's cores.
    pub bench_cpu_share: Option<f64>,
    /// Objectives the step broke (empty: it passed).
    pub broken: Vec<String>,
}

/// What a ramp found.
#[derive(Debug, Clone, Serialize)]
pub struct RampReport {
    /// Cores of the machine.
    pub cores: usize,
    /// The objectives.
    pub slo: Slo,
    /// Every step run, in order.
    pub steps: Vec<Step>,
    /// The most sessions that met every objective (0: even the first step broke one).
    pub capacity_sessions: u32,
    /// Whether the bench itself used most of the machine at the breaking point, so the
    /// capacity may be the load generator's rather than the relay's.
    pub load_generator_bound: bool,
}

/// The service level objectives of a ramp.
#[derive(Debug, Clone, Serialize)]
pub struct Slo {
    /// Frames lost by healthy agents must be 0.
    pub max_lost_frames: u64,
    /// Frame latency p99, milliseconds.
    pub max_p99_ms: f64,
    /// Relay CPU, share of the machine's cores.
    pub max_cpu_share: f64,
}

impl Slo {
    /// The objectives `report` broke, given the relay's CPU share of `cores`.
    pub fn broken_by(
        &self,
        report: &Report,
        relay_cpu_share: Option<f64>,
        cores: usize,
    ) -> Vec<String> {
        let mut broken = Vec::new();
        if report.frames.lost > self.max_lost_frames || report.frames.expected == 0 {
            broken.push(format!(
                "{} frames lost of {}",
                report.frames.lost, report.frames.expected
            ));
        }
        if report.latency_ms.p99 >= self.max_p99_ms {
            broken.push(format!(
                "latency p99 {:.1} ms >= {} ms",
                report.latency_ms.p99, self.max_p99_ms
            ));
        }
        if let Some(share) = relay_cpu_share.filter(|s| *s >= self.max_cpu_share) {
            broken.push(format!(
                "relay CPU {:.0}% >= {:.0}% of {cores} cores",
                share * 100.0,
                self.max_cpu_share * 100.0
            ));
        }
        broken
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs the ramp `args` describes.
pub async fn ramp(args: &RampArgs) -> Result<RampReport, RunError> {
    if args.run.relay.is_some() {
        return Err(RunError::Options(
            "ramp starts a relay per step; it cannot use --relay".into(),
        ));
    }
    if !(args.max_cpu > 0.0 && args.max_cpu <= 1.0) {
        return Err(RunError::Options(format!(
            "--max-cpu must be in (0, 1] (got {})",
            args.max_cpu
        )));
    }
    let cores = cores();
    let slo = Slo {
        max_lost_frames: 0,
        max_p99_ms: args.max_p99_ms,
        max_cpu_share: args.max_cpu,
    };
    let mut steps: Vec<Step> = Vec::new();
    let mut sessions = args.run.sessions;
    let mut capacity = 0;
    while sessions <= args.max_sessions {
        let mut step_args = args.run.clone();
        step_args.sessions = sessions;
        step_args.json = None;
        step_args.check = false;
        let me_before = ProcStats::read(std::process::id()).ok();
        let started = Instant::now();
        let report = run(&step_args).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let bench_cpu_share = match (me_before, ProcStats::read(std::process::id()).ok()) {
            (Some(a), Some(b)) if elapsed > 0.0 => {
                Some((b.cpu_seconds - a.cpu_seconds) / elapsed / cores as f64)
            }
            _ => None,
        };
        let relay_cpu_share = report
            .relay
            .cpu_seconds
            .map(|c| c / report.duration_s / cores as f64);
        let broken = slo.broken_by(&report, relay_cpu_share, cores);
        eprintln!(
            "ramp: {sessions} sessions: {}",
            if broken.is_empty() {
                "ok".to_owned()
            } else {
                broken.join("; ")
            }
        );
        let passed = broken.is_empty();
        steps.push(Step {
            report,
            relay_cpu_share,
            bench_cpu_share,
            broken,
        });
        if !passed {
            break;
        }
        capacity = sessions;
        sessions += args.step;
    }
    let load_generator_bound = steps
        .last()
        .and_then(|s| s.bench_cpu_share)
        .is_some_and(|s| s >= 0.9 * (1.0 - 1.0 / cores as f64).max(0.5));
    Ok(RampReport {
        cores,
        slo,
        steps,
        capacity_sessions: capacity,
        load_generator_bound,
    })
}

impl RampReport {
    /// The summary printed at the end.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:>8} {:>10} {:>9} {:>9} {:>8} {:>10} {:>9}  result\n",
            "sessions", "frames", "lost", "p99 ms", "max ms", "relay cpu", "bench cpu"
        );
        let pct = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{:.0}%", v * 100.0));
        for s in &self.steps {
            let r = &s.report;
            out.push_str(&format!(
                "{:>8} {:>10} {:>9} {:>9.2} {:>8.1} {:>10} {:>9}  {}\n",
                r.sessions,
                r.frames.received,
                r.frames.lost,
                r.latency_ms.p99,
                r.latency_ms.max,
                pct(s.relay_cpu_share),
                pct(s.bench_cpu_share),
                if s.broken.is_empty() {
                    "ok".to_owned()
                } else {
                    s.broken.join("; ")
                }
            ));
        }
        out.push_str(&format!(
            "capacity: {} sessions (objectives: no frame lost, p99 < {} ms, relay CPU < {:.0}% of {} cores){}\n",
            self.capacity_sessions,
            self.slo.max_p99_ms,
            self.slo.max_cpu_share * 100.0,
            self.cores,
            if self.load_generator_bound {
                "; the bench itself used most of the machine at the end, so this is a lower bound"
            } else {
                ""
            }
        ));
        out
    }

    /// Draws latency p99, lost frames and relay CPU against sessions, one panel each.
    pub fn draw_chart(&self, path: &std::path::Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (800, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let panels = root.split_evenly((3, 1));
        let xs: Vec<u32> = self.steps.iter().map(|s| s.report.sessions).collect();
        let x_max = xs.iter().copied().max().unwrap_or(1) + 1;
        let series: [(&str, Vec<f64>, RGBColor); 3] = [
            (
                "frame latency p99 (ms)",
                self.steps.iter().map(|s| s.report.latency_ms.p99).collect(),
                BLUE,
            ),
            (
                "frames lost by healthy agents",
                self.steps
                    .iter()
                    .map(|s| s.report.frames.lost as f64)
                    .collect(),
                RED,
            ),
            (
                "relay CPU (% of all cores)",
                self.steps
                    .iter()
                    .map(|s| s.relay_cpu_share.unwrap_or(0.0) * 100.0)
                    .collect(),
                GREEN,
            ),
        ];
        for (panel, (title, ys, color)) in panels.iter().zip(series) {
            let y_max = ys.iter().copied().fold(1.0f64, f64::max) * 1.15;
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 20))
                .margin(10)
                .x_label_area_size(35)
                .y_label_area_size(55)
                .build_cartesian_2d(0u32..x_max, 0f64..y_max)
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("sessions")
                .draw()
                .map_err(|e| e.to_string())?;
            let points: Vec<(u32, f64)> = xs.iter().copied().zip(ys).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::report::{Frames, Input, Latency, Quantiles, RelayUsage, SlowAgents};

    fn report(sessions: u32, expected: u64, lost: u64, p99: f64) -> Report {
        Report {
            target: "relay".into(),
            sessions,
            agents_per_session: 8,
            duration_s: 10.0,
            frames: Frames {
                sent: expected / 8,
                expected,
                received: expected - lost,
                lost,
                out_of_order: 0,
                corrupt: 0,
            },
            latency_ms: Latency {
                p50: 1.0,
                p99,
                p999: p99,
                max: p99,
            },
            first_frame_ms: Quantiles::default(),
            connect_ms: Quantiles::default(),
            input: Input::default(),
            masked_leaks: 0,
            slow_agents: SlowAgents::default(),
            relay: RelayUsage::default(),
            recording: None,
            churn: Default::default(),
        }
    }

    fn slo() -> Slo {
        Slo {
            max_lost_frames: 0,
            max_p99_ms: 50.0,
            max_cpu_share: 0.9,
        }
    }

    #[test]
    fn each_objective_breaks_on_its_own() {
        assert!(
            slo()
                .broken_by(&report(1, 1200, 0, 10.0), Some(0.2), 2)
                .is_empty()
        );
        let lost = slo().broken_by(&report(1, 1200, 3, 10.0), Some(0.2), 2);
        assert_eq!(lost, vec!["3 frames lost of 1200".to_owned()]);
        let slow = slo().broken_by(&report(1, 1200, 0, 50.0), Some(0.2), 2);
        assert_eq!(slow, vec!["latency p99 50.0 ms >= 50 ms".to_owned()]);
        let busy = slo().broken_by(&report(1, 1200, 0, 10.0), Some(0.95), 2);
        assert_eq!(busy, vec!["relay CPU 95% >= 90% of 2 cores".to_owned()]);
        // Nothing measured is not a pass.
        assert_eq!(slo().broken_by(&report(1, 0, 0, 0.0), None, 2).len(), 1);
    }

    #[test]
    fn the_chart_has_a_panel_per_figure() {
        let steps = [(1, 10.0, 0.1), (2, 20.0, 0.3), (3, 70.0, 0.6)]
            .into_iter()
            .map(|(n, p99, cpu)| Step {
                report: report(n, 1000, 0, p99),
                relay_cpu_share: Some(cpu),
                bench_cpu_share: Some(0.2),
                broken: Vec::new(),
            })
            .collect();
        let ramp = RampReport {
            cores: 2,
            slo: slo(),
            steps,
            capacity_sessions: 2,
            load_generator_bound: false,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ramp.svg");
        ramp.draw_chart(&path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for title in ["frame latency p99", "frames lost", "relay CPU"] {
            assert!(svg.contains(title), "{title} missing");
        }
        assert!(ramp.table().contains("capacity: 2 sessions"));
    }
}
