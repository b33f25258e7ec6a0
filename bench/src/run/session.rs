//! One benchmark session: its set-up through the relay's API (a host, invited agents in
//! the chosen mix, a customer that joins with the support key), the agents' input while
//! it runs, and scoring what everyone saw.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use relay_codec::input::{InputEvent, InputKind};
use relay_codec::wire::{Permission, Visibility};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::RunError;
use super::measure::{self, SentIndex, VIEW_ONLY_MARK};
use crate::api::RelayApi;
use crate::client::{Agent, AgentOptions, Customer, CustomerOptions, FrameSource, IceTransport};

/// Longest wait for a peer connection, a data channel or a first frame.
pub const CONNECT_WAIT: Duration = Duration::from_secs(20);

/// The portal bench sessions are opened in.
pub const PORTAL: &str = "bench";

/// What an agent of the mix does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRole {
    /// Opens the session; has control and sends input.
    Host,
    /// Invited, masked, with control; watches.
    Masked,
    /// Invited, visible, view-only; sends input the relay must refuse.
    ViewOnly,
    /// Invited, visible, with control; watches.
    Watcher,
}

/// The roles of a session's `agents`: the host, then `masked` masked agents, then
/// `view_only` view-only agents, then watchers.
pub fn agent_mix(agents: u32, masked: u32, view_only: u32) -> Vec<AgentRole> {
    (0..agents)
        .map(|i| match i {
            0 => AgentRole::Host,
            i if i <= masked => AgentRole::Masked,
            i if i <= masked + view_only => AgentRole::ViewOnly,
            _ => AgentRole::Watcher,
        })
        .collect()
}

/// How sessions are set up and driven.
#[derive(Debug, Clone)]
pub struct SessionPlan {
    /// Role of each agent, host first.
    pub roles: Vec<AgentRole>,
    /// Agents (counted from the last) that stop reading once the window starts.
    pub slow_agents: u32,
    /// Watchers (the last ones before the slow agents) that leave and come back every
    /// `churn_interval` during the window.
    pub churn_agents: u32,
    /// How long a churning agent stays before it leaves and comes back.
    pub churn_interval: Duration,
    /// Frames per second the customer publishes.
    pub fps: f64,
    /// Input events per second from the host; view-only agents send a tenth of that.
    pub input_hz: f64,
    /// The transports the clients' ICE may use (`--ice-transport`).
    pub ice_transport: IceTransport,
}

/// One agent in a running session.
pub struct BenchAgent {
    /// Its role.
    pub role: AgentRole,
    /// Whether it stops reading.
    pub slow: bool,
    /// Whether it leaves and comes back during the window.
    pub churn: bool,
    /// Its session WebSocket URL (a churning agent comes back with it).
    pub ws_url: String,
    /// Its display name.
    pub name: String,
    /// Its participant id.
    pub participant_id: String,
    /// When it started connecting.
    pub joined_at: Instant,
    /// When its peer connection was up.
    pub connected_at: Instant,
    /// The client.
    pub client: Arc<Agent>,
}

/// A running session.
pub struct BenchSession {
    /// The session's id.
    pub session_id: String,
    /// The host's token (to end the session).
    host_jwt: String,
    /// The customer.
    pub customer: Customer,
    /// The agents, host first.
    pub agents: Vec<BenchAgent>,
    /// Input senders and their roles, stopped by [`BenchSession::stop_input`].
    input_tasks: Vec<(AgentRole, JoinHandle<Vec<Instant>>)>,
    stop_input: watch::Sender<bool>,
    /// Send times of the host's events, by event number.
    input_sent: Vec<Instant>,
    /// TLS for the clients (churning agents reconnect with it).
    tls: Arc<rustls::ClientConfig>,
    /// The churning agents' tasks, started with the window.
    churn_tasks: Vec<JoinHandle<Churned>>,
    /// What they did, once stopped.
    churned: Vec<Churned>,
}

