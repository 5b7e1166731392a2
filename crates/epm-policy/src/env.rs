//! Which environment variables a command run as another user may receive
//! from the user who asked: one definition for `epmctl` (what it sends),
//! `epmd`'s runner (what it passes on) and the sudo plugin's check (what
//! sudo would pass on).
//!
//! A variable is kept when it is on [`KEPT_ENV`] (or is an `LC_*`) and its
//! value cannot name a file or a format string ([`safe_value`]), or when
//! the deciding elevation rule lists it (`"env": [...]`); loader variables
//! ([`never_passed`]) are never passed, whatever a rule says.

/// Variables a command keeps from its caller (and every `LC_*`), when
/// their values are safe.
pub const KEPT_ENV: &[&str] = &[
    "TERM",
    "LANG",
    "LANGUAGE",
    "TZ",
    "COLORTERM",
    "NO_COLOR",
    "DISPLAY",
];

/// The longest value passed on, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Whether `name` is on the allow-list ([`KEPT_ENV`] or `LC_*`).
pub fn is_kept(name: &str) -> bool {
    KEPT_ENV.contains(&name)
        || name.strip_prefix("LC_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
}

/// Whether an allow-listed variable's value is safe to pass as it is (as
/// sudo checks them): no `/` or `%` (no file, no format string), no control
/// characters, at most 1 KiB; `TZ` may also be a zone under
/// `/usr/share/zoneinfo/`.
pub fn safe_value(name: &str, value: &str) -> bool {
    if value.len() > 1024 || value.chars().any(char::is_control) {
        return false;
    }
    if name == "TZ" {
        let zone = value.strip_prefix(':').unwrap_or(value);
        return !zone.contains("..")
            && !zone.contains('%')
            && (!zone.starts_with('/') || zone.starts_with("/usr/share/zoneinfo/"));
    }
    !value.contains('/') && !value.contains('%')
}

/// Whether a caller's variable is passed on without a rule listing it.
pub fn keeps_variable(name: &str, value: &str) -> bool {
    is_kept(name) && safe_value(name, value)
}

/// Whether a variable a rule lists may be passed with this value: any text
/// without control characters, up to [`MAX_VALUE_BYTES`].
pub fn listed_value_ok(value: &str) -> bool {
    value.len() <= MAX_VALUE_BYTES && !value.chars().any(char::is_control)
}

/// A variable name as POSIX shells write them: a letter or `_`, then
/// letters, digits and `_`.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Variables that make the dynamic loader run other code (`LD_*` on Linux,
/// `DYLD_*` on macOS): never passed to a command run as another user, and
/// refused in a rule's `env`.
pub fn never_passed(name: &str) -> bool {
    name.starts_with("LD_") || name.starts_with("DYLD_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_and_its_values() {
        assert!(keeps_variable("TERM", "xterm-256color"));
        assert!(keeps_variable("LC_ALL", "de_DE.UTF-8"));
        assert!(keeps_variable("TZ", "Europe/Berlin"));
        assert!(keeps_variable("TZ", ":/usr/share/zoneinfo/Europe/Berlin"));
        assert!(keeps_variable("TZ", "UTC"));
        assert!(!keeps_variable("TZ", "/usr/share/zoneinfo/../../home/x"));
        assert!(!keeps_variable("LD_PRELOAD", "x.so"));
        assert!(!keeps_variable("LANG", "%n%n"));
        assert!(!keeps_variable("TERM", "../../tmp/x"));
        assert!(!keeps_variable("LC_", "C"));
        assert!(!keeps_variable("LC_all", "C"));
        assert!(!keeps_variable("PATH", "/usr/bin"));
        assert!(!keeps_variable("LANG", "C\u{1b}[2J"));
        assert!(!keeps_variable("TERM", &"x".repeat(2000)));
        assert!(keeps_variable("TZ", "/usr/share/zoneinfo/Europe/Paris"));
        assert!(!keeps_variable("TZ", "/tmp/zone"));
    }

    #[test]
    fn names_and_loader_variables() {
        assert!(valid_name("JAVA_HOME"));
        assert!(valid_name("_x1"));
        assert!(!valid_name("1X"));
        assert!(!valid_name("A-B"));
        assert!(!valid_name(""));
        assert!(never_passed("LD_PRELOAD"));
        assert!(never_passed("DYLD_INSERT_LIBRARIES"));
        assert!(!never_passed("JAVA_HOME"));
        assert!(listed_value_ok("/usr/lib/jvm/java-17"));
        assert!(!listed_value_ok("a\nb"));
    }
}
