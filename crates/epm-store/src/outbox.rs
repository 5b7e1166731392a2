//! The audit outbox: every sealed audit record, committed here before it is
//! written to the JSON Lines log, kept until uploaded or pruned.

use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::Store;
use crate::error::{Result, query_err};
use crate::sql::{sql_limit, to_i64};

/// One sealed audit record in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutboxRecord {
    /// Chain sequence number, assigned by the audit chain.
    pub seq: u64,
    /// Chain hash, assigned by the audit chain.
    pub hash: String,
    /// The exact JSON line, without its newline.
    pub line: String,
    /// The user the record is about (its `uid`), when it is about one:
    /// pruning takes from the user with the most records first.
    #[serde(default)]
    pub uid: Option<u32>,
}

/// The outbox's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct OutboxStats {
    /// Records held.
    pub records: u64,
    /// Records not yet uploaded.
    pub pending: u64,
    /// Bytes of record text held (UTF-8 length of the lines).
    pub bytes: u64,
}

/// What pruning the outbox dropped.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Pruned {
    /// Records removed in all.
    pub records: u64,
    /// Of those, records never uploaded: lost to the platform.
    pub not_uploaded: u64,
    /// The records never uploaded, by the user they were about (`None`:
    /// the daemon's own records).
    pub not_uploaded_by_uid: Vec<(Option<u32>, u64)>,
}

/// The running total of `length(line)`: summing a large outbox on every
/// prune would read all of it.
const BYTES_COUNTER: &str = "outbox_bytes";

fn record_from_row(r: &Row<'_>) -> rusqlite::Result<OutboxRecord> {
    Ok(OutboxRecord {
        seq: r.get(0)?,
        hash: r.get(1)?,
        line: r.get(2)?,
        uid: r.get(3)?,
    })
}

