//! Scale-out: many edge nodes sharing one session directory in Redis.
//!
//! With `[cluster] redis = "redis://…"` every node registers itself (id, public URL,
//! capacity, load, draining) with a heartbeat and a TTL, records each live session
//! (session id, SHA-256 of its support key and link, its open invitations, the owning
//! node), and claims each new support key cluster-wide (`SET NX` in a script) before
//! the agent sees it. A request that reaches a node that does not hold its session is
//! redirected to the one that does; a new session goes to the node the agent reached,
//! unless that node drains or is at its load threshold. A node that stops
//! heartbeating is dead after one TTL: its records expire, and the next heartbeat of
//! any other node sweeps its sessions into "lost" tombstones, so their clients get
//! `session_lost` instead of waiting. Live sessions are never moved between nodes.
//! Without the setting none of this exists and the node runs alone.
//!
//! The pieces, in the sans-IO shape of the rest of the relay:
//!
//! - [`placement`]: the decisions (placement, routing, dead nodes, redirect URLs) as
//!   plain functions over records, tested without Redis;
//! - [`directory`]: the Redis layout and one async call per read or write;
//! - [`routing`]: the axum middleware that asks both and answers with a redirect
//!   (HTTP `307` + `Location`, or a `redirect` message on a session WebSocket);
//! - [`status`]: `relay cluster status`;
//! - this module: [`Cluster`], the handle the HTTP shell holds, and the heartbeat task.
//!
//! Redis being down never stops a node: lookups answer as a lone node would, new keys
//! are unique on this node only, errors are counted, and the next heartbeat after
//! Redis is back rewrites everything.

pub mod config;
pub mod directory;
pub mod placement;
pub mod routing;
pub mod status;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts};
use relay_codec::wire::SessionSummary;
use tokio::sync::{mpsc, oneshot};

pub use config::ClusterConfig;
use directory::{Claim, Directory};
use placement::{Lookup, NodeRecord, Placement, Route, SessionRecord};

use crate::identity::AgentIdentity;
use crate::metrics::Metrics;
use crate::session::{SecretDigest, SessionCreated};
use crate::signal::Actor;

/// How often a new session's key is drawn again when other nodes hold it.
const MAX_KEY_DRAWS: usize = 8;

/// Operations whose Redis failures are counted (`op` label).
pub const REDIS_OPS: [&str; 5] = ["connect", "heartbeat", "lookup", "claim", "sweep"];
/// Kinds of redirects (`kind` label).
pub const REDIRECT_KINDS: [&str; 6] = [
    "create",
    "join",
    "session",
    "websocket",
    "invitation",
    "link",
];

/// The `relay_cluster_*` metrics.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// Failed Redis calls, by operation.
    pub redis_errors_total: IntCounterVec,
    /// Seconds since this node's last successful heartbeat.
    pub heartbeat_age_seconds: Gauge,
    /// Clients sent to another node, by what they asked for.
    pub redirects_total: IntCounterVec,
    /// Live nodes in the directory, as of this node's last heartbeat.
    pub nodes: IntGauge,
    /// Sessions of dead nodes this node swept into "lost".
    pub sessions_lost_total: IntCounter,
    /// Support keys another session already held (drawn again, or found at a heartbeat).
    pub key_conflicts_total: IntCounter,
}

impl ClusterMetrics {
    /// Registers the metrics in the node's registry (label values up front, at 0).
    pub fn register(metrics: &Metrics) -> prometheus::Result<ClusterMetrics> {
        let m = ClusterMetrics {
            redis_errors_total: IntCounterVec::new(
                Opts::new(
                    "relay_cluster_redis_errors_total",
                    "Failed or timed-out Redis calls of the cluster directory, by operation",
                ),
                &["op"],
            )?,
            heartbeat_age_seconds: Gauge::new(
                "relay_cluster_heartbeat_age_seconds",
                "Seconds since this node last wrote its heartbeat to the directory",
            )?,
            redirects_total: IntCounterVec::new(
                Opts::new(
                    "relay_cluster_redirects_total",
                    "Clients sent to another node of the cluster, by what they asked for",
                ),
                &["kind"],
            )?,
            nodes: IntGauge::new(
                "relay_cluster_nodes",
                "Live nodes in the directory as of this node's last heartbeat",
            )?,
            sessions_lost_total: IntCounter::new(
                "relay_cluster_sessions_lost_total",
                "Sessions of dead nodes this node removed from the directory",
            )?,
            key_conflicts_total: IntCounter::new(
                "relay_cluster_key_conflicts_total",
                "Support keys that another session of the cluster already held",
            )?,
        };
        let r = &metrics.registry;
        r.register(Box::new(m.redis_errors_total.clone()))?;
        r.register(Box::new(m.heartbeat_age_seconds.clone()))?;
        r.register(Box::new(m.redirects_total.clone()))?;
        r.register(Box::new(m.nodes.clone()))?;
        r.register(Box::new(m.sessions_lost_total.clone()))?;
        r.register(Box::new(m.key_conflicts_total.clone()))?;
        for op in REDIS_OPS {
            m.redis_errors_total.with_label_values(&[op]);
        }
        for kind in REDIRECT_KINDS {
            m.redirects_total.with_label_values(&[kind]);
        }
        Ok(m)
    }
}

