//! Asking the user, through whichever backend the caller has.
//!
//! A [`Backend`] only knows two things: ask for one line of text (with
//! optional ready-made choices) and show a message. The flows — ask, check
//! with the rule, explain what to fix, ask again — are written once here on
//! top of them, so every backend behaves the same.

use epm_policy::{ApprovalSpec, JustificationSpec};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::display::shown_line;
use crate::when::parse_time;

/// How many invalid answers in a row before the flow gives up.
pub const MAX_ATTEMPTS: usize = 5;

/// Why a prompt could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The dialog program could not run.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// Which.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// The dialog program failed in a way that is not a cancel.
    #[error("{program} failed: {detail}")]
    Failed {
        /// Which.
        program: String,
        /// Its exit status and stderr.
        detail: String,
    },
    /// Reading or writing the terminal or a file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A scripted answers file is wrong or used up.
    #[error("answers file: {0}")]
    Script(String),
}

/// How serious a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// News, such as "approved".
    Info,
    /// Something was refused.
    Warning,
}

/// The two things a prompt backend does.
pub trait Backend {
    /// Asks for one line. `choices` are ready-made answers the user may pick
    /// instead of typing; `default` pre-fills the field. `None`: cancelled.
    fn entry(
        &mut self,
        title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError>;

    /// Shows a message and waits until it is acknowledged (or, for
    /// backends that cannot wait, until it is shown).
    fn message(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError>;

    /// Tells the user something that asks nothing of them: a refusal, news
    /// of a request, a window that opened. Backends with a notification
    /// centre post it there and return at once; by default it is a message.
    fn notify(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        self.message(title, text, tone)
    }
}

/// What to ask a justification for.
#[derive(Debug, Clone)]
pub struct JustificationAsk {
    /// The program's name, as shown.
    pub program: String,
    /// The rule's message, if any.
    pub message: Option<String>,
    /// The rule's limits and presets.
    pub spec: JustificationSpec,
}

/// What to ask an approval for.
#[derive(Debug, Clone)]
pub struct ApprovalAsk {
    /// The program's name, as shown.
    pub program: String,
    /// The rule's message, if any.
    pub message: Option<String>,
    /// Limits and presets for the justification.
    pub justification: JustificationSpec,
    /// Window limits.
    pub approval: ApprovalSpec,
}

/// A filled approval form, already checked against the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalAnswer {
    /// The user's reason.
    pub justification: String,
    /// Window start.
    pub start: Timestamp,
    /// Window end.
    pub end: Timestamp,
}

const TITLE: &str = "Endpoint Privilege Management";

/// The choice after a list of presets (reasons, window starts and lengths)
/// that asks for one's own text instead.
pub const TYPE_MY_OWN: &str = "Type my own…";

/// Asks for a justification until it satisfies the rule, the user cancels,
/// or [`MAX_ATTEMPTS`] answers were refused.
pub fn ask_justification(
    backend: &mut dyn Backend,
    ask: &JustificationAsk,
) -> Result<Option<String>, PromptError> {
    let mut text = format!(
        "{} needs a reason before it runs ({} to {} characters).",
        shown_line(&ask.program),
        ask.spec.min_length,
        ask.spec.max_length
    );
    if let Some(message) = &ask.message {
        text.push_str(&format!("\n\n{}", shown_line(message)));
    }
    for _ in 0..MAX_ATTEMPTS {
        let Some(answer) = backend.entry(TITLE, &text, &ask.spec.presets, "")? else {
            return Ok(None);
        };
        match ask.spec.check(&answer) {
            Ok(justification) => return Ok(Some(justification)),
            Err(problem) => {
                backend.message(TITLE, &capitalized(&problem.to_string()), Tone::Warning)?
            }
        }
    }
    Ok(None)
}

/// Asks for a justification and a window until both satisfy the rule.
pub fn ask_approval(
    backend: &mut dyn Backend,
    ask: &ApprovalAsk,
    now: Timestamp,
    zone: &TimeZone,
) -> Result<Option<ApprovalAnswer>, PromptError> {
    let justification = match ask_justification(
        backend,
        &JustificationAsk {
            program: ask.program.clone(),
            message: ask.message.clone(),
            spec: ask.justification.clone(),
        },
    )? {
        Some(j) => j,
        None => return Ok(None),
    };
    let max = ask.approval.max_window_hours;
    for _ in 0..MAX_ATTEMPTS {
        let starts = start_presets(now, zone);
        let Some(start_text) = backend.entry(
            TITLE,
            "When should the window start? Pick one, or type a time (now, +30m, 14:30, 2026-12-01 09:00).",
            &labels(&starts),
            "Now",
        )?
        else {
            return Ok(None);
        };
        let start = match chosen(&starts, &start_text, now, zone) {
            Ok(start) => start,
            Err(problem) => {
                backend.message(TITLE, &capitalized(&problem.to_string()), Tone::Warning)?;
                continue;
            }
        };
        let ends = end_presets(start, max, zone);
        let Some(end_text) = backend.entry(
            TITLE,
            &format!(
                "How long? Pick one, or type when it ends: +2h (after the start), 17:00 or 2026-12-01 09:00. At most {max} hours."
            ),
            &labels(&ends),
            ends.first().map_or("+1h", |(label, _)| label.as_str()),
        )?
        else {
            return Ok(None);
        };
        // A typed +N counts from the start: "how long".
        let problem = match chosen(&ends, &end_text, start, zone) {
            Ok(end) => match ask.approval.check_window(start, end, now) {
                Ok(()) => {
                    return Ok(Some(ApprovalAnswer {
                        justification,
                        start,
                        end,
                    }));
                }
                Err(problem) => problem.to_string(),
            },
            Err(problem) => problem.to_string(),
        };
        backend.message(TITLE, &capitalized(&problem), Tone::Warning)?;
    }
    Ok(None)
}

/// A ready-made answer: what the list shows, and the time it means. The
/// dialogs have no date picker, so nobody should have to type a time.
type Preset = (String, Timestamp);

/// Window starts: now, soon, and tomorrow morning.
fn start_presets(now: Timestamp, zone: &TimeZone) -> Vec<Preset> {
    let mut presets = vec![("Now".to_owned(), now)];
    for (minutes, label) in [
        (30, "In 30 minutes"),
        (60, "In 1 hour"),
        (120, "In 2 hours"),
    ] {
        if let Ok(at) = now.checked_add(jiff::SignedDuration::from_mins(minutes)) {
            presets.push((format!("{label} ({})", clock(at, now, zone)), at));
        }
    }
    let tomorrow_nine = now
        .to_zoned(zone.clone())
        .date()
        .tomorrow()
        .and_then(|day| day.at(9, 0, 0, 0).to_zoned(zone.clone()))
        .map(|at| at.timestamp());
    if let Ok(at) = tomorrow_nine {
        presets.push(("Tomorrow at 09:00".to_owned(), at));
    }
    presets
}

/// Window lengths from `start`, as long as the rule allows.
fn end_presets(start: Timestamp, max_hours: u32, zone: &TimeZone) -> Vec<Preset> {
    [1, 2, 4, 8, 24]
        .into_iter()
        .filter(|&hours| hours <= max_hours)
        .filter_map(|hours| {
            let end = start
                .checked_add(jiff::SignedDuration::from_hours(i64::from(hours)))
                .ok()?;
            let length = if hours == 1 {
                "1 hour".to_owned()
            } else {
                format!("{hours} hours")
            };
            Some((
                format!("For {length} (until {})", clock(end, start, zone)),
                end,
            ))
        })
        .collect()
}

/// `14:30`, or `Tue 09:00` when not on the same day as `near`.
fn clock(at: Timestamp, near: Timestamp, zone: &TimeZone) -> String {
    let (at, near) = (at.to_zoned(zone.clone()), near.to_zoned(zone.clone()));
    if at.date() == near.date() {
        at.strftime("%H:%M").to_string()
    } else {
        at.strftime("%a %H:%M").to_string()
    }
}

fn labels(presets: &[Preset]) -> Vec<String> {
    presets.iter().map(|(label, _)| label.clone()).collect()
}

/// The time a preset's label means, or the time typed (`+N` counting
/// from `from`).
fn chosen(
    presets: &[Preset],
    answer: &str,
    from: Timestamp,
    zone: &TimeZone,
) -> Result<Timestamp, crate::when::TimeError> {
    match presets.iter().find(|(label, _)| label == answer.trim()) {
        Some((_, at)) => Ok(*at),
        None => parse_time(answer, from, zone),
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scripted;

    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().unwrap()
    }

    fn approval_ask() -> ApprovalAsk {
        ApprovalAsk {
            program: "Wireshark".into(),
            message: Some("Needs a ticket".into()),
            justification: JustificationSpec {
                min_length: 5,
                ..JustificationSpec::default()
            },
            approval: ApprovalSpec {
                max_window_hours: 4,
                ..ApprovalSpec::default()
            },
        }
    }

    #[test]
    fn invalid_answers_are_explained_and_asked_again() {
        let mut backend = Scripted::from_answers(vec![
            Some("ok".into()),
            Some("Capture for ticket 4411".into()),
            Some("now".into()),
            Some("+5h".into()),
            Some("+1h".into()),
            Some("+3h".into()),
        ]);
        let answer = ask_approval(&mut backend, &approval_ask(), now(), &TimeZone::UTC)
            .unwrap()
            .unwrap();
        assert_eq!(answer.justification, "Capture for ticket 4411");
        assert_eq!(answer.start.to_string(), "2026-11-22T11:00:00Z");
        assert_eq!(
            answer.end.to_string(),
            "2026-11-22T14:00:00Z",
            "+3h after the start"
        );
        let shown = backend.transcript().join("\n");
        assert!(
            shown.contains("The justification needs at least 5 characters (it has 2)"),
            "{shown}"
        );
        assert!(
            shown.contains("The window can be at most 4 hours long (this one is 5h)"),
            "{shown}"
        );
    }

    #[test]
    fn windows_can_be_picked_from_presets_the_rule_allows() {
        let mut backend = Scripted::from_answers(vec![
            Some("Capture for ticket 4411".into()),
            Some("In 2 hours (12:00)".into()),
            Some("For 4 hours (until 16:00)".into()),
        ]);
        let answer = ask_approval(&mut backend, &approval_ask(), now(), &TimeZone::UTC)
            .unwrap()
            .unwrap();
        assert_eq!(answer.start.to_string(), "2026-11-22T12:00:00Z");
        assert_eq!(answer.end.to_string(), "2026-11-22T16:00:00Z");
        let shown = backend.transcript().join("\n");
        assert!(shown.contains("Tomorrow at 09:00"), "{shown}");
        // The rule allows 4 hours: no longer lengths are offered.
        assert!(!shown.contains("For 8 hours"), "{shown}");
        let starts = labels(&start_presets(now(), &TimeZone::UTC));
        assert_eq!(
            starts,
            [
                "Now",
                "In 30 minutes (10:30)",
                "In 1 hour (11:00)",
                "In 2 hours (12:00)",
                "Tomorrow at 09:00"
            ]
        );
        let late: Timestamp = "2026-11-22T23:00:00Z".parse().unwrap();
        let ends = labels(&end_presets(late, 2, &TimeZone::UTC));
        assert_eq!(
            ends,
            [
                "For 1 hour (until Mon 00:00)",
                "For 2 hours (until Mon 01:00)"
            ]
        );
    }

    #[test]
    fn cancel_and_endless_bad_answers_end_the_flow() {
        let mut backend = Scripted::from_answers(vec![None]);
        assert_eq!(
            ask_approval(&mut backend, &approval_ask(), now(), &TimeZone::UTC).unwrap(),
            None
        );
        let mut backend = Scripted::from_answers(vec![Some("x".into()); MAX_ATTEMPTS]);
        let ask = JustificationAsk {
            program: "Docker".into(),
            message: None,
            spec: JustificationSpec {
                min_length: 5,
                ..JustificationSpec::default()
            },
        };
        assert_eq!(ask_justification(&mut backend, &ask).unwrap(), None);
    }

    #[test]
    fn the_prompt_shows_the_rule_text_escaped() {
        let mut backend = Scripted::from_answers(vec![Some("a good reason".into())]);
        let ask = JustificationAsk {
            program: "Docker\u{1b}[2J".into(),
            message: Some("<b>ask</b> IT".into()),
            spec: JustificationSpec::default(),
        };
        ask_justification(&mut backend, &ask).unwrap();
        let shown = backend.transcript().join("\n");
        assert!(shown.contains("Docker\\u{1b}[2J needs a reason"), "{shown}");
        assert!(
            shown.contains("<b>ask</b> IT"),
            "markup is shown as text: {shown}"
        );
    }
}
