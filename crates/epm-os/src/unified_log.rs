//! Audit records to the macOS unified log, so an administrator can follow
//! them with the system's tools:
//!
//! ```text
//! log stream --predicate 'subsystem == "com.epm.epmd" && category == "audit"'
//! ```
//!
//! One entry per record: the record's JSON line, formatted `%{public}s` so
//! the system does not redact it. The JSON Lines file stays the complete,
//! chained record; this is a copy for the system's log tooling (which may
//! shorten very long entries). Elsewhere [`UnifiedLog`] does nothing.
//!
//! `os_log_with_type` is a C macro, so the call it expands to is made by
//! hand, with no C: `_os_log_impl(dso, log, type, format, buffer, size)`,
//! where `buffer` is the argument encoding clang's `os_log` builtins emit
//! for one public C string (`public_string_arg`, tested on Linux), the
//! format string lives in `__TEXT,__oslogstring` like clang's, and `dso` is
//! this image's Mach-O header (`__dso_handle`), against which the unified
//! log resolves the format string.

// The encoding is used only on macOS; it is built everywhere so that it is
// tested on Linux.
#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

/// The subsystem audit records are logged under (the daemon's label).
pub const SUBSYSTEM: &str = "com.epm.epmd";
/// Their category.
pub const CATEGORY: &str = "audit";

/// `os_log` argument encoding: the summary byte's "has non-scalar items".
const SUMMARY_HAS_NON_SCALAR: u8 = 0x02;
/// Descriptor of a C string argument (`kind 2 << 4`) marked public (`0x02`).
const ARG_PUBLIC_STRING: u8 = (2 << 4) | 0x02;

/// The argument buffer for a format of exactly `%{public}s` with a string
/// at `pointer`: summary, argument count, then the argument's descriptor,
/// size and bytes (the pointer, in native byte order).
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArgBuffer(pub(crate) [u8; 2 + 2 + size_of::<usize>()]);

pub(crate) fn public_string_arg(pointer: usize) -> ArgBuffer {
    let mut buffer = [0u8; 2 + 2 + size_of::<usize>()];
    buffer[0] = SUMMARY_HAS_NON_SCALAR;
    buffer[1] = 1;
    buffer[2] = ARG_PUBLIC_STRING;
    buffer[3] = size_of::<usize>() as u8;
    buffer[4..].copy_from_slice(&pointer.to_ne_bytes());
    ArgBuffer(buffer)
}

/// A record line as a C string. JSON escapes control characters, so a NUL
/// never occurs; were one there, it is written as JSON would escape it
/// rather than cutting the entry short.
pub(crate) fn c_line(line: &str) -> std::ffi::CString {
    std::ffi::CString::new(line.replace('\0', "\\u0000")).unwrap_or_default()
}

/// Where audit records are copied for the system's log tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct UnifiedLog {
    _private: (),
}

impl UnifiedLog {
    /// The audit category of the daemon's subsystem.
    pub fn audit() -> UnifiedLog {
        UnifiedLog { _private: () }
    }

    /// Logs one record line (a no-op off macOS).
    pub fn record(&self, line: &str) {
        #[cfg(target_os = "macos")]
        macos::log_public(line);
        #[cfg(not(target_os = "macos"))]
        let _ = line;
    }
}

#[cfg(target_os = "macos")]
mod macos {
    use std::ffi::{CString, c_char, c_void};
    use std::sync::OnceLock;

    use super::{CATEGORY, SUBSYSTEM, c_line, public_string_arg};

    /// `OS_LOG_TYPE_DEFAULT`: kept on disk, like the audit itself.
    const OS_LOG_TYPE_DEFAULT: u8 = 0x00;

