//! The HTTPS API: routes, authentication, errors, and the work behind each
//! call. Handlers are thin; the database ([`crate::db`]) and the merge
//! ([`crate::merge`]) hold the logic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use epm_api::admin::{
    ActivityPage, AdminCreated, AdminInfo, AdminRequest, AuditPage, AuditQuery, CreateAdmin,
    CreateEnrollToken, DenyRequest, DeviceInfo, EnrollTokenCreated, FleetAuditRecord,
    OfflineCodeRequest, OfflineCodeResponse, PolicyEntry, PolicyPushed, PolicyScope, RequestQuery,
    RevokeRequest, WhoAmI,
};
use epm_api::agent::{
    AgentCredentials, AuditAck, AuditUpload, CheckinRequest, CheckinResponse, EnrollRequest,
    LocalUser, PolicyState, RequestState, RequestStatus, RequestSubmit, Window,
};
use epm_api::offline::OfflineChallenge;
use epm_api::sign::{PolicySigningKey, SignedKind};
use epm_api::{ApiError, ApiErrorBody, Grant, PolicyBundle, SignedEnvelope, paths};
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use utoipa::OpenApi;

use crate::db::{Admin, Agent, BundleRow, Db, DbError};
use crate::merge::{self, Merged};

/// Merged policies by the (scope, revision) list they were made from: most
/// devices share the same few document sets.
type MergeCache = Mutex<HashMap<Vec<(String, u64)>, Arc<Merged>>>;

/// Everything the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The database.
    pub db: Db,
    /// The bundle and grant signing key.
    pub signing: PolicySigningKey,
    audit_arrived: Notify,
    merged: MergeCache,
    build: tokio::sync::Mutex<()>,
}

impl AppState {
    /// State over an opened database and key.
    pub fn new(db: Db, signing: PolicySigningKey) -> Arc<AppState> {
        Arc::new(AppState {
            db,
            signing,
            audit_arrived: Notify::new(),
            merged: Mutex::new(HashMap::new()),
            build: tokio::sync::Mutex::new(()),
        })
    }
}

type Shared = Arc<AppState>;

// ---- errors ---------------------------------------------------------

/// A failed call: a status and the JSON error body.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    error: ApiError,
}

impl Failure {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Failure {
        Failure {
            status,
            error: ApiError {
                code: code.into(),
                message: message.into(),
                details: Vec::new(),
            },
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, Json(ApiErrorBody { error: self.error })).into_response()
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Failure {
        match e {
            DbError::NotFound(m) => Failure::new(StatusCode::NOT_FOUND, "not_found", m),
            DbError::Conflict(m) => Failure::new(StatusCode::CONFLICT, "conflict", m),
            DbError::Unauthorized(m) => Failure::new(StatusCode::UNAUTHORIZED, "unauthorized", m),
            DbError::Forbidden(m) => Failure::new(StatusCode::FORBIDDEN, "forbidden", m),
            DbError::Invalid(m) => {
                Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m)
            }
            DbError::Sqlite(e) => {
                tracing::error!("database: {e}");
                Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the platform's database failed; see its log",
                )
            }
        }
    }
}

type ApiResult<T> = Result<T, Failure>;

/// A JSON body whose every rejection is an [`ApiErrorBody`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_failure(&rejection)),
        }
    }
}

fn json_failure(rejection: &JsonRejection) -> Failure {
    let status = rejection.status();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "invalid_json",
    };
    Failure::new(status, code, rejection.body_text())
}

fn require_json(headers: &HeaderMap) -> ApiResult<()> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if ok {
        Ok(())
    } else {
        Err(Failure::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ))
    }
}

// ---- authentication -------------------------------------------------

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The admin calling.
#[derive(Debug)]
pub struct AdminAuth(pub Admin);

impl FromRequestParts<Shared> for AdminAuth {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Failure> {
        let token = bearer(parts).ok_or_else(|| {
            Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "an admin bearer token is required (Authorization: Bearer epa_…)",
            )
        })?;
        state
            .db
            .admin_by_token(token)?
            .map(AdminAuth)
            .ok_or_else(|| {
                Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "unknown admin token",
                )
            })
    }
}

/// The agent calling.
#[derive(Debug)]
pub struct AgentAuth(pub Agent);

