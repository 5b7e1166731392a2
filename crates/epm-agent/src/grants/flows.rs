//! The interactive flows: what happens after a `justify` or `approve` exec
//! is refused, up to the grant that lets the next exec run.
//!
//! An exec gate cannot wait for a person, so the exec is refused at once
//! and the user's helper is told ([`Flows::refused`], never blocking the
//! gate). The helper answers on the control socket: a justification
//! becomes a one-shot grant; an approval request goes to the platform, and
//! the platform's signed grant comes back through the sync thread. Every
//! grant is bound to (uid, binary identity, rule) and consumed by the
//! decision workers ([`Interactive::consume_grant`]).
//!
//! Who may act on what is decided by the kernel-reported uid of the
//! caller: prompts, requests and grants of one user are invisible to the
//! others (admins may list everyone's).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use epm_api::offline::OfflineChallenge;
use epm_audit::AuditEvent;
use epm_ipc::flows::program_name;
use epm_ipc::{
    BlockReason, Blocked, GrantInfo, Justified, Prompt, PromptKind, RequestInfo, UserEvent,
};
use epm_policy::{Action, ApprovalSpec, JustificationSpec, Subject};
use epm_store::{
    Grant, GrantSource, NewGrant, OfflineChallengeRecord, Request, RequestState, Store,
    SubjectIdentity,
};
use epm_sync::credentials::CredentialStore;
use jiff::{SignedDuration, Timestamp};

use crate::exec::audit::AuditSink;
use crate::exec::decider::{Decider, Interactive, Outcome, UsedGrant, grant_identity};
use crate::grants::clock::{FLOOR_META_KEY, TrustedClock};
pub(crate) use crate::grants::grant_error::GrantError;
use crate::grants::program::{Caller, Program};
use crate::grants::subject;

mod elevation;
mod offline;
mod prompts;
pub(crate) use elevation::{ElevationAllowed, Met, Requirement, SudoRequest, Unmet};

/// How long a justification grant waits for the run it allows.
pub(crate) const JUSTIFICATION_GRANT_TTL: SignedDuration = SignedDuration::from_secs(10 * 60);
/// After a rejection, how long before the same user may ask again for the
/// same binary.
pub(crate) const REJECTION_COOL_DOWN: SignedDuration = SignedDuration::from_secs(10 * 60);
/// How long a prompt's id stays answerable.
const PROMPT_TTL: Duration = Duration::from_secs(15 * 60);
/// The same refusal is not shown again within this time (a script that
/// loops on a refused program must not flood the user).
const REPEAT_QUIET: Duration = Duration::from_secs(20);
/// Wrong offline codes a user may try per [`OFFLINE_TRY_WINDOW`].
pub(crate) const OFFLINE_MAX_TRIES: usize = 5;
/// See [`OFFLINE_MAX_TRIES`].
pub(crate) const OFFLINE_TRY_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Events queued per subscribed helper before it counts as stuck.
const SUBSCRIBER_QUEUE: usize = 64;
/// Prompts kept per user (the oldest go first).
const MAX_PROMPTS_PER_USER: usize = 16;
/// How often expired requests are swept and the clock floor kept.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A refused exec, as the flows thread needs it.
#[derive(Debug)]
pub(crate) struct Refusal {
    uid: u32,
    user: String,
    path: String,
    argv: Option<Vec<String>>,
    identity: Option<SubjectIdentity>,
    action: Action,
    rule_id: Option<String>,
    message: Option<String>,
}

/// A prompt sent to a helper, waiting for its answer.
#[derive(Debug, Clone)]
struct PromptRecord {
    uid: u32,
    user: String,
    kind: PromptKind,
    identity: SubjectIdentity,
    path: String,
    argv: Option<Vec<String>>,
    rule_id: String,
    sent: Instant,
}

/// Who a flow acts for and on what: from a prompt or from a path.
#[derive(Debug)]
struct Target {
    uid: u32,
    user: String,
    identity: SubjectIdentity,
    path: String,
    argv: Option<Vec<String>>,
    rule_id: String,
    action: Action,
    justification: JustificationSpec,
    approval: ApprovalSpec,
    prompt: Option<u64>,
}

/// Asks the platform sync for a cycle soon (a request was filed): given
/// to [`Flows::new`] on a managed device, absent on an unmanaged one.
pub(crate) struct Nudge(Box<dyn Fn() + Send + Sync>);

