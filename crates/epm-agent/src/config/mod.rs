//! `epmd` configuration: a TOML file, documented in docs/configuration.md.
//!
//! Every key has a default, so an empty file is a valid configuration; an
//! unknown key or a bad value is an error that names the key, because a
//! misspelt `mode = "enforce"` silently ignored would leave a fleet in
//! monitor mode.

pub mod managed_prefs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use epm_api::sign::{PolicyKeys, PolicyPublicKey};
use serde::{Deserialize, Deserializer};

/// What the daemon does with a decision other than allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Deny what the policy denies.
    Enforce,
    /// Allow everything; audit what enforce mode would have denied.
    Monitor,
}

impl Mode {
    /// The name used in the config, status and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Monitor => "monitor",
        }
    }
}

/// How to answer an exec the daemon could not decide (internal error, full
/// queue, a worker panic, shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Allow: availability first (the default; a broken agent must not brick a Mac).
    Open,
    /// Deny: security first.
    Closed,
}

impl FailMode {
    /// The name used in the config, status and audit.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the SQLite store and the audit log.
    pub state_dir: PathBuf,
    /// The local control socket for `epmctl` and helpers.
    pub socket: PathBuf,
    /// `enforce` or `monitor`.
    pub mode: Mode,
    /// `open` or `closed`.
    pub fail_mode: FailMode,
    /// A local policy document (standalone operation), reloaded on SIGHUP.
    pub policy_file: Option<PathBuf>,
    /// This device's id in policies and audit records (default: host name).
    pub device_id: Option<String>,
    /// Members of this group may read all audit records and the policy.
    pub admin_group: String,
    /// Exec gate settings.
    pub gate: GateConfig,
    /// Audit log settings.
    pub audit: AuditConfig,
    /// The management platform; without it the daemon runs standalone.
    pub platform: Option<PlatformConfig>,
    /// Time-boxed admin sessions.
    pub admin_sessions: AdminSessionsConfig,
    /// The XPC service the helper and `epmctl` use on macOS.
    pub xpc: XpcConfig,
    /// The kernel exec hook (Linux): what fanotify cannot see.
    pub kernel_hook: KernelHookConfig,
}

/// `[kernel_hook]`: the BPF LSM hook that holds execs fanotify cannot see
/// (memfds, private mount namespaces, FUSE, `ld.so PROGRAM`) until epmd
/// decides them. Linux only; ignored elsewhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelHookConfig {
    /// Load the hook where the kernel allows it (default). Off, or where it
    /// cannot load, epmd gates with fanotify alone and reports each exposure.
    pub enabled: bool,
    /// Hold only execs of processes in this cgroup (v2) subtree: a knob for
    /// tests and staged roll-outs. Default: every process on the machine.
    pub cgroup: Option<PathBuf>,
    /// At most this many execs held at once per user; more fail with EAGAIN.
    pub max_held_per_uid: u32,
}

impl Default for KernelHookConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup: None,
            max_held_per_uid: 64,
        }
    }
}

/// `[xpc]`: the control service on macOS (ignored elsewhere). The helper
/// and `epmctl` reach the daemon here; the socket stays for the sudo
/// plugin, scripts and `--socket`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XpcConfig {
    /// The Mach service name; the daemon's launchd plist must publish it
    /// under `MachServices`.
    pub service: String,
    /// A code-signing requirement every peer must satisfy (macOS 12+), e.g.
    /// `anchor apple generic and certificate leaf[subject.OU] = "TEAMID"`:
    /// then only programs signed by that team can talk to the daemon over
    /// XPC. Unset: any local process, authorized by its uid as on the
    /// socket.
    pub peer_requirement: Option<String>,
}

impl Default for XpcConfig {
    fn default() -> Self {
        Self {
            service: epm_ipc::xpc_frame::MACH_SERVICE_NAME.to_owned(),
            peer_requirement: None,
        }
    }
}

