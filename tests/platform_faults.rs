//! The platform killed (SIGKILL) and restarted on the same database while
//! agents upload audit records and while approvers vote: a real
//! `epm-platform serve` over TLS on 127.0.0.1, a real `epmd` (fanotify,
//! SQLite, audit files) and the real CLIs. What must hold: every record the
//! agent wrote reaches the platform exactly once and unchanged (compared by
//! (agent, seq)); no vote is lost or counted twice, and every request ends
//! approved with a grant the agent can use, once. Figures are printed
//! (`--nocapture`) and kept in docs/reliability.md.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use epm_e2e::platform::Platform;
use epm_e2e::{Daemon, TestUser, binary, capable, denied, policy, ran, run};
use epm_e2e::{Rng, synced, text};
use serde_json::Value;

/// `epmctl sync` started, not waited for.
fn sync_in_background(daemon: &Daemon) -> Child {
    Command::new(binary("epmctl"))
        .arg("--socket")
        .arg(daemon.socket())
        .arg("sync")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn managed(platform: &Platform, device: &str) -> Daemon {
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    daemon
}

/// Every record of `device` the platform holds, as (seq, record), in the
/// platform's order (paged through the REST API: the CLI shows at most
/// 1000).
fn platform_records(platform: &Platform, device: &str) -> Vec<(u64, Value)> {
    let mut all = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, page) = platform.call(
            "GET",
            &format!("/api/v1/admin/audit?device={device}&after={after}&limit=1000"),
            Some(&platform.admin_token),
            None,
        );
        assert_eq!(status, 200, "{page}");
        let records = page["records"].as_array().unwrap();
        if records.is_empty() {
            return all;
        }
        for entry in records {
            let record = entry["record"].clone();
            all.push((record["seq"].as_u64().unwrap(), record));
        }
        after = page["next"].as_u64().unwrap();
    }
}

/// Every record in the agent's own log, by seq (read from its files, so
/// it works whatever the daemon is doing).
fn agent_records(daemon: &Daemon) -> BTreeMap<u64, Value> {
    let mut all = BTreeMap::new();
    for record in daemon.audit() {
        let seq = record["seq"].as_u64().unwrap();
        assert!(
            all.insert(seq, record).is_none(),
            "seq {seq} twice in the agent's log"
        );
    }
    all
}

/// Runs `program` over and over on a thread until told to stop; counts
/// the execs.
struct Load {
    stop: Arc<AtomicBool>,
    execs: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(program: &Path) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let execs = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, execs, program) = (stop.clone(), execs.clone(), program.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert!(ran(&run(&program)), "the tool is allowed");
                    execs.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        Load {
            stop,
            execs,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.execs.load(Ordering::Relaxed)
    }
}

