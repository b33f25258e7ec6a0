//! The `udp-ceiling` target of `relay-bench compare`: the load of `run` through a plain
//! UDP fan-out forwarder, the cheapest way this machine can move the same packets. Its
//! CPU per forwarded packet is the floor a relay's is compared with.
//!
//! - [`forwarder`]: the forwarder process (`relay-bench udp-forwarder`, a hidden
//!   command): one socket, `recvmmsg`/`sendmmsg`, no ICE, DTLS, SRTP or RTCP.
//! - [`fanout`]: its routing and counters, and the few datagrams of its protocol.
//! - `load`: the bench's publishers and receivers.
//!
//! The order of a run is `run`'s:
//!
//! 1. the forwarder is started; its memory comes from `/proc/<pid>` as the relay's
//!    does, its CPU from its threads' `schedstat`, in nanoseconds (it uses too little
//!    for clock ticks);
//! 2. set-up, all sessions at once: each session's publisher registers and publishes
//!    `args.source()` at `args.fps`, cut into RTP as a customer's track cuts it, then
//!    its `args.agents` receivers register;
//! 3. the window (`args.duration`), with the forwarder's CPU and its own count of
//!    forwarded packets read at both ends;
//! 4. drain, as `run` drains (at most [`DRAIN_LIMIT`]);
//! 5. scoring with [`crate::run::measure`]. Input, masking and slow agents do not
//!    apply: they stay at zero.

pub mod fanout;
pub mod forwarder;
mod load;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::relay_process::{ProcStats, live_threads_cpu_seconds, spawn_until_first_line};
use crate::run::report::{RelayUsage, Report};
use crate::run::session::Totals;
use crate::run::{DRAIN_LIMIT, RunArgs, RunError, measure};
use fanout::{Counters, STATS};
use load::{Publisher, Receiver};

/// The `target` of its reports.
pub const TARGET: &str = "udp-ceiling";

/// Environment variable naming the `relay-bench` binary that runs the forwarder (for
/// programs other than `relay-bench` itself, such as tests).
pub const FORWARDER_BIN_ENV: &str = "RELAY_BENCH_BIN";

/// How long the forwarder may take to answer a `STATS` request, per try.
const STATS_WAIT: Duration = Duration::from_millis(500);

/// The `relay-bench` binary that runs the forwarder: [`FORWARDER_BIN_ENV`] if set; this
/// program if it is `relay-bench`; else `relay-bench` beside it or one directory up (a
/// test binary in `target/<profile>/deps/` finds `target/<profile>/relay-bench`); else
/// `target/release/relay-bench`.
pub fn default_forwarder_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(FORWARDER_BIN_ENV) {
        return path.into();
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_stem().is_some_and(|s| s == "relay-bench") {
            return exe;
        }
        if let Some(found) = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("relay-bench"))
            .find(|p| p.is_file())
        {
            return found;
        }
    }
    PathBuf::from("target/release/relay-bench")
}

/// Runs the load of `args` through the forwarder of [`default_forwarder_binary`].
pub async fn run(args: &RunArgs) -> Result<Report, RunError> {
    run_with(args, &default_forwarder_binary()).await
}

