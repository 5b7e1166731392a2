//! The console's pages and actions. Each action checks its form's CSRF
//! token, calls the same database methods as the REST API (which decide
//! who may do what), records itself in the activity log, and redirects
//! to a page (POST, redirect, GET), or shows the refusal in words.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use epm_api::admin::{AdminRequest, AdminRole, CreateAdmin, PolicyScope, UpdateAdmin};
use epm_api::agent::RequestState;
use epm_api::validate::{self, Validate};
use jiff::Timestamp;
use maud::{Markup, html};
use serde::Deserialize;

use super::view::{self, Chrome, Nav, csrf_field, layout, when, when_both};
use super::{
    Refusal, SESSION_COOKIE, SIGN_IN_COOKIE, Shared, Signed, auth, blocking, clear_cookie, cookie,
    csrf_matches, csrf_token, highlight, record, set_cookie,
};
use crate::db::{Actor, Admin, AuditFilter, AuditRow, Narrowing, RequestFilter};
use crate::roles::Capability;

const CSS: &str = include_str!("static/app.css");
const JS: &str = include_str!("static/app.js");

/// Requests per history page; audit records per page.
const PAGE: u32 = 50;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/console", get(to_inbox))
        .route("/console/", get(to_inbox))
        .route("/console/static/app.css", get(css))
        .route("/console/static/app.js", get(js))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/sign-out-everywhere", post(sign_out_everywhere))
        .route("/console/inbox", get(inbox))
        .route("/console/live", get(live))
        .route("/console/requests/{id}", get(request_page))
        .route("/console/requests/{id}/approve", post(approve))
        .route("/console/requests/{id}/deny", post(deny))
        .route("/console/requests/{id}/revoke", post(revoke))
        .route("/console/history", get(history))
        .route("/console/devices", get(devices))
        .route("/console/devices/{id}/reset", post(reset_device))
        .route("/console/devices/{id}/remove", post(remove_device))
        .route("/console/audit", get(audit))
        .route("/console/audit/rows", get(audit_rows))
        .route("/console/audit/export.csv", get(export_csv))
        .route("/console/audit/export.jsonl", get(export_jsonl))
        .route("/console/audit/{cursor}", get(audit_record))
        .route("/console/policies", get(policies))
        .route("/console/policies/view", get(policy_view))
        .route("/console/policies/edit", get(policy_edit))
        .route(
            "/console/policies/preview",
            post(policy_preview).layer(axum::extract::DefaultBodyLimit::max(
                epm_api::MAX_POLICY_PUSH_BYTES * 3 + 4096,
            )),
        )
        .route(
            "/console/policies/upload",
            post(policy_upload).layer(axum::extract::DefaultBodyLimit::max(
                epm_api::MAX_POLICY_PUSH_BYTES + 64 * 1024,
            )),
        )
        .route(
            "/console/policies/push",
            post(policy_push).layer(axum::extract::DefaultBodyLimit::max(
                epm_api::MAX_POLICY_PUSH_BYTES * 3 + 4096,
            )),
        )
        .route("/console/policies/delete", post(policy_delete))
        .route(
            "/console/enroll-tokens",
            get(enroll_tokens).post(create_enroll_token),
        )
        .route(
            "/console/enroll-tokens/{id}/revoke",
            post(revoke_enroll_token),
        )
        .route("/console/admins", get(admins).post(create_admin))
        .route("/console/admins/{name}/update", post(update_admin))
        .route("/console/admins/{name}/disable", post(disable_admin))
        .route("/console/admins/{name}/enable", post(enable_admin))
        .route("/console/activity", get(activity))
        .route("/console/webhooks", get(webhooks).post(create_webhook))
        .route("/console/webhooks/{id}/delete", post(delete_webhook))
        .route("/console/account", get(account))
        .route("/console/account/password", post(change_password))
}

async fn to_inbox() -> Redirect {
    Redirect::to("/console/inbox")
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, max-age=300"),
            ),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

/// A form with its CSRF token: the token is checked before the handler
/// sees anything else.
#[derive(Debug, Deserialize)]
struct WithCsrf<T> {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    form: T,
}

/// An empty form: only the token.
#[derive(Debug, Deserialize)]
struct Nothing {}

/// A text field as entered: trimmed, empty as absent.
fn field(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A name-like filter or form field, checked like the API's.
fn name_field(label: &str, value: &Option<String>) -> Result<Option<String>, Refusal> {
    match field(value) {
        Some(v) => {
            validate::name(label, &v, validate::MAX_NAME_BYTES).map_err(invalid)?;
            Ok(Some(v))
        }
        None => Ok(None),
    }
}

fn invalid(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Not accepted",
        e.to_string(),
    )
}

/// A time typed in a form: RFC 3339, or `YYYY-MM-DDTHH:MM` (what
/// `<input type=datetime-local>` sends) in the admin's time zone.
fn time_field(
    label: &str,
    value: &Option<String>,
    zone: &jiff::tz::TimeZone,
) -> Result<Option<Timestamp>, Refusal> {
    let Some(text) = field(value) else {
        return Ok(None);
    };
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(Some(ts));
    }
    text.parse::<jiff::civil::DateTime>()
        .ok()
        .and_then(|dt| dt.to_zoned(zone.clone()).ok())
        .map(|z| Some(z.timestamp()))
        .ok_or_else(|| {
            invalid(format!(
                "{label}: {:?} is not a time (write 2026-11-22T14:30, in your time zone, or RFC 3339)",
                validate::printable(&text)
            ))
        })
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// The path of a URL segment, percent-encoded.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Pending requests split into those waiting for `admin`'s level (and
/// theirs to approve) and the others.
fn split_inbox(
    admin: &Admin,
    pending: Vec<AdminRequest>,
) -> (Vec<AdminRequest>, Vec<AdminRequest>) {
    pending.into_iter().partition(|r| is_mine(admin, r))
}

/// Whether `admin` can act on `request` now: it waits for their level,
/// is not their own user's, and they have not approved it yet.
fn is_mine(admin: &Admin, request: &AdminRequest) -> bool {
    admin.can(Capability::Approve)
        && request.state == RequestState::Pending
        && admin.approver_level == Some(request.current_level)
        && !admin.is_endpoint_user(&request.user)
        && !request.approvals.iter().any(|a| a.admin == admin.name)
}

/// What a signed-in page needs for its frame: the counts in the
/// navigation.
async fn chrome_counts(state: &Shared, admin: &Admin) -> Result<(usize, usize), Refusal> {
    let pending = blocking(state, |db| {
        db.expire_requests(Timestamp::now())?;
        db.pending_requests()
    })
    .await?;
    let (mine, others) = split_inbox(admin, pending);
    Ok((mine.len(), others.len()))
}

fn chrome<'a>(signed: &'a Signed, counts: (usize, usize)) -> Chrome<'a> {
    Chrome {
        admin: &signed.admin,
        csrf: &signed.csrf,
        zone: &signed.zone,
        zone_name: &signed.zone_name,
        mine: counts.0,
        others: counts.1,
    }
}

/// A whole signed-in page.
async fn page(
    state: &Shared,
    signed: &Signed,
    title: &str,
    nav: Nav,
    body: impl FnOnce(&Chrome<'_>) -> Markup,
) -> Result<Markup, Refusal> {
    let counts = chrome_counts(state, &signed.admin).await?;
    let chrome = chrome(signed, counts);
    let content = body(&chrome);
    Ok(layout(&chrome, title, nav, content))
}

#[derive(Debug, Deserialize)]
struct Flash {
    done: Option<String>,
}

/// What `?done=` says, in words (only known keys: a link cannot make the
/// console say anything).
fn done_text(done: &Option<String>) -> Option<&'static str> {
    Some(match done.as_deref()? {
        "approved" => "Approved at your level.",
        "approved-fully" => {
            "Approved: every level has approved; the grant reaches the device within seconds when it is online."
        }
        "denied" => "Denied. The user will read your reason.",
        "revoked" => {
            "Revoked: the device drops the grant within seconds when it is online, else at its next check-in."
        }
        "pushed" => "Pushed: devices get it at their next check-in.",
        "deleted" => "Deleted.",
        "reset" => "Reset: its credentials are void until it enrolls again.",
        "removed" => "Removed.",
        "revoked-token" => "Revoked: it enrolls nothing more.",
        "updated" => "Saved.",
        "password" => "Password changed; your other sessions were ended.",
        "webhook-deleted" => "Webhook removed.",
        _ => return None,
    })
}

// ---- sign-in ----------------------------------------------------------

#[derive(Debug, Deserialize)]
struct SignInQuery {
    why: Option<String>,
}

/// The sign-in form, with a fresh pre-session cookie its CSRF token is
/// bound to.
async fn sign_in_page(Query(query): Query<SignInQuery>) -> Response {
    let message = query.why.as_deref().map(view::why_signed_out);
    sign_in_form(StatusCode::OK, "", message.as_deref(), message.is_some())
}

fn sign_in_form(status: StatusCode, name: &str, message: Option<&str>, error: bool) -> Response {
    let pre = crate::db::new_token("");
    let mut response = (
        status,
        view::sign_in(&csrf_token(&pre), name, message, error),
    )
        .into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(SIGN_IN_COOKIE, &pre, Some(Duration::from_secs(3600))),
    );
    response
}

#[derive(Debug, Deserialize)]
struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    tz: String,
}

/// The sign-in's name in the activity log.
const SIGN_IN_CALL: &str = "POST /console/sign-in";

/// Checks a sign-in: the form's token, the failure counts of the account
/// and of the address, the password (argon2id, also for unknown accounts
/// so the time tells nothing), and the TOTP code when the admin has TOTP.
/// Every failure is in the activity log.
async fn sign_in(
    State(state): State<Shared>,
    super::ClientAddr(source): super::ClientAddr,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    let pre = cookie(&headers, SIGN_IN_COOKIE).unwrap_or_default();
    if pre.is_empty() || !csrf_matches(pre, &form.csrf) {
        state.refused.note(
            source,
            "console:sign-in",
            "POST",
            "/console/sign-in",
            StatusCode::FORBIDDEN.as_u16(),
        );
        return sign_in_form(
            StatusCode::FORBIDDEN,
            "",
            Some("The sign-in form expired or was not sent from this page. Try again."),
            true,
        );
    }
    let name = form.name.trim().to_owned();
    let address = source.map_or_else(
        || "unknown".to_owned(),
        |ip| crate::limits::client_of(ip).to_string(),
    );
    if validate::name("name", &name, 64).is_err() || form.password.len() > auth::MAX_PASSWORD_BYTES
    {
        return sign_in_form(
            StatusCode::UNAUTHORIZED,
            "",
            Some("Wrong name or password."),
            true,
        );
    }
    let console = &state.console;
    let locked = console
        .accounts
        .locked(&name)
        .or_else(|| console.addresses.locked(&address));
    if let Some(wait) = locked {
        return locked_out(&state, source, &name, wait);
    }
    let outcome = match check_credentials(&state, &name, &form).await {
        Ok(outcome) => outcome,
        Err(response) => return response,
    };
    match outcome {
        Err(why) => sign_in_refused(&state, source, &name, &address, why).await,
        Ok(admin) => {
            console.accounts.clear(&name);
            start_session(&state, &admin, &address, &form.tz).await
        }
    }
}

