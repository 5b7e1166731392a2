//! Opening a program a caller names, once.
//!
//! A caller's path is only a request: it may be a symlink they planted, go
//! through `..`, or be swapped while it is being checked. So the daemon
//! resolves it once, into an open file, and everything after works on that
//! file: the rules are matched against its canonical path, the hash is read
//! through the descriptor, and (for `epmctl run`) the runner executes that
//! descriptor. What runs is what was checked.
//!
//! Two ways in:
//!
//! - [`Program::for_elevation`], for a program to run as another user. The
//!   path must be absolute without `..`; the daemon walks it component by
//!   component (no symlink followed by the kernel), and every directory it
//!   passes through, every directory holding a symlink it follows, and the
//!   file itself must belong to root and be writable by no one else. Then
//!   nobody but root can change what the path names, and a symlink in it
//!   was put there by root. The caller must be able to reach the path with
//!   their own credentials ([`open_as_caller`]), and both resolutions must
//!   give the same file.
//! - [`Program::for_caller`], for a program the caller asks a grant for
//!   (`epmctl justify`, `request`): any file the caller can reach; the
//!   daemon opens it with the caller's credentials, so it never reveals a
//!   file (its existence, owner, hash) the caller could not see.
//!
//! **Reachability** is decided by the kernel with the caller's credentials:
//! on Linux a short-lived thread takes the caller's file-system ids and
//! groups (per-thread system calls, not glibc's process-wide wrappers) and
//! opens the path with `O_PATH`; the thread ends with its credentials. On
//! macOS, which has no per-thread file-system ids, the daemon checks the
//! search bits of every directory on the canonical path for the caller.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use epm_policy::Sha256Digest;
use nix::fcntl::{OFlag, openat, readlinkat};
use nix::sys::stat::{Mode, SFlag};

use crate::gate::FileIdentity;

/// Symbolic links followed in one resolution, as the kernel's limit.
const MAX_LINKS: usize = 40;

/// The user who named the program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Every group id (primary included).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The caller `uid` as the user directory knows it (no groups for a
    /// uid it does not know).
    pub fn of(uid: u32, names: &epm_os::users::Names) -> Caller {
        let gid = epm_os::users::Account::by_uid(uid).map_or(u32::MAX, |u| u.gid);
        Caller {
            uid,
            gid,
            groups: names.member_groups(uid, gid).to_vec(),
        }
    }
}

/// A program opened once: the file, its canonical path, its identity and
/// content hash, all of one file.
#[derive(Debug)]
pub struct Program {
    /// Open for reading, close-on-exec (executed through it on Linux).
    pub file: File,
    /// Its canonical path: no symlink, no `.` or `..`.
    pub canonical: String,
    /// The caller's spelling, when it differs from the canonical path
    /// (for elevation, every link in it is root's): a rule may deny the
    /// program under it, never allow it.
    pub requested: Option<String>,
    /// Its version (device, inode, size, times).
    pub identity: FileIdentity,
    /// SHA-256 of its bytes, read through [`Program::file`].
    pub sha256: Sha256Digest,
    /// It starts with `#!`: the kernel runs its interpreter, which reads it
    /// through `/dev/fd/N` (so that descriptor must stay open across exec).
    pub script: bool,
    /// Its mode bits and owner, as opened.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Why a program was not opened. Each message names the path and what to
/// do; none reveals anything the caller could not see themselves.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// Not absolute, or with a NUL.
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(String),
    /// A `..` component.
    #[error("{0} contains `..`: name the program by its real path")]
    DotDot(String),
    /// The caller cannot reach it (as the kernel says for them).
    #[error("cannot open {path}: {error}")]
    Unreachable {
        /// The path.
        path: String,
        /// The caller's own error.
        error: io::Error,
    },
    /// Something on the way or the file is not root's alone.
    #[error(
        "{path} is not run as root: {why}; install it where only root can change it (e.g. /usr/local/bin) and name it by that path"
    )]
    NotRootControlled {
        /// The path asked for.
        path: String,
        /// What is not root's.
        why: String,
    },
    /// Not a regular file (or no execute bit).
    #[error("{0} is not a program")]
    NotAProgram(String),
    /// The two resolutions disagree: it changed meanwhile.
    #[error("{0} changed while it was being checked; try again")]
    Changed(String),
    /// Too many symlinks.
    #[error("{0}: too many levels of symbolic links")]
    Loop(String),
    /// Reading it failed.
    #[error("cannot read {path}: {error}")]
    Io {
        /// The path.
        path: String,
        /// What failed.
        error: io::Error,
    },
}

