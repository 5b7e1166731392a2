use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
        path: None,
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
        envelope: None,
    }
}

#[test]
fn a_platform_policy_keeps_its_envelope_and_a_v1_database_upgrades() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.sqlite");
    {
        // A database as version 1 left it, with a policy.
        let mut conn = Connection::open(&path).unwrap();
        assert!(schema::migrate_with(&mut conn, &schema::MIGRATIONS[..1]).is_ok());
        conn.execute(
            "INSERT INTO policy (slot, document, version, source, fetched_at)
             VALUES ('active', '{}', 3, 'file:/p.json', 0)",
            [],
        )
        .unwrap();
    }
    let (mut store, _) = Store::open(&path).unwrap();
    let old = store.active_policy().unwrap().unwrap();
    assert_eq!((old.version, old.envelope), (3, None));
    let signed = StoredPolicy {
        envelope: Some(r#"{"kind":"policy_bundle"}"#.into()),
        source: "platform".into(),
        ..policy(4)
    };
    store.save_active_policy(&signed).unwrap();
    assert_eq!(store.active_policy().unwrap().unwrap(), signed);
    assert_eq!(store.last_good_policy().unwrap().unwrap().version, 3);
}

#[test]
fn the_oldest_kept_audit_seq_follows_pruning() {
    let (_dir, mut store) = open_temp();
    assert_eq!(store.oldest_audit_seq().unwrap(), None);
    let records: Vec<_> = (1..=4).map(|seq| record(seq, 100)).collect();
    store.append_audit(&records).unwrap();
    assert_eq!(store.oldest_audit_seq().unwrap(), Some(1));
    store.mark_uploaded(2).unwrap();
    let pruned = store.prune_audit(250).unwrap();
    // Uploaded records go first, and only those: nothing is lost.
    assert_eq!(
        pruned,
        Pruned {
            records: 2,
            ..Pruned::default()
        }
    );
    assert_eq!(store.oldest_audit_seq().unwrap(), Some(3));
}

fn request(id: &str, uid: u32, created: i64) -> Request {
    Request {
        id: id.into(),
        uid,
        user: format!("user{uid}"),
        rule_id: "wireshark".into(),
        identity: sha('c'),
        path: "/Applications/Wireshark.app/Contents/MacOS/Wireshark".into(),
        justification: "capture a flaky connection".into(),
        window_start: t(60),
        window_end: t(3600),
        state: RequestState::Pending,
        state_reason: None,
        platform_id: None,
        created_at: t(created),
        updated_at: t(created),
    }
}

fn record(seq: u64, len: usize) -> OutboxRecord {
    OutboxRecord {
        seq,
        hash: format!("{seq:064x}"),
        line: "x".repeat(len),
        uid: None,
    }
}

fn seqs(records: &[OutboxRecord]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

// ---- opening and migrations ------------------------------------------------------

#[test]
fn a_fresh_store_has_the_current_schema_and_private_modes() {
    let (dir, store) = open_temp();
    let version: i64 = store
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mut tables: Vec<String> = store
        .conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    tables.sort();
    assert_eq!(
        tables,
        [
            "admin_sessions",
            "audit_outbox",
            "counters",
            "grants",
            "meta",
            "offline_challenges",
            "policy",
            "requests"
        ]
    );
    let pragma = |name: &str| -> String {
        store
            .conn
            .query_row(&format!("PRAGMA {name}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| format!("{v:?}"))
            .unwrap()
    };
    assert_eq!(pragma("journal_mode"), r#"Text("wal")"#);
    assert_eq!(pragma("synchronous"), "Integer(2)", "FULL");
    assert_eq!(pragma("foreign_keys"), "Integer(1)");
    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&dir.path().join("state/epm.sqlite")), 0o600);
}

#[test]
fn missing_parent_directories_are_all_private() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(&dir.path().join("a/b/epm.sqlite")).unwrap();
    assert_eq!(mode(&dir.path().join("a")), 0o700);
    assert_eq!(mode(&dir.path().join("a/b")), 0o700);
}

#[test]
fn an_existing_world_readable_database_is_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    drop(Store::open(&path).unwrap());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    Store::open(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn reopening_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    {
        let (mut store, _) = Store::open(&path).unwrap();
        store.save_active_policy(&policy(3)).unwrap();
        store.set_meta("k", "v").unwrap();
        store
            .insert_grant(&grant(501, sha('a'), 0, 100, 1))
            .unwrap();
        store.append_audit(&[record(1, 10)]).unwrap();
    }
    let (store, report) = Store::open(&path).unwrap();
    assert!(report.recovered_from.is_none());
    assert_eq!(store.active_policy().unwrap().unwrap().version, 3);
    assert_eq!(store.meta("k").unwrap().as_deref(), Some("v"));
    assert_eq!(store.grants_for(501, t(1)).unwrap().len(), 1);
    assert_eq!(store.last_audit().unwrap().unwrap().0, 1);
}

const CRASH_DB: &str = "EPM_STORE_TEST_CRASH_DB";

/// Run by `a_killed_writer_keeps_every_committed_record` in a child process.
#[test]
#[ignore = "helper: runs in a child process that aborts"]
fn crash_helper_commits_then_aborts() {
    let Some(path) = std::env::var_os(CRASH_DB) else {
        return;
    };
    let (mut store, _) = Store::open(Path::new(&path)).unwrap();
    let batch: Vec<_> = (1..=100).map(|seq| record(seq, 50)).collect();
    store.append_audit(&batch).unwrap();
    store.append_audit(&[record(101, 50)]).unwrap();
    store.save_active_policy(&policy(7)).unwrap();
    // No destructor, no close, no checkpoint: as after SIGKILL.
    std::process::abort();
}

#[test]
fn a_killed_writer_keeps_every_committed_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::crash_helper_commits_then_aborts",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(CRASH_DB, &path)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "the helper should have aborted: {output:?}"
    );
    let wal = std::fs::metadata(dir.path().join("epm.sqlite-wal")).unwrap();
    assert!(wal.len() > 0, "the commits should still be in the log only");

    let (store, report) = Store::open(&path).unwrap();
    assert!(report.recovered_from.is_none());
    assert_eq!(
        store.last_audit().unwrap(),
        Some((101, format!("{:064x}", 101)))
    );
    assert_eq!(store.audit_since(0, 1000).unwrap().len(), 101);
    assert_eq!(store.outbox_stats().unwrap().bytes, 101 * 50);
    assert_eq!(store.active_policy().unwrap().unwrap().version, 7);
}

