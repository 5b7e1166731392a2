//! The interactive flows' messages: what the daemon tells a user's helper
//! (prompts, blocks, request news) and what the helper or `epmctl` answers.
//!
//! Everything here is about one user: the daemon sends a user's events only
//! to connections whose kernel-reported uid is that user's, and acts on an
//! answer only for the prompt's own user.

use epm_policy::{ApprovalSpec, JustificationSpec};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Something the daemon tells a user's helper, in a [`crate::Response::Event`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum UserEvent {
    /// An exec was refused until the user justifies it or asks for
    /// approval: show the form, then answer with
    /// [`crate::Request::Justify`] or [`crate::Request::RequestApproval`]
    /// naming `id`.
    Prompt(Prompt),
    /// An exec was refused and no form applies: say why.
    Blocked(Blocked),
    /// One of the user's requests changed state.
    RequestChanged(RequestInfo),
    /// The user's admin session ends soon: warned 5 minutes and 1 minute
    /// before.
    AdminSessionEnding {
        /// The session.
        session: AdminSessionInfo,
        /// Whole minutes left (rounded up).
        minutes_left: u32,
    },
    /// The user's admin session ended (they are no longer in the group).
    AdminSessionEnded(AdminSessionInfo),
}

/// What a prompt asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptKind {
    /// A written justification, then a one-shot grant.
    Justify,
    /// A justification and a window, sent to approvers.
    Approve,
}

/// A form to fill in for a refused exec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Names this prompt in the answer; valid for a few minutes, for this
    /// user only.
    pub id: u64,
    /// Justify or approve.
    pub kind: PromptKind,
    /// The program's file name, for titles.
    pub program: String,
    /// Its path when it was run.
    pub path: String,
    /// Its arguments, where the platform reports them (macOS), for a
    /// relaunch; `None` on Linux.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// The rule that asks.
    pub rule_id: String,
    /// The rule's message.
    #[serde(default)]
    pub message: Option<String>,
    /// Limits and presets for the justification.
    pub justification: JustificationSpec,
    /// Window limits, for `approve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
}

/// Why an exec was refused without a form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Blocked {
    /// The program's file name.
    pub program: String,
    /// Its path.
    pub path: String,
    /// The deciding rule, if any.
    #[serde(default)]
    pub rule_id: Option<String>,
    /// The rule's message.
    #[serde(default)]
    pub message: Option<String>,
    /// Which situation.
    pub because: BlockReason,
}

/// The situations a refusal can be in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "situation", rename_all = "snake_case")]
pub enum BlockReason {
    /// The policy denies it.
    Denied,
    /// A request for it waits for approvers.
    Pending {
        /// The request.
        request_id: String,
    },
    /// The last request was rejected; a new one can be made after the
    /// cool-down.
    Rejected {
        /// The request.
        request_id: String,
        /// The approver's reason.
        #[serde(default)]
        reason: Option<String>,
        /// When a new request is accepted.
        retry_after: Timestamp,
    },
    /// Approved, but the window is still ahead.
    WindowNotStarted {
        /// When it opens.
        start: Timestamp,
    },
    /// Approved, but the window is over (or its runs are used).
    WindowExpired,
    /// The prompt could not be shown: the user already has one open.
    PromptOpen,
}

/// One of a user's approval requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// Its id.
    pub id: String,
    /// Who asked.
    pub user: String,
    /// The program's file name.
    pub program: String,
    /// Its path when asked.
    pub path: String,
    /// `sha256:<hex>` or `cdhash:<hex>`: the binary it is for.
    pub identity: String,
    /// The rule.
    pub rule_id: String,
    /// The user's reason.
    pub justification: String,
    /// Window start.
    pub start: Timestamp,
    /// Window end.
    pub end: Timestamp,
    /// `pending`, `approved`, `denied`, `expired`, `revoked`, `used`,
    /// `cancelled`.
    pub state: String,
    /// Why it changed (an approver's reason).
    #[serde(default)]
    pub state_reason: Option<String>,
    /// Whether the platform has it yet (false while offline).
    #[serde(default)]
    pub submitted: bool,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A grant: runs of one binary a user may make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Its id.
    pub id: i64,
    /// Who may run.
    pub user: String,
    /// The program's path when granted, for display.
    #[serde(default)]
    pub path: Option<String>,
    /// `sha256:<hex>` or `cdhash:<hex>`.
    pub identity: String,
    /// The rule it answers.
    pub rule_id: String,
    /// `justification`, `approval` or `offline_code`.
    pub source: String,
    /// Valid from.
    pub not_before: Timestamp,
    /// Valid until (exclusive).
    pub not_after: Timestamp,
    /// Runs left.
    pub uses_left: u32,
    /// The request it answers.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The answer to a justification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Justified {
    /// The program's file name.
    pub program: String,
    /// The grant made.
    pub grant: GrantInfo,
    /// The original argv to relaunch with, where the platform reported it.
    #[serde(default)]
    pub relaunch: Option<Vec<String>>,
}

/// The program's file name from a path, for titles and messages.
pub fn program_name(path: &str) -> String {
    path.rsplit('/')
        .find(|part| !part.is_empty())
        .unwrap_or(path)
        .to_owned()
}

/// The state of an admin session, for its user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminSessionInfo {
    /// Its id.
    pub id: i64,
    /// Whose.
    pub user: String,
    /// The group the user is in for the session.
    pub group: String,
    /// Started.
    pub started_at: Timestamp,
    /// Ends (the user is removed from the group then).
    pub expires_at: Timestamp,
    /// The user's reason.
    #[serde(default)]
    pub reason: Option<String>,
    /// When it ended, if it did.
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    /// Why it ended: `expired`, `ended_by_user`, `clock_jump`,
    /// `expired_while_down`, `policy`.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// The user was in the group before: the end does not remove them.
    #[serde(default)]
    pub was_member_before: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names() {
        assert_eq!(program_name("/usr/bin/nc"), "nc");
        assert_eq!(program_name("/Applications/Foo.app/"), "Foo.app");
        assert_eq!(program_name("nc"), "nc");
    }

    #[test]
    fn events_are_tagged_inside_the_response() {
        let event = crate::Response::Event(UserEvent::Blocked(Blocked {
            program: "nc".into(),
            path: "/usr/bin/nc".into(),
            rule_id: None,
            message: None,
            because: BlockReason::WindowExpired,
        }));
        let json = serde_json::to_string(&event).unwrap();
        assert!(
            json.starts_with(r#"{"type":"event","event":"blocked","#),
            "{json}"
        );
        let back: crate::Response = serde_json::from_str(&json).unwrap();
        assert_eq!(back, event);
    }
}
