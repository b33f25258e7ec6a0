//! The node's configuration: what `config/relay.toml` may say, its defaults and its limits.
//!
//! A [`Config`] is built in layers: the defaults of this module, then a TOML file, then
//! environment variables and command-line flags (see [`crate::cli`]), and only then
//! checked as a whole by [`Config::validate`], so a flag can repair what a file gets wrong.
//! Every section refuses unknown keys, so a typo is an error rather than a silent default.
//! The shipped `config/relay.toml` lists every key with its default and is checked against
//! [`Config::default`] by a test.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest a support key (and support link) may stay valid.
pub const MAX_KEY_TTL: Duration = Duration::from_secs(4 * 3600);
/// The most sessions one agent may take part in at once (protocol limit).
pub const MAX_SESSIONS_PER_AGENT: usize = 8;
/// The smallest accepted `limits.max_message_bytes`.
pub const MIN_MESSAGE_BYTES: usize = 1024;
/// The largest accepted `limits.max_message_bytes` (1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// The largest accepted `limits.max_file_bytes` (16 GiB).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// The smallest accepted `limits.max_publish_bitrate` (100 kbit/s).
pub const MIN_PUBLISH_BITRATE: u64 = 100_000;
/// The largest accepted `limits.max_publish_bitrate` (1 Gbit/s).
pub const MAX_PUBLISH_BITRATE: u64 = 1_000_000_000;
/// The easiest accepted `limits.key_challenge_bits` (below it a challenge costs nothing).
pub const MIN_CHALLENGE_BITS: u8 = 8;
/// The hardest accepted `limits.key_challenge_max_bits` (2^26 hashes: minutes of a
/// browser's time).
pub const MAX_CHALLENGE_BITS: u8 = 26;
/// The longest accepted `limits.handshake_timeout`.
pub const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest accepted `per_second` and `burst` of a `[rate_limits]` budget.
pub const MAX_RATE_PER_SECOND: u32 = 1_000_000;

/// The whole configuration of a relay node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address and port the HTTPS (or HTTP) listener binds.
    pub listen: SocketAddr,
    /// The URL clients reach this node at (behind a proxy or a DNS name); used in
    /// support URLs and WebSocket URLs. `None`: derived from the bound address.
    pub public_url: Option<String>,
    /// Directory for state the node creates itself: the self-signed certificate and
    /// the generated HS256 secret.
    pub data_dir: PathBuf,
    /// TLS settings (`[tls]`).
    pub tls: TlsConfig,
    /// Agent token verification (`[auth]`).
    pub auth: AuthConfig,
    /// Session timers and sizes (`[session]`).
    pub session: SessionConfig,
    /// Abuse and resource limits (`[limits]`).
    pub limits: LimitsConfig,
    /// Per-participant message budgets (`[rate_limits]`).
    pub rate_limits: crate::rate_limit::RateLimits,
    /// Graceful shutdown (`[drain]`).
    pub drain: DrainConfig,
    /// Logging (`[log]`).
    pub log: LogConfig,
    /// WebRTC media plane (`[media]`).
    pub media: MediaConfig,
    /// Session recordings (`[recording]`).
    pub recording: RecordingConfig,
    /// Scale-out: the shared session directory (`[cluster]`).
    pub cluster: crate::cluster::ClusterConfig,
    /// The operations listener: metrics and health apart from the public port (`[ops]`).
    pub ops: OpsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            public_url: None,
            data_dir: PathBuf::from("relay-data"),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            session: SessionConfig::default(),
            limits: LimitsConfig::default(),
            rate_limits: crate::rate_limit::RateLimits::default(),
            drain: DrainConfig::default(),
            log: LogConfig::default(),
            media: MediaConfig::default(),
            recording: RecordingConfig::default(),
            cluster: crate::cluster::ClusterConfig::default(),
            ops: OpsConfig::default(),
        }
    }
}

/// The operations listener (`[ops]`): `GET /metrics`, `/healthz` and `/readyz` over
/// plain HTTP on an address of their own, so that what only operators may see (counts
/// of masked agents and supervisors among them) never reaches the public port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// Address and port the listener binds; loopback by default. Port 0 picks a free
    /// port, printed on stdout at start (`ops listening on http://…`).
    pub listen: SocketAddr,
    /// File holding a bearer token that `/metrics` then requires
    /// (`Authorization: Bearer <token>`); required when `listen` is not loopback.
    pub token_file: Option<PathBuf>,
}

/// The default operations address (the Prometheus exporters' port range).
pub const DEFAULT_OPS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// The shortest bearer token `ops.token_file` may hold.
pub const MIN_OPS_TOKEN_CHARS: usize = 16;

impl Default for OpsConfig {
    fn default() -> Self {
        OpsConfig {
            listen: DEFAULT_OPS_LISTEN,
            token_file: None,
        }
    }
}

