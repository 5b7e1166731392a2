//! `epmctl run`: starting an allowed command for the caller, as its run-as
//! user, on the caller's own stdin, stdout and stderr (passed over the
//! socket), and serving the connection until it ends.
//!
//! The command always starts in a new session (`setsid`), so it does not
//! share the caller's job control: `epmctl` forwards the signals its user
//! sends ([`Request::Signal`]) to the command's process group.
//!
//! - **On a terminal** (the caller's stdin is a tty and it sent its size):
//!   the command gets a new pseudo-terminal as its controlling terminal and
//!   stdio, and two relay threads copy the caller's terminal to the pty and
//!   the pty to the caller's stdout (the caller puts its own terminal in raw
//!   mode, so keys such as Ctrl+C reach the pty's line discipline).
//!   [`Request::Resize`] sets the pty's size; the kernel then tells the
//!   command with SIGWINCH.
//! - **Otherwise** the command gets the caller's three descriptors as they
//!   are (pipes, files).
//!
//! **The privilege dies with the caller**: when the client disconnects, the
//! command's process group gets SIGHUP (and SIGCONT, in case it is
//! stopped), then SIGKILL after [`HANGUP_GRACE`]. On Linux the command
//! itself also gets SIGKILL if `epmd` dies (`PR_SET_PDEATHSIG`).
//!
//! **Environment**: the command gets only [`epm_policy::env::KEPT_ENV`]
//! (and `LC_*`) from the caller, with values that cannot name files or format strings (as
//! sudo checks them: no `/` or `%`; `TZ` only as a zone name or under
//! `/usr/share/zoneinfo/`), plus `HOME`, `USER`, `LOGNAME` and `SHELL` of
//! the run-as user and `PATH` = [`SECURE_PATH`].
//!
//! **Working directory**: the caller's, entered as the run-as user. When
//! that fails (gone, or not searchable by that user), the command says so
//! on its stderr and runs in `/`, as sudo does for a working directory the
//! user did not ask for explicitly.
//!
//! **Descriptors**: everything but stdio is closed at exec, whatever the
//! daemon holds open (fanotify, the store).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use epm_ipc::{
    Command, ErrorCode, ExitStatus, Incoming, Request, Response, ServerConnection, ServerError,
    TermSize,
};
use epm_policy::env::keeps_variable;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{Signal, killpg};
use std::fs::File;

use crate::grants::program::Program;
use nix::unistd::Pid;

/// The `PATH` a command gets, whatever the caller's.
pub(crate) const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a command has to end after SIGHUP, once its caller is gone,
/// before SIGKILL.
pub(crate) const HANGUP_GRACE: Duration = Duration::from_secs(2);

/// How long the pty's output may keep coming after the command ended
/// (background processes holding the terminal), before the relay stops.
const OUTPUT_LINGER: Duration = Duration::from_millis(200);

/// How long to wait for the relay to hand over the last output.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Signals a caller may send to its command, by name without `SIG`.
const FORWARDED_SIGNALS: [(&str, Signal); 9] = [
    ("INT", Signal::SIGINT),
    ("TERM", Signal::SIGTERM),
    ("HUP", Signal::SIGHUP),
    ("QUIT", Signal::SIGQUIT),
    ("TSTP", Signal::SIGTSTP),
    ("CONT", Signal::SIGCONT),
    ("WINCH", Signal::SIGWINCH),
    ("USR1", Signal::SIGUSR1),
    ("USR2", Signal::SIGUSR2),
];

/// A signal a caller may send to its command ([`FORWARDED_SIGNALS`]).
pub(crate) fn signal_named(name: &str) -> Option<Signal> {
    FORWARDED_SIGNALS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, signal)| *signal)
}

/// The user a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunAs {
    /// Login name.
    pub(crate) name: String,
    /// User id.
    pub(crate) uid: u32,
    /// Primary group.
    pub(crate) gid: u32,
    /// All groups (primary included).
    pub(crate) groups: Vec<u32>,
    /// Home directory.
    pub(crate) home: String,
    /// Login shell (`/bin/sh` when the account has none).
    pub(crate) shell: String,
}

