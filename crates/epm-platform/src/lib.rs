//! The EPM reference platform: the management server agents sync with.
//!
//! HTTPS only; its data in SQLite or PostgreSQL (`epm-platform-db`). `epm-platform serve` makes its
//! CA, server certificate and bundle-signing key at first start
//! ([`keys`]), then serves the agent and admin API ([`server`]) defined in
//! `epm-api`, and the approvers' web console ([`console`]) on the same
//! listener. The same binary is the admin CLI ([`client`]). `docs/api.md`
//! is the API's guide, `docs/console.md` the console's.

pub mod client;
pub mod console;
pub mod keys;
pub mod limits;
pub mod server;
pub mod webhooks;

// The database, who may change what, and the policy merge: their own
// crate, re-exported under the paths the server has always used.
pub use epm_platform_db::{db, merge, roles};

use std::path::Path;

/// Installs rustls's ring provider for this process (once; later calls are
/// no-ops).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS configuration from a PEM certificate chain and key.
pub async fn tls_config(
    cert: &Path,
    key: &Path,
) -> Result<axum_server::tls_rustls::RustlsConfig, String> {
    install_crypto_provider();
    axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .map_err(|e| {
            format!(
                "cannot use the certificate {} with the key {}: {e}",
                cert.display(),
                key.display()
            )
        })
}
