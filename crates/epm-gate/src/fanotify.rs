//! The Linux exec gate: fanotify `FAN_OPEN_EXEC_PERM` on every watched mount.
//!
//! Thin by design: read events, gather facts from the event fd and `/proc`,
//! hand them on, write answers. Everything else is platform-neutral.
//!
//! # The group
//! - `FAN_CLASS_CONTENT`: permission events for a file whose content is
//!   final (the pre-content class is for storage managers that fill files in).
//! - `FAN_UNLIMITED_QUEUE`: with a bounded queue the kernel, once the queue
//!   is full, drops new permission events *and lets those execs run*
//!   (measured here: with the limit at 4, 8 of 12 execs ran while the queue
//!   was not read). Unlimited, every exec waits for its answer; the queue's
//!   memory stays bounded by the processes blocked in it. Overload is the
//!   daemon's bounded queue's business, answered per its fail mode.
//! - `FAN_UNLIMITED_MARKS`: a container host can have more mounts than the
//!   default mark limit, and an unmarked mount is ungated.
//! - `FAN_REPORT_PIDFD` (Linux 5.15) when the kernel has it, else without.
//!   The pidfd pins the process: credentials come from it race-free
//!   (`PIDFD_GET_INFO`, Linux 6.13), and after any `/proc/PID` read a
//!   successful `pidfd_send_signal(0)` proves the pid was not reused
//!   meanwhile, so the facts are this process's.
//! - `FAN_CLOEXEC` and `O_CLOEXEC` event fds: a program the daemon starts
//!   must not inherit the group, or it would keep the group (and every exec
//!   waiting on it) alive after the daemon is gone. `FAN_NONBLOCK`: the group
//!   is polled with the mount table and the shutdown pipe.
//!
//! # The notification group
//! A second group, `FAN_CLASS_NOTIF` with the same flags otherwise
//! (`FAN_REPORT_PIDFD` when the first has it, so a notification's
//! credentials are as race-free as a permission event's), holds only the
//! kernel cache's `FAN_OPEN_EXEC` inode marks ([`super::kernel_cache`]):
//! never a mount or file-system mark, so it hears of nothing but execs of
//! cached files, and a flush of its inode marks empties it. Both groups
//! are made first ([`FanotifyGroups::create`]: a group without marks holds
//! up no exec), so the daemon's decider gets the kernel cache at
//! construction; the watch marks are placed later
//! ([`FanotifyGate::open_with`]), once the decision workers run. When the
//! kernel refuses the second group (root's `fs.fanotify.max_user_groups`
//! used up by other fanotify users), the gate runs without it and caches
//! nothing: every exec is asked in user space, slower and as safe.
//!
//! # One wake-up per exec
//! A dynamically linked exec of a cached program queues the program's
//! notification, then (the loader is never cached) the loader's
//! permission event. Were both woken for, that is two sleeps and wake-ups
//! of the gate's thread per exec (each some 10-20 µs of CPU and a context
//! switch). So the notification group does not wake the thread while
//! permission events flow:
//! - Every time the gate reads a buffer of permission events, it first
//!   drains the notification group, and handles those notifications
//!   before the permission events. A loader's event was queued after its
//!   program's notification, so any loader event in the buffer has its
//!   program's notification in the drain, and is paired with it
//!   ([`super::interp`]). (Draining *before* the permission read would
//!   miss a notification queued between the two reads.)
//! - Static programs, and cached execs on a machine otherwise quiet, have
//!   no permission event to ride on. The notification group is in the
//!   epoll set with `EPOLLONESHOT`: on an idle machine its first event
//!   wakes the thread at once. Once it has fired it stays disarmed, and
//!   the thread waits with a timeout of [`NOTIFICATIONS_READ_WITHIN`]
//!   instead, so under load a notification waits at most that long; a
//!   timeout that finds the group empty re-arms it (`EPOLL_CTL_MOD`, which
//!   reports an event that came meanwhile) and the thread blocks without
//!   a timeout again. Under a steady load of dynamic execs that is one
//!   wake-up per exec plus at most one tick per quiet spell; an idle
//!   machine has no periodic wake-ups.
//!
//! # A loader's load
//! The dynamic loader is never cached in the kernel (see
//! [`super::kernel_cache`], "Never the dynamic loader"), so a repeat exec of
//! a cached dynamic program still waits for the gate once, for its loader.
//! That wait is made as short as the kernel's own answer would allow: when
//! the loader's version (device, inode, size, mtime, ctime; owned by root,
//! writable by nobody else, one name) holds an allow the policy made for
//! everyone under the policy in force ([`KernelCache::allows_loader`]), and
//! the event is paired with the program the process just ran
//! ([`super::interp::InterpreterLoads::load_of`]), the gate answers at once,
//! after one `fstat` of the event: no path, credentials, decision or
//! record (an allowed interpreter load has none: its program's stands for
//! the exec). Any other loader event (a direct run, a changed loader, a
//! policy change since) goes the usual way.
//!
//! # Marks
//! Each watched mount gets `FAN_MARK_FILESYSTEM` when every mount of its
//! file system is within the watch paths (always, with the default `/`), so
//! bind mounts and the copies of the mount in other mount namespaces are
//! gated too: a mount mark lives on one mount object, and `unshare -m` (or an
//! unprivileged `unshare -Urm`) makes new ones. Otherwise it gets
//! `FAN_MARK_MOUNT`. Mounts that appear later are marked when the mount
//! table changes (`POLLPRI` on `/proc/self/mountinfo`).
//!
//! Not covered (known gaps):
//! - file systems mounted only in *other* mount namespaces: an unprivileged
//!   user with user namespaces can mount a tmpfs there and run programs from
//!   it unseen. Disable unprivileged user namespaces on managed endpoints
//!   (`user.max_user_namespaces = 0`, or Ubuntu's AppArmor restriction).
//! - a brand-new file system between its mount and our mark (a bind mount
//!   of a marked file system is covered at once);
//! - a mount hidden under another mount on the same mount point: marking
//!   resolves the path to the top one;
//! - file-system types not in the watched list (see
//!   [`mountinfo::WATCHED_FS_TYPES`] for why user FUSE mounts are left out).
//!
//! # What runs is what was decided
//! Each event's file, unless only root can write it, gets a read lease
//! before it is identified (see [`super::lease`]), held past the answer
//! until the exec has denied writers itself (`LeaseKeeper`), so the bytes
//! hashed are the bytes that run. Its path is checked in the daemon's own mount namespace
//! ([`PathOrigin`]): a user with a user namespace can mount their own
//! directory over `/usr/local/bin` there, and the kernel names the file by
//! that path.
//!
//! nix's fanotify API serves to create the group, mark and answer; reading
//! uses libc directly because nix's reader drops the info records (and so
//! leaks the pidfds the kernel installs with `FAN_REPORT_PIDFD`).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyResponse, InitFlags, MarkFlags, MaskFlags, Response,
};

use epm_policy::PathOrigin;

use super::interp::{InterpreterLoads, Pairing};
use super::kernel_cache::{KernelCache, Notified};
use super::mountinfo::{self, Mount, WatchScope};
use super::{
    AnsweredBy, ExecFacts, ExecGate, FactNeeds, FileIdentity, GateError, PendingExec, Respond,
    Shutdown, Stability, Verdict,
};
use super::{lease, procfs};

pub use super::mountinfo::MarkScope;

/// Size of `struct fanotify_event_metadata`.
const METADATA_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();

/// How long a notification may wait for the gate's thread to wake up for
/// something else, once the notification group has fired (see "One wake-up
/// per exec"). Short, because a static program's record is built when its
/// notification is read, and a short-lived process may be gone by then
/// (the record then lacks its user); long enough that execs a few
/// milliseconds apart, as in a build, keep the group disarmed and cost no
/// tick of their own.
pub const NOTIFICATIONS_READ_WITHIN: Duration = Duration::from_millis(5);

/// Bytes read per `read`. Every event in a read arrives with its fd (and
/// pidfd) already installed, so a modest buffer keeps a burst from taking
/// thousands of descriptors at once; an event is 32 bytes with its pidfd.
const READ_BUFFER: usize = 4096;

/// An exec whose file the gate could not identify (duplicating or
/// `fstat`ing its descriptor failed), answered with the fallback verdict
/// without a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnidentifiedExec {
    /// The process (thread group id).
    pub pid: u32,
    /// The kernel's name for the file, when it gave one (may be empty).
    pub path: String,
    /// What failed.
    pub error: String,
    /// The answer it got.
    pub verdict: Verdict,
}

