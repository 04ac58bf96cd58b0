//! A pause that arrives while calls already wait in the rate limiter's line, read against
//! docs/guides/ratelimit.md: "A call whose wait for the pause would exceed its `max_wait` fails at
//! once with `RateLimited`, and calls already waiting in line are told as soon as such a pause
//! arrives", and "A call with a deadline in a `ClientBuilder` stack ... whose turn would come
//! after that deadline does not wait for it to pass: it is refused at once". Also a `RateLimit`
//! field with several policies ("the longest if several"). Paused time, in-process services.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, CallOptions, Delivery, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;

/// `/slow429?ms=N&ra=S`: answers after N ms with 429 and `Retry-After: S`; anything else: 200 at
/// once. Counts the 200s.
fn api(
    oks: Arc<AtomicU32>,
) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Req| {
        let oks = oks.clone();
        async move {
            let q = req.uri().query().unwrap_or("").to_string();
            if req.uri().path() == "/slow429" {
                let mut ms = 0;
                let mut ra = String::new();
                for kv in q.split('&') {
                    if let Some(v) = kv.strip_prefix("ms=") {
                        ms = v.parse().unwrap();
                    }
                    if let Some(v) = kv.strip_prefix("ra=") {
                        ra = v.to_string();
                    }
                }
                tokio::time::sleep(Duration::from_millis(ms)).await;
                return Ok::<_, BoxError>(
                    Response::builder()
                        .status(429)
                        .header("retry-after", ra)
                        .body(Full::default())
                        .unwrap(),
                );
            }
            oks.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(Full::default()))
        }
    })
}

fn req(path: &str) -> Req {
    Request::get(format!("http://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

fn with_deadline(mut r: Req, d: Duration) -> Req {
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(d));
    r
}

/// ClientBuilder's default limiter (adaptive): a call waiting out a 2 s pause with a 5 s
/// deadline learns at 300 ms that the pause now lasts 60 s. It is refused then, not when its
/// deadline passes.
#[tokio::test(start_paused = true)]
async fn client26_builder_waiter_refused_when_a_longer_pause_arrives() {
    let oks = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new().build(api(oks.clone()));
    let a1 = tokio::spawn(client.clone().oneshot(req("/slow429?ms=100&ra=2")));
    let a2 = tokio::spawn(client.clone().oneshot(req("/slow429?ms=300&ra=60")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(with_deadline(req("/b"), Duration::from_secs(5)))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(oks.load(Ordering::SeqCst), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert!(
        took <= Duration::from_millis(400),
        "refused after {took:?}, not when the 60 s pause arrived (150 ms after the call): {err}"
    );
    a1.abort();
    a2.abort();
}

/// The same with a quota: the waiter's slot was 1 s away; a 60 s pause arrives at 300 ms.
#[tokio::test(start_paused = true)]
async fn client26_builder_slot_waiter_refused_when_a_pause_arrives() {
    let oks = Arc::new(AtomicU32::new(0));
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(Quota::per_second(1).unwrap()))
        .build(api(oks.clone()));
    let a = tokio::spawn(client.clone().oneshot(req("/slow429?ms=300&ra=60")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(with_deadline(req("/b"), Duration::from_secs(3)))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(oks.load(Ordering::SeqCst), 0, "the call was not sent");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(
        took <= Duration::from_millis(400),
        "refused after {took:?}, not when the 60 s pause arrived (290 ms after the call): {err}"
    );
    a.abort();
}

/// The layer alone: `max_wait` 5 s; a waiter is told at once when a 60 s pause arrives.
#[tokio::test(start_paused = true)]
async fn client26_layer_waiter_told_at_once_past_max_wait() {
    let oks = Arc::new(AtomicU32::new(0));
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(5))
        .layer(api(oks.clone()));
    let a1 = tokio::spawn(svc.clone().oneshot(req("/slow429?ms=100&ra=2")));
    let a2 = tokio::spawn(svc.clone().oneshot(req("/slow429?ms=300&ra=60")));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let start = Instant::now();
    let err = svc.clone().oneshot(req("/b")).await.unwrap_err();
    let took = start.elapsed();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    assert!(took <= Duration::from_millis(200), "told after {took:?}");
    assert_eq!(oks.load(Ordering::SeqCst), 0);
    let _ = a1.await;
    let _ = a2.await;
}

/// `RateLimit` with several policies in one field and over two lines: the exhausted one
/// pauses, whichever place it has ("the longest if several").
#[tokio::test(start_paused = true)]
async fn client26_ratelimit_field_with_several_policies() {
    for lines in [
        vec![r#""burst";r=5;t=1, "day";r=0;t=120"#],
        vec![r#""day";r=0;t=120, "burst";r=5;t=1"#],
        vec![r#""burst";r=5;t=1"#, r#""day";r=0;t=120"#],
        vec![r#""a";r=0;t=3, "b";r=0;t=120, "c";r=0;t=7"#],
    ] {
        let hdrs: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        let inner = tower::service_fn(move |_r: Req| {
            let hdrs = hdrs.clone();
            async move {
                let mut b = Response::builder().status(200);
                for h in &hdrs {
                    b = b.header("ratelimit", h.as_str());
                }
                Ok::<_, BoxError>(b.body(Full::<Bytes>::default()).unwrap())
            }
        });
        let (layer, handle) = RateLimitLayer::adaptive_only().pair();
        let svc = layer.layer(inner);
        svc.oneshot(req("/x")).await.unwrap();
        let p = handle.pause("api.test");
        assert!(
            p.is_some_and(|p| p > Duration::from_secs(110) && p <= Duration::from_secs(120)),
            "{lines:?}: {p:?}"
        );
    }
}

/// `DirectLimiter::reserve`: "the slot is the caller's from now on ... and it is taken ahead of
/// the callers waiting in `until_ready`"; `check`: "Takes a slot now if one is free and no
/// `until_ready` caller waits for one".
#[tokio::test(start_paused = true)]
async fn client26_direct_reserve_goes_ahead_of_the_line() {
    use sturdy::ratelimit::DirectLimiter;
    let l = Arc::new(DirectLimiter::new(Quota::per_second(1).unwrap()));
    let start = Instant::now();
    l.check().unwrap();
    let w = {
        let l = l.clone();
        tokio::spawn(async move {
            l.until_ready(Duration::from_secs(10)).await.unwrap();
            start.elapsed()
        })
    };
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(500)).await;
    let wait = l.reserve(Duration::from_secs(5)).unwrap();
    assert_eq!(wait, Duration::from_millis(500), "the next slot, at 1 s");
    tokio::time::advance(Duration::from_millis(600)).await;
    // At 1.1 s the slot is the reserver's; the waiter's comes at 2 s, and check finds none.
    assert!(l.check().is_err());
    let waited = w.await.unwrap();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_millis(2100),
        "{waited:?}"
    );
}
