//! Hostile peer values in the headers sturdy reads (time cost of 64 KiB values, extreme numbers,
//! the public vectors), and configuration edge values (zero, `Duration::MAX`, `u32::MAX`, empty
//! strings) that must neither panic nor overflow.
#![cfg(feature = "full")]
// Cost checks time real work and webhook timestamps are wall-clock seconds.
#![allow(clippy::disallowed_methods)]

use crate::outsider_common;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::headers::{
    next_link, parse_http_date, parse_link, pause_hint, resolve_reference, RetryAfter, XRateLimit,
    MAX_LINKS,
};
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::version::VersionLayer;
use sturdy::webhook::{
    sign_standard, sign_stripe, MemoryQueue, StandardWebhooks, Stripe, WebhookReceiver,
};
use tokio::time::timeout;
use tower::{Layer, ServiceExt};

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(30);

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// Runs `f` over `small` and `big` (four times as long) and returns both times, best of three.
fn cost(small: &str, big: &str, f: impl Fn(&str)) -> (Duration, Duration) {
    let time = |s: &str| {
        (0..3)
            .map(|_| {
                let t = StdInstant::now();
                f(s);
                t.elapsed()
            })
            .min()
            .unwrap()
    };
    (time(small), time(big))
}

fn assert_linear(what: &str, small: &str, big: &str, f: impl Fn(&str)) {
    let (a, b) = cost(small, big, f);
    assert!(
        b < Duration::from_millis(200),
        "{what}: {} bytes took {b:?}",
        big.len()
    );
    // Four times the input: allow up to ten times the time (noise), not the sixteen of a
    // quadratic parser.
    assert!(
        b <= a * 10 + Duration::from_millis(5),
        "{what}: {} bytes took {a:?}, {} bytes took {b:?}",
        small.len(),
        big.len()
    );
}

/// sturdy-core rustdoc, `RetryAfter::parse`: "delay-seconds is `1*DIGIT` with optional white
/// space around it; a value too large for a `Duration` saturates. Negative (`-1`), signed
/// (`+1`), fractional (`1.0`) and non-ASCII digits are errors." The urllib3 vectors as they are.
#[test]
fn retry_after_urllib3_vectors_and_a_64_kib_number() {
    let now = UNIX_EPOCH + Duration::from_secs(1_559_559_600); // 2019-06-03T11:00:00Z
    for (v, secs) in [("0", 0), ("1000", 1000), ("\t42 ", 42)] {
        let d = RetryAfter::parse(v.as_bytes()).unwrap().delay_from(now);
        assert_eq!(d, Duration::from_secs(secs), "{v:?}");
    }
    for v in [&b"-1"[..], b"+1", b"1.0", b"\xb2", b"", b" ", b"1 2"] {
        let r = RetryAfter::parse(v);
        assert!(r.is_err(), "{v:?} parsed as {r:?}");
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.to_ascii_lowercase().contains("retry-after"),
            "the error does not name the header: {msg}"
        );
    }
    let digits = "9".repeat(64 * 1024);
    let t = StdInstant::now();
    let d = RetryAfter::parse(digits.as_bytes())
        .expect("a huge number saturates")
        .delay_from(now);
    assert!(t.elapsed() < Duration::from_millis(100));
    assert!(d >= Duration::from_secs(u64::from(u32::MAX)), "{d:?}");
}

/// docs STANDARDS 6.1 (urllib3 vectors, `now = 2019-06-03T11:00:00Z`): the three HTTP-date
/// forms RFC 9110 says recipients "MUST accept" each ask for 1812 s; a date equal to now asks for
/// none. sturdy-core: "a date in the past means no wait."
#[test]
fn retry_after_dates_in_all_three_forms_and_extremes() {
    let now = UNIX_EPOCH + Duration::from_secs(1_559_559_600);
    for v in [
        "Mon, 03 Jun 2019 11:30:12 GMT",
        "Monday, 03-Jun-19 11:30:12 GMT",
        "Mon Jun  3 11:30:12 2019",
    ] {
        let d = RetryAfter::parse(v.as_bytes()).unwrap().delay_from(now);
        assert_eq!(d, Duration::from_secs(1812), "{v}");
    }
    let d = RetryAfter::parse(b"Mon, 03 Jun 2019 11:00:00 GMT")
        .unwrap()
        .delay_from(now);
    assert_eq!(d, Duration::ZERO);
    // The oldest and newest dates a peer can write: no panic, past means no wait.
    for v in [
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Sun, 31 Dec 99999 23:59:59 GMT",
        "Mon, 32 Jan 2019 00:00:00 GMT",
        "Mon, 03 Jun 2019 24:00:60 GMT",
    ] {
        if let Ok(r) = RetryAfter::parse(v.as_bytes()) {
            let _ = r.delay_from(now);
            let _ = r.delay_from(UNIX_EPOCH);
            let _ = r.delay_from(UNIX_EPOCH + Duration::from_secs(u64::from(u32::MAX) * 64));
        }
        let _ = parse_http_date(v.as_bytes(), "sunset");
    }
    assert_eq!(
        RetryAfter::parse(b"Thu, 01 Jan 1970 00:00:00 GMT")
            .unwrap()
            .delay_from(now),
        Duration::ZERO
    );
}

