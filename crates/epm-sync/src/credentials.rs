//! Where the agent keeps the credentials it got at enrollment: a mode 0600
//! file in its state directory, or on macOS the System keychain (a root
//! launchd daemon's default keychain). Behind [`CredentialStore`] so the
//! daemon's logic is the same, and tested, with the file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use epm_api::agent::AgentCredentials;

/// The file name under the state directory.
pub const CREDENTIALS_FILE: &str = "agent-credentials.json";

/// Why credentials could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("agent credentials in {location}: {detail}")]
pub struct CredentialError {
    location: String,
    detail: String,
}

/// Somewhere to keep the agent's credentials.
pub trait CredentialStore: Send + Sync + std::fmt::Debug {
    /// The stored credentials; `None` before enrollment.
    fn load(&self) -> Result<Option<AgentCredentials>, CredentialError>;
    /// Replaces the stored credentials, atomically.
    fn save(&self, credentials: &AgentCredentials) -> Result<(), CredentialError>;
    /// Where they are, for messages.
    fn location(&self) -> String;
}

/// The platform's store: the keychain on macOS, the file elsewhere.
pub fn platform_store(state_dir: &Path) -> Box<dyn CredentialStore> {
    #[cfg(target_os = "macos")]
    {
        let _ = state_dir;
        Box::new(KeychainStore)
    }
    #[cfg(not(target_os = "macos"))]
    {
        Box::new(FileStore::new(state_dir.join(CREDENTIALS_FILE)))
    }
}

/// A JSON file readable by its owner only.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    /// Credentials kept at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn error(&self, detail: impl Into<String>) -> CredentialError {
        CredentialError {
            location: self.path.display().to_string(),
            detail: detail.into(),
        }
    }
}

impl CredentialStore for FileStore {
    fn load(&self) -> Result<Option<AgentCredentials>, CredentialError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(format!("cannot read: {e}"))),
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            self.error(format!(
                "unreadable ({e}); delete the file and enroll again with a new token"
            ))
        })
    }

    fn save(&self, credentials: &AgentCredentials) -> Result<(), CredentialError> {
        let json = serde_json::to_vec(credentials)
            .map_err(|e| self.error(format!("cannot serialize: {e}")))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_extension("json.tmp");
        // Written beside the target, synced, then renamed: a crash leaves
        // the old file or the new one, never half of either.
        let write = || -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            #[cfg(unix)]
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.error(format!("cannot write: {e}"))
        })
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

/// The System keychain, as a generic password.
#[cfg(target_os = "macos")]
#[derive(Debug, Clone, Copy)]
pub struct KeychainStore;

#[cfg(target_os = "macos")]
impl KeychainStore {
    const SERVICE: &'static str = "com.epm.agent";
    const ACCOUNT: &'static str = "agent-credentials";
    /// `errSecItemNotFound`.
    const NOT_FOUND: i32 = -25300;

    fn error(detail: String) -> CredentialError {
        CredentialError {
            location: Self::location_text(),
            detail,
        }
    }

    fn location_text() -> String {
        format!(
            "the keychain (service {}, account {})",
            Self::SERVICE,
            Self::ACCOUNT
        )
    }
}

#[cfg(target_os = "macos")]
impl CredentialStore for KeychainStore {
    fn load(&self) -> Result<Option<AgentCredentials>, CredentialError> {
        use security_framework::passwords::get_generic_password;
        match get_generic_password(Self::SERVICE, Self::ACCOUNT) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Self::error(format!(
                    "unreadable ({e}); delete the item and enroll again with a new token"
                ))
            }),
            Err(e) if e.code() == Self::NOT_FOUND => Ok(None),
            Err(e) => Err(Self::error(format!("cannot read: {e}"))),
        }
    }

    fn save(&self, credentials: &AgentCredentials) -> Result<(), CredentialError> {
        use security_framework::passwords::set_generic_password;
        let json = serde_json::to_vec(credentials)
            .map_err(|e| Self::error(format!("cannot serialize: {e}")))?;
        set_generic_password(Self::SERVICE, Self::ACCOUNT, &json)
            .map_err(|e| Self::error(format!("cannot write: {e}")))
    }

    fn location(&self) -> String {
        Self::location_text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(id: &str) -> AgentCredentials {
        AgentCredentials {
            agent_id: id.into(),
            agent_secret: "s3cret".into(),
            offline_key: "a2V5".into(),
        }
    }

    #[test]
    fn the_file_store_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join(CREDENTIALS_FILE));
        assert_eq!(store.load().unwrap(), None);
        store.save(&credentials("a1")).unwrap();
        store.save(&credentials("a2")).unwrap();
        assert_eq!(store.load().unwrap(), Some(credentials("a2")));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CREDENTIALS_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join(CREDENTIALS_FILE), "{").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("enroll again"), "{err}");
        assert!(!format!("{:?}", credentials("x")).contains("s3cret"));
    }
}
