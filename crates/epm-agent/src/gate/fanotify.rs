//! The Linux exec gate: fanotify `FAN_OPEN_EXEC_PERM` on every watched mount.
//!
//! Thin by design: read events, gather facts from the event fd and `/proc`,
//! hand them on, write answers. Everything else is platform-neutral.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::mountinfo::{self, Mount};
use super::procfs;
use super::{
    ExecFacts, ExecGate, FactNeeds, FileIdentity, GateError, PendingExec, Respond, Shutdown,
    Verdict,
};

// Constants from <linux/fanotify.h> that the libc crate may not carry on
// every version; the values are kernel ABI and never change.
const FAN_REPORT_PIDFD: u32 = 0x0000_0080;
const FAN_EVENT_INFO_TYPE_PIDFD: u8 = 4;
const FAN_NOPIDFD: i32 = -1;

/// Size of `struct fanotify_event_metadata`.
const METADATA_LEN: usize = std::mem::size_of::<libc::fanotify_event_metadata>();

/// The fanotify gate.
#[derive(Debug)]
pub struct FanotifyGate {
    fan: Arc<OwnedFd>,
    mountinfo: File,
    watch_paths: Vec<PathBuf>,
    marked: HashSet<u64>,
    has_pidfd: bool,
    own_pid: u32,
    fallback: Verdict,
    needs: Arc<FactNeeds>,
}

fn io_error(what: impl Into<String>, source: std::io::Error) -> GateError {
    GateError::Io {
        what: what.into(),
        source,
    }
}

