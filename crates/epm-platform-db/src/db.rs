//! The platform's SQLite database: admins, enrollment tokens, agents,
//! policy documents, bundles, the fleet's audit, requests and the
//! activity log. Every write that must be all-or-nothing is one
//! transaction; secrets are stored as SHA-256 only.

use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as BASE64URL};
use epm_api::SignedEnvelope;
use epm_api::admin::{
    Activity, AdminCreated, AdminInfo, AdminRequest, AdminRole, Approval, CreateAdmin, DeviceInfo,
    EnrollTokenInfo, PolicyEntry, PolicyScope, RefusedCalls, UpdateAdmin,
};
use epm_api::agent::{
    AgentCredentials, EnrollRequest, LocalUser, RequestState, RequestStatus, RequestSubject, Window,
};
use jiff::Timestamp;
use rand::RngCore;
use rusqlite::Connection;
use sha2::{Digest, Sha256};
use sql::{Conn, OptionalExtension, Row, params};

mod console;
mod pg_tls;
mod postgres;
pub mod sql;

pub use console::{
    AuditFilter, AuditRow, Credentials, Delivery, MAX_DELIVERY_ATTEMPTS, RequestFilter, SessionEnd,
    SessionRow, WebhookInfo,
};

use crate::merge::ScopedDocument;
pub use crate::roles::Admin;
use crate::roles::{Capability, check_role_and_level};

/// A database failure, or a refusal the API turns into a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database failed (SQLite or PostgreSQL).
    #[error("database: {0}")]
    Sql(#[from] sql::SqlError),
    /// Not found.
    #[error("{0}")]
    NotFound(String),
    /// The operation conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// Credentials refused.
    #[error("{0}")]
    Unauthorized(String),
    /// The input is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Allowed for someone else.
    #[error("{0}")]
    Forbidden(String),
}

type Result<T> = std::result::Result<T, DbError>;

/// Who a bearer admin token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOwner {
    /// An enabled admin.
    Admin(Admin),
    /// A disabled admin, by name: refused.
    Disabled(String),
}

/// Who changes admins: an owner over the API, or someone with the data
/// directory (the offline CLI), who could edit the database anyway.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    /// `epm-platform admin create --data DIR` with no server involved.
    Local,
    /// An admin over the API; must be an owner.
    Admin(&'a Admin),
}

/// How an enrollment went, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrollment {
    /// A device id seen for the first time.
    New,
    /// An enrolled device that showed its current credentials.
    Renewed,
    /// A device an admin reset (`devices reset`), taken by this enrollment
    /// as a new agent (a new agent id and audit sequence; the old agent's
    /// audit stays under the device).
    AfterReset {
        /// The admin who reset it.
        by: String,
    },
}

/// One hour's count of refused calls from one source, as the activity
/// log's aggregator flushes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefusedKey {
    /// Start of the hour.
    pub hour: String,
    /// Client address (IPv6 by /64).
    pub source: String,
    /// `anonymous`, `disabled:NAME`, or who went over a rate.
    pub who: String,
    /// `METHOD path`, cut.
    pub call: String,
    /// HTTP status.
    pub status: u16,
}

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Agent id.
    pub agent_id: String,
    /// Device id.
    pub device_id: String,
    /// Users it reported.
    pub users: Vec<LocalUser>,
}

/// A stored bundle.
#[derive(Debug, Clone)]
pub struct BundleRow {
    /// Version.
    pub version: u64,
    /// Content hash of the merged policy.
    pub content_sha256: Vec<u8>,
    /// Policy revision it was built at.
    pub revision: u64,
    /// Hash of the users it was built for.
    pub users_sha256: Vec<u8>,
    /// The signed envelope, JSON.
    pub envelope: String,
    /// The public key the envelope is signed with, as its `key` field has
    /// it: stored in its own column so that a check-in can tell whether
    /// the bundle is current without reading (and decompressing) the
    /// envelope. `None` on rows written before the column existed.
    pub signer: Option<String>,
}

/// What a check-in needs to know of a stored bundle: everything but the
/// envelope, which can be megabytes (PostgreSQL keeps it compressed out
/// of line, so reading it costs a decompression each time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleHead {
    /// Version.
    pub version: u64,
    /// Content hash of the merged policy.
    pub content_sha256: Vec<u8>,
    /// Policy revision it was built at.
    pub revision: u64,
    /// Hash of the users it was built for.
    pub users_sha256: Vec<u8>,
    /// The key the envelope is signed with; `None` when unknown without
    /// reading the envelope: a row written before the column existed, or
    /// rewritten since by an instance that does not know the column (the
    /// column is trusted only for the version it was written with).
    pub signer: Option<String>,
}

/// Where the platform keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// One SQLite file: one instance.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL URL: any number of instances.
    Postgres(String),
}

impl Database {
    /// `sqlite://PATH`, a bare path, or `postgres://…`/`postgresql://…`.
    pub fn parse(url: &str) -> Result<Database> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(DbError::Invalid(
                    "sqlite:// needs a path: sqlite:///var/lib/epm-platform/platform.db".into(),
                ));
            }
            Ok(Database::Sqlite(path.into()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Database::Postgres(url.to_owned()))
        } else if url.contains("://") {
            Err(DbError::Invalid(format!(
                "database {:?}: use sqlite://PATH or postgres://USER@HOST/DATABASE",
                sql::redact(url)
            )))
        } else {
            Ok(Database::Sqlite(url.into()))
        }
    }
}

/// SQLite's own errors while migrating, before the connection is shared.
enum MigrateError {
    Sqlite(rusqlite::Error),
    Db(DbError),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}

#[derive(Debug)]
enum Store {
    Sqlite(Mutex<Connection>),
    Postgres(sql::Pg),
}

/// The platform database.
#[derive(Debug)]
pub struct Db {
    store: Store,
    /// The console's address, for the links webhooks carry.
    console_url: Mutex<String>,
    /// Told of request changes on SQLite ([`Db::listen`]); PostgreSQL
    /// tells its listener by `NOTIFY` instead.
    local_listener: LocalListener,
}

/// The [`sql::Listener`] SQLite calls itself.
#[derive(Default)]
struct LocalListener(Mutex<Option<sql::Listener>>);

impl std::fmt::Debug for LocalListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalListener")
    }
}

/// How an approver narrows what they approve: an earlier end of the
/// window, fewer uses. Neither can widen what was asked or what the rule
/// allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// The window ends at this time instead.
    pub end: Option<Timestamp>,
    /// At most this many executions.
    pub uses: Option<u32>,
}

/// The first schema. Never edited: every later change is a migration in
/// [`MIGRATIONS`], so an existing database and a new one end up the same.
const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS admins (
    name TEXT PRIMARY KEY,
    token_sha256 BLOB NOT NULL UNIQUE,
    approver_level INTEGER,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS enroll_tokens (
    token_sha256 BLOB PRIMARY KEY,
    uses_left INTEGER NOT NULL,
    expires_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE,
    secret_sha256 BLOB NOT NULL UNIQUE,
    offline_key BLOB NOT NULL,
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    enrolled_at TEXT NOT NULL,
    last_checkin TEXT,
    policy_version INTEGER,
    outbox_pending INTEGER NOT NULL DEFAULT 0,
    audit_floor INTEGER NOT NULL DEFAULT 0,
    audit_acked INTEGER NOT NULL DEFAULT 0,
    users TEXT NOT NULL DEFAULT '[]',
    counters TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS policies (
    scope TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    document TEXT NOT NULL,
    rules INTEGER NOT NULL,
    pushed_by TEXT NOT NULL,
    pushed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bundles (
    device_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    content_sha256 BLOB NOT NULL,
    revision INTEGER NOT NULL,
    users_sha256 BLOB NOT NULL,
    envelope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    decision TEXT,
    record TEXT NOT NULL,
    UNIQUE (agent_id, seq)
);
CREATE INDEX IF NOT EXISTS audit_device ON audit (device_id, cursor);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    local_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    user TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    justification TEXT NOT NULL,
    window_start TEXT NOT NULL,
    window_end TEXT NOT NULL,
    state TEXT NOT NULL,
    levels TEXT NOT NULL,
    current_level INTEGER NOT NULL,
    uses INTEGER NOT NULL,
    reason TEXT,
    decided_by TEXT,
    grant_envelope TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (agent_id, local_id)
);
CREATE INDEX IF NOT EXISTS requests_state ON requests (state);
CREATE TABLE IF NOT EXISTS approvals (
    request_id TEXT NOT NULL,
    admin TEXT NOT NULL,
    level INTEGER NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (request_id, admin)
);
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    admin TEXT NOT NULL,
    call TEXT NOT NULL,
    status INTEGER NOT NULL,
    detail TEXT
);
"#;

/// Schema changes after [`SCHEMA`], in order; `PRAGMA user_version` is how
/// many have run. Each runs in one transaction with the version bump.
const MIGRATIONS: &[&str] = &[
    // 1: roles, revocation and device identity (issue 21). Existing admins
    // get the least role that keeps their work: the first admin made is
    // the owner, admins with an approver level approve, the others manage
    // policies and the fleet. Levels outside 1..=16 (only reachable through
    // the old unchecked API) are dropped, and their approvers become auditors.
    r#"
    ALTER TABLE admins ADD COLUMN role TEXT;
    ALTER TABLE admins ADD COLUMN endpoint_users TEXT;
    ALTER TABLE admins ADD COLUMN disabled_by TEXT;
    UPDATE admins SET endpoint_users = json_array(name);
    UPDATE admins SET role = CASE
        WHEN name = (SELECT name FROM admins ORDER BY created_at, name LIMIT 1) THEN 'owner'
        WHEN approver_level IS NOT NULL THEN 'approver'
        ELSE 'policy_admin' END;
    UPDATE admins SET approver_level = NULL,
        role = CASE role WHEN 'approver' THEN 'auditor' ELSE role END
        WHERE approver_level < 1 OR approver_level > 16;
    ALTER TABLE enroll_tokens ADD COLUMN id TEXT;
    ALTER TABLE enroll_tokens ADD COLUMN revoked_by TEXT;
    UPDATE enroll_tokens SET id = 'etk_' || lower(hex(randomblob(9)));
    CREATE UNIQUE INDEX enroll_tokens_id ON enroll_tokens (id);
    ALTER TABLE agents ADD COLUMN next_secret_sha256 BLOB;
    ALTER TABLE agents ADD COLUMN reset_by TEXT;
    CREATE INDEX activity_admin ON activity (admin, id);
    CREATE TABLE refused_calls (
        hour TEXT NOT NULL,
        source TEXT NOT NULL,
        who TEXT NOT NULL,
        call TEXT NOT NULL,
        status INTEGER NOT NULL,
        count INTEGER NOT NULL,
        last_at TEXT NOT NULL,
        PRIMARY KEY (hour, source, who, call, status)
    );
    "#,
    // 2: the web console (issue 18): passwords (argon2id PHC strings) and
    // TOTP secrets, sessions (the cookie's SHA-256 only), an approver's
    // narrowing of uses, and the webhooks' outbox.
    r#"
    ALTER TABLE admins ADD COLUMN password_hash TEXT;
    ALTER TABLE admins ADD COLUMN totp_secret TEXT;
    ALTER TABLE admins ADD COLUMN totp_last_step INTEGER;
    CREATE TABLE console_sessions (
        token_sha256 BLOB PRIMARY KEY,
        admin TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        source TEXT NOT NULL,
        time_zone TEXT
    );
    CREATE INDEX console_sessions_admin ON console_sessions (admin, created_at);
    ALTER TABLE requests ADD COLUMN max_uses INTEGER;
    CREATE TABLE webhooks (
        id TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        disabled_by TEXT
    );
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        webhook_id TEXT NOT NULL,
        event TEXT NOT NULL,
        request_id TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_at TEXT NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        created_at TEXT NOT NULL,
        delivered_at TEXT
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at);
    "#,
    // 3: merged policies by the documents they were merged from (issue
    // 19): on PostgreSQL one merge serves every instance.
    r#"
    CREATE TABLE merged_policies (
        documents_sha256 BLOB PRIMARY KEY,
        merged TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    "#,
    // 4: the key each bundle is signed with, beside the envelope, so that
    // a check-in reads a few bytes instead of the envelope (issue 19).
    // `signer_version` is the version the signer was written for: a row
    // rewritten by an older instance (which leaves both columns alone)
    // then reads as unknown rather than as signed by the old key. Existing
    // rows stay NULL: they are read in full once, as before.
    r#"
    ALTER TABLE bundles ADD COLUMN signer TEXT;
    ALTER TABLE bundles ADD COLUMN signer_version INTEGER;
    "#,
];

/// Merged policies kept in the database.
const MAX_MERGED: u64 = 256;

/// Audit records per INSERT statement.
const AUDIT_BATCH: usize = 50;

/// Refused-call rows kept: the oldest go first.
const MAX_REFUSED_ROWS: u64 = 10_000;

/// SHA-256 of a secret, as stored.
pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A random token: `prefix` and 32 random bytes in base64url.
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", BASE64URL.encode(bytes))
}

fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 9];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", BASE64URL.encode(bytes))
}

/// A timestamp as stored where SQL compares it as text: always nine
/// fractional digits, so text order is time order ("…:59Z" would sort after
/// "…:59.5Z").
fn sortable(ts: Timestamp) -> String {
    format!("{ts:.9}")
}

fn ts(row: &Row, index: usize) -> sql::Result<Timestamp> {
    let text: String = row.get(index)?;
    text.parse()
        .map_err(|e: jiff::Error| sql::SqlError::conversion(index, e))
}

fn json_col<T: serde::de::DeserializeOwned>(row: &Row, index: usize) -> sql::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text).map_err(|e| sql::SqlError::conversion(index, e))
}

/// An admin from `name, role, approver_level, endpoint_users, disabled_by,
/// created_at`.
fn admin_info(row: &Row) -> sql::Result<AdminInfo> {
    let role: String = row.get(1)?;
    Ok(AdminInfo {
        name: row.get(0)?,
        role: role
            .parse()
            .map_err(|e: String| sql::SqlError::conversion(1, e))?,
        approver_level: row.get(2)?,
        endpoint_users: json_col(row, 3)?,
        disabled: row.get::<_, Option<String>>(4)?.is_some(),
        created_at: ts(row, 5)?,
    })
}

