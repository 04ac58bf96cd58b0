#![cfg(feature = "full")]
//! s51a: more stated numbers and words: idempotency keys on the wire (UUID v4, the
//! `sturdy-sha256-` digest form), duplicate key headers, the in-flight 409 retried after its
//! `Retry-After`, webhook age and dedup bounds, pagination bounds, and "about 30 years" for
//! `Duration::MAX` settings as the handles report them.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::clock::{ManualClock, FAR};
use sturdy::core::{find, CallOptions, CallReport, CircuitOpen, RateLimited};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::RetryLayer;
use sturdy::webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::s51a_util::{get, post, resp, Api};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// idempotency.md: "`IdempotencyKeyLayer::new()` ... sets one random UUID v4 per logical
/// POST/PATCH"; only those methods by default; a key in `CallOptions` "is sent with any method".
/// A key no header can carry "is sent as `sturdy-sha256-` and the hex SHA-256 of the key".
#[tokio::test(start_paused = true)]
async fn s51a_client_keys_on_the_wire() {
    let api = Api::always(200, &[]);
    let client = ClientBuilder::new().build(api.service::<Full<Bytes>>());
    for (method, keyed) in [
        ("POST", true),
        ("PATCH", true),
        ("PUT", false),
        ("GET", false),
        ("DELETE", false),
    ] {
        let req = Request::builder()
            .method(method)
            .uri("http://a.test/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.clone().oneshot(req).await.unwrap();
        let i = api.count() - 1;
        let key = api.header(i, "idempotency-key");
        assert_eq!(key.is_some(), keyed, "{method}: {key:?}");
        if let Some(k) = key {
            assert_eq!(k.len(), 36, "{k}");
            assert_eq!(&k[14..15], "4", "a UUID v4: {k}");
            assert!(matches!(&k[19..20], "8" | "9" | "a" | "b"), "variant: {k}");
        }
    }
    for (given, sent) in [
        ("abc", "abc".to_owned()),
        (
            "",
            "sturdy-sha256-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                .to_owned(),
        ),
        (
            " a",
            "sturdy-sha256-7de598b3ff8a99638e1f9bf49260baa0d98e069dde32d1f2e153adb5ce478242"
                .to_owned(),
        ),
        (
            "b ",
            "sturdy-sha256-f9b2c9ca5d58ec71e63623240c420de81a992cc44551b036a9a88b42c6ef2076"
                .to_owned(),
        ),
        (
            "a\tb",
            "sturdy-sha256-894891f8b78a9945b0aa07e70d5f71f10b1f1990af127de561cc0ac36024c188"
                .to_owned(),
        ),
        (
            "a\r\nb",
            "sturdy-sha256-18745f36a05e29072709042d6062ce54f1b08ff36c27ba80c39f81fb010c8ce2"
                .to_owned(),
        ),
    ] {
        let mut req = get("http://a.test/x");
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(given));
        client.clone().oneshot(req).await.unwrap();
        let i = api.count() - 1;
        assert_eq!(
            api.header(i, "idempotency-key").as_deref(),
            Some(sent.as_str()),
            "key {given:?} on a GET"
        );
    }
}

/// retry.md: "A 409 that answers a request with an `Idempotency-Key` *and* carries
/// `Retry-After` ... is retried after the `Retry-After`"; one longer than 60 s "a 409 is returned
/// as it is (the server's answer, with a `CallReport` in its extensions)".
#[tokio::test(start_paused = true)]
async fn s51a_in_flight_409_retried_or_returned() {
    for (ra, want_status, want_sends) in [("1", 201u16, 2usize), ("61", 409, 1)] {
        let api = Api::new(move |n, _| {
            Ok(if n == 0 {
                resp(409, &[("retry-after", ra)])
            } else {
                resp(201, &[])
            })
        });
        let client = ClientBuilder::new().build(api.service::<Full<Bytes>>());
        let start = Instant::now();
        let res = client
            .oneshot(post("http://a.test/orders", "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), want_status, "Retry-After {ra}");
        assert_eq!(api.count(), want_sends);
        if want_status == 201 {
            let t = start.elapsed();
            assert!(t >= secs(1) && t <= ms(1200), "{t:?}");
            assert_eq!(
                api.header(0, "idempotency-key"),
                api.header(1, "idempotency-key")
            );
        } else {
            let report = res.extensions().get::<CallReport>();
            assert!(report.is_some(), "a CallReport in the 409's extensions");
            assert_eq!(report.unwrap().attempts(), 1);
        }
    }
    // Without a key: a real conflict, returned as it is.
    let api = Api::always(409, &[("retry-after", "1")]);
    let client = ClientBuilder::new()
        .without_idempotency()
        .build(api.service::<Full<Bytes>>());
    let res = client
        .oneshot(post("http://a.test/orders", "{}"))
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), api.count()), (409, 1));
}

