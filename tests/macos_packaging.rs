//! The macOS packaging, checked on Linux: every plist and profile parses and
//! names the same labels, bundle ids, Mach service and paths; the install
//! scripts' console-user logic gives the right answer on captured `scutil`
//! output; `pkg/build.sh --dry-run` stages the tree launchd expects.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use plist::{Dictionary, Value};

/// The identities every file must agree on.
mod ids {
    pub(super) const DAEMON_LABEL: &str = "com.epm.epmd";
    pub(super) const HELPER_LABEL: &str = "com.epm.helper";
    pub(super) const DAEMON_BUNDLE_ID: &str = "com.epm.epmd";
    pub(super) const HELPER_BUNDLE_ID: &str = "com.epm.helper";
    pub(super) const MACH_SERVICE: &str = epm_ipc::xpc_frame::MACH_SERVICE_NAME;
    pub(super) const PREFERENCES_DOMAIN: &str = epm_agent::managed_prefs::DOMAIN;
    pub(super) const PREFERENCES_KEYS: [&str; 6] = epm_agent::managed_prefs::KEYS;
    pub(super) const LOG_SUBSYSTEM: &str = epm_agent::unified_log::SUBSYSTEM;
    pub(super) const DAEMON_PROGRAM: &str =
        "/Library/Application Support/EPM/epmd.app/Contents/MacOS/epmd";
    pub(super) const HELPER_PROGRAM: &str =
        "/Library/Application Support/EPM/EPM Helper.app/Contents/MacOS/epm-helper";
    pub(super) const CONFIG: &str = "/Library/Application Support/EPM/epmd.toml";
    pub(super) const LOG_DIR: &str = "/Library/Logs/EPM";
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn dict(path: &str) -> Dictionary {
    let full = repo().join(path);
    match Value::from_file(&full) {
        Ok(Value::Dictionary(d)) => d,
        other => panic!("{path}: not a plist dictionary: {other:?}"),
    }
}

fn string<'a>(d: &'a Dictionary, key: &str) -> &'a str {
    d.get(key)
        .and_then(Value::as_string)
        .unwrap_or_else(|| panic!("missing string {key}"))
}

fn boolean(d: &Dictionary, key: &str) -> bool {
    d.get(key)
        .and_then(Value::as_boolean)
        .unwrap_or_else(|| panic!("missing boolean {key}"))
}

fn strings(d: &Dictionary, key: &str) -> Vec<String> {
    d.get(key)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("missing array {key}"))
        .iter()
        .map(|v| v.as_string().unwrap().to_owned())
        .collect()
}

#[test]
fn the_daemon_plist_starts_epmd_with_its_config_and_xpc_service() {
    let d = dict("launchd/com.epm.epmd.plist");
    assert_eq!(string(&d, "Label"), ids::DAEMON_LABEL);
    assert_eq!(string(&d, "Program"), ids::DAEMON_PROGRAM);
    assert_eq!(
        strings(&d, "ProgramArguments"),
        [ids::DAEMON_PROGRAM, "--config", ids::CONFIG]
    );
    assert!(boolean(&d, "RunAtLoad"));
    assert!(boolean(&d, "KeepAlive"), "a dead gate must come back");
    let services = d
        .get("MachServices")
        .and_then(Value::as_dictionary)
        .unwrap();
    assert_eq!(services.keys().collect::<Vec<_>>(), [ids::MACH_SERVICE]);
    assert_eq!(string(&d, "ProcessType"), "Interactive");
    for key in ["StandardOutPath", "StandardErrorPath"] {
        assert!(string(&d, key).starts_with(ids::LOG_DIR), "{key}");
    }
    assert_eq!(
        strings(&d, "AssociatedBundleIdentifiers"),
        [ids::DAEMON_BUNDLE_ID]
    );
}

#[test]
fn the_helper_plist_runs_only_in_gui_sessions() {
    let d = dict("launchd/com.epm.helper.plist");
    assert_eq!(string(&d, "Label"), ids::HELPER_LABEL);
    assert_eq!(string(&d, "Program"), ids::HELPER_PROGRAM);
    assert_eq!(string(&d, "LimitLoadToSessionType"), "Aqua");
    assert!(boolean(&d, "RunAtLoad"));
    assert_eq!(
        strings(&d, "AssociatedBundleIdentifiers"),
        [ids::HELPER_BUNDLE_ID]
    );
}

