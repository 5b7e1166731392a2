use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::thread;

use proptest::prelude::*;

use std::os::unix::net::UnixStream;

use super::*;
use crate::endpoint::Endpoint;
use crate::frame::{MAX_FRAME_BYTES, write_frame};
use crate::message::tests::{sample_requests, sample_responses};
use crate::transport::fds::FD_MARKER;
use crate::transport::unix::{Connection, peer_credentials};

/// The client's socket, to write what a real client never would (on a
/// Unix socket, the readiness descriptor is the socket).
fn raw_stream(client: &Client) -> UnixStream {
    UnixStream::from(client.readiness().try_clone_to_owned().unwrap())
}

/// A socket in a fresh directory.
fn bind() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epmd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// A daemon serving one connection the way `epmd` does: `status` → `end`,
/// `policy_show` → a policy, anything it does not know → `unsupported`.
/// Returns what it was asked, or why it closed the connection.
fn serve_one(listener: UnixListener) -> thread::JoinHandle<Result<Vec<Incoming>, ServerError>> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().map_err(FrameError::Io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut conn = ServerConnection::accept(stream, "test", |p| p.uid == 0)?;
        let mut seen = Vec::new();
        while let Some(incoming) = conn.next_request()? {
            let reply = match &incoming {
                Incoming::Request(Request::Status) => Response::End,
                Incoming::Request(_) => Response::error(ErrorCode::NotFound, "nothing"),
                Incoming::Unsupported(kind) => {
                    Response::error(ErrorCode::Unsupported, format!("unknown request {kind}"))
                }
            };
            seen.push(incoming);
            conn.send(&reply)?;
        }
        Ok(seen)
    })
}

/// A fake daemon that answers the hello with `welcome`.
fn fake_daemon(listener: UnixListener, welcome: Response) -> thread::JoinHandle<Option<Vec<u8>>> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Connection::new(stream);
        let hello = conn.recv_frame().unwrap();
        conn.send(&welcome).unwrap();
        hello
    })
}

/// A raw client that has said hello.
fn raw_client(path: &Path) -> Connection {
    let mut conn = Connection::new(UnixStream::connect(path).unwrap());
    conn.set_timeouts(Some(Duration::from_secs(10)), Some(Duration::from_secs(10)))
        .unwrap();
    conn.send(&Request::Hello {
        protocol: PROTOCOL_VERSION,
        client: "raw".into(),
    })
    .unwrap();
    assert!(matches!(
        conn.recv::<Response>().unwrap(),
        Some(Response::Welcome { .. })
    ));
    conn
}

fn ours() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

#[test]
fn handshake_reports_our_credentials_and_serves_requests() {
    let (_dir, path, listener) = bind();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = ServerConnection::accept(stream, "9.9.9", |_| true).unwrap();
        let request = conn.next_request().unwrap();
        conn.send(&Response::End).unwrap();
        assert_eq!(conn.next_request().unwrap(), None, "clean close");
        (conn.peer, conn.client.clone(), request)
    });
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test-client 1.0").unwrap();
    let (uid, gid) = ours();
    assert_eq!(client.uid, uid);
    assert!(client.is_admin, "as the closure said");
    assert_eq!(client.daemon_version, "9.9.9");
    assert_eq!(client.call(&Request::Status).unwrap(), Response::End);
    let daemon = client.daemon_credentials().unwrap();
    assert_eq!((daemon.uid, daemon.gid), (uid, gid));
    drop(client);

    let (peer, name, request) = server.join().unwrap();
    assert_eq!((peer.uid, peer.gid), (uid, gid));
    if cfg!(any(target_os = "linux", target_os = "macos")) {
        assert_eq!(peer.pid, Some(std::process::id()));
    }
    assert_eq!(name, "test-client 1.0");
    assert_eq!(request, Some(Incoming::Request(Request::Status)));
}

#[test]
fn peer_credentials_of_a_socketpair_are_ours() {
    let (a, b) = UnixStream::pair().unwrap();
    let (uid, gid) = ours();
    for end in [&a, &b] {
        let cred = peer_credentials(end).unwrap();
        assert_eq!((cred.uid, cred.gid), (uid, gid));
        if cfg!(any(target_os = "linux", target_os = "macos")) {
            assert_eq!(cred.pid, Some(std::process::id()));
        }
    }
}

