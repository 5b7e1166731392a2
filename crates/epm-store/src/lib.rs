//! The EPM agent's SQLite store.
//!
//! # Who writes, who reads
//!
//! One process writes this database: `epmd`, as root. Inside it, one `Store`
//! value owns the connection (rusqlite's `Connection` is `Send`, not `Sync`);
//! the daemon keeps it behind a mutex and every write is a short
//! transaction. Nothing else opens the file: `epmctl` and the helpers ask the
//! daemon over IPC, so there is never a second writer and the file's mode is
//! 0600.
//!
//! # Schema (version 1)
//!
//! - `meta(key, value)`: small facts, e.g. the last recovery from a corrupt file.
//! - `policy(slot, document, version, etag, signature, source, fetched_at)`:
//!   slot `active` is enforced; `last_good` is the one before it.
//! - `grants`: permission for one user to run one binary (by SHA-256 or
//!   CDHash, never by path) inside a window, `uses_left` times.
//! - `requests`: approval requests and their state.
//! - `admin_sessions`: time-boxed admin group membership and its revocation.
//! - `audit_outbox(seq, hash, line, uploaded)`: every audit record, committed
//!   here before it is written to the JSON Lines log; the source of truth for
//!   the chain after a crash, and the queue for upload to the platform.
//! - `counters(name, value)`: running totals (the outbox's byte size).
//!
//! Times are stored as Unix milliseconds and exposed as `jiff::Timestamp`.
//! Durability: WAL with `synchronous = FULL`, so a committed audit batch
//! survives a crash or power loss, not just a killed process.

use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

mod schema;

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
        /// What was being done.
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
}

type Result<T> = std::result::Result<T, StoreError>;

fn query_err(operation: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { operation, source }
}

/// A corrupt database that was moved aside and replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the corrupt file now is.
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

/// What happened while opening the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Set when the file was corrupt and a fresh database replaced it.
    pub recovered_from: Option<Recovery>,
}

/// A cached policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPolicy {
    /// The JSON document, exactly as received.
    pub document: String,
    /// Its `version`.
    pub version: u64,
    /// The platform's ETag, if it came from the platform.
    pub etag: Option<String>,
    /// The platform's signature over the document.
    pub signature: Option<String>,
    /// Where it came from, e.g. `file:/etc/epm/policy.json` or `platform`.
    pub source: String,
    /// When it was fetched or read.
    pub fetched_at: Timestamp,
}

/// How a grant or request names a binary: by content, never by path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// SHA-256 of the file.
    Sha256,
    /// Apple CDHash.
    Cdhash,
}

/// A binary's identity: kind and lowercase hex value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectIdentity {
    /// Which digest.
    pub kind: IdentityKind,
    /// Lowercase hex.
    pub value: String,
}

macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(text: &str) -> std::result::Result<Self, String> {
                match text {
                    $($text => Ok($name::$variant),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($name))),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

text_enum!(
    /// Where a grant came from.
    GrantSource {
        /// The user wrote a justification.
        Justification = "justification",
        /// Approvers approved a request on the platform.
        Approval = "approval",
        /// An administrator's offline code.
        OfflineCode = "offline_code",
    }
);

text_enum!(
    /// The life of an approval request.
    RequestState {
        /// Waiting for approvers.
        Pending = "pending",
        /// Approved; a grant exists.
        Approved = "approved",
        /// Rejected by an approver.
        Denied = "denied",
        /// The window ended before approval.
        Expired = "expired",
        /// Withdrawn by an administrator after approval.
        Revoked = "revoked",
        /// The approved executions were used.
        Used = "used",
        /// Withdrawn by the user.
        Cancelled = "cancelled",
    }
);

impl IdentityKind {
    fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Sha256 => "sha256",
            IdentityKind::Cdhash => "cdhash",
        }
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        match text {
            "sha256" => Ok(IdentityKind::Sha256),
            "cdhash" => Ok(IdentityKind::Cdhash),
            other => Err(format!("unknown identity kind {other:?}")),
        }
    }
}

