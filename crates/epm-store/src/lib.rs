//! The EPM agent's SQLite store: the policy cache, grants, approval
//! requests, admin sessions, and the audit outbox.
//!
//! # One writer
//!
//! One process opens this database: `epmd`, as root. Inside it there is one
//! [`Store`], and it owns the only connection. rusqlite's `Connection` is
//! `Send` but not `Sync`, so `Store` is too: exactly one thread uses it at a
//! time, and every write takes `&mut self`. The intended shape is a store
//! thread that owns the `Store` while the other threads send it work over a
//! channel. Today `epmd` shares it as `Arc<Mutex<Store>>`, which serializes
//! access just as well; the difference is that a caller waiting on the lock
//! also waits on the holder's `fsync`. Every write is one short transaction.
//!
//! Nothing else opens the file. `epmctl` and the user helpers ask the daemon
//! over IPC, so the file is mode 0600 in a 0700 directory. WAL mode lets an
//! operator inspect a live database with `sqlite3` without blocking the
//! daemon; the busy timeout covers the moment such a reader checkpoints.
//!
//! # Who reads and writes what
//!
//! | Table | Written by | Read by |
//! |---|---|---|
//! | `policy` | the policy source, on each new valid policy | the policy source at start, when the policy file is missing or invalid |
//! | `grants` | justification, approval and offline-code handling; the decision path consumes uses | the decision path ([`Store::consume_grant`]); IPC listings |
//! | `requests` | the request flow and platform sync | IPC listings; the expiry sweep |
//! | `admin_sessions` | the admin-session flow; the expiry sweep | the expiry sweep, at start and on a timer |
//! | `audit_outbox` | the audit thread, before each batch goes to the log; pruning | the audit log reconciliation at start; the uploader |
//! | `offline_challenges` | `epmctl request --offline` (a challenge); a valid code (marks it used) | the code check |
//! | `meta`, `counters` | recovery (here); the daemon for small facts | status |
//!
//! # Schema (version 3)
//!
//! Times are INTEGER Unix **milliseconds** (UTC): the audit records carry
//! millisecond times, and a grant's window compared at second granularity
//! would end up to a second late. The API exposes [`jiff::Timestamp`].
//! Identities are content digests in lowercase hex, never paths.
//!
//! ```text
//! meta(key TEXT PK, value TEXT)
//! counters(name TEXT PK, value INTEGER)            -- outbox_bytes: Σ length(line)
//! policy(slot TEXT PK in ('active','last_good'), document TEXT, version INTEGER,
//!        etag TEXT?, signature TEXT?, source TEXT, fetched_at INTEGER,
//!        envelope TEXT?)                           -- the platform's signed envelope
//! grants(id INTEGER PK, uid, user, identity_kind in ('sha256','cdhash'), identity,
//!        rule_id, not_before, not_after, uses_left >= 0,
//!        source in ('justification','approval','offline_code'),
//!        request_id TEXT?, justification TEXT?, created_at, path TEXT?)
//!        INDEX (uid, identity_kind, identity)
//! requests(id TEXT PK, uid, user, rule_id, identity_kind, identity, path,
//!          justification, window_start, window_end, state, state_reason TEXT?,
//!          platform_id TEXT?, created_at, updated_at)
//!          INDEX (uid, state)
//! admin_sessions(id INTEGER PK, uid, user, group_name, was_member_before,
//!                reason TEXT?, started_at, expires_at, revoked_at?, revoke_reason?)
//!                INDEX (revoked_at, expires_at)
//! audit_outbox(seq INTEGER PK, hash TEXT, line TEXT, uploaded 0|1)
//!              INDEX (uploaded, seq)
//! offline_challenges(nonce TEXT PK, uid, challenge TEXT, not_after,
//!                    created_at, used_at?)  INDEX (uid, used_at)
//! ```
//!
//! A grant window is `[not_before, not_after)`. A grant with `uses_left = 0`
//! is used up, or was ended, and never matches again; its row stays as a
//! record. The outbox's `seq` and `hash` come from the audit chain, not from
//! SQLite.
//!
//! # Migrations
//!
//! `PRAGMA user_version` is the schema version. Migrations are an ordered,
//! append-only list; each runs in its own transaction with its version bump.
//! A database whose version is newer than this code knows is refused with
//! [`StoreError::NewerSchema`] and left untouched: a downgrade could lose
//! what the newer schema holds.
//!
//! # Durability
//!
//! WAL with `synchronous = FULL`: every commit syncs the log, so a commit
//! survives a power loss as well as a killed process. `NORMAL` would be
//! enough for a `SIGKILL` but may lose the last commits on power loss, and
//! here that is not harmless: the audit chain is continued from the outbox,
//! an admin session row that vanished would leave a user in the admin group
//! for good, and a lost grant use could be spent twice. The write rate is
//! low, and the audit thread commits in batches, so the cost is one sync
//! per batch.
//!
//! # Corruption
//!
//! [`Store::open`] runs `PRAGMA quick_check`. A file that is not a database,
//! or that SQLite or the check finds damaged, is moved aside with its `-wal`
//! and `-shm` to `<name>.corrupt-<UTC time>`, a fresh database is created,
//! and [`OpenReport::recovered_from`] says so (the daemon audits it); the
//! fresh database's `meta` holds the same under [`META_RECOVERED_FROM`].
//! Other failures (permissions, a path under a regular file, a newer schema)
//! are errors naming the path, and nothing is moved.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

mod admin;
mod error;
mod grants;
mod offline;
mod open;
mod outbox;
mod policy;
mod requests;
mod schema;
mod sql;

pub use admin::{AdminSession, NewAdminSession};
pub use error::{StoreError, UnknownName};
pub use grants::{Grant, GrantSource, IdentityKind, NewGrant, SubjectIdentity};
pub use offline::OfflineChallengeRecord;
pub use open::{META_RECOVERED_FROM, OpenReport, Recovery};
pub use outbox::{OutboxRecord, OutboxStats, Pruned};
pub use policy::StoredPolicy;
pub use requests::{Request, RequestState};

use error::{Result, query_err};

/// The schema version this code creates and understands.
pub const SCHEMA_VERSION: i64 = schema::CURRENT;

/// The store: one SQLite connection, owned by one thread at a time.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets a meta value.
    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(query_err("set meta"))?;
        Ok(())
    }

    /// Reads a meta value.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(query_err("read meta"))
    }

    /// Folds the write-ahead log into the database file (at shutdown), so
    /// the next start reads one file.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(query_err("checkpoint"))
    }
}

#[cfg(test)]
mod tests;
