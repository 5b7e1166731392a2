//! Signed envelopes: how policy bundles and grants travel.
//!
//! The signature covers `epm-v1/<kind>\n` followed by the payload's exact
//! bytes, so a signature made for one kind never verifies as another, and
//! nothing is re-serialized before checking. Keys are Ed25519; the public
//! key is written `ed25519:<base64>` (the content of the platform's
//! `signing-key.pub`, and the agent's `policy_public_key` setting).

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What a signed payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignedKind {
    /// A [`crate::PolicyBundle`].
    PolicyBundle,
    /// A [`crate::Grant`].
    Grant,
}

impl SignedKind {
    fn domain(self) -> &'static [u8] {
        match self {
            SignedKind::PolicyBundle => b"epm-v1/policy_bundle\n",
            SignedKind::Grant => b"epm-v1/grant\n",
        }
    }
}

impl fmt::Display for SignedKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SignedKind::PolicyBundle => "policy bundle",
            SignedKind::Grant => "grant",
        })
    }
}

/// A payload (JSON text) with the platform's signature over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedEnvelope {
    /// What the payload is.
    pub kind: SignedKind,
    /// The payload, JSON text, exactly as signed.
    pub payload: String,
    /// Standard base64 of the 64-byte Ed25519 signature.
    pub signature: String,
    /// The signing key, `ed25519:<base64>`, so a mismatch with the pinned key
    /// can be named in the error.
    pub key: String,
}

/// Why an envelope was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// The envelope says it is something else.
    #[error("expected a signed {expected}, got a signed {found}")]
    WrongKind {
        /// What the caller asked for.
        expected: SignedKind,
        /// What the envelope says.
        found: SignedKind,
    },
    /// Signed by a key other than the pinned one.
    #[error("signed by {found}, which is not a pinned key (policy_public_key: {pinned})")]
    WrongKey {
        /// The pinned key or keys.
        pinned: String,
        /// The key the envelope names.
        found: String,
    },
    /// The signature is not 64 bytes of base64.
    #[error("the signature is not valid base64 of 64 bytes")]
    Malformed,
    /// The signature does not match the payload.
    #[error("the signature does not match the payload (altered or forged)")]
    Invalid,
    /// Verified, but the payload is not the expected JSON.
    #[error("the signed payload is not a valid {kind}: {source}")]
    Payload {
        /// What it should be.
        kind: SignedKind,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// The platform's private signing key.
pub struct PolicySigningKey(SigningKey);

impl fmt::Debug for PolicySigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PolicySigningKey")
            .field(&self.public_key())
            .finish()
    }
}

impl PolicySigningKey {
    /// A new random key.
    pub fn generate() -> PolicySigningKey {
        PolicySigningKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// Reads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &str) -> Result<PolicySigningKey, KeyError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(PolicySigningKey)
            .map_err(|e| KeyError(format!("not an Ed25519 PKCS#8 PEM private key: {e}")))
    }

    /// The key as PKCS#8 PEM, for the platform's data directory.
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        self.0
            .to_pkcs8_pem(Default::default())
            .map(|pem| pem.to_string())
            .map_err(|e| KeyError(format!("cannot encode the signing key: {e}")))
    }

    /// The public half, for agents to pin.
    pub fn public_key(&self) -> PolicyPublicKey {
        PolicyPublicKey(self.0.verifying_key())
    }

    /// Serializes `value` and signs it as `kind`.
    pub fn sign<T: Serialize>(
        &self,
        kind: SignedKind,
        value: &T,
    ) -> Result<SignedEnvelope, serde_json::Error> {
        Ok(self.sign_payload(kind, serde_json::to_string(value)?))
    }

    /// Signs JSON text that is already serialized.
    pub fn sign_payload(&self, kind: SignedKind, payload: String) -> SignedEnvelope {
        let signature = self.0.sign(&signed_bytes(kind, &payload));
        SignedEnvelope {
            kind,
            payload,
            signature: BASE64.encode(signature.to_bytes()),
            key: self.public_key().to_string(),
        }
    }
}

/// A platform's public signing key: what an agent pins.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PolicyPublicKey(VerifyingKey);

impl fmt::Debug for PolicyPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyPublicKey({self})")
    }
}

impl fmt::Display for PolicyPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", BASE64.encode(self.0.as_bytes()))
    }
}

impl FromStr for PolicyPublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<PolicyPublicKey, KeyError> {
        let text = text.trim();
        let encoded = text.strip_prefix("ed25519:").ok_or_else(|| {
            KeyError(format!(
                "a policy public key is written `ed25519:<base64>` (the content of the platform's signing-key.pub), not {:?}",
                text.chars().take(60).collect::<String>()
            ))
        })?;
        let bytes = BASE64
            .decode(encoded)
            .map_err(|e| KeyError(format!("the key after `ed25519:` is not base64: {e}")))?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            KeyError(format!(
                "an Ed25519 public key is 32 bytes, this one is {}",
                bytes.len()
            ))
        })?;
        VerifyingKey::from_bytes(&bytes)
            .map(PolicyPublicKey)
            .map_err(|_| KeyError("not a valid Ed25519 public key".into()))
    }
}