impl Program {
    /// Opens a program to run as another user (see the module
    /// documentation): root's alone all the way, reachable by the caller.
    pub fn for_elevation(path: &str, caller: &Caller) -> Result<Program, ProgramError> {
        check_spelling(path)?;
        // First as the caller: a path they cannot reach gets their own
        // error, and nothing below is looked at for them.
        let theirs = open_as_caller(path, caller).map_err(|error| ProgramError::Unreachable {
            path: path.to_owned(),
            error,
        })?;
        let walked = walk_root_controlled(path)?;
        let Walked::File { file, canonical } = walked else {
            return Err(ProgramError::NotAProgram(path.to_owned()));
        };
        let meta = io_error(path, file.metadata())?;
        if !same_file(&theirs, &meta) {
            return Err(ProgramError::Changed(path.to_owned()));
        }
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(ProgramError::NotAProgram(path.to_owned()));
        }
        let requested = (path != canonical).then(|| path.to_owned());
        Program::finish(path, file, canonical, requested)
    }

    /// Opens a file the caller names for a grant: whatever they can reach,
    /// opened with their credentials (see the module documentation).
    pub fn for_caller(path: &str, caller: &Caller) -> Result<Program, ProgramError> {
        if !path.starts_with('/') || path.contains('\0') {
            return Err(ProgramError::NotAbsolute(path.to_owned()));
        }
        let unreachable = |error| ProgramError::Unreachable {
            path: path.to_owned(),
            error,
        };
        let (file, canonical) = open_readable_as_caller(path, caller).map_err(unreachable)?;
        let meta = io_error(path, file.metadata())?;
        if !meta.is_file() {
            return Err(ProgramError::NotAProgram(path.to_owned()));
        }
        let requested = (path != canonical).then(|| path.to_owned());
        Program::finish(path, file, canonical, requested)
    }

    fn finish(
        path: &str,
        file: File,
        canonical: String,
        requested: Option<String>,
    ) -> Result<Program, ProgramError> {
        let meta = io_error(path, file.metadata())?;
        let sha256 = io_error(path, crate::exec::decider::hash_file(&file))?;
        let mut magic = [0u8; 2];
        let script = matches!(file.read_at(&mut magic, 0), Ok(2)) && &magic == b"#!";
        // Hashed, then checked again: a file written meanwhile is refused.
        let after = io_error(path, file.metadata())?;
        if FileIdentity::of(&after) != FileIdentity::of(&meta) {
            return Err(ProgramError::Changed(path.to_owned()));
        }
        Ok(Program {
            identity: FileIdentity::of(&meta),
            sha256,
            script,
            mode: meta.permissions().mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            file,
            canonical,
            requested,
        })
    }
}

fn io_error<T>(path: &str, result: io::Result<T>) -> Result<T, ProgramError> {
    result.map_err(|error| ProgramError::Io {
        path: path.to_owned(),
        error,
    })
}

/// Absolute, no NUL, no `..`.
fn check_spelling(path: &str) -> Result<(), ProgramError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(ProgramError::NotAbsolute(path.to_owned()));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(ProgramError::DotDot(path.to_owned()));
    }
    Ok(())
}

// The casts convert on macOS (`dev_t` is `i32`, `mode_t` `u16`) and are
// no-ops on Linux.
#[allow(clippy::unnecessary_cast)]
fn same_file(fd: &OwnedFd, meta: &std::fs::Metadata) -> bool {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .is_ok_and(|st| st.st_dev as u64 == meta.dev() && st.st_ino as u64 == meta.ino())
}