impl RunAs {
    /// Looks the user up.
    pub(crate) fn resolve(name: &str) -> Result<RunAs, RunError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| RunError::Setup(format!("looking up the user {name:?}: {e}")))?
            .ok_or_else(|| RunError::UnknownUser(name.to_owned()))?;
        let shell = user.shell.to_string_lossy().into_owned();
        Ok(RunAs {
            groups: groups_of(&user),
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir.to_string_lossy().into_owned(),
            shell: if shell.is_empty() {
                "/bin/sh".into()
            } else {
                shell
            },
        })
    }
}

/// The groups a command runs with: the user's ([`epm_os::users::groups_of`]),
/// primary first, as many as `setgroups` takes.
fn groups_of(user: &nix::unistd::User) -> Vec<u32> {
    let mut gids = epm_os::users::groups_of(&user.name, user.gid.as_raw());
    // setgroups takes at most NGROUPS_MAX (16) groups on macOS.
    if cfg!(target_vendor = "apple") {
        gids.truncate(16);
    }
    if gids.is_empty() {
        gids.push(user.gid.as_raw());
    }
    gids
}

/// The command's whole environment.
pub(crate) fn command_env(
    caller: &BTreeMap<String, String>,
    run_as: &RunAs,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = caller
        .iter()
        .filter(|(name, value)| keeps_variable(name, value))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    env.insert("HOME".into(), run_as.home.clone());
    env.insert("USER".into(), run_as.name.clone());
    env.insert("LOGNAME".into(), run_as.name.clone());
    env.insert("SHELL".into(), run_as.shell.clone());
    env.insert("PATH".into(), SECURE_PATH.into());
    env
}

/// What to run, for whom, and how.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    /// The program's canonical path (for messages; what macOS executes).
    pub(crate) program: String,
    /// The program as the daemon checked it: on Linux the command is
    /// this descriptor, executed with `execveat(fd, "", AT_EMPTY_PATH)`, so
    /// nothing that happens to the path meanwhile changes what runs. `None`
    /// only in tests, which run a path.
    pub(crate) checked: Option<Arc<File>>,
    /// The program is a `#!` script: its interpreter reads it through
    /// `/dev/fd/N`, so the descriptor stays open across the exec.
    pub(crate) script: bool,
    /// Its arguments, `argv[0]` first.
    pub(crate) argv: Vec<String>,
    /// Who it runs as.
    pub(crate) run_as: RunAs,
    /// The caller's working directory.
    pub(crate) cwd: String,
    /// The whole environment ([`command_env`]).
    pub(crate) env: BTreeMap<String, String>,
    /// The caller's terminal size, when it is on a terminal.
    pub(crate) tty: Option<TermSize>,
    /// The rule that allowed it.
    pub(crate) rule_id: Option<String>,
}

impl RunSpec {
    /// The spec for a `run` request: resolves the run-as user, filters the
    /// caller's environment.
    pub(crate) fn new(
        command: &Command,
        program: Program,
        cwd: String,
        caller_env: &BTreeMap<String, String>,
        tty: Option<TermSize>,
        rule_id: Option<String>,
    ) -> Result<RunSpec, RunError> {
        let nul = |s: &String| s.contains('\0');
        if command.argv.iter().any(nul) || nul(&cwd) {
            return Err(RunError::Invalid(
                "the arguments and the directory may not contain NUL".into(),
            ));
        }
        let run_as = RunAs::resolve(&command.run_as)?;
        let env = command_env(caller_env, &run_as);
        Ok(RunSpec {
            program: program.canonical,
            checked: Some(Arc::new(program.file)),
            script: program.script,
            argv: command.argv.clone(),
            run_as,
            cwd,
            env,
            tty,
            rule_id,
        })
    }
}

/// How a run ended, for the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunEnd {
    /// The command's process id.
    pub(crate) pid: u32,
    /// How it ended.
    pub(crate) status: ExitStatus,
    /// From start to end.
    pub(crate) duration: Duration,
    /// The caller disconnected first: the command was hung up on.
    pub(crate) caller_left: bool,
    /// It ran on a pseudo-terminal.
    pub(crate) on_pty: bool,
}

