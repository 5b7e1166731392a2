//! Talking to the management platform: one thread with its own
//! current-thread tokio runtime runs a sync cycle every `sync_interval`
//! (and when `epmctl sync` asks). The gate and the decision workers never
//! wait on it: a new policy reaches them by the same atomic swap as a
//! SIGHUP reload, and the audit reaches the platform from the store's
//! outbox, not from the hot path.
//!
//! One cycle: enroll if needed; upload the audit backlog in batches,
//! marking records uploaded only up to the seq the platform acknowledges
//! (a crash mid-upload only re-sends, which the platform deduplicates);
//! submit queued approval requests; check in; apply request updates (signed
//! grants); fetch and apply a changed policy bundle, verified against the
//! pinned key before anything is stored.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use epm_api::agent::{
    AgentCredentials, AuditAck, AuditUpload, CheckinRequest, CheckinResponse, EnrollRequest,
    LocalUser, MAX_WAIT_REQUESTS, PolicyState as PlatformPolicy, RequestChange,
    RequestState as ApiRequestState, RequestStatus, RequestSubject, RequestSubmit,
    RequestWaitResponse, Window,
};
use epm_api::sign::PolicyKeys;
use epm_api::{MAX_AUDIT_UPLOAD_BYTES, SignedEnvelope};
use epm_store::{GrantSource, NewGrant, RequestState, Store, StoredPolicy};
use epm_sync::credentials::CredentialStore;
use epm_sync::{CurrentBundle, PlatformClient, PolicyFetch, SyncError};
use jiff::Timestamp;

use crate::exec::audit::AuditSink;
use crate::exec::decider::Decider;
use crate::exec::stats::Counters;
use crate::managed::policy_source;

/// The audit event of a grant ended on a request wait's answer.
const GRANT_WITHDRAWN: &str = "grant_withdrawn";

/// Most audit records in one upload.
const MAX_BATCH_RECORDS: usize = 500;
/// Room for the upload's JSON around its records.
const UPLOAD_OVERHEAD: usize = 1024;
/// How long `epmctl sync` waits for its cycle before saying it still runs.
pub(crate) const SYNC_REPLY_WAIT: Duration = Duration::from_secs(60);
/// How long one request wait is held: under the platform's 60 s cap and
/// the 60 s idle timeout many load balancers and proxies have.
const REQUEST_WAIT: Duration = Duration::from_secs(50);
/// Request waits start at most this often, whatever the platform answers,
/// so a platform that answers at once (or a request that stays pending
/// here while decided there) cannot make the agent loop.
const REQUEST_WAIT_SPACING: Duration = Duration::from_secs(2);

/// The platform calls a cycle makes: [`PlatformClient`] in the daemon, an
/// in-memory platform in tests.
// Used with concrete types on a current-thread runtime only, so the
// futures need no `Send` bound.
#[allow(async_fn_in_trait)]
pub(crate) trait Platform {
    /// See [`PlatformClient::enroll`].
    async fn enroll(&self, request: &EnrollRequest) -> Result<AgentCredentials, SyncError>;
    /// See [`PlatformClient::checkin`].
    async fn checkin(
        &self,
        credentials: &AgentCredentials,
        request: &CheckinRequest,
    ) -> Result<CheckinResponse, SyncError>;
    /// See [`PlatformClient::fetch_policy`].
    async fn fetch_policy(
        &self,
        credentials: &AgentCredentials,
        etag: Option<&str>,
    ) -> Result<PolicyFetch, SyncError>;
    /// See [`PlatformClient::upload_audit`].
    async fn upload_audit(
        &self,
        credentials: &AgentCredentials,
        upload: &AuditUpload,
    ) -> Result<AuditAck, SyncError>;
    /// See [`PlatformClient::submit_request`].
    async fn submit_request(
        &self,
        credentials: &AgentCredentials,
        submit: &RequestSubmit,
    ) -> Result<RequestStatus, SyncError>;
    /// See [`PlatformClient::wait_requests`].
    async fn wait_requests(
        &self,
        credentials: &AgentCredentials,
        watched: &Watched,
        wait: Duration,
    ) -> Result<RequestWaitResponse, SyncError>;
}

/// What a request wait names: the platform ids of the requests pending
/// here, and of the approved ones whose grant is in force here (a
/// revocation must end it within seconds, not at the next check-in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Watched {
    /// Answered when one leaves pending.
    pub pending: Vec<String>,
    /// Answered when one leaves approved.
    pub grants: Vec<String>,
}

impl Watched {
    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.grants.is_empty()
    }
}

impl Platform for PlatformClient {
    async fn enroll(&self, request: &EnrollRequest) -> Result<AgentCredentials, SyncError> {
        PlatformClient::enroll(self, request).await
    }
    async fn checkin(
        &self,
        credentials: &AgentCredentials,
        request: &CheckinRequest,
    ) -> Result<CheckinResponse, SyncError> {
        PlatformClient::checkin(self, credentials, request).await
    }
    async fn fetch_policy(
        &self,
        credentials: &AgentCredentials,
        etag: Option<&str>,
    ) -> Result<PolicyFetch, SyncError> {
        PlatformClient::fetch_policy(self, credentials, etag).await
    }
    async fn upload_audit(
        &self,
        credentials: &AgentCredentials,
        upload: &AuditUpload,
    ) -> Result<AuditAck, SyncError> {
        PlatformClient::upload_audit(self, credentials, upload).await
    }
    async fn submit_request(
        &self,
        credentials: &AgentCredentials,
        submit: &RequestSubmit,
    ) -> Result<RequestStatus, SyncError> {
        PlatformClient::submit_request(self, credentials, submit).await
    }
    async fn wait_requests(
        &self,
        credentials: &AgentCredentials,
        watched: &Watched,
        wait: Duration,
    ) -> Result<RequestWaitResponse, SyncError> {
        PlatformClient::wait_requests(self, credentials, &watched.pending, &watched.grants, wait)
            .await
    }
}

