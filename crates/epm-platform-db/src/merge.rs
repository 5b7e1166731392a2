//! One device's policy: every document that targets it, merged.
//!
//! Order is most specific first (device, then users, then groups, then
//! general) so that, among rules the engine ranks equal, the more specific
//! document's rule comes first in document order. Rule ids from scoped
//! documents are prefixed with their scope (`user:alice/allow-wireshark`) so
//! ids stay unique and the audit says where a rule came from. A user or
//! group document's rules are narrowed to that user or group, so a rule
//! pushed for alice never applies to bob on a shared Mac.

use epm_api::BundleSource;
use epm_api::admin::PolicyScope;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// One stored document.
#[derive(Debug, Clone)]
pub struct ScopedDocument {
    /// Its scope.
    pub scope: PolicyScope,
    /// Its revision.
    pub revision: u64,
    /// The document, as pushed (already validated).
    pub document: String,
}

/// The merged policy, without its version (the device's bundle version is
/// filled in when the bundle is signed). Serialized, it is what the
/// database keeps for every instance (`merged_policies`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Merged {
    /// The device document's default, else the general one's, else `allow`.
    pub default_action: String,
    /// The rules, as a JSON array.
    pub rules_json: String,
    /// The `elevation` and `admin_session` sections, merged the same way
    /// (most specific document first, ids prefixed, scopes narrowed); as
    /// `,"elevation":[...]` text, empty when no document has one, so a
    /// policy without them is the same bundle as before they existed.
    pub sections_json: String,
    /// What was merged.
    pub sources: Vec<BundleSource>,
    /// Identifies the content: equal hashes, equal policies.
    pub content_sha256: [u8; 32],
}

fn rank(scope: &PolicyScope) -> u8 {
    match scope {
        PolicyScope::Device(_) => 0,
        PolicyScope::User(_) => 1,
        PolicyScope::Group(_) => 2,
        PolicyScope::General => 3,
    }
}

/// Merges `documents` (any order).
pub fn merge(mut documents: Vec<ScopedDocument>) -> Result<Merged, String> {
    documents.sort_by(|a, b| (rank(&a.scope), &a.scope).cmp(&(rank(&b.scope), &b.scope)));
    let mut default_action = None;
    let mut rules: Vec<Value> = Vec::new();
    let mut sections: [(&str, Vec<Value>); 2] =
        [("elevation", Vec::new()), ("admin_session", Vec::new())];
    let mut sources = Vec::new();
    for doc in documents {
        let scope_text = doc.scope.to_string();
        let parsed: Value = serde_json::from_str(&doc.document)
            .map_err(|e| format!("stored document {scope_text} does not parse: {e}"))?;
        let Value::Object(mut top) = parsed else {
            return Err(format!("stored document {scope_text} is not an object"));
        };
        if matches!(doc.scope, PolicyScope::Device(_) | PolicyScope::General)
            && default_action.is_none()
            && let Some(Value::String(action)) = top.get("default_action")
        {
            default_action = Some(action.clone());
        }
        let Some(Value::Array(doc_rules)) = top.remove("rules") else {
            return Err(format!("stored document {scope_text} has no rules array"));
        };
        let before = rules.len();
        for rule in doc_rules {
            if let Some(rule) = scoped_rule(rule, &doc.scope, &scope_text) {
                rules.push(rule);
            }
        }
        for (name, merged) in &mut sections {
            if let Some(Value::Array(entries)) = top.remove(*name) {
                merged.extend(
                    entries
                        .into_iter()
                        .filter_map(|e| scoped_rule(e, &doc.scope, &scope_text)),
                );
            }
        }
        sources.push(BundleSource {
            scope: scope_text,
            revision: doc.revision,
            rules: (rules.len() - before) as u64,
        });
    }
    let default_action = default_action.unwrap_or_else(|| "allow".into());
    let rules_json = serde_json::to_string(&rules)
        .map_err(|e| format!("cannot serialize the merged rules: {e}"))?;
    let mut sections_json = String::new();
    for (name, entries) in &sections {
        if !entries.is_empty() {
            let entries = serde_json::to_string(entries)
                .map_err(|e| format!("cannot serialize the merged {name} section: {e}"))?;
            sections_json.push_str(&format!(",\"{name}\":{entries}"));
        }
    }
    let mut hash = Sha256::new();
    hash.update(default_action.as_bytes());
    hash.update(b"\n");
    hash.update(rules_json.as_bytes());
    hash.update(sections_json.as_bytes());
    Ok(Merged {
        default_action,
        rules_json,
        sections_json,
        sources,
        content_sha256: hash.finalize().into(),
    })
}

