//! The messages, and turning frame bodies into them. Every message is a
//! JSON object whose `type` names it in snake case; the other fields are
//! the variant's. The crate documentation has the compatibility rules.

pub mod elevation;
pub mod flows;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::frame::{FrameError, MAX_FRAME_BYTES};

/// The protocol version both sides speak, sent in [`Request::Hello`] and
/// [`Response::Welcome`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Client → daemon.
///
/// Adding a variant (a new request) is compatible: older daemons answer it
/// with [`ErrorCode::Unsupported`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The first message on every connection, answered by
    /// [`Response::Welcome`], or by an [`ErrorCode::VersionMismatch`] error
    /// and a closed connection.
    ///
    /// `{"type":"hello","protocol":1,"client":"epmctl 0.1.0"}`
    Hello {
        /// The client's protocol version ([`PROTOCOL_VERSION`]).
        protocol: u32,
        /// Who is talking, e.g. `epmctl 0.1.0`, for the daemon's log.
        client: String,
    },
    /// The daemon's state and counters → [`Response::Status`].
    ///
    /// `{"type":"status"}`
    Status,
    /// Recent audit records → zero or more [`Response::AuditRecords`]
    /// batches, then [`Response::End`]; with `follow`, no `End`: new records
    /// keep coming until the client closes the connection. Non-admins only
    /// ever get their own records.
    ///
    /// `{"type":"audit_tail","lines":20,"follow":false,"decision":"deny","user":null}`
    AuditTail {
        /// How many of the most recent (matching) records.
        lines: u32,
        /// Keep streaming new records.
        follow: bool,
        /// Only records with this decision (`allow`, `deny`, `would_deny`).
        decision: Option<String>,
        /// Only this user's records (admins; others always get their own).
        user: Option<String>,
    },
    /// The policy in force, with its document → [`Response::Policy`]
    /// (admins only; others get [`ErrorCode::Forbidden`]).
    ///
    /// `{"type":"policy_show"}`
    PolicyShow,
    /// Decide an executable against the live policy →
    /// [`Response::Explanation`]. Non-admins may only explain for
    /// themselves, with their own groups.
    ///
    /// `{"type":"policy_explain","path":"/usr/bin/curl","sha256":null,"user":null,"groups":null}`
    PolicyExplain {
        /// Absolute path of the executable.
        path: String,
        /// Its SHA-256 (hex), computed by the client: the daemon never reads
        /// a file on a caller's behalf (it runs as root, the caller may not).
        sha256: Option<String>,
        /// Decide as this user (default: the caller).
        user: Option<String>,
        /// Decide with these groups (default: the user's).
        groups: Option<Vec<String>>,
    },
    /// Check in with the management platform now → [`Response::Synced`]
    /// once the cycle ends (or after about a minute, saying it still runs).
    /// Any user may ask; one at a time. An unmanaged daemon answers
    /// [`ErrorCode::NotFound`].
    ///
    /// `{"type":"sync"}`
    Sync,
    /// Become this user's helper: answered by [`Response::Subscribed`],
    /// then [`Response::Event`]s for the caller's uid only, until the
    /// connection closes. Use another connection for requests.
    ///
    /// `{"type":"subscribe"}`
    Subscribe,
    /// Justify a program that a `justify` rule holds → [`Response::Justified`]
    /// with a one-shot grant for the caller. Names either a prompt the
    /// caller's helper received or a path (from `epmctl`; the daemon hashes
    /// the file, which must be executable by the caller).
    ///
    /// `{"type":"justify","prompt":7,"path":null,"reason":"Debugging ticket 42"}`
    Justify {
        /// A [`crate::Prompt`]'s id.
        #[serde(default)]
        prompt: Option<u64>,
        /// Or the program's absolute path.
        #[serde(default)]
        path: Option<String>,
        /// Why.
        reason: String,
    },
    /// Ask approvers to let the caller run a program that an `approve` rule
    /// holds, inside a window → [`Response::RequestCreated`]. Sent to the
    /// platform at the next sync (at once when it is reachable).
    ///
    /// `{"type":"request_approval","prompt":null,"path":"/usr/bin/nc","reason":"...","start":"...","end":"..."}`
    RequestApproval {
        /// A [`crate::Prompt`]'s id.
        #[serde(default)]
        prompt: Option<u64>,
        /// Or the program's absolute path.
        #[serde(default)]
        path: Option<String>,
        /// Why.
        reason: String,
        /// Window start (at most a few minutes in the past).
        start: jiff::Timestamp,
        /// Window end.
        end: jiff::Timestamp,
    },
    /// Without the platform: make a challenge for an administrator →
    /// [`Response::Challenge`]. Its answer, a code, goes in
    /// [`Request::OfflineCode`].
    ///
    /// `{"type":"offline_challenge","path":"/usr/bin/nc","reason":"...","start":"...","end":"..."}`
    OfflineChallenge {
        /// The program's absolute path.
        path: String,
        /// Why (audited; the administrator hears it from the user).
        reason: String,
        /// Window start.
        start: jiff::Timestamp,
        /// Window end.
        end: jiff::Timestamp,
    },
    /// An administrator's answer to one of the caller's challenges →
    /// [`Response::Granted`]. Each code works once; wrong codes are
    /// limited per user.
    ///
    /// `{"type":"offline_code","code":"7G2KD-QX4M1"}`
    OfflineCode {
        /// The code, `XXXXX-XXXXX`.
        code: String,
    },
    /// The caller's approval requests, newest first → [`Response::Requests`].
    /// Admins may ask for everyone's.
    ///
    /// `{"type":"list_requests","all":false}`
    ListRequests {
        /// Everyone's (admins only).
        #[serde(default)]
        all: bool,
    },
    /// The caller's grants that are current or ahead → [`Response::Grants`].
    ///
    /// `{"type":"list_grants","all":false}`
    ListGrants {
        /// Everyone's (admins only).
        #[serde(default)]
        all: bool,
    },
    /// May `for_uid` run `command` as another user? From the sudo
    /// approval plugin only → [`Response::Elevation`]. An allowed answer
    /// has already used any grant it needed: it is good for one run.
    ///
    /// Only root may send it (sudo runs the plugin as root), and `epmd`
    /// checks that the sending process's real uid is `for_uid` (sudo's
    /// invoking user): a user's own client cannot write `via: sudo`
    /// records. `epmctl run` uses [`Request::Run`].
    ///
    /// `{"type":"elevate","via":"sudo","for_uid":1000,"command":{"program":"/usr/bin/apt","argv":["apt","update"],"run_as":"root"},"env":["PATH=/usr/bin"]}`
    Elevate {
        /// What asks.
        via: elevation::ElevationVia,
        /// The command.
        command: elevation::Command,
        /// The user's justification, once asked for.
        #[serde(default)]
        reason: Option<String>,
        /// The approval window, once asked for.
        #[serde(default)]
        window: Option<elevation::Window>,
        /// The user sudo runs the command for (its real uid).
        #[serde(default)]
        for_uid: Option<u32>,
        /// The whole environment sudo will give the command (`run_envp`,
        /// `NAME=value` each).
        #[serde(default)]
        env: Vec<String>,
        /// For `sudoedit`: the files to edit (the command is then sudo's
        /// editor, which is not what is decided).
        #[serde(default)]
        edit: Option<Vec<String>>,
    },
    /// Run `command` privileged, for the caller (`epmctl run`). On the Unix
    /// socket the frame is followed by one byte carrying the caller's
    /// stdin, stdout and stderr (SCM_RIGHTS). Answered by
    /// [`Response::Elevation`] when it may not run (yet), else by
    /// [`Response::Started`], then, while it runs, the client may send
    /// [`Request::Signal`] and [`Request::Resize`], and the daemon ends with
    /// [`Response::Exited`].
    ///
    /// `{"type":"run","command":{...},"cwd":"/home/alice","env":{"LANG":"C.UTF-8"},"reason":null,"tty":{"rows":40,"cols":120}}`
    Run {
        /// The command.
        command: elevation::Command,
        /// The caller's working directory.
        cwd: String,
        /// Environment variables the caller passes (the daemon keeps only
        /// a safe list of names).
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
        /// The user's justification, once asked for.
        #[serde(default)]
        reason: Option<String>,
        /// The approval window, once asked for.
        #[serde(default)]
        window: Option<elevation::Window>,
        /// The caller's terminal size, when its stdin is a terminal.
        #[serde(default)]
        tty: Option<elevation::TermSize>,
    },
    /// Forward a signal to a command started by [`Request::Run`] on this
    /// connection: `INT`, `TERM`, `HUP`, `QUIT`, `TSTP`, `CONT`, `WINCH`,
    /// `USR1`, `USR2`. No answer.
    ///
    /// `{"type":"signal","signal":"INT"}`
    Signal {
        /// The signal's name, without `SIG`.
        signal: String,
    },
    /// The caller's terminal changed size. No answer.
    ///
    /// `{"type":"resize","rows":50,"cols":132}`
    Resize(elevation::TermSize),
    /// Start a time-boxed admin session for the caller →
    /// [`Response::AdminSession`], or [`Response::Elevation`] when it may
    /// not start (yet).
    ///
    /// `{"type":"admin_start","minutes":30,"reason":"Installing a printer driver"}`
    AdminStart {
        /// How long.
        minutes: u32,
        /// The user's justification, once asked for.
        #[serde(default)]
        reason: Option<String>,
        /// The approval window, once asked for.
        #[serde(default)]
        window: Option<elevation::Window>,
    },
    /// The caller's current admin session, or everyone's (admins) →
    /// [`Response::AdminSessions`].
    ///
    /// `{"type":"admin_status","all":false}`
    AdminStatus {
        /// Everyone's (admins only).
        #[serde(default)]
        all: bool,
    },
    /// End the caller's admin session now → [`Response::AdminSession`].
    ///
    /// `{"type":"admin_end"}`
    AdminEnd,
}

