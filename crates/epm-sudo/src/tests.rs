#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use epm_ipc::RequestInfo;
use epm_policy::JustificationSpec;
use jiff::Timestamp;

use super::*;

#[derive(Default)]
struct FakeDaemon {
    answers: VecDeque<Result<ElevationVerdict, DaemonError>>,
    reasons: Vec<Option<String>>,
}

impl Daemon for FakeDaemon {
    fn elevate(
        &mut self,
        _elevation: &Elevation,
        reason: Option<&str>,
    ) -> Result<ElevationVerdict, DaemonError> {
        self.reasons.push(reason.map(str::to_owned));
        self.answers.pop_front().unwrap()
    }
}

#[derive(Default)]
struct FakeTerminal {
    answers: VecDeque<Option<String>>,
    said: Vec<String>,
    cancel_after_pauses: Option<usize>,
    pauses: usize,
}

impl Terminal for FakeTerminal {
    fn info(&mut self, text: &str) {
        self.said.push(format!("info: {text}"));
    }
    fn error(&mut self, text: &str) {
        self.said.push(format!("error: {text}"));
    }
    fn ask(&mut self, question: &str) -> Option<String> {
        self.said.push(format!("ask: {question}"));
        self.answers.pop_front().flatten()
    }
    fn cancelled(&mut self) -> bool {
        self.cancel_after_pauses.is_some_and(|n| self.pauses >= n)
    }
    fn pause(&mut self, _how_long: Duration) {
        self.pauses += 1;
    }
}

fn command() -> Command {
    Command {
        program: "/usr/bin/apt".into(),
        argv: vec!["apt".into(), "update".into()],
        run_as: "root".into(),
    }
}

fn elevation() -> Elevation {
    Elevation {
        command: command(),
        env: Vec::new(),
        edit: None,
    }
}

fn request(state: &str) -> RequestInfo {
    RequestInfo {
        id: "r-1".into(),
        user: "alice".into(),
        program: "apt".into(),
        path: "/usr/bin/apt".into(),
        identity: "sha256:00".into(),
        rule_id: "apt".into(),
        justification: "updates".into(),
        start: Timestamp::UNIX_EPOCH,
        end: Timestamp::UNIX_EPOCH,
        state: state.into(),
        state_reason: Some("not today".into()),
        submitted: true,
        created_at: Timestamp::UNIX_EPOCH,
        updated_at: Timestamp::UNIX_EPOCH,
    }
}

fn run(
    answers: Vec<Result<ElevationVerdict, DaemonError>>,
    terminal: &mut FakeTerminal,
) -> (Answer, FakeDaemon) {
    let mut daemon = FakeDaemon {
        answers: answers.into(),
        ..FakeDaemon::default()
    };
    let answer = decide(&Options::default(), &elevation(), &mut daemon, terminal);
    (answer, daemon)
}

#[test]
fn options_parse_and_bad_ones_are_named() {
    let options = Options::parse(&["socket=/run/x.sock", "fail=allow", "timeout=9"]).unwrap();
    assert_eq!(options.socket, PathBuf::from("/run/x.sock"));
    assert_eq!(options.fail, FailMode::Allow);
    assert_eq!(options.timeout, Duration::from_secs(9));
    assert_eq!(Options::parse::<&str>(&[]).unwrap(), Options::default());
    assert!(
        Options::parse(&["fail=maybe"])
            .unwrap_err()
            .contains("fail=deny")
    );
    assert!(
        Options::parse(&["colour=blue"])
            .unwrap_err()
            .contains("unknown plugin option")
    );
    assert!(Options::parse(&["timeout=0"]).is_err());
    assert!(Options::parse(&["socket=relative"]).is_err());
}