/// The answer while an account or an address has failed too often.
fn locked_out(state: &Shared, source: Option<IpAddr>, name: &str, wait: Duration) -> Response {
    state.refused.note(
        source,
        &format!("console:sign-in:{name}"),
        "POST",
        "/console/sign-in",
        StatusCode::TOO_MANY_REQUESTS.as_u16(),
    );
    let minutes = wait.as_secs().div_ceil(60);
    let mut response = sign_in_form(
        StatusCode::TOO_MANY_REQUESTS,
        name,
        Some(&format!(
            "Too many failed sign-ins for this account or from this address. Try again in {minutes} minute(s)."
        )),
        true,
    );
    if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// The admin whose password (and TOTP code, when it has TOTP) the form
/// gives, or why not; `Err` when the database failed.
async fn check_credentials(
    state: &Shared,
    name: &str,
    form: &SignInForm,
) -> Result<Result<Admin, &'static str>, Response> {
    let console = &state.console;
    let lookup = {
        let name = name.to_owned();
        blocking(state, move |db| db.credentials(&name)).await
    };
    let credentials = match lookup {
        Ok(c) => c,
        Err(refusal) => return Err(refusal.into_response()),
    };
    let Ok(_permit) = console.hashing.acquire().await else {
        return Err(Refusal::internal("the hashing semaphore closed").into_response());
    };
    let phc = credentials
        .as_ref()
        .and_then(|c| c.password_hash.clone())
        .unwrap_or_else(|| auth::decoy_hash().to_owned());
    let password = form.password.clone();
    let password_ok = tokio::task::spawn_blocking(move || auth::verify_password(&phc, &password))
        .await
        .unwrap_or(false);
    drop(_permit);
    let now = Timestamp::now().as_second().unsigned_abs();
    let outcome: Result<Admin, &'static str> = match credentials {
        None => Err("no such admin"),
        Some(c) if c.password_hash.is_none() => Err("no console password is set"),
        Some(_) if !password_ok => Err("wrong password"),
        Some(c) => match (c.admin, c.totp_secret) {
            (None, _) => Err("the admin is disabled"),
            (Some(admin), None) => Ok(admin),
            (Some(admin), Some(secret)) => match auth::totp_step(&secret, &form.code, now) {
                None if form.code.trim().is_empty() => Err("no authenticator code"),
                None => Err("wrong authenticator code"),
                Some(step) => {
                    let fresh = {
                        let name = admin.name.clone();
                        blocking(state, move |db| db.use_totp_step(&name, step)).await
                    };
                    match fresh {
                        Ok(true) => Ok(admin),
                        Ok(false) => Err("an authenticator code used before"),
                        Err(refusal) => return Err(refusal.into_response()),
                    }
                }
            },
        },
    };
    Ok(outcome)
}

/// A failed sign-in: counted against the account and the address, in the
/// activity log, and the form again with what to fix.
async fn sign_in_refused(
    state: &Shared,
    source: Option<IpAddr>,
    name: &str,
    address: &str,
    why: &str,
) -> Response {
    let console = &state.console;
    console.accounts.fail(name);
    console.addresses.fail(address);
    if why == "no such admin" {
        // Counted, not stored one by one: made-up names are
        // endless, admins are not.
        state.refused.note(
            source,
            "console:sign-in:unknown-admin",
            "POST",
            "/console/sign-in",
            StatusCode::UNAUTHORIZED.as_u16(),
        );
    } else {
        record(
            state,
            name,
            SIGN_IN_CALL.to_owned(),
            StatusCode::UNAUTHORIZED,
            format!("failed console sign-in as {name} from {address}: {why}"),
        )
        .await;
    }
    let message = match why {
        "no authenticator code" => "Enter the code your authenticator app shows.",
        "wrong authenticator code" | "an authenticator code used before" => {
            "Wrong or already used authenticator code."
        }
        _ => "Wrong name or password.",
    };
    sign_in_form(StatusCode::UNAUTHORIZED, name, Some(message), true)
}

/// A successful sign-in: a new session (in the time zone the browser
/// gave, when it is one), logged, and its cookie.
async fn start_session(state: &Shared, admin: &Admin, address: &str, tz: &str) -> Response {
    let token = crate::db::new_token("");
    let zone =
        Some(tz.trim().to_owned()).filter(|z| z.len() <= 64 && jiff::tz::TimeZone::get(z).is_ok());
    let made = {
        let (token, name, address, zone) = (
            token.clone(),
            admin.name.clone(),
            address.to_owned(),
            zone.clone(),
        );
        blocking(state, move |db| {
            db.create_session(&name, &token, &address, zone.as_deref())
        })
        .await
    };
    if let Err(refusal) = made {
        return refusal.into_response();
    }
    record(
        state,
        &admin.name,
        SIGN_IN_CALL.to_owned(),
        StatusCode::SEE_OTHER,
        format!(
            "signed in to the console from {address}{}",
            zone.map(|z| format!(" (time zone {z})"))
                .unwrap_or_default()
        ),
    )
    .await;
    let mut response = see_other("/console/inbox");
    let headers = response.headers_mut();
    headers.append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, &token, None));
    headers.append(header::SET_COOKIE, clear_cookie(SIGN_IN_COOKIE));
    response
}

async fn sign_out(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/sign-out")?;
    let token = signed.token.clone();
    blocking(&state, move |db| db.end_session(&token)).await?;
    record(
        &state,
        &signed.admin.name,
        "POST /console/sign-out".into(),
        StatusCode::SEE_OTHER,
        "signed out of the console".into(),
    )
    .await;
    let mut response = see_other("/console/sign-in");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(SESSION_COOKIE));
    Ok(response)
}

async fn sign_out_everywhere(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/sign-out-everywhere")?;
    let name = signed.admin.name.clone();
    let ended = blocking(&state, move |db| db.end_sessions(&name)).await?;
    record(
        &state,
        &signed.admin.name,
        "POST /console/sign-out-everywhere".into(),
        StatusCode::SEE_OTHER,
        format!("signed out of the console everywhere ({ended} session(s) ended)"),
    )
    .await;
    let mut response = see_other("/console/sign-in");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(SESSION_COOKIE));
    Ok(response)
}

// ---- inbox --------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct InboxQuery {
    fragment: Option<String>,
}

fn inbox_body(
    chrome: &Chrome<'_>,
    mine: &[AdminRequest],
    others: &[AdminRequest],
    stamp: &str,
) -> Markup {
    let can_approve = chrome.admin.can(Capability::Approve);
    let mine: Vec<(AdminRequest, bool)> = mine.iter().cloned().map(|r| (r, true)).collect();
    let others: Vec<(AdminRequest, bool)> = others.iter().cloned().map(|r| (r, false)).collect();
    html! {
        div #inbox data-stamp=(stamp) data-live="/console/live" {
            section {
                h2 { "Waiting for you " span.count.mine { (mine.len()) } }
                @if can_approve {
                    (view::request_table(chrome, &mine, "Nothing waits for your level."))
                } @else {
                    p.empty { "Your role (" (view::role_text(chrome.admin)) ") does not approve; the requests below are for others." }
                }
            }
            section {
                h2 { "Other pending requests " span.count { (others.len()) } }
                (view::request_table(chrome, &others, "No other request is pending."))
            }
        }
    }
}

async fn inbox(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<InboxQuery>,
) -> Result<Response, Refusal> {
    let (pending, stamp) = blocking(&state, |db| {
        db.expire_requests(Timestamp::now())?;
        Ok((db.pending_requests()?, db.requests_stamp()?))
    })
    .await?;
    let (mine, others) = split_inbox(&signed.admin, pending);
    let counts = (mine.len(), others.len());
    let chrome = chrome(&signed, counts);
    let body = inbox_body(&chrome, &mine, &others, &stamp);
    if query.fragment.is_some() {
        return Ok(body.into_response());
    }
    let intro = html! {
        p.lead { "Requests waiting for your level come first. This page updates by itself." }
        (body)
    };
    Ok(layout(&chrome, "Inbox", Nav::Inbox, intro).into_response())
}

/// What the script polls: whether anything changed, and the counts.
async fn live(State(state): State<Shared>, signed: Signed) -> Result<Response, Refusal> {
    let (pending, stamp, head) = blocking(&state, |db| {
        db.expire_requests(Timestamp::now())?;
        Ok((
            db.pending_requests()?,
            db.requests_stamp()?,
            db.audit_head()?,
        ))
    })
    .await?;
    let (mine, others) = split_inbox(&signed.admin, pending);
    Ok(Json(serde_json::json!({
        "stamp": stamp, "mine": mine.len(), "others": others.len(), "audit_head": head,
    }))
    .into_response())
}

// ---- one request --------------------------------------------------------

async fn request_page(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    validate::name("id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    Ok(render_request(
        &state,
        &signed,
        &id,
        done_text(&flash.done),
        None,
        StatusCode::OK,
    )
    .await?
    .into_response())
}

