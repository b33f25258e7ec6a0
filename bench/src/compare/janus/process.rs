//! Janus started by the bench: a generated configuration in a temporary directory (only
//! the VideoRoom plugin and the HTTP transport, ICE on one local address, no STUN), a
//! free loopback port for its API and another for its Admin API, and the process killed
//! when [`LocalJanus`] is dropped.
//!
//! ICE cannot run on 127.0.0.1: Janus skips loopback interfaces when it lists the
//! addresses to gather on (`janus_ice_setup_local`), and with none left libnice gathers
//! on every interface. So Janus is held to one IPv4 address of a non-loopback interface
//! ([`ice_address`]), and the bench's peers bind to the same address: traffic between
//! two addresses of this machine still never leaves it (the kernel routes it through
//! the loopback device).

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::relay_process::{ProcessError, STARTUP_TIMEOUT, startup_failed};
use crate::run::RunError;

/// What to tell someone without Janus.
pub const INSTALL_HINT: &str = "install Janus: apt-get install janus (or pass --janus-bin)";

/// Where Janus's RTP/RTCP sockets are bound (its default range).
const RTP_PORT_RANGE: &str = "20000-40000";

/// A running Janus; dropping it kills the process.
pub struct LocalJanus {
    child: Child,
    api_url: String,
    admin_url: String,
    admin_secret: String,
    ice_address: Ipv4Addr,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for LocalJanus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalJanus")
            .field("pid", &self.child.id())
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Process(ProcessError::Io { what, source })
}

