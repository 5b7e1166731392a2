use std::io::{BufRead, Write};

use crate::ask::{Backend, PromptError, Tone};

/// Questions on a terminal: for `epmctl` over ssh, or a helper with no
/// desktop. Text is already escaped by the flows; this adds nothing that a
/// terminal would interpret.
#[derive(Debug)]
pub struct Terminal<R, W> {
    input: R,
    output: W,
}

impl Terminal<std::io::BufReader<std::fs::File>, std::fs::File> {
    /// The controlling terminal (`/dev/tty`), so answers come from the
    /// person even when stdin is redirected.
    pub fn open_tty() -> Result<Self, PromptError> {
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")?;
        let output = tty.try_clone()?;
        Ok(Terminal::new(std::io::BufReader::new(tty), output))
    }
}

impl<R: BufRead, W: Write> Terminal<R, W> {
    /// Any reader and writer (tests use buffers).
    pub fn new(input: R, output: W) -> Self {
        Terminal { input, output }
    }

    /// The writer, to inspect what was shown.
    pub fn output(&self) -> &W {
        &self.output
    }
}

/// The ready-made answers as numbered lines (`  1) …`), escaped. Shared
/// with other line-by-line conversations (sudo's), so a number means the
/// same everywhere.
pub fn choice_lines(choices: &[String]) -> impl Iterator<Item = String> + '_ {
    choices
        .iter()
        .enumerate()
        .map(|(i, choice)| format!("  {}) {}", i + 1, crate::display::shown_line(choice)))
}

/// What the input line is introduced with.
pub fn question(choices: &[String], default: &str) -> String {
    match (choices.is_empty(), default.is_empty()) {
        (false, _) => "Type a number or your own text: ".to_owned(),
        (true, false) => format!("[{default}] "),
        (true, true) => "> ".to_owned(),
    }
}

/// The answer a typed line means: a choice's number picks it, an empty
/// line the default, anything else is the typed text.
pub fn answer(line: &str, choices: &[String], default: &str) -> String {
    let line = line.trim();
    if line.is_empty() && !default.is_empty() {
        return default.to_owned();
    }
    if let Ok(n) = line.parse::<usize>()
        && (1..=choices.len()).contains(&n)
    {
        return choices[n - 1].clone();
    }
    line.to_owned()
}

impl<R: BufRead, W: Write> Backend for Terminal<R, W> {
    fn entry(
        &mut self,
        _title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError> {
        writeln!(self.output, "{text}")?;
        for line in choice_lines(choices) {
            writeln!(self.output, "{line}")?;
        }
        write!(self.output, "{}", question(choices, default))?;
        self.output.flush()?;
        let mut line = String::new();
        if self.input.read_line(&mut line)? == 0 {
            writeln!(self.output)?;
            return Ok(None);
        }
        Ok(Some(answer(&line, choices, default)))
    }

    fn message(&mut self, _title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        match tone {
            Tone::Info => writeln!(self.output, "{text}")?,
            Tone::Warning => writeln!(self.output, "! {text}")?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_by_number_defaults_and_end_of_input() {
        let choices = vec!["Container build".to_string(), "Debugging".to_string()];
        let mut term = Terminal::new(&b"2\n\n"[..], Vec::new());
        assert_eq!(
            term.entry("t", "Why?", &choices, "").unwrap().as_deref(),
            Some("Debugging")
        );
        assert_eq!(
            term.entry("t", "Start?", &[], "now").unwrap().as_deref(),
            Some("now")
        );
        assert_eq!(
            term.entry("t", "End?", &[], "+1h").unwrap(),
            None,
            "EOF cancels"
        );
        let shown = String::from_utf8(term.output().clone()).unwrap();
        assert!(
            shown.contains("  1) Container build\n  2) Debugging\n"),
            "{shown}"
        );
        assert!(shown.contains("[now] "), "{shown}");
    }
}
