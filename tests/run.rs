//! `epmctl run` end to end: a real epmd starts commands for a real user
//! made by the test, through the real epmctl, on pipes.
#![allow(clippy::unwrap_used)]

use epm_e2e::run::{epmctl_run, stderr, stdout};
use epm_e2e::{Daemon, TestUser, capable};

/// Elevation rules (docs/policy.md): `/usr/bin/*` paths have rules, the
/// same programs under `/bin` fall to the default (allow).
const ELEVATION_POLICY: &str = r#"{"version":1,"default_action":"allow","rules":[],"elevation":[
    {"id":"id-ok","action":"allow","match":{"path":"/usr/bin/id"}},
    {"id":"no-cat","action":"deny","match":{"path":"/usr/bin/cat"},"message":"cat as root is not allowed here"},
    {"id":"why-sh","action":"justify","match":{"path":"/usr/bin/sh"}}]}"#;

fn daemon(policy: &str) -> Daemon {
    let daemon = Daemon::start(policy, "");
    daemon.open_to_users();
    daemon
}

/// Elevation rules that let these tests' programs run as root, and `id`
/// as nobody.
const RUN_POLICY: &str = r#"{"version":1,"default_action":"allow","rules":[],"elevation":[
    {"id":"id","action":"allow","match":{"name":"id"}},
    {"id":"id-nobody","action":"allow","match":{"name":"id"},"run_as":"nobody"},
    {"id":"sh","action":"allow","match":{"path":"/bin/sh"}},
    {"id":"cat","action":"allow","match":{"name":"cat"}}]}"#;

#[test]
fn a_command_runs_as_root_for_a_user() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2erunid");
    let daemon = daemon(RUN_POLICY);
    let out = epmctl_run(&daemon, &user, &["run", "--", "/usr/bin/id", "-u"], b"");
    assert_eq!(stdout(&out), "0\n", "{}\n{}", stderr(&out), daemon.log());
    assert_eq!(out.status.code(), Some(0));

    // A bare name goes through PATH; --user picks another user.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let out = epmctl_run(
        &daemon,
        &user,
        &["run", "--user", "nobody", "id", "-u"],
        b"",
    );
    assert_eq!(
        stdout(&out),
        format!("{}\n", nobody.uid),
        "{}",
        stderr(&out)
    );

    let out = epmctl_run(&daemon, &user, &["run", "--", "no-such-command-epm"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("epmctl: command not found: no-such-command-epm"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn exit_status_output_and_stdin_reach_the_caller() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2erunio");
    let daemon = daemon(RUN_POLICY);
    let out = epmctl_run(
        &daemon,
        &user,
        &[
            "run",
            "--",
            "/bin/sh",
            "-c",
            "echo out; echo err >&2; exit 7",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        stderr(&out),
        daemon.log()
    );
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");
    let ended = daemon.wait_for_record("the run's end", |r| {
        r["event"] == "elevation_ended" && r["details"]["exit_code"] == 7
    });
    assert_eq!(ended["user"], user.name.as_str(), "{ended}");
    assert_eq!(ended["rule_id"], "sh", "{ended}");
    let started = daemon.wait_for_record("the run's start", |r| {
        r["event"] == "elevation_started" && r["pid"] == ended["pid"]
    });
    assert_eq!(started["details"]["run_as"], "root", "{started}");

    let out = epmctl_run(
        &daemon,
        &user,
        &["run", "--", "/bin/cat"],
        b"line one\nline two\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "line one\nline two\n");

    // A command a signal ends: 128 + the signal, as a shell reports it.
    let out = epmctl_run(
        &daemon,
        &user,
        &["run", "--", "/bin/sh", "-c", "kill -TERM $$"],
        b"",
    );
    assert_eq!(out.status.code(), Some(128 + 15), "{}", stderr(&out));
}

#[test]
fn a_denied_command_prints_the_policy_message() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2erundeny");
    let daemon = daemon(ELEVATION_POLICY);
    let out = epmctl_run(
        &daemon,
        &user,
        &["run", "--", "/usr/bin/cat", "/etc/hostname"],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}\n{}",
        stderr(&out),
        daemon.log()
    );
    assert!(
        stderr(&out).contains("cat as root is not allowed here"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "", "it did not run");

    let out = epmctl_run(&daemon, &user, &["run", "--", "/usr/bin/id", "-u"], b"");
    assert_eq!(stdout(&out), "0\n", "{}", stderr(&out));

    // A copy where others than root could swap it between the decision
    // and the start is never run as root, whatever the rules say.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("id");
    std::fs::copy("/usr/bin/id", &copy).unwrap();
    let out = epmctl_run(&daemon, &user, &["run", "--", copy.to_str().unwrap()], b"");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("only root can change"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn a_justified_command_runs_and_the_audit_has_the_reason() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2erunwhy");
    let daemon = daemon(ELEVATION_POLICY);
    // No terminal and no --reason: nothing to ask with.
    let out = epmctl_run(
        &daemon,
        &user,
        &["run", "--", "/usr/bin/sh", "-c", "echo ran"],
        b"",
    );
    assert_ne!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("--reason"), "{}", stderr(&out));
    assert_eq!(stdout(&out), "");

    let reason = "Checking the shell for INC-7";
    let out = epmctl_run(
        &daemon,
        &user,
        &[
            "run",
            "--reason",
            reason,
            "--",
            "/usr/bin/sh",
            "-c",
            "echo ran",
        ],
        b"",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        daemon.log()
    );
    assert_eq!(stdout(&out), "ran\n");
    let record = daemon.wait_for_record("the justified elevation", |r| {
        r["event"] == "elevation_allowed" && r["details"]["justification"] == reason
    });
    assert_eq!(record["user"], user.name);
    assert_eq!(record["rule_id"], "why-sh");
}
