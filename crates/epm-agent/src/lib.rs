//! `epmd`, the EPM daemon, as a library: the binary in `main.rs` only parses
//! arguments and calls [`daemon::run`]. docs/architecture.md follows one exec
//! through these modules.

pub mod config;
pub(crate) mod control;
pub mod daemon;
pub mod exec;
pub(crate) mod grants;
pub(crate) mod managed;

// Paths the binary, the end-to-end tests and the benches name.
pub use config::managed_prefs;
pub use exec::kernel_hook;
pub use grants::{program, session_leftovers};
pub use managed::policy_source;

// The user directory and the unified log live in epm-os; these names keep
// the exec path's `crate::names` and the audit writer's `crate::unified_log`
// paths working while those modules are being changed elsewhere.
pub use epm_os::unified_log;
pub use epm_os::users as names;

// The exec gates are their own crate; `epm_agent::gate` keeps naming them
// for the end-to-end tests and examples that reach them through the agent.
pub use epm_gate as gate;
