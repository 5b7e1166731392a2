//! Which database the platform's tests run on: SQLite in the data
//! directory (the default), or PostgreSQL when `EPM_TEST_BACKEND=postgres`,
//! one fresh database per test platform on the server
//! `EPM_TEST_POSTGRES_URL` names (.ci/run starts one). With `EPM_E2E=1` a
//! missing server is a failure, not a skip.
#![allow(dead_code, clippy::unwrap_used, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use epm_api::paths;
use epm_platform::db::Db;
use epm_platform::keys::DataDir;
use epm_platform::server::{self, AppState};

/// Whether the tests are asked to run on PostgreSQL.
pub fn postgres_wanted() -> bool {
    std::env::var("EPM_TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The PostgreSQL server for tests that need one; `None` (skip) when there
/// is none, except under EPM_E2E=1 where that fails the test.
pub fn postgres_server() -> Option<String> {
    match std::env::var("EPM_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("EPM_E2E").as_deref() != Ok("1"),
                "EPM_E2E=1 and no PostgreSQL: set EPM_TEST_POSTGRES_URL (postgres://USER@HOST:PORT/postgres); .ci/run starts one"
            );
            eprintln!("skipped: no EPM_TEST_POSTGRES_URL");
            None
        }
    }
}

/// A new, empty database on the test server; its URL.
pub fn fresh_postgres_database(server: &str) -> String {
    let name = format!("epm_test_{}_{}", std::process::id(), rand_suffix());
    let url = server.to_owned();
    let create = name.clone();
    std::thread::spawn(move || {
        let server = url;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {server}: {e}"));
            tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE DATABASE {create}"))
                .await
                .unwrap();
        });
    })
    .join()
    .unwrap();
    with_database(server, &name)
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|j| start + j))
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The database a test platform on `data` uses: its SQLite file, or (with
/// EPM_TEST_BACKEND=postgres) a PostgreSQL database made for this data
/// directory the first time and found again after (a restart on the same
/// data keeps its state).
pub fn database_url(data: &DataDir) -> Option<String> {
    if !postgres_wanted() {
        return Some(format!("sqlite://{}", data.database().display()));
    }
    let marker = data.file("test-postgres-url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return Some(url);
    }
    // Asked for PostgreSQL: without a server that is a failure.
    let server = std::env::var("EPM_TEST_POSTGRES_URL")
        .expect("EPM_TEST_BACKEND=postgres needs EPM_TEST_POSTGRES_URL");
    let url = fresh_postgres_database(&server);
    std::fs::write(&marker, &url).unwrap();
    Some(url)
}

/// Opens the test platform's database.
pub fn open_db(data: &DataDir) -> Db {
    let url = database_url(data).expect("a database");
    Db::open_url(&url).unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// A platform server running in this test's runtime over HTTPS on a free
/// local port, and a client trusting its CA.
pub struct Server {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Trusts the data directory's CA only.
    pub http: reqwest::Client,
    /// Shuts the server down.
    pub handle: axum_server::Handle,
    /// The server's state (its database, limits).
    pub state: Arc<AppState>,
}

/// Starts a server on `db` with `data`'s keys (made beforehand with
/// `ensure_keys`) and waits until it answers.
pub async fn start_server(data: &DataDir, db: Db) -> Server {
    let tls = epm_platform::tls_config(&data.file("server.pem"), &data.file("server-key.pem"))
        .await
        .unwrap();
    let state = AppState::new(db, data.signing_key().unwrap());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let handle = axum_server::Handle::new();
    tokio::spawn(server::serve(state.clone(), addr, tls, handle.clone()));
    let ca = reqwest::Certificate::from_pem(&std::fs::read(data.ca_cert()).unwrap()).unwrap();
    let http = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://127.0.0.1:{}", addr.port());
    for _ in 0..200 {
        if http
            .get(format!("{url}{}", paths::HEALTH))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server {
        url,
        http,
        handle,
        state,
    }
}
