//! HTTP dates, read leniently: any date read must format and read back to the same time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sturdy_core::headers::{format_http_date, parse_http_date};

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = parse_http_date(data, "Date") {
        let text = format_http_date(t);
        let again = parse_http_date(text.as_bytes(), "Date").expect("a formatted date reads back");
        assert_eq!(again, t, "{text}");
    }
});
