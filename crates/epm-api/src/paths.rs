//! Every route of the API. Path parameters are written `{name}`, as axum
//! and OpenAPI both expect.

/// The API's prefix and version.
pub const PREFIX: &str = "/api/v1";

/// `GET`: liveness; no authentication.
pub const HEALTH: &str = "/api/v1/health";
/// `GET`: the OpenAPI document; no authentication.
pub const OPENAPI: &str = "/api/v1/openapi.json";

/// `POST` [`crate::agent::EnrollRequest`] → [`crate::agent::EnrollResponse`].
pub const AGENT_ENROLL: &str = "/api/v1/agent/enroll";
/// `POST` [`crate::agent::CheckinRequest`] → [`crate::agent::CheckinResponse`].
pub const AGENT_CHECKIN: &str = "/api/v1/agent/checkin";
/// `GET` → a [`crate::SignedEnvelope`] of a [`crate::PolicyBundle`];
/// honours `If-None-Match` (304).
pub const AGENT_POLICY: &str = "/api/v1/agent/policy";
/// `POST` [`crate::agent::AuditUpload`] → [`crate::agent::AuditAck`].
pub const AGENT_AUDIT: &str = "/api/v1/agent/audit";
/// `POST` [`crate::agent::RequestSubmit`] → [`crate::agent::RequestStatus`].
pub const AGENT_REQUESTS: &str = "/api/v1/agent/requests";
/// `GET` → [`crate::agent::RequestStatus`].
pub const AGENT_REQUEST: &str = "/api/v1/agent/requests/{id}";
/// `POST` [`crate::agent::RequestWait`] → [`crate::agent::RequestWaitResponse`]:
/// a long poll that answers as soon as one of the agent's pending requests
/// is decided, on whichever platform instance.
pub const AGENT_REQUESTS_WAIT: &str = "/api/v1/agent/requests/wait";

/// `POST` with the agent's current credentials → new
/// [`crate::agent::AgentCredentials`] (same id and offline key, a new
/// secret). The old secret keeps working until the new one is first used,
/// so a crash before the agent stored the answer does not lock it out.
pub const AGENT_ROTATE: &str = "/api/v1/agent/credentials/rotate";

/// `GET` → [`crate::admin::WhoAmI`].
pub const ADMIN_WHOAMI: &str = "/api/v1/admin/whoami";
/// `GET` list, `POST` [`crate::admin::CreateAdmin`].
pub const ADMIN_ADMINS: &str = "/api/v1/admin/admins";
/// `PUT` [`crate::admin::UpdateAdmin`] (owner only).
pub const ADMIN_ADMIN: &str = "/api/v1/admin/admins/{name}";
/// `POST`: the admin's token is refused from now on (owner only).
pub const ADMIN_ADMIN_DISABLE: &str = "/api/v1/admin/admins/{name}/disable";
/// `POST`: undoes a disable (owner only).
pub const ADMIN_ADMIN_ENABLE: &str = "/api/v1/admin/admins/{name}/enable";
/// `POST` → [`crate::admin::AdminCreated`] with a new token; the old one is
/// refused (the owner for anyone, every admin for themselves).
pub const ADMIN_ADMIN_ROTATE_TOKEN: &str = "/api/v1/admin/admins/{name}/rotate-token";
/// `GET` → [`crate::admin::EnrollTokenInfo`] list, `POST`
/// [`crate::admin::CreateEnrollToken`].
pub const ADMIN_ENROLL_TOKENS: &str = "/api/v1/admin/enroll-tokens";
/// `POST`: the token enrolls nothing more.
pub const ADMIN_ENROLL_TOKEN_REVOKE: &str = "/api/v1/admin/enroll-tokens/{id}/revoke";
/// `GET` → [`crate::admin::DeviceInfo`] list.
pub const ADMIN_DEVICES: &str = "/api/v1/admin/devices";
/// `DELETE`: forget a device: its credentials stop working, its pending and
/// approved requests are revoked; its audit stays.
pub const ADMIN_DEVICE: &str = "/api/v1/admin/devices/{device_id}";
/// `POST`: void a device's credentials, revoke its pending and approved
/// requests, and let the next enrollment with a valid token take its id as
/// a new agent (a reinstalled machine).
pub const ADMIN_DEVICE_RESET: &str = "/api/v1/admin/devices/{device_id}/reset";
/// `GET` → the policy documents and their scopes.
pub const ADMIN_POLICIES: &str = "/api/v1/admin/policies";
/// `PUT` a policy document for a scope, `GET` it, `DELETE` it. The scope is
/// `general`, `device:ID`, `user:NAME` or `group:NAME`
/// (see [`crate::admin::PolicyScope`]).
pub const ADMIN_POLICY: &str = "/api/v1/admin/policies/{scope}";
/// `GET` → the merged bundle one device receives (for admins to inspect).
pub const ADMIN_DEVICE_BUNDLE: &str = "/api/v1/admin/devices/{device_id}/bundle";
/// `GET ?state=` → [`crate::admin::AdminRequest`] list.
pub const ADMIN_REQUESTS: &str = "/api/v1/admin/requests";
/// `GET` one request.
pub const ADMIN_REQUEST: &str = "/api/v1/admin/requests/{id}";
/// `POST`: approve at the caller's level.
pub const ADMIN_REQUEST_APPROVE: &str = "/api/v1/admin/requests/{id}/approve";
/// `POST` [`crate::admin::DenyRequest`].
pub const ADMIN_REQUEST_DENY: &str = "/api/v1/admin/requests/{id}/deny";
/// `POST` [`crate::admin::RevokeRequest`].
pub const ADMIN_REQUEST_REVOKE: &str = "/api/v1/admin/requests/{id}/revoke";
/// `GET ?after=&device=&decision=&limit=&wait=` → [`crate::admin::AuditPage`]
/// (long poll when `wait` is given).
pub const ADMIN_AUDIT: &str = "/api/v1/admin/audit";
/// `GET` → the platform's own audit of admin calls ([`crate::admin::ActivityPage`]).
pub const ADMIN_ACTIVITY: &str = "/api/v1/admin/activity";
/// `POST` [`crate::admin::OfflineCodeRequest`] → [`crate::admin::OfflineCodeResponse`].
pub const ADMIN_OFFLINE_CODES: &str = "/api/v1/admin/offline-codes";