/// Told of each [`UnidentifiedExec`], after its answer: the daemon audits
/// it. Called on the gate's thread, so it must not block.
#[derive(Clone)]
pub struct UnidentifiedReport(pub Arc<dyn Fn(UnidentifiedExec) + Send + Sync>);

impl std::fmt::Debug for UnidentifiedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnidentifiedReport")
    }
}

/// The fanotify gate's settings.
#[derive(Debug, Clone)]
pub struct FanotifyConfig {
    /// Only mounts at or below these paths are gated (`/`: everything).
    pub watch_paths: Vec<PathBuf>,
    /// Only mounts of these file-system types are gated (default:
    /// [`mountinfo::WATCHED_FS_TYPES`]).
    pub fs_types: Vec<String>,
    /// Answers execs that are dropped unanswered, and those whose file the
    /// gate cannot identify.
    pub fallback: Verdict,
    /// What the policy needs gathered, shared with its owner: the daemon
    /// keeps the parent lookup (a /proc readlink), the group list (a /proc
    /// status read) and the login uid (a /proc read) off while nothing
    /// uses them. The default gathers every fact.
    pub needs: Arc<FactNeeds>,
    /// Where execs answered without a decision because their file could
    /// not be identified are reported (default: only logged).
    pub unidentified: Option<UnidentifiedReport>,
}

impl FanotifyConfig {
    /// The default file-system types, at or below `watch_paths`.
    pub fn new(watch_paths: Vec<PathBuf>, fallback: Verdict) -> Self {
        Self {
            watch_paths,
            fs_types: mountinfo::WATCHED_FS_TYPES
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
            fallback,
            needs: Arc::new(FactNeeds::all()),
            unidentified: None,
        }
    }
}

/// What became of one watched mount.
#[derive(Debug)]
struct MountMark {
    mount_point: PathBuf,
    /// The mark placed, or why none could be; a failure is logged once.
    result: Result<MarkScope, Errno>,
}

/// The fanotify gate.
#[derive(Debug)]
pub struct FanotifyGate {
    /// The permission group: the watch marks and the cache's ignore masks.
    fan: Arc<Fanotify>,
    /// The notification group: the cache's `FAN_OPEN_EXEC` marks only
    /// (`None`: the kernel would not make it, and nothing is cached).
    notifications: Option<Arc<Fanotify>>,
    mountinfo: File,
    scope: WatchScope,
    /// Watched mounts by mount id.
    marks: HashMap<u64, MountMark>,
    has_pidfd: bool,
    own_pid: u32,
    fallback: Verdict,
    /// See [`FanotifyConfig::unidentified`].
    unidentified: Option<UnidentifiedReport>,
    needs: Arc<FactNeeds>,
    /// Dynamic programs waiting for their interpreter's event.
    interpreter_loads: Arc<Mutex<InterpreterLoads>>,
    /// Every mount of the daemon's own mount namespace, by id: a file on
    /// any other mount was opened in another namespace.
    own_mounts: HashSet<u64>,
    /// Holds leases past the answer.
    keeper: LeaseKeeper,
    /// Allows the kernel answers itself (see [`super::kernel_cache`]).
    kernel: Arc<KernelCache>,
    /// Whether the kernel reports every write of files on a device (a
    /// local file system), by device: a cached allow relies on it.
    local_devices: Mutex<HashMap<u64, bool>>,
    /// Paths and ELF heads of files only root can write, per version.
    memo: FileMemo,
}

/// The gate's two fanotify groups and the kernel cache on them, made
/// before anything is marked: a group without marks holds up no exec, so
/// the daemon makes them first and gives the cache to its decider at
/// construction, and places the watch marks
/// ([`FanotifyGate::open_with`]) once its decision workers run.
#[derive(Debug)]
pub struct FanotifyGroups {
    fan: Arc<Fanotify>,
    /// `None` when the kernel would not make it: nothing is cached then.
    notifications: Option<Arc<Fanotify>>,
    has_pidfd: bool,
    interpreter_loads: Arc<Mutex<InterpreterLoads>>,
    kernel: Arc<KernelCache>,
}

impl FanotifyGroups {
    /// Creates the permission group and the notification group (see "The
    /// group" and "The notification group").
    ///
    /// Fails when the kernel or our privileges do not allow the gate.
    pub fn create() -> Result<Self, GateError> {
        let base = InitFlags::FAN_CLASS_CONTENT
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_UNLIMITED_QUEUE
            | InitFlags::FAN_UNLIMITED_MARKS;
        let event_flags = EventFFlags::O_RDONLY | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC;
        let (fan, has_pidfd) = match Fanotify::init(base | InitFlags::FAN_REPORT_PIDFD, event_flags)
        {
            Ok(fan) => (fan, true),
            // Before Linux 5.15: no pidfds; /proc reads then rely on a
            // process blocked in exec not being reaped meanwhile.
            Err(Errno::EINVAL) => (
                Fanotify::init(base, event_flags).map_err(init_error)?,
                false,
            ),
            Err(e) => return Err(init_error(e)),
        };
        // The kernel cache's notifications (see "The notification group").
        let notify_flags = InitFlags::FAN_CLASS_NOTIF
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::FAN_UNLIMITED_QUEUE
            | InitFlags::FAN_UNLIMITED_MARKS
            | if has_pidfd {
                InitFlags::FAN_REPORT_PIDFD
            } else {
                InitFlags::empty()
            };
        // Without it the gate still gates, only without the kernel cache:
        // the cache saves time, the gate is the boundary.
        let notifications = match Fanotify::init(notify_flags, event_flags) {
            Ok(group) => Some(Arc::new(group)),
            Err(e) => {
                tracing::warn!(error = %e,
                    "cannot create the fanotify group for the kernel cache's notifications \
                     (fs.fanotify.max_user_groups?): no allow is cached in the kernel, every \
                     exec is asked in user space");
                None
            }
        };
        raise_fd_limit();
        let fan = Arc::new(fan);
        let interpreter_loads: Arc<Mutex<InterpreterLoads>> = Arc::default();
        Ok(Self {
            kernel: Arc::new(KernelCache::new(
                fan.clone(),
                notifications.clone(),
                interpreter_loads.clone(),
            )),
            fan,
            notifications,
            has_pidfd,
            interpreter_loads,
        })
    }

    /// The kernel cache of allows: give it to the owner of the policy
    /// ([`crate::PolicySwap`]), which starts it with the policy in force.
    pub fn kernel_cache(&self) -> Arc<KernelCache> {
        self.kernel.clone()
    }

    /// Whether the kernel reports pidfds with events.
    pub fn has_pidfd(&self) -> bool {
        self.has_pidfd
    }
}

fn io_error(what: impl Into<String>, source: std::io::Error) -> GateError {
    GateError::Io {
        what: what.into(),
        source,
    }
}

impl FanotifyGate {
    /// Creates the fanotify groups and marks every watched mount, with the
    /// default file-system types. `fallback` answers execs that are dropped
    /// unanswered.
    pub fn new(watch_paths: Vec<PathBuf>, fallback: Verdict) -> Result<Self, GateError> {
        Self::open(FanotifyConfig::new(watch_paths, fallback))
    }

    /// Creates the fanotify groups and marks every watched mount:
    /// [`FanotifyGroups::create`], then [`FanotifyGate::open_with`].
    pub fn open(config: FanotifyConfig) -> Result<Self, GateError> {
        Self::open_with(config, FanotifyGroups::create()?)
    }

    /// Marks every watched mount in `groups`' permission group: from now
    /// on every exec there waits for an answer from [`ExecGate::run`].
    ///
    /// Fails when a watch path's own mount cannot be marked, or when
    /// nothing at all could be marked. Other mounts that cannot be marked
    /// are logged and listed by [`FanotifyGate::unmarked_mounts`]: any
    /// user can add a mount (FUSE), and that must not keep the daemon from
    /// starting.
    pub fn open_with(config: FanotifyConfig, groups: FanotifyGroups) -> Result<Self, GateError> {
        let FanotifyGroups {
            fan,
            notifications,
            has_pidfd,
            interpreter_loads,
            kernel,
        } = groups;
        let mountinfo = File::open("/proc/self/mountinfo")
            .map_err(|e| io_error("cannot open /proc/self/mountinfo", e))?;
        // Mount points in mountinfo are canonical; so must the watch paths be.
        let watch_paths = config
            .watch_paths
            .into_iter()
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
            .collect();
        let mut gate = Self {
            kernel,
            local_devices: Mutex::default(),
            memo: FileMemo::default(),
            fan,
            notifications,
            mountinfo,
            scope: WatchScope::new(watch_paths, config.fs_types),
            marks: HashMap::new(),
            has_pidfd,
            own_pid: std::process::id(),
            fallback: config.fallback,
            unidentified: config.unidentified,
            needs: config.needs,
            interpreter_loads,
            own_mounts: HashSet::new(),
            keeper: LeaseKeeper::start()
                .map_err(|e| io_error("cannot start the lease keeper thread", e))?,
        };
        gate.refresh_mounts()
            .map_err(|e| io_error("cannot read /proc/self/mountinfo", e))?;
        gate.check_start()?;
        Ok(gate)
    }

