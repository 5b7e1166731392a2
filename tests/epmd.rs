//! `epmd` end to end: real fanotify, real execs, real SQLite and audit files,
//! the real `epmd` and `epmctl` binaries. Each test gates its own tmpfs.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;

use epm_e2e::{Daemon, capable, denied, policy, ran, run, sha256_of, with_interpreter};

fn rule(id: &str, action: &str, criteria: &str) -> String {
    format!(r#"{{"id": "{id}", "action": "{action}", "match": {criteria}}}"#)
}

#[test]
fn a_sha256_rule_denies_that_binary_only_until_its_bytes_change() {
    if !capable() {
        return;
    }
    let staging = tempfile::tempdir().unwrap();
    let target = staging.path().join("tool");
    std::fs::copy("/bin/true", &target).unwrap();
    let digest = sha256_of(&target);
    let daemon = Daemon::start(
        &policy(
            1,
            "allow",
            &[rule(
                "no-tool",
                "deny",
                &format!(r#"{{"sha256": "{}"}}"#, digest.to_uppercase()),
            )],
        ),
        "",
    );
    let tool = daemon.mount.install("/bin/true", "tool");
    let renamed = daemon.mount.install("/bin/true", "innocent-name");
    let other = daemon.mount.install("/bin/false", "other");

    assert!(
        denied(&run(&tool)),
        "the copied binary must fail with EPERM"
    );
    assert!(
        denied(&run(&renamed)),
        "the digest follows the bytes, not the name"
    );
    let result = run(&other);
    assert!(ran(&result), "other binaries run: {result:?}");

    // New bytes, new hash: the rule no longer applies.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&tool)
        .unwrap()
        .write_all(b"\0")
        .unwrap();
    assert!(
        run(&tool).unwrap().success(),
        "a modified binary is a different binary"
    );

    let deny = daemon.wait_for_record("for the sha256 deny", |r| {
        r["event"] == "exec" && r["decision"] == "deny"
    });
    assert_eq!(deny["rule_id"], "no-tool");
    assert_eq!(deny["sha256"], digest);
    assert_eq!(deny["device_id"], "e2e-device");
    let status = daemon.status();
    assert!(status["counters"]["denied"].as_u64().unwrap() >= 2);
    assert!(status["latency_us"]["p50"].as_f64().is_some());
}

#[test]
fn path_glob_and_name_rules() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start("{}", ""); // replaced below, once the mount path is known
    let root = daemon.mount.path().display().to_string();
    daemon.write_policy(&policy(
        2,
        "allow",
        &[
            rule("no-nc", "deny", r#"{"name": "nc"}"#),
            rule(
                "no-blocked-dir",
                "deny",
                &format!(r#"{{"path_glob": "{root}/blocked/**"}}"#),
            ),
        ],
    ));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    let nc = daemon.mount.install("/bin/true", "bin/nc");
    let deep = daemon.mount.install("/bin/true", "blocked/sub/dir/tool");
    let fine = daemon.mount.install("/bin/true", "bin/ncat");
    assert!(denied(&run(&nc)));
    assert!(denied(&run(&deep)), "** crosses directories");
    assert!(ran(&run(&fine)), "name is exact: ncat is not nc");
    let records = daemon.wait_for_record("for the glob deny", |r| r["rule_id"] == "no-blocked-dir");
    assert_eq!(records["decision"], "deny");
}

#[test]
fn monitor_mode_allows_and_audits_would_deny() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(
        &policy(3, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        r#"mode = "monitor""#,
    );
    let nc = daemon.mount.install("/bin/true", "nc");
    assert!(run(&nc).unwrap().success(), "monitor mode never blocks");
    let record = daemon.wait_for_record("for nc", |r| {
        r["event"] == "exec" && r["rule_id"] == "no-nc"
    });
    assert_eq!(record["decision"], "would_deny");
    assert_eq!(record["action"], "deny");
    assert_eq!(record["mode"], "monitor");
    assert_eq!(daemon.status()["counters"]["would_deny"], 1);
}

#[test]
fn default_deny_with_an_allow_rule() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start("{}", "");
    let root = daemon.mount.path().display().to_string();
    daemon.write_policy(&policy(
        4,
        "deny",
        &[rule(
            "tools",
            "allow",
            &format!(r#"{{"path_glob": "{root}/approved/*"}}"#),
        )],
    ));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    let approved = daemon.mount.install("/bin/true", "approved/tool");
    let stray = daemon.mount.install("/bin/true", "stray/tool");
    assert!(run(&approved).unwrap().success());
    assert!(denied(&run(&stray)));
    let record = daemon.wait_for_record("for the stray tool", |r| {
        r["path"] == stray.display().to_string()
    });
    assert_eq!(record["rule_id"], serde_json::Value::Null);
    assert_eq!(record["reason"], "no rule matched: default action");
}

#[test]
fn sighup_reloads_and_a_broken_file_keeps_the_last_good_policy() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let nc = daemon.mount.install("/bin/true", "nc");
    assert!(ran(&run(&nc)));

    daemon.write_policy(&policy(
        2,
        "allow",
        &[rule("no-nc", "deny", r#"{"name": "nc"}"#)],
    ));
    let loaded = daemon.reload();
    assert_eq!(loaded["event"], "policy_loaded");
    assert_eq!(loaded["policy_version"], 2);
    assert!(
        denied(&run(&nc)),
        "the reloaded policy applies at once (no stale cached allow)"
    );

    daemon.write_policy(r#"{"version": 3, "default_action": "allow", "rules": [{"id": "x"}]}"#);
    let rejected = daemon.reload();
    assert_eq!(rejected["event"], "policy_rejected");
    assert_eq!(rejected["policy_version"], 2, "the kept version");
    assert!(
        rejected["reason"].as_str().unwrap().contains("rule \"x\""),
        "{rejected}"
    );
    assert!(denied(&run(&nc)), "the last good policy stays in force");
    assert_eq!(daemon.status()["policy"]["version"], 2);
}

#[test]
fn audit_verify_passes_then_names_an_edit_and_a_deletion() {
    if !capable() {
        return;
    }
    let mut daemon = Daemon::start(
        &policy(1, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        "",
    );
    let nc = daemon.mount.install("/bin/true", "nc");
    let ok = daemon.mount.install("/bin/true", "ok");
    for _ in 0..3 {
        assert!(denied(&run(&nc)));
        assert!(ran(&run(&ok)));
    }
    daemon.stop();
    let log = daemon.audit_log();
    let verify = |path: &Path| daemon.epmctl(&["audit", "verify", path.to_str().unwrap()]);

    let out = verify(&log);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("intact: "));

    let original = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    // Turn a recorded deny into an allow.
    let (index, line) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.contains(r#""decision":"deny""#))
        .unwrap();
    let seq = serde_json::from_str::<serde_json::Value>(line).unwrap()["seq"].clone();
    let mut edited = lines.clone();
    let forged = line.replace(r#""decision":"deny""#, r#""decision":"allow""#);
    edited[index] = &forged;
    std::fs::write(&log, edited.join("\n") + "\n").unwrap();
    let out = verify(&log);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("(seq {seq}): hash mismatch")),
        "{report}"
    );

    // Delete that record instead: the one after it is named.
    let mut deleted = lines.clone();
    deleted.remove(index);
    std::fs::write(&log, deleted.join("\n") + "\n").unwrap();
    let out = verify(&log);
    assert_eq!(out.status.code(), Some(1));
    let next = seq.as_u64().unwrap() + 1;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains(&format!("(seq {next}): expected seq {seq}")),
        "{report}"
    );

    std::fs::write(&log, original).unwrap();
    assert_eq!(verify(&log).status.code(), Some(0));
}

#[test]
fn kill_9_and_restart_keeps_the_sequence_and_the_chain() {
    if !capable() {
        return;
    }
    let mut daemon = Daemon::start(
        &policy(1, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        "",
    );
    let nc = daemon.mount.install("/bin/true", "nc");
    assert!(denied(&run(&nc)));
    let before = daemon.wait_for_record("for the first deny", |r| r["event"] == "exec");
    let status = daemon.status();
    let last_before = status["audit_last_seq"].as_u64().unwrap();
    assert!(last_before >= before["seq"].as_u64().unwrap());

    daemon.kill9();
    daemon.restart();
    assert!(denied(&run(&nc)), "enforcing again after the restart");
    daemon.wait_for_record("after the restart", |r| {
        r["event"] == "exec" && r["seq"].as_u64().unwrap() > last_before
    });
    daemon.stop();

    let records: Vec<serde_json::Value> = std::fs::read_to_string(daemon.audit_log())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "contiguous across the crash"
    );
    assert!(
        records
            .iter()
            .any(|r| r["seq"] == before["seq"] && r["hash"] == before["hash"]),
        "nothing committed was lost"
    );
    let starts = records
        .iter()
        .filter(|r| r["event"] == "daemon_started")
        .count();
    assert_eq!(starts, 2);
    let out = daemon.epmctl(&["audit", "verify", daemon.audit_log().to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn garbage_and_oversized_frames_leave_the_daemon_serving() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    for bad in [
        &b"\x00\x00\x00\x05hello"[..],
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x02{}",
        b"garbage",
    ] {
        let mut stream = UnixStream::connect(daemon.socket()).unwrap();
        let _ = stream.write_all(bad);
        drop(stream);
    }
    assert_eq!(daemon.status()["mode"], "enforce", "still serving");
    let nc = daemon.mount.install("/bin/true", "anything");
    assert!(ran(&run(&nc)), "still gating");
}

#[test]
fn a_loader_is_part_of_its_programs_exec_and_any_other_interpreter_is_decided() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(
        &policy(
            1,
            "allow",
            &[rule("no-id", "deny", r#"{"name": "epm-id"}"#)],
        ),
        "",
    );
    let head = std::fs::read("/bin/true").unwrap();
    let loader = epm_agent::gate::interp::interpreter(&head[..epm_agent::gate::interp::HEAD_BYTES])
        .unwrap()
        .to_owned();
    let ld = daemon.mount.install(&loader, "epm-ld");
    let denied_program = daemon.mount.install("/usr/bin/id", "epm-id");

    // The loader, on the gated mount: one record, the program's.
    let (tool, _link) = with_interpreter(&daemon, "tool", &ld);
    assert!(ran(&run(&tool)), "{}", daemon.log());
    daemon.wait_for_record("the program", |r| {
        r["event"] == "exec" && r["path"] == tool.to_str().unwrap()
    });
    // A program naming a denied program as its interpreter does not run it.
    let (sneaky, _link2) = with_interpreter(&daemon, "sneaky", &denied_program);
    assert!(
        denied(&run(&sneaky)),
        "the denied program ran as an interpreter"
    );
    daemon.wait_for_record("the refused interpreter", |r| {
        r["event"] == "exec" && r["rule_id"] == "no-id" && r["decision"] == "deny"
    });
    let loads = daemon
        .audit()
        .iter()
        .filter(|r| r["event"] == "exec" && r["path"] == ld.to_str().unwrap())
        .count();
    assert_eq!(loads, 0, "the loader's load is part of the program's exec");
}

#[test]
fn a_user_over_the_connection_quota_is_told_why_and_served_again_later() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let endpoint = epm_ipc::Endpoint::Socket(daemon.socket());
    // Sixteen open connections (say, audit followers) fill root's quota.
    let held: Vec<epm_ipc::Client> = (0..16)
        .map(|_| epm_ipc::Client::connect(&endpoint, "e2e follower").unwrap())
        .collect();
    let out = daemon.epmctl(&["status"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("too many connections from your user (16 open)"),
        "{said}"
    );
    drop(held);
    // Served again once they are closed (the daemon notices as it reads).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !daemon.epmctl(&["status"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "still refused");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn users_see_only_their_own_audit_records_and_not_the_policy() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "tool");
    assert!(ran(&run(&tool)));
    daemon.wait_for_record("for root's exec", |r| r["event"] == "exec");
    // nobody (65534) asks through the same socket.
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(epm_e2e::binary("epmctl"))
            .arg("--socket")
            .arg(daemon.socket())
            .args(args)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let out = as_nobody(&["audit", "tail", "-n", "100", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "root's records are not nobody's"
    );
    let out = as_nobody(&["policy", "show"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin group"));
    assert!(
        as_nobody(&["status"]).status.success(),
        "anyone may read the status"
    );
}

#[test]
fn parent_path_rules_see_the_parent_even_when_turned_on_by_a_reload() {
    if !capable() {
        return;
    }
    // Starts without any parent_path rule: the gate skips the parent lookup.
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "child-tool");
    assert!(ran(&run(&tool)));
    let me = std::env::current_exe().unwrap().display().to_string();
    daemon.write_policy(&policy(
        2,
        "allow",
        &[rule(
            "not-from-tests",
            "deny",
            &format!(r#"{{"name": "child-tool", "parent_path": "{me}"}}"#),
        )],
    ));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    assert!(
        denied(&run(&tool)),
        "this test process is the parent: denied"
    );
    // A shell's child has the shell as its parent: the rule does not apply.
    // (`sh -c "exec tool"` would not do: there the shell itself execs, and
    // its parent is still this process.)
    let via_shell = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{} && true", tool.display()))
        .status()
        .unwrap();
    assert!(via_shell.success(), "a different parent: allowed");
}

#[test]
fn without_privileges_epmd_says_what_to_do_and_leaves_nothing_behind() {
    if !capable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let config = dir.path().join("epmd.toml");
    std::fs::write(
        &config,
        "state_dir = \"state\"\nsocket = \"epmd.sock\"\n[gate]\nwatch_paths = [\"/tmp\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(epm_e2e::binary("epmd"))
        .arg("--config")
        .arg(&config)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run epmd as root"), "{stderr}");
    assert!(
        !dir.path().join("epmd.sock").exists(),
        "the socket is removed"
    );
    let audit = std::fs::read_to_string(dir.path().join("state/audit.jsonl")).unwrap();
    assert!(
        audit.contains("cannot gate execs"),
        "the failure is audited: {audit}"
    );
}
