//! The decision pipeline between a gate and the decider: a queue shared
//! fairly between users, worker threads, the answer first and the audit
//! after.
//!
//! Cache hits are answered on the gate's thread; everything else (hashing,
//! evaluation) goes to a worker. Every exec handed to [`Intake::submit`] is
//! answered exactly once: from the caches; by a worker; at once per
//! `fail_mode` when the queue is full or its user is over their share; per
//! `fail_mode` when deciding fails or panics; or by `PendingExec`'s drop
//! guard if anything else goes wrong. An exec the platform already let run
//! ([`PendingExec::observed`]) is only decided again by a worker, for the
//! audit: every exec is audited, including those Endpoint Security
//! answered from its own cache.
//!
//! # Fairness
//! Any user can make execs that miss every cache (a large file of their
//! own, changed before each run), so no user may take the queue or the
//! workers from the others: each user (by real uid) may have at most
//! a sixteenth of the queue (at least 16) queued or being decided, past which
//! their own new execs are answered per `fail_mode`; workers take users in
//! turn, one exec each; and a user's execs occupy at most all workers but
//! one at a time. Root is exempt from both limits (but not from the turns).

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::exec::audit::{AuditSink, exec_event, fail_event, observed_event, observed_fail_event};
use crate::exec::decider::{DecideError, Decider, Enforced, Outcome};
use crate::exec::stats::Counters;
use crate::gate::{AnsweredBy, DropReport, PendingExec};

/// One exec waiting for a worker, with the time the gate handed it over.
#[derive(Debug)]
struct Job {
    pending: PendingExec,
    received: Instant,
}

impl Job {
    fn uid(&self) -> u32 {
        self.pending.facts.uid
    }
}

/// One user's execs in the queue.
#[derive(Debug, Default)]
struct UserJobs {
    queued: VecDeque<Box<Job>>,
    /// Taken by a worker and not finished yet.
    running: usize,
}

#[derive(Debug, Default)]
struct QueueState {
    users: HashMap<u32, UserJobs>,
    /// Users with queued execs, in the order they get their next turn.
    turns: VecDeque<u32>,
    queued: usize,
    closed: bool,
}

/// The decision queue: bounded in all and per user, served one user at a
/// time in turn (see the module documentation).
#[derive(Debug)]
struct FairQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
    user_share: usize,
    user_workers: usize,
    /// Intakes alive: the queue closes when the last is dropped.
    intakes: AtomicUsize,
}