/// This node's membership of the cluster: what the HTTP shell asks where to send a
/// request, and the heartbeat task's shared state.
pub struct Cluster {
    id: String,
    url: String,
    config: ClusterConfig,
    /// `None` until the first connection succeeds (the node starts without Redis).
    directory: Mutex<Option<Directory>>,
    /// Live nodes as of the last heartbeat.
    view: Mutex<Vec<NodeRecord>>,
    draining: Arc<AtomicBool>,
    /// Set once the node has left: the heartbeat must not register it again.
    left: AtomicBool,
    sync: mpsc::Sender<oneshot::Sender<()>>,
    metrics: ClusterMetrics,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Cluster {
    /// Joins the cluster `config` names, or `None` when it names none (a lone node).
    /// `url` is where clients reach this node; `draining` is the shell's drain flag.
    /// Spawns the heartbeat task, which connects to Redis (retrying every heartbeat).
    pub fn start(
        config: &crate::config::Config,
        url: &str,
        actor: Actor,
        draining: Arc<AtomicBool>,
        metrics: &Metrics,
    ) -> anyhow::Result<Option<Arc<Cluster>>> {
        let Some(redis_url) = config.cluster.redis.clone() else {
            return Ok(None);
        };
        let (sync, requests) = mpsc::channel(64);
        let cluster = Arc::new(Cluster {
            id: config.cluster.resolved_node_id(),
            url: url.trim_end_matches('/').to_owned(),
            config: config.cluster.clone(),
            directory: Mutex::new(None),
            view: Mutex::new(Vec::new()),
            draining,
            left: AtomicBool::new(false),
            sync,
            metrics: ClusterMetrics::register(metrics)?,
        });
        tracing::info!(
            node = %cluster.id,
            url = %cluster.url,
            redis = %config::redact_url(&redis_url),
            "joining the cluster"
        );
        tokio::spawn(heartbeat_task(cluster.clone(), actor, redis_url, requests));
        Ok(Some(cluster))
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This node's URL, as published.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URLs of the live nodes as of the last heartbeat (this one's included once
    /// it has registered), without a trailing `/`.
    pub fn node_urls(&self) -> Vec<String> {
        lock(&self.view)
            .iter()
            .map(|n| n.url.trim_end_matches('/').to_owned())
            .collect()
    }

    /// The metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    fn directory(&self) -> Option<Directory> {
        lock(&self.directory).clone()
    }

    fn redis_error(&self, op: &str, e: &redis::RedisError) {
        tracing::warn!(op, error = %e, "cluster directory: Redis call failed");
        self.metrics
            .redis_errors_total
            .with_label_values(&[op])
            .inc();
    }

    /// Counts a redirect of this kind.
    pub fn count_redirect(&self, kind: &str) {
        self.metrics
            .redirects_total
            .with_label_values(&[kind])
            .inc();
    }

    /// Runs a heartbeat now and waits for it (at most a few seconds): after it, the
    /// directory shows this node's current sessions, invitations and drain flag.
    pub async fn sync_now(&self) {
        let (done, wait) = oneshot::channel();
        if self.sync.send(done).await.is_ok() {
            let _ = tokio::time::timeout(directory::REDIS_TIMEOUT * 4, wait).await;
        }
    }

    /// Leaves the cluster at the end of a drain: the node's record goes at once, and
    /// the heartbeat stops.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::SeqCst);
        if let Some(dir) = self.directory() {
            match dir.leave(&self.id).await {
                Ok(()) => tracing::info!(node = %self.id, "left the cluster"),
                Err(e) => self.redis_error("heartbeat", &e),
            }
        }
    }

