//! The Unix-socket transport: typed connections, peer credentials, and the
//! handshake on both sides.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::frame::{FrameError, read_frame, write_frame};
use crate::message::{ErrorCode, PROTOCOL_VERSION, Request, Response};

/// Where `epmd` listens unless configured otherwise (Linux and macOS).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/epm/epmd.sock";

/// Who is on the other end of a socket, as the kernel says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id, where the platform tells it.
    pub pid: Option<u32>,
}

/// The peer's credentials: SO_PEERCRED on Linux, getpeereid elsewhere.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(io::Error::from)?;
        Ok(PeerCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: u32::try_from(cred.pid()).ok(),
        })
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let (uid, gid) = nix::unistd::getpeereid(stream).map_err(io::Error::from)?;
        Ok(PeerCredentials {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            pid: None,
        })
    }
}

/// A framed, typed connection.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
}

impl Connection {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// The underlying stream (for timeouts, shutdown).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, message: &T) -> Result<(), FrameError> {
        let body = serde_json::to_vec(message).map_err(|e| FrameError::Io(io::Error::other(e)))?;
        write_frame(&mut self.stream, &body)
    }

    /// Receives one raw frame; `None` at a clean end of stream.
    pub fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        read_frame(&mut self.stream)
    }
}

// ---- client -------------------------------------------------------------------

/// Why a client could not talk to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path.
    #[error("epmd is not running (no socket at {0}); start it, or pass --socket PATH")]
    NotRunning(PathBuf),
    /// The socket exists but refuses connections.
    #[error("epmd is not accepting connections at {0} (stale socket?)")]
    Refused(PathBuf),
    /// Permission denied on the socket.
    #[error("permission denied on {0}")]
    PermissionDenied(PathBuf),
    /// The versions do not match.
    #[error("epmd speaks protocol {daemon}, this client {client}: {message}")]
    VersionMismatch {
        /// Daemon's version, if it said.
        daemon: u32,
        /// Ours.
        client: u32,
        /// The daemon's words.
        message: String,
    },
    /// The daemon answered with an error.
    #[error("epmd: {message}")]
    Daemon {
        /// The class of failure.
        code: ErrorCode,
        /// The daemon's words.
        message: String,
    },
    /// The daemon closed the connection.
    #[error("epmd closed the connection")]
    Closed,
    /// The daemon sent something this client does not understand.
    #[error("unexpected answer from epmd: {0}")]
    Protocol(String),
    /// Transport failure.
    #[error("talking to epmd: {0}")]
    Frame(#[from] FrameError),
}

/// A client's connection to the daemon, after the handshake.
#[derive(Debug)]
pub struct Client {
    connection: Connection,
    /// The uid the daemon saw.
    pub uid: u32,
    /// Whether the daemon considers us an administrator.
    pub is_admin: bool,
    /// The daemon's version.
    pub daemon_version: String,
}

impl Client {
    /// Connects and performs the handshake.
    pub fn connect(path: &Path, client: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ClientError::NotRunning(path.to_owned()),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(path.to_owned()),
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_owned()),
            _ => ClientError::Frame(FrameError::Io(io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", path.display()),
            ))),
        })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        let mut connection = Connection::new(stream);
        connection.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: client.to_owned(),
        })?;
        let mut client_conn = Client {
            connection,
            uid: 0,
            is_admin: false,
            daemon_version: String::new(),
        };
        match client_conn.recv()? {
            Response::Welcome {
                uid,
                is_admin,
                daemon_version,
                ..
            } => {
                client_conn.uid = uid;
                client_conn.is_admin = is_admin;
                client_conn.daemon_version = daemon_version;
                Ok(client_conn)
            }
            Response::Error {
                code: ErrorCode::VersionMismatch,
                message,
            } => Err(ClientError::VersionMismatch {
                daemon: 0,
                client: PROTOCOL_VERSION,
                message,
            }),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Sends a request.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        Ok(self.connection.send(request)?)
    }

    /// Receives the next response; a daemon `Error` becomes `Err`.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let Some(frame) = self.connection.recv_frame()? else {
            return Err(ClientError::Closed);
        };
        let response: Response =
            serde_json::from_slice(&frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match response {
            Response::Error { code, message } => Err(ClientError::Daemon { code, message }),
            other => Ok(other),
        }
    }

    /// Sends a request and receives one response.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request)?;
        self.recv()
    }

    /// Removes the read timeout (for following a stream).
    pub fn wait_forever(&mut self) {
        let _ = self.connection.stream().set_read_timeout(None);
    }
}

