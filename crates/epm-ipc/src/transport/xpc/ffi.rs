//! The XPC Mach-service transport (macOS): the same messages as the Unix
//! socket, one frame body per XPC dictionary (see [`super::frame`]).
//!
//! `epmd` listens on the Mach service its launchd plist declares
//! (`MachServices`), with [`XpcListener::start`], and serves each peer
//! as an [`crate::Arrival`]; helpers and `epmctl`
//! connect with [`crate::Client::connect`] to
//! [`crate::Endpoint::MachService`]. Both run the same protocol code as
//! on the Unix socket: this module is only the transport (a
//! `Link` implementation). The peer's uid comes from the
//! connection's audit token (`xpc_connection_get_euid`), and the daemon can
//! require the peer's code signature to satisfy a requirement string
//! (`xpc_connection_set_peer_code_signing_requirement`, macOS 12+), so only
//! our signed helper and CLI can talk to it.
//!
//! The XPC calls are declared by hand (the XPC crates need the macOS SDK
//! to build) and kept to the few this needs; everything that can be
//! decided without XPC is in [`super::frame`] and the inbox in
//! [`super::mailbox`], tested everywhere. XPC delivers events on a
//! dispatch queue; the handler blocks only copy the frame (and dup the
//! descriptors that came with it, for `run`) out into a bounded inbox
//! whose readiness descriptor `poll(2)` can wait on, so callers read with
//! blocking, timeout-bounded calls and poll like on the Unix socket. A
//! peer that floods the inbox or sends anything but a valid frame is
//! cancelled: that connection only.
//!
//! Memory: every XPC object we keep is an `Object` holding one reference
//! (released on drop). Objects XPC passes to a handler are borrowed for the
//! call; a peer connection the listener keeps is retained first. A
//! connection is cancelled before its last reference goes (XPC requires
//! resumed, uncancelled connections not to be released).

