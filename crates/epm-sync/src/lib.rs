//! Placeholder until the sync client lands (issue #4).
