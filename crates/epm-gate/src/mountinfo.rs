//! Which mounts to gate, and how: parsing `/proc/self/mountinfo` and
//! filtering it by file-system type and the configured watch paths. Pure,
//! tested with fixtures; the fanotify gate does the reading and marking.

use std::path::{Path, PathBuf};

/// File-system types whose executables are gated by default: the disk,
/// image and memory file systems programs are run from, overlay (container
/// roots), root-mounted FUSE block file systems (`fuseblk`: ntfs-3g, exfat-fuse)
/// and NFS and virtiofs (network homes, VM roots).
///
/// Left out, to be added to the configured list knowingly:
/// - `fuse` / `fuse.*`: any user can mount one (setuid `fusermount`), so they
///   are a way around the gate; but the kernel opens the event's file for the
///   gate before handing the event over, and a FUSE server that is itself
///   waiting in an exec from its own mount never answers that open: the
///   gate's reader, and with it every gated exec on the machine, would hang.
/// - `cifs`, `smb3`, `9p`, `ceph`: the same open stalls the reader while the
///   server does not answer. (NFS has that hazard too; it stays in the list
///   because programs run from NFS homes are too common to leave ungated.)
/// - pseudo file systems (proc, sysfs, cgroup, devpts, …): they hold no
///   programs, and the kernel refuses permission marks on most of them.
pub const WATCHED_FS_TYPES: &[&str] = &[
    "bcachefs", "btrfs", "devtmpfs", "erofs", "exfat", "ext2", "ext3", "ext4", "f2fs", "fuseblk",
    "hfsplus", "iso9660", "jfs", "nfs", "nfs4", "nilfs2", "ntfs", "ntfs3", "overlay", "ramfs",
    "reiserfs", "squashfs", "tmpfs", "udf", "vfat", "virtiofs", "xfs", "zfs",
];

/// One mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The kernel's mount id (unique while mounted).
    pub id: u64,
    /// Device number (major, minor) of the file system: the same for every
    /// mount of one file system, bind mounts included.
    pub dev: (u32, u32),
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Its file-system type.
    pub fs_type: String,
    /// The mount source (a device path, `server:/export`, or a free-form name).
    pub source: String,
}

impl Mount {
    /// Whether `self` and `other` are (very likely) the same file system, so
    /// one `FAN_MARK_FILESYSTEM` covers both. The device number says so for
    /// all but btrfs subvolumes, which each get their own device number while
    /// sharing one file system, mounted from one block device.
    pub fn same_file_system(&self, other: &Mount) -> bool {
        self.dev == other.dev
            || (self.fs_type == other.fs_type
                && self.source == other.source
                && self.source.starts_with('/'))
    }
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
    let _parent = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let dev = (major.parse().ok()?, minor.parse().ok()?);
    let _root = fields.next()?;
    let mount_point = unescape(fields.next()?);
    let mut after = after.split(' ');
    let fs_type = after.next()?.to_owned();
    let source = unescape(after.next().unwrap_or(""));
    Some(Mount {
        id,
        dev,
        mount_point: PathBuf::from(mount_point),
        fs_type,
        source,
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

/// How a mount is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkScope {
    /// `FAN_MARK_FILESYSTEM`: every mount of the file system, including
    /// bind mounts and the copies in other mount namespaces (`unshare -m`,
    /// or an unprivileged `unshare -Urm`), which carry no mount marks.
    Filesystem,
    /// `FAN_MARK_MOUNT`: this mount only, in this mount namespace. Used when
    /// the file system is also mounted outside the watch paths, which a
    /// file-system mark would gate too.
    Mount,
}

/// Which mounts are gated: a watched file-system type, at or below a watch path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchScope {
    paths: Vec<PathBuf>,
    fs_types: Vec<String>,
}

impl WatchScope {
    /// Mounts of one of `fs_types` at or below one of `paths`.
    pub fn new(paths: Vec<PathBuf>, fs_types: Vec<String>) -> Self {
        Self { paths, fs_types }
    }

    /// The watch paths.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Whether `mount` is gated.
    pub fn watches(&self, mount: &Mount) -> bool {
        self.fs_types.contains(&mount.fs_type) && self.contains(&mount.mount_point)
    }

    /// Whether `path` is at or below a watch path (by path components: a
    /// watch path `/tmp/epm` does not contain `/tmp/epm-e2e`).
    pub fn contains(&self, path: &Path) -> bool {
        self.paths.iter().any(|w| path.starts_with(w))
    }

