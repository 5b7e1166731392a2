//! Sealing records into the hash chain, and the canonical JSON the hashes
//! are computed over.

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
    /// The exact line to write, in canonical form (no trailing newline).
    pub line: String,
}

/// The chain's state: the next sequence number and the last hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    next_seq: u64,
    last_hash: String,
}

impl Chain {
    /// A chain with no records yet: the first record gets seq 1 and
    /// [`GENESIS_HASH`] as its `prev_hash`.
    pub fn genesis() -> Self {
        Self {
            next_seq: 1,
            last_hash: GENESIS_HASH.to_owned(),
        }
    }

    /// Continues after the record `last_seq` whose hash is `last_hash`.
    pub fn resume(last_seq: u64, last_hash: impl Into<String>) -> Self {
        Self {
            next_seq: last_seq.saturating_add(1),
            last_hash: last_hash.into(),
        }
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The last sealed record's hash ([`GENESIS_HASH`] before the first).
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// Seals an event at `time`: gives it the next seq, links it to the
    /// previous record and hashes it.
    pub fn seal(&mut self, event: AuditEvent, time: jiff::Timestamp) -> SealedRecord {
        let AuditEvent {
            event,
            decision,
            action,
            rule_id,
            reason,
            mode,
            pid,
            ppid,
            uid,
            user,
            path,
            sha256,
            device_id,
            policy_version,
            details,
        } = event;
        let seq = self.next_seq;
        // Built by hand rather than through serde so that every field is
        // visibly here (the destructuring above fails to compile when one
        // is added) and nothing can fail.
        let mut map = Map::new();
        map.insert("seq".into(), Value::from(seq));
        map.insert("time".into(), Value::String(time.to_string()));
        map.insert("event".into(), Value::String(event));
        map.insert("decision".into(), decision.into());
        map.insert("action".into(), action.into());
        map.insert("rule_id".into(), rule_id.into());
        map.insert("reason".into(), reason.into());
        map.insert("mode".into(), mode.into());
        map.insert("pid".into(), pid.into());
        map.insert("ppid".into(), ppid.into());
        map.insert("uid".into(), uid.into());
        map.insert("user".into(), user.into());
        map.insert("path".into(), path.into());
        map.insert("sha256".into(), sha256.into());
        map.insert("device_id".into(), device_id.into());
        map.insert("policy_version".into(), policy_version.into());
        let details = details.map(|mut details| {
            details.values_mut().for_each(floats_to_strings);
            Value::Object(details)
        });
        map.insert("details".into(), details.into());
        map.insert("prev_hash".into(), Value::String(self.last_hash.clone()));
        // `map` has no `hash` key yet: its canonical text is what is hashed.
        let mut unsealed = String::new();
        write_object(&map, &mut unsealed);
        let hash = sha256_hex(&unsealed);
        map.insert("hash".into(), Value::String(hash.clone()));
        let mut line = String::new();
        write_object(&map, &mut line);
        self.next_seq = seq.saturating_add(1);
        self.last_hash = hash.clone();
        SealedRecord { seq, hash, line }
    }
}

/// Replaces floating-point numbers with their text: a float's JSON text
/// does not always parse back to the same text, and verification
/// re-serializes what it parses.
fn floats_to_strings(value: &mut Value) {
    match value {
        Value::Number(n) if !(n.is_i64() || n.is_u64()) => {
            *value = Value::String(n.to_string());
        }
        Value::Array(items) => items.iter_mut().for_each(floats_to_strings),
        Value::Object(map) => map.values_mut().for_each(floats_to_strings),
        _ => {}
    }
}

/// The canonical JSON text of a value: compact, object keys sorted by
/// their UTF-8 bytes, strings escaped exactly as serde_json escapes them.
///
/// Written out here rather than left to `serde_json::to_string` so that the
/// hashed bytes do not depend on a cargo feature (`preserve_order` keeps
/// insertion order) that any crate in a build can switch on.
pub(crate) fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(map, out),
    }
}

fn write_object(map: &Map<String, Value>, out: &mut String) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push('{');
    for (i, (key, item)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_string(key, out);
        out.push(':');
        write_canonical(item, out);
    }
    out.push('}');
}

/// A JSON string as serde_json writes it: `"` and `\` escaped, the control
/// characters U+0000..U+001F as `\b \t \n \f \r` or `\u00xx` (lowercase),
/// everything else (DEL and non-ASCII included) as raw UTF-8.
fn write_string(s: &str, out: &mut String) {
    let _ = write_string_to(s, out);
}

/// [`write_string`] to any writer (a hasher, say): never fails but for
/// the writer.
pub(crate) fn write_string_to(s: &str, out: &mut impl std::fmt::Write) -> std::fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            '\u{8}' => out.write_str("\\b")?,
            '\t' => out.write_str("\\t")?,
            '\n' => out.write_str("\\n")?,
            '\u{c}' => out.write_str("\\f")?,
            '\r' => out.write_str("\\r")?,
            c if (c as u32) < 0x20 => {
                let byte = c as u32 as usize;
                out.write_str("\\u00")?;
                out.write_char(char::from(HEX[byte >> 4]))?;
                out.write_char(char::from(HEX[byte & 0xf]))?;
            }
            c => out.write_char(c)?,
        }
    }
    out.write_char('"')
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The hash a parsed record should carry: SHA-256 of its canonical JSON
/// without the `hash` key (which it removes).
pub(crate) fn hash_record(mut record: Map<String, Value>) -> String {
    record.remove("hash");
    let mut text = String::new();
    write_object(&record, &mut text);
    sha256_hex(&text)
}

/// The hash a line should carry: SHA-256 of its canonical JSON without
/// `hash`. `None` when the line is not a JSON object.
pub fn hash_line(line: &str) -> Option<String> {
    match serde_json::from_str::<Value>(line).ok()? {
        Value::Object(record) => Some(hash_record(record)),
        _ => None,
    }
}