/// What `epmctl status` shows about the platform.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncStatus {
    /// The enrolled agent id.
    pub agent_id: Option<String>,
    /// When the last cycle ended.
    pub last_sync_at: Option<Timestamp>,
    /// Its outcome: a summary, or what failed.
    pub last_result: Option<Result<String, String>>,
    /// When the next cycle is due.
    pub next_sync_at: Option<Timestamp>,
    /// The platform's acknowledged audit seq.
    pub acked_seq: u64,
}

/// Everything a cycle needs from the daemon.
#[derive(Debug)]
pub(crate) struct SyncContext {
    /// The pinned keys (two during a rotation) bundles and grants must be
    /// signed with.
    pub key: PolicyKeys,
    /// This device.
    pub device_id: String,
    /// One-time token, used when not yet enrolled.
    pub enrollment_token: Option<String>,
    /// Where the credentials are kept.
    pub credentials: Box<dyn CredentialStore>,
    /// The store (outbox, policy, requests, grants).
    pub store: Arc<Mutex<Store>>,
    /// The decision core, whose policy a new bundle replaces.
    pub decider: Arc<Decider>,
    /// Audit of policy changes and refusals.
    pub audit: AuditSink,
    /// The newest audit seq written.
    pub audit_last_seq: Arc<AtomicU64>,
    /// Shared with the control socket.
    pub status: Arc<Mutex<SyncStatus>>,
    /// The platform bundle in force at start and its ETag
    /// ([`policy_source::initial_signed`]).
    pub current: Option<policy_source::BundleInForce>,
    /// Told of request changes (the user's helper shows them) and of the
    /// platform's time (`None` in tests without them).
    pub flows: Option<Arc<crate::grants::flows::Flows>>,
}

/// A bundle the agent refused, remembered so the same one is not fetched,
/// refused and audited again every cycle.
#[derive(Debug)]
struct Refused {
    etag: String,
    reason: String,
}

/// One sync cycle's logic over a [`Platform`].
#[derive(Debug)]
pub(crate) struct SyncCycle<P> {
    platform: P,
    context: SyncContext,
    credentials: Option<AgentCredentials>,
    current: Option<CurrentBundle>,
    etag: Option<String>,
    refused: Option<Refused>,
    /// The last refused answer audited ([`SyncCycle::failed`]).
    last_audited: Option<String>,
}

/// A failed step and why, for the log, the status and `epmctl sync`.
type CycleResult = Result<String, String>;

impl<P: Platform> SyncCycle<P> {
    /// A cycle over `platform`.
    pub(crate) fn new(platform: P, mut context: SyncContext) -> Self {
        let (current, etag) = match context.current.take() {
            Some((current, etag)) => (Some(current), etag),
            None => (None, None),
        };
        Self {
            platform,
            context,
            credentials: None,
            current,
            etag,
            refused: None,
            last_audited: None,
        }
    }

    /// Runs one cycle: `Ok` with a summary, or `Err` naming the step that
    /// failed. Later steps still run when an earlier one failed for a
    /// reason of its own (a refused upload must not stop policy updates);
    /// an unreachable platform ends the cycle at once.
    pub(crate) async fn run_once(&mut self) -> CycleResult {
        let credentials = self.ensure_enrolled().await?;
        let mut problems = Vec::new();
        let uploaded = match self.upload_backlog(&credentials).await {
            Ok(count) => count,
            Err(e) if unreachable(&e) => return Err(e.to_string()),
            Err(e) => {
                problems.push(e.to_string());
                0
            }
        };
        if let Err(e) = self.submit_queued(&credentials).await {
            if unreachable(&e) {
                return Err(e.to_string());
            }
            problems.push(e.to_string());
        }
        let response = self
            .platform
            .checkin(&credentials, &self.checkin_request())
            .await
            .map_err(|e| self.failed(e, false).to_string())?;
        self.set_acked(response.audit_acked_seq);
        if let Some(flows) = &self.context.flows {
            flows.observe_platform_time(response.server_time);
        }
        for status in &response.requests {
            if let Err(problem) = self.apply_request_status(status) {
                tracing::warn!(request = %status.id, %problem, "request update not applied");
                problems.push(problem);
            }
        }
        let policy = match self.sync_policy(&credentials, &response.policy).await {
            Ok(summary) => summary,
            Err(problem) => {
                problems.push(problem);
                String::new()
            }
        };
        if problems.is_empty() {
            self.last_audited = None;
            Ok(format!("uploaded {uploaded} audit records; {policy}"))
        } else {
            Err(problems.join("; "))
        }
    }

