//! The agent side: `/api/v1/agent/…`.
//!
//! Every call but enrollment authenticates with
//! `Authorization: Bearer <agent_id>.<agent_secret>` ([`AgentCredentials::bearer`]).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::{SignedEnvelope, SubjectIdentity};

/// `POST /api/v1/agent/enroll`: trade a one-time enrollment token for
/// credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// From `epm-platform enroll-token create`.
    pub enrollment_token: String,
    /// The device's id (the agent's `device_id` setting). Enrolling an
    /// enrolled device id again needs its current credentials as the bearer
    /// (they are replaced) or an admin's reset of the device.
    pub device_id: String,
    /// Host name, for display.
    pub hostname: String,
    /// `macos` or `linux`, with a version when known.
    pub os: String,
    /// The agent's version.
    pub agent_version: String,
}

/// What the agent stores after enrolling (mode 0600 on Linux, the System
/// keychain on macOS). The platform keeps only a hash of the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCredentials {
    /// Public id.
    pub agent_id: String,
    /// Secret half of the bearer token.
    pub agent_secret: String,
    /// Base64 of 32 random bytes shared with the platform, for offline
    /// codes ([`crate::offline`]).
    pub offline_key: String,
}

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredentials")
            .field("agent_id", &self.agent_id)
            .field("agent_secret", &"<hidden>")
            .field("offline_key", &"<hidden>")
            .finish()
    }
}

impl AgentCredentials {
    /// The `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}.{}", self.agent_id, self.agent_secret)
    }
}

/// `POST /api/v1/agent/enroll` answer.
pub type EnrollResponse = AgentCredentials;

/// A local account the agent reports, so user- and group-scoped policies
/// reach only the devices where they apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalUser {
    /// Login name.
    pub name: String,
    /// Group names.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `POST /api/v1/agent/checkin`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckinRequest {
    /// The bundle version the agent enforces, if any.
    pub policy_version: Option<u64>,
    /// The seq of the newest audit record the agent has written.
    pub audit_last_seq: u64,
    /// Audit records not yet acknowledged by the platform.
    pub outbox_pending: u64,
    /// Counters since the agent started (`decisions`, `denied`, …).
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// The device's users.
    #[serde(default)]
    pub users: Vec<LocalUser>,
    /// Platform ids of requests the agent is waiting on.
    #[serde(default)]
    pub pending_requests: Vec<String>,
    /// Platform ids of approved requests whose grants were used up.
    #[serde(default)]
    pub used_requests: Vec<String>,
}

/// `POST /api/v1/agent/checkin` answer: what changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckinResponse {
    /// The device's current bundle.
    pub policy: PolicyState,
    /// The highest seq such that every record up to it is stored.
    pub audit_acked_seq: u64,
    /// Requests among `pending_requests` whose state changed, with their
    /// grants when approved.
    #[serde(default)]
    pub requests: Vec<RequestStatus>,
    /// The platform's time, so the agent can report clock skew.
    #[schema(value_type = String, format = DateTime)]
    pub server_time: Timestamp,
}

/// The device's current bundle, as the check-in reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyState {
    /// Its version (from 1; a device targeted by no document gets an
    /// allow-all bundle).
    pub version: u64,
    /// The `ETag` to send as `If-None-Match`.
    pub etag: String,
    /// Whether it differs from `policy_version` in the check-in.
    pub changed: bool,
}

/// `POST /api/v1/agent/audit`: a batch of the agent's audit records, in
/// seq order. Idempotent on (agent, seq).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditUpload {
    /// The oldest seq the agent still holds: records before it were dropped
    /// by the agent's outbox budget (an `audit_dropped` record says so), so
    /// the platform stops waiting for them.
    pub oldest_kept_seq: u64,
    /// Audit records as the agent wrote them (each has `seq` and `hash`).
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<Box<RawValue>>,
}

/// `POST /api/v1/agent/audit` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditAck {
    /// The highest seq such that every record up to it is stored.
    pub acked_seq: u64,
    /// Records stored by this call.
    pub stored: u64,
    /// Records this call sent that were already stored.
    pub duplicates: u64,
}

/// An execution window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start.
    #[schema(value_type = String, format = DateTime)]
    pub start: Timestamp,
    /// End.
    #[schema(value_type = String, format = DateTime)]
    pub end: Timestamp,
}

