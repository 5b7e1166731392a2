//! The policy document: parse, validate and lint (what `epmctl policy check`
//! and the platform's policy push do), compile, and evaluate the result
//! against subjects, for execs, elevations, edits and admin sessions.
//!
//! Input: the document, then optionally a NUL byte and a synthetic subject,
//! one field a line: path, sha256, cdhash, team id, signing id, bundle id,
//! user, groups (comma-separated), argv (space-separated), parent path,
//! run-as user, device id, platform binary (`y`/`n`), path origin (0-3).
#![no_main]

use epm_policy::{Engine, PathOrigin, Policy, Subject};
use libfuzzer_sys::fuzz_target;

fn subject_from(spec: &str) -> (Subject, String) {
    let mut lines = spec.split('\n');
    let mut next = || lines.next().unwrap_or("");
    let path = next().to_owned();
    let sha256 = next().parse().ok();
    let cdhash = next().parse().ok();
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let team_id = non_empty(next());
    let signing_id = non_empty(next());
    let bundle_id = non_empty(next());
    let user = next().to_owned();
    let groups = next()
        .split(',')
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    let argv = next();
    let argv = (!argv.is_empty()).then(|| argv.split(' ').map(str::to_owned).collect());
    let parent_path = non_empty(next());
    let run_as = next().to_owned();
    let device_id = next().to_owned();
    let platform_binary = match next() {
        "y" => Some(true),
        "n" => Some(false),
        _ => None,
    };
    let path_origin = match next() {
        "1" => PathOrigin::OtherNamespace,
        "2" => PathOrigin::NotFoundHere,
        "3" => PathOrigin::Anonymous,
        _ => PathOrigin::Local,
    };
    let subject = Subject {
        path,
        sha256,
        cdhash,
        team_id,
        signing_id,
        bundle_id,
        platform_binary,
        argv,
        pid: 4242,
        ppid: 1,
        parent_path,
        uid: 501,
        user,
        groups,
        device_id,
        path_origin,
    };
    let run_as = if run_as.is_empty() {
        "root".to_owned()
    } else {
        run_as
    };
    (subject, run_as)
}

fn exercise(engine: &Engine, subject: &Subject, run_as: &str) {
    let decision = engine.evaluate(subject);
    let _ = decision.reason();
    if let Some(id) = &decision.rule_id {
        assert!(
            engine.rule(id).is_some(),
            "the deciding rule {id:?} is not in the engine"
        );
    }
    let _ = engine.evaluate_elevation(subject, run_as);
    let _ = engine.evaluate_edit(subject, run_as);
    if let Some(session) = engine.admin_session(subject) {
        let _ = engine.admin_session_rule(&session.rule.id);
    }
    for spelling in engine.elevation_spellings() {
        let _ = engine.elevation_rule(spelling);
        let _ = engine.elevation_env(spelling);
    }
}

fuzz_target!(|data: &[u8]| {
    let (document, spec) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let Ok(document) = std::str::from_utf8(document) else {
        return;
    };
    let policy = match Policy::from_json(document) {
        Ok(policy) => policy,
        Err(errors) => {
            // Every error is printable (epmctl shows them all).
            let _ = errors.to_string();
            return;
        }
    };
    let _ = policy.lint();
    let engine = match Engine::new(policy) {
        Ok(engine) => engine,
        Err(errors) => panic!("validated policy failed to compile: {errors}"),
    };
    let _ = (
        engine.version(),
        engine.default_action(),
        engine.rule_count(),
        engine.uses_parent_path(),
        engine.uses_group_scope(),
        engine.restricts_by_content(),
        engine.has_elevation_rules(),
    );
    let fixed = Subject {
        path: "/usr/bin/nc".into(),
        user: "alice".into(),
        groups: vec!["staff".into(), "admin".into()],
        argv: Some(vec!["nc".into(), "-l".into(), "4444".into()]),
        device_id: "device-1".into(),
        ..Subject::default()
    };
    exercise(&engine, &fixed, "root");
    if let Some(spec) = spec {
        let (subject, run_as) = subject_from(&String::from_utf8_lossy(spec));
        exercise(&engine, &subject, &run_as);
    }
});