/// docs/RELIABILITY.md: "a 200 KiB `RateLimit` (client) ... header of distinct parameter names"
/// now costs "linear: a few milliseconds". Other 64 KiB shapes: many list members, one long
/// string, deep inner lists, a long token, many `X-RateLimit-*` lines.
#[test]
fn sixty_four_kib_rate_limit_headers_cost_linear_time() {
    let now = SystemTime::now();
    let shapes: Vec<(&str, Box<dyn Fn(usize) -> String>)> = vec![
        (
            "members",
            Box::new(|n| {
                let mut s = String::new();
                while s.len() < n {
                    s.push_str(&format!("\"p{}\";r=0;t=1, ", s.len()));
                }
                s.trim_end_matches([',', ' ']).to_owned()
            }),
        ),
        (
            "params",
            Box::new(|n| {
                let mut s = String::from("\"p\";r=0");
                while s.len() < n {
                    s.push_str(&format!(";k{}=1", s.len()));
                }
                s
            }),
        ),
        (
            "long string",
            Box::new(|n| format!("\"{}\";r=0;t=1", "a".repeat(n))),
        ),
        ("inner lists", Box::new(|n| "(".repeat(n))),
        (
            "inner list items",
            Box::new(|n| format!("({});r=0;t=1", "a ".repeat(n / 2))),
        ),
        (
            "duplicate r",
            Box::new(|n| format!("\"p\"{}", ";r=0".repeat(n / 4))),
        ),
    ];
    for (name, make) in &shapes {
        let small = make(16 * 1024);
        let big = make(64 * 1024);
        for header in ["ratelimit", "ratelimit-policy"] {
            assert_linear(&format!("{header} {name}"), &small, &big, |v| {
                let h = headers(&[(header, v)]);
                let _ = pause_hint(StatusCode::TOO_MANY_REQUESTS, &h, now);
            });
        }
    }
    // Many field lines of X-RateLimit-*.
    let lines = |n: usize| {
        let mut h = HeaderMap::new();
        for i in 0..n {
            h.append("x-ratelimit-remaining", HeaderValue::from(i % 2));
            h.append("x-ratelimit-reset", HeaderValue::from(i));
        }
        h
    };
    let (small, big) = (lines(1000), lines(4000));
    let t = StdInstant::now();
    let _ = XRateLimit::from_headers(&small, now);
    let a = t.elapsed();
    let t = StdInstant::now();
    let _ = XRateLimit::from_headers(&big, now);
    let b = t.elapsed();
    assert!(b <= a * 10 + Duration::from_millis(5), "{a:?} then {b:?}");
}

/// docs/RELIABILITY.md: "`X-RateLimit-Remaining: 0` + reset, on any status": at most `max_pause`
/// \[5 min\]. Resets a peer can send (the largest integer, negative, fractional, in
/// milliseconds, a date in year 9999) never pause a host longer than the cap nor panic.
#[tokio::test(start_paused = true)]
async fn extreme_x_ratelimit_resets_pause_at_most_the_cap() {
    for reset in [
        "18446744073709551615",
        "99999999999999999999999999",
        "-1",
        "-9223372036854775808",
        "1.5",
        "1e9",
        "9999999999999",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "",
        "0x10",
    ] {
        let api = Api::new(
            vec![status_h(
                429,
                &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset)],
            )],
            ok(),
        );
        let (layer, handle) = RateLimitLayer::adaptive_only().pair();
        let svc = layer.layer(api.service());
        let res = timeout(BOUND, svc.oneshot(get(&format!("http://{HOST}/x"))))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        if let Some(p) = handle.pause(HOST) {
            assert!(
                p <= Duration::from_secs(300),
                "reset {reset:?} paused {p:?}"
            );
        }
    }
}

/// docs/guides/ratelimit.md: "Every pause learned from a response is at most `max_pause` ...
/// (`DEFAULT_MAX_PAUSE`, `.with_max_pause(..)`; zero turns pauses off)" and "none [of the
/// setters] panics". A cap of `Duration::MAX` against `Retry-After: 99999999999999999999` must
/// not overflow the clock.
#[tokio::test(start_paused = true)]
async fn a_max_pause_of_duration_max_against_a_huge_retry_after_does_not_panic() {
    let api = Api::new(
        vec![status_h(429, &[("retry-after", "99999999999999999999")])],
        ok(),
    );
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::MAX)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    let res = tokio::spawn(svc.clone().oneshot(get(&format!("http://{HOST}/x"))))
        .await
        .expect("the first call panicked")
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let _ = handle.pause(HOST);
    let second = tokio::spawn(svc.oneshot(get(&format!("http://{HOST}/y"))))
        .await
        .expect("the second call panicked");
    let err = second.expect_err("the host is paused and max_wait is zero");
    assert!(err.to_string().contains(HOST), "{err}");
}

/// docs/RELIABILITY.md: "`Link` header | 100 links kept by `parse_link` (`next_link` ... reads
/// past them and keeps only the next link), 32 parameters per link, time and memory linear in
/// the header". 64 KiB shapes: many links, many parameters, one long URI, a long quoted title,
/// unterminated `<`.
#[test]
fn sixty_four_kib_link_headers_cost_linear_time() {
    let base = "https://api.example.com/items?page=1";
    let shapes: Vec<(&str, Box<dyn Fn(usize) -> String>)> = vec![
        (
            "links",
            Box::new(|n| {
                let mut s = String::new();
                while s.len() < n {
                    s.push_str(&format!("</p/{}>; rel=\"prev\", ", s.len()));
                }
                s.push_str("</last>; rel=next");
                s
            }),
        ),
        (
            "params",
            Box::new(|n| {
                let mut s = String::from("</n>; rel=next");
                while s.len() < n {
                    s.push_str(&format!("; p{}=\"v\"", s.len()));
                }
                s
            }),
        ),
        (
            "long uri",
            Box::new(|n| format!("</{}>; rel=next", "a/".repeat(n / 2))),
        ),
        (
            "dot segments",
            Box::new(|n| format!("<{}x>; rel=next", "../".repeat(n / 3))),
        ),
        (
            "quoted title",
            Box::new(|n| format!("</n>; rel=next; title=\"{}\"", "\\\"".repeat(n / 2))),
        ),
        ("open angle", Box::new(|n| "<".repeat(n))),
        (
            "many rels",
            Box::new(|n| format!("</n>; rel=\"{}next\"", "x ".repeat(n / 2))),
        ),
    ];
    for (name, make) in &shapes {
        let small = make(16 * 1024);
        let big = make(64 * 1024);
        assert_linear(&format!("parse_link {name}"), &small, &big, |v| {
            let h = headers(&[("link", v)]);
            let links = parse_link(&h, base);
            assert!(links.len() <= MAX_LINKS, "{name}: {} links", links.len());
        });
        assert_linear(&format!("next_link {name}"), &small, &big, |v| {
            let h = headers(&[("link", v)]);
            let _ = next_link(&h, base);
        });
    }
}

