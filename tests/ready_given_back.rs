//! A layer that answers a call without calling its inner service gives back what the inner
//! service's `poll_ready` reserved. Over tower's `ConcurrencyLimit(1)`, a kept service driven with
//! `ready().await?.call(req)` whose call a layer refuses must not keep the only permit from every
//! other clone (they would wait in `ready()` until the kept one's next call, which may never
//! come). Checked for each layer that can refuse in `call`: the circuit breaker (open), the rate
//! limiter (a wait past `max_wait`), the adaptive concurrency limit (full, no wait allowed) and
//! the server-side idempotency layer (a missing, invalid or ambiguous key).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{find, BoxError, CircuitOpen, RateLimited};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const URL: &str = "http://api.example.com/v1/orders";

fn get() -> Request<Full<Bytes>> {
    Request::get(URL).body(Full::default()).unwrap()
}

/// Answers 200 at once.
async fn ok(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, BoxError> {
    Ok(Response::new(Full::from("ok")))
}

/// Another clone's call gets the permit within 5 s (paused time: only a call that waits for a
/// permit never given back takes that long).
async fn another_clone_is_served<S, Rb>(svc: &S, req: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone,
    S::Error: std::fmt::Debug,
{
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(req))
        .await
        .expect("another clone waited for the permit a refused call kept")
        .expect("the call");
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_gives_back_the_permit_it_refused_a_call_with() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(service_fn(ok));
    handle.force_open("api.example.com");
    let mut kept = svc.clone();
    let err = kept.ready().await.unwrap().call(get()).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    handle.force_close("api.example.com");
    another_clone_is_served(&svc, get()).await;
    // The kept service works again too.
    let res = kept.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_refused_rate_limited_call_gives_back_the_permit() {
    let quota = Quota::new(1, Duration::from_secs(3600)).unwrap();
    let layer = RateLimitLayer::new(quota).with_max_wait(Duration::ZERO);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(service_fn(ok));
    // The hour's one call.
    svc.clone().oneshot(get()).await.unwrap();
    let mut kept = svc.clone();
    let err = kept.ready().await.unwrap().call(get()).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    // Another host has a quota of its own, and the permit must be free for it.
    another_clone_is_served(
        &svc,
        Request::get("http://other.example.com/")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    drop(kept);
}

#[tokio::test(start_paused = true)]
async fn a_full_adaptive_limit_without_a_wait_gives_back_the_permit() {
    let layer = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::ZERO);
    // The inner service holds its first call until told: the adaptive limit of 1 is full.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let inner = service_fn(move |_req: Request<Full<Bytes>>| {
        let rx = rx.clone();
        async move {
            let held = rx.lock().await.take();
            if let Some(rx) = held {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from("ok")))
        }
    });
    // tower's limit of 2 under the adaptive one: the held call has one permit, the refused call
    // the other, and a third call needs the one the refusal gives back.
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(2)
        .service(inner);
    let held = tokio::spawn(svc.clone().oneshot(get()));
    tokio::task::yield_now().await;
    let mut kept = svc.clone();
    let err = kept.ready().await.unwrap().call(get()).await.unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    tx.send(()).unwrap();
    let res = held.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Two permits: the held call's is back; the refused call's must be too.
    let mut a = svc.clone();
    let mut b = svc.clone();
    tokio::time::timeout(Duration::from_secs(5), a.ready())
        .await
        .expect("a first permit")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), b.ready())
        .await
        .expect("a second permit: the refused call kept it")
        .unwrap();
    drop(kept);
}

#[tokio::test(start_paused = true)]
async fn an_idempotency_refusal_gives_back_the_permit() {
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_require_key(true);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(service_fn(ok));
    let post = |key: Option<&[u8]>| {
        let mut b = Request::post(URL);
        if let Some(k) = key {
            b = b.header("idempotency-key", k);
        }
        b.body(Full::from("{}")).unwrap()
    };
    let mut kept = svc.clone();
    // Missing, invalid (a control character is not a visible ASCII one) and ambiguous keys.
    let missing = kept.ready().await.unwrap().call(post(None)).await.unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    another_clone_is_served(&svc, post(Some(b"k-1"))).await;
    let invalid = kept
        .ready()
        .await
        .unwrap()
        .call(post(Some(b"a\tb")))
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
    another_clone_is_served(&svc, post(Some(b"k-2"))).await;
    let mut two = post(Some(b"k-3"));
    two.headers_mut()
        .append("idempotency-key", http::HeaderValue::from_static("k-4"));
    let ambiguous = kept.ready().await.unwrap().call(two).await.unwrap();
    assert_eq!(ambiguous.status(), StatusCode::BAD_REQUEST);
    another_clone_is_served(&svc, post(Some(b"k-5"))).await;
}
