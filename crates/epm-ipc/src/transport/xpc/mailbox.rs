//! A bounded queue whose reader can also be waited on with `poll(2)`: the
//! XPC transport's inbox. XPC delivers a connection's messages to a
//! handler on a dispatch queue; the daemon waits for "a request, or the
//! command ended" and helpers for "a message, or a key pressed" with
//! `poll`, as they do on the Unix socket. So every posted item is
//! announced by one byte on a pipe (which holds 64 KiB of them; a socket
//! pair would count each byte's buffer overhead), and the poster going
//! away closes it: the reader's [`Mailbox::readiness`] descriptor is readable
//! exactly when [`Mailbox::recv`] would not block.
//!
//! Portable (no XPC here), so it is tested on every platform.

use std::io::{ErrorKind, PipeReader, PipeWriter, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

/// The posting side: dropping it ends the mailbox (the reader gets what
/// is queued, then `Ok(None)`).
#[derive(Debug)]
pub(crate) struct Posting<T> {
    items: SyncSender<T>,
    doorbell: PipeWriter,
}

/// The reading side.
#[derive(Debug)]
pub(crate) struct Mailbox<T> {
    items: Receiver<T>,
    doorbell: PipeReader,
}

/// Why an item was not posted; the poster should end the mailbox (drop
/// the [`Posting`]), which the reader then sees.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PostError {
    /// `depth` items are waiting: the reader is not keeping up (or the
    /// peer floods).
    Full,
    /// The reader is gone.
    Closed,
}

/// A mailbox holding at most `depth` unread items.
pub(crate) fn mailbox<T>(depth: usize) -> std::io::Result<(Posting<T>, Mailbox<T>)> {
    let (hear, ring) = std::io::pipe()?;
    nonblocking(ring.as_fd())?;
    nonblocking(hear.as_fd())?;
    let (tx, rx) = sync_channel(depth);
    Ok((
        Posting {
            items: tx,
            doorbell: ring,
        },
        Mailbox {
            items: rx,
            doorbell: hear,
        },
    ))
}

/// Sets `O_NONBLOCK`, keeping the other status flags.
fn nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::fd::AsRawFd;
    let fd = fd.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

impl<T> Posting<T> {
    /// Queues `item` without blocking.
    pub(crate) fn post(&self, item: T) -> Result<(), PostError> {
        // The byte goes first: the reader may then find the doorbell rung
        // a moment before the item, never an item without its byte (which
        // would leave a poller asleep with a request waiting). A byte
        // without an item only ever precedes the end, since a failed post
        // ends the mailbox.
        match (&self.doorbell).write(&[1]) {
            Ok(_) => {}
            // A full pipe means 64 KiB of unread bytes: far past any
            // `depth` this is used with, so the send below would fail too.
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Err(PostError::Full),
            Err(_) => return Err(PostError::Closed),
        }
        self.items.try_send(item).map_err(|error| match error {
            TrySendError::Full(_) => PostError::Full,
            TrySendError::Disconnected(_) => PostError::Closed,
        })
    }
}

/// [`Mailbox::recv`] waited its whole timeout.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TimedOut;

impl<T> Mailbox<T> {
    /// The next item, waiting up to `timeout` (`None`: forever); `Ok(None)`
    /// once the poster is gone and everything it posted has been read.
    pub(crate) fn recv(&self, timeout: Option<Duration>) -> Result<Option<T>, TimedOut> {
        let item = match timeout {
            Some(timeout) => match self.items.recv_timeout(timeout) {
                Ok(item) => item,
                Err(RecvTimeoutError::Timeout) => return Err(TimedOut),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            },
            None => match self.items.recv() {
                Ok(item) => item,
                Err(_) => return Ok(None),
            },
        };
        // Its byte was written before it was queued: take it.
        let _ = (&self.doorbell).read(&mut [0u8; 1]);
        Ok(Some(item))
    }

    /// Readable (`POLLIN`) while an item waits or after the end.
    pub(crate) fn readiness(&self) -> BorrowedFd<'_> {
        self.doorbell.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    fn readable(mailbox: &Mailbox<u32>) -> bool {
        let mut fds = [PollFd::new(mailbox.readiness(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() > 0
    }

    #[test]
    fn readable_exactly_while_items_wait() {
        let (posting, mailbox) = mailbox::<u32>(4).unwrap();
        assert!(!readable(&mailbox));
        posting.post(1).unwrap();
        posting.post(2).unwrap();
        assert!(readable(&mailbox));
        assert_eq!(mailbox.recv(None), Ok(Some(1)));
        assert!(readable(&mailbox));
        assert_eq!(mailbox.recv(None), Ok(Some(2)));
        assert!(!readable(&mailbox));
        assert_eq!(mailbox.recv(Some(Duration::from_millis(10))), Err(TimedOut));
    }

    #[test]
    fn the_end_is_readable_after_what_was_queued() {
        let (posting, mailbox) = mailbox::<u32>(4).unwrap();
        posting.post(7).unwrap();
        drop(posting);
        assert_eq!(mailbox.recv(None), Ok(Some(7)));
        assert!(readable(&mailbox), "the end must wake a poller");
        assert_eq!(mailbox.recv(None), Ok(None));
        assert_eq!(mailbox.recv(Some(Duration::from_millis(10))), Ok(None));
    }

    #[test]
    fn a_full_or_abandoned_mailbox_refuses() {
        let (posting, mailbox) = mailbox::<u32>(2).unwrap();
        posting.post(1).unwrap();
        posting.post(2).unwrap();
        assert_eq!(posting.post(3), Err(PostError::Full));
        drop(mailbox);
        assert_eq!(posting.post(4), Err(PostError::Closed));
    }

    #[test]
    fn a_poller_on_another_thread_wakes_for_each_post() {
        let (posting, mailbox) = mailbox::<u32>(1000).unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                let mut fds = [PollFd::new(mailbox.readiness(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::NONE).unwrap();
                match mailbox.recv(None).unwrap() {
                    Some(item) => got.push(item),
                    None => return got,
                }
            }
        });
        for item in 0..1000 {
            posting.post(item).unwrap();
        }
        drop(posting);
        assert_eq!(reader.join().unwrap(), (0..1000).collect::<Vec<_>>());
    }
}
