//! Hold marks in `ClientBuilder` stacks (`RetryLayer::with_hold_marks`, `sturdy_core::hold`): a
//! deadline ending while a layer below holds the attempt back says `Delivery::NotSent`. The
//! dangerous direction is a request that reached the server reported as never sent.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CallOptions, Delivery};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::{timeout, Instant};
use tower::{Layer, Service, ServiceExt};

const U: &str = "http://api.example.com/payments";
const LIMIT: Duration = Duration::from_secs(30);

fn with_deadline(mut req: Request<Full<Bytes>>, d: Duration) -> Request<Full<Bytes>> {
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(d));
    req
}

fn keyed_post() -> Request<Full<Bytes>> {
    Request::post(U)
        .header("idempotency-key", "k-17")
        .body(Full::from("{\"amount\":1}"))
        .unwrap()
}

/// A layer of the user's that sends a request once more when the first copy is answered 503.
#[derive(Clone)]
struct SendAgain<S> {
    inner: S,
}

impl<S> Service<Request<Full<Bytes>>> for SendAgain<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
{
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let mut inner = self.inner.clone();
        let mut again = Request::new(req.body().clone());
        *again.method_mut() = req.method().clone();
        *again.uri_mut() = req.uri().clone();
        *again.headers_mut() = req.headers().clone();
        *again.extensions_mut() = req.extensions().clone();
        let first = self.inner.call(req);
        Box::pin(async move {
            let res = first.await.map_err(Into::into)?;
            if res.status() != StatusCode::SERVICE_UNAVAILABLE {
                return Ok(res);
            }
            inner
                .ready()
                .await
                .map_err(Into::into)?
                .call(again)
                .await
                .map_err(Into::into)
        })
    }
}

#[derive(Clone)]
struct SendAgainLayer;
impl<S> Layer<S> for SendAgainLayer {
    type Service = SendAgain<S>;
    fn layer(&self, inner: S) -> SendAgain<S> {
        SendAgain { inner }
    }
}

/// `ClientBuilder::with_retry`: "Retries, as configured". A retry layer configured with
/// `with_hold_marks(false)` ("Off, a deadline that ends mid-attempt says the attempt may have
/// been processed, which is always safe to act on") next to a layer of the user's that sends
/// again (which `with_hold_marks` says must not sit below a marking retry layer). The first copy
/// reached the API and was answered 503 with `Retry-After`; the copy sent again waits in the
/// pause that answer began, and the deadline ends there.
#[tokio::test(start_paused = true)]
async fn a_retry_layer_configured_without_marks_stays_without_them() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "5")])], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_hold_marks(false))
        .with_hedge(SendAgainLayer)
        .build(api.service());
    let err = timeout(
        LIMIT,
        client.oneshot(with_deadline(keyed_post(), Duration::from_secs(1))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(api.calls(), 1, "the API saw the first copy");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

/// The same with the builder's own retry layer: the builder's docs say every layer can be
/// replaced ("configured as you like"), and nothing in them says that a layer in the hedge slot
/// must not send again. The API saw the request: it must not be reported as never sent.
#[tokio::test(start_paused = true)]
async fn a_layer_of_ones_own_in_the_hedge_slot_does_not_make_a_sent_post_read_not_sent() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "5")])], ok());
    let client = ClientBuilder::new()
        .with_hedge(SendAgainLayer)
        .build(api.service());
    let err = timeout(
        LIMIT,
        client.oneshot(with_deadline(keyed_post(), Duration::from_secs(1))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(api.calls(), 1, "the API saw the first copy");
    assert_ne!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(
        !err.to_string().contains("before it was sent"),
        "the message says it was never sent: {err}"
    );
}

/// The builder's own layers, every option on (adaptive concurrency, version pin, a quota),
/// under tower's `Buffer` and through a clone: a call whose deadline ends in the quota's wait
/// was never sent, and says so, naming the wait.
#[tokio::test(start_paused = true)]
async fn every_option_under_a_buffer_a_quota_wait_reads_not_sent() {
    let api = Api::new(vec![], ok());
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(10)).unwrap(),
        ))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_version(sturdy::version::VersionLayer::header("api-version", "2024-01-01").unwrap())
        .with_attempt_timeout(Duration::from_millis(100))
        .build(api.service());
    let buffered = tower::buffer::Buffer::new(client, 8);
    let first = buffered.clone().oneshot(keyed_post()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let start = Instant::now();
    let err = timeout(
        LIMIT,
        buffered
            .clone()
            .oneshot(with_deadline(keyed_post(), Duration::from_millis(500))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert!(start.elapsed() <= Duration::from_millis(500));
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("rate limit"), "{err}");
}

/// An attempt answered 500, then the retry is due before the next quota slot, which comes after
/// the deadline: the rate limit refuses it at once, the error names the answered attempt and the
/// refusal, and the call may have been processed (the first attempt reached the API), with one
/// attempt made.
#[tokio::test(start_paused = true)]
async fn a_retry_after_an_answered_attempt_held_by_the_quota_may_have_been_processed() {
    let api = Api::new(vec![status(500)], ok());
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(10)).unwrap(),
        ))
        .build(api.service());
    let err = timeout(
        LIMIT,
        client.oneshot(with_deadline(keyed_post(), Duration::from_secs(2))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let own = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(own.report().unwrap().attempts(), 1, "{err}");
    let text = err.to_string();
    assert!(text.contains("500 Internal Server Error"), "{text}");
    assert!(text.contains("rate limited by api.example.com"), "{text}");
    assert!(text.contains("k-17"), "{text}");
    assert!(!text.contains("not sent"), "{text}");
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some(),
        "the refusal's wait can be found: {text}"
    );
}

