//! Grants: permission for one user to run one binary, by content identity,
//! inside a window, a number of times.

pub use epm_policy::identity::{IdentityKind, SubjectIdentity};
use jiff::Timestamp;
use rusqlite::types::Type;
use rusqlite::{OptionalExtension, Row, params};

use crate::Store;
use crate::error::{Result, invalid, query_err};
use crate::sql::{millis, text_enum, timestamp};

/// The `identity_kind` column as epm-policy's [`IdentityKind`] (a foreign
/// type, so read here rather than through `FromSql`).
pub(crate) fn identity_kind(r: &Row<'_>, index: usize) -> rusqlite::Result<IdentityKind> {
    let text: String = r.get(index)?;
    text.parse().map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(index, Type::Text, Box::new(error))
    })
}

/// The identity's value in lowercase, checked to be a value of its kind.
pub(crate) fn checked_identity(
    identity: &SubjectIdentity,
    operation: &'static str,
) -> Result<String> {
    identity
        .checked_value()
        .map_err(|problem| invalid(operation, problem.to_string()))
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

/// A grant to be stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NewGrant {
    /// The user it is for.
    pub uid: u32,
    /// That user's name, for display.
    pub user: String,
    /// The binary it allows.
    pub identity: SubjectIdentity,
    /// The rule that asked for it.
    pub rule_id: String,
    /// Valid from (inclusive).
    pub not_before: Timestamp,
    /// Valid until (exclusive).
    pub not_after: Timestamp,
    /// How many executions it allows; in a stored [`Grant`], how many are left.
    pub uses: u32,
    /// Where it came from.
    pub source: GrantSource,
    /// The request it answers, for approvals.
    pub request_id: Option<String>,
    /// The user's justification.
    pub justification: Option<String>,
    /// The program's path when granted, for display only: the identity
    /// decides.
    #[serde(default)]
    pub path: Option<String>,
}

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    /// Row id.
    pub id: i64,
    /// Everything it was created with; `uses` is the count left.
    pub grant: NewGrant,
    /// When it was stored.
    pub created_at: Timestamp,
}

const GRANT_COLUMNS: &str = "id, uid, user, identity_kind, identity, rule_id, not_before, \
     not_after, uses_left, source, request_id, justification, created_at, path";

fn grant_from_row(r: &Row<'_>) -> rusqlite::Result<Grant> {
    Ok(Grant {
        id: r.get(0)?,
        grant: NewGrant {
            uid: r.get(1)?,
            user: r.get(2)?,
            identity: SubjectIdentity {
                kind: identity_kind(r, 3)?,
                value: r.get(4)?,
            },
            rule_id: r.get(5)?,
            not_before: timestamp(r, 6)?,
            not_after: timestamp(r, 7)?,
            uses: r.get(8)?,
            source: r.get(9)?,
            request_id: r.get(10)?,
            justification: r.get(11)?,
            path: r.get(13)?,
        },
        created_at: timestamp(r, 12)?,
    })
}

