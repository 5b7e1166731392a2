//! The interactive flows end to end: real epmd and fanotify, real users made
//! by the test, the real helper (scripted answers) and epmctl, and for
//! approvals a real platform over TLS on 127.0.0.1.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use epm_e2e::platform::Platform;
use epm_e2e::{Daemon, Helper, TestUser, binary, capable, denied, policy, ran};
use epm_e2e::{synced, text};

const PENDING: &str = "Your request is still pending administrator review.";
const REJECTED: &str = "Your last request was rejected by the administrator.";
const WINDOW_EXPIRED: &str = "Your request was approved, but the execution window has expired.";

fn justify_rule(path: &Path) -> String {
    format!(
        r#"{{"id": "tool-justify", "action": "justify", "match": {{"path": "{}"}},
            "message": "Tell us why you need the tool", "justification": {{"min_length": 5}}}}"#,
        path.display()
    )
}

fn approve_rule(path: &Path, levels: usize, uses: u32) -> String {
    let levels = vec![r#"{"approvers": 1}"#; levels].join(",");
    format!(
        r#"{{"id": "tool-approve", "action": "approve", "match": {{"path": "{}"}},
            "approval": {{"levels": [{levels}], "max_window_hours": 2, "uses": {uses}}}}}"#,
        path.display()
    )
}

/// A standalone daemon whose policy holds `rules` for a tool in its mount.
fn standalone(rules: impl Fn(&Path) -> Vec<String>) -> (Daemon, std::path::PathBuf) {
    let daemon = Daemon::start(&policy(1, "allow", &[]), "");
    let tool = daemon.mount.install("/usr/bin/true", "tool");
    daemon.write_policy(&policy(2, "allow", &rules(&tool)));
    let loaded = daemon.reload();
    assert_eq!(loaded["event"], "policy_loaded", "{loaded}");
    daemon.open_to_users();
    (daemon, tool)
}

fn managed(
    platform: &Platform,
    device: &str,
    rules: impl Fn(&Path) -> Vec<String>,
) -> (Daemon, std::path::PathBuf) {
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    let tool = daemon.mount.install("/usr/bin/true", "tool");
    platform.push(&policy(1, "allow", &rules(&tool)), &["--device", device]);
    synced(&daemon);
    daemon.open_to_users();
    (daemon, tool)
}

/// Waits until the platform holds a request in `state`; returns it.
fn platform_request(platform: &Platform, daemon: &Daemon, state: &str) -> serde_json::Value {
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
        synced(daemon);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_justification_allows_one_run_of_that_binary_and_no_other() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2ejust");
    let (daemon, tool) = standalone(|tool| vec![justify_rule(tool)]);
    // The first answer is too short: the helper says why and asks again.
    let helper = Helper::start(
        &daemon,
        &user,
        &[Some("no"), Some("Debugging ticket 42"), None],
    );

    assert!(denied(&user.run(&tool)), "refused until justified");
    helper.wait_for("it is allowed once", 1);
    let transcript = helper.transcript();
    assert!(
        transcript.contains("Tell us why you need the tool"),
        "{transcript}"
    );
    assert!(
        transcript.contains("The justification needs at least 5 characters (it has 2)"),
        "{transcript}"
    );

    // Another binary at the same path does not get the grant.
    std::fs::copy("/usr/bin/echo", &tool).unwrap();
    assert!(denied(&user.run(&tool)), "a replaced binary is refused");
    helper.wait_for("ask:", 3); // its own prompt, cancelled

    // The justified bytes run once.
    std::fs::copy("/usr/bin/true", &tool).unwrap();
    assert!(ran(&user.run(&tool)), "the justified binary runs");
    assert!(denied(&user.run(&tool)), "once");

    let justified = daemon.wait_for_record("justified", |r| r["event"] == "justified");
    assert_eq!(justified["details"]["justification"], "Debugging ticket 42");
    assert_eq!(justified["user"], user.name);
    let allowed = daemon.wait_for_record("the exec the grant allowed", |r| {
        r["event"] == "exec" && r["decision"] == "allow" && r["action"] == "justify"
    });
    assert_eq!(allowed["details"]["grant_source"], "justification");
    assert_eq!(allowed["details"]["grant_uses_left"], 0);
}

