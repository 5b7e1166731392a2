//! A program file's code signature, as the system reads it from the file
//! (macOS: Security.framework's static code API), and which parts of it
//! prove anything.
//!
//! Endpoint Security presents an exec with the kernel's view of the
//! signature (cdhash, team id, signing id, flags). A program a caller names
//! by path (`epmctl justify`, `request`, `policy explain`) has no exec yet,
//! so its signature is read from the file; [`CodeSignature::proven`] then
//! applies the same rule the ES gate applies to an exec, so a grant made
//! for the file binds the cdhash its exec will present. Elsewhere
//! [`of_file`] finds no signature and the file is known by its SHA-256.

use std::fs::File;
use std::io;
use std::path::Path;

/// A code signature read from a file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeSignature {
    /// The code directory hash (the first 20 bytes of it, as ES gives it).
    pub cdhash: [u8; 20],
    /// The team identifier (empty for none).
    pub team_id: String,
    /// The signing identifier (empty for none).
    pub signing_id: String,
    /// The signature checked out against the file's contents.
    pub valid: bool,
    /// Ad-hoc signed: no certificate, so the identifiers prove nothing.
    pub adhoc: bool,
    /// An Apple platform binary.
    pub platform_binary: bool,
}

/// What a signature proves about a program.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProvenIdentity {
    /// The cdhash, when the signature is valid (and the hash not zero).
    pub cdhash: Option<[u8; 20]>,
    /// The team id, for a valid certificate signature only.
    pub team_id: Option<String>,
    /// The signing id, for a valid certificate signature only.
    pub signing_id: Option<String>,
}

impl CodeSignature {
    /// The parts that prove something, by the rule the Endpoint Security
    /// gate applies to an exec: a cdhash only when the signature is valid;
    /// a team id and a signing id only for a certificate signature (an
    /// ad-hoc signer picks any identifier).
    pub fn proven(&self) -> ProvenIdentity {
        let certified = self.valid && !self.adhoc;
        let non_empty = |s: &str| (certified && !s.is_empty()).then(|| s.to_owned());
        ProvenIdentity {
            cdhash: (self.valid && self.cdhash != [0; 20]).then_some(self.cdhash),
            team_id: non_empty(&self.team_id),
            signing_id: non_empty(&self.signing_id),
        }
    }
}

/// The signature of the program at `path`, which must be the file `file`
/// is open on (checked before and after reading: device, inode, size and
/// times), so what is read belongs to the file that was hashed.
/// `Ok(None)`: unsigned, or a platform without code signatures.
pub fn of_file(path: &Path, file: &File) -> io::Result<Option<CodeSignature>> {
    #[cfg(target_os = "macos")]
    {
        let before = version(&file.metadata()?);
        let signature = macos::read(path);
        let after = version(&std::fs::metadata(path)?);
        if before != after {
            return Err(io::Error::other(format!(
                "{} changed while its signature was read",
                path.display()
            )));
        }
        Ok(signature)
    }
    #[cfg(not(target_os = "macos"))]
    {
        let _ = (path, file);
        Ok(None)
    }
}

