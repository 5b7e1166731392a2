//! Load generator for `scripts/bench-platform.sh`: enrolls N simulated
//! agents, then has all of them check in as fast as the platform answers
//! for a while, and prints check-ins per second with latency percentiles.
//!
//! ```text
//! cargo run --release -p epm-platform --example loadgen -- URLS CA_PEM ENROLL_TOKEN AGENTS SECONDS [MODE]
//! ```
//!
//! URLS is one URL or several, comma-separated (instances behind no load
//! balancer: agent i talks to URL i mod n, as a balancer spreading
//! connections would). MODE `checkin` (default): check-ins with an
//! unchanged bundle. MODE `audit100`: each round is a check-in and an
//! upload of 100 new audit records, measured together.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use epm_api::agent::{AgentCredentials, CheckinRequest, CheckinResponse, EnrollRequest, LocalUser};
use epm_api::paths;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(6..=7).contains(&args.len()) {
        eprintln!("usage: loadgen URLS CA_PEM ENROLL_TOKEN AGENTS SECONDS [checkin|audit100]");
        std::process::exit(2);
    }
    let urls: Vec<String> = args[1].split(',').map(str::to_owned).collect();
    let (ca, token) = (&args[2], args[3].clone());
    let audit = match args.get(6).map(String::as_str) {
        None | Some("checkin") => false,
        Some("audit100") => true,
        Some(other) => {
            eprintln!("loadgen: mode {other:?}: use checkin or audit100");
            std::process::exit(2);
        }
    };
    let agents: usize = args[4].parse().unwrap();
    let seconds: u64 = args[5].parse().unwrap();
    epm_platform::install_crypto_provider();
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap())
        .pool_max_idle_per_host(agents)
        .build()
        .unwrap();

    let started = Instant::now();
    let mut enrolls = Vec::new();
    for i in 0..agents {
        let (http, url, token) = (http.clone(), urls[i % urls.len()].clone(), token.clone());
        enrolls.push(tokio::spawn(async move {
            let request = EnrollRequest {
                enrollment_token: token,
                device_id: format!("load-{}-{i:05}", if audit { "audit" } else { "checkin" }),
                hostname: format!("load-{i:05}"),
                os: "linux".into(),
                agent_version: "loadgen".into(),
            };
            let response = http
                .post(format!("{url}{}", paths::AGENT_ENROLL))
                .json(&request)
                .send()
                .await
                .unwrap();
            assert!(
                response.status().is_success(),
                "enroll: {}",
                response.status()
            );
            response.json::<AgentCredentials>().await.unwrap()
        }));
    }
    let mut credentials = Vec::new();
    for e in enrolls {
        credentials.push(e.await.unwrap());
    }
    eprintln!(
        "enrolled {agents} agents in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Each agent checks in once to get its bundle built, as a fleet would
    // after a policy push; then the steady state is measured.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let warm = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, agent) in credentials.into_iter().enumerate() {
        let (http, url, latencies, warm) = (
            http.clone(),
            urls[i % urls.len()].clone(),
            latencies.clone(),
            warm.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut version = None;
            let mut first = true;
            let mut seq: u64 = 0;
            while Instant::now() < deadline {
                let request = CheckinRequest {
                    policy_version: version,
                    audit_last_seq: 100,
                    outbox_pending: 0,
                    users: vec![LocalUser {
                        name: format!("user{}", i % 50),
                        groups: vec!["staff".into()],
                    }],
                    ..CheckinRequest::default()
                };
                let t = Instant::now();
                let response = http
                    .post(format!("{url}{}", paths::AGENT_CHECKIN))
                    .bearer_auth(format!("{}.{}", agent.agent_id, agent.agent_secret))
                    .json(&request)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "check-in: {}",
                    response.status()
                );
                let answer: CheckinResponse = response.json().await.unwrap();
                version = Some(answer.policy.version);
                if audit && !first {
                    // What an agent's outbox sends: records of a few
                    // hundred bytes, numbered on.
                    let records: Vec<serde_json::Value> = (0..100)
                        .map(|_| {
                            seq += 1;
                            serde_json::json!({
                                "seq": seq, "event": "exec", "decision": "allow",
                                "time": jiff::Timestamp::now(), "user": format!("user{}", i % 50),
                                "path": "/usr/bin/true", "rule_id": null,
                                "sha256": "ab".repeat(32), "hash": "cd".repeat(32),
                            })
                        })
                        .collect();
                    let response = http
                        .post(format!("{url}{}", paths::AGENT_AUDIT))
                        .bearer_auth(format!("{}.{}", agent.agent_id, agent.agent_secret))
                        .json(&serde_json::json!({"oldest_kept_seq": 1, "records": records}))
                        .send()
                        .await
                        .unwrap();
                    assert!(
                        response.status().is_success(),
                        "audit upload: {}",
                        response.status()
                    );
                    let _ = response.bytes().await;
                }
                if first {
                    first = false;
                    warm.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    latencies.lock().unwrap().push(t.elapsed());
                }
            }
        }));
    }
    let measured_from = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = measured_from.elapsed().as_secs_f64();
    let mut latencies = latencies.lock().unwrap().clone();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{} agents={agents} instances={} check-ins={} in {elapsed:.1} s: {:.0} check-ins/s, p50 {:.1} ms, p99 {:.1} ms",
        if audit { "audit100" } else { "unchanged" },
        urls.len(),
        latencies.len(),
        latencies.len() as f64 / elapsed,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
}
