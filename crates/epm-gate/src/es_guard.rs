//! The Endpoint Security gate's answering rules, kept free of Apple APIs so
//! they are tested on Linux: exactly one answer per message, a deadline
//! guard that answers per `fail_mode` before Endpoint Security's deadline,
//! and when an allow may go into Endpoint Security's cache.
//!
//! # Why a guard
//! Endpoint Security kills a client that leaves an `AUTH` message
//! unanswered past its deadline (and the exec is then denied by the
//! kernel). The pipeline answers almost every exec in microseconds, but a
//! slow hash (a huge binary on a slow disk) or a full queue must never cost
//! the daemon its client. So every message is also registered with
//! [`DeadlineGuard`], which answers per `fail_mode` at the message's
//! deadline minus a margin ([`guard_delay`]), unless the pipeline answered
//! first. [`AnswerOnce`] arbitrates: whoever claims it first answers, the
//! other does nothing.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::Verdict;

/// The guard answers at least this long before the deadline.
pub const MIN_MARGIN: Duration = Duration::from_secs(1);
/// The guard never answers more than this long before the deadline.
pub const MAX_MARGIN: Duration = Duration::from_secs(5);

/// How long before the deadline the guard answers: a tenth of the time the
/// message allows, clamped to [`MIN_MARGIN`]..=[`MAX_MARGIN`]. Deadlines
/// vary per message and per macOS release (tens of seconds for an exec), so
/// a fixed margin would be either too tight for short ones or waste most of
/// long ones.
pub fn guard_margin(deadline_remaining: Duration) -> Duration {
    (deadline_remaining / 10).clamp(MIN_MARGIN, MAX_MARGIN)
}

/// How long after receipt the guard answers a message whose deadline is
/// `deadline_remaining` away: the deadline minus [`guard_margin`], or at
/// once when less than the margin is left.
pub fn guard_delay(deadline_remaining: Duration) -> Duration {
    deadline_remaining.saturating_sub(guard_margin(deadline_remaining))
}

/// Who answered a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    /// The decision pipeline (from the policy, or per `fail_mode` when it
    /// could not decide).
    Pipeline,
    /// The deadline guard, per `fail_mode`.
    Guard,
    /// The gate itself, before the pipeline saw it (its own queue full,
    /// shutting down, a message it cannot read).
    Gate,
}

impl AnsweredBy {
    fn code(self) -> u8 {
        match self {
            AnsweredBy::Pipeline => 1,
            AnsweredBy::Guard => 2,
            AnsweredBy::Gate => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(AnsweredBy::Pipeline),
            2 => Some(AnsweredBy::Guard),
            3 => Some(AnsweredBy::Gate),
            _ => None,
        }
    }
}

/// The platform call that answers one message (`es_respond_auth_result`).
pub trait Reply: Send {
    /// Answers; `cache` asks Endpoint Security to remember the answer.
    fn reply(self, verdict: Verdict, cache: bool);
}

/// One message's answer, given at most once by whoever claims it first.
///
/// The claim is one atomic swap, so the pipeline and the guard can race
/// freely; the loser's call returns `false` and does nothing.
#[derive(Debug)]
pub struct AnswerOnce<R> {
    answered: AtomicU8,
    reply: Mutex<Option<R>>,
    /// The guard's verdict (`fail_mode`).
    fallback: Verdict,
}

impl<R: Reply> AnswerOnce<R> {
    /// A message not answered yet; the guard answers it with `fallback`.
    pub fn new(reply: R, fallback: Verdict) -> Self {
        Self {
            answered: AtomicU8::new(0),
            reply: Mutex::new(Some(reply)),
            fallback,
        }
    }

    /// Answers unless someone already did; `true` when this call answered.
    pub fn answer(&self, verdict: Verdict, by: AnsweredBy, cache: bool) -> bool {
        if self
            .answered
            .compare_exchange(0, by.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        // Only the claimant gets here, so the lock is never contended; a
        // poisoned lock still holds the reply.
        let reply = self
            .reply
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(reply) = reply {
            reply.reply(verdict, cache);
        }
        true
    }

    /// Who answered, if anyone has.
    pub fn answered_by(&self) -> Option<AnsweredBy> {
        AnsweredBy::from_code(self.answered.load(Ordering::Acquire))
    }

    /// The verdict the guard gives.
    pub fn fallback(&self) -> Verdict {
        self.fallback
    }
}

/// Something the guard answers when its time comes.
pub trait Expire: Send + Sync {
    /// Answers with the fallback verdict if nobody has; `true` if this did.
    fn expire(&self) -> bool;
    /// Whether it is answered (so the guard can forget it early).
    fn is_answered(&self) -> bool;
}

impl<R: Reply> Expire for AnswerOnce<R> {
    fn expire(&self) -> bool {
        self.answer(self.fallback, AnsweredBy::Guard, false)
    }

