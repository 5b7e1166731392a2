//! Wiring and lifecycle: start everything in order, run the gate, and on
//! SIGTERM stop in the order that loses nothing (see docs/architecture.md).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use epm_audit::{AuditEvent, AuditLog, Chain, EventKind, LogOptions};
use epm_store::{OpenReport, Store};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::{Config, PlatformConfig};
use crate::control::{self, ControlContext};
use crate::exec::audit::{AuditSink, AuditWriter};
use crate::exec::decider::{Decider, DeciderDeps, Interactive, PolicyState, PolicySwap};
use crate::exec::pipeline::{Intake, Workers};
use crate::gate::{ExecGate, FactNeeds, Shutdown};
use crate::grants::admin_session::{AdminSessions, SystemGroups};
use crate::grants::flows::{Flows, Nudge};
use crate::managed::policy_source;
use crate::managed::sync::{SyncContext, SyncCycle, SyncHandle, SyncRequests, SyncTrigger};
use epm_sync::{ClientOptions, PlatformClient};

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Config, config_path: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let device_id = device_id(&config);
    let records = Records::open(&config)?;

    // Loaded (verified) now, attached once fanotify's marks are in place:
    // the start record says whether it runs, and what is exposed if not.
    let kernel_hook = crate::exec::kernel_hook::prepare(&config.kernel_hook);
    let hook_status = crate::exec::kernel_hook::snapshot(&kernel_hook.status);
    for line in crate::exec::kernel_hook::describe(&hook_status) {
        tracing::info!("{line}");
    }
    let mut first_events = start_events(
        &config,
        config_path,
        &device_id,
        &records.store_report,
        &hook_status,
    );

    let (policy, policy_events, platform_bundle) =
        initial_policy(&config, &device_id, &records.store);
    first_events.extend(policy_events);
    let Records {
        store,
        log,
        chain,
        last_seq,
        audit_dir,
        ..
    } = records;
    let (audit_writer, audit) = start_audit(
        &config,
        &device_id,
        &store,
        log,
        chain,
        &last_seq,
        first_events,
    )?;

    // What of the gate holds up no exec exists before the decider, which
    // puts every policy in force through it; the watch marks are placed
    // once the decision workers run (`gate_until_stopped`).
    let prepared_gate = PreparedGate::make();
    let services = Services::start(
        &config,
        StartingPolicy {
            state: policy,
            platform_bundle,
            swap: prepared_gate.policy_swap(),
        },
        &device_id,
        &store,
        &audit,
        &last_seq,
    )?;
    let Services {
        decider,
        flows,
        admin_sessions,
        workers,
        intake,
        sync,
    } = services;

    let listener = control::bind(&config.socket)
        .with_context(|| format!("cannot listen on {}", config.socket.display()))?;
    let control_context = Arc::new(ControlContext {
        decider: decider.clone(),
        store: store.clone(),
        audit_dir,
        admin_group: config.admin_group.clone(),
        started,
        audit_last_seq: last_seq,
        queue_capacity: config.gate.queue_capacity,
        audit_dropped: audit.dropped_counter(),
        sync,
        flows,
        admin_sessions,
        connections: Default::default(),
        kernel_hook: kernel_hook.status.clone(),
    });
    #[cfg(target_os = "macos")]
    let _xpc_listener = start_xpc(&config, control_context.clone(), &audit, &device_id);
    // Signals are handled before the socket answers: a client that sees
    // the daemon up may send SIGHUP at once, and SIGHUP's default action
    // would end the daemon.
    let shutdown = Shutdown::new().context("cannot create the shutdown switch")?;
    spawn_signal_thread(&config, &shutdown, &decider, &store, &audit)?;
    control::serve(listener, control_context).context("cannot start the control server")?;

    gate_until_stopped(Running {
        config: &config,
        prepared_gate,
        device_id,
        decider,
        store,
        audit,
        audit_writer,
        workers,
        intake,
        shutdown,
        kernel_hook,
    })
}

