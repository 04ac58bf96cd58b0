//! docs/ARCHITECTURE.md, its layer-order claims read through the composed client: the breaker
//! sits inside Retry so each attempt is counted, Auth inside them so a refresh after a 401 is one
//! attempt and not a retry, Coalesce outermost so identical calls share one outcome, retries
//! included; and the naming rule (`XxxLayer` makes `Xxx<S>`). Paused time, in process.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::events::Event;
use sturdy::core::{find, CircuitOpen};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, ServiceExt};

fn quick() -> RetryLayer {
    RetryLayer::new().with_seed(2).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(50)).unwrap(),
    )
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://api.example.com{path}"))
        .body(Full::default())
        .unwrap()
}

/// ARCHITECTURE.md:22-24: "the breaker and the limiter sit inside Retry so each attempt is
/// admitted and counted".
#[tokio::test(start_paused = true)]
async fn the_breaker_counts_each_attempt_of_one_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(503)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick())
        .with_circuit_breaker(breaker)
        .build(api);
    let err = client.oneshot(get("/a")).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(matches!(
        handle.state("api.example.com"),
        Some(sturdy::circuit::CircuitState::Open { .. })
    ));
}

/// ARCHITECTURE.md:24-25: "Auth sits inside them so a refresh after a 401 is one attempt, not a
/// retry".
#[tokio::test(start_paused = true)]
async fn a_refresh_after_a_401_is_one_attempt_not_a_retry() {
    let tokens = Arc::new(AtomicUsize::new(0));
    let api_calls = Arc::new(AtomicUsize::new(0));
    let (t, a) = (tokens.clone(), api_calls.clone());
    let http = service_fn(move |req: Request<Full<Bytes>>| {
        let (t, a) = (t.clone(), a.clone());
        async move {
            if req.uri().path() == "/token" {
                let n = t.fetch_add(1, Ordering::SeqCst);
                let body = format!(
                    r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}}"#
                );
                return Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::<Bytes>::from(body))
                        .unwrap(),
                );
            }
            a.fetch_add(1, Ordering::SeqCst);
            let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
            let status = if auth == "Bearer tok-0" { 401 } else { 200 };
            Ok(Response::builder()
                .status(status)
                .body(Full::default())
                .unwrap())
        }
    });
    let source = ClientCredentials::new(
        http.clone(),
        "http://auth.example.com/token",
        "id",
        "secret",
    )
    .unwrap();
    let retries = Arc::new(AtomicUsize::new(0));
    let r = retries.clone();
    let client = ClientBuilder::new()
        .with_retry(quick().with_max_attempts(1).on_event(move |e| {
            if matches!(e, Event::RetryScheduled { .. }) {
                r.fetch_add(1, Ordering::SeqCst);
            }
        }))
        .with_auth(AuthLayer::oauth2(source))
        .build(http);
    let res = client.oneshot(get("/orders")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api_calls.load(Ordering::SeqCst), 2);
    assert_eq!(tokens.load(Ordering::SeqCst), 2);
    assert_eq!(retries.load(Ordering::SeqCst), 0);
}

/// ARCHITECTURE.md:17-19 and docs/guides/coalesce.md:238: Coalesce outermost, "so identical calls
/// share one whole outcome, retries included".
#[tokio::test(start_paused = true)]
async fn identical_calls_share_one_outcome_retries_included() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let status = if n == 0 { 503 } else { 200 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::from("page"))
                    .unwrap(),
            )
        }
    });
    let client = ClientBuilder::new()
        .with_retry(quick())
        .with_coalesce(CoalesceLayer::new())
        .build(api);
    let tasks: Vec<_> = (0..200)
        .map(|_| tokio::spawn(client.clone().oneshot(get("/orders"))))
        .collect();
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "page");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// ARCHITECTURE.md:102-103: "Types: `XxxLayer` makes `Xxx<S>`, whose future is `ResponseFuture`";
/// :90-91: "`sturdy::Client` is a `BoxCloneSyncService`".
#[test]
fn layers_make_the_services_their_names_say() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let _: sturdy::retry::Retry<_> = RetryLayer::new().layer(api);
    let _: sturdy::circuit::CircuitBreaker<_, _, _> = CircuitBreakerLayer::new().layer(api);
    let _: sturdy::coalesce::Coalesce<_, _> = CoalesceLayer::new().layer(api);
    let _: sturdy::hedge::Hedge<_, _> = sturdy::hedge::HedgeLayer::new().layer(api);
    let _: sturdy::concurrency::AdaptiveConcurrency<_, _, _> =
        sturdy::concurrency::AdaptiveConcurrencyLayer::new().layer(api);
    let _: sturdy::ratelimit::RateLimit<_, _> =
        sturdy::ratelimit::RateLimitLayer::adaptive_only().layer(api);
    let _: sturdy::version::Version<_> = sturdy::version::VersionLayer::query("v", "1").layer(api);
    let _: sturdy::idempotency::client::IdempotencyKey<_> =
        sturdy::idempotency::client::IdempotencyKeyLayer::new().layer(api);
    let client: sturdy::Client<Full<Bytes>> = ClientBuilder::new().build(api);
    let _: tower::util::BoxCloneSyncService<
        Request<Full<Bytes>>,
        Response<Full<Bytes>>,
        sturdy::core::BoxError,
    > = client;
}
