//! The protocol between `epmd` and its clients (`epmctl`, the per-user
//! helper): one definition, used by both sides.
//!
//! A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON,
//! at most [`MAX_FRAME_BYTES`]. The client opens with [`Request::Hello`];
//! the daemon answers [`Response::Welcome`] with the uid it saw on the
//! socket (SO_PEERCRED / getpeereid), which decides what the client may see
//! and do. Garbage, oversized or out-of-order frames end that one
//! connection; an unknown request type gets an `unsupported` error and the
//! connection stays open, so older daemons and newer clients degrade well.

mod frame;
mod message;
#[cfg(unix)]
mod unix;

pub use frame::{FrameError, MAX_FRAME_BYTES, read_frame, write_frame};
pub use message::{
    Counters, ErrorCode, Explanation, Latency, PROTOCOL_VERSION, PolicyInfo, Request, Response,
    StatusReport,
};
#[cfg(unix)]
pub use unix::{
    Client, ClientError, Connection, DEFAULT_SOCKET_PATH, Incoming, PeerCredentials,
    ServerConnection, ServerError, peer_credentials,
};
