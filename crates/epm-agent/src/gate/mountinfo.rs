//! Which mounts to gate: parsing `/proc/self/mountinfo` and filtering it by
//! file-system type and the configured watch paths. Pure, tested with fixtures.

use std::path::{Path, PathBuf};

/// File-system types whose executables are gated: every disk and memory
/// file system a program can be run from. Pseudo file systems (proc, sysfs,
/// cgroup, …) hold no programs.
pub const WATCHED_FS_TYPES: &[&str] = &[
    "btrfs", "devtmpfs", "exfat", "ext2", "ext3", "ext4", "f2fs", "fuseblk", "jfs", "nfs", "nfs4",
    "ntfs", "ntfs3", "overlay", "ramfs", "reiserfs", "squashfs", "tmpfs", "vfat", "xfs", "zfs",
    "bcachefs", "erofs", "iso9660", "udf",
];

/// One mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The kernel's mount id (unique while mounted).
    pub id: u64,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Its file-system type.
    pub fs_type: String,
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    // id parent major:minor root mount_point options [optional…] - fs_type source super_options
    let (before, after) = line.split_once(" - ")?;
    let mut fields = before.split(' ');
    let id = fields.next()?.parse().ok()?;
    let mount_point = unescape(fields.nth(3)?);
    let fs_type = after.split(' ').next()?.to_owned();
    Some(Mount {
        id,
        mount_point: PathBuf::from(mount_point),
        fs_type,
    })
}

/// Undoes the kernel's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a mount is gated: a watched type, at or below a watch path.
pub fn is_watched(mount: &Mount, watch_paths: &[PathBuf]) -> bool {
    WATCHED_FS_TYPES.contains(&mount.fs_type.as_str())
        && watch_paths
            .iter()
            .any(|w| is_at_or_below(&mount.mount_point, w))
}

fn is_at_or_below(path: &Path, ancestor: &Path) -> bool {
    path.starts_with(ancestor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw
24 22 0:22 / /sys rw,nosuid - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid shared:3 - devtmpfs udev rw,size=4k
26 25 0:23 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw
40 22 0:40 / /mnt/my\\040disk rw,relatime shared:20 - vfat /dev/sdb1 rw
41 22 0:41 / /tmp/epm-e2e rw master:7 - tmpfs tmpfs rw
not a mountinfo line
";

    #[test]
    fn parses_ids_points_types_and_escapes() {
        let mounts = parse(MOUNTINFO);
        assert_eq!(mounts.len(), 7);
        assert_eq!(
            mounts[0],
            Mount {
                id: 22,
                mount_point: "/".into(),
                fs_type: "ext4".into()
            }
        );
        assert_eq!(mounts[5].mount_point, PathBuf::from("/mnt/my disk"));
        assert_eq!(mounts[6].fs_type, "tmpfs");
    }

    #[test]
    fn filters_by_type_and_watch_path() {
        let mounts = parse(MOUNTINFO);
        let everything: Vec<u64> = mounts
            .iter()
            .filter(|m| is_watched(m, &["/".into()]))
            .map(|m| m.id)
            .collect();
        assert_eq!(everything, [22, 25, 26, 40, 41], "no proc or sysfs");
        let narrow: Vec<u64> = mounts
            .iter()
            .filter(|m| is_watched(m, &["/tmp/epm-e2e".into()]))
            .map(|m| m.id)
            .collect();
        assert_eq!(narrow, [41]);
        let prefix_is_not_parent: Vec<u64> = mounts
            .iter()
            .filter(|m| is_watched(m, &["/tmp/epm".into()]))
            .map(|m| m.id)
            .collect();
        assert!(
            prefix_is_not_parent.is_empty(),
            "path components, not string prefixes"
        );
    }
}