/// docs STANDARDS 7.1/7.2 (RFC 8288 and GitHub vectors as they are): the next link of GitHub's
/// header, and the last of two field lines, is found; a relative link resolves against the
/// request URI.
#[test]
fn link_vectors_as_published() {
    let gh = "<https://api.github.com/repositories/1300192/issues?page=2>; rel=\"prev\", <https://api.github.com/repositories/1300192/issues?page=4>; rel=\"next\", <https://api.github.com/repositories/1300192/issues?page=515>; rel=\"last\", <https://api.github.com/repositories/1300192/issues?page=1>; rel=\"first\"";
    let h = headers(&[("link", gh)]);
    assert_eq!(
        next_link(
            &h,
            "https://api.github.com/repositories/1300192/issues?page=3"
        )
        .as_deref(),
        Some("https://api.github.com/repositories/1300192/issues?page=4")
    );
    let h = headers(&[
        ("link", "<https://example.org/>; rel=\"start\""),
        (
            "link",
            "</TheBook/chapter4>; rel=\"next\"; title*=UTF-8'de'n%c3%a4chstes%20Kapitel",
        ),
    ]);
    assert_eq!(
        next_link(&h, "http://example.com/TheBook/chapter3").as_deref(),
        Some("http://example.com/TheBook/chapter4")
    );
    assert_eq!(
        resolve_reference("http://a/b/c/d;p?q", "../../../../g"),
        "http://a/g"
    );
}

/// docs/guides/webhooks.md: "400 for missing or malformed headers, 401 for a stale or future
/// timestamp". Timestamps at the ends of `i64` and beyond it, signed, fractional, empty: a 4xx,
/// never a panic, nothing queued.
#[tokio::test]
async fn standard_webhooks_timestamps_at_the_ends_of_i64() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue);
    let body = br#"{"type":"x"}"#;
    for ts in [
        "9223372036854775807",
        "-9223372036854775808",
        "99999999999999999999999",
        "+1700000000",
        "1700000000.5",
        "",
        " 1700000000",
        "0",
        "-1",
    ] {
        let sig = ts
            .parse::<i64>()
            .ok()
            .map(|t| sign_standard(secret, "msg_1", t, body).unwrap())
            .unwrap_or_else(|| "v1,AAAA".to_owned());
        let req = Request::post("/wh")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", ts)
            .header("webhook-signature", sig)
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let res = tokio::spawn(receiver.clone().oneshot(req))
            .await
            .unwrap_or_else(|e| panic!("timestamp {ts:?} panicked: {e}"))
            .unwrap();
        assert!(
            res.status() == StatusCode::BAD_REQUEST || res.status() == StatusCode::UNAUTHORIZED,
            "timestamp {ts:?}: {}",
            res.status()
        );
    }
    assert!(events.try_recv().is_none());
}

/// docs/guides/webhooks.md: same rule for Stripe's `t=`; STANDARDS 2.3 negatives as they are
/// ("every one must be rejected").
#[tokio::test]
async fn stripe_headers_extreme_timestamps_and_published_negatives() {
    let secret = "whsec_test_secret";
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(Stripe::new(secret).unwrap(), queue);
    let body = br#"{"id":"evt_1"}"#;
    let mut values: Vec<String> = [
        "t=,v1=2220f87ef101a04665f11cdf770523143f875572008577fa0f20882ddb9cc3c7,v0=63f3a72374a733066c4be69ed7f8e5ac85c22c9f0a6a612ab9a025a9e4ee7eef",
        "t,v1=,v0=",
        "t,v1=,v0",
        "t,v1=,",
        "t,,",
        ",,",
        "t",
        "v1,t=1",
        "t=",
        "bad_header",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for t in [i64::MAX, i64::MIN, i64::MIN + 1, -1, 0] {
        values.push(sign_stripe(secret, t, body));
    }
    values.push(format!("t=99999999999999999999,v1={}", "a".repeat(64)));
    for v in &values {
        let req = Request::post("/wh")
            .header("stripe-signature", v.as_str())
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let res = tokio::spawn(receiver.clone().oneshot(req))
            .await
            .unwrap_or_else(|e| panic!("header {v:?} panicked: {e}"))
            .unwrap();
        assert!(
            res.status() == StatusCode::BAD_REQUEST || res.status() == StatusCode::UNAUTHORIZED,
            "header {v:?}: {}",
            res.status()
        );
    }
    assert!(events.try_recv().is_none());
}

/// docs/guides/webhooks.md: "a signed timestamp within the tolerance \[5 minutes, both
/// directions\]" and "each verifier's `with_tolerance`". A tolerance of `Duration::MAX` (and a
/// dedup TTL of `Duration::MAX`) accepts a fresh delivery once and refuses its copy, without
/// overflow.
#[tokio::test]
async fn a_tolerance_and_dedup_ttl_of_duration_max_do_not_overflow() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(
        StandardWebhooks::new(secret)
            .unwrap()
            .with_tolerance(Duration::MAX),
        queue,
    )
    .with_dedup_ttl(Duration::MAX);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = br#"{"type":"x"}"#;
    for ts in [now, 1, i64::MAX / 2] {
        let id = format!("msg_{ts}");
        for _ in 0..2 {
            let req = Request::post("/wh")
                .header("webhook-id", id.as_str())
                .header("webhook-timestamp", ts.to_string())
                .header(
                    "webhook-signature",
                    sign_standard(secret, &id, ts, body).unwrap(),
                )
                .body(Full::new(Bytes::from_static(body)))
                .unwrap();
            let res = tokio::spawn(receiver.clone().oneshot(req))
                .await
                .unwrap_or_else(|e| panic!("timestamp {ts} panicked: {e}"))
                .unwrap();
            assert!(res.status().is_success() || res.status() == StatusCode::UNAUTHORIZED);
        }
    }
    let first = events
        .try_recv()
        .expect("the fresh delivery was not queued");
    assert_eq!(first.id, format!("msg_{now}"));
    let mut more = 0;
    while let Some(e) = events.try_recv() {
        assert_ne!(e.id, first.id, "the copy was queued again");
        more += 1;
    }
    assert!(more <= 2);
}

