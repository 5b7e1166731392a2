//! The running hook on Linux: its thread, the facts of a held exec, and
//! the answer that continues it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use epm_audit::{AuditEvent, EventKind};
use epm_exec_hook::{EventKind as HookEvent, ExecEvent, ExecHook, Verdicts, kernel_dev_to_user};
use epm_policy::PathOrigin;

use super::{Prepared, SharedStatus, not_running};
use crate::exec::audit::AuditSink;
use crate::exec::decider::Decider;
use crate::exec::pipeline::Intake;
use crate::gate::{ExecFacts, FactNeeds, FileIdentity, PendingExec, Respond, Shutdown, Verdict};

/// At most this many descriptors of a held process are looked at to find
/// the file it execs (a memfd, or a file opened and run with fexecve).
const FD_SCAN_LIMIT: usize = 1024;

/// The hook's thread; join it before the decision workers, whose intake it
/// holds.
#[derive(Debug)]
pub struct Running {
    thread: Option<JoinHandle<()>>,
}

impl Running {
    /// Waits for the thread, which ends once `shutdown` is requested; the
    /// programs detach when it drops the hook.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Attaches the prepared hook once fanotify's marks are known, and starts
/// its thread. A hook that fails now is reported in the status, and epmd
/// runs on fanotify alone.
pub fn start(
    prepared: Prepared,
    intake: Intake,
    decider: Arc<Decider>,
    audit: AuditSink,
    needs: Arc<FactNeeds>,
    shutdown: Shutdown,
) -> Option<Running> {
    let status = prepared.status;
    let hook = prepared.hook?;
    let fail = |what: String| {
        tracing::error!("{what}");
        *status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            not_running("unavailable", what.clone());
        let mut event = AuditEvent::new(EventKind::ERROR);
        event.reason = Some(what);
        audit.send(event);
    };
    let coverage = match hook.coverage() {
        Ok(coverage) => coverage,
        Err(error) => {
            fail(format!(
                "the kernel hook cannot start: {error}; fanotify alone gates execs"
            ));
            return None;
        }
    };
    if let Err(error) = sync_coverage(&coverage) {
        fail(format!(
            "the kernel hook cannot learn what fanotify gates: {error}; fanotify alone gates execs"
        ));
        return None;
    }
    let hook = match hook.attach() {
        Ok(hook) => hook,
        Err(error) => {
            fail(format!(
                "the kernel hook cannot attach: {error}; fanotify alone gates execs"
            ));
            return None;
        }
    };
    tracing::info!("kernel exec hook attached");
    let thread = std::thread::Builder::new()
        .name("epm-exec-hook".into())
        .spawn(move || {
            let attached = Arc::new(AtomicBool::new(true));
            let mut adapter = Adapter {
                verdicts: hook.verdicts(),
                intake,
                decider,
                audit,
                needs,
                status,
                attached: attached.clone(),
                own_mnt_ns: std::fs::metadata("/proc/self/ns/mnt").map_or(0, |m| m.ino()),
                floods: HashMap::new(),
            };
            adapter.run(&hook, &coverage, &shutdown);
            // Execs still being decided are answered after this: a deny
            // then kills the held process, as the hook can no longer refuse.
            attached.store(false, Ordering::SeqCst);
            drop(hook);
        })
        .ok()?;
    Some(Running {
        thread: Some(thread),
    })
}

struct Adapter {
    verdicts: Verdicts,
    intake: Intake,
    decider: Arc<Decider>,
    audit: AuditSink,
    needs: Arc<FactNeeds>,
    status: SharedStatus,
    attached: Arc<AtomicBool>,
    own_mnt_ns: u64,
    /// Refusals of held-exec floods, per uid: when last recorded, and how
    /// many since, so a flood is one record a second, not one per exec.
    floods: HashMap<u32, (Instant, u64)>,
}

impl Adapter {
    fn run(&mut self, hook: &ExecHook, coverage: &epm_exec_hook::Coverage, shutdown: &Shutdown) {
        let mountinfo = File::open("/proc/self/mountinfo").ok();
        while !shutdown.is_requested() {
            let mut events = Vec::new();
            match hook.poll(Duration::from_millis(100), &mut |event| events.push(event)) {
                Ok(0) => {}
                Ok(unreadable) => {
                    tracing::error!(unreadable, "kernel hook records of an unknown layout")
                }
                Err(error) => {
                    tracing::error!(%error, "cannot read the kernel hook's events");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            for event in events {
                self.handle(event);
            }
            if mountinfo.as_ref().is_some_and(mounts_changed)
                && let Err(error) = sync_coverage(coverage)
            {
                tracing::error!(%error, "cannot update what fanotify gates in the kernel hook");
            }
            self.status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unrecorded_refusals = hook.unrecorded_refusals();
        }
    }

    fn handle(&mut self, event: ExecEvent) {
        match event.kind() {
            Some(HookEvent::RefusedFlood) => self.record_flood(&event),
            Some(HookEvent::Exec | HookEvent::LoaderProgram) => self.decide(event),
            None => {}
        }
    }

    fn decide(&mut self, event: ExecEvent) {
        let facts = self.facts(&event);
        let responder = HookResponder {
            event,
            verdicts: self.verdicts.clone(),
            attached: self.attached.clone(),
        };
        // Content the daemon cannot pin (a FUSE process serves it; a memfd
        // still writable; a file it could not open) might be any program:
        // allowed only when no rule denies by content.
        if facts.content.is_none() && self.decider.policy().engine.restricts_by_content() {
            let why = if event.fuse() {
                "served by a FUSE process, which can give the kernel other bytes than epmd reads"
            } else if event.writable() {
                "a memfd still open for writing and not sealed (F_SEAL_WRITE)"
            } else {
                "epmd could not read the file being executed"
            };
            let record = self.content_refusal(&facts, why);
            Box::new(responder).respond(Verdict::Deny);
            self.audit.send(record);
            return;
        }
        let pending = PendingExec::new(facts, Box::new(responder), self.decider.fail_verdict());
        self.intake.submit(pending);
    }

    /// The record of an exec refused because its content cannot be pinned.
    fn content_refusal(&self, facts: &ExecFacts, why: &str) -> AuditEvent {
        let decider = &self.decider;
        let mut event = AuditEvent::new(EventKind::EXEC);
        event.decision = Some("deny".to_owned());
        event.reason = Some(format!(
            "its content cannot be pinned ({why}) and the policy denies programs by content"
        ));
        event.mode = Some(decider.mode().as_str().to_owned());
        event.pid = Some(facts.pid);
        event.ppid = Some(facts.ppid);
        event.uid = Some(facts.uid);
        event.user = decider.names().user(facts.uid).map(|n| n.to_string());
        event.path = Some(facts.path.clone());
        event.device_id = Some(decider.device_id().to_owned());
        event.policy_version = Some(decider.policy().engine.version());
        event
            .with_detail("answered_by", "kernel_hook")
            .with_detail("path_origin", facts.path_origin.as_str())
    }

    fn record_flood(&mut self, event: &ExecEvent) {
        let now = Instant::now();
        let entry = self.floods.entry(event.uid).or_insert((now, 0));
        entry.1 += 1;
        if entry.1 > 1 && now.duration_since(entry.0) < Duration::from_secs(1) {
            return;
        }
        let refused = std::mem::take(&mut entry.1);
        entry.0 = now;
        let mut record = AuditEvent::new(EventKind::EXEC);
        record.decision = Some("deny".to_owned());
        record.reason = Some(format!(
            "{refused} exec(s) refused (EAGAIN): this user already had the most execs held for a decision (kernel_hook.max_held_per_uid)"
        ));
        record.uid = Some(event.uid);
        record.pid = Some(event.tgid);
        record.path = event.path();
        record.device_id = Some(self.decider.device_id().to_owned());
        self.audit.send(
            record
                .with_detail("answered_by", "kernel_hook")
                .with_detail("count", refused),
        );
        if self.floods.len() > 4096 {
            self.floods
                .retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(1));
        }
    }

    fn facts(&self, event: &ExecEvent) -> ExecFacts {
        let identity = FileIdentity {
            dev: kernel_dev_to_user(event.file.dev),
            ino: event.file.ino,
            size: event.file.size as u64,
            mtime_ns: event.file.mtime_ns,
            ctime_ns: event.file.ctime_ns,
        };
        let seen = event.path().unwrap_or_default();
        let (path, origin) = name_of(event, &seen, identity, self.own_mnt_ns);
        // FUSE content is read from its server: opening it could also
        // block this thread for as long as the server likes.
        let content = (!event.fuse() && !event.writable())
            .then(|| find_content(event.tgid, &seen, identity))
            .flatten();
        let status = std::fs::read_to_string(format!("/proc/{}/status", event.tgid))
            .ok()
            .and_then(|text| crate::gate::procfs::parse_status(&text))
            .unwrap_or_default();
        let parent_path = (self.needs.parent_path() && status.ppid > 0)
            .then(|| std::fs::read_link(format!("/proc/{}/exe", status.ppid)).ok())
            .flatten()
            .map(|p| p.to_string_lossy().into_owned());
        ExecFacts {
            path_origin: origin,
            uid: event.uid,
            gid: event.gid,
            groups: status.groups,
            ppid: status.ppid,
            parent_path,
            content,
            ..ExecFacts::new(event.tgid, identity, path)
        }
    }
}

/// The name a held exec's file goes by, and whose it is: a memfd's own
/// name (its creator's choice); a path checked in the daemon's mount
/// namespace; or the task's view, which is the user's to forge.
fn name_of(
    event: &ExecEvent,
    seen: &str,
    identity: FileIdentity,
    own_mnt_ns: u64,
) -> (String, PathOrigin) {
    if event.kernel_internal() {
        let name = seen
            .trim_start_matches('/')
            .trim_end_matches(" (deleted)")
            .to_owned();
        return (name, PathOrigin::Anonymous);
    }
    let same_file =
        std::fs::metadata(seen).is_ok_and(|m| m.dev() == identity.dev && m.ino() == identity.ino);
    if u64::from(event.mnt_ns) == own_mnt_ns && same_file {
        (seen.to_owned(), PathOrigin::Local)
    } else {
        (seen.to_owned(), PathOrigin::OtherNamespace)
    }
}

/// Opens the exact file version a held process execs: among its open
/// descriptors (a memfd, `fexecve`), else at its path in its own root.
/// Only a regular file of that device, inode, size, mtime and ctime is
/// returned; anything else is `None`, and the exec is decided without its
/// content.
fn find_content(tgid: u32, seen: &str, identity: FileIdentity) -> Option<File> {
    let open_if_same = |candidate: &Path| -> Option<File> {
        // stat first: never open a device or a FIFO a process holds.
        let meta = std::fs::metadata(candidate).ok()?;
        if !meta.is_file() || meta.dev() != identity.dev || meta.ino() != identity.ino {
            return None;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(candidate)
            .ok()?;
        (FileIdentity::of(&file.metadata().ok()?) == identity).then_some(file)
    };
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{tgid}/fd")) {
        for entry in entries.flatten().take(FD_SCAN_LIMIT) {
            if let Some(file) = open_if_same(&entry.path()) {
                return Some(file);
            }
        }
    }
    if seen.starts_with('/') && !seen.ends_with(" (deleted)") {
        let in_its_root = PathBuf::from(format!("/proc/{tgid}/root")).join(&seen[1..]);
        return open_if_same(&in_its_root);
    }
    None
}

/// Answers a held exec: the verdict for that thread and file version, then
/// SIGCONT, which reruns the call the hook answers from the verdict.
struct HookResponder {
    event: ExecEvent,
    verdicts: Verdicts,
    attached: Arc<AtomicBool>,
}

impl Respond for HookResponder {
    fn respond(self: Box<Self>, verdict: Verdict) {
        let allow = verdict == Verdict::Allow;
        if !self.attached.load(Ordering::SeqCst) {
            // The hook is gone (epmd is stopping): a continued exec would
            // run unchecked, so a refused one is ended instead.
            if !allow {
                // SAFETY: kill(2) on the held process; it never ran the program.
                unsafe { libc::kill(self.event.tgid as i32, libc::SIGKILL) };
                return;
            }
        } else if let Err(error) = self.verdicts.set(&self.event, allow) {
            tracing::error!(%error, pid = self.event.tgid, "cannot store a verdict in the kernel hook");
        }
        if let Err(error) = epm_exec_hook::continue_process(&self.event) {
            tracing::debug!(%error, pid = self.event.tgid, "a held process is gone");
        }
    }
}

/// Whether the daemon's mount table changed since the last read (and
/// re-arms the notification).
fn mounts_changed(mountinfo: &File) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(
        mountinfo.as_fd(),
        PollFlags::POLLPRI | PollFlags::POLLERR,
    )];
    let changed = matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0);
    if changed {
        use std::io::{Read, Seek, SeekFrom};
        let mut reader = mountinfo;
        let _ = reader.seek(SeekFrom::Start(0));
        let _ = std::io::copy(&mut reader.take(16 << 20), &mut std::io::sink());
    }
    changed
}

