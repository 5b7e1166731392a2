//! Approval requests and their life.

use jiff::Timestamp;
use rusqlite::{OptionalExtension, Row, TransactionBehavior, params};

use crate::error::{Result, StoreError, invalid, query_err};
use crate::grants::{checked_identity, identity_kind};
use crate::sql::{millis, text_enum, timestamp};
use crate::{Store, SubjectIdentity};

text_enum!(
    /// The life of an approval request.
    ///
    /// ```text
    /// pending ──> approved ──> used
    ///    │            ├──────> revoked
    ///    │            ├──────> expired
    ///    │            └──────> cancelled
    ///    ├──> denied
    ///    ├──> expired
    ///    └──> cancelled
    /// ```
    RequestState {
        /// Waiting for approvers.
        Pending = "pending",
        /// Approved; a grant exists.
        Approved = "approved",
        /// Rejected by an approver.
        Denied = "denied",
        /// The window ended before approval or before use.
        Expired = "expired",
        /// Withdrawn by an administrator after approval.
        Revoked = "revoked",
        /// The approved executions were used.
        Used = "used",
        /// Withdrawn by the user.
        Cancelled = "cancelled",
    }
);

impl RequestState {
    /// No state follows this one.
    pub fn is_final(self) -> bool {
        !matches!(self, RequestState::Pending | RequestState::Approved)
    }

    /// Whether a request in this state may move to `next`.
    pub fn can_become(self, next: RequestState) -> bool {
        use RequestState::*;
        matches!(
            (self, next),
            (Pending, Approved | Denied | Expired | Cancelled)
                | (Approved, Used | Revoked | Expired | Cancelled)
        )
    }
}

/// An approval request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// Request id (see [`Store::new_request_id`]).
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

const REQUEST_COLUMNS: &str = "id, uid, user, rule_id, identity_kind, identity, path, \
     justification, window_start, window_end, state, state_reason, platform_id, created_at, \
     updated_at";

fn request_from_row(r: &Row<'_>) -> rusqlite::Result<Request> {
    Ok(Request {
        id: r.get(0)?,
        uid: r.get(1)?,
        user: r.get(2)?,
        rule_id: r.get(3)?,
        identity: SubjectIdentity {
            kind: identity_kind(r, 4)?,
            value: r.get(5)?,
        },
        path: r.get(6)?,
        justification: r.get(7)?,
        window_start: timestamp(r, 8)?,
        window_end: timestamp(r, 9)?,
        state: r.get(10)?,
        state_reason: r.get(11)?,
        platform_id: r.get(12)?,
        created_at: timestamp(r, 13)?,
        updated_at: timestamp(r, 14)?,
    })
}

