//! The store's errors.

use std::path::PathBuf;

use rusqlite::ErrorCode;

use crate::RequestState;

/// Errors from the store. Each names the operation and, where it matters, the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
    /// A file-system operation around the database failed.
    #[error("store {path}: {what}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The database was written by a newer EPM; it is left untouched.
    #[error(
        "store {path} has schema version {found}, newer than this epmd understands ({supported}); upgrade epmd or move the file aside"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this code knows.
        supported: i64,
    },
    /// A query failed.
    #[error("store: {operation}: {source}")]
    Query {
        /// What was being done, naming the table.
        operation: &'static str,
        /// Why it failed.
        source: rusqlite::Error,
    },
    /// A stored value could not be decoded.
    #[error("store: {operation}: bad stored value: {message}")]
    Decode {
        /// What was being done.
        operation: &'static str,
        /// What was wrong.
        message: String,
    },
    /// A value given to the store was refused before it was written.
    #[error("store: {operation}: {message}")]
    Invalid {
        /// What was being done.
        operation: &'static str,
        /// What was wrong with the value.
        message: String,
    },
    /// A request cannot move from its current state to the one asked for.
    #[error("store: request {id} cannot go from {from} to {to}")]
    Transition {
        /// The request.
        id: String,
        /// Its state, unchanged.
        from: RequestState,
        /// The state refused.
        to: RequestState,
    },
}

impl StoreError {
    /// Whether SQLite found the file damaged. A running daemon cannot repair
    /// that; the next [`Store::open`](crate::Store::open) moves the file
    /// aside if its check finds the damage too.
    pub fn is_corruption(&self) -> bool {
        match self {
            StoreError::Open { source, .. } | StoreError::Query { source, .. } => {
                is_corruption(source)
            }
            _ => false,
        }
    }
}

/// Whether an error means the file itself is damaged (as opposed to, say,
/// a permission problem, which moving the file aside would not fix).
pub(crate) fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// A stored or given name that is not one of an enum's names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {text:?}")]
pub struct UnknownName {
    /// Which enum.
    pub what: &'static str,
    /// The text that matched none of its names.
    pub text: String,
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn query_err(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { operation, source }
}

pub(crate) fn invalid(operation: &'static str, message: String) -> StoreError {
    StoreError::Invalid { operation, message }
}
