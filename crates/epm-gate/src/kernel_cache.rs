//! The kernel cache of allows (Linux): a file the policy allows for
//! everyone is answered by the kernel itself on its next execs, and those
//! execs are still audited.
//!
//! # How
//! After a worker (or the intake, from the decision cache) allows an exec
//! whose decision cannot depend on who runs the file
//! ([`epm_policy::Engine::decides_alike_for_everyone`]: no user or group
//! scope, `args_regex` or `parent_path` on any rule that could match it; a
//! plain policy allow, never a grant's, a monitor pass or `fail_mode`'s), the
//! gate puts two *inode* marks on the file, one in each of its fanotify
//! groups, before it writes the answer:
//! - in the *notification* group (`FAN_CLASS_NOTIF`), a `FAN_OPEN_EXEC`
//!   notification: an exec the ignore mask lets through still reaches the
//!   daemon, after the fact and without blocking it, and is audited with
//!   `answered_by: kernel_cache` (decided again, without grants, for the
//!   record);
//! - in the *permission* group (the gate's), an ignore mask for
//!   `FAN_OPEN_EXEC_PERM` (`FAN_MARK_IGNORE`), *without*
//!   `FAN_MARK_IGNORED_SURV_MODIFY`: the kernel clears it on the file's
//!   next write (`FS_MODIFY`: `write`, truncation, `fallocate`, copies into
//!   it), and the exec after that is asked again.
//!
//! Two groups, so that a notification does not wake the gate's thread on
//! its own: the gate waits on the permission group and reads the
//! notification group on each wake-up (see [`super::fanotify`], "One
//! wake-up per exec"). In one group, a dynamically linked program's
//! notification (queued when the kernel opens the program) and its
//! loader's permission event (queued a moment later) were two wake-ups.
//!
//! Only inode marks hold cached allows (the watch marks are mount and
//! file-system marks of the permission group; the notification group has
//! no others), so `FAN_MARK_FLUSH` without `FAN_MARK_MOUNT` or
//! `FAN_MARK_FILESYSTEM` removes exactly the cache and leaves the gate's
//! watch marks in place: the gate never opens while the cache is emptied.
//!
//! # Invariant: no ignore mask without its notification
//! An ignore mask alone would let an exec run unaudited, so every step
//! keeps "ignore mark implies notification mark" true at every moment:
//! - **Add**: the notification mark first, then the ignore mark; if the
//!   ignore mark fails, the notification mark is taken off again (a
//!   notification mark alone is harmless: its execs were asked, and are
//!   dropped as such).
//! - **Remove** (one file, [`KernelCache::forget`]; or the undo of a half
//!   add): the ignore mark first, then the notification mark. If the
//!   ignore mark cannot be removed, the notification mark stays and the
//!   whole cache is flushed.
//! - **Flush** (every policy change, [`PolicySwap`]): the permission
//!   group's inode marks (the ignore masks) first, then the notification
//!   group's. If the first flush fails, the second is not done and nothing
//!   more is cached.
//! - **Eviction**: the marks are evictable (`FAN_MARK_EVICTABLE`, Linux
//!   5.19): they do not pin the inode in memory, and the kernel drops them
//!   only when it evicts the inode itself, which needs every mark on it,
//!   in every group, to be evictable (a non-evictable mark holds an inode
//!   reference). Eviction then drops *all* of the inode's marks at once,
//!   and an inode read in again has none: the ignore mark can never outlive
//!   the notification mark there, and an evicted pair is only a miss (the
//!   next exec is asked). Both marks are added with the same flag (on a
//!   kernel without evictable marks, neither has it).
//!
//! # Invariant: no cached allow outlives the policy or content it was made for
//! - **Policy**: every policy change goes through [`KernelCache`]'s
//!   [`PolicySwap`]: under one lock, the inode marks are flushed, the
//!   generation the cache accepts becomes the new one, and only then is the
//!   new policy put in force. A mark is added under the same lock, only for a
//!   decision made under the generation in force, so a worker that decided
//!   under the old policy cannot add its mark after the flush.
//! - **Mode**: enforce or monitor is set at start; a change restarts the
//!   daemon, and closing the groups removes all their marks.
//! - **Grants** change only `justify`/`approve` decisions, which are never
//!   cached; admin sessions change groups, and a file with a group-scoped
//!   rule that could match it is never cached.
//! - **Content**: only files only root can write (owned by root, no group or
//!   other write bit), with one link, on a local file system whose writes
//!   the kernel reports (ext2/3/4, xfs, btrfs, tmpfs, f2fs, and the
//!   read-only squashfs and erofs: not NFS, FUSE or overlayfs, whose
//!   content can change without a local write), with a path checked in the
//!   daemon's namespace. A write clears the ignore mask before it lands, so
//!   the gate-hardening guarantee holds: a write while a later exec is being
//!   hashed finds no cached allow, and the lease and version checks apply
//!   to that exec as to any other. What the kernel does not report as a
//!   write is a store through a shared writable mapping (root's alone for
//!   these files; an exec fails with `ETXTBSY` while it is mapped) and a
//!   change of owner or mode (root's too), which the next audited exec of
//!   the file sees: it then drops the mark.
//! - **Path**: one link, so the path it was decided for is its only name;
//!   a rename by root keeps the mark until the next exec of the file shows
//!   the new path, which drops it (that one exec ran under the old path's
//!   decision, and its record names the new path).
//!
//! # No exec audited twice, none missed
//! An exec that had a permission event is audited by the decision path.
//! Its notification, if the file has our notification mark, is queued only
//! after the answer (the kernel sends it once the open succeeded), in the
//! other group, and may be read any time later: the gate notes (pid, file)
//! as *asked* before it writes the allow, and the notification of an asked
//! exec is dropped, whenever and from whichever descriptor it is read.
//! Every other notification is an exec the kernel answered from the cache.
//! An interpreter's load is paired with its program as for permission
//! events ([`super::interp`]): the gate handles the notifications queued
//! before a permission event ahead of it.
//!
//! # Never the dynamic loader
//! `ld.so PROGRAM` runs code the gate never sees, so a direct run of the
//! loader must have a record that names its user. A notification is read
//! after the exec, when a short-lived process may be gone with its
//! credentials; a permission event is read while it waits. The loader is
//! therefore never cached: every dynamically linked exec still asks once
//! for its loader, answered in user space from the pairing with its
//! program.
//!
//! That answer is kept as lean as the kernel's would be: an allow of a
//! loader made per file, as any cached allow is (the same criteria, under
//! the same policy generation and flushed with the same lock), is held here
//! ([`LoaderAllows`]) for that version of the file, and the gate answers a
//! load paired with its program from it at once, before anything else is
//! read (see [`super::fanotify`], "A loader's load"). A direct run of the
//! loader is never paired, so it still waits for its decision and record.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::fanotify::Fanotify;

