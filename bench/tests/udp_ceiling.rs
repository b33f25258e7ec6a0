//! `compare`'s `udp-ceiling` target end to end: the forwarder runs as its own process
//! (this package's `relay-bench udp-forwarder`), and every frame of every receiver is
//! counted and scored as `run` scores agents.

use clap::Parser;
use relay_bench::compare::ceiling;
use relay_bench::run::RunArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_reaches_every_receiver_and_the_forwarder_is_measured() {
    let cli = Cli::try_parse_from([
        "relay-bench",
        "--sessions",
        "1",
        "--agents",
        "2",
        "--masked",
        "0",
        "--view-only",
        "0",
        "--duration",
        "2",
        "--quiet",
    ])
    .expect("options");
    let report = ceiling::run_with(&cli.run, env!("CARGO_BIN_EXE_relay-bench").as_ref())
        .await
        .expect("udp-ceiling run");
    let f = &report.frames;
    assert_eq!(report.target, "udp-ceiling");
    // 2 s at 15 fps, to each of 2 receivers.
    assert!(f.sent >= 25, "{report:#?}");
    assert!(f.expected >= 2 * f.sent, "{report:#?}");
    assert_eq!(f.received, f.expected, "{report:#?}");
    assert_eq!(f.lost, 0, "{report:#?}");
    assert_eq!((f.out_of_order, f.corrupt), (0, 0), "{report:#?}");
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    // Each packet of the window went to both receivers.
    let r = &report.relay;
    assert!(r.packets_forwarded >= 2 * f.sent, "{report:#?}");
    assert!(
        r.cpu_us_per_packet.is_some_and(|us| us > 0.0),
        "{report:#?}"
    );
    assert!(r.rss_peak_bytes.is_some_and(|b| b > 0), "{report:#?}");
    assert!(report.latency_ms.p50 > 0.0, "{report:#?}");
}
