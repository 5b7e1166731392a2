//! What the agent checks before it stores or enforces what the platform
//! sent. Pure given its inputs, so the daemon, its start-up re-check and
//! the benchmark all run exactly this.

use epm_api::sign::{PolicyKeys, SignatureError, SignedKind};
use epm_api::{BUNDLE_FORMAT, BundleSource, Grant, PolicyBundle, SignedEnvelope};
use epm_policy::Engine;
use jiff::Timestamp;
use sha2::{Digest, Sha256};

/// A bundle that passed every check, ready to store and enforce.
#[derive(Debug)]
pub struct AcceptedBundle {
    /// The compiled policy.
    pub engine: Engine,
    /// The bundle's version (equal to the policy's).
    pub version: u64,
    /// The merged policy document, exactly as signed.
    pub document: String,
    /// What was merged into it.
    pub sources: Vec<BundleSource>,
    /// When the platform built it.
    pub issued_at: Timestamp,
    /// SHA-256 of the signed payload: tells a re-sent bundle from a
    /// different one with the same version.
    pub payload_sha256: [u8; 32],
}

/// Why a bundle was refused. The last good policy stays in force.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The envelope's kind, key or signature does not hold (another key,
    /// an altered payload, a grant passed off as a bundle).
    #[error("bad signature: {0}")]
    Signature(SignatureError),
    /// Signed correctly, but not a bundle this agent can read.
    #[error("the signed payload is not a policy bundle: {0}")]
    Payload(String),
    /// A bundle format this agent does not know.
    #[error(
        "bundle format {found} is not supported (this agent reads format {expected}); upgrade the agent"
    )]
    Format {
        /// The bundle's.
        found: u32,
        /// Ours.
        expected: u32,
    },
    /// Made for another device.
    #[error("the bundle is for device {found:?}, this device is {ours:?}")]
    OtherDevice {
        /// The bundle's.
        found: String,
        /// Ours.
        ours: String,
    },
    /// Older than the one in force: a replayed bundle.
    #[error(
        "the bundle's version {offered} is older than version {current} in force (rollback refused)"
    )]
    Rollback {
        /// The bundle's.
        offered: u64,
        /// In force.
        current: u64,
    },
    /// The same version as the one in force, with other content.
    #[error("the bundle claims version {version}, the version in force, but its content differs")]
    SameVersionChanged {
        /// The version.
        version: u64,
    },
    /// The merged policy's own `version` differs from the bundle's.
    #[error("the bundle's version {bundle} differs from its policy's version {policy}")]
    VersionMismatch {
        /// The bundle's.
        bundle: u64,
        /// The policy document's.
        policy: u64,
    },
    /// The merged policy fails validation.
    #[error("the bundle's policy is invalid: {0}")]
    InvalidPolicy(String),
}

/// The platform bundle in force, for the rollback check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentBundle {
    /// Its version.
    pub version: u64,
    /// [`AcceptedBundle::payload_sha256`].
    pub payload_sha256: [u8; 32],
}

impl AcceptedBundle {
    /// What the rollback check needs to remember of this bundle.
    pub fn current(&self) -> CurrentBundle {
        CurrentBundle {
            version: self.version,
            payload_sha256: self.payload_sha256,
        }
    }
}

