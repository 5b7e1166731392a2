//! The macOS exec gate: an Endpoint Security client subscribed to
//! `AUTH_EXEC`, to `NOTIFY_EXEC` to audit the execs Endpoint Security let
//! run from its cache, and to `NOTIFY_EXIT` to follow processes.
//!
//! Thin by design, like the fanotify gate: the handler copies the message
//! into the plain structs of [`es_map`] (which map it to [`ExecFacts`] and
//! are tested on Linux), registers it with the deadline guard, and hands a
//! [`PendingExec`] on. It never prompts and does no IO: the decision
//! worker opens the executable to hash it, and the handler's only kernel
//! call is `proc_pidpath` for a parent the gate has not seen exec, when
//! the policy needs parent paths.
//!
//! # Threads
//! Endpoint Security calls the handler on its own dispatch queue, while
//! [`ExecGate::run`] hands execs to its sink on the daemon's thread, so
//! the handler queues them (bounded; a full queue is answered per
//! `fail_mode` at once). Workers answer with `es_respond_auth_result` from
//! their own threads, which Endpoint Security allows; the deadline guard
//! (see [`super::es_guard`]) answers per `fail_mode` before the deadline
//! if they have not, and [`AnswerOnce`] makes sure only one of them does.
//!
//! # Cache
//! Only an allow the policy decided may be cached, and only while the
//! policy allows it ([`EsCache`]); the daemon calls
//! [`EsCache::policy_changed`] on every policy change, which empties the
//! cache. Denies are never cached, so every refused attempt is seen and
//! audited. An exec allowed from the cache is never asked about, but it
//! is notified: a `NOTIFY_EXEC` the gate was not asked about first
//! ([`AskedExecs`]) goes on as [`PendingExec::observed`], decided again by
//! a worker for the audit only, so every exec is audited.
//!
//! # Lifetime
//! The client is created and deleted on the daemon's thread (Apple asks
//! that `es_delete_client` run on the thread that created the client).
//! Dropping the gate stops new messages, answers everything still waiting
//! per `fail_mode`, then deletes the client; answers after that are
//! dropped, never sent to a deleted client.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use block2::RcBlock;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use endpoint_sec::sys::{
    self as es, es_auth_result_t, es_clear_cache_result_t, es_client_t, es_event_type_t,
    es_message_t, es_new_client_result_t, es_respond_result_t, es_return_t,
};
use endpoint_sec::{AuditToken, Event, EventExec, Message, Process};

use super::es_guard::{
    AnswerOnce, AnsweredBy, DeadlineGuard, EsCache, GuardHandle, Reply, guard_delay,
};
use super::es_map::{
    self, AskedExecs, EsExecInfo, EsFileInfo, EsProcessInfo, NewClientFailure, ProcessObserver,
    ProcessTable,
};
use super::{ExecGate, FactNeeds, GateError, PendingExec, Respond, Shutdown, Verdict};

/// Execs the handler may queue for the daemon's thread before it answers
/// new ones per `fail_mode`.
const QUEUE: usize = 4096;

/// Processes whose executable the gate remembers, for parent paths.
const PROCESS_TABLE: usize = 65_536;

/// Execs asked about and not yet notified (denied ones never are).
const ASKED_CAPACITY: usize = 16_384;

/// Assumed when a message's deadline cannot be read.
const UNKNOWN_DEADLINE: Duration = Duration::from_secs(5);

/// `PROC_PIDPATHINFO_MAXSIZE` (`<libproc.h>`): `4 * MAXPATHLEN`.
const PIDPATH_MAX: usize = 4 * 1024;

/// The Endpoint Security client, shared by everyone who answers.
#[derive(Debug)]
struct Client {
    raw: NonNull<es_client_t>,
    /// False once the client is being deleted; answers take the read lock,
    /// deletion the write lock, so no call ever reaches a deleted client.
    alive: RwLock<bool>,
}

