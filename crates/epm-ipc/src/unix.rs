//! The Unix-socket transport: typed connections, peer credentials, and the
//! handshake on both sides.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::frame::{FrameError, read_frame, write_frame};

mod fds;
use crate::message::{
    ErrorCode, Message, PROTOCOL_VERSION, Request, Response, decode, encode, shorten,
};
pub use fds::{FD_MARKER, FdError};

/// Where `epmd` listens unless configured otherwise (Linux and macOS).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/epm/epmd.sock";

/// How long a [`Client`] waits on the daemon to take a request or answer
/// it, unless told otherwise ([`Client::set_timeout`]).
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the daemon tries to tell a misbehaving client why it is being
/// disconnected: a client that does not read must not hold the thread.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the daemon waits for the descriptors that follow a `run`
/// frame (the client sends them at once).
const FDS_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a socket, as the kernel says (as of the
/// connect): what the daemon authorizes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id, where the platform tells it (Linux, macOS). For logs
    /// only: the process may have exited and its pid been reused since.
    pub pid: Option<u32>,
}

/// The peer's credentials: SO_PEERCRED on Linux; getpeereid and
/// LOCAL_PEERPID on macOS; getpeereid on the other BSDs.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::socket::{getsockopt, sockopt};
        let cred = getsockopt(stream, sockopt::PeerCredentials)?;
        Ok(PeerCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            // 0 when the peer is in another pid namespace: unknown.
            pid: u32::try_from(cred.pid()).ok().filter(|&pid| pid != 0),
        })
    }
    #[cfg(any(
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "netbsd",
        target_os = "openbsd"
    ))]
    {
        let (uid, gid) = nix::unistd::getpeereid(stream)?;
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        let pid = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::LocalPeerPid)
            .ok()
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|&pid| pid != 0);
        #[cfg(not(any(target_os = "macos", target_os = "ios")))]
        let pid = None;
        Ok(PeerCredentials {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            pid,
        })
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "dragonfly",
        target_os = "netbsd",
        target_os = "openbsd"
    )))]
    {
        let _ = stream;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "peer credentials are not implemented on this platform",
        ))
    }
}

/// A framed, typed connection: either side's building block.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
}

impl Connection {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// The underlying stream (for polling, shutdown).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The underlying stream, unwrapped.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Sets how long a read and a write may block; `None` waits forever.
    /// An expired timeout surfaces as [`FrameError::TimedOut`].
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(read)?;
        self.stream.set_write_timeout(write)
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, message: &T) -> Result<(), FrameError> {
        write_frame(&mut self.stream, &encode(message)?)
    }

    /// Receives one message; `None` when the peer closed cleanly between
    /// messages.
    pub fn recv<T: Message>(&mut self) -> Result<Option<T>, FrameError> {
        match self.recv_frame()? {
            Some(frame) => decode(&frame).map(Some),
            None => Ok(None),
        }
    }

    /// Receives one raw frame; `None` when the peer closed cleanly between
    /// frames.
    pub fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        read_frame(&mut self.stream)
    }

    /// Sends the byte [`FD_MARKER`] carrying `fds` (SCM_RIGHTS): what
    /// follows a [`Request::Run`] frame.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        fds::send_fds(&self.stream, fds)
    }

    /// Receives the byte [`FD_MARKER`] and exactly `expected` descriptors
    /// (close-on-exec). Any other count is an error, and whatever came is
    /// closed.
    pub fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, FdError> {
        fds::recv_fds(&self.stream, expected)
    }
}

// ---- client -------------------------------------------------------------------

/// Why a client could not talk to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path.
    #[error("epmd is not running (no socket at {0}); start it, or pass --socket PATH")]
    NotRunning(PathBuf),
    /// The socket exists but nothing accepts on it.
    #[error("epmd is not running (nothing accepts connections at {0}: a stale socket?)")]
    Refused(PathBuf),
    /// Permission denied on the socket or a directory above it.
    #[error("permission denied connecting to epmd at {0}")]
    PermissionDenied(PathBuf),
    /// Any other failure to connect.
    #[error("cannot connect to epmd at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The daemon and this client speak incompatible protocol versions.
    #[error(
        "epmd and this client (protocol {client}) cannot talk: {message}; upgrade the older one"
    )]
    VersionMismatch {
        /// The daemon's version, when it said.
        daemon: Option<u32>,
        /// Ours ([`PROTOCOL_VERSION`]).
        client: u32,
        /// What the daemon said, or what we saw.
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
    /// The daemon sent something out of place (no `Welcome`, say).
    #[error("unexpected answer from epmd: {0}")]
    Protocol(String),
    /// The transport failed, or the daemon's frame made no sense.
    #[error("talking to epmd: {0}")]
    Frame(FrameError),
}

