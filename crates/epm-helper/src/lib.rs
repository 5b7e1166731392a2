//! The per-user helper (binary `epm-helper`): what a person at the machine sees.
//!
//! `epmd` decides; the helper only asks and tells. It collects a
//! justification or an approval form for the rule that needs one, shows
//! deny messages and request states, and says when an approved window
//! opens. Every answer it collects is checked here for quick feedback and
//! again by the daemon (`epm_policy::JustificationSpec::check`,
//! `epm_policy::ApprovalSpec::check_window`).
//!
//! Text that comes from a policy or a request (rule messages, program
//! names, approvers' reasons) is shown as text: `epm_prompt::display::shown`
//! escapes what a terminal or dialog could interpret, and no backend splices
//! it into a script or markup.
//!
//! The words and the flows of the conversation live in `epm_prompt`, shared
//! with `epmctl` and `epm-sudo`; this crate adds the session with the daemon
//! ([`session`]) and the desktop backends ([`prompt`]).

pub mod prompt;
pub mod session;
