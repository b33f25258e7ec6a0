//! `relay-bench run`: drive N sessions of one publishing customer and K agents against a
//! relay (started here, or already running), and measure what users and ops care about.
//!
//! The order of a run:
//!
//! 1. the relay: [`LocalRelay::spawn`] of `target/release/relay` (or `--relay URL`);
//! 2. set-up, all sessions at once ([`session::open`]): the host opens the session,
//!    invites the other agents (the mix of [`session::agent_mix`]), they accept, the
//!    customer joins with the support key and publishes, then the agents connect;
//! 3. the window (`--duration`): slow agents stop reading, the host sends input at
//!    `--input-hz`, view-only agents at a tenth of it; the relay's CPU and forwarded
//!    packets are read at both ends of the window;
//! 4. drain: publishing goes on until every healthy agent has the last frame of the
//!    window and the customer every input event (at most [`DRAIN_LIMIT`]), then everyone
//!    leaves;
//! 5. scoring ([`session::BenchSession::score`]) into a [`Report`].

pub mod measure;
pub mod report;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::RelayApi;
use crate::client::{FrameSource, IceTransport, insecure_tls, tls_trusting_pem};
use crate::prom::metric_value;
use crate::relay_process::{LocalRelay, ProcStats, default_relay_binary};
use report::{RelayUsage, Report};
use session::{BenchSession, SessionPlan, Totals};

/// The screen recording published by default: the VP8 fixture of the end-to-end tests
/// (60 frames of screen-like content, keyframes at 0 and 30), looped.
pub const DEFAULT_SOURCE: &[u8] = include_bytes!("../../../tests/fixtures/screen-vp8.ivf");

/// Longest wait, after the window, for the last frames and input events to arrive.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Most agents a session may hold (the relay's limit).
pub const MAX_AGENTS: u32 = 8;

