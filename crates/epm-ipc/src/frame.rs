//! Length-prefixed frames.

use std::io::{self, Read, Write};

/// The largest frame either side accepts: far above any message (an audit
/// batch, a policy document), small enough that a hostile length cannot
/// make the daemon allocate much.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The announced length is over the limit; nothing was allocated.
    #[error("frame of {announced} bytes is over the limit of {limit}")]
    Oversized {
        /// What the length prefix said.
        announced: u64,
        /// The limit.
        limit: usize,
    },
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads one frame; `Ok(None)` when the peer closed cleanly between frames.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            announced: len as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(body))
}

/// Writes one frame.
pub fn write_frame(writer: &mut impl Write, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            announced: body.len() as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    writer.write_all(&frame)?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_clean_eof() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"{\"type\":\"status\"}").unwrap();
        write_frame(&mut buf, b"").unwrap();
        let mut reader = &buf[..];
        assert_eq!(
            read_frame(&mut reader).unwrap().unwrap(),
            b"{\"type\":\"status\"}"
        );
        assert_eq!(read_frame(&mut reader).unwrap().unwrap(), b"");
        assert!(read_frame(&mut reader).unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let frame = u32::MAX.to_be_bytes();
        let err = read_frame(&mut &frame[..]).unwrap_err();
        assert!(matches!(
            err,
            FrameError::Oversized {
                announced: 4_294_967_295,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "frame of 4294967295 bytes is over the limit of 1048576"
        );
    }

    #[test]
    fn truncated_frames() {
        assert!(matches!(
            read_frame(&mut &[0u8, 0][..]),
            Err(FrameError::Truncated)
        ));
        let mut short = 10u32.to_be_bytes().to_vec();
        short.extend_from_slice(b"abc");
        assert!(matches!(
            read_frame(&mut &short[..]),
            Err(FrameError::Truncated)
        ));
    }
}
