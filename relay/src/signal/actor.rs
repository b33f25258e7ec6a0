//! The task that owns the session core.
//!
//! It runs closures sent by handlers against the [`Node`], fires the node's timer, and
//! after every step drains [`Node::poll_output`]: each `Send` is serialised once and
//! queued on that connection's bounded channel (each `ChatOnChannel` on the
//! participant's `chat` data channel, or its WebSocket if that channel is gone); a full channel means a client that does
//! not read, so the connection is closed (and counted) rather than letting memory grow.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use relay_codec::wire::{ErrorCode, Role};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::metrics::Metrics;
use crate::session::{ConnId, Node, Output, Stat};
use crate::transport::MediaPlane;

/// Messages queued per connection before it counts as not reading.
pub const CONN_QUEUE: usize = 256;

/// What the actor tells a connection's writer.
#[derive(Debug)]
pub enum Outbound {
    /// A JSON text message.
    Text(String),
    /// Close after what was queued before.
    Close,
}

/// A closure to run on the core; it returns the delivery of its answer, which the actor
/// calls only after flushing the outputs the closure caused. So a caller that gets its
/// answer knows that metrics are updated and messages to others are queued.
type Job = Box<dyn FnOnce(&mut Core) -> Reply + Send>;
type Reply = Box<dyn FnOnce() + Send>;

/// What the actor owns.
pub struct Core {
    /// The session core.
    pub node: Node,
    /// Writers of the open connections.
    pub conns: HashMap<ConnId, ConnHandle>,
    /// Where media events go.
    pub media: MediaPlane,
}

/// How the actor reaches one connection.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Its bounded outbound queue.
    pub tx: mpsc::Sender<Outbound>,
    /// Cuts the connection at once (its client stopped reading).
    pub kill: Arc<Notify>,
}

/// A handle to the actor; cheap to clone.
#[derive(Clone)]
pub struct Actor {
    jobs: mpsc::Sender<Job>,
}

/// The actor has stopped (only at shutdown).
#[derive(Debug, thiserror::Error)]
#[error("the session core has stopped")]
pub struct ActorGone;

impl Actor {
    /// Starts the actor task. `idle` is notified whenever the node is draining and has
    /// no session left.
    pub fn spawn(node: Node, media: MediaPlane, metrics: Arc<Metrics>, idle: Arc<Notify>) -> Actor {
        let (tx, rx) = mpsc::channel::<Job>(1024);
        tokio::spawn(run(
            Core {
                node,
                conns: HashMap::new(),
                media,
            },
            rx,
            metrics,
            idle,
        ));
        Actor { jobs: tx }
    }

    /// Runs `f` on the node with the current time and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Node, Instant) -> R + Send + 'static,
    ) -> Result<R, ActorGone> {
        self.with_core(move |core| f(&mut core.node, Instant::now()))
            .await
    }

    /// Runs `f` on the whole core (node and connection table).
    pub async fn with_core<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> R + Send + 'static,
    ) -> Result<R, ActorGone> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |core| {
            let answer = f(core);
            Box::new(move || {
                let _ = reply.send(answer);
            })
        });
        self.jobs.send(job).await.map_err(|_| ActorGone)?;
        answer.await.map_err(|_| ActorGone)
    }
}

async fn run(
    mut core: Core,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
    idle: Arc<Notify>,
) {
    loop {
        let deadline = core.node.poll_timeout();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        let mut reply = None;
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => reply = Some(job(&mut core)),
                None => break,
            },
            _ = sleep => core.node.handle_timeout(Instant::now()),
        }
        flush(&mut core, &metrics);
        if let Some(reply) = reply {
            reply();
        }
        if core.node.is_draining() && core.node.is_idle() {
            idle.notify_one();
        }
    }
}