#[test]
fn migrations_run_in_order_from_any_version_and_keep_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = Connection::open(dir.path().join("m.sqlite")).unwrap();
    let steps = [
        "CREATE TABLE a (x INTEGER)",
        "INSERT INTO a VALUES (1)",
        "ALTER TABLE a ADD COLUMN y TEXT DEFAULT 'new'",
    ];
    let version = |conn: &Connection| -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    };

    assert!(schema::migrate_with(&mut conn, &steps[..2]).is_ok());
    assert_eq!(version(&conn), 2);
    // A later release adds a step: only that one runs.
    assert!(schema::migrate_with(&mut conn, &steps).is_ok());
    assert_eq!(version(&conn), 3);
    let row: (i64, String) = conn
        .query_row("SELECT x, y FROM a", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    assert_eq!(row, (1, "new".into()));
    // Running again changes nothing.
    assert!(schema::migrate_with(&mut conn, &steps).is_ok());
    let count: i64 = conn
        .query_row("SELECT COUNT(*) FROM a", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 1);
}

#[test]
fn a_failing_migration_leaves_the_version_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = Connection::open(dir.path().join("m.sqlite")).unwrap();
    let steps = [
        "CREATE TABLE a (x INTEGER)",
        "CREATE TABLE b (x INTEGER); CREATE TABLE a (x INTEGER)",
    ];
    assert!(matches!(
        schema::migrate_with(&mut conn, &steps),
        Err(schema::MigrateError::Sql(_))
    ));
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
    let b: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name = 'b'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(b, 0, "the failed step was rolled back whole");
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    {
        let (mut store, _) = Store::open(&path).unwrap();
        store.set_meta("written by", "a newer epmd").unwrap();
        store.conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(
        err,
        StoreError::NewerSchema {
            found: 99,
            supported: SCHEMA_VERSION,
            ..
        }
    ));
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains(&format!(
            "schema version 99, newer than this epmd understands ({SCHEMA_VERSION})"
        )),
        "{message}"
    );
    // Not moved aside, not downgraded: still version 99 with its data.
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 99);
    let kept: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'written by'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(kept, "a newer epmd");
    let moved = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("corrupt")
        })
        .count();
    assert_eq!(moved, 0, "nothing moved aside");
}

// ---- policy ---------------------------------------------------------------------

#[test]
fn policy_rotation_keeps_the_last_good() {
    let (_dir, mut store) = open_temp();
    assert!(store.active_policy().unwrap().is_none());
    assert!(store.last_good_policy().unwrap().is_none());
    store.save_active_policy(&policy(1)).unwrap();
    assert_eq!(store.active_policy().unwrap().unwrap(), policy(1));
    assert!(store.last_good_policy().unwrap().is_none());
    store.save_active_policy(&policy(2)).unwrap();
    assert_eq!(store.last_good_policy().unwrap().unwrap(), policy(1));
    store.save_active_policy(&policy(3)).unwrap();
    assert_eq!(store.active_policy().unwrap().unwrap(), policy(3));
    assert_eq!(store.last_good_policy().unwrap().unwrap(), policy(2));
}

#[test]
fn a_policy_version_beyond_sqlite_is_refused_and_nothing_rotates() {
    let (_dir, mut store) = open_temp();
    store.save_active_policy(&policy(1)).unwrap();
    let err = store.save_active_policy(&policy(u64::MAX)).unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    assert_eq!(store.active_policy().unwrap().unwrap(), policy(1));
    assert!(store.last_good_policy().unwrap().is_none());
}

// ---- grants ---------------------------------------------------------------------

#[test]
fn a_grant_is_consumed_inside_its_window_only() {
    let (_dir, mut store) = open_temp();
    let id = store
        .insert_grant(&grant(501, sha('a'), 0, 100, 5))
        .unwrap();
    let consume = |store: &mut Store, at| {
        store
            .consume_grant(501, &sha('a'), "docker", t(at))
            .unwrap()
    };

    assert!(consume(&mut store, -1).is_none(), "before the window");
    assert!(consume(&mut store, 100).is_none(), "at the window's end");
    assert!(consume(&mut store, 150).is_none(), "after the window");
    assert_eq!(store.grant(id).unwrap().unwrap().grant.uses, 5, "untouched");

    let used = consume(&mut store, 0).expect("at the window's start");
    assert_eq!((used.id, used.grant.uses), (id, 4));
    let used = consume(&mut store, 99).expect("just before the end");
    assert_eq!(used.grant.uses, 3);
}

#[test]
fn a_grant_never_matches_another_user_or_binary() {
    let (_dir, mut store) = open_temp();
    store
        .insert_grant(&grant(501, sha('a'), 0, 100, 9))
        .unwrap();
    let cdhash_same_digits = SubjectIdentity {
        kind: IdentityKind::Cdhash,
        value: "a".repeat(40),
    };
    for (uid, identity, what) in [
        (502, sha('a'), "other user"),
        (0, sha('a'), "root"),
        (501, sha('b'), "other binary"),
        (501, cdhash_same_digits, "other identity kind"),
    ] {
        assert!(
            store
                .consume_grant(uid, &identity, "docker", t(10))
                .unwrap()
                .is_none(),
            "{what}"
        );
    }
    // Upper-case hex names the same binary.
    let upper = SubjectIdentity {
        kind: IdentityKind::Sha256,
        value: "A".repeat(64),
    };
    assert!(
        store
            .consume_grant(501, &upper, "docker", t(10))
            .unwrap()
            .is_some()
    );
}

