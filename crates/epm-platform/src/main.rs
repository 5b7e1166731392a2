//! `epm-platform`: the EPM reference management server and its admin CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use epm_api::admin::{
    ActivityPage, AdminCreated, AdminInfo, AdminRequest, AdminRole, AuditPage, CreateAdmin,
    CreateEnrollToken, DenyRequest, DeviceInfo, EnrollTokenCreated, EnrollTokenInfo,
    OfflineCodeRequest, OfflineCodeResponse, PolicyEntry, PolicyPushed, PolicyScope, RevokeRequest,
    SetPassword, UpdateAdmin,
};
use epm_api::agent::RequestState;
use epm_api::paths;
use epm_api::validate::printable;
use epm_platform::client::{AdminClient, ClientError};
use epm_platform::db::{Actor, Db};
use epm_platform::keys::DataDir;
use epm_platform::limits::Limits;
use epm_platform::server::{self, AppState};

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
struct Cli {
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
    /// (any number of instances sharing it; see docs/scale.md).
    #[arg(long, global = true, env = "EPM_PLATFORM_DATABASE")]
    database: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (HTTPS only). Creates the CA, the server certificate
    /// and the signing key in --data at first start.
    Serve(Serve),
    /// Admin accounts.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Enrollment tokens for agents.
    #[command(subcommand, name = "enroll-token")]
    EnrollToken(EnrollTokenCommand),
    /// Policy documents and their scopes.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Approval requests.
    #[command(subcommand)]
    Requests(RequestsCommand),
    /// The fleet's audit.
    #[command(subcommand)]
    Audit(AuditCommand),
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
    #[command(subcommand, name = "signing-key", after_help = ROTATION_HELP)]
    SigningKey(SigningKeyCommand),
}

const ROTATION_HELP: &str = "A rotation, step by step:\n  \
    1. epm-platform --data DIR signing-key next\n     \
       makes the next key beside the one in use, and prints its public key.\n  \
    2. Give every agent both keys: policy_public_key = [\"<current>\", \"<next>\"]\n     \
       (epmd.toml, or an array in the com.epm.agent managed preferences).\n  \
    3. epm-platform --data DIR signing-key promote, then restart the server:\n     \
       bundles are signed anew with the next key as agents check in.\n  \
    4. Once every agent has checked in and grants signed before have expired,\n     \
       give agents only the new key.";

#[derive(Debug, Subcommand)]
enum SigningKeyCommand {
    /// Print the key in use and the next one, if one is waiting.
    Show,
    /// Make the next key (step 1 of a rotation).
    Next,
    /// Put the next key in use, keeping the old one as
    /// signing-key-retired-<time>.pem (step 3; restart the server after).
    Promote,
}

