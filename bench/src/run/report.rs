//! The result of a run: the JSON document ops scripts read (its keys are stable: add,
//! never rename) and the summary table printed at the end.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Everything a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What was measured: `relay` (this relay).
    pub target: String,
    /// Sessions run side by side.
    pub sessions: u32,
    /// Agents in each session (host included).
    pub agents_per_session: u32,
    /// Length of the measured window, in seconds.
    pub duration_s: f64,
    /// Frames of the healthy agents.
    pub frames: Frames,
    /// Per-frame latency, customer's send to agent's complete receipt.
    pub latency_ms: Latency,
    /// From an agent's join to its first complete frame.
    pub first_frame_ms: Quantiles,
    /// From an agent's join to its peer connection being up (part of `first_frame_ms`).
    pub connect_ms: Quantiles,
    /// Input events.
    pub input: Input,
    /// Messages the customers received that name or identify a masked agent.
    pub masked_leaks: u64,
    /// Agents told to stop reading (`--slow-agents`), kept out of `frames`.
    pub slow_agents: SlowAgents,
    /// Agents that left and came back during the window (`--churn-agents`), kept out of
    /// `frames`.
    pub churn: Churn,
    /// The relay process.
    pub relay: RelayUsage,
    /// What the relay recorded (`run --record`, or a relay that records anyway);
    /// `null` when it recorded nothing.
    pub recording: Option<RecordingUsage>,
}

/// What the relay's recordings took, from its metrics, over the whole run (the
/// recordings are finished before they are read).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecordingUsage {
    /// Records before compression (`relay_recording_bytes_total{stage="raw"}`).
    pub raw_bytes: u64,
    /// Container bytes written, compressed, before encryption
    /// (`relay_recording_bytes_total{stage="compressed"}`).
    pub compressed_bytes: u64,
    /// `raw_bytes / compressed_bytes`.
    pub compression_ratio: Option<f64>,
    /// Video frames left out of the recordings, for any reason.
    pub frames_dropped: u64,
    /// Recordings cut short by a write error.
    pub write_errors: u64,
    /// Recordings still being written when they were read (0 unless the relay was slow
    /// to finish them).
    pub unfinished: u64,
}

/// Frame counts over all healthy agents.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Frames {
    /// Frames the customers published in the window.
    pub sent: u64,
    /// Sum over healthy agents of the frames each should have got.
    pub expected: u64,
    /// Sum over healthy agents of the frames each got whole.
    pub received: u64,
    /// `expected - received`.
    pub lost: u64,
    /// Frames that arrived after a later frame.
    pub out_of_order: u64,
    /// Frames that match nothing a customer sent.
    pub corrupt: u64,
}

/// Latency quantiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

/// Two quantiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Quantiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// Input events from agents to customers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Input {
    /// Events the control agents sent.
    pub sent: u64,
    /// Of those, events the customers received.
    pub delivered: u64,
    /// Events from view-only agents the relay refused (its own counter).
    pub refused_view_only: u64,
    /// Events from view-only agents that reached a customer (must be 0).
    pub leaked_view_only: u64,
    /// Control agents' events that arrived after a later one.
    pub out_of_order: u64,
    /// Send to receipt.
    pub latency_ms: Quantiles,
}

/// Agents that stopped reading.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlowAgents {
    /// How many.
    pub count: u64,
    /// Frames they got in total.
    pub frames_received: u64,
}

/// Agents that left and came back, again and again.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Churn {
    /// How many agents churned.
    pub agents: u64,
    /// Times they came back.
    pub rejoins: u64,
    /// Comebacks that failed (no connection, or no frame within the wait).
    pub failed: u64,
    /// From a comeback's start to its first complete frame.
    pub first_frame_ms: Quantiles,
    /// Frames they received whole in all.
    pub frames_received: u64,
    /// Of those, frames out of order or matching nothing sent (must be 0).
    pub broken: u64,
    /// Why a comeback failed, the last time one did.
    pub last_error: Option<String>,
}

/// What the relay process used during the window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RelayUsage {
    /// CPU seconds (user + system) during the window; `null` when unknown.
    pub cpu_seconds: Option<f64>,
    /// Peak resident memory of the process, in bytes; `null` when unknown.
    pub rss_peak_bytes: Option<u64>,
    /// RTP packets the relay forwarded during the window (its own counter).
    pub packets_forwarded: u64,
    /// `cpu_seconds` per forwarded packet, in microseconds.
    pub cpu_us_per_packet: Option<f64>,
    /// Resident memory the sessions added, divided by the number of sessions.
    pub bytes_per_session: Option<u64>,
    /// Bytes of media over ICE-TCP during the window (both directions, framing
    /// included); `null` when the relay has no ICE-TCP port.
    pub ice_tcp_bytes: Option<u64>,
    /// Resident memory through the window (a relay the bench started); `null`
    /// otherwise.
    pub rss_trend: Option<RssTrend>,
}