/// Options of `relay-bench run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Sessions to run side by side.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub sessions: u32,
    /// Agents per session, host included (1 to 8).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub agents: u32,
    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Frames per second each customer publishes.
    #[arg(long, default_value_t = 15.0)]
    pub fps: f64,
    /// Encoded frames to publish, looped: an IVF file (VP8, VP9, AV1) or H.264 Annex B
    /// (`.h264`/`.264`). Default: the committed VP8 screen fixture.
    #[arg(long, value_name = "FILE", conflicts_with = "synthetic_size")]
    pub source: Option<PathBuf>,
    /// Publish synthetic frames of this many bytes instead of a file.
    #[arg(long, value_name = "BYTES")]
    pub synthetic_size: Option<usize>,
    /// With --synthetic-size: a keyframe every this many frames.
    #[arg(long, default_value_t = 30)]
    pub keyframe_interval: u64,
    /// Masked agents per session (after the host).
    #[arg(long, default_value_t = 1)]
    pub masked: u32,
    /// View-only agents per session (after the masked ones); they send input the relay
    /// must refuse.
    #[arg(long, default_value_t = 1)]
    pub view_only: u32,
    /// Agents per session that stop reading when the window starts (the last ones;
    /// never the host); they are reported apart and do not count as loss.
    #[arg(long, default_value_t = 0)]
    pub slow_agents: u32,
    /// Agents per session that leave and come back during the window, again and again
    /// (the last watchers before the slow ones; never the host, a masked or a view-only
    /// agent): each reconnects with its credentials after `--churn-interval`, and is
    /// reported apart (`churn`); the others must lose nothing meanwhile.
    #[arg(long, default_value_t = 0)]
    pub churn_agents: u32,
    /// Seconds a churning agent stays connected before it leaves (and comes straight
    /// back).
    #[arg(long, default_value_t = 2.0)]
    pub churn_interval: f64,
    /// Input events per second from each host (0: none).
    #[arg(long, default_value_t = 60.0)]
    pub input_hz: f64,
    /// A relay already running (`https://host:port`); by default one is started.
    #[arg(long, value_name = "URL")]
    pub relay: Option<String>,
    /// With --relay: file holding its HS256 token secret (for the agents' tokens).
    #[arg(long, value_name = "FILE", requires = "relay")]
    pub secret_file: Option<PathBuf>,
    /// With --relay: PEM certificate to trust (otherwise --insecure is needed for a
    /// self-signed one).
    #[arg(long, value_name = "FILE", requires = "relay")]
    pub ca: Option<PathBuf>,
    /// With --relay: accept any certificate.
    #[arg(long, requires = "relay")]
    pub insecure: bool,
    /// With --relay: its operations listener (`ops.listen`), where `/metrics` is.
    #[arg(long, value_name = "URL", requires = "relay", default_value = crate::api::DEFAULT_OPS_URL)]
    pub metrics: String,
    /// With --relay: file holding the bearer token its `/metrics` needs
    /// (`ops.token_file`), if it needs one.
    #[arg(long, value_name = "FILE", requires = "relay")]
    pub metrics_token_file: Option<PathBuf>,
    /// Relay binary to start (default: `relay` next to this program, else
    /// target/release/relay).
    #[arg(long, value_name = "FILE", conflicts_with = "relay")]
    pub relay_bin: Option<PathBuf>,
    /// Configuration file for the relay it starts.
    #[arg(long, value_name = "FILE", conflicts_with = "relay")]
    pub relay_config: Option<PathBuf>,
    /// Have the relay it starts record every session: a fresh review key for the
    /// bench's portal is added to its configuration (the key's identity is thrown
    /// away: the recordings are only measured). The report's `recording` then holds the
    /// bytes recorded and the compression ratio.
    #[arg(long, conflicts_with = "relay")]
    pub record: bool,
    /// The transports the clients' ICE may use: `tcp` forces ICE-TCP, as clients behind
    /// a UDP block (the relay it starts then gets a free `media.ice_tcp_port`; a relay
    /// given with --relay needs one configured). The report's `relay.ice_tcp_bytes`
    /// says how much media went over TCP.
    #[arg(long, value_enum, default_value_t = IceTransport::Any)]
    pub ice_transport: IceTransport,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Exit with status 1 when a frame was lost, a masked agent leaked or input went
    /// astray (see the summary).
    #[arg(long)]
    pub check: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Why a run could not be completed (as opposed to a run that measured a problem).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The options do not make sense.
    #[error("{0}")]
    Options(String),
    /// The relay could not be started or measured.
    #[error(transparent)]
    Process(#[from] crate::relay_process::ProcessError),
    /// A session could not be set up.
    #[error("set-up: {0}")]
    Setup(String),
    /// The relay's API or metrics failed.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// A source file could not be read.
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    /// Reading a file failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The relay a run measures.
enum Target {
    Local(LocalRelay),
    Remote,
}

impl Target {
    fn pid(&self) -> Option<u32> {
        match self {
            Target::Local(r) => Some(r.pid()),
            Target::Remote => None,
        }
    }
}

/// CPU and memory of the relay at one moment, from `/proc` or its metrics.
#[derive(Debug, Clone, Default)]
struct Usage {
    cpu_seconds: Option<f64>,
    rss_bytes: Option<u64>,
    rss_peak_bytes: Option<u64>,
    packets_forwarded: f64,
    refused_view_only: f64,
    /// Bytes over ICE-TCP (both directions); `None` when the relay has no ICE-TCP port.
    ice_tcp_bytes: Option<f64>,
    /// The metrics text it was read from.
    metrics: String,
}

/// Longest wait, after the sessions ended, for their recordings to be finished.
const RECORDINGS_FINISH_LIMIT: Duration = Duration::from_secs(15);

/// A configuration file for the relay: `base` (if any) with, if `record`, recording
/// enabled and a fresh review key for the bench's portal, and with `ice_tcp_port` (if
/// any) as `media.ice_tcp_port`.
fn relay_config(
    base: Option<&std::path::Path>,
    record: bool,
    ice_tcp_port: Option<u16>,
) -> Result<tempfile::NamedTempFile, RunError> {
    let mut table: toml::Table = match base {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| RunError::Io(path.to_owned(), e))?
            .parse()
            .map_err(|e| RunError::Options(format!("{}: {e}", path.display())))?,
        None => toml::Table::new(),
    };
    if let Some(port) = ice_tcp_port {
        table
            .entry("media")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| RunError::Options("[media] must be a table".into()))?
            .insert("ice_tcp_port".into(), toml::Value::Integer(i64::from(port)));
    }
    if record {
        add_review_key(&mut table)?;
    }
    let mut file = tempfile::Builder::new()
        .prefix("relay-bench-config-")
        .suffix(".toml")
        .tempfile()
        .map_err(|e| RunError::Setup(format!("writing the relay's configuration: {e}")))?;
    std::io::Write::write_all(&mut file, table.to_string().as_bytes())
        .map_err(|e| RunError::Setup(format!("writing the relay's configuration: {e}")))?;
    Ok(file)
}

