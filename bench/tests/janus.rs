//! The `janus` target of `relay-bench compare` against a real Janus: its subscribers
//! must receive every frame the publisher sent, through Janus.

use std::path::Path;

use clap::Parser;
use relay_bench::compare::janus;
use relay_bench::run::RunArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

const JANUS: &str = "/usr/bin/janus";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn janus_carries_every_frame_to_its_subscribers() {
    if !Path::new(JANUS).is_file() {
        let message = format!("no Janus at {JANUS}: {}", janus::INSTALL_HINT);
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("\n*** SKIPPED janus_carries_every_frame_to_its_subscribers: {message} ***\n");
        return;
    }
    let args = Cli::parse_from([
        "test",
        "--sessions",
        "1",
        "--agents",
        "2",
        "--masked",
        "0",
        "--view-only",
        "0",
        "--duration",
        "3",
        "--quiet",
    ])
    .run;
    let report = janus::run(&args, Path::new(JANUS))
        .await
        .expect("janus run");
    eprintln!("{}", report.table());
    let f = &report.frames;
    assert_eq!(report.target, "janus");
    assert!(f.expected > 0, "nothing expected: {f:?}");
    assert_eq!(f.received, f.expected, "{f:?}");
    assert_eq!((f.lost, f.out_of_order, f.corrupt), (0, 0, 0), "{f:?}");
    // 2 subscribers x 3 s x 15 fps, the first frames aside.
    assert!(f.received >= 2 * 40, "{f:?}");
    assert!(
        report.relay.packets_forwarded >= f.received,
        "{:?}",
        report.relay
    );
    assert!(
        report.relay.cpu_seconds.is_some_and(|c| c > 0.0),
        "{:?}",
        report.relay
    );
    assert!(report.failures().is_empty(), "{:?}", report.failures());
}

#[tokio::test]
async fn a_missing_janus_says_how_to_install_it() {
    let args = Cli::parse_from(["test", "--quiet"]).run;
    let err = janus::run(&args, Path::new("/nonexistent/bin/janus"))
        .await
        .expect_err("no Janus there");
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/bin/janus") && message.contains("apt-get install janus"),
        "{message}"
    );
}