#[test]
fn every_request_and_response_crosses_a_socket() {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut a, mut b) = (Connection::new(a), Connection::new(b));
    for request in sample_requests() {
        a.send(&request).unwrap();
        assert_eq!(b.recv::<Request>().unwrap(), Some(request));
    }
    for response in sample_responses() {
        b.send(&response).unwrap();
        assert_eq!(a.recv::<Response>().unwrap(), Some(response));
    }
    drop(b);
    assert_eq!(a.recv::<Response>().unwrap(), None);
}

#[test]
fn unknown_request_types_are_unsupported_not_fatal() {
    let (_dir, path, listener) = bind();
    let server = serve_one(listener);
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test").unwrap();
    write_frame(
        &mut raw_stream(&client),
        br#"{"type":"grant_sudo","minutes":5}"#,
    )
    .unwrap();
    let err = client.recv().unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Daemon {
                code: ErrorCode::Unsupported,
                message,
            } if message == "unknown request grant_sudo"
        ),
        "{err}"
    );
    assert_eq!(
        client.call(&Request::Status).unwrap(),
        Response::End,
        "still connected"
    );
    drop(client);
    let seen = server.join().unwrap().unwrap();
    assert_eq!(
        seen,
        [
            Incoming::Unsupported("grant_sudo".into()),
            Incoming::Request(Request::Status)
        ]
    );
}

#[test]
fn an_invalid_request_is_answered_bad_request_and_the_connection_stays() {
    let (_dir, path, listener) = bind();
    let server = serve_one(listener);
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test").unwrap();
    write_frame(
        &mut raw_stream(&client),
        br#"{"type":"audit_tail","lines":5,"follow":false,"usr":"bob"}"#,
    )
    .unwrap();
    let err = client.recv().unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Daemon {
                code: ErrorCode::BadRequest,
                message,
            } if message.starts_with("invalid audit_tail message: unknown field `usr`")
        ),
        "{err}"
    );
    assert_eq!(client.call(&Request::Status).unwrap(), Response::End);
    drop(client);
    assert_eq!(
        server.join().unwrap().unwrap(),
        [Incoming::Request(Request::Status)],
        "the daemon never saw the invalid request"
    );
}

#[test]
fn a_request_before_hello_closes_the_connection() {
    for (first, named) in [
        (&br#"{"type":"status"}"#[..], "status before hello"),
        (br#"{"type":"grant_sudo"}"#, "\"grant_sudo\" before hello"),
    ] {
        let (_dir, path, listener) = bind();
        let server = serve_one(listener);
        let mut conn = Connection::new(UnixStream::connect(&path).unwrap());
        write_frame(&mut conn.stream(), first).unwrap();
        let err = server.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, ServerError::OutOfOrder(what) if what == named),
            "{err}"
        );
        assert_eq!(
            conn.recv::<Response>().unwrap(),
            Some(Response::error(
                ErrorCode::BadRequest,
                format!("out of order: {named}")
            ))
        );
        assert!(matches!(conn.recv::<Response>(), Ok(None) | Err(_)));
    }
}

#[test]
fn a_second_hello_closes_the_connection() {
    let (_dir, path, listener) = bind();
    let server = serve_one(listener);
    let mut conn = raw_client(&path);
    conn.send(&Request::Hello {
        protocol: 1,
        client: "again".into(),
    })
    .unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert_eq!(err.to_string(), "out of order: a second hello");
}

#[test]
fn a_client_that_leaves_before_hello_is_named() {
    let (_dir, path, listener) = bind();
    let server = serve_one(listener);
    drop(UnixStream::connect(&path).unwrap());
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::ClosedBeforeHello)
    ));
}

#[test]
fn a_version_mismatch_is_explained_to_the_client() {
    for hello in [
        &br#"{"type":"hello","protocol":99,"client":"future"}"#[..],
        // A future hello with fields this daemon does not know.
        br#"{"type":"hello","protocol":99,"client":"future","features":["x"]}"#,
    ] {
        let (_dir, path, listener) = bind();
        let server = serve_one(listener);
        let mut conn = Connection::new(UnixStream::connect(&path).unwrap());
        write_frame(&mut conn.stream(), hello).unwrap();
        assert_eq!(
            conn.recv::<Response>().unwrap(),
            Some(Response::error(
                ErrorCode::VersionMismatch,
                "this epmd speaks protocol 1, the client 99"
            ))
        );
        let err = server.join().unwrap().unwrap_err();
        assert!(matches!(err, ServerError::VersionMismatch(99)), "{err}");
        assert_eq!(err.to_string(), "client protocol 99 is not 1");
    }
}

