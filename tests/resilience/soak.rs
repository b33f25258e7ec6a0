use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use relay_bench::run::{RunArgs, run};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// Seconds of the CI soak; `RELAY_SOAK_SECS` changes it (the documented long soak is
/// `relay-bench run` itself, see `docs/operations.md`).
fn soak_seconds() -> u64 {
    std::env::var("RELAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

/// Memory the relay may gain between the settled second quarter of the soak and its
/// last quarter: allocator noise, never a leak that grows with time or churn.
const RSS_GROWTH_ALLOWED: i64 = 8 << 20;

/// Two minutes of `relay-bench run` (two sessions of eight agents, two of them leaving
/// and coming back every three seconds, one slow): nothing is lost for the healthy
/// agents, every comeback gets whole frames, input all arrives, no masked agent leaks,
/// and the relay's resident memory is as high at the end as it was once settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_minute_soak_with_churn_loses_nothing_and_does_not_grow() -> Result<()> {
    relay_e2e::install_crypto();
    let bin = tokio::task::spawn_blocking(relay_e2e::relay_binary).await??;
    let seconds = soak_seconds();
    let duration = seconds.to_string();
    let cli = Cli::try_parse_from([
        "relay-bench",
        "--sessions",
        "2",
        "--agents",
        "8",
        "--masked",
        "2",
        "--view-only",
        "2",
        "--slow-agents",
        "1",
        "--churn-agents",
        "2",
        "--churn-interval",
        "3",
        "--duration",
        &duration,
        "--quiet",
        "--relay-bin",
        bin.to_str().context("binary path")?,
    ])?;
    let report = tokio::time::timeout(Duration::from_secs(seconds + 120), run(&cli.run))
        .await
        .context("the soak did not finish")??;
    let table = report.table();
    ensure!(
        report.failures().is_empty(),
        "{:?}\n{table}",
        report.failures()
    );
    let f = &report.frames;
    ensure!(
        f.lost == 0 && f.received == f.expected && f.expected > 0,
        "frames: {f:?}\n{table}"
    );
    ensure!(f.out_of_order == 0 && f.corrupt == 0, "frames: {f:?}");
    let c = &report.churn;
    ensure!(
        c.rejoins >= seconds / 3 && c.failed == 0 && c.broken == 0,
        "churn: {c:?}\n{table}"
    );
    let i = &report.input;
    ensure!(
        i.sent > 0 && i.delivered == i.sent && i.leaked_view_only == 0,
        "input: {i:?}"
    );
    ensure!(
        report.masked_leaks == 0,
        "masked leaks: {}",
        report.masked_leaks
    );
    let trend = report
        .relay
        .rss_trend
        .as_ref()
        .context("the bench sampled no resident memory")?;
    eprintln!("soak: {table}");
    ensure!(
        trend.growth_bytes <= RSS_GROWTH_ALLOWED,
        "the relay kept growing: {} MiB settled, {} MiB at the end\n{:?}",
        trend.settled_bytes >> 20,
        trend.end_bytes >> 20,
        trend.samples
    );
    Ok(())
}