    async fn ensure_enrolled(&mut self) -> Result<AgentCredentials, String> {
        if let Some(credentials) = &self.credentials {
            return Ok(credentials.clone());
        }
        let stored = self.context.credentials.load().map_err(|e| e.to_string())?;
        let credentials = match stored {
            Some(credentials) => credentials,
            None => {
                let Some(token) = self.context.enrollment_token.clone() else {
                    return Err(format!(
                        "not enrolled: no credentials in {} and no platform.enrollment_token in the configuration",
                        self.context.credentials.location()
                    ));
                };
                let request = EnrollRequest {
                    enrollment_token: token,
                    device_id: self.context.device_id.clone(),
                    hostname: hostname(),
                    os: os_name(),
                    agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                };
                let credentials = self
                    .platform
                    .enroll(&request)
                    .await
                    .map_err(|e| self.failed(e, false).to_string())?;
                // The token is spent: keep the credentials in memory even
                // if they cannot be saved, and say loudly that they were not.
                if let Err(error) = self.context.credentials.save(&credentials) {
                    tracing::error!(%error, "enrolled, but the credentials cannot be saved: the next start needs a new enrollment token");
                }
                tracing::info!(agent_id = %credentials.agent_id, "enrolled with the platform");
                let mut event = epm_audit::AuditEvent::new("agent_enrolled")
                    .with_detail("agent_id", credentials.agent_id.clone());
                event.reason = Some(format!(
                    "enrolled with the platform as agent {}",
                    credentials.agent_id
                ));
                self.context.audit.send(event);
                // Committed before this cycle's upload reads the outbox, so
                // the platform hears of the enrollment in the same cycle.
                if !self.context.audit.flush(Duration::from_secs(5)) {
                    tracing::warn!(
                        "the enrollment record is not committed yet; it goes with the next upload"
                    );
                }
                credentials
            }
        };
        self.lock_status().agent_id = Some(credentials.agent_id.clone());
        self.credentials = Some(credentials.clone());
        Ok(credentials)
    }

    /// Uploads every record not yet uploaded, oldest first, in batches;
    /// returns how many the platform acknowledged.
    async fn upload_backlog(&mut self, credentials: &AgentCredentials) -> Result<u64, CycleError> {
        let mut acknowledged = 0;
        loop {
            let (pending, oldest) = {
                let store = self.lock_store()?;
                let pending = store
                    .pending_upload(MAX_BATCH_RECORDS)
                    .map_err(|e| CycleError::Local(format!("audit upload: {e}")))?;
                let oldest = store
                    .oldest_audit_seq()
                    .map_err(|e| CycleError::Local(format!("audit upload: {e}")))?;
                (pending, oldest)
            };
            let Some(first) = pending.first().map(|r| r.seq) else {
                return Ok(acknowledged);
            };
            let mut bytes = UPLOAD_OVERHEAD;
            let mut records = Vec::with_capacity(pending.len());
            let mut last = first;
            for record in pending {
                // A record alone over the limit still goes alone: the
                // platform's refusal then names the problem.
                if !records.is_empty() && bytes + record.line.len() + 1 > MAX_AUDIT_UPLOAD_BYTES {
                    break;
                }
                bytes += record.line.len() + 1;
                last = record.seq;
                let raw = serde_json::value::RawValue::from_string(record.line).map_err(|e| {
                    CycleError::Local(format!(
                        "audit upload: outbox record {} is not JSON: {e}",
                        record.seq
                    ))
                })?;
                records.push(raw);
            }
            let upload = AuditUpload {
                oldest_kept_seq: oldest.unwrap_or(first),
                records,
            };
            let ack = self
                .platform
                .upload_audit(credentials, &upload)
                .await
                .map_err(|e| CycleError::Platform(self.failed(e, false)))?;
            // Only what the platform holds is marked: the rest is sent
            // again, and the platform drops the duplicates.
            let marked = ack.acked_seq.min(last);
            if marked >= first {
                self.lock_store()?
                    .mark_uploaded(marked)
                    .map_err(|e| CycleError::Local(format!("audit upload: {e}")))?;
                acknowledged += marked - first + 1;
            }
            self.set_acked(ack.acked_seq);
            if ack.acked_seq < last {
                return Err(CycleError::Local(format!(
                    "audit upload: the platform acknowledged up to seq {} of {first}..={last}; the rest is sent again next cycle",
                    ack.acked_seq
                )));
            }
        }
    }

    /// Submits requests made while offline (no platform id yet).
    async fn submit_queued(&mut self, credentials: &AgentCredentials) -> Result<(), CycleError> {
        let queued: Vec<epm_store::Request> = self
            .lock_store()?
            .requests(None, Some(RequestState::Pending))
            .map_err(|e| CycleError::Local(format!("request submit: {e}")))?
            .into_iter()
            .filter(|r| r.platform_id.is_none())
            .collect();
        let policy_version = self.current.map_or(0, |c| c.version);
        for request in queued {
            let submit = RequestSubmit {
                local_id: request.id.clone(),
                rule_id: request.rule_id.clone(),
                policy_version,
                user: request.user.clone(),
                subject: RequestSubject {
                    identity: epm_api::SubjectIdentity {
                        kind: request.identity.kind.as_str().to_owned(),
                        value: request.identity.value.clone(),
                    },
                    path: request.path.clone(),
                    team_id: None,
                    signing_id: None,
                },
                justification: request.justification.clone(),
                window: Window {
                    start: request.window_start,
                    end: request.window_end,
                },
            };
            let status = self
                .platform
                .submit_request(credentials, &submit)
                .await
                .map_err(|e| CycleError::Platform(self.failed(e, false)))?;
            self.lock_store()?
                .set_request_platform_id(&request.id, &status.id, Timestamp::now())
                .map_err(|e| CycleError::Local(format!("request submit: {e}")))?;
            if let Err(problem) = self.apply_request_status(&status) {
                tracing::warn!(request = %status.id, %problem, "request update not applied");
            }
        }
        Ok(())
    }

