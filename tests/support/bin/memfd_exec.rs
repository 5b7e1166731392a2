//! `epm-e2e-memfd-exec`: runs a program from a memfd, as an attacker who
//! wants no file on disk would, as whatever user runs it.
//!
//! `epm-e2e-memfd-exec PROGRAM (path|fexecve) (sealed|writable)`: copies
//! PROGRAM into a new memfd, optionally seals it against writes (and
//! closes nothing else), then execs it through `/proc/self/fd/N` or with
//! `fexecve`. Exits 126 with the exec's errno on stderr when the exec fails.
#![allow(clippy::unwrap_used)]

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("memfds are Linux's");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
fn main() {
    use std::ffi::CString;
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let args: Vec<String> = std::env::args().collect();
    let (program, how, seal) = (&args[1], args[2].as_str(), args[3].as_str());
    let bytes = std::fs::read(program).unwrap();
    let name = c"epm-e2e";
    // SAFETY: memfd_create with a valid name; the descriptor is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor we own.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(memfd.try_clone().unwrap())
        .write_all(&bytes)
        .unwrap();
    if seal == "sealed" {
        let seals =
            libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on our descriptor.
        let rc = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    let argv0 = CString::new("memfd-program").unwrap();
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    match how {
        "path" => {
            let path = CString::new(format!("/proc/self/fd/{}", memfd.as_raw_fd())).unwrap();
            // SAFETY: NUL-terminated argv and envp arrays of valid strings.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        _ => {
            // SAFETY: as above, on our descriptor.
            unsafe { libc::fexecve(memfd.as_raw_fd(), argv.as_ptr(), envp.as_ptr()) };
        }
    }
    eprintln!("exec failed: {}", std::io::Error::last_os_error());
    std::process::exit(126);
}
