//! Loading, configuring and attaching the hook, and the handles epmd uses
//! while it runs. Nothing is pinned: the programs and maps live as long as
//! the [`ExecHook`] (and the handles taken from it), so they detach when
//! epmd exits, however it exits.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, Object, ObjectBuilder, PrintLevel};

use crate::event::{ExecEvent, FileKey};

/// The program, built by build.rs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/exec_hook.bpf.o"));

/// Why the hook is not running.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// securityfs is not mounted, so the kernel's LSM list cannot be read.
    /// systemd mounts it at boot; a minimal init or container may not.
    #[error(
        "cannot tell whether the BPF LSM is enabled: securityfs is not mounted \
         (/sys/kernel/security/lsm is missing); mount it with \
         `mount -t securityfs securityfs /sys/kernel/security` and restart epmd"
    )]
    NoSecurityfs,
    /// The running kernel has no BPF LSM in its LSM list.
    #[error("the BPF LSM is not enabled (/sys/kernel/security/lsm: {0:?}); boot with lsm=...,bpf")]
    NoBpfLsm(String),
    /// The kernel has no BTF, which CO-RE needs.
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux); it needs CONFIG_DEBUG_INFO_BTF")]
    NoBtf,
    /// The kernel refused to load or attach the programs.
    #[error("the kernel refused the exec hook ({what}): {source}{log}")]
    Refused {
        /// What was being done.
        what: &'static str,
        /// libbpf's error.
        source: libbpf_rs::Error,
        /// The last lines libbpf logged (the verifier's verdict, among them).
        log: String,
    },
    /// The scope cgroup could not be opened.
    #[error("cannot open the scope cgroup {}: {source}", path.display())]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How the hook is set up.
#[derive(Debug, Clone)]
pub struct HookOptions {
    /// epmd's pid: its own execs are left to fanotify.
    pub daemon_tgid: u32,
    /// Hold only execs of tasks in this cgroup (v2) subtree; `None`: every
    /// task on the machine (production).
    pub cgroup: Option<PathBuf>,
    /// At most this many execs held at once per uid; more fail with `EAGAIN`.
    pub max_held_per_uid: u32,
}

/// `struct hook_config` of exec_hook.h.
#[repr(C)]
struct HookConfig {
    daemon_tgid: u32,
    scoped: u32,
    max_held_per_uid: u32,
    pad: u32,
}

/// libbpf's log while loading: the verifier explains a refusal there.
static LOAD_LOG: Mutex<String> = Mutex::new(String::new());
const LOAD_LOG_KEEP: usize = 4096;

fn keep_log(_level: PrintLevel, message: String) {
    let mut log = LOAD_LOG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    log.push_str(&message);
    if log.len() > LOAD_LOG_KEEP * 2 {
        let cut = log.len() - LOAD_LOG_KEEP;
        let cut = (cut..log.len())
            .find(|&i| log.is_char_boundary(i))
            .unwrap_or(cut);
        log.drain(..cut);
    }
}

fn take_log() -> String {
    let mut log = LOAD_LOG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let text = std::mem::take(&mut *log);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  {tail}")
    }
}

fn refused(what: &'static str, source: libbpf_rs::Error) -> LoadError {
    let mut log = take_log();
    if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
        // Root with CAP_BPF and CAP_PERFMON is refused before the verifier
        // runs: the kernel does not allow BPF LSM (trampoline) programs.
        let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default();
        log.push_str(&format!(
            "\n  this kernel does not let even root load BPF LSM programs (as `bpftool feature probe` \
             shows: program_type lsm NOT available); kernel lockdown: {}",
            lockdown.trim()
        ));
    }
    LoadError::Refused { what, source, log }
}

/// The hook, loaded and configured but not attached yet: nothing is held
/// until [`PreparedHook::attach`], so epmd can mark its file systems and
/// tell the hook about them first.
#[derive(Debug)]
pub struct PreparedHook {
    object: Object,
}