use super::interp::{FileKey, HEAD_BYTES, InterpreterLoads, is_loader, loaded_interpreter};
use crate::{FileIdentity, PolicySwap};

/// Files cached at most; past this, new allows are not cached until the
/// next policy change (each is a mark in the kernel).
const MAX_CACHED: usize = 65_536;
/// Asked execs remembered at most, and for how long: the notification
/// follows the answer at once, unless the exec failed after it.
const MAX_ASKED: usize = 4096;
const ASKED_TTL: Duration = Duration::from_secs(5);

/// What the cache knows of one cached file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The path it was decided for.
    pub path: String,
    /// The interpreter the kernel loads for it, when it names one.
    pub interpreter: Option<FileKey>,
}

/// What a notification is.
#[derive(Debug)]
pub enum Notified {
    /// The exec had a permission event: audited there already.
    Asked,
    /// Answered by the kernel from the cache.
    Cached(Option<Entry>),
}

#[derive(Debug)]
struct State {
    /// The policy generation whose decisions may be cached (`None`: none).
    generation: Option<u64>,
    cached: HashMap<FileKey, Entry>,
    asked: HashMap<(u32, FileKey), Instant>,
    loaders: LoaderAllows,
}

/// Dynamic loaders the policy allows for everyone, each for one version of
/// its file, under the generation in force when it was decided: the user
/// space half of the cache, for the one kind of file the kernel must not
/// answer for (see "Never the dynamic loader"). Emptied with the kernel's
/// half, under the same lock.
#[derive(Debug, Default)]
pub struct LoaderAllows {
    allowed: HashMap<FileKey, (FileIdentity, u64)>,
}

