//! Parsing and validation: a policy is either entirely valid or rejected with
//! every problem named (rule id and field), so an administrator fixes them all
//! in one pass instead of one per push.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;

use crate::model::{Action, AdminSessionRule, ElevationRule, Policy, Rule};

/// The most rules one policy may hold. Far above any real fleet's needs, low
/// enough that a hostile document cannot exhaust memory through the index.
pub const MAX_RULES: usize = 1_000_000;

/// Largest compiled size of one `args_regex`; larger patterns are rejected.
pub(crate) const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// One problem in a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The rule's id, `#N` (0-based position) for a rule without a usable id,
    /// or `None` for the document itself.
    pub rule: Option<String>,
    /// Dotted path of the offending field inside the rule or document
    /// (e.g. `match.sha256`), empty when the whole document is at fault.
    pub field: String,
    /// What is wrong, in words an administrator can act on.
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.rule, self.field.is_empty()) {
            (Some(rule), false) => write!(f, "rule {rule:?}: {}: {}", self.field, self.message),
            (Some(rule), true) => write!(f, "rule {rule:?}: {}", self.message),
            (None, false) => write!(f, "policy: {}: {}", self.field, self.message),
            (None, true) => write!(f, "policy: {}", self.message),
        }
    }
}

/// Every problem found in a rejected policy document (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    fn single(rule: Option<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![PolicyError {
            rule,
            field: field.into(),
            message: message.into(),
        }])
    }

    /// The individual problems.
    pub fn errors(&self) -> &[PolicyError] {
        &self.0
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// The document's top level, with rules kept as borrowed raw JSON so that
/// each rule is decoded on its own (its errors carry its id) and compiled
/// straight away (a 100 000-rule policy never exists twice in memory).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy<'a> {
    version: u64,
    default_action: Action,
    #[serde(default, borrow)]
    rules: Vec<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    elevation: Vec<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    admin_session: Vec<&'a serde_json::value::RawValue>,
}

/// A document's top-level fields, once every exec rule has been handed out.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) version: u64,
    pub(crate) default_action: Action,
    pub(crate) rule_count: usize,
    /// The elevation rules, valid (a few at most: kept whole).
    pub(crate) elevation: Vec<ElevationRule>,
    /// The admin-session entries, valid.
    pub(crate) admin_session: Vec<AdminSessionRule>,
}

