//! Sealing records into the hash chain.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::record::AuditEvent;

/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A record sealed into the chain, ready to store and write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    /// Its sequence number.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// The exact line to write (no trailing newline).
    pub line: String,
}

/// The chain's state: the next sequence number and the last hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    last_hash: String,
}

impl Chain {
    /// A chain with no records yet.
    pub fn genesis() -> Self {
        Self {
            next_seq: 1,
            last_hash: GENESIS_HASH.to_owned(),
        }
    }

    /// Continues after the record `last_seq` whose hash is `last_hash`.
    pub fn resume(last_seq: u64, last_hash: String) -> Self {
        Self {
            next_seq: last_seq.saturating_add(1),
            last_hash,
        }
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The last sealed record's hash.
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// Seals an event at `time`.
    pub fn seal(&mut self, event: AuditEvent, time: jiff::Timestamp) -> SealedRecord {
        let mut map = match serde_json::to_value(&event) {
            Ok(Value::Object(map)) => map,
            // AuditEvent is a struct of strings and integers: it always
            // serializes to an object. Keep the event name if that ever changes.
            _ => {
                let mut map = Map::new();
                map.insert("event".into(), Value::String(event.event.clone()));
                map
            }
        };
        let seq = self.next_seq;
        map.insert("seq".into(), Value::from(seq));
        map.insert("time".into(), Value::String(time.to_string()));
        map.insert("prev_hash".into(), Value::String(self.last_hash.clone()));
        let hash = hash_canonical(&map);
        map.insert("hash".into(), Value::String(hash.clone()));
        let line = canonical(&map);
        self.next_seq = seq.saturating_add(1);
        self.last_hash = hash.clone();
        SealedRecord { seq, hash, line }
    }
}

/// Compact JSON with sorted keys (serde_json's map is ordered by key).
fn canonical(map: &Map<String, Value>) -> String {
    // Serializing a map of JSON values cannot fail: keys are strings.
    serde_json::to_string(map).unwrap_or_default()
}

/// SHA-256 of a map's canonical JSON, hex.
fn hash_canonical(map: &Map<String, Value>) -> String {
    hex::encode(Sha256::digest(canonical(map).as_bytes()))
}

/// The hash a line should carry: its canonical JSON without `hash`.
/// `None` when the line is not a JSON object.
pub fn hash_line(line: &str) -> Option<String> {
    let Ok(Value::Object(mut map)) = serde_json::from_str::<Value>(line) else {
        return None;
    };
    map.remove("hash");
    Some(hash_canonical(&map))
}
