//! `epm-sudo`: a sudo **approval plugin**. sudo's own policy (sudoers)
//! still decides who may use sudo at all; for each command it allows, this
//! plugin asks `epmd` whether the organization's policy lets this user run
//! this command as that user, and says no when it does not.
//!
//! Installed with one line in `/etc/sudo.conf`:
//!
//! ```text
//! Plugin epm_approval /usr/local/lib/epm/libepm_sudo.so fail=deny
//! ```
//!
//! Options: `socket=PATH` (epmd's control socket), `fail=deny|allow` (what
//! happens when epmd cannot be reached; `deny` by default), `timeout=SECONDS`
//! (how long one answer may take; 5 by default).
//!
//! What it sends `epmd` for each command: the command path sudo executes
//! (absolute, without `..`: `epmd` refuses it unless every directory on
//! the way and the file are root's alone), the arguments, the whole
//! environment sudo gives the command (`run_envp`, decided against the
//! allow-list `epmctl run` keeps and the rule's `env`), and for sudoedit
//! the files to edit (decided by edit rules, never the editor). It
//! connects as root and names the invoking user; `epmd` accepts that only
//! from a root peer whose real uid is that user. docs/elevation.md says
//! exactly what is checked.
//!
//! The plugin is split in two: this safe core, which parses what sudo
//! passes and runs the conversation with `epmd` and the user through two
//! small traits (so it is tested without sudo), and [`ffi`], the C ABI
//! from `sudo_plugin.h`, declared by hand.

use std::path::PathBuf;
use std::time::Duration;

use epm_ipc::{Command, ElevationVerdict};
use epm_prompt::display::shown_line;
use epm_prompt::messages;
use epm_prompt::{Backend, JustificationAsk, PromptError, Tone};

pub mod ffi;

/// How often a user waiting for approvers is asked about again.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What happens when `epmd` cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// sudo refuses every command (the default).
    Deny,
    /// sudo goes on, as if this plugin were not installed.
    Allow,
}

impl FailMode {
    fn as_str(self) -> &'static str {
        match self {
            FailMode::Deny => "deny",
            FailMode::Allow => "allow",
        }
    }
}

/// The plugin's options, from its `/etc/sudo.conf` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// epmd's control socket.
    pub socket: PathBuf,
    /// What happens when epmd cannot be reached.
    pub fail: FailMode,
    /// How long one answer may take.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(epm_ipc::DEFAULT_SOCKET_PATH),
            fail: FailMode::Deny,
            timeout: Duration::from_secs(5),
        }
    }
}

impl Options {
    /// Parses `key=value` options; an unknown key or a bad value is an
    /// error naming it (sudo then refuses to run, which is what an
    /// administrator who mistyped the line must see).
    pub fn parse<S: AsRef<str>>(options: &[S]) -> Result<Options, String> {
        let mut parsed = Options::default();
        for option in options {
            let option = option.as_ref();
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| format!("epm: plugin option {option:?} is not key=value"))?;
            match key {
                "socket" if value.starts_with('/') => parsed.socket = PathBuf::from(value),
                "fail" => {
                    parsed.fail = match value {
                        "deny" => FailMode::Deny,
                        "allow" => FailMode::Allow,
                        _ => return Err(format!("epm: fail={value}: use fail=deny or fail=allow")),
                    }
                }
                "timeout" => {
                    let seconds: u64 = value
                        .parse()
                        .ok()
                        .filter(|s| (1..=120).contains(s))
                        .ok_or_else(|| {
                            format!("epm: timeout={value}: a number of seconds, 1 to 120")
                        })?;
                    parsed.timeout = Duration::from_secs(seconds);
                }
                _ => {
                    return Err(format!(
                        "epm: unknown plugin option {option:?} (known: socket=/PATH, fail=deny|allow, timeout=SECONDS)"
                    ));
                }
            }
        }
        Ok(parsed)
    }
}

/// The value of `key=` in one of sudo's `key=value` lists.
pub fn value_of<'a, S: AsRef<str>>(list: &'a [S], key: &str) -> Option<&'a str> {
    list.iter()
        .find_map(|entry| entry.as_ref().strip_prefix(key)?.strip_prefix('='))
}

