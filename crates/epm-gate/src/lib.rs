//! The exec-gate abstraction: how a platform hands execs to the daemon and
//! takes its answers back.
//!
//! A gate sees an exec before it happens and must answer it: fanotify
//! (`FAN_OPEN_EXEC_PERM`) on Linux, Endpoint Security (`AUTH_EXEC`) on macOS.
//! Both deliver an event that is answered later, possibly from another
//! thread, so a gate hands out [`PendingExec`] values that carry the facts
//! and know how to answer. The decision itself is platform-neutral
//! (the agent's decider): this crate knows its platform and nothing about
//! policy.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use epm_policy::{CdHash, PathOrigin};

#[cfg(target_os = "macos")]
pub mod endpoint_security;
pub mod es_guard;
pub mod es_map;
#[cfg(target_os = "linux")]
pub mod fanotify;
pub mod interp;
#[cfg(target_os = "linux")]
pub mod kernel_cache;
pub mod lease;
pub mod mountinfo;
pub mod procfs;

/// Puts a new policy in force for its owner (`put_in_force`), with
/// whatever must happen first under the same lock: the Linux gate empties
/// its kernel cache of allows there, so no allow the kernel remembers
/// outlives the policy that made it (`kernel_cache`). The gate knows a
/// policy only by its generation number. The owner (the daemon's decider)
/// gets it at construction, and routes its first policy and every change
/// through it.
pub trait PolicySwap: Send + Sync + std::fmt::Debug {
    /// The owner's first policy, in force from its construction: allows
    /// of this generation may be cached.
    fn starts_with(&self, generation: u64);
    /// Called once per policy change with the new generation; must call
    /// `put_in_force` exactly once.
    fn swap(&self, generation: u64, put_in_force: &mut dyn FnMut());
}

/// One version of one file: a change of content changes `mtime`/`ctime`
/// (and usually `size`), a replacement changes `ino`. Keys the hash and
/// decision caches, so a modified file can never reuse a stale decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    /// Device of the file system.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, nanoseconds since the epoch; cannot be set by a
    /// user, so it catches a content change with a forged mtime.
    pub ctime_ns: i64,
}

/// What keeps the executable's bytes from changing between the hash and
/// the run (see [`lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stability {
    /// Owned by root and writable by nobody else (no group or other write
    /// bit, which an ACL granting write would show): only root can change
    /// it, so no lease is taken (most execs: the system's programs).
    OnlyRootWrites,
    /// A read lease on the gate's handle (Linux), taken before the file
    /// was identified: nobody had the file open for writing, and nobody
    /// can open it for writing until the exec has denied writers itself.
    Leased,
    /// Someone had the file open for writing when the exec was seen, so
    /// no lease: the worker takes one once they are gone and hashes again
    /// under it, or answers per `fail_mode`.
    OpenForWriting,
    /// No lease here (another platform, a file system without leases):
    /// the file's version is compared before and after hashing.
    #[default]
    VersionChecked,
}

