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
