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
use epm_platform::server::AppState;
use jiff::{SignedDuration, Timestamp};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

mod common;

struct Instance {
    url: String,
    http: reqwest::Client,
    handle: axum_server::Handle,
    state: std::sync::Arc<AppState>,
}

impl Instance {
    async fn start(data: &DataDir, database: &str) -> Instance {
        let db = Db::open_url(database).unwrap();
        assert_eq!(db.kind(), "postgres");
        let common::Server {
            url,
            http,
            handle,
            state,
        } = common::start_server(data, db).await;
        Instance {
            url,
            http,
            handle,
            state,
        }
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

// ---- request waits: decisions reach a waiting agent at once ----------

/// An admin made on `on`'s database.
fn admin_on(on: &Instance, name: &str, level: Option<u32>) -> String {
    on.state
        .db
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

/// Pushes a one-approver rule for `wireshark` and enrolls `devices`
/// (each checked in with user alice); returns their credentials.
async fn fleet(on: &Instance, owner: &str, devices: &[&str]) -> Vec<AgentCredentials> {
    on.ok(
        Method::PUT,
        &paths::ADMIN_POLICY.replace("{scope}", "general"),
        owner,
        Some(json!({"version": 1, "default_action": "allow", "rules": [{
            "id": "wireshark", "action": "approve", "match": {"name": "wireshark"},
            "approval": {"levels": [{"approvers": 1}], "max_window_hours": 8, "uses": 1}
        }]})),
    )
    .await;
    let mut agents = Vec::new();
    for device in devices {
        let token = on
            .ok(
                Method::POST,
                paths::ADMIN_ENROLL_TOKENS,
                owner,
                Some(json!({"uses": 1, "expires_in_seconds": 3600})),
            )
            .await["token"]
            .as_str()
            .unwrap()
            .to_owned();
        let (status, enrolled, _) = on
            .call(
                Method::POST,
                paths::AGENT_ENROLL,
                "",
                Some(
                    serde_json::to_value(EnrollRequest {
                        enrollment_token: token,
                        device_id: (*device).into(),
                        hostname: (*device).into(),
                        os: "macos".into(),
                        agent_version: "test".into(),
                    })
                    .unwrap(),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{enrolled}");
        let agent: AgentCredentials = serde_json::from_value(enrolled).unwrap();
        let checkin = CheckinRequest {
            users: vec![LocalUser {
                name: "alice".into(),
                groups: vec!["staff".into()],
            }],
            ..CheckinRequest::default()
        };
        on.ok(
            Method::POST,
            paths::AGENT_CHECKIN,
            &bearer(&agent),
            Some(serde_json::to_value(&checkin).unwrap()),
        )
        .await;
        agents.push(agent);
    }
    agents
}

/// A request of `agent` made on `on`: its platform id.
async fn request_on(on: &Instance, agent: &AgentCredentials, local_id: &str) -> String {
    let status: RequestStatus = serde_json::from_value(
        on.ok(
            Method::POST,
            paths::AGENT_REQUESTS,
            &bearer(agent),
            Some(submit(local_id)),
        )
        .await,
    )
    .unwrap();
    assert_eq!(status.state, RequestState::Pending);
    status.id
}

/// Starts `agent`'s long poll on `on` for `ids`; resolves to its status,
/// body and how long it took.
fn wait_on(
    on: &Instance,
    agent: &AgentCredentials,
    ids: &[&str],
    seconds: u32,
) -> tokio::task::JoinHandle<(StatusCode, Value, Duration)> {
    wait_with(on, agent, json!({"requests": ids, "wait_seconds": seconds}))
}

/// Starts `agent`'s long poll on `on` for the approved requests `grants`
/// (grants it holds in force), as [`wait_on`].
fn wait_on_grants(
    on: &Instance,
    agent: &AgentCredentials,
    grants: &[&str],
    seconds: u32,
) -> tokio::task::JoinHandle<(StatusCode, Value, Duration)> {
    wait_with(
        on,
        agent,
        json!({"requests": [], "grants": grants, "wait_seconds": seconds}),
    )
}

fn wait_with(
    on: &Instance,
    agent: &AgentCredentials,
    body: Value,
) -> tokio::task::JoinHandle<(StatusCode, Value, Duration)> {
    let http = on.http.clone();
    let url = format!("{}{}", on.url, paths::AGENT_REQUESTS_WAIT);
    let bearer = bearer(agent);
    tokio::spawn(async move {
        let started = Instant::now();
        let response = http
            .post(url)
            .bearer_auth(bearer)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let value = response.json::<Value>().await.unwrap_or(Value::Null);
        (status, value, started.elapsed())
    })
}

/// How long a test lets a wait register before deciding.
const SETTLE: Duration = Duration::from_millis(500);

/// The long poll on `a` answers when the request is approved on `b`,
/// well before its 30 s: the decision travelled (by NOTIFY between two
/// instances; in-process when `a` and `b` are one).
async fn approval_on_b_wakes_a_wait_on_a(a: &Instance, b: &Instance, owner: &str) {
    let agents = fleet(a, owner, &["mac-wait-1"]).await;
    let agent = &agents[0];
    let approver = admin_on(b, "approver", Some(1));
    let id = request_on(a, agent, "wait-1").await;
    let other = request_on(a, agent, "wait-2").await;

    let poll = wait_on(a, agent, &[&id, &other], 30);
    tokio::time::sleep(SETTLE).await;
    assert!(!poll.is_finished(), "nothing decided yet: the wait holds");
    let approved = Instant::now();
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &id),
        &approver,
        None,
    )
    .await;
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .expect("the wait answered")
        .unwrap();
    let after = approved.elapsed();
    eprintln!("request wait answered {after:?} after the approval call started");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        after < Duration::from_secs(10),
        "woken by the decision, not the 30 s timeout: {after:?}"
    );
    assert_eq!(
        body,
        json!({"changed": [{"id": id, "state": "approved"}]}),
        "only the decided request"
    );

    // A denial wakes it the same way, and an id already decided answers
    // at once.
    let poll = wait_on(a, agent, &[&other], 30);
    tokio::time::sleep(SETTLE).await;
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_DENY.replace("{id}", &other),
        &approver,
        Some(json!({"reason": "not today"})),
    )
    .await;
    let (status, body, waited) = tokio::time::timeout(Duration::from_secs(20), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(body["changed"][0]["state"], "denied", "{body}");
    let (_, body, waited) = wait_on(b, agent, &[&id, &other], 30).await.unwrap();
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(body["changed"].as_array().unwrap().len(), 2, "{body}");

    // The approved request is a grant the agent holds: a wait naming it
    // as such holds while it stays approved, and a revocation on `b`
    // answers it (the device then drops the grant at once, not at its
    // next check-in).
    let held = wait_on_grants(a, agent, &[&id], 30);
    tokio::time::sleep(SETTLE).await;
    assert!(!held.is_finished(), "still approved: the wait holds");
    let revoked = Instant::now();
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_REVOKE.replace("{id}", &id),
        &approver,
        Some(json!({"reason": "ticket closed"})),
    )
    .await;
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the wait answered")
        .unwrap();
    let after = revoked.elapsed();
    eprintln!("grant wait answered {after:?} after the revoke call started");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        after < Duration::from_secs(10),
        "woken by the revocation, not the 30 s timeout: {after:?}"
    );
    assert_eq!(body, json!({"changed": [{"id": id, "state": "revoked"}]}));
    // Named as a grant, an id already revoked answers at once; named as
    // pending, a denied one too, in the same answer.
    let (_, body, waited) = wait_with(
        b,
        agent,
        json!({"requests": [&other], "grants": [&id], "wait_seconds": 30}),
    )
    .await
    .unwrap();
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(
        body,
        json!({"changed": [
            {"id": other, "state": "denied"},
            {"id": id, "state": "revoked"},
        ]})
    );

