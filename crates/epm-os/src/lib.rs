//! The operating system's facts, in one place: who a user is and which
//! groups they are in ([`users`]), the platform's default paths
//! ([`paths`]), a program file's code signature ([`signature`]), what the
//! sudoers files give a user as sudo reads them ([`sudoers`]) and the
//! macOS unified log ([`unified_log`]).
//!
//! Every EPM component that asks "what are this user's groups" asks
//! [`users`], so the exec path, `policy explain`, justifications, admin
//! sessions, the runner and the platform's user list all see the same
//! answer (on macOS the whole list Open Directory gives, not just the
//! primary group).
//!
//! **Invariant:** this crate knows nothing about policy, grants, the wire
//! protocol or the daemon; it answers questions about the machine.
//!
//! ```
//! let groups = epm_os::users::groups_of("root", 0);
//! assert_eq!(groups.first(), Some(&0), "the primary group comes first");
//! ```

pub mod paths;
pub mod signature;
pub mod sudoers;
pub mod unified_log;
pub mod users;
