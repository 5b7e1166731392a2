use std::collections::VecDeque;
use std::path::Path;

use crate::ask::{Backend, PromptError, Tone};

/// Answers from a file, for tests and unattended runs; records everything
/// it was shown.
///
/// The file is JSON: `{"answers": ["Debugging ticket 42", "now", "+2h", null]}`.
/// Each entry answers the next question in order; `null` cancels it.
#[derive(Debug, Default)]
pub struct Scripted {
    answers: VecDeque<Option<String>>,
    transcript: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswersFile {
    answers: Vec<Option<String>>,
}

impl Scripted {
    /// Reads an answers file.
    pub fn from_file(path: &Path) -> Result<Scripted, PromptError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PromptError::Script(format!("cannot read {}: {e}", path.display())))?;
        let file: AnswersFile = serde_json::from_str(&text)
            .map_err(|e| PromptError::Script(format!("{}: {e}", path.display())))?;
        Ok(Scripted::from_answers(file.answers))
    }

    /// Uses these answers, in order.
    pub fn from_answers(answers: Vec<Option<String>>) -> Scripted {
        Scripted {
            answers: answers.into(),
            transcript: Vec::new(),
        }
    }

    /// Everything shown so far, one entry per question or message.
    pub fn transcript(&self) -> &[String] {
        &self.transcript
    }
}

impl Backend for Scripted {
    fn entry(
        &mut self,
        title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError> {
        self.transcript.push(format!(
            "ask [{title}] {text} choices={choices:?} default={default:?}"
        ));
        self.answers
            .pop_front()
            .ok_or_else(|| PromptError::Script(format!("no answer left for: {text}")))
    }

    fn message(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        self.transcript.push(format!("{tone:?} [{title}] {text}"));
        Ok(())
    }
}