use std::ffi::{CString, c_char, c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use block2::RcBlock;

use super::frame::{FD_KEYS, FRAME_KEY_C, Received, XpcErrorKind, triage};
use super::inbox::{After, Deliverer, InFlight, Inbound, inbox};
use crate::frame::FrameError;
use crate::transport::fds::FdError;
use crate::transport::link::{Link, PeerCredentials};

/// `XPC_CONNECTION_MACH_SERVICE_LISTENER` (<xpc/connection.h>).
const MACH_SERVICE_LISTENER: u64 = 1 << 0;
/// `XPC_CONNECTION_MACH_SERVICE_PRIVILEGED`: the service is advertised by a
/// LaunchDaemon in the system bootstrap, not by an agent in the caller's
/// session (where any user process could squat on the name).
const MACH_SERVICE_PRIVILEGED: u64 = 1 << 1;

/// `xpc_object_t` (and `xpc_connection_t`, the same pointer in C).
type XpcObjectRef = *mut c_void;
/// `dispatch_queue_t`.
type DispatchQueueRef = *mut c_void;

/// `struct _xpc_type_s`: opaque, only its address is used (`XPC_TYPE_*`).
#[repr(C)]
struct XpcType {
    _opaque: [u8; 0],
}

/// `struct _xpc_dictionary_s`: opaque, only the addresses of the
/// well-known error dictionaries are used (`XPC_ERROR_*`).
#[repr(C)]
struct XpcDictionary {
    _opaque: [u8; 0],
}

/// `xpc_connection_set_peer_code_signing_requirement`, looked up at run
/// time (see [`peer_requirement_setter`]).
type SetPeerRequirement =
    unsafe extern "C" fn(connection: XpcObjectRef, requirement: *const c_char) -> c_int;

// From <xpc/xpc.h>, <xpc/connection.h> and <dispatch/queue.h>: all in
// libSystem (libxpc, libdispatch), which every macOS binary links. Only
// symbols that exist since macOS 10.12 are linked here; the bundles declare
// LSMinimumSystemVersion 11.0.
unsafe extern "C" {
    static _xpc_type_dictionary: XpcType;
    static _xpc_type_error: XpcType;
    static _xpc_type_connection: XpcType;
    static _xpc_error_connection_invalid: XpcDictionary;
    static _xpc_error_connection_interrupted: XpcDictionary;
    static _xpc_error_termination_imminent: XpcDictionary;

    fn xpc_connection_create_mach_service(
        name: *const c_char,
        targetq: DispatchQueueRef,
        flags: u64,
    ) -> XpcObjectRef;
    fn xpc_connection_set_event_handler(
        connection: XpcObjectRef,
        handler: &block2::Block<dyn Fn(XpcObjectRef)>,
    );
    fn xpc_connection_resume(connection: XpcObjectRef);
    fn xpc_connection_cancel(connection: XpcObjectRef);
    fn xpc_connection_send_message(connection: XpcObjectRef, message: XpcObjectRef);
    fn xpc_connection_send_barrier(connection: XpcObjectRef, barrier: &block2::Block<dyn Fn()>);
    fn xpc_connection_get_euid(connection: XpcObjectRef) -> u32;
    fn xpc_connection_get_egid(connection: XpcObjectRef) -> u32;
    fn xpc_connection_get_pid(connection: XpcObjectRef) -> i32;
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
    fn xpc_dictionary_set_fd(dictionary: XpcObjectRef, key: *const c_char, fd: c_int);
    fn xpc_dictionary_dup_fd(dictionary: XpcObjectRef, key: *const c_char) -> c_int;
    fn xpc_dictionary_get_data(
        dictionary: XpcObjectRef,
        key: *const c_char,
        length: *mut usize,
    ) -> *const c_void;
    fn xpc_get_type(object: XpcObjectRef) -> *const XpcType;
    fn xpc_retain(object: XpcObjectRef) -> XpcObjectRef;
    fn xpc_release(object: XpcObjectRef);
    fn dispatch_queue_create(label: *const c_char, attr: *mut c_void) -> DispatchQueueRef;
}

/// Why an XPC connection or listener could not be made.
#[derive(Debug, thiserror::Error)]
pub enum XpcError {
    /// A name or requirement contains a NUL byte.
    #[error("{what} contains a NUL byte")]
    Nul {
        /// Which argument.
        what: &'static str,
    },
    /// XPC returned no connection for the service.
    #[error("cannot create an XPC connection for the Mach service {service:?}")]
    Create {
        /// The service name.
        service: String,
    },
    /// The connection's inbox (a pipe) could not be made: out of
    /// descriptors, most likely.
    #[error("cannot make the XPC connection's inbox: {0}")]
    Inbox(std::io::Error),
    /// A code-signing requirement was given, but this macOS has no
    /// `xpc_connection_set_peer_code_signing_requirement` (before 12).
    #[error(
        "a peer code-signing requirement needs macOS 12 or later (xpc_connection_set_peer_code_signing_requirement)"
    )]
    RequirementUnsupported,
}

// ---- owned XPC objects --------------------------------------------------------------

/// One reference to an XPC object, released on drop.
struct Object(XpcObjectRef);

// SAFETY: XPC objects are reference counted with atomic counts, and
// connections are documented as usable from any queue or thread
// (xpc_connection_send_message: "safe to call from multiple GCD queues";
// cancel and the get_* accessors likewise). This type only retains,
// releases, sends through, cancels and reads the credentials of its object.
unsafe impl Send for Object {}
// SAFETY: as for Send: every operation used goes through XPC's own
// synchronization; nothing here hands out `&mut` access to the object.
unsafe impl Sync for Object {}

impl Object {
    /// Takes ownership of a reference XPC returned to us (`create` calls),
    /// or `None` for NULL.
    fn owned(raw: XpcObjectRef) -> Option<Object> {
        (!raw.is_null()).then_some(Object(raw))
    }

