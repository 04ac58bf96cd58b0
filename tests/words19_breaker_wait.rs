//! docs/guides/circuit.md and `RetryLayer::with_max_retry_after`'s rustdoc, read literally: an
//! open breaker's `retry_in` that fits the call's deadline is waited out even past
//! `max_retry_after`; without a deadline, or when it does not fit, the call fails at once; a
//! local rate limiter's wait stays bounded by `max_retry_after`.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::{CallOptions, CircuitOpen, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::ServiceExt;

const U: &str = "http://api.example.com/items";

fn with_deadline(d: Duration) -> Request<Full<bytes::Bytes>> {
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(d));
    req
}

fn breaker(open: Duration) -> CircuitBreakerLayer {
    CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(open, Duration::from_secs(300).max(open))
}

/// circuit.md: "a call that meets an open breaker fails at once unless it has a deadline that
/// the breaker's `retry_in` fits: then the retry layer waits for the probe and tries again
/// (`max_retry_after` bounds a server's `Retry-After`, not this wait: the deadline does)". A
/// 2 min open period, `max_retry_after` of 1 s, a per-request deadline of 10 min.
#[tokio::test(start_paused = true)]
async fn a_2min_open_breaker_is_waited_past_a_1s_max_retry_after() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(19)
                .with_max_retry_after(Duration::from_secs(1)),
        )
        .with_circuit_breaker(breaker(Duration::from_secs(120)))
        .build(api.service());
    let t0 = Instant::now();
    let res = client
        .oneshot(with_deadline(Duration::from_secs(600)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
    assert!(
        t0.elapsed() >= Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(180),
        "{:?}",
        t0.elapsed()
    );
}

/// retry.md: "without a deadline the call fails at once, so a dead API fails fast", whatever
/// `max_retry_after` allows (here 1 h).
#[tokio::test(start_paused = true)]
async fn without_a_deadline_an_open_breaker_fails_fast_even_with_a_long_max_retry_after() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(19)
                .with_max_retry_after(Duration::from_secs(3_600)),
        )
        .with_circuit_breaker(breaker(Duration::from_secs(30)))
        .build(api.service());
    let t0 = Instant::now();
    let err = client.oneshot(get(U)).await.unwrap_err();
    // One backoff sleep (250 ms to 750 ms) before the retry meets the breaker.
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "{:?}: {err}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 1);
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
}

/// retry.md: "waited out only when the call has a deadline and `retry_in` ends before it": a
/// 2 min open period against a 1 min deadline fails at once, not when the deadline ends.
#[tokio::test(start_paused = true)]
async fn an_open_period_longer_than_the_deadline_fails_at_once() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(breaker(Duration::from_secs(120)))
        .build(api.service());
    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "{:?}: {err}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 1);
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("CircuitOpen in the chain");
    assert!(
        open.retry_in() > Duration::from_secs(100),
        "{:?}",
        open.retry_in()
    );
}

/// RELIABILITY.md: "durations set to `Duration::MAX` (deadlines, ...) | read as about 30 years
/// from now; never a panic", with circuit.md's wait: a 5 min open period fits a deadline of
/// `Duration::MAX`, so it is waited out.
#[tokio::test(start_paused = true)]
async fn a_5min_open_breaker_is_waited_out_under_a_duration_max_deadline() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(breaker(Duration::from_secs(300)))
        .build(api.service());
    let t0 = Instant::now();
    let res = client
        .oneshot(with_deadline(Duration::MAX))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() >= Duration::from_secs(300),
        "{:?}",
        t0.elapsed()
    );
}

/// `RetryLayer::with_max_retry_after`: "It bounds the waits a server asks for (its
/// `Retry-After`, and the wait a local rate limiter's refusal carries), not an open circuit
/// breaker's `retry_in`". A local quota whose next slot is 90 s away, a deadline of 10 min: the
/// refusal's wait (past the default 60 s) is not slept, the call fails at once with it.
#[tokio::test(start_paused = true)]
async fn a_local_rate_limit_wait_past_max_retry_after_is_not_slept_even_within_the_deadline() {
    let api = Api::new(vec![], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(90)).unwrap(),
        ))
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(600)))
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "{:?}: {err}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 1);
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > Duration::from_secs(60),
        "{:?}",
        rl.retry_after()
    );
}

/// circuit.md: the retry layer waits when "the breaker's `retry_in` fits" the deadline: an open
/// period of 30 s against a deadline of 32 s fits, and is waited out.
#[tokio::test(start_paused = true)]
async fn an_open_period_just_within_the_deadline_is_waited_out() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(breaker(Duration::from_secs(30)))
        .build(api.service());
    let t0 = Instant::now();
    let res = client
        .oneshot(with_deadline(Duration::from_secs(32)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
}

/// `ErrorSummary` for a call that met an open breaker it could not wait out: the agent is told
/// the breaker's time (agents.md: `retry_after_ms` is "when the server, a limiter or a breaker
/// said when"), and that nothing may have been processed is false after a sent 503.
#[tokio::test(start_paused = true)]
async fn the_summary_of_a_503_then_an_open_breaker_gives_the_breakers_time() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(breaker(Duration::from_secs(120)))
        .build(api.service());
    let err = client
        .oneshot(with_deadline(Duration::from_secs(60)))
        .await
        .unwrap_err();
    let s = sturdy::core::ErrorSummary::of(&*err);
    assert!(s.may_have_been_processed, "{s:?}");
    let ms = s.retry_after_ms.expect("the breaker said when");
    assert!(ms > 100_000 && ms <= 120_000, "{ms}");
}

/// `with_max_retry_after` "bounds the waits a server asks for ..., not an open circuit
/// breaker's `retry_in`": even a `max_retry_after` of zero (no server wait is ever slept) leaves
/// a 30 s open period that fits a 1 min deadline to be waited out.
#[tokio::test(start_paused = true)]
async fn a_zero_max_retry_after_still_waits_out_an_open_breaker_within_the_deadline() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(19)
                .with_max_retry_after(Duration::ZERO),
        )
        .with_circuit_breaker(breaker(Duration::from_secs(30)))
        .build(api.service());
    let t0 = Instant::now();
    let res = client
        .oneshot(with_deadline(Duration::from_secs(60)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
}

/// RELIABILITY.md: "`CallOptions::with_deadline(Duration::MAX)`, `with_open_duration(Duration::MAX,
/// _)` | the request panicked | about 30 years". Both at once, with the retry waiting for an
/// open breaker: never a panic, and the call ends (paused time runs ahead).
#[tokio::test(start_paused = true)]
async fn a_duration_max_open_period_under_a_duration_max_deadline_never_panics() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::MAX, Duration::MAX),
        )
        .build(api.service());
    let res = tokio::spawn(client.oneshot(with_deadline(Duration::MAX)))
        .await
        .unwrap_or_else(|e| panic!("the call panicked: {e}"));
    match res {
        Ok(r) => assert_eq!(r.status(), StatusCode::OK),
        Err(e) => assert!(sturdy::core::find::<CircuitOpen>(&*e).is_some(), "{e}"),
    }
}
