//! s52: cancellation at every await, swept systematically over composed stacks.
//!
//! The harness polls a call's response future k times (k = 0, 1, 2, ...; paused time advances
//! between polls), then drops it, and checks through each layer's public handle (and through
//! what the next call experiences) that whatever the dropped call held came back.
//!
//! Contracts (quoted from the docs):
//! - ratelimit.md: "If it is dropped (a timeout above it, an aborted task), it leaves the line
//!   and the calls behind it move up".
//! - concurrency.md: "A dropped waiting call leaves the line; a dropped call in flight gives its
//!   permit back."
//! - circuit.md: "A probe whose future is dropped gives its slot back." "a dropped call is not
//!   counted".
//! - coalesce.md: "a caller that goes away (its future dropped, a timeout above it) leaves the
//!   call to the others; it goes on. When the last caller leaves, the upstream call is dropped
//!   ... The next identical request starts afresh."
//! - hedge.md: "A dropped call drops both copies."
//! - auth.md: "The token request runs as a task of its own on the caller's Tokio runtime, so a
//!   caller that gives up does not cancel it for the others"; "one request for N callers".
//! - paginate.md / README: a pager sends each page with `oneshot` on a clone of the service.
#![cfg(feature = "full")]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::{advance, timeout};
use tokio_test::task::{spawn, Spawn};
use tower::buffer::Buffer;
use tower::limit::ConcurrencyLimit;
use tower::{BoxError, Service, ServiceExt};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Handle = mock::Handle<Req, Res>;
type Send_ = mock::SendResponse<Res>;

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(5);

fn get(i: usize) -> Req {
    Request::get(format!("http://{HOST}/items/{i}"))
        .body(Full::default())
        .unwrap()
}

fn ok() -> Res {
    Response::builder()
        .status(200)
        .body(Full::from("x"))
        .unwrap()
}

fn status(s: u16) -> Res {
    Response::builder().status(s).body(Full::from("x")).unwrap()
}

fn take(handle: &mut Handle) -> Option<(Req, Send_)> {
    match handle.poll_request() {
        Poll::Ready(Some(r)) => Some(r),
        _ => None,
    }
}

/// Polls `f`, advancing paused time by `step` between polls, until the mock sees a request, at
/// most `limit` of paused time.
async fn until_request<F: Future>(
    f: &mut Spawn<F>,
    handle: &mut Handle,
    step: Duration,
    limit: Duration,
) -> Option<(Req, Send_)> {
    let mut waited = Duration::ZERO;
    loop {
        let _ = f.poll();
        tokio::task::yield_now().await;
        if let Some(r) = take(handle) {
            return Some(r);
        }
        if waited >= limit {
            return None;
        }
        advance(step).await;
        waited += step;
    }
}

/// The sweep's core: polls `f` `k` times (advancing `step` of paused time after each poll),
/// keeps whatever the mock received meanwhile in `held` (unanswered), and reports whether `f`
/// completed. The caller drops `f` afterwards.
async fn poll_k<F: Future>(
    f: &mut Spawn<F>,
    k: usize,
    step: Duration,
    handle: &mut Handle,
    held: &mut Vec<(Req, Send_)>,
) -> bool {
    for _ in 0..k {
        if f.poll().is_ready() {
            return true;
        }
        tokio::task::yield_now().await;
        while let Some(r) = take(handle) {
            held.push(r);
        }
        advance(step).await;
    }
    while let Some(r) = take(handle) {
        held.push(r);
    }
    false
}

/// Spawns one call on a clone (a generic function keeps the future's `Send` proof simple).
fn spawn_call<S>(svc: S, req: Req) -> tokio::task::JoinHandle<Result<S::Response, S::Error>>
where
    S: Service<Req> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    tokio::spawn(svc.oneshot(req))
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

