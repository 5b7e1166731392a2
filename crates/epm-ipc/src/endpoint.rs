//! Where a client finds `epmd`, and the one place that names both
//! transports: a client's [`Endpoint`] opens a Unix socket or an XPC
//! connection, and the daemon's listeners hand their peers to the protocol
//! as an [`Arrival`]. Everything else runs the protocol over a `Link`
//! without knowing which.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use crate::frame::FrameError;
use crate::protocol::{Arrival, Client, ClientError, ServerConnection, ServerError};
use crate::transport::link::Link;
use crate::transport::link::PeerCredentials;
use crate::transport::unix::{Connection, DEFAULT_SOCKET_PATH, peer_credentials};

/// Where a client finds `epmd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// The control socket at this path.
    Socket(PathBuf),
    /// The XPC Mach service of this name (macOS): `epmd`'s launchd plist
    /// publishes [`crate::transport::xpc::frame::MACH_SERVICE_NAME`].
    MachService(String),
}

impl Endpoint {
    /// Where `epmd` listens unless configured otherwise: its XPC service on
    /// macOS (where XPC also checks the client's code signature, when the
    /// daemon is configured to), the socket [`DEFAULT_SOCKET_PATH`]
    /// elsewhere.
    pub fn platform_default() -> Endpoint {
        if cfg!(target_os = "macos") {
            Endpoint::MachService(crate::transport::xpc::frame::MACH_SERVICE_NAME.to_owned())
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

impl Client {
    /// Connects to the daemon and performs the handshake. `client` names
    /// this program in the daemon's log, e.g. `epmctl 0.1.0`. Reads and
    /// writes time out after [`crate::DEFAULT_CLIENT_TIMEOUT`].
    pub fn connect(endpoint: &Endpoint, client: &str) -> Result<Client, ClientError> {
        let link = open(endpoint)?;
        Client::handshake(link, client, || match endpoint {
            // XPC looks the service up on the first message: a missing or
            // refusing service shows only as the end of the connection.
            Endpoint::MachService(name) => ClientError::ServiceUnavailable(name.clone()),
            Endpoint::Socket(_) => ClientError::Closed,
        })
    }
}

impl ServerConnection {
    /// Reads the client's `Hello` on a Unix socket, answers
    /// [`Response::Welcome`](crate::message::Response::Welcome) with the peer's uid and `is_admin(&peer)`, and
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
}

impl Arrival {
    /// A client on the Unix socket; its peer from SO_PEERCRED /
    /// getpeereid.
    pub fn socket(stream: UnixStream) -> io::Result<Arrival> {
        let peer = peer_credentials(&stream)?;
        Ok(Arrival::from_link(Box::new(Connection::new(stream)), peer))
    }

    /// A peer of the daemon's XPC listener; its peer from its audit token.
    #[cfg(target_os = "macos")]
    pub fn xpc(connection: crate::transport::xpc::XpcConnection) -> Arrival {
        let peer = connection.peer();
        Arrival::from_link(Box::new(connection), peer)
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
        Endpoint::MachService(name) => crate::transport::xpc::XpcConnection::connect(name)
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
