//! Keeping a record's size bounded whatever its fields hold.
//!
//! Much of a record comes from users: paths they chose, arguments of up to
//! the control protocol's frame size, justifications, names. A record keeps
//! at most [`MAX_STRING_BYTES`] of any one string and [`MAX_VALUE_BYTES`] of
//! any array or object in `details`. What is cut is named in
//! `details.truncated`: for each cut field (`path`, `reason`, or the detail
//! key, such as `argv`), the full value's length in bytes and its SHA-256
//! (of the string's UTF-8 bytes; of an array's or object's canonical JSON,
//! see the crate documentation), so the full value can still be matched
//! against a copy kept elsewhere.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::chain::canonical_json;
use crate::record::AuditEvent;

/// Most bytes kept of one string (a Linux path is at most 4096 bytes, plus
/// the kernel's " (deleted)").
pub const MAX_STRING_BYTES: usize = 8 * 1024;
/// Most bytes kept of one array or object in `details`, counting its
/// strings and keys.
pub const MAX_VALUE_BYTES: usize = 32 * 1024;
/// Most elements kept of one array or object in `details`.
pub const MAX_VALUE_ITEMS: usize = 512;
/// What ends a cut string.
const ELLIPSIS: &str = "…";

/// A field that was cut: how long it was and its digest.
fn truncation_note(bytes: usize, digest: [u8; 32]) -> Value {
    let mut note = Map::new();
    note.insert("bytes".into(), Value::from(bytes as u64));
    note.insert("sha256".into(), Value::String(hex::encode(digest)));
    Value::Object(note)
}

/// `text` cut to at most `max` bytes on a character boundary, ending in an
/// ellipsis; `None` when it fits.
fn cut_string(text: &str, max: usize) -> Option<String> {
    if text.len() <= max {
        return None;
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}{ELLIPSIS}", &text[..end]))
}

/// Bytes a value's text takes, about (for budgets, not for storage).
fn approx_value_bytes(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => {
            2 + items
                .iter()
                .map(|v| approx_value_bytes(v) + 1)
                .sum::<usize>()
        }
        Value::Object(map) => {
            2 + map
                .iter()
                .map(|(k, v)| k.len() + 4 + approx_value_bytes(v))
                .sum::<usize>()
        }
    }
}

