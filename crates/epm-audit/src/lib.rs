//! EPM's audit trail: the record schema, the hash chain, the JSON Lines log
//! with rotation, and the readers (`tail`, follow, verify).
//!
//! A record is one JSON object per line. Each carries the hash of the record
//! before it (`prev_hash`) and its own `hash`, computed over the record's
//! canonical JSON without `hash`. Editing, deleting, inserting or reordering
//! a line breaks the chain at that point, and [`verify_dir`] names the first
//! record that breaks it.
//!
//! ```
//! use epm_audit::{AuditEvent, Chain, EventKind, verify_lines};
//!
//! let mut chain = Chain::genesis();
//! let first = chain.seal(AuditEvent::new(EventKind::DAEMON_STARTED), jiff::Timestamp::UNIX_EPOCH);
//! let second = chain.seal(AuditEvent::new(EventKind::DAEMON_STOPPED), jiff::Timestamp::UNIX_EPOCH);
//! assert_eq!(second.seq, 2);
//! let report = verify_lines([first.line.as_str(), second.line.as_str()]).unwrap();
//! assert_eq!(report.records, 2);
//!
//! let edited = first.line.replace("daemon_started", "daemon_stopped");
//! let broken = verify_lines([edited.as_str(), second.line.as_str()]).unwrap_err();
//! assert_eq!(broken.seq, Some(1));
//! ```

mod chain;
mod log;
mod record;
mod verify;

pub use chain::{Chain, GENESIS_HASH, SealedRecord, hash_line};
pub use log::{
    AuditLog, Follower, LIVE_FILE, LogOptions, OpenReport, log_files, read_records, tail,
};
pub use record::{AuditEvent, AuditRecord, EventKind};
pub use verify::{
    BreakKind, ChainBreak, VerifyError, VerifyReport, verify_dir, verify_files, verify_lines,
};

#[cfg(test)]
mod tests;