#[test]
fn a_malformed_hello_is_a_bad_request() {
    let (_dir, path, listener) = bind();
    let server = serve_one(listener);
    let mut conn = Connection::new(UnixStream::connect(&path).unwrap());
    write_frame(
        &mut conn.stream(),
        br#"{"type":"hello","protocol":1,"client":"x","extra":true}"#,
    )
    .unwrap();
    let Some(Response::Error { code, message }) = conn.recv::<Response>().unwrap() else {
        panic!("no error");
    };
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.starts_with("invalid hello message: unknown field `extra`"));
    assert!(matches!(
        server.join().unwrap(),
        Err(ServerError::Frame(FrameError::Invalid { .. }))
    ));
}

#[test]
fn the_client_names_a_version_mismatch() {
    // The daemon refuses our hello.
    let (_dir, path, listener) = bind();
    let daemon = fake_daemon(
        listener,
        Response::error(
            ErrorCode::VersionMismatch,
            "this epmd speaks protocol 2, the client 1",
        ),
    );
    let err = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::VersionMismatch {
                daemon: None,
                client: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "epmd and this client (protocol 1) cannot talk: this epmd speaks protocol 2, \
         the client 1; upgrade the older one"
    );
    let hello = daemon.join().unwrap().unwrap();
    assert_eq!(
        decode::<Request>(&hello).unwrap(),
        Request::Hello {
            protocol: 1,
            client: "t".into()
        }
    );

    // The daemon welcomes us, in another version.
    let (_dir, path, listener) = bind();
    let daemon = fake_daemon(
        listener,
        Response::Welcome {
            protocol: 2,
            daemon_version: "2.0.0".into(),
            uid: 0,
            is_admin: true,
        },
    );
    let err = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::VersionMismatch {
                daemon: Some(2),
                ..
            }
        ),
        "{err}"
    );
    daemon.join().unwrap();

    // Something else than a welcome.
    let (_dir, path, listener) = bind();
    let daemon = fake_daemon(listener, Response::End);
    let err = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected answer from epmd: end instead of welcome"
    );
    daemon.join().unwrap();
}

#[test]
fn garbage_and_oversized_frames_end_only_that_connection() {
    for (bad, why) in [
        (
            b"\x00\x00\x00\x05hello".to_vec(),
            "frame is not JSON: expected value at line 1 column 1",
        ),
        (
            b"\xff\xff\xff\xff".to_vec(),
            "frame of 4294967295 bytes is over the limit of 1048576",
        ),
        (
            b"\x00\x00\x00\x02{}".to_vec(),
            "frame is not a message: it has no \"type\"",
        ),
        (
            b"\x00\x00\x00\x0a[\"status\"]".to_vec(),
            "frame is not a message: it is a JSON array, not an object",
        ),
    ] {
        let (_dir, path, listener) = bind();
        let server = serve_one(listener);
        let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test").unwrap();
        raw_stream(&client).write_all(&bad).unwrap();
        let err = server.join().unwrap().unwrap_err();
        assert_eq!(err.to_string(), why);
        let told = client.recv().unwrap_err();
        assert_eq!(told.to_string(), format!("epmd: {why}"));
        assert!(
            matches!(client.recv(), Err(ClientError::Closed)),
            "the daemon closed this connection"
        );
        // The listener is gone with the thread; a daemon would go on
        // accepting: nothing here is shared between connections.
    }
}

#[test]
fn large_audit_batches_are_split_to_fit_frames() {
    let (a, b) = UnixStream::pair().unwrap();
    // The server's `accept` needs a hello first.
    let mut client = Connection::new(a);
    client
        .send(&Request::Hello {
            protocol: 1,
            client: "t".into(),
        })
        .unwrap();
    let lines: Vec<String> = (0..3000)
        .map(|i| format!("{{\"seq\":{i},\"pad\":\"{}\"}}", "x".repeat(1000)))
        .collect();
    let expected = lines.clone();
    let server = thread::spawn(move || {
        let mut conn = ServerConnection::accept(b, "t", |_| false).unwrap();
        conn.send(&Response::AuditRecords { lines }).unwrap();
        conn.send(&Response::End).unwrap();
    });
    let mut got = Vec::new();
    let mut frames = 0;
    assert!(matches!(
        client.recv::<Response>().unwrap(),
        Some(Response::Welcome { .. })
    ));
    loop {
        let frame = client.recv_frame().unwrap().unwrap();
        assert!(frame.len() <= MAX_FRAME_BYTES);
        match decode::<Response>(&frame).unwrap() {
            Response::AuditRecords { lines } => {
                frames += 1;
                got.extend(lines);
            }
            Response::End => break,
            other => panic!("{other:?}"),
        }
    }
    server.join().unwrap();
    assert_eq!(got, expected, "every line, in order");
    assert!((3..=8).contains(&frames), "{frames} frames for ~3 MB");
}

