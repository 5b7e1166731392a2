//! Notifications through the UserNotifications framework (macOS), posted as
//! the helper's own bundle (`com.epm.helper`), so they carry its name and
//! icon and the MDM notifications profile for that bundle id applies (an
//! `osascript` notification belongs to Script Editor, which the profile
//! does not cover).
//!
//! Only works when the helper runs from its app bundle (the LaunchAgent
//! starts `EPM Helper.app/Contents/MacOS/epm-helper`): otherwise, or when
//! the user or MDM did not allow notifications, [`post`] fails and the
//! caller falls back to `osascript`. The few Objective-C calls are sent
//! with `objc2`'s `msg_send!` (the framework crates need the SDK's headers
//! for nothing this uses). Never run: no Mac was available; see
//! docs/deploy-macos.md.

use std::ffi::{CStr, CString, c_char};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::time::Duration;

use block2::RcBlock;
use objc2::msg_send;
use objc2::rc::{Retained, autoreleasepool};
use objc2::runtime::{AnyClass, AnyObject, Bool};

use epm_prompt::PromptError;

#[link(name = "UserNotifications", kind = "framework")]
unsafe extern "C" {}
#[link(name = "Foundation", kind = "framework")]
unsafe extern "C" {}

/// `UNAuthorizationOptionSound | UNAuthorizationOptionAlert`.
const ALERT_AND_SOUND: usize = (1 << 1) | (1 << 2);

/// How long to wait for the notification center to answer.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

fn failed(detail: impl Into<String>) -> PromptError {
    PromptError::Failed {
        program: "UserNotifications".into(),
        detail: detail.into(),
    }
}

fn class(name: &CStr) -> Result<&'static AnyClass, PromptError> {
    AnyClass::get(name).ok_or_else(|| failed(format!("no class {name:?}")))
}

/// An `NSString` with `text` (NUL bytes, which no notification needs, are
/// dropped).
fn ns_string(text: &str) -> Result<Retained<AnyObject>, PromptError> {
    let text = CString::new(text.replace('\0', "")).map_err(|e| failed(e.to_string()))?;
    let ns_string = class(c"NSString")?;
    // SAFETY: `+[NSString stringWithUTF8String:]` takes a NUL-terminated
    // UTF-8 string, copies it and returns an autoreleased string (retained
    // here), or nil.
    let string: Option<Retained<AnyObject>> =
        unsafe { msg_send![ns_string, stringWithUTF8String: text.as_ptr()] };
    string.ok_or_else(|| failed("cannot make an NSString"))
}

/// The text of an `NSString` (`None` for nil or no UTF-8 form).
///
/// # Safety
///
/// `string` must be NULL or a live `NSString`.
unsafe fn text(string: *mut AnyObject) -> Option<String> {
    if string.is_null() {
        return None;
    }
    // SAFETY: a live NSString per the caller; `UTF8String` returns a C
    // string that lives as long as the string, copied out at once.
    unsafe {
        let utf8: *const c_char = msg_send![string, UTF8String];
        (!utf8.is_null()).then(|| CStr::from_ptr(utf8).to_string_lossy().into_owned())
    }
}

/// The `localizedDescription` of an `NSError`, for messages.
///
/// # Safety
///
/// `error` must be NULL or a live `NSError`.
unsafe fn describe(error: *mut AnyObject) -> String {
    if error.is_null() {
        return "unknown error".into();
    }
    // SAFETY: a live NSError per the caller; `localizedDescription`
    // returns an NSString it owns (or nil), read inside the pool.
    let description = unsafe { text(msg_send![error, localizedDescription]) };
    description.unwrap_or_else(|| "unknown error".into())
}

/// Whether this process runs from an app bundle with an identifier: the
/// notification center raises an exception (which aborts, being raised
/// where it cannot be caught) for a process LaunchServices has no bundle
/// for, so anything else never reaches it. The installer registers the
/// helper's bundle with LaunchServices (`postinstall`).
fn in_a_bundle() -> Result<bool, PromptError> {
    let bundle_class = class(c"NSBundle")?;
    // SAFETY: `+[NSBundle mainBundle]`, `-bundleIdentifier` and
    // `-bundlePath` return objects owned elsewhere (or nil), read at once
    // inside the caller's autorelease pool.
    unsafe {
        let bundle: *mut AnyObject = msg_send![bundle_class, mainBundle];
        if bundle.is_null() {
            return Ok(false);
        }
        let identifier: *mut AnyObject = msg_send![bundle, bundleIdentifier];
        let path = text(msg_send![bundle, bundlePath]);
        Ok(!identifier.is_null() && path.is_some_and(|path| path.ends_with(".app")))
    }
}