/// Tells the hook what epmd's fanotify group has marked, read from the
/// group's own fdinfo: exactly the marks in place, never what was meant.
fn sync_coverage(coverage: &epm_exec_hook::Coverage) -> std::io::Result<()> {
    let fd = fanotify_fd()?;
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    let marks = parse_fdinfo(&fdinfo);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounts = crate::gate::mountinfo::parse(&mountinfo);
    let unique_ids: Vec<u64> = marks
        .mounts
        .iter()
        .filter_map(|id| mounts.iter().find(|m| m.id == *id))
        .filter_map(|m| unique_mount_id(&m.mount_point, m.id))
        .collect();
    coverage
        .replace(&marks.filesystems, &unique_ids)
        .map_err(std::io::Error::other)
}

/// The daemon's fanotify group.
fn fanotify_fd() -> std::io::Result<i32> {
    for entry in std::fs::read_dir("/proc/self/fd")?.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|t| t == Path::new("anon_inode:[fanotify]"))
            && let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            return Ok(fd);
        }
    }
    Err(std::io::Error::other("epmd has no fanotify group"))
}

/// A fanotify group's marks, from its fdinfo.
#[derive(Debug, Default, PartialEq)]
struct Marks {
    /// Superblocks (the kernel's `s_dev`).
    filesystems: Vec<u32>,
    /// Mounts (mount ids as mountinfo gives them).
    mounts: Vec<u64>,
}

