//! Signing in to the console: argon2id passwords, TOTP codes (RFC 6238),
//! the counting of failed sign-ins per account and per address, and the
//! CSRF token bound to a session.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use epm_api::validate::MAX_PASSWORD_BYTES;

/// Checks a new password's length (as the API does).
pub fn check_new_password(password: &str) -> Result<(), String> {
    use epm_api::validate::Validate as _;
    epm_api::admin::SetPassword {
        password: password.to_owned(),
    }
    .validate()
    .map_err(|e| e.to_string())
}

/// The argon2id hash of `password` in PHC form, with a random salt and
/// the crate's default cost (19 MiB, 2 passes): blocking work, for the
/// blocking pool.
pub fn hash_password(password: &str) -> Result<String, String> {
    check_new_password(password)?;
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// A hash nobody's password matches, checked when an account has none (or
/// does not exist), so a failed sign-in costs the same either way.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password(&crate::db::new_token("decoy_")).unwrap_or_else(|_| String::new())
    })
}

/// Whether `password` matches the PHC string `phc` (blocking).
pub fn verify_password(phc: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    PasswordHash::new(phc).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok()
    })
}

/// A new TOTP secret: 20 random bytes (RFC 4226's recommendation), base32.
pub fn new_totp_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 20];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    data_encoding::BASE32_NOPAD.encode(&bytes)
}

/// The `otpauth://` URI authenticator apps import.
pub fn totp_uri(secret: &str, admin: &str) -> String {
    let label: String = admin
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!(
        "otpauth://totp/EPM:{label}?secret={secret}&issuer=EPM&algorithm=SHA1&digits=6&period=30"
    )
}

fn totp(secret: &str) -> Option<totp_rs::TOTP> {
    let bytes = data_encoding::BASE32_NOPAD
        .decode(secret.trim_end_matches('=').as_bytes())
        .ok()?;
    totp_rs::TOTP::new(totp_rs::Algorithm::SHA1, 6, 1, 30, bytes).ok()
}

/// The code an authenticator shows for `secret` at Unix time `now`.
pub fn totp_code(secret: &str, now: u64) -> Option<String> {
    totp(secret).map(|t| t.generate(now))
}

/// The 30-second step at which `code` is valid for `secret` around `now`
/// (one step of clock skew either way), or `None`.
pub fn totp_step(secret: &str, code: &str, now: u64) -> Option<u64> {
    let totp = totp(secret)?;
    let code = code.trim().replace(' ', "");
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = now / 30;
    [step.saturating_sub(1), step, step + 1]
        .into_iter()
        .find(|s| {
            let expected = totp.generate(s * 30);
            // Constant time: the comparison leaks nothing of the code.
            expected
                .bytes()
                .zip(code.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
}

type HmacSha256 = Hmac<Sha256>;

/// The CSRF token of a session: an HMAC of the session's secret cookie, so
/// it is never stored and a page of one session is useless in another.
pub fn csrf_token(session_token: &str) -> String {
    use base64::Engine as _;
    let Ok(mut mac) = HmacSha256::new_from_slice(session_token.as_bytes()) else {
        return String::new();
    };
    mac.update(b"epm-console-csrf-v1");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// Whether `presented` is the CSRF token of `session_token` (constant
/// time).
pub fn csrf_matches(session_token: &str, presented: &str) -> bool {
    use base64::Engine as _;
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(presented) else {
        return false;
    };
    let Ok(mut mac) = HmacSha256::new_from_slice(session_token.as_bytes()) else {
        return false;
    };
    mac.update(b"epm-console-csrf-v1");
    mac.verify_slice(&bytes).is_ok()
}

/// Failed sign-ins counted per key (an account, an address) in a window:
/// past `max` failures the key is locked until the window that began with
/// its first failure ends. Bounded: past `MAX_KEYS` keys the oldest go.
#[derive(Debug)]
pub struct FailureCounter {
    max: u32,
    window: Duration,
    keys: Mutex<HashMap<String, (u32, Instant)>>,
}

const MAX_KEYS: usize = 100_000;

impl FailureCounter {
    /// At most `max` failures per `window` (0: no limit).
    pub fn new(max: u32, window: Duration) -> FailureCounter {
        FailureCounter {
            max,
            window,
            keys: Mutex::new(HashMap::new()),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, Instant)>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `key` stays locked, if it is.
    pub fn locked(&self, key: &str) -> Option<Duration> {
        if self.max == 0 {
            return None;
        }
        let keys = self.keys();
        let (count, since) = keys.get(key)?;
        let left = self.window.checked_sub(since.elapsed())?;
        (*count >= self.max).then_some(left)
    }

    /// Counts one failure of `key`.
    pub fn fail(&self, key: &str) {
        if self.max == 0 {
            return;
        }
        let mut keys = self.keys();
        if keys.len() >= MAX_KEYS && !keys.contains_key(key) {
            let window = self.window;
            keys.retain(|_, (_, since)| since.elapsed() < window);
            if keys.len() >= MAX_KEYS
                && let Some(oldest) = keys
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| k.clone())
            {
                keys.remove(&oldest);
            }
        }
        let entry = keys.entry(key.to_owned()).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// Forgets `key`'s failures (a successful sign-in of that account).
    pub fn clear(&self, key: &str) {
        self.keys().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let phc = hash_password("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(verify_password(&phc, "correct horse battery"));
        assert!(!verify_password(&phc, "correct horse battery!"));
        assert!(!verify_password(decoy_hash(), "correct horse battery"));
        assert!(hash_password("short").is_err());
    }

    #[test]
    fn totp_codes_follow_rfc_6238() {
        // RFC 6238, appendix B: SHA-1, the ASCII secret "12345678901234567890".
        let secret = data_encoding::BASE32_NOPAD.encode(b"12345678901234567890");
        assert_eq!(totp_code(&secret, 59).unwrap(), "287082");
        assert_eq!(totp_code(&secret, 1_111_111_109).unwrap(), "081804");
        assert_eq!(
            totp_step(&secret, "081804", 1_111_111_109),
            Some(37_037_036)
        );
        assert_eq!(totp_step(&secret, "081805", 1_111_111_109), None);
        assert_eq!(totp_step(&secret, "08180", 1_111_111_109), None);
    }

    #[test]
    fn a_csrf_token_belongs_to_one_session() {
        let token = csrf_token("session-a");
        assert!(csrf_matches("session-a", &token));
        assert!(!csrf_matches("session-b", &token));
        assert!(!csrf_matches("session-a", "forged"));
        assert!(!csrf_matches("session-a", ""));
    }

    #[test]
    fn failures_lock_a_key_for_the_window() {
        let counter = FailureCounter::new(3, Duration::from_secs(60));
        for _ in 0..2 {
            counter.fail("alice");
        }
        assert!(counter.locked("alice").is_none());
        counter.fail("alice");
        assert!(counter.locked("alice").is_some());
        assert!(counter.locked("bob").is_none());
        counter.clear("alice");
        assert!(counter.locked("alice").is_none());
    }
}
