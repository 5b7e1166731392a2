//! The platform-neutral decision logic: from what a gate saw (`ExecFacts`)
//! to a verdict and the audit facts, with the hash and decision caches.
//!
//! Every exec gate (fanotify, Endpoint Security) feeds this same code, so it
//! is tested on Linux without any gate at all.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::sync::Arc;

use arc_swap::ArcSwap;
use epm_policy::{Action, Decision, Engine, Sha256Digest, Subject};
use quick_cache::sync::Cache;
use sha2::{Digest, Sha256};

use crate::config::{FailMode, Mode};
use crate::gate::{ExecFacts, FileIdentity, Verdict};
use crate::names::Names;
use crate::stats::{Counters, LatencyHistogram};

/// The policy in force, swapped atomically on reload.
#[derive(Debug)]
pub struct PolicyState {
    /// The compiled policy.
    pub engine: Engine,
    /// Bumped on every load, even when the author kept `version`: the
    /// decision cache keys on this, so no decision outlives its policy.
    pub generation: u64,
    /// Where it came from: `file:/path`, `store`, `builtin`.
    pub source: String,
    /// When it was loaded.
    pub loaded_at: jiff::Timestamp,
    /// The document as loaded, for `epmctl policy show`.
    pub document: Arc<str>,
}

/// What the enforcement did, for the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    /// The exec ran.
    Allow,
    /// The exec was refused.
    Deny,
    /// Monitor mode: the exec ran, enforce mode would have refused it.
    WouldDeny,
}

impl Enforced {
    /// The name used in the audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Enforced::Allow => "allow",
            Enforced::Deny => "deny",
            Enforced::WouldDeny => "would_deny",
        }
    }
}

/// One decided exec: the answer for the kernel and the facts for the audit.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The answer.
    pub verdict: Verdict,
    /// What the enforcement did.
    pub enforced: Enforced,
    /// What the policy said, and why.
    pub decision: Decision,
    /// The subject as decided (user and group names resolved).
    pub subject: Subject,
    /// Whether the decision came from the cache.
    pub cached: bool,
}

/// Why an exec could not be decided: it is answered per `fail_mode`.
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// The executable's bytes could not be read to hash them.
    #[error("cannot hash {path}: {source}")]
    Hash {
        /// The executable.
        path: String,
        /// Why.
        source: io::Error,
    },
}

/// Everything the decision workers share.
#[derive(Debug)]
pub struct Decider {
    policy: ArcSwap<PolicyState>,
    mode: Mode,
    fail_mode: FailMode,
    device_id: String,
    hashes: Cache<FileIdentity, Sha256Digest>,
    decisions: Cache<DecisionKey, Decision>,
    names: Names,
    fingerprint: RandomState,
    /// Counters for `epmctl status`.
    pub counters: Counters,
    /// Decision latency, gate read to answer.
    pub latency: LatencyHistogram,
}

/// Everything a cached decision depends on. Group list and parent path are
/// folded into a keyed fingerprint (random keys per daemon run, so nobody can
/// craft a collision) to keep keys small and lookups allocation-free.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    file: FileIdentity,
    generation: u64,
    uid: u32,
    context: u64,
}