/// One churning agent's comings and goings.
#[derive(Debug, Default)]
struct Churned {
    /// Comebacks that got a frame.
    rejoins: u64,
    /// Comebacks that failed.
    failed: u64,
    /// Each stay: when it started and the frames it received.
    stays: Vec<(Instant, Vec<crate::client::ReceivedFrame>)>,
    /// Each comeback's start to its first frame.
    first_frames: Vec<Duration>,
    /// Why the last failed comeback failed.
    error: Option<String>,
}

/// Sets up session `n`: host, invitations, accepted by each agent, the customer's join
/// and peer connection, then every agent's peer connection (agents join after the
/// customer publishes, so their first frame measures join-to-picture).
pub async fn open(
    api: &RelayApi,
    tls: Arc<rustls::ClientConfig>,
    run_id: &str,
    n: u32,
    plan: &SessionPlan,
    source: FrameSource,
) -> Result<BenchSession, RunError> {
    let step =
        |what: String| move |e: crate::api::ApiError| RunError::Setup(format!("{what}: {e}"));
    let agent_id = |j: usize| format!("bench-{run_id}-s{n}-a{j}");
    let agent_name = |j: usize, role: AgentRole| format!("Bench {role:?} {n}.{j}");
    let host_jwt = api.token(&agent_id(0), &agent_name(0, AgentRole::Host), &[PORTAL]);
    let session = api
        .create_session(&host_jwt, PORTAL)
        .await
        .map_err(step(format!("session {n}: create")))?;
    let sid = session.session_id.clone();
    let mut credentials = vec![(agent_name(0, AgentRole::Host), session.host.clone())];
    for (j, role) in plan.roles.iter().enumerate().skip(1) {
        let name = agent_name(j, *role);
        let jwt = api.token(&agent_id(j), &name, &[PORTAL]);
        let (visibility, permission) = match role {
            AgentRole::Host | AgentRole::Watcher => (Visibility::Visible, Permission::Control),
            AgentRole::Masked => (Visibility::Masked, Permission::Control),
            AgentRole::ViewOnly => (Visibility::Visible, Permission::View),
        };
        let invitation = api
            .invite_agent(&host_jwt, &sid, &agent_id(j), visibility, permission)
            .await
            .map_err(step(format!("session {n}: invite agent {j}")))?;
        let creds = api
            .accept(&jwt, &invitation.invitation_id)
            .await
            .map_err(step(format!("session {n}: agent {j} accepts")))?;
        credentials.push((name, creds));
    }

    let joined = api
        .join(&format!("Bench Customer {n}"), &session.support_key)
        .await
        .map_err(step(format!("session {n}: customer joins")))?;
    let options = CustomerOptions {
        fps: plan.fps,
        ice_transport: plan.ice_transport,
        ..CustomerOptions::default()
    };
    let client_err =
        |what: String| move |e: crate::client::ClientError| RunError::Setup(format!("{what}: {e}"));
    let customer = Customer::connect(&joined.ws_url, tls.clone(), source, options)
        .await
        .map_err(client_err(format!("session {n}: customer connects")))?;
    customer
        .wait_connected(CONNECT_WAIT)
        .await
        .map_err(client_err(format!(
            "session {n}: customer's peer connection"
        )))?;
    customer
        .wait_input_open(CONNECT_WAIT)
        .await
        .map_err(client_err(format!("session {n}: customer's input channel")))?;

    let connects =
        credentials
            .into_iter()
            .zip(&plan.roles)
            .enumerate()
            .map(|(j, ((name, creds), role))| {
                let tls = tls.clone();
                let options = AgentOptions {
                    ice_transport: plan.ice_transport,
                    ..AgentOptions::default()
                };
                async move {
                    let joined_at = Instant::now();
                    let agent = Agent::connect(&creds.ws_url, tls, options)
                        .await
                        .map_err(client_err(format!("session {n}: agent {j} connects")))?;
                    agent
                        .wait_connected(CONNECT_WAIT)
                        .await
                        .map_err(client_err(format!(
                            "session {n}: agent {j}'s peer connection"
                        )))?;
                    let connected_at = Instant::now();
                    if matches!(role, AgentRole::Host | AgentRole::ViewOnly) {
                        agent
                            .wait_input_open(CONNECT_WAIT)
                            .await
                            .map_err(client_err(format!(
                                "session {n}: agent {j}'s input channel"
                            )))?;
                    }
                    Ok::<_, RunError>(BenchAgent {
                        role: *role,
                        slow: false,
                        churn: false,
                        ws_url: creds.ws_url.clone(),
                        name,
                        participant_id: creds.participant_id,
                        joined_at,
                        connected_at,
                        client: Arc::new(agent),
                    })
                }
            });
    let mut agents = futures_util::future::try_join_all(connects).await?;
    let total = agents.len();
    for agent in agents
        .iter_mut()
        .skip(total.saturating_sub(plan.slow_agents as usize))
    {
        if agent.role != AgentRole::Host {
            agent.slow = true;
        }
    }
    for agent in agents
        .iter_mut()
        .rev()
        .filter(|a| a.role == AgentRole::Watcher && !a.slow)
        .take(plan.churn_agents as usize)
    {
        agent.churn = true;
    }
    Ok(BenchSession {
        session_id: sid,
        host_jwt,
        customer,
        agents,
        input_tasks: Vec::new(),
        stop_input: watch::channel(false).0,
        input_sent: Vec::new(),
        tls,
        churn_tasks: Vec::new(),
        churned: Vec::new(),
    })
}