/// Resident memory of the relay through the window, to tell a leak (growing to the
/// end) from a plateau (settled after the warm-up).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RssTrend {
    /// `[seconds into the window, bytes]`, evenly spaced.
    pub samples: Vec<(f64, u64)>,
    /// Median of the samples of the window's second quarter (after the warm-up).
    pub settled_bytes: u64,
    /// Median of the samples of its last quarter.
    pub end_bytes: u64,
    /// `end_bytes - settled_bytes` (negative: it shrank).
    pub growth_bytes: i64,
}

impl RssTrend {
    /// From samples in time order; `None` with fewer than 4 (no quarters to compare).
    pub fn from_samples(samples: Vec<(f64, u64)>) -> Option<RssTrend> {
        let n = samples.len();
        if n < 4 {
            return None;
        }
        let median = |part: &[(f64, u64)]| {
            let mut v: Vec<u64> = part.iter().map(|s| s.1).collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        let settled_bytes = median(&samples[n / 4..n / 2]);
        let end_bytes = median(&samples[n - n / 4..]);
        Some(RssTrend {
            settled_bytes,
            end_bytes,
            growth_bytes: end_bytes as i64 - settled_bytes as i64,
            samples,
        })
    }
}

/// `p50`/`p99`/`p999`/`max` of a microsecond histogram, in milliseconds.
pub fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: ms(h.value_at_quantile(0.5)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// `p50`/`p99` of a microsecond histogram, in milliseconds.
pub fn quantiles(h: &Histogram<u64>) -> Quantiles {
    if h.is_empty() {
        return Quantiles::default();
    }
    Quantiles {
        p50: ms(h.value_at_quantile(0.5)),
        p99: ms(h.value_at_quantile(0.99)),
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Report {
    /// The report of a target that only forwards media (Janus, the UDP ceiling): its
    /// frames and latencies from `totals`; no input, masking, slow agents, churn or
    /// recording to speak of.
    pub fn media_only(
        target: &str,
        args: &crate::run::RunArgs,
        window: std::time::Duration,
        totals: &crate::run::session::Totals,
        relay: RelayUsage,
    ) -> Report {
        Report {
            target: target.to_owned(),
            sessions: args.sessions,
            agents_per_session: args.agents,
            duration_s: window.as_secs_f64(),
            latency_ms: latency(&totals.latency),
            first_frame_ms: quantiles(&totals.first_frame),
            connect_ms: quantiles(&totals.connect),
            input: Input::default(),
            frames: totals.frames.clone(),
            masked_leaks: 0,
            slow_agents: SlowAgents::default(),
            relay,
            recording: None,
            churn: Churn::default(),
        }
    }

    /// Writes the report as pretty JSON to `path`.
    pub fn write_json(&self, path: &std::path::Path) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(path, json + "\n")
    }

    /// Whether the run met the relay's promises: every frame reached every healthy agent
    /// whole and in order, no masked agent leaked, input from control agents arrived and
    /// none from view-only agents did. The reasons it did not, otherwise.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let f = &self.frames;
        if f.expected == 0 {
            out.push("no frame was expected: nothing was measured".to_owned());
        }
        if f.received != f.expected || f.lost > 0 {
            out.push(format!(
                "frames: {} of {} received, {} lost",
                f.received, f.expected, f.lost
            ));
        }
        if f.out_of_order > 0 || f.corrupt > 0 {
            out.push(format!(
                "frames: {} out of order, {} corrupt",
                f.out_of_order, f.corrupt
            ));
        }
        if self.churn.broken > 0 {
            out.push(format!(
                "churn: {} frames out of order or corrupt",
                self.churn.broken
            ));
        }
        if self.churn.failed > 0 {
            out.push(format!(
                "churn: {} of {} comebacks failed ({})",
                self.churn.failed,
                self.churn.rejoins + self.churn.failed,
                self.churn.last_error.as_deref().unwrap_or("?")
            ));
        }
        if self.masked_leaks > 0 {
            out.push(format!(
                "{} messages leaked a masked agent",
                self.masked_leaks
            ));
        }
        let i = &self.input;
        // Input events and masking are this relay's; the other targets of `compare`
        // carry no input.
        if self.target != "relay" {
            return out;
        }
        if i.sent == 0 || i.delivered != i.sent {
            out.push(format!("input: {} of {} delivered", i.delivered, i.sent));
        }
        if i.leaked_view_only > 0 || i.out_of_order > 0 {
            out.push(format!(
                "input: {} view-only events delivered, {} out of order",
                i.leaked_view_only, i.out_of_order
            ));
        }
        out
    }

    /// The summary table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let f = &self.frames;
        let l = &self.latency_ms;
        let i = &self.input;
        let r = &self.relay;
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.3}{unit}"));
        let _ = writeln!(
            t,
            "target {}: {} sessions x {} agents, {:.1} s",
            self.target, self.sessions, self.agents_per_session, self.duration_s
        );
        let rows: [(&str, String); 13] = [
            (
                "frames",
                format!(
                    "sent {}  expected {}  received {}  lost {}  out of order {}  corrupt {}",
                    f.sent, f.expected, f.received, f.lost, f.out_of_order, f.corrupt
                ),
            ),
            (
                "latency",
                format!(
                    "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
                    l.p50, l.p99, l.p999, l.max
                ),
            ),
            (
                "first frame",
                format!(
                    "p50 {:.1} ms  p99 {:.1} ms",
                    self.first_frame_ms.p50, self.first_frame_ms.p99
                ),
            ),
            (
                "connect",
                format!(
                    "p50 {:.1} ms  p99 {:.1} ms",
                    self.connect_ms.p50, self.connect_ms.p99
                ),
            ),
            (
                "input",
                format!(
                    "sent {}  delivered {}  refused (view-only) {}  leaked {}  p50 {:.2} ms  p99 {:.2} ms",
                    i.sent,
                    i.delivered,
                    i.refused_view_only,
                    i.leaked_view_only,
                    i.latency_ms.p50,
                    i.latency_ms.p99
                ),
            ),
            ("masked leaks", self.masked_leaks.to_string()),
            (
                "slow agents",
                format!(
                    "{} (frames received {})",
                    self.slow_agents.count, self.slow_agents.frames_received
                ),
            ),
            (
                "churn",
                format!(
                    "{} agents, {} comebacks ({} failed), first frame p50 {:.1} ms  p99 {:.1} ms",
                    self.churn.agents,
                    self.churn.rejoins,
                    self.churn.failed,
                    self.churn.first_frame_ms.p50,
                    self.churn.first_frame_ms.p99
                ),
            ),
            (
                "relay cpu",
                format!(
                    "{}  ({} per packet, {} packets)",
                    opt(r.cpu_seconds, " s"),
                    opt(r.cpu_us_per_packet, " us"),
                    r.packets_forwarded
                ),
            ),
            (
                "media over tcp",
                r.ice_tcp_bytes
                    .map_or("n/a (no ICE-TCP port)".to_owned(), |b| {
                        format!("{:.1} MiB", b as f64 / 1048576.0)
                    }),
            ),
            (
                "relay rss peak",
                r.rss_peak_bytes.map_or("n/a".to_owned(), |b| {
                    format!("{:.1} MiB", b as f64 / 1048576.0)
                }),
            ),
            (
                "relay rss trend",
                r.rss_trend.as_ref().map_or("n/a".to_owned(), |t| {
                    format!(
                        "{:.1} MiB settled, {:.1} MiB at the end ({:+.1} MiB)",
                        t.settled_bytes as f64 / 1048576.0,
                        t.end_bytes as f64 / 1048576.0,
                        t.growth_bytes as f64 / 1048576.0
                    )
                }),
            ),
            (
                "per session",
                r.bytes_per_session.map_or("n/a".to_owned(), |b| {
                    format!("{:.1} KiB", b as f64 / 1024.0)
                }),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(t, "  {k:<15} {v}");
        }
        if let Some(rec) = &self.recording {
            let _ = writeln!(
                t,
                "  {:<15} {:.1} MiB raw, {:.1} MiB compressed (ratio {}), {} frames dropped, {} write errors",
                "recording",
                rec.raw_bytes as f64 / 1048576.0,
                rec.compressed_bytes as f64 / 1048576.0,
                rec.compression_ratio
                    .map_or("n/a".to_owned(), |r| format!("{r:.2}")),
                rec.frames_dropped,
                rec.write_errors
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_trend_compares_the_settled_quarter_with_the_last() {
        let flat: Vec<(f64, u64)> = (0..8u32)
            .map(|i| (f64::from(i), 100 + u64::from(i % 2)))
            .collect();
        let t = RssTrend::from_samples(flat).unwrap();
        assert_eq!(
            (t.settled_bytes, t.end_bytes, t.growth_bytes),
            (101, 101, 0)
        );
        let leak: Vec<(f64, u64)> = (0..8u32)
            .map(|i| (f64::from(i), 100 + 10 * u64::from(i)))
            .collect();
        let t = RssTrend::from_samples(leak).unwrap();
        assert_eq!(
            (t.settled_bytes, t.end_bytes, t.growth_bytes),
            (130, 170, 40)
        );
        assert_eq!(RssTrend::from_samples(vec![(0.0, 1); 3]), None);
    }
}
