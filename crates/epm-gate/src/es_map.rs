//! From an Endpoint Security exec to [`ExecFacts`], and from an
//! `es_new_client` failure to what the operator must do: plain data and
//! pure functions, so the logic is tested on Linux. The macOS gate
//! (`endpoint_security`) only copies the message into these structs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use epm_policy::CdHash;

use super::{ExecFacts, FileIdentity};

/// `CS_VALID` (`<kern/cs_blobs.h>`): the code signature is valid.
pub const CS_VALID: u32 = 0x0000_0001;
/// `CS_ADHOC`: signed without a certificate (no team, any identifier).
pub const CS_ADHOC: u32 = 0x0000_0002;
/// `CS_SIGNED`: the code has a signature at all.
pub const CS_SIGNED: u32 = 0x2000_0000;

/// `AU_DEFAUDITID`: the audit uid of a process no one logged in for
/// (daemons started by launchd).
pub const AU_DEFAUDITID: u32 = u32::MAX;

/// An `es_file_t`: the path and the `stat` Endpoint Security took.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EsFileInfo {
    /// The path, as bytes turned to lossy UTF-8.
    pub path: String,
    /// Endpoint Security cut the path (longer than it keeps).
    pub path_truncated: bool,
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_mtimespec` in nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// `st_ctimespec` in nanoseconds since the epoch.
    pub ctime_ns: i64,
}

/// An `es_process_t`, with its audit token taken apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EsProcessInfo {
    /// Its executable.
    pub executable: EsFileInfo,
    /// Code directory hash; all zeros when unsigned.
    pub cdhash: [u8; 20],
    /// `CS_*` code-signing flags.
    pub codesigning_flags: u32,
    /// Team id; empty when none.
    pub team_id: String,
    /// Signing identifier; empty when none.
    pub signing_id: String,
    /// Signed by Apple as part of the OS.
    pub is_platform_binary: bool,
    /// From the audit token: pid.
    pub pid: u32,
    /// From the audit token: pid version (changes on every exec), which
    /// with the pid names one program run, never a reused pid.
    pub pidversion: u32,
    /// From the audit token: real uid.
    pub ruid: u32,
    /// From the audit token: effective uid.
    pub euid: u32,
    /// From the audit token: real gid.
    pub rgid: u32,
    /// From the audit token: effective gid.
    pub egid: u32,
    /// From the audit token: audit (login) uid.
    pub auid: u32,
    /// Parent pid (`ppid`; the parent audit token's pid when given).
    pub ppid: u32,
    /// The parent's pid version, from its audit token (message version 4+).
    pub parent_pidversion: Option<u32>,
}

/// An `AUTH_EXEC` message: the process as it will be after the exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EsExecInfo {
    /// The new image (`event.exec.target`): the facts to decide on. Never
    /// the message's `process`, which is the image before the exec.
    pub target: EsProcessInfo,
    /// The new program's arguments.
    pub argv: Vec<String>,
    /// The parent's executable, when known.
    pub parent_path: Option<String>,
}

/// Maps an exec to the facts the decider works on.
///
/// Signing facts are kept only when the kernel says the signature is
/// valid; a team id and a signing id only for a certificate signature (an
/// ad-hoc signer picks any identifier, so it proves nothing). The file's
/// bytes are read by the decision worker from `content_path`, never here:
/// the handler does no IO.
pub fn exec_facts(exec: &EsExecInfo) -> ExecFacts {
    let target = &exec.target;
    let file = &target.executable;
    let identity = FileIdentity {
        dev: file.dev,
        ino: file.ino,
        size: file.size,
        mtime_ns: file.mtime_ns,
        ctime_ns: file.ctime_ns,
    };
    let flags = target.codesigning_flags;
    let valid = flags & CS_VALID != 0 && flags & CS_SIGNED != 0;
    let certified = valid && flags & CS_ADHOC == 0;
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    ExecFacts {
        uid: target.ruid,
        gid: target.rgid,
        groups_from_directory: true,
        login_uid: (target.auid != AU_DEFAUDITID).then_some(target.auid),
        ppid: target.ppid,
        parent_path: exec.parent_path.clone(),
        argv: Some(exec.argv.clone()),
        cdhash: (valid && target.cdhash != [0; 20]).then_some(CdHash(target.cdhash)),
        team_id: certified.then(|| non_empty(&target.team_id)).flatten(),
        signing_id: certified.then(|| non_empty(&target.signing_id)).flatten(),
        platform_binary: Some(target.is_platform_binary),
        // A cut path would hash some other file, or none.
        content_path: (!file.path_truncated && !file.path.is_empty())
            .then(|| PathBuf::from(&file.path)),
        ..ExecFacts::new(target.pid, identity, file.path.clone())
    }
}

/// Why `es_new_client` failed (`es_new_client_result_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewClientFailure {
    /// `ES_NEW_CLIENT_RESULT_ERR_INVALID_ARGUMENT`.
    InvalidArgument,
    /// `ES_NEW_CLIENT_RESULT_ERR_INTERNAL`.
    Internal,
    /// `ES_NEW_CLIENT_RESULT_ERR_NOT_ENTITLED`.
    NotEntitled,
    /// `ES_NEW_CLIENT_RESULT_ERR_NOT_PERMITTED`.
    NotPermitted,
    /// `ES_NEW_CLIENT_RESULT_ERR_NOT_PRIVILEGED`.
    NotPrivileged,
    /// `ES_NEW_CLIENT_RESULT_ERR_TOO_MANY_CLIENTS`.
    TooManyClients,
    /// A code this build does not know.
    Other(i64),
}

