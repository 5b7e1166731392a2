//! The admin side: `/api/v1/admin/…`, authenticated with
//! `Authorization: Bearer <admin token>`. Every call is recorded in the
//! platform's own activity log.

use std::fmt;
use std::str::FromStr;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};

use crate::SubjectIdentity;
use crate::agent::{RequestState, RequestSubject, Window};

/// What an admin may do. Each role is the least that one job needs; an
/// approver level is separate (see [`AdminInfo::approver_level`]) and only
/// the owner and approvers may have one.
///
/// | role | reads everything | policies, enrollment tokens, devices | approves at its level | manages admins |
/// | --- | --- | --- | --- | --- |
/// | `owner` | yes | yes | with a level | yes |
/// | `policy_admin` | yes | yes | no | no |
/// | `approver` | yes | no | yes (needs a level) | no |
/// | `auditor` | yes | no | no | no |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AdminRole {
    /// Everything, including creating admins and changing their roles.
    Owner,
    /// Policies, enrollment tokens and devices; cannot approve.
    PolicyAdmin,
    /// Approves, denies and revokes requests and answers offline
    /// challenges at its level.
    Approver,
    /// Reads only.
    Auditor,
}

impl AdminRole {
    /// Every role, most powerful first.
    pub const ALL: [AdminRole; 4] = [
        AdminRole::Owner,
        AdminRole::PolicyAdmin,
        AdminRole::Approver,
        AdminRole::Auditor,
    ];

    /// The name used in JSON, the CLI and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Owner => "owner",
            AdminRole::PolicyAdmin => "policy_admin",
            AdminRole::Approver => "approver",
            AdminRole::Auditor => "auditor",
        }
    }

    /// Whether an admin of this role may have an approver level (an
    /// approver must).
    pub fn may_approve(self) -> bool {
        matches!(self, AdminRole::Owner | AdminRole::Approver)
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AdminRole {
    type Err = String;

    fn from_str(text: &str) -> Result<AdminRole, String> {
        AdminRole::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| {
                format!("unknown role {text:?}: one of owner, policy_admin, approver, auditor")
            })
    }
}

/// `GET /api/v1/admin/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WhoAmI {
    /// Admin name.
    pub name: String,
    /// What this admin may do.
    pub role: AdminRole,
    /// The approval level this admin approves at; none: cannot approve.
    pub approver_level: Option<u32>,
    /// The endpoint user names that are this admin: requests of these users
    /// are not theirs to approve.
    pub endpoint_users: Vec<String>,
}

/// `POST /api/v1/admin/admins` (owner only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdmin {
    /// Unique name.
    pub name: String,
    /// The role; without one, `approver` when a level is given, else
    /// `auditor` (the first admin of an empty database is the `owner`).
    #[serde(default)]
    pub role: Option<AdminRole>,
    /// The approval level (1-based) this admin approves at: from 1 to the
    /// highest level any stored rule uses (at least 1), at most 16.
    #[serde(default)]
    pub approver_level: Option<u32>,
    /// The endpoint user names that are this admin (default: the admin's
    /// name): nobody approves their own requests.
    #[serde(default)]
    pub endpoint_users: Option<Vec<String>>,
}

/// `PUT /api/v1/admin/admins/{name}` (owner only): the admin's role, level
/// and endpoint users, replaced as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAdmin {
    /// The role.
    pub role: AdminRole,
    /// The approval level, or none.
    #[serde(default)]
    pub approver_level: Option<u32>,
    /// The endpoint user names that are this admin.
    pub endpoint_users: Vec<String>,
}

/// An admin account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminInfo {
    /// Unique name.
    pub name: String,
    /// What this admin may do.
    pub role: AdminRole,
    /// Approval level, if an approver.
    pub approver_level: Option<u32>,
    /// The endpoint user names that are this admin.
    pub endpoint_users: Vec<String>,
    /// Disabled admins' tokens are refused.
    pub disabled: bool,
    /// Created.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
}

/// `POST /api/v1/admin/admins` and `…/rotate-token` answer: the token is
/// shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminCreated {
    /// The account.
    pub admin: AdminInfo,
    /// Bearer token; only its hash is stored.
    pub token: String,
}

/// `PUT /api/v1/admin/admins/{name}/password`: the admin's password for the
/// web console (12 to 1024 bytes), stored as an argon2id hash; setting it
/// ends the admin's console sessions.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    /// The new password.
    pub password: String,
}

impl fmt::Debug for SetPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SetPassword { password: <hidden> }")
    }
}

