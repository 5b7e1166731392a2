//! The exec gate attacked by a standard user (issue 15): a real `epmd`
//! gating every mount of the machine (`watch_paths = ["/"]`), throwaway
//! users made by the test (named `epg…`), real execs, real namespaces.
//!
//! Every exec on the machine waits on the daemon while a test runs, so the
//! tests run one at a time, each policy allows everything but the test's
//! own files (by their digests and paths), and the daemon dies with the
//! test (a watchdog kills it if any exec waits 10 s). Each test prints
//! what it measured: what the attack got, epmd's RSS, and how long the
//! execs of everyone else waited meanwhile.
#![cfg(target_os = "linux")] // fanotify, user namespaces, x86_64 programs
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use epm_e2e::{Daemon, Latencies, TestUser, binary, capable, policy};

/// One daemon gating the machine at a time: two would double every
/// exec's wait, and their policies would meet.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How every test here starts: `None` when it cannot run here (it
/// skipped, or failed under `EPM_E2E=1`), else its turn.
fn my_turn() -> Option<MutexGuard<'static, ()>> {
    if !capable() || !runs_tiny_programs() {
        return None;
    }
    Some(
        ONE_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// A daemon gating every mount whose policy allows everything but the
/// program `denied` (by its digest, as rule `id`).
fn daemon_denying(id: &str, denied: &[u8], top_level: &str, tables: &str) -> Daemon {
    Daemon::start_gating_everything(
        &policy(1, "allow", &[deny_digest(id, &sha_of(denied))]),
        top_level,
        tables,
    )
}

/// epmd's resident size must stay under this, whatever a user sends.
const RSS_LIMIT_KIB: u64 = 100 * 1024;

fn rule(id: &str, action: &str, criteria: &str) -> String {
    format!(r#"{{"id": "{id}", "action": "{action}", "match": {criteria}}}"#)
}

fn deny_digest(id: &str, digest: &str) -> String {
    rule(id, "deny", &format!(r#"{{"sha256": "{digest}"}}"#))
}

/// Where the exit code sits in [`tiny_program`].
const EXIT_CODE_AT: u64 = 121;

/// A static x86_64 Linux program that exits with `code`, padded with
/// zeros to `size` bytes (the kernel maps only its first 132): two of them
/// differ in one byte, at [`EXIT_CODE_AT`].
fn tiny_program(code: u8, size: usize) -> Vec<u8> {
    elf(code, size, None, 62)
}

/// [`tiny_program`] with a `PT_INTERP` naming `interpreter`, for machine
/// `machine` (62: x86_64; anything else fails its exec before the kernel
/// opens the interpreter).
fn elf(code: u8, size: usize, interpreter: Option<&str>, machine: u16) -> Vec<u8> {
    // mov edi, code; mov eax, 60 (exit); syscall
    let text = [0xBF, code, 0, 0, 0, 0xB8, 60, 0, 0, 0, 0x0F, 0x05];
    let mut elf = epm_e2e::elf_program(&text, interpreter, machine);
    let code_at = epm_e2e::elf_code_offset(interpreter) as usize;
    assert_eq!(elf.get(EXIT_CODE_AT as usize - 120 + code_at), Some(&code));
    elf.resize(size.max(elf.len()), 0);
    elf
}

/// Whether this machine runs the tests' tiny x86_64 programs.
fn runs_tiny_programs() -> bool {
    if cfg!(target_arch = "x86_64") {
        return true;
    }
    assert!(
        std::env::var("EPM_E2E").as_deref() != Ok("1"),
        "the attack tests build x86_64 programs; this machine is not x86_64"
    );
    eprintln!("skipped: the attack tests build x86_64 programs");
    false
}

/// A directory of `user`'s own on the daemon's tmpfs.
fn home_of(daemon: &Daemon, user: &TestUser) -> PathBuf {
    let dir = daemon.mount.path().join(&user.name);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes `bytes` as an executable file owned by `user`.
fn install(path: &Path, bytes: &[u8], user: &TestUser) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).unwrap();
}

/// What one exec did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// It ran and exited with this code.
    Exited(i32),
    /// The exec failed with this errno (`EPERM`: the gate refused it).
    Failed(i32),
}

/// Execs `path` as `user`, waits for it, and says how it went.
fn exec_as(user: &TestUser, path: &Path) -> (Ran, Duration) {
    exec_as_ids((user.uid, user.gid), path)
}

/// [`exec_as`] by uid and gid (for threads that outlive no user).
fn exec_as_ids((uid, gid): (u32, u32), path: &Path) -> (Ran, Duration) {
    let started = Instant::now();
    let spawned = Command::new(path)
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let ran = match spawned {
        Ok(mut child) => Ran::Exited(child.wait().unwrap().code().unwrap_or(-1)),
        Err(e) => Ran::Failed(e.raw_os_error().unwrap_or(-1)),
    };
    (ran, started.elapsed())
}

fn records_where(
    daemon: &Daemon,
    what: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    daemon.audit().into_iter().filter(|r| what(r)).collect()
}

/// Checks and prints what every test must show at its end.
fn finish(daemon: &mut Daemon, test: &str) {
    let rss = daemon.rss_kib();
    println!(
        "{test}: epmd RSS {:.1} MB; root's execs elsewhere meanwhile (watchdog probes): {}",
        rss as f64 / 1024.0,
        daemon.probe_latencies()
    );
    assert!(rss < RSS_LIMIT_KIB, "epmd's RSS is {rss} KiB");
    daemon.stop();
}

/// Item 1: a user overwrites their allowed program with other bytes while
/// the gate hashes it. What runs must always be what was hashed.
#[test]
fn writing_a_program_while_it_is_checked_never_runs_other_bytes() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let allowed = tiny_program(0, 64 * 1024);
    let mut swapped = allowed.clone();
    swapped[EXIT_CODE_AT as usize] = 42;
    let digest = sha_of;
    let mut daemon = daemon_denying("epg-swapped", &swapped, "fail_mode = \"closed\"", "");
    let attacker = TestUser::create("epg-race");
    let home = home_of(&daemon, &attacker);
    let program = home.join("tool");
    install(&program, &allowed, &attacker);

    // The attacker's writer: flips the byte between the two programs as
    // fast as it can open the file, for as long as the test execs it.
    let writer = flip_writer(&attacker, &program, EXIT_CODE_AT, [0, 42]);
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let attempts = 400;
    for _ in 0..attempts {
        let (ran, _) = exec_as(&attacker, &program);
        let name = match ran {
            Ran::Exited(0) => "ran the allowed bytes".to_owned(),
            Ran::Exited(42) => "RAN THE DENIED BYTES".to_owned(),
            Ran::Exited(code) => format!("exited {code}"),
            Ran::Failed(libc::EPERM) => "refused (EPERM)".to_owned(),
            Ran::Failed(libc::ETXTBSY) => "failed: writer holds it (ETXTBSY)".to_owned(),
            Ran::Failed(errno) => format!("failed: errno {errno}"),
        };
        *outcomes.entry(name).or_default() += 1;
    }
    writer.stop();
    println!("write while hashing, {attempts} execs racing a writer: {outcomes:?}");
    assert!(
        !outcomes.contains_key("RAN THE DENIED BYTES"),
        "bytes other than those decided ran: {outcomes:?}"
    );

    // Every attempt reached the gate and was audited; the denied bytes
    // were never allowed.
    let path = program.display().to_string();
    let records = daemon.wait_for_record("of the last attempt", |r| {
        r["event"] == "exec" && r["path"] == path.as_str()
    });
    assert_eq!(records["uid"], attacker.uid);
    let deadline = Instant::now() + Duration::from_secs(10);
    let execs = loop {
        let execs = records_where(&daemon, |r| {
            r["event"] == "exec" && r["path"] == path.as_str()
        });
        if execs.len() >= attempts || Instant::now() > deadline {
            break execs;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(execs.len(), attempts, "one record per attempt");
    assert!(
        !execs
            .iter()
            .any(|r| r["decision"] == "allow" && r["sha256"] == digest(&swapped)),
        "the denied bytes were allowed"
    );
    let allowed_runs = outcomes.get("ran the allowed bytes").copied().unwrap_or(0);
    let allowed_records = execs
        .iter()
        .filter(|r| r["decision"] == "allow" && r["sha256"] == digest(&allowed))
        .count();
    assert!(allowed_records >= allowed_runs);
    finish(&mut daemon, "write while hashing");
}

/// A process of `user` that writes `bytes[0]`, then `bytes[1]`, ... at
/// `offset` of `path`, opening the file anew each time (without waiting),
/// until stopped.
fn flip_writer(user: &TestUser, path: &Path, offset: u64, bytes: [u8; 2]) -> Flipper {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let (uid, gid) = (user.uid, user.gid);
    // SAFETY: the child only makes system calls (no allocation, no locks)
    // until it is killed.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: async-signal-safe calls only, on values made before the fork.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(1);
            }
            let mut next = 0usize;
            loop {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK);
                if fd >= 0 {
                    let byte = bytes[next % 2];
                    libc::pwrite(fd, (&raw const byte).cast(), 1, offset as libc::off_t);
                    libc::close(fd);
                    next += 1;
                }
            }
        }
    }
    Flipper { pid }
}

