//! Passing file descriptors over the socket (SCM_RIGHTS), for
//! [`crate::Request::Run`]: the client's stdin, stdout and stderr travel
//! with one byte, [`FD_MARKER`], sent right after the `run` frame.
//!
//! Frames are read with plain `read`s of exactly the bytes a frame has, so
//! the marker byte is never read as part of a frame. Descriptors that come
//! with bytes read by a plain `read` (a client sending them where none are
//! expected) are closed by the kernel, never installed in the daemon; the
//! ones that do arrive here are owned at once and close on every error path,
//! and they are close-on-exec from the start where the platform allows it
//! (`MSG_CMSG_CLOEXEC`; elsewhere set right after they arrive).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The byte that carries the descriptors.
pub const FD_MARKER: u8 = 0;

/// The most descriptors one message is read with room for: Linux never
/// sends more in one message (SCM_MAX_FD is 253), so nothing is cut off.
const FD_ROOM: usize = 256;

/// Why the descriptors that should follow a request did not arrive as
/// they should. After any of these the stream is out of step: close it.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// The byte came without descriptors.
    #[error("no file descriptors came with the request (expected {expected})")]
    NoFds {
        /// How many were expected.
        expected: usize,
    },
    /// A different number came (they were closed).
    #[error("{got} file descriptors came with the request, expected {expected}")]
    WrongCount {
        /// How many were expected.
        expected: usize,
        /// How many came.
        got: usize,
    },
    /// The byte was not [`FD_MARKER`] (the stream is out of step).
    #[error("expected the file descriptor byte 0x00 after the request, got {0:#04x}")]
    NotMarker(u8),
    /// More descriptors came than there was room for; the kernel closed
    /// what did not fit, and those that did were closed here.
    #[error("too many file descriptors came with the request (expected {expected})")]
    Truncated {
        /// How many were expected.
        expected: usize,
    },
    /// The peer closed the connection instead.
    #[error("the connection closed before the file descriptors came")]
    Closed,
    /// The socket's read timeout expired.
    #[error("timed out waiting for the file descriptors")]
    TimedOut,
    /// The socket failed.
    #[error("receiving file descriptors: {0}")]
    Io(io::Error),
}

impl From<Errno> for FdError {
    fn from(errno: Errno) -> Self {
        match errno {
            Errno::EAGAIN | Errno::ETIMEDOUT => FdError::TimedOut,
            other => FdError::Io(other.into()),
        }
    }
}

