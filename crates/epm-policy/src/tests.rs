//! Engine tests: every criterion, scope and precedence step, every validation
//! error, and the property that the indexed engine agrees with a naive scan.

use proptest::prelude::*;

use crate::*;

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const CD_A: &str = "cccccccccccccccccccccccccccccccccccccccc";

fn engine(rules: &str) -> Engine {
    let doc = format!(r#"{{"version": 9, "default_action": "allow", "rules": [{rules}]}}"#);
    match Engine::from_json(&doc) {
        Ok(engine) => engine,
        Err(e) => panic!("policy should be valid:\n{e}\n{doc}"),
    }
}

fn errors(rules: &str) -> Vec<String> {
    let doc = format!(r#"{{"version": 1, "default_action": "allow", "rules": [{rules}]}}"#);
    match Policy::from_json(&doc) {
        Ok(_) => panic!("policy should be invalid: {doc}"),
        Err(e) => e.errors().iter().map(ToString::to_string).collect(),
    }
}

fn subject() -> Subject {
    Subject {
        path: "/usr/bin/nc".into(),
        sha256: Some(SHA_A.parse().unwrap()),
        cdhash: Some(CD_A.parse().unwrap()),
        team_id: Some("7Z6EMTD2C6".into()),
        signing_id: Some("org.example.tool".into()),
        bundle_id: Some("org.example.Tool".into()),
        platform_binary: Some(false),
        argv: Some(vec!["nc".into(), "-l".into(), "4444".into()]),
        pid: 100,
        ppid: 1,
        parent_path: Some("/bin/zsh".into()),
        uid: 501,
        user: "alice".into(),
        groups: vec!["staff".into(), "dev".into()],
        device_id: "mac-0042".into(),
        path_origin: Default::default(),
    }
}

fn decide(engine: &Engine, subject: &Subject) -> (Action, Option<String>) {
    let d = engine.evaluate(subject);
    (d.action, d.rule_id.map(|id| id.to_string()))
}

fn deny_if(criteria: &str) -> Engine {
    engine(&format!(
        r#"{{"id": "r", "action": "deny", "match": {criteria}}}"#
    ))
}

// ---- criteria ---------------------------------------------------------------

#[test]
fn each_criterion_matches_and_mismatches() {
    let s = subject();
    type BreakIt = fn(&mut Subject);
    let cases: &[(&str, BreakIt)] = &[
        (r#"{"path": "/usr/bin/nc"}"#, |s| {
            s.path = "/usr/local/bin/nc".into()
        }),
        (r#"{"path_glob": "/usr/*/nc"}"#, |s| {
            s.path = "/usr/local/bin/nc".into()
        }),
        (r#"{"name": "nc"}"#, |s| s.path = "/usr/bin/ncat".into()),
        (&format!(r#"{{"sha256": "{SHA_A}"}}"#), |s| {
            s.sha256 = Some(SHA_B.parse().unwrap())
        }),
        (&format!(r#"{{"cdhash": "{CD_A}"}}"#), |s| s.cdhash = None),
        (r#"{"team_id": "7Z6EMTD2C6"}"#, |s| {
            s.team_id = Some("ABCDEFGHIJ".into())
        }),
        (
            r#"{"signing_id": "org.example.tool", "team_id": "7Z6EMTD2C6"}"#,
            |s| s.signing_id = Some("org.example.other".into()),
        ),
        (r#"{"name": "nc", "bundle_id": "org.example.Tool"}"#, |s| {
            s.bundle_id = None
        }),
        (r#"{"name": "nc", "platform_binary": false}"#, |s| {
            s.platform_binary = Some(true)
        }),
        (r#"{"name": "nc", "args_regex": "-l \\d+"}"#, |s| {
            s.argv = Some(vec!["nc".into()])
        }),
        (r#"{"name": "nc", "parent_path": "/bin/zsh"}"#, |s| {
            s.parent_path = Some("/bin/bash".into())
        }),
    ];
    for (criteria, break_it) in cases {
        let e = deny_if(criteria);
        assert_eq!(
            decide(&e, &s),
            (Action::Deny, Some("r".into())),
            "{criteria} should match"
        );
        let mut other = s.clone();
        break_it(&mut other);
        assert_eq!(
            decide(&e, &other),
            (Action::Allow, None),
            "{criteria} should not match"
        );
    }
}

