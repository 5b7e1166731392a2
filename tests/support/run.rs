//! Helpers for `epmctl run` end to end.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{Daemon, TestUser, binary};

/// Runs `epmctl --socket <daemon's> ARGS` as `user`, with `input` on its
/// stdin and its output captured (pipes, no terminal), within 30 s.
pub fn epmctl_run(daemon: &Daemon, user: &TestUser, args: &[&str], input: &[u8]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(binary("epmctl"))
        .arg("--socket")
        .arg(daemon.socket())
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "epmctl {args:?} did not finish within 30 s:\n{}",
                daemon.log()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    writer.join().unwrap();
    child.wait_with_output().unwrap()
}

/// stdout, lossily.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr, lossily.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
