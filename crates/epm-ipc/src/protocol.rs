//! The Unix-socket transport: typed connections, peer credentials, and the
//! handshake on both sides.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::frame::{FrameError, read_frame, write_frame};
use crate::link::Link;

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

/// How long a client has to say hello, unless the daemon set its own read
/// timeout: one that never does must not hold a thread.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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

impl Link for Connection {
    fn send_frame(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
        write_frame(&mut self.stream, body)?;
        if !fds.is_empty() {
            self.send_fds(fds)?;
        }
        Ok(())
    }

    fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        Connection::recv_frame(self)
    }

    fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, FdError> {
        Connection::recv_fds(self, expected)
    }

    fn set_timeouts(&mut self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        Connection::set_timeouts(self, read, write)
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.stream.read_timeout().ok().flatten()
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    fn peer(&self) -> io::Result<PeerCredentials> {
        peer_credentials(&self.stream)
    }
}

// ---- client -------------------------------------------------------------------

/// Where a client finds `epmd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The control socket at this path.
    Socket(PathBuf),
    /// The XPC Mach service of this name (macOS): `epmd`'s launchd plist
    /// publishes [`crate::xpc_frame::MACH_SERVICE_NAME`].
    MachService(String),
}

impl Endpoint {
    /// Where `epmd` listens unless configured otherwise: its XPC service on
    /// macOS (where XPC also checks the client's code signature, when the
    /// daemon is configured to), the socket [`DEFAULT_SOCKET_PATH`]
    /// elsewhere.
    pub fn platform_default() -> Endpoint {
        if cfg!(target_os = "macos") {
            Endpoint::MachService(crate::xpc_frame::MACH_SERVICE_NAME.to_owned())
        } else {
            Endpoint::Socket(PathBuf::from(DEFAULT_SOCKET_PATH))
        }
    }

    /// `socket` when given (a `--socket PATH` option), else
    /// [`Endpoint::platform_default`].
    pub fn socket_or_default(socket: Option<PathBuf>) -> Endpoint {
        socket.map_or_else(Endpoint::platform_default, Endpoint::Socket)
    }
}

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
    /// The XPC service did not answer: `epmd` is not running, launchd does
    /// not publish the name, or `epmd` refused this client's code
    /// signature.
    #[error(
        "epmd did not answer at the XPC service {0}: it is not running (sudo launchctl print system/com.epm.epmd), or it refused this program's code signature; or pass --socket PATH"
    )]
    ServiceUnavailable(String),
    /// XPC could not be used (another platform, or XPC refused to make the
    /// connection).
    #[error("cannot connect to epmd at the XPC service {service}: {reason}")]
    Xpc {
        /// The service name.
        service: String,
        /// Why.
        reason: String,
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

/// A client's connection to the daemon, after the handshake, over either
/// transport.
#[derive(Debug)]
pub struct Client {
    link: Box<dyn Link>,
    /// The uid the daemon saw (and authorizes by).
    pub uid: u32,
    /// Whether the daemon considers us an administrator.
    pub is_admin: bool,
    /// The daemon's version.
    pub daemon_version: String,
}

impl Client {
    /// Connects to the daemon and performs the handshake. `client` names
    /// this program in the daemon's log, e.g. `epmctl 0.1.0`. Reads and
    /// writes time out after [`DEFAULT_CLIENT_TIMEOUT`].
    pub fn connect(endpoint: &Endpoint, client: &str) -> Result<Client, ClientError> {
        let link = open(endpoint)?;
        Client::handshake(link, client, || match endpoint {
            // XPC looks the service up on the first message: a missing or
            // refusing service shows only as the end of the connection.
            Endpoint::MachService(name) => ClientError::ServiceUnavailable(name.clone()),
            Endpoint::Socket(_) => ClientError::Closed,
        })
    }

    /// Says hello on `link` and reads the welcome; `closed` says what it
    /// means when the daemon goes away instead.
    pub(crate) fn handshake(
        mut link: Box<dyn Link>,
        client: &str,
        closed: impl Fn() -> ClientError,
    ) -> Result<Client, ClientError> {
        link.set_timeouts(Some(DEFAULT_CLIENT_TIMEOUT), Some(DEFAULT_CLIENT_TIMEOUT))
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))?;
        let hello = encode(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: client.to_owned(),
        })?;
        match link.send_frame(&hello, &[]).map_err(ClientError::from) {
            Err(ClientError::Closed) => return Err(closed()),
            other => other?,
        }
        let Some(frame) = link.recv_frame()? else {
            return Err(closed());
        };
        match decode::<Response>(&frame)? {
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
                    link,
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
        self.send_with_fds(request, &[])
    }

    /// Receives the next response; a daemon [`Response::Error`] becomes
    /// [`ClientError::Daemon`].
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let Some(frame) = self.link.recv_frame()? else {
            return Err(ClientError::Closed);
        };
        match decode::<Response>(&frame)? {
            Response::Error { code, message } => Err(ClientError::Daemon { code, message }),
            response => Ok(response),
        }
    }

    /// Sends a request with `fds` alongside (for [`Request::Run`]: stdin,
    /// stdout, stderr): on the socket, a byte carrying them right after the
    /// frame; over XPC, in the same message.
    pub fn send_with_fds(
        &mut self,
        request: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let body = encode(request)?;
        Ok(self.link.send_frame(&body, fds)?)
    }

    /// Polls readable when an answer waits or the daemon is gone: to wait
    /// for the daemon and something else (a terminal, a signal) at once.
    pub fn readiness(&self) -> BorrowedFd<'_> {
        self.link.readiness()
    }

    /// Sends a request and receives one response.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        self.send(request)?;
        self.recv()
    }

    /// Sets how long a read or a write may take; `None` waits forever.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.link
            .set_timeouts(timeout, timeout)
            .map_err(|e| ClientError::Frame(FrameError::Io(e)))
    }

    /// Waits for answers forever (following a stream, which may be quiet
    /// for hours); a write still gives up after [`DEFAULT_CLIENT_TIMEOUT`].
    pub fn wait_forever(&mut self) {
        let _ = self.link.set_timeouts(None, Some(DEFAULT_CLIENT_TIMEOUT));
    }

    /// Who the daemon is, as the kernel (or XPC) says: a caller that must
    /// not talk to an impostor checks that this is root.
    pub fn daemon_credentials(&self) -> io::Result<PeerCredentials> {
        self.link.peer()
    }
}

