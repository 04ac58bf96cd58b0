//! Composition with tower's own layers, every public client layer alone, driven by a kept
//! service over tower-test's mock (whose readiness the test controls):
//!
//! - a layer whose `poll_ready` said Ready accepts the call (the mock panics on a call that was
//!   not made ready), and is Pending while the service below is;
//! - a ready service dropped before its call gives back what `ConcurrencyLimit(1)` reserved;
//! - `LoadShed` over a layer over a full `ConcurrencyLimit(1)` sheds at once instead of waiting;
//! - sequential `ready().await?.call(req)` and many clones at once finish, under time bounds.
//!
//! README.md: "Every layer keeps tower's readiness contract, so the client (or any layer alone)
//! can sit under a `Buffer` or over a `ConcurrencyLimit`, driven by `oneshot` or a kept
//! `ready().await?.call(req)`."
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::AuthLayer;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use sturdy_core::BoxError;
use tokio::time::timeout;
use tokio_test::assert_pending;
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimit;
use tower::load_shed::LoadShed;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Mock = mock::Mock<Req, Res>;
type Handle = mock::Handle<Req, Res>;

const BOUND: Duration = Duration::from_secs(5);

fn get(i: usize) -> Req {
    Request::get(format!("http://api.example.com/items/{i}"))
        .body(Full::default())
        .unwrap()
}

fn ok() -> Res {
    Response::new(Full::from("ok"))
}

/// Answers every request the mock receives with 200, at once.
fn answer_all(mut handle: Handle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some((_req, send)) = handle.next_request().await {
            send.send_response(ok());
        }
    })
}

/// `layer` over `ConcurrencyLimit(1)` over the mock: a clone made ready and dropped before its
/// call must give the permit back; then sequential kept-service calls and 8 clones at once.
async fn ready_then_drop<L>(name: &str, layer: L)
where
    L: Layer<ConcurrencyLimit<Mock>>,
    L::Service: Service<Req> + Clone,
    <L::Service as Service<Req>>::Error: std::fmt::Debug,
{
    let (mock, handle) = mock::pair::<Req, Res>();
    let answers = answer_all(handle);
    let svc = layer.layer(ConcurrencyLimit::new(mock, 1));

    let mut a = svc.clone();
    timeout(BOUND, a.ready())
        .await
        .unwrap_or_else(|_| panic!("{name}: the first ready() never finished"))
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    drop(a);
    let mut b = svc.clone();
    timeout(BOUND, b.ready())
        .await
        .unwrap_or_else(|_| {
            panic!("{name}: a ready service dropped before its call kept its permit")
        })
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    timeout(BOUND, b.call(get(0)))
        .await
        .unwrap_or_else(|_| panic!("{name}: the call after a dropped ready service hung"))
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));

    // A kept service, one call after the other.
    let mut kept = svc.clone();
    for i in 1..6 {
        let fut = timeout(BOUND, kept.ready())
            .await
            .unwrap_or_else(|_| panic!("{name}: kept ready() #{i} hung"))
            .unwrap_or_else(|e| panic!("{name}: {e:?}"))
            .call(get(i));
        timeout(BOUND, fut)
            .await
            .unwrap_or_else(|_| panic!("{name}: kept call #{i} hung"))
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }

    // Eight clones at once, each a kept service of its own.
    let runs = (0..8).map(|t| {
        let mut mine = svc.clone();
        async move {
            for i in 0..4 {
                let fut = mine.ready().await?.call(get(100 + t * 10 + i));
                fut.await?;
            }
            Ok::<_, <L::Service as Service<Req>>::Error>(())
        }
    });
    let all = timeout(BOUND * 4, futures_util::future::join_all(runs))
        .await
        .unwrap_or_else(|_| panic!("{name}: 8 clones over ConcurrencyLimit(1) deadlocked"));
    for r in all {
        r.unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
    answers.abort();
}