/// A free TCP port on loopback (for the relay's ICE-TCP port), as the OS hands it out.
fn free_tcp_port() -> Result<u16, RunError> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| RunError::Setup(format!("finding a free TCP port: {e}")))
}

/// Enables recording in `table` with a fresh review key for the bench's portal.
fn add_review_key(table: &mut toml::Table) -> Result<(), RunError> {
    let recording = table
        .entry("recording")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| RunError::Options("[recording] must be a table".into()))?;
    recording.insert("enabled".into(), toml::Value::Boolean(true));
    let keys = recording
        .entry("review_keys")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or_else(|| RunError::Options("[recording.review_keys] must be a table".into()))?;
    let recipient = age::x25519::Identity::generate().to_public().to_string();
    keys.insert(session::PORTAL.into(), toml::Value::String(recipient));
    Ok(())
}

/// What the relay recorded since `before` (its metrics text), once every recording is
/// finished (at most [`RECORDINGS_FINISH_LIMIT`]); `None` when it recorded nothing.
async fn recording_usage(
    api: &RelayApi,
    before: &str,
) -> Result<Option<report::RecordingUsage>, RunError> {
    let deadline = Instant::now() + RECORDINGS_FINISH_LIMIT;
    let mut text = api.metrics().await?;
    while metric_value(&text, "relay_recordings_active").unwrap_or(0.0) > 0.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = api.metrics().await?;
    }
    let delta = |query: &str| {
        let now = metric_value(&text, query).unwrap_or(0.0);
        (now - metric_value(before, query).unwrap_or(0.0)).max(0.0) as u64
    };
    let raw = delta("relay_recording_bytes_total{stage=\"raw\"}");
    if raw == 0 {
        return Ok(None);
    }
    let compressed = delta("relay_recording_bytes_total{stage=\"compressed\"}");
    Ok(Some(report::RecordingUsage {
        raw_bytes: raw,
        compressed_bytes: compressed,
        compression_ratio: (compressed > 0).then(|| raw as f64 / compressed as f64),
        frames_dropped: ["queue_full", "awaiting_keyframe", "incomplete"]
            .iter()
            .map(|r| {
                delta(&format!(
                    "relay_recording_frames_dropped_total{{reason=\"{r}\"}}"
                ))
            })
            .sum(),
        write_errors: delta("relay_recording_write_errors_total"),
        unfinished: metric_value(&text, "relay_recordings_active").unwrap_or(0.0) as u64,
    }))
}

