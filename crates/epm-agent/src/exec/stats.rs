//! Counters and the decision-latency histogram behind `epmctl status`.
//!
//! Recorded from every worker on the exec path, so everything is a relaxed
//! atomic: no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Daemon-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Execs the gate handed to the pipeline (the daemon's own are not counted).
    pub execs_seen: AtomicU64,
    /// Execs answered allow.
    pub allowed: AtomicU64,
    /// Execs answered deny.
    pub denied: AtomicU64,
    /// Monitor mode: allowed, but enforce mode would have denied.
    pub would_deny: AtomicU64,
    /// Decisions served from the decision cache.
    pub cache_hits: AtomicU64,
    /// Decisions computed.
    pub cache_misses: AtomicU64,
    /// Execs answered per `fail_mode` (overflow, errors, panics, shutdown).
    pub fail_mode_answers: AtomicU64,
    /// Execs refused by a full queue.
    pub overflow: AtomicU64,
    /// Execs answered per `fail_mode` because their user had more than
    /// their share of the decision queue.
    pub over_share: AtomicU64,
    /// Execs answered per `fail_mode` because their user had hashed more
    /// than their budget lately.
    pub hash_budget: AtomicU64,
    /// Execs answered per `fail_mode` because the file changed while it
    /// was hashed or stayed open for writing.
    pub unstable_content: AtomicU64,
    /// Worker panics caught.
    pub worker_panics: AtomicU64,
    /// Execs waiting for a worker right now.
    pub queue_depth: AtomicU64,
}

impl Counters {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Sub-buckets per power of two: 16 gives about 6 % resolution.
const SUB_BUCKETS: usize = 16;
const SUB_BITS: u32 = SUB_BUCKETS.trailing_zeros();
/// Covers 1 ns to beyond 2^40 ns (18 minutes); larger values land in the last bucket.
const POWERS: usize = 41;

/// A fixed-size log-linear histogram of durations in nanoseconds.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    max_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..POWERS * SUB_BUCKETS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            max_ns: AtomicU64::new(0),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB_BUCKETS as u64 {
        return ns as usize;
    }
    let power = 63 - ns.leading_zeros(); // >= SUB_BITS
    let sub = (ns >> (power - SUB_BITS)) as usize & (SUB_BUCKETS - 1);
    let index = (power - SUB_BITS + 1) as usize * SUB_BUCKETS + sub;
    index.min(POWERS * SUB_BUCKETS - 1)
}

/// The largest value that falls in `index` (so percentiles never understate).
fn upper_bound_of(index: usize) -> u64 {
    if index < SUB_BUCKETS {
        return index as u64;
    }
    let power = (index / SUB_BUCKETS) as u32 - 1 + SUB_BITS;
    let sub = (index % SUB_BUCKETS) as u64;
    let low = (1u64 << power) | (sub << (power - SUB_BITS));
    low + (1u64 << (power - SUB_BITS)) - 1
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if let Some(bucket) = self.buckets.get(bucket_of(ns)) {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The value below which `quantile` (0.0–1.0) of the recorded durations
    /// fall, in microseconds, or `None` when nothing was recorded.
    pub fn quantile_us(&self, quantile: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let ns = upper_bound_of(index).min(self.max_ns.load(Ordering::Relaxed));
                return Some(ns as f64 / 1000.0);
            }
        }
        None
    }

    /// The longest duration recorded, in microseconds.
    pub fn max_us(&self) -> f64 {
        self.max_ns.load(Ordering::Relaxed) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bounds_contain_their_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 20, 1 << 30, u64::MAX / 2, u64::MAX]) {
            let b = bucket_of(ns);
            assert!(b >= last, "bucket order at {ns}");
            last = b;
            if b < POWERS * SUB_BUCKETS - 1 {
                assert!(upper_bound_of(b) >= ns, "{ns} above its bucket's bound");
                assert!(
                    upper_bound_of(b) <= ns + ns / 8 + 1,
                    "{ns}: bucket too coarse"
                );
            }
        }
    }

    #[test]
    fn quantiles_of_a_known_distribution() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile_us(0.5).unwrap();
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((50.0..=54.0).contains(&p50), "p50 {p50}");
        assert!((99.0..=100.0).contains(&p99), "p99 {p99}");
        assert_eq!(h.max_us(), 100.0);
    }
}