#[test]
fn an_answer_too_large_becomes_an_error_the_client_sees() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut client = Connection::new(a);
    client
        .send(&Request::Hello {
            protocol: 1,
            client: "t".into(),
        })
        .unwrap();
    let server = thread::spawn(move || {
        let mut conn = ServerConnection::accept(b, "t", |_| false).unwrap();
        let policy = Response::Policy(crate::PolicyInfo {
            source: "store".into(),
            version: 1,
            rule_count: 1,
            loaded_at: "2026-11-22T10:00:00Z".into(),
            document: Some("x".repeat(2 * MAX_FRAME_BYTES)),
        });
        conn.send(&policy).unwrap_err()
    });
    client.recv::<Response>().unwrap();
    let Some(Response::Error { code, message }) = client.recv::<Response>().unwrap() else {
        panic!("no error");
    };
    assert_eq!(code, ErrorCode::Internal);
    assert!(
        message.starts_with("the policy answer is too large: frame of 2097"),
        "{message}"
    );
    assert!(matches!(
        server.join().unwrap(),
        ServerError::Frame(FrameError::Oversized { .. })
    ));
}

#[test]
fn connecting_to_nothing_says_the_daemon_is_not_running() {
    let err = Client::connect(&Endpoint::Socket("/nonexistent/epmd.sock".into()), "t").unwrap_err();
    assert_eq!(
        err.to_string(),
        "epmd is not running (no socket at /nonexistent/epmd.sock); start it, or pass --socket PATH"
    );

    let (_dir, path, listener) = bind();
    drop(listener);
    let err = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap_err();
    assert!(matches!(err, ClientError::Refused(_)), "{err}");
    assert!(err.to_string().contains("a stale socket?"), "{err}");
}

#[test]
fn a_daemon_that_hangs_up_is_closed_not_a_broken_pipe() {
    let (_dir, path, listener) = bind();
    let daemon = thread::spawn(move || drop(listener.accept().unwrap()));
    let err = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap_err();
    daemon.join().unwrap();
    assert!(matches!(err, ClientError::Closed), "{err}");
    assert_eq!(err.to_string(), "epmd closed the connection");
}

#[test]
fn a_silent_daemon_times_out() {
    let (_dir, path, listener) = bind();
    let server = serve_one(listener);
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap();
    client.set_timeout(Some(Duration::from_millis(50))).unwrap();
    // Nothing was asked, so nothing comes.
    let err = client.recv().unwrap_err();
    assert_eq!(
        err.to_string(),
        "talking to epmd: timed out waiting for the other side"
    );
    drop(client);
    server.join().unwrap().unwrap();
}

#[test]
fn a_permission_denied_socket_is_named() {
    use std::os::unix::fs::PermissionsExt;
    if nix::unistd::geteuid().is_root() {
        // Root passes every permission check; nothing to see.
        return;
    }
    let (dir, path, _listener) = bind();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    let err = Client::connect(&Endpoint::Socket(path.clone()), "t").unwrap_err();
    assert!(matches!(err, ClientError::PermissionDenied(_)), "{err}");
    drop(dir);
}

/// Drives a server connection over bytes from a client that then closes;
/// returns how it ended. A timeout would mean the server hung.
fn serve_bytes(bytes: Vec<u8>) -> Result<usize, String> {
    let (a, b) = UnixStream::pair().unwrap();
    let writer = thread::spawn(move || {
        let mut a = a;
        let _ = a.write_all(&bytes);
    });
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let outcome = (|| {
        let mut conn = ServerConnection::accept(b, "t", |_| false)?;
        let mut requests = 0;
        while let Some(incoming) = conn.next_request()? {
            requests += 1;
            if let Incoming::Unsupported(_) = incoming {
                conn.send(&Response::error(ErrorCode::Unsupported, "no"))?;
            }
        }
        Ok::<_, ServerError>(requests)
    })();
    writer.join().unwrap();
    match outcome {
        Err(ServerError::Frame(FrameError::TimedOut)) => panic!("the server hung"),
        other => other.map_err(|e| e.to_string()),
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, body).unwrap();
    out
}