/// Daemon → client.
///
/// Unknown fields are ignored, not denied, so that a newer daemon can add
/// fields without breaking older clients; a new variant is only ever sent in
/// answer to a new request, which older clients do not send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The answer to [`Request::Hello`].
    ///
    /// `{"type":"welcome","protocol":1,"daemon_version":"0.1.0","uid":501,"is_admin":false}`
    Welcome {
        /// The daemon's protocol version.
        protocol: u32,
        /// The daemon's version.
        daemon_version: String,
        /// The uid the kernel reported for the client's end of the socket:
        /// what the daemon authorizes by, whatever the client claims.
        uid: u32,
        /// Whether that uid may see and do everything (root, admin group).
        is_admin: bool,
    },
    /// The answer to [`Request::Status`]; the report's fields sit next to
    /// `type`.
    ///
    /// `{"type":"status","mode":"enforce","fail_mode":"open","device_id":"host-1",...}`
    Status(StatusReport),
    /// One batch of audit records, in answer to [`Request::AuditTail`]: the
    /// audit log's JSON lines, verbatim, oldest first.
    ///
    /// `{"type":"audit_records","lines":["{\"seq\":41,...}","{\"seq\":42,...}"]}`
    AuditRecords {
        /// The records, one JSON document each.
        lines: Vec<String>,
    },
    /// The end of a finite stream (an [`Request::AuditTail`] without
    /// `follow`).
    ///
    /// `{"type":"end"}`
    End,
    /// The answer to [`Request::PolicyShow`], with `document` set.
    ///
    /// `{"type":"policy","source":"file:/etc/epm/policy.json","version":7,"rule_count":3,"loaded_at":"2026-11-22T10:00:00Z","document":"{...}"}`
    Policy(PolicyInfo),
    /// The answer to [`Request::PolicyExplain`].
    ///
    /// `{"type":"explanation","action":"deny","rule_id":"no-curl","reason":"...",...}`
    Explanation(Explanation),
    /// The answer to [`Request::Sync`].
    ///
    /// `{"type":"synced","ok":true,"running":false,"message":"uploaded 3 audit records; policy version 7 now in force"}`
    Synced(SyncOutcome),
    /// The answer to [`Request::Subscribe`]: events follow.
    ///
    /// `{"type":"subscribed","uid":501}`
    Subscribed {
        /// Whose events.
        uid: u32,
    },
    /// Something for the subscribed user's helper.
    ///
    /// `{"type":"event","event":"prompt","id":7,"kind":"justify",...}`
    Event(flows::UserEvent),
    /// The answer to [`Request::Justify`].
    ///
    /// `{"type":"justified","program":"nc","grant":{...},"relaunch":null}`
    Justified(flows::Justified),
    /// The answer to [`Request::RequestApproval`].
    ///
    /// `{"type":"request_created","id":"…","state":"pending",...}`
    RequestCreated(flows::RequestInfo),
    /// The answer to [`Request::OfflineChallenge`].
    ///
    /// `{"type":"challenge","challenge":"EPM1-…","device_id":"mac-1"}`
    Challenge {
        /// The text to read to an administrator.
        challenge: String,
        /// This device, for the administrator's command.
        device_id: String,
    },
    /// The answer to [`Request::OfflineCode`].
    ///
    /// `{"type":"granted","id":3,...}`
    Granted(flows::GrantInfo),
    /// The answer to [`Request::ListRequests`].
    ///
    /// `{"type":"requests","requests":[...]}`
    Requests {
        /// Newest first.
        requests: Vec<flows::RequestInfo>,
    },
    /// The answer to [`Request::ListGrants`].
    ///
    /// `{"type":"grants","grants":[...]}`
    Grants {
        /// Soonest first.
        grants: Vec<flows::GrantInfo>,
    },
    /// The answer to [`Request::Elevate`], and to [`Request::Run`] and
    /// [`Request::AdminStart`] when they may not start (yet).
    ///
    /// `{"type":"elevation","verdict":"denied","rule_id":"no-shells","message":"..."}`
    Elevation(elevation::ElevationVerdict),
    /// The command of a [`Request::Run`] started.
    ///
    /// `{"type":"started","pid":4242,"rule_id":"apt"}`
    Started {
        /// Its process id.
        pid: u32,
        /// The deciding rule.
        #[serde(default)]
        rule_id: Option<String>,
    },
    /// The command of a [`Request::Run`] ended; the last message.
    ///
    /// `{"type":"exited","code":0,"signal":null}`
    Exited(elevation::ExitStatus),
    /// An admin session: started, or ended.
    ///
    /// `{"type":"admin_session","id":3,"user":"alice","group":"admin",...}`
    AdminSession(elevation::AdminSessionInfo),
    /// The answer to [`Request::AdminStatus`].
    ///
    /// `{"type":"admin_sessions","sessions":[...]}`
    AdminSessions {
        /// Sessions not ended, soonest end first.
        sessions: Vec<elevation::AdminSessionInfo>,
    },
    /// A request failed. The connection stays usable unless the daemon
    /// closes it (after a protocol violation).
    ///
    /// `{"type":"error","code":"forbidden","message":"only root and members of the admin group may read the policy"}`
    Error {
        /// The class of failure, for programs.
        code: ErrorCode,
        /// What went wrong, for a person.
        message: String,
    },
}

