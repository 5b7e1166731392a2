//! Asking the user, through whichever backend this session has.
//!
//! A [`Backend`] only knows two things: ask for one line of text (with
//! optional ready-made choices) and show a message. The flows — ask, check
//! with the rule, explain what to fix, ask again — are written once here on
//! top of them, so every backend behaves the same.

mod osascript;
mod scripted;
mod terminal;
#[cfg(target_os = "macos")]
mod user_notifications;
mod zenity;

use epm_policy::{ApprovalSpec, JustificationSpec};
use jiff::Timestamp;
use jiff::tz::TimeZone;

pub use osascript::Osascript;
pub use scripted::Scripted;
pub use terminal::Terminal;
pub use zenity::Zenity;

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
    // Every rule allows at least one hour (validation), so +1h is always a valid default.
    let default_end = "+1h";
    for _ in 0..MAX_ATTEMPTS {
        let Some(start_text) = backend.entry(
            TITLE,
            "When should the window start? (now, +30m, 14:30, 2026-12-01 09:00)",
            &[],
            "now",
        )?
        else {
            return Ok(None);
        };
        let Some(end_text) = backend.entry(
            TITLE,
            &format!("When should it end? (at most {max} hours after the start)"),
            &[],
            default_end,
        )?
        else {
            return Ok(None);
        };
        let problem = match (
            parse_time(&start_text, now, zone),
            parse_time(&end_text, now, zone),
        ) {
            (Ok(start), Ok(end)) => match ask.approval.check_window(start, end, now) {
                Ok(()) => {
                    return Ok(Some(ApprovalAnswer {
                        justification,
                        start,
                        end,
                    }));
                }
                Err(problem) => problem.to_string(),
            },
            (Err(problem), _) | (_, Err(problem)) => problem.to_string(),
        };
        backend.message(TITLE, &capitalized(&problem), Tone::Warning)?;
    }
    Ok(None)
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
        assert_eq!(answer.end.to_string(), "2026-11-22T13:00:00Z");
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
