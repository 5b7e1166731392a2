//! The platform's API over real TLS on 127.0.0.1, with a client that trusts
//! only the platform's generated CA.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use epm_api::admin::CreateAdmin;
use epm_api::agent::{
    AgentCredentials, AuditAck, CheckinRequest, CheckinResponse, EnrollRequest, LocalUser,
    RequestStatus, RequestSubject, RequestSubmit, Window,
};
use epm_api::sign::{PolicyPublicKey, SignedKind};
use epm_api::{ApiErrorBody, Grant, PolicyBundle, SignedEnvelope, SubjectIdentity, paths};
use epm_platform::db::Actor;
use epm_platform::keys::DataDir;
use epm_platform::server::ApiDoc;
use jiff::{SignedDuration, Timestamp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use utoipa::OpenApi;

mod common;

struct TestPlatform {
    _dir: tempfile::TempDir,
    data: DataDir,
    url: String,
    http: reqwest::Client,
    handle: axum_server::Handle,
}

impl TestPlatform {
    async fn start() -> TestPlatform {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data")).unwrap();
        TestPlatform::start_on(dir, data).await
    }

    async fn start_on(dir: tempfile::TempDir, data: DataDir) -> TestPlatform {
        data.ensure_keys(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let common::Server {
            url, http, handle, ..
        } = common::start_server(&data, common::open_db(&data)).await;
        TestPlatform {
            _dir: dir,
            data,
            url,
            http,
            handle,
        }
    }

    /// An admin made offline: the first is the owner, later ones approve
    /// at `level` or only read.
    fn admin(&self, name: &str, level: Option<u32>) -> String {
        let request = CreateAdmin {
            name: name.into(),
            role: None,
            approver_level: level,
            endpoint_users: None,
        };
        common::open_db(&self.data)
            .create_admin(Actor::Local, &request)
            .unwrap()
            .0
            .token
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn ok(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let (status, value) = self.call(method, path, Some(token), body).await;
        assert!(status.is_success(), "{path}: {status} {value}");
        value
    }

    async fn push(&self, token: &str, scope: &str, policy: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .put(format!(
                "{}{}",
                self.url,
                paths::ADMIN_POLICY.replace("{scope}", scope)
            ))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(policy.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn enroll(&self, admin: &str, device: &str) -> AgentCredentials {
        self.enroll_as(admin, device, None).await
    }

    /// Enrolls `device`, showing `current` credentials when it is enrolled.
    async fn enroll_as(
        &self,
        admin: &str,
        device: &str,
        current: Option<&AgentCredentials>,
    ) -> AgentCredentials {
        let token = self
            .ok(
                Method::POST,
                paths::ADMIN_ENROLL_TOKENS,
                admin,
                Some(json!({"uses": 1, "expires_in_seconds": 3600})),
            )
            .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let bearer = current.map(agent_bearer);
        let (status, value) = self
            .call(
                Method::POST,
                paths::AGENT_ENROLL,
                bearer.as_deref(),
                Some(
                    serde_json::to_value(EnrollRequest {
                        enrollment_token: token,
                        device_id: device.into(),
                        hostname: device.into(),
                        os: "linux".into(),
                        agent_version: "test".into(),
                    })
                    .unwrap(),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{value}");
        serde_json::from_value(value).unwrap()
    }

    async fn checkin(
        &self,
        agent: &AgentCredentials,
        users: &[&str],
        pending: &[&str],
    ) -> CheckinResponse {
        let request = CheckinRequest {
            users: users
                .iter()
                .map(|u| LocalUser {
                    name: (*u).into(),
                    groups: vec!["staff".into()],
                })
                .collect(),
            pending_requests: pending.iter().map(|s| (*s).to_owned()).collect(),
            ..CheckinRequest::default()
        };
        let value = self
            .ok(
                Method::POST,
                paths::AGENT_CHECKIN,
                &agent_bearer(agent),
                Some(serde_json::to_value(request).unwrap()),
            )
            .await;
        serde_json::from_value(value).unwrap()
    }

    async fn bundle(&self, agent: &AgentCredentials) -> PolicyBundle {
        let value = self
            .ok(Method::GET, paths::AGENT_POLICY, &agent_bearer(agent), None)
            .await;
        let envelope: SignedEnvelope = serde_json::from_value(value).unwrap();
        self.public_key()
            .open(SignedKind::PolicyBundle, &envelope)
            .unwrap()
    }

    fn public_key(&self) -> PolicyPublicKey {
        std::fs::read_to_string(self.data.file("signing-key.pub"))
            .unwrap()
            .parse()
            .unwrap()
    }
}

fn agent_bearer(agent: &AgentCredentials) -> String {
    format!("{}.{}", agent.agent_id, agent.agent_secret)
}

fn rule_ids(bundle: &PolicyBundle) -> Vec<String> {
    let policy: Value = serde_json::from_str(bundle.policy.get()).unwrap();
    policy["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn deny(id: &str, name: &str) -> Value {
    json!({"id": id, "action": "deny", "match": {"name": name}})
}

#[tokio::test]
async fn every_route_is_in_the_openapi_document_and_served() {
    let platform = TestPlatform::start().await;
    let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
    let served: Value = platform
        .ok(Method::GET, paths::OPENAPI, "unused", None)
        .await;
    assert_eq!(
        served["paths"], doc["paths"],
        "the served document is the generated one"
    );
    for (method, path) in paths::ALL {
        // Health and the document itself are plumbing, not API.
        if *path == paths::HEALTH || *path == paths::OPENAPI {
            continue;
        }
        assert!(
            doc["paths"][*path][method.to_lowercase()].is_object(),
            "{method} {path} is missing from the OpenAPI document"
        );
        let concrete = path
            .replace("{id}", "x")
            .replace("{scope}", "general")
            .replace("{device_id}", "x")
            .replace("{name}", "x");
        let (status, body) = platform
            .call(method.parse().unwrap(), &concrete, None, Some(json!({})))
            .await;
        assert_ne!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {path} is not routed: {body}"
        );
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            body["error"]["code"].is_string() || status.is_success(),
            "{method} {path}: {body}"
        );
    }
    let documented = doc["paths"].as_object().unwrap().len();
    let routed: std::collections::BTreeSet<&str> = paths::ALL.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        documented + 2,
        routed.len(),
        "the document has no route the router lacks"
    );
    platform.handle.shutdown();
}

#[tokio::test]
async fn bad_input_gets_a_json_4xx_and_stores_nothing() {
    let platform = TestPlatform::start().await;
    let admin = platform.admin("root", Some(1));
    let url = |p: &str| format!("{}{p}", platform.url);

    let garbage = platform
        .http
        .post(url(paths::ADMIN_ENROLL_TOKENS))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        garbage.json::<ApiErrorBody>().await.unwrap().error.code,
        "invalid_json"
    );

    let (status, body) = platform
        .call(
            Method::POST,
            paths::ADMIN_ENROLL_TOKENS,
            Some(&admin),
            Some(json!({"uses": 1, "expires_in_seconds": 3600, "admin": true})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field"),
        "{body}"
    );

    let no_type = platform
        .http
        .post(url(paths::ADMIN_ENROLL_TOKENS))
        .bearer_auth(&admin)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(no_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let (status, body) = platform
        .push(
            &admin,
            "general",
            json!({"version": 1, "rules": [{"id": "", "action": "maybe"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "invalid_policy");
    assert!(
        !body["error"]["details"].as_array().unwrap().is_empty(),
        "{body}"
    );
    assert_eq!(
        platform
            .ok(Method::GET, paths::ADMIN_POLICIES, &admin, None)
            .await,
        json!([]),
        "nothing stored"
    );

    let (status, _) = platform
        .call(Method::GET, paths::ADMIN_DEVICES, Some("epa_forged"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Re-enrolling (with the current credentials) replaces the secret: the
    // old one is refused.
    let first = platform.enroll(&admin, "mac-1").await;
    let second = platform.enroll_as(&admin, "mac-1", Some(&first)).await;
    assert_eq!(first.agent_id, second.agent_id);
    let (status, body) = platform
        .call(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some(&agent_bearer(&first)),
            Some(json!({"audit_last_seq": 0, "outbox_pending": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // An admin token is not an agent credential, and the reverse.
    let (status, _) = platform
        .call(
            Method::POST,
            paths::AGENT_CHECKIN,
            Some(&admin),
            Some(json!({"audit_last_seq": 0, "outbox_pending": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = platform
        .call(
            Method::GET,
            paths::ADMIN_DEVICES,
            Some(&agent_bearer(&second)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A used-up enrollment token.
    let token = platform
        .ok(
            Method::POST,
            paths::ADMIN_ENROLL_TOKENS,
            &admin,
            Some(json!({"uses": 1, "expires_in_seconds": 3600})),
        )
        .await["token"]
        .clone();
    let enroll = json!({"enrollment_token": token, "device_id": "mac-2", "hostname": "h", "os": "linux", "agent_version": "t"});
    assert_eq!(
        platform
            .call(
                Method::POST,
                paths::AGENT_ENROLL,
                None,
                Some(enroll.clone())
            )
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = platform
        .call(Method::POST, paths::AGENT_ENROLL, None, Some(enroll))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("used up"),
        "{body}"
    );

    // An oversized audit upload.
    let huge = json!({"oldest_kept_seq": 1, "records": [{"seq": 1, "pad": "x".repeat(epm_api::MAX_AUDIT_UPLOAD_BYTES)}]});
    let (status, body) = platform
        .call(
            Method::POST,
            paths::AGENT_AUDIT,
            Some(&agent_bearer(&second)),
            Some(huge),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["error"]["code"], "too_large");

    // Every admin call, refused ones included, is in the activity log:
    // admins' one by one, unauthenticated ones counted (flushed every 2 s).
    let calls = |activity: &Value, list: &str| -> Vec<(String, u64)> {
        activity[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["call"].as_str().unwrap().to_owned(),
                    e["status"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let mut activity = Value::Null;
    for _ in 0..50 {
        activity = platform
            .ok(Method::GET, paths::ADMIN_ACTIVITY, &admin, None)
            .await;
        if !activity["refused"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        calls(&activity, "entries").contains(&("PUT /api/v1/admin/policies/general".into(), 422)),
        "{activity}"
    );
    assert!(
        calls(&activity, "refused").contains(&("GET /api/v1/admin/devices".into(), 401)),
        "{activity}"
    );
    platform.handle.shutdown();
}

#[tokio::test]
async fn audit_uploads_are_idempotent_and_acknowledged_contiguously() {
    let platform = TestPlatform::start().await;
    let admin = platform.admin("root", Some(1));
    let agent = platform.enroll(&admin, "mac-1").await;
    let bearer = agent_bearer(&agent);
    let upload = |seqs: &[u64], oldest: u64| json!({"oldest_kept_seq": oldest, "records": seqs.iter().map(|s| json!({"seq": s, "event": "exec", "decision": if s % 2 == 0 {"deny"} else {"allow"}})).collect::<Vec<_>>()});
    let ack = |v: Value| serde_json::from_value::<AuditAck>(v).unwrap();

    let a = ack(platform
        .ok(
            Method::POST,
            paths::AGENT_AUDIT,
            &bearer,
            Some(upload(&[1, 2, 4], 1)),
        )
        .await);
    assert_eq!(
        (a.acked_seq, a.stored, a.duplicates),
        (2, 3, 0),
        "4 waits for 3"
    );
    let a = ack(platform
        .ok(
            Method::POST,
            paths::AGENT_AUDIT,
            &bearer,
            Some(upload(&[2, 3], 1)),
        )
        .await);
    assert_eq!((a.acked_seq, a.stored, a.duplicates), (4, 1, 1));
    // The agent dropped 5..=9 from its outbox: stop waiting for them.
    let a = ack(platform
        .ok(
            Method::POST,
            paths::AGENT_AUDIT,
            &bearer,
            Some(upload(&[10, 11], 10)),
        )
        .await);
    assert_eq!(a.acked_seq, 11);

    let (status, _) = platform
        .call(
            Method::POST,
            paths::AGENT_AUDIT,
            Some(&bearer),
            Some(json!({"oldest_kept_seq": 1, "records": [{"seq": 12}, "garbage"]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let page = platform
        .ok(
            Method::GET,
            &format!("{}?limit=1000", paths::ADMIN_AUDIT),
            &admin,
            None,
        )
        .await;
    let seqs: Vec<u64> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["record"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        [1, 2, 4, 3, 10, 11],
        "12 was not stored: the batch was refused whole"
    );
    let denies = platform
        .ok(
            Method::GET,
            &format!("{}?decision=deny&device=mac-1", paths::ADMIN_AUDIT),
            &admin,
            None,
        )
        .await;
    assert_eq!(denies["records"].as_array().unwrap().len(), 3);

    // A long poll wakes when a record arrives.
    let next = page["next"].as_u64().unwrap();
    let poll = {
        let http = platform.http.clone();
        let url = format!(
            "{}{}?after={next}&wait=30",
            platform.url,
            paths::ADMIN_AUDIT
        );
        let admin = admin.clone();
        tokio::spawn(async move {
            http.get(url)
                .bearer_auth(admin)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    platform
        .ok(
            Method::POST,
            paths::AGENT_AUDIT,
            &bearer,
            Some(upload(&[12], 10)),
        )
        .await;
    let woke = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(woke["records"][0]["record"]["seq"], 12);
    platform.handle.shutdown();
}

#[tokio::test]
async fn each_device_gets_its_merged_bundle_and_versions_move_only_with_content() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(&dir.path().join("data")).unwrap();
    let platform = TestPlatform::start_on(dir, data.clone()).await;
    let admin = platform.admin("root", Some(1));
    let a = platform.enroll(&admin, "mac-a").await;
    let b = platform.enroll(&admin, "mac-b").await;

    let first = platform.checkin(&a, &["alice"], &[]).await;
    assert!(first.policy.changed);
    assert_eq!(platform.bundle(&a).await.version, first.policy.version);

    platform
        .push(
            &admin,
            "general",
            json!({"version": 1, "default_action": "allow", "rules": [deny("g", "nc")]}),
        )
        .await;
    platform
        .push(
            &admin,
            "device:mac-a",
            json!({"version": 1, "default_action": "deny", "rules": [deny("d", "ssh")]}),
        )
        .await;
    platform
        .push(
            &admin,
            "user:alice",
            json!({"version": 1, "default_action": "allow", "rules": [deny("u", "curl")]}),
        )
        .await;
    platform.checkin(&a, &["alice"], &[]).await;
    platform.checkin(&b, &["bob"], &[]).await;
    let bundle_a = platform.bundle(&a).await;
    let bundle_b = platform.bundle(&b).await;
    assert_eq!(bundle_a.device_id, "mac-a");
    assert_eq!(rule_ids(&bundle_a), ["device:mac-a/d", "user:alice/u", "g"]);
    assert_eq!(
        rule_ids(&bundle_b),
        ["g"],
        "mac-b has no alice and is not mac-a"
    );
    let engine = epm_policy::Engine::from_json(bundle_a.policy.get()).unwrap();
    assert_eq!(engine.version(), bundle_a.version);
    assert_eq!(engine.default_action(), epm_policy::Action::Deny);

    // If-None-Match: 304 for the current version.
    let response = platform
        .http
        .get(format!("{}{}", platform.url, paths::AGENT_POLICY))
        .bearer_auth(agent_bearer(&a))
        .header("if-none-match", format!("\"{}\"", bundle_a.version))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

    // Pushing the same content again, or changing only another device's
    // document, does not move a device's version.
    let version_b = bundle_b.version;
    platform.push(&admin, "device:mac-a", json!({"version": 2, "default_action": "deny", "rules": [deny("d", "ssh"), deny("d2", "scp")]})).await;
    platform
        .push(
            &admin,
            "general",
            json!({"version": 9, "default_action": "allow", "rules": [deny("g", "nc")]}),
        )
        .await;
    let checkin_b = platform.checkin(&b, &["bob"], &[]).await;
    assert_eq!(checkin_b.policy.version, version_b);
    let checkin_a = platform.checkin(&a, &["alice"], &[]).await;
    assert_eq!(checkin_a.policy.version, bundle_a.version + 1);

    // Versions survive a restart.
    platform.handle.shutdown();
    let dir = tempfile::tempdir().unwrap();
    let again = TestPlatform::start_on(dir, data).await;
    assert_eq!(
        again.checkin(&a, &["alice"], &[]).await.policy.version,
        checkin_a.policy.version
    );
    again.handle.shutdown();
}

fn approval_policy(levels: &[u32], uses: u32) -> Value {
    json!({"version": 1, "default_action": "allow", "rules": [{
        "id": "wireshark", "action": "approve", "match": {"name": "wireshark"},
        "approval": {"levels": levels.iter().map(|n| json!({"approvers": n})).collect::<Vec<_>>(), "max_window_hours": 8, "uses": uses}
    }]})
}

fn submit(local_id: &str, start: Timestamp, end: Timestamp) -> Value {
    serde_json::to_value(RequestSubmit {
        local_id: local_id.into(),
        rule_id: "wireshark".into(),
        policy_version: 1,
        user: "alice".into(),
        subject: RequestSubject {
            identity: SubjectIdentity {
                kind: "sha256".into(),
                value: "ab".repeat(32),
            },
            path: "/Applications/Wireshark.app/Contents/MacOS/Wireshark".into(),
            team_id: None,
            signing_id: None,
        },
        justification: "Capture for ticket 4411".into(),
        window: Window { start, end },
    })
    .unwrap()
}

#[tokio::test]
async fn approval_levels_rejection_expiry_and_revocation() {
    let platform = TestPlatform::start().await;
    let pusher = platform.admin("pusher", None);
    // Approvers after the policy: no level beyond the rules' is accepted.
    platform
        .push(&pusher, "general", approval_policy(&[2, 1], 3))
        .await;
    let l1a = platform.admin("l1a", Some(1));
    let l1b = platform.admin("l1b", Some(1));
    let l2 = platform.admin("l2", Some(2));
    let agent = platform.enroll(&pusher, "mac-1").await;
    let bearer = agent_bearer(&agent);
    platform.checkin(&agent, &["alice"], &[]).await;
    let now = Timestamp::now();
    let hour = SignedDuration::from_hours(1);

    // Windows are checked against the rule.
    let (status, body) = platform
        .call(
            Method::POST,
            paths::AGENT_REQUESTS,
            Some(&bearer),
            Some(submit("bad", now, now + hour * 9)),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 8 hours"),
        "{body}"
    );

    let request: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &bearer,
                Some(submit("r1", now, now + hour)),
            )
            .await,
    )
    .unwrap();
    let again: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &bearer,
                Some(submit("r1", now, now + hour)),
            )
            .await,
    )
    .unwrap();
    assert_eq!(
        again.id, request.id,
        "resubmitting the same local id is idempotent"
    );
    let approve = paths::ADMIN_REQUEST_APPROVE.replace("{id}", &request.id);

    let (status, body) = platform
        .call(Method::POST, &approve, Some(&pusher), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "not an approver: {body}");
    let (status, body) = platform.call(Method::POST, &approve, Some(&l2), None).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "level 2 waits for level 1: {body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("level 1"),
        "{body}"
    );
    let step = platform.ok(Method::POST, &approve, &l1a, None).await;
    assert_eq!(
        (step["state"].as_str(), step["current_level"].as_u64()),
        (Some("pending"), Some(1))
    );
    let (status, _) = platform
        .call(Method::POST, &approve, Some(&l1a), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "an approver counts once");
    let step = platform.ok(Method::POST, &approve, &l1b, None).await;
    assert_eq!(step["current_level"], 2, "level 1 complete");
    let done = platform.ok(Method::POST, &approve, &l2, None).await;
    assert_eq!(done["state"], "approved");
    assert_eq!(done["approvals"].as_array().unwrap().len(), 3);

    // The grant reaches the agent at check-in and verifies with the pinned key.
    let checkin = platform.checkin(&agent, &["alice"], &[&request.id]).await;
    let status = &checkin.requests[0];
    assert_eq!(status.state, epm_api::agent::RequestState::Approved);
    let grant: Grant = platform
        .public_key()
        .open(SignedKind::Grant, status.grant.as_ref().unwrap())
        .unwrap();
    assert_eq!(
        (grant.device_id.as_str(), grant.user.as_str(), grant.uses),
        ("mac-1", "alice", 3)
    );
    assert_eq!(grant.identity.value, "ab".repeat(32));

    // Revocation.
    let revoke = paths::ADMIN_REQUEST_REVOKE.replace("{id}", &request.id);
    let revoked = platform
        .ok(
            Method::POST,
            &revoke,
            &l1a,
            Some(json!({"reason": "no longer needed"})),
        )
        .await;
    assert_eq!(revoked["state"], "revoked");
    let checkin = platform.checkin(&agent, &["alice"], &[&request.id]).await;
    assert_eq!(
        checkin.requests[0].state,
        epm_api::agent::RequestState::Revoked
    );
    assert!(checkin.requests[0].grant.is_none());

    // One rejection at any level ends a request.
    let second: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &bearer,
                Some(submit("r2", now, now + hour)),
            )
            .await,
    )
    .unwrap();
    platform
        .ok(
            Method::POST,
            &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &second.id),
            &l1a,
            None,
        )
        .await;
    let denied = platform
        .ok(
            Method::POST,
            &paths::ADMIN_REQUEST_DENY.replace("{id}", &second.id),
            &l1b,
            Some(json!({"reason": "use tcpdump"})),
        )
        .await;
    assert_eq!(
        (denied["state"].as_str(), denied["reason"].as_str()),
        (Some("denied"), Some("use tcpdump"))
    );
    let (status, _) = platform
        .call(
            Method::POST,
            &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &second.id),
            Some(&l1a),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // A window that ends unapproved expires.
    let third: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &bearer,
                Some(submit(
                    "r3",
                    now,
                    Timestamp::now() + SignedDuration::from_secs(2),
                )),
            )
            .await,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let expired = platform
        .ok(
            Method::GET,
            &paths::ADMIN_REQUEST.replace("{id}", &third.id),
            &l1a,
            None,
        )
        .await;
    assert_eq!(expired["state"], "expired");
    let pending = platform
        .ok(
            Method::GET,
            &format!("{}?state=pending", paths::ADMIN_REQUESTS),
            &l1a,
            None,
        )
        .await;
    assert_eq!(pending, json!([]));

    // Another agent cannot read this agent's request.
    let other = platform.enroll(&pusher, "mac-2").await;
    let (status, _) = platform
        .call(
            Method::GET,
            &paths::AGENT_REQUEST.replace("{id}", &request.id),
            Some(&agent_bearer(&other)),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    platform.handle.shutdown();
}

#[tokio::test]
async fn a_client_trusting_another_ca_cannot_connect() {
    let platform = TestPlatform::start().await;
    let other = TestPlatform::start().await;
    let foreign = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(other.data.ca_cert()).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let err = foreign
        .get(format!("{}{}", platform.url, paths::HEALTH))
        .send()
        .await
        .unwrap_err();
    let chain = epm_platform::client::error_chain(&err);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");
    platform.handle.shutdown();
    other.handle.shutdown();
}

// ---- the web console (issue 18) ---------------------------------------

/// A browser-like client of the console: no redirects followed, the
/// session cookie and CSRF token kept by hand.
struct ConsoleClient {
    http: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

/// The value of `name="csrf"` in a page.
fn csrf_in(page: &str) -> String {
    let start = page.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    page[start..][..page[start..].find('"').unwrap()].to_owned()
}

/// The value a `Set-Cookie` header gives `name`.
fn set_cookie(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or("").to_owned())
}

impl TestPlatform {
    fn console_http(&self) -> reqwest::Client {
        let ca =
            reqwest::Certificate::from_pem(&std::fs::read(self.data.ca_cert()).unwrap()).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn set_password(&self, name: &str, password: &str) {
        let phc = epm_platform::console::auth::hash_password(password).unwrap();
        common::open_db(&self.data)
            .set_password(None, name, &phc, None)
            .unwrap();
    }

    /// Signs in; the response when refused.
    async fn sign_in(
        &self,
        name: &str,
        password: &str,
        code: &str,
    ) -> Result<ConsoleClient, (StatusCode, String)> {
        let http = self.console_http();
        let page = http
            .get(format!("{}/console/sign-in", self.url))
            .send()
            .await
            .unwrap();
        let pre = set_cookie(&page, "__Host-epm-sign-in").unwrap();
        let csrf = csrf_in(&page.text().await.unwrap());
        let response = http
            .post(format!("{}/console/sign-in", self.url))
            .header("cookie", format!("__Host-epm-sign-in={pre}"))
            .form(&[
                ("csrf", csrf.as_str()),
                ("name", name),
                ("password", password),
                ("code", code),
                ("tz", "Europe/Paris"),
            ])
            .send()
            .await
            .unwrap();
        if response.status() != StatusCode::SEE_OTHER {
            return Err((response.status(), response.text().await.unwrap()));
        }
        let cookie = set_cookie(&response, "__Host-epm-session").unwrap();
        let mut client = ConsoleClient {
            http,
            base: self.url.clone(),
            cookie,
            csrf: String::new(),
        };
        let (_, inbox) = client.get("/console/inbox").await;
        client.csrf = csrf_in(&inbox);
        Ok(client)
    }
}

impl ConsoleClient {
    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", format!("__Host-epm-session={}", self.cookie))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// Posts a form with this session's CSRF token.
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (StatusCode, String) {
        let mut fields = vec![("csrf", self.csrf.as_str())];
        fields.extend_from_slice(form);
        self.post_raw(path, &fields, Some(&self.cookie), None).await
    }

    async fn post_raw(
        &self,
        path: &str,
        form: &[(&str, &str)],
        cookie: Option<&str>,
        origin: Option<&str>,
    ) -> (StatusCode, String) {
        let mut request = self.http.post(format!("{}{path}", self.base)).form(form);
        if let Some(cookie) = cookie {
            request = request.header("cookie", format!("__Host-epm-session={cookie}"));
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let location = response
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.text().await.unwrap();
        (status, location.unwrap_or(body))
    }
}

const PASSWORD: &str = "correct horse battery";

#[tokio::test]
async fn console_pages_are_guarded_and_roles_decide_what_each_admin_may_do() {
    let platform = TestPlatform::start().await;
    let owner = platform.admin("owner", Some(1));
    platform
        .push(&owner, "general", approval_policy(&[1], 3))
        .await;
    platform.admin("auditor", None);
    platform.set_password("owner", PASSWORD);
    platform.set_password("auditor", PASSWORD);
    let agent = platform.enroll(&owner, "mac-1").await;
    platform.checkin(&agent, &["alice"], &[]).await;
    let start = Timestamp::now() + SignedDuration::from_mins(1);
    let mut hostile = submit("x", start, start + SignedDuration::from_hours(4));
    hostile["justification"] = json!("<script>alert(1)</script>");
    let request: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &agent_bearer(&agent),
                Some(hostile),
            )
            .await,
    )
    .unwrap();

    // Every page: no framing, no inline script, no sniffing, no referrer out.
    let response = platform
        .console_http()
        .get(format!("{}/console/sign-in", platform.url))
        .send()
        .await
        .unwrap();
    let headers = response.headers();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "same-origin");
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("Secure")
            && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );

    // Wrong passwords and unknown admins get the same answer.
    for (name, password) in [("owner", "not the password!"), ("nobody", PASSWORD)] {
        let (status, page) = platform.sign_in(name, password, "").await.err().unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(page.contains("Wrong name or password."), "{page}");
    }
    let auditor = platform.sign_in("auditor", PASSWORD, "").await.unwrap();
    let owner_console = platform.sign_in("owner", PASSWORD, "").await.unwrap();
    // Without a session, a page sends to the sign-in; an action is refused.
    let anonymous = ConsoleClient {
        cookie: "forged".into(),
        ..platform.sign_in("owner", PASSWORD, "").await.unwrap()
    };
    let (status, location) = anonymous.get("/console/inbox").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{location}");

    // The justification is text on the page, not markup.
    let path = format!("/console/requests/{}", request.id);
    let (status, page) = auditor.get(&path).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("<script>alert(1)"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        !page.contains("Approve at level"),
        "an auditor gets no approve button"
    );

    // An auditor reads but cannot approve, even by posting the form.
    let (status, body) = auditor.post(&format!("{path}/approve"), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("auditor"), "{body}");
    // Nor create admins or tokens.
    let (status, _) = auditor
        .post("/console/admins", &[("name", "minted"), ("role", "owner")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = auditor
        .post("/console/enroll-tokens", &[("uses", "1"), ("hours", "1")])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // CSRF: a forged token, another session's token, another origin.
    for (csrf, origin) in [
        ("forged", None),
        (auditor.csrf.as_str(), None),
        (owner_console.csrf.as_str(), Some("https://evil.example")),
    ] {
        let (status, body) = owner_console
            .post_raw(
                &format!("{path}/approve"),
                &[("csrf", csrf)],
                Some(&owner_console.cookie),
                origin,
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("Form refused"), "{body}");
    }
    // No cookie at all.
    let (status, body) = owner_console
        .post_raw(
            &format!("{path}/approve"),
            &[("csrf", owner_console.csrf.as_str())],
            None,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        platform
            .ok(
                Method::GET,
                &format!("/api/v1/admin/requests/{}", request.id),
                &owner,
                None
            )
            .await["state"],
        "pending"
    );

    // The owner approves, narrowing the uses; the grant says so.
    let (status, location) = owner_console
        .post(&format!("{path}/approve"), &[("uses", "4")])
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "more uses than the rule: {location}"
    );
    let shorter = (start + SignedDuration::from_hours(1)).to_string();
    let later = (start + SignedDuration::from_hours(5)).to_string();
    let (status, _) = owner_console
        .post(&format!("{path}/approve"), &[("end", later.as_str())])
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a window is only shortened"
    );
    let (status, location) = owner_console
        .post(
            &format!("{path}/approve"),
            &[("uses", "2"), ("end", shorter.as_str())],
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{location}");
    assert!(location.ends_with("done=approved-fully"), "{location}");
    let status: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::GET,
                &paths::AGENT_REQUEST.replace("{id}", &request.id),
                &agent_bearer(&agent),
                None,
            )
            .await,
    )
    .unwrap();
    let grant: Grant = platform
        .public_key()
        .open(SignedKind::Grant, &status.grant.unwrap())
        .unwrap();
    assert_eq!(grant.uses, 2);
    assert_eq!(grant.not_after, start + SignedDuration::from_hours(1));
    // Every action is in the activity log, with what it did.
    let activity = platform
        .ok(
            Method::GET,
            "/api/v1/admin/activity?admin=owner",
            &owner,
            None,
        )
        .await;
    let details: Vec<&str> = activity["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("fully approved, grant issued (console)")),
        "{details:?}"
    );
    assert!(
        details.iter().any(|d| d.starts_with("refused:")),
        "{details:?}"
    );

    // Sign out everywhere ends both of the owner's sessions.
    let (status, _) = owner_console
        .post("/console/sign-out-everywhere", &[])
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _) = owner_console.get("/console/inbox").await;
    assert_eq!(status, StatusCode::SEE_OTHER, "signed out");
    let (status, _) = anonymous.get("/console/inbox").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    platform.handle.shutdown();
}

#[tokio::test]
async fn console_sign_in_takes_a_totp_code_once() {
    let platform = TestPlatform::start().await;
    platform.admin("owner", Some(1));
    platform.set_password("owner", PASSWORD);
    let secret = epm_platform::console::auth::new_totp_secret();
    common::open_db(&platform.data)
        .set_totp(None, "owner", Some(&secret))
        .unwrap();
    let now = Timestamp::now().as_second().unsigned_abs();
    let code = epm_platform::console::auth::totp_code(&secret, now).unwrap();
    let (status, page) = platform.sign_in("owner", PASSWORD, "").await.err().unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.contains("authenticator app"), "{page}");
    let wrong = if code == "000000" { "111111" } else { "000000" };
    assert!(platform.sign_in("owner", PASSWORD, wrong).await.is_err());
    assert!(platform.sign_in("owner", PASSWORD, &code).await.is_ok());
    let (_, page) = platform
        .sign_in("owner", PASSWORD, &code)
        .await
        .err()
        .unwrap();
    assert!(page.contains("already used"), "a code works once: {page}");
    platform.handle.shutdown();
}

#[tokio::test]
async fn webhooks_get_signed_events_with_a_link_and_failures_are_retried() {
    use axum::routing::post;
    let platform = TestPlatform::start().await;
    let owner = platform.admin("owner", Some(1));
    platform
        .push(&owner, "general", approval_policy(&[1], 1))
        .await;
    platform.set_password("owner", PASSWORD);
    // A receiver that fails its first call.
    let (sender, mut received) =
        tokio::sync::mpsc::unbounded_channel::<(axum::http::HeaderMap, String)>();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let receiver = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let (sender, calls) = (sender.clone(), calls.clone());
            async move {
                let _ = sender.send((headers, body));
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!(
        "http://127.0.0.1:{}/hook",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let console = platform.sign_in("owner", PASSWORD, "").await.unwrap();
    let (status, _) = console
        .post("/console/webhooks", &[("url", "http://example.com/hook")])
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "plain http only to this machine"
    );
    let (status, page) = console.post("/console/webhooks", &[("url", &hook)]).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let secret_at = page.find("whs_").unwrap();
    let secret = &page[secret_at..][..page[secret_at..].find('"').unwrap()];

    let agent = platform.enroll(&owner, "mac-1").await;
    platform.checkin(&agent, &["alice"], &[]).await;
    let start = Timestamp::now() + SignedDuration::from_mins(1);
    let request: RequestStatus = serde_json::from_value(
        platform
            .ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &agent_bearer(&agent),
                Some(submit("w", start, start + SignedDuration::from_hours(1))),
            )
            .await,
    )
    .unwrap();
    let (headers, body) = tokio::time::timeout(Duration::from_secs(10), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(headers["x-epm-event"], "request.created");
    assert_eq!(
        headers["x-epm-signature"].to_str().unwrap(),
        epm_platform::webhooks::signature(secret, body.as_bytes())
    );
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["request"]["id"], request.id);
    assert!(
        event["link"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/console/requests/{}", request.id)),
        "{event}"
    );
    // The endpoint answered 500: the delivery waits for its retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = common::open_db(&platform.data).deliveries(10).unwrap();
    assert_eq!(
        (log[0].state.as_str(), log[0].attempts, log[0].last_status),
        ("pending", 1, Some(500)),
        "{log:?}"
    );
    assert!(log[0].next_at > Timestamp::now(), "backoff");
    let (_, page) = console.get("/console/webhooks").await;
    assert!(page.contains("HTTP 500"), "the delivery log shows it");
    platform.handle.shutdown();
}

#[tokio::test]
async fn console_exports_the_filtered_audit_with_formulas_defused() {
    let platform = TestPlatform::start().await;
    let owner = platform.admin("owner", Some(1));
    platform.set_password("owner", PASSWORD);
    let agent = platform.enroll(&owner, "mac-1").await;
    let records: Vec<Value> = [("allow", "/bin/ls"), ("deny", "=cmd|' /C calc'!A0"), ("deny", "/usr/bin/nc")]
        .iter()
        .enumerate()
        .map(|(i, (decision, path))| json!({"seq": i + 1, "time": "2026-11-22T10:00:00Z", "event": "exec", "decision": decision, "user": "alice", "path": path, "device_id": "mac-1"}))
        .collect();
    platform
        .ok(
            Method::POST,
            paths::AGENT_AUDIT,
            &agent_bearer(&agent),
            Some(json!({"oldest_kept_seq": 1, "records": records})),
        )
        .await;
    let console = platform.sign_in("owner", PASSWORD, "").await.unwrap();
    let (status, csv) = console.get("/console/audit/export.csv?decision=deny").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        csv.lines().count(),
        3,
        "a header and the two denials: {csv}"
    );
    assert!(csv.contains("\"'=cmd|"), "a formula is defused: {csv}");
    let (_, jsonl) = console.get("/console/audit/export.jsonl?q=nc").await;
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{jsonl}");
    assert_eq!(lines[0]["path"], "/usr/bin/nc");
    let (_, page) = console
        .get("/console/audit?user=alice&decision=allow")
        .await;
    assert!(
        page.contains("/bin/ls") && !page.contains("/usr/bin/nc"),
        "{page}"
    );
    platform.handle.shutdown();
}
