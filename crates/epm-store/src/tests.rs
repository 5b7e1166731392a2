use std::io::{Seek, SeekFrom, Write};

use jiff::Timestamp;

use super::*;

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let (store, report) = Store::open(&dir.path().join("state/epm.sqlite")).unwrap();
    assert_eq!(report, OpenReport::default());
    (dir, store)
}

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).unwrap()
}

fn sha(c: char) -> SubjectIdentity {
    SubjectIdentity {
        kind: IdentityKind::Sha256,
        value: c.to_string().repeat(64),
    }
}

fn grant(uid: u32, identity: SubjectIdentity, from: i64, until: i64, uses: u32) -> NewGrant {
    NewGrant {
        uid,
        user: format!("user{uid}"),
        identity,
        rule_id: "docker".into(),
        not_before: t(from),
        not_after: t(until),
        uses,
        source: GrantSource::Justification,
        request_id: None,
        justification: Some("container build".into()),
    }
}

fn policy(version: u64) -> StoredPolicy {
    StoredPolicy {
        document: format!(r#"{{"version":{version},"default_action":"allow"}}"#),
        version,
        etag: Some(format!("\"v{version}\"")),
        signature: None,
        source: "file:/etc/epm/policy.json".into(),
        fetched_at: t(version as i64),
    }
}

fn record(seq: u64, len: usize) -> OutboxRecord {
    OutboxRecord {
        seq,
        hash: format!("{seq:064x}"),
        line: "x".repeat(len),
    }
}

#[test]
fn fresh_store_has_current_schema_and_private_modes() {
    let (dir, store) = open_temp();
    let version: i64 = store
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::CURRENT);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&dir.path().join("state/epm.sqlite")), 0o600);
}

#[test]
fn reopening_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    {
        let (mut store, _) = Store::open(&path).unwrap();
        store.save_active_policy(&policy(3)).unwrap();
        store.set_meta("k", "v").unwrap();
    }
    let (store, report) = Store::open(&path).unwrap();
    assert!(report.recovered_from.is_none());
    assert_eq!(store.active_policy().unwrap().unwrap().version, 3);
    assert_eq!(store.meta("k").unwrap().as_deref(), Some("v"));
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    drop(Store::open(&path).unwrap());
    {
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Store::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("schema version 99, newer than this epmd understands (1)"),
        "{err}"
    );
    assert!(
        path.exists(),
        "the newer database must not be moved or replaced"
    );
}

#[test]
fn policy_rotation_keeps_the_last_good() {
    let (_dir, mut store) = open_temp();
    assert!(store.active_policy().unwrap().is_none());
    store.save_active_policy(&policy(1)).unwrap();
    assert!(store.last_good_policy().unwrap().is_none());
    store.save_active_policy(&policy(2)).unwrap();
    store.save_active_policy(&policy(3)).unwrap();
    assert_eq!(store.active_policy().unwrap().unwrap(), policy(3));
    assert_eq!(store.last_good_policy().unwrap().unwrap(), policy(2));
}

#[test]
fn grants_are_consumed_inside_their_window_only() {
    let (_dir, mut store) = open_temp();
    store
        .insert_grant(&grant(501, sha('a'), 0, 100, 2))
        .unwrap();

    assert!(
        store
            .consume_grant(501, &sha('a'), t(-1))
            .unwrap()
            .is_none(),
        "before window"
    );
    assert!(
        store
            .consume_grant(501, &sha('a'), t(100))
            .unwrap()
            .is_none(),
        "at window end"
    );
    assert!(
        store
            .consume_grant(502, &sha('a'), t(10))
            .unwrap()
            .is_none(),
        "other user"
    );
    assert!(
        store
            .consume_grant(501, &sha('b'), t(10))
            .unwrap()
            .is_none(),
        "other binary"
    );
    let cdhash = SubjectIdentity {
        kind: IdentityKind::Cdhash,
        value: "a".repeat(64),
    };
    assert!(
        store.consume_grant(501, &cdhash, t(10)).unwrap().is_none(),
        "other identity kind"
    );

    let used = store.consume_grant(501, &sha('a'), t(10)).unwrap().unwrap();
    assert_eq!(used.grant.uses, 2);
    assert_eq!(store.grants_for(501, t(10)).unwrap()[0].grant.uses, 1);
    // Upper-case hex names the same binary.
    let upper = SubjectIdentity {
        kind: IdentityKind::Sha256,
        value: "A".repeat(64),
    };
    assert!(store.consume_grant(501, &upper, t(20)).unwrap().is_some());
    assert!(
        store
            .consume_grant(501, &sha('a'), t(30))
            .unwrap()
            .is_none(),
        "used up"
    );
    assert!(store.grants_for(501, t(30)).unwrap().is_empty());
}