async fn usage(target: &Target, api: &RelayApi) -> Result<Usage, RunError> {
    let text = api.metrics().await?;
    let mut u = Usage {
        packets_forwarded: metric_value(&text, "relay_rtp_packets_forwarded_total").unwrap_or(0.0),
        refused_view_only: metric_value(
            &text,
            "relay_input_events_total{outcome=\"refused_view_only\"}",
        )
        .unwrap_or(0.0),
        ice_tcp_bytes: ["in", "out"]
            .iter()
            .map(|d| {
                metric_value(
                    &text,
                    &format!("relay_ice_tcp_bytes_total{{direction=\"{d}\"}}"),
                )
            })
            .sum(),
        metrics: text.clone(),
        ..Usage::default()
    };
    match target.pid() {
        Some(pid) => {
            let p = ProcStats::read(pid)?;
            u.cpu_seconds = Some(p.cpu_seconds);
            u.rss_bytes = Some(p.rss_bytes);
            u.rss_peak_bytes = Some(p.rss_peak_bytes);
        }
        None => {
            u.cpu_seconds = metric_value(&text, "process_cpu_seconds_total");
            u.rss_bytes = metric_value(&text, "process_resident_memory_bytes").map(|b| b as u64);
        }
    }
    Ok(u)
}

impl RunArgs {
    /// Refuses options that make no sense together.
    pub(crate) fn validate(&self) -> Result<(), RunError> {
        let bad = |m: String| Err(RunError::Options(m));
        if !(self.duration.is_finite() && self.duration > 0.0) {
            return bad(format!(
                "--duration must be positive (got {})",
                self.duration
            ));
        }
        if !(self.fps.is_finite() && self.fps > 0.0 && self.fps <= 240.0) {
            return bad(format!("--fps must be in (0, 240] (got {})", self.fps));
        }
        if !(self.input_hz.is_finite() && (0.0..=1000.0).contains(&self.input_hz)) {
            return bad(format!(
                "--input-hz must be in [0, 1000] (got {})",
                self.input_hz
            ));
        }
        if self.masked + self.view_only >= self.agents {
            return bad(format!(
                "--masked ({}) + --view-only ({}) must leave room for the host in --agents ({})",
                self.masked, self.view_only, self.agents
            ));
        }
        if self.slow_agents >= self.agents {
            return bad(format!(
                "--slow-agents ({}) must be fewer than --agents ({}): the host never stalls",
                self.slow_agents, self.agents
            ));
        }
        let watchers = self.agents - 1 - self.masked - self.view_only;
        if self.churn_agents + self.slow_agents > watchers.max(self.slow_agents) {
            return bad(format!(
                "--churn-agents ({}) must fit among the watchers ({watchers}) next to \
                 --slow-agents ({}): raise --agents or lower --masked/--view-only",
                self.churn_agents, self.slow_agents
            ));
        }
        if !(self.churn_interval.is_finite() && self.churn_interval >= 0.1) {
            return bad(format!(
                "--churn-interval must be at least 0.1 s, not {}",
                self.churn_interval
            ));
        }
        Ok(())
    }

    /// The frames the publishers send: `--source`, `--synthetic-size` or the default.
    pub(crate) fn source(&self) -> Result<FrameSource, RunError> {
        Ok(match (&self.source, self.synthetic_size) {
            (Some(path), _) => FrameSource::open(path)?,
            (None, Some(size)) => FrameSource::synthetic(size, self.keyframe_interval),
            (None, None) => FrameSource::from_ivf(Bytes::from_static(DEFAULT_SOURCE))?,
        })
    }
}

