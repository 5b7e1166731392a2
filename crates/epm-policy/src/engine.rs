//! The indexed evaluation engine.
//!
//! Each rule is indexed under its *key*, its most specific identity criterion:
//! a rule can only match when its key holds, so evaluation looks the subject
//! up in one map per criterion (and one compiled glob set) instead of scanning
//! every rule, then checks each candidate's remaining ("residual") criteria
//! and scope. Specificity levels are visited from most to least specific and
//! evaluation stops at the first level with a match, since a less specific
//! rule can never beat a more specific one.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use regex::{Regex, RegexBuilder};
use serde::Serialize;

use crate::digest::{CdHash, Sha256Digest};
use crate::model::{
    Action, AdminSessionRule, ApprovalSpec, Criteria, Criterion, ElevationRule, JustificationSpec,
    Policy, Rule, Scope, ScopeMatch,
};
use crate::subject::Subject;
use crate::validate::{PolicyError, PolicyErrors, REGEX_SIZE_LIMIT, parse_document};

/// Compiles a `path_glob` the one way both validation and the engine use:
/// `*` and `?` never cross a `/`, `**` does.
pub(crate) fn compile_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
}

/// Compiles an `args_regex` with a size cap, so no pattern can make the
/// daemon allocate without bound. The regex crate's matching is linear in the
/// input, so no pattern can make evaluation slow either.
pub(crate) fn compile_regex(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
}

/// The outcome of one evaluation, with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// The deciding rule, or `None` when the default action applied.
    pub rule_id: Option<Arc<str>>,
    /// The deciding rule's key criterion.
    pub criterion: Option<Criterion>,
    /// How the deciding rule's scope matched the subject.
    pub scope: Option<ScopeMatch>,
    /// The deciding rule's message for the user.
    pub message: Option<Arc<str>>,
    /// The version of the policy that decided.
    pub policy_version: u64,
}

impl Decision {
    /// One line saying why: which rule, by which criterion, for which scope.
    pub fn reason(&self) -> String {
        match (&self.rule_id, self.criterion, self.scope) {
            (Some(id), Some(criterion), Some(scope)) => {
                format!("rule {id:?} matched by {criterion} ({scope} scope)")
            }
            _ => "no rule matched: default action".to_owned(),
        }
    }
}

/// One criterion a candidate must still satisfy after its key matched.
#[derive(Debug)]
enum Residual {
    Cdhash(CdHash),
    Sha256(Sha256Digest),
    SigningId(Box<str>),
    TeamId(Box<str>),
    Path(Box<str>),
    PathGlob(GlobMatcher),
    Name(Box<str>),
    BundleId(Box<str>),
    PlatformBinary(bool),
    ArgsRegex(Regex),
    ParentPath(Box<str>),
}

impl Residual {
    fn holds(&self, subject: &Subject, name: &str) -> bool {
        match self {
            Residual::Cdhash(d) => subject.cdhash.as_ref() == Some(d),
            Residual::Sha256(d) => subject.sha256.as_ref() == Some(d),
            Residual::SigningId(v) => subject.signing_id.as_deref() == Some(&**v),
            Residual::TeamId(v) => subject.team_id.as_deref() == Some(&**v),
            // A path the user may have forged meets no path criterion.
            Residual::Path(v) => subject.path_origin.trusted() && subject.path == **v,
            Residual::PathGlob(m) => subject.path_origin.trusted() && m.is_match(&subject.path),
            Residual::Name(v) => subject.path_origin.trusted() && name == &**v,
            Residual::BundleId(v) => subject.bundle_id.as_deref() == Some(&**v),
            Residual::PlatformBinary(v) => subject.platform_binary == Some(*v),
            Residual::ArgsRegex(re) => subject
                .argv
                .as_ref()
                .is_some_and(|argv| re.is_match(&argv.join(" "))),
            Residual::ParentPath(v) => subject.parent_path.as_deref() == Some(&**v),
        }
    }
}

/// A rule as the engine keeps it: small, because there may be 100 000.
/// Its id is a span of the engine's one string of ids, and what many
/// rules share (a scope, the default justification and approval) is one
/// allocation shared by all of them.
#[derive(Debug)]
struct CompiledRule {
    id: IdSpan,
    action: Action,
    key: Criterion,
    residual: Box<[Residual]>,
    scope: Option<Arc<Scope>>,
    message: Option<Arc<str>>,
    justification: Option<Arc<JustificationSpec>>,
    approval: Option<Arc<ApprovalSpec>>,
}