/// Decodes one entry of a section, reporting a failure under the entry's
/// id (or position) with the section named in the field.
fn decode_entry<T: serde::de::DeserializeOwned>(
    section: &str,
    index: usize,
    raw: &serde_json::value::RawValue,
    seen_ids: &mut HashSet<String>,
    errors: &mut Vec<PolicyError>,
) -> Option<T> {
    if !raw.get().starts_with('{') {
        errors.push(PolicyError {
            rule: Some(format!("{section}#{index}")),
            field: String::new(),
            message: format!("an entry of {section} must be a JSON object"),
        });
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match serde_path_to_error::deserialize(&mut de) {
        Ok(entry) => Some(entry),
        Err(e) => {
            let label = rule_label(raw.get(), index);
            if !label.starts_with('#') {
                seen_ids.insert(label.clone());
            }
            errors.push(PolicyError {
                rule: Some(label),
                field: section_field(section, &field_path(e.path())),
                message: without_position(&e.into_inner()),
            });
            None
        }
    }
}

/// `elevation: match.path`: where in which section.
fn section_field(section: &str, field: &str) -> String {
    if field.is_empty() {
        section.to_owned()
    } else {
        format!("{section}: {field}")
    }
}

/// Claims an id for one entry of any section: rule ids name grants and
/// requests, so they are unique across the whole document.
fn claim_id(
    id: &str,
    label: &str,
    section: &str,
    seen_ids: &mut HashSet<String>,
    errors: &mut Vec<PolicyError>,
) {
    if !seen_ids.insert(id.to_owned()) {
        errors.push(PolicyError {
            rule: Some(label.to_owned()),
            field: section_field(section, "id"),
            message: "duplicate id: each rule and entry needs its own".into(),
        });
    }
}

fn check_elevation_rules(
    raw: &[&serde_json::value::RawValue],
    seen_ids: &mut HashSet<String>,
    errors: &mut Vec<PolicyError>,
) -> Vec<ElevationRule> {
    const SECTION: &str = "elevation";
    let mut rules = Vec::with_capacity(raw.len());
    for (index, value) in raw.iter().enumerate() {
        let Some(rule) = decode_entry::<ElevationRule>(SECTION, index, value, seen_ids, errors)
        else {
            continue;
        };
        let label = if rule.id.trim().is_empty() {
            format!("{SECTION}#{index}")
        } else {
            rule.id.clone()
        };
        claim_id(&rule.id, &label, SECTION, seen_ids, errors);
        let mut found = Vec::new();
        check_rule(&rule.as_rule(), &label, &mut found);
        if rule.run_as.trim().is_empty() || rule.run_as.contains(char::is_whitespace) {
            found.push(PolicyError {
                rule: Some(label.clone()),
                field: "run_as".into(),
                message: format!("{:?} is not a user name", rule.run_as),
            });
        }
        check_elevation_extras(&rule, &label, &mut found);
        for mut error in found {
            error.field = section_field(SECTION, &error.field);
            errors.push(error);
        }
        rules.push(rule);
    }
    rules
}

/// An elevation rule's `env` and `edit`.
fn check_elevation_extras(rule: &ElevationRule, label: &str, found: &mut Vec<PolicyError>) {
    let mut error = |field: &str, message: String| {
        found.push(PolicyError {
            rule: Some(label.to_owned()),
            field: field.into(),
            message,
        });
    };
    for name in &rule.env {
        if !crate::env::valid_name(name) {
            error("env", format!("{name:?} is not a variable name"));
        } else if crate::env::never_passed(name) {
            error(
                "env",
                format!(
                    "{name} makes the dynamic loader run other code: it is never passed to a command run as another user"
                ),
            );
        }
    }
    if rule.env.len() > 64 {
        error("env", format!("{} variables: at most 64", rule.env.len()));
    }
    if rule.edit {
        let c = &rule.criteria;
        let about_content = c.sha256.is_some()
            || c.cdhash.is_some()
            || c.team_id.is_some()
            || c.signing_id.is_some()
            || c.bundle_id.is_some()
            || c.platform_binary.is_some()
            || c.args_regex.is_some()
            || c.parent_path.is_some();
        if about_content {
            error(
                "match",
                "an edit rule matches the edited file by path, path_glob or name only".into(),
            );
        }
        if rule.action == Action::Approve {
            error(
                "action",
                "an edit rule is allow, justify or deny (approvals bind a program's content)"
                    .into(),
            );
        }
        if !rule.env.is_empty() {
            error(
                "env",
                "an edit rule runs no command: env does not apply".into(),
            );
        }
    }
}

fn check_admin_session(
    raw: &[&serde_json::value::RawValue],
    seen_ids: &mut HashSet<String>,
    errors: &mut Vec<PolicyError>,
) -> Vec<AdminSessionRule> {
    const SECTION: &str = "admin_session";
    let mut entries = Vec::with_capacity(raw.len());
    for (index, value) in raw.iter().enumerate() {
        let Some(entry) = decode_entry::<AdminSessionRule>(SECTION, index, value, seen_ids, errors)
        else {
            continue;
        };
        let label = if entry.id.trim().is_empty() {
            format!("{SECTION}#{index}")
        } else {
            entry.id.clone()
        };
        let mut error = |field: &str, message: String| {
            errors.push(PolicyError {
                rule: Some(label.clone()),
                field: section_field(SECTION, field),
                message,
            })
        };
        if entry.id.trim().is_empty() {
            error("id", "must not be empty".into());
        }
        if entry.max_minutes == 0 || entry.max_minutes > AdminSessionRule::MAX_MINUTES_LIMIT {
            error(
                "max_minutes",
                format!(
                    "{} is outside 1..={} (one day)",
                    entry.max_minutes,
                    AdminSessionRule::MAX_MINUTES_LIMIT
                ),
            );
        }
        if let Some(group) = &entry.group
            && (group.is_empty()
                || group
                    .chars()
                    .any(|c| c.is_whitespace() || c == ':' || c == ','))
        {
            error("group", format!("{group:?} is not a group name"));
        }
        if let Some(spec) = &entry.justification {
            check_justification(spec, &mut |field, message| error(field, message));
        }
        if let Some(spec) = &entry.approval {
            check_approval(spec, &mut |field, message| error(field, message));
        }
        claim_id(&entry.id, &label, SECTION, seen_ids, errors);
        entries.push(entry);
    }
    entries
}

/// Decodes and validates a document, handing each valid rule to `on_rule` in
/// document order. Returns every problem found; `on_rule` may have seen some
/// rules of a document that is rejected in the end.
pub(crate) fn parse_document(
    text: &str,
    mut on_rule: impl FnMut(Rule),
) -> Result<Header, PolicyErrors> {
    // serde would also accept a struct written as a JSON array; a policy is
    // an object, so say so instead of decoding `[7, "allow", []]`.
    if !text.trim_start().starts_with('{') {
        return Err(PolicyErrors::single(
            None,
            "",
            "the document must be a JSON object with version, default_action and rules",
        ));
    }
    let raw: RawPolicy<'_> = {
        let mut de = serde_json::Deserializer::from_str(text);
        let raw = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            PolicyErrors::single(None, field_path(e.path()), e.into_inner().to_string())
        })?;
        de.end()
            .map_err(|e| PolicyErrors::single(None, "", e.to_string()))?;
        raw
    };
    if raw.rules.len() > MAX_RULES {
        return Err(PolicyErrors::single(
            None,
            "rules",
            format!(
                "{} rules, more than the limit of {MAX_RULES}",
                raw.rules.len()
            ),
        ));
    }

    let mut errors = Vec::new();
    let mut seen_ids: HashSet<String> = HashSet::with_capacity(raw.rules.len());
    for (index, value) in raw.rules.iter().enumerate() {
        if !value.get().starts_with('{') {
            errors.push(PolicyError {
                rule: Some(format!("#{index}")),
                field: String::new(),
                message: "a rule must be a JSON object".into(),
            });
            continue;
        }
        let mut de = serde_json::Deserializer::from_str(value.get());
        let rule: Rule = match serde_path_to_error::deserialize(&mut de) {
            Ok(rule) => rule,
            Err(e) => {
                let label = rule_label(value.get(), index);
                // Still claim the id, so a later rule reusing it is reported.
                if !label.starts_with('#') {
                    seen_ids.insert(label.clone());
                }
                errors.push(PolicyError {
                    rule: Some(label),
                    field: field_path(e.path()),
                    message: without_position(&e.into_inner()),
                });
                continue;
            }
        };
        let label = if rule.id.trim().is_empty() {
            format!("#{index}")
        } else {
            rule.id.clone()
        };
        if !seen_ids.insert(rule.id.clone()) {
            errors.push(PolicyError {
                rule: Some(label.clone()),
                field: "id".into(),
                message: "duplicate rule id: each rule needs its own".into(),
            });
        }
        check_rule(&rule, &label, &mut errors);
        // Once the document is known to be rejected, stop building: nothing
        // will use the rules, and a huge bad document should cost no memory.
        if errors.is_empty() {
            on_rule(rule);
        }
    }
    let elevation = check_elevation_rules(&raw.elevation, &mut seen_ids, &mut errors);
    let admin_session = check_admin_session(&raw.admin_session, &mut seen_ids, &mut errors);
    if !errors.is_empty() {
        return Err(PolicyErrors(errors));
    }
    Ok(Header {
        version: raw.version,
        default_action: raw.default_action,
        rule_count: raw.rules.len(),
        elevation,
        admin_session,
    })
}

