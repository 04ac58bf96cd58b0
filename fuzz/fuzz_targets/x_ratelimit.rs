//! The de-facto `X-RateLimit-*` headers (every spelling), and the pause they imply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_core::headers::{pause_hint, XRateLimit};
use sturdy_fuzz::{header_lines, take_now, take_status};

fuzz_target!(|data: &[u8]| {
    let (now, rest) = take_now(data);
    let (status, rest) = take_status(rest);
    let h = header_lines(
        &[
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "x-ratelimit-limit",
            "x-rate-limit-reset",
            "ratelimit-reset",
            "ratelimit-remaining",
        ],
        rest,
    );
    let _ = XRateLimit::from_headers(&h, now);
    let _ = pause_hint(status, &h, now);
});