impl From<FrameError> for ClientError {
    fn from(error: FrameError) -> Self {
        match error {
            // The daemon hung up under us (a full per-user quota, a
            // restart): say so, not "broken pipe".
            FrameError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                ClientError::Closed
            }
            other => ClientError::Frame(other),
        }
    }
}

/// A client's connection to the daemon, after the handshake.
#[derive(Debug)]
pub struct Client {
    connection: Connection,
    /// The uid the daemon saw (and authorizes by).
    pub uid: u32,
    /// Whether the daemon considers us an administrator.
    pub is_admin: bool,
    /// The daemon's version.
    pub daemon_version: String,
}

impl Client {
    /// Connects to the daemon's socket and performs the handshake. `client`
    /// names this program in the daemon's log, e.g. `epmctl 0.1.0`. Reads
    /// and writes time out after [`DEFAULT_CLIENT_TIMEOUT`].
    pub fn connect(path: &Path, client: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ClientError::NotRunning(path.to_owned()),
            io::ErrorKind::ConnectionRefused => ClientError::Refused(path.to_owned()),
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_owned()),
            _ => ClientError::Connect {
                path: path.to_owned(),
                source,
            },
        })?;
        let mut connection = Connection::new(stream);
        connection
            .set_timeouts(Some(DEFAULT_CLIENT_TIMEOUT), Some(DEFAULT_CLIENT_TIMEOUT))
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        connection.send(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: client.to_owned(),
        })?;
        let Some(welcome) = connection.recv::<Response>()? else {
            return Err(ClientError::Closed);
        };
        match welcome {
            Response::Welcome {
                protocol,
                uid,
                is_admin,
                daemon_version,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(ClientError::VersionMismatch {
                        daemon: Some(protocol),
                        client: PROTOCOL_VERSION,
                        message: format!("epmd {daemon_version} speaks protocol {protocol}"),
                    });
                }
                Ok(Client {
                    connection,
                    uid,
                    is_admin,
                    daemon_version,
                })
            }
            Response::Error {
                code: ErrorCode::VersionMismatch,
                message,
            } => Err(ClientError::VersionMismatch {
                daemon: None,
                client: PROTOCOL_VERSION,
                message,
            }),
            Response::Error { code, message } => Err(ClientError::Daemon { code, message }),
            other => Err(ClientError::Protocol(format!(
                "{} instead of welcome",
                other.type_name()
            ))),
        }
    }

    /// Sends a request.
    pub fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        Ok(self.connection.send(request)?)
    }

    /// Receives the next response; a daemon [`Response::Error`] becomes
    /// [`ClientError::Daemon`].
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        match self.connection.recv::<Response>()? {
            None => Err(ClientError::Closed),
            Some(Response::Error { code, message }) => Err(ClientError::Daemon { code, message }),
            Some(response) => Ok(response),
        }
    }

    /// Sends a request followed by the byte carrying `fds` (for
    /// [`Request::Run`]: stdin, stdout, stderr).
    pub fn send_with_fds(
        &mut self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        self.connection.send(request)?;
        self.connection
            .send_fds(fds)
            .map_err(|e| ClientError::from(FrameError::from(e)))
    }

    /// The underlying stream (to poll it while waiting for something else).
    pub fn stream(&self) -> &UnixStream {
        self.connection.stream()
    }

    /// Sends a request and receives one response.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request)?;
        self.recv()
    }

    /// Sets how long a read or a write may take; `None` waits forever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.connection
            .set_timeouts(timeout, timeout)
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))
    }

    /// Waits for answers forever (following a stream, which may be quiet
    /// for hours).
    pub fn wait_forever(&mut self) {
        let _ = self.connection.stream().set_read_timeout(None);
    }

    /// Who the daemon is, as the kernel says: a caller that must not talk
    /// to an impostor checks that this is root.
    pub fn daemon_credentials(&self) -> io::Result<PeerCredentials> {
        peer_credentials(self.connection.stream())
    }
}

// ---- server -------------------------------------------------------------------

