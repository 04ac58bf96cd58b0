//! What one hostile header costs: time must grow linearly with its size (16x the input, at most
//! ~64x the time; quadratic work would be 256x), whatever a peer puts in it. Real time, but each
//! size is timed several times and the fastest run kept, so a loaded machine cannot fail it.

use std::hint::black_box;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use sturdy::core::body::{buffer, BodyError};
use sturdy::core::headers::sf::{parse_item, parse_list};
use sturdy::core::headers::{
    next_link, parse_http_date, parse_link, pause_hint, resolve_reference, RateLimitItem,
    RateLimitPolicy, RetryAfter, XRateLimit, MAX_LINKS, MAX_LINK_PARAMS,
};

use crate::edge30_util::assert_linear;

#[allow(clippy::needless_pass_by_value)]
fn one(name: &'static str, v: Vec<u8>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_bytes(&v).unwrap());
    h
}

fn lines(name: &'static str, n: usize, line: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    for _ in 0..n {
        h.append(name, HeaderValue::from_str(line).unwrap());
    }
    h
}

fn repeat(prefix: &str, unit: &str, n: usize, suffix: &str) -> Vec<u8> {
    let mut s = String::with_capacity(prefix.len() + unit.len() * n + suffix.len());
    s.push_str(prefix);
    for _ in 0..n {
        s.push_str(unit);
    }
    s.push_str(suffix);
    s.into_bytes()
}

/// `p0=1;p1=1;...` distinct keys.
fn distinct_params(prefix: &str, n: usize, sep: &str) -> Vec<u8> {
    let mut s = String::from(prefix);
    for i in 0..n {
        s.push_str(sep);
        s.push_str(&format!("p{i}=1"));
    }
    s.into_bytes()
}

const NOW: u64 = 1_700_000_000;

// ---- Retry-After and dates ----

#[test]
fn retry_after_of_a_megabyte_is_linear() {
    assert_linear(
        "Retry-After digits",
        64 << 10,
        |n| vec![b'7'; n],
        |v| {
            black_box(RetryAfter::parse(v).unwrap());
        },
    );
    assert_linear(
        "Retry-After white space",
        64 << 10,
        |n| repeat("", " \t", n / 2, "1"),
        |v| {
            let _ = black_box(RetryAfter::parse(v));
        },
    );
    assert_linear(
        "Retry-After garbage",
        64 << 10,
        |n| repeat("", "Sun, 06 Nov ", n / 12, ""),
        |v| {
            let _ = black_box(RetryAfter::parse(v));
        },
    );
}

#[test]
fn http_date_of_a_megabyte_is_linear() {
    assert_linear(
        "HTTP date, long year",
        64 << 10,
        |n| repeat("Sun, 06 Nov ", "1", n, " 08:49:37 GMT"),
        |v| {
            let _ = black_box(parse_http_date(v, "Date"));
        },
    );
    assert_linear(
        "HTTP date, spaces",
        64 << 10,
        |n| repeat("Sun,", " ", n, "06 Nov 1994 08:49:37 GMT"),
        |v| {
            let _ = black_box(parse_http_date(v, "Date"));
        },
    );
}

// ---- RateLimit / RateLimit-Policy / structured fields ----

#[test]
fn ratelimit_megabyte_of_commas_is_linear_and_an_error() {
    assert_linear(
        "RateLimit of commas",
        64 << 10,
        |n| one("ratelimit", vec![b','; n]),
        |h| {
            assert!(RateLimitItem::from_headers(h).is_err());
        },
    );
    assert_linear(
        "RateLimit-Policy of commas",
        64 << 10,
        |n| one("ratelimit-policy", vec![b','; n]),
        |h| {
            assert!(RateLimitPolicy::from_headers(h).is_err());
        },
    );
}

#[test]
fn ratelimit_many_distinct_params_is_linear() {
    assert_linear(
        "RateLimit with distinct parameters",
        6_250,
        |n| one("ratelimit", distinct_params("\"a\";r=1;t=2", n, ";")),
        |h| {
            let r = RateLimitItem::from_headers(h).unwrap();
            assert_eq!(r[0].remaining, 1);
        },
    );
}

