//! epmd managed by a real epm-platform over real TLS on 127.0.0.1: policy
//! delivery, signature pinning, offline enforcement, and the audit arriving
//! exactly once; then the platform attacked by its own admins, agents and
//! strangers (issue 21), one test per finding.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::process::Command;

use epm_e2e::platform::{Platform, RestAgent};
use epm_e2e::{Daemon, TestUser, capable, denied, policy, ran, run, sha256_of};
use serde_json::{Value, json};

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
    // Six in all: the one that showed the tool denied, then five offline.
    // Waiting for fewer raced the audit thread: a sixth record written after
    // the count was taken was uploaded too.
    let all_denies = wait_for_count(&daemon, "deny", 6);

    platform.restart();
    synced(&daemon);
    let uploaded = platform
        .audit("e2e-offline")
        .iter()
        .filter(|r| r["event"] == "exec" && r["decision"] == "deny")
        .count();
    assert_eq!(uploaded, all_denies, "the backlog arrived");
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

// ---- the platform against its own admins, agents and strangers (issue 21)
//
// One test per finding of issue 21, each against the real `epm-platform`
// binary over TLS on 127.0.0.1: the attack is refused (or bounded), and
// the refusal is in the activity log or the server's log.

const HOUR: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

fn approve_rule(id: &str, program: &str, levels: &[u32], max_hours: u32) -> String {
    let levels: Vec<String> = levels
        .iter()
        .map(|n| format!(r#"{{"approvers": {n}}}"#))
        .collect();
    format!(
        r#"{{"id": "{id}", "action": "approve", "match": {{"name": "{program}"}},
            "approval": {{"levels": [{}], "max_window_hours": {max_hours}, "uses": 1}}}}"#,
        levels.join(", ")
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the CLI as `token` and expects the platform to refuse (exit 1)
/// with `why` in the message.
fn refused(platform: &Platform, token: &str, args: &[&str], why: &str) {
    let out = platform.cli_as(token, args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} must be refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
}

/// Issue 21, 1: only the owner makes or changes admins, levels are bounded
/// by the rules, every attempt is logged, and nobody approves their own
/// request.
#[test]
fn only_the_owner_mints_approvers_and_nobody_approves_their_own_request() {
    let platform = Platform::start();
    let policy_admin = platform.admin_with("pa", &["--role", "policy_admin"]);
    let approver = platform.admin_with("ap", &["--role", "approver", "--approver-level", "1"]);
    let auditor = platform.admin_with("au", &["--role", "auditor"]);
    for (name, token) in [("pa", &policy_admin), ("ap", &approver), ("au", &auditor)] {
        for level in ["1", "2"] {
            refused(
                &platform,
                token,
                &[
                    "admin",
                    "create",
                    "--name",
                    &format!("minted-{name}-{level}"),
                    "--approver-level",
                    level,
                ],
                "manage admins (owner)",
            );
        }
        refused(
            &platform,
            token,
            &["admin", "update", name, "--role", "owner"],
            "manage admins (owner)",
        );
    }
    refused(
        &platform,
        &approver,
        &[
            "admin",
            "create",
            "--name",
            "minted-max",
            "--approver-level",
            "4294967295",
        ],
        "approver_level: 4294967295 is outside 1..=16",
    );
    let admins = platform.ok(&["admin", "list"]);
    assert!(!admins.contains("minted"), "{admins}");
    assert!(
        platform.activity()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["admin"] == "pa"
                && e["status"] == 403
                && e["call"] == "POST /api/v1/admin/admins"),
        "the refused attempts are logged by name"
    );

    // The owner too stays within the rules: no rule has two levels yet.
    let token = platform.admin_token.clone();
    refused(
        &platform,
        &token,
        &[
            "admin",
            "create",
            "--name",
            "early",
            "--approver-level",
            "2",
        ],
        "outside 1..=1",
    );
    platform.push(
        &policy(
            1,
            "allow",
            &[approve_rule("capture", "wireshark", &[1, 1], 8)],
        ),
        &[],
    );
    platform.admin("level-two", 2);

    // A change of role is logged with the values before and after.
    platform.ok(&[
        "admin",
        "update",
        "ap",
        "--role",
        "auditor",
        "--no-approver-level",
    ]);
    let changed = platform.activity_with("changed admin ap");
    let detail = changed[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("role approver, approver level 1, endpoint users [ap] → role auditor, approver level none"),
        "{detail}"
    );
    // Least privilege: the policy admin cannot approve, the auditor cannot
    // push, the demoted approver approves no more.
    let agent = RestAgent::enroll(&platform, "e2e-roles");
    let now = jiff::Timestamp::now();
    let (status, request) = agent.submit(&platform, "r1", "capture", "alice", now, now + HOUR);
    assert_eq!(status, 200, "{request}");
    let id = request["id"].as_str().unwrap();
    refused(
        &platform,
        &policy_admin,
        &["requests", "approve", id],
        "forbidden",
    );
    refused(
        &platform,
        &approver,
        &["requests", "approve", id],
        "forbidden",
    );
    let file = std::env::temp_dir().join(format!("epm-e2e-au-{}.json", std::process::id()));
    std::fs::write(&file, policy(2, "allow", &[])).unwrap();
    refused(
        &platform,
        &auditor,
        &["policy", "push", file.to_str().unwrap()],
        "push or delete policies",
    );
    let _ = std::fs::remove_file(&file);

    // Nobody approves a request of their own endpoint user.
    let alice = platform.admin_with(
        "alice.admin",
        &["--approver-level", "1", "--endpoint-user", "alice"],
    );
    refused(
        &platform,
        &alice,
        &["requests", "approve", id],
        "nobody approves their own request",
    );
    assert!(
        platform.activity()["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["admin"] == "alice.admin" && e["status"] == 403),
        "logged"
    );
}

/// Issue 21, 2: enrolling an enrolled device id again needs its current
/// credentials or an admin's reset; refusals are logged and spend no
/// token use; agents rotate their own secret.
#[test]
fn a_device_is_not_taken_over_by_enrolling_its_id_again() {
    if !capable() {
        return;
    }
    let platform = Platform::start();
    let daemon = managed(&platform, "e2e-takeover");
    let token = platform.enroll_token(5);
    for current in [None, Some("agt_forged.secret")] {
        let (status, answer) = platform.enroll("e2e-takeover", &token, current);
        assert_eq!(status, 409, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("needs its current credentials")
                && message.contains("devices reset e2e-takeover"),
            "{message}"
        );
    }
    synced(&daemon);
    let refusals = platform.wait_for_refused("the refused re-enrollments", |r| {
        r["who"] == "device:e2e-takeover" && r["status"] == 409
    });
    assert_eq!(refusals["count"], 2, "{refusals}");
    assert!(
        platform.log().contains("enrollment refused"),
        "{}",
        platform.log()
    );
    let tokens = platform.ok(&["enroll-token", "list", "--json"]);
    assert!(
        tokens.lines().any(|l| l.contains("\"uses_left\":5")),
        "refusals spend no use: {tokens}"
    );

    // With its own credentials the device may enroll again.
    let stored: Value = serde_json::from_slice(
        &std::fs::read(daemon.state_dir().join("agent-credentials.json")).unwrap(),
    )
    .unwrap();
    let own = format!(
        "{}.{}",
        stored["agent_id"].as_str().unwrap(),
        stored["agent_secret"].as_str().unwrap()
    );
    let (status, renewed) = platform.enroll("e2e-takeover", &token, Some(&own));
    assert_eq!(status, 200, "{renewed}");
    assert_eq!(renewed["agent_id"], stored["agent_id"]);
    assert!(
        !platform
            .activity_with("enrolled again with its current credentials")
            .is_empty()
    );

    // An admin's reset voids the credentials at once; the next enrollment
    // takes the id, and both are logged.
    platform.ok(&["devices", "reset", "e2e-takeover"]);
    let bearer = format!(
        "{}.{}",
        renewed["agent_id"].as_str().unwrap(),
        renewed["agent_secret"].as_str().unwrap()
    );
    let checkin = json!({"audit_last_seq": 0, "outbox_pending": 0});
    let (status, _) = platform.call(
        "POST",
        "/api/v1/agent/checkin",
        Some(&bearer),
        Some(&checkin),
    );
    assert_eq!(status, 401, "reset credentials are void");
    let (status, taken) = platform.enroll("e2e-takeover", &token, None);
    assert_eq!(status, 200, "{taken}");
    assert_ne!(
        taken["agent_id"], stored["agent_id"],
        "a new agent of the device: its audit starts afresh"
    );
    assert!(
        !platform
            .activity_with("reset device e2e-takeover")
            .is_empty()
    );
    assert!(
        !platform
            .activity_with("enrolled again after e2e reset it")
            .is_empty()
    );

    // The agent rotates its secret: the old one works until the new one is
    // used, then never again.
    let old = format!(
        "{}.{}",
        taken["agent_id"].as_str().unwrap(),
        taken["agent_secret"].as_str().unwrap()
    );
    let (status, rotated) =
        platform.call("POST", "/api/v1/agent/credentials/rotate", Some(&old), None);
    assert_eq!(status, 200, "{rotated}");
    let new = format!(
        "{}.{}",
        rotated["agent_id"].as_str().unwrap(),
        rotated["agent_secret"].as_str().unwrap()
    );
    assert_eq!(rotated["offline_key"], taken["offline_key"]);
    let checkin_as = |bearer: &str| {
        platform
            .call(
                "POST",
                "/api/v1/agent/checkin",
                Some(bearer),
                Some(&checkin),
            )
            .0
    };
    assert_eq!(checkin_as(&old), 200, "until the new secret is used");
    assert_eq!(checkin_as(&new), 200);
    assert_eq!(checkin_as(&old), 401, "replaced");
    assert!(!platform.activity_with("rotated its secret").is_empty());
}

/// Issue 21, 3: an offline code is issued only for a rule in the device's
/// policy, a window the rule and the platform allow, once every level
/// approved; issuing is limited and logged.
#[test]
fn offline_codes_obey_the_rule_its_levels_and_a_rate() {
    use epm_api::offline::OfflineChallenge;
    let platform = Platform::start_with(&["--offline-codes-per-hour", "6"]);
    platform.push(
        &policy(
            1,
            "allow",
            &[
                approve_rule("multi", "wireshark", &[2, 1], 8),
                approve_rule("single", "tcpdump", &[1], 8),
            ],
        ),
        &[],
    );
    let l1a = platform.admin("l1a", 1);
    let l1b = platform.admin("l1b", 1);
    let l2 = platform.admin("l2", 2);
    let agent = RestAgent::enroll(&platform, "e2e-offline-codes");
    let key = agent.offline_key();
    let now = jiff::Timestamp::now();
    let challenge =
        |rule: &str, user: &str, start: jiff::Timestamp, end: jiff::Timestamp, nonce: u64| {
            OfflineChallenge {
                device_id: agent.device.clone(),
                user: user.into(),
                identity: epm_api::SubjectIdentity {
                    kind: "sha256".into(),
                    value: "cd".repeat(32),
                },
                rule_id: rule.into(),
                not_before: start,
                not_after: end,
                nonce,
            }
        };
    let answer = |token: &str, c: &OfflineChallenge| {
        platform.cli_as(
            token,
            &["offline-code", "--device", &agent.device, &c.encode()],
        )
    };

    let refusals = [
        (
            challenge("ghost", "alice", now, now + HOUR, 1),
            "not in device",
        ),
        (
            challenge("single", "alice", now, now + HOUR * (24 * 3650), 2),
            "longer than the rule's 8 hours",
        ),
        (
            challenge(
                "single",
                "alice",
                now + HOUR * (24 * 40),
                now + HOUR * (24 * 40 + 1),
                3,
            ),
            "more than 30 days ahead",
        ),
        (
            challenge("single", "l1a", now, now + HOUR, 4),
            "nobody approves their own request",
        ),
    ];
    for (c, why) in &refusals {
        let out = answer(&l1a, c);
        assert_eq!(out.status.code(), Some(1), "{why}: {}", stderr(&out));
        assert!(stderr(&out).contains(why), "{why}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "no code");
    }

    // Two level-1 approvers, then the level-2 one: only then a code.
    let multi = challenge("multi", "alice", now, now + HOUR, 5);
    for (token, waiting) in [(&l1a, "level 1 of 2 waits"), (&l1b, "level 2 of 2 waits")] {
        let out = answer(token, &multi);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(out.stdout.is_empty(), "no code before every level approved");
        assert!(stderr(&out).contains(waiting), "{}", stderr(&out));
    }
    let out = answer(&l2, &multi);
    assert!(out.status.success(), "{}", stderr(&out));
    let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(multi.accepts(&key, &code), "{code}");

    // A one-level, one-approver rule: one approver's code at once.
    let single = challenge("single", "alice", now, now + HOUR, 6);
    let out = answer(&l1a, &single);
    let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(single.accepts(&key, &code), "{code}: {}", stderr(&out));

    // l1a has answered 6 challenges this hour: the 7th is refused.
    let out = answer(&l1a, &challenge("single", "alice", now, now + HOUR, 7));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("offline challenges in the last hour"),
        "{}",
        stderr(&out)
    );
    assert_eq!(platform.activity_with("offline code issued for").len(), 2);
    assert_eq!(
        platform
            .activity_with("offline challenge approved at level 1")
            .len(),
        2
    );
    platform.wait_for_refused("the rate-limited offline code", |r| {
        r["who"] == "l1a" && r["status"] == 429
    });
}

/// A TLS connection from `source` (any 127.0.0.0/8 address) to the
/// platform, with `alpn`; `None` when the platform refused it.
fn tls_connection(
    platform: &Platform,
    source: [u8; 4],
    alpn: &[u8],
) -> Option<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let socket = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    let [a, b, c, d] = source;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &SockaddrIn::new(a, b, c, d, 0),
    )
    .unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &SockaddrIn::new(127, 0, 0, 1, platform.port()),
    )
    .ok()?;
    let mut tcp = std::net::TcpStream::from(socket);
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(platform.data_dir().join("ca.pem")).unwrap();
    let text = String::from_utf8(pem).unwrap();
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    roots.add(der.into()).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    while tls.is_handshaking() {
        if tls.complete_io(&mut tcp).is_err() {
            return None;
        }
    }
    Some(rustls::StreamOwned::new(tls, tcp))
}