/// A grant to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewGrant {
    /// The user it is for.
    pub uid: u32,
    /// That user's name, for display.
    pub user: String,
    /// The binary it allows.
    pub identity: SubjectIdentity,
    /// The rule that asked for it.
    pub rule_id: String,
    /// Valid from.
    pub not_before: Timestamp,
    /// Valid until.
    pub not_after: Timestamp,
    /// How many executions it allows.
    pub uses: u32,
    /// Where it came from.
    pub source: GrantSource,
    /// The request it answers, for approvals.
    pub request_id: Option<String>,
    /// The user's justification.
    pub justification: Option<String>,
}

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Row id.
    pub id: i64,
    /// Everything it was created with; `uses` is the count left.
    pub grant: NewGrant,
    /// When it was stored.
    pub created_at: Timestamp,
}

/// An approval request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request id.
    pub id: String,
    /// Who asked.
    pub uid: u32,
    /// Their name.
    pub user: String,
    /// The rule that requires approval.
    pub rule_id: String,
    /// The binary.
    pub identity: SubjectIdentity,
    /// Its path when the request was made (for display only).
    pub path: String,
    /// Why the user needs it.
    pub justification: String,
    /// Window start.
    pub window_start: Timestamp,
    /// Window end.
    pub window_end: Timestamp,
    /// Current state.
    pub state: RequestState,
    /// Why the state changed (e.g. the approver's reason for a rejection).
    pub state_reason: Option<String>,
    /// The platform's id once submitted.
    pub platform_id: Option<String>,
    /// Created.
    pub created_at: Timestamp,
    /// Last changed.
    pub updated_at: Timestamp,
}

/// A time-boxed admin session to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAdminSession {
    /// The user.
    pub uid: u32,
    /// Their name.
    pub user: String,
    /// The group they were added to.
    pub group: String,
    /// Already a member before: never removed at the end.
    pub was_member_before: bool,
    /// The user's justification.
    pub reason: Option<String>,
    /// Start.
    pub started_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
}

/// A stored admin session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSession {
    /// Row id.
    pub id: i64,
    /// What it was created with.
    pub session: NewAdminSession,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Timestamp>,
    /// Why it was revoked (expiry, ended by user, clock jump, …).
    pub revoke_reason: Option<String>,
}

/// One sealed audit record in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Chain sequence number.
    pub seq: u64,
    /// Chain hash.
    pub hash: String,
    /// The exact JSON line.
    pub line: String,
}

/// The outbox's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Records held.
    pub records: u64,
    /// Records not yet uploaded.
    pub pending: u64,
    /// Bytes of record text held.
    pub bytes: u64,
}

/// What pruning the outbox dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// Records removed in all.
    pub records: u64,
    /// Of those, records never uploaded: lost to the platform.
    pub not_uploaded: u64,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

fn millis(t: Timestamp) -> i64 {
    t.as_millisecond()
}

fn from_millis(operation: &'static str, ms: i64) -> Result<Timestamp> {
    Timestamp::from_millisecond(ms).map_err(|e| StoreError::Decode {
        operation,
        message: e.to_string(),
    })
}

fn decode<T>(operation: &'static str, r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(|message| StoreError::Decode { operation, message })
}

