//! The EPM agent's client for the management platform (issue #4).
//!
//! Platform-neutral and free of `epmd` types, so every piece is tested on
//! its own:
//!
//! - [`PlatformClient`]: the REST calls of `epm_api::agent` over HTTPS with
//!   only the pinned platform CA trusted, bounded time and bounded bodies.
//!   Every failure is a [`SyncError`] naming the step, the URL and what
//!   went wrong.
//! - [`accept_bundle`] and [`accept_grant`]: what the agent checks before
//!   it stores or enforces anything the platform sent: the signature against
//!   the pinned key first, then device, version (no rollback) and validity.
//! - [`schedule`]: when the next check-in happens (jitter, backoff).
//! - [`credentials`]: where the agent keeps its id and secret (a 0600 file,
//!   or the System keychain on macOS).

mod accept;
mod client;
pub mod credentials;
pub mod schedule;

pub use accept::{
    AcceptedBundle, BundleError, CurrentBundle, GrantError, accept_bundle, accept_grant,
};
pub use client::{
    ClientOptions, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, PlatformClient, PolicyFetch,
    SyncError, load_ca,
};
