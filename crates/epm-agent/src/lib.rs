//! `epmd`, the EPM daemon, as a library: the binary in `main.rs` only parses
//! arguments and calls [`daemon::run`]. docs/architecture.md follows one exec
//! through these modules.

pub mod admin_session;
pub mod audit;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod decider;
pub mod flows;
pub mod grant_error;
pub mod kernel_hook;
pub mod managed_prefs;
pub mod pipeline;
pub mod policy_source;
pub mod program;
pub(crate) mod runner;
pub mod session_leftovers;
pub mod stats;
pub mod subject;
pub mod sudoers;
pub mod sync;

// The user directory and the unified log live in epm-os; these names keep
// the exec path's `crate::names` and the audit writer's `crate::unified_log`
// paths working while those modules are being changed elsewhere.
pub use epm_os::unified_log;
pub use epm_os::users as names;

// The exec gates are their own crate; `epm_agent::gate` keeps naming them
// for the end-to-end tests and examples that reach them through the agent.
pub use epm_gate as gate;
