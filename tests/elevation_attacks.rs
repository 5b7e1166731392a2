//! Elevation attacked as a standard user would (issue 14): one test per
//! attack, each run as a real throwaway user against the real epmd, the
//! real epmctl and the real sudo with the EPM plugin in /etc/sudo.conf.
//! Every attempt must be refused and audited.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use epm_e2e::run::{epmctl_run, stderr, stdout};
use epm_e2e::sudo::{Replaced, sudo_as, sudo_installed};
use epm_e2e::{Daemon, TestGroup, TestUser, binary, capable, wait_until};

fn text(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

fn daemon(policy: &str) -> Daemon {
    let daemon = Daemon::start(policy, "");
    daemon.open_to_users();
    daemon
}

/// A directory only `user` can write (in /tmp), for what they plant.
fn home_of(user: &TestUser) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("epe-home-")
        .tempdir()
        .unwrap();
    std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Runs `sh -c SCRIPT` as `user`.
fn as_user(user: &TestUser, script: &str) -> Output {
    Command::new("/bin/sh")
        .args(["-c", script])
        .uid(user.uid)
        .gid(user.gid)
        .current_dir("/")
        .output()
        .unwrap()
}

fn records(daemon: &Daemon, event: &str, user: &TestUser) -> Vec<serde_json::Value> {
    daemon
        .audit()
        .into_iter()
        .filter(|r| r["event"] == event && r["user"] == user.name.as_str())
        .collect()
}

/// The user's `event` records once there are at least `count` (the audit
/// is written a moment after the answer), then a little longer for any
/// extra one.
fn audited(daemon: &Daemon, event: &str, user: &TestUser, count: usize) -> Vec<serde_json::Value> {
    wait_until(
        &format!("{count} {event} records"),
        Duration::from_secs(10),
        || records(daemon, event, user).len() >= count,
    );
    std::thread::sleep(Duration::from_millis(100));
    records(daemon, event, user)
}

/// Item 1: Rules match the resolved path: a symlink named like an allowed
/// program, `..` under a `**` glob, and a deny written for the real path
/// of a shell named another way.
#[test]
fn item1_rules_match_the_canonical_path_not_the_callers() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epe-atk1");
    let daemon = daemon(
        r#"{"version":1,"default_action":"allow","rules":[],"elevation":[
        {"id":"id","action":"allow","match":{"name":"id"}},
        {"id":"lib","action":"allow","match":{"path_glob":"/usr/lib/**"}},
        {"id":"bin","action":"allow","match":{"path_glob":"/bin/**"}},
        {"id":"no-shells","action":"deny","match":{"path_glob":"/bin/*sh"},
         "message":"no root shells"}]}"#,
    );
    let home = home_of(&user);
    let link = home.path().join("id");
    let planted = as_user(&user, &format!("ln -s /usr/bin/bash {}", link.display()));
    assert!(planted.status.success(), "{}", text(&planted));

    let attempts: [(&str, &str); 4] = [
        (link.to_str().unwrap(), "is not run as root"),
        ("/usr/lib/../bin/bash", "contains `..`"),
        // A deny written for /bin, where /bin is root's link to /usr/bin,
        // holds for the shell named by its real path, and the other way.
        ("/usr/bin/bash", "no root shells"),
        ("/bin/bash", "no root shells"),
    ];
    for (program, refusal) in attempts {
        let out = epmctl_run(&daemon, &user, &["run", "--", program, "-c", "id -u"], b"");
        assert_ne!(out.status.code(), Some(0), "{program}: {}", text(&out));
        assert!(!stdout(&out).contains('0'), "{program} ran: {}", text(&out));
        assert!(stderr(&out).contains(refusal), "{program}: {}", text(&out));
    }
    let denied = audited(&daemon, "elevation_denied", &user, 4);
    assert_eq!(denied.len(), 4, "{denied:?}");
    let shells: Vec<_> = denied
        .iter()
        .filter(|r| r["rule_id"] == "no-shells")
        .collect();
    assert_eq!(shells.len(), 2, "{denied:?}");
    assert!(
        shells.iter().all(|r| r["path"] == "/usr/bin/bash"),
        "the canonical path: {shells:?}"
    );
    assert_eq!(
        shells[1]["details"]["requested_path"], "/bin/bash",
        "{shells:?}"
    );

    // The real id, by name, still runs as root.
    let out = epmctl_run(&daemon, &user, &["run", "--", "id", "-u"], b"");
    assert_eq!(stdout(&out), "0\n", "{}", text(&out));
}