fn parse_fdinfo(text: &str) -> Marks {
    let mut marks = Marks::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("fanotify ") else {
            continue;
        };
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v, 16).ok())
        };
        if field("ino:").is_some() {
            continue; // an inode mark
        }
        if let Some(dev) = field("sdev:") {
            marks.filesystems.extend(u32::try_from(dev).ok());
        } else if let Some(id) = field("mnt_id:") {
            marks.mounts.push(id);
        }
    }
    marks
}

/// The never-reused id of the mount at `point` (Linux 6.8), if that path
/// still reaches the mount with id `id` (not one mounted over it).
fn unique_mount_id(point: &Path, id: u64) -> Option<u64> {
    const STATX_MNT_ID: u32 = 0x1000;
    const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(point)
        .ok()?;
    let query = |mask: u32| -> Option<u64> {
        use std::os::fd::AsRawFd;
        // SAFETY: statx is plain integers: all zeroes is a valid value.
        let mut buf: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: statx(2) with AT_EMPTY_PATH on a descriptor we own,
        // writing one statx struct we own.
        let rc = unsafe {
            libc::statx(
                dir.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                mask,
                &raw mut buf,
            )
        };
        (rc == 0 && buf.stx_mask & mask != 0).then_some(buf.stx_mnt_id)
    };
    (query(STATX_MNT_ID)? == id).then(|| query(STATX_MNT_ID_UNIQUE))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_gives_filesystem_and_mount_marks_not_inode_marks() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t16\nino:\t1057\n\
            fanotify flags:10 event-flags:8000\n\
            fanotify sdev:fe00000 mflags:0 mask:40000 ignored_mask:0\n\
            fanotify mnt_id:2a mflags:0 mask:40000 ignored_mask:0\n\
            fanotify ino:3 sdev:800001 mflags:0 mask:40000 ignored_mask:0 fhandle-bytes:8\n";
        assert_eq!(
            parse_fdinfo(text),
            Marks {
                filesystems: vec![0xfe0_0000],
                mounts: vec![0x2a],
            }
        );
    }

    #[test]
    fn a_memfd_is_named_by_itself_and_a_foreign_path_is_untrusted() {
        let file = epm_exec_hook::FileKey::new(1, 2, 3, 4, 5);
        let identity = FileIdentity {
            dev: kernel_dev_to_user(1),
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        };
        let memfd = ExecEvent::for_test(HookEvent::Exec, 1, file, "/memfd:tool (deleted)")
            .with_flags(true, false, false);
        assert_eq!(
            name_of(&memfd, "/memfd:tool (deleted)", identity, 0),
            ("memfd:tool".to_owned(), PathOrigin::Anonymous)
        );
        // /usr/bin/true exists here, but is not this file: forged.
        let mut elsewhere = ExecEvent::for_test(HookEvent::Exec, 1, file, "/usr/bin/true");
        let own = std::fs::metadata("/proc/self/ns/mnt").unwrap().ino();
        elsewhere.mnt_ns = own as u32;
        assert_eq!(
            name_of(&elsewhere, "/usr/bin/true", identity, own).1,
            PathOrigin::OtherNamespace
        );
        let real = std::fs::metadata("/usr/bin/true").unwrap();
        let local = FileIdentity::of(&real);
        assert_eq!(
            name_of(&elsewhere, "/usr/bin/true", local, own).1,
            PathOrigin::Local
        );
    }

    #[test]
    fn the_content_of_a_held_exec_is_found_among_its_descriptors() {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"a program").unwrap();
        let identity = FileIdentity::of(&file.metadata().unwrap());
        let found = find_content(std::process::id(), "/nowhere", identity).unwrap();
        assert_eq!(FileIdentity::of(&found.metadata().unwrap()), identity);
        // Another version of it is not the file being executed.
        file.write_all(b" changed").unwrap();
        assert!(find_content(std::process::id(), "/nowhere", identity).is_none());
    }
}
