use std::path::Path;

use proptest::prelude::*;

use crate::*;

fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(EventKind::EXEC);
    e.decision = Some(if i.is_multiple_of(3) { "deny" } else { "allow" }.into());
    e.action = e.decision.clone();
    e.rule_id = (i.is_multiple_of(3)).then(|| "block-nc".to_owned());
    e.reason = Some(format!("reason {i} with \"quotes\" and ünïcode"));
    e.mode = Some("enforce".into());
    e.pid = Some(1000 + i as u32);
    e.uid = Some(501);
    e.user = Some("alice".into());
    e.path = Some(format!("/usr/bin/tool{i}"));
    e.device_id = Some("mac-0042".into());
    e.policy_version = Some(7);
    e.with_detail("n", i)
}

fn time() -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000).unwrap()
}

fn write_log(dir: &Path, records: u64, options: LogOptions) -> Vec<SealedRecord> {
    let (mut log, _) = AuditLog::open(dir, options).unwrap();
    let mut chain = Chain::genesis();
    let sealed: Vec<SealedRecord> = (1..=records)
        .map(|i| chain.seal(event(i), time()))
        .collect();
    for batch in sealed.chunks(7) {
        log.append(batch).unwrap();
    }
    sealed
}

fn small_files() -> LogOptions {
    LogOptions {
        max_file_bytes: 4096,
        keep_files: 100,
    }
}

fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(path, out).unwrap();
}

fn broken(dir: &Path) -> ChainBreak {
    match verify_dir(dir) {
        Err(VerifyError::Broken(b)) => b,
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

#[test]
fn records_have_the_documented_fields() {
    let mut chain = Chain::genesis();
    let sealed = chain.seal(event(3), time());
    let record = AuditRecord::parse(&sealed.line).unwrap();
    assert_eq!(record.seq, 1);
    assert_eq!(record.prev_hash, GENESIS_HASH);
    assert_eq!(record.hash, sealed.hash);
    assert_eq!(record.time, "2027-01-15T08:00:00Z");
    let value: serde_json::Value = serde_json::from_str(&sealed.line).unwrap();
    for field in [
        "seq",
        "time",
        "event",
        "decision",
        "action",
        "rule_id",
        "reason",
        "mode",
        "pid",
        "ppid",
        "uid",
        "user",
        "path",
        "sha256",
        "device_id",
        "policy_version",
        "details",
        "prev_hash",
        "hash",
    ] {
        assert!(
            value.get(field).is_some(),
            "missing {field}: {}",
            sealed.line
        );
    }
    assert_eq!(
        value["ppid"],
        serde_json::Value::Null,
        "absent facts are null, not missing"
    );
}

#[test]
fn a_rotated_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200, small_files());
    let files = log_files(dir.path()).unwrap();
    assert!(files.len() > 5, "expected several rotations, got {files:?}");
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!(report.records, 200);
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(200)));
    assert!(report.starts_at_genesis);
    for file in &files[..files.len() - 1] {
        let len = std::fs::metadata(file).unwrap().len();
        assert!(len <= 4096, "{file:?} is {len} bytes");
    }
}

#[test]
fn editing_any_field_names_that_record() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 30, LogOptions::default());
    rewrite(&dir.path().join(LIVE_FILE), |lines| {
        lines[10] = lines[10].replace("\"allow\"", "\"deny\"");
    });
    let b = broken(dir.path());
    assert_eq!(
        (b.line, b.seq, b.kind.clone()),
        (11, Some(11), BreakKind::HashMismatch)
    );
    assert!(
        b.to_string().contains("line 11 (seq 11): hash mismatch"),
        "{b}"
    );
}

#[test]
fn deleting_a_line_names_the_record_after_it() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 30, LogOptions::default());
    rewrite(&dir.path().join(LIVE_FILE), |lines| {
        lines.remove(9);
    });
    let b = broken(dir.path());
    assert_eq!((b.seq, b.kind), (Some(11), BreakKind::Gap { expected: 10 }));
}

#[test]
fn deleting_the_first_line_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5, LogOptions::default());
    rewrite(&dir.path().join(LIVE_FILE), |lines| {
        lines.remove(0);
    });
    assert_eq!(broken(dir.path()).kind, BreakKind::Gap { expected: 1 });
}

#[test]
fn a_recomputed_hash_still_breaks_the_next_link() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10, LogOptions::default());
    rewrite(&dir.path().join(LIVE_FILE), |lines| {
        // A careful forger edits record 4 and fixes its own hash...
        let mut value: serde_json::Value = serde_json::from_str(&lines[3]).unwrap();
        value["decision"] = "deny".into();
        let mut map = value.as_object().unwrap().clone();
        map.remove("hash");
        let rehashed = hash_line(&serde_json::Value::Object(map.clone()).to_string()).unwrap();
        map.insert("hash".into(), rehashed.into());
        lines[3] = serde_json::Value::Object(map).to_string();
    });
    // ...and record 5's prev_hash gives it away.
    let b = broken(dir.path());
    assert_eq!((b.seq, b.kind), (Some(5), BreakKind::PrevHashMismatch));
}