// SAFETY: an es_client_t may be used from any thread: Apple documents
// es_respond_auth_result, es_clear_cache and es_mute_process as callable
// from any thread (responding from another queue is the documented way to
// answer asynchronously); only es_delete_client is tied to the creating
// thread, and the gate calls it from Drop on that thread. `alive` keeps
// every use before the deletion.
unsafe impl Send for Client {}
// SAFETY: as above; Client has no interior state besides the RwLock.
unsafe impl Sync for Client {}

impl Client {
    /// Runs `f` with the raw client while it is alive.
    fn with_live<T>(&self, f: impl FnOnce(*mut es_client_t) -> T) -> Option<T> {
        let alive = self.alive.read().unwrap_or_else(PoisonError::into_inner);
        alive.then(|| f(self.raw.as_ptr()))
    }

    /// Marks the client dead; waits for calls in flight.
    fn kill(&self) {
        *self.alive.write().unwrap_or_else(PoisonError::into_inner) = false;
    }

    /// Empties Endpoint Security's cache (for every client). Retries when
    /// throttled: a stale allow left behind would outlive its policy.
    fn clear_cache(&self) {
        for attempt in 0..10 {
            // SAFETY: the client is alive while with_live runs the closure.
            let result = self.with_live(|c| unsafe { es::es_clear_cache(c) });
            match result {
                None => return,
                Some(es_clear_cache_result_t::ES_CLEAR_CACHE_RESULT_SUCCESS) => return,
                Some(es_clear_cache_result_t::ES_CLEAR_CACHE_RESULT_ERR_THROTTLE)
                    if attempt < 9 =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Some(error) => {
                    tracing::error!(
                        ?error,
                        "cannot clear the Endpoint Security cache: allows cached under the previous policy may still apply"
                    );
                    return;
                }
            }
        }
    }
}

/// A message retained (`es_retain_message`) until this is dropped, so it
/// can be answered after the handler returns.
#[derive(Debug)]
struct RetainedMessage(NonNull<es_message_t>);

// SAFETY: a retained es_message_t is immutable and reference-counted by
// Endpoint Security; it may be read, answered and released on any thread.
unsafe impl Send for RetainedMessage {}
// SAFETY: as above: nothing mutates it through a shared reference.
unsafe impl Sync for RetainedMessage {}

impl RetainedMessage {
    /// # Safety
    /// `msg` must be a live message, as handed to the handler.
    unsafe fn retain(msg: NonNull<es_message_t>) -> Self {
        // SAFETY: the caller guarantees `msg` is live; retaining it keeps it
        // so until the matching release in Drop (macOS 11+).
        unsafe { es::es_retain_message(msg.as_ref()) };
        Self(msg)
    }
}

impl Drop for RetainedMessage {
    fn drop(&mut self) {
        // SAFETY: we hold one retain on this message, released exactly once here.
        unsafe { es::es_release_message(self.0.as_ref()) };
    }
}

/// Answers one message with `es_respond_auth_result`.
#[derive(Debug)]
struct EsReply {
    client: Arc<Client>,
    message: RetainedMessage,
    /// Remembered in the process table if allowed (a denied exec's new
    /// run never exists, so it would never exit and leave the table).
    run: Option<(Arc<ProcessTable>, u32, u32, Arc<str>)>,
}

impl Reply for EsReply {
    fn reply(self, verdict: Verdict, cache: bool) {
        let result = match verdict {
            Verdict::Allow => es_auth_result_t::ES_AUTH_RESULT_ALLOW,
            Verdict::Deny => es_auth_result_t::ES_AUTH_RESULT_DENY,
        };
        let message = self.message.0.as_ptr().cast_const();
        // SAFETY: the client is alive while with_live runs the closure, and
        // the message is retained by self.message, which outlives the call.
        let answered = self
            .client
            .with_live(|c| unsafe { es::es_respond_auth_result(c, message, result, cache) });
        if verdict == Verdict::Allow
            && let Some((table, pid, pidversion, path)) = &self.run
        {
            table.exec(*pid, *pidversion, path);
        }
        match answered {
            Some(es_respond_result_t::ES_RESPOND_RESULT_SUCCESS) => {}
            Some(error) => {
                tracing::error!(?error, ?verdict, "cannot answer an Endpoint Security exec");
            }
            None => tracing::debug!(?verdict, "exec answered after the client was deleted"),
        }
    }
}

