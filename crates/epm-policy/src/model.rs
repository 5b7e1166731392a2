//! The policy document: what administrators write and the platform signs.
//!
//! Field names are a compatibility promise: policies written today must keep
//! parsing, so every struct rejects unknown fields (a typo is an error, not a
//! silently ignored criterion) and new fields are only ever added as optional.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::{CdHash, Sha256Digest};

/// A complete policy document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Version chosen by the author or the platform, named in decisions and
    /// audit records: bump it on every change so they tell policies apart.
    pub version: u64,
    /// What happens to an exec that no rule matches.
    pub default_action: Action,
    /// The rules. Precedence decides between matching rules; position only
    /// breaks a full tie (the earlier rule wins).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Rules for running a command as another user (`epmctl run`, sudo).
    /// Nothing is elevated unless one of them allows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub elevation: Vec<ElevationRule>,
    /// Who may become an administrator for a while, per scope. Without an
    /// entry that applies, nobody may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admin_session: Vec<AdminSessionRule>,
}

/// What to do with an exec.
///
/// The variants are declared from least to most strict, so `Ord` is
/// strictness: when two rules tie on specificity and scope, the greater wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Run it.
    Allow,
    /// Run it once the user has written a justification.
    Justify,
    /// Run it once approvers have approved a request, inside its window.
    Approve,
    /// Never run it.
    Deny,
}

impl Action {
    /// The name used in policies and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Justify => "justify",
            Action::Approve => "approve",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule: which executables (`match`), for whom (`scope`), and what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique within the policy; named in decisions and audit records.
    pub id: String,
    /// What to do when the rule decides.
    pub action: Action,
    /// Every criterion named here must hold for the rule to match.
    #[serde(rename = "match")]
    pub criteria: Criteria,
    /// Who the rule applies to; absent means everyone on every device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Shown to the user (and audited) when this rule decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the justification is collected (`justify` and `approve` rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<JustificationSpec>,
    /// How approval works (`approve` rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
}

/// Match criteria. All that are present must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Criteria {
    /// Exact absolute path of the executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Glob on the path: `*` stays within one path component, `**` crosses them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_glob: Option<String>,
    /// The executable's file name, exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// SHA-256 of the executable file, hex, any case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Sha256Digest>,
    /// Apple CDHash of the executable, hex, any case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdhash: Option<CdHash>,
    /// Apple developer team identifier of the code signature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
    /// Code-signing identifier (e.g. `org.wireshark.Wireshark`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_id: Option<String>,
    /// Application bundle identifier. A refinement only: it comes from the
    /// bundle's Info.plist, which is not an identity by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_id: Option<String>,
    /// Whether the executable is an Apple platform binary. Never holds
    /// where the platform does not know (Linux).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_binary: Option<bool>,
    /// Regular expression searched in the argv joined by single spaces.
    /// Never holds where the platform does not know argv (Linux exec gate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_regex: Option<String>,
    /// Exact path of the parent process's executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_path: Option<String>,
}

/// The identity criteria, most specific first in [`Criterion::specificity`].
///
/// A rule must name at least one of them; its most specific one is the
/// rule's *key*: the rule is indexed under it and ranked by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// `cdhash`
    Cdhash,
    /// `sha256`
    Sha256,
    /// `signing_id`
    SigningId,
    /// `team_id`
    TeamId,
    /// `path`
    Path,
    /// `path_glob`
    PathGlob,
    /// `name`
    Name,
}

impl Criterion {
    /// Higher is more specific. `cdhash` and `sha256` are equal: both name
    /// exactly one binary.
    pub fn specificity(self) -> u8 {
        match self {
            Criterion::Cdhash | Criterion::Sha256 => 6,
            Criterion::SigningId => 5,
            Criterion::TeamId => 4,
            Criterion::Path => 3,
            Criterion::PathGlob => 2,
            Criterion::Name => 1,
        }
    }

    /// The field name used in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Criterion::Cdhash => "cdhash",
            Criterion::Sha256 => "sha256",
            Criterion::SigningId => "signing_id",
            Criterion::TeamId => "team_id",
            Criterion::Path => "path",
            Criterion::PathGlob => "path_glob",
            Criterion::Name => "name",
        }
    }
}

