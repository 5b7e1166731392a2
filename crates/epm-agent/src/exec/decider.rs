//! The platform-neutral decision logic: from what a gate saw (`ExecFacts`)
//! to a verdict and the audit facts, with the hash and decision caches.
//!
//! Every exec gate (fanotify, Endpoint Security) feeds this same code, so it
//! is tested on Linux without any gate at all.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use epm_policy::{Action, Decision, Engine, Sha256Digest, Subject};
use epm_store::{IdentityKind, SubjectIdentity};
use quick_cache::sync::Cache;
use sha2::{Digest, Sha256};

use crate::config::{FailMode, Mode};
use crate::exec::stats::{Counters, LatencyHistogram};
use crate::gate::{ExecFacts, FactNeeds, FileIdentity, Stability, Verdict, lease};
use crate::names::Names;

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

/// What the interactive flows give the decider: grants to consume, and
/// someone to tell when an exec is refused.
pub trait Interactive: Send + Sync + std::fmt::Debug {
    /// Uses one run of a grant for this user, binary and rule, if there is
    /// one valid now. Called on decision workers only (it may write the
    /// store), never on the gate's thread.
    fn consume_grant(
        &self,
        uid: u32,
        identity: &SubjectIdentity,
        rule_id: &str,
    ) -> Option<UsedGrant>;

    /// An exec was refused: tell the user, if their helper listens. Called
    /// on the gate's thread too, so it must not block.
    fn refused(&self, outcome: &Outcome);
}

// The gate owns the hook it needs around a policy change (its kernel cache
// of allows); the decider calls it.
pub use epm_gate::PolicySwap;

/// The grant an exec used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedGrant {
    /// Its id in the store.
    pub id: i64,
    /// `justification`, `approval` or `offline_code`.
    pub source: &'static str,
    /// Runs left after this one.
    pub uses_left: u32,
    /// The approval request it answers.
    pub request_id: Option<String>,
}

/// The identity a grant is bound to: the cdhash where the platform gives
/// one (macOS), else the SHA-256 of the file. Never the path.
pub fn grant_identity(subject: &Subject) -> Option<SubjectIdentity> {
    if let Some(cdhash) = &subject.cdhash {
        return Some(SubjectIdentity {
            kind: IdentityKind::Cdhash,
            value: cdhash.to_string(),
        });
    }
    subject.sha256.map(|digest| SubjectIdentity {
        kind: IdentityKind::Sha256,
        value: digest.to_string(),
    })
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
    /// The grant that let a `justify` or `approve` exec run.
    pub grant: Option<UsedGrant>,
    /// A plain policy allow of a file the gate could cache in the kernel
    /// ([`ExecFacts::kernel_cache_candidate`]) that the policy decides
    /// alike for everyone: the generation of that policy.
    pub per_file: Option<u64>,
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
    /// What would run could not be pinned down: the file changed while it
    /// was hashed, or stayed open for writing (so could change after).
    #[error("{path} {why}: what would run is not what was hashed")]
    Unstable {
        /// The executable.
        path: String,
        /// What happened.
        why: &'static str,
    },
    /// This user has hashed more than their share lately.
    #[error(
        "uid {uid} is over its hashing budget ({} MiB/s): {path} ({size} bytes) was not hashed",
        HASH_RATE_BYTES >> 20
    )]
    HashBudget {
        /// The user.
        uid: u32,
        /// The executable.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Hashing took longer than [`HASH_TIME_LIMIT`].
    #[error("hashing {path} took longer than {} s", HASH_TIME_LIMIT.as_secs())]
    HashTooSlow {
        /// The executable.
        path: String,
    },
}

/// What each user (but root) may hash per second, sustained: enough for
/// any program a person starts, far from what keeps a worker busy.
pub const HASH_RATE_BYTES: u64 = 128 * 1024 * 1024;
/// What a user may hash at once before [`HASH_RATE_BYTES`] applies. One
/// file larger than this is still hashed when the budget is full, and
/// leaves it in debt for as long as it takes to earn it back.
pub const HASH_BURST_BYTES: u64 = 1024 * 1024 * 1024;
/// Longest a single hash may take (a file on a slow or stalled device).
pub const HASH_TIME_LIMIT: Duration = Duration::from_secs(30);

/// Per-user hashing budgets: a token bucket of bytes each.
#[derive(Debug)]
struct HashBudget {
    rate: f64,
    burst: f64,
    users: Mutex<HashMap<u32, (f64, Instant)>>,
}

impl Default for HashBudget {
    fn default() -> Self {
        Self {
            rate: HASH_RATE_BYTES as f64,
            burst: HASH_BURST_BYTES as f64,
            users: Mutex::default(),
        }
    }
}

