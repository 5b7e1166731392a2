//! The XPC Mach-service transport (macOS): the same messages as the Unix
//! socket, one frame body per XPC dictionary (see [`crate::xpc_frame`]).
//!
//! `epmd` listens on the Mach service its launchd plist declares
//! (`MachServices`), with [`XpcListener::start`]; helpers and `epmctl`
//! connect with [`XpcConnection::connect`]. The peer's uid comes from the
//! connection's audit token (`xpc_connection_get_euid`), and the daemon can
//! require the peer's code signature to satisfy a requirement string
//! (`xpc_connection_set_peer_code_signing_requirement`, macOS 12+), so only
//! our signed helper and CLI can talk to it.
//!
//! The XPC calls are declared by hand (the XPC crates need the macOS SDK
//! to build) and kept to the few this needs. XPC delivers events on a
//! dispatch queue; the handler blocks copy the frame out and hand it to a
//! bounded channel, so callers read with blocking, timeout-bounded calls
//! like the Unix transport's. A peer that floods the channel, sends a
//! non-dictionary or an invalid frame is cancelled: that connection only.

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use block2::RcBlock;
use serde::Serialize;

use crate::frame::FrameError;
use crate::message::{Message, encode};
use crate::unix::PeerCredentials;
use crate::xpc_frame::{FRAME_KEY, XpcEvent, check};

/// Messages queued per connection before the peer counts as flooding.
const QUEUE: usize = 64;

/// `XPC_CONNECTION_MACH_SERVICE_LISTENER`.
const MACH_SERVICE_LISTENER: u64 = 1 << 0;
/// `XPC_CONNECTION_MACH_SERVICE_PRIVILEGED`: the service is in the system
/// domain (a LaunchDaemon), not the caller's session.
const MACH_SERVICE_PRIVILEGED: u64 = 1 << 1;

type XpcObjectRef = *mut c_void;

/// `struct _xpc_type_s`, opaque.
#[repr(C)]
struct XpcType {
    _private: [u8; 0],
}

// From <xpc/xpc.h>, <xpc/connection.h> and <dispatch/queue.h>; all in
// libSystem, which every macOS binary links.
unsafe extern "C" {
    static _xpc_type_dictionary: XpcType;
    static _xpc_type_error: XpcType;
    static _xpc_type_connection: XpcType;

    fn xpc_connection_create_mach_service(
        name: *const c_char,
        targetq: *mut c_void,
        flags: u64,
    ) -> XpcObjectRef;
    fn xpc_connection_set_event_handler(
        connection: XpcObjectRef,
        handler: &block2::Block<dyn Fn(XpcObjectRef)>,
    );
    fn xpc_connection_resume(connection: XpcObjectRef);
    fn xpc_connection_cancel(connection: XpcObjectRef);
    fn xpc_connection_send_message(connection: XpcObjectRef, message: XpcObjectRef);
    fn xpc_connection_get_euid(connection: XpcObjectRef) -> u32;
    fn xpc_connection_get_egid(connection: XpcObjectRef) -> u32;
    fn xpc_connection_get_pid(connection: XpcObjectRef) -> i32;
    fn xpc_connection_set_peer_code_signing_requirement(
        connection: XpcObjectRef,
        requirement: *const c_char,
    ) -> c_int;
    fn xpc_dictionary_create(
        keys: *const *const c_char,
        values: *const XpcObjectRef,
        count: usize,
    ) -> XpcObjectRef;
    fn xpc_dictionary_set_data(
        dictionary: XpcObjectRef,
        key: *const c_char,
        bytes: *const c_void,
        length: usize,
    );
    fn xpc_dictionary_get_data(
        dictionary: XpcObjectRef,
        key: *const c_char,
        length: *mut usize,
    ) -> *const c_void;
    fn xpc_get_type(object: XpcObjectRef) -> *const XpcType;
    fn xpc_retain(object: XpcObjectRef) -> XpcObjectRef;
    fn xpc_release(object: XpcObjectRef);
    fn dispatch_queue_create(label: *const c_char, attr: *mut c_void) -> *mut c_void;
}

