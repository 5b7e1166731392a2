//! The messages. Requests and responses are internally tagged by `type`.
//! Fields are added, never renamed; a newer client's unknown request gets an
//! `unsupported` error from an older daemon.

use serde::{Deserialize, Serialize};

/// The protocol version both sides speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Client → daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first message on every connection.
    Hello {
        /// The client's protocol version.
        protocol: u32,
        /// Who is talking, e.g. `epmctl 0.1.0`, for the daemon's log.
        client: String,
    },
    /// The daemon's state and counters → [`Response::Status`].
    Status,
    /// Recent audit records → [`Response::AuditRecords`] batches, then
    /// [`Response::End`] unless `follow`, which streams until the client
    /// disconnects. Non-admins only ever get their own records.
    AuditTail {
        /// How many of the most recent records.
        lines: u32,
        /// Keep streaming new records.
        follow: bool,
        /// Only records with this decision (`allow`, `deny`, `would_deny`).
        decision: Option<String>,
        /// Only this user's records (admins only; others always get their own).
        user: Option<String>,
    },
    /// The live policy document → [`Response::Policy`] (admins only).
    PolicyShow,
    /// Decide a file against the live policy → [`Response::Explanation`].
    /// Non-admins may only explain for themselves, with their own groups.
    PolicyExplain {
        /// Absolute path of the executable.
        path: String,
        /// Its SHA-256, computed by the client: the daemon never reads a
        /// file on a caller's behalf (it runs as root, the caller may not).
        sha256: Option<String>,
        /// Decide as this user (default: the caller).
        user: Option<String>,
        /// Decide with these groups (default: the user's).
        groups: Option<Vec<String>>,
    },
}

/// Daemon → client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The answer to `Hello`.
    Welcome {
        /// The daemon's protocol version.
        protocol: u32,
        /// The daemon's version.
        daemon_version: String,
        /// The uid the daemon saw on the socket.
        uid: u32,
        /// Whether that uid may see everything.
        is_admin: bool,
    },
    /// The answer to `Status`.
    Status(StatusReport),
    /// A batch of audit records: JSON lines, verbatim.
    AuditRecords {
        /// The records.
        lines: Vec<String>,
    },
    /// The end of a finite stream.
    End,
    /// The answer to `PolicyShow`.
    Policy(PolicyInfo),
    /// The answer to `PolicyExplain`.
    Explanation(Explanation),
    /// A request failed.
    Error {
        /// The class of failure.
        code: ErrorCode,
        /// What went wrong, for a person.
        message: String,
    },
}

/// Classes of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or its arguments are invalid.
    BadRequest,
    /// The caller may not do this.
    Forbidden,
    /// What the request names does not exist.
    NotFound,
    /// This daemon does not know the request (older than the client).
    Unsupported,
    /// The daemon failed.
    Internal,
    /// The protocol versions do not match.
    VersionMismatch,
}

/// The daemon's state, for `epmctl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `enforce` or `monitor`.
    pub mode: String,
    /// `open` or `closed`.
    pub fail_mode: String,
    /// This device's id.
    pub device_id: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The daemon's version.
    pub daemon_version: String,
    /// The policy in force.
    pub policy: PolicyInfo,
    /// Counters since start.
    pub counters: Counters,
    /// Decision latency, gate read to answer.
    pub latency_us: Latency,
    /// The last audit sequence number written.
    pub audit_last_seq: u64,
    /// Audit records in the store not yet uploaded.
    pub audit_outbox_pending: u64,
}

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// Where it came from: `file:/path`, `store`, `builtin`.
    pub source: String,
    /// Its `version`.
    pub version: u64,
    /// How many rules.
    pub rule_count: u64,
    /// When it was loaded (RFC 3339).
    pub loaded_at: String,
    /// The document (only in answers to `PolicyShow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
}

