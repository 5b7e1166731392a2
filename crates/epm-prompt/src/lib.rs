//! The conversation with a person, shared by `epm-helper`, `epmctl` and
//! `epm-sudo`: one text for each thing EPM says, whichever program says it.
//!
//! - [`messages`]: what is said, word for word (`docs/user-guide.md` quotes it).
//! - [`display`]: untrusted text (rule messages, program names, approvers'
//!   reasons) made safe to show in a terminal or a dialog.
//! - [`when`]: the times a user types for an approval window.
//! - [`ask`]: the justification and approval flows — ask, check with the
//!   rule, explain what to fix, ask again — written once over a [`Backend`]
//!   that only asks for one line and shows a message.
//! - [`Terminal`] and [`Scripted`]: the two backends that need no desktop.
//!   The dialog backends (zenity, osascript, notifications) are the GUI
//!   helper's (`epm-helper`).
//!
//! This crate deliberately knows nothing about the daemon or its protocol:
//! it gets a rule's limits (`epm_policy` specs) and returns checked answers;
//! sending them is the caller's job. Every answer is checked here for quick
//! feedback and again by the daemon.

pub mod ask;
pub mod display;
pub mod messages;
mod scripted;
pub mod terminal;
pub mod when;

pub use ask::{
    ApprovalAnswer, ApprovalAsk, Backend, JustificationAsk, MAX_ATTEMPTS, PromptError, Tone,
    ask_approval, ask_justification,
};
pub use scripted::Scripted;
pub use terminal::Terminal;
