//! `relay-bench run` against the real relay: the benchmark's own figures must say that
//! every frame reached every healthy agent, input arrived, view-only input was refused
//! and no masked agent leaked, in the JSON shape ops scripts read; and `compare` runs the
//! same load through this relay, Janus and the UDP ceiling.

use anyhow::{Context, Result, ensure};
use clap::Parser;
use relay_bench::run::{RunArgs, run};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// Every key of the report that the bench issue documents as stable.
const KEYS: &[&str] = &[
    "/target",
    "/sessions",
    "/agents_per_session",
    "/duration_s",
    "/frames/sent",
    "/frames/expected",
    "/frames/received",
    "/frames/lost",
    "/frames/out_of_order",
    "/latency_ms/p50",
    "/latency_ms/p99",
    "/latency_ms/p999",
    "/latency_ms/max",
    "/first_frame_ms/p50",
    "/first_frame_ms/p99",
    "/input/sent",
    "/input/delivered",
    "/input/refused_view_only",
    "/input/latency_ms/p50",
    "/input/latency_ms/p99",
    "/masked_leaks",
    "/relay/cpu_seconds",
    "/relay/rss_peak_bytes",
    "/relay/packets_forwarded",
    "/relay/cpu_us_per_packet",
    "/relay/bytes_per_session",
];