impl OpsConfig {
    /// The bearer token `/metrics` requires, read from `token_file` (trimmed); `None`
    /// without one. Refuses an unreadable, over-long or too short token.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let mut raw = String::new();
        File::open(path)
            .and_then(|f| io::Read::read_to_string(&mut io::Read::take(f, 4096), &mut raw))
            .map_err(|e| ConfigError::Invalid(format!("ops.token_file {}: {e}", path.display())))?;
        let token = raw.trim();
        if token.chars().count() < MIN_OPS_TOKEN_CHARS || token.len() >= 4096 {
            return invalid(format!(
                "ops.token_file {} must hold one token of {MIN_OPS_TOKEN_CHARS} to 4095 characters",
                path.display()
            ));
        }
        Ok(Some(token.to_owned()))
    }
}

/// Where the server certificate comes from (`[tls]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// How the node gets its certificate.
    pub mode: TlsMode,
    /// PEM certificate chain (leaf first) when `mode = "files"`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) when `mode = "files"`.
    pub key_file: Option<PathBuf>,
}

/// How the node serves TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Generate a self-signed certificate into `data_dir/tls/` once and reuse it.
    #[default]
    SelfSigned,
    /// Load the certificate and key from `tls.cert_file` and `tls.key_file`.
    Files,
    /// Plain HTTP; only allowed when listening on a loopback address (e.g. behind a
    /// TLS-terminating proxy on the same host).
    Off,
}

/// How agent tokens (JWTs) are verified (`[auth]`).
///
/// With none of the three key settings, the node generates an HS256 secret into
/// `data_dir/auth/hs256.secret` on first start (see [`crate::auth`]).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared HS256 secret, inline (its UTF-8 bytes are the key).
    pub hs256_secret: Option<String>,
    /// File holding the shared HS256 secret (its contents, without trailing whitespace).
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM (SPKI, `BEGIN PUBLIC KEY`) Ed25519 public key for EdDSA tokens.
    pub ed25519_public_key_file: Option<PathBuf>,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated when checking `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret: None,
            hs256_secret_file: None,
            ed25519_public_key_file: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }
}

// By hand, so that the secret never reaches a log through `{:?}`.
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("hs256_secret_file", &self.hs256_secret_file)
            .field("ed25519_public_key_file", &self.ed25519_public_key_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Session timers and sizes (`[session]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a support key / link stays usable before a customer joins (>0, ≤ 4h).
    #[serde(with = "humantime_serde")]
    pub key_ttl: Duration,
    /// How long an invitation stays open.
    #[serde(with = "humantime_serde")]
    pub invitation_ttl: Duration,
    /// How long a disconnected customer keeps its place.
    #[serde(with = "humantime_serde")]
    pub customer_grace: Duration,
    /// How long a disconnected agent keeps its place.
    #[serde(with = "humantime_serde")]
    pub agent_grace: Duration,
    /// The longest a session may last.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    /// Sessions one agent may take part in at once (1..=8).
    pub max_sessions_per_agent: usize,
    /// Sessions one supervisor may monitor at once.
    pub max_monitored_sessions: usize,
    /// Chat messages kept per session for late joiners.
    pub chat_history: usize,
    /// Whether hosts may invite agents directly who are not members of the session's
    /// portal (off: such an invitation is never shown to them and cannot be accepted).
    pub cross_portal_invitations: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            key_ttl: MAX_KEY_TTL,
            invitation_ttl: Duration::from_secs(5 * 60),
            customer_grace: Duration::from_secs(10 * 60),
            agent_grace: Duration::from_secs(2 * 60),
            max_duration: Duration::from_secs(12 * 3600),
            max_sessions_per_agent: MAX_SESSIONS_PER_AGENT,
            max_monitored_sessions: 32,
            chat_history: 200,
            cross_portal_invitations: false,
        }
    }
}