async fn render_request(
    state: &Shared,
    signed: &Signed,
    id: &str,
    done: Option<&str>,
    error: Option<&str>,
    status: StatusCode,
) -> Result<(StatusCode, Markup), Refusal> {
    let request_id = id.to_owned();
    let (request, uses, audit) = blocking(state, move |db| {
        db.expire_requests(Timestamp::now())?;
        let request = db.request(&request_id)?;
        let uses = db.request_uses(&request_id)?;
        let sha = (request.subject.identity.kind == "sha256")
            .then(|| request.subject.identity.value.clone());
        let audit = db.audit_for_subject(
            &request.device_id,
            &request.user,
            sha.as_deref(),
            &request.subject.path,
            20,
        )?;
        Ok((request, uses, audit))
    })
    .await?;
    let message = crate::server::rule_message(state, &request.device_id, &request.rule_id)
        .await
        .unwrap_or(None);
    let admin = &signed.admin;
    let title = format!("Request from {}", request.user);
    let markup = page(state, signed, &title, Nav::Inbox, |chrome| {
        let mine = is_mine(admin, &request);
        let identity_label = match request.subject.identity.kind.as_str() {
            "sha256" => "SHA-256",
            "cdhash" => "cdhash",
            "admin_session" => "admin session (minutes)",
            other => other,
        };
        html! {
            (view::notice(done, error))
            div.grid {
                section.card {
                    h2 { "Who and what" }
                    dl.facts {
                        dt { "User" } dd { strong { (request.user) } }
                        dt { "Device" } dd { (request.device_id) }
                        dt { "Program" } dd.mono { (request.subject.path) }
                        dt { (identity_label) } dd.mono.break { (request.subject.identity.value) }
                        @if let Some(team) = &request.subject.team_id { dt { "Team id" } dd.mono { (team) } }
                        @if let Some(signing) = &request.subject.signing_id { dt { "Signing id" } dd.mono { (signing) } }
                        dt { "Rule" } dd { a href=(format!("/console/history?rule={}", encode(&request.rule_id))) { (request.rule_id) }
                            @if let Some(message) = &message { div.small.muted { "“" (message) "”" } } }
                        dt { "State" } dd { (view::state_badge(request.state))
                            @if let Some(by) = &request.decided_by { span.muted { " by " (by) } } }
                        @if let Some(reason) = &request.reason { dt { "Reason" } dd.just { (reason) } }
                        dt { "Asked" } dd { (when(chrome, request.created_at)) }
                    }
                    h3 { "Justification" }
                    blockquote.just { (request.justification) }
                }
                section.card {
                    h2 { "Window" }
                    dl.facts {
                        dt { "From" } dd { (when_both(chrome, request.window.start)) }
                        dt { "Until" } dd { (when_both(chrome, request.window.end)) }
                        dt { "Uses" } dd { (uses) " execution" @if uses != 1 { "s" } }
                    }
                    h2 { "Approvals" }
                    (view::levels(chrome, &request))
                }
            }
            (request_actions(chrome, &request, uses, mine))
            section.card {
                h2 { "Recent audit on " (request.device_id) " for " (request.user) " and this program" }
                (audit_table(chrome, &audit, "No record yet for this user and program on this device."))
            }
        }
    })
    .await?;
    Ok((status, markup))
}

fn request_actions(chrome: &Chrome<'_>, request: &AdminRequest, uses: u32, mine: bool) -> Markup {
    let admin = chrome.admin;
    let base = format!("/console/requests/{}", request.id);
    if !admin.can(Capability::Approve) {
        return html! { p.muted { "Your role (" (view::role_text(admin)) ") cannot approve, deny or revoke." } };
    }
    let end_local = request
        .window
        .end
        .to_zoned(chrome.zone.clone())
        .strftime("%Y-%m-%dT%H:%M")
        .to_string();
    html! {
        @match request.state {
            RequestState::Pending => {
                @if !mine {
                    p.alert.info {
                        @if admin.is_endpoint_user(&request.user) { "This is a request of your own endpoint user: someone else must approve it. You may deny it." }
                        @else if request.approvals.iter().any(|a| a.admin == admin.name) { "You approved this request; it waits for others." }
                        @else { "It waits for level " (request.current_level) "; you approve at level " (admin.approver_level.unwrap_or(0)) "." }
                    }
                }
                div.grid {
                    @if mine {
                    form.card.stack method="post" action=(format!("{base}/approve")) {
                        h2 { "Approve" }
                        (csrf_field(chrome.csrf))
                        details {
                            summary { "Shorten the window or the uses (optional)" }
                            label { "Ends at (" (chrome.zone_name) ")" input type="datetime-local" name="end" value="" max=(end_local) placeholder=(end_local); }
                            label { "Uses (at most " (uses) ")" input type="number" name="uses" min="1" max=(uses) value=""; }
                        }
                        button.primary #approve type="submit" { "Approve at level " (admin.approver_level.unwrap_or(0)) }
                    }
                    }
                    @if admin.approver_level == Some(request.current_level) {
                    form.card.stack method="post" action=(format!("{base}/deny")) {
                        h2 { "Deny" }
                        (csrf_field(chrome.csrf))
                        label { "Reason (the user reads it)" textarea name="reason" rows="3" required maxlength="4096" {} }
                        button.danger #deny type="submit" { "Deny" }
                    }
                    }
                }
            }
            RequestState::Approved => {
                form.card.stack method="post" action=(format!("{base}/revoke")) {
                    h2 { "Revoke" }
                    (csrf_field(chrome.csrf))
                    label { "Reason (optional; the user reads it)" textarea name="reason" rows="2" maxlength="4096" {} }
                    button.danger #revoke type="submit" { "Revoke the approval" }
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Deserialize)]
struct ApproveForm {
    end: Option<String>,
    uses: Option<String>,
}

async fn approve(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<ApproveForm>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/requests/{id}/approve");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    let parsed = (|| -> Result<Narrowing, Refusal> {
        Ok(Narrowing {
            end: time_field("end", &form.form.end, &signed.zone)?,
            uses: match field(&form.form.uses) {
                Some(text) => Some(
                    text.parse()
                        .map_err(|_| invalid(format!("uses: {text:?} is not a number")))?,
                ),
                None => None,
            },
        })
    })();
    let result = match parsed {
        Ok(narrowing) => crate::server::approve_checked(&state, &id, &signed.admin, narrowing)
            .await
            .map_err(Refusal::from),
        Err(refusal) => Err(refusal),
    };
    act_on_request(
        &state,
        &signed,
        &id,
        &path,
        result.map(|(_, done)| {
            if done {
                (
                    "approved-fully",
                    format!("approved {id}: fully approved, grant issued (console)"),
                )
            } else {
                (
                    "approved",
                    format!(
                        "approved {id} at level {} (console)",
                        signed.admin.approver_level.unwrap_or(0)
                    ),
                )
            }
        }),
    )
    .await
}

/// Logs an action on a request and shows where it went: back to the
/// request with a notice, or the request with the refusal in words.
async fn act_on_request(
    state: &Shared,
    signed: &Signed,
    id: &str,
    path: &str,
    result: Result<(&'static str, String), Refusal>,
) -> Result<Response, Refusal> {
    match result {
        Ok((done, detail)) => {
            record(
                state,
                &signed.admin.name,
                format!("POST {path}"),
                StatusCode::SEE_OTHER,
                detail,
            )
            .await;
            Ok(see_other(&format!(
                "/console/requests/{}?done={done}",
                encode(id)
            )))
        }
        Err(refusal) => {
            record(
                state,
                &signed.admin.name,
                format!("POST {path}"),
                refusal.status,
                format!("refused: {}", refusal.message),
            )
            .await;
            if refusal.status == StatusCode::NOT_FOUND {
                return Err(refusal);
            }
            Ok(render_request(
                state,
                signed,
                id,
                None,
                Some(&refusal.message),
                refusal.status,
            )
            .await?
            .into_response())
        }
    }
}

#[derive(Debug, Deserialize)]
struct ReasonForm {
    reason: Option<String>,
}

async fn deny(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<ReasonForm>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/requests/{id}/deny");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    let reason = field(&form.form.reason).unwrap_or_default();
    let result = if reason.is_empty() {
        Err(invalid("A denial needs a reason the user will read."))
    } else if let Err(e) = validate::text("reason", &reason, validate::MAX_TEXT_BYTES) {
        Err(invalid(e))
    } else {
        let (admin, request_id, why) = (signed.admin.clone(), id.clone(), reason.clone());
        blocking(&state, move |db| {
            db.expire_requests(Timestamp::now())?;
            db.deny(&request_id, &admin, &why)
        })
        .await
        .map(|_| ("denied", format!("denied {id}: {reason} (console)")))
    };
    act_on_request(&state, &signed, &id, &path, result).await
}

async fn revoke(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<ReasonForm>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/requests/{id}/revoke");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    let reason = field(&form.form.reason);
    let result = match reason
        .as_deref()
        .map(|r| validate::text("reason", r, validate::MAX_TEXT_BYTES))
    {
        Some(Err(e)) => Err(invalid(e)),
        _ => {
            let (admin, request_id) = (signed.admin.clone(), id.clone());
            blocking(&state, move |db| {
                db.expire_requests(Timestamp::now())?;
                db.revoke(&request_id, &admin, reason.as_deref())
            })
            .await
            .map(|_| ("revoked", format!("revoked {id} (console)")))
        }
    };
    act_on_request(&state, &signed, &id, &path, result).await
}

// ---- history ------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct HistoryQuery {
    state: Option<String>,
    user: Option<String>,
    device: Option<String>,
    rule: Option<String>,
    from: Option<String>,
    to: Option<String>,
    page: Option<String>,
}

async fn history(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, Refusal> {
    let filter = RequestFilter {
        state: match field(&query.state) {
            Some(s) => Some(s.parse().map_err(invalid)?),
            None => None,
        },
        user: name_field("user", &query.user)?,
        device: name_field("device", &query.device)?,
        rule: name_field("rule", &query.rule)?,
        from: time_field("from", &query.from, &signed.zone)?,
        to: time_field("to", &query.to, &signed.zone)?,
    };
    let page_number: u64 = field(&query.page)
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .clamp(1, 1_000_000);
    let (requests, total) = {
        let filter = filter.clone();
        blocking(&state, move |db| {
            db.expire_requests(Timestamp::now())?;
            db.request_page(&filter, (page_number - 1) * u64::from(PAGE), PAGE)
        })
        .await?
    };
    let pages = total.div_ceil(u64::from(PAGE)).max(1);
    let link = |page: u64| {
        let mut parts = vec![format!("page={page}")];
        for (key, value) in [
            ("state", &query.state),
            ("user", &query.user),
            ("device", &query.device),
            ("rule", &query.rule),
            ("from", &query.from),
            ("to", &query.to),
        ] {
            if let Some(v) = field(value) {
                parts.push(format!("{key}={}", encode(&v)));
            }
        }
        format!("/console/history?{}", parts.join("&"))
    };
    let admin = signed.admin.clone();
    let markup = page(&state, &signed, "History", Nav::History, |chrome| {
        let rows: Vec<(AdminRequest, bool)> = requests
            .iter()
            .cloned()
            .map(|r| {
                let mine = is_mine(&admin, &r);
                (r, mine)
            })
            .collect();
        let value = |v: &Option<String>| field(v).unwrap_or_default();
        html! {
            form.filters method="get" action="/console/history" {
                label { "State" select name="state" {
                    option value="" { "any" }
                    @for s in RequestState::ALL { option value=(s.as_str()) selected[filter.state == Some(s)] { (s.as_str()) } }
                } }
                label { "User" input name="user" value=(value(&query.user)); }
                label { "Device" input name="device" value=(value(&query.device)); }
                label { "Rule" input name="rule" value=(value(&query.rule)); }
                label { "From" input type="datetime-local" name="from" value=(value(&query.from)); }
                label { "To" input type="datetime-local" name="to" value=(value(&query.to)); }
                button type="submit" { "Filter" }
                a.button.ghost href="/console/history" { "Clear" }
            }
            p.muted { (total) " request" @if total != 1 { "s" } " · page " (page_number) " of " (pages) }
            (view::request_table(chrome, &rows, "No request matches."))
            nav.pager aria-label="Pages" {
                @if page_number > 1 { a.button.ghost href=(link(page_number - 1)) rel="prev" { "← Newer" } }
                @if page_number < pages { a.button.ghost href=(link(page_number + 1)) rel="next" { "Older →" } }
            }
        }
    })
    .await?;
    Ok(markup.into_response())
}

// ---- devices ------------------------------------------------------------

/// A device that has not checked in for this long shows as offline.
const OFFLINE_AFTER: jiff::SignedDuration = jiff::SignedDuration::from_mins(45);

async fn devices(
    State(state): State<Shared>,
    signed: Signed,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    let devices = blocking(&state, |db| db.devices()).await?;
    let can_manage = signed.admin.can(Capability::ManageFleet);
    let markup = page(&state, &signed, "Devices", Nav::Devices, |chrome| {
        let now = Timestamp::now();
        html! {
            (view::notice(done_text(&flash.done), None))
            p.muted { (devices.len()) " enrolled device" @if devices.len() != 1 { "s" } ". Offline: no check-in for 45 minutes." }
            @if devices.is_empty() { p.empty { "No device has enrolled yet. Make an enrollment token." } } @else {
            div.table-wrap { table {
                thead { tr { th { "Device" } th { "Status" } th { "Last check-in" } th { "Policy" } th { "Audit backlog" } th { "Agent" } th { "Users" } @if can_manage { th { "Manage" } } } }
                tbody {
                    @for d in &devices {
                        @let online = d.last_checkin.is_some_and(|t| t.duration_until(now) < OFFLINE_AFTER);
                        tr {
                            td { strong { (d.device_id) } div.small.muted { (d.hostname) " · " (d.os) } }
                            td { @if d.reset_pending { span.badge.revoked { "reset" } } @else if online { span.badge.approved { "online" } } @else { span.badge { "offline" } } }
                            td.nowrap { @if let Some(t) = d.last_checkin { (when(chrome, t)) } @else { span.muted { "never" } } }
                            td { "v" (d.policy_version.map_or_else(|| "–".to_owned(), |v| v.to_string()))
                                @if d.policy_version != Some(d.bundle_version) { div.small.muted { "platform has v" (d.bundle_version) } } }
                            td { (d.outbox_pending) div.small.muted { "stored up to #" (d.audit_acked_seq) } }
                            td { (d.agent_version) }
                            td.small { (d.users.join(", ")) }
                            @if can_manage {
                                td.actions {
                                    form method="post" action=(format!("/console/devices/{}/reset", encode(&d.device_id))) {
                                        (csrf_field(chrome.csrf)) button.small type="submit" { "Reset" } }
                                    form method="post" action=(format!("/console/devices/{}/remove", encode(&d.device_id))) {
                                        (csrf_field(chrome.csrf)) button.small.danger type="submit" { "Remove" } }
                                }
                            }
                        }
                    }
                }
            } } }
        }
    })
    .await?;
    Ok(markup.into_response())
}

/// Runs an action's database work as the signed-in admin; a refusal is
/// logged (and returned to be shown).
async fn attempt<T: Send + 'static>(
    state: &Shared,
    signed: &Signed,
    path: &str,
    work: impl FnOnce(&crate::db::Db, &Admin) -> Result<T, crate::db::DbError> + Send + 'static,
) -> Result<T, Refusal> {
    let admin = signed.admin.clone();
    let done = blocking(state, move |db| work(db, &admin)).await;
    if let Err(refusal) = &done {
        record(
            state,
            &signed.admin.name,
            format!("POST {path}"),
            refusal.status,
            format!("refused: {}", refusal.message),
        )
        .await;
    }
    done
}

/// Runs an admin action, logs it, and redirects to `to` with `?done=`;
/// a refusal is logged and shown.
async fn act(
    state: &Shared,
    signed: &Signed,
    path: String,
    to: &str,
    done: &str,
    work: impl FnOnce(&crate::db::Db, &Admin) -> Result<String, crate::db::DbError> + Send + 'static,
) -> Result<Response, Refusal> {
    let detail = attempt(state, signed, &path, work).await?;
    record(
        state,
        &signed.admin.name,
        format!("POST {path}"),
        StatusCode::SEE_OTHER,
        detail,
    )
    .await;
    Ok(see_other(&format!("{to}?done={done}")))
}

async fn reset_device(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/devices/{id}/reset");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("device_id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    act(&state, &signed, path, "/console/devices", "reset", move |db, admin| {
        let revoked = db.reset_device(&id, admin)?;
        Ok(format!("reset device {id}: its credentials are void until it enrolls again; {revoked} pending or approved request(s) revoked (console)"))
    })
    .await
}

async fn remove_device(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/devices/{id}/remove");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("device_id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    act(
        &state,
        &signed,
        path,
        "/console/devices",
        "removed",
        move |db, admin| {
            let revoked = db.remove_device(&id, admin)?;
            Ok(format!(
                "removed device {id}; {revoked} pending or approved request(s) revoked (console)"
            ))
        },
    )
    .await
}

// ---- audit --------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct AuditQuery {
    decision: Option<String>,
    device: Option<String>,
    user: Option<String>,
    rule: Option<String>,
    from: Option<String>,
    to: Option<String>,
    q: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

impl AuditQuery {
    fn filter(&self, zone: &jiff::tz::TimeZone) -> Result<AuditFilter, Refusal> {
        Ok(AuditFilter {
            decision: match field(&self.decision) {
                Some(d) => {
                    validate::name("decision", &d, 64).map_err(invalid)?;
                    Some(d)
                }
                None => None,
            },
            device: name_field("device", &self.device)?,
            user: name_field("user", &self.user)?,
            rule: name_field("rule", &self.rule)?,
            from: time_field("from", &self.from, zone)?,
            to: time_field("to", &self.to, zone)?,
            text: match field(&self.q) {
                Some(q) => {
                    validate::name("q", &q, validate::MAX_NAME_BYTES).map_err(invalid)?;
                    Some(q)
                }
                None => None,
            },
        })
    }

    /// The filters as a query string (for links and exports).
    fn query_string(&self) -> String {
        [
            ("decision", &self.decision),
            ("device", &self.device),
            ("user", &self.user),
            ("rule", &self.rule),
            ("from", &self.from),
            ("to", &self.to),
            ("q", &self.q),
        ]
        .iter()
        .filter_map(|(k, v)| field(v).map(|v| format!("{k}={}", encode(&v))))
        .collect::<Vec<_>>()
        .join("&")
    }

    fn cursor(value: &Option<String>) -> Option<u64> {
        field(value).and_then(|v| v.parse().ok())
    }
}

/// A record's fields as the table shows them.
fn record_fields(row: &AuditRow) -> serde_json::Value {
    serde_json::from_str(&row.record).unwrap_or_default()
}

fn text_of<'a>(record: &'a serde_json::Value, key: &str) -> &'a str {
    record.get(key).and_then(|v| v.as_str()).unwrap_or("")
}

