//! The fanotify gate on its own, with real execs and no policy: each test
//! mounts a private tmpfs and gates only that, so the rest of the machine is
//! never affected and tests can run in parallel.
//!
//! Needs root (fanotify permission events and mounting). Without it the
//! tests print "skipped: …" and pass, unless `EPM_E2E=1`, when they fail.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use epm_gate::fanotify::{FanotifyGate, MarkScope};
use epm_gate::{ExecGate, FileIdentity, PendingExec, Shutdown, Verdict};
use nix::mount::{MntFlags, MsFlags};

/// How long one exec may take before the test calls it a hang.
const EXEC_DEADLINE: Duration = Duration::from_secs(10);

/// Whether this machine can run the tests: `Err(why)` if not.
fn probe() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    let flags = libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC;
    // SAFETY: fanotify_init takes two flag words and returns a new fd or -1.
    let fd = unsafe { libc::fanotify_init(flags, libc::O_RDONLY as u32) };
    if fd < 0 {
        return Err(format!(
            "fanotify permission events unavailable: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: closing the descriptor just created and owned here.
    unsafe { libc::close(fd) };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    mount_tmpfs(dir.path()).map_err(|e| format!("cannot mount a tmpfs: {e}"))?;
    let _ = nix::mount::umount2(dir.path(), MntFlags::MNT_DETACH);
    Ok(())
}

/// Skips the test (returns false) when it cannot run here, unless
/// `EPM_E2E=1`, when that is a failure.
fn capable() -> bool {
    match probe() {
        Ok(()) => true,
        Err(why) if std::env::var("EPM_E2E").as_deref() == Ok("1") => {
            panic!("EPM_E2E=1 but the fanotify gate tests cannot run: {why}")
        }
        Err(why) => {
            // Straight to stderr: the harness would capture eprintln! of a
            // passing test, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: {why} (set EPM_E2E=1 to make this a failure)"
            );
            false
        }
    }
}

fn mount_tmpfs(at: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some("epm-test"),
        at,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("size=16m,mode=0755"),
    )
}

/// A mount on a directory, detached on drop (even when the test panics).
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

/// A tmpfs mounted on a fresh temporary directory.
struct Tmpfs {
    // Field order: unmount before the directory is removed.
    _mount: MountGuard,
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        mount_tmpfs(dir.path()).unwrap();
        Self {
            _mount: MountGuard(dir.path().to_owned()),
            dir,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies `/bin/true` in as `name`.
    fn install(&self, name: &str) -> PathBuf {
        install_true(&self.path().join(name))
    }
}

fn install_true(target: &Path) -> PathBuf {
    std::fs::copy("/bin/true", target).unwrap();
    target.to_owned()
}

/// Waits for a child with a deadline, killing it on timeout, so a gate bug
/// fails the test instead of hanging it.
fn wait_with_deadline(
    mut child: std::process::Child,
    what: &Path,
    deadline: Duration,
) -> ExitStatus {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} did not finish: the exec hung", what.display());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a program. `Command::spawn` returns only once the exec succeeded or
/// failed, so it runs on its own thread, under the deadline too.
fn run_command(mut command: Command, what: &Path) -> std::io::Result<ExitStatus> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(command.spawn());
    });
    let child = rx
        .recv_timeout(EXEC_DEADLINE)
        .unwrap_or_else(|_| panic!("exec of {} hung", what.display()))?;
    Ok(wait_with_deadline(child, what, EXEC_DEADLINE))
}

fn run(path: &Path) -> std::io::Result<ExitStatus> {
    run_command(Command::new(path), path)
}

/// Runs a program from a copy of this mount namespace, whose mounts are new
/// kernel objects that carry no per-mount fanotify marks (as
/// `unshare -m` or an unprivileged `unshare -Urm` would).
fn run_in_new_mount_namespace(path: &Path) -> std::io::Result<ExitStatus> {
    let mut command = Command::new(path);
    // SAFETY: the closure runs in the forked child before exec and only
    // calls unshare(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_command(command, path)
}

fn is_eperm(result: &std::io::Result<ExitStatus>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

fn succeeded(result: &std::io::Result<ExitStatus>) -> bool {
    matches!(result, Ok(status) if status.success())
}

/// What the sink saw of one exec.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    pid: u32,
    ppid: u32,
    uid: u32,
    gid: u32,
    parent_path: Option<String>,
    file: FileIdentity,
    /// Bytes read through the content handle.
    content: Option<Vec<u8>>,
}

