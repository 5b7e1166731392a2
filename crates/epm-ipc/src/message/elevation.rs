//! Privilege elevation's messages: a command run as root (`epmctl run`, the
//! sudo plugin) and time-boxed admin sessions.
//!
//! One verdict type serves all three: the daemon answers an elevation or a
//! session start with an [`ElevationVerdict`], and a client that is told to
//! justify or to ask for approval sends the same request again with a
//! `reason` (and, for approval, a window). A client waiting for approvers
//! sends it again from time to time: once a grant has arrived, the same
//! request is allowed.

use epm_policy::JustificationSpec;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

// An admin session's state is a user's news like a request's, so it lives
// with the flows (which must not import this module back).
pub use super::flows::AdminSessionInfo;
use super::flows::RequestInfo;

/// Who asks for an elevation, for the audit and the rule's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElevationVia {
    /// `epmctl run`: `epmd` starts the command itself.
    Run,
    /// The sudo approval plugin: sudo starts it.
    Sudo,
}

impl ElevationVia {
    /// The name used in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            ElevationVia::Run => "run",
            ElevationVia::Sudo => "sudo",
        }
    }
}

/// An approval window asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Start (at most a few minutes in the past).
    pub start: Timestamp,
    /// End.
    pub end: Timestamp,
}

/// The command an elevation is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Absolute path of the program (resolved by the client through its
    /// `PATH`; the daemon hashes the file itself).
    pub program: String,
    /// Its arguments, `argv[0]` first.
    pub argv: Vec<String>,
    /// The user it is to run as; `root` unless the client asked otherwise.
    #[serde(default = "Command::default_run_as")]
    pub run_as: String,
}

impl Command {
    fn default_run_as() -> String {
        "root".into()
    }
}

/// What the daemon says of an elevation or an admin session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum ElevationVerdict {
    /// Go ahead. For `epmctl run` and admin sessions the daemon has already
    /// started it; the sudo plugin lets sudo run the command.
    Allowed {
        /// The deciding rule, if a rule decided.
        #[serde(default)]
        rule_id: Option<String>,
        /// The grant used (a justification or an approval), if any.
        #[serde(default)]
        grant_id: Option<i64>,
    },
    /// No: say `message`.
    Denied {
        /// The deciding rule, if a rule decided.
        #[serde(default)]
        rule_id: Option<String>,
        /// For the user: the rule's message, or why nothing allows it.
        message: String,
    },
    /// Ask the user why, then send the request again with the `reason`.
    NeedsJustification {
        /// The rule that asks.
        rule_id: String,
        /// The rule's message.
        #[serde(default)]
        message: Option<String>,
        /// Limits and presets.
        justification: JustificationSpec,
    },
    /// Approvers must agree: ask the user why (and when), then send the
    /// request again with a `reason` and a `window`.
    NeedsApproval {
        /// The rule that asks.
        rule_id: String,
        /// The rule's message.
        #[serde(default)]
        message: Option<String>,
        /// Limits and presets for the reason.
        justification: JustificationSpec,
        /// The longest window that may be asked for, in hours.
        max_window_hours: u32,
    },
    /// A request waits for approvers (or is approved for a window not yet
    /// open): ask again later.
    Pending {
        /// The rule.
        rule_id: String,
        /// The request.
        request: RequestInfo,
    },
    /// The last request was rejected; a new one is accepted after
    /// `retry_after`.
    Rejected {
        /// The rule.
        rule_id: String,
        /// The request, with the approver's reason.
        request: RequestInfo,
        /// When a new request is accepted.
        retry_after: Timestamp,
    },
}

/// The caller's terminal size, for `epmctl run` on a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Its exit code, if it exited.
    #[serde(default)]
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    #[serde(default)]
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The status a shell would report: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn verdicts_are_tagged() {
        let verdict = ElevationVerdict::Denied {
            rule_id: Some("no-shells".into()),
            message: "Root shells are not allowed".into(),
        };
        let json = serde_json::to_string(&verdict).unwrap();
        assert_eq!(
            json,
            r#"{"verdict":"denied","rule_id":"no-shells","message":"Root shells are not allowed"}"#
        );
        assert_eq!(
            serde_json::from_str::<ElevationVerdict>(&json).unwrap(),
            verdict
        );
    }

    #[test]
    fn run_as_defaults_to_root() {
        let command: Command =
            serde_json::from_str(r#"{"program":"/usr/bin/id","argv":["id"]}"#).unwrap();
        assert_eq!(command.run_as, "root");
    }

    #[test]
    fn shell_codes() {
        let exited = ExitStatus {
            code: Some(3),
            signal: None,
        };
        let killed = ExitStatus {
            code: None,
            signal: Some(2),
        };
        assert_eq!(exited.shell_code(), 3);
        assert_eq!(killed.shell_code(), 130);
    }
}
