//! sudo under EPM policy, end to end: the real Debian sudo with the EPM
//! approval plugin loaded from /etc/sudo.conf, the real epmd, a test user
//! that sudoers lets run anything, so every "no" comes from EPM.
#![allow(clippy::unwrap_used)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use epm_e2e::sudo::{Replaced, sudo_as};
use epm_e2e::text;
use epm_e2e::{Daemon, TestUser, capable};

/// sudo run by `user` on a new pseudo-terminal (`script`), with `input`
/// typed on it.
fn sudo_on_a_terminal(user: &TestUser, program: &str, input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new("script")
        .args(["-qec", &format!("sudo {program}"), "/dev/null"])
        .uid(user.uid)
        .gid(user.gid)
        .env_remove("SUDO_ASKPASS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The terminal holds what is typed until the plugin reads its line.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn sudo_asks_epmd_for_every_command() {
    if !capable() {
        return;
    }
    if !Path::new("/usr/bin/sudo").exists() {
        assert!(
            std::env::var_os("EPM_E2E").is_none(),
            "sudo is not installed (apt-get install sudo)"
        );
        eprintln!("skipped: sudo is not installed");
        return;
    }
    let user = TestUser::create("epm-sudo1");
    let policy = r#"{"version": 1, "default_action": "allow", "rules": [],
        "elevation": [
            {"id": "id-ok", "action": "allow", "match": {"path": "/usr/bin/id"}},
            {"id": "whoami-why", "action": "justify", "match": {"path": "/usr/bin/whoami"},
             "justification": {"min_length": 10}},
            {"id": "no-cat", "action": "deny", "match": {"path": "/usr/bin/cat"},
             "message": "cat as root is not allowed here"}
        ]}"#;
    let mut daemon = Daemon::start(policy, "");
    daemon.open_to_users();

    let _sudoers = Replaced::write(
        Path::new("/etc/sudoers.d/epm-e2e-sudo"),
        &format!("{} ALL=(ALL) NOPASSWD: ALL\n", user.name),
        0o440,
    );
    let _conf = Replaced::sudo_conf(&daemon.socket());

    // Allowed by an elevation rule: runs as root.
    let out = sudo_as(&user, &["/usr/bin/id", "-u"]);
    assert!(out.status.success(), "{}\n{}", text(&out), daemon.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");

    // Denied: the rule's message, and cat never runs.
    let out = sudo_as(&user, &["/usr/bin/cat", "/etc/shadow"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("cat as root is not allowed here"),
        "{}",
        text(&out)
    );
    assert!(
        !text(&out).contains("root:"),
        "shadow leaked: {}",
        text(&out)
    );

    // A justification, typed at the plugin's question on a real terminal.
    let out = sudo_on_a_terminal(&user, "/usr/bin/whoami", "Checking root for INC-9\n");
    assert!(out.status.success(), "{}\n{}", text(&out), daemon.log());
    assert!(text(&out).contains("root"), "{}", text(&out));
    let justified = daemon.wait_for_record("elevation_allowed", |r| {
        r["event"] == "elevation_allowed" && r["rule_id"] == "whoami-why"
    });
    assert_eq!(
        justified["details"]["justification"], "Checking root for INC-9",
        "{justified}"
    );
    // Without a terminal to ask on, nothing runs.
    let out = sudo_as(&user, &["/usr/bin/whoami"]);
    assert!(!out.status.success(), "{}", text(&out));

    // No rule: denied too.
    let out = sudo_as(&user, &["/usr/bin/true"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no elevation rule allows"),
        "{}",
        text(&out)
    );

    let allowed = daemon.wait_for_record("elevation_allowed", |r| {
        r["event"] == "elevation_allowed" && r["user"] == user.name.as_str()
    });
    assert_eq!(allowed["details"]["via"], "sudo", "{allowed}");
    assert_eq!(allowed["rule_id"], "id-ok", "{allowed}");
    let denied = daemon.wait_for_record("elevation_denied", |r| {
        r["event"] == "elevation_denied" && r["rule_id"] == "no-cat"
    });
    assert_eq!(
        denied["details"]["argv"],
        serde_json::json!(["/usr/bin/cat", "/etc/shadow"]),
        "{denied}"
    );

    // epmd stopped: fail=deny, with a message saying why.
    daemon.stop();
    let out = sudo_as(&user, &["/usr/bin/id", "-u"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("cannot reach epmd"), "{}", text(&out));
    assert!(text(&out).contains("fail=deny"), "{}", text(&out));
}
