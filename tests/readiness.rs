//! tower's readiness contract, for every client layer and for the composed stack: the request goes
//! to the service that `poll_ready` made ready, also when a layer waits first (a token, a rate
//! slot, a pause, a retry, a 401 replay), so nothing deadlocks over `ConcurrencyLimit(1)` or a
//! `Buffer(1)`, whether the caller uses `oneshot` or keeps a service and calls
//! `ready().await?.call(req)`.
//!
//! Paused time: a deadlock shows as the bound below elapsing (the clock jumps to it at once).
#![cfg(feature = "full")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::{AttemptTimeoutLayer, Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use sturdy_core::BoxError;
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimit;
use tower::{service_fn, Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type ApiFuture = Pin<Box<dyn Future<Output = Result<Res, BoxError>> + Send>>;
type Buf = Buffer<Req, ApiFuture>;

/// An API that takes 5 ms per call and, on a schedule, answers what makes each layer wait:
/// every 4th call a 503 (retry), every 9th a 429 with `Retry-After: 1` (a pause), a 401 to a
/// stale token (auth replay).
#[derive(Clone, Default)]
struct Api {
    calls: Arc<AtomicU64>,
}

impl Service<Req> for Api {
    type Response = Res;
    type Error = BoxError;
    type Future = ApiFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let stale = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v.as_bytes().ends_with(b"stale"));
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut b = Response::builder();
            b = if stale {
                b.status(StatusCode::UNAUTHORIZED)
            } else if n.is_multiple_of(9) {
                b.status(StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after", "1")
            } else if n.is_multiple_of(4) {
                b.status(StatusCode::SERVICE_UNAVAILABLE)
            } else {
                b.status(StatusCode::OK)
            };
            Ok(b.body(Full::default()).unwrap())
        })
    }
}

