//! A relay the bench starts itself, and what the operating system says about it.
//!
//! [`LocalRelay::spawn`] runs `relay serve` on `127.0.0.1:0` with a fresh data directory
//! and a random token secret (passed in `RELAY_AUTH_HS256_SECRET`, never on the command
//! line), its operations listener on a free port too, and reads its first two stdout
//! lines, `listening on https://127.0.0.1:PORT` and `ops listening on http://127.0.0.1:PORT`.
//! [`ProcStats::read`] samples `/proc/<pid>` for CPU time and resident memory.
//! [`spawn_until_first_line`] is the start-up step on its own, for the other processes
//! `compare` measures the same way (the UDP forwarder).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long the relay may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the relay could not be started or measured.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// No relay binary where it was looked for.
    #[error(
        "no relay binary at {0} (build it with `cargo build --release -p relay`, or pass --relay-bin)"
    )]
    NoBinary(PathBuf),
    /// Starting it or reading from it failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// It exited or printed something else than its listening line (the message names
    /// the program: `relay did not start: ...`).
    #[error("{0}")]
    Startup(String),
    /// `/proc/<pid>` could not be read or parsed.
    #[error("/proc/{pid}: {message}")]
    Proc {
        /// The process.
        pid: u32,
        /// What went wrong.
        message: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProcessError {
    let what = what.into();
    move |source| ProcessError::Io { what, source }
}

/// The relay binary next to the running executable (`target/release/relay` when the
/// bench runs as `target/release/relay-bench`), else `target/release/relay` under the
/// current directory.
pub fn default_relay_binary() -> PathBuf {
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("relay")));
    match sibling {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("target/release/relay"),
    }
}

/// Starts `command` with its stdout piped and blocks until it prints its first line (at
/// most [`STARTUP_TIMEOUT`]), which is returned with the child; stdout is drained from
/// then on, so the child never blocks on a full pipe. `name` names the program in
/// errors; `log` is where its stderr goes, whose tail an error quotes. On error the
/// child is killed.
pub fn spawn_until_first_line(
    command: &mut Command,
    name: &str,
    log: &Path,
) -> Result<(Child, String), ProcessError> {
    let (child, mut lines) = spawn_until_lines(command, name, log, 1)?;
    Ok((child, lines.remove(0)))
}

/// [`spawn_until_first_line`] for the first `n` lines (all within [`STARTUP_TIMEOUT`]).
pub fn spawn_until_lines(
    command: &mut Command,
    name: &str,
    log: &Path,
    n: usize,
) -> Result<(Child, Vec<String>), ProcessError> {
    let program = Path::new(command.get_program()).display().to_string();
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {program}")))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for _ in 0..n {
            if tx.send(lines.next()).is_err() {
                break;
            }
        }
        // Keep draining, so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let deadline = std::time::Instant::now() + STARTUP_TIMEOUT;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Some(Ok(line))) => got.push(line),
            Ok(_) => {
                return Err(startup_failed(
                    child,
                    name,
                    log,
                    format!("it closed stdout after {} of {n} start-up lines", got.len()),
                ));
            }
            Err(_) => {
                return Err(startup_failed(
                    child,
                    name,
                    log,
                    format!(
                        "{} of {n} start-up lines within {STARTUP_TIMEOUT:?}",
                        got.len()
                    ),
                ));
            }
        }
    }
    Ok((child, got))
}

/// Kills `child` and says why it did not start, with the tail of its `log`.
pub(crate) fn startup_failed(
    mut child: Child,
    name: &str,
    log: &Path,
    what: String,
) -> ProcessError {
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    ProcessError::Startup(format!(
        "{name} did not start: {what}; its log ends with:\n{}",
        tail.join("\n")
    ))
}

/// A `relay serve` child process; dropping it kills the process.
pub struct LocalRelay {
    child: Child,
    url: String,
    ops: String,
    secret: String,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for LocalRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRelay")
            .field("pid", &self.child.id())
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl LocalRelay {
    /// Starts `binary serve` with `config` (if none: one that raises
    /// `limits.max_connections_per_address` to 10,000, as every client of the bench
    /// shares 127.0.0.1; a given one should do the same) on a free loopback port, its data
    /// in a temporary directory, its logs at `warn` into `<dir>/relay.stderr`. Blocks
    /// until the relay prints where it listens (at most [`STARTUP_TIMEOUT`]).
    pub fn spawn(binary: &Path, config: Option<&Path>) -> Result<Self, ProcessError> {
        if !binary.is_file() {
            return Err(ProcessError::NoBinary(binary.to_owned()));
        }
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-")
            .tempdir()
            .map_err(io("creating the relay's data directory"))?;
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let stderr_path = dir.path().join("relay.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(io("creating relay.stderr"))?;
        let mut command = Command::new(binary);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|n| n.starts_with("RELAY_")) {
                command.env_remove(name);
            }
        }
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "127.0.0.1:0", "--ops-listen", "127.0.0.1:0"])
            .args(["--log-level", "warn"])
            .env("RELAY_AUTH_HS256_SECRET", &secret)
            .stdin(Stdio::null())
            .stderr(stderr);
        // All the bench's clients connect from 127.0.0.1: without a configuration of its
        // own, the relay gets one that lifts the per-address connection cap (256).
        let config = match config {
            Some(config) => config.to_owned(),
            None => {
                let path = dir.path().join("bench-relay.toml");
                std::fs::write(&path, "[limits]\nmax_connections_per_address = 10000\n")
                    .map_err(io("writing the bench's relay configuration"))?;
                path
            }
        };
        command.arg("--config").arg(&config);
        let (child, lines) = spawn_until_lines(&mut command, "relay", &stderr_path, 2)?;
        let (Some(url), Some(ops)) = (
            lines[0].trim().strip_prefix("listening on "),
            lines[1].trim().strip_prefix("ops listening on "),
        ) else {
            return Err(startup_failed(
                child,
                "relay",
                &stderr_path,
                format!("its first lines are {lines:?}"),
            ));
        };
        Ok(LocalRelay {
            url: url.trim_end_matches('/').to_owned(),
            ops: ops.trim_end_matches('/').to_owned(),
            child,
            secret,
            dir,
        })
    }

    /// Where it listens, `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where its operations listener (`/metrics`) listens, `http://127.0.0.1:PORT`.
    pub fn ops_url(&self) -> &str {
        &self.ops
    }

    /// Its HS256 token secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its data directory (the self-signed certificate is `tls/cert.pem` in it).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PEM certificate it serves.
    pub fn certificate_pem(&self) -> Result<Vec<u8>, ProcessError> {
        let path = self.dir.path().join("tls/cert.pem");
        std::fs::read(&path).map_err(io(format!("reading {}", path.display())))
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for LocalRelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    /// User plus system CPU time so far, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory now, in bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// Largest resident memory so far, in bytes (`VmHWM`).
    pub rss_peak_bytes: u64,
}