/// idempotency.md: "two or more different key headers on one request (byte-identical repeats are
/// one key; `k` and `"k"` on two lines are two) | 400, `…/idempotency-key-invalid`".
#[tokio::test]
async fn s51a_idempotency_repeated_key_headers() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r2 = runs.clone();
    let handler = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        r2.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(201)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let svc =
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).layer(handler);
    let two = |a: &str, b: &str| {
        let mut req = Request::post("http://api.test/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        req.headers_mut()
            .append("idempotency-key", HeaderValue::from_str(a).unwrap());
        req.headers_mut()
            .append("idempotency-key", HeaderValue::from_str(b).unwrap());
        req
    };
    let res = svc.clone().oneshot(two("k1", "k1")).await.unwrap();
    assert_eq!(res.status(), 201, "byte-identical repeats are one key");
    for (a, b) in [("k2", "\"k2\""), ("k3", "k4")] {
        let res = svc.clone().oneshot(two(a, b)).await.unwrap();
        assert_eq!(res.status(), 400, "{a} and {b}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const T0: i64 = 1_796_428_800;

fn standard_req(id: &str, ts: &str, body: &[u8]) -> Request<Full<Bytes>> {
    let t: i64 = ts.parse().unwrap_or(0);
    let sig = sign_standard(WHSEC, id, t, body).unwrap();
    Request::post("http://hooks.test/standard")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

/// webhooks.md: "ages are compared in whole seconds: a copy 1.9 s past a 1 s tolerance is "1 s
/// old" and passes"; "With the age check turned off (`with_tolerance(Duration::MAX)`), a copy
/// passes at any age". Hostile timestamps: no panic, a 4xx.
#[tokio::test]
async fn s51a_webhook_age_whole_seconds_and_hostile_timestamps() {
    let base = UNIX_EPOCH + secs(T0 as u64);
    for (tol, clock, ts, want) in [
        (secs(1), base + ms(1900), T0.to_string(), 200u16),
        (secs(1), base + ms(2000), T0.to_string(), 401),
        (Duration::MAX, base, "0".to_owned(), 200),
        (Duration::MAX, base, "1".to_owned(), 200),
        (
            Duration::MAX,
            base,
            (T0 + 100 * 365 * 86_400).to_string(),
            200,
        ),
    ] {
        let (queue, _events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(
            StandardWebhooks::new(WHSEC).unwrap().with_tolerance(tol),
            queue,
        )
        .with_clock(Arc::new(ManualClock::at(clock)));
        let res = rx.oneshot(standard_req("a1", &ts, b"{}")).await.unwrap();
        assert_eq!(res.status(), want, "tolerance {tol:?}, ts {ts}");
    }
    for ts in [
        "99999999999999999999",
        "-1",
        "9223372036854775807",
        "-9223372036854775808",
        "",
        "1e9",
    ] {
        let (queue, _events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), queue)
            .with_clock(Arc::new(ManualClock::at(base)));
        let res = rx.oneshot(standard_req("h1", ts, b"{}")).await.unwrap();
        assert!(
            res.status().is_client_error(),
            "timestamp {ts:?}: {}",
            res.status()
        );
    }
}

/// webhooks.md: "The dedup key is kept at least until the timestamp plus the tolerance plus one
/// second ..., whatever the dedup TTL, and after that the copy is refused as stale".
#[tokio::test(start_paused = true)]
async fn s51a_webhook_dedup_outlives_a_short_ttl() {
    let base = UNIX_EPOCH + secs(T0 as u64);
    let clock = Arc::new(ManualClock::at(base));
    let (queue, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), queue)
        .with_dedup_ttl(secs(1))
        .with_clock(clock.clone());
    let ts = T0.to_string();
    assert_eq!(
        rx.clone()
            .oneshot(standard_req("d1", &ts, b"{}"))
            .await
            .unwrap()
            .status(),
        200
    );
    events.recv().await.unwrap();
    for step in [10u64, 100, 280] {
        tokio::time::advance(secs(step)).await;
        clock.advance(secs(step));
        let res = rx
            .clone()
            .oneshot(standard_req("d1", &ts, b"{}"))
            .await
            .unwrap();
        let age = match step {
            10 => 10,
            100 => 110,
            _ => 390,
        };
        if age <= 300 {
            assert_eq!(res.status(), 200, "a duplicate at {age} s");
            let got = tokio::time::timeout(ms(10), events.recv()).await;
            assert!(got.is_err(), "queued again at {age} s (dedup TTL 1 s)");
        } else {
            assert_eq!(res.status(), 401, "stale at {age} s");
        }
    }
}

/// A JSON cursor API that gives `per` items per page and a next cursor while `page < pages`.
fn pages_api(
    per: usize,
    pages: usize,
    seen: Arc<Mutex<usize>>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        *seen.lock().unwrap() += 1;
        let page: usize = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .find_map(|p| p.strip_prefix("cursor=c"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let items: Vec<usize> = (0..per).map(|i| page * 1000 + i).collect();
        let next = if page + 1 < pages {
            serde_json::Value::String(format!("c{}", page + 1))
        } else {
            serde_json::Value::Null
        };
        let body = serde_json::json!({"data": items, "next_cursor": next});
        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string())))) }
    })
}

