//! The C side: `struct approval_plugin` from sudo's `sudo_plugin.h`
//! (sudo ≥ 1.9), declared by hand, and the glue from sudo's arguments to
//! [`crate::decide`].
//!
//! Every entry point catches panics: unwinding into sudo is undefined
//! behaviour, and an approval plugin that fails must fail closed. Note that
//! `open` returning 0 would make sudo *disable* the plugin (fail open), so
//! every failure of `open` returns -1.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use epm_ipc::{Client, ClientError, ElevationVerdict, ElevationVia, Request, Response};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};
use nix::unistd::geteuid;

use crate::{Answer, Daemon, DaemonError, Options, Terminal};

/// `SUDO_APPROVAL_PLUGIN`.
const SUDO_APPROVAL_PLUGIN: c_uint = 4;
/// `SUDO_API_VERSION` 1.15: approval plugins came with it (sudo 1.9.0);
/// sudo checks the major version.
const SUDO_API_VERSION: c_uint = (1 << 16) | 15;
/// Conversation message types.
const SUDO_CONV_PROMPT_ECHO_ON: c_int = 0x0002;
const SUDO_CONV_ERROR_MSG: c_int = 0x0003;
const SUDO_CONV_INFO_MSG: c_int = 0x0004;

/// `struct sudo_conv_message`.
#[repr(C)]
#[derive(Debug)]
struct ConvMessage {
    msg_type: c_int,
    timeout: c_int,
    msg: *const c_char,
}

/// `struct sudo_conv_reply`.
#[repr(C)]
#[derive(Debug)]
struct ConvReply {
    reply: *mut c_char,
}

/// `sudo_conv_t`. The callback argument is unused (null).
type Conversation = unsafe extern "C" fn(
    num_msgs: c_int,
    msgs: *const ConvMessage,
    replies: *mut ConvReply,
    callback: *mut c_void,
) -> c_int;

/// `sudo_printf_t`.
type Printf = unsafe extern "C" fn(msg_type: c_int, fmt: *const c_char, ...) -> c_int;

/// A `char * const []` list from sudo, NULL-terminated.
type CStrings = *const *const c_char;

type OpenFn = unsafe extern "C" fn(
    version: c_uint,
    conversation: Option<Conversation>,
    plugin_printf: Option<Printf>,
    settings: CStrings,
    user_info: CStrings,
    submit_optind: c_int,
    submit_argv: CStrings,
    submit_envp: CStrings,
    plugin_options: CStrings,
    errstr: *mut *const c_char,
) -> c_int;

type CheckFn = unsafe extern "C" fn(
    command_info: CStrings,
    run_argv: CStrings,
    run_envp: CStrings,
    errstr: *mut *const c_char,
) -> c_int;

/// `struct approval_plugin`.
#[repr(C)]
#[derive(Debug)]
pub struct ApprovalPlugin {
    kind: c_uint,
    version: c_uint,
    open: Option<OpenFn>,
    close: Option<unsafe extern "C" fn()>,
    check: Option<CheckFn>,
    show_version: Option<unsafe extern "C" fn(verbose: c_int) -> c_int>,
}

/// The symbol named in `/etc/sudo.conf`: `Plugin epm_approval …`.
#[allow(non_upper_case_globals)]
#[unsafe(no_mangle)]
pub static epm_approval: ApprovalPlugin = ApprovalPlugin {
    kind: SUDO_APPROVAL_PLUGIN,
    version: SUDO_API_VERSION,
    open: Some(plugin_open),
    close: Some(plugin_close),
    check: Some(plugin_check),
    show_version: Some(plugin_show_version),
};

/// What `open` was given, for `check`.
#[derive(Debug)]
struct Session {
    conversation: Option<Conversation>,
    options: Options,
    /// The invoking user (sudo's real uid).
    uid: u32,
}

static SESSION: Mutex<Option<Session>> = Mutex::new(None);
/// The last error text; `errstr` points into it until the next call.
static LAST_ERROR: Mutex<Option<CString>> = Mutex::new(None);
/// Set by the SIGINT handler while a user waits for approval.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Points `errstr` at `message` (kept in [`LAST_ERROR`]).
///
/// # Safety
/// `errstr` is null or valid for a write, as sudo passes it.
unsafe fn set_error(errstr: *mut *const c_char, message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let mut slot = lock(&LAST_ERROR);
    *slot = Some(text);
    if !errstr.is_null()
        && let Some(text) = slot.as_ref()
    {
        // SAFETY: sudo gives a valid out-pointer; the string lives in a
        // static until the next error replaces it, after sudo used it.
        unsafe { *errstr = text.as_ptr() };
    }
}