/// Where a rule's id is in [`Engine::ids`]: start and length in bytes.
#[derive(Debug, Clone, Copy)]
struct IdSpan(u32, u32);

/// The text of `span` in `ids` (empty if it were out of bounds).
fn id_of(ids: &str, span: IdSpan) -> &str {
    let start = span.0 as usize;
    ids.get(start..start + span.1 as usize).unwrap_or_default()
}

impl CompiledRule {
    /// How this rule's scope matches the subject, or `None` if it does not apply.
    fn scope_match(&self, subject: &Subject) -> Option<ScopeMatch> {
        scope_match(self.scope.as_deref(), subject)
    }
}

/// How a scope matches the subject, or `None` if it does not apply.
fn scope_match(scope: Option<&Scope>, subject: &Subject) -> Option<ScopeMatch> {
    let Some(scope) = scope else {
        return Some(ScopeMatch::General);
    };
    if scope.users.contains(&subject.user) {
        Some(ScopeMatch::User)
    } else if scope.groups.iter().any(|g| subject.groups.contains(g)) {
        Some(ScopeMatch::Group)
    } else if scope.devices.contains(&subject.device_id) {
        Some(ScopeMatch::Device)
    } else {
        None
    }
}

/// The elevation rules, one engine per run-as user: a rule only ever
/// decides elevations to its own `run_as`.
/// Edit rules (`"edit": true`, for sudoedit) are kept apart: they decide
/// editing a file, never running a command, and the other way round.
#[derive(Debug, Default)]
struct ElevationEngines {
    by_run_as: HashMap<String, Engine>,
    edit_by_run_as: HashMap<String, Engine>,
    /// Each rule's extra environment variables, by id.
    env: HashMap<String, Vec<String>>,
    /// The paths the rules spell out, for the daemon to resolve.
    spellings: Vec<String>,
}

impl ElevationEngines {
    fn new(rules: Vec<ElevationRule>, version: u64) -> Result<Self, PolicyErrors> {
        let mut spellings: Vec<String> = rules
            .iter()
            .filter_map(|r| literal_spelling(&r.criteria))
            .collect();
        spellings.sort();
        spellings.dedup();
        let (edit, run): (Vec<_>, Vec<_>) = rules.into_iter().partition(|r| r.edit);
        let env = run
            .iter()
            .filter(|r| !r.env.is_empty())
            .map(|r| (r.id.clone(), r.env.clone()))
            .collect();
        Ok(Self {
            by_run_as: Self::compile(run, version)?,
            edit_by_run_as: Self::compile(edit, version)?,
            env,
            spellings,
        })
    }

    fn compile(
        rules: Vec<ElevationRule>,
        version: u64,
    ) -> Result<HashMap<String, Engine>, PolicyErrors> {
        let mut grouped: HashMap<String, Vec<Rule>> = HashMap::new();
        for rule in rules {
            let as_rule = rule.as_rule();
            grouped.entry(rule.run_as).or_default().push(as_rule);
        }
        let mut by_run_as = HashMap::with_capacity(grouped.len());
        for (run_as, rules) in grouped {
            let mut builder = EngineBuilder::new();
            for rule in rules {
                builder.add(rule);
            }
            // Nothing is elevated unless a rule allows it.
            let mut engine = builder.finish(version, Action::Deny, Vec::new(), Vec::new())?;
            engine.arguments_first = true;
            by_run_as.insert(run_as, engine);
        }
        Ok(by_run_as)
    }
}

/// The path a rule spells out literally: its `path`, or its
/// `path_glob`'s directory before the first wildcard.
fn literal_spelling(criteria: &crate::model::Criteria) -> Option<String> {
    if let Some(path) = &criteria.path {
        return Some(path.clone());
    }
    let glob = criteria.path_glob.as_deref()?;
    let fixed = &glob[..glob.find(['*', '?', '[', '{']).unwrap_or(glob.len())];
    let dir = &fixed[..fixed.rfind('/')?];
    (!dir.is_empty()).then(|| dir.to_owned())
}

/// The admin-session entry that applies to a user.
#[derive(Debug, Clone, Copy)]
pub struct AdminSessionMatch<'a> {
    /// The entry.
    pub rule: &'a AdminSessionRule,
    /// How its scope matched.
    pub scope: ScopeMatch,
}