/// Why an XPC operation failed.
#[derive(Debug, thiserror::Error)]
pub enum XpcError {
    /// A name or requirement contains a NUL byte.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which argument.
        what: &'static str,
    },
    /// XPC returned no connection for the service.
    #[error("cannot create an XPC connection for the Mach service {0:?}")]
    Create(String),
    /// The code-signing requirement was refused by XPC.
    #[error("the peer code-signing requirement {requirement:?} was refused (error {code})")]
    Requirement {
        /// The requirement given.
        requirement: String,
        /// What XPC returned.
        code: i32,
    },
    /// The message could not be encoded (too large).
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The peer sent something that is not a message; the connection was
    /// cancelled.
    #[error("the peer sent garbage and was disconnected: {0}")]
    Garbage(String),
    /// No message within the timeout.
    #[error("no message within the timeout")]
    TimedOut,
}

/// An owned reference to an XPC object, released on drop.
struct Owned(XpcObjectRef);

// SAFETY: XPC objects are reference counted and thread-safe (Apple's XPC
// documentation: connections may be messaged from any thread); this type
// only retains, sends through and releases its object.
unsafe impl Send for Owned {}
// SAFETY: as for Send; no method takes `&mut` access to the object.
unsafe impl Sync for Owned {}

impl Drop for Owned {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: we own one reference to a live object.
            unsafe { xpc_release(self.0) }
        }
    }
}

impl std::fmt::Debug for Owned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "xpc_object({:p})", self.0)
    }
}

/// What the handler block passes to the reading side.
enum Delivered {
    Frame(Vec<u8>),
    Gone,
    Garbage(String),
}

/// One XPC connection, either side.
#[derive(Debug)]
pub struct XpcConnection {
    connection: Arc<Owned>,
    events: Receiver<Delivered>,
}

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delivered::Frame(bytes) => write!(f, "Frame({} bytes)", bytes.len()),
            Delivered::Gone => f.write_str("Gone"),
            Delivered::Garbage(why) => write!(f, "Garbage({why})"),
        }
    }
}

impl XpcConnection {
    /// Connects to `epmd`'s Mach service (a system-domain LaunchDaemon).
    pub fn connect(service_name: &str) -> Result<XpcConnection, XpcError> {
        let name = CString::new(service_name).map_err(|_| XpcError::Nul {
            what: "the service name",
        })?;
        let queue = new_queue("com.epm.ipc.client")?;
        // SAFETY: `name` is a valid C string for the call; `queue` is a
        // dispatch queue we created (XPC retains it).
        let raw = unsafe {
            xpc_connection_create_mach_service(name.as_ptr(), queue, MACH_SERVICE_PRIVILEGED)
        };
        if raw.is_null() {
            return Err(XpcError::Create(service_name.to_owned()));
        }
        Ok(XpcConnection::adopt(Owned(raw)))
    }

    /// Sets the handler on a connection we own a reference to, resumes it,
    /// and wraps it.
    fn adopt(connection: Owned) -> XpcConnection {
        let connection = Arc::new(connection);
        let (tx, rx) = sync_channel(QUEUE);
        let raw = connection.0;
        let handler = RcBlock::new(move |event: XpcObjectRef| on_event(raw, &tx, event));
        // SAFETY: `raw` is a live connection we hold a reference to; XPC
        // copies the block. The block only uses `raw` while XPC delivers
        // events for it, which ends before the connection is released.
        unsafe {
            xpc_connection_set_event_handler(raw, &handler);
            xpc_connection_resume(raw);
        }
        XpcConnection {
            connection,
            events: rx,
        }
    }

