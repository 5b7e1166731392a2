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
    /// A key file does not parse.
    #[error("{path}: {message}")]
    Invalid {
        /// Which file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

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

    /// The bundle-signing key.
    pub fn signing_key(&self) -> Result<PolicySigningKey, KeysError> {
        let path = self.file("signing-key.pem");
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

        fs::remove_file(data.file("server.pem")).unwrap();
        let err = data.ensure_keys(&hosts).unwrap_err().to_string();
        assert!(
            err.contains("half-made") && err.contains("server.pem"),
            "{err}"
        );
    }
}