impl BenchSession {
    /// Starts the window: slow agents stop reading, the host and view-only agents start
    /// sending input.
    pub fn start(&mut self, plan: &SessionPlan) {
        let (churning, staying): (Vec<BenchAgent>, Vec<BenchAgent>) =
            std::mem::take(&mut self.agents)
                .into_iter()
                .partition(|a| a.churn);
        self.agents = staying;
        for agent in churning {
            let task = churn(
                agent,
                Arc::clone(&self.tls),
                plan.churn_interval,
                plan.ice_transport,
                self.stop_input.subscribe(),
            );
            self.churn_tasks.push(tokio::spawn(task));
        }
        for agent in &self.agents {
            if agent.slow {
                agent.client.pause();
            }
            let hz = match agent.role {
                AgentRole::Host => plan.input_hz,
                AgentRole::ViewOnly => plan.input_hz / 10.0,
                AgentRole::Masked | AgentRole::Watcher => continue,
            };
            if hz > 0.0 {
                let task = send_input(
                    Arc::clone(&agent.client),
                    agent.role,
                    hz,
                    self.stop_input.subscribe(),
                );
                self.input_tasks.push((agent.role, tokio::spawn(task)));
            }
        }
    }

    /// Stops the input senders (and keeps the host's send times) and the churning
    /// agents (which leave for good).
    pub async fn stop_input(&mut self) {
        self.stop_input.send_replace(true);
        for task in self.churn_tasks.drain(..) {
            if let Ok(churned) = task.await {
                self.churned.push(churned);
            }
        }
        for (role, task) in self.input_tasks.drain(..) {
            if let Ok(times) = task.await
                && role == AgentRole::Host
            {
                self.input_sent = times;
            }
        }
    }

    /// Frames received so far by all agents.
    pub fn frames_received(&self) -> usize {
        self.agents.iter().map(|a| a.client.frames_received()).sum()
    }
}

