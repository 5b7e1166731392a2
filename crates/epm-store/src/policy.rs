//! The policy cache: the active policy and the one before it.

use jiff::Timestamp;
use rusqlite::{OptionalExtension, params};

use crate::Store;
use crate::error::{Result, StoreError, query_err};
use crate::sql::{millis, timestamp, to_i64};

/// A cached policy document.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// The platform's signed envelope (JSON) the document came in, kept so
    /// the signature is checked again at every start: a policy edited in
    /// the database is not enforced. `None` for a local file.
    pub envelope: Option<String>,
    /// When it was fetched or read.
    pub fetched_at: Timestamp,
}

impl Store {
    /// Stores a new active policy; the previous active one becomes last-good,
    /// and the previous last-good is dropped, all in one transaction.
    pub fn save_active_policy(&mut self, policy: &StoredPolicy) -> Result<()> {
        const OP: &str = "save policy";
        let version = to_i64(OP, "policy version", policy.version)?;
        let tx = self.conn.transaction().map_err(query_err(OP))?;
        tx.execute("DELETE FROM policy WHERE slot = 'last_good'", [])
            .map_err(query_err(OP))?;
        tx.execute(
            "UPDATE policy SET slot = 'last_good' WHERE slot = 'active'",
            [],
        )
        .map_err(query_err(OP))?;
        tx.execute(
            "INSERT INTO policy (slot, document, version, etag, signature, source, fetched_at,
                envelope)
             VALUES ('active', ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                policy.document,
                version,
                policy.etag,
                policy.signature,
                policy.source,
                millis(policy.fetched_at),
                policy.envelope
            ],
        )
        .map_err(query_err(OP))?;
        tx.commit().map_err(query_err(OP))
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
                "SELECT document, version, etag, signature, source, fetched_at, envelope
                 FROM policy WHERE slot = ?1",
                [slot],
                |r| {
                    Ok((
                        StoredPolicy {
                            document: r.get(0)?,
                            version: 0,
                            etag: r.get(2)?,
                            signature: r.get(3)?,
                            source: r.get(4)?,
                            fetched_at: timestamp(r, 5)?,
                            envelope: r.get(6)?,
                        },
                        r.get::<_, i64>(1)?,
                    ))
                },
            )
            .optional()
            .map_err(query_err(OP))?;
        row.map(|(policy, version)| {
            let version = u64::try_from(version).map_err(|_| StoreError::Decode {
                operation: OP,
                message: format!("negative policy version {version}"),
            })?;
            Ok(StoredPolicy { version, ..policy })
        })
        .transpose()
    }
}
