//! The `epm-helper` binary's command line: errors a user or an installer
//! meets before any daemon is involved. (Being an integration test, this
//! also makes `cargo test --workspace` build the binary that the
//! end-to-end tests run.)
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn helper() -> Command {
    Command::new(env!("CARGO_BIN_EXE_epm-helper"))
}

#[test]
fn without_a_daemon_it_says_epmd_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.json");
    std::fs::write(&answers, r#"{"answers": []}"#).unwrap();
    let out = helper()
        .arg("--socket")
        .arg(dir.path().join("missing.sock"))
        .args(["--backend", "scripted", "--answers"])
        .arg(&answers)
        .arg("--once")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("epmd is not running"), "{stderr}");
}

#[test]
fn a_bad_answers_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let answers = dir.path().join("answers.json");
    std::fs::write(&answers, r#"{"answer": ["typo in the key"]}"#).unwrap();
    let out = helper()
        .args(["--backend", "scripted", "--answers"])
        .arg(&answers)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("answers.json"), "{stderr}");

    let missing = helper().args(["--backend", "scripted"]).output().unwrap();
    assert_eq!(
        missing.status.code(),
        Some(2),
        "clap: --answers is required"
    );
}
