//! The approvers' web console at `/console/`, on the API's TLS listener.
//!
//! Server-rendered HTML (maud escapes every value it is given, so text
//! from agents and users is inert), forms that work without JavaScript,
//! and one small same-origin script for live updates. Sessions live in the
//! database (the cookie holds 32 random bytes; only their SHA-256 is
//! stored) and end after an idle time and an absolute lifetime; every
//! form that changes something carries a CSRF token bound to the session;
//! every page is sent with a Content-Security-Policy that allows no inline
//! script and no framing. Who may do what is decided by the same
//! [`crate::db`] and [`crate::roles`] calls the REST API makes.

pub mod auth;
mod handlers;
pub mod highlight;
mod view;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};

use auth::{csrf_matches, csrf_token};

use crate::db::{Admin, Db, DbError, SessionEnd};
use crate::limits::Limits;
use crate::server::AppState;

/// The session cookie. `__Host-` makes browsers keep it only when set
/// over HTTPS for this host, with `Path=/` and no `Domain`.
pub const SESSION_COOKIE: &str = "__Host-epm-session";
/// The cookie the sign-in form's CSRF token is bound to before a session
/// exists.
pub const SIGN_IN_COOKIE: &str = "__Host-epm-sign-in";

/// The Content-Security-Policy of every console response: scripts,
/// styles and connections from the console's own origin only, no inline
/// script, no plugins, no framing, forms posted only to itself.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's share of the platform's state.
#[derive(Debug)]
pub struct ConsoleState {
    /// A session unused this long ends.
    pub idle: Duration,
    /// A session ends this long after sign-in, used or not.
    pub lifetime: Duration,
    accounts: auth::FailureCounter,
    addresses: auth::FailureCounter,
    /// argon2id takes 19 MiB a hash: a few at a time.
    hashing: tokio::sync::Semaphore,
}

impl ConsoleState {
    /// The permits for argon2id hashing (19 MiB each).
    pub(crate) fn hashing(&self) -> &tokio::sync::Semaphore {
        &self.hashing
    }

    /// From the platform's limits.
    pub fn new(limits: &Limits) -> ConsoleState {
        ConsoleState {
            idle: limits.session_idle,
            lifetime: limits.session_lifetime,
            accounts: auth::FailureCounter::new(
                limits.sign_in_failures_per_account,
                limits.sign_in_window,
            ),
            addresses: auth::FailureCounter::new(
                limits.sign_in_failures_per_address,
                limits.sign_in_window,
            ),
            hashing: tokio::sync::Semaphore::new(4),
        }
    }
}

type Shared = Arc<AppState>;

/// A console page that failed: the status and what to tell the admin.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    title: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, title: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            title,
            message: message.into(),
        }
    }

    fn internal(message: impl std::fmt::Display) -> Refusal {
        tracing::error!("console: {message}");
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The platform failed",
            "Something went wrong on the platform; its log says what.",
        )
    }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Refusal {
        match e {
            DbError::NotFound(m) => Refusal::new(StatusCode::NOT_FOUND, "Not found", m),
            DbError::Conflict(m) => Refusal::new(StatusCode::CONFLICT, "Not possible now", m),
            DbError::Unauthorized(m) => Refusal::new(StatusCode::UNAUTHORIZED, "Not signed in", m),
            DbError::Forbidden(m) => Refusal::new(StatusCode::FORBIDDEN, "Not allowed", m),
            DbError::Invalid(m) => {
                Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "Not accepted", m)
            }
            DbError::Sql(e) => Refusal::internal(format!("database: {e}")),
        }
    }
}

impl From<crate::server::Failure> for Refusal {
    fn from(f: crate::server::Failure) -> Refusal {
        let (status, message) = f.parts();
        let title = match status {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::CONFLICT => "Not possible now",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::TOO_MANY_REQUESTS => "Too many requests",
            s if s.is_server_error() => "The platform failed",
            _ => "Not accepted",
        };
        Refusal::new(status, title, message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            view::refusal_page(self.title, &self.message, self.status),
        )
            .into_response()
    }
}

/// Runs database work on the blocking pool, off the async threads.
async fn blocking<T: Send + 'static>(
    state: &Shared,
    work: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
) -> Result<T, Refusal> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || work(&state.db))
        .await
        .map_err(Refusal::internal)?
        .map_err(Refusal::from)
}

/// Records one console action in the activity log.
async fn record(state: &Shared, admin: &str, call: String, status: StatusCode, detail: String) {
    let admin = admin.to_owned();
    let logged = blocking(state, move |db| {
        db.record_activity(&admin, &call, status.as_u16(), Some(&detail))
    })
    .await;
    if logged.is_err() {
        tracing::error!("cannot record a console action");
    }
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// A `Set-Cookie` value: secure, HTTP only, same site, whole host.
fn set_cookie(name: &str, value: &str, max_age: Option<Duration>) -> HeaderValue {
    let age = max_age.map_or_else(String::new, |d| format!("; Max-Age={}", d.as_secs()));
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Path=/"))
}

fn clear_cookie(name: &str) -> HeaderValue {
    set_cookie(name, "", Some(Duration::ZERO))
}

/// The client's address.
fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
}

/// The client's address as an extractor (absent in tests of the router
/// without connection info).
#[derive(Debug)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_ip(parts)))
    }
}