    fn is_answered(&self) -> bool {
        self.answered_by().is_some()
    }
}

struct Entry {
    at: Instant,
    item: Arc<dyn Expire>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so `BinaryHeap` (a max-heap) pops the earliest first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}

/// Answers registered messages per `fail_mode` when their time comes, on
/// one thread with a timer heap. [`DeadlineGuard::stop`] (or dropping it)
/// answers every message still waiting per `fail_mode` and ends the thread.
#[derive(Debug)]
pub struct DeadlineGuard {
    thread: Option<JoinHandle<()>>,
    control: Sender<Command>,
    expired: Arc<AtomicU64>,
}

enum Command {
    Register(Instant, Arc<dyn Expire>),
    Stop,
}

/// Registers messages with a [`DeadlineGuard`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct GuardHandle {
    tx: Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Register(at, _) => f.debug_tuple("Register").field(at).finish(),
            Command::Stop => f.write_str("Stop"),
        }
    }
}

impl GuardHandle {
    /// Answers `item` per its fallback at `at` unless it is answered by then.
    pub fn register(&self, at: Instant, item: Arc<dyn Expire>) {
        if let Err(e) = self.tx.send(Command::Register(at, item)) {
            // The guard thread is gone (shutting down): nobody else will
            // answer at the deadline, so answer now rather than risk it.
            if let Command::Register(_, item) = e.into_inner() {
                item.expire();
            }
        }
    }
}

/// Above this many waiting entries the heap is swept of answered ones.
const SWEEP_ABOVE: usize = 4096;

impl DeadlineGuard {
    /// Starts the guard thread.
    pub fn start() -> std::io::Result<(DeadlineGuard, GuardHandle)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let expired = Arc::new(AtomicU64::new(0));
        let counter = expired.clone();
        let thread = std::thread::Builder::new()
            .name("epm-es-guard".into())
            .spawn(move || guard_loop(&rx, &counter))?;
        Ok((
            DeadlineGuard {
                thread: Some(thread),
                control: tx.clone(),
                expired,
            },
            GuardHandle { tx },
        ))
    }

    /// How many messages the guard has answered.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// Answers every message still waiting per `fail_mode`, now, and stops
    /// the thread; later registrations are answered at once.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.control.send(Command::Stop);
            let _ = thread.join();
        }
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn guard_loop(rx: &Receiver<Command>, expired: &AtomicU64) {
    let mut heap: BinaryHeap<Entry> = BinaryHeap::new();
    let mut sweep_at = SWEEP_ABOVE;
    let expire = |entry: Entry| {
        if entry.item.expire() {
            expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                "an exec was not decided in time; answered per fail_mode before the Endpoint Security deadline"
            );
        }
    };
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|e| e.at <= now) {
            if let Some(entry) = heap.pop() {
                expire(entry);
            }
        }
        if heap.len() > sweep_at {
            heap.retain(|e| !e.item.is_answered());
            sweep_at = (heap.len() * 2).max(SWEEP_ABOVE);
        }
        let received = match heap.peek() {
            Some(next) => rx.recv_timeout(next.at.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Command::Register(at, item)) => heap.push(Entry { at, item }),
            Err(RecvTimeoutError::Timeout) => {}
            Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => {
                // What is still waiting, then what was sent meanwhile; a
                // registration after this fails and is answered by its
                // sender, and the pipeline answers its own copy anyway.
                heap.drain().for_each(expire);
                while let Ok(Command::Register(_, item)) = rx.try_recv() {
                    item.expire();
                }
                return;
            }
        }
    }
}

/// When an allow may go into Endpoint Security's cache, and the epoch that
/// keeps a decision of an old policy out of it.
///
/// Endpoint Security caches an exec's answer per executable (and the
/// executable of the process that execs), for every user: a cached allow
/// means later execs of that file are not even shown to the daemon. So an
/// allow is cached only when the policy in force decides that file the same
/// way whoever runs it and however (see the daemon's `es_cache_allowed`),
/// never a deny, never a `fail_mode` answer, and never a decision made
/// under an older policy: the epoch is taken when the message arrives, and
/// a policy change bumps it and clears the cache under the write lock, so
/// an answer either lands before the clear or is not cached.
#[derive(Default)]
pub struct EsCache {
    state: RwLock<CacheState>,
}

#[derive(Default)]
struct CacheState {
    /// Whether the policy in force allows caching allows.
    enabled: bool,
    epoch: u64,
    /// Clears Endpoint Security's cache; `None` once the client is gone.
    clear: Option<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for CacheState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheState")
            .field("enabled", &self.enabled)
            .field("epoch", &self.epoch)
            .field("clear", &self.clear.is_some())
            .finish()
    }
}

