//! The IO shell of the control plane: HTTPS/WSS signalling with axum and rustls.
//!
//! One **actor task** owns the [`Node`](crate::session::Node). HTTP handlers and
//! WebSocket tasks never touch it directly: they send it a closure to run
//! ([`Actor::call`]), and the actor, after each closure or timer, drains the node's
//! outputs: messages go to the per-connection bounded queues, statistics to Prometheus.
//! So the core stays single-threaded and deterministic, and no lock is ever held across
//! an `.await`.
//!
//! - [`http`]: the JSON API (`/v1/...`), errors, operational endpoints.
//! - [`web`]: the browser clients (customer portal, agent console), embedded.
//! - [`ws`]: the session and agent-console WebSockets.
//! - [`actor`]: the task that owns the node, its timer and the connection table.
//! - [`handshake`]: the deadline of a new connection's TLS handshake and first request.
//! - [`ops`]: the operations listener (`/metrics`, health), apart from the public port.
//! - [`listener`]: the accept loop, connection limits and the deadlines of later requests.

pub mod actor;
pub mod handshake;
pub mod http;
pub mod listener;
pub mod ops;
pub mod web;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rand::SeedableRng;
use tokio::sync::Notify;

use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::{Node, Settings, WallClock};
use crate::throttle::ThrottleSettings;

pub use actor::Actor;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The actor that owns the session core.
    pub actor: Actor,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Agent token verification.
    pub verifier: Arc<Verifier>,
    /// How clients reach this node (`https://host:port`), for URLs handed out.
    pub base_url: Arc<str>,
    /// The node's configuration.
    pub config: Arc<Config>,
    /// Set once SIGTERM started the drain.
    pub draining: Arc<AtomicBool>,
    /// Source of connection ids.
    pub next_conn: Arc<AtomicU64>,
    /// Membership of a cluster (`[cluster] redis`); `None` on a lone node.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The core's tunables from the configuration.
pub fn settings_from(config: &Config) -> Settings {
    let s = &config.session;
    let l = &config.limits;
    Settings {
        key_ttl: s.key_ttl,
        invitation_ttl: s.invitation_ttl,
        customer_grace: s.customer_grace,
        agent_grace: s.agent_grace,
        max_duration: s.max_duration,
        max_sessions_per_agent: s.max_sessions_per_agent,
        max_monitored_sessions: s.max_monitored_sessions,
        chat_history: s.chat_history,
        cross_portal_invitations: s.cross_portal_invitations,
        throttle: ThrottleSettings {
            per_address_failures: l.key_failures_per_address,
            window: l.key_failure_window,
            lockout_base: l.key_lockout_base,
            lockout_max: l.key_lockout_max,
            node_failures: l.key_failures_node,
            max_tracked_addresses: 100_000,
            challenge_bits: l.key_challenge_bits,
            challenge_max_bits: l.key_challenge_max_bits,
        },
        rate_limits: config.rate_limits,
    }
}

/// Most simultaneous connections to the operations listener (scrapers and probes).
const OPS_MAX_CONNECTIONS: usize = 64;

/// How long open connections get to finish once the node has decided to exit.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How long a node that is exiting waits for its recordings' writers to finish.
const RECORDINGS_GRACE: Duration = Duration::from_secs(10);