/// serde_json's message without "at line L column C": inside a rule, the
/// position is relative to the rule, which would mislead; the rule id and
/// field path say where the problem is.
fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rsplit_once(" at line ") {
        Some((message, _)) if error.line() > 0 => message.to_owned(),
        _ => text,
    }
}

fn field_path(path: &serde_path_to_error::Path) -> String {
    let field = path.to_string();
    // "." is the document root, "?" an unknown position (a syntax error).
    if field == "." || field == "?" {
        String::new()
    } else {
        field
    }
}

impl Policy {
    /// Parses and validates a policy document.
    ///
    /// ```
    /// let policy = epm_policy::Policy::from_json(r#"{
    ///     "version": 1, "default_action": "allow",
    ///     "rules": [{ "id": "no-nc", "action": "deny", "match": { "name": "nc" } }]
    /// }"#).unwrap();
    /// assert_eq!(policy.rules.len(), 1);
    ///
    /// let errors = epm_policy::Policy::from_json(r#"{
    ///     "version": 1, "default_action": "allow",
    ///     "rules": [{ "id": "x", "action": "deny", "match": { "sha256": "12" } }]
    /// }"#).unwrap_err();
    /// assert_eq!(errors.to_string(),
    ///     r#"rule "x": match.sha256: expected 64 hex digits (a SHA-256), got 2 characters"#);
    /// ```
    pub fn from_json(text: &str) -> Result<Policy, PolicyErrors> {
        let mut rules = Vec::new();
        let header = parse_document(text, |rule| rules.push(rule))?;
        Ok(Policy {
            version: header.version,
            default_action: header.default_action,
            rules,
            elevation: header.elevation,
            admin_session: header.admin_session,
        })
    }