impl NewClientFailure {
    /// From the C enum's value.
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => Self::InvalidArgument,
            2 => Self::Internal,
            3 => Self::NotEntitled,
            4 => Self::NotPermitted,
            5 => Self::NotPrivileged,
            6 => Self::TooManyClients,
            other => Self::Other(other),
        }
    }
}

/// What an operator reads when the gate cannot start: what failed and what
/// to do about it.
pub fn new_client_error_message(failure: NewClientFailure) -> String {
    let what = match failure {
        NewClientFailure::NotEntitled => {
            "es_new_client: not entitled. epmd must be signed with the \
             com.apple.developer.endpoint-security.client entitlement (granted by Apple to the \
             signing team) and a provisioning profile that allows it; an unsigned or ad-hoc \
             build cannot gate execs"
                .to_owned()
        }
        NewClientFailure::NotPermitted => {
            "es_new_client: not permitted (TCC). epmd needs Full Disk Access: deploy the PPPC \
             profile pkg/profiles/pppc-epmd.mobileconfig (SystemPolicyAllFiles for epmd's code \
             requirement) through MDM, or allow epmd in System Settings > Privacy & Security > \
             Full Disk Access, then restart it: launchctl kickstart -k system/com.epm.epmd"
                .to_owned()
        }
        NewClientFailure::NotPrivileged => {
            "es_new_client: not privileged. epmd must run as root: start it as a launchd daemon \
             (/Library/LaunchDaemons/com.epm.epmd.plist), not from a user session"
                .to_owned()
        }
        NewClientFailure::TooManyClients => {
            "es_new_client: too many Endpoint Security clients. The system limit is reached: \
             remove or disable another Endpoint Security product (check \
             `systemextensionsctl list` and running ES daemons) or a stale epmd, then restart"
                .to_owned()
        }
        NewClientFailure::InvalidArgument => {
            "es_new_client: invalid argument. This is a bug in epmd's Endpoint Security gate; \
             report it with the macOS version"
                .to_owned()
        }
        NewClientFailure::Internal => {
            "es_new_client: internal error in Endpoint Security. Retry (launchd restarts the \
             daemon); if it persists, check `log show --predicate 'subsystem == \
             \"com.apple.endpointsecurity\"'` and reboot"
                .to_owned()
        }
        NewClientFailure::Other(code) => {
            format!("es_new_client failed with unknown result {code}; check the macOS version")
        }
    };
    format!("cannot start the Endpoint Security exec gate: {what}")
}

/// Something that wants to know when a process ends (elevated process
/// tracking will hang off this). Called on the Endpoint Security handler's
/// thread: it must not block.
pub trait ProcessObserver: Send + Sync {
    /// The process `pid`, run `pidversion`, has exited.
    fn exited(&self, pid: u32, pidversion: u32);
}

/// The executables of the processes the gate let run, by (pid, pid
/// version), so the parent of a later exec is known without asking the
/// kernel. Bounded: when `capacity` is reached (exits missed, execs that
/// failed after being allowed) it starts over, and parents are looked up
/// another way until they are seen again.
#[derive(Debug)]
pub struct ProcessTable {
    entries: Mutex<HashMap<(u32, u32), Arc<str>>>,
    capacity: usize,
}

impl ProcessTable {
    /// An empty table holding at most `capacity` processes.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// Remembers that run `pidversion` of `pid` is `path`.
    pub fn exec(&self, pid: u32, pidversion: u32, path: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&(pid, pidversion)) {
            entries.clear();
        }
        entries.insert((pid, pidversion), Arc::from(path));
    }

    /// The executable of run `pidversion` of `pid`, if known.
    pub fn path(&self, pid: u32, pidversion: u32) -> Option<Arc<str>> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(pid, pidversion))
            .cloned()
    }

    /// How many processes are known.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no process is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ProcessObserver for ProcessTable {
    fn exited(&self, pid: u32, pidversion: u32) {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(pid, pidversion));
    }
}