    /// Retains an object XPC only lent us (a handler's argument).
    ///
    /// # Safety
    ///
    /// `raw` must be a live XPC object.
    unsafe fn retained(raw: XpcObjectRef) -> Object {
        // SAFETY: the caller vouches that `raw` is live; xpc_retain returns
        // its argument with one more reference, which we now own.
        Object(unsafe { xpc_retain(raw) })
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: we own exactly one reference to a live object (never
        // NULL: see the constructors).
        unsafe { xpc_release(self.0) }
    }
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "xpc_object_t({:p})", self.0)
    }
}

/// A connection pointer the event handler uses without owning it: XPC
/// keeps a connection alive while it runs the connection's own handler.
#[derive(Clone, Copy)]
struct Unowned(XpcObjectRef);

// SAFETY: see `Object`: a connection may be cancelled from any thread, and
// the handler (the only user) runs on XPC's queue while XPC holds the
// connection.
unsafe impl Send for Unowned {}
// SAFETY: as for Send.
unsafe impl Sync for Unowned {}

impl Unowned {
    fn cancel(self) {
        // SAFETY: only called from the connection's own event handler, while
        // XPC holds the connection; cancelling twice is allowed.
        unsafe { xpc_connection_cancel(self.0) }
    }
}

/// Makes a handler block, checking that what it captures may be used from
/// XPC's queue (another thread) for as long as XPC keeps the block.
fn handler(f: impl Fn(XpcObjectRef) + Send + Sync + 'static) -> RcBlock<dyn Fn(XpcObjectRef)> {
    RcBlock::new(f)
}

/// Sets `connection`'s event handler and starts delivery.
///
/// # Safety
///
/// `connection` must be a live connection that has not been resumed yet.
unsafe fn activate(connection: XpcObjectRef, handler: &RcBlock<dyn Fn(XpcObjectRef)>) {
    // SAFETY: per the caller; XPC copies (retains) the block, so ours may
    // go when this returns. xpc_connection_resume on a new connection
    // activates it (macOS 10.7+; xpc_connection_activate is 10.12+).
    unsafe {
        xpc_connection_set_event_handler(connection, handler);
        xpc_connection_resume(connection);
    }
}

/// The serial dispatch queue every connection this process creates
/// delivers its events on, made once and kept for the process's life (XPC
/// retains a connection's target queue, but one queue for all avoids
/// creating and releasing one per connection; the handlers never block).
/// Peer connections a listener receives run on XPC's default target queue.
fn queue() -> Result<DispatchQueueRef, XpcError> {
    struct Queue(DispatchQueueRef);
    // SAFETY: dispatch queues are thread-safe objects; the pointer is only
    // passed to XPC, never dereferenced here, and never released.
    unsafe impl Send for Queue {}
    // SAFETY: as for Send.
    unsafe impl Sync for Queue {}

    static QUEUE: OnceLock<Queue> = OnceLock::new();
    let queue = QUEUE.get_or_init(|| {
        // SAFETY: a valid C string label; a NULL attribute is
        // DISPATCH_QUEUE_SERIAL. The queue lives as long as the process.
        Queue(unsafe { dispatch_queue_create(c"com.epm.ipc.xpc".as_ptr(), std::ptr::null_mut()) })
    });
    if queue.0.is_null() {
        return Err(XpcError::Create {
            service: "(dispatch queue com.epm.ipc.xpc)".into(),
        });
    }
    Ok(queue.0)
}

/// `xpc_connection_set_peer_code_signing_requirement`, when this macOS has
/// it (12+). Looked up with dlsym rather than linked, so the binary still
/// loads on macOS 11 (LSMinimumSystemVersion), where a daemon configured
/// with a requirement refuses to start instead.
fn peer_requirement_setter() -> Option<SetPeerRequirement> {
    // SAFETY: RTLD_DEFAULT searches every loaded image (libxpc is one);
    // the name is a valid C string.
    let symbol = unsafe {
        nix::libc::dlsym(
            nix::libc::RTLD_DEFAULT,
            c"xpc_connection_set_peer_code_signing_requirement".as_ptr(),
        )
    };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: the symbol is the function declared in <xpc/connection.h> as
    // `int xpc_connection_set_peer_code_signing_requirement(
    // xpc_connection_t, const char *)`, which `SetPeerRequirement` matches.
    Some(unsafe { std::mem::transmute::<*mut c_void, SetPeerRequirement>(symbol) })
}

