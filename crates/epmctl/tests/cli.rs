//! `epmctl` commands that need no daemon, run as a user would run them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn epmctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_epmctl"))
        .args(args)
        .output()
        .expect("epmctl runs")
}

fn example_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy.json")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_accepts_the_example_policy_with_a_summary() {
    let policy = example_policy();
    let out = epmctl(&["policy", "check", policy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("valid, version 7, 6 rules"), "{stdout}");
}

#[test]
fn check_rejects_a_bad_policy_with_one_line_per_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"{"version": 1, "default_action": "allow", "rules": [
            {"id": "a", "action": "deny", "match": {"sha256": "nothex"}},
            {"id": "a", "action": "deny", "match": {"name": "x"}},
            {"id": "w", "action": "approve", "match": {"name": "y"}, "approval": {"max_window_hours": 72}}
        ]}"#,
    )
    .unwrap();
    let out = epmctl(&["policy", "check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines[0].ends_with(r#"rule "a": match.sha256: expected 64 hex digits (a SHA-256), got 6 characters including the non-hex 'n'"#), "{stderr}");
    assert!(
        lines[1].contains(r#"rule "a": id: duplicate rule id"#),
        "{stderr}"
    );
    assert!(
        lines[2].contains(r#"rule "w": approval.max_window_hours: 72 is outside 1..=48"#),
        "{stderr}"
    );

    let out = epmctl(&["policy", "check", "--json", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["valid"], false);
    assert_eq!(value["errors"][2]["field"], "approval.max_window_hours");
}

#[test]
fn check_names_a_missing_file() {
    let out = epmctl(&["policy", "check", "/nonexistent/policy.json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read policy /nonexistent/policy.json"));
}

#[test]
fn explain_prints_the_deciding_rule_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let nc = dir.path().join("nc");
    std::fs::write(&nc, b"not really netcat").unwrap();
    let policy = example_policy();
    let out = epmctl(&[
        "policy",
        "explain",
        "--json",
        "--policy",
        policy.to_str().unwrap(),
        "--user",
        "alice",
        "--groups",
        "staff",
        nc.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["action"], "deny");
    assert_eq!(value["rule_id"], "block-nc");
    assert_eq!(
        value["reason"],
        r#"rule "block-nc" matched by name (general scope)"#
    );
    assert_eq!(value["message"], "netcat is not allowed on company devices");
}

#[test]
fn explain_uses_groups_and_falls_back_to_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let tcpdump = dir.path().join("tcpdump");
    std::fs::write(&tcpdump, b"capture").unwrap();
    let policy = example_policy();
    let explain = |groups: &str| {
        let out = epmctl(&[
            "policy",
            "explain",
            "--json",
            "--policy",
            policy.to_str().unwrap(),
            "--user",
            "alice",
            "--groups",
            groups,
            tcpdump.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // Same specificity (name): the group-scoped allow beats the general justify.
    assert_eq!(
        explain("staff,developers")["rule_id"],
        "developers-may-capture"
    );
    assert_eq!(explain("staff")["rule_id"], "tcpdump-needs-a-reason");

    let other = dir.path().join("ls");
    std::fs::write(&other, b"ls").unwrap();
    let out = epmctl(&[
        "policy",
        "explain",
        "--json",
        "--policy",
        policy.to_str().unwrap(),
        other.to_str().unwrap(),
    ]);
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["action"], "allow");
    assert_eq!(value["rule_id"], serde_json::Value::Null);
    assert_eq!(value["reason"], "no rule matched: default action");
}

#[test]
fn explain_matches_by_digest_regardless_of_name() {
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("innocent-name");
    std::fs::write(&binary, b"known bad bytes").unwrap();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(b"known bad bytes"))
    };
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        format!(
            r#"{{"version": 1, "default_action": "allow", "rules": [
                {{"id": "bad", "action": "deny", "match": {{"sha256": "{}"}}}}]}}"#,
            digest.to_uppercase()
        ),
    )
    .unwrap();
    let out = epmctl(&[
        "policy",
        "explain",
        "--policy",
        policy.to_str().unwrap(),
        binary.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("deny "), "{stdout}");
    assert!(
        stdout.contains(r#"rule "bad" matched by sha256"#),
        "{stdout}"
    );
}

#[test]
fn explain_refuses_an_invalid_policy_and_points_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(&policy, "{").unwrap();
    let out = epmctl(&[
        "policy",
        "explain",
        "--policy",
        policy.to_str().unwrap(),
        "/bin/sh",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("run `epmctl policy check"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_teaches_by_example() {
    let out = epmctl(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("epmctl policy explain --policy"));
}
