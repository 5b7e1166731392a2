//! Load generator for `scripts/bench-platform.sh`: enrolls N simulated
//! agents over TLS, then measures check-ins in one of two ways.
//!
//! ```text
//! cargo run --release -p epm-platform --example loadgen -- \
//!     URLS CA_PEM ENROLL_TOKEN AGENTS SECONDS [MODE] [--rate R [--arrivals poisson|even]] [--connect-each]
//! ```
//!
//! URLS is one URL or several, comma-separated (instances behind no load
//! balancer: agent i talks to URL i mod n, as a balancer spreading
//! connections would). MODE `checkin` (default): check-ins with an
//! unchanged bundle. MODE `audit100`: each round is a check-in and an
//! upload of 100 new audit records, measured together.
//!
//! **Closed loop** (no `--rate`): every agent checks in again as soon as
//! its last answer arrives. That finds the peak throughput, but its
//! latencies are mostly the queue the generator itself builds (Little's
//! law: AGENTS / throughput), not what a fleet sees.
//!
//! **Open loop** (`--rate R`): check-ins start on a schedule at R per
//! second (Poisson arrivals by default, or evenly spaced), whatever the
//! server's answers do, as a fleet's timers do. Each is handed to an idle
//! agent. Its latency is measured from when it was *scheduled*, not from
//! when it was sent, so neither the generator's own lag nor a shortage of
//! idle agents hides a slow server (coordinated omission); both are counted
//! and printed (`late` starts, and the largest start lag).
//!
//! Connections: by default one client keeps its connections (and TLS
//! sessions) alive and reuses them, the cheapest case for the server.
//! `--connect-each` gives every round a new connection and a full TLS
//! handshake (no resumption), which is what a fleet costs: an agent syncs
//! every few minutes, long after the server's idle timeout (30 s) closed its
//! last connection, and a server's session cache does not hold a fleet.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use epm_api::agent::{AgentCredentials, CheckinRequest, CheckinResponse, EnrollRequest, LocalUser};
use epm_api::paths;
use rand::Rng;

/// A start later than this after its scheduled time is counted as late.
const LATE: Duration = Duration::from_millis(5);