/// `POST /api/v1/admin/enroll-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollToken {
    /// How many devices may enroll with it.
    pub uses: u32,
    /// Seconds until it expires.
    pub expires_in_seconds: u64,
}

/// `POST /api/v1/admin/enroll-tokens` answer: the token is shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollTokenCreated {
    /// Its public id, to list and revoke it.
    pub id: String,
    /// Give it to agents (`[platform] enrollment_token`).
    pub token: String,
    /// Uses.
    pub uses: u32,
    /// Expiry.
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
}

/// An enrollment token, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollTokenInfo {
    /// Public id.
    pub id: String,
    /// Enrollments left.
    pub uses_left: u32,
    /// Expiry.
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
    /// Who made it.
    pub created_by: String,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Who revoked it, if revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

/// Which devices a policy document reaches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyScope {
    /// Every device.
    General,
    /// One device, by id.
    Device(String),
    /// Devices that report this user; its rules apply to this user only.
    User(String),
    /// Devices with a user in this group; its rules apply to the group only.
    Group(String),
}

impl fmt::Display for PolicyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyScope::General => f.write_str("general"),
            PolicyScope::Device(id) => write!(f, "device:{id}"),
            PolicyScope::User(name) => write!(f, "user:{name}"),
            PolicyScope::Group(name) => write!(f, "group:{name}"),
        }
    }
}

impl FromStr for PolicyScope {
    type Err = String;

    fn from_str(text: &str) -> Result<PolicyScope, String> {
        if text == "general" {
            return Ok(PolicyScope::General);
        }
        let (kind, name) = text.split_once(':').ok_or_else(|| {
            format!("scope {text:?}: write general, device:ID, user:NAME or group:NAME")
        })?;
        if let Err(problem) = crate::validate::name(kind, name, crate::validate::MAX_NAME_BYTES) {
            return Err(format!(
                "scope {:?}: the name after {kind}: must be 1 to 256 bytes of printable characters ({})",
                crate::validate::printable(text),
                problem.problem
            ));
        }
        match kind {
            "device" => Ok(PolicyScope::Device(name.into())),
            "user" => Ok(PolicyScope::User(name.into())),
            "group" => Ok(PolicyScope::Group(name.into())),
            _ => Err(format!(
                "scope {text:?}: {kind:?} is not device, user or group"
            )),
        }
    }
}

/// A policy document as stored on the platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// `general`, `device:ID`, `user:NAME` or `group:NAME`.
    pub scope: String,
    /// Increases with every push to any scope.
    pub revision: u64,
    /// Rules in the document.
    pub rules: u64,
    /// Who pushed it.
    pub pushed_by: String,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub pushed_at: Timestamp,
}

/// `PUT /api/v1/admin/policies/{scope}` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyPushed {
    /// What was stored.
    pub entry: PolicyEntry,
    /// Lint warnings (the document was accepted).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    /// Device id.
    pub device_id: String,
    /// Agent id.
    pub agent_id: String,
    /// Host name.
    pub hostname: String,
    /// OS.
    pub os: String,
    /// Agent version.
    pub agent_version: String,
    /// Enrolled.
    #[schema(value_type = String, format = DateTime)]
    pub enrolled_at: Timestamp,
    /// Last check-in.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_checkin: Option<Timestamp>,
    /// Bundle version the agent reported.
    pub policy_version: Option<u64>,
    /// Bundle version the platform has for it.
    pub bundle_version: u64,
    /// Audit records stored, up to.
    pub audit_acked_seq: u64,
    /// Audit records the agent reported not yet uploaded.
    pub outbox_pending: u64,
    /// Users the agent reported.
    pub users: Vec<String>,
    /// Reset by an admin (`devices reset`): its credentials are void and
    /// the next enrollment with a valid token takes the device over.
    pub reset_pending: bool,
}

/// `GET /api/v1/admin/requests` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RequestQuery {
    /// Only requests in this state.
    pub state: Option<RequestState>,
    /// Only requests from this device.
    pub device: Option<String>,
}

/// One approval given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// Admin name.
    pub admin: String,
    /// The level approved (1-based).
    pub level: u32,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
}

/// A request as admins see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminRequest {
    /// Platform id.
    pub id: String,
    /// Device.
    pub device_id: String,
    /// User.
    pub user: String,
    /// Rule.
    pub rule_id: String,
    /// Binary.
    pub subject: RequestSubject,
    /// The user's reason.
    pub justification: String,
    /// Requested window.
    pub window: Window,
    /// Where it stands.
    pub state: RequestState,
    /// Approvers needed at each level, from the rule.
    pub levels: Vec<u32>,
    /// The level waiting (1-based); `0` once decided.
    pub current_level: u32,
    /// Approvals so far.
    pub approvals: Vec<Approval>,
    /// Who denied or revoked it, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who decided it last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Submitted.
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// Changed last.
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
}

