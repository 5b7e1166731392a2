//! Opening the store: file modes, pragmas, the integrity check, migrations,
//! and moving a corrupt file aside.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::Connection;

use crate::error::{Result, StoreError, is_corruption};
use crate::{Store, schema};

/// The `meta` key holding the last recovery from a corrupt file, as JSON:
/// `{"moved_to": …, "reason": …, "at": …}`.
pub const META_RECOVERED_FROM: &str = "recovered_from";

/// How long a statement waits for a lock held by another connection (only
/// an operator's `sqlite3` could hold one) before failing with "busy".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A corrupt database that was moved aside and replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the corrupt file now is (its `-wal` and `-shm`, if any, sit
    /// beside it with those suffixes).
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub reason: String,
}

/// What happened while opening the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Set when the file was corrupt and a fresh database replaced it.
    pub recovered_from: Option<Recovery>,
}

enum OpenFailure {
    /// The file is damaged: moving it aside and starting afresh helps.
    Corrupt(String),
    /// Anything else: permissions, a newer schema, a full disk. Moving the
    /// file aside would lose data and not help.
    Fatal(StoreError),
}

impl Store {
    /// Opens (creating if needed) the store at `path`. A corrupt file is moved
    /// aside to `<path>.corrupt-<UTC time>` with its `-wal` and `-shm`
    /// files, a fresh database takes its place, and the report and the
    /// fresh database's `meta` table say so. Any other failure is an error
    /// naming the path, and the file is left as it is.
    pub fn open(path: &Path) -> Result<(Store, OpenReport)> {
        prepare_files(path)?;
        let reason = match try_open(path) {
            Ok(store) => return Ok((store, OpenReport::default())),
            Err(OpenFailure::Fatal(error)) => return Err(error),
            Err(OpenFailure::Corrupt(reason)) => reason,
        };
        let moved_to = move_aside(path)?;
        tracing::error!(path = %path.display(), moved_to = %moved_to.display(), %reason,
            "store was corrupt; moved aside and starting with a fresh one");
        prepare_files(path)?;
        let mut store = match try_open(path) {
            Ok(store) => store,
            Err(OpenFailure::Fatal(error)) => return Err(error),
            Err(OpenFailure::Corrupt(reason)) => {
                return Err(StoreError::Io {
                    path: path.to_owned(),
                    what: "fresh database is corrupt too",
                    source: std::io::Error::other(reason),
                });
            }
        };
        let recovery = Recovery { moved_to, reason };
        let record = serde_json::json!({
            "moved_to": recovery.moved_to.display().to_string(),
            "reason": recovery.reason,
            "at": Timestamp::now().to_string(),
        });
        store.set_meta(META_RECOVERED_FROM, &record.to_string())?;
        Ok((
            store,
            OpenReport {
                recovered_from: Some(recovery),
            },
        ))
    }
}

fn try_open(path: &Path) -> std::result::Result<Store, OpenFailure> {
    let classify = |source: rusqlite::Error| {
        if is_corruption(&source) {
            OpenFailure::Corrupt(source.to_string())
        } else {
            OpenFailure::Fatal(StoreError::Open {
                path: path.to_owned(),
                source,
            })
        }
    };
    let conn = Connection::open(path).map_err(classify)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(classify)?;
    // The first statement reads the header: "file is not a database" shows here.
    let journal: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(classify)?;
    if !journal.eq_ignore_ascii_case("wal") {
        tracing::warn!(path = %path.display(), %journal,
            "the store's file system does not support WAL; writes will be slower");
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(classify)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(classify)?;
    if let Some(findings) = integrity_findings(&conn).map_err(classify)? {
        return Err(OpenFailure::Corrupt(format!("quick_check: {findings}")));
    }
    let mut store = Store {
        conn,
        path: path.to_owned(),
    };
    match schema::migrate(&mut store.conn) {
        Ok(()) => Ok(store),
        Err(schema::MigrateError::Newer { found, supported }) => {
            Err(OpenFailure::Fatal(StoreError::NewerSchema {
                path: path.to_owned(),
                found,
                supported,
            }))
        }
        Err(schema::MigrateError::Sql(source)) => Err(classify(source)),
    }
}

/// What `PRAGMA quick_check` found wrong, if anything: it reads every page
/// and b-tree (skipping only `integrity_check`'s index-to-table cross-check).
fn integrity_findings(conn: &Connection) -> rusqlite::Result<Option<String>> {
    let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
    let findings = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if findings.len() == 1 && findings[0] == "ok" {
        Ok(None)
    } else {
        Ok(Some(findings.join("; ")))
    }
}

fn io_error(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { path, what, source }
}

/// Creates the parent directory (0700) and the file (0600) if missing, so
/// that SQLite never creates them with the process umask, and takes group
/// and other access away from an existing database and its `-wal`/`-shm`:
/// they hold users' justifications and the audit trail.
fn prepare_files(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error(parent, "create directory"))?;
        // The umask may have taken bits from the mode asked for.
        std::fs::set_permissions(parent, Permissions::from_mode(0o700))
            .map_err(io_error(parent, "set directory mode"))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path, "create database file"))?;
    for file in companions(path) {
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %file.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "store file was readable by others; setting mode 0600");
            std::fs::set_permissions(&file, Permissions::from_mode(0o600))
                .map_err(io_error(&file, "set file mode"))?;
        }
    }
    Ok(())
}

/// The database file, then its write-ahead log and shared-memory index.
fn companions(path: &Path) -> [PathBuf; 3] {
    ["", "-wal", "-shm"].map(|suffix| with_suffix(path, suffix))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Renames the database and its -wal/-shm companions to
/// `<name>.corrupt-<UTC time>[-wal|-shm]`. The log goes first: a log left
/// beside a fresh, empty database would be replayed into it.
pub(crate) fn move_aside(path: &Path) -> Result<PathBuf> {
    let stamp = Timestamp::now().strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut target = with_suffix(path, &format!(".corrupt-{stamp}"));
    let mut n = 1;
    while companions(&target).iter().any(|p| p.exists()) {
        target = with_suffix(path, &format!(".corrupt-{stamp}-{n}"));
        n += 1;
    }
    for suffix in ["-wal", "-shm", ""] {
        let from = with_suffix(path, suffix);
        if from.exists() {
            std::fs::rename(&from, with_suffix(&target, suffix))
                .map_err(io_error(&from, "move corrupt database aside"))?;
        }
    }
    Ok(target)
}
