//! End-to-end harness: runs the real `relay` binary on loopback and drives it the way
//! clients do, over HTTPS (reqwest) and WebSockets (tokio-tungstenite), trusting only the
//! self-signed certificate that relay wrote.
//!
//! How the pieces fit:
//!
//! - [`relay_binary`] finds the binary (`RELAY_BIN`) or builds it once per test process
//!   with `$CARGO build -p relay --bin relay` into the test's own target directory.
//! - [`RelayBuilder`] writes `relay.toml` into a fresh temporary directory (which is also
//!   the data directory) and starts `relay serve` on `127.0.0.1:0`. The first stdout
//!   line, `listening on https://127.0.0.1:PORT`, says where it listens.
//! - [`Relay`] is the running process: its URL, HTTP clients (also bound to other
//!   loopback source addresses, for per-address throttling), JWT minting, metrics,
//!   signals, and the typed API helpers, which return [`ApiResult`]. Dropping it kills
//!   the process and prints the tail of its output, which libtest shows only for a
//!   failing test. `RELAY_E2E_KEEP=1` keeps the temporary directory.
//! - [`Ws`] is a WebSocket client (session or agent console) that keeps a transcript of
//!   every text message it received, so a test can assert what a participant never saw.
//!
//! Every wait has a timeout: a relay that does not answer fails a test with a message
//! naming what was awaited, never hangs it.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub use relay_codec::wire;

/// An impairable media path between a client and the relay (loss, jitter, cut).
pub mod proxy;
/// A throwaway `redis-server` and relays configured as the nodes of a cluster on it.
pub mod redis_server;
pub use reqwest::Method;
use wire::{
    CreateSessionRequest, CreateSessionResponse, ErrorBody, ErrorCode, InvitationInfo,
    InviteRequest, InviteResponse, InviteTarget, JoinRequest, ParticipantCredentials, Permission,
    RosterEntry, SessionList, SessionSummary, UpdateParticipantRequest, Visibility,
};

/// How long the relay may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default wait for one WebSocket message.
pub const WS_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of every HTTP request made through the harness clients.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a build of the relay may wait for cargo's build-directory lock before the
/// harness assumes its own `cargo test` holds it and builds into `<target>/e2e` instead.
const BUILD_LOCK_PATIENCE: Duration = Duration::from_secs(30);

/// Mouse moves numbered `range`, at column `x` and row = the number: input events a
/// test can send and then recognise, in order, at the customer.
pub fn mouse_moves(range: std::ops::Range<u32>, x: u16) -> Vec<relay_codec::input::InputEvent> {
    use relay_codec::input::{InputEvent, InputKind};
    range
        .map(|i| InputEvent {
            seq: i,
            kind: InputKind::MouseMove { x, y: i as u16 },
        })
        .collect()
}

/// Checks what an agent received against what the customer sent: from the agent's first
/// keyframe received at or after `from` (from the start with `None`) that matches a
/// sent one, every frame is one the customer sent, whole, in order, with none missing,
/// and there are at least `at_least` of them. Returns how many; errors name `who`.
pub fn frames_whole_in_order(
    who: &str,
    from: Option<Instant>,
    sent: &[relay_bench::client::SentFrame],
    frames: &[relay_bench::client::ReceivedFrame],
    at_least: usize,
) -> Result<usize> {
    let index = relay_bench::run::measure::SentIndex::new(sent);
    let after: Vec<_> = frames
        .iter()
        .filter(|f| from.is_none_or(|from| f.received_at >= from))
        .skip_while(|f| !(f.is_keyframe && index.find(f).is_some()))
        .collect();
    if after.len() < at_least {
        bail!(
            "{who} received only {} frames from its first keyframe (at least {at_least} expected)",
            after.len()
        );
    }
    let mut previous: Option<u64> = None;
    for (i, f) in after.iter().enumerate() {
        let Some(s) = index.find(f) else {
            bail!("{who}: frame #{i} from the first keyframe matches nothing the customer sent");
        };
        if let Some(p) = previous {
            if s.index != p + 1 {
                bail!(
                    "{who}: after sent frame {p} came sent frame {} (missing or out of order)",
                    s.index
                );
            }
        }
        previous = Some(s.index);
    }
    Ok(after.len())
}

/// Sends `events` from `agent` on its `input` channel and waits (at most [`WS_TIMEOUT`]
/// times two) until `customer` got exactly those events after what it had, in order
/// (compared by kind: the relay numbers what it forwards itself).
pub async fn input_arrives(
    agent: &relay_bench::client::Agent,
    customer: &relay_bench::client::Customer,
    events: &[relay_codec::input::InputEvent],
) -> Result<()> {
    let before = customer.input_events().len();
    for e in events {
        agent.send_input(e).await?;
    }
    wait_until("the agent's input at the customer", WS_TIMEOUT * 2, || {
        customer.input_events().len() >= before + events.len()
    })
    .await?;
    let got: Vec<_> = customer
        .input_events()
        .into_iter()
        .skip(before)
        .map(|r| r.event)
        .collect::<std::result::Result<_, _>>()?;
    if !got
        .iter()
        .map(|e| &e.kind)
        .eq(events.iter().map(|e| &e.kind))
    {
        bail!(
            "the customer got {got:?}, not the {} events sent",
            events.len()
        );
    }
    Ok(())
}

/// A committed media fixture: `tests/fixtures/<name>` (see its README).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Polls `done` every 20 ms until it holds; an error naming `what` after `timeout`.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Installs ring as the process-wide rustls provider (once; later calls do nothing).
pub fn install_crypto() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // Err means some other code installed a provider first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

// ---------------------------------------------------------------------------------
// Finding or building the binary
// ---------------------------------------------------------------------------------

/// The `relay` binary: `RELAY_BIN` (an absolute path) if set, otherwise built once per process with
/// `$CARGO build -p relay --bin relay`, into the target directory and profile of the
/// running test executable. Blocks while building; a failed build is reported to every
/// caller with the tail of cargo's output.
pub fn relay_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build(RELAY).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The `relay-bench` binary (its `compare` starts its UDP forwarder from it):
/// `RELAY_BENCH_BIN` if set, otherwise built once per process as [`relay_binary`] is.
pub fn bench_binary() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build(RELAY_BENCH).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// A binary of the workspace the tests run: its package and name, and the variable that
/// may point at a prebuilt one.
struct WorkspaceBin {
    package: &'static str,
    bin: &'static str,
    env: &'static str,
}

const RELAY: WorkspaceBin = WorkspaceBin {
    package: "relay",
    bin: "relay",
    env: "RELAY_BIN",
};

const RELAY_BENCH: WorkspaceBin = WorkspaceBin {
    package: "relay-bench",
    bin: "relay-bench",
    env: "RELAY_BENCH_BIN",
};

