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

#[test]
fn every_sealed_line_is_its_own_canonical_form() {
    // Strings with everything serde_json escapes, and everything it does not.
    let nasty: String = (0u32..0x80)
        .filter_map(char::from_u32)
        .chain("é€😀\u{2028}\u{2029}\u{FFFD}\u{7F}".chars())
        .collect();
    let mut chain = Chain::genesis();
    let mut e = event(1)
        .with_reason(nasty.clone())
        .with_path(format!("/tmp/{nasty}"))
        .with_policy_version(u64::MAX)
        .with_detail("min", i64::MIN)
        .with_detail(
            "nested",
            serde_json::json!({"z": [1, "\\", null], "a": {"y": true, "b": nasty}}),
        );
    e.user = Some(String::new());
    let sealed = chain.seal(e, time());
    let value: serde_json::Value = serde_json::from_str(&sealed.line).unwrap();
    assert_eq!(
        serde_json::to_string(&value).unwrap(),
        sealed.line,
        "the crate's canonical writer must match serde_json's compact output"
    );
    assert_eq!(crate::chain::canonical_json(&value), sealed.line);
    let record = AuditRecord::parse(&sealed.line).unwrap();
    assert_eq!(record.event.reason.as_deref(), Some(nasty.as_str()));
    verify_lines([sealed.line.as_str()]).unwrap();
}

#[test]
fn floats_in_details_are_written_as_strings_so_lines_round_trip() {
    let mut chain = Chain::genesis();
    let e = AuditEvent::error("x")
        .with_detail("ratio", 0.1 + 0.2)
        .with_detail("list", serde_json::json!([1.5e300, 2, {"f": -0.0}]));
    let sealed = chain.seal(e, time());
    let record = AuditRecord::parse(&sealed.line).unwrap();
    let details = record.event.details.unwrap();
    assert_eq!(details["ratio"], "0.30000000000000004");
    assert_eq!(
        details["list"],
        serde_json::json!(["1.5e+300", 2, {"f": "-0.0"}])
    );
    verify_lines([sealed.line.as_str()]).unwrap();
}

#[test]
fn constructors_fill_the_fields_their_event_uses() {
    let mut chain = Chain::genesis();
    let exec = AuditEvent::exec(Decision::WouldDeny, Mode::Monitor, "/usr/bin/nc")
        .with_action(Action::Deny)
        .with_rule_id("block-nc")
        .with_process(10, 9, 1000)
        .with_user("alice")
        .with_sha256("ab".repeat(32))
        .with_device_id("dev-1")
        .with_policy_version(3);
    let record = AuditRecord::parse(&chain.seal(exec, time()).line).unwrap();
    let e = &record.event;
    assert_eq!(e.event, EventKind::EXEC);
    assert_eq!(
        e.decision.as_deref().and_then(Decision::parse),
        Some(Decision::WouldDeny)
    );
    assert_eq!(
        e.action.as_deref().and_then(Action::parse),
        Some(Action::Deny)
    );
    assert_eq!(e.mode.as_deref().and_then(Mode::parse), Some(Mode::Monitor));
    assert_eq!((e.pid, e.ppid, e.uid), (Some(10), Some(9), Some(1000)));
    assert_eq!(record.timestamp(), Some(time()));

    let dropped = AuditEvent::audit_dropped(5, "audit queue full");
    assert_eq!(dropped.event, "audit_dropped");
    assert_eq!(dropped.details.as_ref().unwrap()["count"], 5);
    let rejected = AuditEvent::policy_rejected(Some(7), "bad");
    assert_eq!(
        (rejected.policy_version, rejected.reason.as_deref()),
        (Some(7), Some("bad"))
    );
    assert_eq!(AuditEvent::policy_loaded(8).policy_version, Some(8));
    assert_eq!(
        AuditEvent::mode_changed(Mode::Enforce).mode.as_deref(),
        Some("enforce")
    );
    for (e, kind) in [
        (AuditEvent::daemon_started(), EventKind::DAEMON_STARTED),
        (
            AuditEvent::daemon_stopped("term"),
            EventKind::DAEMON_STOPPED,
        ),
        (AuditEvent::error("boom"), EventKind::ERROR),
        (
            AuditEvent::store_recovered("corrupt"),
            EventKind::STORE_RECOVERED,
        ),
    ] {
        assert_eq!(e.event, kind);
    }
    assert_eq!(Decision::parse("maybe"), None);
}

