//! The platform's HTTP handlers driven in process through the router
//! (`tower::ServiceExt::oneshot`): no socket, no TLS, a fresh SQLite
//! database per test. Each area gets its refusals (a 4xx whose message
//! names what is wrong) and one call that works; tests/api.rs covers the
//! same routes over real TLS.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use epm_api::admin::CreateAdmin;
use epm_api::agent::{AgentCredentials, CheckinRequest, EnrollRequest};
use epm_api::paths;
use epm_platform::db::{Actor, BundleRow, Db};
use epm_platform::keys::DataDir;
use epm_platform::server::{self, AppState};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The router over a fresh SQLite database in a temporary data directory.
struct Platform {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
    app: Router,
}

/// What came back: status, headers and the body (JSON when it parses).
struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    /// The JSON error's message, or the body when it is not JSON.
    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .map_or_else(|| self.text.clone(), str::to_owned)
    }

    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The value `Set-Cookie` gives `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix(&format!("{name}=")))
            .map(|v| v.split(';').next().unwrap_or("").to_owned())
    }
}

impl Platform {
    fn new() -> Platform {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data")).unwrap();
        data.ensure_keys(&["localhost".into()]).unwrap();
        let db = Db::open(&data.database()).unwrap();
        let state = AppState::new(db, data.signing_key().unwrap());
        Platform {
            _dir: dir,
            app: server::router(state.clone()),
            state,
        }
    }

    /// An admin made offline (the first is the owner): its token.
    fn admin(&self, name: &str, role: Option<&str>, level: Option<u32>) -> String {
        let request = CreateAdmin {
            name: name.into(),
            role: role.map(|r| r.parse().unwrap()),
            approver_level: level,
            endpoint_users: None,
        };
        self.state
            .db
            .create_admin(Actor::Local, &request)
            .unwrap()
            .0
            .token
    }

    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 16 << 20)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    /// A call with an optional bearer token and a raw body (JSON typed).
    async fn call(&self, method: Method, path: &str, bearer: Option<&str>, body: &str) -> Reply {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(bearer) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {bearer}"));
        }
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        self.send(request.body(Body::from(body.to_owned())).unwrap())
            .await
    }

    async fn json(&self, method: Method, path: &str, bearer: Option<&str>, body: Value) -> Reply {
        self.call(method, path, bearer, &body.to_string()).await
    }

    /// A fresh enrollment token for `uses` devices.
    async fn enroll_token(&self, admin: &str, uses: u32) -> String {
        let reply = self
            .json(
                Method::POST,
                paths::ADMIN_ENROLL_TOKENS,
                Some(admin),
                json!({"uses": uses, "expires_in_seconds": 3600}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()["token"].as_str().unwrap().to_owned()
    }

    async fn enroll(&self, token: &str, device: &str) -> Reply {
        let request = EnrollRequest {
            enrollment_token: token.into(),
            device_id: device.into(),
            hostname: device.into(),
            os: "linux".into(),
            agent_version: "test".into(),
        };
        self.json(
            Method::POST,
            paths::AGENT_ENROLL,
            None,
            serde_json::to_value(request).unwrap(),
        )
        .await
    }
}

fn bearer(agent: &AgentCredentials) -> String {
    format!("{}.{}", agent.agent_id, agent.agent_secret)
}

fn assert_refused(reply: &Reply, status: StatusCode, names: &str) {
    assert_eq!(reply.status, status, "{}", reply.text);
    assert!(
        reply.message().to_lowercase().contains(names),
        "the message should name {names:?}: {}",
        reply.text
    );
}

// ---- agent API ------------------------------------------------------

#[tokio::test]
async fn the_agent_api_refuses_missing_or_wrong_credentials_and_says_why() {
    let platform = Platform::new();
    let checkin = serde_json::to_string(&CheckinRequest::default()).unwrap();

    let none = platform
        .call(Method::POST, paths::AGENT_CHECKIN, None, &checkin)
        .await;
    assert_refused(
        &none,
        StatusCode::UNAUTHORIZED,
        "agent credentials are required",
    );

    let malformed = platform
        .call(Method::POST, paths::AGENT_CHECKIN, Some("no-dot"), &checkin)
        .await;
    assert_refused(
        &malformed,
        StatusCode::UNAUTHORIZED,
        "enroll the agent again",
    );

    let unknown = platform
        .call(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some("agt_nobody.secret"),
            &checkin,
        )
        .await;
    assert_refused(&unknown, StatusCode::UNAUTHORIZED, "enroll the agent again");

    // An admin's token is no agent's credential.
    let admin = platform.admin("root", None, Some(1));
    let wrong_kind = platform
        .call(Method::GET, paths::AGENT_POLICY, Some(&admin), "")
        .await;
    assert_refused(
        &wrong_kind,
        StatusCode::UNAUTHORIZED,
        "enroll the agent again",
    );
}

#[tokio::test]
async fn the_agent_api_refuses_malformed_and_oversized_bodies() {
    let platform = Platform::new();
    let admin = platform.admin("root", None, Some(1));
    let token = platform.enroll_token(&admin, 1).await;
    let agent: AgentCredentials =
        serde_json::from_value(platform.enroll(&token, "dev-1").await.json()).unwrap();
    let agent = bearer(&agent);

    let garbage = platform
        .call(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some(&agent),
            "{not json",
        )
        .await;
    assert_refused(&garbage, StatusCode::BAD_REQUEST, "json");
    assert_eq!(garbage.code(), "invalid_json", "{}", garbage.text);

    let unknown_field = platform
        .json(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some(&agent),
            json!({"users": [], "admin": true}),
        )
        .await;
    assert_refused(
        &unknown_field,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown field",
    );

    let huge = format!(
        "{{\"users\": [], \"pad\": \"{}\"}}",
        "x".repeat(epm_api::MAX_JSON_BYTES + 1)
    );
    let oversized = platform
        .call(Method::POST, paths::AGENT_CHECKIN, Some(&agent), &huge)
        .await;
    assert_refused(&oversized, StatusCode::PAYLOAD_TOO_LARGE, "length limit");
    assert_eq!(oversized.code(), "too_large", "{}", oversized.text);

    let fine = platform
        .call(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some(&agent),
            &serde_json::to_string(&CheckinRequest::default()).unwrap(),
        )
        .await;
    assert_eq!(fine.status, StatusCode::OK, "{}", fine.text);
}

// ---- enrollment tokens ------------------------------------------------

#[tokio::test]
async fn an_enrollment_token_enrolls_as_many_devices_as_it_has_uses() {
    let platform = Platform::new();
    let admin = platform.admin("root", None, Some(1));
    let token = platform.enroll_token(&admin, 2).await;

    for device in ["dev-1", "dev-2"] {
        let reply = platform.enroll(&token, device).await;
        assert_eq!(reply.status, StatusCode::OK, "{device}: {}", reply.text);
        let agent: AgentCredentials = serde_json::from_value(reply.json()).unwrap();
        assert!(!agent.agent_secret.is_empty());
    }
    let spent = platform.enroll(&token, "dev-3").await;
    assert_refused(&spent, StatusCode::UNAUTHORIZED, "token is used up");

    let made_up = platform.enroll("etk_nothing.secret", "dev-4").await;
    assert_refused(
        &made_up,
        StatusCode::UNAUTHORIZED,
        "unknown enrollment token",
    );

    // A revoked token enrolls nothing more.
    let created = platform
        .json(
            Method::POST,
            paths::ADMIN_ENROLL_TOKENS,
            Some(&admin),
            json!({"uses": 5, "expires_in_seconds": 3600}),
        )
        .await
        .json();
    let (id, revocable) = (
        created["id"].as_str().unwrap(),
        created["token"].as_str().unwrap(),
    );
    let revoked = platform
        .call(
            Method::POST,
            &paths::ADMIN_ENROLL_TOKEN_REVOKE.replace("{id}", id),
            Some(&admin),
            "",
        )
        .await;
    assert!(revoked.status.is_success(), "{}", revoked.text);
    let refused = platform.enroll(revocable, "dev-5").await;
    assert_refused(&refused, StatusCode::UNAUTHORIZED, "revoked");
}

// ---- admin API ----------------------------------------------------------

#[tokio::test]
async fn the_admin_api_refuses_unknown_tokens_and_roles_without_the_right() {
    let platform = Platform::new();
    let owner = platform.admin("root", None, Some(1));
    let auditor = platform.admin("ann", Some("auditor"), None);

    let anonymous = platform
        .call(Method::GET, paths::ADMIN_ADMINS, None, "")
        .await;
    assert_refused(
        &anonymous,
        StatusCode::UNAUTHORIZED,
        "admin bearer token is required",
    );

    let forged = platform
        .call(Method::GET, paths::ADMIN_ADMINS, Some("epa_forged"), "")
        .await;
    assert_refused(&forged, StatusCode::UNAUTHORIZED, "unknown admin token");

    // An auditor reads, but makes no admin and no token.
    let read = platform
        .call(Method::GET, paths::ADMIN_DEVICES, Some(&auditor), "")
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    let create = platform
        .json(
            Method::POST,
            paths::ADMIN_ADMINS,
            Some(&auditor),
            json!({"name": "eve", "role": "owner"}),
        )
        .await;
    assert_refused(&create, StatusCode::FORBIDDEN, "ann is auditor");
    let token = platform
        .json(
            Method::POST,
            paths::ADMIN_ENROLL_TOKENS,
            Some(&auditor),
            json!({"uses": 1, "expires_in_seconds": 60}),
        )
        .await;
    assert_refused(&token, StatusCode::FORBIDDEN, "enrollment tokens");

    // A disabled admin's token stops working at once.
    let disabled = platform
        .call(
            Method::POST,
            &paths::ADMIN_ADMIN_DISABLE.replace("{name}", "ann"),
            Some(&owner),
            "{}",
        )
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text);
    let after = platform
        .call(Method::GET, paths::ADMIN_DEVICES, Some(&auditor), "")
        .await;
    assert_refused(&after, StatusCode::UNAUTHORIZED, "admin ann is disabled");

    // The owner's call works and lists both.
    let admins = platform
        .call(Method::GET, paths::ADMIN_ADMINS, Some(&owner), "")
        .await;
    assert_eq!(admins.status, StatusCode::OK, "{}", admins.text);
    assert_eq!(
        admins.json().as_array().unwrap().len(),
        2,
        "{}",
        admins.text
    );
}

#[tokio::test]
async fn the_audit_endpoint_checks_its_paging_parameters() {
    let platform = Platform::new();
    let admin = platform.admin("root", None, Some(1));
    for (query, names) in [
        ("limit=ten", "limit"),
        ("after=-1", "after"),
        ("wait=soon", "wait"),
        ("page=2", "page"),
    ] {
        let reply = platform
            .call(
                Method::GET,
                &format!("{}?{query}", paths::ADMIN_AUDIT),
                Some(&admin),
                "",
            )
            .await;
        assert_refused(&reply, StatusCode::UNPROCESSABLE_ENTITY, names);
        assert_eq!(reply.code(), "invalid_request", "{query}: {}", reply.text);
    }
    let page = platform
        .call(
            Method::GET,
            &format!("{}?limit=5&after=0", paths::ADMIN_AUDIT),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    assert!(page.json()["records"].as_array().unwrap().is_empty());
}

// ---- console ----------------------------------------------------------------

const PASSWORD: &str = "correct horse battery";

/// The value of `name="csrf"` in a page.
fn csrf_in(page: &str) -> String {
    let start = page.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    page[start..][..page[start..].find('"').unwrap()].to_owned()
}

fn form(path: &str, cookie: Option<&str>, fields: &[(&str, &str)]) -> Request<Body> {
    let body = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(' ', "+")))
        .collect::<Vec<_>>()
        .join("&");
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    request.body(Body::from(body)).unwrap()
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut request = Request::builder().uri(path);
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn the_console_refuses_calls_without_a_session_or_its_csrf_token() {
    let platform = Platform::new();
    platform.admin("root", None, Some(1));
    let phc = epm_platform::console::auth::hash_password(PASSWORD).unwrap();
    platform
        .state
        .db
        .set_password(None, "root", &phc, None)
        .unwrap();

    // No session: pages send to the sign-in form, forms are refused.
    let page = platform.send(get("/console/inbox", None)).await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.text);
    assert_eq!(
        page.headers[header::LOCATION],
        "/console/sign-in?why=missing",
        "the sign-in page says why"
    );
    let forged = platform
        .send(get("/console/inbox", Some("__Host-epm-session=forged")))
        .await;
    assert_eq!(forged.status, StatusCode::SEE_OTHER, "{}", forged.text);
    let location = forged.headers[header::LOCATION].to_str().unwrap();
    assert!(location.starts_with("/console/sign-in?why="), "{location}");

    // Sign-in without the form's CSRF cookie is refused.
    let sign_in = platform.send(get("/console/sign-in", None)).await;
    assert_eq!(sign_in.status, StatusCode::OK, "{}", sign_in.text);
    let pre = sign_in.cookie("__Host-epm-sign-in").unwrap();
    let csrf = csrf_in(&sign_in.text);
    let fields = [
        ("csrf", csrf.as_str()),
        ("name", "root"),
        ("password", PASSWORD),
        ("code", ""),
        ("tz", "UTC"),
    ];
    let no_cookie = platform.send(form("/console/sign-in", None, &fields)).await;
    assert_eq!(
        no_cookie.status,
        StatusCode::FORBIDDEN,
        "{}",
        no_cookie.text
    );

    // A wrong password is refused, the right one signs in.
    let pre_cookie = format!("__Host-epm-sign-in={pre}");
    let wrong = [
        ("csrf", csrf.as_str()),
        ("name", "root"),
        ("password", "not the password"),
        ("code", ""),
        ("tz", "UTC"),
    ];
    let refused = platform
        .send(form("/console/sign-in", Some(&pre_cookie), &wrong))
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.text);
    assert!(refused.cookie("__Host-epm-session").is_none());
    let signed_in = platform
        .send(form("/console/sign-in", Some(&pre_cookie), &fields))
        .await;
    assert_eq!(
        signed_in.status,
        StatusCode::SEE_OTHER,
        "{}",
        signed_in.text
    );
    let session = format!(
        "__Host-epm-session={}",
        signed_in.cookie("__Host-epm-session").unwrap()
    );

    // With the session, the page shows; a form without its CSRF token is
    // refused, with it the call works.
    let inbox = platform.send(get("/console/inbox", Some(&session))).await;
    assert_eq!(inbox.status, StatusCode::OK, "{}", inbox.text);
    let csrf = csrf_in(&inbox.text);
    let no_csrf = platform
        .send(form(
            "/console/sign-out",
            Some(&session),
            &[("csrf", "forged")],
        ))
        .await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN, "{}", no_csrf.text);
    let still = platform.send(get("/console/inbox", Some(&session))).await;
    assert_eq!(
        still.status,
        StatusCode::OK,
        "a refused sign-out ends nothing"
    );
    let signed_out = platform
        .send(form(
            "/console/sign-out",
            Some(&session),
            &[("csrf", &csrf)],
        ))
        .await;
    assert!(
        signed_out.status.is_redirection(),
        "{} {}",
        signed_out.status,
        signed_out.text
    );
    let ended = platform.send(get("/console/inbox", Some(&session))).await;
    assert_ne!(ended.status, StatusCode::OK, "the session ended");
}

// ---- the router itself ------------------------------------------------------

#[tokio::test]
async fn unknown_routes_and_methods_get_json_refusals() {
    let platform = Platform::new();
    let health = platform.call(Method::GET, paths::HEALTH, None, "").await;
    assert_eq!(health.status, StatusCode::OK, "{}", health.text);

    let missing = platform
        .call(Method::GET, "/api/v1/nothing-here", None, "")
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text);
    assert!(!missing.code().is_empty(), "{}", missing.text);

    let method = platform
        .call(Method::DELETE, paths::AGENT_CHECKIN, None, "")
        .await;
    assert_eq!(
        method.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "{}",
        method.text
    );
}

// ---- bundles --------------------------------------------------------

#[tokio::test]
async fn an_unchanged_bundle_is_answered_from_its_head_and_old_rows_are_read_once() {
    let platform = Platform::new();
    let admin = platform.admin("root", None, Some(1));
    let token = platform.enroll_token(&admin, 1).await;
    let agent: AgentCredentials =
        serde_json::from_value(platform.enroll(&token, "dev-1").await.json()).unwrap();
    let agent = bearer(&agent);
    let checkin = |version: Option<u64>| {
        serde_json::to_string(&CheckinRequest {
            policy_version: version,
            ..CheckinRequest::default()
        })
        .unwrap()
    };
    let first = platform
        .call(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some(&agent),
            &checkin(None),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let version = first.json()["policy"]["version"].as_u64().unwrap();
    let etag = first.json()["policy"]["etag"].as_str().unwrap().to_owned();
    let db = &platform.state.db;
    let key = platform.state.signing.public_key().to_string();
    let stored = db.bundle("dev-1").unwrap().unwrap();
    assert_eq!(stored.signer.as_deref(), Some(key.as_str()));
    let head = db.bundle_head("dev-1").unwrap().unwrap();
    assert_eq!(
        (
            head.version,
            head.revision,
            &head.users_sha256,
            &head.content_sha256
        ),
        (
            version,
            stored.revision,
            &stored.users_sha256,
            &stored.content_sha256
        )
    );
    assert_eq!(head.signer.as_deref(), Some(key.as_str()));

    let fetch = |if_none_match: Option<&str>| {
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(paths::AGENT_POLICY)
            .header(header::AUTHORIZATION, format!("Bearer {agent}"));
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        platform.send(request.body(Body::empty()).unwrap())
    };
    let again = |expect: u64| {
        let platform = &platform;
        let agent = &agent;
        let body = checkin(Some(version));
        async move {
            let reply = platform
                .call(Method::POST, paths::AGENT_CHECKIN, Some(agent), &body)
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
            assert_eq!(reply.json()["policy"]["version"], expect, "{}", reply.text);
            reply
        }
    };

    // An envelope nothing can parse, under a signer column naming the
    // current key: check-ins and fetches with the ETag never look at it
    // (had they read it, it would fail to parse and be rebuilt as v+1).
    let unreadable = BundleRow {
        envelope: "not an envelope".into(),
        ..stored.clone()
    };
    assert!(db.put_bundle("dev-1", &unreadable, Some(version)).unwrap());
    let reply = again(version).await;
    assert_eq!(reply.json()["policy"]["changed"], false);
    let not_modified = fetch(Some(&etag)).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.headers[header::ETAG], etag.as_str());
    assert_eq!(
        db.bundle("dev-1").unwrap().unwrap().envelope,
        "not an envelope"
    );
    // Without the ETag the stored envelope is what is served.
    let full = fetch(None).await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.text, "not an envelope");

    // A row from before the signer column (NULL): read in full, found
    // signed by the current key, so not signed anew; its signer is
    // recorded and later check-ins need only the head.
    let old = BundleRow {
        signer: None,
        ..stored.clone()
    };
    assert!(db.put_bundle("dev-1", &old, Some(version)).unwrap());
    assert_eq!(db.bundle_head("dev-1").unwrap().unwrap().signer, None);
    again(version).await;
    assert_eq!(
        db.bundle_head("dev-1").unwrap().unwrap().signer.as_deref(),
        Some(key.as_str())
    );
    let served = fetch(None).await;
    assert_eq!(served.status, StatusCode::OK);
    assert_eq!(served.text, stored.envelope);

    // A row from before the column whose envelope names a key rotated out
    // since: signed anew, as before the column existed.
    let mut envelope: Value = serde_json::from_str(&stored.envelope).unwrap();
    envelope["key"] = json!("ed25519:cm90YXRlZCBvdXQgc2luY2Ugcm90YXRlZCBvdXQgc2k=");
    let rotated_out = BundleRow {
        envelope: envelope.to_string(),
        signer: None,
        ..stored.clone()
    };
    assert!(db.put_bundle("dev-1", &rotated_out, Some(version)).unwrap());
    again(version + 1).await;
    let resigned = db.bundle("dev-1").unwrap().unwrap();
    assert_eq!(resigned.signer.as_deref(), Some(key.as_str()));
    let named: Value = serde_json::from_str(&resigned.envelope).unwrap();
    assert_eq!(named["key"], key.as_str());

    // The column naming another key: signed anew too, without reading
    // the envelope to find out.
    let other = BundleRow {
        signer: Some("ed25519:b3RoZXI=".into()),
        ..resigned.clone()
    };
    assert!(db.put_bundle("dev-1", &other, Some(version + 1)).unwrap());
    again(version + 2).await;
    assert_eq!(
        db.bundle_head("dev-1").unwrap().unwrap().signer.as_deref(),
        Some(key.as_str())
    );
}
