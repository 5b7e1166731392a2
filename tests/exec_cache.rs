//! The kernel cache of allows (issue 17), end to end with real fanotify:
//! a file the policy allows for everyone is answered by the kernel on its
//! next execs, which are still audited (`answered_by: kernel_cache`), and
//! no cached allow outlives the policy, mode or content it was made for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use epm_e2e::{Daemon, denied, policy, ran, run, sha256_of, wait_until};

fn rule(id: &str, action: &str, criteria: &str) -> String {
    format!(r#"{{"id": "{id}", "action": "{action}", "match": {criteria}}}"#)
}

/// The exec records of `path`, in order.
fn execs_of(daemon: &Daemon, path: &Path) -> Vec<serde_json::Value> {
    let path = path.display().to_string();
    daemon
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "exec" && r["path"] == path.as_str())
        .collect()
}

fn from_kernel_cache(record: &serde_json::Value) -> bool {
    record["details"]["answered_by"] == "kernel_cache"
}

/// Runs `path` `times` times (each must run), then waits until it has
/// `times` exec records, and returns them.
fn run_times(daemon: &Daemon, path: &Path, times: usize) -> Vec<serde_json::Value> {
    let before = execs_of(daemon, path).len();
    for _ in 0..times {
        let result = run(path);
        assert!(ran(&result), "{} did not run: {result:?}", path.display());
    }
    wait_until(
        &format!("{times} exec records of {}", path.display()),
        Duration::from_secs(10),
        || execs_of(daemon, path).len() >= before + times,
    );
    // Nothing more trickles in: every exec is audited exactly once.
    std::thread::sleep(Duration::from_millis(300));
    let records = execs_of(daemon, path);
    assert_eq!(
        records.len(),
        before + times,
        "one record per exec of {}: {records:#?}",
        path.display()
    );
    records[before..].to_vec()
}

/// The record of a refused exec of `path`, once it is written.
fn last_deny(daemon: &Daemon, path: &Path) -> serde_json::Value {
    wait_until("a deny record", Duration::from_secs(10), || {
        execs_of(daemon, path)
            .last()
            .is_some_and(|r| r["decision"] == "deny")
    });
    execs_of(daemon, path).pop().unwrap()
}

/// Runs `path` until one of its execs was answered by the kernel cache.
fn cache(daemon: &Daemon, path: &Path) {
    let records = run_times(daemon, path, 3);
    assert!(
        !from_kernel_cache(&records[0]),
        "the first exec is decided by epmd: {:#}",
        records[0]
    );
    assert!(
        records[1..].iter().all(from_kernel_cache),
        "the repeats are answered by the kernel cache: {records:#?}\n{}",
        daemon.log()
    );
}