/// Whether the platform closed the connection (reads until the end or
/// until nothing comes for a moment).
fn closed(stream: &mut rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>) -> bool {
    use std::io::Read;
    // On loopback a close arrives at once.
    stream
        .sock
        .set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Issue 21, 4: a client holding many idle connections gets no more than
/// its cap, its idle connections are closed (TLS, HTTP/1 keep-alive,
/// HTTP/2), and an agent's check-in still succeeds throughout, even with
/// the platform at its total cap.
#[test]
fn idle_connections_are_closed_and_capped_while_agents_still_check_in() {
    use std::io::{Read, Write};
    if !capable() {
        return;
    }
    let platform = Platform::start_with(&[
        "--max-connections",
        "60",
        "--max-connections-per-client",
        "40",
        "--idle-timeout",
        "8s",
    ]);
    let daemon = managed(&platform, "e2e-flood");

    // 200 idle TLS connections from one address: 40 are held, the rest are
    // closed at once.
    let mut held: Vec<_> = (0..200)
        .filter_map(|_| tls_connection(&platform, [127, 0, 0, 2], b"http/1.1"))
        .collect();
    held.retain_mut(|c| !closed(c));
    assert_eq!(held.len(), 40, "the per-client cap");
    // 25 idle HTTP/2 connections from another: the total reaches its cap
    // of 60 (the oldest idle ones are closed to let newer ones in).
    let mut h2: Vec<_> = (0..25)
        .filter_map(|_| tls_connection(&platform, [127, 0, 0, 3], b"h2"))
        .map(|mut c| {
            c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .unwrap();
            c.flush().unwrap();
            c
        })
        .collect();
    assert!(!h2.is_empty());
    // An agent's check-in at the cap still gets in.
    synced(&daemon);

    // An HTTP/1 keep-alive connection after a request.
    let mut keep_alive = tls_connection(&platform, [127, 0, 0, 4], b"http/1.1").unwrap();
    keep_alive
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 256];
    let n = keep_alive.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));

    // After the idle timeout, every one of them is closed by the platform.
    std::thread::sleep(std::time::Duration::from_secs(10));
    let open = held
        .iter_mut()
        .map(|c| !closed(c))
        .filter(|open| *open)
        .count()
        + h2.iter_mut()
            .map(|c| !closed(c))
            .filter(|open| *open)
            .count()
        + usize::from(!closed(&mut keep_alive));
    assert_eq!(open, 0, "idle connections outlived the idle timeout");
    synced(&daemon);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !platform
        .log()
        .contains("connections refused: 160 over the per-client cap of 40")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the refusals are logged: {}",
            platform.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Issue 21, 5: anonymous calls to the admin API are counted per source,
