//! Where the enforced policy comes from: the configured file, else the last
//! policy in the store, else a built-in allow-everything policy — and what
//! happens on reload (SIGHUP): a bad file never replaces a good policy. A
//! managed agent (`[platform]`) starts from its last signed bundle instead
//! ([`initial_signed`]) and gets new ones from `crate::managed::sync`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use epm_api::SignedEnvelope;
use epm_api::sign::PolicyKeys;
use epm_audit::{AuditEvent, EventKind};
use epm_policy::{Action, Engine};
use epm_store::{Store, StoredPolicy};
use epm_sync::CurrentBundle;

use crate::exec::decider::{Decider, PolicyState};

/// The policy enforced when there is no other: allow and audit everything,
/// the way administrators are advised to start.
pub const BUILTIN_POLICY: &str = r#"{"version": 0, "default_action": "allow", "rules": []}"#;

/// The `source` of a policy that came from the platform.
pub const PLATFORM_SOURCE: &str = "platform";

/// Policy documents larger than this are refused before reading.
const MAX_POLICY_BYTES: u64 = 256 * 1024 * 1024;

/// A policy ready to enforce, with the facts to store and audit.
#[derive(Debug)]
pub struct Candidate {
    engine: Engine,
    document: String,
    source: String,
}

/// Reads and compiles a policy file; the error says everything that is wrong.
pub fn read_policy_file(path: &Path) -> Result<Candidate, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if size > MAX_POLICY_BYTES {
        return Err(format!(
            "{} is {size} bytes, over the limit of {MAX_POLICY_BYTES}",
            path.display()
        ));
    }
    let document = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let engine = Engine::from_json(&document).map_err(|errors| errors.to_string())?;
    Ok(Candidate {
        engine,
        document,
        source: format!("file:{}", path.display()),
    })
}

impl Candidate {
    fn from_stored(stored: &StoredPolicy) -> Result<Candidate, String> {
        let engine = Engine::from_json(&stored.document).map_err(|errors| errors.to_string())?;
        Ok(Candidate {
            engine,
            document: stored.document.clone(),
            source: stored.source.clone(),
        })
    }

    /// A platform bundle that passed [`epm_sync::accept_bundle`]. The
    /// document is in the store, not kept here.
    pub fn platform(engine: Engine) -> Candidate {
        Candidate {
            engine,
            document: String::new(),
            source: PLATFORM_SOURCE.to_owned(),
        }
    }

    fn builtin() -> Candidate {
        Candidate {
            engine: Engine::empty(0, Action::Allow),
            document: BUILTIN_POLICY.to_owned(),
            source: "builtin".to_owned(),
        }
    }

    /// Turns the candidate into the state the decider enforces. The
    /// document itself is not kept in memory (`epmctl policy show` reads it
    /// from the store): for a large policy it is as big as the index.
    pub fn into_state(self, generation: u64) -> PolicyState {
        let state = PolicyState {
            engine: self.engine,
            generation,
            source: self.source,
            loaded_at: jiff::Timestamp::now(),
        };
        drop(self.document);
        trim_heap();
        state
    }
}

/// Returns memory freed by parsing a large document to the OS, so the
/// daemon's resident size reflects the index, not the parser's peak.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no pointers change.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The document of the policy in force, for `epmctl policy show`: the
/// built-in one, or the store's copy when it is the version in force.
pub fn document_in_force(state: &PolicyState, store: &Arc<Mutex<Store>>) -> Option<String> {
    if state.source == "builtin" {
        return Some(BUILTIN_POLICY.to_owned());
    }
    let stored = store.lock().ok()?.active_policy().ok()??;
    (stored.version == state.engine.version() && stored.source == state.source)
        .then_some(stored.document)
}

/// The audit event for a policy now in force.
pub fn loaded_event(state: &PolicyState, previous_version: Option<u64>) -> AuditEvent {
    let mut event = AuditEvent::new(EventKind::POLICY_LOADED)
        .with_detail("source", state.source.clone())
        .with_detail("rules", state.engine.rule_count())
        .with_detail("default_action", state.engine.default_action().as_str());
    if let Some(previous) = previous_version {
        event = event.with_detail("previous_version", previous);
    }
    event.policy_version = Some(state.engine.version());
    event.reason = Some(format!(
        "policy version {} from {} in force: {} rules, default {}",
        state.engine.version(),
        state.source,
        state.engine.rule_count(),
        state.engine.default_action()
    ));
    event
}

/// The audit event for a policy that was refused.
pub fn rejected_event(source: &str, errors: &str, kept_version: u64) -> AuditEvent {
    let mut event = AuditEvent::new(EventKind::POLICY_REJECTED)
        .with_detail("source", source.to_owned())
        .with_detail(
            "errors",
            errors.lines().map(str::to_owned).collect::<Vec<String>>(),
        );
    event.policy_version = Some(kept_version);
    let first = errors.lines().next().unwrap_or("invalid");
    event.reason = Some(format!(
        "{source} rejected, version {kept_version} stays in force: {first}"
    ));
    event
}