impl fmt::Display for Criterion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Criteria {
    /// The most specific identity criterion this rule names, if any.
    pub fn key(&self) -> Option<Criterion> {
        if self.cdhash.is_some() {
            Some(Criterion::Cdhash)
        } else if self.sha256.is_some() {
            Some(Criterion::Sha256)
        } else if self.signing_id.is_some() {
            Some(Criterion::SigningId)
        } else if self.team_id.is_some() {
            Some(Criterion::TeamId)
        } else if self.path.is_some() {
            Some(Criterion::Path)
        } else if self.path_glob.is_some() {
            Some(Criterion::PathGlob)
        } else if self.name.is_some() {
            Some(Criterion::Name)
        } else {
            None
        }
    }

    /// True when no criterion at all is named.
    pub fn is_empty(&self) -> bool {
        self == &Criteria::default()
    }
}

/// Who a rule applies to. A rule applies when the user, one of the user's
/// groups, or the device is listed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// User names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// Group names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Device identifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

/// How a scope matched a subject, from least to most specific (`Ord`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScopeMatch {
    /// The rule has no scope.
    General,
    /// The subject's device is listed.
    Device,
    /// One of the subject's groups is listed.
    Group,
    /// The subject's user is listed.
    User,
}

impl ScopeMatch {
    /// The name used in explanations.
    pub fn as_str(self) -> &'static str {
        match self {
            ScopeMatch::General => "general",
            ScopeMatch::Device => "device",
            ScopeMatch::Group => "group",
            ScopeMatch::User => "user",
        }
    }
}

impl fmt::Display for ScopeMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the justification is collected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JustificationSpec {
    /// Fewest characters accepted.
    #[serde(default = "JustificationSpec::default_min_length")]
    pub min_length: u32,
    /// Most characters accepted.
    #[serde(default = "JustificationSpec::default_max_length")]
    pub max_length: u32,
    /// Ready-made reasons the user may pick instead of typing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub presets: Vec<String>,
}

impl JustificationSpec {
    /// Hard cap on `max_length`: a justification is a sentence, not a file.
    pub const MAX_LENGTH_LIMIT: u32 = 4000;

    fn default_min_length() -> u32 {
        1
    }
    fn default_max_length() -> u32 {
        1000
    }
}

impl Default for JustificationSpec {
    fn default() -> Self {
        Self {
            min_length: Self::default_min_length(),
            max_length: Self::default_max_length(),
            presets: Vec::new(),
        }
    }
}

/// How approval works for an `approve` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalSpec {
    /// Sequential levels; every approver of a level must approve before the
    /// next level starts.
    #[serde(default = "ApprovalSpec::default_levels")]
    pub levels: Vec<ApprovalLevel>,
    /// The longest execution window a user may ask for, in hours (1–48).
    #[serde(default = "ApprovalSpec::default_max_window_hours")]
    pub max_window_hours: u32,
    /// How many executions one approval allows inside its window.
    #[serde(default = "ApprovalSpec::default_uses")]
    pub uses: u32,
}

impl ApprovalSpec {
    /// The longest window any rule may allow.
    pub const MAX_WINDOW_HOURS: u32 = 48;

    fn default_levels() -> Vec<ApprovalLevel> {
        vec![ApprovalLevel { approvers: 1 }]
    }
    fn default_max_window_hours() -> u32 {
        Self::MAX_WINDOW_HOURS
    }
    fn default_uses() -> u32 {
        1
    }
}

impl Default for ApprovalSpec {
    fn default() -> Self {
        Self {
            levels: Self::default_levels(),
            max_window_hours: Self::default_max_window_hours(),
            uses: Self::default_uses(),
        }
    }
}

/// One approval level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalLevel {
    /// How many distinct approvers this level needs (at least 1).
    pub approvers: u32,
}

/// A rule for running a command as another user: an exec rule's fields
/// (whose `args_regex` always applies, since the command line is known
/// before anything runs) plus the user it runs as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElevationRule {
    /// Unique within the policy, across every section.
    pub id: String,
    /// What to do when the rule decides.
    pub action: Action,
    /// Every criterion named here must hold for the rule to match.
    #[serde(rename = "match")]
    pub criteria: Criteria,
    /// The user the command runs as; the rule only applies to elevations
    /// to that user.
    #[serde(default = "ElevationRule::default_run_as")]
    pub run_as: String,
    /// Who the rule applies to; absent means everyone on every device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Shown to the user (and audited) when this rule decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the justification is collected (`justify` and `approve` rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<JustificationSpec>,
    /// How approval works (`approve` rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
    /// Environment variables, beyond the allow-list
    /// ([`crate::env::KEPT_ENV`]), that sudo may pass to the command when
    /// this rule decides. Loader variables (`LD_*`, `DYLD_*`) are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// An edit rule: it decides `sudoedit FILE` (editing FILE as
    /// `run_as`) on the edited file's path, never on the editor, and takes
    /// no part in deciding commands. Without one, sudoedit is refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edit: bool,
}