/// Rule indices under one index key, in four bytes: nearly every key has
/// one rule, which is the value itself; a key with several has
/// [`Bucket::SHARED`] set and the rest is its place in the engine's
/// `shared` lists. (An enum of one index or a vector took 32 bytes per
/// key: 3 MB of 100 000 rules.)
#[derive(Debug, Clone, Copy)]
struct Bucket(u32);

impl Bucket {
    const SHARED: u32 = 1 << 31;

    /// The rules under this key.
    fn rules<'a>(&'a self, shared: &'a [Vec<u32>]) -> &'a [u32] {
        match self.0 & Self::SHARED {
            0 => std::slice::from_ref(&self.0),
            _ => shared
                .get((self.0 & !Self::SHARED) as usize)
                .map_or(&[], Vec::as_slice),
        }
    }
}

/// An index from a string criterion's value to its rules.
type StringIndex = HashMap<Box<str>, Bucket>;

/// Files rule `index` under `key`; `shared` holds the lists of keys with
/// more than one rule. Rule indices stay below [`Bucket::SHARED`]
/// ([`EngineBuilder::add`] refuses more rules).
fn add<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Bucket>,
    shared: &mut Vec<Vec<u32>>,
    key: K,
    index: u32,
) {
    let bucket = map.entry(key).or_insert(Bucket(index));
    if bucket.0 == index {
        return;
    }
    if bucket.0 & Bucket::SHARED == 0 {
        let Ok(list) = u32::try_from(shared.len()) else {
            return;
        };
        shared.push(vec![bucket.0]);
        *bucket = Bucket(list | Bucket::SHARED);
    }
    if let Some(list) = shared.get_mut((bucket.0 & !Bucket::SHARED) as usize) {
        list.push(index);
    }
}

fn engine_uses_parent_path(rules: &[CompiledRule]) -> bool {
    rules.iter().any(|r| {
        r.residual
            .iter()
            .any(|c| matches!(c, Residual::ParentPath(_)))
    })
}

/// Facts about one rule, for callers that act on a decision (prompts need the
/// justification spec, approval requests the approval spec).
#[derive(Debug, Clone, Copy)]
pub struct RuleInfo<'a> {
    /// The rule id.
    pub id: &'a str,
    /// The rule's action.
    pub action: Action,
    /// The rule's key criterion.
    pub key: Criterion,
    /// The rule's message, if any.
    pub message: Option<&'a str>,
    /// Justification settings (defaults for a rule that gives none).
    pub justification: Option<&'a JustificationSpec>,
    /// Approval settings (defaults for an approve rule that gives none).
    pub approval: Option<&'a ApprovalSpec>,
}

/// A policy compiled for evaluation.
#[derive(Debug)]
pub struct Engine {
    version: u64,
    default_action: Action,
    rules: Vec<CompiledRule>,
    /// Every rule's id, one after the other ([`IdSpan`]).
    ids: Box<str>,
    /// Rule indices sorted by id, for [`Engine::rule`].
    by_id: Box<[u32]>,
    /// The rule lists of index keys with more than one rule ([`Bucket`]).
    shared: Vec<Vec<u32>>,
    by_cdhash: HashMap<CdHash, Bucket>,
    by_sha256: HashMap<Sha256Digest, Bucket>,
    by_signing_id: StringIndex,
    by_team_id: StringIndex,
    by_path: StringIndex,
    globs: GlobSet,
    /// `glob_rules[i]` is the rule owning glob `i` of `globs`.
    glob_rules: Vec<u32>,
    by_name: StringIndex,
    uses_parent_path: bool,
    uses_group_scope: bool,
    /// Between rules of equal key and scope, one with `args_regex` wins
    /// before strictness is looked at: true for elevation, where the command
    /// line is always known and "allow `apt update`, justify any other
    /// `apt`" must be expressible.
    arguments_first: bool,
    /// Rules for commands run as another user (empty for most policies).
    elevation: Box<ElevationEngines>,
    admin_session: Vec<AdminSessionRule>,
}