#[test]
fn bundles_and_entitlements_carry_the_right_identities() {
    let epmd = dict("pkg/bundles/epmd-Info.plist");
    assert_eq!(string(&epmd, "CFBundleIdentifier"), ids::DAEMON_BUNDLE_ID);
    assert_eq!(string(&epmd, "CFBundleExecutable"), "epmd");
    assert!(ids::DAEMON_PROGRAM.ends_with(&format!("/{}", string(&epmd, "CFBundleExecutable"))));
    let helper = dict("pkg/bundles/helper-Info.plist");
    assert_eq!(string(&helper, "CFBundleIdentifier"), ids::HELPER_BUNDLE_ID);
    assert!(ids::HELPER_PROGRAM.ends_with(&format!("/{}", string(&helper, "CFBundleExecutable"))));
    let entitlements = dict("pkg/entitlements/epmd.entitlements");
    assert!(boolean(
        &entitlements,
        "com.apple.developer.endpoint-security.client"
    ));
}

/// Checks the envelope every MDM needs; returns the profile's PayloadUUIDs.
fn profile(path: &str) -> Vec<String> {
    let d = dict(path);
    assert_eq!(string(&d, "PayloadType"), "Configuration", "{path}");
    assert_eq!(string(&d, "PayloadScope"), "System", "{path}");
    assert!(
        string(&d, "PayloadIdentifier").starts_with("com.epm.profile."),
        "{path}"
    );
    let mut uuids = vec![string(&d, "PayloadUUID").to_owned()];
    let payloads: Vec<Dictionary> = d
        .get("PayloadContent")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|p| p.as_dictionary().unwrap().clone())
        .collect();
    assert!(!payloads.is_empty(), "{path}");
    for p in &payloads {
        for key in ["PayloadType", "PayloadIdentifier", "PayloadDisplayName"] {
            string(p, key);
        }
        uuids.push(string(p, "PayloadUUID").to_owned());
    }
    for uuid in &uuids {
        assert_eq!(uuid.len(), 36, "{path}: {uuid}");
    }
    uuids
}

/// The payloads of a profile.
fn profile_payloads(path: &str) -> Vec<Dictionary> {
    let d = dict(path);
    profile(path);
    d.get("PayloadContent")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|p| p.as_dictionary().unwrap().clone())
        .collect()
}

#[test]
fn profiles_target_the_shipped_identities() {
    let mut all_uuids = Vec::new();
    for path in [
        "pkg/profiles/pppc-epmd.mobileconfig",
        "pkg/profiles/background-items.mobileconfig",
        "pkg/profiles/notifications.mobileconfig",
        "pkg/profiles/managed-preferences.mobileconfig",
    ] {
        all_uuids.extend(profile(path));
    }
    let before = all_uuids.len();
    all_uuids.sort();
    all_uuids.dedup();
    assert_eq!(all_uuids.len(), before, "every PayloadUUID is unique");

    let pppc = &profile_payloads("pkg/profiles/pppc-epmd.mobileconfig")[0];
    assert_eq!(
        string(pppc, "PayloadType"),
        "com.apple.TCC.configuration-profile-policy"
    );
    let services = pppc.get("Services").and_then(Value::as_dictionary).unwrap();
    let fda = services
        .get("SystemPolicyAllFiles")
        .and_then(Value::as_array)
        .unwrap()[0]
        .as_dictionary()
        .unwrap();
    assert_eq!(string(fda, "Identifier"), ids::DAEMON_BUNDLE_ID);
    assert_eq!(string(fda, "IdentifierType"), "bundleID");
    assert_eq!(string(fda, "Authorization"), "Allow");
    assert!(
        string(fda, "CodeRequirement")
            .starts_with(&format!("identifier \"{}\"", ids::DAEMON_BUNDLE_ID))
    );

    let background = &profile_payloads("pkg/profiles/background-items.mobileconfig")[0];
    assert_eq!(
        string(background, "PayloadType"),
        "com.apple.servicemanagement"
    );
    let labels: Vec<String> = background
        .get("Rules")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|r| r.as_dictionary().unwrap())
        .filter(|r| string(r, "RuleType") == "Label")
        .map(|r| string(r, "RuleValue").to_owned())
        .collect();
    assert_eq!(labels, [ids::DAEMON_LABEL, ids::HELPER_LABEL]);

    let notifications = &profile_payloads("pkg/profiles/notifications.mobileconfig")[0];
    let settings = notifications
        .get("NotificationSettings")
        .and_then(Value::as_array)
        .unwrap()[0]
        .as_dictionary()
        .unwrap();
    assert_eq!(string(settings, "BundleIdentifier"), ids::HELPER_BUNDLE_ID);

    let prefs = &profile_payloads("pkg/profiles/managed-preferences.mobileconfig")[0];
    assert_eq!(string(prefs, "PayloadType"), ids::PREFERENCES_DOMAIN);
    // Every setting the template carries is one epmd reads (an unknown key
    // would only be warned about on the Mac, and the setting lost).
    let settings: Vec<&str> = prefs
        .keys()
        .map(String::as_str)
        .filter(|k| !k.starts_with("Payload"))
        .collect();
    for key in &settings {
        assert!(
            ids::PREFERENCES_KEYS.contains(key),
            "{key} is not a key epmd reads: {:?}",
            ids::PREFERENCES_KEYS
        );
    }
    for key in [
        "url",
        "ca_cert_pem",
        "policy_public_key",
        "enrollment_token",
        "sync_interval",
    ] {
        string(prefs, key);
    }
    // The plist path the template's comment and the docs name.
    let template =
        std::fs::read_to_string(repo().join("pkg/profiles/managed-preferences.mobileconfig"))
            .unwrap();
    let plist_path = format!(
        "/Library/Managed Preferences/{}.plist",
        ids::PREFERENCES_DOMAIN
    );
    assert!(template.contains(&plist_path), "{plist_path}");
}