/// Item 2: Check then exec: a symlink flipped between the allowed program and
/// the user's own, 300 times; the user's program never runs as root.
#[test]
fn item2_a_symlink_flipper_never_gets_its_program_run() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epe-atk2");
    let id_digest = epm_e2e::sha256_of(Path::new("/usr/bin/id"));
    let daemon = daemon(&format!(
        r#"{{"version":1,"default_action":"allow","rules":[],"elevation":[
        {{"id":"id-by-hash","action":"allow","match":{{"sha256":"{id_digest}"}}}}]}}"#
    ));
    let home = home_of(&user);
    let dir = home.path();
    let mine = dir.join("mine");
    let marker = dir.join("pwned");
    std::fs::write(
        &mine,
        format!("#!/bin/sh\necho PWNED; touch {}\n", marker.display()),
    )
    .unwrap();
    std::os::unix::fs::chown(&mine, Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.join("tool");
    std::os::unix::fs::symlink("/usr/bin/id", &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(user.uid), Some(user.gid)).unwrap();
    // Renamed into place, so the link always exists (epmctl itself says
    // "command not found" for a missing one, without asking epmd).
    let mut flipper = Command::new("/bin/sh")
        .args([
            "-c",
            &format!(
                "cd {}; while :; do ln -sfn /usr/bin/id a; mv -T a tool; ln -sfn mine b; mv -T b tool; done",
                dir.display()
            ),
        ])
        .uid(user.uid)
        .gid(user.gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let mut refused = 0;
    let mut why = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let out = Command::new(binary("epmctl"))
            .arg("--socket")
            .arg(daemon.socket())
            .args(["run", "--", link.to_str().unwrap()])
            .uid(user.uid)
            .gid(user.gid)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            !stdout(&out).contains("PWNED"),
            "the user's program ran as root: {}",
            text(&out)
        );
        if out.status.code() != Some(0) {
            refused += 1;
            *why.entry(stderr(&out)).or_insert(0) += 1;
        }
    }
    let _ = flipper.kill();
    let _ = flipper.wait();
    eprintln!("300 tries in {:?}: {why:#?}", started.elapsed());
    assert!(!marker.exists(), "the user's program ran");
    assert_eq!(
        refused, 300,
        "a link in a directory the user writes is refused"
    );
    // Each try epmd saw was refused for the directory the user writes, and
    // audited; a loaded machine may turn a few away at the door (the
    // per-user connection quota) before anything is decided.
    let mut decided = 0;
    for (message, count) in &why {
        if message.contains("is not run as root") {
            decided += count;
        } else {
            assert!(message.contains("too many connections"), "{message}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let denied = loop {
        let denied = records(&daemon, "elevation_denied", &user);
        if denied.len() >= decided || Instant::now() > deadline {
            break denied;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(denied.len(), decided, "one denial per try epmd saw");
    assert!(records(&daemon, "elevation_allowed", &user).is_empty());
}

/// A daemon whose policy allows `/usr/bin/id` (and passes `EPE_OK`), a
/// sudoers entry giving `user` everything with SETENV, and the plugin.
fn sudo_setup(user: &TestUser, policy: &str) -> (Daemon, Replaced, Replaced) {
    let daemon = daemon(policy);
    let sudoers = Replaced::write(
        &PathBuf::from(format!("/etc/sudoers.d/epe-e2e-{}", user.name)),
        &format!("{} ALL=(ALL) NOPASSWD:SETENV: ALL\n", user.name),
        0o440,
    );
    let conf = Replaced::sudo_conf(&daemon.socket());
    (daemon, sudoers, conf)
}

/// Item 3: sudo's environment: what sudo would pass is decided too.
#[test]
fn item3_sudo_refuses_an_environment_no_rule_allows() {
    if !capable() || !sudo_installed() {
        return;
    }
    let user = TestUser::create("epe-atk3");
    let (daemon, _sudoers, _conf) = sudo_setup(
        &user,
        r#"{"version":1,"default_action":"allow","rules":[],"elevation":[
        {"id":"id-ok","action":"allow","match":{"path":"/usr/bin/id"},"env":["EPE_OK"]}]}"#,
    );
    let home = home_of(&user);
    let library = home.path().join("x.so");
    let preload = format!("LD_PRELOAD={}", library.display());
    for (assignment, name) in [
        (preload.as_str(), "LD_PRELOAD"),
        ("BASH_ENV=/tmp/rc", "BASH_ENV"),
        ("PATH=/tmp:/usr/bin", "PATH"),
    ] {
        let out = sudo_as(&user, &[assignment, "/usr/bin/id", "-u"]);
        assert!(!out.status.success(), "{assignment}: {}", text(&out));
        assert!(text(&out).contains(name), "{assignment}: {}", text(&out));
        assert!(!stdout(&out).contains('0'), "{}", text(&out));
    }
    let denied = audited(&daemon, "elevation_denied", &user, 3);
    assert_eq!(denied.len(), 3, "{denied:?}");
    assert!(denied.iter().all(|r| r["details"]["via"] == "sudo"));
    // What sudo passes by itself, and what the rule lists, go through.
    let out = sudo_as(&user, &["EPE_OK=/opt/x", "/usr/bin/id", "-u"]);
    assert_eq!(stdout(&out), "0\n", "{}\n{}", text(&out), daemon.log());
}

/// Item 4: sudoedit is decided on the file, never on the editor.
#[test]
fn item4_sudoedit_is_decided_on_the_edited_file() {
    if !capable() || !sudo_installed() {
        return;
    }
    let user = TestUser::create("epe-atk4");
    // Files to edit need a directory only root can change.
    let dir = PathBuf::from(format!("/run/epe-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _remove = RemoveOnDrop(dir.clone());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let editable = dir.join("editable");
    let protected = dir.join("protected");
    std::fs::write(&editable, "a\n").unwrap();
    std::fs::write(&protected, "b\n").unwrap();
    let (daemon, _sudoers, _conf) = sudo_setup(
        &user,
        &format!(
            r#"{{"version":1,"default_action":"allow","rules":[],"elevation":[
            {{"id":"id-ok","action":"allow","match":{{"path":"/usr/bin/id"}}}},
            {{"id":"edit-one","action":"allow","edit":true,"match":{{"path":"{}"}}}}]}}"#,
            editable.display()
        ),
    );
    let sudoedit = |editor: &str, file: &Path| {
        Command::new("sudoedit")
            .arg("-n")
            .arg(file)
            .env("SUDO_EDITOR", editor)
            .uid(user.uid)
            .gid(user.gid)
            .current_dir("/")
            .output()
            .unwrap()
    };
    // An allowed program as the editor changes nothing: the file decides.
    let out = sudoedit("/usr/bin/id", &protected);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("no elevation rule allows editing"),
        "{}\n{}",
        text(&out),
        daemon.log()
    );
    assert_eq!(std::fs::read_to_string(&protected).unwrap(), "b\n");
    let denied = audited(&daemon, "elevation_denied", &user, 1);
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(
        denied[0]["details"]["edit"],
        serde_json::json!([protected.display().to_string()])
    );
    // The file an edit rule names may be edited (with a no-op editor).
    let out = sudoedit("/usr/bin/true", &editable);
    assert!(out.status.success(), "{}\n{}", text(&out), daemon.log());
}

