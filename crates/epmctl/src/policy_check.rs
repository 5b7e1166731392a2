//! `epmctl policy check FILE`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use epm_policy::{Action, Engine, Policy, PolicyError};

pub(crate) fn run(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy {}", file.display()))?;
    // Compiling the engine too catches the one error validation cannot see
    // rule by rule: globs that together exceed the glob compiler's limit.
    let checked =
        Policy::from_json(&text).and_then(|policy| Engine::new(policy.clone()).map(|_| policy));
    match checked {
        Ok(policy) => {
            let warnings = policy.lint();
            if json {
                let value = serde_json::json!({
                    "valid": true,
                    "version": policy.version,
                    "rules": policy.rules.len(),
                    "default_action": policy.default_action,
                    "warnings": warnings.iter().map(error_json).collect::<Vec<_>>(),
                });
                println!("{value}");
            } else {
                println!("{}: {}", file.display(), summary(&policy));
                for warning in &warnings {
                    eprintln!("{}: warning: {warning}", file.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            if json {
                let value = serde_json::json!({
                    "valid": false,
                    "errors": errors.errors().iter().map(error_json).collect::<Vec<_>>(),
                });
                println!("{value}");
            } else {
                for error in errors.errors() {
                    eprintln!("{}: {error}", file.display());
                }
            }
            Ok(ExitCode::from(2))
        }
    }
}

/// "valid, version 7, 6 rules (2 deny, 1 approve, 2 justify, 1 allow), default allow"
fn summary(policy: &Policy) -> String {
    let count = |action| policy.rules.iter().filter(|r| r.action == action).count();
    let breakdown: Vec<String> = [
        Action::Deny,
        Action::Approve,
        Action::Justify,
        Action::Allow,
    ]
    .into_iter()
    .map(|action| (action, count(action)))
    .filter(|(_, n)| *n > 0)
    .map(|(action, n)| format!("{n} {action}"))
    .collect();
    let rules = match policy.rules.len() {
        1 => "1 rule".to_owned(),
        n => format!("{n} rules"),
    };
    let breakdown = if breakdown.is_empty() {
        String::new()
    } else {
        format!(" ({})", breakdown.join(", "))
    };
    format!(
        "valid, version {}, {rules}{breakdown}, default {}",
        policy.version, policy.default_action
    )
}

fn error_json(error: &PolicyError) -> serde_json::Value {
    serde_json::json!({
        "rule": error.rule,
        "field": error.field,
        "message": error.message,
    })
}
