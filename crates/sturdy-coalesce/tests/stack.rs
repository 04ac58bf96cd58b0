//! The three newer layers in the places proposed for them, inside the whole client stack:
//!
//! ```text
//! Coalesce -> IdempotencyKey -> Retry -> Hedge -> CircuitBreaker -> RateLimit
//!          -> AdaptiveConcurrency -> AttemptTimeout -> client
//! ```
//!
//! Once against the chaos server (real time, milliseconds), once over `ConcurrencyLimit(1)` with
//! a kept service on paused time (the readiness contract).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{AttemptTimeoutLayer, Backoff, RetryLayer};
use sturdy_chaos::{http_client, Capacity, ChaosServer, Knobs};
use tower::limit::ConcurrencyLimitLayer;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

fn retry() -> RetryLayer {
    let backoff = Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(50))
        .expect("valid backoff");
    RetryLayer::new()
        .with_backoff(backoff)
        .with_max_attempts(6)
        .with_seed(3)
}

/// For the wire test, where every call must end 200: the server sheds what goes past its
/// capacity while the limit finds it, and on a loaded machine those 503s can spend a per-host
/// budget (which then hands a 503 back, as documented). What is tested here is the composition,
/// so only the attempt limit bounds retries.
fn retry_unbudgeted() -> RetryLayer {
    retry().with_max_attempts(8).without_budget()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_stack_against_a_slow_tailed_failing_server_of_limited_capacity() {
    let server = ChaosServer::start(Knobs {
        orders: 1,
        latency: Duration::from_millis(3),
        tail_latency: Some((0.02, Duration::from_millis(100))),
        error_rate: 0.05,
        capacity: Some(Capacity {
            limit: 12,
            shed_above: 12,
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let (hedge, hedges) = HedgeLayer::new().with_min_samples(50).pair();
    let (limit, limits) = AdaptiveConcurrencyLayer::new().pair();
    let (coalesce, coalesced) = CoalesceLayer::new().pair();
    let client = ServiceBuilder::new()
        .layer(coalesce)
        .layer(IdempotencyKeyLayer::new())
        .layer(retry_unbudgeted())
        .layer(hedge)
        .layer(CircuitBreakerLayer::new())
        .layer(RateLimitLayer::adaptive_only())
        .layer(limit)
        .layer(AttemptTimeoutLayer::new(Some(Duration::from_secs(2))))
        .service(http_client());

    // 16 callers, 50 distinct GETs each: hedging and the limit at work.
    let mut joins = Vec::new();
    for w in 0..16 {
        let client = client.clone();
        let url = server.url("/orders/o_1");
        joins.push(tokio::spawn(async move {
            for i in 0..50 {
                let req = Request::get(format!("{url}?caller={w}&n={i}"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let res = client.clone().oneshot(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
                res.into_body().collect().await.unwrap();
            }
        }));
    }
    for j in joins {
        j.await.unwrap();
    }
    let key = server.addr().to_string();
    let h = hedges.stats(&key).unwrap();
    assert!(h.calls() >= 800, "every attempt of a GET is hedgeable");
    assert!(h.hedges() > 0, "slow attempts were hedged");
    let l = limits.limit(&key).unwrap();
    assert!(
        (4..=20).contains(&l),
        "the limit stayed near the capacity of 12: {l}"
    );
    // The limit kept the server near its capacity (the first burst may overshoot it once).
    let stats = server.stats();
    assert!(stats.shed * 10 < stats.api_requests, "{stats:?}");

    // 200 identical GETs at once: one call for all of them, retries included.
    let before = server.stats().api_requests;
    let url = server.url("/orders/o_1?burst=1");
    let callers: Vec<_> = (0..200)
        .map(|_| {
            let req = Request::get(&url).body(Full::<Bytes>::default()).unwrap();
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    for c in callers {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let upstream = server.stats().api_requests - before;
    assert!(upstream <= 4, "{upstream} requests for 200 identical calls");
    assert!(coalesced.stats().joined() >= 190);
}

/// Over `ConcurrencyLimit(1)`, driven as a kept service with `ready().await?.call(req)`, through
/// the waiting paths (503s retried, slow calls hedged, identical calls joined): nothing deadlocks.
#[tokio::test(start_paused = true)]
async fn the_whole_stack_keeps_the_readiness_contract() {
    let n = Arc::new(AtomicU32::new(0));
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let slow = i % 13 == 12;
            tokio::time::sleep(Duration::from_millis(if slow { 300 } else { 5 })).await;
            let status = if i % 7 == 6 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"ok")))
                    .unwrap(),
            )
        }
    });
    let mut client = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .layer(IdempotencyKeyLayer::new())
        .layer(retry())
        .layer(HedgeLayer::new().with_min_samples(10))
        .layer(CircuitBreakerLayer::new())
        .layer(RateLimitLayer::adaptive_only())
        .layer(AdaptiveConcurrencyLayer::new().with_limits(1, 1))
        .layer(AttemptTimeoutLayer::new(Some(Duration::from_secs(2))))
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api);
    let bound = Duration::from_secs(600);
    tokio::time::timeout(bound, async {
        for i in 0..60 {
            let req = Request::get(format!("http://api.example.com/items/{}", i % 20))
                .body(Full::<Bytes>::default())
                .unwrap();
            let res = client.ready().await.unwrap().call(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
        }
    })
    .await
    .expect("a kept service over ConcurrencyLimit(1) never deadlocks");

    // Concurrent callers on clones, identical requests among them.
    let mut joins = Vec::new();
    for t in 0..8 {
        let c = client.clone();
        joins.push(tokio::spawn(async move {
            let mut c = c;
            for i in 0..10 {
                let req = Request::get(format!("http://api.example.com/items/{}", (t + i) % 4))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                let res = c.ready().await.unwrap().call(req).await.unwrap();
                assert_eq!(res.status(), StatusCode::OK);
            }
        }));
    }
    tokio::time::timeout(bound, async {
        for j in joins {
            j.await.unwrap();
        }
    })
    .await
    .expect("no deadlock with concurrent callers");
}