/// Why a command did not start (or its connection failed).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunError {
    /// The request cannot be run as it is.
    #[error("{0}")]
    Invalid(String),
    /// No such run-as user.
    #[error("no user named {0:?} to run as")]
    UnknownUser(String),
    /// The program could not be started.
    #[error("cannot run {program}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// Why, for a person.
        reason: String,
        /// The class.
        code: ErrorCode,
    },
    /// The daemon could not prepare the run (a pty, a pipe, a thread).
    #[error("cannot start the command: {0}")]
    Setup(String),
    /// The connection failed; it must be closed.
    #[error("{0}")]
    Connection(#[from] ServerError),
}

impl RunError {
    /// The answer for the client (for every error but
    /// [`RunError::Connection`], before anything was sent).
    pub(crate) fn response(&self) -> Response {
        let code = match self {
            RunError::Invalid(_) => ErrorCode::BadRequest,
            RunError::UnknownUser(_) => ErrorCode::NotFound,
            RunError::Spawn { code, .. } => *code,
            RunError::Setup(_) | RunError::Connection(_) => ErrorCode::Internal,
        };
        Response::error(code, self.to_string())
    }
}

fn setup(what: &str) -> impl FnOnce(io::Error) -> RunError + '_ {
    move |e| RunError::Setup(format!("{what}: {e}"))
}

/// A spawn failure in words.
fn spawn_error(program: &str, error: &io::Error) -> RunError {
    let (code, reason) = match (error.kind(), error.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => (ErrorCode::NotFound, "no such program".to_owned()),
        (io::ErrorKind::PermissionDenied, _) => (
            ErrorCode::Forbidden,
            "permission denied (not executable, or a directory above it is not searchable)"
                .to_owned(),
        ),
        (_, Some(libc::ENOEXEC)) => (ErrorCode::BadRequest, "not an executable format".to_owned()),
        _ => (ErrorCode::Internal, error.to_string()),
    };
    RunError::Spawn {
        program: program.to_owned(),
        reason,
        code,
    }
}

/// Starts `spec` on the caller's `stdio` ([stdin, stdout, stderr]), sends
/// [`Response::Started`], serves [`Request::Signal`] and
/// [`Request::Resize`] while it runs, and sends [`Response::Exited`].
///
/// `Err` other than [`RunError::Connection`]: nothing has been sent; answer
/// with [`RunError::response`]. A caller that disconnects is not an error:
/// the command is hung up on and the end says so.
pub(crate) fn run(
    connection: &mut ServerConnection,
    spec: RunSpec,
    stdio: Vec<OwnedFd>,
    on_start: impl FnOnce(u32),
) -> Result<RunEnd, RunError> {
    let [stdin, stdout, stderr]: [OwnedFd; 3] = stdio.try_into().map_err(|fds: Vec<OwnedFd>| {
        RunError::Invalid(format!(
            "expected stdin, stdout and stderr, got {} descriptors",
            fds.len()
        ))
    })?;
    let on_tty = spec
        .tty
        .filter(|_| nix::unistd::isatty(stdin.as_raw_fd()).unwrap_or(false));
    let (child, relay) = match on_tty {
        Some(size) => {
            let pty = open_pty(size)?;
            let slave = |what| pty.slave.try_clone().map_err(setup(what));
            let stdio = [slave("pty")?, slave("pty")?, slave("pty")?];
            let child = spawn(&spec, stdio, true)?;
            drop(pty.slave);
            let relay = Relay::start(pty.master, stdin, stdout)?;
            drop(stderr);
            (child, Some(relay))
        }
        None => (spawn(&spec, [stdin, stdout, stderr], false)?, None),
    };
    let started = Instant::now();
    let pid = child.id();
    let group = Pid::from_raw(pid as i32);
    let (exit_rx, wake) = wait_in_thread(child)?;
    tracing::info!(
        pid,
        program = %spec.program,
        run_as = %spec.run_as.name,
        on_pty = relay.is_some(),
        "run: started"
    );
    on_start(pid);
    let mut caller_left = connection
        .send(&Response::Started {
            pid,
            rule_id: spec.rule_id.clone(),
        })
        .is_err();
    let mut status = None;
    while !caller_left && status.is_none() {
        match next_event(connection.readiness(), &wake) {
            Event::Exited => status = exit_rx.recv().ok(),
            Event::Client => match connection.next_request() {
                Ok(Some(incoming)) => {
                    if serve(connection, incoming, group, relay.as_ref()).is_err() {
                        caller_left = true;
                    }
                }
                Ok(None) | Err(_) => caller_left = true,
            },
        }
    }
    let status = match status {
        Some(status) => status,
        None => {
            tracing::info!(pid, "run: the caller left; hanging up on the command");
            hang_up(group, &exit_rx)
        }
    };
    if let Some(relay) = relay {
        relay.finish();
    }
    let end = RunEnd {
        pid,
        status,
        duration: started.elapsed(),
        caller_left,
        on_pty: on_tty.is_some(),
    };
    if !caller_left {
        connection.send(&Response::Exited(status))?;
    }
    Ok(end)
}

