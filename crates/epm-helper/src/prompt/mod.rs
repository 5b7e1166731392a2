//! The desktop backends: dialogs and notifications for a graphical session.
//! The conversation itself (what is asked, checked and said) is
//! `epm_prompt`'s, written once over its [`Backend`](epm_prompt::Backend) trait.

mod osascript;
#[cfg(target_os = "macos")]
mod user_notifications;
mod zenity;

pub use osascript::Osascript;
pub use zenity::Zenity;
