//! What an XPC message carries, independent of XPC itself so it is tested
//! on every platform: each message is a dictionary whose [`FRAME_KEY`] holds
//! one frame body (the same JSON bytes the Unix socket carries after its
//! length prefix), at most [`MAX_FRAME_BYTES`].

use crate::frame::{FrameError, MAX_FRAME_BYTES};
use crate::message::{Message, decode};

/// The Mach service `epmd` listens on (its launchd plist's
/// `MachServices` key; `tests/macos_packaging.rs` checks they agree).
pub const MACH_SERVICE_NAME: &str = "com.epm.epmd.xpc";

/// The dictionary key holding the frame body.
pub const FRAME_KEY: &str = "frame";

/// What arrived on an XPC connection, once classified.
#[derive(Debug, PartialEq)]
pub enum XpcEvent<T> {
    /// A well-formed message.
    Message(T),
    /// The peer went away (or the connection was cancelled): no more will
    /// come.
    PeerGone,
    /// Something that is not a message: the connection is cancelled.
    Garbage(String),
}

/// Classifies the body of one dictionary: `None` when it had no data under
/// [`FRAME_KEY`].
pub fn classify<T: Message>(frame: Option<&[u8]>) -> XpcEvent<T> {
    match check(frame).and_then(decode::<T>) {
        Ok(message) => XpcEvent::Message(message),
        Err(error) => XpcEvent::Garbage(error.to_string()),
    }
}

/// The frame's bytes, if present and within the size limit.
pub fn check(frame: Option<&[u8]>) -> Result<&[u8], FrameError> {
    let frame = frame.ok_or_else(|| {
        FrameError::NotAMessage(format!("the XPC message has no data under {FRAME_KEY:?}"))
    })?;
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            announced: frame.len() as u64,
            limit: MAX_FRAME_BYTES,
        });
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, encode};

    #[test]
    fn a_frame_from_encode_is_a_message() {
        let bytes = encode(&Request::Status).unwrap();
        assert_eq!(
            classify::<Request>(Some(&bytes)),
            XpcEvent::Message(Request::Status)
        );
    }

    #[test]
    fn missing_oversized_and_garbage_frames_are_garbage() {
        assert!(matches!(classify::<Request>(None), XpcEvent::Garbage(_)));
        let huge = vec![b' '; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            classify::<Request>(Some(&huge)),
            XpcEvent::Garbage(ref why) if why.contains("limit") || why.contains("large") || why.contains("bytes")
        ));
        assert!(matches!(
            classify::<Request>(Some(b"\xff\x00not json")),
            XpcEvent::Garbage(_)
        ));
        assert!(matches!(
            classify::<Request>(Some(br#"{"no":"type"}"#)),
            XpcEvent::Garbage(_)
        ));
    }
}