impl PolicyPublicKey {
    /// Checks the envelope's kind and signature, then parses the payload.
    /// Nothing of the payload is parsed before the signature holds.
    pub fn open<T: DeserializeOwned>(
        &self,
        kind: SignedKind,
        envelope: &SignedEnvelope,
    ) -> Result<T, SignatureError> {
        PolicyKeys::from(*self).open(kind, envelope)
    }

    /// Checks the envelope's kind and signature only.
    pub fn verify(
        &self,
        kind: SignedKind,
        envelope: &SignedEnvelope,
    ) -> Result<(), SignatureError> {
        if envelope.kind != kind {
            return Err(SignatureError::WrongKind {
                expected: kind,
                found: envelope.kind,
            });
        }
        let pinned = self.to_string();
        if envelope.key != pinned {
            return Err(SignatureError::WrongKey {
                pinned,
                found: envelope.key.chars().take(80).collect(),
            });
        }
        let bytes = BASE64
            .decode(&envelope.signature)
            .map_err(|_| SignatureError::Malformed)?;
        let bytes: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SignatureError::Malformed)?;
        self.0
            .verify(
                &signed_bytes(kind, &envelope.payload),
                &Signature::from_bytes(&bytes),
            )
            .map_err(|_| SignatureError::Invalid)
    }
}

/// The platform keys an agent trusts: one, or during a rotation of the
/// platform's signing key two (the key in use and the next one, or the
/// last one and the new one). An envelope must name one of them and be
/// signed by it. Written as one key or a list (`policy_public_key`).
#[derive(Clone, PartialEq, Eq)]
pub struct PolicyKeys(Vec<PolicyPublicKey>);

impl PolicyKeys {
    /// The most keys trusted at once: a rotation needs two.
    pub const MAX: usize = 4;

    /// Trusts `keys` (duplicates count once): at least one, at most
    /// [`PolicyKeys::MAX`].
    pub fn new(keys: impl IntoIterator<Item = PolicyPublicKey>) -> Result<PolicyKeys, KeyError> {
        let mut unique: Vec<PolicyPublicKey> = Vec::new();
        for key in keys {
            if !unique.contains(&key) {
                unique.push(key);
            }
        }
        match unique.len() {
            0 => Err(KeyError("at least one policy public key is needed".into())),
            n if n > Self::MAX => Err(KeyError(format!(
                "at most {} policy public keys are trusted at once (a rotation needs two), not {n}",
                Self::MAX
            ))),
            _ => Ok(PolicyKeys(unique)),
        }
    }

    /// The keys, in the order given.
    pub fn keys(&self) -> &[PolicyPublicKey] {
        &self.0
    }

    /// Checks the envelope's kind and signature by the trusted key it
    /// names, then parses the payload. Nothing of the payload is parsed
    /// before the signature holds.
    pub fn open<T: DeserializeOwned>(
        &self,
        kind: SignedKind,
        envelope: &SignedEnvelope,
    ) -> Result<T, SignatureError> {
        self.verify(kind, envelope)?;
        serde_json::from_str(&envelope.payload)
            .map_err(|source| SignatureError::Payload { kind, source })
    }

    /// Checks the envelope's kind and signature only.
    pub fn verify(
        &self,
        kind: SignedKind,
        envelope: &SignedEnvelope,
    ) -> Result<(), SignatureError> {
        match self.0.iter().find(|key| key.to_string() == envelope.key) {
            Some(key) => key.verify(kind, envelope),
            None if envelope.kind != kind => Err(SignatureError::WrongKind {
                expected: kind,
                found: envelope.kind,
            }),
            None => Err(SignatureError::WrongKey {
                pinned: self.to_string(),
                found: envelope.key.chars().take(80).collect(),
            }),
        }
    }
}

impl From<PolicyPublicKey> for PolicyKeys {
    fn from(key: PolicyPublicKey) -> PolicyKeys {
        PolicyKeys(vec![key])
    }
}

impl fmt::Display for PolicyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PolicyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyKeys({self})")
    }
}