/// What runs once the control socket answers: the parts the gate's run
/// needs, and the ones to stop after it in order.
#[derive(Debug)]
struct Running<'a> {
    config: &'a Config,
    prepared_gate: PreparedGate,
    device_id: String,
    decider: Arc<Decider>,
    store: Arc<Mutex<Store>>,
    audit: AuditSink,
    audit_writer: AuditWriter,
    workers: Workers,
    intake: Intake,
    shutdown: Shutdown,
    kernel_hook: crate::exec::kernel_hook::Prepared,
}

/// Opens the gate and runs it until a signal stops it or it fails; then
/// stops in the order that loses nothing: no new events, answer what is
/// queued, flush the audit, checkpoint the store, release the socket.
fn gate_until_stopped(running: Running<'_>) -> anyhow::Result<()> {
    let Running {
        config,
        prepared_gate,
        device_id,
        decider,
        store,
        audit,
        audit_writer,
        workers,
        intake,
        shutdown,
        kernel_hook,
    } = running;
    let needs = decider.fact_needs();
    let gate = open_gate(
        config,
        prepared_gate,
        decider.fail_verdict(),
        needs.clone(),
        &decider,
        &store,
        &audit,
    );
    let mut gate = match gate {
        Ok(gate) => gate,
        Err(error) => {
            // Leave nothing half-started: audit why, flush, release the socket.
            let mut event = AuditEvent::new(EventKind::ERROR);
            event.reason = Some(format!("cannot gate execs: {error:#}"));
            event.device_id = Some(device_id);
            audit.send(event);
            drop(intake);
            workers.join();
            drop(audit);
            audit_writer.stop();
            let _ = std::fs::remove_file(&config.socket);
            return Err(error);
        }
    };
    // The marks are placed: the hook may now hold what they do not cover.
    #[cfg(target_os = "linux")]
    let hook_thread = crate::exec::kernel_hook::start(
        kernel_hook,
        intake.clone(),
        decider.clone(),
        audit.clone(),
        needs,
        shutdown.clone(),
    );
    #[cfg(not(target_os = "linux"))]
    drop((kernel_hook, needs));
    tracing::info!(
        mode = config.mode.as_str(),
        fail_mode = config.fail_mode.as_str(),
        policy_version = decider.policy().engine.version(),
        socket = %config.socket.display(),
        "epmd ready"
    );
    let gate_result = gate.run(&mut |pending| intake.submit(pending), &shutdown);

    // Stop taking events; answer what is queued; then flush the audit.
    drop(gate);
    #[cfg(target_os = "linux")]
    if let Some(hook_thread) = hook_thread {
        shutdown.request();
        hook_thread.join();
    }
    drop(intake);
    workers.join();
    let mut stopped = AuditEvent::new(EventKind::DAEMON_STOPPED);
    stopped.reason = Some(match &gate_result {
        Ok(()) => "stopped by signal".to_owned(),
        Err(e) => format!("exec gate failed: {e}"),
    });
    stopped.device_id = Some(device_id);
    audit.send(stopped);
    drop(audit);
    audit_writer.stop();
    if let Ok(mut store) = store.lock()
        && let Err(error) = store.checkpoint()
    {
        tracing::warn!(%error, "cannot checkpoint the store");
    }
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!("epmd stopped");
    gate_result.context("the exec gate failed")
}

/// This device's id: configured, else the host name.
fn device_id(config: &Config) -> String {
    match &config.device_id {
        Some(id) => id.clone(),
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown-device".into()),
    }
}

/// The store and the audit log, opened and reconciled: the store is the
/// audit chain's source of truth.
#[derive(Debug)]
struct Records {
    store: Arc<Mutex<Store>>,
    store_report: OpenReport,
    log: AuditLog,
    chain: Chain,
    /// The last sequence number in the chain.
    last_seq: Arc<AtomicU64>,
    audit_dir: PathBuf,
}