/// A connected link to `endpoint`, before the handshake.
fn open(endpoint: &Endpoint) -> Result<Box<dyn Link>, ClientError> {
    match endpoint {
        Endpoint::Socket(path) => {
            let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => ClientError::NotRunning(path.to_owned()),
                io::ErrorKind::ConnectionRefused => ClientError::Refused(path.to_owned()),
                io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.to_owned()),
                _ => ClientError::Connect {
                    path: path.to_owned(),
                    source,
                },
            })?;
            Ok(Box::new(Connection::new(stream)))
        }
        #[cfg(target_os = "macos")]
        Endpoint::MachService(name) => crate::xpc::XpcConnection::connect(name)
            .map(|connection| Box::new(connection) as Box<dyn Link>)
            .map_err(|error| ClientError::Xpc {
                service: name.clone(),
                reason: error.to_string(),
            }),
        #[cfg(not(target_os = "macos"))]
        Endpoint::MachService(name) => Err(ClientError::Xpc {
            service: name.clone(),
            reason: "XPC exists only on macOS; pass --socket PATH".into(),
        }),
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

/// The daemon's side of one connection, after the handshake, over either
/// transport.
///
/// The daemon owns the accept loop and the threads; this owns the protocol:
/// the handshake, telling unknown requests from garbage, and keeping every
/// frame it sends within [`crate::MAX_FRAME_BYTES`].
#[derive(Debug)]
pub struct ServerConnection {
    link: Box<dyn Link>,
    /// Who is connected.
    pub peer: PeerCredentials,
    /// Whether the peer may see and do everything.
    pub is_admin: bool,
    /// What the client called itself in its `Hello`, for logs (cut to 200
    /// characters: the client chose it).
    pub client: String,
}

impl ServerConnection {
    /// Reads the client's `Hello` on a Unix socket, answers
    /// [`Response::Welcome`] with the peer's uid and `is_admin(&peer)`, and
    /// returns the connection.
    ///
    /// On a version mismatch the client is told so, then `Err`. A request
    /// before `Hello`, garbage or an oversized frame is answered with a
    /// `bad_request` error where possible, then `Err`. After any `Err`,
    /// close the connection. Unless the stream has a read timeout, the
    /// hello must come within 10 s.
    pub fn accept(
        stream: UnixStream,
        daemon_version: &str,
        is_admin: impl FnOnce(&PeerCredentials) -> bool,
    ) -> Result<ServerConnection, ServerError> {
        Arrival::socket(stream)
            .map_err(FrameError::Io)?
            .accept(daemon_version, is_admin)
    }

