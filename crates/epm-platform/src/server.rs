//! The HTTPS API: routes, authentication, errors, and the work behind each
//! call. Handlers are thin; the database ([`crate::db`]) and the merge
//! ([`crate::merge`]) hold the logic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use epm_api::admin::{
    ActivityPage, ActivityQuery, AdminCreated, AdminInfo, AdminRequest, AuditPage, AuditQuery,
    CreateAdmin, CreateEnrollToken, DenyRequest, DeviceInfo, EnrollTokenCreated, EnrollTokenInfo,
    FleetAuditRecord, OfflineCodeRequest, OfflineCodeResponse, PolicyEntry, PolicyPushed,
    PolicyScope, RequestQuery, RevokeRequest, SetPassword, UpdateAdmin, WhoAmI,
};
use epm_api::agent::{
    AgentCredentials, AuditAck, AuditUpload, CheckinRequest, CheckinResponse, EnrollRequest,
    LocalUser, MAX_REQUEST_WAIT_SECONDS, PolicyState, RequestChange, RequestState, RequestStatus,
    RequestSubject, RequestSubmit, RequestWait, RequestWaitResponse, Window,
};
use epm_api::offline::OfflineChallenge;
use epm_api::sign::{PolicySigningKey, SignedKind};
use epm_api::validate::{self, Validate};
use epm_api::{ApiError, ApiErrorBody, Grant, PolicyBundle, SignedEnvelope, paths};
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use utoipa::OpenApi;

use crate::db::{
    Actor, Admin, Agent, BundleHead, BundleRow, CurrentTerms, Db, DbError, Enrollment, Narrowing,
    TokenOwner,
};
use crate::limits::{ConnectionGate, Limits, Rates, RefusedLog};
use crate::merge::{self, Merged};
use crate::roles::Capability;

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
    /// What the server bounds.
    pub limits: Limits,
    rates: Rates,
    /// Refused calls, counted for the activity log.
    pub(crate) refused: RefusedLog,
    /// The web console's sessions and sign-in limits.
    pub console: crate::console::ConsoleState,
    audit_arrived: Notify,
    /// Agents long-polling on their pending requests.
    request_waiters: Arc<RequestWaiters>,
    merged: MergeCache,
    build: tokio::sync::Mutex<()>,
}

impl AppState {
    /// State over an opened database and key, with the default limits.
    pub fn new(db: Db, signing: PolicySigningKey) -> Arc<AppState> {
        AppState::with_limits(db, signing, Limits::default())
    }

    /// State with these limits.
    pub fn with_limits(db: Db, signing: PolicySigningKey, limits: Limits) -> Arc<AppState> {
        let max_waiters = limits.max_connections / 2;
        let state = Arc::new(AppState {
            db,
            signing,
            rates: Rates::new(&limits),
            console: crate::console::ConsoleState::new(&limits),
            limits,
            refused: RefusedLog::default(),
            audit_arrived: Notify::new(),
            // Half the connections at most: the rest stay for check-ins,
            // uploads and admins.
            request_waiters: Arc::new(RequestWaiters::new(max_waiters)),
            merged: Mutex::new(HashMap::new()),
            build: tokio::sync::Mutex::new(()),
        });
        // Audit uploaded and requests decided on another instance wake this
        // one's waiters too (and on SQLite, request changes of this one).
        let weak = Arc::downgrade(&state);
        state
            .db
            .listen(Arc::new(move |channel: &str, payload: &str| {
                let Some(state) = weak.upgrade() else { return };
                match (channel, payload) {
                    ("requests", "") => state.request_waiters.wake_all(),
                    ("requests", agent_id) => state.request_waiters.wake(agent_id),
                    _ => state.audit_arrived.notify_waiters(),
                }
            }));
        state
    }

    /// At most `max` agents long-polling on their requests at once on this
    /// instance (default: half of [`Limits::max_connections`]).
    pub fn set_max_request_waiters(&self, max: usize) {
        self.request_waiters.max.store(max, Ordering::Relaxed);
    }
}

/// The agents waiting on `POST /agent/requests/wait` on this instance, one
/// wait per agent, each with what wakes it.
#[derive(Debug)]
struct RequestWaiters {
    waiting: Mutex<HashMap<String, RequestWaiter>>,
    next: AtomicU64,
    max: AtomicUsize,
}

#[derive(Debug, Clone)]
struct RequestWaiter {
    /// Tells this wait apart from a newer one of the same agent.
    serial: u64,
    wake: Arc<Notify>,
    replaced: Arc<AtomicBool>,
}

/// Why a wait was not registered.
enum WaitRefused {
    Full(usize),
}

impl RequestWaiters {
    fn new(max: usize) -> RequestWaiters {
        RequestWaiters {
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            max: AtomicUsize::new(max),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RequestWaiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `agent_id`'s wait, replacing (and waking) an older one of
    /// the same agent: a replaced wait is most often one whose client went
    /// away unnoticed (the agent restarted, its network changed), which
    /// must not lock the agent out until it times out.
    fn register(self: &Arc<Self>, agent_id: &str) -> Result<WaitGuard, WaitRefused> {
        let mut waiting = self.lock();
        let max = self.max.load(Ordering::Relaxed);
        if !waiting.contains_key(agent_id) && waiting.len() >= max {
            return Err(WaitRefused::Full(max));
        }
        let waiter = RequestWaiter {
            serial: self.next.fetch_add(1, Ordering::Relaxed),
            wake: Arc::new(Notify::new()),
            replaced: Arc::new(AtomicBool::new(false)),
        };
        if let Some(old) = waiting.insert(agent_id.to_owned(), waiter.clone()) {
            old.replaced.store(true, Ordering::SeqCst);
            old.wake.notify_one();
        }
        Ok(WaitGuard {
            waiters: self.clone(),
            agent_id: agent_id.to_owned(),
            waiter,
        })
    }

    /// One of `agent_id`'s requests changed.
    fn wake(&self, agent_id: &str) {
        if let Some(waiter) = self.lock().get(agent_id) {
            // A permit is kept if the wait is between its read and its
            // sleep, so the change is not missed.
            waiter.wake.notify_one();
        }
    }

    /// Anything may have changed (the listener reconnected).
    fn wake_all(&self) {
        for waiter in self.lock().values() {
            waiter.wake.notify_one();
        }
    }
}

/// A registered wait; unregisters on drop (an answer, or a client gone).
struct WaitGuard {
    waiters: Arc<RequestWaiters>,
    agent_id: String,
    waiter: RequestWaiter,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let mut waiting = self.waiters.lock();
        if waiting
            .get(&self.agent_id)
            .is_some_and(|w| w.serial == self.waiter.serial)
        {
            waiting.remove(&self.agent_id);
        }
    }
}

type Shared = Arc<AppState>;

// ---- errors ---------------------------------------------------------

/// A failed call: a status and the JSON error body.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    error: ApiError,
    retry_after: Option<Duration>,
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
            retry_after: None,
        }
    }

    /// The status and the message, for another front end (the console).
    pub(crate) fn parts(self) -> (StatusCode, String) {
        let mut message = self.error.message;
        for detail in self.error.details {
            message.push_str("; ");
            message.push_str(&detail);
        }
        (self.status, message)
    }

    fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    fn internal(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// 429, with `Retry-After` when waiting helps.
    fn rate_limited(message: impl Into<String>, retry_after: Option<Duration>) -> Failure {
        Failure {
            retry_after,
            ..Failure::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ApiErrorBody { error: self.error })).into_response();
        if let Some(wait) = self.retry_after
            && let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<validate::Invalid> for Failure {
    fn from(e: validate::Invalid) -> Failure {
        Failure::invalid(e.to_string())
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
            DbError::Sql(e) => {
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

/// A JSON body, checked by [`Validate`]; every rejection is an
/// [`ApiErrorBody`].
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Validate> FromRequest<S> for ApiJson<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => {
                value.validate()?;
                Ok(ApiJson(value))
            }
            Err(rejection) => Err(json_failure(&rejection)),
        }
    }
}

/// A query string, checked by [`Validate`]; every rejection is an
/// [`ApiErrorBody`].
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Validate> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Failure> {
        let Query(value) = Query::<T>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| Failure::invalid(rejection.body_text()))?;
        value.validate()?;
        Ok(ApiQuery(value))
    }
}

