//! Offline approval: a challenge the agent shows, a short code the admin
//! reads back.
//!
//! When the platform is unreachable, `epmctl request --offline` prints an
//! [`OfflineChallenge`] (device, user, binary, window, nonce) as one line of
//! text. An admin pastes it into `epm-platform offline-code`, which answers
//! with a 10-character code: an HMAC of the challenge under the device's
//! offline key (made at enrollment, known to that agent and the platform
//! only). The code is bound to everything in the challenge; the agent
//! accepts it once (the nonce) and limits how many wrong codes it tries.
//! Fifty bits of HMAC against a handful of tries cannot be guessed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use hmac::{Hmac, Mac};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use utoipa::ToSchema;

use crate::SubjectIdentity;

const PREFIX: &str = "EPM1-";
const DOMAIN: &[u8] = b"epm-v1/offline_code\n";
/// Crockford's base32: no I, L, O, U, so a code read over the phone is not
/// misheard.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Characters in a code, without the dash.
pub const CODE_LEN: usize = 10;

/// What an offline approval is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfflineChallenge {
    /// The device asking.
    pub device_id: String,
    /// The user asking.
    pub user: String,
    /// The binary.
    pub identity: SubjectIdentity,
    /// The rule that requires approval.
    pub rule_id: String,
    /// Window start.
    #[schema(value_type = String, format = DateTime)]
    pub not_before: Timestamp,
    /// Window end.
    #[schema(value_type = String, format = DateTime)]
    pub not_after: Timestamp,
    /// Random, so two challenges for the same window differ and a code is
    /// used once.
    pub nonce: u64,
}

/// Why a challenge could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not an EPM offline challenge: {0}")]
pub struct ChallengeError(String);

impl OfflineChallenge {
    /// The one-line text form: `EPM1-` and base64url of the JSON.
    pub fn encode(&self) -> String {
        // Serializing a struct of strings and numbers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{PREFIX}{}", BASE64URL.encode(json))
    }

    /// Reads the text form; whitespace around it is ignored.
    pub fn decode(text: &str) -> Result<OfflineChallenge, ChallengeError> {
        let text = text.trim();
        let body = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| ChallengeError(format!("it must start with {PREFIX}")))?;
        if body.len() > 4096 {
            return Err(ChallengeError("it is too long".into()));
        }
        let json = BASE64URL
            .decode(body)
            .map_err(|e| ChallengeError(format!("it was cut or altered ({e})")))?;
        let challenge: OfflineChallenge = serde_json::from_slice(&json)
            .map_err(|e| ChallengeError(format!("it was cut or altered ({e})")))?;
        if challenge.not_after <= challenge.not_before {
            return Err(ChallengeError("its window ends before it starts".into()));
        }
        Ok(challenge)
    }

    /// The code that answers this challenge under `offline_key`, written
    /// `XXXXX-XXXXX`.
    pub fn code(&self, offline_key: &[u8]) -> String {
        let digits = self.code_digits(offline_key);
        format!("{}-{}", &digits[..CODE_LEN / 2], &digits[CODE_LEN / 2..])
    }

    /// Whether `code` answers this challenge. Case, dashes and spaces do not
    /// matter, and O/I/L are read as 0/1/1. Compares in constant time.
    pub fn accepts(&self, offline_key: &[u8], code: &str) -> bool {
        let typed: Vec<u8> = code
            .bytes()
            .filter(|b| !matches!(b, b'-' | b' '))
            .map(|b| match b.to_ascii_uppercase() {
                b'O' => b'0',
                b'I' | b'L' => b'1',
                other => other,
            })
            .collect();
        let expected = self.code_digits(offline_key);
        if typed.len() != expected.len() {
            return false;
        }
        typed
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    fn code_digits(&self, offline_key: &[u8]) -> String {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(offline_key) else {
            return String::new();
        };
        mac.update(DOMAIN);
        mac.update(self.encode().as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut bits = u64::from_be_bytes([
            tag[0], tag[1], tag[2], tag[3], tag[4], tag[5], tag[6], tag[7],
        ]);
        let mut digits = [0u8; CODE_LEN];
        for digit in digits.iter_mut().rev() {
            *digit = ALPHABET[(bits & 31) as usize];
            bits >>= 5;
        }
        String::from_utf8_lossy(&digits).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge() -> OfflineChallenge {
        OfflineChallenge {
            device_id: "mac-0042".into(),
            user: "alice".into(),
            identity: SubjectIdentity {
                kind: "sha256".into(),
                value: "ab".repeat(32),
            },
            rule_id: "wireshark".into(),
            not_before: Timestamp::from_second(1_800_000_000).unwrap(),
            not_after: Timestamp::from_second(1_800_003_600).unwrap(),
            nonce: 7,
        }
    }

    #[test]
    fn a_code_answers_its_challenge_only() {
        let key = [9u8; 32];
        let c = challenge();
        let text = c.encode();
        assert_eq!(OfflineChallenge::decode(&format!("  {text}\n")).unwrap(), c);
        let code = c.code(&key);
        assert_eq!(code.len(), CODE_LEN + 1);
        assert!(c.accepts(&key, &code));
        assert!(c.accepts(&key, &code.to_lowercase().replace('-', " ")));
        assert!(!c.accepts(&[8u8; 32], &code), "another device's key");
        for change in [
            |c: &mut OfflineChallenge| c.nonce += 1,
            |c: &mut OfflineChallenge| c.user = "bob".into(),
            |c: &mut OfflineChallenge| c.device_id = "mac-0043".into(),
            |c: &mut OfflineChallenge| c.not_after += jiff::SignedDuration::from_secs(1),
            |c: &mut OfflineChallenge| c.identity.value = "cd".repeat(32),
        ] {
            let mut other = c.clone();
            change(&mut other);
            assert!(!other.accepts(&key, &code));
        }
        assert!(!c.accepts(&key, ""));
        assert!(!c.accepts(&key, &format!("{code}0")));
    }

    #[test]
    fn damaged_challenges_are_named() {
        let text = challenge().encode();
        for bad in [
            String::new(),
            "EPM2-abc".into(),
            text[..text.len() - 5].to_string(),
            format!("{text}!"),
            format!("EPM1-{}", "A".repeat(5000)),
        ] {
            let err = OfflineChallenge::decode(&bad).unwrap_err();
            assert!(
                err.to_string().starts_with("not an EPM offline challenge"),
                "{err}"
            );
        }
    }
}
