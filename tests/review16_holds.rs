//! `sturdy_core::hold`: a deadline that ends while a layer below holds the attempt back says
//! the attempt was never sent (`Delivery::NotSent`). The dangerous direction is a call that was
//! sent (or may have been) reported as never sent: a POST then goes again as new.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::{AuthLayer, Token, TokenSource};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CallOptions, Delivery, ErrorSummary};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/payments";

fn with_deadline(mut req: Request<Full<Bytes>>, d: Duration) -> Request<Full<Bytes>> {
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(d));
    req
}

fn keyed_post() -> Request<Full<Bytes>> {
    Request::post(U)
        .header("idempotency-key", "k-16")
        .body(Full::from("{\"amount\":1}"))
        .unwrap()
}

/// Tokens "t1", "t2", ... at once; counts the invalidations.
#[derive(Debug, Default)]
struct Counter {
    issued: AtomicUsize,
    invalidated: AtomicUsize,
}

impl TokenSource for Counter {
    fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Ok(Token::new(format!("t{n}"), None)) })
    }
    fn invalidate(&self, _token: &Token) {
        self.invalidated.fetch_add(1, Ordering::SeqCst);
    }
}

/// The auth layer replays a request that got a 401 with a fresh token. The API saw the first
/// copy and answered it, so the auth guide says "the error says `Delivery::MaybeProcessed`".
/// With the rate limit below the auth layer, the replay waits for its turn: a deadline ending
/// then must not say the call was never sent.
#[tokio::test(start_paused = true)]
async fn a_401_replay_held_by_a_rate_limit_is_not_reported_never_sent() {
    let api = Api::new(vec![status(401)], ok());
    let source = Arc::new(Counter::default());
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new().with_hold_marks(true))
        .layer(AuthLayer::token_source(source.clone()))
        .layer(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(10)).unwrap(),
        ))
        .service(api.service());
    let err = client
        .oneshot(with_deadline(keyed_post(), Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1, "the first copy reached the API");
    assert_eq!(source.invalidated.load(Ordering::SeqCst), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(ErrorSummary::of(&*err).may_have_been_processed, "{err}");
}

/// A layer of the user's between the retry layer and the rate limit that sends a request once
/// more on a 503 (a copy with the same extensions, as `http::Request` clones carry them).
#[derive(Clone)]
struct AgainOn503<S> {
    inner: S,
}

impl<S> Service<Request<Full<Bytes>>> for AgainOn503<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let mut inner = self.inner.clone();
        let mut copy = Request::new(req.body().clone());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.headers_mut() = req.headers().clone();
        *copy.extensions_mut() = req.extensions().clone();
        let first = self.inner.call(req);
        Box::pin(async move {
            let res = first.await?;
            if res.status() != StatusCode::SERVICE_UNAVAILABLE {
                return Ok(res);
            }
            inner.ready().await?.call(copy).await
        })
    }
}

struct AgainOn503Layer;
impl<S> Layer<S> for AgainOn503Layer {
    type Service = AgainOn503<S>;
    fn layer(&self, inner: S) -> AgainOn503<S> {
        AgainOn503 { inner }
    }
}