/// What a gate knows about one exec.
#[derive(Debug)]
pub struct ExecFacts {
    /// The exec'ing process.
    pub pid: u32,
    /// The file being executed.
    pub file: FileIdentity,
    /// Its path (lossy UTF-8). On Linux it is the kernel's name for the
    /// open file, so a file unlinked meanwhile ends in " (deleted)".
    pub path: String,
    /// Whose name `path` is: path, glob and name rules match only a path
    /// checked in the daemon's own mount namespace.
    pub path_origin: PathOrigin,
    /// What keeps the content from changing until the exec denies writers.
    pub stability: Stability,
    /// Real user id of the process: the user who ran the program, even
    /// through a setuid helper, which is whom a policy's user scope means.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// This event is not an exec but the interpreter load of this program,
    /// in the same exec (Linux: see [`interp`]): decided like any other,
    /// audited only when refused, since the program's own record stands for
    /// the exec.
    pub interpreter_of: Option<String>,
    /// The gate could not tell the process's supplementary groups
    /// (Endpoint Security carries only the uid and gid): the decision
    /// worker takes the user's from the user directory instead (cached).
    pub groups_from_directory: bool,
    /// Login (audit) uid: the human behind `sudo` or `su`, when known.
    pub login_uid: Option<u32>,
    /// The gate could let the kernel answer this file's next execs itself
    /// (Linux: [`kernel_cache`]; a file only root can write, with one link,
    /// on a local file system, at a path checked here) if the policy
    /// allows it for everyone: the decider then says whether it does.
    pub kernel_cache_candidate: bool,
    /// The process had exited when the gate read its exec (one the kernel
    /// answered from its cache): its user is not known.
    pub process_gone: bool,
    /// Parent process id (of the process as it execs: the new program's parent).
    pub ppid: u32,
    /// Parent's executable.
    pub parent_path: Option<String>,
    /// The new program's arguments (Endpoint Security knows them; fanotify does not).
    pub argv: Option<Vec<String>>,
    /// Apple code-signing facts; `None` on Linux.
    pub cdhash: Option<CdHash>,
    /// Apple team id.
    pub team_id: Option<String>,
    /// Code-signing identifier.
    pub signing_id: Option<String>,
    /// Bundle identifier.
    pub bundle_id: Option<String>,
    /// Apple platform binary flag.
    pub platform_binary: Option<bool>,
    /// A handle to read the executable's bytes for hashing. Reading it
    /// causes no gate events (fanotify: such descriptors are not notified).
    /// Closing it early is fine: the gate keeps what it needs to answer.
    pub content: Option<File>,
    /// Where to read the executable's bytes when the gate has no handle
    /// (Endpoint Security gives a path, and its handler must not open
    /// files): the decision worker opens it and checks it is still the file
    /// version `file`, so a file swapped in meanwhile is never hashed in its
    /// place.
    pub content_path: Option<PathBuf>,
}

impl ExecFacts {
    /// An exec of `path` (the file version `file`) by `pid`, with every other
    /// fact unknown: each gate fills in what its platform tells it.
    pub fn new(pid: u32, file: FileIdentity, path: String) -> Self {
        Self {
            pid,
            file,
            path,
            path_origin: PathOrigin::Local,
            stability: Stability::VersionChecked,
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            groups_from_directory: false,
            interpreter_of: None,
            login_uid: None,
            kernel_cache_candidate: false,
            process_gone: false,
            ppid: 0,
            parent_path: None,
            argv: None,
            cdhash: None,
            team_id: None,
            signing_id: None,
            bundle_id: None,
            platform_binary: None,
            content: None,
            content_path: None,
        }
    }

    /// Whether the executable's bytes can be read (to hash them).
    pub fn has_content(&self) -> bool {
        self.content.is_some() || self.content_path.is_some()
    }

    /// A handle on the executable's bytes: the gate's own, or `content_path`
    /// opened now. An opened file must be the version being executed (same
    /// device, inode, size, mtime and ctime), else this fails: hashing
    /// another file would bind the decision to the wrong content.
    pub fn content_handle(&self) -> std::io::Result<Option<Content<'_>>> {
        if let Some(file) = &self.content {
            return Ok(Some(Content::Borrowed(file)));
        }
        let Some(path) = &self.content_path else {
            return Ok(None);
        };
        use std::os::unix::fs::OpenOptionsExt;
        // No symlink in the last component (the gate's path is already
        // resolved), and never block opening a FIFO put in its place.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)?;
        let found = FileIdentity::of(&file.metadata()?);
        if found != self.file {
            return Err(std::io::Error::other(format!(
                "{} is no longer the file being executed (it changed or was replaced)",
                path.display()
            )));
        }
        Ok(Some(Content::Opened(file)))
    }
}

/// The executable's bytes, from [`ExecFacts::content_handle`].
#[derive(Debug)]
pub enum Content<'a> {
    /// The gate's handle.
    Borrowed(&'a File),
    /// Opened from `content_path`.
    Opened(File),
}