/// The whole client stack (every layer, rate limit with a quota of 1/s and burst 1, adaptive
/// concurrency pinned to 1): a call dropped after k polls, whether waiting for a rate slot, just
/// admitted, or in flight, leaves no place held: the line is empty, no permit is in flight, the
/// breaker did not count it, and the next call is sent within its rate slot.
#[tokio::test(start_paused = true)]
async fn composed_client_call_dropped_after_k_polls_gives_everything_back() {
    for k in 0..=15 {
        let (rl, limits) = RateLimitLayer::new(Quota::per_second(1).unwrap())
            .with_max_wait(Duration::from_secs(30))
            .pair();
        let (cb, circuits) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .pair();
        let (ac, conc) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_initial_limit(1)
            .pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new())
            .with_hedge(HedgeLayer::new())
            .with_circuit_breaker(cb)
            .with_rate_limit(rl)
            .with_adaptive_concurrency(ac)
            .with_auth(AuthLayer::bearer("k").unwrap())
            .with_coalesce(CoalesceLayer::new())
            .build(mock);
        assert_send_sync_clone(&client);

        // A takes the one slot of the burst.
        let mut a = spawn(client.clone().oneshot(get(0)));
        let (_r, send) = until_request(&mut a, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .expect("the first call never went");
        send.send_response(ok());
        assert_eq!(timeout(BOUND, a).await.unwrap().unwrap().status(), 200);

        // B: a kept service, polled k times, then dropped.
        let mut svc = client.clone();
        svc.ready().await.unwrap();
        let mut b = spawn(svc.call(get(1)));
        let mut held = Vec::new();
        let done = poll_k(
            &mut b,
            k,
            Duration::from_millis(100),
            &mut handle,
            &mut held,
        )
        .await;
        assert!(!done, "k={k}: B completed although never answered");
        drop(b);
        drop(svc);
        tokio::task::yield_now().await;

        assert_eq!(
            limits.waiting(HOST),
            0,
            "k={k}: the dropped call is still in the rate limiter's line"
        );
        if let Some(s) = conc.state(HOST) {
            assert_eq!(
                s.in_flight(),
                0,
                "k={k}: the dropped call kept its concurrency permit"
            );
            assert_eq!(s.waiting(), 0, "k={k}: the dropped call is still waiting");
        }
        let st = circuits.state(HOST);
        assert!(
            matches!(st, None | Some(CircuitState::Closed)),
            "k={k}: a dropped call moved the breaker: {st:?}"
        );
        drop(held);

        // C goes within its slot: at most two intervals after A (A's slot, B's possibly used
        // slot), whatever k was.
        let mut c = spawn(client.clone().oneshot(get(2)));
        let (_r, send) = until_request(
            &mut c,
            &mut handle,
            Duration::from_millis(10),
            Duration::from_millis(2500),
        )
        .await
        .unwrap_or_else(|| panic!("k={k}: the call after a dropped one was never sent"));
        send.send_response(ok());
        let res = timeout(BOUND, c).await.unwrap().unwrap();
        assert_eq!(res.status(), 200, "k={k}");
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "x");
    }
}

