//! Time-boxed admin sessions: membership of an admin group, and its end.

use jiff::Timestamp;
use rusqlite::{Row, params};

use crate::Store;
use crate::error::{Result, invalid, query_err};
use crate::sql::{millis, optional_timestamp, timestamp};

/// A time-boxed admin session to be stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The policy entry that allowed it.
    #[serde(default)]
    pub rule_id: Option<String>,
    /// The sudoers files when it started (the daemon's JSON), so a change
    /// made during the session is found even after a restart.
    #[serde(default)]
    pub sudoers_baseline: Option<String>,
}

/// A stored admin session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

const SESSION_COLUMNS: &str = "id, uid, user, group_name, was_member_before, reason, \
     started_at, expires_at, revoked_at, revoke_reason, rule_id, sudoers_baseline";

fn session_from_row(r: &Row<'_>) -> rusqlite::Result<AdminSession> {
    Ok(AdminSession {
        id: r.get(0)?,
        session: NewAdminSession {
            uid: r.get(1)?,
            user: r.get(2)?,
            group: r.get(3)?,
            was_member_before: r.get(4)?,
            reason: r.get(5)?,
            started_at: timestamp(r, 6)?,
            expires_at: timestamp(r, 7)?,
            rule_id: r.get(10)?,
            sudoers_baseline: r.get(11)?,
        },
        revoked_at: optional_timestamp(r, 8)?,
        revoke_reason: r.get(9)?,
    })
}

impl Store {
    /// Stores a new admin session. Store it before the user is added to the
    /// group: then a crash right after the change still leaves a session
    /// for the expiry sweep to end.
    pub fn insert_admin_session(&mut self, session: &NewAdminSession) -> Result<i64> {
        const OP: &str = "insert admin session";
        if session.expires_at <= session.started_at {
            return Err(invalid(
                OP,
                format!(
                    "expiry {} is not after start {}",
                    session.expires_at, session.started_at
                ),
            ));
        }
        self.conn
            .execute(
                "INSERT INTO admin_sessions (uid, user, group_name, was_member_before, reason,
                    started_at, expires_at, rule_id, sudoers_baseline)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    session.uid,
                    session.user,
                    session.group,
                    session.was_member_before,
                    session.reason,
                    millis(session.started_at),
                    millis(session.expires_at),
                    session.rule_id,
                    session.sudoers_baseline,
                ],
            )
            .map_err(query_err(OP))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// One session, revoked or not.
    pub fn admin_session(&self, id: i64) -> Result<Option<AdminSession>> {
        Ok(self.select_sessions("WHERE id = ?1", [id])?.pop())
    }

    /// Sessions not yet revoked, soonest expiry first (including expired
    /// ones the sweep has not ended yet).
    pub fn active_admin_sessions(&self) -> Result<Vec<AdminSession>> {
        self.select_sessions(
            "WHERE revoked_at IS NULL ORDER BY expires_at, id",
            params![],
        )
    }

    /// Sessions not yet revoked whose expiry is at or before `now`.
    pub fn expired_admin_sessions(&self, now: Timestamp) -> Result<Vec<AdminSession>> {
        self.select_sessions(
            "WHERE revoked_at IS NULL AND expires_at <= ?1 ORDER BY expires_at, id",
            params![millis(now)],
        )
    }

    /// Marks a session revoked; false if it was already revoked or unknown,
    /// so two sweeps racing to end it both learn which one did.
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

    /// The latest sessions of everyone, ended or not, newest first.
    pub fn recent_admin_sessions(&self, limit: u32) -> Result<Vec<AdminSession>> {
        self.select_sessions("ORDER BY id DESC LIMIT ?1", params![limit])
    }

    fn select_sessions(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<AdminSession>> {
        const OP: &str = "read admin sessions";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM admin_sessions {filter}"
            ))
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(args, session_from_row)
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }
}