/// An admin's powers in words, for the activity log.
fn describe_admin(admin: &AdminInfo) -> String {
    format!(
        "role {}, approver level {}, endpoint users [{}]",
        admin.role,
        admin
            .approver_level
            .map_or_else(|| "none".to_owned(), |l| l.to_string()),
        admin.endpoint_users.join(", ")
    )
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // The types stored here serialize infallibly (strings, numbers, vectors).
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

impl Db {
    /// Opens the database `url` names: `sqlite://PATH` (or a bare path)
    /// or `postgres://…` / `postgresql://…`.
    pub fn open_url(url: &str) -> Result<Db> {
        match Database::parse(url)? {
            Database::Sqlite(path) => Db::open(&path),
            Database::Postgres(url) => Db::open_postgres(&url),
        }
    }

    /// Opens (and creates) an SQLite database.
    pub fn open(path: &Path) -> Result<Db> {
        // The database holds every device's offline key: owner only.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| DbError::Invalid(format!("{}: {e}", path.display())))?;
        }
        let sqlite = |e: rusqlite::Error| DbError::Sql(e.into());
        let mut conn = Connection::open(path).map_err(sqlite)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sqlite)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sqlite)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sqlite)?;
        conn.execute_batch(SCHEMA).map_err(sqlite)?;
        Db::migrate(&mut conn).map_err(|e| match e {
            MigrateError::Sqlite(e) => sqlite(e),
            MigrateError::Db(e) => e,
        })?;
        Ok(Db {
            store: Store::Sqlite(Mutex::new(conn)),
            console_url: Mutex::new("https://localhost:8443".into()),
            local_listener: LocalListener::default(),
        })
    }

    /// Connects to a PostgreSQL database and brings its schema up to date
    /// (under an advisory lock: instances starting together migrate once).
    pub fn open_postgres(url: &str) -> Result<Db> {
        let pg = postgres::open(url)?;
        Ok(Db {
            store: Store::Postgres(pg),
            console_url: Mutex::new("https://localhost:8443".into()),
            local_listener: LocalListener::default(),
        })
    }

    /// Calls `changed("audit", "")` whenever any instance sharing this
    /// database stores audit, `changed("requests", AGENT_ID)` whenever a
    /// request of that agent leaves `pending` or `approved` (decided,
    /// expired, revoked), and `changed(channel, "")` for every channel once
    /// the listener (re)connects, since changes may have been missed.
    ///
    /// PostgreSQL: by `LISTEN/NOTIFY`, from every instance. SQLite has one
    /// instance: audit waiters are woken by the server itself; request
    /// changes are reported here, from inside the changing transaction
    /// (see `Db::request_changed`).
    pub fn listen(&self, changed: sql::Listener) {
        match &self.store {
            Store::Postgres(pg) => postgres::listen(pg, changed),
            Store::Sqlite(_) => {
                *self
                    .local_listener
                    .0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(changed);
            }
        }
    }

    /// Tells the agent's long-poll waiters (on every instance) that one of
    /// its requests changed state, as part of `tx`.
    ///
    /// PostgreSQL delivers the `NOTIFY` at commit and drops it at rollback.
    /// SQLite calls the listener now, before the commit: that is safe
    /// because a woken waiter re-reads through the same single connection,
    /// whose lock this transaction holds until it has committed, so the
    /// re-read sees the change (a rolled-back change costs one re-read).
    fn request_changed(&self, tx: &Conn<'_>, id: &str) -> Result<()> {
        let Some(agent_id) = tx
            .query_row("SELECT agent_id FROM requests WHERE id = ?1", [id], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
        else {
            return Ok(());
        };
        if tx.is_postgres() {
            return postgres::notify_with(tx, "epm_requests", &agent_id);
        }
        let listener = self
            .local_listener
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(listener) = listener {
            listener("requests", &agent_id);
        }
        Ok(())
    }

    /// Which database this is, for the log: `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.store {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// The address the console is reached at (`https://host:port`), for
    /// the links in webhook bodies.
    pub fn set_console_url(&self, url: &str) {
        *self.console_url.lock().unwrap_or_else(|p| p.into_inner()) = url.to_owned();
    }

    fn console_url(&self) -> String {
        self.console_url
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Queues `event` of request `id` for every webhook, inside `tx`, and
    /// wakes its agent's long poll when the request left `pending` (or
    /// `approved`: revoked, expired).
    fn notify(&self, tx: &Conn<'_>, event: &str, id: &str) -> Result<()> {
        if event != "created" {
            self.request_changed(tx, id)?;
        }
        let request = Db::request_row(tx, id)?.request;
        console::enqueue_webhooks(tx, &self.console_url(), event, &request)
    }

    fn migrate(conn: &mut Connection) -> std::result::Result<(), MigrateError> {
        let done: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if done > MIGRATIONS.len() {
            return Err(MigrateError::Db(DbError::Invalid(format!(
                "the database is at schema version {done}, newer than this epm-platform knows ({}); use a newer epm-platform",
                MIGRATIONS.len()
            ))));
        }
        for (index, migration) in MIGRATIONS.iter().enumerate().skip(done) {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", index + 1)?;
            tx.commit()?;
            tracing::info!("database migrated to schema version {}", index + 1);
        }
        Ok(())
    }

    fn conn(&self) -> Result<Conn<'_>> {
        match &self.store {
            // A panic while holding the lock leaves SQLite consistent (each
            // write is a transaction), so a poisoned lock is still usable.
            Store::Sqlite(conn) => Ok(Conn::sqlite(sql::blocking(|| {
                conn.lock().unwrap_or_else(|p| p.into_inner())
            }))),
            Store::Postgres(pg) => Ok(Conn::postgres(pg)?),
        }
    }

    // ---- admins -------------------------------------------------------

    /// The highest approval level any stored rule, elevation rule or admin
    /// session entry uses (0 when none).
    pub fn highest_approval_level(&self) -> Result<u32> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT document FROM policies")?;
        let documents = stmt.query_map(params![], |r| r.get::<_, String>(0))?;
        let mut highest = 0;
        for document in documents {
            highest = highest.max(crate::merge::highest_approval_level(&document?));
        }
        Ok(highest)
    }

    fn admin_row(conn: &Conn<'_>, name: &str) -> Result<Option<(AdminInfo, Option<String>)>> {
        Ok(conn
            .query_row(
                "SELECT name, role, approver_level, endpoint_users, disabled_by, created_at FROM admins WHERE name = ?1",
                [name],
                |r| Ok((admin_info(r)?, r.get(4)?)),
            )
            .optional()?)
    }

    fn enabled_owners(conn: &Conn<'_>) -> Result<u64> {
        Ok(conn.query_row(
            "SELECT COUNT(*) FROM admins WHERE role = 'owner' AND disabled_by IS NULL",
            params![],
            |r| r.get(0),
        )?)
    }

    /// Creates an admin and returns it with its token (shown once). Only an
    /// owner, or the offline CLI, may; the first admin of an empty database
    /// is the owner unless a role is given. Returns what to log too.
    pub fn create_admin(&self, by: Actor<'_>, new: &CreateAdmin) -> Result<(AdminCreated, String)> {
        if let Actor::Admin(admin) = by {
            admin.require(Capability::ManageAdmins)?;
        }
        let name = new.name.as_str();
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(DbError::Invalid(format!(
                "admin name {:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'",
                epm_api::validate::printable(name)
            )));
        }
        let highest = self.highest_approval_level()?;
        let endpoint_users = new
            .endpoint_users
            .clone()
            .unwrap_or_else(|| vec![name.to_owned()]);
        let token = new_token("epa_");
        let now = Timestamp::now();
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let empty: bool =
            tx.query_row("SELECT COUNT(*) = 0 FROM admins", params![], |r| r.get(0))?;
        let role = match (new.role, new.approver_level) {
            (Some(role), _) => role,
            (None, _) if empty => AdminRole::Owner,
            (None, Some(_)) => AdminRole::Approver,
            (None, None) => AdminRole::Auditor,
        };
        check_role_and_level(role, new.approver_level, highest)?;
        let inserted = tx.execute(
            "INSERT INTO admins (name, token_sha256, approver_level, created_at, role, endpoint_users) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (name) DO NOTHING",
            params![name, secret_hash(&token), new.approver_level, now.to_string(), role.as_str(), to_json(&endpoint_users)],
        )?;
        if inserted == 0 {
            return Err(DbError::Conflict(format!("an admin named {name:?} exists")));
        }
        tx.commit()?;
        let admin = AdminInfo {
            name: name.into(),
            role,
            approver_level: new.approver_level,
            endpoint_users,
            disabled: false,
            created_at: now,
        };
        let detail = format!("created admin {}: {}", name, describe_admin(&admin));
        Ok((AdminCreated { admin, token }, detail))
    }

    /// Replaces an admin's role, level and endpoint users (owner only).
    /// Returns the admin and the change, before → after, for the log.
    pub fn update_admin(
        &self,
        by: &Admin,
        name: &str,
        update: &UpdateAdmin,
    ) -> Result<(AdminInfo, String)> {
        by.require(Capability::ManageAdmins)?;
        let highest = self.highest_approval_level()?;
        check_role_and_level(update.role, update.approver_level, highest)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let (before, _) = Db::admin_row(&tx, name)?
            .ok_or_else(|| DbError::NotFound(format!("no admin {name:?}")))?;
        if before.role == AdminRole::Owner
            && update.role != AdminRole::Owner
            && !before.disabled
            && Db::enabled_owners(&tx)? <= 1
        {
            return Err(DbError::Conflict(format!(
                "{name} is the last enabled owner: make another owner first"
            )));
        }
        tx.execute(
            "UPDATE admins SET role = ?2, approver_level = ?3, endpoint_users = ?4 WHERE name = ?1",
            params![
                name,
                update.role.as_str(),
                update.approver_level,
                to_json(&update.endpoint_users)
            ],
        )?;
        let (after, _) = Db::admin_row(&tx, name)?
            .ok_or_else(|| DbError::NotFound(format!("no admin {name:?}")))?;
        tx.commit()?;
        let detail = format!(
            "changed admin {name}: {} → {}",
            describe_admin(&before),
            describe_admin(&after)
        );
        Ok((after, detail))
    }

    /// Disables or enables an admin (owner only); the last enabled owner
    /// cannot be disabled.
    pub fn set_admin_disabled(&self, by: &Admin, name: &str, disabled: bool) -> Result<AdminInfo> {
        by.require(Capability::ManageAdmins)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let (before, _) = Db::admin_row(&tx, name)?
            .ok_or_else(|| DbError::NotFound(format!("no admin {name:?}")))?;
        if before.disabled == disabled {
            return Err(DbError::Conflict(format!(
                "admin {name} is already {}",
                if disabled { "disabled" } else { "enabled" }
            )));
        }
        if disabled && before.role == AdminRole::Owner && Db::enabled_owners(&tx)? <= 1 {
            return Err(DbError::Conflict(format!(
                "{name} is the last enabled owner: make another owner first"
            )));
        }
        tx.execute(
            "UPDATE admins SET disabled_by = ?2 WHERE name = ?1",
            params![name, disabled.then_some(by.name.as_str())],
        )?;
        let (after, _) = Db::admin_row(&tx, name)?
            .ok_or_else(|| DbError::NotFound(format!("no admin {name:?}")))?;
        tx.commit()?;
        Ok(after)
    }

    /// A new token for `name`; the old one is refused from now on. The
    /// owner rotates anyone's, every admin their own.
    pub fn rotate_admin_token(&self, by: &Admin, name: &str) -> Result<AdminCreated> {
        if by.name != name {
            by.require(Capability::ManageAdmins)?;
        }
        let token = new_token("epa_");
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE admins SET token_sha256 = ?2 WHERE name = ?1",
            params![name, secret_hash(&token)],
        )?;
        if changed == 0 {
            return Err(DbError::NotFound(format!("no admin {name:?}")));
        }
        let (admin, _) = Db::admin_row(&tx, name)?
            .ok_or_else(|| DbError::NotFound(format!("no admin {name:?}")))?;
        tx.commit()?;
        Ok(AdminCreated { admin, token })
    }

    /// Who a bearer token belongs to.
    pub fn admin_by_token(&self, token: &str) -> Result<Option<TokenOwner>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT name, role, approver_level, endpoint_users, disabled_by, created_at FROM admins WHERE token_sha256 = ?1",
                [secret_hash(token)],
                |r| Ok((admin_info(r)?, r.get::<_, Option<String>>(4)?)),
            )
            .optional()?
            .map(|(info, disabled_by)| match disabled_by {
                Some(_) => TokenOwner::Disabled(info.name),
                None => TokenOwner::Admin(Admin {
                    name: info.name,
                    role: info.role,
                    approver_level: info.approver_level,
                    endpoint_users: info.endpoint_users,
                }),
            }))
    }

    /// Every admin.
    pub fn admins(&self) -> Result<Vec<AdminInfo>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT name, role, approver_level, endpoint_users, disabled_by, created_at FROM admins ORDER BY name",
        )?;
        let rows = stmt.query_map(params![], admin_info)?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    // ---- enrollment ---------------------------------------------------

    /// Creates an enrollment token; returns its id and the token.
    pub fn create_enroll_token(
        &self,
        uses: u32,
        expires_at: Timestamp,
        by: &Admin,
    ) -> Result<(String, String)> {
        by.require(Capability::ManageFleet)?;
        if uses == 0 {
            return Err(DbError::Invalid(
                "an enrollment token needs at least one use".into(),
            ));
        }
        let token = new_token("ept_");
        let id = new_id("etk_");
        self.conn()?.execute(
            "INSERT INTO enroll_tokens (token_sha256, uses_left, expires_at, created_by, created_at, id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![secret_hash(&token), uses, expires_at.to_string(), by.name, Timestamp::now().to_string(), id],
        )?;
        Ok((id, token))
    }

    /// Every enrollment token, newest first.
    pub fn enroll_tokens(&self) -> Result<Vec<EnrollTokenInfo>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, uses_left, expires_at, created_by, created_at, revoked_by FROM enroll_tokens ORDER BY created_at DESC, id",
        )?;
        let rows = stmt.query_map(params![], |r| {
            Ok(EnrollTokenInfo {
                id: r.get(0)?,
                uses_left: r.get(1)?,
                expires_at: ts(r, 2)?,
                created_by: r.get(3)?,
                created_at: ts(r, 4)?,
                revoked_by: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// Revokes an enrollment token: it enrolls nothing more.
    pub fn revoke_enroll_token(&self, id: &str, by: &Admin) -> Result<()> {
        by.require(Capability::ManageFleet)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let revoked: Option<Option<String>> = tx
            .query_row(
                "SELECT revoked_by FROM enroll_tokens WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        match revoked {
            None => return Err(DbError::NotFound(format!("no enrollment token {id:?}"))),
            Some(Some(who)) => {
                return Err(DbError::Conflict(format!(
                    "enrollment token {id} was already revoked by {who}"
                )));
            }
            Some(None) => {}
        }
        tx.execute(
            "UPDATE enroll_tokens SET revoked_by = ?2, uses_left = 0 WHERE id = ?1",
            params![id, by.name],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Uses one enrollment and makes the device's credentials. A device id
    /// already enrolled is taken only with its current credentials
    /// (`presented`, the bearer `<agent_id>.<secret>`) or after an admin
    /// reset it; otherwise nothing changes and the answer says why.
    pub fn enroll(
        &self,
        request: &EnrollRequest,
        presented: Option<&str>,
    ) -> Result<(AgentCredentials, Enrollment)> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let token = tx
            .query_row(
                "SELECT uses_left, expires_at, revoked_by FROM enroll_tokens WHERE token_sha256 = ?1",
                [secret_hash(&request.enrollment_token)],
                |r| Ok((r.get::<_, u32>(0)?, ts(r, 1)?, r.get::<_, Option<String>>(2)?)),
            )
            .optional()?;
        let refused = |why: &str| DbError::Unauthorized(format!("enrollment refused: {why}"));
        match token {
            None => return Err(refused("unknown enrollment token")),
            Some((_, _, Some(_))) => return Err(refused("this enrollment token was revoked")),
            Some((0, _, _)) => return Err(refused("this enrollment token is used up")),
            Some((_, expires, _)) if expires <= Timestamp::now() => {
                return Err(refused("this enrollment token has expired"));
            }
            Some(_) => {}
        }
        /// The device's agent as enrollment sees it.
        struct Enrolled {
            agent_id: String,
            secret: Vec<u8>,
            next: Option<Vec<u8>>,
            reset_by: Option<String>,
        }
        let existing = tx
            .query_row(
                "SELECT agent_id, secret_sha256, next_secret_sha256, reset_by FROM agents WHERE device_id = ?1",
                [&request.device_id],
                |r| {
                    Ok(Enrolled {
                        agent_id: r.get(0)?,
                        secret: r.get(1)?,
                        next: r.get(2)?,
                        reset_by: r.get(3)?,
                    })
                },
            )
            .optional()?;
        let outcome = match &existing {
            None => Enrollment::New,
            Some(Enrolled {
                reset_by: Some(by), ..
            }) => Enrollment::AfterReset { by: by.clone() },
            Some(enrolled) => {
                let shown = presented
                    .and_then(|bearer| bearer.split_once('.'))
                    .filter(|(id, _)| *id == enrolled.agent_id)
                    .map(|(_, secret)| secret_hash(secret));
                if shown.is_some_and(|h| h == enrolled.secret || enrolled.next.as_ref() == Some(&h))
                {
                    Enrollment::Renewed
                } else {
                    return Err(DbError::Conflict(format!(
                        "device {:?} is already enrolled: enrolling it again needs its current credentials (Authorization: Bearer <agent_id>.<secret>) or an admin's `epm-platform devices reset {}`; nothing was changed",
                        request.device_id, request.device_id
                    )));
                }
            }
        };
        tx.execute(
            "UPDATE enroll_tokens SET uses_left = uses_left - 1 WHERE token_sha256 = ?1",
            [secret_hash(&request.enrollment_token)],
        )?;
        let secret = new_token("");
        let mut offline_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut offline_key);
        let now = Timestamp::now().to_string();
        let agent_id = match existing {
            // The same agent, showing its credentials: its audit sequence
            // and requests go on; the old secret stops working.
            Some(Enrolled { agent_id, .. }) if outcome == Enrollment::Renewed => {
                tx.execute(
                    "UPDATE agents SET secret_sha256 = ?2, next_secret_sha256 = NULL, offline_key = ?3, hostname = ?4, os = ?5, agent_version = ?6, enrolled_at = ?7 WHERE agent_id = ?1",
                    params![agent_id, secret_hash(&secret), offline_key.to_vec(), request.hostname, request.os, request.agent_version, now],
                )?;
                agent_id
            }
            // After a reset, whoever enrolls is a new agent of the device: a
            // reinstalled machine numbers its audit from 1 again, which the
            // old agent's records must not shadow.
            Some(Enrolled {
                agent_id: old_id, ..
            }) => {
                let agent_id = new_id("agt_");
                tx.execute(
                    "UPDATE agents SET agent_id = ?2, secret_sha256 = ?3, next_secret_sha256 = NULL, reset_by = NULL, offline_key = ?4, hostname = ?5, os = ?6, agent_version = ?7, enrolled_at = ?8,
                     last_checkin = NULL, policy_version = NULL, outbox_pending = 0, audit_floor = 0, audit_acked = 0 WHERE agent_id = ?1",
                    params![old_id, agent_id, secret_hash(&secret), offline_key.to_vec(), request.hostname, request.os, request.agent_version, now],
                )?;
                agent_id
            }
            None => {
                let agent_id = new_id("agt_");
                tx.execute(
                    "INSERT INTO agents (agent_id, device_id, secret_sha256, offline_key, hostname, os, agent_version, enrolled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![agent_id, request.device_id, secret_hash(&secret), offline_key.to_vec(), request.hostname, request.os, request.agent_version, now],
                )?;
                agent_id
            }
        };
        tx.commit()?;
        Ok((
            AgentCredentials {
                agent_id,
                agent_secret: secret,
                offline_key: BASE64.encode(offline_key),
            },
            outcome,
        ))
    }

    /// The agent a bearer `<agent_id>.<secret>` belongs to. The secret a
    /// rotation made becomes the only one at its first use.
    pub fn agent_by_bearer(&self, bearer: &str) -> Result<Option<Agent>> {
        let Some((agent_id, secret)) = bearer.split_once('.') else {
            return Ok(None);
        };
        let hash = secret_hash(secret);
        let conn = self.conn()?;
        let found = conn
            .query_row(
                "SELECT agent_id, device_id, users, next_secret_sha256 = ?2 FROM agents WHERE agent_id = ?1 AND (secret_sha256 = ?2 OR next_secret_sha256 = ?2)",
                params![agent_id, hash],
                |r| {
                    Ok((
                        Agent {
                            agent_id: r.get(0)?,
                            device_id: r.get(1)?,
                            users: json_col(r, 2)?,
                        },
                        r.get::<_, Option<bool>>(3)?.unwrap_or(false),
                    ))
                },
            )
            .optional()?;
        let Some((agent, rotated)) = found else {
            return Ok(None);
        };
        if rotated {
            conn.execute(
                "UPDATE agents SET secret_sha256 = next_secret_sha256, next_secret_sha256 = NULL WHERE agent_id = ?1 AND next_secret_sha256 = ?2",
                params![agent.agent_id, hash],
            )?;
        }
        Ok(Some(agent))
    }

    /// A new secret for an agent (same id and offline key). The current
    /// secret keeps working until the new one is first used.
    pub fn rotate_agent_secret(&self, agent: &Agent) -> Result<AgentCredentials> {
        let secret = new_token("");
        let conn = self.conn()?;
        conn.execute(
            "UPDATE agents SET next_secret_sha256 = ?2 WHERE agent_id = ?1",
            params![agent.agent_id, secret_hash(&secret)],
        )?;
        let offline_key: Vec<u8> = conn.query_row(
            "SELECT offline_key FROM agents WHERE agent_id = ?1",
            [&agent.agent_id],
            |r| r.get(0),
        )?;
        Ok(AgentCredentials {
            agent_id: agent.agent_id.clone(),
            agent_secret: secret,
            offline_key: BASE64.encode(offline_key),
        })
    }

    /// Forgets a device: its credentials stop working, its bundle goes, its
    /// pending and approved requests are revoked; its audit stays. Returns
    /// how many requests were revoked.
    pub fn remove_device(&self, device_id: &str, by: &Admin) -> Result<usize> {
        by.require(Capability::ManageFleet)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let agent_id = Db::agent_id_of(&tx, device_id)?;
        let revoked = self.revoke_open_requests(
            &tx,
            &agent_id,
            &format!("device {device_id} was removed from the platform"),
            &by.name,
        )?;
        tx.execute("DELETE FROM bundles WHERE device_id = ?1", [device_id])?;
        tx.execute("DELETE FROM agents WHERE agent_id = ?1", [&agent_id])?;
        tx.commit()?;
        Ok(revoked)
    }

    /// Voids a device's credentials now, revokes its pending and approved
    /// requests, and lets the next enrollment with a valid token take its id
    /// as a new agent. Returns how many requests were revoked.
    pub fn reset_device(&self, device_id: &str, by: &Admin) -> Result<usize> {
        by.require(Capability::ManageFleet)?;
        // A hash nobody knows the secret of.
        let void = secret_hash(&new_token("void_"));
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let agent_id = Db::agent_id_of(&tx, device_id)?;
        tx.execute(
            "UPDATE agents SET secret_sha256 = ?2, next_secret_sha256 = NULL, reset_by = ?3 WHERE agent_id = ?1",
            params![agent_id, void, by.name],
        )?;
        let revoked = self.revoke_open_requests(
            &tx,
            &agent_id,
            &format!("device {device_id} was reset on the platform"),
            &by.name,
        )?;
        tx.commit()?;
        Ok(revoked)
    }

    /// The agent id of an enrolled device.
    fn agent_id_of(tx: &Conn<'_>, device_id: &str) -> Result<String> {
        tx.query_row(
            "SELECT agent_id FROM agents WHERE device_id = ?1",
            [device_id],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| DbError::NotFound(format!("no enrolled device {device_id:?}")))
    }

    /// Revokes an agent's pending and approved requests; returns how many.
    fn revoke_open_requests(
        &self,
        tx: &Conn<'_>,
        agent_id: &str,
        reason: &str,
        by: &str,
    ) -> Result<usize> {
        let ids: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM requests WHERE agent_id = ?1 AND state IN ('pending', 'approved')",
            )?;
            stmt.query_map([agent_id], |r| r.get(0))?
                .collect::<sql::Result<_>>()?
        };
        tx.execute(
            "UPDATE requests SET state = 'revoked', current_level = 0, reason = ?2, decided_by = ?3, updated_at = ?4 WHERE agent_id = ?1 AND state IN ('pending', 'approved')",
            params![agent_id, reason, by, Timestamp::now().to_string()],
        )?;
        for id in &ids {
            self.notify(tx, "revoked", id)?;
        }
        Ok(ids.len())
    }

    /// The agent of a device.
    pub fn agent_by_device(&self, device_id: &str) -> Result<Option<Agent>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT agent_id, device_id, users FROM agents WHERE device_id = ?1",
                [device_id],
                |r| {
                    Ok(Agent {
                        agent_id: r.get(0)?,
                        device_id: r.get(1)?,
                        users: json_col(r, 2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records a check-in; returns the acknowledged audit seq.
    pub fn record_checkin(
        &self,
        agent: &Agent,
        request: &epm_api::agent::CheckinRequest,
    ) -> Result<u64> {
        // One statement, one round trip: the check-in is the fleet's most
        // frequent call.
        self.conn()?.query_row(
            "UPDATE agents SET last_checkin = ?2, policy_version = ?3, outbox_pending = ?4, users = ?5, counters = ?6 WHERE agent_id = ?1 RETURNING audit_acked",
            params![
                agent.agent_id,
                Timestamp::now().to_string(),
                request.policy_version,
                request.outbox_pending,
                to_json(&request.users),
                to_json(&request.counters)
            ],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| DbError::NotFound(format!("no agent {:?}", agent.agent_id)))
    }

    /// A device's offline-code key.
    pub fn offline_key(&self, device_id: &str) -> Result<Vec<u8>> {
        self.conn()?
            .query_row(
                "SELECT offline_key FROM agents WHERE device_id = ?1",
                [device_id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| DbError::NotFound(format!("no enrolled device {device_id:?}")))
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT a.device_id, a.agent_id, a.hostname, a.os, a.agent_version, a.enrolled_at, a.last_checkin, a.policy_version, COALESCE(b.version, 0), a.audit_acked, a.outbox_pending, a.users, a.reset_by IS NOT NULL
             FROM agents a LEFT JOIN bundles b ON b.device_id = a.device_id ORDER BY a.device_id",
        )?;
        let rows = stmt.query_map(params![], |r| {
            let users: Vec<LocalUser> = json_col(r, 11)?;
            Ok(DeviceInfo {
                device_id: r.get(0)?,
                agent_id: r.get(1)?,
                hostname: r.get(2)?,
                os: r.get(3)?,
                agent_version: r.get(4)?,
                enrolled_at: ts(r, 5)?,
                last_checkin: match r.get::<_, Option<String>>(6)? {
                    Some(_) => Some(ts(r, 6)?),
                    None => None,
                },
                policy_version: r.get(7)?,
                bundle_version: r.get(8)?,
                audit_acked_seq: r.get(9)?,
                outbox_pending: r.get(10)?,
                users: users.into_iter().map(|u| u.name).collect(),
                reset_pending: r.get(12)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    // ---- policies -----------------------------------------------------

    fn bump_revision(tx: &Conn<'_>) -> Result<u64> {
        tx.execute(
            "INSERT INTO counters (name, value) VALUES ('policy_revision', 1) ON CONFLICT (name) DO UPDATE SET value = counters.value + 1", params![],
        )?;
        Ok(tx.query_row(
            "SELECT value FROM counters WHERE name = 'policy_revision'",
            params![],
            |r| r.get(0),
        )?)
    }

    /// The revision of the last policy change (0: none yet).
    pub fn policy_revision(&self) -> Result<u64> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT value FROM counters WHERE name = 'policy_revision'",
                params![],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Stores a (validated) document for a scope.
    pub fn put_policy(
        &self,
        scope: &PolicyScope,
        document: &str,
        rules: u64,
        by: &Admin,
    ) -> Result<PolicyEntry> {
        by.require(Capability::ManagePolicies)?;
        let by = by.name.as_str();
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let revision = Db::bump_revision(&tx)?;
        let now = Timestamp::now();
        tx.execute(
            "INSERT INTO policies (scope, revision, document, rules, pushed_by, pushed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (scope) DO UPDATE SET revision = ?2, document = ?3, rules = ?4, pushed_by = ?5, pushed_at = ?6",
            params![scope.to_string(), revision, document, rules, by, now.to_string()],
        )?;
        tx.commit()?;
        Ok(PolicyEntry {
            scope: scope.to_string(),
            revision,
            rules,
            pushed_by: by.into(),
            pushed_at: now,
        })
    }

    /// Deletes a scope's document; `false` if there was none.
    pub fn delete_policy(&self, scope: &PolicyScope, by: &Admin) -> Result<bool> {
        by.require(Capability::ManagePolicies)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let deleted = tx.execute("DELETE FROM policies WHERE scope = ?1", [scope.to_string()])?;
        if deleted > 0 {
            Db::bump_revision(&tx)?;
        }
        tx.commit()?;
        Ok(deleted > 0)
    }

    /// Every document's entry.
    pub fn policies(&self) -> Result<Vec<PolicyEntry>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT scope, revision, rules, pushed_by, pushed_at FROM policies ORDER BY scope",
        )?;
        let rows = stmt.query_map(params![], |r| {
            Ok(PolicyEntry {
                scope: r.get(0)?,
                revision: r.get(1)?,
                rules: r.get(2)?,
                pushed_by: r.get(3)?,
                pushed_at: ts(r, 4)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }

    /// One scope's document.
    pub fn policy_document(&self, scope: &PolicyScope) -> Result<Option<String>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT document FROM policies WHERE scope = ?1",
                [scope.to_string()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The documents that apply to a device with these users.
    pub fn documents_for(
        &self,
        device_id: &str,
        users: &[LocalUser],
    ) -> Result<Vec<ScopedDocument>> {
        let mut scopes = vec![PolicyScope::General, PolicyScope::Device(device_id.into())];
        for user in users {
            scopes.push(PolicyScope::User(user.name.clone()));
            for group in &user.groups {
                scopes.push(PolicyScope::Group(group.clone()));
            }
        }
        scopes.sort();
        scopes.dedup();
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare_cached("SELECT revision, document FROM policies WHERE scope = ?1")?;
        let mut documents = Vec::new();
        for scope in scopes {
            if let Some((revision, document)) = stmt
                .query_row([scope.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?
            {
                documents.push(ScopedDocument {
                    scope,
                    revision,
                    document,
                });
            }
        }
        Ok(documents)
    }

    /// A device's stored bundle.
    pub fn bundle(&self, device_id: &str) -> Result<Option<BundleRow>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT version, content_sha256, revision, users_sha256, envelope,
                        CASE WHEN signer_version = version THEN signer END
                 FROM bundles WHERE device_id = ?1",
                [device_id],
                |r| {
                    Ok(BundleRow {
                        version: r.get(0)?,
                        content_sha256: r.get(1)?,
                        revision: r.get(2)?,
                        users_sha256: r.get(3)?,
                        envelope: r.get(4)?,
                        signer: r.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    /// A device's stored bundle without its envelope: what a check-in
    /// reads to tell whether the bundle is still current.
    pub fn bundle_head(&self, device_id: &str) -> Result<Option<BundleHead>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT version, content_sha256, revision, users_sha256,
                        CASE WHEN signer_version = version THEN signer END
                 FROM bundles WHERE device_id = ?1",
                [device_id],
                |r| {
                    Ok(BundleHead {
                        version: r.get(0)?,
                        content_sha256: r.get(1)?,
                        revision: r.get(2)?,
                        users_sha256: r.get(3)?,
                        signer: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records the key the stored envelope at `version` is signed with,
    /// found by reading it (a row from before the signer column): later
    /// check-ins then need only the head. Nothing when the row moved on.
    pub fn note_bundle_signer(&self, device_id: &str, version: u64, signer: &str) -> Result<()> {
        self.conn()?.execute(
            "UPDATE bundles SET signer = ?3, signer_version = ?2 WHERE device_id = ?1 AND version = ?2",
            params![device_id, version, signer],
        )?;
        Ok(())
    }

    /// Stores a device's bundle if the stored one is still `previous`
    /// (its version; `None`: there was none). `false` when another
    /// instance stored one first: then that one stands, so each version
    /// (the ETag) has one envelope fleet-wide.
    pub fn put_bundle(
        &self,
        device_id: &str,
        row: &BundleRow,
        previous: Option<u64>,
    ) -> Result<bool> {
        let changed = self.conn()?.execute(
            "INSERT INTO bundles (device_id, version, content_sha256, revision, users_sha256, envelope, signer, signer_version) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?8, ?2)
             ON CONFLICT (device_id) DO UPDATE SET version = ?2, content_sha256 = ?3, revision = ?4, users_sha256 = ?5, envelope = ?6, signer = ?8, signer_version = ?2
             WHERE bundles.version = ?7",
            params![device_id, row.version, row.content_sha256, row.revision, row.users_sha256, row.envelope, previous.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX)), row.signer],
        )?;
        Ok(changed == 1)
    }

    /// The policy merged from a set of documents, if any instance merged
    /// it before (`key`: the SHA-256 of the documents' scopes and
    /// revisions).
    pub fn merged_policy(&self, key: &[u8]) -> Result<Option<String>> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT merged FROM merged_policies WHERE documents_sha256 = ?1",
                [key],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Keeps a merged policy for every instance; the oldest go past
    /// `MAX_MERGED` (256) (a policy change makes new ones).
    pub fn put_merged_policy(&self, key: &[u8], merged: &str) -> Result<()> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO merged_policies (documents_sha256, merged, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (documents_sha256) DO NOTHING",
            params![key, merged, sortable(Timestamp::now())],
        )?;
        conn.execute(
            "DELETE FROM merged_policies WHERE documents_sha256 IN (SELECT documents_sha256 FROM merged_policies ORDER BY created_at DESC LIMIT -1 OFFSET ?1)",
            params![MAX_MERGED],
        )?;
        Ok(())
    }

    /// Notes that a bundle is current for a newer revision or users.
    pub fn touch_bundle(&self, device_id: &str, revision: u64, users_sha256: &[u8]) -> Result<()> {
        self.conn()?.execute(
            "UPDATE bundles SET revision = ?2, users_sha256 = ?3 WHERE device_id = ?1",
            params![device_id, revision, users_sha256],
        )?;
        Ok(())
    }

    // ---- audit --------------------------------------------------------

    /// Stores a batch of records, each `(seq, decision, raw JSON)`; returns
    /// (acked seq, stored, duplicates). All or nothing.
    pub fn store_audit(
        &self,
        agent: &Agent,
        oldest_kept_seq: u64,
        records: &[(u64, Option<String>, &str)],
    ) -> Result<(u64, u64, u64)> {
        let mut conn = self.conn()?;
        // Uploads of different agents do not wait for each other; two of
        // one agent (a retry reaching another instance) take turns on the
        // agent's row, so the acknowledgement only moves forward.
        let tx = conn.transaction_concurrent()?;
        tx.query_row(
            "SELECT audit_acked FROM agents WHERE agent_id = ?1 FOR UPDATE",
            [&agent.agent_id],
            |r| r.get::<_, u64>(0),
        )
        .optional()?
        .ok_or_else(|| DbError::NotFound(format!("no agent {:?}", agent.agent_id)))?;
        // Rows in statements of at most AUDIT_BATCH: one round trip per
        // batch, and a bounded set of statement shapes to prepare.
        let mut stored: u64 = 0;
        for chunk in records.chunks(AUDIT_BATCH) {
            let mut sql = String::from(
                "INSERT INTO audit (agent_id, device_id, seq, decision, record) VALUES ",
            );
            let mut values = Vec::with_capacity(chunk.len() * 3 + 2);
            values.push(sql::ToValue::to_value(&agent.agent_id));
            values.push(sql::ToValue::to_value(&agent.device_id));
            for (i, (seq, decision, record)) in chunk.iter().enumerate() {
                let n = 3 + i * 3;
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("(?1, ?2, ?{n}, ?{}, ?{})", n + 1, n + 2));
                values.push(sql::ToValue::to_value(seq));
                values.push(sql::ToValue::to_value(decision));
                values.push(sql::ToValue::to_value(record));
            }
            sql.push_str(" ON CONFLICT (agent_id, seq) DO NOTHING");
            stored += tx.execute(&sql, values)? as u64;
        }
        let duplicates = records.len() as u64 - stored;
        // The agent no longer holds records before oldest_kept_seq: waiting
        // for them would stall the acknowledgement forever.
        let floor = oldest_kept_seq.saturating_sub(1);
        tx.execute(
            "UPDATE agents SET audit_floor = CASE WHEN audit_floor > ?2 THEN audit_floor ELSE ?2 END, audit_acked = CASE WHEN audit_acked > ?2 THEN audit_acked ELSE ?2 END WHERE agent_id = ?1",
            params![agent.agent_id, floor],
        )?;
        let mut acked: u64 = tx.query_row(
            "SELECT audit_acked FROM agents WHERE agent_id = ?1",
            [&agent.agent_id],
            |r| r.get(0),
        )?;
        {
            let mut next = tx.prepare_cached(
                "SELECT seq FROM audit WHERE agent_id = ?1 AND seq > ?2 ORDER BY seq LIMIT 1000",
            )?;
            loop {
                let seqs: Vec<u64> = next
                    .query_map(params![agent.agent_id, acked], |r| r.get(0))?
                    .collect::<sql::Result<_>>()?;
                let before = acked;
                for seq in &seqs {
                    if *seq == acked + 1 {
                        acked = *seq;
                    } else {
                        break;
                    }
                }
                if acked == before || seqs.len() < 1000 {
                    break;
                }
            }
        }
        tx.execute(
            "UPDATE agents SET audit_acked = ?2 WHERE agent_id = ?1",
            params![agent.agent_id, acked],
        )?;
        if stored > 0 {
            // Audit tails waiting on other instances see it at commit.
            postgres::notify(&tx, "epm_audit")?;
        }
        tx.commit()?;
        Ok((acked, stored, duplicates))
    }

    /// Fleet audit after `cursor`, oldest first, filtered.
    pub fn audit_after(
        &self,
        after: Option<u64>,
        device: Option<&str>,
        decision: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(u64, String, String)>> {
        let conn = self.conn()?;
        let filter = "(?2 IS NULL OR device_id = ?2) AND (?3 IS NULL OR decision = ?3)";
        let rows: Vec<(u64, String, String)> = match after {
            Some(after) => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT cursor, device_id, record FROM audit WHERE cursor > ?1 AND {filter} ORDER BY cursor LIMIT ?4"
                ))?;
                stmt.query_map(params![after, device, decision, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<sql::Result<_>>()?
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT cursor, device_id, record FROM audit WHERE CAST(?1 AS BIGINT) IS NULL AND {filter} ORDER BY cursor DESC LIMIT ?4"
                ))?;
                let mut newest: Vec<(u64, String, String)> = stmt
                    .query_map(params![Option::<u64>::None, device, decision, limit], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })?
                    .collect::<sql::Result<_>>()?;
                newest.reverse();
                newest
            }
        };
        Ok(rows)
    }

    /// The newest audit cursor.
    pub fn audit_head(&self) -> Result<u64> {
        Ok(self.conn()?.query_row(
            "SELECT COALESCE(MAX(cursor), 0) FROM audit",
            params![],
            |r| r.get(0),
        )?)
    }

    // ---- requests -----------------------------------------------------

    /// Stores a new request, or returns the one this agent already sent
    /// with that `local_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_request(
        &self,
        agent: &Agent,
        submit: &epm_api::agent::RequestSubmit,
        levels: &[u32],
        uses: u32,
    ) -> Result<RequestStatus> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT id FROM requests WHERE agent_id = ?1 AND local_id = ?2",
                params![agent.agent_id, submit.local_id],
                |r| r.get(0),
            )
            .optional()?;
        let id = match existing {
            Some(id) => id,
            None => {
                let id = new_id("req_");
                let now = Timestamp::now().to_string();
                tx.execute(
                    "INSERT INTO requests (id, agent_id, local_id, device_id, \"user\", rule_id, subject, justification, window_start, window_end, state, levels, current_level, uses, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'pending', ?11, 1, ?12, ?13, ?13)",
                    params![
                        id, agent.agent_id, submit.local_id, agent.device_id, submit.user, submit.rule_id,
                        to_json(&submit.subject), submit.justification, sortable(submit.window.start),
                        sortable(submit.window.end), to_json(&levels), uses, now
                    ],
                )?;
                self.notify(&tx, "created", &id)?;
                id
            }
        };
        tx.commit()?;
        drop(conn);
        self.request_status(&agent.agent_id, &id)
    }

    fn request_row(conn: &Conn<'_>, id: &str) -> Result<StoredRequest> {
        let row = conn
            .query_row(
                "SELECT id, device_id, \"user\", rule_id, subject, justification, window_start, window_end, state, levels, current_level, reason, decided_by, created_at, updated_at, agent_id, grant_envelope, local_id FROM requests WHERE id = ?1",
                [id],
                |r| {
                    let state: String = r.get(8)?;
                    Ok((
                        r.get::<_, String>(15)?,
                        AdminRequest {
                            id: r.get(0)?,
                            device_id: r.get(1)?,
                            user: r.get(2)?,
                            rule_id: r.get(3)?,
                            subject: json_col::<RequestSubject>(r, 4)?,
                            justification: r.get(5)?,
                            window: Window {
                                start: ts(r, 6)?,
                                end: ts(r, 7)?,
                            },
                            state: state.parse().map_err(|e: String| {
                                sql::SqlError::conversion(8, e)
                            })?,
                            levels: json_col(r, 9)?,
                            current_level: r.get(10)?,
                            approvals: Vec::new(),
                            reason: r.get(11)?,
                            decided_by: r.get(12)?,
                            created_at: ts(r, 13)?,
                            updated_at: ts(r, 14)?,
                        },
                        r.get::<_, Option<String>>(16)?,
                        r.get::<_, String>(17)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| DbError::NotFound(format!("no request {id:?}")))?;
        let (agent_id, mut request, grant, local_id): (
            String,
            AdminRequest,
            Option<String>,
            String,
        ) = row;
        let mut stmt = conn.prepare_cached(
            "SELECT admin, level, at FROM approvals WHERE request_id = ?1 ORDER BY at, admin",
        )?;
        request.approvals = stmt
            .query_map([id], |r| {
                Ok(Approval {
                    admin: r.get(0)?,
                    level: r.get(1)?,
                    at: ts(r, 2)?,
                })
            })?
            .collect::<sql::Result<_>>()?;
        Ok(StoredRequest {
            agent_id,
            local_id,
            request,
            grant: grant.and_then(|g| serde_json::from_str(&g).ok()),
        })
    }

    /// A request as its agent sees it; another agent's is not found.
    pub fn request_status(&self, agent_id: &str, id: &str) -> Result<RequestStatus> {
        let conn = self.conn()?;
        let stored = Db::request_row(&conn, id)?;
        if stored.agent_id != agent_id {
            return Err(DbError::NotFound(format!("no request {id:?}")));
        }
        Ok(stored.status())
    }

    /// One request, for admins.
    pub fn request(&self, id: &str) -> Result<AdminRequest> {
        let conn = self.conn()?;
        Ok(Db::request_row(&conn, id)?.request)
    }

    /// Requests, newest first.
    pub fn requests(
        &self,
        state: Option<RequestState>,
        device: Option<&str>,
    ) -> Result<Vec<AdminRequest>> {
        let ids: Vec<String> = {
            let conn = self.conn()?;
            let mut stmt = conn.prepare(
                "SELECT id FROM requests WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR device_id = ?2) ORDER BY created_at DESC, id",
            )?;
            stmt.query_map(params![state.map(RequestState::as_str), device], |r| {
                r.get(0)
            })?
            .collect::<sql::Result<_>>()?
        };
        let conn = self.conn()?;
        ids.iter()
            .map(|id| Ok(Db::request_row(&conn, id)?.request))
            .collect()
    }

    /// Expires pending and approved requests whose window ended; returns
    /// how many.
    pub fn expire_requests(&self, now: Timestamp) -> Result<usize> {
        let mut conn = self.conn()?;
        // Both sides are written by `sortable`, so text order is time order.
        let due: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM requests WHERE state IN ('pending', 'approved') AND window_end <= ?1)",
            [sortable(now)],
            |r| r.get(0),
        )?;
        if !due {
            return Ok(0);
        }
        let tx = conn.transaction()?;
        let ids: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM requests WHERE state IN ('pending', 'approved') AND window_end <= ?1",
            )?;
            stmt.query_map([sortable(now)], |r| r.get(0))?
                .collect::<sql::Result<_>>()?
        };
        tx.execute(
            "UPDATE requests SET state = 'expired', current_level = 0, updated_at = ?1 WHERE state IN ('pending', 'approved') AND window_end <= ?1",
            [sortable(now)],
        )?;
        for id in &ids {
            self.notify(&tx, "expired", id)?;
        }
        tx.commit()?;
        Ok(ids.len())
    }

    /// The periodic expiry sweep: on PostgreSQL one instance at a time
    /// (an advisory lock; the others skip this round), so a fleet of
    /// instances does not repeat the same work every 30 s.
    pub fn sweep_expired(&self, now: Timestamp) -> Result<usize> {
        let conn = self.conn()?;
        if !conn.is_postgres() {
            drop(conn);
            return self.expire_requests(now);
        }
        let locked: bool = conn.query_row(
            &format!("SELECT pg_try_advisory_lock({})", sql::SWEEP_LOCK),
            params![],
            |r| r.get(0),
        )?;
        if !locked {
            return Ok(0);
        }
        let swept = self.expire_requests(now);
        conn.execute(
            &format!("SELECT pg_advisory_unlock({})", sql::SWEEP_LOCK),
            params![],
        )?;
        swept
    }

    /// Records `admin`'s approval, judged by the rule's levels as they are
    /// in the device's policy now (`terms`). Returns the request and
    /// whether it is now fully approved. The approval that completes it
    /// stores the grant `sign` makes (from the request and its uses) in
    /// the same transaction: a platform killed in between must not leave a
    /// request approved without a grant, which its agent could never use.
    pub fn approve(
        &self,
        id: &str,
        admin: &Admin,
        terms: &CurrentTerms,
        narrowing: Narrowing,
        sign: impl FnOnce(&AdminRequest, u32) -> std::result::Result<SignedEnvelope, String>,
    ) -> Result<(AdminRequest, bool)> {
        admin.require(Capability::Approve)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let request = Db::request_row(&tx, id)?.request;
        if request.state != RequestState::Pending {
            return Err(DbError::Conflict(format!(
                "request {id} is {}, not pending",
                request.state
            )));
        }
        if admin.is_endpoint_user(&request.user) {
            return Err(DbError::Forbidden(format!(
                "request {id} is from {}, which is {} on endpoints: nobody approves their own request",
                request.user, admin.name
            )));
        }
        if request.approvals.iter().any(|a| a.admin == admin.name) {
            return Err(DbError::Conflict(format!(
                "{} already approved request {id}",
                admin.name
            )));
        }
        let now = Timestamp::now().to_string();
        if let Some(end) = narrowing.end {
            if end > request.window.end {
                return Err(DbError::Invalid(format!(
                    "the window can only be shortened: it ends at {} and {end} is later",
                    request.window.end
                )));
            }
            if end <= request.window.start.max(Timestamp::now()) {
                return Err(DbError::Invalid(format!(
                    "the shortened window would end at {end}, before it starts or in the past"
                )));
            }
        }
        if let Some(uses) = narrowing.uses
            && (uses == 0 || uses > terms.uses)
        {
            return Err(DbError::Invalid(format!(
                "uses can only be lowered: from 1 to the rule's {}",
                terms.uses
            )));
        }
        let waiting = waiting_level(&terms.levels, &request.approvals);
        if waiting != 0 {
            let own = admin.approver_level.unwrap_or(0);
            if own != waiting {
                return Err(DbError::Forbidden(format!(
                    "request {id} waits for level {waiting} approvers; {} approves at level {own}",
                    admin.name
                )));
            }
            tx.execute(
                "INSERT INTO approvals (request_id, admin, level, at) VALUES (?1, ?2, ?3, ?4)",
                params![id, admin.name, waiting, now],
            )?;
        }
        if let Some(end) = narrowing.end {
            tx.execute(
                "UPDATE requests SET window_end = ?2 WHERE id = ?1",
                params![id, sortable(end)],
            )?;
        }
        if let Some(uses) = narrowing.uses {
            tx.execute(
                "UPDATE requests SET max_uses = CASE WHEN max_uses IS NOT NULL AND max_uses < ?2 THEN max_uses ELSE ?2 END WHERE id = ?1",
                params![id, uses],
            )?;
        }
        let approvals = Db::request_row(&tx, id)?.request.approvals;
        let next = waiting_level(&terms.levels, &approvals);
        let done = next == 0;
        if done {
            tx.execute(
                "UPDATE requests SET state = 'approved', current_level = 0, levels = ?2, uses = ?3, decided_by = ?4, updated_at = ?5 WHERE id = ?1",
                params![id, to_json(&terms.levels), terms.uses, admin.name, now],
            )?;
        } else {
            tx.execute(
                "UPDATE requests SET current_level = ?2, levels = ?3, uses = ?4, updated_at = ?5 WHERE id = ?1",
                params![id, next, to_json(&terms.levels), terms.uses, now],
            )?;
        }
        if done {
            let uses: u32 = tx.query_row(
                "SELECT CASE WHEN max_uses IS NOT NULL AND max_uses < uses THEN max_uses ELSE uses END FROM requests WHERE id = ?1",
                [id],
                |r| r.get(0),
            )?;
            // A grant that cannot be made cannot be stored: the approval
            // rolls back (an internal error, logged).
            let envelope = sign(&Db::request_row(&tx, id)?.request, uses).map_err(|e| {
                DbError::Sql(rusqlite::Error::ToSqlConversionFailure(e.into()).into())
            })?;
            tx.execute(
                "UPDATE requests SET grant_envelope = ?2 WHERE id = ?1",
                params![id, to_json(&envelope)],
            )?;
            self.notify(&tx, "approved", id)?;
        }
        let request = Db::request_row(&tx, id)?.request;
        tx.commit()?;
        Ok((request, done))
    }

    /// Closes a pending request the platform can no longer approve (its
    /// rule left the device's policy, or its window no longer fits it).
    pub fn close_request(&self, id: &str, reason: &str) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        if tx.execute(
            "UPDATE requests SET state = 'denied', current_level = 0, reason = ?2, decided_by = 'platform', updated_at = ?3 WHERE id = ?1 AND state = 'pending'",
            params![id, reason, Timestamp::now().to_string()],
        )? == 1
        {
            self.notify(&tx, "denied", id)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// How many executions an approval of this request allows.
    pub fn request_uses(&self, id: &str) -> Result<u32> {
        Ok(self.conn()?.query_row(
            "SELECT CASE WHEN max_uses IS NOT NULL AND max_uses < uses THEN max_uses ELSE uses END FROM requests WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?)
    }

    /// Denies a pending request (an approver of its current level).
    pub fn deny(&self, id: &str, admin: &Admin, reason: &str) -> Result<AdminRequest> {
        admin.require(Capability::Approve)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let request = Db::request_row(&tx, id)?.request;
        if request.state != RequestState::Pending {
            return Err(DbError::Conflict(format!(
                "request {id} is {}, not pending",
                request.state
            )));
        }
        let own = admin.approver_level.unwrap_or(0);
        if own != request.current_level {
            return Err(DbError::Forbidden(format!(
                "request {id} waits for level {} approvers; {} approves at level {own}",
                request.current_level, admin.name
            )));
        }
        tx.execute(
            "UPDATE requests SET state = 'denied', current_level = 0, reason = ?2, decided_by = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, reason, admin.name, Timestamp::now().to_string()],
        )?;
        self.notify(&tx, "denied", id)?;
        let request = Db::request_row(&tx, id)?.request;
        tx.commit()?;
        Ok(request)
    }

    /// Revokes an approved request (any approver).
    pub fn revoke(&self, id: &str, admin: &Admin, reason: Option<&str>) -> Result<AdminRequest> {
        admin.require(Capability::Approve)?;
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        let request = Db::request_row(&tx, id)?.request;
        if request.state != RequestState::Approved {
            return Err(DbError::Conflict(format!(
                "request {id} is {}; only an approved request can be revoked",
                request.state
            )));
        }
        // Only from approved: the agent's used report does not take the
        // writers' lock, so it may have landed since the read above; a
        // grant used up stays used, not revoked after the fact.
        if tx.execute(
            "UPDATE requests SET state = 'revoked', reason = ?2, decided_by = ?3, updated_at = ?4 WHERE id = ?1 AND state = 'approved'",
            params![id, reason, admin.name, Timestamp::now().to_string()],
        )? == 0
        {
            let now = Db::request_row(&tx, id)?.request.state;
            return Err(DbError::Conflict(format!(
                "request {id} is {now}; only an approved request can be revoked"
            )));
        }
        // Wakes the agent's request wait, which names the grant while it is
        // in force: the device drops it within a second, not at its next
        // check-in.
        self.notify(&tx, "revoked", id)?;
        let request = Db::request_row(&tx, id)?.request;
        tx.commit()?;
        Ok(request)
    }

    /// Marks an agent's approved requests used.
    pub fn mark_used(&self, agent: &Agent, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            // Most check-ins: no connection taken.
            return Ok(());
        }
        let mut conn = self.conn()?;
        // Row locks suffice (only approved rows of this agent change), so
        // check-ins do not queue behind the writers' lock; one transaction
        // so the wake below goes out with the change it announces.
        let tx = conn.transaction_concurrent()?;
        for id in ids {
            if tx.execute(
                "UPDATE requests SET state = 'used', updated_at = ?3 WHERE id = ?1 AND agent_id = ?2 AND state = 'approved'",
                params![id, agent.agent_id, Timestamp::now().to_string()],
            )? == 1
            {
                // Every state change wakes the agent's wait, like the
                // others (the agent has usually stopped naming it already).
                self.request_changed(&tx, id)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    // ---- activity -----------------------------------------------------

    /// Records one admin call.
    pub fn record_activity(
        &self,
        admin: &str,
        call: &str,
        status: u16,
        detail: Option<&str>,
    ) -> Result<()> {
        self.conn()?.execute(
            "INSERT INTO activity (at, admin, call, status, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![Timestamp::now().to_string(), admin, call, status, detail],
        )?;
        Ok(())
    }

    /// The newest `limit` activity entries, oldest first; only `admin`'s
    /// when given.
    pub fn activity(&self, limit: u32, admin: Option<&str>) -> Result<Vec<Activity>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT id, at, admin, call, status, detail FROM activity WHERE ?2 IS NULL OR admin = ?2 ORDER BY id DESC LIMIT ?1",
        )?;
        let mut rows: Vec<Activity> = stmt
            .query_map(params![limit, admin], |r| {
                Ok(Activity {
                    id: r.get(0)?,
                    at: ts(r, 1)?,
                    admin: r.get(2)?,
                    call: r.get(3)?,
                    status: r.get(4)?,
                    detail: r.get(5)?,
                })
            })?
            .collect::<sql::Result<_>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// Adds counted refused calls (one row per key and hour) and drops the
    /// oldest rows past `MAX_REFUSED_ROWS` (10 000).
    pub fn record_refused(&self, counts: &[(RefusedKey, u64, Timestamp)]) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO refused_calls (hour, source, who, call, status, count, last_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (hour, source, who, call, status) DO UPDATE SET count = refused_calls.count + ?6, last_at = ?7",
            )?;
            for (key, count, last) in counts {
                upsert.execute(params![
                    key.hour,
                    key.source,
                    key.who,
                    key.call,
                    key.status,
                    count,
                    sortable(*last)
                ])?;
            }
        }
        tx.execute(
            "DELETE FROM refused_calls WHERE rowid IN (SELECT rowid FROM refused_calls ORDER BY hour DESC, last_at DESC LIMIT -1 OFFSET ?1)",
            [MAX_REFUSED_ROWS],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The newest `limit` counts of refused calls, newest first.
    pub fn refused_calls(&self, limit: u32) -> Result<Vec<RefusedCalls>> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare(
            "SELECT hour, last_at, source, who, call, status, count FROM refused_calls ORDER BY last_at DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(RefusedCalls {
                hour: ts(r, 0)?,
                last_at: ts(r, 1)?,
                source: r.get(2)?,
                who: r.get(3)?,
                call: r.get(4)?,
                status: r.get(5)?,
                count: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<sql::Result<_>>()?)
    }
}

/// A rule's approval terms as they are in a device's policy now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentTerms {
    /// Approvers needed at each level.
    pub levels: Vec<u32>,
    /// Executions one approval allows.
    pub uses: u32,
}

/// The first level (1-based) with fewer approvals than it needs; `0` when
/// every level has its approvers.
fn waiting_level(levels: &[u32], approvals: &[Approval]) -> u32 {
    for (index, needed) in levels.iter().enumerate() {
        let level = index as u32 + 1;
        let given = approvals.iter().filter(|a| a.level == level).count() as u32;
        if given < *needed {
            return level;
        }
    }
    0
}

/// A request row with what only the platform sees.
struct StoredRequest {
    agent_id: String,
    local_id: String,
    request: AdminRequest,
    grant: Option<SignedEnvelope>,
}

impl StoredRequest {
    /// The agent's view.
    fn status(self) -> RequestStatus {
        let approved = self.request.state == RequestState::Approved;
        RequestStatus {
            id: self.request.id,
            local_id: self.local_id,
            state: self.request.state,
            reason: self.request.reason,
            current_level: self.request.current_level,
            levels: self.request.levels.len() as u32,
            updated_at: self.request.updated_at,
            grant: if approved { self.grant } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_named_by_url_or_path_and_other_schemes_are_refused() {
        assert_eq!(
            Database::parse("sqlite:///var/lib/epm/platform.db").unwrap(),
            Database::Sqlite("/var/lib/epm/platform.db".into())
        );
        assert_eq!(
            Database::parse("/srv/platform.db").unwrap(),
            Database::Sqlite("/srv/platform.db".into())
        );
        assert!(matches!(
            Database::parse("postgresql://epm@db/epm").unwrap(),
            Database::Postgres(_)
        ));
        let refused = Database::parse("mysql://root:hunter2@db/epm")
            .unwrap_err()
            .to_string();
        assert!(refused.contains("postgres://"), "{refused}");
        assert!(!refused.contains("hunter2"), "{refused}");
        assert!(Database::parse("sqlite://").is_err());
    }

    #[test]
    fn an_existing_database_gets_roles_by_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("platform.db");
        {
            // A database as the platform wrote it before roles existed.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            for (name, level, at) in [
                ("first", Some(1u32), "2026-01-01T00:00:00Z"),
                ("approver", Some(2), "2026-01-02T00:00:00Z"),
                ("manager", None, "2026-01-03T00:00:00Z"),
                ("minted", Some(u32::MAX), "2026-01-04T00:00:00Z"),
            ] {
                conn.execute(
                    "INSERT INTO admins (name, token_sha256, approver_level, created_at) VALUES (?1, ?2, ?3, ?4)",
                    rusqlite::params![name, secret_hash(name), level, at],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO enroll_tokens (token_sha256, uses_left, expires_at, created_by, created_at) VALUES (?1, 3, '2099-01-01T00:00:00Z', 'first', '2026-01-01T00:00:00Z')",
                [secret_hash("ept_old")],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let roles: Vec<(String, AdminRole, Option<u32>, Vec<String>)> = db
            .admins()
            .unwrap()
            .into_iter()
            .map(|a| (a.name, a.role, a.approver_level, a.endpoint_users))
            .collect();
        assert_eq!(
            roles,
            [
                (
                    "approver".into(),
                    AdminRole::Approver,
                    Some(2),
                    vec!["approver".into()]
                ),
                (
                    "first".into(),
                    AdminRole::Owner,
                    Some(1),
                    vec!["first".into()]
                ),
                (
                    "manager".into(),
                    AdminRole::PolicyAdmin,
                    None,
                    vec!["manager".into()]
                ),
                (
                    "minted".into(),
                    AdminRole::Auditor,
                    None,
                    vec!["minted".into()]
                ),
            ]
        );
        let tokens = db.enroll_tokens().unwrap();
        assert_eq!(tokens.len(), 1);
        assert!(tokens[0].id.starts_with("etk_"), "{:?}", tokens[0]);
        drop(db);
        // Opening again runs nothing twice.
        let again = Db::open(&path).unwrap();
        assert_eq!(again.admins().unwrap().len(), 4);
    }

    #[test]
    fn stored_times_sort_as_text_in_time_order() {
        let whole: Timestamp = "2026-11-22T10:00:59Z".parse().unwrap();
        let later = whole + jiff::SignedDuration::from_millis(500);
        assert!(sortable(whole) < sortable(later));
        assert_eq!(sortable(whole).parse::<Timestamp>().unwrap(), whole);
    }

    #[test]
    fn a_bundle_head_is_read_without_the_envelope_and_trusts_the_signer_only_at_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("platform.db")).unwrap();
        assert_eq!(db.bundle_head("dev-1").unwrap(), None);
        let row = BundleRow {
            version: 3,
            content_sha256: vec![1; 32],
            revision: 7,
            users_sha256: vec![2; 32],
            envelope: r#"{"key":"ed25519:k1"}"#.into(),
            signer: Some("ed25519:k1".into()),
        };
        assert!(db.put_bundle("dev-1", &row, None).unwrap());
        let head = BundleHead {
            version: 3,
            content_sha256: vec![1; 32],
            revision: 7,
            users_sha256: vec![2; 32],
            signer: Some("ed25519:k1".into()),
        };
        assert_eq!(db.bundle_head("dev-1").unwrap(), Some(head.clone()));

        // The head never touches the envelope: one that cannot even be
        // read as text fails the full read, not the head.
        db.conn()
            .unwrap()
            .execute(
                "UPDATE bundles SET envelope = X'ff00fe' WHERE device_id = ?1",
                ["dev-1"],
            )
            .unwrap();
        assert!(db.bundle("dev-1").is_err());
        assert_eq!(db.bundle_head("dev-1").unwrap(), Some(head));

        // An instance that predates the column rewrites the bundle (a new
        // version, the columns left as they were): the signer is unknown,
        // not the previous version's.
        db.conn()
            .unwrap()
            .execute(
                r#"UPDATE bundles SET version = 4, envelope = '{"key":"ed25519:k0"}' WHERE device_id = ?1"#,
                ["dev-1"],
            )
            .unwrap();
        assert_eq!(db.bundle_head("dev-1").unwrap().unwrap().signer, None);
        assert_eq!(db.bundle("dev-1").unwrap().unwrap().signer, None);
        // Recorded for another version: nothing changes.
        db.note_bundle_signer("dev-1", 3, "ed25519:k1").unwrap();
        assert_eq!(db.bundle_head("dev-1").unwrap().unwrap().signer, None);
        db.note_bundle_signer("dev-1", 4, "ed25519:k0").unwrap();
        assert_eq!(
            db.bundle_head("dev-1").unwrap().unwrap().signer.as_deref(),
            Some("ed25519:k0")
        );

        // A bundle stored without a signer (as rows from before the
        // column read) reads as unknown.
        let unsigned = BundleRow {
            version: 5,
            signer: None,
            ..row
        };
        assert!(db.put_bundle("dev-1", &unsigned, Some(4)).unwrap());
        assert_eq!(db.bundle_head("dev-1").unwrap().unwrap().signer, None);
    }

    #[test]
    fn bundles_from_before_the_signer_column_migrate_with_it_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("platform.db");
        {
            // A database as the platform wrote it before the column.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            for migration in &MIGRATIONS[..3] {
                conn.execute_batch(migration).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                r#"INSERT INTO bundles (device_id, version, content_sha256, revision, users_sha256, envelope) VALUES ('dev-1', 2, X'01', 9, X'02', '{"key":"ed25519:k1"}')"#,
                [],
            )
            .unwrap();
        }
        let db = Db::open(&path).unwrap();
        let head = db.bundle_head("dev-1").unwrap().unwrap();
        assert_eq!((head.version, head.revision, head.signer), (2, 9, None));
        let row = db.bundle("dev-1").unwrap().unwrap();
        assert_eq!(
            (row.envelope.as_str(), row.signer),
            (r#"{"key":"ed25519:k1"}"#, None)
        );
    }
}