/// A churning agent: stays `interval`, leaves (closing its connections), comes back
/// with its credentials and waits for its first frame, again and again until `stop`.
async fn churn(
    agent: BenchAgent,
    tls: Arc<rustls::ClientConfig>,
    interval: Duration,
    ice_transport: IceTransport,
    mut stop: watch::Receiver<bool>,
) -> Churned {
    let mut out = Churned::default();
    let mut client = agent.client;
    let mut stay_start = agent.joined_at;
    // Each connection's `welcome` carries the single-use token of the next one.
    let mut url = client.resume_url().map(str::to_owned);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        out.stays.push((stay_start, client.frames()));
        if let Ok(c) = Arc::try_unwrap(client) {
            let _ = c.close().await;
        }
        stay_start = Instant::now();
        let back = async {
            let url = url.as_deref().ok_or(crate::client::ClientError::Protocol(
                "the welcome carried no resume token".into(),
            ))?;
            let options = AgentOptions {
                ice_transport,
                ..AgentOptions::default()
            };
            let c = Agent::connect(url, Arc::clone(&tls), options).await?;
            c.wait_frames(1, CONNECT_WAIT).await?;
            Ok::<_, crate::client::ClientError>(c)
        }
        .await;
        match back {
            Ok(c) => {
                out.rejoins += 1;
                url = c.resume_url().map(str::to_owned);
                if let Some(first) = c.frames().first() {
                    out.first_frames
                        .push(first.received_at.saturating_duration_since(stay_start));
                }
                client = Arc::new(c);
            }
            Err(e) => {
                tracing::warn!(agent = %agent.name, error = %e, "a churning agent could not come back");
                out.error = Some(format!("{}: {e}", agent.name));
                out.failed += 1;
                return out;
            }
        }
    }
    out.stays.push((stay_start, client.frames()));
    if let Ok(c) = Arc::try_unwrap(client) {
        let _ = c.close().await;
    }
    out
}

/// Sends mouse moves at `hz` until `stop` says so; returns the send times (for the
/// host, event `n` was sent at index `n`).
async fn send_input(
    agent: Arc<Agent>,
    role: AgentRole,
    hz: f64,
    mut stop: watch::Receiver<bool>,
) -> Vec<Instant> {
    let mut times = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / hz));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return times,
        }
        let (x, y) = match role {
            AgentRole::Host => measure::control_position(n),
            _ => ((n & 0xffff) as u16, VIEW_ONLY_MARK),
        };
        let event = InputEvent {
            seq: n,
            kind: InputKind::MouseMove { x, y },
        };
        let at = Instant::now();
        if agent.send_input(&event).await.is_err() {
            return times;
        }
        times.push(at);
        n = n.wrapping_add(1);
    }
}

/// Sums of the figures of every session.
#[derive(Debug)]
pub struct Totals {
    /// Frame counts of healthy agents.
    pub frames: super::report::Frames,
    /// Frame latency, µs.
    pub latency: Histogram<u64>,
    /// Join to first frame, µs.
    pub first_frame: Histogram<u64>,
    /// Join to peer connection up, µs.
    pub connect: Histogram<u64>,
    /// Input counts (`refused_view_only` comes from the relay).
    pub input: super::report::Input,
    /// Input latency, µs.
    pub input_latency: Histogram<u64>,
    /// Customer messages that identify a masked agent.
    pub masked_leaks: u64,
    /// Slow agents.
    pub slow: super::report::SlowAgents,
    /// Churning agents (`first_frame_ms` comes from `churn_first_frame`).
    pub churn: super::report::Churn,
    /// A churning agent's comeback to its first frame, µs.
    pub churn_first_frame: Histogram<u64>,
}

impl Default for Totals {
    fn default() -> Self {
        Totals {
            frames: Default::default(),
            latency: measure::latency_histogram(),
            first_frame: measure::latency_histogram(),
            connect: measure::latency_histogram(),
            input: Default::default(),
            input_latency: measure::latency_histogram(),
            masked_leaks: 0,
            slow: Default::default(),
            churn: Default::default(),
            churn_first_frame: measure::latency_histogram(),
        }
    }
}

impl BenchSession {
    /// The last frame the customer sent at or before `window_end`, and whether every
    /// healthy agent has received it (so the session has drained) and the customer has
    /// every input event the host sent.
    pub fn drained(&self, window_end: Instant) -> bool {
        let sent = self.customer.sent_frames();
        let Some(last) = sent.iter().rev().find(|s| s.sent_at <= window_end) else {
            return true;
        };
        let frames_in = self.agents.iter().filter(|a| !a.slow).all(|a| {
            a.client
                .frames()
                .iter()
                .any(|f| f.digest == last.digest && f.received_at >= last.sent_at)
        });
        let inputs = self
            .customer
            .input_events()
            .iter()
            .filter(|i| matches!(i.event, Ok(InputEvent { kind: InputKind::MouseMove { y, .. }, .. }) if y != VIEW_ONLY_MARK))
            .count();
        frames_in && inputs >= self.input_sent.len()
    }