fn c_string(value: &str, what: &'static str) -> Result<CString, XpcError> {
    CString::new(value).map_err(|_| XpcError::Nul { what })
}

// ---- connections ----------------------------------------------------------------

/// The event handler of one connection.
struct Handler {
    connection: Unowned,
    deliverer: Deliverer,
}

impl Handler {
    fn deliver(&self, event: XpcObjectRef) {
        // SAFETY: XPC passes a live object, borrowed for this call.
        let received = unsafe { received(event) };
        let after = self.deliverer.deliver(triage(received), || {
            // SAFETY: a frame came in a dictionary: `event` is one, live.
            unsafe { descriptors(event) }
        });
        if after == After::Cancel {
            self.connection.cancel();
        }
    }
}

/// The descriptors a dictionary carries under [`FD_KEYS`], in order up to
/// the first missing one, each owned and close-on-exec.
///
/// # Safety
///
/// `dictionary` must be a live XPC dictionary.
unsafe fn descriptors(dictionary: XpcObjectRef) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    for key in FD_KEYS {
        // SAFETY: a live dictionary per the caller and a C string key; XPC
        // returns a new descriptor (a dup we own) or -1 when the key is
        // missing or not a descriptor.
        let raw = unsafe { xpc_dictionary_dup_fd(dictionary, key.as_ptr()) };
        if raw < 0 {
            break;
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // The dup is not close-on-exec: a command epmd starts must not
        // inherit another caller's terminal.
        let _ = nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        fds.push(fd);
    }
    fds
}

/// What XPC handed a handler, for [`triage`].
///
/// # Safety
///
/// `event` must be a live XPC object; the returned slice borrows its
/// storage and must not outlive it (the handler call).
unsafe fn received<'a>(event: XpcObjectRef) -> Received<'a> {
    // SAFETY: a live object per the caller.
    let kind = unsafe { xpc_get_type(event) };
    if std::ptr::eq(kind, &raw const _xpc_type_dictionary) {
        let mut length = 0usize;
        // SAFETY: a live dictionary and a C string key; XPC returns a
        // pointer into the dictionary's storage with its length, or NULL
        // when the key is missing or its value is not data.
        let data = unsafe { xpc_dictionary_get_data(event, FRAME_KEY_C.as_ptr(), &mut length) };
        let frame = (!data.is_null()).then(|| {
            // SAFETY: `data` points at `length` bytes owned by the
            // dictionary, which lives for the handler call.
            unsafe { std::slice::from_raw_parts(data.cast::<u8>(), length) }
        });
        Received::Dictionary(frame)
    } else if std::ptr::eq(kind, &raw const _xpc_type_error) {
        // The XPC_ERROR_* objects are singletons: compare addresses, as
        // the C macros do (`event == XPC_ERROR_CONNECTION_INVALID`).
        let event = event.cast_const().cast::<XpcDictionary>();
        let kind = if std::ptr::eq(event, &raw const _xpc_error_connection_invalid) {
            XpcErrorKind::ConnectionInvalid
        } else if std::ptr::eq(event, &raw const _xpc_error_connection_interrupted) {
            XpcErrorKind::ConnectionInterrupted
        } else if std::ptr::eq(event, &raw const _xpc_error_termination_imminent) {
            XpcErrorKind::TerminationImminent
        } else {
            XpcErrorKind::Other
        };
        Received::Error(kind)
    } else {
        Received::Other
    }
}

/// One XPC connection, either side: the daemon's to one client (from
/// [`XpcListener`], for [`crate::Arrival::xpc`]), or a
/// client's to the daemon (inside [`crate::Client`], for
/// [`crate::Endpoint::MachService`]). Dropping it cancels the connection.
#[derive(Debug)]
pub struct XpcConnection {
    connection: Object,
    inbound: Inbound,
    in_flight: Arc<InFlight>,
}

