//! `RateLimit` and `RateLimit-Policy` (structured-field lists), and the pause they imply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_core::headers::{may_pause, pause_hint, RateLimitItem, RateLimitPolicy};
use sturdy_fuzz::{header_lines, take_now, take_status};

fuzz_target!(|data: &[u8]| {
    let (now, rest) = take_now(data);
    let (status, rest) = take_status(rest);
    let h = header_lines(&["ratelimit", "ratelimit-policy", "retry-after"], rest);
    let _ = RateLimitItem::from_headers(&h);
    let _ = RateLimitPolicy::from_headers(&h);
    let _ = may_pause(status, &h);
    let _ = pause_hint(status, &h, now);
});