/// Asks to show alerts (MDM's notifications profile answers for the
/// user). Only a yes is kept: a user who has not answered yet, or who
/// allows notifications later, is asked again at the next one (macOS
/// shows its question once, then answers from the setting at once).
fn authorized(center: &AnyObject) -> Result<(), PromptError> {
    static GRANTED: AtomicBool = AtomicBool::new(false);
    if GRANTED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let (tx, rx) = sync_channel(1);
    let block = RcBlock::new(move |granted: Bool, error: *mut AnyObject| {
        let answer = if granted.as_bool() {
            Ok(())
        } else {
            // SAFETY: the center passes NULL or a live NSError.
            Err(format!("notifications not allowed: {}", unsafe {
                describe(error)
            }))
        };
        let _ = tx.try_send(answer);
    });
    // SAFETY: `-requestAuthorizationWithOptions:completionHandler:` takes an
    // NSUInteger and a `void (^)(BOOL, NSError *)` block, which it copies;
    // the block only sends on a channel.
    let () = unsafe {
        msg_send![center, requestAuthorizationWithOptions: ALERT_AND_SOUND,
            completionHandler: &*block]
    };
    let answer = match rx.recv_timeout(ANSWER_WAIT) {
        Ok(answer) => answer,
        // The user has not answered macOS's question yet: this one goes
        // another way, and the next asks again.
        Err(RecvTimeoutError::Timeout) => Err("notifications not allowed yet".into()),
        Err(RecvTimeoutError::Disconnected) => Err("the authorization request was dropped".into()),
    };
    if answer.is_ok() {
        GRANTED.store(true, Ordering::Relaxed);
    }
    answer.map_err(failed)
}

/// Posts one notification now, as the helper's bundle.
pub(crate) fn post(title: &str, body: &str) -> Result<(), PromptError> {
    autoreleasepool(|_| {
        if !in_a_bundle()? {
            return Err(failed("not running from an app bundle"));
        }
        let center_class = class(c"UNUserNotificationCenter")?;
        // SAFETY: `+currentNotificationCenter` returns the shared center
        // (retained here).
        let center: Option<Retained<AnyObject>> =
            unsafe { msg_send![center_class, currentNotificationCenter] };
        let center = center.ok_or_else(|| failed("no notification center"))?;
        authorized(&center)?;

        let content_class = class(c"UNMutableNotificationContent")?;
        // SAFETY: `+new` returns a retained, initialized object.
        let content: Option<Retained<AnyObject>> = unsafe { msg_send![content_class, new] };
        let content = content.ok_or_else(|| failed("cannot make notification content"))?;
        let (title, body) = (ns_string(title)?, ns_string(body)?);
        let identifier = ns_string(&format!(
            "com.epm.helper.{}.{}",
            std::process::id(),
            next_id()
        ))?;
        let request_class = class(c"UNNotificationRequest")?;
        // SAFETY: the setters copy their NSString argument; the class
        // method returns an autoreleased request (retained here) for an
        // identifier, a content object and a nil trigger (deliver now).
        let request: Option<Retained<AnyObject>> = unsafe {
            let () = msg_send![&*content, setTitle: &*title];
            let () = msg_send![&*content, setBody: &*body];
            msg_send![request_class, requestWithIdentifier: &*identifier,
                content: &*content, trigger: std::ptr::null_mut::<AnyObject>()]
        };
        let request = request.ok_or_else(|| failed("cannot make a notification request"))?;

        let (tx, rx) = sync_channel(1);
        let block = RcBlock::new(move |error: *mut AnyObject| {
            let answer = if error.is_null() {
                Ok(())
            } else {
                // SAFETY: the center passes a live NSError.
                Err(unsafe { describe(error) })
            };
            let _ = tx.try_send(answer);
        });
        // SAFETY: `-addNotificationRequest:withCompletionHandler:` takes a
        // request and a `void (^)(NSError *)` block, which it copies.
        let () = unsafe {
            msg_send![&*center, addNotificationRequest: &*request,
                withCompletionHandler: &*block]
        };
        match rx.recv_timeout(ANSWER_WAIT) {
            Ok(answer) => answer.map_err(failed),
            Err(_) => Err(failed(
                "the notification center did not confirm the notification",
            )),
        }
    })
}

/// A number for each notification's identifier: identifiers must differ,
/// or a new notification replaces the last.
fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