impl XpcConnection {
    /// Connects to `epmd`'s Mach service (a LaunchDaemon: the system
    /// bootstrap), without the handshake. This cannot tell whether the
    /// service exists: XPC looks it up on the first message, and a missing
    /// or refusing service shows as the end of the connection.
    pub(crate) fn connect(service_name: &str) -> Result<XpcConnection, XpcError> {
        let name = c_string(service_name, "the service name")?;
        let queue = queue()?;
        // Made first: nothing can fail once the connection exists.
        let sides = inbox().map_err(XpcError::Inbox)?;
        // SAFETY: `name` is a C string that outlives the call; `queue` is a
        // live serial queue. We own the returned reference.
        let raw = unsafe {
            xpc_connection_create_mach_service(name.as_ptr(), queue, MACH_SERVICE_PRIVILEGED)
        };
        let connection = Object::owned(raw).ok_or_else(|| XpcError::Create {
            service: service_name.to_owned(),
        })?;
        // SAFETY: a connection we just created, not resumed yet.
        Ok(unsafe { XpcConnection::start(connection, sides) })
    }

    /// Sets the handler on a connection we hold a reference to, resumes it,
    /// and wraps it, with its inbox.
    ///
    /// # Safety
    ///
    /// `connection` must be a connection not resumed yet.
    unsafe fn start(
        connection: Object,
        (deliverer, inbound): (Deliverer, Inbound),
    ) -> XpcConnection {
        let handler_state = Handler {
            connection: Unowned(connection.0),
            deliverer,
        };
        let block = handler(move |event| handler_state.deliver(event));
        // SAFETY: per the caller. The block's `Unowned` pointer is only used
        // while XPC runs this connection's handler, i.e. while XPC holds it.
        unsafe { activate(connection.0, &block) };
        XpcConnection {
            connection,
            inbound,
            in_flight: Arc::default(),
        }
    }

    /// Who is on the other end, as XPC says (from the connection's audit
    /// token, as of the connect). For a client, the daemon: check that the
    /// uid is 0.
    pub fn peer(&self) -> PeerCredentials {
        let raw = self.connection.0;
        // SAFETY: a live connection we hold a reference to.
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
            // 0 before the first message of a client connection: unknown.
            pid: u32::try_from(pid).ok().filter(|&pid| pid != 0),
        }
    }

    /// Ends the connection: XPC discards unsent messages and delivers no
    /// more events; the reader sees the end after what is queued.
    pub fn cancel(&self) {
        // SAFETY: a live connection we hold a reference to; cancelling
        // twice is allowed.
        unsafe { xpc_connection_cancel(self.connection.0) }
    }
}