    /// Advice that does not make the policy invalid: rules that work but are
    /// weaker than their author probably thinks.
    pub fn lint(&self) -> Vec<PolicyError> {
        let mut warnings = Vec::new();
        for rule in &self.rules {
            let c = &rule.criteria;
            let warn = |field: &str, message: &str| PolicyError {
                rule: Some(rule.id.clone()),
                field: field.into(),
                message: message.into(),
            };
            if c.signing_id.is_some() && c.team_id.is_none() && c.platform_binary != Some(true) {
                warnings.push(warn(
                    "match.signing_id",
                    "a signing id alone can be claimed by any signer; pair it with team_id, or platform_binary: true for Apple binaries",
                ));
            }
            if let Some(team_id) = &c.team_id
                && !(team_id.len() == 10
                    && team_id
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
            {
                warnings.push(warn(
                    "match.team_id",
                    "Apple team ids are 10 upper-case letters and digits; this one will likely never match",
                ));
            }
            if c.args_regex.is_some() {
                warnings.push(warn(
                    "match.args_regex",
                    "never matches on Linux, where argv is not known when the exec is decided",
                ));
            }
        }
        for rule in self
            .elevation
            .iter()
            .filter(|r| !r.edit && r.action != Action::Deny)
        {
            let weak = match rule.criteria.key() {
                Some(crate::model::Criterion::Name) => Some("match.name"),
                Some(crate::model::Criterion::PathGlob) => Some("match.path_glob"),
                _ => None,
            };
            if let Some(field) = weak {
                warnings.push(PolicyError {
                    rule: Some(rule.id.clone()),
                    field: format!("elevation: {field}"),
                    message: "weaker than path or sha256: any root-owned program with that name, or under that glob, is elevated, including ones installed later; name the program by path (or sha256)".into(),
                });
            }
        }
        warnings
    }
}

/// Folds a multi-line message (the regex crate draws a caret diagram) into one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The id of a rule that failed to decode, if its `id` field is readable.
fn rule_label(raw: &str, index: usize) -> String {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<serde_json::Value>,
    }
    match serde_json::from_str::<IdOnly>(raw).ok().and_then(|r| r.id) {
        Some(serde_json::Value::String(id)) if !id.trim().is_empty() => id,
        _ => format!("#{index}"),
    }
}