impl Store {
    /// Appends sealed records in one transaction: when this returns, the
    /// batch is durable (see the crate docs on `synchronous`). A sequence
    /// number already present fails the whole batch.
    pub fn append_audit(&mut self, records: &[OutboxRecord]) -> Result<()> {
        const OP: &str = "append to audit_outbox";
        let tx = self.conn.transaction().map_err(query_err(OP))?;
        let mut bytes: i64 = 0;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO audit_outbox (seq, hash, line, uid) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(query_err(OP))?;
            for record in records {
                let seq = to_i64(OP, "sequence number", record.seq)?;
                stmt.execute(params![seq, record.hash, record.line, record.uid])
                    .map_err(query_err(OP))?;
                bytes = bytes.saturating_add(i64::try_from(record.line.len()).unwrap_or(i64::MAX));
            }
        }
        add_counter(&tx, BYTES_COUNTER, bytes).map_err(query_err(OP))?;
        tx.commit().map_err(query_err(OP))
    }

    /// The newest record's sequence number and hash: where the chain continues.
    pub fn last_audit(&self) -> Result<Option<(u64, String)>> {
        self.conn
            .query_row(
                "SELECT seq, hash FROM audit_outbox ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(query_err("read last of audit_outbox"))
    }

    /// The oldest record's sequence number: records before it were pruned
    /// (or never existed), so an uploader tells the platform to stop
    /// waiting for them.
    pub fn oldest_audit_seq(&self) -> Result<Option<u64>> {
        self.conn
            .query_row("SELECT MIN(seq) FROM audit_outbox", [], |r| r.get(0))
            .map_err(query_err("read oldest of audit_outbox"))
    }

    /// Records after `seq`, oldest first, at most `limit`.
    pub fn audit_since(&self, seq: u64, limit: usize) -> Result<Vec<OutboxRecord>> {
        // Nothing is stored beyond i64::MAX, so a larger `seq` finds nothing.
        let after = i64::try_from(seq).unwrap_or(i64::MAX);
        self.select_outbox(
            "WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            params![after, sql_limit(limit)],
        )
    }

    /// Records not yet uploaded, oldest first, at most `limit`.
    pub fn pending_upload(&self, limit: usize) -> Result<Vec<OutboxRecord>> {
        self.select_outbox(
            "WHERE uploaded = 0 ORDER BY seq LIMIT ?1",
            params![sql_limit(limit)],
        )
    }

    /// Marks every record up to and including `up_to_seq` as uploaded;
    /// returns how many changed.
    pub fn mark_uploaded(&mut self, up_to_seq: u64) -> Result<u64> {
        let up_to = i64::try_from(up_to_seq).unwrap_or(i64::MAX);
        let changed = self
            .conn
            .execute(
                "UPDATE audit_outbox SET uploaded = 1 WHERE seq <= ?1 AND uploaded = 0",
                [up_to],
            )
            .map_err(query_err("mark audit_outbox uploaded"))?;
        Ok(changed as u64)
    }

    /// Bytes of record text held: what [`Store::prune_audit`] compares
    /// with its budget (one read of a counter, cheap enough per batch).
    pub fn outbox_bytes(&self) -> Result<u64> {
        let bytes = read_counter(&self.conn, BYTES_COUNTER)
            .map_err(query_err("read the audit_outbox size"))?;
        Ok(u64::try_from(bytes).unwrap_or(0))
    }

    /// The outbox's size.
    pub fn outbox_stats(&self) -> Result<OutboxStats> {
        const OP: &str = "audit_outbox stats";
        let (records, pending): (u64, u64) = self
            .conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(uploaded = 0), 0) FROM audit_outbox",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(query_err(OP))?;
        let bytes = read_counter(&self.conn, BYTES_COUNTER).map_err(query_err(OP))?;
        Ok(OutboxStats {
            records,
            pending,
            bytes: u64::try_from(bytes).unwrap_or(0),
        })
    }

    /// Drops records until the outbox's text fits `max_bytes`: uploaded
    /// ones first, oldest first; then records not uploaded, always from the
    /// user who has the most bytes of them waiting (oldest first, down to
    /// the next user's level, then the next), and the daemon's own records
    /// (no uid) last. So a user who floods the audit loses their own
    /// records before anyone else loses one. The caller audits the loss
    /// from [`Pruned::not_uploaded_by_uid`]. The newest record always
    /// stays, as the chain continues from it, so a budget smaller than that
    /// one record is exceeded by it alone.
    pub fn prune_audit(&mut self, max_bytes: u64) -> Result<Pruned> {
        const OP: &str = "prune audit_outbox";
        let budget = i64::try_from(max_bytes).unwrap_or(i64::MAX);
        let tx = self.conn.transaction().map_err(query_err(OP))?;
        let mut excess = read_counter(&tx, BYTES_COUNTER).map_err(query_err(OP))? - budget;
        if excess <= 0 {
            return Ok(Pruned::default());
        }
        let newest: Option<i64> = tx
            .query_row("SELECT MAX(seq) FROM audit_outbox", [], |r| r.get(0))
            .map_err(query_err(OP))?;
        let Some(newest) = newest else {
            return Ok(Pruned::default());
        };
        let mut pruned = Pruned::default();
        let mut freed: i64 = 0;
        // Uploaded records, oldest first: nothing is lost.
        let (count, bytes) = delete_oldest(&tx, Victims::Uploaded, newest, excess)?;
        pruned.records += count;
        freed += bytes;
        excess -= bytes;
        // Records not uploaded: level the users down, heaviest first.
        while excess > 0 {
            let mut heaviest = tx
                .prepare_cached(
                    "SELECT uid, SUM(length(CAST(line AS BLOB))) AS bytes FROM audit_outbox
                     WHERE uploaded = 0 AND seq < ?1
                     GROUP BY uid ORDER BY (uid IS NULL), bytes DESC LIMIT 2",
                )
                .map_err(query_err(OP))?;
            let top: Vec<(Option<i64>, i64)> = heaviest
                .query_map([newest], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(query_err(OP))?
                .collect::<rusqlite::Result<_>>()
                .map_err(query_err(OP))?;
            drop(heaviest);
            let Some(&(uid, uid_bytes)) = top.first() else {
                break;
            };
            // Down to the next user's level (at least one record), or as
            // much as the budget needs, whichever is less.
            let level = match top.get(1) {
                Some(&(Some(_), next)) if uid.is_some() => next,
                _ => 0,
            };
            let want = excess.min((uid_bytes - level).max(1));
            let victims = match uid {
                Some(uid) => Victims::NotUploadedOf(uid),
                None => Victims::NotUploadedDaemon,
            };
            let (count, bytes) = delete_oldest(&tx, victims, newest, want)?;
            if count == 0 {
                break;
            }
            pruned.records += count;
            pruned.not_uploaded += count;
            let uid = uid.and_then(|u| u32::try_from(u).ok());
            match pruned
                .not_uploaded_by_uid
                .iter_mut()
                .find(|(u, _)| *u == uid)
            {
                Some((_, n)) => *n += count,
                None => pruned.not_uploaded_by_uid.push((uid, count)),
            }
            freed += bytes;
            excess -= bytes;
        }
        add_counter(&tx, BYTES_COUNTER, -freed).map_err(query_err(OP))?;
        tx.commit().map_err(query_err(OP))?;
        Ok(pruned)
    }

    fn select_outbox(
        &self,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> Result<Vec<OutboxRecord>> {
        const OP: &str = "read audit_outbox";
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT seq, hash, line, uid FROM audit_outbox {filter}"
            ))
            .map_err(query_err(OP))?;
        let rows = stmt
            .query_map(args, record_from_row)
            .map_err(query_err(OP))?;
        rows.collect::<rusqlite::Result<_>>().map_err(query_err(OP))
    }
}