// ---- server -------------------------------------------------------------------

/// Why the daemon ends a connection.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A bad frame (oversized, truncated) or a socket error.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The frame is not a JSON object with a `type`.
    #[error("frame is not a JSON message: {0}")]
    Garbage(String),
    /// A request before `Hello`, or a second `Hello`.
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// The client speaks another protocol version.
    #[error("client protocol {0} is not {PROTOCOL_VERSION}")]
    VersionMismatch(u32),
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A request this daemon understands.
    Request(Request),
    /// A well-formed message of a type this daemon does not know; answer
    /// `unsupported` and keep the connection.
    Unsupported(String),
}

/// The daemon's side of one connection, after the handshake.
#[derive(Debug)]
pub struct ServerConnection {
    connection: Connection,
    /// Who is connected.
    pub peer: PeerCredentials,
    /// Whether the peer may see everything.
    pub is_admin: bool,
}

impl ServerConnection {
    /// Reads the client's `Hello`, answers `Welcome` (or a version error),
    /// and returns the connection. `is_admin` decides from the peer's
    /// credentials whether it may see everything.
    pub fn accept(
        stream: UnixStream,
        daemon_version: &str,
        is_admin: impl FnOnce(&PeerCredentials) -> bool,
    ) -> Result<ServerConnection, ServerError> {
        let peer = peer_credentials(&stream).map_err(FrameError::Io)?;
        let mut connection = Connection::new(stream);
        let Some(frame) = connection.recv_frame()? else {
            return Err(ServerError::Frame(FrameError::Truncated));
        };
        match parse(&frame)? {
            Incoming::Request(Request::Hello { protocol, .. }) if protocol == PROTOCOL_VERSION => {
                let is_admin = is_admin(&peer);
                connection.send(&Response::Welcome {
                    protocol: PROTOCOL_VERSION,
                    daemon_version: daemon_version.to_owned(),
                    uid: peer.uid,
                    is_admin,
                })?;
                Ok(ServerConnection {
                    connection,
                    peer,
                    is_admin,
                })
            }
            Incoming::Request(Request::Hello { protocol, .. }) => {
                let _ = connection.send(&Response::Error {
                    code: ErrorCode::VersionMismatch,
                    message: format!(
                        "this epmd speaks protocol {PROTOCOL_VERSION}, the client {protocol}"
                    ),
                });
                Err(ServerError::VersionMismatch(protocol))
            }
            other => Err(ServerError::OutOfOrder(format!(
                "expected hello first, got {other:?}"
            ))),
        }
    }

    /// The next request; `Ok(None)` when the client closed the connection.
    pub fn next_request(&mut self) -> Result<Option<Incoming>, ServerError> {
        let Some(frame) = self.connection.recv_frame()? else {
            return Ok(None);
        };
        match parse(&frame)? {
            Incoming::Request(Request::Hello { .. }) => {
                Err(ServerError::OutOfOrder("a second hello".into()))
            }
            incoming => Ok(Some(incoming)),
        }
    }

    /// Sends a response.
    pub fn send(&mut self, response: &Response) -> Result<(), ServerError> {
        Ok(self.connection.send(response)?)
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        self.connection.stream()
    }
}

