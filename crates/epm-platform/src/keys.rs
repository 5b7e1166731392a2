//! The platform's data directory: its CA, server certificate and
//! bundle-signing key, made once at first start and never overwritten.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use epm_api::sign::PolicySigningKey;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The files of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    /// The directory.
    pub dir: PathBuf,
}

/// What went wrong preparing the data directory.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Some key files exist and others do not.
    #[error(
        "{dir} holds {present} but not {missing}: a half-made key set. Restore the missing files from a backup, or move the directory's key files away to make new ones (agents must then be given the new ca.pem and signing-key.pub)"
    )]
    Partial {
        /// The directory.
        dir: PathBuf,
        /// Files found.
        present: String,
        /// Files missing.
        missing: String,
    },
    /// Certificate generation failed.
    #[error("cannot make the {what}: {source}")]
    Certificate {
        /// Which certificate.
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },
    /// A signing-key rotation step cannot be taken now.
    #[error("{0}")]
    Rotation(String),
    /// A key file does not parse.
    #[error("{path}: {message}")]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// The next signing key of a rotation, and its public half.
const NEXT_KEY: &str = "signing-key-next.pem";
const NEXT_PUB: &str = "signing-key-next.pub";

const KEY_FILES: [&str; 6] = [
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "signing-key.pem",
    "signing-key.pub",
];

impl DataDir {
    /// The directory `dir`, created (mode 0700: it holds private keys and
    /// every device's offline key) if missing.
    pub fn open(dir: &Path) -> Result<DataDir, KeysError> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| KeysError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let dir = dir.canonicalize().map_err(|source| KeysError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(DataDir { dir })
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.file("platform.db")
    }

    /// The CA certificate agents pin.
    pub fn ca_cert(&self) -> PathBuf {
        self.file("ca.pem")
    }

    /// Makes the CA, the server certificate (for `hostnames`) and the
    /// signing key if none exist; returns whether it made them. Refuses a
    /// half-made set rather than replacing keys agents already pinned.
    pub fn ensure_keys(&self, hostnames: &[String]) -> Result<bool, KeysError> {
        let (present, missing): (Vec<&str>, Vec<&str>) =
            KEY_FILES.iter().partition(|name| self.file(name).exists());
        if missing.is_empty() {
            return Ok(false);
        }
        if !present.is_empty() {
            return Err(KeysError::Partial {
                dir: self.dir.clone(),
                present: present.join(", "),
                missing: missing.join(", "),
            });
        }

        let cert_err = |what| move |source| KeysError::Certificate { what, source };
        let ca_key = KeyPair::generate().map_err(cert_err("CA key"))?;
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name = name("EPM platform CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_after = rcgen::date_time_ymd(2046, 1, 1);
        let ca_cert = ca
            .self_signed(&ca_key)
            .map_err(cert_err("CA certificate"))?;

        let server_key = KeyPair::generate().map_err(cert_err("server key"))?;
        let mut server = CertificateParams::default();
        server.distinguished_name = name(hostnames.first().map_or("localhost", String::as_str));
        server.subject_alt_names = hostnames
            .iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => h.clone().try_into().map(SanType::DnsName).map_err(cert_err(
                    "server certificate (a --hostname is not a valid DNS name)",
                )),
            })
            .collect::<Result<_, _>>()?;
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.use_authority_key_identifier_extension = true;
        server.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let server_cert = server
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(cert_err("server certificate"))?;

        let signing = PolicySigningKey::generate();
        let signing_pem = signing.to_pkcs8_pem().map_err(|e| KeysError::Invalid {
            path: self.file("signing-key.pem"),
            message: e.to_string(),
        })?;