/// Why the daemon ends a connection. Each ends only that one; where the
/// client can still hear it, it has been told why (a `bad_request` or
/// `version_mismatch` error).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A bad frame (oversized, truncated, not JSON, not a message), a
    /// malformed `Hello`, a timeout, or a socket error.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The client connected and left without a `Hello` (a probe).
    #[error("the client closed the connection before its hello")]
    ClosedBeforeHello,
    /// A request before `Hello`, or a second `Hello`.
    #[error("out of order: {0}")]
    OutOfOrder(String),
    /// The client speaks another protocol version.
    #[error("client protocol {0} is not {PROTOCOL_VERSION}")]
    VersionMismatch(u32),
    /// The descriptors that must follow a request did not arrive as they
    /// should.
    #[error("{0}")]
    Fds(#[from] FdError),
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A request this daemon understands.
    Request(Request),
    /// A well-formed message of a type this daemon does not know (from a
    /// newer client): answer [`ErrorCode::Unsupported`] and keep the
    /// connection. The type is cut to 200 characters.
    Unsupported(String),
}

/// The daemon's side of one connection, after the handshake.
///
/// The daemon owns the accept loop and the threads; this owns the protocol:
/// the handshake, telling unknown requests from garbage, and keeping every
/// frame it sends within [`crate::MAX_FRAME_BYTES`].
#[derive(Debug)]
pub struct ServerConnection {
    connection: Connection,
    /// Who is connected.
    pub peer: PeerCredentials,
    /// Whether the peer may see and do everything.
    pub is_admin: bool,
    /// What the client called itself in its `Hello`, for logs (cut to 200
    /// characters: the client chose it).
    pub client: String,
}