/// `POST /api/v1/admin/requests/{id}/deny`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DenyRequest {
    /// Shown to the user.
    pub reason: String,
}

/// `POST /api/v1/admin/requests/{id}/revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Shown to the user.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `GET /api/v1/admin/audit` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only records after this cursor (from [`AuditPage::next`]); without
    /// it, the newest `limit` records.
    pub after: Option<u64>,
    /// Only this device.
    pub device: Option<String>,
    /// Only this decision (`allow`, `deny`, …).
    pub decision: Option<String>,
    /// At most this many (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Long poll: wait up to this many seconds (at most 60) for a record.
    pub wait: Option<u32>,
}

/// One audit record of the fleet.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetAuditRecord {
    /// The platform's cursor.
    pub cursor: u64,
    /// Which device.
    pub device_id: String,
    /// The record as the agent wrote it.
    #[schema(value_type = Object)]
    pub record: Box<RawValue>,
}

/// `GET /api/v1/admin/audit` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditPage {
    /// Oldest first.
    pub records: Vec<FleetAuditRecord>,
    /// Pass as `after` for the next page.
    pub next: u64,
}

/// One admin call, in the platform's own audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Activity {
    /// Order.
    pub id: u64,
    /// When.
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// Admin name (or `local` for the offline CLI).
    pub admin: String,
    /// `METHOD path`.
    pub call: String,
    /// HTTP status returned.
    pub status: u16,
    /// What changed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `GET /api/v1/admin/activity` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ActivityQuery {
    /// Only this admin's calls (`local` for the offline CLI, `device:ID`
    /// for enrollments).
    pub admin: Option<String>,
    /// At most this many of the newest (default and most 1000).
    pub limit: Option<u32>,
}

/// Calls refused before anyone was authenticated (no, unknown or disabled
/// token) or over a rate limit, counted together: one row per source,
/// call, status and hour, so a flood of them adds rows slowly and never
/// pushes admins' own entries out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefusedCalls {
    /// The hour these were counted in.
    #[schema(value_type = String, format = DateTime)]
    pub hour: Timestamp,
    /// The last one.
    #[schema(value_type = String, format = DateTime)]
    pub last_at: Timestamp,
    /// The client's address (an IPv6 client by its /64).
    pub source: String,
    /// `anonymous`, `disabled:NAME`, or the admin or agent over its rate.
    pub who: String,
    /// `METHOD path`, the path cut to 80 bytes.
    pub call: String,
    /// HTTP status returned.
    pub status: u16,
    /// How many.
    pub count: u64,
}

/// `GET /api/v1/admin/activity` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActivityPage {
    /// Admins' calls, oldest first.
    pub entries: Vec<Activity>,
    /// Refused anonymous and rate-limited calls, counted; newest 100.
    #[serde(default)]
    pub refused: Vec<RefusedCalls>,
}

/// `POST /api/v1/admin/offline-codes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflineCodeRequest {
    /// The device the challenge must come from.
    pub device_id: String,
    /// The challenge text the user read out (`EPM1-…`).
    pub challenge: String,
}

/// `POST /api/v1/admin/offline-codes` answer: what the code allows, for the
/// admin to confirm before reading it out. A challenge is approved like a
/// request (the platform keeps one for it): the code comes only once every
/// level of the rule has approved (200); until then the answer has no code
/// and names the level waiting (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflineCodeResponse {
    /// `XXXXX-XXXXX`, once fully approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The platform's request for this challenge.
    pub request_id: String,
    /// The level waiting for approvers (1-based); `0` once approved.
    pub current_level: u32,
    /// Approvers needed at each level.
    pub levels: Vec<u32>,
    /// Device.
    pub device_id: String,
    /// User.
    pub user: String,
    /// Binary.
    pub identity: SubjectIdentity,
    /// Rule.
    pub rule_id: String,
    /// Window.
    pub window: Window,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_bad_ones_are_named() {
        for text in [
            "general",
            "device:mac-1",
            "user:alice",
            "group:developers",
            "user:a:b",
        ] {
            assert_eq!(text.parse::<PolicyScope>().unwrap().to_string(), text);
        }
        for bad in [
            "",
            "device",
            "device:",
            "host:x",
            "user:\u{7}",
            "user:a\u{202e}b",
        ] {
            let err = bad.parse::<PolicyScope>().unwrap_err();
            assert!(err.contains("scope"), "{err}");
        }
    }
}
