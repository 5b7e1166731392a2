//! The Unix-socket transport: a framed, typed [`Connection`] over a
//! `UnixStream`, and who the peer is as the kernel says.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::Serialize;

use crate::frame::{FrameError, read_frame, write_frame};
use crate::message::{Message, decode, encode};
use crate::transport::fds::{self, FdError};
use crate::transport::link::{Link, PeerCredentials};

/// Where `epmd` listens unless configured otherwise (Linux and macOS).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/epm/epmd.sock";

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

    /// Sends the byte [`fds::FD_MARKER`] carrying `fds` (SCM_RIGHTS): what
    /// follows a [`crate::Request::Run`] frame.
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        fds::send_fds(&self.stream, fds)
    }

    /// Receives the byte [`fds::FD_MARKER`] and exactly `expected` descriptors
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