/// paginate.md: "More than `max_pages` pages or `max_items` items ends a walk with an error after
/// the items before the bound; a `page()` call that needs more than `max_pages` pages fails";
/// "The loop, cursor, origin, bound and bad-JSON guards have kind `Pagination`".
#[tokio::test]
async fn s51a_paginate_bounds_exactly() {
    use futures_util::StreamExt;
    let seen = Arc::new(Mutex::new(0));
    // max_items 25 over pages of 10 (5 pages): 25 items, then an error.
    let pager = Paginate::builder(
        pages_api(10, 5, seen.clone()),
        "http://api.test/items",
        JsonCursor::new("/data", "/next_cursor").without_limit_param(),
    )
    .with_max_items(25)
    .build()
    .unwrap();
    let all: Vec<_> = pager.items().collect().await;
    let oks = all.iter().filter(|r| r.is_ok()).count();
    assert_eq!(oks, 25, "the items before the bound");
    let last = all.last().unwrap().as_ref().unwrap_err();
    assert_eq!(*last.kind(), sturdy::core::ErrorKind::Pagination, "{last}");
    // Exactly max_items: no error.
    let pager = Paginate::builder(
        pages_api(10, 3, seen.clone()),
        "http://api.test/items",
        JsonCursor::new("/data", "/next_cursor").without_limit_param(),
    )
    .with_max_items(30)
    .build()
    .unwrap();
    let all: Vec<_> = pager.items().collect().await;
    assert_eq!(all.len(), 30);
    assert!(all.iter().all(|r| r.is_ok()));
    // max_pages 2: a walk of 3 pages fails after the 2 pages; exactly 2 pages is fine.
    for (pages, fails) in [(2usize, false), (3, true)] {
        let pager = Paginate::builder(
            pages_api(10, pages, seen.clone()),
            "http://api.test/items",
            JsonCursor::new("/data", "/next_cursor").without_limit_param(),
        )
        .with_max_pages(2)
        .build()
        .unwrap();
        let all: Vec<_> = pager.pages().collect().await;
        assert_eq!(all.iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!(all.last().unwrap().is_err(), fails, "{pages} pages");
        // page(): 25 items need 3 pages of 10.
        let r = pager.page(None, 25).await;
        assert_eq!(r.is_err(), fails, "page() of 25 over {pages} pages");
    }
    // Zero bounds are configuration errors.
    for b in [
        Paginate::builder(
            pages_api(1, 1, seen.clone()),
            "http://api.test/i",
            JsonCursor::new("/data", "/next_cursor"),
        )
        .with_max_pages(0)
        .build(),
        Paginate::builder(
            pages_api(1, 1, seen.clone()),
            "http://api.test/i",
            JsonCursor::new("/data", "/next_cursor"),
        )
        .with_max_items(0)
        .build(),
        Paginate::builder(
            pages_api(1, 1, seen.clone()),
            "http://api.test/i",
            JsonCursor::new("/data", "/next_cursor"),
        )
        .with_page_timeout(Duration::ZERO)
        .build(),
        Paginate::builder(
            pages_api(1, 1, seen.clone()),
            "http://api.test/i",
            JsonCursor::new("/data", "/next_cursor"),
        )
        .with_cursor_key([7u8; 31])
        .build(),
        Paginate::builder(
            pages_api(1, 1, seen.clone()),
            "/relative",
            JsonCursor::new("/data", "/next_cursor"),
        )
        .build(),
        Paginate::builder(
            pages_api(1, 1, seen.clone()),
            "http://api.test/i",
            JsonCursor::new("data", "/next_cursor"),
        )
        .build(),
    ] {
        match b {
            Ok(_) => panic!("a bad setting was accepted"),
            Err(e) => assert_eq!(*e.kind(), sturdy::core::ErrorKind::Config, "{e}"),
        }
    }
    assert!(Paginate::builder(
        pages_api(1, 1, seen.clone()),
        "http://api.test/i",
        JsonCursor::new("/data", "/next_cursor")
    )
    .with_cursor_key([7u8; 32])
    .build()
    .is_ok());
}

/// clock::FAR: "Every duration too long to represent (`Duration::MAX`, a peer's absurd value) is
/// read as this [about 30 years], in every crate"; RELIABILITY.md: "durations set to
/// `Duration::MAX` (deadlines, timeouts, open periods, hedge delays) | read as about 30 years
/// from now". What the handles and errors report stays within it.
#[tokio::test(start_paused = true)]
async fn s51a_duration_max_reads_as_30_years_in_reports() {
    let slack = secs(86_400);
    // A breaker open for Duration::MAX.
    let api = Api::always(503, &[]);
    let (layer, circuit) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::MAX, Duration::MAX)
        .pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    match circuit.state("a.test") {
        Some(CircuitState::Open { retry_in }) => {
            assert!(retry_in <= FAR + slack, "open for {retry_in:?}");
        }
        other => panic!("{other:?}"),
    }
    let err = svc
        .clone()
        .oneshot(get("http://a.test/x"))
        .await
        .unwrap_err();
    let open = find::<CircuitOpen>(&*err).unwrap();
    assert!(open.retry_in() <= FAR + slack, "{:?}", open.retry_in());
    let breaker = svc;

    // A breaker forced open, whose longest open period is Duration::MAX.
    circuit.force_open("b.test");
    let err = breaker
        .clone()
        .oneshot(get("http://b.test/x"))
        .await
        .unwrap_err();
    let open = find::<CircuitOpen>(&*err).unwrap();
    assert!(
        open.retry_in() <= FAR + slack,
        "forced: {:?}: {err}",
        open.retry_in()
    );
}