/// The same client under `tower::buffer::Buffer`, over `ConcurrencyLimit(1)`, probe dropped after
/// k polls in half-open: the next call is admitted as a probe and closes the breaker.
#[tokio::test(start_paused = true)]
async fn half_open_probe_dropped_after_k_polls_under_buffer_frees_the_probe_slot() {
    for k in 0..=4 {
        let (cb, circuits) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .with_successes_to_close(1)
            .pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new()
            .without_retry()
            .with_circuit_breaker(cb)
            .build(ConcurrencyLimit::new(mock, 1));
        let buffered = Buffer::new(client, 8);
        assert_send_sync_clone(&buffered);

        // Open it with one 500.
        let mut a = spawn(buffered.clone().oneshot(get(0)));
        let (_r, send) = until_request(&mut a, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap();
        send.send_response(status(500));
        let res = timeout(BOUND, a).await.unwrap().unwrap();
        assert_eq!(res.status(), 500);
        assert!(
            matches!(circuits.state(HOST), Some(CircuitState::Open { .. })),
            "k={k}: {:?}",
            circuits.state(HOST)
        );
        advance(Duration::from_millis(1100)).await;

        // The probe: polled k times, then dropped.
        let mut svc = buffered.clone();
        timeout(BOUND, svc.ready()).await.unwrap().unwrap();
        let mut probe = spawn(svc.call(get(1)));
        let mut held = Vec::new();
        let done = poll_k(
            &mut probe,
            k,
            Duration::from_millis(1),
            &mut handle,
            &mut held,
        )
        .await;
        assert!(!done, "k={k}");
        drop(probe);
        drop(svc);
        drop(held);
        for _ in 0..5 {
            tokio::task::yield_now().await;
        }
        let st = circuits.state(HOST);
        assert!(
            !matches!(st, Some(CircuitState::Closed)),
            "k={k}: a dropped probe closed the breaker: {st:?}"
        );

        // The next call must be able to probe, and its success closes the breaker.
        let mut c = spawn(buffered.clone().oneshot(get(2)));
        let got = until_request(
            &mut c,
            &mut handle,
            Duration::from_millis(10),
            Duration::from_secs(3),
        )
        .await;
        let Some((_r, send)) = got else {
            let res = timeout(BOUND, c).await.unwrap();
            panic!(
                "k={k}: after a dropped probe the next call was not admitted: {:?} (state {:?})",
                res.err().map(|e| e.to_string()),
                circuits.state(HOST)
            );
        };
        send.send_response(ok());
        let res = timeout(BOUND, c).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            circuits.state(HOST),
            Some(CircuitState::Closed),
            "k={k}: a good probe after a dropped one did not close the breaker"
        );
    }
}

/// Coalescing inside the full client: the leader (the caller that started the shared call) is
/// dropped after k polls; the follower that joined still gets the whole response, and only one
/// request reaches the server.
#[tokio::test(start_paused = true)]
async fn coalesced_leader_dropped_after_k_polls_leaves_the_call_to_its_followers() {
    for k in 1..=4 {
        let (cl, stats) = CoalesceLayer::new().pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new().with_coalesce(cl).build(mock);
        let mut leader = spawn(client.clone().oneshot(get(7)));
        let mut held = Vec::new();
        let _ = poll_k(
            &mut leader,
            k,
            Duration::from_millis(1),
            &mut handle,
            &mut held,
        )
        .await;
        let mut follower = spawn(client.clone().oneshot(get(7)));
        assert!(follower.poll().is_pending());
        drop(leader);
        tokio::task::yield_now().await;
        let mut sent = held;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while sent.is_empty() && tokio::time::Instant::now() < deadline {
            let _ = follower.poll();
            tokio::task::yield_now().await;
            while let Some(r) = take(&mut handle) {
                sent.push(r);
            }
            advance(Duration::from_millis(1)).await;
        }
        assert_eq!(
            sent.len(),
            1,
            "k={k}: {} requests reached the server",
            sent.len()
        );
        let (_r, send) = sent.pop().unwrap();
        send.send_response(ok());
        let res = timeout(BOUND, follower)
            .await
            .expect("the follower hung after its leader was dropped")
            .expect("the follower failed after its leader was dropped");
        assert_eq!(res.status(), 200, "k={k}");
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "x");
        assert!(take(&mut handle).is_none(), "k={k}: a second upstream call");
        assert_eq!(stats.stats().upstream(), 1, "k={k}");
    }
}

