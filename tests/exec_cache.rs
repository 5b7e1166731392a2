//! The kernel cache of allows (issue 17), end to end with real fanotify:
//! a file the policy allows for everyone is answered by the kernel on its
//! next execs, which are still audited (`answered_by: kernel_cache`), and
//! no cached allow outlives the policy, mode or content it was made for.
#![cfg(target_os = "linux")] // fanotify marks, read from /proc fdinfo
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use epm_e2e::{
    Daemon, TestUser, denied, policy, ran, run, sha256_of, spawn_when_not_busy, wait_until,
    with_interpreter,
};

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

/// Execs the gate was asked about, or told of, so far.
fn execs_seen(daemon: &Daemon) -> u64 {
    daemon.status()["counters"]["execs_seen"].as_u64().unwrap()
}

/// How many execs the gate hears of while `program` runs `times` times:
/// two per run while its loader is decided (the program's notification and
/// the loader's event), one while the loader's allow answers the load.
fn heard_per_run(daemon: &Daemon, program: &Path, times: u64) -> u64 {
    let before = execs_seen(daemon);
    run_times(daemon, program, times as usize);
    (execs_seen(daemon) - before) / times
}

/// The loader is never cached in the kernel (a direct run must be read
/// while it waits), but its allow is held in user space and answers a load
/// paired with its program at once: under the same rules as a cached allow.
#[test]
fn a_loaders_held_allow_outlives_neither_the_policy_nor_the_loader_it_was_made_for() {
    if !epm_e2e::capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let head = std::fs::read("/bin/true").unwrap();
    let system_loader =
        epm_agent::gate::interp::interpreter(&head[..epm_agent::gate::interp::HEAD_BYTES])
            .unwrap()
            .to_owned();
    let loader = daemon.mount.install(&system_loader, "lib/epm-ld");
    let (tool, _link) = with_interpreter(&daemon, "tool", &loader);
    cache(&daemon, &tool);
    assert_eq!(
        heard_per_run(&daemon, &tool, 5),
        1,
        "the loads are answered from the held allow\n{}",
        daemon.log()
    );

    // A change to the loader (here its mode's ctime) is another version:
    // decided again, then held again.
    std::fs::set_permissions(&loader, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    assert_eq!(
        heard_per_run(&daemon, &tool, 1),
        2,
        "the changed loader is decided again"
    );
    assert_eq!(heard_per_run(&daemon, &tool, 3), 1);

    // Run directly, the loader is never taken for a load: its own record.
    let direct = std::process::Command::new(&loader)
        .arg(&tool)
        .output()
        .unwrap();
    assert!(direct.status.success(), "{direct:?}");
    let loader_path = loader.display().to_string();
    daemon.wait_for_record("the direct run of the loader", |r| {
        r["event"] == "exec" && r["path"] == loader_path.as_str()
    });

    // A policy that denies the loader takes effect at once: no load is
    // answered from the allow held under the last one.
    daemon.write_policy(&policy(
        2,
        "allow",
        &[rule(
            "no-loader",
            "deny",
            &format!(r#"{{"sha256": "{}"}}"#, sha256_of(&loader)),
        )],
    ));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    assert!(
        denied(&run(&tool)),
        "the new policy denies the loader at once"
    );
    let refused = daemon.wait_for_record("the refused load", |r| {
        r["event"] == "exec" && r["rule_id"] == "no-loader"
    });
    assert_eq!(refused["decision"], "deny");
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

/// A static x86_64 Linux program (no `PT_INTERP`, so no loader event
/// follows its exec) that sleeps `nanos` and exits 0: 100 ms is long
/// enough that its notification is read while it lives, so its record can
/// name its user.
fn static_sleeper(nanos: u64) -> Vec<u8> {
    let mut text = vec![
        0x48, 0x8D, 0x3D, 18, 0, 0, 0, // lea rdi, [rip + 18]: the timespec
        0x31, 0xF6, // xor esi, esi
        0xB8, 35, 0, 0, 0, // mov eax, 35 (nanosleep)
        0x0F, 0x05, // syscall
        0x31, 0xFF, // xor edi, edi
        0xB8, 60, 0, 0, 0, // mov eax, 60 (exit)
        0x0F, 0x05, // syscall
    ];
    text.extend_from_slice(&0u64.to_le_bytes()); // tv_sec
    text.extend_from_slice(&nanos.to_le_bytes()); // tv_nsec
    epm_e2e::elf_program(&text, None, 62)
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_cached_static_program_on_an_idle_gate_is_audited_with_its_user() {
    if !epm_e2e::capable() {
        return;
    }
    // A static program has no loader event to carry its notification: the
    // notification group itself wakes the idle gate (EPOLLONESHOT), and
    // while it is disarmed right after, the gate's short timeout reads it.
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let program = daemon.mount.path().join("bin/static-sleeper");
    std::fs::create_dir_all(program.parent().unwrap()).unwrap();
    std::fs::write(&program, static_sleeper(100_000_000)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let user = TestUser::create("epm-kc-static");
    let run_as_user = |times: usize| {
        for _ in 0..times {
            let status = user.run(&program).unwrap();
            assert!(status.success(), "the static program ran: {status:?}");
        }
    };
    let records_after = |before: usize, times: usize| {
        wait_until(
            &format!("{times} more exec records of the static program"),
            Duration::from_secs(10),
            || execs_of(&daemon, &program).len() >= before + times,
        );
        std::thread::sleep(Duration::from_millis(300));
        let records = execs_of(&daemon, &program);
        assert_eq!(
            records.len(),
            before + times,
            "one record per exec: {records:#?}"
        );
        records[before..].to_vec()
    };

    run_as_user(1);
    let first = records_after(0, 1);
    assert!(
        !from_kernel_cache(&first[0]),
        "decided by epmd: {:#}",
        first[0]
    );

    // Idle: nothing has happened for a while, so the notification group is
    // armed again; one exec, alone.
    std::thread::sleep(Duration::from_millis(200));
    run_as_user(1);
    // Then several in a row: after the first wakes the gate, the next are
    // read by the timeout (or with the one before).
    run_as_user(4);
    let records = records_after(1, 5);
    for record in &records {
        assert!(from_kernel_cache(record), "{record:#}\n{}", daemon.log());
        assert_eq!(record["decision"], "allow", "{record:#}");
        assert_eq!(record["uid"], user.uid, "its user: {record:#}");
        assert!(record["details"]["process"].is_null(), "{record:#}");
    }
}

#[test]
fn a_burst_of_cached_execs_is_audited_once_per_exec() {
    if !epm_e2e::capable() {
        return;
    }
    // Dynamic: each exec is the program's notification, read on the wake-up
    // for its loader's permission event, and the loader paired with it.
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    cache(&daemon, &tool);

    let records = burst(&daemon, &tool, 4, 40);
    let tool_path = tool.display().to_string();
    for (pid, record) in &records {
        assert_eq!(record["path"], tool_path.as_str(), "pid {pid}: {record:#}");
        assert!(from_kernel_cache(record), "{record:#}\n{}", daemon.log());
    }
}

/// Runs `program` `each` times on each of `threads` threads at once, and
/// returns the one exec record of each of those processes (any other
/// number of records for a pid fails).
fn burst(
    daemon: &Daemon,
    program: &Path,
    threads: usize,
    each: usize,
) -> Vec<(u32, serde_json::Value)> {
    let pids: Vec<u32> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut pids = Vec::new();
                    for _ in 0..each {
                        let mut command = std::process::Command::new(program);
                        command
                            .stdout(std::process::Stdio::null())
                            .stderr(std::process::Stdio::null());
                        let mut child = spawn_when_not_busy(&mut command).unwrap();
                        pids.push(child.id());
                        assert!(child.wait().unwrap().success());
                    }
                    pids
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let of_burst = |daemon: &Daemon| -> Vec<serde_json::Value> {
        daemon
            .audit()
            .into_iter()
            .filter(|r| {
                r["event"] == "exec"
                    && r["pid"]
                        .as_u64()
                        .is_some_and(|p| pids.contains(&(p as u32)))
            })
            .collect()
    };
    wait_until(
        &format!("{} exec records of the burst", pids.len()),
        Duration::from_secs(20),
        || of_burst(daemon).len() >= pids.len(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let records = of_burst(daemon);
    let mut per_pid: HashMap<u64, Vec<serde_json::Value>> = HashMap::new();
    for record in records {
        per_pid
            .entry(record["pid"].as_u64().unwrap())
            .or_default()
            .push(record);
    }
    pids.iter()
        .map(|pid| {
            let mut mine = per_pid.remove(&u64::from(*pid)).unwrap_or_default();
            assert_eq!(
                mine.len(),
                1,
                "exactly one record for pid {pid} (no loader record, no double): {mine:#?}"
            );
            (*pid, mine.remove(0))
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_burst_of_short_lived_cached_static_programs_is_audited_once_per_exec() {
    if !epm_e2e::capable() {
        return;
    }
    // No loader event carries these notifications, and each process is
    // gone in microseconds: read by the notification group's own wake-up
    // or the gate's timeout, each exec still has exactly one record, with
    // its user or saying it is unknown.
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let program = daemon.mount.path().join("bin/static-quick");
    std::fs::create_dir_all(program.parent().unwrap()).unwrap();
    std::fs::write(&program, static_sleeper(0)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    cache(&daemon, &program);
    let records = burst(&daemon, &program, 4, 40);
    for (pid, record) in &records {
        assert!(
            from_kernel_cache(record),
            "pid {pid}: {record:#}\n{}",
            daemon.log()
        );
        assert!(
            record["uid"] == 0
                || record["details"]["process"]
                    .as_str()
                    .is_some_and(|p| p.contains("user unknown")),
            "pid {pid}: {record:#}"
        );
    }
}

/// One fanotify group of a process, from its `fdinfo`.
#[derive(Debug, Default)]
struct Group {
    /// `FAN_CLASS_NOTIF` (0), `FAN_CLASS_CONTENT` (4), ...
    class: u32,
    /// Inode marks: inode number to (mask, ignored mask).
    inode_marks: BTreeMap<u64, (u64, u64)>,
    /// Mount and file-system marks.
    wide_marks: usize,
}

/// Every fanotify group `pid` holds.
fn fanotify_groups(pid: u32) -> Vec<Group> {
    let hex = |line: &str, key: &str| -> u64 {
        let value = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"));
        u64::from_str_radix(value, 16).unwrap()
    };
    let mut groups = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let target: PathBuf = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.as_os_str() != "anon_inode:[fanotify]" {
            continue;
        }
        let fd = entry.file_name();
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
            .unwrap();
        let mut group = Group::default();
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("fanotify ") else {
                continue;
            };
            if rest.starts_with("flags:") {
                group.class = (hex(rest, "flags:") & 0xc) as u32;
            } else if rest.starts_with("ino:") {
                group.inode_marks.insert(
                    hex(rest, "ino:"),
                    (hex(rest, "mask:"), hex(rest, "ignored_mask:")),
                );
            } else if rest.starts_with("mnt_id:") || rest.starts_with("sdev:") {
                group.wide_marks += 1;
            }
        }
        groups.push(group);
    }
    groups
}

#[test]
fn the_notification_group_holds_only_inode_marks_each_ignore_mask_has_its_notification() {
    if !epm_e2e::capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "bin/tool");
    let other = daemon.mount.install("/bin/echo", "bin/other");
    cache(&daemon, &tool);
    cache(&daemon, &other);
    use std::os::unix::fs::MetadataExt;
    let inodes = [&tool, &other].map(|p| std::fs::metadata(p).unwrap().ino());

    let groups = fanotify_groups(daemon.process_id());
    assert_eq!(
        groups.len(),
        2,
        "a permission and a notification group: {groups:#?}"
    );
    let permission = groups
        .iter()
        .find(|g| g.class == 4)
        .expect("FAN_CLASS_CONTENT");
    let notification = groups
        .iter()
        .find(|g| g.class == 0)
        .expect("FAN_CLASS_NOTIF");
    assert!(
        permission.wide_marks > 0,
        "the watch marks: {permission:#?}"
    );
    assert_eq!(
        notification.wide_marks, 0,
        "no mount or file-system mark in the notification group: {notification:#?}"
    );
    for ino in inodes {
        assert_eq!(
            notification
                .inode_marks
                .get(&ino)
                .map(|m| m.0 & libc::FAN_OPEN_EXEC),
            Some(libc::FAN_OPEN_EXEC),
            "notification mark of inode {ino}: {notification:#?}"
        );
        let ignored = permission.inode_marks.get(&ino).map(|m| m.1);
        assert_eq!(
            ignored.map(|i| i & libc::FAN_OPEN_EXEC_PERM),
            Some(libc::FAN_OPEN_EXEC_PERM),
            "ignore mask of inode {ino}: {permission:#?}"
        );
    }
    // The invariant: no ignore mask without its notification mark.
    for (ino, (_, ignored)) in &permission.inode_marks {
        if ignored & libc::FAN_OPEN_EXEC_PERM != 0 {
            assert!(
                notification.inode_marks.contains_key(ino),
                "inode {ino} is let through unaudited: {groups:#?}"
            );
        }
    }

    // A policy change empties both.
    daemon.write_policy(&policy(2, "allow", &[]));
    assert_eq!(daemon.reload()["event"], "policy_loaded");
    let groups = fanotify_groups(daemon.process_id());
    for group in &groups {
        assert!(group.inode_marks.is_empty(), "flushed: {groups:#?}");
    }
    assert!(
        groups.iter().any(|g| g.wide_marks > 0),
        "the watch marks stay"
    );
}

/// `fs.fanotify.max_user_groups` set for as long as it lives.
struct GroupLimit(String);

impl GroupLimit {
    const PATH: &str = "/proc/sys/fs/fanotify/max_user_groups";

    fn set(groups: usize) -> GroupLimit {
        let old = std::fs::read_to_string(Self::PATH).unwrap();
        std::fs::write(Self::PATH, groups.to_string()).unwrap();
        GroupLimit(old)
    }
}

impl Drop for GroupLimit {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// The fanotify groups open on the machine (one per descriptor; the
/// e2e lock keeps other tests' daemons away meanwhile).
fn open_fanotify_groups() -> usize {
    let mut open = 0;
    for process in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        open += fds
            .flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.as_os_str() == "anon_inode:[fanotify]")
            })
            .count();
    }
    open
}

#[test]
fn without_a_notification_group_the_gate_still_gates_and_caches_nothing() {
    if !epm_e2e::capable() {
        return;
    }
    // Room for epmd's permission group only: the kernel refuses the
    // notification group, as on a machine where other fanotify users hold
    // root's share. The cache is what goes, never the gate.
    let limit = GroupLimit::set(open_fanotify_groups() + 1);
    let daemon = Daemon::start(
        &policy(1, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        "",
    );
    drop(limit);
    assert!(
        daemon
            .log()
            .contains("cannot create the fanotify group for the kernel cache's notifications"),
        "the missing cache is logged:\n{}",
        daemon.log()
    );
    assert_eq!(fanotify_groups(daemon.process_id()).len(), 1);

    let tool = daemon.mount.install("/bin/true", "bin/tool");
    let records = run_times(&daemon, &tool, 4);
    assert!(
        !records.iter().any(from_kernel_cache),
        "nothing is answered by the kernel: {records:#?}"
    );
    let nc = daemon.mount.install("/bin/true", "bin/nc");
    assert!(denied(&run(&nc)), "the gate still gates");
    assert_eq!(last_deny(&daemon, &nc)["rule_id"], "no-nc");
}
