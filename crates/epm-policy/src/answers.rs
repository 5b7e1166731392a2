//! The checks on what a user answers: a justification, an approval window.
//!
//! One definition for every side: the helper and `epmctl` use it to tell
//! the user at once what to fix, and `epmd` applies it again to whatever
//! arrives, because the daemon trusts no client to have checked.

use jiff::{SignedDuration, Timestamp};

use crate::{ApprovalSpec, JustificationSpec};

/// How far in the past a window may start, to absorb the seconds between a
/// form being filled and checked, and small clock differences.
pub const START_GRACE: SignedDuration = SignedDuration::from_secs(5 * 60);

/// Why an answer was refused. The message is written for the user and says
/// what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// Nothing but white space.
    #[error("the justification is empty: say why you need this")]
    EmptyJustification,
    /// Under the rule's minimum.
    #[error("the justification needs at least {min} characters (it has {got})")]
    JustificationTooShort {
        /// The rule's minimum.
        min: u32,
        /// Visible characters given ([`visible_length`]).
        got: usize,
    },
    /// Over the rule's maximum.
    #[error("the justification can have at most {max} characters (it has {got})")]
    JustificationTooLong {
        /// The rule's maximum.
        max: u32,
        /// Visible characters given ([`visible_length`]).
        got: usize,
    },
    /// Control or bidirectional-override characters, which could disguise
    /// the text an approver reads.
    #[error("the justification contains control or text-direction characters; type plain text")]
    JustificationControlCharacters,
    /// `end <= start`.
    #[error("the window must end after it starts")]
    WindowEndsBeforeStart,
    /// `start` is in the past (beyond [`START_GRACE`]).
    #[error("the window cannot start in the past")]
    WindowStartsInPast,
    /// Longer than the rule allows.
    #[error("the window can be at most {max_hours} hours long (this one is {asked})")]
    WindowTooLong {
        /// The rule's `max_window_hours`.
        max_hours: u32,
        /// The window asked for, as `1d 2h 3m`.
        asked: String,
    },
}

impl JustificationSpec {
    /// Checks a justification and returns it trimmed. Lengths count
    /// visible characters ([`visible_length`]), not bytes or code points;
    /// new lines and tabs are allowed.
    ///
    /// ```
    /// use epm_policy::JustificationSpec;
    /// let spec = JustificationSpec { min_length: 10, ..JustificationSpec::default() };
    /// assert_eq!(spec.check("  Debugging ticket 4411 \n").unwrap(), "Debugging ticket 4411");
    /// assert!(spec.check("because").is_err());
    /// ```
    pub fn check(&self, text: &str) -> Result<String, AnswerError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AnswerError::EmptyJustification);
        }
        if text.chars().any(is_disguising) {
            return Err(AnswerError::JustificationControlCharacters);
        }
        let got = visible_length(text);
        if got == 0 {
            return Err(AnswerError::EmptyJustification);
        }
        if got < self.min_length as usize {
            return Err(AnswerError::JustificationTooShort {
                min: self.min_length,
                got,
            });
        }
        if got > self.max_length as usize {
            return Err(AnswerError::JustificationTooLong {
                max: self.max_length,
                got,
            });
        }
        Ok(text.to_owned())
    }
}

/// How many characters a reader sees in `text`: user-perceived characters
/// (extended grapheme clusters, so `é` written as `e` and a combining
/// accent is one), after dropping the invisible ones (Unicode format
/// characters, category Cf: zero-width spaces and joiners, soft hyphens,
/// word joiners, and the blank Hangul fillers), with each run of white
/// space counted once. Twelve zero-width spaces have length 0.
///
/// ```
/// use epm_policy::visible_length;
/// assert_eq!(visible_length("ticket 42"), 9);
/// assert_eq!(visible_length(&"\u{200B}".repeat(12)), 0);
/// assert_eq!(visible_length("e\u{301}t\u{E9}"), 3);
/// ```
pub fn visible_length(text: &str) -> usize {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    use unicode_segmentation::UnicodeSegmentation;
    let invisible = |c: char| {
        c.general_category() == GeneralCategory::Format
            // Default-ignorable letters that render as nothing.
            || matches!(c, '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}')
    };
    let shown: String = text.chars().filter(|&c| !invisible(c)).collect();
    let mut count = 0;
    let mut after_space = false;
    for cluster in shown.graphemes(true) {
        let space = cluster.chars().all(char::is_whitespace);
        if !(space && after_space) {
            count += 1;
        }
        after_space = space;
    }
    count
}

/// Control characters other than new line and tab, and the Unicode
/// bidirectional overrides and isolates.
fn is_disguising(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
}