/// The pipeline's side of one exec.
struct EsRespond {
    once: Arc<AnswerOnce<EsReply>>,
    cache: Arc<EsCache>,
    /// The cache epoch when the message arrived.
    epoch: u64,
}

impl Respond for EsRespond {
    fn respond(self: Box<Self>, verdict: Verdict) {
        self.once.answer(verdict, AnsweredBy::Pipeline, false);
    }

    fn respond_decided(self: Box<Self>, verdict: Verdict, cacheable: bool) {
        let once = &self.once;
        self.cache
            .answer_with(verdict, cacheable, self.epoch, |cache| {
                once.answer(verdict, AnsweredBy::Pipeline, cache)
            });
    }
}

/// What the handler block shares with the gate.
struct Handler {
    client: OnceLock<Arc<Client>>,
    queue: Sender<PendingExec>,
    guard: GuardHandle,
    cache: Arc<EsCache>,
    needs: Arc<FactNeeds>,
    processes: Arc<ProcessTable>,
    observers: RwLock<Vec<Arc<dyn ProcessObserver>>>,
    asked: AskedExecs,
    fallback: Verdict,
    own_pid: u32,
    overflows: AtomicU64,
}

impl Handler {
    fn handle(&self, msg: NonNull<es_message_t>) {
        // SAFETY: Endpoint Security hands the handler a live message.
        let message = unsafe { Message::from_raw(msg) };
        let event_type = message.event_type();
        if event_type == es_event_type_t::ES_EVENT_TYPE_AUTH_EXEC {
            self.on_exec(msg, &message);
        } else if event_type == es_event_type_t::ES_EVENT_TYPE_NOTIFY_EXEC {
            self.on_executed(&message);
        } else if event_type == es_event_type_t::ES_EVENT_TYPE_NOTIFY_EXIT {
            let token = message.process().audit_token();
            let (pid, pidversion) = token_ids(&token);
            let observers = self
                .observers
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            for observer in observers.iter() {
                observer.exited(pid, pidversion);
            }
        }
    }

    fn on_exec(&self, msg: NonNull<es_message_t>, message: &Message) {
        let Some(client) = self.client.get() else {
            return; // Not subscribed before the client is set: cannot happen.
        };
        let received = Instant::now();
        let epoch = self.cache.epoch();
        // SAFETY: msg is the live message handed to the handler.
        let retained = unsafe { RetainedMessage::retain(msg) };
        let Some(Event::AuthExec(exec)) = message.event() else {
            let reply = EsReply {
                client: client.clone(),
                message: retained,
                run: None,
            };
            reply.reply(self.fallback, false);
            return;
        };
        let mut info = read_exec(&exec);
        self.asked.asked(info.target.pid, info.target.pidversion);
        let once = Arc::new(AnswerOnce::new(
            EsReply {
                client: client.clone(),
                message: retained,
                run: Some((
                    self.processes.clone(),
                    info.target.pid,
                    info.target.pidversion,
                    Arc::from(info.target.executable.path.as_str()),
                )),
            },
            self.fallback,
        ));
        // Registered with the guard before anything else can go wrong, so
        // this message is answered before its deadline whatever follows.
        let remaining = message
            .deadline()
            .map(|deadline| deadline.saturating_duration_since(received))
            .unwrap_or(UNKNOWN_DEADLINE);
        self.guard
            .register(received + guard_delay(remaining), once.clone());
        if info.target.pid == self.own_pid {
            // Our own re-exec: waiting on ourselves would hang.
            once.answer(Verdict::Allow, AnsweredBy::Gate, false);
            return;
        }
        info.parent_path = self.parent_path(&info.target);
        let pending = PendingExec::new(
            es_map::exec_facts(&info),
            Box::new(EsRespond {
                once,
                cache: self.cache.clone(),
                epoch,
            }),
            self.fallback,
        );
        match self.queue.try_send(pending) {
            Ok(()) => {}
            Err(TrySendError::Full(pending) | TrySendError::Disconnected(pending)) => {
                let overflows = self.overflows.fetch_add(1, Ordering::Relaxed) + 1;
                if overflows.is_power_of_two() {
                    tracing::warn!(overflows, verdict = ?self.fallback,
                        "the Endpoint Security gate's queue is full; execs answered per fail_mode");
                }
                pending.answer(self.fallback);
            }
        }
    }