/// A running [`flip_writer`].
struct Flipper {
    pid: libc::pid_t,
}

impl Flipper {
    fn stop(self) {
        drop(self);
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Whether `user` may make user namespaces here (the attack of item 4).
fn has_user_namespaces(user: &TestUser) -> bool {
    let ok = Command::new("unshare")
        .args(["-Urm", "true"])
        .uid(user.uid)
        .gid(user.gid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("EPM_E2E").as_deref() != Ok("1"),
            "EPM_E2E=1 but unprivileged users cannot make user namespaces here"
        );
        eprintln!("skipped: unprivileged user namespaces are disabled here");
    }
    ok
}

/// Item 4: in a user and mount namespace of their own, a user mounts their
/// directory over `/usr/local/bin` and runs their program from there, to
/// match a rule that allows `/usr/local/bin/…`.
#[test]
fn a_path_from_a_users_own_mount_namespace_matches_no_path_rule() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let attacker = TestUser::create("epg-ns");
    if !has_user_namespaces(&attacker) {
        return;
    }
    // Allows everything everywhere (the machine keeps working), but the
    // attacker's own directory; the forged path would be allowed.
    let mut daemon = Daemon::start_gating_everything("{}", "fail_mode = \"closed\"", "");
    let home = home_of(&daemon, &attacker);
    let tool = home.join("epg-forged");
    install(&tool, &tiny_program(7, 4096), &attacker);
    let scope = format!(r#"{{"users": ["{}"]}}"#, attacker.name);
    let rules = [
        rule("everything", "allow", r#"{"path_glob": "/**"}"#),
        format!(
            r#"{{"id": "not-their-own-files", "action": "deny", "match": {{"path_glob": "{}/**"}}, "scope": {scope}}}"#,
            home.display()
        ),
        format!(
            r#"{{"id": "local-tools", "action": "allow", "match": {{"path": "/usr/local/bin/epg-forged"}}, "scope": {scope}}}"#
        ),
    ];
    daemon.write_policy(&policy(2, "deny", &rules));
    let reloaded = daemon.reload();
    assert_eq!(reloaded["event"], "policy_loaded", "{reloaded}");

    assert_eq!(
        exec_as(&attacker, &tool).0,
        Ran::Failed(libc::EPERM),
        "from where it is"
    );
    let forged = Command::new("unshare")
        .args(["-Urm", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /usr/local/bin && exec /usr/local/bin/epg-forged",
            home.display()
        ))
        .uid(attacker.uid)
        .gid(attacker.gid)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&forged.stderr);
    println!("path forgery: exit {:?}, {stderr:?}", forged.status.code());
    assert_ne!(forged.status.code(), Some(7), "the forged path let it run");
    assert!(stderr.contains("not permitted"), "{stderr}");
    let record = daemon.wait_for_record("of the forged path", |r| {
        r["event"] == "exec" && r["path"] == "/usr/local/bin/epg-forged"
    });
    assert_eq!(record["decision"], "deny");
    assert_eq!(record["uid"], attacker.uid);
    assert_eq!(record["details"]["path_origin"], "other_mount_namespace");
    assert!(
        record["rule_id"].is_null(),
        "no path rule matched: {record}"
    );
    finish(&mut daemon, "path forgery");
}

/// The system loader dynamic programs name (x86_64: `/lib64/ld-linux-x86-64.so.2`).
fn system_loader() -> String {
    let head = std::fs::read("/bin/true").unwrap();
    let head = &head[..head.len().min(epm_agent::gate::interp::HEAD_BYTES)];
    epm_agent::gate::interp::interpreter(head)
        .expect("/bin/true names a loader")
        .to_owned()
}

/// Item 5 (the pairing half; running the loader directly is the kernel
/// hook's): a first exec that names the loader as its interpreter but
/// fails before the kernel loads it must not let the same process's next,
/// direct, run of the loader pass as that interpreter load, unrecorded.
#[test]
fn a_failed_exec_naming_the_loader_leaves_no_pairing_for_a_direct_loader_run() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let loader = system_loader();
    // The gate names files by their resolved path.
    let loader_path = std::fs::canonicalize(&loader)
        .unwrap()
        .display()
        .to_string();
    // Names the loader, but is for another machine (ARM): the kernel
    // refuses it before it opens the loader.
    let foreign = elf(0, 4096, Some(&loader), 40);
    // Names the loader, would load it, but the policy denies it.
    let refused = elf(0, 4096, Some(&loader), 62);
    let mut daemon = daemon_denying("epg-refused", &refused, "fail_mode = \"closed\"", "");
    let attacker = TestUser::create("epg-ld");
    let home = home_of(&daemon, &attacker);
    let victim_program = home.join("their-true");
    std::fs::copy("/bin/true", &victim_program).unwrap();
    for (name, bytes) in [("foreign", &foreign), ("refused", &refused)] {
        let first = home.join(name);
        install(&first, bytes, &attacker);
        // One process: the failed exec, then the loader run directly.
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "echo $$; shopt -s execfail; exec {} 2>/dev/null; exec {loader} {}",
                first.display(),
                victim_program.display()
            ))
            .uid(attacker.uid)
            .gid(attacker.gid)
            .output()
            .unwrap();
        let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(out.status.success(), "the loader ran the program: {out:?}");
        let path = first.display().to_string();
        let first_record = daemon.wait_for_record("of the first exec", |r| {
            r["event"] == "exec" && r["path"] == path.as_str() && r["pid"] == pid
        });
        let loader_record = daemon.wait_for_record("of the direct loader run", |r| {
            r["event"] == "exec" && r["pid"] == pid && r["path"] == loader_path.as_str()
        });
        println!(
            "loader pairing ({name}): first exec {} ({}), then {} {} with a record of its own",
            first_record["decision"],
            first_record["reason"],
            loader_record["path"],
            loader_record["decision"]
        );
        assert_eq!(loader_record["uid"], attacker.uid);
    }
    finish(&mut daemon, "loader pairing");
}

