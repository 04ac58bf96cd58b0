//! Every public vector of `../shared/vectors/STANDARDS.md` that sturdy-core's parsers read
//! (`Retry-After`, HTTP dates, `RateLimit`/`RateLimit-Policy`, `X-RateLimit-*`, RFC 8288 `Link`,
//! structured-field dates and strings), each checked against its expected result, plus the
//! hostile values a peer can send.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use sturdy::core::headers::sf::{parse_item, parse_list, BareItem};
use sturdy::core::headers::{
    format_http_date, may_pause, next_link, parse_http_date, parse_link, pause_hint,
    resolve_reference, PauseSource, RateLimitItem, RateLimitPolicy, RetryAfter, XRateLimit,
};

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn hdrs(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_bytes(v.as_bytes()).unwrap());
    }
    h
}

// ---- Retry-After (RFC 9110 §10.2.3, urllib3 test_retry.py) ----

#[test]
fn retry_after_urllib3_valid_seconds() {
    for (v, s) in [
        ("0", 0),
        ("1000", 1000),
        ("\t42 ", 42),
        ("120", 120),
        ("3600", 3600),
    ] {
        assert_eq!(
            RetryAfter::parse(v.as_bytes()).unwrap(),
            RetryAfter::Delay(Duration::from_secs(s)),
            "{v:?}"
        );
    }
}

#[test]
fn retry_after_urllib3_invalid_values_name_the_header() {
    for v in [
        &b"-1"[..],
        b"+1",
        b"1.0",
        b"\xb2",
        "²".as_bytes(),
        b"",
        b" ",
        b"1 2",
        b"0x10",
    ] {
        let err = RetryAfter::parse(v).expect_err(&format!("{v:?} must be rejected"));
        assert!(
            err.header().eq_ignore_ascii_case("retry-after"),
            "{v:?}: {}",
            err.header()
        );
        let msg = err.to_string();
        assert!(msg.to_ascii_lowercase().contains("retry-after"), "{msg}");
        assert!(
            !err.reason().is_empty(),
            "the reason must say what was wrong"
        );
    }
}

#[test]
fn retry_after_urllib3_sleep_vectors_with_fixed_now() {
    // now = 2019-06-03T11:00:00Z
    let now = at(1_559_559_600);
    let cases = [
        ("3600", 3600),
        ("Mon, 3 Jun 2019 12:00:00 UTC", 3600),
        ("Mon, 3 Jun 2019 11:00:00 UTC", 0),
        ("Mon, 03 Jun 2019 11:30:12 GMT", 1812),
        ("Monday, 03-Jun-19 11:30:12 GMT", 1812),
        ("Mon Jun  3 11:30:12 2019", 1812),
    ];
    for (v, secs) in cases {
        let ra = RetryAfter::parse(v.as_bytes()).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(ra.delay_from(now), Duration::from_secs(secs), "{v:?}");
    }
}

#[test]
fn retry_after_rfc9110_examples() {
    assert_eq!(
        RetryAfter::parse(b"Fri, 31 Dec 1999 23:59:59 GMT").unwrap(),
        RetryAfter::At(at(946_684_799))
    );
    // A date in the past means no wait.
    assert_eq!(
        RetryAfter::parse(b"Fri, 31 Dec 1999 23:59:59 GMT")
            .unwrap()
            .delay_from(at(1_700_000_000)),
        Duration::ZERO
    );
}

#[test]
fn retry_after_huge_seconds_saturate_and_never_panic() {
    let big = "9".repeat(400);
    let ra = RetryAfter::parse(big.as_bytes()).expect("too large saturates, not an error");
    let d = ra.delay_from(at(0));
    assert!(d >= Duration::from_secs(u64::MAX / 2), "{d:?}");
    // u64::MAX and one past it.
    for v in ["18446744073709551615", "18446744073709551616"] {
        let RetryAfter::Delay(d) = RetryAfter::parse(v.as_bytes()).unwrap() else {
            panic!("{v}: a delay")
        };
        assert!(d >= Duration::from_secs(u64::MAX / 2), "{v}: {d:?}");
    }
    // delay_from a far-future `now` and from the epoch.
    let _ = ra.delay_from(UNIX_EPOCH);
    let _ = RetryAfter::parse(b"Fri, 31 Dec 9999 23:59:59 GMT")
        .unwrap()
        .delay_from(UNIX_EPOCH);
}