#[test]
fn editing_any_field_of_a_middle_record_names_that_record() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200, small_files());
    let files = log_files(dir.path()).unwrap();
    let middle = &files[files.len() / 2];
    let original = std::fs::read_to_string(middle).unwrap();
    let target = 2; // a line in the middle of a middle file
    let value: serde_json::Value =
        serde_json::from_str(original.lines().nth(target).unwrap()).unwrap();
    let seq = value["seq"].as_u64().unwrap();
    for key in value.as_object().unwrap().keys() {
        let mut edited = value.clone();
        edited[key] = match &value[key] {
            serde_json::Value::Null => "forged".into(),
            serde_json::Value::String(s) if s.len() == 64 => "f".repeat(64).into(),
            serde_json::Value::String(_) => "forged".into(),
            serde_json::Value::Number(n) => (n.as_u64().unwrap() ^ 1).into(),
            _ => serde_json::Value::Null,
        };
        std::fs::write(middle, &original).unwrap();
        rewrite(middle, |lines| {
            lines[target] = crate::chain::canonical_json(&edited);
        });
        let b = broken(dir.path());
        assert_eq!(
            (&b.file, b.line),
            (&Some(middle.clone()), target + 1),
            "{key}: {b}"
        );
        if key != "seq" {
            assert_eq!(
                (b.seq, &b.kind),
                (Some(seq), &BreakKind::HashMismatch),
                "{key}"
            );
        }
    }
    std::fs::write(middle, &original).unwrap();
    verify_dir(dir.path()).unwrap();
}

#[test]
fn deleting_the_first_lines_of_a_rotated_file_is_a_gap_at_its_new_first_line() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 200, small_files());
    let files = log_files(dir.path()).unwrap();
    rewrite(&files[3], |lines| {
        lines.drain(..2);
    });
    let b = broken(dir.path());
    assert_eq!((&b.file, b.line), (&Some(files[3].clone()), 1));
    assert!(matches!(b.kind, BreakKind::Gap { .. }), "{b}");
}

#[test]
fn a_byte_that_is_not_utf8_is_a_break_at_its_line_not_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 10, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let mut bytes = std::fs::read(&live).unwrap();
    let line_4 = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(2)
        .unwrap()
        .0
        + 1;
    bytes[line_4 + 30] = 0xff;
    std::fs::write(&live, bytes).unwrap();
    let b = broken(dir.path());
    assert_eq!(b.line, 4);
    assert!(
        matches!(&b.kind, BreakKind::Unparsable(why) if why.contains("UTF-8")),
        "{b}"
    );

    let entries: Vec<LogEntry> = read_records(dir.path())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(entries.len(), 10);
    assert!(entries[3].record.is_err());
    assert_eq!(entries[4].record.as_ref().unwrap().seq, 5);
    assert_eq!((entries[4].file.clone(), entries[4].line), (live, 5));
}

#[test]
fn an_overlong_line_is_unparsable_and_readers_skip_it() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 3, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let mut text = std::fs::read(&live).unwrap();
    text.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 1));
    text.push(b'\n');
    std::fs::write(&live, text).unwrap();
    let b = broken(dir.path());
    assert_eq!(b.line, 4);
    assert!(
        matches!(&b.kind, BreakKind::Unparsable(why) if why.contains("longer")),
        "{b}"
    );
    let last = read_records(dir.path()).unwrap().last().unwrap().unwrap();
    assert!(matches!(last.record, Err(ParseError::TooLong)));
    assert_eq!(tail(dir.path(), 2).unwrap().len(), 2);
}