impl std::ops::Deref for Content<'_> {
    type Target = File;

    fn deref(&self) -> &File {
        match self {
            Content::Borrowed(file) => file,
            Content::Opened(file) => file,
        }
    }
}

impl FileIdentity {
    /// The identity of an open file now.
    pub fn of_file(file: &File) -> std::io::Result<Self> {
        Ok(Self::of(&file.metadata()?))
    }

    /// Whether this version may have been written again within the same
    /// timestamp tick as its last change (`changed_by` is when hashing
    /// began, nanoseconds since the epoch): file systems with coarse
    /// timestamps (1 to 2 s on FAT, a tick elsewhere) keep `mtime` and
    /// `ctime` across such a write, so a digest of a version this young is
    /// not remembered for later execs (as git does with "racily clean"
    /// index entries).
    pub fn is_racy(&self, changed_by: i64) -> bool {
        const COARSEST_TICK_NS: i64 = 2_000_000_000;
        self.ctime_ns.max(self.mtime_ns) >= changed_by.saturating_sub(COARSEST_TICK_NS)
    }

    /// The identity of a file from its metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            ctime_ns: meta
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.ctime_nsec()),
        }
    }
}

/// Which costly facts the policy in force needs. Gates skip the others on
/// the exec path; the daemon updates this whenever the policy changes, and
/// then calls [`FactNeeds::policy_changed`], which tells the gate (the
/// Endpoint Security gate empties its cache of answers).
pub struct FactNeeds {
    parent_path: AtomicBool,
    groups: AtomicBool,
    login_uid: AtomicBool,
    listeners: Mutex<Vec<PolicyListener>>,
}

/// Called after every policy change, on the thread that changed it.
pub type PolicyListener = Box<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for FactNeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FactNeeds")
            .field("parent_path", &self.parent_path())
            .field("groups", &self.groups())
            .field("login_uid", &self.login_uid())
            .finish_non_exhaustive()
    }
}

impl FactNeeds {
    /// Every fact: the safe default before a policy is known.
    pub fn all() -> Self {
        Self {
            parent_path: AtomicBool::new(true),
            groups: AtomicBool::new(true),
            login_uid: AtomicBool::new(true),
            listeners: Mutex::new(Vec::new()),
        }
    }

    /// Calls `listener` after every policy change from now on.
    pub fn on_policy_change(&self, listener: PolicyListener) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    /// The policy in force changed: tells every listener.
    pub fn policy_changed(&self) {
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            listener();
        }
    }

    /// Sets what the policy needs: the parent's executable (for
    /// `parent_path` rules) and supplementary groups (for group scopes).
    pub fn set(&self, parent_path: bool, groups: bool) {
        self.parent_path.store(parent_path, Ordering::Relaxed);
        self.groups.store(groups, Ordering::Relaxed);
    }

    /// Sets whether the login uid is wanted (by the audit, or a policy).
    pub fn set_login_uid(&self, login_uid: bool) {
        self.login_uid.store(login_uid, Ordering::Relaxed);
    }

    /// Whether the parent's executable is needed.
    pub fn parent_path(&self) -> bool {
        self.parent_path.load(Ordering::Relaxed)
    }

    /// Whether supplementary groups are needed.
    pub fn groups(&self) -> bool {
        self.groups.load(Ordering::Relaxed)
    }

    /// Whether the login uid is needed.
    pub fn login_uid(&self) -> bool {
        self.login_uid.load(Ordering::Relaxed)
    }
}

/// A gate's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the exec proceed.
    Allow,
    /// Make the exec fail (`EPERM` on Linux).
    Deny,
}

/// The platform half of answering one exec (fanotify: a response written
/// to the group; Endpoint Security: `es_respond_auth_result`).
pub trait Respond: Send {
    /// Delivers the verdict. Called exactly once.
    fn respond(self: Box<Self>, verdict: Verdict);