/// One simulated agent and what it remembers between check-ins.
struct Agent {
    index: usize,
    url: String,
    bearer: String,
    version: Option<u64>,
    seq: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Arrivals {
    Poisson,
    Even,
}

fn usage() -> ! {
    eprintln!(
        "usage: loadgen URLS CA_PEM ENROLL_TOKEN AGENTS SECONDS [checkin|audit100] [--rate R [--arrivals poisson|even]]"
    );
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut positional = Vec::new();
    let mut rate: Option<f64> = None;
    let mut arrivals = Arrivals::Poisson;
    let mut connect_each = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rate" => {
                rate = args
                    .next()
                    .and_then(|r| r.parse().ok())
                    .filter(|r: &f64| *r > 0.0);
                if rate.is_none() {
                    usage();
                }
            }
            "--arrivals" => {
                arrivals = match args.next().as_deref() {
                    Some("poisson") => Arrivals::Poisson,
                    Some("even") => Arrivals::Even,
                    _ => usage(),
                }
            }
            "--connect-each" => connect_each = true,
            _ => positional.push(arg),
        }
    }
    if !(5..=6).contains(&positional.len()) {
        usage();
    }
    let urls: Vec<String> = positional[0].split(',').map(str::to_owned).collect();
    let (ca, token) = (&positional[1], positional[2].clone());
    let audit = match positional.get(5).map(String::as_str) {
        None | Some("checkin") => false,
        Some("audit100") => true,
        Some(other) => {
            eprintln!("loadgen: mode {other:?}: use checkin or audit100");
            std::process::exit(2);
        }
    };
    let agents: usize = positional[3].parse().unwrap_or_else(|_| usage());
    let seconds: u64 = positional[4].parse().unwrap_or_else(|_| usage());
    epm_platform::install_crypto_provider();
    let ca_pem = std::fs::read(ca).unwrap();
    // One client, its connections kept alive and reused (TLS sessions too),
    // for enrollment and the default rounds.
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .pool_max_idle_per_host(agents)
        .build()
        .unwrap();
    let clients = Clients {
        shared: http.clone(),
        fresh: connect_each.then(|| fresh_tls(&ca_pem)),
    };

    // Device ids of their own per loop and mode: the benchmark runs several
    // generators against one platform, and an id is enrolled once.
    let kind = format!(
        "{}-{}",
        if audit { "audit" } else { "checkin" },
        if rate.is_some() { "open" } else { "closed" }
    );
    let started = Instant::now();
    let mut enrolls = Vec::new();
    for i in 0..agents {
        let (http, url, token, kind) = (
            http.clone(),
            urls[i % urls.len()].clone(),
            token.clone(),
            kind.clone(),
        );
        enrolls.push(tokio::spawn(async move {
            let request = EnrollRequest {
                enrollment_token: token,
                device_id: format!("load-{kind}-{i:05}"),
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
            let credentials = response.json::<AgentCredentials>().await.unwrap();
            Agent {
                index: i,
                url,
                bearer: format!("{}.{}", credentials.agent_id, credentials.agent_secret),
                version: None,
                seq: 0,
            }
        }));
    }
    let mut fleet = Vec::new();
    for e in enrolls {
        fleet.push(e.await.unwrap());
    }
    eprintln!(
        "enrolled {agents} agents in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Each agent checks in once to get its bundle built, as a fleet would
    // after a policy push (not measured); then the steady state is.
    let warm = futures_join(fleet.into_iter().map(|mut agent| {
        let http = http.clone();
        async move {
            round(&http, &mut agent, false).await.unwrap();
            agent
        }
    }))
    .await;

    let connections = if connect_each {
        "a new connection and full TLS handshake per round"
    } else {
        "connections kept alive"
    };
    match rate {
        None => closed_loop(clients, warm, audit, seconds, urls.len(), connections).await,
        Some(rate) => {
            open_loop(
                clients,
                warm,
                audit,
                seconds,
                urls.len(),
                rate,
                arrivals,
                connections,
            )
            .await
        }
    }
}

/// The client a round uses.
#[derive(Clone)]
struct Clients {
    shared: reqwest::Client,
    /// With `--connect-each`: the TLS configuration of a client made per
    /// round (and dropped after it, closing its connection).
    fresh: Option<Arc<rustls::ClientConfig>>,
}

impl Clients {
    fn for_round(&self) -> reqwest::Client {
        match &self.fresh {
            None => self.shared.clone(),
            Some(tls) => reqwest::Client::builder()
                .use_preconfigured_tls((**tls).clone())
                .build()
                .unwrap(),
        }
    }
}

/// A TLS client configuration trusting the platform's CA, with session
/// resumption off: every connection pays a full handshake.
fn fresh_tls(ca_pem: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Runs the futures at once; their outputs in order.
async fn futures_join<T: Send + 'static>(
    futures: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// One check-in (and with `audit`, an upload of 100 new records); an error
/// says what failed.
async fn round(http: &reqwest::Client, agent: &mut Agent, audit: bool) -> Result<(), String> {
    let request = CheckinRequest {
        policy_version: agent.version,
        audit_last_seq: agent.seq,
        outbox_pending: 0,
        users: vec![LocalUser {
            name: format!("user{}", agent.index % 50),
            groups: vec!["staff".into()],
        }],
        ..CheckinRequest::default()
    };
    let response = http
        .post(format!("{}{}", agent.url, paths::AGENT_CHECKIN))
        .bearer_auth(&agent.bearer)
        .json(&request)
        .send()
        .await
        .map_err(|e| format!("check-in: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("check-in: {}", response.status()));
    }
    let answer: CheckinResponse = response
        .json()
        .await
        .map_err(|e| format!("check-in: {e}"))?;
    agent.version = Some(answer.policy.version);
    if audit {
        // What an agent's outbox sends: records of a few hundred bytes,
        // numbered on.
        let records: Vec<serde_json::Value> = (0..100)
            .map(|_| {
                agent.seq += 1;
                serde_json::json!({
                    "seq": agent.seq, "event": "exec", "decision": "allow",
                    "time": jiff::Timestamp::now(), "user": format!("user{}", agent.index % 50),
                    "path": "/usr/bin/true", "rule_id": null,
                    "sha256": "ab".repeat(32), "hash": "cd".repeat(32),
                })
            })
            .collect();
        let response = http
            .post(format!("{}{}", agent.url, paths::AGENT_AUDIT))
            .bearer_auth(&agent.bearer)
            .json(&serde_json::json!({"oldest_kept_seq": 1, "records": records}))
            .send()
            .await
            .map_err(|e| format!("audit upload: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("audit upload: {}", response.status()));
        }
        let _ = response.bytes().await;
    }
    Ok(())
}

/// Every agent back to back until the deadline: the peak throughput.
async fn closed_loop(
    clients: Clients,
    fleet: Vec<Agent>,
    audit: bool,
    seconds: u64,
    instances: usize,
    connections: &str,
) {
    let agents = fleet.len();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let errors = Arc::new(AtomicU64::new(0));
    let measured_from = Instant::now();
    let results = futures_join(fleet.into_iter().map(|mut agent| {
        let (clients, errors) = (clients.clone(), errors.clone());
        async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                match round(&clients.for_round(), &mut agent, audit).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("loadgen: {e}");
                        }
                    }
                }
            }
            latencies
        }
    }))
    .await;
    let elapsed = measured_from.elapsed().as_secs_f64();
    let mut latencies: Vec<Duration> = results.into_iter().flatten().collect();
    println!(
        "{} closed-loop agents={agents} instances={instances} ({connections}): peak {:.0} check-ins/s ({} in {elapsed:.1} s, {} errors); latency incl. the generator's queue {}",
        if audit { "audit100" } else { "unchanged" },
        latencies.len() as f64 / elapsed,
        latencies.len(),
        errors.load(Ordering::Relaxed),
        percentiles(&mut latencies)
    );
}