impl FairQueue {
    fn new(capacity: usize, workers: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            state: Mutex::default(),
            ready: Condvar::new(),
            capacity,
            user_share: Self::user_share(capacity),
            user_workers: workers.saturating_sub(1).max(1),
            intakes: AtomicUsize::new(0),
        }
    }

    /// How many execs one user (but root) may have queued or being decided:
    /// a sixteenth of the queue (at least 16, at most all of it), so a
    /// dozen users could flood at once and still leave room for everyone.
    fn user_share(capacity: usize) -> usize {
        (capacity / 16).max(16).min(capacity)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.lock().queued
    }

    /// Queues a job; gives it back, and why, when it cannot be taken.
    fn push(&self, job: Box<Job>) -> Result<(), (Box<Job>, Refused)> {
        let mut state = self.lock();
        if state.closed {
            return Err((job, Refused::Closed));
        }
        if state.queued >= self.capacity {
            return Err((job, Refused::Full));
        }
        let uid = job.uid();
        let user = state.users.entry(uid).or_default();
        if uid != 0 && user.queued.len() + user.running >= self.user_share {
            return Err((job, Refused::OverShare));
        }
        let first = user.queued.is_empty();
        user.queued.push_back(job);
        if first {
            state.turns.push_back(uid);
        }
        state.queued += 1;
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// The next job, from the first user in turn who may have one more
    /// decided now; waits for one. `None` once closed and drained.
    fn pop(&self) -> Option<Box<Job>> {
        let mut state = self.lock();
        loop {
            if let Some(job) = self.take_next(&mut state) {
                return Some(job);
            }
            if state.closed && state.queued == 0 {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn take_next(&self, state: &mut QueueState) -> Option<Box<Job>> {
        let index = state.turns.iter().position(|uid| {
            *uid == 0
                || state
                    .users
                    .get(uid)
                    .is_some_and(|user| user.running < self.user_workers)
        })?;
        let uid = state.turns.remove(index)?;
        let user = state.users.get_mut(&uid)?;
        let job = user.queued.pop_front()?;
        user.running += 1;
        if !user.queued.is_empty() {
            state.turns.push_back(uid);
        }
        state.queued -= 1;
        Some(job)
    }

    /// A job of `uid` taken by [`FairQueue::pop`] is done.
    fn finished(&self, uid: u32) {
        let mut state = self.lock();
        if let Some(user) = state.users.get_mut(&uid) {
            user.running = user.running.saturating_sub(1);
            if user.running == 0 && user.queued.is_empty() {
                state.users.remove(&uid);
            }
        }
        drop(state);
        // A worker may be waiting for this user's next turn.
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// Calls [`FairQueue::finished`] however deciding ends.
struct Taken<'a> {
    queue: &'a FairQueue,
    uid: u32,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.queue.finished(self.uid);
    }
}

/// The gate-facing end: hands execs in, never blocks.
pub struct Intake {
    queue: Arc<FairQueue>,
    decider: Arc<Decider>,
    audit: AuditSink,
    /// Audits an exec a worker dropped unanswered (a bug path).
    drops: DropReport,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("queue", &self.queue)
            .field("decider", &self.decider)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

impl Clone for Intake {
    fn clone(&self) -> Self {
        self.queue.intakes.fetch_add(1, Ordering::SeqCst);
        Self {
            queue: self.queue.clone(),
            decider: self.decider.clone(),
            audit: self.audit.clone(),
            drops: self.drops.clone(),
        }
    }
}

impl Drop for Intake {
    fn drop(&mut self) {
        if self.queue.intakes.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.queue.close();
        }
    }
}

impl Intake {
    /// The intake of `queue` (whose count of intakes the caller set).
    fn new(queue: Arc<FairQueue>, decider: Arc<Decider>, audit: AuditSink) -> Intake {
        let drops: DropReport = {
            let decider = decider.clone();
            let audit = audit.clone();
            Arc::new(move |facts, verdict| {
                audit.send(fail_event(
                    &decider,
                    facts,
                    verdict,
                    "the exec was dropped unanswered (a bug in epmd)",
                ));
            })
        };
        Intake {
            queue,
            decider,
            audit,
            drops,
        }
    }

    /// Queues an exec for a worker; when the queue is full, or the exec's
    /// user is over their share of it, the exec is answered per
    /// `fail_mode` at once, counted and audited.
    pub fn submit(&self, pending: PendingExec) {
        let counters = &self.decider.counters;
        Counters::bump(&counters.execs_seen);
        // The common case, a file version and context decided before, is
        // answered right here: waking a worker would cost more than deciding.
        let received = Instant::now();
        if pending.is_observed() {
            return self.observe(pending, received);
        }
        if let Some(outcome) = self.decider.decide_cached(&pending.facts) {
            let audited = audited(&pending, &outcome);
            pending.answer_per_file(outcome.verdict, cacheable(&outcome), outcome.per_file);
            self.decider.latency.record(received.elapsed());
            if audited {
                self.audit.send(exec_event(&self.decider, &outcome));
            }
            self.decider.answered(&outcome);
            return;
        }
        let Some((pending, refused)) = self.enqueue(pending, received) else {
            return;
        };
        match refused {
            Refused::Full => Counters::bump(&counters.overflow),
            Refused::OverShare => Counters::bump(&counters.over_share),
            Refused::Closed => {}
        }
        Counters::bump(&counters.fail_mode_answers);
        let verdict = self.decider.fail_verdict();
        let why = refused.why(pending.facts.uid);
        let event = fail_event(&self.decider, &pending.facts, verdict, &why);
        pending.answer(verdict);
        self.audit.send(event);
    }

    /// Hands an exec to the workers, counted in the queue depth; gives it
    /// back, and why, when the queue cannot take it.
    fn enqueue(&self, pending: PendingExec, received: Instant) -> Option<(PendingExec, Refused)> {
        let depth = &self.decider.counters.queue_depth;
        depth.fetch_add(1, Ordering::Relaxed);
        // Past this point a worker holds it: should a bug drop it, the
        // fallback answer is audited too.
        let pending = pending.reporting_drops_to(self.drops.clone());
        let Err((job, refused)) = self.queue.push(Box::new(Job { pending, received })) else {
            return None;
        };
        depth.fetch_sub(1, Ordering::Relaxed);
        Some((job.pending, refused))
    }

    /// Queues an exec that already ran for a worker to decide again and
    /// audit; when the queue is busy it is audited at once, without a
    /// decision.
    fn observe(&self, pending: PendingExec, received: Instant) {
        let by = pending.answered_by().unwrap_or(AnsweredBy::EsCache);
        // Decided before (the usual case for a cached file): audited here,
        // without waking a worker.
        if let Some(outcome) = self.decider.decide_cached_observed(&pending.facts) {
            let event = observed_event(&self.decider, &outcome, by);
            self.audit.send(unknown_user(event, &pending.facts));
            return;
        }
        // Half the queue stays free for execs waiting for an answer: a burst
        // of cached execs (a build) must never push those into fail_mode.
        // Past that, the record says what ran, without a decision.
        let busy = self.queue.len() >= self.queue.capacity / 2;
        let (pending, why) = if busy {
            (pending, "decision queue busy".to_owned())
        } else {
            match self.enqueue(pending, received) {
                None => return,
                Some((pending, refused)) => {
                    let why = refused.why(pending.facts.uid);
                    (pending, why)
                }
            }
        };
        let facts = &pending.facts;
        tracing::debug!(path = %facts.path, why, cache = by.as_str(), "an exec allowed from a platform cache is audited without a decision");
        let event = observed_fail_event(&self.decider, facts, &why, by);
        self.audit.send(unknown_user(event, facts));
    }
}

/// Why the decision queue did not take an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Full,
    OverShare,
    Closed,
}

impl Refused {
    fn why(self, uid: u32) -> String {
        match self {
            Refused::Full => "decision queue full".to_owned(),
            Refused::OverShare => {
                format!("uid {uid} is over its share of the decision queue")
            }
            Refused::Closed => "daemon shutting down".to_owned(),
        }
    }
}

/// The worker threads.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers; returns them and the intake for the gate.
    pub fn start(
        count: usize,
        capacity: usize,
        decider: Arc<Decider>,
        audit: AuditSink,
    ) -> std::io::Result<(Workers, Intake)> {
        let count = count.max(1);
        let queue = Arc::new(FairQueue::new(capacity, count));
        queue.intakes.store(1, Ordering::SeqCst);
        let intake = Intake::new(queue.clone(), decider.clone(), audit.clone());
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let queue = queue.clone();
            let decider = decider.clone();
            let audit = audit.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("epm-decide-{index}"))
                .spawn(move || {
                    crate::gate::raise_exec_path_priority();
                    work(&queue, &decider, &audit)
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    // The intake's drop closes the queue; those started stop.
                    drop(intake);
                    for handle in handles {
                        let _ = handle.join();
                    }
                    return Err(error);
                }
            }
        }
        Ok((Workers { handles }, intake))
    }

    /// Waits for the workers to drain the queue and exit; the queue closes
    /// when every [`Intake`] has been dropped.
    pub fn join(self) {
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

fn work(queue: &FairQueue, decider: &Decider, audit: &AuditSink) {
    while let Some(job) = queue.pop() {
        let _taken = Taken {
            queue,
            uid: job.uid(),
        };
        let Job { pending, received } = *job;
        decider.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        if pending.is_observed() {
            audit.send(unknown_user(
                audit_observed(decider, &pending),
                &pending.facts,
            ));
            continue;
        }
        // The PendingExec stays outside the closure: if deciding panics,
        // this thread still owns it and answers per fail_mode below.
        let result = catch_unwind(AssertUnwindSafe(|| decider.decide(&pending.facts)));
        let (verdict, event, outcome) = match result {
            Ok(Ok(outcome)) => (
                outcome.verdict,
                exec_event(decider, &outcome),
                Some(outcome),
            ),
            Ok(Err(error)) => {
                tracing::warn!(%error, "exec answered per fail_mode");
                Counters::bump(&decider.counters.fail_mode_answers);
                match &error {
                    DecideError::HashBudget { .. } => Counters::bump(&decider.counters.hash_budget),
                    DecideError::Unstable { .. } => {
                        Counters::bump(&decider.counters.unstable_content)
                    }
                    DecideError::Hash { .. } | DecideError::HashTooSlow { .. } => {}
                }
                let verdict = decider.fail_verdict();
                (
                    verdict,
                    fail_event(decider, &pending.facts, verdict, &error.to_string()),
                    None,
                )
            }
            Err(_) => {
                tracing::error!(path = %pending.facts.path, "deciding panicked; answered per fail_mode");
                Counters::bump(&decider.counters.worker_panics);
                Counters::bump(&decider.counters.fail_mode_answers);
                let verdict = decider.fail_verdict();
                let why = "internal error: deciding panicked";
                (
                    verdict,
                    fail_event(decider, &pending.facts, verdict, why),
                    None,
                )
            }
        };
        let audited = outcome.as_ref().is_none_or(|o| audited(&pending, o));
        match &outcome {
            Some(outcome) => pending.answer_per_file(verdict, cacheable(outcome), outcome.per_file),
            None => pending.answer(verdict),
        }
        decider.latency.record(received.elapsed());
        if audited {
            audit.send(event);
        }
        if let Some(outcome) = outcome {
            decider.answered(&outcome);
        }
    }
}

/// The record of an exec that already ran: decided again without grants.
fn audit_observed(decider: &Decider, pending: &PendingExec) -> epm_audit::AuditEvent {
    let facts = &pending.facts;
    let by = pending.answered_by().unwrap_or(AnsweredBy::EsCache);
    match catch_unwind(AssertUnwindSafe(|| decider.decide_observed(facts))) {
        Ok(Ok(outcome)) => observed_event(decider, &outcome, by),
        Ok(Err(error)) => observed_fail_event(decider, facts, &error.to_string(), by),
        Err(_) => {
            tracing::error!(path = %facts.path, "deciding panicked");
            Counters::bump(&decider.counters.worker_panics);
            observed_fail_event(decider, facts, "internal error: deciding panicked", by)
        }
    }
}

/// The record of an exec that already ran, whose process had exited before
/// the gate read it: its user is not known (the gate could read nothing),
/// and the record says so rather than name root.
fn unknown_user(
    mut event: epm_audit::AuditEvent,
    facts: &crate::gate::ExecFacts,
) -> epm_audit::AuditEvent {
    if facts.process_gone {
        event.uid = None;
        event.user = None;
        event.ppid = None;
        event = event.with_detail("process", "exited before its exec was read: user unknown");
    }
    event
}

/// Whether this decision gets an audit record: all do, but an allowed
/// interpreter load, whose program's record stands for the exec.
fn audited(pending: &PendingExec, outcome: &Outcome) -> bool {
    pending.facts.interpreter_of.is_none() || outcome.enforced != Enforced::Allow
}

/// Whether a platform may remember this answer for the same file: only a
/// plain policy allow. A grant allows one run; a monitor-mode pass must be
/// seen (and audited) every time.
fn cacheable(outcome: &Outcome) -> bool {
    outcome.enforced == Enforced::Allow && outcome.grant.is_none()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use epm_audit::{AuditLog, Chain, LogOptions};
    use epm_policy::Engine;
    use epm_store::Store;

    use super::*;
    use crate::config::{FailMode, Mode};
    use crate::exec::audit::AuditWriter;
    use crate::exec::decider::PolicyState;
    use crate::gate::{ExecFacts, FileIdentity, Respond, Verdict};

    /// Records the verdict it is given.
    struct Recorder(crossbeam_channel::Sender<Verdict>);

    impl Respond for Recorder {
        fn respond(self: Box<Self>, verdict: Verdict) {
            let _ = self.0.send(verdict);
        }
    }

    fn facts(path: &str, content: Option<std::fs::File>) -> ExecFacts {
        let file = FileIdentity {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        ExecFacts {
            ppid: 1,
            content,
            ..ExecFacts::new(7, file, path.into())
        }
    }

    fn setup(fail_mode: FailMode) -> (tempfile::TempDir, Arc<Decider>, AuditWriter, AuditSink) {
        setup_with_limits(
            fail_mode,
            crate::exec::audit::AuditLimits {
                outbox_max_bytes: 1 << 20,
                ..Default::default()
            },
        )
    }

    fn setup_with_limits(
        fail_mode: FailMode,
        limits: crate::exec::audit::AuditLimits,
    ) -> (tempfile::TempDir, Arc<Decider>, AuditWriter, AuditSink) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("s.sqlite")).unwrap();
        let (log, _) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
        let document = r#"{"version": 1, "default_action": "allow", "rules": [
            {"id": "no-nc", "action": "deny", "match": {"name": "nc"}}]}"#;
        let policy = PolicyState {
            engine: Engine::from_json(document).unwrap(),
            generation: 1,
            source: "test".into(),
            loaded_at: jiff::Timestamp::now(),
        };
        let decider = Arc::new(Decider::new(
            policy,
            Mode::Enforce,
            fail_mode,
            "d".into(),
            64,
        ));
        let (writer, sink) = AuditWriter::start(
            Arc::new(Mutex::new(store)),
            log,
            Chain::genesis(),
            limits,
            Arc::new(std::sync::atomic::AtomicU64::new(0)),
            "d".into(),
        )
        .unwrap();
        (dir, decider, writer, sink)
    }

    #[test]
    fn exec_records_of_unknown_users_share_one_budget_and_cost_nobody_else_a_record() {
        let (dir, _decider, writer, sink) = setup_with_limits(
            FailMode::Open,
            crate::exec::audit::AuditLimits {
                outbox_max_bytes: 1 << 20,
                user_rate_bytes: 1024,
                user_burst_bytes: 8 * 1024,
            },
        );
        let exec = |uid: Option<u32>, path: &str| {
            let mut event = epm_audit::AuditEvent::new(epm_audit::EventKind::EXEC);
            event.uid = uid;
            event.path = Some(path.to_owned());
            event.decision = Some("allow".into());
            event.with_detail("process", "exited before its exec was read: user unknown")
        };
        // A user's tight loop of a short program: every record without a
        // user. Before, those were charged to nobody.
        for n in 0..400 {
            sink.send(exec(
                None,
                &format!("/home/m/loop-{n:04}-{}", "x".repeat(100)),
            ));
        }
        for n in 0..5 {
            sink.send(exec(Some(1001), &format!("/usr/bin/victim-{n}")));
        }
        sink.send(epm_audit::AuditEvent::new("policy_loaded"));
        assert!(sink.flush(Duration::from_secs(5)));
        // The counted records are reported once a second.
        std::thread::sleep(Duration::from_millis(1500));
        sink.send(epm_audit::AuditEvent::new("policy_loaded"));
        assert!(sink.flush(Duration::from_secs(5)));
        drop(sink);
        writer.stop();
        let records: Vec<epm_audit::AuditEvent> = epm_audit::tail(dir.path(), 1000)
            .unwrap()
            .iter()
            .map(|line| epm_audit::AuditRecord::parse(line).unwrap().event)
            .collect();
        let unknown = records
            .iter()
            .filter(|r| r.event == "exec" && r.uid.is_none())
            .count();
        assert!(
            (10..400).contains(&unknown),
            "the budget let {unknown} of 400 through"
        );
        let victim = records.iter().filter(|r| r.uid == Some(1001)).count();
        assert_eq!(victim, 5, "another user's records are all kept");
        assert_eq!(
            records
                .iter()
                .filter(|r| r.event == "policy_loaded")
                .count(),
            2,
            "the daemon's own records are never budgeted"
        );
        let report = records
            .iter()
            .find(|r| r.event == "audit_rate_limited")
            .expect("the counted records are reported");
        let details = report.details.as_ref().unwrap();
        assert_eq!(details["user_unknown"], true, "{report:?}");
        assert_eq!(
            details["count"].as_u64().unwrap() as usize + unknown,
            400,
            "{report:?}"
        );
    }

    #[test]
    fn workers_answer_and_audit_every_exec() {
        let (dir, decider, writer, sink) = setup(FailMode::Open);
        let (workers, intake) = Workers::start(2, 16, decider.clone(), sink.clone()).unwrap();
        let (tx, verdicts) = crossbeam_channel::unbounded();
        for path in ["/usr/bin/nc", "/usr/bin/ls"] {
            let pending = PendingExec::new(
                facts(path, None),
                Box::new(Recorder(tx.clone())),
                Verdict::Deny,
            );
            intake.submit(pending);
        }
        let mut got: Vec<Verdict> = (0..2)
            .map(|_| verdicts.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort_by_key(|v| *v == Verdict::Allow);
        assert_eq!(got, [Verdict::Deny, Verdict::Allow]);
        drop(intake);
        workers.join();
        assert!(sink.flush(Duration::from_secs(5)));
        drop(sink);
        writer.stop();
        let report = epm_audit::verify_dir(dir.path()).unwrap();
        assert_eq!(report.records, 2);
    }

    /// Drains the pipeline and the audit; the records written.
    fn finish(
        dir: &tempfile::TempDir,
        intake: Intake,
        workers: Workers,
        sink: AuditSink,
        writer: AuditWriter,
    ) -> Vec<epm_audit::AuditRecord> {
        drop(intake);
        workers.join();
        assert!(sink.flush(Duration::from_secs(5)));
        drop(sink);
        writer.stop();
        epm_audit::tail(dir.path(), 100)
            .unwrap()
            .iter()
            .map(|line| epm_audit::AuditRecord::parse(line).unwrap())
            .collect()
    }

    #[test]
    fn execs_the_platform_let_run_are_audited_as_allowed_from_its_cache() {
        let (dir, decider, writer, sink) = setup(FailMode::Closed);
        let (workers, intake) = Workers::start(1, 16, decider.clone(), sink.clone()).unwrap();
        // One the policy allows, and one it no longer allows (a policy
        // change that reached the daemon before the platform's cache).
        intake.submit(PendingExec::observed(facts("/usr/bin/ls", None)));
        intake.submit(PendingExec::observed(facts("/usr/bin/nc", None)));
        let records = finish(&dir, intake, workers, sink, writer);
        assert_eq!(records.len(), 2);
        for record in &records {
            let event = &record.event;
            assert_eq!(
                event.decision.as_deref(),
                Some("allow"),
                "it ran: {event:?}"
            );
            assert_eq!(
                event
                    .details
                    .as_ref()
                    .and_then(|d| d.get("answered_by"))
                    .and_then(|v| v.as_str()),
                Some("es_cache")
            );
        }
        let nc = records
            .iter()
            .find(|r| r.event.path.as_deref() == Some("/usr/bin/nc"))
            .unwrap();
        let reason = nc.event.reason.as_deref().unwrap();
        assert!(
            reason.contains("before a policy change reached it"),
            "{reason}"
        );
        assert_eq!(nc.event.rule_id.as_deref(), Some("no-nc"));
    }

    #[test]
    fn an_allowed_interpreter_load_is_not_a_second_exec_record() {
        let (dir, decider, writer, sink) = setup(FailMode::Open);
        let (workers, intake) = Workers::start(1, 16, decider.clone(), sink.clone()).unwrap();
        let (tx, verdicts) = crossbeam_channel::unbounded();
        let interpreter_load = |path: &str| {
            let mut facts = facts(path, None);
            facts.interpreter_of = Some("/usr/bin/ls".into());
            PendingExec::new(facts, Box::new(Recorder(tx.clone())), Verdict::Deny)
        };
        let program = PendingExec::new(
            facts("/usr/bin/ls", None),
            Box::new(Recorder(tx.clone())),
            Verdict::Deny,
        );
        intake.submit(program);
        intake.submit(interpreter_load("/lib64/ld-linux-x86-64.so.2"));
        // Refused, it is recorded: someone must see why the exec failed.
        intake.submit(interpreter_load("/usr/bin/nc"));
        let mut got: Vec<Verdict> = (0..3)
            .map(|_| verdicts.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort_by_key(|v| *v == Verdict::Allow);
        assert_eq!(got, [Verdict::Deny, Verdict::Allow, Verdict::Allow]);
        let records = finish(&dir, intake, workers, sink, writer);
        let paths: Vec<_> = records
            .iter()
            .filter_map(|r| r.event.path.clone())
            .collect();
        assert_eq!(paths, ["/usr/bin/ls", "/usr/bin/nc"], "{records:?}");
    }

    #[test]
    fn a_busy_queue_audits_cached_execs_without_deciding_them() {
        let (dir, decider, writer, sink) = setup(FailMode::Closed);
        // A queue of one: half of it is none, so it is always busy for
        // execs that already ran.
        let (workers, intake) = Workers::start(1, 1, decider.clone(), sink.clone()).unwrap();
        intake.submit(PendingExec::observed(facts("/usr/bin/ls", None)));
        let records = finish(&dir, intake, workers, sink, writer);
        assert_eq!(records.len(), 1);
        let event = records[0].event.clone();
        assert_eq!(event.decision.as_deref(), Some("allow"));
        let reason = event.reason.unwrap();
        assert!(
            reason.contains("not decided again: decision queue busy"),
            "{reason}"
        );
        assert_eq!(event.path.as_deref(), Some("/usr/bin/ls"));
    }

    /// Records the verdict and whether it may be cached.
    struct DecidedRecorder(crossbeam_channel::Sender<(Verdict, Option<bool>)>);

    impl Respond for DecidedRecorder {
        fn respond(self: Box<Self>, verdict: Verdict) {
            let _ = self.0.send((verdict, None));
        }

        fn respond_decided(self: Box<Self>, verdict: Verdict, cacheable: bool) {
            let _ = self.0.send((verdict, Some(cacheable)));
        }
    }

    #[test]
    fn only_plain_policy_allows_are_marked_cacheable() {
        let (_dir, decider, writer, sink) = setup(FailMode::Open);
        let (workers, intake) = Workers::start(1, 16, decider.clone(), sink.clone()).unwrap();
        let (tx, answers) = crossbeam_channel::unbounded();
        for path in ["/usr/bin/ls", "/usr/bin/nc", "/usr/bin/ls"] {
            intake.submit(PendingExec::new(
                facts(path, None),
                Box::new(DecidedRecorder(tx.clone())),
                Verdict::Deny,
            ));
            let answer = answers.recv_timeout(Duration::from_secs(5)).unwrap();
            let expected = if path.ends_with("ls") {
                (Verdict::Allow, Some(true))
            } else {
                (Verdict::Deny, Some(false))
            };
            assert_eq!(answer, expected, "{path}");
        }
        assert!(
            Counters::get(&decider.counters.cache_hits) >= 1,
            "the second ls"
        );
        drop(intake);
        workers.join();
        drop(sink);
        writer.stop();
    }

    #[test]
    fn a_full_queue_answers_per_fail_mode_at_once() {
        for (fail_mode, expected) in [
            (FailMode::Open, Verdict::Allow),
            (FailMode::Closed, Verdict::Deny),
        ] {
            let (_dir, decider, writer, sink) = setup(fail_mode);
            // No workers: a queue of one fills with the first exec.
            let intake = intake_without_workers(1, &decider, &sink);
            let (tx, verdicts) = crossbeam_channel::unbounded();
            for _ in 0..2 {
                intake.submit(PendingExec::new(
                    facts("/usr/bin/ls", None),
                    Box::new(Recorder(tx.clone())),
                    Verdict::Deny,
                ));
            }
            assert_eq!(
                verdicts.recv_timeout(Duration::from_secs(1)).unwrap(),
                expected
            );
            assert_eq!(Counters::get(&decider.counters.overflow), 1);
            assert_eq!(Counters::get(&decider.counters.fail_mode_answers), 1);
            drop(intake);
            drop(sink);
            writer.stop();
        }
    }

    /// An intake whose queue no worker serves.
    fn intake_without_workers(capacity: usize, decider: &Arc<Decider>, sink: &AuditSink) -> Intake {
        let queue = Arc::new(FairQueue::new(capacity, 2));
        queue.intakes.store(1, Ordering::SeqCst);
        Intake::new(queue, decider.clone(), sink.clone())
    }

    fn exec_of(uid: u32, path: &str, tx: &crossbeam_channel::Sender<Verdict>) -> PendingExec {
        let mut facts = facts(path, None);
        facts.uid = uid;
        PendingExec::new(facts, Box::new(Recorder(tx.clone())), Verdict::Deny)
    }

    #[test]
    fn a_user_over_their_share_is_answered_per_fail_mode_and_nobody_else() {
        let (_dir, decider, writer, sink) = setup(FailMode::Closed);
        let intake = intake_without_workers(64, &decider, &sink);
        let share = FairQueue::user_share(64);
        assert_eq!(share, 16);
        let (tx, verdicts) = crossbeam_channel::unbounded();
        for _ in 0..share {
            intake.submit(exec_of(1000, "/home/m/big", &tx));
        }
        assert!(verdicts.try_recv().is_err(), "all queued");
        intake.submit(exec_of(1000, "/home/m/big", &tx));
        assert_eq!(
            verdicts.recv_timeout(Duration::from_secs(1)).unwrap(),
            Verdict::Deny
        );
        assert_eq!(Counters::get(&decider.counters.over_share), 1);
        // Another user and root still get in.
        intake.submit(exec_of(1001, "/usr/bin/ls", &tx));
        intake.submit(exec_of(0, "/usr/bin/ls", &tx));
        assert!(verdicts.try_recv().is_err());
        assert_eq!(intake.queue.len(), share + 2);
        drop(intake);
        assert!(sink.flush(Duration::from_secs(5)));
        drop(sink);
        writer.stop();
        let records: Vec<epm_audit::AuditRecord> = epm_audit::tail(_dir.path(), 100)
            .unwrap()
            .iter()
            .map(|line| epm_audit::AuditRecord::parse(line).unwrap())
            .collect();
        let over = records.iter().find(|r| r.event.uid == Some(1000)).unwrap();
        assert!(
            over.event
                .reason
                .as_deref()
                .unwrap()
                .contains("uid 1000 is over its share"),
            "{over:?}"
        );
    }

    #[test]
    fn an_exec_a_worker_drops_unanswered_is_answered_per_fail_mode_and_audited() {
        let (dir, decider, writer, sink) = setup(FailMode::Closed);
        let intake = intake_without_workers(64, &decider, &sink);
        let (tx, verdicts) = crossbeam_channel::unbounded();
        intake.submit(exec_of(1000, "/home/m/tool", &tx));
        // A worker with a bug takes the exec and loses it.
        let job = intake.queue.pop().expect("queued for a worker");
        drop(job);
        assert_eq!(
            verdicts.recv_timeout(Duration::from_secs(1)).unwrap(),
            Verdict::Deny
        );
        drop(intake);
        assert!(sink.flush(Duration::from_secs(5)));
        drop(sink);
        writer.stop();
        let records: Vec<epm_audit::AuditRecord> = epm_audit::tail(dir.path(), 100)
            .unwrap()
            .iter()
            .map(|line| epm_audit::AuditRecord::parse(line).unwrap())
            .collect();
        let dropped: Vec<_> = records
            .iter()
            .filter(|r| r.event.path.as_deref() == Some("/home/m/tool"))
            .collect();
        assert_eq!(dropped.len(), 1, "{records:#?}");
        let event = &dropped[0].event;
        assert_eq!(event.decision.as_deref(), Some("deny"));
        assert_eq!(event.uid, Some(1000));
        assert!(
            event
                .reason
                .as_deref()
                .unwrap()
                .contains("dropped unanswered"),
            "{event:?}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn an_exec_the_gate_cannot_identify_is_audited_with_what_is_known() {
        let (_dir, decider, writer, sink) = setup(FailMode::Open);
        let exec = crate::gate::fanotify::UnidentifiedExec {
            pid: 4242,
            path: "/mnt/net/tool".to_owned(),
            error: "Too many open files (os error 24)".to_owned(),
            verdict: Verdict::Allow,
        };
        let event = crate::exec::audit::unidentified_event(&decider, &exec);
        assert_eq!(event.event, "exec");
        assert_eq!(event.decision.as_deref(), Some("allow"));
        assert_eq!(event.pid, Some(4242));
        assert_eq!(event.path.as_deref(), Some("/mnt/net/tool"));
        assert_eq!(
            event.reason.as_deref(),
            Some(
                "fail_mode open: cannot identify the file being executed: Too many open files (os error 24)"
            )
        );
        let nameless = crate::exec::audit::unidentified_event(
            &decider,
            &crate::gate::fanotify::UnidentifiedExec {
                path: String::new(),
                ..exec
            },
        );
        assert_eq!(nameless.path, None, "no empty path in the record");
        drop(sink);
        writer.stop();
    }

    #[test]
    fn workers_take_users_in_turn_and_leave_one_worker_to_others() {
        let queue = FairQueue::new(64, 2);
        let (tx, _verdicts) = crossbeam_channel::unbounded();
        let job = |uid| {
            Box::new(Job {
                pending: exec_of(uid, "/x", &tx),
                received: Instant::now(),
            })
        };
        for _ in 0..5 {
            queue.push(job(1000)).unwrap();
        }
        queue.push(job(1001)).unwrap();
        queue.push(job(0)).unwrap();
        queue.push(job(0)).unwrap();
        let first = queue.pop().unwrap();
        assert_eq!(first.uid(), 1000);
        // 1000 has its one worker: the others go next, in turn.
        let order: Vec<u32> = (0..3).map(|_| queue.pop().unwrap().uid()).collect();
        assert_eq!(order, [1001, 0, 0]);
        queue.finished(1001);
        queue.finished(0);
        queue.finished(0);
        // Only 1000 has work left, and it is at its limit: nothing to take
        // until its running exec is done.
        assert!(queue.take_next(&mut queue.lock()).is_none());
        queue.finished(first.uid());
        assert_eq!(queue.pop().unwrap().uid(), 1000);
        queue.close();
    }

    #[test]
    fn an_unreadable_executable_is_answered_per_fail_mode() {
        let (_dir, decider, writer, sink) = setup(FailMode::Closed);
        let (workers, intake) = Workers::start(1, 16, decider.clone(), sink.clone()).unwrap();
        let (tx, verdicts) = crossbeam_channel::unbounded();
        // A write-only handle cannot be read to hash it.
        let path = _dir.path().join("wo");
        let write_only = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        intake.submit(PendingExec::new(
            facts("/usr/bin/ls", Some(write_only)),
            Box::new(Recorder(tx)),
            Verdict::Allow,
        ));
        assert_eq!(
            verdicts.recv_timeout(Duration::from_secs(5)).unwrap(),
            Verdict::Deny
        );
        drop(intake);
        workers.join();
        assert_eq!(Counters::get(&decider.counters.fail_mode_answers), 1);
        drop(sink);
        writer.stop();
    }
}
