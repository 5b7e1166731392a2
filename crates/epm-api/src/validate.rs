//! What the platform accepts in a request body or query, checked in one
//! place for every route: text is length-capped and free of characters that
//! disguise what it says (control characters, bidirectional overrides,
//! invisible separators), lists are bounded, and integers fit the
//! platform's database (at most 2^63 − 1).
//!
//! The agent may call [`Validate::validate`] on what it is about to send;
//! the platform calls it on everything it receives and answers 422 naming
//! the field.
//!
//! ```
//! use epm_api::validate::Validate;
//! use epm_api::agent::EnrollRequest;
//! let mut enroll = EnrollRequest {
//!     enrollment_token: "ept_x".into(),
//!     device_id: "mac-0042".into(),
//!     hostname: "mac-0042.corp".into(),
//!     os: "macos 15.1".into(),
//!     agent_version: "0.1.0".into(),
//! };
//! assert!(enroll.validate().is_ok());
//! enroll.device_id = "mac-\u{202e}2400".into();
//! assert_eq!(
//!     enroll.validate().unwrap_err().to_string(),
//!     "device_id: U+202E is not allowed (control or bidirectional-formatting character)"
//! );
//! ```

use std::borrow::Cow;

use crate::admin::{
    ActivityQuery, AuditQuery, CreateAdmin, CreateEnrollToken, DenyRequest, OfflineCodeRequest,
    RequestQuery, RevokeRequest, SetPassword, UpdateAdmin,
};
use crate::agent::{
    AuditUpload, CheckinRequest, EnrollRequest, MAX_WAIT_REQUESTS, RequestSubmit, RequestWait,
};

/// Ids and names: device ids, user, group, admin and rule names, scopes.
pub const MAX_NAME_BYTES: usize = 256;
/// Host names.
pub const MAX_HOSTNAME_BYTES: usize = 255;
/// OS and agent version strings.
pub const MAX_LABEL_BYTES: usize = 128;
/// Paths.
pub const MAX_PATH_BYTES: usize = 4096;
/// Free text: justifications, denial and revocation reasons.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Secrets and tokens as sent (enrollment tokens).
pub const MAX_TOKEN_BYTES: usize = 128;
/// An offline challenge as read out (`EPM1-…`).
pub const MAX_CHALLENGE_BYTES: usize = 4096;
/// Users one check-in reports, groups per user, counters, request ids.
pub const MAX_LIST_ITEMS: usize = 1000;
/// Counters one check-in reports.
pub const MAX_COUNTERS: usize = 64;
/// Audit records in one upload (the agent sends at most 500).
pub const MAX_AUDIT_RECORDS: usize = 1000;
/// The largest integer the platform stores (SQLite's signed 64 bits).
pub const MAX_INTEGER: u64 = i64::MAX as u64;
/// The highest approval level a rule or an approver may have.
pub const MAX_APPROVAL_LEVEL: u32 = 16;

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    /// The field, as named in the JSON (`users[3].name`).
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A request or query the platform accepts only when its fields are sane.
pub trait Validate {
    /// The first problem found.
    fn validate(&self) -> Result<(), Invalid>;
}