/// Runs `f` on `threads` threads until `stop`; what each returns, pooled.
fn in_parallel<T: Send + 'static>(
    threads: usize,
    stop: &Arc<AtomicBool>,
    f: impl Fn() -> T + Send + Sync + 'static,
) -> std::thread::JoinHandle<Vec<T>> {
    let stop = stop.clone();
    let f = Arc::new(f);
    std::thread::spawn(move || {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (stop, f) = (stop.clone(), f.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        out.push(f());
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

/// Another user's execs, measured by a shell of theirs (so no fork of this
/// busy test process is timed): of a program decided before (a cache hit)
/// and of a new copy of it each time (a new file: hashed by a worker).
/// `dir` is theirs and holds `known`.
fn victim_execs(victim: &TestUser, dir: &Path, count: usize) -> (Latencies, Latencies, Vec<Ran>) {
    let script = format!(
        r#"cd {dir}
for i in $(seq {count}); do
  s=$EPOCHREALTIME; ./known; c=$?; e=$EPOCHREALTIME; echo "known $c $s $e"
  cp known new-$i
  s=$EPOCHREALTIME; ./new-$i; c=$?; e=$EPOCHREALTIME; echo "new $c $s $e"
  rm -f new-$i; sleep 0.02
done"#,
        dir = dir.display()
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .uid(victim.uid)
        .gid(victim.gid)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let (mut cached, mut fresh, mut outcomes) = (Vec::new(), Vec::new(), Vec::new());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let [kind, code, start, end] = fields[..] else {
            continue;
        };
        let took =
            Duration::from_secs_f64(end.parse::<f64>().unwrap() - start.parse::<f64>().unwrap());
        // bash says 126 when the exec failed (EPERM included).
        outcomes.push(match code {
            "0" => Ran::Exited(0),
            "126" => Ran::Failed(libc::EPERM),
            other => Ran::Exited(other.parse().unwrap_or(-1)),
        });
        if kind == "known" {
            cached.push(took);
        } else {
            fresh.push(took);
        }
    }
    assert_eq!(outcomes.len(), 2 * count, "{out:?}");
    (Latencies::of(&cached), Latencies::of(&fresh), outcomes)
}

/// The large file of the flood (the tests run a debug build of epmd, which
/// hashes far slower than a release build).
const BIG_BYTES: usize = 16 * 1024 * 1024;

/// Item 6: a user floods the gate with execs of new versions of a large
/// file of their own (a mode change before each run defeats the caches),
/// and tries their denied program meanwhile. Only their own execs may be
/// answered per fail mode; everyone else's are answered as usual.
#[test]
fn a_user_flooding_the_gate_is_answered_per_fail_mode_alone() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let denied = tiny_program(42, 4096);
    let mut daemon = daemon_denying(
        "epg-denied",
        &denied,
        "fail_mode = \"closed\"",
        "[gate]\nqueue_capacity = 256",
    );
    let attacker = TestUser::create("epg-flood");
    let victim = TestUser::create("epg-victim");
    let home = home_of(&daemon, &attacker);
    let victim_home = home_of(&daemon, &victim);
    install(&victim_home.join("known"), &tiny_program(0, 8192), &victim);
    // The large file is on disk (the tmpfs is small).
    let big_dir = tempfile::Builder::new()
        .prefix("epg-flood-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(big_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let big = big_dir.path().join("big");
    install(&big, &tiny_program(0, BIG_BYTES), &attacker);
    let denied_path = home.join("denied");
    install(&denied_path, &denied, &attacker);

    let (cached_before, fresh_before, _) = victim_execs(&victim, &victim_home, 20);
    let stop = Arc::new(AtomicBool::new(false));
    let ids = (attacker.uid, attacker.gid);
    let flood = {
        let big = big.clone();
        let mode = Arc::new(std::sync::atomic::AtomicU32::new(0o755));
        // More execs at once than the attacker's share of the queue.
        in_parallel(24, &stop, move || {
            // A new version: the mode changes the ctime.
            let next = mode.fetch_xor(0o020, Ordering::Relaxed) ^ 0o020;
            let _ = std::fs::set_permissions(&big, std::fs::Permissions::from_mode(next));
            exec_as_ids(ids, &big).0
        })
    };
    let tries = {
        let path = denied_path.clone();
        in_parallel(1, &stop, move || {
            std::thread::sleep(Duration::from_millis(10));
            exec_as_ids(ids, &path).0
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let (cached_during, fresh_during, victim_outcomes) = victim_execs(&victim, &victim_home, 40);
    stop.store(true, Ordering::Relaxed);
    let flood = flood.join().unwrap();
    let tries = tries.join().unwrap();

    let count = |outcomes: &[Ran], which: Ran| outcomes.iter().filter(|o| **o == which).count();
    println!(
        "flood: {} execs of new {} MiB versions: {} ran, {} refused; the denied program tried {} times: {} refused, {} ran",
        flood.len(),
        BIG_BYTES >> 20,
        count(&flood, Ran::Exited(0)),
        count(&flood, Ran::Failed(libc::EPERM)),
        tries.len(),
        count(&tries, Ran::Failed(libc::EPERM)),
        count(&tries, Ran::Exited(42)),
    );
    println!(
        "another user's execs of a known program: before {cached_before}; during {cached_during}"
    );
    println!("another user's execs of new programs: before {fresh_before}; during {fresh_during}");
    let status = daemon.status();
    let counters = &status["counters"];
    println!(
        "status: {} fail-mode answers ({} over a user's share, {} over a user's hashing budget, {} overflow); latency {}",
        counters["fail_mode_answers"],
        counters["over_share"],
        counters["hash_budget"],
        counters["overflow"],
        status["latency_us"]
    );
    assert_eq!(count(&tries, Ran::Exited(42)), 0, "the denied program ran");
    assert!(
        victim_outcomes.iter().all(|o| *o == Ran::Exited(0)),
        "another user's exec was refused: {victim_outcomes:?}"
    );
    assert!(
        counters["over_share"].as_u64().unwrap() + counters["hash_budget"].as_u64().unwrap() > 0,
        "the flood reached no limit: {counters}"
    );
    assert_eq!(counters["overflow"], 0, "the queue as a whole never filled");
    // Fail mode answered the attacker alone, and said so.
    let fail_mode = records_where(&daemon, |r| {
        r["details"]["fail_mode"] == true && r["uid"] != attacker.uid
    });
    assert!(
        !fail_mode
            .iter()
            .any(|r| r["uid"] == victim.uid || r["uid"] == 0),
        "{fail_mode:?}"
    );
    let fail_mode = records_where(&daemon, |r| {
        r["details"]["fail_mode"] == true && r["uid"] == attacker.uid
    });
    let counted = records_where(&daemon, |r| r["event"] == "audit_rate_limited");
    assert!(
        !fail_mode.is_empty() || counted.iter().any(|r| r["uid"] == attacker.uid),
        "the fail-mode answers were audited"
    );
    finish(&mut daemon, "fairness");
}

/// Item 7: a user floods the control socket with requests whose arguments
/// fill the 1 MiB frame, to evict other users' audit records, fill the
/// disk and the daemon's memory.
#[test]
fn a_flood_of_huge_requests_stays_bounded_and_costs_others_no_record() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let denied = tiny_program(42, 4096);
    let mut daemon = daemon_denying(
        "epg-denied",
        &denied,
        "",
        // Small budgets, so that the flood outgrows them however fast this
        // machine serves it.
        "[audit]\nmax_file_bytes = 1048576\nkeep_files = 3\noutbox_max_bytes = 1048576\n\
         user_rate_bytes = 65536\nuser_burst_bytes = 1048576",
    );
    daemon.open_to_users();
    let attacker = TestUser::create("epg-audit");
    let victim = TestUser::create("epg-victim2");
    let victim_home = home_of(&daemon, &victim);
    let victim_denied = victim_home.join("denied");
    install(&victim_denied, &denied, &victim);
    assert_eq!(exec_as(&victim, &victim_denied).0, Ran::Failed(libc::EPERM));

    // First requests that fill the 1 MiB frame: each record keeps a
    // bounded part of the arguments, with their length and digest.
    let flood = |requests: u64, bytes: usize| {
        Command::new(binary("epm-e2e-ipc"))
            .arg(daemon.socket())
            .args(["flood", &requests.to_string(), &bytes.to_string()])
            .uid(attacker.uid)
            .gid(attacker.gid)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let answered = |child: std::process::Child| -> u64 {
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let started = Instant::now();
    let huge = [flood(30, 983_040), flood(30, 983_040)];
    let mut sent: u64 = huge.into_iter().map(answered).sum();
    assert_eq!(sent, 60, "every request was answered");
    let huge_took = started.elapsed();
    let cut = daemon.wait_for_record("of a request cut to size", |r| {
        r["event"] == "elevation_denied"
            && r["uid"] == attacker.uid
            && r["details"]["truncated"]["argv"]["bytes"].as_u64() > Some(900_000)
    });
    let note = &cut["details"]["truncated"]["argv"];
    assert_eq!(note["sha256"].as_str().unwrap().len(), 64);
    assert!(cut.to_string().len() < 64 * 1024);

    // Then many more, with another user's exec in the middle.
    let floods: Vec<u64> = vec![600; 4];
    let children: Vec<_> = floods.iter().map(|&n| flood(n, 49_152)).collect();
    let mut max_rss = daemon.rss_kib();
    let mut victim_mid_flood = false;
    for child in children {
        while !std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
            .map(|stat| stat.contains(") Z "))
            .unwrap_or(true)
        {
            max_rss = max_rss.max(daemon.rss_kib());
            if !victim_mid_flood && started.elapsed() > huge_took + Duration::from_millis(500) {
                assert_eq!(exec_as(&victim, &victim_denied).0, Ran::Failed(libc::EPERM));
                victim_mid_flood = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sent += answered(child);
    }
    println!(
        "audit flood: {sent} requests (60 of 960 KiB of arguments in {:.1} s, then 2400 of 48 KiB) in {:.1} s; epmd's RSS peaked at {:.1} MB",
        huge_took.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        max_rss as f64 / 1024.0
    );
    assert_eq!(
        sent,
        60 + floods.iter().sum::<u64>(),
        "every request was answered"
    );
    assert!(victim_mid_flood);
    assert!(max_rss < RSS_LIMIT_KIB, "epmd grew to {max_rss} KiB");

    // Files within their bounds, every line small, every cut named.
    let state = daemon.state_dir();
    let files = epm_audit::log_files(&state).unwrap();
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    println!("audit files: {} holding {total} bytes", files.len());
    for file in &files {
        let len = std::fs::metadata(file).unwrap().len();
        assert!(len <= 1_048_576, "{} is {len} bytes", file.display());
        for line in std::fs::read_to_string(file).unwrap().lines() {
            assert!(line.len() < 64 * 1024, "a record of {} bytes", line.len());
        }
    }
    assert!(total <= 4 * 1_048_576);
    let verify = daemon.epmctl(&["audit", "verify", state.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    daemon.stop();

    // The outbox, after the daemon: everything of the victim's is there,
    // and the attacker's requests are all accounted for: recorded, counted
    // by a rate-limit record, or counted as pruned from the outbox.
    let (store, _) = epm_store::Store::open(&state.join("epm.sqlite")).unwrap();
    let outbox: Vec<serde_json::Value> = store
        .audit_since(0, 1_000_000)
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(&r.line).unwrap())
        .collect();
    let victim_denies = outbox
        .iter()
        .filter(|r| r["uid"] == victim.uid && r["decision"] == "deny")
        .count();
    assert_eq!(
        victim_denies, 2,
        "the victim's records are all in the outbox"
    );
    // Besides the requests, the attacker's records are the execs of the
    // flooding processes themselves.
    let of_attacker = |r: &&serde_json::Value| r["uid"] == attacker.uid;
    let individual = outbox
        .iter()
        .filter(of_attacker)
        .filter(|r| r["event"] != "audit_rate_limited")
        .count() as u64;
    let counted: u64 = outbox
        .iter()
        .filter(of_attacker)
        .filter(|r| r["event"] == "audit_rate_limited")
        .map(|r| r["details"]["count"].as_u64().unwrap())
        .sum();
    let pruned: u64 = outbox
        .iter()
        .filter(|r| r["event"] == "audit_dropped")
        .map(|r| {
            r["details"]["by_uid"][attacker.uid.to_string()]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    let pruned_of = |who: &dyn Fn(&str) -> bool| -> u64 {
        outbox
            .iter()
            .filter(|r| r["event"] == "audit_dropped")
            .filter_map(|r| r["details"]["by_uid"].as_object())
            .flat_map(|by_uid| by_uid.iter())
            .filter(|(uid, _)| who(uid))
            .map(|(_, n)| n.as_u64().unwrap())
            .sum()
    };
    let pruned_others = pruned_of(&|uid| uid != attacker.uid.to_string());
    // The outbox levels the heaviest users down first (epm-store's
    // `prune_audit`). Root's records are every other exec on the machine
    // (the gate watches `/`): on a machine busy with other work, root can be
    // as heavy as the attacker and is then levelled with them, by design.
    // The victim, who ran two commands, never is.
    let pruned_victim = pruned_of(&|uid| uid == victim.uid.to_string());
    let flooders = 2 + floods.len() as u64;
    println!(
        "the attacker's {} records ({sent} requests, {flooders} execs): {individual} written, {counted} counted past their budget of 64 KiB/s, {pruned} pruned from the outbox; others' records pruned: {pruned_others}",
        sent + flooders,
    );
    assert_eq!(individual + counted + pruned, sent + flooders);
    assert!(counted > 0, "the flood was rate-limited");
    assert!(
        pruned > 0,
        "the outbox outgrew its budget: the attacker's went"
    );
    assert_eq!(pruned_victim, 0, "none of the victim's records was pruned");
    println!(
        "audit flood: epmd RSS peak {:.1} MB (limit {} MB)",
        max_rss as f64 / 1024.0,
        RSS_LIMIT_KIB / 1024
    );
}

fn sha_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Item 8: `epmctl audit verify` while the daemon writes and rotates the
/// log under load never reports a break that is not there.
#[test]
fn verify_while_the_log_rotates_under_load_never_raises_a_false_alarm() {
    let Some(_turn) = my_turn() else {
        return;
    };
    let mut daemon = Daemon::start_gating_everything(
        &policy(1, "allow", &[]),
        "",
        "[audit]\nmax_file_bytes = 16384\nkeep_files = 50",
    );
    let user = TestUser::create("epg-verify");
    let home = home_of(&daemon, &user);
    let program = home.join("tool");
    install(&program, &tiny_program(0, 4096), &user);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let ids = (user.uid, user.gid);
        in_parallel(2, &stop, move || exec_as_ids(ids, &program).0)
    };
    let state = daemon.state_dir();
    let mut verified = 0;
    for _ in 0..60 {
        let out = daemon.epmctl(&["audit", "verify", state.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "a false alarm while the log rotates: {text}"
        );
        assert!(text.contains("intact"), "{text}");
        verified += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let execs = load.join().unwrap().len();
    let files = epm_audit::log_files(&state).unwrap().len();
    println!(
        "verify under load: {verified} verifications intact while {execs} execs were audited across {files} files"
    );
    assert!(files > 3, "the log rotated");
    std::io::stdout().flush().unwrap();
    finish(&mut daemon, "verify under load");
}
