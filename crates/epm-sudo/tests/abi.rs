//! The plugin through its C ABI, as sudo calls it: the built shared library
//! loaded with dlopen, its `epm_approval` symbol, `open` then `check`,
//! against a fake epmd on a Unix socket. (Being an integration test also
//! makes `cargo test --workspace` build the shared library, which the
//! end-to-end tests load into the real sudo.)
#![allow(clippy::unwrap_used, unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use epm_ipc::{ElevationVerdict, Request, Response, read_frame, write_frame};

#[repr(C)]
struct ConvMessage {
    msg_type: c_int,
    timeout: c_int,
    msg: *const c_char,
}

#[repr(C)]
struct ConvReply {
    reply: *mut c_char,
}

type Conversation =
    unsafe extern "C" fn(c_int, *const ConvMessage, *mut ConvReply, *mut c_void) -> c_int;
type OpenFn = unsafe extern "C" fn(
    c_uint,
    Option<Conversation>,
    *const c_void,
    *const *const c_char,
    *const *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
    *const *const c_char,
    *mut *const c_char,
) -> c_int;
type CheckFn = unsafe extern "C" fn(
    *const *const c_char,
    *const *const c_char,
    *const *const c_char,
    *mut *const c_char,
) -> c_int;

#[repr(C)]
struct ApprovalPlugin {
    kind: c_uint,
    version: c_uint,
    open: Option<OpenFn>,
    close: Option<unsafe extern "C" fn()>,
    check: Option<CheckFn>,
    show_version: Option<unsafe extern "C" fn(c_int) -> c_int>,
}

static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" fn conversation(
    n: c_int,
    msgs: *const ConvMessage,
    _replies: *mut ConvReply,
    _callback: *mut c_void,
) -> c_int {
    for i in 0..n as usize {
        // SAFETY: sudo's contract: n messages.
        let msg = unsafe { &*msgs.add(i) };
        // SAFETY: a NUL-terminated string from the plugin.
        let text = unsafe { CStr::from_ptr(msg.msg) }
            .to_string_lossy()
            .into_owned();
        SAID.lock().unwrap().push(text);
    }
    0
}

fn library() -> PathBuf {
    // cargo leaves it in target/<profile>/deps beside this test, and copies
    // it to target/<profile> on a plain build.
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let name = if cfg!(target_os = "macos") {
        "libepm_sudo.dylib"
    } else {
        "libepm_sudo.so"
    };
    [deps.join(name), deps.parent().unwrap().join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| deps.join(name))
}

/// A C array of C strings, NULL-terminated, kept alive with its strings.
struct CList {
    _strings: Vec<CString>,
    pointers: Vec<*const c_char>,
}

impl CList {
    fn new(items: &[&str]) -> CList {
        let strings: Vec<CString> = items.iter().map(|s| CString::new(*s).unwrap()).collect();
        let mut pointers: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        pointers.push(std::ptr::null());
        CList {
            _strings: strings,
            pointers,
        }
    }
    fn ptr(&self) -> *const *const c_char {
        self.pointers.as_ptr()
    }
}

/// A fake epmd answering every `elevate` with `verdict`.
fn fake_epmd(socket: &Path, verdict: ElevationVerdict) -> std::thread::JoinHandle<Option<Request>> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        read_frame(&mut stream).unwrap()?;
        let welcome = Response::Welcome {
            protocol: epm_ipc::PROTOCOL_VERSION,
            daemon_version: "fake".into(),
            uid: nix::unistd::getuid().as_raw(),
            is_admin: false,
        };
        write_frame(&mut stream, &epm_ipc::encode(&welcome).unwrap()).unwrap();
        let frame = read_frame(&mut stream).unwrap()?;
        let request: Request = epm_ipc::decode(&frame).unwrap();
        let answer = Response::Elevation(verdict);
        write_frame(&mut stream, &epm_ipc::encode(&answer).unwrap()).unwrap();
        Some(request)
    })
}

