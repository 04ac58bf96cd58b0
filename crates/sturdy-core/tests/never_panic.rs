//! Property tests: every parser is total on arbitrary input.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use sturdy_core::headers::{
    parse_http_date, parse_link, pause_hint, resolve_reference, sf, RateLimitItem, RateLimitPolicy,
    RetryAfter, XRateLimit,
};

fn header_map(name: &'static str, raw: &[u8]) -> Option<HeaderMap> {
    let v = HeaderValue::from_bytes(raw).ok()?;
    let mut h = HeaderMap::new();
    h.insert(HeaderName::from_static(name), v);
    Some(h)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn retry_after_total(raw in proptest::collection::vec(any::<u8>(), 0..64), now in any::<u32>()) {
        if let Ok(ra) = RetryAfter::parse(&raw) {
            let _ = ra.delay_from(SystemTime::UNIX_EPOCH + Duration::from_secs(now.into()));
        }
        let _ = parse_http_date(&raw, "Date");
    }

    #[test]
    fn retry_after_text_total(s in "[ 0-9A-Za-z,:+\\-.\t]{0,40}") {
        let _ = RetryAfter::parse(s.as_bytes());
    }

    #[test]
    fn sf_total(raw in proptest::collection::vec(any::<u8>(), 0..96)) {
        let _ = sf::parse_list([&raw[..]]);
        let _ = sf::parse_item(&raw);
    }

    #[test]
    fn sf_shaped_total(s in "[\"a-z0-9;=:,()?@* .\\-\\\\]{0,60}") {
        let _ = sf::parse_list([s.as_bytes()]);
        if let Some(h) = header_map("ratelimit", s.as_bytes()) {
            let _ = RateLimitItem::from_headers(&h);
            let _ = pause_hint(StatusCode::TOO_MANY_REQUESTS, &h, SystemTime::UNIX_EPOCH);
        }
        if let Some(h) = header_map("ratelimit-policy", s.as_bytes()) {
            let _ = RateLimitPolicy::from_headers(&h);
        }
    }

    #[test]
    fn x_ratelimit_total(raw in proptest::collection::vec(any::<u8>(), 0..40), now in any::<u64>()) {
        if let Some(h) = header_map("x-ratelimit-reset", &raw) {
            let now = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(now / 2)).unwrap_or(SystemTime::UNIX_EPOCH);
            let _ = XRateLimit::from_headers(&h, now);
        }
    }

    #[test]
    fn link_total(raw in proptest::collection::vec(any::<u8>(), 0..128), base in "[a-z:/.?#]{0,20}") {
        if let Some(h) = header_map("link", &raw) {
            let _ = parse_link(&h, &base);
        }
    }

    #[test]
    fn link_shaped_total(s in "[<>a-z/.;=\" ,\t*%'\\\\]{0,80}", base in "[a-z:/.?#]{0,20}") {
        if let Some(h) = header_map("link", s.as_bytes()) {
            let _ = parse_link(&h, &base);
        }
    }

    #[test]
    fn resolve_total(base in "[a-z:/.?#;]{0,24}", r in "[a-z:/.?#;]{0,24}") {
        let _ = resolve_reference(&base, &r);
    }
}