#[test]
fn a_used_up_grant_never_matches_again() {
    let (_dir, mut store) = open_temp();
    let id = store
        .insert_grant(&grant(501, sha('a'), 0, 100, 2))
        .unwrap();
    assert_eq!(
        store
            .consume_grant(501, &sha('a'), "docker", t(10))
            .unwrap()
            .unwrap()
            .grant
            .uses,
        1
    );
    let last = store
        .consume_grant(501, &sha('a'), "docker", t(11))
        .unwrap()
        .unwrap();
    assert_eq!(
        last.grant.uses, 0,
        "the caller learns this was the last use"
    );
    for at in [12, 50, 99] {
        assert!(
            store
                .consume_grant(501, &sha('a'), "docker", t(at))
                .unwrap()
                .is_none()
        );
    }
    assert!(store.grants_for(501, t(12)).unwrap().is_empty());
    assert_eq!(
        store.grant(id).unwrap().unwrap().grant.uses,
        0,
        "kept as a record"
    );
}

#[test]
fn of_several_grants_the_one_ending_soonest_is_used() {
    let (_dir, mut store) = open_temp();
    let long = store
        .insert_grant(&grant(501, sha('a'), 0, 1000, 1))
        .unwrap();
    let short = store
        .insert_grant(&grant(501, sha('a'), 0, 100, 1))
        .unwrap();
    let ids: Vec<i64> = (0..3)
        .filter_map(|i| {
            store
                .consume_grant(501, &sha('a'), "docker", t(10 + i))
                .unwrap()
        })
        .map(|g| g.id)
        .collect();
    assert_eq!(ids, [short, long]);
}

#[test]
fn an_ended_grant_never_matches() {
    let (_dir, mut store) = open_temp();
    let id = store
        .insert_grant(&grant(501, sha('a'), 0, 100, 3))
        .unwrap();
    assert!(store.end_grant(id).unwrap());
    assert!(!store.end_grant(id).unwrap(), "already ended");
    assert!(!store.end_grant(id + 1).unwrap(), "no such grant");
    assert!(
        store
            .consume_grant(501, &sha('a'), "docker", t(10))
            .unwrap()
            .is_none()
    );
}

#[test]
fn grants_for_lists_future_and_current_but_not_ended() {
    let (_dir, mut store) = open_temp();
    store.insert_grant(&grant(501, sha('a'), 0, 10, 1)).unwrap();
    store
        .insert_grant(&grant(501, sha('b'), 50, 60, 1))
        .unwrap();
    store
        .insert_grant(&grant(501, sha('c'), 15, 30, 1))
        .unwrap();
    store
        .insert_grant(&grant(502, sha('d'), 0, 100, 1))
        .unwrap();
    let listed: Vec<_> = store
        .grants_for(501, t(20))
        .unwrap()
        .into_iter()
        .map(|g| g.grant.identity)
        .collect();
    assert_eq!(listed, [sha('c'), sha('b')]);
}

#[test]
fn a_stored_grant_reads_back_as_written() {
    let (_dir, mut store) = open_temp();
    let mut new = grant(501, sha('a'), 0, 100, 1);
    new.source = GrantSource::Approval;
    new.request_id = Some("req-1".into());
    new.identity = SubjectIdentity {
        kind: IdentityKind::Cdhash,
        value: "0123456789ABCDEF0123456789abcdef01234567".into(),
    };
    let before = Timestamp::now();
    let id = store.insert_grant(&new).unwrap();
    let stored = store.grant(id).unwrap().unwrap();
    new.identity.value = new.identity.value.to_ascii_lowercase();
    assert_eq!(stored.grant, new);
    assert!(stored.created_at >= before - jiff::SignedDuration::from_millis(1));
}

#[test]
fn a_grant_must_name_a_digest_a_window_and_a_use() {
    let (_dir, mut store) = open_temp();
    let bad_identities = [
        (IdentityKind::Sha256, "/usr/bin/docker".to_owned()),
        (IdentityKind::Sha256, "a".repeat(63)),
        (IdentityKind::Sha256, "g".repeat(64)),
        (IdentityKind::Cdhash, "a".repeat(64)),
        (IdentityKind::Cdhash, String::new()),
    ];
    for (kind, value) in bad_identities {
        let mut g = grant(501, sha('a'), 0, 100, 1);
        g.identity = SubjectIdentity { kind, value };
        let err = store.insert_grant(&g).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    }
    let err = store
        .insert_grant(&grant(501, sha('a'), 100, 100, 1))
        .unwrap_err();
    assert!(err.to_string().contains("empty window"), "{err}");
    let err = store
        .insert_grant(&grant(501, sha('a'), 0, 100, 0))
        .unwrap_err();
    assert!(err.to_string().contains("at least one use"), "{err}");
    let rows: i64 = store
        .conn
        .query_row("SELECT COUNT(*) FROM grants", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}

// ---- requests -------------------------------------------------------------------

#[test]
fn requests_are_stored_listed_and_unique() {
    let (_dir, mut store) = open_temp();
    let first = request("req-1", 501, 0);
    store.insert_request(&first).unwrap();
    store.insert_request(&request("req-2", 502, 10)).unwrap();
    store.insert_request(&request("req-3", 501, 20)).unwrap();
    assert!(store.insert_request(&first).is_err(), "ids are unique");
    assert_eq!(store.request("req-1").unwrap().unwrap(), first);
    assert!(store.request("nope").unwrap().is_none());

    let ids = |list: Vec<Request>| list.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.requests(None, None).unwrap()),
        ["req-3", "req-2", "req-1"]
    );
    assert_eq!(
        ids(store.requests(Some(501), None).unwrap()),
        ["req-3", "req-1"]
    );
    store
        .set_request_state("req-3", RequestState::Approved, None, t(30))
        .unwrap();
    assert_eq!(
        ids(store.requests(None, Some(RequestState::Pending)).unwrap()),
        ["req-2", "req-1"]
    );
    assert_eq!(
        ids(store
            .requests(Some(501), Some(RequestState::Pending))
            .unwrap()),
        ["req-1"]
    );
    assert!(store.requests(Some(503), None).unwrap().is_empty());

    assert!(
        store
            .set_request_platform_id("req-1", "plat-9", t(40))
            .unwrap()
    );
    let submitted = store.request("req-1").unwrap().unwrap();
    assert_eq!(submitted.platform_id.as_deref(), Some("plat-9"));
    assert_eq!(submitted.updated_at, t(40));
    assert!(!store.set_request_platform_id("nope", "x", t(40)).unwrap());
}