    /// Delivers a verdict the policy decided, saying whether the platform
    /// may remember it for the same file (`cacheable`: an allow that no
    /// grant, monitor mode or `fail_mode` gave). Called exactly once, instead
    /// of [`Respond::respond`]. Gates without such a cache ignore the hint.
    fn respond_decided(self: Box<Self>, verdict: Verdict, cacheable: bool) {
        let _ = cacheable;
        self.respond(verdict);
    }

    /// [`Respond::respond_decided`], saying too whether the policy decides
    /// this file alike for everyone (`per_file`: the policy generation it
    /// was decided under), so that a gate with a per-file cache in the
    /// kernel (Linux: [`kernel_cache`]) may let the kernel answer the
    /// file's next execs itself. Others ignore it.
    fn respond_decided_per_file(
        self: Box<Self>,
        verdict: Verdict,
        cacheable: bool,
        per_file: Option<u64>,
    ) {
        let _ = per_file;
        self.respond_decided(verdict, cacheable);
    }
}

/// Which platform cache let an exec run without asking the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    /// Endpoint Security's cache (macOS).
    EsCache,
    /// The kernel's ignore marks on files the policy allows for everyone
    /// (Linux: [`kernel_cache`]).
    KernelCache,
}

impl AnsweredBy {
    /// How audit records name it (`answered_by`).
    pub fn as_str(self) -> &'static str {
        match self {
            AnsweredBy::EsCache => "es_cache",
            AnsweredBy::KernelCache => "kernel_cache",
        }
    }

    /// What it is, in words, for a record's reason.
    pub fn what(self) -> &'static str {
        match self {
            AnsweredBy::EsCache => "the Endpoint Security cache",
            AnsweredBy::KernelCache => "the kernel's cache of allows",
        }
    }
}

/// Told of an exec dropped unanswered, after its fallback answer (see
/// [`PendingExec::reporting_drops_to`]): the daemon audits it. Called from
/// a `Drop`, maybe while a panic unwinds, so it must neither block nor
/// panic.
pub type DropReport = std::sync::Arc<dyn Fn(&ExecFacts, Verdict) + Send + Sync>;

/// An exec waiting for its answer. Answer it with [`PendingExec::answer`];
/// if it is dropped unanswered (a panic, a bug, shutdown) it answers with its
/// fallback verdict, so the kernel is never left waiting, and tells its
/// [`DropReport`], so the exec is not left out of the audit either.
pub struct PendingExec {
    /// What the gate saw.
    pub facts: ExecFacts,
    responder: Option<Box<dyn Respond>>,
    fallback: Verdict,
    observed: Option<AnsweredBy>,
    drop_report: Option<DropReport>,
}

impl std::fmt::Debug for PendingExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingExec")
            .field("facts", &self.facts)
            .field("fallback", &self.fallback)
            .field("observed", &self.observed)
            .finish_non_exhaustive()
    }
}

impl PendingExec {
    /// Wraps facts and a responder; `fallback` answers if this is dropped unanswered.
    pub fn new(facts: ExecFacts, responder: Box<dyn Respond>, fallback: Verdict) -> Self {
        Self {
            facts,
            responder: Some(responder),
            fallback,
            observed: None,
            drop_report: None,
        }
    }

    /// Tells `report` if this exec is dropped unanswered.
    #[must_use]
    pub fn reporting_drops_to(mut self, report: DropReport) -> Self {
        self.drop_report = Some(report);
        self
    }

    /// An exec the platform let run without asking, from its own cache of
    /// allows the daemon decided (Endpoint Security): nothing to answer,
    /// only to audit, like every other exec.
    pub fn observed(facts: ExecFacts) -> Self {
        Self::observed_from(facts, AnsweredBy::EsCache)
    }

    /// An exec that `cache` let run without asking the daemon: only to
    /// audit.
    pub fn observed_from(facts: ExecFacts, cache: AnsweredBy) -> Self {
        Self {
            facts,
            responder: None,
            fallback: Verdict::Allow,
            observed: Some(cache),
            drop_report: None,
        }
    }

