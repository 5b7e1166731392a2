//! What an XPC message carries and what the XPC transport does with each
//! thing XPC hands it, independent of XPC itself so it is tested on every
//! platform (the `xpc` module, macOS only, is the thin FFI around this).
//!
//! Each message is a dictionary whose [`FRAME_KEY`] holds, as XPC data,
//! one frame body: the same JSON bytes the Unix socket carries after its
//! length prefix, at most [`MAX_FRAME_BYTES`]. Anything else (another
//! kind of object, a missing, oversized or non-data frame, JSON that is
//! not a message) ends that one connection.

use std::ffi::CStr;

use crate::frame::{FrameError, MAX_FRAME_BYTES};

/// The Mach service `epmd` listens on (its launchd plist's
/// `MachServices` key; `tests/macos_packaging.rs` checks they agree).
pub const MACH_SERVICE_NAME: &str = "com.epm.epmd.xpc";

/// The dictionary key holding the frame body.
pub const FRAME_KEY: &str = "frame";

/// [`FRAME_KEY`] as the C string the XPC calls take.
pub const FRAME_KEY_C: &CStr = c"frame";

/// The keys of the descriptors a message carries beside its frame, in
/// order (`xpc_dictionary_set_fd`; for `run`: stdin, stdout, stderr). A
/// message carries at most this many.
pub const FD_KEYS: [&CStr; 3] = [c"fd.0", c"fd.1", c"fd.2"];

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

/// An object XPC delivered to a connection's event handler, as far as the
/// transport cares (the FFI side asks `xpc_get_type` and, for a
/// dictionary, `xpc_dictionary_get_data(FRAME_KEY)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received<'a> {
    /// `XPC_TYPE_DICTIONARY`, with the data under [`FRAME_KEY`] (`None`
    /// when the key is missing or its value is not data).
    Dictionary(Option<&'a [u8]>),
    /// `XPC_TYPE_ERROR`: one of the `XPC_ERROR_*` dictionaries.
    Error(XpcErrorKind),
    /// Any other type (a peer connection never delivers one; a listener's
    /// connections are handled by the listener).
    Other,
}

/// Which `XPC_ERROR_*` dictionary arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XpcErrorKind {
    /// `XPC_ERROR_CONNECTION_INVALID`: the connection is finished (the
    /// peer exited, the service does not exist or refused us, or it was
    /// cancelled). The last event a connection delivers.
    ConnectionInvalid,
    /// `XPC_ERROR_CONNECTION_INTERRUPTED`: the remote service exited. XPC
    /// would relaunch it on the next message, but whatever the session
    /// had (the handshake, the uid the daemon saw) is lost: a client
    /// connects again.
    ConnectionInterrupted,
    /// `XPC_ERROR_TERMINATION_IMMINENT`: no more messages will arrive.
    TerminationImminent,
    /// Another error (e.g. `XPC_ERROR_PEER_CODE_SIGNING_REQUIREMENT`,
    /// macOS 12+, not referenced so the binary still loads on macOS 11).
    Other,
}

/// What the event handler does with one [`Received`] object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Triage<'a> {
    /// A frame within the size limit: copy it out for the reader, who
    /// decodes it (only the reader knows the message type).
    Frame(&'a [u8]),
    /// No more messages will come: cancel, and let the reader see the end.
    PeerGone(XpcErrorKind),
    /// Not a message: cancel the connection, tell the reader why.
    Garbage(String),
}

/// Decides what one delivered object means. Never panics.
pub fn triage(received: Received<'_>) -> Triage<'_> {
    match received {
        Received::Dictionary(frame) => match check(frame) {
            Ok(frame) => Triage::Frame(frame),
            Err(error) => Triage::Garbage(error.to_string()),
        },
        Received::Error(kind) => Triage::PeerGone(kind),
        Received::Other => {
            Triage::Garbage("the peer sent an XPC object that is not a dictionary".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Request, encode};

    #[test]
    fn the_c_key_is_the_key() {
        assert_eq!(FRAME_KEY_C.to_str().unwrap(), FRAME_KEY);
    }

    #[test]
    fn a_dictionary_with_a_frame_is_passed_on_whole() {
        let bytes = encode(&Request::Status).unwrap();
        assert_eq!(
            triage(Received::Dictionary(Some(&bytes))),
            Triage::Frame(&bytes[..])
        );
        // The limit itself is allowed; decoding is the reader's business.
        let at_limit = vec![b'x'; MAX_FRAME_BYTES];
        assert_eq!(
            triage(Received::Dictionary(Some(&at_limit))),
            Triage::Frame(&at_limit[..])
        );
    }

    #[test]
    fn missing_or_oversized_frames_and_other_objects_are_garbage() {
        assert!(matches!(
            triage(Received::Dictionary(None)),
            Triage::Garbage(ref why) if why.contains("frame")
        ));
        let huge = vec![b'x'; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            triage(Received::Dictionary(Some(&huge))),
            Triage::Garbage(ref why) if why.contains("limit")
        ));
        assert!(matches!(triage(Received::Other), Triage::Garbage(_)));
    }

    #[test]
    fn every_error_means_the_peer_is_gone() {
        for kind in [
            XpcErrorKind::ConnectionInvalid,
            XpcErrorKind::ConnectionInterrupted,
            XpcErrorKind::TerminationImminent,
            XpcErrorKind::Other,
        ] {
            assert_eq!(triage(Received::Error(kind)), Triage::PeerGone(kind));
        }
    }
}