/// A frame → a request, an unknown-but-well-formed message, or garbage.
fn parse(frame: &[u8]) -> Result<Incoming, ServerError> {
    let value: serde_json::Value =
        serde_json::from_slice(frame).map_err(|e| ServerError::Garbage(e.to_string()))?;
    let Some(kind) = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return Err(ServerError::Garbage("no \"type\" field".into()));
    };
    match serde_json::from_value::<Request>(value) {
        Ok(request) => Ok(Incoming::Request(request)),
        Err(e) if e.to_string().starts_with("unknown variant") => Ok(Incoming::Unsupported(kind)),
        Err(e) => Err(ServerError::Garbage(format!("{kind}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::thread;

    use proptest::prelude::*;

    use super::*;
    use crate::message::Response;

    fn serve_one(listener: UnixListener) -> thread::JoinHandle<Result<Vec<Incoming>, String>> {
        thread::spawn(move || {
            let (stream, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut conn = ServerConnection::accept(stream, "test", |p| p.uid == 0)
                .map_err(|e| e.to_string())?;
            let mut seen = Vec::new();
            loop {
                match conn.next_request() {
                    Ok(Some(incoming)) => {
                        let reply = match &incoming {
                            Incoming::Request(Request::Status) => Response::End,
                            _ => Response::Error {
                                code: ErrorCode::Unsupported,
                                message: "no".into(),
                            },
                        };
                        seen.push(incoming);
                        conn.send(&reply).map_err(|e| e.to_string())?;
                    }
                    Ok(None) => return Ok(seen),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
    }

    fn listener() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("epmd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[test]
    fn handshake_reports_our_credentials_and_serves_requests() {
        let (_dir, path, listener) = listener();
        let server = serve_one(listener);
        let mut client = Client::connect(&path, "test-client").unwrap();
        assert_eq!(client.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(client.is_admin, client.uid == 0);
        assert_eq!(client.call(&Request::Status).unwrap(), Response::End);
        drop(client);
        assert_eq!(
            server.join().unwrap().unwrap(),
            [Incoming::Request(Request::Status)]
        );
    }

    #[test]
    fn peer_pid_is_ours_on_linux() {
        let (a, _b) = UnixStream::pair().unwrap();
        let cred = peer_credentials(&a).unwrap();
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        if cfg!(target_os = "linux") {
            assert_eq!(cred.pid, Some(std::process::id()));
        }
    }

    #[test]
    fn unknown_request_types_are_unsupported_not_fatal() {
        let (_dir, path, listener) = listener();
        let server = serve_one(listener);
        let mut client = Client::connect(&path, "test").unwrap();
        let stream = client.connection.stream().try_clone().unwrap();
        write_frame(&mut &stream, br#"{"type":"from_the_future","x":1}"#).unwrap();
        let err = client.recv().unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Daemon {
                    code: ErrorCode::Unsupported,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            client.call(&Request::Status).unwrap(),
            Response::End,
            "still connected"
        );
        drop(stream);
        drop(client);
        let seen = server.join().unwrap().unwrap();
        assert_eq!(seen[0], Incoming::Unsupported("from_the_future".into()));
    }

    #[test]
    fn a_request_before_hello_closes_the_connection() {
        let (_dir, path, listener) = listener();
        let server = serve_one(listener);
        let mut stream = UnixStream::connect(&path).unwrap();
        write_frame(&mut stream, br#"{"type":"status"}"#).unwrap();
        let err = server.join().unwrap().unwrap_err();
        assert!(err.starts_with("out of order"), "{err}");
    }

    #[test]
    fn a_version_mismatch_is_explained_to_the_client() {
        let (_dir, path, listener) = listener();
        let server = serve_one(listener);
        let mut conn = Connection::new(UnixStream::connect(&path).unwrap());
        conn.send(&Request::Hello {
            protocol: 99,
            client: "future".into(),
        })
        .unwrap();
        let reply: Response = serde_json::from_slice(&conn.recv_frame().unwrap().unwrap()).unwrap();
        assert!(matches!(
            reply,
            Response::Error {
                code: ErrorCode::VersionMismatch,
                ..
            }
        ));
        assert!(
            server
                .join()
                .unwrap()
                .unwrap_err()
                .contains("client protocol 99")
        );
    }

    #[test]
    fn garbage_and_oversized_frames_end_only_that_connection() {
        for bad in [
            b"\x00\x00\x00\x05hello".to_vec(),
            b"\xff\xff\xff\xff".to_vec(),
            b"\x00\x00\x00\x02{}".to_vec(),
        ] {
            let (_dir, path, listener) = listener();
            let server = serve_one(listener);
            let mut client = Client::connect(&path, "test").unwrap();
            let stream = client.connection.stream().try_clone().unwrap();
            (&stream).write_all(&bad).unwrap();
            assert!(server.join().unwrap().is_err());
            assert!(client.recv().is_err(), "the server closed this connection");
        }
    }

    #[test]
    fn connecting_to_nothing_says_the_daemon_is_not_running() {
        let err = Client::connect(Path::new("/nonexistent/epmd.sock"), "t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "epmd is not running (no socket at /nonexistent/epmd.sock); start it, or pass --socket PATH"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Arbitrary bytes from a client never panic the server side.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let (a, b) = UnixStream::pair().unwrap();
            let writer = thread::spawn(move || {
                let mut a = a;
                let _ = a.write_all(&bytes);
            });
            b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            if let Ok(mut conn) = ServerConnection::accept(b, "t", |_| false) {
                while let Ok(Some(_)) = conn.next_request() {}
            }
            writer.join().unwrap();
        }
    }
}