/// OAuth2 client credentials against an in-process token endpoint: tokens live 2 s (so they are
/// refreshed during a run), the first one is stale (so the API answers 401 and the call is
/// replayed), and each fetch takes 20 ms.
fn tokens() -> ClientCredentials {
    let issued = Arc::new(AtomicU64::new(0));
    let endpoint = service_fn(move |_req: Req| {
        let n = issued.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let token = if n == 0 {
                "stale".to_owned()
            } else {
                format!("t{n}")
            };
            let body =
                format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":2}}"#);
            Ok::<_, BoxError>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    ClientCredentials::new(endpoint, "http://auth.example.com/token", "id", "secret")
        .unwrap()
        .with_skew(Duration::from_millis(500))
}

fn req(i: usize) -> Req {
    let method = if i.is_multiple_of(2) { "GET" } else { "PUT" };
    Request::builder()
        .method(method)
        .uri(format!("http://api.example.com/items/{i}"))
        .body(Full::from("{}"))
        .unwrap()
}

const CALLS: usize = 40;
const TASKS: usize = 8;
const BOUND: Duration = Duration::from_secs(600);

/// Drives `svc` every way a caller does, each under a time bound.
async fn drive<S>(name: &str, svc: S)
where
    S: Service<Req> + Clone + Send + 'static,
    S::Error: std::fmt::Display + Send,
    S::Future: Send,
{
    let bounded = |what: &'static str, f: Pin<Box<dyn Future<Output = ()> + Send>>| {
        let name = name.to_owned();
        async move {
            if tokio::time::timeout(BOUND, f).await.is_err() {
                panic!("{name}: {what} did not finish: a deadlock");
            }
        }
    };
    // oneshot on clones, one after the other.
    let s = svc.clone();
    bounded(
        "oneshot",
        Box::pin(async move {
            for i in 0..CALLS {
                let _ = s.clone().oneshot(req(i)).await;
            }
        }),
    )
    .await;
    // One kept service: ready().call(), again and again.
    let mut s = svc.clone();
    bounded(
        "kept service",
        Box::pin(async move {
            for i in 0..CALLS {
                let ready = match s.ready().await {
                    Ok(r) => r,
                    Err(e) => panic!("poll_ready failed: {e}"),
                };
                let _ = ready.call(req(i)).await;
            }
        }),
    )
    .await;
    // Concurrent callers, each keeping its own clone.
    let s = svc.clone();
    bounded(
        "concurrent kept services",
        Box::pin(async move {
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let mut s = s.clone();
                    tokio::spawn(async move {
                        for i in 0..CALLS / 4 {
                            if let Ok(r) = s.ready().await {
                                let _ = r.call(req(t * 100 + i)).await;
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }),
    )
    .await;
    // Concurrent oneshots.
    let s = svc;
    bounded(
        "concurrent oneshots",
        Box::pin(async move {
            let tasks: Vec<_> = (0..TASKS * 4)
                .map(|i| {
                    let call = s.clone().oneshot(req(i));
                    tokio::spawn(async move {
                        let _ = call.await;
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        }),
    )
    .await;
}

/// `layer` over `ConcurrencyLimit(1)`, over `Buffer(1)`, and under `Buffer(1)`.
async fn conform<L>(name: &str, layer: L)
where
    L: Layer<ConcurrencyLimit<Api>> + Layer<Buf> + Layer<Api>,
    <L as Layer<ConcurrencyLimit<Api>>>::Service: Service<Req> + Clone + Send + 'static,
    <<L as Layer<ConcurrencyLimit<Api>>>::Service as Service<Req>>::Error: std::fmt::Display + Send,
    <<L as Layer<ConcurrencyLimit<Api>>>::Service as Service<Req>>::Future: Send,
    <L as Layer<Buf>>::Service: Service<Req> + Clone + Send + 'static,
    <<L as Layer<Buf>>::Service as Service<Req>>::Error: std::fmt::Display + Send,
    <<L as Layer<Buf>>::Service as Service<Req>>::Future: Send,
    <L as Layer<Api>>::Service: Service<Req> + Send + 'static,
    <<L as Layer<Api>>::Service as Service<Req>>::Error: Into<BoxError> + Send + Sync,
    <<L as Layer<Api>>::Service as Service<Req>>::Future: Send,
    <<L as Layer<Api>>::Service as Service<Req>>::Response: Send,
{
    drive(
        &format!("{name} over ConcurrencyLimit(1)"),
        layer.layer(ConcurrencyLimit::new(Api::default(), 1)),
    )
    .await;
    drive(
        &format!("{name} over Buffer(1)"),
        layer.layer(Buffer::new(Api::default(), 1)),
    )
    .await;
    drive(
        &format!("{name} under Buffer(1)"),
        Buffer::new(layer.layer(Api::default()), 1),
    )
    .await;
}

fn fast_retry() -> RetryLayer {
    RetryLayer::new().with_seed(3).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(100))
            .unwrap(),
    )
}

#[tokio::test(start_paused = true)]
async fn every_client_layer_keeps_the_readiness_contract() {
    conform("IdempotencyKeyLayer", IdempotencyKeyLayer::new()).await;
    conform("RetryLayer", fast_retry()).await;
    conform(
        "RetryLayer with an attempt timeout",
        fast_retry().with_attempt_timeout(Duration::from_millis(2)),
    )
    .await;
    conform(
        "CircuitBreakerLayer",
        CircuitBreakerLayer::new()
            .with_consecutive_failures(2)
            .with_open_duration(Duration::from_millis(50), Duration::from_millis(50)),
    )
    .await;
    conform("AuthLayer (bearer)", AuthLayer::bearer("k").unwrap()).await;
    conform("AuthLayer (OAuth2)", AuthLayer::oauth2(tokens())).await;
    conform(
        "VersionLayer",
        VersionLayer::header("api-version", "2024-06-01").unwrap(),
    )
    .await;
    conform(
        "AttemptTimeoutLayer",
        AttemptTimeoutLayer::new(Some(Duration::from_millis(3))),
    )
    .await;
    conform(
        "RateLimitLayer (quota)",
        RateLimitLayer::new(Quota::per_second(50).unwrap()),
    )
    .await;
    conform("RateLimitLayer (adaptive)", RateLimitLayer::adaptive_only()).await;
}

#[tokio::test(start_paused = true)]
async fn the_composed_client_keeps_the_readiness_contract() {
    // Every layer on, the optional ones included.
    let builder = || {
        ClientBuilder::new()
            .with_retry(fast_retry())
            .with_hedge(sturdy::hedge::HedgeLayer::new())
            .with_rate_limit(RateLimitLayer::new(Quota::per_second(50).unwrap()))
            .with_adaptive_concurrency(sturdy::concurrency::AdaptiveConcurrencyLayer::new())
            .with_auth(AuthLayer::oauth2(tokens()))
            .with_version(VersionLayer::header("api-version", "1").unwrap())
            .with_attempt_timeout(Duration::from_secs(1))
    };
    drive(
        "ClientBuilder over ConcurrencyLimit(1)",
        builder().build(ConcurrencyLimit::new(Api::default(), 1)),
    )
    .await;
    drive(
        "ClientBuilder over Buffer(1)",
        builder().build(Buffer::new(Api::default(), 1)),
    )
    .await;
    drive(
        "ClientBuilder under Buffer(1)",
        Buffer::new(builder().build(Api::default()), 1),
    )
    .await;
    drive(
        "ClientBuilder with coalescing, over ConcurrencyLimit(1)",
        builder()
            .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
            .build(ConcurrencyLimit::new(Api::default(), 1)),
    )
    .await;
}
