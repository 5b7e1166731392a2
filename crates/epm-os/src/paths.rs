//! The platform's default paths and names: the one place that says where
//! EPM keeps its state on Linux and on macOS.

/// The daemon's state directory (policy cache, grants database).
pub const STATE_DIR: &str = if cfg!(target_os = "macos") {
    "/Library/Application Support/EPM"
} else {
    "/var/lib/epm"
};

/// The daemon's control socket.
pub const SOCKET: &str = "/var/run/epm/epmd.sock";

/// The system's log location for the audit log, where there is one
/// (macOS); elsewhere the audit log lives in [`STATE_DIR`].
pub const SYSTEM_AUDIT_DIR: Option<&str> = if cfg!(target_os = "macos") {
    Some("/Library/Logs/EPM")
} else {
    None
};

/// Where the packaged daemon writes its audit log.
pub const AUDIT_LOG: &str = if cfg!(target_os = "macos") {
    "/Library/Logs/EPM/audit.jsonl"
} else {
    "/var/lib/epm/audit.jsonl"
};

/// The group whose members administer the daemon by default.
pub const ADMIN_GROUP: &str = if cfg!(target_os = "macos") {
    "admin"
} else {
    "adm"
};

/// The group an admin session adds its user to by default (the one the
/// system's sudoers grants `sudo` to).
pub const ADMIN_SESSION_GROUP: &str = if cfg!(target_os = "macos") {
    "admin"
} else {
    "sudo"
};

/// The directory the system keeps managed preferences in (macOS only).
pub const MANAGED_PREFERENCES_DIR: Option<&str> = if cfg!(target_os = "macos") {
    Some("/Library/Managed Preferences")
} else {
    None
};

/// The first uid of a regular (human) account: Linux 1000, macOS 501.
pub const FIRST_REGULAR_UID: u32 = if cfg!(target_os = "macos") { 501 } else { 1000 };