/// A path parameter (an id or a name), checked like any other name.
fn path_name(field: &str, value: &str) -> ApiResult<()> {
    Ok(validate::name(field, value, validate::MAX_NAME_BYTES)?)
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

/// The client's address, when the server knows it.
fn client_ip(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip())
}

/// Takes one call from `who`'s allowance (`admin:NAME`, `agent:ID`).
fn identity_rate(state: &Shared, who: String) -> ApiResult<()> {
    state.rates.identity.take(&who, 1).map_err(|wait| {
        Failure::rate_limited(
            format!(
                "{who} is over its rate of {} calls per second; slow down",
                state.limits.calls_per_second_per_identity
            ),
            wait,
        )
    })
}

/// The admin calling: an enabled admin within its call rate.
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
        match state.db.admin_by_token(token)? {
            Some(TokenOwner::Admin(admin)) => {
                identity_rate(state, format!("admin:{}", admin.name))?;
                Ok(AdminAuth(admin))
            }
            Some(TokenOwner::Disabled(name)) => Err(Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("admin {name} is disabled"),
            )),
            None => Err(Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown admin token",
            )),
        }
    }
}

/// The agent calling, within its call rate.
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
        let agent = state.db.agent_by_bearer(token)?.ok_or_else(|| {
            Failure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown, replaced or reset agent credentials: enroll the agent again",
            )
        })?;
        identity_rate(state, format!("agent:{}", agent.agent_id))?;
        Ok(AgentAuth(agent))
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

/// Bytes of a path kept in an activity entry.
const MAX_ACTIVITY_PATH: usize = 200;

/// Records every admin call: an authenticated admin's one by one, refused
/// anonymous ones (no, unknown or disabled token) and calls over a rate
/// counted per source and hour ([`RefusedLog`]).
async fn record_activity(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if !path.starts_with("/api/v1/admin/") {
        return next.run(request).await;
    }
    let method = request.method().to_string();
    let source = client_ip(request.extensions());
    let owner = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|token| state.db.admin_by_token(token.trim()).ok().flatten());
    let response = next.run(request).await;
    let status = response.status();
    let counted = matches!(
        status,
        StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
    );
    match owner {
        Some(TokenOwner::Admin(admin)) if !counted => {
            let detail = response
                .extensions()
                .get::<ActivityDetail>()
                .map(|d| d.0.clone());
            let call = crate::limits::call_text(&method, &path, MAX_ACTIVITY_PATH);
            if let Err(e) =
                state
                    .db
                    .record_activity(&admin.name, &call, status.as_u16(), detail.as_deref())
            {
                tracing::error!("cannot record admin activity {call}: {e}");
            }
        }
        Some(TokenOwner::Admin(admin)) => {
            state
                .refused
                .note(source, &admin.name, &method, &path, status.as_u16())
        }
        Some(TokenOwner::Disabled(name)) => state.refused.note(
            source,
            &format!("disabled:{name}"),
            &method,
            &path,
            status.as_u16(),
        ),
        None => state
            .refused
            .note(source, "anonymous", &method, &path, status.as_u16()),
    }
    response
}

/// Refuses a client over its call rate (per address) before any work.
async fn limit_rate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Some(ip) = client_ip(request.extensions())
        && let Err(wait) = state.rates.client.take(&crate::limits::client_of(ip), 1)
    {
        state.refused.note(
            Some(ip),
            "over the client rate",
            request.method().as_str(),
            request.uri().path(),
            StatusCode::TOO_MANY_REQUESTS.as_u16(),
        );
        return Failure::rate_limited(
            format!(
                "this address is over its rate of {} calls per second",
                state.limits.calls_per_second_per_client
            ),
            wait,
        )
        .into_response();
    }
    next.run(request).await
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

/// The device's current bundle without its envelope: what a check-in and
/// a policy fetch with the current ETag need. When the stored bundle is
/// current and its signer column is known, only the head is read, so an
/// unchanged bundle costs no envelope read (no TOAST decompression on
/// PostgreSQL) and no JSON parse; otherwise as [`current_bundle`].
async fn current_head(
    state: &Shared,
    device_id: &str,
    users: &[LocalUser],
) -> ApiResult<BundleHead> {
    let revision = state.db.policy_revision()?;
    let users_sha256 = users_hash(users);
    let signer = state.signing.public_key().to_string();
    if let Some(head) = state.db.bundle_head(device_id)?
        && head.revision == revision
        && head.users_sha256 == users_sha256
        && head.signer.as_deref() == Some(signer.as_str())
    {
        return Ok(head);
    }
    // Stale, absent, or signed by a key only the envelope tells (a row
    // from before the signer column): the full path decides.
    let row = bundle_at(state, device_id, users, revision, users_sha256, &signer).await?;
    Ok(BundleHead {
        version: row.version,
        content_sha256: row.content_sha256,
        revision: row.revision,
        users_sha256: row.users_sha256,
        signer: row.signer,
    })
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
    let signer = state.signing.public_key().to_string();
    bundle_at(state, device_id, users, revision, users_sha256, &signer).await
}