/// Abuse and resource limits (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest HTTP body or WebSocket message (1 KiB ..= 1 MiB).
    pub max_message_bytes: usize,
    /// Wrong support keys one address may try within `key_failure_window`.
    pub key_failures_per_address: u32,
    /// The sliding window the failure budgets cover.
    #[serde(with = "humantime_serde")]
    pub key_failure_window: Duration,
    /// First lock-out of an address; doubles with each further lock-out.
    #[serde(with = "humantime_serde")]
    pub key_lockout_base: Duration,
    /// Longest lock-out of an address.
    #[serde(with = "humantime_serde")]
    pub key_lockout_max: Duration,
    /// Wrong support keys the whole node accepts within `key_failure_window` before
    /// every key attempt needs a solved proof-of-work challenge.
    pub key_failures_node: u32,
    /// Difficulty (leading zero bits of SHA-256) of the first challenge once the node's
    /// key budget is spent; 2^bits hashes on average.
    pub key_challenge_bits: u8,
    /// The difficulty the challenges grow to while the guessing goes on (one bit per
    /// doubling of the failures past the budget).
    pub key_challenge_max_bits: u8,
    /// Most simultaneous TCP connections to the signalling listener: HTTP requests and
    /// upgraded WebSockets alike, counted exactly from accept to close.
    pub max_connections: usize,
    /// Most simultaneous connections from one client address (the TCP peer; not applied
    /// with `trust_forwarded_for`, where every connection comes from the proxy).
    pub max_connections_per_address: usize,
    /// Largest file that may be offered on a `files` data channel (1 ..= 16 GiB).
    pub max_file_bytes: u64,
    /// Take the client address from the last `X-Forwarded-For` hop (only behind a
    /// proxy that sets it; otherwise clients could pick their own address).
    pub trust_forwarded_for: bool,
    /// Most bits per second one published track (a customer's screen or voice, an
    /// agent's screen share) may push into the fan-out; packets over it are dropped.
    pub max_publish_bitrate: u64,
    /// How long a new TCP connection may take to complete its TLS handshake and send
    /// its first complete HTTP request head (a WebSocket upgrade included).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a kept-alive connection may wait, from the end of a response, until the
    /// next request head is complete (idle time and a slow head together).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a request body may take to arrive in full, from its head on.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 16 * 1024,
            key_failures_per_address: 30,
            key_failure_window: Duration::from_secs(60),
            key_lockout_base: Duration::from_secs(60),
            key_lockout_max: Duration::from_secs(3600),
            key_failures_node: 300,
            key_challenge_bits: 18,
            key_challenge_max_bits: 22,
            max_connections: 10_000,
            max_connections_per_address: 256,
            max_file_bytes: 100 * 1024 * 1024,
            trust_forwarded_for: false,
            max_publish_bitrate: 20_000_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(10),
        }
    }
}

/// Graceful shutdown (`[drain]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// After SIGTERM, how long running sessions may continue before they are ended
    /// with `node_shutdown`.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        DrainConfig {
            deadline: Duration::from_secs(10 * 60),
        }
    }
}

/// The WebRTC media plane (`[media]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// The address media sockets bind (one UDP socket per peer connection). A concrete
    /// address binds that interface only; `0.0.0.0` binds every non-loopback interface.
    pub bind_ip: IpAddr,
    /// First UDP port of the media port range (inclusive).
    pub udp_port_min: u16,
    /// Last UDP port of the media port range (inclusive); the range bounds how many peer
    /// connections the node can hold at once.
    pub udp_port_max: u16,
    /// One UDP port for the media of every peer connection (a demultiplexer routes each
    /// datagram to its connection); `0` (the default) uses the port range instead.
    pub udp_mux_port: u16,
    /// One TCP port on which every peer connection also offers a passive ICE-TCP
    /// candidate, the media fallback for clients whose UDP is blocked (they pick it by
    /// themselves; ICE prefers UDP); `0` (the default) offers no TCP. Needs a concrete
    /// `bind_ip`; may be the same number as `udp_mux_port`.
    pub ice_tcp_port: u16,
    /// The public address to announce in ICE host candidates instead of the bound one
    /// (an edge node behind 1:1 NAT).
    pub public_ip: Option<IpAddr>,
    /// RTP packets queued per agent before that agent drops to the next keyframe.
    pub agent_queue_packets: usize,
    /// How long keyframe requests to the customer are coalesced.
    #[serde(with = "humantime_serde")]
    pub keyframe_window: Duration,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            bind_ip: IpAddr::from([127, 0, 0, 1]),
            udp_port_min: 40000,
            udp_port_max: 40999,
            udp_mux_port: 0,
            ice_tcp_port: 0,
            public_ip: None,
            agent_queue_packets: 512,
            keyframe_window: Duration::from_millis(300),
        }
    }
}

/// Logging (`[log]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive, e.g. `info` or `relay=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// Session recordings (`[recording]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecordingConfig {
    /// Record sessions whose portal has a review key.
    pub enabled: bool,
    /// Where recordings go (`<dir>/<portal>/<yyyy-mm-dd>/<session>.rec`); default
    /// `<data_dir>/recordings`.
    pub dir: Option<PathBuf>,
    /// Items (RTP packets of the customer's video, other records) queued per recording
    /// for its writer. Video may use three quarters of it; past that the recording
    /// keeps keyframes only until the writer catches up (64 ..= 65536).
    pub queue_items: usize,
    /// Recordings older than this are purged.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Each portal's public review key (`age1…`, printed by `relay review-key new`):
    /// its sessions' recordings are encrypted to it. A portal without one is not
    /// recorded.
    pub review_keys: std::collections::BTreeMap<String, String>,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            enabled: true,
            dir: None,
            queue_items: 2048,
            retention: Duration::from_secs(90 * 86_400),
            review_keys: std::collections::BTreeMap::new(),
        }
    }
}