/// Removes a directory the test made, however the test ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An admin-session daemon for `group`, watching the sudoers drop-ins and
/// `scan` for setuid files, and a sudoers entry giving the group root.
fn session_setup(group: &TestGroup, scan: &Path) -> (Daemon, Replaced) {
    let policy = r#"{"version":1,"default_action":"allow","rules":[],
        "admin_session":[{"id":"everyone","max_minutes":30}]}"#;
    let daemon = Daemon::start_with_tables(
        policy,
        &format!(
            "[admin_sessions]\ngroup = {:?}\nsudoers_paths = [\"/etc/sudoers.d\"]\n\
             setuid_scan_paths = [{:?}]\n",
            group.name,
            scan.display().to_string()
        ),
    );
    daemon.open_to_users();
    let sudoers = Replaced::write(
        &PathBuf::from(format!("/etc/sudoers.d/epe-e2e-{}", group.name)),
        &format!("%{} ALL=(ALL) NOPASSWD: ALL\n", group.name),
        0o440,
    );
    (daemon, sudoers)
}

/// Item 5: Sudoers planted during a session in every spelling, a symlink in
/// sudoers.d, and a setuid shell: none survives the session.
#[test]
fn item5_nothing_planted_during_a_session_survives_it() {
    if !capable() || !sudo_installed() {
        return;
    }
    let group = TestGroup::create("epe-adm5");
    let user = TestUser::create("epe-atk5");
    let home = home_of(&user);
    let (daemon, _sudoers) = session_setup(&group, home.path());
    let out = daemon.epmctl_as(&user, &["admin", "start", "--minutes", "10"]);
    assert!(out.status.success(), "{}", text(&out));
    let planted: Vec<PathBuf> = (1..=4)
        .map(|i| PathBuf::from(format!("/etc/sudoers.d/epe-e2e-planted{i}")))
        .collect();
    let target = PathBuf::from("/etc/epe-e2e-planted-target");
    let shell = home.path().join("rootsh");
    let script = format!(
        "set -e; umask 0337; \
         echo '#{uid} ALL=(ALL) NOPASSWD: ALL' > {p1}; \
         echo 'root, \"{name}\" ALL=(ALL) NOPASSWD: ALL' > {p2}; \
         echo 'User_Alias EPE = {name}' > {p3}; echo 'EPE ALL=(ALL) NOPASSWD: ALL' >> {p3}; \
         echo '{name} ALL=(ALL) NOPASSWD: ALL' > {target}; ln -s {target} {p4}; \
         umask 022; cp /bin/bash {shell}; chmod 4755 {shell}",
        uid = user.uid,
        name = user.name,
        p1 = planted[0].display(),
        p2 = planted[1].display(),
        p3 = planted[2].display(),
        p4 = planted[3].display(),
        target = target.display(),
        shell = shell.display(),
    );
    // New processes of the user have the group while the session lasts.
    let out = as_user(
        &user,
        &format!(
            "sg {} -c \"sudo -n sh -c '{}'\"",
            group.name,
            script.replace('\'', "'\\''")
        ),
    );
    let cleanup = || {
        for path in planted.iter().chain([&target]) {
            let _ = std::fs::remove_file(path);
        }
    };
    if !out.status.success() {
        cleanup();
        panic!("planting failed: {}", text(&out));
    }
    wait_until(
        "the planted sudoers taken out",
        Duration::from_secs(10),
        || {
            planted
                .iter()
                .all(|p| std::fs::symlink_metadata(p).is_err())
        },
    );
    let out = daemon.epmctl_as(&user, &["admin", "end"]);
    assert!(out.status.success(), "{}", text(&out));
    let mode = std::fs::metadata(&shell).unwrap().permissions().mode();
    cleanup();
    assert_eq!(mode & 0o6000, 0, "the setuid shell keeps its bit: {mode:o}");
    let found = audited(&daemon, "sudoers_change_found", &user, 4);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(found.iter().all(|r| r["details"]["action"] == "removed"));
    let setuid = audited(&daemon, "setuid_file_found", &user, 1);
    assert_eq!(setuid.len(), 1, "{setuid:?}");
    assert_eq!(setuid[0]["details"]["action"], "bits_removed");
    // After the session, sudo gives the user nothing.
    let out = sudo_as(&user, &["-l"]);
    assert!(!text(&out).contains("NOPASSWD"), "{}", text(&out));
}