/// `[admin_sessions]`: how time-boxed admin sessions are carried out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSessionsConfig {
    /// The group that makes a user an administrator, unless the policy's
    /// entry names one: `admin` on macOS, `sudo` elsewhere (Debian's).
    pub group: String,
    /// What to do with a sudoers entry for the user that appears during a
    /// session: `remove` it (the default) or only `report` it.
    pub sudoers_changes: SudoersChanges,
    /// The sudoers files and directories compared with their state at the
    /// start of each session.
    pub sudoers_paths: Vec<PathBuf>,
    /// What to do with a setuid or setgid file made during a session under
    /// [`AdminSessionsConfig::setuid_scan_paths`]: `remove` its setuid and
    /// setgid bits (the default) or only `report` it.
    pub setuid_changes: SudoersChanges,
    /// Where a session's end looks for new setuid and setgid files (each
    /// tree on its own file system only).
    pub setuid_scan_paths: Vec<PathBuf>,
    /// The most entries one end-of-session scan visits, all paths together.
    pub setuid_scan_limit: u64,
    /// What to do with the user's processes that still carry the admin
    /// group when the session ends (`newgrp`, `sg`): `end` them (the
    /// default) or only `report` them.
    pub session_processes: SessionProcesses,
}

/// `admin_sessions.session_processes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionProcesses {
    /// SIGKILL them, and audit each.
    End,
    /// Only audit each.
    Report,
}

impl SessionProcesses {
    /// The name used in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionProcesses::End => "ended",
            SessionProcesses::Report => "reported",
        }
    }
}

/// `admin_sessions.sudoers_changes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SudoersChanges {
    /// Take the entry out again, and audit it.
    Remove,
    /// Only audit it.
    Report,
}

impl SudoersChanges {
    /// The name used in the configuration and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            SudoersChanges::Remove => "removed",
            SudoersChanges::Report => "reported",
        }
    }
}

impl Default for AdminSessionsConfig {
    fn default() -> Self {
        Self {
            group: epm_os::paths::ADMIN_SESSION_GROUP.to_owned(),
            sudoers_changes: SudoersChanges::Remove,
            sudoers_paths: vec![
                PathBuf::from("/etc/sudoers"),
                PathBuf::from("/etc/sudoers.d"),
            ],
            setuid_changes: SudoersChanges::Remove,
            setuid_scan_paths: [
                "/home",
                "/Users",
                "/root",
                "/tmp",
                "/var/tmp",
                "/dev/shm",
                "/usr/local",
                "/opt",
                "/srv",
            ]
            .into_iter()
            .map(PathBuf::from)
            .collect(),
            setuid_scan_limit: 200_000,
            session_processes: SessionProcesses::End,
        }
    }
}

/// `[platform]`: where the agent checks in, and what it trusts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    /// `https://host[:port]`.
    #[serde(deserialize_with = "https_url")]
    pub url: String,
    /// The platform's CA certificate (PEM): the only one trusted.
    pub ca_cert: PathBuf,
    /// The key bundles and grants must be signed with (`ed25519:<base64>`),
    /// or a list of up to four while the platform's key is rotated.
    #[serde(deserialize_with = "public_keys")]
    pub policy_public_key: PolicyKeys,
    /// One-time token for the first enrollment; unused once enrolled.
    #[serde(default, deserialize_with = "token")]
    pub enrollment_token: Option<String>,
    /// Time between check-ins (60 s to 30 min), jittered by ±10 %.
    #[serde(default = "default_sync_interval", deserialize_with = "sync_interval")]
    pub sync_interval: Duration,
}

pub(crate) fn default_sync_interval() -> Duration {
    epm_sync::schedule::DEFAULT_INTERVAL
}

fn https_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    check_https_url(String::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn public_keys<'de, D: Deserializer<'de>>(d: D) -> Result<PolicyKeys, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    let texts = match OneOrMore::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a key `ed25519:<base64>` or a list of them")
    })? {
        OneOrMore::One(text) => vec![text],
        OneOrMore::More(texts) => texts,
    };
    parse_keys(texts.iter().map(String::as_str)).map_err(serde::de::Error::custom)
}

