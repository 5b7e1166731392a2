//! The protocol on either transport: the handshake on both sides, the
//! client ([`Client`]) and the daemon's side of a connection
//! ([`ServerConnection`], entered through an [`Arrival`]), and why either
//! gives up ([`ClientError`], [`ServerError`]).
//!
//! It runs over any [`Link`] and never names a transport: `endpoint` picks
//! the Unix socket or XPC, `transport` implements them.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::frame::FrameError;
use crate::message::{
    ErrorCode, Message, PROTOCOL_VERSION, Request, Response, decode, encode, shorten,
};
use crate::transport::fds::FdError;
use crate::transport::link::{Link, PeerCredentials};

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
    /// A client on any link: a transport's constructor (`endpoint`), or a
    /// test.
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
