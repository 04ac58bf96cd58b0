//! Cancellation: calls dropped while they sleep a retry, wait for a token, wait for a coalesced
//! answer, fetch a page or wait in a `DirectLimiter` line; what they held must come back.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use http::StatusCode;
use http_body_util::BodyExt;
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::ratelimit::{DirectLimiter, Quota};
use sturdy::retry::RetryLayer;
use tokio::time::{advance, timeout, Instant};
use tokio_test::task::spawn;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(30);

fn json_page(body: &'static str) -> Answer {
    Answer::Status(
        200,
        vec![("content-type", "application/json".to_owned())],
        body,
    )
}

fn token_answer() -> Answer {
    Answer::Status(
        200,
        vec![("content-type", "application/json".to_owned())],
        r#"{"access_token":"tok-1","token_type":"Bearer","expires_in":3600}"#,
    )
}

/// docs/guides/concurrency.md: "Below the retry layer, each attempt takes a place; a retried call
/// gives its place back while it sleeps." With a limit of one, a second caller goes while the
/// first sleeps out a `Retry-After: 5`.
#[tokio::test(start_paused = true)]
async fn a_retry_sleeping_out_retry_after_gives_its_adaptive_place_back() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "5")])], ok());
    let (conc, places) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(1).without_budget())
        .layer(conc)
        .service(api.service());
    let start = Instant::now();
    let a = tokio::spawn(svc.clone().oneshot(get(&format!("http://{HOST}/a"))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = places.state(HOST).expect("host known");
    assert_eq!(st.in_flight(), 0, "the sleeping call still holds its place");
    let b = timeout(BOUND, svc.clone().oneshot(get(&format!("http://{HOST}/b"))))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.status(), StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the second caller waited {:?} behind a sleeping retry",
        start.elapsed()
    );
    let a = timeout(BOUND, a).await.unwrap().unwrap().unwrap();
    assert_eq!(a.status(), StatusCode::OK);
}

/// docs/guides/retry.md: "later attempts wait for readiness again on that same service (the loop
/// is the crate's own, so no clone of the inner stack holds a permit). It works over
/// `ConcurrencyLimit`". A call sleeping its backoff holds no `ConcurrencyLimit(1)` permit.
#[tokio::test(start_paused = true)]
async fn a_retry_sleeping_its_backoff_holds_no_tower_permit() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "5")])], ok());
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(2).without_budget())
        .concurrency_limit(1)
        .service(api.service());
    let start = Instant::now();
    let mut kept_a = svc.clone();
    let a = tokio::spawn(async move {
        let req = get(&format!("http://{HOST}/a"));
        kept_a.ready().await?.call(req).await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut kept_b = svc.clone();
    let b = timeout(BOUND, async {
        kept_b
            .ready()
            .await?
            .call(get(&format!("http://{HOST}/b")))
            .await
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(b.status(), StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the second caller waited {:?} behind a sleeping retry",
        start.elapsed()
    );
    assert_eq!(
        timeout(BOUND, a).await.unwrap().unwrap().unwrap().status(),
        StatusCode::OK
    );
}

/// docs/guides/auth.md: "The token request runs as a task of its own on the caller's Tokio
/// runtime, so a caller that gives up does not cancel it for the others". The first caller is cut
/// by a timeout while the token endpoint answers slowly; the next caller shares that request.
#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_on_its_token_does_not_cancel_the_token_request() {
    let idp = Api::new(vec![], after(Duration::from_secs(2), token_answer()));
    let api = Api::new(vec![], ok());
    let tokens =
        ClientCredentials::new(idp.service(), "http://idp.local/token", "id", "secret").unwrap();
    let svc = AuthLayer::oauth2(tokens).layer(api.service());
    let cut = timeout(
        Duration::from_millis(500),
        svc.clone().oneshot(get(&format!("http://{HOST}/a"))),
    )
    .await;
    assert!(cut.is_err());
    let t0 = Instant::now();
    let res = timeout(BOUND, svc.clone().oneshot(get(&format!("http://{HOST}/b"))))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(idp.calls(), 1, "the token was requested again");
    assert!(
        t0.elapsed() <= Duration::from_millis(1600),
        "the second caller waited {:?}: the first request was cancelled",
        t0.elapsed()
    );
    let seen = api.seen();
    assert_eq!(seen.len(), 1, "the abandoned call reached the API");
    assert_eq!(seen[0].headers["authorization"], "Bearer tok-1");
}

/// docs/guides/auth.md: "A call that waits for a token holds that ready service, with what it
/// reserved (a `ConcurrencyLimit` permit ...) ... and drops it (and the reservation) if the call
/// is dropped first." Five callers under `ConcurrencyLimit(1)` are dropped while the token is on
/// its way; the next caller gets the permit once the token is there.
#[tokio::test(start_paused = true)]
async fn callers_dropped_during_the_token_wait_give_their_permits_back() {
    let idp = Api::new(vec![], after(Duration::from_secs(1), token_answer()));
    let api = Api::new(vec![], ok());
    let tokens =
        ClientCredentials::new(idp.service(), "http://idp.local/token", "id", "secret").unwrap();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(tokens))
        .concurrency_limit(1)
        .service(api.service());
    for i in 0..5 {
        let mut s = svc.clone();
        let fut = async move {
            s.ready()
                .await?
                .call(get(&format!("http://{HOST}/{i}")))
                .await
        };
        assert!(timeout(Duration::from_millis(100), fut).await.is_err());
    }
    let res = timeout(
        Duration::from_secs(3),
        svc.clone().oneshot(get(&format!("http://{HOST}/last"))),
    )
    .await
    .expect("a permit of a dropped caller was kept")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 1);
    assert_eq!(idp.calls(), 1);
}