/// call and hour with their paths cut, so a flood of them adds a few rows
/// and admins' own entries stay in view.
#[test]
fn anonymous_admin_calls_are_counted_not_stored_one_by_one() {
    let platform = Platform::start();
    platform.push(&policy(1, "allow", &[]), &[]);
    // Entries other than the owner reading the log, which this test does.
    let others = |page: &Value| {
        page["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["call"] != "GET /api/v1/admin/activity")
            .cloned()
            .collect::<Vec<Value>>()
    };
    let before = others(&platform.activity());
    // The stranger calls from another address than the admin's.
    let http = platform.http_from("127.0.0.5".parse().unwrap());
    let long_path = format!("/api/v1/admin/{}", "x".repeat(2000));
    for i in 0..400 {
        let mut request = http.get(format!("{}{long_path}", platform.url()));
        if i % 2 == 0 {
            request = request.bearer_auth("epa_forged");
        }
        let status = request.send().unwrap().status().as_u16();
        assert!(matches!(status, 401 | 404 | 429), "{status}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rows = loop {
        let page = platform.activity();
        let rows: Vec<Value> = page["refused"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["source"] == "127.0.0.5")
            .cloned()
            .collect();
        let counted: u64 = rows.iter().map(|r| r["count"].as_u64().unwrap()).sum();
        if counted >= 400 {
            assert_eq!(counted, 400, "{page}");
            break rows;
        }
        assert!(std::time::Instant::now() < deadline, "{page}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(rows.len() <= 4, "a handful of rows: {rows:?}");
    for row in &rows {
        let call = row["call"].as_str().unwrap();
        assert!(call.len() <= 100 && call.ends_with('…'), "{call}");
    }
    let entries = others(&platform.activity());
    assert_eq!(entries, before, "no entry per anonymous call");
    assert!(
        entries
            .iter()
            .any(|e| e["call"] == "PUT /api/v1/admin/policies/general" && e["status"] == 200),
        "the admin's push stays in view"
    );
}

/// Issue 21, 6: audit uploads are bounded per call (records) and per agent
/// and hour (records and bytes); over a quota nothing is stored, the agent
/// is told when to retry, and the refusal is logged.
#[test]
fn audit_uploads_are_bounded_per_call_and_per_hour() {
    let platform = Platform::start_with(&["--audit-records-per-hour", "1500"]);
    let agent = RestAgent::enroll(&platform, "e2e-audit-quota");
    let upload = |from: u64, count: u64| {
        let records: Vec<String> = (from..from + count)
            .map(|s| format!(r#"{{"seq":{s}}}"#))
            .collect();
        platform.call_raw(
            "POST",
            "/api/v1/agent/audit",
            Some(&agent.bearer),
            Some(format!(
                r#"{{"oldest_kept_seq":1,"records":[{}]}}"#,
                records.join(",")
            )),
        )
    };
    // 520 000 records in one 7.7 MB upload: refused whole.
    let (status, answer) = upload(1, 520_000);
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("520000 items is over the limit of 1000"),
        "{answer}"
    );
    let (status, answer) = upload(1, 1000);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 1000);
    // 1000 more would pass the hour's 1500.
    let http = platform.http();
    let records: Vec<String> = (1001..2001).map(|s| format!(r#"{{"seq":{s}}}"#)).collect();
    let response = http
        .post(format!("{}/api/v1/agent/audit", platform.url()))
        .bearer_auth(&agent.bearer)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"oldest_kept_seq":1,"records":[{}]}}"#,
            records.join(",")
        ))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let answer: Value = response.json().unwrap();
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1500 records per hour"),
        "{answer}"
    );
    assert_eq!(
        platform.audit("e2e-audit-quota").len(),
        1000,
        "nothing of the refused upload was stored"
    );
    // The agent still checks in, and the refusal is logged.
    agent.checkin(&platform);
    platform.wait_for_refused("the upload over its quota", |r| {
        r["who"] == "device:e2e-audit-quota" && r["status"] == 429
    });
}

/// Issue 21, 7: admins are disabled, enabled and their tokens rotated;
/// enrollment tokens revoked; devices removed and reset. Each in the CLI
/// (and so over REST) and in the activity log.
#[test]
fn admins_tokens_and_devices_can_be_revoked() {
    let platform = Platform::start();
    let bob = platform.admin_with("bob", &["--role", "auditor"]);
    let whoami = |token: &str| {
        platform
            .call("GET", "/api/v1/admin/whoami", Some(token), None)
            .0
    };
    assert_eq!(whoami(&bob), 200);
    platform.ok(&["admin", "disable", "bob"]);
    assert_eq!(whoami(&bob), 401, "a disabled admin's token is refused");
    platform.wait_for_refused("the disabled admin's call", |r| {
        r["who"] == "disabled:bob" && r["status"] == 401
    });
    platform.ok(&["admin", "enable", "bob"]);
    assert_eq!(whoami(&bob), 200);
    let rotated = platform
        .ok(&["admin", "rotate-token", "bob"])
        .trim()
        .to_owned();
    assert_eq!(whoami(&bob), 401, "the old token is refused");
    assert_eq!(whoami(&rotated), 200);
    // Every admin may rotate their own token, and no one else's.
    let own = platform
        .cli_as(&rotated, &["admin", "rotate-token", "bob"])
        .stdout;
    let own = String::from_utf8(own).unwrap().trim().to_owned();
    assert_eq!(whoami(&own), 200);
    refused(
        &platform,
        &own,
        &["admin", "rotate-token", "e2e"],
        "(owner)",
    );
    refused(
        &platform,
        &platform.admin_token.clone(),
        &["admin", "disable", "e2e"],
        "last enabled owner",
    );

    // An enrollment token revoked before use enrolls nothing.
    let created = platform.ok(&["enroll-token", "create", "--uses", "3", "--json"]);
    let created: Value = serde_json::from_str(&created).unwrap();
    platform.ok(&["enroll-token", "revoke", created["id"].as_str().unwrap()]);
    let (status, answer) = platform.enroll("e2e-revoked", created["token"].as_str().unwrap(), None);
    assert_eq!(status, 401);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{answer}"
    );

    // A removed device's credentials stop working and its requests are
    // revoked; a reset one's too, until it enrolls again.
    platform.push(
        &policy(1, "allow", &[approve_rule("capture", "wireshark", &[1], 8)]),
        &[],
    );
    let agent = RestAgent::enroll(&platform, "e2e-removed");
    let now = jiff::Timestamp::now();
    let (status, request) = agent.submit(&platform, "r1", "capture", "alice", now, now + HOUR);
    assert_eq!(status, 200, "{request}");
    platform.ok(&["devices", "remove", "e2e-removed"]);
    let checkin = json!({"audit_last_seq": 0, "outbox_pending": 0});
    let (status, _) = platform.call(
        "POST",
        "/api/v1/agent/checkin",
        Some(&agent.bearer),
        Some(&checkin),
    );
    assert_eq!(status, 401);
    let requests = platform.requests();
    assert_eq!(requests[0]["state"], "revoked", "{requests:?}");
    let reset = RestAgent::enroll(&platform, "e2e-reset");
    let (status, request) = reset.submit(&platform, "r1", "capture", "alice", now, now + HOUR);
    assert_eq!(status, 200, "{request}");
    platform.ok(&["devices", "reset", "e2e-reset"]);
    let (status, _) = platform.call(
        "POST",
        "/api/v1/agent/checkin",
        Some(&reset.bearer),
        Some(&checkin),
    );
    assert_eq!(status, 401);
    let requests = platform.requests();
    assert!(
        requests.iter().all(|r| r["state"] == "revoked"),
        "{requests:?}"
    );

    for logged in [
        "disabled admin bob",
        "enabled admin bob",
        "rotated the token of admin bob",
        "revoked enrollment token",
        "removed device e2e-removed; 1 pending or approved request(s) revoked",
        "reset device e2e-reset: its credentials are void until it enrolls again; 1 pending or approved request(s) revoked",
    ] {
        assert!(
            !platform.activity_with(logged).is_empty(),
            "{logged} is not logged"
        );
    }
}