    /// Turns the first marking round into a start-up verdict.
    fn check_start(&self) -> Result<(), GateError> {
        let failed: Vec<(&PathBuf, Errno)> = self
            .marks
            .values()
            .filter_map(|m| m.result.err().map(|e| (&m.mount_point, e)))
            .collect();
        if let Some((mount, errno)) = failed
            .iter()
            .find(|(mount, _)| self.scope.paths().contains(mount))
        {
            return Err(GateError::Mark {
                mount: (*mount).clone(),
                source: (*errno).into(),
            });
        }
        if self.marked_mounts() > 0 {
            return Ok(());
        }
        match failed.first() {
            None => Err(GateError::Unavailable(format!(
                "no mount of a watched file-system type at or below {:?}",
                self.scope.paths()
            ))),
            Some(_) if failed.iter().all(|(_, e)| *e == Errno::EINVAL) => {
                Err(GateError::Unavailable(
                    "this kernel cannot gate execs (fanotify_mark: FAN_OPEN_EXEC_PERM is invalid): \
                     EPM needs Linux 5.0 or later built with CONFIG_FANOTIFY_ACCESS_PERMISSIONS"
                        .to_owned(),
                ))
            }
            Some((mount, errno)) => Err(GateError::Mark {
                mount: (*mount).clone(),
                source: (*errno).into(),
            }),
        }
    }

    /// The kernel cache of allows.
    pub fn kernel_cache(&self) -> Arc<KernelCache> {
        self.kernel.clone()
    }

    /// Whether the kernel reports pidfds with events.
    pub fn has_pidfd(&self) -> bool {
        self.has_pidfd
    }

    /// How many mounts are marked.
    pub fn marked_mounts(&self) -> usize {
        self.marks.values().filter(|m| m.result.is_ok()).count()
    }

    /// The marked mounts and how each is marked, by mount point.
    pub fn marks(&self) -> Vec<(PathBuf, MarkScope)> {
        let mut marks: Vec<_> = self
            .marks
            .values()
            .filter_map(|m| m.result.ok().map(|scope| (m.mount_point.clone(), scope)))
            .collect();
        marks.sort_by(|a, b| a.0.cmp(&b.0));
        marks
    }

    /// Watched mounts that could not be marked: execs from them are not gated.
    pub fn unmarked_mounts(&self) -> Vec<PathBuf> {
        let mut unmarked: Vec<_> = self
            .marks
            .values()
            .filter(|m| m.result.is_err())
            .map(|m| m.mount_point.clone())
            .collect();
        unmarked.sort();
        unmarked
    }

    /// Marks watched mounts that appeared since the last call and forgets
    /// those that are gone (the kernel drops their marks itself).
    fn refresh_mounts(&mut self) -> std::io::Result<()> {
        let mut text = String::new();
        self.mountinfo.seek(SeekFrom::Start(0))?;
        // Reading to the end also re-arms the POLLPRI notification.
        self.mountinfo.read_to_string(&mut text)?;
        let mounts = mountinfo::parse(&text);
        self.own_mounts = mounts.iter().map(|m| m.id).collect();
        self.marks
            .retain(|id, _| mounts.iter().any(|m| m.id == *id));
        for mount in &mounts {
            if self.marks.contains_key(&mount.id) || !self.scope.watches(mount) {
                continue;
            }
            let result = self.mark(mount, self.scope.mark_scope(mount, &mounts));
            match result {
                Ok(scope) => tracing::debug!(mount = %mount.mount_point.display(),
                    fs = %mount.fs_type, ?scope, "gating mount"),
                // It vanished between reading the table and marking it.
                Err(Errno::ENOENT) => continue,
                Err(e) => tracing::error!(mount = %mount.mount_point.display(),
                    fs = %mount.fs_type, error = %e,
                    "cannot gate this mount: execs from it are not checked"),
            }
            self.marks.insert(
                mount.id,
                MountMark {
                    mount_point: mount.mount_point.clone(),
                    result,
                },
            );
        }
        Ok(())
    }

    fn mark(&self, mount: &Mount, scope: MarkScope) -> Result<MarkScope, Errno> {
        let add = |kind: MarkFlags| {
            self.fan.mark(
                MarkFlags::FAN_MARK_ADD | kind,
                MaskFlags::FAN_OPEN_EXEC_PERM,
                None,
                Some(mount.mount_point.as_path()),
            )
        };
        if scope == MarkScope::Filesystem {
            match add(MarkFlags::FAN_MARK_FILESYSTEM) {
                Ok(()) => return Ok(MarkScope::Filesystem),
                // Linux 5.0 has no file-system marks, and some file systems
                // refuse them: a mount mark is the next best thing.
                Err(e @ (Errno::EINVAL | Errno::EXDEV | Errno::ENODEV | Errno::EOPNOTSUPP)) => {
                    tracing::debug!(mount = %mount.mount_point.display(), error = %e,
                        "no file-system mark; marking the mount");
                }
                Err(e) => return Err(e),
            }
        }
        add(MarkFlags::FAN_MARK_MOUNT).map(|()| MarkScope::Mount)
    }

    /// Reads one buffer of permission events and hands each on, after the
    /// notifications queued before them (see "One wake-up per exec").
    /// `true` when the buffer came back (nearly) full, so more events are
    /// likely waiting: the caller reads again before it polls, and a burst
    /// costs one wake-up.
    ///
    /// Notifications of execs the kernel answered from its cache go to the
    /// sink after every permission event of the same read: a dynamically
    /// linked program's notification and its loader's permission event
    /// are read together, and the loader's exec must not wait while the
    /// notification is decided again and its audit record built. What must
    /// be read while the process lives (its credentials, the pairing with
    /// its loader) is still read in order; only the sink waits. `noticed`
    /// is the caller's, kept to save an allocation per read; `notes` is the
    /// buffer for the notification group.
    fn read_events(
        &self,
        buf: &mut [u8],
        notes: &mut [u8],
        noticed: &mut Vec<PendingExec>,
        sink: &mut dyn FnMut(PendingExec),
    ) -> Result<bool, GateError> {
        let n = read_group(
            &self.fan,
            buf,
            "the kernel could not hand an exec over (it denied that exec)",
        )?;
        let full = is_full(n, buf.len());
        // Read after the permission events: every notification queued
        // before them is in this drain, even one queued since the wake-up.
        let drained = match self.kernel.may_notify() {
            true => self.drain_notifications(notes, noticed).map(|_| ()),
            false => Ok(()),
        };
        // Handled even when the drain failed: their execs wait on us.
        let handled = self.handle_events(buf.get(..n).unwrap_or_default(), &mut |pending| {
            if pending.is_observed() {
                noticed.push(pending);
            } else {
                sink(pending);
            }
        });
        // Also after a protocol error: these execs ran, and are audited.
        for pending in noticed.drain(..) {
            sink(pending);
        }
        drained.and(handled).map(|()| full)
    }

    /// Reads the notification group until it is empty, gathering each
    /// notification's facts now (the process may not live long) into
    /// `noticed`. How many notifications were read.
    fn drain_notifications(
        &self,
        notes: &mut [u8],
        noticed: &mut Vec<PendingExec>,
    ) -> Result<usize, GateError> {
        let Some(group) = &self.notifications else {
            return Ok(0);
        };
        let before = noticed.len();
        loop {
            let n = read_group(
                group,
                notes,
                "the kernel could not hand over a notification of a cached exec (it is not audited)",
            )?;
            self.handle_events(notes.get(..n).unwrap_or_default(), &mut |pending| {
                noticed.push(pending);
            })?;
            if !is_full(n, notes.len()) {
                return Ok(noticed.len() - before);
            }
        }
    }