impl FromRequestParts<Shared> for AgentAuth {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Failure> {
        let token = bearer(parts).ok_or_else(|| {
            Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "agent credentials are required (Authorization: Bearer <agent_id>.<secret>)",
            )
        })?;
        state
            .db
            .agent_by_bearer(token)?
            .map(AgentAuth)
            .ok_or_else(|| {
                Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "unknown or replaced agent credentials: enroll the agent again",
                )
            })
    }
}

/// What an admin call changed, for the activity log.
#[derive(Debug, Clone)]
struct ActivityDetail(String);

fn with_detail<T: IntoResponse>(body: T, detail: String) -> Response {
    let mut response = body.into_response();
    response.extensions_mut().insert(ActivityDetail(detail));
    response
}

/// Records every admin call, failed ones included.
async fn record_activity(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if !path.starts_with("/api/v1/admin/") {
        return next.run(request).await;
    }
    let call = format!("{} {path}", request.method());
    let admin = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| state.db.admin_by_token(token.trim()).ok().flatten())
        .map_or_else(|| "anonymous".to_owned(), |a| a.name);
    let response = next.run(request).await;
    let detail = response
        .extensions()
        .get::<ActivityDetail>()
        .map(|d| d.0.clone());
    if let Err(e) =
        state
            .db
            .record_activity(&admin, &call, response.status().as_u16(), detail.as_deref())
    {
        tracing::error!("cannot record admin activity {call}: {e}");
    }
    response
}

// ---- bundles --------------------------------------------------------

fn users_hash(users: &[LocalUser]) -> Vec<u8> {
    let mut sorted: Vec<(&str, Vec<&str>)> = users
        .iter()
        .map(|u| {
            let mut groups: Vec<&str> = u.groups.iter().map(String::as_str).collect();
            groups.sort_unstable();
            (u.name.as_str(), groups)
        })
        .collect();
    sorted.sort();
    Sha256::digest(serde_json::to_vec(&sorted).unwrap_or_default()).to_vec()
}

/// The key a stored envelope names, read without copying its payload
/// (checked at every check-in; a bundle can be megabytes).
fn signer_of(envelope: &str) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Signer<'a> {
        #[serde(borrow)]
        key: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<Signer<'_>>(envelope)
        .ok()
        .map(|signer| signer.key)
}

/// The device's current bundle, rebuilt only when a document that could
/// apply to it, or its users, changed; the version moves only when the
/// merged content does.
async fn current_bundle(
    state: &Shared,
    device_id: &str,
    users: &[LocalUser],
) -> ApiResult<BundleRow> {
    let revision = state.db.policy_revision()?;
    let users_sha256 = users_hash(users);
    // A bundle signed with a key rotated out since is signed anew, so that
    // agents can drop the old key once they have synced.
    let signer = state.signing.public_key().to_string();
    let signed_now = |row: &BundleRow| signer_of(&row.envelope).is_some_and(|key| key == signer);
    let fresh = |row: &BundleRow| {
        row.revision == revision && row.users_sha256 == users_sha256 && signed_now(row)
    };
    if let Some(row) = state.db.bundle(device_id)?
        && fresh(&row)
    {
        return Ok(row);
    }
    let _building = state.build.lock().await;
    let existing = state.db.bundle(device_id)?;
    if let Some(row) = &existing
        && fresh(row)
    {
        return Ok(row.clone());
    }
    let documents = state.db.documents_for(device_id, users)?;
    let key: Vec<(String, u64)> = documents
        .iter()
        .map(|d| (d.scope.to_string(), d.revision))
        .collect();
    let cached = state
        .merged
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .cloned();
    let merged = match cached {
        Some(merged) => merged,
        None => {
            let merged = tokio::task::spawn_blocking(move || merge::merge(documents))
                .await
                .map_err(|e| {
                    Failure::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        format!("merge failed: {e}"),
                    )
                })?
                .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e))?;
            let merged = Arc::new(merged);
            let mut cache = state.merged.lock().unwrap_or_else(|p| p.into_inner());
            // A handful of distinct document sets is the common case.
            if cache.len() >= 32 {
                cache.clear();
            }
            cache.insert(key, merged.clone());
            merged
        }
    };
    if let Some(row) = &existing
        && row.content_sha256 == merged.content_sha256
        && signed_now(row)
    {
        state.db.touch_bundle(device_id, revision, &users_sha256)?;
        return Ok(BundleRow {
            revision,
            users_sha256,
            ..row.clone()
        });
    }
    let version = existing.map_or(1, |row| row.version + 1);
    let payload = merge::bundle_payload(device_id, version, Timestamp::now(), &merged)
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let envelope = state
        .signing
        .sign_payload(SignedKind::PolicyBundle, payload);
    let row = BundleRow {
        version,
        content_sha256: merged.content_sha256.to_vec(),
        revision,
        users_sha256,
        envelope: serde_json::to_string(&envelope).map_err(|e| {
            Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?,
    };
    state.db.put_bundle(device_id, &row)?;
    tracing::info!(device_id, version, "bundle built");
    Ok(row)
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

// ---- agent handlers -------------------------------------------------

/// Enroll a device.
#[utoipa::path(post, path = "/api/v1/agent/enroll", tag = "agent", request_body = EnrollRequest,
    responses((status = 200, body = AgentCredentials), (status = 401, body = ApiErrorBody)))]