#[test]
fn a_duplicated_key_cannot_hide_the_original_value() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 6, LogOptions::default());
    rewrite(&dir.path().join(LIVE_FILE), |lines| {
        // Record 3 is a deny; prepend a forged decision the parser would drop.
        lines[2] = lines[2].replacen('{', r#"{"decision":"allow","#, 1);
    });
    let b = broken(dir.path());
    assert_eq!((b.seq, b.kind), (Some(3), BreakKind::NotCanonical));
}

#[test]
fn reordering_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10, LogOptions::default());
    rewrite(&dir.path().join(LIVE_FILE), |lines| lines.swap(4, 5));
    assert_eq!(broken(dir.path()).kind, BreakKind::Gap { expected: 5 });
}

#[test]
fn a_missing_rotated_file_in_the_middle_is_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200, small_files());
    let files = log_files(dir.path()).unwrap();
    std::fs::remove_file(&files[2]).unwrap();
    assert!(matches!(broken(dir.path()).kind, BreakKind::Gap { .. }));
}

#[test]
fn retention_keeps_the_newest_files_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    write_log(
        dir.path(),
        200,
        LogOptions {
            max_file_bytes: 4096,
            keep_files: 2,
        },
    );
    let files = log_files(dir.path()).unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    let report = verify_dir(dir.path()).unwrap();
    assert!(!report.starts_at_genesis);
    assert_eq!(report.last_seq, Some(200));
}

#[test]
fn a_torn_last_line_is_cut_and_the_chain_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(dir.path(), 5, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let mut text = std::fs::read_to_string(&live).unwrap();
    text.push_str(&sealed[0].line[..20]);
    std::fs::write(&live, text).unwrap();

    let (mut log, report) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(report.torn_bytes_removed, 20);
    assert_eq!(log.last_seq(), Some(5));
    let mut chain = Chain::resume(5, sealed[4].hash.clone());
    log.append(&[chain.seal(event(6), time())]).unwrap();
    assert_eq!(verify_dir(dir.path()).unwrap().last_seq, Some(6));
}

#[test]
fn last_seq_survives_a_rotation_boundary() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 50, small_files());
    let (log, _) = AuditLog::open(dir.path(), small_files()).unwrap();
    assert_eq!(log.last_seq(), Some(50));
}

#[test]
fn tail_reads_across_rotation() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200, small_files());
    let lines = tail(dir.path(), 75).unwrap();
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| AuditRecord::parse(l).unwrap().seq)
        .collect();
    assert_eq!(seqs, (126..=200).collect::<Vec<_>>());
    assert_eq!(tail(dir.path(), 1000).unwrap().len(), 200);
    assert!(
        tail(tempfile::tempdir().unwrap().path(), 5)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn follower_sees_new_records_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_files();
    let (mut log, _) = AuditLog::open(dir.path(), options).unwrap();
    let mut chain = Chain::genesis();
    log.append(&[chain.seal(event(1), time())]).unwrap();
    let mut follower = Follower::from_end(dir.path()).unwrap();
    assert!(follower.poll().unwrap().is_empty(), "starts at the end");
    let mut seen = Vec::new();
    for i in 2..=80 {
        log.append(&[chain.seal(event(i), time())]).unwrap();
        if i % 9 == 0 {
            seen.extend(follower.poll().unwrap());
        }
    }
    seen.extend(follower.poll().unwrap());
    assert!(
        log_files(dir.path()).unwrap().len() > 2,
        "the test must cross rotations"
    );
    let seqs: Vec<u64> = seen
        .iter()
        .map(|l| AuditRecord::parse(l).unwrap().seq)
        .collect();
    assert_eq!(seqs, (2..=80).collect::<Vec<_>>());
}

#[test]
fn unknown_events_and_extra_fields_still_parse_and_verify() {
    let mut chain = Chain::genesis();
    let mut e = AuditEvent::new("from_the_future");
    e.details = Some(serde_json::Map::from_iter([("new".to_owned(), 1.into())]));
    let sealed = chain.seal(e, time());
    assert_eq!(
        AuditRecord::parse(&sealed.line).unwrap().event.event,
        "from_the_future"
    );
    verify_lines([sealed.line.as_str()]).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any single-byte change anywhere in a valid log is detected (or makes
    /// the line unparsable, which is detected too).
    #[test]
    fn any_byte_change_is_detected(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let mut chain = Chain::genesis();
        let lines: Vec<String> = (1..=6).map(|i| chain.seal(event(i), time()).line).collect();
        let mut text = lines.join("\n").into_bytes();
        let at = index.index(text.len());
        prop_assume!(text[at] != byte);
        text[at] = byte;
        let text = String::from_utf8_lossy(&text).into_owned();
        prop_assert!(verify_lines(text.split('\n')).is_err(), "undetected change at {at}");
    }
}
