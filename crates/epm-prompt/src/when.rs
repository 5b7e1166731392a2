//! Reading the times a user types for an approval window.

use jiff::civil::{Date, DateTime, Time};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};

/// Why a time could not be read; the message lists the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot read {text:?} as a time: {why}. Write now, +30m, +2h, +1d, 14:30, 2026-12-01 09:00 or an RFC 3339 time"
)]
pub struct TimeError {
    /// What was typed (cut to 60 characters).
    pub text: String,
    /// What is wrong.
    pub why: String,
}

/// Reads `text` as a point in time, relative to `now` in `zone`:
///
/// - `now`
/// - `+N` with `m`, `h` or `d`: that long after now
/// - `HH:MM`: today at that time (an error if it has passed: give a date)
/// - `YYYY-MM-DD HH:MM` (or with `T`): that local time
/// - RFC 3339 with an offset: `2026-12-01T09:00:00Z`
///
/// ```
/// use epm_prompt::when::parse_time;
/// use jiff::{tz::TimeZone, Timestamp};
/// let now: Timestamp = "2026-11-22T10:00:00Z".parse().unwrap();
/// let utc = TimeZone::UTC;
/// assert_eq!(parse_time("+2h", now, &utc).unwrap().to_string(), "2026-11-22T12:00:00Z");
/// assert_eq!(parse_time("14:30", now, &utc).unwrap().to_string(), "2026-11-22T14:30:00Z");
/// assert!(parse_time("09:00", now, &utc).is_err());
/// ```
pub fn parse_time(text: &str, now: Timestamp, zone: &TimeZone) -> Result<Timestamp, TimeError> {
    let typed = text.trim();
    let fail = |why: &str| TimeError {
        text: typed.chars().take(60).collect(),
        why: why.to_owned(),
    };
    if typed.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(rest) = typed.strip_prefix('+') {
        let (number, unit) = rest.split_at(rest.len().saturating_sub(1));
        let n: i64 = number
            .parse()
            .map_err(|_| fail("after + comes a number and m, h or d"))?;
        let seconds = match unit {
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(fail("after + comes a number and m, h or d")),
        };
        let offset = n
            .checked_mul(seconds)
            .filter(|s| (0..=366 * 86_400).contains(s))
            .ok_or_else(|| fail("too far ahead"))?;
        return now
            .checked_add(SignedDuration::from_secs(offset))
            .map_err(|_| fail("too far ahead"));
    }
    if let Ok(time) = typed.parse::<Time>()
        && typed.len() <= 8
    {
        let today: Date = now.to_zoned(zone.clone()).date();
        let at = local(today.to_datetime(time), zone).map_err(|why| fail(&why))?;
        if at < now - SignedDuration::from_secs(60) {
            return Err(fail("that time has already passed today; give a date too"));
        }
        return Ok(at);
    }
    // With an offset or a zone first: DateTime would read past one and drop it.
    if let Ok(at) = typed.parse::<Timestamp>() {
        return Ok(at);
    }
    if let Ok(zoned) = typed.parse::<Zoned>() {
        return Ok(zoned.timestamp());
    }
    typed
        .replacen(' ', "T", 1)
        .parse::<DateTime>()
        .map_err(|_| fail("not a form this accepts"))
        .and_then(|datetime| local(datetime, zone).map_err(|why| fail(&why)))
}

fn local(datetime: DateTime, zone: &TimeZone) -> Result<Timestamp, String> {
    datetime
        .to_zoned(zone.clone())
        .map(|z| z.timestamp())
        .map_err(|e| format!("not a valid local time ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    #[test]
    fn every_documented_form_reads() {
        let utc = TimeZone::UTC;
        let cases = [
            ("now", "2026-11-22T10:00:00Z"),
            ("NOW", "2026-11-22T10:00:00Z"),
            ("+30m", "2026-11-22T10:30:00Z"),
            ("+1d", "2026-11-23T10:00:00Z"),
            ("10:00", "2026-11-22T10:00:00Z"),
            ("23:59", "2026-11-22T23:59:00Z"),
            ("2026-12-01 09:00", "2026-12-01T09:00:00Z"),
            ("2026-12-01T09:00", "2026-12-01T09:00:00Z"),
            ("2026-12-01T09:00:00+01:00", "2026-12-01T08:00:00Z"),
            ("2026-12-01T09:00:00Z", "2026-12-01T09:00:00Z"),
        ];
        for (text, want) in cases {
            assert_eq!(
                parse_time(text, now(), &utc).unwrap().to_string(),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn local_times_use_the_zone() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap_or(TimeZone::fixed(jiff::tz::offset(1)));
        assert_eq!(
            parse_time("2026-12-01 09:00", now(), &berlin)
                .unwrap()
                .to_string(),
            "2026-12-01T08:00:00Z"
        );
    }

    #[test]
    fn bad_forms_name_what_is_accepted() {
        for bad in [
            "",
            "soon",
            "+",
            "+5y",
            "+-5h",
            "+99999999d",
            "09:00",
            "25:00",
            "2026-13-01 09:00",
        ] {
            let err = parse_time(bad, now(), &TimeZone::UTC).unwrap_err();
            assert!(err.to_string().contains("+30m"), "{bad}: {err}");
        }
    }
}
