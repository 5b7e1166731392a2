//! Helpers for the tests that run the real sudo with the EPM plugin. They
//! change machine-global files (/etc/sudo.conf, /etc/sudoers.d): only the
//! engineer whose task says so runs them, and every change is put back on
//! drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::TestUser;

/// The built plugin, next to the test executables.
pub fn plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [
        deps.join("libepm_sudo.so"),
        deps.parent().unwrap().join("libepm_sudo.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("libepm_sudo.so not built: run `cargo test --workspace` (or `cargo build -p epm-sudo`)")
}

/// Replaces a system file for the test, and puts the original back on drop.
#[derive(Debug)]
pub struct Replaced {
    path: PathBuf,
    original: Option<Vec<u8>>,
}

impl Replaced {
    /// Writes `contents` with `mode` at `path`.
    pub fn write(path: &Path, contents: &str, mode: u32) -> Replaced {
        use std::os::unix::fs::PermissionsExt;
        let original = std::fs::read(path).ok();
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        Replaced {
            path: path.to_owned(),
            original,
        }
    }

    /// `/etc/sudo.conf` with the sudoers plugins and ours, asking `daemon`.
    pub fn sudo_conf(socket: &Path) -> Replaced {
        Replaced::write(
            Path::new("/etc/sudo.conf"),
            &format!(
                "Plugin sudoers_policy sudoers.so\nPlugin sudoers_io sudoers.so\n\
                 Plugin epm_approval {} socket={} fail=deny\n",
                plugin().display(),
                socket.display()
            ),
            0o644,
        )
    }
}

impl Drop for Replaced {
    fn drop(&mut self) {
        match &self.original {
            Some(bytes) => {
                let _ = std::fs::write(&self.path, bytes);
            }
            None => {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// `sudo -n ARGS` as `user`, without a terminal.
pub fn sudo_as(user: &TestUser, args: &[&str]) -> Output {
    Command::new("sudo")
        .arg("-n")
        .args(args)
        .uid(user.uid)
        .gid(user.gid)
        .env_remove("SUDO_ASKPASS")
        .output()
        .unwrap()
}

/// Whether sudo is installed; with `EPM_E2E=1` its absence fails the test.
pub fn sudo_installed() -> bool {
    if Path::new("/usr/bin/sudo").exists() {
        return true;
    }
    assert!(
        std::env::var_os("EPM_E2E").is_none(),
        "sudo is not installed (apt-get install sudo)"
    );
    eprintln!("skipped: sudo is not installed");
    false
}