/// The read of a stored response replays its body byte for byte ("the stored response (status,
/// headers except connection-level ones such as `Date` and `Content-Length`, body)").
#[tokio::test]
async fn s51a_idempotency_replay_keeps_headers_but_connection_level() {
    let handler = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(201)
                .header("x-order", "o_1")
                .header("date", "Sat, 05 Dec 2026 00:00:00 GMT")
                .header("content-length", "5")
                .body(Full::new(Bytes::from_static(b"hello")))
                .unwrap(),
        )
    });
    let svc =
        IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()).layer(handler);
    let req = || {
        Request::post("http://api.test/orders")
            .header("idempotency-key", "r1")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let _ = svc.clone().oneshot(req()).await.unwrap();
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["x-order"], "o_1");
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert!(!res.headers().contains_key("date"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
}

/// The same for the rate limiter: a bare 429 with `with_default_pause(Duration::MAX)` and no cap
/// (`with_max_pause(Duration::MAX)`): the pause the handle reports and the wait a refusal
/// carries stay within about 30 years.
#[tokio::test(start_paused = true)]
async fn s51a_duration_max_pause_reads_as_30_years() {
    let slack = secs(86_400);
    // A bare 429 pausing for Duration::MAX, with no cap.
    let api = Api::always(429, &[]);
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::MAX)
        .with_default_pause(Duration::MAX)
        .pair();
    let svc = layer.layer(api.service::<Full<Bytes>>());
    let _ = svc.clone().oneshot(get("http://a.test/x")).await.unwrap();
    let p = handle.pause("a.test").unwrap();
    assert!(p <= FAR + slack, "paused for {p:?}");
    let err = svc.oneshot(get("http://a.test/x")).await.unwrap_err();
    let rl = find::<RateLimited>(&*err).unwrap();
    assert!(
        rl.retry_after() <= FAR + slack,
        "{:?}: {err}",
        rl.retry_after()
    );
}

