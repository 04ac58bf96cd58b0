//! docs/ARCHITECTURE.md:134-140 against docs/guides/ratelimit.md:151-156 and
//! docs/guides/circuit.md:35-38: what a setter called after a clone or a handle does to the other
//! clones, the handles and the services already made.
//!
//! ARCHITECTURE.md:134-138: "A layer that has a handle (circuit breaker, rate limit, hedge,
//! adaptive concurrency, coalesce) shares one state with its clones and the handles taken from
//! it: a setter called after a clone or a handle applies to all of them. Services already made
//! from the layer keep the state they were made with, which the handle no longer sees".
//! ratelimit.md:151-155: "Every clone, every layer a setter returns, `with_key(..)`, every
//! service they make and every handle share it; setters only change the settings of the layer
//! they return. So two layers from one `new` can differ".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::{find, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tower::{service_fn, BoxError, Layer, ServiceExt};

const HOST: &str = "api.example.com";

fn req() -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}/x"))
        .body(Full::default())
        .unwrap()
}

fn api(
    status: u16,
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    service_fn(move |_req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::<Bytes>::default());
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, BoxError>(res)
        }
    })
}

/// ratelimit.md:151-155: two layers from one `new` share the quota but keep their own
/// `max_wait`: the batch layer's call waits for the slot the interactive layer would refuse.
#[tokio::test(start_paused = true)]
async fn ratelimit_setters_change_only_the_layer_they_return_and_the_quota_is_shared() {
    let calls = Arc::new(AtomicUsize::new(0));
    let batch = RateLimitLayer::new(Quota::per_second(1).unwrap());
    let interactive = batch.clone().with_max_wait(Duration::ZERO);
    let batch_svc = batch.layer(api(200, calls.clone()));
    let interactive_svc = interactive.layer(api(200, calls.clone()));
    // One slot per second, shared: the batch layer takes it.
    batch_svc.clone().oneshot(req()).await.unwrap();
    // The interactive layer is refused at once (the quota is shared, and its max_wait is zero).
    let err = interactive_svc.clone().oneshot(req()).await.unwrap_err();
    assert!(find::<RateLimited>(&*err).is_some(), "{err}");
    // The batch layer kept its 30 s max_wait: it waits about a second, then goes.
    let started = tokio::time::Instant::now();
    batch_svc
        .clone()
        .oneshot(req())
        .await
        .expect("the batch layer waits");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// ratelimit.md:151-153: "every service they make and every handle share it": a handle taken
/// before a setter still sees the pause a service made before the setter received.
#[tokio::test(start_paused = true)]
async fn ratelimit_handle_sees_services_made_before_a_setter() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let early = layer.clone().layer(api(429, calls.clone()));
    let _later = layer.with_max_wait(Duration::from_secs(5));
    let res = early.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(handle.pause(HOST).is_some(), "{:?}", handle.paused());
}

/// circuit.md:36-37 and ARCHITECTURE.md:135-136: "a setter called after a clone or a `pair()`
/// applies to all of them": a streak trigger set on a clone also opens the breaker of a service
/// made afterwards from the original layer.
#[tokio::test(start_paused = true)]
async fn circuit_setter_after_a_clone_applies_to_the_original() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let _clone = layer.clone().with_consecutive_failures(1);
    let svc = layer.layer(api(503, calls.clone()));
    let _ = svc.clone().oneshot(req()).await.unwrap();
    assert!(
        matches!(handle.state(HOST), Some(CircuitState::Open { .. })),
        "the setter on the clone did not apply to the original: {:?}",
        handle.state(HOST)
    );
}

/// circuit.md:37-38: "services made earlier keep the settings and the breakers they were made
/// with, which the handle no longer sees".
#[tokio::test(start_paused = true)]
async fn circuit_services_made_before_a_setter_keep_their_settings() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let early = layer.clone().layer(api(503, calls.clone()));
    let _layer = layer.with_consecutive_failures(1);
    for _ in 0..5 {
        let _ = early.clone().oneshot(req()).await.unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        5,
        "the early service opened on a streak"
    );
    assert_ne!(
        handle
            .state(HOST)
            .map(|s| matches!(s, CircuitState::Open { .. })),
        Some(true)
    );
}

/// ARCHITECTURE.md and ratelimit.md agree (ARCHITECTURE named the rate limit among the layers
/// whose setters apply to every clone; answered: it now says the rate limit differs on purpose):
/// a setter changes only the layer it returns, while the quota stays shared. `max_wait` zero set
/// on a clone leaves the original waiting for a slot, and the clone refuses at once because the
/// original's call used the one slot of their shared quota.
#[tokio::test(start_paused = true)]
async fn ratelimit_setter_after_a_clone_changes_only_the_layer_it_returns() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = RateLimitLayer::new(Quota::per_second(1).unwrap());
    let clone = layer.clone().with_max_wait(Duration::ZERO);
    let svc = layer.layer(api(200, calls.clone()));
    let quick = clone.layer(api(200, calls.clone()));
    svc.clone().oneshot(req()).await.unwrap();
    let refused = quick.clone().oneshot(req()).await;
    assert!(refused.is_err(), "the clone's zero wait: refused at once");
    let second = tokio::time::timeout(Duration::from_millis(10), svc.clone().oneshot(req())).await;
    assert!(
        second.is_err(),
        "the original layer still waits for a slot: the clone's setter did not change it"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// ARCHITECTURE.md:134-136 for adaptive concurrency: a setter called on a clone applies to the
/// original and its handle (the initial limit set on the clone is the limit the original's
/// service starts from).
#[tokio::test(start_paused = true)]
async fn concurrency_setter_after_a_clone_applies_to_the_original() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let _clone = layer.clone().with_initial_limit(3);
    let svc = layer.layer(api(200, calls.clone()));
    svc.oneshot(req()).await.unwrap();
    assert_eq!(handle.limit(HOST), Some(3), "{:?}", handle.states());
}

/// ARCHITECTURE.md:135-136: "a setter called after ... a handle applies to all of them": the
/// handle taken before the setter sees the services of the layer the setter returned.
#[tokio::test(start_paused = true)]
async fn concurrency_handle_taken_before_a_setter_sees_the_new_layers_services() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let layer = layer.with_initial_limit(5);
    let svc = layer.layer(api(200, calls.clone()));
    svc.oneshot(req()).await.unwrap();
    assert_eq!(handle.limit(HOST), Some(5), "{:?}", handle.states());
}