#[derive(Debug, Args)]
struct Serve {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Open connections in all; past it the connection idle the longest
    /// is closed, and a new one is refused only when all are busy.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Open connections from one address (IPv6: one /64).
    #[arg(long, default_value_t = Limits::default().max_connections_per_client)]
    max_connections_per_client: usize,
    /// Close a connection with no request in flight for this long: 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Calls per second from one address (bursts of twice that; 0: no limit).
    #[arg(long, default_value_t = Limits::default().calls_per_second_per_client)]
    calls_per_second_per_client: u32,
    /// Calls per second by one agent or admin (bursts of six times that; 0:
    /// no limit).
    #[arg(long, default_value_t = Limits::default().calls_per_second_per_identity)]
    calls_per_second_per_identity: u32,
    /// Audit records one agent may upload per hour.
    #[arg(long, default_value_t = Limits::default().audit_records_per_hour)]
    audit_records_per_hour: u32,
    /// Audit MiB one agent may upload per hour.
    #[arg(long, default_value_t = Limits::default().audit_mib_per_hour)]
    audit_mib_per_hour: u32,
    /// Offline challenges one admin may answer per hour.
    #[arg(long, default_value_t = Limits::default().offline_codes_per_hour)]
    offline_codes_per_hour: u32,
    /// How far ahead a requested window may start: 30d, 12h.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    max_window_lead: Duration,
    /// A console session unused this long ends: 30m.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    session_idle_timeout: Duration,
    /// A console session ends this long after sign-in: 12h.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    session_lifetime: Duration,
    /// Failed console sign-ins one account may have per 15 minutes before
    /// it is locked for the rest of them (0: no limit).
    #[arg(long, default_value_t = Limits::default().sign_in_failures_per_account)]
    sign_in_failures_per_account: u32,
    /// Failed console sign-ins from one address per 15 minutes (0: no
    /// limit).
    #[arg(long, default_value_t = Limits::default().sign_in_failures_per_address)]
    sign_in_failures_per_address: u32,
    /// The console's address as approvers reach it, for the links in
    /// webhook bodies (default: https://<first --hostname>:<port>).
    #[arg(long)]
    console_url: Option<String>,
    /// Names (and IP addresses) in the generated server certificate; repeat
    /// for several. Used only when the certificate is first made.
    #[arg(long = "hostname", default_values = ["localhost", "127.0.0.1"])]
    hostnames: Vec<String>,
    /// Use this certificate (PEM chain) instead of the generated one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create an admin and print its token (shown once); owners only. With
    /// --data and no server needed, this makes the first admin, the owner.
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// owner, policy_admin, approver or auditor (default: approver with
        /// --approver-level, else auditor; the first admin is the owner).
        #[arg(long)]
        role: Option<AdminRole>,
        /// The approval level this admin approves at (1 = first level; at
        /// most the highest level a stored rule has).
        #[arg(long)]
        approver_level: Option<u32>,
        /// An endpoint login name that is this admin (repeat; default: the
        /// admin's name). Nobody approves a request of their own user.
        #[arg(long = "endpoint-user")]
        endpoint_users: Vec<String>,
        /// Read a console password for the new admin from stdin (one line).
        #[arg(long)]
        password_stdin: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set an admin's password for the web console, read from stdin (one
    /// line, 12 to 1024 bytes); the owner sets anyone's, every admin their
    /// own. Ends the admin's console sessions. With --data and no token,
    /// works on the database directly.
    #[command(name = "set-password")]
    SetPassword {
        /// The admin.
        #[arg(long)]
        name: String,
    },
    /// Turn on TOTP (an authenticator app's six-digit codes, RFC 6238) for
    /// an admin's console sign-in, or off with --off. Works on --data, on
    /// the server: prints the secret and the otpauth:// URI once.
    Totp {
        /// The admin.
        #[arg(long)]
        name: String,
        /// Turn it off.
        #[arg(long)]
        off: bool,
    },
    /// List admins.
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Change an admin's role, level or endpoint users (owner only; what is
    /// not given stays).
    Update {
        /// The admin.
        name: String,
        /// The new role.
        #[arg(long)]
        role: Option<AdminRole>,
        /// The new approval level.
        #[arg(long, conflicts_with = "no_approver_level")]
        approver_level: Option<u32>,
        /// No approval level any more.
        #[arg(long)]
        no_approver_level: bool,
        /// The endpoint login names that are this admin (repeat; replaces
        /// the list).
        #[arg(long = "endpoint-user")]
        endpoint_users: Vec<String>,
    },
    /// Refuse an admin's token from now on (owner only).
    Disable {
        /// The admin.
        name: String,
    },
    /// Accept a disabled admin's token again (owner only).
    Enable {
        /// The admin.
        name: String,
    },
    /// Give an admin a new token and refuse the old one (the owner for
    /// anyone, every admin for themselves). Prints the token, shown once.
    #[command(name = "rotate-token")]
    RotateToken {
        /// The admin.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollTokenCommand {
    /// Create a token agents enroll with (`[platform] enrollment_token`).
    Create {
        /// How many devices may use it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid: 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        expires: Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List enrollment tokens (their ids, never the secrets).
    List {
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id: it enrolls nothing more.
    Revoke {
        /// The token's id (etk_…), from `create` or `list`.
        id: String,
    },
}

#[derive(Debug, Args)]
#[group(multiple = false)]
struct ScopeArgs {
    /// For one device.
    #[arg(long)]
    device: Option<String>,
    /// For one user, on the devices that report them.
    #[arg(long)]
    user: Option<String>,
    /// For one group, on the devices with a user in it.
    #[arg(long)]
    group: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> PolicyScope {
        match (&self.device, &self.user, &self.group) {
            (Some(d), _, _) => PolicyScope::Device(d.clone()),
            (_, Some(u), _) => PolicyScope::User(u.clone()),
            (_, _, Some(g)) => PolicyScope::Group(g.clone()),
            _ => PolicyScope::General,
        }
    }
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Push a policy document (general when no scope is given); it replaces
    /// that scope's document and reaches agents at their next check-in.
    Push {
        /// The policy document (docs/policy.md).
        file: PathBuf,
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List the documents.
    List,
    /// Delete a scope's document.
    Delete {
        #[command(flatten)]
        scope: ScopeArgs,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List enrolled devices.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a device: its credentials stop working, its pending and
    /// approved requests are revoked; its audit stays.
    Remove {
        /// Device id.
        device_id: String,
    },
    /// Void a device's credentials now, revoke its pending and approved
    /// requests, and let the next enrollment with a valid token take its id
    /// as a new agent (a reinstalled machine). Without a reset, enrolling an
    /// enrolled device id again needs its current credentials.
    Reset {
        /// Device id.
        device_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum RequestsCommand {
    /// List requests, newest first.
    List {
        /// Only this state: pending, approved, denied, expired, revoked, used.
        #[arg(long)]
        state: Option<RequestState>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve at your level.
    Approve {
        /// Request id.
        id: String,
    },
    /// Deny, with a reason the user reads.
    Deny {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: String,
    },
    /// Withdraw an approval.
    Revoke {
        /// Request id.
        id: String,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print the newest records; with -f, keep following.
    Tail {
        /// Keep waiting for new records.
        #[arg(short, long)]
        follow: bool,
        /// How many of the newest records first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only this decision: allow, deny, would_deny…
        #[arg(long)]
        decision: Option<String>,
        /// Print each record as the agent wrote it, one JSON per line.
        #[arg(long)]
        json: bool,
    },
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

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EPM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
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

/// 1: the platform said no; 2: anything else.
enum Failure {
    Refused(String),
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

fn signing_key(remote: &Remote, command: SigningKeyCommand) -> Result<(), Failure> {
    let data = data_dir(remote)?;
    match command {
        SigningKeyCommand::Show => {
            println!(
                "in use: {}",
                data.signing_key().map_err(other)?.public_key()
            );
            match data.next_signing_key().map_err(other)? {
                Some(next) => println!("next:   {}", next.public_key()),
                None => println!("next:   none (make one with: signing-key next)"),
            }
        }
        SigningKeyCommand::Next => {
            let current = data.signing_key().map_err(other)?.public_key();
            let next = data.make_next_signing_key().map_err(other)?.public_key();
            println!("{next}");
            eprintln!(
                "made the next signing key. Give every agent both keys:\n  policy_public_key = [\"{current}\", \"{next}\"]\nthen run: epm-platform signing-key promote, and restart the server"
            );
        }
        SigningKeyCommand::Promote => {
            let (retired, current) = data.promote_next_signing_key().map_err(other)?;
            println!("{}", current.public_key());
            eprintln!(
                "the next key is in use from the server's next start: restart it. Agents must already pin it (policy_public_key), or they refuse its bundles. Once every agent has checked in and older grants have expired, agents may drop {}",
                retired.public_key()
            );
        }
    }
    Ok(())
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

async fn run(cli: Cli) -> Result<(), Failure> {
    let remote = &cli.remote;
    match cli.command {
        Command::Serve(serve) => run_serve(remote, serve).await,
        Command::Admin(command) => run_admin(remote, command).await,
        Command::EnrollToken(EnrollTokenCommand::Create {
            uses,
            expires,
            json,
        }) => {
            let created: EnrollTokenCreated = client(remote)?
                .post(
                    paths::ADMIN_ENROLL_TOKENS,
                    &CreateEnrollToken {
                        uses,
                        expires_in_seconds: expires.as_secs(),
                    },
                )
                .await?;
            if json {
                return print_json(&created);
            }
            println!("{}", created.token);
            eprintln!(
                "enrollment token {} for {} device(s), valid until {}",
                created.id, created.uses, created.expires_at
            );
            Ok(())
        }
        Command::EnrollToken(EnrollTokenCommand::List { json }) => {
            let tokens: Vec<EnrollTokenInfo> =
                client(remote)?.get(paths::ADMIN_ENROLL_TOKENS).await?;
            for t in &tokens {
                if json {
                    print_json(t)?;
                } else {
                    println!(
                        "{}\t{} use(s) left\texpires {}\tby {}{}",
                        t.id,
                        t.uses_left,
                        t.expires_at,
                        line(&t.created_by),
                        t.revoked_by
                            .as_deref()
                            .map(|who| format!("\trevoked by {}", line(who)))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::EnrollToken(EnrollTokenCommand::Revoke { id }) => {
            client(remote)?
                .post_empty(&paths::ADMIN_ENROLL_TOKEN_REVOKE.replace("{id}", &encode(&id)))
                .await?;
            println!("revoked enrollment token {id}");
            Ok(())
        }
        Command::Policy(PolicyCommand::Push { file, scope }) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| other(format!("{}: {e}", file.display())))?;
            let scope = scope.scope();
            let pushed: PolicyPushed = client(remote)?.put_text(&policy_path(&scope), text).await?;
            for warning in &pushed.warnings {
                eprintln!("warning: {warning}");
            }
            println!(
                "pushed {} as revision {} ({} rules)",
                pushed.entry.scope, pushed.entry.revision, pushed.entry.rules
            );
            Ok(())
        }
        Command::Policy(PolicyCommand::List) => {
            let entries: Vec<PolicyEntry> = client(remote)?.get(paths::ADMIN_POLICIES).await?;
            for e in entries {
                println!(
                    "{}\trevision {}\t{} rules\tby {} at {}",
                    line(&e.scope),
                    e.revision,
                    e.rules,
                    line(&e.pushed_by),
                    e.pushed_at
                );
            }
            Ok(())
        }
        Command::Policy(PolicyCommand::Delete { scope }) => {
            let scope = scope.scope();
            client(remote)?.delete(&policy_path(&scope)).await?;
            println!("deleted {scope}");
            Ok(())
        }
        Command::Devices(DevicesCommand::List { json }) => {
            let devices: Vec<DeviceInfo> = client(remote)?.get(paths::ADMIN_DEVICES).await?;
            if json {
                return devices.iter().try_for_each(print_json);
            }
            for d in devices {
                println!(
                    "{}\t{}\tpolicy v{} (agent has {})\tlast check-in {}\taudit acked {} ({} pending)",
                    line(&d.device_id),
                    line(&d.hostname),
                    d.bundle_version,
                    d.policy_version.map_or("none".into(), |v| format!("v{v}")),
                    d.last_checkin.map_or("never".into(), |t| t.to_string()),
                    d.audit_acked_seq,
                    d.outbox_pending
                );
                if d.reset_pending {
                    println!("\t(reset: waits to enroll again)");
                }
            }
            Ok(())
        }
        Command::Devices(DevicesCommand::Remove { device_id }) => {
            client(remote)?
                .delete(&paths::ADMIN_DEVICE.replace("{device_id}", &encode(&device_id)))
                .await?;
            println!("removed device {device_id}");
            Ok(())
        }
        Command::Devices(DevicesCommand::Reset { device_id }) => {
            client(remote)?
                .post_empty(&paths::ADMIN_DEVICE_RESET.replace("{device_id}", &encode(&device_id)))
                .await?;
            println!("reset device {device_id}: it enrolls again with an enrollment token");
            Ok(())
        }
        Command::Requests(command) => run_requests(remote, command).await,
        Command::Audit(AuditCommand::Tail {
            follow,
            lines,
            device,
            decision,
            json,
        }) => {
            let client = client(remote)?;
            let mut after: Option<u64> = None;
            let mut first = true;
            loop {
                let mut query = vec![format!("limit={}", if first { lines.max(1) } else { 1000 })];
                if let Some(after) = after {
                    query.push(format!("after={after}"));
                }
                if !first {
                    query.push("wait=30".into());
                }
                if let Some(device) = &device {
                    query.push(format!("device={}", encode(device)));
                }
                if let Some(decision) = &decision {
                    query.push(format!("decision={}", encode(decision)));
                }
                let page: AuditPage = client
                    .get(&format!("{}?{}", paths::ADMIN_AUDIT, query.join("&")))
                    .await?;
                for record in &page.records {
                    if json {
                        println!("{}", record.record.get());
                    } else {
                        println!("{}", pretty_record(&record.device_id, record.record.get()));
                    }
                }
                after = Some(page.next);
                first = false;
                if !follow {
                    return Ok(());
                }
            }
        }
        Command::OfflineCode { device, challenge } => {
            let answer: OfflineCodeResponse = client(remote)?
                .post(
                    paths::ADMIN_OFFLINE_CODES,
                    &OfflineCodeRequest {
                        device_id: device,
                        challenge,
                    },
                )
                .await?;
            let what = format!(
                "{} on {} to run {} {} (rule {}) from {} until {}",
                line(&answer.user),
                line(&answer.device_id),
                line(&answer.identity.kind),
                line(&answer.identity.value),
                line(&answer.rule_id),
                answer.window.start,
                answer.window.end
            );
            match &answer.code {
                Some(code) => {
                    println!("{code}");
                    eprintln!("allows {what}, once");
                }
                None => eprintln!(
                    "approved at your level; level {} of {} waits: its approvers run the same command (or `requests approve {}`), then the code is given. It will allow {what}",
                    answer.current_level,
                    answer.levels.len(),
                    answer.request_id
                ),
            }
            Ok(())
        }
        Command::SigningKey(command) => signing_key(remote, command),
        Command::Activity {
            admin,
            refused,
            json,
        } => {
            let path = match &admin {
                Some(admin) => format!("{}?admin={}", paths::ADMIN_ACTIVITY, encode(admin)),
                None => paths::ADMIN_ACTIVITY.to_owned(),
            };
            let page: ActivityPage = client(remote)?.get(&path).await?;
            if refused {
                for r in page.refused {
                    if json {
                        print_json(&r)?;
                    } else {
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{} time(s), last {}",
                            r.hour,
                            line(&r.source),
                            line(&r.who),
                            line(&r.call),
                            r.status,
                            r.count,
                            r.last_at
                        );
                    }
                }
                return Ok(());
            }
            for e in page.entries {
                if json {
                    print_json(&e)?;
                } else {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        e.at,
                        line(&e.admin),
                        line(&e.call),
                        e.status,
                        line(e.detail.as_deref().unwrap_or(""))
                    );
                }
            }
            Ok(())
        }
    }
}

fn policy_path(scope: &PolicyScope) -> String {
    paths::ADMIN_POLICY.replace("{scope}", &encode(&scope.to_string()))
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

fn pretty_record(device: &str, raw: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(raw).unwrap_or_default();
    let field = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(line)
            .unwrap_or_default()
    };
    let event = field("event");
    let what = if event == "exec" || event.is_empty() {
        field("decision")
    } else {
        event
    };
    format!(
        "{} {} seq={} {} user={} path={} rule={}",
        field("time"),
        line(device),
        v.get("seq")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        what,
        field("user"),
        field("path"),
        field("rule_id")
    )
}

fn describe(admin: &AdminInfo) -> String {
    format!(
        "{}\t{}\t{}\tendpoint users: {}{}",
        line(&admin.name),
        admin.role,
        admin
            .approver_level
            .map_or("-".into(), |l| format!("level {l}")),
        line(&admin.endpoint_users.join(", ")),
        if admin.disabled { "\tdisabled" } else { "" }
    )
}

async fn run_admin(remote: &Remote, command: AdminCommand) -> Result<(), Failure> {
    match command {
        AdminCommand::Create {
            name,
            role,
            approver_level,
            endpoint_users,
            password_stdin,
            json,
        } => {
            let password = password_stdin.then(read_password).transpose()?;
            let request = CreateAdmin {
                name,
                role,
                approver_level,
                endpoint_users: (!endpoint_users.is_empty()).then_some(endpoint_users),
            };
            let created: AdminCreated = if offline(remote) {
                // Offline: straight into the database, so the first admin can
                // be made. Whoever can write the data directory owns the
                // platform anyway.
                use epm_api::validate::Validate;
                request
                    .validate()
                    .map_err(|e| Failure::Refused(e.to_string()))?;
                let data = data_dir(remote)?;
                let db = open_db(remote, &data)?;
                let (created, detail) = db
                    .create_admin(Actor::Local, &request)
                    .map_err(|e| Failure::Refused(e.to_string()))?;
                db.record_activity("local", "admin create (offline)", 200, Some(&detail))
                    .map_err(other)?;
                created
            } else {
                client(remote)?.post(paths::ADMIN_ADMINS, &request).await?
            };
            if let Some(password) = password {
                set_password(remote, &created.admin.name, password).await?;
            }
            if json {
                return print_json(&created);
            }
            println!("{}", created.token);
            eprintln!(
                "admin {} created, {}{}; the token above is shown once: export EPM_ADMIN_TOKEN=<token>",
                created.admin.name,
                created.admin.role,
                created
                    .admin
                    .approver_level
                    .map(|l| format!(", approves at level {l}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        AdminCommand::SetPassword { name } => {
            let password = read_password()?;
            set_password(remote, &name, password).await?;
            eprintln!("the console password of {name} is set; its console sessions ended");
            Ok(())
        }
        AdminCommand::Totp { name, off } => {
            let data = data_dir(remote)?;
            let db = open_db(remote, &data)?;
            let secret = (!off).then(epm_platform::console::auth::new_totp_secret);
            db.set_totp(None, &name, secret.as_deref())
                .map_err(|e| Failure::Refused(e.to_string()))?;
            let detail = if off {
                format!("turned TOTP off for admin {name}")
            } else {
                format!("turned TOTP on for admin {name}")
            };
            db.record_activity("local", "admin totp (offline)", 200, Some(&detail))
                .map_err(other)?;
            match secret {
                Some(secret) => {
                    println!("{}", epm_platform::console::auth::totp_uri(&secret, &name));
                    eprintln!(
                        "TOTP is on for {name}: add the URI above (or the secret {secret}) to an authenticator app; it is shown once. Console sign-ins now need its six-digit code"
                    );
                }
                None => eprintln!("TOTP is off for {name}"),
            }
            Ok(())
        }
        AdminCommand::List { json } => {
            let admins: Vec<AdminInfo> = client(remote)?.get(paths::ADMIN_ADMINS).await?;
            for a in &admins {
                if json {
                    print_json(a)?;
                } else {
                    println!("{}", describe(a));
                }
            }
            Ok(())
        }
        AdminCommand::Update {
            name,
            role,
            approver_level,
            no_approver_level,
            endpoint_users,
        } => {
            let client = client(remote)?;
            let admins: Vec<AdminInfo> = client.get(paths::ADMIN_ADMINS).await?;
            let current = admins
                .into_iter()
                .find(|a| a.name == name)
                .ok_or_else(|| Failure::Refused(format!("no admin {name:?}")))?;
            let update = UpdateAdmin {
                role: role.unwrap_or(current.role),
                approver_level: match (approver_level, no_approver_level) {
                    (Some(level), _) => Some(level),
                    (None, true) => None,
                    (None, false) => current.approver_level,
                },
                endpoint_users: if endpoint_users.is_empty() {
                    current.endpoint_users
                } else {
                    endpoint_users
                },
            };
            let after: AdminInfo = client
                .put(
                    &paths::ADMIN_ADMIN.replace("{name}", &encode(&name)),
                    &update,
                )
                .await?;
            println!("{}", describe(&after));
            Ok(())
        }
        AdminCommand::Disable { name } => {
            set_disabled(remote, &name, paths::ADMIN_ADMIN_DISABLE).await
        }
        AdminCommand::Enable { name } => {
            set_disabled(remote, &name, paths::ADMIN_ADMIN_ENABLE).await
        }
        AdminCommand::RotateToken { name } => {
            let created: AdminCreated = client(remote)?
                .post(
                    &paths::ADMIN_ADMIN_ROTATE_TOKEN.replace("{name}", &encode(&name)),
                    &serde_json::json!({}),
                )
                .await?;
            println!("{}", created.token);
            eprintln!(
                "a new token for {}, shown once; the old one is refused from now on",
                created.admin.name
            );
            Ok(())
        }
    }
}

/// Whether an admin command works on the database directly: `--data`
/// given, and neither `--ca` nor a token (whoever can write the data
/// directory owns the platform anyway).
fn offline(remote: &Remote) -> bool {
    remote.data.is_some() && remote.ca.is_none() && std::env::var_os("EPM_ADMIN_TOKEN").is_none()
}

/// One line from stdin: the password (the line break is not part of it).
fn read_password() -> Result<String, Failure> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| other(format!("cannot read the password from stdin: {e}")))?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password).to_owned();
    epm_platform::console::auth::check_new_password(&password).map_err(Failure::Refused)?;
    Ok(password)
}

/// Sets `name`'s console password: on the database with `--data` alone,
/// else over the API.
async fn set_password(remote: &Remote, name: &str, password: String) -> Result<(), Failure> {
    if offline(remote) {
        let data = data_dir(remote)?;
        let phc =
            epm_platform::console::auth::hash_password(&password).map_err(Failure::Refused)?;
        let db = open_db(remote, &data)?;
        db.set_password(None, name, &phc, None)
            .map_err(|e| Failure::Refused(e.to_string()))?;
        db.record_activity(
            "local",
            "admin set-password (offline)",
            200,
            Some(&format!("set the console password of admin {name}")),
        )
        .map_err(other)?;
        return Ok(());
    }
    client(remote)?
        .put_no_content(
            &paths::ADMIN_ADMIN_PASSWORD.replace("{name}", &encode(name)),
            &SetPassword { password },
        )
        .await?;
    Ok(())
}

/// `admin disable` or `admin enable` (`route`).
async fn set_disabled(remote: &Remote, name: &str, route: &str) -> Result<(), Failure> {
    let after: AdminInfo = client(remote)?
        .post(
            &route.replace("{name}", &encode(name)),
            &serde_json::json!({}),
        )
        .await?;
    println!("{}", describe(&after));
    Ok(())
}

async fn run_requests(remote: &Remote, command: RequestsCommand) -> Result<(), Failure> {
    let client = client(remote)?;
    let show = |r: &AdminRequest| {
        println!(
            "{}\t{}\t{}\t{}\trule {}\t{} {}\t{}..{}\tlevel {}/{}\t{}",
            r.id,
            r.state,
            line(&r.device_id),
            line(&r.user),
            line(&r.rule_id),
            r.subject.identity.kind,
            line(&r.subject.path),
            r.window.start,
            r.window.end,
            r.current_level,
            r.levels.len(),
            line(&r.justification)
        )
    };
    match command {
        RequestsCommand::List {
            state,
            device,
            json,
        } => {
            let mut query = Vec::new();
            if let Some(state) = state {
                query.push(format!("state={state}"));
            }
            if let Some(device) = device {
                query.push(format!("device={}", encode(&device)));
            }
            let path = if query.is_empty() {
                paths::ADMIN_REQUESTS.to_owned()
            } else {
                format!("{}?{}", paths::ADMIN_REQUESTS, query.join("&"))
            };
            let requests: Vec<AdminRequest> = client.get(&path).await?;
            for r in &requests {
                if json {
                    print_json(r)?;
                } else {
                    show(r);
                }
            }
            Ok(())
        }
        RequestsCommand::Approve { id } => {
            let r: AdminRequest = client
                .post(
                    &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &encode(&id)),
                    &serde_json::json!({}),
                )
                .await?;
            show(&r);
            Ok(())
        }
        RequestsCommand::Deny { id, reason } => {
            let r: AdminRequest = client
                .post(
                    &paths::ADMIN_REQUEST_DENY.replace("{id}", &encode(&id)),
                    &DenyRequest { reason },
                )
                .await?;
            show(&r);
            Ok(())
        }
        RequestsCommand::Revoke { id, reason } => {
            let r: AdminRequest = client
                .post(
                    &paths::ADMIN_REQUEST_REVOKE.replace("{id}", &encode(&id)),
                    &RevokeRequest { reason },
                )
                .await?;
            show(&r);
            Ok(())
        }
    }
}

async fn run_serve(remote: &Remote, serve: Serve) -> Result<(), Failure> {
    let data = data_dir(remote)?;
    if data.ensure_keys(&serve.hostnames).map_err(other)? {
        eprintln!(
            "epm-platform: made a CA, a server certificate for {} and a signing key in {}; give agents ca.pem and the content of signing-key.pub",
            serve.hostnames.join(", "),
            data.dir.display()
        );
    }
    let (cert, key): (PathBuf, PathBuf) = match (&serve.tls_cert, &serve.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => (data.file("server.pem"), data.file("server-key.pem")),
    };
    let tls = epm_platform::tls_config(&cert, &key).await.map_err(other)?;
    let db = open_db(remote, &data)?;
    let limits = Limits {
        max_connections: serve.max_connections,
        max_connections_per_client: serve.max_connections_per_client,
        idle_timeout: serve.idle_timeout,
        calls_per_second_per_client: serve.calls_per_second_per_client,
        calls_per_second_per_identity: serve.calls_per_second_per_identity,
        audit_records_per_hour: serve.audit_records_per_hour,
        audit_mib_per_hour: serve.audit_mib_per_hour,
        offline_codes_per_hour: serve.offline_codes_per_hour,
        max_window_lead: serve.max_window_lead,
        session_idle: serve.session_idle_timeout,
        session_lifetime: serve.session_lifetime,
        sign_in_failures_per_account: serve.sign_in_failures_per_account,
        sign_in_failures_per_address: serve.sign_in_failures_per_address,
        ..Limits::default()
    };
    let console_url = serve.console_url.clone().unwrap_or_else(|| {
        let host = serve.hostnames.first().map_or("localhost", String::as_str);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        format!("https://{host}:{}", serve.listen.port())
    });
    db.set_console_url(&console_url);
    let state = AppState::with_limits(db, data.signing_key().map_err(other)?, limits);
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        shutdown.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    tracing::info!(
        "serving https://{} (data {}, {} database); the console is at {console_url}/console/",
        serve.listen,
        data.dir.display(),
        state.db.kind()
    );
    server::serve(state, serve.listen, tls, handle)
        .await
        .map_err(|e| other(format!("cannot serve on {}: {e}", serve.listen)))
}