impl Config {
    /// Where recordings are written: `recording.dir`, else `<data_dir>/recordings`.
    pub fn recording_dir(&self) -> PathBuf {
        self.recording
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("recordings"))
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error(
        "cannot parse config{}: {message}",
        path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default()
    )]
    Parse {
        /// The file, if the text came from one.
        path: Option<PathBuf>,
        /// The parser's message (names the key and the line).
        message: String,
    },
    /// A value is out of range or settings contradict each other; the message names the key.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses TOML text and validates the result.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        let cfg = Self::parse(s, None)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads the file at `path` (or the defaults for `None`) and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let cfg = match path {
            Some(path) => Self::read_unvalidated(path)?,
            None => Config::default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a file without validating it, for callers that layer more
    /// settings on top before validating.
    pub(crate) fn read_unvalidated(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    fn parse(s: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: path.map(Path::to_owned),
            message: e.to_string().trim_end().to_owned(),
        })
    }

    /// Checks ranges and that the settings fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.session;
        if s.key_ttl.is_zero() {
            return invalid("session.key_ttl must be more than 0");
        }
        if s.key_ttl > MAX_KEY_TTL {
            return invalid(format!(
                "session.key_ttl must be at most 4h (got {})",
                humantime::format_duration(s.key_ttl)
            ));
        }
        for (key, d) in [
            ("session.invitation_ttl", s.invitation_ttl),
            ("session.max_duration", s.max_duration),
        ] {
            if d.is_zero() {
                return invalid(format!("{key} must be more than 0"));
            }
        }
        if !(1..=MAX_SESSIONS_PER_AGENT).contains(&s.max_sessions_per_agent) {
            return invalid(format!(
                "session.max_sessions_per_agent must be between 1 and {MAX_SESSIONS_PER_AGENT} (got {})",
                s.max_sessions_per_agent
            ));
        }

        let m = &self.media;
        if m.udp_port_min == 0 || m.udp_port_min > m.udp_port_max {
            return invalid(format!(
                "media.udp_port_min..media.udp_port_max must be a non-empty range of non-zero ports (got {}..{})",
                m.udp_port_min, m.udp_port_max
            ));
        }
        if m.udp_mux_port != 0 && m.bind_ip.is_unspecified() {
            // One socket on the wildcard could not tell which address a datagram was
            // sent to, nor answer from that address.
            return invalid(format!(
                "media.udp_mux_port needs a concrete media.bind_ip, not {}",
                m.bind_ip
            ));
        }
        if m.ice_tcp_port != 0 && m.bind_ip.is_unspecified() {
            // Passive candidates name one address, which the wildcard is not.
            return invalid(format!(
                "media.ice_tcp_port needs a concrete media.bind_ip, not {}",
                m.bind_ip
            ));
        }
        if m.ice_tcp_port != 0
            && m.ice_tcp_port == self.listen.port()
            && (m.bind_ip == self.listen.ip() || self.listen.ip().is_unspecified())
        {
            return invalid(format!(
                "media.ice_tcp_port {} is the port the signalling listener uses ({})",
                m.ice_tcp_port, self.listen
            ));
        }
        if !(16..=65536).contains(&m.agent_queue_packets) {
            return invalid(format!(
                "media.agent_queue_packets must be between 16 and 65536 (got {})",
                m.agent_queue_packets
            ));
        }
        if m.keyframe_window.is_zero() || m.keyframe_window > Duration::from_secs(5) {
            return invalid("media.keyframe_window must be more than 0 and at most 5s");
        }

        let l = &self.limits;
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&l.max_message_bytes) {
            return invalid(format!(
                "limits.max_message_bytes must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES} (got {})",
                l.max_message_bytes
            ));
        }
        for (key, n) in [
            (
                "limits.key_failures_per_address",
                l.key_failures_per_address,
            ),
            ("limits.key_failures_node", l.key_failures_node),
        ] {
            if n == 0 {
                return invalid(format!("{key} must be at least 1"));
            }
        }
        if l.max_connections == 0 {
            return invalid("limits.max_connections must be at least 1");
        }
        if l.max_connections_per_address == 0 {
            return invalid("limits.max_connections_per_address must be at least 1");
        }
        if !(1..=MAX_FILE_BYTES).contains(&l.max_file_bytes) {
            return invalid(format!(
                "limits.max_file_bytes must be between 1 and {MAX_FILE_BYTES} (got {})",
                l.max_file_bytes
            ));
        }
        if !(MIN_PUBLISH_BITRATE..=MAX_PUBLISH_BITRATE).contains(&l.max_publish_bitrate) {
            return invalid(format!(
                "limits.max_publish_bitrate must be between {MIN_PUBLISH_BITRATE} and {MAX_PUBLISH_BITRATE} bits per second (got {})",
                l.max_publish_bitrate
            ));
        }
        if l.handshake_timeout < Duration::from_millis(100)
            || l.handshake_timeout > MAX_HANDSHAKE_TIMEOUT
        {
            return invalid(format!(
                "limits.handshake_timeout must be between 100ms and 5m (got {})",
                humantime::format_duration(l.handshake_timeout)
            ));
        }
        for (key, d) in [
            ("limits.idle_timeout", l.idle_timeout),
            ("limits.body_timeout", l.body_timeout),
        ] {
            if d < Duration::from_millis(100) || d > MAX_HANDSHAKE_TIMEOUT {
                return invalid(format!(
                    "{key} must be between 100ms and 5m (got {})",
                    humantime::format_duration(d)
                ));
            }
        }
        for (key, d) in [
            ("limits.key_failure_window", l.key_failure_window),
            ("limits.key_lockout_base", l.key_lockout_base),
        ] {
            if d.is_zero() {
                return invalid(format!("{key} must be more than 0"));
            }
        }
        if !(MIN_CHALLENGE_BITS..=MAX_CHALLENGE_BITS).contains(&l.key_challenge_bits)
            || !(l.key_challenge_bits..=MAX_CHALLENGE_BITS).contains(&l.key_challenge_max_bits)
        {
            return invalid(format!(
                "limits.key_challenge_bits ({}) and limits.key_challenge_max_bits ({}) must satisfy \
                 {MIN_CHALLENGE_BITS} <= key_challenge_bits <= key_challenge_max_bits <= {MAX_CHALLENGE_BITS}",
                l.key_challenge_bits, l.key_challenge_max_bits
            ));
        }
        if l.key_lockout_max < l.key_lockout_base {
            return invalid(format!(
                "limits.key_lockout_max ({}) must be at least limits.key_lockout_base ({})",
                humantime::format_duration(l.key_lockout_max),
                humantime::format_duration(l.key_lockout_base)
            ));
        }

        for (class, limit) in self.rate_limits.all() {
            let key = format!("rate_limits.{}", class.as_str());
            if !(1..=MAX_RATE_PER_SECOND).contains(&limit.per_second) {
                return invalid(format!(
                    "{key}.per_second must be between 1 and {MAX_RATE_PER_SECOND} (got {})",
                    limit.per_second
                ));
            }
            if !(1..=MAX_RATE_PER_SECOND).contains(&limit.burst) {
                return invalid(format!(
                    "{key}.burst must be between 1 and {MAX_RATE_PER_SECOND} (got {})",
                    limit.burst
                ));
            }
        }

        match self.tls.mode {
            TlsMode::Files => {
                if self.tls.cert_file.is_none() {
                    return invalid("tls.cert_file is required when tls.mode is \"files\"");
                }
                if self.tls.key_file.is_none() {
                    return invalid("tls.key_file is required when tls.mode is \"files\"");
                }
            }
            TlsMode::Off if !self.listen.ip().is_loopback() => {
                return invalid(format!(
                    "tls.mode \"off\" is only allowed on a loopback listen address (listen is {})",
                    self.listen
                ));
            }
            TlsMode::Off | TlsMode::SelfSigned => {}
        }

        if !self.ops.listen.ip().is_loopback() && self.ops.token_file.is_none() {
            return invalid(format!(
                "ops.listen {} is not a loopback address: set ops.token_file so that /metrics needs a token",
                self.ops.listen
            ));
        }
        if self.ops.listen == self.listen && self.listen.port() != 0 {
            return invalid(format!(
                "ops.listen and listen are both {}; the operations listener needs its own port",
                self.listen
            ));
        }

        if let Some(url) = &self.public_url {
            check_public_url(url)?;
        }
        self.cluster
            .validate(self.listen.ip().is_unspecified(), self.public_url.is_some())?;

        let a = &self.auth;
        if a.hs256_secret.is_some() && a.hs256_secret_file.is_some() {
            return invalid("auth.hs256_secret and auth.hs256_secret_file are both set; keep one");
        }
        if a.hs256_secret.as_deref().is_some_and(str::is_empty) {
            return invalid("auth.hs256_secret must not be empty");
        }
        for (key, v) in [("auth.issuer", &a.issuer), ("auth.audience", &a.audience)] {
            if v.as_deref().is_some_and(str::is_empty) {
                return invalid(format!(
                    "{key} must not be empty (remove it to not check it)"
                ));
            }
        }

        let r = &self.recording;
        if !(64..=65_536).contains(&r.queue_items) {
            return invalid(format!(
                "recording.queue_items must be 64 ..= 65536 (got {})",
                r.queue_items
            ));
        }
        if r.retention < Duration::from_secs(3600) {
            return invalid("recording.retention must be at least 1h");
        }
        if r.dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return invalid("recording.dir must not be empty (remove it for the default)");
        }
        for (portal, key) in &self.recording.review_keys {
            if let Err(e) = crate::record::keys::parse_recipient(key) {
                return invalid(format!("recording.review_keys.{portal}: {e}"));
            }
        }

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            ));
        }
        Ok(())
    }

    /// The URL clients reach this node at, without a trailing `/`: `public_url` if set,
    /// else built from the bound address (`https://`, or `http://` with TLS off).
    pub fn base_url(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.tls_enabled() { "https" } else { "http" };
                // SocketAddr's Display puts IPv6 addresses in brackets.
                format!("{scheme}://{bound}")
            }
        }
    }

    /// Whether the listener speaks TLS.
    pub fn tls_enabled(&self) -> bool {
        self.tls.mode != TlsMode::Off
    }

    /// The host part of `public_url` (without brackets or port), if one is set.
    pub(crate) fn public_host(&self) -> Option<String> {
        let url = self.public_url.as_deref()?;
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next().unwrap_or(v6)
        } else {
            authority.split(':').next().unwrap_or(authority)
        };
        (!host.is_empty()).then(|| host.to_owned())
    }
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(message.into()))
}