/// Everything sudo is about to do, as `epmd` decides it: the command, the
/// whole environment sudo gives it, and for sudoedit the files to edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elevation {
    /// The command (for sudoedit: sudo's editor, which is not decided on).
    pub command: Command,
    /// `run_envp`, `NAME=value` each.
    pub env: Vec<String>,
    /// sudoedit's files (`sudoedit=true` in `command_info`).
    pub edit: Option<Vec<String>>,
}

impl Elevation {
    /// From `check`'s three lists. For sudoedit the files are the
    /// arguments after the editor's `--` (how sudoers hands them on).
    pub fn from_check(
        command_info: &[String],
        run_argv: &[String],
        run_envp: &[String],
    ) -> Result<Elevation, String> {
        let command = command_from(command_info, run_argv)?;
        let edit = match value_of(command_info, "sudoedit") {
            Some("true") => {
                let files: Vec<String> = run_argv
                    .iter()
                    .skip_while(|a| *a != "--")
                    .skip(1)
                    .cloned()
                    .collect();
                if files.is_empty() {
                    return Err("epm: sudoedit: cannot tell the files from sudo's arguments".into());
                }
                Some(files)
            }
            _ => None,
        };
        Ok(Elevation {
            command,
            env: run_envp.to_vec(),
            edit,
        })
    }

    /// What the user is asked about: the program, or the edited files,
    /// and as whom (the conversation escapes it).
    fn what(&self) -> String {
        let run_as = &self.command.run_as;
        match &self.edit {
            Some(files) => format!("Editing {} as {run_as}", files.join(" ")),
            None => format!(
                "{} as {run_as}",
                self.command.argv.first().cloned().unwrap_or_default()
            ),
        }
    }
}

/// The command sudo is about to run, from `check`'s `command_info` and
/// `run_argv`. The path must be absolute and free of `..`; `epmd` then
/// opens it itself and refuses it unless every directory on the way and
/// the file are root's alone, so the file sudo executes by that path is
/// the file `epmd` decided on.
pub fn command_from(command_info: &[String], run_argv: &[String]) -> Result<Command, String> {
    let program = value_of(command_info, "command")
        .ok_or("sudo gave no command path")?
        .to_owned();
    if !program.starts_with('/') || program.split('/').any(|c| c == "..") {
        return Err(format!(
            "epm: sudo's command path {program:?} is not absolute and canonical"
        ));
    }
    // sudo runs the command as runas_euid/runas_uid; runas_user is for
    // logs only, so it is the fallback.
    let uid = value_of(command_info, "runas_euid").or_else(|| value_of(command_info, "runas_uid"));
    let run_as = match uid {
        Some("0") => "root".to_owned(),
        Some(uid) => uid
            .parse()
            .ok()
            .and_then(|uid| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok())
            .flatten()
            .map(|user| user.name)
            .ok_or_else(|| format!("sudo runs the command as uid {uid}, which has no name"))?,
        None => value_of(command_info, "runas_user")
            .unwrap_or("root")
            .to_owned(),
    };
    let mut argv = run_argv.to_vec();
    if argv.is_empty() {
        argv.push(program.rsplit('/').next().unwrap_or(&program).to_owned());
    }
    Ok(Command {
        program,
        argv,
        run_as,
    })
}

/// How the plugin reaches `epmd`.
pub trait Daemon {
    /// Sends one `elevate` request.
    fn elevate(
        &mut self,
        elevation: &Elevation,
        reason: Option<&str>,
    ) -> Result<ElevationVerdict, DaemonError>;
}

/// Why `epmd` gave no verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaemonError {
    /// It cannot be reached: the fail mode decides.
    Unreachable(String),
    /// It refused the request (the message says why).
    Refused(String),
}

/// How the plugin talks to the user (sudo's conversation function).
pub trait Terminal {
    /// Shows a line.
    fn info(&mut self, text: &str);
    /// Shows an error line.
    fn error(&mut self, text: &str);
    /// Asks a question; `None` if the user gave no answer (end of input,
    /// Ctrl-C, no terminal).
    fn ask(&mut self, question: &str) -> Option<String>;
    /// Whether the user asked to stop (Ctrl-C while waiting).
    fn cancelled(&mut self) -> bool;
    /// Waits before asking again.
    fn pause(&mut self, how_long: Duration);
}