/// `layer` over the mock: Pending while the mock is not ready, Ready once it is, and the call
/// that follows goes to the service made ready (the mock panics otherwise).
async fn honest_readiness<L>(name: &str, layer: L)
where
    L: Layer<Mock>,
    L::Service: Service<Req>,
    <L::Service as Service<Req>>::Error: std::fmt::Debug,
{
    let (mock, mut handle) = mock::pair::<Req, Res>();
    handle.allow(0);
    let mut svc = layer.layer(mock);
    {
        let mut ready = tokio_test::task::spawn(svc.ready());
        assert!(
            ready.poll().is_pending(),
            "{name}: Ready while the service below is not"
        );
        handle.allow(1);
        assert!(
            ready.is_woken(),
            "{name}: not woken when the service below became ready"
        );
        match ready.poll() {
            std::task::Poll::Ready(r) => {
                r.unwrap_or_else(|e| panic!("{name}: {e:?}"));
            }
            std::task::Poll::Pending => {
                panic!("{name}: still Pending once the service below is ready")
            }
        }
    }
    let fut = svc.call(get(7));
    let mut fut = tokio_test::task::spawn(fut);
    // The request reaches the mock (polling drives a layer that calls from its future).
    let mut seen = None;
    for _ in 0..50 {
        let _ = fut.poll();
        if let std::task::Poll::Ready(Some(r)) = handle.poll_request() {
            seen = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (_req, send) =
        seen.unwrap_or_else(|| panic!("{name}: the request never reached the service"));
    send.send_response(ok());
    let res = timeout(BOUND, fut).await;
    res.unwrap_or_else(|_| panic!("{name}: the call did not finish"))
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
}

/// `LoadShed` over `layer` over `ConcurrencyLimit(1)`: with one call in flight, a second sheds
/// at once (the layer reports the limit's readiness honestly), and a third after the first
/// answered goes through.
async fn sheds<L>(name: &str, layer: L)
where
    L: Layer<ConcurrencyLimit<Mock>>,
    L::Service: Service<Req> + Clone,
    <L::Service as Service<Req>>::Error: Into<BoxError>,
{
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let svc = LoadShed::new(layer.layer(ConcurrencyLimit::new(mock, 1)));

    let mut first = svc.clone();
    let first = timeout(BOUND, first.ready())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .call(get(1));
    let mut first = tokio_test::task::spawn(first);
    let _ = first.poll();
    let (_req, send) = timeout(BOUND, handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("{name}: the first call never reached the service"))
        .unwrap();

    // (The shedding clone is dropped after its call: a service whose poll_ready found the limit
    // full keeps its place in the limit's queue until it is dropped, as in tower.)
    let mut shedding = svc.clone();
    let second = timeout(BOUND, shedding.ready())
        .await
        .unwrap_or_else(|_| panic!("{name}: LoadShed's ready() waited"))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .call(get(2));
    drop(shedding);
    let err = timeout(BOUND, second)
        .await
        .unwrap_or_else(|_| panic!("{name}: a call over a full limit under LoadShed hung"))
        .err()
        .unwrap_or_else(|| panic!("{name}: a call over a full limit was not shed"));
    assert!(
        sturdy_core::find::<tower::load_shed::error::Overloaded>(&*err).is_some(),
        "{name}: expected Overloaded, got {err}"
    );

    send.send_response(ok());
    timeout(BOUND, first)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let answers = answer_all(handle);
    let mut third = svc.clone();
    let fut = timeout(BOUND, third.ready())
        .await
        .unwrap()
        .unwrap()
        .call(get(3));
    timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("{name}: the call after the shed one hung"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    answers.abort();
}

fn retry() -> RetryLayer {
    RetryLayer::new().with_seed(14)
}

#[tokio::test(start_paused = true)]
async fn a_ready_service_dropped_before_its_call_gives_its_permit_back() {
    ready_then_drop("IdempotencyKeyLayer", IdempotencyKeyLayer::new()).await;
    ready_then_drop("RetryLayer", retry()).await;
    ready_then_drop("CircuitBreakerLayer", CircuitBreakerLayer::new()).await;
    ready_then_drop(
        "RateLimitLayer",
        RateLimitLayer::new(Quota::per_second(1000).unwrap()),
    )
    .await;
    ready_then_drop("AuthLayer", AuthLayer::bearer("k").unwrap()).await;
    ready_then_drop(
        "VersionLayer",
        VersionLayer::header("api-version", "1").unwrap(),
    )
    .await;
    ready_then_drop(
        "AttemptTimeoutLayer",
        AttemptTimeoutLayer::new(Some(Duration::from_secs(1))),
    )
    .await;
    ready_then_drop("HedgeLayer", HedgeLayer::new()).await;
    ready_then_drop("AdaptiveConcurrencyLayer", AdaptiveConcurrencyLayer::new()).await;
    ready_then_drop("CoalesceLayer", CoalesceLayer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn every_layer_is_pending_while_the_service_below_is() {
    honest_readiness("IdempotencyKeyLayer", IdempotencyKeyLayer::new()).await;
    honest_readiness("RetryLayer", retry()).await;
    honest_readiness("CircuitBreakerLayer", CircuitBreakerLayer::new()).await;
    honest_readiness(
        "RateLimitLayer",
        RateLimitLayer::new(Quota::per_second(1000).unwrap()),
    )
    .await;
    honest_readiness("RateLimitLayer (adaptive)", RateLimitLayer::adaptive_only()).await;
    honest_readiness("AuthLayer", AuthLayer::bearer("k").unwrap()).await;
    honest_readiness(
        "VersionLayer",
        VersionLayer::header("api-version", "1").unwrap(),
    )
    .await;
    honest_readiness(
        "AttemptTimeoutLayer",
        AttemptTimeoutLayer::new(Some(Duration::from_secs(1))),
    )
    .await;
    honest_readiness("HedgeLayer", HedgeLayer::new()).await;
    honest_readiness("AdaptiveConcurrencyLayer", AdaptiveConcurrencyLayer::new()).await;
    honest_readiness("CoalesceLayer", CoalesceLayer::new()).await;
}

#[tokio::test(start_paused = true)]
async fn load_shed_over_each_layer_sheds_a_call_over_a_full_limit() {
    sheds("IdempotencyKeyLayer", IdempotencyKeyLayer::new()).await;
    sheds("RetryLayer", retry()).await;
    sheds("CircuitBreakerLayer", CircuitBreakerLayer::new()).await;
    sheds(
        "RateLimitLayer",
        RateLimitLayer::new(Quota::per_second(1000).unwrap()),
    )
    .await;
    sheds("AuthLayer", AuthLayer::bearer("k").unwrap()).await;
    sheds(
        "VersionLayer",
        VersionLayer::header("api-version", "1").unwrap(),
    )
    .await;
    sheds(
        "AttemptTimeoutLayer",
        AttemptTimeoutLayer::new(Some(Duration::from_secs(1))),
    )
    .await;
    sheds("HedgeLayer", HedgeLayer::new()).await;
    sheds("AdaptiveConcurrencyLayer", AdaptiveConcurrencyLayer::new()).await;
    sheds("CoalesceLayer", CoalesceLayer::new()).await;
}

/// The composed client under `LoadShed`, over `ConcurrencyLimit(1)`, and under `Buffer(2)`:
/// a kept service, sequentially and from many clones.
#[tokio::test(start_paused = true)]
async fn the_composed_client_under_load_shed_and_buffer() {
    let builder = || {
        ClientBuilder::new()
            .with_retry(retry())
            .with_hedge(HedgeLayer::new())
            .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
            .with_auth(AuthLayer::bearer("k").unwrap())
            .with_version(VersionLayer::header("api-version", "1").unwrap())
            .with_coalesce(CoalesceLayer::new())
    };
    // Under LoadShed over a full ConcurrencyLimit(1): the second call is shed at once.
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let client = builder().build(ConcurrencyLimit::new(mock, 1));
    let shed = LoadShed::new(client.clone());
    let mut a = shed.clone();
    let first = a.ready().await.unwrap().call(get(1));
    let mut first = tokio_test::task::spawn(first);
    let _ = first.poll();
    let (_r, send) = timeout(BOUND, handle.next_request())
        .await
        .unwrap()
        .unwrap();
    // The client's own readiness: Pending while the limit below is full.
    let mut b = client.clone();
    let mut ready = tokio_test::task::spawn(b.ready());
    assert_pending!(
        ready.poll(),
        "the client said Ready over a full ConcurrencyLimit(1)"
    );
    drop(ready);
    drop(b);
    let mut c = shed.clone();
    let shed_call = c.ready().await.unwrap().call(get(2));
    drop(c);
    let err = timeout(BOUND, shed_call)
        .await
        .expect("a shed call hung")
        .expect_err("a call over a full limit was not shed");
    assert!(
        sturdy_core::find::<tower::load_shed::error::Overloaded>(&*err).is_some(),
        "{err}"
    );
    send.send_response(ok());
    timeout(BOUND, first).await.unwrap().unwrap();

    // Under Buffer(2), from 16 clones, 5 calls each.
    let answers = answer_all(handle);
    let buffered = Buffer::new(client, 2);
    let runs = (0..16).map(|t| {
        let mut mine = buffered.clone();
        async move {
            for i in 0..5 {
                let fut = mine.ready().await?.call(get(1000 + t * 10 + i));
                fut.await?;
            }
            Ok::<_, BoxError>(())
        }
    });
    for r in timeout(BOUND * 10, futures_util::future::join_all(runs))
        .await
        .expect("the composed client under Buffer(2) deadlocked")
    {
        r.unwrap();
    }
    answers.abort();
}

/// docs/guides/circuit.md: "Whatever the classifier says, an error for a call that never
/// reached the dependency is not counted at all (neither failure nor success, and a probe gets
/// its slot back): a local rate-limit refusal, a full concurrency limit, a token the auth layer
/// could not get". tower's `LoadShed` over a full `ConcurrencyLimit` refuses calls locally.
#[tokio::test(start_paused = true)]

async fn a_breaker_does_not_count_calls_shed_by_a_full_local_limit() {
    let (layer, breaker) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let svc = layer.layer(LoadShed::new(ConcurrencyLimit::new(mock, 1)));

    let mut a = svc.clone();
    let first = a.ready().await.unwrap().call(get(1));
    let mut first = tokio_test::task::spawn(first);
    let _ = first.poll();
    let (_r, send) = timeout(BOUND, handle.next_request())
        .await
        .unwrap()
        .unwrap();
    let mut shed = Vec::new();
    for i in 0..3 {
        let mut s = svc.clone();
        let err = s
            .ready()
            .await
            .unwrap()
            .call(get(10 + i))
            .await
            .unwrap_err();
        shed.push(err.to_string());
        assert!(sturdy_core::find::<tower::load_shed::error::Overloaded>(&*err).is_some());
    }
    send.send_response(ok());
    timeout(BOUND, first).await.unwrap().unwrap();

    let delivery = sturdy_core::classify::delivery(&tower::load_shed::error::Overloaded::new());
    let state = breaker.state("api.example.com");
    assert!(
        matches!(state, Some(CircuitState::Closed) | None),
        "3 calls shed locally (never sent: {shed:?}) opened the breaker: {state:?}; \
         delivery of Overloaded reads {delivery:?}"
    );
}