#[test]
fn the_command_comes_from_command_info_and_run_argv() {
    let info: Vec<String> = ["command=/usr/bin/apt", "runas_user=root", "cwd=/home/alice"]
        .map(String::from)
        .to_vec();
    let argv: Vec<String> = ["apt", "update"].map(String::from).to_vec();
    assert_eq!(command_from(&info, &argv).unwrap(), command());
    let by_uid: Vec<String> = ["command=/usr/bin/id", "runas_uid=0"]
        .map(String::from)
        .to_vec();
    let parsed = command_from(&by_uid, &[]).unwrap();
    assert_eq!(
        (parsed.run_as.as_str(), parsed.argv),
        ("root", vec!["id".to_owned()])
    );
    assert!(command_from(&[], &argv).is_err());
    for bad in ["command=id", "command=/usr/bin/../bin/sh"] {
        assert!(command_from(&[bad.to_owned()], &argv).is_err(), "{bad}");
    }
}

#[test]
fn sudoedit_is_about_the_files_and_the_environment_goes_along() {
    let info: Vec<String> = ["command=/usr/bin/vi", "runas_uid=0", "sudoedit=true"]
        .map(String::from)
        .to_vec();
    let argv: Vec<String> = ["vi", "--", "/etc/hosts", "/etc/motd"]
        .map(String::from)
        .to_vec();
    let env = vec!["PATH=/usr/bin".to_owned()];
    let elevation = Elevation::from_check(&info, &argv, &env).unwrap();
    assert_eq!(
        elevation.edit,
        Some(vec!["/etc/hosts".to_owned(), "/etc/motd".to_owned()])
    );
    assert_eq!(elevation.env, env);
    assert!(
        elevation
            .what()
            .starts_with("Editing /etc/hosts /etc/motd as "),
        "{}",
        elevation.what()
    );
    assert!(Elevation::from_check(&info, &["vi".to_owned()], &[]).is_err());
    let plain = Elevation::from_check(&info[..2], &argv, &[]).unwrap();
    assert_eq!(plain.edit, None);
}

#[test]
fn allowed_and_denied() {
    let mut terminal = FakeTerminal::default();
    let allowed = ElevationVerdict::Allowed {
        rule_id: Some("apt".into()),
        grant_id: None,
    };
    assert_eq!(run(vec![Ok(allowed)], &mut terminal).0, Answer::Approve);
    let denied = ElevationVerdict::Denied {
        rule_id: None,
        message: "cat as root is not allowed here".into(),
    };
    assert_eq!(run(vec![Ok(denied)], &mut terminal).0, Answer::Reject);
    assert_eq!(
        terminal.said,
        ["error: epm: cat as root is not allowed here"]
    );
}

#[test]
fn a_justification_is_asked_checked_and_sent() {
    let spec = JustificationSpec {
        min_length: 5,
        max_length: 100,
        presets: vec!["Patching for a CVE".into()],
    };
    let needs = ElevationVerdict::NeedsJustification {
        rule_id: "apt".into(),
        message: Some("Say why".into()),
        justification: spec,
    };
    let allowed = ElevationVerdict::Allowed {
        rule_id: Some("apt".into()),
        grant_id: None,
    };
    let mut terminal = FakeTerminal {
        answers: vec![Some("no".into()), Some("1".into())].into(),
        ..FakeTerminal::default()
    };
    let (answer, daemon) = run(vec![Ok(needs.clone()), Ok(allowed)], &mut terminal);
    assert_eq!(answer, Answer::Approve);
    assert_eq!(daemon.reasons, [None, Some("Patching for a CVE".into())]);
    assert!(
        terminal.said.contains(&"info: Say why".to_owned()),
        "{:?}",
        terminal.said
    );
    assert!(
        terminal.said.iter().any(|s| s.starts_with("error:")),
        "too short"
    );

    let mut silent = FakeTerminal::default();
    assert_eq!(run(vec![Ok(needs)], &mut silent).0, Answer::Reject);
    assert!(silent.said.last().unwrap().contains("a reason is required"));
}

