//! Managed preferences (the `com.epm.agent` plist MDM installs, XML or
//! binary): parsed, then laid over a configuration without a `[platform]`
//! table and over one with it, as `epmd` does at start.
#![no_main]

use std::path::Path;

use epm_agent::config::Config;
use epm_agent::managed_prefs::ManagedPrefs;
use libfuzzer_sys::fuzz_target;

const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

fn configs() -> [Config; 2] {
    let unmanaged = Config::parse(
        "state_dir = \"/var/lib/epm-fuzz\"\nmode = \"enforce\"",
        Path::new("/etc/epm"),
    )
    .expect("the unmanaged config parses");
    let managed = Config::parse(
        &format!(
            "[platform]\nurl = \"https://file.example.com\"\nca_cert = \"ca.pem\"\npolicy_public_key = \"{KEY}\"\nenrollment_token = \"file-token\"\nsync_interval = \"2m\""
        ),
        Path::new("/etc/epm"),
    )
    .expect("the platform config parses");
    [unmanaged, managed]
}

fuzz_target!(|data: &[u8]| {
    let prefs = match ManagedPrefs::from_bytes(data, "fuzz.plist") {
        Ok(prefs) => prefs,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let _ = prefs.is_empty();
    for mut config in configs() {
        match prefs.apply_to(&mut config) {
            Ok(set) => {
                if !set.is_empty() {
                    assert!(config.platform.is_some());
                }
            }
            Err(error) => assert!(!error.is_empty()),
        }
    }
});
