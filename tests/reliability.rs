//! Faults injected into a real `epmd` (real fanotify, real SQLite and audit
//! files): SIGKILL at random points of its audit and store writes, a full
//! state directory, control clients that vanish mid-request. What must
//! hold: execs are answered by policy throughout, and no audit record the
//! daemon had acknowledged (counted in `audit_last_seq`, which moves only
//! once a batch is committed) is ever lost; the chain verifies and its
//! sequence numbers have no hole. Figures are printed (`--nocapture`) and
//! kept in docs/reliability.md.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use epm_e2e::Rng;
use epm_e2e::{Daemon, capable, denied, policy, ran, run};

fn rule(id: &str, action: &str, criteria: &str) -> String {
    format!(r#"{{"id": "{id}", "action": "{action}", "match": {criteria}}}"#)
}

/// Every record in the log's files, oldest file first, as (seq, record):
/// read again until no rotation happened while they were read (the daemon
/// may be writing).
fn log_records(dir: &Path) -> Vec<(u64, serde_json::Value)> {
    use std::os::unix::fs::MetadataExt;
    let identity = || {
        let mut names = log_file_names(dir);
        names.push(PathBuf::from(
            std::fs::metadata(dir.join("audit.jsonl"))
                .map(|m| m.ino().to_string())
                .unwrap_or_default(),
        ));
        names
    };
    for _ in 0..50 {
        let before = identity();
        let records = read_log_records(dir);
        if identity() == before {
            return records;
        }
    }
    panic!("the log kept rotating while it was read");
}

fn log_file_names(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("audit-") && name.ends_with(".jsonl")
        })
        .collect();
    files.sort();
    files.push(dir.join("audit.jsonl"));
    files
}