async fn enroll(
    State(state): State<Shared>,
    ApiJson(request): ApiJson<EnrollRequest>,
) -> ApiResult<Json<AgentCredentials>> {
    let credentials = state.db.enroll(&request)?;
    tracing::info!(
        device_id = request.device_id,
        agent_id = credentials.agent_id,
        "enrolled"
    );
    Ok(Json(credentials))
}

/// Check in: report, and learn what changed.
#[utoipa::path(post, path = "/api/v1/agent/checkin", tag = "agent", request_body = CheckinRequest,
    responses((status = 200, body = CheckinResponse), (status = 401, body = ApiErrorBody)), security(("bearer" = [])))]
async fn checkin(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    ApiJson(request): ApiJson<CheckinRequest>,
) -> ApiResult<Json<CheckinResponse>> {
    let audit_acked_seq = state.db.record_checkin(&agent, &request)?;
    state.db.mark_used(&agent, &request.used_requests)?;
    state.db.expire_requests(Timestamp::now())?;
    let bundle = current_bundle(&state, &agent.device_id, &request.users).await?;
    let mut requests = Vec::new();
    for id in request.pending_requests.iter().take(1000) {
        match state.db.request_status(&agent.agent_id, id) {
            Ok(status) if status.state != RequestState::Pending => requests.push(status),
            Ok(_) => {}
            Err(DbError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(CheckinResponse {
        policy: PolicyState {
            version: bundle.version,
            etag: etag(bundle.version),
            changed: request.policy_version != Some(bundle.version),
        },
        audit_acked_seq,
        requests,
        server_time: Timestamp::now(),
    }))
}

/// The device's signed policy bundle.
#[utoipa::path(get, path = "/api/v1/agent/policy", tag = "agent",
    params(("If-None-Match" = Option<String>, Header, description = "the ETag the agent has")),
    responses((status = 200, body = SignedEnvelope, description = "a signed PolicyBundle; ETag header"), (status = 304, description = "unchanged"), (status = 401, body = ApiErrorBody)),
    security(("bearer" = [])))]
async fn policy(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let bundle = current_bundle(&state, &agent.device_id, &agent.users).await?;
    let tag = etag(bundle.version);
    let tag_header = HeaderValue::from_str(&tag)
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag_header)]).into_response());
    }
    Ok((
        StatusCode::OK,
        [
            (header::ETAG, tag_header),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(epm_api::CONTENT_TYPE_JSON),
            ),
        ],
        bundle.envelope,
    )
        .into_response())
}

/// Upload audit records.
#[utoipa::path(post, path = "/api/v1/agent/audit", tag = "agent", request_body = AuditUpload,
    responses((status = 200, body = AuditAck), (status = 413, body = ApiErrorBody), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn upload_audit(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    ApiJson(upload): ApiJson<AuditUpload>,
) -> ApiResult<Json<AuditAck>> {
    #[derive(serde::Deserialize)]
    struct Head {
        seq: u64,
        #[serde(default)]
        decision: Option<serde_json::Value>,
    }
    let mut records = Vec::with_capacity(upload.records.len());
    for (index, raw) in upload.records.iter().enumerate() {
        let text = raw.get();
        let head: Head = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(_)) => serde_json::from_str(text).map_err(|e| {
                Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    format!("record {index}: {e}"),
                )
            })?,
            _ => {
                return Err(Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    format!("record {index} is not a JSON object; nothing was stored"),
                ));
            }
        };
        if head.seq == 0 {
            return Err(Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("record {index}: seq starts at 1"),
            ));
        }
        let decision = head.decision.and_then(|d| d.as_str().map(str::to_owned));
        records.push((head.seq, decision, text));
    }
    let (acked_seq, stored, duplicates) =
        state
            .db
            .store_audit(&agent, upload.oldest_kept_seq, &records)?;
    if stored > 0 {
        state.audit_arrived.notify_waiters();
    }
    Ok(Json(AuditAck {
        acked_seq,
        stored,
        duplicates,
    }))
}

