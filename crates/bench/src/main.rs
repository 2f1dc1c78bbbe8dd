//! The `herald-bench` binary: parse, run one scenario, print the report.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if std::env::args().nth(1).as_deref() == Some(herald_bench::WORKER_FLAG) {
        return match herald_bench::worker_main().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "worker failed");
                ExitCode::FAILURE
            }
        };
    }
    let args = herald_bench::Args::parse();
    let report = match herald_bench::run(&args).await {
        Ok(report) => report,
        Err(e) => {
            tracing::error!(error = %e, "run failed");
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        serde_json::to_string_pretty(&report)
            .map_err(std::io::Error::other)
            .and_then(|json| writeln!(out, "{json}"))
    } else {
        write!(out, "{report}")
    };
    if written.is_err() || (args.strict && !report.problems.is_empty()) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