/// Every caller of a shared call dropped after k polls: the upstream call is dropped and the
/// next identical request starts afresh.
#[tokio::test(start_paused = true)]
async fn coalesced_call_abandoned_by_all_after_k_polls_starts_afresh() {
    for k in 0..=3 {
        let (cl, stats) = CoalesceLayer::new().pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new().with_coalesce(cl).build(mock);
        let mut a = spawn(client.clone().oneshot(get(7)));
        let mut b = spawn(client.clone().oneshot(get(7)));
        let mut held = Vec::new();
        let _ = poll_k(&mut a, k, Duration::from_millis(1), &mut handle, &mut held).await;
        let _ = poll_k(&mut b, k, Duration::from_millis(1), &mut handle, &mut held).await;
        drop(a);
        drop(b);
        tokio::task::yield_now().await;
        assert_eq!(stats.in_flight(HOST), 0, "k={k}: an abandoned call stayed");
        drop(held);
        let mut c = spawn(client.clone().oneshot(get(7)));
        let (_r, send) = until_request(&mut c, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap_or_else(|| panic!("k={k}: the next identical request never went"));
        send.send_response(ok());
        let res = timeout(BOUND, c).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
    }
}

/// Hedging in the client: a call dropped after k polls (before its hedge, with both copies
/// out) leaves no copy running.
#[tokio::test(start_paused = true)]
async fn hedged_call_dropped_after_k_polls_drops_every_copy() {
    let live = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    struct Guard(Arc<AtomicUsize>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let svc = {
        let live = live.clone();
        let started = started.clone();
        tower::service_fn(move |req: Req| {
            let live = live.clone();
            started.fetch_add(1, Ordering::SeqCst);
            live.fetch_add(1, Ordering::SeqCst);
            let guard = Guard(live);
            async move {
                let _g = guard;
                let ms = if req.uri().path().starts_with("/slow") {
                    60_000
                } else {
                    10
                };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, BoxError>(ok())
            }
        })
    };
    let (hl, hedges) = HedgeLayer::new().pair();
    let client = ClientBuilder::new().with_hedge(hl).build(svc);
    for i in 0..150 {
        let res = client.clone().oneshot(get(i)).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let delay = hedges
        .stats(HOST)
        .and_then(|s| s.delay())
        .expect("no hedge delay after 150 samples");
    assert_eq!(live.load(Ordering::SeqCst), 0);
    let mut saw_hedge = false;
    for k in 0..=6 {
        let before = started.load(Ordering::SeqCst);
        let req = Request::get(format!("http://{HOST}/slow/{k}"))
            .body(Full::default())
            .unwrap();
        let mut f = spawn(client.clone().oneshot(req));
        for _ in 0..k {
            assert!(f.poll().is_pending());
            tokio::task::yield_now().await;
            advance(delay / 2 + Duration::from_millis(1)).await;
        }
        let _ = f.poll();
        tokio::task::yield_now().await;
        if started.load(Ordering::SeqCst) - before >= 2 {
            saw_hedge = true;
        }
        drop(f);
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            live.load(Ordering::SeqCst),
            0,
            "k={k}: a copy of a dropped hedged call is still running"
        );
    }
    assert!(
        saw_hedge,
        "the sweep never reached a hedge (delay {delay:?})"
    );
}

/// OAuth2 through the client: a call dropped after k polls while it waits for the first token
/// does not cancel the token request for the others: the next call gets a token from the same
/// single request.
#[tokio::test(start_paused = true)]
async fn call_dropped_mid_token_wait_leaves_the_refresh_to_the_next_caller() {
    for k in 0..=3 {
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let endpoint = {
            let hits = hits.clone();
            let gate = gate.clone();
            tower::service_fn(move |_req: Req| {
                let hits = hits.clone();
                let gate = gate.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let _p = gate.acquire().await.unwrap();
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Full::<Bytes>::from(
                                r#"{"access_token":"tok-1","token_type":"Bearer","expires_in":3600}"#,
                            ))
                            .unwrap(),
                    )
                }
            })
        };
        let tokens =
            ClientCredentials::new(endpoint, "http://auth.test/token", "id", "secret").unwrap();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new()
            .with_auth(AuthLayer::oauth2(tokens.clone()))
            .build(mock);
        let mut a = spawn(client.clone().oneshot(get(1)));
        let mut held = Vec::new();
        let _ = poll_k(&mut a, k, Duration::from_millis(5), &mut handle, &mut held).await;
        assert!(held.is_empty(), "k={k}: sent without a token");
        drop(a);
        tokio::task::yield_now().await;
        gate.add_permits(100);
        let mut b = spawn(client.clone().oneshot(get(2)));
        let (r, send) = until_request(&mut b, &mut handle, Duration::from_millis(5), BOUND)
            .await
            .unwrap_or_else(|| panic!("k={k}: the next call never got a token"));
        assert_eq!(
            r.headers().get("authorization").unwrap(),
            "Bearer tok-1",
            "k={k}"
        );
        send.send_response(ok());
        assert_eq!(timeout(BOUND, b).await.unwrap().unwrap().status(), 200);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "k={k}: the dropped caller's token request was not the one the next caller used"
        );
        let t = timeout(BOUND, tokens.get()).await.unwrap().unwrap();
        assert_eq!(t.secret().expose_secret(), "tok-1");
    }
}