#[test]
fn a_torn_last_line_of_zeros_is_cut_and_reappended_records_verify() {
    // A crash can leave the file's new size with zeros where data was not
    // flushed: with a newline after them (from a later page) ...
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(dir.path(), 5, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let mut bytes = std::fs::read(&live).unwrap();
    let clean = bytes.len() as u64;
    bytes.extend([0u8; 100]);
    bytes.extend(b"rest of a record\"}\n");
    std::fs::write(&live, &bytes).unwrap();
    let (mut log, report) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(report.torn_bytes_removed, bytes.len() as u64 - clean);
    assert_eq!(log.last_seq(), Some(5));
    assert_eq!(log.last_hash(), Some(sealed[4].hash.as_str()));
    let mut chain = Chain::resume(5, sealed[4].hash.clone());
    log.append(&[chain.seal(event(6), time())]).unwrap();
    assert_eq!(verify_dir(dir.path()).unwrap().last_seq, Some(6));

    // ... or without one.
    let mut bytes = std::fs::read(&live).unwrap();
    bytes.extend([0u8; 100]);
    std::fs::write(&live, &bytes).unwrap();
    let (log, report) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!((report.torn_bytes_removed, log.last_seq()), (100, Some(6)));

    // A clean log is left alone.
    let (_, report) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(report, OpenReport::default());
}

#[test]
fn only_the_last_unparsable_line_is_cut_and_the_last_record_is_found_before_it() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 5, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let mut text = std::fs::read_to_string(&live).unwrap();
    text.push_str("garbage one\ngarbage two\n");
    std::fs::write(&live, &text).unwrap();
    let (log, report) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(report.torn_bytes_removed, "garbage two\n".len() as u64);
    assert_eq!(log.last_seq(), Some(5), "found past the line that stays");
    // The line that stays is evidence, and verify names it.
    assert_eq!(broken(dir.path()).line, 6);
}

#[test]
fn resume_after_reopen_continues_seq_and_hash_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(dir.path(), 50, small_files());
    for round in 0..3u64 {
        let (mut log, report) = AuditLog::open(dir.path(), small_files()).unwrap();
        assert_eq!(report.torn_bytes_removed, 0);
        let last_seq = log.last_seq().unwrap();
        assert_eq!(last_seq, 50 + round * 40);
        if round == 0 {
            assert_eq!(log.last_hash(), Some(sealed[49].hash.as_str()));
        }
        let mut chain = Chain::resume(last_seq, log.last_hash().unwrap());
        let batch: Vec<SealedRecord> = (0..40)
            .map(|i| chain.seal(event(last_seq + i), time()))
            .collect();
        for records in batch.chunks(13) {
            log.append(records).unwrap();
        }
    }
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(170)));
}

#[test]
fn reopening_just_after_a_rotation_finds_the_last_record_in_the_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(dir.path(), 50, small_files());
    let live = dir.path().join(LIVE_FILE);
    // Simulate a crash right after a rotation: the live file is new and empty.
    let rotated = dir.path().join("audit-00000000000000099999.jsonl");
    std::fs::rename(&live, &rotated).unwrap();
    let (log, _) = AuditLog::open(dir.path(), small_files()).unwrap();
    assert_eq!(log.last_seq(), Some(50));
    assert_eq!(log.last_hash(), Some(sealed[49].hash.as_str()));
    assert_eq!(std::fs::metadata(&live).unwrap().len(), 0);
}