    /// An exec has happened. One the gate was not asked about was allowed
    /// from Endpoint Security's cache: remember the process, and hand the
    /// exec on to be audited. Nothing to answer, so no deadline.
    fn on_executed(&self, message: &Message) {
        let Some(Event::NotifyExec(exec)) = message.event() else {
            return;
        };
        let mut info = read_exec(&exec);
        let (pid, pidversion) = (info.target.pid, info.target.pidversion);
        if pid == self.own_pid || self.asked.executed(pid, pidversion) {
            return;
        }
        self.processes
            .exec(pid, pidversion, &info.target.executable.path);
        info.parent_path = self.parent_path(&info.target);
        // Half the queue stays free for execs waiting for an answer: a
        // burst of cached execs (a build) must never push those into
        // fail_mode.
        let sent = self.queue.len() < QUEUE / 2
            && self
                .queue
                .try_send(PendingExec::observed(es_map::exec_facts(&info)))
                .is_ok();
        if !sent {
            let overflows = self.overflows.fetch_add(1, Ordering::Relaxed) + 1;
            if overflows.is_power_of_two() {
                tracing::warn!(
                    overflows,
                    "the Endpoint Security gate's queue is busy; an exec allowed from the cache is not audited"
                );
            }
        }
    }

    /// The parent's executable: from the execs the gate saw, else (when the
    /// policy needs it) from the kernel by pid.
    fn parent_path(&self, target: &EsProcessInfo) -> Option<String> {
        if let Some(pidversion) = target.parent_pidversion
            && let Some(path) = self.processes.path(target.ppid, pidversion)
        {
            return Some(path.to_string());
        }
        if !self.needs.parent_path() || target.ppid == 0 {
            return None;
        }
        // The parent started before the daemon (or past the table's size).
        // Its pid could in principle be reused by now; it is alive while
        // its child waits in exec unless it exits meanwhile.
        pid_path(target.ppid)
    }
}

/// The executable of a running process (`proc_pidpath`).
fn pid_path(pid: u32) -> Option<String> {
    let pid = libc::c_int::try_from(pid).ok()?;
    let mut buf = vec![0u8; PIDPATH_MAX];
    // SAFETY: proc_pidpath writes at most `buf.len()` bytes into our buffer.
    let n = unsafe {
        libc::proc_pidpath(
            pid,
            buf.as_mut_ptr().cast(),
            u32::try_from(buf.len()).unwrap_or(0),
        )
    };
    let n = usize::try_from(n).ok().filter(|n| *n > 0)?;
    Some(String::from_utf8_lossy(buf.get(..n)?).into_owned())
}

fn token_ids(token: &AuditToken) -> (u32, u32) {
    (
        u32::try_from(token.pid()).unwrap_or(0),
        // A pid version is a counter; keep its bits.
        token.pidversion() as u32,
    )
}

fn lossy(s: &OsStr) -> String {
    String::from_utf8_lossy(s.as_bytes()).into_owned()
}

fn read_file(file: &endpoint_sec::File<'_>) -> EsFileInfo {
    let stat = file.stat();
    // As std's MetadataExt does on macOS, so the worker's check of the
    // file it opens compares like with like.
    // (time_t and the nanoseconds are i64 on both Apple targets.)
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    EsFileInfo {
        path: lossy(file.path()),
        path_truncated: file.path_truncated(),
        dev: stat.st_dev as u64,
        ino: stat.st_ino,
        size: stat.st_size as u64,
        mtime_ns: ns(stat.st_mtime, stat.st_mtime_nsec),
        ctime_ns: ns(stat.st_ctime, stat.st_ctime_nsec),
    }
}