impl ElevationRule {
    /// The user commands run as unless a rule says otherwise.
    pub const DEFAULT_RUN_AS: &str = "root";

    fn default_run_as() -> String {
        Self::DEFAULT_RUN_AS.to_owned()
    }

    /// The same rule as an exec rule, for the one engine both use.
    pub fn as_rule(&self) -> Rule {
        Rule {
            id: self.id.clone(),
            action: self.action,
            criteria: self.criteria.clone(),
            scope: self.scope.clone(),
            message: self.message.clone(),
            justification: self.justification.clone(),
            approval: self.approval.clone(),
        }
    }
}

/// What a user must do before an admin session starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionRequirement {
    /// Nothing: asking is enough.
    #[default]
    None,
    /// A written justification.
    Justification,
    /// A justification and approvers' agreement.
    Approval,
}

impl SessionRequirement {
    /// The name used in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionRequirement::None => "none",
            SessionRequirement::Justification => "justification",
            SessionRequirement::Approval => "approval",
        }
    }
}

/// Time-boxed admin sessions for a scope: who may become an administrator,
/// for how long, and what they must do first. The entry whose scope matches
/// the user most specifically (user, then group, then device, then none)
/// applies; between equals, the earlier one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSessionRule {
    /// Unique within the policy, across every section; named in audit
    /// records and approval requests.
    pub id: String,
    /// Who it applies to; absent means everyone on every device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Whether sessions are allowed at all (an entry with `false` refuses
    /// them to its scope, overriding less specific entries).
    #[serde(default = "AdminSessionRule::default_allowed")]
    pub allowed: bool,
    /// The longest session, in minutes (1–1440).
    #[serde(default = "AdminSessionRule::default_max_minutes")]
    pub max_minutes: u32,
    /// What the user must do first.
    #[serde(default)]
    pub require: SessionRequirement,
    /// The group that makes a user an administrator; the agent's configured
    /// admin group (`admin` on macOS) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Shown to the user (and audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How the justification is collected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<JustificationSpec>,
    /// How approval works (`require: approval`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalSpec>,
}

impl AdminSessionRule {
    /// The longest session any entry may allow: one day.
    pub const MAX_MINUTES_LIMIT: u32 = 24 * 60;

    fn default_allowed() -> bool {
        true
    }
    fn default_max_minutes() -> u32 {
        60
    }
}

/// Which part of a policy a rule or entry is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// `rules`: execs.
    Rules,
    /// `elevation`: commands run as another user.
    Elevation,
    /// `admin_session`: time-boxed admin sessions.
    AdminSession,
}

/// What approvers are asked to agree to, for the rule or entry that asks:
/// whichever section it is in, an approval request is judged the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalTerms {
    /// Where the rule is.
    pub section: Section,
    /// Whether it requires approval at all.
    pub requires_approval: bool,
    /// Levels, window and uses.
    pub approval: ApprovalSpec,
    /// How the reason is checked.
    pub justification: JustificationSpec,
    /// For an admin-session entry: the longest session.
    pub max_minutes: Option<u32>,
}

impl Policy {
    /// The approval terms of the rule or entry `id`, in any section.
    pub fn approval_terms(&self, id: &str) -> Option<ApprovalTerms> {
        if let Some(rule) = self.rules.iter().find(|r| r.id == id) {
            return Some(ApprovalTerms {
                section: Section::Rules,
                requires_approval: rule.action == Action::Approve,
                approval: rule.approval.clone().unwrap_or_default(),
                justification: rule.justification.clone().unwrap_or_default(),
                max_minutes: None,
            });
        }
        if let Some(rule) = self.elevation.iter().find(|r| r.id == id) {
            return Some(ApprovalTerms {
                section: Section::Elevation,
                requires_approval: rule.action == Action::Approve,
                approval: rule.approval.clone().unwrap_or_default(),
                justification: rule.justification.clone().unwrap_or_default(),
                max_minutes: None,
            });
        }
        let entry = self.admin_session.iter().find(|r| r.id == id)?;
        Some(ApprovalTerms {
            section: Section::AdminSession,
            requires_approval: entry.allowed && entry.require == SessionRequirement::Approval,
            approval: entry.approval.clone().unwrap_or_default(),
            justification: entry.justification.clone().unwrap_or_default(),
            max_minutes: Some(entry.max_minutes),
        })
    }
}