fn check_public_url(url: &str) -> Result<(), ConfigError> {
    let bad = |why: &str| invalid(format!("public_url {url:?} {why}"));
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return bad("must start with https:// or http://");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return bad("has no host");
    }
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '?' | '#'))
    {
        return bad("must be scheme://host[:port] (no credentials, spaces, query or fragment)");
    }
    if !path.is_empty() && path != "/" {
        return bad("must not have a path (the relay serves from the root)");
    }
    Ok(())
}

/// Creates a new file readable only by its owner (mode 0600 on unix), creating its
/// parent directories; fails with `AlreadyExists` if the file exists. Used for the
/// generated private key and HS256 secret.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../config/relay.toml");

    fn with(edit: impl FnOnce(&mut Config)) -> Config {
        let mut cfg = Config::default();
        edit(&mut cfg);
        cfg
    }

    fn invalid_message(cfg: &Config) -> String {
        match cfg.validate() {
            Err(ConfigError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_operations_listener_needs_a_token_off_loopback_and_a_port_of_its_own() {
        let wide: SocketAddr = "0.0.0.0:9464".parse().expect("addr");
        let m = invalid_message(&with(|c| c.ops.listen = wide));
        assert!(m.contains("ops.token_file"), "{m}");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        fs::write(&file, "  0123456789abcdef \n").expect("write");
        let cfg = with(|c| {
            c.ops.listen = wide;
            c.ops.token_file = Some(file.clone());
        });
        cfg.validate().expect("a token makes a wide listener valid");
        assert_eq!(
            cfg.ops.token().expect("token").as_deref(),
            Some("0123456789abcdef")
        );
        fs::write(&file, "short").expect("write");
        assert!(cfg.ops.token().is_err(), "a short token is refused");
        let m = invalid_message(&with(|c| c.ops.listen = c.listen));
        assert!(m.contains("its own port"), "{m}");
    }

    #[test]
    fn shipped_file_is_the_defaults() {
        let cfg = Config::from_toml_str(SHIPPED).expect("shipped config parses");
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        Config::default().validate().expect("defaults valid");
        let text = toml::to_string_pretty(&Config::default()).expect("serializes");
        assert!(text.contains("key_ttl = \"4h\""), "{text}");
        assert_eq!(
            Config::from_toml_str(&text).expect("parses"),
            Config::default()
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(
            Config::from_toml_str("").expect("parses"),
            Config::default()
        );
    }

    #[test]
    fn values_parse() {
        let cfg = Config::from_toml_str(
            r#"
            listen = "[::1]:9443"
            public_url = "https://relay.example.com/"
            [tls]
            mode = "files"
            cert_file = "/etc/relay/cert.pem"
            key_file = "/etc/relay/key.pem"
            [session]
            key_ttl = "30m"
            [log]
            format = "json"
            level = "relay=debug,info"
            "#,
        )
        .expect("parses");
        assert_eq!(
            cfg.listen,
            "[::1]:9443".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(cfg.tls.mode, TlsMode::Files);
        assert_eq!(cfg.session.key_ttl, Duration::from_secs(1800));
        assert_eq!(cfg.session.agent_grace, Duration::from_secs(120));
        assert_eq!(cfg.log.format, LogFormat::Json);
        assert_eq!(
            cfg.base_url("[::1]:9443".parse().expect("addr")),
            "https://relay.example.com"
        );
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = Config::from_toml_str("[session]\nkey_tll = \"1h\"\n").expect_err("typo");
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("key_tll"), "{err}");

        let err = Config::from_toml_str("lisen = \"127.0.0.1:1\"\n").expect_err("typo");
        assert!(err.to_string().contains("lisen"), "{err}");

        let err = Config::from_toml_str("[tls]\nmode = \"selfsigned\"\n").expect_err("bad mode");
        assert!(err.to_string().contains("selfsigned"), "{err}");
    }

    #[test]
    fn key_ttl_limits() {
        let m = invalid_message(&with(|c| c.session.key_ttl = Duration::from_secs(5 * 3600)));
        assert_eq!(m, "session.key_ttl must be at most 4h (got 5h)");
        let m = invalid_message(&with(|c| c.session.key_ttl = Duration::ZERO));
        assert!(m.contains("session.key_ttl"), "{m}");
        let err = Config::from_toml_str("[session]\nkey_ttl = \"5h\"\n").expect_err("too long");
        assert!(err.to_string().contains("session.key_ttl"), "{err}");
    }

    #[test]
    fn sessions_per_agent_limits() {
        for n in [0, 9] {
            let m = invalid_message(&with(|c| c.session.max_sessions_per_agent = n));
            assert!(m.contains("session.max_sessions_per_agent"), "{m}");
        }
        with(|c| c.session.max_sessions_per_agent = 1)
            .validate()
            .expect("1 is fine");
    }

    #[test]
    fn message_size_limits() {
        for n in [1023, 1024 * 1024 + 1] {
            let m = invalid_message(&with(|c| c.limits.max_message_bytes = n));
            assert!(m.contains("limits.max_message_bytes"), "{m}");
        }
        for n in [1024, 1024 * 1024] {
            with(|c| c.limits.max_message_bytes = n)
                .validate()
                .expect("bounds are inclusive");
        }
    }

    #[test]
    fn publish_bitrate_and_handshake_limits() {
        let d = Config::default();
        assert_eq!(d.limits.max_publish_bitrate, 20_000_000);
        assert_eq!(d.limits.handshake_timeout, Duration::from_secs(10));
        for n in [MIN_PUBLISH_BITRATE - 1, MAX_PUBLISH_BITRATE + 1] {
            let m = invalid_message(&with(|c| c.limits.max_publish_bitrate = n));
            assert!(m.contains("limits.max_publish_bitrate"), "{m}");
        }
        for n in [MIN_PUBLISH_BITRATE, MAX_PUBLISH_BITRATE] {
            with(|c| c.limits.max_publish_bitrate = n)
                .validate()
                .expect("bounds are inclusive");
        }
        for t in [
            Duration::from_millis(99),
            MAX_HANDSHAKE_TIMEOUT + Duration::from_secs(1),
        ] {
            let m = invalid_message(&with(|c| c.limits.handshake_timeout = t));
            assert!(m.contains("limits.handshake_timeout"), "{m}");
        }
        let cfg = Config::from_toml_str(
            "[limits]\nmax_publish_bitrate = 5000000\nhandshake_timeout = \"2s\"\n",
        )
        .expect("parses");
        assert_eq!(cfg.limits.max_publish_bitrate, 5_000_000);
        assert_eq!(cfg.limits.handshake_timeout, Duration::from_secs(2));
    }

    #[test]
    fn connection_limits_and_deadlines() {
        let d = Config::default();
        assert_eq!(d.limits.max_connections_per_address, 256);
        assert_eq!(d.limits.idle_timeout, Duration::from_secs(30));
        assert_eq!(d.limits.body_timeout, Duration::from_secs(10));
        let m = invalid_message(&with(|c| c.limits.max_connections_per_address = 0));
        assert!(m.contains("limits.max_connections_per_address"), "{m}");
        for t in [
            Duration::from_millis(99),
            MAX_HANDSHAKE_TIMEOUT + Duration::from_secs(1),
        ] {
            let m = invalid_message(&with(|c| c.limits.idle_timeout = t));
            assert!(m.contains("limits.idle_timeout"), "{m}");
            let m = invalid_message(&with(|c| c.limits.body_timeout = t));
            assert!(m.contains("limits.body_timeout"), "{m}");
        }
        let cfg = Config::from_toml_str(
            "[limits]\nmax_connections_per_address = 8\nidle_timeout = \"1s\"\nbody_timeout = \"2s\"\n",
        )
        .expect("parses");
        assert_eq!(cfg.limits.max_connections_per_address, 8);
        assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(1));
        assert_eq!(cfg.limits.body_timeout, Duration::from_secs(2));
    }

    #[test]
    fn file_size_limits() {
        assert_eq!(Config::default().limits.max_file_bytes, 100 * 1024 * 1024);
        for n in [0, MAX_FILE_BYTES + 1] {
            let m = invalid_message(&with(|c| c.limits.max_file_bytes = n));
            assert!(m.contains("limits.max_file_bytes"), "{m}");
        }
        for n in [1, MAX_FILE_BYTES] {
            with(|c| c.limits.max_file_bytes = n)
                .validate()
                .expect("bounds are inclusive");
        }
        let cfg = Config::from_toml_str("[limits]\nmax_file_bytes = 1024\n").expect("parses");
        assert_eq!(cfg.limits.max_file_bytes, 1024);
    }

    #[test]
    fn other_ranges() {
        let m = invalid_message(&with(|c| c.limits.key_failures_per_address = 0));
        assert!(m.contains("limits.key_failures_per_address"), "{m}");
        let m = invalid_message(&with(|c| c.limits.key_lockout_max = Duration::from_secs(1)));
        assert!(m.contains("limits.key_lockout_max"), "{m}");
        let m = invalid_message(&with(|c| c.session.invitation_ttl = Duration::ZERO));
        assert!(m.contains("session.invitation_ttl"), "{m}");
        let m = invalid_message(&with(|c| c.log.level = "info,=[".to_owned()));
        assert!(m.contains("log.level"), "{m}");
    }

    #[test]
    fn ice_tcp_port_needs_a_concrete_bind_ip_and_its_own_port() {
        let cfg = Config::from_toml_str("[media]\nice_tcp_port = 3478\nudp_mux_port = 3478\n")
            .expect("parses: the same number as the UDP mux is fine");
        assert_eq!(cfg.media.ice_tcp_port, 3478);
        assert_eq!(Config::default().media.ice_tcp_port, 0, "off by default");
        let m = invalid_message(&with(|c| {
            c.media.ice_tcp_port = 3478;
            c.media.bind_ip = IpAddr::from([0, 0, 0, 0]);
        }));
        assert!(m.contains("media.ice_tcp_port"), "{m}");
        let m = invalid_message(&with(|c| {
            c.media.ice_tcp_port = c.listen.port();
        }));
        assert!(m.contains("signalling listener"), "{m}");
    }

    #[test]
    fn udp_mux_port_needs_a_concrete_bind_ip() {
        let cfg = Config::from_toml_str("[media]\nudp_mux_port = 3478\n").expect("parses");
        assert_eq!(cfg.media.udp_mux_port, 3478);
        let m = invalid_message(&with(|c| {
            c.media.udp_mux_port = 3478;
            c.media.bind_ip = IpAddr::from([0, 0, 0, 0]);
        }));
        assert!(m.contains("media.udp_mux_port"), "{m}");
        // The wildcard stays fine for the port range.
        with(|c| c.media.bind_ip = IpAddr::from([0, 0, 0, 0]))
            .validate()
            .expect("range mode on 0.0.0.0");
    }

    #[test]
    fn tls_files_needs_both_files() {
        let m = invalid_message(&with(|c| c.tls.mode = TlsMode::Files));
        assert!(m.contains("tls.cert_file"), "{m}");
        let m = invalid_message(&with(|c| {
            c.tls.mode = TlsMode::Files;
            c.tls.cert_file = Some("c.pem".into());
        }));
        assert!(m.contains("tls.key_file"), "{m}");
    }

    #[test]
    fn tls_off_only_on_loopback() {
        let m = invalid_message(&with(|c| {
            c.tls.mode = TlsMode::Off;
            c.listen = "0.0.0.0:8080".parse().expect("addr");
        }));
        assert!(m.contains("tls.mode") && m.contains("0.0.0.0:8080"), "{m}");
        for addr in ["127.0.0.1:8080", "[::1]:8080"] {
            with(|c| {
                c.tls.mode = TlsMode::Off;
                c.listen = addr.parse().expect("addr");
            })
            .validate()
            .expect("loopback is fine");
        }
    }

    #[test]
    fn public_url_shape() {
        for bad in [
            "relay.example.com",
            "ftp://relay.example.com",
            "https://",
            "https://relay.example.com/support",
            "https://user@relay.example.com",
            "https://relay.example.com?x=1",
        ] {
            let m = invalid_message(&with(|c| c.public_url = Some(bad.to_owned())));
            assert!(m.contains("public_url"), "{bad}: {m}");
        }
        for good in [
            "https://relay.example.com",
            "https://relay.example.com/",
            "http://10.0.0.1:8080",
            "https://[2001:db8::1]:8443",
        ] {
            with(|c| c.public_url = Some(good.to_owned()))
                .validate()
                .expect(good);
        }
    }

    #[test]
    fn hs256_secret_not_twice() {
        let m = invalid_message(&with(|c| {
            c.auth.hs256_secret = Some("s3cret".to_owned());
            c.auth.hs256_secret_file = Some("secret.txt".into());
        }));
        assert!(
            m.contains("auth.hs256_secret") && m.contains("auth.hs256_secret_file"),
            "{m}"
        );
    }

    #[test]
    fn base_url_from_bound_address() {
        let cfg = Config::default();
        assert_eq!(
            cfg.base_url("127.0.0.1:8443".parse().expect("addr")),
            "https://127.0.0.1:8443"
        );
        assert_eq!(
            cfg.base_url("[::1]:8443".parse().expect("addr")),
            "https://[::1]:8443"
        );
        let off = with(|c| c.tls.mode = TlsMode::Off);
        assert!(!off.tls_enabled());
        assert_eq!(
            off.base_url("127.0.0.1:80".parse().expect("addr")),
            "http://127.0.0.1:80"
        );
    }

    #[test]
    fn public_host() {
        let host = |url: &str| with(|c| c.public_url = Some(url.to_owned())).public_host();
        assert_eq!(
            host("https://relay.example.com:8443/").as_deref(),
            Some("relay.example.com")
        );
        assert_eq!(
            host("https://[2001:db8::1]:8443").as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(Config::default().public_host(), None);
    }

    #[test]
    fn debug_hides_the_secret() {
        let cfg = with(|c| c.auth.hs256_secret = Some("do-not-print".to_owned()));
        assert!(!format!("{cfg:?}").contains("do-not-print"));
    }

    #[test]
    fn load_reports_the_path() {
        let err = Config::load(Some(Path::new("/nonexistent/relay.toml"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/relay.toml"), "{err}");
        assert_eq!(Config::load(None).expect("defaults"), Config::default());
    }
}