fn locate_or_build(what: WorkspaceBin) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(what.env) {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("{}={} is not a file", what.env, bin.display());
        }
        return Ok(bin);
    }
    let layout = TargetLayout::of_current_exe()?;
    match build_bin(&what, &layout, &layout.target_dir)? {
        Some(bin) => Ok(bin),
        None => {
            let own = layout.target_dir.join("e2e");
            eprintln!(
                "relay-e2e: the target directory stayed locked; building {} into {}",
                what.bin,
                own.display()
            );
            build_bin(&what, &layout, &own)?
                .ok_or_else(|| anyhow!("cargo stayed blocked on the lock of {}", own.display()))
        }
    }
}

/// Where the running test executable was built: `<target>/[<triple>/]<profile>/deps/<exe>`.
#[derive(Debug)]
struct TargetLayout {
    target_dir: PathBuf,
    triple: Option<String>,
    profile_dir: String,
}

impl TargetLayout {
    fn of_current_exe() -> Result<Self> {
        let exe = std::env::current_exe().context("current_exe")?;
        let deps = exe.parent().filter(|d| d.ends_with("deps"));
        let profile = deps.and_then(Path::parent);
        let above = profile.and_then(Path::parent);
        let (Some(profile), Some(above)) = (profile, above) else {
            bail!(
                "cannot derive the target directory from {} (expected <target>/<profile>/deps/<exe>); set RELAY_BIN",
                exe.display()
            );
        };
        let profile_dir = profile
            .file_name()
            .and_then(|n| n.to_str())
            .context("profile directory name")?
            .to_owned();
        // Cargo marks the target root with CACHEDIR.TAG; a directory in between is a
        // target triple (`--target`).
        let parent_is_root = above.join("CACHEDIR.TAG").exists();
        let (target_dir, triple) = match above.parent() {
            Some(root) if !parent_is_root && root.join("CACHEDIR.TAG").exists() => (
                root.to_path_buf(),
                above
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_owned),
            ),
            _ => (above.to_path_buf(), None),
        };
        Ok(TargetLayout {
            target_dir,
            triple,
            profile_dir,
        })
    }

    fn binary_in(&self, target_dir: &Path, bin: &str) -> PathBuf {
        let mut p = target_dir.to_path_buf();
        if let Some(t) = &self.triple {
            p.push(t);
        }
        p.push(&self.profile_dir);
        p.push(bin);
        p
    }
}