    /// Whether this exec already ran ([`PendingExec::observed`]).
    pub fn is_observed(&self) -> bool {
        self.observed.is_some()
    }

    /// Which cache let this exec run, when it already ran.
    pub fn answered_by(&self) -> Option<AnsweredBy> {
        self.observed
    }

    /// Answers the exec. Consumes the value, so it cannot answer twice.
    pub fn answer(mut self, verdict: Verdict) {
        if let Some(responder) = self.responder.take() {
            responder.respond(verdict);
        }
    }

    /// Answers with a verdict the policy decided; `cacheable` as in
    /// [`Respond::respond_decided`].
    pub fn answer_decided(mut self, verdict: Verdict, cacheable: bool) {
        if let Some(responder) = self.responder.take() {
            responder.respond_decided(verdict, cacheable);
        }
    }

    /// Answers with a verdict the policy decided; `cacheable` and
    /// `per_file` as in [`Respond::respond_decided_per_file`].
    pub fn answer_per_file(mut self, verdict: Verdict, cacheable: bool, per_file: Option<u64>) {
        if let Some(responder) = self.responder.take() {
            responder.respond_decided_per_file(verdict, cacheable, per_file);
        }
    }
}

impl Drop for PendingExec {
    fn drop(&mut self) {
        if let Some(responder) = self.responder.take() {
            tracing::warn!(pid = self.facts.pid, path = %self.facts.path, verdict = ?self.fallback,
                "exec dropped unanswered; answering with the fallback verdict");
            responder.respond(self.fallback);
            if let Some(report) = self.drop_report.take() {
                report(&self.facts, self.fallback);
            }
        }
    }
}

/// How much nicer than everything else the threads on the exec path run
/// (Linux `nice`): every exec on the machine waits for them, so a user
/// whose own processes keep the CPUs busy (a flood of execs) must not be
/// able to slow them down for everyone else.
pub const EXEC_PATH_NICE: i32 = -10;

/// Raises the calling thread's scheduling priority to
/// [`EXEC_PATH_NICE`] (Linux: per thread; elsewhere nothing). A failure is
/// logged: the gate works without it, only less well under load.
pub fn raise_exec_path_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no arguments; setpriority takes plain integers
        // and, given a thread id, changes only that thread.
        let rc = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, EXEC_PATH_NICE)
        };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(),
                "cannot raise the exec path's scheduling priority");
        }
    }
}

/// Asks a running gate to stop, from any thread (a signal handler thread).
#[derive(Debug, Clone)]
pub struct Shutdown {
    requested: Arc<AtomicBool>,
    wake_read: Arc<OwnedFd>,
    wake_write: Arc<OwnedFd>,
}

impl Shutdown {
    /// A shutdown switch, not yet requested.
    pub fn new() -> std::io::Result<Self> {
        let (read, write) = nix::unistd::pipe().map_err(std::io::Error::from)?;
        for fd in [&read, &write] {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
            let flags =
                nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
            let fd_flags = nix::fcntl::FdFlag::FD_CLOEXEC;
            nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(fd_flags))?;
        }
        Ok(Self {
            requested: Arc::new(AtomicBool::new(false)),
            wake_read: Arc::new(read),
            wake_write: Arc::new(write),
        })
    }

    /// Requests the stop and wakes the gate's blocking wait.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = nix::unistd::write(&*self.wake_write, &[1]);
    }

    /// Whether a stop was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// A descriptor that becomes readable when a stop is requested, for a
    /// gate's poll loop.
    pub fn wake_fd(&self) -> &OwnedFd {
        &self.wake_read
    }
}