impl Response {
    /// A [`Response::Error`].
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }
}

/// Classes of failure, in [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or its arguments are invalid.
    BadRequest,
    /// The caller may not do this.
    Forbidden,
    /// What the request names does not exist.
    NotFound,
    /// This daemon does not know the request (it is older than the client).
    Unsupported,
    /// The daemon failed.
    Internal,
    /// The protocol versions are incompatible (the answer to `Hello`).
    VersionMismatch,
    /// Refused for now: too many tries, or a cool-down; try again later.
    TryLater,
    /// The thing asked for exists already (a pending request).
    Conflict,
    /// A code this side does not know, from a newer peer.
    #[serde(other)]
    Other,
}

/// The daemon's state, for `epmctl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `enforce` or `monitor`.
    pub mode: String,
    /// `open` or `closed`: what the daemon answers when it cannot decide.
    pub fail_mode: String,
    /// This device's id.
    pub device_id: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// The daemon's version.
    pub daemon_version: String,
    /// The policy in force (without its `document`).
    pub policy: PolicyInfo,
    /// Counters since start.
    pub counters: Counters,
    /// Decision latency, gate read to answer.
    pub latency_us: Latency,
    /// The last audit sequence number written.
    pub audit_last_seq: u64,
    /// Audit records in the store not yet uploaded.
    pub audit_outbox_pending: u64,
    /// Bytes of audit records the store holds.
    #[serde(default)]
    pub audit_outbox_bytes: u64,
    /// The management platform, when the daemon is managed.
    /// (Boxed: most daemons are standalone, and it would double every response's size.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Box<PlatformStatus>>,
    /// The kernel exec hook (Linux) and the exposures fanotify alone leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_hook: Option<KernelHookStatus>,
}