impl Nudge {
    /// A nudge that calls `nudge`; it must not block.
    pub(crate) fn new(nudge: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Box::new(nudge))
    }
}

impl std::fmt::Debug for Nudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nudge")
    }
}

/// A subscribed helper: its id and its event queue.
type Subscriber = (u64, Sender<UserEvent>);

/// A failed flow request: the error code and the message for the user.
type Refused = GrantError;

/// An offline challenge made: the text to read to an administrator, and
/// this device's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Challenge {
    /// The challenge's text.
    pub text: String,
    /// This device.
    pub device_id: String,
}

/// The interactive flows' shared state.
#[derive(Debug)]
pub(crate) struct Flows {
    store: Arc<Mutex<Store>>,
    clock: Arc<TrustedClock>,
    audit: AuditSink,
    decider: Weak<Decider>,
    device_id: String,
    /// The enrollment credentials (offline key), when managed.
    credentials: Option<Box<dyn CredentialStore>>,
    /// Asks the sync thread for a cycle now (a new request), when managed.
    nudge: Option<Nudge>,
    refusals: Sender<Refusal>,
    subscribers: Mutex<HashMap<u32, Vec<Subscriber>>>,
    prompts: Mutex<HashMap<u64, PromptRecord>>,
    recently_shown: Mutex<HashMap<(u32, String), Instant>>,
    offline_failures: Mutex<HashMap<u32, VecDeque<Instant>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Flows {
    /// The flows' shared state, for the decider being made: `decider` is
    /// the `Weak` that `Arc::new_cyclic` hands out while it makes the
    /// decider these flows are given to, so nothing here may use it yet.
    /// The clock's floor comes from the store. Nothing runs until
    /// [`Flows::start_thread`].
    pub(crate) fn new(
        store: Arc<Mutex<Store>>,
        audit: AuditSink,
        decider: Weak<Decider>,
        device_id: String,
        credentials: Option<Box<dyn CredentialStore>>,
        nudge: Option<Nudge>,
    ) -> (Arc<Flows>, Receiver<Refusal>) {
        let floor = store
            .lock()
            .ok()
            .and_then(|s| s.meta(FLOOR_META_KEY).ok().flatten());
        let floor = crate::grants::clock::parse_floor(floor.as_deref());
        let wall = Timestamp::now();
        if let Some(behind) = crate::grants::clock::set_back_while_down(floor, wall) {
            // Every window and session is judged from the floor now: the
            // log says why its times jump back.
            audit.send(
                AuditEvent::new(crate::grants::clock::CLOCK_JUMP_EVENT)
                    .with_reason(format!(
                        "the wall clock reads about {} s earlier than this daemon last saw before it restarted: it was set back while the daemon was down; windows and sessions are judged from the later time",
                        behind.as_secs()
                    ))
                    .with_detail("seconds", -behind.as_secs())
                    .with_detail("wall_after", wall.to_string())
                    .with_detail("trusted_now", floor.map(|f| f.to_string())),
            );
        }
        let clock = Arc::new(TrustedClock::new(floor));
        let (refusals, incoming) = bounded(1024);
        let flows = Arc::new(Flows {
            store,
            clock,
            audit,
            decider,
            device_id,
            credentials,
            nudge,
            refusals,
            subscribers: Mutex::default(),
            prompts: Mutex::default(),
            recently_shown: Mutex::default(),
            offline_failures: Mutex::default(),
            // Prompt ids start at a random point: they only need to be
            // unique, but a guessable sequence helps nobody.
            next_id: std::sync::atomic::AtomicU64::new(rand::random::<u32>().into()),
        });
        (flows, incoming)
    }

    /// Starts the flows thread on the refusals [`Flows::new`] queued for
    /// it; the decider must be made by now.
    pub(crate) fn start_thread(
        self: &Arc<Self>,
        incoming: Receiver<Refusal>,
    ) -> std::io::Result<()> {
        let thread_flows = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("epm-flows".into())
            .spawn(move || run(&thread_flows, &incoming))?;
        Ok(())
    }

    /// The clock grant windows are judged by.
    pub(crate) fn clock(&self) -> &TrustedClock {
        &self.clock
    }

    // ---- requests from helpers and epmctl (control threads) ---------------------

    /// [`epm_ipc::Request::Justify`].
    pub(crate) fn justify(
        &self,
        caller: u32,
        prompt: Option<u64>,
        path: Option<String>,
        reason: &str,
    ) -> Result<Justified, Refused> {
        let target = self.target(caller, prompt, path)?;
        if target.action != Action::Justify {
            return Err(wrong_flow(&target));
        }
        let reason = target.justification.check(reason).map_err(|e| {
            self.audit_refusal(
                "justification_refused",
                target.uid,
                &target.user,
                &target.path,
                Some(&target.rule_id),
                &e.to_string(),
            );
            GrantError::BadRequest(e.to_string())
        })?;
        let now = self.clock.now();
        let grant = NewGrant {
            uid: target.uid,
            user: target.user.clone(),
            identity: target.identity.clone(),
            rule_id: target.rule_id.clone(),
            not_before: now,
            not_after: now + JUSTIFICATION_GRANT_TTL,
            uses: 1,
            source: GrantSource::Justification,
            request_id: None,
            justification: Some(reason.clone()),
            path: Some(target.path.clone()),
        };
        let id = self.insert_grant(&grant)?;
        self.forget_prompt(target.prompt);
        self.audit
            .send(flow_event("justified", &target, Some(&reason)).with_detail("grant_id", id));
        Ok(Justified {
            program: program_name(&target.path),
            grant: grant_info(id, &grant),
            relaunch: target.argv,
        })
    }

    /// [`epm_ipc::Request::RequestApproval`].
    pub(crate) fn request_approval(
        &self,
        caller: u32,
        prompt: Option<u64>,
        path: Option<String>,
        reason: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<RequestInfo, Refused> {
        let target = self.target(caller, prompt, path)?;
        if target.action != Action::Approve {
            return Err(wrong_flow(&target));
        }
        let request = self.file_request(&target, reason, start, end)?;
        self.forget_prompt(target.prompt);
        Ok(request_info(&request))
    }

    /// Checks an approval request's answers, stores the request and asks
    /// the sync thread to send it: one way for execs, elevations and admin
    /// sessions.
    fn file_request(
        &self,
        target: &Target,
        reason: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<Request, Refused> {
        let reason = self.check_approval_answer(target, reason, start, end)?;
        if self.nudge.is_none() {
            return Err(GrantError::BadRequest(
                "this device is not managed by a platform, so nobody can approve a request: \
                 ask an administrator for an offline code (epmctl request --offline PATH)"
                    .into(),
            ));
        }
        let now = self.clock.now();
        let mut store = self.lock_store()?;
        let mine = store.requests(Some(target.uid), None).map_err(internal)?;
        if let Some(open) = mine.iter().find(|r| {
            same_identity(&r.identity, &target.identity) && r.state == RequestState::Pending
        }) {
            return Err(GrantError::Conflict(format!(
                "a request for {} is already pending administrator review (request {})",
                program_name(&open.path),
                open.id
            )));
        }
        if let Some(rejected) = mine.iter().find(|r| {
            same_identity(&r.identity, &target.identity)
                && r.state == RequestState::Denied
                && r.updated_at + REJECTION_COOL_DOWN > now
        }) {
            return Err(GrantError::TryLater(format!(
                "your last request for {} was rejected by the administrator; you can ask again after {}",
                program_name(&rejected.path),
                rejected.updated_at + REJECTION_COOL_DOWN
            )));
        }
        let request = Request {
            id: store.new_request_id().map_err(internal)?,
            uid: target.uid,
            user: target.user.clone(),
            rule_id: target.rule_id.clone(),
            identity: target.identity.clone(),
            path: target.path.clone(),
            justification: reason.clone(),
            window_start: start,
            window_end: end,
            state: RequestState::Pending,
            state_reason: None,
            platform_id: None,
            created_at: now,
            updated_at: now,
        };
        store.insert_request(&request).map_err(internal)?;
        drop(store);
        self.audit.send(
            flow_event("approval_requested", target, Some(&reason))
                .with_detail("request_id", request.id.as_str())
                .with_detail("window_start", start.to_string())
                .with_detail("window_end", end.to_string()),
        );
        if let Some(nudge) = &self.nudge {
            (nudge.0)();
        }
        Ok(request)
    }

    fn check_approval_answer(
        &self,
        target: &Target,
        reason: &str,
        start: Timestamp,
        end: Timestamp,
    ) -> Result<String, Refused> {
        let reason = target
            .justification
            .check(reason)
            .map_err(|e| GrantError::BadRequest(e.to_string()))?;
        target
            .approval
            .check_window(start, end, self.clock.now())
            .map_err(|e| GrantError::BadRequest(e.to_string()))?;
        Ok(reason)
    }

    /// [`epm_ipc::Request::ListRequests`]: the caller's, or everyone's.
    pub(crate) fn list_requests(
        &self,
        caller: u32,
        all: bool,
    ) -> Result<Vec<RequestInfo>, Refused> {
        let uid = (!all).then_some(caller);
        let requests = self.lock_store()?.requests(uid, None).map_err(internal)?;
        Ok(requests.iter().map(request_info).collect())
    }

    /// [`epm_ipc::Request::ListGrants`]: the caller's current and future
    /// grants (or everyone's).
    pub(crate) fn list_grants(&self, caller: u32, all: bool) -> Result<Vec<GrantInfo>, Refused> {
        let now = self.clock.now();
        let store = self.lock_store()?;
        let listed = if all {
            store.all_current_grants(now)
        } else {
            store.grants_for(caller, now)
        };
        Ok(listed
            .map_err(internal)?
            .iter()
            .map(|g| grant_info(g.id, &g.grant))
            .collect())
    }

    // ---- shared ------------------------------------------------------------------

    /// Resolves what a flow request is about, for the caller only.
    fn target(
        &self,
        caller: u32,
        prompt: Option<u64>,
        path: Option<String>,
    ) -> Result<Target, Refused> {
        let decider = self
            .decider
            .upgrade()
            .ok_or_else(|| GrantError::Internal("the daemon is stopping".to_owned()))?;
        let policy = decider.policy();
        let (uid, user, identity, path, argv, rule_id, prompt) = match (prompt, path) {
            (Some(id), None) => {
                let record = lock(&self.prompts)
                    .get(&id)
                    .filter(|p| p.uid == caller && p.sent.elapsed() < PROMPT_TTL)
                    .cloned()
                    // Another user's prompt reads as no prompt at all.
                    .ok_or_else(|| {
                        GrantError::NotFound(format!("no open prompt {id} for you: it was answered, expired, or is not yours; run the program again"),
                        )
                    })?;
                let _ = record.kind;
                (
                    record.uid,
                    record.user,
                    record.identity,
                    record.path,
                    record.argv,
                    record.rule_id,
                    Some(id),
                )
            }
            (None, Some(path)) => {
                let user = self.user_name(caller);
                let (identity, subject) = self
                    .subject_for_path(&decider, caller, &user, &path)
                    .inspect_err(|why| {
                        self.audit_refusal(
                            "flow_request_refused",
                            caller,
                            &user,
                            &path,
                            None,
                            &why.to_string(),
                        );
                    })?;
                let decision = policy.engine.evaluate(&subject);
                let Some(rule_id) = decision.rule_id.as_deref().map(str::to_owned) else {
                    return Err(GrantError::BadRequest(format!(
                        "no rule asks for a justification or an approval for {path}: the policy's default ({}) applies",
                        decision.action.as_str()
                    )));
                };
                (caller, user, identity, path, None, rule_id, None)
            }
            _ => {
                return Err(GrantError::BadRequest(
                    "name either a prompt or a path".into(),
                ));
            }
        };
        let rule = policy.engine.rule(&rule_id).ok_or_else(|| {
            GrantError::NotFound(format!(
                "the policy changed since (rule {rule_id:?} is gone): run the program again"
            ))
        })?;
        Ok(Target {
            uid,
            user,
            identity,
            path,
            argv,
            action: rule.action,
            justification: rule.justification.cloned().unwrap_or_default(),
            approval: rule.approval.cloned().unwrap_or_default(),
            rule_id,
            prompt,
        })
    }

    /// Hashes a file the caller names, as the daemon (root) but only if the
    /// caller could execute it: a hash of a file the caller cannot run is
    /// none of their business.
    fn subject_for_path(
        &self,
        decider: &Decider,
        caller: u32,
        user: &str,
        path: &str,
    ) -> Result<(SubjectIdentity, Subject), Refused> {
        self.hashed_subject(decider, caller, user, path, |meta, ids| {
            if meta.is_file() && crate::grants::program::permitted(meta, ids, 1) {
                Ok(())
            } else {
                Err(GrantError::BadRequest(format!(
                    "{path} is not a program you can run"
                )))
            }
        })
    }

    /// The subject for a file named by a caller for a grant: opened once
    /// with the caller's own credentials ([`Program::for_caller`]), so a
    /// file they cannot reach stays unknown to them, `admit`ted (given its
    /// metadata and the caller's group ids), hashed through the same
    /// descriptor, with the caller's name, groups and this device.
    fn hashed_subject(
        &self,
        decider: &Decider,
        caller: u32,
        user: &str,
        path: &str,
        admit: impl FnOnce(&std::fs::Metadata, &Caller) -> Result<(), Refused>,
    ) -> Result<(SubjectIdentity, Subject), Refused> {
        let ids = Caller::of(caller, decider.names());
        let program = Program::for_caller(path, &ids)?;
        let meta = program
            .file
            .metadata()
            .map_err(|e| GrantError::NotFound(format!("cannot read {path}: {e}")))?;
        admit(&meta, &ids)?;
        let asker = subject::Asker {
            uid: caller,
            user: user.to_owned(),
            groups: group_names(decider, &ids.groups),
            device_id: decider.device_id().to_owned(),
        };
        let subject = subject::of_program(&program, asker)
            .map_err(|e| GrantError::Conflict(format!("cannot read {path}: {e}")))?;
        let identity = grant_identity(&subject)
            .ok_or_else(|| GrantError::Internal("no identity for the file".to_owned()))?;
        Ok((identity, subject))
    }

    fn user_name(&self, uid: u32) -> String {
        self.decider
            .upgrade()
            .and_then(|d| d.names().user(uid).map(|n| n.to_string()))
            .unwrap_or_else(|| uid.to_string())
    }

    fn forget_prompt(&self, id: Option<u64>) {
        if let Some(id) = id {
            lock(&self.prompts).remove(&id);
        }
    }

    fn insert_grant(&self, grant: &NewGrant) -> Result<i64, Refused> {
        self.lock_store()?.insert_grant(grant).map_err(internal)
    }

    fn lock_store(&self) -> Result<std::sync::MutexGuard<'_, Store>, Refused> {
        self.store
            .lock()
            .map_err(|_| GrantError::Internal("store lock poisoned".to_owned()))
    }
}

impl Interactive for Flows {
    fn consume_grant(
        &self,
        uid: u32,
        identity: &SubjectIdentity,
        rule_id: &str,
    ) -> Option<UsedGrant> {
        let now = self.clock.now();
        let mut store = self.store.lock().ok()?;
        let grant = match store.consume_grant(uid, identity, rule_id, now) {
            Ok(grant) => grant?,
            Err(error) => {
                tracing::warn!(%error, "cannot consume a grant; the exec is refused");
                return None;
            }
        };
        let mut used_request = None;
        if grant.grant.uses == 0
            && let Some(request) = &grant.grant.request_id
        {
            match store.set_request_state(request, RequestState::Used, None, now) {
                Ok(true) => used_request = store.request(request).ok().flatten(),
                Ok(false) => {}
                Err(error) => tracing::debug!(%error, "request not marked used"),
            }
        }
        drop(store);
        if let Some(request) = used_request {
            self.request_changed(&request);
        }
        Some(UsedGrant {
            id: grant.id,
            source: grant.grant.source.as_str(),
            uses_left: grant.grant.uses,
            request_id: grant.grant.request_id,
        })
    }

    fn refused(&self, outcome: &Outcome) {
        if !self.has_subscriber(outcome.subject.uid) {
            return;
        }
        let subject = &outcome.subject;
        let refusal = Refusal {
            uid: subject.uid,
            user: subject.user.clone(),
            path: subject.path.clone(),
            argv: subject.argv.clone(),
            identity: grant_identity(subject),
            action: outcome.decision.action,
            rule_id: outcome.decision.rule_id.as_deref().map(str::to_owned),
            message: outcome.decision.message.as_deref().map(str::to_owned),
        };
        if self.refusals.try_send(refusal).is_err() {
            tracing::debug!("flows queue full; a refusal is not shown");
        }
    }
}

fn run(flows: &Weak<Flows>, incoming: &Receiver<Refusal>) {
    let mut last_sweep = Instant::now();
    loop {
        let next = incoming.recv_timeout(Duration::from_secs(1));
        let Some(flows) = flows.upgrade() else { return };
        match next {
            Ok(refusal) => flows.handle_refusal(refusal),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            flows.sweep();
            last_sweep = Instant::now();
        }
    }
}

/// Where an approval stands, for a refused exec.
#[derive(Debug, PartialEq, Eq)]
enum Situation {
    /// Say why, and do not offer a form.
    Blocked(BlockReason),
    /// Say why, then offer a new form.
    AskAgainAfter(BlockReason),
    /// Offer the form.
    Ask,
}

/// The pure decision behind [`Flows::approval_situation`]: `requests` are
/// the user's for this binary, newest first; `grants` likewise.
fn situation(requests: &[Request], grants: &[Grant], now: Timestamp) -> Situation {
    if let Some(pending) = requests.iter().find(|r| r.state == RequestState::Pending) {
        return Situation::Blocked(BlockReason::Pending {
            request_id: pending.id.clone(),
        });
    }
    if let Some(ahead) = requests
        .iter()
        .find(|r| r.state == RequestState::Approved && r.window_start > now)
    {
        return Situation::Blocked(BlockReason::WindowNotStarted {
            start: ahead.window_start,
        });
    }
    let Some(latest) = requests.first() else {
        return Situation::Ask;
    };
    let was_approved = grants
        .iter()
        .any(|g| g.grant.request_id.as_deref() == Some(latest.id.as_str()));
    match latest.state {
        RequestState::Denied if latest.updated_at + REJECTION_COOL_DOWN > now => {
            Situation::Blocked(BlockReason::Rejected {
                request_id: latest.id.clone(),
                reason: latest.state_reason.clone(),
                retry_after: latest.updated_at + REJECTION_COOL_DOWN,
            })
        }
        RequestState::Used => Situation::AskAgainAfter(BlockReason::WindowExpired),
        RequestState::Approved | RequestState::Expired if was_approved => {
            Situation::AskAgainAfter(BlockReason::WindowExpired)
        }
        _ => Situation::Ask,
    }
}

fn situation_name(reason: &BlockReason) -> &'static str {
    match reason {
        BlockReason::Denied => "denied",
        BlockReason::Pending { .. } => "pending",
        BlockReason::Rejected { .. } => "rejected",
        BlockReason::WindowNotStarted { .. } => "not_started",
        BlockReason::WindowExpired => "expired",
        BlockReason::PromptOpen => "prompt_open",
    }
}

/// The names of `gids`, in order, without repeats (unknown ids left out).
fn group_names(decider: &Decider, gids: &[u32]) -> Vec<String> {
    let mut names: Vec<String> = gids
        .iter()
        .filter_map(|&gid| decider.names().group(gid).map(|n| n.to_string()))
        .collect();
    names.dedup();
    names
}

fn same_identity(a: &SubjectIdentity, b: &SubjectIdentity) -> bool {
    a.kind == b.kind && a.value.eq_ignore_ascii_case(&b.value)
}

fn wrong_flow(target: &Target) -> Refused {
    let program = program_name(&target.path);
    let message = match target.action {
        Action::Allow => format!("{program} is allowed: just run it"),
        Action::Deny => {
            format!("{program} is denied by policy; no justification or approval can change that")
        }
        Action::Justify => {
            format!("{program} needs a justification, not an approval: use `epmctl justify`")
        }
        Action::Approve => {
            format!("{program} needs an approval, not a justification: use `epmctl request`")
        }
    };
    GrantError::BadRequest(message)
}

fn internal(error: impl std::fmt::Display) -> Refused {
    GrantError::Internal(error.to_string())
}

fn flow_event(kind: &str, target: &Target, justification: Option<&str>) -> AuditEvent {
    let mut event = AuditEvent::new(kind);
    event.uid = Some(target.uid);
    event.user = Some(target.user.clone());
    event.path = Some(target.path.clone());
    event.rule_id = Some(target.rule_id.clone());
    event.action = Some(target.action.as_str().to_owned());
    if target.identity.kind == epm_store::IdentityKind::Sha256 {
        event.sha256 = Some(target.identity.value.to_ascii_lowercase());
    }
    let event = event.with_detail(
        "identity",
        format!("{}:{}", target.identity.kind, target.identity.value),
    );
    match justification {
        Some(text) => event.with_detail("justification", text),
        None => event,
    }
}

/// A store request as the IPC shows it.
pub(crate) fn request_info(request: &Request) -> RequestInfo {
    RequestInfo {
        id: request.id.clone(),
        user: request.user.clone(),
        program: program_name(&request.path),
        path: request.path.clone(),
        identity: format!("{}:{}", request.identity.kind, request.identity.value),
        rule_id: request.rule_id.clone(),
        justification: request.justification.clone(),
        start: request.window_start,
        end: request.window_end,
        state: request.state.as_str().to_owned(),
        state_reason: request.state_reason.clone(),
        submitted: request.platform_id.is_some(),
        created_at: request.created_at,
        updated_at: request.updated_at,
    }
}

fn grant_info(id: i64, grant: &NewGrant) -> GrantInfo {
    GrantInfo {
        id,
        user: grant.user.clone(),
        path: grant.path.clone(),
        identity: format!("{}:{}", grant.identity.kind, grant.identity.value),
        rule_id: grant.rule_id.clone(),
        source: grant.source.as_str().to_owned(),
        not_before: grant.not_before,
        not_after: grant.not_after,
        uses_left: grant.uses,
        request_id: grant.request_id.clone(),
    }
}

/// Locks a mutex, taking it over if a panicking holder poisoned it: one
/// failed request must not stop the daemon's flows and sessions for good.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn identity() -> SubjectIdentity {
        SubjectIdentity {
            kind: epm_store::IdentityKind::Sha256,
            value: "ab".repeat(32),
        }
    }

    fn request(id: &str, state: RequestState, start: i64, end: i64, updated: i64) -> Request {
        Request {
            id: id.into(),
            uid: 501,
            user: "alice".into(),
            rule_id: "nc".into(),
            identity: identity(),
            path: "/usr/bin/nc".into(),
            justification: "debugging".into(),
            window_start: at(start),
            window_end: at(end),
            state,
            state_reason: Some("not now".into()),
            platform_id: Some(format!("p-{id}")),
            created_at: at(0),
            updated_at: at(updated),
        }
    }

    fn grant_for(request: &str) -> Grant {
        Grant {
            id: 1,
            grant: NewGrant {
                uid: 501,
                user: "alice".into(),
                identity: identity(),
                rule_id: "nc".into(),
                not_before: at(0),
                not_after: at(100),
                uses: 0,
                source: GrantSource::Approval,
                request_id: Some(request.into()),
                justification: None,
                path: None,
            },
            created_at: at(0),
        }
    }

    #[test]
    fn nothing_asked_yet_offers_the_form() {
        assert_eq!(situation(&[], &[], at(0)), Situation::Ask);
    }

    #[test]
    fn a_pending_request_is_not_asked_again() {
        let pending = request("r1", RequestState::Pending, 0, 100, 0);
        assert_eq!(
            situation(&[pending], &[], at(10)),
            Situation::Blocked(BlockReason::Pending {
                request_id: "r1".into()
            })
        );
    }

    #[test]
    fn an_approved_window_ahead_says_when_it_opens() {
        let approved = request("r1", RequestState::Approved, 50, 100, 0);
        assert_eq!(
            situation(&[approved], &[grant_for("r1")], at(10)),
            Situation::Blocked(BlockReason::WindowNotStarted { start: at(50) })
        );
    }

    #[test]
    fn a_rejection_holds_for_the_cool_down_then_the_form_returns() {
        let denied = request("r1", RequestState::Denied, 0, 100_000, 10);
        let during = situation(std::slice::from_ref(&denied), &[], at(20));
        assert!(
            matches!(during, Situation::Blocked(BlockReason::Rejected { ref reason, .. }) if reason.as_deref() == Some("not now")),
            "{during:?}"
        );
        let after = at(10) + REJECTION_COOL_DOWN;
        assert_eq!(situation(&[denied], &[], after), Situation::Ask);
    }

    #[test]
    fn a_used_or_expired_approval_says_so_and_offers_a_new_form() {
        let used = request("r1", RequestState::Used, 0, 100, 20);
        assert_eq!(
            situation(&[used], &[grant_for("r1")], at(30)),
            Situation::AskAgainAfter(BlockReason::WindowExpired)
        );
        let expired = request("r2", RequestState::Expired, 0, 100, 100);
        assert_eq!(
            situation(std::slice::from_ref(&expired), &[grant_for("r2")], at(200)),
            Situation::AskAgainAfter(BlockReason::WindowExpired)
        );
        // Expired unreviewed: nothing was approved, just ask.
        assert_eq!(situation(&[expired], &[], at(200)), Situation::Ask);
    }
}
