//! The public vectors in shared/vectors/STANDARDS.md, as they are (section numbers cited).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sturdy_core::headers::{
    next_link, parse_link, pause_hint, sf, PauseSource, RateLimitItem, RateLimitPolicy, RetryAfter,
};

fn headers(name: &str, values: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

// ===== 5.1 RateLimit / RateLimit-Policy (draft -10) =====

#[test]
fn ratelimit_policy_vectors() {
    let p = RateLimitPolicy::from_headers(&headers(
        "RateLimit-Policy",
        &[r#""burst";q=100;w=60,"daily";q=1000;w=86400"#],
    ))
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

    for v in [
        r#""default";q=100;w=10"#,
        r#""permin";q=50;w=60,"perhr";q=1000;w=3600"#,
        r#""somepolicy";q=10000;w=1000"#,
    ] {
        assert!(
            !RateLimitPolicy::from_headers(&headers("RateLimit-Policy", &[v]))
                .unwrap()
                .is_empty(),
            "{v}"
        );
    }
    let p = RateLimitPolicy::from_headers(&headers(
        "RateLimit-Policy",
        &[r#""peruser";q=100;w=60;pk=:cHsdsRa894==:"#],
    ))
    .unwrap();
    assert_eq!(
        p[0].partition_key.as_ref().map(Vec::len),
        Some(7),
        "non-canonical pad bits are accepted"
    );
    let p = RateLimitPolicy::from_headers(&headers(
        "RateLimit-Policy",
        &[r#""peruser";q=65535;qu="content-bytes";w=10;pk=:sdfjLJUOUH==:"#],
    ))
    .unwrap();
    assert_eq!((p[0].quota, p[0].unit.as_str()), (65_535, "content-bytes"));
    assert_eq!(p[0].partition_key.as_ref().map(Vec::len), Some(7));
}

#[test]
fn ratelimit_vectors() {
    let cases: [(&str, &str, u64, Option<u64>, Option<&[u8]>); 6] = [
        (r#""default";r=50;t=30"#, "default", 50, Some(30), None),
        (
            r#""default";r=999;pk=:dHJpYWwxMjEzMjM=:"#,
            "default",
            999,
            None,
            Some(b"trial121323"),
        ),
        (
            r#""default";r=300000000;t=60;pk=:QXBwLTk5OQ==:"#,
            "default",
            300_000_000,
            Some(60),
            Some(b"App-999"),
        ),
        (r#""default";r=0;t=50"#, "default", 0, Some(50), None),
        (
            r#""problemPolicy";r=0;t=10"#,
            "problemPolicy",
            0,
            Some(10),
            None,
        ),
        (
            r#""somepolicy";r=10000;t=10"#,
            "somepolicy",
            10_000,
            Some(10),
            None,
        ),
    ];
    for (v, policy, r, t, pk) in cases {
        let items = RateLimitItem::from_headers(&headers("RateLimit", &[v])).unwrap();
        assert_eq!(items.len(), 1, "{v}");
        let i = &items[0];
        assert_eq!(i.policy, policy);
        assert_eq!(i.remaining, r);
        assert_eq!(i.reset, t.map(Duration::from_secs));
        assert_eq!(i.partition_key.as_deref(), pk);
    }
    // The appendix's q on RateLimit is an unknown parameter: ignored.
    let items =
        RateLimitItem::from_headers(&headers("RateLimit", &[r#""sliding";q=12;r=6;t=1"#])).unwrap();
    assert_eq!(items[0].remaining, 6);
    // Split across field lines.
    let items =
        RateLimitItem::from_headers(&headers("RateLimit", &[r#""a";r=1"#, r#""b";r=0;t=9"#]))
            .unwrap();
    assert_eq!(items.len(), 2);
    // Malformed => error (the client ignores the field).
    for bad in ["default;r=1", r#""d";t=5"#, r#""d";r=-1"#, r#""d";r=1,"#] {
        assert!(
            RateLimitItem::from_headers(&headers("RateLimit", &[bad])).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn ratelimit_pause_even_on_301() {
    let h = headers("RateLimit", &[r#""problemPolicy";r=0;t=10"#]);
    let hint = pause_hint(StatusCode::MOVED_PERMANENTLY, &h, SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(
        (hint.delay, hint.source),
        (Duration::from_secs(10), PauseSource::RateLimit)
    );
}

#[test]
fn github_x_ratelimit() {
    // 5.2: x-ratelimit-reset is UTC epoch seconds.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_372_700_000);
    let mut h = headers("x-ratelimit-remaining", &["0"]);
    h.insert("x-ratelimit-reset", HeaderValue::from_static("1372700873"));
    h.insert("x-ratelimit-limit", HeaderValue::from_static("5000"));
    let hint = pause_hint(StatusCode::FORBIDDEN, &h, now).unwrap();
    assert_eq!(
        (hint.delay, hint.source),
        (Duration::from_secs(873), PauseSource::XRateLimit)
    );
}

// ===== 6 Retry-After =====

#[test]
fn retry_after_vectors() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_559_559_600); // 2019-06-03T11:00:00Z
    for (v, secs) in [
        ("0", 0),
        ("1000", 1000),
        ("\t42 ", 42),
        ("120", 120),
        ("3600", 3600),
    ] {
        assert_eq!(
            RetryAfter::parse(v.as_bytes()).unwrap().delay_from(now),
            Duration::from_secs(secs),
            "{v:?}"
        );
    }
    for v in ["-1", "+1", "1.0", "\u{b2}"] {
        assert!(RetryAfter::parse(v.as_bytes()).is_err(), "{v:?}");
    }
    for (v, secs) in [
        ("Mon, 3 Jun 2019 12:00:00 UTC", 3600),
        ("Mon, 3 Jun 2019 11:00:00 UTC", 0),
        ("Mon, 03 Jun 2019 11:30:12 GMT", 1812),
        ("Monday, 03-Jun-19 11:30:12 GMT", 1812),
        ("Mon Jun  3 11:30:12 2019", 1812),
    ] {
        assert_eq!(
            RetryAfter::parse(v.as_bytes()).unwrap().delay_from(now),
            Duration::from_secs(secs),
            "{v}"
        );
    }
    // RFC 9110's examples.
    assert!(matches!(
        RetryAfter::parse(b"Fri, 31 Dec 1999 23:59:59 GMT"),
        Ok(RetryAfter::At(_))
    ));
    assert_eq!(
        RetryAfter::parse(b"120").unwrap(),
        RetryAfter::Delay(Duration::from_secs(120))
    );
}

// ===== 7 Link =====

const BASE: &str = "http://example.com/TheBook/chapter3";

#[test]
fn rfc8288_examples() {
    let l = parse_link(
        &headers(
            "link",
            &[r#"<http://example.com/TheBook/chapter2>; rel="previous"; title="previous chapter""#],
        ),
        BASE,
    );
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].target(), "http://example.com/TheBook/chapter2");
    assert_eq!(l[0].rel(), "previous");
    assert_eq!(l[0].title(), Some("previous chapter"));

    let l = parse_link(
        &headers("link", &[r#"</>; rel="http://example.net/foo""#]),
        BASE,
    );
    assert_eq!(
        (l[0].target(), l[0].rel()),
        ("http://example.com/", "http://example.net/foo")
    );

    let l = parse_link(
        &headers("link", &[r##"</terms>; rel="copyright"; anchor="#foo""##]),
        BASE,
    );
    assert_eq!(l[0].target(), "http://example.com/terms");
    assert_eq!(
        l[0].param("anchor"),
        Some("http://example.com/TheBook/chapter3#foo")
    );

    let l = parse_link(
        &headers(
            "link",
            &[
                r#"</TheBook/chapter2>; rel="previous"; title*=UTF-8'de'letztes%20Kapitel, </TheBook/chapter4>; rel="next"; title*=UTF-8'de'n%c3%a4chstes%20Kapitel"#,
            ],
        ),
        BASE,
    );
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].title(), Some("letztes Kapitel"));
    assert_eq!(l[1].title(), Some("n\u{e4}chstes Kapitel"));
    assert_eq!(l[1].target(), "http://example.com/TheBook/chapter4");

    let l = parse_link(
        &headers(
            "link",
            &[r#"<http://example.org/>; rel="start http://example.net/relation/other""#],
        ),
        BASE,
    );
    assert_eq!(l.len(), 2);
    assert_eq!(
        (l[0].rel(), l[1].rel()),
        ("start", "http://example.net/relation/other")
    );
    assert_eq!(l[0].target(), l[1].target());

    let one = parse_link(
        &headers(
            "link",
            &[r#"<https://example.org/>; rel="start", <https://example.org/index>; rel="index""#],
        ),
        BASE,
    );
    let two = parse_link(
        &headers(
            "link",
            &[
                r#"<https://example.org/>; rel="start""#,
                r#"<https://example.org/index>; rel="index""#,
            ],
        ),
        BASE,
    );
    assert_eq!(one, two);
    assert_eq!(one.len(), 2);
}

#[test]
fn github_pagination() {
    let h = headers(
        "link",
        &[
            r#"<https://api.github.com/repositories/1300192/issues?page=2>; rel="prev", <https://api.github.com/repositories/1300192/issues?page=4>; rel="next", <https://api.github.com/repositories/1300192/issues?page=515>; rel="last", <https://api.github.com/repositories/1300192/issues?page=1>; rel="first""#,
        ],
    );
    assert_eq!(parse_link(&h, BASE).len(), 4);
    assert_eq!(
        next_link(&h, BASE).as_deref(),
        Some("https://api.github.com/repositories/1300192/issues?page=4")
    );
    let h = headers(
        "link",
        &[
            r#"<https://api.github.com/repositories/1300192/issues?per_page=2&page=2>; rel="next", <https://api.github.com/repositories/1300192/issues?per_page=2&page=7715>; rel="last""#,
        ],
    );
    assert_eq!(
        next_link(&h, BASE).as_deref(),
        Some("https://api.github.com/repositories/1300192/issues?per_page=2&page=2")
    );
}

#[test]
fn quoted_comma_semicolon_and_bws() {
    let h = headers(
        "link",
        &["<sample>; rel=abc, <plop>; rel\t=\"d\\\"e;f,\"; title = test title; abc"],
    );
    let l = parse_link(&h, "http://h/dir/page");
    assert_eq!(l.len(), 2);
    assert_eq!((l[0].target(), l[0].rel()), ("http://h/dir/sample", "abc"));
    assert_eq!(l[1].target(), "http://h/dir/plop");
    assert_eq!(l[1].rel(), "d\"e;f,");
    assert_eq!(l[1].param("title"), Some("test title"));
    assert_eq!(l[1].param("abc"), Some(""));
    assert_eq!(l[1].param("unknown"), None);
}

#[test]
fn repeated_rel_keeps_first_and_no_rel_is_dropped() {
    let l = parse_link(
        &headers("link", &[r#"<a>; rel=next; rel=prev, <b>; title=x"#]),
        "http://h/",
    );
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].rel(), "next");
}

// ===== 8 Deprecation / structured-field dates =====

#[test]
fn deprecation_date() {
    assert_eq!(
        sf::parse_item(b"@1688169599").unwrap().0,
        sf::BareItem::Date(1_688_169_599)
    );
}
