//! The sync cycle against an in-memory platform that behaves like the real
//! one (idempotent audit on seq, contiguous acknowledgement, ETags) and can
//! lose a reply or sign with the wrong key on demand.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use epm_api::agent::{AgentCredentials, PolicyState as PlatformPolicy};
use epm_api::sign::{PolicySigningKey, SignedKind};
use epm_api::{BUNDLE_FORMAT, Grant, PolicyBundle, SubjectIdentity as ApiIdentity};
use epm_audit::{AuditEvent, AuditLog, Chain, EventKind, LogOptions};
use epm_policy::{Action, Engine};
use epm_store::{IdentityKind, Request, SubjectIdentity};
use epm_sync::credentials::FileStore;

use super::*;
use crate::config::{FailMode, Mode};
use crate::exec::audit::AuditWriter;
use crate::exec::decider::PolicyState;

const DEVICE: &str = "dev-1";

#[derive(Default)]
struct FakeState {
    enrolls: u32,
    /// Audit records held, by seq.
    audit: BTreeMap<u64, String>,
    oldest_kept: u64,
    duplicates: u64,
    /// Acknowledge no further than this (a platform behind on storing).
    ack_cap: Option<u64>,
    /// Store the next upload but lose the reply (a kill mid-upload).
    lose_next_reply: bool,
    bundle: Option<(SignedEnvelope, u64, String)>,
    requests: Vec<RequestStatus>,
    submitted: Vec<RequestSubmit>,
    /// Answer check-ins / policy fetches with this error instead.
    bad_checkin: Option<fn() -> SyncError>,
    bad_fetch: Option<fn() -> SyncError>,
    /// Answer request waits with this error instead.
    bad_wait: Option<fn() -> SyncError>,
    checkins: u32,
    waits: u32,
    /// What each wait named, in order.
    watched: Vec<Watched>,
    /// Refuse waits naming grants, as a platform older than them does.
    refuse_grant_waits: bool,
}

#[derive(Clone, Default)]
struct FakePlatform(Arc<Mutex<FakeState>>);

impl FakePlatform {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    fn acked(state: &FakeState) -> u64 {
        let mut acked = state.oldest_kept.saturating_sub(1);
        while state.audit.contains_key(&(acked + 1)) {
            acked += 1;
        }
        state.ack_cap.map_or(acked, |cap| acked.min(cap))
    }

    /// Each publication gets its own ETag, as the platform's content hash would.
    fn publish(&self, envelope: SignedEnvelope, version: u64) {
        let etag = format!("\"{}\"", &envelope.signature[..16]);
        self.state().bundle = Some((envelope, version, etag));
    }
}

fn lost(step: &'static str) -> SyncError {
    SyncError::Transfer {
        step,
        url: "https://fake".into(),
        detail: "connection reset".into(),
    }
}

impl Platform for FakePlatform {
    async fn enroll(&self, request: &EnrollRequest) -> Result<AgentCredentials, SyncError> {
        assert_eq!(request.device_id, DEVICE);
        self.state().enrolls += 1;
        Ok(AgentCredentials {
            agent_id: "agent-1".into(),
            agent_secret: "secret".into(),
            offline_key: "a2V5".into(),
        })
    }

    async fn checkin(
        &self,
        _: &AgentCredentials,
        request: &CheckinRequest,
    ) -> Result<CheckinResponse, SyncError> {
        let mut state = self.state();
        if let Some(error) = state.bad_checkin {
            return Err(error());
        }
        state.checkins += 1;
        let (version, etag) = state
            .bundle
            .as_ref()
            .map_or((0, String::new()), |(_, v, e)| (*v, e.clone()));
        Ok(CheckinResponse {
            policy: PlatformPolicy {
                version,
                etag,
                changed: request.policy_version != Some(version),
            },
            audit_acked_seq: Self::acked(&state),
            requests: state.requests.clone(),
            server_time: Timestamp::now(),
        })
    }