#[test]
fn approval_waits_until_granted_or_cancelled() {
    let needs = ElevationVerdict::NeedsApproval {
        rule_id: "apt".into(),
        message: None,
        justification: JustificationSpec::default(),
        max_window_hours: 4,
    };
    let pending = ElevationVerdict::Pending {
        rule_id: "apt".into(),
        request: request("pending"),
    };
    let allowed = ElevationVerdict::Allowed {
        rule_id: Some("apt".into()),
        grant_id: Some(3),
    };
    let mut terminal = FakeTerminal {
        answers: vec![Some("Weekly patching".into())].into(),
        ..FakeTerminal::default()
    };
    let (answer, daemon) = run(
        vec![
            Ok(needs),
            Ok(pending.clone()),
            Ok(pending.clone()),
            Ok(allowed),
        ],
        &mut terminal,
    );
    assert_eq!(answer, Answer::Approve);
    assert_eq!(daemon.reasons.len(), 4);
    assert_eq!(terminal.pauses, 2);
    let waiting: Vec<_> = terminal
        .said
        .iter()
        .filter(|s| s.contains("Waiting for approval… (Ctrl+C to cancel)"))
        .collect();
    assert_eq!(waiting.len(), 1, "said once: {:?}", terminal.said);

    let mut impatient = FakeTerminal {
        cancel_after_pauses: Some(1),
        ..FakeTerminal::default()
    };
    assert_eq!(run(vec![Ok(pending)], &mut impatient).0, Answer::Reject);
    assert!(impatient.said.last().unwrap().contains("cancelled"));

    let rejected = ElevationVerdict::Rejected {
        rule_id: "apt".into(),
        request: request("denied"),
        retry_after: Timestamp::UNIX_EPOCH,
    };
    let mut told = FakeTerminal::default();
    assert_eq!(run(vec![Ok(rejected)], &mut told).0, Answer::Reject);
    assert!(told.said[0].contains("rejected by the administrator: not today"));
}

#[test]
fn an_unreachable_daemon_follows_the_fail_mode() {
    let mut terminal = FakeTerminal::default();
    let gone = || Err(DaemonError::Unreachable("epmd is not running".into()));
    assert_eq!(run(vec![gone()], &mut terminal).0, Answer::Reject);
    assert!(
        terminal.said[0].contains("sudo is denied (fail=deny)"),
        "{:?}",
        terminal.said
    );
    let mut daemon = FakeDaemon {
        answers: vec![gone()].into(),
        ..FakeDaemon::default()
    };
    let open = Options {
        fail: FailMode::Allow,
        ..Options::default()
    };
    assert_eq!(
        decide(&open, &elevation(), &mut daemon, &mut terminal),
        Answer::Approve
    );
}

/// Text from a policy, an approver or a file name reaches sudo's terminal
/// escaped, as it reaches the helper's and `epmctl`'s: a rule message or a
/// reason cannot clear the screen or reverse the text around it.
#[test]
fn untrusted_text_is_shown_escaped() {
    let hostile = "ok\u{1b}[2J\u{202e}txt.exe";
    let escaped = "ok\\u{1b}[2J\\u{202e}txt.exe";

    let denied = ElevationVerdict::Denied {
        rule_id: Some("x".into()),
        message: hostile.into(),
    };
    let mut terminal = FakeTerminal::default();
    assert_eq!(run(vec![Ok(denied)], &mut terminal).0, Answer::Reject);
    assert_eq!(terminal.said, [format!("error: epm: {escaped}")]);

    let mut request = request("denied");
    request.state_reason = Some(hostile.into());
    let rejected = ElevationVerdict::Rejected {
        rule_id: "apt".into(),
        request,
        retry_after: Timestamp::UNIX_EPOCH,
    };
    let mut terminal = FakeTerminal::default();
    run(vec![Ok(rejected)], &mut terminal);
    assert!(terminal.said[0].contains(escaped), "{:?}", terminal.said);

    let needs = ElevationVerdict::NeedsJustification {
        rule_id: "apt".into(),
        message: Some(hostile.into()),
        justification: JustificationSpec {
            presets: vec![hostile.into()],
            ..JustificationSpec::default()
        },
    };
    let mut terminal = FakeTerminal::default();
    run(vec![Ok(needs)], &mut terminal);
    assert!(
        terminal.said.iter().all(|line| !line.contains('\u{1b}')),
        "{:?}",
        terminal.said
    );
    assert!(
        terminal.said.contains(&format!("info:   1) {escaped}")),
        "{:?}",
        terminal.said
    );
}
