//! sturdy: tower middleware that makes integrations with real HTTP APIs survive production.
//!
//! Each mechanic is an independent `tower::Layer` in a crate of its own, re-exported here behind a
//! cargo feature of the same name (`full` enables all). [`core`] is always there.
#![forbid(unsafe_code)]

pub use sturdy_core as core;

/// Retries: decorrelated jitter, Retry-After, budgets, an overall deadline ([`sturdy_retry`]).
#[cfg(feature = "retry")]
pub use sturdy_retry as retry;
