//! What an admin session may leave behind besides sudoers entries
//! ([`epm_os::sudoers`]): setuid or setgid files made during it, and
//! processes that still carry the admin group after it (a shell started
//! with `newgrp` or `sg` keeps the group it was started with, whatever the
//! group file says later).
//!
//! **Setuid scan**: at a session's end, the trees in
//! `[admin_sessions] setuid_scan_paths` are walked (symlinks not followed,
//! each tree on its own file system only) for regular files with the
//! setuid or setgid bit whose status changed (ctime) since the session
//! started: a copy of a shell made setuid then is found, a package's own
//! setuid binaries are not. The walk stops after `setuid_scan_limit`
//! entries, and says so. Its cost is one `lstat` per entry: about 6 µs
//! each with a warm cache (docs/performance.md).
//!
//! **Processes**: on Linux, `/proc/*/status` of every process: one whose
//! real or effective uid is the session's user and whose groups still
//! include the admin group. On macOS, group membership is looked up at
//! each authorization, so no process keeps it; nothing is done there.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A setuid or setgid file made (or changed) during a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetuidFile {
    /// Where.
    pub path: PathBuf,
    /// Its mode bits.
    pub mode: u32,
    /// Its owner.
    pub uid: u32,
}

/// The result of one scan.
#[derive(Debug, Default)]
pub struct SetuidScan {
    /// What was found.
    pub found: Vec<SetuidFile>,
    /// Entries visited.
    pub visited: u64,
    /// The limit stopped the walk before it was done.
    pub truncated: bool,
}

/// Walks `roots` for setuid or setgid regular files whose status changed
/// at or after `since_secs` (seconds since the epoch), visiting at most
/// `limit` entries.
pub fn new_setuid_files(roots: &[PathBuf], since_secs: i64, limit: u64) -> SetuidScan {
    let mut scan = SetuidScan::default();
    for root in roots {
        let Ok(top) = fs::symlink_metadata(root) else {
            continue;
        };
        if !top.is_dir() {
            continue;
        }
        let device = top.dev();
        let mut pending = vec![root.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if scan.visited >= limit {
                    scan.truncated = true;
                    return scan;
                }
                scan.visited += 1;
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                if meta.is_dir() {
                    if meta.dev() == device {
                        pending.push(entry.path());
                    }
                } else if meta.is_file() && meta.mode() & 0o6000 != 0 && meta.ctime() >= since_secs
                {
                    scan.found.push(SetuidFile {
                        path: entry.path(),
                        mode: meta.mode() & 0o7777,
                        uid: meta.uid(),
                    });
                }
            }
        }
    }
    scan
}

/// Takes the setuid and setgid bits off `file` (if it is still that file:
/// a regular file, not a symlink put in its place).
pub fn strip_setuid(file: &SetuidFile) -> io::Result<()> {
    let meta = fs::symlink_metadata(&file.path)?;
    if !meta.is_file() {
        return Err(io::Error::other("no longer a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777 & !0o6000;
    fs::set_permissions(&file.path, fs::Permissions::from_mode(mode))
}

/// A process that still carries a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupProcess {
    /// Its pid.
    pub pid: u32,
    /// Its command name (`comm`).
    pub command: String,
}

/// The processes of `uid` (real or effective) whose real, effective or
/// supplementary groups include `gid` (Linux; empty elsewhere).
pub fn processes_with_group(uid: u32, gid: u32) -> Vec<GroupProcess> {
    processes_with_group_in(Path::new("/proc"), uid, gid)
}

fn processes_with_group_in(proc: &Path, uid: u32, gid: u32) -> Vec<GroupProcess> {
    let mut found = Vec::new();
    let own = std::process::id();
    let Ok(entries) = fs::read_dir(proc) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let Ok(text) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let Some(status) = crate::gate::procfs::parse_status(&text) else {
            continue;
        };
        let theirs = status.uid == uid || status.euid == uid;
        let carries = status.gid == gid || status.egid == gid || status.groups.contains(&gid);
        if theirs && carries {
            let command = fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_default();
            found.push(GroupProcess { pid, command });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn new_setuid_files_are_found_and_stripped() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        fs::create_dir_all(&nested).unwrap();
        let planted = nested.join("sh");
        fs::write(&planted, "x").unwrap();
        fs::set_permissions(&planted, fs::Permissions::from_mode(0o4755)).unwrap();
        let plain = nested.join("plain");
        fs::write(&plain, "x").unwrap();
        let roots = vec![dir.path().to_owned(), PathBuf::from("/nonexistent/epm")];
        let scan = new_setuid_files(&roots, 0, 1000);
        assert_eq!(scan.found.len(), 1, "{scan:?}");
        assert_eq!(scan.found[0].path, planted);
        assert_eq!(scan.found[0].mode, 0o4755);
        assert!(!scan.truncated);
        // Older than the session: not ours to judge.
        assert!(new_setuid_files(&roots, i64::MAX, 1000).found.is_empty());
        assert!(new_setuid_files(&roots, 0, 2).truncated);
        strip_setuid(&scan.found[0]).unwrap();
        assert_eq!(
            fs::metadata(&planted).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }

    #[test]
    fn processes_are_read_from_proc_status() {
        let dir = tempfile::tempdir().unwrap();
        let write = |pid: &str, uid: u32, groups: &str| {
            let p = dir.path().join(pid);
            fs::create_dir(&p).unwrap();
            fs::write(
                p.join("status"),
                format!(
                    "Name:\tsh\nPPid:\t1\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t100\t100\t100\t100\nGroups:\t{groups}\n"
                ),
            )
            .unwrap();
            fs::write(p.join("comm"), "sh\n").unwrap();
        };
        write("10", 1001, "100 27");
        write("11", 1001, "100");
        write("12", 1002, "27");
        fs::create_dir(dir.path().join("self")).unwrap();
        let found = processes_with_group_in(dir.path(), 1001, 27);
        assert_eq!(
            found,
            vec![GroupProcess {
                pid: 10,
                command: "sh".into()
            }]
        );
    }
}
