//! The control socket: `epmctl` and helpers ask the daemon for status,
//! audit records and policy explanations. What a caller may see is decided
//! by the uid the kernel reports for the socket peer, never by anything the
//! caller says.

pub(crate) mod runner;

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epm_audit::{AuditRecord, Follower};
use epm_ipc::{
    Arrival, Counters as WireCounters, ErrorCode, Explanation, Incoming, Latency, PeerCredentials,
    PlatformStatus, PolicyInfo, Request, Response, ServerConnection, StatusReport, SyncOutcome,
};
use epm_ipc::{ElevationVerdict, ElevationVia};
use epm_policy::{Sha256Digest, Subject};
use epm_store::Store;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::exec::decider::Decider;
use crate::exec::stats::Counters;
use crate::grants::flows::{Flows, SudoRequest, Unmet};
use crate::grants::grant_error::GrantError;
use crate::managed::sync::{SYNC_REPLY_WAIT, SyncHandle, SyncNowReply};

/// Connections one uid may hold open at once (a follower each, typically).
const MAX_CONNECTIONS_PER_UID: usize = 16;
/// How far back `audit tail` looks for records matching a filter.
const TAIL_SCAN_RECORDS: usize = 20_000;

/// What the control server needs from the daemon.
#[derive(Debug)]
pub(crate) struct ControlContext {
    /// The decision core (policy, counters, names).
    pub decider: Arc<Decider>,
    /// The store (outbox stats).
    pub store: Arc<Mutex<Store>>,
    /// The audit log's directory.
    pub audit_dir: PathBuf,
    /// Members may see everything.
    pub admin_group: String,
    /// When the daemon started.
    pub started: Instant,
    /// The last audit sequence number written.
    pub audit_last_seq: Arc<AtomicU64>,
    /// The decision queue's capacity.
    pub queue_capacity: usize,
    /// Audit events dropped because the audit queue was full.
    pub audit_dropped: Arc<AtomicU64>,
    /// The platform sync, when the daemon is managed.
    pub sync: Option<Arc<SyncHandle>>,
    /// Prompts, justifications, approval requests, offline codes.
    pub flows: Arc<Flows>,
    /// Time-boxed admin sessions.
    pub admin_sessions: Arc<crate::grants::admin_session::AdminSessions>,
    /// Open connections per uid, over both transports (start empty).
    pub connections: ConnectionCounts,
    /// The kernel exec hook's state and the exposures it leaves.
    pub kernel_hook: crate::exec::kernel_hook::SharedStatus,
}

/// Binds the control socket: any local user may connect (permissions are
/// decided per request from the peer's uid), so it is mode 0666 in a 0755
/// directory. A stale socket from a previous run is replaced.
pub(crate) fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another epmd is listening on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Open control connections per uid, shared by both transports.
pub(crate) type ConnectionCounts = Arc<Mutex<HashMap<u32, usize>>>;

/// Serves the socket on a thread; each connection gets its own thread.
pub(crate) fn serve(
    listener: UnixListener,
    context: Arc<ControlContext>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("epm-control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(arrival) = stream.and_then(Arrival::socket) else {
                    continue;
                };
                let context = context.clone();
                let spawned = std::thread::Builder::new()
                    .name("epm-client".into())
                    .spawn(move || serve_connection(arrival, &context));
                if let Err(error) = spawned {
                    tracing::warn!(%error, "cannot start a thread for a control connection");
                }
            }
        })
}

/// Serves the XPC Mach service `service` (macOS): the same requests as the
/// socket, each peer on a thread of its own. With `peer_requirement`, XPC
/// drops any peer whose code signature does not satisfy it, so only our
/// signed helper and `epmctl` get through. The listener stops when the
/// returned value is dropped.
#[cfg(target_os = "macos")]
pub(crate) fn serve_xpc(
    service: &str,
    peer_requirement: Option<&str>,
    context: Arc<ControlContext>,
) -> Result<epm_ipc::xpc::XpcListener, epm_ipc::xpc::XpcError> {
    epm_ipc::xpc::XpcListener::start(service, peer_requirement, move |connection| {
        // Already on a thread of its own.
        serve_connection(Arrival::xpc(connection), &context);
    })
}