#[test]
fn grants_for_lists_future_and_current_but_not_ended() {
    let (_dir, mut store) = open_temp();
    store.insert_grant(&grant(501, sha('a'), 0, 10, 1)).unwrap();
    store
        .insert_grant(&grant(501, sha('b'), 50, 60, 1))
        .unwrap();
    let listed = store.grants_for(501, t(20)).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].grant.identity, sha('b'));
    assert_eq!(listed[0].grant.source, GrantSource::Justification);
}

#[test]
fn request_states() {
    let (_dir, mut store) = open_temp();
    let request = Request {
        id: "req-1".into(),
        uid: 501,
        user: "alice".into(),
        rule_id: "wireshark".into(),
        identity: sha('c'),
        path: "/Applications/Wireshark.app/Contents/MacOS/Wireshark".into(),
        justification: "capture a flaky connection".into(),
        window_start: t(60),
        window_end: t(3600),
        state: RequestState::Pending,
        state_reason: None,
        platform_id: None,
        created_at: t(0),
        updated_at: t(0),
    };
    store.insert_request(&request).unwrap();
    assert!(store.insert_request(&request).is_err(), "ids are unique");
    assert_eq!(store.request("req-1").unwrap().unwrap(), request);
    assert_eq!(
        store
            .requests(Some(501), Some(RequestState::Pending))
            .unwrap()
            .len(),
        1
    );
    assert!(store.requests(Some(502), None).unwrap().is_empty());

    assert!(
        store
            .set_request_state("req-1", RequestState::Denied, Some("not needed"), t(5))
            .unwrap()
    );
    let denied = store.request("req-1").unwrap().unwrap();
    assert_eq!(denied.state, RequestState::Denied);
    assert_eq!(denied.state_reason.as_deref(), Some("not needed"));
    assert_eq!(denied.updated_at, t(5));
    assert!(
        !store
            .set_request_state("nope", RequestState::Used, None, t(5))
            .unwrap()
    );
    for state in [
        "pending",
        "approved",
        "denied",
        "expired",
        "revoked",
        "used",
        "cancelled",
    ] {
        assert_eq!(state.parse::<RequestState>().unwrap().as_str(), state);
    }
}

#[test]
fn admin_sessions_expire_and_revoke_once() {
    let (_dir, mut store) = open_temp();
    let session = |uid, expires| NewAdminSession {
        uid,
        user: format!("user{uid}"),
        group: "admin".into(),
        was_member_before: false,
        reason: Some("install printer driver".into()),
        started_at: t(0),
        expires_at: t(expires),
    };
    let a = store.insert_admin_session(&session(501, 600)).unwrap();
    let b = store.insert_admin_session(&session(502, 1200)).unwrap();
    assert_eq!(store.active_admin_sessions().unwrap().len(), 2);
    let expired = store.expired_admin_sessions(t(900)).unwrap();
    assert_eq!(expired.iter().map(|s| s.id).collect::<Vec<_>>(), [a]);
    assert!(store.revoke_admin_session(a, t(901), "expired").unwrap());
    assert!(
        !store.revoke_admin_session(a, t(902), "expired").unwrap(),
        "only once"
    );
    assert!(store.expired_admin_sessions(t(900)).unwrap().is_empty());
    let active = store.active_admin_sessions().unwrap();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].id, b);
}