/// `PUT` [`crate::admin::SetPassword`] → 204: an admin's console password
/// (the owner for anyone, every admin for themselves).
pub const ADMIN_ADMIN_PASSWORD: &str = "/api/v1/admin/admins/{name}/password";

/// Every route with its methods: the router serves exactly these, and a
/// test checks that the OpenAPI document describes each.
pub const ALL: &[(&str, &str)] = &[
    ("GET", HEALTH),
    ("GET", OPENAPI),
    ("POST", AGENT_ENROLL),
    ("POST", AGENT_CHECKIN),
    ("GET", AGENT_POLICY),
    ("POST", AGENT_AUDIT),
    ("POST", AGENT_REQUESTS),
    ("GET", AGENT_REQUEST),
    ("POST", AGENT_REQUESTS_WAIT),
    ("POST", AGENT_ROTATE),
    ("GET", ADMIN_WHOAMI),
    ("GET", ADMIN_ADMINS),
    ("POST", ADMIN_ADMINS),
    ("PUT", ADMIN_ADMIN),
    ("POST", ADMIN_ADMIN_DISABLE),
    ("POST", ADMIN_ADMIN_ENABLE),
    ("POST", ADMIN_ADMIN_ROTATE_TOKEN),
    ("PUT", ADMIN_ADMIN_PASSWORD),
    ("GET", ADMIN_ENROLL_TOKENS),
    ("POST", ADMIN_ENROLL_TOKENS),
    ("POST", ADMIN_ENROLL_TOKEN_REVOKE),
    ("GET", ADMIN_DEVICES),
    ("DELETE", ADMIN_DEVICE),
    ("POST", ADMIN_DEVICE_RESET),
    ("GET", ADMIN_DEVICE_BUNDLE),
    ("GET", ADMIN_POLICIES),
    ("PUT", ADMIN_POLICY),
    ("GET", ADMIN_POLICY),
    ("DELETE", ADMIN_POLICY),
    ("GET", ADMIN_REQUESTS),
    ("GET", ADMIN_REQUEST),
    ("POST", ADMIN_REQUEST_APPROVE),
    ("POST", ADMIN_REQUEST_DENY),
    ("POST", ADMIN_REQUEST_REVOKE),
    ("GET", ADMIN_AUDIT),
    ("GET", ADMIN_ACTIVITY),
    ("POST", ADMIN_OFFLINE_CODES),
];