#[test]
fn epmctl_offers_the_flows_where_no_helper_runs() {
    if !capable() {
        return;
    }
    let user = TestUser::create("epme2ectl");
    let (daemon, tool) = standalone(|tool| {
        vec![
            justify_rule(tool),
            format!(
                r#"{{"id": "no-nc", "action": "deny", "match": {{"name": "nc"}}, "message": "nc is not allowed"}}"#
            ),
        ]
    });
    let nc = daemon.mount.install("/usr/bin/true", "nc");
    let tool_arg = tool.to_str().unwrap();

    assert!(denied(&user.run(&tool)));
    let short = daemon.epmctl_as(&user, &["justify", tool_arg, "--reason", "x"]);
    assert_eq!(short.status.code(), Some(1), "{}", text(&short));
    assert!(
        text(&short).contains("at least 5 characters"),
        "{}",
        text(&short)
    );

    let out = daemon.epmctl_as(&user, &["justify", tool_arg, "--reason", "Release build"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("it is allowed once"), "{}", text(&out));
    let grants = daemon.epmctl_as(&user, &["grants"]);
    assert!(text(&grants).contains("tool"), "{}", text(&grants));
    let everyone = daemon.epmctl(&["grants", "--all"]);
    assert!(
        text(&everyone).contains(&user.name),
        "root sees everyone's: {}",
        text(&everyone)
    );
    assert!(ran(&user.run(&tool)));
    assert!(denied(&user.run(&tool)));

    // What no flow can change, and what needs a platform, say so.
    let deny = daemon.epmctl_as(
        &user,
        &["justify", nc.to_str().unwrap(), "--reason", "please let me"],
    );
    assert_eq!(deny.status.code(), Some(1));
    assert!(text(&deny).contains("denied by policy"), "{}", text(&deny));
    let approve = daemon.epmctl_as(&user, &["request", tool_arg, "--reason", "please let me"]);
    assert_eq!(approve.status.code(), Some(1));
    assert!(
        text(&approve).contains("needs a justification"),
        "{}",
        text(&approve)
    );
    // Another user cannot list everyone's requests.
    let all = daemon.epmctl_as(&user, &["requests", "--all"]);
    assert_eq!(all.status.code(), Some(1), "{}", text(&all));
}

/// `epm-e2e-ipc SOCKET subscribe` as `user`: its lines arrive on the
/// receiver.
fn subscriber(daemon: &Daemon, user: &TestUser) -> (Child, mpsc::Receiver<serde_json::Value>) {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(binary("epm-e2e-ipc"))
        .arg(daemon.socket())
        .arg("subscribe")
        .uid(user.uid)
        .gid(user.gid)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                return;
            }
        }
    });
    let first: serde_json::Value = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first["type"], "subscribed", "{first}");
    assert_eq!(first["uid"], user.uid);
    (child, rx)
}

fn call_as(daemon: &Daemon, user: &TestUser, request: &serde_json::Value) -> serde_json::Value {
    serde_json::from_slice(&daemon.ipc_as(user, request).stdout).unwrap()
}

#[test]
fn one_users_helper_can_neither_see_nor_answer_anothers_prompt() {
    if !capable() {
        return;
    }
    let alice = TestUser::create("epme2ealice");
    let bob = TestUser::create("epme2ebob");
    let (daemon, tool) = standalone(|tool| vec![justify_rule(tool)]);
    let (mut alice_events, alice_rx) = subscriber(&daemon, &alice);
    let (mut bob_events, bob_rx) = subscriber(&daemon, &bob);

    assert!(denied(&alice.run(&tool)));
    let event = alice_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(event["event"], "prompt", "{event}");
    assert_eq!(event["kind"], "justify");
    let id = event["id"].as_u64().unwrap();

    let answer =
        |reason: &str| serde_json::json!({"type": "justify", "prompt": id, "reason": reason});
    let refused = call_as(&daemon, &bob, &answer("I am bob and I say yes"));
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "not_found", "{refused}");
    assert!(
        bob_rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "bob saw nothing of alice's"
    );
    assert!(
        denied(&bob.run(&tool)) && denied(&alice.run(&tool)),
        "no grant for anyone"
    );

    let granted = call_as(&daemon, &alice, &answer("Alice needs it for the demo"));
    assert_eq!(granted["type"], "justified", "{granted}");
    assert!(ran(&alice.run(&tool)));
    let _ = alice_events.kill();
    let _ = bob_events.kill();
    let _ = (alice_events.wait(), bob_events.wait());
}

#[test]
fn an_approval_with_two_levels_allows_one_run() {
    if !capable() {
        return;
    }
    let platform = Platform::start();
    let user = TestUser::create("epme2eappr");
    let (daemon, tool) = managed(&platform, "e2e-flows-two-levels", |tool| {
        vec![approve_rule(tool, 2, 1)]
    });
    // After the policy: an approver's level is at most the rules' highest.
    let second = platform.admin("second-level", 2);
    let helper = Helper::start(
        &daemon,
        &user,
        &[Some("Capture for INC-7"), Some("now"), Some("+1h"), None],
    );

    assert!(denied(&user.run(&tool)), "refused until approved");
    helper.wait_for(PENDING, 1);
    let request = platform_request(&platform, &daemon, "pending");
    let id = request["id"].as_str().unwrap();
    assert_eq!(request["justification"], "Capture for INC-7");

    platform.ok(&["requests", "approve", id]);
    synced(&daemon);
    assert!(denied(&user.run(&tool)), "one level of two is not enough");
    helper.wait_for(PENDING, 2);

    let out = platform.cli_as(&second, &["requests", "approve", id]);
    assert!(out.status.success(), "{}", text(&out));
    synced(&daemon);
    helper.wait_for("You can run it now", 1);
    assert!(ran(&user.run(&tool)), "approved: runs");
    assert!(denied(&user.run(&tool)), "one use only");
    helper.wait_for(WINDOW_EXPIRED, 1);
    let allowed = daemon.wait_for_record("the approved exec", |r| {
        r["event"] == "exec" && r["decision"] == "allow" && r["action"] == "approve"
    });
    assert_eq!(allowed["details"]["grant_source"], "approval");
    synced(&daemon);
    platform_request(&platform, &daemon, "used");
}