    async fn fetch_policy(
        &self,
        _: &AgentCredentials,
        etag: Option<&str>,
    ) -> Result<PolicyFetch, SyncError> {
        let state = self.state();
        if let Some(error) = state.bad_fetch {
            return Err(error());
        }
        let (envelope, _, current) = state.bundle.clone().unwrap();
        if etag == Some(current.as_str()) {
            return Ok(PolicyFetch::NotModified);
        }
        Ok(PolicyFetch::Bundle {
            envelope,
            etag: Some(current),
        })
    }

    async fn upload_audit(
        &self,
        _: &AgentCredentials,
        upload: &AuditUpload,
    ) -> Result<AuditAck, SyncError> {
        let mut state = self.state();
        state.oldest_kept = state.oldest_kept.max(upload.oldest_kept_seq);
        let mut stored = 0;
        let mut duplicates = 0;
        for record in &upload.records {
            let seq = serde_json::from_str::<serde_json::Value>(record.get()).unwrap()["seq"]
                .as_u64()
                .unwrap();
            if state.audit.insert(seq, record.get().to_owned()).is_some() {
                duplicates += 1;
            } else {
                stored += 1;
            }
        }
        state.duplicates += duplicates;
        if std::mem::take(&mut state.lose_next_reply) {
            return Err(lost("audit upload"));
        }
        Ok(AuditAck {
            acked_seq: Self::acked(&state),
            stored,
            duplicates,
        })
    }

    async fn submit_request(
        &self,
        _: &AgentCredentials,
        submit: &RequestSubmit,
    ) -> Result<RequestStatus, SyncError> {
        let mut state = self.state();
        state.submitted.push(submit.clone());
        Ok(RequestStatus {
            id: format!("p-{}", submit.local_id),
            local_id: submit.local_id.clone(),
            state: ApiRequestState::Pending,
            reason: None,
            current_level: 1,
            levels: 1,
            updated_at: Timestamp::now(),
            grant: None,
        })
    }