#[test]
fn a_request_must_name_a_digest_and_a_window() {
    let (_dir, mut store) = open_temp();
    let mut by_path = request("req-1", 501, 0);
    by_path.identity.value = "/usr/bin/wireshark".into();
    assert!(matches!(
        store.insert_request(&by_path),
        Err(StoreError::Invalid { .. })
    ));
    let mut empty_window = request("req-2", 501, 0);
    empty_window.window_end = empty_window.window_start;
    assert!(matches!(
        store.insert_request(&empty_window),
        Err(StoreError::Invalid { .. })
    ));
    assert!(matches!(
        store.insert_request(&request("", 501, 0)),
        Err(StoreError::Invalid { .. })
    ));
}

#[test]
fn request_states_follow_their_life() {
    let (_dir, mut store) = open_temp();
    store.insert_request(&request("req-1", 501, 0)).unwrap();
    assert!(
        store
            .set_request_state("req-1", RequestState::Approved, Some("ok by bob"), t(5))
            .unwrap()
    );
    let approved = store.request("req-1").unwrap().unwrap();
    assert_eq!(approved.state, RequestState::Approved);
    assert_eq!(approved.state_reason.as_deref(), Some("ok by bob"));
    assert_eq!(approved.updated_at, t(5));

    // Approved cannot go back to pending or become denied.
    for refused in [
        RequestState::Pending,
        RequestState::Denied,
        RequestState::Approved,
    ] {
        let err = store
            .set_request_state("req-1", refused, None, t(6))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Transition { from: RequestState::Approved, to, .. } if *to == refused),
            "{err}"
        );
    }
    assert_eq!(
        store.request("req-1").unwrap().unwrap(),
        approved,
        "unchanged"
    );

    assert!(
        store
            .set_request_state("req-1", RequestState::Used, None, t(7))
            .unwrap()
    );
    let err = store
        .set_request_state("req-1", RequestState::Revoked, None, t(8))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "store: request req-1 cannot go from used to revoked"
    );
    assert!(
        !store
            .set_request_state("nope", RequestState::Cancelled, None, t(5))
            .unwrap()
    );
}

#[test]
fn the_transition_table() {
    use RequestState::*;
    let allowed = [
        (Pending, Approved),
        (Pending, Denied),
        (Pending, Expired),
        (Pending, Cancelled),
        (Approved, Used),
        (Approved, Revoked),
        (Approved, Expired),
        (Approved, Cancelled),
    ];
    for &from in RequestState::ALL {
        for &to in RequestState::ALL {
            assert_eq!(
                from.can_become(to),
                allowed.contains(&(from, to)),
                "{from} -> {to}"
            );
        }
        let has_next = RequestState::ALL.iter().any(|&to| from.can_become(to));
        assert_eq!(from.is_final(), !has_next, "{from}");
    }
    for &state in RequestState::ALL {
        assert_eq!(state.as_str().parse::<RequestState>().unwrap(), state);
        assert_eq!(
            serde_json::to_string(&state).unwrap(),
            format!("\"{}\"", state.as_str())
        );
    }
    let err = "approve".parse::<RequestState>().unwrap_err();
    assert_eq!(err.to_string(), r#"unknown RequestState "approve""#);
}

#[test]
fn ending_a_request_ends_its_grants_only() {
    let (_dir, mut store) = open_temp();
    store.insert_request(&request("req-1", 501, 0)).unwrap();
    store
        .set_request_state("req-1", RequestState::Approved, None, t(1))
        .unwrap();
    let mut approval = grant(501, sha('c'), 0, 3600, 5);
    approval.source = GrantSource::Approval;
    approval.request_id = Some("req-1".into());
    store.insert_grant(&approval).unwrap();
    store
        .insert_grant(&grant(501, sha('c'), 0, 3600, 1))
        .unwrap();

    store
        .set_request_state("req-1", RequestState::Revoked, Some("wrong binary"), t(2))
        .unwrap();
    let left = store.grants_for(501, t(10)).unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].grant.request_id, None, "the unrelated grant stays");
}

