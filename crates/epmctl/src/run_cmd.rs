//! `epmctl run -- CMD [ARGS…]`: run one command with privileges, as the
//! policy's elevation rules allow. `epmd` starts it on this process's own
//! stdin, stdout and stderr (passed to the daemon with the request); this side answers the
//! rule (a justification, an approval request), then forwards signals and
//! terminal size changes until the command ends, and exits with its status.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use epm_ipc::{
    Client, ClientError, Command, Endpoint, ErrorCode, ExitStatus, Request, Response, TermSize,
};
use epm_prompt::display::shown_line;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{self, SetArg, Termios};

use crate::verdicts::Answers;

/// Signals forwarded to the command, by the names the daemon takes.
const FORWARDED: &[(libc::c_int, &str)] = &[
    (libc::SIGINT, "INT"),
    (libc::SIGTERM, "TERM"),
    (libc::SIGHUP, "HUP"),
    (libc::SIGQUIT, "QUIT"),
];

/// What `epmctl run` was asked to do.
#[derive(Debug)]
pub(crate) struct RunOptions {
    pub(crate) command: Vec<String>,
    pub(crate) reason: Option<String>,
    pub(crate) user: Option<String>,
    pub(crate) from: String,
    pub(crate) until: String,
}

/// `epmctl run [--reason TEXT] [--user NAME] -- CMD [ARGS…]`
pub(crate) fn run(endpoint: &Endpoint, options: RunOptions) -> anyhow::Result<ExitCode> {
    let Some((name, _)) = options.command.split_first() else {
        anyhow::bail!("name the command to run: epmctl run -- CMD [ARGS…]");
    };
    let Some(program) = resolve(name, std::env::var_os("PATH").as_deref()) else {
        eprintln!("epmctl: command not found: {}", shown_line(name));
        return Ok(ExitCode::from(1));
    };
    let program = program
        .into_os_string()
        .into_string()
        .map_err(|p| anyhow::anyhow!("the path {} is not UTF-8", PathBuf::from(p).display()))?;
    let cwd = std::env::current_dir()
        .context("the current directory")?
        .into_os_string()
        .into_string()
        .map_err(|_| anyhow::anyhow!("the current directory's path is not UTF-8"))?;
    let on_terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let tty = if on_terminal {
        terminal_size(std::io::stdin().as_fd())
    } else {
        None
    };
    let command = Command {
        program: program.clone(),
        argv: options.command.clone(),
        run_as: options.user.clone().unwrap_or_else(|| "root".into()),
    };
    let mut client = Client::connect(endpoint, concat!("epmctl ", env!("CARGO_PKG_VERSION")))?;
    let mut answers = Answers::new(
        options.reason.clone(),
        options.from.clone(),
        options.until.clone(),
    );
    loop {
        let request = Request::Run {
            command: command.clone(),
            cwd: cwd.clone(),
            env: passed_env(),
            reason: answers.reason(),
            window: answers.window(),
            tty,
        };
        let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
        let stdio = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
        client.send_with_fds(&request, &stdio)?;
        let verdict = match client.recv() {
            Ok(Response::Started { .. }) => return attached(client, tty.is_some()),
            Ok(Response::Elevation(verdict)) => verdict,
            Ok(other) => anyhow::bail!(
                "epmd sent an unexpected answer to run: {}",
                epm_ipc::Message::type_name(&other)
            ),
            Err(ClientError::Daemon { code, message }) if code != ErrorCode::Unsupported => {
                eprintln!("epmctl: {}", shown_line(&message));
                return Ok(ExitCode::from(1));
            }
            Err(error) => return Err(error.into()),
        };
        if let Some(code) = answers.answer(&verdict, &program)? {
            return Ok(code);
        }
    }
}