/// Loader versions held at most (a machine has a few; each libc upgrade
/// adds one until the next policy change).
const MAX_LOADERS: usize = 64;

impl LoaderAllows {
    /// `version` of a loader was allowed for everyone under `generation`.
    pub fn insert(&mut self, version: FileIdentity, generation: u64) {
        if self.allowed.len() >= MAX_LOADERS {
            self.allowed.clear();
        }
        self.allowed
            .insert((version.dev, version.ino), (version, generation));
    }

    /// Whether `version` was allowed for everyone under `generation`: the
    /// same file, unchanged (size, mtime and ctime), and the same policy.
    pub fn allows(&self, version: &FileIdentity, generation: u64) -> bool {
        self.allowed
            .get(&(version.dev, version.ino))
            .is_some_and(|(held, at)| held == version && *at == generation)
    }

    /// Forgets every allow (a policy change).
    pub fn clear(&mut self) {
        self.allowed.clear();
    }
}

/// The kernel cache of allows; see the module documentation.
#[derive(Debug)]
pub struct KernelCache {
    /// The gate's group: the ignore masks.
    permission: Arc<Fanotify>,
    /// The notification group: the `FAN_OPEN_EXEC` marks (`None`: the
    /// kernel would not make it, and nothing is cached).
    notification: Option<Arc<Fanotify>>,
    loads: Arc<Mutex<InterpreterLoads>>,
    state: Mutex<State>,
    evictable: AtomicBool,
    /// Whether a notification mark was ever placed: until then the
    /// notification group has no marks and nothing to read.
    ever_marked: AtomicBool,
}

impl KernelCache {
    /// A cache on the inode marks of these two groups (the gate's, and
    /// one of class `FAN_CLASS_NOTIF` with no other marks); it caches
    /// nothing until the owner of the policy tells it the generation in
    /// force ([`PolicySwap::starts_with`]).
    pub fn new(
        permission: Arc<Fanotify>,
        notification: Option<Arc<Fanotify>>,
        loads: Arc<Mutex<InterpreterLoads>>,
    ) -> Self {
        Self {
            permission,
            notification,
            loads,
            state: Mutex::new(State {
                generation: None,
                cached: HashMap::new(),
                asked: HashMap::new(),
                loaders: LoaderAllows::default(),
            }),
            evictable: AtomicBool::new(true),
            ever_marked: AtomicBool::new(false),
        }
    }

