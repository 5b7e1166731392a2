//! Evaluation and load benchmarks at 1 000 and 100 000 rules.
//!
//! The synthetic policy mixes rule kinds the way a real fleet's policy does:
//! mostly digest rules (hash allow/deny lists), some team-id, path, glob and
//! name rules, and a tenth of all rules scoped to a user.
//! Run with `cargo bench -p epm-policy`; results go to docs/performance.md.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use epm_policy::{Engine, Sha256Digest, Subject};

/// Deterministic pseudo-random 32 bytes (splitmix64), so runs are comparable.
fn digest_bytes(seed: u64) -> [u8; 32] {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes()[..chunk.len()]);
    }
    out
}

fn team_id(i: usize) -> String {
    format!("T{i:09}")
}

/// Builds the synthetic policy document with `n` rules.
fn synthetic_policy(n: usize) -> String {
    let special = (n / 100).max(4);
    let globs = (n / 200).clamp(2, 500);
    let mut rules = Vec::with_capacity(n);
    for i in 0..n {
        let action = ["allow", "deny", "justify", "approve"][i % 4];
        let criteria = if i < special {
            format!(r#"{{"team_id":"{}"}}"#, team_id(i))
        } else if i < 2 * special {
            format!(r#"{{"path":"/usr/local/bin/tool{i}"}}"#)
        } else if i < 2 * special + globs {
            if i.is_multiple_of(2) {
                format!(r#"{{"path_glob":"/opt/vendor{i}/**"}}"#)
            } else {
                format!(r#"{{"path_glob":"/Applications/App{i}.app/Contents/MacOS/*"}}"#)
            }
        } else if i < 2 * special + 2 * globs {
            format!(r#"{{"name":"tool-{i}"}}"#)
        } else {
            format!(r#"{{"sha256":"{}"}}"#, hex::encode(digest_bytes(i as u64)))
        };
        let scope = if i % 10 == 9 {
            format!(r#","scope":{{"users":["user{}"]}}"#, i % 50)
        } else {
            String::new()
        };
        rules.push(format!(
            r#"{{"id":"r{i}","action":"{action}","match":{criteria}{scope}}}"#
        ));
    }
    format!(
        r#"{{"version":1,"default_action":"allow","rules":[{}]}}"#,
        rules.join(",")
    )
}

fn subject(path: &str) -> Subject {
    Subject {
        path: path.to_owned(),
        sha256: Some(Sha256Digest(digest_bytes(u64::MAX))),
        uid: 501,
        user: "user7".into(),
        groups: vec!["staff".into(), "everyone".into()],
        device_id: "mac-0042".into(),
        ..Subject::default()
    }
}

fn bench_evaluate(c: &mut Criterion) {
    let mut group = c.benchmark_group("evaluate");
    for n in [1_000usize, 100_000] {
        let engine = Engine::from_json(&synthetic_policy(n)).expect("synthetic policy is valid");
        let special = (n / 100).max(4);
        let globs = (n / 200).clamp(2, 500);

        // Every tenth rule is user-scoped to someone else; pick unscoped ones.
        let unscoped = |i: usize| if i % 10 == 9 { i - 1 } else { i };
        let digest_rule = unscoped(n - 1);
        let mut digest_hit = subject("/usr/bin/something");
        digest_hit.sha256 = Some(Sha256Digest(digest_bytes(digest_rule as u64)));
        assert_eq!(
            engine.evaluate(&digest_hit).rule_id.as_deref(),
            Some(format!("r{digest_rule}").as_str())
        );

        let mut team_hit = subject("/Applications/Some.app/Contents/MacOS/Some");
        team_hit.team_id = Some(team_id(unscoped(special / 2)));
        assert!(engine.evaluate(&team_hit).rule_id.is_some());

        let glob_rule = unscoped(2 * special + globs - 1);
        let glob_hit = subject(&if glob_rule.is_multiple_of(2) {
            format!("/opt/vendor{glob_rule}/bin/tool")
        } else {
            format!("/Applications/App{glob_rule}.app/Contents/MacOS/App")
        });
        assert_eq!(
            engine.evaluate(&glob_hit).rule_id.as_deref(),
            Some(format!("r{glob_rule}").as_str())
        );

        let miss = subject("/usr/bin/unknown-tool");
        assert!(engine.evaluate(&miss).rule_id.is_none());

        for (label, s) in [
            ("digest_hit", &digest_hit),
            ("team_id_hit", &team_hit),
            ("glob_hit", &glob_hit),
            ("miss", &miss),
        ] {
            group.bench_with_input(BenchmarkId::new(label, n), s, |b, s| {
                b.iter(|| black_box(engine.evaluate(black_box(s))))
            });
        }
    }
    group.finish();
}

fn bench_load(c: &mut Criterion) {
    let mut group = c.benchmark_group("load");
    group.sample_size(10);
    for n in [1_000usize, 100_000] {
        let document = synthetic_policy(n);
        group.bench_with_input(
            BenchmarkId::new("parse_validate_index", n),
            &document,
            |b, d| b.iter(|| black_box(Engine::from_json(d).expect("valid"))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_evaluate, bench_load);
criterion_main!(benches);