/// [`current_bundle`] for a policy `revision`, users hash and signing key.
async fn bundle_at(
    state: &Shared,
    device_id: &str,
    users: &[LocalUser],
    revision: u64,
    users_sha256: Vec<u8>,
    signer: &str,
) -> ApiResult<BundleRow> {
    // A bundle signed with a key rotated out since is signed anew, so that
    // agents can drop the old key once they have synced. The signer column
    // says which key; a row from before it (NULL) is asked its envelope,
    // and the answer recorded so that later check-ins read only the head.
    let signed_now = |row: &BundleRow| match &row.signer {
        Some(key) => key == signer,
        None => signer_of(&row.envelope).is_some_and(|key| key == signer),
    };
    let fresh = |row: &BundleRow| {
        row.revision == revision && row.users_sha256 == users_sha256 && signed_now(row)
    };
    let recorded = |row: BundleRow| -> ApiResult<BundleRow> {
        if row.signer.is_some() {
            return Ok(row);
        }
        state
            .db
            .note_bundle_signer(device_id, row.version, signer)?;
        Ok(BundleRow {
            signer: Some(signer.to_owned()),
            ..row
        })
    };
    if let Some(row) = state.db.bundle(device_id)?
        && fresh(&row)
    {
        return recorded(row);
    }
    let _building = state.build.lock().await;
    let existing = state.db.bundle(device_id)?;
    if let Some(row) = &existing
        && fresh(row)
    {
        return recorded(row.clone());
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
    // Then the database's: another instance may have merged this set.
    let key_sha256 = documents_key(&key);
    let cached = match cached {
        Some(merged) => Some(merged),
        None => state
            .db
            .merged_policy(&key_sha256)?
            .and_then(|text| serde_json::from_str::<Merged>(&text).ok())
            .map(Arc::new),
    };
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
            if let Ok(text) = serde_json::to_string(&merged) {
                state.db.put_merged_policy(&key_sha256, &text)?;
            }
            let merged = Arc::new(merged);
            let mut cache = state.merged.lock().unwrap_or_else(|p| p.into_inner());
            // A handful of distinct document sets is the common case.
            if cache.len() >= 32 {
                cache.clear();
            }
            cache.insert(key.clone(), merged.clone());
            merged
        }
    };
    {
        let mut cache = state.merged.lock().unwrap_or_else(|p| p.into_inner());
        if !cache.contains_key(&key) {
            if cache.len() >= 32 {
                cache.clear();
            }
            cache.insert(key, merged.clone());
        }
    }
    if let Some(row) = &existing
        && row.content_sha256 == merged.content_sha256
        && signed_now(row)
    {
        state.db.touch_bundle(device_id, revision, &users_sha256)?;
        return recorded(BundleRow {
            revision,
            users_sha256,
            ..row.clone()
        });
    }
    let previous = existing.as_ref().map(|row| row.version);
    let version = previous.map_or(1, |v| v + 1);
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
        signer: Some(signer.to_owned()),
    };
    if !state.db.put_bundle(device_id, &row, previous)? {
        // Another instance built this device's bundle meanwhile: serve
        // that one, so a version has one envelope whichever instance
        // answers.
        return state.db.bundle(device_id)?.ok_or_else(|| {
            Failure::internal(format!("the bundle of {device_id} vanished while building"))
        });
    }
    tracing::info!(device_id, version, "bundle built");
    Ok(row)
}

/// The database key of a merged document set: SHA-256 over each
/// document's scope and revision.
fn documents_key(key: &[(String, u64)]) -> Vec<u8> {
    let mut hash = Sha256::new();
    for (scope, revision) in key {
        hash.update((scope.len() as u64).to_be_bytes());
        hash.update(scope.as_bytes());
        hash.update(revision.to_be_bytes());
    }
    hash.finalize().to_vec()
}

fn etag(version: u64) -> String {
    format!("\"{version}\"")
}

// ---- agent handlers -------------------------------------------------

/// Enroll a device. A device id already enrolled is taken only with its
/// current credentials (as the bearer) or after an admin reset it.
#[utoipa::path(post, path = "/api/v1/agent/enroll", tag = "agent", request_body = EnrollRequest,
    responses((status = 200, body = AgentCredentials), (status = 401, body = ApiErrorBody), (status = 409, body = ApiErrorBody, description = "the device is enrolled: show its credentials or have it reset")))]
async fn enroll(
    State(state): State<Shared>,
    ConnectInfoOpt(source): ConnectInfoOpt,
    headers: HeaderMap,
    ApiJson(request): ApiJson<EnrollRequest>,
) -> ApiResult<Json<AgentCredentials>> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let who = format!("device:{}", request.device_id);
    let (credentials, how) = match state.db.enroll(&request, presented) {
        Ok(done) => done,
        Err(e) => {
            // Refusals are counted, not logged one by one: a flood of them
            // must not push real entries out.
            let refused = match &e {
                DbError::Conflict(_) => Some(StatusCode::CONFLICT.as_u16()),
                DbError::Unauthorized(_) => Some(StatusCode::UNAUTHORIZED.as_u16()),
                _ => None,
            };
            if let Some(code) = refused {
                state
                    .refused
                    .note(source, &who, "POST", paths::AGENT_ENROLL, code);
                tracing::warn!(device_id = request.device_id, "enrollment refused: {e}");
            }
            return Err(e.into());
        }
    };
    let how = match how {
        Enrollment::New => "new device".to_owned(),
        Enrollment::Renewed => "enrolled again with its current credentials".to_owned(),
        Enrollment::AfterReset { by } => format!("enrolled again after {by} reset it"),
    };
    let detail = format!(
        "device {} enrolled as agent {} ({how}) from {}; host {}, {}, agent {}",
        request.device_id,
        credentials.agent_id,
        source.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()),
        request.hostname,
        request.os,
        request.agent_version
    );
    if let Err(e) = state.db.record_activity(
        &who,
        &format!("POST {}", paths::AGENT_ENROLL),
        200,
        Some(&detail),
    ) {
        tracing::error!("cannot record an enrollment: {e}");
    }
    tracing::info!(
        device_id = request.device_id,
        agent_id = credentials.agent_id,
        "enrolled ({how})"
    );
    Ok(Json(credentials))
}

/// The client's address as an extractor (absent when the server was not
/// started with connection info, as in unit tests of the router).
#[derive(Debug)]
struct ConnectInfoOpt(Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ConnectInfoOpt {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ConnectInfoOpt(client_ip(&parts.extensions)))
    }
}

/// Rotate the agent's secret: a new one for the same agent id and offline
/// key. The current secret works until the new one is first used.
#[utoipa::path(post, path = "/api/v1/agent/credentials/rotate", tag = "agent",
    responses((status = 200, body = AgentCredentials), (status = 401, body = ApiErrorBody)), security(("bearer" = [])))]
async fn rotate_agent(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
) -> ApiResult<Json<AgentCredentials>> {
    let credentials = state.db.rotate_agent_secret(&agent)?;
    if let Err(e) = state.db.record_activity(
        &format!("device:{}", agent.device_id),
        &format!("POST {}", paths::AGENT_ROTATE),
        200,
        Some(&format!("agent {} rotated its secret", agent.agent_id)),
    ) {
        tracing::error!("cannot record a secret rotation: {e}");
    }
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
    let bundle = current_head(&state, &agent.device_id, &request.users).await?;
    let mut requests = Vec::new();
    for id in &request.pending_requests {
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
    // The ETag is the version: an agent that has it is answered from the
    // head alone.
    let head = current_head(&state, &agent.device_id, &agent.users).await?;
    let matches = |tag: &str| {
        headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim() == tag))
    };
    let tag = etag(head.version);
    if matches(&tag) {
        let tag_header =
            HeaderValue::from_str(&tag).map_err(|e| Failure::internal(e.to_string()))?;
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, tag_header)]).into_response());
    }
    // The envelope, with the ETag of the version it is (another instance
    // may have built a newer one since the head was read).
    let bundle = current_bundle(&state, &agent.device_id, &agent.users).await?;
    let tag = etag(bundle.version);
    let tag_header = HeaderValue::from_str(&tag).map_err(|e| Failure::internal(e.to_string()))?;
    if matches(&tag) {
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

/// Upload audit records: at most 1000 in one call, and per agent at most
/// the hourly quotas of records and bytes (429 with `Retry-After` past
/// them; nothing is stored, the agent sends them again later).
#[utoipa::path(post, path = "/api/v1/agent/audit", tag = "agent", request_body = AuditUpload,
    responses((status = 200, body = AuditAck), (status = 413, body = ApiErrorBody), (status = 422, body = ApiErrorBody), (status = 429, body = ApiErrorBody)), security(("bearer" = [])))]
