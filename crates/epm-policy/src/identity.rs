//! What a grant or an approval request is bound to: a binary's digest (or,
//! for an admin session, its length), never a path. A path names whatever
//! file is there now; a digest names the file that was approved.
//!
//! One type for every crate that keeps or sends such a binding: the store
//! saves it, the agent matches it against an exec, and the platform API
//! carries it as two strings, converted with `TryFrom` at that edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which digest names a binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// SHA-256 of the file.
    Sha256,
    /// Apple CDHash: the first 20 bytes of the code directory's hash.
    Cdhash,
    /// Not a binary: an admin session of the minutes in the value.
    AdminSession,
}

impl IdentityKind {
    /// Every kind, in declaration order.
    pub const ALL: &[IdentityKind] = &[
        IdentityKind::Sha256,
        IdentityKind::Cdhash,
        IdentityKind::AdminSession,
    ];

    /// The name stored and sent (`sha256`, `cdhash`, `admin_session`).
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Sha256 => "sha256",
            IdentityKind::Cdhash => "cdhash",
            IdentityKind::AdminSession => "admin_session",
        }
    }

    /// How many hex digits a value of a digest kind has (`None` for
    /// [`IdentityKind::AdminSession`], whose value is decimal minutes).
    pub fn hex_len(self) -> Option<usize> {
        match self {
            IdentityKind::Sha256 => Some(64),
            IdentityKind::Cdhash => Some(40),
            IdentityKind::AdminSession => None,
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IdentityKind {
    type Err = IdentityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        IdentityKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| IdentityError::UnknownKind(shown(text)))
    }
}

/// A binary's identity: kind and hex value (or an admin session's minutes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SubjectIdentity {
    /// Which digest.
    pub kind: IdentityKind,
    /// Hex; stored and compared in lowercase.
    pub value: String,
}

impl SubjectIdentity {
    /// The value in lowercase, checked to be a value of its kind: a digest
    /// of the right length in hex, or 1 to 5 decimal digits of minutes.
    ///
    /// ```
    /// use epm_policy::identity::{IdentityKind, SubjectIdentity};
    /// let id = SubjectIdentity { kind: IdentityKind::Cdhash, value: "AB".repeat(20) };
    /// assert_eq!(id.checked_value().unwrap(), "ab".repeat(20));
    /// let path = SubjectIdentity { kind: IdentityKind::Sha256, value: "/usr/bin/docker".into() };
    /// assert!(path.checked_value().is_err());
    /// ```
    pub fn checked_value(&self) -> Result<String, IdentityError> {
        let value = self.value.to_ascii_lowercase();
        match self.kind.hex_len() {
            Some(len) if value.len() != len || !value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Err(IdentityError::NotADigest {
                    kind: self.kind,
                    len,
                    value: shown(&self.value),
                })
            }
            None if value.is_empty()
                || value.len() > 5
                || !value.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Err(IdentityError::NotMinutes(shown(&self.value)))
            }
            _ => Ok(value),
        }
    }
}

/// Why a kind or a value is not an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The kind's name is none of [`IdentityKind::ALL`].
    #[error("unknown identity kind {0:?} (expected sha256, cdhash or admin_session)")]
    UnknownKind(String),
    /// A digest kind's value is not that many hex digits.
    #[error("a {kind} identity is {len} hex digits, not {value:?}")]
    NotADigest {
        /// The kind.
        kind: IdentityKind,
        /// How many hex digits it needs.
        len: usize,
        /// What was given (cut to 80 characters).
        value: String,
    },
    /// An admin session's value is not minutes.
    #[error("an admin_session identity is minutes, not {0:?}")]
    NotMinutes(String),
}

/// At most 80 characters of an untrusted value, for an error message.
fn shown(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_name_and_its_json() {
        for &kind in IdentityKind::ALL {
            assert_eq!(kind.as_str().parse::<IdentityKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).expect("serializes");
            assert_eq!(json, format!("\"{kind}\""));
        }
        assert!(matches!(
            "SHA256".parse::<IdentityKind>(),
            Err(IdentityError::UnknownKind(_))
        ));
    }

    #[test]
    fn values_are_checked_against_their_kind() {
        let id = |kind, value: &str| SubjectIdentity {
            kind,
            value: value.into(),
        };
        let sha = "A".repeat(64);
        assert_eq!(
            id(IdentityKind::Sha256, &sha).checked_value(),
            Ok("a".repeat(64))
        );
        for (kind, value) in [
            (IdentityKind::Sha256, "a".repeat(63)),
            (IdentityKind::Sha256, "g".repeat(64)),
            (IdentityKind::Cdhash, "a".repeat(64)),
            (IdentityKind::Cdhash, String::new()),
            (IdentityKind::AdminSession, String::new()),
            (IdentityKind::AdminSession, "123456".into()),
            (IdentityKind::AdminSession, "-5".into()),
        ] {
            assert!(id(kind, &value).checked_value().is_err(), "{kind} {value}");
        }
        assert_eq!(
            id(IdentityKind::AdminSession, "30").checked_value(),
            Ok("30".into())
        );
        let long = id(IdentityKind::Sha256, &"x".repeat(500)).checked_value();
        assert!(long.is_err_and(|e| e.to_string().len() < 200));
    }
}