/// What a request's identity may be: a digest for a program, or for an
/// admin-session entry the minutes asked for (what the grant will allow).
fn check_request_identity(
    identity: &epm_api::SubjectIdentity,
    section: epm_policy::Section,
    max_minutes: Option<u32>,
) -> Result<(), String> {
    let (kind, value) = (identity.kind.as_str(), identity.value.as_str());
    if section == epm_policy::Section::AdminSession {
        let minutes: u32 = match (kind, value.parse()) {
            ("admin_session", Ok(minutes)) => minutes,
            _ => {
                return Err(format!(
                    "an admin-session request's identity is admin_session:<minutes>, not {kind}:{value}"
                ));
            }
        };
        let max = max_minutes.unwrap_or(0);
        if minutes == 0 || minutes > max {
            return Err(format!("{minutes} minutes is outside 1..={max}"));
        }
        return Ok(());
    }
    let hex_len = match kind {
        "sha256" => 64,
        "cdhash" => 40,
        _ => return Err(format!("identity kind {kind:?}: sha256 or cdhash")),
    };
    if value.len() != hex_len
        || !value
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(format!(
            "a {kind} identity is {hex_len} lowercase hex digits"
        ));
    }
    Ok(())
}

/// Ask for approval.
#[utoipa::path(post, path = "/api/v1/agent/requests", tag = "agent", request_body = RequestSubmit,
    responses((status = 200, body = RequestStatus), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn submit_request(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    ApiJson(submit): ApiJson<RequestSubmit>,
) -> ApiResult<Json<RequestStatus>> {
    let invalid = |m: String| Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", m);
    let bundle = current_bundle(&state, &agent.device_id, &agent.users).await?;
    let envelope: SignedEnvelope =
        serde_json::from_str(&bundle.envelope).map_err(|e| invalid(e.to_string()))?;
    let opened: PolicyBundle = state
        .signing
        .public_key()
        .open(SignedKind::PolicyBundle, &envelope)
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let policy = epm_policy::Policy::from_json(opened.policy.get())
        .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let terms = policy.approval_terms(&submit.rule_id).ok_or_else(|| {
        invalid(format!(
            "rule {:?} is not in this device's policy (version {})",
            submit.rule_id, bundle.version
        ))
    })?;
    if !terms.requires_approval {
        return Err(invalid(format!(
            "rule {:?} does not require approval",
            submit.rule_id
        )));
    }
    let approval = terms.approval;
    terms
        .justification
        .check(&submit.justification)
        .map_err(|e| invalid(e.to_string()))?;
    let now = Timestamp::now();
    approval
        .check_window(submit.window.start, submit.window.end, now)
        .map_err(|e| invalid(e.to_string()))?;
    if submit.window.end <= now {
        return Err(invalid("the window has already ended".into()));
    }
    check_request_identity(&submit.subject.identity, terms.section, terms.max_minutes)
        .map_err(invalid)?;
    let levels: Vec<u32> = approval.levels.iter().map(|l| l.approvers).collect();
    let status = state
        .db
        .submit_request(&agent, &submit, &levels, approval.uses)?;
    tracing::info!(
        device_id = agent.device_id,
        request = status.id,
        rule = submit.rule_id,
        "request submitted"
    );
    Ok(Json(status))
}

/// One of this agent's requests.
#[utoipa::path(get, path = "/api/v1/agent/requests/{id}", tag = "agent", params(("id" = String, Path, description = "request id")),
    responses((status = 200, body = RequestStatus), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn agent_request(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<RequestStatus>> {
    state.db.expire_requests(Timestamp::now())?;
    Ok(Json(state.db.request_status(&agent.agent_id, &id)?))
}

// ---- admin handlers -------------------------------------------------

/// Who the token belongs to.
#[utoipa::path(get, path = "/api/v1/admin/whoami", tag = "admin", responses((status = 200, body = WhoAmI)), security(("bearer" = [])))]
async fn whoami(AdminAuth(admin): AdminAuth) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: admin.name,
        approver_level: admin.approver_level,
    })
}