/// Collects rules into index maps; the glob set is compiled once at the end.
struct EngineBuilder {
    rules: Vec<CompiledRule>,
    ids: String,
    shared: Vec<Vec<u32>>,
    /// Each distinct scope once, shared by its rules.
    scopes: HashMap<Scope, Arc<Scope>>,
    default_justification: Arc<JustificationSpec>,
    default_approval: Arc<ApprovalSpec>,
    by_cdhash: HashMap<CdHash, Bucket>,
    by_sha256: HashMap<Sha256Digest, Bucket>,
    by_signing_id: StringIndex,
    by_team_id: StringIndex,
    by_path: StringIndex,
    globs: GlobSetBuilder,
    glob_rules: Vec<u32>,
    by_name: StringIndex,
    /// The first problem met while compiling (validation has already run, so
    /// this only catches a caller that built a `Policy` by hand).
    error: Option<PolicyError>,
}

impl EngineBuilder {
    fn new() -> Self {
        Self {
            rules: Vec::new(),
            ids: String::new(),
            shared: Vec::new(),
            scopes: HashMap::new(),
            default_justification: Arc::default(),
            default_approval: Arc::default(),
            by_cdhash: HashMap::new(),
            by_sha256: HashMap::new(),
            by_signing_id: HashMap::new(),
            by_team_id: HashMap::new(),
            by_path: HashMap::new(),
            globs: GlobSetBuilder::new(),
            glob_rules: Vec::new(),
            by_name: HashMap::new(),
            error: None,
        }
    }

    fn add(&mut self, rule: Rule) {
        if self.error.is_some() {
            return;
        }
        let Some(key) = rule.criteria.key() else {
            self.fail(&rule.id, "match", "names no identity criterion".into());
            return;
        };
        let index = match u32::try_from(self.rules.len()) {
            Ok(index) if index < Bucket::SHARED => index,
            _ => {
                self.fail(&rule.id, "", "too many rules".into());
                return;
            }
        };
        let Criteria {
            path,
            path_glob,
            name,
            sha256,
            cdhash,
            team_id,
            signing_id,
            bundle_id,
            platform_binary,
            args_regex,
            parent_path,
        } = rule.criteria;
        let mut residual = Vec::new();

        // The key goes into its index; every other criterion is residual.
        match (key, cdhash) {
            (Criterion::Cdhash, Some(d)) => add(&mut self.by_cdhash, &mut self.shared, d, index),
            (_, Some(d)) => residual.push(Residual::Cdhash(d)),
            (_, None) => {}
        }
        match (key, sha256) {
            (Criterion::Sha256, Some(d)) => add(&mut self.by_sha256, &mut self.shared, d, index),
            (_, Some(d)) => residual.push(Residual::Sha256(d)),
            (_, None) => {}
        }
        match (key, signing_id) {
            (Criterion::SigningId, Some(v)) => {
                add(&mut self.by_signing_id, &mut self.shared, v.into(), index)
            }
            (_, Some(v)) => residual.push(Residual::SigningId(v.into())),
            (_, None) => {}
        }
        match (key, team_id) {
            (Criterion::TeamId, Some(v)) => {
                add(&mut self.by_team_id, &mut self.shared, v.into(), index)
            }
            (_, Some(v)) => residual.push(Residual::TeamId(v.into())),
            (_, None) => {}
        }
        match (key, path) {
            (Criterion::Path, Some(v)) => add(&mut self.by_path, &mut self.shared, v.into(), index),
            (_, Some(v)) => residual.push(Residual::Path(v.into())),
            (_, None) => {}
        }
        if let Some(pattern) = path_glob {
            match compile_glob(&pattern) {
                Ok(glob) if key == Criterion::PathGlob => {
                    self.globs.add(glob);
                    self.glob_rules.push(index);
                }
                Ok(glob) => residual.push(Residual::PathGlob(glob.compile_matcher())),
                Err(e) => {
                    self.fail(&rule.id, "match.path_glob", e.kind().to_string());
                    return;
                }
            }
        }
        match (key, name) {
            (Criterion::Name, Some(v)) => add(&mut self.by_name, &mut self.shared, v.into(), index),
            (_, Some(v)) => residual.push(Residual::Name(v.into())),
            (_, None) => {}
        }
        if let Some(v) = bundle_id {
            residual.push(Residual::BundleId(v.into()));
        }
        if let Some(v) = platform_binary {
            residual.push(Residual::PlatformBinary(v));
        }
        if let Some(pattern) = args_regex {
            match compile_regex(&pattern) {
                Ok(re) => residual.push(Residual::ArgsRegex(re)),
                Err(e) => {
                    self.fail(&rule.id, "match.args_regex", e.to_string());
                    return;
                }
            }
        }
        if let Some(v) = parent_path {
            residual.push(Residual::ParentPath(v.into()));
        }
        let justification = match (rule.justification, rule.action) {
            (Some(spec), _) => Some(Arc::new(spec)),
            (None, Action::Justify | Action::Approve) => Some(self.default_justification.clone()),
            (None, _) => None,
        };
        let approval = match (rule.approval, rule.action) {
            (Some(spec), _) => Some(Arc::new(spec)),
            (None, Action::Approve) => Some(self.default_approval.clone()),
            (None, _) => None,
        };
        let scope = rule.scope.map(|scope| {
            self.scopes
                .entry(scope)
                .or_insert_with_key(|scope| Arc::new(scope.clone()))
                .clone()
        });
        let (Ok(start), Ok(len)) = (u32::try_from(self.ids.len()), u32::try_from(rule.id.len()))
        else {
            self.fail(&rule.id, "id", "the rule ids are too long together".into());
            return;
        };
        self.ids.push_str(&rule.id);
        self.rules.push(CompiledRule {
            id: IdSpan(start, len),
            action: rule.action,
            key,
            residual: residual.into_boxed_slice(),
            scope,
            message: rule.message.map(Arc::from),
            justification,
            approval,
        });
    }