    /// How to mark the watched `mount`, given every mount in the table: by
    /// file system when all of that file system's mounts are within the
    /// watch paths (always, when `/` is one), else by mount.
    pub fn mark_scope(&self, mount: &Mount, all: &[Mount]) -> MarkScope {
        let whole = all
            .iter()
            .filter(|other| other.same_file_system(mount))
            .all(|other| self.contains(&other.mount_point));
        if whole {
            MarkScope::Filesystem
        } else {
            MarkScope::Mount
        }
    }
}

/// Whether a mount is gated with the default file-system types.
pub fn is_watched(mount: &Mount, watch_paths: &[PathBuf]) -> bool {
    WATCHED_FS_TYPES.contains(&mount.fs_type.as_str())
        && watch_paths.iter().any(|w| mount.mount_point.starts_with(w))
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
42 22 0:41 /sub /srv/bound rw - tmpfs tmpfs rw
43 22 254:0 /home /home rw - ext4 /dev/vda rw
44 22 0:50 /@data /data rw - btrfs /dev/sdc rw,subvol=/@data
45 22 0:51 /@logs /var/log rw - btrfs /dev/sdc rw,subvol=/@logs
46 22 0:52 / /mnt/fuse rw - fuse.sshfs user@host:/ rw
not a mountinfo line
";

    fn scope(paths: &[&str]) -> WatchScope {
        WatchScope::new(
            paths.iter().map(PathBuf::from).collect(),
            WATCHED_FS_TYPES.iter().map(|t| (*t).to_owned()).collect(),
        )
    }

    fn watched(paths: &[&str]) -> Vec<u64> {
        let scope = scope(paths);
        parse(MOUNTINFO)
            .iter()
            .filter(|m| scope.watches(m))
            .map(|m| m.id)
            .collect()
    }

    #[test]
    fn parses_ids_devices_points_types_sources_and_escapes() {
        let mounts = parse(MOUNTINFO);
        assert_eq!(mounts.len(), 12, "the malformed line is skipped");
        assert_eq!(
            mounts[0],
            Mount {
                id: 22,
                dev: (254, 0),
                mount_point: "/".into(),
                fs_type: "ext4".into(),
                source: "/dev/vda".into(),
            }
        );
        assert_eq!(mounts[5].mount_point, PathBuf::from("/mnt/my disk"));
        assert_eq!(mounts[6].fs_type, "tmpfs");
        assert_eq!(mounts[6].dev, (0, 41));
        assert_eq!(mounts[11].fs_type, "fuse.sshfs");
    }

    #[test]
    fn filters_by_type_and_watch_path() {
        assert_eq!(
            watched(&["/"]),
            [22, 25, 26, 40, 41, 42, 43, 44, 45],
            "no proc, sysfs or user FUSE"
        );
        assert_eq!(watched(&["/tmp/epm-e2e"]), [41]);
        assert_eq!(watched(&["/tmp/epm-e2e", "/mnt"]), [40, 41]);
        assert!(
            watched(&["/tmp/epm"]).is_empty(),
            "path components, not string prefixes"
        );
        assert!(
            watched(&["/home/alice"]).is_empty(),
            "a mount above a watch path is not gated"
        );
        let mounts = parse(MOUNTINFO);
        let legacy: Vec<u64> = mounts
            .iter()
            .filter(|m| is_watched(m, &["/tmp/epm-e2e".into()]))
            .map(|m| m.id)
            .collect();
        assert_eq!(legacy, [41]);
    }

    #[test]
    fn file_systems_entirely_in_scope_are_marked_whole() {
        let mounts = parse(MOUNTINFO);
        let scope_of = |paths: &[&str], id: u64| {
            let mount = mounts.iter().find(|m| m.id == id).unwrap();
            scope(paths).mark_scope(mount, &mounts)
        };
        // Everything watched: every file system is marked whole.
        for id in [22, 41, 43, 44] {
            assert_eq!(scope_of(&["/"], id), MarkScope::Filesystem, "mount {id}");
        }
        // The tmpfs is also bound at /srv/bound, outside the watch path.
        assert_eq!(scope_of(&["/tmp/epm-e2e"], 41), MarkScope::Mount);
        assert_eq!(
            scope_of(&["/tmp/epm-e2e", "/srv"], 41),
            MarkScope::Filesystem
        );
        // /home is the root file system, mostly outside the watch path.
        assert_eq!(scope_of(&["/home"], 43), MarkScope::Mount);
        // A disk of its own.
        assert_eq!(scope_of(&["/mnt"], 40), MarkScope::Filesystem);
        // btrfs subvolumes of one volume have different device numbers.
        assert_eq!(scope_of(&["/data"], 44), MarkScope::Mount);
        assert_eq!(scope_of(&["/data", "/var/log"], 44), MarkScope::Filesystem);
    }
}