    /// Who is on the other end, from the connection's audit token.
    pub fn peer(&self) -> PeerCredentials {
        let raw = self.connection.0;
        // SAFETY: a live connection.
        let (uid, gid, pid) = unsafe {
            (
                xpc_connection_get_euid(raw),
                xpc_connection_get_egid(raw),
                xpc_connection_get_pid(raw),
            )
        };
        PeerCredentials {
            uid,
            gid,
            pid: u32::try_from(pid).ok().filter(|&pid| pid != 0),
        }
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, message: &T) -> Result<(), XpcError> {
        let body = encode(message)?;
        let key = CString::new(FRAME_KEY).map_err(|_| XpcError::Nul { what: "the key" })?;
        // SAFETY: an empty dictionary; we own the returned reference.
        let dictionary =
            Owned(unsafe { xpc_dictionary_create(std::ptr::null(), std::ptr::null(), 0) });
        // SAFETY: `dictionary` is live, `key` a C string, `body` valid for
        // its length (XPC copies the bytes); then the connection copies the
        // message and we release our reference on drop.
        unsafe {
            xpc_dictionary_set_data(dictionary.0, key.as_ptr(), body.as_ptr().cast(), body.len());
            xpc_connection_send_message(self.connection.0, dictionary.0);
        }
        Ok(())
    }

    /// Receives one message; `Ok(None)` when the peer went away. A peer
    /// that sent garbage is disconnected and reported as
    /// [`XpcError::Garbage`].
    pub fn recv<T: Message>(&mut self, timeout: Option<Duration>) -> Result<Option<T>, XpcError> {
        let delivered = match timeout {
            Some(timeout) => match self.events.recv_timeout(timeout) {
                Ok(delivered) => delivered,
                Err(RecvTimeoutError::Timeout) => return Err(XpcError::TimedOut),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            },
            None => match self.events.recv() {
                Ok(delivered) => delivered,
                Err(_) => return Ok(None),
            },
        };
        match delivered {
            Delivered::Frame(bytes) => match crate::xpc_frame::classify::<T>(Some(&bytes)) {
                XpcEvent::Message(message) => Ok(Some(message)),
                XpcEvent::PeerGone => Ok(None),
                XpcEvent::Garbage(why) => {
                    self.cancel();
                    Err(XpcError::Garbage(why))
                }
            },
            Delivered::Gone => Ok(None),
            Delivered::Garbage(why) => {
                self.cancel();
                Err(XpcError::Garbage(why))
            }
        }
    }

    /// Ends the connection; no more events arrive.
    pub fn cancel(&self) {
        // SAFETY: a live connection; cancelling twice is allowed.
        unsafe { xpc_connection_cancel(self.connection.0) }
    }
}

impl Drop for XpcConnection {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The event handler of one connection: copy the frame out, or report the
/// peer gone or the garbage, without ever blocking XPC's queue.
fn on_event(connection: XpcObjectRef, tx: &SyncSender<Delivered>, event: XpcObjectRef) {
    // SAFETY: XPC passes a live object for the handler's duration.
    let kind = unsafe { xpc_get_type(event) };
    let delivered = if std::ptr::eq(kind, &raw const _xpc_type_dictionary) {
        match frame_of(event) {
            Ok(bytes) => Delivered::Frame(bytes),
            Err(why) => Delivered::Garbage(why),
        }
    } else if std::ptr::eq(kind, &raw const _xpc_type_error) {
        // XPC_ERROR_CONNECTION_INVALID or _INTERRUPTED (the peer exited,
        // or the daemon restarted), or termination imminent: either way
        // nothing more comes on this connection. A client reconnects.
        Delivered::Gone
    } else {
        Delivered::Garbage("an XPC object that is not a dictionary".into())
    };
    match tx.try_send(delivered) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            // The reader is not keeping up: a flooding peer. Drop it.
            // SAFETY: the connection is live while its handler runs.
            unsafe { xpc_connection_cancel(connection) }
        }
        Err(TrySendError::Disconnected(_)) => {
            // SAFETY: as above; the reading side is gone.
            unsafe { xpc_connection_cancel(connection) }
        }
    }
}