#[test]
fn an_unverified_path_matches_no_path_glob_or_name_rule() {
    let e = engine(&format!(
        r#"{{"id": "by-path", "action": "allow", "match": {{"path": "/usr/bin/nc"}}}},
           {{"id": "by-glob", "action": "allow", "match": {{"path_glob": "/usr/**"}}}},
           {{"id": "by-name", "action": "allow", "match": {{"name": "nc"}}}},
           {{"id": "named-and-hashed", "action": "allow", "match": {{"sha256": "{SHA_B}", "name": "nc"}}}}"#
    ));
    let mut forged = subject();
    forged.path_origin = PathOrigin::NotFoundHere;
    let decision = e.evaluate(&forged);
    assert_eq!(decision.rule_id, None, "the default decides: {decision:?}");
    // The digest still identifies it, and a rule that also names a path
    // criterion does not hold.
    forged.sha256 = Some(SHA_B.parse().unwrap());
    assert_eq!(e.evaluate(&forged).rule_id, None);
    let by_digest = deny_if(&format!(r#"{{"sha256": "{SHA_A}"}}"#));
    forged.sha256 = Some(SHA_A.parse().unwrap());
    assert_eq!(
        decide(&by_digest, &forged),
        (Action::Deny, Some("r".into()))
    );
}

#[test]
fn digests_compare_case_insensitively() {
    let e = deny_if(&format!(r#"{{"sha256": "{}"}}"#, SHA_A.to_uppercase()));
    assert_eq!(decide(&e, &subject()).0, Action::Deny);
}

#[test]
fn glob_star_stays_in_one_component_and_double_star_crosses() {
    let star = deny_if(r#"{"path_glob": "/Applications/*/nc"}"#);
    let double = deny_if(r#"{"path_glob": "/Applications/**/nc"}"#);
    let mut s = subject();
    s.path = "/Applications/Docker.app/nc".into();
    assert_eq!(decide(&star, &s).0, Action::Deny);
    assert_eq!(decide(&double, &s).0, Action::Deny);
    s.path = "/Applications/Docker.app/Contents/MacOS/nc".into();
    assert_eq!(decide(&star, &s).0, Action::Allow);
    assert_eq!(decide(&double, &s).0, Action::Deny);
}

#[test]
fn args_regex_never_matches_unknown_argv() {
    let e = deny_if(r#"{"name": "nc", "args_regex": ".*"}"#);
    let mut s = subject();
    s.argv = None;
    assert_eq!(decide(&e, &s).0, Action::Allow);
}

#[test]
fn all_named_criteria_must_hold() {
    let e = deny_if(&format!(r#"{{"sha256": "{SHA_A}", "path": "/opt/nc"}}"#));
    assert_eq!(decide(&e, &subject()).0, Action::Allow);
    let mut s = subject();
    s.path = "/opt/nc".into();
    assert_eq!(decide(&e, &s).0, Action::Deny);
}

#[test]
fn missing_subject_facts_never_match() {
    let mut s = subject();
    s.sha256 = None;
    s.team_id = None;
    s.signing_id = None;
    for criteria in [
        format!(r#"{{"sha256": "{SHA_A}"}}"#),
        r#"{"team_id": "7Z6EMTD2C6"}"#.into(),
        r#"{"signing_id": "org.example.tool", "team_id": "7Z6EMTD2C6"}"#.into(),
    ] {
        assert_eq!(
            decide(&deny_if(&criteria), &s).0,
            Action::Allow,
            "{criteria}"
        );
    }
}

#[test]
fn default_action_applies_when_nothing_matches() {
    let e = Engine::from_json(r#"{"version": 2, "default_action": "deny"}"#).unwrap();
    let d = e.evaluate(&subject());
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.rule_id, None);
    assert_eq!(d.policy_version, 2);
    assert_eq!(d.reason(), "no rule matched: default action");
}

// ---- scope ------------------------------------------------------------------

#[test]
fn scope_users_groups_devices() {
    let s = subject();
    for (scope, expected) in [
        (r#"{"users": ["alice"]}"#, Some(ScopeMatch::User)),
        (r#"{"users": ["bob"]}"#, None),
        (r#"{"groups": ["dev"]}"#, Some(ScopeMatch::Group)),
        (r#"{"groups": ["admin"]}"#, None),
        (r#"{"devices": ["mac-0042"]}"#, Some(ScopeMatch::Device)),
        (r#"{"devices": ["mac-9999"]}"#, None),
        (
            r#"{"users": ["bob"], "groups": ["staff"], "devices": ["mac-0042"]}"#,
            Some(ScopeMatch::Group),
        ),
        (
            r#"{"users": ["alice"], "groups": ["staff"]}"#,
            Some(ScopeMatch::User),
        ),
    ] {
        let e = engine(&format!(
            r#"{{"id": "r", "action": "deny", "match": {{"name": "nc"}}, "scope": {scope}}}"#
        ));
        let d = e.evaluate(&s);
        assert_eq!(d.scope, expected, "{scope}");
        assert_eq!(
            d.action,
            if expected.is_some() {
                Action::Deny
            } else {
                Action::Allow
            }
        );
    }
}

// ---- precedence ---------------------------------------------------------------

/// Every adjacent pair of the specificity ladder: the more specific rule wins
/// even when the less specific one is stricter.
#[test]
fn more_specific_identity_wins() {
    let ladder = [
        ("cdhash", format!(r#"{{"cdhash": "{CD_A}"}}"#)),
        ("sha256", format!(r#"{{"sha256": "{SHA_A}"}}"#)),
        (
            "signing_id",
            r#"{"signing_id": "org.example.tool", "team_id": "7Z6EMTD2C6"}"#.into(),
        ),
        ("team_id", r#"{"team_id": "7Z6EMTD2C6"}"#.into()),
        ("path", r#"{"path": "/usr/bin/nc"}"#.into()),
        ("path_glob", r#"{"path_glob": "/usr/bin/*"}"#.into()),
        ("name", r#"{"name": "nc"}"#.into()),
    ];
    for pair in ladder.windows(2).skip(1) {
        let [(hi, hi_match), (lo, lo_match)] = pair else {
            unreachable!()
        };
        let e = engine(&format!(
            r#"{{"id": "{lo}", "action": "deny", "match": {lo_match}}},
               {{"id": "{hi}", "action": "allow", "match": {hi_match}}}"#
        ));
        let d = e.evaluate(&subject());
        assert_eq!(d.rule_id.as_deref(), Some(*hi), "{hi} should beat {lo}");
        assert_eq!(d.criterion.map(Criterion::as_str), Some(*hi));
    }
}

#[test]
fn cdhash_and_sha256_are_equally_specific() {
    // Equal specificity and scope: the stricter action decides, either way round.
    for (cd_action, sha_action, winner) in [("deny", "allow", "cd"), ("allow", "deny", "sha")] {
        let e = engine(&format!(
            r#"{{"id": "cd", "action": "{cd_action}", "match": {{"cdhash": "{CD_A}"}}}},
               {{"id": "sha", "action": "{sha_action}", "match": {{"sha256": "{SHA_A}"}}}}"#
        ));
        assert_eq!(decide(&e, &subject()), (Action::Deny, Some(winner.into())));
    }
}

#[test]
fn a_rule_ranks_by_its_most_specific_criterion() {
    // "name + sha256" ranks as sha256, so it beats a plain path rule.
    let e = engine(&format!(
        r#"{{"id": "path", "action": "deny", "match": {{"path": "/usr/bin/nc"}}}},
           {{"id": "digest", "action": "allow", "match": {{"name": "nc", "sha256": "{SHA_A}"}}}}"#
    ));
    assert_eq!(
        decide(&e, &subject()),
        (Action::Allow, Some("digest".into()))
    );
}

#[test]
fn at_equal_specificity_the_more_specific_scope_wins() {
    let ladder = [
        ("user", r#""scope": {"users": ["alice"]}"#),
        ("group", r#""scope": {"groups": ["staff"]}"#),
        ("device", r#""scope": {"devices": ["mac-0042"]}"#),
        ("general", r#""message": "general""#),
    ];
    for pair in ladder.windows(2) {
        let [(hi, hi_scope), (lo, lo_scope)] = pair else {
            unreachable!()
        };
        let e = engine(&format!(
            r#"{{"id": "{lo}", "action": "deny", "match": {{"name": "nc"}}, {lo_scope}}},
               {{"id": "{hi}", "action": "allow", "match": {{"name": "nc"}}, {hi_scope}}}"#
        ));
        assert_eq!(
            decide(&e, &subject()),
            (Action::Allow, Some((*hi).into())),
            "{hi} over {lo}"
        );
    }
}

#[test]
fn at_a_full_tie_the_stricter_action_wins() {
    let ladder = ["deny", "approve", "justify", "allow"];
    for pair in ladder.windows(2) {
        let [hi, lo] = pair else { unreachable!() };
        let e = engine(&format!(
            r#"{{"id": "{lo}", "action": "{lo}", "match": {{"name": "nc"}}}},
               {{"id": "{hi}", "action": "{hi}", "match": {{"name": "nc"}}}}"#
        ));
        assert_eq!(
            decide(&e, &subject()).1.as_deref(),
            Some(*hi),
            "{hi} over {lo}"
        );
    }
}

#[test]
fn identical_rules_resolve_to_the_first() {
    let e = engine(
        r#"{"id": "first", "action": "deny", "match": {"name": "nc"}},
           {"id": "second", "action": "deny", "match": {"name": "nc"}}"#,
    );
    assert_eq!(decide(&e, &subject()).1.as_deref(), Some("first"));
}

#[test]
fn a_non_matching_specific_rule_does_not_shadow_a_general_one() {
    // The digest rule is scoped to bob: it does not apply, so the name rule decides.
    let e = engine(&format!(
        r#"{{"id": "digest", "action": "allow", "match": {{"sha256": "{SHA_A}"}}, "scope": {{"users": ["bob"]}}}},
           {{"id": "name", "action": "deny", "match": {{"name": "nc"}}}}"#
    ));
    assert_eq!(decide(&e, &subject()), (Action::Deny, Some("name".into())));
}

#[test]
fn decision_explains_itself() {
    let e = engine(
        r#"{"id": "block-nc", "action": "deny", "match": {"name": "nc"},
            "scope": {"groups": ["staff"]}, "message": "netcat is not allowed"}"#,
    );
    let d = e.evaluate(&subject());
    assert_eq!(d.message.as_deref(), Some("netcat is not allowed"));
    assert_eq!(d.criterion, Some(Criterion::Name));
    assert_eq!(d.scope, Some(ScopeMatch::Group));
    assert_eq!(
        d.reason(),
        r#"rule "block-nc" matched by name (group scope)"#
    );
    assert_eq!(d.policy_version, 9);
}

#[test]
fn rule_lookup_gives_flow_settings_with_defaults() {
    let e = engine(
        r#"{"id": "j", "action": "justify", "match": {"name": "a"}},
           {"id": "p", "action": "approve", "match": {"name": "b"},
            "approval": {"levels": [{"approvers": 2}, {"approvers": 1}], "max_window_hours": 8}}"#,
    );
    let j = e.rule("j").unwrap();
    assert_eq!(j.justification.unwrap().min_length, 1);
    assert!(j.approval.is_none());
    let p = e.rule("p").unwrap();
    assert_eq!(p.approval.unwrap().levels.len(), 2);
    assert_eq!(p.approval.unwrap().uses, 1);
    assert!(e.rule("nope").is_none());
}

#[test]
fn compact_index_keeps_every_rule_of_a_shared_key_and_every_id() {
    // Rules sharing a key live in one shared list; ids in one string.
    let mut rules = Vec::new();
    for i in 0..40 {
        let user = if i == 37 { "alice" } else { "nobody" };
        rules.push(format!(
            r#"{{"id": "k{i}", "action": "deny", "match": {{"name": "nc"}}, "scope": {{"users": ["{user}"]}}}}"#
        ));
        rules.push(format!(
            r#"{{"id": "other{i}", "action": "justify", "match": {{"name": "tool{i}"}}}}"#
        ));
    }
    let e = engine(&rules.join(","));
    assert_eq!(decide(&e, &subject()), (Action::Deny, Some("k37".into())));
    for i in 0..40 {
        assert_eq!(e.rule(&format!("k{i}")).unwrap().id, format!("k{i}"));
        let other = e.rule(&format!("other{i}")).unwrap();
        assert_eq!(other.action, Action::Justify);
        assert_eq!(other.justification.unwrap().max_length, 1000);
    }
    assert!(e.rule("k40").is_none() && e.rule("").is_none());
}

// ---- the example from the issue --------------------------------------------------

#[test]
fn the_documented_example_policy_parses() {
    let doc = include_str!("../../../examples/policy.json");
    let policy = Policy::from_json(doc).unwrap();
    assert!(policy.rules.len() >= 3);
    let engine = Engine::new(policy.clone()).unwrap();
    assert_eq!(engine.rule_count(), policy.rules.len());
    // Round trip: what we serialize, we parse back identically.
    let again = Policy::from_json(&serde_json::to_string(&policy).unwrap()).unwrap();
    assert_eq!(again, policy);
}

// ---- validation -------------------------------------------------------------------

#[test]
fn validation_names_rule_and_field() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"id": "u", "action": "deny", "match": {"name": "nc", "colour": "red"}}"#,
            r#"rule "u": match.colour: unknown field `colour`, expected one of `path`"#,
        ),
        (
            r#"{"id": "u2", "action": "deny", "match": {"name": "nc"}, "extra": 1}"#,
            r#"rule "u2": extra: unknown field `extra`"#,
        ),
        (
            r#"{"id": "e", "action": "deny", "match": {}}"#,
            r#"rule "e": match: empty"#,
        ),
        (
            r#"{"id": "i", "action": "deny", "match": {"platform_binary": true}}"#,
            r#"rule "i": match: names no identity criterion"#,
        ),
        (
            r#"{"id": "d", "action": "deny", "match": {"sha256": "xyz"}}"#,
            r#"rule "d": match.sha256: expected 64 hex digits"#,
        ),
        (
            r#"{"id": "c", "action": "deny", "match": {"cdhash": "abcd"}}"#,
            r#"rule "c": match.cdhash: expected 40 hex digits"#,
        ),
        (
            r#"{"id": "g", "action": "deny", "match": {"path_glob": "/a/[b"}}"#,
            r#"rule "g": match.path_glob: invalid glob"#,
        ),
        (
            r#"{"id": "x", "action": "deny", "match": {"name": "nc", "args_regex": "(unclosed"}}"#,
            r#"rule "x": match.args_regex: invalid regex"#,
        ),
        (
            r#"{"id": "w", "action": "approve", "match": {"name": "nc"}, "approval": {"max_window_hours": 49}}"#,
            r#"rule "w": approval.max_window_hours: 49 is outside 1..=48"#,
        ),
        (
            r#"{"id": "z", "action": "approve", "match": {"name": "nc"}, "approval": {"levels": [{"approvers": 0}]}}"#,
            r#"rule "z": approval.levels[0].approvers: must be at least 1"#,
        ),
        (
            r#"{"id": "l", "action": "approve", "match": {"name": "nc"}, "approval": {"levels": []}}"#,
            r#"rule "l": approval.levels: needs at least one level"#,
        ),
        (
            r#"{"id": "a", "action": "sometimes", "match": {"name": "nc"}}"#,
            r#"rule "a": action: unknown variant `sometimes`"#,
        ),
        (
            r#"{"id": "p", "action": "deny", "match": {"path": "relative/nc"}}"#,
            r#"rule "p": match.path: "relative/nc" is not an absolute path"#,
        ),
        (
            r#"{"id": "n", "action": "deny", "match": {"name": "bin/nc"}}"#,
            r#"rule "n": match.name: "bin/nc" is not a file name"#,
        ),
        (
            r#"{"id": "s", "action": "deny", "match": {"name": "nc"}, "scope": {}}"#,
            r#"rule "s": scope: lists no users, groups or devices"#,
        ),
        (
            r#"{"id": "j", "action": "deny", "match": {"name": "nc"}, "justification": {}}"#,
            r#"rule "j": justification: only justify and approve rules"#,
        ),
        (
            r#"{"id": "m", "action": "justify", "match": {"name": "nc"}, "justification": {"min_length": 10, "max_length": 5}}"#,
            r#"rule "m": justification.min_length: 10 is greater than max_length 5"#,
        ),
        (
            r#"{"id": "q", "action": "justify", "match": {"name": "nc"}, "approval": {}}"#,
            r#"rule "q": approval: only approve rules"#,
        ),
        (
            r#"{"id": "rel", "action": "deny", "match": {"path_glob": "usr/bin/*"}}"#,
            r#"rule "rel": match.path_glob: "usr/bin/*" can never match an absolute path"#,
        ),
        (
            r#"{"id": "pre", "action": "justify", "match": {"name": "nc"}, "justification": {"min_length": 10, "presets": ["short"]}}"#,
            r#"rule "pre": justification.presets: "short" is 5 characters, outside min_length..=max_length (10..=1000)"#,
        ),
        (
            r#"{"id": "zero", "action": "justify", "match": {"name": "nc"}, "justification": {"min_length": 0, "max_length": 0}}"#,
            r#"rule "zero": justification.max_length: must be at least 1"#,
        ),
        (
            r#"{"id": "", "action": "deny", "match": {"name": "nc"}}"#,
            r##"rule "#0": id: must not be empty"##,
        ),
        (
            r#"{"action": "deny", "match": {"name": "nc"}}"#,
            r##"rule "#0": missing field `id`"##,
        ),
        (
            r#"{"id": 5, "action": "deny", "match": {"name": "nc"}}"#,
            r##"rule "#0": id: invalid type"##,
        ),
    ];
    for (rule, expected) in cases {
        let errs = errors(rule);
        assert!(
            errs.iter().any(|e| e.starts_with(expected)),
            "expected an error starting with {expected:?}, got {errs:?}"
        );
    }
}

#[test]
fn errors_are_one_line_each() {
    let errs = errors(
        r#"{"id": "x", "action": "deny", "match": {"name": "nc", "args_regex": "(unclosed"}}"#,
    );
    assert_eq!(errs.len(), 1);
    assert!(!errs[0].contains('\n'), "{errs:?}");
}

#[test]
fn a_rule_labelled_by_position_does_not_clash_with_a_real_id() {
    let errs = errors(
        r##"{"action": "deny", "match": {"name": "a"}},
           {"id": "#0", "action": "deny", "match": {"name": "b"}}"##,
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn platform_binary_never_holds_where_unknown() {
    let e = deny_if(r#"{"name": "nc", "platform_binary": false}"#);
    let mut s = subject();
    s.platform_binary = None;
    assert_eq!(decide(&e, &s).0, Action::Allow);
}

#[test]
fn duplicate_ids_are_rejected() {
    let errs = errors(
        r#"{"id": "dup", "action": "deny", "match": {"name": "a"}},
           {"id": "dup", "action": "deny", "match": {"name": "b"}}"#,
    );
    assert_eq!(
        errs,
        [r#"rule "dup": id: duplicate rule id: each rule needs its own"#]
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let errs = errors(
        r#"{"id": "a", "action": "deny", "match": {}},
           {"id": "b", "action": "deny", "match": {"sha256": "1"}},
           {"id": "c", "action": "deny", "match": {"name": "ok"}}"#,
    );
    assert_eq!(errs.len(), 2, "{errs:?}");
}

#[test]
fn document_level_errors() {
    for (doc, expected) in [
        ("", "policy: the document must be a JSON object"),
        ("{", "policy: EOF while parsing an object"),
        (
            r#"{"version": 1, "default_action": "allow", "rules": [["r", "deny", {"name": "nc"}]]}"#,
            "rule \"#0\": a rule must be a JSON object",
        ),
        ("[]", "policy: the document must be a JSON object"),
        (
            r#"[7, "allow", []]"#,
            "policy: the document must be a JSON object",
        ),
        (
            r#"{"version": 1}"#,
            "policy: missing field `default_action`",
        ),
        (
            r#"{"version": -1, "default_action": "allow"}"#,
            "policy: version: invalid value",
        ),
        (
            r#"{"version": 1, "default_action": "allow", "rulez": []}"#,
            "policy: rulez: unknown field `rulez`",
        ),
        (
            r#"{"version": 1, "default_action": "allow"} trailing"#,
            "policy: trailing characters",
        ),
        (
            r#"{"version": 1, "default_action": "maybe"}"#,
            "policy: default_action: unknown variant",
        ),
    ] {
        let err = Policy::from_json(doc).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{doc:?}: {err}");
        let err = Engine::from_json(doc).unwrap_err().to_string();
        assert!(err.starts_with(expected), "{doc:?}: {err}");
    }
}

#[test]
fn lint_warns_about_weak_rules() {
    let policy = Policy::from_json(
        r#"{"version": 1, "default_action": "allow", "rules": [
            {"id": "s", "action": "allow", "match": {"signing_id": "com.x"}},
            {"id": "t", "action": "allow", "match": {"team_id": "short"}},
            {"id": "ok", "action": "allow", "match": {"signing_id": "com.x", "team_id": "7Z6EMTD2C6"}}
        ]}"#,
    )
    .unwrap();
    let warnings: Vec<String> = policy.lint().iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with(r#"rule "s": match.signing_id"#));
    assert!(warnings[1].starts_with(r#"rule "t": match.team_id"#));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Never a panic, whatever the input.
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        let _ = Policy::from_json(&text);
        let _ = Engine::from_json(&text);
    }

    /// Structurally plausible documents with random values never panic either.
    #[test]
    fn arbitrary_rules_never_panic(rules in prop::collection::vec(
        (".{0,12}", prop::sample::select(vec!["allow", "deny", "justify", "approve", "x"]),
         prop::sample::select(vec!["path", "path_glob", "name", "sha256", "cdhash", "team_id",
                                   "signing_id", "bundle_id", "args_regex", "parent_path", "bogus"]),
         ".{0,70}"), 0..6)) {
        let rules: Vec<String> = rules.iter().map(|(id, action, field, value)| {
            serde_json::json!({"id": id, "action": action, "match": {*field: value}}).to_string()
        }).collect();
        let doc = format!(r#"{{"version": 1, "default_action": "deny", "rules": [{}]}}"#, rules.join(","));
        let _ = Engine::from_json(&doc);
    }
}

// ---- the indexed engine agrees with a naive linear scan -------------------------

/// The reference: check every criterion of every rule directly, then take the
/// maximum of (specificity, scope, action, earliest) — the documented
/// precedence, written as plainly as possible.
fn linear_evaluate(policy: &Policy, s: &Subject) -> (Action, Option<String>) {
    type Rank = (u8, ScopeMatch, Action, std::cmp::Reverse<usize>);
    let mut best: Option<(Rank, &Rule)> = None;
    for (index, rule) in policy.rules.iter().enumerate() {
        let c = &rule.criteria;
        let name = s.path.rsplit('/').next().unwrap_or("");
        let holds = c.path.as_ref().is_none_or(|p| *p == s.path)
            && c.path_glob.as_ref().is_none_or(|g| {
                globset::GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()
                    .unwrap()
                    .compile_matcher()
                    .is_match(&s.path)
            })
            && c.name.as_ref().is_none_or(|n| n == name)
            && c.sha256.is_none_or(|d| s.sha256 == Some(d))
            && c.cdhash.is_none_or(|d| s.cdhash == Some(d))
            && c.team_id
                .as_ref()
                .is_none_or(|t| s.team_id.as_ref() == Some(t))
            && c.signing_id
                .as_ref()
                .is_none_or(|t| s.signing_id.as_ref() == Some(t))
            && c.bundle_id
                .as_ref()
                .is_none_or(|t| s.bundle_id.as_ref() == Some(t))
            && c.platform_binary
                .is_none_or(|b| s.platform_binary == Some(b))
            && c.parent_path
                .as_ref()
                .is_none_or(|p| s.parent_path.as_ref() == Some(p))
            && c.args_regex.as_ref().is_none_or(|r| {
                s.argv
                    .as_ref()
                    .is_some_and(|a| regex::Regex::new(r).unwrap().is_match(&a.join(" ")))
            });
        if !holds {
            continue;
        }
        let scope = match &rule.scope {
            None => ScopeMatch::General,
            Some(sc) if sc.users.contains(&s.user) => ScopeMatch::User,
            Some(sc) if sc.groups.iter().any(|g| s.groups.contains(g)) => ScopeMatch::Group,
            Some(sc) if sc.devices.contains(&s.device_id) => ScopeMatch::Device,
            Some(_) => continue,
        };
        let specificity = c.key().unwrap().specificity();
        let rank = (specificity, scope, rule.action, std::cmp::Reverse(index));
        if best.as_ref().is_none_or(|(b, _)| rank > *b) {
            best = Some((rank, rule));
        }
    }
    match best {
        Some((_, rule)) => (rule.action, Some(rule.id.clone())),
        None => (policy.default_action, None),
    }
}

const PATHS: &[&str] = &[
    "/usr/bin/nc",
    "/usr/local/bin/nc",
    "/opt/a/bin/tool",
    "/opt/tool",
    "/home/u/nc",
];
const GLOBS: &[&str] = &[
    "/usr/*/nc",
    "/usr/**",
    "/opt/**/tool",
    "/opt/*",
    "**/nc",
    "/home/*/*",
];
const NAMES: &[&str] = &["nc", "tool", "other"];
const SHAS: &[&str] = &[SHA_A, SHA_B];
const TEAMS: &[&str] = &["7Z6EMTD2C6", "ABCDEFGHIJ"];
const SIGNING: &[&str] = &["org.a", "org.b"];
const USERS: &[&str] = &["alice", "bob"];
const GROUPS: &[&str] = &["staff", "dev", "admin"];
const DEVICES: &[&str] = &["mac-1", "mac-2"];

fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(0.3, prop::sample::select(pool).prop_map(str::to_owned))
}

fn criteria_strategy() -> impl Strategy<Value = Criteria> {
    (
        (pick(PATHS), pick(GLOBS), pick(NAMES), pick(SHAS)),
        (
            pick(TEAMS),
            pick(SIGNING),
            prop::option::weighted(0.15, any::<bool>()),
        ),
        prop::option::weighted(0.1, prop::sample::select(vec!["-l", "^nc", "4444$"])),
    )
        .prop_map(
            |((path, path_glob, name, sha), (team, signing, platform), args)| Criteria {
                path,
                path_glob,
                name,
                sha256: sha.map(|s| s.parse().unwrap()),
                team_id: team,
                signing_id: signing,
                platform_binary: platform,
                args_regex: args.map(str::to_owned),
                ..Criteria::default()
            },
        )
        .prop_filter("needs an identity criterion", |c| c.key().is_some())
}

fn scope_strategy() -> impl Strategy<Value = Option<Scope>> {
    prop::option::weighted(
        0.5,
        (
            prop::collection::vec(prop::sample::select(USERS).prop_map(str::to_owned), 0..2),
            prop::collection::vec(prop::sample::select(GROUPS).prop_map(str::to_owned), 0..2),
            prop::collection::vec(prop::sample::select(DEVICES).prop_map(str::to_owned), 0..2),
        )
            .prop_map(|(users, groups, devices)| Scope {
                users,
                groups,
                devices,
            })
            .prop_filter("non-empty scope", |s| {
                !(s.users.is_empty() && s.groups.is_empty() && s.devices.is_empty())
            }),
    )
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop::sample::select(vec![
        Action::Allow,
        Action::Justify,
        Action::Approve,
        Action::Deny,
    ])
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (
        action_strategy(),
        prop::collection::vec(
            (criteria_strategy(), scope_strategy(), action_strategy()),
            0..40,
        ),
    )
        .prop_map(|(default_action, rules)| Policy {
            version: 1,
            default_action,
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, (criteria, scope, action))| Rule {
                    id: format!("r{i}"),
                    action,
                    criteria,
                    scope,
                    message: None,
                    justification: None,
                    approval: None,
                })
                .collect(),
            elevation: Vec::new(),
            admin_session: Vec::new(),
        })
}

fn subject_strategy() -> impl Strategy<Value = Subject> {
    (
        (
            prop::sample::select(PATHS),
            pick(SHAS),
            pick(TEAMS),
            pick(SIGNING),
            prop::option::of(any::<bool>()),
        ),
        (
            prop::sample::select(USERS),
            prop::collection::vec(prop::sample::select(GROUPS).prop_map(str::to_owned), 0..3),
            prop::sample::select(DEVICES),
            prop::option::of(prop::sample::select(vec!["nc -l 4444", "tool", "nc"])),
        ),
    )
        .prop_map(
            |((path, sha, team, signing, platform), (user, groups, device, args))| Subject {
                path: path.into(),
                sha256: sha.map(|s| s.parse().unwrap()),
                team_id: team,
                signing_id: signing,
                platform_binary: platform,
                argv: args.map(|a| a.split(' ').map(str::to_owned).collect()),
                user: user.into(),
                groups,
                device_id: device.into(),
                ..Subject::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn indexed_engine_agrees_with_linear_scan(
        policy in policy_strategy(),
        subjects in prop::collection::vec(subject_strategy(), 1..8),
    ) {
        let engine = Engine::new(policy.clone()).unwrap();
        for subject in &subjects {
            prop_assert_eq!(decide(&engine, subject), linear_evaluate(&policy, subject));
        }
        // The JSON path builds the same engine as the struct path.
        let from_json = Engine::from_json(&serde_json::to_string(&policy).unwrap()).unwrap();
        for subject in &subjects {
            prop_assert_eq!(decide(&from_json, subject), decide(&engine, subject));
        }
    }
}

#[test]
fn the_engine_says_whether_any_rule_needs_the_parent() {
    assert!(
        !engine(r#"{"id": "a", "action": "deny", "match": {"name": "nc"}}"#).uses_parent_path()
    );
    assert!(deny_if(r#"{"name": "nc", "parent_path": "/bin/zsh"}"#).uses_parent_path());
    assert!(!deny_if(r#"{"name": "nc"}"#).uses_group_scope());
    let scoped = engine(
        r#"{"id": "g", "action": "deny", "match": {"name": "nc"}, "scope": {"groups": ["staff"]}}"#,
    );
    assert!(scoped.uses_group_scope());
}

mod elevation {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POLICY: &str = r#"{
        "version": 4, "default_action": "allow",
        "rules": [{ "id": "no-nc", "action": "deny", "match": { "name": "nc" } }],
        "elevation": [
            { "id": "apt-update", "action": "allow",
              "match": { "path": "/usr/bin/apt", "args_regex": "^apt (update|upgrade)$" } },
            { "id": "apt", "action": "justify", "match": { "path": "/usr/bin/apt" } },
            { "id": "psql", "action": "allow", "match": { "name": "psql" }, "run_as": "postgres" },
            { "id": "shells", "action": "deny", "match": { "path_glob": "/usr/bin/*sh" },
              "message": "No root shells" }
        ],
        "admin_session": [
            { "id": "everyone", "max_minutes": 30, "require": "justification" },
            { "id": "helpdesk", "scope": { "groups": ["helpdesk"] }, "max_minutes": 120 },
            { "id": "not-mallory", "scope": { "users": ["mallory"] }, "allowed": false }
        ]
    }"#;

    fn command(path: &str, argv: &[&str], user: &str, groups: &[&str]) -> Subject {
        Subject {
            path: path.into(),
            argv: Some(argv.iter().map(|a| (*a).to_owned()).collect()),
            user: user.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..Subject::default()
        }
    }

    #[test]
    fn elevation_rules_decide_by_command_line_and_run_as() {
        let engine = Engine::from_json(POLICY).unwrap();
        let decide = |path, argv: &[&str], run_as| {
            let d = engine.evaluate_elevation(&command(path, argv, "alice", &[]), run_as);
            (d.action, d.rule_id.map(|id| id.to_string()))
        };
        assert_eq!(
            decide("/usr/bin/apt", &["apt", "update"], "root"),
            (Action::Allow, Some("apt-update".into()))
        );
        assert_eq!(
            decide("/usr/bin/apt", &["apt", "remove", "x"], "root"),
            (Action::Justify, Some("apt".into()))
        );
        assert_eq!(
            decide("/usr/bin/bash", &["bash"], "root"),
            (Action::Deny, Some("shells".into()))
        );
        // Nothing allows it: deny, whatever the exec default says.
        assert_eq!(decide("/usr/bin/id", &["id"], "root"), (Action::Deny, None));
        // A rule only decides elevations to its own run-as user.
        assert_eq!(
            decide("/usr/bin/psql", &["psql"], "postgres"),
            (Action::Allow, Some("psql".into()))
        );
        assert_eq!(
            decide("/usr/bin/psql", &["psql"], "root"),
            (Action::Deny, None)
        );
        // Exec rules and elevation rules are apart.
        let exec = engine.evaluate(&command("/usr/bin/apt", &[], "alice", &[]));
        assert_eq!(exec.action, Action::Allow);
        assert!(engine.has_elevation_rules());
        let (info, run_as) = engine.elevation_rule("psql").unwrap();
        assert_eq!((info.action, run_as), (Action::Allow, "postgres"));
        assert!(engine.rule("psql").is_none());
    }

    #[test]
    fn the_most_specific_admin_session_entry_applies() {
        let engine = Engine::from_json(POLICY).unwrap();
        let entry = |user, groups: &[&str]| {
            engine
                .admin_session(&command("", &[], user, groups))
                .map(|m| (m.rule.id.clone(), m.rule.allowed, m.rule.max_minutes))
        };
        assert_eq!(entry("alice", &[]), Some(("everyone".into(), true, 30)));
        assert_eq!(
            entry("bob", &["helpdesk"]),
            Some(("helpdesk".into(), true, 120))
        );
        assert_eq!(
            entry("mallory", &["helpdesk"]),
            Some(("not-mallory".into(), false, 60))
        );
        let none = Engine::from_json(r#"{"version":1,"default_action":"allow"}"#).unwrap();
        assert!(
            none.admin_session(&command("", &[], "alice", &[]))
                .is_none()
        );
        assert!(!none.has_elevation_rules());
    }

    #[test]
    fn sections_round_trip_and_old_policies_stay_valid() {
        let policy = Policy::from_json(POLICY).unwrap();
        assert_eq!(policy.elevation.len(), 4);
        assert_eq!(policy.elevation[0].run_as, "root");
        assert_eq!(
            policy.admin_session[0].require,
            crate::SessionRequirement::Justification
        );
        let again = Policy::from_json(&serde_json::to_string(&policy).unwrap()).unwrap();
        assert_eq!(again, policy);
        let old = Policy::from_json(r#"{"version":1,"default_action":"deny","rules":[]}"#).unwrap();
        assert!(!serde_json::to_string(&old).unwrap().contains("elevation"));
    }

    #[test]
    fn errors_name_the_section_entry_and_field() {
        let errors = Policy::from_json(
            r#"{
            "version": 1, "default_action": "allow",
            "rules": [{ "id": "dup", "action": "deny", "match": { "name": "nc" } }],
            "elevation": [
                { "id": "dup", "action": "allow", "match": { "path": "usr/bin/id" } },
                { "id": "who", "action": "allow", "match": { "name": "id" }, "run_as": "" },
                { "id": "typo", "action": "allow", "match": { "nmae": "id" } }
            ],
            "admin_session": [
                { "id": "long", "max_minutes": 5000, "group": "wheel staff" },
                { "id": "req", "require": "sometimes" }
            ]
        }"#,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            r#"rule "dup": elevation: id: duplicate id"#,
            r#"rule "dup": elevation: match.path: "usr/bin/id" is not an absolute path"#,
            r#"rule "who": elevation: run_as: "" is not a user name"#,
            r#"rule "typo": elevation: match.nmae: unknown field `nmae`"#,
            r#"rule "long": admin_session: max_minutes: 5000 is outside 1..=1440"#,
            r#"rule "long": admin_session: group: "wheel staff" is not a group name"#,
            r#"rule "req": admin_session: require: unknown variant `sometimes`"#,
        ] {
            assert!(errors.contains(expected), "{expected}\nnot in\n{errors}");
        }
    }

    #[test]
    fn edit_rules_decide_files_and_never_commands() {
        let engine = Engine::from_json(
            r#"{"version": 1, "default_action": "allow", "rules": [],
            "elevation": [
                { "id": "hosts", "action": "allow", "edit": true,
                  "match": { "path": "/etc/hosts" } },
                { "id": "java", "action": "allow", "match": { "path": "/usr/bin/java" },
                  "env": ["JAVA_HOME"] }
            ]}"#,
        )
        .unwrap();
        let file = Subject {
            path: "/etc/hosts".into(),
            ..Subject::default()
        };
        assert_eq!(engine.evaluate_edit(&file, "root").action, Action::Allow);
        assert_eq!(
            engine.evaluate_elevation(&file, "root").action,
            Action::Deny
        );
        let java = Subject {
            path: "/usr/bin/java".into(),
            ..Subject::default()
        };
        assert_eq!(engine.evaluate_edit(&java, "root").action, Action::Deny);
        let allowed = engine.evaluate_elevation(&java, "root");
        assert_eq!(allowed.action, Action::Allow);
        assert_eq!(engine.elevation_env("java"), ["JAVA_HOME"]);
        assert_eq!(
            engine.elevation_spellings(),
            ["/etc/hosts", "/usr/bin/java"]
        );
        assert!(engine.elevation_env("hosts").is_empty());
        assert!(engine.elevation_rule("hosts").is_some());
    }

    #[test]
    fn env_and_edit_are_checked() {
        let errors = Policy::from_json(
            r#"{"version": 1, "default_action": "allow", "rules": [],
            "elevation": [
                { "id": "pre", "action": "allow", "match": { "path": "/usr/bin/id" },
                  "env": ["LD_PRELOAD", "A-B"] },
                { "id": "ed", "action": "approve", "edit": true, "env": ["X"],
                  "match": { "sha256": "abababababababababababababababababababababababababababababababab" } }
            ]}"#,
        )
        .unwrap_err()
        .to_string();
        for expected in [
            r#"rule "pre": elevation: env: LD_PRELOAD makes the dynamic loader run other code"#,
            r#"rule "pre": elevation: env: "A-B" is not a variable name"#,
            r#"rule "ed": elevation: match: an edit rule matches the edited file by path"#,
            r#"rule "ed": elevation: action: an edit rule is allow, justify or deny"#,
            r#"rule "ed": elevation: env: an edit rule runs no command"#,
        ] {
            assert!(errors.contains(expected), "{expected}\nnot in\n{errors}");
        }
    }
}

#[test]
fn a_path_the_user_may_have_forged_matches_no_path_rule() {
    let engine = Engine::from_json(&format!(
        r#"{{"version": 1, "default_action": "deny", "rules": [
            {{"id": "by-path", "action": "allow", "match": {{"path": "/usr/bin/nc"}}}},
            {{"id": "by-glob", "action": "allow", "match": {{"path_glob": "**/*"}}}},
            {{"id": "by-name", "action": "allow", "match": {{"name": "nc"}}}},
            {{"id": "hash-and-glob", "action": "allow", "match": {{"sha256": "{SHA_B}", "path_glob": "/usr/**"}}}},
            {{"id": "by-hash", "action": "deny", "match": {{"sha256": "{SHA_A}"}}}}]}}"#
    ))
    .unwrap();
    let local = Subject {
        sha256: None,
        cdhash: None,
        team_id: None,
        signing_id: None,
        ..subject()
    };
    assert_eq!(decide(&engine, &local).1.as_deref(), Some("by-path"));
    for origin in [PathOrigin::OtherNamespace, PathOrigin::Anonymous] {
        let forged = Subject {
            path_origin: origin,
            ..local.clone()
        };
        assert_eq!(decide(&engine, &forged), (Action::Deny, None), "{origin:?}");
        // Content still decides: a residual path criterion does not hold.
        let hashed = Subject {
            sha256: Some(SHA_B.parse().unwrap()),
            ..forged.clone()
        };
        assert_eq!(decide(&engine, &hashed), (Action::Deny, None), "{origin:?}");
        let denied = Subject {
            sha256: Some(SHA_A.parse().unwrap()),
            ..forged
        };
        assert_eq!(decide(&engine, &denied).1.as_deref(), Some("by-hash"));
    }
    assert!(engine.restricts_by_content());
    assert!(
        !Engine::from_json(&format!(
            r#"{{"version": 1, "default_action": "allow", "rules": [
            {{"id": "ok", "action": "allow", "match": {{"sha256": "{SHA_A}"}}}},
            {{"id": "no-nc", "action": "deny", "match": {{"name": "nc"}}}}]}}"#
        ))
        .unwrap()
        .restricts_by_content()
    );
}

// ---- per-file subject independence (the kernel cache of allows) -------------

#[test]
fn a_file_is_decided_alike_for_everyone_only_when_no_rule_that_matches_it_looks_at_the_process() {
    let engine = engine(&format!(
        r#"{{"id": "no-nc-for-bob", "action": "deny", "match": {{"name": "nc"}}, "scope": {{"users": ["bob"]}}}},
           {{"id": "curl-k", "action": "deny", "match": {{"name": "curl", "args_regex": "-k"}}}},
           {{"id": "sh-from-py", "action": "deny", "match": {{"name": "sh", "parent_path": "/usr/bin/python3"}}}},
           {{"id": "staff-tools", "action": "allow", "match": {{"path_glob": "/opt/staff/*"}}, "scope": {{"groups": ["staff"]}}}},
           {{"id": "on-this-mac", "action": "deny", "match": {{"name": "ssh"}}, "scope": {{"devices": ["mac-0042"]}}}},
           {{"id": "hash-for-bob", "action": "allow", "match": {{"sha256": "{SHA_B}"}}, "scope": {{"users": ["bob"]}}}},
           {{"id": "other-path", "action": "deny", "match": {{"name": "ls", "path": "/opt/ls"}}, "scope": {{"users": ["bob"]}}}}"#
    ));
    let file = |path: &str, sha: &str| Subject {
        path: path.into(),
        sha256: Some(sha.parse().unwrap()),
        cdhash: None,
        team_id: None,
        signing_id: None,
        ..subject()
    };
    // Some rule that could match the file looks at the user, the
    // arguments, the parent or the groups: not alike.
    for path in ["/usr/bin/nc", "/usr/bin/curl", "/bin/sh", "/opt/staff/x"] {
        assert!(
            !engine.decides_alike_for_everyone(&file(path, SHA_A)),
            "{path}"
        );
    }
    assert!(
        !engine.decides_alike_for_everyone(&file("/usr/bin/true", SHA_B)),
        "by digest"
    );
    // Only rules that cannot match this file, or device scopes: alike.
    for path in [
        "/usr/bin/true",
        "/usr/bin/ssh",
        "/usr/bin/ls",
        "/opt/other/x",
    ] {
        assert!(
            engine.decides_alike_for_everyone(&file(path, SHA_A)),
            "{path}"
        );
    }
    // A path the daemon could not check is never remembered per file.
    let forged = Subject {
        path_origin: PathOrigin::OtherNamespace,
        ..file("/usr/bin/true", SHA_A)
    };
    assert!(!engine.decides_alike_for_everyone(&forged));

    // What "alike" promises: the same decision whoever runs it.
    let alike = file("/usr/bin/ssh", SHA_A);
    let first = engine.evaluate(&alike);
    for (user, groups, parent, argv) in [
        ("bob", vec![], None, None),
        (
            "carol",
            vec!["staff".to_owned()],
            Some("/usr/bin/python3"),
            Some(vec!["-k".to_owned()]),
        ),
    ] {
        let other = Subject {
            user: user.into(),
            groups,
            parent_path: parent.map(Into::into),
            argv,
            ..alike.clone()
        };
        assert_eq!(engine.evaluate(&other), first);
    }
}