/// A signed-in admin, from the session cookie.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The admin.
    pub admin: Admin,
    /// The session's cookie value (to derive the CSRF token, or end it).
    token: String,
    /// The CSRF token forms carry.
    pub csrf: String,
    /// The time zone dates are shown in besides UTC.
    pub zone: jiff::tz::TimeZone,
    /// Its name.
    pub zone_name: String,
}

/// Why a request has no session: no cookie, or the session ended.
#[derive(Debug)]
pub struct NotSignedIn {
    end: Option<SessionEnd>,
    background: bool,
    method: Method,
    path: String,
    source: Option<IpAddr>,
    state: Shared,
}

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        let why = match self.end {
            None => "missing",
            Some(SessionEnd::Unknown) => "unknown",
            Some(SessionEnd::Idle) => "idle",
            Some(SessionEnd::Lifetime) => "lifetime",
            Some(SessionEnd::Disabled) => "disabled",
        };
        if self.background {
            // The page's script: it tells the admin, the cookie stays for
            // the next page to explain.
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(serde_json::json!({ "signed_out": why })),
            )
                .into_response();
        }
        if self.method == Method::GET || self.method == Method::HEAD {
            let mut response = Redirect::to(&format!("/console/sign-in?why={why}")).into_response();
            if self.end.is_some() {
                response
                    .headers_mut()
                    .insert(header::SET_COOKIE, clear_cookie(SESSION_COOKIE));
            }
            return response;
        }
        // A refused change is counted like the API's refused calls.
        self.state.refused.note(
            self.source,
            "console:not-signed-in",
            self.method.as_str(),
            &self.path,
            StatusCode::UNAUTHORIZED.as_u16(),
        );
        let mut response = Refusal::new(
            StatusCode::UNAUTHORIZED,
            "Not signed in",
            view::why_signed_out(why),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::SET_COOKIE, clear_cookie(SESSION_COOKIE));
        response
    }
}

impl FromRequestParts<Shared> for Signed {
    type Rejection = NotSignedIn;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, NotSignedIn> {
        // The page script's polls say so: they must not keep an idle
        // session alive.
        let background = parts.headers.contains_key("x-epm-background");
        let refuse = |end| NotSignedIn {
            end,
            background,
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            source: client_ip(parts),
            state: state.clone(),
        };
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE).map(str::to_owned) else {
            return Err(refuse(None));
        };
        let (idle, lifetime) = (state.console.idle, state.console.lifetime);
        let lookup = {
            let token = token.clone();
            blocking(state, move |db| {
                db.session(&token, idle, lifetime, !background)
            })
            .await
        };
        let session = match lookup {
            Ok(Ok(session)) => session,
            Ok(Err(end)) => return Err(refuse(Some(end))),
            Err(_) => return Err(refuse(Some(SessionEnd::Unknown))),
        };
        let (zone, zone_name) = session
            .time_zone
            .as_deref()
            .and_then(|name| {
                jiff::tz::TimeZone::get(name)
                    .ok()
                    .map(|z| (z, name.to_owned()))
            })
            .unwrap_or_else(|| (jiff::tz::TimeZone::UTC, "UTC".to_owned()));
        Ok(Signed {
            csrf: csrf_token(&token),
            admin: session.admin,
            token,
            zone,
            zone_name,
        })
    }
}

impl Signed {
    /// `Ok` when `presented` is this session's CSRF token; a refusal (and
    /// a counted refused call) otherwise.
    fn check_csrf(&self, state: &Shared, presented: &str, path: &str) -> Result<(), Refusal> {
        if csrf_matches(&self.token, presented) {
            return Ok(());
        }
        state.refused.note(
            None,
            &format!("console:{}:csrf", self.admin.name),
            "POST",
            path,
            StatusCode::FORBIDDEN.as_u16(),
        );
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "Form refused",
            "The form's security token does not belong to your session, so nothing was changed. Reload the page and try again.",
        ))
    }
}

/// Headers on every console response: the CSP, no framing, no sniffing,
/// no referrer leaving the platform, no caching of pages; and a POST from
/// another origin is refused before any handler runs.
async fn console_headers(request: Request, next: Next) -> Response {
    if request.method() == Method::POST && !same_origin(request.headers(), request.uri()) {
        return Refusal::new(
            StatusCode::FORBIDDEN,
            "Form refused",
            "This form was sent from another site; nothing was changed.",
        )
        .into_response();
    }
    let is_asset = request.uri().path().starts_with("/console/static/");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    if !is_asset {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// Whether a request's `Origin` (when sent) is the host it was sent to
/// (the `Host` header in HTTP/1, the `:authority` in HTTP/2).
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Browsers send Origin with every cross-site POST; its absence is
        // a same-site navigation or a non-browser client.
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    origin.strip_prefix("https://") == Some(host)
}

/// The console's routes, under `/console/`, to merge into the API's
/// router.
pub fn router() -> Router<Shared> {
    handlers::routes().layer(middleware::from_fn(console_headers))
}

/// The answer for a path under `/console/` that is no page.
pub async fn not_found() -> Response {
    let mut response = Refusal::new(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page in the console.",
    )
    .into_response();
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

/// Forgets ended sessions, every minute.
pub fn spawn_upkeep(state: Shared) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            let (idle, lifetime) = (state.console.idle, state.console.lifetime);
            let _ = blocking(&state, move |db| db.prune_sessions(idle, lifetime)).await;
        }
    });
}
