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
use crate::message::{ErrorCode, Message, PROTOCOL_VERSION, Request, Response, decode};

/// The Mach service `epmd` listens on (its launchd plist's
/// `MachServices` key; `tests/macos_packaging.rs` checks they agree).
pub const MACH_SERVICE_NAME: &str = "com.epm.epmd.xpc";

/// The dictionary key holding the frame body.
pub const FRAME_KEY: &str = "frame";

/// [`FRAME_KEY`] as the C string the XPC calls take.
pub const FRAME_KEY_C: &CStr = c"frame";

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

// ---- the client's handshake -------------------------------------------------------

/// The client's opening message on any transport: `Hello` with our
/// [`PROTOCOL_VERSION`]. `client` names the program, e.g. `epmctl 0.1.0`.
pub fn hello(client: &str) -> Request {
    Request::Hello {
        protocol: PROTOCOL_VERSION,
        client: client.to_owned(),
    }
}

/// What the daemon told a client that it accepted (its `Welcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcomed {
    /// The uid the daemon saw (and authorizes by).
    pub uid: u32,
    /// Whether the daemon considers the client an administrator.
    pub is_admin: bool,
    /// The daemon's version.
    pub daemon_version: String,
}

/// Why the daemon's answer to `Hello` ends the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The daemon went away before it answered.
    #[error("epmd closed the connection before answering hello")]
    Closed,
    /// The daemon and this client speak incompatible protocol versions.
    #[error(
        "epmd and this client (protocol {client}) cannot talk: {message}; upgrade the older one"
    )]
    VersionMismatch {
        /// The daemon's version, when it said.
        daemon: Option<u32>,
        /// Ours ([`PROTOCOL_VERSION`]).
        client: u32,
        /// What the daemon said, or what we saw.
        message: String,
    },
    /// The daemon refused with another error.
    #[error("epmd: {message}")]
    Daemon {
        /// The class of failure.
        code: ErrorCode,
        /// The daemon's words.
        message: String,
    },
    /// Something other than `Welcome` or an error.
    #[error("unexpected answer from epmd: {0} instead of welcome")]
    Protocol(&'static str),
}

/// Judges the daemon's answer to [`hello`] (`None`: it went away), with the
/// same rules as the Unix transport's `Client::connect`.
pub fn welcome(answer: Option<Response>) -> Result<Welcomed, HandshakeError> {
    match answer {
        None => Err(HandshakeError::Closed),
        Some(Response::Welcome {
            protocol,
            uid,
            is_admin,
            daemon_version,
        }) => {
            if protocol != PROTOCOL_VERSION {
                return Err(HandshakeError::VersionMismatch {
                    daemon: Some(protocol),
                    client: PROTOCOL_VERSION,
                    message: format!("epmd {daemon_version} speaks protocol {protocol}"),
                });
            }
            Ok(Welcomed {
                uid,
                is_admin,
                daemon_version,
            })
        }
        Some(Response::Error {
            code: ErrorCode::VersionMismatch,
            message,
        }) => Err(HandshakeError::VersionMismatch {
            daemon: None,
            client: PROTOCOL_VERSION,
            message,
        }),
        Some(Response::Error { code, message }) => Err(HandshakeError::Daemon { code, message }),
        Some(other) => Err(HandshakeError::Protocol(other.type_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

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

    #[test]
    fn hello_carries_our_protocol() {
        assert_eq!(
            hello("epmctl 0.1.0"),
            Request::Hello {
                protocol: PROTOCOL_VERSION,
                client: "epmctl 0.1.0".into()
            }
        );
    }

    #[test]
    fn a_welcome_in_our_protocol_is_accepted() {
        let answer = Response::Welcome {
            protocol: PROTOCOL_VERSION,
            daemon_version: "0.1.0".into(),
            uid: 501,
            is_admin: false,
        };
        assert_eq!(
            welcome(Some(answer)),
            Ok(Welcomed {
                uid: 501,
                is_admin: false,
                daemon_version: "0.1.0".into()
            })
        );
    }

    #[test]
    fn anything_else_ends_the_handshake() {
        assert_eq!(welcome(None), Err(HandshakeError::Closed));
        let newer = Response::Welcome {
            protocol: PROTOCOL_VERSION + 1,
            daemon_version: "9.0.0".into(),
            uid: 0,
            is_admin: true,
        };
        assert!(matches!(
            welcome(Some(newer)),
            Err(HandshakeError::VersionMismatch { daemon: Some(v), .. }) if v == PROTOCOL_VERSION + 1
        ));
        assert!(matches!(
            welcome(Some(Response::error(ErrorCode::VersionMismatch, "old"))),
            Err(HandshakeError::VersionMismatch { daemon: None, .. })
        ));
        assert_eq!(
            welcome(Some(Response::error(ErrorCode::Forbidden, "no"))),
            Err(HandshakeError::Daemon {
                code: ErrorCode::Forbidden,
                message: "no".into()
            })
        );
        assert_eq!(
            welcome(Some(Response::End)),
            Err(HandshakeError::Protocol("end"))
        );
    }
}
