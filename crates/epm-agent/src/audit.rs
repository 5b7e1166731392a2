//! The audit thread: seals events into the hash chain in batches, commits
//! each batch to the store's outbox (the source of truth), then appends it
//! to the JSON Lines log.
//!
//! Workers hand events over through a bounded channel without blocking, so
//! audit IO never delays an exec's answer; a full channel drops the event,
//! counts it, and the next batch carries an `audit_dropped` record.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use epm_audit::{AuditEvent, AuditLog, Chain, EventKind, SealedRecord};
use epm_store::{OutboxRecord, Store};

use crate::decider::{Decider, Enforced, Outcome};
use crate::gate::{ExecFacts, Verdict};
use crate::unified_log::UnifiedLog;

/// Events waiting for the audit thread.
const CHANNEL_CAPACITY: usize = 65_536;
/// Most records sealed into one batch (one transaction, one write).
const MAX_BATCH: usize = 2048;
/// Check the outbox's disk budget every this many batches.
const PRUNE_EVERY: u64 = 64;
/// How long a batch waits for more events after its first: at most this
/// much is uncommitted at a crash, and commits (two fsyncs each) stay under
/// 1000 / LINGER per second however busy the machine is.
const LINGER: Duration = Duration::from_millis(20);

#[derive(Debug)]
enum Message {
    Event(Box<AuditEvent>),
    /// Reply once everything sent before has been written.
    Flush(Sender<()>),
    Stop,
}

/// Hands events to the audit thread. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct AuditSink {
    tx: Sender<Message>,
    dropped: Arc<AtomicU64>,
}

