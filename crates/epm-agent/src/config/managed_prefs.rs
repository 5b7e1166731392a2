//! Settings delivered by MDM as managed preferences: on macOS, the profile
//! `pkg/profiles/managed-preferences.mobileconfig` makes the system write
//! `/Library/Managed Preferences/com.epm.agent.plist`, and what it sets
//! takes precedence over `[platform]` in `epmd.toml`.
//!
//! Everything here is portable (parse from bytes or a path, overlay onto a
//! [`Config`]) and tested on Linux with XML and binary fixtures; only
//! [`system_path`] depends on the platform. An unknown key is a warning, so
//! a profile written for a newer agent still works; a wrong type or a bad
//! value is an error naming the key, like the TOML file's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use epm_api::sign::PolicyKeys;
use plist::Value;

use crate::config::{self, Config, PlatformConfig};

/// The preference domain: the payload type of the managed-preferences
/// profile and the plist's file name.
pub const DOMAIN: &str = "com.epm.agent";

/// The keys `epmd` reads from the domain. Each mirrors the `[platform]` key
/// of the same name, except `ca_cert_pem`: the CA's PEM text itself, which
/// `epmd` writes to [`MANAGED_CA_FILE`] in its state directory.
pub const KEYS: [&str; 6] = [
    "url",
    "ca_cert_pem",
    "ca_cert",
    "policy_public_key",
    "enrollment_token",
    "sync_interval",
];

/// Where a `ca_cert_pem` is written (under `state_dir`) for the TLS client.
pub const MANAGED_CA_FILE: &str = "managed-ca.pem";

/// Where the system puts this domain's managed preferences; `None` where
/// there is no such thing (every platform but macOS).
pub fn system_path() -> Option<PathBuf> {
    epm_os::paths::MANAGED_PREFERENCES_DIR.map(|dir| PathBuf::from(format!("{dir}/{DOMAIN}.plist")))
}

/// A managed-preferences file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("managed preferences {origin}: {message}")]
pub struct PrefsError {
    /// The file (or other origin) read.
    pub origin: String,
    /// What is wrong, naming the key.
    pub message: String,
}

/// The settings found in the domain, each already checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagedPrefs {
    /// `url`.
    pub url: Option<String>,
    /// `ca_cert_pem`: the CA certificate's PEM text.
    pub ca_cert_pem: Option<String>,
    /// `ca_cert`: an absolute path to the CA certificate.
    pub ca_cert: Option<PathBuf>,
    /// `policy_public_key`: a string, or an array of strings.
    pub policy_public_key: Option<PolicyKeys>,
    /// `enrollment_token`.
    pub enrollment_token: Option<String>,
    /// `sync_interval`.
    pub sync_interval: Option<Duration>,
    /// Keys that were ignored, one message each.
    pub warnings: Vec<String>,
}