/// Frame bodies a fuzzer should try: valid requests, mangled ones, noise.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let valid: Vec<Vec<u8>> = sample_requests()
        .iter()
        .map(|r| encode(r).unwrap())
        .collect();
    prop_oneof![
        prop::sample::select(valid.clone()),
        (
            prop::sample::select(valid),
            any::<prop::sample::Index>(),
            any::<u8>()
        )
            .prop_map(|(mut body, at, byte)| {
                let i = at.index(body.len());
                body[i] = byte;
                body
            }),
        prop::collection::vec(any::<u8>(), 0..64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Arbitrary bytes from a client never panic the server side, and it
    /// always ends (Ok or Err) once the client is gone.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = serve_bytes(bytes);
    }

    /// The same after a valid hello, with frames that are well-formed on
    /// the outside and anything inside.
    #[test]
    fn arbitrary_frames_after_hello_never_panic(
        bodies in prop::collection::vec(body(), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = frame(&encode(&Request::Hello { protocol: 1, client: "fuzz".into() }).unwrap());
        for body in &bodies {
            bytes.extend(frame(body));
        }
        if truncate {
            let keep = cut.index(bytes.len() + 1);
            bytes.truncate(keep);
        }
        let _ = serve_bytes(bytes);
    }
}

fn run_request() -> Request {
    Request::Run {
        command: crate::Command {
            program: "/bin/true".into(),
            argv: vec!["true".into()],
            run_as: "root".into(),
        },
        cwd: "/".into(),
        env: Default::default(),
        reason: None,
        window: None,
        tty: None,
    }
}

#[test]
fn a_run_brings_its_descriptors_and_the_stream_stays_in_step() {
    use std::os::fd::AsFd;
    let (_dir, path, listener) = bind();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = ServerConnection::accept(stream, "test", |_| false).unwrap();
        let Some(Incoming::Request(Request::Run { .. })) = conn.next_request().unwrap() else {
            panic!("not a run");
        };
        let fds = conn.recv_fds(3).unwrap();
        let mut out = std::fs::File::from(fds.into_iter().nth(1).unwrap());
        out.write_all(b"hello").unwrap();
        conn.send(&Response::Exited(crate::ExitStatus {
            code: Some(0),
            signal: None,
        }))
        .unwrap();
        let next = conn.next_request().unwrap();
        assert_eq!(next, Some(Incoming::Request(Request::Status)));
        conn.send(&Response::End).unwrap();
    });
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test").unwrap();
    let (mut r, w) = std::os::unix::net::UnixStream::pair().unwrap();
    client
        .send_with_fds(&run_request(), &[w.as_fd(), w.as_fd(), w.as_fd()])
        .unwrap();
    drop(w);
    assert!(matches!(client.recv().unwrap(), Response::Exited(_)));
    assert_eq!(client.call(&Request::Status).unwrap(), Response::End);
    server.join().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut r, &mut text).unwrap();
    assert_eq!(text, "hello");
}

#[test]
fn a_run_without_descriptors_or_invalid_ends_the_connection() {
    let (_dir, path, listener) = bind();
    let server = thread::spawn(move || {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (stream, _) = listener.accept().unwrap();
            let mut conn = ServerConnection::accept(stream, "test", |_| false).unwrap();
            let outcome = match conn.next_request() {
                Ok(Some(Incoming::Request(Request::Run { .. }))) => {
                    conn.recv_fds(3).map(|_| ()).map_err(|e| e.to_string())
                }
                Ok(other) => panic!("{other:?}"),
                Err(error) => Err(error.to_string()),
            };
            outcomes.push(outcome);
        }
        outcomes
    });
    // A run frame followed by a plain byte (no descriptors).
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test").unwrap();
    client.send(&run_request()).unwrap();
    raw_stream(&client).write_all(&[FD_MARKER]).unwrap();
    let err = client.recv().unwrap_err();
    assert!(
        matches!(&err, ClientError::Daemon { code: ErrorCode::BadRequest, message } if message.contains("no file descriptors")),
        "{err}"
    );
    // An invalid run frame: its descriptors may follow, so the daemon
    // cannot stay in step.
    let mut client = Client::connect(&Endpoint::Socket(path.clone()), "test").unwrap();
    write_frame(
        &mut raw_stream(&client),
        br#"{"type":"run","command":{"program":"/bin/true","argv":[]},"cwd":"/","bogus":1}"#,
    )
    .unwrap();
    let err = client.recv().unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Daemon {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{err}"
    );
    let outcomes = server.join().unwrap();
    assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
}