impl std::fmt::Debug for EsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("EsCache").field("state", &*state).finish()
    }
}

impl EsCache {
    /// Caching off until the policy says otherwise; `clear` empties
    /// Endpoint Security's cache.
    pub fn new(clear: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            state: RwLock::new(CacheState {
                enabled: false,
                epoch: 0,
                clear: Some(clear),
            }),
        }
    }

    /// The epoch to remember when a message arrives.
    pub fn epoch(&self) -> u64 {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .epoch
    }

    /// Answers through `answer(cache)`, with `cache` true only for an allow
    /// that the policy decided (`decided`: no `fail_mode` answer, no grant,
    /// no monitor-mode pass) under the policy in force when the message
    /// arrived (`epoch`), while that policy allows caching. Holding the read
    /// lock across the answer keeps a policy change from slipping between
    /// the check and the answer.
    pub fn answer_with<T>(
        &self,
        verdict: Verdict,
        decided: bool,
        epoch: u64,
        answer: impl FnOnce(bool) -> T,
    ) -> T {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let cache = may_cache(verdict, decided, state.enabled, epoch == state.epoch);
        answer(cache)
    }

    /// The policy changed: no earlier decision may be cached any more, the
    /// cache is emptied, and `enabled` says whether the new policy's allows
    /// may be cached.
    pub fn policy_changed(&self, enabled: bool) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.epoch = state.epoch.wrapping_add(1);
        // Without a client (detached) nothing is cached any more.
        state.enabled = enabled && state.clear.is_some();
        if let Some(clear) = &state.clear {
            clear();
        }
    }

    /// Whether the policy in force lets allows be cached.
    pub fn enabled(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .enabled
    }

    /// The client is going away: stop clearing and caching.
    pub fn detach(&self) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.clear = None;
        state.enabled = false;
        state.epoch = state.epoch.wrapping_add(1);
    }
}