/// Serves one client of either transport: counts it against its uid's
/// quota (shared by both; over it, the client is told so), runs the
/// handshake, then its requests.
fn serve_connection(arrival: Arrival, context: &ControlContext) {
    let peer = arrival.peer();
    let accountable = accountable_uid(&peer);
    let per_uid = &context.connections;
    {
        let Ok(mut counts) = per_uid.lock() else {
            return;
        };
        let count = counts.entry(accountable).or_default();
        if *count >= MAX_CONNECTIONS_PER_UID {
            drop(counts);
            tracing::warn!(
                uid = peer.uid,
                "too many control connections from one user; refusing"
            );
            arrival.refuse(
                ErrorCode::TryLater,
                &format!(
                    "too many connections from your user ({MAX_CONNECTIONS_PER_UID} open); close some (an `epmctl audit tail -f`?) and try again"
                ),
            );
            return;
        }
        *count += 1;
    }
    // The handshake bounds the wait for a hello itself.
    let accepted = arrival.accept(env!("CARGO_PKG_VERSION"), |p| {
        is_admin(p, &context.admin_group)
    });
    match accepted {
        Ok(mut connection) => {
            if let Err(error) = handle_requests(&mut connection, context) {
                tracing::debug!(uid = peer.uid, %error, "control connection closed");
            }
        }
        Err(error) => tracing::info!(uid = peer.uid, %error, "control connection refused"),
    }
    if let Ok(mut counts) = per_uid.lock()
        && let Some(count) = counts.get_mut(&accountable)
    {
        *count = count.saturating_sub(1);
    }
}

/// Who an `elevate` request is for: only the sudo plugin sends it, from
/// inside sudo, which runs it as root. So the peer must be root (a user's
/// own client never is: the kernel reports the effective uid at connect),
/// and on Linux the peer process's real uid (sudo's invoking user) must be
/// the user it names. `Err` says why not, for the caller and the audit.
fn sudo_plugin_caller(
    peer: PeerCredentials,
    via: ElevationVia,
    for_uid: Option<u32>,
) -> Result<u32, String> {
    if via != ElevationVia::Sudo {
        return Err("elevate is the sudo plugin's request; epmctl run sends run".into());
    }
    if peer.uid != 0 {
        return Err(
            "elevate is accepted only from the sudo plugin, which sudo runs as root".into(),
        );
    }
    let Some(uid) = for_uid else {
        return Ok(0);
    };
    if cfg!(target_os = "linux") {
        let real = peer.pid.and_then(real_uid_of);
        if real != Some(uid) {
            return Err(format!(
                "elevate for uid {uid} from a process whose real uid is {}: not sudo run by that user",
                real.map_or_else(|| "unknown".to_owned(), |r| r.to_string())
            ));
        }
    }
    Ok(uid)
}

/// The real uid of process `pid` (Linux), from `/proc/PID/status`.
fn real_uid_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    crate::gate::procfs::parse_status(&text).map(|s| s.uid)
}

/// The uid a connection counts against: the peer's, except that root's
/// connections from a process run by a user (sudo's plugin) count against
/// that user, so no user can fill root's quota with waiting sudo commands.
fn accountable_uid(peer: &PeerCredentials) -> u32 {
    if peer.uid == 0 && cfg!(target_os = "linux") {
        return peer.pid.and_then(real_uid_of).unwrap_or(0);
    }
    peer.uid
}

/// Audits a request refused for who sent it.
fn audit_refused_request(context: &ControlContext, peer: PeerCredentials, kind: &str, why: &str) {
    let mut event = epm_audit::AuditEvent::new("request_refused").with_detail("request", kind);
    event.uid = Some(peer.uid);
    event.user = context
        .decider
        .names()
        .user(peer.uid)
        .map(|n| n.to_string());
    event.pid = peer.pid;
    event.reason = Some(why.to_owned());
    event.decision = Some("deny".into());
    event.device_id = Some(context.decider.device_id().to_owned());
    tracing::warn!(uid = peer.uid, kind, why, "request refused");
    context.flows.audit_event(event);
}