/// The hedge's second copy (sturdy's own hedge in its slot) waits in a pause that another call's
/// answer began while the first copy is out at the API: the first copy may have been processed.
#[tokio::test(start_paused = true)]
async fn a_hedged_get_whose_second_copy_waits_in_a_pause_may_have_been_processed() {
    let api = Api::new(vec![], ok());
    let (rl, handle) = RateLimitLayer::adaptive_only().pair();
    let hedges = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hedges.clone();
    let client = ClientBuilder::new()
        .with_hedge(
            sturdy::hedge::HedgeLayer::new()
                .with_min_samples(1)
                .with_delay_bounds(Duration::from_millis(50), Duration::from_millis(50))
                .on_event(move |e| {
                    if matches!(e, sturdy::core::events::Event::HedgeSent { .. }) {
                        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }),
        )
        .with_rate_limit(rl)
        .build(api.service());
    // Teach the hedge the host's latency (quick answers).
    for _ in 0..20 {
        let _ = client.clone().oneshot(get(U)).await.unwrap();
    }
    let before = api.calls();
    // The next request hangs at the API; a request of another call gets a 429 that pauses
    // the host for 10 s just after.
    api.push(Answer::Hang);
    let call = tokio::spawn(
        client
            .clone()
            .oneshot(with_deadline(get(U), Duration::from_millis(500))),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(api.calls(), before + 1, "the first copy is out");
    api.push(status_h(429, &[("retry-after", "10")]));
    let mut other = get(U);
    other
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(other).await;
    assert!(handle.pause("api.example.com").is_some());
    let err = timeout(LIMIT, call)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap_err();
    assert_eq!(api.calls(), before + 2, "the hedge copy was held");
    assert_eq!(
        hedges.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a hedge was sent"
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

/// Two processes' clients share a Redis-backed quota, both with bare 503 pauses on: a bare 503
/// to one pauses the other's calls too, and a keyed POST of the other whose deadline ends in
/// that pause was never sent, and says so. Real time, millisecond settings; skipped without
/// `STURDY_REDIS_URL`.
#[tokio::test]
async fn a_bare_503_pause_shared_through_redis_holds_the_other_clients_post_unsent() {
    let Ok(url) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return;
    };
    let quota = Quota::new(100, Duration::from_secs(1)).unwrap();
    let host = format!("review17-{}.example.com", std::process::id());
    let uri = format!("http://{host}/payments");
    let api = Api::new(vec![status(503)], ok());
    let mut clients = Vec::new();
    for _ in 0..2 {
        let rq = sturdy::redis::RedisQuota::connect(&url, quota)
            .await
            .unwrap();
        clients.push(
            ClientBuilder::new()
                .with_rate_limit(
                    RateLimitLayer::new(quota)
                        .with_remote(std::sync::Arc::new(rq))
                        .with_bare_503_pauses(true),
                )
                .build(api.service()),
        );
    }
    let mut first = get(&uri);
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = clients[0].clone().oneshot(first).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Let the pause reach the store.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let req = Request::post(uri.as_str())
        .header("idempotency-key", "k-17-redis")
        .body(Full::from("{}"))
        .unwrap();
    let start = Instant::now();
    let out = timeout(
        LIMIT,
        clients[1]
            .clone()
            .oneshot(with_deadline(req, Duration::from_millis(300))),
    )
    .await
    .expect("no hang");
    let err = match out {
        Ok(res) => panic!(
            "sent during the shared pause: {} after {:?}",
            res.status(),
            start.elapsed()
        ),
        Err(e) => e,
    };
    assert_eq!(api.calls(), 1, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

/// Adaptive concurrency (one place) with a static bearer token and a version pin: a keyed POST
/// whose deadline ends while it waits for the place held by a hanging call was never sent, and
/// says what it waited for.
#[tokio::test(start_paused = true)]
async fn a_deadline_in_the_wait_for_a_concurrency_place_reads_not_sent() {
    let api = Api::new(vec![Answer::Hang], ok());
    let client = ClientBuilder::new()
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_initial_limit(1)
                .with_max_wait(Duration::from_secs(10)),
        )
        .with_auth(sturdy::auth::AuthLayer::bearer("secret").unwrap())
        .with_version(sturdy::version::VersionLayer::header("api-version", "2024-01-01").unwrap())
        .build(api.service());
    let hanging = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(api.calls(), 1);
    let err = timeout(
        LIMIT,
        client
            .clone()
            .oneshot(with_deadline(keyed_post(), Duration::from_millis(300))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("concurrency"), "{err}");
    hanging.abort();
}