impl FanotifyGate {
    /// Creates the fanotify group and marks every watched mount.
    /// `fallback` answers execs that are dropped unanswered.
    pub fn new(watch_paths: Vec<PathBuf>, fallback: Verdict) -> Result<Self, GateError> {
        let base = libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        // SAFETY: fanotify_init takes two integer flag words and returns a new fd or -1.
        let mut fd = unsafe { libc::fanotify_init(base | FAN_REPORT_PIDFD, event_flags) };
        let mut has_pidfd = true;
        if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // Kernels before 5.15 have no pidfd reporting; /proc reads then
            // race with pid reuse, which is the best such kernels offer.
            has_pidfd = false;
            // SAFETY: as above.
            fd = unsafe { libc::fanotify_init(base, event_flags) };
        }
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            let message = match error.raw_os_error() {
                Some(libc::EPERM) => "fanotify needs CAP_SYS_ADMIN: run epmd as root".to_owned(),
                Some(libc::ENOSYS) | Some(libc::EINVAL) => format!(
                    "this kernel cannot gate execs ({error}): EPM needs Linux 5.0 or later built with CONFIG_FANOTIFY_ACCESS_PERMISSIONS"
                ),
                _ => format!("fanotify_init failed: {error}"),
            };
            return Err(GateError::Unavailable(message));
        }
        // SAFETY: fd is a new descriptor we own.
        let fan = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let mountinfo = File::open("/proc/self/mountinfo")
            .map_err(|e| io_error("cannot open /proc/self/mountinfo", e))?;
        let mut gate = Self {
            fan,
            mountinfo,
            watch_paths,
            marked: HashSet::new(),
            has_pidfd,
            own_pid: std::process::id(),
            fallback,
            needs: Arc::new(FactNeeds::all()),
        };
        gate.mark_new_mounts()?;
        if gate.marked.is_empty() {
            return Err(GateError::Unavailable(format!(
                "no mount of a watched file-system type at or below {:?}",
                gate.watch_paths
            )));
        }
        Ok(gate)
    }

    /// Shares what the policy needs: the daemon keeps the parent lookup
    /// (a /proc readlink) and the group list (a /proc status read) off while
    /// no rule uses them. Without this, every fact is gathered.
    pub fn set_fact_needs(&mut self, needs: Arc<FactNeeds>) {
        self.needs = needs;
    }

    /// Whether the kernel reports pidfds with events.
    pub fn has_pidfd(&self) -> bool {
        self.has_pidfd
    }

    /// How many mounts are marked.
    pub fn marked_mounts(&self) -> usize {
        self.marked.len()
    }

    /// Marks mounts that appeared since the last call.
    fn mark_new_mounts(&mut self) -> Result<(), GateError> {
        let mut text = String::new();
        self.mountinfo
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.mountinfo.read_to_string(&mut text))
            .map_err(|e| io_error("cannot read /proc/self/mountinfo", e))?;
        let mounts = mountinfo::parse(&text);
        let present: HashSet<u64> = mounts.iter().map(|m| m.id).collect();
        self.marked.retain(|id| present.contains(id));
        for mount in mounts {
            if self.marked.contains(&mount.id) || !mountinfo::is_watched(&mount, &self.watch_paths)
            {
                continue;
            }
            match self.mark(&mount) {
                Ok(()) => {
                    tracing::debug!(mount = %mount.mount_point.display(), fs = %mount.fs_type, "gating mount");
                    self.marked.insert(mount.id);
                }
                // A mount can vanish between reading the table and marking it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => tracing::warn!(mount = %mount.mount_point.display(), error = %e,
                    "cannot gate this mount; execs from it are not checked"),
            }
        }
        Ok(())
    }

    fn mark(&self, mount: &Mount) -> std::io::Result<()> {
        let path = CString::new(mount.mount_point.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: valid fanotify fd, flag words, AT_FDCWD and a NUL-terminated path.
        let rc = unsafe {
            libc::fanotify_mark(
                self.fan.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
                libc::FAN_OPEN_EXEC_PERM,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one buffer of events and hands each on.
    fn read_events(
        &mut self,
        buf: &mut [u8],
        sink: &mut dyn FnMut(PendingExec),
    ) -> Result<(), GateError> {
        // SAFETY: reading into a buffer we own, of its length.
        let n = unsafe { libc::read(self.fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(io_error("cannot read fanotify events", error)),
            };
        }
        let mut offset = 0usize;
        let end = n as usize;
        while offset + METADATA_LEN <= end {
            // SAFETY: at least METADATA_LEN bytes remain; read_unaligned copes
            // with any alignment of the byte buffer.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
            let event_len = meta.event_len as usize;
            if meta.vers != libc::FANOTIFY_METADATA_VERSION
                || event_len < METADATA_LEN
                || offset + event_len > end
            {
                tracing::error!(
                    version = meta.vers,
                    "unexpected fanotify event format; stopping this read"
                );
                break;
            }
            let info = &buf[offset + meta.metadata_len as usize..offset + event_len];
            self.handle_event(&meta, info, sink);
            offset += event_len;
        }
        Ok(())
    }

    fn handle_event(
        &self,
        meta: &libc::fanotify_event_metadata,
        info: &[u8],
        sink: &mut dyn FnMut(PendingExec),
    ) {
        let pidfd = pidfd_from_info(info);
        if meta.mask & libc::FAN_Q_OVERFLOW != 0 {
            tracing::error!("fanotify queue overflowed");
        }
        if meta.fd < 0 {
            return;
        }
        // SAFETY: the kernel opened this fd for us with the event.
        let event_fd = unsafe { OwnedFd::from_raw_fd(meta.fd) };
        if meta.mask & libc::FAN_OPEN_EXEC_PERM == 0 {
            return;
        }
        let responder = Box::new(FanotifyResponder {
            fan: self.fan.clone(),
            event_fd: meta.fd,
        });
        let pid = u32::try_from(meta.pid).unwrap_or(0);
        if pid == self.own_pid {
            // Our own execs are allowed at once: a daemon that gated itself
            // could deadlock waiting for its own answer.
            responder.respond(Verdict::Allow);
            return;
        }
        let facts = gather_facts(pid, event_fd, pidfd.as_ref(), &self.needs);
        match facts {
            Some(facts) => sink(PendingExec::new(facts, responder, self.fallback)),
            None => {
                // The process died while we looked (the pidfd says so): the
                // exec cannot proceed anyway; deny rather than decide on facts
                // that may belong to a recycled pid.
                responder.respond(Verdict::Deny);
            }
        }
    }
}

/// Extracts the pidfd info record, if present, taking ownership of the fd.
fn pidfd_from_info(mut info: &[u8]) -> Option<OwnedFd> {
    let mut found = None;
    while info.len() >= 4 {
        let info_type = info[0];
        let len = u16::from_ne_bytes([info[2], info[3]]) as usize;
        if len < 4 || len > info.len() {
            break;
        }
        if info_type == FAN_EVENT_INFO_TYPE_PIDFD && len >= 8 {
            let fd = i32::from_ne_bytes([info[4], info[5], info[6], info[7]]);
            if fd >= 0 && fd != FAN_NOPIDFD {
                // SAFETY: the kernel installed this pidfd for us.
                found = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        info = &info[len..];
    }
    found
}

/// Whether the process behind a pidfd is still alive.
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

fn gather_facts(
    pid: u32,
    event_fd: OwnedFd,
    pidfd: Option<&OwnedFd>,
    needs: &FactNeeds,
) -> Option<ExecFacts> {
    let file = File::from(event_fd);
    let (identity, path) = match file.metadata() {
        Ok(meta) => (
            FileIdentity {
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
            },
            fd_path(file.as_fd()),
        ),
        Err(_) => (
            FileIdentity {
                dev: 0,
                ino: 0,
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
            },
            fd_path(file.as_fd()),
        ),
    };
    // At FAN_OPEN_EXEC_PERM time /proc/PID still shows the process before
    // the exec: its credentials and parent are right, its exe/cmdline are the
    // old program's, which is why the file comes from the event fd.
    let mut buf = [0u8; 4096];
    // Credentials and parent from the pidfd where the kernel offers them
    // (no /proc formatting); /proc/PID/status when groups are needed or the
    // kernel is older than 6.13.
    let from_pidfd = pidfd.and_then(|p| pidfd_info(p.as_fd(), pid));
    let status = match from_pidfd {
        Some(status) if !needs.groups() => Some(status),
        _ => read_small(&format!("/proc/{pid}/status"), &mut buf).and_then(procfs::parse_status),
    };
    if let Some(pidfd) = pidfd
        && !pidfd_alive(pidfd.as_fd())
    {
        return None;
    }
    // Without credentials the exec would be decided (and audited) as uid 0:
    // the process is gone or /proc is unreadable, so refuse instead.
    let status = status?;
    // The login uid names the human behind sudo or su; for anyone but root
    // it is the uid itself, so only root's execs pay for reading it.
    let login_uid = if status.uid == 0 {
        read_small(&format!("/proc/{pid}/loginuid"), &mut buf).and_then(procfs::parse_loginuid)
    } else {
        None
    };
    let parent_path = (needs.parent_path() && status.ppid > 0)
        .then(|| std::fs::read_link(format!("/proc/{}/exe", status.ppid)).ok())
        .flatten()
        .map(|p| p.to_string_lossy().into_owned());
    Some(ExecFacts {
        uid: status.uid,
        gid: status.gid,
        groups: status.groups,
        login_uid,
        ppid: status.ppid,
        parent_path,
        content: Some(file),
        ..ExecFacts::new(pid, identity, path)
    })
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
        groups: Vec::new(),
    })
}

/// Reads a small /proc file with one open, one read and one close: this runs
/// for every exec, and std's read_to_string would add a stat and a second read.
fn read_small<'a>(path: &str, buf: &'a mut [u8]) -> Option<&'a str> {
    let mut file = File::open(path).ok()?;
    let n = file.read(buf).ok()?;
    std::str::from_utf8(&buf[..n]).ok()
}

fn fd_path(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Answers one event on the shared fanotify fd. 8-byte writes to a fanotify
/// fd are atomic, so workers on several threads answer concurrently.
struct FanotifyResponder {
    fan: Arc<OwnedFd>,
    event_fd: RawFd,
}

impl Respond for FanotifyResponder {
    fn respond(self: Box<Self>, verdict: Verdict) {
        let response = libc::fanotify_response {
            fd: self.event_fd,
            response: match verdict {
                Verdict::Allow => libc::FAN_ALLOW,
                Verdict::Deny => libc::FAN_DENY,
            },
        };
        // SAFETY: writes exactly one fanotify_response from a local value.
        let n = unsafe {
            libc::write(
                self.fan.as_raw_fd(),
                (&raw const response).cast(),
                std::mem::size_of::<libc::fanotify_response>(),
            )
        };
        if n < 0 {
            tracing::error!(error = %std::io::Error::last_os_error(), "cannot answer fanotify event");
        }
    }
}

impl ExecGate for FanotifyGate {
    fn run(
        &mut self,
        sink: &mut dyn FnMut(PendingExec),
        shutdown: &Shutdown,
    ) -> Result<(), GateError> {
        let mut buf = vec![0u8; 64 * 1024];
        while !shutdown.is_requested() {
            let fan = self.fan.clone();
            let mut fds = [
                PollFd::new(fan.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.mountinfo.as_fd(), PollFlags::POLLPRI),
                PollFd::new(shutdown.wake_fd().as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io_error("cannot poll fanotify", e.into())),
            }
            let ready = |fd: &PollFd<'_>, flags| fd.revents().is_some_and(|r| r.intersects(flags));
            let events_ready = ready(&fds[0], PollFlags::POLLIN);
            let mounts_changed = ready(&fds[1], PollFlags::POLLPRI | PollFlags::POLLERR);
            if mounts_changed {
                self.mark_new_mounts()?;
            }
            if events_ready {
                self.read_events(&mut buf, sink)?;
            }
        }
        Ok(())
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
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let Some(info) = pidfd_info(pidfd.as_fd(), std::process::id()) else {
            eprintln!("this kernel has no PIDFD_GET_INFO (Linux < 6.13): /proc is used instead");
            return;
        };
        assert_eq!(info.ppid, nix::unistd::getppid().as_raw() as u32);
        assert_eq!(info.uid, nix::unistd::getuid().as_raw());
        assert_eq!(info.euid, nix::unistd::geteuid().as_raw());
        assert_eq!(info.gid, nix::unistd::getgid().as_raw());
        assert!(
            pidfd_info(pidfd.as_fd(), std::process::id() + 1).is_none(),
            "pid is checked"
        );
    }
}
