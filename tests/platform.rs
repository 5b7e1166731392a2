//! epmd managed by a real epm-platform over real TLS on 127.0.0.1: policy
//! delivery, signature pinning, offline enforcement, and the audit arriving
//! exactly once.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::Command;

use epm_e2e::platform::Platform;
use epm_e2e::{Daemon, TestUser, capable, denied, policy, ran, run, sha256_of};

fn deny_sha256(id: &str, sha256: &str) -> String {
    format!(
        r#"{{"id": "{id}", "action": "deny", "match": {{"sha256": "{sha256}"}}, "message": "blocked by the e2e platform"}}"#
    )
}

/// `epmctl sync`; returns whether it succeeded and what it printed.
fn sync(daemon: &Daemon) -> (bool, String) {
    let out = daemon.epmctl(&["sync"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn synced(daemon: &Daemon) {
    let (ok, text) = sync(daemon);
    assert!(
        ok,
        "epmctl sync failed: {text}\nepmd log:\n{}",
        daemon.log()
    );
}

/// Waits until the agent's audit holds at least `n` exec records with this
/// decision (records are written in batches); returns how many it holds.
fn wait_for_count(daemon: &Daemon, decision: &str, n: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let count = daemon
            .audit()
            .iter()
            .filter(|r| r["event"] == "exec" && r["decision"] == decision)
            .count();
        if count >= n {
            return count;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {count} {decision} records, expected {n}; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A tool on the daemon's mount that the platform's policy 1 denies by its
/// SHA-256, enforced after one sync.
fn tool_denied_by_the_platform(platform: &Platform, daemon: &Daemon) -> std::path::PathBuf {
    let program = daemon.mount.install("/usr/bin/true", "tool");
    platform.push(
        &policy(1, "allow", &[deny_sha256("no-tool", &sha256_of(&program))]),
        &[],
    );
    synced(daemon);
    assert!(denied(&run(&program)), "denied after one sync");
    program
}

fn managed(platform: &Platform, device: &str) -> Daemon {
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    daemon
}

#[test]
fn a_pushed_deny_is_enforced_after_one_sync() {
    if !capable() {
        return;
    }
    let platform = Platform::start();
    let daemon = managed(&platform, "e2e-enforce");
    let program = daemon.mount.install("/usr/bin/true", "tool");
    assert!(ran(&run(&program)), "nothing denies it yet");

    platform.push(
        &policy(1, "allow", &[deny_sha256("no-tool", &sha256_of(&program))]),
        &[],
    );
    assert!(ran(&run(&program)), "not before the agent syncs");
    synced(&daemon);
    assert!(denied(&run(&program)), "denied after one sync");

    let record = daemon.wait_for_record("deny of the tool", |r| {
        r["decision"] == "deny" && r["rule_id"] == "no-tool"
    });
    assert_eq!(record["device_id"], "e2e-enforce");
    let status = daemon.status();
    assert_eq!(status["platform"]["last_ok"], true, "{status}");
    let devices = platform.ok(&["devices", "list"]);
    assert!(devices.contains("e2e-enforce"), "{devices}");
}

#[test]
fn a_bundle_signed_with_another_key_is_refused_and_the_last_good_policy_stays() {
    if !capable() {
        return;
    }
    let mut platform = Platform::start();
    let daemon = managed(&platform, "e2e-forged");
    let program = tool_denied_by_the_platform(&platform, &daemon);

    // The platform's signing key is replaced (stolen database, rogue
    // server): what it signs now must not be enforced.
    platform.kill();
    let other = epm_api::sign::PolicySigningKey::generate();
    std::fs::write(
        platform.data_dir().join("signing-key.pem"),
        other.to_pkcs8_pem().unwrap(),
    )
    .unwrap();
    std::fs::write(
        platform.data_dir().join("signing-key.pub"),
        format!("{}\n", other.public_key()),
    )
    .unwrap();
    platform.restart();
    platform.push(&policy(2, "allow", &[]), &[]);
    let (ok, text) = sync(&daemon);
    assert!(!ok, "a forged bundle must not count as a good sync: {text}");

    assert!(denied(&run(&program)), "the last good policy stays");
    let rejected = daemon.wait_for_record("policy_rejected", |r| r["event"] == "policy_rejected");
    let reason = rejected.to_string();
    assert!(
        reason.contains("signed by") || reason.contains("signature"),
        "{reason}"
    );
}

#[test]
fn the_signing_key_is_rotated_without_a_refused_bundle() {
    if !capable() {
        return;
    }
    let mut platform = Platform::start();
    let mut daemon = managed(&platform, "e2e-rotate");
    let program = tool_denied_by_the_platform(&platform, &daemon);
    let pinned = |keys: &[&str]| {
        let list: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
        format!("policy_public_key = [{}]", list.join(", "))
    };
    let old = platform.ok(&["signing-key", "show"]);
    let old = old
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("in use: ")
        .to_owned();

    // 1-2. The next key waits; agents pin both.
    let new = platform.ok(&["signing-key", "next"]).trim().to_owned();
    daemon.stop();
    daemon.edit_config(|config| {
        config.replace(
            &format!("policy_public_key = {old:?}"),
            &pinned(&[&old, &new]),
        )
    });
    daemon.restart();
    synced(&daemon);
    assert!(denied(&run(&program)), "still the policy in force");

    // 3. The platform signs with the next key: the bundle in force is
    // signed anew at the next check-in.
    platform.kill();
    assert_eq!(platform.ok(&["signing-key", "promote"]).trim(), new);
    platform.restart();
    synced(&daemon);

    // 4. Agents drop the old key: what they hold is signed with the new
    // one, so the policy in force stays, and the next is enforced.
    daemon.stop();
    daemon.edit_config(|config| config.replace(&pinned(&[&old, &new]), &pinned(&[&new])));
    daemon.restart();
    assert!(
        denied(&run(&program)),
        "policy 1 stays in force: {}",
        daemon.log()
    );
    synced(&daemon);
    platform.push(&policy(2, "allow", &[]), &[]);
    synced(&daemon);
    assert!(!denied(&run(&program)), "policy 2, signed with the new key");
    assert!(
        !daemon
            .audit()
            .iter()
            .any(|r| r["event"] == "policy_rejected"),
        "no bundle was refused on the way"
    );
}

#[test]
fn with_the_platform_down_the_agent_enforces_and_uploads_its_backlog_later() {
    if !capable() {
        return;
    }
    let mut platform = Platform::start();
    let daemon = managed(&platform, "e2e-offline");
    let program = tool_denied_by_the_platform(&platform, &daemon);

    platform.kill();
    for _ in 0..5 {
        assert!(denied(&run(&program)), "still enforced offline");
    }
    let (ok, text) = sync(&daemon);
    assert!(!ok, "sync must fail while the platform is down: {text}");
    let status = daemon.status();
    assert_eq!(status["platform"]["last_ok"], false, "{status}");
    let offline_denies = wait_for_count(&daemon, "deny", 5);

    platform.restart();
    synced(&daemon);
    let uploaded = platform
        .audit("e2e-offline")
        .iter()
        .filter(|r| r["event"] == "exec" && r["decision"] == "deny")
        .count();
    assert_eq!(uploaded, offline_denies, "the backlog arrived");
}

#[test]
fn audit_reaches_the_platform_exactly_once_across_kill9_and_a_platform_restart() {
    if !capable() {
        return;
    }
    let mut platform = Platform::start();
    let mut daemon = managed(&platform, "e2e-once");
    let program = daemon.mount.install("/usr/bin/true", "tool");
    for _ in 0..40 {
        assert!(ran(&run(&program)));
    }
    wait_for_count(&daemon, "allow", 40);
    // Kill the agent while an upload is under way, and restart the platform.
    let mut syncing = Command::new(epm_e2e::binary("epmctl"))
        .arg("--socket")
        .arg(daemon.socket())
        .arg("sync")
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(15));
    daemon.kill9();
    let _ = syncing.wait();
    platform.kill();
    platform.restart();
    daemon.restart();
    for _ in 0..10 {
        assert!(ran(&run(&program)));
    }
    wait_for_count(&daemon, "allow", 50);
    synced(&daemon);
    synced(&daemon);

    let records = platform.audit("e2e-once");
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "a record arrived twice: {seqs:?}");
    let last = *unique.last().unwrap();
    assert_eq!(
        unique,
        (1..=last).collect::<BTreeSet<u64>>(),
        "a gap in what arrived"
    );
    let agent_execs = daemon
        .audit()
        .iter()
        .filter(|r| r["event"] == "exec" && r["seq"].as_u64().unwrap() <= last)
        .count();
    let platform_execs = records.iter().filter(|r| r["event"] == "exec").count();
    assert_eq!(platform_execs, agent_execs);
    assert_eq!(platform_execs, 50, "every exec arrived once");
}

#[test]
fn device_and_user_scoped_policies_reach_only_their_targets() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2escope");
    let platform = Platform::start();
    let a = managed(&platform, "e2e-device-a");
    let b = managed(&platform, "e2e-device-b");
    let tool_a = a.mount.install("/usr/bin/true", "tool");
    let tool_b = b.mount.install("/usr/bin/true", "tool");
    let sha = sha256_of(&tool_a);
    platform.push(
        &policy(1, "allow", &[deny_sha256("only-a", &sha)]),
        &["--device", "e2e-device-a"],
    );
    let echo_a = a.mount.install("/usr/bin/echo", "echo");
    platform.push(
        &policy(1, "allow", &[deny_sha256("only-user", &sha256_of(&echo_a))]),
        &["--user", &user.name],
    );
    synced(&a);
    synced(&b);
    assert!(denied(&run(&tool_a)), "device-scoped deny on its device");
    assert!(ran(&run(&tool_b)), "and not on another device");

    // The user-scoped rule applies to that user only.
    assert!(ran(&run(&echo_a)), "root is not the user");
    let as_user = Command::new(&echo_a).uid(user.uid).output();
    assert!(
        matches!(&as_user, Err(e) if e.raw_os_error() == Some(libc::EPERM)),
        "the scoped user is denied: {as_user:?}"
    );
    let record = a.wait_for_record("the user-scoped deny", |r| {
        r["decision"] == "deny" && r["rule_id"] == format!("user:{}/only-user", user.name)
    });
    assert_eq!(record["user"], user.name);
}
