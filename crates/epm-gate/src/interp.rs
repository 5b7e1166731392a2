//! Telling a dynamic program's interpreter load from an exec (Linux).
//!
//! The kernel opens the ELF interpreter a program names (`PT_INTERP`, such
//! as `/lib64/ld-linux-x86-64.so.2`) in the same `execve`, with a second
//! `FAN_OPEN_EXEC_PERM` event from the same process. Both are decided by
//! the policy, but the second is not another exec: audited, it would double
//! every record of a dynamic program. [`InterpreterLoads`] pairs them: after
//! a program that names an interpreter, the next event of that process for
//! that file (by device and inode, since the named path is usually a
//! symlink) is its interpreter loading. Anything else, including running
//! the loader directly (`ld.so PROGRAM`), stays an exec.
//!
//! A pairing must never outlive the exec it belongs to, or a later direct
//! run of the loader by the same process would pass for an interpreter
//! load and go unrecorded. So it is armed only when the program is
//! allowed (a refused exec never loads its interpreter), only for a
//! program the kernel will go on to load (the checks `load_elf_binary`
//! makes before it opens the interpreter: this machine's architecture and
//! word size, an executable or shared object, sane program headers, a
//! NUL-terminated interpreter name), and it expires at the process's next
//! event for any other file and [`PAIRING_TTL`] after the answer.
//!
//! Portable and pure (the file system is asked through a closure), so it is
//! tested on every platform.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Processes remembered between a program's event and its interpreter's;
/// a program whose exec failed never sends the second, so the map starts
/// over when full.
const CAPACITY: usize = 4096;
/// How long an interpreter path's device and inode are trusted before they
/// are looked up again (a libc upgrade replaces the loader).
const RESOLVE_TTL: Duration = Duration::from_secs(60);
/// How much of a program is read for its `PT_INTERP`: the program headers
/// and the interpreter's name come right after the ELF header.
pub const HEAD_BYTES: usize = 2048;
/// How long after a program is allowed its interpreter's event may come:
/// the kernel opens the interpreter right after the answer, in the same
/// system call. Past this, the load is recorded as an exec of its own.
pub const PAIRING_TTL: Duration = Duration::from_secs(1);

/// `e_machine` of programs this machine runs natively.
#[cfg(target_arch = "x86_64")]
const NATIVE_MACHINE: Option<u16> = Some(62); // EM_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_MACHINE: Option<u16> = Some(183); // EM_AARCH64
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE_MACHINE: Option<u16> = None;
/// The kernel's `PATH_MAX`: a longer `PT_INTERP` fails the exec.
const PATH_MAX: u64 = 4096;

/// The program interpreter an ELF executable names, from its first bytes:
/// `None` for anything else (a static program, a script, a header cut short
/// or made up). Never panics, whatever the bytes.
pub fn interpreter(head: &[u8]) -> Option<&str> {
    interpreter_with(head, false)
}

/// The interpreter the kernel will open for this program, when it execs
/// here: [`interpreter`] with the checks `load_elf_binary` makes first, so
/// a program that fails its exec before that open never arms a pairing.
pub fn loaded_interpreter(head: &[u8]) -> Option<&str> {
    interpreter_with(head, true)
}

fn interpreter_with(head: &[u8], as_kernel: bool) -> Option<&str> {
    if head.get(..4)? != b"\x7fELF" {
        return None;
    }
    let wide = match head.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let big = match head.get(5)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let uint = |at: usize, len: usize| -> Option<u64> {
        let bytes = head.get(at..at.checked_add(len)?)?;
        let mut value = 0u64;
        for i in 0..len {
            let byte = u64::from(bytes[if big { i } else { len - 1 - i }]);
            value = (value << 8) | byte;
        }
        Some(value)
    };
    let (phoff, phentsize, phnum) = if wide {
        (uint(0x20, 8)?, uint(0x36, 2)?, uint(0x38, 2)?)
    } else {
        (uint(0x1C, 4)?, uint(0x2A, 2)?, uint(0x2C, 2)?)
    };
    if as_kernel {
        const ET_EXEC: u64 = 2;
        const ET_DYN: u64 = 3;
        let native = cfg!(target_pointer_width = "64") == wide
            && cfg!(target_endian = "big") == big
            && NATIVE_MACHINE.is_some_and(|m| uint(0x12, 2) == Some(u64::from(m)));
        let phdr_size = if wide { 56 } else { 32 };
        let e_type = uint(0x10, 2)?;
        if !native
            || !(e_type == ET_EXEC || e_type == ET_DYN)
            || phentsize != phdr_size
            || phnum == 0
            || phnum * phdr_size > 4096
        {
            return None;
        }
    }
    for index in 0..phnum {
        let at = usize::try_from(phoff.checked_add(index.checked_mul(phentsize)?)?).ok()?;
        const PT_INTERP: u64 = 3;
        if uint(at, 4)? != PT_INTERP {
            continue;
        }
        let (offset, size) = if wide {
            (uint(at + 0x08, 8)?, uint(at + 0x20, 8)?)
        } else {
            (uint(at + 0x04, 4)?, uint(at + 0x10, 4)?)
        };
        if as_kernel && !(2..=PATH_MAX).contains(&size) {
            return None;
        }
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        let text = head.get(start..end)?;
        if as_kernel && text.last() != Some(&0) {
            return None;
        }
        let text = text.split(|&b| b == 0).next()?;
        return std::str::from_utf8(text)
            .ok()
            .filter(|path| path.starts_with('/'));
    }
    None
}

