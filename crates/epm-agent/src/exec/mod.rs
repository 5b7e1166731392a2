//! The exec path: what happens to an exec a gate (epm-gate) holds. The
//! [`pipeline`] takes it off the gate's thread, the [`decider`] answers it
//! from the policy, grants and the file's identity, [`audit`] writes the
//! record, [`stats`] counts. [`kernel_hook`] is the second source of held
//! execs on Linux. Nothing here speaks the control protocol.

pub mod audit;
pub mod decider;
pub mod kernel_hook;
pub mod pipeline;
pub mod stats;