/// Answers one message from the client while the command runs.
fn serve(
    connection: &mut ServerConnection,
    incoming: Incoming,
    group: Pid,
    relay: Option<&Relay>,
) -> Result<(), ServerError> {
    match incoming {
        Incoming::Request(Request::Signal { signal }) => match signal_named(&signal) {
            Some(signal) => {
                if let Err(error) = killpg(group, signal) {
                    tracing::debug!(%error, ?signal, "run: cannot forward a signal");
                }
                Ok(())
            }
            None => connection.send(&Response::error(
                ErrorCode::BadRequest,
                format!(
                    "the signal {signal:?} is not forwarded (INT, TERM, HUP, QUIT, TSTP, CONT, WINCH, USR1, USR2)"
                ),
            )),
        },
        Incoming::Request(Request::Resize(size)) => {
            if let Some(relay) = relay
                && let Err(error) = set_size(relay.master.as_fd(), size)
            {
                tracing::debug!(%error, "run: cannot resize the pty");
            }
            Ok(())
        }
        Incoming::Request(other) => connection.send(&Response::error(
            ErrorCode::BadRequest,
            format!(
                "only signal and resize while a command runs, not {}",
                epm_ipc::Message::type_name(&other)
            ),
        )),
        Incoming::Unsupported(kind) => connection.send(&Response::error(
            ErrorCode::Unsupported,
            format!("this epmd does not know the request {kind:?}"),
        )),
    }
}

/// SIGHUP (and SIGCONT) to the group, SIGKILL after the grace; the status.
fn hang_up(group: Pid, exit_rx: &mpsc::Receiver<ExitStatus>) -> ExitStatus {
    let _ = killpg(group, Signal::SIGHUP);
    let _ = killpg(group, Signal::SIGCONT);
    if let Ok(status) = exit_rx.recv_timeout(HANGUP_GRACE) {
        return status;
    }
    let _ = killpg(group, Signal::SIGKILL);
    exit_rx.recv().unwrap_or(ExitStatus {
        code: None,
        signal: Some(Signal::SIGKILL as i32),
    })
}

enum Event {
    Exited,
    Client,
}

/// Waits for the command to end or the client to say something (or leave).
fn next_event(client: BorrowedFd<'_>, wake: &UnixStream) -> Event {
    loop {
        let mut fds = [
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            PollFd::new(client, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
                if ready(&fds[0]) {
                    return Event::Exited;
                }
                if ready(&fds[1]) {
                    return Event::Client;
                }
            }
            Err(Errno::EINTR) => {}
            // Cannot happen with valid descriptors; let the read tell.
            Err(_) => return Event::Client,
        }
    }
}

/// Reaps the command on a thread; its status comes on the channel, and the
/// returned stream becomes readable then.
fn wait_in_thread(mut child: Child) -> Result<(mpsc::Receiver<ExitStatus>, UnixStream), RunError> {
    let (wake, ring) = UnixStream::pair().map_err(setup("a wake-up socket"))?;
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    let spawned = std::thread::Builder::new()
        .name("epm-run-wait".into())
        .spawn(move || {
            let status = match child.wait() {
                Ok(status) => ExitStatus {
                    code: status.code(),
                    signal: status.signal(),
                },
                Err(error) => {
                    tracing::warn!(pid, %error, "run: cannot wait for the command");
                    ExitStatus {
                        code: None,
                        signal: None,
                    }
                }
            };
            let _ = tx.send(status);
            drop(ring);
        });
    if let Err(error) = spawned {
        // The child is gone with the closure: kill what it started.
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        return Err(RunError::Setup(format!("a thread to wait on it: {error}")));
    }
    Ok((rx, wake))
}

