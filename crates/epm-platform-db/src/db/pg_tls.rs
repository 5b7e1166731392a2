//! TLS to PostgreSQL: what a `postgres://` URL asks for, and the rustls
//! connector that gives it.
//!
//! The URL takes libpq's two TLS parameters, so a DBA's connection string
//! works as written:
//! - `sslmode`: `disable`, `allow` or `prefer` (the default): no TLS;
//!   `require`, `verify-ca` or `verify-full`: TLS, and the connection fails
//!   without it.
//! - `sslrootcert=PATH`: the PEM file of the certificate authorities that
//!   may sign the server's certificate.
//!
//! EPM always verifies the server, whichever TLS mode is named: the chain
//! up to a certificate in `sslrootcert`, and the host name in the URL
//! (libpq's `verify-full`). The database holds every device's credentials
//! and the approvals, so an unverified connection (libpq's `require`)
//! would let anyone on the path read and change them; a mode that asks for
//! TLS without `sslrootcert` is refused at start, naming the parameter.
//! `prefer` does not try TLS first: trying it would fail against servers
//! that offer it with a certificate nobody gave the platform the authority
//! of (Debian's default), where libpq would have connected unverified.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::sql::SqlError;

/// A PostgreSQL connection's settings and, when TLS is asked for, its
/// connector.
#[derive(Clone)]
pub(crate) struct PgTarget {
    /// Everything but the TLS parameters, parsed by tokio-postgres.
    pub(crate) config: tokio_postgres::Config,
    /// `None`: a plain connection.
    pub(crate) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The TLS parameters of a URL, taken out of it.
#[derive(Debug, Default, PartialEq, Eq)]
struct TlsParams {
    /// TLS asked for (`sslmode` require, verify-ca or verify-full).
    required: bool,
    root_cert: Option<PathBuf>,
}

impl PgTarget {
    /// Reads `url`; `shown` is the URL as errors may show it (no
    /// password).
    pub(crate) fn parse(url: &str, shown: &str) -> Result<PgTarget, SqlError> {
        let (rest, params) =
            take_tls_params(url).map_err(|e| SqlError::Pool(format!("{shown}: {e}")))?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| SqlError::Pool(format!("{shown}: {e}")))?;
        if !params.required {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            return Ok(PgTarget { config, tls: None });
        }
        let Some(root_cert) = params.root_cert else {
            return Err(SqlError::Pool(format!(
                "{shown}: sslmode asks for TLS but names no sslrootcert=PATH, the PEM file of the \
                 authority that signed the server's certificate (EPM always verifies the server)"
            )));
        };
        let roots = load_roots(&root_cert).map_err(|e| SqlError::Pool(format!("{shown}: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SqlError::Pool(format!("TLS to PostgreSQL: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        Ok(PgTarget {
            config,
            tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)),
        })
    }
}

/// Splits `sslmode` and `sslrootcert` off the URL's query (tokio-postgres
/// knows neither `verify-*` mode nor `sslrootcert`).
fn take_tls_params(url: &str) -> Result<(String, TlsParams), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), TlsParams::default()));
    };
    let mut params = TlsParams::default();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", mode)) => {
                params.required = match mode {
                    "disable" | "allow" | "prefer" => false,
                    "require" | "verify-ca" | "verify-full" => true,
                    other => {
                        return Err(format!(
                            "sslmode={other} is not one of disable, allow, prefer, require, \
                             verify-ca, verify-full"
                        ));
                    }
                }
            }
            Some(("sslrootcert", path)) if !path.is_empty() => {
                params.root_cert = Some(PathBuf::from(percent_decoded(path)?));
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

/// A URL query value with its `%XX` escapes decoded, as libpq reads them
/// (`sslrootcert=%2Fetc%2Fepm%2Fca.pem`).
fn percent_decoded(value: &str) -> Result<String, String> {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("sslrootcert={value}: a % not followed by two hex digits")
                })?;
            decoded.push(hex);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| format!("sslrootcert={value}: not UTF-8 once decoded"))
}