/// Whether an ELF file looks like a dynamic loader: a shared object
/// (`ET_DYN`) that names no interpreter itself. A program that names
/// another program as its interpreter (any file can be named) runs that
/// program's code, which is worth a record of its own.
pub fn is_loader(head: &[u8]) -> bool {
    const ET_DYN: u16 = 3;
    if head.get(..4) != Some(b"\x7fELF".as_slice()) || interpreter(head).is_some() {
        return false;
    }
    let Some(&[a, b]) = head.get(0x10..0x12) else {
        return false;
    };
    let e_type = match head.get(5) {
        Some(2) => u16::from_be_bytes([a, b]),
        _ => u16::from_le_bytes([a, b]),
    };
    e_type == ET_DYN
}

/// A file by device and inode.
pub type FileKey = (u64, u64);

/// What one event is, for [`InterpreterLoads`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pairing {
    /// The interpreter load of this program (its path).
    LoadOf(String),
    /// A program that names an interpreter: its load is expected once the
    /// program is allowed ([`InterpreterLoads::answered`] with this number).
    Expecting(u64),
    /// Neither.
    None,
}

/// An interpreter a process is about to load.
#[derive(Debug)]
struct Expected {
    /// Which event of the process named it.
    event: u64,
    interpreter: FileKey,
    program: String,
    /// When the program was allowed; `None` until then.
    armed: Option<Instant>,
}

/// Pairs programs with their interpreter's load; see the module docs.
#[derive(Debug, Default)]
pub struct InterpreterLoads {
    /// pid → the interpreter it is about to load.
    pending: HashMap<u32, Expected>,
    /// Interpreter path → its file, and when that was looked up.
    resolved: HashMap<String, (Option<FileKey>, Instant)>,
    /// Numbers the expecting events.
    events: u64,
}

impl InterpreterLoads {
    /// One exec event of `pid` for `file` at `path`. When it is the
    /// interpreter load of that process's last program, allowed less than
    /// [`PAIRING_TTL`] ago, says so. Otherwise, when the file's first
    /// bytes (`read_head` fills a buffer of [`HEAD_BYTES`] and says how
    /// many it read) name an interpreter the kernel will load, remembers it
    /// for the process's next event; `resolve` gives that path's file
    /// (following symlinks), asked at most once a minute per path.
    pub fn event(
        &mut self,
        pid: u32,
        file: FileKey,
        path: &str,
        read_head: impl FnOnce(&mut [u8]) -> Option<usize>,
        resolve: impl FnOnce(&str) -> Option<FileKey>,
    ) -> Pairing {
        let interpreter = || {
            let mut head = [0u8; HEAD_BYTES];
            let read = read_head(&mut head)?;
            loaded_interpreter(head.get(..read)?).map(str::to_owned)
        };
        self.event_named(pid, file, path, interpreter, resolve)
    }