/// Checks a bundle envelope, in this order: the signature against the
/// pinned `key` (nothing of the payload is parsed before), the format, the
/// device, the version against `current` (no rollback; the same version
/// must be the same bytes), then compiles the policy.
pub fn accept_bundle(
    key: &PolicyKeys,
    device_id: &str,
    current: Option<CurrentBundle>,
    envelope: &SignedEnvelope,
) -> Result<AcceptedBundle, BundleError> {
    let bundle: PolicyBundle =
        key.open(SignedKind::PolicyBundle, envelope)
            .map_err(|e| match e {
                SignatureError::Payload { source, .. } => BundleError::Payload(source.to_string()),
                other => BundleError::Signature(other),
            })?;
    if bundle.format != BUNDLE_FORMAT {
        return Err(BundleError::Format {
            found: bundle.format,
            expected: BUNDLE_FORMAT,
        });
    }
    if bundle.device_id != device_id {
        return Err(BundleError::OtherDevice {
            found: bundle.device_id.chars().take(100).collect(),
            ours: device_id.to_owned(),
        });
    }
    let payload_sha256: [u8; 32] = Sha256::digest(envelope.payload.as_bytes()).into();
    if let Some(current) = current {
        if bundle.version < current.version {
            return Err(BundleError::Rollback {
                offered: bundle.version,
                current: current.version,
            });
        }
        if bundle.version == current.version && payload_sha256 != current.payload_sha256 {
            return Err(BundleError::SameVersionChanged {
                version: bundle.version,
            });
        }
    }
    let document = bundle.policy.get().to_owned();
    let engine = Engine::from_json(&document)
        .map_err(|errors| BundleError::InvalidPolicy(errors.to_string().replace('\n', "; ")))?;
    if engine.version() != bundle.version {
        return Err(BundleError::VersionMismatch {
            bundle: bundle.version,
            policy: engine.version(),
        });
    }
    Ok(AcceptedBundle {
        engine,
        version: bundle.version,
        document,
        sources: bundle.sources,
        issued_at: bundle.issued_at,
        payload_sha256,
    })
}

/// Why a delivered grant was refused.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The signature does not hold, or the payload is not a grant.
    #[error("bad grant signature: {0}")]
    Signature(#[from] SignatureError),
    /// Made for another device.
    #[error("the grant is for device {found:?}, this device is {ours:?}")]
    OtherDevice {
        /// The grant's.
        found: String,
        /// Ours.
        ours: String,
    },
    /// Not for the request it was delivered with.
    #[error("the grant is for request {found:?}, delivered with request {expected:?}")]
    OtherRequest {
        /// The grant's.
        found: String,
        /// The request it came with.
        expected: String,
    },
    /// Its window is empty.
    #[error("the grant's window ends before it starts")]
    EmptyWindow,
}

/// Verifies a grant delivered with the platform request `request_id`
/// against the pinned key and this device. Matching it to the local request
/// (user, binary) is the caller's, who holds that request.
pub fn accept_grant(
    key: &PolicyKeys,
    device_id: &str,
    request_id: &str,
    envelope: &SignedEnvelope,
) -> Result<Grant, GrantError> {
    let grant: Grant = key.open(SignedKind::Grant, envelope)?;
    if grant.device_id != device_id {
        return Err(GrantError::OtherDevice {
            found: grant.device_id.chars().take(100).collect(),
            ours: device_id.to_owned(),
        });
    }
    if grant.request_id != request_id {
        return Err(GrantError::OtherRequest {
            found: grant.request_id.chars().take(100).collect(),
            expected: request_id.to_owned(),
        });
    }
    if grant.not_after <= grant.not_before {
        return Err(GrantError::EmptyWindow);
    }
    Ok(grant)
}

#[cfg(test)]
mod tests {
    use epm_api::sign::PolicySigningKey;

    use super::*;

    fn bundle(device: &str, version: u64, policy: &str) -> PolicyBundle {
        PolicyBundle {
            format: BUNDLE_FORMAT,
            device_id: device.into(),
            version,
            issued_at: Timestamp::UNIX_EPOCH,
            sources: vec![],
            policy: serde_json::value::RawValue::from_string(policy.into()).unwrap(),
        }
    }

