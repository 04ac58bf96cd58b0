//! `Retry-After`: delay-seconds or an HTTP date, read against any clock.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_core::headers::RetryAfter;
use sturdy_fuzz::{header_lines, take_now};

fuzz_target!(|data: &[u8]| {
    let (now, value) = take_now(data);
    if let Ok(ra) = RetryAfter::parse(value) {
        let _ = ra.delay_from(now);
    }
    if let Some(ra) = RetryAfter::from_headers(&header_lines(&["retry-after"], value)) {
        let _ = ra.delay_from(now);
    }
});