/// Every admin.
#[utoipa::path(get, path = "/api/v1/admin/admins", tag = "admin", responses((status = 200, body = Vec<AdminInfo>)), security(("bearer" = [])))]
async fn list_admins(
    State(state): State<Shared>,
    _admin: AdminAuth,
) -> ApiResult<Json<Vec<AdminInfo>>> {
    Ok(Json(state.db.admins()?))
}

/// Create an admin.
#[utoipa::path(post, path = "/api/v1/admin/admins", tag = "admin", request_body = CreateAdmin,
    responses((status = 200, body = AdminCreated), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn create_admin(
    State(state): State<Shared>,
    _admin: AdminAuth,
    ApiJson(body): ApiJson<CreateAdmin>,
) -> ApiResult<Response> {
    let (admin, token) = state.db.create_admin(&body.name, body.approver_level)?;
    let detail = format!(
        "created admin {} (approver level {:?})",
        admin.name, admin.approver_level
    );
    Ok(with_detail(Json(AdminCreated { admin, token }), detail))
}

/// Create an enrollment token.
#[utoipa::path(post, path = "/api/v1/admin/enroll-tokens", tag = "admin", request_body = CreateEnrollToken,
    responses((status = 200, body = EnrollTokenCreated)), security(("bearer" = [])))]
async fn create_enroll_token(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    ApiJson(body): ApiJson<CreateEnrollToken>,
) -> ApiResult<Response> {
    let seconds = i64::try_from(body.expires_in_seconds)
        .ok()
        .filter(|s| (60..=366 * 86_400).contains(s))
        .ok_or_else(|| {
            Failure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                "expires_in_seconds: from 60 seconds to 366 days",
            )
        })?;
    let expires_at = Timestamp::now() + jiff::SignedDuration::from_secs(seconds);
    let token = state
        .db
        .create_enroll_token(body.uses, expires_at, &admin.name)?;
    let detail = format!(
        "enrollment token for {} devices, expires {expires_at}",
        body.uses
    );
    Ok(with_detail(
        Json(EnrollTokenCreated {
            token,
            uses: body.uses,
            expires_at,
        }),
        detail,
    ))
}

/// Enrolled devices.
#[utoipa::path(get, path = "/api/v1/admin/devices", tag = "admin", responses((status = 200, body = Vec<DeviceInfo>)), security(("bearer" = [])))]
async fn devices(
    State(state): State<Shared>,
    _admin: AdminAuth,
) -> ApiResult<Json<Vec<DeviceInfo>>> {
    Ok(Json(state.db.devices()?))
}

/// The bundle one device receives.
#[utoipa::path(get, path = "/api/v1/admin/devices/{device_id}/bundle", tag = "admin", params(("device_id" = String, Path, description = "device id")),
    responses((status = 200, body = SignedEnvelope), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn device_bundle(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Path(device_id): Path<String>,
) -> ApiResult<Response> {
    let device = state
        .db
        .devices()?
        .into_iter()
        .find(|d| d.device_id == device_id)
        .ok_or_else(|| {
            Failure::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no enrolled device {device_id:?}"),
            )
        })?;
    let users: Vec<LocalUser> = state
        .db
        .agent_by_device(&device.device_id)?
        .map(|a| a.users)
        .unwrap_or_default();
    let bundle = current_bundle(&state, &device_id, &users).await?;
    Ok((
        [(header::CONTENT_TYPE, epm_api::CONTENT_TYPE_JSON)],
        bundle.envelope,
    )
        .into_response())
}

/// Every policy document.
#[utoipa::path(get, path = "/api/v1/admin/policies", tag = "admin", responses((status = 200, body = Vec<PolicyEntry>)), security(("bearer" = [])))]
async fn list_policies(
    State(state): State<Shared>,
    _admin: AdminAuth,
) -> ApiResult<Json<Vec<PolicyEntry>>> {
    Ok(Json(state.db.policies()?))
}

fn parse_scope(text: &str) -> ApiResult<PolicyScope> {
    text.parse()
        .map_err(|e: String| Failure::new(StatusCode::BAD_REQUEST, "invalid_request", e))
}