    /// The credentials and the platform ids of the requests still pending
    /// here and of the grants in force here, for a request wait; `None`
    /// when not enrolled or there are neither.
    ///
    /// A request stays approved here while its grant is in force: its last
    /// use makes it used, the window's end (by the trusted clock, in the
    /// flows' sweep) expired, and a revocation learnt at a check-in
    /// revoked, each ending the grant in the same transaction. (A grant
    /// ended on a wait's word alone, [`Self::end_withdrawn_grants`], keeps
    /// its request approved until a check-in says why; a wait naming it
    /// then costs nothing.)
    fn watched_on_platform(&self) -> Option<(AgentCredentials, Watched)> {
        let credentials = self.credentials.clone()?;
        let store = self.context.store.lock().ok()?;
        let ids = |state| -> Option<Vec<String>> {
            Some(
                store
                    .requests(None, Some(state))
                    .ok()?
                    .into_iter()
                    .filter_map(|r| r.platform_id)
                    .collect(),
            )
        };
        let watched = Watched {
            pending: ids(RequestState::Pending)?,
            grants: ids(RequestState::Approved)?,
        };
        (!watched.is_empty()).then_some((credentials, watched))
    }

    /// Ends at once the grants of the requests a wait named as grants in
    /// force and reported no longer approved (revoked, expired, the device
    /// reset), before the check-in that records the state and the reason;
    /// returns how many grants ended.
    ///
    /// The wait's answer is not signed, but it comes over the connection
    /// pinned to the platform's CA and authenticated as this agent, and
    /// it can only take rights away. Acting on it does not wait for the
    /// check-in, and still works when the check-in cannot: a device reset
    /// on the platform voids its credentials, so it would never hear why.
    fn end_withdrawn_grants(&self, watched: &Watched, changes: &[RequestChange]) -> usize {
        let withdrawn: Vec<&str> = changes
            .iter()
            .filter(|c| watched.grants.contains(&c.id))
            .filter(|c| {
                !matches!(
                    c.state,
                    ApiRequestState::Approved | ApiRequestState::Pending
                )
            })
            .map(|c| c.id.as_str())
            .collect();
        if withdrawn.is_empty() {
            return 0;
        }
        let Ok(mut store) = self.context.store.lock() else {
            tracing::warn!("store lock poisoned; revoked grants end at the check-in");
            return 0;
        };
        let approved = match store.requests(None, Some(RequestState::Approved)) {
            Ok(approved) => approved,
            Err(error) => {
                tracing::warn!(%error, "cannot read requests; revoked grants end at the check-in");
                return 0;
            }
        };
        let mut ended = 0;
        for request in approved.iter().filter(|r| {
            r.platform_id
                .as_deref()
                .is_some_and(|id| withdrawn.contains(&id))
        }) {
            // Every grant of the request, whatever its window says by the
            // wall clock: the exec path judges windows by the trusted clock.
            let grants = match store.grants_for_identity(request.uid, &request.identity, 1000) {
                Ok(grants) => grants,
                Err(error) => {
                    tracing::warn!(%error, request = %request.id, "cannot read grants; this one ends at the check-in");
                    continue;
                }
            };
            for grant in grants
                .iter()
                .filter(|g| g.grant.request_id.as_deref() == Some(request.id.as_str()))
            {
                match store.end_grant(grant.id) {
                    Ok(true) => {
                        ended += 1;
                        tracing::info!(request = %request.id, grant = grant.id, "grant withdrawn on the platform: ended now");
                        // Audited here: after a device reset no check-in
                        // comes to record why.
                        let platform_state = changes
                            .iter()
                            .find(|c| Some(c.id.as_str()) == request.platform_id.as_deref())
                            .map_or("withdrawn", |c| c.state.as_str());
                        let mut event = epm_audit::AuditEvent::new(GRANT_WITHDRAWN)
                            .with_reason(format!(
                                "the platform reports the request {platform_state}: its grant ended at once"
                            ))
                            .with_detail("request_id", request.id.as_str())
                            .with_detail("grant_id", grant.id)
                            .with_detail("platform_state", platform_state);
                        event.uid = Some(request.uid);
                        event.user = Some(request.user.clone());
                        event.path = Some(request.path.clone());
                        event.rule_id = Some(request.rule_id.clone());
                        self.context.audit.send(event);
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%error, grant = grant.id, "cannot end a withdrawn grant; it ends at the check-in");
                    }
                }
            }
        }
        ended
    }

    fn checkin_request(&self) -> CheckinRequest {
        // Used approvals are reported for a week: the platform marks them
        // idempotently, and a week outlasts any window and any outage
        // worth waiting for.
        let used_since = Timestamp::now() - jiff::SignedDuration::from_hours(24 * 7);
        let (pending, requests, used) = match self.context.store.lock() {
            Ok(store) => (
                store.outbox_stats().map_or(0, |s| s.pending),
                [RequestState::Pending, RequestState::Approved]
                    .into_iter()
                    .flat_map(|state| store.requests(None, Some(state)).unwrap_or_default())
                    .filter_map(|r| r.platform_id)
                    .collect(),
                store
                    .requests(None, Some(RequestState::Used))
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r.updated_at > used_since)
                    .filter_map(|r| r.platform_id)
                    .take(1000)
                    .collect(),
            ),
            Err(_) => (0, Vec::new(), Vec::new()),
        };
        let c = &self.context.decider.counters;
        let counters: BTreeMap<String, u64> = [
            ("execs_seen", &c.execs_seen),
            ("allowed", &c.allowed),
            ("denied", &c.denied),
            ("would_deny", &c.would_deny),
            ("fail_mode_answers", &c.fail_mode_answers),
            ("overflow", &c.overflow),
            ("over_share", &c.over_share),
            ("hash_budget", &c.hash_budget),
            ("unstable_content", &c.unstable_content),
            ("worker_panics", &c.worker_panics),
        ]
        .into_iter()
        .map(|(name, counter)| (name.to_owned(), Counters::get(counter)))
        .chain([("audit_dropped".to_owned(), self.context.audit.dropped())])
        .collect();
        CheckinRequest {
            policy_version: self.current.map(|c| c.version),
            audit_last_seq: self.context.audit_last_seq.load(Ordering::Relaxed),
            outbox_pending: pending,
            counters,
            users: local_users(),
            pending_requests: requests,
            used_requests: used,
        }
    }

    /// Fetches and applies the bundle when the check-in says it changed.
    async fn sync_policy(
        &mut self,
        credentials: &AgentCredentials,
        state: &PlatformPolicy,
    ) -> Result<String, String> {
        let in_force = self.current.map(|c| c.version);
        if state.version == 0 {
            // No policy targets this device: keep what is enforced.
            return Ok("no policy assigned on the platform".into());
        }
        if !state.changed && in_force == Some(state.version) {
            return Ok(format!("policy version {} unchanged", state.version));
        }
        // Asking with the refused bundle's ETag makes an unchanged bad
        // bundle a cheap 304 instead of another download and refusal.
        let etag = match &self.refused {
            Some(refused) => Some(refused.etag.as_str()),
            None => self.etag.as_deref(),
        };
        let fetched = self
            .platform
            .fetch_policy(credentials, etag)
            .await
            .map_err(|e| self.failed(e, true).to_string())?;
        let (envelope, etag) = match fetched {
            PolicyFetch::NotModified => {
                return match &self.refused {
                    Some(refused) => Err(format!(
                        "policy fetch: the platform's bundle is still the one refused: {}",
                        refused.reason
                    )),
                    None => Ok(format!(
                        "policy version {} unchanged",
                        in_force.unwrap_or_default()
                    )),
                };
            }
            PolicyFetch::Bundle { envelope, etag } => (envelope, etag),
        };
        let decider = &self.context.decider;
        match epm_sync::accept_bundle(
            &self.context.key,
            &self.context.device_id,
            self.current,
            &envelope,
        ) {
            Ok(accepted) if Some(accepted.current()) == self.current => {
                self.etag = etag;
                self.refused = None;
                Ok(format!("policy version {} unchanged", accepted.version))
            }
            Ok(accepted) => {
                let version = accepted.version;
                self.install(accepted, &envelope, etag);
                Ok(format!("policy version {version} now in force"))
            }
            Err(error) => {
                let kept = decider.policy().engine.version();
                let reason = error.to_string();
                tracing::error!(%reason, kept_version = kept, "platform policy bundle refused; the policy in force stays");
                self.context.audit.send(policy_source::rejected_event(
                    policy_source::PLATFORM_SOURCE,
                    &reason,
                    kept,
                ));
                if let Some(etag) = etag {
                    self.refused = Some(Refused {
                        etag,
                        reason: reason.clone(),
                    });
                }
                Err(format!(
                    "policy fetch: bundle refused, version {kept} stays in force: {reason}"
                ))
            }
        }
    }

    /// Stores the bundle as the active policy (the previous one becomes
    /// last good), then puts it in force and audits it.
    fn install(
        &mut self,
        accepted: epm_sync::AcceptedBundle,
        envelope: &SignedEnvelope,
        etag: Option<String>,
    ) {
        let decider = &self.context.decider;
        let current = accepted.current();
        let stored = StoredPolicy {
            document: accepted.document,
            version: accepted.version,
            etag: etag.clone(),
            signature: Some(envelope.signature.clone()),
            source: policy_source::PLATFORM_SOURCE.to_owned(),
            fetched_at: Timestamp::now(),
            envelope: serde_json::to_string(envelope).ok(),
        };
        match self.context.store.lock() {
            Ok(mut store) => {
                if let Err(error) = store.save_active_policy(&stored) {
                    tracing::warn!(%error, "cannot store the platform policy; it is enforced but will not survive a restart");
                }
            }
            Err(_) => tracing::warn!("store lock poisoned; the platform policy is not stored"),
        }
        drop(stored);
        let previous = decider.policy().engine.version();
        let state = policy_source::Candidate::platform(accepted.engine)
            .into_state(decider.next_generation());
        let event = policy_source::loaded_event(&state, Some(previous));
        tracing::info!(version = state.engine.version(), "platform policy in force");
        decider.set_policy(state);
        self.context.audit.send(event);
        self.current = Some(current);
        self.etag = etag;
        self.refused = None;
    }

    /// Applies what the platform says about one of our requests.
    fn apply_request_status(&mut self, status: &RequestStatus) -> Result<(), String> {
        let what = |detail: String| format!("request {}: {detail}", status.id);
        let mut store = self
            .context
            .store
            .lock()
            .map_err(|_| what("store lock poisoned".into()))?;
        let local = store
            .request(&status.local_id)
            .map_err(|e| what(e.to_string()))?
            .ok_or_else(|| what(format!("no local request {:?}", status.local_id)))?;
        if local.platform_id.as_deref() != Some(status.id.as_str()) {
            return Err(what(format!(
                "local request {} is not this platform request",
                local.id
            )));
        }
        let now = Timestamp::now();
        let next = match status.state {
            ApiRequestState::Pending => return Ok(()),
            ApiRequestState::Approved => {
                if local.state != RequestState::Pending {
                    return Ok(());
                }
                let envelope = status
                    .grant
                    .as_ref()
                    .ok_or_else(|| what("approved without a grant".into()))?;
                let grant = epm_sync::accept_grant(
                    &self.context.key,
                    &self.context.device_id,
                    &status.id,
                    envelope,
                )
                .map_err(|e| what(e.to_string()))?;
                if grant.user != local.user
                    || grant.identity.kind != local.identity.kind.as_str()
                    || !grant
                        .identity
                        .value
                        .eq_ignore_ascii_case(&local.identity.value)
                {
                    return Err(what(
                        "the grant names another user or binary than the request".into(),
                    ));
                }
                // The grant first: a crash before the state change leaves
                // the request pending, and the next delivery finds the
                // grant already there.
                let exists = store
                    .grants_for(local.uid, now)
                    .map_err(|e| what(e.to_string()))?
                    .iter()
                    .any(|g| g.grant.request_id.as_deref() == Some(local.id.as_str()));
                if !exists {
                    store
                        .insert_grant(&NewGrant {
                            uid: local.uid,
                            user: local.user.clone(),
                            identity: local.identity.clone(),
                            rule_id: grant.rule_id,
                            not_before: grant.not_before,
                            not_after: grant.not_after,
                            uses: grant.uses,
                            source: GrantSource::Approval,
                            request_id: Some(local.id.clone()),
                            justification: Some(local.justification.clone()),
                            path: Some(local.path.clone()),
                        })
                        .map_err(|e| what(e.to_string()))?;
                }
                RequestState::Approved
            }
            ApiRequestState::Denied => RequestState::Denied,
            ApiRequestState::Expired => RequestState::Expired,
            ApiRequestState::Revoked => RequestState::Revoked,
            ApiRequestState::Used => RequestState::Used,
        };
        if local.state != next && local.state.can_become(next) {
            // A final state also ends the request's grants (same transaction).
            store
                .set_request_state(&local.id, next, status.reason.as_deref(), now)
                .map_err(|e| what(e.to_string()))?;
            let changed = store.request(&local.id).ok().flatten();
            drop(store);
            if let (Some(flows), Some(changed)) = (&self.context.flows, changed) {
                flows.request_changed(&changed);
            }
        }
        Ok(())
    }

    /// Audits an answer the agent refused (malformed, oversized, of the
    /// wrong type, or stalled): bad input is a security event, unlike an
    /// unreachable platform, which is only logged. A refused bundle
    /// download is a `policy_rejected`. The same failure again is not
    /// audited again until a cycle succeeds.
    fn failed(&mut self, error: SyncError, policy: bool) -> SyncError {
        let bad_answer = matches!(
            error,
            SyncError::ContentType { .. }
                | SyncError::TooLarge { .. }
                | SyncError::Truncated { .. }
                | SyncError::InvalidJson { .. }
                | SyncError::Timeout { .. }
        );
        let reason = error.to_string();
        if bad_answer && self.last_audited.as_ref() != Some(&reason) {
            let event = if policy {
                policy_source::rejected_event(
                    policy_source::PLATFORM_SOURCE,
                    &reason,
                    self.context.decider.policy().engine.version(),
                )
            } else {
                let mut event = epm_audit::AuditEvent::new("platform_error");
                event.reason = Some(format!("answer from the platform refused: {reason}"));
                event
            };
            self.context.audit.send(event);
            self.last_audited = Some(reason);
        }
        error
    }

    fn set_acked(&self, acked: u64) {
        self.lock_status().acked_seq = acked;
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, SyncStatus> {
        self.context
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_store(&self) -> Result<std::sync::MutexGuard<'_, Store>, CycleError> {
        self.context
            .store
            .lock()
            .map_err(|_| CycleError::Local("store lock poisoned".into()))
    }
}

