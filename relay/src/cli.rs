//! The `relay` command line: `serve`, `token`, `config check|defaults`, `review-key new`
//! and `recordings verify|repair|list|transcript|events|export`.
//!
//! Settings are layered: built-in defaults, then the `--config` file, then environment
//! variables and flags (clap reads each flag's `RELAY_*` variable; a flag given on the
//! command line wins over its variable). The merged [`Config`] is validated once, at the
//! end, so a flag can fix what the file gets wrong. `main.rs` only parses [`Cli`] and
//! dispatches; the work is here so that it can be tested without a process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::auth;
use crate::config::{Config, ConfigError, LogFormat, TlsMode};
use crate::identity::AgentIdentity;

/// Environment variable that sets `auth.hs256_secret` (there is deliberately no flag, so
/// the secret does not show up in process listings).
pub const HS256_SECRET_ENV: &str = "RELAY_AUTH_HS256_SECRET";

/// Edge relay for remote-support sessions.
///
/// A customer shares their screen with up to eight support agents through this node.
/// `relay serve` runs the node (HTTPS and WebSocket signalling on 127.0.0.1:8443 by
/// default, with a self-signed certificate in relay-data/tls/); `relay token` prints an
/// agent token for local use and tests; `relay config` checks a configuration file or
/// prints the defaults.
///
/// Settings come from built-in defaults, then a TOML file (--config), then RELAY_*
/// environment variables, then command-line flags; config/relay.toml documents every key.
#[derive(Debug, Parser)]
#[command(name = "relay", version, about, long_about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay node.
    ///
    /// Serves the HTTP API and WebSockets of docs/protocol.md until SIGTERM or Ctrl-C,
    /// then drains: no new sessions, running ones may continue until the drain deadline.
    /// Each flag overrides the matching key of the configuration file and can also be
    /// given as the environment variable shown next to it.
    ///
    /// The HS256 token secret can be set with the environment variable
    /// RELAY_AUTH_HS256_SECRET (overrides auth.hs256_secret and auth.hs256_secret_file;
    /// there is no flag, so it never shows in process listings). With no token key
    /// configured at all, a secret is generated into <data-dir>/auth/hs256.secret.
    Serve(ServeArgs),
    /// Print an agent token (JWT) signed with this node's HS256 secret.
    ///
    /// For local use and tests: the account backend normally issues tokens. The secret
    /// is found the way `relay serve` finds it (same --config, --data-dir and
    /// RELAY_AUTH_HS256_SECRET), generating <data-dir>/auth/hs256.secret if needed, so
    /// a node started later with the same settings accepts the token. The issuer and
    /// audience of the configuration are included when set.
    ///
    /// Example: HOST=$(relay token --agent alice --name "Alice" --portal support)
    Token(TokenArgs),
    /// Check a configuration file or print the default configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage the keys that protect a portal's session recordings.
    #[command(subcommand)]
    ReviewKey(ReviewKeyCommand),
    /// Review session recordings: verify, repair, list, transcript, events, export.
    ///
    /// Recordings are encrypted to their portal's review key; every subcommand needs the
    /// portal's identity file (--identity, made by `relay review-key new`) and its
    /// passphrase (asked for, or the first line of --passphrase-file). There is no
    /// reset: without the identity file and its passphrase the recordings cannot be
    /// read by anyone.
    #[command(subcommand)]
    Recordings(RecordingsCommand),
    /// Inspect the cluster this node belongs to ([cluster] redis).
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `relay cluster ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCommand {
    /// Print the nodes of the cluster (live, draining, dead; load, last heartbeat, URL)
    /// and their live sessions, read from Redis directly.
    Status {
        /// The node's configuration file; its [cluster] redis names the directory.
        #[arg(long, value_name = "FILE", env = "RELAY_CONFIG")]
        config: PathBuf,
    },
}

/// Runs a `relay cluster` subcommand; returns what to print.
pub fn run_cluster(cmd: &ClusterCommand) -> anyhow::Result<String> {
    match cmd {
        ClusterCommand::Status { config } => {
            let config = Config::load(Some(config))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(crate::cluster::status::report(&config))
        }
    }
}

/// Flags of `relay serve`; each overrides the matching configuration key.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); without it the built-in defaults apply.
    #[arg(long, value_name = "FILE", env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address and port to listen on, e.g. 0.0.0.0:8443 or [::]:8443 (key `listen`;
    /// port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "RELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL clients reach this node at, http(s)://host[:port] without a path; used in
    /// support and WebSocket URLs (key `public_url`).
    #[arg(long, value_name = "URL", env = "RELAY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Directory for the generated certificate and token secret (key `data_dir`).
    #[arg(long, value_name = "DIR", env = "RELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address and port of the operations listener (`/metrics`, `/healthz`, `/readyz`
    /// over plain HTTP; key `ops.listen`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "RELAY_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,
    /// Where the TLS certificate comes from (key `tls.mode`); "off" serves plain HTTP
    /// and is only allowed on a loopback listen address.
    #[arg(long, value_name = "MODE", value_enum, env = "RELAY_TLS")]
    pub tls: Option<TlsMode>,
    /// PEM certificate chain, leaf first, for --tls files (key `tls.cert_file`).
    #[arg(long, value_name = "FILE", env = "RELAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate, for --tls files (key `tls.key_file`).
    #[arg(long, value_name = "FILE", env = "RELAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How long a support key stays usable before a customer joins, e.g. 30m; at most
    /// 4h (key `session.key_ttl`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, env = "RELAY_KEY_TTL")]
    pub key_ttl: Option<Duration>,
    /// After SIGTERM, how long running sessions may continue before they are ended,
    /// e.g. 10m (key `drain.deadline`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, env = "RELAY_DRAIN_DEADLINE")]
    pub drain_deadline: Option<Duration>,
    /// Log line format (key `log.format`).
    #[arg(long, value_name = "FORMAT", value_enum, env = "RELAY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Which log lines to print, as a tracing filter such as "info" or
    /// "relay=debug,info" (key `log.level`).
    #[arg(long, value_name = "FILTER", env = "RELAY_LOG_LEVEL")]
    pub log_level: Option<String>,
}

impl ServeArgs {
    /// The configuration these flags describe: defaults < file < environment/flags,
    /// plus `RELAY_AUTH_HS256_SECRET`, validated as a whole.
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        self.load_config_with(std::env::var(HS256_SECRET_ENV).ok())
    }

    /// [`Self::load_config`] with the secret variable's value passed in (testable
    /// without touching the process environment).
    fn load_config_with(&self, hs256_secret: Option<String>) -> Result<Config, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::read_unvalidated(path)?,
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            cfg.listen = listen;
        }
        if let Some(url) = &self.public_url {
            cfg.public_url = Some(url.clone());
        }
        if let Some(dir) = &self.data_dir {
            cfg.data_dir = dir.clone();
        }
        if let Some(ops) = self.ops_listen {
            cfg.ops.listen = ops;
        }
        if let Some(mode) = self.tls {
            cfg.tls.mode = mode;
        }
        if let Some(cert) = &self.tls_cert {
            cfg.tls.cert_file = Some(cert.clone());
        }
        if let Some(key) = &self.tls_key {
            cfg.tls.key_file = Some(key.clone());
        }
        if let Some(ttl) = self.key_ttl {
            cfg.session.key_ttl = ttl;
        }
        if let Some(deadline) = self.drain_deadline {
            cfg.drain.deadline = deadline;
        }
        if let Some(format) = self.log_format {
            cfg.log.format = format;
        }
        if let Some(level) = &self.log_level {
            cfg.log.level = level.clone();
        }
        if let Some(secret) = hs256_secret.filter(|s| !s.is_empty()) {
            // An override: it replaces whichever HS256 source the file names.
            cfg.auth.hs256_secret = Some(secret);
            cfg.auth.hs256_secret_file = None;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Flags of `relay token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The agent's account id (claim `sub`).
    #[arg(long, value_name = "ID")]
    pub agent: String,
    /// Display name shown to the customer and other agents, 1 to 64 characters (claim `name`).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// A portal the agent belongs to (claim `portals`); repeat for several.
    #[arg(long, value_name = "PORTAL", required = true)]
    pub portal: Vec<String>,
    /// Add the "monitor" grant: the bearer is a supervisor of its portals and may
    /// monitor their sessions silently.
    #[arg(long)]
    pub monitor: bool,
    /// How long the token is valid, e.g. 1h or 30m.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, default_value = "12h")]
    pub ttl: Duration,
    /// Configuration file of the node the token is for (its [auth] section and data_dir).
    #[arg(long, value_name = "FILE", env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of the node, where a generated secret lives (key `data_dir`).
    #[arg(long, value_name = "DIR", env = "RELAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Signs a token as `relay token` describes; returns it (without a newline).
