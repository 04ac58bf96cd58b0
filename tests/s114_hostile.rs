#![cfg(feature = "full")]
//! Outside round s114: hostile peers against the parsers a peer feeds.
//!
//! Covers the OAuth2 token response (`expires_in` extremes, error texts with control bytes,
//! endless, nested and trickled bodies), the webhook signature headers (Standard Webhooks and
//! Stripe: duplicated timestamps, thousands of entries, extreme timestamps), the server's
//! `Idempotency-Key` (thousands of repeats, unclosed quotes, spaces), `X-RateLimit-Reset`
//! extremes (10,000 digits, RFC 3339 years 1 and 9999) and pagination (a server cursor longer
//! than `MAX_CURSOR_LEN`, JSON nested 100,000 deep). Memory is counted with dhat's allocator;
//! time is compared as a ratio of an input of size n and 10n.

// Real time on purpose: costs are measured as ratios, sockets run in real time, and webhook
// timestamps are checked against the wall clock.
#![allow(clippy::disallowed_methods)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::core::ErrorKind;
use sturdy::webhook::Verifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::{service_fn, ServiceExt};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Every test runs alone, so the process-wide allocation counts and the time ratios are not
/// disturbed by another test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";

fn json_response(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

/// A token source whose endpoint answers `body` with `status`, counting requests.
fn token_source(status: u16, body: String) -> (sturdy::auth::ClientCredentials, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let body = Bytes::from(body);
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        h.fetch_add(1, Ordering::SeqCst);
        let body = body.clone();
        async move { Ok::<_, Infallible>(json_response(status, body)) }
    });
    let cc =
        sturdy::auth::ClientCredentials::new(svc, TOKEN_URL, "client-id", "s3cr3t-client-secret")
            .unwrap();
    (cc, hits)
}

/// The lifetime of the token the source hands out for a token response whose `expires_in` is
/// the JSON text `expires_in` (on paused time, so the clock does not move).
async fn lifetime_for(expires_in: &str) -> Result<Duration, sturdy::core::Error> {
    let body =
        format!(r#"{{"access_token":"tok-abc","token_type":"Bearer","expires_in":{expires_in}}}"#);
    let (cc, _) = token_source(200, body);
    let start = tokio::time::Instant::now();
    let token = cc.get().await?;
    Ok(token.expires_at().expect("an expiry") - start)
}

fn assert_clean_message(msg: &str) {
    assert!(
        !msg.chars().any(|c| c.is_control()),
        "a control character in the message: {msg:?}"
    );
    assert!(
        !msg.contains("s3cr3t-client-secret"),
        "the secret leaked: {msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// The token response
// ---------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn token_expires_in_of_ten_thousand_digits_is_huge_not_an_error() {
    let _g = SERIAL.lock().await;
    let day = Duration::from_secs(24 * 3600);
    let digits = format!("1{}", "0".repeat(9_999));
    // docs/guides/auth.md: "huge => 24 h (a string of digits, "3600", ... is read as the number)".
    assert_eq!(
        lifetime_for(&digits).await.unwrap(),
        day,
        "a number of 10,000 digits"
    );
    assert_eq!(
        lifetime_for(&format!("\"{digits}\"")).await.unwrap(),
        day,
        "a string of 10,000 digits"
    );
    assert_eq!(
        lifetime_for("18446744073709551615").await.unwrap(),
        day,
        "u64::MAX"
    );
    assert_eq!(
        lifetime_for("\"18446744073709551616\"").await.unwrap(),
        day,
        "u64::MAX + 1 as a string"
    );
    assert_eq!(lifetime_for("1e400").await.unwrap(), day, "beyond a double");
    assert_eq!(
        lifetime_for("\"3600\"").await.unwrap(),
        Duration::from_secs(3600)
    );
}

#[tokio::test(start_paused = true)]
async fn token_expires_in_negative_extremes_are_clear_errors() {
    let _g = SERIAL.lock().await;
    let ten_k = format!("-1{}", "0".repeat(9_999));
    for v in [
        "-1".to_owned(),
        "-9223372036854775808".to_owned(),
        ten_k.clone(),
        format!("\"{ten_k}\""),
        "0".to_owned(),
        "\"0\"".to_owned(),
        "-1e400".to_owned(),
    ] {
        let err = lifetime_for(&v).await.expect_err(&v[..v.len().min(30)]);
        let msg = err.to_string();
        assert!(
            msg.contains("expires_in"),
            "the message names the field: {msg}"
        );
        assert!(
            msg.len() < 2_000,
            "the peer's value is capped: {} bytes",
            msg.len()
        );
        assert_clean_message(&msg);
    }
}

#[tokio::test(start_paused = true)]
async fn token_error_description_with_control_bytes_and_64_kib_is_capped_and_escaped() {
    let _g = SERIAL.lock().await;
    let desc = format!(
        "bad\\u0000\\u001b[31mred\\r\\nInjected: yes{}",
        "x".repeat(64_000)
    );
    let body = format!(r#"{{"error":"invalid_client\u0007\u0000","error_description":"{desc}"}}"#);
    let (cc, _) = token_source(401, body);
    let err = cc.get().await.unwrap_err();
    let msg = err.to_string();
    // auth.md: "The server's own words (its error and error_description, cut to 64 and 200
    // characters) are quoted".
    assert!(msg.len() < 1_000, "{} bytes", msg.len());
    assert!(msg.contains("invalid_client"), "{msg}");
    assert_clean_message(&msg);
    let dbg = format!("{err:?}");
    assert!(!dbg.contains('\u{1b}') && !dbg.contains('\0'), "{dbg}");
}

#[tokio::test(start_paused = true)]
async fn token_body_of_json_nested_100_000_deep_is_an_error_not_a_crash() {
    let _g = SERIAL.lock().await;
    // Inside the 64 KiB limit: 30,000 unclosed arrays.
    let inner = format!(
        r#"{{"access_token":"tok","token_type":"Bearer","expires_in":3600,"x":{}}}"#,
        "[".repeat(30_000)
    );
    let (cc, _) = token_source(200, inner);
    let err = cc.get().await.unwrap_err();
    assert_clean_message(&err.to_string());
    // Past the limit: 100,000 deep, closed.
    let deep = format!(
        r#"{{"access_token":"tok","token_type":"Bearer","expires_in":3600,"x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (cc, _) = token_source(200, deep);
    let err = cc.get().await.unwrap_err();
    assert_clean_message(&err.to_string());
}

#[tokio::test(start_paused = true)]
async fn token_access_token_with_a_nul_is_refused_and_not_cached() {
    let _g = SERIAL.lock().await;
    let (cc, hits) = token_source(
        200,
        r#"{"access_token":"tok\u0000en","token_type":"Bearer","expires_in":3600}"#.to_owned(),
    );
    let err = cc.get().await.unwrap_err();
    assert_clean_message(&err.to_string());
    tokio::time::advance(Duration::from_secs(120)).await;
    let _ = cc.get().await;
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "not cached: asked again after the backoff"
    );
}

/// An endless token body: the read stops at 64 KiB, quickly, holding little memory.
#[tokio::test(start_paused = true)]
async fn token_endless_body_stops_at_the_limit() {
    let _g = SERIAL.lock().await;
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let s = s.clone();
        async move {
            let chunk = Bytes::from(vec![b' '; 4096]);
            let stream = futures_util::stream::repeat_with(move || {
                s.fetch_add(4096, Ordering::SeqCst);
                Ok::<_, Infallible>(http_body::Frame::data(chunk.clone()))
            });
            Ok::<_, Infallible>(Response::new(StreamBody::new(stream)))
        }
    });
    let cc =
        sturdy::auth::ClientCredentials::new(svc, TOKEN_URL, "id", "s3cr3t-client-secret").unwrap();
    let err = cc.get().await.unwrap_err();
    let read = sent.load(Ordering::SeqCst);
    assert!(read <= 256 * 1024, "read {read} bytes of an endless body");
    assert_clean_message(&err.to_string());
}

/// A raw TCP token endpoint that sends its head, then one byte every 10 ms, forever.
#[tokio::test]
async fn token_endpoint_trickling_one_byte_per_10ms_is_cut_at_the_request_timeout() {
    let _g = SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
                    .await;
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if sock.write_all(b" ").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let url = format!("http://{addr}/token");
    let cc = sturdy::auth::ClientCredentials::new(client, &url, "id", "s3cr3t-client-secret")
        .unwrap()
        .with_request_timeout(Duration::from_millis(300));
    let t0 = StdInstant::now();
    let err = cc.get().await.unwrap_err();
    let took = t0.elapsed();
    server.abort();
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_clean_message(&err.to_string());
}

// ---------------------------------------------------------------------------------------------
// Webhook signature headers
// ---------------------------------------------------------------------------------------------

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_stripe_test_secret";

fn now_secs() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

fn standard_headers(id: &str, ts: &str, sig: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", hv(id));
    h.insert("webhook-timestamp", hv(ts));
    h.insert("webhook-signature", hv(sig));
    h
}

fn check(
    v: &dyn Verifier,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), sturdy::webhook::Rejection> {
    let now = SystemTime::now();
    v.check_headers(headers, now)?;
    v.verify(headers, body, now).map(|_| ())
}

/// A delivery signed an hour ago, resent with a second, fresh timestamp beside the signed one:
/// whichever the verifier reads for freshness must be the one it verified.
#[test]
fn stripe_duplicated_t_cannot_freshen_an_old_signature() {
    let _g = SERIAL.blocking_lock();
    let v = sturdy::webhook::Stripe::new(STRIPE_SECRET).unwrap();
    let body = br#"{"id":"evt_1","type":"charge.succeeded"}"#;
    let old = now_secs() - 3600;
    let now = now_secs();
    let signed = sturdy::webhook::sign_stripe(STRIPE_SECRET, old, body);
    let v1 = signed
        .split(',')
        .find(|p| p.starts_with("v1="))
        .unwrap()
        .to_owned();
    for header in [
        format!("t={old},t={now},{v1}"),
        format!("t={now},t={old},{v1}"),
        format!("t={now},{v1},t={old}"),
        format!("{v1},t={old},t={now}"),
    ] {
        let mut h = HeaderMap::new();
        h.insert("stripe-signature", hv(&header));
        let r = check(&v, &h, body);
        assert!(
            r.is_err(),
            "an hour-old signature passed as fresh with {header}"
        );
    }
    // The honest delivery passes.
    let mut h = HeaderMap::new();
    h.insert(
        "stripe-signature",
        hv(&sturdy::webhook::sign_stripe(STRIPE_SECRET, now, body)),
    );
    check(&v, &h, body).unwrap();
}

#[test]
fn standard_duplicated_timestamp_headers_cannot_freshen_an_old_signature() {
    let _g = SERIAL.blocking_lock();
    let v = sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap();
    let body = br#"{"type":"x"}"#;
    let old = now_secs() - 3600;
    let now = now_secs();
    let sig = sturdy::webhook::sign_standard(SW_SECRET, "msg_1", old, body).unwrap();
    for order in [[old, now], [now, old]] {
        let mut h = standard_headers("msg_1", &order[0].to_string(), &sig);
        h.append("webhook-timestamp", hv(&order[1].to_string()));
        assert!(
            check(&v, &h, body).is_err(),
            "two timestamps {order:?} let an old signature through"
        );
    }
    let mut h = standard_headers("msg_1", &format!("{old}, {now}"), &sig);
    h.append("webhook-id", hv("msg_2"));
    assert!(check(&v, &h, body).is_err());
}

#[test]
fn standard_extreme_timestamps_are_refused_without_panic() {
    let _g = SERIAL.blocking_lock();
    let v = sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap();
    let body = b"{}";
    let sig = sturdy::webhook::sign_standard(SW_SECRET, "msg_1", now_secs(), body).unwrap();
    let ten_k = "9".repeat(10_000);
    let cases = [
        u64::MAX.to_string(),
        i64::MIN.to_string(),
        i64::MAX.to_string(),
        "-1".to_owned(),
        format!("{}.5", now_secs()),
        format!("+{}", now_secs()),
        format!("{}e0", now_secs()),
        ten_k,
        String::new(),
        "\"1\"".to_owned(),
    ];
    for ts in cases {
        let h = standard_headers("msg_1", &ts, &sig);
        let r = check(&v, &h, body).expect_err(&ts[..ts.len().min(30)]);
        assert!(
            r.status == StatusCode::BAD_REQUEST || r.status == StatusCode::UNAUTHORIZED,
            "{ts:.30}: {r}"
        );
        assert!(r.reason.len() < 1_000, "reason of {} bytes", r.reason.len());
    }
}

/// `MAX_SIGNATURES`: only the first 16 `v1` entries are considered, and a header of 10,000
/// entries costs time linear in its length.
#[test]
fn standard_ten_thousand_signature_entries_are_linear_and_only_16_count() {
    let _g = SERIAL.blocking_lock();
    let v = sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap();
    let body = vec![b'a'; 1024];
    let ts = now_secs();
    let good = sturdy::webhook::sign_standard(SW_SECRET, "msg_1", ts, &body).unwrap();
    let bad = sturdy::webhook::sign_standard(SW_SECRET, "msg_other", ts, &body).unwrap();
    let header = |n: usize, last: &str| {
        let mut s = vec![bad.as_str(); n];
        s.push(last);
        s.join(" ")
    };
    // The valid one 17th: not considered.
    let h = standard_headers("msg_1", &ts.to_string(), &header(16, &good));
    assert_eq!(
        check(&v, &h, &body).unwrap_err().status,
        StatusCode::UNAUTHORIZED
    );
    let h = standard_headers("msg_1", &ts.to_string(), &header(15, &good));
    check(&v, &h, &body).unwrap();
    let time = |n: usize| {
        let h = standard_headers("msg_1", &ts.to_string(), &header(n, &bad));
        let t0 = StdInstant::now();
        for _ in 0..5 {
            let _ = check(&v, &h, &body);
        }
        t0.elapsed()
    };
    let _ = time(1_000);
    let small = (0..3).map(|_| time(1_000)).min().unwrap();
    let large = (0..3).map(|_| time(10_000)).min().unwrap();
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 30.0,
        "10x the entries took {ratio:.1}x the time ({small:?} vs {large:?})"
    );
}

