//! `epmctl`: the EPM command line for users and administrators.
//!
//! A thin binary: argument parsing and output here, decisions in
//! `epm-policy`. Exit status: 0 success, 1 a check that found a problem,
//! 2 invalid input or a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod explain;
mod policy_check;

/// Where `epmd` listens when the packaging did not say otherwise.
const DEFAULT_SOCKET: &str = "/var/run/epm/epmd.sock";

#[derive(Debug, Parser)]
#[command(
    name = "epmctl",
    version,
    about = "Control and inspect EPM, the endpoint privilege manager",
    long_about = "Control and inspect EPM, the endpoint privilege manager.\n\n\
        Check and explain policies offline, or talk to the local epmd daemon.",
    after_help = "Examples:\n  \
        epmctl policy check policy.json\n  \
        epmctl policy explain --policy policy.json --user alice /usr/bin/nc\n\n\
        Exit status: 0 success, 1 a check found a problem, 2 invalid input or usage."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
struct GlobalArgs {
    /// The daemon's control socket.
    #[arg(long, global = true, value_name = "PATH", env = "EPM_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, explain and show policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file; print a summary, or every error one per line.
    #[command(
        after_help = "Exit status: 0 when the policy is valid (warnings do not fail it), 2 when it is not."
    )]
    Check {
        /// The policy document (JSON).
        file: PathBuf,
    },
    /// Show which rule decides an executable, and why.
    #[command(
        after_help = "Example:\n  epmctl policy explain --policy examples/policy.json --user alice --groups staff /usr/bin/nc"
    )]
    Explain(explain::ExplainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(PolicyCommand::Check { file }) => policy_check::run(&file, cli.global.json),
        Command::Policy(PolicyCommand::Explain(args)) => explain::run(&args, cli.global.json),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("epmctl: {error:#}");
            ExitCode::from(2)
        }
    }
}