/// Runs the load of `args` through the forwarder, started as `binary udp-forwarder`.
pub async fn run_with(args: &RunArgs, binary: &Path) -> Result<Report, RunError> {
    args.validate()?;
    let source = args.source()?;
    let codec = source.codec();
    let binary = binary.to_owned();
    let forwarder = tokio::task::spawn_blocking(move || ForwarderProcess::spawn(&binary))
        .await
        .map_err(|e| RunError::Setup(format!("starting the udp forwarder: {e}")))??;
    let control = Control::new(forwarder.addr).await?;
    let before_sessions = forwarder.usage(&control).await?;

    let progress = crate::run::progress_bar(args);
    let opens = (0..args.sessions).map(|n| {
        let source = source.clone();
        let progress = &progress;
        let addr = forwarder.addr;
        async move {
            let name = format!("s{n}");
            let publisher = Publisher::start(addr, &name, source, args.fps).await?;
            let mut receivers = Vec::new();
            for _ in 0..args.agents {
                receivers.push(Receiver::start(addr, &name, codec).await?);
            }
            for r in &receivers {
                r.wait_connected().await?;
            }
            progress.inc(1);
            Ok::<_, RunError>(Session {
                publisher,
                receivers,
            })
        }
    });
    let sessions = futures_util::future::try_join_all(opens).await?;

    let window = Duration::from_secs_f64(args.duration);
    progress.set_prefix("running");
    progress.set_length(window.as_secs().max(1));
    progress.set_position(0);
    let start_usage = forwarder.usage(&control).await?;
    let window_start = Instant::now();
    let window_end = window_start + window;
    crate::run::watch_window(&progress, window_start, window, || {
        sessions.iter().map(Session::frames_received).sum()
    })
    .await;
    let end_usage = forwarder.usage(&control).await?;

    progress.set_prefix("drain");
    let drain_until = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < drain_until && !sessions.iter().all(|s| s.drained(window_end)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = forwarder.usage(&control).await?;
    progress.finish_and_clear();

    let mut totals = Totals::default();
    for s in &sessions {
        s.score(window_start, window_end, &mut totals);
    }
    let rejected: u64 = sessions
        .iter()
        .flat_map(|s| &s.receivers)
        .map(Receiver::rejected)
        .sum();
    if rejected > 0 || end_usage.counters.send_errors > start_usage.counters.send_errors {
        tracing::warn!(
            rejected,
            send_errors = end_usage.counters.send_errors - start_usage.counters.send_errors,
            "udp-ceiling: packets rejected by receivers or refused by the forwarder's socket"
        );
    }
    drop(sessions);
    drop(forwarder);

    let cpu_seconds = end_usage.cpu_seconds - start_usage.cpu_seconds;
    let packets_forwarded = end_usage
        .counters
        .forwarded
        .saturating_sub(start_usage.counters.forwarded);
    let relay = RelayUsage {
        cpu_seconds: Some(cpu_seconds),
        rss_peak_bytes: Some(after.proc.rss_peak_bytes),
        packets_forwarded,
        cpu_us_per_packet: (packets_forwarded > 0)
            .then(|| cpu_seconds * 1e6 / packets_forwarded as f64),
        bytes_per_session: Some(
            end_usage
                .proc
                .rss_bytes
                .saturating_sub(before_sessions.proc.rss_bytes)
                / u64::from(args.sessions),
        ),
        ice_tcp_bytes: None,
        rss_trend: None,
    };
    Ok(Report::media_only(TARGET, args, window, &totals, relay))
}

/// One session: a publisher and its receivers.
struct Session {
    publisher: Publisher,
    receivers: Vec<Receiver>,
}

impl Session {
    /// Frames its receivers reassembled so far.
    fn frames_received(&self) -> usize {
        self.receivers.iter().map(Receiver::frames_received).sum()
    }

    /// Whether every receiver has the last frame sent at or before `window_end`.
    fn drained(&self, window_end: Instant) -> bool {
        let sent = self.publisher.sent();
        let Some(last) = sent.iter().rev().find(|s| s.sent_at <= window_end) else {
            return true;
        };
        self.receivers
            .iter()
            .all(|r| r.has(&last.digest, last.sent_at))
    }

    /// Adds this session's figures to `t`.
    fn score(&self, window_start: Instant, window_end: Instant, t: &mut Totals) {
        let sent = self.publisher.sent();
        let index = measure::SentIndex::new(&sent);
        t.frames.sent += sent
            .iter()
            .filter(|s| s.sent_at >= window_start && s.sent_at <= window_end)
            .count() as u64;
        for r in &self.receivers {
            let frames = r.frames();
            let scored =
                measure::score_agent(&index, &frames, r.joined_at, window_end, &mut t.latency);
            scored.add_to(&mut t.frames);
            if let Some(at) = r.connected_at() {
                measure::record(&mut t.connect, at.saturating_duration_since(r.joined_at));
            }
            if let Some(d) = scored.first_frame {
                measure::record(&mut t.first_frame, d);
            }
        }
    }
}

/// The forwarder at one moment.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// Its memory (and CPU in clock ticks).
    proc: ProcStats,
    /// Its CPU in nanoseconds: it uses too little for clock ticks to measure.
    cpu_seconds: f64,
    counters: Counters,
}

