//! The sudo plugin's argument vectors: sudo's NULL-terminated `char *[]`
//! lists as the C side copies them, the plugin options of its
//! `/etc/sudo.conf` line, `check`'s `command_info`, `run_argv` and
//! `run_envp` (sudoedit's files included), and the conversation that
//! follows with epmd's verdicts and the user's answers scripted.
//!
//! Input: NUL-separated lists, entries one a line: plugin options,
//! command_info, run_argv, run_envp, then epmd's verdicts (JSON, one a line;
//! epmd becomes unreachable after the last) and the user's answers.
#![no_main]

use std::collections::VecDeque;
use std::ffi::{CString, c_char};
use std::time::Duration;

use epm_ipc::ElevationVerdict;
use epm_sudo::{Answer, Daemon, DaemonError, Elevation, Options, Terminal, decide};
use libfuzzer_sys::fuzz_target;

struct Scripted(VecDeque<String>);

impl Daemon for Scripted {
    fn elevate(
        &mut self,
        _elevation: &Elevation,
        _reason: Option<&str>,
    ) -> Result<ElevationVerdict, DaemonError> {
        match self.0.pop_front() {
            None => Err(DaemonError::Unreachable("the script ended".into())),
            Some(line) => {
                serde_json::from_str(&line).map_err(|e| DaemonError::Refused(e.to_string()))
            }
        }
    }
}

struct User(VecDeque<String>, usize);

impl Terminal for User {
    fn info(&mut self, text: &str) {
        self.1 += text.len();
    }
    fn error(&mut self, text: &str) {
        self.1 += text.len();
    }
    fn ask(&mut self, question: &str) -> Option<String> {
        self.1 += question.len();
        self.0.pop_front()
    }
    fn cancelled(&mut self) -> bool {
        false
    }
    fn pause(&mut self, _how_long: Duration) {}
}

/// The list as sudo hands it over, and as the plugin copies it back.
fn through_c(list: &[String]) -> Vec<String> {
    let owned: Vec<CString> = list
        .iter()
        .map(|s| CString::new(s.as_str()).expect("no NUL inside an entry"))
        .collect();
    let mut pointers: Vec<*const c_char> = owned.iter().map(|s| s.as_ptr()).collect();
    pointers.push(std::ptr::null());
    // SAFETY: a NULL-terminated array of NUL-terminated strings, alive
    // for the call.
    unsafe { epm_sudo::ffi::strings(pointers.as_ptr()) }
}

fuzz_target!(|data: &[u8]| {
    let mut sections = data.split(|&b| b == 0);
    let mut list = || -> Vec<String> {
        match sections.next() {
            Some(bytes) if !bytes.is_empty() => String::from_utf8_lossy(bytes)
                .split('\n')
                .map(str::to_owned)
                .collect(),
            _ => Vec::new(),
        }
    };
    let options = list();
    let command_info = list();
    let run_argv = list();
    let run_envp = list();
    let verdicts = list();
    let answers = list();
    for section in [&options, &command_info, &run_argv, &run_envp] {
        assert_eq!(&through_c(section), section);
    }
    // SAFETY: null is an empty list.
    assert!(unsafe { epm_sudo::ffi::strings(std::ptr::null()) }.is_empty());
    let options = match Options::parse(&options) {
        Ok(options) => options,
        Err(error) => {
            assert!(error.starts_with("epm: "));
            Options::default()
        }
    };
    let _ = epm_sudo::value_of(&command_info, "command");
    let elevation = match Elevation::from_check(&command_info, &run_argv, &run_envp) {
        Ok(elevation) => elevation,
        Err(error) => {
            assert!(!error.is_empty());
            return;
        }
    };
    assert!(elevation.command.program.starts_with('/'));
    assert!(!elevation.command.program.split('/').any(|c| c == ".."));
    assert!(!elevation.command.argv.is_empty());
    if let Some(files) = &elevation.edit {
        assert!(!files.is_empty());
    }
    let answer = decide(
        &options,
        &elevation,
        &mut Scripted(verdicts.into()),
        &mut User(answers.into(), 0),
    );
    let _ = answer == Answer::Approve;
});
