//! The XPC transport's portable half, tested on every platform: what a
//! connection's event handler does with each thing XPC delivers
//! ([`Deliverer`]), and what the reader does with it ([`Inbound`]). The
//! `xpc` module only adds the FFI: it triages each event
//! ([`super::frame::triage`]), dups the descriptors that came with a
//! frame, and cancels the connection when told to.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::frame::Triage;
use super::mailbox::{Mailbox, PostError, Posting, TimedOut, mailbox};
use crate::frame::FrameError;
use crate::transport::fds::FdError;

/// Messages queued per connection before the peer counts as flooding.
pub(crate) const QUEUE_DEPTH: usize = 64;

/// Messages sent on a connection and not yet handed to the system, before
/// the peer counts as not reading (the socket's write timeout, for XPC).
pub(crate) const IN_FLIGHT_LIMIT: usize = 1024;

/// Counts a connection's messages in flight. XPC's send never blocks and
/// never fails: it queues in this process's memory, so a peer that stops
/// reading (a helper stuck in a dialog) would make the daemon grow without
/// bound. Each send is counted, and a barrier after it (run once XPC has
/// handed the message on) uncounts it.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: std::sync::atomic::AtomicUsize,
}

impl InFlight {
    /// Counts one more message; `false` (nothing counted) when
    /// [`IN_FLIGHT_LIMIT`] are already in flight.
    pub(crate) fn start(&self) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < IN_FLIGHT_LIMIT).then_some(n + 1)
            })
            .is_ok()
    }

    /// One message was handed on.
    pub(crate) fn done(&self) {
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

/// What the handler hands the reader.
pub(crate) enum Delivered {
    /// A frame, with the descriptors that came beside it.
    Frame { body: Vec<u8>, fds: Vec<OwnedFd> },
    /// Not a message: the connection is over.
    Garbage(String),
}

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delivered::Frame { body, fds } => {
                write!(f, "Frame({} bytes, {} fds)", body.len(), fds.len())
            }
            Delivered::Garbage(why) => write!(f, "Garbage({why})"),
        }
    }
}

/// What the handler must do with the connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    /// Nothing: keep delivering.
    Keep,
    /// Cancel it: it is over (the peer left, flooded or sent garbage, or
    /// the reader is gone).
    Cancel,
}

/// The handler's side of one connection. Dropping its posting side is how
/// the reader learns that nothing more will come (after it has read what
/// is queued).
#[derive(Debug)]
pub(crate) struct Deliverer {
    posting: Mutex<Option<Posting<Delivered>>>,
    flooded: Arc<AtomicBool>,
    over: Arc<AtomicBool>,
}

impl Deliverer {
    /// One event. `fds` takes the descriptors that came with a frame (only
    /// called for one). Never blocks (a full queue is a flooding peer) and
    /// never panics.
    pub(crate) fn deliver(&self, triage: Triage<'_>, fds: impl FnOnce() -> Vec<OwnedFd>) -> After {
        // Only XPC's serial delivery takes this lock: never contended.
        let mut posting = self.posting.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(inbox) = posting.as_ref() else {
            // Already ended: the rest is XPC unwinding.
            return After::Keep;
        };
        match triage {
            Triage::Frame(bytes) => {
                let delivered = Delivered::Frame {
                    body: bytes.to_vec(),
                    fds: fds(),
                };
                match inbox.post(delivered) {
                    Ok(()) => return After::Keep,
                    Err(PostError::Full) => self.flooded.store(true, Ordering::Release),
                    // The reader is gone (its Drop cancels too).
                    Err(PostError::Closed) => {}
                }
            }
            // INVALID is the last event anyway; after INTERRUPTED or
            // TERMINATION_IMMINENT the session is over too: make it final,
            // so the reader's end stays true.
            Triage::PeerGone(_) => {}
            Triage::Garbage(why) => {
                // Room or not, the reader learns the connection ended.
                let _ = inbox.post(Delivered::Garbage(why));
            }
        }
        *posting = None;
        self.over.store(true, Ordering::Release);
        After::Cancel
    }
}

/// The reader's side of one connection.
#[derive(Debug)]
pub(crate) struct Inbound {
    inbox: Mailbox<Delivered>,
    flooded: Arc<AtomicBool>,
    /// The handler has ended the connection (told to cancel it).
    over: Arc<AtomicBool>,
    /// How long a read waits (`None`: forever).
    read_timeout: Option<Duration>,
    /// The descriptors that came with the last frame read.
    fds: Vec<OwnedFd>,
    /// The reader has seen the end (or garbage): nothing more to read or
    /// send.
    ended: bool,
}

/// A connection's two sides, made before the connection so that nothing
/// can fail once it exists.
pub(crate) fn inbox() -> std::io::Result<(Deliverer, Inbound)> {
    let (posting, inbox) = mailbox(QUEUE_DEPTH)?;
    let flooded = Arc::new(AtomicBool::new(false));
    let over = Arc::new(AtomicBool::new(false));
    Ok((
        Deliverer {
            posting: Mutex::new(Some(posting)),
            flooded: Arc::clone(&flooded),
            over: Arc::clone(&over),
        },
        Inbound {
            inbox,
            flooded,
            over,
            read_timeout: None,
            fds: Vec::new(),
            ended: false,
        },
    ))
}

impl Inbound {
    /// The next frame, waiting at most the read timeout; `Ok(None)` once
    /// the peer is gone. [`FrameError::NotAMessage`] (once) when the peer
    /// sent something that is not a frame, which ended the connection. The
    /// reader decodes, so that the daemon can answer a request of an
    /// unknown type `unsupported` and keep the connection.
    pub(crate) fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.ended {
            return Ok(None);
        }
        let delivered = match self.inbox.recv(self.read_timeout) {
            Ok(Some(delivered)) => delivered,
            Ok(None) => {
                self.ended = true;
                if self.flooded.swap(false, Ordering::Acquire) {
                    return Err(FrameError::Io(std::io::Error::other(format!(
                        "the XPC peer sent more than {QUEUE_DEPTH} messages ahead of the reader and was disconnected"
                    ))));
                }
                return Ok(None);
            }
            Err(TimedOut) => return Err(FrameError::TimedOut),
        };
        match delivered {
            Delivered::Frame { body, fds } => {
                self.fds = fds;
                Ok(Some(body))
            }
            Delivered::Garbage(why) => {
                self.ended = true;
                Err(FrameError::NotAMessage(why))
            }
        }
    }

    /// The descriptors that came with the frame just read: exactly
    /// `expected`, or an error (and they are closed).
    pub(crate) fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, FdError> {
        let fds = std::mem::take(&mut self.fds);
        match fds.len() {
            0 => Err(FdError::NoFds { expected }),
            got if got != expected => Err(FdError::WrongCount { expected, got }),
            _ => Ok(fds),
        }
    }

    /// Whether the connection is over: its end has been read, or the
    /// handler has ended it (what is queued may still be read). Nothing
    /// more can be sent.
    pub(crate) fn over(&self) -> bool {
        self.ended || self.over.load(Ordering::Acquire)
    }

    pub(crate) fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.read_timeout = timeout;
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        self.read_timeout
    }

    /// Readable while a frame waits or after the end.
    pub(crate) fn readiness(&self) -> BorrowedFd<'_> {
        self.inbox.readiness()
    }
}

#[cfg(test)]
mod tests;