/// root, or a member of the admin group.
fn is_admin(peer: &PeerCredentials, admin_group: &str) -> bool {
    if peer.uid == 0 {
        return true;
    }
    let Ok(Some(group)) = nix::unistd::Group::from_name(admin_group) else {
        return false;
    };
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid)) else {
        return false;
    };
    user.gid == group.gid || group.mem.contains(&user.name)
}

/// Serves one connection's requests in turn: those that hold the
/// connection (audit follow, subscribe, elevate, run) here, every other one
/// by its single reply ([`answer`]).
fn handle_requests(
    connection: &mut ServerConnection,
    context: &ControlContext,
) -> Result<(), epm_ipc::ServerError> {
    while let Some(incoming) = connection.next_request()? {
        let request = match incoming {
            Incoming::Request(request) => request,
            Incoming::Unsupported(kind) => {
                connection.send(&error(
                    ErrorCode::Unsupported,
                    format!("this epmd does not know the request {kind:?}; upgrade epmd"),
                ))?;
                continue;
            }
        };
        match request {
            Request::Hello { .. } => {}
            Request::AuditTail {
                lines,
                follow,
                decision,
                user,
            } => {
                let filter = match AuditFilter::new(connection, decision, user) {
                    Ok(filter) => filter,
                    Err(message) => {
                        connection.send(&error(ErrorCode::BadRequest, message))?;
                        continue;
                    }
                };
                audit_tail(connection, context, &filter, lines as usize, follow)?;
            }
            Request::Subscribe => return subscribe(connection, &context.flows),
            request @ Request::Elevate { .. } => serve_elevate(connection, context, request)?,
            request @ Request::Run { .. } => serve_run(connection, context, request)?,
            request => {
                let response = answer(context, connection.peer, connection.is_admin, request);
                connection.send(&response)?;
            }
        }
    }
    Ok(())
}

/// The reply to a request answered at once: the daemon's state, or a
/// grant service's result.
fn answer(
    context: &ControlContext,
    peer: PeerCredentials,
    is_admin: bool,
    request: Request,
) -> Response {
    let uid = peer.uid;
    match request {
        Request::Status => Response::Status(status(context)),
        Request::PolicyShow => policy_show(context, is_admin),
        Request::PolicyExplain {
            path,
            sha256,
            user,
            groups,
        } => explain(context, peer, is_admin, path, sha256, user, groups),
        Request::Sync => sync_now(context),
        Request::Signal { .. } | Request::Resize(_) => error(
            ErrorCode::BadRequest,
            "signal and resize only while a command started by run is running",
        ),
        request => answer_grants(context, uid, is_admin, request),
    }
}

/// The reply to a request of the grant services (flows, admin sessions):
/// their result, or their error as the wire's.
fn answer_grants(context: &ControlContext, uid: u32, is_admin: bool, request: Request) -> Response {
    let flows = &context.flows;
    match request {
        Request::Justify {
            prompt,
            path,
            reason,
        } => reply(
            flows
                .justify(uid, prompt, path, &reason)
                .map(Response::Justified),
        ),
        Request::RequestApproval {
            prompt,
            path,
            reason,
            start,
            end,
        } => reply(
            flows
                .request_approval(uid, prompt, path, &reason, start, end)
                .map(Response::RequestCreated),
        ),
        Request::OfflineChallenge {
            path,
            reason,
            start,
            end,
        } => reply(
            flows
                .offline_challenge(uid, path, &reason, start, end)
                .map(|challenge| Response::Challenge {
                    challenge: challenge.text,
                    device_id: challenge.device_id,
                }),
        ),
        Request::OfflineCode { code } => {
            reply(flows.offline_code(uid, &code).map(Response::Granted))
        }
        Request::ListRequests { all } | Request::ListGrants { all } if all && !is_admin => {
            forbidden(
                "only root and members of the admin group may list everyone's requests and grants",
            )
        }
        Request::ListRequests { all } => reply(
            flows
                .list_requests(uid, all)
                .map(|requests| Response::Requests { requests }),
        ),
        Request::ListGrants { all } => reply(
            flows
                .list_grants(uid, all)
                .map(|grants| Response::Grants { grants }),
        ),
        Request::AdminStart {
            minutes,
            reason,
            window,
        } => context
            .admin_sessions
            .begin(uid, minutes, reason.as_deref(), window)
            .map_or_else(unmet_reply, Response::AdminSession),
        Request::AdminStatus { all } if all && !is_admin => {
            forbidden("only root and members of the admin group may list everyone's admin sessions")
        }
        Request::AdminStatus { all } => Response::AdminSessions {
            sessions: context.admin_sessions.status(uid, all),
        },
        Request::AdminEnd => reply(context.admin_sessions.end(uid).map(Response::AdminSession)),
        // Served by handle_requests, which holds the connection for them.
        _ => error(
            ErrorCode::Internal,
            "this request is served on its connection, not answered here",
        ),
    }
}