pub fn run_token(args: &TokenArgs) -> anyhow::Result<String> {
    let serve = ServeArgs {
        config: args.config.clone(),
        data_dir: args.data_dir.clone(),
        ..ServeArgs::default()
    };
    let cfg = serve.load_config()?;
    let Some(secret) = auth::resolve_hs256_secret(&cfg.auth, &cfg.data_dir, true)? else {
        bail!(
            "relay token signs with HS256; this configuration only accepts EdDSA tokens \
             (auth.ed25519_public_key_file), which the account backend signs with its \
             private key. Set auth.hs256_secret, auth.hs256_secret_file or {HS256_SECRET_ENV} \
             to also accept HS256 tokens."
        );
    };
    let who = AgentIdentity {
        agent_id: args.agent.clone(),
        name: args.name.clone(),
        portals: args.portal.clone(),
        monitor: args.monitor,
    };
    let token = auth::mint_hs256(
        &secret,
        &who,
        args.ttl,
        cfg.auth.issuer.as_deref(),
        cfg.auth.audience.as_deref(),
    )?;
    Ok(token)
}

/// `relay config ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ConfigCommand {
    /// Load and validate a configuration file; prints "ok: FILE" or says what is wrong.
    Check {
        /// The file to check.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print the built-in default configuration as TOML (config/relay.toml has the same
    /// values with explanations).
    Defaults,
}