impl Records {
    fn open(config: &Config) -> anyhow::Result<Records> {
        // The store first: it is the audit chain's source of truth.
        let store_path = config.store_path();
        let (store, store_report) = Store::open(&store_path)
            .with_context(|| format!("cannot open the store {}", store_path.display()))?;
        let store = Arc::new(Mutex::new(store));

        let audit_dir = config.audit_dir();
        let (mut log, log_report) = AuditLog::open(
            &audit_dir,
            LogOptions {
                max_file_bytes: config.audit.max_file_bytes,
                keep_files: config.audit.keep_files,
            },
        )
        .with_context(|| format!("cannot open the audit log in {}", audit_dir.display()))?;
        if log_report.torn_bytes_removed > 0 {
            tracing::warn!(
                bytes = log_report.torn_bytes_removed,
                "cut a torn last line from the audit log (a crash mid-write)"
            );
        }
        let chain = reconcile(&store, &mut log)?;
        let last_seq = Arc::new(AtomicU64::new(chain.next_seq().saturating_sub(1)));
        Ok(Records {
            store,
            store_report,
            log,
            chain,
            last_seq,
            audit_dir,
        })
    }
}

/// The policy to start with, the records of how it was chosen, and the
/// platform bundle it came from (managed devices).
fn initial_policy(
    config: &Config,
    device_id: &str,
    store: &Arc<Mutex<Store>>,
) -> (
    PolicyState,
    Vec<AuditEvent>,
    Option<policy_source::BundleInForce>,
) {
    match &config.platform {
        Some(platform) => {
            policy_source::initial_signed(&platform.policy_public_key, device_id, store)
        }
        None => {
            let (policy, events) = policy_source::initial(config.policy_file.as_deref(), store);
            (policy, events, None)
        }
    }
}

/// Starts the audit thread on the reconciled chain and sends it the
/// records that open the run, stamped with this device and mode.
fn start_audit(
    config: &Config,
    device_id: &str,
    store: &Arc<Mutex<Store>>,
    log: AuditLog,
    chain: Chain,
    last_seq: &Arc<AtomicU64>,
    first_events: Vec<AuditEvent>,
) -> anyhow::Result<(AuditWriter, AuditSink)> {
    let (audit_writer, audit) = AuditWriter::start(
        store.clone(),
        log,
        chain,
        crate::exec::audit::AuditLimits {
            outbox_max_bytes: config.audit.outbox_max_bytes,
            user_rate_bytes: config.audit.user_rate_bytes,
            user_burst_bytes: config.audit.user_burst_bytes,
        },
        last_seq.clone(),
        device_id.to_owned(),
    )
    .context("cannot start the audit thread")?;
    for mut event in first_events {
        event.device_id.get_or_insert_with(|| device_id.to_owned());
        event
            .mode
            .get_or_insert_with(|| config.mode.as_str().to_owned());
        audit.send(event);
    }

    Ok((audit_writer, audit))
}

/// The records that open the run: the daemon's start (with its kernel
/// hook's state) and a store that had to be replaced.
fn start_events(
    config: &Config,
    config_path: &Path,
    device_id: &str,
    store_report: &OpenReport,
    hook_status: &epm_ipc::KernelHookStatus,
) -> Vec<AuditEvent> {
    let mut first_events = Vec::new();
    let mut started_event = AuditEvent::new(EventKind::DAEMON_STARTED)
        .with_detail("version", env!("CARGO_PKG_VERSION"))
        .with_detail("config", config_path.display().to_string())
        .with_detail("fail_mode", config.fail_mode.as_str())
        .with_detail(
            "kernel_hook",
            crate::exec::kernel_hook::audit_value(hook_status),
        );
    started_event.mode = Some(config.mode.as_str().to_owned());
    started_event.device_id = Some(device_id.to_owned());
    started_event.pid = Some(std::process::id());
    first_events.push(started_event);
    if let Some(recovery) = &store_report.recovered_from {
        let mut event = AuditEvent::new(EventKind::STORE_RECOVERED)
            .with_detail("moved_to", recovery.moved_to.display().to_string());
        event.reason = Some(format!(
            "the store was corrupt ({}); moved to {} and replaced by a fresh one",
            recovery.reason,
            recovery.moved_to.display()
        ));
        first_events.push(event);
    }
    first_events
}