fn audit_tbody_rows(chrome: &Chrome<'_>, rows: &[AuditRow]) -> Markup {
    html! {
        @for row in rows {
            @let record = record_fields(row);
            @let event = text_of(&record, "event");
            @let time = text_of(&record, "time").parse::<Timestamp>().ok();
            tr data-cursor=(row.cursor) {
                td.nowrap { a href=(format!("/console/audit/{}", row.cursor)) { @if let Some(t) = time { (when(chrome, t)) } @else { "#" (row.cursor) } } }
                td { (row.device_id) }
                td { @if event == "exec" { (view::decision_badge(text_of(&record, "decision"))) } @else { span.badge { (event) } } }
                td { (text_of(&record, "user")) }
                td.path.mono { (text_of(&record, "path")) }
                td { (text_of(&record, "rule_id")) }
            }
        }
    }
}

fn audit_table(chrome: &Chrome<'_>, rows: &[AuditRow], empty: &str) -> Markup {
    html! {
        div.table-wrap { table #audit-table {
            thead { tr { th { "Time" } th { "Device" } th { "Decision" } th { "User" } th { "Path" } th { "Rule" } } }
            tbody #audit-rows { (audit_tbody_rows(chrome, rows)) }
        } }
        @if rows.is_empty() { p.empty #audit-empty { (empty) } }
    }
}