/// Sends [`FD_MARKER`] carrying `fds` (at least one).
pub(crate) fn send_fds(stream: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let byte = [FD_MARKER];
    let iov = [IoSlice::new(&byte)];
    loop {
        match sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None) {
            Ok(1) => return Ok(()),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "sendmsg sent nothing",
                ));
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Receives [`FD_MARKER`] and exactly `expected` descriptors.
pub(crate) fn recv_fds(stream: &UnixStream, expected: usize) -> Result<Vec<OwnedFd>, FdError> {
    let mut byte = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; FD_ROOM]);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly"
    ))]
    let flags = MsgFlags::MSG_CMSG_CLOEXEC;
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly"
    )))]
    let flags = MsgFlags::empty();
    let (got_bytes, truncated, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut byte)];
        match recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Ok(message) => {
                let mut fds = Vec::new();
                let truncated = message.flags.contains(MsgFlags::MSG_CTRUNC);
                // With MSG_CTRUNC nix will not walk the messages; the kernel
                // has closed what did not fit (Linux never cuts SCM_RIGHTS
                // below FD_ROOM descriptors).
                if let Ok(cmsgs) = message.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = cmsg {
                            for fd in raw {
                                // SAFETY: the kernel has just installed `fd`
                                // in this process for this message; nothing
                                // else knows it, so it is ours to own.
                                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                }
                break (message.bytes, truncated, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    };
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "openbsd",
        target_os = "dragonfly"
    )))]
    for fd in &fds {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    if got_bytes == 0 {
        return Err(FdError::Closed);
    }
    if byte[0] != FD_MARKER {
        return Err(FdError::NotMarker(byte[0]));
    }
    if truncated {
        return Err(FdError::Truncated { expected });
    }
    match fds.len() {
        0 => Err(FdError::NoFds { expected }),
        got if got != expected => Err(FdError::WrongCount { expected, got }),
        _ => Ok(fds),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use super::*;

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (std::fs::File::from(r), std::fs::File::from(w))
    }

    #[test]
    fn three_descriptors_cross_and_work() {
        let (client, server) = UnixStream::pair().unwrap();
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let fds: Vec<BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send_fds(&client, &fds).unwrap();
        let got = recv_fds(&server, 3).unwrap();
        assert_eq!(got.len(), 3);
        for (i, fd) in got.into_iter().enumerate() {
            let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert!(
                nix::fcntl::FdFlag::from_bits_truncate(flags)
                    .contains(nix::fcntl::FdFlag::FD_CLOEXEC),
                "received descriptors are close-on-exec"
            );
            let mut file = std::fs::File::from(fd);
            write!(file, "pipe {i}").unwrap();
        }
        drop(fds);
        for (i, (mut r, w)) in pipes.into_iter().enumerate() {
            drop(w);
            let mut text = String::new();
            r.read_to_string(&mut text).unwrap();
            assert_eq!(text, format!("pipe {i}"));
        }
    }

    #[test]
    fn frames_around_the_marker_stay_in_step() {
        let (client, server) = UnixStream::pair().unwrap();
        let (_r, w) = pipe();
        let mut client_conn = crate::Connection::new(client);
        client_conn.send(&crate::Request::Status).unwrap();
        send_fds(client_conn.stream(), &[w.as_fd(), w.as_fd(), w.as_fd()]).unwrap();
        client_conn.send(&crate::Request::PolicyShow).unwrap();
        let mut server_conn = crate::Connection::new(server);
        assert_eq!(
            server_conn.recv::<crate::Request>().unwrap(),
            Some(crate::Request::Status)
        );
        assert_eq!(recv_fds(server_conn.stream(), 3).unwrap().len(), 3);
        assert_eq!(
            server_conn.recv::<crate::Request>().unwrap(),
            Some(crate::Request::PolicyShow)
        );
    }

    #[test]
    fn a_wrong_count_is_named_and_the_fds_are_closed() {
        let (client, server) = UnixStream::pair().unwrap();
        let (mut r, w) = pipe();
        send_fds(&client, &[w.as_fd(), w.as_fd()]).unwrap();
        drop(w);
        let error = recv_fds(&server, 3).unwrap_err();
        assert!(
            matches!(
                error,
                FdError::WrongCount {
                    expected: 3,
                    got: 2
                }
            ),
            "{error}"
        );
        // Every copy of the write end is closed: the reader sees the end.
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_byte_without_fds_or_a_closed_peer_is_named() {
        let (mut client, server) = UnixStream::pair().unwrap();
        client.write_all(&[FD_MARKER]).unwrap();
        let error = recv_fds(&server, 3).unwrap_err();
        assert!(matches!(error, FdError::NoFds { expected: 3 }), "{error}");

        client.write_all(b"{").unwrap();
        let error = recv_fds(&server, 3).unwrap_err();
        assert!(matches!(error, FdError::NotMarker(b'{')), "{error}");

        drop(client);
        let error = recv_fds(&server, 3).unwrap_err();
        assert!(matches!(error, FdError::Closed), "{error}");
    }

    #[test]
    fn fds_read_by_a_plain_read_are_not_installed() {
        let (client, mut server) = UnixStream::pair().unwrap();
        let (mut r, w) = pipe();
        send_fds(&client, &[w.as_fd()]).unwrap();
        drop(w);
        let mut byte = [9u8];
        server.read_exact(&mut byte).unwrap();
        assert_eq!(byte, [FD_MARKER]);
        // The only other copy of the write end was in flight: if the kernel
        // had installed it somewhere in this process, this would block.
        let mut rest = Vec::new();
        assert_eq!(r.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn a_silent_client_times_out() {
        let (_client, server) = UnixStream::pair().unwrap();
        server
            .set_read_timeout(Some(std::time::Duration::from_millis(50)))
            .unwrap();
        let error = recv_fds(&server, 3).unwrap_err();
        assert!(matches!(error, FdError::TimedOut), "{error}");
    }
}