/// The binary a request is about, with what helps an approver decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSubject {
    /// What the grant will be bound to.
    pub identity: SubjectIdentity,
    /// The path it was run from (display only).
    pub path: String,
    /// Code signing team, when signed (macOS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    /// Code signing identifier, when signed (macOS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_id: Option<String>,
}

/// `POST /api/v1/agent/requests`: ask for approval. Idempotent on
/// (agent, `local_id`), so a request queued offline is sent once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestSubmit {
    /// The agent's own id for the request.
    pub local_id: String,
    /// The rule that requires approval (its id in the bundle).
    pub rule_id: String,
    /// The bundle version the agent decided with.
    pub policy_version: u64,
    /// Login name.
    pub user: String,
    /// The binary.
    pub subject: RequestSubject,
    /// Why the user needs it.
    pub justification: String,
    /// When the user wants to run it.
    pub window: Window,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for approvers.
    Pending,
    /// Every level approved; a grant exists.
    Approved,
    /// An approver rejected it.
    Denied,
    /// The window ended before approval, or before use.
    Expired,
    /// Withdrawn by an admin after approval.
    Revoked,
    /// The agent reported the approved executions used.
    Used,
}

impl RequestState {
    /// The name used in URLs, JSON and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Expired => "expired",
            RequestState::Revoked => "revoked",
            RequestState::Used => "used",
        }
    }

    /// Every state, in lifecycle order.
    pub const ALL: [RequestState; 6] = [
        RequestState::Pending,
        RequestState::Approved,
        RequestState::Denied,
        RequestState::Expired,
        RequestState::Revoked,
        RequestState::Used,
    ];
}

impl std::fmt::Display for RequestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RequestState {
    type Err = String;

    fn from_str(text: &str) -> Result<RequestState, String> {
        RequestState::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                format!("unknown request state {text:?}: one of pending, approved, denied, expired, revoked, used")
            })
    }
}

/// A request as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestStatus {
    /// The platform's id.
    pub id: String,
    /// The agent's id.
    pub local_id: String,
    /// Where it stands.
    pub state: RequestState,
    /// The approver's reason for a denial or revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The level waiting for approvers (1-based); `0` once decided.
    pub current_level: u32,
    /// How many levels the rule has.
    pub levels: u32,
    /// Changed last.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
    /// The signed [`crate::Grant`] when approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<SignedEnvelope>,
}

/// Most ids one [`RequestWait`] may name, its `requests` and `grants`
/// together.
pub const MAX_WAIT_REQUESTS: usize = 100;
/// The longest a [`RequestWait`] is held, in seconds; more is treated as
/// this.
pub const MAX_REQUEST_WAIT_SECONDS: u32 = 60;
/// Largest [`RequestWait`] body, in bytes: [`MAX_WAIT_REQUESTS`] ids of
/// the longest accepted name, with room for the JSON around them.
pub const MAX_REQUEST_WAIT_BYTES: usize = 32 * 1024;

/// `POST /api/v1/agent/requests/wait`: a long poll on the agent's pending
/// requests and the grants it holds, so a decision reaches a waiting user
/// within about a second, and a revocation ends a grant as fast, instead
/// of at the next check-in. One wait per agent: a newer one replaces an
/// older one, which is answered `409`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestWait {
    /// Platform ids of requests the agent holds as pending: the wait
    /// answers when one is no longer pending. Ids that are not this
    /// agent's are ignored.
    pub requests: Vec<String>,
    /// Platform ids of approved requests whose grant the agent holds in
    /// force (unused, window not over): the wait answers when one is no
    /// longer approved (revoked, expired, the device reset). With
    /// `requests`, at most [`MAX_WAIT_REQUESTS`] ids. Left out when empty,
    /// so an agent with nothing but pending requests is understood by a
    /// platform that predates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<String>,
    /// How long to wait at most, in seconds (0 answers at once; over
    /// [`MAX_REQUEST_WAIT_SECONDS`] is treated as that).
    pub wait_seconds: u32,
}

/// `POST /api/v1/agent/requests/wait` answer: the named requests that are
/// no longer pending, and the named grants that are no longer approved
/// (empty when the wait ended with none). The agent learns their grants
/// and reasons by checking in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestWaitResponse {
    /// The requests decided (or expired, or revoked) since they were
    /// pending, and the grants revoked (or expired, or used) since they
    /// were approved.
    pub changed: Vec<RequestChange>,
}

/// One request whose state moved on from the one the agent named it in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestChange {
    /// The platform's id.
    pub id: String,
    /// Where it stands now.
    pub state: RequestState,
}