/// The frame bytes of a dictionary message, copied.
fn frame_of(dictionary: XpcObjectRef) -> Result<Vec<u8>, String> {
    let key = CString::new(FRAME_KEY).map_err(|e| e.to_string())?;
    let mut length = 0usize;
    // SAFETY: a live dictionary; XPC returns a pointer into it valid while
    // the dictionary lives, with its length, or NULL.
    let data = unsafe { xpc_dictionary_get_data(dictionary, key.as_ptr(), &mut length) };
    let bytes = if data.is_null() {
        None
    } else {
        // SAFETY: `data` points at `length` bytes owned by the dictionary,
        // which outlives this call.
        Some(unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) })
    };
    check(bytes).map(<[u8]>::to_vec).map_err(|e| e.to_string())
}

fn new_queue(label: &str) -> Result<*mut c_void, XpcError> {
    let label = CString::new(label).map_err(|_| XpcError::Nul {
        what: "the queue label",
    })?;
    // SAFETY: a valid label; NULL attributes make a serial queue.
    let queue = unsafe { dispatch_queue_create(label.as_ptr(), std::ptr::null_mut()) };
    if queue.is_null() {
        return Err(XpcError::Create(format!("dispatch queue {label:?}")));
    }
    Ok(queue)
}

/// `epmd`'s side: the Mach service listener.
#[derive(Debug)]
pub struct XpcListener {
    _listener: Owned,
}

impl XpcListener {
    /// Listens on `service_name` (declared under `MachServices` in the
    /// daemon's launchd plist). Each peer is checked against
    /// `peer_requirement` when given (a code-signing requirement such as
    /// `anchor apple generic and certificate leaf[subject.OU] = "TEAMID"`),
    /// then handed to `on_connection` on its own thread.
    pub fn start(
        service_name: &str,
        peer_requirement: Option<&str>,
        on_connection: impl Fn(XpcConnection) + Send + Sync + 'static,
    ) -> Result<XpcListener, XpcError> {
        let name = CString::new(service_name).map_err(|_| XpcError::Nul {
            what: "the service name",
        })?;
        let requirement = peer_requirement
            .map(|r| {
                CString::new(r).map_err(|_| XpcError::Nul {
                    what: "the code-signing requirement",
                })
            })
            .transpose()?;
        let queue = new_queue("com.epm.ipc.listener")?;
        // SAFETY: valid C string and queue.
        let raw = unsafe {
            xpc_connection_create_mach_service(name.as_ptr(), queue, MACH_SERVICE_LISTENER)
        };
        if raw.is_null() {
            return Err(XpcError::Create(service_name.to_owned()));
        }
        let listener = Owned(raw);
        let on_connection = Arc::new(on_connection);
        let requirement = Arc::new(requirement);
        let handler = RcBlock::new(move |peer: XpcObjectRef| {
            // SAFETY: XPC passes a live object for the handler's duration.
            let kind = unsafe { xpc_get_type(peer) };
            if !std::ptr::eq(kind, &raw const _xpc_type_connection) {
                // An error on the listener itself (the service is gone).
                return;
            }
            // SAFETY: the peer is borrowed for this call; keep a reference.
            let peer = Owned(unsafe { xpc_retain(peer) });
            if let Some(requirement) = requirement.as_ref() {
                // SAFETY: a live connection, not yet resumed; a C string.
                let code = unsafe {
                    xpc_connection_set_peer_code_signing_requirement(peer.0, requirement.as_ptr())
                };
                if code != 0 {
                    // SAFETY: a live connection.
                    unsafe { xpc_connection_cancel(peer.0) };
                    return;
                }
            }
            let connection = XpcConnection::adopt(peer);
            let on_connection = on_connection.clone();
            let _ = std::thread::Builder::new()
                .name("epm-xpc-client".into())
                .spawn(move || on_connection(connection));
        });
        // SAFETY: a live listener we own; XPC copies the block.
        unsafe {
            xpc_connection_set_event_handler(listener.0, &handler);
            xpc_connection_resume(listener.0);
        }
        Ok(XpcListener {
            _listener: listener,
        })
    }
}

/// Checks a requirement string for NUL bytes before the daemon starts
/// listening, so a bad configuration is reported at start.
pub fn validate_requirement(requirement: &str) -> Result<(), XpcError> {
    CString::new(requirement)
        .map(drop)
        .map_err(|_| XpcError::Nul {
            what: "the code-signing requirement",
        })
}
