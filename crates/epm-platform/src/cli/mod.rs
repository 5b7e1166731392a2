//! The `epm-platform` command line: what each command is, and one module
//! per command group that runs it (`serve`, `admin`, `enroll_token`,
//! `policy`, `devices`, `requests`, `audit`, `offline_code`, `activity`,
//! `signing_key`). The helpers here are shared by them: where the
//! platform is (`Remote`), the admin client, the database for offline
//! commands, and terminal-safe printing.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use epm_api::validate::printable;
use epm_platform::client::{AdminClient, ClientError};
use epm_platform::db::Db;
use epm_platform::keys::DataDir;

mod activity;
mod admin;
mod audit;
mod devices;
mod enroll_token;
mod offline_code;
mod policy;
mod requests;
mod serve;
mod signing_key;

const EXAMPLES: &str = "\
First start, on one machine:
  epm-platform serve --data /var/lib/epm-platform --listen 0.0.0.0:8443 --hostname epm.example.com
  epm-platform admin create --data /var/lib/epm-platform --name alice --approver-level 1
  export EPM_ADMIN_TOKEN=epa_…   # printed by the previous command; alice is the owner
  epm-platform --data /var/lib/epm-platform enroll-token create --uses 50 --expires 7d
  epm-platform --data /var/lib/epm-platform admin create --name bob --role approver --approver-level 1
  epm-platform admin set-password --data /var/lib/epm-platform --name alice   # then open https://epm.example.com:8443/console/

Then, from any machine with ca.pem:
  epm-platform --url https://epm.example.com:8443 --ca ca.pem policy push company.json
  epm-platform --url https://epm.example.com:8443 --ca ca.pem policy push mac-7.json --device mac-7
  epm-platform --url https://epm.example.com:8443 --ca ca.pem requests list --state pending
  epm-platform --url https://epm.example.com:8443 --ca ca.pem audit tail -f --decision deny

Agents pin <data>/ca.pem (`ca_cert`) and the content of <data>/signing-key.pub
(`policy_public_key`). docs/api.md describes every call.";
/// The EPM platform: policies, approvals and the fleet's audit, over HTTPS.
#[derive(Debug, Parser)]
#[command(name = "epm-platform", version, after_help = EXAMPLES)]
pub(crate) struct Cli {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: Command,
}

/// Where the platform is, for the admin commands.
#[derive(Debug, Args)]
struct Remote {
    /// The platform's URL.
    #[arg(
        long,
        global = true,
        env = "EPM_PLATFORM_URL",
        default_value = "https://127.0.0.1:8443"
    )]
    url: String,
    /// The platform's CA certificate (default: <--data>/ca.pem).
    #[arg(long, global = true, env = "EPM_PLATFORM_CA")]
    ca: Option<PathBuf>,
    /// The platform's data directory (for `serve`, offline `admin create`,
    /// and as the default place of ca.pem).
    #[arg(long, global = true, env = "EPM_PLATFORM_DATA")]
    data: Option<PathBuf>,
    /// Where the state is kept: sqlite://PATH (default:
    /// <--data>/platform.db, one instance) or postgres://USER@HOST/DB
    /// (any number of instances sharing it; see docs/scale.md). For TLS to
    /// PostgreSQL add ?sslmode=verify-full&sslrootcert=CA.pem: the server
    /// is always verified against that PEM file.
    #[arg(long, global = true, env = "EPM_PLATFORM_DATABASE")]
    database: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (HTTPS only). Creates the CA, the server certificate
    /// and the signing key in --data at first start.
    Serve(serve::Serve),
    /// Admin accounts.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
    /// Enrollment tokens for agents.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(enroll_token::EnrollTokenCommand),
    /// Policy documents and their scopes.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Devices(devices::DevicesCommand),
    /// Approval requests.
    #[command(subcommand)]
    Requests(requests::RequestsCommand),
    /// The fleet's audit.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Answer an agent's offline challenge with a code.
    #[command(name = "offline-code")]
    OfflineCode {
        /// The device the user reads the challenge from.
        #[arg(long)]
        device: String,
        /// The challenge (EPM1-…).
        challenge: String,
    },
    /// The platform's own audit of admin calls.
    Activity {
        /// Only this admin's calls (`local`, `device:ID` for enrollments).
        #[arg(long)]
        admin: Option<String>,
        /// Print the counts of refused anonymous and rate-limited calls
        /// instead.
        #[arg(long)]
        refused: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Rotate the key that signs policy bundles and grants, without a day
    /// when agents refuse them (works on --data, offline).
    #[command(subcommand, name = "signing-key", after_help = signing_key::ROTATION_HELP)]
    SigningKey(signing_key::SigningKeyCommand),
}