/// Whether an error means the file itself is damaged (as opposed to, say,
/// a permission problem, which moving the file aside would not fix).
fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(
        error.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

enum OpenFailure {
    Corrupt(String),
    Fatal(StoreError),
}

impl Store {
    /// Opens (creating if needed) the store at `path`. A corrupt file is moved
    /// aside to `<path>.corrupt-<UTC time>` with its `-wal` and `-shm`
    /// files, a fresh database takes its place, and the report says so.
    pub fn open(path: &Path) -> Result<(Store, OpenReport)> {
        prepare_file(path)?;
        match Self::try_open(path) {
            Ok(store) => Ok((store, OpenReport::default())),
            Err(OpenFailure::Fatal(error)) => Err(error),
            Err(OpenFailure::Corrupt(reason)) => {
                let moved_to = move_aside(path)?;
                tracing::error!(path = %path.display(), moved_to = %moved_to.display(), %reason,
                    "store was corrupt; moved aside and starting with a fresh one");
                prepare_file(path)?;
                let mut store = match Self::try_open(path) {
                    Ok(store) => store,
                    Err(OpenFailure::Fatal(error)) => return Err(error),
                    Err(OpenFailure::Corrupt(reason)) => {
                        return Err(StoreError::Io {
                            path: path.to_owned(),
                            what: "fresh database is corrupt too",
                            source: std::io::Error::other(reason),
                        });
                    }
                };
                let recovery = Recovery { moved_to, reason };
                store.set_meta(
                    "recovered_from",
                    &format!(
                        "{} at {}: {}",
                        recovery.moved_to.display(),
                        Timestamp::now(),
                        recovery.reason
                    ),
                )?;
                Ok((
                    store,
                    OpenReport {
                        recovered_from: Some(recovery),
                    },
                ))
            }
        }
    }

    fn try_open(path: &Path) -> std::result::Result<Store, OpenFailure> {
        let classify = |source: rusqlite::Error| {
            if is_corruption(&source) {
                OpenFailure::Corrupt(source.to_string())
            } else {
                OpenFailure::Fatal(StoreError::Open {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let conn = Connection::open(path).map_err(classify)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(classify)?;
        // The first statement reads the header: "file is not a database" shows here.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(classify)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(classify)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(classify)?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(classify)?;
        if check != "ok" {
            return Err(OpenFailure::Corrupt(format!("quick_check: {check}")));
        }
        let mut store = Store {
            conn,
            path: path.to_owned(),
        };
        match schema::migrate(&mut store.conn) {
            Ok(()) => Ok(store),
            Err(schema::MigrateError::Newer { found, supported }) => {
                Err(OpenFailure::Fatal(StoreError::NewerSchema {
                    path: path.to_owned(),
                    found,
                    supported,
                }))
            }
            Err(schema::MigrateError::Sql(source)) => Err(classify(source)),
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // ---- meta ---------------------------------------------------------------

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

    // ---- policy ---------------------------------------------------------------

    /// Stores a new active policy; the previous active one becomes last-good.
    pub fn save_active_policy(&mut self, policy: &StoredPolicy) -> Result<()> {
        let tx = self.conn.transaction().map_err(query_err("save policy"))?;
        tx.execute("DELETE FROM policy WHERE slot = 'last_good'", [])
            .map_err(query_err("save policy"))?;
        tx.execute(
            "UPDATE policy SET slot = 'last_good' WHERE slot = 'active'",
            [],
        )
        .map_err(query_err("save policy"))?;
        tx.execute(
            "INSERT INTO policy (slot, document, version, etag, signature, source, fetched_at)
             VALUES ('active', ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                policy.document,
                i64::try_from(policy.version).unwrap_or(i64::MAX),
                policy.etag,
                policy.signature,
                policy.source,
                millis(policy.fetched_at)
            ],
        )
        .map_err(query_err("save policy"))?;
        tx.commit().map_err(query_err("save policy"))
    }

    /// The policy in force.
    pub fn active_policy(&self) -> Result<Option<StoredPolicy>> {
        self.policy_in("active")
    }

    /// The policy before the active one.
    pub fn last_good_policy(&self) -> Result<Option<StoredPolicy>> {
        self.policy_in("last_good")
    }

    fn policy_in(&self, slot: &str) -> Result<Option<StoredPolicy>> {
        const OP: &str = "read policy";
        let row = self
            .conn
            .query_row(
                "SELECT document, version, etag, signature, source, fetched_at
                 FROM policy WHERE slot = ?1",
                [slot],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(query_err(OP))?;
        row.map(|(document, version, etag, signature, source, fetched)| {
            Ok(StoredPolicy {
                document,
                version: u64::try_from(version).unwrap_or(0),
                etag,
                signature,
                source,
                fetched_at: from_millis(OP, fetched)?,
            })
        })
        .transpose()
    }

    // ---- grants -----------------------------------------------------------------

    /// Stores a grant and returns its id.
    pub fn insert_grant(&mut self, grant: &NewGrant) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO grants (uid, user, identity_kind, identity, rule_id, not_before,
                    not_after, uses_left, source, request_id, justification, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    grant.uid,
                    grant.user,
                    grant.identity.kind.as_str(),
                    grant.identity.value.to_ascii_lowercase(),
                    grant.rule_id,
                    millis(grant.not_before),
                    millis(grant.not_after),
                    grant.uses,
                    grant.source.as_str(),
                    grant.request_id,
                    grant.justification,
                    millis(Timestamp::now()),
                ],
            )
            .map_err(query_err("insert grant"))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// A user's grants that still have uses left and have not ended at `now`
    /// (including ones whose window has not started yet).
    pub fn grants_for(&self, uid: u32, now: Timestamp) -> Result<Vec<Grant>> {
        self.select_grants(
            "WHERE uid = ?1 AND uses_left > 0 AND not_after > ?2 ORDER BY not_before, id",
            params![uid, millis(now)],
        )
    }

    /// Uses one execution of a grant for this user and binary that is valid
    /// at `now`, atomically; returns the grant as it was before the use.
    pub fn consume_grant(
        &mut self,
        uid: u32,
        identity: &SubjectIdentity,
        now: Timestamp,
    ) -> Result<Option<Grant>> {
        let tx = self
            .conn
            .transaction()
            .map_err(query_err("consume grant"))?;
        let grant = {
            let store = StoreTx(&tx);
            store
                .select_grants(
                    "WHERE uid = ?1 AND identity_kind = ?2 AND identity = ?3 AND uses_left > 0
                       AND not_before <= ?4 AND not_after > ?4
                     ORDER BY not_after, id LIMIT 1",
                    params![
                        uid,
                        identity.kind.as_str(),
                        identity.value.to_ascii_lowercase(),
                        millis(now)
                    ],
                )?
                .into_iter()
                .next()
        };
        if let Some(grant) = &grant {
            tx.execute(
                "UPDATE grants SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0",
                [grant.id],
            )
            .map_err(query_err("consume grant"))?;
        }
        tx.commit().map_err(query_err("consume grant"))?;
        Ok(grant)
    }

    fn select_grants(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<Grant>> {
        StoreTx(&self.conn).select_grants(filter, args)
    }

    // ---- requests ---------------------------------------------------------------------

    /// Stores a new request.
    pub fn insert_request(&mut self, request: &Request) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO requests (id, uid, user, rule_id, identity_kind, identity, path,
                    justification, window_start, window_end, state, state_reason, platform_id,
                    created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    request.id,
                    request.uid,
                    request.user,
                    request.rule_id,
                    request.identity.kind.as_str(),
                    request.identity.value.to_ascii_lowercase(),
                    request.path,
                    request.justification,
                    millis(request.window_start),
                    millis(request.window_end),
                    request.state.as_str(),
                    request.state_reason,
                    request.platform_id,
                    millis(request.created_at),
                    millis(request.updated_at),
                ],
            )
            .map_err(query_err("insert request"))?;
        Ok(())
    }

    /// One request.
    pub fn request(&self, id: &str) -> Result<Option<Request>> {
        Ok(self
            .select_requests("WHERE id = ?1", params![id])?
            .into_iter()
            .next())
    }

    /// Requests, newest first, optionally only one user's and one state's.
    pub fn requests(&self, uid: Option<u32>, state: Option<RequestState>) -> Result<Vec<Request>> {
        self.select_requests(
            "WHERE (?1 IS NULL OR uid = ?1) AND (?2 IS NULL OR state = ?2)
             ORDER BY created_at DESC, id",
            params![uid, state.map(RequestState::as_str)],
        )
    }

    /// Changes a request's state; false if there is no such request.
    pub fn set_request_state(
        &mut self,
        id: &str,
        state: RequestState,
        reason: Option<&str>,
        now: Timestamp,
    ) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE requests SET state = ?2, state_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, state.as_str(), reason, millis(now)],
            )
            .map_err(query_err("update request"))?;
        Ok(changed > 0)
    }

    fn select_requests(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<Request>> {
        const OP: &str = "read requests";
        let sql = format!(
            "SELECT id, uid, user, rule_id, identity_kind, identity, path, justification,
                window_start, window_end, state, state_reason, platform_id, created_at, updated_at
             FROM requests {filter}"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(query_err(OP))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                    ),
                    (
                        r.get::<_, i64>(8)?,
                        r.get::<_, i64>(9)?,
                        r.get::<_, String>(10)?,
                        r.get::<_, Option<String>>(11)?,
                        r.get::<_, Option<String>>(12)?,
                        r.get::<_, i64>(13)?,
                        r.get::<_, i64>(14)?,
                    ),
                ))
            })
            .map_err(query_err(OP))?;
        let mut out = Vec::new();
        for row in rows {
            let (
                (id, uid, user, rule_id, kind, value, path, justification),
                (start, end, state, state_reason, platform_id, created, updated),
            ) = row.map_err(query_err(OP))?;
            out.push(Request {
                id,
                uid,
                user,
                rule_id,
                identity: SubjectIdentity {
                    kind: decode(OP, IdentityKind::parse(&kind))?,
                    value,
                },
                path,
                justification,
                window_start: from_millis(OP, start)?,
                window_end: from_millis(OP, end)?,
                state: decode(OP, state.parse())?,
                state_reason,
                platform_id,
                created_at: from_millis(OP, created)?,
                updated_at: from_millis(OP, updated)?,
            });
        }
        Ok(out)
    }

    // ---- admin sessions -------------------------------------------------------------

    /// Stores a new admin session (before the user is added to the group,
    /// so that revocation is guaranteed even if the daemon dies right after).
    pub fn insert_admin_session(&mut self, session: &NewAdminSession) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO admin_sessions (uid, user, group_name, was_member_before, reason,
                    started_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    session.uid,
                    session.user,
                    session.group,
                    session.was_member_before,
                    session.reason,
                    millis(session.started_at),
                    millis(session.expires_at),
                ],
            )
            .map_err(query_err("insert admin session"))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Sessions not yet revoked.
    pub fn active_admin_sessions(&self) -> Result<Vec<AdminSession>> {
        self.select_sessions("WHERE revoked_at IS NULL ORDER BY expires_at", params![])
    }

    /// Sessions not yet revoked whose expiry is at or before `now`.
    pub fn expired_admin_sessions(&self, now: Timestamp) -> Result<Vec<AdminSession>> {
        self.select_sessions(
            "WHERE revoked_at IS NULL AND expires_at <= ?1 ORDER BY expires_at",
            params![millis(now)],
        )
    }

    /// Marks a session revoked; false if it was already revoked or unknown.
    pub fn revoke_admin_session(&mut self, id: i64, at: Timestamp, reason: &str) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE admin_sessions SET revoked_at = ?2, revoke_reason = ?3
                 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, millis(at), reason],
            )
            .map_err(query_err("revoke admin session"))?;
        Ok(changed > 0)
    }

    fn select_sessions(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<AdminSession>> {
        const OP: &str = "read admin sessions";
        let sql = format!(
            "SELECT id, uid, user, group_name, was_member_before, reason, started_at, expires_at,
                revoked_at, revoke_reason
             FROM admin_sessions {filter}"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(query_err(OP))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                ))
            })
            .map_err(query_err(OP))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, uid, user, group, was_member_before, reason, started, expires, revoked, why) =
                row.map_err(query_err(OP))?;
            out.push(AdminSession {
                id,
                session: NewAdminSession {
                    uid,
                    user,
                    group,
                    was_member_before,
                    reason,
                    started_at: from_millis(OP, started)?,
                    expires_at: from_millis(OP, expires)?,
                },
                revoked_at: revoked.map(|ms| from_millis(OP, ms)).transpose()?,
                revoke_reason: why,
            });
        }
        Ok(out)
    }

    // ---- audit outbox ---------------------------------------------------------------

    /// Appends sealed records in one transaction: when this returns, the
    /// batch is durable.
    pub fn append_audit(&mut self, records: &[OutboxRecord]) -> Result<()> {
        const OP: &str = "append audit";
        let tx = self.conn.transaction().map_err(query_err(OP))?;
        let mut bytes: i64 = 0;
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO audit_outbox (seq, hash, line) VALUES (?1, ?2, ?3)")
                .map_err(query_err(OP))?;
            for record in records {
                let seq = i64::try_from(record.seq).map_err(|_| StoreError::Decode {
                    operation: OP,
                    message: format!("sequence number {} out of range", record.seq),
                })?;
                stmt.execute(params![seq, record.hash, record.line])
                    .map_err(query_err(OP))?;
                bytes += record.line.len() as i64;
            }
        }
        add_counter(&tx, "outbox_bytes", bytes).map_err(query_err(OP))?;
        tx.commit().map_err(query_err(OP))
    }

    /// The newest record's sequence number and hash: where the chain continues.
    pub fn last_audit(&self) -> Result<Option<(u64, String)>> {
        self.conn
            .query_row(
                "SELECT seq, hash FROM audit_outbox ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(query_err("read last audit record"))
    }

    /// Records after `seq`, oldest first, at most `limit`.
    pub fn audit_since(&self, seq: u64, limit: usize) -> Result<Vec<OutboxRecord>> {
        self.select_outbox(
            "WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![i64::try_from(seq).unwrap_or(i64::MAX), limit as i64],
        )
    }

    /// Records not yet uploaded, oldest first, at most `limit`.
    pub fn pending_upload(&self, limit: usize) -> Result<Vec<OutboxRecord>> {
        self.select_outbox(
            "WHERE uploaded = 0 ORDER BY seq LIMIT ?1",
            params![limit as i64],
        )
    }

    /// Marks every record up to and including `seq` as uploaded.
    pub fn mark_uploaded(&mut self, up_to_seq: u64) -> Result<u64> {
        let changed = self
            .conn
            .execute(
                "UPDATE audit_outbox SET uploaded = 1 WHERE seq <= ?1 AND uploaded = 0",
                [i64::try_from(up_to_seq).unwrap_or(i64::MAX)],
            )
            .map_err(query_err("mark audit uploaded"))?;
        Ok(changed as u64)
    }

    /// The outbox's size.
    pub fn outbox_stats(&self) -> Result<OutboxStats> {
        const OP: &str = "outbox stats";
        let (records, pending): (i64, i64) = self
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(uploaded = 0), 0) FROM audit_outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(query_err(OP))?;
        Ok(OutboxStats {
            records: records as u64,
            pending: pending as u64,
            bytes: read_counter(&self.conn, "outbox_bytes").map_err(query_err(OP))? as u64,
        })
    }

    /// Drops the oldest records until the outbox's text fits `max_bytes`:
    /// uploaded ones first, then the oldest not uploaded. The newest record
    /// always stays: the chain continues from it.
    pub fn prune_audit(&mut self, max_bytes: u64) -> Result<Pruned> {
        const OP: &str = "prune audit";
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let tx = self.conn.transaction().map_err(query_err(OP))?;
        let mut excess = read_counter(&tx, "outbox_bytes").map_err(query_err(OP))? - budget;
        let mut pruned = Pruned::default();
        if excess > 0 {
            let victims: Vec<(i64, i64, bool)> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT seq, length(CAST(line AS BLOB)), uploaded FROM audit_outbox
                         WHERE seq < (SELECT MAX(seq) FROM audit_outbox)
                         ORDER BY uploaded DESC, seq",
                    )
                    .map_err(query_err(OP))?;
                let rows = stmt
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(query_err(OP))?;
                let mut victims = Vec::new();
                for row in rows {
                    if excess <= 0 {
                        break;
                    }
                    let (seq, len, uploaded) = row.map_err(query_err(OP))?;
                    excess -= len;
                    victims.push((seq, len, uploaded));
                }
                victims
            };
            let mut freed = 0;
            {
                let mut delete = tx
                    .prepare_cached("DELETE FROM audit_outbox WHERE seq = ?1")
                    .map_err(query_err(OP))?;
                for (seq, len, uploaded) in &victims {
                    delete.execute([seq]).map_err(query_err(OP))?;
                    freed += len;
                    pruned.records += 1;
                    if !uploaded {
                        pruned.not_uploaded += 1;
                    }
                }
            }
            add_counter(&tx, "outbox_bytes", -freed).map_err(query_err(OP))?;
        }
        tx.commit().map_err(query_err(OP))?;
        Ok(pruned)
    }

    fn select_outbox(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<OutboxRecord>> {
        const OP: &str = "read audit outbox";
        let sql = format!("SELECT seq, hash, line FROM audit_outbox {filter}");
        let mut stmt = self.conn.prepare(&sql).map_err(query_err(OP))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok(OutboxRecord {
                    seq: r.get::<_, i64>(0)? as u64,
                    hash: r.get(1)?,
                    line: r.get(2)?,
                })
            })
            .map_err(query_err(OP))?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(query_err(OP))
    }

    /// Folds the write-ahead log into the database file (at shutdown), so
    /// the next start reads one file.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .map_err(query_err("checkpoint"))
    }
}