impl Store {
    /// A fresh request id: a random (version 4) UUID, from SQLite's
    /// generator, which the OS seeds. Ids need to be unique, not secret:
    /// the daemon checks who owns a request before acting on it.
    pub fn new_request_id(&self) -> Result<String> {
        let mut bytes: Vec<u8> = self
            .conn
            .query_row("SELECT randomblob(16)", [], |r| r.get(0))
            .map_err(query_err("new request id"))?;
        bytes.resize(16, 0);
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        ))
    }

    /// Stores a new request; its id must be new.
    pub fn insert_request(&mut self, request: &Request) -> Result<()> {
        const OP: &str = "insert request";
        let identity = checked_identity(&request.identity, OP)?;
        if request.id.is_empty() {
            return Err(invalid(OP, "empty request id".into()));
        }
        if request.window_end <= request.window_start {
            return Err(invalid(
                OP,
                format!(
                    "empty window: start {} is not before end {}",
                    request.window_start, request.window_end
                ),
            ));
        }
        self.conn
            .execute(
                &format!(
                    "INSERT INTO requests ({REQUEST_COLUMNS})
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
                ),
                params![
                    request.id,
                    request.uid,
                    request.user,
                    request.rule_id,
                    request.identity.kind.as_str(),
                    identity,
                    request.path,
                    request.justification,
                    millis(request.window_start),
                    millis(request.window_end),
                    request.state,
                    request.state_reason,
                    request.platform_id,
                    millis(request.created_at),
                    millis(request.updated_at),
                ],
            )
            .map_err(query_err(OP))?;
        Ok(())
    }

    /// One request.
    pub fn request(&self, id: &str) -> Result<Option<Request>> {
        self.conn
            .query_row(
                &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?1"),
                [id],
                request_from_row,
            )
            .optional()
            .map_err(query_err("read requests"))
    }

    /// Requests, newest first: all of them, or only one user's, or only
    /// those in one state, or both.
    pub fn requests(&self, uid: Option<u32>, state: Option<RequestState>) -> Result<Vec<Request>> {
        const OP: &str = "read requests";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {REQUEST_COLUMNS} FROM requests
                 WHERE (?1 IS NULL OR uid = ?1) AND (?2 IS NULL OR state = ?2)
                 ORDER BY created_at DESC, id"
            ))
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(params![uid, state], request_from_row)
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }

    /// Moves a request to `state` if [`RequestState::can_become`] allows it
    /// (otherwise [`StoreError::Transition`], nothing changed); false if
    /// there is no such request. Reaching a final state also ends the
    /// request's grants, in the same transaction: a revoked or cancelled
    /// approval must not keep allowing the binary.
    pub fn set_request_state(
        &mut self,
        id: &str,
        state: RequestState,
        reason: Option<&str>,
        now: Timestamp,
    ) -> Result<bool> {
        const OP: &str = "update request state";
        // Immediate: the state read below cannot change before the write.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(query_err(OP))?;
        let current: Option<RequestState> = tx
            .query_row("SELECT state FROM requests WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(query_err(OP))?;
        let Some(current) = current else {
            return Ok(false);
        };
        if !current.can_become(state) {
            return Err(StoreError::Transition {
                id: id.to_owned(),
                from: current,
                to: state,
            });
        }
        tx.execute(
            "UPDATE requests SET state = ?2, state_reason = ?3, updated_at = ?4 WHERE id = ?1",
            params![id, state, reason, millis(now)],
        )
        .map_err(query_err(OP))?;
        if state.is_final() {
            tx.execute(
                "UPDATE grants SET uses_left = 0 WHERE request_id = ?1 AND uses_left > 0",
                [id],
            )
            .map_err(query_err(OP))?;
        }
        tx.commit().map_err(query_err(OP))?;
        Ok(true)
    }

    /// Moves every pending or approved request whose window has ended at
    /// `now` to expired, ending their grants, in one transaction; returns
    /// their ids, oldest first, for the caller to audit.
    pub fn expire_requests(&mut self, now: Timestamp) -> Result<Vec<String>> {
        const OP: &str = "expire requests";
        let tx = self.conn.transaction().map_err(query_err(OP))?;
        let ids: Vec<String> = {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE requests SET state = 'expired', state_reason = 'window ended',
                        updated_at = ?1
                     WHERE state IN ('pending', 'approved') AND window_end <= ?1
                     RETURNING id, created_at",
                )
                .map_err(query_err(OP))?;
            let mut rows: Vec<(String, i64)> = stmt
                .query_map([millis(now)], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(query_err(OP))?
                .collect::<rusqlite::Result<_>>()
                .map_err(query_err(OP))?;
            rows.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
            rows.into_iter().map(|(id, _)| id).collect()
        };
        for id in &ids {
            tx.execute(
                "UPDATE grants SET uses_left = 0 WHERE request_id = ?1 AND uses_left > 0",
                [id],
            )
            .map_err(query_err(OP))?;
        }
        tx.commit().map_err(query_err(OP))?;
        Ok(ids)
    }

    /// Records the platform's id for a request once it is submitted; false
    /// if there is no such request.
    pub fn set_request_platform_id(
        &mut self,
        id: &str,
        platform_id: &str,
        now: Timestamp,
    ) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE requests SET platform_id = ?2, updated_at = ?3 WHERE id = ?1",
                params![id, platform_id, millis(now)],
            )
            .map_err(query_err("update request platform id"))?;
        Ok(changed > 0)
    }
}
