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
pub mod gate;
pub mod kernel_hook;
pub mod managed_prefs;
pub mod names;
pub mod pipeline;
pub mod policy_source;
pub mod program;
pub(crate) mod runner;
pub mod session_leftovers;
pub mod stats;
pub mod sudoers;
pub mod sync;
pub mod unified_log;