fn check_rule(rule: &Rule, label: &str, errors: &mut Vec<PolicyError>) {
    let mut error = |field: &str, message: String| {
        errors.push(PolicyError {
            rule: Some(label.to_owned()),
            field: field.to_owned(),
            message,
        })
    };
    let c = &rule.criteria;

    if rule.id.trim().is_empty() {
        error("id", "must not be empty".into());
    }
    if c.is_empty() {
        error("match", "empty: name at least one criterion".into());
    } else if c.key().is_none() {
        error(
            "match",
            "names no identity criterion: add one of sha256, cdhash, signing_id, team_id, path, path_glob, name".into(),
        );
    }
    if let Some(path) = &c.path
        && !path.starts_with('/')
    {
        error("match.path", format!("{path:?} is not an absolute path"));
    }
    if let Some(name) = &c.name
        && (name.is_empty() || name.contains('/'))
    {
        error(
            "match.name",
            format!("{name:?} is not a file name (no '/', not empty)"),
        );
    }
    if let Some(parent) = &c.parent_path
        && !parent.starts_with('/')
    {
        error(
            "match.parent_path",
            format!("{parent:?} is not an absolute path"),
        );
    }
    for (field, value) in [
        ("match.team_id", &c.team_id),
        ("match.signing_id", &c.signing_id),
        ("match.bundle_id", &c.bundle_id),
    ] {
        if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
            error(field, "must not be empty".into());
        }
    }
    if let Some(glob) = &c.path_glob {
        if let Err(e) = crate::engine::compile_glob(glob) {
            error(
                "match.path_glob",
                format!("invalid glob {glob:?}: {}", e.kind()),
            );
        } else if !(glob.starts_with('/') || glob.starts_with("**/")) {
            error(
                "match.path_glob",
                format!("{glob:?} can never match an absolute path: start it with / or **/"),
            );
        }
    }
    if let Some(pattern) = &c.args_regex
        && let Err(e) = crate::engine::compile_regex(pattern)
    {
        error(
            "match.args_regex",
            format!("invalid regex: {}", one_line(&e.to_string())),
        );
    }

    if let Some(scope) = &rule.scope {
        if scope.users.is_empty() && scope.groups.is_empty() && scope.devices.is_empty() {
            error(
                "scope",
                "lists no users, groups or devices: omit scope for a rule that applies to everyone"
                    .into(),
            );
        }
        for (field, names) in [
            ("scope.users", &scope.users),
            ("scope.groups", &scope.groups),
            ("scope.devices", &scope.devices),
        ] {
            if names.iter().any(|n| n.trim().is_empty()) {
                error(field, "contains an empty name".into());
            }
        }
    }

    if let Some(message) = &rule.message
        && message.chars().count() > 2000
    {
        error("message", "longer than 2000 characters".into());
    }

    match (&rule.justification, rule.action) {
        (Some(_), Action::Allow | Action::Deny) => error(
            "justification",
            format!(
                "only justify and approve rules collect a justification, this one is {}",
                rule.action
            ),
        ),
        (Some(spec), _) => check_justification(spec, &mut error),
        (None, _) => {}
    }

    match (&rule.approval, rule.action) {
        (Some(_), action) if action != Action::Approve => error(
            "approval",
            format!("only approve rules have an approval section, this one is {action}"),
        ),
        (Some(spec), _) => check_approval(spec, &mut error),
        (None, _) => {}
    }
}

fn check_justification(
    spec: &crate::model::JustificationSpec,
    error: &mut impl FnMut(&str, String),
) {
    if spec.max_length > crate::model::JustificationSpec::MAX_LENGTH_LIMIT {
        error(
            "justification.max_length",
            format!(
                "{} is over the limit of {}",
                spec.max_length,
                crate::model::JustificationSpec::MAX_LENGTH_LIMIT
            ),
        );
    }
    if spec.min_length > spec.max_length {
        error(
            "justification.min_length",
            format!(
                "{} is greater than max_length {}",
                spec.min_length, spec.max_length
            ),
        );
    }
    if spec.max_length == 0 {
        error("justification.max_length", "must be at least 1".into());
    }
    for preset in &spec.presets {
        let len = preset.chars().count() as u64;
        if preset.trim().is_empty() {
            error("justification.presets", "contains an empty preset".into());
        } else if len < u64::from(spec.min_length) || len > u64::from(spec.max_length) {
            error(
                "justification.presets",
                format!(
                    "{preset:?} is {len} characters, outside min_length..=max_length ({}..={})",
                    spec.min_length, spec.max_length
                ),
            );
        }
    }
}

fn check_approval(spec: &crate::model::ApprovalSpec, error: &mut impl FnMut(&str, String)) {
    if spec.levels.is_empty() {
        error("approval.levels", "needs at least one level".into());
    }
    for (i, level) in spec.levels.iter().enumerate() {
        if level.approvers == 0 {
            error(
                &format!("approval.levels[{i}].approvers"),
                "must be at least 1".into(),
            );
        }
    }
    let max = crate::model::ApprovalSpec::MAX_WINDOW_HOURS;
    if spec.max_window_hours == 0 || spec.max_window_hours > max {
        error(
            "approval.max_window_hours",
            format!("{} is outside 1..={max}", spec.max_window_hours),
        );
    }
    if spec.uses == 0 {
        error("approval.uses", "must be at least 1".into());
    }
}