    /// Like the platform: answers once one of the pending ids is no longer
    /// pending or one of the grants no longer approved, or empty after
    /// `wait`.
    async fn wait_requests(
        &self,
        _: &AgentCredentials,
        watched: &Watched,
        wait: Duration,
    ) -> Result<RequestWaitResponse, SyncError> {
        let deadline = tokio::time::Instant::now() + wait;
        {
            let mut state = self.state();
            state.waits += 1;
            state.watched.push(watched.clone());
        }
        loop {
            {
                let state = self.state();
                if let Some(error) = state.bad_wait {
                    return Err(error());
                }
                if state.refuse_grant_waits && !watched.grants.is_empty() {
                    return Err(SyncError::Status {
                        step: "request wait",
                        url: "https://fake".into(),
                        status: 422,
                        code: Some("invalid_json".into()),
                        message: "unknown field `grants`".into(),
                    });
                }
                let changed: Vec<_> = state
                    .requests
                    .iter()
                    .filter(|r| {
                        (watched.pending.contains(&r.id) && r.state != ApiRequestState::Pending)
                            || (watched.grants.contains(&r.id)
                                && r.state != ApiRequestState::Approved)
                    })
                    .map(|r| epm_api::agent::RequestChange {
                        id: r.id.clone(),
                        state: r.state,
                    })
                    .collect();
                if !changed.is_empty() {
                    return Ok(RequestWaitResponse { changed });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(RequestWaitResponse::default());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Agent {
    dir: tempfile::TempDir,
    store: Arc<Mutex<Store>>,
    decider: Arc<Decider>,
    writer: Option<AuditWriter>,
    sink: AuditSink,
    key: PolicySigningKey,
    platform: FakePlatform,
}

impl Agent {
    fn new() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("epm.sqlite")).unwrap();
        let store = Arc::new(Mutex::new(store));
        let (log, _) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
        let decider = Arc::new(Decider::new(
            PolicyState {
                engine: Engine::empty(0, Action::Allow),
                generation: 1,
                source: "builtin".into(),
                loaded_at: Timestamp::now(),
            },
            Mode::Enforce,
            FailMode::Open,
            DEVICE.into(),
            64,
        ));
        let (writer, sink) = AuditWriter::start(
            store.clone(),
            log,
            Chain::genesis(),
            crate::exec::audit::AuditLimits {
                outbox_max_bytes: 1 << 20,
                ..Default::default()
            },
            Arc::new(AtomicU64::new(0)),
            DEVICE.into(),
        )
        .unwrap();
        Agent {
            dir,
            store,
            decider,
            writer: Some(writer),
            sink,
            key: PolicySigningKey::generate(),
            platform: FakePlatform::default(),
        }
    }

    fn cycle(&self) -> SyncCycle<FakePlatform> {
        self.cycle_with(None)
    }

    fn cycle_with(&self, current: Option<policy_source::BundleInForce>) -> SyncCycle<FakePlatform> {
        SyncCycle::new(
            self.platform.clone(),
            SyncContext {
                key: self.key.public_key().into(),
                device_id: DEVICE.into(),
                enrollment_token: Some("token".into()),
                credentials: Box::new(FileStore::new(self.dir.path().join("creds.json"))),
                store: self.store.clone(),
                decider: self.decider.clone(),
                audit: self.sink.clone(),
                audit_last_seq: Arc::new(AtomicU64::new(0)),
                status: Arc::default(),
                current,
                flows: None,
            },
        )
    }

    fn audit(&self, count: usize) {
        for i in 0..count {
            self.sink
                .send(AuditEvent::new(EventKind::ERROR).with_detail("n", i as u64));
        }
        assert!(self.sink.flush(Duration::from_secs(5)));
    }

    fn pending(&self) -> Vec<u64> {
        let store = self.store.lock().unwrap();
        store
            .pending_upload(10_000)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    fn audit_log(&self) -> String {
        assert!(self.sink.flush(Duration::from_secs(5)));
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap()
    }

    fn bundle(&self, key: &PolicySigningKey, version: u64) -> SignedEnvelope {
        let policy = format!(
            r#"{{"version": {version}, "default_action": "allow", "rules": [{{"id": "no-nc", "action": "deny", "match": {{"name": "nc"}}}}]}}"#
        );
        let bundle = PolicyBundle {
            format: BUNDLE_FORMAT,
            device_id: DEVICE.into(),
            version,
            issued_at: Timestamp::now(),
            sources: vec![],
            policy: serde_json::value::RawValue::from_string(policy).unwrap(),
        };
        key.sign(SignedKind::PolicyBundle, &bundle).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            writer.stop();
        }
    }
}

fn run(cycle: &mut SyncCycle<FakePlatform>) -> CycleResult {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(cycle.run_once())
}

#[test]
fn enrolls_once_and_marks_only_acknowledged_records_uploaded() {
    let agent = Agent::new();
    agent.audit(5);
    agent.platform.state().ack_cap = Some(3);
    let mut cycle = agent.cycle();
    // Seq 6 is the enrollment's own record, committed before the upload.
    let err = run(&mut cycle).unwrap_err();
    assert!(err.contains("acknowledged up to seq 3 of 1..=6"), "{err}");
    assert_eq!(agent.pending(), [4, 5, 6]);
    assert!(agent.dir.path().join("creds.json").exists());

    agent.platform.state().ack_cap = None;
    let summary = run(&mut cycle).unwrap();
    assert!(summary.starts_with("uploaded 3 audit records"), "{summary}");
    assert!(agent.pending().is_empty());
    // A new cycle (a restart) reads the saved credentials: no second enrollment.
    run(&mut agent.cycle()).unwrap();
    assert_eq!(agent.platform.state().enrolls, 1);
    assert_eq!(agent.platform.state().audit.len(), 6);
}

#[test]
fn a_reply_lost_mid_upload_only_causes_a_harmless_resend() {
    let agent = Agent::new();
    agent.audit(4);
    agent.platform.state().lose_next_reply = true;
    let mut cycle = agent.cycle();
    let err = run(&mut cycle).unwrap_err();
    assert!(
        err.contains("audit upload https://fake: transfer failed"),
        "{err}"
    );
    // The platform has them (and seq 5, the enrollment's record), but the
    // agent does not know: still pending.
    assert_eq!(agent.pending(), [1, 2, 3, 4, 5]);
    run(&mut cycle).unwrap();
    assert!(agent.pending().is_empty());
    let state = agent.platform.state();
    assert_eq!(state.duplicates, 5, "the re-sent batch was deduplicated");
    assert_eq!(
        state.audit.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
}

#[test]
fn not_enrolled_without_a_token_is_named() {
    let agent = Agent::new();
    let mut cycle = agent.cycle();
    cycle.context.enrollment_token = None;
    let err = run(&mut cycle).unwrap_err();
    assert!(err.starts_with("not enrolled: no credentials in"), "{err}");
    assert!(err.contains("platform.enrollment_token"), "{err}");
}

#[test]
fn a_new_bundle_is_enforced_stored_and_reverified_at_restart() {
    let agent = Agent::new();
    agent.platform.publish(agent.bundle(&agent.key, 2), 2);
    let generation = agent.decider.policy().generation;
    let summary = run(&mut agent.cycle()).unwrap();
    assert!(
        summary.ends_with("policy version 2 now in force"),
        "{summary}"
    );
    let policy = agent.decider.policy();
    assert_eq!(
        (policy.engine.version(), policy.source.as_str()),
        (2, "platform")
    );
    assert!(
        policy.generation > generation,
        "the decision cache must not serve old answers"
    );
    assert!(agent.audit_log().contains("\"policy_loaded\""));
    let stored = agent
        .store
        .lock()
        .unwrap()
        .active_policy()
        .unwrap()
        .unwrap();
    assert_eq!((stored.version, stored.source.as_str()), (2, "platform"));
    assert!(stored.envelope.is_some());

    // A restart enforces it again, after checking its signature.
    let (state, events, current) =
        policy_source::initial_signed(&agent.key.public_key().into(), DEVICE, &agent.store);
    assert_eq!(state.engine.version(), 2);
    assert_eq!(current.unwrap().0.version, 2);
    assert_eq!(events.len(), 1);
    // With another pinned key, it is refused and the built-in policy starts.
    let other = PolicySigningKey::generate();
    let (state, events, current) =
        policy_source::initial_signed(&other.public_key().into(), DEVICE, &agent.store);
    assert_eq!(
        (state.engine.version(), state.source.as_str()),
        (0, "builtin")
    );
    assert!(current.is_none());
    assert!(
        events[0].reason.as_deref().unwrap().contains("rejected"),
        "{:?}",
        events[0].reason
    );
}

#[test]
fn a_refused_bundle_leaves_the_last_good_policy_and_is_audited_once() {
    let agent = Agent::new();
    agent.platform.publish(agent.bundle(&agent.key, 2), 2);
    let mut cycle = agent.cycle();
    run(&mut cycle).unwrap();

    let other = PolicySigningKey::generate();
    agent.platform.publish(agent.bundle(&other, 3), 3);
    let err = run(&mut cycle).unwrap_err();
    assert!(
        err.contains("bundle refused, version 2 stays in force: bad signature: signed by"),
        "{err}"
    );
    assert_eq!(agent.decider.policy().engine.version(), 2);
    assert_eq!(
        agent
            .store
            .lock()
            .unwrap()
            .active_policy()
            .unwrap()
            .unwrap()
            .version,
        2
    );
    // The same bad bundle next cycle: still an error, not another record.
    let err = run(&mut cycle).unwrap_err();
    assert!(err.contains("still the one refused"), "{err}");
    let log = agent.audit_log();
    assert_eq!(log.matches("\"policy_rejected\"").count(), 1, "{log}");

    // A rollback to an older, correctly signed version is refused too.
    agent.platform.publish(agent.bundle(&agent.key, 1), 1);
    let err = run(&mut cycle).unwrap_err();
    assert!(err.contains("rollback refused"), "{err}");
    assert_eq!(agent.decider.policy().engine.version(), 2);

    // A good newer one is taken.
    agent.platform.publish(agent.bundle(&agent.key, 4), 4);
    run(&mut cycle).unwrap();
    assert_eq!(agent.decider.policy().engine.version(), 4);
}

#[test]
fn refused_answers_are_audited_once_while_they_last() {
    let agent = Agent::new();
    agent.platform.publish(agent.bundle(&agent.key, 2), 2);
    agent.platform.state().bad_fetch = Some(|| SyncError::TooLarge {
        step: "policy fetch",
        url: "https://fake/api/v1/agent/policy".into(),
        limit: 64,
    });
    let mut cycle = agent.cycle();
    for _ in 0..3 {
        let err = run(&mut cycle).unwrap_err();
        assert!(err.contains("exceeds the limit of 64 bytes"), "{err}");
    }
    assert_eq!(agent.decider.policy().engine.version(), 0);
    agent.platform.state().bad_checkin = Some(|| SyncError::ContentType {
        step: "check-in",
        url: "https://fake/api/v1/agent/checkin".into(),
        found: "text/html".into(),
    });
    run(&mut cycle).unwrap_err();
    run(&mut cycle).unwrap_err();
    let log = agent.audit_log();
    assert_eq!(log.matches("\"policy_rejected\"").count(), 1, "{log}");
    assert_eq!(log.matches("\"platform_error\"").count(), 1, "{log}");
    // An unreachable platform is only logged, not audited.
    agent.platform.state().bad_checkin = Some(|| SyncError::Connect {
        step: "check-in",
        url: "https://fake".into(),
        detail: "Connection refused".into(),
    });
    run(&mut cycle).unwrap_err();
    assert_eq!(agent.audit_log().matches("\"platform_error\"").count(), 1);
}

fn local_request(agent: &Agent, platform_id: Option<&str>) -> Request {
    let mut store = agent.store.lock().unwrap();
    let now = Timestamp::now();
    let request = Request {
        id: store.new_request_id().unwrap(),
        uid: 1000,
        user: "alice".into(),
        rule_id: "wireshark".into(),
        identity: SubjectIdentity {
            kind: IdentityKind::Sha256,
            value: "ab".repeat(32),
        },
        path: "/usr/bin/wireshark".into(),
        justification: "capture".into(),
        window_start: now,
        window_end: now + jiff::SignedDuration::from_hours(1),
        state: RequestState::Pending,
        state_reason: None,
        platform_id: None,
        created_at: now,
        updated_at: now,
    };
    store.insert_request(&request).unwrap();
    if let Some(id) = platform_id {
        store.set_request_platform_id(&request.id, id, now).unwrap();
    }
    request
}

#[test]
fn queued_requests_are_submitted_and_approved_grants_stored_then_revoked() {
    let agent = Agent::new();
    let request = local_request(&agent, None);
    let mut cycle = agent.cycle();
    run(&mut cycle).unwrap();
    let platform_id = format!("p-{}", request.id);
    assert_eq!(agent.platform.state().submitted.len(), 1);
    let stored = agent
        .store
        .lock()
        .unwrap()
        .request(&request.id)
        .unwrap()
        .unwrap();
    assert_eq!(stored.platform_id.as_deref(), Some(platform_id.as_str()));

    let now = Timestamp::now();
    let grant = Grant {
        request_id: platform_id.clone(),
        device_id: DEVICE.into(),
        user: "alice".into(),
        identity: ApiIdentity {
            kind: "sha256".into(),
            value: "ab".repeat(32),
        },
        rule_id: "wireshark".into(),
        not_before: now,
        not_after: now + jiff::SignedDuration::from_hours(1),
        uses: 1,
        issued_at: now,
    };
    let status = |state, grant: Option<SignedEnvelope>| RequestStatus {
        id: platform_id.clone(),
        local_id: request.id.clone(),
        state,
        reason: Some("because".into()),
        current_level: 0,
        levels: 1,
        updated_at: now,
        grant,
    };
    // A grant signed by another key is refused; nothing is stored.
    let forged = PolicySigningKey::generate()
        .sign(SignedKind::Grant, &grant)
        .unwrap();
    agent.platform.state().requests = vec![status(ApiRequestState::Approved, Some(forged))];
    let err = run(&mut cycle).unwrap_err();
    assert!(err.contains("bad grant signature"), "{err}");
    assert!(
        agent
            .store
            .lock()
            .unwrap()
            .grants_for(1000, now)
            .unwrap()
            .is_empty()
    );

    let signed = agent.key.sign(SignedKind::Grant, &grant).unwrap();
    agent.platform.state().requests = vec![status(ApiRequestState::Approved, Some(signed))];
    run(&mut cycle).unwrap();
    run(&mut cycle).unwrap();
    let grants = agent.store.lock().unwrap().grants_for(1000, now).unwrap();
    assert_eq!(grants.len(), 1, "delivered twice, stored once");
    let state = agent
        .store
        .lock()
        .unwrap()
        .request(&request.id)
        .unwrap()
        .unwrap()
        .state;
    assert_eq!(state, RequestState::Approved);

    agent.platform.state().requests = vec![status(ApiRequestState::Revoked, None)];
    run(&mut cycle).unwrap();
    assert!(
        agent
            .store
            .lock()
            .unwrap()
            .grants_for(1000, now)
            .unwrap()
            .is_empty()
    );
    let stored = agent
        .store
        .lock()
        .unwrap()
        .request(&request.id)
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.state, stored.state_reason.as_deref()),
        (RequestState::Revoked, Some("because"))
    );
}

/// Polls `check` every 20 ms for up to `within`.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

fn local_state(agent: &Agent, id: &str) -> RequestState {
    agent
        .store
        .lock()
        .unwrap()
        .request(id)
        .unwrap()
        .unwrap()
        .state
}

#[test]
fn a_decision_reaches_the_agent_at_once_despite_a_long_interval() {
    let agent = Agent::new();
    let request = local_request(&agent, Some("p-1"));
    let handle = spawn(
        agent.cycle(),
        "https://fake".into(),
        Duration::from_secs(300),
        sync_channel(),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        let state = agent.platform.state();
        state.checkins == 1 && state.waits == 1
    }));
    // Denied on the platform: the open wait answers, a cycle runs at once
    // (not in 300 s) and applies it.
    let decided = std::time::Instant::now();
    agent.platform.state().requests = vec![RequestStatus {
        id: "p-1".into(),
        local_id: request.id.clone(),
        state: ApiRequestState::Denied,
        reason: Some("no".into()),
        current_level: 0,
        levels: 1,
        updated_at: Timestamp::now(),
        grant: None,
    }];
    assert!(
        eventually(Duration::from_secs(10), || local_state(&agent, &request.id)
            == RequestState::Denied),
        "the decision was applied before the next check-in"
    );
    assert!(decided.elapsed() < Duration::from_secs(10));
    assert_eq!(agent.platform.state().checkins, 2);
    // Nothing pending any more: no further wait is opened.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.platform.state().waits, 1);
    drop(handle);
}

