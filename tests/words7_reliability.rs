//! docs/RELIABILITY.md, its bounds table read row by row: the pause a peer can ask for (any
//! status, `Retry-After`, `RateLimit`, `X-RateLimit-*` at their largest) capped at 5 min and
//! reported in `PauseCapped`, the 30 s wait for a rate slot, `Link` bounds, HTTP dates before
//! 1970, idempotency keys of 1 to 255 visible characters, and `Duration::MAX` in every setter
//! that takes a duration. Paused time, in process.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::headers::{parse_http_date, parse_link, RetryAfter, MAX_LINKS, MAX_LINK_PARAMS};
use sturdy::core::{find, CallOptions, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::server::{IdempotencyLayer, MemoryStore};
use sturdy::ratelimit::{PauseCapped, Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap()
}

/// An API whose first answer carries `headers` with `status`, then 200s; counts calls.
fn once(
    status: u16,
    headers: HeaderMap,
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |_req: Request<Full<Bytes>>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let h = headers.clone();
        async move {
            let mut res = Response::new(Full::default());
            if n == 0 {
                *res.status_mut() = StatusCode::from_u16(status).unwrap();
                *res.headers_mut() = h;
            }
            Ok::<_, Infallible>(res)
        }
    })
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

/// RELIABILITY.md:12: "a pause asked by `Retry-After` (seconds or date), `RateLimit` `r=0;t=`,
/// `X-RateLimit-Remaining: 0` + reset, on any status | at most `max_pause` [5 min]; a longer one
/// is stored as the cap and reported once (`PauseCapped` in the response's extensions ...)";
/// :48: "the next call waits at most 5 min".
#[tokio::test(start_paused = true)]
async fn any_pause_a_peer_asks_for_is_capped_at_5_minutes() {
    let cases: Vec<(u16, HeaderMap)> = vec![
        (429, headers(&[("retry-after", "99999999999999999999")])),
        (429, headers(&[("retry-after", "18446744073709551615")])),
        (
            503,
            headers(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
        ),
        (
            200,
            headers(&[("ratelimit", "\"default\";r=0;t=99999999999")]),
        ),
        (
            200,
            headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "99999999999"),
            ]),
        ),
    ];
    for (i, (status, h)) in cases.into_iter().enumerate() {
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = RateLimitLayer::adaptive_only()
            .with_max_wait(Duration::from_secs(600))
            .layer(once(status, h, calls.clone()));
        let res = svc.clone().oneshot(get()).await.unwrap();
        let capped = res
            .extensions()
            .get::<PauseCapped>()
            .unwrap_or_else(|| panic!("case {i}: no PauseCapped"));
        assert_eq!(capped.applied(), Duration::from_secs(300), "case {i}");
        assert!(capped.asked() > Duration::from_secs(300), "case {i}");
        let start = Instant::now();
        svc.clone().oneshot(get()).await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited <= Duration::from_secs(300) && waited >= Duration::from_secs(290),
            "case {i}: {waited:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}

/// RELIABILITY.md:14: "how long a call waits for a rate slot or a pause | `max_wait` [30 s], then
/// `RateLimited`".
#[tokio::test(start_paused = true)]
async fn a_call_that_would_wait_past_30s_is_refused_with_rate_limited() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = RateLimitLayer::adaptive_only().layer(once(
        429,
        headers(&[("retry-after", "31")]),
        calls.clone(),
    ));
    svc.clone().oneshot(get()).await.unwrap();
    let start = Instant::now();
    let err = svc.clone().oneshot(get()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    let rl = find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > Duration::from_secs(30),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A 29 s pause is waited out.
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = RateLimitLayer::adaptive_only().layer(once(
        429,
        headers(&[("retry-after", "29")]),
        calls.clone(),
    ));
    svc.clone().oneshot(get()).await.unwrap();
    let start = Instant::now();
    svc.clone().oneshot(get()).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(29),
        "{:?}",
        start.elapsed()
    );
}

/// RELIABILITY.md:24: "100 links kept by `parse_link` ..., 32 parameters per link".
#[test]
fn link_headers_are_bounded() {
    let mut links = String::new();
    for i in 0..1000 {
        if i > 0 {
            links.push_str(", ");
        }
        links.push_str(&format!("</items/{i}>; rel=\"item\""));
        for p in 0..100 {
            links.push_str(&format!("; p{p}=\"v\""));
        }
    }
    let mut h = HeaderMap::new();
    h.insert("link", HeaderValue::from_str(&links).unwrap());
    let parsed = parse_link(&h, "http://api.example.com/items");
    assert_eq!(MAX_LINKS, 100);
    assert_eq!(MAX_LINK_PARAMS, 32);
    assert_eq!(parsed.len(), 100);
    assert!(
        parsed.iter().all(|l| l.params().len() <= 32),
        "{}",
        parsed[0].params().len()
    );
    // The same header repeated 2,000 times as separate lines: still 100.
    let mut h = HeaderMap::new();
    for i in 0..2000 {
        h.append(
            "link",
            HeaderValue::from_str(&format!("</p/{i}>; rel=\"item\"")).unwrap(),
        );
    }
    assert_eq!(parse_link(&h, "http://api.example.com/").len(), 100);
}