/// Builds `what` into `target_dir`. `Ok(None)` when cargo sat on the build-directory
/// lock for longer than [`BUILD_LOCK_PATIENCE`] (then it was killed).
fn build_bin(
    what: &WorkspaceBin,
    layout: &TargetLayout,
    target_dir: &Path,
) -> Result<Option<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "-p",
        what.package,
        "--bin",
        what.bin,
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(env!("CARGO_MANIFEST_DIR"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // Cargo gives this test process the variables of *its* crate (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR, …). Build scripts such as ring's track some of them, so
    // passing them on would rebuild those crates here and again in the next
    // `cargo test`: build with a neutral environment instead.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        let per_crate = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key_str.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*key_str);
        if per_crate {
            cmd.env_remove(&key);
        }
    }
    match layout.profile_dir.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(t) = &layout.triple {
        cmd.args(["--target", t]);
    }
    eprintln!("relay-e2e: running {cmd:?}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", Path::new(&cargo).display()))?;
    let stderr = child.stderr.take().context("cargo stderr")?;
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    let blocked_since = Arc::new(Mutex::new(None::<Instant>));
    let reader = {
        let output = Arc::clone(&output);
        let blocked_since = Arc::clone(&blocked_since);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                let mut since = blocked_since.lock().expect("lock poisoned");
                if line.contains("file lock on build directory")
                    || line.contains("file lock on artifact directory")
                {
                    since.get_or_insert_with(Instant::now);
                } else if line.trim_start().starts_with("Compiling") {
                    *since = None;
                }
                output.lock().expect("lock poisoned").push(line);
            }
        })
    };
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for cargo")? {
            break status;
        }
        let blocked = *blocked_since.lock().expect("lock poisoned");
        if blocked.is_some_and(|t| t.elapsed() > BUILD_LOCK_PATIENCE) {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = reader.join();
    if !status.success() {
        let lines = output.lock().expect("lock poisoned");
        bail!(
            "building {} failed ({status}); cargo said:\n{}",
            what.bin,
            tail(&lines, 40)
        );
    }
    let bin = layout.binary_in(target_dir, what.bin);
    if !bin.is_file() {
        bail!("cargo succeeded but {} does not exist", bin.display());
    }
    Ok(Some(bin))
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn file_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            tail(&lines, n)
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

// ---------------------------------------------------------------------------------
// Starting a relay
// ---------------------------------------------------------------------------------

/// Media port blocks handed out in this test process.
static MEDIA_PORT_BLOCKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Configuration of a relay to start. Every key of `relay.toml` is written out with the
/// documented defaults; the knobs below change one each. Durations are humantime
/// strings (`"2s"`, `"10m"`).
#[derive(Debug, Clone)]
pub struct RelayBuilder {
    config: toml::Table,
    extra: Vec<String>,
}

impl Default for RelayBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayBuilder {
    /// A relay with the documented defaults.
    pub fn new() -> Self {
        let config = toml::toml! {
            [auth]
            hs256_secret = ""

            [session]
            key_ttl = "4h"
            invitation_ttl = "5m"
            customer_grace = "10m"
            agent_grace = "2m"
            max_duration = "12h"
            max_sessions_per_agent = 8
            max_monitored_sessions = 32
            chat_history = 200

            [limits]
            max_message_bytes = 16384
            key_failures_per_address = 30
            key_failure_window = "60s"
            key_lockout_base = "60s"
            key_lockout_max = "1h"
            key_failures_node = 300

            [drain]
            deadline = "10m"

            [log]
            level = "info"

            // Every relay of a test run scrapes its own free port.
            [ops]
            listen = "127.0.0.1:0"
        };
        // Each relay gets its own block of media ports, so relays started by tests
        // running in parallel never race for the same port.
        let block = MEDIA_PORT_BLOCKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = 20_000 + ((std::process::id() as u64 * 7 + block) % 190) * 100;
        RelayBuilder {
            config,
            extra: Vec::new(),
        }
        .set("media", "udp_port_min", base as i64)
        .set("media", "udp_port_max", (base + 99) as i64)
    }

    /// `media.agent_queue_packets`: RTP packets queued per agent.
    pub fn agent_queue_packets(self, n: i64) -> Self {
        self.set("media", "agent_queue_packets", n)
    }

    /// `media.udp_mux_port`: all media on one UDP port, the first of this relay's own
    /// block (unused by the range in mux mode). Read it back with [`Self::mux_port`].
    pub fn udp_mux_port(self) -> Self {
        let first = self
            .config
            .get("media")
            .and_then(|m| m.get("udp_port_min"))
            .and_then(toml::Value::as_integer)
            .unwrap_or(0);
        self.set("media", "udp_mux_port", first)
    }

    /// `media.ice_tcp_port`: the ICE-TCP fallback on one TCP port, the number of the
    /// first UDP port of this relay's own block (TCP and UDP ports do not collide). Read
    /// it back with [`Self::tcp_port`].
    pub fn ice_tcp_port(self) -> Self {
        let first = self
            .config
            .get("media")
            .and_then(|m| m.get("udp_port_min"))
            .and_then(toml::Value::as_integer)
            .unwrap_or(0);
        self.set("media", "ice_tcp_port", first)
    }

    /// The configured `media.ice_tcp_port`, if set.
    pub fn tcp_port(&self) -> Option<u16> {
        let port = self
            .config
            .get("media")?
            .get("ice_tcp_port")?
            .as_integer()?;
        u16::try_from(port).ok().filter(|p| *p != 0)
    }

    /// The configured `media.udp_mux_port`, if set.
    pub fn mux_port(&self) -> Option<u16> {
        let port = self
            .config
            .get("media")?
            .get("udp_mux_port")?
            .as_integer()?;
        u16::try_from(port).ok().filter(|p| *p != 0)
    }

    fn set(mut self, section: &str, key: &str, value: impl Into<toml::Value>) -> Self {
        let table = self
            .config
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = table {
            t.insert(key.to_owned(), value.into());
        }
        self
    }

    /// `session.key_ttl`: how long an unused support key stays valid.
    pub fn key_ttl(self, d: &str) -> Self {
        self.set("session", "key_ttl", d)
    }

    /// `session.invitation_ttl`.
    pub fn invitation_ttl(self, d: &str) -> Self {
        self.set("session", "invitation_ttl", d)
    }

    /// `session.customer_grace`.
    pub fn customer_grace(self, d: &str) -> Self {
        self.set("session", "customer_grace", d)
    }

    /// `session.agent_grace`.
    pub fn agent_grace(self, d: &str) -> Self {
        self.set("session", "agent_grace", d)
    }

    /// `session.max_sessions_per_agent`.
    pub fn max_sessions_per_agent(self, n: i64) -> Self {
        self.set("session", "max_sessions_per_agent", n)
    }

    /// `drain.deadline`: how long live sessions may go on after SIGTERM.
    pub fn drain_deadline(self, d: &str) -> Self {
        self.set("drain", "deadline", d)
    }

    /// `limits.key_failures_per_address`.
    pub fn key_failures_per_address(self, n: i64) -> Self {
        self.set("limits", "key_failures_per_address", n)
    }

    /// `limits.key_failures_node`.
    pub fn key_failures_node(self, n: i64) -> Self {
        self.set("limits", "key_failures_node", n)
    }

    /// `limits.key_failure_window`.
    pub fn key_failure_window(self, d: &str) -> Self {
        self.set("limits", "key_failure_window", d)
    }

    /// `limits.key_lockout_base`.
    pub fn key_lockout_base(self, d: &str) -> Self {
        self.set("limits", "key_lockout_base", d)
    }

    /// Raw TOML merged over the configuration (tables merge key by key, so a section
    /// that already exists may be named again).
    pub fn extra_toml(mut self, toml: &str) -> Self {
        self.extra.push(toml.to_owned());
        self
    }

    /// The configuration as it will be written (an empty `auth.hs256_secret` is replaced
    /// by a random one when the relay starts).
    pub fn config(&self) -> Result<toml::Table> {
        let mut config = self.config.clone();
        for extra in &self.extra {
            let table: toml::Table = extra
                .parse()
                .with_context(|| format!("extra TOML does not parse:\n{extra}"))?;
            merge(&mut config, table);
        }
        Ok(config)
    }

    /// Writes the configuration into a fresh temporary directory and starts
    /// `relay serve --config <dir>/relay.toml --data-dir <dir> --listen 127.0.0.1:0`,
    /// then waits (at most [`STARTUP_TIMEOUT`]) for its listening line.
    pub async fn start(self) -> Result<Relay> {
        install_crypto();
        let bin = tokio::task::spawn_blocking(relay_binary)
            .await
            .context("binary lookup task")??;
        let mut config = self.config()?;
        // A fresh secret per relay, unless extra TOML chose one.
        let auth = config
            .entry("auth")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .context("`auth` is not a table")?;
        let secret = match auth.get("hs256_secret").and_then(toml::Value::as_str) {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => {
                let s = hex::encode(rand::random::<[u8; 32]>());
                auth.insert("hs256_secret".into(), s.clone().into());
                s
            }
        };

        let dir = tempfile::Builder::new()
            .prefix("relay-e2e-")
            .tempdir()
            .context("creating the relay's temporary directory")?;
        let config_path = dir.path().join("relay.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let Launched {
            mut process,
            url,
            ops,
            tls,
        } = launch(&bin, &config_path, dir.path(), "127.0.0.1:0").await?;
        process.dir = Some(dir);
        let client = build_client(tls.as_ref(), None)?;
        Ok(Relay {
            process,
            base: url,
            ops,
            secret,
            config_path,
            tls,
            client,
        })
    }
}

/// Starts `relay serve` with `config_path` and `data_dir` on `listen`, and waits (at
/// most [`STARTUP_TIMEOUT`]) for its two listening lines (public, then operations).
async fn launch(bin: &Path, config_path: &Path, data_dir: &Path, listen: &str) -> Result<Launched> {
    let stderr_path = data_dir.join("relay.stderr");
    // Appended to: a restarted relay keeps the first run's lines.
    let stderr = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&stderr_path)
        .context("opening the stderr file")?;

    let mut command = Command::new(bin);
    // The relay reads RELAY_* variables (RELAY_KEY_TTL, RELAY_TLS, ...); the test's
    // configuration must not depend on the environment it happens to run in.
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(|n| n.starts_with("RELAY_")) {
            command.env_remove(name);
        }
    }
    let mut child = command
        .arg("serve")
        .arg("--config")
        .arg(config_path)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", listen])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let stdout = child.stdout.take().context("relay stdout")?;
    let mut process = Process {
        child,
        dir: None,
        stderr_path,
        stdout_lines: Arc::new(Mutex::new(Vec::new())),
        exited: None,
        reported: false,
    };
    let mut lines = process.read_stdout(stdout);
    let started = tokio::time::timeout(STARTUP_TIMEOUT, async {
        let first = lines.recv().await?;
        let second = lines.recv().await?;
        Some((first, second))
    });

    let (line, ops_line) = match started.await {
        Err(_) => {
            return Err(process.failure(format!(
                "relay printed no listening lines within {STARTUP_TIMEOUT:?}"
            )));
        }
        Ok(None) => {
            let status = process.wait_briefly().await;
            return Err(process.failure(format!(
                "relay closed its stdout without printing its listening line ({})",
                status.map_or_else(|| "still running".to_owned(), |s| s.to_string()),
            )));
        }
        Ok(Some(lines)) => lines,
    };
    let Some(url) = line
        .trim()
        .strip_prefix("listening on ")
        .filter(|u| u.starts_with("https://127.0.0.1:") || u.starts_with("http://127.0.0.1:"))
    else {
        return Err(process.failure(format!(
            "relay's first stdout line is {line:?}; expected `listening on https://127.0.0.1:PORT`"
        )));
    };
    let url = url.trim_end_matches('/').to_owned();
    let Some(ops) = ops_line
        .trim()
        .strip_prefix("ops listening on ")
        .filter(|u| u.starts_with("http://127.0.0.1:"))
    else {
        return Err(process.failure(format!(
            "relay's second stdout line is {ops_line:?}; expected `ops listening on http://127.0.0.1:PORT`"
        )));
    };
    let ops = ops.trim_end_matches('/').to_owned();
    let base = reqwest::Url::parse(&url).with_context(|| format!("listening URL {url:?}"))?;
    if base.port().is_none_or(|p| p == 0) {
        bail!("listening URL {url:?} has no real port");
    }

    let tls = if base.scheme() == "https" {
        let cert_path = data_dir.join("tls").join("cert.pem");
        let pem = std::fs::read(&cert_path).with_context(|| {
            format!(
                "relay listens on https but {} cannot be read",
                cert_path.display()
            )
        })?;
        Some(Tls::from_pem(pem)?)
    } else {
        None
    };
    Ok(Launched {
        process,
        url,
        ops,
        tls,
    })
}