    fn fail(&mut self, rule: &str, field: &str, message: String) {
        self.error.get_or_insert(PolicyError {
            rule: Some(rule.to_owned()),
            field: field.to_owned(),
            message,
        });
    }

    fn finish(
        self,
        version: u64,
        default_action: Action,
        elevation: Vec<ElevationRule>,
        admin_session: Vec<AdminSessionRule>,
    ) -> Result<Engine, PolicyErrors> {
        if let Some(error) = self.error {
            return Err(PolicyErrors(vec![error]));
        }
        let globs = self.globs.build().map_err(|e| {
            PolicyErrors(vec![PolicyError {
                rule: None,
                field: "rules[].match.path_glob".into(),
                message: format!("the globs together are too complex to compile: {e}"),
            }])
        })?;
        let ids: Box<str> = self.ids.into_boxed_str();
        let mut by_id: Vec<u32> = (0..self.rules.len() as u32).collect();
        by_id.sort_unstable_by(|a, b| {
            let id = |i: &u32| id_of(&ids, self.rules[*i as usize].id);
            id(a).cmp(id(b)).then(a.cmp(b))
        });
        if let Some(pair) = by_id.windows(2).find(|pair| {
            id_of(&ids, self.rules[pair[0] as usize].id)
                == id_of(&ids, self.rules[pair[1] as usize].id)
        }) {
            return Err(PolicyErrors(vec![PolicyError {
                rule: Some(id_of(&ids, self.rules[pair[1] as usize].id).to_owned()),
                field: "id".to_owned(),
                message: "duplicate rule id".into(),
            }]));
        }
        let uses_parent_path = engine_uses_parent_path(&self.rules);
        let uses_group_scope = self
            .rules
            .iter()
            .any(|r| r.scope.as_ref().is_some_and(|s| !s.groups.is_empty()));
        let mut engine = Engine {
            uses_parent_path,
            uses_group_scope,
            version,
            default_action,
            rules: self.rules,
            ids,
            by_id: by_id.into_boxed_slice(),
            shared: self.shared,
            by_cdhash: self.by_cdhash,
            by_sha256: self.by_sha256,
            by_signing_id: self.by_signing_id,
            by_team_id: self.by_team_id,
            by_path: self.by_path,
            globs,
            glob_rules: self.glob_rules,
            by_name: self.by_name,
            arguments_first: false,
            elevation: if elevation.is_empty() {
                Box::default()
            } else {
                Box::new(ElevationEngines::new(elevation, version)?)
            },
            admin_session,
        };
        engine.rules.shrink_to_fit();
        Ok(engine)
    }
}

impl Engine {
    /// Compiles a validated policy.
    ///
    /// Fails only when the policy was built by hand with a rule that
    /// [`Policy::from_json`] would have rejected, or when the globs together
    /// exceed the glob compiler's size limit.
    pub fn new(policy: Policy) -> Result<Engine, PolicyErrors> {
        let mut builder = EngineBuilder::new();
        for rule in policy.rules {
            builder.add(rule);
        }
        builder.finish(
            policy.version,
            policy.default_action,
            policy.elevation,
            policy.admin_session,
        )
    }