/// docs/guides/coalesce.md: "The caller that started the call gets it, streamed ... If the
/// caller that started the call has gone, the first other caller to look gets the response
/// instead." The starter leaves before an oversized answer arrives; the joined caller gets the
/// whole body, and the API is asked once.
#[tokio::test(start_paused = true)]
async fn an_oversized_answer_goes_to_the_joined_caller_when_the_starter_left() {
    let big: &'static str = Box::leak("b".repeat(4096).into_boxed_str());
    let api = Api::new(
        vec![after(
            Duration::from_secs(1),
            Answer::Status(200, vec![], big),
        )],
        ok(),
    );
    let (layer, stats) = CoalesceLayer::new().with_max_body(1024).pair();
    let svc = layer.layer(api.service());
    let uri = format!("http://{HOST}/big");
    let mut starter = spawn(svc.clone().oneshot(get(&uri)));
    assert!(starter.poll().is_pending());
    let mut joined = spawn(svc.clone().oneshot(get(&uri)));
    assert!(joined.poll().is_pending());
    drop(starter);
    advance(Duration::from_secs(2)).await;
    let res = timeout(BOUND, joined).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 4096);
    assert_eq!(api.calls(), 1, "{:?}", stats.stats());
}

/// docs/guides/coalesce.md: "a caller that goes away (its future dropped, a timeout above it)
/// leaves the call to the others; it goes on." Of ten joined callers, every odd one is dropped
/// after one poll; the even ones all get the answer of one upstream call.
#[tokio::test(start_paused = true)]
async fn joined_callers_dropped_after_one_poll_leave_the_others_their_answer() {
    let api = Api::new(
        vec![after(
            Duration::from_secs(1),
            Answer::Status(200, vec![], "shared"),
        )],
        ok(),
    );
    let svc = CoalesceLayer::new().layer(api.service());
    let uri = format!("http://{HOST}/s");
    let mut calls: Vec<_> = (0..10)
        .map(|_| spawn(svc.clone().oneshot(get(&uri))))
        .collect();
    for c in &mut calls {
        assert!(c.poll().is_pending());
    }
    let kept: Vec<_> = calls
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| (i % 2 == 0).then_some(c))
        .collect();
    advance(Duration::from_secs(2)).await;
    for c in kept {
        let res = timeout(BOUND, c).await.unwrap().unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"shared");
    }
    assert_eq!(api.calls(), 1);
}

