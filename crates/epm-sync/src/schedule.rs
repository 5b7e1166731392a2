//! When the next check-in happens: every `sync_interval` while the platform
//! answers, sooner after a failure, backing off while it stays down. Pure
//! functions of their inputs; the jitter is an argument, so they are tested
//! exactly.

use std::time::Duration;

/// The shortest allowed `sync_interval`.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);
/// The longest allowed `sync_interval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(30 * 60);
/// The default `sync_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// The first retry after a failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Delays are spread by up to this fraction either way, so a fleet started
/// together (or returning after an outage) does not check in together.
pub const JITTER: f64 = 0.10;

/// The delay before the next cycle. `failures` counts the consecutive
/// failed cycles (0 after a success); `jitter` is in `[-1, 1]`
/// ([`random_jitter`]). After a success: `interval` ± 10 %. After the n-th
/// failure: 5 s doubled n − 1 times ± 10 %, never more than `interval`.
pub fn next_delay(interval: Duration, failures: u32, jitter: f64) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let spread = |d: Duration| d.mul_f64(1.0 + JITTER * jitter);
    if failures == 0 {
        return spread(interval);
    }
    let doublings = (failures - 1).min(20);
    let base = FIRST_RETRY.saturating_mul(1 << doublings).min(interval);
    spread(base).min(interval)
}

/// A uniform jitter in `[-1, 1]`.
pub fn random_jitter() -> f64 {
    use rand::Rng as _;
    rand::thread_rng().gen_range(-1.0..=1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn success_waits_the_interval_give_or_take_ten_percent() {
        assert_eq!(next_delay(FIVE_MIN, 0, 0.0), FIVE_MIN);
        assert_eq!(next_delay(FIVE_MIN, 0, 1.0), Duration::from_secs(330));
        assert_eq!(next_delay(FIVE_MIN, 0, -1.0), Duration::from_secs(270));
        assert_eq!(
            next_delay(FIVE_MIN, 0, 7.0),
            Duration::from_secs(330),
            "clamped"
        );
        assert_eq!(next_delay(FIVE_MIN, 0, f64::NAN), FIVE_MIN);
    }

    #[test]
    fn failures_back_off_from_five_seconds_doubling_up_to_the_interval() {
        let delays: Vec<u64> = (1..=9)
            .map(|n| next_delay(FIVE_MIN, n, 0.0).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(next_delay(FIVE_MIN, u32::MAX, 0.0), FIVE_MIN);
        // Jitter never pushes a retry past the interval.
        assert_eq!(next_delay(FIVE_MIN, 30, 1.0), FIVE_MIN);
        assert_eq!(next_delay(FIVE_MIN, 1, 1.0), Duration::from_millis(5500));
        assert_eq!(next_delay(FIVE_MIN, 1, -1.0), Duration::from_millis(4500));
    }

    #[test]
    fn random_jitter_stays_in_bounds() {
        for _ in 0..1000 {
            let j = random_jitter();
            assert!((-1.0..=1.0).contains(&j));
            let d = next_delay(MIN_INTERVAL, 0, j);
            assert!(d >= Duration::from_secs(54) && d <= Duration::from_secs(66));
        }
    }
}