/// Owned by root and writable by nobody else (group or others).
#[allow(clippy::unnecessary_cast)]
fn root_only(st: &nix::sys::stat::FileStat) -> Result<(), String> {
    let mode = st.st_mode as u32;
    if st.st_uid != 0 {
        return Err(format!("it belongs to uid {}", st.st_uid));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "it is writable by others than root (mode {:o})",
            mode & 0o7777
        ));
    }
    Ok(())
}

/// The result of [`walk_root_controlled`]: a file, or a directory.
enum Walked {
    File { file: File, canonical: String },
    Directory { dir: OwnedFd, canonical: String },
}

/// Flags for a directory on the way: never followed, never read.
#[cfg(target_os = "linux")]
fn directory_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

#[cfg(not(target_os = "linux"))]
fn directory_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn owned(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by openat and is owned by no one else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Resolves `path` as the kernel would, one component at a time with
/// nothing followed implicitly, checking that every directory passed
/// through (and so every directory holding a followed symlink) and the
/// final file are root's alone. Returns the file, open for reading.
fn walk_root_controlled(path: &str) -> Result<Walked, ProgramError> {
    let not_root = |place: &str, why: String| ProgramError::NotRootControlled {
        path: path.to_owned(),
        why: format!("{place}: {why}"),
    };
    let sys = |e: nix::Error| ProgramError::Io {
        path: path.to_owned(),
        error: io::Error::from(e),
    };
    let root = owned(openat(None, "/", directory_flags(), Mode::empty()).map_err(sys)?);
    // Each directory on the way: its descriptor and its canonical path.
    let mut dirs: Vec<(OwnedFd, String)> = Vec::new();
    let st = nix::sys::stat::fstat(root.as_raw_fd()).map_err(sys)?;
    root_only(&st).map_err(|why| not_root("/", why))?;
    dirs.push((root, String::new()));
    let mut pending: std::collections::VecDeque<Vec<u8>> = components(path.as_bytes());
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == b"." {
            continue;
        }
        if name == b".." {
            // Only from a root-owned link's target (the caller's path has
            // none): go up, never above `/`.
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let (dir, dir_path) = dirs.last().ok_or_else(|| ProgramError::Loop(path.into()))?;
        let here = format!("{dir_path}/{}", String::from_utf8_lossy(&name));
        let name_os = OsStr::from_bytes(&name);
        let st = nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            name_os,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ProgramError::Unreachable {
            path: path.to_owned(),
            error: io::Error::from(e),
        })?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            links += 1;
            if links > MAX_LINKS {
                return Err(ProgramError::Loop(path.to_owned()));
            }
            // The directory holding it is root's alone (checked when it
            // was entered), so the link is root's choice.
            let target = readlinkat(Some(dir.as_raw_fd()), name_os).map_err(sys)?;
            let target = target.as_bytes();
            let mut rest = components(target);
            rest.extend(pending.drain(..));
            pending = rest;
            if target.starts_with(b"/") {
                dirs.truncate(1);
            }
            continue;
        }
        // Opens the entry looked at, as that very entry, and root's alone.
        let open_checked = |flags: OFlag| -> Result<OwnedFd, ProgramError> {
            let fd =
                owned(openat(Some(dir.as_raw_fd()), name_os, flags, Mode::empty()).map_err(sys)?);
            let opened = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(sys)?;
            if opened.st_ino != st.st_ino || opened.st_dev != st.st_dev {
                return Err(ProgramError::Changed(path.to_owned()));
            }
            root_only(&opened).map_err(|why| not_root(&here, why))?;
            Ok(fd)
        };
        if kind == SFlag::S_IFDIR {
            let fd = open_checked(directory_flags())?;
            dirs.push((fd, here));
            continue;
        }
        if !pending.is_empty() {
            return Err(ProgramError::Unreachable {
                path: path.to_owned(),
                error: io::Error::from(nix::Error::ENOTDIR),
            });
        }
        if kind != SFlag::S_IFREG {
            return Err(ProgramError::NotAProgram(path.to_owned()));
        }
        let fd =
            open_checked(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)?;
        return Ok(Walked::File {
            file: File::from(fd),
            canonical: here,
        });
    }
    let (dir, canonical) = dirs.pop().ok_or_else(|| ProgramError::Loop(path.into()))?;
    Ok(Walked::Directory {
        dir,
        canonical: if canonical.is_empty() {
            "/".into()
        } else {
            canonical
        },
    })
}