/// Runs the node until it has drained after SIGTERM/SIGINT. Prints
/// `listening on <url>` as the first line on stdout once it accepts connections.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let verifier =
        Arc::new(Verifier::from_config(&config).context("setting up token verification")?);
    let tls = crate::tls::server_config(&config).context("setting up TLS")?;

    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let ops_token = config.ops.token()?;
    let ops_listener = std::net::TcpListener::bind(config.ops.listen).with_context(|| {
        format!(
            "binding the operations listener {} (set [ops] listen or --ops-listen)",
            config.ops.listen
        )
    })?;
    ops_listener.set_nonblocking(true)?;
    let ops_bound = ops_listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let base_url: Arc<str> = config.base_url(bound).into();

    let clock = WallClock {
        instant: Instant::now(),
        system: SystemTime::now(),
    };
    let rng = Box::new(rand::rngs::StdRng::from_os_rng());
    let node = Node::new(settings_from(&config), clock, rng);
    let idle = Arc::new(Notify::new());
    let media = crate::transport::MediaPlane::new(&config, metrics.clone()).with_context(|| {
        format!(
            "binding the media UDP mux port {}:{}",
            config.media.bind_ip, config.media.udp_mux_port
        )
    })?;
    if config.recording.enabled {
        crate::record::retention::spawn(
            config.recording_dir(),
            config.recording.retention,
            metrics.clone(),
        );
    }
    let actor = Actor::spawn(node, media.clone(), metrics.clone(), idle.clone());
    media.attach(actor.clone());
    let draining = Arc::new(AtomicBool::new(false));
    let cluster = crate::cluster::Cluster::start(
        &config,
        &base_url,
        actor.clone(),
        draining.clone(),
        &metrics,
    )
    .context("joining the cluster")?;

    let state = AppState {
        actor: actor.clone(),
        metrics: metrics.clone(),
        verifier,
        base_url,
        config: Arc::new(config.clone()),
        draining,
        next_conn: Arc::new(AtomicU64::new(1)),
        cluster,
    };
    let app = http::router(state.clone());

    let (shutdown, shutdown_requested) = tokio::sync::watch::channel(false);
    let ops_shutdown = shutdown_requested.clone();
    let server = {
        // Every new connection must finish its TLS handshake and send its first request
        // head within `limits.handshake_timeout` (rustls's own timeout is only a backstop);
        // the listener admits it and bounds every later state (`listener`).
        let deadline = config.limits.handshake_timeout;
        let idle = config.limits.idle_timeout;
        let gate =
            listener::ConnectionGate::from_limits(&config.limits, metrics.connections_open.clone());
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let metrics = metrics.clone();
        async move {
            use handshake::HandshakeGuard;
            match tls {
                Some(tls) => {
                    let rustls = axum_server::tls_rustls::RustlsConfig::from_config(tls);
                    let tls = axum_server::tls_rustls::RustlsAcceptor::new(rustls)
                        .handshake_timeout(deadline + Duration::from_secs(1));
                    let acceptor = HandshakeGuard::new(tls, deadline, metrics.clone());
                    listener::serve(
                        listener,
                        acceptor,
                        app,
                        gate,
                        idle,
                        metrics,
                        shutdown_requested,
                    )
                    .await
                }
                None => {
                    let plain = axum_server::accept::DefaultAcceptor;
                    let acceptor = HandshakeGuard::new(plain, deadline, metrics.clone());
                    listener::serve(
                        listener,
                        acceptor,
                        app,
                        gate,
                        idle,
                        metrics,
                        shutdown_requested,
                    )
                    .await
                }
            }
        }
    };
    let server = tokio::spawn(server);
    // The operations listener gets the same deadlines (the first request's, idle and
    // body) and a small connection limit of its own: it serves a scraper or two.
    let ops_server = listener::serve(
        tokio::net::TcpListener::from_std(ops_listener)?,
        handshake::HandshakeGuard::new(
            axum_server::accept::DefaultAcceptor,
            config.limits.handshake_timeout,
            metrics.clone(),
        ),
        ops::router(state.clone(), ops_token.as_deref()),
        listener::ConnectionGate::new(
            OPS_MAX_CONNECTIONS,
            None,
            prometheus::IntGauge::new("ops_connections_open", "open ops connections")?,
        ),
        config.limits.idle_timeout,
        metrics.clone(),
        ops_shutdown,
    );
    let ops_server = tokio::spawn(ops_server);

    // Signals are hooked before the listening line, so a SIGTERM right after it drains.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The first line says where clients connect, the second where operators scrape.
    println!("listening on {scheme}://{bound}");
    println!("ops listening on http://{ops_bound}");
    tracing::info!(%bound, public = %state.base_url, ops = %ops_bound, "relay listening");

    tokio::select! {
        _ = sigterm.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    let deadline = config.drain.deadline;
    tracing::info!(deadline = ?deadline, "draining: no new sessions; live sessions may finish");
    state.draining.store(true, Ordering::SeqCst);
    metrics.draining.set(1);
    if let Some(cluster) = &state.cluster {
        // The directory learns at once that this node takes no new sessions.
        cluster.sync_now().await;
    }
    actor
        .call(move |node, now| node.start_drain(now, deadline))
        .await?;
    // The actor notifies once the node is idle (every session ended, by itself or at
    // the deadline). A second signal cuts the wait short.
    tokio::select! {
        _ = idle.notified() => {},
        _ = sigterm.recv() => tracing::warn!("second signal: exiting without waiting"),
    }
    tracing::info!("drained; shutting down");
    if let Some(cluster) = &state.cluster {
        cluster.leave().await;
    }
    // The last `session_ended` messages are queued but perhaps not yet written, and the
    // HTTP server does not track upgraded connections: wait for the session sockets.
    let sockets = metrics
        .ws_connections_active
        .with_label_values(&["session"]);
    let waited = Instant::now();
    while sockets.get() > 0 && waited.elapsed() < SHUTDOWN_GRACE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every ended session's recording gets its footer before the process exits (a
    // writer has at most its queue left to write).
    let waited = Instant::now();
    while media.recordings_writing() > 0 && waited.elapsed() < RECORDINGS_GRACE {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if media.recordings_writing() > 0 {
        tracing::warn!(
            writing = media.recordings_writing(),
            "exiting with recordings unfinished; they read up to their last complete chunk"
        );
    }
    let _ = shutdown.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, server).await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, ops_server).await;
    Ok(())
}
