//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes
//! of UTF-8 JSON.

use std::io::{self, Read, Write};

/// The largest frame either side accepts: far above any message (an audit
/// batch, a policy document), small enough that a hostile length cannot
/// make the daemon allocate much.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The body is read in steps of this size, so memory follows the bytes that
/// actually arrive, not the length a peer announces.
const READ_STEP: usize = 64 * 1024;

/// Why a frame could not be read, written or understood. After any of
/// these the stream may be out of step: close the connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length is over the limit; nothing was allocated.
    #[error("frame of {announced} bytes is over the limit of {limit}")]
    Oversized {
        /// What the length prefix said.
        announced: u64,
        /// The limit ([`MAX_FRAME_BYTES`]).
        limit: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes of its {part})")]
    Truncated {
        /// `length prefix` or `body`.
        part: &'static str,
        /// The bytes that part needed.
        expected: usize,
        /// The bytes that came.
        got: usize,
    },
    /// The socket's read or write timeout expired.
    #[error("timed out waiting for the other side")]
    TimedOut,
    /// The body is not JSON (or not UTF-8).
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON, but not an object with a string `type`.
    #[error("frame is not a message: {0}")]
    NotAMessage(String),
    /// A message whose `type` this side does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A message of a known type with missing, extra or mistyped fields.
    #[error("invalid {kind} message: {detail}")]
    Invalid {
        /// The message's `type`.
        kind: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The socket failed.
    #[error("{0}")]
    Io(io::Error),
}

impl From<io::Error> for FrameError {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            // What an expired socket timeout looks like (WouldBlock on Unix).
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FrameError::TimedOut,
            _ => FrameError::Io(error),
        }
    }
}

/// Reads one frame: `Ok(None)` when the peer closed cleanly between frames,
/// [`FrameError::Truncated`] when it closed inside one. A length over
/// [`MAX_FRAME_BYTES`] is refused before anything is allocated for it.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let got = read_until_eof(reader, &mut prefix)?;
    if got == 0 {
        return Ok(None);
    }
    if got < prefix.len() {
        return Err(FrameError::Truncated {
            part: "length prefix",
            expected: prefix.len(),
            got,
        });
    }
    let announced = u32::from_be_bytes(prefix);
    let len = match usize::try_from(announced) {
        Ok(len) if len <= MAX_FRAME_BYTES => len,
        _ => {
            return Err(FrameError::Oversized {
                announced: u64::from(announced),
                limit: MAX_FRAME_BYTES,
            });
        }
    };
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        let step = (len - start).min(READ_STEP);
        body.resize(start + step, 0);
        let got = read_until_eof(reader, &mut body[start..])?;
        body.truncate(start + got);
        if got < step {
            return Err(FrameError::Truncated {
                part: "body",
                expected: len,
                got: body.len(),
            });
        }
    }
    Ok(Some(body))
}

/// Fills `buf` unless the stream ends first; returns how much was filled.
fn read_until_eof(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Writes one frame, refusing a body over [`MAX_FRAME_BYTES`] (the peer
/// would refuse it anyway, and lose its place in the stream).
pub fn write_frame(writer: &mut impl Write, body: &[u8]) -> Result<(), FrameError> {
    let len = match u32::try_from(body.len()) {
        Ok(len) if body.len() <= MAX_FRAME_BYTES => len,
        _ => {
            return Err(FrameError::Oversized {
                announced: body.len() as u64,
                limit: MAX_FRAME_BYTES,
            });
        }
    };
    // One buffer, one write_all: the length never goes out without its body
    // because of a failure between two writes.
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_probe::largest_allocation_during;

    #[test]
    fn round_trip_and_clean_eof() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{\"type\":\"status\"}").unwrap();
        write_frame(&mut buf, b"").unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 17], "big-endian length");
        let mut reader = &buf[..];
        assert_eq!(
            read_frame(&mut reader).unwrap().unwrap(),
            b"{\"type\":\"status\"}"
        );
        assert_eq!(read_frame(&mut reader).unwrap().unwrap(), b"");
        assert!(read_frame(&mut reader).unwrap().is_none());
    }

    #[test]
    fn a_frame_of_exactly_the_limit_passes() {
        let body = vec![b' '; MAX_FRAME_BYTES];
        let mut buf = Vec::new();
        write_frame(&mut buf, &body).unwrap();
        assert_eq!(
            read_frame(&mut &buf[..]).unwrap().unwrap().len(),
            body.len()
        );
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        // 4 GiB announced, nothing behind it.
        let frame = u32::MAX.to_be_bytes();
        let (result, largest) = largest_allocation_during(|| read_frame(&mut &frame[..]));
        let err = result.unwrap_err();
        assert!(matches!(
            err,
            FrameError::Oversized {
                announced: 4_294_967_295,
                limit: MAX_FRAME_BYTES,
            }
        ));
        assert_eq!(
            err.to_string(),
            "frame of 4294967295 bytes is over the limit of 1048576"
        );
        assert!(largest < 1024, "allocated {largest} bytes");

        let one_over = (MAX_FRAME_BYTES as u32 + 1).to_be_bytes();
        assert!(matches!(
            read_frame(&mut &one_over[..]),
            Err(FrameError::Oversized {
                announced: 1_048_577,
                ..
            })
        ));
    }

    #[test]
    fn a_peer_announcing_the_limit_and_sending_little_costs_little() {
        let mut frame = (MAX_FRAME_BYTES as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let (result, largest) = largest_allocation_during(|| read_frame(&mut &frame[..]));
        assert!(matches!(
            result,
            Err(FrameError::Truncated {
                part: "body",
                expected: MAX_FRAME_BYTES,
                got: 2
            })
        ));
        assert!(largest <= READ_STEP, "allocated {largest} bytes");
    }

    #[test]
    fn refuses_to_write_an_oversized_frame() {
        let mut out = Vec::new();
        let err = write_frame(&mut out, &vec![0; MAX_FRAME_BYTES + 1]).unwrap_err();
        assert!(matches!(err, FrameError::Oversized { .. }), "{err}");
        assert!(out.is_empty(), "nothing half-written");
    }

    #[test]
    fn truncated_frames() {
        let err = read_frame(&mut &[0u8, 0][..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "connection closed in the middle of a frame (2 of 4 bytes of its length prefix)"
        );
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        let err = read_frame(&mut &short[..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "connection closed in the middle of a frame (3 of 10 bytes of its body)"
        );
    }

    #[test]
    fn reads_a_frame_that_arrives_a_byte_at_a_time() {
        /// One byte per read, and an interruption before each.
        struct Trickle<'a>(&'a [u8], bool);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let Some((first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = *first;
                self.0 = rest;
                Ok(1)
            }
        }
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{\"type\":\"end\"}").unwrap();
        let mut trickle = Trickle(&buf, false);
        assert_eq!(
            read_frame(&mut trickle).unwrap().unwrap(),
            b"{\"type\":\"end\"}"
        );
        assert!(read_frame(&mut trickle).unwrap().is_none());
    }

    #[test]
    fn a_timeout_is_named() {
        struct Silent;
        impl Read for Silent {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let err = read_frame(&mut Silent).unwrap_err();
        assert!(matches!(err, FrameError::TimedOut), "{err}");
    }
}