#[test]
fn no_wait_without_pending_requests_and_failed_waits_back_off() {
    let agent = Agent::new();
    let handle = spawn(
        agent.cycle(),
        "https://fake".into(),
        Duration::from_secs(300),
        sync_channel(),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || agent
        .platform
        .state()
        .checkins
        == 1));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(agent.platform.state().waits, 0, "nothing pending: no wait");

    // A pending request and a platform whose waits fail: one try, then a
    // back-off of seconds, not a loop.
    local_request(&agent, Some("p-2"));
    agent.platform.state().bad_wait = Some(|| lost("request wait"));
    assert!(matches!(
        handle.sync_now(Duration::from_secs(10)),
        SyncNowReply::Done(Ok(_))
    ));
    assert!(eventually(Duration::from_secs(5), || agent
        .platform
        .state()
        .waits
        == 1));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        agent.platform.state().waits,
        1,
        "backed off after a failure"
    );
    drop(handle);
}

/// The platform's status of `request` (platform id `p-1`) in `state`,
/// with a grant signed by `agent`'s key when approved.
fn status_of(agent: &Agent, request: &Request, state: ApiRequestState) -> RequestStatus {
    let now = Timestamp::now();
    let grant = (state == ApiRequestState::Approved).then(|| {
        let grant = Grant {
            request_id: "p-1".into(),
            device_id: DEVICE.into(),
            user: "alice".into(),
            identity: ApiIdentity {
                kind: "sha256".into(),
                value: "ab".repeat(32),
            },
            rule_id: "wireshark".into(),
            not_before: now,
            not_after: now + jiff::SignedDuration::from_hours(1),
            uses: 5,
            issued_at: now,
        };
        agent.key.sign(SignedKind::Grant, &grant).unwrap()
    });
    RequestStatus {
        id: "p-1".into(),
        local_id: request.id.clone(),
        state,
        reason: (state == ApiRequestState::Revoked).then(|| "withdrawn".into()),
        current_level: 0,
        levels: 1,
        updated_at: now,
        grant,
    }
}