/// The same through a layer of the user's that sends again (with a retry layer of the user's,
/// whose hold marks are off by default: `with_hold_marks` says a layer that re-sends must not sit
/// below a marking retry layer): the first copy got a bare 503 (which pauses the host 1 s), the
/// second waits for the pause. The first copy was answered: "may have been processed".
#[tokio::test(start_paused = true)]
async fn a_request_sent_again_below_the_retry_layer_is_not_reported_never_sent() {
    let api = Api::new(vec![status(503)], ok());
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(AgainOn503Layer)
        .layer(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .service(api.service());
    let err = client
        .oneshot(with_deadline(keyed_post(), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

/// A bare 503 pauses the host 1 s now; the retry of a keyed POST is due in that pause, whose end
/// comes after the deadline: the rate limit refuses it at once. The first attempt was answered,
/// so the call may have been processed, one attempt was made, and the message names the
/// refusal.
#[tokio::test(start_paused = true)]
async fn a_retry_held_by_a_bare_503_pause_says_maybe_processed_after_one_attempt() {
    let api = Api::new(vec![status(503)], ok());
    // A backoff of exactly 250 ms, so the retry is due well within the deadline.
    let client = sturdy::ClientBuilder::new()
        .without_hedge()
        .with_rate_limit(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .with_retry(
            RetryLayer::new().with_backoff(
                sturdy::retry::Backoff::exponential(
                    Duration::from_millis(250),
                    Duration::from_millis(250),
                )
                .unwrap(),
            ),
        )
        .build(api.service());
    let start = Instant::now();
    let out = client
        .oneshot(with_deadline(keyed_post(), Duration::from_millis(700)))
        .await;
    let seen: Vec<_> = api.seen().iter().map(|s| s.at - start).collect();
    let err = match out {
        Ok(res) => panic!(
            "answered {} after {:?}; requests at {seen:?}",
            res.status(),
            start.elapsed()
        ),
        Err(e) => e,
    };
    // Refused when the retry came due (after the 250 ms backoff), not at the deadline.
    assert_eq!(start.elapsed(), Duration::from_millis(250), "{err}");
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let own = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    let report = own.report().expect("a report");
    assert_eq!(report.attempts(), 1, "{err}");
    assert_eq!(report.idempotency_key(), Some("k-16"));
    let text = err.to_string();
    assert!(text.contains("rate limit"), "{text}");
    assert!(text.contains("may have been processed"), "{text}");
}

/// tower's `Buffer` between the retry layer and the rate limit: the rate limit still marks the
/// wait, and the deadline says the attempt was never sent.
#[tokio::test(start_paused = true)]
async fn a_buffer_between_retry_and_rate_limit_keeps_the_mark() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "5")])], ok());
    let (rl, handle) = RateLimitLayer::adaptive_only()
        .with_bare_503_pauses(true)
        .pair();
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new().with_hold_marks(true))
        .layer(tower::buffer::BufferLayer::new(8))
        .layer(rl)
        .service(api.service());
    let mut first = get(U);
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(first).await;
    assert!(handle.pause("api.example.com").is_some());
    let err = client
        .oneshot(with_deadline(post(U, "{}"), Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("rate limit"), "{err}");
}

/// A token wait that ended in an error (the token timeout) leaves its mark; the retry that
/// follows is sent, and a deadline ending while it is out says it may have been processed.
#[tokio::test(start_paused = true)]
async fn a_retry_after_a_failed_token_wait_that_was_sent_says_maybe_processed() {
    #[derive(Debug)]
    struct SlowOnce(AtomicUsize);
    impl TokenSource for SlowOnce {
        fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok(Token::new("t", None))
            })
        }
        fn invalidate(&self, _token: &Token) {}
    }
    let api = Api::new(vec![Answer::Hang], ok());
    let client = sturdy::ClientBuilder::new()
        .with_auth(
            AuthLayer::token_source(Arc::new(SlowOnce(AtomicUsize::new(0))))
                .with_token_timeout(Duration::from_millis(100)),
        )
        .build(api.service());
    let err = client
        .oneshot(with_deadline(keyed_post(), Duration::from_secs(3)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1, "the retry was sent");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(!err.to_string().contains("before it was sent"), "{err}");
}