async fn audit(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Refusal> {
    let filter = query.filter(&signed.zone)?;
    let before = AuditQuery::cursor(&query.before);
    let (rows, head) = blocking(&state, move |db| {
        Ok((
            db.audit_page(&filter, before, None, PAGE)?,
            db.audit_head()?,
        ))
    })
    .await?;
    let qs = query.query_string();
    let newest = rows
        .first()
        .map_or(head, |r| r.cursor.max(head.min(r.cursor)));
    let markup = page(&state, &signed, "Audit", Nav::Audit, |chrome| {
        let value = |v: &Option<String>| field(v).unwrap_or_default();
        html! {
            form.filters method="get" action="/console/audit" {
                label { "Decision" select name="decision" {
                    option value="" { "any" }
                    @for d in ["allow", "deny", "would_deny"] { option value=(d) selected[field(&query.decision).as_deref() == Some(d)] { (d) } }
                } }
                label { "Device" input name="device" value=(value(&query.device)); }
                label { "User" input name="user" value=(value(&query.user)); }
                label { "Rule" input name="rule" value=(value(&query.rule)); }
                label { "From" input type="datetime-local" name="from" value=(value(&query.from)); }
                label { "To" input type="datetime-local" name="to" value=(value(&query.to)); }
                label { "Text" input type="search" name="q" value=(value(&query.q)); }
                button type="submit" { "Filter" }
                a.button.ghost href="/console/audit" { "Clear" }
            }
            div.toolbar {
                a.button.ghost href=(format!("/console/audit/export.csv?{qs}")) download { "Export CSV" }
                a.button.ghost href=(format!("/console/audit/export.jsonl?{qs}")) download { "Export JSON Lines" }
                @if before.is_none() {
                    label.live-toggle.js-only { input type="checkbox" #live-tail data-rows=(format!("/console/audit/rows?{qs}")) data-after=(newest); " Live tail" }
                }
            }
            (audit_table(chrome, &rows, "No record matches."))
            nav.pager aria-label="Pages" {
                @if let Some(last) = rows.last() {
                    @if rows.len() as u32 == PAGE {
                        a.button.ghost rel="next" href=(format!("/console/audit?{qs}&before={}", last.cursor)) { "Older →" }
                    }
                }
            }
        }
    })
    .await?;
    Ok(markup.into_response())
}

/// New rows for the live tail: records after `after`, newest first.
async fn audit_rows(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Refusal> {
    let filter = query.filter(&signed.zone)?;
    let after = AuditQuery::cursor(&query.after).unwrap_or(0);
    let rows = blocking(&state, move |db| {
        db.audit_page(&filter, None, Some(after), 200)
    })
    .await?;
    let chrome = chrome(&signed, (0, 0));
    let mut response = audit_tbody_rows(&chrome, &rows).into_response();
    if let Some(first) = rows.first()
        && let Ok(value) = HeaderValue::from_str(&first.cursor.to_string())
    {
        response.headers_mut().insert("x-epm-after", value);
    }
    Ok(response)
}

/// At most this many records in one export.
const EXPORT_LIMIT: u32 = 100_000;

async fn export(
    state: &Shared,
    signed: &Signed,
    query: &AuditQuery,
    format: &str,
) -> Result<(Vec<AuditRow>, String), Refusal> {
    let filter = query.filter(&signed.zone)?;
    let rows = blocking(state, move |db| {
        db.audit_page(&filter, None, None, EXPORT_LIMIT)
    })
    .await?;
    record(
        state,
        &signed.admin.name,
        format!("GET /console/audit/export.{format}"),
        StatusCode::OK,
        format!(
            "exported {} audit record(s) as {format}{}",
            rows.len(),
            match query.query_string() {
                qs if qs.is_empty() => String::new(),
                qs => format!(" ({qs})"),
            }
        ),
    )
    .await;
    Ok((rows, format!("attachment; filename=\"epm-audit.{format}\"")))
}

/// One CSV field: quoted, quotes doubled, and a leading `=`, `+`, `-` or
/// `@` defused so a spreadsheet does not run it as a formula.
fn csv_field(text: &str) -> String {
    let defused = if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    };
    format!("\"{}\"", defused.replace('"', "\"\""))
}

async fn export_csv(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Refusal> {
    let (rows, disposition) = export(&state, &signed, &query, "csv").await?;
    let mut out = String::from(
        "cursor,device_id,seq,time,event,decision,action,user,path,sha256,rule_id,reason\r\n",
    );
    for row in rows.iter().rev() {
        let r = record_fields(row);
        let seq = r
            .get("seq")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let fields: Vec<String> = [
            row.cursor.to_string(),
            row.device_id.clone(),
            seq.to_string(),
        ]
        .into_iter()
        .chain(
            [
                "time", "event", "decision", "action", "user", "path", "sha256", "rule_id",
                "reason",
            ]
            .iter()
            .map(|k| text_of(&r, k).to_owned()),
        )
        .map(|f| csv_field(&f))
        .collect();
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        out,
    )
        .into_response())
}

async fn export_jsonl(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Refusal> {
    let (rows, disposition) = export(&state, &signed, &query, "jsonl").await?;
    let mut out = String::new();
    for row in rows.iter().rev() {
        // Records are stored as the agent sent them: one JSON object, one
        // line (a record with a raw line break is written re-serialized).
        if row.record.contains('\n') {
            out.push_str(&record_fields(row).to_string());
        } else {
            out.push_str(&row.record);
        }
        out.push('\n');
    }
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "application/jsonl; charset=utf-8".to_owned(),
            ),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        out,
    )
        .into_response())
}

async fn audit_record(
    State(state): State<Shared>,
    signed: Signed,
    Path(cursor): Path<String>,
) -> Result<Response, Refusal> {
    let cursor: u64 = cursor
        .parse()
        .map_err(|_| Refusal::new(StatusCode::NOT_FOUND, "Not found", "No such audit record."))?;
    let row = blocking(&state, move |db| db.audit_record(cursor)).await?;
    let record = record_fields(&row);
    let pretty = serde_json::to_string_pretty(&record).unwrap_or_else(|_| row.record.clone());
    let lines = highlight::tokenize(&pretty);
    let markup = page(&state, &signed, &format!("Audit record #{cursor}"), Nav::Audit, |chrome| {
        let time = text_of(&record, "time").parse::<Timestamp>().ok();
        html! {
            dl.facts.card {
                dt { "Device" } dd { a href=(format!("/console/audit?device={}", encode(&row.device_id))) { (row.device_id) } }
                dt { "Sequence" } dd { (record.get("seq").and_then(serde_json::Value::as_u64).unwrap_or(0)) }
                @if let Some(t) = time { dt { "Time" } dd { (when_both(chrome, t)) } }
                dt { "Event" } dd { (text_of(&record, "event")) }
                @if !text_of(&record, "decision").is_empty() { dt { "Decision" } dd { (view::decision_badge(text_of(&record, "decision"))) } }
                @if !text_of(&record, "user").is_empty() { dt { "User" } dd { (text_of(&record, "user")) } }
                @if !text_of(&record, "path").is_empty() { dt { "Path" } dd.mono { (text_of(&record, "path")) } }
                @if !text_of(&record, "rule_id").is_empty() { dt { "Rule" } dd { (text_of(&record, "rule_id")) } }
                @if !text_of(&record, "reason").is_empty() { dt { "Reason" } dd { (text_of(&record, "reason")) } }
            }
            h2 { "As the agent wrote it" }
            (code_block(&lines, &BTreeMap::new()))
        }
    })
    .await?;
    Ok(markup.into_response())
}

// ---- policies -----------------------------------------------------------

/// A document with line numbers, highlighted, and the notes (errors)
/// shown under the line they belong to.
fn code_block(lines: &[Vec<highlight::Token>], notes: &BTreeMap<usize, Vec<String>>) -> Markup {
    html! {
        div.code { table.code-table {
            tbody {
                @for (n, line) in lines.iter().enumerate() {
                    tr.has-note[notes.contains_key(&n)] id=(format!("L{}", n + 1)) {
                        td.ln { (n + 1) }
                        td.src { code { (highlight::render_line(line)) } }
                    }
                    @if let Some(notes) = notes.get(&n) {
                        @for note in notes {
                            tr.note { td.ln { "!" } td.src { span.error-note role="alert" { (note) } } }
                        }
                    }
                }
            }
        } }
    }
}

async fn policies(
    State(state): State<Shared>,
    signed: Signed,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    let entries = blocking(&state, |db| db.policies()).await?;
    let can_edit = signed.admin.can(Capability::ManagePolicies);
    let markup = page(&state, &signed, "Policies", Nav::Policies, |chrome| html! {
        (view::notice(done_text(&flash.done), None))
        p.lead { "Each document applies to a scope: every device (general), one device, one user's devices or a group's. Devices merge the documents that apply to them." }
        @if entries.is_empty() { p.empty { "No policy yet: devices get an allow-all bundle." } } @else {
        div.table-wrap { table {
            thead { tr { th { "Scope" } th { "Rules" } th { "Revision" } th { "Pushed" } } }
            tbody { @for e in &entries { tr {
                td { a href=(format!("/console/policies/view?scope={}", encode(&e.scope))) { strong { (e.scope) } } }
                td { (e.rules) }
                td { (e.revision) }
                td { (e.pushed_by) " · " (when(chrome, e.pushed_at)) }
            } } }
        } } }
        @if can_edit {
            div.grid {
                form.card.stack method="get" action="/console/policies/edit" {
                    h2 { "Write or edit a document" }
                    label { "Scope" input name="scope" value="general" placeholder="general, device:ID, user:NAME, group:NAME" required; }
                    button type="submit" { "Open the editor" }
                }
                form.card.stack method="post" action="/console/policies/upload" enctype="multipart/form-data" {
                    h2 { "Upload a file" }
                    (csrf_field(chrome.csrf))
                    label { "Scope" input name="scope" value="general" required; }
                    label { "Policy document (JSON)" input type="file" name="document" accept=".json,application/json" required; }
                    button type="submit" { "Check and show the changes" }
                }
            }
        }
    })
    .await?;
    Ok(markup.into_response())
}

#[derive(Debug, Deserialize)]
struct ScopeQuery {
    scope: Option<String>,
}

fn parse_scope(text: &Option<String>) -> Result<PolicyScope, Refusal> {
    field(text)
        .unwrap_or_else(|| "general".into())
        .parse()
        .map_err(invalid)
}

async fn policy_view(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<ScopeQuery>,
) -> Result<Response, Refusal> {
    let scope = parse_scope(&query.scope)?;
    let document = {
        let scope = scope.clone();
        blocking(&state, move |db| db.policy_document(&scope)).await?
    }
    .ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("No policy for {scope}."),
        )
    })?;
    let lines = highlight::tokenize(&document);
    let can_edit = signed.admin.can(Capability::ManagePolicies);
    let markup = page(&state, &signed, &format!("Policy: {scope}"), Nav::Policies, |chrome| html! {
        div.toolbar {
            @if can_edit {
                a.button href=(format!("/console/policies/edit?scope={}", encode(&scope.to_string()))) { "Edit" }
                form method="post" action="/console/policies/delete" {
                    (csrf_field(chrome.csrf))
                    input type="hidden" name="scope" value=(scope.to_string());
                    button.danger type="submit" { "Delete" }
                }
            }
        }
        (code_block(&lines, &BTreeMap::new()))
    })
    .await?;
    Ok(markup.into_response())
}

async fn policy_edit(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<ScopeQuery>,
) -> Result<Response, Refusal> {
    signed.admin.require(Capability::ManagePolicies)?;
    let scope = parse_scope(&query.scope)?;
    let current = {
        let scope = scope.clone();
        blocking(&state, move |db| db.policy_document(&scope)).await?
    };
    let text = current.clone().unwrap_or_else(|| {
        "{\n  \"version\": 1,\n  \"default_action\": \"allow\",\n  \"rules\": [\n  ]\n}\n".into()
    });
    let markup = page(
        &state,
        &signed,
        &format!("Edit policy: {scope}"),
        Nav::Policies,
        |chrome| editor(chrome, &scope, &text, current.as_deref()),
    )
    .await?;
    Ok(markup.into_response())
}

