//! Total parsers for the headers sturdy acts on.
//!
//! Every parser here accepts arbitrary bytes: it returns a value or a [`HeaderParseError`] that
//! says what was wrong, and never panics (property tests check this).

mod date;
mod link;
mod ratelimit;
mod retry_after;
pub mod sf;
mod uri;

use std::fmt;

pub use date::{format_http_date, parse_http_date, parse_http_date_any_year};
pub use link::{next_link, parse_link, Link, MAX_LINKS, MAX_LINK_PARAMS};
pub use ratelimit::{
    may_pause, pause_hint, PauseHint, PauseSource, RateLimitItem, RateLimitPolicy, XRateLimit,
};
pub use retry_after::RetryAfter;
pub use uri::resolve_reference;

/// A header value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderParseError {
    header: &'static str,
    reason: String,
}

impl HeaderParseError {
    pub(crate) fn new(header: &'static str, reason: impl Into<String>) -> Self {
        Self {
            header,
            reason: reason.into(),
        }
    }

    /// The header that was being parsed.
    pub fn header(&self) -> &'static str {
        self.header
    }

    /// What was wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl fmt::Display for HeaderParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} header: {}", self.header, self.reason)
    }
}

impl std::error::Error for HeaderParseError {}

/// Trims optional white space (space and tab) from both ends.
pub(crate) fn trim_ows(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(start, |i| i + 1);
    &b[start..end.max(start)]
}