async fn upload_audit(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    ConnectInfoOpt(source): ConnectInfoOpt,
    ApiJson(upload): ApiJson<AuditUpload>,
) -> ApiResult<Json<AuditAck>> {
    #[derive(serde::Deserialize)]
    struct Head {
        seq: u64,
        #[serde(default)]
        decision: Option<serde_json::Value>,
    }
    let mut records = Vec::with_capacity(upload.records.len());
    let mut bytes: u64 = 0;
    for (index, raw) in upload.records.iter().enumerate() {
        let text = raw.get();
        bytes += text.len() as u64;
        let head: Head = match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(_)) => serde_json::from_str(text)
                .map_err(|e| Failure::invalid(format!("record {index}: {e}")))?,
            _ => {
                return Err(Failure::invalid(format!(
                    "record {index} is not a JSON object; nothing was stored"
                )));
            }
        };
        if head.seq == 0 {
            return Err(Failure::invalid(format!("record {index}: seq starts at 1")));
        }
        validate::integer(&format!("records[{index}].seq"), head.seq)?;
        // Only a short decision is indexed for filtering.
        let decision = head
            .decision
            .and_then(|d| d.as_str().map(str::to_owned))
            .filter(|d| d.len() <= 64);
        records.push((head.seq, decision, text));
    }
    let key = agent.agent_id.clone();
    let over = |what: &str, limit: u64, wait: Option<Duration>| {
        state.refused.note(
            source,
            &format!("device:{}", agent.device_id),
            "POST",
            paths::AGENT_AUDIT,
            StatusCode::TOO_MANY_REQUESTS.as_u16(),
        );
        Failure::rate_limited(
            format!(
                "audit quota: this agent may upload {limit} {what} per hour; nothing was stored, send them again later"
            ),
            wait,
        )
    };
    state
        .rates
        .audit_records
        .take(&key, u32::try_from(records.len()).unwrap_or(u32::MAX))
        .map_err(|wait| over("records", state.limits.audit_records_per_hour.into(), wait))?;
    let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
    state
        .rates
        .audit_kib
        .take(&key, kib)
        .map_err(|wait| over("MiB", state.limits.audit_mib_per_hour.into(), wait))?;
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

/// A rule as the device's current bundle has it.
struct RuleNow {
    terms: epm_policy::ApprovalTerms,
    bundle_version: u64,
}

/// The policy `device_id`'s current bundle holds, and the bundle's
/// version: the outer error is the platform failing, the inner one that
/// the device is not enrolled.
async fn device_policy(
    state: &Shared,
    device_id: &str,
    users: Option<&[LocalUser]>,
) -> ApiResult<Result<(epm_policy::Policy, u64), String>> {
    let agent_users;
    let users = match users {
        Some(users) => users,
        None => match state.db.agent_by_device(device_id)? {
            Some(agent) => {
                agent_users = agent.users;
                &agent_users
            }
            None => return Ok(Err(format!("device {device_id:?} is not enrolled"))),
        },
    };
    let bundle = current_bundle(state, device_id, users).await?;
    let envelope: SignedEnvelope =
        serde_json::from_str(&bundle.envelope).map_err(|e| Failure::internal(e.to_string()))?;
    let opened: PolicyBundle = state
        .signing
        .public_key()
        .open(SignedKind::PolicyBundle, &envelope)
        .map_err(|e| Failure::internal(e.to_string()))?;
    let policy = epm_policy::Policy::from_json(opened.policy.get())
        .map_err(|e| Failure::internal(e.to_string()))?;
    Ok(Ok((policy, bundle.version)))
}

/// The approval terms of `rule_id` in `device_id`'s current bundle: the
/// outer error is the platform failing, the inner one why the rule cannot
/// be approved (not in the policy, not an approval rule, no such device).
async fn rule_now(
    state: &Shared,
    device_id: &str,
    users: Option<&[LocalUser]>,
    rule_id: &str,
) -> ApiResult<Result<RuleNow, String>> {
    let (policy, version) = match device_policy(state, device_id, users).await? {
        Ok(found) => found,
        Err(why) => return Ok(Err(why)),
    };
    Ok(match policy.approval_terms(rule_id) {
        None => Err(format!(
            "rule {rule_id:?} is not in device {device_id}'s policy (version {version})"
        )),
        Some(terms) if !terms.requires_approval => Err(format!(
            "rule {rule_id:?} does not require approval in device {device_id}'s policy (version {version})"
        )),
        Some(terms) => Ok(RuleNow {
            terms,
            bundle_version: version,
        }),
    })
}

/// The message of `rule_id` (a rule, elevation rule or admin-session
/// entry) in `device_id`'s current policy, for the console's request page;
/// `None` when it has none or is no longer there.
pub(crate) async fn rule_message(
    state: &Shared,
    device_id: &str,
    rule_id: &str,
) -> ApiResult<Option<String>> {
    let Ok((policy, _)) = device_policy(state, device_id, None).await? else {
        return Ok(None);
    };
    Ok(policy
        .rules
        .iter()
        .find(|r| r.id == rule_id)
        .and_then(|r| r.message.clone())
        .or_else(|| {
            policy
                .elevation
                .iter()
                .find(|r| r.id == rule_id)
                .and_then(|r| r.message.clone())
        })
        .or_else(|| {
            policy
                .admin_session
                .iter()
                .find(|r| r.id == rule_id)
                .and_then(|r| r.message.clone())
        }))
}