/// The edit form: the document, and the stored version it is based on.
fn editor(chrome: &Chrome<'_>, scope: &PolicyScope, text: &str, base: Option<&str>) -> Markup {
    html! {
        form.stack method="post" action="/console/policies/preview" {
            (csrf_field(chrome.csrf))
            input type="hidden" name="scope" value=(scope.to_string());
            input type="hidden" name="base" value=(base.map(fingerprint).unwrap_or_default());
            label { span { "Document " span.muted { "(the format is docs/policy.md's)" } }
                textarea.code-input name="document" rows="24" spellcheck="false" autocapitalize="off" { (text) } }
            div.toolbar { button.primary type="submit" { "Check and show the changes" } a.button.ghost href="/console/policies" { "Cancel" } }
        }
    }
}

/// A short fingerprint of a stored document, so a push can tell that
/// someone else changed it since the diff was shown.
fn fingerprint(document: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(document.as_bytes())[..12])
}

#[derive(Debug, Deserialize)]
struct PolicyForm {
    scope: Option<String>,
    document: Option<String>,
    base: Option<String>,
}

/// The checks a pushed document passes, as the API's push makes them:
/// every validation error (with its rule), the level cap, lint warnings.
async fn check_policy(
    text: String,
) -> Result<Result<(u64, Vec<String>), Vec<epm_policy::PolicyError>>, Refusal> {
    tokio::task::spawn_blocking(move || {
        let policy = match epm_policy::Policy::from_json(&text) {
            Ok(policy) => policy,
            Err(errors) => return Err(errors.errors().to_vec()),
        };
        let levels = crate::merge::highest_approval_level(&text);
        if levels > validate::MAX_APPROVAL_LEVEL {
            return Err(vec![epm_policy::PolicyError {
                rule: None,
                field: String::new(),
                message: format!(
                    "a rule has {levels} approval levels; the platform has approvers for at most {}",
                    validate::MAX_APPROVAL_LEVEL
                ),
            }]);
        }
        Ok((
            policy.rules.len() as u64,
            policy.lint().iter().map(ToString::to_string).collect(),
        ))
    })
    .await
    .map_err(Refusal::internal)
}

async fn policy_preview(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<PolicyForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/policies/preview")?;
    let form = form.form;
    preview(
        &state,
        &signed,
        form.scope,
        form.document.unwrap_or_default(),
    )
    .await
}

async fn policy_upload(
    State(state): State<Shared>,
    signed: Signed,
    mut multipart: Multipart,
) -> Result<Response, Refusal> {
    let mut fields: BTreeMap<String, Bytes> = BTreeMap::new();
    while let Some(part) = multipart.next_field().await.map_err(invalid)? {
        let name = part.name().unwrap_or_default().to_owned();
        if !["csrf", "scope", "document"].contains(&name.as_str()) {
            continue;
        }
        fields.insert(name, part.bytes().await.map_err(invalid)?);
    }
    let text = |k: &str| {
        fields
            .get(k)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    signed.check_csrf(
        &state,
        &text("csrf").unwrap_or_default(),
        "/console/policies/upload",
    )?;
    let document = match fields.get("document") {
        Some(bytes) => {
            String::from_utf8(bytes.to_vec()).map_err(|_| invalid("the file is not UTF-8 text"))?
        }
        None => String::new(),
    };
    preview(&state, &signed, text("scope"), document).await
}

/// Checks a document and shows either every error at its rule, or the
/// diff against the stored version with a button to push it.
async fn preview(
    state: &Shared,
    signed: &Signed,
    scope: Option<String>,
    document: String,
) -> Result<Response, Refusal> {
    signed.admin.require(Capability::ManagePolicies)?;
    let scope = parse_scope(&scope)?;
    if document.len() > epm_api::MAX_POLICY_PUSH_BYTES {
        return Err(invalid(format!(
            "the document is over {} MiB",
            epm_api::MAX_POLICY_PUSH_BYTES >> 20
        )));
    }
    let current = {
        let scope = scope.clone();
        blocking(state, move |db| db.policy_document(&scope)).await?
    };
    let checked = check_policy(document.clone()).await?;
    let title = format!("Push policy: {scope}");
    let (status, markup) = match checked {
        Err(errors) => {
            let lines = highlight::tokenize(&document);
            let rules = highlight::rule_lines(&lines);
            let mut notes: BTreeMap<usize, Vec<String>> = BTreeMap::new();
            let mut general = Vec::new();
            for error in &errors {
                let at = error
                    .rule
                    .as_deref()
                    .and_then(|r| highlight::line_of_rule(&rules, r));
                match at {
                    Some(line) => notes.entry(line).or_default().push(error.to_string()),
                    None => general.push(error.to_string()),
                }
            }
            let markup = page(state, signed, &title, Nav::Policies, |chrome| html! {
                p.alert.error role="alert" { "The document has " (errors.len()) " problem" @if errors.len() != 1 { "s" } "; nothing was pushed. Each is shown at its rule." }
                @for g in &general { p.alert.error { (g) } }
                (code_block(&lines, &notes))
                h2 { "Fix it" }
                (editor(chrome, &scope, &document, current.as_deref()))
            })
            .await?;
            (StatusCode::UNPROCESSABLE_ENTITY, markup)
        }
        Ok((rules, warnings)) => {
            let diff = highlight::diff(current.as_deref().unwrap_or(""), &document);
            let markup = page(state, signed, &title, Nav::Policies, |chrome| html! {
                p.alert.ok role="status" { "The document is valid: " (rules) " rule" @if rules != 1 { "s" } ". Review the changes, then push." }
                @for w in &warnings { p.alert.info { "Advice: " (w) } }
                @if current.is_none() { p.muted { "There is no document for " (scope.to_string()) " yet: everything is new." } }
                @if diff.is_empty() { p.empty { "No change from the stored document." } } @else {
                    div.code { table.code-table.diff { tbody {
                        @for line in &diff {
                            @match line {
                                None => { tr.hunk { td.ln {} td.ln {} td.src { "⋯" } } }
                                Some((sign, old, new, text)) => {
                                    tr class=(match sign { '-' => "del", '+' => "ins", _ => "ctx" }) {
                                        td.ln { (old.map(|n| n.to_string()).unwrap_or_default()) }
                                        td.ln { (new.map(|n| n.to_string()).unwrap_or_default()) }
                                        td.src { code { (sign) " " (text) } }
                                    }
                                }
                            }
                        }
                    } } }
                }
                form.stack method="post" action="/console/policies/push" {
                    (csrf_field(chrome.csrf))
                    input type="hidden" name="scope" value=(scope.to_string());
                    input type="hidden" name="base" value=(current.as_deref().map(fingerprint).unwrap_or_default());
                    textarea.hidden name="document" aria-hidden="true" tabindex="-1" { (document) }
                    div.toolbar {
                        button.primary #push type="submit" { "Push to " (scope.to_string()) }
                        a.button.ghost href="/console/policies" { "Cancel" }
                    }
                }
            })
            .await?;
            (StatusCode::OK, markup)
        }
    };
    Ok((status, markup).into_response())
}

async fn policy_push(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<PolicyForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/policies/push")?;
    signed.admin.require(Capability::ManagePolicies)?;
    let form = form.form;
    let scope = parse_scope(&form.scope)?;
    let document = form.document.unwrap_or_default();
    let (rules, _) = match check_policy(document.clone()).await? {
        Ok(checked) => checked,
        Err(_) => return preview(&state, &signed, Some(scope.to_string()), document).await,
    };
    let base = field(&form.base).unwrap_or_default();
    let path = "/console/policies/push".to_owned();
    act(&state, &signed, path, "/console/policies", "pushed", move |db, admin| {
        let stored = db.policy_document(&scope)?;
        if stored.as_deref().map(fingerprint).unwrap_or_default() != base {
            return Err(crate::db::DbError::Conflict(format!(
                "the document for {scope} changed since you opened it; nothing was pushed. Open it again to see the changes."
            )));
        }
        let entry = db.put_policy(&scope, &document, rules, admin)?;
        Ok(format!("pushed {scope} revision {} ({rules} rules) (console)", entry.revision))
    })
    .await
}

async fn policy_delete(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<PolicyForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/policies/delete")?;
    let scope = parse_scope(&form.form.scope)?;
    act(
        &state,
        &signed,
        "/console/policies/delete".into(),
        "/console/policies",
        "deleted",
        move |db, admin| {
            if !db.delete_policy(&scope, admin)? {
                return Err(crate::db::DbError::NotFound(format!(
                    "no policy for {scope}"
                )));
            }
            Ok(format!("deleted {scope} (console)"))
        },
    )
    .await
}

// ---- enrollment tokens ----------------------------------------------------

async fn enroll_tokens(
    State(state): State<Shared>,
    signed: Signed,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    let tokens = blocking(&state, |db| db.enroll_tokens()).await?;
    let markup = enroll_tokens_page(&state, &signed, &tokens, done_text(&flash.done), None).await?;
    Ok(markup.into_response())
}

async fn enroll_tokens_page(
    state: &Shared,
    signed: &Signed,
    tokens: &[epm_api::admin::EnrollTokenInfo],
    done: Option<&str>,
    created: Option<(&str, &str)>,
) -> Result<Markup, Refusal> {
    let can_manage = signed.admin.can(Capability::ManageFleet);
    page(state, signed, "Enrollment tokens", Nav::Enrollment, |chrome| {
        let now = Timestamp::now();
        html! {
            (view::notice(done, None))
            @if let Some((id, token)) = created {
                div.alert.ok role="status" {
                    p { "Token " strong { (id) } " made. It is shown once: give it to agents as " code { "[platform] enrollment_token" } "." }
                    p { input.mono.copy readonly value=(token) aria-label="The new enrollment token"; }
                }
            }
            @if can_manage {
                form.filters method="post" action="/console/enroll-tokens" {
                    (csrf_field(chrome.csrf))
                    label { "Devices it may enroll" input type="number" name="uses" min="1" max="1000000" value="1" required; }
                    label { "Valid for (hours)" input type="number" name="hours" min="1" max="8784" value="24" required; }
                    button.primary type="submit" { "Make a token" }
                }
            }
            @if tokens.is_empty() { p.empty { "No enrollment token yet." } } @else {
            div.table-wrap { table {
                thead { tr { th { "Id" } th { "Uses left" } th { "Expires" } th { "Made by" } th { "State" } @if can_manage { th {} } } }
                tbody { @for t in tokens {
                    @let live = t.revoked_by.is_none() && t.uses_left > 0 && t.expires_at > now;
                    tr {
                        td.mono { (t.id) }
                        td { (t.uses_left) }
                        td.nowrap { (when(chrome, t.expires_at)) }
                        td { (t.created_by) " · " (when(chrome, t.created_at)) }
                        td { @if let Some(by) = &t.revoked_by { span.badge.revoked { "revoked" } span.small.muted { " by " (by) } }
                             @else if live { span.badge.approved { "valid" } } @else { span.badge { "spent or expired" } } }
                        @if can_manage { td { @if live {
                            form method="post" action=(format!("/console/enroll-tokens/{}/revoke", encode(&t.id))) {
                                (csrf_field(chrome.csrf)) button.small.danger type="submit" { "Revoke" } }
                        } } }
                    }
                } }
            } } }
        }
    })
    .await
}

#[derive(Debug, Deserialize)]
struct TokenForm {
    uses: Option<String>,
    hours: Option<String>,
}

async fn create_enroll_token(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<TokenForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/enroll-tokens")?;
    let number = |label: &str, v: &Option<String>, max: u32| -> Result<u32, Refusal> {
        field(v)
            .and_then(|t| t.parse().ok())
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| invalid(format!("{label}: a number from 1 to {max}")))
    };
    let uses = number("uses", &form.form.uses, 1_000_000)?;
    let hours = number("hours", &form.form.hours, 366 * 24)?;
    let expires = Timestamp::now() + jiff::SignedDuration::from_hours(i64::from(hours));
    let path = "/console/enroll-tokens";
    let (id, token) = attempt(&state, &signed, path, move |db, admin| {
        db.create_enroll_token(uses, expires, admin)
    })
    .await?;
    record(
        &state,
        &signed.admin.name,
        format!("POST {path}"),
        StatusCode::OK,
        format!("enrollment token {id} for {uses} devices, expires {expires} (console)"),
    )
    .await;
    let tokens = blocking(&state, |db| db.enroll_tokens()).await?;
    Ok(
        enroll_tokens_page(&state, &signed, &tokens, None, Some((&id, &token)))
            .await?
            .into_response(),
    )
}

