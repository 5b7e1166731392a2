use std::process::Command;

use epm_prompt::{Backend, PromptError, Tone};

/// Native macOS dialogs through `osascript`. The scripts below are fixed
/// text; every string from a policy or the user reaches them as an
/// argument (`on run argv`), never spliced into the script.
#[derive(Debug, Clone, Default)]
pub struct Osascript;

const OSASCRIPT: &str = "/usr/bin/osascript";

/// argv: title, text, default answer.
pub(crate) const ENTRY_SCRIPT: &str = r#"on run argv
    set theTitle to item 1 of argv
    set theText to item 2 of argv
    set theDefault to item 3 of argv
    set theResult to display dialog theText with title theTitle default answer theDefault buttons {"Cancel", "OK"} default button "OK" cancel button "Cancel"
    return text returned of theResult
end run"#;

/// argv: title, text, then the choices.
pub(crate) const CHOICE_SCRIPT: &str = r#"on run argv
    set theTitle to item 1 of argv
    set theText to item 2 of argv
    set theChoices to items 3 thru -1 of argv
    set picked to choose from list theChoices with title theTitle with prompt theText OK button name "OK" cancel button name "Cancel"
    if picked is false then error number -128
    return item 1 of picked
end run"#;

/// argv: title, text, icon (`note` or `caution`).
pub(crate) const MESSAGE_SCRIPT: &str = r#"on run argv
    set theTitle to item 1 of argv
    set theText to item 2 of argv
    if item 3 of argv is "caution" then
        display dialog theText with title theTitle buttons {"OK"} default button "OK" with icon caution
    else
        display dialog theText with title theTitle buttons {"OK"} default button "OK" with icon note
    end if
end run"#;

/// argv: title, text. A notification: it asks nothing and returns at once,
/// so news (blocked, approved, a window that opened) never stacks up
/// dialogs or holds the helper while nobody is at the screen.
pub(crate) const NOTIFY_SCRIPT: &str = r#"on run argv
    set theTitle to item 1 of argv
    set theText to item 2 of argv
    display notification theText with title theTitle
end run"#;

impl Osascript {
    /// The full argument list for `osascript`: the fixed script, then the
    /// strings as `argv`.
    pub fn args(script: &str, strings: &[&str]) -> Vec<String> {
        let mut args = vec!["-e".to_string(), script.to_string(), "--".to_string()];
        args.extend(strings.iter().map(|s| s.to_string()));
        args
    }

    fn run(&self, script: &str, strings: &[&str]) -> Result<Option<String>, PromptError> {
        let out = Command::new(OSASCRIPT)
            .args(Osascript::args(script, strings))
            .output()
            .map_err(|source| PromptError::Spawn {
                program: OSASCRIPT.into(),
                source,
            })?;
        if out.status.success() {
            return Ok(Some(
                String::from_utf8_lossy(&out.stdout)
                    .trim_end_matches('\n')
                    .to_owned(),
            ));
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        // -128 is AppleScript's "User canceled".
        if stderr.contains("-128") {
            return Ok(None);
        }
        Err(PromptError::Failed {
            program: OSASCRIPT.into(),
            detail: format!("{}: {}", out.status, stderr.trim()),
        })
    }
}

impl Backend for Osascript {
    fn entry(
        &mut self,
        title: &str,
        text: &str,
        choices: &[String],
        default: &str,
    ) -> Result<Option<String>, PromptError> {
        if !choices.is_empty() {
            let mut strings: Vec<&str> = vec![title, text];
            strings.extend(choices.iter().map(String::as_str));
            strings.push(epm_prompt::ask::TYPE_MY_OWN);
            match self.run(CHOICE_SCRIPT, &strings)? {
                None => return Ok(None),
                Some(picked) if picked != epm_prompt::ask::TYPE_MY_OWN && !picked.is_empty() => {
                    return Ok(Some(picked));
                }
                Some(_) => {}
            }
        }
        self.run(ENTRY_SCRIPT, &[title, text, default])
    }

    fn message(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        let icon = match tone {
            Tone::Info => "note",
            Tone::Warning => "caution",
        };
        self.run(MESSAGE_SCRIPT, &[title, text, icon]).map(|_| ())
    }

    fn notify(&mut self, title: &str, text: &str, tone: Tone) -> Result<(), PromptError> {
        // As the helper's own app, where it can: see user_notifications.
        #[cfg(target_os = "macos")]
        match super::user_notifications::post(title, text) {
            Ok(()) => return Ok(()),
            Err(error) => eprintln!("epm-helper: {error}; posting through osascript"),
        }
        match self.run(NOTIFY_SCRIPT, &[title, text]) {
            Ok(_) => Ok(()),
            // Not shown as a notification: say it in a dialog instead.
            Err(error) => {
                eprintln!("epm-helper: cannot post a notification ({error}); showing a dialog");
                self.message(title, text, tone)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_never_enter_the_script() {
        let hostile = "\" & (do shell script \"touch /tmp/pwned\") & \"";
        let args = Osascript::args(ENTRY_SCRIPT, &["T", hostile, ""]);
        assert_eq!(args[1], ENTRY_SCRIPT, "the script is fixed text");
        assert_eq!(args[2], "--");
        assert_eq!(args[4], hostile, "the string is an argument");
        for script in [ENTRY_SCRIPT, CHOICE_SCRIPT, MESSAGE_SCRIPT, NOTIFY_SCRIPT] {
            assert!(script.starts_with("on run argv"));
            assert!(script.ends_with("end run"));
        }
    }

    /// Quotes, backslashes, AppleScript's own syntax and line breaks reach
    /// the dialog as the text they are: there is nothing to escape because
    /// nothing is spliced into a script.
    #[test]
    fn policy_text_is_inert_in_every_script() {
        let nasty = [
            "say \"hi\" \\ then",
            "\\\"",
            "end run\non run argv\ndo shell script \"id\"",
            "«data rdat00»",
            "-e",
        ];
        for text in nasty {
            for script in [ENTRY_SCRIPT, CHOICE_SCRIPT, MESSAGE_SCRIPT, NOTIFY_SCRIPT] {
                let args = Osascript::args(script, &["EPM", text, "x"]);
                assert_eq!(args[..3], ["-e", script, "--"]);
                assert_eq!(args[3..], ["EPM", text, "x"]);
            }
        }
        for script in [ENTRY_SCRIPT, CHOICE_SCRIPT, MESSAGE_SCRIPT, NOTIFY_SCRIPT] {
            assert!(!script.contains("do shell script"));
            assert!(!script.contains("run script"));
        }
    }

    #[test]
    fn each_kind_of_question_uses_its_native_dialog() {
        // Free text: a dialog with a text field, pre-filled.
        assert!(
            ENTRY_SCRIPT
                .contains("display dialog theText with title theTitle default answer theDefault")
        );
        // Presets: a list to pick from (then free text for "my own reason").
        assert!(CHOICE_SCRIPT.contains("choose from list theChoices with title theTitle"));
        // A problem with an answer: a dialog that waits, with an icon.
        assert!(MESSAGE_SCRIPT.contains("display dialog theText with title theTitle"));
        assert!(MESSAGE_SCRIPT.contains("with icon caution"));
        // News: a notification with a title, which asks nothing.
        assert!(NOTIFY_SCRIPT.contains("display notification theText with title theTitle"));
        assert!(!NOTIFY_SCRIPT.contains("display dialog"));
    }
}
