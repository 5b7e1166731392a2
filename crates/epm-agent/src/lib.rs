//! `epmd`, the EPM daemon, as a library: the binary in `main.rs` only parses
//! arguments and calls [`daemon::run`]. See docs/architecture.md for the
//! path of one exec through these modules.

pub mod config;
pub mod decider;
pub mod gate;
pub mod names;
pub mod stats;