/// Push a policy document for a scope.
#[utoipa::path(put, path = "/api/v1/admin/policies/{scope}", tag = "admin",
    params(("scope" = String, Path, description = "general, device:ID, user:NAME or group:NAME")),
    request_body(content = Object, description = "a policy document (docs/policy.md)"),
    responses((status = 200, body = PolicyPushed), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn put_policy(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(scope): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    require_json(&headers)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| {
            Failure::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "the policy is not UTF-8",
            )
        })?
        .to_owned();
    let (rules, warnings) = tokio::task::spawn_blocking({
        let text = text.clone();
        move || -> Result<(u64, Vec<String>), Failure> {
            let policy = epm_policy::Policy::from_json(&text).map_err(|errors| {
                let mut failure = Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_policy",
                    format!(
                        "the policy has {} problem(s); nothing was stored",
                        errors.errors().len()
                    ),
                );
                failure.error.details = errors.errors().iter().map(ToString::to_string).collect();
                failure
            })?;
            let warnings = policy.lint().iter().map(ToString::to_string).collect();
            Ok((policy.rules.len() as u64, warnings))
        }
    })
    .await
    .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let entry = state.db.put_policy(&scope, &text, rules, &admin.name)?;
    let detail = format!("pushed {scope} revision {} ({rules} rules)", entry.revision);
    Ok(with_detail(Json(PolicyPushed { entry, warnings }), detail))
}

/// A scope's policy document.
#[utoipa::path(get, path = "/api/v1/admin/policies/{scope}", tag = "admin", params(("scope" = String, Path, description = "general, device:ID, user:NAME or group:NAME")),
    responses((status = 200, body = Object), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn get_policy(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Path(scope): Path<String>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    let document = state.db.policy_document(&scope)?.ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no policy for {scope}"),
        )
    })?;
    Ok((
        [(header::CONTENT_TYPE, epm_api::CONTENT_TYPE_JSON)],
        document,
    )
        .into_response())
}

/// Delete a scope's policy document.
#[utoipa::path(delete, path = "/api/v1/admin/policies/{scope}", tag = "admin", params(("scope" = String, Path, description = "general, device:ID, user:NAME or group:NAME")),
    responses((status = 204), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn delete_policy(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Path(scope): Path<String>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    if !state.db.delete_policy(&scope)? {
        return Err(Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no policy for {scope}"),
        ));
    }
    Ok(with_detail(
        StatusCode::NO_CONTENT,
        format!("deleted {scope}"),
    ))
}

/// Requests, newest first.
#[utoipa::path(get, path = "/api/v1/admin/requests", tag = "admin", params(RequestQuery),
    responses((status = 200, body = Vec<AdminRequest>)), security(("bearer" = [])))]
async fn list_requests(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Query(query): Query<RequestQuery>,
) -> ApiResult<Json<Vec<AdminRequest>>> {
    state.db.expire_requests(Timestamp::now())?;
    Ok(Json(
        state.db.requests(query.state, query.device.as_deref())?,
    ))
}