/// The rule as it goes into the bundle, or `None` when its own scope
/// excludes the document's user or group.
fn scoped_rule(rule: Value, scope: &PolicyScope, scope_text: &str) -> Option<Value> {
    let Value::Object(mut rule) = rule else {
        return Some(rule);
    };
    let (list, name) = match scope {
        PolicyScope::General => return Some(Value::Object(rule)),
        PolicyScope::Device(_) => (None, None),
        PolicyScope::User(name) => (Some("users"), Some(name)),
        PolicyScope::Group(name) => (Some("groups"), Some(name)),
    };
    if let Some(Value::String(id)) = rule.get("id") {
        let prefixed = format!("{scope_text}/{id}");
        rule.insert("id".into(), Value::String(prefixed));
    }
    if let (Some(list), Some(name)) = (list, name) {
        let scope_obj = rule
            .entry("scope")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(scope_obj) = scope_obj else {
            return None;
        };
        let allowed = match scope_obj.get(list) {
            Some(Value::Array(names)) if !names.is_empty() => {
                names.iter().any(|n| n.as_str() == Some(name))
            }
            _ => true,
        };
        if !allowed {
            return None;
        }
        scope_obj.insert(list.into(), Value::Array(vec![Value::String(name.clone())]));
    }
    Some(Value::Object(rule))
}

/// The most approval levels any rule, elevation rule or admin-session entry
/// of a policy document asks for (0 when none says; an `approve` rule
/// without `approval` has one).
pub fn highest_approval_level(document: &str) -> u32 {
    let Ok(Value::Object(top)) = serde_json::from_str::<Value>(document) else {
        return 0;
    };
    ["rules", "elevation", "admin_session"]
        .iter()
        .filter_map(|section| top.get(*section)?.as_array())
        .flatten()
        .filter_map(|entry| entry.pointer("/approval/levels")?.as_array())
        .map(|levels| u32::try_from(levels.len()).unwrap_or(u32::MAX))
        .max()
        .unwrap_or(0)
}