/// Copies a NULL-terminated `char *[]` into owned strings.
///
/// Public for the fuzz targets (`fuzz/`) only; not part of the plugin's API.
///
/// # Safety
/// `list` is null or a NULL-terminated array of valid C strings.
#[doc(hidden)]
pub unsafe fn strings(list: *const *const c_char) -> Vec<String> {
    let mut out = Vec::new();
    if list.is_null() {
        return out;
    }
    let mut i = 0;
    loop {
        // SAFETY: the caller promises a NULL-terminated array; we stop at
        // the NULL.
        let entry = unsafe { *list.add(i) };
        if entry.is_null() {
            break;
        }
        // SAFETY: each entry is a valid NUL-terminated string.
        out.push(
            unsafe { CStr::from_ptr(entry) }
                .to_string_lossy()
                .into_owned(),
        );
        i += 1;
    }
    out
}

unsafe extern "C" fn plugin_open(
    version: c_uint,
    conversation: Option<Conversation>,
    _plugin_printf: Option<Printf>,
    _settings: CStrings,
    user_info: CStrings,
    _submit_optind: c_int,
    _submit_argv: CStrings,
    _submit_envp: CStrings,
    plugin_options: CStrings,
    errstr: *mut *const c_char,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        if version >> 16 != SUDO_API_VERSION >> 16 {
            return Err(format!(
                "epm: sudo plugin API {}.{} is not supported (major 1)",
                version >> 16,
                version & 0xffff
            ));
        }
        // SAFETY: sudo passes NULL-terminated lists of C strings.
        let (user_info, plugin_options) = unsafe { (strings(user_info), strings(plugin_options)) };
        let options = Options::parse(&plugin_options)?;
        let uid = crate::value_of(&user_info, "uid")
            .and_then(|uid| uid.parse().ok())
            .ok_or("epm: sudo gave no uid in user_info")?;
        *lock(&SESSION) = Some(Session {
            conversation,
            options,
            uid,
        });
        Ok(())
    }));
    match result {
        Ok(Ok(())) => 1,
        Ok(Err(message)) => {
            // SAFETY: errstr is sudo's out-pointer.
            unsafe { set_error(errstr, &message) };
            -1
        }
        Err(_) => {
            // SAFETY: as above.
            unsafe { set_error(errstr, "epm: internal error in open") };
            -1
        }
    }
}

unsafe extern "C" fn plugin_close() {
    let _ = catch_unwind(|| {
        *lock(&SESSION) = None;
    });
}

unsafe extern "C" fn plugin_show_version(_verbose: c_int) -> c_int {
    let _ = catch_unwind(|| {
        let conversation = lock(&SESSION).as_ref().and_then(|s| s.conversation);
        let mut terminal = Conversing { conversation };
        terminal.info(concat!("EPM approval plugin ", env!("CARGO_PKG_VERSION")));
    });
    1
}

unsafe extern "C" fn plugin_check(
    command_info: CStrings,
    run_argv: CStrings,
    run_envp: CStrings,
    errstr: *mut *const c_char,
) -> c_int {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: sudo passes NULL-terminated lists of C strings.
        let (command_info, run_argv, run_envp) =
            unsafe { (strings(command_info), strings(run_argv), strings(run_envp)) };
        let (conversation, options, uid) = {
            let session = lock(&SESSION);
            let session = session.as_ref().ok_or("epm: check before open")?;
            (session.conversation, session.options.clone(), session.uid)
        };
        let elevation = crate::Elevation::from_check(&command_info, &run_argv, &run_envp)?;
        let mut daemon = SocketDaemon {
            options: options.clone(),
            uid,
        };
        let mut terminal = Conversing { conversation };
        let _signals = InterruptWatch::start();
        Ok::<_, String>(crate::decide(
            &options,
            &elevation,
            &mut daemon,
            &mut terminal,
        ))
    }));
    match result {
        Ok(Ok(Answer::Approve)) => 1,
        Ok(Ok(Answer::Reject)) => {
            // SAFETY: errstr is sudo's out-pointer.
            unsafe { set_error(errstr, "denied by EPM policy") };
            0
        }
        Ok(Err(message)) => {
            // SAFETY: as above.
            unsafe { set_error(errstr, &message) };
            -1
        }
        Err(_) => {
            // SAFETY: as above.
            unsafe { set_error(errstr, "epm: internal error in check") };
            -1
        }
    }
}

/// The user, through sudo's conversation function.
#[derive(Debug)]
struct Conversing {
    conversation: Option<Conversation>,
}

impl Conversing {
    fn converse(&self, kind: c_int, text: &str) -> Option<String> {
        let conversation = self.conversation?;
        let text = CString::new(text.replace('\0', " ")).ok()?;
        let message = ConvMessage {
            msg_type: kind,
            timeout: 0,
            msg: text.as_ptr(),
        };
        let mut reply = ConvReply {
            reply: std::ptr::null_mut(),
        };
        // SAFETY: one message and one reply slot, as sudo expects; the
        // callback is optional (null).
        let rc = unsafe { conversation(1, &message, &mut reply, std::ptr::null_mut()) };
        if reply.reply.is_null() {
            return None;
        }
        // SAFETY: sudo's reply is a malloc'd NUL-terminated string that the
        // plugin owns and frees.
        let answer = unsafe { CStr::from_ptr(reply.reply) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above; freed once.
        unsafe { libc::free(reply.reply.cast()) };
        (rc == 0).then_some(answer)
    }
}

impl Terminal for Conversing {
    fn info(&mut self, text: &str) {
        self.converse(SUDO_CONV_INFO_MSG, &format!("{text}\n"));
    }

