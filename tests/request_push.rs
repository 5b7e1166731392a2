//! A decision made on the platform reaches the waiting user's agent within
//! seconds, not at its next check-in: with `sync_interval` at 30 minutes
//! (the harness's), nothing calls `epmctl sync` after the request, and the
//! approval still becomes a usable grant at once, through the agent's open
//! request wait (`POST /api/v1/agent/requests/wait`). Real epmd, fanotify,
//! users and a real platform over TLS.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use epm_e2e::platform::Platform;
use epm_e2e::{Daemon, TestUser, capable, denied, policy, ran, synced, text};

fn approve_rule(id: &str, path: &Path) -> String {
    format!(
        r#"{{"id": "{id}", "action": "approve", "match": {{"path": "{}"}},
            "approval": {{"levels": [{{"approvers": 1}}], "max_window_hours": 2, "uses": 1}}}}"#,
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