/// The caching rule: only an allow the policy decided, under the policy in
/// force when the message arrived, while that policy allows it.
pub fn may_cache(verdict: Verdict, decided: bool, enabled: bool, same_epoch: bool) -> bool {
    verdict == Verdict::Allow && decided && enabled && same_epoch
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[test]
    fn the_margin_is_a_tenth_clamped_to_one_to_five_seconds() {
        let s = Duration::from_secs;
        assert_eq!(guard_margin(s(60)), s(5));
        assert_eq!(guard_margin(s(600)), s(5));
        assert_eq!(guard_margin(s(30)), s(3));
        assert_eq!(guard_margin(s(5)), s(1));
        assert_eq!(guard_delay(s(60)), s(55));
        assert_eq!(guard_delay(s(15)), Duration::from_millis(13_500));
        assert_eq!(guard_delay(s(5)), s(4));
        // Less left than the smallest margin: answer at once.
        assert_eq!(guard_delay(Duration::from_millis(800)), Duration::ZERO);
        assert_eq!(guard_delay(Duration::ZERO), Duration::ZERO);
    }

    type Log = Arc<Mutex<Vec<(Verdict, bool)>>>;

    /// Records every answer it gives.
    #[derive(Clone)]
    struct Rec(Log);

    impl Reply for Rec {
        fn reply(self, verdict: Verdict, cache: bool) {
            self.0.lock().unwrap().push((verdict, cache));
        }
    }

    fn rec() -> (Rec, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (Rec(log.clone()), log)
    }

    #[test]
    fn only_the_first_answer_counts() {
        let (reply, log) = rec();
        let once = AnswerOnce::new(reply, Verdict::Deny);
        assert_eq!(once.answered_by(), None);
        assert!(once.answer(Verdict::Allow, AnsweredBy::Pipeline, true));
        assert!(!once.expire(), "the guard comes too late");
        assert!(!once.answer(Verdict::Deny, AnsweredBy::Gate, false));
        assert_eq!(once.answered_by(), Some(AnsweredBy::Pipeline));
        assert_eq!(*log.lock().unwrap(), [(Verdict::Allow, true)]);
    }

    #[test]
    fn racing_answerers_answer_exactly_once() {
        for _ in 0..200 {
            let (reply, log) = rec();
            let once = Arc::new(AnswerOnce::new(reply, Verdict::Deny));
            let wins = Arc::new(AtomicUsize::new(0));
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let once = once.clone();
                    let wins = wins.clone();
                    std::thread::spawn(move || {
                        let won = if i % 2 == 0 {
                            once.expire()
                        } else {
                            once.answer(Verdict::Allow, AnsweredBy::Pipeline, false)
                        };
                        if won {
                            wins.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            assert_eq!(wins.load(Ordering::SeqCst), 1);
            assert_eq!(log.lock().unwrap().len(), 1);
        }
    }

    #[test]
    fn the_guard_answers_with_the_fallback_when_nobody_did() {
        let (guard, handle) = DeadlineGuard::start().unwrap();
        let (reply, log) = rec();
        let late = Arc::new(AnswerOnce::new(reply, Verdict::Allow));
        let (reply, answered_log) = rec();
        let answered = Arc::new(AnswerOnce::new(reply, Verdict::Deny));
        let at = Instant::now() + Duration::from_millis(50);
        handle.register(at, late.clone());
        handle.register(at, answered.clone());
        assert!(answered.answer(Verdict::Allow, AnsweredBy::Pipeline, true));
        let waited = Instant::now();
        while late.answered_by().is_none() && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(Instant::now() >= at);
        assert_eq!(late.answered_by(), Some(AnsweredBy::Guard));
        assert_eq!(*log.lock().unwrap(), [(Verdict::Allow, false)]);
        assert_eq!(*answered_log.lock().unwrap(), [(Verdict::Allow, true)]);
        assert_eq!(guard.expired(), 1);
        guard.stop();
    }

    #[test]
    fn the_guard_answers_in_deadline_order_and_sweeps_answered_entries() {
        let (guard, handle) = DeadlineGuard::start().unwrap();
        let start = Instant::now();
        let mut pending = Vec::new();
        // Many answered entries far in the future, to trigger a sweep.
        for _ in 0..(SWEEP_ABOVE + 10) {
            let (reply, _) = rec();
            let once = Arc::new(AnswerOnce::new(reply, Verdict::Deny));
            once.answer(Verdict::Allow, AnsweredBy::Pipeline, false);
            handle.register(start + Duration::from_secs(3600), once);
        }
        for ms in [80u64, 20, 50] {
            let (reply, log) = rec();
            let once = Arc::new(AnswerOnce::new(reply, Verdict::Deny));
            handle.register(start + Duration::from_millis(ms), once.clone());
            pending.push((ms, once, log));
        }
        let waited = Instant::now();
        while pending.iter().any(|(_, o, _)| o.answered_by().is_none())
            && waited.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (_, once, log) in &pending {
            assert_eq!(once.answered_by(), Some(AnsweredBy::Guard));
            assert_eq!(*log.lock().unwrap(), [(Verdict::Deny, false)]);
        }
        assert_eq!(guard.expired(), 3);
        guard.stop();
        drop(handle);
    }

    #[test]
    fn stopping_answers_what_waits_and_what_comes_after() {
        let (guard, handle) = DeadlineGuard::start().unwrap();
        let (reply, log) = rec();
        let waiting = Arc::new(AnswerOnce::new(reply, Verdict::Deny));
        handle.register(Instant::now() + Duration::from_secs(3600), waiting.clone());
        guard.stop();
        assert_eq!(waiting.answered_by(), Some(AnsweredBy::Guard));
        assert_eq!(*log.lock().unwrap(), [(Verdict::Deny, false)]);
        let (reply, log) = rec();
        let late = Arc::new(AnswerOnce::new(reply, Verdict::Allow));
        handle.register(Instant::now() + Duration::from_secs(3600), late.clone());
        assert_eq!(late.answered_by(), Some(AnsweredBy::Guard));
        assert_eq!(*log.lock().unwrap(), [(Verdict::Allow, false)]);
    }

    #[test]
    fn only_decided_allows_of_the_current_policy_are_cached() {
        use Verdict::*;
        assert!(may_cache(Allow, true, true, true));
        assert!(!may_cache(Deny, true, true, true), "never a deny");
        assert!(
            !may_cache(Allow, false, true, true),
            "never a fail_mode answer, a grant or a monitor-mode pass"
        );
        assert!(!may_cache(Allow, true, false, true), "policy says no");
        assert!(!may_cache(Allow, true, true, false), "older policy");
    }

    #[test]
    fn a_policy_change_bumps_the_epoch_and_clears_the_cache() {
        let clears = Arc::new(AtomicUsize::new(0));
        let counter = clears.clone();
        let cache = EsCache::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        let epoch = cache.epoch();
        assert!(
            !cache.answer_with(Verdict::Allow, true, epoch, |c| c),
            "off until a policy says so"
        );
        cache.policy_changed(true);
        assert_eq!(clears.load(Ordering::SeqCst), 1);
        assert!(cache.enabled());
        assert!(
            !cache.answer_with(Verdict::Allow, true, epoch, |c| c),
            "decided under the old policy"
        );
        let epoch = cache.epoch();
        assert!(cache.answer_with(Verdict::Allow, true, epoch, |c| c));
        assert!(!cache.answer_with(Verdict::Deny, true, epoch, |c| c));
        cache.detach();
        cache.policy_changed(true);
        assert_eq!(clears.load(Ordering::SeqCst), 1, "no client, no clear");
    }
}