/// [`Request::PolicyShow`]: the policy in force, for admins only.
fn policy_show(context: &ControlContext, is_admin: bool) -> Response {
    if is_admin {
        let mut info = policy_info(&context.decider);
        let policy = context.decider.policy();
        match crate::managed::policy_source::document_in_force(&policy, &context.store) {
            Some(document) => {
                info.document = Some(document);
                Response::Policy(info)
            }
            None => error(
                ErrorCode::NotFound,
                "the policy in force is not in the store (it could not be saved; see the daemon's log)",
            ),
        }
    } else {
        forbidden("only root and members of the admin group may read the policy")
    }
}

/// [`Request::Run`]: decides the elevation, then runs the command on the
/// caller's descriptors (or a pty) and audits its start and end.
fn serve_run(
    connection: &mut ServerConnection,
    context: &ControlContext,
    request: Request,
) -> Result<(), epm_ipc::ServerError> {
    let Request::Run {
        command,
        cwd,
        env,
        reason,
        window,
        tty,
    } = request
    else {
        return Ok(());
    };
    // The caller's stdin, stdout and stderr follow in the stream:
    // take them first, whatever is decided.
    let stdio = connection.recv_fds(3)?;
    let uid = connection.peer.uid;
    let mut allowed = match context.flows.elevate(
        uid,
        ElevationVia::Run,
        &command,
        None,
        reason.as_deref(),
        window,
    ) {
        Ok(allowed) => allowed,
        Err(unmet) => {
            connection.send(&unmet_reply(unmet))?;
            return Ok(());
        }
    };
    let Some(program) = allowed.program.take() else {
        connection.send(&error(ErrorCode::Internal, "no program was checked"))?;
        return Ok(());
    };
    let spec = crate::control::runner::RunSpec::new(
        &command,
        program,
        cwd.clone(),
        &env,
        tty,
        allowed.rule_id.clone(),
    );
    let started = spec.and_then(|spec| {
        crate::control::runner::run(connection, spec, stdio, |pid| {
            audit_run(
                context,
                "elevation_started",
                &allowed,
                (uid, pid),
                &command,
                &cwd,
            )
            .send();
        })
    });
    match started {
        Ok(end) => audit_run_end(context, &allowed, uid, &command, &cwd, &end),
        Err(crate::control::runner::RunError::Connection(error)) => return Err(error),
        Err(error) => {
            tracing::info!(uid, program = %command.program, %error, "run refused");
            connection.send(&error.response())?;
        }
    }
    Ok(())
}

