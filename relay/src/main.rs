//! The `relay` binary: parses the command line and dispatches to the library.

use std::process::ExitCode;

use clap::Parser;
use relay::cli::{self, Cli, Command};
use relay::config::{Config, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => args
            .load_config()
            .map_err(anyhow::Error::from)
            .and_then(serve),
        Command::Token(args) => cli::run_token(&args).map(|t| println!("{t}")),
        Command::Config(cmd) => cli::run_config(&cmd).map(|out| println!("{out}")),
        Command::ReviewKey(cmd) => cli::run_review_key(&cmd).map(|out| println!("{out}")),
        Command::Cluster(cmd) => cli::run_cluster(&cmd).map(|out| println!("{out}")),
        // Their own exit statuses: 0 intact, 1 something lost (verify), 2 error.
        Command::Recordings(cmd) => {
            return match cli::run_recordings(&cmd) {
                Ok(outcome) => {
                    print!("{}", outcome.output);
                    if !outcome.output.ends_with('\n') {
                        println!();
                    }
                    ExitCode::from(outcome.exit_code)
                }
                Err(e) => {
                    eprintln!("relay: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(relay::signal::serve(config))
}

/// Logs go to stderr, so that stdout carries only the `listening on` line. The
/// `webrtc` stack's per-datagram errors are counted and logged at most once a minute
/// per reason (`relay::transport::rejects`).
fn init_logging(config: &Config) {
    use relay::transport::rejects::{RejectCounter, RejectLogLimit, counter};
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::FilterExt;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let filter = filter.and(RejectLogLimit::default());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match config.log.format {
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(RejectCounter::layer(counter()))
        .init();
}
