//! The XPC Mach-service transport (macOS): [`frame`] says how a frame
//! travels in an XPC dictionary, `inbox` and `mailbox` hand what XPC's
//! queue delivers to blocking readers, and `ffi` makes the XPC calls.
//! Everything but `ffi` is portable and tested on every platform.

#[cfg(target_os = "macos")]
mod ffi;
pub mod frame;
#[cfg(any(test, target_os = "macos"))]
pub(crate) mod inbox;
#[cfg(any(test, target_os = "macos"))]
mod mailbox;

#[cfg(target_os = "macos")]
pub use ffi::{XpcConnection, XpcError, XpcListener, validate_requirement};
