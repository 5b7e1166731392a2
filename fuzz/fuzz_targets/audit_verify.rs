//! Audit log lines, as `epmctl audit verify` and `audit tail` read them.
//!
//! The first byte picks the reader. Even: the rest is lines given in
//! order (`verify_lines`, the pipe form), and each line's hash
//! (`hash_line`). Odd: the rest is a log directory, NUL bytes separating
//! its files (the last one live, `audit.jsonl`; the others rotated,
//! `audit-<seq>.jsonl`, the seq taken from its first line when the first
//! byte's bit 1 is set, else 1, 11, 21...), read by `verify_dir`, `tail`
//! (backwards, across files) and `read_records` (forwards).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use epm_audit::{LIVE_FILE, hash_line, read_records, tail, verify_dir, verify_lines};
use libfuzzer_sys::fuzz_target;

/// A directory of this process's own, on a memory file system if there is one.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("epm-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

fn first_seq(file: &[u8]) -> Option<u64> {
    let line = file.split(|&b| b == b'\n').next()?;
    let value: serde_json::Value = serde_json::from_slice(line).ok()?;
    value.get("seq")?.as_u64()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let text = String::from_utf8_lossy(rest);
        for line in text.split('\n') {
            let _ = hash_line(line);
        }
        match verify_lines(text.split('\n')) {
            Ok(report) => {
                if let (Some(first), Some(last)) = (report.first_seq, report.last_seq) {
                    assert!(first <= last, "{report:?}");
                    assert_eq!(last - first + 1, report.records, "{report:?}");
                }
            }
            Err(broken) => assert!(!broken.to_string().is_empty()),
        }
        return;
    }
    let dir = scratch();
    for entry in std::fs::read_dir(dir).expect("list scratch") {
        std::fs::remove_file(entry.expect("entry").path()).expect("clear scratch");
    }
    let files: Vec<&[u8]> = rest.split(|&b| b == 0).take(8).collect();
    let last = files.len() - 1;
    for (index, file) in files.iter().enumerate() {
        let name = if index == last {
            LIVE_FILE.to_owned()
        } else {
            let seq = if mode & 2 != 0 {
                first_seq(file).unwrap_or(1)
            } else {
                1 + 10 * index as u64
            };
            format!("audit-{seq:020}.jsonl")
        };
        std::fs::write(dir.join(name), file).expect("write scratch");
    }
    match verify_dir(dir) {
        Ok(report) => {
            if let (Some(first), Some(last)) = (report.first_seq, report.last_seq) {
                assert!(first <= last, "{report:?}");
            }
        }
        Err(broken) => assert!(!broken.to_string().is_empty()),
    }
    for n in [1, 2, 5, 1000] {
        let lines = tail(dir, n).expect("tail reads what it listed");
        assert!(lines.len() <= n);
    }
    for entry in read_records(dir).expect("list") {
        let entry = entry.expect("read");
        if let Err(error) = &entry.record {
            let _ = error.to_string();
        }
    }
});
