//! The shared vocabulary of sturdy.
//!
//! Every sturdy layer speaks through this crate, so that one place decides what an outcome means:
//!
//! - [`ErrorKind`], [`Error`] and the marker errors [`RateLimited`] and [`CircuitOpen`], each with a
//!   `Display` that a person or a language model can act on;
//! - [`classify`]: one classification of responses and errors, shared by retry and circuit breaking;
//! - [`headers`]: total parsers (they never panic, they return a clear error on garbage) for
//!   `Retry-After`, `RateLimit`/`RateLimit-Policy`, `X-RateLimit-*`, RFC 8288 `Link`, HTTP dates and
//!   the structured-field items sturdy needs;
//! - [`body`]: buffering a body with a size limit, for replay, fingerprinting and signatures;
//! - [`clock`]: the one place that reads the wall clock, so tests can fake it;
//! - [`key`]: which key (host, token, tenant) a limiter or breaker keeps its state under;
//! - [`trace`]: the decision trace that layers append to;
//! - [`options`]: per-request settings ([`CallOptions`]) that override a layer's configuration;
//! - [`summary`]: a serialisable [`ErrorSummary`] of any error and tool results for AI agents;
//! - [`events`]: typed events for callbacks (`on_event`) and, with the `metrics` feature,
//!   counters and histograms through the `metrics` facade.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use http::StatusCode;
//! use sturdy_core::classify::{classify_status, Outcome};
//! use sturdy_core::headers::RetryAfter;
//!
//! assert!(matches!(classify_status(StatusCode::SERVICE_UNAVAILABLE), Outcome::Retryable(_)));
//! assert!(matches!(classify_status(StatusCode::NOT_FOUND), Outcome::Permanent(_)));
//!
//! let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
//! let ra = RetryAfter::parse(b"Sun, 06 Nov 1994 08:49:47 GMT").unwrap();
//! assert_eq!(ra.delay_from(now), Duration::from_secs(10));
//! assert_eq!(RetryAfter::parse(b"120").unwrap().delay_from(now), Duration::from_secs(120));
//! assert!(RetryAfter::parse(b"-1").is_err());
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod classify;
pub mod clock;
mod error;
pub mod events;
pub mod headers;
pub mod hold;
pub mod key;
pub mod keyed;
mod macros;
pub mod options;
pub mod query;
pub mod ready;
pub mod summary;
pub mod trace;

pub use classify::{AsError, Classify, DefaultClassify, Outcome};
pub use clock::{SystemClock, WallClock};
pub use error::{
    chain, find, BoxError, CallReport, CircuitOpen, Delivery, DriverGone, Error, ErrorKind,
    OpenReason, RateLimited, MAX_CHAIN,
};
pub use key::{ByHost, KeyExtractor};
pub use options::CallOptions;
pub use summary::ErrorSummary;
pub use trace::{Trace, TraceEvent};

/// Formats a duration for people and language models: `250ms`, `30s`, `2m 5s`, `1h 3m`.
///
/// Rounded up at the precision shown (a millisecond below a second, a tenth of a second below a
/// minute, a second below an hour, a minute above), so that a wait it names is never shorter
/// than the real one: a caller who waits what a message says is not refused again for the
/// fraction cut off. 59.999 s reads `1m`, 250 µs `1ms`.
pub fn human_duration(d: std::time::Duration) -> String {
    use std::time::Duration;
    let unit = if d < Duration::from_secs(1) {
        Duration::from_millis(1)
    } else if d < Duration::from_secs(60) {
        Duration::from_millis(100)
    } else if d < Duration::from_secs(3_600) {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(60)
    };
    let unit_ns = unit.as_nanos();
    let rest = d.as_nanos() % unit_ns;
    // Past what a `Duration` holds (near `Duration::MAX`), the value as it is.
    let d = if rest == 0 {
        d
    } else {
        d.checked_add(Duration::from_nanos((unit_ns - rest) as u64))
            .unwrap_or(d)
    };
    let ms = d.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    if secs < 60 {
        // One decimal only when it says something.
        let tenths = (ms % 1_000) / 100;
        return if tenths == 0 {
            format!("{secs}s")
        } else {
            format!("{secs}.{tenths}s")
        };
    }
    if secs < 3_600 {
        let (m, s) = (secs / 60, secs % 60);
        return if s == 0 {
            format!("{m}m")
        } else {
            format!("{m}m {s}s")
        };
    }
    let (h, m) = (secs / 3_600, (secs % 3_600) / 60);
    if m == 0 {
        format!("{h}h")
    } else {
        format!("{h}h {m}m")
    }
}

#[cfg(test)]
mod tests {
    use super::human_duration;
    use std::time::Duration;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_secs(30)), "30s");
        assert_eq!(human_duration(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m 5s");
        assert_eq!(human_duration(Duration::from_secs(3_600)), "1h");
        assert_eq!(human_duration(Duration::from_secs(3_780)), "1h 3m");
    }

    #[test]
    fn a_duration_is_rounded_up_at_the_precision_shown() {
        let ms = Duration::from_millis;
        assert_eq!(human_duration(Duration::from_micros(250)), "1ms");
        assert_eq!(human_duration(Duration::ZERO), "0ms");
        assert_eq!(human_duration(Duration::from_micros(999_001)), "1s");
        assert_eq!(human_duration(ms(1_999)), "2s");
        assert_eq!(human_duration(ms(1_901)), "2s");
        assert_eq!(human_duration(ms(1_900)), "1.9s");
        assert_eq!(human_duration(ms(4_999)), "5s");
        assert_eq!(human_duration(ms(59_999)), "1m");
        assert_eq!(human_duration(ms(59_901)), "1m");
        assert_eq!(human_duration(ms(125_001)), "2m 6s");
        assert_eq!(human_duration(ms(3_599_001)), "1h");
        assert_eq!(human_duration(Duration::from_secs(3_781)), "1h 4m");
        assert_eq!(human_duration(Duration::MAX), human_duration(Duration::MAX));
    }
}