#[test]
fn rotation_never_replaces_an_existing_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = AuditLog::open(dir.path(), small_files()).unwrap();
    let mut chain = Chain::genesis();
    log.append(&[chain.seal(event(1), time())]).unwrap();
    let squatter = dir.path().join("audit-00000000000000000001.jsonl");
    std::fs::write(&squatter, "older records\n").unwrap();
    let big: Vec<SealedRecord> = (2..40).map(|i| chain.seal(event(i), time())).collect();
    let error = log.append(&big).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists, "{error}");
    assert_eq!(
        std::fs::read_to_string(&squatter).unwrap(),
        "older records\n"
    );
    // What fitted in the live file was written, in order; nothing after.
    let live = std::fs::read_to_string(dir.path().join(LIVE_FILE)).unwrap();
    assert!(live.len() <= 4096);
    let seqs: Vec<u64> = live
        .lines()
        .map(|l| AuditRecord::parse(l).unwrap().seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(seqs.len() < 39);
}

#[test]
fn files_and_directory_get_their_modes() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("nested/audit");
    write_log(&dir, 100, small_files());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o750);
    for file in log_files(&dir).unwrap() {
        assert_eq!(mode(&file), 0o640, "{file:?}");
    }
}

#[test]
fn tail_leaves_out_a_line_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(dir.path(), 5, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let mut text = std::fs::read_to_string(&live).unwrap();
    text.push_str(&sealed[0].line[..40]);
    std::fs::write(&live, text).unwrap();
    let lines = tail(dir.path(), 2).unwrap();
    assert_eq!(lines, [sealed[3].line.clone(), sealed[4].line.clone()]);
    assert!(tail(dir.path(), 0).unwrap().is_empty());
}

#[test]
fn tail_of_many_short_lines_across_many_files() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(
        dir.path(),
        2000,
        LogOptions {
            max_file_bytes: 64 * 1024,
            keep_files: 100,
        },
    );
    let lines = tail(dir.path(), 1500).unwrap();
    let expected: Vec<String> = sealed[500..].iter().map(|r| r.line.clone()).collect();
    assert_eq!(lines, expected);
}

#[test]
fn read_records_yields_every_record_in_order_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 120, small_files());
    let entries: Vec<LogEntry> = read_records(dir.path())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let seqs: Vec<u64> = entries
        .iter()
        .map(|e| e.record.as_ref().unwrap().seq)
        .collect();
    assert_eq!(seqs, (1..=120).collect::<Vec<_>>());
    assert_eq!(entries[0].line, 1);
    assert_ne!(entries[0].file, entries[119].file);
}

fn seqs_of(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| AuditRecord::parse(l).unwrap().seq)
        .collect()
}

#[test]
fn follower_reads_files_rotated_away_between_two_polls() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = AuditLog::open(dir.path(), small_files()).unwrap();
    let mut chain = Chain::genesis();
    log.append(&[chain.seal(event(1), time())]).unwrap();
    let mut follower = Follower::from_end(dir.path()).unwrap();
    for i in 2..=150 {
        log.append(&[chain.seal(event(i), time())]).unwrap();
    }
    assert!(log_files(dir.path()).unwrap().len() > 5);
    assert_eq!(
        seqs_of(&follower.poll().unwrap()),
        (2..=150).collect::<Vec<_>>()
    );
    assert!(follower.poll().unwrap().is_empty());
}

#[test]
fn follower_catches_up_by_seq_when_retention_outran_it() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        max_file_bytes: 4096,
        keep_files: 2,
    };
    let (mut log, _) = AuditLog::open(dir.path(), options).unwrap();
    let mut chain = Chain::genesis();
    log.append(&[chain.seal(event(1), time())]).unwrap();
    let mut follower = Follower::from_end(dir.path()).unwrap();
    log.append(&[chain.seal(event(2), time())]).unwrap();
    assert_eq!(seqs_of(&follower.poll().unwrap()), [2]);
    for i in 3..=200 {
        log.append(&[chain.seal(event(i), time())]).unwrap();
    }
    // The file it was reading is deleted but still open, so it is read to
    // its end; the files deleted unread are lost to it; what is left comes
    // in order, once.
    let seqs = seqs_of(&follower.poll().unwrap());
    let first_kept = rotated_first_seqs(dir.path())[0];
    assert_eq!(seqs[0], 3);
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    assert_eq!(
        seqs.iter()
            .skip_while(|s| **s < first_kept)
            .copied()
            .collect::<Vec<_>>(),
        (first_kept..=200).collect::<Vec<_>>()
    );
    assert!(follower.poll().unwrap().is_empty());
}