    fn error(&mut self, text: &str) {
        self.converse(SUDO_CONV_ERROR_MSG, &format!("{text}\n"));
    }

    fn ask(&mut self, question: &str) -> Option<String> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return None;
        }
        self.converse(SUDO_CONV_PROMPT_ECHO_ON, question)
    }

    fn cancelled(&mut self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }

    fn pause(&mut self, how_long: Duration) {
        let until = Instant::now() + how_long;
        while Instant::now() < until && !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

extern "C" fn on_interrupt(_signal: c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// While a command is checked, Ctrl-C (SIGINT) and SIGTERM set a flag
/// instead of whatever sudo does, so a user waiting for approvers can give
/// up and the plugin answers "no" cleanly. sudo's handlers and signal mask
/// come back on drop.
struct InterruptWatch {
    previous: Vec<(Signal, SigAction)>,
    mask: Option<SigSet>,
}

impl InterruptWatch {
    fn start() -> InterruptWatch {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_interrupt),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is
            // async-signal-safe.
            if let Ok(old) = unsafe { nix::sys::signal::sigaction(signal, &action) } {
                previous.push((signal, old));
            }
        }
        let mut unblock = SigSet::empty();
        unblock.add(Signal::SIGINT);
        unblock.add(Signal::SIGTERM);
        let mut mask = SigSet::empty();
        let mask = nix::sys::signal::pthread_sigmask(
            SigmaskHow::SIG_UNBLOCK,
            Some(&unblock),
            Some(&mut mask),
        )
        .ok()
        .map(|()| mask);
        InterruptWatch { previous, mask }
    }
}

impl Drop for InterruptWatch {
    fn drop(&mut self) {
        if let Some(mask) = &self.mask {
            let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
        }
        for (signal, old) in &self.previous {
            // SAFETY: restores the handler sudo had.
            let _ = unsafe { nix::sys::signal::sigaction(*signal, old) };
        }
    }
}

/// `epmd` over its control socket, one connection per question (a user
/// waiting for approvers holds none).
#[derive(Debug)]
struct SocketDaemon {
    options: Options,
    /// The invoking user (sudo's real uid).
    uid: u32,
}

impl SocketDaemon {
    /// Connects as sudo runs the plugin: as root. `epmd` accepts `elevate`
    /// only from root, and checks that this process's real uid is the user
    /// the request names, so a user's own client cannot pass for sudo.
    /// Only root's `epmd` is trusted with the answer.
    fn connect(&self) -> Result<Client, DaemonError> {
        let unreachable = |e: ClientError| DaemonError::Unreachable(e.to_string());
        let mut client = Client::connect(
            &epm_ipc::Endpoint::Socket(self.options.socket.clone()),
            concat!("epm-sudo ", env!("CARGO_PKG_VERSION")),
        )
        .map_err(unreachable)?;
        if geteuid().is_root() {
            match client.daemon_credentials() {
                Ok(peer) if peer.uid == 0 => {}
                Ok(peer) => {
                    return Err(DaemonError::Refused(format!(
                        "{} belongs to uid {}, not root: not epmd",
                        self.options.socket.display(),
                        peer.uid
                    )));
                }
                Err(e) => return Err(DaemonError::Unreachable(e.to_string())),
            }
        }
        client
            .set_timeout(Some(self.options.timeout))
            .map_err(unreachable)?;
        Ok(client)
    }
}

impl Daemon for SocketDaemon {
    fn elevate(
        &mut self,
        elevation: &crate::Elevation,
        reason: Option<&str>,
    ) -> Result<ElevationVerdict, DaemonError> {
        let mut client = self.connect()?;
        let request = Request::Elevate {
            via: ElevationVia::Sudo,
            command: elevation.command.clone(),
            reason: reason.map(str::to_owned),
            window: None,
            for_uid: Some(self.uid),
            env: elevation.env.clone(),
            edit: elevation.edit.clone(),
        };
        match client.call(&request) {
            Ok(Response::Elevation(verdict)) => Ok(verdict),
            Ok(other) => Err(DaemonError::Refused(format!(
                "epmd sent an unexpected answer: {other:?}"
            ))),
            Err(ClientError::Daemon { message, .. }) => Err(DaemonError::Refused(message)),
            Err(error) => Err(DaemonError::Unreachable(error.to_string())),
        }
    }
}
