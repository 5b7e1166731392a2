//! The client against a real HTTPS server (axum + rustls, a CA made by
//! rcgen) that misbehaves on demand: each misbehaviour must end in its own
//! clear error, within the configured timeout, and never a panic.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use epm_api::agent::{AgentCredentials, AuditUpload, CheckinRequest};
use epm_api::sign::{PolicySigningKey, SignedKind};
use epm_api::{BUNDLE_FORMAT, PolicyBundle, paths};
use epm_sync::{BundleError, ClientOptions, PlatformClient, PolicyFetch, SyncError, accept_bundle};

#[derive(Clone)]
enum Reply {
    Json(u16, String),
    Typed(&'static str, String),
    NotModified,
    /// Headers at once, then one byte every 200 ms, forever.
    Trickle,
    /// A streamed body of this many bytes, with no Content-Length.
    Huge(usize),
}

#[derive(Default)]
struct Seen {
    if_none_match: Option<String>,
    authorization: Option<String>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    replies: Mutex<HashMap<String, Reply>>,
    seen: Mutex<Seen>,
}

struct Server {
    url: String,
    ca: PathBuf,
    shared: Arc<Shared>,
    _dir: tempfile::TempDir,
}

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: axum::extract::Request) -> Response {
    let path = request.uri().path().to_owned();
    // Read before the body's await: a borrow of the request is not Send.
    let header_text = |request: &axum::extract::Request, name| {
        request
            .headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let if_none_match = header_text(&request, header::IF_NONE_MATCH);
    let authorization = header_text(&request, header::AUTHORIZATION);
    let body = axum::body::to_bytes(request.into_body(), 64 << 20)
        .await
        .unwrap_or_default()
        .to_vec();
    *shared.seen.lock().unwrap() = Seen {
        if_none_match,
        authorization,
        body,
    };
    let reply = shared.replies.lock().unwrap().get(&path).cloned();
    let builder = Response::builder();
    match reply {
        None => builder
            .status(404)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                r#"{"error":{"code":"not_found","message":"no such route"}}"#,
            )),
        Some(Reply::Json(status, body)) => builder
            .status(status)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ETAG, "\"e7\"")
            .body(Body::from(body)),
        Some(Reply::Typed(content_type, body)) => builder
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body)),
        Some(Reply::NotModified) => builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()),
        Some(Reply::Trickle) => {
            let stream = futures_util::stream::unfold(0u32, |n| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((Ok::<_, std::io::Error>(vec![b' ']), n + 1))
            });
            builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
        }
        Some(Reply::Huge(size)) => {
            let chunks =
                (0..size.div_ceil(1 << 20)).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1 << 20]));
            builder
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(futures_util::stream::iter(chunks)))
        }
    }
    .unwrap()
}