    /// Whether the notification group may hold events: `false` until the
    /// first file was cached, so a gate that caches nothing (monitor mode,
    /// a policy without plain allows) does not read it.
    pub fn may_notify(&self) -> bool {
        self.ever_marked.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many files are cached.
    pub fn len(&self) -> usize {
        self.lock().cached.len()
    }

    /// Whether no file is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Caches the allow of the exec of `pid` whose event descriptor is
    /// `fd` (the file `version`, at `path`), decided under `generation`:
    /// called before the allow is written. `false` when it was not cached
    /// in the kernel (another policy is in force now, the cache is full,
    /// the kernel refused, or it is a loader, held in user space instead).
    pub fn remember(
        &self,
        generation: u64,
        pid: u32,
        fd: BorrowedFd<'_>,
        version: &FileIdentity,
        path: &str,
    ) -> bool {
        let key = (version.dev, version.ino);
        let mut head = [0u8; HEAD_BYTES];
        let read = nix::sys::uio::pread(fd, &mut head, 0).unwrap_or(0);
        let head = &head[..read];
        if is_loader(head) {
            // Never the dynamic loader: run directly (`ld.so PROGRAM`) it
            // runs code the gate never sees, so that run's record must name
            // its user, and only a permission event is read while the
            // process is sure to exist (a notification can come after a
            // short-lived process is gone). Its loads as an interpreter are
            // answered from the pairing with their program, in user space,
            // from this allow.
            let mut state = self.lock();
            if state.generation == Some(generation) {
                state.loaders.insert(*version, generation);
            }
            drop(state);
            self.note_answered(pid, key);
            return false;
        }
        if self.notification.is_none() {
            self.note_answered(pid, key);
            return false;
        }
        let interpreter = loaded_interpreter(head).and_then(|interp| {
            self.loads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .resolve(interp, |path| {
                    use std::os::unix::fs::MetadataExt;
                    std::fs::metadata(path)
                        .ok()
                        .map(|meta| (meta.dev(), meta.ino()))
                })
        });
        let entry = Entry {
            path: path.to_owned(),
            interpreter,
        };
        let mut state = self.lock();
        if state.generation != Some(generation) || state.cached.len() >= MAX_CACHED {
            drop(state);
            self.note_answered(pid, key);
            return false;
        }
        if let Err(error) = self.mark(fd) {
            tracing::debug!(path, %error, "cannot cache an allow in the kernel");
            // Undone in the safe order (the ignore mask first); a file
            // cached before keeps no marks now, so it is cached no more.
            if let Err(error) = self.unmark(fd) {
                tracing::warn!(%error, "cannot undo a half-made cached allow; emptying the cache");
                self.flush_or_stop(&mut state);
            }
            state.cached.remove(&key);
            drop(state);
            self.note_answered(pid, key);
            return false;
        }
        state.cached.insert(key, entry);
        Self::ask(&mut state, pid, key);
        true
    }

    /// Whether this version of a loader is allowed for everyone under the
    /// policy in force (see [`LoaderAllows`]).
    pub fn allows_loader(&self, version: &FileIdentity) -> bool {
        let state = self.lock();
        state
            .generation
            .is_some_and(|generation| state.loaders.allows(version, generation))
    }

    /// An exec of `key` by `pid` is being allowed after a permission event:
    /// if the file has our mark (its ignore mask was cleared by a write, or
    /// the mark is being added), its notification is not another exec.
    pub fn note_answered(&self, pid: u32, key: FileKey) {
        let mut state = self.lock();
        if state.cached.contains_key(&key) {
            Self::ask(&mut state, pid, key);
        }
    }

    fn ask(state: &mut State, pid: u32, key: FileKey) {
        let now = Instant::now();
        if state.asked.len() >= MAX_ASKED {
            state
                .asked
                .retain(|_, at| now.duration_since(*at) < ASKED_TTL);
            if state.asked.len() >= MAX_ASKED {
                state.asked.clear();
            }
        }
        state.asked.insert((pid, key), now);
    }

    /// A `FAN_OPEN_EXEC` notification of `pid` for `key` arrived.
    pub fn notified(&self, pid: u32, key: FileKey) -> Notified {
        let mut state = self.lock();
        if state.asked.remove(&(pid, key)).is_some() {
            return Notified::Asked;
        }
        Notified::Cached(state.cached.get(&key).cloned())
    }

    /// Drops one file from the cache (its path or mode changed): its next
    /// exec is asked again.
    pub fn forget(&self, fd: BorrowedFd<'_>, key: FileKey) {
        let mut state = self.lock();
        if let Err(error) = self.unmark(fd) {
            tracing::warn!(%error, "cannot remove a cached allow; emptying the cache");
            self.flush_or_stop(&mut state);
            return;
        }
        state.cached.remove(&key);
    }

    /// Empties the cache; if the kernel refuses, caches nothing more
    /// (allows cached before may then still stand, which is logged).
    fn flush_or_stop(&self, state: &mut State) {
        state.cached.clear();
        state.loaders.clear();
        if let Err(error) = self.flush() {
            tracing::error!(%error,
                "cannot empty the kernel cache of allows; no allow is cached from now on");
            state.generation = None;
        }
    }

    /// The interpreter pairing state shared with the gate.
    pub fn loads(&self) -> &Arc<Mutex<InterpreterLoads>> {
        &self.loads
    }

    fn mark(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let evictable = if self.evictable.load(Ordering::Relaxed) {
            libc::FAN_MARK_EVICTABLE
        } else {
            0
        };
        let Some(notification) = &self.notification else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no notification group: nothing is cached",
            ));
        };
        // The notification first: an ignore mask without it would let an
        // exec through unaudited (see the module documentation).
        let result = mark_raw(
            notification,
            libc::FAN_MARK_ADD | evictable,
            libc::FAN_OPEN_EXEC,
            fd,
        );
        match result {
            Err(e) if evictable != 0 && e.raw_os_error() == Some(libc::EINVAL) => {
                // Before Linux 5.19: marks that pin their inode.
                self.evictable.store(false, Ordering::Relaxed);
                return self.mark(fd);
            }
            other => other?,
        }
        self.ever_marked.store(true, Ordering::Release);
        mark_raw(
            &self.permission,
            libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORE | evictable,
            libc::FAN_OPEN_EXEC_PERM,
            fd,
        )
    }

    /// Takes both marks off the file, the ignore mask first; the
    /// notification mark stays when the ignore mask could not be removed.
    fn unmark(&self, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        // ENOENT: that part was not there.
        let absent_is_fine = |result: std::io::Result<()>| match result {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => Ok(()),
        };
        absent_is_fine(mark_raw(
            &self.permission,
            libc::FAN_MARK_REMOVE | libc::FAN_MARK_IGNORE,
            libc::FAN_OPEN_EXEC_PERM,
            fd,
        ))?;
        match &self.notification {
            Some(notification) => absent_is_fine(mark_raw(
                notification,
                libc::FAN_MARK_REMOVE,
                libc::FAN_OPEN_EXEC,
                fd,
            )),
            None => Ok(()),
        }
    }

    /// Removes every inode mark of both groups: the whole cache, and
    /// nothing else (the watch marks are mount and file-system marks). The
    /// ignore masks go first; if they cannot, the notifications stay.
    fn flush(&self) -> std::io::Result<()> {
        flush_inode_marks(&self.permission)?;
        match &self.notification {
            Some(notification) => flush_inode_marks(notification),
            None => Ok(()),
        }
    }
}

