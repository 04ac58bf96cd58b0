//! The circuit breaker over tower's `LoadShed`, an OAuth2 request timeout of `Duration::MAX`,
//! and hedging after a quiet spell.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::ClientCredentials;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::{concerns_destination, delivery, describe};
use sturdy::core::{BoxError, Delivery, ErrorSummary};
use sturdy::hedge::HedgeLayer;
use tower::{ServiceBuilder, ServiceExt};

const H: &str = "api.example.com";
const U: &str = "http://api.example.com/things";

/// A call shed by `LoadShed` (the `ConcurrencyLimit` below it full) was never sent, says
/// nothing about the API, and the breaker above does not count it (core CHANGELOG, circuit
/// guide).
#[tokio::test(start_paused = true)]
async fn a_breaker_over_load_shed_does_not_count_shed_calls() {
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let api = Api::new(vec![after(Duration::from_secs(1), ok())], ok());
    let client = ServiceBuilder::new()
        .layer(breaker)
        .layer(tower::load_shed::LoadShedLayer::new())
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let slow = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut shed = Vec::new();
    for _ in 0..3 {
        let err = client
            .clone()
            .oneshot(post(U, "{}"))
            .await
            .expect_err("shed");
        shed.push(err);
    }
    for err in &shed {
        assert_eq!(delivery(&**err), Delivery::NotSent, "{err}");
        assert!(!concerns_destination(&**err), "{err}");
        let words = describe(&**err);
        assert!(words.contains("not sent"), "{words}");
        assert!(words.contains("load shedder"), "{words}");
        assert!(!ErrorSummary::of(&**err).may_have_been_processed);
    }
    assert_eq!(
        handle.state(H).unwrap_or(CircuitState::Closed),
        CircuitState::Closed
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(api.calls(), 1);
}

/// The same under the default client's retry layer: the shed POST without a key was never
/// sent, so the retry may send it again, and the call's error (if any) says not sent.
#[tokio::test(start_paused = true)]
async fn a_shed_post_under_the_retry_layer_reads_not_sent() {
    let api = Api::new(vec![after(Duration::from_secs(5), ok())], ok());
    let client = sturdy::ClientBuilder::new()
        .without_idempotency()
        .without_hedge()
        .with_attempt_timeout(Duration::from_secs(30))
        .build(
            ServiceBuilder::new()
                .layer(tower::load_shed::LoadShedLayer::new())
                .layer(tower::limit::ConcurrencyLimitLayer::new(1))
                .service(api.service()),
        );
    let slow = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let out = client.clone().oneshot(post(U, "{}")).await;
    match out {
        Ok(res) => assert_eq!(res.status(), StatusCode::OK),
        Err(err) => {
            assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
            assert!(
                !err.to_string().contains("may have been processed"),
                "{err}"
            );
        }
    }
    slow.abort();
}

/// `with_request_timeout(Duration::MAX)`: the give-up time (10 s past the timeout) must not
/// overflow; callers get their token.
#[tokio::test(start_paused = true)]
async fn a_token_request_timeout_of_duration_max_does_not_overflow() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let endpoint = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        h.fetch_add(1, Ordering::SeqCst);
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
                r#"{"access_token":"t1","token_type":"Bearer","expires_in":3600}"#,
            )))
        }
    });
    let tokens = ClientCredentials::new(endpoint, "http://auth.example.com/oauth/token", "c", "s")
        .unwrap()
        .with_request_timeout(Duration::MAX);
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let t = tokens.clone();
        waiting.push(tokio::spawn(async move { t.get().await }));
    }
    for w in waiting {
        let tok = w.await.expect("no panic").expect("a token");
        assert_eq!(
            sturdy::auth::ExposeSecret::expose_secret(tok.secret()),
            "t1"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// A host quiet for longer than both windows is not hedged on the delay computed before the
/// quiet (hedge CHANGELOG); nor right after one answered call (too few samples again).
#[tokio::test(start_paused = true)]
async fn no_hedge_after_a_quiet_longer_than_both_windows() {
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(10)
        .with_window(Duration::from_secs(1))
        .pair();
    let api = Api::new(vec![], after(Duration::from_millis(20), ok()));
    let client = ServiceBuilder::new().layer(layer).service(api.service());
    for _ in 0..12 {
        client.clone().oneshot(get(U)).await.unwrap();
    }
    // Hedging is on: a slow call is hedged.
    api.push(after(Duration::from_secs(2), ok()));
    client.clone().oneshot(get(U)).await.unwrap();
    let before = handle.stats(H).unwrap().hedges();
    assert_eq!(before, 1, "hedging was on before the quiet");

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(handle.stats(H).unwrap().delay(), None);
    api.push(after(Duration::from_secs(2), ok()));
    client.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(
        handle.stats(H).unwrap().hedges(),
        before,
        "hedged on a forgotten delay"
    );
    // One more slow call: the windows hold 1 sample, still too few.
    api.push(after(Duration::from_secs(2), ok()));
    client.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.stats(H).unwrap().hedges(), before);
}
