//! Why a grant, flow or elevation request was refused: the domain's error.
//! `control` alone turns it into a wire reply (`From<GrantError> for
//! epm_ipc::Response`), so flows name the kind of failure, never an error
//! code of the protocol.

use crate::grants::program::ProgramError;

/// A refused grant, flow or elevation request; the message is for the
/// caller and names what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The request is malformed or does not apply (wrong flow, bad answer).
    #[error("{0}")]
    BadRequest(String),
    /// What it names does not exist (for this caller).
    #[error("{0}")]
    NotFound(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// It clashes with the current state (already asked, changed meanwhile).
    #[error("{0}")]
    Conflict(String),
    /// Not now: too many, too soon.
    #[error("{0}")]
    TryLater(String),
    /// The daemon failed (store, clock, stopping).
    #[error("{0}")]
    Internal(String),
}

impl From<ProgramError> for GrantError {
    fn from(error: ProgramError) -> GrantError {
        let message = error.to_string();
        match error {
            ProgramError::NotAbsolute(_)
            | ProgramError::DotDot(_)
            | ProgramError::NotAProgram(_)
            | ProgramError::Loop(_) => GrantError::BadRequest(message),
            ProgramError::Unreachable { error, .. }
                if error.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                GrantError::Forbidden(message)
            }
            ProgramError::Unreachable { .. } => GrantError::NotFound(message),
            ProgramError::NotRootControlled { .. } => GrantError::Forbidden(message),
            ProgramError::Changed(_) => GrantError::Conflict(message),
            ProgramError::Io { .. } => GrantError::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_error_keeps_its_message_and_kind() {
        let error = GrantError::from(ProgramError::DotDot("/a/../b".into()));
        assert_eq!(
            error,
            GrantError::BadRequest(
                "/a/../b contains `..`: name the program by its real path".into()
            )
        );
        let denied = ProgramError::Unreachable {
            path: "/x".into(),
            error: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(matches!(GrantError::from(denied), GrantError::Forbidden(_)));
        let missing = ProgramError::Unreachable {
            path: "/x".into(),
            error: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(matches!(GrantError::from(missing), GrantError::NotFound(_)));
        assert!(matches!(
            GrantError::from(ProgramError::Changed("/x".into())),
            GrantError::Conflict(_)
        ));
    }
}