/// Runs the benchmark `args` describes. The progress bar goes to stderr unless
/// `args.quiet` (indicatif draws nothing when stderr is not a terminal).
pub async fn run(args: &RunArgs) -> Result<Report, RunError> {
    args.validate()?;
    let source = args.source()?;

    let (target, api, tls) = match &args.relay {
        None => {
            let bin = args.relay_bin.clone().unwrap_or_else(default_relay_binary);
            let ice_tcp_port = match args.ice_transport {
                IceTransport::Tcp => Some(free_tcp_port()?),
                IceTransport::Any => None,
            };
            let config = if args.record || ice_tcp_port.is_some() {
                Some(relay_config(
                    args.relay_config.as_deref(),
                    args.record,
                    ice_tcp_port,
                )?)
            } else {
                None
            };
            let config_path = match &config {
                Some(file) => Some(file.path().to_owned()),
                None => args.relay_config.clone(),
            };
            let relay = tokio::task::spawn_blocking(move || {
                let relay = LocalRelay::spawn(&bin, config_path.as_deref());
                drop(config);
                relay
            })
            .await
            .map_err(|e| RunError::Setup(format!("starting the relay: {e}")))??;
            let pem = relay.certificate_pem()?;
            let api = RelayApi::new(relay.url(), relay.secret().as_bytes(), Some(&pem), false)?
                .with_ops(relay.ops_url(), None);
            let tls = tls_trusting_pem(&pem)?;
            (Target::Local(relay), api, tls)
        }
        Some(url) => {
            let secret = match &args.secret_file {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| RunError::Io(path.clone(), e))?
                    .trim()
                    .to_owned(),
                None => std::env::var("RELAY_AUTH_HS256_SECRET").map_err(|_| {
                    RunError::Options(
                        "--relay needs the relay's token secret: --secret-file or RELAY_AUTH_HS256_SECRET"
                            .into(),
                    )
                })?,
            };
            let pem = match &args.ca {
                Some(path) => Some(std::fs::read(path).map_err(|e| RunError::Io(path.clone(), e))?),
                None => None,
            };
            let metrics_token = match &args.metrics_token_file {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| RunError::Io(path.clone(), e))?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            let api = RelayApi::new(url, secret.as_bytes(), pem.as_deref(), args.insecure)?
                .with_ops(&args.metrics, metrics_token);
            let tls = match &pem {
                Some(pem) => tls_trusting_pem(pem)?,
                None if args.insecure => insecure_tls(),
                None => {
                    return Err(RunError::Options(
                        "--relay needs --ca FILE or --insecure for its certificate".into(),
                    ));
                }
            };
            (Target::Remote, api, tls)
        }
    };

    let plan = SessionPlan {
        roles: session::agent_mix(args.agents, args.masked, args.view_only),
        slow_agents: args.slow_agents,
        churn_agents: args.churn_agents,
        churn_interval: Duration::from_secs_f64(args.churn_interval),
        fps: args.fps,
        input_hz: args.input_hz,
        ice_transport: args.ice_transport,
    };
    let run_id = format!("{:08x}", rand::random::<u32>());
    let before_sessions = usage(&target, &api).await?;

    let progress = progress_bar(args);
    let opens = (0..args.sessions).map(|n| {
        let api = &api;
        let tls = Arc::clone(&tls);
        let plan = &plan;
        let source = source.clone();
        let run_id = &run_id;
        let progress = &progress;
        async move {
            let s = session::open(api, tls, run_id, n, plan, source).await?;
            progress.inc(1);
            Ok::<BenchSession, RunError>(s)
        }
    });
    let mut sessions = futures_util::future::try_join_all(opens).await?;

    let window = Duration::from_secs_f64(args.duration);
    progress.set_prefix("running");
    progress.set_length(window.as_secs().max(1));
    progress.set_position(0);
    let start_usage = usage(&target, &api).await?;
    let window_start = Instant::now();
    for s in &mut sessions {
        s.start(&plan);
    }
    let window_end = window_start + window;
    let rss_sampler = target
        .pid()
        .map(|pid| tokio::spawn(sample_rss(pid, window_start, window)));
    watch_window(&progress, window_start, window, || {
        sessions.iter().map(BenchSession::frames_received).sum()
    })
    .await;
    let end_usage = usage(&target, &api).await?;
    let rss_trend = match rss_sampler {
        Some(task) => task.await.ok().and_then(report::RssTrend::from_samples),
        None => None,
    };
    for s in &mut sessions {
        s.stop_input().await;
    }

    progress.set_prefix("drain");
    let drain_until = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < drain_until && !sessions.iter().all(|s| s.drained(window_end)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = usage(&target, &api).await?;
    progress.finish_and_clear();

    let mut totals = Totals::default();
    for s in &sessions {
        s.score(window_start, window_end, &mut totals);
    }
    futures_util::future::join_all(sessions.into_iter().map(|s| s.close(&api))).await;
    let recording = recording_usage(&api, &before_sessions.metrics).await?;

    let cpu_seconds = match (start_usage.cpu_seconds, end_usage.cpu_seconds) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let packets_forwarded =
        (end_usage.packets_forwarded - start_usage.packets_forwarded).max(0.0) as u64;
    let relay = RelayUsage {
        cpu_seconds,
        rss_peak_bytes: after
            .rss_peak_bytes
            .or(after.rss_bytes.max(end_usage.rss_bytes)),
        packets_forwarded,
        cpu_us_per_packet: cpu_seconds
            .filter(|_| packets_forwarded > 0)
            .map(|c| c * 1e6 / packets_forwarded as f64),
        bytes_per_session: match (before_sessions.rss_bytes, end_usage.rss_bytes) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) / u64::from(args.sessions)),
            _ => None,
        },
        ice_tcp_bytes: match (start_usage.ice_tcp_bytes, end_usage.ice_tcp_bytes) {
            (Some(a), Some(b)) => Some((b - a).max(0.0) as u64),
            _ => None,
        },
        rss_trend,
    };
    totals.input.refused_view_only =
        (after.refused_view_only - before_sessions.refused_view_only).max(0.0) as u64;
    drop(target);

    Ok(Report {
        target: "relay".to_owned(),
        sessions: args.sessions,
        agents_per_session: args.agents,
        duration_s: window.as_secs_f64(),
        latency_ms: report::latency(&totals.latency),
        first_frame_ms: report::quantiles(&totals.first_frame),
        connect_ms: report::quantiles(&totals.connect),
        input: report::Input {
            latency_ms: report::quantiles(&totals.input_latency),
            ..totals.input
        },
        frames: totals.frames,
        masked_leaks: totals.masked_leaks,
        slow_agents: totals.slow,
        churn: report::Churn {
            first_frame_ms: report::quantiles(&totals.churn_first_frame),
            ..totals.churn
        },
        relay,
        recording,
    })
}