async fn serve(pki: &Pki) -> Server {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let certs = rustls_pemfile::certs(&mut pki.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut pki.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let shared = Arc::new(Shared::default());
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(shared.clone());
    let server = axum_server::from_tcp_rustls(listener, config);
    tokio::spawn(async move { server.serve(app.into_make_service()).await });
    Server {
        url: format!("https://{addr}"),
        ca,
        shared,
        _dir: dir,
    }
}

impl Server {
    fn reply(&self, path: &str, reply: Reply) {
        self.shared
            .replies
            .lock()
            .unwrap()
            .insert(path.to_owned(), reply);
    }

    fn client(&self) -> PlatformClient {
        PlatformClient::new(
            &self.url,
            &self.ca,
            ClientOptions {
                connect_timeout: Duration::from_secs(2),
                request_timeout: Duration::from_millis(800),
            },
        )
        .unwrap()
    }
}

fn credentials() -> AgentCredentials {
    AgentCredentials {
        agent_id: "agent-1".into(),
        agent_secret: "secret".into(),
        offline_key: "a2V5".into(),
    }
}

fn checkin_json() -> String {
    r#"{"policy":{"version":3,"etag":"\"e3\"","changed":true},"audit_acked_seq":12,"requests":[],"server_time":"2026-11-22T10:00:00Z"}"#.into()
}

fn envelope_json(key: &PolicySigningKey, device: &str, version: u64, policy: &str) -> String {
    let bundle = PolicyBundle {
        format: BUNDLE_FORMAT,
        device_id: device.into(),
        version,
        issued_at: jiff::Timestamp::now(),
        sources: vec![],
        policy: serde_json::value::RawValue::from_string(policy.into()).unwrap(),
    };
    serde_json::to_string(&key.sign(SignedKind::PolicyBundle, &bundle).unwrap()).unwrap()
}

fn deny_nc(version: u64) -> String {
    format!(
        r#"{{"version": {version}, "default_action": "allow", "rules": [{{"id": "no-nc", "action": "deny", "match": {{"name": "nc"}}}}]}}"#
    )
}

#[tokio::test]
async fn a_well_behaved_platform_is_understood() {
    let server = serve(&pki()).await;
    let client = server.client();
    server.reply(paths::AGENT_CHECKIN, Reply::Json(200, checkin_json()));
    let answer = client
        .checkin(&credentials(), &CheckinRequest::default())
        .await
        .unwrap();
    assert_eq!(answer.policy.version, 3);
    assert_eq!(answer.audit_acked_seq, 12);
    let seen = server.shared.seen.lock().unwrap().authorization.clone();
    assert_eq!(seen.as_deref(), Some("Bearer agent-1.secret"));

    server.reply(
        paths::AGENT_AUDIT,
        Reply::Json(200, r#"{"acked_seq":2,"stored":2,"duplicates":0}"#.into()),
    );
    let upload = AuditUpload {
        oldest_kept_seq: 1,
        records: vec![
            serde_json::value::RawValue::from_string(r#"{"seq":1}"#.into()).unwrap(),
            serde_json::value::RawValue::from_string(r#"{"seq":2}"#.into()).unwrap(),
        ],
    };
    let ack = client.upload_audit(&credentials(), &upload).await.unwrap();
    assert_eq!(ack.acked_seq, 2);
    let body = String::from_utf8(server.shared.seen.lock().unwrap().body.clone()).unwrap();
    assert_eq!(
        body,
        r#"{"oldest_kept_seq":1,"records":[{"seq":1},{"seq":2}]}"#
    );

    server.reply(
        paths::AGENT_ROTATE,
        Reply::Json(
            200,
            r#"{"agent_id":"agent-1","agent_secret":"new","offline_key":"a2V5"}"#.into(),
        ),
    );
    let rotated = client.rotate_credentials(&credentials()).await.unwrap();
    assert_eq!(rotated.agent_secret, "new");
    let seen = server.shared.seen.lock().unwrap().authorization.clone();
    assert_eq!(
        seen.as_deref(),
        Some("Bearer agent-1.secret"),
        "sent with the current secret"
    );
}

#[tokio::test]
async fn policy_fetch_sends_the_etag_and_understands_304() {
    let server = serve(&pki()).await;
    let client = server.client();
    let key = PolicySigningKey::generate();
    server.reply(
        paths::AGENT_POLICY,
        Reply::Json(200, envelope_json(&key, "d1", 7, &deny_nc(7))),
    );
    let PolicyFetch::Bundle { envelope, etag } =
        client.fetch_policy(&credentials(), None).await.unwrap()
    else {
        panic!("expected a bundle");
    };
    assert_eq!(etag.as_deref(), Some("\"e7\""));
    let accepted = accept_bundle(&key.public_key().into(), "d1", None, &envelope).unwrap();
    assert_eq!(accepted.version, 7);

    server.reply(paths::AGENT_POLICY, Reply::NotModified);
    let fetched = client
        .fetch_policy(&credentials(), Some("\"e7\""))
        .await
        .unwrap();
    assert!(matches!(fetched, PolicyFetch::NotModified));
    let sent = server.shared.seen.lock().unwrap().if_none_match.clone();
    assert_eq!(sent.as_deref(), Some("\"e7\""));
}

#[tokio::test]
async fn bad_bundles_are_each_refused_with_their_own_reason() {
    let server = serve(&pki()).await;
    let client = server.client();
    let key = PolicySigningKey::generate();
    let other = PolicySigningKey::generate();
    let current = accept_bundle(
        &key.public_key().into(),
        "d1",
        None,
        &serde_json::from_str(&envelope_json(&key, "d1", 5, &deny_nc(5))).unwrap(),
    )
    .unwrap()
    .current();
    let mut tampered: serde_json::Value =
        serde_json::from_str(&envelope_json(&key, "d1", 6, &deny_nc(6))).unwrap();
    tampered["payload"] = tampered["payload"]
        .as_str()
        .unwrap()
        .replace("\"deny\"", "\"allow\"")
        .into();
    type Check = fn(&BundleError) -> bool;
    let cases: Vec<(String, Check)> = vec![
        (tampered.to_string(), |e| {
            matches!(e, BundleError::Signature(_)) && e.to_string().contains("altered or forged")
        }),
        (envelope_json(&other, "d1", 6, &deny_nc(6)), |e| {
            e.to_string()
                .starts_with("bad signature: signed by ed25519:")
        }),
        (envelope_json(&key, "d2", 6, &deny_nc(6)), |e| {
            matches!(e, BundleError::OtherDevice { .. })
        }),
        (envelope_json(&key, "d1", 4, &deny_nc(4)), |e| {
            matches!(
                e,
                BundleError::Rollback {
                    offered: 4,
                    current: 5
                }
            )
        }),
        (
            envelope_json(
                &key,
                "d1",
                6,
                r#"{"version": 6, "rules": [{"id": "x", "action": "deny", "match": {}}]}"#,
            ),
            |e| matches!(e, BundleError::InvalidPolicy(_)),
        ),
    ];
    for (body, expected) in cases {
        server.reply(paths::AGENT_POLICY, Reply::Json(200, body));
        let PolicyFetch::Bundle { envelope, .. } =
            client.fetch_policy(&credentials(), None).await.unwrap()
        else {
            panic!("expected a bundle");
        };
        let err =
            accept_bundle(&key.public_key().into(), "d1", Some(current), &envelope).unwrap_err();
        assert!(expected(&err), "unexpected: {err}");
    }
}

#[tokio::test]
async fn broken_answers_are_each_named() {
    let server = serve(&pki()).await;
    let client = server.client();
    let (credentials, request) = (credentials(), CheckinRequest::default());
    let checkin = || client.checkin(&credentials, &request);

    server.reply(
        paths::AGENT_CHECKIN,
        Reply::Json(200, checkin_json()[..60].into()),
    );
    let err = checkin().await.unwrap_err();
    assert!(matches!(err, SyncError::Truncated { .. }), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "check-in {}/api/v1/agent/checkin: the answer is truncated",
            server.url
        )),
        "{err}"
    );

    server.reply(
        paths::AGENT_CHECKIN,
        Reply::Json(200, "<html>hello</html>".into()),
    );
    let err = checkin().await.unwrap_err();
    assert!(matches!(err, SyncError::InvalidJson { .. }), "{err}");

    server.reply(
        paths::AGENT_CHECKIN,
        Reply::Typed("text/html", checkin_json()),
    );
    let err = checkin().await.unwrap_err();
    assert!(matches!(err, SyncError::ContentType { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("\"text/html\", not application/json"),
        "{err}"
    );

    server.reply(
        paths::AGENT_CHECKIN,
        Reply::Json(
            401,
            r#"{"error":{"code":"unauthorized","message":"unknown agent"}}"#.into(),
        ),
    );
    let err = checkin().await.unwrap_err();
    assert_eq!(err.api_code(), Some("unauthorized"));
    assert_eq!(err.status(), Some(401));
    assert!(
        err.to_string()
            .ends_with("the platform answered 401: unknown agent (unauthorized)"),
        "{err}"
    );

    server.reply(paths::AGENT_CHECKIN, Reply::Json(502, "bad gateway".into()));
    let err = checkin().await.unwrap_err();
    assert!(
        err.to_string()
            .ends_with("the platform answered 502: Bad Gateway: bad gateway"),
        "{err}"
    );
}

#[tokio::test]
async fn an_oversized_answer_is_cut_off() {
    let server = serve(&pki()).await;
    let client = server.client();
    server.reply(paths::AGENT_CHECKIN, Reply::Huge(3 << 20));
    let err = client
        .checkin(&credentials(), &CheckinRequest::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::TooLarge {
                limit: 1_048_576,
                ..
            }
        ),
        "{err}"
    );
    // Content-Length over the limit is refused before reading.
    server.reply(paths::AGENT_CHECKIN, Reply::Json(200, " ".repeat(2 << 20)));
    let err = client
        .checkin(&credentials(), &CheckinRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn a_slow_loris_times_out() {
    let server = serve(&pki()).await;
    let client = server.client();
    server.reply(paths::AGENT_CHECKIN, Reply::Trickle);
    let started = Instant::now();
    let err = client
        .checkin(&credentials(), &CheckinRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains("no complete answer within 0.8s"),
        "{err}"
    );
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let server = serve(&pki()).await;
    // The client pins a different CA than the one that signed the server.
    let other = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("other-ca.pem");
    std::fs::write(&ca, other.ca_pem).unwrap();
    let client = PlatformClient::new(&server.url, &ca, ClientOptions::default()).unwrap();
    let err = client
        .checkin(&credentials(), &CheckinRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Connect { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("cannot connect: invalid peer certificate"),
        "{err}"
    );
}
