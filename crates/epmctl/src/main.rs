//! `epmctl`: the EPM command line for users and administrators.
//!
//! A thin binary: argument parsing and output here, decisions in
//! `epm-policy`. Exit status: 0 success, 1 a check that found a problem,
//! 2 invalid input or a usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};
use epm_audit::Decision;

mod admin_cmd;
mod daemon_cmd;
mod explain;
mod flows_cmd;
mod policy_check;
mod run_cmd;
mod verdicts;

/// Where the packaged daemon writes its audit log.
const DEFAULT_AUDIT_LOG: &str = epm_os::paths::AUDIT_LOG;

#[derive(Debug, Parser)]
#[command(
    name = "epmctl",
    version,
    about = "Control and inspect EPM, the endpoint privilege manager",
    long_about = "Control and inspect EPM, the endpoint privilege manager.\n\n\
        Check and explain policies offline, or talk to the local epmd daemon.",
    after_help = "Examples:\n  \
        epmctl status\n  \
        epmctl run -- apt update\n  \
        epmctl justify /usr/local/bin/docker --reason \"Build for ticket 42\"\n  \
        epmctl request /usr/bin/wireshark --reason \"Capture for INC-7\" --from 14:00 --until +2h\n  \
        epmctl requests\n  \
        epmctl admin start --minutes 30 --reason \"Install the printer driver\"\n  \
        epmctl sync\n  \
        epmctl audit tail -f\n  \
        epmctl audit tail -n 50 --decision deny --json\n  \
        sudo epmctl audit verify\n  \
        epmctl policy check policy.json\n  \
        epmctl policy explain --policy policy.json --user alice /usr/bin/nc\n\n\
        Exit status: 0 success; 1 the audit log is broken; 2 invalid input, an invalid \
        policy, or the daemon cannot be reached."
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
    /// Talk to the daemon over this control socket [default: on macOS the
    /// XPC service com.epm.epmd.xpc, elsewhere /var/run/epm/epmd.sock].
    #[arg(long, global = true, value_name = "PATH", env = "EPM_SOCKET")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the daemon's mode, policy, counters, latency and platform sync.
    Status,
    /// Check in with the management platform now: upload the audit backlog,
    /// fetch a changed policy.
    #[command(after_help = "Any user may ask; one sync runs at a time.\n\n\
        Exit status: 0 when the sync succeeded, 1 when it failed (the error says which step \
        and why) or is still running, 2 when the daemon cannot be reached or is not managed.")]
    Sync,
    /// Run one command with privileges (as root, or --user), as the
    /// policy's elevation rules allow.
    #[command(
        after_help = "epmd checks the command against the policy's elevation rules, then starts it \
        itself, as the run-as user, on your terminal (a new pseudo-terminal when stdin and stdout \
        are terminals; your pipes and files otherwise). Signals you send epmctl (Ctrl+C without \
        a terminal, kill) reach the command; when epmctl goes away, so does the command.\n\n\
        A bare CMD is looked up on your PATH (absolute directories only). The command gets \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin, the run-as user's HOME, \
        USER, LOGNAME and SHELL, and of your environment only TERM, LANG, LANGUAGE, LC_*, TZ, \
        COLORTERM, NO_COLOR and DISPLAY (values that name no file). It starts in your current \
        directory (in / when the run-as user cannot enter it).\n\n\
        epmd opens the program itself and runs exactly that file: its path must be absolute, \
        without `..`, and only root may be able to change it or any directory on the way (no \
        symlink in a directory you can write). Rules match its real (canonical) path.\n\n\
        When a rule asks why, you are asked on the terminal (or give --reason). When it needs \
        approval, a request for the window --from..--until goes to the administrators and epmctl \
        waits for their answer (Ctrl+C to stop waiting; the request stays).\n\n\
        Examples:\n  epmctl run -- apt update\n  \
        epmctl run --reason \"Restart after config change, INC-7\" -- systemctl restart nginx\n  \
        epmctl run --user postgres -- psql -c 'select 1'\n  \
        epmctl run --until +2h --reason \"Capture for INC-7\" -- tcpdump -i eth0\n\n\
        Exit status: the command's (128 + N when signal N ended it); 1 refused, rejected, \
        cancelled or command not found; 2 bad input or the daemon cannot be reached."
    )]
    Run {
        /// Why you need it (asked on the terminal when a rule wants one and
        /// this is missing or too short).
        #[arg(long, short)]
        reason: Option<String>,
        /// Run as this user instead of root.
        #[arg(long, short, value_name = "NAME")]
        user: Option<String>,
        /// When an approval window should start, if one is needed.
        #[arg(long, default_value = "now", value_name = "TIME")]
        from: String,
        /// When it should end.
        #[arg(long, default_value = "+1h", value_name = "TIME")]
        until: String,
        /// The command and its arguments.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
    /// Give the reason a program needs before it runs; it is then allowed
    /// once.
    #[command(
        after_help = "For programs whose rule asks for a justification. The reason is \
        audited; the next run of that exact file (by content, not by path) is allowed, within \
        10 minutes.\n\n\
        Example:\n  epmctl justify /usr/local/bin/docker --reason \"Build for ticket 42\"\n\n\
        Exit status: 0 granted; 1 refused (the message says why); 2 the daemon cannot be reached."
    )]
    Justify {
        /// The program (a path, or a name on PATH).
        program: PathBuf,
        /// Why you need it (asked on the terminal when left out).
        #[arg(long, short)]
        reason: Option<String>,
    },
    /// Ask administrators to approve running a program inside a time window.
    #[command(
        after_help = "For programs whose rule asks for approval. The request goes to the \
        management platform (queued while it is unreachable); see its state with \
        `epmctl requests`. Once approved, runs inside the window are allowed, as many as the \
        rule says.\n\n\
        Without a platform connection an administrator can approve by phone: \
        `--offline` prints a challenge to read to them, and `--code` takes their answer. \
        A code works once, for this device, user, program and window.\n\n\
        Times: now, +30m, +2h, +1d, 14:30, \"2026-12-01 09:00\", or RFC 3339.\n\n\
        Examples:\n  epmctl request /usr/bin/wireshark --reason \"Capture for INC-7\" --until +2h\n  \
        epmctl request --offline /usr/bin/wireshark --reason \"Capture for INC-7\"\n  \
        epmctl request --code 7G2KD-QX4M1\n\n\
        Exit status: 0 sent (or granted); 1 refused (the message says why); 2 bad input or \
        the daemon cannot be reached."
    )]
    Request {
        /// The program (a path, or a name on PATH).
        #[arg(required_unless_present = "code")]
        program: Option<PathBuf>,
        /// Why you need it (asked on the terminal when left out).
        #[arg(long, short)]
        reason: Option<String>,
        /// When the window starts.
        #[arg(long, default_value = "now", value_name = "TIME")]
        from: String,
        /// When the window ends; a delay such as +2h counts from --from.
        #[arg(long, default_value = "+1h", value_name = "TIME")]
        until: String,
        /// Print a challenge for an administrator instead of sending the
        /// request to the platform.
        #[arg(long, conflicts_with = "code")]
        offline: bool,
        /// Enter an administrator's answer to an offline challenge.
        #[arg(long, value_name = "CODE")]
        code: Option<String>,
    },
    /// List your approval requests and their states.
    Requests {
        /// Everyone's (administrators).
        #[arg(long)]
        all: bool,
    },
    /// List your current and upcoming grants.
    Grants {
        /// Everyone's (administrators).
        #[arg(long)]
        all: bool,
    },
    /// Become an administrator for a while, as your policy allows.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Read, follow and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check, explain and show policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Join the administrators' group for N minutes.
    #[command(
        after_help = "Your organization's policy decides whether you may, for how \
        long, and whether you must first give a reason or wait for an approver. When the time \
        is up you are taken out of the group, even across a restart or a reboot; your helper \
        warns you 5 minutes and 1 minute before. Sudoers entries added for you during the \
        session are removed.\n\n\
        Examples:\n  epmctl admin start --minutes 30 --reason \"Install the printer driver\"\n  \
        epmctl admin start --minutes 60 --wait\n\n\
        Exit status: 0 started (or request sent); 1 refused; 2 bad input or the daemon cannot \
        be reached."
    )]
    Start {
        /// How long.
        #[arg(long, short, value_name = "N")]
        minutes: u32,
        /// Why (asked on the terminal when the policy wants one).
        #[arg(long, short)]
        reason: Option<String>,
        /// When approval is needed, wait for it instead of returning.
        #[arg(long)]
        wait: bool,
    },
    /// Show your admin session (or everyone's).
    Status {
        /// Everyone's (administrators).
        #[arg(long)]
        all: bool,
    },
    /// End your admin session now.
    End,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print the most recent audit records; with -f, keep printing new ones.
    #[command(
        after_help = "You see your own records; root and the admin group see everyone's.\n\n\
        Examples:\n  epmctl audit tail -f\n  epmctl audit tail -n 100 --decision deny --user alice"
    )]
    Tail {
        /// How many recent records.
        #[arg(short = 'n', long = "lines", default_value_t = 20, value_name = "N")]
        lines: u32,
        /// Keep printing records as they are written (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
        /// Only records with this decision.
        #[arg(long, value_parser = decision_parser())]
        decision: Option<Decision>,
        /// Only this user's records (administrators).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Check the audit log's hash chain; name the first record that breaks it.
    #[command(
        after_help = "Exit status: 0 when intact, 1 when a record was edited, deleted or \
        reordered, 2 when the log cannot be read.\n\nFILE may be the live audit.jsonl (its rotated \
        files are checked too), one rotated file, or the log directory."
    )]
    Verify {
        /// The audit log.
        #[arg(default_value = DEFAULT_AUDIT_LOG)]
        file: PathBuf,
    },
}

