//! The wall clock set back and forward under a running `epmd`, during an
//! approved execution window and during an admin session: the real `epmd`
//! (fanotify, SQLite, audit files, real gpasswd), a real platform over TLS
//! for the approvals, real users and groups made by the test.
//!
//! Only `epmd`'s clock moves: it alone runs with libfaketime preloaded,
//! its wall clock offset read from a file the test rewrites, its monotonic clock and file times left real
//! (`DONT_FAKE_MONOTONIC`, `NO_FAKE_STAT`): what setting the system clock
//! does to a daemon, without moving the clock of the shared machine (the
//! other sessions' builds judge freshness by file times). The tests of this
//! binary share that one offset file, so they run one at a time.
//!
//! Debian's `faketime` package provides the library; without it the tests
//! skip, or fail with `EPM_E2E=1`.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use epm_e2e::platform::Platform;
use epm_e2e::{Daemon, TestGroup, TestUser, capable, denied, policy, ran, wait_until};
use epm_e2e::{synced, text};
use jiff::{SignedDuration, Timestamp};

/// Where Debian's `faketime` puts the library (its multiarch directory).
const LIBFAKETIME_IN: &str = "faketime/libfaketimeMT.so.1";

/// The library, in whichever `/usr/lib/<arch>/` holds it.
fn libfaketime() -> Option<PathBuf> {
    std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|dir| dir.path().join(LIBFAKETIME_IN))
        .find(|path| path.exists())
}

/// `epmd`'s wall clock, moved by the test. Held for the whole test: the
/// offset file is one for the process.
struct FakeClock {
    file: PathBuf,
    library: PathBuf,
    _turn: MutexGuard<'static, ()>,
}

impl FakeClock {
    /// `None` (the test skips) without root or without libfaketime, unless
    /// `EPM_E2E=1`.
    fn install() -> Option<FakeClock> {
        if !capable() {
            return None;
        }
        let Some(library) = libfaketime() else {
            assert_ne!(
                std::env::var("EPM_E2E").as_deref(),
                Ok("1"),
                "EPM_E2E=1 but /usr/lib/*/{LIBFAKETIME_IN} is missing: apt-get install faketime"
            );
            eprintln!("skipped: /usr/lib/*/{LIBFAKETIME_IN} is missing (apt-get install faketime)");
            return None;
        };
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let file = std::env::temp_dir().join(format!("epm-e2e-faketime-{}", std::process::id()));
        let clock = FakeClock {
            file,
            library,
            _turn: turn,
        };
        clock.set(SignedDuration::ZERO);
        Some(clock)
    }

    /// Runs `start` (a `Daemon` start or restart) with libfaketime in the
    /// environment its children inherit, then takes it out again: only
    /// `epmd` (and the `epmctl` probes of its start) run with it. Set in
    /// the environment, not only for `epmd`, because the harness spawns
    /// `epmd` itself; `FAKETIME_ONLY_CMDS` would do it more simply, but
    /// libfaketime 0.9.10 then breaks `clock_gettime` in the other
    /// processes' threads (the platform's runtime panicked).
    fn around<T>(&self, start: impl FnOnce() -> T) -> T {
        const VARS: [&str; 5] = [
            "LD_PRELOAD",
            "FAKETIME_TIMESTAMP_FILE",
            "FAKETIME_NO_CACHE",
            "DONT_FAKE_MONOTONIC",
            "NO_FAKE_STAT",
        ];
        let values: [&std::ffi::OsStr; 5] = [
            self.library.as_os_str(),
            self.file.as_os_str(),
            // Read at every call: a jump is seen at once.
            "1".as_ref(),
            // The monotonic clock and file times stay real, as when the
            // system clock is set.
            "1".as_ref(),
            "1".as_ref(),
        ];
        // SAFETY: the tests of this binary take turns (`_turn`), and while
        // one holds it no other thread of this process starts a process or
        // reads the environment through libc; std's own readers (Command)
        // take std's environment lock.
        unsafe {
            for (name, value) in VARS.iter().zip(values) {
                std::env::set_var(name, value);
            }
        }
        /// Takes the variables out again, even if `start` panics: the
        /// next test's platform must not run with them.
        struct Unset;
        impl Drop for Unset {
            fn drop(&mut self) {
                // SAFETY: as above.
                unsafe {
                    for name in VARS {
                        std::env::remove_var(name);
                    }
                }
            }
        }
        let unset = Unset;
        let started = start();
        drop(unset);
        started
    }