/// Other names for `canonical` that rules spell out: for each of
/// `spellings` (a rule's path, or a glob's fixed directory) that resolves,
/// through directories and links only root can change, to `canonical` or
/// to a directory above it, the same file under that spelling (`/bin/bash`
/// for `/usr/bin/bash` where `/bin` is root's link to `/usr/bin`). Root
/// chose every link on the way, so the spelling is as good as the path.
pub fn spelled_by_rules(canonical: &str, spellings: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for spelling in spellings {
        if spelling == canonical || check_spelling(spelling).is_err() {
            continue;
        }
        let resolved = match walk_root_controlled(spelling) {
            Ok(Walked::File { canonical: c, .. }) if c == canonical => Some(String::new()),
            Ok(Walked::Directory { canonical: c, .. }) => canonical
                .strip_prefix(c.as_str())
                .filter(|rest| rest.starts_with('/') || c == "/")
                .map(str::to_owned),
            _ => None,
        };
        if let Some(rest) = resolved {
            let name = format!("{}{rest}", spelling.trim_end_matches('/'));
            if name != canonical && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The canonical path of a file to edit as another user (sudoedit): its
/// directory must be reachable by the caller and root's alone all the way
/// (so nobody else can swap the file sudoedit writes back), and the file,
/// if it exists, a regular file, not a symlink.
pub fn edit_target(path: &str, caller: &Caller) -> Result<String, ProgramError> {
    check_spelling(path)?;
    let (parent, name) = path
        .rsplit_once('/')
        .filter(|(_, name)| !name.is_empty() && *name != ".")
        .ok_or_else(|| ProgramError::NotAProgram(path.to_owned()))?;
    let parent = if parent.is_empty() { "/" } else { parent };
    open_as_caller(parent, caller).map_err(|error| ProgramError::Unreachable {
        path: path.to_owned(),
        error,
    })?;
    let Walked::Directory { dir, canonical } = walk_root_controlled(parent)? else {
        return Err(ProgramError::NotAProgram(path.to_owned()));
    };
    match nix::sys::stat::fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG => {
            Err(ProgramError::NotRootControlled {
                path: path.to_owned(),
                why: "it is not a regular file (a symlink, a device, a directory)".into(),
            })
        }
        Ok(_) | Err(nix::Error::ENOENT) => Ok(if canonical == "/" {
            format!("/{name}")
        } else {
            format!("{canonical}/{name}")
        }),
        Err(error) => Err(ProgramError::Io {
            path: path.to_owned(),
            error: io::Error::from(error),
        }),
    }
}

/// The non-empty components of a path.
fn components(path: &[u8]) -> std::collections::VecDeque<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// Opens `path` with the caller's credentials, following symlinks as the
/// caller's own open would, without reading it (`O_PATH`).
#[cfg(target_os = "linux")]
pub fn open_as_caller(path: &str, caller: &Caller) -> io::Result<OwnedFd> {
    as_caller(path, caller, libc::O_PATH | libc::O_CLOEXEC)
}

/// Opens `path` for reading as the daemon, after checking that the caller
/// can search every directory on its canonical path (macOS has no
/// per-thread file-system ids).
#[cfg(not(target_os = "linux"))]
pub fn open_as_caller(path: &str, caller: &Caller) -> io::Result<OwnedFd> {
    let (file, _) = open_readable_as_caller(path, caller)?;
    Ok(OwnedFd::from(file))
}

/// [`open_as_caller`], then open for reading (as the daemon, through the
/// caller's descriptor, so it is the same file), with its canonical path.
#[cfg(target_os = "linux")]
fn open_readable_as_caller(path: &str, caller: &Caller) -> io::Result<(File, String)> {
    let theirs = open_as_caller(path, caller)?;
    let link = format!("/proc/self/fd/{}", theirs.as_raw_fd());
    let canonical = std::fs::read_link(&link)?
        .into_os_string()
        .into_string()
        .map_err(|_| io::Error::other("the path is not UTF-8"))?;
    let file = std::fs::File::open(&link)?;
    let meta = file.metadata()?;
    if !same_file(&theirs, &meta) {
        return Err(io::Error::other("it changed while it was opened"));
    }
    Ok((file, canonical))
}

#[cfg(not(target_os = "linux"))]
fn open_readable_as_caller(path: &str, caller: &Caller) -> io::Result<(File, String)> {
    let canonical = std::fs::canonicalize(path)?;
    let mut dir = canonical.parent();
    while let Some(current) = dir {
        let meta = std::fs::metadata(current)?;
        if !permitted(&meta, caller, 0o1) {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        dir = current.parent();
    }
    let file = std::fs::File::open(&canonical)?;
    let canonical = canonical
        .into_os_string()
        .into_string()
        .map_err(|_| io::Error::other("the path is not UTF-8"))?;
    Ok((file, canonical))
}

/// Whether the mode bits give `caller` the permission `bit` (1 execute or
/// search, 2 write, 4 read) on a file.
pub fn permitted(meta: &std::fs::Metadata, caller: &Caller, bit: u32) -> bool {
    let mode = meta.permissions().mode();
    if caller.uid == 0 {
        return bit != 1 || meta.is_dir() || mode & 0o111 != 0;
    }
    if meta.uid() == caller.uid {
        mode & (bit << 6) != 0
    } else if caller.groups.contains(&meta.gid()) || meta.gid() == caller.gid {
        mode & (bit << 3) != 0
    } else {
        mode & bit != 0
    }
}

/// Opens `path` with `flags` on a thread of its own that first takes the
/// caller's groups and file-system ids. Raw system calls: they change the
/// calling thread only (glibc's wrappers would change every thread of the
/// daemon), and the thread ends right after, with its credentials. Going
/// from file-system uid 0 to another also drops the thread's capabilities
/// that override file permissions, so the kernel decides as for the
/// caller.
#[cfg(target_os = "linux")]
fn as_caller(path: &str, caller: &Caller, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path =
        std::ffi::CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if caller.uid == 0 {
        // SAFETY: a valid C string; the descriptor is ours.
        let fd = unsafe { libc::open(path.as_ptr(), flags) };
        return if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(owned(fd))
        };
    }
    let groups: Vec<libc::gid_t> = caller.groups.clone();
    let (uid, gid) = (caller.uid, caller.gid);
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<OwnedFd> {
                let check = |result: libc::c_long| {
                    if result == -1 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                // SAFETY: system calls on this thread's credentials, with a
                // buffer that lives for the call.
                unsafe {
                    check(libc::syscall(
                        libc::SYS_setgroups,
                        groups.len(),
                        groups.as_ptr(),
                    ))?;
                    libc::syscall(libc::SYS_setfsgid, gid);
                    libc::syscall(libc::SYS_setfsuid, uid);
                    // setfs*id return the previous id and never fail
                    // loudly: an invalid id (-1) changes nothing and tells
                    // the current one.
                    if libc::syscall(libc::SYS_setfsuid, u32::MAX) != uid as libc::c_long
                        || libc::syscall(libc::SYS_setfsgid, u32::MAX) != gid as libc::c_long
                    {
                        return Err(io::Error::other("cannot take the caller's ids"));
                    }
                    let fd = libc::open(path.as_ptr(), flags);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(owned(fd))
                }
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the lookup thread failed")))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            groups: vec![0],
        }
    }

    #[test]
    fn spellings_with_dot_dot_or_relative_are_refused() {
        assert!(matches!(
            Program::for_elevation("usr/bin/id", &root()),
            Err(ProgramError::NotAbsolute(_))
        ));
        assert!(matches!(
            Program::for_elevation("/usr/bin/../bin/id", &root()),
            Err(ProgramError::DotDot(_))
        ));
    }

    #[test]
    fn root_links_resolve_to_the_canonical_file() {
        let program = Program::for_elevation("/bin/sh", &root()).unwrap();
        let expected = std::fs::canonicalize("/bin/sh").unwrap();
        assert_eq!(program.canonical, expected.to_str().unwrap());
        assert_eq!(program.requested.as_deref(), Some("/bin/sh"));
        assert!(!program.script);
        assert_eq!(
            program.sha256,
            crate::exec::decider::hash_file(&File::open(&expected).unwrap()).unwrap()
        );
    }

    #[test]
    fn files_others_can_change_are_not_run_as_root() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = Program::for_elevation(tool.to_str().unwrap(), &root()).unwrap_err();
        // /tmp is world-writable (sticky or not, anyone can swap names).
        assert!(
            matches!(error, ProgramError::NotRootControlled { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("writable by others"), "{error}");
        // The same file may still be named for a grant.
        let program = Program::for_caller(tool.to_str().unwrap(), &root()).unwrap();
        assert!(program.script);
    }

    #[test]
    fn rules_spelled_through_roots_links_name_the_canonical_file() {
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let sh = sh.to_str().unwrap();
        let dir = std::fs::canonicalize("/bin").unwrap();
        let spellings = ["/bin".to_owned(), "/bin/sh".to_owned(), "/tmp".to_owned()];
        let names = spelled_by_rules(sh, &spellings);
        if dir != std::path::Path::new("/bin") {
            // Merged /usr: /bin is root's link to /usr/bin.
            let under_bin = format!("/bin/{}", sh.rsplit('/').next().unwrap());
            assert!(names.contains(&under_bin), "{names:?}");
        }
        if sh != "/bin/sh" {
            assert!(names.contains(&"/bin/sh".to_owned()), "{names:?}");
        }
        assert!(!names.iter().any(|n| n.starts_with("/tmp")), "{names:?}");
    }

    #[test]
    fn a_symlink_in_a_writable_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("id");
        std::os::unix::fs::symlink("/usr/bin/id", &link).unwrap();
        let error = Program::for_elevation(link.to_str().unwrap(), &root()).unwrap_err();
        assert!(
            matches!(error, ProgramError::NotRootControlled { .. }),
            "{error}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_caller_cannot_reach_what_their_ids_cannot() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: taking another user's ids needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "x").unwrap();
        let nobody = Caller {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        let error = Program::for_caller(secret.to_str().unwrap(), &nobody).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(
                crate::grants::grant_error::GrantError::from(error),
                crate::grants::grant_error::GrantError::Forbidden(_)
            ),
            "{message}"
        );
        let error = Program::for_elevation("/usr/bin/id", &nobody);
        assert!(error.is_ok(), "{error:?}");
        // The daemon's own threads keep root's rights.
        assert!(std::fs::read(&secret).is_ok());
    }

    #[test]
    fn execute_permission_follows_owner_group_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        std::fs::write(&path, b"x").unwrap();
        let owner = std::fs::metadata(&path).unwrap().uid();
        let group = std::fs::metadata(&path).unwrap().gid();
        let set = |mode| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&path).unwrap()
        };
        let who = |uid: u32, groups: &[u32]| Caller {
            uid,
            gid: u32::MAX,
            groups: groups.to_vec(),
        };
        let stranger = owner + 1000;
        assert!(permitted(&set(0o700), &who(owner, &[]), 1));
        assert!(!permitted(&set(0o700), &who(stranger, &[]), 1));
        assert!(permitted(&set(0o710), &who(stranger, &[group]), 1));
        assert!(permitted(&set(0o701), &who(stranger, &[]), 1));
        assert!(!permitted(&set(0o644), &who(stranger, &[group]), 1));
        assert!(
            !permitted(&set(0o644), &who(0, &[]), 1),
            "root needs an x bit too"
        );
    }
}