fn grants_held(agent: &Agent) -> usize {
    agent
        .store
        .lock()
        .unwrap()
        .grants_for(1000, Timestamp::now())
        .unwrap()
        .len()
}

#[test]
fn a_revocation_ends_a_grant_in_force_at_once_despite_a_long_interval() {
    let agent = Agent::new();
    let request = local_request(&agent, Some("p-1"));
    agent.platform.state().requests = vec![status_of(&agent, &request, ApiRequestState::Approved)];
    let handle = spawn(
        agent.cycle(),
        "https://fake".into(),
        Duration::from_secs(300),
        sync_channel(),
    )
    .unwrap();
    // The first cycle stores the grant; the wait that follows names it as
    // a grant in force, no longer as pending.
    assert!(eventually(Duration::from_secs(10), || {
        agent.platform.state().watched.last()
            == Some(&Watched {
                pending: vec![],
                grants: vec!["p-1".into()],
            })
    }));
    assert_eq!(grants_held(&agent), 1);
    assert_eq!(local_state(&agent, &request.id), RequestState::Approved);

    // Revoked on the platform: the open wait answers, a cycle runs at once
    // (not in 300 s) and the grant is gone.
    let revoked = std::time::Instant::now();
    agent.platform.state().requests = vec![status_of(&agent, &request, ApiRequestState::Revoked)];
    assert!(
        eventually(Duration::from_secs(10), || grants_held(&agent) == 0),
        "the revocation ended the grant before the next check-in"
    );
    assert!(revoked.elapsed() < Duration::from_secs(10));
    // The grant ends on the wait's answer; the check-in that records why
    // comes right after it.
    assert!(
        eventually(Duration::from_secs(10), || {
            local_state(&agent, &request.id) == RequestState::Revoked
        }),
        "the check-in after the wait records the revocation"
    );
    assert_eq!(agent.platform.state().checkins, 2);
    // Nothing in force or pending any more: no further wait.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(agent.platform.state().waits, 1);
    drop(handle);
}