#[test]
fn ratelimit_many_repeated_params_is_linear() {
    assert_linear(
        "RateLimit with one parameter repeated",
        6_250,
        |n| one("ratelimit", repeat("\"a\"", ";r=1", n, ";t=9")),
        |h| {
            let r = RateLimitItem::from_headers(h).unwrap();
            assert_eq!(r[0].reset, Some(Duration::from_secs(9)));
        },
    );
}

#[test]
fn ratelimit_many_items_and_lines_is_linear() {
    assert_linear(
        "RateLimit with many items",
        6_250,
        |n| one("ratelimit", repeat("\"a\";r=1", ",\"b\";r=0;t=5", n, "")),
        |h| {
            let _ = black_box(RateLimitItem::from_headers(h));
        },
    );
    assert_linear(
        "RateLimit over many field lines",
        2_000,
        |n| lines("ratelimit", n, "\"a\";r=0;t=5"),
        |h| {
            let _ = black_box(RateLimitItem::from_headers(h));
        },
    );
    assert_linear(
        "pause_hint over many RateLimit lines",
        2_000,
        |n| lines("ratelimit", n, "\"a\";r=0;t=5"),
        |h| {
            let p = pause_hint(StatusCode::OK, h, UNIX_EPOCH + Duration::from_secs(NOW));
            assert_eq!(p.unwrap().delay, Duration::from_secs(5));
        },
    );
}

#[test]
fn structured_field_unterminated_and_nested_is_linear() {
    assert_linear(
        "unterminated string",
        64 << 10,
        |n| repeat("\"", "a", n, ""),
        |v| {
            assert!(parse_item(v).is_err());
        },
    );
    assert_linear(
        "string of escapes",
        64 << 10,
        |n| repeat("\"", "\\\\", n / 2, "\""),
        |v| {
            assert!(parse_item(v).is_ok());
        },
    );
    assert_linear(
        "unterminated string of escapes",
        64 << 10,
        |n| repeat("\"", "\\\"", n / 2, ""),
        |v| {
            assert!(parse_item(v).is_err());
        },
    );
    assert_linear(
        "nested parentheses",
        64 << 10,
        |n| vec![b'('; n],
        |v| {
            assert!(parse_list([&v[..]]).is_err());
        },
    );
    assert_linear(
        "an inner list of many members",
        6_250,
        |n| repeat("(", "a ", n, ")"),
        |v| {
            assert!(parse_list([&v[..]]).is_ok());
        },
    );
    assert_linear(
        "a byte sequence",
        64 << 10,
        |n| repeat("\"a\";r=1;pk=:", "QUJD", n / 4, ":"),
        |v| {
            let _ = black_box(parse_list([&v[..]]));
        },
    );
    assert_linear(
        "distinct item params",
        6_250,
        |n| distinct_params("a", n, ";"),
        |v| {
            assert!(parse_item(v).is_ok());
        },
    );
}

#[test]
fn x_ratelimit_hostile_values_are_linear() {
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    assert_linear(
        "X-RateLimit-Reset digits",
        64 << 10,
        |n| {
            let mut h = one("x-ratelimit-reset", vec![b'9'; n]);
            h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
            h
        },
        |h| {
            black_box(XRateLimit::from_headers(h, now));
        },
    );
    assert_linear(
        "X-RateLimit-Reset decimal",
        64 << 10,
        |n| {
            let mut v = b"1.".to_vec();
            v.extend(std::iter::repeat_n(b'5', n));
            one("x-ratelimit-reset", v)
        },
        |h| {
            black_box(XRateLimit::from_headers(h, now));
        },
    );
    assert_linear(
        "duplicated X-RateLimit lines",
        2_000,
        |n| lines("x-ratelimit-remaining", n, "0"),
        |h| {
            black_box(XRateLimit::from_headers(h, now));
        },
    );
}

// ---- Link ----

const URI: &str = "https://api.example.com/items?page=1";

#[test]
fn link_megabyte_of_commas_and_semicolons_is_linear() {
    assert_linear(
        "Link of commas",
        64 << 10,
        |n| one("link", vec![b','; n]),
        |h| {
            assert!(parse_link(h, URI).is_empty());
            assert!(next_link(h, URI).is_none());
        },
    );
    assert_linear(
        "Link of semicolons",
        64 << 10,
        |n| one("link", repeat("<a>", ";", n, "; rel=next")),
        |h| {
            black_box(parse_link(h, URI));
            black_box(next_link(h, URI));
        },
    );
}

