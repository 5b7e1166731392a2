//! The transports that carry frames between `epmd` and its clients, each a
//! [`link::Link`]: the Unix socket ([`unix`], with descriptor passing in
//! [`fds`]) and, on macOS, XPC ([`xpc`]).
//!
//! A transport knows frames, descriptors and who the peer is; it knows
//! nothing of the handshake or of what a request means (that is
//! `crate::protocol`'s), and no transport imports the protocol.

pub(crate) mod fds;
pub(crate) mod link;
pub(crate) mod unix;
pub mod xpc;
