//! Versioned migrations, tracked in `PRAGMA user_version`.
//!
//! Migrations are append-only: a released one is never edited, a change is a
//! new entry. A database newer than this code is refused, never downgraded.

use rusqlite::Connection;

/// Migration `i` takes the schema from version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
     CREATE TABLE policy (
        slot TEXT PRIMARY KEY CHECK (slot IN ('active', 'last_good')),
        document TEXT NOT NULL,
        version INTEGER NOT NULL,
        etag TEXT,
        signature TEXT,
        source TEXT NOT NULL,
        fetched_at INTEGER NOT NULL
     );
     CREATE TABLE grants (
        id INTEGER PRIMARY KEY,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        identity_kind TEXT NOT NULL CHECK (identity_kind IN ('sha256', 'cdhash')),
        identity TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
        source TEXT NOT NULL CHECK (source IN ('justification', 'approval', 'offline_code')),
        request_id TEXT,
        justification TEXT,
        created_at INTEGER NOT NULL
     );
     CREATE INDEX grants_lookup ON grants (uid, identity_kind, identity);
     CREATE TABLE requests (
        id TEXT PRIMARY KEY,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        identity_kind TEXT NOT NULL CHECK (identity_kind IN ('sha256', 'cdhash')),
        identity TEXT NOT NULL,
        path TEXT NOT NULL,
        justification TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        window_end INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pending', 'approved', 'denied', 'expired', 'revoked', 'used', 'cancelled')),
        state_reason TEXT,
        platform_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
     );
     CREATE INDEX requests_by_uid ON requests (uid, state);
     CREATE TABLE admin_sessions (
        id INTEGER PRIMARY KEY,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        group_name TEXT NOT NULL,
        was_member_before INTEGER NOT NULL,
        reason TEXT,
        started_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER,
        revoke_reason TEXT
     );
     CREATE INDEX admin_sessions_open ON admin_sessions (revoked_at, expires_at);
     CREATE TABLE audit_outbox (
        seq INTEGER PRIMARY KEY,
        hash TEXT NOT NULL,
        line TEXT NOT NULL,
        uploaded INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX audit_pending ON audit_outbox (uploaded, seq);",
    // 2: the platform's signed envelope beside its policy, re-verified at start.
    "ALTER TABLE policy ADD COLUMN envelope TEXT;",
    // 3: offline approval challenges, each answerable once; the path a
    // grant was made for, for display.
    "ALTER TABLE grants ADD COLUMN path TEXT;
     CREATE TABLE offline_challenges (
        nonce TEXT PRIMARY KEY,
        uid INTEGER NOT NULL,
        challenge TEXT NOT NULL,
        not_after INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        used_at INTEGER
     );
     CREATE INDEX offline_challenges_open ON offline_challenges (uid, used_at);",
    // 4: grants and requests for admin sessions (identity kind
    // admin_session: the minutes asked for); SQLite cannot change a CHECK,
    // so both tables are rebuilt with their rows. Sessions remember the
    // rule that allowed them and the sudoers files at their start.
    "CREATE TABLE grants_v4 (
        id INTEGER PRIMARY KEY,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        identity_kind TEXT NOT NULL CHECK (identity_kind IN ('sha256', 'cdhash', 'admin_session')),
        identity TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        not_before INTEGER NOT NULL,
        not_after INTEGER NOT NULL,
        uses_left INTEGER NOT NULL CHECK (uses_left >= 0),
        source TEXT NOT NULL CHECK (source IN ('justification', 'approval', 'offline_code')),
        request_id TEXT,
        justification TEXT,
        created_at INTEGER NOT NULL,
        path TEXT
     );
     INSERT INTO grants_v4 (id, uid, user, identity_kind, identity, rule_id, not_before,
        not_after, uses_left, source, request_id, justification, created_at, path)
        SELECT id, uid, user, identity_kind, identity, rule_id, not_before,
        not_after, uses_left, source, request_id, justification, created_at, path FROM grants;
     DROP TABLE grants;
     ALTER TABLE grants_v4 RENAME TO grants;
     CREATE INDEX grants_lookup ON grants (uid, identity_kind, identity);
     CREATE TABLE requests_v4 (
        id TEXT PRIMARY KEY,
        uid INTEGER NOT NULL,
        user TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        identity_kind TEXT NOT NULL CHECK (identity_kind IN ('sha256', 'cdhash', 'admin_session')),
        identity TEXT NOT NULL,
        path TEXT NOT NULL,
        justification TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        window_end INTEGER NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('pending', 'approved', 'denied', 'expired', 'revoked', 'used', 'cancelled')),
        state_reason TEXT,
        platform_id TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
     );
     INSERT INTO requests_v4 SELECT id, uid, user, rule_id, identity_kind, identity, path,
        justification, window_start, window_end, state, state_reason, platform_id,
        created_at, updated_at FROM requests;
     DROP TABLE requests;
     ALTER TABLE requests_v4 RENAME TO requests;
     CREATE INDEX requests_by_uid ON requests (uid, state);
     ALTER TABLE admin_sessions ADD COLUMN rule_id TEXT;
     ALTER TABLE admin_sessions ADD COLUMN sudoers_baseline TEXT;",
    // 5: whose audit record each is, so that pruning an outbox over its
    // budget takes the records of the user who filled it, not everyone's.
    // No index: pruning is rare, and walks the pending records in order
    // anyway, while every record written would pay for one.
    "ALTER TABLE audit_outbox ADD COLUMN uid INTEGER;",
];

/// The schema version this code writes.
pub(crate) const CURRENT: i64 = MIGRATIONS.len() as i64;

pub(crate) enum MigrateError {
    Newer { found: i64, supported: i64 },
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sql(e)
    }
}

/// Brings the database to [`CURRENT`], each step in its own transaction.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), MigrateError> {
    migrate_with(conn, MIGRATIONS)
}

/// Applies `migrations[found..]`; a step that fails leaves the database at
/// the version before it, so the next start retries from there.
pub(crate) fn migrate_with(conn: &mut Connection, migrations: &[&str]) -> Result<(), MigrateError> {
    let supported = migrations.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > supported {
        return Err(MigrateError::Newer { found, supported });
    }
    for (index, sql) in migrations.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