/// `relay review-key ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ReviewKeyCommand {
    /// Make a portal's session-review key pair.
    ///
    /// Writes the private half into a new identity file, encrypted with a passphrase
    /// (asked twice, or the first line of --passphrase-file; at least 12 characters),
    /// and prints the public key for `[recording.review_keys]` in the relay's
    /// configuration. Recordings of the portal's sessions are encrypted to that public
    /// key; only the identity file together with its passphrase can read them. There is
    /// NO reset: lose the file or forget the passphrase and the recordings are lost.
    New {
        /// The portal the key is for.
        #[arg(long)]
        portal: String,
        /// Where to write the identity file (default: review-<portal>.age); an existing
        /// file is never overwritten.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Read the passphrase from the first line of this file instead of asking.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

/// The identity file and passphrase every `relay recordings` subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// The portal's identity file (from `relay review-key new`).
    #[arg(long, value_name = "FILE")]
    pub identity: PathBuf,
    /// Read the identity's passphrase from the first line of this file instead of
    /// asking.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

impl IdentityArgs {
    /// Reads the identity file and opens it with the passphrase.
    pub fn open(&self) -> anyhow::Result<age::x25519::Identity> {
        let bytes = read_capped(&self.identity, MAX_IDENTITY_FILE_BYTES).with_context(|| {
            format!("cannot read the identity file {}", self.identity.display())
        })?;
        let passphrase = read_passphrase(self.passphrase_file.as_deref(), false)?;
        crate::record::keys::open_identity(&bytes, passphrase)
            .with_context(|| format!("cannot open {}", self.identity.display()))
    }
}

/// `relay recordings ...`.
#[derive(Debug, Subcommand)]
pub enum RecordingsCommand {
    /// Check a recording: what is intact and what was lost.
    ///
    /// Prints the encryption layer's status (intact, or cut off / damaged after N
    /// bytes) and the container's report (footer, intact and corrupt chunks, lost
    /// tail, duration, record counts). Exit status: 0 when intact, 1 when something
    /// was lost (the rest is still readable; see `repair`), 2 on error (wrong
    /// passphrase, not a recording, not for this identity).
    Verify {
        /// The recording (.rec).
        file: PathBuf,
        /// The identity that opens the recording.
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Rewrite a damaged recording into a new file with a fresh index.
    ///
    /// Decrypts what is readable, keeps every chunk that verifies (byte for byte, so
    /// that the loss stays visible as missing chunk numbers), writes a new index and
    /// encrypts the result to the identity's own public key. The input is never
    /// modified and the output is never overwritten.
    Repair {
        /// The damaged recording.
        file: PathBuf,
        /// Where to write the repaired recording (a new file).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The identity that opens the recording.
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// List the recordings under a folder.
    ///
    /// One line per .rec file found (recursively): session id, portal, start (UTC),
    /// duration, agents (from the roster), size on disk and compression ratio (raw
    /// over stored chunk bytes). Recordings of other portals are listed as "not for
    /// this identity". Symbolic links (to files or folders) are never followed and
    /// `*.rec` entries that are not regular files (FIFOs, devices) are not opened: both
    /// are listed at the end as skipped.
    List {
        /// The folder (the relay writes <dir>/<portal>/<yyyy-mm-dd>/<session>.rec).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The identity that opens the recording.
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Print the chat transcript and roster changes.
    ///
    /// In time order, with the time since the start and the UTC time. Masked agents
    /// appear by name, marked "masked" (the customer saw them as anonymous); agent
    /// notes are marked "agents only".
    Transcript {
        /// The recording.
        file: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: crate::record::review::TranscriptFormat,
        /// The identity that opens the recording.
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// List the input events agents sent, with what the relay did with each.
    Events {
        /// The recording.
        file: PathBuf,
        /// The identity that opens the recording.
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Export the screen video: VP8/VP9 as WebM, H.264 as MP4.
    ///
    /// The container is chosen by --out's extension (.webm or .mp4). Frame times come
    /// from the recording; with --from the video starts at the last keyframe at or
    /// before that time, so that it decodes from its first frame. An existing output
    /// file is not overwritten.
    Export {
        /// The recording.
        file: PathBuf,
        /// The video file to write (.webm or .mp4).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Start here: seconds (90, 1.5) or a duration (1m30s) since the recording
        /// started.
        #[arg(long, value_name = "T", value_parser = crate::record::review::parse_time)]
        from: Option<u64>,
        /// Stop after this time (same forms as --from).
        #[arg(long, value_name = "T", value_parser = crate::record::review::parse_time)]
        to: Option<u64>,
        /// The identity that opens the recording.
        #[command(flatten)]
        identity: IdentityArgs,
    },
}

/// What a `relay recordings` subcommand printed, and how it ends.
#[derive(Debug)]
pub struct RecordingsOutcome {
    /// What to print on stdout.
    pub output: String,
    /// The exit status: 0, or 1 when `verify` found something lost.
    pub exit_code: u8,
}

/// Runs a `relay recordings` subcommand. Errors mean exit status 2.
pub fn run_recordings(cmd: &RecordingsCommand) -> anyhow::Result<RecordingsOutcome> {
    use crate::record::review;
    let done = |output: String| RecordingsOutcome {
        output,
        exit_code: 0,
    };
    Ok(match cmd {
        RecordingsCommand::Verify { file, identity } => {
            let (output, intact) = review::verify(file, &identity.open()?)?;
            RecordingsOutcome {
                output,
                exit_code: if intact { 0 } else { 1 },
            }
        }
        RecordingsCommand::Repair {
            file,
            out,
            identity,
        } => done(review::repair(file, out, &identity.open()?)?),
        RecordingsCommand::List { dir, identity } => done(review::list(dir, &identity.open()?)?),
        RecordingsCommand::Transcript {
            file,
            format,
            identity,
        } => done(review::transcript(file, &identity.open()?, *format)?),
        RecordingsCommand::Events { file, identity } => {
            done(review::events(file, &identity.open()?)?)
        }
        RecordingsCommand::Export {
            file,
            out,
            from,
            to,
            identity,
        } => done(review::export(file, &identity.open()?, out, *from, *to)?),
    })
}

/// Largest identity file the review tools read (one made by `relay review-key new` is
/// well under 1 KiB).
pub const MAX_IDENTITY_FILE_BYTES: u64 = 64 * 1024;
/// Longest first line of a passphrase file, in bytes.
pub const MAX_PASSPHRASE_FILE_LINE_BYTES: u64 = 4096;

/// The whole of `path` if it has at most `max` bytes; reads at most `max + 1`, so a
/// device or an endless pipe is refused at once.
fn read_capped(path: &std::path::Path, max: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        bail!("it is larger than {} KiB", max / 1024);
    }
    Ok(bytes)
}

/// The first line of `path` (without its line ending), which must end within `max`
/// bytes; reads no further than that, so a device or an endless pipe is refused at
/// once and a pipe (`<(pass show …)`) still works.
fn first_line(path: &std::path::Path, max: u64) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    let end = bytes.iter().position(|&b| b == b'\n');
    if end.is_none() && bytes.len() as u64 > max {
        bail!("its first line is longer than {max} bytes");
    }
    let line = &bytes[..end.unwrap_or(bytes.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let text = std::str::from_utf8(line).context("its first line is not UTF-8")?;
    if text.contains('\0') {
        bail!("its first line contains a NUL byte");
    }
    Ok(text.to_owned())
}

/// Reads a passphrase: the first line of `file`, or from the terminal (twice when
/// `confirm`, which must match).
pub fn read_passphrase(
    file: Option<&std::path::Path>,
    confirm: bool,
) -> anyhow::Result<age::secrecy::SecretString> {
    let passphrase = match file {
        Some(path) => first_line(path, MAX_PASSPHRASE_FILE_LINE_BYTES)
            .with_context(|| format!("cannot read the passphrase file {}", path.display()))?,
        None => {
            let first = rpassword::prompt_password("Passphrase: ")
                .context("cannot read the passphrase from the terminal (use --passphrase-file)")?;
            if confirm {
                let again = rpassword::prompt_password("Passphrase again: ")
                    .context("cannot read the passphrase from the terminal")?;
                if again != first {
                    bail!("the two passphrases differ");
                }
            }
            first
        }
    };
    Ok(age::secrecy::SecretString::from(passphrase))
}

/// Runs a `relay review-key` subcommand; returns what to print.
pub fn run_review_key(cmd: &ReviewKeyCommand) -> anyhow::Result<String> {
    match cmd {
        ReviewKeyCommand::New {
            portal,
            out,
            passphrase_file,
        } => {
            if portal.is_empty() || portal.chars().any(|c| c.is_control() || c == '"') {
                bail!("--portal must be a portal name (no quotes or control characters)");
            }
            let out = out
                .clone()
                .unwrap_or_else(|| PathBuf::from(format!("review-{portal}.age")));
            if out.exists() {
                bail!(
                    "{} exists; a review key is never overwritten (its recordings would become unreadable)",
                    out.display()
                );
            }
            let passphrase = read_passphrase(passphrase_file.as_deref(), true)?;
            let key = crate::record::keys::new_review_key(portal, passphrase, None)?;
            write_new_private_file(&out, &key.identity_file)?;
            Ok(format!(
                "wrote {file}: keep it and its passphrase safe. Neither can be recovered or \
                 reset; without both, the portal's recordings cannot be read.\n\n\
                 Add the public key to the relay's configuration:\n\n\
                 [recording.review_keys]\n\
                 {portal:?} = \"{recipient}\"",
                file = out.display(),
                recipient = key.recipient,
            ))
        }
    }
}

/// Creates `path` (never overwriting) readable by its owner only, with `bytes`.
fn write_new_private_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Runs a `relay config` subcommand; returns what to print.
pub fn run_config(cmd: &ConfigCommand) -> anyhow::Result<String> {
    match cmd {
        ConfigCommand::Check { config } => {
            Config::load(Some(config))?;
            Ok(format!("ok: {}", config.display()))
        }
        ConfigCommand::Defaults => toml::to_string_pretty(&Config::default())
            .context("cannot serialize the default configuration"),
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use clap::CommandFactory;

    use super::*;

    #[test]
    fn a_passphrase_file_is_read_to_its_first_line_and_no_further() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pass");
        fs::write(&file, "correct horse battery\r\nsecond line\n").unwrap();
        assert_eq!(first_line(&file, 4096).unwrap(), "correct horse battery");
        fs::write(&file, "no newline at the end").unwrap();
        assert_eq!(first_line(&file, 4096).unwrap(), "no newline at the end");
        // A first line of exactly the cap is fine; one byte more is not.
        fs::write(&file, format!("{}\nrest", "x".repeat(4096))).unwrap();
        assert_eq!(first_line(&file, 4096).unwrap().len(), 4096);
        fs::write(&file, "x".repeat(4097)).unwrap();
        let e = first_line(&file, 4096).unwrap_err().to_string();
        assert!(e.contains("longer than 4096 bytes"), "{e}");
        let e = first_line(Path::new("/dev/zero"), 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("longer than 4096 bytes"), "{e}");
        let e = read_capped(Path::new("/dev/zero"), MAX_IDENTITY_FILE_BYTES)
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than 64 KiB"), "{e}");
    }

    #[test]
    fn review_key_new_writes_a_private_identity_and_prints_a_usable_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        fs::write(&pass, "a long enough passphrase\nignored second line\n").unwrap();
        let out = dir.path().join("review-support.age");
        let cmd = match parse(&[
            "review-key",
            "new",
            "--portal",
            "support",
            "--out",
            out.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
        ])
        .command
        {
            Command::ReviewKey(cmd) => cmd,
            other => panic!("{other:?}"),
        };
        let printed = run_review_key(&cmd).unwrap();
        assert!(printed.contains("can be recovered or reset"), "{printed}");

        // The printed snippet is valid configuration, and the file opens with the
        // passphrase to the same key.
        let snippet = printed
            .split_once("\n\n[recording")
            .map(|(_, s)| format!("[recording{s}"))
            .unwrap();
        let mut config: Config = toml::from_str(&snippet).unwrap();
        config.validate().unwrap();
        let public = config.recording.review_keys["support"].clone();
        let identity = crate::record::keys::open_identity(
            &fs::read(&out).unwrap(),
            age::secrecy::SecretString::from("a long enough passphrase".to_owned()),
        )
        .unwrap();
        assert_eq!(identity.to_public().to_string(), public);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Never overwritten.
        let err = run_review_key(&cmd).unwrap_err().to_string();
        assert!(err.contains("never overwritten"), "{err}");
        config
            .recording
            .review_keys
            .insert("other".into(), "age1nonsense".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("recording.review_keys.other")
        );
    }

    #[test]
    fn review_key_new_refuses_a_short_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        fs::write(&pass, "short\n").unwrap();
        let out = dir.path().join("k.age");
        let cmd = ReviewKeyCommand::New {
            portal: "support".into(),
            out: Some(out.clone()),
            passphrase_file: Some(pass),
        };
        let err = run_review_key(&cmd).unwrap_err().to_string();
        assert!(err.contains("at least 12 characters"), "{err}");
        assert!(!out.exists());
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("relay").chain(args.iter().copied())).expect("parses")
    }

    fn serve_args(args: &[&str]) -> ServeArgs {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        match parse(&all).command {
            Command::Serve(a) => a,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    fn token_args(args: &[&str]) -> TokenArgs {
        let mut all = vec!["token"];
        all.extend_from_slice(args);
        match parse(&all).command {
            Command::Token(a) => a,
            other => panic!("expected token, got {other:?}"),
        }
    }

    fn path_str(p: &Path) -> &str {
        p.to_str().expect("utf-8 temp path")
    }

    #[test]
    fn command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_argument_has_help() {
        fn check(cmd: &clap::Command, path: &str) {
            let path = format!("{path} {}", cmd.get_name());
            assert!(cmd.get_about().is_some(), "{path} has no about");
            for arg in cmd.get_arguments() {
                if ["help", "version"].contains(&arg.get_id().as_str()) {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "{path} --{} has no help",
                    arg.get_id()
                );
            }
            for sub in cmd.get_subcommands() {
                check(sub, &path);
            }
        }
        check(&Cli::command(), "");
    }

    #[test]
    fn flag_over_file_over_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\ndata_dir = \"from-file\"\n\
             [session]\nkey_ttl = \"1h\"\n[log]\nlevel = \"debug\"\n",
        )
        .expect("write");
        let args = serve_args(&[
            "--config",
            path_str(&file),
            "--listen",
            "127.0.0.1:9100",
            "--key-ttl",
            "30m",
            "--log-format",
            "json",
        ]);
        let cfg = args.load_config_with(None).expect("config");
        assert_eq!(
            cfg.listen,
            "127.0.0.1:9100"
                .parse::<std::net::SocketAddr>()
                .expect("addr"),
            "flag wins"
        );
        assert_eq!(cfg.session.key_ttl, Duration::from_secs(1800), "flag wins");
        assert_eq!(cfg.log.format, LogFormat::Json, "flag over default");
        assert_eq!(
            cfg.data_dir,
            PathBuf::from("from-file"),
            "file wins over default"
        );
        assert_eq!(cfg.log.level, "debug", "file wins over default");
        assert_eq!(cfg.drain.deadline, Duration::from_secs(600), "default");
    }

    #[test]
    fn flags_are_validated_together_with_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        // Invalid on its own (plain HTTP on all interfaces) ...
        fs::write(&file, "listen = \"0.0.0.0:8080\"\n[tls]\nmode = \"off\"\n").expect("write");
        let err = serve_args(&["--config", path_str(&file)])
            .load_config_with(None)
            .expect_err("tls off on 0.0.0.0");
        assert!(err.to_string().contains("tls.mode"), "{err}");
        // ... but the flag moves it to loopback.
        serve_args(&["--config", path_str(&file), "--listen", "127.0.0.1:8080"])
            .load_config_with(None)
            .expect("valid after override");
        // And a flag can break a valid file.
        let err = serve_args(&["--key-ttl", "5h"])
            .load_config_with(None)
            .expect_err("too long");
        assert!(err.to_string().contains("session.key_ttl"), "{err}");
    }

    #[test]
    fn secret_variable_overrides_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        fs::write(&file, "[auth]\nhs256_secret_file = \"/etc/relay/secret\"\n").expect("write");
        let cfg = serve_args(&["--config", path_str(&file)])
            .load_config_with(Some("from-env".into()))
            .expect("config");
        assert_eq!(cfg.auth.hs256_secret.as_deref(), Some("from-env"));
        assert_eq!(cfg.auth.hs256_secret_file, None);
    }

    #[test]
    fn bad_flag_values_are_refused_by_clap() {
        for args in [
            ["serve", "--tls", "maybe"],
            ["serve", "--key-ttl", "soon"],
            ["serve", "--listen", "localhost"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("relay").chain(args)).is_err(),
                "{args:?}"
            );
        }
        assert_eq!(
            serve_args(&["--tls", "self-signed"]).tls,
            Some(TlsMode::SelfSigned)
        );
    }

    #[test]
    fn token_needs_a_portal() {
        let err = Cli::try_parse_from(["relay", "token", "--agent", "a", "--name", "A"])
            .expect_err("no portal");
        assert!(err.to_string().contains("--portal"), "{err}");
    }

    #[test]
    fn token_verifies_with_the_node_verifier() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let file = dir.path().join("relay.toml");
        fs::write(
            &file,
            format!(
                "data_dir = {:?}\n[auth]\nissuer = \"accounts\"\naudience = \"relay\"\n",
                path_str(&data)
            ),
        )
        .expect("write");
        let args = token_args(&[
            "--agent",
            "sue",
            "--name",
            "Sue",
            "--portal",
            "support",
            "--portal",
            "billing",
            "--monitor",
            "--ttl",
            "1h",
            "--config",
            path_str(&file),
        ]);
        assert_eq!(args.ttl, Duration::from_secs(3600));
        let token = run_token(&args).expect("token");
        assert!(auth::generated_secret_path(&data).exists());

        let cfg = Config::load(Some(&file)).expect("config");
        let who = auth::Verifier::from_config(&cfg)
            .expect("verifier")
            .verify(&token)
            .expect("valid");
        assert_eq!(
            who,
            AgentIdentity {
                agent_id: "sue".into(),
                name: "Sue".into(),
                portals: vec!["support".into(), "billing".into()],
                monitor: true,
            }
        );
        // Without the configured audience the same token is refused.
        let mut other = cfg.clone();
        other.auth.audience = Some("elsewhere".into());
        assert!(
            auth::Verifier::from_config(&other)
                .expect("verifier")
                .verify(&token)
                .is_err()
        );
    }

    #[test]
    fn token_defaults_to_twelve_hours_and_the_data_dir_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = token_args(&[
            "--agent",
            "alice",
            "--name",
            "Alice",
            "--portal",
            "support",
            "--data-dir",
            path_str(dir.path()),
        ]);
        assert_eq!(args.ttl, Duration::from_secs(12 * 3600));
        assert!(!args.monitor);
        let token = run_token(&args).expect("token");
        let cfg = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let who = auth::Verifier::from_config(&cfg)
            .expect("verifier")
            .verify(&token)
            .expect("valid");
        assert_eq!(who.agent_id, "alice");
        assert!(!who.monitor);
    }

    #[test]
    fn token_refuses_an_ed25519_only_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("relay.toml");
        fs::write(
            &file,
            format!(
                "data_dir = {:?}\n[auth]\ned25519_public_key_file = \"/etc/relay/ed.pem\"\n",
                path_str(dir.path())
            ),
        )
        .expect("write");
        let args = token_args(&[
            "--agent",
            "alice",
            "--name",
            "Alice",
            "--portal",
            "support",
            "--config",
            path_str(&file),
        ]);
        if std::env::var_os(HS256_SECRET_ENV).is_some() {
            return; // the variable would (rightly) add an HS256 secret
        }
        let err = run_token(&args).expect_err("ed25519 only");
        assert!(
            err.to_string()
                .starts_with("relay token signs with HS256; "),
            "{err}"
        );
    }

    #[test]
    fn config_check_and_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good.toml");
        fs::write(&good, "[session]\nkey_ttl = \"2h\"\n").expect("write");
        assert_eq!(
            run_config(&ConfigCommand::Check {
                config: good.clone()
            })
            .expect("ok"),
            format!("ok: {}", good.display())
        );

        let bad = dir.path().join("bad.toml");
        fs::write(&bad, "[session]\nkey_ttl = \"5h\"\n").expect("write");
        let err = run_config(&ConfigCommand::Check { config: bad }).expect_err("invalid");
        assert!(err.to_string().contains("session.key_ttl"), "{err}");

        let defaults = run_config(&ConfigCommand::Defaults).expect("defaults");
        assert_eq!(
            Config::from_toml_str(&defaults).expect("parses"),
            Config::default()
        );
        match parse(&["config", "check", "--config", "x.toml"]).command {
            Command::Config(ConfigCommand::Check { config }) => {
                assert_eq!(config, PathBuf::from("x.toml"));
            }
            other => panic!("expected config check, got {other:?}"),
        }
    }
}
