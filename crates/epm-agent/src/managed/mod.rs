//! Management by the platform: the [`sync`] cycle (policy, grants,
//! approvals, audit upload) and the [`policy_source`] it installs policy
//! from.

pub mod policy_source;
pub(crate) mod sync;
