//! Shared by the Redis tests.

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

/// The URL of the Redis the test suite started, or `None` to skip; in CI a missing URL fails.
pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("STURDY_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("STURDY_REDIS_URL must be set in CI")
        }
        _ => {
            eprintln!("STURDY_REDIS_URL is not set: skipping a Redis test");
            None
        }
    }
}

/// A name no other test run uses.
pub(crate) fn unique(name: &str) -> String {
    let t = sturdy_core::WallClock::now(&sturdy_core::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sturdy-test:{name}:{}:{t}", std::process::id())
}
