//! Time that does not go back: grant windows and request expiry are judged
//! by it, so setting the wall clock back cannot reopen a window that ended.
//!
//! `now()` is the later of the wall clock and the last trusted time carried
//! forward by the monotonic clock. Trusted times are: any `now()` already
//! given out, the platform's time at check-in, and the floor kept in the
//! store across restarts (a reboot with the clock set back starts from the
//! last time the daemon saw, not from whatever the clock says).

use std::sync::Mutex;
use std::time::Instant;

use jiff::{SignedDuration, Timestamp};

/// The audit event of a wall clock found set: by a jump seen while
/// running (`admin_session`'s check) or behind the kept floor at start.
pub(crate) const CLOCK_JUMP_EVENT: &str = "clock_jump";

/// The store's meta key for the floor kept across restarts.
pub(crate) const FLOOR_META_KEY: &str = "trusted_time_floor";

/// A clock that never runs backwards.
#[derive(Debug)]
pub(crate) struct TrustedClock {
    anchor: Mutex<Anchor>,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    trusted: Timestamp,
    at: Instant,
}

impl TrustedClock {
    /// A clock that never reads earlier than `floor`.
    pub(crate) fn new(floor: Option<Timestamp>) -> TrustedClock {
        let wall = Timestamp::now();
        TrustedClock {
            anchor: Mutex::new(Anchor {
                trusted: floor.map_or(wall, |floor| floor.max(wall)),
                at: Instant::now(),
            }),
        }
    }

    /// The current time: the wall clock, unless it reads earlier than time
    /// already seen.
    pub(crate) fn now(&self) -> Timestamp {
        self.now_with_wall(Timestamp::now())
    }

    fn now_with_wall(&self, wall: Timestamp) -> Timestamp {
        let mut anchor = self
            .anchor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let carried = SignedDuration::try_from(anchor.at.elapsed())
            .ok()
            .and_then(|elapsed| anchor.trusted.checked_add(elapsed).ok())
            .unwrap_or(anchor.trusted);
        let now = wall.max(carried);
        *anchor = Anchor {
            trusted: now,
            at: Instant::now(),
        };
        now
    }

    /// Raises the clock to a trusted time from elsewhere (the platform's
    /// clock at check-in); an earlier time changes nothing.
    pub(crate) fn observe(&self, trusted: Timestamp) {
        let now = self.now();
        if trusted > now {
            let mut anchor = self
                .anchor
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *anchor = Anchor {
                trusted,
                at: Instant::now(),
            };
        }
    }
}

/// Reads the floor kept in the store's meta value.
pub(crate) fn parse_floor(value: Option<&str>) -> Option<Timestamp> {
    value.and_then(|v| v.parse().ok())
}

/// A wall clock that moves this much more or less than the monotonic
/// clock between two checks while the daemon runs, or reads this much
/// behind the kept floor at its start, has been set.
pub(crate) const CLOCK_JUMP: SignedDuration = SignedDuration::from_secs(60);

/// How far `wall` reads behind the kept `floor`, when it is far enough to
/// say the clock was set back while the daemon was down: worth a record,
/// since every window and session is then judged from the floor.
pub(crate) fn set_back_while_down(
    floor: Option<Timestamp>,
    wall: Timestamp,
) -> Option<SignedDuration> {
    let behind = wall.duration_until(floor?);
    (behind >= CLOCK_JUMP).then_some(behind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn a_clock_set_back_while_down_is_told_from_the_time_a_restart_takes() {
        let floor = at(2_000_000_000);
        assert_eq!(set_back_while_down(None, floor), None, "no floor yet");
        assert_eq!(
            set_back_while_down(Some(floor), at(2_000_000_030)),
            None,
            "later than the floor: the time the daemon was down"
        );
        assert_eq!(
            set_back_while_down(Some(floor), at(1_999_999_990)),
            None,
            "the floor is kept every few seconds: a little behind is normal"
        );
        assert_eq!(
            set_back_while_down(Some(floor), at(1_999_996_400)),
            Some(SignedDuration::from_secs(3600))
        );
    }

    #[test]
    fn a_wall_clock_set_back_does_not_move_time_back() {
        let clock = TrustedClock::new(None);
        let first = clock.now_with_wall(at(2_000_000_000));
        assert_eq!(first, at(2_000_000_000));
        let after_setback = clock.now_with_wall(at(1_000_000_000));
        assert!(after_setback >= first, "{after_setback} < {first}");
        // Forward again: the wall clock leads.
        assert_eq!(clock.now_with_wall(at(2_000_000_100)), at(2_000_000_100));
    }

    #[test]
    fn the_floor_survives_a_restart_and_the_platform_raises_it() {
        let future = Timestamp::now() + SignedDuration::from_hours(24 * 365);
        let clock = TrustedClock::new(Some(future));
        assert!(clock.now() >= future);
        let later = future + SignedDuration::from_hours(1);
        clock.observe(later);
        assert!(clock.now() >= later);
        clock.observe(at(0));
        assert!(clock.now() >= later, "an earlier time changes nothing");
        assert_eq!(parse_floor(Some(&later.to_string())), Some(later));
        assert_eq!(parse_floor(Some("garbage")), None);
    }
}