#[test]
fn a_revoked_grant_ends_on_the_wait_word_even_when_the_check_in_fails() {
    let agent = Agent::new();
    let request = local_request(&agent, Some("p-1"));
    agent.platform.state().requests = vec![status_of(&agent, &request, ApiRequestState::Approved)];
    let handle = spawn(
        agent.cycle(),
        "https://fake".into(),
        Duration::from_secs(300),
        sync_channel(),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        agent
            .platform
            .state()
            .watched
            .last()
            .is_some_and(|w| !w.grants.is_empty())
    }));
    assert_eq!(grants_held(&agent), 1);
    // The device is reset on the platform: its requests are revoked and
    // its credentials void, so the check-in the wait's answer causes is
    // refused. The grant ends all the same; the request keeps its state
    // until a check-in can say why.
    {
        let mut state = agent.platform.state();
        state.bad_checkin = Some(|| SyncError::Status {
            step: "check-in",
            url: "https://fake".into(),
            status: 401,
            code: Some("unauthorized".into()),
            message: "unknown agent".into(),
        });
        state.requests = vec![status_of(&agent, &request, ApiRequestState::Revoked)];
    }
    assert!(
        eventually(Duration::from_secs(10), || grants_held(&agent) == 0),
        "the wait's answer alone ended the grant"
    );
    assert_eq!(local_state(&agent, &request.id), RequestState::Approved);
    drop(handle);
}