impl PreparedHook {
    /// Checks the kernel, loads the programs (the verifier runs here) and
    /// writes the settings.
    pub fn load(options: &HookOptions) -> Result<PreparedHook, LoadError> {
        let lsm_list = Path::new("/sys/kernel/security/lsm");
        if !lsm_list.exists() {
            return Err(LoadError::NoSecurityfs);
        }
        let lsm = std::fs::read_to_string(lsm_list).unwrap_or_default();
        if !lsm.split(',').any(|m| m.trim() == "bpf") {
            return Err(LoadError::NoBpfLsm(lsm.trim().to_owned()));
        }
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(LoadError::NoBtf);
        }
        let previous = libbpf_rs::set_print(Some((PrintLevel::Warn, keep_log)));
        let result = Self::load_object(options);
        libbpf_rs::set_print(previous);
        let _ = take_log();
        result
    }

    fn load_object(options: &HookOptions) -> Result<PreparedHook, LoadError> {
        let open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(|e| refused("open the object", e))?;
        let object = open.load().map_err(|e| refused("load the programs", e))?;
        let hook = PreparedHook { object };
        let scoped = match &options.cgroup {
            Some(path) => {
                let dir = std::fs::File::open(path).map_err(|source| LoadError::Cgroup {
                    path: path.clone(),
                    source,
                })?;
                let fd = dir.as_raw_fd() as u32;
                hook.map("scope_cgroup")?
                    .update(&0u32.to_ne_bytes(), &fd.to_ne_bytes(), MapFlags::ANY)
                    .map_err(|e| refused("set the scope cgroup", e))?;
                1
            }
            None => 0,
        };
        let config = HookConfig {
            daemon_tgid: options.daemon_tgid,
            scoped,
            max_held_per_uid: options.max_held_per_uid.max(1),
            pad: 0,
        };
        hook.map("config")?
            .update(&0u32.to_ne_bytes(), bytes_of(&config), MapFlags::ANY)
            .map_err(|e| refused("write the settings", e))?;
        Ok(hook)
    }

    fn map(&self, name: &'static str) -> Result<MapHandle, LoadError> {
        let map = self
            .object
            .maps()
            .find(|m| m.name() == name)
            .ok_or_else(|| LoadError::Refused {
                what: name,
                source: libbpf_rs::Error::from(std::io::Error::other("no such map")),
                log: String::new(),
            })?;
        MapHandle::try_from(&map).map_err(|e| refused(name, e))
    }

    /// Where epmd tells the hook which superblocks and mounts fanotify gates.
    pub fn coverage(&self) -> Result<Coverage, LoadError> {
        Ok(Coverage {
            filesystems: self.map("covered_filesystems")?,
            mounts: self.map("covered_mounts")?,
        })
    }

    /// Attaches every program: from now on, execs in scope that fanotify
    /// does not gate are held.
    pub fn attach(self) -> Result<ExecHook, LoadError> {
        let previous = libbpf_rs::set_print(Some((PrintLevel::Warn, keep_log)));
        let mut links: Vec<Link> = Vec::new();
        let mut result = Ok(());
        for program in self.object.progs_mut() {
            match program.attach_lsm() {
                Ok(link) => links.push(link),
                Err(e) => {
                    result = Err(refused("attach to an LSM hook", e));
                    break;
                }
            }
        }
        libbpf_rs::set_print(previous);
        // On failure the links made so far drop here: detached.
        result?;
        let _ = take_log();
        let verdicts = Verdicts {
            map: std::sync::Arc::new(self.map("verdicts")?),
        };
        let events = self.map("events")?;
        let unrecorded = self.map("unrecorded_refusals")?;
        let received: std::sync::Arc<Mutex<Received>> = Default::default();
        let sink = received.clone();
        let mut builder = libbpf_rs::RingBufferBuilder::new();
        builder
            .add(&events, move |bytes: &[u8]| {
                let mut received = sink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match ExecEvent::parse(bytes) {
                    Some(event) => received.events.push(event),
                    None => received.unreadable += 1,
                }
                0
            })
            .map_err(|e| refused("read the event ring", e))?;
        let ring = builder
            .build()
            .map_err(|e| refused("read the event ring", e))?;
        Ok(ExecHook {
            _links: links,
            verdicts,
            ring,
            received,
            unrecorded,
            _events: events,
            _object: self.object,
        })
    }
}

fn bytes_of<T>(value: &T) -> &[u8] {
    // SAFETY: T is a repr(C) struct of integers without padding holes
    // (HookConfig, FileKey-based keys); viewing it as bytes reads only
    // initialized memory.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// What the ring buffer's callback has read and the poller not yet taken.
#[derive(Debug, Default)]
struct Received {
    events: Vec<ExecEvent>,
    unreadable: usize,
}

/// The attached hook.
pub struct ExecHook {
    // Dropped first: the links detach the programs before the maps go.
    _links: Vec<Link>,
    ring: libbpf_rs::RingBuffer<'static>,
    received: std::sync::Arc<Mutex<Received>>,
    verdicts: Verdicts,
    unrecorded: MapHandle,
    _events: MapHandle,
    _object: Object,
}

impl std::fmt::Debug for ExecHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHook")
            .field("links", &self._links.len())
            .finish_non_exhaustive()
    }
}

impl ExecHook {
    /// Where verdicts go (cloneable, for the decision workers).
    pub fn verdicts(&self) -> Verdicts {
        self.verdicts.clone()
    }