/// Waits until the agent's `audit_last_seq` stops moving; returns it.
fn settled_seq(daemon: &Daemon) -> u64 {
    let mut last = daemon.status()["audit_last_seq"].as_u64().unwrap();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = daemon.status()["audit_last_seq"].as_u64().unwrap();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[test]
fn a_platform_killed_during_audit_uploads_ends_with_every_record_exactly_once() {
    if !capable() {
        return;
    }
    const KILLS: usize = 20;
    let mut rng = Rng::from_env();
    let mut platform = Platform::start();
    // Two agents uploading at once: the platform's batches interleave.
    let devices = ["e2e-upload-kills-a", "e2e-upload-kills-b"];
    let daemons: Vec<Daemon> = devices.iter().map(|d| managed(&platform, d)).collect();
    let started = Instant::now();
    let loads: Vec<Load> = daemons
        .iter()
        .map(|d| Load::start(&d.mount.install("/usr/bin/true", "tool")))
        .collect();
    let (mut syncs_failed, mut syncs_ok) = (0, 0);
    for kill in 0..KILLS {
        // A backlog worth more than one batch (500 records) now and then.
        std::thread::sleep(Duration::from_millis(200 + rng.below(800)));
        let mut syncing = Vec::new();
        for daemon in &daemons {
            syncing.push(sync_in_background(daemon));
            std::thread::sleep(Duration::from_millis(rng.below(50)));
        }
        // A random point: before the call, in the TLS handshake, while a
        // batch is inserted, between its commit and the answer, between
        // two batches, or after the cycle.
        let delay = rng.below(400);
        std::thread::sleep(Duration::from_millis(delay));
        platform.kill();
        let mut outcomes = Vec::new();
        for child in syncing {
            let out = child.wait_with_output().unwrap();
            if out.status.success() {
                syncs_ok += 1;
                outcomes.push("had finished".to_owned());
            } else {
                syncs_failed += 1;
                outcomes.push(format!("failed: {}", text(&out).trim()));
            }
        }
        eprintln!(
            "kill {kill}: after {delay} ms; syncs: {}",
            outcomes.join("; ")
        );
        platform.restart();
    }
    let execs: u64 = loads.into_iter().map(Load::stop).sum();
    let mut total = 0;
    for (daemon, device) in daemons.iter().zip(devices) {
        let written = settled_seq(daemon);
        // Everything goes up now; a cycle uploads every batch pending.
        synced(daemon);
        synced(daemon);

        let agent = agent_records(daemon);
        let uploaded = platform_records(&platform, device);
        let mut seen: BTreeMap<u64, &Value> = BTreeMap::new();
        for (seq, record) in &uploaded {
            assert!(
                seen.insert(*seq, record).is_none(),
                "{device}: seq {seq} is on the platform twice"
            );
        }
        let last = *seen.keys().last().unwrap();
        assert!(
            last >= written,
            "{device}: the platform holds up to seq {last}, the agent had written {written}"
        );
        let missing: Vec<u64> = (1..=last).filter(|s| !seen.contains_key(s)).collect();
        assert!(missing.is_empty(), "{device}: lost on the way: {missing:?}");
        for (seq, record) in &seen {
            let own = agent.get(seq).unwrap_or_else(|| {
                panic!("{device}: seq {seq} on the platform is not in the agent's log")
            });
            assert_eq!(
                *record, own,
                "{device}: seq {seq} differs from the agent's record"
            );
        }
        let status = daemon.status();
        assert_eq!(
            status["platform"]["acked_seq"].as_u64(),
            Some(last),
            "{device}: the platform acknowledged all it holds: {status}"
        );
        eprintln!(
            "{device}: {written} records written, {} on the platform, each once, equal to the agent's",
            seen.len()
        );
        total += seen.len();
    }
    eprintln!(
        "{KILLS} platform kills in {:.0?}: 2 agents, {execs} execs, {total} records on the platform (each once, equal to the agents'), {syncs_failed} syncs cut by a kill, {syncs_ok} had finished",
        started.elapsed(),
    );
}

fn approve_rule(path: &Path) -> String {
    format!(
        r#"{{"id": "tool-approve", "action": "approve", "match": {{"path": "{}"}},
            "approval": {{"levels": [{{"approvers": 2}}], "max_window_hours": 2, "uses": 1}}}}"#,
        path.display()
    )
}

