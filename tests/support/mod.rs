//! Harness for EPM's end-to-end tests: a real `epmd` gating a private tmpfs,
//! driven through the real `epmctl`.
//!
//! Each test mounts its own tmpfs and the daemon gates only that mount, so
//! tests run in parallel and a failing daemon can never hang the machine.
//! Without root the tests skip with a message; with `EPM_E2E=1` (as in CI)
//! a missing capability is a failure instead.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness fails loudly by design

pub mod browser;
pub mod database;
pub mod platform;
pub mod run;
pub mod sudo;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Whether the end-to-end tests can run here. Returns `false` (the test
/// should return early) when they cannot and `EPM_E2E` is not `1`; panics
/// when they cannot and `EPM_E2E=1`.
pub fn capable() -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("needs root (fanotify permission events need CAP_SYS_ADMIN)".to_owned())
    } else if !Path::new("/proc/sys/fs/fanotify").exists() {
        Some("this kernel has no fanotify".to_owned())
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("EPM_E2E").as_deref() == Ok("1") => {
            panic!("EPM_E2E=1 but the end-to-end tests cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}; set EPM_E2E=1 to make this a failure");
            false
        }
    }
}

/// A binary of this workspace, built next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        path.display()
    );
    // `cargo test -p epm-e2e` alone does not rebuild other packages'
    // binaries: refuse to test a binary older than the code it comes from.
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    for source in sources_of(name) {
        if let Some(newer) = newest_source(&crates.join(source)).filter(|(time, _)| *time > built) {
            panic!(
                "{} is older than {}: run `cargo build --workspace --bins`, or `cargo test --workspace`",
                path.display(),
                newer.1.display()
            );
        }
    }
    path
}

/// The workspace crates a binary is built from (keep in step with their
/// Cargo.toml files): only these can make it stale.
fn sources_of(binary: &str) -> &'static [&'static str] {
    match binary {
        "epmd" => &[
            "epm-agent",
            "epm-api",
            "epm-audit",
            "epm-exec-hook",
            "epm-gate",
            "epm-ipc",
            "epm-os",
            "epm-policy",
            "epm-store",
            "epm-sync",
        ],
        "epmctl" => &[
            "epmctl",
            "epm-audit",
            "epm-ipc",
            "epm-os",
            "epm-policy",
            "epm-prompt",
        ],
        "epm-helper" => &["epm-helper", "epm-ipc", "epm-policy", "epm-prompt"],
        "epm-e2e-ipc" => &["epm-ipc", "epm-policy"],
        "epm-e2e-memfd-exec" => &[],
        "epm-platform" => &["epm-platform", "epm-platform-db", "epm-api", "epm-policy"],
        _ => &[],
    }
}

/// The most recently modified Rust source, embedded asset or manifest
/// below `dir`.
fn newest_source(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_source(&path)
        } else if path
            .extension()
            // The console's stylesheet and script are compiled in too.
            .is_some_and(|e| e == "rs" || e == "css" || e == "js")
            || path.ends_with("Cargo.toml")
        {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        } else {
            None
        };
        if let Some(candidate) = candidate
            && newest.as_ref().is_none_or(|(t, _)| candidate.0 > *t)
        {
            newest = Some(candidate);
        }
    }
    newest
}

/// A tmpfs on a fresh directory, unmounted (lazily) on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it.
    pub fn new() -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("epm-e2e-")
            .tempdir()
            .unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m,mode=0755", "epm-e2e"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies a system binary into the mount under `name` (creating parents).
    pub fn install(&self, from: &str, name: &str) -> PathBuf {
        let target = self.path().join(name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::copy(from, &target).unwrap();
        target
    }
}

impl Default for Tmpfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// SHA-256 of a file, lowercase hex.
pub fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Runs a program with a deadline; a hang fails the test instead of the suite.
pub fn run(path: &Path) -> std::io::Result<ExitStatus> {
    let mut command = Command::new(path);
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = spawn_when_not_busy(&mut command)?;
    wait_for_exit(&mut child, path)
}