#[test]
fn stripe_ten_thousand_comma_entries_are_linear() {
    let _g = SERIAL.blocking_lock();
    let v = sturdy::webhook::Stripe::new(STRIPE_SECRET).unwrap();
    let body = br#"{"id":"evt_1"}"#;
    let ts = now_secs();
    let time = |n: usize| {
        let mut s = format!("t={ts}");
        for i in 0..n {
            s.push_str(&format!(",v1={i:064x},v0=x,t={ts},k\"{i}"));
        }
        let mut h = HeaderMap::new();
        h.insert("stripe-signature", hv(&s));
        let t0 = StdInstant::now();
        for _ in 0..5 {
            assert!(check(&v, &h, body).is_err());
        }
        t0.elapsed()
    };
    let _ = time(1_000);
    let small = (0..3).map(|_| time(1_000)).min().unwrap();
    let large = (0..3).map(|_| time(10_000)).min().unwrap();
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 30.0,
        "10x the entries took {ratio:.1}x the time ({small:?} vs {large:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// The server's Idempotency-Key
// ---------------------------------------------------------------------------------------------

fn idempotent_app(runs: Arc<AtomicUsize>) -> axum::Router {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, body)
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
}

async fn post_with_keys(app: &axum::Router, keys: &[HeaderValue]) -> (StatusCode, String) {
    let mut req = Request::post("http://localhost/orders")
        .header("x-api-key", "client-a")
        .body(axum::body::Body::from("{\"n\":1}"))
        .unwrap();
    for k in keys {
        req.headers_mut().append("idempotency-key", k.clone());
    }
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn idempotency_key_repeated_10_000_times_is_one_key() {
    let _g = SERIAL.lock().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = idempotent_app(runs.clone());
    let keys = vec![hv("order-42"); 10_000];
    let (s1, _) = post_with_keys(&app, &keys).await;
    assert_eq!(s1, StatusCode::CREATED);
    let (s2, _) = post_with_keys(&app, &[hv("order-42")]).await;
    assert_eq!(s2, StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one key: replayed");
}

#[tokio::test]
async fn idempotency_key_malformed_values_are_400_before_the_handler() {
    let _g = SERIAL.lock().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = idempotent_app(runs.clone());
    let cases: Vec<HeaderValue> = vec![
        hv("a b"),
        hv("a\tb"),
        hv(&"k".repeat(256)),
        hv(&format!("\"{}\"", "k".repeat(256))),
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        HeaderValue::from_bytes(b"k\xff").unwrap(),
        hv(&"k".repeat(64 * 1024)),
        hv("\"\""),
    ];
    let mut wrong = Vec::new();
    for k in cases {
        let (status, body) = post_with_keys(&app, std::slice::from_ref(&k)).await;
        if status != StatusCode::BAD_REQUEST {
            wrong.push(format!("{k:.40?} -> {status}"));
        }
        assert!(body.len() < 2_000, "the answer echoes {} bytes", body.len());
        assert!(
            !body.contains(&"k".repeat(300)),
            "the key is echoed uncapped"
        );
    }
    assert!(wrong.is_empty(), "not refused: {wrong:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // The edge that is allowed: 255 visible characters.
    let (status, _) = post_with_keys(&app, &[hv(&"k".repeat(255))]).await;
    assert_eq!(status, StatusCode::CREATED);
}

// ---------------------------------------------------------------------------------------------
// X-RateLimit-Reset through the limiter
// ---------------------------------------------------------------------------------------------

async fn pause_after(reset: &str) -> Option<Duration> {
    let (layer, handle) = sturdy::ratelimit::RateLimitLayer::adaptive_only().pair();
    let reset = reset.to_owned();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(service_fn(move |_r: Request<Full<Bytes>>| {
            let reset = reset.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("x-ratelimit-remaining", "0")
                        .header("x-ratelimit-reset", reset)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        }));
    let req = Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap();
    svc.oneshot(req).await.unwrap();
    handle.pause("api.example.com")
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_reset_of_10_000_digits_and_extreme_dates_pause_at_most_five_minutes() {
    let _g = SERIAL.lock().await;
    let cap = Duration::from_secs(300);
    let cases = [
        format!("1{}", "0".repeat(9_999)),
        format!("1.{}", "9".repeat(9_999)),
        format!("{}.{}", "9".repeat(5_000), "9".repeat(5_000)),
        u64::MAX.to_string(),
        "9999-12-31T23:59:59Z".to_owned(),
        "9999-12-31T23:59:59.999999999+00:00".to_owned(),
        "Fri, 31 Dec 9999 23:59:59 GMT".to_owned(),
        "1e400".to_owned(),
    ];
    for c in &cases {
        let p = pause_after(c).await;
        assert!(p.is_none_or(|p| p <= cap), "{c:.30}: pause {p:?}");
    }
    // Past and malformed: no long pause.
    for c in [
        "0001-01-01T00:00:00Z",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "2026-13-45T99:99:99Z",
        "-5",
        "-99999999999999999999",
        "NaN",
        "inf",
        "",
    ] {
        let p = pause_after(c).await;
        assert!(
            p.is_none_or(|p| p <= Duration::from_secs(2)),
            "{c:?}: pause {p:?}"
        );
    }
}

#[test]
fn x_ratelimit_reset_parse_time_is_linear() {
    let _g = SERIAL.blocking_lock();
    let time = |n: usize| {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", hv("0"));
        h.insert("x-ratelimit-reset", hv(&format!("1.{}", "7".repeat(n))));
        let now = SystemTime::now();
        let t0 = StdInstant::now();
        for _ in 0..20 {
            let _ = sturdy::core::headers::XRateLimit::from_headers(&h, now);
            let _ = sturdy::core::headers::pause_hint(StatusCode::OK, &h, now);
        }
        t0.elapsed()
    };
    let _ = time(10_000);
    let small = (0..3).map(|_| time(10_000)).min().unwrap();
    let large = (0..3).map(|_| time(100_000)).min().unwrap();
    let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-6);
    assert!(
        ratio < 30.0,
        "10x the digits took {ratio:.1}x the time ({small:?} vs {large:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Pagination
// ---------------------------------------------------------------------------------------------

/// A JSON-cursor API of 3 pages whose cursors are `cursor_len` bytes long.
fn cursor_api(
    cursor_len: usize,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: Request<Full<Bytes>>| async move {
        let q = req.uri().query().unwrap_or("");
        let page = if q.contains("cursor=B") {
            2
        } else if q.contains("cursor=A") {
            1
        } else {
            0
        };
        let next = match page {
            0 => format!("\"A{}\"", "a".repeat(cursor_len)),
            1 => format!("\"B{}\"", "b".repeat(cursor_len)),
            _ => "null".to_owned(),
        };
        let body = format!(
            r#"{{"data":[{},{}],"next_cursor":{next}}}"#,
            page * 2,
            page * 2 + 1
        );
        Ok::<_, Infallible>(json_response(200, body))
    })
}

/// paginate.md: "the cursor is opaque and resumes exactly after the last item returned". A
/// server's own cursor longer than `MAX_CURSOR_LEN`: `page()` must not hand out a cursor it
/// will refuse.
#[tokio::test]
async fn page_cursor_from_a_server_cursor_past_max_cursor_len_resumes_or_fails_at_once() {
    let _g = SERIAL.lock().await;
    let long = sturdy::paginate::MAX_CURSOR_LEN + 100;
    let pager = sturdy::paginate::Paginate::new(
        cursor_api(long),
        "http://api.example.com/items",
        sturdy::paginate::JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    match pager.page(None, 2).await {
        Err(e) => {
            // Refused at once with a clear error: acceptable.
            assert_clean_message(&e.to_string());
        }
        Ok(p) => {
            assert_eq!(p.items.len(), 2);
            let cursor = p.next_cursor.expect("more pages");
            let next = pager.page(Some(&cursor), 2).await;
            let next = next.unwrap_or_else(|e| {
                panic!(
                    "page() refused the cursor it returned ({} bytes): {e}",
                    cursor.len()
                )
            });
            assert_eq!(next.items, vec![serde_json::json!(2), serde_json::json!(3)]);
        }
    }
}

#[tokio::test]
async fn page_body_of_json_nested_100_000_deep_is_a_named_error() {
    let _g = SERIAL.lock().await;
    let svc = service_fn(|_req: Request<Full<Bytes>>| async {
        let body = format!(
            r#"{{"data":[{}{}],"next_cursor":null}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        Ok::<_, Infallible>(json_response(200, body))
    });
    let pager = sturdy::paginate::Paginate::new(
        svc,
        "http://api.example.com/items",
        sturdy::paginate::JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    let err = pager.page(None, 10).await.unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Pagination, "{err}");
    assert!(err.to_string().len() < 2_000);
}

// ---------------------------------------------------------------------------------------------
// Memory linear in the input
// ---------------------------------------------------------------------------------------------

fn bytes_allocated(f: impl FnOnce()) -> u64 {
    let before = dhat::HeapStats::get();
    f();
    let after = dhat::HeapStats::get();
    after.total_bytes - before.total_bytes
}

#[test]
fn memory_of_hostile_headers_is_linear_in_the_input() {
    let _g = SERIAL.blocking_lock();
    let _profiler = dhat::Profiler::builder().testing().build();
    let now = SystemTime::now();
    // X-RateLimit-Reset of n digits.
    let reset = |n: usize| {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", hv("0"));
        h.insert("x-ratelimit-reset", hv(&format!("1.{}", "7".repeat(n))));
        bytes_allocated(|| {
            let _ = sturdy::core::headers::pause_hint(StatusCode::OK, &h, now);
        })
    };
    // The least of three: a thread left by an earlier test may allocate during one count.
    let least = |f: &dyn Fn() -> u64| (0..3).map(|_| f()).min().unwrap();
    let (a, b) = (least(&|| reset(10_000)), least(&|| reset(100_000)));
    assert!(b <= 20 * a.max(1_000), "reset: {a} then {b} bytes");
    assert!(
        b <= 4 * 100_000 + 10_000,
        "reset of 100 KB allocated {b} bytes"
    );
    // Standard Webhooks signature header of n entries.
    let v = sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap();
    let ts = now_secs();
    let sig = sturdy::webhook::sign_standard(SW_SECRET, "msg_x", ts, b"{}").unwrap();
    let sw = |n: usize| {
        let h = standard_headers("msg_1", &ts.to_string(), &vec![sig.as_str(); n].join(" "));
        bytes_allocated(|| {
            let _ = check(&v, &h, b"{}");
        })
    };
    let _ = sw(1_000);
    let (a, b) = (least(&|| sw(1_000)), least(&|| sw(10_000)));
    assert!(b <= 20 * a.max(1_000), "standard: {a} then {b} bytes");
    // Idempotency-Key repeated n times (a request built outside the count).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let app = idempotent_app(runs);
    let idem = |n: usize, key: &str| {
        let keys = vec![hv(key); n];
        bytes_allocated(|| {
            rt.block_on(post_with_keys(&app, &keys));
        })
    };
    let _ = idem(10, "warm");
    let (a, b) = (least(&|| idem(1_000, "k1")), least(&|| idem(10_000, "k2")));
    assert!(b <= 20 * a.max(10_000), "idempotency: {a} then {b} bytes");
}

// ---------------------------------------------------------------------------------------------
// What a hostile peer's text costs in the logs
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hostile_value(n: usize) -> HeaderValue {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.extend_from_slice(b"\"x\xff\tq=;,\\");
    }
    HeaderValue::from_bytes(&v).unwrap()
}

fn response_with(
    status: u16,
    headers: &[(&'static str, HeaderValue)],
    repeat: usize,
) -> Response<Full<Bytes>> {
    let mut r = Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap();
    for (name, value) in headers {
        for _ in 0..repeat {
            r.headers_mut().append(*name, value.clone());
        }
    }
    r
}

/// 64 KB values and 10,000 repeated headers of `Deprecation`, `Sunset`, `Retry-After`,
/// `RateLimit` and `webhook-signature`: no panic, and no log line carries the peer's text
/// uncapped.
#[tokio::test(start_paused = true)]
async fn hostile_header_text_is_never_logged_uncapped() {
    let _g = SERIAL.lock().await;
    let logs = Capture::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    let big = hostile_value(64 * 1024);
    let ascii = HeaderValue::from_str(&"\"x;q=,\\ @-1 t=9 r=0".repeat(3_300)).unwrap();
    let cases: Vec<(u16, Vec<(&'static str, HeaderValue)>, usize)> = vec![
        (200, vec![("deprecation", big.clone())], 1),
        (200, vec![("sunset", big.clone())], 1),
        (
            200,
            vec![("deprecation", ascii.clone()), ("sunset", ascii.clone())],
            1,
        ),
        (429, vec![("retry-after", ascii.clone())], 1),
        (
            200,
            vec![
                ("ratelimit", ascii.clone()),
                ("ratelimit-policy", ascii.clone()),
            ],
            1,
        ),
        (
            200,
            vec![
                ("x-ratelimit-remaining", hv("0")),
                ("x-ratelimit-reset", ascii.clone()),
            ],
            1,
        ),
        (
            200,
            vec![
                ("x-ratelimit-remaining", ascii.clone()),
                ("x-ratelimit-reset", hv("5")),
            ],
            1,
        ),
        (200, vec![("deprecation", hv("@99999999999999999999"))], 1),
        (200, vec![("deprecation", hv("@-99999999999999999999"))], 1),
        (
            200,
            vec![
                ("deprecation", hv("@1688169599")),
                ("sunset", hv("Fri, 31 Dec 9999 23:59:59 GMT")),
            ],
            10_000,
        ),
        (429, vec![("retry-after", big.clone())], 1),
        (429, vec![("retry-after", hv("5"))], 10_000),
        (
            200,
            vec![
                ("ratelimit", big.clone()),
                ("ratelimit-policy", big.clone()),
            ],
            1,
        ),
        (
            200,
            vec![
                ("x-ratelimit-remaining", hv("0")),
                ("x-ratelimit-reset", big.clone()),
            ],
            1,
        ),
    ];
    let mut path = 0;
    for (status, headers, repeat) in cases {
        path += 1;
        let resp = Arc::new(std::sync::Mutex::new(Some(response_with(
            status, &headers, repeat,
        ))));
        let api = service_fn(move |_r: Request<Full<Bytes>>| {
            let resp = resp.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(resp) }
        });
        let svc = tower::ServiceBuilder::new()
            .layer(sturdy::version::VersionLayer::header("api-version", "2024-06-01").unwrap())
            .layer(sturdy::ratelimit::RateLimitLayer::adaptive_only())
            .service(api);
        let req = Request::get(format!("http://api.example.com/v1/{path}"))
            .body(Full::default())
            .unwrap();
        let _ = svc.oneshot(req).await;
    }
    // Webhook headers the receiver refuses: the reason goes to tracing.
    let (queue, _events) = sturdy::webhook::MemoryQueue::new(10);
    let receiver = sturdy::webhook::WebhookReceiver::new(
        sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap(),
        queue,
    );
    for (name, value) in [
        ("webhook-signature", big.clone()),
        ("webhook-timestamp", big.clone()),
        ("webhook-id", big.clone()),
        ("webhook-signature", ascii.clone()),
        ("webhook-timestamp", ascii.clone()),
        ("webhook-id", ascii.clone()),
    ] {
        let mut req = Request::post("http://localhost/hook")
            .body(axum::body::Body::from("{}"))
            .unwrap();
        let h = req.headers_mut();
        h.insert("webhook-id", hv("msg_1"));
        h.insert("webhook-timestamp", hv(&now_secs().to_string()));
        h.insert("webhook-signature", hv("v1,AAAA"));
        h.insert(name, value);
        let resp = receiver.clone().oneshot(req).await.unwrap();
        assert!(resp.status().is_client_error(), "{name}: {}", resp.status());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            body.len() < 100,
            "{name}: the answer is short and generic: {body:?}"
        );
    }
    drop(_default);
    let text = logs.0.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&text);
    let longest = text.lines().map(str::len).max().unwrap_or(0);
    let lines = text.lines().count();
    eprintln!("captured {lines} lines, longest {longest}:\n{text:.3000}");
    assert!(
        longest < 4_096,
        "a log line of {longest} bytes: {:.300}",
        text.lines().max_by_key(|l| l.len()).unwrap_or("")
    );
    assert!(lines < 200, "{lines} log lines");
    assert!(
        !text.contains('\u{fffd}'),
        "raw non-UTF-8 bytes were logged"
    );
}

// ---------------------------------------------------------------------------------------------
// Slow and endless peers on a real socket (real time, millisecond settings)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Peer {
    /// The head (with a content-length), then one byte every 10 ms, forever.
    Trickle,
    /// A chunked body that never ends, as fast as the socket takes it.
    EndlessChunked,
}

/// A raw TCP server on 127.0.0.1 playing `peer`; the task is aborted by the caller.
async fn hostile_server(peer: Peer) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = sock.read(&mut buf).await;
                match peer {
                    Peer::Trickle => {
                        let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4000\r\n\r\n{\"data\":[";
                        if sock.write_all(head).await.is_err() {
                            return;
                        }
                        loop {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            if sock.write_all(b"1").await.is_err() {
                                return;
                            }
                        }
                    }
                    Peer::EndlessChunked => {
                        let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                        if sock.write_all(head).await.is_err() {
                            return;
                        }
                        let mut chunk = b"1000\r\n".to_vec();
                        chunk.extend_from_slice(&[b' '; 4096]);
                        chunk.extend_from_slice(b"\r\n");
                        loop {
                            if sock.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// paginate.md: "the timeout covers the response head and the whole body".
#[tokio::test]
async fn page_trickled_one_byte_per_10ms_is_cut_at_the_page_timeout() {
    let _g = SERIAL.lock().await;
    let (addr, server) = hostile_server(Peer::Trickle).await;
    let pager = sturdy::paginate::Paginate::builder(
        hyper_client(),
        &format!("http://{addr}/items"),
        sturdy::paginate::JsonCursor::new("/data", "/next_cursor"),
    )
    .with_page_timeout(Duration::from_millis(300))
    .build()
    .unwrap();
    let t0 = StdInstant::now();
    let err = pager.page(None, 10).await.unwrap_err();
    let took = t0.elapsed();
    server.abort();
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn page_endless_chunked_body_stops_at_the_page_limit() {
    let _g = SERIAL.lock().await;
    let (addr, server) = hostile_server(Peer::EndlessChunked).await;
    let pager = sturdy::paginate::Paginate::builder(
        hyper_client(),
        &format!("http://{addr}/items"),
        sturdy::paginate::JsonCursor::new("/data", "/next_cursor"),
    )
    .with_max_page_bytes(64 * 1024)
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let t0 = StdInstant::now();
    let err = pager.page(None, 10).await.unwrap_err();
    let took = t0.elapsed();
    server.abort();
    assert_eq!(*err.kind(), ErrorKind::Body, "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// coalesce.md: "past 30 s from the head (`.with_body_timeout(d)`), each caller gets a
/// `Timeout` error": a body that trickles in is bounded too, not only one that stalls.
#[tokio::test]
async fn coalesced_get_trickled_body_is_cut_at_the_body_timeout() {
    let _g = SERIAL.lock().await;
    let (addr, server) = hostile_server(Peer::Trickle).await;
    let svc = tower::ServiceBuilder::new()
        .layer(sturdy::coalesce::CoalesceLayer::new().with_body_timeout(Duration::from_millis(300)))
        .service(hyper_client());
    let uri = format!("http://{addr}/record");
    let call = |svc: sturdy::coalesce::Coalesce<_, _>| {
        let uri = uri.clone();
        async move {
            let req = Request::get(uri).body(Full::default()).unwrap();
            match svc.oneshot(req).await {
                Ok(resp) => resp
                    .into_body()
                    .collect()
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let t0 = StdInstant::now();
    let (a, b) = tokio::join!(call(svc.clone()), call(svc.clone()));
    let took = t0.elapsed();
    server.abort();
    assert!(a.is_err() && b.is_err(), "{a:?} {b:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// coalesce.md: a response past `with_max_body` "is not shared. The caller that started the call
/// gets it, streamed": an endless chunked body is never buffered whole.
#[tokio::test]
async fn coalesced_get_endless_chunked_body_is_not_buffered_past_the_bound() {
    let _g = SERIAL.lock().await;
    let (addr, server) = hostile_server(Peer::EndlessChunked).await;
    let svc = tower::ServiceBuilder::new()
        .layer(sturdy::coalesce::CoalesceLayer::new().with_max_body(64 * 1024))
        .service(hyper_client());
    let req = Request::get(format!("http://{addr}/record"))
        .body(Full::default())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(3), svc.oneshot(req))
        .await
        .expect("the head came back while the body streams")
        .unwrap();
    let mut body = resp.into_body();
    let mut got = 0usize;
    while got < 256 * 1024 {
        let frame = tokio::time::timeout(Duration::from_secs(3), body.frame())
            .await
            .unwrap();
        let frame = frame.unwrap().unwrap();
        if let Some(d) = frame.data_ref() {
            got += d.len();
        }
    }
    server.abort();
}

// ---------------------------------------------------------------------------------------------
// Forwarding headers, repeated ids, hostile webhook bodies
// ---------------------------------------------------------------------------------------------

/// A proxy that appends its own `X-Forwarded-For` line (HAProxy's `option forwardfor`) after
/// the client's own line: the header is one list (RFC 9110 §5.3), walked from the right, so the
/// client's forged first line is not the source.
#[test]
fn x_forwarded_for_on_two_lines_is_one_list_walked_from_the_right() {
    let _g = SERIAL.blocking_lock();
    let list = sturdy::webhook::SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let mut h = HeaderMap::new();
    h.append("x-forwarded-for", hv("192.30.252.7"));
    h.append("x-forwarded-for", hv("203.0.113.9"));
    assert_eq!(
        list.source(proxy, &h),
        Some("203.0.113.9".parse().unwrap()),
        "the rightmost untrusted hop is the source"
    );
    assert!(
        !list.allows(proxy, &h),
        "a client's forged first line let it in"
    );
    // The other way round: the sender's address is the proxy's line.
    let mut h = HeaderMap::new();
    h.append("x-forwarded-for", hv("203.0.113.9"));
    h.append("x-forwarded-for", hv("192.30.252.7"));
    assert!(list.allows(proxy, &h));
}

#[test]
fn forwarded_on_two_lines_is_one_list_walked_from_the_right() {
    let _g = SERIAL.blocking_lock();
    let list = sturdy::webhook::SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap()
        .with_forwarded_header(sturdy::webhook::ForwardedHeader::Forwarded);
    let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let mut h = HeaderMap::new();
    h.append("forwarded", hv("for=192.30.252.7"));
    h.append("forwarded", hv("for=203.0.113.9"));
    assert!(
        !list.allows(proxy, &h),
        "a client's forged first line let it in"
    );
}

/// 10,000 forwarding entries and 10,000 header lines from a trusted proxy: refused or read,
/// in time linear in the input.
#[test]
fn x_forwarded_for_of_10_000_entries_costs_linear_time() {
    let _g = SERIAL.blocking_lock();
    let list = sturdy::webhook::SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let proxy: std::net::IpAddr = "10.0.0.1".parse().unwrap();
    let time = |n: usize, lines: bool| {
        let mut h = HeaderMap::new();
        if lines {
            for _ in 0..n {
                h.append("x-forwarded-for", hv("10.1.1.1, unknown, 192.30.252.7"));
            }
        } else {
            h.insert("x-forwarded-for", hv(&vec!["10.1.1.1"; n].join(", ")));
        }
        let t0 = StdInstant::now();
        for _ in 0..5 {
            let _ = list.allows(proxy, &h);
        }
        t0.elapsed()
    };
    for lines in [false, true] {
        let _ = time(1_000, lines);
        let small = (0..3).map(|_| time(1_000, lines)).min().unwrap();
        let large = (0..3).map(|_| time(10_000, lines)).min().unwrap();
        let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-6);
        assert!(
            ratio < 30.0,
            "lines={lines}: {ratio:.1}x ({small:?} vs {large:?})"
        );
    }
}

/// idempotency.md: "two or more different key headers on one request ... 400". 10,000 distinct
/// keys cost time linear in their number.
#[tokio::test]
async fn idempotency_10_000_different_keys_are_400_in_linear_time() {
    let _g = SERIAL.lock().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = idempotent_app(runs.clone());
    let mut times = Vec::new();
    for n in [1_000usize, 1_000, 10_000] {
        let keys: Vec<HeaderValue> = (0..n).map(|i| hv(&format!("key-{i}"))).collect();
        // The fastest of five: a run that other threads preempted only ever takes longer.
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t0 = StdInstant::now();
            let (status, _) = post_with_keys(&app, &keys).await;
            best = best.min(t0.elapsed());
            assert_eq!(status, StatusCode::BAD_REQUEST);
        }
        times.push(best);
    }
    let ratio = times[2].as_secs_f64() / times[1].as_secs_f64().max(1e-6);
    assert!(ratio < 30.0, "{ratio:.1}x ({times:?})");
    // Byte-identical repeats but the last: still two keys.
    let mut keys = vec![hv("same"); 9_999];
    keys.push(hv("other"));
    assert_eq!(post_with_keys(&app, &keys).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

async fn deliver<Q: sturdy::webhook::EventQueue>(
    receiver: &sturdy::webhook::WebhookReceiver<Q>,
    headers: HeaderMap,
    body: &'static [u8],
) -> StatusCode {
    let mut req = Request::post("http://localhost/hook")
        .body(axum::body::Body::from(body))
        .unwrap();
    *req.headers_mut() = headers;
    receiver.clone().oneshot(req).await.unwrap().status()
}

/// A signed Standard Webhooks delivery resent with a second `webhook-id` line (before or after
/// the signed one) is the same event: never queued twice under another id.
#[tokio::test]
async fn standard_delivery_resent_with_a_second_webhook_id_line_is_not_queued_again() {
    let _g = SERIAL.lock().await;
    let (queue, mut events) = sturdy::webhook::MemoryQueue::new(100);
    let receiver = sturdy::webhook::WebhookReceiver::new(
        sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap(),
        queue,
    );
    let body: &'static [u8] = br#"{"type":"order.paid"}"#;
    let ts = now_secs();
    let sig = sturdy::webhook::sign_standard(SW_SECRET, "msg_1", ts, body).unwrap();
    let base = standard_headers("msg_1", &ts.to_string(), &sig);
    assert_eq!(deliver(&receiver, base.clone(), body).await, StatusCode::OK);
    let mut after = base.clone();
    after.append("webhook-id", hv("msg_forged"));
    let mut before = standard_headers("msg_forged", &ts.to_string(), &sig);
    before.append("webhook-id", hv("msg_1"));
    let mut statuses = Vec::new();
    for h in [after, before] {
        statuses.push(deliver(&receiver, h, body).await);
    }
    let mut ids = Vec::new();
    while let Some(e) = events.try_recv() {
        ids.push(e.id.clone());
    }
    assert_eq!(ids, ["msg_1"], "statuses of the resends: {statuses:?}");
}

/// Stripe bodies a hostile (or broken) sender signs: JSON nested 100,000 deep, an `id` of
/// 10,000 characters, a number of 10,000 digits, duplicated `id` keys. Each is accepted or
/// refused without a crash, and a resend of the same bytes is never queued twice.
#[tokio::test]
async fn stripe_hostile_signed_bodies_are_queued_once() {
    let _g = SERIAL.lock().await;
    let bodies: Vec<&'static [u8]> = vec![
        Box::leak(
            format!(
                r#"{{"id":"evt_deep","x":{}{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            )
            .into_bytes()
            .into_boxed_slice(),
        ),
        Box::leak(
            format!(r#"{{"id":"evt_{}"}}"#, "a".repeat(10_000))
                .into_bytes()
                .into_boxed_slice(),
        ),
        Box::leak(
            format!(r#"{{"id":"evt_num","n":{}}}"#, "9".repeat(10_000))
                .into_bytes()
                .into_boxed_slice(),
        ),
        br#"{"id":"evt_dup","id":"evt_dup2"}"#,
        br#"{"id":"evt_nul\u0000\u001b"}"#,
        br#"{"id":12345}"#,
        b"\xff\xfe not json",
    ];
    let (queue, mut events) = sturdy::webhook::MemoryQueue::new(100);
    let receiver = sturdy::webhook::WebhookReceiver::new(
        sturdy::webhook::Stripe::new(STRIPE_SECRET).unwrap(),
        queue,
    );
    let ts = now_secs();
    for (i, body) in bodies.iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert(
            "stripe-signature",
            hv(&sturdy::webhook::sign_stripe(STRIPE_SECRET, ts, body)),
        );
        let first = deliver(&receiver, h.clone(), body).await;
        let second = deliver(&receiver, h, body).await;
        assert!(
            first == StatusCode::OK || first.is_client_error(),
            "body {i}: {first}"
        );
        assert!(
            second == StatusCode::OK || second.is_client_error(),
            "body {i}: {second}"
        );
        let mut n = 0;
        while let Some(e) = events.try_recv() {
            n += 1;
            assert!(e.id.len() <= 256, "body {i}: an id of {} bytes", e.id.len());
        }
        assert!(n <= 1, "body {i} queued {n} times");
        if first == StatusCode::OK {
            assert_eq!(n, 1, "body {i}: 200 but not queued");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Status codes outside 100..=599
// ---------------------------------------------------------------------------------------------

/// sturdy-core `ErrorKind::from_status`: "The kind of an HTTP status, or `None` for an
/// informational, success or redirect status (1xx, 2xx, 3xx)". 600 to 999 are none of those
/// (RFC 9110 §15: invalid; a client SHOULD process them as 5xx).
#[test]
fn status_600_to_999_is_not_classified_as_success() {
    let _g = SERIAL.blocking_lock();
    let mut wrong = Vec::new();
    for code in [600u16, 700, 999] {
        let st = StatusCode::from_u16(code).unwrap();
        if ErrorKind::from_status(st).is_none()
            || sturdy::core::classify::classify_status(st).is_success()
        {
            wrong.push(code);
        }
    }
    assert!(wrong.is_empty(), "read as success: {wrong:?}");
}

/// A raw TCP peer answering `HTTP/1.1 999`: circuit.md counts "a 5xx" as a failure, and RFC
/// 9110 §15 says an invalid status is processed as a 5xx.
#[tokio::test]
async fn a_peer_answering_999_counts_as_a_breaker_failure() {
    let _g = SERIAL.lock().await;
    let (addr, _hits, server) =
        fixed_server(b"HTTP/1.1 999 Library Error\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
    let (layer, handle) = sturdy::circuit::CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(hyper_client());
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let req = Request::get(format!("http://{addr}/x"))
            .body(Full::default())
            .unwrap();
        match svc.clone().oneshot(req).await {
            Ok(r) => statuses.push(r.status().as_u16().to_string()),
            Err(e) => statuses.push(e.to_string()),
        }
    }
    server.abort();
    let key = addr.to_string();
    let state = handle.state(&key);
    assert!(
        matches!(state, Some(sturdy::circuit::CircuitState::Open { .. })),
        "state {state:?} after {statuses:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Secrets in messages and events while a token endpoint trickles
// ---------------------------------------------------------------------------------------------

/// A token URL with a password and a query key, a token endpoint that trickles, callers that
/// give up (token timeout, dropped calls): no message, `Debug` output or event holds the
/// client secret, the URL's password or its query value.
#[tokio::test]
async fn trickling_token_endpoint_leaks_no_secret_in_errors_or_events() {
    let _g = SERIAL.lock().await;
    let (addr, server) = hostile_server(Peer::Trickle).await;
    let events = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (e1, e2) = (events.clone(), events.clone());
    let url = format!("http://user:hunter2pw@{addr}/oauth/token?api_key=qk7secretvalue");
    let cc = sturdy::auth::ClientCredentials::new(
        hyper_client(),
        &url,
        "client-id",
        "s3cr3t-client-secret",
    )
    .unwrap()
    .with_request_timeout(Duration::from_millis(250))
    .on_event(move |e| e1.lock().unwrap().push(format!("{e:?}")));
    let layer = sturdy::auth::AuthLayer::oauth2(cc)
        .with_token_timeout(Duration::from_millis(80))
        .on_event(move |e| e2.lock().unwrap().push(format!("{e:?}")));
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    });
    let svc = tower::ServiceBuilder::new().layer(layer).service(api);
    let mut texts = Vec::new();
    // A call dropped mid-wait, then calls that time out waiting, then one after the failure.
    let dropped = tokio::time::timeout(
        Duration::from_millis(20),
        svc.clone().oneshot(
            Request::get("http://api.example.com/a")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await;
    assert!(dropped.is_err());
    for _ in 0..4 {
        let r = svc
            .clone()
            .oneshot(
                Request::get("http://api.example.com/a")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        let err = r.expect_err("no token can be had");
        texts.push(err.to_string());
        texts.push(format!("{err:?}"));
        let mut src = err.source();
        while let Some(s) = src {
            texts.push(s.to_string());
            src = s.source();
        }
        let summary = sturdy::core::ErrorSummary::of(&*err);
        texts.push(format!("{summary:?}"));
    }
    server.abort();
    texts.extend(events.lock().unwrap().iter().cloned());
    for t in &texts {
        for secret in ["s3cr3t-client-secret", "hunter2pw", "qk7secretvalue"] {
            assert!(!t.contains(secret), "{secret} leaked in {t}");
        }
        assert!(
            !t.chars().any(char::is_control),
            "a control character in {t:?}"
        );
    }
    assert!(texts.iter().any(|t| t.contains("token")), "{texts:?}");
}

/// webhooks.md: "With the age check turned off (`with_tolerance(Duration::MAX)`), a copy passes
/// at any age, so its key is kept as long as the queue keeps a key at all". Signed timestamps
/// at the ends of `i64`: accepted once, their copies refused, no overflow.
#[tokio::test]
async fn standard_extreme_signed_timestamps_without_age_check_are_deduplicated() {
    let _g = SERIAL.lock().await;
    let (queue, mut events) = sturdy::webhook::MemoryQueue::new(100);
    let verifier = sturdy::webhook::StandardWebhooks::new(SW_SECRET)
        .unwrap()
        .with_tolerance(Duration::MAX);
    let receiver = sturdy::webhook::WebhookReceiver::new(verifier, queue);
    let body: &'static [u8] = b"{}";
    let mut report = Vec::new();
    for (i, ts) in [
        i64::MIN,
        i64::MIN + 1,
        -1,
        0,
        253_402_300_800,
        i64::MAX - 1,
        i64::MAX,
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("msg_{i}");
        let sig = sturdy::webhook::sign_standard(SW_SECRET, &id, ts, body).unwrap();
        let h = standard_headers(&id, &ts.to_string(), &sig);
        let first = deliver(&receiver, h.clone(), body).await;
        let second = deliver(&receiver, h, body).await;
        let mut n = 0;
        while events.try_recv().is_some() {
            n += 1;
        }
        report.push((ts, first.as_u16(), second.as_u16(), n));
    }
    assert!(
        report
            .iter()
            .all(|&(_, a, b, n)| a == 200 && b == 200 && n == 1),
        "(timestamp, first, copy, queued): {report:?}"
    );
}

/// The same through the Redis queue: its dedup key's TTL comes from the signed timestamp and
/// the tolerance; at the ends of `i64` with `Duration::MAX`, no overflow, no error, one event.
#[tokio::test]
async fn redis_queue_extreme_signed_timestamps_without_age_check_are_deduplicated() {
    let _g = SERIAL.lock().await;
    let Ok(url) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let stream = format!(
        "s114-ts-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut consumer = sturdy::redis::RedisStreamConsumer::connect(
        &url,
        stream.clone(),
        "g",
        "c1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    let queue = sturdy::redis::RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let verifier = sturdy::webhook::StandardWebhooks::new(SW_SECRET)
        .unwrap()
        .with_tolerance(Duration::MAX);
    let receiver = sturdy::webhook::WebhookReceiver::new(verifier, queue);
    let body: &'static [u8] = b"{}";
    let stamps = [i64::MIN, -1, 0, 253_402_300_800, i64::MAX];
    let mut statuses = Vec::new();
    for (i, ts) in stamps.into_iter().enumerate() {
        let id = format!("msg_{i}");
        let sig = sturdy::webhook::sign_standard(SW_SECRET, &id, ts, body).unwrap();
        let h = standard_headers(&id, &ts.to_string(), &sig);
        statuses.push((
            ts,
            deliver(&receiver, h.clone(), body).await.as_u16(),
            deliver(&receiver, h, body).await.as_u16(),
        ));
    }
    let mut ids = Vec::new();
    while let Some(d) = consumer.next().await.unwrap() {
        ids.push(d.event.id.clone());
        consumer.ack(&d).await.unwrap();
    }
    ids.sort();
    assert!(
        statuses.iter().all(|&(_, a, b)| a == 200 && b == 200),
        "(timestamp, first, copy): {statuses:?}"
    );
    assert_eq!(
        ids,
        ["msg_0", "msg_1", "msg_2", "msg_3", "msg_4"],
        "{statuses:?}"
    );
}

/// A raw TCP server answering every request with `response` (keep-alive), counting requests.
async fn fixed_server(
    response: Vec<u8>,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let response = Arc::new(response);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (h, response) = (h.clone(), response.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = sock.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        h.fetch_add(1, Ordering::SeqCst);
                        if sock.write_all(&response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, hits, task)
}

/// paginate.md: "A forged, edited or truncated cursor ... is refused before any request is
/// sent. A cursor is at most 16 KiB". Hostile cursors: 64 KiB, control bytes, non-ASCII, empty,
/// a valid cursor with one byte changed or appended: refused, no request, a short message
/// without the cursor's text.
#[tokio::test]
async fn page_hostile_cursors_are_refused_before_any_request_with_a_short_message() {
    let _g = SERIAL.lock().await;
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let inner = cursor_api(10);
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        h.fetch_add(1, Ordering::SeqCst);
        inner.clone().oneshot(req)
    });
    let pager = sturdy::paginate::Paginate::new(
        svc,
        "http://api.example.com/items",
        sturdy::paginate::JsonCursor::new("/data", "/next_cursor"),
    )
    .unwrap();
    let good = pager.page(None, 1).await.unwrap().next_cursor.unwrap();
    let before = hits.load(Ordering::SeqCst);
    let mut edited = good.clone().into_bytes();
    let last = edited.len() - 1;
    edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
    let cases = [
        "Q".repeat(64 * 1024),
        "Q".repeat(sturdy::paginate::MAX_CURSOR_LEN),
        "\0\u{1b}[2J\r\nX-Injected: 1".to_owned(),
        "curseur-é-✓".to_owned(),
        String::new(),
        String::from_utf8(edited).unwrap(),
        format!("{good}A"),
        good[..good.len() / 2].to_owned(),
        format!("{good}{}", "=".repeat(10_000)),
    ];
    for c in &cases {
        let err = pager
            .page(Some(c), 5)
            .await
            .expect_err(&c[..c.len().min(20)]);
        let msg = err.to_string();
        assert_eq!(*err.kind(), ErrorKind::Pagination, "{msg}");
        assert!(msg.len() < 1_000, "a message of {} bytes", msg.len());
        assert_clean_message(&msg);
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        before,
        "a hostile cursor sent a request"
    );
    // The good cursor still works.
    assert_eq!(
        pager.page(Some(&good), 1).await.unwrap().items,
        vec![serde_json::json!(1)]
    );
}

/// idempotency.md (`IdempotencyLayer::new`): "request bodies up to 1 MiB". A client that sends an
/// endless chunked body with a key gets 413 once the limit has arrived; the handler never runs
/// and the key is not kept locked.
#[tokio::test]
async fn idempotent_request_with_an_endless_body_is_413_and_frees_its_key() {
    let _g = SERIAL.lock().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = idempotent_app(runs.clone());
    let sent = Arc::new(AtomicUsize::new(0));
    let s = sent.clone();
    let stream = futures_util::stream::repeat_with(move || {
        s.fetch_add(16 * 1024, Ordering::SeqCst);
        Ok::<_, Infallible>(Bytes::from(vec![b'x'; 16 * 1024]))
    });
    let req = Request::post("http://localhost/orders")
        .header("x-api-key", "client-a")
        .header("idempotency-key", "endless-1")
        .body(axum::body::Body::from_stream(stream))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let read = sent.load(Ordering::SeqCst);
    assert!(
        read <= 2 * 1024 * 1024,
        "read {read} bytes of an endless body"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    // The key is free: a proper request with it runs.
    let (status, _) = post_with_keys(&app, &[hv("endless-1")]).await;
    assert_eq!(status, StatusCode::CREATED);
}

/// 10,000 separate `webhook-signature` / `Stripe-Signature` header lines cost time linear in
/// their number.
#[test]
fn ten_thousand_signature_header_lines_cost_linear_time() {
    let _g = SERIAL.blocking_lock();
    let sw = sturdy::webhook::StandardWebhooks::new(SW_SECRET).unwrap();
    let stripe = sturdy::webhook::Stripe::new(STRIPE_SECRET).unwrap();
    let body = br#"{"id":"evt_1"}"#;
    let ts = now_secs();
    let bad_sw = sturdy::webhook::sign_standard(SW_SECRET, "other", ts, body).unwrap();
    let bad_stripe = sturdy::webhook::sign_stripe("whsec_some_other_secret", ts, body);
    let time = |n: usize, which: &str| {
        let mut h = if which == "standard" {
            standard_headers("msg_1", &ts.to_string(), &bad_sw)
        } else {
            HeaderMap::new()
        };
        for _ in 0..n {
            if which == "standard" {
                h.append("webhook-signature", hv(&bad_sw));
            } else {
                h.append("stripe-signature", hv(&bad_stripe));
            }
        }
        let v: &dyn Verifier = if which == "standard" { &sw } else { &stripe };
        let t0 = StdInstant::now();
        for _ in 0..5 {
            assert!(check(v, &h, body).is_err());
        }
        t0.elapsed()
    };
    for which in ["standard", "stripe"] {
        let _ = time(1_000, which);
        let small = (0..3).map(|_| time(1_000, which)).min().unwrap();
        let large = (0..3).map(|_| time(10_000, which)).min().unwrap();
        let ratio = large.as_secs_f64() / small.as_secs_f64().max(1e-6);
        assert!(
            ratio < 30.0,
            "{which}: {ratio:.1}x ({small:?} vs {large:?})"
        );
    }
}

/// ratelimit.md: the `X-Rate-Limit-*` and `RateLimit-Remaining` spellings with a reset of
/// 10,000 digits, and a `RateLimit` `t` at the largest structured-field integer, pause at most
/// the 5-minute cap; a `t` past that integer's 15 digits is not a pause at all.
#[tokio::test(start_paused = true)]
async fn other_spellings_of_the_reset_at_10_000_digits_pause_at_most_the_cap() {
    let _g = SERIAL.lock().await;
    async fn pause_with(hs: Vec<(&'static str, String)>) -> Option<Duration> {
        let (layer, handle) = sturdy::ratelimit::RateLimitLayer::adaptive_only().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |_r: Request<Full<Bytes>>| {
                let hs = hs.clone();
                async move {
                    let mut b = Response::builder();
                    for (n, v) in hs {
                        b = b.header(n, v);
                    }
                    Ok::<_, Infallible>(b.body(Full::new(Bytes::new())).unwrap())
                }
            }));
        svc.oneshot(
            Request::get("http://api.example.com/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
        handle.pause("api.example.com")
    }
    let cap = Some(Duration::from_secs(300));
    let big = "9".repeat(10_000);
    assert_eq!(
        pause_with(vec![
            ("ratelimit-remaining", "0".into()),
            ("ratelimit-reset", big.clone())
        ])
        .await,
        cap
    );
    assert_eq!(
        pause_with(vec![
            ("x-rate-limit-remaining", "0".into()),
            ("x-rate-limit-reset", big.clone())
        ])
        .await,
        cap
    );
    assert_eq!(
        pause_with(vec![("ratelimit", "\"d\";r=0;t=999999999999999".into())]).await,
        cap
    );
    assert_eq!(
        pause_with(vec![("ratelimit", "\"d\";r=0;t=9999999999999999".into())]).await,
        None
    );
    assert_eq!(
        pause_with(vec![
            ("x-ratelimit-remaining", format!("{}0", "0".repeat(10_000))),
            ("x-ratelimit-reset", "30".into())
        ])
        .await,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        pause_with(vec![
            ("x-ratelimit-remaining", big),
            ("x-ratelimit-reset", "30".into())
        ])
        .await,
        None
    );
}

/// A peer that sends half a response head, then nothing: the attempt timeout ends the call.
#[tokio::test]
async fn a_half_sent_head_then_silence_is_cut_at_the_attempt_timeout() {
    let _g = SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = sock.read(&mut buf).await;
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-").await;
            held.push(sock);
        }
    });
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(Duration::from_millis(200))
        .build(hyper_client());
    let t0 = StdInstant::now();
    let err = client
        .oneshot(
            Request::get(format!("http://{addr}/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let took = t0.elapsed();
    server.abort();
    let summary = sturdy::core::ErrorSummary::of(&*err);
    assert_eq!(summary.kind, "timeout", "{err}");
    assert!(summary.may_have_been_processed, "the request was written");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

/// webhooks.md: "carried header values at most 1 KiB, 4 per name". A signed delivery whose
/// carried headers are 60 KB long or repeated 10,000 times is queued with them bounded.
#[tokio::test]
async fn carried_webhook_headers_are_bounded_for_hostile_senders() {
    let _g = SERIAL.lock().await;
    let within = |h: &HeaderMap| {
        let mut names: Vec<_> = h.keys().collect();
        names.dedup();
        names.iter().all(|n| {
            let vals: Vec<_> = h.get_all(*n).iter().collect();
            vals.len() <= 4 && vals.iter().all(|v| v.len() <= 1024)
        })
    };
    // Stripe: a valid v1 entry first, then 60 KB of other entries.
    let (queue, mut events) = sturdy::webhook::MemoryQueue::new(10);
    let receiver = sturdy::webhook::WebhookReceiver::new(
        sturdy::webhook::Stripe::new(STRIPE_SECRET).unwrap(),
        queue,
    );
    let body: &'static [u8] = br#"{"id":"evt_carried"}"#;
    let signed = sturdy::webhook::sign_stripe(STRIPE_SECRET, now_secs(), body);
    let long = format!("{signed}{}", ",v0=deadbeef".repeat(5_000));
    let mut h = HeaderMap::new();
    h.insert("stripe-signature", hv(&long));
    assert_eq!(deliver(&receiver, h, body).await, StatusCode::OK);
    let e = events.try_recv().expect("queued");
    assert!(
        within(&e.headers),
        "stripe carried {:?} bytes",
        e.headers.get("stripe-signature").map(HeaderValue::len)
    );
    // GitHub: `X-GitHub-Event` of 60 KB, and `X-GitHub-Delivery` on 10,000 lines.
    let secret = "gh-secret-s114";
    let (queue, mut events) = sturdy::webhook::MemoryQueue::new(10);
    let receiver =
        sturdy::webhook::WebhookReceiver::new(sturdy::webhook::GitHub::new(secret).unwrap(), queue);
    let body: &'static [u8] = br#"{"zen":"s114"}"#;
    let mut h = HeaderMap::new();
    h.insert(
        "x-hub-signature-256",
        hv(&sturdy::webhook::sign_github(secret, body)),
    );
    h.insert("x-github-event", hv(&"push".repeat(15_000)));
    for i in 0..10_000 {
        h.append("x-github-delivery", hv(&format!("d-{i}")));
    }
    assert_eq!(deliver(&receiver, h, body).await, StatusCode::OK);
    let e = events.try_recv().expect("queued");
    let sizes: Vec<(String, usize, usize)> = e
        .headers
        .keys()
        .map(|k| {
            (
                k.to_string(),
                e.headers.get_all(k).iter().count(),
                e.headers
                    .get_all(k)
                    .iter()
                    .map(HeaderValue::len)
                    .max()
                    .unwrap_or(0),
            )
        })
        .collect();
    assert!(
        within(&e.headers),
        "github carried (name, count, longest): {sizes:?}"
    );
}

/// paginate.md: "A page that is not the expected JSON is named by its number". Hostile bodies
/// (control bytes, non-UTF-8, 60 KB of text, a string where the items should be, a 10,000-digit
/// number as the cursor) give a short message without raw control characters.
#[tokio::test]
async fn bad_pages_give_short_clean_messages() {
    let _g = SERIAL.lock().await;
    let mut garbage = b"\x1b[31m\x00\xff\xfe".to_vec();
    garbage.extend(std::iter::repeat_n(b'z', 60_000));
    let bodies: Vec<Vec<u8>> = vec![
        garbage,
        format!(
            r#"{{"data":"\u0000\u001b[2J{}","next_cursor":null}}"#,
            "y".repeat(60_000)
        )
        .into_bytes(),
        format!(r#"{{"data":[1],"next_cursor":{}}}"#, "9".repeat(10_000)).into_bytes(),
        format!(
            r#"{{"data":[1],"next_cursor":{{"\u0000":{}}}}}"#,
            "1".repeat(1_000)
        )
        .into_bytes(),
        br#"{"data":[1],"next_cursor":"\u0000\r\nX: 1"}"#.to_vec(),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let body = Bytes::from(body);
        let svc = service_fn(move |_req: Request<Full<Bytes>>| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(json_response(200, body)) }
        });
        let pager = sturdy::paginate::Paginate::new(
            svc,
            "http://api.example.com/items",
            sturdy::paginate::JsonCursor::new("/data", "/next_cursor"),
        )
        .unwrap();
        match pager.page(None, 5).await {
            Err(err) => {
                let msg = err.to_string();
                assert!(
                    msg.len() < 1_000,
                    "body {i}: a message of {} bytes",
                    msg.len()
                );
                assert_clean_message(&msg);
            }
            Ok(p) => {
                // Only a page whose cursor is a usable string may pass.
                assert_eq!(i, 4, "body {i} passed: {p:?}");
            }
        }
    }
}