    fn policy(version: u64) -> String {
        format!(
            r#"{{"version": {version}, "default_action": "allow", "rules": [
            {{"id": "no-nc", "action": "deny", "match": {{"name": "nc"}}}}]}}"#
        )
    }

    fn signed(key: &PolicySigningKey, bundle: &PolicyBundle) -> SignedEnvelope {
        key.sign(SignedKind::PolicyBundle, bundle).unwrap()
    }

    #[test]
    fn a_good_bundle_is_accepted_and_compiled() {
        let key = PolicySigningKey::generate();
        let envelope = signed(&key, &bundle("d1", 3, &policy(3)));
        let accepted = accept_bundle(&key.public_key().into(), "d1", None, &envelope).unwrap();
        assert_eq!(accepted.version, 3);
        assert_eq!(accepted.engine.rule_count(), 1);
        assert_eq!(accepted.document, policy(3));
        // The same bundle again is fine; another with its version is not.
        let again = accept_bundle(
            &key.public_key().into(),
            "d1",
            Some(accepted.current()),
            &envelope,
        );
        assert!(again.is_ok());
        let mut changed = bundle("d1", 3, &policy(3));
        changed.sources.push(BundleSource {
            scope: "general".into(),
            revision: 2,
            rules: 1,
        });
        let err = accept_bundle(
            &key.public_key().into(),
            "d1",
            Some(accepted.current()),
            &signed(&key, &changed),
        )
        .unwrap_err();
        assert!(
            matches!(err, BundleError::SameVersionChanged { version: 3 }),
            "{err}"
        );
    }

    #[test]
    fn each_refusal_is_distinct_and_named() {
        let key = PolicySigningKey::generate();
        let other = PolicySigningKey::generate();
        let pinned = PolicyKeys::from(key.public_key());
        let current = Some(CurrentBundle {
            version: 5,
            payload_sha256: [0; 32],
        });
        let check = |envelope: &SignedEnvelope| {
            accept_bundle(&pinned, "d1", current, envelope)
                .unwrap_err()
                .to_string()
        };
        assert!(
            check(&signed(&other, &bundle("d1", 6, &policy(6))))
                .starts_with("bad signature: signed by ed25519:")
        );
        let mut forged = signed(&key, &bundle("d1", 6, &policy(6)));
        forged.payload = forged.payload.replace("no-nc", "no-sh");
        assert!(check(&forged).contains("does not match the payload"));
        assert!(check(&signed(&key, &bundle("d2", 6, &policy(6)))).contains("for device \"d2\""));
        assert!(check(&signed(&key, &bundle("d1", 4, &policy(4)))).contains("rollback refused"));
        assert!(
            check(&signed(
                &key,
                &bundle("d1", 6, r#"{"version": 6, "rules": 3}"#)
            ))
            .starts_with("the bundle's policy is invalid")
        );
        assert!(
            check(&signed(&key, &bundle("d1", 7, &policy(6))))
                .contains("differs from its policy's version 6")
        );
        let mut future = bundle("d1", 6, &policy(6));
        future.format = 2;
        assert!(check(&signed(&key, &future)).contains("format 2 is not supported"));
        let not_a_bundle = key.sign_payload(SignedKind::PolicyBundle, "{\"x\":1}".into());
        assert!(check(&not_a_bundle).starts_with("the signed payload is not a policy bundle"));
        let grant = key.sign(SignedKind::Grant, &Grant::example()).unwrap();
        assert!(check(&grant).contains("expected a signed policy bundle"));
    }

    #[test]
    fn grants_are_checked_for_key_device_and_request() {
        let key = PolicySigningKey::generate();
        let grant = Grant::example();
        let envelope = key.sign(SignedKind::Grant, &grant).unwrap();
        let pinned = PolicyKeys::from(key.public_key());
        assert_eq!(
            accept_grant(&pinned, "mac-0042", "req-1", &envelope).unwrap(),
            grant
        );
        assert!(matches!(
            accept_grant(&pinned, "mac-9", "req-1", &envelope),
            Err(GrantError::OtherDevice { .. })
        ));
        assert!(matches!(
            accept_grant(&pinned, "mac-0042", "req-2", &envelope),
            Err(GrantError::OtherRequest { .. })
        ));
        let other = PolicySigningKey::generate();
        assert!(matches!(
            accept_grant(&other.public_key().into(), "mac-0042", "req-1", &envelope),
            Err(GrantError::Signature(_))
        ));
    }
}