        // Private keys first and 0600; the public files last, so a crash
        // leaves a partial set that the next start names.
        self.write_new("ca-key.pem", &ca_key.serialize_pem(), 0o600)?;
        self.write_new("server-key.pem", &server_key.serialize_pem(), 0o600)?;
        self.write_new("signing-key.pem", &signing_pem, 0o600)?;
        self.write_new("server.pem", &server_cert.pem(), 0o644)?;
        self.write_new("ca.pem", &ca_cert.pem(), 0o644)?;
        self.write_new(
            "signing-key.pub",
            &format!("{}\n", signing.public_key()),
            0o644,
        )?;
        Ok(true)
    }

    /// The bundle-signing key in use. Its public half must be
    /// `signing-key.pub`'s (what agents were given): a start with a pair
    /// that disagrees (a rotation cut short) is refused, not signed with.
    pub fn signing_key(&self) -> Result<PolicySigningKey, KeysError> {
        let key = self.read_signing_key("signing-key.pem")?;
        let path = self.file("signing-key.pub");
        let public = fs::read_to_string(&path).map_err(|source| KeysError::Io {
            path: path.clone(),
            source,
        })?;
        if public.trim() != key.public_key().to_string() {
            return Err(KeysError::Invalid {
                path,
                message: format!(
                    "does not hold the public half of signing-key.pem ({}): restore the pair from a backup, or finish the rotation",
                    key.public_key()
                ),
            });
        }
        Ok(key)
    }

    /// The next bundle-signing key, made for a rotation and not in use
    /// yet, if there is one.
    pub fn next_signing_key(&self) -> Result<Option<PolicySigningKey>, KeysError> {
        if !self.file(NEXT_KEY).exists() {
            return Ok(None);
        }
        self.read_signing_key(NEXT_KEY).map(Some)
    }

    /// Makes the next bundle-signing key beside the one in use
    /// (`signing-key-next.pem`, `.pub`), the first step of a rotation:
    /// agents must pin it too before it is put in use. Refuses when one is
    /// already waiting.
    pub fn make_next_signing_key(&self) -> Result<PolicySigningKey, KeysError> {
        if self.file(NEXT_KEY).exists() || self.file(NEXT_PUB).exists() {
            return Err(KeysError::Rotation(format!(
                "a next signing key is already waiting in {}: give agents its public key, then promote it",
                self.dir.display()
            )));
        }
        let next = PolicySigningKey::generate();
        let pem = next.to_pkcs8_pem().map_err(|e| KeysError::Invalid {
            path: self.file(NEXT_KEY),
            message: e.to_string(),
        })?;
        self.write_new(NEXT_KEY, &pem, 0o600)?;
        self.write_new(NEXT_PUB, &format!("{}\n", next.public_key()), 0o644)?;
        Ok(next)
    }

    /// Puts the next signing key in use: the current pair is kept as
    /// `signing-key-retired-<unix time>.pem` (and `.pub`), then the next
    /// pair replaces it. Returns (the retired key, the key now in use).
    /// The server loads the key at start: restart it.
    pub fn promote_next_signing_key(
        &self,
    ) -> Result<(PolicySigningKey, PolicySigningKey), KeysError> {
        let next = self.next_signing_key()?.ok_or_else(|| {
            KeysError::Rotation(format!(
                "no next signing key in {}: make one first (signing-key next)",
                self.dir.display()
            ))
        })?;
        let current = self.signing_key()?;
        let stamp = jiff::Timestamp::now().as_second();
        let io = |path: PathBuf| move |source| KeysError::Io { path, source };
        for (from, to) in [
            (
                "signing-key.pem",
                format!("signing-key-retired-{stamp}.pem"),
            ),
            (
                "signing-key.pub",
                format!("signing-key-retired-{stamp}.pub"),
            ),
        ] {
            // A link first: the key set stays whole if anything fails.
            fs::hard_link(self.file(from), self.file(&to)).map_err(io(self.file(&to)))?;
        }
        // Each rename replaces a file whole; the private key goes first, so
        // a crash between leaves a pair the server refuses to start with
        // (the .pub no longer matches), never one it signs wrongly with.
        for (from, to) in [(NEXT_KEY, "signing-key.pem"), (NEXT_PUB, "signing-key.pub")] {
            fs::rename(self.file(from), self.file(to)).map_err(io(self.file(to)))?;
        }
        Ok((current, next))
    }

    fn read_signing_key(&self, name: &str) -> Result<PolicySigningKey, KeysError> {
        let path = self.file(name);
        let pem = fs::read_to_string(&path).map_err(|source| KeysError::Io {
            path: path.clone(),
            source,
        })?;
        PolicySigningKey::from_pkcs8_pem(&pem).map_err(|e| KeysError::Invalid {
            path,
            message: e.to_string(),
        })
    }

    fn write_new(&self, name: &str, content: &str, mode: u32) -> Result<(), KeysError> {
        let path = self.file(name);
        let io = |source| KeysError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .map_err(io)?;
        file.write_all(content.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "EPM");
    dn
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_made_once_with_private_files_private() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        assert!(data.ensure_keys(&hosts).unwrap());
        for (file, mode) in [
            ("ca-key.pem", 0o600),
            ("server-key.pem", 0o600),
            ("signing-key.pem", 0o600),
            ("ca.pem", 0o644),
        ] {
            let meta = fs::metadata(data.file(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        let public = fs::read_to_string(data.file("signing-key.pub")).unwrap();
        assert_eq!(
            public.trim(),
            data.signing_key().unwrap().public_key().to_string()
        );
        let ca = fs::read(data.ca_cert()).unwrap();
        assert!(!data.ensure_keys(&hosts).unwrap(), "second start reuses");
        assert_eq!(fs::read(data.ca_cert()).unwrap(), ca);

        // A rotation: the next key waits beside the one in use, then
        // replaces it; the old pair is kept.
        let before = data.signing_key().unwrap().public_key();
        assert!(data.next_signing_key().unwrap().is_none());
        let next = data.make_next_signing_key().unwrap().public_key();
        assert_ne!(next, before);
        let err = data.make_next_signing_key().unwrap_err().to_string();
        assert!(err.contains("already waiting"), "{err}");
        assert_eq!(
            data.signing_key().unwrap().public_key(),
            before,
            "not in use yet"
        );
        let (retired, current) = data.promote_next_signing_key().unwrap();
        assert_eq!((retired.public_key(), current.public_key()), (before, next));
        assert_eq!(data.signing_key().unwrap().public_key(), next);
        assert!(data.next_signing_key().unwrap().is_none());
        let kept: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("signing-key-retired-"))
            .collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        let err = data.promote_next_signing_key().unwrap_err().to_string();
        assert!(err.contains("no next signing key"), "{err}");
        // A pair that disagrees is refused, never signed with.
        fs::write(data.file("signing-key.pub"), format!("{before}\n")).unwrap();
        let err = data.signing_key().unwrap_err().to_string();
        assert!(err.contains("does not hold the public half"), "{err}");

        fs::remove_file(data.file("server.pem")).unwrap();
        let err = data.ensure_keys(&hosts).unwrap_err().to_string();
        assert!(
            err.contains("half-made") && err.contains("server.pem"),
            "{err}"
        );
    }
}
