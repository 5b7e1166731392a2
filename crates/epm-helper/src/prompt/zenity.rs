use std::path::PathBuf;
use std::process::Command;

use epm_prompt::{Backend, PromptError, Tone};

/// Dialogs on a Linux desktop through `zenity`. Every string is one
/// argument (no shell), and markup is turned off or escaped, so a rule
/// message of `<b>x</b>` shows those characters.
#[derive(Debug, Clone)]
pub struct Zenity {
    program: PathBuf,
}

impl Zenity {
    /// `zenity` from `PATH`, if there is one and a display to show it on.
    pub fn detect() -> Option<Zenity> {
        let display = std::env::var_os("DISPLAY").or_else(|| std::env::var_os("WAYLAND_DISPLAY"));
        display?;
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("zenity"))
            .find(|p| p.is_file())
            .map(|program| Zenity { program })
    }

    /// The arguments for a one-line question.
    pub fn entry_args(title: &str, text: &str, default: &str) -> Vec<String> {
        // The entry dialog has no --no-markup, so its label is escaped.
        vec![
            "--entry".into(),
            format!("--title={title}"),
            format!("--text={}", escape_markup(text)),
            format!("--entry-text={default}"),
        ]
    }

    /// The arguments for a pick-one list with the presets.
    pub fn list_args(title: &str, text: &str, choices: &[String]) -> Vec<String> {
        let mut args = vec![
            "--list".into(),
            format!("--title={title}"),
            format!("--text={}", escape_markup(text)),
            "--column=Reason".into(),
            "--hide-header".into(),
        ];
        args.extend(choices.iter().cloned());
        args.push(epm_prompt::ask::TYPE_MY_OWN.into());
        args
    }

    /// The arguments for a message.
    pub fn message_args(title: &str, text: &str, tone: Tone) -> Vec<String> {
        vec![
            match tone {
                Tone::Info => "--info".into(),
                Tone::Warning => "--warning".into(),
            },
            "--no-markup".into(),
            format!("--title={title}"),
            format!("--text={text}"),
        ]
    }

    /// Runs zenity: `Some(stdout)` on OK, `None` on Cancel or close.
    fn run(&self, args: &[String]) -> Result<Option<String>, PromptError> {
        let name = self.program.display().to_string();
        let out = Command::new(&self.program)
            .args(args)
            .output()
            .map_err(|source| PromptError::Spawn {
                program: name.clone(),
                source,
            })?;
        match out.status.code() {
            Some(0) => Ok(Some(
                String::from_utf8_lossy(&out.stdout)
                    .trim_end_matches('\n')
                    .to_owned(),
            )),
            // 1: Cancel, 5: timeout, -1/None: closed.
            Some(1) | Some(5) | Some(-1) => Ok(None),
            _ => Err(PromptError::Failed {
                program: name,
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }),
        }
    }
}

/// Pango markup's three special characters.
pub(crate) fn escape_markup(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Backend for Zenity {
    fn entry(
        &mut self,
        title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError> {
        if !choices.is_empty() {
            match self.run(&Zenity::list_args(title, text, choices))? {
                None => return Ok(None),
                Some(picked) if picked != epm_prompt::ask::TYPE_MY_OWN && !picked.is_empty() => {
                    return Ok(Some(picked));
                }
                Some(_) => {}
            }
        }
        self.run(&Zenity::entry_args(title, text, default))
    }

    fn message(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        self.run(&Zenity::message_args(title, text, tone))
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_stay_single_arguments_and_markup_is_inert() {
        let args = Zenity::entry_args("T", "<b>bold</b> & co", "now");
        assert_eq!(args[2], "--text=&lt;b&gt;bold&lt;/b&gt; &amp; co");
        let args = Zenity::message_args("T", "<i>x</i>; rm -rf /", Tone::Warning);
        assert!(args.contains(&"--no-markup".to_string()));
        assert_eq!(args[3], "--text=<i>x</i>; rm -rf /");
        let args = Zenity::list_args("T", "Why?", &["--help".to_string()]);
        assert_eq!(
            args[5], "--help",
            "a preset is a column value, one argument"
        );
    }
}