    /// Hands on each event of one read's bytes.
    fn handle_events(
        &self,
        mut rest: &[u8],
        sink: &mut dyn FnMut(PendingExec),
    ) -> Result<(), GateError> {
        while !rest.is_empty() {
            if rest.len() < METADATA_LEN {
                return Err(GateError::Protocol(format!(
                    "{} stray bytes after the last event",
                    rest.len()
                )));
            }
            // SAFETY: at least METADATA_LEN bytes remain; read_unaligned copes
            // with any alignment of the byte buffer.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(rest.as_ptr().cast()) };
            let event_len = meta.event_len as usize;
            let metadata_len = usize::from(meta.metadata_len);
            // An event we cannot delimit hides the fds of those after it, and
            // their execs would wait forever: stop instead, so the group is
            // closed, which releases them.
            if meta.vers != libc::FANOTIFY_METADATA_VERSION
                || metadata_len < METADATA_LEN
                || event_len < metadata_len
                || event_len > rest.len()
            {
                return Err(GateError::Protocol(format!(
                    "metadata version {} (expected {}), lengths {metadata_len}/{event_len} in {} bytes",
                    meta.vers,
                    libc::FANOTIFY_METADATA_VERSION,
                    rest.len()
                )));
            }
            self.handle_event(&meta, &rest[metadata_len..event_len], sink);
            rest = &rest[event_len..];
        }
        Ok(())
    }

    fn handle_event(
        &self,
        meta: &libc::fanotify_event_metadata,
        info: &[u8],
        sink: &mut dyn FnMut(PendingExec),
    ) {
        // Owned first, so it is closed on every path.
        let pidfd = pidfd_from_info(info);
        if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
            // Cannot happen with FAN_UNLIMITED_QUEUE; if it does, execs ran
            // without a decision and the operator must know.
            tracing::error!("fanotify queue overflowed: some execs were not gated");
        }
        if meta.fd < 0 {
            return;
        }
        // SAFETY: the kernel installed this fd for us with the event; nothing
        // else owns it.
        let event_fd = unsafe { OwnedFd::from_raw_fd(meta.fd) };
        if meta.mask & libc::FAN_OPEN_EXEC_PERM == 0 {
            if meta.mask & libc::FAN_OPEN_EXEC != 0 {
                let pid = u32::try_from(meta.pid).unwrap_or(0);
                self.handle_cached_exec(pid, event_fd, pidfd, sink);
            }
            return; // Nothing else is marked.
        }
        let mut responder = FanotifyResponder {
            fan: Arc::clone(&self.fan),
            event_fd,
            pid: 0,
            after: None,
            per_file: None,
        };
        // The event pid is the thread group id, so this covers every thread.
        let pid = u32::try_from(meta.pid).unwrap_or(0);
        responder.pid = pid;
        if pid == self.own_pid {
            // A daemon that gated its own exec would wait on itself.
            responder.answer(Verdict::Allow);
            return;
        }
        // One fstat serves the loader's fast answer and, failing that, the
        // facts gathered for a decision.
        let first_look = event_metadata(responder.event_fd.as_fd());
        if let Ok(meta) = &first_look
            && self.paired_loader_load(pid, meta)
        {
            // The program's exec got this far: it has denied writers to
            // the program, whose lease can go.
            self.keeper.release(pid);
            responder.answer(Verdict::Allow);
            return;
        }
        match self.gather_facts(pid, responder.event_fd.as_fd(), first_look, pidfd.as_ref()) {
            Ok(mut facts) => {
                let pairing = self.pairing(pid, &facts);
                let expecting = match pairing {
                    Pairing::LoadOf(program) => {
                        // The program's exec got this far: it has denied
                        // writers to the program, whose lease can go.
                        self.keeper.release(pid);
                        facts.interpreter_of = Some(program);
                        None
                    }
                    Pairing::Expecting(event) => Some(event),
                    Pairing::None => None,
                };
                // A file a user can write keeps its lease past an allow: the
                // gate's, or the one a worker takes once a writer is gone.
                let leasable = matches!(
                    facts.stability,
                    Stability::Leased | Stability::OpenForWriting
                );
                // A loader is offered too: the cache holds its allow in
                // user space (see "A loader's load").
                facts.kernel_cache_candidate =
                    facts.kernel_cache_candidate && self.is_local_device(&facts);
                responder.after = Some(AfterAnswer {
                    keeper: leasable.then(|| self.keeper.clone()),
                    pidfd,
                    file: (facts.file.dev, facts.file.ino),
                    version: facts.file,
                    interpreter: expecting.map(|event| (self.interpreter_loads.clone(), event)),
                    kernel: self.kernel.clone(),
                    candidate_path: facts.kernel_cache_candidate.then(|| facts.path.clone()),
                });
                sink(PendingExec::new(facts, Box::new(responder), self.fallback));
            }
            Err(Unusable::Gone) => {
                // The process was killed while we looked (its exec fails
                // anyway) and its pid may be reused: decide nothing on facts
                // that may belong to another process.
                responder.answer(Verdict::Deny);
            }
            Err(Unusable::File(e)) => {
                tracing::error!(pid, error = %e, verdict = ?self.fallback,
                    "cannot identify the file being executed; answering with the fallback");
                let path = fd_path(responder.event_fd.as_fd());
                responder.answer(self.fallback);
                if let Some(UnidentifiedReport(report)) = &self.unidentified {
                    report(UnidentifiedExec {
                        pid,
                        path,
                        error: e.to_string(),
                        verdict: self.fallback,
                    });
                }
            }
        }
    }
}

impl FanotifyGate {
    /// Whether the kernel reports every write to files of this exec's file
    /// system (asked once per device): a local file system, where a write
    /// clears a cached allow. Network and user-space file systems, and
    /// overlays (whose lower layers change underneath), are not.
    fn is_local_device(&self, facts: &ExecFacts) -> bool {
        let mut devices = self
            .local_devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(local) = devices.get(&facts.file.dev) {
            return *local;
        }
        let Some(content) = &facts.content else {
            return false;
        };
        let local = nix::sys::statfs::fstatfs(content).is_ok_and(|fs| {
            const LOCAL: [i64; 9] = [
                0xEF53,      // ext2/3/4
                0x5846_5342, // xfs
                0x9123_683E, // btrfs
                0x0102_1994, // tmpfs
                0xF2F5_2010, // f2fs
                0x7371_7368, // squashfs
                0xE0F5_E1E2, // erofs
                0x858_458F6, // ramfs
                0x2FC1_2FC1, // zfs
            ];
            #[allow(clippy::unnecessary_cast)]
            let kind = fs.filesystem_type().0 as i64;
            LOCAL.contains(&kind)
        });
        if devices.len() >= 1024 {
            devices.clear();
        }
        devices.insert(facts.file.dev, local);
        local
    }

    /// A `FAN_OPEN_EXEC` notification: an exec of a file with a cached
    /// allow (see [`super::kernel_cache`]). One the gate was asked about is
    /// audited already; any other ran on the kernel's cached allow and is
    /// decided again, without grants, for its record.
    fn handle_cached_exec(
        &self,
        pid: u32,
        event_fd: OwnedFd,
        pidfd: Option<OwnedFd>,
        sink: &mut dyn FnMut(PendingExec),
    ) {
        if pid == self.own_pid {
            return;
        }
        let content = File::from(event_fd);
        let Ok(meta) = content.metadata() else {
            return;
        };
        let key = (meta.dev(), meta.ino());
        let entry = match self.kernel.notified(pid, key) {
            Notified::Asked => return,
            Notified::Cached(entry) => entry,
        };
        let identity = FileIdentity::of(&meta);
        let (path, path_origin) = self.locate(content.as_fd(), &content, &meta, &identity);
        // Arms the pairing for the interpreter this program names. The
        // system loader is never cached (see `KernelCache::remember`), so
        // its load comes as a permission event and is paired there; an
        // interpreter answered here is other code, with a record of its own.
        self.interpreter_loads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ran(pid, key, &path, entry.as_ref().and_then(|e| e.interpreter));
        let same_path = entry.as_ref().is_some_and(|e| e.path == path);
        if entry.is_some() && (!same_path || !lease::only_root_writes(&meta) || meta.nlink() != 1) {
            // Renamed, linked, or made writable by others since it was
            // cached: the next exec is asked again.
            self.kernel.forget(content.as_fd(), key);
        }
        let process = process_facts(pid, pidfd.as_ref(), &self.needs);
        sink(PendingExec::observed_from(
            exec_facts(
                pid,
                identity,
                (path, path_origin),
                Stability::OnlyRootWrites,
                content,
                process,
            ),
            AnsweredBy::KernelCache,
        ));
    }