    // SAFETY: the declarations match <os/log.h> and <os/trace_base.h>
    // (libsystem_trace, part of libSystem, which every Rust program on macOS
    // links); `__dso_handle` is the image's Mach-O header, which the linker
    // defines for every image.
    unsafe extern "C" {
        fn os_log_create(subsystem: *const c_char, category: *const c_char) -> *mut c_void;
        fn os_log_type_enabled(log: *mut c_void, log_type: u8) -> bool;
        fn _os_log_impl(
            dso: *mut c_void,
            log: *mut c_void,
            log_type: u8,
            format: *const c_char,
            buf: *mut u8,
            size: u32,
        );
        static __dso_handle: u8;
    }

    /// The format, where clang puts `os_log` formats: the unified log reads
    /// it back from the binary's text, never from memory.
    // SAFETY: a read-only, NUL-terminated string in a section of its own
    // kind (C string literals in __TEXT), as clang emits it; nothing else
    // is placed there by this code.
    #[unsafe(link_section = "__TEXT,__oslogstring,cstring_literals")]
    static FORMAT: [u8; 11] = *b"%{public}s\0";

    /// An `os_log_t`. The object is immutable and thread-safe by Apple's
    /// documentation; it is created once and lives for the process.
    struct Handle(*mut c_void);
    // SAFETY: os_log_t objects may be used from any thread.
    unsafe impl Send for Handle {}
    // SAFETY: as above; logging takes no lock the caller holds.
    unsafe impl Sync for Handle {}

    fn handle() -> Option<&'static Handle> {
        static HANDLE: OnceLock<Option<Handle>> = OnceLock::new();
        HANDLE
            .get_or_init(|| {
                let subsystem = CString::new(SUBSYSTEM).ok()?;
                let category = CString::new(CATEGORY).ok()?;
                // SAFETY: two valid NUL-terminated strings, which os_log_create
                // copies; it returns a process-lifetime object (or, at worst,
                // the disabled log), never freed here.
                let log = unsafe { os_log_create(subsystem.as_ptr(), category.as_ptr()) };
                (!log.is_null()).then_some(Handle(log))
            })
            .as_ref()
    }

    pub(super) fn log_public(line: &str) {
        let Some(log) = handle() else { return };
        // SAFETY: a valid os_log_t and a valid log type.
        if !unsafe { os_log_type_enabled(log.0, OS_LOG_TYPE_DEFAULT) } {
            return;
        }
        let text = c_line(line);
        let mut buffer = public_string_arg(text.as_ptr() as usize);
        let size = buffer.0.len() as u32;
        // SAFETY: `log` is a valid os_log_t; `__dso_handle` is this image's
        // header and FORMAT a NUL-terminated `%{public}s` in its text, which
        // the buffer matches (one public C string argument whose pointer is
        // `text`, alive until after the call, which copies what it logs).
        unsafe {
            _os_log_impl(
                (&raw const __dso_handle).cast_mut().cast(),
                log.0,
                OS_LOG_TYPE_DEFAULT,
                FORMAT.as_ptr().cast(),
                buffer.0.as_mut_ptr(),
                size,
            );
        }
        drop(text);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_argument_buffer_is_one_public_string_pointer() {
        let text = c_line("{\"seq\":1}");
        let pointer = text.as_ptr() as usize;
        let buffer = public_string_arg(pointer);
        assert_eq!(buffer.0.len(), 12, "64-bit targets only");
        assert_eq!(&buffer.0[..4], &[0x02, 0x01, 0x22, 0x08]);
        assert_eq!(
            usize::from_ne_bytes(buffer.0[4..].try_into().unwrap()),
            pointer
        );
        assert_eq!(std::mem::align_of::<ArgBuffer>(), 16);
    }

    #[test]
    fn lines_pass_unchanged_and_a_nul_cannot_cut_them_short() {
        assert_eq!(
            c_line("{\"a\":\"%s %{private}@\"}").to_str().unwrap(),
            "{\"a\":\"%s %{private}@\"}"
        );
        assert_eq!(c_line("a\0b").to_str().unwrap(), "a\\u0000b");
    }

    #[test]
    fn off_macos_recording_does_nothing() {
        UnifiedLog::audit().record("{\"seq\":1}");
        assert_eq!(SUBSYSTEM, "com.epm.epmd");
    }
}