    /// [`InterpreterLoads::event`] with the interpreter the file names
    /// ([`loaded_interpreter`] of its head) told by `interpreter`, which is
    /// asked only when the event is not a load: a gate that remembers heads
    /// reads none for a load.
    pub fn event_named(
        &mut self,
        pid: u32,
        file: FileKey,
        path: &str,
        interpreter: impl FnOnce() -> Option<String>,
        resolve: impl FnOnce(&str) -> Option<FileKey>,
    ) -> Pairing {
        if let Some(program) = self.load_of(pid, file) {
            return Pairing::LoadOf(program);
        }
        let expecting = interpreter()
            .and_then(|interp| self.resolve(&interp, resolve))
            .map(|key| self.expect_key(pid, key, path, None));
        expecting.map_or(Pairing::None, Pairing::Expecting)
    }

    /// The file an interpreter path names now (`resolve` is asked at most
    /// once a minute per path).
    pub fn resolve(
        &mut self,
        interp: &str,
        resolve: impl FnOnce(&str) -> Option<FileKey>,
    ) -> Option<FileKey> {
        let now = Instant::now();
        match self.resolved.get(interp) {
            Some((key, at)) if now.duration_since(*at) < RESOLVE_TTL => *key,
            _ => {
                let key = resolve(interp);
                if self.resolved.len() >= 64 {
                    self.resolved.clear();
                }
                self.resolved.insert(interp.to_owned(), (key, now));
                key
            }
        }
    }

    /// Whether this event of `pid` for `file` is the interpreter load of
    /// that process's last program, allowed less than [`PAIRING_TTL`] ago:
    /// that program's path. What `pid` expected is used up either way (see
    /// [`Self::event_named`]), so a pairing serves one event at most.
    pub fn load_of(&mut self, pid: u32, file: FileKey) -> Option<String> {
        let expected = self.pending.remove(&pid)?;
        (expected.interpreter == file
            && expected.armed.is_some_and(|at| at.elapsed() < PAIRING_TTL))
        .then_some(expected.program)
    }

    /// An exec of `pid` for `file` at `path` that already ran, answered by
    /// the kernel from its cache of allows ([`super::kernel_cache`]), whose
    /// interpreter (when it names one) is already known: the interpreter
    /// load of the process's last program, or a program whose interpreter's
    /// load may come now (armed at once: it was allowed).
    pub fn ran(
        &mut self,
        pid: u32,
        file: FileKey,
        path: &str,
        interpreter: Option<FileKey>,
    ) -> Pairing {
        if let Some(program) = self.load_of(pid, file) {
            return Pairing::LoadOf(program);
        }
        match interpreter {
            Some(key) => Pairing::Expecting(self.expect_key(pid, key, path, Some(Instant::now()))),
            None => Pairing::None,
        }
    }

    fn expect_key(&mut self, pid: u32, key: FileKey, path: &str, armed: Option<Instant>) -> u64 {
        if self.pending.len() >= CAPACITY {
            self.pending.clear();
        }
        self.events += 1;
        self.pending.insert(
            pid,
            Expected {
                event: self.events,
                interpreter: key,
                program: path.to_owned(),
                armed,
            },
        );
        self.events
    }