async fn revoke_enroll_token(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/enroll-tokens/{id}/revoke");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    act(
        &state,
        &signed,
        path,
        "/console/enroll-tokens",
        "revoked-token",
        move |db, admin| {
            db.revoke_enroll_token(&id, admin)?;
            Ok(format!("revoked enrollment token {id} (console)"))
        },
    )
    .await
}

// ---- admins -------------------------------------------------------------

async fn admins(
    State(state): State<Shared>,
    signed: Signed,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    let (admins, methods) =
        blocking(&state, |db| Ok((db.admins()?, db.sign_in_methods()?))).await?;
    let is_owner = signed.admin.can(Capability::ManageAdmins);
    let markup = page(&state, &signed, "Admins", Nav::Admins, |chrome| {
        let role_select = |current: AdminRole| html! {
            select name="role" { @for r in AdminRole::ALL { option value=(r.as_str()) selected[r == current] { (r.as_str()) } } }
        };
        html! {
            (view::notice(done_text(&flash.done), None))
            div.table-wrap { table {
                thead { tr { th { "Name" } th { "Role" } th { "Level" } th { "Endpoint users" } th { "Sign-in" } th { "State" } @if is_owner { th { "Change" } } } }
                tbody { @for a in &admins {
                    @let (password, totp) = methods.iter().find(|m| m.0 == a.name).map_or((false, false), |m| (m.1, m.2));
                    tr {
                        td { strong { (a.name) } div.small.muted { "since " (when(chrome, a.created_at)) } }
                        td { (a.role.as_str()) }
                        td { (a.approver_level.map_or_else(|| "–".to_owned(), |l| l.to_string())) }
                        td.small { (a.endpoint_users.join(", ")) }
                        td.small { @if password { "password" } @else { span.muted { "API token only" } } @if totp { " + TOTP" } }
                        td { @if a.disabled { span.badge.denied { "disabled" } } @else { span.badge.approved { "enabled" } } }
                        @if is_owner { td {
                            form.inline method="post" action=(format!("/console/admins/{}/update", encode(&a.name))) {
                                (csrf_field(chrome.csrf))
                                (role_select(a.role))
                                input type="number" name="level" min="1" max="16" value=(a.approver_level.map(|l| l.to_string()).unwrap_or_default()) aria-label="Approver level" placeholder="level";
                                input name="endpoint_users" value=(a.endpoint_users.join(", ")) aria-label="Endpoint users";
                                button.small type="submit" { "Save" }
                            }
                            form.inline method="post" action=(format!("/console/admins/{}/{}", encode(&a.name), if a.disabled { "enable" } else { "disable" })) {
                                (csrf_field(chrome.csrf))
                                button.small.(if a.disabled { "ghost" } else { "danger" }) type="submit" { @if a.disabled { "Enable" } @else { "Disable" } }
                            }
                        } }
                    }
                } }
            } }
            @if is_owner {
                form.card.stack method="post" action="/console/admins" {
                    h2 { "New admin" }
                    (csrf_field(chrome.csrf))
                    div.row {
                        label { "Name" input name="name" required maxlength="64" pattern="[A-Za-z0-9._@-]+"; }
                        label { "Role" (role_select(AdminRole::Approver)) }
                        label { "Approver level" input type="number" name="level" min="1" max="16"; }
                        label { "Endpoint users (comma-separated; default: the name)" input name="endpoint_users"; }
                    }
                    p.small.muted { "The new admin's API token is shown once; a console password is set with " code { "epm-platform admin set-password" } "." }
                    button.primary type="submit" { "Create" }
                }
            } @else {
                p.muted { "Only an owner creates and changes admins." }
            }
        }
    })
    .await?;
    Ok(markup.into_response())
}

#[derive(Debug, Deserialize)]
struct AdminForm {
    name: Option<String>,
    role: Option<String>,
    level: Option<String>,
    endpoint_users: Option<String>,
}

impl AdminForm {
    fn role(&self) -> Result<Option<AdminRole>, Refusal> {
        field(&self.role)
            .map(|r| r.parse().map_err(invalid))
            .transpose()
    }

    fn level(&self) -> Result<Option<u32>, Refusal> {
        field(&self.level)
            .map(|l| {
                l.parse()
                    .map_err(|_| invalid(format!("level: {l:?} is not a number")))
            })
            .transpose()
    }

