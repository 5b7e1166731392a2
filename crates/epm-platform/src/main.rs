//! `epm-platform`: the EPM reference management server and its admin CLI.
//! The commands live in `cli/`, one module per command group.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::Failure;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EPM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(message)) => {
            eprintln!("epm-platform: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Other(message)) => {
            eprintln!("epm-platform: {message}");
            ExitCode::from(2)
        }
    }
}