/// docs/guides/version.md: "Responses carrying `Deprecation` (RFC 9745 `@<unix>`, or the older
/// `true` / HTTP date) or `Sunset` (RFC 8594) are reported once per endpoint ... The response is
/// untouched." Extreme values neither panic nor change the response.
#[tokio::test]
async fn extreme_deprecation_and_sunset_values_leave_the_response_untouched() {
    let values = [
        ("deprecation", "@9223372036854775807"),
        ("deprecation", "@-9223372036854775808"),
        ("deprecation", "@99999999999999999999"),
        ("deprecation", "@"),
        ("deprecation", "@1.5"),
        ("deprecation", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ("sunset", "Mon, 01 Jan 0001 00:00:00 GMT"),
        ("sunset", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ("sunset", "@1"),
    ];
    for (name, value) in values {
        let api = Api::new(vec![status_h(200, &[(name, value)])], ok());
        let svc = VersionLayer::header("api-version", "2024-06-01")
            .unwrap()
            .on_notice(|_| {})
            .layer(api.service());
        let res = tokio::spawn(svc.oneshot(get(&format!("http://{HOST}/v"))))
            .await
            .unwrap_or_else(|e| panic!("{name}: {value} panicked: {e}"))
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[name], value);
        assert_eq!(api.seen()[0].headers["api-version"], "2024-06-01");
    }
}

/// docs/guides/version.md: "`VersionLayer::header(..)?` (a `Result`: the name and value must be
/// valid in a header; or `::query(name, version)`, which cannot fail: both are form-encoded)".
#[tokio::test]
async fn version_header_edge_values_are_errors_and_query_encodes_anything() {
    assert!(VersionLayer::header("", "1").is_err());
    assert!(VersionLayer::header("api version", "1").is_err());
    assert!(VersionLayer::header("api-version", "a\r\nx-evil: 1").is_err());
    let api = Api::new(vec![], ok());
    let svc = VersionLayer::query("v&x=1", "2024 06#frag").layer(api.service());
    svc.oneshot(get(&format!("http://{HOST}/q?a=1")))
        .await
        .unwrap();
    let uri = &api.seen()[0].uri;
    assert!(uri.starts_with(&format!("http://{HOST}/q?a=1&")), "{uri}");
    assert!(
        !uri.contains('#') && !uri.contains("x=1&") && !uri.contains(' '),
        "{uri}"
    );
}

/// docs/guides/auth.md: "Each returns a `Result`: a value that cannot go in a header ... is a
/// `Config` error when the layer is built" and "no `Debug` or log line shows them". The error
/// does not repeat the secret.
#[test]
fn static_credentials_that_cannot_go_in_a_header_are_refused_without_echo() {
    let secret = "sk_live_SECRETVALUE";
    for r in [
        AuthLayer::bearer(format!("{secret}\r\n")),
        AuthLayer::bearer(format!("{secret}\u{0}")),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), format!("{secret}\n")),
        AuthLayer::basic("us:er", secret.to_owned()),
    ] {
        let err = r.expect_err("accepted");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("SECRETVALUE"), "{shown}");
        assert!(!shown.is_empty());
    }
    let ok_layer = AuthLayer::basic("user", format!("{secret}:with:colons"));
    assert!(ok_layer.is_ok(), "a password may hold ':'");
}

/// docs/RELIABILITY.md: "a token's `expires_in` | missing: 1 h; zero, negative or not a number:
/// an error, no refresh loop; absurd: 24 h", with `with_default_lifetime` and
/// `with_max_lifetime` set to `Duration::MAX`: no overflow, the token is used.
#[tokio::test(start_paused = true)]
async fn token_lifetimes_of_duration_max_do_not_overflow() {
    for body in [
        r#"{"access_token":"t1","token_type":"Bearer"}"#,
        r#"{"access_token":"t1","token_type":"Bearer","expires_in":18446744073709551615}"#,
        r#"{"access_token":"t1","token_type":"Bearer","expires_in":1e308}"#,
    ] {
        let idp = Api::new(
            vec![],
            Answer::Status(
                200,
                vec![("content-type", "application/json".to_owned())],
                body,
            ),
        );
        let tokens = ClientCredentials::new(idp.service(), "http://idp.local/t", "id", "s")
            .unwrap()
            .with_default_lifetime(Duration::MAX)
            .with_max_lifetime(Duration::MAX)
            .with_skew(Duration::MAX)
            .with_request_timeout(Duration::MAX);
        let got = tokio::spawn(async move { tokens.get().await })
            .await
            .unwrap_or_else(|e| panic!("{body} panicked: {e}"));
        if let Ok(t) = got {
            assert_eq!(t.secret().expose_secret(), "t1");
        }
    }
}

/// docs/guides/concurrency.md: "the limit starts at 20 (`.with_initial_limit(n)`) and stays
/// between 1 and 1,000 (`.with_limits(min, max)`; a minimum of 0 is taken as 1, a maximum below
/// the minimum as the minimum)". The largest values must not panic.
#[tokio::test(start_paused = true)]
async fn adaptive_concurrency_limits_at_usize_max_do_not_panic() {
    for (min, max, initial) in [
        (0, usize::MAX, usize::MAX),
        (usize::MAX, 0, 1),
        (usize::MAX, usize::MAX, usize::MAX),
        (0, 0, 0),
    ] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(min, max)
            .with_initial_limit(initial)
            .with_max_wait(Duration::MAX)
            .pair();
        let api = Api::new(vec![], ok());
        let svc = layer.layer(api.service());
        let res = tokio::spawn(svc.oneshot(get(&format!("http://{HOST}/c"))))
            .await
            .unwrap_or_else(|e| panic!("limits ({min}, {max}, {initial}) panicked: {e}"))
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let limit = handle.limit(HOST).unwrap();
        assert!(limit >= 1, "({min}, {max}, {initial}): limit {limit}");
        handle.set_limit(HOST, usize::MAX);
        handle.set_limit(HOST, 0);
    }
}