fn seen(pending: &mut PendingExec) -> Seen {
    let facts = &mut pending.facts;
    let content = facts.content.as_mut().map(|file| {
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        bytes
    });
    Seen {
        path: facts.path.clone(),
        pid: facts.pid,
        ppid: facts.ppid,
        uid: facts.uid,
        gid: facts.gid,
        parent_path: facts.parent_path.clone(),
        file: facts.file,
        content,
    }
}

/// A gate running on its own thread.
struct RunningGate {
    shutdown: Shutdown,
    handle: Option<thread::JoinHandle<()>>,
}

impl RunningGate {
    /// Stops the gate and waits for `run` to return.
    fn stop(mut self) -> Duration {
        let started = Instant::now();
        self.shutdown.request();
        if let Some(handle) = self.handle.take() {
            handle.join().unwrap();
        }
        started.elapsed()
    }
}

impl Drop for RunningGate {
    fn drop(&mut self) {
        // A failing test still stops its gate, releasing every exec.
        self.shutdown.request();
    }
}

/// Starts `gate` on a thread with `sink`.
fn start(
    mut gate: FanotifyGate,
    mut sink: impl FnMut(PendingExec) + Send + 'static,
) -> RunningGate {
    let shutdown = Shutdown::new().unwrap();
    let stop = shutdown.clone();
    let handle = thread::spawn(move || {
        gate.run(&mut sink, &stop).unwrap();
    });
    RunningGate {
        shutdown,
        handle: Some(handle),
    }
}

/// Starts a gate on `watch` whose sink reports what it sees and answers
/// with `decide(path)` (`None`: drop the exec unanswered).
fn start_gate(
    watch: &Path,
    decide: impl Fn(&str) -> Option<Verdict> + Send + 'static,
) -> (RunningGate, mpsc::Receiver<Seen>) {
    let gate = FanotifyGate::new(vec![watch.to_owned()], Verdict::Deny).unwrap();
    assert_eq!(
        gate.marks(),
        [(watch.to_owned(), MarkScope::Filesystem)],
        "only the test's own tmpfs is marked, whole"
    );
    assert!(gate.unmarked_mounts().is_empty());
    let (seen_tx, seen_rx) = mpsc::channel();
    let running = start(gate, move |mut pending: PendingExec| {
        let _ = seen_tx.send(seen(&mut pending));
        if let Some(verdict) = decide(&pending.facts.path) {
            pending.answer(verdict);
        }
    });
    (running, seen_rx)
}

fn deny_named_deny_me(path: &str) -> Option<Verdict> {
    Some(if path.ends_with("/deny-me") {
        Verdict::Deny
    } else {
        Verdict::Allow
    })
}

#[test]
fn denies_and_allows_only_inside_the_watched_mount() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let deny_me = tmpfs.install("deny-me");
    let allow_me = tmpfs.install("allow-me");
    let (gate, seen) = start_gate(tmpfs.path(), deny_named_deny_me);

    assert!(is_eperm(&run(&deny_me)), "deny-me must fail with EPERM");
    assert!(succeeded(&run(&allow_me)), "allow-me must run");
    assert!(succeeded(&run(Path::new("/bin/true"))));

    assert!(gate.stop() < Duration::from_secs(5));
    let paths: Vec<String> = seen.try_iter().map(|s| s.path).collect();
    assert!(paths.iter().any(|p| p.ends_with("/deny-me")), "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("/allow-me")), "{paths:?}");
    assert!(
        paths
            .iter()
            .all(|p| p.starts_with(&*tmpfs.path().to_string_lossy())),
        "nothing outside the watched mount reaches the sink: {paths:?}"
    );
}

#[test]
fn facts_describe_the_new_program_and_its_parent() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let program = tmpfs.install("allow-me");
    let (gate, seen) = start_gate(tmpfs.path(), |_| Some(Verdict::Allow));
    assert!(succeeded(&run(&program)));
    gate.stop();

    let facts = seen.try_iter().next().expect("the exec was seen");
    let meta = std::fs::metadata(&program).unwrap();
    assert_eq!(facts.path, program.to_string_lossy());
    assert_eq!(
        facts.file,
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        }
    );
    assert_eq!(
        facts.content.as_deref(),
        Some(&std::fs::read("/bin/true").unwrap()[..]),
        "the content handle reads the executable"
    );
    assert_ne!(facts.pid, std::process::id(), "the child execs, not us");
    assert_eq!(facts.ppid, std::process::id(), "the parent is this test");
    assert_eq!(
        facts.parent_path.as_deref().map(Path::new),
        Some(std::env::current_exe().unwrap().as_path())
    );
    assert_eq!(facts.uid, nix::unistd::getuid().as_raw());
    assert_eq!(facts.gid, nix::unistd::getgid().as_raw());
}

