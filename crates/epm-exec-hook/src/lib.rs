//! The kernel exec hook: a BPF LSM program that holds every exec epmd's
//! fanotify gate cannot see until epmd has decided it, and its loader.
//!
//! fanotify gates the superblocks and mounts epmd marks. The hook
//! (`src/bpf/exec_hook.bpf.c`, built by clang in `build.rs`, loaded with
//! libbpf through `libbpf-rs`) sees the rest: exec opens of memfds and other
//! kernel-internal files, of files on superblocks epmd has not marked
//! (private mount namespaces, FUSE, mounts made later), of ELF and script
//! interpreters there, and the program a directly run loader
//! (`ld.so PROGRAM`) maps. A BPF program cannot wait for user space, so an
//! exec it has no verdict for is *held*: the process gets SIGSTOP and the
//! call fails with `ERESTARTNOINTR`, which rewinds it; the old image stays
//! and nothing of the new one runs. epmd reads the [`ExecEvent`], decides,
//! stores a verdict for that thread and file version ([`Verdicts::set`]),
//! and continues the process ([`continue_process`]); the call runs again and
//! the hook answers it from the verdict. See docs/kernel-hook.md.
//!
//! Everything here is Linux's; on other targets the crate is empty.

#[cfg(target_os = "linux")]
mod event;
#[cfg(target_os = "linux")]
mod loader;

#[cfg(target_os = "linux")]
pub use event::{EventKind, ExecEvent, FileKey};
#[cfg(target_os = "linux")]
pub use loader::{
    Coverage, ExecHook, HookOptions, LoadError, PreparedHook, Verdicts, continue_process,
    kernel_dev_to_user,
};