/// docs/guides/hedge.md: "The delay is never shorter than 1 ms nor longer than 10 s
/// (`.with_delay_bounds(min, max)`)", a window `.with_window(d)`. Inverted and extreme bounds,
/// windows of zero and `Duration::MAX`, zero samples: calls still answer, no panic.
#[tokio::test(start_paused = true)]
async fn hedge_settings_at_their_extremes_do_not_panic() {
    for (min, max, window, samples) in [
        (Duration::MAX, Duration::ZERO, Duration::ZERO, 0),
        (Duration::ZERO, Duration::MAX, Duration::MAX, u64::MAX),
        (Duration::ZERO, Duration::ZERO, Duration::from_nanos(1), 1),
    ] {
        let api = Api::new(vec![], Answer::Slow(Duration::from_millis(5)));
        let svc = HedgeLayer::new()
            .with_delay_bounds(min, max)
            .with_window(window)
            .with_min_samples(samples)
            .layer(api.service());
        for i in 0..40 {
            let res = tokio::spawn(svc.clone().oneshot(get(&format!("http://{HOST}/{i}"))))
                .await
                .unwrap_or_else(|e| panic!("({min:?}, {max:?}, {window:?}) panicked: {e}"))
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    }
}

/// docs/guides/retry.md: "Attempts: `.with_max_attempts(n)` \[4\] (0 is taken as 1)" and the
/// other settings at their extremes (`u32::MAX` attempts, `Duration::MAX` deadline, retry-after
/// cap and attempt timeout, a zero body limit): a POST with a key and a 503 then 200 answers.
#[tokio::test(start_paused = true)]
async fn retry_settings_at_their_extremes_do_not_panic() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "1")])], ok());
    let svc = RetryLayer::new()
        .with_max_attempts(u32::MAX)
        .with_deadline(Duration::MAX)
        .with_max_retry_after(Duration::MAX)
        .with_attempt_timeout(Duration::MAX)
        .with_retry_after_jitter(f64::MAX)
        .with_seed(u64::MAX)
        .layer(api.service());
    let res = timeout(
        BOUND,
        tokio::spawn(svc.oneshot(get(&format!("http://{HOST}/r")))),
    )
    .await
    .expect("hung")
    .expect("panicked")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);

    let api = Api::new(vec![status(503)], ok());
    let svc = RetryLayer::new().with_max_attempts(0).layer(api.service());
    let res = svc.oneshot(get(&format!("http://{HOST}/r"))).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1, "0 attempts is taken as 1");
}