impl LocalJanus {
    /// Writes the configuration and starts `binary` with it; returns once its HTTP API
    /// answers `info` (at most [`STARTUP_TIMEOUT`]).
    pub async fn start(binary: &Path, http: &reqwest::Client) -> Result<Self, RunError> {
        if !binary.is_file() {
            return Err(RunError::Setup(format!(
                "no Janus binary at {}: {INSTALL_HINT}",
                binary.display()
            )));
        }
        let modules = module_dir(binary)?;
        let ice_address = ice_address()?;
        let dir = tempfile::Builder::new()
            .prefix("relay-bench-janus-")
            .tempdir()
            .map_err(io("creating Janus's configuration directory".into()))?;
        let folders = ModuleFolders {
            plugins: dir.path().join("plugins"),
            transports: dir.path().join("transports"),
            none: dir.path().join("none"),
        };
        // Folders holding only the two modules used: Janus loads every library it finds.
        for (folder, module) in [
            (
                &folders.plugins,
                modules.join("plugins/libjanus_videoroom.so"),
            ),
            (
                &folders.transports,
                modules.join("transports/libjanus_http.so"),
            ),
        ] {
            std::fs::create_dir(folder).map_err(io(format!("creating {}", folder.display())))?;
            let name = module.file_name().unwrap_or_default();
            std::os::unix::fs::symlink(&module, folder.join(name))
                .map_err(io(format!("linking {}", module.display())))?;
        }
        std::fs::create_dir(&folders.none)
            .map_err(io(format!("creating {}", folders.none.display())))?;
        let ports = (free_port()?, free_port()?);
        let admin_secret: String = rand::random::<[u8; 16]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        for (name, text) in config_files(dir.path(), &folders, ports, &admin_secret, ice_address) {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        }

        let log = dir.path().join("janus.log");
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(dir.path().join("janus.jcfg"))
            .arg("--configs-folder")
            .arg(dir.path())
            .arg("--log-file")
            .arg(&log)
            .args(["--disable-stdout", "--disable-colors"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let api_url = format!("http://127.0.0.1:{}/janus", ports.0);
        if let Err(why) = wait_ready(&mut child, &api_url, http).await {
            return Err(RunError::Process(startup_failed(child, "Janus", &log, why)));
        }
        Ok(LocalJanus {
            child,
            api_url,
            admin_url: format!("http://127.0.0.1:{}/admin", ports.1),
            admin_secret,
            ice_address,
            _dir: dir,
        })
    }

    /// Its Janus API, `http://127.0.0.1:PORT/janus`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// Its Admin API, `http://127.0.0.1:PORT/admin`.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// The secret its Admin API wants.
    pub fn admin_secret(&self) -> &str {
        &self.admin_secret
    }

    /// The one address its ICE uses, where its peers must bind.
    pub fn ice_address(&self) -> Ipv4Addr {
        self.ice_address
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LocalJanus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET <api_url>/info` until it answers `server_info` naming the VideoRoom
/// plugin; says why not when the process exits or time runs out
/// ([`STARTUP_TIMEOUT`]).
async fn wait_ready(
    child: &mut Child,
    api_url: &str,
    http: &reqwest::Client,
) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("it exited ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("its API did not answer within {STARTUP_TIMEOUT:?}"));
        }
        let info = http.get(format!("{api_url}/info")).send().await;
        if let Ok(response) = info
            && let Ok(info) = response.json::<serde_json::Value>().await
        {
            if info["plugins"]["janus.plugin.videoroom"].is_object() {
                return Ok(());
            }
            return Err(format!("its info names no VideoRoom plugin: {info}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The folder of Janus's loadable modules (`plugins/`, `transports/`...) for the binary
/// `<prefix>/bin/janus`: `<prefix>/lib/janus` or, on Debian, `<prefix>/lib/<triplet>/janus`.
fn module_dir(binary: &Path) -> Result<PathBuf, RunError> {
    let binary = binary.canonicalize().unwrap_or_else(|_| binary.to_owned());
    let lib = binary
        .parent()
        .and_then(Path::parent)
        .map(|prefix| prefix.join("lib"))
        .unwrap_or_else(|| PathBuf::from("/usr/lib"));
    let mut candidates = vec![lib.join("janus")];
    if let Ok(entries) = std::fs::read_dir(&lib) {
        candidates.extend(entries.flatten().map(|e| e.path().join("janus")));
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("plugins/libjanus_videoroom.so").is_file())
        .ok_or_else(|| {
            RunError::Setup(format!(
                "no Janus VideoRoom plugin (libjanus_videoroom.so) under {}: {INSTALL_HINT}",
                lib.display()
            ))
        })
}

/// The address Janus and the bench's peers do ICE on: the first IPv4 address of an
/// interface that is up, running and not loopback.
pub fn ice_address() -> Result<Ipv4Addr, RunError> {
    use nix::net::if_::InterfaceFlags;
    let wanted = InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING;
    let addresses = nix::ifaddrs::getifaddrs()
        .map_err(|e| RunError::Setup(format!("listing network interfaces: {e}")))?;
    addresses
        .filter(|a| a.flags.contains(wanted) && !a.flags.contains(InterfaceFlags::IFF_LOOPBACK))
        .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
        .find(|ip| !ip.is_unspecified())
        .ok_or_else(|| {
            RunError::Setup(
                "Janus does ICE on no loopback address, and this machine has no other IPv4 \
                 interface up: add one (e.g. a dummy interface with a private address)"
                    .into(),
            )
        })
}

/// A loopback TCP port free now (Janus binds it a moment later).
fn free_port() -> Result<u16, RunError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port".into()))
}

/// Where Janus finds its modules: folders the bench fills with links to the ones used.
struct ModuleFolders {
    plugins: PathBuf,
    transports: PathBuf,
    /// An empty folder, for event handlers and loggers.
    none: PathBuf,
}

/// `janus.jcfg`, the HTTP transport's and the VideoRoom plugin's configuration, for
/// Janus with its configuration in `dir`, its API on port `ports.0` and its Admin API
/// on `ports.1` (both on 127.0.0.1), ICE on `ice_address` only.
fn config_files(
    dir: &Path,
    folders: &ModuleFolders,
    (api_port, admin_port): (u16, u16),
    admin_secret: &str,
    ice_address: Ipv4Addr,
) -> [(&'static str, String); 3] {
    let janus = format!(
        r#"general: {{
	configs_folder = "{configs}"
	plugins_folder = "{plugins}"
	transports_folder = "{transports}"
	events_folder = "{none}"
	loggers_folder = "{none}"
	debug_level = 3
	admin_secret = "{admin_secret}"
	session_timeout = 60
	server_name = "relay-bench"
}}
media: {{
	ipv6 = false
	rtp_port_range = "{RTP_PORT_RANGE}"
}}
nat: {{
	nice_debug = false
	ice_enforce_list = "{ice_address}"
	ignore_mdns = true
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
	broadcast = false
}}
"#,
        configs = dir.display(),
        plugins = folders.plugins.display(),
        transports = folders.transports.display(),
        none = folders.none.display(),
    );
    let http = format!(
        r#"general: {{
	json = "compact"
	base_path = "/janus"
	http = true
	ip = "127.0.0.1"
	port = {api_port}
	https = false
}}
admin: {{
	admin_base_path = "/admin"
	admin_http = true
	admin_ip = "127.0.0.1"
	admin_port = {admin_port}
	admin_https = false
}}
"#
    );
    // Rooms are created over the API, one per bench session.
    let videoroom = "general: {\n}\n".to_owned();
    [
        ("janus.jcfg", janus),
        ("janus.transport.http.jcfg", http),
        ("janus.plugin.videoroom.jcfg", videoroom),
    ]
}