fn signed_bytes(kind: SignedKind, payload: &str) -> Vec<u8> {
    let domain = kind.domain();
    let mut bytes = Vec::with_capacity(domain.len() + payload.len());
    bytes.extend_from_slice(domain);
    bytes.extend_from_slice(payload.as_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Grant;

    #[test]
    fn during_a_rotation_either_trusted_key_opens_and_no_other() {
        let old = PolicySigningKey::generate();
        let new = PolicySigningKey::generate();
        let stranger = PolicySigningKey::generate();
        let trusted = PolicyKeys::new([old.public_key(), new.public_key()]).unwrap();
        for key in [&old, &new] {
            let envelope = key.sign(SignedKind::Grant, &Grant::example()).unwrap();
            assert_eq!(
                trusted.open::<Grant>(SignedKind::Grant, &envelope).unwrap(),
                Grant::example()
            );
            let err = trusted
                .open::<Grant>(SignedKind::PolicyBundle, &envelope)
                .unwrap_err();
            assert!(matches!(err, SignatureError::WrongKind { .. }), "{err}");
        }
        let envelope = stranger.sign(SignedKind::Grant, &Grant::example()).unwrap();
        let err = trusted
            .open::<Grant>(SignedKind::Grant, &envelope)
            .unwrap_err();
        assert!(matches!(err, SignatureError::WrongKey { .. }), "{err}");
        assert!(
            err.to_string().contains(&new.public_key().to_string()),
            "{err}"
        );
        // Naming a trusted key does not help a stranger: the signature is checked.
        let mut forged = envelope;
        forged.key = old.public_key().to_string();
        let err = trusted
            .open::<Grant>(SignedKind::Grant, &forged)
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid), "{err}");
    }

    #[test]
    fn a_key_list_is_one_to_four_keys() {
        assert!(PolicyKeys::new([]).is_err());
        let key = PolicySigningKey::generate().public_key();
        assert_eq!(PolicyKeys::new([key, key]).unwrap().keys().len(), 1);
        let five: Vec<PolicyPublicKey> = (0..5)
            .map(|_| PolicySigningKey::generate().public_key())
            .collect();
        let err = PolicyKeys::new(five).unwrap_err();
        assert!(err.to_string().contains("at most 4"), "{err}");
        assert_eq!(PolicyKeys::from(key).to_string(), key.to_string());
    }

    #[test]
    fn a_signed_grant_opens_with_its_key_only() {
        let key = PolicySigningKey::generate();
        let other = PolicySigningKey::generate();
        let envelope = key.sign(SignedKind::Grant, &Grant::example()).unwrap();
        assert_eq!(
            key.public_key()
                .open::<Grant>(SignedKind::Grant, &envelope)
                .unwrap(),
            Grant::example()
        );
        let err = other
            .public_key()
            .open::<Grant>(SignedKind::Grant, &envelope)
            .unwrap_err();
        assert!(matches!(err, SignatureError::WrongKey { .. }), "{err}");
        // Claiming the other key does not help: the signature is checked.
        let mut forged = envelope.clone();
        forged.key = other.public_key().to_string();
        let err = other
            .public_key()
            .open::<Grant>(SignedKind::Grant, &forged)
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid), "{err}");
    }

    #[test]
    fn any_change_to_the_payload_breaks_the_signature() {
        let key = PolicySigningKey::generate();
        let mut envelope = key.sign(SignedKind::Grant, &Grant::example()).unwrap();
        envelope.payload = envelope.payload.replace("\"uses\":1", "\"uses\":9");
        let err = key
            .public_key()
            .open::<Grant>(SignedKind::Grant, &envelope)
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid), "{err}");
        envelope.signature = "bm90IGEgc2lnbmF0dXJl".into();
        let err = key
            .public_key()
            .verify(SignedKind::Grant, &envelope)
            .unwrap_err();
        assert!(matches!(err, SignatureError::Malformed), "{err}");
    }

    #[test]
    fn a_grant_signature_is_not_a_bundle_signature() {
        let key = PolicySigningKey::generate();
        let mut envelope = key.sign(SignedKind::Grant, &Grant::example()).unwrap();
        let err = key
            .public_key()
            .verify(SignedKind::PolicyBundle, &envelope)
            .unwrap_err();
        assert!(matches!(err, SignatureError::WrongKind { .. }), "{err}");
        envelope.kind = SignedKind::PolicyBundle;
        let err = key
            .public_key()
            .verify(SignedKind::PolicyBundle, &envelope)
            .unwrap_err();
        assert!(matches!(err, SignatureError::Invalid), "{err}");
    }

    #[test]
    fn keys_round_trip_through_their_text_forms() {
        let key = PolicySigningKey::generate();
        let pem = key.to_pkcs8_pem().unwrap();
        let back = PolicySigningKey::from_pkcs8_pem(&pem).unwrap();
        assert_eq!(back.public_key(), key.public_key());
        let text = key.public_key().to_string();
        assert_eq!(text.parse::<PolicyPublicKey>().unwrap(), key.public_key());
        for bad in ["", "ed25519:", "ed25519:!!!", "rsa:AAAA", "ed25519:AAAA"] {
            let err = bad.parse::<PolicyPublicKey>().unwrap_err();
            assert!(!err.to_string().is_empty());
        }
        assert!(
            PolicySigningKey::from_pkcs8_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
            )
            .is_err()
        );
    }
}