/// The bundle payload (the JSON text that gets signed) for `device_id` at
/// `version`: a [`epm_api::PolicyBundle`], written directly so the rules are
/// not parsed and serialized again per device.
pub fn bundle_payload(
    device_id: &str,
    version: u64,
    issued_at: jiff::Timestamp,
    merged: &Merged,
) -> Result<String, serde_json::Error> {
    Ok(format!(
        r#"{{"format":{},"device_id":{},"version":{version},"issued_at":{},"sources":{},"policy":{{"version":{version},"default_action":{},"rules":{}{}}}}}"#,
        epm_api::BUNDLE_FORMAT,
        serde_json::to_string(device_id)?,
        serde_json::to_string(&issued_at)?,
        serde_json::to_string(&merged.sources)?,
        serde_json::to_string(&merged.default_action)?,
        merged.rules_json,
        merged.sections_json,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(scope: &str, revision: u64, json: &str) -> ScopedDocument {
        ScopedDocument {
            scope: scope.parse().unwrap(),
            revision,
            document: json.into(),
        }
    }

    #[test]
    fn the_highest_approval_level_counts_every_section() {
        let two = r#"{"approval": {"levels": [{"approvers": 1}, {"approvers": 2}]}}"#;
        let three =
            r#"{"approval": {"levels": [{"approvers": 1}, {"approvers": 1}, {"approvers": 1}]}}"#;
        assert_eq!(
            highest_approval_level(&format!(r#"{{"rules": [{two}]}}"#)),
            2
        );
        assert_eq!(
            highest_approval_level(&format!(
                r#"{{"rules": [{two}], "admin_session": [{three}]}}"#
            )),
            3
        );
        assert_eq!(highest_approval_level(r#"{"rules": []}"#), 0);
        assert_eq!(highest_approval_level("not json"), 0);
    }

    #[test]
    fn scoped_rules_are_prefixed_narrowed_and_ordered() {
        let merged = merge(vec![
            doc("general", 1, r#"{"version":1,"default_action":"allow","rules":[{"id":"g","action":"deny","match":{"name":"nc"}}]}"#),
            doc("user:alice", 3, r#"{"version":1,"default_action":"deny","rules":[
                {"id":"u1","action":"allow","match":{"name":"nc"}},
                {"id":"u2","action":"allow","match":{"name":"x"},"scope":{"users":["bob"]}},
                {"id":"u3","action":"allow","match":{"name":"y"},"scope":{"users":["alice","bob"],"groups":["staff"]}}]}"#),
            doc("device:mac-1", 2, r#"{"version":1,"default_action":"deny","rules":[{"id":"d","action":"allow","match":{"name":"ls"}}]}"#),
            doc("group:devs", 4, r#"{"version":1,"default_action":"allow","rules":[{"id":"gr","action":"allow","match":{"name":"gdb"}}]}"#),
        ])
        .unwrap();
        assert_eq!(
            merged.default_action, "deny",
            "the device document's default wins"
        );
        let rules: Vec<Value> = serde_json::from_str(&merged.rules_json).unwrap();
        let ids: Vec<&str> = rules.iter().map(|r| r["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "device:mac-1/d",
                "user:alice/u1",
                "user:alice/u3",
                "group:devs/gr",
                "g"
            ]
        );
        assert_eq!(rules[1]["scope"]["users"], serde_json::json!(["alice"]));
        assert_eq!(
            rules[2]["scope"],
            serde_json::json!({"users":["alice"],"groups":["staff"]})
        );
        assert_eq!(rules[3]["scope"]["groups"], serde_json::json!(["devs"]));
        let counts: Vec<(String, u64)> = merged
            .sources
            .iter()
            .map(|s| (s.scope.clone(), s.rules))
            .collect();
        assert_eq!(
            counts[1],
            ("user:alice".into(), 2),
            "u2 (bob only) is dropped"
        );
    }

    #[test]
    fn elevation_and_admin_session_sections_are_merged_like_rules() {
        let merged = merge(vec![
            doc(
                "general",
                1,
                r#"{"version":1,"default_action":"allow","rules":[],
                "elevation":[{"id":"apt","action":"allow","match":{"path":"/usr/bin/apt"}}],
                "admin_session":[{"id":"all","max_minutes":15}]}"#,
            ),
            doc(
                "user:alice",
                2,
                r#"{"version":1,"default_action":"allow","rules":[],
                "admin_session":[{"id":"long","max_minutes":120,"require":"approval"}]}"#,
            ),
        ])
        .unwrap();
        let payload = bundle_payload("mac-1", 3, jiff::Timestamp::UNIX_EPOCH, &merged).unwrap();
        let bundle: epm_api::PolicyBundle = serde_json::from_str(&payload).unwrap();
        let policy = epm_policy::Policy::from_json(bundle.policy.get()).unwrap();
        assert_eq!(policy.elevation[0].id, "apt");
        let ids: Vec<&str> = policy.admin_session.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["user:alice/long", "all"]);
        assert_eq!(
            policy.admin_session[0].scope.as_ref().unwrap().users,
            ["alice"]
        );
    }

    #[test]
    fn the_payload_is_a_valid_bundle_whose_policy_validates() {
        let merged = merge(vec![doc("general", 1, r#"{"version":9,"default_action":"allow","rules":[{"id":"g","action":"deny","match":{"name":"nc"}}]}"#)]).unwrap();
        let payload = bundle_payload("mac-1", 7, jiff::Timestamp::UNIX_EPOCH, &merged).unwrap();
        let bundle: epm_api::PolicyBundle = serde_json::from_str(&payload).unwrap();
        assert_eq!((bundle.version, bundle.device_id.as_str()), (7, "mac-1"));
        let engine = epm_policy::Engine::from_json(bundle.policy.get()).unwrap();
        assert_eq!(engine.version(), 7);
        assert_eq!(merge(vec![]).unwrap().default_action, "allow");
        assert!(!payload.contains("elevation"), "{payload}");
        let same = merge(vec![doc("general", 2, r#"{"version":10,"default_action":"allow","rules":[{"id":"g","action":"deny","match":{"name":"nc"}}]}"#)]).unwrap();
        assert_eq!(
            same.content_sha256, merged.content_sha256,
            "a new revision with equal rules is equal content"
        );
    }
}
