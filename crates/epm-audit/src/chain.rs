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
        let details = details.map(|mut details| {
            details.values_mut().for_each(floats_to_strings);
            details
        });
        // Written straight out in canonical form (keys in byte order, as
        // `write_object` sorts them) rather than through a `serde_json` map
        // and a sort, which cost an allocation per key and value on every
        // record: the audit thread seals one record per exec. Every field is
        // visibly here (the destructuring above fails to compile when one is
        // added) and nothing can fail. `hash` sorts between `event` and
        // `mode`: the hashed text is the line without it, so the line is the
        // hashed text with `"hash":"…",` put in at that point. The test
        // `sealing_writes_what_a_canonical_map_would` holds this to the map.
        let mut unsealed = String::with_capacity(640);
        unsealed.push('{');
        field(&mut unsealed, "action", action.as_deref(), true);
        field(&mut unsealed, "decision", decision.as_deref(), false);
        unsealed.push_str(",\"details\":");
        match &details {
            Some(details) => write_object(details, &mut unsealed),
            None => unsealed.push_str("null"),
        }
        field(&mut unsealed, "device_id", device_id.as_deref(), false);
        field(&mut unsealed, "event", Some(event.as_str()), false);
        unsealed.push(',');
        let hash_at = unsealed.len();
        field(&mut unsealed, "mode", mode.as_deref(), true);
        field(&mut unsealed, "path", path.as_deref(), false);
        number(&mut unsealed, "pid", pid.map(u64::from));
        number(&mut unsealed, "policy_version", policy_version);
        number(&mut unsealed, "ppid", ppid.map(u64::from));
        field(
            &mut unsealed,
            "prev_hash",
            Some(self.last_hash.as_str()),
            false,
        );
        field(&mut unsealed, "reason", reason.as_deref(), false);
        field(&mut unsealed, "rule_id", rule_id.as_deref(), false);
        number(&mut unsealed, "seq", Some(seq));
        field(&mut unsealed, "sha256", sha256.as_deref(), false);
        unsealed.push_str(",\"time\":");
        let _ = write_string_to(&time.to_string(), &mut unsealed);
        number(&mut unsealed, "uid", uid.map(u64::from));
        field(&mut unsealed, "user", user.as_deref(), false);
        unsealed.push('}');
        let hash = sha256_hex(&unsealed);
        let mut line = String::with_capacity(unsealed.len() + hash.len() + 10);
        line.push_str(&unsealed[..hash_at]);
        line.push_str("\"hash\":\"");
        line.push_str(&hash);
        line.push_str("\",");
        line.push_str(&unsealed[hash_at..]);
        self.next_seq = seq.saturating_add(1);
        self.last_hash.clone_from(&hash);
        SealedRecord { seq, hash, line }
    }
}

/// Writes `"key":"value"` (or `"key":null`), after a comma unless `first`.
fn field(out: &mut String, key: &str, value: Option<&str>, first: bool) {
    if !first {
        out.push(',');
    }
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
    match value {
        Some(value) => write_string(value, out),
        None => out.push_str("null"),
    }
}

/// Writes `,"key":number` (or `,"key":null`), as serde_json writes an integer.
fn number(out: &mut String, key: &str, value: Option<u64>) {
    use std::fmt::Write as _;
    out.push_str(",\"");
    out.push_str(key);
    out.push_str("\":");
    match value {
        Some(value) => {
            let _ = write!(out, "{value}");
        }
        None => out.push_str("null"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What `seal` wrote before it wrote the text itself: every field into
    /// a map, the map in canonical form without and then with `hash`.
    fn sealed_through_a_map(chain: &Chain, event: AuditEvent, time: jiff::Timestamp) -> String {
        let mut map = Map::new();
        map.insert("seq".into(), Value::from(chain.next_seq()));
        map.insert("time".into(), Value::String(time.to_string()));
        map.insert("event".into(), Value::String(event.event));
        map.insert("decision".into(), event.decision.into());
        map.insert("action".into(), event.action.into());
        map.insert("rule_id".into(), event.rule_id.into());
        map.insert("reason".into(), event.reason.into());
        map.insert("mode".into(), event.mode.into());
        map.insert("pid".into(), event.pid.into());
        map.insert("ppid".into(), event.ppid.into());
        map.insert("uid".into(), event.uid.into());
        map.insert("user".into(), event.user.into());
        map.insert("path".into(), event.path.into());
        map.insert("sha256".into(), event.sha256.into());
        map.insert("device_id".into(), event.device_id.into());
        map.insert("policy_version".into(), event.policy_version.into());
        let details = event.details.map(|mut details| {
            details.values_mut().for_each(floats_to_strings);
            Value::Object(details)
        });
        map.insert("details".into(), details.into());
        map.insert(
            "prev_hash".into(),
            Value::String(chain.last_hash().to_owned()),
        );
        let hash = sha256_hex(&canonical_json(&Value::Object(map.clone())));
        map.insert("hash".into(), Value::String(hash));
        canonical_json(&Value::Object(map))
    }

    #[test]
    fn sealing_writes_what_a_canonical_map_would() {
        let time: jiff::Timestamp = "2026-12-07T05:30:00.123456789Z".parse().unwrap();
        let empty = AuditEvent::new("daemon_started");
        let mut full = AuditEvent::new("exec");
        full.decision = Some("allow".into());
        full.action = Some("allow".into());
        full.rule_id = Some("r-\"quoted\"\\".into());
        full.reason = Some("tabs\tnewlines\ncontrol\u{1}\u{7f} é 𝄞".into());
        full.mode = Some("enforce".into());
        full.pid = Some(u32::MAX);
        full.ppid = Some(0);
        full.uid = Some(1000);
        full.user = Some("alice".into());
        full.path = Some("/usr/bin/true".into());
        full.sha256 = Some("ab".repeat(32));
        full.device_id = Some("lab-7".into());
        full.policy_version = Some(u64::MAX);
        let full = full
            .with_detail("answered_by", "kernel_cache")
            .with_detail("cached", true)
            .with_detail("ratio", 0.1)
            .with_detail(
                "nested",
                serde_json::json!({"b": [1, 2.5, null], "a": {"z": -3}}),
            );
        let mut chain = Chain::resume(41, "f".repeat(64));
        for event in [empty.clone(), full.clone(), empty, full] {
            let expected = sealed_through_a_map(&chain, event.clone(), time);
            let sealed = chain.seal(event, time);
            assert_eq!(sealed.line, expected);
            assert_eq!(
                hash_line(&sealed.line).as_deref(),
                Some(sealed.hash.as_str())
            );
            assert_eq!(chain.last_hash(), sealed.hash);
        }
    }
}