/// docs/guides/paginate.md: "the timeout covers the response head and the whole body, so a
/// server that sends the head and then stalls the body cannot hang a walk". A walk dropped while
/// its first page hangs under `ConcurrencyLimit(1)` gives the permit back: the next walk runs at
/// once, it does not wait for the page timeout.
#[tokio::test(start_paused = true)]
async fn a_walk_dropped_mid_page_gives_its_permit_back() {
    let api = Api::new(
        vec![Answer::Hang],
        json_page(r#"{"data":[1,2,3],"next":null}"#),
    );
    let http = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(api.service());
    let pager = Paginate::new(
        http,
        &format!("http://{HOST}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    {
        let mut walk = pager.items();
        assert!(timeout(Duration::from_secs(1), walk.next()).await.is_err());
    }
    assert_eq!(api.calls(), 1);
    let t0 = Instant::now();
    let items: Vec<_> = timeout(
        Duration::from_secs(5),
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .expect("the second walk waited for the dropped one's permit")
    .unwrap();
    assert_eq!(items.len(), 3);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

/// docs/guides/paginate.md: "`page(cursor, limit)` returns `{ items, has_more, next_cursor }`".
/// A `page()` call dropped mid-fetch leaves nothing behind: the next `page()` goes at once under
/// `ConcurrencyLimit(1)` and reads the same first page.
#[tokio::test(start_paused = true)]
async fn a_page_call_dropped_mid_fetch_leaves_the_pager_usable() {
    let api = Api::new(
        vec![Answer::Hang],
        json_page(r#"{"data":[1,2],"next":null}"#),
    );
    let http = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(api.service());
    let pager = Paginate::new(
        http,
        &format!("http://{HOST}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let mut first = spawn(pager.page(None, 10));
    assert!(first.poll().is_pending());
    advance(Duration::from_millis(100)).await;
    assert!(first.poll().is_pending());
    drop(first);
    let page = timeout(Duration::from_secs(5), pager.page(None, 10))
        .await
        .expect("the second page() waited for the dropped one")
        .unwrap();
    assert_eq!(page.items.len(), 2);
    assert!(!page.has_more);
}

/// sturdy-ratelimit rustdoc, `DirectLimiter::until_ready`: "Nothing is reserved while it waits:
/// dropping the future gives its place back and the callers behind it move up." Ten waiters
/// dropped after one poll cost the next waiter nothing: it goes one interval after the first slot.
#[tokio::test(start_paused = true)]
async fn direct_limiter_waiters_dropped_after_one_poll_give_their_places_back() {
    let limiter = DirectLimiter::new(Quota::per_second(10).unwrap());
    limiter.check().unwrap();
    let start = Instant::now();
    let mut dropped: Vec<_> = (0..10)
        .map(|_| spawn(limiter.until_ready(Duration::from_secs(30))))
        .collect();
    for d in &mut dropped {
        assert!(d.poll().is_pending());
    }
    drop(dropped);
    timeout(BOUND, limiter.until_ready(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    assert!(
        start.elapsed() <= Duration::from_millis(101),
        "waited {:?} after 10 dropped waiters",
        start.elapsed()
    );
}

/// sturdy-ratelimit rustdoc, `DirectLimiter::until_ready`: "[`RateLimited`] with the wait, at
/// once, when the slot would be further away than `max_wait` (counting the callers already in
/// line)." Dropped waiters are no longer counted: after ten waiters are dropped, a call with a
/// `max_wait` of one interval is not refused.
#[tokio::test(start_paused = true)]
async fn direct_limiter_does_not_count_dropped_waiters_against_max_wait() {
    let limiter = DirectLimiter::new(Quota::per_second(10).unwrap());
    limiter.check().unwrap();
    let mut dropped: Vec<_> = (0..10)
        .map(|_| spawn(limiter.until_ready(Duration::from_secs(30))))
        .collect();
    for d in &mut dropped {
        assert!(d.poll().is_pending());
    }
    drop(dropped);
    let r = timeout(BOUND, limiter.until_ready(Duration::from_millis(150)))
        .await
        .unwrap();
    assert!(r.is_ok(), "refused: {r:?}");
}

/// docs/guides/hedge.md: "A dropped call drops both copies." and docs/guides/concurrency.md: "a
/// dropped call in flight gives its permit back". A hedged call over the adaptive limit dropped
/// while both copies run leaves no place taken.
#[tokio::test(start_paused = true)]
async fn a_hedged_call_dropped_with_both_copies_out_gives_both_places_back() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(10)));
    let (hedge, hedges) = HedgeLayer::new().with_min_samples(20).pair();
    let (conc, places) = AdaptiveConcurrencyLayer::new().pair();
    let svc = ServiceBuilder::new()
        .layer(hedge)
        .layer(conc)
        .service(api.service());
    for i in 0..40 {
        svc.clone()
            .oneshot(get(&format!("http://{HOST}/w/{i}")))
            .await
            .unwrap();
    }
    assert!(hedges.stats(HOST).and_then(|s| s.delay()).is_some());
    api.push(Answer::Hang);
    api.push(Answer::Hang);
    let before = api.calls();
    let cut = timeout(
        Duration::from_secs(1),
        svc.clone().oneshot(get(&format!("http://{HOST}/slow"))),
    )
    .await;
    assert!(cut.is_err());
    assert_eq!(api.calls(), before + 2, "the hedge was not sent");
    let st = places.state(HOST).unwrap();
    assert_eq!(st.in_flight(), 0, "places kept after the drop: {st:?}");
    assert_eq!(st.waiting(), 0);
}

mod server_store {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use http::{Request, StatusCode};
    use sturdy::core::BoxError;
    use sturdy::idempotency::server::{
        Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
        LockToken, MemoryStore, StoredResponse,
    };
    use tower::ServiceExt;

    /// A memory store whose `begin` and `complete` take a while, as a remote store's would.
    #[derive(Debug, Clone)]
    struct SlowStore {
        inner: Arc<MemoryStore>,
        begin_delay: Duration,
        complete_delay: Duration,
    }

    impl IdempotencyStore for SlowStore {
        fn begin(
            &self,
            key: &str,
            fingerprint: Fingerprint,
            token: LockToken,
            lease: Duration,
        ) -> BoxFuture<Result<Begin, BoxError>> {
            let (inner, key, d) = (self.inner.clone(), key.to_owned(), self.begin_delay);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                inner.begin(&key, fingerprint, token, lease).await
            })
        }
        fn renew(
            &self,
            key: &str,
            fingerprint: Fingerprint,
            token: LockToken,
            lease: Duration,
        ) -> BoxFuture<Result<bool, BoxError>> {
            self.inner.renew(key, fingerprint, token, lease)
        }
        fn complete(
            &self,
            key: &str,
            fingerprint: Fingerprint,
            token: LockToken,
            response: StoredResponse,
            ttl: Duration,
        ) -> BoxFuture<Result<(), BoxError>> {
            let (inner, key, d) = (self.inner.clone(), key.to_owned(), self.complete_delay);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                inner
                    .complete(&key, fingerprint, token, response, ttl)
                    .await
            })
        }
        fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
            self.inner.release(key, token)
        }
    }

    fn app(store: SlowStore, runs: Arc<AtomicUsize>) -> axum::Router {
        axum::Router::new()
            .route(
                "/orders",
                axum::routing::post(move || {
                    let runs = runs.clone();
                    async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        (StatusCode::CREATED, format!("order {n}"))
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store, ByCredentials::default()))
    }

    fn keyed(key: &str) -> Request<Body> {
        Request::post("/orders")
            .header("idempotency-key", key)
            .body(Body::from("{}"))
            .unwrap()
    }

    /// docs/guides/idempotency.md: "client gone while the store is locking the key (before the
    /// handler starts) | the handler does not run; the store's answer is awaited in the
    /// background and, if it locked the key, the key is released | ... a retry with the same key
    /// runs normally".
    #[tokio::test]
    async fn a_request_dropped_while_its_key_is_being_locked_never_runs_and_frees_the_key() {
        let store = SlowStore {
            inner: Arc::new(MemoryStore::default()),
            begin_delay: Duration::from_millis(150),
            complete_delay: Duration::ZERO,
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(store, runs.clone());
        let cut =
            tokio::time::timeout(Duration::from_millis(30), app.clone().oneshot(keyed("k1"))).await;
        assert!(cut.is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "the handler ran for a gone client"
        );
        let res = app.clone().oneshot(keyed("k1")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "the key was left locked");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// docs/guides/idempotency.md: "If the request's future is dropped, the task goes on: it
    /// reads the whole response body (up to the response limit), stores it, then ends." A client
    /// gone while the response is being stored: a retry meanwhile gets 409, later the stored
    /// response; the handler ran once.
    #[tokio::test]
    async fn a_request_dropped_while_its_response_is_stored_is_replayed_not_run_again() {
        let store = SlowStore {
            inner: Arc::new(MemoryStore::default()),
            begin_delay: Duration::ZERO,
            complete_delay: Duration::from_millis(200),
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(store, runs.clone());
        let cut =
            tokio::time::timeout(Duration::from_millis(50), app.clone().oneshot(keyed("k2"))).await;
        assert!(cut.is_err(), "the answer came before it was stored");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let res = app.clone().oneshot(keyed("k2")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let res = app.clone().oneshot(keyed("k2")).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(res.headers()["idempotent-replayed"], "true");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}

mod server_lease {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    use tower::ServiceExt;

    fn trickle(chunks: usize, every: Duration) -> Body {
        Body::from_stream(futures_util::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"part ")), i + 1))
        }))
    }

    /// docs/guides/idempotency.md: "If the request's future is dropped, the task goes on: it
    /// reads the whole response body (up to the response limit), stores it, then ends. While the
    /// handler runs, the task renews the lock every third of the lease ..., so a handler slower
    /// than the lease keeps its key." A handler whose response body streams for several leases:
    /// its client leaves at once; a retry during the stream gets 409, never a second run.
    #[tokio::test]
    async fn a_response_body_streaming_past_the_lease_keeps_its_key() {
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
            .with_lease(Duration::from_millis(60))
            .unwrap();
        let app: axum::Router = axum::Router::new()
            .route(
                "/orders",
                axum::routing::post(move || {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        (StatusCode::CREATED, trickle(10, Duration::from_millis(50)))
                    }
                }),
            )
            .layer(layer);
        let keyed = || {
            Request::post("/orders")
                .header("idempotency-key", "k-stream")
                .body(Body::from("{}"))
                .unwrap()
        };
        let cut = tokio::time::timeout(Duration::from_millis(20), async {
            let res = app.clone().oneshot(keyed()).await.unwrap();
            res.into_body().collect().await.map(|c| c.to_bytes())
        })
        .await;
        assert!(cut.is_err());
        let mut statuses = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(80)).await;
            let res = app.clone().oneshot(keyed()).await.unwrap();
            statuses.push(res.status());
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let res = app.clone().oneshot(keyed()).await.unwrap();
        let status = res.status();
        let replayed = res.headers().get("idempotent-replayed").cloned();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "ran again; answers during the stream: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == StatusCode::CONFLICT),
            "{statuses:?}"
        );
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(replayed.as_ref().map(|v| v.as_bytes()), Some(&b"true"[..]));
        assert_eq!(body.len(), 50);
    }
}