/// A relay process that printed its listening lines.
struct Launched {
    /// The process (not yet owning its directory).
    process: Process,
    /// Its public base URL.
    url: String,
    /// Its operations listener's base URL (`http://127.0.0.1:PORT`).
    ops: String,
    /// Its certificate, over HTTPS.
    tls: Option<Tls>,
}

/// What [`Relay::host_invitee_customer`] set up.
#[derive(Debug)]
pub struct HostInviteeCustomer {
    /// The host's agent token.
    pub host_jwt: String,
    /// The session as created (its host's credentials in `host`).
    pub session: CreateSessionResponse,
    /// The invited agent's credentials.
    pub invitee: ParticipantCredentials,
    /// The customer's credentials.
    pub customer: ParticipantCredentials,
}

/// Deep-merges `over` into `base`: tables merge, everything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The relay's certificate, for both HTTP and WebSocket clients.
#[derive(Clone)]
struct Tls {
    pem: Vec<u8>,
    rustls: Arc<rustls::ClientConfig>,
}

impl Tls {
    fn from_pem(pem: Vec<u8>) -> Result<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.context("tls/cert.pem holds a bad certificate")?)
                .context("tls/cert.pem: certificate not usable as a root")?;
        }
        if roots.is_empty() {
            bail!("tls/cert.pem holds no certificate");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Tls {
            pem,
            rustls: Arc::new(config),
        })
    }
}

fn build_client(tls: Option<&Tls>, local: Option<IpAddr>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .local_address(local);
    if let Some(tls) = tls {
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_pem(&tls.pem).context("relay certificate for reqwest")?,
        );
    }
    builder.build().context("building the HTTP client")
}

/// The child process, its temporary directory and what it printed.
struct Process {
    child: Child,
    dir: Option<tempfile::TempDir>,
    stderr_path: PathBuf,
    stdout_lines: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
    /// Whether an error already carried the diagnostics (then Drop does not repeat them).
    reported: bool,
}