#[test]
fn a_wait_names_grants_first_within_the_cap_and_falls_back_without_them() {
    let mut waits = RequestWaits::default();
    let ids = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    };
    // More than the platform takes: every grant is named before any
    // pending request, so a user's own requests cannot crowd out a
    // revocation.
    let watched = waits.watch(Watched {
        pending: ids("p", MAX_WAIT_REQUESTS),
        grants: ids("g", 30),
    });
    assert_eq!(watched.grants.len(), 30);
    assert_eq!(watched.pending.len(), MAX_WAIT_REQUESTS - 30);
    let watched = waits.watch(Watched {
        pending: ids("p", 5),
        grants: ids("g", MAX_WAIT_REQUESTS + 5),
    });
    assert_eq!(watched.grants.len(), MAX_WAIT_REQUESTS);
    assert!(watched.pending.is_empty());

    // A request reported decided but still pending here is not waited on
    // as pending; once approved here it is waited on as a grant.
    let named = Watched {
        pending: vec!["r".into()],
        grants: vec![],
    };
    waits.mark_stale(
        &named,
        vec![epm_api::agent::RequestChange {
            id: "r".into(),
            state: ApiRequestState::Approved,
        }],
    );
    assert!(waits.watch(named.clone()).is_empty());
    let approved = Watched {
        pending: vec![],
        grants: vec!["r".into()],
    };
    assert_eq!(waits.watch(approved.clone()), approved);

    // A platform that refuses grant waits (older than them): pending
    // requests are still waited on, grants no longer.
    let refused = Err(SyncError::Status {
        step: "request wait",
        url: "https://fake".into(),
        status: 422,
        code: Some("invalid_json".into()),
        message: "unknown field `grants`".into(),
    });
    let both = Watched {
        pending: vec!["x".into()],
        grants: vec!["y".into()],
    };
    let now = tokio::time::Instant::now();
    assert!(
        waits
            .ended(now, &both, refused, Duration::from_secs(300))
            .is_none()
    );
    assert!(waits.grants_unsupported && !waits.unsupported);
    assert_eq!(waits.failures, 0, "not a failure to back off from");
    assert_eq!(
        waits.watch(both),
        Watched {
            pending: vec!["x".into()],
            grants: vec![],
        }
    );
}