/// A window as the rule and the platform allow it: ending after it starts,
/// at most the rule's `max_window_hours` long, not ended, and starting at
/// most [`Limits::max_window_lead`] ahead. A new request's window (`fresh`)
/// must not start in the past either; one approved later, or read from an
/// offline challenge, may have started.
fn check_window(
    state: &Shared,
    approval: &epm_policy::ApprovalSpec,
    start: Timestamp,
    end: Timestamp,
    fresh: bool,
) -> Result<(), String> {
    let now = Timestamp::now();
    if fresh {
        approval
            .check_window(start, end, now)
            .map_err(|e| e.to_string())?;
    } else if end <= start {
        return Err("the window ends before it starts".into());
    } else if start.duration_until(end)
        > jiff::SignedDuration::from_hours(i64::from(approval.max_window_hours))
    {
        return Err(format!(
            "the window is longer than the rule's {} hours",
            approval.max_window_hours
        ));
    }
    if end <= now {
        return Err("the window has already ended".into());
    }
    let lead = jiff::SignedDuration::try_from(state.limits.max_window_lead)
        .unwrap_or(jiff::SignedDuration::MAX);
    if start > now + lead {
        return Err(format!(
            "the window starts more than {} days ahead (the platform's limit)",
            state.limits.max_window_lead.as_secs() / 86_400
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
    let rule = rule_now(
        &state,
        &agent.device_id,
        Some(&agent.users),
        &submit.rule_id,
    )
    .await?
    .map_err(Failure::invalid)?;
    let terms = rule.terms;
    terms
        .justification
        .check(&submit.justification)
        .map_err(|e| Failure::invalid(e.to_string()))?;
    check_window(
        &state,
        &terms.approval,
        submit.window.start,
        submit.window.end,
        true,
    )
    .map_err(Failure::invalid)?;
    check_request_identity(&submit.subject.identity, terms.section, terms.max_minutes)
        .map_err(Failure::invalid)?;
    let levels: Vec<u32> = terms.approval.levels.iter().map(|l| l.approvers).collect();
    let status = state
        .db
        .submit_request(&agent, &submit, &levels, terms.approval.uses)?;
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
    path_name("id", &id)?;
    state.db.expire_requests(Timestamp::now())?;
    Ok(Json(state.db.request_status(&agent.agent_id, &id)?))
}

/// Waits until one of the agent's named pending requests is decided (or
/// expires, or is revoked), or one of its named grants is no longer
/// approved (revoked, expired), on whichever instance, or `wait_seconds`
/// pass.
#[utoipa::path(post, path = "/api/v1/agent/requests/wait", tag = "agent", request_body = RequestWait,
    responses((status = 200, body = RequestWaitResponse, description = "the named requests no longer pending and grants no longer approved; empty when the wait ended without one"),
        (status = 409, body = ApiErrorBody, description = "a newer wait of the same agent replaced this one"),
        (status = 413, body = ApiErrorBody), (status = 422, body = ApiErrorBody, description = "too many ids, or a malformed one"),
        (status = 503, body = ApiErrorBody, description = "this instance holds as many waits as it takes; check in instead, retry later")),
    security(("bearer" = [])))]
async fn wait_requests(
    State(state): State<Shared>,
    AgentAuth(agent): AgentAuth,
    ApiJson(wait): ApiJson<RequestWait>,
) -> ApiResult<Json<RequestWaitResponse>> {
    let seconds = wait.wait_seconds.min(MAX_REQUEST_WAIT_SECONDS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(u64::from(seconds));
    // Registered before the first read, so a change between the two wakes
    // the wait. Notifications are per agent: a wait naming another agent's
    // request is never woken by it, and never told its state.
    let guard = state
        .request_waiters
        .register(&agent.agent_id)
        .map_err(|WaitRefused::Full(max)| Failure {
            retry_after: Some(Duration::from_secs(30)),
            ..Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_waits",
                format!(
                    "this platform instance already holds {max} request waits; the agent learns of its requests at its next check-in"
                ),
            )
        })?;
    loop {
        if guard.waiter.replaced.load(Ordering::SeqCst) {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "replaced",
                "a newer request wait of this agent replaced this one (one wait per agent)",
            ));
        }
        // Each read runs on this task; the database layer keeps the
        // blocking off the async threads (block_in_place).
        state.db.expire_requests(Timestamp::now())?;
        let mut changed = Vec::new();
        // Each id is compared with the state the agent holds it in: a
        // pending request that moved on, a grant in force that did (a
        // revocation must end it on the device in seconds, not at the next
        // check-in).
        let named = (wait.requests.iter().map(|id| (id, RequestState::Pending)))
            .chain(wait.grants.iter().map(|id| (id, RequestState::Approved)));
        for (id, held) in named {
            match state.db.request_status(&agent.agent_id, id) {
                Ok(status) if status.state != held => {
                    changed.push(RequestChange {
                        id: status.id,
                        state: status.state,
                    });
                }
                Ok(_) | Err(DbError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if !changed.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(Json(RequestWaitResponse { changed }));
        }
        if tokio::time::timeout_at(deadline, guard.waiter.wake.notified())
            .await
            .is_err()
        {
            return Ok(Json(RequestWaitResponse::default()));
        }
    }
}

// ---- admin handlers -------------------------------------------------

/// Who the token belongs to.
#[utoipa::path(get, path = "/api/v1/admin/whoami", tag = "admin", responses((status = 200, body = WhoAmI)), security(("bearer" = [])))]
async fn whoami(AdminAuth(admin): AdminAuth) -> Json<WhoAmI> {
    Json(WhoAmI {
        name: admin.name,
        role: admin.role,
        approver_level: admin.approver_level,
        endpoint_users: admin.endpoint_users,
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

/// Create an admin (owner only).
#[utoipa::path(post, path = "/api/v1/admin/admins", tag = "admin", request_body = CreateAdmin,
    responses((status = 200, body = AdminCreated), (status = 403, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn create_admin(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    ApiJson(body): ApiJson<CreateAdmin>,
) -> ApiResult<Response> {
    let (created, detail) = state.db.create_admin(Actor::Admin(&admin), &body)?;
    Ok(with_detail(Json(created), detail))
}

/// Change an admin's role, approver level and endpoint users (owner
/// only); the activity log keeps the values before and after.
#[utoipa::path(put, path = "/api/v1/admin/admins/{name}", tag = "admin", params(("name" = String, Path, description = "admin name")), request_body = UpdateAdmin,
    responses((status = 200, body = AdminInfo), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn update_admin(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<UpdateAdmin>,
) -> ApiResult<Response> {
    path_name("name", &name)?;
    let (after, detail) = state.db.update_admin(&admin, &name, &body)?;
    Ok(with_detail(Json(after), detail))
}

/// Disable an admin: its token is refused from now on (owner only).
#[utoipa::path(post, path = "/api/v1/admin/admins/{name}/disable", tag = "admin", params(("name" = String, Path, description = "admin name")),
    responses((status = 200, body = AdminInfo), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn disable_admin(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    path_name("name", &name)?;
    let after = state.db.set_admin_disabled(&admin, &name, true)?;
    Ok(with_detail(Json(after), format!("disabled admin {name}")))
}

/// Enable a disabled admin (owner only).
#[utoipa::path(post, path = "/api/v1/admin/admins/{name}/enable", tag = "admin", params(("name" = String, Path, description = "admin name")),
    responses((status = 200, body = AdminInfo), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn enable_admin(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    path_name("name", &name)?;
    let after = state.db.set_admin_disabled(&admin, &name, false)?;
    Ok(with_detail(Json(after), format!("enabled admin {name}")))
}

/// A new token for an admin; the old one is refused from now on (the
/// owner for anyone, every admin for themselves).
#[utoipa::path(post, path = "/api/v1/admin/admins/{name}/rotate-token", tag = "admin", params(("name" = String, Path, description = "admin name")),
    responses((status = 200, body = AdminCreated), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn rotate_admin_token(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    path_name("name", &name)?;
    let created = state.db.rotate_admin_token(&admin, &name)?;
    Ok(with_detail(
        Json(created),
        format!("rotated the token of admin {name}; the old one is refused"),
    ))
}

/// Set an admin's console password (the owner for anyone, every admin
/// for themselves); the admin's console sessions end.
#[utoipa::path(put, path = "/api/v1/admin/admins/{name}/password", tag = "admin", params(("name" = String, Path, description = "admin name")), request_body = SetPassword,
    responses((status = 204), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn set_admin_password(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<SetPassword>,
) -> ApiResult<Response> {
    path_name("name", &name)?;
    if admin.name != name {
        admin.require(Capability::ManageAdmins)?;
    }
    let _permit = state
        .console
        .hashing()
        .acquire()
        .await
        .map_err(|e| Failure::internal(e.to_string()))?;
    let phc =
        tokio::task::spawn_blocking(move || crate::console::auth::hash_password(&body.password))
            .await
            .map_err(|e| Failure::internal(e.to_string()))?
            .map_err(Failure::invalid)?;
    drop(_permit);
    let (who, target, shared) = (admin.clone(), name.clone(), state.clone());
    tokio::task::spawn_blocking(move || shared.db.set_password(Some(&who), &target, &phc, None))
        .await
        .map_err(|e| Failure::internal(e.to_string()))??;
    Ok(with_detail(
        StatusCode::NO_CONTENT,
        format!("set the console password of admin {name}; their console sessions ended"),
    ))
}

/// Every enrollment token (never the secret).
#[utoipa::path(get, path = "/api/v1/admin/enroll-tokens", tag = "admin", responses((status = 200, body = Vec<EnrollTokenInfo>)), security(("bearer" = [])))]
async fn list_enroll_tokens(
    State(state): State<Shared>,
    _admin: AdminAuth,
) -> ApiResult<Json<Vec<EnrollTokenInfo>>> {
    Ok(Json(state.db.enroll_tokens()?))
}

/// Create an enrollment token (owner or policy admin).
#[utoipa::path(post, path = "/api/v1/admin/enroll-tokens", tag = "admin", request_body = CreateEnrollToken,
    responses((status = 200, body = EnrollTokenCreated), (status = 403, body = ApiErrorBody)), security(("bearer" = [])))]
async fn create_enroll_token(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    ApiJson(body): ApiJson<CreateEnrollToken>,
) -> ApiResult<Response> {
    let seconds = i64::try_from(body.expires_in_seconds)
        .ok()
        .filter(|s| (60..=366 * 86_400).contains(s))
        .ok_or_else(|| Failure::invalid("expires_in_seconds: from 60 seconds to 366 days"))?;
    let expires_at = Timestamp::now() + jiff::SignedDuration::from_secs(seconds);
    let (id, token) = state
        .db
        .create_enroll_token(body.uses, expires_at, &admin)?;
    let detail = format!(
        "enrollment token {id} for {} devices, expires {expires_at}",
        body.uses
    );
    Ok(with_detail(
        Json(EnrollTokenCreated {
            id,
            token,
            uses: body.uses,
            expires_at,
        }),
        detail,
    ))
}

/// Revoke an enrollment token (owner or policy admin).
#[utoipa::path(post, path = "/api/v1/admin/enroll-tokens/{id}/revoke", tag = "admin", params(("id" = String, Path, description = "enrollment token id (etk_…)")),
    responses((status = 204), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn revoke_enroll_token(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    path_name("id", &id)?;
    state.db.revoke_enroll_token(&id, &admin)?;
    Ok(with_detail(
        StatusCode::NO_CONTENT,
        format!("revoked enrollment token {id}"),
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

/// Remove a device: its credentials stop working, its pending and
/// approved requests are revoked, its audit stays (owner or policy admin).
#[utoipa::path(delete, path = "/api/v1/admin/devices/{device_id}", tag = "admin", params(("device_id" = String, Path, description = "device id")),
    responses((status = 204), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn remove_device(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(device_id): Path<String>,
) -> ApiResult<Response> {
    path_name("device_id", &device_id)?;
    let revoked = state.db.remove_device(&device_id, &admin)?;
    Ok(with_detail(
        StatusCode::NO_CONTENT,
        format!("removed device {device_id}; {revoked} pending or approved request(s) revoked"),
    ))
}

/// Reset a device: its credentials stop working now, its pending and
/// approved requests are revoked, and the next enrollment with a valid token
/// takes its id as a new agent (owner or policy admin).
#[utoipa::path(post, path = "/api/v1/admin/devices/{device_id}/reset", tag = "admin", params(("device_id" = String, Path, description = "device id")),
    responses((status = 204), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn reset_device(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(device_id): Path<String>,
) -> ApiResult<Response> {
    path_name("device_id", &device_id)?;
    let revoked = state.db.reset_device(&device_id, &admin)?;
    Ok(with_detail(
        StatusCode::NO_CONTENT,
        format!(
            "reset device {device_id}: its credentials are void until it enrolls again; {revoked} pending or approved request(s) revoked"
        ),
    ))
}

/// The bundle one device receives.
#[utoipa::path(get, path = "/api/v1/admin/devices/{device_id}/bundle", tag = "admin", params(("device_id" = String, Path, description = "device id")),
    responses((status = 200, body = SignedEnvelope), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn device_bundle(
    State(state): State<Shared>,
    _admin: AdminAuth,
    Path(device_id): Path<String>,
) -> ApiResult<Response> {
    path_name("device_id", &device_id)?;
    let agent = state.db.agent_by_device(&device_id)?.ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no enrolled device {device_id:?}"),
        )
    })?;
    let bundle = current_bundle(&state, &device_id, &agent.users).await?;
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

/// Push a policy document for a scope (owner or policy admin).
#[utoipa::path(put, path = "/api/v1/admin/policies/{scope}", tag = "admin",
    params(("scope" = String, Path, description = "general, device:ID, user:NAME or group:NAME")),
    request_body(content = Object, description = "a policy document (docs/policy.md)"),
    responses((status = 200, body = PolicyPushed), (status = 403, body = ApiErrorBody), (status = 422, body = ApiErrorBody)), security(("bearer" = [])))]
async fn put_policy(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(scope): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    // Before reading megabytes of policy for someone who may not push it.
    admin.require(Capability::ManagePolicies)?;
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
            let levels = merge::highest_approval_level(&text);
            if levels > validate::MAX_APPROVAL_LEVEL {
                return Err(Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_policy",
                    format!(
                        "a rule has {levels} approval levels; the platform has approvers for at most {}; nothing was stored",
                        validate::MAX_APPROVAL_LEVEL
                    ),
                ));
            }
            let warnings = policy.lint().iter().map(ToString::to_string).collect();
            Ok((policy.rules.len() as u64, warnings))
        }
    })
    .await
    .map_err(|e| Failure::internal(e.to_string()))??;
    let entry = state.db.put_policy(&scope, &text, rules, &admin)?;
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

/// Delete a scope's policy document (owner or policy admin).
#[utoipa::path(delete, path = "/api/v1/admin/policies/{scope}", tag = "admin", params(("scope" = String, Path, description = "general, device:ID, user:NAME or group:NAME")),
    responses((status = 204), (status = 403, body = ApiErrorBody), (status = 404, body = ApiErrorBody)), security(("bearer" = [])))]
async fn delete_policy(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(scope): Path<String>,
) -> ApiResult<Response> {
    let scope = parse_scope(&scope)?;
    if !state.db.delete_policy(&scope, &admin)? {
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
    ApiQuery(query): ApiQuery<RequestQuery>,
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
    path_name("id", &id)?;
    state.db.expire_requests(Timestamp::now())?;
    Ok(Json(state.db.request(&id)?))
}

/// Checks a pending request against its rule as the device's policy has
/// it now; a request the rule no longer allows is closed (denied by the
/// platform, with the reason) and the answer is 409.
async fn recheck_pending(state: &Shared, request: &AdminRequest) -> ApiResult<CurrentTerms> {
    let rule = rule_now(state, &request.device_id, None, &request.rule_id).await?;
    let checked = rule.and_then(|rule| {
        check_window(
            state,
            &rule.terms.approval,
            request.window.start,
            request.window.end,
            false,
        )
        .map(|()| rule)
    });
    match checked {
        Ok(rule) => Ok(CurrentTerms {
            levels: rule
                .terms
                .approval
                .levels
                .iter()
                .map(|l| l.approvers)
                .collect(),
            uses: rule.terms.approval.uses,
        }),
        Err(why) => {
            state.db.close_request(&request.id, &why)?;
            Err(Failure::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "request {} cannot be approved and was closed: {why}",
                    request.id
                ),
            ))
        }
    }
}

/// Records `admin`'s approval of a pending request after checking it
/// against the device's policy now, narrowed as the approver chose; signs
/// the grant when it completes (stored with the approval, atomically). The API and the console both approve
/// through here.
pub(crate) async fn approve_checked(
    state: &Shared,
    id: &str,
    admin: &Admin,
    narrowing: Narrowing,
) -> ApiResult<(AdminRequest, bool)> {
    admin.require(Capability::Approve)?;
    state.db.expire_requests(Timestamp::now())?;
    let request = state.db.request(id)?;
    if request.state != RequestState::Pending {
        return Err(
            DbError::Conflict(format!("request {id} is {}, not pending", request.state)).into(),
        );
    }
    let terms = recheck_pending(state, &request).await?;
    let (request, done) = state
        .db
        .approve(id, admin, &terms, narrowing, |request, uses| {
            let grant = Grant {
                request_id: request.id.clone(),
                device_id: request.device_id.clone(),
                user: request.user.clone(),
                identity: request.subject.identity.clone(),
                rule_id: request.rule_id.clone(),
                not_before: request.window.start,
                not_after: request.window.end,
                uses,
                issued_at: Timestamp::now(),
            };
            state
                .signing
                .sign(SignedKind::Grant, &grant)
                .map_err(|e| format!("signing the grant of {}: {e}", request.id))
        })?;
    Ok((request, done))
}

/// Approve at the caller's level. The rule is checked again against the
/// device's current policy; nobody approves a request of their own
/// endpoint user name.
#[utoipa::path(post, path = "/api/v1/admin/requests/{id}/approve", tag = "admin", params(("id" = String, Path, description = "request id")),
    responses((status = 200, body = AdminRequest), (status = 403, body = ApiErrorBody), (status = 409, body = ApiErrorBody)), security(("bearer" = [])))]
async fn approve(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    path_name("id", &id)?;
    let (request, done) = approve_checked(&state, &id, &admin, Narrowing::default()).await?;
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
    path_name("id", &id)?;
    if body.reason.trim().is_empty() {
        return Err(Failure::invalid(
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
    path_name("id", &id)?;
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
    ApiQuery(query): ApiQuery<AuditQuery>,
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
                        record: serde_json::value::RawValue::from_string(record)
                            .map_err(|e| Failure::internal(e.to_string()))?,
                    })
                })
                .collect::<ApiResult<Vec<_>>>()?;
            return Ok(Json(AuditPage { records, next }));
        }
        let _ = tokio::time::timeout_at(deadline, arrived).await;
    }
}

/// The platform's own audit: admins' calls one by one, and refused
/// anonymous or rate-limited calls counted per source and hour.
#[utoipa::path(get, path = "/api/v1/admin/activity", tag = "admin", params(ActivityQuery), responses((status = 200, body = ActivityPage)), security(("bearer" = [])))]
async fn activity(
    State(state): State<Shared>,
    _admin: AdminAuth,
    ApiQuery(query): ApiQuery<ActivityQuery>,
) -> ApiResult<Json<ActivityPage>> {
    let limit = query.limit.unwrap_or(1000).clamp(1, 1000);
    Ok(Json(ActivityPage {
        entries: state.db.activity(limit, query.admin.as_deref())?,
        refused: state.db.refused_calls(100)?,
    }))
}

/// Answer an offline challenge. The challenge is approved like a request
/// (the platform keeps one for it, found again by the challenge): its rule
/// must be in the device's current policy, its window must fit the rule,
/// and the code comes only once every level has approved (200); until then
/// the answer names the level waiting (202). Limited per admin and hour.
#[utoipa::path(post, path = "/api/v1/admin/offline-codes", tag = "admin", request_body = OfflineCodeRequest,
    responses((status = 200, body = OfflineCodeResponse), (status = 202, body = OfflineCodeResponse, description = "approved at the caller's level; more levels must approve"),
        (status = 403, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody), (status = 429, body = ApiErrorBody)), security(("bearer" = [])))]