/// Coalescing between the retry layer and the rate limit: the leader's deadline ends while the
/// shared call waits in the pause, and the leader is told its request was never sent; the
/// shared call goes on for the follower and is sent when the pause ends.
#[tokio::test(start_paused = true)]
async fn a_coalesced_leader_told_not_sent_is_not_sent_later() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "2")])], ok());
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new().with_hold_marks(true))
        .layer(CoalesceLayer::new())
        .layer(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .service(api.service());
    let mut first = get(U);
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(first).await;
    assert_eq!(api.calls(), 1);

    let leader = tokio::spawn(
        client
            .clone()
            .oneshot(with_deadline(get(U), Duration::from_millis(300))),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let follower = tokio::spawn(client.clone().oneshot(get(U)));
    let leader = leader.await.unwrap();
    let err = leader.expect_err("the leader's deadline ends in the pause");
    let said = delivery(&*err);
    let follower = follower.await.unwrap();
    assert!(follower.is_ok(), "{:?}", follower.err());
    // The leader carries `CallOptions` (its deadline), so it is not coalesced: its own request
    // was dropped in the pause and never sent; the follower's went on its own.
    assert_eq!(api.calls(), 2, "the first request and the follower's");
    assert_eq!(said, Delivery::NotSent, "{err}");
}

/// The Redis-backed quota: a call waiting for the store's slot when its deadline ends was never
/// sent. Real time, millisecond settings; skipped without `STURDY_REDIS_URL`.
#[tokio::test]
async fn a_deadline_ending_in_a_redis_quota_wait_says_not_sent() {
    let Ok(url) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return;
    };
    let quota = Quota::new(1, Duration::from_secs(3)).unwrap();
    let rq = sturdy::redis::RedisQuota::connect(&url, quota)
        .await
        .unwrap();
    let host = format!("review16-{}.example.com", std::process::id());
    let uri = format!("http://{host}/payments");
    let api = Api::new(vec![], ok());
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new().with_hold_marks(true))
        .layer(RateLimitLayer::new(quota).with_remote(Arc::new(rq)))
        .service(api.service());
    let res = client.clone().oneshot(get(&uri)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let req = Request::post(uri.as_str()).body(Full::from("{}")).unwrap();
    let err = client
        .oneshot(with_deadline(req, Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("rate limit"), "{err}");
}

/// The auth guide's words for a deadline that ends in the first token wait: "the overall deadline
/// of 200ms passed while attempt 1 waited for an access token, before it was sent", and an
/// agent's `ErrorSummary` says `may_have_been_processed: false`.
#[tokio::test(start_paused = true)]
async fn the_auth_guides_words_for_a_deadline_in_the_first_token_wait() {
    #[derive(Debug)]
    struct Slow;
    impl TokenSource for Slow {
        fn token(&self) -> sturdy::auth::BoxFuture<Result<Token, BoxError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(Token::new("t", None))
            })
        }
        fn invalidate(&self, _token: &Token) {}
    }
    let api = Api::new(vec![], ok());
    let client = sturdy::ClientBuilder::new()
        .with_auth(AuthLayer::token_source(Arc::new(Slow)))
        .build(api.service());
    let err = client
        .oneshot(with_deadline(keyed_post(), Duration::from_millis(200)))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(
            "the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"
        ),
        "{text}"
    );
    assert!(!ErrorSummary::of(&*err).may_have_been_processed, "{text}");
    assert_eq!(api.calls(), 0);
}

/// The retry layer's own attempt timeout ending while the rate limit holds the attempt back:
/// the attempt never left, as a deadline ending there would say.
#[tokio::test(start_paused = true)]
#[ignore = "not done: the retry layer's own attempt timeout does not read the hold marks (no doc promises it)"]
async fn an_attempt_timeout_in_the_rate_limits_pause_says_not_sent() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "5")])], ok());
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new().with_attempt_timeout(Duration::from_millis(300)))
        .layer(RateLimitLayer::adaptive_only().with_bare_503_pauses(true))
        .service(api.service());
    let mut first = get(U);
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(first).await;
    let out = client
        .oneshot(with_deadline(post(U, "{}"), Duration::from_secs(2)))
        .await;
    let err = out.expect_err("still paused at 2 s");
    assert_eq!(api.calls(), 1, "nothing more was sent");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}
