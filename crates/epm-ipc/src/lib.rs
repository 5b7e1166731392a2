//! The protocol between `epmd` and its clients (`epmctl`, the per-user
//! helper): one definition, used by both sides.
//!
//! A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON,
//! at most [`MAX_FRAME_BYTES`]. Every message is a JSON object tagged by
//! `type` ([`Request`], [`Response`]). The client opens with
//! [`Request::Hello`]; the daemon answers [`Response::Welcome`] with the
//! uid it saw on the socket (SO_PEERCRED / getpeereid), which decides what
//! the client may see and do, never anything the client says. Then the
//! client sends requests, each answered by one response (or, for an audit
//! tail, a stream of them).
//!
//! ```text
//! client → 00 00 00 35 {"type":"hello","protocol":1,"client":"epmctl 0.1.0"}
//! daemon ← 00 00 00 53 {"type":"welcome","protocol":1,"daemon_version":"0.1.0","uid":501,"is_admin":false}
//! client → 00 00 00 11 {"type":"status"}
//! daemon ← .. .. .. .. {"type":"status","mode":"enforce","fail_mode":"open",...}
//! client → 00 00 00 16 {"type":"policy_show"}
//! daemon ← .. .. .. .. {"type":"error","code":"forbidden","message":"..."}
//! client → .. .. .. .. {"type":"grant_sudo",...}                 (a newer client)
//! daemon ← .. .. .. .. {"type":"error","code":"unsupported","message":"..."}
//! ```
//!
//! Garbage, oversized or out-of-order frames end that one connection (the
//! client is told why while it can still hear it). A request of a known
//! type with invalid fields gets a `bad_request` error, one of an unknown
//! type an `unsupported` error, and the connection stays open.
//!
//! The messages, [`encode`]/[`decode`] and the protocol around them
//! ([`ServerConnection`], [`Client`]) do not depend on the transport. Two
//! carry them: the Unix socket, and on macOS the `xpc` module's Mach-service
//! connections (`XpcListener` for `epmd`, whose peers arrive as an
//! [`Arrival`]; [`Client::connect`] to an
//! [`Endpoint::MachService`]), one frame body per XPC dictionary under the
//! key `"frame"` ([`xpc_frame`]), with the peer's uid from its audit token
//! and an optional code-signing requirement on the peer (macOS 12+). The
//! XPC transport's logic that needs no XPC is tested on every platform.
//!
//! # Compatibility
//!
//! Daemons and clients of different ages must keep talking:
//!
//! - A new request type: older daemons answer `unsupported`
//!   ([`Incoming::Unsupported`]).
//! - A new request field: `#[serde(default, skip_serializing_if = ...)]`,
//!   so a client that does not use it still talks to older daemons.
//!   Requests reject unknown fields: an older daemon answers `bad_request`
//!   naming the field rather than ignoring, say, a filter it does not know
//!   (and showing the caller more than it asked for).
//! - A new response field: `#[serde(default)]`. Responses ignore unknown
//!   fields, so older clients read newer daemons' answers.
//! - A new error code: older clients read it as [`ErrorCode::Other`].
//! - Anything else (renaming, retyping, removing): bump
//!   [`PROTOCOL_VERSION`]; the daemon refuses other versions at `Hello`,
//!   even a hello with fields it does not know.
//!
//! # Example
//!
//! ```
//! # #[cfg(unix)]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::os::unix::net::UnixStream;
//! use epm_ipc::{Connection, ErrorCode, Incoming, Request, Response, ServerConnection};
//!
//! let (client_end, daemon_end) = UnixStream::pair()?;
//! let daemon = std::thread::spawn(move || -> Result<(), epm_ipc::ServerError> {
//!     let mut conn = ServerConnection::accept(daemon_end, "0.1.0", |peer| peer.uid == 0)?;
//!     while let Some(incoming) = conn.next_request()? {
//!         let answer = match incoming {
//!             Incoming::Request(Request::Status) => Response::End, // a real daemon reports
//!             _ => Response::error(ErrorCode::Unsupported, "not here"),
//!         };
//!         conn.send(&answer)?;
//!     }
//!     Ok(())
//! });
//!
//! let mut client = Connection::new(client_end);
//! client.send(&Request::Hello { protocol: epm_ipc::PROTOCOL_VERSION, client: "doc".into() })?;
//! let welcome: Option<Response> = client.recv()?;
//! assert!(matches!(welcome, Some(Response::Welcome { protocol: 1, .. })));
//! client.send(&Request::Status)?;
//! assert_eq!(client.recv::<Response>()?, Some(Response::End));
//! drop(client);
//! daemon.join().map_err(|_| "the daemon thread panicked")??;
//! # Ok(())
//! # }
//! # #[cfg(not(unix))]
//! # fn main() {}
//! ```

// The layout: `message` (what is said), `frame` (how a message becomes
// bytes), `protocol` (the handshake and the two sides of a conversation,
// over any link), `transport` (the Unix socket and XPC, each a link), and
// `endpoint`, the one file that names both transports.
#[cfg(test)]
mod alloc_probe;
#[cfg(unix)]
mod endpoint;
mod frame;
mod message;
#[cfg(unix)]
mod protocol;
#[cfg(unix)]
mod transport;

#[cfg(unix)]
pub use endpoint::Endpoint;
pub use frame::{FrameError, MAX_FRAME_BYTES, read_frame, write_frame};
pub use message::elevation::{
    AdminSessionInfo, Command, ElevationVerdict, ElevationVia, ExitStatus, TermSize, Window,
};
pub use message::flows::{
    BlockReason, Blocked, GrantInfo, Justified, Prompt, PromptKind, RequestInfo, UserEvent,
};
pub use message::{
    Counters, ErrorCode, Explanation, ExposureStatus, KernelHookStatus, Latency, Message,
    PROTOCOL_VERSION, PlatformStatus, PolicyInfo, Request, Response, StatusReport, SyncOutcome,
    decode, encode,
};
// The module paths other crates use (`epm_ipc::flows::program_name`,
// `epm_ipc::xpc::XpcListener`, `epm_ipc::xpc_frame::MACH_SERVICE_NAME`).
pub use message::{elevation, flows};
#[cfg(unix)]
pub use protocol::{
    Arrival, Client, ClientError, DEFAULT_CLIENT_TIMEOUT, Incoming, ServerConnection, ServerError,
};
#[cfg(unix)]
pub use transport::fds::{FD_MARKER, FdError};
#[cfg(unix)]
pub use transport::link::PeerCredentials;
#[cfg(unix)]
pub use transport::unix::{Connection, DEFAULT_SOCKET_PATH, peer_credentials};
// `xpc` holds the XPC connection and listener on macOS, only `frame`
// elsewhere (its logic is tested everywhere).
#[cfg(unix)]
pub use transport::xpc;
#[cfg(unix)]
pub use transport::xpc::frame as xpc_frame;