    /// Parses, validates and compiles a policy document in one pass, without
    /// ever holding the whole document as a [`Policy`]: the way to load a
    /// large policy.
    pub fn from_json(text: &str) -> Result<Engine, PolicyErrors> {
        let mut builder = EngineBuilder::new();
        let header = parse_document(text, |rule| builder.add(rule))?;
        debug_assert_eq!(header.rule_count, builder.rules.len());
        builder.finish(
            header.version,
            header.default_action,
            header.elevation,
            header.admin_session,
        )
    }

    /// A policy with no rules: every exec gets `default_action`.
    pub fn empty(version: u64, default_action: Action) -> Engine {
        Engine {
            version,
            default_action,
            rules: Vec::new(),
            ids: Box::default(),
            by_id: Box::default(),
            shared: Vec::new(),
            by_cdhash: HashMap::new(),
            by_sha256: HashMap::new(),
            by_signing_id: HashMap::new(),
            by_team_id: HashMap::new(),
            by_path: HashMap::new(),
            globs: GlobSet::empty(),
            glob_rules: Vec::new(),
            by_name: HashMap::new(),
            uses_parent_path: false,
            uses_group_scope: false,
            arguments_first: false,
            elevation: Box::default(),
            admin_session: Vec::new(),
        }
    }

    /// Whether any rule has a `parent_path` criterion: gates skip finding
    /// the parent's executable (a costly lookup on every exec) when none does.
    pub fn uses_parent_path(&self) -> bool {
        self.uses_parent_path
    }

    /// Whether any rule is scoped to groups: gates skip reading each
    /// process's supplementary groups when none is.
    pub fn uses_group_scope(&self) -> bool {
        self.uses_group_scope
    }

    /// Whether any rule that does not allow is keyed by content (`sha256`,
    /// `cdhash`): then a file whose content cannot be pinned (served by a
    /// FUSE process, a memfd still writable) might be such a program
    /// whatever the daemon read, and must not be allowed by default.
    pub fn restricts_by_content(&self) -> bool {
        self.rules.iter().any(|r| {
            r.action != Action::Allow && matches!(r.key, Criterion::Sha256 | Criterion::Cdhash)
        })
    }

    /// The policy's version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The policy's default action.
    pub fn default_action(&self) -> Action {
        self.default_action
    }

