//! The EPM policy model and evaluation engine.
//!
//! Pure: no IO, no async, no platform code. Exec gates fill a [`Subject`],
//! the daemon holds an [`Engine`] compiled from a [`Policy`], and
//! [`Engine::evaluate`] returns a [`Decision`] that explains itself.
//!
//! ```
//! use epm_policy::{Action, Engine, Policy, Subject};
//!
//! let policy = Policy::from_json(r#"{
//!     "version": 3,
//!     "default_action": "allow",
//!     "rules": [
//!         { "id": "no-netcat", "action": "deny", "match": { "name": "nc" },
//!           "message": "netcat is not allowed on company devices" }
//!     ]
//! }"#)?;
//! let engine = Engine::new(policy)?;
//!
//! let subject = Subject { path: "/usr/bin/nc".into(), ..Subject::default() };
//! let decision = engine.evaluate(&subject);
//! assert_eq!(decision.action, Action::Deny);
//! assert_eq!(decision.rule_id.as_deref(), Some("no-netcat"));
//! assert_eq!(decision.reason(), "rule \"no-netcat\" matched by name (general scope)");
//! # Ok::<(), epm_policy::PolicyErrors>(())
//! ```
//!
//! Precedence among matching rules is documented in `docs/policy.md`: the
//! most specific identity criterion wins, then the most specific scope, then
//! the strictest action.

mod answers;
mod digest;
mod engine;
pub mod env;
pub mod identity;
mod model;
mod subject;
mod validate;

pub use answers::{AnswerError, START_GRACE, visible_length};
pub use digest::{CdHash, DigestError, Sha256Digest};
pub use engine::{AdminSessionMatch, Decision, Engine, RuleInfo};
pub use model::{
    Action, AdminSessionRule, ApprovalLevel, ApprovalSpec, ApprovalTerms, Criteria, Criterion,
    ElevationRule, JustificationSpec, Policy, Rule, Scope, ScopeMatch, Section, SessionRequirement,
};
pub use subject::{PathOrigin, Subject};
pub use validate::{MAX_RULES, PolicyError, PolicyErrors};

#[cfg(test)]
mod tests;