#[cfg(target_os = "macos")]
fn version(meta: &std::fs::Metadata) -> (u64, u64, u64, i64, i64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

#[cfg(target_os = "macos")]
mod macos {
    use std::ffi::c_void;
    use std::path::Path;

    use core_foundation::base::TCFType;
    use core_foundation::string::CFString;
    use core_foundation::url::CFURL;
    use core_foundation_sys::base::{CFGetTypeID, CFRelease, CFTypeRef};
    use core_foundation_sys::data::{CFDataGetBytePtr, CFDataGetLength, CFDataGetTypeID};
    use core_foundation_sys::dictionary::{CFDictionaryGetValue, CFDictionaryRef};
    use core_foundation_sys::number::{
        CFNumberGetTypeID, CFNumberGetValue, CFNumberRef, kCFNumberSInt64Type,
    };
    use core_foundation_sys::string::{CFStringGetTypeID, CFStringRef};
    use core_foundation_sys::url::CFURLRef;

    use super::CodeSignature;

    type OsStatus = i32;
    type SecStaticCodeRef = *const c_void;

    /// `kSecCSSigningInformation`: include the signing identifiers.
    const SIGNING_INFORMATION: u32 = 1 << 1;
    /// `kSecCodeSignatureAdhoc` in `kSecCodeInfoFlags`.
    const SIGNATURE_ADHOC: i64 = 0x0002;

    #[link(name = "Security", kind = "framework")]
    unsafe extern "C" {
        fn SecStaticCodeCreateWithPath(
            path: CFURLRef,
            flags: u32,
            code: *mut SecStaticCodeRef,
        ) -> OsStatus;
        fn SecStaticCodeCheckValidity(
            code: SecStaticCodeRef,
            flags: u32,
            requirement: *const c_void,
        ) -> OsStatus;
        fn SecCodeCopySigningInformation(
            code: SecStaticCodeRef,
            flags: u32,
            information: *mut CFDictionaryRef,
        ) -> OsStatus;
        static kSecCodeInfoUnique: CFStringRef;
        static kSecCodeInfoTeamIdentifier: CFStringRef;
        static kSecCodeInfoIdentifier: CFStringRef;
        static kSecCodeInfoFlags: CFStringRef;
        static kSecCodeInfoPlatformIdentifier: CFStringRef;
    }

    /// Reads the signature of the file at `path`; `None` when it has none
    /// or it cannot be read.
    pub(super) fn read(path: &Path) -> Option<CodeSignature> {
        let url = CFURL::from_path(path, false)?;
        let mut code: SecStaticCodeRef = std::ptr::null();
        // SAFETY: a valid CFURL; on success `code` is a new reference we
        // own and release below.
        let status =
            unsafe { SecStaticCodeCreateWithPath(url.as_concrete_TypeRef(), 0, &mut code) };
        if status != 0 || code.is_null() {
            return None;
        }
        // SAFETY: `code` is a live static code; a null requirement checks
        // the signature alone.
        let valid = unsafe { SecStaticCodeCheckValidity(code, 0, std::ptr::null()) } == 0;
        let mut info: CFDictionaryRef = std::ptr::null();
        // SAFETY: as above; on success `info` is a new dictionary we own.
        let status = unsafe { SecCodeCopySigningInformation(code, SIGNING_INFORMATION, &mut info) };
        // SAFETY: `code` was created above and is not used again.
        unsafe { CFRelease(code as CFTypeRef) };
        if status != 0 || info.is_null() {
            return None;
        }
        // SAFETY: `info` is a live dictionary and the keys are the
        // framework's constant strings; values are read per their type id
        // before `info` is released.
        unsafe {
            let cdhash = data(CFDictionaryGetValue(info, kSecCodeInfoUnique.cast()));
            let flags = number(CFDictionaryGetValue(info, kSecCodeInfoFlags.cast()));
            let platform = number(CFDictionaryGetValue(
                info,
                kSecCodeInfoPlatformIdentifier.cast(),
            ));
            let signature = cdhash.map(|cdhash| {
                let mut first = [0u8; 20];
                let n = cdhash.len().min(20);
                first[..n].copy_from_slice(&cdhash[..n]);
                CodeSignature {
                    cdhash: first,
                    team_id: string(CFDictionaryGetValue(
                        info,
                        kSecCodeInfoTeamIdentifier.cast(),
                    ))
                    .unwrap_or_default(),
                    signing_id: string(CFDictionaryGetValue(info, kSecCodeInfoIdentifier.cast()))
                        .unwrap_or_default(),
                    valid,
                    adhoc: flags.unwrap_or(0) & SIGNATURE_ADHOC != 0,
                    platform_binary: platform.unwrap_or(0) != 0,
                }
            });
            CFRelease(info.cast());
            signature
        }
    }

    /// The bytes of a CFData, if `value` is one.
    ///
    /// # Safety
    /// `value` is null or a live CF object.
    unsafe fn data(value: *const c_void) -> Option<Vec<u8>> {
        // SAFETY: per the contract, and the type is checked before use.
        unsafe {
            if value.is_null() || CFGetTypeID(value) != CFDataGetTypeID() {
                return None;
            }
            let len = usize::try_from(CFDataGetLength(value.cast())).ok()?;
            let bytes = CFDataGetBytePtr(value.cast());
            (!bytes.is_null()).then(|| std::slice::from_raw_parts(bytes, len).to_vec())
        }
    }

    /// The text of a CFString, if `value` is one.
    ///
    /// # Safety
    /// `value` is null or a live CF object.
    unsafe fn string(value: *const c_void) -> Option<String> {
        // SAFETY: per the contract, and the type is checked before use;
        // the get rule retains it for the wrapper's lifetime.
        unsafe {
            if value.is_null() || CFGetTypeID(value) != CFStringGetTypeID() {
                return None;
            }
            Some(CFString::wrap_under_get_rule(value.cast()).to_string())
        }
    }

    /// The value of a CFNumber, if `value` is one.
    ///
    /// # Safety
    /// `value` is null or a live CF object.
    unsafe fn number(value: *const c_void) -> Option<i64> {
        // SAFETY: per the contract, and the type is checked before use;
        // CFNumberGetValue writes one i64 for kCFNumberSInt64Type.
        unsafe {
            if value.is_null() || CFGetTypeID(value) != CFNumberGetTypeID() {
                return None;
            }
            let mut out: i64 = 0;
            let ok = CFNumberGetValue(
                value as CFNumberRef,
                kCFNumberSInt64Type,
                (&mut out as *mut i64).cast(),
            );
            ok.then_some(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed() -> CodeSignature {
        CodeSignature {
            cdhash: [0xab; 20],
            team_id: "7Z6EMTD2C6".into(),
            signing_id: "org.wireshark.Wireshark".into(),
            valid: true,
            adhoc: false,
            platform_binary: false,
        }
    }

    #[test]
    fn a_valid_certificate_signature_proves_all_three() {
        let proven = signed().proven();
        assert_eq!(proven.cdhash, Some([0xab; 20]));
        assert_eq!(proven.team_id.as_deref(), Some("7Z6EMTD2C6"));
        assert_eq!(
            proven.signing_id.as_deref(),
            Some("org.wireshark.Wireshark")
        );
    }

    #[test]
    fn an_ad_hoc_signature_proves_the_cdhash_only() {
        let proven = CodeSignature {
            adhoc: true,
            signing_id: "com.apple.Safari".into(),
            ..signed()
        }
        .proven();
        assert_eq!(proven.cdhash, Some([0xab; 20]));
        assert_eq!((proven.team_id, proven.signing_id), (None, None));
    }

    #[test]
    fn an_invalid_or_empty_signature_proves_nothing() {
        let invalid = CodeSignature {
            valid: false,
            ..signed()
        };
        assert_eq!(invalid.proven(), ProvenIdentity::default());
        let zero = CodeSignature {
            cdhash: [0; 20],
            team_id: String::new(),
            ..signed()
        };
        let proven = zero.proven();
        assert_eq!((proven.cdhash, proven.team_id), (None, None));
    }

    #[test]
    fn off_macos_a_file_has_no_signature() {
        let file = File::open("/bin/sh").unwrap();
        if !cfg!(target_os = "macos") {
            assert_eq!(of_file(Path::new("/bin/sh"), &file).unwrap(), None);
        }
    }
}