    /// Where a new session goes, given this node's live session count. `redirected`:
    /// the request was already sent here by another node.
    pub fn placement(&self, local_sessions: usize, redirected: bool) -> Placement {
        let me = NodeRecord {
            id: self.id.clone(),
            url: self.url.clone(),
            capacity: self.config.capacity,
            sessions: u32::try_from(local_sessions).unwrap_or(u32::MAX),
            draining: self.draining.load(Ordering::SeqCst),
            heartbeat_ms: unix_ms(),
        };
        let view = lock(&self.view).clone();
        placement::place(&me, &view, self.config.load_threshold, redirected)
    }

    /// Claims a new session's support key cluster-wide, drawing a new key (through the
    /// actor) while another session holds it, then publishes the session at once so
    /// that a customer may use the key on any node. With Redis down the session keeps
    /// its key, unique on this node only.
    pub async fn claim_new_session(
        &self,
        actor: &Actor,
        created: SessionCreated,
    ) -> SessionCreated {
        let Some(dir) = self.directory() else {
            return created;
        };
        let mut created = created;
        let sid = created.host.session_id.clone();
        for _ in 0..MAX_KEY_DRAWS {
            let hash = SecretDigest::of(created.support_key.reveal()).to_hex();
            match dir.claim_key(&hash, sid.as_str(), self.config.ttl).await {
                Ok(true) => break,
                Ok(false) => {
                    self.metrics.key_conflicts_total.inc();
                    let again = sid.clone();
                    match actor
                        .call(move |node, _| node.replace_support_key(&again))
                        .await
                    {
                        Ok(Some(key)) => created.support_key = key,
                        _ => break,
                    }
                }
                Err(e) => {
                    self.redis_error("claim", &e);
                    break;
                }
            }
        }
        self.sync_now().await;
        created
    }

    /// Where a request for session `sid`, which this node does not hold, goes.
    pub async fn route_session(&self, sid: &str) -> Route {
        let Some(dir) = self.directory() else {
            return Route::Local;
        };
        match dir.session(sid).await {
            Ok(lookup) => self.route(&dir, lookup).await,
            Err(e) => {
                self.redis_error("lookup", &e);
                Route::Local
            }
        }
    }

    /// Where a request presenting a support key or link (by hash) or an invitation id
    /// goes.
    pub async fn route_claim(&self, claim: Claim, id: &str) -> Route {
        let Some(dir) = self.directory() else {
            return Route::Local;
        };
        match dir.resolve(claim, id).await {
            Ok(lookup) => self.route(&dir, lookup).await,
            Err(e) => {
                self.redis_error("lookup", &e);
                Route::Local
            }
        }
    }

    async fn route(&self, dir: &Directory, lookup: Lookup) -> Route {
        let alive = match &lookup {
            Lookup::Owner { node, .. } if *node != self.id => match dir.node(node).await {
                Ok(record) => record.is_some(),
                Err(e) => {
                    self.redis_error("lookup", &e);
                    true
                }
            },
            _ => true,
        };
        placement::route(&self.id, &lookup, alive)
    }

    /// A supervisor's listing, cluster-wide: this node's sessions (`local`) and those
    /// other live nodes recorded at their last heartbeat, each with its node's URL.
    pub async fn listing(
        &self,
        supervisor: &AgentIdentity,
        local: Vec<SessionSummary>,
    ) -> Vec<SessionSummary> {
        let mut all: Vec<SessionSummary> = local
            .into_iter()
            .map(|s| SessionSummary {
                node_url: Some(self.url.clone()),
                ..s
            })
            .collect();
        let others: Vec<String> = lock(&self.view)
            .iter()
            .filter(|n| n.id != self.id)
            .map(|n| n.id.clone())
            .collect();
        let Some(dir) = self.directory() else {
            return all;
        };
        match dir.sessions_of(&others).await {
            Ok(records) => all.extend(
                records
                    .into_iter()
                    .filter(|r| r.node != self.id && supervisor.in_portal(&r.summary.portal))
                    .map(|r| SessionSummary {
                        node_url: Some(r.url),
                        ..r.summary
                    }),
            ),
            Err(e) => self.redis_error("lookup", &e),
        }
        all
    }
}

