//! docs/guides/ratelimit.md, "Pauses the server asks for", read for a 503 that asks for nothing:
//! the list names "a 429 or 503 with `Retry-After`" and "a bare 429", not a bare 503, which is
//! the retry layer's to space out with its backoff. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::events::Event;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, ServiceExt};

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap()
}

/// An API that answers a bare 503 (no header) to its first `fails` calls, then 200.
fn flaky(
    fails: usize,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_r: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::<Bytes>::default());
            if n < fails {
                *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok(res)
        }
    });
    (svc, calls)
}

/// A bare 503 through `RateLimitLayer::adaptive_only()` (the `ClientBuilder` default) pauses
/// nobody: no `RateLimitPaused` event, and the next call of the host leaves at once.
#[tokio::test(start_paused = true)]

async fn a_bare_503_pauses_nobody() {
    let paused = Arc::new(Mutex::new(Vec::new()));
    let p = paused.clone();
    let layer = RateLimitLayer::adaptive_only().on_event(move |e: &Event<'_>| {
        if let Event::RateLimitPaused {
            status,
            source,
            pause,
            ..
        } = e
        {
            p.lock()
                .unwrap()
                .push((*status, source.map(|s| format!("{s:?}")), *pause));
        }
    });
    let (api, calls) = flaky(1);
    let svc = layer.layer(api);
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 503);
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(10), svc.clone().oneshot(get()))
        .await
        .expect("no hang")
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    eprintln!("pauses {:?}, waited {waited:?}", paused.lock().unwrap());
    assert!(
        paused.lock().unwrap().is_empty(),
        "{:?}",
        paused.lock().unwrap()
    );
    assert!(waited < Duration::from_millis(5), "{waited:?}");
}

/// The same through the default `ClientBuilder`: a call that gets a bare 503 is retried after
/// the retry layer's backoff (2 to 10 ms here), not after a one-second pause of the host.
#[tokio::test(start_paused = true)]

async fn a_bare_503_is_retried_after_the_backoff_not_a_pause() {
    let retry = RetryLayer::new().with_seed(15).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    );
    let (api, calls) = flaky(2);
    let client = ClientBuilder::new().with_retry(retry).build(api);
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(30), client.oneshot(get()))
        .await
        .expect("no hang")
        .unwrap();
    let took = started.elapsed();
    eprintln!("two bare 503s then 200 took {took:?}");
    assert_eq!(res.status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(took <= Duration::from_millis(30), "{took:?}");
}

/// What the guide does list still pauses: a bare 429 for 1 s, a 503 with `Retry-After: 2` for
/// 2 s.
#[tokio::test(start_paused = true)]
async fn a_bare_429_and_a_503_with_retry_after_pause_as_listed() {
    for (status, retry_after, want) in [
        (429u16, None, Duration::from_secs(1)),
        (503, Some("2"), Duration::from_secs(2)),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let api = service_fn(move |_r: Request<Full<Bytes>>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res = Response::new(Full::<Bytes>::default());
                if n == 0 {
                    *res.status_mut() = StatusCode::from_u16(status).unwrap();
                    if let Some(ra) = retry_after {
                        res.headers_mut().insert("retry-after", ra.parse().unwrap());
                    }
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        let svc = RateLimitLayer::adaptive_only().layer(api);
        svc.clone().oneshot(get()).await.unwrap();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), svc.clone().oneshot(get()))
            .await
            .expect("no hang")
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= want && waited <= want + want / 4,
            "{status}: waited {waited:?}"
        );
    }
}

/// Other bare server errors (500, 502, 504) are not in the guide's list either: none pauses.
#[tokio::test(start_paused = true)]
async fn other_bare_server_errors_pause_nobody() {
    for status in [500u16, 502, 504] {
        let paused = Arc::new(Mutex::new(Vec::new()));
        let p = paused.clone();
        let layer = RateLimitLayer::adaptive_only().on_event(move |e: &Event<'_>| {
            if let Event::RateLimitPaused { pause, .. } = e {
                p.lock().unwrap().push(*pause);
            }
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let api = service_fn(move |_r: Request<Full<Bytes>>| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut res = Response::new(Full::<Bytes>::default());
                if n == 0 {
                    *res.status_mut() = StatusCode::from_u16(status).unwrap();
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        let svc = layer.layer(api);
        svc.clone().oneshot(get()).await.unwrap();
        let started = tokio::time::Instant::now();
        svc.clone().oneshot(get()).await.unwrap();
        assert!(
            paused.lock().unwrap().is_empty() && started.elapsed() < Duration::from_millis(5),
            "{status}: {:?}, waited {:?}",
            paused.lock().unwrap(),
            started.elapsed()
        );
    }
}
