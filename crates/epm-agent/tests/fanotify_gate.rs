//! The fanotify gate on its own, with real execs: each test mounts a private
//! tmpfs and gates only that, so the rest of the machine is never affected.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use epm_agent::gate::fanotify::FanotifyGate;
use epm_agent::gate::{ExecGate, PendingExec, Shutdown, Verdict};

/// Skips the test (returns `None`) when fanotify is unavailable, unless
/// `EPM_E2E=1`, when that is a failure.
fn capable() -> Option<()> {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root")
    } else {
        None
    };
    match why {
        None => Some(()),
        Some(why) if std::env::var("EPM_E2E").as_deref() == Ok("1") => {
            panic!("EPM_E2E=1 but this test cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why} (set EPM_E2E=1 to make this a failure)");
            None
        }
    }
}

/// A tmpfs mounted on a fresh temporary directory, unmounted on drop.
struct TmpfsMount {
    dir: tempfile::TempDir,
}

impl TmpfsMount {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        mount_tmpfs(dir.path());
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn install(&self, name: &str) -> PathBuf {
        let target = self.path().join(name);
        std::fs::copy("/bin/true", &target).unwrap();
        target
    }
}

fn mount_tmpfs(at: &Path) {
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0755", "epm-test"])
        .arg(at)
        .status()
        .unwrap();
    assert!(status.success(), "mount tmpfs on {}", at.display());
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Runs a program with a deadline, so a gate bug fails the test instead of hanging it.
fn run(path: &Path) -> std::io::Result<ExitStatus> {
    let mut child = Command::new(path).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{} did not finish: the exec hung", path.display());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn is_eperm(result: &std::io::Result<ExitStatus>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

/// Starts a gate on `watch` whose sink reports every path it sees and
/// answers with `decide(path)` (`None`: drop it unanswered).
fn start_gate(
    watch: &Path,
    decide: impl Fn(&str) -> Option<Verdict> + Send + 'static,
) -> (Shutdown, mpsc::Receiver<String>, thread::JoinHandle<()>) {
    let mut gate = FanotifyGate::new(vec![watch.to_owned()], Verdict::Deny).unwrap();
    assert!(gate.marked_mounts() >= 1);
    let shutdown = Shutdown::new().unwrap();
    let (seen_tx, seen) = mpsc::channel();
    let stop = shutdown.clone();
    let handle = thread::spawn(move || {
        let mut sink = |pending: PendingExec| {
            let _ = seen_tx.send(pending.facts.path.clone());
            if let Some(verdict) = decide(&pending.facts.path) {
                pending.answer(verdict);
            }
        };
        gate.run(&mut sink, &stop).unwrap();
    });
    (shutdown, seen, handle)
}

#[test]
fn denies_and_allows_only_inside_the_watched_mount() {
    let Some(()) = capable() else { return };
    let mount = TmpfsMount::new();
    let deny_me = mount.install("deny-me");
    let allow_me = mount.install("allow-me");
    let (shutdown, seen, handle) = start_gate(mount.path(), |path| {
        Some(if path.ends_with("/deny-me") {
            Verdict::Deny
        } else {
            Verdict::Allow
        })
    });

    assert!(is_eperm(&run(&deny_me)), "deny-me must fail with EPERM");
    assert!(run(&allow_me).unwrap().success());
    assert!(run(Path::new("/bin/true")).unwrap().success());

    shutdown.request();
    handle.join().unwrap();
    let paths: Vec<String> = seen.try_iter().collect();
    assert!(paths.iter().any(|p| p.ends_with("/deny-me")), "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("/allow-me")), "{paths:?}");
    assert!(
        !paths
            .iter()
            .any(|p| p == "/usr/bin/true" || p == "/bin/true"),
        "outside the mount: {paths:?}"
    );
}

#[test]
fn mounts_added_later_are_gated() {
    let Some(()) = capable() else { return };
    let mount = TmpfsMount::new();
    let (shutdown, _seen, handle) = start_gate(mount.path(), |_| Some(Verdict::Deny));
    let inner = mount.path().join("inner");
    std::fs::create_dir(&inner).unwrap();
    mount_tmpfs(&inner);
    std::fs::copy("/bin/true", inner.join("late")).unwrap();
    // The gate notices the mount table change asynchronously.
    let mut denied = false;
    for _ in 0..100 {
        if is_eperm(&run(&inner.join("late"))) {
            denied = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("umount").arg("-l").arg(&inner).status();
    shutdown.request();
    handle.join().unwrap();
    assert!(
        denied,
        "an exec from a mount added after start must be gated"
    );
}

#[test]
fn an_unanswered_exec_gets_the_fallback_not_a_hang() {
    let Some(()) = capable() else { return };
    let mount = TmpfsMount::new();
    let dropped = mount.install("dropped");
    let (shutdown, _seen, handle) = start_gate(mount.path(), |_| None);
    assert!(
        is_eperm(&run(&dropped)),
        "fallback Deny answers the dropped exec"
    );
    shutdown.request();
    handle.join().unwrap();
}

#[test]
fn shutdown_is_prompt_and_releases_the_mount() {
    let Some(()) = capable() else { return };
    let mount = TmpfsMount::new();
    let program = mount.install("after");
    let (shutdown, _seen, handle) = start_gate(mount.path(), |_| Some(Verdict::Deny));
    let started = Instant::now();
    shutdown.request();
    handle.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    // With the gate gone (its fanotify fd closed) nothing is gated any more.
    assert!(run(&program).unwrap().success());
}