/// [`Request::Elevate`] (the sudo plugin): only root's sudo may name
/// another user; answers with the verdict.
fn serve_elevate(
    connection: &mut ServerConnection,
    context: &ControlContext,
    request: Request,
) -> Result<(), epm_ipc::ServerError> {
    let Request::Elevate {
        via,
        command,
        reason,
        window,
        for_uid,
        env,
        edit,
    } = request
    else {
        return Ok(());
    };
    let uid = match sudo_plugin_caller(connection.peer, via, for_uid) {
        Ok(uid) => uid,
        Err(refusal) => {
            audit_refused_request(context, connection.peer, "elevate", &refusal);
            connection.send(&error(ErrorCode::Forbidden, refusal))?;
            return Ok(());
        }
    };
    let sudo = SudoRequest {
        env: &env,
        edit: edit.as_deref(),
    };
    let response =
        match context
            .flows
            .elevate(uid, via, &command, Some(sudo), reason.as_deref(), window)
        {
            Ok(allowed) => Response::Elevation(ElevationVerdict::Allowed {
                rule_id: allowed.rule_id,
                grant_id: allowed.met.grant_id,
            }),
            Err(unmet) => unmet_reply(unmet),
        };
    connection.send(&response)?;
    Ok(())
}

/// A grant service's answer as the wire reply: its result, or its error.
fn reply(result: Result<Response, GrantError>) -> Response {
    result.unwrap_or_else(Response::from)
}

/// An unmet elevation as the answer on the socket.
fn unmet_reply(unmet: Unmet) -> Response {
    match unmet {
        Unmet::Verdict(verdict) => Response::Elevation(*verdict),
        Unmet::Refused(error) => Response::from(error),
    }
}

