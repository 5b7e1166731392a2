//! `epm-platform serve`: the HTTPS server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use epm_platform::limits::Limits;
use epm_platform::server::{self, AppState};

use super::{Failure, Remote, data_dir, open_db, other, parse_duration};

#[derive(Debug, Args)]
pub(super) struct Serve {
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Open connections in all; past it the connection idle the longest
    /// is closed, and a new one is refused only when all are busy.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Open connections from one address (IPv6: one /64).
    #[arg(long, default_value_t = Limits::default().max_connections_per_client)]
    max_connections_per_client: usize,
    /// Close a connection with no request in flight for this long: 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Calls per second from one address (bursts of twice that; 0: no limit).
    #[arg(long, default_value_t = Limits::default().calls_per_second_per_client)]
    calls_per_second_per_client: u32,
    /// Calls per second by one agent or admin (bursts of six times that; 0:
    /// no limit).
    #[arg(long, default_value_t = Limits::default().calls_per_second_per_identity)]
    calls_per_second_per_identity: u32,
    /// Audit records one agent may upload per hour.
    #[arg(long, default_value_t = Limits::default().audit_records_per_hour)]
    audit_records_per_hour: u32,
    /// Audit MiB one agent may upload per hour.
    #[arg(long, default_value_t = Limits::default().audit_mib_per_hour)]
    audit_mib_per_hour: u32,
    /// Offline challenges one admin may answer per hour.
    #[arg(long, default_value_t = Limits::default().offline_codes_per_hour)]
    offline_codes_per_hour: u32,
    /// How far ahead a requested window may start: 30d, 12h.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    max_window_lead: Duration,
    /// A console session unused this long ends: 30m.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    session_idle_timeout: Duration,
    /// A console session ends this long after sign-in: 12h.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    session_lifetime: Duration,
    /// Failed console sign-ins one account may have per 15 minutes before
    /// it is locked for the rest of them (0: no limit).
    #[arg(long, default_value_t = Limits::default().sign_in_failures_per_account)]
    sign_in_failures_per_account: u32,
    /// Failed console sign-ins from one address per 15 minutes (0: no
    /// limit).
    #[arg(long, default_value_t = Limits::default().sign_in_failures_per_address)]
    sign_in_failures_per_address: u32,
    /// The console's address as approvers reach it, for the links in
    /// webhook bodies (default: https://<first --hostname>:<port>).
    #[arg(long)]
    console_url: Option<String>,
    /// Names (and IP addresses) in the generated server certificate; repeat
    /// for several. Used only when the certificate is first made.
    #[arg(long = "hostname", default_values = ["localhost", "127.0.0.1"])]
    hostnames: Vec<String>,
    /// Use this certificate (PEM chain) instead of the generated one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub(super) async fn run(remote: &Remote, serve: Serve) -> Result<(), Failure> {
    let data = data_dir(remote)?;
    if data.ensure_keys(&serve.hostnames).map_err(other)? {
        eprintln!(
            "epm-platform: made a CA, a server certificate for {} and a signing key in {}; give agents ca.pem and the content of signing-key.pub",
            serve.hostnames.join(", "),
            data.dir.display()
        );
    }
    let (cert, key): (PathBuf, PathBuf) = match (&serve.tls_cert, &serve.tls_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => (data.file("server.pem"), data.file("server-key.pem")),
    };
    let tls = epm_platform::tls_config(&cert, &key).await.map_err(other)?;
    let db = open_db(remote, &data)?;
    let limits = Limits {
        max_connections: serve.max_connections,
        max_connections_per_client: serve.max_connections_per_client,
        idle_timeout: serve.idle_timeout,
        calls_per_second_per_client: serve.calls_per_second_per_client,
        calls_per_second_per_identity: serve.calls_per_second_per_identity,
        audit_records_per_hour: serve.audit_records_per_hour,
        audit_mib_per_hour: serve.audit_mib_per_hour,
        offline_codes_per_hour: serve.offline_codes_per_hour,
        max_window_lead: serve.max_window_lead,
        session_idle: serve.session_idle_timeout,
        session_lifetime: serve.session_lifetime,
        sign_in_failures_per_account: serve.sign_in_failures_per_account,
        sign_in_failures_per_address: serve.sign_in_failures_per_address,
        ..Limits::default()
    };
    let console_url = serve.console_url.clone().unwrap_or_else(|| {
        let host = serve.hostnames.first().map_or("localhost", String::as_str);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        format!("https://{host}:{}", serve.listen.port())
    });
    db.set_console_url(&console_url);
    let state = AppState::with_limits(db, data.signing_key().map_err(other)?, limits);
    let handle = axum_server::Handle::new();
    let shutdown = handle.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        shutdown.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    tracing::info!(
        "serving https://{} (data {}, {} database); the console is at {console_url}/console/",
        serve.listen,
        data.dir.display(),
        state.db.kind()
    );
    server::serve(state, serve.listen, tls, handle)
        .await
        .map_err(|e| other(format!("cannot serve on {}: {e}", serve.listen)))
}