    /// Adds this session's figures to `t`.
    pub fn score(&self, window_start: Instant, window_end: Instant, t: &mut Totals) {
        let sent = self.customer.sent_frames();
        let index = SentIndex::new(&sent);
        t.frames.sent += sent
            .iter()
            .filter(|s| s.sent_at >= window_start && s.sent_at <= window_end)
            .count() as u64;
        for agent in &self.agents {
            let frames = agent.client.frames();
            if agent.slow {
                t.slow.count += 1;
                t.slow.frames_received += frames.len() as u64;
                continue;
            }
            let r =
                measure::score_agent(&index, &frames, agent.joined_at, window_end, &mut t.latency);
            r.add_to(&mut t.frames);
            measure::record(
                &mut t.connect,
                agent
                    .connected_at
                    .saturating_duration_since(agent.joined_at),
            );
            if let Some(d) = r.first_frame {
                measure::record(&mut t.first_frame, d);
            }
        }

        t.input.sent += self.input_sent.len() as u64;
        let mut highest: Option<u32> = None;
        for input in self.customer.input_events() {
            let Ok(InputEvent {
                kind: InputKind::MouseMove { x, y },
                ..
            }) = input.event
            else {
                continue;
            };
            let Some(n) = measure::control_number(x, y) else {
                t.input.leaked_view_only += 1;
                continue;
            };
            let Some(sent_at) = self.input_sent.get(n as usize) else {
                continue;
            };
            t.input.delivered += 1;
            if highest.is_some_and(|h| n < h) {
                t.input.out_of_order += 1;
            }
            highest = highest.max(Some(n));
            measure::record(
                &mut t.input_latency,
                input.received_at.saturating_duration_since(*sent_at),
            );
        }

        t.masked_leaks += self.masked_leaks();

        for churned in &self.churned {
            t.churn.agents += 1;
            t.churn.rejoins += churned.rejoins;
            t.churn.failed += churned.failed;
            if churned.error.is_some() {
                t.churn.last_error.clone_from(&churned.error);
            }
            for d in &churned.first_frames {
                measure::record(&mut t.churn_first_frame, *d);
            }
            // Each stay's frames must be whole and in order (how many it missed while
            // away is not loss).
            let mut ignored = measure::latency_histogram();
            for (start, frames) in &churned.stays {
                t.churn.frames_received += frames.len() as u64;
                let r = measure::score_agent(&index, frames, *start, window_end, &mut ignored);
                t.churn.broken += r.corrupt + r.out_of_order;
            }
        }
    }

    /// Messages the customer received (signalling and data channels) that contain a
    /// masked agent's name or participant id.
    fn masked_leaks(&self) -> u64 {
        let needles: Vec<&str> = self
            .agents
            .iter()
            .filter(|a| a.role == AgentRole::Masked)
            .flat_map(|a| [a.name.as_str(), a.participant_id.as_str()])
            .collect();
        if needles.is_empty() {
            return 0;
        }
        let texts = self.customer.transcript().texts();
        let channels = self
            .customer
            .data_channel_messages()
            .into_iter()
            .map(|m| String::from_utf8_lossy(&m.data).into_owned());
        texts
            .into_iter()
            .chain(channels)
            .filter(|t| needles.iter().any(|n| t.contains(n)))
            .count() as u64
    }

    /// Ends the session (as its host: a session whose people just disconnect would wait
    /// out its grace periods on the relay, recordings unfinished), then closes every
    /// client.
    pub async fn close(self, api: &RelayApi) {
        self.customer.set_publishing(false);
        if let Err(e) = api.end_session(&self.host_jwt, &self.session_id).await {
            tracing::warn!(session = %self.session_id, error = %e, "ending a bench session");
        }
        for agent in self.agents {
            if let Ok(agent) = Arc::try_unwrap(agent.client) {
                let _ = agent.close().await;
            }
        }
        let _ = self.customer.close().await;
    }
}