/// `--decision`: the names the audit log writes (`epm_audit::Decision`),
/// offered in `--help` and completed by the shell.
fn decision_parser() -> impl TypedValueParser<Value = Decision> {
    let every = [Decision::Allow, Decision::Deny, Decision::WouldDeny];
    PossibleValuesParser::new(every.map(Decision::as_str))
        .try_map(|name| Decision::parse(&name).ok_or("not a decision"))
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
        after_help = "Without --policy the running daemon's live policy decides.\n\n\
        Examples:\n  epmctl policy explain /usr/bin/nc\n  \
        epmctl policy explain --policy examples/policy.json --user alice --groups staff /usr/bin/nc"
    )]
    Explain(explain::ExplainArgs),
    /// Print the daemon's live policy document (administrators).
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let GlobalArgs { socket, json } = cli.global;
    let endpoint = epm_ipc::Endpoint::socket_or_default(socket);
    let result = match cli.command {
        Command::Status => daemon_cmd::status(&endpoint, json),
        Command::Sync => daemon_cmd::sync(&endpoint, json),
        Command::Run {
            reason,
            user,
            from,
            until,
            command,
        } => run_cmd::run(
            &endpoint,
            run_cmd::RunOptions {
                command,
                reason,
                user,
                from,
                until,
            },
        ),
        Command::Justify { program, reason } => {
            flows_cmd::justify(&endpoint, &program, reason, json)
        }
        Command::Request {
            program,
            reason,
            from,
            until,
            offline,
            code,
        } => flows_cmd::request(
            &endpoint,
            flows_cmd::RequestOptions {
                program,
                reason,
                from,
                until,
                offline,
                code,
            },
            json,
        ),
        Command::Requests { all } => flows_cmd::requests(&endpoint, all, json),
        Command::Grants { all } => flows_cmd::grants(&endpoint, all, json),
        Command::Admin(AdminCommand::Start {
            minutes,
            reason,
            wait,
        }) => admin_cmd::start(&endpoint, minutes, reason, wait, json),
        Command::Admin(AdminCommand::Status { all }) => admin_cmd::status(&endpoint, all, json),
        Command::Admin(AdminCommand::End) => admin_cmd::end(&endpoint, json),
        Command::Audit(AuditCommand::Tail {
            lines,
            follow,
            decision,
            user,
        }) => daemon_cmd::audit_tail(
            &endpoint,
            daemon_cmd::TailOptions {
                lines,
                follow,
                decision: decision.map(|d| d.as_str().to_owned()),
                user,
            },
            json,
        ),
        Command::Audit(AuditCommand::Verify { file }) => daemon_cmd::audit_verify(&file, json),
        Command::Policy(PolicyCommand::Check { file }) => policy_check::run(&file, json),
        Command::Policy(PolicyCommand::Explain(args)) => explain::run(&args, &endpoint, json),
        Command::Policy(PolicyCommand::Show) => daemon_cmd::policy_show(&endpoint, json),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("epmctl: {error:#}");
            ExitCode::from(2)
        }
    }
}
