//! Offline approval challenges: what `epmctl request --offline` showed the
//! user, kept until a code answers it, then marked used so that the same
//! code never works twice.

use jiff::Timestamp;
use rusqlite::{Row, params};

use crate::Store;
use crate::error::{Result, invalid, query_err};
use crate::sql::{millis, timestamp};

/// A challenge as stored: the daemon keeps the exact text it showed, so
/// the code is checked against what the admin saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineChallengeRecord {
    /// The challenge's nonce (decimal), unique.
    pub nonce: String,
    /// The user it was shown to: only their code answers it.
    pub uid: u32,
    /// The challenge, encoded as shown (`EPM1-…`).
    pub challenge: String,
    /// The end of the window it asks for: after this it answers nothing.
    pub not_after: Timestamp,
    /// When it was made.
    pub created_at: Timestamp,
}

fn record_from_row(r: &Row<'_>) -> rusqlite::Result<OfflineChallengeRecord> {
    Ok(OfflineChallengeRecord {
        nonce: r.get(0)?,
        uid: r.get(1)?,
        challenge: r.get(2)?,
        not_after: timestamp(r, 3)?,
        created_at: timestamp(r, 4)?,
    })
}

impl Store {
    /// Keeps a challenge until it is answered or its window ends.
    pub fn insert_offline_challenge(&mut self, record: &OfflineChallengeRecord) -> Result<()> {
        const OP: &str = "insert offline challenge";
        if record.nonce.is_empty() || record.challenge.is_empty() {
            return Err(invalid(OP, "empty nonce or challenge".into()));
        }
        self.conn
            .execute(
                "INSERT INTO offline_challenges (nonce, uid, challenge, not_after, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    record.nonce,
                    record.uid,
                    record.challenge,
                    millis(record.not_after),
                    millis(record.created_at)
                ],
            )
            .map_err(query_err(OP))?;
        Ok(())
    }

    /// A user's challenges not yet answered whose window has not ended at
    /// `now`, newest first.
    pub fn open_offline_challenges(
        &self,
        uid: u32,
        now: Timestamp,
    ) -> Result<Vec<OfflineChallengeRecord>> {
        const OP: &str = "read offline challenges";
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT nonce, uid, challenge, not_after, created_at FROM offline_challenges
                 WHERE uid = ?1 AND used_at IS NULL AND not_after > ?2
                 ORDER BY created_at DESC, nonce",
            )
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(params![uid, millis(now)], record_from_row)
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }

    /// Marks a challenge answered; false when it already was (or does not
    /// exist): the caller must then refuse the code. One statement, so two
    /// callers racing with the same code cannot both win.
    pub fn use_offline_challenge(&mut self, nonce: &str, now: Timestamp) -> Result<bool> {
        let changed = self
            .conn
            .execute(
                "UPDATE offline_challenges SET used_at = ?2 WHERE nonce = ?1 AND used_at IS NULL",
                params![nonce, millis(now)],
            )
            .map_err(query_err("use offline challenge"))?;
        Ok(changed > 0)
    }
}