/// The one place a refused grant, flow or elevation becomes a wire reply.
impl From<GrantError> for Response {
    fn from(error: GrantError) -> Response {
        let code = match &error {
            GrantError::BadRequest(_) => ErrorCode::BadRequest,
            GrantError::NotFound(_) => ErrorCode::NotFound,
            GrantError::Forbidden(_) => ErrorCode::Forbidden,
            GrantError::Conflict(_) => ErrorCode::Conflict,
            GrantError::TryLater(_) => ErrorCode::TryLater,
            GrantError::Internal(_) => ErrorCode::Internal,
        };
        Response::error(code, error.to_string())
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error {
        code,
        message: message.into(),
    }
}

fn forbidden(message: &str) -> Response {
    error(ErrorCode::Forbidden, message)
}

fn policy_info(decider: &Decider) -> PolicyInfo {
    let policy = decider.policy();
    PolicyInfo {
        source: policy.source.clone(),
        version: policy.engine.version(),
        rule_count: policy.engine.rule_count() as u64,
        loaded_at: policy.loaded_at.to_string(),
        document: None,
    }
}

/// `epmctl sync`: any user may trigger a check-in (it reveals nothing and
/// changes nothing but timing); [`SyncHandle::sync_now`] runs one at a time.
fn sync_now(context: &ControlContext) -> Response {
    let Some(sync) = &context.sync else {
        return error(
            ErrorCode::NotFound,
            "this epmd is not managed: its configuration has no [platform] table",
        );
    };
    let outcome = match sync.sync_now(SYNC_REPLY_WAIT) {
        SyncNowReply::Done(Ok(message)) => SyncOutcome {
            ok: true,
            running: false,
            message,
        },
        SyncNowReply::Done(Err(message)) => SyncOutcome {
            ok: false,
            running: false,
            message,
        },
        SyncNowReply::StillRunning => SyncOutcome {
            ok: false,
            running: true,
            message: format!(
                "the sync has not finished after {}s; it goes on (see epmctl status)",
                SYNC_REPLY_WAIT.as_secs()
            ),
        },
        SyncNowReply::Busy => SyncOutcome {
            ok: false,
            running: true,
            message: "a sync asked for by another client is already running; try again shortly"
                .into(),
        },
    };
    Response::Synced(outcome)
}

fn platform_status(sync: &SyncHandle) -> PlatformStatus {
    let status = sync.status();
    PlatformStatus {
        url: sync.url.clone(),
        agent_id: status.agent_id,
        last_sync_at: status.last_sync_at.map(|t| t.to_string()),
        last_ok: status.last_result.as_ref().map(Result::is_ok),
        last_result: status.last_result.map(|r| match r {
            Ok(summary) => summary,
            Err(error) => error,
        }),
        next_sync_at: status.next_sync_at.map(|t| t.to_string()),
        acked_seq: status.acked_seq,
    }
}

fn status(context: &ControlContext) -> StatusReport {
    let decider = &context.decider;
    let c = &decider.counters;
    let outbox = context
        .store
        .lock()
        .ok()
        .and_then(|s| s.outbox_stats().ok())
        .unwrap_or_default();
    StatusReport {
        mode: decider.mode().as_str().to_owned(),
        fail_mode: decider.fail_mode().as_str().to_owned(),
        device_id: decider.device_id().to_owned(),
        uptime_secs: context.started.elapsed().as_secs(),
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        policy: policy_info(decider),
        counters: WireCounters {
            execs_seen: Counters::get(&c.execs_seen),
            allowed: Counters::get(&c.allowed),
            denied: Counters::get(&c.denied),
            would_deny: Counters::get(&c.would_deny),
            cache_hits: Counters::get(&c.cache_hits),
            cache_misses: Counters::get(&c.cache_misses),
            queue_depth: Counters::get(&c.queue_depth),
            queue_capacity: context.queue_capacity as u64,
            fail_mode_answers: Counters::get(&c.fail_mode_answers),
            overflow: Counters::get(&c.overflow),
            over_share: Counters::get(&c.over_share),
            hash_budget: Counters::get(&c.hash_budget),
            unstable_content: Counters::get(&c.unstable_content),
            worker_panics: Counters::get(&c.worker_panics),
            audit_dropped: context.audit_dropped.load(Ordering::Relaxed),
        },
        latency_us: Latency {
            p50: decider.latency.quantile_us(0.50),
            p99: decider.latency.quantile_us(0.99),
            max: decider
                .latency
                .quantile_us(1.0)
                .map(|_| decider.latency.max_us()),
        },
        audit_last_seq: context.audit_last_seq.load(Ordering::Relaxed),
        audit_outbox_pending: outbox.pending,
        audit_outbox_bytes: outbox.bytes,
        platform: context
            .sync
            .as_deref()
            .map(|sync| Box::new(platform_status(sync))),
        kernel_hook: Some(crate::exec::kernel_hook::snapshot(&context.kernel_hook)),
    }
}

fn explain(
    context: &ControlContext,
    peer: PeerCredentials,
    is_admin: bool,
    path: String,
    sha256: Option<String>,
    user: Option<String>,
    groups: Option<Vec<String>>,
) -> Response {
    let names = context.decider.names();
    let own_name = names.user(peer.uid).map(|n| n.to_string());
    if !is_admin
        && (user.as_ref().is_some_and(|u| Some(u) != own_name.as_ref()) || groups.is_some())
    {
        return forbidden(
            "only root and members of the admin group may explain for other users or groups",
        );
    }
    let sha256 = match sha256
        .as_deref()
        .map(str::parse::<Sha256Digest>)
        .transpose()
    {
        Ok(digest) => digest,
        Err(e) => return error(ErrorCode::BadRequest, format!("sha256: {e}")),
    };
    let user_name = user.or(own_name).unwrap_or_default();
    let account = epm_os::users::Account::by_name(&user_name);
    let groups = groups.unwrap_or_else(|| {
        account
            .as_ref()
            .map(epm_os::users::Account::group_names)
            .unwrap_or_default()
    });
    let subject = Subject {
        path,
        sha256,
        ..crate::grants::subject::of_user(crate::grants::subject::Asker {
            uid: account.as_ref().map_or(peer.uid, |a| a.uid),
            user: user_name.clone(),
            groups: groups.clone(),
            device_id: context.decider.device_id().to_owned(),
        })
    };
    let decision = context.decider.policy().engine.evaluate(&subject);
    Response::Explanation(Explanation {
        action: decision.action.as_str().to_owned(),
        rule_id: decision.rule_id.as_deref().map(str::to_owned),
        reason: decision.reason(),
        criterion: decision.criterion.map(|c| c.as_str().to_owned()),
        scope: decision.scope.map(|s| s.as_str().to_owned()),
        message: decision.message.as_deref().map(str::to_owned),
        policy_version: decision.policy_version,
        sha256: sha256.map(|d| d.to_string()),
        user: user_name,
        groups,
        device_id: context.decider.device_id().to_owned(),
    })
}

/// Which audit records a caller gets.
struct AuditFilter {
    /// Non-admins only ever see records of their own uid.
    only_uid: Option<u32>,
    user: Option<String>,
    decision: Option<String>,
}

impl AuditFilter {
    fn new(
        connection: &ServerConnection,
        decision: Option<String>,
        user: Option<String>,
    ) -> Result<Self, String> {
        if let Some(d) = &decision
            && !["allow", "deny", "would_deny"].contains(&d.as_str())
        {
            return Err(format!(
                "decision {d:?}: expected allow, deny or would_deny"
            ));
        }
        Ok(Self {
            only_uid: (!connection.is_admin).then_some(connection.peer.uid),
            user,
            decision,
        })
    }