impl Link for XpcConnection {
    /// One dictionary holding the frame under
    /// [`super::frame::FRAME_KEY`] and the descriptors under
    /// [`FD_KEYS`]. XPC queues it and never says whether it arrived; a peer
    /// that is gone shows on the next read.
    fn send_frame(&mut self, body: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), FrameError> {
        if self.inbound.over() {
            return Err(FrameError::Io(std::io::ErrorKind::BrokenPipe.into()));
        }
        if fds.len() > FD_KEYS.len() {
            return Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "an XPC message carries at most {} descriptors, not {}",
                    FD_KEYS.len(),
                    fds.len()
                ),
            )));
        }
        if !self.in_flight.start() {
            // As a socket's write timeout: the peer is not reading.
            return Err(FrameError::TimedOut);
        }
        let in_flight = Arc::clone(&self.in_flight);
        let handed_on = RcBlock::new(move || in_flight.done());
        // SAFETY: no keys or values; we own the returned reference.
        let raw = unsafe { xpc_dictionary_create(std::ptr::null(), std::ptr::null(), 0) };
        let Some(dictionary) = Object::owned(raw) else {
            self.in_flight.done();
            return Err(FrameError::Io(std::io::Error::other(
                "xpc_dictionary_create returned NULL",
            )));
        };
        // SAFETY: a live dictionary and C string keys; `body` is valid for
        // its length (XPC copies the bytes) and each descriptor is open
        // for the call (XPC dups it). The connection copies the message
        // logically, and our dictionary reference is released on drop.
        unsafe {
            xpc_dictionary_set_data(
                dictionary.0,
                FRAME_KEY_C.as_ptr(),
                body.as_ptr().cast(),
                body.len(),
            );
            for (key, fd) in FD_KEYS.iter().zip(fds) {
                xpc_dictionary_set_fd(dictionary.0, key.as_ptr(), fd.as_raw_fd());
            }
            xpc_connection_send_message(self.connection.0, dictionary.0);
            // Runs once the message is handed on (XPC copies the block).
            xpc_connection_send_barrier(self.connection.0, &handed_on);
        }
        Ok(())
    }

    fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        self.inbound.recv_frame()
    }

    fn recv_fds(&mut self, expected: usize) -> Result<Vec<OwnedFd>, FdError> {
        self.inbound.recv_fds(expected)
    }

    fn set_timeouts(
        &mut self,
        read: Option<Duration>,
        _write: Option<Duration>,
    ) -> std::io::Result<()> {
        // Sending never blocks: XPC queues.
        self.inbound.set_read_timeout(read);
        Ok(())
    }

    fn read_timeout(&self) -> Option<Duration> {
        self.inbound.read_timeout()
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        self.inbound.readiness()
    }

    fn peer(&self) -> std::io::Result<PeerCredentials> {
        Ok(XpcConnection::peer(self))
    }
}

impl Drop for XpcConnection {
    fn drop(&mut self) {
        if self.inbound.over() {
            // Over already (cancelled, or the peer left): nothing to deliver,
            // and a barrier might never run.
            self.cancel();
            return;
        }
        // Cancelling discards what is not sent yet, such as the daemon's
        // last word to a client it turns away: cancel from a barrier, after
        // everything sent so far has gone. The block holds its own
        // reference until it has run; ours goes now.
        // SAFETY: a live connection we hold a reference to.
        let keep = unsafe { Object::retained(self.connection.0) };
        let cancel_after = RcBlock::new(move || {
            // SAFETY: `keep` holds the connection alive; cancelling twice
            // is allowed.
            unsafe { xpc_connection_cancel(keep.0) }
        });
        // SAFETY: a live connection; XPC copies the block and releases it
        // (and with it `keep`) after running it.
        unsafe { xpc_connection_send_barrier(self.connection.0, &cancel_after) };
    }
}

// ---- the daemon's listener ---------------------------------------------------------

type OnConnection = dyn Fn(XpcConnection) + Send + Sync + 'static;

/// The listener handler's state.
struct Acceptor {
    requirement: Option<(CString, SetPeerRequirement)>,
    on_connection: Arc<OnConnection>,
    refused: Arc<AtomicU64>,
}

impl Acceptor {
    /// One event on the listener: a new peer connection (anything else is
    /// an error on the listener itself, e.g. INVALID once cancelled).
    fn accept(&self, event: XpcObjectRef) {
        // SAFETY: XPC passes a live object, borrowed for this call.
        let kind = unsafe { xpc_get_type(event) };
        if !std::ptr::eq(kind, &raw const _xpc_type_connection) {
            return;
        }
        if let Some((requirement, set_requirement)) = &self.requirement {
            // SAFETY: a live peer connection, not resumed yet; a C string
            // that outlives the call; the function's C signature matches.
            let code = unsafe { set_requirement(event, requirement.as_ptr()) };
            if code != 0 {
                self.refused.fetch_add(1, Ordering::Relaxed);
                // Not accepted: cancel and return without keeping it (XPC
                // disposes of it; it must not be released while inactive).
                // SAFETY: a live connection.
                unsafe { xpc_connection_cancel(event) };
                return;
            }
        }
        let Ok(sides) = inbox() else {
            // Out of descriptors: refuse this peer as above.
            self.refused.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a live connection.
            unsafe { xpc_connection_cancel(event) };
            return;
        };
        // SAFETY: the peer is only lent to this call: keep a reference.
        let peer = unsafe { Object::retained(event) };
        // SAFETY: a peer connection not resumed yet.
        let connection = unsafe { XpcConnection::start(peer, sides) };
        let on_connection = Arc::clone(&self.on_connection);
        // If no thread can be made, the closure (and the connection in it)
        // is dropped: cancelled, released.
        let _ = std::thread::Builder::new()
            .name("epm-xpc-peer".into())
            .spawn(move || on_connection(connection));
    }
}

