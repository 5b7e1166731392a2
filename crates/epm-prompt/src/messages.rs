//! What EPM says to a person, word for word. `docs/user-guide.md` quotes these.

use jiff::Timestamp;

use crate::display::shown_line;

/// The request waits for an approver.
pub const PENDING: &str = "Your request is still pending administrator review.";
/// An approver said no.
pub const REJECTED: &str = "Your last request was rejected by the administrator.";
/// Approved, but the window is over.
pub const WINDOW_EXPIRED: &str = "Your request was approved, but the execution window has expired.";
/// Nobody decided before the window ended.
pub const EXPIRED_UNREVIEWED: &str = "Your request expired before an administrator reviewed it.";
/// An admin withdrew an approval.
pub const REVOKED: &str = "Your approval was withdrawn by the administrator.";

/// Approved, but the window is still ahead.
pub fn window_not_started(start: Timestamp) -> String {
    format!(
        "Your request was approved, but the execution window has not started. You can run it from {start}."
    )
}

/// The window is open.
pub fn can_run_now(program: &str, until: Timestamp) -> String {
    format!(
        "Your request for {} was approved. You can run it now, until {until}.",
        shown_line(program)
    )
}

/// A justification was accepted.
pub fn justified(program: &str, relaunched: bool) -> String {
    if relaunched {
        format!("Thank you. {} is starting.", shown_line(program))
    } else {
        format!(
            "Thank you. Run {} again: it is allowed once.",
            shown_line(program)
        )
    }
}

/// A deny, with the rule's message when it has one.
pub fn denied(program: &str, rule_message: Option<&str>) -> String {
    match rule_message {
        Some(message) => format!(
            "{} was blocked: {}",
            shown_line(program),
            shown_line(message)
        ),
        None => format!(
            "{} was blocked by your organization's policy.",
            shown_line(program)
        ),
    }
}

/// An admin session ends soon.
pub fn admin_session_ending(minutes_left: u32, at: Timestamp) -> String {
    let minutes = if minutes_left == 1 {
        "1 minute".to_owned()
    } else {
        format!("{minutes_left} minutes")
    };
    format!(
        "Your administrator rights end in {minutes} (at {at}). Save your work in admin tools now."
    )
}

/// An admin session ended.
pub fn admin_session_ended(reason: Option<&str>) -> String {
    let why = match reason {
        Some("expired" | "expired_while_down") => "its time is up",
        Some("ended_by_user") => "you ended it",
        Some("clock_jump") => "the system clock jumped",
        Some("policy") => "the policy no longer allows it",
        _ => "it was ended",
    };
    format!("Your administrator rights have ended: {why}.")
}

/// An elevation (`epmctl run`, `epmctl admin start`, sudo) waits for
/// approvers.
pub fn waiting_for_approval(request_id: &str) -> String {
    format!(
        "Request {} sent to your administrators. Waiting for approval… (Ctrl+C to cancel)",
        shown_line(request_id)
    )
}

/// An elevation's request was rejected; another may be made after
/// `retry_after`.
pub fn request_rejected(reason: Option<&str>, retry_after: Timestamp) -> String {
    let why = reason
        .map(|reason| format!(": {}", shown_line(reason)))
        .unwrap_or_default();
    format!(
        "Your request was rejected by the administrator{why}. You can ask again after {retry_after}."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_parts_are_escaped() {
        let text = denied("nc\u{1b}[31m", Some("ask\nIT"));
        assert_eq!(text, "nc\\u{1b}[31m was blocked: ask\\nIT");
    }
}
