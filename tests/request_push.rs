//! A decision made on the platform reaches the waiting user's agent within
//! seconds, not at its next check-in: with `sync_interval` at 30 minutes
//! (the harness's), nothing calls `epmctl sync` after the request, and the
//! approval still becomes a usable grant at once, through the agent's open
//! request wait (`POST /api/v1/agent/requests/wait`). Real epmd, fanotify,
//! users and a real platform over TLS. A revocation travels the same way
//! back: the agent's wait also names the grants it holds in force, so a
//! revoked grant stops working within about a second.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use epm_e2e::platform::Platform;
use epm_e2e::{Daemon, TestUser, capable, denied, policy, ran, synced, text, wait_until};

fn approve_rule(id: &str, path: &Path) -> String {
    approve_rule_with_uses(id, path, 1)
}

fn approve_rule_with_uses(id: &str, path: &Path, uses: u32) -> String {
    format!(
        r#"{{"id": "{id}", "action": "approve", "match": {{"path": "{}"}},
            "approval": {{"levels": [{{"approvers": 1}}], "max_window_hours": 2, "uses": {uses}}}}}"#,
        path.display()
    )
}

/// The platform's request in `state`, waited for without syncing the agent.
fn on_platform(platform: &Platform, daemon: &Daemon, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(request) = platform
            .requests()
            .into_iter()
            .find(|r| r["state"] == state)
        {
            return request;
        }
        assert!(
            Instant::now() < deadline,
            "no {state} request on the platform: {:?}\n{}",
            platform.requests(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `user`'s `epmctl requests` shows `what`; how long it took.
fn until_listed(daemon: &Daemon, user: &TestUser, what: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let listed = daemon.epmctl_as(user, &["requests"]);
        if text(&listed).contains(what) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not shown within {limit:?}: {what:?}\n{}\nepmd log:\n{}",
            text(&listed),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_decision_on_the_platform_reaches_the_agent_without_waiting_for_a_check_in() {
    if !capable() {
        return;
    }
    let platform = Platform::start();
    let user = TestUser::create("epme2epush");
    let device = "e2e-request-push";
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    let tool = daemon.mount.install("/usr/bin/true", "tool");
    let other = daemon.mount.install("/usr/bin/true", "other-tool");
    platform.push(
        &policy(
            1,
            "allow",
            &[approve_rule("tool", &tool), approve_rule("other", &other)],
        ),
        &["--device", device],
    );
    synced(&daemon);
    daemon.open_to_users();
    let tool_arg = tool.to_str().unwrap();
    assert!(denied(&user.run(&tool)), "refused until approved");

    // The request goes out with the cycle it nudges; from here on nothing
    // syncs the agent but its own request wait (the next check-in is 30
    // minutes away).
    let out = daemon.epmctl_as(
        &user,
        &["request", tool_arg, "--reason", "Capture for INC-9"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let request = on_platform(&platform, &daemon, "pending");
    // Let the wait the agent opens after that cycle reach the platform.
    std::thread::sleep(Duration::from_secs(1));
    platform.ok(&["requests", "approve", request["id"].as_str().unwrap()]);
    let took = until_listed(
        &daemon,
        &user,
        "You can run it now",
        Duration::from_secs(20),
    );
    eprintln!("the approval reached the agent {took:?} after the approve command returned");
    assert!(ran(&user.run(&tool)), "approved: runs, without a check-in");

    // A denial travels the same way.
    let out = daemon.epmctl_as(
        &user,
        &[
            "request",
            other.to_str().unwrap(),
            "--reason",
            "And the other",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let second = on_platform(&platform, &daemon, "pending");
    std::thread::sleep(Duration::from_secs(1));
    platform.ok(&[
        "requests",
        "deny",
        second["id"].as_str().unwrap(),
        "--reason",
        "Use the jump host",
    ]);
    let took = until_listed(&daemon, &user, "Use the jump host", Duration::from_secs(20));
    eprintln!("the denial reached the agent {took:?} after the deny command returned");
}

/// Runs `tool` as `user` every ~20 ms while `withdraw` runs, until the
/// gate refuses it (at most 20 s after `withdraw` returned). Returns how
/// long after `withdraw` started the first refusal came, how many execs
/// ran in that time, and how many ran before it.
fn refused_after(
    daemon: &Daemon,
    user: &TestUser,
    tool: &Path,
    what: &str,
    withdraw: impl FnOnce(),
) -> (Duration, usize, usize) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runner = {
        let (stop, tool) = (stop.clone(), tool.to_owned());
        let (uid, gid) = (user.uid, user.gid);
        std::thread::spawn(move || {
            use std::os::unix::process::CommandExt;
            // (when each exec ended, whether it ran), until refused.
            let mut runs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let result = std::process::Command::new(&tool)
                    .uid(uid)
                    .gid(gid)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                let ran = result.is_ok();
                runs.push((Instant::now(), ran));
                if !ran {
                    assert!(denied(&result), "refused by the gate: {result:?}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            runs
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    withdraw();
    let returned = Instant::now();
    while !runner.is_finished() && returned.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = runner.join().unwrap();
    let (refused_at, last_ran) = runs.last().copied().unwrap();
    assert!(
        !last_ran,
        "the grant still worked 20 s after the {what} ({} execs)\n{}",
        runs.len(),
        daemon.log()
    );
    // The commit lies somewhere inside the command; the gap is counted
    // from its start, an upper bound of the withdraw→drop latency.
    let gap = refused_at.saturating_duration_since(started);
    let in_gap = runs
        .iter()
        .filter(|(at, ran)| *ran && *at > started)
        .count();
    let before = runs
        .iter()
        .filter(|(at, ran)| *ran && *at <= started)
        .count();
    eprintln!(
        "{what}→drop: the grant was refused {gap:?} after the {what} command started \
         (it took {:?}); {in_gap} execs ran in that time ({before} before it)",
        returned - started,
    );
    (gap, in_gap, before)
}

/// Requests `tool` as `user`, approves it on the platform and waits until
/// the grant works; returns the request's id.
fn granted(platform: &Platform, daemon: &Daemon, user: &TestUser, tool: &Path) -> String {
    let out = daemon.epmctl_as(
        user,
        &[
            "request",
            tool.to_str().unwrap(),
            "--reason",
            "Capture for INC-10",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let request = on_platform(platform, daemon, "pending");
    let id = request["id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(1));
    platform.ok(&["requests", "approve", &id]);
    until_listed(daemon, user, "You can run it now", Duration::from_secs(20));
    assert!(ran(&user.run(tool)), "approved: runs");
    // The wait the agent opens after the approval's cycle names the grant;
    // waits start at most every 2 s, so give it that to reach the platform.
    std::thread::sleep(Duration::from_millis(2500));
    id
}

/// The attack a slow revocation leaves open: the user keeps using a grant
/// the admin already withdrew. With a many-use grant in force, the user
/// runs the program in a loop while the admin revokes; the agent, whose
/// next check-in is 30 minutes away and which nobody syncs, must refuse
/// it within a few seconds. Prints the gap (the revoke command's start to
/// the first refused exec) and how many execs it let through. Then the
/// same for a device reset, which also voids the agent's credentials, so
/// no check-in can tell it afterwards.
#[test]
fn a_revocation_on_the_platform_ends_the_grant_on_the_agent_without_waiting_for_a_check_in() {
    if !capable() {
        return;
    }
    const USES: u32 = 1000;
    let platform = Platform::start();
    let user = TestUser::create("epme2erevoke");
    let device = "e2e-revoke-push";
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    let tool = daemon.mount.install("/usr/bin/true", "tool");
    platform.push(
        &policy(1, "allow", &[approve_rule_with_uses("tool", &tool, USES)]),
        &["--device", device],
    );
    synced(&daemon);
    daemon.open_to_users();

    let id = granted(&platform, &daemon, &user, &tool);
    let (gap, in_gap, before) = refused_after(&daemon, &user, &tool, "revoke", || {
        platform.ok(&["requests", "revoke", &id, "--reason", "Ticket closed"]);
    });
    assert!(before > 0, "the grant worked before the revoke");
    assert!(
        (in_gap as u32) < USES - 10,
        "refused because revoked, not because used up"
    );
    assert!(
        gap < Duration::from_secs(10),
        "dropped by the push, not a check-in: {gap:?}"
    );
    // The user is told why, without a sync.
    until_listed(&daemon, &user, "Ticket closed", Duration::from_secs(5));
    assert!(denied(&user.run(&tool)), "and it stays refused");

    // A device reset revokes its grants and voids its credentials: the
    // check-in the wait's answer causes is refused, and the grant must
    // end all the same.
    granted(&platform, &daemon, &user, &tool);
    let (gap, _, before) = refused_after(&daemon, &user, &tool, "reset", || {
        platform.ok(&["devices", "reset", device]);
    });
    assert!(before > 0, "the grant worked before the reset");
    assert!(
        gap < Duration::from_secs(10),
        "dropped by the push, though no check-in can succeed: {gap:?}"
    );
    assert!(denied(&user.run(&tool)), "and it stays refused");
    // No check-in will record why, so the ending is audited on the spot:
    // once for the revoke, once for the reset.
    wait_until(
        "two grant_withdrawn records",
        Duration::from_secs(5),
        || {
            daemon
                .audit()
                .iter()
                .filter(|r| r["event"] == "grant_withdrawn")
                .count()
                >= 2
        },
    );
    let withdrawn: Vec<serde_json::Value> = daemon
        .audit()
        .into_iter()
        .filter(|r| r["event"] == "grant_withdrawn")
        .collect();
    for record in &withdrawn {
        assert_eq!(record["user"], user.name.as_str(), "{record}");
        assert_eq!(record["path"], tool.display().to_string(), "{record}");
        assert_eq!(record["details"]["platform_state"], "revoked", "{record}");
    }
}