#[test]
fn link_hundred_thousand_links_is_linear_and_bounded() {
    assert_linear(
        "100,000 links",
        6_250,
        |n| {
            one(
                "link",
                repeat(
                    "",
                    "<https://x/i>; rel=item, ",
                    n,
                    "<https://x/n>; rel=next",
                ),
            )
        },
        |h| {
            let l = parse_link(h, URI);
            assert_eq!(l.len(), MAX_LINKS);
            assert_eq!(next_link(h, URI).as_deref(), Some("https://x/n"));
        },
    );
    assert_linear(
        "100,000 Link field lines",
        2_000,
        |n| lines("link", n, "<https://x/i>; rel=item"),
        |h| {
            assert_eq!(parse_link(h, URI).len(), MAX_LINKS);
            assert!(next_link(h, URI).is_none());
        },
    );
}

#[test]
fn link_many_params_on_one_link_is_linear_and_bounded() {
    assert_linear(
        "one link with distinct params",
        6_250,
        |n| one("link", distinct_params("<a>; rel=next", n, "; ")),
        |h| {
            let l = parse_link(h, URI);
            assert_eq!(l.len(), 1);
            assert!(l[0].params().len() <= MAX_LINK_PARAMS);
        },
    );
    assert_linear(
        "one link with title repeated",
        6_250,
        |n| one("link", repeat("<a>; rel=next", "; title=t", n, "")),
        |h| {
            let l = parse_link(h, URI);
            assert_eq!(l[0].title(), Some("t"));
        },
    );
    assert_linear(
        "one link with rel repeated",
        6_250,
        |n| one("link", repeat("<a>; rel=next", "; rel=prev", n, "")),
        |h| {
            assert_eq!(parse_link(h, URI)[0].rel(), "next");
        },
    );
    assert_linear(
        "one link with anchor repeated",
        6_250,
        |n| one("link", repeat("<a>; rel=next", "; anchor=\"#x\"", n, "")),
        |h| {
            black_box(parse_link(h, URI));
            black_box(next_link(h, URI));
        },
    );
}

#[test]
fn link_unterminated_and_long_tokens_are_linear() {
    assert_linear(
        "unterminated quoted param",
        64 << 10,
        |n| one("link", repeat("<a>; rel=next; title=\"", "x", n, "")),
        |h| {
            black_box(parse_link(h, URI));
            black_box(next_link(h, URI));
        },
    );
    assert_linear(
        "quoted param of escapes",
        64 << 10,
        |n| {
            one(
                "link",
                repeat("<a>; rel=next; title=\"", "\\\"", n / 2, "\""),
            )
        },
        |h| {
            black_box(parse_link(h, URI));
        },
    );
    assert_linear(
        "unterminated target",
        64 << 10,
        |n| one("link", repeat("<", "a", n, "")),
        |h| {
            assert!(parse_link(h, URI).is_empty());
        },
    );
    assert_linear(
        "a rel of many types",
        6_250,
        |n| one("link", repeat("<a>; rel=\"", "t ", n, "next\"")),
        |h| {
            assert_eq!(parse_link(h, URI).len(), MAX_LINKS);
            assert!(next_link(h, URI).is_some());
        },
    );
    assert_linear(
        "a long target",
        64 << 10,
        |n| one("link", repeat("<", "a/", n / 2, ">; rel=next")),
        |h| {
            black_box(parse_link(h, URI));
            black_box(next_link(h, URI));
        },
    );
    assert_linear(
        "a long title*",
        64 << 10,
        |n| {
            one(
                "link",
                repeat("<a>; rel=next; title*=UTF-8''", "%c3%a4", n / 6, ""),
            )
        },
        |h| {
            let l = parse_link(h, URI);
            assert!(l[0].title().unwrap().starts_with('\u{e4}'));
        },
    );
}

#[test]
fn link_target_of_dot_segments_is_linear() {
    assert_linear(
        "a target of ../",
        16 << 10,
        |n| one("link", repeat("<", "../", n / 3, "x>; rel=next")),
        |h| {
            assert_eq!(
                next_link(h, URI).as_deref(),
                Some("https://api.example.com/x")
            );
        },
    );
    assert_linear(
        "a target of a/../",
        16 << 10,
        |n| one("link", repeat("</", "a/../", n / 5, "x>; rel=next")),
        |h| {
            assert_eq!(
                next_link(h, URI).as_deref(),
                Some("https://api.example.com/x")
            );
        },
    );
}

