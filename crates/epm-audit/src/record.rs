//! The record schema. Fields are only ever added, never renamed or removed:
//! readers of old logs and old readers of new logs both keep working.

use serde::{Deserialize, Serialize};

/// What happened: the `event` field.
///
/// A string newtype with constants rather than a closed enum, because
/// readers (`epmctl`, the management platform) must accept event names
/// written by newer daemons, and an enum would need an `Other(String)`
/// escape hatch that every `match` then has to handle anyway. Writers use
/// the constants, so a typo is still caught at compile time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventKind(pub String);

impl EventKind {
    /// An exec was decided (by the policy, or by the fail mode).
    pub const EXEC: &str = "exec";
    /// A policy came into force.
    pub const POLICY_LOADED: &str = "policy_loaded";
    /// A policy was rejected; the previous one stays in force.
    pub const POLICY_REJECTED: &str = "policy_rejected";
    /// The enforcement mode changed; `mode` is the new mode.
    pub const MODE_CHANGED: &str = "mode_changed";
    /// The daemon started.
    pub const DAEMON_STARTED: &str = "daemon_started";
    /// The daemon stopped cleanly.
    pub const DAEMON_STOPPED: &str = "daemon_stopped";
    /// An internal error (details in `reason`).
    pub const ERROR: &str = "error";
    /// Audit records were lost; `details.count` says how many and
    /// `details.cause` why.
    pub const AUDIT_DROPPED: &str = "audit_dropped";
    /// A corrupt store was moved aside and replaced.
    pub const STORE_RECOVERED: &str = "store_recovered";
    /// Retention is about to delete the oldest rotated files:
    /// `details.first_kept_seq` is the first record kept, `details.files`
    /// the files. `verify` accepts a log that starts after seq 1 only up
    /// to the newest such record's `first_kept_seq`.
    pub const AUDIT_RETENTION: &str = "audit_retention";
    /// The live file was deleted, renamed or replaced under the running
    /// daemon; the records it held were written again from the store.
    pub const AUDIT_LOG_REPLACED: &str = "audit_log_replaced";

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What was enforced: the `decision` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The exec went ahead.
    Allow,
    /// The exec was refused.
    Deny,
    /// Monitor mode let the exec go ahead, but enforce mode would have
    /// refused it.
    WouldDeny,
}

impl Decision {
    /// The name written in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::WouldDeny => "would_deny",
        }
    }

    /// The decision a record's `decision` names, `None` for other text.
    pub fn parse(name: &str) -> Option<Decision> {
        [Decision::Allow, Decision::Deny, Decision::WouldDeny]
            .into_iter()
            .find(|d| d.as_str() == name)
    }
}

/// What the policy said: the `action` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Run it.
    Allow,
    /// Run it once the user gives a justification.
    Justify,
    /// Run it once an approver agrees.
    Approve,
    /// Do not run it.
    Deny,
}

impl Action {
    /// The name written in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Justify => "justify",
            Action::Approve => "approve",
            Action::Deny => "deny",
        }
    }

    /// The action a record's `action` names, `None` for other text.
    pub fn parse(name: &str) -> Option<Action> {
        [
            Action::Allow,
            Action::Justify,
            Action::Approve,
            Action::Deny,
        ]
        .into_iter()
        .find(|a| a.as_str() == name)
    }
}

/// How the daemon enforces: the `mode` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Denials are enforced.
    Enforce,
    /// Everything runs; denials are only recorded, as `would_deny`.
    Monitor,
}

impl Mode {
    /// The name written in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        }
    }

    /// The mode a record's `mode` names, `None` for other text.
    pub fn parse(name: &str) -> Option<Mode> {
        [Mode::Enforce, Mode::Monitor]
            .into_iter()
            .find(|m| m.as_str() == name)
    }
}