/// Runs one command.
pub(crate) async fn run(cli: Cli) -> Result<(), Failure> {
    let remote = &cli.remote;
    match cli.command {
        Command::Serve(serve) => serve::run(remote, serve).await,
        Command::Admin(command) => admin::run(remote, command).await,
        Command::EnrollToken(command) => enroll_token::run(remote, command).await,
        Command::Policy(command) => policy::run(remote, command).await,
        Command::Devices(command) => devices::run(remote, command).await,
        Command::Requests(command) => requests::run(remote, command).await,
        Command::Audit(command) => audit::run(remote, command).await,
        Command::OfflineCode { device, challenge } => {
            offline_code::run(remote, device, challenge).await
        }
        Command::SigningKey(command) => signing_key::run(remote, command),
        Command::Activity {
            admin,
            refused,
            json,
        } => activity::run(remote, admin.as_deref(), refused, json).await,
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: write a number and s, m, h or d (30m, 24h, 7d)"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: write a number and s, m, h or d (30m, 24h, 7d)"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

/// 1: the platform said no; 2: anything else.
pub(crate) enum Failure {
    /// The platform (or the database's rules) refused.
    Refused(String),
    /// Anything else.
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        match e {
            ClientError::Refused { .. } => Failure::Refused(e.to_string()),
            _ => Failure::Other(e.to_string()),
        }
    }
}

fn other(e: impl std::fmt::Display) -> Failure {
    Failure::Other(e.to_string())
}

fn data_dir(remote: &Remote) -> Result<DataDir, Failure> {
    let dir = remote
        .data
        .as_deref()
        .ok_or_else(|| other("--data DIR is required (or EPM_PLATFORM_DATA)"))?;
    DataDir::open(dir).map_err(other)
}

/// The database `--database` names, or the data directory's SQLite file.
fn open_db(remote: &Remote, data: &DataDir) -> Result<Db, Failure> {
    match remote.database.as_deref().filter(|d| !d.is_empty()) {
        Some(url) => Db::open_url(url)
            .map_err(|e| other(format!("{}: {e}", epm_platform::db::sql::redact(url)))),
        None => Db::open(&data.database())
            .map_err(|e| other(format!("{}: {e}", data.database().display()))),
    }
}

fn client(remote: &Remote) -> Result<AdminClient, Failure> {
    let ca: PathBuf = match (&remote.ca, &remote.data) {
        (Some(ca), _) => ca.clone(),
        (None, Some(data)) => data.join("ca.pem"),
        (None, None) => {
            return Err(other(
                "give the platform's CA with --ca FILE (or --data DIR holding ca.pem)",
            ));
        }
    };
    let pem = std::fs::read(&ca).map_err(|e| other(format!("{}: {e}", ca.display())))?;
    let token = std::env::var("EPM_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    Ok(AdminClient::new(&remote.url, &pem, token)?)
}

fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    println!("{}", serde_json::to_string(value).map_err(other)?);
    Ok(())
}

/// Untrusted text on one terminal line: control and bidirectional
/// formatting characters are shown as `?`.
fn line(text: &str) -> String {
    printable(text).into_owned()
}

/// Percent-encodes what is not unreserved in a URL path segment or query value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~:@".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