#[test]
fn requests_whose_window_ended_expire_together_with_their_grants() {
    let (_dir, mut store) = open_temp();
    let mut late = request("late", 501, 0);
    late.window_end = t(100);
    let mut approved = request("approved", 501, 1);
    approved.window_end = t(100);
    let mut open_still = request("open", 501, 2);
    open_still.window_end = t(101);
    let mut denied = request("denied", 501, 3);
    denied.window_end = t(100);
    for r in [&late, &approved, &open_still, &denied] {
        store.insert_request(r).unwrap();
    }
    store
        .set_request_state("approved", RequestState::Approved, None, t(5))
        .unwrap();
    store
        .set_request_state("denied", RequestState::Denied, None, t(5))
        .unwrap();
    let mut g = grant(501, sha('c'), 0, 1000, 3);
    g.request_id = Some("approved".into());
    let grant_id = store.insert_grant(&g).unwrap();

    assert!(store.expire_requests(t(99)).unwrap().is_empty());
    assert_eq!(store.expire_requests(t(100)).unwrap(), ["late", "approved"]);
    assert!(store.expire_requests(t(100)).unwrap().is_empty(), "once");
    let expired = store.request("approved").unwrap().unwrap();
    assert_eq!(expired.state, RequestState::Expired);
    assert_eq!(expired.updated_at, t(100));
    assert_eq!(store.grant(grant_id).unwrap().unwrap().grant.uses, 0);
    assert_eq!(
        store.request("open").unwrap().unwrap().state,
        RequestState::Pending
    );
    assert_eq!(
        store.request("denied").unwrap().unwrap().state,
        RequestState::Denied
    );
}

#[test]
fn request_ids_are_random_uuids() {
    let (_dir, store) = open_temp();
    let a = store.new_request_id().unwrap();
    let b = store.new_request_id().unwrap();
    assert_ne!(a, b);
    let parts: Vec<&str> = a.split('-').collect();
    assert_eq!(
        parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
        [8, 4, 4, 4, 12],
        "{a}"
    );
    assert!(
        a.bytes()
            .all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    );
    assert!(parts[2].starts_with('4'), "version 4: {a}");
    assert!(
        matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
        "variant: {a}"
    );
}

// ---- admin sessions -------------------------------------------------------------

fn session(uid: u32, expires: i64) -> NewAdminSession {
    NewAdminSession {
        uid,
        user: format!("user{uid}"),
        group: "admin".into(),
        was_member_before: uid == 503,
        reason: Some("install printer driver".into()),
        started_at: t(0),
        expires_at: t(expires),
        rule_id: Some("helpdesk".into()),
        sudoers_baseline: Some(r#"{"/etc/sudoers":"ab"}"#.into()),
    }
}

#[test]
fn a_v3_database_keeps_its_grants_and_requests_and_takes_admin_session_grants() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.sqlite");
    let digest = "ab".repeat(32);
    {
        let mut conn = Connection::open(&path).unwrap();
        assert!(schema::migrate_with(&mut conn, &schema::MIGRATIONS[..3]).is_ok());
        conn.execute(
            "INSERT INTO grants (uid, user, identity_kind, identity, rule_id, not_before,
                not_after, uses_left, source, created_at, path)
             VALUES (501, 'alice', 'sha256', ?1, 'docker', 0, 99999999999, 1, 'justification', 0, '/usr/bin/docker')",
            [&digest],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO requests (id, uid, user, rule_id, identity_kind, identity, path,
                justification, window_start, window_end, state, created_at, updated_at)
             VALUES ('r1', 501, 'alice', 'nc', 'sha256', ?1, '/usr/bin/nc', 'why', 0, 1, 'pending', 0, 0)",
            [&digest],
        )
        .unwrap();
    }
    let (mut store, _) = Store::open(&path).unwrap();
    let old = SubjectIdentity {
        kind: IdentityKind::Sha256,
        value: digest,
    };
    let kept = store.grants_for_identity(501, &old, 10).unwrap();
    assert_eq!(kept[0].grant.path.as_deref(), Some("/usr/bin/docker"));
    assert_eq!(store.request("r1").unwrap().unwrap().path, "/usr/bin/nc");

    let session = SubjectIdentity {
        kind: IdentityKind::AdminSession,
        value: "30".into(),
    };
    store
        .insert_grant(&grant(501, session.clone(), 0, 600, 1))
        .unwrap();
    assert!(
        store
            .consume_grant(501, &session, "docker", t(1))
            .unwrap()
            .is_some()
    );
    let bad = SubjectIdentity {
        kind: IdentityKind::AdminSession,
        value: "thirty".into(),
    };
    assert!(store.insert_grant(&grant(501, bad, 0, 600, 1)).is_err());
}

#[test]
fn admin_sessions_expire_and_revoke_once() {
    let (_dir, mut store) = open_temp();
    let a = store.insert_admin_session(&session(501, 600)).unwrap();
    let b = store.insert_admin_session(&session(502, 1200)).unwrap();
    let c = store.insert_admin_session(&session(503, 900)).unwrap();
    let ids = |list: Vec<AdminSession>| list.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(store.active_admin_sessions().unwrap()), [a, c, b]);
    assert!(store.expired_admin_sessions(t(599)).unwrap().is_empty());
    assert_eq!(ids(store.expired_admin_sessions(t(600)).unwrap()), [a]);
    assert_eq!(ids(store.expired_admin_sessions(t(900)).unwrap()), [a, c]);

    assert!(store.revoke_admin_session(a, t(901), "expired").unwrap());
    assert!(
        !store.revoke_admin_session(a, t(902), "expired").unwrap(),
        "only once"
    );
    assert!(!store.revoke_admin_session(999, t(902), "expired").unwrap());
    assert_eq!(ids(store.expired_admin_sessions(t(900)).unwrap()), [c]);
    assert_eq!(ids(store.active_admin_sessions().unwrap()), [c, b]);

    let revoked = store.admin_session(a).unwrap().unwrap();
    assert_eq!(revoked.session, session(501, 600));
    assert_eq!(revoked.revoked_at, Some(t(901)));
    assert_eq!(revoked.revoke_reason.as_deref(), Some("expired"));
    let kept = store.active_admin_sessions().unwrap().remove(0);
    assert!(kept.session.was_member_before);
    assert_eq!(kept.revoked_at, None);
}