impl ServerConnection {
    /// Reads the client's `Hello`, answers [`Response::Welcome`] with the
    /// peer's uid and `is_admin(&peer)`, and returns the connection.
    ///
    /// On a version mismatch the client is told so, then `Err`. A request
    /// before `Hello`, garbage or an oversized frame is answered with a
    /// `bad_request` error where possible, then `Err`. After any `Err`,
    /// close the connection. Set a read timeout first, so that a client
    /// that never says hello cannot hold the thread.
    pub fn accept(
        stream: UnixStream,
        daemon_version: &str,
        is_admin: impl FnOnce(&PeerCredentials) -> bool,
    ) -> Result<ServerConnection, ServerError> {
        let peer = peer_credentials(&stream).map_err(FrameError::Io)?;
        let mut connection = Connection::new(stream);
        let Some(frame) = recv_request_frame(&mut connection)? else {
            return Err(ServerError::ClosedBeforeHello);
        };
        let (protocol, client) = match decode::<Request>(&frame) {
            Ok(Request::Hello { protocol, client }) => (protocol, client),
            Ok(request) => {
                let kind = request.type_name();
                return Err(out_of_order(
                    &mut connection,
                    format!("{kind} before hello"),
                ));
            }
            Err(FrameError::UnknownType(kind)) => {
                return Err(out_of_order(
                    &mut connection,
                    format!("{kind:?} before hello"),
                ));
            }
            Err(error) => {
                // A future client's hello may carry fields this daemon does
                // not know; its version still deserves the clear answer.
                if let Some(protocol) = lenient_hello_protocol(&frame)
                    && protocol != u64::from(PROTOCOL_VERSION)
                {
                    let protocol = u32::try_from(protocol).unwrap_or(u32::MAX);
                    return Err(refuse_version(&mut connection, protocol));
                }
                farewell(&mut connection, ErrorCode::BadRequest, error.to_string());
                return Err(error.into());
            }
        };
        if protocol != PROTOCOL_VERSION {
            return Err(refuse_version(&mut connection, protocol));
        }
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
            client: shorten(&client),
        })
    }

    /// The next request; `Ok(None)` when the client closed the connection.
    ///
    /// A request of a known type with invalid fields is answered here, with
    /// a `bad_request` error naming the problem, and the next one is read:
    /// the stream is still in step. `Err` (garbage, oversized, a second
    /// `Hello`, a timeout, a socket error) means: close the connection.
    pub fn next_request(&mut self) -> Result<Option<Incoming>, ServerError> {
        loop {
            let Some(frame) = recv_request_frame(&mut self.connection)? else {
                return Ok(None);
            };
            match decode::<Request>(&frame) {
                Ok(Request::Hello { .. }) => {
                    return Err(out_of_order(&mut self.connection, "a second hello".into()));
                }
                Ok(request) => return Ok(Some(Incoming::Request(request))),
                Err(FrameError::UnknownType(kind)) => {
                    return Ok(Some(Incoming::Unsupported(kind)));
                }
                // Its descriptors follow in the stream, or not (a broken
                // client): either way, its place in the stream is lost.
                Err(error @ FrameError::Invalid { .. }) if invalid_kind(&error) == Some("run") => {
                    farewell(
                        &mut self.connection,
                        ErrorCode::BadRequest,
                        error.to_string(),
                    );
                    return Err(error.into());
                }
                Err(error @ FrameError::Invalid { .. }) => {
                    self.connection
                        .send(&Response::error(ErrorCode::BadRequest, error.to_string()))?;
                }
                Err(error) => {
                    farewell(
                        &mut self.connection,
                        ErrorCode::BadRequest,
                        error.to_string(),
                    );
                    return Err(error.into());
                }
            }
        }
    }

    /// Sends a response.
    ///
    /// [`Response::AuditRecords`] over the frame limit goes out as several
    /// batches (a client reads any number). Any other response over the
    /// limit is replaced by an `internal` error, so that the client learns
    /// why, and `Err` is returned.
    pub fn send(&mut self, response: &Response) -> Result<(), ServerError> {
        if let Response::AuditRecords { lines } = response {
            return self.send_records(lines);
        }
        match encode(response) {
            Ok(body) => Ok(write_frame(&mut self.connection.stream, &body)?),
            Err(error @ FrameError::Oversized { .. }) => {
                self.connection.send(&Response::error(
                    ErrorCode::Internal,
                    format!("the {} answer is too large: {error}", response.type_name()),
                ))?;
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Sends records in as few frames as fit, halving a batch until it does.
    fn send_records(&mut self, lines: &[String]) -> Result<(), ServerError> {
        /// `Response::AuditRecords`, borrowing its lines.
        #[derive(Serialize)]
        #[serde(tag = "type", rename = "audit_records")]
        struct AuditRecords<'a> {
            lines: &'a [String],
        }
        match encode(&AuditRecords { lines }) {
            Ok(body) => Ok(write_frame(&mut self.connection.stream, &body)?),
            Err(FrameError::Oversized { .. }) if lines.len() > 1 => {
                let (first, second) = lines.split_at(lines.len() / 2);
                self.send_records(first)?;
                self.send_records(second)
            }
            Err(error @ FrameError::Oversized { .. }) => {
                self.connection.send(&Response::error(
                    ErrorCode::Internal,
                    format!("an audit record is too large to send: {error}"),
                ))?;
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The underlying stream (to set timeouts, or to poll for the client
    /// leaving while it follows a stream).
    pub fn stream(&self) -> &UnixStream {
        self.connection.stream()
    }

    /// The caller's descriptors that follow a [`Request::Run`] frame:
    /// receive them first, whatever is then decided, since they are in the
    /// stream. Waits at most 10 s. On `Err` the client has been told why
    /// (where it still listens), whatever came is closed, and the
    /// connection must be closed: it is out of step.
    pub fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, ServerError> {
        let stream = self.connection.stream();
        let before = stream.read_timeout().ok().flatten();
        let _ = stream.set_read_timeout(Some(FDS_TIMEOUT));
        let received = self.connection.recv_fds(expected);
        let _ = self.connection.stream().set_read_timeout(before);
        received.map_err(|error| {
            farewell(
                &mut self.connection,
                ErrorCode::BadRequest,
                error.to_string(),
            );
            error.into()
        })
    }
}

/// The `type` of an invalid message.
fn invalid_kind(error: &FrameError) -> Option<&str> {
    match error {
        FrameError::Invalid { kind, .. } => Some(kind),
        _ => None,
    }
}

/// A frame from the client. An oversized one is answered before the `Err`:
/// the stream is lost, but the client should learn why.
fn recv_request_frame(connection: &mut Connection) -> Result<Option<Vec<u8>>, ServerError> {
    match connection.recv_frame() {
        Err(error @ FrameError::Oversized { .. }) => {
            farewell(connection, ErrorCode::BadRequest, error.to_string());
            Err(error.into())
        }
        other => Ok(other?),
    }
}

/// The `protocol` of anything that calls itself a hello.
fn lenient_hello_protocol(frame: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(frame).ok()?;
    if value.get("type")?.as_str()? != "hello" {
        return None;
    }
    value.get("protocol")?.as_u64()
}

fn out_of_order(connection: &mut Connection, what: String) -> ServerError {
    farewell(
        connection,
        ErrorCode::BadRequest,
        format!("out of order: {what}"),
    );
    ServerError::OutOfOrder(what)
}

fn refuse_version(connection: &mut Connection, protocol: u32) -> ServerError {
    farewell(
        connection,
        ErrorCode::VersionMismatch,
        format!("this epmd speaks protocol {PROTOCOL_VERSION}, the client {protocol}"),
    );
    ServerError::VersionMismatch(protocol)
}

/// Tells the client why it is being disconnected, if it still listens.
fn farewell(connection: &mut Connection, code: ErrorCode, message: String) {
    let _ = connection.stream.set_write_timeout(Some(FAREWELL_TIMEOUT));
    let _ = connection.send(&Response::error(code, message));
}

#[cfg(test)]
mod tests;