impl HashBudget {
    /// Whether `uid` may hash `bytes` now (and if so, spends them). Root
    /// is never limited.
    fn spend(&self, uid: u32, bytes: u64) -> bool {
        if uid == 0 {
            return true;
        }
        let now = Instant::now();
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let (rate, burst) = (self.rate, self.burst);
        if users.len() >= 4096 && !users.contains_key(&uid) {
            // Forget users whose budget is full again.
            users.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = users.entry(uid).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens <= 0.0 {
            return false;
        }
        *tokens -= bytes as f64;
        true
    }
}

/// File versions being hashed right now: a second exec of the same
/// version waits for the first one's digest instead of hashing it again.
#[derive(Debug, Default)]
struct InFlight {
    hashing: Mutex<HashMap<FileIdentity, usize>>,
    done: Condvar,
}

/// Marks one file version as being hashed until dropped.
struct Hashing<'a> {
    in_flight: &'a InFlight,
    file: FileIdentity,
}

impl InFlight {
    /// Waits while another worker hashes `file`, then marks it as ours.
    fn begin(&self, file: FileIdentity) -> Hashing<'_> {
        let mut hashing = self.hashing.lock().unwrap_or_else(PoisonError::into_inner);
        while hashing.contains_key(&file) {
            hashing = self
                .done
                .wait(hashing)
                .unwrap_or_else(PoisonError::into_inner);
        }
        hashing.insert(file, 1);
        Hashing {
            in_flight: self,
            file,
        }
    }
}

impl Drop for Hashing<'_> {
    fn drop(&mut self) {
        let mut hashing = self
            .in_flight
            .hashing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        hashing.remove(&self.file);
        self.in_flight.done.notify_all();
    }
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
    hash_budget: HashBudget,
    in_flight: InFlight,
    names: Names,
    fingerprint: RandomState,
    /// The interactive flows, given at construction ([`DeciderDeps`]).
    interactive: Option<Arc<dyn Interactive>>,
    /// The gate's hook around a policy change, given at construction
    /// ([`DeciderDeps::policy_swap`]): every policy, the first included,
    /// is put in force through it.
    policy_swap: Option<Arc<dyn PolicySwap>>,
    /// What the gates must gather for the policy in force; kept current by
    /// [`Decider::set_policy`], so no caller has to remember.
    needs: Arc<FactNeeds>,
    /// Counters for `epmctl status`.
    pub counters: Counters,
    /// Decision latency, gate read to answer.
    pub latency: LatencyHistogram,
}

/// Everything a cached decision depends on. Group list and parent path are
/// folded into a keyed fingerprint (random keys per daemon run, so nobody can
/// craft a collision) to keep keys small and lookups allocation-free. The
/// digest is part of it: a file version is only an identity as long as its
/// timestamps tell its contents apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DecisionKey {
    file: FileIdentity,
    sha256: Option<Sha256Digest>,
    generation: u64,
    uid: u32,
    context: u64,
}

/// What the decider works with besides its policy and settings, given at
/// construction so that nothing it relies on is attached later unseen.
#[derive(Debug, Default)]
pub struct DeciderDeps {
    /// The interactive flows: where grants are consumed and refusals
    /// shown. Without them, `justify` and `approve` execs are simply
    /// refused. The flows need the decider too; the daemon makes both in
    /// one step with `Arc::new_cyclic` (the flows hold a `Weak`).
    pub interactive: Option<Arc<dyn Interactive>>,
    /// The gate's hook around a policy change (the Linux gate's kernel
    /// cache of allows, whose fanotify groups exist before their marks).
    /// Without it, a policy change is only the decider's.
    pub policy_swap: Option<Arc<dyn PolicySwap>>,
}

impl Decider {
    /// A decider enforcing `policy`, with no interactive flows.
    pub fn new(
        policy: PolicyState,
        mode: Mode,
        fail_mode: FailMode,
        device_id: String,
        cache_entries: usize,
    ) -> Self {
        Self::with_deps(
            policy,
            mode,
            fail_mode,
            device_id,
            cache_entries,
            DeciderDeps::default(),
        )
    }

    /// A decider enforcing `policy` with `deps`.
    pub fn with_deps(
        policy: PolicyState,
        mode: Mode,
        fail_mode: FailMode,
        device_id: String,
        cache_entries: usize,
        deps: DeciderDeps,
    ) -> Self {
        let cache_entries = cache_entries.max(16);
        let needs = Arc::new(FactNeeds::all());
        set_fact_needs(&needs, &policy);
        if let Some(swap) = &deps.policy_swap {
            swap.starts_with(policy.generation);
        }
        Self {
            policy: ArcSwap::from_pointee(policy),
            mode,
            fail_mode,
            device_id,
            hashes: Cache::new(cache_entries),
            decisions: Cache::new(cache_entries),
            hash_budget: HashBudget::default(),
            in_flight: InFlight::default(),
            names: Names::default(),
            fingerprint: RandomState::new(),
            interactive: deps.interactive,
            policy_swap: deps.policy_swap,
            needs,
            counters: Counters::default(),
            latency: LatencyHistogram::default(),
        }
    }