/// One request.
#[utoipa::path(get, path = "/api/v1/admin/requests/{id}", tag = "admin", params(("id" = String, Path, description = "request id")),
    responses((status = 200, body = AdminRequest), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn get_request(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<Json<AdminRequest>> {
    state.db.expire_requests(Timestamp::now())?;
    Ok(Json(state.db.request(&id)?))
}

/// Approve at the caller's level.
#[utoipa::path(post, path = "/api/v1/admin/requests/{id}/approve", tag = "admin", params(("id" = String, Path, description = "request id")),
    responses((status = 200, body = AdminRequest), (status = 403, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn approve(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    state.db.expire_requests(Timestamp::now())?;
    let (request, done) = state.db.approve(&id, &admin)?;
    if done {
        let grant = Grant {
            request_id: request.id.clone(),
            device_id: request.device_id.clone(),
            user: request.user.clone(),
            identity: request.subject.identity.clone(),
            rule_id: request.rule_id.clone(),
            not_before: request.window.start,
            not_after: request.window.end,
            uses: state.db.request_uses(&id)?,
            issued_at: Timestamp::now(),
        };
        let envelope = state.signing.sign(SignedKind::Grant, &grant).map_err(|e| {
            Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        state.db.set_grant(&id, &envelope)?;
    }
    let detail = if done {
        format!("approved {id}: fully approved, grant issued")
    } else {
        format!(
            "approved {id} at level {}",
            admin.approver_level.unwrap_or(0)
        )
    };
    Ok(with_detail(Json(request), detail))
}

/// Deny (an approver of the waiting level).
#[utoipa::path(post, path = "/api/v1/admin/requests/{id}/deny", tag = "admin", params(("id" = String, Path, description = "request id")), request_body = DenyRequest,
    responses((status = 200, body = AdminRequest), (status = 403, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn deny(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DenyRequest>,
) -> ApiResult<Response> {
    if body.reason.trim().is_empty() {
        return Err(Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "a denial needs a reason the user will read",
        ));
    }
    state.db.expire_requests(Timestamp::now())?;
    let request = state.db.deny(&id, &admin, body.reason.trim())?;
    Ok(with_detail(
        Json(request),
        format!("denied {id}: {}", body.reason.trim()),
    ))
}

/// Revoke an approval.
#[utoipa::path(post, path = "/api/v1/admin/requests/{id}/revoke", tag = "admin", params(("id" = String, Path, description = "request id")), request_body = RevokeRequest,
    responses((status = 200, body = AdminRequest), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn revoke(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<RevokeRequest>,
) -> ApiResult<Response> {
    state.db.expire_requests(Timestamp::now())?;
    let request = state.db.revoke(&id, &admin, body.reason.as_deref())?;
    Ok(with_detail(Json(request), format!("revoked {id}")))
}

/// The fleet's audit; long poll with `wait`.
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "admin", params(AuditQuery),
    responses((status = 200, body = AuditPage)), security(("bearer" = [])))]
async fn fleet_audit(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Query(query): Query<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let wait = Duration::from_secs(u64::from(query.wait.unwrap_or(0).min(60)));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before the query, so an upload between the two wakes us.
        let arrived = state.audit_arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let rows = state.db.audit_after(
            query.after,
            query.device.as_deref(),
            query.decision.as_deref(),
            limit,
        )?;
        if !rows.is_empty() || wait.is_zero() || tokio::time::Instant::now() >= deadline {
            let next = rows
                .last()
                .map(|r| r.0)
                .or(query.after)
                .unwrap_or(state.db.audit_head()?);
            let records = rows
                .into_iter()
                .map(|(cursor, device_id, record)| {
                    Ok(FleetAuditRecord {
                        cursor,
                        device_id,
                        record: serde_json::value::RawValue::from_string(record).map_err(|e| {
                            Failure::new(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "internal",
                                e.to_string(),
                            )
                        })?,
                    })
                })
                .collect::<ApiResult<Vec<_>>>()?;
            return Ok(Json(AuditPage { records, next }));
        }
        let _ = tokio::time::timeout_at(deadline, arrived).await;
    }
}

/// The platform's own audit of admin calls.
#[utoipa::path(get, path = "/api/v1/admin/activity", tag = "admin", responses((status = 200, body = ActivityPage)), security(("bearer" = [])))]
async fn activity(State(state): State<Shared>, _admin: AdminAuth) -> ApiResult<Json<ActivityPage>> {
    Ok(Json(ActivityPage {
        entries: state.db.activity(1000)?,
    }))
}

/// Answer an offline challenge.
#[utoipa::path(post, path = "/api/v1/admin/offline-codes", tag = "admin", request_body = OfflineCodeRequest,
    responses((status = 200, body = OfflineCodeResponse), (status = 403, body = ApiErrorBody), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn offline_code(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    ApiJson(body): ApiJson<OfflineCodeRequest>,
) -> ApiResult<Response> {
    if admin.approver_level.is_none() {
        return Err(Failure::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} is not an approver", admin.name),
        ));
    }
    let challenge = OfflineChallenge::decode(&body.challenge).map_err(|e| {
        Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            e.to_string(),
        )
    })?;
    if challenge.device_id != body.device_id {
        return Err(Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!(
                "the challenge comes from device {:?}, not {:?}",
                challenge.device_id, body.device_id
            ),
        ));
    }
    let key = state.db.offline_key(&body.device_id)?;
    let code = challenge.code(&key);
    let detail = format!(
        "offline code for {} on {}: rule {}, {} {}, {}..{}",
        challenge.user,
        challenge.device_id,
        challenge.rule_id,
        challenge.identity.kind,
        challenge.identity.value,
        challenge.not_before,
        challenge.not_after
    );
    Ok(with_detail(
        Json(OfflineCodeResponse {
            code,
            device_id: challenge.device_id,
            user: challenge.user,
            identity: challenge.identity,
            rule_id: challenge.rule_id,
            window: Window {
                start: challenge.not_before,
                end: challenge.not_after,
            },
        }),
        detail,
    ))
}

async fn health() -> &'static str {
    "ok"
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> Failure {
    Failure::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /api/v1/openapi.json",
    )
}

async fn method_not_allowed() -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /api/v1/openapi.json",
    )
}

