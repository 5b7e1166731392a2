//! The events the hook writes to its ring buffer: `struct exec_event` of
//! `src/bpf/exec_hook.h`, mirrored field for field.

/// One version of one file, as the hook reads it from the inode: what a
/// verdict binds (`struct file_key`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FileKey {
    /// Inode number.
    pub ino: u64,
    /// The kernel's device number (`major << 20 | minor`); see
    /// [`crate::kernel_dev_to_user`] for `st_dev`'s encoding.
    pub dev: u32,
    pad: u32,
    /// Size in bytes.
    pub size: i64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status-change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
}

impl FileKey {
    /// A key from its parts (what `fstat` of the same file version gives,
    /// with the device in the kernel's encoding).
    pub fn new(dev: u32, ino: u64, size: i64, mtime_ns: i64, ctime_ns: i64) -> Self {
        Self {
            ino,
            dev,
            pad: 0,
            size,
            mtime_ns,
            ctime_ns,
        }
    }
}

/// `HOOK_PATH_MAX`.
const PATH_MAX: usize = 512;

/// What the hook holds, and why (`event.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An exec open (the program, or an ELF or script interpreter), held.
    Exec,
    /// The program a directly run loader maps executable, held.
    LoaderProgram,
    /// Refused with `EAGAIN`: this uid already had the most held execs.
    RefusedFlood,
}

/// One event from the hook (`struct exec_event`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ExecEvent {
    kind: u32,
    flags: u32,
    /// Process id.
    pub tgid: u32,
    /// Thread id (the thread that execs).
    pub pid: u32,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// Inode number of the task's mount namespace.
    pub mnt_ns: u32,
    /// `s_magic` of the file's superblock.
    pub fs_magic: u32,
    /// The thread's start time (ns since boot): with `pid`, names it.
    pub start_time: u64,
    /// The task's cgroup (v2) id.
    pub cgroup_id: u64,
    /// The unique id of the file's mount.
    pub mnt_id: u64,
    /// The file version.
    pub file: FileKey,
    path: [u8; PATH_MAX],
}

const FLAG_KERNEL_INTERNAL: u32 = 1;
const FLAG_FUSE: u32 = 2;
const FLAG_WRITABLE: u32 = 4;
const FLAG_PATH_TRUNCATED: u32 = 8;

impl ExecEvent {
    /// An event from a ring-buffer record, or `None` when the record is not
    /// one (a size from another build of the program).
    pub fn parse(bytes: &[u8]) -> Option<ExecEvent> {
        if bytes.len() != std::mem::size_of::<ExecEvent>() {
            return None;
        }
        // SAFETY: the length is checked; ExecEvent is plain integers and
        // bytes (every bit pattern valid), read unaligned.
        let event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ExecEvent>()) };
        event.kind()?;
        Some(event)
    }

    /// What the hook did.
    pub fn kind(&self) -> Option<EventKind> {
        match self.kind {
            1 => Some(EventKind::Exec),
            2 => Some(EventKind::LoaderProgram),
            3 => Some(EventKind::RefusedFlood),
            _ => None,
        }
    }

    /// The file's path as the task sees it (`d_path` in its mount
    /// namespace and root), lossy UTF-8; `None` when the kernel could not
    /// give it whole.
    pub fn path(&self) -> Option<String> {
        if self.flags & FLAG_PATH_TRUNCATED != 0 {
            return None;
        }
        let end = self.path.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&self.path[..end]).into_owned())
    }

    /// On a kernel-internal mount: a memfd (or a file only the kernel can name).
    pub fn kernel_internal(&self) -> bool {
        self.flags & FLAG_KERNEL_INTERNAL != 0
    }

    /// On a FUSE file system: its content is whatever the FUSE process
    /// serves at each read.
    pub fn fuse(&self) -> bool {
        self.flags & FLAG_FUSE != 0
    }

    /// A memfd still open for writing and not sealed with `F_SEAL_WRITE`:
    /// its content can change after the decision.
    pub fn writable(&self) -> bool {
        self.flags & FLAG_WRITABLE != 0
    }

    /// An event with these parts (for tests of its consumers).
    pub fn for_test(kind: EventKind, tgid: u32, file: FileKey, path: &str) -> ExecEvent {
        let mut bytes = [0u8; PATH_MAX];
        let len = path.len().min(PATH_MAX - 1);
        bytes[..len].copy_from_slice(&path.as_bytes()[..len]);
        ExecEvent {
            kind: match kind {
                EventKind::Exec => 1,
                EventKind::LoaderProgram => 2,
                EventKind::RefusedFlood => 3,
            },
            flags: 0,
            tgid,
            pid: tgid,
            uid: 0,
            gid: 0,
            mnt_ns: 0,
            fs_magic: 0,
            start_time: 0,
            cgroup_id: 0,
            mnt_id: 0,
            file,
            path: bytes,
        }
    }

    /// Sets a test event's flags: a memfd's, a FUSE file's, still writable.
    pub fn with_flags(mut self, kernel_internal: bool, fuse: bool, writable: bool) -> ExecEvent {
        let flag = |on: bool, bit: u32| if on { bit } else { 0 };
        self.flags = flag(kernel_internal, FLAG_KERNEL_INTERNAL)
            | flag(fuse, FLAG_FUSE)
            | flag(writable, FLAG_WRITABLE);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_struct() {
        // struct exec_event: 8 u32 (32) + 3 u64 (24) + file_key (40) + path (512).
        assert_eq!(std::mem::size_of::<FileKey>(), 40);
        assert_eq!(std::mem::size_of::<ExecEvent>(), 32 + 24 + 40 + PATH_MAX);
    }

    #[test]
    fn records_of_another_size_or_kind_are_not_events() {
        let event = ExecEvent::for_test(EventKind::Exec, 7, FileKey::default(), "/tmp/x");
        // SAFETY: reading a plain repr(C) value's bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const event).cast::<u8>(),
                std::mem::size_of::<ExecEvent>(),
            )
        };
        let parsed = ExecEvent::parse(bytes).unwrap();
        assert_eq!(parsed.tgid, 7);
        assert_eq!(parsed.path().as_deref(), Some("/tmp/x"));
        assert!(ExecEvent::parse(&bytes[1..]).is_none());
        let mut unknown = bytes.to_vec();
        unknown[0] = 99;
        assert!(ExecEvent::parse(&unknown).is_none());
    }
}