/// The certificates of a PEM file, as trust anchors.
fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("sslrootcert={}: cannot read it: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("sslrootcert={}: not PEM: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert={}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "sslrootcert={}: holds no certificate (want a PEM \"BEGIN CERTIFICATE\" block)",
            path.display()
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::sql::{Conn, Pg};

    /// The server of `EPM_TEST_POSTGRES_URL` with TLS on, and the CA that
    /// signed its certificate (`EPM_TEST_POSTGRES_TLS_CA`; .ci/run makes
    /// both); `None` (skipped) without them, unless `EPM_E2E=1`.
    fn tls_server() -> Option<(String, PathBuf)> {
        let url = std::env::var("EPM_TEST_POSTGRES_URL")
            .ok()
            .filter(|u| !u.is_empty());
        let ca = std::env::var("EPM_TEST_POSTGRES_TLS_CA")
            .ok()
            .filter(|c| !c.is_empty());
        match (url, ca) {
            (Some(url), Some(ca)) => Some((url, PathBuf::from(ca))),
            _ => {
                assert_ne!(
                    std::env::var("EPM_E2E").as_deref(),
                    Ok("1"),
                    "EPM_E2E=1 needs EPM_TEST_POSTGRES_URL and EPM_TEST_POSTGRES_TLS_CA: a \
                     PostgreSQL with ssl=on and the CA of its certificate (.ci/run makes both)"
                );
                eprintln!("skipped: no EPM_TEST_POSTGRES_URL and EPM_TEST_POSTGRES_TLS_CA");
                None
            }
        }
    }

    /// Whether the pool's connection to `url` is encrypted, by the
    /// server's own account.
    fn encrypted(url: &str) -> crate::db::sql::Result<bool> {
        let pg = Pg::connect(url, 1)?;
        let conn = Conn::postgres(&pg)?;
        conn.query_row(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            Vec::<crate::db::sql::Value>::new(),
            |row| row.get::<_, bool>(0),
        )
    }

    #[test]
    fn a_real_server_is_reached_over_verified_tls_and_another_authority_is_refused() {
        let Some((url, ca)) = tls_server() else {
            return;
        };
        let with = |query: &str| {
            if url.contains('?') {
                format!("{url}&{query}")
            } else {
                format!("{url}?{query}")
            }
        };
        let verified = with(&format!("sslmode=verify-full&sslrootcert={}", ca.display()));
        assert!(encrypted(&verified).unwrap(), "TLS, by pg_stat_ssl");
        assert!(
            !encrypted(&with("sslmode=disable")).unwrap(),
            "plain when asked"
        );
        assert!(!encrypted(&url).unwrap(), "plain by default (prefer)");

        // A certificate authority that did not sign the server's: refused,
        // saying why, never connected unverified.
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other-ca.pem");
        std::fs::write(&other, OTHER_CA).unwrap();
        let error = encrypted(&with(&format!(
            "sslmode=require&sslrootcert={}",
            other.display()
        )))
        .unwrap_err()
        .to_string();
        assert!(error.contains("certificate"), "{error}");
        eprintln!("another authority: {error}");
    }

    /// A CA certificate nobody signed a PostgreSQL server's certificate
    /// with (made once with `openssl req -x509`, kept for its shape).
    const OTHER_CA: &str = include_str!("pg_tls_other_ca.pem");

    #[test]
    fn the_tls_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, params) = take_tls_params(
            "postgres://epm@db.example:5432/epm?sslmode=verify-full&application_name=epm&sslrootcert=/etc/epm/pg-ca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://epm@db.example:5432/epm?application_name=epm"
        );
        assert_eq!(
            params,
            TlsParams {
                required: true,
                root_cert: Some("/etc/epm/pg-ca.pem".into())
            }
        );
        let (rest, params) = take_tls_params("postgres://epm@db/epm?sslmode=prefer").unwrap();
        assert_eq!(rest, "postgres://epm@db/epm");
        assert!(!params.required);
        assert_eq!(
            take_tls_params("postgres://epm@db/epm").unwrap().0,
            "postgres://epm@db/epm"
        );
        let error = take_tls_params("postgres://db/epm?sslmode=verify").unwrap_err();
        assert!(error.contains("sslmode=verify is not one of"), "{error}");
        let (_, params) =
            take_tls_params("postgres://db/epm?sslrootcert=%2Fetc%2Fepm%20ca.pem").unwrap();
        assert_eq!(params.root_cert, Some("/etc/epm ca.pem".into()));
        let error = take_tls_params("postgres://db/epm?sslrootcert=%zz").unwrap_err();
        assert!(error.contains("two hex digits"), "{error}");
    }

    #[test]
    fn tls_without_an_authority_or_with_a_bad_one_is_refused_by_name() {
        let shown = "postgres://epm@db/epm";
        let error = PgTarget::parse("postgres://epm@db/epm?sslmode=require", shown).unwrap_err();
        assert!(
            error.to_string().contains("names no sslrootcert=PATH"),
            "{error}"
        );

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let error = PgTarget::parse(
            &format!(
                "postgres://epm@db/epm?sslmode=require&sslrootcert={}",
                missing.display()
            ),
            shown,
        )
        .unwrap_err();
        assert!(error.to_string().contains("cannot read it"), "{error}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = PgTarget::parse(
            &format!(
                "postgres://epm@db/epm?sslmode=verify-ca&sslrootcert={}",
                empty.display()
            ),
            shown,
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("holds no certificate"),
            "{error}"
        );

        let plain = PgTarget::parse("postgres://epm@db/epm", shown).unwrap();
        assert!(plain.tls.is_none());
    }
}