/// RELIABILITY.md:40: "an HTTP date before 1970 (`Retry-After`, `Sunset`, `Deprecation`) | not a
/// date: an error, so the header is ignored (a four-digit year such as `0001` is never read as
/// 2001)".
#[test]
fn http_dates_before_1970_are_not_dates() {
    for d in [
        "Wed, 31 Dec 1969 23:59:59 GMT",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "Thu, 01 Jan 1900 00:00:00 GMT",
    ] {
        assert!(parse_http_date(d.as_bytes(), "retry-after").is_err(), "{d}");
        assert!(RetryAfter::parse(d.as_bytes()).is_err(), "{d}");
    }
    assert_eq!(
        parse_http_date(b"Thu, 01 Jan 1970 00:00:00 GMT", "retry-after").unwrap(),
        SystemTime::UNIX_EPOCH
    );
}

/// RELIABILITY.md:36: "an idempotency key | 1 to 255 visible ASCII characters".
#[tokio::test(start_paused = true)]
async fn idempotency_keys_are_1_to_255_visible_ascii_characters() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let handler = service_fn(move |_req: Request<Full<Bytes>>| {
        r.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("done"))) }
    });
    let svc = IdempotencyLayer::new(MemoryStore::default(), |_: &http::request::Parts| {
        "c".to_owned()
    })
    .layer(handler);
    let send = |key: Vec<u8>| {
        let svc = svc.clone();
        async move {
            let req = Request::post("http://me/orders")
                .header("idempotency-key", HeaderValue::from_bytes(&key).unwrap())
                .body(Full::from("x"))
                .unwrap();
            svc.oneshot(req).await.unwrap().status()
        }
    };
    assert!(send(b"k".to_vec()).await.is_success());
    assert!(send(vec![b'~'; 255]).await.is_success());
    for bad in [
        vec![b'k'; 256],
        b"".to_vec(),
        b"with space".to_vec(),
        b"tab\there".to_vec(),
        vec![0xE9, b'a'],
    ] {
        assert_eq!(send(bad.clone()).await, StatusCode::BAD_REQUEST, "{bad:?}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// RELIABILITY.md:42: "durations set to `Duration::MAX` (deadlines, timeouts, open periods, hedge
/// delays) | read as about 30 years from now; never a panic".
#[tokio::test(start_paused = true)]
async fn duration_max_in_every_setter_never_panics() {
    let m = Duration::MAX;
    let calls = Arc::new(AtomicUsize::new(0));
    let api = once(503, headers(&[("retry-after", "1")]), calls.clone());
    // Retry: deadline, attempt timeout, Retry-After ceiling; per request too.
    let svc = RetryLayer::new()
        .with_deadline(m)
        .with_attempt_timeout(m)
        .with_max_retry_after(m)
        .layer(api.clone());
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    let mut req = get();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(m).with_attempt_timeout(m));
    let client = ClientBuilder::new()
        .with_attempt_timeout(m)
        .with_retry(RetryLayer::new().with_deadline(m))
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_open_duration(m, m)
                .with_consecutive_failures(1),
        )
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1).unwrap())
                .with_max_wait(m)
                .with_max_pause(m)
                .with_default_pause(m),
        )
        .with_hedge(HedgeLayer::new().with_delay_bounds(m, m).with_window(m))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new().with_max_wait(m))
        .build(api.clone());
    assert_eq!(client.clone().oneshot(req).await.unwrap().status(), 200);
    // An open breaker with an open period of Duration::MAX.
    let failing = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(500)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let breaker = CircuitBreakerLayer::new()
        .with_open_duration(m, m)
        .with_consecutive_failures(1)
        .layer(failing);
    breaker.clone().oneshot(get()).await.unwrap();
    let err = breaker.oneshot(get()).await.unwrap_err();
    let open = err.downcast_ref::<sturdy::core::CircuitOpen>().unwrap();
    let years = open.retry_in().as_secs() / (365 * 24 * 3600);
    assert!((20..=40).contains(&years), "{:?}", open.retry_in());
    assert!(!err.to_string().is_empty());
}