#[test]
fn mounts_added_later_are_gated() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let (gate, _seen) = start_gate(tmpfs.path(), |_| Some(Verdict::Deny));
    let inner = tmpfs.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    mount_tmpfs(&inner).unwrap();
    let _inner_mount = MountGuard(inner.clone());
    let late = install_true(&inner.join("late"));
    // The gate notices the mount table change asynchronously.
    let deadline = Instant::now() + EXEC_DEADLINE;
    let denied = loop {
        let result = run(&late);
        if is_eperm(&result) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        thread::sleep(Duration::from_millis(20));
    };
    gate.stop();
    assert!(
        denied,
        "an exec from a mount added after start must be gated"
    );
}

#[test]
fn a_copied_mount_namespace_does_not_escape_the_gate() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let deny_me = tmpfs.install("deny-me");
    let (gate, _seen) = start_gate(tmpfs.path(), deny_named_deny_me);
    assert!(
        is_eperm(&run_in_new_mount_namespace(&deny_me)),
        "an exec through the copy of the mount in a new namespace must be gated"
    );
    gate.stop();
}

#[test]
fn a_file_system_also_mounted_outside_the_watch_paths_is_gated_only_inside() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let deny_me = tmpfs.install("deny-me");
    let elsewhere = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some(tmpfs.path()),
        elsewhere.path(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let _bound = MountGuard(elsewhere.path().to_owned());

    let gate = FanotifyGate::new(vec![tmpfs.path().to_owned()], Verdict::Deny).unwrap();
    assert_eq!(
        gate.marks(),
        [(tmpfs.path().to_owned(), MarkScope::Mount)],
        "a file-system mark would gate the bind mount outside the watch path too"
    );
    let (seen_tx, seen) = mpsc::channel();
    let gate = start(gate, move |pending: PendingExec| {
        let _ = seen_tx.send(pending.facts.path.clone());
        pending.answer(Verdict::Deny);
    });
    assert!(is_eperm(&run(&deny_me)), "gated inside the watch path");
    assert!(
        succeeded(&run(&elsewhere.path().join("deny-me"))),
        "not gated through the mount outside it"
    );
    gate.stop();
    let paths: Vec<String> = seen.try_iter().collect();
    assert_eq!(paths, [deny_me.to_string_lossy()]);
}

#[test]
fn each_answer_reaches_its_own_exec_even_when_the_content_handle_is_closed_early() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let held = tmpfs.install("hold-me");
    let other = tmpfs.install("allow-me");
    let gate = FanotifyGate::new(vec![tmpfs.path().to_owned()], Verdict::Deny).unwrap();
    let (held_tx, held_rx) = mpsc::channel();
    let gate = start(gate, move |mut pending: PendingExec| {
        if pending.facts.path.ends_with("/hold-me") {
            // A worker that is done reading the file closes its handle and
            // answers later: the next event's descriptor may get the same
            // number, and the answers must not be confused.
            pending.facts.content = None;
            let _ = held_tx.send(pending);
        } else {
            pending.answer(Verdict::Allow);
        }
    });

    let (held_result_tx, held_result) = mpsc::channel();
    let held_path = held.clone();
    thread::spawn(move || {
        let _ = held_result_tx.send(Command::new(&held_path).status());
    });
    let pending = held_rx.recv_timeout(EXEC_DEADLINE).unwrap();
    assert!(succeeded(&run(&other)), "the other exec is allowed");
    assert!(
        held_result.try_recv().is_err(),
        "the held exec is still waiting for its own answer"
    );
    pending.answer(Verdict::Deny);
    let result = held_result.recv_timeout(EXEC_DEADLINE).unwrap();
    assert!(
        is_eperm(&result),
        "the held exec gets its own answer: {result:?}"
    );
    gate.stop();
}

#[test]
fn an_unanswered_exec_gets_the_fallback_not_a_hang() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let dropped = tmpfs.install("dropped");
    let (gate, _seen) = start_gate(tmpfs.path(), |_| None);
    assert!(
        is_eperm(&run(&dropped)),
        "the fallback (Deny) answers the dropped exec"
    );
    gate.stop();
}

#[test]
fn shutdown_is_prompt_and_releases_the_mount() {
    if !capable() {
        return;
    }
    let tmpfs = Tmpfs::new();
    let program = tmpfs.install("after");
    let (gate, _seen) = start_gate(tmpfs.path(), |_| Some(Verdict::Deny));
    // Let the gate reach its blocking wait first.
    thread::sleep(Duration::from_millis(50));
    assert!(
        gate.stop() < Duration::from_secs(2),
        "run() returns promptly"
    );
    // With the gate gone (its fanotify group closed) nothing is gated.
    assert!(succeeded(&run(&program)));
}
