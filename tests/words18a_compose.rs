//! The client with every optional layer on, kept under tower's `Buffer` and `Timeout` over a
//! `ConcurrencyLimit(1)`, with calls dropped mid-hedge and mid-wait; and a retry waiting out an
//! open breaker, dropped mid-wait.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use http::StatusCode;
use outsider_common::*;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{BoxError, CallOptions};
use sturdy::hedge::HedgeLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::{Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

/// README: "The client is `Clone + Send + Sync` ... Every layer keeps tower's readiness contract,
/// so the client (or any layer alone) can sit under a `Buffer` or over a `ConcurrencyLimit`,
/// driven by `oneshot` or a kept `ready().await?.call(req)`." With hedging, adaptive concurrency
/// and coalescing on, and calls cut by a `Timeout` above while their first copy hangs below a
/// limit of one: later calls go through.
#[tokio::test(start_paused = true)]
async fn every_layer_on_kept_under_buffer_and_timeout_over_a_limit_of_one() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(10)));
    let http = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(api.service());
    let (hedge, hedges) = HedgeLayer::new().with_min_samples(10).pair();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(5))
        .with_hedge(hedge)
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .build(http);
    assert_send_sync_clone(&client);
    let mut outer = ServiceBuilder::new()
        .buffer(8)
        .timeout(Duration::from_millis(500))
        .service(client);

    // Warm the histogram with sequential calls through the kept service.
    for i in 0..30 {
        let req = get(&format!("http://{HOST}/warm/{i}"));
        let res = outer.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert!(hedges.stats(HOST).and_then(|s| s.delay()).is_some());

    // Three calls whose first copy hangs: each is cut at 500 ms by the timeout above.
    for i in 0..3 {
        // The first copy hangs, holding the only permit below: its hedge waits for it.
        api.push(Answer::Hang);
        let req = get(&format!("http://{HOST}/hang/{i}"));
        let fut = outer.ready().await.unwrap().call(req);
        let err: BoxError = fut.await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }

    // Everything held below was given back: ten calls at once all succeed.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut svc = outer.clone();
        tasks.push(tokio::spawn(async move {
            let req = get(&format!("http://{HOST}/after/{i}"));
            svc.ready().await?.call(req).await
        }));
    }
    for t in tasks {
        let res = t.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

/// circuit.md: with a deadline that fits the breaker's `retry_in`, "the retry layer waits for the
/// probe and tries again". A call dropped while it waits leaves the breaker as it was: the next
/// call after the open period is the probe, and it closes the breaker.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_it_waits_out_an_open_breaker_leaves_it_as_it_was() {
    let api = Api::new(vec![status(503)], ok());
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(60))
        .pair();
    let client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(api.service());
    let mut req = get(&format!("http://{HOST}/x"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(60)));
    let cut = tokio::time::timeout(Duration::from_secs(3), client.clone().oneshot(req)).await;
    assert!(cut.is_err(), "still waiting for the breaker at 3 s");
    assert_eq!(api.calls(), 1);
    assert!(
        matches!(handle.state(HOST), Some(CircuitState::Open { .. })),
        "{:?}",
        handle.state(HOST)
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let res = client
        .oneshot(get(&format!("http://{HOST}/y")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}
