//! Cheap claims of the docs next to the areas above: attempt limits, key methods, the overflow
//! limiter's refusal, and the token wait bounded by the attempt timeout (ClientBuilder rustdoc:
//! "the wait for a token is bounded by the attempt timeout too ... such a call fails
//! `NotSent`"). Paused time, in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::time::Duration;

use http::Method;
use outsider4_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::classify::delivery;
use sturdy::core::{find, CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

const URL: &str = "http://api.example.com/x";

/// retry.md: "`.with_max_attempts(n)` \[4\] (0 is taken as 1)"; `CallOptions::with_max_attempts`:
/// "(0 is taken as 1)".
#[tokio::test(start_paused = true)]
async fn zero_attempts_is_one() {
    let api = Api::always(st(503));
    let svc = RetryLayer::new().with_max_attempts(0).layer(api.service());
    assert_eq!(bounded(svc.oneshot(get(URL))).await.unwrap().status(), 503);
    assert_eq!(api.calls(), 1);

    let api = Api::always(st(503));
    let svc = RetryLayer::new().layer(api.service());
    let mut req = get(URL);
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(0));
    assert_eq!(bounded(svc.oneshot(req)).await.unwrap().status(), 503);
    assert_eq!(api.calls(), 1);

    let api = Api::always(st(503));
    let svc = RetryLayer::new().with_seed(1).layer(api.service());
    let mut req = get(URL);
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(2));
    assert_eq!(bounded(svc.oneshot(req)).await.unwrap().status(), 503);
    assert_eq!(api.calls(), 2);
}

/// idempotency.md: "`.with_methods([..])` change[s] ... the methods": with PUT only, a PUT gets a
/// key (the same on every retry) and a POST none (so it is not retried after a 503).
#[tokio::test(start_paused = true)]
async fn key_methods_can_be_changed() {
    let api = Api::new(|n, _| if n == 0 { st(503) } else { st(200) });
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .layer(RetryLayer::new().with_seed(1))
        .service(api.service());
    let req = http::Request::put(URL).body(Body::from("{}")).unwrap();
    assert_eq!(
        bounded(svc.clone().oneshot(req)).await.unwrap().status(),
        200
    );
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    let k0 = seen[0].headers.get("idempotency-key").cloned();
    assert!(k0.is_some());
    assert_eq!(k0, seen[1].headers.get("idempotency-key").cloned());

    let api = Api::always(st(503));
    let svc = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .layer(RetryLayer::new().with_seed(1))
        .service(api.service());
    assert_eq!(bounded(svc.oneshot(post(URL))).await.unwrap().status(), 503);
    let seen = api.seen();
    assert_eq!(seen.len(), 1, "an unkeyed POST is not retried");
    assert!(seen[0].headers.get("idempotency-key").is_none());
}

/// ratelimit.md: "Past the most limiters kept (`with_max_keys`), new keys share one overflow
/// limiter: a refusal then names it ("rate limited by the overflow limiter shared by the keys
/// past the most limiters kept")."
#[tokio::test(start_paused = true)]
async fn the_overflow_limiters_refusal_names_it() {
    let api = Api::always(st(200));
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_keys(1)
        .with_max_wait(Duration::ZERO)
        .layer(api.service());
    // The one limiter kept: a.example.com, busy (its slot is used).
    bounded(svc.clone().oneshot(get("http://a.example.com/x")))
        .await
        .unwrap();
    // Two new hosts share the overflow limiter: the second is refused.
    bounded(svc.clone().oneshot(get("http://b.example.com/x")))
        .await
        .unwrap();
    let err = bounded(svc.clone().oneshot(get("http://c.example.com/x")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "rate limited by the overflow limiter shared by the keys past the most limiters kept"
        ),
        "{err}"
    );
    assert!(find::<RateLimited>(&*err).is_some());
}

fn hanging_tokens() -> (ClientCredentials, Api) {
    let token_api = Api::always(Act::Hang);
    let tokens = ClientCredentials::new(
        token_api.service(),
        "http://auth.example.com/oauth/token",
        "client-id",
        "client-secret",
    )
    .unwrap();
    (tokens, token_api)
}

/// A token endpoint that never answers: in `ClientBuilder` the call fails at the attempt
/// timeout (1 s here), kind `Timeout`, `NotSent`, and the API is never called.
#[tokio::test(start_paused = true)]
async fn a_token_wait_is_bounded_by_the_builders_attempt_timeout() {
    let (tokens, _token_api) = hanging_tokens();
    let api = Api::always(st(200));
    let client = ClientBuilder::new()
        .without_retry()
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let t0 = Instant::now();
    let err = bounded(client.oneshot(get(URL))).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(1), "{err}");
    assert_eq!(api.calls(), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(*sturdy_error(&err).kind(), ErrorKind::Timeout, "{err}");
}

/// "... (the builder's, or the request's own from `CallOptions::with_attempt_timeout`)": the
/// request's 2 s wins over the builder's 10 s; with `without_attempt_timeout` the token timeout
/// (30 s) bounds the wait.
#[tokio::test(start_paused = true)]
async fn a_token_wait_is_bounded_by_the_requests_attempt_timeout() {
    let (tokens, _token_api) = hanging_tokens();
    let api = Api::always(st(200));
    let client = ClientBuilder::new()
        .without_retry()
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(secs(10))
        .build(api.service());
    let mut req = get(URL);
    req.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(secs(2)));
    let t0 = Instant::now();
    let err = bounded(client.clone().oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(2), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");

    let (tokens, _token_api) = hanging_tokens();
    let client = ClientBuilder::new()
        .without_retry()
        .with_auth(AuthLayer::oauth2(tokens))
        .with_attempt_timeout(secs(10))
        .build(api.service());
    let mut req = get(URL);
    req.extensions_mut()
        .insert(CallOptions::new().without_attempt_timeout());
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(30), "{err}");
    assert_eq!(api.calls(), 0);
}

/// ratelimit.md: "Inside `sturdy::ClientBuilder` ... `RateLimited` is retryable: a refused call
/// is retried after the wait the refusal carries ... so with zero `max_wait` the *call* may
/// still wait, in the retry layer's sleep"; retry.md: a POST is retried without a key "when the
/// failure proves the request never left (... a local rate limit)".
#[tokio::test(start_paused = true)]
async fn a_local_refusal_is_retried_after_its_wait_even_for_an_unkeyed_post() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "3")])
        } else {
            st(201)
        }
    });
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(RetryLayer::new().with_seed(1))
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::ZERO))
        .build(api.service());
    // The first call meets the 429 and is retried after it (GET).
    let first = tokio::spawn(client.clone().oneshot(get(URL)));
    tokio::time::sleep(ms(100)).await;
    // A POST without a key made during the pause: refused locally, retried after the wait.
    let t0 = Instant::now();
    let res = bounded(client.clone().oneshot(post(URL))).await.unwrap();
    assert_eq!(res.status(), 201);
    let took = t0.elapsed();
    assert!(
        took >= ms(2_900) && took <= ms(3_600),
        "waited the pause's 2.9 s (+ jitter): {took:?}"
    );
    let posts = api
        .seen()
        .iter()
        .filter(|s| s.method == Method::POST)
        .count();
    assert_eq!(posts, 1, "sent once");
    assert_eq!(bounded(first).await.unwrap().unwrap().status(), 201);
}