/// docs/deploy-macos.md documents every managed preference key and the
/// unified log subsystem the daemon really uses.
#[test]
fn the_deployment_guide_names_the_keys_and_the_log_subsystem() {
    let guide = std::fs::read_to_string(repo().join("docs/deploy-macos.md")).unwrap();
    for key in ids::PREFERENCES_KEYS {
        assert!(
            guide.contains(&format!("| `{key}` |")),
            "{key} missing from the keys table"
        );
    }
    assert!(guide.contains(&format!(
        "/Library/Managed Preferences/{}.plist",
        ids::PREFERENCES_DOMAIN
    )));
    assert_eq!(
        ids::LOG_SUBSYSTEM,
        ids::DAEMON_LABEL,
        "the subsystem is the daemon's label"
    );
    assert!(
        guide.contains(&format!("subsystem == \"{}\"", ids::LOG_SUBSYSTEM)),
        "the log stream predicate"
    );
}

#[test]
fn install_scripts_use_the_same_labels_and_plist_paths() {
    let lib = std::fs::read_to_string(repo().join("pkg/scripts/epm-install-lib.sh")).unwrap();
    assert!(lib.contains(&format!("EPM_DAEMON_LABEL=\"{}\"", ids::DAEMON_LABEL)));
    assert!(lib.contains(&format!("EPM_HELPER_LABEL=\"{}\"", ids::HELPER_LABEL)));
    assert!(lib.contains(&format!("EPM_LOG_DIR=\"{}\"", ids::LOG_DIR)));
}

fn console_user(fixture: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(". pkg/scripts/epm-install-lib.sh && console_user_from_scutil")
        .current_dir(repo())
        .stdin(std::fs::File::open(repo().join("pkg/tests/fixtures").join(fixture)).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end_matches('\n')
        .to_owned()
}

#[test]
fn the_console_user_is_a_real_user_or_nobody() {
    assert_eq!(console_user("scutil-user.txt"), "alice");
    assert_eq!(console_user("scutil-user-with-space.txt"), "Jane Doe");
    assert_eq!(
        console_user("scutil-loginwindow.txt"),
        "",
        "the login window is nobody"
    );
    assert_eq!(
        console_user("scutil-setup-assistant.txt"),
        "",
        "Setup Assistant is nobody"
    );
    assert_eq!(console_user("scutil-nobody.txt"), "");
}

#[test]
fn the_package_build_stages_what_launchd_expects() {
    let bin = tempfile::tempdir().unwrap();
    for name in ["epmd", "epm-helper", "epmctl", "libepm_sudo.dylib"] {
        std::fs::write(bin.path().join(name), "binary").unwrap();
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(repo().join("pkg/build.sh"))
        .args(["--version", "1.2.3", "--dry-run", "--notary-profile", "ci"])
        .arg("--bin-dir")
        .arg(bin.path())
        .arg("--out")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in [ids::DAEMON_PROGRAM, ids::HELPER_PROGRAM] {
        assert!(
            stdout.contains(&format!("\n.{path}\n")),
            "{path} staged:\n{stdout}"
        );
    }
    for path in [
        "/Library/LaunchDaemons/com.epm.epmd.plist",
        "/Library/LaunchAgents/com.epm.helper.plist",
        "/usr/local/bin/epmctl",
        "/usr/local/lib/epm/libepm_sudo.dylib",
        "/Library/Application Support/EPM/epmd.toml.default",
        "/Library/Application Support/EPM/uninstall.sh",
        "/Library/Application Support/EPM/scripts/epm-install-lib.sh",
    ] {
        assert!(
            stdout.contains(&format!("\n.{path}\n")),
            "{path} staged:\n{stdout}"
        );
    }
    // Signing comes before packaging, notarization after, each exactly once.
    let order: Vec<usize> = [
        "--entitlements",
        "pkgbuild",
        "productbuild",
        "notarytool",
        "stapler staple",
    ]
    .iter()
    .map(|step| {
        stdout
            .find(step)
            .unwrap_or_else(|| panic!("{step} missing:\n{stdout}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{stdout}");

    let missing = Command::new("bash")
        .arg(repo().join("pkg/build.sh"))
        .args(["--version", "1.2.3", "--bin-dir", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("build the release binaries first"));
}
