//! Keeping an executable's bytes still while it is decided (Linux: read
//! leases).
//!
//! The kernel asks about an exec (`FAN_OPEN_EXEC_PERM`) before it denies
//! writers to the file: it does that only once the answer is an allow.
//! Between the two, a writer could change what runs after it was hashed.
//! A read lease (`fcntl(F_SETLEASE, F_RDLCK)`) on the gate's own descriptor
//! closes that window. What the kernel does, checked on Linux 6.18 (tmpfs
//! and ext4):
//!
//! - The lease is refused (`EAGAIN`) while anyone has the file open for
//!   writing ([`Stability::OpenForWriting`]); once taken, no write can
//!   start: an `open` for writing, or a `truncate`, waits for the lease to
//!   go (or fails with `EWOULDBLOCK` when non-blocking), and the kernel
//!   sends the holder a lease-break signal (`SIGIO`).
//! - A writer waiting on the lease already counts as a writer: if the exec
//!   reaches its write denial meanwhile, the exec fails with `ETXTBSY`.
//!   Once the exec has denied writers, a new writer fails with `ETXTBSY`.
//! - So the lease must be held from before the file is identified until
//!   the exec has denied writers, which is after the answer: released at
//!   the answer, a writer spinning on `open` won 4 % of the races in a
//!   test; held until the process's executable had changed, none of 300.
//!   The fanotify gate keeps it until then (see `fanotify::LeaseKeeper`).
//! - If the lease is broken anyway (`lease-break-time` elapsed while a
//!   writer waited), [`holds`] says so and the worker hashes again.
//!
//! File systems without leases (and other platforms) fall back to
//! comparing the file's version before and after hashing
//! ([`Stability::VersionChecked`]). A file only root can write needs no
//! lease ([`only_root_writes`]): that is most execs, the system's own
//! programs, which then cost nothing more.

use std::fs::File;

use super::Stability;

/// Whether only root can write the file `meta` describes: owned by root,
/// no group or other write bit (an ACL that grants anyone write shows as a
/// group write bit). Such a file needs no lease: no user can change it.
pub fn only_root_writes(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    meta.uid() == 0 && meta.mode() & 0o022 == 0
}

/// Takes a read lease on the file behind `file`, which the kernel opened
/// read-only for the gate; says what keeps its content still.
pub fn take(file: &File) -> Stability {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if !break_signals_handled() {
            return Stability::VersionChecked;
        }
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        if rc == 0 {
            return Stability::Leased;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Stability::OpenForWriting,
            // EINVAL: no leases on this file system (or fs.leases-enable = 0).
            _ => Stability::VersionChecked,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Stability::VersionChecked
    }
}

/// Whether the read lease on `file` still stands: `false` once a writer
/// has asked for it to be broken, or it was never taken.
pub fn holds(file: &File) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor we own, with no argument.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLEASE) };
        rc == libc::F_RDLCK
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        false
    }
}

/// Whether this process may hold leases: the kernel signals a lease
/// holder with `SIGIO` when a writer waits, and `SIGIO`'s default action
/// ends the process. The first call installs a handler that only sets a
/// flag (handlers, unlike ignored signals, are not inherited by programs
/// the daemon starts); if that fails, no lease is ever taken.
#[cfg(target_os = "linux")]
fn break_signals_handled() -> bool {
    static HANDLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HANDLED.get_or_init(|| {
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        match signal_hook::flag::register(signal_hook::consts::SIGIO, asked) {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(%error, "cannot handle SIGIO: no leases, files are version-checked only");
                false
            }
        }
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    #[test]
    fn a_lease_is_refused_while_the_file_is_open_for_writing_and_keeps_writers_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        let mut writer = File::create(&path).unwrap();
        writer.write_all(b"v1").unwrap();
        let reader = File::open(&path).unwrap();
        if take(&reader) == Stability::VersionChecked {
            eprintln!("no leases on this file system: nothing to check");
            return;
        }
        assert_eq!(take(&reader), Stability::OpenForWriting);
        drop(writer);
        assert_eq!(take(&reader), Stability::Leased);
        assert!(holds(&reader));
        // A writer cannot get in while it stands (non-blocking: at once).
        let error = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EWOULDBLOCK));
        // Its attempt asked for the lease to be broken: the holder knows,
        // and the break signal did not end this process.
        assert!(!holds(&reader));
        drop(reader);
        std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    }
}