async fn offline_code(
    State(state): State<Shared>,
    AdminAuth(admin): AdminAuth,
    ApiJson(body): ApiJson<OfflineCodeRequest>,
) -> ApiResult<Response> {
    admin.require(Capability::Approve)?;
    state
        .rates
        .offline_codes
        .take(&admin.name, 1)
        .map_err(|wait| {
            Failure::rate_limited(
                format!(
                    "{} answered {} offline challenges in the last hour, the most allowed",
                    admin.name, state.limits.offline_codes_per_hour
                ),
                wait,
            )
        })?;
    let (challenge, agent, rule) = checked_challenge(&state, &admin, &body).await?;
    let request = offline_request(&state, &admin, &challenge, &agent, &rule).await?;
    let code = match request.state {
        RequestState::Approved => Some(challenge.code(&state.db.offline_key(&agent.device_id)?)),
        RequestState::Pending => None,
        other => {
            return Err(Failure::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "the challenge's request {} is {other}{}",
                    request.id,
                    request
                        .reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ),
            ));
        }
    };
    let what = format!(
        "{} on {}: rule {}, {} {}, {}..{} (request {})",
        challenge.user,
        challenge.device_id,
        challenge.rule_id,
        challenge.identity.kind,
        challenge.identity.value,
        challenge.not_before,
        challenge.not_after,
        request.id
    );
    let (status, detail) = match &code {
        Some(_) => (StatusCode::OK, format!("offline code issued for {what}")),
        None => (
            StatusCode::ACCEPTED,
            format!(
                "offline challenge approved at level {} for {what}; level {} waits",
                admin.approver_level.unwrap_or(0),
                request.current_level
            ),
        ),
    };
    Ok(with_detail(
        (
            status,
            Json(OfflineCodeResponse {
                code,
                request_id: request.id,
                current_level: request.current_level,
                levels: request.levels,
                device_id: challenge.device_id,
                user: challenge.user,
                identity: challenge.identity,
                rule_id: challenge.rule_id,
                window: Window {
                    start: challenge.not_before,
                    end: challenge.not_after,
                },
            }),
        ),
        detail,
    ))
}