/// A `relay-bench udp-forwarder` child process; dropping it kills the process.
struct ForwarderProcess {
    child: Child,
    addr: SocketAddrV4,
    /// Holds its stderr.
    _log: tempfile::TempDir,
}

impl ForwarderProcess {
    /// Starts `binary udp-forwarder` on a free loopback port and waits for its
    /// listening line.
    fn spawn(binary: &Path) -> Result<Self, RunError> {
        if !binary.is_file() {
            return Err(RunError::Setup(format!(
                "no relay-bench binary at {} to run the udp forwarder (build it with \
                 `cargo build --release -p relay-bench`, or set {FORWARDER_BIN_ENV})",
                binary.display()
            )));
        }
        let io = |what: &'static str| {
            move |e: std::io::Error| RunError::Setup(format!("udp forwarder: {what}: {e}"))
        };
        let log = tempfile::Builder::new()
            .prefix("relay-bench-forwarder-")
            .tempdir()
            .map_err(io("log directory"))?;
        let log_path = log.path().join("forwarder.stderr");
        let stderr = std::fs::File::create(&log_path).map_err(io("log file"))?;
        let mut command = Command::new(binary);
        command
            .args(["udp-forwarder", "--port", "0"])
            // It exits when this pipe closes, so it never outlives the bench.
            .stdin(Stdio::piped())
            .stderr(stderr);
        let (mut child, line) = spawn_until_first_line(&mut command, "udp-forwarder", &log_path)?;
        let addr = line
            .trim()
            .strip_prefix("listening on udp ")
            .and_then(|a| a.parse::<SocketAddrV4>().ok());
        let Some(addr) = addr else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::Setup(format!(
                "udp forwarder: its first line is {line:?}"
            )));
        };
        Ok(ForwarderProcess {
            child,
            addr,
            _log: log,
        })
    }

    /// Its CPU, memory and counters now.
    async fn usage(&self, control: &Control) -> Result<Usage, RunError> {
        let counters = control.counters().await?;
        let pid = self.child.id();
        Ok(Usage {
            proc: ProcStats::read(pid)?,
            cpu_seconds: live_threads_cpu_seconds(pid)?,
            counters,
        })
    }
}

impl Drop for ForwarderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bench's socket for `STATS` requests.
struct Control {
    socket: UdpSocket,
    forwarder: SocketAddrV4,
}

impl Control {
    async fn new(forwarder: SocketAddrV4) -> Result<Self, RunError> {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| RunError::Setup(format!("udp-ceiling: control socket: {e}")))?;
        Ok(Control { socket, forwarder })
    }

    /// The forwarder's counters now (asked up to three times: UDP may lose a request).
    async fn counters(&self) -> Result<Counters, RunError> {
        let mut buf = [0u8; 256];
        // A late answer to an earlier request would be stale.
        while self.socket.try_recv_from(&mut buf).is_ok() {}
        for _ in 0..3 {
            let _ = self.socket.send_to(STATS.as_bytes(), self.forwarder).await;
            let deadline = tokio::time::Instant::now() + STATS_WAIT;
            while let Ok(Ok((len, from))) =
                tokio::time::timeout_at(deadline, self.socket.recv_from(&mut buf)).await
            {
                if from == SocketAddr::V4(self.forwarder)
                    && let Some(c) = Counters::decode(&buf[..len])
                {
                    return Ok(c);
                }
            }
        }
        Err(RunError::Setup(
            "udp-ceiling: the forwarder does not answer STATS".into(),
        ))
    }
}