fn number(json: &Value, key: &str) -> Result<f64> {
    json.pointer(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("report has no number at {key}: {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_run_reports_every_frame_input_and_no_masked_leak() -> Result<()> {
    relay_e2e::install_crypto();
    let bin = tokio::task::spawn_blocking(relay_e2e::relay_binary).await??;
    let json_path = tempfile::NamedTempFile::new()?.into_temp_path();
    let cli = Cli::try_parse_from([
        "relay-bench",
        "--sessions",
        "2",
        "--agents",
        "5",
        "--slow-agents",
        "1",
        "--churn-agents",
        "1",
        "--churn-interval",
        "1",
        "--duration",
        "3",
        "--quiet",
        "--relay-bin",
        bin.to_str().context("binary path")?,
        "--record",
        "--json",
        json_path.to_str().context("json path")?,
    ])?;
    let report = run(&cli.run).await?;
    report.write_json(&json_path)?;
    let json: Value = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    for key in KEYS {
        ensure!(json.pointer(key).is_some(), "report lacks {key}: {json}");
    }
    ensure!(
        report.failures().is_empty(),
        "{:?}\n{}",
        report.failures(),
        report.table()
    );

    // Two sessions of five agents, one of them slow and one coming and going: six
    // healthy agents, each of which got at least the 3 s window's frames at 15 fps
    // minus its join, churn or not.
    ensure!(number(&json, "/sessions")? == 2.0);
    ensure!(number(&json, "/frames/expected")? >= 6.0 * 30.0, "{json}");
    ensure!(number(&json, "/frames/received")? == number(&json, "/frames/expected")?);
    ensure!(number(&json, "/frames/lost")? == 0.0);
    ensure!(number(&json, "/masked_leaks")? == 0.0);
    ensure!(number(&json, "/slow_agents/count")? == 2.0, "{json}");
    // The churning agents came back, each time to whole frames in order.
    ensure!(number(&json, "/churn/agents")? == 2.0, "{json}");
    ensure!(number(&json, "/churn/rejoins")? >= 2.0, "{json}");
    ensure!(number(&json, "/churn/failed")? == 0.0, "{json}");
    ensure!(number(&json, "/churn/broken")? == 0.0, "{json}");
    ensure!(number(&json, "/churn/first_frame_ms/p50")? > 0.0, "{json}");
    // The hosts send at 60 Hz, the view-only agents at 6 Hz: some of each in 3 s.
    ensure!(number(&json, "/input/sent")? >= 2.0 * 60.0, "{json}");
    ensure!(number(&json, "/input/delivered")? == number(&json, "/input/sent")?);
    ensure!(
        number(&json, "/input/refused_view_only")? >= 2.0 * 6.0,
        "{json}"
    );
    ensure!(number(&json, "/input/leaked_view_only")? == 0.0);
    ensure!(number(&json, "/latency_ms/p50")? > 0.0);
    ensure!(number(&json, "/first_frame_ms/p50")? > 0.0);
    // The relay was measured, not guessed.
    ensure!(number(&json, "/relay/cpu_seconds")? > 0.0, "{json}");
    ensure!(
        number(&json, "/relay/rss_peak_bytes")? > 1_000_000.0,
        "{json}"
    );
    ensure!(
        number(&json, "/relay/packets_forwarded")? > 6.0 * 30.0,
        "{json}"
    );
    // `--record`: both sessions recorded and finished, the bytes measured.
    ensure!(number(&json, "/recording/raw_bytes")? > 100_000.0, "{json}");
    ensure!(
        number(&json, "/recording/compression_ratio")? > 0.5,
        "{json}"
    );
    ensure!(number(&json, "/recording/unfinished")? == 0.0, "{json}");
    ensure!(number(&json, "/recording/write_errors")? == 0.0, "{json}");
    Ok(())
}

/// `relay-bench compare`: the same load through this relay, Janus (when installed; CI
/// installs it) and the UDP ceiling forwarder, each carrying every frame, with each
/// one's CPU per packet measured and the ratios computed, in the `{"runs": [...]}`
/// shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compare_runs_the_same_load_through_every_target() -> Result<()> {
    use relay_bench::compare::{CompareArgs, compare, janus};

    #[derive(Parser)]
    struct CompareCli {
        #[command(flatten)]
        compare: CompareArgs,
    }

    relay_e2e::install_crypto();
    let relay = tokio::task::spawn_blocking(relay_e2e::relay_binary).await??;
    let bench = tokio::task::spawn_blocking(relay_e2e::bench_binary).await??;
    let janus_bin = std::path::Path::new("/usr/bin/janus");
    let mut targets = vec!["relay", "udp-ceiling"];
    if janus_bin.is_file() {
        targets.insert(1, "janus");
    } else {
        let message = format!(
            "no Janus at {}: {}",
            janus_bin.display(),
            janus::INSTALL_HINT
        );
        ensure!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("\n*** the janus target is SKIPPED: {message} ***\n");
    }
    let json_path = tempfile::NamedTempFile::new()?.into_temp_path();
    let cli = CompareCli::try_parse_from([
        "relay-bench",
        "--targets",
        &targets.join(","),
        "--sessions",
        "1",
        "--agents",
        "3",
        "--duration",
        "3",
        "--quiet",
        "--relay-bin",
        relay.to_str().context("binary path")?,
        "--forwarder-bin",
        bench.to_str().context("binary path")?,
        "--json",
        json_path.to_str().context("json path")?,
    ])?;
    let report = compare(&cli.compare).await?;
    std::fs::write(&json_path, serde_json::to_vec(&report)?)?;
    let json: Value = serde_json::from_slice(&std::fs::read(&json_path)?)?;
    let runs = json
        .pointer("/runs")
        .and_then(Value::as_array)
        .with_context(|| format!("no runs: {json}"))?;
    let names: Vec<&str> = runs
        .iter()
        .filter_map(|r| r.pointer("/target").and_then(Value::as_str))
        .collect();
    ensure!(names == targets, "{names:?}\n{}", report.table());
    for run in runs {
        for key in KEYS {
            ensure!(run.pointer(key).is_some(), "a run lacks {key}: {run}");
        }
        let target = run
            .pointer("/target")
            .and_then(Value::as_str)
            .unwrap_or("?");
        // Three agents for 3 s at 15 fps, their joins aside: every frame, through each.
        let expected = number(run, "/frames/expected")?;
        ensure!(expected >= 3.0 * 30.0, "{target}: {run}");
        ensure!(
            number(run, "/frames/received")? == expected,
            "{target}: {run}"
        );
        ensure!(number(run, "/frames/lost")? == 0.0, "{target}: {run}");
        ensure!(number(run, "/frames/corrupt")? == 0.0, "{target}: {run}");
        // Each target's own count of what it forwarded, and its CPU for that.
        ensure!(
            number(run, "/relay/packets_forwarded")? >= expected,
            "{target}: {run}"
        );
        ensure!(
            number(run, "/relay/cpu_us_per_packet")? > 0.0,
            "{target}: {run}"
        );
    }
    ensure!(
        number(&json, "/ratios/relay_over_udp_ceiling")? > 0.0,
        "{json}"
    );
    if targets.contains(&"janus") {
        ensure!(number(&json, "/ratios/relay_over_janus")? > 0.0, "{json}");
    }
    Ok(())
}