/// A record before it is sealed into the chain: every field but `seq`,
/// `time`, `prev_hash` and `hash`, which [`Chain::seal`](crate::Chain::seal)
/// adds.
///
/// Every field is written, as JSON `null` when it is `None`, so a record
/// always has the same keys. The closed sets (`decision`, `action`, `mode`)
/// are strings here so that records from newer daemons still parse; build
/// them from [`Decision`], [`Action`] and [`Mode`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// `event`: what happened, snake_case; see [`EventKind`] for the names
    /// this version writes. Readers must accept names they do not know.
    pub event: String,
    /// `decision`: what was enforced: `allow`, `deny`, or `would_deny`
    /// (monitor mode allowed what enforce mode would have denied). Set for
    /// `exec`.
    pub decision: Option<String>,
    /// `action`: what the policy said: `allow`, `justify`, `approve` or
    /// `deny`. `null` when no policy decided (e.g. the fail mode answered).
    pub action: Option<String>,
    /// `rule_id`: the id of the rule that decided; `null` when the policy's
    /// default action applied or no policy decided.
    pub rule_id: Option<String>,
    /// `reason`: why, in words, for people. Not meant to be parsed.
    pub reason: Option<String>,
    /// `mode`: the enforcement mode, `enforce` or `monitor`.
    pub mode: Option<String>,
    /// `pid`: the process that called exec (for daemon events, the daemon's
    /// own pid where set).
    pub pid: Option<u32>,
    /// `ppid`: the parent of `pid`.
    pub ppid: Option<u32>,
    /// `uid`: the real user id the process ran as.
    pub uid: Option<u32>,
    /// `user`: the name of `uid`, when it has one.
    pub user: Option<String>,
    /// `path`: the executable's path.
    pub path: Option<String>,
    /// `sha256`: the executable's SHA-256, lowercase hex.
    pub sha256: Option<String>,
    /// `device_id`: the device the record comes from.
    pub device_id: Option<String>,
    /// `policy_version`: the version of the policy in force (for
    /// `policy_rejected`, the version that stays in force).
    pub policy_version: Option<u64>,
    /// `details`: an object of event-specific facts, or `null`. Integers,
    /// strings, booleans, arrays and objects only: a floating-point number
    /// is written as a string, because float text does not always survive
    /// a parse and re-serialization unchanged, which the hash relies on.
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
}

impl AuditEvent {
    /// An event named `kind` (see [`EventKind`]) with every other field empty.
    pub fn new(kind: &str) -> Self {
        Self {
            event: kind.to_owned(),
            ..Self::default()
        }
    }

    /// An `exec`: what was enforced, in which mode, for which executable.
    /// Add the policy's side with [`with_action`](Self::with_action) and
    /// [`with_rule_id`](Self::with_rule_id), the process with
    /// [`with_process`](Self::with_process).
    pub fn exec(decision: Decision, mode: Mode, path: impl Into<String>) -> Self {
        Self::new(EventKind::EXEC)
            .with_decision(decision)
            .with_mode(mode)
            .with_path(path)
    }

    /// `policy_loaded`: version `policy_version` is now in force.
    pub fn policy_loaded(policy_version: u64) -> Self {
        Self::new(EventKind::POLICY_LOADED).with_policy_version(policy_version)
    }

    /// `policy_rejected`: a policy was refused for `reason`; version
    /// `kept_version` (if any) stays in force.
    pub fn policy_rejected(kept_version: Option<u64>, reason: impl Into<String>) -> Self {
        let mut event = Self::new(EventKind::POLICY_REJECTED).with_reason(reason);
        event.policy_version = kept_version;
        event
    }

    /// `mode_changed`: the daemon now runs in `mode`.
    pub fn mode_changed(mode: Mode) -> Self {
        Self::new(EventKind::MODE_CHANGED).with_mode(mode)
    }

    /// `daemon_started`.
    pub fn daemon_started() -> Self {
        Self::new(EventKind::DAEMON_STARTED)
    }

