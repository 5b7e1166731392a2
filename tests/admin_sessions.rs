//! Time-boxed admin sessions end to end: the real epmd and epmctl, a real
//! group and user made by the test, real gpasswd, real sudoers.d.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use epm_e2e::text;
use epm_e2e::{Daemon, Helper, TestGroup, TestUser, capable, wait_until};

/// A daemon whose policy allows `user` sessions of up to 30 minutes in
/// `group` (with `require`), the sudoers files watched being `sudoers`.
fn daemon(group: &TestGroup, require: &str, sudoers: &[PathBuf]) -> Daemon {
    let policy = format!(
        r#"{{"version": 1, "default_action": "allow", "rules": [],
            "admin_session": [
                {{"id": "everyone", "max_minutes": 30, "require": "{require}"}},
                {{"id": "nobody-else", "scope": {{"users": ["epm-nosess"]}}, "allowed": false,
                  "message": "Ask the helpdesk for admin rights"}}
            ]}}"#
    );
    let paths: Vec<String> = sudoers
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let daemon = Daemon::start_with_tables(
        &policy,
        &format!(
            "[admin_sessions]\ngroup = {:?}\nsudoers_paths = [{}]\n",
            group.name,
            paths.join(", ")
        ),
    );
    daemon.open_to_users();
    daemon
}

fn revoked_record(daemon: &Daemon, user: &TestUser) -> serde_json::Value {
    daemon.wait_for_record("admin_session_revoked", |r| {
        r["event"] == "admin_session_revoked" && r["user"] == user.name.as_str()
    })
}

fn no_sudoers() -> Vec<PathBuf> {
    vec![PathBuf::from("/nonexistent/epm-sudoers")]
}

#[test]
fn a_session_adds_the_user_and_expiry_removes_them() {
    if !capable() {
        return;
    }
    let group = TestGroup::create("epmtg-expiry");
    let user = TestUser::create("epm-sess1");
    let daemon = daemon(&group, "none", &no_sudoers());
    // The user's helper is told before the end, and when it came.
    let helper = Helper::start(&daemon, &user, &[]);
    let out = daemon.epmctl_as(&user, &["admin", "start", "--minutes", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is an administrator"), "{}", text(&out));
    assert!(group.has(&user), "added to {}", group.name);
    helper.wait_for("Your administrator rights end in 1 minute", 1);

    let status = daemon.epmctl_as(&user, &["admin", "status", "--json"]);
    let sessions: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(sessions[0]["group"], group.name.as_str(), "{sessions}");

    wait_until("the session's end", Duration::from_secs(90), || {
        !group.has(&user)
    });
    let record = revoked_record(&daemon, &user);
    assert_eq!(record["details"]["reason"], "expired", "{record}");
    assert_eq!(record["details"]["removed_from_group"], true, "{record}");
    helper.wait_for("Your administrator rights have ended: its time is up.", 1);
    let started = daemon.wait_for_record("admin_session_started", |r| {
        r["event"] == "admin_session_started" && r["user"] == user.name.as_str()
    });
    assert_eq!(started["details"]["minutes"], 1, "{started}");
}

#[test]
fn a_session_is_revoked_after_sigkill_and_a_start_past_its_expiry() {
    if !capable() {
        return;
    }
    let group = TestGroup::create("epmtg-kill");
    let user = TestUser::create("epm-sess2");
    let mut daemon = daemon(&group, "none", &no_sudoers());
    let out = daemon.epmctl_as(&user, &["admin", "start", "--minutes", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(group.has(&user));

    daemon.kill9();
    std::thread::sleep(Duration::from_secs(65));
    assert!(
        group.has(&user),
        "nobody removed the user while epmd was down"
    );
    daemon.restart();
    wait_until("revocation at start", Duration::from_secs(10), || {
        !group.has(&user)
    });
    let record = revoked_record(&daemon, &user);
    assert_eq!(
        record["details"]["reason"], "expired_while_down",
        "{record}"
    );
}

#[test]
fn a_member_before_is_never_removed_and_the_user_can_end_early() {
    if !capable() {
        return;
    }
    let group = TestGroup::create("epmtg-before");
    let user = TestUser::create("epm-sess3");
    let out = Command::new("gpasswd")
        .args(["--add", &user.name, &group.name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let daemon = daemon(&group, "justification", &no_sudoers());

    // The policy wants a reason; without a terminal epmctl says how to give it.
    let out = daemon.epmctl_as(&user, &["admin", "start", "--minutes", "10"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--reason"), "{}", text(&out));

    let out = daemon.epmctl_as(
        &user,
        &[
            "admin",
            "start",
            "--minutes",
            "10",
            "--reason",
            "Printer driver for INC-9",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("already in"), "{}", text(&out));
    let out = daemon.epmctl_as(&user, &["admin", "end"]);
    assert!(out.status.success(), "{}", text(&out));
    let record = revoked_record(&daemon, &user);
    assert_eq!(record["details"]["reason"], "ended_by_user", "{record}");
    assert_eq!(record["details"]["removed_from_group"], false, "{record}");
    assert!(group.has(&user), "a member before stays a member");
    let started = daemon.wait_for_record("admin_session_started", |r| {
        r["event"] == "admin_session_started" && r["user"] == user.name.as_str()
    });
    assert_eq!(
        started["details"]["justification"], "Printer driver for INC-9",
        "{started}"
    );

    // Over the policy's limit, and a user the policy refuses.
    let out = daemon.epmctl_as(
        &user,
        &["admin", "start", "--minutes", "31", "--reason", "x"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("1 to 30 minutes"), "{}", text(&out));
    let refused = TestUser::create("epm-nosess");
    let out = daemon.epmctl_as(&refused, &["admin", "start", "--minutes", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("Ask the helpdesk"), "{}", text(&out));
    assert!(!group.has(&refused));
}

#[test]
fn a_sudoers_file_planted_during_a_session_is_removed_and_audited() {
    if !capable() {
        return;
    }
    let group = TestGroup::create("epmtg-sudoers");
    let user = TestUser::create("epm-sess4");
    let drop_in = PathBuf::from("/etc/sudoers.d");
    std::fs::create_dir_all(&drop_in).unwrap();
    let planted = drop_in.join("epm-e2e-planted");
    let _ = std::fs::remove_file(&planted);
    let daemon = daemon(&group, "none", std::slice::from_ref(&drop_in));
    let out = daemon.epmctl_as(&user, &["admin", "start", "--minutes", "10"]);
    assert!(out.status.success(), "{}", text(&out));

    std::fs::write(&planted, format!("{} ALL=(ALL) NOPASSWD: ALL\n", user.name)).unwrap();
    wait_until(
        "removal of the planted file",
        Duration::from_secs(10),
        || !planted.exists(),
    );
    let record = daemon.wait_for_record("sudoers_change_found", |r| {
        r["event"] == "sudoers_change_found" && r["user"] == user.name.as_str()
    });
    assert_eq!(record["details"]["action"], "removed", "{record}");
    assert_eq!(
        record["details"]["file"],
        planted.display().to_string().as_str(),
        "{record}"
    );
    let out = daemon.epmctl_as(&user, &["admin", "end"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!group.has(&user));
}
