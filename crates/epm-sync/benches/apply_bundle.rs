//! The time for an agent to verify, open and compile a signed 100 000-rule
//! bundle (target: under 2 s). Rules are mixed like `scripts/gen-policy.py`
//! makes them: mostly SHA-256, some team-id, path, glob and name rules, a
//! tenth user-scoped.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use epm_api::sign::{PolicySigningKey, SignedKind};
use epm_api::{BUNDLE_FORMAT, PolicyBundle};
use sha2::{Digest, Sha256};

const RULES: usize = 100_000;

fn policy(n: usize) -> String {
    let special = (n / 100).max(4);
    let globs = (n / 200).clamp(2, 500);
    let mut rules = Vec::with_capacity(n);
    for i in 0..n {
        let criterion = if i < special {
            format!(r#""team_id": "T{i:09}""#)
        } else if i < 2 * special {
            format!(r#""path": "/usr/local/bin/tool{i}""#)
        } else if i < 2 * special + globs {
            format!(r#""path_glob": "/opt/vendor{i}/**""#)
        } else if i < 2 * special + 2 * globs {
            format!(r#""name": "tool-{i}""#)
        } else {
            let digest = Sha256::digest(i.to_string().as_bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!(r#""sha256": "{hex}""#)
        };
        let action = ["allow", "deny", "justify", "approve"][i % 4];
        let scope = if i % 10 == 9 {
            format!(r#", "scope": {{"users": ["user{}"]}}"#, i % 50)
        } else {
            String::new()
        };
        rules.push(format!(
            r#"{{"id": "r{i}", "action": "{action}", "match": {{{criterion}}}{scope}}}"#
        ));
    }
    format!(
        r#"{{"version": 7, "default_action": "allow", "rules": [{}]}}"#,
        rules.join(",")
    )
}

fn apply_bundle(c: &mut Criterion) {
    let key = PolicySigningKey::generate();
    let bundle = PolicyBundle {
        format: BUNDLE_FORMAT,
        device_id: "bench-device".into(),
        version: 7,
        issued_at: jiff::Timestamp::now(),
        sources: vec![],
        policy: serde_json::value::RawValue::from_string(policy(RULES)).unwrap(),
    };
    let envelope = key.sign(SignedKind::PolicyBundle, &bundle).unwrap();
    // The agent receives the envelope as JSON text: parse that too.
    let wire = serde_json::to_string(&envelope).unwrap();
    eprintln!("bundle: {RULES} rules, {} bytes on the wire", wire.len());
    let pinned = epm_api::sign::PolicyKeys::from(key.public_key());
    let mut group = c.benchmark_group("apply_bundle");
    group.sample_size(10);
    group.bench_function("verify_open_compile_100k_rules", |b| {
        b.iter(|| {
            let envelope: epm_api::SignedEnvelope = serde_json::from_str(black_box(&wire)).unwrap();
            let accepted =
                epm_sync::accept_bundle(&pinned, "bench-device", None, &envelope).unwrap();
            assert_eq!(accepted.engine.rule_count(), RULES);
            accepted
        })
    });
    group.finish();
}

criterion_group!(benches, apply_bundle);
criterion_main!(benches);