fn read_process(process: &Process<'_>) -> EsProcessInfo {
    let token = process.audit_token();
    let (pid, pidversion) = token_ids(&token);
    let parent = process.parent_audit_token().map(|t| token_ids(&t));
    EsProcessInfo {
        executable: read_file(&process.executable()),
        cdhash: process.cdhash(),
        codesigning_flags: process.codesigning_flags(),
        team_id: lossy(process.team_id()),
        signing_id: lossy(process.signing_id()),
        is_platform_binary: process.is_platform_binary(),
        pid,
        pidversion,
        ruid: token.ruid(),
        euid: token.euid(),
        rgid: token.rgid(),
        egid: token.egid(),
        auid: token.auid(),
        ppid: parent.map_or_else(|| u32::try_from(process.ppid()).unwrap_or(0), |p| p.0),
        parent_pidversion: parent.map(|p| p.1),
    }
}

fn read_exec(exec: &EventExec<'_>) -> EsExecInfo {
    EsExecInfo {
        target: read_process(&exec.target()),
        argv: exec.args().map(lossy).collect(),
        parent_path: None,
    }
}

/// The Endpoint Security gate.
pub struct EndpointSecurityGate {
    client: Arc<Client>,
    handler: Arc<Handler>,
    execs: Receiver<PendingExec>,
    guard: Option<DeadlineGuard>,
    /// Kept alive with the client (Endpoint Security holds its own reference).
    _block: RcBlock<dyn Fn(NonNull<es_client_t>, NonNull<es_message_t>)>,
}

impl std::fmt::Debug for EndpointSecurityGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSecurityGate")
            .field("client", &self.client)
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

fn returned(what: &str, result: es_return_t) -> Result<(), GateError> {
    if result == es_return_t::ES_RETURN_SUCCESS {
        Ok(())
    } else {
        Err(GateError::Unavailable(format!("{what} failed")))
    }
}

impl EndpointSecurityGate {
    /// Connects to Endpoint Security and mutes the daemon itself. Nothing
    /// is gated until [`ExecGate::run`] subscribes. `fallback` answers
    /// per `fail_mode`; `needs` says which costly facts the policy uses.
    pub fn open(fallback: Verdict, needs: Arc<FactNeeds>) -> Result<Self, GateError> {
        let (guard, guard_handle) = DeadlineGuard::start().map_err(|source| GateError::Io {
            what: "cannot start the deadline guard".into(),
            source,
        })?;
        let (queue, execs) = crossbeam_channel::bounded(QUEUE);
        let cache_client: Arc<OnceLock<Arc<Client>>> = Arc::new(OnceLock::new());
        let for_clear = cache_client.clone();
        let cache = Arc::new(EsCache::new(Box::new(move || {
            if let Some(client) = for_clear.get() {
                client.clear_cache();
            }
        })));
        let processes = Arc::new(ProcessTable::new(PROCESS_TABLE));
        let handler = Arc::new(Handler {
            client: OnceLock::new(),
            queue,
            guard: guard_handle,
            cache,
            needs,
            processes: processes.clone(),
            observers: RwLock::new(vec![processes as Arc<dyn ProcessObserver>]),
            asked: AskedExecs::new(ASKED_CAPACITY),
            fallback,
            own_pid: std::process::id(),
            overflows: AtomicU64::new(0),
        });
        let for_block = handler.clone();
        let block: RcBlock<dyn Fn(NonNull<es_client_t>, NonNull<es_message_t>)> = RcBlock::new(
            move |_client: NonNull<es_client_t>, msg: NonNull<es_message_t>| {
                // A panic must not unwind into Endpoint Security; the guard
                // answers a message whose handling panicked.
                if catch_unwind(AssertUnwindSafe(|| for_block.handle(msg))).is_err() {
                    tracing::error!("the Endpoint Security handler panicked");
                }
            },
        );
        let mut raw: *mut es_client_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out pointer; the block is retained by
        // Endpoint Security (Block_copy of an RcBlock takes a reference) and
        // we keep ours until the client is deleted.
        let result = unsafe { es::es_new_client(&raw mut raw, &block) };
        if result != es_new_client_result_t::ES_NEW_CLIENT_RESULT_SUCCESS {
            return Err(GateError::Unavailable(es_map::new_client_error_message(
                NewClientFailure::from_code(i64::from(result.0)),
            )));
        }
        let Some(raw) = NonNull::new(raw) else {
            return Err(GateError::Unavailable(es_map::new_client_error_message(
                NewClientFailure::Internal,
            )));
        };
        let client = Arc::new(Client {
            raw,
            alive: RwLock::new(true),
        });
        let _ = handler.client.set(client.clone());
        let _ = cache_client.set(client.clone());
        let gate = Self {
            client,
            handler,
            execs,
            guard: Some(guard),
            _block: block,
        };
        gate.mute_self();
        Ok(gate)
    }