/// Waits until the platform holds a pending request not in `known`;
/// returns it.
fn pending_request(platform: &Platform, daemon: &Daemon, known: &[String]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(request) = platform
            .requests()
            .into_iter()
            .find(|r| r["state"] == "pending" && !known.iter().any(|k| r["id"] == k.as_str()))
        {
            return request;
        }
        assert!(
            Instant::now() < deadline,
            "no new pending request on the platform: {:?}\n{}",
            platform.requests(),
            daemon.log()
        );
        synced(daemon);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `requests approve ID` with this admin's token, started, not waited for.
fn vote(platform: &Platform, token: &str, id: &str) -> Child {
    Command::new(binary("epm-platform"))
        .args(["--url", &platform.url(), "--data"])
        .arg(platform.data_dir())
        .args(["requests", "approve", id])
        .env("EPM_ADMIN_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_platform_killed_while_two_approvers_vote_loses_and_doubles_no_vote() {
    if !capable() {
        return;
    }
    const ROUNDS: usize = 12;
    let mut rng = Rng::from_env();
    let mut platform = Platform::start();
    let user = TestUser::create("epme2evote");
    let device = "e2e-vote-kills";
    let daemon = Daemon::start_managed(device, &platform.agent_table());
    synced(&daemon);
    let tool = daemon.mount.install("/usr/bin/true", "tool");
    platform.push(
        &policy(1, "allow", &[approve_rule(&tool)]),
        &["--device", device],
    );
    synced(&daemon);
    daemon.open_to_users();
    let second = platform.admin("second-approver", 1);
    let voters = [
        ("e2e", platform.admin_token.clone()),
        ("second-approver", second),
    ];
    let tool_arg = tool.to_str().unwrap();

    let mut known = Vec::new();
    let (mut cut, mut retried_landed, mut retried_new) = (0, 0, 0);
    for round in 0..ROUNDS {
        assert!(
            denied(&user.run(&tool)),
            "round {round}: refused until approved"
        );
        let out = daemon.epmctl_as(
            &user,
            &["request", tool_arg, "--reason", &format!("Capture {round}")],
        );
        assert!(out.status.success(), "{}", text(&out));
        let request = pending_request(&platform, &daemon, &known);
        let id = request["id"].as_str().unwrap().to_owned();
        known.push(id.clone());

        // Both votes at once, or one after the other, and a SIGKILL at a
        // random point: before, between or while they are cast.
        let stagger = rng.below(60);
        let first = vote(&platform, &voters[0].1, &id);
        std::thread::sleep(Duration::from_millis(stagger));
        let second = vote(&platform, &voters[1].1, &id);
        let delay = rng.below(120);
        std::thread::sleep(Duration::from_millis(delay));
        platform.kill();
        let answers = [
            first.wait_with_output().unwrap(),
            second.wait_with_output().unwrap(),
        ];
        platform.restart();

        // A vote answered before the kill is kept; one cut off is cast
        // again: it either lands now or is found already counted.
        let mut outcome = Vec::new();
        for ((name, token), answer) in voters.iter().zip(&answers) {
            if answer.status.success() {
                outcome.push(format!("{name}: acknowledged"));
                continue;
            }
            cut += 1;
            let again = platform.cli_as(token, &["requests", "approve", &id]);
            if again.status.success() {
                retried_new += 1;
                outcome.push(format!("{name}: cut, cast again"));
            } else {
                // Counted already: refused as a second vote of the same
                // admin, or (both had landed) as a vote on a request no
                // longer pending; the approvals below show which.
                assert!(
                    text(&again).contains("already approved")
                        || text(&again).contains("not pending"),
                    "round {round}: {name}'s vote again: {}",
                    text(&again)
                );
                retried_landed += 1;
                outcome.push(format!("{name}: cut, had landed"));
            }
        }
        let request = platform
            .requests()
            .into_iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap();
        let approvers: Vec<&str> = request["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["admin"].as_str().unwrap())
            .collect();
        assert_eq!(
            approvers.len(),
            2,
            "round {round}: two votes, each once: {request}"
        );
        assert!(
            approvers.contains(&"e2e") && approvers.contains(&"second-approver"),
            "round {round}: {request}"
        );
        assert_eq!(request["state"], "approved", "round {round}: {request}");
        eprintln!(
            "round {round}: stagger {stagger} ms, kill after {delay} ms: {}",
            outcome.join(", ")
        );

        // The grant reaches the agent and allows one run.
        synced(&daemon);
        assert!(
            ran(&user.run(&tool)),
            "round {round}: approved, so it runs\n{}",
            daemon.log()
        );
        assert!(denied(&user.run(&tool)), "round {round}: one use only");
        synced(&daemon);
        let used = platform
            .requests()
            .into_iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap();
        assert_eq!(used["state"], "used", "round {round}: {used}");
    }
    eprintln!(
        "{ROUNDS} requests, 2 approvers each, a platform kill per request: {cut} votes cut off by the kill ({retried_landed} had landed, {retried_new} cast again), 0 lost, 0 counted twice"
    );
}