fn read_log_records(dir: &Path) -> Vec<(u64, serde_json::Value)> {
    log_file_names(dir)
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
                // A line being written now is not a record yet.
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .map(|record| (record["seq"].as_u64().unwrap(), record))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn verify(daemon: &Daemon) -> (Option<i32>, String) {
    let out = daemon.epmctl(&["audit", "verify", daemon.audit_log().to_str().unwrap()]);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The records acknowledged so far: `audit_last_seq` moves only after a
/// batch is committed.
fn acknowledged(daemon: &Daemon) -> Option<u64> {
    let out = daemon.epmctl(&["status", "--json"]);
    if !out.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status["audit_last_seq"].as_u64()
}

/// Runs the tools in a loop on another thread until dropped (execs, each
/// one audited: what keeps the audit writer and the outbox busy).
struct ExecLoad {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    execs: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ExecLoad {
    fn start(tools: Vec<PathBuf>) -> ExecLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let execs = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, paused, execs) = (stop.clone(), paused.clone(), execs.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if paused.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    for tool in &tools {
                        let _ = run(tool);
                        execs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        ExecLoad {
            stop,
            paused,
            execs,
            thread: Some(thread),
        }
    }
}

impl Drop for ExecLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn sigkill_at_random_points_of_audit_and_store_writes_loses_no_acknowledged_record() {
    if !capable() {
        return;
    }
    const KILLS: usize = 50;
    let mut rng = Rng::from_env();
    // Small files, so the kills also land in rotations.
    let mut daemon = Daemon::start_with_tables(
        &policy(1, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        "[audit]\nmax_file_bytes = 65536\nkeep_files = 10000\n",
    );
    let nc = daemon.mount.install("/bin/true", "nc");
    let ok = daemon.mount.install("/bin/true", "ok");
    let load = ExecLoad::start(vec![nc.clone(), ok.clone()]);
    let mut highest_acknowledged = 0;
    let mut lost_total = 0u64;
    let mut reloads = 0;
    let started = Instant::now();
    for kill in 0..KILLS {
        // A random point: some execs' records gathering, queued, being
        // committed or appended; sometimes a policy reload (a store write)
        // in flight.
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        if rng.below(3) == 0 {
            daemon.write_policy(&policy(
                2 + kill as u64,
                "allow",
                &[rule("no-nc", "deny", r#"{"name": "nc"}"#)],
            ));
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.process_id() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap();
            reloads += 1;
            std::thread::sleep(Duration::from_millis(rng.below(30)));
        }
        let acked = acknowledged(&daemon).unwrap_or(0);
        daemon.kill9();
        highest_acknowledged = highest_acknowledged.max(acked);
        daemon.restart();
        assert!(denied(&run(&nc)), "enforcing again after kill {kill}");

        // Quiet while the files are read (the daemon keeps running).
        load.paused.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(100));
        let (code, out) = verify(&daemon);
        assert_eq!(code, Some(0), "after kill {kill}: {out}");
        let records = log_records(&daemon.state_dir());
        let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
        let contiguous = seqs.windows(2).all(|w| w[1] == w[0] + 1);
        assert!(
            contiguous && seqs.first() == Some(&1),
            "holes after kill {kill}"
        );
        let lost = (1..=acked)
            .filter(|s| seqs.binary_search(s).is_err())
            .count() as u64;
        lost_total += lost;
        if lost > 0 {
            let log = daemon.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            let around: Vec<String> = records
                .iter()
                .filter(|(s, _)| *s + 30 >= acked.min(*seqs.last().unwrap()))
                .map(|(s, r)| format!("{s} {} {}", r["event"], r["time"]))
                .collect();
            panic!(
                "{lost} acknowledged records (of {acked}) lost at kill {kill}; log has {:?}..{:?}\n{}\nepmd log (newest first):\n{}",
                seqs.first(),
                seqs.last(),
                around.join("\n"),
                tail.join("\n")
            );
        }
        load.paused.store(false, Ordering::Relaxed);
    }
    let execs = load.execs.load(Ordering::Relaxed);
    drop(load);
    daemon.stop();
    let (code, out) = verify(&daemon);
    assert_eq!(code, Some(0), "{out}");
    let records = log_records(&daemon.state_dir());
    let starts = records
        .iter()
        .filter(|(_, r)| r["event"] == "daemon_started")
        .count();
    assert_eq!(starts, KILLS + 1, "one start record per start");
    let files = std::fs::read_dir(daemon.state_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .count();
    println!(
        "kill loop: {KILLS} SIGKILLs, {execs} execs, {reloads} reloads in flight, {} records ({} acknowledged at a kill at most), {files} log files, {lost_total} acknowledged records lost, {:.0} s",
        records.len(),
        highest_acknowledged,
        started.elapsed().as_secs_f64()
    );
}

/// A tmpfs mounted over a directory (whose contents are copied in),
/// unmounted lazily on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn over(dir: &Path, size: &str) -> SmallTmpfs {
        let saved = tempfile::tempdir().unwrap();
        let copy = |from: &Path, to: &Path| {
            let status = Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", from.display()))
                .arg(to)
                .status()
                .unwrap();
            assert!(status.success());
        };
        copy(dir, saved.path());
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "epm-e2e-full",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            dir.display()
        );
        copy(saved.path(), dir);
        SmallTmpfs(dir.to_owned())
    }

    /// Fills it up: returns the filler, to delete to free the room.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            if file.write_all(&chunk).is_err() {
                break;
            }
        }
        // The last bytes too.
        while file.write_all(&[0u8; 512]).is_ok() {}
        filler
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_directory_keeps_execs_answered_and_loses_no_acknowledged_record() {
    if !capable() {
        return;
    }
    let mut daemon = Daemon::start(
        &policy(1, "allow", &[rule("no-nc", "deny", r#"{"name": "nc"}"#)]),
        "",
    );
    let nc = daemon.mount.install("/bin/true", "nc");
    let ok = daemon.mount.install("/bin/true", "ok");
    daemon.stop();
    // The store and the audit log on a 4 MiB file system.
    let tmpfs = SmallTmpfs::over(&daemon.state_dir(), "4m");
    daemon.restart();
    assert!(denied(&run(&nc)));
    let acked_before =
        daemon.wait_for_record("before the disk fills", |r| r["event"] == "exec")["seq"]
            .as_u64()
            .unwrap();

    let filler = tmpfs.fill();
    // Full: execs are still answered by policy, and fast.
    let mut denies_while_full = 0;
    let started = Instant::now();
    for _ in 0..20 {
        assert!(denied(&run(&nc)), "the deny holds on a full disk");
        assert!(ran(&run(&ok)), "allowed programs run on a full disk");
        denies_while_full += 1;
    }
    let answered_in = started.elapsed();
    // A store write (a policy reload stores the policy) on the full disk:
    // answered, and the policy file still applies.
    daemon.write_policy(&policy(
        2,
        "allow",
        &[rule("no-nc", "deny", r#"{"name": "nc"}"#)],
    ));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.process_id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        denied(&run(&nc)),
        "still enforcing after a reload on a full disk"
    );
    let status = daemon.status();
    let acked_while_full = status["audit_last_seq"].as_u64().unwrap();

    // Room again: everything kept is written, with a record of the failure.
    std::fs::remove_file(&filler).unwrap();
    assert!(denied(&run(&nc)));
    let failure = daemon.wait_for_record("for the failure report", |r| {
        r["event"] == "error"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("audit writes failed"))
    });
    daemon.stop();
    let (code, out) = verify(&daemon);
    assert_eq!(code, Some(0), "{out}");
    let records = log_records(&daemon.state_dir());
    let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no hole");
    assert!(seqs.len() as u64 >= acked_while_full.max(acked_before));
    let nc_path = nc.display().to_string();
    let denies = records
        .iter()
        .filter(|(s, r)| {
            *s > acked_before && r["path"] == nc_path.as_str() && r["decision"] == "deny"
        })
        .count();
    assert!(
        denies >= denies_while_full + 2,
        "the denies made while the disk was full were written once it had room: {denies}"
    );
    println!(
        "full disk: {denies_while_full} denies and {denies_while_full} allows answered in {answered_in:?} on a full state directory; store refused {} batches, log {}; {denies} deny records after it had room; {} records, no hole",
        failure["details"]["store_batches_failed"],
        failure["details"]["log_batches_failed"],
        seqs.len()
    );
    drop(tmpfs);
}

#[test]
fn control_clients_that_vanish_mid_request_leave_the_daemon_serving() {
    if !capable() {
        return;
    }
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/bin/true", "tool");
    let mut vanished = 0;
    // A frame cut short, a request sent and the reply never read, a
    // follower killed: 50 of each.
    for i in 0..50 {
        let mut stream = UnixStream::connect(daemon.socket()).unwrap();
        let request = br#"{"type":"status"}"#;
        let len = (request.len() as u32).to_be_bytes();
        let _ = stream.write_all(&len);
        let _ = stream.write_all(&request[..i % request.len()]);
        drop(stream);
        let mut stream = UnixStream::connect(daemon.socket()).unwrap();
        let _ = stream.write_all(&len);
        let _ = stream.write_all(request);
        drop(stream);
        vanished += 2;
    }
    for _ in 0..5 {
        let mut follower = Command::new(epm_e2e::binary("epmctl"))
            .arg("--socket")
            .arg(daemon.socket())
            .args(["audit", "tail", "-f"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        follower.kill().unwrap();
        let _ = follower.wait();
        vanished += 1;
    }
    assert!(ran(&run(&tool)), "still gating");
    assert_eq!(daemon.status()["mode"], "enforce", "still serving");
    let (code, out) = verify(&daemon);
    assert_eq!(code, Some(0), "{out}");
    println!("control: {vanished} clients vanished mid-request; the daemon kept serving");
}