/// A pager over `ConcurrencyLimit(1)`: its item stream dropped after k polls, mid-page, gives
/// the permit back, so a new walk (and a `page()` call) goes at once.
#[tokio::test(start_paused = true)]
async fn page_stream_dropped_mid_page_over_concurrency_limit_frees_the_permit() {
    for k in 0..=3 {
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let pager = Paginate::new(
            ConcurrencyLimit::new(mock, 1),
            "http://api.example.com/orders",
            JsonCursor::new("/data", "/next"),
        )
        .unwrap();
        let mut items = pager.items();
        let mut held = Vec::new();
        {
            let mut fut = spawn(items.next());
            let _ = poll_k(
                &mut fut,
                k,
                Duration::from_millis(1),
                &mut handle,
                &mut held,
            )
            .await;
        }
        drop(items);
        drop(held);
        tokio::task::yield_now().await;

        let mut walk = pager.items();
        let mut next = spawn(walk.next());
        let (_r, send) = until_request(&mut next, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap_or_else(|| panic!("k={k}: a new walk never got the permit back"));
        send.send_response(
            Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::from(r#"{"data":[1,2],"next":null}"#))
                .unwrap(),
        );
        let first = timeout(BOUND, next).await.unwrap();
        assert_eq!(first.unwrap().unwrap(), serde_json::json!(1), "k={k}");
    }
}

/// A multi-thread runtime, real time: callers in the rate limiter's line (a kept client under
/// `Buffer`, a clone per call) aborted as tasks leave the line; the next caller is admitted at
/// the next slot, not behind the aborted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_waiters_on_a_multi_thread_runtime_leave_the_line() {
    // One call every 200 ms: 10 aborted waiters would cost 2 s if they kept their turns.
    let (rl, limits) = RateLimitLayer::new(Quota::per_second(5).unwrap()).pair();
    let served = Arc::new(AtomicUsize::new(0));
    let svc = {
        let served = served.clone();
        tower::service_fn(move |_req: Req| {
            served.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(ok()) }
        })
    };
    let client = ClientBuilder::new()
        .without_retry()
        .with_rate_limit(rl)
        .build(svc);
    let buffered = Buffer::new(client, 32);
    // The burst slot.
    buffered.clone().oneshot(get(0)).await.unwrap();
    let tasks: Vec<_> = (1..=10)
        .map(|i| {
            let b = buffered.clone();
            spawn_call(b, get(i))
        })
        .collect();
    let t0 = tokio::time::Instant::now();
    while limits.waiting(HOST) < 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "waiters never lined up: {}",
            limits.waiting(HOST)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        assert!(t.await.unwrap_err().is_cancelled());
    }
    let t0 = tokio::time::Instant::now();
    while limits.waiting(HOST) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "aborted waiters stayed in line: {}",
            limits.waiting(HOST)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = tokio::time::Instant::now();
    let res = timeout(Duration::from_secs(3), buffered.clone().oneshot(get(99)))
        .await
        .expect("the next caller hung")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // At most one interval (plus scheduling slack), far below 10 intervals.
    assert!(
        start.elapsed() < Duration::from_millis(1200),
        "the next caller waited {:?} behind aborted waiters",
        start.elapsed()
    );
}