/// docs/guides/circuit.md: "A half-open breaker's refusal (`Probing`, `retry_in` zero: nobody
/// knows when the probe will answer) is looked at again every backoff base (250 ms by default)
/// for as long as the deadline allows; such a refusal sent nothing" and "A probe whose future is
/// dropped gives its slot back." Callers waiting on a slow probe, some dropped mid-wait: the
/// probe closes the breaker and every caller still there gets through, each sent once.
#[tokio::test(start_paused = true)]
async fn callers_dropped_while_they_wait_on_a_half_open_probe_leave_the_others_be() {
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    use sturdy::core::CallOptions;
    use sturdy::ClientBuilder;
    let api = Api::new(vec![status(503), after(Duration::from_secs(2), ok())], ok());
    let (breaker, states) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .without_rate_limit()
        .build(api.service());
    let mut first = get(&format!("http://{HOST}/0"));
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = client.clone().oneshot(first).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(
        states.state(HOST),
        Some(CircuitState::Open { .. })
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probe = tokio::spawn(client.clone().oneshot(get(&format!("http://{HOST}/probe"))));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiters: Vec<_> = (0..5)
        .map(|i| {
            let mut req = get(&format!("http://{HOST}/w{i}"));
            req.extensions_mut()
                .insert(CallOptions::new().with_deadline(Duration::from_secs(10)));
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut waiters = waiters.into_iter();
    waiters.next().unwrap().abort();
    waiters.next().unwrap().abort();
    let res = timeout(BOUND, probe).await.unwrap().unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for w in waiters {
        let res = timeout(BOUND, w).await.unwrap().unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(states.state(HOST), Some(CircuitState::Closed));
    assert_eq!(
        api.calls(),
        5,
        "{:?}",
        api.seen().iter().map(|s| &s.uri).collect::<Vec<_>>()
    );
}