    /// Reads events for up to `timeout`, handing each to `handle`; records
    /// that are not events (another build's layout) are counted in the
    /// returned error count.
    pub fn poll(
        &self,
        timeout: Duration,
        handle: &mut dyn FnMut(ExecEvent),
    ) -> Result<usize, libbpf_rs::Error> {
        self.ring.poll(timeout)?;
        let received = std::mem::take(
            &mut *self
                .received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for event in received.events {
            handle(event);
        }
        Ok(received.unreadable)
    }

    /// Execs refused because no event could be written for them (the ring
    /// buffer was full, or the process could not be stopped).
    pub fn unrecorded_refusals(&self) -> u64 {
        self.unrecorded
            .lookup(&0u32.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| Some(u64::from_ne_bytes(v.get(..8)?.try_into().ok()?)))
            .unwrap_or(0)
    }
}

/// Verdicts for held execs, for any thread.
#[derive(Debug, Clone)]
pub struct Verdicts {
    map: std::sync::Arc<MapHandle>,
}

impl Verdicts {
    /// Answers the exec `event` held: `allow`, or refuse with `EPERM`. The
    /// process must then be continued ([`continue_process`]).
    pub fn set(&self, event: &ExecEvent, allow: bool) -> Result<(), libbpf_rs::Error> {
        #[repr(C)]
        struct VerdictKey {
            file: FileKey,
            pid: u32,
            pad: u32,
            start_time: u64,
        }
        let key = VerdictKey {
            file: event.file,
            pid: event.pid,
            pad: 0,
            start_time: event.start_time,
        };
        let verdict: i32 = if allow { 0 } else { -libc::EPERM };
        self.map
            .update(bytes_of(&key), &verdict.to_ne_bytes(), MapFlags::ANY)
    }
}

/// Which superblocks and mounts fanotify gates: the hook leaves execs
/// from those to it.
#[derive(Debug)]
pub struct Coverage {
    filesystems: MapHandle,
    mounts: MapHandle,
}

impl Coverage {
    /// Replaces the covered sets: superblocks by the kernel's device number
    /// (`s_dev`), mounts by their unique id.
    pub fn replace(&self, filesystems: &[u32], mounts: &[u64]) -> Result<(), libbpf_rs::Error> {
        replace_set(
            &self.filesystems,
            filesystems.iter().map(|d| d.to_ne_bytes().to_vec()),
        )?;
        replace_set(
            &self.mounts,
            mounts.iter().map(|m| m.to_ne_bytes().to_vec()),
        )
    }
}

/// Adds the new keys first, then removes the others: a key in both sets is
/// never missing, so nothing covered is ever held for a moment.
fn replace_set(
    map: &MapHandle,
    keys: impl Iterator<Item = Vec<u8>>,
) -> Result<(), libbpf_rs::Error> {
    let wanted: Vec<Vec<u8>> = keys.collect();
    for key in &wanted {
        map.update(key, &[1u8], MapFlags::ANY)?;
    }
    let stale: Vec<Vec<u8>> = map.keys().filter(|k| !wanted.contains(k)).collect();
    for key in stale {
        let _ = map.delete(&key);
    }
    Ok(())
}

/// Sends SIGCONT to the held process through a pidfd opened now, so a
/// process that died and whose pid was reused is not the one continued:
/// the pidfd is checked to be the thread that started at `start_time`.
pub fn continue_process(event: &ExecEvent) -> std::io::Result<()> {
    let pidfd = pidfd_open(event.tgid)?;
    if thread_start_time(event.tgid, event.pid)? != ticks_since_boot(event.start_time) {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo, no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGCONT,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) with no flags returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Field 22 of /proc/TGID/task/PID/stat: the thread's start in clock ticks.
fn thread_start_time(tgid: u32, pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{tgid}/task/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields after its closing parenthesis.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| std::io::Error::other("unreadable stat"))?;
    after
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::other("unreadable stat"))
}

fn ticks_since_boot(ns: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ns / (1_000_000_000 / hz)
}

/// A device number in the kernel's encoding (`major << 20 | minor`, as the
/// hook and fanotify's fdinfo give it) in `st_dev`'s.
pub fn kernel_dev_to_user(dev: u32) -> u64 {
    libc::makedev(dev >> 20, dev & 0xfffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmounted_securityfs_is_named_with_the_command_that_mounts_it() {
        let message = LoadError::NoSecurityfs.to_string();
        assert!(message.contains("securityfs is not mounted"), "{message}");
        assert!(
            message.contains("mount -t securityfs securityfs /sys/kernel/security"),
            "{message}"
        );
        assert!(!message.contains("not enabled"), "{message}");
    }

    #[test]
    fn device_numbers_convert_to_st_dev() {
        // 8:1 (sda1) and 0:52 (a tmpfs) in the kernel's encoding.
        assert_eq!(kernel_dev_to_user((8 << 20) | 1), libc::makedev(8, 1));
        assert_eq!(kernel_dev_to_user(52), libc::makedev(0, 52));
    }

    #[test]
    fn a_thread_start_time_is_read_past_a_tricky_command_name() {
        let pid = std::process::id();
        let ticks = thread_start_time(pid, pid).unwrap();
        assert!(ticks > 0);
    }

    #[test]
    fn loading_explains_why_it_cannot_run() {
        let options = HookOptions {
            daemon_tgid: std::process::id(),
            cgroup: None,
            max_held_per_uid: 4,
        };
        match PreparedHook::load(&options) {
            // Loaded, never attached: nothing on this machine is held.
            Ok(hook) => drop(hook),
            Err(error) => {
                let text = error.to_string();
                assert!(!text.is_empty());
                eprintln!("the exec hook cannot load here: {text}");
            }
        }
    }
}
