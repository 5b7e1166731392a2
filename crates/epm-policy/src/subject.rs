//! The subject of a decision: one exec, as an exec gate saw it.

use crate::digest::{CdHash, Sha256Digest};

/// Everything a policy can ask about one exec. Every exec gate (fanotify,
/// Endpoint Security, the sudo plugin, `epmctl policy explain`) fills this
/// same plain struct; fields a platform cannot know stay `None`/empty, and
/// criteria on them then never hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    /// Absolute path of the executable (lossy UTF-8 where the OS path is not).
    pub path: String,
    /// SHA-256 of the executable's bytes, when computed.
    pub sha256: Option<Sha256Digest>,
    /// Apple CDHash, from the code signature.
    pub cdhash: Option<CdHash>,
    /// Apple team id of the signer.
    pub team_id: Option<String>,
    /// Code-signing identifier.
    pub signing_id: Option<String>,
    /// Bundle identifier of the enclosing application.
    pub bundle_id: Option<String>,
    /// Whether this is an Apple platform binary; `None` where the platform
    /// has no such notion (Linux), so `platform_binary` criteria never hold there.
    pub platform_binary: Option<bool>,
    /// The new program's arguments, where the platform knows them.
    pub argv: Option<Vec<String>>,
    /// Process id of the exec'ing process.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Executable path of the parent process.
    pub parent_path: Option<String>,
    /// User id the program will run as.
    pub uid: u32,
    /// User name for `uid` (empty if unknown).
    pub user: String,
    /// Names of the user's groups.
    pub groups: Vec<String>,
    /// This device's identifier.
    pub device_id: String,
    /// Whose name `path` is: only a path the daemon has checked in its own
    /// mount namespace (Linux: `stat` of it there finds the executed file)
    /// is matched by `path`, `path_glob` and `name` rules.
    pub path_origin: PathOrigin,
}

/// Where a [`Subject`]'s path comes from, and so whether path rules may
/// match it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PathOrigin {
    /// The daemon's own view: the path names the executed file in the
    /// daemon's mount namespace. Path, glob and name rules apply.
    #[default]
    Local,
    /// Read in another mount namespace (or root) than the daemon's, where
    /// the user may have mounted anything anywhere: the path is theirs to
    /// forge, so path, glob and name rules do not match it.
    OtherNamespace,
    /// Read where the daemon can check it, but it names another file there,
    /// or none (moved or deleted since): it identifies nothing, so path,
    /// glob and name rules do not match it.
    NotFoundHere,
    /// A file with no path at all (a memfd, or another kernel-internal
    /// file): its "name" is its creator's choice, so path, glob and name
    /// rules do not match it.
    Anonymous,
}

impl PathOrigin {
    /// Whether path, glob and name rules may match the path.
    pub fn trusted(self) -> bool {
        self == PathOrigin::Local
    }

    /// How audit records name it.
    pub fn as_str(self) -> &'static str {
        match self {
            PathOrigin::Local => "local",
            PathOrigin::OtherNamespace => "other_mount_namespace",
            PathOrigin::NotFoundHere => "not_this_file_here",
            PathOrigin::Anonymous => "anonymous",
        }
    }
}

impl Subject {
    /// The executable's file name: the last component of `path`.
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}