/// Delivers the node's outputs.
fn flush(core: &mut Core, metrics: &Metrics) {
    let mut census_changed = false;
    while let Some(out) = core.node.poll_output() {
        match out {
            Output::Send { conn, msg } => {
                let Some(handle) = core.conns.get(&conn) else {
                    continue;
                };
                let text = match serde_json::to_string(&msg) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot serialise a server message");
                        continue;
                    }
                };
                if handle.tx.try_send(Outbound::Text(text)).is_err() {
                    // Not reading (or gone): drop the connection, not the node's memory.
                    tracing::warn!(conn = conn.0, "closing a connection whose queue is full");
                    metrics
                        .messages_rejected_total
                        .with_label_values(&["slow_consumer"])
                        .inc();
                    if let Some(handle) = core.conns.remove(&conn) {
                        handle.kill.notify_one();
                    }
                    let now = Instant::now();
                    core.node.disconnected(now, conn);
                    core.node.console_closed(now, conn);
                }
            }
            Output::Close { conn } => {
                if let Some(handle) = core.conns.remove(&conn) {
                    if handle.tx.try_send(Outbound::Close).is_err() {
                        handle.kill.notify_one();
                    }
                }
            }
            Output::ChatOnChannel {
                session,
                participant,
                msg,
            } => {
                if let Some(msg) = core.media.send_chat(&session, &participant, msg) {
                    // The channel closed (or is backed up) since the core last heard: the
                    // WebSocket takes the message instead, so it still arrives once.
                    metrics
                        .chat_data_channel_total
                        .with_label_values(&["fallback_websocket"])
                        .inc();
                    core.node.deliver(&session, &participant, msg);
                }
            }
            Output::Media(event) => core.media.handle(event),
            Output::Stat(stat) => {
                // A refused flood changes no census: not recounted per message.
                census_changed |= !matches!(stat, Stat::RateLimited(_));
                count(metrics, stat);
            }
        }
    }
    if census_changed {
        let census = core.node.census();
        metrics.sessions_active.set(census.sessions as i64);
        for (role, n) in census.by_role() {
            metrics
                .participants_active
                .with_label_values(&[role_label(role)])
                .set(n as i64);
        }
    }
}

fn role_label(role: Role) -> &'static str {
    match role {
        Role::Host => "host",
        Role::Agent => "agent",
        Role::Customer => "customer",
        Role::Supervisor => "supervisor",
    }
}

fn count(metrics: &Metrics, stat: Stat) {
    match stat {
        Stat::SessionCreated => metrics.sessions_created_total.inc(),
        Stat::SessionEnded(reason) => {
            tracing::info!(reason = reason.as_str(), "session ended");
            metrics
                .sessions_ended_total
                .with_label_values(&[reason.as_str()])
                .inc()
        }
        Stat::ParticipantAdded(_) | Stat::ParticipantRemoved(_) => {}
        Stat::Join { role, refused } => {
            let outcome = refused.map(ErrorCode::as_str).unwrap_or("ok");
            metrics
                .joins_total
                .with_label_values(&[role_label(role), outcome])
                .inc();
        }
        Stat::KeyAttempt(outcome) => metrics
            .support_key_attempts_total
            .with_label_values(&[outcome.as_str()])
            .inc(),
        Stat::Lockout(scope) => {
            // The address is not logged: it is the customer's, and the metric suffices.
            tracing::warn!(scope = scope.as_str(), "support-key lock-out started");
            metrics
                .key_lockouts_total
                .with_label_values(&[scope.as_str()])
                .inc()
        }
        Stat::Invitation(outcome) => metrics
            .invitations_total
            .with_label_values(&[outcome.as_str()])
            .inc(),
        Stat::Share(outcome) => metrics
            .agent_shares_total
            .with_label_values(&[outcome.as_str()])
            .inc(),
        Stat::RateLimited(class) => metrics.rate_limited(class),
        Stat::TextRefused { field, rule } => metrics
            .text_refused_total
            .with_label_values(&[field.as_str(), rule.as_str()])
            .inc(),
    }
}