    /// Called after an exec was answered: a refusal is passed to the
    /// interactive flows, without blocking.
    pub fn answered(&self, outcome: &Outcome) {
        if outcome.enforced == Enforced::Deny
            && let Some(interactive) = &self.interactive
        {
            interactive.refused(outcome);
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<PolicyState> {
        self.policy.load_full()
    }

    /// Replaces the policy; decisions of the old one are never reused,
    /// in the decider's caches or in the kernel's ([`PolicySwap`]). Then
    /// tells the gates which facts the new policy needs, and that it
    /// changed ([`FactNeeds::policy_changed`]: the Endpoint Security gate
    /// empties its cache).
    pub fn set_policy(&self, policy: PolicyState) {
        self.put_in_force(policy);
        set_fact_needs(&self.needs, &self.policy());
    }

    fn put_in_force(&self, policy: PolicyState) {
        let Some(swap) = &self.policy_swap else {
            self.policy.store(Arc::new(policy));
            return;
        };
        let generation = policy.generation;
        let mut policy = Some(policy);
        swap.swap(generation, &mut || {
            if let Some(policy) = policy.take() {
                self.policy.store(Arc::new(policy));
            }
        });
        if let Some(policy) = policy {
            self.policy.store(Arc::new(policy));
        }
    }

    /// What the gates must gather for the policy in force, and where they
    /// hear of a policy change: hand it to every gate.
    pub fn fact_needs(&self) -> Arc<FactNeeds> {
        self.needs.clone()
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

    /// Decides one exec from the caches alone, without reading any file:
    /// `None` when the file version was never hashed or this decision was
    /// never made. The gate thread calls this first, so the common case is
    /// answered without waking a worker.
    pub fn decide_cached(&self, facts: &ExecFacts) -> Option<Outcome> {
        self.decide_cached_with(facts, Grants::Use)
    }

    /// [`Decider::decide_observed`] from the caches alone: `None` on a miss.
    pub fn decide_cached_observed(&self, facts: &ExecFacts) -> Option<Outcome> {
        self.decide_cached_with(facts, Grants::Ignore)
    }

    fn decide_cached_with(&self, facts: &ExecFacts, grants: Grants) -> Option<Outcome> {
        // A file someone had open for writing is hashed again, by a worker.
        if facts.stability == Stability::OpenForWriting {
            return None;
        }
        let policy = self.policy.load();
        let sha256 = if facts.has_content() {
            Some(self.hashes.get(&facts.file)?)
        } else {
            None
        };
        // Asking the user directory may block: a worker's job.
        let directory = match facts.groups_from_directory {
            true => Some(self.names.member_groups_if_cached(facts.uid, facts.gid)?),
            false => None,
        };
        let groups = supplementary(facts, directory.as_ref());
        let decision = self
            .decisions
            .get(&self.key(facts, groups, sha256, policy.generation))?;
        if grants == Grants::Use && self.may_use_grant(&decision) {
            // Consuming a grant writes the store: a worker's job.
            return None;
        }
        Counters::bump(&self.counters.cache_hits);
        Some(self.conclude(&policy, facts, groups, sha256, decision, true, grants))
    }

    /// Decides one exec. Never blocks on anything but reading the
    /// executable (to hash it, once per file version) and the user database
    /// (cached).
    pub fn decide(&self, facts: &ExecFacts) -> Result<Outcome, DecideError> {
        self.decide_with(facts, Grants::Use)
    }

    /// Decides, for the audit, an exec the platform already let run from
    /// its cache of allows this daemon decided: the policy's decision, but
    /// never a grant (the exec used none, and it must not use one up).
    pub fn decide_observed(&self, facts: &ExecFacts) -> Result<Outcome, DecideError> {
        self.decide_with(facts, Grants::Ignore)
    }

    fn decide_with(&self, facts: &ExecFacts, grants: Grants) -> Result<Outcome, DecideError> {
        let policy = self.policy.load();
        let sha256 = self.sha256_of(facts)?;
        let directory = facts
            .groups_from_directory
            .then(|| self.names.member_groups(facts.uid, facts.gid));
        let groups = supplementary(facts, directory.as_ref());
        let key = self.key(facts, groups, sha256, policy.generation);
        if let Some(decision) = self.decisions.get(&key) {
            Counters::bump(&self.counters.cache_hits);
            return Ok(self.conclude(&policy, facts, groups, sha256, decision, true, grants));
        }
        Counters::bump(&self.counters.cache_misses);
        let decision = policy.engine.evaluate(&self.subject(facts, groups, sha256));
        self.decisions.insert(key, decision.clone());
        Ok(self.conclude(&policy, facts, groups, sha256, decision, false, grants))
    }

    /// The cache key: the groups are part of the context, so a user added
    /// to a group (an admin session) is judged anew.
    fn key(
        &self,
        facts: &ExecFacts,
        groups: &[u32],
        sha256: Option<Sha256Digest>,
        generation: u64,
    ) -> DecisionKey {
        DecisionKey {
            file: facts.file,
            sha256,
            generation,
            uid: facts.uid,
            context: self.context_fingerprint(facts, groups),
        }
    }

    /// Whether this decision lets a grant allow the exec.
    fn may_use_grant(&self, decision: &Decision) -> bool {
        matches!(decision.action, Action::Justify | Action::Approve)
            && decision.rule_id.is_some()
            && self.mode == Mode::Enforce
            && self.interactive.is_some()
    }

    /// Applies grants and the mode to a policy decision and counts it.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &self,
        policy: &PolicyState,
        facts: &ExecFacts,
        groups: &[u32],
        sha256: Option<Sha256Digest>,
        decision: Decision,
        cached: bool,
        grants: Grants,
    ) -> Outcome {
        let subject = self.subject(facts, groups, sha256);
        // justify and approve need a grant that the interactive flows
        // create; without one the exec is refused, and the audit says which
        // it needs.
        // The identity (a digest's hex) only when a grant may be used: this
        // runs for every exec, nearly all of them plain allows.
        let grant = match grants == Grants::Use && self.may_use_grant(&decision) {
            true => match (
                self.interactive.as_ref(),
                &decision.rule_id,
                grant_identity(&subject),
            ) {
                (Some(interactive), Some(rule_id), Some(identity)) => {
                    interactive.consume_grant(subject.uid, &identity, rule_id)
                }
                _ => None,
            },
            false => None,
        };
        let policy_allows = decision.action == Action::Allow || grant.is_some();
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
        // Asked only where the gate could use it: the query looks at every
        // rule that could match the file.
        let per_file = (facts.kernel_cache_candidate
            && enforced == Enforced::Allow
            && decision.action == Action::Allow
            && grant.is_none()
            && policy.engine.decides_alike_for_everyone(&subject))
        .then_some(policy.generation);
        Outcome {
            verdict,
            enforced,
            decision,
            subject,
            cached,
            grant,
            per_file,
        }
    }

    /// The SHA-256 of what will run: from the cache when this exact file
    /// version (device, inode, size, mtime, ctime) was hashed before;
    /// otherwise hashed once per version (a second exec of a version being
    /// hashed waits for the first), within the user's hashing budget, and
    /// only while the content is known to stay as hashed (see
    /// [`crate::gate::lease`]). A file that changed while it was hashed is
    /// hashed once more, under a lease if one can be taken now; then it is
    /// an error, answered per `fail_mode`.
    fn sha256_of(&self, facts: &ExecFacts) -> Result<Option<Sha256Digest>, DecideError> {
        let trust_identity = facts.stability != Stability::OpenForWriting;
        if trust_identity && let Some(digest) = self.hashes.get(&facts.file) {
            return Ok(Some(digest));
        }
        let hash_error = |source| DecideError::Hash {
            path: facts.path.clone(),
            source,
        };
        let Some(content) = facts.content_handle().map_err(hash_error)? else {
            return Ok(None);
        };
        let _hashing = self.in_flight.begin(facts.file);
        if trust_identity && let Some(digest) = self.hashes.get(&facts.file) {
            return Ok(Some(digest));
        }
        let unstable = |why| DecideError::Unstable {
            path: facts.path.clone(),
            why,
        };
        let mut stability = facts.stability;
        for attempt in 0..2 {
            let before = FileIdentity::of_file(&content).map_err(hash_error)?;
            if before != facts.file {
                // Written (or its mode changed) since the exec: another version.
                return Err(unstable("changed after the exec started"));
            }
            if !self.hash_budget.spend(facts.uid, before.size) {
                return Err(DecideError::HashBudget {
                    uid: facts.uid,
                    path: facts.path.clone(),
                    size: before.size,
                });
            }
            let started = jiff::Timestamp::now().as_nanosecond();
            let digest = hash_file_within(&content, Instant::now() + HASH_TIME_LIMIT).map_err(
                |e| match e.kind() {
                    io::ErrorKind::TimedOut => DecideError::HashTooSlow {
                        path: facts.path.clone(),
                    },
                    _ => hash_error(e),
                },
            )?;
            let after = FileIdentity::of_file(&content).map_err(hash_error)?;
            // Leased: nobody could write. Otherwise (or when a writer
            // asked for the lease meanwhile) the version must not have moved.
            let still = match stability {
                Stability::Leased if lease::holds(&content) => true,
                Stability::Leased | Stability::OnlyRootWrites | Stability::VersionChecked => {
                    before == after
                }
                Stability::OpenForWriting => false,
            };
            if still {
                let racy = i64::try_from(started)
                    .map(|at| before.is_racy(at))
                    .unwrap_or(true);
                if !racy {
                    self.hashes.insert(facts.file, digest);
                }
                return Ok(Some(digest));
            }
            if attempt == 0 && lease::take(&content) == Stability::Leased {
                // The writer is gone: hash what is there now, under a lease.
                stability = Stability::Leased;
                continue;
            }
            return Err(unstable(match stability {
                Stability::OpenForWriting => "stayed open for writing",
                _ => "changed while it was hashed",
            }));
        }
        Err(unstable("kept changing while it was hashed"))
    }

    fn context_fingerprint(&self, facts: &ExecFacts, groups: &[u32]) -> u64 {
        let mut hasher = self.fingerprint.build_hasher();
        // The path too: one inode can have several paths (hard links), and
        // path rules may treat them differently; and whether it was checked.
        facts.path.hash(&mut hasher);
        facts.path_origin.hash(&mut hasher);
        facts.gid.hash(&mut hasher);
        groups.hash(&mut hasher);
        facts.parent_path.hash(&mut hasher);
        facts.argv.hash(&mut hasher);
        facts.cdhash.hash(&mut hasher);
        facts.team_id.hash(&mut hasher);
        facts.signing_id.hash(&mut hasher);
        facts.bundle_id.hash(&mut hasher);
        facts.platform_binary.hash(&mut hasher);
        hasher.finish()
    }

    /// `groups`: the supplementary groups to judge by ([`supplementary`]).
    fn subject(
        &self,
        facts: &ExecFacts,
        supplementary: &[u32],
        sha256: Option<Sha256Digest>,
    ) -> Subject {
        let mut groups: Vec<String> = Vec::with_capacity(supplementary.len() + 1);
        for gid in std::iter::once(facts.gid).chain(supplementary.iter().copied()) {
            if let Some(name) = self.names.group(gid)
                && !groups.iter().any(|g| **g == *name)
            {
                groups.push(name.to_string());
            }
        }
        Subject {
            path: facts.path.clone(),
            path_origin: facts.path_origin,
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

/// Whether a `justify` or `approve` decision may use up a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grants {
    Use,
    Ignore,
}

/// The supplementary groups to judge `facts` by: the gate's, or the user
/// directory's when the gate could not see them
/// ([`ExecFacts::groups_from_directory`]).
fn supplementary<'a>(facts: &'a ExecFacts, directory: Option<&'a Arc<[u32]>>) -> &'a [u32] {
    directory.map_or(&facts.groups, |groups| groups)
}

/// Hashes a file through an already-open handle, from offset 0 whatever the
/// handle's position, without changing it (positioned reads).
pub fn hash_file(file: &std::fs::File) -> io::Result<Sha256Digest> {
    hash_file_within(file, Instant::now() + Duration::from_secs(u32::MAX.into()))
}

/// [`hash_file`], giving up with `TimedOut` once `deadline` has passed.
pub fn hash_file_within(file: &std::fs::File, deadline: Instant) -> io::Result<Sha256Digest> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut offset = 0u64;
    loop {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "hashing took too long",
            ));
        }
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

/// Sets `needs` to what `policy` needs, and tells its listeners that the
/// policy changed.
fn set_fact_needs(needs: &FactNeeds, policy: &PolicyState) {
    needs.set(
        policy.engine.uses_parent_path(),
        policy.engine.uses_group_scope(),
    );
    // No rule and no audit field uses the login uid yet: not read per exec
    // (a /proc open, read and close).
    needs.set_login_uid(false);
    needs.policy_changed();
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn state(document: &str, generation: u64) -> PolicyState {
        PolicyState {
            engine: Engine::from_json(document).unwrap(),
            generation,
            source: "test".into(),
            loaded_at: jiff::Timestamp::now(),
        }
    }

    fn deny_digest(digest: &str, version: u64) -> String {
        format!(
            r#"{{"version": {version}, "default_action": "allow", "rules": [
                {{"id": "bad", "action": "deny", "match": {{"sha256": "{digest}"}}}}]}}"#
        )
    }

    fn facts(file: &std::fs::File, path: &str) -> ExecFacts {
        let meta = file.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        let file_identity = FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
        };
        ExecFacts {
            ppid: 1,
            content: Some(file.try_clone().unwrap()),
            ..ExecFacts::new(4242, file_identity, path.into())
        }
    }

    fn digest_of(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn allow_all() -> Decider {
        Decider::new(
            state(r#"{"version": 1, "default_action": "allow"}"#, 1),
            Mode::Enforce,
            FailMode::Closed,
            "d".into(),
            64,
        )
    }

    /// What a gate's policy swap heard, and what was in force meanwhile.
    #[derive(Debug, Default)]
    struct HeardSwaps(Mutex<Vec<String>>);

    impl PolicySwap for HeardSwaps {
        fn starts_with(&self, generation: u64) {
            self.0.lock().unwrap().push(format!("start {generation}"));
        }

        fn swap(&self, generation: u64, put_in_force: &mut dyn FnMut()) {
            self.0.lock().unwrap().push(format!("swap {generation}"));
            put_in_force();
        }
    }

    #[test]
    fn the_gates_policy_swap_is_given_at_construction_and_hears_every_policy() {
        let heard = Arc::new(HeardSwaps::default());
        let decider = Decider::with_deps(
            state(r#"{"version": 1, "default_action": "allow"}"#, 7),
            Mode::Enforce,
            FailMode::Closed,
            "d".into(),
            64,
            DeciderDeps {
                interactive: None,
                policy_swap: Some(heard.clone()),
            },
        );
        // The first policy, before any exec could be decided under it.
        assert_eq!(*heard.0.lock().unwrap(), ["start 7"]);
        decider.set_policy(state(r#"{"version": 2, "default_action": "deny"}"#, 8));
        assert_eq!(*heard.0.lock().unwrap(), ["start 7", "swap 8"]);
        assert_eq!(
            decider.policy().generation,
            8,
            "put in force through the swap"
        );
    }

    #[test]
    fn a_new_policy_tells_the_gates_what_to_gather_without_being_asked() {
        let decider = allow_all();
        let needs = decider.fact_needs();
        assert!(!needs.parent_path());
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = heard.clone();
        needs.on_policy_change(Box::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));

        decider.set_policy(state(
            r#"{"version": 2, "default_action": "allow", "rules": [
                {"id": "sh-from-py", "action": "deny",
                 "match": {"name": "sh", "parent_path": "/usr/bin/python3"}}]}"#,
            2,
        ));
        assert!(needs.parent_path());
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 1);

        decider.set_policy(state(r#"{"version": 3, "default_action": "allow"}"#, 3));
        assert!(!needs.parent_path());
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A file of ours, and the gate's view of an exec of it.
    fn exec_of(dir: &std::path::Path, content: &[u8]) -> (std::path::PathBuf, ExecFacts) {
        // Each its own file: another write to a leased file would wait.
        let path = dir.join(format!(
            "tool-{}",
            hex::encode(&Sha256::digest(content)[..8])
        ));
        std::fs::write(&path, content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let stability = lease::take(&file);
        let facts = ExecFacts {
            stability,
            ..facts(&file, &path.display().to_string())
        };
        (path, facts)
    }

    #[test]
    fn a_leased_file_is_hashed_once_and_writers_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (path, facts) = exec_of(dir.path(), b"tool v1");
        if facts.stability == Stability::VersionChecked {
            eprintln!("no leases here");
            return;
        }
        assert_eq!(facts.stability, Stability::Leased);
        let decider = allow_all();
        let outcome = decider.decide(&facts).unwrap();
        assert_eq!(
            outcome.subject.sha256.unwrap().to_string(),
            digest_of(b"tool v1")
        );
        // Nobody can start writing while the gate holds the lease.
        use std::os::unix::fs::OpenOptionsExt;
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path);
        assert_eq!(writer.unwrap_err().raw_os_error(), Some(libc::EWOULDBLOCK));
    }

    #[test]
    fn a_file_changed_after_the_exec_began_is_never_allowed_on_its_old_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut facts) = exec_of(dir.path(), b"allowed bytes");
        // No lease (as on a file system without them): the version check
        // is all there is. A write after the gate identified the file:
        facts.stability = Stability::VersionChecked;
        facts.content = Some(std::fs::File::open(&path).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(5));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all(b"evil")
            .unwrap();
        let decider = Decider::new(
            state(&deny_digest(&digest_of(b"evilwed bytes"), 1), 1),
            Mode::Enforce,
            FailMode::Closed,
            "d".into(),
            64,
        );
        let error = decider.decide(&facts).unwrap_err();
        assert!(
            matches!(error, DecideError::Unstable { why, .. } if why.contains("changed after")),
            "{error}"
        );
    }

    #[test]
    fn a_file_open_for_writing_is_hashed_again_under_a_lease_or_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tool");
        let mut writer = std::fs::File::create(&path).unwrap();
        writer.write_all(b"v1").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let stability = lease::take(&file);
        if stability == Stability::VersionChecked {
            eprintln!("no leases here");
            return;
        }
        assert_eq!(stability, Stability::OpenForWriting);
        let facts = ExecFacts {
            stability,
            ..facts(&file, &path.display().to_string())
        };
        let decider = allow_all();
        let error = decider.decide(&facts).unwrap_err();
        assert!(
            matches!(error, DecideError::Unstable { why, .. } if why.contains("open for writing")),
            "{error}"
        );
        assert!(
            decider.decide_cached(&facts).is_none(),
            "never from a cache"
        );
        // The writer is gone: hashed under a lease now.
        drop(writer);
        let outcome = decider.decide(&facts).unwrap();
        assert_eq!(
            outcome.subject.sha256.unwrap().to_string(),
            digest_of(b"v1")
        );
    }

    #[test]
    fn each_user_hashes_within_a_budget_and_root_is_not_limited() {
        let dir = tempfile::tempdir().unwrap();
        let mut decider = allow_all();
        decider.hash_budget = HashBudget {
            rate: 1.0,
            burst: 100.0,
            users: Mutex::default(),
        };
        let mut versions = Vec::new();
        for i in 0..3u8 {
            let (_, mut facts) = exec_of(dir.path(), &[i; 80]);
            facts.uid = 1000;
            versions.push(facts);
        }
        // The first spends the burst (80 of 100), the second takes it into
        // debt, the third finds it spent.
        assert!(decider.decide(&versions[0]).is_ok());
        assert!(decider.decide(&versions[1]).is_ok());
        let error = decider.decide(&versions[2]).unwrap_err();
        assert!(
            matches!(error, DecideError::HashBudget { uid: 1000, .. }),
            "{error}"
        );
        let mut root = exec_of(dir.path(), &[9; 80]).1;
        root.uid = 0;
        assert!(decider.decide(&root).is_ok());
        let mut other = exec_of(dir.path(), &[8; 80]).1;
        other.uid = 1001;
        assert!(decider.decide(&other).is_ok(), "another user has their own");
    }

    #[test]
    fn a_version_younger_than_the_coarsest_timestamp_is_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let (_, fresh) = exec_of(dir.path(), b"just written");
        let decider = allow_all();
        decider.decide(&fresh).unwrap();
        assert!(
            decider.hashes.get(&fresh.file).is_none(),
            "racy: hashed again next time"
        );
        let old = FileIdentity {
            ctime_ns: 1_000_000_000,
            mtime_ns: 1_000_000_000,
            ..fresh.file
        };
        assert!(!old.is_racy(jiff::Timestamp::now().as_nanosecond() as i64));
        assert!(
            fresh
                .file
                .is_racy(jiff::Timestamp::now().as_nanosecond() as i64)
        );
        // A system binary, unchanged for long, is remembered.
        let system = std::fs::File::open("/bin/true").unwrap();
        let facts = facts(&system, "/bin/true");
        decider.decide(&facts).unwrap();
        assert!(decider.hashes.get(&facts.file).is_some());
    }

    #[test]
    fn a_path_from_another_mount_namespace_matches_no_path_rule() {
        let policy = r#"{"version": 1, "default_action": "deny", "rules": [
            {"id": "local-tools", "action": "allow", "match": {"path_glob": "/usr/local/bin/*"}}]}"#;
        let decider = Decider::new(
            state(policy, 1),
            Mode::Enforce,
            FailMode::Closed,
            "d".into(),
            64,
        );
        let file = std::fs::File::open("/bin/true").unwrap();
        let mut facts = facts(&file, "/usr/local/bin/tool");
        assert_eq!(decider.decide(&facts).unwrap().verdict, Verdict::Allow);
        facts.path_origin = epm_policy::PathOrigin::OtherNamespace;
        let outcome = decider.decide(&facts).unwrap();
        assert_eq!(outcome.verdict, Verdict::Deny, "not the cached allow");
        assert_eq!(outcome.decision.rule_id, None);
        let event = crate::exec::audit::exec_event(&decider, &outcome);
        assert_eq!(
            event.details.unwrap()["path_origin"],
            "other_mount_namespace"
        );
    }

    #[test]
    fn a_gate_without_groups_gets_the_users_from_the_directory() {
        let decider = Decider::new(
            state(&deny_digest(&digest_of(b"x"), 1), 1),
            Mode::Enforce,
            FailMode::Open,
            "dev".into(),
            64,
        );
        let file = tempfile::tempfile().unwrap();
        let nogroup = 65_534;
        let mut facts = facts(&file, "/x");
        // What the process had does not count when the gate could not see
        // it; what the directory says about uid 0 (root) does.
        facts.groups = vec![nogroup];
        facts.groups_from_directory = true;
        let directory = decider.names.member_groups(0, 0);
        let subject = decider.subject(&facts, supplementary(&facts, Some(&directory)), None);
        let expected: Vec<String> = decider
            .names
            .member_groups(0, 0)
            .iter()
            .filter_map(|&gid| decider.names.group(gid).map(|n| n.to_string()))
            .collect();
        assert_eq!(subject.groups, expected);
        assert!(subject.groups.contains(&"root".to_owned()));
        facts.groups_from_directory = false;
        let subject = decider.subject(&facts, supplementary(&facts, None), None);
        assert_eq!(subject.groups.len(), 2, "{:?}", subject.groups);

        // The gate thread never asks the directory: a user whose groups are
        // not known yet goes to a worker, which asks and caches.
        let mut daemon_user = ExecFacts {
            content: None,
            ..facts
        };
        (daemon_user.uid, daemon_user.gid) = (1, 1);
        daemon_user.groups_from_directory = true;
        assert!(decider.decide_cached(&daemon_user).is_none());
        assert!(!decider.decide(&daemon_user).unwrap().cached);
        assert!(decider.decide_cached(&daemon_user).is_some());
    }

    #[test]
    fn hashes_through_the_handle_and_caches_per_file_version() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"version one").unwrap();
        let decider = Decider::new(
            state(&deny_digest(&digest_of(b"version one"), 1), 1),
            Mode::Enforce,
            FailMode::Open,
            "dev".into(),
            64,
        );
        let first = decider.decide(&facts(&file, "/x")).unwrap();
        assert_eq!(first.verdict, Verdict::Deny);
        assert!(!first.cached);
        let second = decider.decide(&facts(&file, "/x")).unwrap();
        assert!(second.cached, "same file version, same policy: cached");

        // New content is a new file version: hashed again, rule no longer applies.
        std::thread::sleep(std::time::Duration::from_millis(10));
        file.write_all(b" and two").unwrap();
        let changed = decider.decide(&facts(&file, "/x")).unwrap();
        assert!(!changed.cached);
        assert_eq!(changed.verdict, Verdict::Allow);
        assert_eq!(
            changed.subject.sha256.unwrap().to_string(),
            digest_of(b"version one and two")
        );
    }

    #[test]
    fn a_new_policy_generation_never_reuses_a_decision_even_at_the_same_version() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"tool").unwrap();
        let allow_all = r#"{"version": 5, "default_action": "allow"}"#;
        let decider = Decider::new(
            state(allow_all, 1),
            Mode::Enforce,
            FailMode::Open,
            "d".into(),
            64,
        );
        assert_eq!(
            decider.decide(&facts(&file, "/t")).unwrap().verdict,
            Verdict::Allow
        );
        // Same author version, different content: only the generation differs.
        decider.set_policy(state(
            &deny_digest(&digest_of(b"tool"), 5),
            decider.next_generation(),
        ));
        let outcome = decider.decide(&facts(&file, "/t")).unwrap();
        assert_eq!(outcome.verdict, Verdict::Deny);
        assert!(!outcome.cached);
    }

    #[test]
    fn monitor_mode_allows_what_it_would_deny_and_counts_it() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"nc").unwrap();
        let policy = r#"{"version": 1, "default_action": "deny"}"#;
        let decider = Decider::new(
            state(policy, 1),
            Mode::Monitor,
            FailMode::Closed,
            "d".into(),
            64,
        );
        let outcome = decider.decide(&facts(&file, "/nc")).unwrap();
        assert_eq!(
            (outcome.verdict, outcome.enforced),
            (Verdict::Allow, Enforced::WouldDeny)
        );
        assert_eq!(Counters::get(&decider.counters.would_deny), 1);
        assert_eq!(decider.fail_verdict(), Verdict::Deny);
    }

    #[test]
    fn justify_and_approve_are_refused_without_a_grant() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"docker").unwrap();
        for action in ["justify", "approve"] {
            let policy = format!(
                r#"{{"version": 1, "default_action": "allow", "rules": [
                    {{"id": "r", "action": "{action}", "match": {{"name": "docker"}}}}]}}"#
            );
            let decider = Decider::new(
                state(&policy, 1),
                Mode::Enforce,
                FailMode::Open,
                "d".into(),
                64,
            );
            let outcome = decider.decide(&facts(&file, "/usr/bin/docker")).unwrap();
            assert_eq!(outcome.verdict, Verdict::Deny, "{action}");
            assert_eq!(outcome.decision.action.as_str(), action);
        }
    }
}