/// `epmd`'s side: the Mach service listener. Dropping it cancels it (no
/// new connections; those accepted live on).
#[derive(Debug)]
pub struct XpcListener {
    listener: Object,
    refused: Arc<AtomicU64>,
}

impl XpcListener {
    /// Listens on `service_name` (declared under `MachServices` in the
    /// daemon's launchd plist). Each peer is held to `peer_requirement`
    /// when given (a code-signing requirement such as `anchor apple generic
    /// and certificate leaf[subject.OU] = "TEAMID"`; XPC checks every
    /// message the peer sends and drops the connection of one that does
    /// not satisfy it), then handed, resumed, to `on_connection` on a
    /// thread of its own (so it may block). `on_connection` authorizes by
    /// [`XpcConnection::peer`], like the Unix transport's accept.
    pub fn start(
        service_name: &str,
        peer_requirement: Option<&str>,
        on_connection: impl Fn(XpcConnection) + Send + Sync + 'static,
    ) -> Result<XpcListener, XpcError> {
        let name = c_string(service_name, "the service name")?;
        let requirement = match peer_requirement {
            Some(requirement) => Some((
                c_string(requirement, "the code-signing requirement")?,
                peer_requirement_setter().ok_or(XpcError::RequirementUnsupported)?,
            )),
            None => None,
        };
        let queue = queue()?;
        // SAFETY: a C string that outlives the call and a live queue; we
        // own the returned reference.
        let raw = unsafe {
            xpc_connection_create_mach_service(name.as_ptr(), queue, MACH_SERVICE_LISTENER)
        };
        let listener = Object::owned(raw).ok_or_else(|| XpcError::Create {
            service: service_name.to_owned(),
        })?;
        let refused = Arc::new(AtomicU64::new(0));
        let acceptor = Acceptor {
            requirement,
            on_connection: Arc::new(on_connection),
            refused: Arc::clone(&refused),
        };
        let block = handler(move |event| acceptor.accept(event));
        // SAFETY: a listener we just created, not resumed yet.
        unsafe { activate(listener.0, &block) };
        Ok(XpcListener { listener, refused })
    }

    /// Peers refused because XPC would not take the code-signing
    /// requirement for them (it did not parse: a configuration error the
    /// daemon should report), or because no inbox could be made for them
    /// (out of descriptors).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for XpcListener {
    fn drop(&mut self) {
        // SAFETY: a live listener we hold a reference to; cancel before
        // the reference is released (then `listener` drops).
        unsafe { xpc_connection_cancel(self.listener.0) }
    }
}

/// Checks a requirement string for NUL bytes before the daemon starts
/// listening, so a bad configuration is reported at start.
pub fn validate_requirement(requirement: &str) -> Result<(), XpcError> {
    c_string(requirement, "the code-signing requirement").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_apples() {
        assert_eq!(MACH_SERVICE_LISTENER, 1);
        assert_eq!(MACH_SERVICE_PRIVILEGED, 2);
    }

    #[test]
    fn connections_move_to_other_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<XpcConnection>();
        send_sync::<XpcListener>();
    }

    #[test]
    fn names_with_nul_are_refused_before_xpc() {
        assert!(matches!(
            XpcConnection::connect("com.epm\0.x"),
            Err(XpcError::Nul { .. })
        ));
        assert!(validate_requirement("anchor apple\0").is_err());
        assert!(validate_requirement("anchor apple").is_ok());
    }
}