/// The policy the daemon starts with, and how it is put in force.
#[derive(Debug)]
struct StartingPolicy {
    state: PolicyState,
    /// The platform's bundle it came from, when it did.
    platform_bundle: Option<policy_source::BundleInForce>,
    /// The gate's hook around every policy change ([`PreparedGate`]).
    swap: Option<Arc<dyn PolicySwap>>,
}

/// The services between the exec path and the control socket: the
/// decider and its grant flows, admin sessions, the decision workers and
/// the platform sync.
#[derive(Debug)]
struct Services {
    decider: Arc<Decider>,
    flows: Arc<Flows>,
    admin_sessions: Arc<AdminSessions>,
    workers: Workers,
    intake: Intake,
    sync: Option<Arc<SyncHandle>>,
}

impl Services {
    fn start(
        config: &Config,
        policy: StartingPolicy,
        device_id: &str,
        store: &Arc<Mutex<Store>>,
        audit: &AuditSink,
        last_seq: &Arc<AtomicU64>,
    ) -> anyhow::Result<Services> {
        let StartingPolicy {
            state: policy,
            platform_bundle,
            swap: policy_swap,
        } = policy;
        // The sync's trigger exists before the flows, which nudge it when a
        // request is filed; the sync, made after them, listens on it.
        let (trigger, sync_requests) = crate::managed::sync::sync_channel();
        let nudge = trigger.clone();
        let managed = config.platform.is_some();
        // The decider and the flows need each other: the flows are made
        // while the decider is (they get a `Weak` to it) and given to it at
        // construction; their thread starts once both exist.
        let mut made = None;
        let decider = Arc::new_cyclic(|decider| {
            let (flows, incoming) = Flows::new(
                store.clone(),
                audit.clone(),
                decider.clone(),
                device_id.to_owned(),
                managed.then(|| epm_sync::credentials::platform_store(&config.state_dir)),
                managed.then(|| Nudge::new(move || nudge.nudge())),
            );
            let interactive: Arc<dyn Interactive> = flows.clone();
            made = Some((flows, incoming));
            Decider::with_deps(
                policy,
                config.mode,
                config.fail_mode,
                device_id.to_owned(),
                config.gate.cache_entries,
                DeciderDeps {
                    interactive: Some(interactive),
                    policy_swap,
                },
            )
        });
        let (flows, incoming) = made.context("the interactive flows were not made")?;
        flows
            .start_thread(incoming)
            .context("cannot start the interactive flows")?;
        let decider = &decider;
        // Before anything else can change groups: sessions that expired while
        // the daemon was down end now.
        let admin_sessions = AdminSessions::start(
            store.clone(),
            audit.clone(),
            decider,
            flows.clone(),
            config.admin_sessions.clone(),
            Box::new(SystemGroups),
        )
        .context("cannot start admin sessions")?;

        let (workers, intake) = Workers::start(
            config.gate.workers,
            config.gate.queue_capacity,
            decider.clone(),
            audit.clone(),
        )
        .context("cannot start the decision workers")?;

        let sync = match &config.platform {
            Some(platform) => Some(Arc::new(
                start_sync(
                    platform,
                    (trigger, sync_requests),
                    SyncContext {
                        key: platform.policy_public_key.clone(),
                        device_id: decider.device_id().to_owned(),
                        enrollment_token: platform.enrollment_token.clone(),
                        credentials: epm_sync::credentials::platform_store(&config.state_dir),
                        store: store.clone(),
                        decider: decider.clone(),
                        audit: audit.clone(),
                        audit_last_seq: last_seq.clone(),
                        status: Arc::default(),
                        current: platform_bundle,
                        flows: Some(flows.clone()),
                    },
                )
                .context("cannot start the platform sync")?,
            )),
            None => None,
        };
        Ok(Services {
            decider: decider.clone(),
            flows,
            admin_sessions,
            workers,
            intake,
            sync,
        })
    }
}