/// An offline challenge, checked: from the device named, for a user who
/// is not this admin, under a rule in the device's current policy, with a
/// window that fits it. Its device and rule come with it.
async fn checked_challenge(
    state: &Shared,
    admin: &Admin,
    body: &OfflineCodeRequest,
) -> ApiResult<(OfflineChallenge, Agent, RuleNow)> {
    let challenge =
        OfflineChallenge::decode(&body.challenge).map_err(|e| Failure::invalid(e.to_string()))?;
    if challenge.device_id != body.device_id {
        return Err(Failure::invalid(format!(
            "the challenge comes from device {:?}, not {:?}",
            validate::printable(&challenge.device_id),
            body.device_id
        )));
    }
    validate::name("challenge.user", &challenge.user, validate::MAX_NAME_BYTES)?;
    validate::name(
        "challenge.rule_id",
        &challenge.rule_id,
        validate::MAX_NAME_BYTES,
    )?;
    let agent = state.db.agent_by_device(&body.device_id)?.ok_or_else(|| {
        Failure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no enrolled device {:?}", body.device_id),
        )
    })?;
    let rule = rule_now(
        state,
        &agent.device_id,
        Some(&agent.users),
        &challenge.rule_id,
    )
    .await?
    .map_err(Failure::invalid)?;
    check_request_identity(
        &challenge.identity,
        rule.terms.section,
        rule.terms.max_minutes,
    )
    .map_err(Failure::invalid)?;
    check_window(
        state,
        &rule.terms.approval,
        challenge.not_before,
        challenge.not_after,
        false,
    )
    .map_err(Failure::invalid)?;
    if admin.is_endpoint_user(&challenge.user) {
        return Err(DbError::Forbidden(format!(
            "the challenge is from {}, which is {} on endpoints: nobody approves their own request",
            challenge.user, admin.name
        ))
        .into());
    }
    Ok((challenge, agent, rule))
}