    /// Whether this event is the load of a loader the policy allows for
    /// everyone, unchanged since, as the interpreter of the process's last
    /// program: answered at once (see "A loader's load"). When it is not,
    /// the event goes the usual way, which finds what the process expected
    /// used up, as it would have been there.
    fn paired_loader_load(&self, pid: u32, meta: &std::fs::Metadata) -> bool {
        // What the allow was made for: only root writes it, one name, and
        // this very version (size, mtime and ctime) under this policy.
        let version = FileIdentity::of(meta);
        if !lease::only_root_writes(meta)
            || meta.nlink() != 1
            || !self.kernel.allows_loader(&version)
        {
            return false;
        }
        self.interpreter_loads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .load_of(pid, (version.dev, version.ino))
            .is_some()
    }

    /// Whether this event is the interpreter load of the process's last
    /// program (see [`super::interp`]), and if not, whether it names an
    /// interpreter to expect. Only a system loader counts as a load (owned
    /// by root, writable by nobody else, and a loader: see
    /// [`super::interp::is_loader`]); any other interpreter is code worth
    /// its own record.
    fn pairing(&self, pid: u32, facts: &ExecFacts) -> Pairing {
        let mut loads = self
            .interpreter_loads
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let pairing = loads.event_named(
            pid,
            (facts.file.dev, facts.file.ino),
            &facts.path,
            || self.head(facts)?.interpreter,
            |path| {
                std::fs::metadata(path)
                    .ok()
                    .map(|meta| (meta.dev(), meta.ino()))
            },
        );
        drop(loads);
        let Pairing::LoadOf(program) = pairing else {
            return pairing;
        };
        // Owned by root and writable by nobody else (what the gate found
        // when it read the event), and a loader.
        let is_system_loader = facts.stability == Stability::OnlyRootWrites
            && self.head(facts).is_some_and(|head| head.loader);
        match is_system_loader {
            true => Pairing::LoadOf(program),
            false => Pairing::None,
        }
    }
}

/// How long a lease is kept past the answer at most, waiting for the
/// exec to deny writers (microseconds after the answer, normally).
const LEASE_HOLD_LIMIT: Duration = Duration::from_secs(5);
/// Leases kept past their answer at most; past this, the oldest goes.
const MAX_HELD_LEASES: usize = 8192;
/// How often held leases are checked.
const LEASE_CHECK_EVERY: Duration = Duration::from_millis(1);

/// A lease kept past its answer.
#[derive(Debug)]
struct HeldLease {
    pid: u32,
    /// A descriptor of the event's open file, which carries the lease:
    /// closing it releases the lease.
    _lease: OwnedFd,
    pidfd: Option<OwnedFd>,
    /// The executed file, by device and inode.
    exe: (u64, u64),
    since: Instant,
}

impl HeldLease {
    /// Whether the exec has denied writers to the file, or never will:
    /// the process runs it now (the kernel denies writers to a running
    /// program's file; a process that was already running this file
    /// already did), or it is gone, or the limit passed.
    fn done(&self) -> bool {
        if self.since.elapsed() > LEASE_HOLD_LIMIT {
            return true;
        }
        if let Some(pidfd) = &self.pidfd
            && !pidfd_alive(pidfd.as_fd())
        {
            return true;
        }
        match std::fs::metadata(format!("/proc/{}/exe", self.pid)) {
            Ok(meta) => (meta.dev(), meta.ino()) == self.exe,
            Err(_) => self.pidfd.is_none(),
        }
    }
}

#[derive(Debug, Default)]
struct KeeperState {
    held: Vec<HeldLease>,
    stop: bool,
}

/// Keeps each allowed exec's lease until the exec has denied writers (see
/// [`super::lease`]): a thread checks every [`LEASE_CHECK_EVERY`] whether
/// each process now runs its file (or is gone), and the interpreter's
/// event of a dynamic program releases its lease at once.
#[derive(Debug, Clone)]
struct LeaseKeeper {
    shared: Arc<(Mutex<KeeperState>, Condvar)>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl LeaseKeeper {
    fn start() -> std::io::Result<Self> {
        let shared: Arc<(Mutex<KeeperState>, Condvar)> = Arc::default();
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("epm-leases".into())
            .spawn(move || keep_leases(&state))?;
        Ok(Self {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }

    fn hold(&self, lease: HeldLease) {
        let (state, wake) = &*self.shared;
        let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.stop {
            // The gate is gone (the daemon is stopping): nothing to wait for.
            return;
        }
        if state.held.len() >= MAX_HELD_LEASES {
            tracing::debug!("too many execs waiting to deny writers; releasing the oldest lease");
            state.held.remove(0);
        }
        state.held.push(lease);
        wake.notify_one();
    }

    /// `pid`'s exec has denied writers: its leases can go.
    fn release(&self, pid: u32) {
        let (state, _) = &*self.shared;
        state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .retain(|held| held.pid != pid);
    }

    /// Stops the thread, releasing every lease.
    fn stop(&self) {
        let (state, wake) = &*self.shared;
        state.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        wake.notify_all();
        if let Some(thread) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = thread.join();
        }
    }
}

fn keep_leases(shared: &(Mutex<KeeperState>, Condvar)) {
    let (state, wake) = shared;
    loop {
        let mut guard = state.lock().unwrap_or_else(PoisonError::into_inner);
        while guard.held.is_empty() && !guard.stop {
            guard = wake.wait(guard).unwrap_or_else(PoisonError::into_inner);
        }
        if guard.stop {
            guard.held.clear();
            return;
        }
        drop(guard);
        std::thread::sleep(LEASE_CHECK_EVERY);
        // Checked outside the lock, which the gate's thread takes per event.
        let mut held =
            std::mem::take(&mut state.lock().unwrap_or_else(PoisonError::into_inner).held);
        held.retain(|lease| !lease.done());
        let mut guard = state.lock().unwrap_or_else(PoisonError::into_inner);
        held.append(&mut guard.held);
        guard.held = held;
    }
}

impl Drop for FanotifyGate {
    fn drop(&mut self) {
        self.keeper.stop();
    }
}

/// Reads one buffer of events from `group`: how many bytes (0: none).
/// `lost` is logged when the kernel could not install an event's fd.
fn read_group(group: &Fanotify, buf: &mut [u8], lost: &str) -> Result<usize, GateError> {
    match nix::unistd::read(group.as_fd().as_raw_fd(), buf) {
        Ok(n) => Ok(n),
        Err(Errno::EAGAIN | Errno::EINTR) => Ok(0),
        Err(e @ (Errno::EBADF | Errno::EFAULT)) => {
            Err(io_error("cannot read fanotify events", e.into()))
        }
        // The kernel could not open the file or install the fd for us
        // (EMFILE, ENFILE, a vanished network file) and dropped the event:
        // a permission event's exec it has denied itself. The next one may
        // do better.
        Err(e) => {
            tracing::warn!(error = %e, "{lost}");
            Ok(0)
        }
    }
}

/// Whether a read of `n` bytes into `len` was (nearly) full. The kernel
/// hands over only whole events: room for one more (an event with its
/// pidfd record is 32 bytes) means the queue was empty.
fn is_full(n: usize, len: usize) -> bool {
    n + 2 * 32 > len
}

fn init_error(errno: Errno) -> GateError {
    GateError::Unavailable(match errno {
        Errno::EPERM => "fanotify needs CAP_SYS_ADMIN: run epmd as root".to_owned(),
        Errno::ENOSYS | Errno::EINVAL => format!(
            "this kernel cannot gate execs (fanotify_init: {errno}): EPM needs Linux 5.0 or later \
             built with CONFIG_FANOTIFY and CONFIG_FANOTIFY_ACCESS_PERMISSIONS"
        ),
        _ => format!("fanotify_init failed: {errno}"),
    })
}

/// Raises the soft open-file limit to the hard one. Every exec waiting for
/// an answer holds two descriptors (the event's and the content handle), and
/// when the kernel cannot install an event's fd it denies that exec: the
/// usual soft limit of 1024 would deny execs under a burst that a queue of a
/// few thousand is sized for.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit from a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), soft = limit.rlim_cur,
            "cannot raise the open-file limit; a burst of execs may be denied");
    }
}

