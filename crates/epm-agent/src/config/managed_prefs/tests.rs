use super::*;

const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/managed-prefs")
        .join(name)
}

fn parse(name: &str) -> Result<ManagedPrefs, PrefsError> {
    let bytes = std::fs::read(fixture(name)).unwrap();
    ManagedPrefs::from_bytes(&bytes, name)
}

/// A config file like the package's default: no `[platform]`.
fn unmanaged(state_dir: &Path) -> Config {
    Config::parse(
        &format!(
            "state_dir = {:?}\nmode = \"enforce\"",
            state_dir.display().to_string()
        ),
        Path::new("/etc/epm"),
    )
    .unwrap()
}

fn toml_platform() -> Config {
    Config::parse(
        &format!(
            "[platform]\nurl = \"https://file.example.com\"\nca_cert = \"ca.pem\"\npolicy_public_key = \"{KEY}\"\nenrollment_token = \"file-token\"\nsync_interval = \"2m\""
        ),
        Path::new("/etc/epm"),
    )
    .unwrap()
}

#[test]
fn an_xml_plist_gives_every_setting_checked() {
    let prefs = parse("full.xml.plist").unwrap();
    assert_eq!(prefs.url.as_deref(), Some("https://epm.example.com:8443"));
    assert!(
        prefs
            .ca_cert_pem
            .as_deref()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    assert_eq!(prefs.policy_public_key.unwrap().to_string(), KEY);
    assert_eq!(
        prefs.enrollment_token.as_deref(),
        Some("tok-123"),
        "trimmed like the file's"
    );
    assert_eq!(prefs.sync_interval, Some(Duration::from_secs(600)));
    // The payload's own keys are not settings; an unknown key only warns.
    assert_eq!(prefs.warnings.len(), 1, "{:?}", prefs.warnings);
    assert!(
        prefs.warnings[0].contains("\"colour\""),
        "{:?}",
        prefs.warnings
    );
}

#[test]
fn a_binary_plist_reads_the_same_and_takes_seconds_and_a_ca_path() {
    let prefs = parse("path-ca.binary.plist").unwrap();
    assert_eq!(prefs.url.as_deref(), Some("https://epm.example.com:8443"));
    assert_eq!(
        prefs.ca_cert.as_deref(),
        Some(Path::new("/Library/Application Support/EPM/ca.pem"))
    );
    assert_eq!(prefs.ca_cert_pem, None);
    assert_eq!(prefs.sync_interval, Some(Duration::from_secs(600)));
    assert!(prefs.warnings.is_empty(), "{:?}", prefs.warnings);
}

#[test]
fn wrong_types_and_bad_values_name_the_key() {
    let err = parse("wrong-type.binary.plist").unwrap_err().to_string();
    assert_eq!(
        err,
        "managed preferences wrong-type.binary.plist: url: expected a string, found an integer"
    );
    let cases: [(Value, &str); 9] = [
        (
            Value::String("http://x".into()),
            "url: \"http://x\" must be an https:// URL",
        ),
        (
            Value::String("ed25519:AAAA".into()),
            "policy_public_key: an Ed25519 public key is 32 bytes",
        ),
        (
            Value::Boolean(true),
            "policy_public_key: expected a string, found a boolean",
        ),
        (
            Value::String("  ".into()),
            "enrollment_token: must not be empty",
        ),
        (
            Value::String("10s".into()),
            "sync_interval: 10s is outside 60s..=30m",
        ),
        (
            Value::Integer((-5).into()),
            "sync_interval: -5 is not a number of seconds",
        ),
        (
            Value::Real(1.5),
            "sync_interval: expected a duration like \"5m\" or a number of seconds, found a real number",
        ),
        (
            Value::String("ca.pem".into()),
            "ca_cert: ca.pem must be an absolute path",
        ),
        (
            Value::String("hello".into()),
            "ca_cert_pem: not a PEM certificate",
        ),
    ];
    for (value, expected) in cases {
        let key = expected.split(':').next().unwrap();
        let mut dict = plist::Dictionary::new();
        dict.insert(key.to_owned(), value);
        let mut bytes = Vec::new();
        Value::Dictionary(dict).to_writer_xml(&mut bytes).unwrap();
        let err = ManagedPrefs::from_bytes(&bytes, "test").unwrap_err();
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
    for (bytes, expected) in [
        (&b"not a plist"[..], "not a property list"),
        (
            &b"<plist version=\"1.0\"><array/></plist>"[..],
            "expected a dictionary at the top, found an array",
        ),
    ] {
        let err = ManagedPrefs::from_bytes(bytes, "test").unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
}

#[test]
fn a_key_list_pins_every_key_during_a_rotation() {
    let keys = [
        "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
        "ed25519:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=",
    ];
    let mut dict = plist::Dictionary::new();
    dict.insert(
        "policy_public_key".into(),
        Value::Array(keys.iter().map(|k| Value::String((*k).into())).collect()),
    );
    let mut bytes = Vec::new();
    Value::Dictionary(dict.clone())
        .to_writer_xml(&mut bytes)
        .unwrap();
    let prefs = ManagedPrefs::from_bytes(&bytes, "test").unwrap();
    assert_eq!(
        prefs.policy_public_key.unwrap().to_string(),
        keys.join(", ")
    );
    dict.insert(
        "policy_public_key".into(),
        Value::Array(vec![
            Value::String(keys[0].into()),
            Value::Integer(3.into()),
        ]),
    );
    let mut bytes = Vec::new();
    Value::Dictionary(dict).to_writer_xml(&mut bytes).unwrap();
    let err = ManagedPrefs::from_bytes(&bytes, "test").unwrap_err();
    assert!(
        err.to_string()
            .contains("policy_public_key: expected a string, found an integer"),
        "{err}"
    );
}

#[test]
fn ca_path_and_pem_are_exclusive() {
    let mut dict = plist::Dictionary::new();
    dict.insert("ca_cert".into(), Value::String("/ca.pem".into()));
    dict.insert(
        "ca_cert_pem".into(),
        Value::String("-----BEGIN CERTIFICATE-----\n".into()),
    );
    let mut bytes = Vec::new();
    Value::Dictionary(dict)
        .to_writer_binary(&mut bytes)
        .unwrap();
    let err = ManagedPrefs::from_bytes(&bytes, "test").unwrap_err();
    assert!(err.to_string().contains("exclusive"), "{err}");
}

#[test]
fn managed_settings_make_a_platform_table_where_the_file_has_none() {
    let state = tempfile::tempdir().unwrap();
    let loaded =
        Config::with_managed_prefs(unmanaged(state.path()), &fixture("full.xml.plist")).unwrap();
    let platform = loaded.config.platform.as_ref().unwrap();
    assert_eq!(platform.url, "https://epm.example.com:8443");
    assert_eq!(platform.ca_cert, state.path().join(MANAGED_CA_FILE));
    assert_eq!(platform.enrollment_token.as_deref(), Some("tok-123"));
    assert_eq!(platform.sync_interval, Duration::from_secs(600));
    assert_eq!(loaded.managed.as_deref(), Some(&*fixture("full.xml.plist")));
    assert_eq!(
        loaded.overrides,
        [
            "platform.url",
            "platform.ca_cert",
            "platform.policy_public_key",
            "platform.enrollment_token",
            "platform.sync_interval"
        ]
    );
    assert_eq!(loaded.warnings.len(), 1);
    // The PEM is written where the TLS client reads the CA from.
    let written = std::fs::read_to_string(&platform.ca_cert).unwrap();
    assert!(written.starts_with("-----BEGIN CERTIFICATE-----"));
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&platform.ca_cert)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    // Loading again leaves the same file.
    Config::with_managed_prefs(unmanaged(state.path()), &fixture("full.xml.plist")).unwrap();
    assert_eq!(std::fs::read_to_string(&platform.ca_cert).unwrap(), written);
}

#[test]
fn managed_settings_win_key_by_key_over_the_file() {
    let loaded =
        Config::with_managed_prefs(toml_platform(), &fixture("url-only.xml.plist")).unwrap();
    let platform = loaded.config.platform.unwrap();
    assert_eq!(platform.url, "https://other.example.com", "managed wins");
    assert_eq!(
        platform.ca_cert,
        PathBuf::from("/etc/epm/ca.pem"),
        "file kept"
    );
    assert_eq!(platform.enrollment_token.as_deref(), Some("file-token"));
    assert_eq!(platform.sync_interval, Duration::from_secs(120));
    assert_eq!(loaded.overrides, ["platform.url"]);
}

#[test]
fn an_incomplete_platform_or_a_conflict_is_an_error_naming_what_is_missing() {
    let err = Config::with_managed_prefs(
        unmanaged(Path::new("/nonexistent")),
        &fixture("url-only.xml.plist"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("url-only.xml.plist"), "{err}");
    assert!(
        err.contains("not ca_cert_pem (or ca_cert), and the config file has no [platform]"),
        "{err}"
    );
    let with_policy = Config::parse("policy_file = \"p.json\"", Path::new("/etc/epm")).unwrap();
    let err = Config::with_managed_prefs(with_policy, &fixture("path-ca.binary.plist"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("policy_file and [platform] are exclusive"),
        "{err}"
    );
}

#[test]
fn no_file_means_the_config_file_alone() {
    let loaded =
        Config::with_managed_prefs(toml_platform(), Path::new("/nonexistent/x.plist")).unwrap();
    assert_eq!(loaded.managed, None);
    assert!(loaded.overrides.is_empty());
    assert_eq!(
        loaded.config.platform.unwrap().url,
        "https://file.example.com"
    );
}

#[test]
fn the_path_is_the_domain_in_managed_preferences_on_macos_only() {
    let expected = cfg!(target_os = "macos")
        .then(|| PathBuf::from("/Library/Managed Preferences/com.epm.agent.plist"));
    assert_eq!(system_path(), expected);
}

/// The profile MDM admins upload, with its placeholders filled in, reads
/// without warnings: every key it sets is one `epmd` knows.
#[test]
fn the_shipped_profile_template_is_understood() {
    let profile = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../pkg/profiles/managed-preferences.mobileconfig");
    let Value::Dictionary(profile) = Value::from_file(profile).unwrap() else {
        panic!("not a dictionary")
    };
    let payload = profile
        .get("PayloadContent")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .filter_map(Value::as_dictionary)
        .find(|p| p.get("PayloadType").and_then(Value::as_string) == Some(DOMAIN))
        .expect("a payload for the domain");
    let mut payload = payload.clone();
    for (key, value) in payload.iter_mut() {
        if let Value::String(text) = value {
            *text = text
                .replace(
                    "@CA_PEM@",
                    "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----",
                )
                .replace("@POLICY_PUBLIC_KEY@", KEY)
                .replace("@ENROLLMENT_TOKEN@", "token");
            assert!(
                !text.contains('@'),
                "{key}: unknown placeholder in {text:?}"
            );
        }
    }
    let mut bytes = Vec::new();
    Value::Dictionary(payload)
        .to_writer_xml(&mut bytes)
        .unwrap();
    let prefs = ManagedPrefs::from_bytes(&bytes, "template").unwrap();
    assert!(prefs.warnings.is_empty(), "{:?}", prefs.warnings);
    let mut config = unmanaged(Path::new("/var/empty"));
    prefs.apply_to(&mut config).unwrap();
    assert!(config.platform.is_some());
}