/// The OpenAPI document, generated from the handlers and types above.
#[derive(OpenApi, Debug)]
#[openapi(
    info(title = "EPM platform API", description = "Agents and admins of the EPM reference platform. See docs/api.md."),
    paths(enroll, checkin, policy, upload_audit, submit_request, agent_request, whoami, list_admins, create_admin,
        create_enroll_token, devices, device_bundle, list_policies, put_policy, get_policy, delete_policy, list_requests,
        get_request, approve, deny, revoke, fleet_audit, activity, offline_code),
    modifiers(&BearerAuth),
    tags((name = "agent", description = "Called by epmd"), (name = "admin", description = "Called by admins and epm-platform's CLI"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The HTTP routes: exactly [`paths::ALL`].
pub fn router(state: Shared) -> Router {
    Router::new()
        .route(paths::HEALTH, get(health))
        .route(paths::OPENAPI, get(openapi_json))
        .route(paths::AGENT_ENROLL, post(enroll))
        .route(paths::AGENT_CHECKIN, post(checkin))
        .route(paths::AGENT_POLICY, get(policy))
        .route(
            paths::AGENT_AUDIT,
            post(upload_audit).layer(DefaultBodyLimit::max(epm_api::MAX_AUDIT_UPLOAD_BYTES)),
        )
        .route(paths::AGENT_REQUESTS, post(submit_request))
        .route(paths::AGENT_REQUEST, get(agent_request))
        .route(paths::ADMIN_WHOAMI, get(whoami))
        .route(paths::ADMIN_ADMINS, get(list_admins).post(create_admin))
        .route(paths::ADMIN_ENROLL_TOKENS, post(create_enroll_token))
        .route(paths::ADMIN_DEVICES, get(devices))
        .route(paths::ADMIN_DEVICE_BUNDLE, get(device_bundle))
        .route(paths::ADMIN_POLICIES, get(list_policies))
        .route(
            paths::ADMIN_POLICY,
            put(put_policy)
                .layer(DefaultBodyLimit::max(epm_api::MAX_POLICY_PUSH_BYTES))
                .get(get_policy)
                .delete(delete_policy),
        )
        .route(paths::ADMIN_REQUESTS, get(list_requests))
        .route(paths::ADMIN_REQUEST, get(get_request))
        .route(paths::ADMIN_REQUEST_APPROVE, post(approve))
        .route(paths::ADMIN_REQUEST_DENY, post(deny))
        .route(paths::ADMIN_REQUEST_REVOKE, post(revoke))
        .route(paths::ADMIN_AUDIT, get(fleet_audit))
        .route(paths::ADMIN_ACTIVITY, get(activity))
        .route(paths::ADMIN_OFFLINE_CODES, post(offline_code))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(epm_api::MAX_JSON_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_activity,
        ))
        // Bodies must arrive in time (a slow-loris upload), and no call may
        // hold a connection past the longest long poll by much.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            Duration::from_secs(30),
        ))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(90),
        ))
        .with_state(state)
}

/// Expires requests whose window ended, every 30 s.
pub fn spawn_expiry(state: Shared) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        loop {
            tick.tick().await;
            match state.db.expire_requests(Timestamp::now()) {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} request(s) expired"),
                Err(e) => tracing::error!("expiring requests: {e}"),
            }
        }
    });
}

/// Serves HTTPS on `listen` until `shutdown` resolves.
pub async fn serve(
    state: Shared,
    listen: SocketAddr,
    tls: axum_server::tls_rustls::RustlsConfig,
    handle: axum_server::Handle,
) -> std::io::Result<()> {
    spawn_expiry(state.clone());
    let app = router(state);
    let mut server = axum_server::bind_rustls(listen, tls).handle(handle);
    // A client must send its headers within 10 s (slow-loris).
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    server.serve(app.into_make_service()).await
}