/// Extracts the pidfd info record, if present, taking ownership of the fd.
fn pidfd_from_info(mut info: &[u8]) -> Option<OwnedFd> {
    let mut found = None;
    // struct fanotify_event_info_header { u8 info_type; u8 pad; u16 len; }
    while info.len() >= 4 {
        let info_type = info[0];
        let len = usize::from(u16::from_ne_bytes([info[2], info[3]]));
        if len < 4 || len > info.len() {
            break;
        }
        if info_type == libc::FAN_EVENT_INFO_TYPE_PIDFD && len >= 8 {
            let fd = i32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
            // Negative: FAN_NOPIDFD (no such process in our namespace) or
            // FAN_EPIDFD (the kernel could not make one).
            if fd >= 0 {
                // SAFETY: the kernel installed this pidfd for us.
                found = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        info = &info[len..];
    }
    found
}

/// Whether the process behind a pidfd has not been reaped, so its pid still
/// names it.
fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 only checks; null siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

/// Why an event cannot go to the sink.
#[derive(Debug)]
enum Unusable {
    /// The process went away while its facts were read.
    Gone,
    /// The file could not be identified (fstat) or given a content handle.
    File(std::io::Error),
}

/// What the gate read of an exec's process: its credentials and parent,
/// its login uid and its parent's executable (when asked for).
type ProcessFacts = (procfs::ProcStatus, Option<u32>, Option<String>);

/// The facts of one exec, from what the gate read of its file and process
/// (`None`: the process had exited): the one place both a permission event
/// and a notification of a kernel-cached exec turn into [`ExecFacts`].
fn exec_facts(
    pid: u32,
    file: FileIdentity,
    located: (String, PathOrigin),
    stability: Stability,
    content: File,
    process: Option<ProcessFacts>,
) -> ExecFacts {
    let process_gone = process.is_none();
    let (status, login_uid, parent_path) = process.unwrap_or_default();
    let (path, path_origin) = located;
    ExecFacts {
        uid: status.uid,
        gid: status.gid,
        groups: status.groups,
        login_uid,
        ppid: status.ppid,
        parent_path,
        content: Some(content),
        path_origin,
        stability,
        process_gone,
        ..ExecFacts::new(pid, file, path)
    }
}

impl FanotifyGate {
    /// The facts of a permission event, read while its process waits.
    /// `first_look` is the event's file's metadata, read when the event
    /// was ([`event_metadata`]).
    fn gather_facts(
        &self,
        pid: u32,
        event_fd: BorrowedFd<'_>,
        first_look: std::io::Result<std::fs::Metadata>,
        pidfd: Option<&OwnedFd>,
    ) -> Result<ExecFacts, Unusable> {
        let meta = first_look.map_err(Unusable::File)?;
        // The content handle is a duplicate: a worker may close it once it has
        // hashed the file, while the event's own fd stays open until the answer
        // is written. The kernel matches an answer to its event by fd number, and
        // a number closed early would go to the next event, so two waiting events
        // could share it and an answer could reach the wrong exec.
        let content = File::from(event_fd.try_clone_to_owned().map_err(Unusable::File)?);
        // A file a user could write gets a lease first: the version read next
        // is then the one that runs.
        let (stability, meta) = if lease::only_root_writes(&meta) {
            (Stability::OnlyRootWrites, meta)
        } else {
            let stability = lease::take(&content);
            (stability, content.metadata().map_err(Unusable::File)?)
        };
        let identity = FileIdentity::of(&meta);
        let located = self.locate(event_fd, &content, &meta, &identity);
        // A candidate for the kernel cache of allows (the gate checks the file
        // system too): only root can change it, it has no other name, and the
        // path names it here.
        let kernel_cache_candidate = stability == Stability::OnlyRootWrites
            && meta.nlink() == 1
            && located.1 == PathOrigin::Local;
        // At FAN_OPEN_EXEC_PERM time /proc/PID still shows the process before
        // the exec: its credentials and parent are right, its exe/cmdline are the
        // old program's, which is why the file comes from the event fd.
        let process = process_facts(pid, pidfd, &self.needs).ok_or(Unusable::Gone)?;
        Ok(ExecFacts {
            kernel_cache_candidate,
            ..exec_facts(pid, identity, located, stability, content, Some(process))
        })
    }

    /// The kernel's name for an event's file, and whose name it is. A file
    /// only root can write, with one link, is named by the path remembered
    /// for its version when that path still names it here: one `statx`
    /// instead of the fd's `readlink` and a `statx`. That path is then a
    /// name of this very file in the daemon's namespace, which is all a
    /// [`PathOrigin::Local`] path promises (with one link, it is the
    /// kernel's name too, unless the file was reached through a bind mount).
    fn locate(
        &self,
        fd: BorrowedFd<'_>,
        content: &File,
        meta: &std::fs::Metadata,
        identity: &FileIdentity,
    ) -> (String, PathOrigin) {
        let memo = lease::only_root_writes(meta) && meta.nlink() == 1;
        if memo
            && let Some(path) = self.memo.path(identity)
            && names_here(&path, identity)
        {
            return (path, PathOrigin::Local);
        }
        let path = fd_path(fd);
        let origin = check_path(&path, identity, content, &self.own_mounts);
        if memo && origin == PathOrigin::Local {
            self.memo.set_path(identity, &path);
        }
        (path, origin)
    }

    /// What the first bytes of an event's file say: read once per version
    /// of a file only root can write, every time for any other.
    fn head(&self, facts: &ExecFacts) -> Option<Head> {
        let memo = facts.stability == Stability::OnlyRootWrites;
        if memo && let Some(head) = self.memo.head(&facts.file) {
            return Some(head);
        }
        let mut bytes = [0u8; super::interp::HEAD_BYTES];
        let read =
            std::os::unix::fs::FileExt::read_at(facts.content.as_ref()?, &mut bytes, 0).ok()?;
        let bytes = bytes.get(..read)?;
        let head = Head {
            interpreter: super::interp::loaded_interpreter(bytes).map(str::to_owned),
            loader: super::interp::is_loader(bytes),
        };
        if memo {
            self.memo.set_head(&facts.file, &head);
        }
        Some(head)
    }
}

/// What an executable's first bytes say (see [`super::interp`]).
#[derive(Debug, Clone, Default)]
struct Head {
    /// The interpreter the kernel will load for it.
    interpreter: Option<String>,
    /// It is a dynamic loader.
    loader: bool,
}

/// What the gate remembers of files only root can write, by version
/// (device, inode, size, mtime and ctime: any write, chmod, chown, rename
/// or link makes a new one): the path it was last named by, and its head.
/// Nobody but root can change such a file, so a remembered head is its
/// head; a remembered path is checked again on every use ([`names_here`]).
#[derive(Debug, Default)]
struct FileMemo {
    files: Mutex<HashMap<FileIdentity, Memo>>,
}

/// What [`FileMemo`] knows of one file version.
#[derive(Debug, Default)]
struct Memo {
    path: Option<String>,
    head: Option<Head>,
}

/// Files remembered at most; the memo starts over when full.
const MEMO_CAPACITY: usize = 4096;

impl FileMemo {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<FileIdentity, Memo>) -> T) -> T {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut files)
    }

    fn path(&self, file: &FileIdentity) -> Option<String> {
        self.with(|files| files.get(file)?.path.clone())
    }

    fn head(&self, file: &FileIdentity) -> Option<Head> {
        self.with(|files| files.get(file)?.head.clone())
    }

    fn entry<T>(&self, file: &FileIdentity, f: impl FnOnce(&mut Memo) -> T) -> T {
        self.with(|files| {
            if files.len() >= MEMO_CAPACITY && !files.contains_key(file) {
                files.clear();
            }
            f(files.entry(*file).or_default())
        })
    }

    fn set_path(&self, file: &FileIdentity, path: &str) {
        self.entry(file, |e| e.path = Some(path.to_owned()));
    }

    fn set_head(&self, file: &FileIdentity, head: &Head) {
        self.entry(file, |e| e.head = Some(head.clone()));
    }
}

/// The credentials, parent and login uid of `pid` (what `needs` asks of
/// them), or `None` when the process is gone (its pid may be reused).
fn process_facts(
    pid: u32,
    pidfd: Option<&OwnedFd>,
    needs: &FactNeeds,
) -> Option<(procfs::ProcStatus, Option<u32>, Option<String>)> {
    let mut buf = [0u8; 4096];
    // Credentials and parent from the pidfd where the kernel offers them
    // (race-free, no /proc text); /proc/PID/status when groups are needed or
    // the kernel is older than 6.13.
    let from_pidfd = pidfd.and_then(|p| pidfd_info(p.as_fd(), pid));
    let mut read_proc = false;
    let status = match from_pidfd {
        Some(status) if !needs.groups() => Some(status),
        _ => {
            read_proc = true;
            read_small(&format!("/proc/{pid}/status"), &mut buf).and_then(procfs::parse_status)
        }
    };
    // Nothing to read: the process is gone (its exec was answered by the
    // kernel's cache, or it was killed while blocked in its exec).
    let status = status?;
    let login_uid = if needs.login_uid() {
        read_proc = true;
        read_small(&format!("/proc/{pid}/loginuid"), &mut buf).and_then(procfs::parse_loginuid)
    } else {
        None
    };
    // What came from /proc/PID is this process's only if the pid still
    // names it; what came from the pidfd is its own anyway.
    if read_proc
        && let Some(pidfd) = pidfd
        && !pidfd_alive(pidfd.as_fd())
    {
        return None;
    }
    // The parent is not pinned by our pidfd: if it exits now, this names
    // whatever has its pid next, which takes a pid wrap-around to matter.
    // Its path, like the program's, must name its file here.
    let parent_path = (needs.parent_path() && status.ppid > 0)
        .then(|| verified_exe_path(status.ppid))
        .flatten();
    Some((status, login_uid, parent_path))
}

