//! The `janus` target of `relay-bench compare`: the load of `run` through Janus's
//! VideoRoom plugin, the SFU most often deployed for this job.
//!
//! The order of a run, as `run`'s:
//!
//! 1. Janus ([`process::LocalJanus`]): Debian's `janus` (`--janus-bin`) with a
//!    generated configuration: the VideoRoom plugin and the HTTP transport only, its API
//!    and Admin API on loopback ports, ICE on one local address (Janus refuses loopback
//!    for ICE; see [`process`]), no STUN;
//! 2. set-up, all sessions at once ([`room::Room::open`]): per bench session a Janus
//!    session, a room in the source's codec, a publisher (the bench customer's track
//!    and publishing loop) that offers with `joinandconfigure`, then `--agents`
//!    subscribers that `join` the feed, answer Janus's offer and `start`;
//! 3. the window (`--duration`): Janus's CPU from `/proc/<pid>` and its packet counters
//!    from the Admin API at both ends;
//! 4. drain: publishing goes on until every subscriber has the last frame of the window
//!    (at most [`DRAIN_LIMIT`]);
//! 5. scoring with `run`'s measures into a [`Report`] with target `janus`.
//!
//! `packets_forwarded` is Janus's own count: the Admin API's `handle_info` packets sent
//! (`webrtc.media.*.stats.out.packets`) summed over the subscribers' handles (one per
//! subscriber per packet, as the relay counts), read at both ends of the window. Input events, masking
//! and slow agents are this relay's features; they stay at zero here.

mod api;
mod peer;
mod process;
mod room;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::relay_process::ProcStats;
use crate::run::report::{RelayUsage, Report};
use crate::run::session::Totals;
use crate::run::{DRAIN_LIMIT, RunArgs, RunError};
use process::LocalJanus;
use room::Room;

pub use process::INSTALL_HINT;

/// Runs the load of `args` through Janus's VideoRoom plugin, with the Janus binary
/// `janus_bin`. Fails with a hint to install Janus when it is missing.
pub async fn run(args: &RunArgs, janus_bin: &Path) -> Result<Report, RunError> {
    args.validate()?;
    let source = args.source()?;
    // No overall timeout: a long poll lasts up to 30 s.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| RunError::Setup(format!("HTTP client: {e}")))?;
    let janus = LocalJanus::start(janus_bin, &http).await?;
    let before_sessions = ProcStats::read(janus.pid())?;

    let progress = crate::run::progress_bar(args);
    progress.set_prefix("janus");
    let opens = (0..args.sessions).map(|n| {
        let (http, janus, source, progress) = (&http, &janus, source.clone(), &progress);
        async move {
            let room = Room::open(http, janus, n, source, args.fps, args.agents).await?;
            progress.inc(1);
            Ok::<Room, RunError>(room)
        }
    });
    let rooms = futures_util::future::try_join_all(opens).await?;

    let window = Duration::from_secs_f64(args.duration);
    progress.set_prefix("running");
    progress.set_length(window.as_secs().max(1));
    progress.set_position(0);
    // The Admin API's work stays outside the CPU window.
    let start_packets = packets_sent(&http, &janus, &rooms).await?;
    let start_received: u64 = rooms.iter().map(Room::rtp_packets_received).sum();
    let start_usage = ProcStats::read(janus.pid())?;
    let window_start = Instant::now();
    let window_end = window_start + window;
    crate::run::watch_window(&progress, window_start, window, || {
        rooms.iter().map(Room::frames_received).sum()
    })
    .await;
    let end_usage = ProcStats::read(janus.pid())?;
    let end_packets = packets_sent(&http, &janus, &rooms).await?;
    let end_received: u64 = rooms.iter().map(Room::rtp_packets_received).sum();
    tracing::debug!(
        janus_sent = end_packets.saturating_sub(start_packets),
        subscribers_read = end_received.saturating_sub(start_received),
        "janus: RTP packets in the window"
    );

    progress.set_prefix("drain");
    let drain_until = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < drain_until && !rooms.iter().all(|r| r.drained(window_end)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = ProcStats::read(janus.pid())?;
    progress.finish_and_clear();

    let mut totals = Totals::default();
    for room in &rooms {
        if let Some(e) = room.publisher.publish_error() {
            tracing::warn!(error = %e, "janus: a publisher stopped");
        }
        room.score(window_start, window_end, &mut totals);
    }
    futures_util::future::join_all(rooms.into_iter().map(Room::close)).await;
    drop(janus);

    let cpu_seconds = end_usage.cpu_seconds - start_usage.cpu_seconds;
    let packets_forwarded = end_packets.saturating_sub(start_packets);
    let relay = RelayUsage {
        cpu_seconds: Some(cpu_seconds),
        rss_peak_bytes: Some(after.rss_peak_bytes),
        packets_forwarded,
        cpu_us_per_packet: (packets_forwarded > 0)
            .then(|| cpu_seconds * 1e6 / packets_forwarded as f64),
        bytes_per_session: Some(
            end_usage
                .rss_bytes
                .saturating_sub(before_sessions.rss_bytes)
                / u64::from(args.sessions),
        ),
        ice_tcp_bytes: None,
        rss_trend: None,
    };
    Ok(Report::media_only("janus", args, window, &totals, relay))
}

/// RTP packets Janus has sent to every subscriber of `rooms` so far (Admin API).
async fn packets_sent(
    http: &reqwest::Client,
    janus: &LocalJanus,
    rooms: &[Room],
) -> Result<u64, RunError> {
    let reads = rooms.iter().flat_map(|room| {
        room.subscribers.iter().map(move |s| {
            api::handle_packets_sent(
                http,
                janus.admin_url(),
                janus.admin_secret(),
                room.session.id(),
                s.handle,
            )
        })
    });
    let counts = futures_util::future::try_join_all(reads)
        .await
        .map_err(|e| RunError::Setup(format!("Janus's Admin API: {e}")))?;
    Ok(counts.into_iter().sum())
}
