//! The signed bundle envelope and grant verification, as the agent checks
//! what the platform sends (`epm_sync::accept_bundle`, `accept_grant`), and
//! the offline approval challenge.
//!
//! The first byte picks what the rest is: 0, an envelope as it arrives (JSON,
//! checked against the pinned key: nothing of the payload may be parsed
//! before the signature holds); 1, a bundle payload and 2, a grant payload,
//! which the target signs with its own pinned key so the checks after the
//! signature (format, device, rollback, the policy) are reached; 3, an
//! offline challenge's text form; 4, a pinned key list.
#![no_main]

use std::sync::OnceLock;

use epm_api::SignedEnvelope;
use epm_api::offline::OfflineChallenge;
use epm_api::sign::{PolicyKeys, PolicyPublicKey, PolicySigningKey, SignedKind};
use epm_sync::{CurrentBundle, accept_bundle, accept_grant};
use libfuzzer_sys::fuzz_target;

const DEVICE: &str = "device-1";
const REQUEST: &str = "req-1";

fn signer() -> &'static (PolicySigningKey, PolicyKeys) {
    static KEY: OnceLock<(PolicySigningKey, PolicyKeys)> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = PolicySigningKey::generate();
        let pinned = PolicyKeys::from(key.public_key());
        (key, pinned)
    })
}

fn check_envelope(pinned: &PolicyKeys, envelope: &SignedEnvelope) {
    for current in [
        None,
        Some(CurrentBundle {
            version: 5,
            payload_sha256: [0; 32],
        }),
    ] {
        match accept_bundle(pinned, DEVICE, current, envelope) {
            Ok(accepted) => {
                assert_eq!(accepted.engine.version(), accepted.version);
                if let Some(current) = current {
                    assert!(accepted.version > current.version);
                }
                // The same bytes again are not a rollback.
                accept_bundle(pinned, DEVICE, Some(accepted.current()), envelope)
                    .expect("the bundle in force is accepted again");
            }
            Err(error) => assert!(!error.to_string().is_empty()),
        }
    }
    match accept_grant(pinned, DEVICE, REQUEST, envelope) {
        Ok(grant) => {
            assert_eq!(grant.device_id, DEVICE);
            assert_eq!(grant.request_id, REQUEST);
            assert!(grant.not_before < grant.not_after);
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (key, pinned) = signer();
    match mode % 5 {
        0 => {
            let Ok(envelope) = serde_json::from_slice::<SignedEnvelope>(rest) else {
                return;
            };
            let _ = envelope.key.parse::<PolicyPublicKey>();
            check_envelope(pinned, &envelope);
        }
        1 | 2 => {
            let Ok(payload) = std::str::from_utf8(rest) else {
                return;
            };
            let kind = if mode % 5 == 1 {
                SignedKind::PolicyBundle
            } else {
                SignedKind::Grant
            };
            let envelope = key.sign_payload(kind, payload.to_owned());
            check_envelope(pinned, &envelope);
            // The same payload under another key is refused before parsing.
            let stranger = PolicyKeys::from(PolicySigningKey::generate().public_key());
            assert!(accept_bundle(&stranger, DEVICE, None, &envelope).is_err());
            assert!(accept_grant(&stranger, DEVICE, REQUEST, &envelope).is_err());
        }
        3 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(challenge) = OfflineChallenge::decode(&text) {
                let again = OfflineChallenge::decode(&challenge.encode())
                    .expect("an encoded challenge decodes");
                assert_eq!(again, challenge);
                let code = challenge.code(b"offline-key");
                assert!(challenge.accepts(b"offline-key", &code));
                let _ = challenge.accepts(b"offline-key", &text);
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            let keys: Vec<PolicyPublicKey> =
                text.split('\n').filter_map(|k| k.parse().ok()).collect();
            for key in &keys {
                assert_eq!(key.to_string().parse::<PolicyPublicKey>().ok(), Some(*key));
            }
            let _ = PolicyKeys::new(keys);
        }
    }
});