fn mark_raw(group: &Fanotify, flags: u32, mask: u64, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: fanotify_mark with a group's fd, a descriptor we hold and a
    // null path (the mark goes on the descriptor's file).
    let rc = unsafe {
        libc::fanotify_mark(
            std::os::fd::AsFd::as_fd(group).as_raw_fd(),
            flags,
            mask,
            fd.as_raw_fd(),
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Removes every inode mark of `group` (`FAN_MARK_FLUSH` without
/// `FAN_MARK_MOUNT` or `FAN_MARK_FILESYSTEM` flushes inode marks only).
fn flush_inode_marks(group: &Fanotify) -> std::io::Result<()> {
    // SAFETY: FAN_MARK_FLUSH takes no object; the path is null.
    let rc = unsafe {
        libc::fanotify_mark(
            std::os::fd::AsFd::as_fd(group).as_raw_fd(),
            libc::FAN_MARK_FLUSH,
            0,
            libc::AT_FDCWD,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl PolicySwap for KernelCache {
    fn starts_with(&self, generation: u64) {
        // No mark exists yet: the groups are new.
        self.lock().generation = Some(generation);
    }

    fn swap(&self, generation: u64, put_in_force: &mut dyn FnMut()) {
        let mut state = self.lock();
        // Cannot fail on live groups; if it does, nothing more is cached,
        // and the log says allows cached before may still stand.
        state.generation = Some(generation);
        self.flush_or_stop(&mut state);
        put_in_force();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(ino: u64, ctime_ns: i64) -> FileIdentity {
        FileIdentity {
            dev: 8,
            ino,
            size: 215_000,
            mtime_ns: 1,
            ctime_ns,
        }
    }

    #[test]
    fn a_loader_allow_holds_for_its_version_under_its_policy_only() {
        let mut loaders = LoaderAllows::default();
        let loader = version(12, 100);
        assert!(!loaders.allows(&loader, 3), "nothing held yet");
        loaders.insert(loader, 3);
        assert!(loaders.allows(&loader, 3));
        assert!(!loaders.allows(&loader, 4), "another policy");
        assert!(
            !loaders.allows(&version(12, 101), 3),
            "the same file changed since (a write, chmod, rename or link)"
        );
        assert!(!loaders.allows(&version(13, 100), 3), "another file");
        // A new version replaces the old one.
        loaders.insert(version(12, 200), 3);
        assert!(!loaders.allows(&loader, 3));
        loaders.clear();
        assert!(!loaders.allows(&version(12, 200), 3));
    }

    #[test]
    fn loader_allows_are_bounded() {
        let mut loaders = LoaderAllows::default();
        for ino in 0..=MAX_LOADERS as u64 {
            loaders.insert(version(ino, 1), 1);
        }
        assert!(loaders.allowed.len() <= MAX_LOADERS);
        assert!(loaders.allows(&version(MAX_LOADERS as u64, 1), 1));
    }
}