/// Check-ins scheduled at `rate` per second until the deadline, each on an
/// idle agent, timed from its scheduled start.
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    clients: Clients,
    fleet: Vec<Agent>,
    audit: bool,
    seconds: u64,
    instances: usize,
    rate: f64,
    arrivals: Arrivals,
    connections: &str,
) {
    let agents = fleet.len();
    // Idle agents, first in first out, so every agent checks in in turn.
    let (idle_tx, idle_rx) = tokio::sync::mpsc::unbounded_channel();
    for agent in fleet {
        idle_tx.send(agent).unwrap();
    }
    let idle_rx = Arc::new(tokio::sync::Mutex::new(idle_rx));
    let errors = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    let max_lag_us = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut scheduled = start;
    let mut tasks = Vec::new();
    let mut offered: u64 = 0;
    while scheduled < end {
        tokio::time::sleep_until(scheduled.into()).await;
        offered += 1;
        let (clients, idle_tx, idle_rx) = (clients.clone(), idle_tx.clone(), idle_rx.clone());
        let (errors, late, max_lag_us, latencies) = (
            errors.clone(),
            late.clone(),
            max_lag_us.clone(),
            latencies.clone(),
        );
        let at = scheduled;
        tasks.push(tokio::spawn(async move {
            // Waits for an idle agent when all are busy: that wait is part
            // of the latency and of the lag, never dropped.
            let mut agent = idle_rx.lock().await.recv().await.unwrap();
            let lag = at.elapsed();
            if lag > LATE {
                late.fetch_add(1, Ordering::Relaxed);
            }
            max_lag_us.fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
            match round(&clients.for_round(), &mut agent, audit).await {
                Ok(()) => latencies.lock().unwrap().push(at.elapsed()),
                Err(e) => {
                    if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                        eprintln!("loadgen: {e}");
                    }
                }
            }
            let _ = idle_tx.send(agent);
        }));
        let gap = match arrivals {
            Arrivals::Even => 1.0 / rate,
            // Exponential gaps: a Poisson process, the arrivals of many
            // independent timers.
            Arrivals::Poisson => -(1.0 - rand::thread_rng().r#gen::<f64>()).ln() / rate,
        };
        scheduled += Duration::from_secs_f64(gap);
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut latencies = latencies.lock().unwrap().clone();
    println!(
        "{} open-loop rate={rate:.0}/s ({}) agents={agents} instances={instances} ({connections}): offered {offered}, completed {} ({:.0}/s over {elapsed:.1} s, {} errors); {}; late starts (> {} ms) {}, largest start lag {:.1} ms",
        if audit { "audit100" } else { "unchanged" },
        if arrivals == Arrivals::Poisson {
            "poisson"
        } else {
            "even"
        },
        latencies.len(),
        latencies.len() as f64 / elapsed,
        errors.load(Ordering::Relaxed),
        percentiles(&mut latencies),
        LATE.as_millis(),
        late.load(Ordering::Relaxed),
        max_lag_us.load(Ordering::Relaxed) as f64 / 1e3,
    );
}

/// `p50 … ms, p99 … ms, max … ms`.
fn percentiles(latencies: &mut [Duration]) -> String {
    if latencies.is_empty() {
        return "no check-ins completed".into();
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(pct(0.50)),
        ms(pct(0.99)),
        ms(latencies[latencies.len() - 1])
    )
}