/// The progress bar of a run (hidden with `--quiet`), counting sessions set up.
pub(crate) fn progress_bar(args: &RunArgs) -> ProgressBar {
    let progress = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(u64::from(args.sessions))
    };
    progress.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    progress.set_prefix("set-up");
    progress
}

/// Waits out the measured window that began at `window_start`, showing its seconds and
/// the frames `received` counts so far.
/// Samples the resident memory of process `pid` about 60 times through the window
/// (at least every second, at most every 30 s): `(seconds into the window, bytes)`.
async fn sample_rss(pid: u32, window_start: Instant, window: Duration) -> Vec<(f64, u64)> {
    let every = (window / 60).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    let mut samples = Vec::new();
    while Instant::now() < window_start + window {
        tick.tick().await;
        match ProcStats::read(pid) {
            Ok(p) => samples.push((window_start.elapsed().as_secs_f64(), p.rss_bytes)),
            Err(_) => break,
        }
    }
    samples
}

pub(crate) async fn watch_window(
    progress: &ProgressBar,
    window_start: Instant,
    window: Duration,
    received: impl Fn() -> usize,
) {
    let window_end = window_start + window;
    let seconds = window.as_secs().max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < window_end {
        tick.tick().await;
        progress.set_position(window_start.elapsed().as_secs().min(seconds));
        progress.set_message(format!("{} frames received", received()));
    }
}