#[test]
fn follower_survives_a_torn_line_being_cut_by_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sealed = write_log(dir.path(), 5, LogOptions::default());
    let mut follower = Follower::from_end(dir.path()).unwrap();
    let live = dir.path().join(LIVE_FILE);
    let mut text = std::fs::read_to_string(&live).unwrap();
    text.push_str(&sealed[0].line[..40]);
    std::fs::write(&live, text).unwrap();
    assert!(follower.poll().unwrap().is_empty());
    let (mut log, report) = AuditLog::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(report.torn_bytes_removed, 40);
    let mut chain = Chain::resume(5, sealed[4].hash.clone());
    log.append(&[chain.seal(event(6), time())]).unwrap();
    log.append(&[chain.seal(event(7), time())]).unwrap();
    assert_eq!(seqs_of(&follower.poll().unwrap()), [6, 7]);
}

#[test]
fn follower_started_before_the_log_exists_reads_it_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut follower = Follower::from_end(dir.path()).unwrap();
    assert!(follower.poll().unwrap().is_empty());
    write_log(dir.path(), 3, LogOptions::default());
    assert_eq!(seqs_of(&follower.poll().unwrap()), [1, 2, 3]);
}

fn rotated_first_seqs(dir: &Path) -> Vec<u64> {
    log_files(dir)
        .unwrap()
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            name.strip_prefix("audit-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()
        })
        .collect()
}

/// A valid rotated log, as (file name, bytes), built once.
fn rotated_log() -> &'static [(String, Vec<u8>)] {
    static LOG: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        write_log(
            dir.path(),
            24,
            LogOptions {
                max_file_bytes: 2048,
                keep_files: 100,
            },
        );
        log_files(dir.path())
            .unwrap()
            .into_iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap().to_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect()
    })
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

    /// The same on the files of a rotated log: any single-byte change in
    /// any file is a chain break (never an I/O error, never intact).
    #[test]
    fn any_byte_change_in_any_file_is_a_break(
        file in any::<prop::sample::Index>(),
        index in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let log = rotated_log();
        prop_assert!(log.len() >= 3);
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in log {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        prop_assert!(verify_dir(dir.path()).is_ok());
        let (name, bytes) = &log[file.index(log.len())];
        let mut bytes = bytes.clone();
        let at = index.index(bytes.len());
        prop_assume!(bytes[at] != byte);
        bytes[at] = byte;
        std::fs::write(dir.path().join(name), &bytes).unwrap();
        let result = verify_dir(dir.path());
        prop_assert!(
            matches!(result, Err(VerifyError::Broken(_))),
            "{name} byte {at} -> {byte:#04x}: {result:?}"
        );
    }

    /// Whatever the text in a record, its line verifies and parses back to it.
    #[test]
    fn any_text_round_trips(reason in any::<String>(), key in any::<String>(), n in any::<i64>()) {
        let mut chain = Chain::genesis();
        let e = AuditEvent::error(reason.clone()).with_detail(&key, n).with_user(key.clone());
        let sealed = chain.seal(e, time());
        prop_assert!(verify_lines([sealed.line.as_str()]).is_ok());
        let record = AuditRecord::parse(&sealed.line).unwrap();
        prop_assert_eq!(record.event.reason, Some(reason));
        prop_assert_eq!(&record.event.details.unwrap()[&key], &serde_json::Value::from(n));
    }
}