#[test]
fn resolve_reference_dot_segments_is_linear() {
    assert_linear(
        "resolve ../ against a deep base",
        16 << 10,
        |n| {
            let base = String::from_utf8(repeat("https://h/", "a/", n / 2, "")).unwrap();
            let r = String::from_utf8(repeat("", "../", n / 2, "x")).unwrap();
            (base, r)
        },
        |(b, r)| {
            assert_eq!(resolve_reference(b, r), "https://h/x");
        },
    );
    assert_linear(
        "resolve a/./b/../ repeated",
        16 << 10,
        |n| String::from_utf8(repeat("/", "a/./b/../", n / 9, "x")).unwrap(),
        |r| {
            black_box(resolve_reference("https://h/", r));
        },
    );
}

#[test]
fn next_link_passing_over_other_resources_anchors_stays_bounded() {
    // Each next with an anchor of another resource costs a copy of the request URI; past the
    // documented budget next_link gives up with None.
    let long_uri = format!("https://api.example.com/{}", "p".repeat(100_000));
    let h = one(
        "link",
        repeat(
            "",
            "<https://x/n>; rel=next; anchor=\"https://other/\", ",
            10_000,
            "<https://x/real>; rel=next",
        ),
    );
    let t = tokio::time::Instant::now();
    assert_eq!(next_link(&h, &long_uri), None);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Below the budget the next of this page is found.
    let h = one(
        "link",
        repeat(
            "",
            "<https://x/n>; rel=next; anchor=\"https://other/\", ",
            10,
            "<https://x/real>; rel=next",
        ),
    );
    assert_eq!(next_link(&h, URI).as_deref(), Some("https://x/real"));
}

// ---- body buffering ----

#[tokio::test]
async fn buffer_limits_and_many_small_frames() {
    use futures_util::stream;
    use http_body_util::{Full, StreamBody};

    // Exactly the limit fits; one more byte does not; an empty body under limit 0.
    assert_eq!(
        buffer(Full::new(Bytes::from_static(b"abcd")), 4)
            .await
            .unwrap()
            .len(),
        4
    );
    let e = buffer(Full::new(Bytes::from_static(b"abcde")), 4)
        .await
        .unwrap_err();
    assert!(matches!(e, BodyError::TooLarge { limit: 4 }));
    assert!(e.is_too_large());
    assert!(
        e.to_string().contains('4'),
        "the message names the limit: {e}"
    );
    assert!(buffer(Full::new(Bytes::new()), 0).await.unwrap().is_empty());

    // A stream past the limit: reading stops there (no more frames are pulled).
    let pulled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = pulled.clone();
    let frames = stream::iter(0..1_000_000).map(move |_| {
        p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"x")))
    });
    use futures_util::StreamExt;
    let e = buffer(StreamBody::new(frames), 10).await.unwrap_err();
    assert!(e.is_too_large());
    assert!(pulled.load(std::sync::atomic::Ordering::SeqCst) <= 12);

    // 100,000 one-byte frames under the limit: linear.
    let run = |n: usize| async move {
        let frames = stream::iter(0..n)
            .map(|_| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"x"))));
        let t = tokio::time::Instant::now();
        let b = buffer(StreamBody::new(frames), usize::MAX).await.unwrap();
        assert_eq!(b.len(), n);
        t.elapsed()
    };
    let _ = run(6_250).await;
    let mut small = Duration::MAX;
    for _ in 0..5 {
        small = small.min(run(6_250).await);
    }
    let mut large = Duration::MAX;
    for _ in 0..3 {
        large = large.min(run(100_000).await);
    }
    let r = large.as_secs_f64() / small.as_secs_f64().max(2e-6);
    assert!(r < 64.0, "6250 frames {small:?}, 100000 frames {large:?}");
}

#[tokio::test]
async fn buffer_failing_stream_is_not_too_large() {
    use futures_util::stream;
    use http_body_util::StreamBody;
    let frames = stream::iter(vec![
        Ok(http_body::Frame::data(Bytes::from_static(b"ab"))),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "peer reset",
        )),
    ]);
    let e = buffer(StreamBody::new(frames), 1 << 20).await.unwrap_err();
    assert!(!e.is_too_large());
    assert!(
        std::error::Error::source(&e).is_some() || e.to_string().contains("reset"),
        "the body error names its cause: {e}"
    );
}
