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
    /// `path` does not name the executed file where the gate can check it
    /// (Linux: it was read in another mount namespace, where a user may
    /// mount anything anywhere, or the file was moved or deleted): `path`,
    /// `path_glob` and `name` criteria never hold, whatever it says.
    pub path_unverified: bool,
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
}

impl Subject {
    /// The executable's file name: the last component of `path`.
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}
