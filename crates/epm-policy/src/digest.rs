//! Fixed-size content digests, parsed from and printed as lowercase hex.
//!
//! Digests are kept as bytes, not strings, so that comparing them is exact
//! and case-insensitive by construction ("ABCD…" and "abcd…" parse to the
//! same value) and index lookups hash 32 bytes, not a 64-character string.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a hex digest did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} hex digits ({what}), got {got}")]
pub struct DigestError {
    what: &'static str,
    expected: usize,
    got: String,
}

macro_rules! hex_digest {
    ($(#[$doc:meta])* $name:ident, $len:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// The digest as raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = DigestError;

            fn from_str(text: &str) -> Result<Self, DigestError> {
                let mut bytes = [0u8; $len];
                match hex::decode_to_slice(text, &mut bytes) {
                    Ok(()) => Ok(Self(bytes)),
                    Err(_) => Err(DigestError {
                        what: $what,
                        expected: $len * 2,
                        got: describe_bad_hex(text),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; $len * 2];
                // Cannot fail: the buffer is exactly twice the input length.
                if hex::encode_to_slice(self.0, &mut buf).is_err() {
                    return Err(fmt::Error);
                }
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

hex_digest!(
    /// A SHA-256 digest of an executable's bytes.
    Sha256Digest, 32, "a SHA-256"
);
hex_digest!(
    /// An Apple code directory hash (CDHash): the first 20 bytes of the
    /// code directory's hash, as `codesign -dvvv` prints it.
    CdHash, 20, "a CDHash"
);

fn describe_bad_hex(text: &str) -> String {
    if let Some(bad) = text.chars().find(|c| !c.is_ascii_hexdigit()) {
        format!(
            "{} characters including the non-hex {bad:?}",
            text.chars().count()
        )
    } else {
        format!("{} characters", text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_parses_case_insensitively_and_prints_lowercase() {
        let upper: Sha256Digest = "AB".repeat(32).parse().unwrap();
        let lower: Sha256Digest = "ab".repeat(32).parse().unwrap();
        assert_eq!(upper, lower);
        assert_eq!(upper.to_string(), "ab".repeat(32));
    }

    #[test]
    fn bad_hex_names_the_problem() {
        let err = "abc".parse::<Sha256Digest>().unwrap_err().to_string();
        assert_eq!(err, "expected 64 hex digits (a SHA-256), got 3 characters");
        let err = "zz".repeat(10).parse::<CdHash>().unwrap_err().to_string();
        assert!(err.contains("40 hex digits (a CDHash)"), "{err}");
        assert!(err.contains("'z'"), "{err}");
    }
}