#[test]
fn retry_after_from_headers_reads_first_and_ignores_garbage() {
    let h = hdrs(&[("retry-after", "7"), ("retry-after", "9")]);
    assert_eq!(
        RetryAfter::from_headers(&h),
        Some(RetryAfter::Delay(Duration::from_secs(7)))
    );
    let h = hdrs(&[("retry-after", "soon")]);
    assert_eq!(RetryAfter::from_headers(&h), None);
    assert_eq!(RetryAfter::from_headers(&HeaderMap::new()), None);
}

// ---- HTTP dates (RFC 9110 §5.6.7, RFC 8594, RFC 9745 draft) ----

#[test]
fn http_date_all_three_formats() {
    for v in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ] {
        assert_eq!(
            parse_http_date(v.as_bytes(), "Date").unwrap(),
            at(784_111_777),
            "{v}"
        );
    }
}

#[test]
fn http_date_sunset_example_with_wrong_day_name_is_accepted() {
    // RFC 8594's own example: 31 Dec 2018 was a Monday.
    assert_eq!(
        parse_http_date(b"Sat, 31 Dec 2018 23:59:59 GMT", "Sunset").unwrap(),
        at(1_546_300_799)
    );
    // RFC 9745 draft -09 prints "UTC".
    assert_eq!(
        parse_http_date(b"Sun, 30 Jun 2024 23:59:59 UTC", "Sunset").unwrap(),
        at(1_719_791_999)
    );
}

#[test]
fn http_date_errors_name_the_header_given() {
    for v in [
        &b""[..],
        b"hello",
        b"Fri, 31 Dec 1969 23:59:59 GMT",
        b"Sun, 32 Nov 1994 08:49:37 GMT",
        b"Sun, 06 Foo 1994 08:49:37 GMT",
        b"Sun, 06 Nov 1994 25:49:37 GMT",
        b"Sun, 06 Nov 1994 08:60:37 GMT",
        b"Sun, 06 Nov -1994 08:49:37 GMT",
        b"Sun, 06 Nov 99999999999999999999 08:49:37 GMT",
        b"Sun, 06 Nov 1994 08:49:37 GMT\xff",
        b"\xff\xfe\xfd",
        "Sun, 06 Nov 1994 08:49:37 GMT\u{00e9}".as_bytes(),
        b"Sun, \x00 Nov 1994 08:49:37 GMT",
    ] {
        let err = parse_http_date(v, "Sunset").expect_err(&format!("{v:?}"));
        assert_eq!(err.header(), "Sunset");
        assert!(err.to_string().contains("Sunset"), "{err}");
    }
}

#[test]
fn http_date_oldest_and_newest() {
    assert_eq!(
        parse_http_date(b"Thu, 01 Jan 1970 00:00:00 GMT", "Date").unwrap(),
        UNIX_EPOCH
    );
    assert_eq!(
        parse_http_date(b"Fri, 31 Dec 9999 23:59:59 GMT", "Date").unwrap(),
        at(253_402_300_799)
    );
    // Feb 29 of a leap year, of a non-leap century and of a leap century.
    assert_eq!(
        parse_http_date(b"Tue, 29 Feb 2000 00:00:00 GMT", "Date").unwrap(),
        at(951_782_400)
    );
    assert!(parse_http_date(b"Thu, 29 Feb 2100 00:00:00 GMT", "Date").is_err());
}

#[test]
fn format_http_date_round_trips_and_clamps() {
    assert_eq!(
        format_http_date(at(784_111_777)),
        "Sun, 06 Nov 1994 08:49:37 GMT"
    );
    assert_eq!(
        format_http_date(UNIX_EPOCH),
        "Thu, 01 Jan 1970 00:00:00 GMT"
    );
    // Before 1970 and after 9999: the nearest date the format can hold.
    assert_eq!(
        format_http_date(UNIX_EPOCH - Duration::from_secs(1)),
        "Thu, 01 Jan 1970 00:00:00 GMT"
    );
    assert_eq!(
        format_http_date(at(99_999_999_999_999)),
        "Fri, 31 Dec 9999 23:59:59 GMT"
    );
    for t in [0u64, 951_782_400, 1_546_300_799, 253_402_300_799] {
        let s = format_http_date(at(t));
        assert_eq!(parse_http_date(s.as_bytes(), "Date").unwrap(), at(t), "{s}");
    }
}

// ---- RateLimit / RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers-10) ----