    /// Sets `epmd`'s wall clock to the real time plus `offset`.
    fn set(&self, offset: SignedDuration) {
        let seconds = offset.as_secs();
        std::fs::write(
            &self.file,
            if seconds < 0 {
                format!("{seconds}\n")
            } else {
                format!("+{seconds}\n")
            },
        )
        .unwrap();
    }
}

impl Drop for FakeClock {
    fn drop(&mut self) {
        // Dropped after the test's daemon (declared first); the next test
        // writes the file again. Without it libfaketime keeps the real time.
        let _ = std::fs::remove_file(&self.file);
    }
}

fn sleep_until(when: Timestamp) {
    let now = Timestamp::now();
    if when > now {
        std::thread::sleep(Duration::try_from(now.duration_until(when)).unwrap());
    }
}

fn secs(n: i64) -> SignedDuration {
    SignedDuration::from_secs(n)
}

fn approve_rule(path: &Path) -> String {
    format!(
        r#"{{"id": "tool-approve", "action": "approve", "match": {{"path": "{}"}},
            "approval": {{"levels": [{{"approvers": 1}}], "max_window_hours": 2, "uses": 10}}}}"#,
        path.display()
    )
}

/// A managed daemon whose policy asks for approval of a tool in its mount;
/// `user`'s request for [start, end) approved and synced.
fn approved_window(
    clock: &FakeClock,
    platform: &Platform,
    device: &str,
    user: &TestUser,
    start: Timestamp,
    end: Timestamp,
) -> (Daemon, PathBuf) {
    let table = platform.agent_table();
    let daemon = clock.around(|| Daemon::start_managed(device, &table));
    synced(&daemon);
    let tool = daemon.mount.install("/usr/bin/true", "tool");
    platform.push(
        &policy(1, "allow", &[approve_rule(&tool)]),
        &["--device", device],
    );
    synced(&daemon);
    daemon.open_to_users();
    let out = daemon.epmctl_as(
        user,
        &[
            "request",
            tool.to_str().unwrap(),
            "--reason",
            "Nightly capture",
            "--from",
            &start.to_string(),
            "--until",
            &end.to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(15);
    let id = loop {
        if let Some(r) = platform
            .requests()
            .into_iter()
            .find(|r| r["state"] == "pending")
        {
            break r["id"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no pending request\n{}",
            daemon.log()
        );
        synced(&daemon);
        std::thread::sleep(Duration::from_millis(100));
    };
    platform.ok(&["requests", "approve", &id]);
    synced(&daemon);
    (daemon, tool)
}

/// The tool's exec records, oldest first, once there are `n` (records are
/// written in batches).
fn tool_execs(daemon: &Daemon, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<serde_json::Value> = daemon
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "exec" && r["action"] == "approve")
            .collect();
        if records.len() >= n || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the `n`-th `clock_jump` record (1-based) and checks it says
/// the clock moved by about `by`.
fn jump_record(daemon: &Daemon, n: usize, by: SignedDuration) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<serde_json::Value> = daemon
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "clock_jump")
            .collect();
        if let Some(record) = records.get(n - 1) {
            let seconds = record["details"]["seconds"].as_i64().unwrap();
            assert!(
                (seconds - by.as_secs()).abs() <= 5,
                "a jump of {by:+} recorded as {seconds} s: {record}"
            );
            return record.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no clock_jump record {n}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_window_that_ended_does_not_reopen_when_the_clock_goes_back() {
    let Some(clock) = FakeClock::install() else {
        return;
    };
    let platform = Platform::start();
    let user = TestUser::create("epme2eclkb");
    let start = Timestamp::now() + secs(4);
    let end = start + secs(8);
    let (daemon, tool) = approved_window(&clock, &platform, "e2e-clock-back", &user, start, end);
    assert!(denied(&user.run(&tool)), "before the window");
    sleep_until(start + secs(1));
    assert!(ran(&user.run(&tool)), "inside the window");
    sleep_until(end + secs(1));
    assert!(denied(&user.run(&tool)), "after the window");

    // Back to before the window, then back into it: it stays closed.
    clock.set(secs(-3600));
    assert!(denied(&user.run(&tool)), "clock an hour back: still closed");
    // The jump is recorded (the next check, within a second) before the
    // clock moves again, so the check sees this step alone.
    let jump = jump_record(&daemon, 1, secs(-3600));
    eprintln!("{jump}");
    clock.set(-(Timestamp::now().duration_since(start) - secs(2)));
    assert!(
        denied(&user.run(&tool)),
        "clock back inside the window: still closed"
    );
    clock.set(SignedDuration::ZERO);
    let records = tool_execs(&daemon, 5);
    let decisions: Vec<&str> = records
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        ["deny", "allow", "deny", "deny", "deny"],
        "{records:#?}"
    );
    for record in &records {
        eprintln!(
            "{} {} {}",
            record["time"], record["decision"], record["details"]
        );
    }
}

#[test]
fn a_clock_set_back_inside_a_window_does_not_lengthen_it() {
    let Some(clock) = FakeClock::install() else {
        return;
    };
    let platform = Platform::start();
    let user = TestUser::create("epme2eclkl");
    let start = Timestamp::now() + secs(3);
    let end = start + secs(10);
    let (_daemon, tool) = approved_window(&clock, &platform, "e2e-clock-long", &user, start, end);
    sleep_until(start + secs(1));
    assert!(ran(&user.run(&tool)), "inside the window");
    // An hour back: the window still ends when its time has passed.
    clock.set(secs(-3600));
    assert!(ran(&user.run(&tool)), "still inside the window");
    sleep_until(end + secs(1));
    assert!(
        denied(&user.run(&tool)),
        "the window ends on time, the clock an hour back"
    );
}

#[test]
fn a_clock_jumping_forward_ends_a_window_early_by_the_jump_and_it_stays_ended() {
    let Some(clock) = FakeClock::install() else {
        return;
    };
    let platform = Platform::start();
    let user = TestUser::create("epme2eclkf");
    let start = Timestamp::now() + secs(3);
    let end = start + secs(60);
    let (_daemon, tool) = approved_window(&clock, &platform, "e2e-clock-fwd", &user, start, end);
    sleep_until(start + secs(1));
    assert!(ran(&user.run(&tool)), "inside the window");
    // 20 s forward: still inside (about 20 s less of it left).
    clock.set(secs(20));
    assert!(ran(&user.run(&tool)), "20 s forward: still inside");
    // Past its end: the window is over, and setting the clock right
    // again does not give the time back.
    clock.set(secs(120));
    assert!(denied(&user.run(&tool)), "past the end: over");
    clock.set(SignedDuration::ZERO);
    assert!(
        denied(&user.run(&tool)),
        "the clock set right again: still over (the trusted clock never goes back)"
    );
    assert!(Timestamp::now() < end, "all this inside the real window");
}

/// A daemon whose policy allows sessions of up to 30 minutes in `group`.
fn session_daemon(clock: &FakeClock, group: &TestGroup) -> Daemon {
    let policy = r#"{"version": 1, "default_action": "allow", "rules": [],
        "admin_session": [{"id": "everyone", "max_minutes": 30, "require": "none"}]}"#;
    let tables = format!(
        "[admin_sessions]\ngroup = {:?}\nsudoers_paths = [\"/nonexistent/epm-sudoers\"]\n",
        group.name
    );
    let daemon = clock.around(|| Daemon::start_with_tables(policy, &tables));
    daemon.open_to_users();
    daemon
}

/// Starts a one-minute session for `user`; returns when it started.
fn one_minute_session(daemon: &Daemon, group: &TestGroup, user: &TestUser) -> Instant {
    let out = daemon.epmctl_as(user, &["admin", "start", "--minutes", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(group.has(user), "added to {}", group.name);
    Instant::now()
}

/// The `n`-th revocation record of `user` (1-based), waited for.
fn revocation(daemon: &Daemon, user: &TestUser, n: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<serde_json::Value> = daemon
            .audit()
            .into_iter()
            .filter(|r| r["event"] == "admin_session_revoked" && r["user"] == user.name.as_str())
            .collect();
        if records.len() >= n {
            return records[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no revocation record {n}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_admin_session_ends_at_once_when_the_clock_jumps_a_minute_or_more_either_way() {
    let Some(clock) = FakeClock::install() else {
        return;
    };
    let group = TestGroup::create("epmtg-clkjump");
    let user = TestUser::create("epm-clkjump");
    let daemon = session_daemon(&clock, &group);
    for (n, jump) in [(1, secs(-3600)), (2, secs(3600))] {
        one_minute_session(&daemon, &group, &user);
        clock.set(jump);
        let jumped = Instant::now();
        wait_until("the session's end", Duration::from_secs(10), || {
            !group.has(&user)
        });
        let took = jumped.elapsed();
        let record = revocation(&daemon, &user, n);
        assert_eq!(record["details"]["reason"], "clock_jump", "{record}");
        // Each jump recorded: this one, and setting the clock right after
        // the first.
        jump_record(&daemon, 2 * n - 1, jump);
        assert_eq!(record["details"]["removed_from_group"], true, "{record}");
        eprintln!(
            "clock {jump:+}: session ended {took:.1?} after the jump; {}",
            record
        );
        // Set right again, and let epmd's next check see it before the
        // next session (that jump would end it too).
        clock.set(SignedDuration::ZERO);
        std::thread::sleep(Duration::from_millis(2500));
    }
}

#[test]
fn an_admin_session_ends_on_time_or_early_by_the_jump_when_the_clock_moves_less() {
    let Some(clock) = FakeClock::install() else {
        return;
    };
    let group = TestGroup::create("epmtg-clksmall");
    let user = TestUser::create("epm-clksmall");
    let daemon = session_daemon(&clock, &group);

    // 45 s back: under the jump threshold; the session still ends a minute
    // after it started (its monotonic deadline and the trusted clock).
    let started = one_minute_session(&daemon, &group, &user);
    clock.set(secs(-45));
    wait_until("the session's end", Duration::from_secs(90), || {
        !group.has(&user)
    });
    let back = started.elapsed();
    let record = revocation(&daemon, &user, 1);
    assert_eq!(record["details"]["reason"], "expired", "{record}");
    assert!(
        back >= Duration::from_secs(59) && back <= Duration::from_secs(66),
        "ended {back:.1?} after its start"
    );
    eprintln!("clock -45s: a 1-minute session ended {back:.1?} after its start; {record}");
    clock.set(SignedDuration::ZERO);
    std::thread::sleep(Duration::from_millis(2500));

    // 45 s forward: the session ends 45 s early, by the trusted clock.
    let started = one_minute_session(&daemon, &group, &user);
    clock.set(secs(45));
    wait_until("the session's end", Duration::from_secs(90), || {
        !group.has(&user)
    });
    let forward = started.elapsed();
    let record = revocation(&daemon, &user, 2);
    assert_eq!(record["details"]["reason"], "expired", "{record}");
    assert!(
        forward >= Duration::from_secs(14) && forward <= Duration::from_secs(21),
        "ended {forward:.1?} after its start"
    );
    eprintln!("clock +45s: a 1-minute session ended {forward:.1?} after its start; {record}");
}

#[test]
fn a_restart_with_the_clock_set_back_neither_stretches_a_session_nor_goes_unrecorded() {
    let Some(clock) = FakeClock::install() else {
        return;
    };
    let group = TestGroup::create("epmtg-clkboot");
    let user = TestUser::create("epm-clkboot");
    let mut daemon = session_daemon(&clock, &group);
    let started = one_minute_session(&daemon, &group, &user);
    // The daemon keeps the time it has seen (its floor) every 5 s; let it
    // keep one from inside the session, then crash it and set the clock an
    // hour back, as a machine restarted with a wrong clock would be.
    std::thread::sleep(Duration::from_secs(6));
    daemon.kill9();
    clock.set(secs(-3600));
    clock.around(|| daemon.restart());
    assert!(group.has(&user), "the session goes on after the restart");
    let record = jump_record(&daemon, 1, secs(-3600));
    eprintln!("{record}");

    // Judged by the wall clock, the session would end an hour late; judged
    // from the floor it ends about a minute after it started (late by at
    // most the 5 s between two kept floors).
    wait_until("the session's end", Duration::from_secs(90), || {
        !group.has(&user)
    });
    let took = started.elapsed();
    let record = revocation(&daemon, &user, 1);
    assert_eq!(record["details"]["reason"], "expired", "{record}");
    assert!(
        took >= Duration::from_secs(59) && took <= Duration::from_secs(72),
        "ended {took:.1?} after its start"
    );
    eprintln!(
        "clock -1h across a restart: a 1-minute session ended {took:.1?} after its start; {record}"
    );
}