/// Spawns `command`, retrying for a while when the exec fails with
/// `ETXTBSY`.
///
/// Tests write a program and then run it, while other tests of the same
/// binary fork: a child forked between our `open` for writing and `close`
/// inherits the writable descriptor until its own exec, and under a gated
/// mount that exec waits for a decision. The kernel refuses to run a file
/// open for writing anywhere, so our exec can fail with `ETXTBSY` through no
/// fault of the code under test.
pub fn spawn_when_not_busy(command: &mut Command) -> std::io::Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Whether an exec failed with EPERM (what a fanotify deny looks like).
pub fn denied(result: &std::io::Result<ExitStatus>) -> bool {
    matches!(result, Err(e) if e.raw_os_error() == Some(libc::EPERM))
}

/// Whether an exec ran (whatever its exit status).
pub fn ran(result: &std::io::Result<ExitStatus>) -> bool {
    result.is_ok()
}

/// A running `epmd` gating its own tmpfs (or, for the attack tests, every
/// mount of the machine), with its state in a temp dir.
#[derive(Debug)]
pub struct Daemon {
    /// The gated mount (with [`Daemon::start_gating_everything`], one mount
    /// among all the others).
    pub mount: Tmpfs,
    dir: tempfile::TempDir,
    child: Option<Child>,
    watch: Watch,
    /// Running while a daemon that gates every mount runs.
    watchdog: Option<Watchdog>,
}

/// What a daemon gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Its own tmpfs only: a broken daemon cannot hang the machine.
    OwnMount,
    /// `watch_paths = ["/"]`: every exec on the machine waits for it.
    Everything,
}

/// Keeps a daemon that gates the whole machine from hanging it: execs
/// `/bin/true` every 200 ms and kills the daemon (`SIGKILL`: the kernel
/// then lets every waiting exec go) if one waits longer than 10 s. Its
/// probes measure what every other exec on the machine waits meanwhile.
#[derive(Debug)]
struct Watchdog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    probes: std::sync::Arc<std::sync::Mutex<Vec<Duration>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Watchdog {
    const LIMIT: Duration = Duration::from_secs(10);