impl ApprovalSpec {
    /// Checks an execution window asked for at `now`: it starts no earlier
    /// than `now` (less [`START_GRACE`]), ends after it starts, and lasts at
    /// most `max_window_hours`.
    ///
    /// ```
    /// use epm_policy::ApprovalSpec;
    /// use jiff::{SignedDuration, Timestamp};
    /// let spec = ApprovalSpec { max_window_hours: 8, ..ApprovalSpec::default() };
    /// let now = Timestamp::from_second(1_800_000_000).unwrap();
    /// let hour = SignedDuration::from_hours(1);
    /// assert!(spec.check_window(now + hour, now + hour * 3, now).is_ok());
    /// assert!(spec.check_window(now, now + hour * 9, now).is_err());
    /// ```
    pub fn check_window(
        &self,
        start: Timestamp,
        end: Timestamp,
        now: Timestamp,
    ) -> Result<(), AnswerError> {
        if end <= start {
            return Err(AnswerError::WindowEndsBeforeStart);
        }
        if start < now - START_GRACE {
            return Err(AnswerError::WindowStartsInPast);
        }
        let length = start.duration_until(end);
        if length > SignedDuration::from_hours(i64::from(self.max_window_hours)) {
            return Err(AnswerError::WindowTooLong {
                max_hours: self.max_window_hours,
                asked: human_duration(length),
            });
        }
        Ok(())
    }
}

fn human_duration(d: SignedDuration) -> String {
    let minutes = d.as_secs().max(0) / 60;
    let (days, hours, minutes) = (minutes / 1440, minutes / 60 % 24, minutes % 60);
    let mut parts = Vec::new();
    if days > 0 {
        parts.push(format!("{days}d"));
    }
    if hours > 0 {
        parts.push(format!("{hours}h"));
    }
    if minutes > 0 || parts.is_empty() {
        parts.push(format!("{minutes}m"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn justification_lengths_count_characters_after_trimming() {
        let spec = JustificationSpec {
            min_length: 3,
            max_length: 5,
            presets: vec![],
        };
        assert_eq!(spec.check(" äöü ").unwrap(), "äöü");
        assert_eq!(spec.check("a\tb\nc").unwrap(), "a\tb\nc");
        assert_eq!(
            spec.check(" ab "),
            Err(AnswerError::JustificationTooShort { min: 3, got: 2 })
        );
        assert_eq!(
            spec.check("abcdef"),
            Err(AnswerError::JustificationTooLong { max: 5, got: 6 })
        );
        assert_eq!(spec.check(" \n\t "), Err(AnswerError::EmptyJustification));
    }

    #[test]
    fn invisible_characters_do_not_count_towards_the_minimum() {
        let spec = JustificationSpec {
            min_length: 10,
            ..JustificationSpec::default()
        };
        let zero_width = "\u{200B}".repeat(12);
        assert_eq!(
            spec.check(&zero_width),
            Err(AnswerError::EmptyJustification)
        );
        for padded in [
            format!("ok{zero_width}"),
            "o\u{2060}\u{FEFF}\u{AD}\u{200D}k\u{3164}\u{3164}\u{3164}".to_owned(),
            "ok          .".to_owned(),
            "e\u{301}e\u{301}e\u{301}e\u{301}e\u{301}".to_owned(),
        ] {
            assert!(
                matches!(
                    spec.check(&padded),
                    Err(AnswerError::JustificationTooShort { .. })
                ),
                "{padded:?}"
            );
        }
        assert!(spec.check("Ticket 4411 needs it").is_ok());
    }

    #[test]
    fn text_that_could_disguise_itself_is_refused() {
        let spec = JustificationSpec::default();
        for bad in [
            "ok\u{1b}[2J",
            "ok\u{202E}gpj.exe",
            "a\u{0}b",
            "ok\rnot ok",
            "x\u{2067}y",
        ] {
            assert_eq!(
                spec.check(bad),
                Err(AnswerError::JustificationControlCharacters),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn windows_start_now_or_later_end_after_start_and_fit_the_rule() {
        let spec = ApprovalSpec {
            max_window_hours: 2,
            ..ApprovalSpec::default()
        };
        let now = t(0);
        assert!(spec.check_window(t(0), t(7200), now).is_ok());
        assert!(
            spec.check_window(t(-60), t(600), now).is_ok(),
            "within the grace"
        );
        assert_eq!(
            spec.check_window(t(-3600), t(600), now),
            Err(AnswerError::WindowStartsInPast)
        );
        assert_eq!(
            spec.check_window(t(600), t(600), now),
            Err(AnswerError::WindowEndsBeforeStart)
        );
        assert_eq!(
            spec.check_window(t(0), t(7260), now),
            Err(AnswerError::WindowTooLong {
                max_hours: 2,
                asked: "2h 1m".into()
            })
        );
        assert_eq!(
            spec.check_window(t(0), t(86_400 * 2 + 60), now)
                .unwrap_err()
                .to_string(),
            "the window can be at most 2 hours long (this one is 2d 1m)"
        );
    }
}
