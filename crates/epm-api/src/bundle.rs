use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

/// The format number of [`PolicyBundle`] this code writes and reads.
pub const BUNDLE_FORMAT: u32 = 1;

/// What one device enforces: every policy document that targets it or its
/// users, merged into one policy, signed by the platform.
///
/// The agent accepts a bundle only if the signature verifies against its
/// pinned key, `device_id` is its own, `version` is not older than the one
/// it enforces (no rollback by replaying an old bundle), and `policy`
/// passes validation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBundle {
    /// [`BUNDLE_FORMAT`].
    pub format: u32,
    /// The device this bundle was made for.
    pub device_id: String,
    /// Increases each time this device's merged policy changes; also the
    /// merged policy's `version`.
    pub version: u64,
    /// When the platform built it.
    #[schema(value_type = String, format = DateTime)]
    pub issued_at: Timestamp,
    /// The documents merged into it, for display and audit.
    pub sources: Vec<BundleSource>,
    /// The merged policy document, in the format of `docs/policy.md`.
    #[schema(value_type = Object)]
    pub policy: Box<RawValue>,
}

/// One document merged into a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BundleSource {
    /// `general`, `device:ID`, `user:NAME` or `group:NAME`.
    pub scope: String,
    /// The document's revision on the platform.
    pub revision: u64,
    /// How many of its rules are in the bundle.
    pub rules: u64,
}

/// The binary a request or grant is about: a digest, never a path.
///
/// The wire form of [`epm_policy::identity::SubjectIdentity`]: two strings,
/// so a newer kind reaches the other side as text it can refuse by name.
/// Convert with `TryFrom` (which checks the kind and the value) and `From`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubjectIdentity {
    /// `sha256` or `cdhash`.
    pub kind: String,
    /// Lowercase hex.
    pub value: String,
}

impl TryFrom<&SubjectIdentity> for epm_policy::identity::SubjectIdentity {
    type Error = epm_policy::identity::IdentityError;

    /// The typed identity, its value lowercased and checked for its kind.
    fn try_from(wire: &SubjectIdentity) -> Result<Self, Self::Error> {
        let identity = epm_policy::identity::SubjectIdentity {
            kind: wire.kind.parse()?,
            value: wire.value.clone(),
        };
        let value = identity.checked_value()?;
        Ok(epm_policy::identity::SubjectIdentity { value, ..identity })
    }
}

impl From<&epm_policy::identity::SubjectIdentity> for SubjectIdentity {
    fn from(identity: &epm_policy::identity::SubjectIdentity) -> Self {
        SubjectIdentity {
            kind: identity.kind.as_str().to_owned(),
            value: identity.value.clone(),
        }
    }
}

/// Permission to run one binary, for one user, inside a window, a number of
/// times: what an approved request turns into. Signed by the platform so an
/// agent can store it and trust it offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The platform's request id.
    pub request_id: String,
    /// The device it is valid on.
    pub device_id: String,
    /// The user it is valid for (login name).
    pub user: String,
    /// The binary.
    pub identity: SubjectIdentity,
    /// The rule that required approval.
    pub rule_id: String,
    /// Not valid before.
    #[schema(value_type = String, format = DateTime)]
    pub not_before: Timestamp,
    /// Not valid after.
    #[schema(value_type = String, format = DateTime)]
    pub not_after: Timestamp,
    /// How many executions it allows.
    pub uses: u32,
    /// When the platform issued it.
    #[schema(value_type = String, format = DateTime)]
    pub issued_at: Timestamp,
}

impl Grant {
    /// A grant for documentation and tests.
    pub fn example() -> Grant {
        Grant {
            request_id: "req-1".into(),
            device_id: "mac-0042".into(),
            user: "alice".into(),
            identity: SubjectIdentity {
                kind: "sha256".into(),
                value: "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4".into(),
            },
            rule_id: "wireshark".into(),
            not_before: Timestamp::from_second(1_800_000_000).unwrap_or(Timestamp::UNIX_EPOCH),
            not_after: Timestamp::from_second(1_800_003_600).unwrap_or(Timestamp::UNIX_EPOCH),
            uses: 1,
            issued_at: Timestamp::from_second(1_799_999_000).unwrap_or(Timestamp::UNIX_EPOCH),
        }
    }
}

#[cfg(test)]
mod tests {
    use epm_policy::identity::{IdentityError, IdentityKind};

    use super::*;

    fn wire(kind: &str, value: &str) -> SubjectIdentity {
        SubjectIdentity {
            kind: kind.into(),
            value: value.into(),
        }
    }

    #[test]
    fn an_identity_crosses_the_wire_and_back_checked() {
        let typed =
            epm_policy::identity::SubjectIdentity::try_from(&wire("cdhash", &"AB".repeat(20)))
                .expect("a cdhash");
        assert_eq!(typed.kind, IdentityKind::Cdhash);
        assert_eq!(typed.value, "ab".repeat(20));
        assert_eq!(
            SubjectIdentity::from(&typed),
            wire("cdhash", &"ab".repeat(20))
        );
    }

    #[test]
    fn unknown_kinds_and_paths_are_refused() {
        let unknown = epm_policy::identity::SubjectIdentity::try_from(&wire("md5", "00"));
        assert!(matches!(unknown, Err(IdentityError::UnknownKind(_))));
        let path = epm_policy::identity::SubjectIdentity::try_from(&wire("sha256", "/bin/sh"));
        assert!(matches!(path, Err(IdentityError::NotADigest { .. })));
    }
}