/// `policy_public_key`'s keys: one, or several while the platform's
/// signing key is rotated.
pub(crate) fn parse_keys<'a>(
    texts: impl IntoIterator<Item = &'a str>,
) -> Result<PolicyKeys, String> {
    let keys = texts
        .into_iter()
        .map(|text| text.parse::<PolicyPublicKey>().map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    PolicyKeys::new(keys).map_err(|e| e.to_string())
}

fn token<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    check_token(&String::deserialize(d)?)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// `"5m"`, `"90s"`, `"1h"` or a number of seconds, within 60 s..=30 min.
fn sync_interval<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    let duration = match Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a duration like \"5m\" or \"90s\", or seconds")
    })? {
        Raw::Seconds(secs) => Duration::from_secs(secs),
        Raw::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom)?,
    };
    check_sync_interval(duration).map_err(serde::de::Error::custom)
}

// The checks behind the TOML keys, shared with the managed preferences
// (`crate::config::managed_prefs`) so a value means the same from either source.

/// An `https://` URL naming a host.
pub(crate) fn check_https_url(url: String) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "{url:?} must be an https:// URL: the agent talks to the platform over TLS only"
        ));
    };
    if rest.trim_matches('/').is_empty() || rest.contains(char::is_whitespace) {
        return Err(format!("{url:?} names no host"));
    }
    Ok(url)
}

/// A non-empty enrollment token, trimmed.
pub(crate) fn check_token(token: &str) -> Result<String, String> {
    if token.trim().is_empty() {
        return Err("must not be empty (omit it once the agent is enrolled)".into());
    }
    Ok(token.trim().to_owned())
}

/// A check-in interval within 60 s..=30 min.
pub(crate) fn check_sync_interval(duration: Duration) -> Result<Duration, String> {
    let (min, max) = (
        epm_sync::schedule::MIN_INTERVAL,
        epm_sync::schedule::MAX_INTERVAL,
    );
    if duration < min || duration > max {
        return Err(format!("{}s is outside 60s..=30m", duration.as_secs()));
    }
    Ok(duration)
}

pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration like \"5m\", \"90s\" or \"1h\"");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(number.saturating_mul(scale)))
}

/// Exec gate settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Only mounts at or below these paths are gated (default: everything).
    pub watch_paths: Vec<PathBuf>,
    /// Decision worker threads.
    pub workers: usize,
    /// Execs waiting for a worker; beyond this they are answered per
    /// `fail_mode` at once rather than queued without bound.
    pub queue_capacity: usize,
    /// Entries in the decision cache.
    pub cache_entries: usize,
}

/// Audit log settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Audit log directory (default: `state_dir`).
    pub dir: Option<PathBuf>,
    /// Rotate `audit.jsonl` when it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept.
    pub keep_files: usize,
    /// Disk budget of the store's audit outbox; past it the oldest records
    /// are dropped and an `audit_dropped` record says how many.
    pub outbox_max_bytes: u64,
    /// What one user may add to the audit per second; past it (and the
    /// burst), their records are counted in `audit_rate_limited` records.
    pub user_rate_bytes: u64,
    /// What one user may add at once before `user_rate_bytes` applies.
    pub user_burst_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(epm_os::paths::STATE_DIR),
            socket: PathBuf::from(epm_os::paths::SOCKET),
            mode: Mode::Enforce,
            fail_mode: FailMode::Open,
            policy_file: None,
            device_id: None,
            admin_group: epm_os::paths::ADMIN_GROUP.to_owned(),
            gate: GateConfig::default(),
            audit: AuditConfig::default(),
            platform: None,
            admin_sessions: AdminSessionsConfig::default(),
            xpc: XpcConfig::default(),
            kernel_hook: KernelHookConfig::default(),
        }
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            watch_paths: vec![PathBuf::from("/")],
            workers: 2,
            queue_capacity: 4096,
            cache_entries: 16_384,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            dir: None,
            max_file_bytes: 16 * 1024 * 1024,
            keep_files: 10,
            outbox_max_bytes: 256 * 1024 * 1024,
            user_rate_bytes: AuditLimits::default().user_rate_bytes,
            user_burst_bytes: AuditLimits::default().user_burst_bytes,
        }
    }
}