#[test]
fn an_admin_session_must_end_after_it_starts() {
    let (_dir, mut store) = open_temp();
    assert!(matches!(
        store.insert_admin_session(&session(501, 0)),
        Err(StoreError::Invalid { .. })
    ));
}

// ---- audit outbox ---------------------------------------------------------------

#[test]
fn outbox_append_resume_and_upload() {
    let (_dir, mut store) = open_temp();
    assert_eq!(store.last_audit().unwrap(), None);
    assert_eq!(store.outbox_stats().unwrap(), OutboxStats::default());
    store
        .append_audit(&[record(1, 10), record(2, 10), record(3, 10)])
        .unwrap();
    store.append_audit(&[]).unwrap();
    assert_eq!(
        store.last_audit().unwrap(),
        Some((3, format!("{:064x}", 3)))
    );
    assert_eq!(
        store.audit_since(0, 10).unwrap(),
        [record(1, 10), record(2, 10), record(3, 10)]
    );
    assert_eq!(seqs(&store.audit_since(1, 10).unwrap()), [2, 3]);
    assert_eq!(seqs(&store.audit_since(0, 1).unwrap()), [1]);
    assert!(store.audit_since(3, 10).unwrap().is_empty());
    assert!(store.audit_since(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(
        store.outbox_stats().unwrap(),
        OutboxStats {
            records: 3,
            pending: 3,
            bytes: 30
        }
    );

    assert_eq!(seqs(&store.pending_upload(2).unwrap()), [1, 2]);
    assert_eq!(store.mark_uploaded(2).unwrap(), 2);
    assert_eq!(store.mark_uploaded(2).unwrap(), 0, "already marked");
    assert_eq!(seqs(&store.pending_upload(10).unwrap()), [3]);
    assert_eq!(store.outbox_stats().unwrap().pending, 1);
    assert_eq!(store.mark_uploaded(u64::MAX).unwrap(), 1);
    assert!(store.pending_upload(10).unwrap().is_empty());
}

#[test]
fn a_batch_is_appended_whole_or_not_at_all() {
    let (_dir, mut store) = open_temp();
    store.append_audit(&[record(1, 10), record(2, 10)]).unwrap();
    let err = store
        .append_audit(&[record(3, 10), record(4, 10), record(2, 10)])
        .unwrap_err();
    assert!(err.to_string().contains("audit_outbox"), "{err}");
    assert_eq!(store.last_audit().unwrap().unwrap().0, 2);
    assert_eq!(store.outbox_stats().unwrap().bytes, 20);
    let err = store.append_audit(&[record(u64::MAX, 1)]).unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
}

#[test]
fn outbox_bytes_are_utf8_bytes() {
    let (_dir, mut store) = open_temp();
    let line = r#"{"user":"zoë","reason":"日本"}"#.to_owned();
    store
        .append_audit(&[OutboxRecord {
            seq: 1,
            hash: "h".into(),
            line: line.clone(),
            uid: None,
        }])
        .unwrap();
    assert_eq!(store.outbox_stats().unwrap().bytes, line.len() as u64);
    assert_eq!(store.audit_since(0, 1).unwrap()[0].line, line);
}

fn stored_bytes(store: &Store) -> u64 {
    store
        .conn
        .query_row(
            "SELECT COALESCE(SUM(length(CAST(line AS BLOB))), 0) FROM audit_outbox",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

#[test]
fn pruning_drops_uploaded_records_first_and_respects_the_budget() {
    let (_dir, mut store) = open_temp();
    let records: Vec<_> = (1..=10).map(|seq| record(seq, 100)).collect();
    store.append_audit(&records).unwrap();
    store.mark_uploaded(3).unwrap();

    assert_eq!(
        store.prune_audit(1000).unwrap(),
        Pruned::default(),
        "fits exactly"
    );
    // Two uploaded records are enough.
    assert_eq!(
        store.prune_audit(850).unwrap(),
        Pruned {
            records: 2,
            ..Pruned::default()
        }
    );
    assert_eq!(
        seqs(&store.audit_since(0, 100).unwrap()),
        [3, 4, 5, 6, 7, 8, 9, 10]
    );
    // 800 held, 550 allowed: the last uploaded one, then the two oldest pending.
    assert_eq!(
        store.prune_audit(550).unwrap(),
        Pruned {
            records: 3,
            not_uploaded: 2,
            not_uploaded_by_uid: vec![(None, 2)],
        }
    );
    assert_eq!(seqs(&store.audit_since(0, 100).unwrap()), [6, 7, 8, 9, 10]);
    let stats = store.outbox_stats().unwrap();
    assert_eq!(stats.bytes, 500);
    assert_eq!(
        stats.bytes,
        stored_bytes(&store),
        "the counter matches the rows"
    );
    assert!(stats.bytes <= 550);
}

#[test]
fn pruning_never_drops_the_newest_record() {
    let (_dir, mut store) = open_temp();
    let records: Vec<_> = (1..=5).map(|seq| record(seq, 100)).collect();
    store.append_audit(&records).unwrap();
    store.mark_uploaded(5).unwrap();
    assert_eq!(
        store.prune_audit(0).unwrap(),
        Pruned {
            records: 4,
            ..Pruned::default()
        }
    );
    assert_eq!(
        store.last_audit().unwrap(),
        Some((5, format!("{:064x}", 5)))
    );
    assert_eq!(store.outbox_stats().unwrap().records, 1);
    assert_eq!(store.prune_audit(0).unwrap(), Pruned::default());
    // The chain continues from it.
    store.append_audit(&[record(6, 100)]).unwrap();
    assert_eq!(store.prune_audit(0).unwrap().records, 1);
    assert_eq!(seqs(&store.audit_since(0, 10).unwrap()), [6]);
    assert_eq!(store.outbox_stats().unwrap().bytes, stored_bytes(&store));
}

#[test]
fn a_user_who_floods_the_outbox_loses_their_own_records_first() {
    let (_dir, mut store) = open_temp();
    let of = |seq: u64, uid: Option<u32>| OutboxRecord {
        uid,
        ..record(seq, 100)
    };
    // Others' records, the daemon's, then a flood from uid 1001.
    let mut records = vec![of(1, Some(1000)), of(2, None), of(3, Some(1002))];
    records.extend((4..=20).map(|seq| of(seq, Some(1001))));
    records.push(of(21, Some(1000)));
    store.append_audit(&records).unwrap();
    let pruned = store.prune_audit(1000).unwrap();
    assert_eq!(pruned.not_uploaded, 11);
    assert_eq!(pruned.not_uploaded_by_uid, vec![(Some(1001), 11)]);
    let kept = store.audit_since(0, 100).unwrap();
    for seq in [1, 2, 3, 21] {
        assert!(kept.iter().any(|r| r.seq == seq), "{seq} was pruned");
    }
    assert_eq!(kept.iter().filter(|r| r.uid == Some(1001)).count(), 6);
    // Past the flood, users are levelled down, heaviest first, and the
    // daemon's own records go last.
    let pruned = store.prune_audit(300).unwrap();
    let first = pruned.not_uploaded_by_uid[0];
    assert!(first.0 == Some(1001) && first.1 >= 4, "{pruned:?}");
    assert!(
        !pruned
            .not_uploaded_by_uid
            .iter()
            .any(|(uid, _)| uid.is_none())
    );
    assert!(
        store
            .audit_since(0, 100)
            .unwrap()
            .iter()
            .any(|r| r.seq == 2),
        "the daemon's record stays"
    );
    assert_eq!(store.outbox_stats().unwrap().bytes, stored_bytes(&store));
    assert_eq!(store.outbox_bytes().unwrap(), stored_bytes(&store));
}

#[test]
fn pruning_an_empty_outbox_does_nothing() {
    let (_dir, mut store) = open_temp();
    assert_eq!(store.prune_audit(0).unwrap(), Pruned::default());
}

// ---- meta and errors --------------------------------------------------------------

#[test]
fn meta_values_are_replaced() {
    let (_dir, mut store) = open_temp();
    assert_eq!(store.meta("last_sync").unwrap(), None);
    store.set_meta("last_sync", "1").unwrap();
    store.set_meta("last_sync", "2").unwrap();
    assert_eq!(store.meta("last_sync").unwrap().as_deref(), Some("2"));
}

#[test]
fn enum_names_are_the_same_everywhere() {
    for &kind in IdentityKind::ALL {
        assert_eq!(kind.as_str().parse::<IdentityKind>().unwrap(), kind);
        assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
    }
    for &source in GrantSource::ALL {
        assert_eq!(source.as_str().parse::<GrantSource>().unwrap(), source);
        assert_eq!(
            serde_json::to_string(&source).unwrap(),
            format!("\"{source}\"")
        );
    }
    assert_eq!(GrantSource::OfflineCode.as_str(), "offline_code");
}

#[test]
fn a_bad_stored_value_is_an_error_naming_the_table() {
    let (_dir, mut store) = open_temp();
    store
        .insert_grant(&grant(501, sha('a'), 0, 100, 1))
        .unwrap();
    // Bypass the schema's CHECK as a damaged or hand-edited row would.
    store
        .conn
        .execute_batch("PRAGMA ignore_check_constraints = ON; UPDATE grants SET source = 'bribe'")
        .unwrap();
    let err = store.grants_for(501, t(1)).unwrap_err().to_string();
    assert!(err.contains("read grants"), "{err}");
    assert!(err.contains("bribe"), "{err}");
}

// ---- corruption and unopenable paths -------------------------------------------------

fn assert_recovers(path: &Path) -> Recovery {
    let (mut store, report) = Store::open(path).unwrap();
    let recovery = report
        .recovered_from
        .expect("corruption should be reported");
    assert!(recovery.moved_to.exists(), "{recovery:?}");
    let name = recovery
        .moved_to
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("epm.sqlite.corrupt-"), "{name}");
    assert!(name.ends_with('Z'), "a UTC time: {name}");
    assert!(!recovery.reason.is_empty());

    // The fresh database works and remembers the recovery.
    assert!(store.active_policy().unwrap().is_none(), "fresh");
    store.save_active_policy(&policy(1)).unwrap();
    store.append_audit(&[record(1, 10)]).unwrap();
    let noted: serde_json::Value =
        serde_json::from_str(&store.meta(META_RECOVERED_FROM).unwrap().unwrap()).unwrap();
    assert_eq!(noted["moved_to"], recovery.moved_to.display().to_string());
    assert_eq!(noted["reason"], recovery.reason);
    assert!(noted["at"].as_str().unwrap().ends_with('Z'));
    drop(store);

    let (store, again) = Store::open(path).unwrap();
    assert!(again.recovered_from.is_none(), "recovery happens once");
    assert_eq!(store.last_audit().unwrap().unwrap().0, 1);
    recovery
}

/// A real database with many rows, all in the main file.
fn filled_database(path: &Path) {
    let (mut store, _) = Store::open(path).unwrap();
    let records: Vec<_> = (1..=2000).map(|seq| record(seq, 200)).collect();
    store.append_audit(&records).unwrap();
    for i in 0..200 {
        store.insert_grant(&grant(i, sha('a'), 0, 100, 1)).unwrap();
    }
    store.checkpoint().unwrap();
}

#[test]
fn a_garbage_file_is_moved_aside_with_its_wal_and_shm() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    let garbage = b"this is not a database, it is a shopping list".repeat(100);
    std::fs::write(&path, &garbage).unwrap();
    std::fs::write(dir.path().join("epm.sqlite-wal"), b"old wal").unwrap();
    std::fs::write(dir.path().join("epm.sqlite-shm"), b"old shm").unwrap();
    let recovery = assert_recovers(&path);
    assert!(recovery.reason.contains("not a database"), "{recovery:?}");
    assert_eq!(
        std::fs::read(&recovery.moved_to).unwrap(),
        garbage,
        "kept for forensics"
    );
    // SQLite itself may delete an unusable log when the failed connection
    // closes; either way the old companions are gone from the fresh one.
    for suffix in ["-wal", "-shm"] {
        let companion = dir.path().join(format!("epm.sqlite{suffix}"));
        if let Ok(content) = std::fs::read(&companion) {
            assert!(
                !content.starts_with(b"old "),
                "{suffix} left beside the fresh database"
            );
        }
    }
}

#[test]
fn a_truncated_database_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.sqlite");
    filled_database(&reference);
    let full = std::fs::read(&reference).unwrap();
    // Inside the header, just past it, mid-file, and one page short.
    for keep in [
        50,
        100,
        4096,
        full.len() / 3,
        full.len() / 2 + 100,
        full.len() - 4096,
    ] {
        let sub = dir.path().join(format!("cut-{keep}"));
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("epm.sqlite");
        std::fs::write(&path, &full[..keep]).unwrap();
        assert_recovers(&path);
    }
}

#[test]
fn a_database_with_a_zeroed_page_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    filled_database(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    // Zero pages in the middle: b-tree pages lose their headers.
    file.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
    file.write_all(&[0u8; 4096 * 4]).unwrap();
    drop(file);
    let recovery = assert_recovers(&path);
    assert!(
        recovery.reason.contains("quick_check") || recovery.reason.contains("malformed"),
        "{recovery:?}"
    );
}

#[test]
fn an_empty_file_is_a_new_database_not_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    std::fs::write(&path, b"").unwrap();
    let (_store, report) = Store::open(&path).unwrap();
    assert!(report.recovered_from.is_none());
}

