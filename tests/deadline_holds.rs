//! A call whose deadline ends while a layer below the retry layer holds its attempt back (the
//! rate limit's pause, the first token, a place under the concurrency limit) was never sent: its
//! error says so (`Delivery::NotSent`), names what it waited for, and advises as for a call that
//! never left. A deadline that ends after an attempt was sent still says it may have been
//! processed.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CallOptions, Delivery, ErrorSummary};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::ServiceExt;

const U: &str = "http://api.example.com/orders";

fn with_deadline(mut req: Request<Full<Bytes>>, d: Duration) -> Request<Full<Bytes>> {
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(d));
    req
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_pause_past_the_deadline_is_refused_at_once_not_sent() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "5")])], ok());
    let client = ClientBuilder::new().build(api.service());
    let mut first = get(U);
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    // One attempt only: the 429 comes back as the call's error, and pauses the host for 5 s.
    let err = client.clone().oneshot(first).await.unwrap_err();
    assert!(err.to_string().contains("rate limited"), "{err}");

    // The pause ends 5 s from now, the deadline 300 ms from now: waiting is of no use, and the
    // call is told at once, with the wait.
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(with_deadline(post(U, "{}"), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "refused at once: {err}");
    assert_eq!(api.calls(), 1, "nothing more was sent");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let s = ErrorSummary::of(&*err);
    assert!(!s.may_have_been_processed, "{s:?}");
    let rl = sturdy::core::find::<sturdy::core::RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > Duration::from_secs(4) && rl.retry_after() <= Duration::from_secs(5),
        "{rl:?}"
    );
    let text = err.to_string();
    assert!(text.contains("rate limit"), "{text}");
    assert!(!text.contains("may have been processed"), "{text}");

    // A deadline past the pause's end waits it out and is sent.
    let res = client
        .oneshot(with_deadline(post(U, "{}"), Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_ending_in_the_first_token_wait_says_not_sent() {
    let endpoint = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(
            r#"{"access_token":"t1","token_type":"Bearer","expires_in":3600}"#,
        )))
    });
    let tokens =
        ClientCredentials::new(endpoint, "http://auth.example.com/oauth/token", "c", "s").unwrap();
    let api = Api::new(vec![], ok());
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(api.service());
    let err = client
        .oneshot(with_deadline(post(U, "{}"), Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let text = err.to_string();
    assert!(text.contains("access token"), "{text}");
    assert!(!text.contains("may have been processed"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_deadline_ending_while_waiting_for_a_place_says_not_sent() {
    let api = Api::new(vec![after(Duration::from_secs(10), ok())], ok());
    let client = ClientBuilder::new()
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new().with_limits(1, 1))
        .build(api.service());
    let slow = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = client
        .oneshot(with_deadline(post(U, "{}"), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1, "only the slow call was sent");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("concurrency limit"), "{err}");
    slow.abort();
}

#[tokio::test(start_paused = true)]
async fn a_deadline_ending_after_the_attempt_was_sent_still_says_maybe() {
    let api = Api::new(vec![after(Duration::from_secs(10), ok())], ok());
    let client = ClientBuilder::new().build(api.service());
    let err = client
        .oneshot(with_deadline(post(U, "{}"), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("may have been processed"), "{err}");
}
