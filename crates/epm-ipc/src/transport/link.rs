//! What a transport must do for [`crate::ServerConnection`] and
//! [`crate::Client`], which hold the protocol (the handshake, telling
//! unknown requests from garbage, batching records) once for every
//! transport: the Unix socket ([`crate::Connection`]) and, on macOS, XPC
//! (`xpc::XpcConnection`).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::frame::FrameError;
use crate::transport::fds::FdError;

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

/// One connection's frames, descriptors and peer.
pub(crate) trait Link: Send + std::fmt::Debug {
    /// Sends one frame body (already within the size limit), with `fds`
    /// travelling alongside it when there are any.
    fn send_frame(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError>;

    /// The next frame body; `Ok(None)` when the peer is gone. Waits at most
    /// the read timeout ([`FrameError::TimedOut`]).
    fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError>;

    /// The descriptors that came with the frame just read: exactly
    /// `expected`, or an error (and whatever came is closed).
    fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, FdError>;

    /// How long a read (and, where the transport can block on one, a
    /// write) may take; `None` waits forever.
    fn set_timeouts(&mut self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;

    /// The read timeout now in force.
    fn read_timeout(&self) -> Option<Duration>;

    /// A descriptor that polls readable (`POLLIN`) when a frame waits or
    /// the peer is gone, to wait for the peer and something else at once.
    fn readiness(&self) -> BorrowedFd<'_>;

    /// Who is on the other end, as the kernel (or XPC) says.
    fn peer(&self) -> io::Result<PeerCredentials>;
}