#[test]
fn a_platform_without_grant_waits_still_gets_waits_on_pending_requests() {
    let agent = Agent::new();
    let granted = local_request(&agent, Some("p-1"));
    agent.platform.state().requests = vec![status_of(&agent, &granted, ApiRequestState::Approved)];
    agent.platform.state().refuse_grant_waits = true;
    let handle = spawn(
        agent.cycle(),
        "https://fake".into(),
        Duration::from_secs(300),
        sync_channel(),
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        agent.platform.state().checkins == 1 && agent.platform.state().waits == 1
    }));
    // A pending request: its wait goes out without the grant, after the
    // usual spacing, not after a back-off.
    local_request(&agent, Some("p-2"));
    assert!(matches!(
        handle.sync_now(Duration::from_secs(10)),
        SyncNowReply::Done(Ok(_))
    ));
    assert!(eventually(Duration::from_secs(5), || {
        agent.platform.state().watched.last()
            == Some(&Watched {
                pending: vec!["p-2".into()],
                grants: vec![],
            })
    }));
    drop(handle);
}

#[test]
fn local_users_are_listed_without_system_accounts() {
    for user in local_users() {
        let account = nix::unistd::User::from_name(&user.name).unwrap().unwrap();
        assert!(account.uid.as_raw() >= 500, "{}", user.name);
    }
}