/// A token fetch running on a runtime that is dropped while a call of the composed client waits
/// for it: the same client, on a new runtime, gets a token and sends its call.
#[test]
fn composed_client_works_on_a_new_runtime_after_its_token_runtime_was_dropped() {
    let hits = Arc::new(AtomicUsize::new(0));
    let endpoint = {
        let hits = hits.clone();
        tower::service_fn(move |_req: Req| {
            let n = hits.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(Full::<Bytes>::from(
                            r#"{"access_token":"tok-2","token_type":"Bearer","expires_in":3600}"#,
                        ))
                        .unwrap(),
                )
            }
        })
    };
    let tokens =
        ClientCredentials::new(endpoint, "http://auth.test/token", "id", "secret").unwrap();
    let api = tower::service_fn(|req: Req| async move {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(auth)))
    });
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(api);
    let a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c1 = client.clone();
    a.block_on(async move {
        let r = timeout(Duration::from_millis(100), c1.oneshot(get(1))).await;
        assert!(r.is_err(), "the first call got an answer without a token");
    });
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    drop(a);
    let b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let body = b.block_on(async move {
        let res = timeout(Duration::from_secs(3), client.oneshot(get(2)))
            .await
            .expect("the client hung on a new runtime after its token runtime was dropped")
            .expect("the call failed on a new runtime");
        res.into_body().collect().await.unwrap().to_bytes()
    });
    assert_eq!(body, "Bearer tok-2");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// Adaptive concurrency pinned to 1 inside the client, over `ConcurrencyLimit(2)`: A holds the
/// permit; B waits in the line and is dropped after k polls; then A's answer lets C go at once
/// (B's place in line is gone); finally C, dropped in flight, gives its permit back to D.
#[tokio::test(start_paused = true)]
async fn concurrency_waiter_and_holder_dropped_after_k_polls_give_their_places_back() {
    for k in 0..=4 {
        let (ac, conc) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_initial_limit(1)
            .pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new()
            .with_adaptive_concurrency(ac)
            .build(ConcurrencyLimit::new(mock, 2));
        let mut a = spawn(client.clone().oneshot(get(0)));
        let (_ra, send_a) = until_request(&mut a, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap();
        let mut svc = client.clone();
        timeout(BOUND, svc.ready()).await.unwrap().unwrap();
        let mut b = spawn(svc.call(get(1)));
        let mut held = Vec::new();
        let _ = poll_k(&mut b, k, Duration::from_millis(10), &mut handle, &mut held).await;
        assert!(held.is_empty(), "k={k}: B went past a full limit of 1");
        drop(b);
        drop(svc);
        tokio::task::yield_now().await;
        let s = conc.state(HOST).unwrap();
        assert_eq!(s.waiting(), 0, "k={k}: the dropped waiter is still in line");
        assert_eq!(s.in_flight(), 1, "k={k}");

        let mut c = spawn(client.clone().oneshot(get(2)));
        assert!(c.poll().is_pending());
        send_a.send_response(ok());
        assert_eq!(timeout(BOUND, a).await.unwrap().unwrap().status(), 200);
        let (_rc, send_c) = until_request(
            &mut c,
            &mut handle,
            Duration::from_millis(1),
            Duration::from_millis(50),
        )
        .await
        .unwrap_or_else(|| panic!("k={k}: C did not go when A's permit came back"));
        // C dropped in flight.
        drop(c);
        drop(send_c);
        tokio::task::yield_now().await;
        assert_eq!(
            conc.state(HOST).unwrap().in_flight(),
            0,
            "k={k}: a call dropped in flight kept its permit"
        );
        let mut d = spawn(client.clone().oneshot(get(3)));
        let (_rd, send_d) = until_request(
            &mut d,
            &mut handle,
            Duration::from_millis(1),
            Duration::from_millis(50),
        )
        .await
        .unwrap_or_else(|| panic!("k={k}: D did not go after C was dropped in flight"));
        send_d.send_response(ok());
        assert_eq!(timeout(BOUND, d).await.unwrap().unwrap().status(), 200);
    }
}