/// Connects (and reconnects), then heartbeats every `cluster.heartbeat` and whenever
/// [`Cluster::sync_now`] asks.
async fn heartbeat_task(
    cluster: Arc<Cluster>,
    actor: Actor,
    redis_url: String,
    mut requests: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut published: HashMap<String, SessionRecord> = HashMap::new();
    let mut last_ok = Instant::now();
    let mut ticker = tokio::time::interval(cluster.config.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiting = Vec::new();
        tokio::select! {
            _ = ticker.tick() => {},
            request = requests.recv() => match request {
                Some(done) => waiting.push(done),
                None => return,
            },
        }
        while let Ok(done) = requests.try_recv() {
            waiting.push(done);
        }
        if cluster.left.load(Ordering::SeqCst) {
            return;
        }
        if cluster.directory().is_none() {
            match Directory::connect(&redis_url).await {
                Ok(dir) => {
                    tracing::info!("connected to the cluster directory");
                    *lock(&cluster.directory) = Some(dir);
                }
                Err(e) => cluster.redis_error("connect", &e),
            }
        }
        if let Some(dir) = cluster.directory() {
            if heartbeat(&cluster, &dir, &actor, &mut published).await {
                last_ok = Instant::now();
            }
        }
        cluster
            .metrics
            .heartbeat_age_seconds
            .set(last_ok.elapsed().as_secs_f64());
        for done in waiting {
            let _ = done.send(());
        }
    }
}

/// One heartbeat: publish this node and its sessions, read the other nodes, sweep the
/// dead ones. Returns whether this node's records were written.
async fn heartbeat(
    cluster: &Cluster,
    dir: &Directory,
    actor: &Actor,
    published: &mut HashMap<String, SessionRecord>,
) -> bool {
    let Ok(entries) = actor.call(|node, now| node.directory(now)).await else {
        return false;
    };
    let sessions: Vec<SessionRecord> = entries
        .into_iter()
        .map(|e| SessionRecord {
            session_id: e.session_id.as_str().to_owned(),
            node: cluster.id.clone(),
            url: cluster.url.clone(),
            key: e.key.to_hex(),
            link: e.link.to_hex(),
            invitations: e
                .invitations
                .iter()
                .map(|i| i.as_str().to_owned())
                .collect(),
            summary: SessionSummary {
                node_url: Some(cluster.url.clone()),
                ..e.summary
            },
        })
        .collect();
    let ended: Vec<SessionRecord> = published
        .values()
        .filter(|p| !sessions.iter().any(|s| s.session_id == p.session_id))
        .cloned()
        .collect();
    let me = NodeRecord {
        id: cluster.id.clone(),
        url: cluster.url.clone(),
        capacity: cluster.config.capacity,
        sessions: u32::try_from(sessions.len()).unwrap_or(u32::MAX),
        draining: cluster.draining.load(Ordering::SeqCst),
        heartbeat_ms: unix_ms(),
    };
    match dir
        .publish(&me, &sessions, &ended, cluster.config.ttl)
        .await
    {
        Ok(conflicts) => {
            for sid in conflicts {
                // Only after Redis lost its data while two nodes drew the same key.
                cluster.metrics.key_conflicts_total.inc();
                tracing::warn!(session = %sid, "another session of the cluster holds this session's support key or link");
            }
            *published = sessions
                .into_iter()
                .map(|s| (s.session_id.clone(), s))
                .collect();
        }
        Err(e) => {
            cluster.redis_error("heartbeat", &e);
            return false;
        }
    }
    match dir.nodes().await {
        Ok((members, live)) => {
            cluster.metrics.nodes.set(live.len() as i64);
            for dead in placement::dead_nodes(&cluster.id, &members, &live) {
                match dir.sweep(dead).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::warn!(
                                node = dead,
                                sessions = n,
                                "node is dead: its sessions are lost"
                            );
                        }
                        cluster.metrics.sessions_lost_total.inc_by(n as u64);
                    }
                    Err(e) => cluster.redis_error("sweep", &e),
                }
            }
            *lock(&cluster.view) = live;
        }
        Err(e) => cluster.redis_error("lookup", &e),
    }
    true
}