    /// The daemon's handshake on any link, with the peer it connected as.
    fn handshake(
        mut link: Box<dyn Link>,
        peer: PeerCredentials,
        daemon_version: &str,
        is_admin: impl FnOnce(&PeerCredentials) -> bool,
    ) -> Result<ServerConnection, ServerError> {
        let before = link.read_timeout();
        if before.is_none() {
            link.set_timeouts(Some(HELLO_TIMEOUT), None)
                .map_err(FrameError::Io)?;
        }
        let Some(frame) = recv_request_frame(link.as_mut())? else {
            return Err(ServerError::ClosedBeforeHello);
        };
        let (protocol, client) = match decode::<Request>(&frame) {
            Ok(Request::Hello { protocol, client }) => (protocol, client),
            Ok(request) => {
                let kind = request.type_name();
                return Err(out_of_order(link.as_mut(), format!("{kind} before hello")));
            }
            Err(FrameError::UnknownType(kind)) => {
                return Err(out_of_order(
                    link.as_mut(),
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
                    return Err(refuse_version(link.as_mut(), protocol));
                }
                farewell(link.as_mut(), ErrorCode::BadRequest, error.to_string());
                return Err(error.into());
            }
        };
        if protocol != PROTOCOL_VERSION {
            return Err(refuse_version(link.as_mut(), protocol));
        }
        let is_admin = is_admin(&peer);
        send_message(
            link.as_mut(),
            &Response::Welcome {
                protocol: PROTOCOL_VERSION,
                daemon_version: daemon_version.to_owned(),
                uid: peer.uid,
                is_admin,
            },
        )?;
        if before.is_none() {
            link.set_timeouts(None, None).map_err(FrameError::Io)?;
        }
        Ok(ServerConnection {
            link,
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
        let link = self.link.as_mut();
        loop {
            let Some(frame) = recv_request_frame(link)? else {
                return Ok(None);
            };
            match decode::<Request>(&frame) {
                Ok(Request::Hello { .. }) => {
                    return Err(out_of_order(link, "a second hello".into()));
                }
                Ok(request) => return Ok(Some(Incoming::Request(request))),
                Err(FrameError::UnknownType(kind)) => {
                    return Ok(Some(Incoming::Unsupported(kind)));
                }
                // Its descriptors follow in the stream, or not (a broken
                // client): either way, its place in the stream is lost.
                Err(error @ FrameError::Invalid { .. }) if invalid_kind(&error) == Some("run") => {
                    farewell(link, ErrorCode::BadRequest, error.to_string());
                    return Err(error.into());
                }
                Err(error @ FrameError::Invalid { .. }) => {
                    send_message(
                        link,
                        &Response::error(ErrorCode::BadRequest, error.to_string()),
                    )?;
                }
                Err(error) => {
                    farewell(link, ErrorCode::BadRequest, error.to_string());
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
            Ok(body) => Ok(self.link.send_frame(&body, &[])?),
            Err(error @ FrameError::Oversized { .. }) => {
                send_message(
                    self.link.as_mut(),
                    &Response::error(
                        ErrorCode::Internal,
                        format!("the {} answer is too large: {error}", response.type_name()),
                    ),
                )?;
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
            Ok(body) => Ok(self.link.send_frame(&body, &[])?),
            Err(FrameError::Oversized { .. }) if lines.len() > 1 => {
                let (first, second) = lines.split_at(lines.len() / 2);
                self.send_records(first)?;
                self.send_records(second)
            }
            Err(error @ FrameError::Oversized { .. }) => {
                send_message(
                    self.link.as_mut(),
                    &Response::error(
                        ErrorCode::Internal,
                        format!("an audit record is too large to send: {error}"),
                    ),
                )?;
                Err(error.into())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Polls readable when a request waits or the client is gone: to wait
    /// for the client and something else at once, or to notice that a
    /// client following a stream (which sends nothing more) left.
    pub fn readiness(&self) -> BorrowedFd<'_> {
        self.link.readiness()
    }

    /// Sets how long reading a request may take; `None` waits forever.
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.link.set_timeouts(timeout, None)
    }

    /// The caller's descriptors that come with a [`Request::Run`]: receive
    /// them first, whatever is then decided. Waits at most 10 s. On `Err`
    /// the client has been told why (where it still listens), whatever came
    /// is closed, and the connection must be closed: it is out of step.
    pub fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, ServerError> {
        let before = self.link.read_timeout();
        let _ = self.link.set_timeouts(Some(FDS_TIMEOUT), None);
        let received = self.link.recv_fds(expected);
        let _ = self.link.set_timeouts(before, None);
        received.map_err(|error| {
            farewell(self.link.as_mut(), ErrorCode::BadRequest, error.to_string());
            error.into()
        })
    }
}

/// A client that has connected, over either transport, before its hello:
/// the daemon checks who it is, then accepts or refuses it.
#[derive(Debug)]
pub struct Arrival {
    link: Box<dyn Link>,
    peer: PeerCredentials,
}

/// How long a refused client has to say hello before it is dropped.
const REFUSE_WAIT: Duration = Duration::from_secs(2);

impl Arrival {
    /// A client on the Unix socket; its peer from SO_PEERCRED /
    /// getpeereid.
    pub fn socket(stream: UnixStream) -> io::Result<Arrival> {
        let peer = peer_credentials(&stream)?;
        Ok(Arrival {
            link: Box::new(Connection::new(stream)),
            peer,
        })
    }

    /// A peer of the daemon's XPC listener; its peer from its audit token.
    #[cfg(target_os = "macos")]
    pub fn xpc(connection: crate::xpc::XpcConnection) -> Arrival {
        let peer = connection.peer();
        Arrival {
            link: Box::new(connection),
            peer,
        }
    }

    /// A client on any link (tests).
    #[cfg(test)]
    pub(crate) fn from_link(link: Box<dyn Link>, peer: PeerCredentials) -> Arrival {
        Arrival { link, peer }
    }

    /// Who connected, as the kernel (or XPC) says.
    pub fn peer(&self) -> PeerCredentials {
        self.peer
    }

    /// The handshake, as [`ServerConnection::accept`] does it.
    pub fn accept(
        self,
        daemon_version: &str,
        is_admin: impl FnOnce(&PeerCredentials) -> bool,
    ) -> Result<ServerConnection, ServerError> {
        ServerConnection::handshake(self.link, self.peer, daemon_version, is_admin)
    }

    /// Answers the client's hello with an error instead of a welcome (a
    /// full quota, say), so its connect fails saying why; waits at most 2 s
    /// for the hello.
    pub fn refuse(mut self, code: ErrorCode, message: &str) {
        let _ = self.link.set_timeouts(Some(REFUSE_WAIT), Some(REFUSE_WAIT));
        if let Ok(Some(_hello)) = self.link.recv_frame() {
            let _ = send_message(self.link.as_mut(), &Response::error(code, message));
        }
    }
}

/// Encodes and sends one message.
fn send_message<T: Serialize>(link: &mut dyn Link, message: &T) -> Result<(), FrameError> {
    link.send_frame(&encode(message)?, &[])
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
fn recv_request_frame(link: &mut dyn Link) -> Result<Option<Vec<u8>>, ServerError> {
    match link.recv_frame() {
        Err(error @ FrameError::Oversized { .. }) => {
            farewell(link, ErrorCode::BadRequest, error.to_string());
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

fn out_of_order(link: &mut dyn Link, what: String) -> ServerError {
    farewell(link, ErrorCode::BadRequest, format!("out of order: {what}"));
    ServerError::OutOfOrder(what)
}

fn refuse_version(link: &mut dyn Link, protocol: u32) -> ServerError {
    farewell(
        link,
        ErrorCode::VersionMismatch,
        format!("this epmd speaks protocol {PROTOCOL_VERSION}, the client {protocol}"),
    );
    ServerError::VersionMismatch(protocol)
}

/// Tells the client why it is being disconnected, if it still listens.
fn farewell(link: &mut dyn Link, code: ErrorCode, message: String) {
    let read = link.read_timeout();
    let _ = link.set_timeouts(read, Some(FAREWELL_TIMEOUT));
    let _ = send_message(link, &Response::error(code, message));
}

#[cfg(test)]
mod tests;