impl Store {
    /// Stores a grant and returns its id. The identity must be a digest of
    /// its kind, the window must not be empty, and it must allow a use.
    pub fn insert_grant(&mut self, grant: &NewGrant) -> Result<i64> {
        const OP: &str = "insert grant";
        let identity = checked_identity(&grant.identity, OP)?;
        if grant.not_after <= grant.not_before {
            return Err(invalid(
                OP,
                format!(
                    "empty window: not_before {} is not before not_after {}",
                    grant.not_before, grant.not_after
                ),
            ));
        }
        if grant.uses == 0 {
            return Err(invalid(OP, "a grant must allow at least one use".into()));
        }
        self.conn
            .execute(
                "INSERT INTO grants (uid, user, identity_kind, identity, rule_id, not_before,
                    not_after, uses_left, source, request_id, justification, created_at, path)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    grant.uid,
                    grant.user,
                    grant.identity.kind.as_str(),
                    identity,
                    grant.rule_id,
                    millis(grant.not_before),
                    millis(grant.not_after),
                    grant.uses,
                    grant.source,
                    grant.request_id,
                    grant.justification,
                    millis(Timestamp::now()),
                    grant.path,
                ],
            )
            .map_err(query_err(OP))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// One grant, used up or not.
    pub fn grant(&self, id: i64) -> Result<Option<Grant>> {
        const OP: &str = "read grants";
        self.conn
            .query_row(
                &format!("SELECT {GRANT_COLUMNS} FROM grants WHERE id = ?1"),
                [id],
                grant_from_row,
            )
            .optional()
            .map_err(query_err(OP))
    }

    /// Every user's grants that still have uses left and have not ended at
    /// `now`, soonest first (for administrators).
    pub fn all_current_grants(&self, now: Timestamp) -> Result<Vec<Grant>> {
        const OP: &str = "read grants";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {GRANT_COLUMNS} FROM grants
                 WHERE uses_left > 0 AND not_after > ?1
                 ORDER BY not_before, id"
            ))
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(params![millis(now)], grant_from_row)
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }

    /// A user's grants that still have uses left and have not ended at `now`
    /// (including ones whose window has not started yet), soonest first.
    pub fn grants_for(&self, uid: u32, now: Timestamp) -> Result<Vec<Grant>> {
        const OP: &str = "read grants";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {GRANT_COLUMNS} FROM grants
                 WHERE uid = ?1 AND uses_left > 0 AND not_after > ?2
                 ORDER BY not_before, id"
            ))
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(params![uid, millis(now)], grant_from_row)
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }

    /// Uses one execution of a grant for this user, binary and rule that is
    /// valid at `now`, in one SQL statement. Of several, the one ending
    /// soonest is used. The returned grant's `uses` is what is left after
    /// this use: 0 means this was the last, and the grant never matches
    /// again. The rule binds too: a grant answers the rule that asked for
    /// it, not another rule that happens to match the same binary later.
    pub fn consume_grant(
        &mut self,
        uid: u32,
        identity: &SubjectIdentity,
        rule_id: &str,
        now: Timestamp,
    ) -> Result<Option<Grant>> {
        const OP: &str = "consume grant";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "UPDATE grants SET uses_left = uses_left - 1
                 WHERE id = (
                    SELECT id FROM grants
                    WHERE uid = ?1 AND identity_kind = ?2 AND identity = ?3 AND rule_id = ?5
                      AND uses_left > 0 AND not_before <= ?4 AND not_after > ?4
                    ORDER BY not_after, id LIMIT 1)
                 RETURNING {GRANT_COLUMNS}"
            ))
            .map_err(query_err(OP))?;
        stmt.query_row(
            params![
                uid,
                identity.kind.as_str(),
                identity.value.to_ascii_lowercase(),
                millis(now),
                rule_id
            ],
            grant_from_row,
        )
        .optional()
        .map_err(query_err(OP))
    }

    /// A user's grants for one binary, newest first, used up or not, at
    /// most `limit`: what explains why an exec was refused ("approved, but
    /// the window has not started").
    pub fn grants_for_identity(
        &self,
        uid: u32,
        identity: &SubjectIdentity,
        limit: usize,
    ) -> Result<Vec<Grant>> {
        const OP: &str = "read grants";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {GRANT_COLUMNS} FROM grants
                 WHERE uid = ?1 AND identity_kind = ?2 AND identity = ?3
                 ORDER BY created_at DESC, id DESC LIMIT ?4"
            ))
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(
                params![
                    uid,
                    identity.kind.as_str(),
                    identity.value.to_ascii_lowercase(),
                    limit as i64
                ],
                grant_from_row,
            )
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }

    /// Ends a grant now by taking its remaining uses; false if it had none
    /// left or does not exist. The row stays, for the record.
    pub fn end_grant(&mut self, id: i64) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE grants SET uses_left = 0 WHERE id = ?1 AND uses_left > 0",
                [id],
            )
            .map_err(query_err("end grant"))?;
        Ok(changed > 0)
    }
}