/// Cuts `value` to fit `budget` bytes: strings to [`MAX_STRING_BYTES`]
/// (and the budget), arrays and objects to the elements that fit. Returns
/// whether anything was cut.
fn cut_value(value: &mut Value, budget: usize) -> bool {
    match value {
        Value::String(text) => match cut_string(text, budget.min(MAX_STRING_BYTES)) {
            Some(cut) => {
                *text = cut;
                true
            }
            None => false,
        },
        Value::Array(items) => {
            let mut cut = items.len() > MAX_VALUE_ITEMS;
            items.truncate(MAX_VALUE_ITEMS);
            let mut left = budget.saturating_sub(2);
            let mut keep = items.len();
            for (index, item) in items.iter_mut().enumerate() {
                cut |= cut_value(item, left);
                let used = approx_value_bytes(item) + 1;
                if used > left {
                    keep = index;
                    cut = true;
                    break;
                }
                left -= used;
            }
            items.truncate(keep);
            cut
        }
        Value::Object(map) => {
            let mut cut = false;
            let mut left = budget.saturating_sub(2);
            let mut kept = Map::new();
            for (index, (key, mut item)) in std::mem::take(map).into_iter().enumerate() {
                if index >= MAX_VALUE_ITEMS || key.len() > MAX_STRING_BYTES {
                    cut = true;
                    continue;
                }
                cut |= cut_value(&mut item, left.saturating_sub(key.len() + 4));
                let used = key.len() + 4 + approx_value_bytes(&item);
                if used > left {
                    cut = true;
                    break;
                }
                left -= used;
                kept.insert(key, item);
            }
            *map = kept;
            cut
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Hashes text as it is written, and counts it.
struct Digesting {
    hasher: Sha256,
    bytes: usize,
}

impl std::fmt::Write for Digesting {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.hasher.update(s.as_bytes());
        self.bytes += s.len();
        Ok(())
    }
}

impl AuditEvent {
    /// Adds `key` to `details`: the strings `items` (a command's arguments,
    /// say) as [`AuditEvent::bound`] would keep them, without ever copying
    /// what is left out, so a list of any size costs only its kept part. A
    /// cut is noted in `details.truncated` as `bound` notes it.
    pub fn with_string_list(self, key: &str, items: &[String]) -> Self {
        let mut kept = Vec::new();
        let mut left = MAX_VALUE_BYTES.saturating_sub(2);
        let mut cut = items.len() > MAX_VALUE_ITEMS;
        for item in items.iter().take(MAX_VALUE_ITEMS) {
            let text = match cut_string(item, left.min(MAX_STRING_BYTES)) {
                Some(shorter) => {
                    cut = true;
                    shorter
                }
                None => item.clone(),
            };
            // As `approx_value_bytes` counts it, in an array.
            let used = text.len() + 3;
            if used > left {
                cut = true;
                break;
            }
            left -= used;
            kept.push(text);
        }
        let mut event = self.with_detail(key, kept);
        if cut {
            let mut digest = Digesting {
                hasher: Sha256::new(),
                bytes: 0,
            };
            let _ = std::fmt::Write::write_char(&mut digest, '[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    let _ = std::fmt::Write::write_char(&mut digest, ',');
                }
                let _ = crate::chain::write_string_to(item, &mut digest);
            }
            let _ = std::fmt::Write::write_char(&mut digest, ']');
            let note = truncation_note(digest.bytes, digest.hasher.finalize().into());
            let details = event.details.get_or_insert_with(Default::default);
            match details.get_mut("truncated") {
                Some(Value::Object(notes)) => {
                    notes.insert(key.to_owned(), note);
                }
                _ => {
                    let mut notes = Map::new();
                    notes.insert(key.to_owned(), note);
                    details.insert("truncated".into(), Value::Object(notes));
                }
            }
        }
        event
    }

    /// Cuts every string to [`MAX_STRING_BYTES`] and every array or object
    /// in `details` to [`MAX_VALUE_BYTES`], noting each cut in
    /// `details.truncated` (see the module documentation). Returns whether
    /// anything was cut. Idempotent: a bounded record stays as it is.
    pub fn bound(&mut self) -> bool {
        let mut notes = Map::new();
        let fields: [(&str, &mut Option<String>); 9] = [
            ("decision", &mut self.decision),
            ("action", &mut self.action),
            ("rule_id", &mut self.rule_id),
            ("reason", &mut self.reason),
            ("mode", &mut self.mode),
            ("user", &mut self.user),
            ("path", &mut self.path),
            ("sha256", &mut self.sha256),
            ("device_id", &mut self.device_id),
        ];
        for (name, field) in fields {
            if let Some(text) = field
                && let Some(cut) = cut_string(text, MAX_STRING_BYTES)
            {
                notes.insert(
                    name.to_owned(),
                    truncation_note(text.len(), Sha256::digest(text.as_bytes()).into()),
                );
                *text = cut;
            }
        }
        if let Some(cut) = cut_string(&self.event, MAX_STRING_BYTES) {
            notes.insert(
                "event".to_owned(),
                truncation_note(
                    self.event.len(),
                    Sha256::digest(self.event.as_bytes()).into(),
                ),
            );
            self.event = cut;
        }
        if let Some(details) = &mut self.details {
            for (key, value) in details.iter_mut() {
                if key == "truncated" {
                    continue;
                }
                let note = match value {
                    Value::String(text) if text.len() > MAX_STRING_BYTES => Some(truncation_note(
                        text.len(),
                        Sha256::digest(text.as_bytes()).into(),
                    )),
                    Value::Array(_) | Value::Object(_)
                        if approx_value_bytes(value) > MAX_VALUE_BYTES
                            || match value {
                                Value::Array(items) => items.len() > MAX_VALUE_ITEMS,
                                Value::Object(map) => map.len() > MAX_VALUE_ITEMS,
                                _ => false,
                            } =>
                    {
                        let text = canonical_json(value);
                        Some(truncation_note(
                            text.len(),
                            Sha256::digest(text.as_bytes()).into(),
                        ))
                    }
                    _ => None,
                };
                let Some(note) = note else { continue };
                cut_value(value, MAX_VALUE_BYTES);
                notes.insert(key.clone(), note);
            }
        }
        if notes.is_empty() {
            return false;
        }
        let details = self.details.get_or_insert_with(Default::default);
        match details.get_mut("truncated") {
            Some(Value::Object(earlier)) => earlier.extend(notes),
            _ => {
                details.insert("truncated".into(), Value::Object(notes));
            }
        }
        true
    }

    /// About how many bytes this event's line takes once sealed: what a
    /// byte budget counts before the event is serialized.
    pub fn approx_bytes(&self) -> usize {
        // The chain's fields (seq, time, hashes) and the keys.
        const FIXED: usize = 400;
        let strings = [
            &self.decision,
            &self.action,
            &self.rule_id,
            &self.reason,
            &self.mode,
            &self.user,
            &self.path,
            &self.sha256,
            &self.device_id,
        ]
        .iter()
        .map(|s| s.as_ref().map_or(0, String::len))
        .sum::<usize>();
        let details = self.details.as_ref().map_or(0, |d| {
            d.iter()
                .map(|(k, v)| k.len() + 4 + approx_value_bytes(v))
                .sum()
        });
        FIXED + self.event.len() + strings + details
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    #[test]
    fn small_records_are_left_alone() {
        let mut event = AuditEvent::exec(
            crate::Decision::Allow,
            crate::Mode::Enforce,
            "/usr/bin/true",
        )
        .with_detail("argv", vec!["true".to_owned()]);
        let before = event.clone();
        assert!(!event.bound());
        assert_eq!(event, before);
    }

    #[test]
    fn long_strings_and_arrays_are_cut_with_their_digest_and_length() {
        let huge_arg = "a".repeat(1024 * 1024);
        let argv: Vec<String> = vec!["tool".into(), huge_arg.clone(), "x".into()];
        let justification = "é".repeat(10_000);
        let path = format!("/tmp/{}", "p".repeat(9000));
        let mut event = AuditEvent::new("elevation_denied")
            .with_path(path.clone())
            .with_detail("argv", argv.clone())
            .with_detail("justification", justification.as_str())
            .with_detail("grant_id", 7);
        assert!(event.bound());
        let cut_path = event.path.as_deref().unwrap();
        assert!(cut_path.len() <= MAX_STRING_BYTES && cut_path.ends_with(ELLIPSIS));
        let details = event.details.as_ref().unwrap();
        let kept_argv = details["argv"].as_array().unwrap();
        assert_eq!(kept_argv[0], "tool");
        assert!(approx_value_bytes(&details["argv"]) <= MAX_VALUE_BYTES);
        let text = details["justification"].as_str().unwrap();
        assert!(text.len() <= MAX_STRING_BYTES && text.starts_with('é'));
        assert_eq!(details["grant_id"], 7, "small fields stay");
        let notes = &details["truncated"];
        assert_eq!(notes["path"]["bytes"], path.len());
        assert_eq!(notes["path"]["sha256"], digest(path.as_bytes()));
        assert_eq!(notes["justification"]["bytes"], justification.len());
        assert_eq!(
            notes["justification"]["sha256"],
            digest(justification.as_bytes())
        );
        let argv_json = canonical_json(&Value::from(argv));
        assert_eq!(notes["argv"]["sha256"], digest(argv_json.as_bytes()));
        assert_eq!(notes["argv"]["bytes"], argv_json.len());
        assert!(event.approx_bytes() < 64 * 1024, "{}", event.approx_bytes());
        // Bounding again changes nothing.
        let once = event.clone();
        assert!(!event.bound());
        assert_eq!(event, once);
        // And the record still seals and verifies.
        let mut chain = crate::Chain::genesis();
        let sealed = chain.seal(event, jiff::Timestamp::UNIX_EPOCH);
        crate::verify_lines([sealed.line.as_str()]).unwrap();
        assert!(sealed.line.len() < 64 * 1024);
    }

    #[test]
    fn a_string_list_is_kept_as_bound_keeps_it_without_copying_the_rest() {
        let huge: Vec<String> = std::iter::once("tool".to_owned())
            .chain((0..200).map(|i| format!("{i:05}{}", "b".repeat(8 * 1024))))
            .collect();
        let direct = AuditEvent::new("x").with_string_list("argv", &huge);
        let mut bounded = AuditEvent::new("x").with_detail("argv", huge.clone());
        assert!(bounded.bound());
        assert_eq!(direct, bounded, "the same record either way");
        let mut again = direct.clone();
        assert!(!again.bound(), "already within bounds");
        let small = vec!["ls".to_owned(), "-l".to_owned()];
        let event = AuditEvent::new("x").with_string_list("argv", &small);
        assert_eq!(event, AuditEvent::new("x").with_detail("argv", small));
    }

    #[test]
    fn many_small_elements_are_cut_by_count() {
        let argv: Vec<String> = (0..100_000).map(|i| i.to_string()).collect();
        let mut event = AuditEvent::new("x").with_detail("argv", argv);
        assert!(event.bound());
        let details = event.details.unwrap();
        assert_eq!(details["argv"].as_array().unwrap().len(), MAX_VALUE_ITEMS);
        assert!(details["truncated"]["argv"]["bytes"].as_u64().unwrap() > 500_000);
    }

    #[test]
    fn cutting_never_splits_a_character() {
        for len in MAX_STRING_BYTES - 8..MAX_STRING_BYTES + 8 {
            let text: String = "€".repeat(len / 3 + 1);
            if let Some(cut) = cut_string(&text, MAX_STRING_BYTES) {
                assert!(cut.len() <= MAX_STRING_BYTES);
            }
        }
        assert_eq!(cut_string("abc", 10), None);
        assert_eq!(cut_string("abcdefgh", 4).unwrap(), "a…");
    }
}