/// docs/guides/ratelimit.md: "`RateLimitLayer::new(Quota::per_second(10)?.with_burst(5)?)`" and
/// "All setters are `with_*`, and none panics." Quotas at the ends of `u32` and `Duration`, and
/// zero, either build or give an error; built ones answer calls.
#[tokio::test(start_paused = true)]
async fn quotas_at_their_extremes_build_or_fail_cleanly() {
    assert!(Quota::per_second(0).is_err());
    assert!(Quota::new(1, Duration::ZERO).is_err());
    let candidates = [
        Quota::new(u32::MAX, Duration::from_nanos(1)),
        Quota::new(u32::MAX, Duration::MAX),
        Quota::new(1, Duration::MAX),
        Quota::new(1, Duration::from_nanos(1)),
        Quota::per_second(u32::MAX).and_then(|q| q.with_burst(u32::MAX)),
        Quota::per_second(1).and_then(|q| q.with_burst(0)),
    ];
    for q in candidates.into_iter().flatten() {
        let api = Api::new(vec![], ok());
        let svc = RateLimitLayer::new(q)
            .with_max_wait(Duration::MAX)
            .with_max_keys(0)
            .layer(api.service());
        let res = timeout(
            BOUND,
            tokio::spawn(svc.oneshot(get(&format!("http://{HOST}/q")))),
        )
        .await
        .unwrap_or_else(|_| panic!("{q:?} hung"))
        .unwrap_or_else(|e| panic!("{q:?} panicked: {e}"))
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

/// docs/guides/coalesce.md: "a response whose body is larger than the bound ... is not shared.
/// The caller that started the call gets it". A bound of zero shares no body but still answers
/// every caller; a response whose `Content-Length` claims `u64::MAX` over a small body is
/// answered, not buffered against the claim.
#[tokio::test(start_paused = true)]
async fn coalesce_bounds_of_zero_and_a_lying_content_length() {
    let api = Api::new(
        vec![],
        Answer::Status(
            200,
            vec![("content-length", "18446744073709551615".to_owned())],
            "small",
        ),
    );
    for bound in [0, usize::MAX] {
        let svc = CoalesceLayer::new()
            .with_max_body(bound)
            .with_max_hosts(0)
            .layer(api.service());
        let calls: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(get(&format!("http://{HOST}/c")))))
            .collect();
        for c in calls {
            let res = timeout(BOUND, c).await.unwrap().unwrap().unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    }
}

/// docs/guides/idempotency.md: "`with_ttl` and `with_lease` return an error for a zero TTL or a
/// lease under 1 ms ... invalid settings are reported when the layer is built, never on a
/// request." The largest TTL and lease work: the request runs once and its repeat is replayed.
#[tokio::test]
async fn idempotency_ttl_and_lease_of_duration_max_replay() {
    use axum::routing::post;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    assert!(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_ttl(Duration::ZERO)
            .is_err()
    );
    assert!(
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_lease(Duration::from_micros(999))
            .is_err()
    );
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_ttl(Duration::MAX)
        .unwrap()
        .with_lease(Duration::MAX)
        .unwrap()
        .with_body_limit(usize::MAX)
        .with_response_limit(usize::MAX);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app: axum::Router = axum::Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move { format!("run {}", r.fetch_add(1, Ordering::SeqCst) + 1) }
            }),
        )
        .layer(layer);
    for i in 0..2 {
        let req = Request::post("/orders")
            .header("idempotency-key", "k-max")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let res = tokio::spawn(app.clone().oneshot(req))
            .await
            .unwrap_or_else(|e| panic!("request {i} panicked: {e}"))
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
        if i == 1 {
            assert_eq!(res.headers()["idempotent-replayed"], "true");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// STANDARDS 1.1 (the Standard Webhooks spec): "It's important that both the message id and the
/// timestamp not be user controlled, or at the very least not be allowed to include any `.`";
/// docs/guides/webhooks.md: "Deduplication uses only what the signature covers" and the
/// receiver deduplicates on `webhook-id`. A signed delivery whose id ends in `.<timestamp>` can be
/// re-cut into another id, the same timestamp and a body with a prefix: the same signed bytes.
/// The receiver must refuse the re-cut copy (or ids with `.`), not queue a second, altered event.
#[tokio::test]
async fn a_webhook_id_with_a_full_stop_cannot_be_recut_into_another_verified_event() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let id = format!("msg.{now}");
    let body = br#"{"amount":1}"#;
    let sig = sign_standard(secret, &id, now, body).unwrap();
    let send = |id: String, ts: i64, body: Vec<u8>| {
        Request::post("/wh")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig.clone())
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let first = receiver
        .clone()
        .oneshot(send(id.clone(), now, body.to_vec()))
        .await
        .unwrap();
    // The re-cut copy: id "msg", the same timestamp, body "<now>.<body>".
    let mut recut_body = format!("{now}.").into_bytes();
    recut_body.extend_from_slice(body);
    let recut = receiver
        .clone()
        .oneshot(send("msg".to_owned(), now, recut_body))
        .await
        .unwrap();
    let mut queued = Vec::new();
    while let Some(e) = events.try_recv() {
        queued.push((e.id.clone(), String::from_utf8_lossy(&e.body).into_owned()));
    }
    assert!(
        queued.len() <= 1,
        "first {}, re-cut {}: queued {queued:?}",
        first.status(),
        recut.status()
    );
}

/// docs: circuit.md "`.with_failure_rate(rate, window, min_calls)`, validated when called";
/// hedge.md "`.with_percentile(p)`, validated" and "`.with_budget(ratio, burst)`, validated";
/// concurrency.md "`.with_backoff(ratio)`, validated"; retry.md "`with_budget(ttl, min_per_sec,
/// percent)` (validated when you call it: `ttl` 1 s to 60 s, `percent` 0.0 to 1000.0)". NaN,
/// infinities and negatives are refused, each error saying what was wrong.
#[test]
fn float_settings_refuse_nan_infinity_and_negatives() {
    use sturdy::circuit::CircuitBreakerLayer;
    fn named<T>(what: &str, r: Result<T, impl std::fmt::Display>) {
        match r {
            Ok(_) => panic!("{what} was accepted"),
            Err(e) => assert!(!e.to_string().is_empty(), "{what}: empty message"),
        }
    }
    for x in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5] {
        named(
            &format!("failure rate {x}"),
            CircuitBreakerLayer::new().with_failure_rate(x, Duration::from_secs(1), 1),
        );
        named(
            &format!("percentile {x}"),
            HedgeLayer::new().with_percentile(x),
        );
        named(
            &format!("hedge ratio {x}"),
            HedgeLayer::new().with_budget(x, 1),
        );
        named(
            &format!("backoff {x}"),
            AdaptiveConcurrencyLayer::new().with_backoff(x),
        );
        named(
            &format!("retry percent {x}"),
            RetryLayer::new().with_budget(Duration::from_secs(10), 1, x as f32),
        );
    }
    named(
        "retry budget ttl 0",
        RetryLayer::new().with_budget(Duration::ZERO, 1, 0.2),
    );
    named(
        "retry budget ttl max",
        RetryLayer::new().with_budget(Duration::MAX, 1, 0.2),
    );
    named(
        "window 0",
        CircuitBreakerLayer::new().with_failure_rate(0.5, Duration::ZERO, 1),
    );
}