#[test]
fn a_batch_larger_than_a_file_is_split_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = AuditLog::open(dir.path(), small_files()).unwrap();
    let mut chain = Chain::genesis();
    let batch: Vec<SealedRecord> = (1..=300).map(|i| chain.seal(event(i), time())).collect();
    log.append(&batch).unwrap();
    let files = log_files(dir.path()).unwrap();
    assert!(files.len() > 10, "{files:?}");
    for file in &files {
        let len = std::fs::metadata(file).unwrap().len();
        assert!(len <= 4096, "{file:?} is {len} bytes");
    }
    let report = verify_dir(dir.path()).unwrap();
    assert_eq!((report.records, report.last_seq), (300, Some(300)));
}

#[test]
fn retention_is_bounded_in_bytes_too() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        max_file_bytes: 4096,
        keep_files: 100,
    };
    assert_eq!(options.max_total_bytes(), 4096 * 101);
    // An old rotated file far past the budget (as an older version could
    // leave): the next rotation deletes it.
    std::fs::write(
        dir.path().join("audit-00000000000000000001.jsonl"),
        vec![b'\n'; 1024 * 1024],
    )
    .unwrap();
    let (mut log, _) = AuditLog::open(dir.path(), options).unwrap();
    let mut chain = Chain::resume(1, GENESIS_HASH);
    for i in 2..=100 {
        log.append(&[chain.seal(event(i), time())]).unwrap();
    }
    let files = log_files(dir.path()).unwrap();
    assert!(
        !files[0].ends_with("audit-00000000000000000001.jsonl"),
        "{files:?}"
    );
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert!(total <= options.max_total_bytes(), "{total}");
}

#[test]
fn verify_while_the_writer_rotates_never_reports_a_break() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        max_file_bytes: 8192,
        keep_files: 5,
    };
    let (mut log, _) = AuditLog::open(dir.path(), options).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut chain = Chain::genesis();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch: Vec<SealedRecord> = (0..5)
                    .map(|_| {
                        i += 1;
                        chain.seal(event(i), time())
                    })
                    .collect();
                log.append(&batch).unwrap();
            }
            i
        })
    };
    let mut verified = 0;
    for _ in 0..300 {
        match verify_dir(dir.path()) {
            Ok(report) => {
                if report.records > 0 {
                    verified += 1;
                }
            }
            Err(VerifyError::Io(e)) if e.to_string().contains("kept rotating") => {}
            Err(e) => panic!("false alarm while the writer rotates: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(
        written > 100 && verified > 0,
        "{written} written, {verified} verified"
    );
    verify_dir(dir.path()).unwrap();
}

/// The live file may end in a line still being written: verify skips it
/// while it could still become a record, wherever the write stopped (even
/// inside a character), and checks it once it cannot (a newline
/// overwritten by another byte is a change, not a write in progress).
#[test]
fn verify_skips_an_unfinished_last_line_but_not_a_damaged_one() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 4, LogOptions::default());
    let live = dir.path().join(LIVE_FILE);
    let complete = std::fs::read(&live).unwrap();

    let mut next = Chain::genesis();
    let sealed: Vec<SealedRecord> = (1..=5)
        .map(|i| next.seal(event(i).with_user("zoë"), time()))
        .collect();
    let fifth = sealed[4].line.as_bytes();
    for cut in 1..fifth.len() {
        let mut bytes = complete.clone();
        bytes.extend_from_slice(&fifth[..cut]);
        std::fs::write(&live, &bytes).unwrap();
        let report = verify_dir(dir.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(report.last_seq, Some(4), "cut at {cut}");
    }

    let last_newline = complete.len() - 1;
    for byte in [0u8, b' ', b'x', b'}', b'"'] {
        let mut bytes = complete.clone();
        bytes[last_newline] = byte;
        std::fs::write(&live, &bytes).unwrap();
        assert!(
            matches!(verify_dir(dir.path()), Err(VerifyError::Broken(_))),
            "the last newline overwritten by {byte:#04x} must be a break"
        );
    }
}