/// Chooses the policy to start with: the configured file if it is valid;
/// otherwise the store's active policy; otherwise the built-in one. Returns
/// the state and the audit events that explain the choice.
pub fn initial(
    policy_file: Option<&Path>,
    store: &Arc<Mutex<Store>>,
) -> (PolicyState, Vec<AuditEvent>) {
    let mut events = Vec::new();
    let stored = store
        .lock()
        .ok()
        .and_then(|s| s.active_policy().ok().flatten());
    let from_store = || {
        stored
            .as_ref()
            .and_then(|s| match Candidate::from_stored(s) {
                Ok(candidate) => Some(candidate),
                Err(errors) => {
                    tracing::error!(%errors, "the stored policy no longer parses");
                    None
                }
            })
    };
    let candidate = match policy_file.map(read_policy_file) {
        Some(Ok(candidate)) => {
            persist(store, &candidate);
            candidate
        }
        Some(Err(errors)) => {
            let fallback = from_store().unwrap_or_else(Candidate::builtin);
            let source = policy_file
                .map(|p| format!("file:{}", p.display()))
                .unwrap_or_default();
            tracing::error!(%errors, "policy file rejected; enforcing {}", fallback.source);
            events.push(rejected_event(&source, &errors, fallback.engine.version()));
            fallback
        }
        None => from_store().unwrap_or_else(Candidate::builtin),
    };
    let state = candidate.into_state(1);
    events.push(loaded_event(&state, None));
    (state, events)
}

/// The platform bundle in force and its ETag: what the sync's rollback
/// check and `If-None-Match` start from.
pub type BundleInForce = (CurrentBundle, Option<String>);

/// Chooses the policy to start a managed agent with: the store's active
/// platform bundle, else its last good one, each re-verified against the
/// pinned key (a policy edited in the database is not enforced), else the
/// built-in one until the first sync. A stored local-file policy is not
/// used: a managed agent enforces signed policies only. Also returns the
/// bundle in force and its ETag, for the sync's rollback check.
pub fn initial_signed(
    key: &PolicyKeys,
    device_id: &str,
    store: &Arc<Mutex<Store>>,
) -> (PolicyState, Vec<AuditEvent>, Option<BundleInForce>) {
    let mut events = Vec::new();
    let stored: Vec<StoredPolicy> = match store.lock() {
        Ok(store) => [store.active_policy(), store.last_good_policy()]
            .into_iter()
            .filter_map(|p| p.ok().flatten())
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut chosen = None;
    for policy in stored {
        let Some(envelope) = policy.envelope.as_deref() else {
            continue;
        };
        let verified = serde_json::from_str::<SignedEnvelope>(envelope)
            .map_err(|e| format!("the stored envelope is not readable: {e}"))
            .and_then(|envelope| {
                epm_sync::accept_bundle(key, device_id, None, &envelope).map_err(|e| e.to_string())
            });
        match verified {
            Ok(accepted) => {
                let current = accepted.current();
                chosen = Some((Candidate::platform(accepted.engine), (current, policy.etag)));
                break;
            }
            Err(errors) => {
                tracing::error!(%errors, version = policy.version, "a stored platform policy failed re-verification");
                events.push(rejected_event(
                    &format!("store:{PLATFORM_SOURCE} version {}", policy.version),
                    &errors,
                    0,
                ));
            }
        }
    }
    let (candidate, current) = match chosen {
        Some((candidate, current)) => (candidate, Some(current)),
        None => (Candidate::builtin(), None),
    };
    let state = candidate.into_state(1);
    events.push(loaded_event(&state, None));
    (state, events, current)
}

/// Re-reads the policy file (SIGHUP): a valid file replaces the policy; an
/// invalid one is audited and the current policy stays.
pub fn reload(policy_file: &Path, decider: &Decider, store: &Arc<Mutex<Store>>) -> AuditEvent {
    let current = decider.policy();
    match read_policy_file(policy_file) {
        Ok(candidate) => {
            persist(store, &candidate);
            let state = candidate.into_state(decider.next_generation());
            let event = loaded_event(&state, Some(current.engine.version()));
            tracing::info!(version = state.engine.version(), source = %state.source, "policy reloaded");
            decider.set_policy(state);
            event
        }
        Err(errors) => {
            tracing::error!(%errors, "policy file rejected; keeping version {}", current.engine.version());
            rejected_event(
                &format!("file:{}", policy_file.display()),
                &errors,
                current.engine.version(),
            )
        }
    }
}

/// Stores a policy as the active one unless it is already.
fn persist(store: &Arc<Mutex<Store>>, candidate: &Candidate) {
    let Ok(mut store) = store.lock() else { return };
    let unchanged = store
        .active_policy()
        .ok()
        .flatten()
        .is_some_and(|active| active.document == candidate.document);
    if unchanged {
        return;
    }
    let stored = StoredPolicy {
        document: candidate.document.clone(),
        version: candidate.engine.version(),
        etag: None,
        signature: None,
        source: candidate.source.clone(),
        fetched_at: jiff::Timestamp::now(),
        envelope: None,
    };
    if let Err(error) = store.save_active_policy(&stored) {
        tracing::warn!(%error, "cannot store the policy; it is enforced but not cached");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_policy_document_matches_the_builtin_engine() {
        let parsed = Engine::from_json(BUILTIN_POLICY).unwrap();
        let builtin = Candidate::builtin().engine;
        assert_eq!(parsed.rule_count(), builtin.rule_count());
        assert_eq!(parsed.default_action(), builtin.default_action());
        assert_eq!(parsed.version(), builtin.version());
    }
}