/// Whether `c` can make text look like other text on a terminal or a web
/// page: control characters (escape sequences, carriage returns), the
/// bidirectional overrides, embeddings, isolates and marks (a "file.exe"
/// shown as "exe.elif"), and the invisible separators and joiners.
pub fn is_disguising(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// Untrusted text made inert for one line of a terminal: every disguising
/// character is shown as `?`.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.chars().any(is_disguising) {
        Cow::Owned(
            text.chars()
                .map(|c| if is_disguising(c) { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

fn check_chars(field: &str, value: &str, allow_newlines: bool) -> Result<(), Invalid> {
    match value
        .chars()
        .find(|&c| is_disguising(c) && !(allow_newlines && matches!(c, '\n' | '\t')))
    {
        Some(c) => Err(invalid(
            field,
            format!(
                "U+{:04X} is not allowed (control or bidirectional-formatting character)",
                u32::from(c)
            ),
        )),
        None => Ok(()),
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.len() > max {
        return Err(invalid(
            field,
            format!("{} bytes is over the limit of {max}", value.len()),
        ));
    }
    Ok(())
}

/// An id or name: 1 to `max` bytes, one line, nothing disguising.
pub fn name(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    check_len(field, value, max)?;
    check_chars(field, value, false)
}

/// Free text: up to `max` bytes; line breaks and tabs allowed, nothing
/// else that disguises.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), Invalid> {
    check_len(field, value, max)?;
    check_chars(field, value, true)
}

/// An integer the platform can store.
pub fn integer(field: &str, value: u64) -> Result<(), Invalid> {
    if value > MAX_INTEGER {
        return Err(invalid(
            field,
            format!("{value} is over the largest accepted integer, {MAX_INTEGER}"),
        ));
    }
    Ok(())
}

fn count(field: &str, len: usize, max: usize) -> Result<(), Invalid> {
    if len > max {
        return Err(invalid(
            field,
            format!("{len} items is over the limit of {max}"),
        ));
    }
    Ok(())
}

fn approver_level(level: Option<u32>) -> Result<(), Invalid> {
    match level {
        Some(l) if l == 0 || l > MAX_APPROVAL_LEVEL => Err(invalid(
            "approver_level",
            format!("{l} is outside 1..={MAX_APPROVAL_LEVEL}"),
        )),
        _ => Ok(()),
    }
}

fn endpoint_users(users: &[String]) -> Result<(), Invalid> {
    count("endpoint_users", users.len(), 64)?;
    for (i, user) in users.iter().enumerate() {
        name(&format!("endpoint_users[{i}]"), user, MAX_NAME_BYTES)?;
    }
    Ok(())
}

impl Validate for EnrollRequest {
    fn validate(&self) -> Result<(), Invalid> {
        name("enrollment_token", &self.enrollment_token, MAX_TOKEN_BYTES)?;
        name("device_id", &self.device_id, MAX_NAME_BYTES)?;
        name("hostname", &self.hostname, MAX_HOSTNAME_BYTES)?;
        name("os", &self.os, MAX_LABEL_BYTES)?;
        name("agent_version", &self.agent_version, MAX_LABEL_BYTES)
    }
}

impl Validate for CheckinRequest {
    fn validate(&self) -> Result<(), Invalid> {
        if let Some(version) = self.policy_version {
            integer("policy_version", version)?;
        }
        integer("audit_last_seq", self.audit_last_seq)?;
        integer("outbox_pending", self.outbox_pending)?;
        count("counters", self.counters.len(), MAX_COUNTERS)?;
        for (key, value) in &self.counters {
            name("counters", key, 64)?;
            integer(&format!("counters.{key}"), *value)?;
        }
        count("users", self.users.len(), MAX_LIST_ITEMS)?;
        for (i, user) in self.users.iter().enumerate() {
            name(&format!("users[{i}].name"), &user.name, MAX_NAME_BYTES)?;
            count(
                &format!("users[{i}].groups"),
                user.groups.len(),
                MAX_LIST_ITEMS,
            )?;
            for (j, group) in user.groups.iter().enumerate() {
                name(&format!("users[{i}].groups[{j}]"), group, MAX_NAME_BYTES)?;
            }
        }
        for (field, ids) in [
            ("pending_requests", &self.pending_requests),
            ("used_requests", &self.used_requests),
        ] {
            count(field, ids.len(), MAX_LIST_ITEMS)?;
            for (i, id) in ids.iter().enumerate() {
                name(&format!("{field}[{i}]"), id, MAX_NAME_BYTES)?;
            }
        }
        Ok(())
    }
}

impl Validate for RequestWait {
    fn validate(&self) -> Result<(), Invalid> {
        let total = self.requests.len() + self.grants.len();
        if total > MAX_WAIT_REQUESTS {
            return Err(invalid(
                "requests",
                format!(
                    "{total} ids ({} requests, {} grants) is over the limit of {MAX_WAIT_REQUESTS} a wait may name",
                    self.requests.len(),
                    self.grants.len()
                ),
            ));
        }
        for (field, ids) in [("requests", &self.requests), ("grants", &self.grants)] {
            for (i, id) in ids.iter().enumerate() {
                name(&format!("{field}[{i}]"), id, MAX_NAME_BYTES)?;
            }
        }
        Ok(())
    }
}

impl Validate for AuditUpload {
    fn validate(&self) -> Result<(), Invalid> {
        integer("oldest_kept_seq", self.oldest_kept_seq)?;
        count("records", self.records.len(), MAX_AUDIT_RECORDS)
    }
}

impl Validate for RequestSubmit {
    fn validate(&self) -> Result<(), Invalid> {
        name("local_id", &self.local_id, MAX_NAME_BYTES)?;
        name("rule_id", &self.rule_id, MAX_NAME_BYTES)?;
        integer("policy_version", self.policy_version)?;
        name("user", &self.user, MAX_NAME_BYTES)?;
        name(
            "subject.identity.kind",
            &self.subject.identity.kind,
            MAX_LABEL_BYTES,
        )?;
        name(
            "subject.identity.value",
            &self.subject.identity.value,
            MAX_LABEL_BYTES,
        )?;
        name("subject.path", &self.subject.path, MAX_PATH_BYTES)?;
        if let Some(team) = &self.subject.team_id {
            name("subject.team_id", team, MAX_LABEL_BYTES)?;
        }
        if let Some(signing) = &self.subject.signing_id {
            name("subject.signing_id", signing, MAX_NAME_BYTES)?;
        }
        text("justification", &self.justification, MAX_TEXT_BYTES)
    }
}

impl Validate for CreateAdmin {
    fn validate(&self) -> Result<(), Invalid> {
        name("name", &self.name, 64)?;
        approver_level(self.approver_level)?;
        endpoint_users(self.endpoint_users.as_deref().unwrap_or_default())
    }
}

impl Validate for UpdateAdmin {
    fn validate(&self) -> Result<(), Invalid> {
        approver_level(self.approver_level)?;
        endpoint_users(&self.endpoint_users)
    }
}

/// The shortest console password accepted, in bytes.
pub const MIN_PASSWORD_BYTES: usize = 12;
/// The longest console password accepted, in bytes (hashing it is bounded
/// work).
pub const MAX_PASSWORD_BYTES: usize = 1024;

impl Validate for SetPassword {
    fn validate(&self) -> Result<(), Invalid> {
        let len = self.password.len();
        if !(MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&len) {
            return Err(invalid(
                "password",
                format!("{len} bytes; use {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES}"),
            ));
        }
        Ok(())
    }
}

impl Validate for CreateEnrollToken {
    fn validate(&self) -> Result<(), Invalid> {
        if self.uses == 0 || self.uses > 1_000_000 {
            return Err(invalid(
                "uses",
                format!("{} is outside 1..=1000000", self.uses),
            ));
        }
        integer("expires_in_seconds", self.expires_in_seconds)
    }
}

impl Validate for DenyRequest {
    fn validate(&self) -> Result<(), Invalid> {
        text("reason", &self.reason, MAX_TEXT_BYTES)
    }
}

impl Validate for RevokeRequest {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.reason {
            Some(reason) => text("reason", reason, MAX_TEXT_BYTES),
            None => Ok(()),
        }
    }
}

impl Validate for OfflineCodeRequest {
    fn validate(&self) -> Result<(), Invalid> {
        name("device_id", &self.device_id, MAX_NAME_BYTES)?;
        name("challenge", &self.challenge, MAX_CHALLENGE_BYTES)
    }
}

impl Validate for RequestQuery {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.device {
            Some(device) => name("device", device, MAX_NAME_BYTES),
            None => Ok(()),
        }
    }
}

impl Validate for AuditQuery {
    fn validate(&self) -> Result<(), Invalid> {
        if let Some(after) = self.after {
            integer("after", after)?;
        }
        if let Some(device) = &self.device {
            name("device", device, MAX_NAME_BYTES)?;
        }
        if let Some(decision) = &self.decision {
            name("decision", decision, 64)?;
        }
        Ok(())
    }
}

impl Validate for ActivityQuery {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.admin {
            Some(admin) => name("admin", admin, 64),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disguising_characters_are_named_and_shown_inert() {
        for c in [
            '\u{1b}', '\r', '\u{202e}', '\u{2066}', '\u{200b}', '\u{feff}',
        ] {
            let value = format!("a{c}b");
            let err = name("f", &value, 10).unwrap_err();
            assert!(err.problem.contains("not allowed"), "{err}");
            assert_eq!(printable(&value), "a?b");
        }
        assert!(text("f", "line one\nline two\tend", 100).is_ok());
        assert!(name("f", "a\nb", 100).is_err());
        assert!(name("f", "café-ü", 100).is_ok(), "letters are fine");
        assert_eq!(printable("plain"), "plain");
    }

    #[test]
    fn lengths_lists_and_integers_are_bounded() {
        assert!(name("f", &"x".repeat(257), MAX_NAME_BYTES).is_err());
        assert!(name("f", "", MAX_NAME_BYTES).is_err());
        assert!(integer("f", MAX_INTEGER).is_ok());
        let err = integer("seq", MAX_INTEGER + 1).unwrap_err();
        assert_eq!(err.field, "seq");
        let checkin = CheckinRequest {
            counters: (0..65).map(|i| (format!("c{i}"), 1)).collect(),
            ..CheckinRequest::default()
        };
        assert_eq!(checkin.validate().unwrap_err().field, "counters");
        let checkin = CheckinRequest {
            outbox_pending: u64::MAX,
            ..CheckinRequest::default()
        };
        assert_eq!(checkin.validate().unwrap_err().field, "outbox_pending");
    }
}