impl Decider {
    /// A decider enforcing `policy`.
    pub fn new(
        policy: PolicyState,
        mode: Mode,
        fail_mode: FailMode,
        device_id: String,
        cache_entries: usize,
    ) -> Self {
        let cache_entries = cache_entries.max(16);
        Self {
            policy: ArcSwap::from_pointee(policy),
            mode,
            fail_mode,
            device_id,
            hashes: Cache::new(cache_entries),
            decisions: Cache::new(cache_entries),
            names: Names::default(),
            fingerprint: RandomState::new(),
            counters: Counters::default(),
            latency: LatencyHistogram::default(),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<PolicyState> {
        self.policy.load_full()
    }

    /// Replaces the policy; decisions of the old one are never reused.
    pub fn set_policy(&self, policy: PolicyState) {
        self.policy.store(Arc::new(policy));
    }

    /// The next policy generation number.
    pub fn next_generation(&self) -> u64 {
        self.policy.load().generation + 1
    }

    /// Enforce or monitor.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How undecidable execs are answered.
    pub fn fail_mode(&self) -> FailMode {
        self.fail_mode
    }

    /// The verdict for an exec that could not be decided.
    pub fn fail_verdict(&self) -> Verdict {
        match self.fail_mode {
            FailMode::Open => Verdict::Allow,
            FailMode::Closed => Verdict::Deny,
        }
    }

    /// This device's id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// User and group name resolution.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Decides one exec. Never blocks on anything but reading the
    /// executable (to hash it, once per file version) and the user database
    /// (cached).
    pub fn decide(&self, facts: &ExecFacts) -> Result<Outcome, DecideError> {
        let policy = self.policy.load();
        let sha256 = self.sha256_of(facts)?;
        let subject = self.subject(facts, sha256);

        let key = DecisionKey {
            file: facts.file,
            generation: policy.generation,
            uid: facts.uid,
            context: self.context_fingerprint(facts),
        };
        let (decision, cached) = match self.decisions.get(&key) {
            Some(decision) => {
                Counters::bump(&self.counters.cache_hits);
                (decision, true)
            }
            None => {
                Counters::bump(&self.counters.cache_misses);
                let decision = policy.engine.evaluate(&subject);
                self.decisions.insert(key, decision.clone());
                (decision, false)
            }
        };

        // justify and approve need a grant that the interactive flows create;
        // without one the exec is refused, and the audit says which it needs.
        let policy_allows = decision.action == Action::Allow;
        let (verdict, enforced) = match (policy_allows, self.mode) {
            (true, _) => (Verdict::Allow, Enforced::Allow),
            (false, Mode::Enforce) => (Verdict::Deny, Enforced::Deny),
            (false, Mode::Monitor) => (Verdict::Allow, Enforced::WouldDeny),
        };
        let counter = match enforced {
            Enforced::Allow => &self.counters.allowed,
            Enforced::Deny => &self.counters.denied,
            Enforced::WouldDeny => &self.counters.would_deny,
        };
        Counters::bump(counter);
        Ok(Outcome {
            verdict,
            enforced,
            decision,
            subject,
            cached,
        })
    }

    /// The SHA-256 of the executable, from the cache when this exact file
    /// version (device, inode, size, mtime, ctime) was hashed before.
    fn sha256_of(&self, facts: &ExecFacts) -> Result<Option<Sha256Digest>, DecideError> {
        if let Some(digest) = self.hashes.get(&facts.file) {
            return Ok(Some(digest));
        }
        let Some(content) = &facts.content else {
            return Ok(None);
        };
        let digest = hash_file(content).map_err(|source| DecideError::Hash {
            path: facts.path.clone(),
            source,
        })?;
        self.hashes.insert(facts.file, digest);
        Ok(Some(digest))
    }

    fn context_fingerprint(&self, facts: &ExecFacts) -> u64 {
        let mut hasher = self.fingerprint.build_hasher();
        facts.groups.hash(&mut hasher);
        facts.parent_path.hash(&mut hasher);
        facts.argv.hash(&mut hasher);
        facts.cdhash.hash(&mut hasher);
        facts.team_id.hash(&mut hasher);
        facts.signing_id.hash(&mut hasher);
        facts.bundle_id.hash(&mut hasher);
        facts.platform_binary.hash(&mut hasher);
        hasher.finish()
    }

    fn subject(&self, facts: &ExecFacts, sha256: Option<Sha256Digest>) -> Subject {
        let mut groups: Vec<String> = Vec::with_capacity(facts.groups.len() + 1);
        for gid in std::iter::once(facts.gid).chain(facts.groups.iter().copied()) {
            if let Some(name) = self.names.group(gid)
                && !groups.iter().any(|g| **g == *name)
            {
                groups.push(name.to_string());
            }
        }
        Subject {
            path: facts.path.clone(),
            sha256,
            cdhash: facts.cdhash,
            team_id: facts.team_id.clone(),
            signing_id: facts.signing_id.clone(),
            bundle_id: facts.bundle_id.clone(),
            platform_binary: facts.platform_binary,
            argv: facts.argv.clone(),
            pid: facts.pid,
            ppid: facts.ppid,
            parent_path: facts.parent_path.clone(),
            uid: facts.uid,
            user: self
                .names
                .user(facts.uid)
                .map(|n| n.to_string())
                .unwrap_or_default(),
            groups,
            device_id: self.device_id.clone(),
        }
    }
}

/// Hashes a file through an already-open handle, from offset 0 whatever the
/// handle's position, without changing it (positioned reads).
pub fn hash_file(file: &std::fs::File) -> io::Result<Sha256Digest> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(Sha256Digest(hasher.finalize().into()))
}