    /// The program of event `event` ([`Pairing::Expecting`]) of `pid` was
    /// answered: allowed, its interpreter's load may come now; refused, it
    /// never will. Called before the answer reaches the kernel. Nothing
    /// happens when the process has had another event since.
    pub fn answered(&mut self, pid: u32, event: u64, allowed: bool) {
        if self.pending.get(&pid).is_none_or(|e| e.event != event) {
            return;
        }
        if allowed {
            if let Some(expected) = self.pending.get_mut(&pid) {
                expected.armed = Some(Instant::now());
            }
        } else {
            self.pending.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian ELF64 header with one PT_INTERP program header.
    fn elf64(interp: &[u8]) -> Vec<u8> {
        let mut head = vec![0u8; 0x200];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2; // 64-bit
        head[5] = 1; // little-endian
        head[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        head[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        head[0x38..0x3A].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        // Program header 0: PT_LOAD; 1: PT_INTERP at 0x100.
        head[64..68].copy_from_slice(&1u32.to_le_bytes());
        let ph = 64 + 56;
        head[ph..ph + 4].copy_from_slice(&3u32.to_le_bytes());
        head[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        head[ph + 0x20..ph + 0x28].copy_from_slice(&(interp.len() as u64).to_le_bytes());
        head[0x100..0x100 + interp.len()].copy_from_slice(interp);
        head
    }

    /// What a read of `file`'s first bytes into `buf` gives.
    fn fill(buf: &mut [u8], file: &[u8]) -> Option<usize> {
        let n = buf.len().min(file.len());
        buf[..n].copy_from_slice(&file[..n]);
        Some(n)
    }

    #[test]
    fn the_interpreter_of_a_dynamic_program_is_read() {
        assert_eq!(
            interpreter(&elf64(b"/lib64/ld-linux-x86-64.so.2\0")),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        // This machine's own programs.
        let true_head = std::fs::read("/bin/true").unwrap();
        let named = interpreter(&true_head[..true_head.len().min(HEAD_BYTES)]);
        assert!(named.is_some_and(|p| p.starts_with('/')), "{named:?}");
    }

    #[test]
    fn anything_else_names_no_interpreter_and_never_panics() {
        assert_eq!(interpreter(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(interpreter(b""), None);
        assert_eq!(interpreter(b"\x7fELF"), None);
        let mut cut = elf64(b"/lib/ld.so\0");
        cut.truncate(0x105);
        assert_eq!(
            interpreter(&cut),
            None,
            "the string runs past what was read"
        );
        let mut relative = elf64(b"ld.so\0");
        assert_eq!(interpreter(&relative), None);
        relative[0x38] = 0xFF; // many program headers past the end
        assert_eq!(interpreter(&relative), None);
        let mut huge = elf64(b"/lib/ld.so\0");
        huge[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(interpreter(&huge), None);
        // Every truncation of a valid header is safe.
        let whole = elf64(b"/lib/ld.so\0");
        for len in 0..whole.len() {
            let _ = interpreter(&whole[..len]);
        }
    }

    #[test]
    fn only_a_shared_object_naming_no_interpreter_is_a_loader() {
        let mut loader = elf64(b"/x\0");
        // No PT_INTERP: the second program header becomes PT_NULL.
        loader[64 + 56..64 + 60].copy_from_slice(&0u32.to_le_bytes());
        loader[0x10] = 3; // ET_DYN
        assert!(is_loader(&loader));
        loader[0x10] = 2; // ET_EXEC
        assert!(!is_loader(&loader));
        let mut pie = elf64(b"/lib64/ld.so\0");
        pie[0x10] = 3;
        assert!(!is_loader(&pie), "a PIE program names its loader");
        assert!(!is_loader(b"#!/bin/sh\n"));
        assert!(!is_loader(b"\x7fELF"));
        // This machine's loader is one, its programs are not.
        let true_head = std::fs::read("/bin/true").unwrap();
        let head = &true_head[..true_head.len().min(HEAD_BYTES)];
        assert!(!is_loader(head));
        let ld = std::fs::read(interpreter(head).unwrap()).unwrap();
        assert!(is_loader(&ld[..ld.len().min(HEAD_BYTES)]));
    }

    /// This machine's kind of ELF header, naming `interp`.
    fn native(interp: &[u8]) -> Vec<u8> {
        let mut head = elf64(interp);
        head[0x10] = 3; // ET_DYN
        head[0x12..0x14].copy_from_slice(&NATIVE_MACHINE.unwrap_or(62).to_le_bytes());
        head
    }

    #[test]
    fn a_programs_next_event_for_its_interpreter_is_its_load_once_allowed() {
        let mut loads = InterpreterLoads::default();
        let ld: FileKey = (1, 42);
        let resolve = |path: &str| (path == "/lib64/ld.so").then_some(ld);
        let program = |buf: &mut [u8]| fill(buf, &native(b"/lib64/ld.so\0"));
        let none = |_: &mut [u8]| None;
        let Pairing::Expecting(ls) = loads.event(7, (1, 5), "/usr/bin/ls", program, resolve) else {
            panic!("a dynamic program expects its interpreter");
        };
        loads.answered(7, ls, true);
        assert_eq!(
            loads.event(7, ld, "/usr/lib/ld.so", none, resolve),
            Pairing::LoadOf("/usr/bin/ls".to_owned())
        );
        // Running the loader directly is an exec.
        assert_eq!(
            loads.event(7, ld, "/usr/lib/ld.so", none, resolve),
            Pairing::None
        );
        // Another process's event for the loader is not this one's load.
        let Pairing::Expecting(cat) = loads.event(8, (1, 6), "/usr/bin/cat", program, resolve)
        else {
            panic!();
        };
        loads.answered(8, cat, true);
        assert_eq!(
            loads.event(9, ld, "/usr/lib/ld.so", none, resolve),
            Pairing::None
        );
        // A program whose exec failed: its process's next exec is an exec.
        assert_eq!(
            loads.event(8, (1, 7), "/usr/bin/id", none, resolve),
            Pairing::None
        );
        assert_eq!(
            loads.event(8, ld, "/usr/lib/ld.so", none, resolve),
            Pairing::None
        );
    }

    #[test]
    fn a_refused_or_unanswered_program_leaves_no_pairing_behind() {
        let mut loads = InterpreterLoads::default();
        let ld: FileKey = (1, 42);
        let resolve = |_: &str| Some(ld);
        let program = |buf: &mut [u8]| fill(buf, &native(b"/lib64/ld.so\0"));
        let none = |_: &mut [u8]| None;
        // Refused: its interpreter is never loaded, so the process's next
        // run of the loader is an exec of its own.
        let Pairing::Expecting(first) = loads.event(7, (1, 5), "/tmp/nc", program, resolve) else {
            panic!();
        };
        loads.answered(7, first, false);
        assert_eq!(
            loads.event(7, ld, "/lib/ld.so", none, resolve),
            Pairing::None
        );
        // Not answered yet (impossible for the kernel's own load, which
        // waits for the answer): no pairing either.
        loads.event(7, (1, 5), "/tmp/nc", program, resolve);
        assert_eq!(
            loads.event(7, ld, "/lib/ld.so", none, resolve),
            Pairing::None
        );
        // Allowed too long ago: the load is recorded as an exec.
        let Pairing::Expecting(old) = loads.event(7, (1, 5), "/tmp/nc", program, resolve) else {
            panic!();
        };
        loads.answered(7, old, true);
        loads.pending.get_mut(&7).unwrap().armed = Some(Instant::now() - PAIRING_TTL);
        assert_eq!(
            loads.event(7, ld, "/lib/ld.so", none, resolve),
            Pairing::None
        );
        // An answer for an older event of the process arms nothing.
        let Pairing::Expecting(older) = loads.event(7, (1, 5), "/tmp/a", program, resolve) else {
            panic!();
        };
        let Pairing::Expecting(_newer) = loads.event(7, (1, 6), "/tmp/b", program, resolve) else {
            panic!();
        };
        loads.answered(7, older, true);
        assert_eq!(
            loads.event(7, ld, "/lib/ld.so", none, resolve),
            Pairing::None
        );
    }

    #[test]
    fn a_program_the_kernel_would_not_load_expects_no_interpreter() {
        let resolve = |_: &str| Some((1, 42));
        let mut loads = InterpreterLoads::default();
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut foreign = native(b"/lib64/ld.so\0");
        foreign[0x12] = 40; // EM_ARM
        cases.push(("another architecture", foreign));
        let mut unterminated = native(b"/lib64/ld.so");
        unterminated[0x100 + 12] = b'x';
        cases.push(("a name without its NUL", unterminated));
        let mut core = native(b"/lib64/ld.so\0");
        core[0x10] = 4; // ET_CORE
        cases.push(("not a program", core));
        let mut phentsize = native(b"/lib64/ld.so\0");
        phentsize[0x36] = 57;
        cases.push(("odd program headers", phentsize));
        let mut short = native(b"/\0");
        short[64 + 56 + 0x20..64 + 56 + 0x28].copy_from_slice(&1u64.to_le_bytes());
        cases.push(("a one-byte name", short));
        for (what, head) in cases {
            assert_eq!(loaded_interpreter(&head), None, "{what}");
            assert_eq!(
                loads.event(
                    7,
                    (1, 5),
                    "/tmp/x",
                    |buf: &mut [u8]| fill(buf, &head),
                    resolve
                ),
                Pairing::None,
                "{what}"
            );
        }
        // This machine's own programs are loaded.
        let true_head = std::fs::read("/bin/true").unwrap();
        assert!(loaded_interpreter(&true_head[..true_head.len().min(HEAD_BYTES)]).is_some());
    }

    #[test]
    fn an_interpreter_path_is_looked_up_once_a_minute() {
        let mut loads = InterpreterLoads::default();
        let mut lookups = 0;
        for pid in 0..10 {
            loads.event(
                pid,
                (1, u64::from(pid)),
                "/p",
                |buf: &mut [u8]| fill(buf, &native(b"/lib/ld.so\0")),
                |_| {
                    lookups += 1;
                    Some((1, 99))
                },
            );
        }
        assert_eq!(lookups, 1);
    }
}
