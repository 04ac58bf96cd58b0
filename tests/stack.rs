//! The composed client stack against the chaos server, with every fault on at once.

#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::trace::{DelaySource, TraceEvent};
use sturdy::core::{CircuitOpen, Trace};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm};
use tower::ServiceExt;

fn retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(40)).unwrap();
    RetryLayer::new()
        .with_backoff(backoff)
        .with_max_attempts(8)
        .with_seed(3)
}

#[tokio::test]
async fn two_hundred_orders_through_every_fault_are_two_hundred_orders() {
    let s = ChaosServer::start(Knobs {
        seed: 42,
        idempotency: true,
        require_auth: true,
        token_lifetime: Duration::from_secs(2),
        api_version: Some("2024-06-01".into()),
        error_rate: 0.1,
        reset_after_commit_rate: 0.1,
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let tokens =
        ClientCredentials::new(http_client(), &s.url("/oauth/token"), "client", "secret").unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(20))
        .with_auth(AuthLayer::oauth2(tokens))
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http_client());
    for n in 0..200 {
        let req = Request::post(s.url("/orders"))
            .header("content-type", "application/json")
            .body(Full::from(format!("{{\"n\":{n}}}")))
            .unwrap();
        let res = client
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(|e| panic!("order {n}: {e}"));
        assert_eq!(res.status(), StatusCode::CREATED, "order {n}");
    }
    let st = s.stats();
    assert_eq!(st.orders_committed, 200);
    assert_eq!(st.duplicates_by_payload, 0);
    assert!(
        st.server_errors > 0 && st.resets > 0 && st.rate_limited == 1,
        "{st:?}"
    );
    assert!(st.token_requests >= 1, "{st:?}");
}

#[tokio::test]
async fn the_trace_tells_what_the_stack_did() {
    let s = ChaosServer::start(Knobs {
        fail_next: 1,
        rate_limit_next: 0,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(http_client());
    let trace = Trace::new();
    let mut req = Request::post(s.url("/orders"))
        .body(Full::from("{}"))
        .unwrap();
    req.extensions_mut().insert(trace.clone());
    assert_eq!(
        client.oneshot(req).await.unwrap().status(),
        StatusCode::CREATED
    );
    let ev = trace.events();
    assert!(
        matches!(&ev[0], TraceEvent::IdempotencyKey(k) if k.len() == 36),
        "{ev:?}"
    );
    assert!(
        matches!(&ev[1], TraceEvent::Attempt { number: 1, outcome } if outcome.starts_with("503")),
        "{ev:?}"
    );
    assert!(
        matches!(
            &ev[2],
            TraceEvent::Delay {
                source: DelaySource::Backoff,
                ..
            }
        ),
        "{ev:?}"
    );
    assert!(
        matches!(&ev[3], TraceEvent::Attempt { number: 2, outcome } if outcome.starts_with("201")),
        "{ev:?}"
    );
}

#[tokio::test]
async fn a_dead_api_fails_fast_once_the_breaker_opens() {
    let s = ChaosServer::start(Knobs {
        error_rate: 1.0,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry().with_max_attempts(2))
        .build(http_client());
    let get = || {
        Request::get(s.url("/orders"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    // Stock breaker: once 100 attempts have failed, it opens.
    let mut calls = 0;
    loop {
        calls += 1;
        match client.clone().oneshot(get()).await {
            Err(e) if sturdy::core::find::<CircuitOpen>(&*e).is_some() => break,
            _ => assert!(calls < 100, "the breaker never opened"),
        }
    }
    assert!(s.stats().api_requests <= 100, "{}", s.stats().api_requests);
    let before = s.stats().api_requests;
    for _ in 0..50 {
        let err = client.clone().oneshot(get()).await.unwrap_err();
        assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    }
    assert_eq!(
        s.stats().api_requests,
        before,
        "no call reached the dead API"
    );
}

#[tokio::test]
async fn the_optional_layers_compose_over_the_wire() {
    // Hedging and an adaptive concurrency limit inside, coalescing around: 100 GETs through 10 %
    // injected 503s and a long-tailed latency all succeed, and identical concurrent GETs share.
    let s = ChaosServer::start(Knobs {
        seed: 5,
        error_rate: 0.1,
        orders: 10,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(retry())
        .with_hedge(sturdy::hedge::HedgeLayer::new())
        .with_adaptive_concurrency(sturdy::concurrency::AdaptiveConcurrencyLayer::new())
        .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
        .build(http_client());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let c = client.clone();
            let url = s.url("/orders?limit=5");
            tokio::spawn(async move {
                let res = c
                    .oneshot(Request::get(url).body(Full::<Bytes>::default()).unwrap())
                    .await
                    .unwrap();
                let status = res.status();
                let body = http_body_util::BodyExt::collect(res.into_body())
                    .await
                    .unwrap();
                assert!(!body.to_bytes().is_empty());
                status
            })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), StatusCode::OK);
    }
    // Coalescing shared some of the 100 identical calls.
    assert!(
        s.stats().api_requests < 100 + 50,
        "{}",
        s.stats().api_requests
    );
}