/// The kernel exec hook, in [`StatusReport`]: whether it runs, and for each
/// way to run a program that fanotify cannot see, whether it is covered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KernelHookStatus {
    /// `active`, `disabled` (by configuration) or `unavailable`.
    pub state: String,
    /// Why it is not active, or what it holds (its scope).
    pub detail: String,
    /// Each exposure and what closes it.
    pub exposures: Vec<ExposureStatus>,
    /// Execs the hook refused because it could not record them.
    pub unrecorded_refusals: u64,
}

/// One way to run a program that fanotify alone cannot see.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExposureStatus {
    /// `memfd`, `user_namespaces`, `fuse` or `loader`.
    pub name: String,
    /// `covered` (by the kernel hook), `closed` (by the machine's
    /// settings) or `open`.
    pub state: String,
    /// The setting that closes it without the hook.
    pub setting: String,
}

/// A managed daemon's link to its platform, in [`StatusReport`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlatformStatus {
    /// The platform's URL.
    pub url: String,
    /// The agent id from enrollment; `None` before it.
    pub agent_id: Option<String>,
    /// When the last sync ended (RFC 3339).
    pub last_sync_at: Option<String>,
    /// Whether it succeeded; `None` before the first.
    pub last_ok: Option<bool>,
    /// Its summary, or what failed.
    pub last_result: Option<String>,
    /// When the next is due (RFC 3339).
    pub next_sync_at: Option<String>,
    /// The highest audit seq the platform acknowledged.
    pub acked_seq: u64,
}

/// How an `epmctl sync` went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncOutcome {
    /// The cycle succeeded.
    pub ok: bool,
    /// It did not end in time and goes on in the daemon (`ok` is false).
    #[serde(default)]
    pub running: bool,
    /// Its summary, or what failed.
    pub message: String,
}

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// Where it came from: `file:/path`, `store`, `builtin`.
    pub source: String,
    /// Its `version`.
    pub version: u64,
    /// How many rules.
    pub rule_count: u64,
    /// When it was loaded (RFC 3339).
    pub loaded_at: String,
    /// The document as loaded (only in answers to `PolicyShow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<String>,
}

/// Counters since the daemon started. Missing counters read as zero, so a
/// client can read an older daemon's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Execs seen (the daemon's own excluded), including those the
    /// kernel answered from its cache; an interpreter load the gate
    /// answered from its loader's held allow is part of its program's.
    pub execs_seen: u64,
    /// Allowed.
    pub allowed: u64,
    /// Denied.
    pub denied: u64,
    /// Monitor mode: allowed but would have been denied.
    pub would_deny: u64,
    /// Decisions from the cache.
    pub cache_hits: u64,
    /// Decisions computed.
    pub cache_misses: u64,
    /// Execs waiting now.
    pub queue_depth: u64,
    /// The queue's capacity.
    pub queue_capacity: u64,
    /// Execs answered per fail mode.
    pub fail_mode_answers: u64,
    /// Execs refused because the queue was full.
    pub overflow: u64,
    /// Execs answered per fail mode because their user had more than their
    /// share of the decision queue.
    pub over_share: u64,
    /// Execs answered per fail mode because their user was over their
    /// hashing budget.
    pub hash_budget: u64,
    /// Execs answered per fail mode because the file changed while it was
    /// hashed, or stayed open for writing.
    pub unstable_content: u64,
    /// Decision panics caught.
    pub worker_panics: u64,
    /// Audit records lost because the audit queue was full (records dropped
    /// from the outbox for its disk budget are audited as `audit_dropped`).
    pub audit_dropped: u64,
}

/// Latency percentiles in microseconds; `None` (`null`) before the first
/// decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Maximum.
    pub max: Option<f64>,
}

/// A decision and why. The policy's enumerations travel as their names
/// (`epm_policy::Action::as_str` and friends), so an older client can still
/// show an action or criterion that a newer engine introduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// `allow`, `justify`, `approve` or `deny`.
    pub action: String,
    /// The deciding rule, `None` for the default action.
    pub rule_id: Option<String>,
    /// One line: which rule, by which criterion, for which scope.
    pub reason: String,
    /// The deciding criterion (`sha256`, `path_glob`, ...).
    pub criterion: Option<String>,
    /// How the scope matched (`general`, `device`, `group`, `user`).
    pub scope: Option<String>,
    /// The rule's message.
    pub message: Option<String>,
    /// The policy version that decided.
    pub policy_version: u64,
    /// The file's SHA-256, if the request carried one.
    pub sha256: Option<String>,
    /// The user decided for.
    pub user: String,
    /// The groups decided with.
    pub groups: Vec<String>,
    /// The device decided for.
    pub device_id: String,
}

/// A kind of message this crate decodes: [`Request`] (read by the daemon)
/// or [`Response`] (read by clients).
pub trait Message: Serialize + DeserializeOwned {
    /// Whether `kind` is the `type` of a message this build knows, which
    /// tells an unknown message (compatible: answer `unsupported`) from a
    /// malformed known one.
    fn knows_type(kind: &str) -> bool;

    /// This message's `type` on the wire.
    fn type_name(&self) -> &'static str;
}

