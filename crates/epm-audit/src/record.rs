//! The record schema. Documented field by field in docs/audit.md; fields are
//! only ever added, never renamed or removed.

use serde::{Deserialize, Serialize};

/// What happened. A string newtype rather than an enum: readers must accept
/// event names added by newer daemons, and writers use the constants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventKind(pub String);

impl EventKind {
    /// An exec was decided.
    pub const EXEC: &str = "exec";
    /// A policy was loaded and is now enforced.
    pub const POLICY_LOADED: &str = "policy_loaded";
    /// A policy was rejected; the previous one stays in force.
    pub const POLICY_REJECTED: &str = "policy_rejected";
    /// The enforcement mode changed.
    pub const MODE_CHANGED: &str = "mode_changed";
    /// The daemon started.
    pub const DAEMON_STARTED: &str = "daemon_started";
    /// The daemon stopped cleanly.
    pub const DAEMON_STOPPED: &str = "daemon_stopped";
    /// An internal error (details in `reason`).
    pub const ERROR: &str = "error";
    /// Audit records were lost; `details.count` says how many.
    pub const AUDIT_DROPPED: &str = "audit_dropped";
    /// A corrupt store was moved aside and replaced.
    pub const STORE_RECOVERED: &str = "store_recovered";

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A record before it is sealed into the chain: everything but `seq`,
/// `time`, `prev_hash` and `hash`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// What happened (see [`EventKind`]).
    pub event: String,
    /// What was enforced: `allow`, `deny`, or `would_deny` (monitor mode
    /// allowed what enforce mode would have denied).
    pub decision: Option<String>,
    /// What the policy said: `allow`, `justify`, `approve`, `deny`.
    pub action: Option<String>,
    /// The deciding rule, `None` for the default action.
    pub rule_id: Option<String>,
    /// Why, in words.
    pub reason: Option<String>,
    /// `enforce` or `monitor`.
    pub mode: Option<String>,
    /// Process id of the exec'ing process.
    pub pid: Option<u32>,
    /// Its parent.
    pub ppid: Option<u32>,
    /// The user id it ran as.
    pub uid: Option<u32>,
    /// That user's name.
    pub user: Option<String>,
    /// The executable.
    pub path: Option<String>,
    /// Its SHA-256.
    pub sha256: Option<String>,
    /// The device.
    pub device_id: Option<String>,
    /// The policy version in force.
    pub policy_version: Option<u64>,
    /// Event-specific data.
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
}

impl AuditEvent {
    /// An event of `kind` with every other field empty.
    pub fn new(kind: &str) -> Self {
        Self {
            event: kind.to_owned(),
            ..Self::default()
        }
    }

    /// Adds one entry to `details`.
    pub fn with_detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.details
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.into());
        self
    }
}

/// A record as read back from the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1, contiguous.
    pub seq: u64,
    /// When it was sealed, RFC 3339 UTC.
    pub time: String,
    /// The event's fields.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// The previous record's hash (64 zeros for the first).
    pub prev_hash: String,
    /// This record's hash.
    pub hash: String,
}

impl AuditRecord {
    /// Parses one log line.
    pub fn parse(line: &str) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_str(line)
    }
}