impl AuditSink {
    /// Queues an event; when the queue is full the event is counted as
    /// dropped and reported in the next batch.
    pub fn send(&self, event: AuditEvent) {
        if self.tx.try_send(Message::Event(Box::new(event))).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every event sent before this call is durable (tests,
    /// shutdown, SIGHUP), or until `timeout`.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = bounded(1);
        if self.tx.send_timeout(Message::Flush(ack), timeout).is_err() {
            return false;
        }
        done.recv_timeout(timeout).is_ok()
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The live count of dropped events, for status reports.
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// The running audit thread.
#[derive(Debug)]
pub struct AuditWriter {
    tx: Sender<Message>,
    handle: JoinHandle<()>,
}

impl AuditWriter {
    /// Starts the audit thread continuing `chain`.
    pub fn start(
        store: Arc<Mutex<Store>>,
        log: AuditLog,
        chain: Chain,
        outbox_max_bytes: u64,
        last_seq: Arc<AtomicU64>,
        device_id: String,
    ) -> std::io::Result<(AuditWriter, AuditSink)> {
        let (tx, rx) = bounded(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut state = WriterState {
            store,
            log,
            chain,
            outbox_max_bytes,
            dropped: dropped.clone(),
            dropped_reported: 0,
            batches: 0,
            last_seq,
            device_id,
            unified_log: UnifiedLog::audit(),
        };
        let handle = std::thread::Builder::new()
            .name("epm-audit".into())
            .spawn(move || state.run(&rx))?;
        Ok((
            AuditWriter {
                tx: tx.clone(),
                handle,
            },
            AuditSink { tx, dropped },
        ))
    }

    /// Writes everything queued, then stops the thread.
    pub fn stop(self) {
        // A blocking send: at shutdown, waiting for room is right.
        let _ = self.tx.send(Message::Stop);
        let _ = self.handle.join();
    }
}

struct WriterState {
    store: Arc<Mutex<Store>>,
    log: AuditLog,
    chain: Chain,
    outbox_max_bytes: u64,
    dropped: Arc<AtomicU64>,
    dropped_reported: u64,
    batches: u64,
    last_seq: Arc<AtomicU64>,
    /// Every record names its device, whoever built the event.
    device_id: String,
    /// A copy of each record for the system's log (macOS; else a no-op).
    unified_log: UnifiedLog,
}

impl WriterState {
    fn run(&mut self, rx: &Receiver<Message>) {
        let mut events: Vec<AuditEvent> = Vec::with_capacity(MAX_BATCH);
        let mut acks: Vec<Sender<()>> = Vec::new();
        loop {
            let mut stop = false;
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(message) => stop |= take(message, &mut events, &mut acks),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stop = true,
            }
            // Let a batch gather for LINGER after its first event, asleep
            // rather than waiting on the channel: a receiver waiting there
            // is woken by every event, a context switch per exec on a busy
            // machine. A flush or stop waits at most LINGER.
            if !stop && acks.is_empty() && !events.is_empty() {
                std::thread::sleep(LINGER);
            }
            while events.len() < MAX_BATCH && !stop {
                match rx.try_recv() {
                    Ok(message) => stop |= take(message, &mut events, &mut acks),
                    Err(_) => break,
                }
            }
            self.write(&mut events);
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
            if stop {
                // Anything queued behind Stop is written too.
                while let Ok(message) = rx.try_recv() {
                    take(message, &mut events, &mut acks);
                }
                self.write(&mut events);
                return;
            }
        }
    }

    fn write(&mut self, events: &mut Vec<AuditEvent>) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported {
            let count = dropped - self.dropped_reported;
            self.dropped_reported = dropped;
            let mut event = AuditEvent::new(EventKind::AUDIT_DROPPED)
                .with_detail("count", count)
                .with_detail("cause", "audit queue full");
            event.reason = Some(format!(
                "{count} audit records were lost: the audit queue was full"
            ));
            events.push(event);
        }
        if events.is_empty() {
            return;
        }
        let now = jiff::Timestamp::now();
        let sealed: Vec<SealedRecord> = events
            .drain(..)
            .map(|mut e| {
                e.device_id.get_or_insert_with(|| self.device_id.clone());
                self.chain.seal(e, now)
            })
            .collect();
        let outbox: Vec<OutboxRecord> = sealed
            .iter()
            .map(|r| OutboxRecord {
                seq: r.seq,
                hash: r.hash.clone(),
                line: r.line.clone(),
            })
            .collect();
        // The outbox first: it is what a restart continues from.
        match self.store.lock() {
            Ok(mut store) => {
                if let Err(error) = store.append_audit(&outbox) {
                    tracing::error!(%error, "cannot commit audit records to the store; they are only in the log");
                }
            }
            Err(_) => tracing::error!("store lock poisoned; audit records are only in the log"),
        }
        if let Err(error) = self.log.append(&sealed) {
            tracing::error!(%error, "cannot append to the audit log; records are kept in the store");
        }
        for record in &sealed {
            self.unified_log.record(&record.line);
        }
        if let Some(last) = sealed.last() {
            self.last_seq.store(last.seq, Ordering::Relaxed);
        }
        self.batches += 1;
        if self.batches.is_multiple_of(PRUNE_EVERY) {
            self.prune();
        }
    }

    fn prune(&mut self) {
        let pruned = match self.store.lock() {
            Ok(mut store) => store.prune_audit(self.outbox_max_bytes),
            Err(_) => return,
        };
        match pruned {
            Ok(pruned) if pruned.not_uploaded > 0 => {
                let mut event = AuditEvent::new(EventKind::AUDIT_DROPPED)
                    .with_detail("count", pruned.not_uploaded)
                    .with_detail("cause", "outbox over its disk budget");
                event.reason = Some(format!(
                    "{} audit records were dropped from the outbox before upload: it exceeded its disk budget",
                    pruned.not_uploaded
                ));
                let mut events = vec![event];
                self.write(&mut events);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot prune the audit outbox"),
        }
    }
}

/// Files a message; true when it asks the thread to stop.
fn take(message: Message, events: &mut Vec<AuditEvent>, acks: &mut Vec<Sender<()>>) -> bool {
    match message {
        Message::Event(event) => {
            events.push(*event);
            false
        }
        Message::Flush(ack) => {
            acks.push(ack);
            false
        }
        Message::Stop => true,
    }
}

/// The audit event for a decided exec.
pub fn exec_event(decider: &Decider, outcome: &Outcome) -> AuditEvent {
    let subject = &outcome.subject;
    let decision = &outcome.decision;
    let mut event = AuditEvent::new(EventKind::EXEC);
    event.decision = Some(outcome.enforced.as_str().to_owned());
    event.action = Some(decision.action.as_str().to_owned());
    event.rule_id = decision.rule_id.as_deref().map(str::to_owned);
    event.reason = Some(match &decision.message {
        Some(message) => format!("{}: {message}", decision.reason()),
        None => decision.reason(),
    });
    event.mode = Some(decider.mode().as_str().to_owned());
    event.pid = Some(subject.pid);
    event.ppid = Some(subject.ppid);
    event.uid = Some(subject.uid);
    event.user = Some(subject.user.clone());
    event.path = Some(subject.path.clone());
    if !subject.path_origin.trusted() {
        event = event.with_detail("path_origin", subject.path_origin.as_str());
    }
    event.sha256 = subject.sha256.map(|d| d.to_string());
    event.device_id = Some(decider.device_id().to_owned());
    event.policy_version = Some(decision.policy_version);
    if outcome.cached {
        event = event.with_detail("cached", true);
    }
    if let Some(grant) = &outcome.grant {
        event = event
            .with_detail("grant_id", grant.id)
            .with_detail("grant_source", grant.source)
            .with_detail("grant_uses_left", grant.uses_left);
        if let Some(request) = &grant.request_id {
            event = event.with_detail("request_id", request.as_str());
        }
    }
    event
}

/// The audit event for an exec the platform let run from its cache of our
/// allows ([`crate::gate::PendingExec::observed`]): an allow, whatever the
/// policy says now (it ran), marked `answered_by: es_cache`; when the
/// policy has changed under the cache, the reason says so.
pub fn observed_event(decider: &Decider, outcome: &Outcome) -> AuditEvent {
    let mut event = exec_event(decider, outcome).with_detail("answered_by", "es_cache");
    if outcome.enforced != Enforced::Allow {
        event.reason = Some(format!(
            "allowed from the Endpoint Security cache before a policy change reached it; the policy in force says: {}",
            event.reason.unwrap_or_default()
        ));
        event.decision = Some(Enforced::Allow.as_str().to_owned());
    }
    event
}

/// The audit event for an exec the platform let run from its cache, when
/// it was not decided again (its file is gone, or the workers are busy).
pub fn observed_fail_event(decider: &Decider, facts: &ExecFacts, why: &str) -> AuditEvent {
    let mut event =
        fail_event(decider, facts, Verdict::Allow, why).with_detail("answered_by", "es_cache");
    event.reason = Some(format!(
        "allowed from the Endpoint Security cache; not decided again: {why}"
    ));
    event
}

/// The audit event for an exec answered per fail mode.
pub fn fail_event(decider: &Decider, facts: &ExecFacts, verdict: Verdict, why: &str) -> AuditEvent {
    let mut event = AuditEvent::new(EventKind::EXEC);
    event.decision = Some(
        match verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
        .to_owned(),
    );
    event.reason = Some(format!("fail_mode {}: {why}", decider.fail_mode().as_str()));
    event.mode = Some(decider.mode().as_str().to_owned());
    event.pid = Some(facts.pid);
    event.ppid = Some(facts.ppid);
    event.uid = Some(facts.uid);
    event.user = decider.names().user(facts.uid).map(|n| n.to_string());
    event.path = Some(facts.path.clone());
    event.device_id = Some(decider.device_id().to_owned());
    event.policy_version = Some(decider.policy().engine.version());
    if !facts.path_origin.trusted() {
        event = event.with_detail("path_origin", facts.path_origin.as_str());
    }
    event.with_detail("fail_mode", true)
}