/// The execs Endpoint Security asked the daemon about (`AUTH_EXEC`), by
/// the new run's (pid, pid version), until their `NOTIFY_EXEC`. An exec
/// that is notified without having been asked was allowed from Endpoint
/// Security's cache of the daemon's allows: the gate hands it on to be
/// audited ([`super::PendingExec::observed`]), so every exec is audited,
/// as on Linux. Bounded: a denied exec is never notified, so the oldest
/// entries go first; one that goes before its notification (a flood of
/// denials meanwhile) is audited twice, never missed.
#[derive(Debug)]
pub struct AskedExecs {
    entries: Mutex<Asked>,
    capacity: usize,
}

/// A run: (pid, pid version).
type Run = (u32, u32);

/// The runs asked about, as a set and in the order they came.
type Asked = (HashSet<Run>, VecDeque<Run>);

impl AskedExecs {
    /// Remembers at most `capacity` execs.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new((HashSet::new(), VecDeque::new())),
            capacity: capacity.max(1),
        }
    }

    /// Endpoint Security asked about run `pidversion` of `pid`.
    pub fn asked(&self, pid: u32, pidversion: u32) {
        let mut guard = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *guard;
        if !set.insert((pid, pidversion)) {
            return;
        }
        order.push_back((pid, pidversion));
        // The order may still list runs already notified (forgotten from
        // the set only, so that forgetting is O(1)); a run's pid version
        // is never reused, so popping one of those forgets nothing else.
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                set.remove(&oldest);
            }
        }
    }

    /// Run `pidversion` of `pid` was executed: whether the daemon was
    /// asked about it (forgotten from here on). `false`: the cache let it
    /// run.
    pub fn executed(&self, pid: u32, pidversion: u32) -> bool {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .remove(&(pid, pidversion))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_notified_without_being_asked_came_from_the_cache() {
        let asked = AskedExecs::new(3);
        asked.asked(100, 1);
        assert!(asked.executed(100, 1), "asked, then run");
        assert!(!asked.executed(100, 1), "a second run of the same is news");
        assert!(!asked.executed(200, 1), "never asked: the cache let it run");
        // Denied execs are never notified: the oldest make room.
        for pid in 1..=4 {
            asked.asked(pid, 9);
        }
        assert!(
            !asked.executed(1, 9),
            "forgotten: audited twice, not missed"
        );
        assert!(asked.executed(4, 9));
        assert!(asked.executed(2, 9));
        // A run asked twice (a retried message) is remembered once.
        asked.asked(5, 1);
        asked.asked(5, 1);
        assert!(asked.executed(5, 1));
        assert!(!asked.executed(5, 1));
    }

    fn signed_exec() -> EsExecInfo {
        EsExecInfo {
            target: EsProcessInfo {
                executable: EsFileInfo {
                    path: "/Applications/Wireshark.app/Contents/MacOS/Wireshark".into(),
                    path_truncated: false,
                    dev: 16_777_230,
                    ino: 4242,
                    size: 1000,
                    mtime_ns: 1_700_000_000_000_000_001,
                    ctime_ns: 1_700_000_000_000_000_002,
                },
                cdhash: [0xab; 20],
                codesigning_flags: CS_VALID | CS_SIGNED,
                team_id: "7Z6EMTD2C6".into(),
                signing_id: "org.wireshark.Wireshark".into(),
                is_platform_binary: false,
                pid: 501,
                pidversion: 7,
                ruid: 502,
                euid: 0,
                rgid: 20,
                egid: 20,
                auid: 502,
                ppid: 400,
                parent_pidversion: Some(3),
            },
            argv: vec!["Wireshark".into(), "-k".into()],
            parent_path: Some("/bin/zsh".into()),
        }
    }

    #[test]
    fn a_validly_signed_exec_maps_every_fact_from_the_target() {
        let facts = exec_facts(&signed_exec());
        assert_eq!(facts.pid, 501);
        assert_eq!(
            facts.path,
            "/Applications/Wireshark.app/Contents/MacOS/Wireshark"
        );
        assert_eq!(
            facts.file,
            FileIdentity {
                dev: 16_777_230,
                ino: 4242,
                size: 1000,
                mtime_ns: 1_700_000_000_000_000_001,
                ctime_ns: 1_700_000_000_000_000_002,
            }
        );
        assert_eq!(
            (facts.uid, facts.gid, facts.login_uid),
            (502, 20, Some(502)),
            "the real uid: who ran it, even through setuid"
        );
        assert!(
            facts.groups.is_empty() && facts.groups_from_directory,
            "ES has no supplementary groups: the worker asks the directory"
        );
        assert_eq!(facts.ppid, 400);
        assert_eq!(facts.parent_path.as_deref(), Some("/bin/zsh"));
        assert_eq!(
            facts.argv,
            Some(vec!["Wireshark".to_owned(), "-k".to_owned()])
        );
        assert_eq!(facts.cdhash, Some(CdHash([0xab; 20])));
        assert_eq!(facts.team_id.as_deref(), Some("7Z6EMTD2C6"));
        assert_eq!(facts.signing_id.as_deref(), Some("org.wireshark.Wireshark"));
        assert_eq!(facts.platform_binary, Some(false));
        assert_eq!(facts.bundle_id, None);
        assert!(facts.content.is_none(), "no IO in the handler");
        assert_eq!(
            facts.content_path.as_deref(),
            Some(std::path::Path::new(
                "/Applications/Wireshark.app/Contents/MacOS/Wireshark"
            ))
        );
    }

    #[test]
    fn an_invalid_signature_proves_nothing() {
        let mut exec = signed_exec();
        exec.target.codesigning_flags = CS_SIGNED; // signed, but not valid
        let facts = exec_facts(&exec);
        assert_eq!(facts.cdhash, None);
        assert_eq!(facts.team_id, None);
        assert_eq!(facts.signing_id, None);
    }

    #[test]
    fn an_ad_hoc_signature_gives_a_cdhash_but_no_identity() {
        let mut exec = signed_exec();
        exec.target.codesigning_flags = CS_VALID | CS_SIGNED | CS_ADHOC;
        exec.target.team_id.clear();
        exec.target.signing_id = "com.apple.Safari".into(); // anyone can claim it
        let facts = exec_facts(&exec);
        assert_eq!(facts.cdhash, Some(CdHash([0xab; 20])));
        assert_eq!(facts.team_id, None);
        assert_eq!(facts.signing_id, None);
    }

    #[test]
    fn an_unsigned_exec_has_no_signing_facts() {
        let mut exec = signed_exec();
        exec.target.codesigning_flags = 0;
        exec.target.cdhash = [0; 20];
        exec.target.team_id.clear();
        exec.target.signing_id.clear();
        let facts = exec_facts(&exec);
        assert_eq!(
            (facts.cdhash, facts.team_id, facts.signing_id),
            (None, None, None)
        );
        // A valid flag with a zero cdhash is no cdhash either.
        exec.target.codesigning_flags = CS_VALID | CS_SIGNED;
        assert_eq!(exec_facts(&exec).cdhash, None);
    }

    #[test]
    fn daemons_have_no_login_uid_and_platform_binaries_say_so() {
        let mut exec = signed_exec();
        exec.target.auid = AU_DEFAUDITID;
        exec.target.is_platform_binary = true;
        exec.target.team_id.clear();
        exec.target.signing_id = "com.apple.ls".into();
        let facts = exec_facts(&exec);
        assert_eq!(facts.login_uid, None);
        assert_eq!(facts.platform_binary, Some(true));
        assert_eq!(facts.team_id, None);
        assert_eq!(facts.signing_id.as_deref(), Some("com.apple.ls"));
    }

    #[test]
    fn a_truncated_path_is_not_hashed() {
        let mut exec = signed_exec();
        exec.target.executable.path_truncated = true;
        assert_eq!(exec_facts(&exec).content_path, None);
    }

    #[test]
    fn every_new_client_failure_says_what_to_do() {
        let cases = [
            (3, "com.apple.developer.endpoint-security.client"),
            (4, "Full Disk Access"),
            (4, "PPPC"),
            (5, "root"),
            (5, "launchd"),
            (6, "another Endpoint Security"),
            (1, "bug"),
            (2, "Retry"),
            (99, "99"),
        ];
        for (code, needle) in cases {
            let message = new_client_error_message(NewClientFailure::from_code(code));
            assert!(
                message.contains(needle),
                "code {code}: {message:?} lacks {needle:?}"
            );
            assert!(message.starts_with("cannot start the Endpoint Security exec gate"));
        }
        assert_eq!(
            NewClientFailure::from_code(3),
            NewClientFailure::NotEntitled
        );
        assert_eq!(
            NewClientFailure::from_code(6),
            NewClientFailure::TooManyClients
        );
    }

    #[test]
    fn the_process_table_follows_runs_not_pids() {
        let table = ProcessTable::new(2);
        table.exec(10, 1, "/bin/zsh");
        table.exec(11, 1, "/usr/bin/ssh");
        assert_eq!(table.path(10, 1).as_deref(), Some("/bin/zsh"));
        assert_eq!(table.path(10, 2), None, "another run of the same pid");
        table.exited(10, 1);
        assert_eq!(table.path(10, 1), None);
        assert_eq!(table.len(), 1);
        table.exec(12, 1, "/fits");
        assert_eq!(table.len(), 2);
        // Full: it starts over rather than grow or refuse.
        table.exec(13, 1, "/over");
        assert_eq!(table.len(), 1);
        assert_eq!(table.path(13, 1).as_deref(), Some("/over"));
        assert_eq!(table.path(11, 1), None);
    }
}