/// The audit's budgets (`[audit]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditLimits {
    /// Disk budget of the store's outbox.
    pub outbox_max_bytes: u64,
    /// What one user may add to the audit per second, sustained.
    pub user_rate_bytes: u64,
    /// What one user may add at once before `user_rate_bytes` applies.
    pub user_burst_bytes: u64,
}

impl Default for AuditLimits {
    fn default() -> Self {
        Self {
            outbox_max_bytes: 256 * 1024 * 1024,
            user_rate_bytes: 512 * 1024,
            user_burst_bytes: 16 * 1024 * 1024,
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad key or value.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The managed preferences (MDM) are unreadable, have a bad value, or
    /// do not make a whole `[platform]` with the file.
    #[error(transparent)]
    Managed(#[from] crate::config::managed_prefs::PrefsError),
}

/// A configuration and where its values came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The configuration in force.
    pub config: Config,
    /// The managed preferences file, when one was applied.
    pub managed: Option<PathBuf>,
    /// The keys (`platform.url`, …) the managed preferences set, over the file.
    pub overrides: Vec<&'static str>,
    /// Managed preference keys that were ignored.
    pub warnings: Vec<String>,
}

/// toml's error, on one line, led by the line number and the dotted key
/// at fault (toml's own message does not always name the key).
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return message.to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match line.split_once('=') {
        Some((key, _)) if !message.contains(key.trim()) => {
            let key = key.trim();
            let key = match section {
                Some(section) => format!("{section}.{key}"),
                None => key.to_owned(),
            };
            format!("line {line_no}: {key}: {message}")
        }
        // A table's own error (a missing key) points at its header.
        _ if line.trim().starts_with('[') => {
            let table = line.trim().trim_matches(|c| c == '[' || c == ']').trim();
            format!("line {line_no}: {table}: {message}")
        }
        _ => format!("line {line_no}: {message}"),
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths in it are resolved
    /// against the file's directory, so an example config works from any
    /// working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // Resolve against the file's absolute directory, so that paths in the
        // config (and in audit records) do not depend on the working directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let base = absolute.parent().unwrap_or(Path::new("/"));
        Self::parse(&text, base).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// What `epmd` runs with: the file, then this platform's managed
    /// preferences over it (on macOS, `/Library/Managed Preferences/`;
    /// elsewhere there are none).
    pub fn load_system(path: &Path) -> Result<LoadedConfig, ConfigError> {
        let config = Self::load(path)?;
        match crate::config::managed_prefs::system_path() {
            Some(prefs) => Self::with_managed_prefs(config, &prefs),
            None => Ok(LoadedConfig {
                config,
                managed: None,
                overrides: Vec::new(),
                warnings: Vec::new(),
            }),
        }
    }

    /// Lays the managed preferences at `prefs_path`, if that file exists,
    /// over `config`, and writes a CA they carry as PEM text to the state
    /// directory (see [`crate::config::managed_prefs`]).
    pub fn with_managed_prefs(
        mut config: Config,
        prefs_path: &Path,
    ) -> Result<LoadedConfig, ConfigError> {
        let fail = |message: String| crate::config::managed_prefs::PrefsError {
            origin: prefs_path.display().to_string(),
            message,
        };
        let Some(prefs) = crate::config::managed_prefs::ManagedPrefs::load(prefs_path)? else {
            return Ok(LoadedConfig {
                config,
                managed: None,
                overrides: Vec::new(),
                warnings: Vec::new(),
            });
        };
        let overrides = prefs.apply_to(&mut config).map_err(fail)?;
        prefs.install_ca(&config).map_err(|e| {
            let path = config
                .platform
                .as_ref()
                .map(|p| p.ca_cert.display().to_string());
            fail(format!(
                "ca_cert_pem: cannot write it to {}: {e}",
                path.unwrap_or_default()
            ))
        })?;
        Ok(LoadedConfig {
            config,
            managed: Some(prefs_path.to_owned()),
            overrides,
            warnings: prefs.warnings,
        })
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| describe_toml_error(text, &e))?;
        config.resolve_paths(base);
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.state_dir);
        resolve(&mut self.socket);
        if let Some(p) = &mut self.policy_file {
            resolve(p);
        }
        if let Some(p) = &mut self.audit.dir {
            resolve(p);
        }
        for p in &mut self.gate.watch_paths {
            resolve(p);
        }
        if let Some(platform) = &mut self.platform {
            resolve(&mut platform.ca_cert);
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.gate.workers == 0 || self.gate.workers > 64 {
            return Err(format!(
                "gate.workers: {} is outside 1..=64",
                self.gate.workers
            ));
        }
        if self.gate.queue_capacity == 0 {
            return Err("gate.queue_capacity: must be at least 1".into());
        }
        if let Some(cgroup) = &self.kernel_hook.cgroup
            && !cgroup.is_absolute()
        {
            return Err(format!(
                "kernel_hook.cgroup: {} is not an absolute path (a cgroup v2 directory)",
                cgroup.display()
            ));
        }
        if self.gate.watch_paths.is_empty() {
            return Err(
                "gate.watch_paths: must name at least one path (\"/\" for everything)".into(),
            );
        }
        if self.audit.max_file_bytes < 4096 {
            return Err(format!(
                "audit.max_file_bytes: {} is below the minimum of 4096",
                self.audit.max_file_bytes
            ));
        }
        if self.audit.outbox_max_bytes < 64 * 1024 {
            return Err(format!(
                "audit.outbox_max_bytes: {} is below the minimum of 65536",
                self.audit.outbox_max_bytes
            ));
        }
        if self.audit.user_rate_bytes < 1024 {
            return Err(format!(
                "audit.user_rate_bytes: {} is below the minimum of 1024",
                self.audit.user_rate_bytes
            ));
        }
        if self.audit.user_burst_bytes < 64 * 1024 {
            return Err(format!(
                "audit.user_burst_bytes: {} is below the minimum of 65536",
                self.audit.user_burst_bytes
            ));
        }
        if self
            .device_id
            .as_deref()
            .is_some_and(|d| d.trim().is_empty())
        {
            return Err("device_id: must not be empty (omit it to use the host name)".into());
        }
        if self.admin_group.trim().is_empty() {
            return Err("admin_group: must not be empty".into());
        }
        if !is_service_name(&self.xpc.service) {
            return Err(format!(
                "xpc.service: {:?} is not a Mach service name (reverse DNS, such as com.epm.epmd.xpc)",
                self.xpc.service
            ));
        }
        if let Some(requirement) = &self.xpc.peer_requirement {
            check_peer_requirement(requirement)?;
        }
        if self.platform.is_some() && self.policy_file.is_some() {
            return Err(
                "policy_file and [platform] are exclusive: a managed agent enforces the platform's signed policy; remove one"
                    .into(),
            );
        }
        Ok(())
    }

    /// The audit log directory: `[audit] dir`, else on macOS the system's
    /// log location (where `epmctl audit verify` looks), else `state_dir`.
    pub fn audit_dir(&self) -> PathBuf {
        match &self.audit.dir {
            Some(dir) => dir.clone(),
            None => epm_os::paths::SYSTEM_AUDIT_DIR
                .map_or_else(|| self.state_dir.clone(), PathBuf::from),
        }
    }

    /// The SQLite store's path.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("epm.sqlite")
    }
}