    /// How many rules the policy has.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Looks a rule up by id.
    pub fn rule(&self, id: &str) -> Option<RuleInfo<'_>> {
        let at = self
            .by_id
            .binary_search_by(|&i| {
                self.rules
                    .get(i as usize)
                    .map_or("", |rule| id_of(&self.ids, rule.id))
                    .cmp(id)
            })
            .ok()?;
        let rule = self.rules.get(*self.by_id.get(at)? as usize)?;
        Some(RuleInfo {
            id: id_of(&self.ids, rule.id),
            action: rule.action,
            key: rule.key,
            message: rule.message.as_deref(),
            justification: rule.justification.as_deref(),
            approval: rule.approval.as_deref(),
        })
    }

    /// Decides running a command as `run_as`: the elevation rules for that
    /// user, ranked like exec rules; no matching rule means `deny`.
    /// `subject.argv` is the command line, which `args_regex` matches.
    pub fn evaluate_elevation(&self, subject: &Subject, run_as: &str) -> Decision {
        self.elevation_in(&self.elevation.by_run_as, subject, run_as)
    }

    /// Decides editing a file as `run_as` (sudoedit): the edit rules for
    /// that user, on `subject.path`, the edited file; no matching rule
    /// means `deny`.
    pub fn evaluate_edit(&self, subject: &Subject, run_as: &str) -> Decision {
        self.elevation_in(&self.elevation.edit_by_run_as, subject, run_as)
    }

    fn elevation_in(
        &self,
        engines: &HashMap<String, Engine>,
        subject: &Subject,
        run_as: &str,
    ) -> Decision {
        match engines.get(run_as) {
            Some(engine) => engine.evaluate(subject),
            None => Decision {
                action: Action::Deny,
                rule_id: None,
                criterion: None,
                scope: None,
                message: None,
                policy_version: self.version,
            },
        }
    }

    /// Looks an elevation rule (edit rules too) up by id, with the user it
    /// runs as.
    pub fn elevation_rule(&self, id: &str) -> Option<(RuleInfo<'_>, &str)> {
        let elevation = &self.elevation;
        elevation
            .by_run_as
            .iter()
            .chain(elevation.edit_by_run_as.iter())
            .find_map(|(run_as, engine)| Some((engine.rule(id)?, run_as.as_str())))
    }

    /// The paths elevation rules spell out literally: each `path`, and
    /// each `path_glob`'s directory before its first wildcard. Rules are
    /// matched against a program's canonical path; the daemon resolves
    /// these (through links only root can change) so that a rule written
    /// as `/bin/*sh` also decides `/usr/bin/bash` where `/bin` is a link
    /// to `/usr/bin`.
    pub fn elevation_spellings(&self) -> &[String] {
        &self.elevation.spellings
    }

    /// The variables, beyond the allow-list, that elevation rule `id` lets
    /// sudo pass to its command (its `env`).
    pub fn elevation_env(&self, id: &str) -> &[String] {
        self.elevation.env.get(id).map_or(&[], Vec::as_slice)
    }

    /// Whether the policy has any elevation rule.
    pub fn has_elevation_rules(&self) -> bool {
        !self.elevation.by_run_as.is_empty() || !self.elevation.edit_by_run_as.is_empty()
    }

    /// The admin-session entry for this user: the one whose scope matches
    /// most specifically, the earlier between equals. `None` means no
    /// sessions for them.
    pub fn admin_session(&self, subject: &Subject) -> Option<AdminSessionMatch<'_>> {
        let mut best: Option<AdminSessionMatch<'_>> = None;
        for rule in &self.admin_session {
            let Some(scope) = scope_match(rule.scope.as_ref(), subject) else {
                continue;
            };
            if best.is_none_or(|b| scope > b.scope) {
                best = Some(AdminSessionMatch { rule, scope });
            }
        }
        best
    }

    /// Looks an admin-session entry up by id.
    pub fn admin_session_rule(&self, id: &str) -> Option<&AdminSessionRule> {
        self.admin_session.iter().find(|r| r.id == id)
    }

    /// Decides one exec.
    pub fn evaluate(&self, subject: &Subject) -> Decision {
        let name = subject.name();
        let mut best = None;
        // Levels from most to least specific; stop at the first with a match.
        'levels: {
            if let Some(d) = &subject.cdhash
                && let Some(b) = self.by_cdhash.get(d)
            {
                self.consider(b.rules(&self.shared), subject, name, &mut best);
            }
            if let Some(d) = &subject.sha256
                && let Some(b) = self.by_sha256.get(d)
            {
                self.consider(b.rules(&self.shared), subject, name, &mut best);
            }
            if best.is_some() {
                break 'levels;
            }
            // A path the user may have forged matches no path rule.
            let path = subject
                .path_origin
                .trusted()
                .then_some(subject.path.as_str());
            let string_levels: [(&StringIndex, Option<&str>); 3] = [
                (&self.by_signing_id, subject.signing_id.as_deref()),
                (&self.by_team_id, subject.team_id.as_deref()),
                (&self.by_path, path),
            ];
            for (map, value) in string_levels {
                if let Some(b) = value.and_then(|v| map.get(v)) {
                    self.consider(b.rules(&self.shared), subject, name, &mut best);
                }
                if best.is_some() {
                    break 'levels;
                }
            }
            let Some(path) = path else {
                break 'levels;
            };
            if !self.glob_rules.is_empty() {
                let hits: Vec<u32> = self
                    .globs
                    .matches(path)
                    .into_iter()
                    .filter_map(|g| self.glob_rules.get(g).copied())
                    .collect();
                self.consider(&hits, subject, name, &mut best);
                if best.is_some() {
                    break 'levels;
                }
            }
            if let Some(b) = self.by_name.get(name) {
                self.consider(b.rules(&self.shared), subject, name, &mut best);
            }
        }

        match best.and_then(|b| Some((b.scope, self.rules.get(b.index as usize)?))) {
            Some((scope, rule)) => Decision {
                action: rule.action,
                rule_id: Some(Arc::from(id_of(&self.ids, rule.id))),
                criterion: Some(rule.key),
                scope: Some(scope),
                message: rule.message.clone(),
                policy_version: self.version,
            },
            None => Decision {
                action: self.default_action,
                rule_id: None,
                criterion: None,
                scope: None,
                message: None,
                policy_version: self.version,
            },
        }
    }

    /// Whether this policy decides the file `subject` names alike for
    /// every user, group, parent and argument list: no rule that could
    /// match the file (its identity criteria, path included, hold for
    /// it) has a user or group scope, an `args_regex` or a `parent_path`.
    /// Then [`Engine::evaluate`] gives every process the same decision for
    /// this file, on this device, under this policy, and a gate may
    /// remember it per file (the Linux kernel cache of allows). Every
    /// specificity level is looked at, not only the deciding one, so the
    /// answer is conservative. The subject's user, groups, parent and argv
    /// are ignored; its path must be trusted ([`PathOrigin::Local`]), or
    /// the answer is `false`.
    ///
    /// [`PathOrigin::Local`]: crate::PathOrigin::Local
    pub fn decides_alike_for_everyone(&self, subject: &Subject) -> bool {
        if !subject.path_origin.trusted() {
            return false;
        }
        let name = subject.name();
        let alike = |candidates: &[u32]| {
            candidates.iter().all(|&index| {
                let Some(rule) = self.rules.get(index as usize) else {
                    return true;
                };
                let file_criteria_hold = rule.residual.iter().all(|r| match r {
                    Residual::ArgsRegex(_) | Residual::ParentPath(_) => true,
                    other => other.holds(subject, name),
                });
                if !file_criteria_hold {
                    // Never matches this file, whoever runs it.
                    return true;
                }
                let depends_on_process = rule
                    .residual
                    .iter()
                    .any(|r| matches!(r, Residual::ArgsRegex(_) | Residual::ParentPath(_)));
                let depends_on_user = rule
                    .scope
                    .as_ref()
                    .is_some_and(|s| !s.users.is_empty() || !s.groups.is_empty());
                !depends_on_process && !depends_on_user
            })
        };
        let bucket = |b: Option<&Bucket>| b.map_or(&[][..], |b| b.rules(&self.shared)).to_vec();
        let mut levels: Vec<Vec<u32>> = Vec::with_capacity(7);
        if let Some(d) = &subject.cdhash {
            levels.push(bucket(self.by_cdhash.get(d)));
        }
        if let Some(d) = &subject.sha256 {
            levels.push(bucket(self.by_sha256.get(d)));
        }
        if let Some(v) = &subject.signing_id {
            levels.push(bucket(self.by_signing_id.get(v.as_str())));
        }
        if let Some(v) = &subject.team_id {
            levels.push(bucket(self.by_team_id.get(v.as_str())));
        }
        levels.push(bucket(self.by_path.get(subject.path.as_str())));
        if !self.glob_rules.is_empty() {
            levels.push(
                self.globs
                    .matches(&subject.path)
                    .into_iter()
                    .filter_map(|g| self.glob_rules.get(g).copied())
                    .collect(),
            );
        }
        levels.push(bucket(self.by_name.get(name)));
        levels.iter().all(|level| alike(level))
    }

    /// Checks candidates of one specificity level and keeps the best match:
    /// the most specific scope, then the strictest action, then the earliest
    /// rule (so that evaluation is deterministic).
    fn consider(&self, candidates: &[u32], subject: &Subject, name: &str, best: &mut Option<Best>) {
        for &index in candidates {
            let Some(rule) = self.rules.get(index as usize) else {
                continue;
            };
            if !rule.residual.iter().all(|r| r.holds(subject, name)) {
                continue;
            }
            let Some(scope) = rule.scope_match(subject) else {
                continue;
            };
            let candidate = Best {
                scope,
                by_arguments: self.arguments_first
                    && rule
                        .residual
                        .iter()
                        .any(|r| matches!(r, Residual::ArgsRegex(_))),
                action: rule.action,
                index,
            };
            if best.is_none_or(|b| candidate.beats(&b)) {
                *best = Some(candidate);
            }
        }
    }
}

/// The best match found so far within one specificity level.
#[derive(Debug, Clone, Copy)]
struct Best {
    scope: ScopeMatch,
    /// The rule names the command line (elevation engines only).
    by_arguments: bool,
    action: Action,
    index: u32,
}

impl Best {
    fn beats(&self, other: &Best) -> bool {
        let rank = |b: &Best| {
            (
                b.scope,
                b.by_arguments,
                b.action,
                std::cmp::Reverse(b.index),
            )
        };
        rank(self) > rank(other)
    }
}