/// Whether `path` (the kernel's name for the open `file`) names that file
/// in the daemon's mount namespace, and if not, why.
fn check_path(
    path: &str,
    identity: &FileIdentity,
    file: &File,
    own_mounts: &HashSet<u64>,
) -> PathOrigin {
    if names_here(path, identity) {
        return PathOrigin::Local;
    }
    match mount_id(file) {
        Some(id) if !own_mounts.contains(&id) => PathOrigin::OtherNamespace,
        _ => PathOrigin::NotFoundHere,
    }
}

/// Whether `path` names `file` in the daemon's mount namespace. No symlink
/// is followed at the end: the kernel's name is resolved.
fn names_here(path: &str, file: &FileIdentity) -> bool {
    std::fs::symlink_metadata(path)
        .is_ok_and(|meta| (meta.dev(), meta.ino()) == (file.dev, file.ino))
}

/// The id of the mount `file` was opened on (`statx`, Linux 5.8).
fn mount_id(file: &File) -> Option<u64> {
    // SAFETY: an all-zero statx is a valid value to be overwritten.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx with AT_EMPTY_PATH on a descriptor we own writes one
    // struct statx we own; the path is a NUL-terminated empty string.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_MNT_ID,
            &raw mut stx,
        )
    };
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// The path of `pid`'s executable, when that path names the same file in
/// the daemon's mount namespace.
fn verified_exe_path(pid: u32) -> Option<String> {
    let link = format!("/proc/{pid}/exe");
    let path = std::fs::read_link(&link).ok()?;
    let exe = std::fs::metadata(&link).ok()?;
    let here = std::fs::symlink_metadata(&path).ok()?;
    ((exe.dev(), exe.ino()) == (here.dev(), here.ino()))
        .then(|| path.to_string_lossy().into_owned())
}

/// `struct pidfd_info` from <linux/pidfd.h>, first published version (64
/// bytes, Linux 6.13); the kernel fills what `mask` asks and says so in `mask`.
#[repr(C)]
#[derive(Debug, Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
}

const PIDFD_INFO_CREDS: u64 = 1 << 1;
/// `_IOWR(PIDFS_IOCTL_MAGIC = 0xFF, 11, struct pidfd_info)` with the 64-byte struct.
const PIDFD_GET_INFO: u64 = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;

/// A process's credentials and parent from its pidfd, or `None` when the
/// kernel cannot tell (before 6.13) or the answer is not for `pid` (a
/// layout mismatch would show there first).
fn pidfd_info(pidfd: BorrowedFd<'_>, pid: u32) -> Option<procfs::ProcStatus> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_CREDS,
        ..PidfdInfo::default()
    };
    // SAFETY: the ioctl writes at most size_of::<PidfdInfo>() (64) bytes
    // into a struct we own, as the request number encodes.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO as _, &raw mut info) };
    if rc != 0 || info.mask & PIDFD_INFO_CREDS == 0 || info.pid != pid {
        return None;
    }
    Some(procfs::ProcStatus {
        ppid: info.ppid,
        uid: info.ruid,
        euid: info.euid,
        gid: info.rgid,
        egid: info.egid,
        groups: Vec::new(),
    })
}

/// The metadata of an event's file, by its descriptor, which stays the
/// caller's.
fn event_metadata(fd: BorrowedFd<'_>) -> std::io::Result<std::fs::Metadata> {
    // SAFETY: a File over the descriptor only to fstat it; it is never
    // dropped (ManuallyDrop), so the descriptor is not closed here.
    let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    file.metadata()
}

/// Reads a small /proc file with one open, one read and one close: this runs
/// for every exec, and std's read_to_string would add a stat and a second read.
fn read_small<'a>(path: &str, buf: &'a mut [u8]) -> Option<&'a str> {
    let mut file = File::open(path).ok()?;
    let n = file.read(buf).ok()?;
    std::str::from_utf8(buf.get(..n)?).ok()
}

/// The kernel's name for the open file. A file unlinked since it was opened
/// reads "PATH (deleted)"; that is kept, as it is what the process ran.
fn fd_path(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Answers one event on the shared permission group, then closes the event's
/// fd. 8-byte writes to a fanotify fd are atomic, so workers on several
/// threads answer concurrently.
struct FanotifyResponder {
    fan: Arc<Fanotify>,
    /// Kept open until the answer is written: its number names the event.
    event_fd: OwnedFd,
    pid: u32,
    /// What an allow sets in motion, for events that went to the sink.
    after: Option<AfterAnswer>,
    /// The policy decided the file alike for everyone, under this
    /// generation: the kernel may answer its next execs.
    per_file: Option<u64>,
}

/// What the gate's other parts need to hear about an answer.
struct AfterAnswer {
    /// Keeps the event's lease past an allow (when it has one).
    keeper: Option<LeaseKeeper>,
    pidfd: Option<OwnedFd>,
    file: (u64, u64),
    /// The version of the file decided.
    version: FileIdentity,
    /// The pairing to arm on an allow (and drop on a deny): this event's
    /// program names an interpreter.
    interpreter: Option<(Arc<Mutex<InterpreterLoads>>, u64)>,
    kernel: Arc<KernelCache>,
    /// The file's path, when the kernel may cache its allow.
    candidate_path: Option<String>,
}

impl FanotifyResponder {
    fn answer(mut self, verdict: Verdict) {
        let response = match verdict {
            Verdict::Allow => Response::FAN_ALLOW,
            Verdict::Deny => Response::FAN_DENY,
        };
        let allowed = verdict == Verdict::Allow;
        // Before the answer reaches the kernel, which then goes on at once.
        if let Some(after) = self.after.take() {
            if let Some((loads, event)) = &after.interpreter {
                loads
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .answered(self.pid, *event, allowed);
            }
            if allowed {
                match (self.per_file, &after.candidate_path) {
                    (Some(generation), Some(path)) => {
                        after.kernel.remember(
                            generation,
                            self.pid,
                            self.event_fd.as_fd(),
                            &after.version,
                            path,
                        );
                    }
                    _ => after.kernel.note_answered(self.pid, after.file),
                }
            }
            if allowed
                && let Some(keeper) = &after.keeper
                && let Ok(file) = self.event_fd.try_clone()
            {
                keeper.hold(HeldLease {
                    pid: self.pid,
                    _lease: file,
                    pidfd: after.pidfd,
                    exe: after.file,
                    since: Instant::now(),
                });
            }
        }
        if let Err(e) = self
            .fan
            .write_response(FanotifyResponse::new(self.event_fd.as_fd(), response))
        {
            tracing::error!(error = %e, ?verdict, "cannot answer a fanotify event");
        }
        // self.event_fd closes here, after the answer.
    }
}

impl Respond for FanotifyResponder {
    fn respond(self: Box<Self>, verdict: Verdict) {
        self.answer(verdict);
    }

    fn respond_decided_per_file(
        mut self: Box<Self>,
        verdict: Verdict,
        _cacheable: bool,
        per_file: Option<u64>,
    ) {
        self.per_file = per_file;
        self.answer(verdict);
    }
}

impl ExecGate for FanotifyGate {
    fn run(
        &mut self,
        sink: &mut dyn FnMut(PendingExec),
        shutdown: &Shutdown,
    ) -> Result<(), GateError> {
        super::raise_exec_path_priority();
        let mut buf = vec![0u8; READ_BUFFER];
        let mut notes = vec![0u8; READ_BUFFER];
        let mut noticed = Vec::new();
        let waiter = Waiter::new(&[
            Some((self.fan.as_fd(), libc::EPOLLIN)),
            Some((self.mountinfo.as_fd(), libc::EPOLLPRI | libc::EPOLLERR)),
            Some((shutdown.wake_fd().as_fd(), libc::EPOLLIN)),
            self.notifications
                .as_ref()
                .map(|group| (group.as_fd(), NOTIFICATIONS_ARMED)),
        ])
        .map_err(|e| io_error("cannot set up the gate's wait (epoll)", e))?;
        // Whether the notification group wakes the thread (see "One
        // wake-up per exec"); when not, the wait has a timeout.
        let mut notifications_armed = true;
        while !shutdown.is_requested() {
            let timeout = (!notifications_armed).then_some(NOTIFICATIONS_READ_WITHIN);
            let ready = match waiter.wait(timeout) {
                Ok(ready) => ready,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error("cannot wait for fanotify events", e)),
            };
            let [events_ready, mounts_changed, _, notified] = ready;
            let timed_out = ready == [false; 4];
            if notified {
                // EPOLLONESHOT: disarmed until re-armed.
                notifications_armed = false;
            }
            if mounts_changed && let Err(e) = self.refresh_mounts() {
                // Marks already placed keep working; the next change retries.
                tracing::error!(error = %e, "cannot read the mount table; new mounts are not gated");
            }
            if events_ready {
                // Each read drains the notification group first.
                while self.read_events(&mut buf, &mut notes, &mut noticed, sink)?
                    && !shutdown.is_requested()
                {}
            } else if notified || timed_out {
                let read = self.drain_notifications(&mut notes, &mut noticed);
                let found = noticed.len();
                for pending in noticed.drain(..) {
                    sink(pending);
                }
                read?;
                if timed_out && found == 0 {
                    // Quiet: block without a timeout until the next event
                    // of either group. MOD reports one that came meanwhile.
                    waiter
                        .rearm(3, NOTIFICATIONS_ARMED)
                        .map_err(|e| io_error("cannot re-arm the wait for notifications", e))?;
                    notifications_armed = true;
                }
            }
        }
        // Execs that ran on the kernel's cached allow before the stop are
        // audited too, not left in the group that closes with the gate.
        if self.kernel.may_notify() {
            let read = self.drain_notifications(&mut notes, &mut noticed);
            for pending in noticed.drain(..) {
                sink(pending);
            }
            if let Err(e) = read {
                tracing::warn!(error = %e, "cannot read the last notifications of cached execs");
            }
        }
        Ok(())
    }
}

