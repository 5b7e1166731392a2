//! `epmd`: the EPM daemon. Parses arguments and runs [`epm_agent::daemon`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use epm_agent::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "epmd",
    version,
    about = "The EPM daemon: decides every exec by policy and audits it",
    long_about = "The EPM daemon: sees every program before it runs, decides by policy \
        (allow, justify, approve, deny), answers the kernel, and audits the decision.\n\n\
        Runs as root. SIGHUP reloads the policy file; SIGTERM stops cleanly.",
    after_help = "Example:\n  sudo epmd --config /etc/epm/epmd.toml\n\n\
        The configuration is documented in docs/configuration.md."
)]
struct Args {
    /// The TOML configuration file.
    #[arg(long, short, value_name = "FILE")]
    config: PathBuf,
    /// Check the configuration, the policy file and the platform CA, then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EPM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let loaded = match Config::load_system(&args.config) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("epmd: {error}");
            return ExitCode::from(2);
        }
    };
    for warning in &loaded.warnings {
        tracing::warn!("managed preferences: {warning}");
    }
    if let Some(managed) = &loaded.managed {
        tracing::info!(keys = ?loaded.overrides, "settings from managed preferences {}", managed.display());
    }
    let config = loaded.config;
    if args.check {
        if let Some(path) = &config.policy_file
            && let Err(errors) = epm_agent::policy_source::read_policy_file(path)
        {
            eprintln!("epmd: policy {}:\n{errors}", path.display());
            return ExitCode::from(2);
        }
        if let Some(platform) = &config.platform
            && let Err(error) = epm_sync::load_ca(&platform.ca_cert)
        {
            eprintln!("epmd: {error}");
            return ExitCode::from(2);
        }
        if let Some(managed) = &loaded.managed {
            for key in &loaded.overrides {
                println!("{key}: from {}", managed.display());
            }
        }
        // Loads (and verifies) the kernel hook without attaching it.
        let hook = epm_agent::kernel_hook::prepare(&config.kernel_hook);
        for line in
            epm_agent::kernel_hook::describe(&epm_agent::kernel_hook::snapshot(&hook.status))
        {
            println!("{line}");
        }
        println!("{}: configuration valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    match epm_agent::daemon::run(config, &args.config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("epmd: {error:#}");
            ExitCode::FAILURE
        }
    }
}