#[test]
fn ratelimit_policy_draft_vectors() {
    let p = RateLimitPolicy::from_headers(&hdrs(&[(
        "ratelimit-policy",
        r#""burst";q=100;w=60,"daily";q=1000;w=86400"#,
    )]))
    .unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(
        (p[0].name.as_str(), p[0].quota, p[0].window),
        ("burst", 100, Some(Duration::from_secs(60)))
    );
    assert_eq!(
        (p[1].name.as_str(), p[1].quota, p[1].window),
        ("daily", 1000, Some(Duration::from_secs(86_400)))
    );
    assert_eq!(p[0].unit, "requests");

    let p =
        RateLimitPolicy::from_headers(&hdrs(&[("ratelimit-policy", r#""default";q=100;w=10"#)]))
            .unwrap();
    assert_eq!(
        (p[0].quota, p[0].window),
        (100, Some(Duration::from_secs(10)))
    );

    let p = RateLimitPolicy::from_headers(&hdrs(&[(
        "ratelimit-policy",
        r#""permin";q=50;w=60,"perhr";q=1000;w=3600"#,
    )]))
    .unwrap();
    assert_eq!(p.iter().map(|p| p.quota).collect::<Vec<_>>(), [50, 1000]);

    // Non-canonical pad bits: RFC 9651 §4.2.7 says parsers SHOULD NOT fail.
    let p = RateLimitPolicy::from_headers(&hdrs(&[(
        "ratelimit-policy",
        r#""peruser";q=100;w=60;pk=:cHsdsRa894==:"#,
    )]))
    .unwrap();
    assert_eq!(
        p[0].partition_key.as_deref(),
        Some(&[112u8, 123, 29, 177, 22, 188, 247][..])
    );
    let p = RateLimitPolicy::from_headers(&hdrs(&[(
        "ratelimit-policy",
        r#""peruser";q=65535;qu="content-bytes";w=10;pk=:sdfjLJUOUH==:"#,
    )]))
    .unwrap();
    assert_eq!(p[0].quota, 65535);
    assert_eq!(p[0].unit, "content-bytes");
    assert_eq!(
        p[0].partition_key.as_deref(),
        Some(&[177u8, 215, 227, 44, 149, 14, 80][..])
    );

    let p = RateLimitPolicy::from_headers(&hdrs(&[(
        "ratelimit-policy",
        r#""somepolicy";q=10000;w=1000"#,
    )]))
    .unwrap();
    assert_eq!(p[0].quota, 10000);
}

#[test]
fn ratelimit_draft_vectors() {
    let one = |v: &str| {
        let r = RateLimitItem::from_headers(&hdrs(&[("ratelimit", v)]))
            .unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(r.len(), 1, "{v}");
        r.into_iter().next().unwrap()
    };
    let r = one(r#""default";r=50;t=30"#);
    assert_eq!(
        (r.policy.as_str(), r.remaining, r.reset),
        ("default", 50, Some(Duration::from_secs(30)))
    );
    let r = one(r#""default";r=999;pk=:dHJpYWwxMjEzMjM=:"#);
    assert_eq!(
        (r.remaining, r.reset, r.partition_key.as_deref()),
        (999, None, Some(&b"trial121323"[..]))
    );
    let r = one(r#""default";r=300000000;t=60;pk=:QXBwLTk5OQ==:"#);
    assert_eq!(r.remaining, 300_000_000);
    assert_eq!(r.partition_key.as_deref(), Some(&b"App-999"[..]));
    let r = one(r#""default";r=0;t=50"#);
    assert_eq!((r.remaining, r.reset), (0, Some(Duration::from_secs(50))));
    let r = one(r#""problemPolicy";r=0;t=10"#);
    assert_eq!(r.policy, "problemPolicy");
    let r = one(r#""somepolicy";r=10000;t=10"#);
    assert_eq!(r.remaining, 10000);
    // The appendix's `q` on RateLimit is an unknown parameter: ignored.
    let r = one(r#""sliding";q=12;r=6;t=1"#);
    assert_eq!((r.remaining, r.reset), (6, Some(Duration::from_secs(1))));
    assert!(RateLimitItem::from_headers(&HeaderMap::new())
        .unwrap()
        .is_empty());
}

#[test]
fn ratelimit_split_over_field_lines_is_one_list() {
    let h = hdrs(&[
        ("ratelimit", r#""a";r=1;t=2"#),
        ("ratelimit", r#""b";r=3;t=4"#),
    ]);
    let r = RateLimitItem::from_headers(&h).unwrap();
    assert_eq!(
        r.iter().map(|i| i.policy.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
}

#[test]
fn ratelimit_malformed_is_an_error_naming_the_field() {
    for v in [
        r#""default";t=30"#,               // r is required
        r#""default";r=-1;t=30"#,          // non-negative
        r#""default";r=1;t=-5"#,           // non-negative
        r#""default";r=1.5"#,              // integer
        r#""default";r="1""#,              // integer
        r#""default";r=1;t=30,"#,          // trailing comma
        r#""default;r=1"#,                 // unterminated string
        r#""default";r=1000000000000000"#, // 16 digits
        "\"caf\u{00e9}\";r=1",             // non-ASCII in a string
    ] {
        let err = RateLimitItem::from_headers(&hdrs(&[("ratelimit", v)]))
            .expect_err(&format!("{v} must be rejected"));
        assert!(
            err.to_string().to_ascii_lowercase().contains("ratelimit"),
            "{v}: {err}"
        );
    }
    for v in [
        r#""default";w=10"#,      // q is required
        r#""default";q=-1"#,      // non-negative
        r#""default";q=10;w=0"#,  // w is non-zero
        r#""default";q=10;w=-3"#, // w is non-negative
    ] {
        let err = RateLimitPolicy::from_headers(&hdrs(&[("ratelimit-policy", v)]))
            .expect_err(&format!("{v} must be rejected"));
        assert!(
            err.to_string()
                .to_ascii_lowercase()
                .contains("ratelimit-policy"),
            "{v}: {err}"
        );
    }
}

#[test]
fn ratelimit_token_policy_name_is_malformed() {
    assert!(RateLimitItem::from_headers(&hdrs(&[("ratelimit", "default;r=1")])).is_err());
    assert!(RateLimitPolicy::from_headers(&hdrs(&[("ratelimit-policy", "default;q=1")])).is_err());
}

/// Answered: the rustdoc of `partition_key` says a `pk` of another type than the draft's Byte
/// Sequence is left out and the rest of the item kept (the quota it states is still worth
/// honouring), so the field is not refused as a whole.
#[test]
fn ratelimit_policy_pk_of_wrong_type_is_left_out() {
    let p = RateLimitPolicy::from_headers(&hdrs(&[("ratelimit-policy", r#""d";q=10;pk=abc"#)]))
        .expect("the item is kept");
    assert_eq!(p[0].partition_key, None);
    assert_eq!(p[0].quota, 10);
}

#[test]
fn pause_hint_retry_after_takes_precedence() {
    let now = at(1_700_000_000);
    let h = hdrs(&[("retry-after", "5"), ("ratelimit", r#""d";r=0;t=50"#)]);
    let p = pause_hint(StatusCode::TOO_MANY_REQUESTS, &h, now).unwrap();
    assert_eq!(
        (p.delay, p.source),
        (Duration::from_secs(5), PauseSource::RetryAfter)
    );
    // Without Retry-After: the longest RateLimit item with no quota left.
    let h = hdrs(&[("ratelimit", r#""a";r=0;t=5,"b";r=0;t=50,"c";r=3;t=500"#)]);
    let p = pause_hint(StatusCode::OK, &h, now).unwrap();
    assert_eq!(p.delay, Duration::from_secs(50));
    // A malformed RateLimit is ignored; X-RateLimit is next.
    let h = hdrs(&[
        ("ratelimit", r#""a";r=0;t="#),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "1700000060"),
    ]);
    let p = pause_hint(StatusCode::OK, &h, now).unwrap();
    assert_eq!(p.delay, Duration::from_secs(60));
}

// ---- X-RateLimit-* (GitHub REST docs) ----

#[test]
fn x_ratelimit_github_headers() {
    let now = at(1_700_000_000);
    let h = hdrs(&[
        ("x-ratelimit-limit", "5000"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-used", "5000"),
        ("x-ratelimit-reset", "1700000090"),
        ("x-ratelimit-resource", "core"),
    ]);
    let x = XRateLimit::from_headers(&h, now).unwrap();
    assert_eq!(x.limit, Some(5000));
    assert_eq!(x.remaining, Some(0));
    assert_eq!(x.reset, Some(Duration::from_secs(90)));
    // Milliseconds since the epoch, seconds to wait, decimal seconds, a date, the past.
    let reset = |v: &str| {
        XRateLimit::from_headers(
            &hdrs(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", v)]),
            now,
        )
        .and_then(|x| x.reset)
    };
    assert_eq!(reset("1700000090000"), Some(Duration::from_secs(90)));
    assert_eq!(reset("30"), Some(Duration::from_secs(30)));
    assert_eq!(reset("1.5"), Some(Duration::from_millis(1500)));
    assert_eq!(
        reset("Tue, 14 Nov 2023 22:13:27 GMT"),
        Some(Duration::from_secs(7))
    );
    assert_eq!(reset("1600000000"), Some(Duration::ZERO));
    // Garbage, negatives, overflow: ignored, never a panic.
    for v in [
        "-1",
        "abc",
        "1e400",
        "NaN",
        "inf",
        "99999999999999999999999999999999",
        "\u{0661}",
    ] {
        let _ = reset(v);
    }
    assert_eq!(
        XRateLimit::from_headers(&hdrs(&[("x-ratelimit-limit", "x")]), now),
        None
    );
}

// ---- RFC 8288 Link ----

const BASE: &str = "http://example.com/TheBook/chapter1";

#[test]
fn link_rfc8288_examples() {
    let l = parse_link(
        &hdrs(&[(
            "link",
            r#"<http://example.com/TheBook/chapter2>; rel="previous"; title="previous chapter""#,
        )]),
        BASE,
    );
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].target(), "http://example.com/TheBook/chapter2");
    assert_eq!(l[0].rel(), "previous");
    assert_eq!(l[0].title(), Some("previous chapter"));

    let l = parse_link(
        &hdrs(&[("link", r#"</>; rel="http://example.net/foo""#)]),
        BASE,
    );
    assert_eq!(l[0].target(), "http://example.com/");
    assert_eq!(l[0].rel(), "http://example.net/foo");

    let l = parse_link(
        &hdrs(&[("link", r##"</terms>; rel="copyright"; anchor="#foo""##)]),
        BASE,
    );
    assert_eq!(l[0].target(), "http://example.com/terms");
    assert_eq!(
        l[0].param("anchor"),
        Some("http://example.com/TheBook/chapter1#foo")
    );

    let l = parse_link(
        &hdrs(&[(
            "link",
            "</TheBook/chapter2>; rel=\"previous\"; title*=UTF-8'de'letztes%20Kapitel, </TheBook/chapter4>; rel=\"next\"; title*=UTF-8'de'n%c3%a4chstes%20Kapitel",
        )]),
        BASE,
    );
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].title(), Some("letztes Kapitel"));
    assert_eq!(l[1].title(), Some("n\u{e4}chstes Kapitel"));
    assert_eq!(l[1].target(), "http://example.com/TheBook/chapter4");

    let l = parse_link(
        &hdrs(&[(
            "link",
            r#"<http://example.org/>; rel="start http://example.net/relation/other""#,
        )]),
        BASE,
    );
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].rel(), "start");
    assert_eq!(l[1].rel(), "http://example.net/relation/other");
    assert_eq!(l[0].target(), l[1].target());

    let one = parse_link(
        &hdrs(&[(
            "link",
            r#"<https://example.org/>; rel="start", <https://example.org/index>; rel="index""#,
        )]),
        BASE,
    );
    let two = parse_link(
        &hdrs(&[
            ("link", r#"<https://example.org/>; rel="start""#),
            ("link", r#"<https://example.org/index>; rel="index""#),
        ]),
        BASE,
    );
    let pairs = |v: &[sturdy::core::headers::Link]| {
        v.iter()
            .map(|l| (l.target().to_owned(), l.rel().to_owned()))
            .collect::<Vec<_>>()
    };
    assert_eq!(pairs(&one), pairs(&two));
    assert_eq!(one.len(), 2);
}

#[test]
fn link_rules_of_section_3() {
    // x=y and x="y" are equivalent; rel types are lowercased; a repeated rel keeps its first.
    let l = parse_link(
        &hdrs(&[(
            "link",
            "<a>; rel=NEXT; rel=prev; type=text/html; type=\"x/y\"",
        )]),
        BASE,
    );
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].rel(), "next");
    assert_eq!(l[0].param("type"), Some("text/html"));
    assert_eq!(l[0].target(), "http://example.com/TheBook/a");
    // title* wins over title, in either order.
    let l = parse_link(
        &hdrs(&[("link", "<a>; rel=x; title*=UTF-8''b%20c; title=plain")]),
        BASE,
    );
    assert_eq!(l[0].title(), Some("b c"));
    // rel is required.
    assert!(parse_link(&hdrs(&[("link", "<a>; title=x")]), BASE).is_empty());
    // A malformed link ends its line, the links before it are kept, the next line is parsed.
    let l = parse_link(
        &hdrs(&[
            ("link", "<a>; rel=one, b; rel=two, <c>; rel=three"),
            ("link", "<d>; rel=four"),
        ]),
        BASE,
    );
    assert_eq!(
        l.iter().map(|l| l.rel().to_owned()).collect::<Vec<_>>(),
        ["one", "four"]
    );
    // Empty list elements are skipped.
    let l = parse_link(&hdrs(&[("link", ",, <a>; rel=x ,,, <b>; rel=y,")]), BASE);
    assert_eq!(l.len(), 2);
}

#[test]
fn link_meziantou_quoted_comma_semicolon_and_bws() {
    let raw = "<sample>; rel=abc, <plop>; rel\t=\"d\\\"e;f,\"; title = test title; abc";
    let l = parse_link(&hdrs(&[("link", raw)]), "http://example.com/dir/page");
    assert_eq!(
        l.len(),
        2,
        "{l:?}",
        l = l.iter().map(|l| l.rel()).collect::<Vec<_>>()
    );
    assert_eq!(l[0].target(), "http://example.com/dir/sample");
    assert_eq!(l[0].rel(), "abc");
    assert_eq!(l[1].target(), "http://example.com/dir/plop");
    assert_eq!(l[1].rel(), "d\"e;f,");
    assert_eq!(l[1].param("title"), Some("test title"));
    assert_eq!(l[1].param("abc"), Some(""));
    assert_eq!(l[1].param("unknown"), None);
}

#[test]
fn link_github_pagination() {
    let h = hdrs(&[(
        "link",
        r#"<https://api.github.com/repositories/1300192/issues?page=2>; rel="prev", <https://api.github.com/repositories/1300192/issues?page=4>; rel="next", <https://api.github.com/repositories/1300192/issues?page=515>; rel="last", <https://api.github.com/repositories/1300192/issues?page=1>; rel="first""#,
    )]);
    let uri = "https://api.github.com/repositories/1300192/issues?page=3";
    assert_eq!(
        next_link(&h, uri).as_deref(),
        Some("https://api.github.com/repositories/1300192/issues?page=4")
    );
    assert_eq!(parse_link(&h, uri).len(), 4);
    let h = hdrs(&[(
        "link",
        r#"<https://api.github.com/repositories/1300192/issues?per_page=2&page=2>; rel="next", <https://api.github.com/repositories/1300192/issues?per_page=2&page=7715>; rel="last""#,
    )]);
    assert_eq!(
        next_link(&h, uri).as_deref(),
        Some("https://api.github.com/repositories/1300192/issues?per_page=2&page=2")
    );
    // The last page: no next.
    let h = hdrs(&[("link", r#"<https://x/?page=1>; rel="first""#)]);
    assert_eq!(next_link(&h, uri), None);
}

#[test]
fn link_next_with_anchor_of_another_resource_is_passed_over() {
    let h = hdrs(&[(
        "link",
        r#"<https://x/other-next>; rel=next; anchor="https://elsewhere/", <https://x/p2>; rel=next"#,
    )]);
    assert_eq!(
        next_link(&h, "https://x/p1").as_deref(),
        Some("https://x/p2")
    );
    // An anchor naming the page itself (case of scheme and host, default port) is followed.
    let h = hdrs(&[(
        "link",
        r#"<https://x/p2>; rel=next; anchor="HTTPS://X:443/p1""#,
    )]);
    assert_eq!(
        next_link(&h, "https://x/p1").as_deref(),
        Some("https://x/p2")
    );
}

#[test]
fn link_non_utf8_bytes_are_percent_encoded() {
    let mut h = HeaderMap::new();
    h.insert(
        "link",
        HeaderValue::from_bytes(b"</caf\xe9>; rel=next").unwrap(),
    );
    let got = next_link(&h, "https://x/p1").unwrap();
    assert!(
        got.eq_ignore_ascii_case("https://x/caf%E9"),
        "a non-UTF-8 byte reads as its percent-encoded form: {got}"
    );
}

// ---- Structured fields (httpwg/structured-field-tests) ----

#[test]
fn sf_date_vectors() {
    for (v, n) in [
        ("@0", 0i64),
        ("@1659578233", 1_659_578_233),
        ("@-1659578233", -1_659_578_233),
        ("@2147483648", 2_147_483_648),
        ("@4294967296", 4_294_967_296),
        ("@253402214400", 253_402_214_400),
        ("@-62135596800", -62_135_596_800),
        ("@-0", 0),
        ("@1688169599", 1_688_169_599),
    ] {
        let (item, params) = parse_item(v.as_bytes()).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(item, BareItem::Date(n), "{v}");
        assert!(params.is_empty());
    }
    for v in [
        "@1659578233.12",
        "@1000000000000000",
        "@-1000000000000000",
        "@",
        "@-",
        "@ 12345678",
        "@abc",
    ] {
        assert!(parse_item(v.as_bytes()).is_err(), "{v} must fail");
    }
    // can_fail: accept or reject, never panic.
    let _ = parse_item(b"@999999999999999");
    let _ = parse_item(b"@-999999999999999");
}

#[test]
fn sf_string_vectors() {
    let (item, _) = parse_item(br#""foo \"bar\" \\ baz""#).unwrap();
    assert_eq!(item, BareItem::String(r#"foo "bar" \ baz"#.into()));
    for v in [
        "\"f\u{fc}\u{fc}\"".as_bytes(),
        b"\"foo\tbar\"",
        b"\"foo\nbar\"",
        b"'foo'",
        b"\"foo",
        br#""foo \,""#,
    ] {
        assert!(
            parse_item(v).is_err(),
            "{:?} must fail",
            String::from_utf8_lossy(v)
        );
    }
    // Idempotency-Key examples from the IETF draft.
    let (item, _) = parse_item(br#""8e03978e-40d5-43e8-bc93-6894a57f9324""#).unwrap();
    assert_eq!(item.as_str(), Some("8e03978e-40d5-43e8-bc93-6894a57f9324"));
}

#[test]
fn sf_integers_and_params_edges() {
    assert_eq!(
        parse_item(b"999999999999999").unwrap().0,
        BareItem::Integer(999_999_999_999_999)
    );
    assert_eq!(
        parse_item(b"-999999999999999").unwrap().0,
        BareItem::Integer(-999_999_999_999_999)
    );
    assert!(parse_item(b"1000000000000000").is_err());
    assert!(parse_item(b"-").is_err());
    // Repeated parameter key keeps its last value (RFC 9651 §4.2.3.2), in first position.
    let (_, p) = parse_item(b"a;x=1;y=2;x=3").unwrap();
    let x: Vec<_> = p.iter().filter(|(k, _)| k == "x").collect();
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].1, BareItem::Integer(3));
    // Lists: empty list of zero lines, trailing comma is an error.
    assert!(parse_list(std::iter::empty()).unwrap().is_empty());
    assert!(parse_list([&b"a, b,"[..]]).is_err());
    assert_eq!(parse_list([&b"a"[..], b"b"]).unwrap().len(), 2);
}

// ---- RFC 3986 §5.4 reference resolution examples ----

#[test]
fn resolve_reference_rfc3986_examples() {
    let base = "http://a/b/c/d;p?q";
    for (r, want) in [
        ("g:h", "g:h"),
        ("g", "http://a/b/c/g"),
        ("./g", "http://a/b/c/g"),
        ("g/", "http://a/b/c/g/"),
        ("/g", "http://a/g"),
        ("//g", "http://g"),
        ("?y", "http://a/b/c/d;p?y"),
        ("g?y", "http://a/b/c/g?y"),
        ("#s", "http://a/b/c/d;p?q#s"),
        ("g#s", "http://a/b/c/g#s"),
        ("g?y#s", "http://a/b/c/g?y#s"),
        (";x", "http://a/b/c/;x"),
        ("g;x", "http://a/b/c/g;x"),
        ("g;x?y#s", "http://a/b/c/g;x?y#s"),
        ("", "http://a/b/c/d;p?q"),
        (".", "http://a/b/c/"),
        ("./", "http://a/b/c/"),
        ("..", "http://a/b/"),
        ("../", "http://a/b/"),
        ("../g", "http://a/b/g"),
        ("../..", "http://a/"),
        ("../../", "http://a/"),
        ("../../g", "http://a/g"),
        // Abnormal examples (§5.4.2).
        ("../../../g", "http://a/g"),
        ("../../../../g", "http://a/g"),
        ("/./g", "http://a/g"),
        ("/../g", "http://a/g"),
        ("g.", "http://a/b/c/g."),
        (".g", "http://a/b/c/.g"),
        ("g..", "http://a/b/c/g.."),
        ("..g", "http://a/b/c/..g"),
        ("./../g", "http://a/b/g"),
        ("./g/.", "http://a/b/c/g/"),
        ("g/./h", "http://a/b/c/g/h"),
        ("g/../h", "http://a/b/c/h"),
        ("g;x=1/./y", "http://a/b/c/g;x=1/y"),
        ("g;x=1/../y", "http://a/b/c/y"),
        ("g?y/./x", "http://a/b/c/g?y/./x"),
        ("g?y/../x", "http://a/b/c/g?y/../x"),
        ("g#s/./x", "http://a/b/c/g#s/./x"),
        ("g#s/../x", "http://a/b/c/g#s/../x"),
        ("http:g", "http:g"),
    ] {
        assert_eq!(resolve_reference(base, r), want, "{r:?}");
    }
}

#[test]
fn pause_hint_only_on_429_503_for_retry_after_and_may_pause_agrees() {
    let now = at(1_700_000_000);
    let h = hdrs(&[("retry-after", "5")]);
    assert_eq!(pause_hint(StatusCode::OK, &h, now), None);
    assert!(pause_hint(StatusCode::SERVICE_UNAVAILABLE, &h, now).is_some());
    // Every spelling a pause can come from is seen by the cheap check.
    for h in [
        hdrs(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "30")]),
        hdrs(&[
            ("x-rate-limit-remaining", "0"),
            ("x-rate-limit-reset", "30"),
        ]),
        hdrs(&[("ratelimit-remaining", "0"), ("ratelimit-reset", "30")]),
        hdrs(&[("ratelimit", r#""d";r=0;t=30"#)]),
    ] {
        let p = pause_hint(StatusCode::OK, &h, now);
        assert_eq!(p.map(|p| p.delay), Some(Duration::from_secs(30)), "{h:?}");
        assert!(may_pause(StatusCode::OK, &h), "{h:?}");
    }
    // Remaining above zero: no pause.
    let h = hdrs(&[("x-ratelimit-remaining", "1"), ("x-ratelimit-reset", "30")]);
    assert_eq!(pause_hint(StatusCode::OK, &h, now), None);
    // A negative remaining is unparseable: ignored.
    let h = hdrs(&[("x-ratelimit-remaining", "-1"), ("x-ratelimit-reset", "30")]);
    assert_eq!(pause_hint(StatusCode::OK, &h, now), None);
}

#[test]
fn link_param_names_are_lowercased() {
    let h = hdrs(&[("link", "<https://x/2>; REL=Next; TITLE=\"T\"")]);
    let l = parse_link(&h, "https://x/1");
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].rel(), "next");
    assert_eq!(l[0].param("title"), Some("T"));
    assert_eq!(next_link(&h, "https://x/1").as_deref(), Some("https://x/2"));
}

#[test]
fn trace_is_shared_by_clones_and_found_in_extensions() {
    use sturdy::core::{Trace, TraceEvent};
    let t = Trace::new();
    let mut req = http::Request::new(());
    req.extensions_mut().insert(t.clone());
    let found = Trace::of(&req).expect("the trace put in the extensions");
    found.record(TraceEvent::IdempotencyKey("k".into()));
    assert_eq!(t.events().len(), 1);
    assert!(Trace::of(&http::Request::new(())).is_none());
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Trace>();
}

#[test]
fn keyed_map_is_bounded_and_overflow_is_shared() {
    use sturdy::core::keyed::{Idle, KeyedMap, OVERFLOW_KEY};
    struct Busy;
    impl Idle for Busy {
        fn is_idle(&self) -> bool {
            false
        }
    }
    let m = KeyedMap::<Busy>::new(0);
    let a = m.get_or_insert_with("a", || Busy);
    assert_eq!(a.key(), "a");
    let b = m.get_or_insert_with("b", || Busy);
    assert_eq!(
        b.key(),
        OVERFLOW_KEY,
        "past a bound of 1, keys share the overflow"
    );
    for i in 0..10_000 {
        let _ = m.get_or_insert_with(&format!("k{i}"), || Busy);
    }
    assert!(m.len() <= 2, "{}", m.len());
    // An own slot can be made past the bound, and only by that call.
    let own = m.get_or_insert_own("forced", || Busy);
    assert_eq!(own.key(), "forced");
    assert_eq!(
        m.find_serving("zzz").map(|s| s.key().to_owned()).as_deref(),
        Some("*")
    );

    struct Quiet;
    impl Idle for Quiet {
        fn is_idle(&self) -> bool {
            true
        }
    }
    let m = KeyedMap::<Quiet>::new(3);
    for i in 0..1_000 {
        let s = m.get_or_insert_with(&format!("k{i}"), || Quiet);
        assert_eq!(
            s.key(),
            format!("k{i}"),
            "idle keys are forgotten, not overflowed"
        );
    }
    assert!(m.len() <= 3);
}
