//! The audit thread: seals events into the hash chain in batches, commits
//! each batch to the store's outbox (the source of truth), then appends it
//! to the JSON Lines log.
//!
//! Workers hand events over through a bounded channel without blocking, so
//! audit IO never delays an exec's answer; a full channel drops the event,
//! counts it, and the next batch carries an `audit_dropped` record.
//!
//! Everything is bounded in bytes, whatever users send: each event is cut
//! to size before it is queued ([`AuditEvent::bound`]), the channel holds at
//! most [`CHANNEL_MAX_BYTES`], and each user (by uid; root and the daemon's
//! own records are exempt) may add at most [`AuditLimits::user_rate_bytes`]
//! a second (with bursts of [`AuditLimits::user_burst_bytes`]). Past that,
//! that user's records are counted instead of written, and an
//! `audit_rate_limited` record per second says how many, of which kinds, so
//! a flood from one user costs nobody else a record. Exec records whose
//! user is unknown (a process that exited before its exec was read, which
//! a user can make happen with a tight loop of a short program) share one
//! such budget of their own, so they cannot be used to get past it. The outbox's disk
//! budget is checked after every batch; pruning takes from the user with
//! the most records waiting.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use epm_audit::{AuditEvent, AuditLog, Chain, EventKind, SealedRecord};
use epm_store::{OutboxRecord, Store};

use crate::exec::decider::{Decider, Enforced, Outcome};
use crate::gate::{ExecFacts, Verdict};
use crate::unified_log::UnifiedLog;

/// Events waiting for the audit thread.
const CHANNEL_CAPACITY: usize = 65_536;
/// Bytes of events waiting for the audit thread (by
/// [`AuditEvent::approx_bytes`]): what bounds the daemon's memory under a
/// flood of large records.
pub const CHANNEL_MAX_BYTES: u64 = 32 * 1024 * 1024;
// The audit's budgets are part of the configuration (its `[audit]`).
pub use crate::config::AuditLimits;
/// Most records sealed into one batch (one transaction, one write).
const MAX_BATCH: usize = 2048;
/// Most bytes of records in one batch: a batch is held three times over
/// while it is written (events, sealed lines, the outbox's copy).
const MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// How long a batch waits for more events after its first: at most this
/// much is uncommitted at a crash, and commits (two fsyncs each) stay under
/// 1000 / LINGER per second however busy the machine is.
const LINGER: Duration = Duration::from_millis(20);
/// How often retention is looked at when the log has not rotated (it is
/// looked at after every rotation): the live file's growth can put the
/// log over its byte budget, at most this much later than a look after
/// every batch would see it.
const RETENTION_EVERY: Duration = Duration::from_secs(1);
/// Most events kept in memory while neither the store nor the log takes a
/// write (a full disk); past it, events are counted as lost.
const MAX_UNWRITTEN: usize = 65_536;
/// The event that counts a user's records past their budget.
pub const AUDIT_RATE_LIMITED: &str = "audit_rate_limited";
/// Users remembered by the limiter; past this, those back at full budget
/// with nothing to report are forgotten.
const MAX_TRACKED_USERS: usize = 4096;

#[derive(Debug)]
enum Message {
    /// An event and the bytes it was counted as in the channel.
    Event(Box<AuditEvent>, u64),
    /// Reply once everything sent before has been written.
    Flush(Sender<()>),
    Stop,
}

/// One user's audit budget, and what was counted past it.
#[derive(Debug)]
struct UserBudget {
    tokens: f64,
    refilled: Instant,
    over: Option<OverBudget>,
}

/// Records of one user not written individually since the last report.
#[derive(Debug)]
struct OverBudget {
    since: jiff::Timestamp,
    count: u64,
    bytes: u64,
    /// By `event:decision` (`exec:allow`, `elevation_denied:deny`, ...).
    kinds: BTreeMap<String, u64>,
    user: Option<String>,
}

