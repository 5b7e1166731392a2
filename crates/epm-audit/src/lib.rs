//! EPM's audit trail: the record schema, the hash chain, the JSON Lines log
//! with rotation, and the readers (`tail`, follow, verify). No async, no
//! daemon needed to read or verify.
//!
//! # Line format
//!
//! A record is one JSON object per line, UTF-8, ending in `\n`. Every field
//! of [`AuditRecord`] is always present (`null` when it does not apply):
//! `seq`, `time`, `event`, `decision`, `action`, `rule_id`, `reason`,
//! `mode`, `pid`, `ppid`, `uid`, `user`, `path`, `sha256`, `device_id`,
//! `policy_version`, `details`, `prev_hash`, `hash`. Newer versions may add
//! fields; readers ignore those they do not know.
//!
//! ```text
//! {"action":"deny","decision":"deny","details":null,"device_id":"lab-7","event":"exec","hash":"…","mode":"enforce","path":"/usr/bin/nc","pid":4242,"policy_version":7,"ppid":4200,"prev_hash":"…","reason":"rule \"block-nc\" matched","rule_id":"block-nc","seq":3,"sha256":"…","time":"2027-01-15T08:00:00Z","uid":1000,"user":"alice"}
//! ```
//!
//! # Hash chain
//!
//! The line is the record's *canonical JSON*: compact (no whitespace),
//! object keys sorted by their UTF-8 bytes at every level, strings escaped
//! as serde_json does (`\"`, `\\`, `\b \t \n \f \r`, other control
//! characters as `\u00xx`, everything else raw), integers only.
//! `hash` = lowercase hex SHA-256 of the canonical JSON of the record
//! without its `hash` key; `prev_hash` is the previous record's `hash`, or
//! [`GENESIS_HASH`] (64 zeros) for record 1. Verification parses each line
//! as plain JSON, so it needs no schema: records with fields added later
//! keep verifying. It also requires each line to *be* the canonical text
//! of what it parses to, so no two different lines verify as one record.
//!
//! ```
//! use epm_audit::{AuditEvent, Chain, Decision, Mode, verify_lines};
//!
//! let mut chain = Chain::genesis();
//! let first = chain.seal(AuditEvent::daemon_started(), jiff::Timestamp::UNIX_EPOCH);
//! let exec = AuditEvent::exec(Decision::Deny, Mode::Enforce, "/usr/bin/nc");
//! let second = chain.seal(exec, jiff::Timestamp::UNIX_EPOCH);
//! assert_eq!(second.seq, 2);
//! let report = verify_lines([first.line.as_str(), second.line.as_str()]).unwrap();
//! assert_eq!(report.records, 2);
//!
//! let edited = first.line.replace("daemon_started", "daemon_stopped");
//! let broken = verify_lines([edited.as_str(), second.line.as_str()]).unwrap_err();
//! assert_eq!(broken.seq, Some(1));
//! ```
//!
//! # Files
//!
//! [`AuditLog`] writes `audit.jsonl` in a directory and rotates it to
//! `audit-<seq of its first record, 20 digits>.jsonl` before it would grow
//! past [`LogOptions::max_file_bytes`] (splitting a batch if need be),
//! keeping the newest [`LogOptions::keep_files`] rotated files and no more
//! than [`LogOptions::max_total_bytes`] in all. [`read_records`], [`tail`],
//! [`Follower`] and [`verify_dir`] read those files with no writer running;
//! [`verify_dir`] also while one writes and rotates.
//!
//! # Size
//!
//! [`AuditEvent::bound`] cuts any string or `details` value that users
//! could make large, naming each cut with the full value's length and
//! SHA-256, so a record stays within tens of KiB whatever its input.

mod bound;
mod chain;
mod log;
mod read;
mod record;
mod verify;

pub use bound::{MAX_STRING_BYTES, MAX_VALUE_BYTES, MAX_VALUE_ITEMS};
pub use chain::{Chain, GENESIS_HASH, SealedRecord, hash_line};
pub use log::{AuditLog, LIVE_FILE, LogOptions, OpenReport, Retention, log_files};
pub use read::{
    Follower, LogEntry, MAX_LINE_BYTES, ParseError, Records, read_files, read_records, tail,
};
pub use record::{Action, AuditEvent, AuditRecord, Decision, EventKind, Mode};
pub use verify::{
    BreakKind, ChainBreak, VerifyError, VerifyReport, verify_dir, verify_files, verify_lines,
};

#[cfg(test)]
mod tests;