impl Process {
    /// Reads stdout on a thread: the first line is handed back, the rest is kept for
    /// diagnostics (and so that the relay never blocks on a full pipe).
    /// Collects the process's stdout lines (into `stdout_lines`) on a thread, and hands
    /// each over on the returned channel too, which closes with stdout.
    fn read_stdout(
        &self,
        stdout: impl Read + Send + 'static,
    ) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let lines = Arc::clone(&self.stdout_lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line.clone());
                lines.lock().expect("lock poisoned").push(line);
            }
        });
        rx
    }

    fn data_dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or_else(|| Path::new("."))
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Up to two seconds for a process that closed its stdout to exit.
    async fn wait_briefly(&mut self) -> Option<ExitStatus> {
        for _ in 0..40 {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// An error saying `what`, with the process's output attached.
    fn failure(&mut self, what: String) -> anyhow::Error {
        self.reported = true;
        anyhow!("{what}\n{}", self.diagnostics())
    }

    fn diagnostics(&self) -> String {
        let stdout = self.stdout_lines.lock().expect("lock poisoned");
        format!(
            "--- relay stdout (tail) ---\n{}\n--- relay stderr (tail, {}) ---\n{}\n---",
            tail(&stdout, 10),
            self.stderr_path.display(),
            file_tail(&self.stderr_path, 40)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // libtest shows a test's captured output only when the test fails (returned
        // an error or panicked), so this is what a failing test prints about its relay.
        if !self.reported {
            eprintln!(
                "relay (pid {}) after the test:\n{}",
                self.child.id(),
                self.diagnostics()
            );
        }
        if std::env::var_os("RELAY_E2E_KEEP").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("relay-e2e: keeping {}", dir.keep().display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The running relay
// ---------------------------------------------------------------------------------

pub use relay_bench::api::{Claims, mint_token, unix_now};

/// A running relay. Dropping it kills the process.
pub struct Relay {
    process: Process,
    base: String,
    /// The operations listener (`/metrics`), `http://127.0.0.1:PORT`.
    ops: String,
    secret: String,
    config_path: PathBuf,
    tls: Option<Tls>,
    client: reqwest::Client,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("pid", &self.process.child.id())
            .field("url", &self.base)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// The base URL, `https://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> &str {
        &self.base
    }

    /// `url()` followed by `path` (which starts with `/`).
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The written `relay.toml`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The data directory (also holds `relay.toml` and `relay.stderr`).
    pub fn data_dir(&self) -> &Path {
        self.process.data_dir()
    }

    /// The configured HS256 secret.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The relay's stderr so far (its last `n` lines).
    pub fn stderr_tail(&self, n: usize) -> String {
        file_tail(&self.process.stderr_path, n)
    }

    /// The HTTP client trusting the relay's certificate (source address 127.0.0.1).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// A new HTTP client whose connections come from `ip` (any 127.x.y.z works on
    /// Linux, which routes all of 127/8 to the loopback interface).
    pub fn client_from(&self, ip: IpAddr) -> Result<reqwest::Client> {
        build_client(self.tls.as_ref(), Some(ip))
    }

    /// An HS256 JWT for `agent` signed with the relay's secret, valid for an hour.
    pub fn token(&self, agent: &str, name: &str, portals: &[&str], monitor: bool) -> String {
        mint_token(
            self.secret.as_bytes(),
            &Claims::new(agent, name, portals, monitor),
        )
    }

    /// The operations listener's base URL, `http://127.0.0.1:PORT` (no trailing slash).
    pub fn ops_url(&self) -> &str {
        &self.ops
    }

    /// `GET /metrics` of the operations listener, as text.
    pub async fn metrics(&self) -> Result<String> {
        let r = self.get(&format!("{}/metrics", self.ops)).await?;
        if r.status != 200 {
            bail!("/metrics answered {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// One value from `/metrics`; see [`metric_value`] for the query syntax.
    pub async fn metric(&self, query: &str) -> Result<Option<f64>> {
        Ok(metric_value(&self.metrics().await?, query))
    }

    /// Sends SIGTERM to the relay (a graceful drain).
    pub fn sigterm(&self) -> Result<()> {
        self.signal(rustix::process::Signal::TERM)
    }

    /// Sends SIGKILL to the relay (a crash: nothing of it runs afterwards).
    pub fn sigkill(&self) -> Result<()> {
        self.signal(rustix::process::Signal::KILL)
    }

    fn signal(&self, signal: rustix::process::Signal) -> Result<()> {
        let pid = i32::try_from(self.process.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("relay pid")?;
        rustix::process::kill_process(pid, signal)
            .with_context(|| format!("sending {signal:?} to the relay"))
    }

    /// Waits at most `timeout` for the relay to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_wait() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(self
                    .process
                    .failure(format!("relay still running {timeout:?} later")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the relay again once it has exited (a crash, SIGKILL, a stop), as a
    /// service manager would: the same binary, configuration, data directory (so the
    /// same certificate and recordings) and listening port. Waits for it to listen.
    pub async fn restart(&mut self) -> Result<()> {
        if self.process.try_wait().is_none() {
            bail!("the relay is still running; stop it before restarting it");
        }
        let bin = tokio::task::spawn_blocking(relay_binary)
            .await
            .context("binary lookup task")??;
        let dir = self
            .process
            .dir
            .take()
            .context("the relay's data directory is gone")?;
        let listen = self
            .base
            .rsplit_once("://")
            .map_or(self.base.as_str(), |(_, rest)| rest)
            .to_owned();
        // The old process has exited; its output stays in the appended stderr file.
        self.process.reported = true;
        let Launched {
            mut process,
            url,
            ops,
            tls,
        } = launch(&bin, &self.config_path, dir.path(), &listen).await?;
        process.dir = Some(dir);
        if url != self.base {
            bail!("the restarted relay listens on {url}, not on {}", self.base);
        }
        self.process = process;
        self.ops = ops;
        self.tls = tls;
        self.client = build_client(self.tls.as_ref(), None)?;
        Ok(())
    }

    /// Whether the relay process is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.try_wait().is_none()
    }

    // ----- raw HTTP ------------------------------------------------------------------

    /// `GET` of a path (`/healthz`) or a full URL, with the default client.
    pub async fn get(&self, path_or_url: &str) -> Result<RawResponse> {
        self.raw(&self.client, Method::GET, path_or_url, None, None)
            .await
    }

    /// Any request, reporting whatever came back. `body` is sent as
    /// `application/json` as it is, so malformed bodies can be sent too.
    pub async fn raw(
        &self,
        client: &reqwest::Client,
        method: Method,
        path_or_url: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse> {
        let url = if path_or_url.starts_with('/') {
            self.endpoint(path_or_url)
        } else {
            path_or_url.to_owned()
        };
        let mut req = client.request(method.clone(), &url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .text()
            .await
            .with_context(|| format!("body of {method} {url}"))?;
        Ok(RawResponse {
            request: format!("{method} {}", path_or_url),
            status,
            headers,
            body,
        })
    }

    async fn call_raw(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl Serialize + ?Sized)>,
        want: Option<u16>,
    ) -> ApiResult<RawResponse> {
        let request = format!("{method} {path}");
        let body = match body {
            Some(b) => {
                Some(serde_json::to_vec(b).map_err(|e| ApiError::local(&request, e.to_string()))?)
            }
            None => None,
        };
        let resp = self
            .raw(client, method, path, token, body)
            .await
            .map_err(|e| ApiError::local(&request, format!("{e:#}")))?;
        match want {
            Some(want) if resp.status == want => Ok(resp),
            None if (200..300).contains(&resp.status) => Ok(resp),
            Some(want) if (200..300).contains(&resp.status) => Err(ApiError {
                message: format!("succeeded with {} instead of {want}", resp.status),
                ..ApiError::from_response(&resp)
            }),
            _ => Err(ApiError::from_response(&resp)),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        client: &reqwest::Client,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl Serialize + ?Sized)>,
        want: Option<u16>,
    ) -> ApiResult<T> {
        let resp = self
            .call_raw(client, method, path, token, body, want)
            .await?;
        serde_json::from_str(&resp.body).map_err(|e| ApiError {
            request: resp.request.clone(),
            status: resp.status,
            code: None,
            message: format!("response does not parse as expected: {e}"),
            retry_after: None,
            retry_after_s: None,
            body: resp.body.clone(),
        })
    }

    async fn call_empty(&self, method: Method, path: &str, token: Option<&str>) -> ApiResult<()> {
        self.call_raw(&self.client, method, path, token, None::<&()>, Some(204))
            .await
            .map(|_| ())
    }

    // ----- typed API -----------------------------------------------------------------
    //
    // Each helper also checks the success status protocol.md documents (201 for a new
    // session, 204 for DELETE and decline, 200 for accept, monitor, PATCH and lists);
    // join and invite, for which it names none, accept any 2xx.

    /// `POST /v1/sessions`: an agent opens a session.
    pub async fn create_session(
        &self,
        token: &str,
        portal: &str,
        visibility: Visibility,
    ) -> ApiResult<CreateSessionResponse> {
        let req = CreateSessionRequest {
            portal: portal.to_owned(),
            visibility,
        };
        self.call(
            &self.client,
            Method::POST,
            "/v1/sessions",
            Some(token),
            Some(&req),
            Some(201),
        )
        .await
    }

    /// `POST /v1/join` with a support key, from 127.0.0.1.
    pub async fn join(&self, name: &str, key: &str) -> ApiResult<ParticipantCredentials> {
        self.join_from(&self.client, name, key).await
    }

    /// `POST /v1/join` with a support key, through `client` (see [`Relay::client_from`]).
    pub async fn join_from(
        &self,
        client: &reqwest::Client,
        name: &str,
        key: &str,
    ) -> ApiResult<ParticipantCredentials> {
        self.join_with_proof(client, name, key, None).await
    }

    /// `POST /v1/join` with a support key and, if given, a solved challenge.
    pub async fn join_with_proof(
        &self,
        client: &reqwest::Client,
        name: &str,
        key: &str,
        proof: Option<wire::KeyProof>,
    ) -> ApiResult<ParticipantCredentials> {
        let req = JoinRequest {
            name: name.to_owned(),
            support_key: Some(key.to_owned()),
            support_link: None,
            proof,
        };
        self.call(client, Method::POST, "/v1/join", None, Some(&req), None)
            .await
    }

    /// [`Relay::join_from`] as the customer portal does it: answered
    /// `challenge_required`, it solves the challenge and repeats the join once.
    pub async fn join_solving(
        &self,
        client: &reqwest::Client,
        name: &str,
        key: &str,
    ) -> ApiResult<ParticipantCredentials> {
        match self.join_from(client, name, key).await {
            Err(e) if e.code == Some(ErrorCode::ChallengeRequired) => {
                let challenge = e.challenge().ok_or_else(|| {
                    ApiError::local("POST /v1/join", format!("no challenge in {}", e.body))
                })?;
                self.join_with_proof(client, name, key, Some(challenge.solve()))
                    .await
            }
            other => other,
        }
    }

    /// `POST /v1/join` with the token of a support URL (its last path segment).
    pub async fn join_link(&self, name: &str, link: &str) -> ApiResult<ParticipantCredentials> {
        let req = JoinRequest {
            name: name.to_owned(),
            support_key: None,
            support_link: Some(link.to_owned()),
            proof: None,
        };
        self.call(
            &self.client,
            Method::POST,
            "/v1/join",
            None,
            Some(&req),
            None,
        )
        .await
    }

    /// `POST /v1/sessions/{sid}/invitations`.
    pub async fn invite(
        &self,
        host_token: &str,
        sid: &str,
        target: InviteTarget,
        visibility: Visibility,
        permission: Permission,
        comment: Option<&str>,
    ) -> ApiResult<InviteResponse> {
        let req = InviteRequest {
            target,
            visibility,
            permission,
            comment: comment.map(str::to_owned),
        };
        let path = format!("/v1/sessions/{sid}/invitations");
        self.call(
            &self.client,
            Method::POST,
            &path,
            Some(host_token),
            Some(&req),
            None,
        )
        .await
    }

    /// The session most media tests start from: host `a0` ("Alice Host") opens a visible
    /// session in portal `support`, invites agent `a1` (named `invitee`) with
    /// `visibility` and `permission`, `a1` accepts, and "Carol Customer" joins with the
    /// support key. Nobody has connected a WebSocket yet.
    pub async fn host_invitee_customer(
        &self,
        invitee: &str,
        visibility: Visibility,
        permission: Permission,
    ) -> Result<HostInviteeCustomer> {
        let host_jwt = self.token("a0", "Alice Host", &["support"], false);
        let session = self
            .create_session(&host_jwt, "support", Visibility::Visible)
            .await?;
        let invitee_jwt = self.token("a1", invitee, &["support"], false);
        let invitation = self
            .invite(
                &host_jwt,
                &session.session_id,
                InviteTarget::Agent("a1".into()),
                visibility,
                permission,
                None,
            )
            .await?;
        let invitee = self.accept(&invitee_jwt, &invitation.invitation_id).await?;
        let customer = self.join("Carol Customer", &session.support_key).await?;
        Ok(HostInviteeCustomer {
            host_jwt,
            session,
            invitee,
            customer,
        })
    }

    /// `POST /v1/invitations/{iid}/accept`.
    pub async fn accept(&self, token: &str, iid: &str) -> ApiResult<ParticipantCredentials> {
        let path = format!("/v1/invitations/{iid}/accept");
        self.call(
            &self.client,
            Method::POST,
            &path,
            Some(token),
            None::<&()>,
            Some(200),
        )
        .await
    }

    /// `POST /v1/invitations/{iid}/decline`.
    pub async fn decline(&self, token: &str, iid: &str) -> ApiResult<()> {
        let path = format!("/v1/invitations/{iid}/decline");
        self.call_empty(Method::POST, &path, Some(token)).await
    }

    /// `DELETE /v1/sessions/{sid}/invitations/{iid}`.
    pub async fn cancel(&self, host_token: &str, sid: &str, iid: &str) -> ApiResult<()> {
        let path = format!("/v1/sessions/{sid}/invitations/{iid}");
        self.call_empty(Method::DELETE, &path, Some(host_token))
            .await
    }

    /// `GET /v1/invitations`: the open invitations of the token's agent.
    pub async fn list_invitations(&self, token: &str) -> ApiResult<Vec<InvitationInfo>> {
        #[derive(serde::Deserialize)]
        struct List {
            invitations: Vec<InvitationInfo>,
        }
        let list: List = self
            .call(
                &self.client,
                Method::GET,
                "/v1/invitations",
                Some(token),
                None::<&()>,
                Some(200),
            )
            .await?;
        Ok(list.invitations)
    }

    /// `PATCH /v1/sessions/{sid}/participants/{pid}`.
    pub async fn update_participant(
        &self,
        host_token: &str,
        sid: &str,
        pid: &str,
        permission: Option<Permission>,
        visibility: Option<Visibility>,
    ) -> ApiResult<RosterEntry> {
        let req = UpdateParticipantRequest {
            permission,
            visibility,
        };
        let path = format!("/v1/sessions/{sid}/participants/{pid}");
        self.call(
            &self.client,
            Method::PATCH,
            &path,
            Some(host_token),
            Some(&req),
            Some(200),
        )
        .await
    }

    /// `DELETE /v1/sessions/{sid}`: the host ends the session.
    pub async fn end_session(&self, host_token: &str, sid: &str) -> ApiResult<()> {
        let path = format!("/v1/sessions/{sid}");
        self.call_empty(Method::DELETE, &path, Some(host_token))
            .await
    }

    /// `GET /v1/monitor/sessions`.
    pub async fn monitor_list(&self, token: &str) -> ApiResult<Vec<SessionSummary>> {
        let list: SessionList = self
            .call(
                &self.client,
                Method::GET,
                "/v1/monitor/sessions",
                Some(token),
                None::<&()>,
                Some(200),
            )
            .await?;
        Ok(list.sessions)
    }

    /// `POST /v1/sessions/{sid}/monitor`.
    pub async fn monitor(&self, token: &str, sid: &str) -> ApiResult<ParticipantCredentials> {
        let path = format!("/v1/sessions/{sid}/monitor");
        self.call(
            &self.client,
            Method::POST,
            &path,
            Some(token),
            None::<&()>,
            Some(200),
        )
        .await
    }

    // ----- WebSockets ----------------------------------------------------------------

    /// Opens a session WebSocket with the `ws_url` the relay handed out.
    pub async fn ws(&self, ws_url: &str, label: &str) -> Result<Ws> {
        Ws::connect(
            ws_url,
            self.tls.as_ref().map(|t| Arc::clone(&t.rustls)),
            label,
        )
        .await
    }

    /// Opens the agent console WebSocket `/v1/agent/ws?token=JWT`.
    pub async fn console(&self, jwt: &str, label: &str) -> Result<Ws> {
        let base = self
            .base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        let url = format!("{base}/v1/agent/ws?token={jwt}");
        Ws::connect(
            &url,
            self.tls.as_ref().map(|t| Arc::clone(&t.rustls)),
            label,
        )
        .await
    }
}

/// Whatever an HTTP request got back.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// What was asked, `METHOD path`.
    pub request: String,
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body as text.
    pub body: String,
}

impl RawResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("HTTP {} body is not JSON: {:?}", self.status, self.body))
    }

    /// The body as an error body `{"error": {...}}`, if it is one.
    pub fn error(&self) -> Option<wire::ErrorDetail> {
        serde_json::from_str::<ErrorBody>(&self.body)
            .ok()
            .map(|b| b.error)
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

// ---------------------------------------------------------------------------------
// API errors
// ---------------------------------------------------------------------------------

/// Result of a typed API helper.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// A refused (non-2xx) request, or one whose answer could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// What was asked, `METHOD path`.
    pub request: String,
    /// HTTP status; 0 when no answer arrived (connection refused, timeout).
    pub status: u16,
    /// The `error.code` of the body, when the body is a well-formed error.
    pub code: Option<ErrorCode>,
    /// The `error.message`, or what went wrong reading the answer.
    pub message: String,
    /// The `Retry-After` header, in seconds.
    pub retry_after: Option<u64>,
    /// The body's `error.retry_after_s`.
    pub retry_after_s: Option<u64>,
    /// The raw body.
    pub body: String,
}

impl ApiError {
    /// The body's `error.challenge`, for `challenge_required`.
    pub fn challenge(&self) -> Option<wire::KeyChallenge> {
        serde_json::from_str::<wire::ErrorBody>(&self.body)
            .ok()?
            .error
            .challenge
    }

    fn local(request: &str, message: String) -> Self {
        ApiError {
            request: request.to_owned(),
            status: 0,
            code: None,
            message,
            retry_after: None,
            retry_after_s: None,
            body: String::new(),
        }
    }

    fn from_response(resp: &RawResponse) -> Self {
        let retry_after = resp
            .header("retry-after")
            .and_then(|v| v.trim().parse().ok());
        match resp.error() {
            Some(e) => ApiError {
                request: resp.request.clone(),
                status: resp.status,
                code: Some(e.code),
                message: e.message,
                retry_after,
                retry_after_s: e.retry_after_s,
                body: resp.body.clone(),
            },
            None => ApiError {
                request: resp.request.clone(),
                status: resp.status,
                code: None,
                message: "the body is not a JSON error {\"error\":{\"code\",\"message\"}}".into(),
                retry_after,
                retry_after_s: None,
                body: resp.body.clone(),
            },
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.code.map_or("-", ErrorCode::as_str);
        write!(
            f,
            "{}: HTTP {} {code}: {}",
            self.request, self.status, self.message
        )?;
        if !self.body.is_empty() && self.code.is_none() {
            write!(f, " (body: {:?})", truncate(&self.body, 300))?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// Checks that a request was refused the way a test expects.
pub trait ExpectRefusal {
    /// The [`ApiError`] if the request failed with exactly `status` and `code`;
    /// otherwise an error describing what happened instead.
    fn refused(self, status: u16, code: ErrorCode) -> Result<ApiError>;
}

impl<T: fmt::Debug> ExpectRefusal for ApiResult<T> {
    fn refused(self, status: u16, code: ErrorCode) -> Result<ApiError> {
        match self {
            Ok(v) => bail!(
                "expected HTTP {status} {}, but the request succeeded: {v:?}",
                code.as_str()
            ),
            Err(e) if e.status == status && e.code == Some(code) => Ok(e),
            Err(e) => bail!("expected HTTP {status} {}, got {e}", code.as_str()),
        }
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

// ---------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------

pub use relay_bench::prom::metric_value;

// ---------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket to the relay. Every text message received is appended, raw, to the
/// transcript before it is handed out (or skipped), so [`Ws::transcript`] is everything
/// this client was sent, as far as it has read.
pub struct Ws {
    label: String,
    stream: WsStream,
    transcript: Vec<String>,
    closed: bool,
}

impl fmt::Debug for Ws {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ws")
            .field("label", &self.label)
            .field("received", &self.transcript.len())
            .field("closed", &self.closed())
            .finish_non_exhaustive()
    }
}

impl Ws {
    /// Connects to `url` (`wss://` trusting `tls`, or `ws://`); `label` names it in errors.
    pub async fn connect(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        label: &str,
    ) -> Result<Ws> {
        let connector = tls.map(Connector::Rustls);
        let connect = tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector);
        let (stream, _response) = tokio::time::timeout(WS_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow!("{label}: WebSocket connect timed out ({url})"))?
            .with_context(|| format!("{label}: WebSocket connect to {url}"))?;
        Ok(Ws {
            label: label.to_owned(),
            stream,
            transcript: Vec::new(),
            closed: false,
        })
    }

    /// Sends a JSON message.
    pub async fn send_json(&mut self, msg: &Value) -> Result<()> {
        self.send_raw(&msg.to_string()).await
    }

    /// Sends a text frame as it is (malformed input included).
    pub async fn send_raw(&mut self, text: &str) -> Result<()> {
        self.stream
            .send(Message::text(text.to_owned()))
            .await
            .with_context(|| format!("{}: send", self.label))
    }

    /// Sends a chat message to `audience` (`"all"` or `"agents"`).
    pub async fn chat(&mut self, text: &str, audience: &str) -> Result<()> {
        self.send_json(&serde_json::json!({"type": "chat", "text": text, "audience": audience}))
            .await
    }

    /// Sends a close frame.
    pub async fn close(&mut self) -> Result<()> {
        self.stream
            .close(None)
            .await
            .with_context(|| format!("{}: close", self.label))
    }

    /// The next JSON text message, waiting at most [`WS_TIMEOUT`].
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(WS_TIMEOUT).await
    }

    /// The next JSON text message, waiting at most `timeout`.
    pub async fn recv_within(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        match self.next_text(deadline).await? {
            Some(v) => Ok(v),
            None => bail!(
                "{}: no message within {timeout:?}; received so far:\n{}",
                self.label,
                self.recent(8)
            ),
        }
    }

    /// Reads until a message satisfies `pred` (within [`WS_TIMEOUT`]) and returns it;
    /// the others stay in the transcript only.
    pub async fn recv_until(&mut self, pred: impl FnMut(&Value) -> bool) -> Result<Value> {
        self.recv_until_within(WS_TIMEOUT, pred).await
    }

    /// [`Ws::recv_until`] with an explicit timeout.
    pub async fn recv_until_within(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let start = self.transcript.len();
        loop {
            match self.next_text(deadline).await {
                Ok(Some(v)) if pred(&v) => return Ok(v),
                Ok(Some(_)) => {}
                Ok(None) => bail!(
                    "{}: the awaited message did not come within {timeout:?}; meanwhile received:\n{}",
                    self.label,
                    self.transcript[start..].join("\n")
                ),
                Err(e) => {
                    return Err(e.context(format!(
                        "{}: while waiting, received:\n{}",
                        self.label,
                        self.transcript[start..].join("\n")
                    )));
                }
            }
        }
    }

    /// The next message of this `type`.
    pub async fn recv_type(&mut self, ty: &str) -> Result<Value> {
        self.recv_until(|m| m["type"] == ty).await
    }

    /// Fails if any message arrives (or the socket closes) within `dur`.
    pub async fn expect_silence(&mut self, dur: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + dur;
        match self.next_text(deadline).await? {
            None => Ok(()),
            Some(v) => bail!("{}: expected silence, received {v}", self.label),
        }
    }

    /// Reads everything that arrives until nothing has for `quiet` (or the socket
    /// closed), and returns it.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        while !self.closed() {
            match self.next_text(tokio::time::Instant::now() + quiet).await {
                Ok(Some(v)) => got.push(v),
                Ok(None) | Err(_) => break,
            }
        }
        got
    }

    /// Waits at most `timeout` for the relay to close the socket, reading (and
    /// recording) what comes before.
    pub async fn wait_closed(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.closed() {
            match self.next_text(deadline).await {
                Ok(Some(_)) => {}
                Ok(None) => bail!("{}: still open after {timeout:?}", self.label),
                Err(_) if self.closed() => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the relay closed the socket (close frame, end of stream or error).
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Every text message received so far, raw, oldest first.
    pub fn transcript(&self) -> &[String] {
        &self.transcript
    }

    /// `ws_url` with the resume token of the last `welcome` this socket read: what the
    /// participant connects to next (each token admits one connection).
    pub fn resume_url(&self, ws_url: &str) -> Result<String> {
        let token = self
            .transcript_json()
            .iter()
            .rev()
            .find(|m| m["type"] == "welcome")
            .and_then(|m| m["resume_token"].as_str().map(str::to_owned))
            .ok_or_else(|| anyhow!("{}: no welcome with a resume token read", self.label))?;
        Ok(relay_bench::client::resume_url(ws_url, &token))
    }

    /// The transcript parsed as JSON (messages that are not JSON are left out).
    pub fn transcript_json(&self) -> Vec<Value> {
        self.transcript
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect()
    }

    fn recent(&self, n: usize) -> String {
        tail(&self.transcript, n)
    }

    /// The next text message before `deadline`: `Ok(None)` on timeout, `Err` once the
    /// socket is closed or on a non-JSON or binary message.
    async fn next_text(&mut self, deadline: tokio::time::Instant) -> Result<Option<Value>> {
        loop {
            if self.closed() {
                bail!("{}: the socket is closed", self.label);
            }
            let next = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return Ok(None),
                Ok(next) => next,
            };
            match next {
                Some(Ok(Message::Text(text))) => {
                    self.transcript.push(text.as_str().to_owned());
                    let value = serde_json::from_str(text.as_str()).with_context(|| {
                        format!("{}: a text message is not JSON: {text:?}", self.label)
                    })?;
                    return Ok(Some(value));
                }
                Some(Ok(Message::Binary(bytes))) => {
                    self.transcript
                        .push(String::from_utf8_lossy(&bytes).into_owned());
                    bail!(
                        "{}: unexpected binary message of {} bytes",
                        self.label,
                        bytes.len()
                    );
                }
                Some(Ok(Message::Close(frame))) => {
                    self.closed = true;
                    bail!("{}: closed by the relay ({frame:?})", self.label);
                }
                Some(Ok(_)) => {} // ping, pong, raw frame
                Some(Err(e)) => {
                    self.closed = true;
                    return Err(anyhow!(e).context(format!("{}: receive", self.label)));
                }
                None => {
                    self.closed = true;
                    bail!("{}: the stream ended", self.label);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_lookup_matches_labels_and_sums() {
        let text = "# HELP relay_sessions_active Live sessions.\n\
                    # TYPE relay_sessions_active gauge\n\
                    relay_sessions_active 2\n\
                    relay_participants_active{role=\"customer\"} 1\n\
                    relay_participants_active{role=\"host\"} 3\n\
                    relay_joins_total{role=\"agent\",outcome=\"ok\"} 4\n\
                    relay_joins_total{outcome=\"refused\",role=\"agent\"} 5\n\
                    relay_weird{path=\"a\\\"b,c\"} 7 1700000000\n";
        assert_eq!(metric_value(text, "relay_sessions_active"), Some(2.0));
        assert_eq!(
            metric_value(text, "relay_participants_active{role=\"customer\"}"),
            Some(1.0)
        );
        assert_eq!(metric_value(text, "relay_participants_active"), Some(4.0));
        assert_eq!(
            metric_value(text, "relay_joins_total{role=\"agent\"}"),
            Some(9.0)
        );
        assert_eq!(
            metric_value(text, "relay_joins_total{outcome=\"ok\", role=\"agent\"}"),
            Some(4.0)
        );
        assert_eq!(
            metric_value(text, "relay_weird{path=\"a\\\"b,c\"}"),
            Some(7.0)
        );
        assert_eq!(
            metric_value(text, "relay_participants_active{role=\"supervisor\"}"),
            None
        );
        assert_eq!(metric_value(text, "relay_sessions"), None);
    }
}
