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

/// The program interpreter an ELF executable names, from its first bytes:
/// `None` for anything else (a static program, a script, a header cut short
/// or made up). Never panics, whatever the bytes.
pub fn interpreter(head: &[u8]) -> Option<&str> {
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
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        let text = head.get(start..end)?;
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

/// Pairs programs with their interpreter's load; see the module docs.
#[derive(Debug, Default)]
pub struct InterpreterLoads {
    /// pid → the interpreter it is about to load, and the program's path.
    pending: HashMap<u32, (FileKey, String)>,
    /// Interpreter path → its file, and when that was looked up.
    resolved: HashMap<String, (Option<FileKey>, Instant)>,
}

impl InterpreterLoads {
    /// One exec event of `pid` for `file` at `path`. When it is the
    /// interpreter load of that process's last program, returns that
    /// program's path. Otherwise, when the file's first bytes (`read_head`
    /// fills a buffer of [`HEAD_BYTES`] and says how many it read) name an
    /// interpreter, remembers it for the process's next event;
    /// `resolve` gives that path's file (following symlinks), asked at most
    /// once a minute per path.
    pub fn event(
        &mut self,
        pid: u32,
        file: FileKey,
        path: &str,
        read_head: impl FnOnce(&mut [u8]) -> Option<usize>,
        resolve: impl FnOnce(&str) -> Option<FileKey>,
    ) -> Option<String> {
        if let Some((interp, program)) = self.pending.remove(&pid)
            && interp == file
        {
            return Some(program);
        }
        let mut head = [0u8; HEAD_BYTES];
        let read = read_head(&mut head)?;
        let interp = interpreter(head.get(..read)?)?;
        let now = Instant::now();
        let key = match self.resolved.get(interp) {
            Some((key, at)) if now.duration_since(*at) < RESOLVE_TTL => *key,
            _ => {
                let key = resolve(interp);
                if self.resolved.len() >= 64 {
                    self.resolved.clear();
                }
                self.resolved.insert(interp.to_owned(), (key, now));
                key
            }
        }?;
        if self.pending.len() >= CAPACITY {
            self.pending.clear();
        }
        self.pending.insert(pid, (key, path.to_owned()));
        None
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

    #[test]
    fn a_programs_next_event_for_its_interpreter_is_its_load() {
        let mut loads = InterpreterLoads::default();
        let ld: FileKey = (1, 42);
        let resolve = |path: &str| (path == "/lib64/ld.so").then_some(ld);
        let program = |buf: &mut [u8]| fill(buf, &elf64(b"/lib64/ld.so\0"));
        assert_eq!(
            loads.event(7, (1, 5), "/usr/bin/ls", program, resolve),
            None
        );
        assert_eq!(
            loads.event(7, ld, "/usr/lib/ld.so", |_: &mut [u8]| None, resolve),
            Some("/usr/bin/ls".to_owned())
        );
        // Running the loader directly is an exec.
        assert_eq!(
            loads.event(7, ld, "/usr/lib/ld.so", |_: &mut [u8]| None, resolve),
            None
        );
        // Another process's event for the loader is not this one's load.
        assert_eq!(
            loads.event(8, (1, 6), "/usr/bin/cat", program, resolve),
            None
        );
        assert_eq!(
            loads.event(9, ld, "/usr/lib/ld.so", |_: &mut [u8]| None, resolve),
            None
        );
        // A program whose exec failed: its process's next exec is an exec.
        assert_eq!(
            loads.event(8, (1, 7), "/usr/bin/id", |_: &mut [u8]| None, resolve),
            None
        );
        assert_eq!(
            loads.event(8, ld, "/usr/lib/ld.so", |_: &mut [u8]| None, resolve),
            None
        );
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
                |buf: &mut [u8]| fill(buf, &elf64(b"/lib/ld.so\0")),
                |_| {
                    lookups += 1;
                    Some((1, 99))
                },
            );
        }
        assert_eq!(lookups, 1);
    }
}