/// Shared query code for a connection or an open transaction.
struct StoreTx<'a>(&'a Connection);

impl StoreTx<'_> {
    fn select_grants(&self, filter: &str, args: impl rusqlite::Params) -> Result<Vec<Grant>> {
        const OP: &str = "read grants";
        let sql = format!(
            "SELECT id, uid, user, identity_kind, identity, rule_id, not_before, not_after,
                uses_left, source, request_id, justification, created_at
             FROM grants {filter}"
        );
        let mut stmt = self.0.prepare(&sql).map_err(query_err(OP))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok((
                    (
                        r.get::<_, i64>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ),
                    (
                        r.get::<_, i64>(6)?,
                        r.get::<_, i64>(7)?,
                        r.get::<_, u32>(8)?,
                        r.get::<_, String>(9)?,
                        r.get::<_, Option<String>>(10)?,
                        r.get::<_, Option<String>>(11)?,
                        r.get::<_, i64>(12)?,
                    ),
                ))
            })
            .map_err(query_err(OP))?;
        let mut out = Vec::new();
        for row in rows {
            let (
                (id, uid, user, kind, value, rule_id),
                (not_before, not_after, uses, source, request_id, justification, created),
            ) = row.map_err(query_err(OP))?;
            out.push(Grant {
                id,
                grant: NewGrant {
                    uid,
                    user,
                    identity: SubjectIdentity {
                        kind: decode(OP, IdentityKind::parse(&kind))?,
                        value,
                    },
                    rule_id,
                    not_before: from_millis(OP, not_before)?,
                    not_after: from_millis(OP, not_after)?,
                    uses,
                    source: decode(OP, source.parse())?,
                    request_id,
                    justification,
                },
                created_at: from_millis(OP, created)?,
            });
        }
        Ok(out)
    }
}