    /// Mutes the daemon's own process: its own execs and exits are never
    /// reported, so it can never wait on itself.
    fn mute_self(&self) {
        let token = match AuditToken::from_pid(self.handler.own_pid as libc::pid_t) {
            Ok(token) => token,
            Err(error) => {
                tracing::warn!(error, "cannot get our own audit token; epmd is not muted");
                return;
            }
        };
        // SAFETY: the client is alive while with_live runs the closure; the
        // token is a valid audit_token_t we own for the call.
        let result = self
            .client
            .with_live(|c| unsafe { es::es_mute_process(c, token.raw_token()) });
        if result != Some(es_return_t::ES_RETURN_SUCCESS) {
            tracing::warn!("es_mute_process failed; epmd's own execs are gated too");
        }
    }

    /// The cache switch the daemon drives on policy changes.
    pub fn cache(&self) -> Arc<EsCache> {
        self.handler.cache.clone()
    }

    /// Adds something told of every process exit (elevated process
    /// tracking). Called on Endpoint Security's queue: it must not block.
    pub fn add_process_observer(&self, observer: Arc<dyn ProcessObserver>) {
        self.handler
            .observers
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(observer);
    }

    /// How many execs the deadline guard answered.
    pub fn guard_answers(&self) -> u64 {
        self.guard.as_ref().map_or(0, DeadlineGuard::expired)
    }

    fn subscribe(&self, events: &[es_event_type_t]) -> Result<(), GateError> {
        let count = u32::try_from(events.len()).unwrap_or(0);
        // SAFETY: the client is alive while with_live runs the closure;
        // `events` points at `count` event types.
        let result = self
            .client
            .with_live(|c| unsafe { es::es_subscribe(c, events.as_ptr(), count) })
            .unwrap_or(es_return_t::ES_RETURN_ERROR);
        returned("es_subscribe", result)
    }
}

impl ExecGate for EndpointSecurityGate {
    fn run(
        &mut self,
        sink: &mut dyn FnMut(PendingExec),
        shutdown: &Shutdown,
    ) -> Result<(), GateError> {
        self.subscribe(&[
            es_event_type_t::ES_EVENT_TYPE_AUTH_EXEC,
            es_event_type_t::ES_EVENT_TYPE_NOTIFY_EXEC,
            es_event_type_t::ES_EVENT_TYPE_NOTIFY_EXIT,
        ])?;
        while !shutdown.is_requested() {
            match self.execs.recv_timeout(Duration::from_millis(200)) {
                Ok(pending) => sink(pending),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(GateError::Protocol(
                        "the Endpoint Security handler went away".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Drop for EndpointSecurityGate {
    fn drop(&mut self) {
        // No new messages.
        // SAFETY: the client is alive while with_live runs the closure.
        let _ = self
            .client
            .with_live(|c| unsafe { es::es_unsubscribe_all(c) });
        // Execs queued for the sink: per fail_mode.
        while let Ok(pending) = self.execs.try_recv() {
            pending.answer(self.handler.fallback);
        }
        // Execs the pipeline still holds: per fail_mode, now, by the guard.
        if let Some(guard) = self.guard.take() {
            guard.stop();
        }
        self.handler.cache.detach();
        self.client.kill();
        // SAFETY: on the thread that created the client (the daemon's),
        // once; `alive` is false, so no other call reaches it afterwards.
        let result = unsafe { es::es_delete_client(self.client.raw.as_ptr()) };
        if result != es_return_t::ES_RETURN_SUCCESS {
            tracing::warn!("es_delete_client failed");
        }
    }
}
