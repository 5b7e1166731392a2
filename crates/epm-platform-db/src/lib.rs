//! The EPM platform's database: what the management server keeps and the
//! rules for changing it, apart from HTTP.
//!
//! [`db::Db`] is the one interface the server and the console use, over
//! SQLite (the embedded default, one file) or PostgreSQL (several platform
//! instances on one database), chosen at start ([`db::Database`]). The
//! statements are written once and adapted to each database by `db::sql`;
//! each database has its own migrations. [`roles`] says who may do what, and
//! [`merge`] builds a device's policy from the documents scoped to it, so a
//! check is made where the data is changed, in the same transaction.
//!
//! What it deliberately does not know: HTTP, TLS, sessions of the web
//! console, the signing key (a caller signs; see `Db::approve`).

pub mod db;
pub mod merge;
pub mod roles;

/// An error and its causes on one line, outermost first, each cause said
/// once: a connection's "error performing TLS handshake" says why only in
/// its sources (the certificate's issuer unknown, the name not matching),
/// which is where rustls, hyper and the database pool say what went wrong.
/// The platform's HTTP client words its errors with it too.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