/// Forks and execs the command: new session, controlling terminal (on a
/// pty), the run-as user's groups and ids, the working directory.
fn spawn(spec: &RunSpec, stdio: [OwnedFd; 3], controlling_tty: bool) -> Result<Child, RunError> {
    let [stdin, stdout, stderr] = stdio;
    let mut command = std::process::Command::new(&spec.program);
    command
        .arg0(spec.argv.first().unwrap_or(&spec.program))
        .args(spec.argv.iter().skip(1))
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    let groups: Vec<libc::gid_t> = spec
        .run_as
        .groups
        .iter()
        .map(|&g| g as libc::gid_t)
        .collect();
    let uid = spec.run_as.uid as libc::uid_t;
    let gid = spec.run_as.gid as libc::gid_t;
    let cwd = CString::new(spec.cwd.as_str())
        .map_err(|_| RunError::Invalid("the directory contains NUL".into()))?;
    let warning = format!(
        "epmd: cannot change to directory {:?} as {}; running in /\n",
        spec.cwd, spec.run_as.name
    )
    .into_bytes();
    let fd_limit = descriptor_limit();
    let image = ExecImage::new(spec)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let daemon_pid = nix::unistd::getpid().as_raw();
    let child_setup = move || -> io::Result<()> {
        // Only async-signal-safe calls from here: this runs between fork
        // and exec. Everything was prepared above.
        let check = |result: libc::c_int| {
            if result == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on this process, with pointers into
        // buffers that live in this closure for the whole call.
        unsafe {
            // The signals epmctl forwards must reach the command whatever
            // dispositions epmd inherited: a daemon started from a
            // non-interactive shell's background job ignores INT and QUIT,
            // and an ignored disposition survives exec. (std already
            // empties the signal mask.)
            for (_, signal) in FORWARDED_SIGNALS {
                libc::signal(signal as libc::c_int, libc::SIG_DFL);
            }
            check(libc::setsid())?;
            if controlling_tty {
                check(libc::ioctl(0, libc::TIOCSCTTY as _, 0))?;
            }
            check(libc::setgroups(groups.len() as _, groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            #[cfg(any(target_os = "linux", target_os = "android"))]
            {
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
                if libc::getppid() != daemon_pid {
                    return Err(io::Error::other("epmd ended"));
                }
            }
            if libc::chdir(cwd.as_ptr()) == -1 {
                let _ = libc::write(2, warning.as_ptr().cast(), warning.len());
                check(libc::chdir(c"/".as_ptr()))?;
            }
        }
        close_on_exec_from(3, fd_limit);
        match &image {
            Some(image) => Err(image.exec()),
            None => Ok(()),
        }
    };
    // SAFETY: the closure makes only async-signal-safe calls (system calls
    // on prepared buffers; no allocation, no locks).
    unsafe { command.pre_exec(child_setup) };
    command.spawn().map_err(|e| spawn_error(&spec.program, &e))
}

/// The checked program's descriptor with everything its exec needs,
/// prepared before the fork (the child may not allocate).
#[cfg(any(target_os = "linux", target_os = "android"))]
struct ExecImage {
    fd: RawFd,
    script: bool,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned by the same value and
// never changed; the child that uses them is a copy of this process.
#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe impl Send for ExecImage {}
// SAFETY: as above; nothing is written through the pointers.
#[cfg(any(target_os = "linux", target_os = "android"))]
unsafe impl Sync for ExecImage {}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl ExecImage {
    /// `None` when the spec has no checked file (tests).
    fn new(spec: &RunSpec) -> Result<Option<ExecImage>, RunError> {
        let Some(file) = &spec.checked else {
            return Ok(None);
        };
        let invalid = |_| RunError::Invalid("NUL in an argument or variable".into());
        let argv: Vec<CString> = spec
            .argv
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        let envp: Vec<CString> = spec
            .env
            .iter()
            .map(|(k, v)| CString::new(format!("{k}={v}")))
            .collect::<Result<_, _>>()
            .map_err(invalid)?;
        let pointers = |list: &[CString]| {
            list.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        let (argv_ptrs, envp_ptrs) = (pointers(&argv), pointers(&envp));
        let mut strings = argv;
        strings.extend(envp);
        Ok(Some(ExecImage {
            fd: file.as_raw_fd(),
            script: spec.script,
            _strings: strings,
            argv: argv_ptrs,
            envp: envp_ptrs,
        }))
    }

    /// Executes the descriptor (in the child, after the setup); returns
    /// only on failure. A script keeps its descriptor open across the exec
    /// (its interpreter opens `/dev/fd/N`); a binary's closes with it.
    fn exec(&self) -> io::Error {
        // SAFETY: async-signal-safe system calls on prepared, NUL-terminated
        // arrays that live as long as `self`.
        unsafe {
            if self.script {
                libc::fcntl(self.fd, libc::F_SETFD, 0);
            }
            libc::syscall(
                libc::SYS_execveat,
                self.fd,
                c"".as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
        }
        io::Error::last_os_error()
    }
}

/// macOS cannot execute a descriptor (no `fexecve`): the command is the
/// canonical path, whose every directory the daemon checked is root's
/// alone, so only root could swap it between the check and the exec.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
struct ExecImage;

#[cfg(not(any(target_os = "linux", target_os = "android")))]
impl ExecImage {
    /// No image: the path is executed, once it is checked to still name
    /// the file that was decided on (a script the same way).
    fn new(spec: &RunSpec) -> Result<Option<ExecImage>, RunError> {
        use std::os::unix::fs::MetadataExt;
        let _script_runs_by_path_too = spec.script;
        if let Some(file) = &spec.checked {
            let checked = file.metadata().map_err(setup("the checked program"))?;
            let now = std::fs::metadata(&spec.program).map_err(setup("the program"))?;
            if (checked.dev(), checked.ino()) != (now.dev(), now.ino()) {
                return Err(RunError::Invalid(format!(
                    "{} changed since it was checked",
                    spec.program
                )));
            }
        }
        Ok(None)
    }

    fn exec(&self) -> io::Error {
        io::Error::from(io::ErrorKind::Unsupported)
    }
}

/// The highest descriptor number to mark close-on-exec, when the kernel
/// cannot do it in one call.
fn descriptor_limit() -> libc::c_int {
    // SAFETY: sysconf has no preconditions.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    libc::c_int::try_from(max)
        .unwrap_or(65_536)
        .clamp(256, 65_536)
}

/// Marks every descriptor from `first` close-on-exec (in the child).
fn close_on_exec_from(first: libc::c_int, limit: libc::c_int) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        // SAFETY: close_range only changes descriptor flags of this process.
        let done = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                first as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if done == 0 {
            return;
        }
    }
    for fd in first..limit {
        // SAFETY: setting FD_CLOEXEC on a descriptor that may not exist is
        // harmless (EBADF).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
}

/// A new pty of the caller's size; both ends close-on-exec, the master
/// non-blocking (the relay polls it).
fn open_pty(size: TermSize) -> Result<Pty, RunError> {
    let winsize = nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&winsize), None)
        .map_err(|e| RunError::Setup(format!("a pseudo-terminal: {e}")))?;
    for fd in [&pty.master, &pty.slave] {
        set_fd_flag(
            fd.as_raw_fd(),
            libc::F_GETFD,
            libc::F_SETFD,
            libc::FD_CLOEXEC,
        )?;
    }
    set_fd_flag(
        pty.master.as_raw_fd(),
        libc::F_GETFL,
        libc::F_SETFL,
        libc::O_NONBLOCK,
    )?;
    Ok(Pty {
        master: pty.master,
        slave: pty.slave,
    })
}

fn set_fd_flag(
    fd: RawFd,
    get: libc::c_int,
    set: libc::c_int,
    flag: libc::c_int,
) -> Result<(), RunError> {
    // SAFETY: fcntl on a descriptor we own, reading then setting flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, get);
        flags != -1 && libc::fcntl(fd, set, flags | flag) != -1
    };
    if ok {
        Ok(())
    } else {
        Err(RunError::Setup(format!(
            "pseudo-terminal flags: {}",
            io::Error::last_os_error()
        )))
    }
}

/// TIOCSWINSZ on the pty.
fn set_size(master: BorrowedFd<'_>, size: TermSize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which lives for the call.
    let result = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ as _, &winsize) };
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The two copies between the caller's terminal and the pty.
struct Relay {
    /// For resizing.
    master: OwnedFd,
    /// Dropped to tell both threads to stop.
    stop: Option<UnixStream>,
    /// Disconnected when the output copy has ended.
    output_done: mpsc::Receiver<()>,
}

impl Relay {
    fn start(master: OwnedFd, caller_in: OwnedFd, caller_out: OwnedFd) -> Result<Relay, RunError> {
        let (stop, stopped) = UnixStream::pair().map_err(setup("a stop socket"))?;
        let stopped_too = stopped.try_clone().map_err(setup("a stop socket"))?;
        let master_in = master.try_clone().map_err(setup("the pty"))?;
        let master_out = master.try_clone().map_err(setup("the pty"))?;
        let (done_tx, output_done) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("epm-run-input".into())
            .spawn(move || copy_input(&caller_in, &master_in, &stopped))
            .map_err(setup("a relay thread"))?;
        std::thread::Builder::new()
            .name("epm-run-output".into())
            .spawn(move || {
                copy_output(&master_out, &caller_out, &stopped_too);
                drop(done_tx);
            })
            .map_err(setup("a relay thread"))?;
        Ok(Relay {
            master,
            stop: Some(stop),
            output_done,
        })
    }

    /// After the command ended: lets the output copy finish (it ends by
    /// itself once every process holding the pty has closed it), then
    /// stops both copies.
    fn finish(mut self) {
        let lingered = self.output_done.recv_timeout(OUTPUT_LINGER);
        drop(self.stop.take());
        if matches!(lingered, Err(mpsc::RecvTimeoutError::Timeout))
            && self.output_done.recv_timeout(OUTPUT_DRAIN).is_err()
        {
            tracing::debug!("run: the caller's output does not drain; leaving its relay");
        }
    }
}

/// Whether `fd` is readable (or hung up), or `stop` says to stop, waiting
/// at most `timeout`. `None`: stop.
fn wait_readable(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    stop: &UnixStream,
    timeout: PollTimeout,
) -> Option<bool> {
    loop {
        let mut fds = [
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(fd, events),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) => {
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    return None;
                }
                return Some(fds[1].revents().is_some_and(|r| !r.is_empty()));
            }
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
}

/// Caller's terminal → pty.
fn copy_input(from: &OwnedFd, to: &OwnedFd, stop: &UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match wait_readable(from.as_fd(), PollFlags::POLLIN, stop, PollTimeout::NONE) {
            None => return,
            Some(false) => continue,
            Some(true) => {}
        }
        let n = match nix::unistd::read(from.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(_) => return,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match nix::unistd::write(to, rest) {
                Ok(written) => rest = &rest[written..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    if wait_readable(to.as_fd(), PollFlags::POLLOUT, stop, PollTimeout::NONE)
                        .is_none()
                    {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// Pty → caller's stdout, until the pty ends (EIO once no process holds
/// it) or, after a stop, until nothing more is waiting.
fn copy_output(from: &OwnedFd, to: &OwnedFd, stop: &UnixStream) {
    let mut buf = [0u8; 4096];
    let mut stopping = false;
    loop {
        if !stopping {
            match wait_readable(from.as_fd(), PollFlags::POLLIN, stop, PollTimeout::NONE) {
                None => stopping = true,
                Some(false) => continue,
                Some(true) => {}
            }
        }
        let n = match nix::unistd::read(from.as_raw_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            // Nothing waiting: after a stop, done.
            Err(Errno::EAGAIN) if stopping => return,
            Err(Errno::EAGAIN) => continue,
            // EIO: no process holds the pty any more.
            Err(_) => return,
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match nix::unistd::write(to, rest) {
                Ok(written) => rest = &rest[written..],
                Err(Errno::EINTR) => {}
                // The caller's stdout is non-blocking and full.
                Err(Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