/// The budget that exec records of an unknown user share (no uid is this
/// large: the kernel's is 32 bits and `u32::MAX` is its "no uid").
const UNKNOWN_USER: u32 = u32::MAX;

/// Per-user byte budgets (a token bucket each).
#[derive(Debug)]
struct UserLimiter {
    rate: f64,
    burst: f64,
    users: Mutex<HashMap<u32, UserBudget>>,
}

impl UserLimiter {
    fn new(limits: &AuditLimits) -> Self {
        Self {
            rate: limits.user_rate_bytes as f64,
            burst: limits.user_burst_bytes as f64,
            users: Mutex::default(),
        }
    }

    /// Whether `uid` may add an event of `bytes` now; if not, it is counted
    /// for the next report instead.
    fn admit(&self, uid: u32, bytes: u64, event: &AuditEvent) -> bool {
        let now = Instant::now();
        let (rate, burst) = (self.rate, self.burst);
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if users.len() >= MAX_TRACKED_USERS && !users.contains_key(&uid) {
            users.retain(|_, budget| {
                let refilled =
                    budget.tokens + now.duration_since(budget.refilled).as_secs_f64() * rate;
                budget.over.is_some() || refilled < burst
            });
        }
        let budget = users.entry(uid).or_insert(UserBudget {
            tokens: burst,
            refilled: now,
            over: None,
        });
        let elapsed = now.duration_since(budget.refilled).as_secs_f64();
        budget.tokens = (budget.tokens + elapsed * rate).min(burst);
        budget.refilled = now;
        // A record larger than the whole burst still goes in when the
        // budget is full, leaving it in debt.
        if budget.tokens >= (bytes as f64).min(burst) {
            budget.tokens -= bytes as f64;
            return true;
        }
        let over = budget.over.get_or_insert_with(|| OverBudget {
            since: jiff::Timestamp::now(),
            count: 0,
            bytes: 0,
            kinds: BTreeMap::new(),
            user: None,
        });
        over.count += 1;
        over.bytes += bytes;
        if over.user.is_none() {
            over.user = event.user.clone();
        }
        let kind = match &event.decision {
            Some(decision) => format!("{}:{decision}", event.event),
            None => event.event.clone(),
        };
        if over.kinds.len() < 64 || over.kinds.contains_key(&kind) {
            *over.kinds.entry(kind).or_default() += 1;
        }
        false
    }

    /// One `audit_rate_limited` record per user with records counted
    /// since the last call.
    fn reports(&self) -> Vec<AuditEvent> {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let now = jiff::Timestamp::now();
        users
            .iter_mut()
            .filter_map(|(uid, budget)| Some((*uid, budget.over.take()?)))
            .map(|(uid, over)| {
                let kinds: serde_json::Map<String, serde_json::Value> = over
                    .kinds
                    .into_iter()
                    .map(|(kind, n)| (kind, n.into()))
                    .collect();
                let mut event = AuditEvent::new(AUDIT_RATE_LIMITED)
                    .with_detail("count", over.count)
                    .with_detail("bytes", over.bytes)
                    .with_detail("kinds", kinds)
                    .with_detail("since", over.since.to_string())
                    .with_detail("until", now.to_string());
                if uid == UNKNOWN_USER {
                    event.reason = Some(format!(
                        "{} exec records of processes gone before they were read (user unknown; {} bytes) past their shared audit budget of {} KiB/s were counted, not written",
                        over.count,
                        over.bytes,
                        self.rate as u64 / 1024
                    ));
                    return event.with_detail("user_unknown", true);
                }
                event.uid = Some(uid);
                event.user = over.user;
                event.reason = Some(format!(
                    "{} records of uid {uid} ({} bytes) past its audit budget of {} KiB/s were counted, not written",
                    over.count,
                    over.bytes,
                    self.rate as u64 / 1024
                ));
                event
            })
            .collect()
    }
}

/// Hands events to the audit thread. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct AuditSink {
    tx: Sender<Message>,
    dropped: Arc<AtomicU64>,
    queued_bytes: Arc<AtomicU64>,
    limiter: Arc<UserLimiter>,
}

