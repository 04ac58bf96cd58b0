//! No call waits unboundedly for a token: the layer's token timeout bounds each wait, and the
//! source's request timeout bounds each token request. Paused time, in-process token endpoints.

use crate::support;
use std::time::Duration;

use http::StatusCode;
use sturdy_auth::AuthLayer;
use sturdy_core::{Error, ErrorKind};
use support::{get, Api, TokenEndpoint, SECRET};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

fn sturdy_error(err: &sturdy_core::BoxError) -> &Error {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {err:?}"))
}

#[tokio::test(start_paused = true)]
async fn a_silent_token_endpoint_fails_the_call_after_the_default_token_timeout() {
    let ep = TokenEndpoint::new(3_600);
    ep.stall_next(u32::MAX);
    let api = Api::accept_all_tokens();
    let layer = AuthLayer::oauth2(ep.source());
    assert_eq!(layer.token_timeout(), Duration::from_secs(30));
    let svc = layer.layer(api.service());

    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(3_600), svc.oneshot(get()))
        .await
        .expect("the call ends by its token timeout")
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    let e = sturdy_error(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("https://auth.example.com/oauth/token"),
        "names the endpoint: {msg}"
    );
    assert!(!msg.contains("tenant=t1"), "no query: {msg}");
    assert!(!msg.contains(SECRET), "no secret: {msg}");
    assert!(msg.contains("within 30s"), "{msg}");
    assert!(msg.contains("Retryable"), "{msg}");
    assert!(msg.contains("was not sent"), "{msg}");
    assert!(api.calls.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_token_request_goes_on_for_the_callers_after_a_timed_out_one() {
    // The endpoint answers after 24 s; the layer waits 5 s per call.
    let mut ep = TokenEndpoint::new(3_600);
    ep.delay = Duration::from_secs(24);
    let api = Api::accept_all_tokens();
    let svc = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::from_secs(5))
        .layer(api.service());

    let started = Instant::now();
    // Four callers in a row give up after 5 s each; each joins the same token request.
    for _ in 0..4 {
        let err = svc.clone().oneshot(get()).await.unwrap_err();
        assert_eq!(sturdy_error(&err).kind(), &ErrorKind::Timeout);
    }
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    // The fifth gets the token when that request answers, at 24 s.
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(24) + Duration::from_millis(5)
    );
    assert_eq!(ep.count(), 1, "one token request for every caller");
    assert_eq!(api.calls.lock().unwrap()[0].0, "tok-1");
}

#[tokio::test(start_paused = true)]
async fn a_cached_token_is_used_without_waiting_even_with_a_zero_timeout() {
    let ep = TokenEndpoint::new(3_600);
    let api = Api::accept_all_tokens();
    let source = ep.source();
    source.get().await.unwrap();
    let svc = AuthLayer::oauth2(source)
        .with_token_timeout(Duration::ZERO)
        .layer(api.service());
    for _ in 0..10 {
        assert_eq!(
            svc.clone().oneshot(get()).await.unwrap().status(),
            StatusCode::OK
        );
    }
    // With no cached token, zero means "fail at once".
    let cold = AuthLayer::oauth2(ep.source())
        .with_token_timeout(Duration::ZERO)
        .layer(api.service());
    let started = Instant::now();
    let err = cold.oneshot(get()).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(sturdy_error(&err).kind(), &ErrorKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn the_wait_before_a_replay_is_bounded_too() {
    let ep = TokenEndpoint::new(3_600);
    let api = Api::accept_all_tokens();
    let source = ep.source();
    source.get().await.unwrap();
    // tok-1 is cached; the API refuses it, and the next token request never answers.
    api.accept_only(&["tok-2"]);
    ep.stall_next(1);
    let svc = AuthLayer::oauth2(source)
        .with_token_timeout(Duration::from_secs(2))
        .layer(api.service());
    let started = Instant::now();
    let err = svc.oneshot(get()).await.unwrap_err();
    assert!(started.elapsed() <= Duration::from_secs(3));
    assert_eq!(sturdy_error(&err).kind(), &ErrorKind::Timeout);
    assert!(err.to_string().contains("was not replayed"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_black_holed_token_request_ends_by_the_request_timeout_and_the_next_one_starts() {
    let ep = TokenEndpoint::new(3_600);
    ep.stall_next(1);
    let source = ep.source();
    let started = Instant::now();
    let err = source.get().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(30), "default 30 s");
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(err.is_retryable());
    let msg = err.to_string();
    assert!(
        msg.contains("https://auth.example.com/oauth/token did not answer within 30s"),
        "{msg}"
    );
    // During the backoff the answer is repeated without a request; after it, a new request.
    let err = source.get().await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Timeout);
    assert!(
        err.to_string().contains("is not asked again for 1s"),
        "{err}"
    );
    assert_eq!(ep.count(), 1);
    tokio::time::advance(Duration::from_secs(1)).await;
    let token = source.get().await.unwrap();
    assert_eq!(ep.count(), 2);
    assert_eq!(
        sturdy_auth::ExposeSecret::expose_secret(token.secret()),
        "tok-2"
    );

    // A shorter request timeout, set on the source.
    let ep = TokenEndpoint::new(3_600);
    ep.stall_next(1);
    let source = ep
        .source()
        .with_request_timeout(Duration::from_millis(1_500));
    let started = Instant::now();
    let err = source.get().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(1_500));
    assert!(err.to_string().contains("within 1.5s"), "{err}");
}