// The `*Type` enums mirror the message enums' variants. `type_name` maps a
// message to its type exhaustively, so a new variant cannot be forgotten
// here, and serde names both alike, so `knows_type` needs no list kept by
// hand.

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RequestType {
    Hello,
    Status,
    AuditTail,
    PolicyShow,
    PolicyExplain,
    Sync,
    Subscribe,
    Justify,
    RequestApproval,
    OfflineChallenge,
    OfflineCode,
    ListRequests,
    ListGrants,
    Elevate,
    Run,
    Signal,
    Resize,
    AdminStart,
    AdminStatus,
    AdminEnd,
}

impl RequestType {
    fn name(self) -> &'static str {
        match self {
            RequestType::Hello => "hello",
            RequestType::Status => "status",
            RequestType::AuditTail => "audit_tail",
            RequestType::PolicyShow => "policy_show",
            RequestType::PolicyExplain => "policy_explain",
            RequestType::Sync => "sync",
            RequestType::Subscribe => "subscribe",
            RequestType::Justify => "justify",
            RequestType::RequestApproval => "request_approval",
            RequestType::OfflineChallenge => "offline_challenge",
            RequestType::OfflineCode => "offline_code",
            RequestType::ListRequests => "list_requests",
            RequestType::ListGrants => "list_grants",
            RequestType::Elevate => "elevate",
            RequestType::Run => "run",
            RequestType::Signal => "signal",
            RequestType::Resize => "resize",
            RequestType::AdminStart => "admin_start",
            RequestType::AdminStatus => "admin_status",
            RequestType::AdminEnd => "admin_end",
        }
    }
}

impl Message for Request {
    fn knows_type(kind: &str) -> bool {
        serde_json::from_value::<RequestType>(Value::String(kind.to_owned())).is_ok()
    }

    fn type_name(&self) -> &'static str {
        let kind = match self {
            Request::Hello { .. } => RequestType::Hello,
            Request::Status => RequestType::Status,
            Request::AuditTail { .. } => RequestType::AuditTail,
            Request::PolicyShow => RequestType::PolicyShow,
            Request::PolicyExplain { .. } => RequestType::PolicyExplain,
            Request::Sync => RequestType::Sync,
            Request::Subscribe => RequestType::Subscribe,
            Request::Justify { .. } => RequestType::Justify,
            Request::RequestApproval { .. } => RequestType::RequestApproval,
            Request::OfflineChallenge { .. } => RequestType::OfflineChallenge,
            Request::OfflineCode { .. } => RequestType::OfflineCode,
            Request::ListRequests { .. } => RequestType::ListRequests,
            Request::ListGrants { .. } => RequestType::ListGrants,
            Request::Elevate { .. } => RequestType::Elevate,
            Request::Run { .. } => RequestType::Run,
            Request::Signal { .. } => RequestType::Signal,
            Request::Resize(_) => RequestType::Resize,
            Request::AdminStart { .. } => RequestType::AdminStart,
            Request::AdminStatus { .. } => RequestType::AdminStatus,
            Request::AdminEnd => RequestType::AdminEnd,
        };
        kind.name()
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ResponseType {
    Welcome,
    Status,
    AuditRecords,
    End,
    Policy,
    Explanation,
    Synced,
    Subscribed,
    Event,
    Justified,
    RequestCreated,
    Challenge,
    Granted,
    Requests,
    Grants,
    Elevation,
    Started,
    Exited,
    AdminSession,
    AdminSessions,
    Error,
}

impl ResponseType {
    fn name(self) -> &'static str {
        match self {
            ResponseType::Welcome => "welcome",
            ResponseType::Status => "status",
            ResponseType::AuditRecords => "audit_records",
            ResponseType::End => "end",
            ResponseType::Policy => "policy",
            ResponseType::Explanation => "explanation",
            ResponseType::Synced => "synced",
            ResponseType::Subscribed => "subscribed",
            ResponseType::Event => "event",
            ResponseType::Justified => "justified",
            ResponseType::RequestCreated => "request_created",
            ResponseType::Challenge => "challenge",
            ResponseType::Granted => "granted",
            ResponseType::Requests => "requests",
            ResponseType::Grants => "grants",
            ResponseType::Elevation => "elevation",
            ResponseType::Started => "started",
            ResponseType::Exited => "exited",
            ResponseType::AdminSession => "admin_session",
            ResponseType::AdminSessions => "admin_sessions",
            ResponseType::Error => "error",
        }
    }
}

impl Message for Response {
    fn knows_type(kind: &str) -> bool {
        serde_json::from_value::<ResponseType>(Value::String(kind.to_owned())).is_ok()
    }

    fn type_name(&self) -> &'static str {
        let kind = match self {
            Response::Welcome { .. } => ResponseType::Welcome,
            Response::Status(_) => ResponseType::Status,
            Response::AuditRecords { .. } => ResponseType::AuditRecords,
            Response::End => ResponseType::End,
            Response::Policy(_) => ResponseType::Policy,
            Response::Explanation(_) => ResponseType::Explanation,
            Response::Synced(_) => ResponseType::Synced,
            Response::Subscribed { .. } => ResponseType::Subscribed,
            Response::Event(_) => ResponseType::Event,
            Response::Justified(_) => ResponseType::Justified,
            Response::RequestCreated(_) => ResponseType::RequestCreated,
            Response::Challenge { .. } => ResponseType::Challenge,
            Response::Granted(_) => ResponseType::Granted,
            Response::Requests { .. } => ResponseType::Requests,
            Response::Grants { .. } => ResponseType::Grants,
            Response::Elevation(_) => ResponseType::Elevation,
            Response::Started { .. } => ResponseType::Started,
            Response::Exited(_) => ResponseType::Exited,
            Response::AdminSession(_) => ResponseType::AdminSession,
            Response::AdminSessions { .. } => ResponseType::AdminSessions,
            Response::Error { .. } => ResponseType::Error,
        };
        kind.name()
    }
}