#[test]
fn corruption_errors_say_so() {
    let source = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        None,
    );
    assert!(
        StoreError::Query {
            operation: "x",
            source
        }
        .is_corruption()
    );
    let busy =
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
    assert!(
        !StoreError::Query {
            operation: "x",
            source: busy
        }
        .is_corruption()
    );
}

#[test]
fn a_path_under_a_regular_file_is_a_clear_error_not_a_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    for path in [file.join("epm.sqlite"), file.join("sub/epm.sqlite")] {
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("file.txt"), "{message}");
        assert!(message.contains("Not a directory"), "{message}");
    }
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"x",
        "nothing moved or replaced"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_directory_in_place_of_the_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    std::fs::create_dir(&path).unwrap();
    let message = Store::open(&path).unwrap_err().to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(path.is_dir(), "left alone");
}

#[test]
fn moving_aside_takes_the_log_and_index_along_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epm.sqlite");
    let write_all = || {
        for (suffix, content) in [("", "db"), ("-wal", "wal"), ("-shm", "shm")] {
            std::fs::write(dir.path().join(format!("epm.sqlite{suffix}")), content).unwrap();
        }
    };
    write_all();
    let first = open::move_aside(&path).unwrap();
    write_all();
    let second = open::move_aside(&path).unwrap();
    assert_ne!(first, second, "same second, distinct names");
    for target in [&first, &second] {
        for (suffix, content) in [("", "db"), ("-wal", "wal"), ("-shm", "shm")] {
            let mut moved = target.clone().into_os_string();
            moved.push(suffix);
            assert_eq!(
                std::fs::read_to_string(&moved).unwrap(),
                content,
                "{moved:?}"
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        6,
        "nothing left in place"
    );
}

#[test]
fn a_grant_answers_only_the_rule_that_asked_for_it() {
    let (_dir, mut store) = open_temp();
    store
        .insert_grant(&grant(501, sha('a'), 0, 100, 1))
        .unwrap();
    assert!(
        store
            .consume_grant(501, &sha('a'), "another-rule", t(10))
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .consume_grant(501, &sha('a'), "docker", t(10))
            .unwrap()
            .is_some()
    );
    store
        .insert_grant(&grant(502, sha('b'), 0, 100, 1))
        .unwrap();
    assert_eq!(
        store.all_current_grants(t(10)).unwrap().len(),
        1,
        "only 502's is left"
    );
    let history = store.grants_for_identity(501, &sha('a'), 10).unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].grant.uses, 0, "used up, still listed");
}

// ---- offline challenges ----------------------------------------------------------

#[test]
fn an_offline_challenge_is_answered_once_and_only_inside_its_window() {
    let (_dir, mut store) = open_temp();
    let record = OfflineChallengeRecord {
        nonce: "42".into(),
        uid: 501,
        challenge: "EPM1-abc".into(),
        not_after: t(100),
        created_at: t(0),
    };
    store.insert_offline_challenge(&record).unwrap();
    assert!(
        store.insert_offline_challenge(&record).is_err(),
        "a nonce is unique"
    );
    assert_eq!(
        store.open_offline_challenges(501, t(10)).unwrap(),
        vec![record]
    );
    assert!(
        store
            .open_offline_challenges(502, t(10))
            .unwrap()
            .is_empty(),
        "another user's"
    );
    assert!(
        store
            .open_offline_challenges(501, t(100))
            .unwrap()
            .is_empty(),
        "window over"
    );
    assert!(store.use_offline_challenge("42", t(10)).unwrap());
    assert!(
        !store.use_offline_challenge("42", t(11)).unwrap(),
        "second use refused"
    );
    assert!(
        store
            .open_offline_challenges(501, t(10))
            .unwrap()
            .is_empty()
    );
}