impl ManagedPrefs {
    /// Reads the file at `path`; `Ok(None)` when there is none (no profile
    /// installed).
    pub fn load(path: &Path) -> Result<Option<ManagedPrefs>, PrefsError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_bytes(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(PrefsError {
                origin: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }),
        }
    }

    /// Parses a property list, XML or binary; `origin` names it in errors.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<ManagedPrefs, PrefsError> {
        let fail = |message: String| PrefsError {
            origin: origin.to_owned(),
            message,
        };
        let value = Value::from_reader(std::io::Cursor::new(bytes))
            .map_err(|e| fail(format!("not a property list: {e}")))?;
        let Value::Dictionary(dict) = value else {
            return Err(fail(format!(
                "expected a dictionary at the top, found {}",
                kind(&value)
            )));
        };
        let mut prefs = ManagedPrefs::default();
        for (key, value) in &dict {
            prefs
                .take(key, value)
                .map_err(|e| fail(format!("{key}: {e}")))?;
        }
        if prefs.ca_cert.is_some() && prefs.ca_cert_pem.is_some() {
            return Err(fail(
                "ca_cert and ca_cert_pem are exclusive: set one".to_owned(),
            ));
        }
        Ok(prefs)
    }

    fn take(&mut self, key: &str, value: &Value) -> Result<(), String> {
        match key {
            "url" => self.url = Some(config::check_https_url(string(value)?.to_owned())?),
            "ca_cert_pem" => {
                let pem = string(value)?;
                if !pem.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(
                        "not a PEM certificate (no \"-----BEGIN CERTIFICATE-----\" line)".into(),
                    );
                }
                self.ca_cert_pem = Some(pem.to_owned());
            }
            "ca_cert" => {
                let path = PathBuf::from(string(value)?);
                if !path.is_absolute() {
                    return Err(format!("{} must be an absolute path", path.display()));
                }
                self.ca_cert = Some(path);
            }
            "policy_public_key" => {
                // A string, or an array of them while the key is rotated.
                let keys = match value {
                    Value::Array(items) => {
                        items.iter().map(string).collect::<Result<Vec<_>, _>>()?
                    }
                    other => vec![string(other)?],
                };
                self.policy_public_key = Some(config::parse_keys(keys)?);
            }
            "enrollment_token" => {
                self.enrollment_token = Some(config::check_token(string(value)?)?)
            }
            "sync_interval" => {
                let duration = match value {
                    Value::String(text) => config::parse_duration(text)?,
                    Value::Integer(n) => Duration::from_secs(
                        n.as_unsigned()
                            .ok_or_else(|| format!("{n} is not a number of seconds"))?,
                    ),
                    other => {
                        return Err(format!(
                            "expected a duration like \"5m\" or a number of seconds, found {}",
                            kind(other)
                        ));
                    }
                };
                self.sync_interval = Some(config::check_sync_interval(duration)?);
            }
            // What a profile's payload carries about itself, not settings.
            _ if key.starts_with("Payload") => {}
            _ => self.warnings.push(format!(
                "unknown key {key:?} ignored (known: {})",
                KEYS.join(", ")
            )),
        }
        Ok(())
    }

    /// True when the domain sets nothing `epmd` reads.
    pub fn is_empty(&self) -> bool {
        self.url.is_none()
            && self.ca_cert_pem.is_none()
            && self.ca_cert.is_none()
            && self.policy_public_key.is_none()
            && self.enrollment_token.is_none()
            && self.sync_interval.is_none()
    }

    /// Lays these settings over `config`'s `[platform]` (making one if the
    /// file has none) and checks the result; returns the config keys it set.
    /// A `ca_cert_pem` points `platform.ca_cert` at [`MANAGED_CA_FILE`] in
    /// the state directory, which [`ManagedPrefs::install_ca`] writes.
    pub fn apply_to(&self, config: &mut Config) -> Result<Vec<&'static str>, String> {
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let ca_cert = match (&self.ca_cert, &self.ca_cert_pem) {
            (Some(path), _) => Some(path.clone()),
            (None, Some(_)) => Some(config.state_dir.join(MANAGED_CA_FILE)),
            (None, None) => None,
        };
        let mut platform = match config.platform.take() {
            Some(platform) => platform,
            None => {
                let missing = |key: &str| {
                    format!(
                        "sets platform settings but not {key}, and the config file has no [platform] table to take it from"
                    )
                };
                PlatformConfig {
                    url: self.url.clone().ok_or_else(|| missing("url"))?,
                    ca_cert: ca_cert
                        .clone()
                        .ok_or_else(|| missing("ca_cert_pem (or ca_cert)"))?,
                    policy_public_key: self
                        .policy_public_key
                        .clone()
                        .ok_or_else(|| missing("policy_public_key"))?,
                    enrollment_token: None,
                    sync_interval: config::default_sync_interval(),
                }
            }
        };
        let mut set = Vec::new();
        if let Some(url) = &self.url {
            platform.url = url.clone();
            set.push("platform.url");
        }
        if let Some(ca_cert) = ca_cert {
            platform.ca_cert = ca_cert;
            set.push("platform.ca_cert");
        }
        if let Some(keys) = &self.policy_public_key {
            platform.policy_public_key = keys.clone();
            set.push("platform.policy_public_key");
        }
        if let Some(token) = &self.enrollment_token {
            platform.enrollment_token = Some(token.clone());
            set.push("platform.enrollment_token");
        }
        if let Some(interval) = self.sync_interval {
            platform.sync_interval = interval;
            set.push("platform.sync_interval");
        }
        config.platform = Some(platform);
        config.validate()?;
        Ok(set)
    }

    /// Writes `ca_cert_pem`, if set, where [`ManagedPrefs::apply_to`]
    /// pointed `platform.ca_cert` (readable by all: a CA certificate is
    /// public). The file is replaced atomically, and only when it changed.
    pub fn install_ca(&self, config: &Config) -> std::io::Result<()> {
        let (Some(pem), Some(platform)) = (&self.ca_cert_pem, &config.platform) else {
            return Ok(());
        };
        let path = &platform.ca_cert;
        if std::fs::read(path).is_ok_and(|old| old == pem.as_bytes()) {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{MANAGED_CA_FILE}.{}", std::process::id()));
        std::fs::write(&tmp, pem)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
        }
        std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

fn string(value: &Value) -> Result<&str, String> {
    value
        .as_string()
        .ok_or_else(|| format!("expected a string, found {}", kind(value)))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Array(_) => "an array",
        Value::Dictionary(_) => "a dictionary",
        Value::Boolean(_) => "a boolean",
        Value::Data(_) => "data",
        Value::Date(_) => "a date",
        Value::Real(_) => "a real number",
        Value::Integer(_) => "an integer",
        Value::String(_) => "a string",
        Value::Uid(_) => "a UID",
        _ => "an unsupported value",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