fn add_counter(conn: &Connection, name: &str, delta: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO counters (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        params![name, delta],
    )?;
    Ok(())
}

fn read_counter(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

/// Creates the parent directory (0700) and the file (0600) if missing, so
/// that SQLite never creates them with the process umask.
fn prepare_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent).map_err(|source| StoreError::Io {
            path: parent.to_owned(),
            what: "create directory",
            source,
        })?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| StoreError::Io {
                path: parent.to_owned(),
                what: "set directory mode",
                source,
            },
        )?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| StoreError::Io {
            path: path.to_owned(),
            what: "create database file",
            source,
        })?;
    Ok(())
}

/// Renames the database and its -wal/-shm companions to
/// `<name>.corrupt-<UTC time>[-wal|-shm]`.
fn move_aside(path: &Path) -> Result<PathBuf> {
    let stamp = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut target = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{}.corrupt-{stamp}-{n}", path.display()));
        n += 1;
    }
    for suffix in ["", "-wal", "-shm"] {
        let from = PathBuf::from(format!("{}{suffix}", path.display()));
        if from.exists() {
            let to = PathBuf::from(format!("{}{suffix}", target.display()));
            std::fs::rename(&from, &to).map_err(|source| StoreError::Io {
                path: from.clone(),
                what: "move corrupt database aside",
                source,
            })?;
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests;