/// Why a gate could not run.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The platform refused to create the gate; the message says what to do.
    #[error("{0}")]
    Unavailable(String),
    /// A watch path's own mount could not be gated.
    #[error("cannot gate execs from the mount at {}: {source}", mount.display())]
    Mark {
        /// The mount point.
        mount: std::path::PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The platform sent something the gate cannot parse; the gate stops
    /// rather than leave execs it cannot find waiting.
    #[error("unexpected event format: {0}")]
    Protocol(String),
    /// An IO error while running.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A source of execs to decide.
///
/// `run` takes the sink as a `&mut dyn FnMut` so one gate type serves any
/// daemon wiring without generics leaking into `Box<dyn ExecGate>`.
pub trait ExecGate {
    /// Runs until `shutdown` is requested, handing every exec (but the
    /// daemon's own, which the gate allows itself) to `sink`. The sink must
    /// not block: it queues, or answers at once.
    ///
    /// Execs the platform has queued but not yet handed over when `run`
    /// returns are released by dropping the gate (fanotify: closing the
    /// group allows them), so drop it promptly after `run` returns.
    fn run(
        &mut self,
        sink: &mut dyn FnMut(PendingExec),
        shutdown: &Shutdown,
    ) -> Result<(), GateError>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn content_from_a_path_must_be_the_file_version_being_executed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"tool v1").unwrap();
        let identity = FileIdentity::of(&std::fs::metadata(&path).unwrap());
        let facts = ExecFacts {
            content_path: Some(path.clone()),
            ..ExecFacts::new(1, identity, path.display().to_string())
        };
        assert!(facts.has_content());
        let content = facts.content_handle().unwrap().unwrap();
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut &*content, &mut read).unwrap();
        assert_eq!(read, b"tool v1");
        drop(content);

        // Changed since the exec: refused, never hashed in its place.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b" v2")
            .unwrap();
        let error = facts.content_handle().unwrap_err();
        assert!(error.to_string().contains("no longer the file"), "{error}");

        // Replaced by a symlink: not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/bin/sh", &path).unwrap();
        assert!(facts.content_handle().is_err());

        let none = ExecFacts::new(1, identity, String::new());
        assert!(!none.has_content());
        assert!(none.content_handle().unwrap().is_none());
    }

    /// Sends its verdict down a channel.
    struct Answered(std::sync::mpsc::Sender<Verdict>);

    impl Respond for Answered {
        fn respond(self: Box<Self>, verdict: Verdict) {
            let _ = self.0.send(verdict);
        }
    }

    #[test]
    fn an_exec_dropped_unanswered_gets_its_fallback_and_is_reported_once() {
        let identity = FileIdentity::of(&std::fs::metadata("/").unwrap());
        let reported = Arc::new(Mutex::new(Vec::new()));
        let report: DropReport = {
            let reported = reported.clone();
            Arc::new(move |facts: &ExecFacts, verdict| {
                reported.lock().unwrap().push((facts.path.clone(), verdict));
            })
        };
        let (tx, answers) = std::sync::mpsc::channel();
        let exec = |path: &str| {
            PendingExec::new(
                ExecFacts::new(7, identity, path.to_owned()),
                Box::new(Answered(tx.clone())),
                Verdict::Deny,
            )
            .reporting_drops_to(report.clone())
        };

        drop(exec("/usr/bin/dropped"));
        assert_eq!(answers.try_recv().unwrap(), Verdict::Deny);
        exec("/usr/bin/answered").answer(Verdict::Allow);
        assert_eq!(answers.try_recv().unwrap(), Verdict::Allow);
        // A worker that panics holding an exec drops it while unwinding.
        let unwinding = exec("/usr/bin/panicked");
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _held = unwinding;
            panic!("a worker's bug");
        }));
        assert_eq!(answers.try_recv().unwrap(), Verdict::Deny);

        assert_eq!(
            *reported.lock().unwrap(),
            [
                ("/usr/bin/dropped".to_owned(), Verdict::Deny),
                ("/usr/bin/panicked".to_owned(), Verdict::Deny)
            ],
            "only the execs dropped unanswered are reported"
        );
    }

    #[test]
    fn policy_listeners_hear_every_change() {
        let needs = FactNeeds::all();
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = heard.clone();
        needs.on_policy_change(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        needs.policy_changed();
        needs.policy_changed();
        assert_eq!(heard.load(Ordering::SeqCst), 2);
    }
}