/// A step's failure: the platform's (or the network's), or our own.
#[derive(Debug)]
enum CycleError {
    Platform(SyncError),
    Local(String),
}

impl std::fmt::Display for CycleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CycleError::Platform(e) => e.fmt(f),
            CycleError::Local(e) => f.write_str(e),
        }
    }
}

/// The platform cannot be reached: no later step can succeed either.
fn unreachable(error: &CycleError) -> bool {
    matches!(
        error,
        CycleError::Platform(
            SyncError::Connect { .. } | SyncError::Timeout { .. } | SyncError::Transfer { .. }
        )
    )
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

fn os_name() -> String {
    // The kernel release where it is a file read away; the OS name alone
    // elsewhere.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{} {}", std::env::consts::OS, release.trim())
        .trim()
        .to_owned()
}

/// The device's people, with their groups ([`epm_os::users::local_users`]).
pub(crate) fn local_users() -> Vec<LocalUser> {
    epm_os::users::local_users()
        .into_iter()
        .map(|user| LocalUser {
            name: user.name,
            groups: user.groups,
        })
        .collect()
}

/// What an `epmctl sync` gets back.
#[derive(Debug)]
pub(crate) enum SyncNowReply {
    /// The cycle ran: its summary or error.
    Done(CycleResult),
    /// It did not finish within [`SYNC_REPLY_WAIT`]; it goes on.
    StillRunning,
    /// Another `epmctl sync` is already waiting for one.
    Busy,
}

/// What asks the sync thread for a cycle: made before the thread (with
/// [`sync_channel`]), so the grant flows can be given a nudge at their
/// start, before the sync that needs them exists.
#[derive(Debug, Clone)]
pub(crate) struct SyncTrigger(tokio::sync::mpsc::Sender<std::sync::mpsc::SyncSender<CycleResult>>);

/// The sync thread's end of [`SyncTrigger`].
#[derive(Debug)]
pub(crate) struct SyncRequests(
    tokio::sync::mpsc::Receiver<std::sync::mpsc::SyncSender<CycleResult>>,
);

/// A trigger and the sync thread's end of it, for [`spawn`].
pub(crate) fn sync_channel() -> (SyncTrigger, SyncRequests) {
    let (trigger, requests) = tokio::sync::mpsc::channel(1);
    (SyncTrigger(trigger), SyncRequests(requests))
}

impl SyncTrigger {
    /// Asks for a cycle soon without waiting for it (a new approval
    /// request); does nothing if one is already asked for.
    pub(crate) fn nudge(&self) {
        let (reply, _ignored) = std::sync::mpsc::sync_channel(1);
        let _ = self.0.try_send(reply);
    }
}

/// The daemon's side of the sync thread: status and "sync now".
#[derive(Debug)]
pub(crate) struct SyncHandle {
    /// The platform's URL, for status.
    pub url: String,
    /// Shared with the cycle.
    pub status: Arc<Mutex<SyncStatus>>,
    trigger: SyncTrigger,
    /// One `epmctl sync` at a time: it only asks for a check-in, so any
    /// user may, but nobody can make the daemon check in back to back.
    one_at_a_time: Mutex<()>,
}

impl SyncHandle {
    /// Runs a cycle now and waits up to `wait` for its outcome.
    pub(crate) fn sync_now(&self, wait: Duration) -> SyncNowReply {
        let Ok(_guard) = self.one_at_a_time.try_lock() else {
            return SyncNowReply::Busy;
        };
        let (reply, outcome) = std::sync::mpsc::sync_channel(1);
        if self.trigger.0.try_send(reply).is_err() {
            return SyncNowReply::Busy;
        }
        match outcome.recv_timeout(wait) {
            Ok(result) => SyncNowReply::Done(result),
            Err(_) => SyncNowReply::StillRunning,
        }
    }

    /// A copy of the status.
    pub(crate) fn status(&self) -> SyncStatus {
        self.status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What woke the sync thread.
enum Woke {
    /// The next cycle is due.
    Due,
    /// `epmctl sync` or a nudge: run a cycle now (and answer it).
    Asked(std::sync::mpsc::SyncSender<CycleResult>),
    /// A request wait ended.
    Waited(Result<RequestWaitResponse, SyncError>),
}

/// The request wait's state between cycles: while requests are pending
/// or grants in force here, one wait is kept open on the platform so a
/// decision or a revocation runs a cycle at once instead of at the next
/// `sync_interval`.
#[derive(Debug, Default)]
struct RequestWaits {
    /// Consecutive failed waits; backed off like check-ins.
    failures: u32,
    /// No wait starts before this.
    not_before: Option<tokio::time::Instant>,
    /// The platform has no such call (an older one): check-ins only.
    unsupported: bool,
    /// The platform takes waits on pending requests only (it refused one
    /// naming grants): revocations arrive at check-ins.
    grants_unsupported: bool,
    /// Ids a wait reported changed that are still pending (or approved)
    /// here after the cycle it caused (a grant refused, a check-in that
    /// failed): not waited on again in that state until they leave it, or
    /// every wait would answer at once. Kept with the list they were in,
    /// so a request pending when stale is still watched once approved.
    stale: std::collections::HashSet<(String, Held)>,
    last_error: Option<String>,
}

/// Which list of a [`Watched`] an id was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Held {
    Pending,
    Grant,
}

impl RequestWaits {
    /// What to wait on (dropping stale ids that left the state they were
    /// stale in), at most what the platform takes: grants first, since a
    /// revocation that is late lets a withdrawn grant be used, and a user
    /// must not be able to crowd them out with requests of their own.
    fn watch(&mut self, watched: Watched) -> Watched {
        self.stale.retain(|(id, held)| match held {
            Held::Pending => watched.pending.contains(id),
            Held::Grant => watched.grants.contains(id),
        });
        let fresh = |held: Held, ids: Vec<String>, stale: &std::collections::HashSet<_>| {
            ids.into_iter()
                .filter(|id| !stale.contains(&(id.clone(), held)))
                .collect::<Vec<String>>()
        };
        let mut grants = if self.grants_unsupported {
            Vec::new()
        } else {
            fresh(Held::Grant, watched.grants, &self.stale)
        };
        grants.truncate(MAX_WAIT_REQUESTS);
        let mut pending = fresh(Held::Pending, watched.pending, &self.stale);
        pending.truncate(MAX_WAIT_REQUESTS - grants.len());
        Watched { pending, grants }
    }

    /// The ids of `changed` that `watched` named, as stale candidates.
    fn mark_stale(&mut self, watched: &Watched, changed: Vec<RequestChange>) {
        for RequestChange { id, .. } in changed {
            if watched.grants.contains(&id) {
                self.stale.insert((id.clone(), Held::Grant));
            }
            if watched.pending.contains(&id) {
                self.stale.insert((id, Held::Pending));
            }
        }
    }

    /// A wait on `watched` ended: `Some(changes)` (run a cycle), `None`
    /// not.
    fn ended(
        &mut self,
        started: tokio::time::Instant,
        watched: &Watched,
        outcome: Result<RequestWaitResponse, SyncError>,
        interval: Duration,
    ) -> Option<Vec<RequestChange>> {
        self.not_before = Some(started + REQUEST_WAIT_SPACING);
        match outcome {
            Ok(answer) => {
                self.failures = 0;
                if self.last_error.take().is_some() {
                    tracing::info!("request waits work again");
                }
                (!answer.changed.is_empty()).then_some(answer.changed)
            }
            Err(error) if matches!(error.status(), Some(404 | 405)) => {
                tracing::info!(%error, "the platform has no request waits; decisions arrive at check-ins");
                self.unsupported = true;
                None
            }
            // A platform older than grant waits refuses the unknown field;
            // pending requests are still worth a wait there.
            Err(error)
                if !watched.grants.is_empty() && matches!(error.status(), Some(400 | 422)) =>
            {
                tracing::info!(%error, "the platform takes no grants in request waits; revocations arrive at check-ins");
                self.grants_unsupported = true;
                None
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                let delay = epm_sync::schedule::next_delay(
                    interval,
                    self.failures,
                    epm_sync::schedule::random_jitter(),
                );
                self.not_before =
                    Some(tokio::time::Instant::now() + delay.max(REQUEST_WAIT_SPACING));
                let text = error.to_string();
                if self.last_error.as_ref() != Some(&text) {
                    tracing::warn!(error = %text, retry_in = ?delay, "request wait failed; retrying with backoff");
                    self.last_error = Some(text);
                }
                None
            }
        }
    }
}

/// Starts the sync thread: a first cycle at once, then on schedule, and at
/// once when a request wait reports a decision.
pub(crate) fn spawn<P: Platform + Send + 'static>(
    mut cycle: SyncCycle<P>,
    url: String,
    interval: Duration,
    (trigger, SyncRequests(mut requests)): (SyncTrigger, SyncRequests),
) -> std::io::Result<SyncHandle> {
    let status = cycle.context.status.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let thread_status = status.clone();
    std::thread::Builder::new()
        .name("epm-sync".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut failures: u32 = 0;
                let mut next_cycle = tokio::time::Instant::now();
                let mut last_error: Option<String> = None;
                let mut waits = RequestWaits::default();
                loop {
                    // A wait only while the last cycle reached the platform
                    // (when it is down, the cycles' backoff decides when to
                    // try again) and something here waits on it.
                    let watch = match cycle.watched_on_platform() {
                        Some((credentials, watched)) if failures == 0 && !waits.unsupported => {
                            let watched = waits.watch(watched);
                            (!watched.is_empty()).then_some((credentials, watched))
                        }
                        _ => None,
                    };
                    let not_before = waits.not_before.unwrap_or_else(tokio::time::Instant::now);
                    let wait_started = std::cell::Cell::new(tokio::time::Instant::now());
                    let woke = {
                        let platform = &cycle.platform;
                        let wait = async {
                            let Some((credentials, watched)) = &watch else {
                                return std::future::pending().await;
                            };
                            tokio::time::sleep_until(not_before).await;
                            wait_started.set(tokio::time::Instant::now());
                            platform.wait_requests(credentials, watched, REQUEST_WAIT).await
                        };
                        tokio::select! {
                            () = tokio::time::sleep_until(next_cycle) => Woke::Due,
                            request = requests.recv() => match request {
                                Some(reply) => Woke::Asked(reply),
                                None => return,
                            },
                            outcome = wait => Woke::Waited(outcome),
                        }
                    };
                    let reply = match woke {
                        Woke::Due => None,
                        Woke::Asked(reply) => Some(reply),
                        Woke::Waited(outcome) => {
                            // Only a wait that ran has an outcome: `watch`
                            // is set.
                            let watched = watch.map(|(_, w)| w).unwrap_or_default();
                            match waits.ended(wait_started.get(), &watched, outcome, interval) {
                                Some(changed) => {
                                    tracing::debug!(?changed, "requests decided or grants revoked on the platform; syncing now");
                                    cycle.end_withdrawn_grants(&watched, &changed);
                                    waits.mark_stale(&watched, changed);
                                    None
                                }
                                None => continue,
                            }
                        }
                    };
                    let result = cycle.run_once().await;
                    match &result {
                        Ok(summary) => {
                            if last_error.take().is_some() {
                                tracing::info!(%summary, "platform sync works again");
                            } else {
                                tracing::debug!(%summary, "platform sync");
                            }
                            failures = 0;
                        }
                        Err(error) => {
                            // One line per distinct failure, not one per retry.
                            if last_error.as_ref() != Some(error) {
                                tracing::warn!(%error, "platform sync failed; retrying with backoff");
                                last_error = Some(error.clone());
                            } else {
                                tracing::debug!(%error, "platform sync failed again");
                            }
                            failures = failures.saturating_add(1);
                        }
                    }
                    let delay = epm_sync::schedule::next_delay(
                        interval,
                        failures,
                        epm_sync::schedule::random_jitter(),
                    );
                    next_cycle = tokio::time::Instant::now() + delay;
                    {
                        let mut status = thread_status
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let now = Timestamp::now();
                        status.last_sync_at = Some(now);
                        status.last_result = Some(result.clone());
                        status.next_sync_at = jiff::SignedDuration::try_from(delay)
                            .ok()
                            .and_then(|d| now.checked_add(d).ok());
                    }
                    if let Some(reply) = reply {
                        let _ = reply.try_send(result);
                    }
                }
            });
        })?;
    Ok(SyncHandle {
        url,
        status,
        trigger,
        one_at_a_time: Mutex::new(()),
    })
}

#[cfg(test)]
mod tests;