/// Which records [`delete_oldest`] takes.
#[derive(Debug, Clone, Copy)]
enum Victims {
    Uploaded,
    NotUploadedOf(i64),
    NotUploadedDaemon,
}

/// Deletes the oldest records of `victims` before `newest` until `want`
/// bytes are freed (or none are left); returns how many, and their bytes.
/// Walks an index oldest first and stops as soon as enough is freed, so the
/// victims are one seq range of that kind.
fn delete_oldest(tx: &Connection, victims: Victims, newest: i64, want: i64) -> Result<(u64, i64)> {
    const OP: &str = "prune audit_outbox";
    let filter = match victims {
        Victims::Uploaded => "uploaded = 1",
        Victims::NotUploadedOf(_) => "uploaded = 0 AND uid = ?2",
        Victims::NotUploadedDaemon => "uploaded = 0 AND uid IS NULL",
    };
    let uid = match victims {
        Victims::NotUploadedOf(uid) => Some(uid),
        _ => None,
    };
    let mut last_victim = None;
    let (mut count, mut freed) = (0u64, 0i64);
    {
        let mut scan = tx
            .prepare_cached(&format!(
                "SELECT seq, length(CAST(line AS BLOB)) FROM audit_outbox
                 WHERE {filter} AND seq < ?1 ORDER BY seq"
            ))
            .map_err(query_err(OP))?;
        let mut rows = match uid {
            Some(uid) => scan.query(params![newest, uid]),
            None => scan.query(params![newest]),
        }
        .map_err(query_err(OP))?;
        while freed < want {
            let Some(row) = rows.next().map_err(query_err(OP))? else {
                break;
            };
            let seq: i64 = row.get(0).map_err(query_err(OP))?;
            let len: i64 = row.get(1).map_err(query_err(OP))?;
            freed += len;
            count += 1;
            last_victim = Some(seq);
        }
    }
    if let Some(last) = last_victim {
        let sql = format!("DELETE FROM audit_outbox WHERE {filter} AND seq <= ?1");
        match uid {
            Some(uid) => tx.execute(&sql, params![last, uid]),
            None => tx.execute(&sql, params![last]),
        }
        .map_err(query_err(OP))?;
    }
    Ok((count, freed))
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