/// Serves the XPC service for the helper and `epmctl` (macOS). A
/// listener that cannot start (a peer requirement on macOS 11, say) must
/// not stop the exec gate: it is logged and audited as an error, and
/// clients can still use the socket (`--socket`).
#[cfg(target_os = "macos")]
fn start_xpc(
    config: &Config,
    context: Arc<ControlContext>,
    audit: &AuditSink,
    device_id: &str,
) -> Option<epm_ipc::xpc::XpcListener> {
    let requirement = config.xpc.peer_requirement.as_deref();
    match control::serve_xpc(&config.xpc.service, requirement, context) {
        Ok(listener) => {
            tracing::info!(
                service = %config.xpc.service,
                peer_requirement = requirement.unwrap_or("none"),
                "serving XPC"
            );
            Some(listener)
        }
        Err(error) => {
            tracing::error!(service = %config.xpc.service, %error, "cannot serve XPC");
            let mut event = AuditEvent::new(EventKind::ERROR);
            event.reason = Some(format!(
                "cannot serve the XPC service {}: {error}; the helper cannot reach epmd",
                config.xpc.service
            ));
            event.device_id = Some(device_id.to_owned());
            audit.send(event);
            None
        }
    }
}

/// Makes the JSONL log and the store's outbox agree after a crash: the
/// outbox is committed first, so records it has beyond the log are appended
/// to the log; the chain continues from the newest record either has.
fn reconcile(store: &Arc<Mutex<Store>>, log: &mut AuditLog) -> anyhow::Result<Chain> {
    let store = store
        .lock()
        .map_err(|_| anyhow::anyhow!("store lock poisoned"))?;
    let store_last = store.last_audit().context("cannot read the audit outbox")?;
    let mut log_last = log.last_seq().unwrap_or(0);
    if let Some((store_seq, _)) = &store_last {
        while log_last < *store_seq {
            let missing = store
                .audit_since(log_last, 1000)
                .context("cannot read the audit outbox")?;
            let Some(last) = missing.last() else { break };
            let last_seq = last.seq;
            let sealed: Vec<epm_audit::SealedRecord> = missing
                .into_iter()
                .map(|r| epm_audit::SealedRecord {
                    seq: r.seq,
                    hash: r.hash,
                    line: r.line,
                })
                .collect();
            log.append(&sealed)
                .context("cannot complete the audit log from the outbox")?;
            tracing::info!(
                records = sealed.len(),
                "completed the audit log from the store after a crash"
            );
            log_last = last_seq;
        }
    }
    match store_last {
        Some((seq, hash)) if seq >= log_last => Ok(Chain::resume(seq, hash)),
        // The store is behind the log (it was recovered from corruption):
        // continue from the log's last record.
        _ if log_last > 0 => {
            let last = epm_audit::tail(log.dir(), 1).context("cannot read the audit log")?;
            let record = last
                .first()
                .and_then(|l| epm_audit::AuditRecord::parse(l).ok())
                .context("the audit log's last record is unreadable")?;
            Ok(Chain::resume(record.seq, record.hash))
        }
        _ => Ok(Chain::genesis()),
    }
}

/// Builds the platform client (reading the pinned CA: a missing or bad
/// `ca_cert` stops the start with a message naming it) and starts the
/// sync thread.
fn start_sync(
    platform: &PlatformConfig,
    channel: (SyncTrigger, SyncRequests),
    context: SyncContext,
) -> anyhow::Result<SyncHandle> {
    let client = PlatformClient::new(&platform.url, &platform.ca_cert, ClientOptions::default())?;
    let cycle = SyncCycle::new(client, context);
    tracing::info!(url = %platform.url, "platform sync starting");
    Ok(crate::managed::sync::spawn(
        cycle,
        platform.url.clone(),
        platform.sync_interval,
        channel,
    )?)
}