/// Issue 21, 8: approval re-checks the rule against the device's policy,
/// windows start at most 30 days ahead, requesters do not approve their own
/// requests (see the first test), disguising characters and huge strings
/// are refused, huge integers are 422 (never a database error), and what
/// is stored raw (agents' audit) is shown inert.
#[test]
fn approvals_recheck_the_rule_and_every_input_is_bounded() {
    let platform = Platform::start();
    platform.push(
        &policy(1, "allow", &[approve_rule("capture", "wireshark", &[1], 8)]),
        &[],
    );
    let agent = RestAgent::enroll(&platform, "e2e-bounded");
    let now = jiff::Timestamp::now();
    let (status, request) = agent.submit(&platform, "r1", "capture", "alice", now, now + HOUR);
    assert_eq!(status, 200, "{request}");
    let id = request["id"].as_str().unwrap().to_owned();

    // The rule leaves the device's policy: the approval is refused and the
    // request closed with the reason.
    platform.push(&policy(2, "allow", &[]), &[]);
    let out = platform.cli(&["requests", "approve", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot be approved and was closed")
            && stderr(&out).contains("is not in device e2e-bounded's policy"),
        "{}",
        stderr(&out)
    );
    let closed = &platform.requests()[0];
    assert_eq!(closed["state"], "denied");
    assert_eq!(closed["decided_by"], "platform");

    // A window ten years ahead.
    platform.push(
        &policy(3, "allow", &[approve_rule("capture", "wireshark", &[1], 8)]),
        &[],
    );
    agent.checkin(&platform);
    let later = now + HOUR * (24 * 3650);
    let (status, answer) = agent.submit(&platform, "r2", "capture", "alice", later, later + HOUR);
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer.to_string().contains("more than 30 days ahead"),
        "{answer}"
    );

    // Disguising characters and huge strings, wherever they come in.
    let token = platform.enroll_token(10);
    let rtl = "mac-\u{202e}gnp.exe";
    for (device, hostname, why) in [
        (rtl, "h", "device_id: U+202E is not allowed"),
        (
            "ok-device",
            "h\u{1b}]0;x\u{7}",
            "hostname: U+001B is not allowed",
        ),
        (
            "ok-device",
            &"h".repeat(300_000) as &str,
            "hostname: 300000 bytes is over the limit of 255",
        ),
    ] {
        let body = json!({"enrollment_token": token, "device_id": device, "hostname": hostname,
            "os": "linux", "agent_version": "e2e"});
        let (status, answer) = platform.call("POST", "/api/v1/agent/enroll", None, Some(&body));
        assert_eq!(status, 422, "{answer}");
        assert!(answer.to_string().contains(why), "{why}: {answer}");
    }
    let megabytes = json!({"enrollment_token": token, "device_id": "x".repeat(2 << 20),
        "hostname": "h", "os": "linux", "agent_version": "e2e"});
    let (status, _) = platform.call("POST", "/api/v1/agent/enroll", None, Some(&megabytes));
    assert_eq!(status, 413);
    let (status, answer) =
        agent.submit(&platform, "r3", "capture", "al\u{2066}ice", now, now + HOUR);
    assert_eq!(status, 422, "{answer}");
    let users = json!({"audit_last_seq": 0, "outbox_pending": 0,
        "users": [{"name": "bob\u{202e}", "groups": []}]});
    let (status, _) = platform.call(
        "POST",
        "/api/v1/agent/checkin",
        Some(&agent.bearer),
        Some(&users),
    );
    assert_eq!(status, 422);

    // Integers past 2^63 − 1: 422, never a database error.
    let big = json!({"audit_last_seq": 0, "outbox_pending": 9_223_372_036_854_775_808u64});
    let (status, answer) = platform.call(
        "POST",
        "/api/v1/agent/checkin",
        Some(&agent.bearer),
        Some(&big),
    );
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = platform.call_raw(
        "POST",
        "/api/v1/agent/audit",
        Some(&agent.bearer),
        Some(r#"{"oldest_kept_seq":1,"records":[{"seq":18446744073709551615}]}"#.into()),
    );
    assert_eq!(status, 422, "{answer}");
    let (status, answer) = platform.call(
        "GET",
        "/api/v1/admin/audit?after=9223372036854775808",
        Some(&platform.admin_token),
        None,
    );
    assert_eq!(status, 422, "{answer}");
    assert!(!platform.log().contains("database:"), "{}", platform.log());

    // What is stored as the agent wrote it (its audit) is shown inert.
    let record = format!(
        r#"{{"seq":1,"event":"exec","decision":"deny","path":"/tmp/{rtl}","user":"alice"}}"#
    );
    let (status, answer) = platform.call_raw(
        "POST",
        "/api/v1/agent/audit",
        Some(&agent.bearer),
        Some(format!(r#"{{"oldest_kept_seq":1,"records":[{record}]}}"#)),
    );
    assert_eq!(status, 200, "{answer}");
    let shown = platform.ok(&["audit", "tail", "--device", "e2e-bounded"]);
    assert!(shown.contains("path=/tmp/mac-?gnp.exe"), "{shown}");
    assert!(!shown.contains('\u{202e}'), "{shown}");
}

// ---- the web console against strangers (issue 18) ----------------------

/// One sign-in attempt as a browser would make it: the form's pre-session
/// cookie and CSRF token, then the post. Returns the status and the
/// `Retry-After` header.
fn console_sign_in(
    http: &reqwest::blocking::Client,
    url: &str,
    name: &str,
    password: &str,
) -> (u16, Option<String>) {
    let page = http.get(format!("{url}/console/sign-in")).send().unwrap();
    let cookie = page
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("__Host-epm-sign-in="))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let body = page.text().unwrap();
    let at = body.find(r#"name="csrf" value=""#).unwrap() + r#"name="csrf" value=""#.len();
    let csrf = &body[at..][..body[at..].find('"').unwrap()];
    let answer = http
        .post(format!("{url}/console/sign-in"))
        .header("cookie", cookie)
        .form(&[("csrf", csrf), ("name", name), ("password", password)])
        .send()
        .unwrap();
    let retry = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (answer.status().as_u16(), retry)
}

/// Issue 18: a stranger guessing an admin's console password from another
/// address gets five tries in 15 minutes, each logged, then only counted
/// refusals; the admin's API token keeps working, and a made-up session
/// cookie signs nobody in.
#[test]
fn console_password_guessing_is_bounded_logged_and_leaves_the_api_alone() {
    let platform = Platform::start();
    let password = "the owner's long passphrase";
    platform.set_password("e2e", password);
    let stranger = reqwest::blocking::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(
                &std::fs::read(platform.data_dir().join("ca.pem")).unwrap(),
            )
            .unwrap(),
        )
        .local_address("127.0.0.7".parse::<std::net::IpAddr>().unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = platform.url();
    let mut statuses = Vec::new();
    for guess in 0..12 {
        statuses.push(console_sign_in(
            &stranger,
            &url,
            "e2e",
            &format!("guess number {guess}"),
        ));
    }
    assert!(statuses[..5].iter().all(|s| s.0 == 401), "{statuses:?}");
    assert!(
        statuses[5..].iter().all(|s| s.0 == 429 && s.1.is_some()),
        "locked with Retry-After: {statuses:?}"
    );
    // Even the right password, for the rest of the window.
    assert_eq!(console_sign_in(&stranger, &url, "e2e", password).0, 429);
    // Five failures one by one, the rest counted.
    let logged = platform.activity_with("failed console sign-in as e2e from 127.0.0.7");
    assert_eq!(logged.len(), 5, "{logged:?}");
    platform.wait_for_refused("the locked-out tries", |r| {
        r["who"] == "console:sign-in:e2e" && r["status"] == 429 && r["count"].as_u64() >= Some(7)
    });
    // The API does not care.
    let (status, me) = platform.call(
        "GET",
        "/api/v1/admin/whoami",
        Some(&platform.admin_token),
        None,
    );
    assert_eq!(status, 200, "{me}");
    // A made-up cookie is no session.
    let page = stranger
        .get(format!("{url}/console/inbox"))
        .header("cookie", format!("__Host-epm-session={}", "A".repeat(43)))
        .send()
        .unwrap();
    assert_eq!(page.status().as_u16(), 303);
    assert!(
        page.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/console/sign-in"),
        "{:?}",
        page.headers()
    );
}