    fn admits(&self, line: &str) -> bool {
        let Ok(record) = AuditRecord::parse(line) else {
            return false;
        };
        let event = &record.event;
        self.only_uid.is_none_or(|uid| event.uid == Some(uid))
            && self
                .user
                .as_ref()
                .is_none_or(|u| event.user.as_ref() == Some(u))
            && self
                .decision
                .as_ref()
                .is_none_or(|d| event.decision.as_ref() == Some(d))
    }
}

fn audit_tail(
    connection: &mut ServerConnection,
    context: &ControlContext,
    filter: &AuditFilter,
    lines: usize,
    follow: bool,
) -> Result<(), epm_ipc::ServerError> {
    // Start following before reading the tail, so no record falls between.
    let mut follower = if follow {
        match Follower::from_end(&context.audit_dir) {
            Ok(follower) => Some(follower),
            Err(e) => {
                return connection.send(&error(ErrorCode::Internal, format!("audit log: {e}")));
            }
        }
    } else {
        None
    };
    if lines > 0 {
        let scan = lines
            .saturating_mul(20)
            .clamp(1000, TAIL_SCAN_RECORDS)
            .max(lines);
        match epm_audit::tail(&context.audit_dir, scan) {
            Ok(recent) => {
                // What the tail shows, the follower must not show again.
                if let Some(follower) = &mut follower
                    && let Some(seq) = recent
                        .iter()
                        .rev()
                        .find_map(|l| AuditRecord::parse(l).ok().map(|r| r.seq))
                {
                    follower.skip_through(seq);
                }
                let mut matching: Vec<String> =
                    recent.into_iter().filter(|l| filter.admits(l)).collect();
                let keep = matching.len().saturating_sub(lines);
                matching.drain(..keep);
                for chunk in matching.chunks(256) {
                    connection.send(&Response::AuditRecords {
                        lines: chunk.to_vec(),
                    })?;
                }
            }
            Err(e) => {
                return connection.send(&error(ErrorCode::Internal, format!("audit log: {e}")));
            }
        }
    }
    let Some(follower) = &mut follower else {
        return connection.send(&Response::End);
    };
    loop {
        // Waiting on the socket doubles as the poll interval and notices a
        // client that went away (readable at end of stream, or hung up).
        if client_gone(connection.readiness(), Duration::from_millis(200)) {
            return Ok(());
        }
        let fresh = match follower.poll() {
            Ok(lines) => lines,
            Err(e) => {
                return connection.send(&error(ErrorCode::Internal, format!("audit log: {e}")));
            }
        };
        let matching: Vec<String> = fresh.into_iter().filter(|l| filter.admits(l)).collect();
        if !matching.is_empty() {
            connection.send(&Response::AuditRecords { lines: matching })?;
        }
    }
}

/// Serves a helper's subscription: its user's events until it goes away.
/// The connection carries nothing else from here on.
fn subscribe(connection: &mut ServerConnection, flows: &Flows) -> Result<(), epm_ipc::ServerError> {
    let uid = connection.peer.uid;
    let (id, events) = flows.subscribe(uid);
    tracing::info!(uid, client = %connection.client, "helper subscribed");
    let result = (|| {
        connection.send(&Response::Subscribed { uid })?;
        loop {
            match events.recv_timeout(Duration::from_millis(200)) {
                Ok(event) => connection.send(&Response::Event(event))?,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                // Dropped for not reading: close, the helper reconnects.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            if client_gone(connection.readiness(), Duration::ZERO) {
                return Ok(());
            }
        }
    })();
    flows.unsubscribe(uid, id);
    tracing::info!(uid, "helper left");
    result
}

/// Whether the client closed its end, waiting at most `wait` to find out.
fn client_gone(readiness: BorrowedFd<'_>, wait: Duration) -> bool {
    let mut fds = [PollFd::new(readiness, PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(wait.as_millis() as i32).unwrap_or(PollTimeout::ZERO);
    match poll(&mut fds, timeout) {
        // A following client sends nothing more: readable means end of stream.
        Ok(n) if n > 0 => true,
        Ok(_) => false,
        Err(nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// An `epmctl run` command's start or end, for the audit.
struct RunRecord<'a> {
    context: &'a ControlContext,
    event: epm_audit::AuditEvent,
}

impl RunRecord<'_> {
    fn send(self) {
        self.context.flows.audit_event(self.event);
    }
}

fn audit_run<'a>(
    context: &'a ControlContext,
    kind: &str,
    allowed: &crate::grants::flows::ElevationAllowed,
    (uid, pid): (u32, u32),
    command: &epm_ipc::Command,
    cwd: &str,
) -> RunRecord<'a> {
    let mut event = epm_audit::AuditEvent::new(kind)
        .with_detail("via", "run")
        .with_detail("run_as", command.run_as.as_str())
        .with_string_list("argv", &command.argv)
        .with_detail("cwd", cwd);
    if let Some(text) = &allowed.met.justification {
        event = event.with_detail("justification", text.as_str());
    }
    if allowed.path != command.program {
        event = event.with_detail("requested_path", command.program.as_str());
    }
    event.pid = Some(pid);
    event.uid = Some(uid);
    event.user = Some(allowed.user.clone());
    event.path = Some(allowed.path.clone());
    event.rule_id = allowed.rule_id.clone();
    event.device_id = Some(context.decider.device_id().to_owned());
    RunRecord { context, event }
}

/// Audits a finished `epmctl run` command: how it ended and how long it
/// took.
fn audit_run_end(
    context: &ControlContext,
    allowed: &crate::grants::flows::ElevationAllowed,
    uid: u32,
    command: &epm_ipc::Command,
    cwd: &str,
    end: &crate::control::runner::RunEnd,
) {
    let mut record = audit_run(
        context,
        "elevation_ended",
        allowed,
        (uid, end.pid),
        command,
        cwd,
    );
    let mut event = record
        .event
        .with_detail("duration_ms", end.duration.as_millis() as u64)
        .with_detail("caller_left", end.caller_left)
        .with_detail("on_pty", end.on_pty);
    if let Some(code) = end.status.code {
        event = event.with_detail("exit_code", code);
    }
    if let Some(signal) = end.status.signal {
        event = event.with_detail("signal", signal);
    }
    record.event = event;
    record.send();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_grant_becomes_the_error_reply_of_its_kind_with_its_message() {
        let cases = [
            (GrantError::BadRequest("b".into()), ErrorCode::BadRequest),
            (GrantError::NotFound("n".into()), ErrorCode::NotFound),
            (GrantError::Forbidden("f".into()), ErrorCode::Forbidden),
            (GrantError::Conflict("c".into()), ErrorCode::Conflict),
            (GrantError::TryLater("t".into()), ErrorCode::TryLater),
            (GrantError::Internal("i".into()), ErrorCode::Internal),
        ];
        for (refused, code) in cases {
            let message = refused.to_string();
            assert_eq!(Response::from(refused), Response::error(code, message));
        }
    }
}