impl ProcStats {
    /// Reads the figures of process `pid` now.
    pub fn read(pid: u32) -> Result<Self, ProcessError> {
        let err = |message: String| ProcessError::Proc { pid, message };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| err(format!("stat: {e}")))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| err(format!("status: {e}")))?;
        let ticks = parse_cpu_ticks(&stat).ok_or_else(|| err("stat does not parse".into()))?;
        let rss =
            parse_status_kib(&status, "VmRSS:").ok_or_else(|| err("status has no VmRSS".into()))?;
        let peak = parse_status_kib(&status, "VmHWM:").unwrap_or(rss);
        Ok(ProcStats {
            cpu_seconds: ticks as f64 / clock_ticks_per_second(),
            rss_bytes: rss * 1024,
            rss_peak_bytes: peak * 1024,
        })
    }
}

/// CPU time (user + system) of the threads of process `pid` alive now, in seconds, from
/// `/proc/<pid>/task/*/schedstat`, which counts nanoseconds where [`ProcStats`] counts
/// clock ticks (10 ms): for a process that uses too little CPU for ticks to measure.
/// Threads that have exited are not counted, so it suits a process whose threads live
/// as long as it does (the UDP forwarder), not the relay.
pub fn live_threads_cpu_seconds(pid: u32) -> Result<f64, ProcessError> {
    let err = |message: String| ProcessError::Proc { pid, message };
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| err(format!("task: {e}")))?;
    let mut nanos = 0u64;
    for task in tasks {
        let task = task.map_err(|e| err(format!("task: {e}")))?;
        // A thread may end between the listing and the read.
        let Ok(schedstat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        nanos += parse_schedstat_nanos(&schedstat)
            .ok_or_else(|| err(format!("schedstat does not parse: {schedstat:?}")))?;
    }
    Ok(nanos as f64 / 1e9)
}

/// The first field of a `schedstat` line: nanoseconds spent on a CPU.
fn parse_schedstat_nanos(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
fn clock_ticks_per_second() -> f64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100.0,
        ticks => ticks as f64,
    }
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may contain spaces, so fields are counted after the
/// last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After the name come field 3 (state) onwards: utime is field 14, the 12th here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The value in KiB of a `Key:   123 kB` line of `/proc/<pid>/status`.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let stat = "4242 (relay (x) y) S 1 4242 4242 0 -1 4194560 2519 0 0 0 150 37 0 0 20 0 9 0 123 456 789";
        assert_eq!(parse_cpu_ticks(stat), Some(187));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn parses_status_lines() {
        let status = "Name:\trelay\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn parses_schedstat() {
        assert_eq!(parse_schedstat_nanos("154049 3265218 2\n"), Some(154_049));
        assert_eq!(parse_schedstat_nanos(""), None);
    }

    #[test]
    fn live_threads_cpu_counts_a_spinning_thread_finely() {
        // This thread's own figure: the process-wide sum loses the other tests' threads
        // as they end.
        let own = || {
            let line = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            parse_schedstat_nanos(&line).unwrap()
        };
        let before = own();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(3) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let after = own();
        // 3 ms is below one clock tick; schedstat still sees it.
        assert!(after > before, "{x} {before} {after}");
        // And the process-wide reading parses and counts this thread.
        assert!(live_threads_cpu_seconds(std::process::id()).unwrap() >= after as f64 / 1e9);
    }

    #[test]
    fn reads_its_own_process() {
        let me = ProcStats::read(std::process::id()).unwrap();
        assert!(me.rss_bytes > 0);
        assert!(me.rss_peak_bytes >= me.rss_bytes);
        // Burn a little CPU so the figure cannot be a constant.
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let later = ProcStats::read(std::process::id()).unwrap();
        assert!(later.cpu_seconds > me.cpu_seconds, "{x}");
    }
}