/// `name` as the shell would find it: a path as it is (made absolute), a
/// bare name through `path`'s absolute directories (relative ones, such as
/// `.`, are skipped, as sudo does), to an executable regular file.
pub(crate) fn resolve(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    if name.is_empty() {
        return None;
    }
    if name.contains('/') {
        let path = std::path::absolute(name).ok()?;
        return path.is_file().then_some(path);
    }
    std::env::split_paths(path?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The variables the daemon may pass on (it checks them again); nothing
/// else of this environment leaves the process.
fn passed_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(name, value)| epm_policy::env::keeps_variable(name, value))
        .collect()
}

/// The terminal's size (TIOCGWINSZ).
fn terminal_size(fd: BorrowedFd<'_>) -> Option<TermSize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize`, which lives for the call.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ as _, &mut size) };
    (result == 0).then_some(TermSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// Puts the terminal in raw mode (keys go to the command's pty as they
/// are) and back as it was when dropped: on return, on error, on panic.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// The command runs: forward signals and size changes until it exits.
fn attached(mut client: Client, on_pty: bool) -> anyhow::Result<ExitCode> {
    client.wait_forever();
    let (wake_read, wake_write) = UnixStream::pair().context("a signal socket")?;
    wake_read.set_nonblocking(true).context("a signal socket")?;
    wake_write
        .set_nonblocking(true)
        .context("a signal socket")?;
    let mut flags = Vec::new();
    let mut watched: Vec<(libc::c_int, &str)> = FORWARDED.to_vec();
    if on_pty {
        watched.push((libc::SIGWINCH, "WINCH"));
    }
    for &(signal, name) in &watched {
        let flag = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal, flag.clone())
            .with_context(|| format!("catching SIG{name}"))?;
        signal_hook::low_level::pipe::register(signal, wake_write.try_clone()?)
            .with_context(|| format!("catching SIG{name}"))?;
        flags.push((signal, name, flag));
    }
    let raw = if on_pty {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let status = serve(&mut client, &wake_read, &flags);
    drop(raw);
    let status = status?;
    std::io::stdout().flush().ok();
    let code = status.shell_code();
    Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)))
}

/// Waits for `Exited`, sending `Signal`/`Resize` for caught signals.
fn serve(
    client: &mut Client,
    wake: &UnixStream,
    flags: &[(libc::c_int, &str, Arc<AtomicBool>)],
) -> anyhow::Result<ExitStatus> {
    loop {
        let (signalled, answered) = {
            let mut fds = [
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                PollFd::new(client.readiness(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(error) => return Err(error.into()),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if signalled {
            let mut sink = [0u8; 64];
            while matches!(std::io::Read::read(&mut &*wake, &mut sink), Ok(n) if n > 0) {}
            for (signal, name, flag) in flags {
                if !flag.swap(false, Ordering::SeqCst) {
                    continue;
                }
                let request = if *signal == libc::SIGWINCH {
                    match terminal_size(std::io::stdin().as_fd()) {
                        Some(size) => Request::Resize(size),
                        None => continue,
                    }
                } else {
                    Request::Signal {
                        signal: (*name).to_owned(),
                    }
                };
                client.send(&request)?;
            }
        }
        if answered {
            match client.recv() {
                Ok(Response::Exited(status)) => return Ok(status),
                Ok(_) => {}
                Err(ClientError::Daemon { message, .. }) => {
                    eprint!("epmctl: {}\r\n", shown_line(&message));
                }
                Err(ClientError::Closed) => {
                    anyhow::bail!("epmd closed the connection before the command ended")
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_resolve_through_absolute_path_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let path = std::env::join_paths([Path::new("relative"), dir.path()]).unwrap();
        assert_eq!(resolve("tool", Some(&path)), Some(tool.clone()));
        assert_eq!(resolve("plain", Some(&path)), None, "not executable");
        assert_eq!(resolve("nothing", Some(&path)), None);
        assert_eq!(resolve("tool", None), None);
        assert_eq!(resolve(tool.to_str().unwrap(), None), Some(tool));
        assert_eq!(resolve("", Some(&path)), None);
    }
}