#[test]
fn sudo_loads_the_plugin_and_check_follows_epmd() {
    let path = CString::new(library().to_str().unwrap()).unwrap();
    // SAFETY: loading our own library; it has no constructors.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
    assert!(!handle.is_null(), "dlopen {}", library().display());
    let symbol = CString::new("epm_approval").unwrap();
    // SAFETY: the symbol is a static `struct approval_plugin`.
    let plugin = unsafe { libc::dlsym(handle, symbol.as_ptr()) }.cast::<ApprovalPlugin>();
    assert!(!plugin.is_null());
    // SAFETY: as above.
    let plugin = unsafe { &*plugin };
    assert_eq!(plugin.kind, 4, "SUDO_APPROVAL_PLUGIN");
    assert_eq!(plugin.version >> 16, 1, "API major 1");

    let dir = tempfile::tempdir().unwrap();
    for (name, verdict, expected) in [
        (
            "deny",
            ElevationVerdict::Denied {
                rule_id: Some("no-cat".into()),
                message: "cat as root is not allowed here".into(),
            },
            0,
        ),
        (
            "allow",
            ElevationVerdict::Allowed {
                rule_id: Some("id-ok".into()),
                grant_id: None,
            },
            1,
        ),
    ] {
        let socket = dir.path().join(format!("{name}.sock"));
        let server = fake_epmd(&socket, verdict);
        let uid = format!("uid={}", nix::unistd::getuid());
        let user_info = CList::new(&["user=alice", &uid]);
        let socket_option = format!("socket={}", socket.display());
        let options = CList::new(&[&socket_option, "fail=deny"]);
        let empty = CList::new(&[]);
        let mut errstr: *const c_char = std::ptr::null();
        // SAFETY: the arguments follow sudo_plugin.h.
        let opened = unsafe {
            (plugin.open.unwrap())(
                (1 << 16) | 17,
                Some(conversation),
                std::ptr::null(),
                empty.ptr(),
                user_info.ptr(),
                0,
                empty.ptr(),
                empty.ptr(),
                options.ptr(),
                &mut errstr,
            )
        };
        assert_eq!(opened, 1);
        let command_info = CList::new(&["command=/usr/bin/cat", "runas_user=root"]);
        let argv = CList::new(&["cat", "/etc/shadow"]);
        let envp = CList::new(&["PATH=/usr/bin", "LD_PRELOAD=/tmp/x.so"]);
        // SAFETY: as above.
        let checked = unsafe {
            (plugin.check.unwrap())(command_info.ptr(), argv.ptr(), envp.ptr(), &mut errstr)
        };
        assert_eq!(checked, expected, "{name}");
        let request = server.join().unwrap().unwrap();
        match request {
            Request::Elevate {
                command,
                via,
                env,
                for_uid,
                edit,
                ..
            } => {
                assert_eq!(env, ["PATH=/usr/bin", "LD_PRELOAD=/tmp/x.so"], "all of it");
                assert_eq!(for_uid, Some(nix::unistd::getuid().as_raw()));
                assert_eq!(edit, None);
                assert_eq!(command.program, "/usr/bin/cat");
                assert_eq!(command.argv, ["cat", "/etc/shadow"]);
                assert_eq!(via, epm_ipc::ElevationVia::Sudo);
            }
            other => panic!("{other:?}"),
        }
        // SAFETY: as above.
        unsafe { (plugin.close.unwrap())() };
    }
    let said = SAID.lock().unwrap().join("");
    assert!(
        said.contains("epm: cat as root is not allowed here"),
        "{said}"
    );

    // A bad option makes open fail with -1 (not 0, which would disable the
    // plugin: fail open), and errstr names it.
    let options = CList::new(&["fail=sometimes"]);
    let user_info = CList::new(&["uid=0"]);
    let empty = CList::new(&[]);
    let mut errstr: *const c_char = std::ptr::null();
    // SAFETY: as above.
    let opened = unsafe {
        (plugin.open.unwrap())(
            (1 << 16) | 17,
            Some(conversation),
            std::ptr::null(),
            empty.ptr(),
            user_info.ptr(),
            0,
            empty.ptr(),
            empty.ptr(),
            options.ptr(),
            &mut errstr,
        )
    };
    assert_eq!(opened, -1);
    // SAFETY: the plugin set errstr to a NUL-terminated string.
    let message = unsafe { CStr::from_ptr(errstr) }
        .to_string_lossy()
        .into_owned();
    assert!(message.contains("fail=sometimes"), "{message}");
}