#[test]
fn repeat_execs_are_answered_by_the_kernel_and_each_is_audited_once() {
    if !epm_e2e::capable() {
        return;
    }
    let daemon = Daemon::start(
        &policy(1, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        "",
    );
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    let records = run_times(&daemon, &tool, 6);
    assert!(!from_kernel_cache(&records[0]), "{:#}", records[0]);
    for record in &records[1..] {
        assert!(from_kernel_cache(record), "{record:#}\n{}", daemon.log());
        assert_eq!(record["decision"], "allow");
        assert_eq!(record["sha256"], sha256_of(&tool).as_str());
        // The user, when the process was still there to ask.
        if record["details"]["process"].is_null() {
            assert_eq!(record["uid"], 0, "{record:#}");
        }
    }
}

#[test]
fn a_policy_change_revokes_cached_allows_before_it_takes_effect() {
    if !epm_e2e::capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    cache(&daemon, &tool);

    daemon.write_policy(&policy(
        2,
        "allow",
        &[rule("no-tool", "deny", r#"{"name": "tool"}"#)],
    ));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    for _ in 0..3 {
        assert!(denied(&run(&tool)), "the new policy denies it at once");
    }
    let last = last_deny(&daemon, &tool);
    assert_eq!(last["rule_id"], "no-tool");

    // And back: allowed (and cached) again under the next policy.
    daemon.write_policy(&policy(3, "allow", &[]));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    cache(&daemon, &tool);
}

#[test]
fn a_write_to_the_file_revokes_its_cached_allow() {
    if !epm_e2e::capable() {
        return;
    }
    let falsy = sha256_of(Path::new("/bin/false"));
    let daemon = Daemon::start(
        &policy(
            1,
            "allow",
            &[rule(
                "no-false",
                "deny",
                &format!(r#"{{"sha256": "{falsy}"}}"#),
            )],
        ),
        "",
    );
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    cache(&daemon, &tool);

    // Same inode, new content: the write clears the kernel's ignore mark.
    std::fs::write(&tool, std::fs::read("/bin/false").unwrap()).unwrap();
    assert!(
        denied(&run(&tool)),
        "the new content is decided, and denied"
    );
    let last = last_deny(&daemon, &tool);
    assert_eq!(last["sha256"], falsy.as_str());
    assert!(!from_kernel_cache(&last));
}

#[test]
fn a_mode_change_leaves_no_cached_allow_and_monitor_passes_are_never_cached() {
    if !epm_e2e::capable() {
        return;
    }
    let mut daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    cache(&daemon, &tool);

    // The mode is set at start: a new mode is a new daemon, whose fanotify
    // group starts with no marks. In monitor mode, what the policy would
    // deny runs and is recorded as would_deny, every time, by epmd.
    daemon.stop();
    daemon.edit_config(|config| format!("mode = \"monitor\"\n{config}"));
    daemon.write_policy(&policy(
        2,
        "allow",
        &[rule("no-tool", "deny", r#"{"name": "tool"}"#)],
    ));
    daemon.restart();
    let records = run_times(&daemon, &tool, 3);
    for record in &records {
        assert_eq!(record["decision"], "would_deny", "{record:#}");
        assert!(!from_kernel_cache(record), "{record:#}");
    }

    // Back to enforce: denied, not let through by anything cached before.
    daemon.stop();
    daemon.edit_config(|config| config.replacen("mode = \"monitor\"\n", "", 1));
    daemon.restart();
    assert!(denied(&run(&tool)));
}

#[test]
fn a_file_whose_decision_depends_on_the_process_is_never_answered_by_the_kernel() {
    if !epm_e2e::capable() {
        return;
    }
    // One rule per kind of process-dependent criterion, none of which
    // matches root's execs here: each file is allowed, by epmd, every time.
    // The plain file under the same policy is cached: per file, not per
    // policy.
    let rules = [
        rule(
            "for-a-user",
            "deny",
            r#"{"name": "by-user"}, "scope": {"users": ["epm-e2e-nobody"]}"#,
        ),
        rule(
            "for-a-group",
            "deny",
            r#"{"name": "by-group"}, "scope": {"groups": ["epm-e2e-nogroup"]}"#,
        ),
        rule(
            "by-arguments",
            "deny",
            r#"{"name": "by-args", "args_regex": "--evil"}"#,
        ),
        rule(
            "by-parent",
            "deny",
            r#"{"name": "by-parent", "parent_path": "/usr/bin/epm-e2e-no-such-parent"}"#,
        ),
    ];
    let daemon = Daemon::start(&policy(1, "allow", &rules), "");
    for name in ["by-user", "by-group", "by-args", "by-parent"] {
        let tool = daemon.mount.install("/bin/true", &format!("bin/{name}"));
        let records = run_times(&daemon, &tool, 4);
        for record in &records {
            assert_eq!(record["decision"], "allow", "{record:#}");
            assert!(
                !from_kernel_cache(record),
                "{name} must be asked every time: {record:#}"
            );
        }
    }
    let plain = daemon.mount.install("/bin/true", "bin/plain");
    cache(&daemon, &plain);
}

#[test]
fn a_file_users_can_write_is_never_answered_by_the_kernel() {
    if !epm_e2e::capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o757)).unwrap();
    let records = run_times(&daemon, &tool, 4);
    assert!(
        records.iter().all(|r| !from_kernel_cache(r)),
        "{records:#?}"
    );
    // A second name for a file: each name is its own decision.
    let linked = daemon.mount.install("/bin/true", "bin/linked");
    std::fs::hard_link(&linked, daemon.mount.path().join("bin/nc")).unwrap();
    let records = run_times(&daemon, &linked, 3);
    assert!(
        records.iter().all(|r| !from_kernel_cache(r)),
        "{records:#?}"
    );
}