/// The platform's request for an offline challenge, approved at `admin`'s
/// level when it waits for it.
async fn offline_request(
    state: &Shared,
    admin: &Admin,
    challenge: &OfflineChallenge,
    agent: &Agent,
    rule: &RuleNow,
) -> ApiResult<AdminRequest> {
    // The platform's request for this challenge: the same challenge text
    // finds the same request, so each level's approvers answer it in turn.
    let encoded = challenge.encode();
    let local_id = format!(
        "offline:{}",
        hex::encode(&Sha256::digest(encoded.as_bytes())[..16])
    );
    let levels: Vec<u32> = rule
        .terms
        .approval
        .levels
        .iter()
        .map(|l| l.approvers)
        .collect();
    let submit = RequestSubmit {
        local_id,
        rule_id: challenge.rule_id.clone(),
        policy_version: rule.bundle_version,
        user: challenge.user.clone(),
        subject: RequestSubject {
            identity: challenge.identity.clone(),
            path: "(offline challenge)".into(),
            team_id: None,
            signing_id: None,
        },
        justification: format!(
            "offline challenge {} read out to an approver",
            challenge.nonce
        ),
        window: Window {
            start: challenge.not_before,
            end: challenge.not_after,
        },
    };
    let status = state
        .db
        .submit_request(agent, &submit, &levels, rule.terms.approval.uses)?;
    let mut request = state.db.request(&status.id)?;
    if request.state == RequestState::Pending
        && !request.approvals.iter().any(|a| a.admin == admin.name)
    {
        request = approve_checked(state, &request.id, admin, Narrowing::default())
            .await?
            .0;
    }
    Ok(request)
}

async fn health() -> &'static str {
    "ok"
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/console") {
        return crate::console::not_found().await;
    }
    Failure::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /api/v1/openapi.json",
    )
    .into_response()
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
    paths(enroll, checkin, policy, upload_audit, submit_request, agent_request, wait_requests, rotate_agent, whoami, list_admins,
        create_admin, update_admin, disable_admin, enable_admin, rotate_admin_token, set_admin_password, list_enroll_tokens,
        create_enroll_token, revoke_enroll_token, devices, remove_device, reset_device, device_bundle, list_policies,
        put_policy, get_policy, delete_policy, list_requests, get_request, approve, deny, revoke, fleet_audit,
        activity, offline_code),
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
        .route(
            paths::AGENT_REQUESTS_WAIT,
            post(wait_requests).layer(DefaultBodyLimit::max(
                epm_api::agent::MAX_REQUEST_WAIT_BYTES,
            )),
        )
        .route(paths::AGENT_ROTATE, post(rotate_agent))
        .route(paths::ADMIN_WHOAMI, get(whoami))
        .route(paths::ADMIN_ADMINS, get(list_admins).post(create_admin))
        .route(paths::ADMIN_ADMIN, put(update_admin))
        .route(paths::ADMIN_ADMIN_DISABLE, post(disable_admin))
        .route(paths::ADMIN_ADMIN_ENABLE, post(enable_admin))
        .route(paths::ADMIN_ADMIN_ROTATE_TOKEN, post(rotate_admin_token))
        .route(paths::ADMIN_ADMIN_PASSWORD, put(set_admin_password))
        .route(
            paths::ADMIN_ENROLL_TOKENS,
            get(list_enroll_tokens).post(create_enroll_token),
        )
        .route(paths::ADMIN_ENROLL_TOKEN_REVOKE, post(revoke_enroll_token))
        .route(paths::ADMIN_DEVICES, get(devices))
        .route(paths::ADMIN_DEVICE, delete(remove_device))
        .route(paths::ADMIN_DEVICE_RESET, post(reset_device))
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
        .merge(crate::console::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(epm_api::MAX_JSON_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_activity,
        ))
        // Outside the activity log: a client over its rate costs no
        // database work (its calls are counted in memory).
        .layer(middleware::from_fn_with_state(state.clone(), limit_rate))
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
            match state.db.sweep_expired(Timestamp::now()) {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} request(s) expired"),
                Err(e) => tracing::error!("expiring requests: {e}"),
            }
        }
    });
}

/// Every 2 s the refused-call counts go to the activity log; every 10 s
/// connection refusals are logged and idle rate-limit keys forgotten.
fn spawn_upkeep(state: Shared, gate: ConnectionGate) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            let flushing = state.clone();
            // SQLite blocks: off the async threads.
            let _ = tokio::task::spawn_blocking(move || flushing.refused.flush(&flushing.db)).await;
            if ticks.is_multiple_of(5) {
                gate.report();
                state.rates.forget_idle();
            }
        }
    });
}

/// Serves HTTPS on `listen` until the handle shuts it down, within the
/// state's [`Limits`]: connection caps and idle timeouts (under TLS, so a
/// handshake never finished counts too), HTTP/1 header and HTTP/2
/// keep-alive timeouts, and at most 32 concurrent HTTP/2 streams.
pub async fn serve(
    state: Shared,
    listen: SocketAddr,
    tls: axum_server::tls_rustls::RustlsConfig,
    handle: axum_server::Handle,
) -> std::io::Result<()> {
    spawn_expiry(state.clone());
    crate::console::spawn_upkeep(state.clone());
    crate::webhooks::spawn(state.clone());
    let gate = ConnectionGate::new(&state.limits);
    spawn_upkeep(state.clone(), gate.clone());
    let app = router(state.clone());
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .handshake_timeout(state.limits.handshake_timeout)
        .acceptor(gate);
    let mut server = axum_server::bind(listen).acceptor(acceptor).handle(handle);
    let builder = server.http_builder();
    // A client must send its headers within 10 s (slow-loris).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    // HTTP/2: a peer that stops answering pings is dropped; few streams
    // per connection.
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(32);
    let served = server
        .serve(app.into_make_service_with_connect_info::<SocketAddr>())
        .await;
    state.refused.flush(&state.db);
    served
}
