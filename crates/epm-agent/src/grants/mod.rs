//! Grants and the conversations that make them: justify, approval,
//! offline codes, elevation ([`flows`]), admin sessions
//! ([`admin_session`], with [`session_leftovers`] and `epm_os::sudoers`), the one
//! [`subject`] for a file a caller names, and the [`program`] a user asks
//! to run. Errors are [`grant_error::GrantError`]; the control module
//! turns them into replies.

pub(crate) mod admin_session;
pub(crate) mod clock;
pub(crate) mod flows;
pub(crate) mod grant_error;
pub mod program;
pub mod session_leftovers;
pub(crate) mod subject;