/// The answer for sudo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Run it.
    Approve,
    /// Do not.
    Reject,
}

/// sudo's conversation as a prompt backend, so the justification is asked,
/// checked and explained in `epm_prompt`'s words, the same as `epmctl run`
/// and the helper: each line of text an info line, ready-made reasons by
/// number, a refused answer an error line.
struct Conversation<'a>(&'a mut dyn Terminal);

impl Backend for Conversation<'_> {
    fn entry(
        &mut self,
        _title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError> {
        for line in text.lines().filter(|line| !line.is_empty()) {
            self.0.info(line);
        }
        for line in epm_prompt::terminal::choice_lines(choices) {
            self.0.info(&line);
        }
        let question = epm_prompt::terminal::question(choices, default);
        Ok(self
            .0
            .ask(&question)
            .map(|line| epm_prompt::terminal::answer(&line, choices, default)))
    }

    fn message(&mut self, _title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        match tone {
            Tone::Info => self.0.info(text),
            Tone::Warning => self.0.error(text),
        }
        Ok(())
    }
}

/// Decides one command: asks `epmd`, and the user when the policy wants a
/// justification or an approval, until there is an answer.
pub fn decide(
    options: &Options,
    elevation: &Elevation,
    daemon: &mut dyn Daemon,
    terminal: &mut dyn Terminal,
) -> Answer {
    let what = elevation.what();
    let mut reason: Option<String> = None;
    let mut waiting = false;
    loop {
        let verdict = match daemon.elevate(elevation, reason.as_deref()) {
            Ok(verdict) => verdict,
            Err(DaemonError::Unreachable(why)) => {
                let outcome = match options.fail {
                    FailMode::Deny => "sudo is denied",
                    FailMode::Allow => "sudo goes ahead without it",
                };
                terminal.error(&format!(
                    "epm: cannot reach epmd at {}: {why}; {outcome} (fail={})",
                    options.socket.display(),
                    options.fail.as_str()
                ));
                return match options.fail {
                    FailMode::Deny => Answer::Reject,
                    FailMode::Allow => Answer::Approve,
                };
            }
            Err(DaemonError::Refused(message)) => {
                terminal.error(&format!("epm: {message}"));
                return Answer::Reject;
            }
        };
        match verdict {
            ElevationVerdict::Allowed { .. } => return Answer::Approve,
            ElevationVerdict::Denied { message, .. } => {
                terminal.error(&format!("epm: {}", shown_line(&message)));
                return Answer::Reject;
            }
            ElevationVerdict::NeedsJustification {
                message,
                justification,
                ..
            }
            | ElevationVerdict::NeedsApproval {
                message,
                justification,
                ..
            } => {
                if reason.is_some() {
                    terminal.error("epm: epmd asked again for a reason it was given");
                    return Answer::Reject;
                }
                let ask = JustificationAsk {
                    program: what.clone(),
                    message,
                    spec: justification,
                };
                // The conversation cannot fail: `Conversation` never errs.
                match epm_prompt::ask_justification(&mut Conversation(terminal), &ask)
                    .ok()
                    .flatten()
                {
                    Some(answer) => reason = Some(answer),
                    None => {
                        terminal.error("epm: a reason is required; nothing was run");
                        return Answer::Reject;
                    }
                }
            }
            ElevationVerdict::Pending { request, .. } => {
                if !waiting {
                    terminal.info(&messages::waiting_for_approval(&request.id));
                    waiting = true;
                }
                if terminal.cancelled() {
                    terminal.error(&format!(
                        "epm: cancelled; request {} stays pending: once approved, run the command again",
                        request.id
                    ));
                    return Answer::Reject;
                }
                terminal.pause(POLL_INTERVAL);
                if terminal.cancelled() {
                    terminal.error(&format!(
                        "epm: cancelled; request {} stays pending: once approved, run the command again",
                        request.id
                    ));
                    return Answer::Reject;
                }
            }
            ElevationVerdict::Rejected {
                request,
                retry_after,
                ..
            } => {
                terminal.error(&format!(
                    "epm: {}",
                    messages::request_rejected(request.state_reason.as_deref(), retry_after)
                ));
                return Answer::Reject;
            }
        }
    }
}

#[cfg(test)]
mod tests;
