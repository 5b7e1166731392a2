//! `epmd` as an administrator meets it on the command line: the help that
//! teaches it, and a configuration it cannot use named with what is wrong.
//!
//! Being an integration test of this package, it also makes
//! `cargo test --workspace` build the `epmd` binary, which the end-to-end
//! suite in `tests/` runs.

use std::process::Command;

fn epmd(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_epmd"))
        .args(args)
        .output()
        .expect("run epmd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_names_the_options_an_example_and_where_the_configuration_is_documented() {
    let (code, stdout, _) = epmd(&["--help"]);
    assert_eq!(code, Some(0));
    for expected in ["--config", "--check", "Example:", "docs/configuration.md"] {
        assert!(stdout.contains(expected), "no {expected:?} in:\n{stdout}");
    }
}

#[test]
fn a_missing_configuration_is_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let (code, _, stderr) = epmd(&["--config", path.to_str().unwrap(), "--check"]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("cannot read config") && stderr.contains(path.to_str().unwrap()),
        "{stderr}"
    );
}

#[test]
fn a_malformed_configuration_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epmd.toml");
    std::fs::write(&path, "mode = \"enforce\"\nwatch_paths = [\n").unwrap();
    let (code, _, stderr) = epmd(&["--config", path.to_str().unwrap(), "--check"]);
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("invalid config") && stderr.contains("line"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
