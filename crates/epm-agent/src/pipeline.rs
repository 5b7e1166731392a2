//! The decision pipeline between a gate and the decider: a bounded queue,
//! worker threads, the answer first and the audit after.
//!
//! Every exec handed to [`Intake::submit`] is answered exactly once: by a
//! worker; at once per `fail_mode` when the queue is full; per `fail_mode`
//! when deciding fails or panics; or by `PendingExec`'s drop guard if
//! anything else goes wrong.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::audit::{AuditSink, exec_event, fail_event};
use crate::decider::Decider;
use crate::gate::PendingExec;
use crate::stats::Counters;

/// One exec waiting for a worker, with the time the gate handed it over.
#[derive(Debug)]
struct Job {
    pending: PendingExec,
    received: Instant,
}

/// The gate-facing end: hands execs in, never blocks.
#[derive(Debug, Clone)]
pub struct Intake {
    queue: Sender<Job>,
    decider: Arc<Decider>,
    audit: AuditSink,
}

impl Intake {
    /// Queues an exec for a worker; when the queue is full the exec is
    /// answered per `fail_mode` at once, counted and audited.
    pub fn submit(&self, pending: PendingExec) {
        let counters = &self.decider.counters;
        Counters::bump(&counters.execs_seen);
        counters.queue_depth.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            pending,
            received: Instant::now(),
        };
        let (job, why) = match self.queue.try_send(job) {
            Ok(()) => return,
            Err(TrySendError::Full(job)) => {
                Counters::bump(&counters.overflow);
                (job, "decision queue full")
            }
            Err(TrySendError::Disconnected(job)) => (job, "daemon shutting down"),
        };
        counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        Counters::bump(&counters.fail_mode_answers);
        let verdict = self.decider.fail_verdict();
        let event = fail_event(&self.decider, &job.pending.facts, verdict, why);
        job.pending.answer(verdict);
        self.audit.send(event);
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
        let (queue, jobs) = bounded::<Job>(capacity.max(1));
        let mut handles = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let jobs = jobs.clone();
            let decider = decider.clone();
            let audit = audit.clone();
            let handle = std::thread::Builder::new()
                .name(format!("epm-decide-{index}"))
                .spawn(move || work(&jobs, &decider, &audit))?;
            handles.push(handle);
        }
        Ok((
            Workers { handles },
            Intake {
                queue,
                decider,
                audit,
            },
        ))
    }

    /// Waits for the workers to drain the queue and exit; the queue closes
    /// when every [`Intake`] has been dropped.
    pub fn join(self) {
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

fn work(jobs: &Receiver<Job>, decider: &Decider, audit: &AuditSink) {
    while let Ok(Job { pending, received }) = jobs.recv() {
        decider.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        // The PendingExec stays outside the closure: if deciding panics,
        // this thread still owns it and answers per fail_mode below.
        let result = catch_unwind(AssertUnwindSafe(|| decider.decide(&pending.facts)));
        let (verdict, event) = match result {
            Ok(Ok(outcome)) => (outcome.verdict, exec_event(decider, &outcome)),
            Ok(Err(error)) => {
                tracing::warn!(%error, "exec answered per fail_mode");
                Counters::bump(&decider.counters.fail_mode_answers);
                let verdict = decider.fail_verdict();
                (
                    verdict,
                    fail_event(decider, &pending.facts, verdict, &error.to_string()),
                )
            }
            Err(_) => {
                tracing::error!(path = %pending.facts.path, "deciding panicked; answered per fail_mode");
                Counters::bump(&decider.counters.worker_panics);
                Counters::bump(&decider.counters.fail_mode_answers);
                let verdict = decider.fail_verdict();
                let why = "internal error: deciding panicked";
                (verdict, fail_event(decider, &pending.facts, verdict, why))
            }
        };
        pending.answer(verdict);
        decider.latency.record(received.elapsed());
        audit.send(event);
    }
}
