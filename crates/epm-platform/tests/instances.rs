//! Two platform instances on one PostgreSQL database, each with its own
//! pool, listener and TLS port, sharing the data directory's keys (as
//! docs/scale.md tells operators to): what one does, the other sees, and
//! what both do at once counts once.
//!
//! Needs a PostgreSQL server (EPM_TEST_POSTGRES_URL; .ci/run starts one):
//! skipped without one, failed without one under EPM_E2E=1.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use epm_api::admin::CreateAdmin;
use epm_api::agent::{
    AgentCredentials, AuditAck, CheckinRequest, CheckinResponse, EnrollRequest, LocalUser,
    RequestState, RequestStatus, RequestSubject, RequestSubmit, Window,
};
use epm_api::{SubjectIdentity, paths};
use epm_platform::db::{Actor, Db};
use epm_platform::keys::DataDir;
use epm_platform::server::{self, AppState};
use jiff::{SignedDuration, Timestamp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

mod common;

struct Instance {
    url: String,
    http: reqwest::Client,
    handle: axum_server::Handle,
}

impl Instance {
    async fn start(data: &DataDir, database: &str) -> Instance {
        let tls = epm_platform::tls_config(&data.file("server.pem"), &data.file("server-key.pem"))
            .await
            .unwrap();
        let db = Db::open_url(database).unwrap();
        assert_eq!(db.kind(), "postgres");
        let state = AppState::new(db, data.signing_key().unwrap());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let handle = axum_server::Handle::new();
        tokio::spawn(server::serve(state, addr, tls, handle.clone()));
        let ca = reqwest::Certificate::from_pem(&std::fs::read(data.ca_cert()).unwrap()).unwrap();
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let url = format!("https://127.0.0.1:{}", addr.port());
        for _ in 0..200 {
            if http
                .get(format!("{url}{}", paths::HEALTH))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Instance { url, http, handle }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value, reqwest::header::HeaderMap) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
            headers,
        )
    }

    async fn ok(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Value {
        let (status, value, _) = self.call(method, path, token, body).await;
        assert!(status.is_success(), "{} {path}: {status} {value}", self.url);
        value
    }
}

fn admin(database: &str, name: &str, level: Option<u32>) -> String {
    Db::open_url(database)
        .unwrap()
        .create_admin(
            Actor::Local,
            &CreateAdmin {
                name: name.into(),
                role: None,
                approver_level: level,
                endpoint_users: None,
            },
        )
        .unwrap()
        .0
        .token
}

fn bearer(agent: &AgentCredentials) -> String {
    format!("{}.{}", agent.agent_id, agent.agent_secret)
}

fn submit(local_id: &str) -> Value {
    let now = Timestamp::now();
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
        window: Window {
            start: now,
            end: now + SignedDuration::from_hours(1),
        },
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_database_act_as_one_platform() {
    let Some(server) = common::postgres_server() else {
        return;
    };
    let database = common::fresh_postgres_database(&server);
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(&dir.path().join("data")).unwrap();
    data.ensure_keys(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let a = Instance::start(&data, &database).await;
    let b = Instance::start(&data, &database).await;
    let owner = admin(&database, "owner", None);

    // Policy pushed on B: a rule two level-1 approvers must approve.
    b.ok(
        Method::PUT,
        &paths::ADMIN_POLICY.replace("{scope}", "general"),
        &owner,
        Some(json!({"version": 1, "default_action": "allow", "rules": [{
            "id": "wireshark", "action": "approve", "match": {"name": "wireshark"},
            "approval": {"levels": [{"approvers": 2}], "max_window_hours": 8, "uses": 1}
        }]})),
    )
    .await;
    let l1a = admin(&database, "l1a", Some(1));
    let l1b = admin(&database, "l1b", Some(1));

    // Enrolled with a token made on B, through A.
    let token = b
        .ok(
            Method::POST,
            paths::ADMIN_ENROLL_TOKENS,
            &owner,
            Some(json!({"uses": 1, "expires_in_seconds": 3600})),
        )
        .await["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, enrolled, _) = a
        .call(
            Method::POST,
            paths::AGENT_ENROLL,
            "",
            Some(
                serde_json::to_value(EnrollRequest {
                    enrollment_token: token,
                    device_id: "mac-1".into(),
                    hostname: "mac-1".into(),
                    os: "macos".into(),
                    agent_version: "test".into(),
                })
                .unwrap(),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{enrolled}");
    let agent: AgentCredentials = serde_json::from_value(enrolled).unwrap();
    let agent_bearer = bearer(&agent);

    // The bundle built on A is the one B serves: same version, same ETag,
    // so B answers the agent's If-None-Match with 304.
    let checkin = CheckinRequest {
        users: vec![LocalUser {
            name: "alice".into(),
            groups: vec!["staff".into()],
        }],
        ..CheckinRequest::default()
    };
    let on_a: CheckinResponse = serde_json::from_value(
        a.ok(
            Method::POST,
            paths::AGENT_CHECKIN,
            &agent_bearer,
            Some(serde_json::to_value(&checkin).unwrap()),
        )
        .await,
    )
    .unwrap();
    let on_b: CheckinResponse = serde_json::from_value(
        b.ok(
            Method::POST,
            paths::AGENT_CHECKIN,
            &agent_bearer,
            Some(serde_json::to_value(&checkin).unwrap()),
        )
        .await,
    )
    .unwrap();
    assert_eq!(on_a.policy.etag, on_b.policy.etag);
    let unchanged = b
        .http
        .get(format!("{}{}", b.url, paths::AGENT_POLICY))
        .bearer_auth(&agent_bearer)
        .header("if-none-match", &on_a.policy.etag)
        .send()
        .await
        .unwrap();
    assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);
    let envelope = |i: &Instance| {
        let http = i.http.clone();
        let url = format!("{}{}", i.url, paths::AGENT_POLICY);
        let agent_bearer = agent_bearer.clone();
        async move {
            http.get(url)
                .bearer_auth(agent_bearer)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        envelope(&a).await,
        envelope(&b).await,
        "one envelope per version"
    );

    // Approvals split across the instances, at the same moment, several
    // times: each request ends approved with exactly two votes, and exactly
    // one of the two calls was the last vote.
    let mut approved = Vec::new();
    for round in 0..6 {
        let request: RequestStatus = serde_json::from_value(
            a.ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &agent_bearer,
                Some(submit(&format!("r{round}"))),
            )
            .await,
        )
        .unwrap();
        let approve = paths::ADMIN_REQUEST_APPROVE.replace("{id}", &request.id);
        let (first, second) = tokio::join!(
            a.call(Method::POST, &approve, &l1a, None),
            b.call(Method::POST, &approve, &l1b, None)
        );
        assert_eq!((first.0, second.0), (StatusCode::OK, StatusCode::OK));
        let last_votes = [&first.1, &second.1]
            .iter()
            .filter(|v| v["state"] == "approved")
            .count();
        assert_eq!(last_votes, 1, "round {round}: {} / {}", first.1, second.1);
        let stored = b
            .ok(
                Method::GET,
                &paths::ADMIN_REQUEST.replace("{id}", &request.id),
                &owner,
                None,
            )
            .await;
        assert_eq!(stored["state"], "approved", "{stored}");
        assert_eq!(stored["approvals"].as_array().unwrap().len(), 2);
        approved.push(request.id.clone());

        // The same approver on both instances at once counts once.
        let next: RequestStatus = serde_json::from_value(
            b.ok(
                Method::POST,
                paths::AGENT_REQUESTS,
                &agent_bearer,
                Some(submit(&format!("twice{round}"))),
            )
            .await,
        )
        .unwrap();
        let approve = paths::ADMIN_REQUEST_APPROVE.replace("{id}", &next.id);
        let (first, second) = tokio::join!(
            a.call(Method::POST, &approve, &l1a, None),
            b.call(Method::POST, &approve, &l1a, None)
        );
        let mut statuses = [first.0, second.0];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT]);
        let stored = a
            .ok(
                Method::GET,
                &paths::ADMIN_REQUEST.replace("{id}", &next.id),
                &owner,
                None,
            )
            .await;
        assert_eq!(stored["state"], "pending");
        assert_eq!(stored["approvals"].as_array().unwrap().len(), 1);
    }
    // A tail waiting on A wakes for records uploaded to B.
    let head = a.ok(Method::GET, paths::ADMIN_AUDIT, &owner, None).await["next"]
        .as_u64()
        .unwrap();
    let tail = {
        let http = a.http.clone();
        let url = format!("{}{}?after={head}&wait=30", a.url, paths::ADMIN_AUDIT);
        let owner = owner.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let page = http
                .get(url)
                .bearer_auth(owner)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap();
            (page, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let upload = json!({"oldest_kept_seq": 1, "records": (1..=3).map(|s| json!({"seq": s, "event": "exec", "decision": "allow"})).collect::<Vec<_>>()});
    // The same batch to both instances at once: stored once.
    let (on_a, on_b) = tokio::join!(
        a.call(
            Method::POST,
            paths::AGENT_AUDIT,
            &agent_bearer,
            Some(upload.clone())
        ),
        b.call(
            Method::POST,
            paths::AGENT_AUDIT,
            &agent_bearer,
            Some(upload.clone())
        )
    );
    let acks: Vec<AuditAck> = [on_a, on_b]
        .into_iter()
        .map(|(status, v, _)| {
            assert_eq!(status, StatusCode::OK, "{v}");
            serde_json::from_value(v).unwrap()
        })
        .collect();
    assert_eq!(acks[0].stored + acks[1].stored, 3, "{acks:?}");
    assert_eq!(acks[0].duplicates + acks[1].duplicates, 3, "{acks:?}");
    assert!(
        acks.iter()
            .all(|a| a.acked_seq == 3 || a.stored + a.duplicates == 3)
    );
    let (page, waited) = tokio::time::timeout(Duration::from_secs(20), tail)
        .await
        .unwrap()
        .unwrap();
    assert!(
        waited < Duration::from_secs(10),
        "woken by the notification, not the timeout: {waited:?}"
    );
    assert!(!page["records"].as_array().unwrap().is_empty(), "{page}");
    let all = b
        .ok(
            Method::GET,
            &format!("{}?limit=1000", paths::ADMIN_AUDIT),
            &owner,
            None,
        )
        .await;
    assert_eq!(all["records"].as_array().unwrap().len(), 3);

    // The agent learns its approved requests on whichever instance.
    let checkin_b: CheckinResponse = serde_json::from_value(
        b.ok(
            Method::POST,
            paths::AGENT_CHECKIN,
            &agent_bearer,
            Some(
                serde_json::to_value(CheckinRequest {
                    pending_requests: approved.clone(),
                    ..checkin.clone()
                })
                .unwrap(),
            ),
        )
        .await,
    )
    .unwrap();
    assert_eq!(checkin_b.audit_acked_seq, 3);
    assert_eq!(checkin_b.requests.len(), approved.len());
    assert!(
        checkin_b
            .requests
            .iter()
            .all(|r| r.state == RequestState::Approved && r.grant.is_some()),
        "{:?}",
        checkin_b.requests
    );
    a.handle.shutdown();
    b.handle.shutdown();
}