/// docs/guides/idempotency.md: "A key you set yourself is kept: put it in the `Idempotency-Key`
/// header, or give it for one request with
/// `sturdy_core::CallOptions::new().with_idempotency_key(key)`". A key that cannot go in a header
/// (a line break, empty, 64 KiB) neither panics nor is silently swapped for a random one: the
/// request is either refused before it is sent, or sent with exactly that key, or (the guide:
/// "a key there that holds control characters ... is sent as `sturdy-sha256-` and the hex
/// SHA-256 of the key") as that digest, the same on every call.
#[tokio::test(start_paused = true)]
async fn hostile_idempotency_keys_given_in_call_options() {
    use sturdy::core::CallOptions;
    use sturdy::ClientBuilder;
    let long = "k".repeat(64 * 1024);
    let mut wrong = Vec::new();
    for key in ["a\r\nx-evil: 1", "", " ", "é", long.as_str()] {
        let api = Api::new(vec![], ok());
        let client = ClientBuilder::new().build(api.service());
        let mut req = post(&format!("http://{HOST}/orders"), "{}");
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        let shown: String = key.chars().take(16).collect();
        let got = tokio::spawn(client.oneshot(req))
            .await
            .unwrap_or_else(|e| panic!("key {shown:?} panicked: {e}"));
        match got {
            Ok(_) => {
                let seen = api.seen();
                assert_eq!(seen.len(), 1);
                assert!(seen[0].headers.get("x-evil").is_none());
                let sent = seen[0]
                    .headers
                    .get("idempotency-key")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                let expected_ok = if key.is_empty()
                    || key.contains('\r')
                    || key.starts_with(' ')
                    || key.ends_with(' ')
                {
                    sent.as_deref().is_some_and(|s| {
                        s.len() == "sturdy-sha256-".len() + 64
                            && s.starts_with("sturdy-sha256-")
                            && s["sturdy-sha256-".len()..]
                                .bytes()
                                .all(|b| b.is_ascii_hexdigit())
                    })
                } else {
                    sent.as_deref() == Some(key)
                };
                if !expected_ok {
                    wrong.push(format!("{shown:?} sent as {sent:?}"));
                }
            }
            Err(e) => {
                if api.calls() != 0 || !e.to_string().to_ascii_lowercase().contains("idempotency") {
                    wrong.push(format!("{shown:?}: {} sent; error {e}", api.calls()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// docs/guides/auth.md: "`::api_key_query(param, key)`" with secrets kept: a key holding `&`,
/// `=`, `#`, `%` and spaces goes into the query as one encoded value, never as extra parameters
/// or a fragment; the request's own query is kept.
#[tokio::test]
async fn an_api_key_with_query_syntax_is_encoded_not_injected() {
    let api = Api::new(vec![], ok());
    let svc = AuthLayer::api_key_query("api_key", "a&admin=1#frag %zz+")
        .unwrap()
        .layer(api.service());
    svc.oneshot(get(&format!("http://{HOST}/q?x=1")))
        .await
        .unwrap();
    let uri: http::Uri = api.seen()[0].uri.parse().unwrap();
    let query = uri.query().unwrap_or_default().to_owned();
    let pairs: Vec<(String, String)> = query
        .split('&')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert!(
        pairs.iter().any(|(k, v)| k == "x" && v == "1"),
        "the request's own query was lost: {query}"
    );
    assert!(
        !pairs.iter().any(|(k, _)| k == "admin"),
        "the key injected a parameter: {query}"
    );
    assert_eq!(
        pairs.iter().filter(|(k, _)| k == "api_key").count(),
        1,
        "{query}"
    );
    assert!(!api.seen()[0].uri.contains('#'), "{}", api.seen()[0].uri);
}

/// docs/RELIABILITY.md: "`X-Forwarded-For` / `Forwarded` | read only from configured trusted
/// proxies, at most 32 hops"; webhooks.md: "more than 32 trusted hops make the source unknown:
/// 403". A 64 KiB header of trusted hops, or of garbage, is refused quickly, never read whole
/// into per-entry work that grows faster than the header.
#[tokio::test]
async fn sixty_four_kib_forwarded_headers_are_refused_in_linear_time() {
    use axum::extract::ConnectInfo;
    use sturdy::webhook::{sign_github, GitHub, SourceAllowlist};
    let secret = "s3cret";
    let body = br#"{"zen":"x"}"#;
    let list = SourceAllowlist::new(["192.0.2.0/24"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver =
        WebhookReceiver::new(GitHub::new(secret).unwrap(), queue).with_source_allowlist(list);
    let make = |n: usize, unit: &str| {
        let mut s = String::from("192.0.2.7");
        while s.len() < n {
            s.push_str(", ");
            s.push_str(unit);
        }
        s
    };
    for unit in ["10.1.2.3", "unknown", "[::1]:80", "10.0.0.9, junk"] {
        let mut times = Vec::new();
        for n in [16 * 1024, 64 * 1024] {
            let mut req = Request::post("/gh")
                .header("x-hub-signature-256", sign_github(secret, body))
                .header("x-github-event", "ping")
                .header("x-forwarded-for", make(n, unit))
                .body(Full::new(Bytes::from_static(body)))
                .unwrap();
            req.extensions_mut()
                .insert(ConnectInfo(std::net::SocketAddr::from((
                    [10, 0, 0, 1],
                    443,
                ))));
            let t = StdInstant::now();
            let res = receiver.clone().oneshot(req).await.unwrap();
            times.push(t.elapsed());
            assert_eq!(res.status(), StatusCode::FORBIDDEN, "{unit} x {n}");
        }
        assert!(
            times[1] < Duration::from_millis(200)
                && times[1] <= times[0] * 10 + Duration::from_millis(5),
            "{unit}: {times:?}"
        );
    }
    assert!(events.try_recv().is_none());
}

/// docs/guides/webhooks.md: "A delivery gets 2xx only after Redis answered that the event is in
/// the stream" and "Dedup and append happen in one script". Deliveries dropped at several points
/// of their enqueue, each followed by the sender's redelivery: every event is in the stream
/// exactly once.
#[tokio::test]
async fn redis_deliveries_dropped_mid_enqueue_are_in_the_stream_exactly_once() {
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let url =
        std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned());
    let stream = format!(
        "w20-cancel-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let Ok(mut consumer) =
        RedisStreamConsumer::connect(&url, stream.as_str(), "g", "c1", Duration::from_secs(60))
            .await
    else {
        eprintln!("no Redis at {url}: skipped");
        return;
    };
    let queue = RedisStreamQueue::connect(&url, stream.as_str())
        .await
        .unwrap();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let receiver = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let delivery = |id: &str| {
        let body = format!("{{\"id\":\"{id}\"}}").into_bytes();
        Request::post("/wh")
            .header("webhook-id", id)
            .header("webhook-timestamp", now.to_string())
            .header(
                "webhook-signature",
                sign_standard(secret, id, now, &body).unwrap(),
            )
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let drops = [0u64, 50, 100, 200, 400, 800, 1600, 3200];
    for (i, us) in drops.iter().enumerate() {
        let id = format!("msg_{i}");
        let _ = timeout(
            Duration::from_micros(*us),
            receiver.clone().oneshot(delivery(&id)),
        )
        .await;
        let res = receiver.clone().oneshot(delivery(&id)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{id} after a drop at {us} µs");
    }
    let mut seen = Vec::new();
    let deadline = StdInstant::now() + Duration::from_secs(10);
    while StdInstant::now() < deadline {
        match consumer.next().await.unwrap() {
            Some(d) => {
                seen.push(d.event.id.clone());
                consumer.ack(&d).await.unwrap();
            }
            None if seen.len() >= drops.len() => break,
            None => {}
        }
    }
    seen.sort();
    let want: Vec<String> = (0..drops.len()).map(|i| format!("msg_{i}")).collect();
    assert_eq!(seen, want);
}

/// docs/guides/auth.md: "Secrets live in `secrecy` types ...; no `Debug` or log line shows them"
/// and "Messages say what to fix"; RELIABILITY.md: "a token's `expires_in` | ... zero, negative
/// or not a number: an error". Token responses the source refuses (form-encoded, a bad
/// `expires_in`, a cut JSON, an oversized body) whose body holds a real access token: the error
/// says what was wrong and never repeats the token.
#[tokio::test(start_paused = true)]
async fn refused_token_responses_never_repeat_the_token() {
    let huge: &'static str = Box::leak(
        format!(
            "{{\"access_token\":\"gho_SECRETTOKEN\",\"pad\":\"{}\"}}",
            "x".repeat(70 * 1024)
        )
        .into_boxed_str(),
    );
    let bodies: Vec<(&str, &'static str)> = vec![
        (
            "application/x-www-form-urlencoded",
            "access_token=gho_SECRETTOKEN&scope=&token_type=bearer",
        ),
        (
            "application/json",
            r#"{"access_token":"gho_SECRETTOKEN","token_type":"Bearer","expires_in":"soon"}"#,
        ),
        (
            "application/json",
            r#"{"access_token":"gho_SECRETTOKEN","token_type":"Bearer","expires_in":0}"#,
        ),
        (
            "application/json",
            r#"{"access_token":"gho_SECRETTOKEN","token_type":"Bearer","expires_in":-5}"#,
        ),
        (
            "application/json",
            r#"{"access_token":"gho_SECRETTOKEN","token_type":"Bearer","expires_in":36"#,
        ),
        (
            "application/json",
            r#"{"access_token":"gho_SECRETTOKEN","token_type":"mac","expires_in":3600}"#,
        ),
        (
            "application/json",
            r#"{"access_token":["gho_SECRETTOKEN"],"token_type":"Bearer"}"#,
        ),
        ("application/json", huge),
        ("text/html", "<html>gho_SECRETTOKEN</html>"),
    ];
    for (ct, body) in bodies {
        let idp = Api::new(
            vec![],
            Answer::Status(200, vec![("content-type", ct.to_owned())], body),
        );
        let tokens =
            ClientCredentials::new(idp.service(), "http://idp.local/t", "id", "s").unwrap();
        let shown: String = body.chars().take(60).collect();
        match tokens.get().await {
            Ok(t) => {
                // Accepted: then it must be the token as sent.
                assert_eq!(t.secret().expose_secret(), "gho_SECRETTOKEN", "{shown}");
            }
            Err(e) => {
                let text = format!("{e} | {e:?} | {:?}", chain(&e));
                assert!(!text.contains("SECRETTOKEN"), "{shown}: {text}");
                assert!(text.len() < 4096, "{shown}: a {} byte message", text.len());
            }
        }
    }
}

/// docs/guides/webhooks.md: "Schemes with a signed timestamp (Standard Webhooks, Stripe, ...):
/// as long as the copy would pass the timestamp check. The dedup key is kept at least until the
/// timestamp plus the tolerance plus one second ..., whatever the dedup TTL". A dedup TTL of zero
/// still refuses a copy sent at once.
#[tokio::test]
async fn a_dedup_ttl_of_zero_still_refuses_a_fresh_copy() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = br#"{"id":"evt_zero","type":"x"}"#;
    let (queue, mut events) = MemoryQueue::new(100);
    let standard = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue.clone())
        .with_dedup_ttl(Duration::ZERO);
    let stripe =
        WebhookReceiver::new(Stripe::new(secret).unwrap(), queue).with_dedup_ttl(Duration::ZERO);
    for _ in 0..2 {
        let req = Request::post("/wh")
            .header("webhook-id", "msg_zero")
            .header("webhook-timestamp", now.to_string())
            .header(
                "webhook-signature",
                sign_standard(secret, "msg_zero", now, body).unwrap(),
            )
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        assert_eq!(
            standard.clone().oneshot(req).await.unwrap().status(),
            StatusCode::OK
        );
        let req = Request::post("/wh")
            .header("stripe-signature", sign_stripe(secret, now, body))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        assert_eq!(
            stripe.clone().oneshot(req).await.unwrap().status(),
            StatusCode::OK
        );
    }
    let mut got = Vec::new();
    while let Some(e) = events.try_recv() {
        got.push((e.route.clone(), e.id.clone()));
    }
    assert_eq!(got.len(), 2, "{got:?}");
}

/// STANDARDS 5.1 (draft-ietf-httpapi-ratelimit-headers-10): "If a response contains both the
/// RateLimit and Retry-After fields, the Retry-After field MUST take precedence"; and GitHub's
/// `x-ratelimit-reset` is "in UTC epoch seconds". A 429 carrying both a short `Retry-After` and
/// a long `RateLimit` reset pauses for the `Retry-After`; an epoch reset 30 s ahead pauses 30 s.
#[test]
fn retry_after_takes_precedence_and_epoch_resets_read_as_dates() {
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let h = headers(&[
        ("retry-after", "2"),
        ("ratelimit", "\"default\";r=0;t=50"),
        ("ratelimit-policy", "\"default\";q=100;w=60"),
    ]);
    let hint = pause_hint(StatusCode::TOO_MANY_REQUESTS, &h, now).expect("a pause");
    assert_eq!(hint.delay, Duration::from_secs(2), "{hint:?}");
    let h = headers(&[
        ("x-ratelimit-limit", "5000"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-used", "5000"),
        ("x-ratelimit-reset", "1800000030"),
        ("x-ratelimit-resource", "core"),
    ]);
    let hint = pause_hint(StatusCode::FORBIDDEN, &h, now).expect("a pause");
    assert_eq!(hint.delay, Duration::from_secs(30), "{hint:?}");
}