impl AuditSink {
    /// Queues an event, cut to size; when the queue is full the event is
    /// counted as dropped and reported in the next batch. A user's event
    /// past their budget is counted for an `audit_rate_limited` record.
    pub fn send(&self, mut event: AuditEvent) {
        event.bound();
        let bytes = event.approx_bytes() as u64;
        let budget = match event.uid {
            Some(0) => None,
            Some(uid) => Some(uid),
            None if event.event == EventKind::EXEC => Some(UNKNOWN_USER),
            None => None,
        };
        if let Some(uid) = budget
            && !self.limiter.admit(uid, bytes, &event)
        {
            return;
        }
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if queued.saturating_add(bytes) > CHANNEL_MAX_BYTES
            || self
                .tx
                .try_send(Message::Event(Box::new(event), bytes))
                .is_err()
        {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
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

    /// Bytes of events waiting for the audit thread now.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Relaxed)
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
        limits: AuditLimits,
        last_seq: Arc<AtomicU64>,
        device_id: String,
    ) -> std::io::Result<(AuditWriter, AuditSink)> {
        let (tx, rx) = bounded(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let queued_bytes = Arc::new(AtomicU64::new(0));
        let limiter = Arc::new(UserLimiter::new(&limits));
        // Each retention deletion is recorded in the chain before it
        // happens ([`WriterState::retention`]).
        let mut log = log;
        log.set_caller_retention(true);
        let unclean_stop = previous_run_unclean(&store);
        let mut state = WriterState {
            store,
            log,
            chain,
            outbox_max_bytes: limits.outbox_max_bytes,
            dropped: dropped.clone(),
            dropped_reported: 0,
            queued_bytes: queued_bytes.clone(),
            limiter: limiter.clone(),
            last_report: Instant::now(),
            last_seq,
            device_id,
            unified_log: UnifiedLog::audit(),
            unwritten: Vec::new(),
            lost_unwritable: 0,
            failing: None,
            in_retention: false,
            retention_checked: None,
            flushing: false,
            unclean_stop,
        };
        let handle = std::thread::Builder::new()
            .name("epm-audit".into())
            .spawn(move || {
                yield_to_the_exec_path();
                state.run(&rx)
            })?;
        Ok((
            AuditWriter {
                tx: tx.clone(),
                handle,
            },
            AuditSink {
                tx,
                dropped,
                queued_bytes,
                limiter,
            },
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
    /// Shared with the sinks: what the channel holds.
    queued_bytes: Arc<AtomicU64>,
    limiter: Arc<UserLimiter>,
    /// When the limiter's counts were last written.
    last_report: Instant,
    last_seq: Arc<AtomicU64>,
    /// Every record names its device, whoever built the event.
    device_id: String,
    /// A copy of each record for the system's log (macOS; else a no-op).
    unified_log: UnifiedLog,
    /// Events of batches that neither the store nor the log took (a full
    /// disk): unsealed again, written first by the next batch.
    unwritten: Vec<AuditEvent>,
    /// Events past [`MAX_UNWRITTEN`] while writes failed, not yet reported.
    lost_unwritable: u64,
    /// Writes are failing (or failed since the last report).
    failing: Option<Failing>,
    /// A retention record is being written (no second one for it).
    in_retention: bool,
    /// When retention was last looked at, and the log's rotations then:
    /// looking lists the log's directory and stats its files, which every
    /// batch (50 a second under an exec loop) need not do.
    retention_checked: Option<(Instant, u64)>,
    /// The batch being written answers a flush: retention is looked at
    /// whatever the time, so a flush sees it done.
    flushing: bool,
    /// The previous run ended without a stop record: said once, after the
    /// start records.
    unclean_stop: Option<AuditEvent>,
}

/// An `audit_dropped` record when the chain's last record is not a clean
/// stop (`daemon_stopped`, or `error` when the gate could not start): the
/// previous run was killed or crashed, and the records it still had
/// queued, not yet committed, were lost. How many cannot be known.
fn previous_run_unclean(store: &Arc<Mutex<Store>>) -> Option<AuditEvent> {
    let store = store.lock().ok()?;
    let (seq, _) = store.last_audit().ok()??;
    let last = store.audit_since(seq.saturating_sub(1), 1).ok()?;
    let record = epm_audit::AuditRecord::parse(&last.first()?.line).ok()?;
    let event = record.event.event.as_str();
    if event == EventKind::DAEMON_STOPPED || event == EventKind::ERROR {
        return None;
    }
    let mut dropped = AuditEvent::new(EventKind::AUDIT_DROPPED)
        .with_detail("count", serde_json::Value::Null)
        .with_detail("cause", "unclean stop")
        .with_detail("last_seq_before", seq);
    dropped.reason = Some(format!(
        "the previous run of epmd ended without a stop record after seq {seq} (killed, crashed or power lost): records it had not yet committed (the batch being gathered and the queue) were lost; how many is not known"
    ));
    Some(dropped)
}

/// Audit writes that failed, reported once writing works again.
struct Failing {
    since: jiff::Timestamp,
    error: String,
    store_batches: u64,
    log_batches: u64,
}

/// Puts the calling (audit) thread in `SCHED_BATCH`: it keeps its fair
/// share of the CPU (a starved writer would drop records), but waking it
/// (a batch is due) never preempts a running thread, such as the gate's
/// answering an exec. Failing that, it runs as it is.
fn yield_to_the_exec_path() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; the parameter is a struct we
        // own, which the kernel only reads.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(),
                "cannot put the audit thread in SCHED_BATCH");
        }
    }
}

impl WriterState {
    fn run(&mut self, rx: &Receiver<Message>) {
        let mut events: Vec<AuditEvent> = Vec::with_capacity(MAX_BATCH);
        let mut acks: Vec<Sender<()>> = Vec::new();
        loop {
            let mut stop = false;
            let mut bytes = 0;
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(message) => stop |= self.take(message, &mut events, &mut acks, &mut bytes),
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
            while !stop && events.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(message) => {
                        stop |= self.take(message, &mut events, &mut acks, &mut bytes);
                    }
                    Err(_) => break,
                }
            }
            self.flushing = !acks.is_empty();
            self.write(&mut events);
            self.flushing = false;
            for ack in acks.drain(..) {
                let _ = ack.send(());
            }
            if stop {
                // Anything queued behind Stop is written too, a batch at a
                // time.
                loop {
                    let mut bytes = 0;
                    while events.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(message) => {
                                self.take(message, &mut events, &mut acks, &mut bytes);
                            }
                            Err(_) => break,
                        }
                    }
                    if events.is_empty() && acks.is_empty() {
                        break;
                    }
                    self.write(&mut events);
                    for ack in acks.drain(..) {
                        let _ = ack.send(());
                    }
                }
                self.write(&mut events);
                return;
            }
        }
    }

    /// Files a message, counting its bytes; true when it asks the thread
    /// to stop.
    fn take(
        &self,
        message: Message,
        events: &mut Vec<AuditEvent>,
        acks: &mut Vec<Sender<()>>,
        bytes: &mut u64,
    ) -> bool {
        match message {
            Message::Event(event, size) => {
                self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                *bytes += size;
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

    fn write(&mut self, events: &mut Vec<AuditEvent>) {
        // Each user's records counted past their budget, once a second (and
        // before a flush is answered, or at a stop).
        if self.last_report.elapsed() >= Duration::from_secs(1) || events.is_empty() {
            self.last_report = Instant::now();
            events.extend(self.limiter.reports());
        }
        let dropped = self.dropped.load(Ordering::Relaxed);
        if self.lost_unwritable > 0 {
            let count = std::mem::take(&mut self.lost_unwritable);
            let mut event = AuditEvent::new(EventKind::AUDIT_DROPPED)
                .with_detail("count", count)
                .with_detail("cause", "audit storage failing");
            event.reason = Some(format!(
                "{count} audit records were lost: neither the store nor the log took writes, and memory kept {MAX_UNWRITTEN} records at most"
            ));
            events.push(event);
        }
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
        if !self.unwritten.is_empty() {
            events.splice(0..0, std::mem::take(&mut self.unwritten));
        }
        if !events.is_empty()
            && let Some(event) = self.unclean_stop.take()
        {
            events.push(event);
        }
        if events.is_empty() {
            return;
        }
        match self.log.check_live() {
            Ok(true) => {
                let mut event = AuditEvent::new(EventKind::AUDIT_LOG_REPLACED);
                event.reason = Some(format!(
                    "{} was deleted, renamed or replaced while epmd wrote it; the records it held are written again from the store",
                    self.log.dir().join(epm_audit::LIVE_FILE).display()
                ));
                tracing::error!(
                    "the audit log was deleted or replaced under epmd; writing its records again from the store"
                );
                events.insert(0, event);
            }
            Ok(false) => {}
            Err(error) => tracing::error!(%error, "cannot check the audit log"),
        }
        let chain_before = self.chain.clone();
        let now = jiff::Timestamp::now();
        let mut uids = Vec::with_capacity(events.len());
        let sealed: Vec<SealedRecord> = events
            .drain(..)
            .map(|mut e| {
                e.device_id.get_or_insert_with(|| self.device_id.clone());
                // Records made here (counts, drops) are bounded too.
                e.bound();
                // The daemon's own reports of a user's flood are pruned
                // last, with the daemon's records, not first with theirs.
                let own = e.event == AUDIT_RATE_LIMITED || e.event == EventKind::AUDIT_DROPPED;
                uids.push(if own { None } else { e.uid });
                self.chain.seal(e, now)
            })
            .collect();
        let outbox: Vec<OutboxRecord> = sealed
            .iter()
            .zip(uids)
            .map(|(r, uid)| OutboxRecord {
                seq: r.seq,
                hash: r.hash.clone(),
                line: r.line.clone(),
                uid,
            })
            .collect();
        // The outbox first: it is what a restart continues from.
        let stored = match self.store.lock() {
            Ok(mut store) => store.append_audit(&outbox).map_err(|e| e.to_string()),
            Err(_) => Err("store lock poisoned".to_owned()),
        };
        if let Err(error) = &stored {
            tracing::error!(%error, "cannot commit audit records to the store");
        } else if let Some(last) = sealed.last() {
            // Durable now: said before the log shows them, so whoever reads
            // a record in the log finds the status at or past it.
            self.last_seq.store(last.seq, Ordering::Relaxed);
        }
        let first = sealed.first().map_or(0, |r| r.seq);
        // A batch whose log write failed before left a gap: fill it from the
        // store first, or this batch would land after a hole.
        let logged = self
            .fill_log(first)
            .and_then(|()| self.log.append(&sealed).map_err(|e| e.to_string()));
        if let Err(error) = &logged {
            tracing::error!(%error, "cannot append to the audit log");
        }
        if let (Err(store_error), Err(_)) = (&stored, &logged) {
            // Nowhere durable: undo the seal and keep the events for the
            // next batch, so the chain has no hole and nothing is lost
            // unless memory runs out of room too.
            self.chain = chain_before;
            let mut events: Vec<AuditEvent> = sealed
                .iter()
                .filter_map(|r| epm_audit::AuditRecord::parse(&r.line).ok())
                .map(|r| r.event)
                .collect();
            if events.len() > MAX_UNWRITTEN {
                self.lost_unwritable += (events.len() - MAX_UNWRITTEN) as u64;
                events.truncate(MAX_UNWRITTEN);
            }
            self.unwritten = events;
            self.note_failure(store_error, true, true);
            return;
        }
        if let Err(error) = &stored {
            self.note_failure(error, true, false);
        }
        if let Err(error) = &logged {
            self.note_failure(error, false, true);
        }
        for record in &sealed {
            self.unified_log.record(&record.line);
        }
        if let Some(last) = sealed.last() {
            self.last_seq.store(last.seq, Ordering::Relaxed);
        }
        if stored.is_ok()
            && logged.is_ok()
            && let Some(failing) = self.failing.take()
        {
            let mut event = AuditEvent::new(EventKind::ERROR)
                .with_detail("since", failing.since.to_string())
                .with_detail("store_batches_failed", failing.store_batches)
                .with_detail("log_batches_failed", failing.log_batches);
            event.reason = Some(format!(
                "audit writes failed from {} until now ({}): batches the store refused are in the log only; batches the log refused were written to it again from the store; batches both refused were kept in memory and written now",
                failing.since, failing.error
            ));
            self.write(&mut vec![event]);
        }
        if logged.is_ok() {
            self.retention();
        }
        self.prune();
    }

    fn note_failure(&mut self, error: &str, store: bool, log: bool) {
        let failing = self.failing.get_or_insert_with(|| Failing {
            since: jiff::Timestamp::now(),
            error: error.to_owned(),
            store_batches: 0,
            log_batches: 0,
        });
        failing.store_batches += u64::from(store);
        failing.log_batches += u64::from(log);
    }

    /// Writes to the log, from the store's outbox, the records before
    /// `before` that it lacks (a batch whose log write failed, or a live
    /// file deleted under the writer). Records the outbox no longer has
    /// cannot be written again; the log then has a hole `verify` reports.
    fn fill_log(&mut self, before: u64) -> Result<(), String> {
        loop {
            let have = self.log.last_seq().unwrap_or(0);
            if have.saturating_add(1) >= before {
                return Ok(());
            }
            let missing = match self.store.lock() {
                Ok(store) => store.audit_since(have, 1000).map_err(|e| e.to_string())?,
                Err(_) => return Err("store lock poisoned".to_owned()),
            };
            let missing: Vec<SealedRecord> = missing
                .into_iter()
                .filter(|r| r.seq < before)
                .map(|r| SealedRecord {
                    seq: r.seq,
                    hash: r.hash,
                    line: r.line,
                })
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            self.log.append(&missing).map_err(|e| e.to_string())?;
            tracing::warn!(
                records = missing.len(),
                "wrote audit records the log lacked again from the store"
            );
        }
    }

    /// Retention of rotated files, recorded in the chain before the files
    /// go: `verify` accepts a log starting after seq 1 only as far as such
    /// a record says. If the record cannot be written, nothing is deleted.
    fn retention(&mut self) {
        if self.in_retention {
            return;
        }
        let rotations = self.log.rotations();
        if let Some((at, seen)) = self.retention_checked
            && seen == rotations
            && !self.flushing
            && at.elapsed() < RETENTION_EVERY
        {
            return;
        }
        self.retention_checked = Some((Instant::now(), rotations));
        let Some(plan) = self.log.retention_due() else {
            return;
        };
        let names: Vec<String> = plan
            .files
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let mut event = AuditEvent::new(EventKind::AUDIT_RETENTION)
            .with_detail("first_kept_seq", plan.first_kept_seq)
            .with_detail("files", names.clone());
        event.reason = Some(format!(
            "retention deletes {} rotated audit files; the log keeps seq {} on",
            names.len(),
            plan.first_kept_seq
        ));
        self.in_retention = true;
        let before = self.log.last_seq();
        self.write(&mut vec![event]);
        self.in_retention = false;
        if self.log.last_seq() > before {
            self.log.apply_retention(&plan);
        }
    }

    /// Keeps the outbox within its budget, checked after every batch (one
    /// read of a counter); once over it, prunes to seven eighths of it, so
    /// the next batches do not prune again at once.
    fn prune(&mut self) {
        let pruned = match self.store.lock() {
            Ok(mut store) => match store.outbox_bytes() {
                Ok(bytes) if bytes > self.outbox_max_bytes => {
                    store.prune_audit(self.outbox_max_bytes - self.outbox_max_bytes / 8)
                }
                Ok(_) => return,
                Err(error) => Err(error),
            },
            Err(_) => return,
        };
        match pruned {
            Ok(pruned) if pruned.not_uploaded > 0 => {
                let by_uid: serde_json::Map<String, serde_json::Value> = pruned
                    .not_uploaded_by_uid
                    .iter()
                    .map(|(uid, n)| {
                        let key = uid.map_or_else(|| "daemon".to_owned(), |u| u.to_string());
                        (key, (*n).into())
                    })
                    .collect();
                let mut event = AuditEvent::new(EventKind::AUDIT_DROPPED)
                    .with_detail("count", pruned.not_uploaded)
                    .with_detail("cause", "outbox over its disk budget")
                    .with_detail("by_uid", by_uid);
                event.reason = Some(format!(
                    "{} audit records were dropped from the outbox before upload: it exceeded its disk budget (those of the users with the most records waiting go first; see by_uid)",
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
/// policy says now (it ran), marked `answered_by: es_cache` (or
/// `kernel_cache`, Linux); when the policy has changed under the cache,
/// the reason says so.
pub fn observed_event(
    decider: &Decider,
    outcome: &Outcome,
    by: crate::gate::AnsweredBy,
) -> AuditEvent {
    let mut event = exec_event(decider, outcome).with_detail("answered_by", by.as_str());
    if outcome.enforced != Enforced::Allow {
        event.reason = Some(format!(
            "allowed from {} before a policy change reached it; the policy in force says: {}",
            by.what(),
            event.reason.unwrap_or_default()
        ));
        event.decision = Some(Enforced::Allow.as_str().to_owned());
    }
    event
}

/// The audit event for an exec the platform let run from its cache, when
/// it was not decided again (its file is gone, or the workers are busy).
pub fn observed_fail_event(
    decider: &Decider,
    facts: &ExecFacts,
    why: &str,
    by: crate::gate::AnsweredBy,
) -> AuditEvent {
    let mut event =
        fail_event(decider, facts, Verdict::Allow, why).with_detail("answered_by", by.as_str());
    event.reason = Some(format!(
        "allowed from {}; not decided again: {why}",
        by.what()
    ));
    event
}

/// What every record of an exec answered per fail mode says: the
/// verdict, why, and the daemon's mode, device and policy.
fn fail_mode_event(decider: &Decider, verdict: Verdict, pid: u32, why: &str) -> AuditEvent {
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
    event.pid = Some(pid);
    event.device_id = Some(decider.device_id().to_owned());
    event.policy_version = Some(decider.policy().engine.version());
    event.with_detail("fail_mode", true)
}

/// The audit event for an exec answered per fail mode.
pub fn fail_event(decider: &Decider, facts: &ExecFacts, verdict: Verdict, why: &str) -> AuditEvent {
    let mut event = fail_mode_event(decider, verdict, facts.pid, why);
    event.ppid = Some(facts.ppid);
    event.uid = Some(facts.uid);
    event.user = decider.names().user(facts.uid).map(|n| n.to_string());
    event.path = Some(facts.path.clone());
    if !facts.path_origin.trusted() {
        event = event.with_detail("path_origin", facts.path_origin.as_str());
    }
    event
}

/// The audit event of an exec the Linux gate answered without a decision
/// because it could not identify the file (its `fstat` failed): what
/// little is known of it, so the exec is not missing from the log.
#[cfg(target_os = "linux")]
pub fn unidentified_event(
    decider: &Decider,
    exec: &crate::gate::fanotify::UnidentifiedExec,
) -> AuditEvent {
    let mut event = fail_mode_event(
        decider,
        exec.verdict,
        exec.pid,
        &format!("cannot identify the file being executed: {}", exec.error),
    );
    if !exec.path.is_empty() {
        event.path = Some(exec.path.clone());
    }
    event
}