/// Counters since the daemon started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Execs seen (the daemon's own excluded).
    pub execs_seen: u64,
    /// Allowed.
    pub allowed: u64,
    /// Denied.
    pub denied: u64,
    /// Monitor mode: allowed but would have been denied.
    pub would_deny: u64,
    /// Decisions from the cache.
    pub cache_hits: u64,
    /// Decisions computed.
    pub cache_misses: u64,
    /// Execs waiting now.
    pub queue_depth: u64,
    /// The queue's capacity.
    pub queue_capacity: u64,
    /// Execs answered per fail mode.
    pub fail_mode_answers: u64,
    /// Execs refused because the queue was full.
    pub overflow: u64,
    /// Decision panics caught.
    pub worker_panics: u64,
    /// Audit records lost because the audit queue was full (records dropped
    /// from the outbox for its disk budget are audited as `audit_dropped`).
    pub audit_dropped: u64,
}

/// Latency percentiles in microseconds; `None` before the first decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Maximum.
    pub max: Option<f64>,
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// `allow`, `justify`, `approve` or `deny`.
    pub action: String,
    /// The deciding rule, `None` for the default action.
    pub rule_id: Option<String>,
    /// One line: which rule, by which criterion, for which scope.
    pub reason: String,
    /// The deciding criterion.
    pub criterion: Option<String>,
    /// How the scope matched.
    pub scope: Option<String>,
    /// The rule's message.
    pub message: Option<String>,
    /// The policy version that decided.
    pub policy_version: u64,
    /// The file's SHA-256.
    pub sha256: Option<String>,
    /// The user decided for.
    pub user: String,
    /// The groups decided with.
    pub groups: Vec<String>,
    /// The device decided for.
    pub device_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_tagged_snake_case() {
        let hello = Request::Hello {
            protocol: 1,
            client: "epmctl".into(),
        };
        assert_eq!(
            serde_json::to_string(&hello).unwrap(),
            r#"{"type":"hello","protocol":1,"client":"epmctl"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"type":"status"}"#
        );
        let error = Response::Error {
            code: ErrorCode::Forbidden,
            message: "no".into(),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"type":"error","code":"forbidden","message":"no"}"#
        );
    }

    #[test]
    fn every_message_round_trips() {
        let requests = [
            Request::Hello {
                protocol: 1,
                client: "x".into(),
            },
            Request::Status,
            Request::AuditTail {
                lines: 10,
                follow: true,
                decision: Some("deny".into()),
                user: None,
            },
            Request::PolicyShow,
            Request::PolicyExplain {
                path: "/bin/sh".into(),
                sha256: Some("ab".repeat(32)),
                user: Some("alice".into()),
                groups: Some(vec!["staff".into()]),
            },
        ];
        for request in requests {
            let text = serde_json::to_string(&request).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        }
        let policy = PolicyInfo {
            source: "file:/etc/epm/policy.json".into(),
            version: 7,
            rule_count: 3,
            loaded_at: "2026-11-22T10:00:00Z".into(),
            document: None,
        };
        let responses = [
            Response::Welcome {
                protocol: 1,
                daemon_version: "0.1.0".into(),
                uid: 501,
                is_admin: false,
            },
            Response::Status(StatusReport {
                mode: "enforce".into(),
                fail_mode: "open".into(),
                device_id: "mac-1".into(),
                uptime_secs: 5,
                daemon_version: "0.1.0".into(),
                policy: policy.clone(),
                counters: Counters::default(),
                latency_us: Latency {
                    p50: Some(12.5),
                    p99: None,
                    max: Some(40.0),
                },
                audit_last_seq: 9,
                audit_outbox_pending: 2,
            }),
            Response::AuditRecords {
                lines: vec!["{}".into()],
            },
            Response::End,
            Response::Policy(policy),
            Response::Explanation(Explanation {
                action: "deny".into(),
                rule_id: Some("r".into()),
                reason: "why".into(),
                criterion: Some("name".into()),
                scope: Some("general".into()),
                message: None,
                policy_version: 7,
                sha256: None,
                user: "alice".into(),
                groups: vec![],
                device_id: "mac-1".into(),
            }),
            Response::Error {
                code: ErrorCode::Unsupported,
                message: "x".into(),
            },
        ];
        for response in responses {
            let text = serde_json::to_string(&response).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), response);
        }
    }
}
