//! Placeholder until the platform lands (issue #4).