/// `xpc.peer_requirement`: XPC would refuse every peer, silently, for a
/// requirement that does not parse, so it is checked here, naming the key
/// (on macOS by the Security framework itself).
fn check_peer_requirement(requirement: &str) -> Result<(), String> {
    if requirement.trim().is_empty() || requirement.contains('\0') {
        return Err(
            "xpc.peer_requirement: must be a code-signing requirement (omit it to accept any local process)"
                .into(),
        );
    }
    #[cfg(target_os = "macos")]
    if let Err(error) =
        requirement.parse::<security_framework::os::macos::code_signing::SecRequirement>()
    {
        return Err(format!(
            "xpc.peer_requirement: not a code-signing requirement macOS accepts ({error}): {requirement:?}"
        ));
    }
    Ok(())
}

/// A launchd Mach service name: dot-separated labels of letters, digits,
/// `-` and `_`.
fn is_service_name(name: &str) -> bool {
    name.len() <= 128
        && name.split('.').count() >= 2
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_xpc_section_is_checked() {
        let config = Config::parse("", Path::new("/")).unwrap();
        assert_eq!(config.xpc.service, epm_ipc::xpc_frame::MACH_SERVICE_NAME);
        assert_eq!(config.xpc.peer_requirement, None);
        let config = Config::parse(
            "[xpc]\nservice = \"com.example.epmd\"\npeer_requirement = 'anchor apple generic and certificate leaf[subject.OU] = \"ABCDE12345\"'\n",
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(config.xpc.service, "com.example.epmd");
        assert!(config.xpc.peer_requirement.unwrap().contains("ABCDE12345"));
        for (text, named) in [
            ("[xpc]\nservice = \"epmd\"\n", "xpc.service"),
            ("[xpc]\nservice = \"com.epm/epmd\"\n", "xpc.service"),
            ("[xpc]\npeer_requirement = \" \"\n", "xpc.peer_requirement"),
            ("[xpc]\nrequirement = \"x\"\n", "requirement"),
        ] {
            let error = Config::parse(text, Path::new("/")).unwrap_err();
            assert!(error.contains(named), "{text:?}: {error}");
        }
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let config = Config::parse("", Path::new("/etc/epm")).unwrap();
        assert_eq!(config.mode, Mode::Enforce);
        assert_eq!(config.fail_mode, FailMode::Open);
        assert_eq!(config.gate.watch_paths, [PathBuf::from("/")]);
        assert!(config.policy_file.is_none());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let config = Config::parse(
            "policy_file = \"policy.json\"\nstate_dir = \"/abs/state\"",
            Path::new("/etc/epm"),
        )
        .unwrap();
        assert_eq!(
            config.policy_file,
            Some(PathBuf::from("/etc/epm/policy.json"))
        );
        assert_eq!(config.state_dir, PathBuf::from("/abs/state"));
        assert_eq!(config.store_path(), PathBuf::from("/abs/state/epm.sqlite"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        for (text, expected) in [
            ("mdoe = \"monitor\"", "unknown field `mdoe`"),
            ("mode = \"strict\"", "unknown variant `strict`"),
            ("fail_mode = 1", "line 1: fail_mode: "),
            ("[gate]\nworkers = \"two\"", "line 2: gate.workers: "),
            ("[gate]\nworkers = 0", "gate.workers: 0 is outside 1..=64"),
            ("[gate]\nbogus = 0", "unknown field `bogus`"),
            ("[audit]\nmax_file_bytes = 10", "audit.max_file_bytes"),
            ("[audit]\nuser_rate_bytes = 10", "audit.user_rate_bytes"),
            ("[audit]\nuser_burst_bytes = 1024", "audit.user_burst_bytes"),
            ("device_id = \"\"", "device_id: must not be empty"),
            ("mode = ", "line 1"),
        ] {
            let err = Config::parse(text, Path::new("/")).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn platform(extra: &str) -> String {
        format!(
            "[platform]\nurl = \"https://epm.example.com\"\nca_cert = \"ca.pem\"\npolicy_public_key = \"{KEY}\"\n{extra}"
        )
    }

    #[test]
    fn a_platform_table_is_read_and_resolved() {
        let config = Config::parse(&platform(""), Path::new("/etc/epm")).unwrap();
        let p = config.platform.unwrap();
        assert_eq!(p.url, "https://epm.example.com");
        assert_eq!(p.ca_cert, PathBuf::from("/etc/epm/ca.pem"));
        assert_eq!(p.policy_public_key.to_string(), KEY);
        assert_eq!(p.enrollment_token, None);
        assert_eq!(p.sync_interval, Duration::from_secs(300));
        for (text, secs) in [
            ("\"90s\"", 90),
            ("\"30m\"", 1800),
            ("600", 600),
            ("\"1m\"", 60),
        ] {
            let config = Config::parse(
                &platform(&format!(
                    "sync_interval = {text}\nenrollment_token = \"tok\""
                )),
                Path::new("/"),
            )
            .unwrap();
            let p = config.platform.unwrap();
            assert_eq!(p.sync_interval, Duration::from_secs(secs), "{text}");
            assert_eq!(p.enrollment_token.as_deref(), Some("tok"));
        }
    }

    #[test]
    fn a_rotation_pins_two_keys() {
        const NEXT: &str = "ed25519:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
        let text = platform("").replace(&format!("\"{KEY}\""), &format!("[\"{KEY}\", \"{NEXT}\"]"));
        let config = Config::parse(&text, Path::new("/")).unwrap();
        let keys = config.platform.unwrap().policy_public_key;
        assert_eq!(keys.to_string(), format!("{KEY}, {NEXT}"));
        for (list, expected) in [
            ("[]".to_owned(), "at least one policy public key"),
            (format!("[\"{KEY}\", \"ed25519:AAAA\"]"), "32 bytes"),
            ("7".to_owned(), "a key `ed25519:<base64>` or a list of them"),
        ] {
            let text = platform("").replace(&format!("\"{KEY}\""), &list);
            let err = Config::parse(&text, Path::new("/")).unwrap_err();
            assert!(err.contains(expected), "{list}: {err}");
            assert!(err.contains("platform.policy_public_key"), "{list}: {err}");
        }
    }

    #[test]
    fn platform_mistakes_name_the_line_and_key() {
        for (text, expected) in [
            (
                platform("").replace("https://", "http://"),
                "line 2: platform.url: \"http://epm.example.com\" must be an https:// URL",
            ),
            (
                platform("").replace(KEY, "ed25519:AAAA"),
                "line 4: platform.policy_public_key: an Ed25519 public key is 32 bytes",
            ),
            (
                platform("sync_interval = \"10s\""),
                "line 5: platform.sync_interval: 10s is outside 60s..=30m",
            ),
            (
                platform("sync_interval = \"2h\""),
                "platform.sync_interval: 7200s is outside 60s..=30m",
            ),
            (
                platform("sync_interval = \"soon\""),
                "platform.sync_interval: \"soon\" is not a duration",
            ),
            (
                platform("enrollment_token = \" \""),
                "platform.enrollment_token: must not be empty",
            ),
            (platform("colour = 1"), "unknown field `colour`"),
            (
                "[platform]\nurl = \"https://x\"\nca_cert = \"ca.pem\"".into(),
                "platform: missing field `policy_public_key`",
            ),
            (
                format!("policy_file = \"p.json\"\n{}", platform("")),
                "policy_file and [platform] are exclusive",
            ),
        ] {
            let err = Config::parse(&text, Path::new("/")).unwrap_err();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    /// The file the macOS package installs as epmd.toml on first install.
    #[test]
    fn the_packaged_default_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pkg/epmd.toml.default");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.fail_mode, FailMode::Open);
        assert!(
            config.platform.is_none(),
            "MDM's managed preferences add it"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/epmd.toml");
        let config = Config::load(&path).unwrap();
        let policy = config.policy_file.unwrap();
        assert!(policy.ends_with("policy.json"));
        assert!(policy.is_absolute(), "{}", policy.display());
    }
}
