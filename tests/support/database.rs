//! Which database an end-to-end platform keeps its state in: its data
//! directory's SQLite file (the default), or, with
//! `EPM_TEST_BACKEND=postgres`, a fresh PostgreSQL database on the server
//! `EPM_TEST_POSTGRES_URL` names, made for one platform and dropped when
//! that platform is. `.ci/run` runs the platform and console suites both
//! ways, so the PostgreSQL path is driven by the same real agents and
//! browser as SQLite.
//!
//! The platform crate's own tests (crates/epm-platform/tests/common) make
//! their databases the same way. The two do not share code: this crate does
//! not link the platform, and a test-helper crate for these few lines would
//! cost more than it saves. Unlike those, a database here is dropped when
//! its platform is, since a CI run starts dozens.

use std::sync::atomic::{AtomicU64, Ordering};

/// The database one platform uses.
#[derive(Debug)]
pub enum TestDatabase {
    /// The data directory's `platform.db` (no `--database`).
    Sqlite,
    /// A database of its own on a PostgreSQL server, dropped with this.
    Postgres {
        /// The server's URL (its `postgres` database): where the database is
        /// created and dropped from.
        server: String,
        /// The new database's name.
        name: String,
        /// The platform's `--database`.
        url: String,
    },
}

/// Whether the suites are asked to run on PostgreSQL.
pub fn postgres_wanted() -> bool {
    std::env::var("EPM_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

impl TestDatabase {
    /// SQLite, or (with `EPM_TEST_BACKEND=postgres`) a new PostgreSQL
    /// database. Asked for PostgreSQL, a missing or unreachable server is a
    /// failure whatever `EPM_E2E` says: silently testing SQLite instead
    /// would report the PostgreSQL path as tested.
    pub fn for_a_platform() -> TestDatabase {
        if !postgres_wanted() {
            return TestDatabase::Sqlite;
        }
        let server = match std::env::var("EPM_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => panic!(
                "EPM_TEST_BACKEND=postgres needs EPM_TEST_POSTGRES_URL \
                 (postgres://USER@HOST:PORT/postgres); .ci/run starts one"
            ),
        };
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "epm_e2e_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // A leftover of an earlier process with the same id (ids are reused)
        // would otherwise fail CREATE.
        execute(
            &server,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name}"),
        )
        .unwrap_or_else(|e| panic!("PostgreSQL at {server}: cannot create {name}: {e}"));
        let url = with_database(&server, &name);
        TestDatabase::Postgres { server, name, url }
    }

    /// The platform's `--database` value, `None` for the SQLite default.
    pub fn url(&self) -> Option<&str> {
        match self {
            TestDatabase::Sqlite => None,
            TestDatabase::Postgres { url, .. } => Some(url),
        }
    }

    /// Sets `EPM_PLATFORM_DATABASE` on a platform command (serve and the
    /// offline admin commands read it), or removes an inherited one so
    /// SQLite really is the data directory's file.
    pub fn apply(&self, command: &mut std::process::Command) {
        match self.url() {
            Some(url) => command.env("EPM_PLATFORM_DATABASE", url),
            None => command.env_remove("EPM_PLATFORM_DATABASE"),
        };
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let TestDatabase::Postgres { server, name, .. } = self {
            // FORCE: a platform killed with SIGKILL may leave its sessions
            // for a moment. A failure here only leaks a test database.
            if let Err(e) = execute(
                server,
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            ) {
                eprintln!("could not drop the test database {name}: {e}");
            }
        }
    }
}

/// Runs `sql` on `server` from a thread of its own (callers may be inside a
/// tokio runtime, where blocking on another one panics).
fn execute(server: &str, sql: &str) -> Result<(), String> {
    let server = server.to_owned();
    let sql = sql.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(connection);
            // One statement at a time: DROP/CREATE DATABASE cannot run in
            // the implicit transaction of a multi-statement batch.
            for statement in sql.split("; ") {
                client
                    .batch_execute(statement)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            drop(client);
            let _ = driver.await;
            Ok(())
        })
    })
    .join()
    .map_err(|_| "the PostgreSQL thread panicked".to_owned())?
}

/// `url` with its database (the path) replaced by `name`, keeping any
/// `?options`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn the_database_is_replaced_and_options_kept() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:55433/postgres", "x"),
            "postgres://postgres@127.0.0.1:55433/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