/// webhooks.md: "only the first `MAX_SIGNATURES` (16) `v1` entries of a Standard Webhooks or
/// Stripe header are considered; the rest are ignored."
#[tokio::test]
async fn s51a_stripe_signature_entries_16th_counts_17th_ignored() {
    use sturdy::webhook::{sign_stripe, Stripe};
    let now = UNIX_EPOCH + secs(T0 as u64);
    let body = br#"{"id":"evt_1","type":"x"}"#;
    let signed = sign_stripe("whsec_stripe_test", T0, body);
    let right = signed
        .split(',')
        .find_map(|p| p.strip_prefix("v1="))
        .expect("a v1 entry")
        .to_owned();
    let wrong = "0".repeat(right.len());
    for (n_wrong, want) in [(15usize, 200u16), (16, 401)] {
        let (queue, _events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(Stripe::new("whsec_stripe_test").unwrap(), queue)
            .with_clock(Arc::new(ManualClock::at(now)));
        let mut header = format!("t={T0}");
        for _ in 0..n_wrong {
            header.push_str(&format!(",v1={wrong}"));
        }
        header.push_str(&format!(",v1={right}"));
        let req = Request::post("http://hooks.test/stripe")
            .header("stripe-signature", header)
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let res = rx.oneshot(req).await.unwrap();
        assert_eq!(
            res.status(),
            want,
            "the right entry after {n_wrong} wrong ones"
        );
    }
}

/// demo.md / README.md: "sturdy books each order exactly once": against the chaos server, a POST
/// whose connection is closed after the order was committed is retried with the same key and
/// answered with the stored response.
#[tokio::test]
async fn s51a_chaos_reset_after_commit_booked_once() {
    let server = sturdy_chaos::ChaosServer::start(sturdy_chaos::Knobs {
        reset_after_commit_next: 1,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_backoff(sturdy::retry::Backoff::decorrelated_jitter(ms(1), ms(5)).unwrap())
                .with_seed(1),
        )
        .build(sturdy_chaos::http_client());
    let res = client
        .oneshot(post(&server.url("/orders"), r#"{"item":"book"}"#))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let st = server.stats();
    assert_eq!((st.orders_committed, st.replayed), (1, 1), "{st:?}");
}

/// Hostile: 100 KB header values on a 429 (Retry-After, RateLimit, X-RateLimit-Reset, Link)
/// through the default client: answered quickly, a bounded pause, no panic.
#[tokio::test]
async fn s51a_100kb_headers_through_the_client() {
    let digits: &'static str = Box::leak("9".repeat(100_000).into_boxed_str());
    let rl: &'static str = Box::leak(
        (0..5000)
            .map(|i| format!("\"p{i}\";r=0;t=9999999"))
            .collect::<Vec<_>>()
            .join(",")
            .into_boxed_str(),
    );
    let link: &'static str = Box::leak(
        (0..4000)
            .map(|i| format!("</p{i}>; rel=next"))
            .collect::<Vec<_>>()
            .join(",")
            .into_boxed_str(),
    );
    let api = Api::new(move |_, _| {
        Ok(resp(
            429,
            &[
                ("retry-after", digits),
                ("ratelimit", rl),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", digits),
                ("link", link),
            ],
        ))
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let client = ClientBuilder::new()
        .with_rate_limit(layer)
        .build(api.service::<Full<Bytes>>());
    let start = tokio::time::Instant::now();
    let err = client.oneshot(get("http://a.test/x")).await.unwrap_err();
    assert!(start.elapsed() < secs(2), "{:?}", start.elapsed());
    let p = handle.pause("a.test").unwrap();
    assert!(p > secs(298) && p <= secs(300), "{p:?}");
    assert_eq!(find::<RateLimited>(&*err).unwrap().retry_after(), secs(300));
    assert!(err.to_string().contains("retry after 5m"), "{err}");
}