/// How the notification group waits in the epoll set: once, then not
/// until re-armed.
const NOTIFICATIONS_ARMED: libc::c_int = libc::EPOLLIN | libc::EPOLLONESHOT;

/// The gate thread's wait for its descriptors (permission events, the
/// mount table, shutdown, notifications): one `epoll` set registered once.
struct Waiter {
    epoll: OwnedFd,
    /// The registered descriptors, by index, for [`Waiter::rearm`].
    fds: [Option<libc::c_int>; 4],
}

impl Waiter {
    /// Up to four descriptors and the events each waits for; the index in
    /// `fds` is what [`Waiter::wait`] reports (a `None` is never ready).
    /// The descriptors must outlive it.
    fn new(fds: &[Option<(BorrowedFd<'_>, libc::c_int)>; 4]) -> std::io::Result<Self> {
        // SAFETY: epoll_create1 takes flags only and returns a new fd or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just gave us this fd; nothing else owns it.
        let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
        let waiter = Self {
            epoll,
            fds: fds.map(|fd| fd.map(|(fd, _)| fd.as_raw_fd())),
        };
        for (index, fd) in fds.iter().enumerate() {
            if let Some((_, events)) = fd {
                waiter.control(libc::EPOLL_CTL_ADD, index, *events)?;
            }
        }
        Ok(waiter)
    }

    fn control(&self, op: libc::c_int, index: usize, events: libc::c_int) -> std::io::Result<()> {
        let Some(&Some(fd)) = self.fds.get(index) else {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        };
        let mut event = libc::epoll_event {
            events: events as u32,
            u64: index as u64,
        };
        // SAFETY: both fds are open (one ours, one the caller keeps open
        // while the waiter lives); the kernel only reads the event struct.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &raw mut event) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers a one-shot descriptor's events again.
    fn rearm(&self, index: usize, events: libc::c_int) -> std::io::Result<()> {
        self.control(libc::EPOLL_CTL_MOD, index, events)
    }

    /// Waits until one of the descriptors is ready, or `timeout` passed
    /// (then none is); which are.
    fn wait(&self, timeout: Option<Duration>) -> std::io::Result<[bool; 4]> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        let timeout_ms = timeout.map_or(-1, |t| {
            libc::c_int::try_from(t.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
        });
        // SAFETY: the kernel writes at most `events.len()` entries into the
        // array we own.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ready = [false; 4];
        for event in events.iter().take(n as usize) {
            if let Some(slot) = ready.get_mut(event.u64 as usize) {
                *slot = true;
            }
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_info_agrees_with_the_process_itself() {
        // SAFETY: pidfd_open(2) with our own pid and no flags.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, std::process::id(), 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as std::os::fd::RawFd) };
        assert!(pidfd_alive(pidfd.as_fd()));
        let Some(info) = pidfd_info(pidfd.as_fd(), std::process::id()) else {
            eprintln!("this kernel has no PIDFD_GET_INFO (Linux < 6.13): /proc is used instead");
            return;
        };
        assert_eq!(info.ppid, nix::unistd::getppid().as_raw() as u32);
        assert_eq!(info.uid, nix::unistd::getuid().as_raw());
        assert_eq!(info.euid, nix::unistd::geteuid().as_raw());
        assert_eq!(info.gid, nix::unistd::getgid().as_raw());
        assert_eq!(info.egid, nix::unistd::getegid().as_raw());
        assert!(
            pidfd_info(pidfd.as_fd(), std::process::id() + 1).is_none(),
            "pid is checked"
        );
    }

    #[test]
    fn a_remembered_path_counts_only_while_it_names_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"one").unwrap();
        let file = FileIdentity::of(&std::fs::metadata(&path).unwrap());
        let memo = FileMemo::default();
        memo.set_path(&file, path.to_str().unwrap());
        let remembered = memo.path(&file).unwrap();
        assert!(names_here(&remembered, &file));
        // Renamed away, and another file put at the old path: the
        // remembered path names something else now.
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        assert!(!names_here(&remembered, &file), "nothing there");
        std::fs::write(&path, b"two").unwrap();
        assert!(!names_here(&remembered, &file), "another file there");
        // A symlink at the path is not followed.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("moved"), &path).unwrap();
        assert!(!names_here(&remembered, &file), "a symlink to it");
    }

    #[test]
    fn the_file_memo_is_per_version_and_bounded() {
        let memo = FileMemo::default();
        let file = |ino: u64, ctime_ns: i64| FileIdentity {
            dev: 1,
            ino,
            size: 10,
            mtime_ns: 0,
            ctime_ns,
        };
        memo.set_head(
            &file(1, 5),
            &Head {
                interpreter: Some("/lib/ld.so".into()),
                loader: false,
            },
        );
        assert!(memo.head(&file(1, 5)).is_some());
        assert!(
            memo.head(&file(1, 6)).is_none(),
            "a new version is read again"
        );
        for ino in 2..=MEMO_CAPACITY as u64 + 1 {
            memo.set_path(&file(ino, 0), "/x");
        }
        let len = memo.with(|files| files.len());
        assert!(len <= MEMO_CAPACITY, "{len} files remembered");
    }

    #[test]
    fn pidfd_records_are_found_among_info_records() {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(write);
        let raw = read.as_raw_fd();
        std::mem::forget(read); // pidfd_from_info takes ownership
        let mut info = Vec::new();
        // An unknown record type (len 12), then a pidfd record (len 8).
        info.extend_from_slice(&[99, 0]);
        info.extend_from_slice(&12u16.to_ne_bytes());
        info.extend_from_slice(&[0; 8]);
        info.extend_from_slice(&[libc::FAN_EVENT_INFO_TYPE_PIDFD, 0]);
        info.extend_from_slice(&8u16.to_ne_bytes());
        info.extend_from_slice(&raw.to_ne_bytes());
        let found = pidfd_from_info(&info).unwrap();
        assert_eq!(found.as_raw_fd(), raw);

        let mut no_pidfd = Vec::new();
        no_pidfd.extend_from_slice(&[libc::FAN_EVENT_INFO_TYPE_PIDFD, 0]);
        no_pidfd.extend_from_slice(&8u16.to_ne_bytes());
        no_pidfd.extend_from_slice(&libc::FAN_NOPIDFD.to_ne_bytes());
        assert!(pidfd_from_info(&no_pidfd).is_none());
        assert!(
            pidfd_from_info(&[1, 0, 0, 0]).is_none(),
            "a zero length stops"
        );
        assert!(pidfd_from_info(&[]).is_none());
    }
}