    // Every state change wakes the wait, the agent's own used report (a
    // check-in, here on `b`) included.
    let third = request_on(a, agent, "wait-3").await;
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &third),
        &approver,
        None,
    )
    .await;
    let held = wait_on_grants(a, agent, &[&third], 30);
    tokio::time::sleep(SETTLE).await;
    assert!(!held.is_finished(), "still approved: the wait holds");
    let checkin = CheckinRequest {
        used_requests: vec![third.clone()],
        ..CheckinRequest::default()
    };
    b.ok(
        Method::POST,
        paths::AGENT_CHECKIN,
        &bearer(agent),
        Some(serde_json::to_value(&checkin).unwrap()),
    )
    .await;
    let (status, body, waited) = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the wait answered")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(body, json!({"changed": [{"id": third, "state": "used"}]}));
    // A grant used up, or already revoked, is not revoked (again): the
    // record keeps what happened.
    for done in [&third, &id] {
        let (status, body, _) = a
            .call(
                Method::POST,
                &paths::ADMIN_REQUEST_REVOKE.replace("{id}", done),
                &approver,
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("only an approved request can be revoked"),
            "{body}"
        );
    }
}

/// What a wait must not give away or let grow.
async fn waits_are_bounded_and_leak_nothing(a: &Instance, b: &Instance, owner: &str) {
    let agents = fleet(a, owner, &["mac-mine", "mac-theirs"]).await;
    let (mine, theirs) = (&agents[0], &agents[1]);
    let approver = admin_on(a, "approver2", Some(1));

    // Waiting on another agent's request: not woken by its decision, and
    // told nothing about it, even once it is decided.
    let their_id = request_on(a, theirs, "theirs-1").await;
    let snoop = wait_on(a, mine, &[&their_id], 3);
    tokio::time::sleep(SETTLE).await;
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &their_id),
        &approver,
        None,
    )
    .await;
    let (status, body, waited) = snoop.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"changed": []}));
    assert!(
        waited >= Duration::from_millis(2900),
        "not woken early by another agent's request: {waited:?}"
    );
    let (_, body, _) = wait_on(b, mine, &[&their_id, "req_nonexistent"], 0)
        .await
        .unwrap();
    assert_eq!(
        body,
        json!({"changed": []}),
        "a decided foreign id stays unseen"
    );
    // The same for another agent's grant: named as a grant of mine, its
    // revocation neither wakes my wait nor is told to it.
    let snoop = wait_on_grants(a, mine, &[&their_id], 3);
    tokio::time::sleep(SETTLE).await;
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_REVOKE.replace("{id}", &their_id),
        &approver,
        Some(json!({})),
    )
    .await;
    let (status, body, waited) = snoop.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"changed": []}));
    assert!(
        waited >= Duration::from_millis(2900),
        "not woken early by another agent's revocation: {waited:?}"
    );
    let (_, body, _) = wait_on_grants(b, mine, &[&their_id], 0).await.unwrap();
    assert_eq!(
        body,
        json!({"changed": []}),
        "a revoked foreign grant stays unseen"
    );

    // Too many ids, a malformed one, a body over the cap: refused plainly.
    let many: Vec<String> = (0..=epm_api::agent::MAX_WAIT_REQUESTS)
        .map(|i| format!("req_{i}"))
        .collect();
    let (status, body, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(mine),
            Some(json!({"requests": many, "wait_seconds": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests"),
        "{body}"
    );
    // The cap counts requests and grants together: half and half over it
    // is refused too, and says so.
    let half = epm_api::agent::MAX_WAIT_REQUESTS / 2;
    let (status, body, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(mine),
            Some(json!({"requests": &many[..half], "grants": &many[half..], "wait_seconds": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{} grants", many.len() - half))
            && message.contains(&format!("limit of {}", epm_api::agent::MAX_WAIT_REQUESTS)),
        "{body}"
    );
    let (status, body, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(mine),
            Some(json!({"requests": [], "grants": ["a\u{202E}b"], "wait_seconds": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("grants[0]"),
        "{body}"
    );
    let (status, body, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(mine),
            Some(json!({"requests": ["a\u{202E}b"], "wait_seconds": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let huge = vec!["x".repeat(200); 200];
    let (status, body, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(mine),
            Some(json!({"requests": huge, "wait_seconds": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, _, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            "nobody.nothing",
            Some(json!({"requests": [], "wait_seconds": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // One wait per agent: a second replaces the first, which is told so.
    let my_id = request_on(a, mine, "mine-1").await;
    let first = wait_on(a, mine, &[&my_id], 30);
    tokio::time::sleep(SETTLE).await;
    let second = wait_on(a, mine, &[&my_id], 30);
    let (status, body, waited) = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "replaced", "{body}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    // The instance's cap: with one wait held, another agent is refused
    // with a clear error and a Retry-After.
    a.state.set_max_request_waiters(1);
    let (status, body, headers) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(theirs),
            Some(json!({"requests": [&their_id], "wait_seconds": 5})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "too_many_waits", "{body}");
    assert!(headers.contains_key("retry-after"));
    // The agent holding the wait may still replace its own.
    let third = wait_on(a, mine, &[&my_id], 30);
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::CONFLICT);
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &my_id),
        &approver,
        None,
    )
    .await;
    let (status, body, _) = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["changed"][0]["id"], my_id.as_str());
    // Answered waits are gone: the slot is free again.
    let (status, body, _) = a
        .call(
            Method::POST,
            paths::AGENT_REQUESTS_WAIT,
            &bearer(theirs),
            Some(json!({"requests": [&their_id], "wait_seconds": 0})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    a.state.set_max_request_waiters(1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_on_one_instance_wakes_a_request_wait_on_the_other() {
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
    approval_on_b_wakes_a_wait_on_a(&a, &b, &owner).await;
    waits_are_bounded_and_leak_nothing(&a, &b, &owner).await;
    a_decision_while_the_listener_is_down_is_not_missed(&a, &b, &owner, &database).await;
    a.handle.shutdown();
    b.handle.shutdown();
}

/// The instances' listener connections are cut, and a request is approved
/// before they are back: that NOTIFY is lost, but each instance wakes all
/// its waits once it listens again, and the re-read finds the decision.
async fn a_decision_while_the_listener_is_down_is_not_missed(
    a: &Instance,
    b: &Instance,
    owner: &str,
    database: &str,
) {
    let approver = admin_on(b, "approver3", Some(1));
    let agents = fleet(a, owner, &["mac-cut"]).await;
    let agent = &agents[0];
    let id = request_on(a, agent, "cut-1").await;
    let poll = wait_on(a, agent, &[&id], 30);
    tokio::time::sleep(SETTLE).await;

    let (client, connection) = tokio_postgres::connect(database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let cut = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(cut.len(), 2, "one listener per instance");
    b.ok(
        Method::POST,
        &paths::ADMIN_REQUEST_APPROVE.replace("{id}", &id),
        &approver,
        None,
    )
    .await;
    let (status, body, waited) = tokio::time::timeout(Duration::from_secs(40), poll)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        waited < Duration::from_secs(15),
        "woken after the listener came back, not at the timeout: {waited:?}"
    );
    assert_eq!(body["changed"][0]["state"], "approved", "{body}");
}

/// The same on one instance, on the suite's database (SQLite unless
/// EPM_TEST_BACKEND=postgres): in-process wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_wakes_a_request_wait_on_the_same_instance() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(&dir.path().join("data")).unwrap();
    data.ensure_keys(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let common::Server {
        url,
        http,
        handle,
        state,
    } = common::start_server(&data, common::open_db(&data)).await;
    let one = Instance {
        url,
        http,
        handle,
        state,
    };
    let owner = admin_on(&one, "owner", None);
    approval_on_b_wakes_a_wait_on_a(&one, &one, &owner).await;
    waits_are_bounded_and_leak_nothing(&one, &one, &owner).await;
    one.handle.shutdown();
}