    fn start(pid: u32) -> Watchdog {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(Mutex::new(Vec::new()));
        // Milliseconds since `epoch` when the running probe began; 0: none.
        let started = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let prober = {
            let (stop, probes, started) = (stop.clone(), probes.clone(), started.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    started.store(
                        at.duration_since(epoch).as_millis() as u64 + 1,
                        Ordering::SeqCst,
                    );
                    let _ = Command::new("/bin/true").status();
                    started.store(0, Ordering::SeqCst);
                    probes.lock().unwrap().push(at.elapsed());
                    thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let killer = {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let began = started.load(Ordering::SeqCst);
                    let now = Instant::now().duration_since(epoch).as_millis() as u64 + 1;
                    if began != 0 && now.saturating_sub(began) > Self::LIMIT.as_millis() as u64 {
                        eprintln!(
                            "watchdog: an exec waited more than {:?}; killing epmd",
                            Self::LIMIT
                        );
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                        return;
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Watchdog {
            stop,
            probes,
            threads: vec![prober, killer],
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Latency of a set of execs, for the test output.
#[derive(Debug, Clone, Copy)]
pub struct Latencies {
    /// How many.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Longest.
    pub max: Duration,
}

impl Latencies {
    /// The latencies of `samples` (none: all zero).
    pub fn of(samples: &[Duration]) -> Latencies {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let at = |q: f64| {
            sorted
                .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        Latencies {
            count: sorted.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} execs: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.count,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}

impl Daemon {
    /// Writes `policy` as the policy file and starts the daemon with extra
    /// top-level config lines (e.g. `mode = "monitor"`).
    pub fn start(policy: &str, extra_config: &str) -> Daemon {
        Daemon::launch(
            Some(policy),
            &format!("{extra_config}\ndevice_id = \"e2e-device\"\n"),
            "",
        )
    }

    /// Like [`Daemon::start`], with configuration tables (e.g.
    /// `[admin_sessions]`) besides the top-level lines.
    pub fn start_with_tables(policy: &str, tables: &str) -> Daemon {
        Daemon::launch(Some(policy), "device_id = \"e2e-device\"\n", tables)
    }

    /// Starts a daemon managed by a platform: no policy file, this device
    /// id, and `platform_table` as its `[platform]` table's body.
    pub fn start_managed(device_id: &str, platform_table: &str) -> Daemon {
        Daemon::launch(
            None,
            &format!("device_id = {device_id:?}\n"),
            &format!("[platform]\n{platform_table}\n"),
        )
    }

    /// Starts a daemon gating every mount of the machine (`watch_paths =
    /// ["/"]`), for tests that attack the gate as a user would. Every exec
    /// on the machine waits for it, other people's too: its `policy` must
    /// allow everything but what the test denies. It dies with the test
    /// process, and a watchdog kills it if any exec waits 10 s. `tables`
    /// may end with a `[gate]` table: its keys join `watch_paths`.
    pub fn start_gating_everything(policy: &str, top_level: &str, tables: &str) -> Daemon {
        Daemon::launch_watching(
            Some(policy),
            &format!("{top_level}\ndevice_id = \"e2e-device\"\n"),
            tables,
            Watch::Everything,
        )
    }

    fn launch(policy: Option<&str>, top_level: &str, tables: &str) -> Daemon {
        Daemon::launch_watching(policy, top_level, tables, Watch::OwnMount)
    }

    fn launch_watching(
        policy: Option<&str>,
        top_level: &str,
        tables: &str,
        watch: Watch,
    ) -> Daemon {
        let mount = Tmpfs::new();
        let dir = tempfile::Builder::new()
            .prefix("epm-e2e-state-")
            .tempdir()
            .unwrap();
        let mut config = format!("{top_level}\nstate_dir = \"state\"\nsocket = \"epmd.sock\"\n");
        if let Some(policy) = policy {
            std::fs::write(dir.path().join("policy.json"), policy).unwrap();
            config.push_str("policy_file = \"policy.json\"\n");
        }
        let watched = match watch {
            Watch::OwnMount => mount.path().display().to_string(),
            Watch::Everything => "/".to_owned(),
        };
        // The test's own [gate] keys go into the one [gate] table.
        let (tables, gate) = match tables.split_once("[gate]\n") {
            Some((before, gate)) => (before.to_owned(), gate.to_owned()),
            None => (tables.to_owned(), String::new()),
        };
        config.push_str(&format!(
            "{tables}\n[gate]\nwatch_paths = [{watched:?}]\n{gate}\n"
        ));
        // The kernel hook holds execs machine-wide unless scoped: a test
        // that wants it says so (and scopes it to its own cgroup).
        if !tables.contains("[kernel_hook]") {
            config.push_str("[kernel_hook]\nenabled = false\n");
        }
        std::fs::write(dir.path().join("epmd.toml"), config).unwrap();
        let mut daemon = Daemon {
            mount,
            dir,
            child: None,
            watch,
            watchdog: None,
        };
        daemon.spawn();
        daemon
    }

    /// The daemon's pid.
    pub fn process_id(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The daemon's resident set size, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.process_id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// What the watchdog's probe execs (root's `/bin/true`, every 200 ms)
    /// waited since the daemon started: what everyone else's execs waited.
    pub fn probe_latencies(&self) -> Latencies {
        let probes = self
            .watchdog
            .as_ref()
            .map(|w| w.probes.lock().unwrap().clone())
            .unwrap_or_default();
        Latencies::of(&probes)
    }

    fn spawn(&mut self) {
        let watch = self.watch;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("epmd.log"))
            .unwrap();
        let mut command = Command::new(binary("epmd"));
        command
            .arg("--config")
            .arg(self.dir.path().join("epmd.toml"))
            .env(
                "EPM_LOG",
                if watch == Watch::Everything {
                    "info"
                } else {
                    "debug"
                },
            )
            .stdout(Stdio::null())
            .stderr(log);
        #[cfg(target_os = "linux")]
        if watch == Watch::Everything {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between
            // fork and exec here.
            unsafe {
                command.pre_exec(|| {
                    // Gone with the thread that started it (the test's), so a
                    // killed test never leaves a daemon gating the machine.
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let readies_before = self.log().matches("epmd ready").count();
        let policy_record_before = self.last_policy_record();
        let child = command.spawn().unwrap();
        if watch == Watch::Everything {
            self.watchdog = Some(Watchdog::start(child.id()));
        }
        self.child = Some(child);
        self.wait_ready(policy_record_before, readies_before);
    }

    /// The sequence number of the newest policy_loaded / policy_rejected
    /// record in the log (0 when there is none). Read from the files, so it
    /// works while the daemon is down; a number, not a count, because
    /// retention deletes old files and a count can go down.
    fn last_policy_record(&self) -> u64 {
        let Ok(entries) = std::fs::read_dir(self.state_dir()) else {
            return 0;
        };
        entries
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("audit") && name.ends_with(".jsonl")
            })
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|r| r["event"] == "policy_loaded" || r["event"] == "policy_rejected")
                    .filter_map(|r| r["seq"].as_u64())
                    .max()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    /// Ready means answering on the control socket, having audited the
    /// startup policy (audit batches linger, so without it a later
    /// [`Daemon::reload`] could mistake the startup record for its own),
    /// *and* having its gate in place (logged `epmd ready`): the socket
    /// answers before the fanotify marks are placed, so an exec at once
    /// could run ungated, and a test that saw it run and then reloaded a
    /// deny could see the deny's exec run too.
    fn wait_ready(&mut self, policy_record_before: u64, readies_before: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("epmd exited at start ({status}):\n{}", self.log());
            }
            if self.epmctl(&["status", "--json"]).status.success()
                && self.last_policy_record() > policy_record_before
                && self.log().matches("epmd ready").count() > readies_before
            {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("epmd did not become ready:\n{}", self.log());
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("epmd.log")).unwrap_or_default()
    }

    /// The state directory (store and audit log).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The live audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.state_dir().join("audit.jsonl")
    }

    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("epmd.sock")
    }

    /// Rewrites the policy file (takes effect on [`Daemon::reload`]).
    pub fn write_policy(&self, policy: &str) {
        std::fs::write(self.dir.path().join("policy.json"), policy).unwrap();
    }

    /// Lets other users reach the control socket (the state directory is
    /// private to root by default, as tempdirs are).
    pub fn open_to_users(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Runs `epmctl --socket <ours> ARGS` as `user`.
    pub fn epmctl_as(&self, user: &TestUser, args: &[&str]) -> Output {
        use std::os::unix::process::CommandExt;
        Command::new(binary("epmctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .uid(user.uid)
            .gid(user.gid)
            .output()
            .unwrap()
    }

    /// Sends one raw request as `user` (`epm-e2e-ipc … call`), as a client
    /// that skips epmctl's own checks would; its answer is one JSON line on
    /// stdout.
    pub fn ipc_as(&self, user: &TestUser, request: &serde_json::Value) -> Output {
        use std::os::unix::process::CommandExt;
        Command::new(binary("epm-e2e-ipc"))
            .arg(self.socket())
            .arg("call")
            .arg(request.to_string())
            .uid(user.uid)
            .gid(user.gid)
            .output()
            .unwrap()
    }

    /// Runs `epmctl --socket <ours> ARGS`.
    pub fn epmctl(&self, args: &[&str]) -> Output {
        Command::new(binary("epmctl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    /// `epmctl status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.epmctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every audit record (via `epmctl audit tail --json`), parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let out = self.epmctl(&["audit", "tail", "-n", "100000", "--json"]);
        assert!(
            out.status.success(),
            "audit tail: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until an audit record satisfies `predicate`, and returns it.
    pub fn wait_for_record(
        &self,
        what: &str,
        predicate: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(record) = self.audit().into_iter().find(|r| predicate(r)) {
                return record;
            }
            if Instant::now() > deadline {
                panic!("no audit record {what} within 10 s; log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    /// Sends SIGHUP and waits until the reload is audited (a new
    /// policy_loaded or policy_rejected record).
    pub fn reload(&self) -> serde_json::Value {
        let before = self.audit().len();
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGHUP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let records = self.audit();
            if let Some(r) = records
                .iter()
                .skip(before)
                .find(|r| r["event"] == "policy_loaded" || r["event"] == "policy_rejected")
            {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "reload not audited; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.stop_watchdog();
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = wait_with_deadline(&mut child, Duration::from_secs(20));
            assert!(
                status.success(),
                "epmd exited with {status} on SIGTERM:\n{}",
                self.log()
            );
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&mut self) {
        self.stop_watchdog();
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            let _ = child.wait();
        }
    }

    /// Rewrites the configuration file (for the next start) with `edit`.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.path().join("epmd.toml");
        let config = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, edit(config)).unwrap();
    }

    /// Starts the daemon again on the same state.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.spawn();
    }
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("epmd did not exit within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Daemon {
    /// Stops the watchdog before its daemon goes (its pid must not be
    /// signalled once it may name another process).
    fn stop_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            watchdog.stop();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_watchdog();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until `done`, checking every 100 ms, and fails the test naming
/// `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// A policy document with the given default and rules (JSON fragments).
pub fn policy(version: u64, default_action: &str, rules: &[String]) -> String {
    format!(
        r#"{{"version": {version}, "default_action": "{default_action}", "rules": [{}]}}"#,
        rules.join(",")
    )
}

/// A local user made for one test and removed after it.
#[derive(Debug)]
pub struct TestUser {
    /// Its name.
    pub name: String,
    /// Its uid (>= 1000).
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
}

impl TestUser {
    /// Creates the user (replacing a leftover of an earlier run).
    pub fn create(name: &str) -> TestUser {
        let _ = Command::new("userdel").arg(name).output();
        let out = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "useradd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let user = nix::unistd::User::from_name(name).unwrap().unwrap();
        let uid = user.uid.as_raw();
        assert!(
            uid >= 1000,
            "useradd gave uid {uid}: agents report uid >= 1000 only"
        );
        TestUser {
            name: name.into(),
            uid,
            gid: user.gid.as_raw(),
        }
    }

    /// Runs a program as this user with a deadline, like [`run()`].
    pub fn run(&self, path: &Path) -> std::io::Result<ExitStatus> {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(path);
        command
            .uid(self.uid)
            .gid(self.gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = spawn_when_not_busy(&mut command)?;
        wait_for_exit(&mut child, path)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

fn wait_for_exit(child: &mut Child, path: &Path) -> std::io::Result<ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{} did not finish within 15 s: the exec hung",
                path.display()
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A local group made for one test and removed after it.
#[derive(Debug)]
pub struct TestGroup {
    /// Its name.
    pub name: String,
}

impl TestGroup {
    /// Creates the group (replacing a leftover of an earlier run).
    pub fn create(name: &str) -> TestGroup {
        let _ = Command::new("groupdel").arg(name).output();
        let out = Command::new("groupadd").arg(name).output().unwrap();
        assert!(
            out.status.success(),
            "groupadd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestGroup { name: name.into() }
    }

    /// Its listed members.
    pub fn members(&self) -> Vec<String> {
        let out = Command::new("getent")
            .args(["group", &self.name])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        line.rsplit(':')
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether `user` is a listed member.
    pub fn has(&self, user: &TestUser) -> bool {
        self.members().contains(&user.name)
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A per-user helper (`epm-helper --backend scripted`) running as a test
/// user, with its transcript in a file.
#[derive(Debug)]
pub struct Helper {
    dir: tempfile::TempDir,
    child: Child,
}

impl Helper {
    /// Starts the helper for `user` with these answers, and waits until it
    /// has registered with the daemon.
    pub fn start(daemon: &Daemon, user: &TestUser, answers: &[Option<&str>]) -> Helper {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::Builder::new()
            .prefix("epm-e2e-helper-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let answers_file = dir.path().join("answers.json");
        std::fs::write(
            &answers_file,
            serde_json::json!({ "answers": answers }).to_string(),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("helper.log")).unwrap();
        std::fs::set_permissions(
            dir.path().join("helper.log"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let child = Command::new(binary("epm-helper"))
            .arg("--socket")
            .arg(daemon.socket())
            .args(["--backend", "scripted", "--answers"])
            .arg(&answers_file)
            .arg("--transcript")
            .arg(dir.path().join("transcript.txt"))
            .uid(user.uid)
            .gid(user.gid)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let helper = Helper { dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !helper.log().contains("registered with epmd") {
            assert!(
                Instant::now() < deadline,
                "the helper did not register:\n{}",
                helper.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        helper
    }

    /// The helper's stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("helper.log")).unwrap_or_default()
    }

    /// Everything it asked and showed, one line each.
    pub fn transcript(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("transcript.txt")).unwrap_or_default()
    }

    /// Waits until the transcript holds `text`, `times` times in all.
    pub fn wait_for(&self, text: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.transcript().matches(text).count() < times {
            assert!(
                Instant::now() < deadline,
                "the helper did not show {text:?} {times} time(s); transcript:\n{}\nlog:\n{}",
                self.transcript(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a command printed, standard output then standard error: for
/// assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `epmctl sync` against `daemon` and fails the test, with the
/// daemon's log, unless it succeeded.
pub fn synced(daemon: &Daemon) {
    let out = daemon.epmctl(&["sync"]);
    assert!(
        out.status.success(),
        "epmctl sync: {}\n{}",
        text(&out),
        daemon.log()
    );
}

/// A small xorshift generator for fault tests: the seed is printed, so a
/// failing run can be replayed with `EPM_FAULT_SEED`.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `EPM_FAULT_SEED`, or from the clock.
    pub fn from_env() -> Rng {
        let seed = std::env::var("EPM_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("fault seed: EPM_FAULT_SEED={seed}");
        Rng(seed)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Removes a path when dropped.
#[derive(Debug)]
pub struct Removed(pub std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A copy of /bin/true on the daemon's mount, as `name`, whose PT_INTERP
/// names `interpreter` through a symlink short enough to fit where the
/// system loader's name was; the symlink goes with the returned guard.
pub fn with_interpreter(
    daemon: &Daemon,
    name: &str,
    interpreter: &Path,
) -> (std::path::PathBuf, Removed) {
    let program = std::fs::read("/bin/true").unwrap();
    let head = &program[..program.len().min(epm_agent::gate::interp::HEAD_BYTES)];
    let named =
        epm_agent::gate::interp::interpreter(head).expect("/bin/true is dynamically linked");
    let link = Removed(std::path::PathBuf::from(format!(
        "/tmp/epmi{}{name}",
        std::process::id()
    )));
    let _ = std::fs::remove_file(&link.0);
    std::os::unix::fs::symlink(interpreter, &link.0).unwrap();
    let short = link.0.to_str().unwrap().as_bytes();
    assert!(
        short.len() <= named.len(),
        "{short:?} is longer than {named}"
    );
    let mut old = named.as_bytes().to_vec();
    old.push(0);
    let at = program
        .windows(old.len())
        .position(|w| w == old.as_slice())
        .unwrap();
    let mut patched = program.clone();
    patched[at..at + old.len()].fill(0);
    patched[at..at + short.len()].copy_from_slice(short);
    let path = daemon.mount.path().join(name);
    std::fs::write(&path, &patched).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (path, link)
}

/// Where [`elf_program`] puts the code: right after the ELF header and its
/// program headers (one `PT_LOAD`, and a `PT_INTERP` when it names an
/// interpreter).
pub fn elf_code_offset(interpreter: Option<&str>) -> u64 {
    64 + 56 * if interpreter.is_some() { 2 } else { 1 }
}

/// A minimal ELF64 executable for the tests that hand the kernel programs
/// no toolchain made: `code` (position-independent machine code) at the
/// entry point, mapped read + execute with the headers at 0x400000, and
/// when `interpreter` is named, a `PT_INTERP` for it (its name follows the
/// code). `machine` is `e_machine` (62: x86_64), so a test can make one the
/// kernel refuses for another architecture.
pub fn elf_program(code: &[u8], interpreter: Option<&str>, machine: u16) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let phnum: u16 = if interpreter.is_some() { 2 } else { 1 };
    let code_at = elf_code_offset(interpreter);
    let mut text = code.to_vec();
    let interp_at = code_at + text.len() as u64;
    if let Some(path) = interpreter {
        text.extend_from_slice(path.as_bytes());
        text.push(0);
    }
    let end = code_at + text.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&(BASE + code_at).to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes());
    elf.extend_from_slice(&56u16.to_le_bytes());
    elf.extend_from_slice(&phnum.to_le_bytes());
    elf.extend_from_slice(&[0; 6]);
    // PT_LOAD of the whole file, read + execute.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&end.to_le_bytes());
    elf.extend_from_slice(&end.to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    if let Some(path) = interpreter {
        elf.extend_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        elf.extend_from_slice(&4u32.to_le_bytes());
        elf.extend_from_slice(&interp_at.to_le_bytes());
        elf.extend_from_slice(&(BASE + interp_at).to_le_bytes());
        elf.extend_from_slice(&(BASE + interp_at).to_le_bytes());
        let len = path.len() as u64 + 1;
        elf.extend_from_slice(&len.to_le_bytes());
        elf.extend_from_slice(&len.to_le_bytes());
        elf.extend_from_slice(&1u64.to_le_bytes());
    }
    assert_eq!(elf.len() as u64, code_at);
    elf.extend_from_slice(&text);
    elf
}
