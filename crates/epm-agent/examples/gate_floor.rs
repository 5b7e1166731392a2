//! Where exec overhead comes from, for scripts/bench-exec.sh:
//! `gate_floor raw` answers every FAN_OPEN_EXEC_PERM event on every mount
//! with allow and does nothing else (the floor any fanotify gate pays);
//! `gate_floor gate` runs the real fanotify gate (facts from /proc) with a
//! sink that allows at once, without the decider. Runs until killed.

#[cfg(target_os = "linux")]
fn main() {
    use epm_agent::gate::fanotify::FanotifyGate;
    use epm_agent::gate::{ExecGate, Shutdown, Verdict};

    match std::env::args().nth(1).as_deref() {
        Some("gate") => {
            let mut gate = FanotifyGate::new(vec!["/".into()], Verdict::Allow).expect("gate");
            let shutdown = Shutdown::new().expect("shutdown");
            gate.run(&mut |pending| pending.answer(Verdict::Allow), &shutdown)
                .expect("run");
        }
        _ => raw(),
    }
}

#[cfg(target_os = "linux")]
fn raw() {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscalls on descriptors this function owns.
    unsafe {
        let fd = libc::fanotify_init(
            libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC,
            libc::O_RDONLY as u32,
        );
        assert!(fd >= 0, "fanotify_init");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        for mount in epm_agent::gate::mountinfo::parse(&mounts) {
            if epm_agent::gate::mountinfo::is_watched(&mount, &["/".into()]) {
                let path = std::ffi::CString::new(mount.mount_point.as_os_str().as_encoded_bytes())
                    .expect("path");
                libc::fanotify_mark(
                    fd,
                    libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
                    libc::FAN_OPEN_EXEC_PERM,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                );
            }
        }
        let mut buf = vec![0u8; 65536];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                continue;
            }
            let mut offset = 0usize;
            while offset < n as usize {
                let meta: libc::fanotify_event_metadata =
                    std::ptr::read_unaligned(buf[offset..].as_ptr().cast());
                if meta.fd >= 0 {
                    let response = libc::fanotify_response {
                        fd: meta.fd,
                        response: libc::FAN_ALLOW,
                    };
                    libc::write(
                        fd,
                        (&raw const response).cast(),
                        std::mem::size_of::<libc::fanotify_response>(),
                    );
                    libc::close(meta.fd);
                }
                offset += meta.event_len as usize;
            }
            let _ = fd.as_raw_fd();
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("gate_floor measures the Linux fanotify gate");
}