/// A message's frame body (JSON). Fails only for a body over
/// [`MAX_FRAME_BYTES`], which [`crate::write_frame`] would refuse.
pub fn encode(message: &impl Serialize) -> Result<Vec<u8>, FrameError> {
    // Serializing this crate's types cannot fail (string keys, derived
    // impls); the error path is for any other `Serialize` given.
    let body = serde_json::to_vec(message).map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            announced: body.len() as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(body)
}

/// A frame body → a message, or what is wrong with it: not JSON, not a
/// JSON object with a string `type`, a `type` this side does not know, or a
/// known type with invalid fields. Never panics, whatever the bytes.
pub fn decode<T: Message>(frame: &[u8]) -> Result<T, FrameError> {
    // Through `Value` first: the `type` must be read before deciding what
    // a failure means. serde_json's recursion limit bounds nesting.
    let value: Value =
        serde_json::from_slice(frame).map_err(|e| FrameError::NotJson(shorten(&e.to_string())))?;
    let kind = match &value {
        Value::Object(fields) => match fields.get("type") {
            Some(Value::String(kind)) => shorten(kind),
            Some(_) => {
                return Err(FrameError::NotAMessage(
                    "its \"type\" is not a string".into(),
                ));
            }
            None => return Err(FrameError::NotAMessage("it has no \"type\"".into())),
        },
        other => {
            return Err(FrameError::NotAMessage(format!(
                "it is a JSON {}, not an object",
                json_kind(other)
            )));
        }
    };
    serde_json::from_value(value).map_err(|e| {
        if T::knows_type(&kind) {
            FrameError::Invalid {
                kind,
                detail: shorten(&e.to_string()),
            }
        } else {
            FrameError::UnknownType(kind)
        }
    })
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Peer-chosen text (a type, a field name in serde's error, a client name)
/// is echoed into errors and logs; a hostile peer must not make those a
/// megabyte long.
pub(crate) fn shorten(text: &str) -> String {
    const MAX_CHARS: usize = 200;
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// One of each request.
    pub(crate) fn sample_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                protocol: 1,
                client: "x".into(),
            },
            Request::Status,
            Request::AuditTail {
                lines: 10,
                follow: true,
                decision: Some("deny".into()),
                user: None,
            },
            Request::PolicyShow,
            Request::PolicyExplain {
                path: "/bin/sh".into(),
                sha256: Some("ab".repeat(32)),
                user: Some("alice".into()),
                groups: Some(vec!["staff".into()]),
            },
            Request::Sync,
            Request::Subscribe,
            Request::Justify {
                prompt: Some(7),
                path: None,
                reason: "ticket 42".into(),
            },
            Request::RequestApproval {
                prompt: None,
                path: Some("/usr/bin/nc".into()),
                reason: "debugging".into(),
                start: jiff::Timestamp::UNIX_EPOCH,
                end: jiff::Timestamp::MAX,
            },
            Request::OfflineChallenge {
                path: "/usr/bin/nc".into(),
                reason: "debugging".into(),
                start: jiff::Timestamp::UNIX_EPOCH,
                end: jiff::Timestamp::MAX,
            },
            Request::OfflineCode {
                code: "7G2KD-QX4M1".into(),
            },
            Request::ListRequests { all: false },
            Request::ListGrants { all: true },
        ]
    }

    /// One of each response.
    pub(crate) fn sample_responses() -> Vec<Response> {
        let policy = PolicyInfo {
            source: "file:/etc/epm/policy.json".into(),
            version: 7,
            rule_count: 3,
            loaded_at: "2026-11-22T10:00:00Z".into(),
            document: Some("{\"version\":7}".into()),
        };
        vec![
            Response::Welcome {
                protocol: 1,
                daemon_version: "0.1.0".into(),
                uid: 501,
                is_admin: false,
            },
            Response::Status(StatusReport {
                mode: "enforce".into(),
                fail_mode: "open".into(),
                device_id: "mac-1".into(),
                uptime_secs: 5,
                daemon_version: "0.1.0".into(),
                policy: PolicyInfo {
                    document: None,
                    ..policy.clone()
                },
                counters: Counters {
                    execs_seen: 1,
                    allowed: 2,
                    denied: 3,
                    would_deny: 4,
                    cache_hits: 5,
                    cache_misses: 6,
                    queue_depth: 7,
                    queue_capacity: 8,
                    fail_mode_answers: 9,
                    overflow: 10,
                    over_share: 13,
                    hash_budget: 14,
                    unstable_content: 15,
                    worker_panics: 11,
                    audit_dropped: 12,
                },
                latency_us: Latency {
                    p50: Some(12.5),
                    p99: None,
                    max: Some(40.0),
                },
                audit_last_seq: 9,
                audit_outbox_pending: 2,
                audit_outbox_bytes: 4096,
                platform: Some(Box::new(PlatformStatus {
                    url: "https://epm.example.com".into(),
                    agent_id: Some("agent-1".into()),
                    last_sync_at: Some("2026-11-22T10:00:00Z".into()),
                    last_ok: Some(false),
                    last_result: Some("check-in: cannot connect".into()),
                    next_sync_at: Some("2026-11-22T10:00:05Z".into()),
                    acked_seq: 7,
                })),
                kernel_hook: Some(KernelHookStatus {
                    state: "unavailable".into(),
                    detail: "no BPF LSM".into(),
                    exposures: vec![ExposureStatus {
                        name: "memfd".into(),
                        state: "open".into(),
                        setting: "sysctl vm.memfd_noexec=2".into(),
                    }],
                    unrecorded_refusals: 0,
                }),
            }),
            Response::AuditRecords {
                lines: vec!["{\"seq\":1}".into(), "{}".into()],
            },
            Response::End,
            Response::Policy(policy),
            Response::Explanation(Explanation {
                action: "deny".into(),
                rule_id: Some("r".into()),
                reason: "why".into(),
                criterion: Some("name".into()),
                scope: Some("general".into()),
                message: None,
                policy_version: 7,
                sha256: None,
                user: "alice".into(),
                groups: vec![],
                device_id: "mac-1".into(),
            }),
            Response::Synced(SyncOutcome {
                ok: true,
                running: false,
                message: "uploaded 3 audit records".into(),
            }),
            Response::Subscribed { uid: 501 },
            Response::Event(flows::UserEvent::Prompt(flows::Prompt {
                id: 7,
                kind: flows::PromptKind::Approve,
                program: "nc".into(),
                path: "/usr/bin/nc".into(),
                argv: Some(vec!["nc".into(), "-l".into()]),
                rule_id: "nc".into(),
                message: Some("ask IT".into()),
                justification: epm_policy::JustificationSpec::default(),
                approval: Some(epm_policy::ApprovalSpec::default()),
            })),
            Response::Justified(flows::Justified {
                program: "nc".into(),
                grant: sample_grant(),
                relaunch: None,
            }),
            Response::RequestCreated(sample_request()),
            Response::Challenge {
                challenge: "EPM1-abc".into(),
                device_id: "mac-1".into(),
            },
            Response::Granted(sample_grant()),
            Response::Requests {
                requests: vec![sample_request()],
            },
            Response::Grants {
                grants: vec![sample_grant()],
            },
            Response::error(ErrorCode::Unsupported, "x"),
        ]
    }

    fn sample_grant() -> flows::GrantInfo {
        flows::GrantInfo {
            id: 3,
            user: "alice".into(),
            path: Some("/usr/bin/nc".into()),
            identity: format!("sha256:{}", "ab".repeat(32)),
            rule_id: "nc".into(),
            source: "justification".into(),
            not_before: jiff::Timestamp::UNIX_EPOCH,
            not_after: jiff::Timestamp::MAX,
            uses_left: 1,
            request_id: None,
        }
    }

    fn sample_request() -> flows::RequestInfo {
        flows::RequestInfo {
            id: "r-1".into(),
            user: "alice".into(),
            program: "nc".into(),
            path: "/usr/bin/nc".into(),
            identity: format!("sha256:{}", "ab".repeat(32)),
            rule_id: "nc".into(),
            justification: "debugging".into(),
            start: jiff::Timestamp::UNIX_EPOCH,
            end: jiff::Timestamp::MAX,
            state: "pending".into(),
            state_reason: None,
            submitted: false,
            created_at: jiff::Timestamp::UNIX_EPOCH,
            updated_at: jiff::Timestamp::UNIX_EPOCH,
        }
    }

    fn wire_type(message: &impl Serialize) -> String {
        let value = serde_json::to_value(message).unwrap();
        value["type"].as_str().unwrap().to_owned()
    }

    #[test]
    fn wire_format_is_tagged_snake_case() {
        let hello = Request::Hello {
            protocol: 1,
            client: "epmctl".into(),
        };
        assert_eq!(
            serde_json::to_string(&hello).unwrap(),
            r#"{"type":"hello","protocol":1,"client":"epmctl"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"type":"status"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::AuditTail {
                lines: 20,
                follow: false,
                decision: Some("deny".into()),
                user: None
            })
            .unwrap(),
            r#"{"type":"audit_tail","lines":20,"follow":false,"decision":"deny","user":null}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::error(ErrorCode::Forbidden, "no")).unwrap(),
            r#"{"type":"error","code":"forbidden","message":"no"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Welcome {
                protocol: 1,
                daemon_version: "0.1.0".into(),
                uid: 501,
                is_admin: false
            })
            .unwrap(),
            r#"{"type":"welcome","protocol":1,"daemon_version":"0.1.0","uid":501,"is_admin":false}"#
        );
    }

    #[test]
    fn every_message_round_trips() {
        let requests = sample_requests();
        for request in &requests {
            let frame = encode(request).unwrap();
            assert_eq!(&decode::<Request>(&frame).unwrap(), request);
        }
        let responses = sample_responses();
        for response in &responses {
            let frame = encode(response).unwrap();
            assert_eq!(&decode::<Response>(&frame).unwrap(), response);
        }
        // One sample per type: a new variant needs a new sample here.
        let request_types: BTreeSet<_> = requests.iter().map(Message::type_name).collect();
        assert_eq!(request_types.len(), requests.len());
        let response_types: BTreeSet<_> = responses.iter().map(Message::type_name).collect();
        assert_eq!(response_types.len(), responses.len());
    }

    #[test]
    fn type_names_match_the_wire() {
        for request in sample_requests() {
            assert_eq!(request.type_name(), wire_type(&request));
            assert!(Request::knows_type(request.type_name()));
        }
        for response in sample_responses() {
            assert_eq!(response.type_name(), wire_type(&response));
            assert!(Response::knows_type(response.type_name()));
        }
        assert!(!Request::knows_type("from_the_future"));
        assert!(!Request::knows_type("welcome"));
        assert!(!Request::knows_type("Status"), "names are exact");
    }

    #[test]
    fn decoding_names_what_is_wrong() {
        let err = |frame: &[u8]| decode::<Request>(frame).unwrap_err().to_string();
        assert_eq!(
            err(b"hello"),
            "frame is not JSON: expected value at line 1 column 1"
        );
        assert_eq!(
            err(b"{\"type\":\"status\""),
            "frame is not JSON: EOF while parsing an object at line 1 column 16"
        );
        assert!(err(b"\"\xff\"").starts_with("frame is not JSON"));
        assert_eq!(
            err(b"[\"status\"]"),
            "frame is not a message: it is a JSON array, not an object"
        );
        assert_eq!(err(b"{}"), "frame is not a message: it has no \"type\"");
        assert_eq!(
            err(b"{\"type\":5}"),
            "frame is not a message: its \"type\" is not a string"
        );
        assert_eq!(
            err(br#"{"type":"from_the_future","x":1}"#),
            "unknown message type \"from_the_future\""
        );
        assert_eq!(
            err(br#"{"type":"audit_tail","lines":-1,"follow":false}"#),
            "invalid audit_tail message: invalid value: integer `-1`, expected u32"
        );
        assert_eq!(
            err(br#"{"type":"audit_tail","lines":1,"follow":false,"usr":"bob"}"#),
            "invalid audit_tail message: unknown field `usr`, expected one of `lines`, `follow`, `decision`, `user`"
        );
        assert_eq!(
            err(br#"{"type":"hello","client":"x"}"#),
            "invalid hello message: missing field `protocol`"
        );
    }

    #[test]
    fn optional_request_fields_may_be_left_out() {
        assert_eq!(
            decode::<Request>(br#"{"type":"policy_explain","path":"/bin/ls"}"#).unwrap(),
            Request::PolicyExplain {
                path: "/bin/ls".into(),
                sha256: None,
                user: None,
                groups: None
            }
        );
    }

    #[test]
    fn responses_from_newer_and_older_daemons_still_decode() {
        // A newer daemon: extra fields, an error code we do not know.
        let welcome = decode::<Response>(
            br#"{"type":"welcome","protocol":1,"daemon_version":"9","uid":0,"is_admin":true,"features":["x"]}"#,
        )
        .unwrap();
        assert!(matches!(welcome, Response::Welcome { uid: 0, .. }));
        assert_eq!(
            decode::<Response>(br#"{"type":"error","code":"rate_limited","message":"slow down"}"#)
                .unwrap(),
            Response::error(ErrorCode::Other, "slow down")
        );
        // An older daemon: counters it did not have read as zero.
        let mut status = serde_json::to_value(&sample_responses()[1]).unwrap();
        let counters = status["counters"].as_object_mut().unwrap();
        counters.remove("audit_dropped");
        let fields = status.as_object_mut().unwrap();
        fields.remove("platform");
        fields.remove("audit_outbox_bytes");
        status["latency_us"] = serde_json::json!({});
        let Response::Status(report) = decode::<Response>(&encode(&status).unwrap()).unwrap()
        else {
            panic!("not a status");
        };
        assert_eq!(report.counters.audit_dropped, 0);
        assert_eq!(report.counters.worker_panics, 11);
        assert_eq!(report.latency_us, Latency::default());
        assert_eq!((report.platform, report.audit_outbox_bytes), (None, 0));
    }

    #[test]
    fn hostile_text_is_not_echoed_in_full() {
        let kind = "x".repeat(100_000);
        let frame = format!(r#"{{"type":"{kind}"}}"#);
        let err = decode::<Request>(frame.as_bytes()).unwrap_err().to_string();
        assert!(err.len() < 300, "{}", err.len());
        let field = "é".repeat(100_000);
        let frame = format!(r#"{{"type":"hello","protocol":1,"client":"x","{field}":1}}"#);
        let err = decode::<Request>(frame.as_bytes()).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid hello message: unknown field"),
            "{err}"
        );
        assert!(err.len() < 600, "{}", err.len());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        let mut frame = "[".repeat(1_000_000);
        frame.push_str(&"]".repeat(1_000_000));
        assert!(matches!(
            decode::<Request>(frame.as_bytes()),
            Err(FrameError::NotJson(_))
        ));
        let frame = format!(r#"{{"type":"status","x":{}}}"#, "[".repeat(200));
        assert!(matches!(
            decode::<Request>(frame.as_bytes()),
            Err(FrameError::NotJson(_))
        ));
    }

    proptest::proptest! {
        /// Whatever the bytes, decoding returns; it never panics.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = decode::<Request>(&bytes);
            let _ = decode::<Response>(&bytes);
        }

        /// Objects around the known types, with arbitrary fields and values.
        #[test]
        fn decoding_arbitrary_messages_never_panics(
            kind in "(hello|status|audit_tail|policy_show|policy_explain|welcome|error|[a-z_]{0,12})",
            fields in proptest::collection::vec(
                ("[a-z_]{1,10}", r#"(null|true|-?[0-9]{1,12}|"[^"\\]{0,8}"|\[\]|\{\}|\["x"\])"#),
                0..6,
            ),
        ) {
            let mut text = format!("{{\"type\":\"{kind}\"");
            for (name, value) in &fields {
                text.push_str(&format!(",\"{name}\":{value}"));
            }
            text.push('}');
            let _ = decode::<Request>(text.as_bytes());
            let _ = decode::<Response>(text.as_bytes());
        }
    }
}