    /// `daemon_stopped`, and why.
    pub fn daemon_stopped(reason: impl Into<String>) -> Self {
        Self::new(EventKind::DAEMON_STOPPED).with_reason(reason)
    }

    /// `error`: an internal error, described in `reason`.
    pub fn error(reason: impl Into<String>) -> Self {
        Self::new(EventKind::ERROR).with_reason(reason)
    }

    /// `audit_dropped`: `count` records were lost because of `cause`.
    pub fn audit_dropped(count: u64, cause: &str) -> Self {
        Self::new(EventKind::AUDIT_DROPPED)
            .with_detail("count", count)
            .with_detail("cause", cause)
    }

    /// `store_recovered`: a corrupt store was replaced, for `reason`.
    pub fn store_recovered(reason: impl Into<String>) -> Self {
        Self::new(EventKind::STORE_RECOVERED).with_reason(reason)
    }

    /// Sets `decision`.
    pub fn with_decision(mut self, decision: Decision) -> Self {
        self.decision = Some(decision.as_str().to_owned());
        self
    }

    /// Sets `action`.
    pub fn with_action(mut self, action: Action) -> Self {
        self.action = Some(action.as_str().to_owned());
        self
    }

    /// Sets `rule_id`.
    pub fn with_rule_id(mut self, rule_id: impl Into<String>) -> Self {
        self.rule_id = Some(rule_id.into());
        self
    }

    /// Sets `reason`.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets `mode`.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode.as_str().to_owned());
        self
    }

    /// Sets `pid`, `ppid` and `uid`.
    pub fn with_process(mut self, pid: u32, ppid: u32, uid: u32) -> Self {
        self.pid = Some(pid);
        self.ppid = Some(ppid);
        self.uid = Some(uid);
        self
    }

    /// Sets `user`.
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Sets `path`.
    pub fn with_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sets `sha256` (lowercase hex).
    pub fn with_sha256(mut self, sha256: impl Into<String>) -> Self {
        self.sha256 = Some(sha256.into());
        self
    }

    /// Sets `device_id`.
    pub fn with_device_id(mut self, device_id: impl Into<String>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }

    /// Sets `policy_version`.
    pub fn with_policy_version(mut self, policy_version: u64) -> Self {
        self.policy_version = Some(policy_version);
        self
    }

    /// Adds one entry to `details`.
    pub fn with_detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.details
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), value.into());
        self
    }
}

/// A record as read back from the log: the event's fields plus the four
/// the chain adds. Fields this version does not know are ignored here (the
/// hash still covers them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// `seq`: the record's position in the chain: 1, 2, 3, … with no gaps,
    /// across rotations and restarts.
    pub seq: u64,
    /// `time`: when the record was sealed, RFC 3339 in UTC with a `Z`
    /// suffix and up to nine fractional digits (`2027-01-15T08:00:00Z`,
    /// `2026-11-22T13:20:08.441523736Z`). A string, so that a reader never
    /// rejects a record over its time; see [`timestamp`](Self::timestamp).
    pub time: String,
    /// The event's fields (flattened into the same JSON object).
    #[serde(flatten)]
    pub event: AuditEvent,
    /// `prev_hash`: the previous record's `hash`; 64 zeros
    /// ([`GENESIS_HASH`](crate::GENESIS_HASH)) for record 1.
    pub prev_hash: String,
    /// `hash`: lowercase hex SHA-256 of this record's canonical JSON
    /// without the `hash` key (see the crate documentation).
    pub hash: String,
}

impl AuditRecord {
    /// Parses one log line.
    pub fn parse(line: &str) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// Parses one log line given as bytes (which need not be UTF-8 for the
    /// parse to fail cleanly).
    pub fn from_slice(line: &[u8]) -> Result<AuditRecord, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// `time` as a timestamp, `None` if it is not RFC 3339.
    pub fn timestamp(&self) -> Option<jiff::Timestamp> {
        self.time.parse().ok()
    }
}