/// Item 6: A process started with the session's group (newgrp, sg) does not
/// keep it after the session.
#[test]
fn item6_processes_carrying_the_group_end_with_the_session() {
    if !capable() {
        return;
    }
    let group = TestGroup::create("epe-adm6");
    let user = TestUser::create("epe-atk6");
    let scan = tempfile::tempdir().unwrap();
    let (daemon, _sudoers) = session_setup(&group, scan.path());
    let out = daemon.epmctl_as(&user, &["admin", "start", "--minutes", "10"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut kept = Command::new("sg")
        .args([&group.name, "-c", "exec sleep 300"])
        .uid(user.uid)
        .gid(user.gid)
        .current_dir("/")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(kept.try_wait().unwrap().is_none(), "sg did not start");
    let out = daemon.epmctl_as(&user, &["admin", "end"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until("the process ended", Duration::from_secs(5), || {
        kept.try_wait().unwrap().is_some()
    });
    let found = audited(&daemon, "admin_group_process_found", &user, 1);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["details"]["action"], "ended");
    assert_eq!(found[0]["details"]["command"], "sleep", "{found:?}");
}

/// Item 7: justify and run open the named file with the caller's own rights:
/// nothing about a file in a directory they cannot read comes back.
#[test]
fn item7_files_the_caller_cannot_reach_stay_unknown() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epe-atk7");
    let daemon = daemon(
        r#"{"version":1,"default_action":"allow","rules":[
        {"id":"why","action":"justify","match":{"path_glob":"/**"}}],
        "elevation":[]}"#,
    );
    let secret = tempfile::Builder::new()
        .prefix("epe-secret-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(secret.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let present = secret.path().join("tool");
    std::fs::copy("/usr/bin/true", &present).unwrap();
    let absent = secret.path().join("nothing");
    // Over the socket, as a client that skips epmctl's own checks would.
    let mut answers = Vec::new();
    for path in [&present, &absent] {
        let path = path.to_str().unwrap();
        let mut said = Vec::new();
        for request in [
            serde_json::json!({"type": "justify", "path": path, "reason": "ticket 4411 needs it"}),
            serde_json::json!({"type": "request_approval", "path": path,
                "reason": "ticket 4411 needs it", "start": "2030-01-01T00:00:00Z",
                "end": "2030-01-01T01:00:00Z"}),
        ] {
            let out = daemon.ipc_as(&user, &request);
            assert!(text(&out).contains("\"error\""), "{}", text(&out));
            assert!(!text(&out).contains("sha256"), "{}", text(&out));
            said.push(text(&out).replace(path, "PATH"));
        }
        answers.push(said);
    }
    assert_eq!(answers[0], answers[1], "existence leaks");
    assert!(answers[0][0].contains("Permission denied"), "{answers:?}");
    assert_eq!(audited(&daemon, "flow_request_refused", &user, 4).len(), 4);
}

/// Item 8: Invisible justifications and forged `via: sudo` records.
#[test]
fn item8_invisible_reasons_and_forged_sudo_requests_are_refused() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epe-atk8");
    let daemon = daemon(
        r#"{"version":1,"default_action":"allow","rules":[],"elevation":[
        {"id":"id-why","action":"justify","match":{"path":"/usr/bin/id"},
         "justification":{"min_length":10}}]}"#,
    );
    let invisible = "\u{200B}".repeat(12);
    let out = epmctl_run(
        &daemon,
        &user,
        &["run", "--reason", &invisible, "--", "/usr/bin/id", "-u"],
        b"",
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!stdout(&out).contains('0'), "{}", text(&out));
    assert_eq!(audited(&daemon, "justification_refused", &user, 1).len(), 1);

    let forged = serde_json::json!({"type": "elevate", "via": "sudo", "for_uid": user.uid,
        "command": {"program": "/usr/bin/id", "argv": ["id"], "run_as": "root"},
        "reason": "a perfectly long reason"});
    let out = daemon.ipc_as(&user, &forged);
    assert!(text(&out).contains("forbidden"), "{}", text(&out));
    let refused = audited(&daemon, "request_refused", &user, 1);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(records(&daemon, "elevation_allowed", &user).is_empty());
}