    fn endpoint_users(&self) -> Option<Vec<String>> {
        field(&self.endpoint_users).map(|u| {
            u.split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
    }
}

async fn create_admin(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<AdminForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/admins")?;
    let form = form.form;
    let request = CreateAdmin {
        name: field(&form.name).unwrap_or_default(),
        role: form.role()?,
        approver_level: form.level()?,
        endpoint_users: form.endpoint_users(),
    };
    request.validate().map_err(invalid)?;
    let path = "/console/admins";
    let (created, detail) = attempt(&state, &signed, path, move |db, admin| {
        db.create_admin(Actor::Admin(admin), &request)
    })
    .await?;
    record(
        &state,
        &signed.admin.name,
        format!("POST {path}"),
        StatusCode::OK,
        format!("{detail} (console)"),
    )
    .await;
    let markup = page(&state, &signed, "Admin created", Nav::Admins, |_| html! {
        div.alert.ok role="status" {
            p { "Admin " strong { (created.admin.name) } " created: " (created.admin.role.as_str())
                @if let Some(l) = created.admin.approver_level { ", approves at level " (l) } "." }
            p { "Their API token, shown once (" code { "EPM_ADMIN_TOKEN" } "):" }
            p { input.mono.copy readonly value=(created.token) aria-label="The new admin's token"; }
            p { "For the console, set a password on the server: " code { "epm-platform admin set-password --name " (created.admin.name) } }
        }
        p { a href="/console/admins" { "Back to the admins" } }
    })
    .await?;
    Ok(markup.into_response())
}

async fn update_admin(
    State(state): State<Shared>,
    signed: Signed,
    Path(name): Path<String>,
    Form(form): Form<WithCsrf<AdminForm>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/admins/{name}/update");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("name", &name, 64).map_err(invalid)?;
    let form = form.form;
    let update = UpdateAdmin {
        role: form.role()?.ok_or_else(|| invalid("role: choose one"))?,
        approver_level: form.level()?,
        endpoint_users: form.endpoint_users().unwrap_or_else(|| vec![name.clone()]),
    };
    update.validate().map_err(invalid)?;
    act(
        &state,
        &signed,
        path,
        "/console/admins",
        "updated",
        move |db, admin| {
            let (_, detail) = db.update_admin(admin, &name, &update)?;
            Ok(format!("{detail} (console)"))
        },
    )
    .await
}

async fn disable_admin(
    State(state): State<Shared>,
    signed: Signed,
    Path(name): Path<String>,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    set_disabled(state, signed, name, form.csrf, true).await
}

async fn enable_admin(
    State(state): State<Shared>,
    signed: Signed,
    Path(name): Path<String>,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    set_disabled(state, signed, name, form.csrf, false).await
}

async fn set_disabled(
    state: Shared,
    signed: Signed,
    name: String,
    csrf: String,
    disabled: bool,
) -> Result<Response, Refusal> {
    let verb = if disabled { "disable" } else { "enable" };
    let path = format!("/console/admins/{name}/{verb}");
    signed.check_csrf(&state, &csrf, &path)?;
    validate::name("name", &name, 64).map_err(invalid)?;
    act(
        &state,
        &signed,
        path,
        "/console/admins",
        "updated",
        move |db, admin| {
            db.set_admin_disabled(admin, &name, disabled)?;
            Ok(format!("{verb}d admin {name} (console)"))
        },
    )
    .await
}

// ---- activity -------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct ActivityQuery {
    admin: Option<String>,
    before: Option<String>,
}

async fn activity(
    State(state): State<Shared>,
    signed: Signed,
    Query(query): Query<ActivityQuery>,
) -> Result<Response, Refusal> {
    let admin = name_field("admin", &query.admin)?;
    let before = AuditQuery::cursor(&query.before);
    let (entries, refused) = {
        let admin = admin.clone();
        blocking(&state, move |db| {
            Ok((
                db.activity_page(admin.as_deref(), before, PAGE)?,
                db.refused_calls(20)?,
            ))
        })
        .await?
    };
    let markup = page(&state, &signed, "Activity", Nav::Activity, |chrome| html! {
        p.lead { "Every call of the REST API and every action in the console, with who, when and what changed." }
        form.filters method="get" action="/console/activity" {
            label { "Admin" input name="admin" value=(admin.clone().unwrap_or_default()); }
            button type="submit" { "Filter" }
            a.button.ghost href="/console/activity" { "Clear" }
        }
        div.table-wrap { table {
            thead { tr { th { "When" } th { "Who" } th { "Call" } th { "Status" } th { "What" } } }
            tbody { @for e in &entries { tr {
                td.nowrap { (when(chrome, e.at)) }
                td { a href=(format!("/console/activity?admin={}", encode(&e.admin))) { (e.admin) } }
                td.mono.small { (e.call) }
                td { span class=(if e.status < 400 { "badge approved" } else { "badge denied" }) { (e.status) } }
                td.just { (e.detail.clone().unwrap_or_default()) }
            } } }
        } }
        nav.pager { @if let Some(last) = entries.last() { @if entries.len() as u32 == PAGE {
            a.button.ghost rel="next" href=(format!("/console/activity?before={}{}", last.id, admin.as_deref().map(|a| format!("&admin={}", encode(a))).unwrap_or_default())) { "Older →" }
        } } }
        h2 { "Refused calls, counted" }
        p.muted { "Calls refused before anyone was authenticated, over a rate, or refused sign-ins past their limit: one row per hour, source and call." }
        div.table-wrap { table {
            thead { tr { th { "Last" } th { "Source" } th { "Who" } th { "Call" } th { "Status" } th { "Count" } } }
            tbody { @for r in &refused { tr {
                td.nowrap { (when(chrome, r.last_at)) }
                td.mono { (r.source) } td { (r.who) } td.mono.small { (r.call) } td { (r.status) } td { (r.count) }
            } } }
        } }
    })
    .await?;
    Ok(markup.into_response())
}

// ---- webhooks -------------------------------------------------------------

async fn webhooks(
    State(state): State<Shared>,
    signed: Signed,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    let markup = webhooks_page(&state, &signed, done_text(&flash.done), None).await?;
    Ok(markup.into_response())
}

async fn webhooks_page(
    state: &Shared,
    signed: &Signed,
    done: Option<&str>,
    created: Option<(&str, &str)>,
) -> Result<Markup, Refusal> {
    let (hooks, deliveries) =
        blocking(state, |db| Ok((db.webhooks()?, db.deliveries(100)?))).await?;
    let is_owner = signed.admin.can(Capability::ManageAdmins);
    page(state, signed, "Webhooks", Nav::Webhooks, |chrome| html! {
        (view::notice(done, None))
        p.lead { "The platform posts each request's events (created, approved, denied, expired, revoked) as JSON to these URLs, signed with HMAC-SHA256 in " code { "X-EPM-Signature" } ", retried with backoff." }
        @if let Some((id, secret)) = created {
            div.alert.ok role="status" {
                p { "Webhook " strong { (id) } " added. Its signing secret is shown once:" }
                p { input.mono.copy readonly value=(secret) aria-label="The webhook's secret"; }
            }
        }
        @if hooks.is_empty() { p.empty { "No webhook." } } @else {
        div.table-wrap { table {
            thead { tr { th { "Id" } th { "URL" } th { "Added" } @if is_owner { th {} } } }
            tbody { @for h in &hooks { tr {
                td.mono { (h.id) } td.mono.path { (h.url) } td { (h.created_by) " · " (when(chrome, h.created_at)) }
                @if is_owner { td { form method="post" action=(format!("/console/webhooks/{}/delete", encode(&h.id))) {
                    (csrf_field(chrome.csrf)) button.small.danger type="submit" { "Remove" } } } }
            } } }
        } } }
        @if is_owner {
            form.filters method="post" action="/console/webhooks" {
                (csrf_field(chrome.csrf))
                label.grow { "URL (https, or http to this machine)" input type="url" name="url" required placeholder="https://chat.example.com/hooks/epm"; }
                button.primary type="submit" { "Add a webhook" }
            }
        }
        h2 { "Deliveries" }
        @if deliveries.is_empty() { p.empty { "Nothing delivered yet." } } @else {
        div.table-wrap { table {
            thead { tr { th { "Queued" } th { "Event" } th { "Request" } th { "To" } th { "State" } th { "Tries" } th { "Last answer" } } }
            tbody { @for d in &deliveries { tr {
                td.nowrap { (when(chrome, d.created_at)) }
                td { (d.event) }
                td { a href=(format!("/console/requests/{}", encode(&d.request_id))) { (d.request_id) } }
                td.mono.small.path { (d.url) }
                td { span class=(match d.state.as_str() { "delivered" => "badge approved", "failed" => "badge denied", _ => "badge pending" }) { (d.state) }
                    @if d.state == "pending" && d.attempts > 0 { div.small.muted { "next " (when(chrome, d.next_at)) } } }
                td { (d.attempts) }
                td.small { @if let Some(s) = d.last_status { "HTTP " (s) " " } (d.last_error.clone().unwrap_or_default()) }
            } } }
        } } }
    })
    .await
}

#[derive(Debug, Deserialize)]
struct WebhookForm {
    url: Option<String>,
}

/// A webhook URL: https anywhere, http only to this machine.
fn check_webhook_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let local = matches!(
        parsed.host_str(),
        Some("localhost" | "127.0.0.1" | "[::1]" | "::1")
    );
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if local => Ok(()),
        other => Err(format!(
            "a webhook URL is https (or http to this machine), not {other}"
        )),
    }
}

async fn create_webhook(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<WebhookForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/webhooks")?;
    let url = field(&form.form.url).unwrap_or_default();
    validate::name("url", &url, 2048).map_err(invalid)?;
    check_webhook_url(&url).map_err(invalid)?;
    let path = "/console/webhooks";
    let (id, secret) = {
        let url = url.clone();
        attempt(&state, &signed, path, move |db, admin| {
            db.create_webhook(admin, &url)
        })
        .await?
    };
    record(
        &state,
        &signed.admin.name,
        format!("POST {path}"),
        StatusCode::OK,
        format!("added webhook {id} to {url} (console)"),
    )
    .await;
    Ok(webhooks_page(&state, &signed, None, Some((&id, &secret)))
        .await?
        .into_response())
}

async fn delete_webhook(
    State(state): State<Shared>,
    signed: Signed,
    Path(id): Path<String>,
    Form(form): Form<WithCsrf<Nothing>>,
) -> Result<Response, Refusal> {
    let path = format!("/console/webhooks/{id}/delete");
    signed.check_csrf(&state, &form.csrf, &path)?;
    validate::name("id", &id, validate::MAX_NAME_BYTES).map_err(invalid)?;
    act(
        &state,
        &signed,
        path,
        "/console/webhooks",
        "webhook-deleted",
        move |db, admin| {
            db.delete_webhook(admin, &id)?;
            Ok(format!("removed webhook {id} (console)"))
        },
    )
    .await
}

// ---- account --------------------------------------------------------------

async fn account(
    State(state): State<Shared>,
    signed: Signed,
    Query(flash): Query<Flash>,
) -> Result<Response, Refusal> {
    let name = signed.admin.name.clone();
    let totp = blocking(&state, move |db| {
        Ok(db
            .credentials(&name)?
            .is_some_and(|c| c.totp_secret.is_some()))
    })
    .await?;
    let (idle, lifetime) = (state.console.idle, state.console.lifetime);
    let markup = page(&state, &signed, "Your account", Nav::Account, |chrome| html! {
        (view::notice(done_text(&flash.done), None))
        dl.facts.card {
            dt { "Name" } dd { (chrome.admin.name) }
            dt { "Role" } dd { (view::role_text(chrome.admin)) }
            dt { "Endpoint users" } dd { (chrome.admin.endpoint_users.join(", ")) span.muted { " (requests of these users are not yours to approve)" } }
            dt { "Authenticator (TOTP)" } dd { @if totp { "on" } @else { "off · turn it on with " code { "epm-platform admin totp --name " (chrome.admin.name) } } }
            dt { "Time zone" } dd { (chrome.zone_name) span.muted { " (from your browser at sign-in)" } }
            dt { "Sessions" } dd { "end after " (idle.as_secs() / 60) " minutes unused, or " (lifetime.as_secs() / 3600) " hours after sign-in" }
        }
        div.grid {
            form.card.stack method="post" action="/console/account/password" {
                h2 { "Change your password" }
                (csrf_field(chrome.csrf))
                label { "Current password" input type="password" name="current" autocomplete="current-password" required; }
                label { "New password (at least 12 characters)" input type="password" name="new" autocomplete="new-password" minlength="12" required; }
                button.primary type="submit" { "Change" }
            }
            form.card.stack method="post" action="/console/sign-out-everywhere" {
                h2 { "Sign out everywhere" }
                p { "Ends every console session of yours, on every browser, this one too. API tokens are not affected." }
                (csrf_field(chrome.csrf))
                button.danger #sign-out-everywhere type="submit" { "Sign out everywhere" }
            }
        }
    })
    .await?;
    Ok(markup.into_response())
}

#[derive(Debug, Deserialize)]
struct PasswordForm {
    current: Option<String>,
    new: Option<String>,
}

async fn change_password(
    State(state): State<Shared>,
    signed: Signed,
    Form(form): Form<WithCsrf<PasswordForm>>,
) -> Result<Response, Refusal> {
    signed.check_csrf(&state, &form.csrf, "/console/account/password")?;
    let current = form.form.current.unwrap_or_default();
    let new = form.form.new.unwrap_or_default();
    auth::check_new_password(&new).map_err(invalid)?;
    let name = signed.admin.name.clone();
    let phc = blocking(&state, move |db| {
        Ok(db.credentials(&name)?.and_then(|c| c.password_hash))
    })
    .await?;
    let _permit = state
        .console
        .hashing
        .acquire()
        .await
        .map_err(Refusal::internal)?;
    let hashed = tokio::task::spawn_blocking(move || {
        let ok = phc.is_some_and(|phc| auth::verify_password(&phc, &current));
        ok.then(|| auth::hash_password(&new))
    })
    .await
    .map_err(Refusal::internal)?;
    let path = "POST /console/account/password".to_owned();
    let Some(hashed) = hashed else {
        state.console.accounts.fail(&signed.admin.name);
        record(
            &state,
            &signed.admin.name,
            path,
            StatusCode::FORBIDDEN,
            "refused: wrong current password".into(),
        )
        .await;
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "Not changed",
            "The current password is wrong; nothing was changed.",
        ));
    };
    let hashed = hashed.map_err(invalid)?;
    let (admin, token) = (signed.admin.clone(), signed.token.clone());
    blocking(&state, move |db| {
        db.set_password(Some(&admin), &admin.name, &hashed, Some(&token))
    })
    .await?;
    record(
        &state,
        &signed.admin.name,
        path,
        StatusCode::SEE_OTHER,
        "changed their console password; other sessions ended".into(),
    )
    .await;
    Ok(see_other("/console/account?done=password"))
}