#[test]
fn an_approved_window_opens_and_closes_and_a_rejection_holds() {
    if !capable() {
        return;
    }
    let platform = Platform::start();
    let user = TestUser::create("epme2ewin");
    let (daemon, tool) = managed(&platform, "e2e-flows-window", |tool| {
        vec![approve_rule(tool, 1, 5)]
    });
    let tool_arg = tool.to_str().unwrap();
    let start = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(10);
    let end = start + jiff::SignedDuration::from_secs(8);
    let out = daemon.epmctl_as(
        &user,
        &[
            "request",
            tool_arg,
            "--reason",
            "Nightly capture",
            "--from",
            &start.to_string(),
            "--until",
            &end.to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let request = platform_request(&platform, &daemon, "pending");
    platform.ok(&["requests", "approve", request["id"].as_str().unwrap()]);
    synced(&daemon);

    assert!(denied(&user.run(&tool)), "before the window");
    let listed = daemon.epmctl_as(&user, &["requests"]);
    assert!(
        text(&listed).contains("has not started"),
        "{}",
        text(&listed)
    );
    sleep_until(start + jiff::SignedDuration::from_secs(1));
    assert!(ran(&user.run(&tool)), "inside the window");
    sleep_until(end + jiff::SignedDuration::from_secs(1));
    assert!(denied(&user.run(&tool)), "after the window");

    // A rejection: the user is told, and cannot ask again at once.
    let out = daemon.epmctl_as(&user, &["request", tool_arg, "--reason", "Another capture"]);
    assert!(out.status.success(), "{}", text(&out));
    let request = platform_request(&platform, &daemon, "pending");
    platform.ok(&[
        "requests",
        "deny",
        request["id"].as_str().unwrap(),
        "--reason",
        "Use the jump host",
    ]);
    synced(&daemon);
    let listed = daemon.epmctl_as(&user, &["requests"]);
    assert!(text(&listed).contains(REJECTED), "{}", text(&listed));
    assert!(
        text(&listed).contains("Use the jump host"),
        "{}",
        text(&listed)
    );
    let again = daemon.epmctl_as(&user, &["request", tool_arg, "--reason", "Please, again"]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("ask again after"), "{}", text(&again));
}

fn sleep_until(when: jiff::Timestamp) {
    let now = jiff::Timestamp::now();
    if when > now {
        std::thread::sleep(Duration::try_from(now.duration_until(when)).unwrap());
    }
}

#[test]
fn an_offline_code_is_accepted_once_and_guessing_is_limited() {
    if !capable() {
        return;
    }
    let platform = Platform::start();
    let user = TestUser::create("epme2eoff");
    let device = "e2e-flows-offline";
    let (daemon, tool) = managed(&platform, device, |tool| vec![approve_rule(tool, 1, 1)]);
    let out = daemon.epmctl_as(
        &user,
        &[
            "request",
            "--offline",
            tool.to_str().unwrap(),
            "--reason",
            "No network on the plane",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let challenge: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = platform
        .ok(&[
            "offline-code",
            "--device",
            device,
            challenge["challenge"].as_str().unwrap(),
        ])
        .trim()
        .to_owned();

    assert!(denied(&user.run(&tool)));
    let wrong = daemon.epmctl_as(&user, &["request", "--code", "AAAAA-AAAAA"]);
    assert_eq!(wrong.status.code(), Some(1), "{}", text(&wrong));
    let right = daemon.epmctl_as(&user, &["request", "--code", &code]);
    assert!(right.status.success(), "{}", text(&right));
    assert!(ran(&user.run(&tool)), "the code's grant allows the run");
    let reused = daemon.epmctl_as(&user, &["request", "--code", &code]);
    assert_eq!(
        reused.status.code(),
        Some(1),
        "a code works once: {}",
        text(&reused)
    );

    // Two wrong tries so far; three more reach the limit.
    for _ in 0..3 {
        let out = daemon.epmctl_as(&user, &["request", "--code", "BBBBB-BBBBB"]);
        assert_eq!(out.status.code(), Some(1));
    }
    let limited = daemon.epmctl_as(&user, &["request", "--code", &code]);
    assert!(
        text(&limited).contains("too many wrong codes"),
        "{}",
        text(&limited)
    );
    daemon.wait_for_record("the accepted code", |r| {
        r["event"] == "offline_code_accepted"
    });
}