#[test]
fn outbox_append_resume_and_upload() {
    let (_dir, mut store) = open_temp();
    assert_eq!(store.last_audit().unwrap(), None);
    store
        .append_audit(&[record(1, 10), record(2, 10), record(3, 10)])
        .unwrap();
    assert_eq!(
        store.last_audit().unwrap(),
        Some((3, format!("{:064x}", 3)))
    );
    assert_eq!(
        store
            .audit_since(1, 10)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        [2, 3]
    );
    assert_eq!(store.audit_since(0, 1).unwrap().len(), 1);
    assert!(
        store.append_audit(&[record(3, 1)]).is_err(),
        "sequence numbers are unique"
    );
    assert_eq!(
        store.outbox_stats().unwrap(),
        OutboxStats {
            records: 3,
            pending: 3,
            bytes: 30
        }
    );

    assert_eq!(store.mark_uploaded(2).unwrap(), 2);
    assert_eq!(
        store
            .pending_upload(10)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect::<Vec<_>>(),
        [3]
    );
    assert_eq!(store.outbox_stats().unwrap().pending, 1);
}

#[test]
fn pruning_respects_the_budget_and_keeps_the_newest() {
    let (_dir, mut store) = open_temp();
    let records: Vec<_> = (1..=10).map(|seq| record(seq, 100)).collect();
    store.append_audit(&records).unwrap();
    store.mark_uploaded(3).unwrap();

    assert_eq!(store.prune_audit(10_000).unwrap(), Pruned::default());
    // 1000 bytes held, 550 allowed: drop 5 records, the 3 uploaded first.
    let pruned = store.prune_audit(550).unwrap();
    assert_eq!(
        pruned,
        Pruned {
            records: 5,
            not_uploaded: 2
        }
    );
    let left: Vec<u64> = store
        .audit_since(0, 100)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(left, [6, 7, 8, 9, 10]);
    assert_eq!(store.outbox_stats().unwrap().bytes, 500);

    // Even a budget of zero keeps the newest record.
    store.prune_audit(0).unwrap();
    assert_eq!(store.last_audit().unwrap().unwrap().0, 10);
    assert_eq!(store.outbox_stats().unwrap().records, 1);
}

fn assert_recovers(path: &Path) {
    let (mut store, report) = Store::open(path).unwrap();
    let recovery = report
        .recovered_from
        .expect("corruption should be reported");
    assert!(recovery.moved_to.exists(), "{recovery:?}");
    assert!(
        recovery
            .moved_to
            .to_string_lossy()
            .contains("epm.sqlite.corrupt-"),
        "{recovery:?}"
    );
    assert!(!recovery.reason.is_empty());
    // The fresh database works and remembers the recovery.
    store.save_active_policy(&policy(1)).unwrap();
    assert!(
        store
            .meta("recovered_from")
            .unwrap()
            .unwrap()
            .contains("corrupt-")
    );
    drop(store);
    let (_, again) = Store::open(path).unwrap();
    assert!(again.recovered_from.is_none(), "recovery happens once");
}

#[test]
fn a_garbage_file_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    std::fs::write(
        &path,
        b"this is not a database, it is a shopping list".repeat(100),
    )
    .unwrap();
    assert_recovers(&path);
}

#[test]
fn a_truncated_database_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    {
        let (mut store, _) = Store::open(&path).unwrap();
        let records: Vec<_> = (1..=2000).map(|seq| record(seq, 200)).collect();
        store.append_audit(&records).unwrap();
        store.checkpoint().unwrap();
    }
    let len = std::fs::metadata(&path).unwrap().len();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 3).unwrap();
    assert_recovers(&path);
}

#[test]
fn a_database_with_a_zeroed_page_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    {
        let (mut store, _) = Store::open(&path).unwrap();
        let records: Vec<_> = (1..=2000).map(|seq| record(seq, 200)).collect();
        store.append_audit(&records).unwrap();
        store.checkpoint().unwrap();
    }
    let len = std::fs::metadata(&path).unwrap().len();
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    // Zero a run of pages in the middle: table b-tree pages lose their headers.
    file.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
    file.write_all(&vec![0u8; 4096 * 8]).unwrap();
    drop(file);
    assert_recovers(&path);
}

#[test]
fn an_unopenable_path_is_a_clear_error_not_a_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let err = Store::open(&file.join("epm.sqlite"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("file.txt"), "{err}");
    assert!(
        std::fs::read(&file).unwrap() == b"x",
        "nothing moved or replaced"
    );
}