fn spawn_signal_thread(
    config: &Config,
    shutdown: &Shutdown,
    decider: &Arc<Decider>,
    store: &Arc<Mutex<Store>>,
    audit: &AuditSink,
) -> anyhow::Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let shutdown = shutdown.clone();
    let decider = decider.clone();
    let store = store.clone();
    let audit = audit.clone();
    let policy_file = config.policy_file.clone();
    std::thread::Builder::new()
        .name("epm-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                match signal {
                    SIGHUP => match &policy_file {
                        Some(path) => {
                            let event = policy_source::reload(path, &decider, &store);
                            audit.send(event);
                            audit.flush(Duration::from_secs(5));
                        }
                        None => {
                            tracing::info!("SIGHUP: no policy_file configured, nothing to reload")
                        }
                    },
                    _ => {
                        tracing::info!(signal, "stopping");
                        shutdown.request();
                        return;
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// What of the gate is made before the decider: on Linux, the fanotify
/// groups, whose kernel cache of allows the decider puts every policy in
/// force through (`gate::kernel_cache`), or why they could not be made
/// (reported where the gate opens, as any other failure to gate).
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct PreparedGate(Result<crate::gate::fanotify::FanotifyGroups, crate::gate::GateError>);

/// What of the gate is made before the decider: nothing here.
#[cfg(not(target_os = "linux"))]
#[derive(Debug)]
struct PreparedGate;

impl PreparedGate {
    #[cfg(target_os = "linux")]
    fn make() -> Self {
        Self(crate::gate::fanotify::FanotifyGroups::create())
    }

    #[cfg(not(target_os = "linux"))]
    fn make() -> Self {
        Self
    }

    /// The decider's hook around a policy change, if the gate has one.
    fn policy_swap(&self) -> Option<Arc<dyn PolicySwap>> {
        #[cfg(target_os = "linux")]
        if let Ok(groups) = &self.0 {
            let swap: Arc<dyn PolicySwap> = groups.kernel_cache();
            return Some(swap);
        }
        None
    }
}

#[cfg(target_os = "linux")]
fn open_gate(
    config: &Config,
    prepared: PreparedGate,
    fallback: crate::gate::Verdict,
    needs: Arc<FactNeeds>,
    decider: &Arc<Decider>,
    _store: &Arc<Mutex<Store>>,
    audit: &AuditSink,
) -> anyhow::Result<Box<dyn ExecGate>> {
    use crate::gate::fanotify::{FanotifyConfig, FanotifyGate, UnidentifiedReport};
    let unidentified = {
        let decider = decider.clone();
        let audit = audit.clone();
        UnidentifiedReport(Arc::new(move |exec| {
            audit.send(crate::exec::audit::unidentified_event(&decider, &exec));
        }))
    };
    let gate = FanotifyGate::open_with(
        FanotifyConfig {
            needs,
            unidentified: Some(unidentified),
            ..FanotifyConfig::new(config.gate.watch_paths.clone(), fallback)
        },
        prepared.0?,
    )?;
    if !gate.has_pidfd() {
        tracing::warn!(
            "this kernel does not report pidfds (Linux < 5.15): /proc facts may race with pid reuse"
        );
    }
    tracing::info!(mounts = gate.marked_mounts(), "fanotify gate ready");
    Ok(Box::new(gate))
}

/// Opens the Endpoint Security gate and ties its cache to the policy: on
/// every policy change (through [`FactNeeds::policy_changed`], which
/// [`Decider::set_policy`] calls) the cache is emptied and allows are cached
/// only if the new policy decides a file alike for everyone.
#[cfg(target_os = "macos")]
fn open_gate(
    _config: &Config,
    _prepared: PreparedGate,
    fallback: crate::gate::Verdict,
    needs: Arc<FactNeeds>,
    decider: &Arc<Decider>,
    store: &Arc<Mutex<Store>>,
    _audit: &AuditSink,
) -> anyhow::Result<Box<dyn ExecGate>> {
    let gate = crate::gate::endpoint_security::EndpointSecurityGate::open(fallback, needs.clone())?;
    let cache = gate.cache();
    let decider = decider.clone();
    let store = store.clone();
    let refresh = move || {
        let policy = decider.policy();
        let allowed = !policy.engine.uses_parent_path()
            && !policy.engine.uses_group_scope()
            && policy_source::document_in_force(&policy, &store)
                .is_some_and(|document| es_cache_allowed(&document));
        cache.policy_changed(allowed);
        tracing::info!(
            cache_allows = allowed,
            "Endpoint Security cache emptied for the policy in force"
        );
    };
    refresh();
    needs.on_policy_change(Box::new(refresh));
    tracing::info!("Endpoint Security gate ready");
    Ok(Box::new(gate))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_gate(
    _config: &Config,
    _prepared: PreparedGate,
    _fallback: crate::gate::Verdict,
    _needs: Arc<FactNeeds>,
    _decider: &Arc<Decider>,
    _store: &Arc<Mutex<Store>>,
    _audit: &AuditSink,
) -> anyhow::Result<Box<dyn ExecGate>> {
    anyhow::bail!("this build of epmd has no exec gate for this platform")
}

/// Whether Endpoint Security may cache allows under this policy document.
///
/// Its cache remembers an exec's answer per executable (and the executable
/// of the process that execs), for every user and every argument list. So
/// a policy whose answer for one file can depend on who runs it (a rule
/// scoped to users or groups), on the arguments (`args_regex`) or on the
/// parent (`parent_path`) must not cache: an allow for one user would
/// then let everyone through. Devices are fine (one machine). Grants and
/// monitor-mode passes are never cached whatever the policy (see the
/// pipeline). A document that cannot be read this way means no caching.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub(crate) fn es_cache_allowed(document: &str) -> bool {
    use serde::Deserialize;
    use serde::de::IgnoredAny;

    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        rules: Vec<RuleShape>,
    }
    #[derive(Deserialize)]
    struct RuleShape {
        #[serde(default, rename = "match")]
        criteria: Option<CriteriaShape>,
        #[serde(default)]
        scope: Option<ScopeShape>,
    }
    #[derive(Deserialize)]
    struct CriteriaShape {
        #[serde(default)]
        args_regex: Option<IgnoredAny>,
        #[serde(default)]
        parent_path: Option<IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct ScopeShape {
        #[serde(default)]
        users: Vec<IgnoredAny>,
        #[serde(default)]
        groups: Vec<IgnoredAny>,
    }

    let Ok(doc) = serde_json::from_str::<Doc>(document) else {
        return false;
    };
    doc.rules.iter().all(|rule| {
        let criteria_free = rule
            .criteria
            .as_ref()
            .is_none_or(|c| c.args_regex.is_none() && c.parent_path.is_none());
        let scope_free = rule
            .scope
            .as_ref()
            .is_none_or(|s| s.users.is_empty() && s.groups.is_empty());
        criteria_free && scope_free
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_are_cached_only_under_a_policy_that_decides_alike_for_everyone() {
        let cacheable = [
            r#"{"version": 1, "default_action": "allow"}"#,
            r#"{"version": 1, "default_action": "deny", "rules": [
                {"id": "a", "action": "allow", "match": {"team_id": "7Z6EMTD2C6"}},
                {"id": "b", "action": "justify", "match": {"name": "docker"}},
                {"id": "c", "action": "deny", "match": {"name": "nc"},
                 "scope": {"devices": ["mac-1"], "users": [], "groups": []}}]}"#,
        ];
        for document in cacheable {
            assert!(es_cache_allowed(document), "{document}");
        }
        let not_cacheable = [
            r#"{"version": 1, "default_action": "allow", "rules": [
                {"id": "a", "action": "deny", "match": {"name": "nc"}, "scope": {"users": ["bob"]}}]}"#,
            r#"{"version": 1, "default_action": "allow", "rules": [
                {"id": "a", "action": "deny", "match": {"name": "nc"}, "scope": {"groups": ["staff"]}}]}"#,
            r#"{"version": 1, "default_action": "allow", "rules": [
                {"id": "a", "action": "deny", "match": {"name": "curl", "args_regex": "-k"}}]}"#,
            r#"{"version": 1, "default_action": "allow", "rules": [
                {"id": "a", "action": "deny", "match": {"name": "sh", "parent_path": "/usr/bin/python3"}}]}"#,
            "not json",
            r#"{"rules": "not a list"}"#,
        ];
        for document in not_cacheable {
            assert!(!es_cache_allowed(document), "{document}");
        }
    }
}
