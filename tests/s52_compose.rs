//! s52: cancellation where two layers meet: a hedged call held by the rate limiter or by the
//! concurrency limit, a released slow-start call dropped in flight, a 401 replay whose token
//! wait is dropped, a waiter for a Redis quota slot dropped.
//!
//! - hedge.md: "A call whose first copy a layer below still holds back ... is not hedged while
//!   it waits"; "A dropped call drops both copies"; "the loser is dropped, which gives its place
//!   under the concurrency limit back (and a slow-start release place or a remote slot it was
//!   still waiting for ...)".
//! - ratelimit.md: "a released call gives its place back when it finishes, fails, is dropped or
//!   panics"; "A call that waited for a Redis slot and was dropped ... gives the slot back
//!   (`try_release`: the next free slot moves back one interval)".
//! - auth.md: "The token request runs as a task of its own ..., so a caller that gives up does
//!   not cancel it for the others"; "one request for N callers".
#![cfg(feature = "full")]
// Webhook timestamps and unique Redis key names need the wall clock.
#![allow(clippy::disallowed_methods)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::redis::RedisQuota;
use sturdy::ClientBuilder;
use tokio::time::{advance, timeout};
use tokio_test::task::spawn;
use tower::{BoxError, Service, ServiceExt};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(5);

fn get(path: &str) -> Req {
    Request::get(format!("http://{HOST}{path}"))
        .body(Full::default())
        .unwrap()
}

fn res(status: u16, headers: &[(&str, &str)]) -> Res {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::from("x")).unwrap()
}

struct Live(Arc<AtomicUsize>);
impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An in-process API: `/limit` answers 429 `Retry-After: 5`, `/slow*` takes a minute, anything
/// else 10 ms. `live` counts requests running.
fn api(
    live: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Res, Error = BoxError, Future = impl Send> + Clone + Send + Sync {
    tower::service_fn(move |req: Req| {
        started.fetch_add(1, Ordering::SeqCst);
        live.fetch_add(1, Ordering::SeqCst);
        let guard = Live(live.clone());
        async move {
            let _g = guard;
            let path = req.uri().path().to_owned();
            if path == "/limit" {
                return Ok::<_, BoxError>(res(429, &[("retry-after", "5")]));
            }
            let ms = if path.starts_with("/slow") {
                60_000
            } else {
                10
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(res(200, &[]))
        }
    })
}

/// Hedging over a rate limiter that holds the first copy (a server pause): the call dropped
/// after k polls leaves the line, was never hedged while held, and the next call goes when the
/// pause ends.
#[tokio::test(start_paused = true)]
async fn hedged_call_held_by_a_pause_and_dropped_leaves_the_line() {
    let live = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (hl, hedges) = HedgeLayer::new().pair();
    let (rl, limits) = RateLimitLayer::adaptive_only().pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_hedge(hl)
        .with_rate_limit(rl)
        .build(api(live.clone(), started.clone()));
    for i in 0..150 {
        let r = client
            .clone()
            .oneshot(get(&format!("/w/{i}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let delay = hedges.stats(HOST).and_then(|s| s.delay()).unwrap();
    for k in 0..=5 {
        let r = client.clone().oneshot(get("/limit")).await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(limits.pause(HOST).is_some(), "k={k}: no pause");
        let hedges_before = hedges.stats(HOST).unwrap().hedges();
        let started_before = started.load(Ordering::SeqCst);
        let mut f = spawn(client.clone().oneshot(get(&format!("/held/{k}"))));
        for _ in 0..k {
            assert!(f.poll().is_pending());
            tokio::task::yield_now().await;
            advance(delay * 2).await;
        }
        let _ = f.poll();
        assert_eq!(
            started.load(Ordering::SeqCst),
            started_before,
            "k={k}: a copy went during the pause"
        );
        drop(f);
        tokio::task::yield_now().await;
        assert_eq!(
            limits.waiting(HOST),
            0,
            "k={k}: the dropped hedged call is still in the rate limiter's line"
        );
        assert_eq!(
            hedges.stats(HOST).unwrap().hedges(),
            hedges_before,
            "k={k}: a held call was hedged"
        );
        // The next call goes once the pause ends (within 5 s + slack).
        let mut next = spawn(client.clone().oneshot(get(&format!("/after/{k}"))));
        let mut waited = Duration::ZERO;
        let out = loop {
            if let Poll::Ready(r) = next.poll() {
                break r;
            }
            assert!(
                waited < Duration::from_secs(7),
                "k={k}: the call after a dropped held one never went"
            );
            advance(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        };
        assert_eq!(out.unwrap().status(), 200, "k={k}");
        assert_eq!(live.load(Ordering::SeqCst), 0, "k={k}");
    }
}

/// Hedging over an adaptive concurrency limit of 1: the first copy holds the permit, the hedge
/// waits for one; the call dropped after k polls drops both, so nothing is in flight or
/// waiting, and the next call goes at once.
#[tokio::test(start_paused = true)]
async fn hedged_call_whose_hedge_waits_for_a_permit_dropped_gives_everything_back() {
    let live = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (hl, hedges) = HedgeLayer::new().pair();
    let (ac, conc) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_hedge(hl)
        .with_adaptive_concurrency(ac)
        .build(api(live.clone(), started.clone()));
    for i in 0..150 {
        let r = client
            .clone()
            .oneshot(get(&format!("/w/{i}")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let delay = hedges.stats(HOST).and_then(|s| s.delay()).unwrap();
    for k in 0..=6 {
        let mut f = spawn(client.clone().oneshot(get(&format!("/slow/{k}"))));
        for _ in 0..k {
            assert!(f.poll().is_pending());
            tokio::task::yield_now().await;
            advance(delay).await;
        }
        let _ = f.poll();
        tokio::task::yield_now().await;
        drop(f);
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        let s = conc.state(HOST).unwrap();
        assert_eq!(s.in_flight(), 0, "k={k}: a copy kept its permit");
        assert_eq!(
            s.waiting(),
            0,
            "k={k}: a hedge is still waiting for a permit"
        );
        assert_eq!(live.load(Ordering::SeqCst), 0, "k={k}: a copy still runs");
        let r = timeout(BOUND, client.clone().oneshot(get(&format!("/n/{k}"))))
            .await
            .unwrap_or_else(|_| panic!("k={k}: the next call waited for a permit"))
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Slow start after a pause (`adaptive_only`): the released call dropped in flight after k
/// polls gives its place back, so the next waiter is released without waiting for `max_wait`.
#[tokio::test(start_paused = true)]
async fn released_call_dropped_in_flight_lets_the_next_waiter_out() {
    for k in 0..=3 {
        let (rl, limits) = RateLimitLayer::adaptive_only().pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new()
            .without_retry()
            .with_rate_limit(rl)
            .build(mock);
        let mut first = spawn(client.clone().oneshot(get("/a")));
        let _ = first.poll();
        tokio::task::yield_now().await;
        let (_r, send) = timeout(BOUND, handle.next_request())
            .await
            .unwrap()
            .unwrap();
        send.send_response(res(429, &[("retry-after", "1")]));
        assert_eq!(timeout(BOUND, first).await.unwrap().unwrap().status(), 429);

        let mut w1 = spawn(client.clone().oneshot(get("/w1")));
        let mut w2 = spawn(client.clone().oneshot(get("/w2")));
        assert!(w1.poll().is_pending());
        assert!(w2.poll().is_pending());
        assert_eq!(limits.waiting(HOST), 2);
        // The pause ends: w1 is released and sent.
        advance(Duration::from_millis(1100)).await;
        let _ = w1.poll();
        let _ = w2.poll();
        tokio::task::yield_now().await;
        let (_r1, send1) = timeout(BOUND, handle.next_request())
            .await
            .unwrap()
            .unwrap();
        for _ in 0..k {
            assert!(w1.poll().is_pending());
            advance(Duration::from_millis(10)).await;
        }
        drop(w1);
        drop(send1);
        tokio::task::yield_now().await;
        // w2 must be released now, not after max_wait (30 s).
        let mut waited = Duration::ZERO;
        let got = loop {
            let _ = w2.poll();
            tokio::task::yield_now().await;
            if let Poll::Ready(Some(r)) = handle.poll_request() {
                break Some(r);
            }
            if waited > Duration::from_secs(2) {
                break None;
            }
            advance(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        };
        let (_r2, send2) = got.unwrap_or_else(|| {
            panic!("k={k}: the next waiter stayed held after a released call was dropped")
        });
        send2.send_response(res(200, &[]));
        assert_eq!(timeout(BOUND, w2).await.unwrap().unwrap().status(), 200);
    }
}

/// A 401 in the composed client: the token is invalidated and a new one fetched; the call is
/// dropped after k polls while it waits for that token. The refresh goes on: the next call gets
/// the new token from the same single request.
#[tokio::test(start_paused = true)]
async fn call_dropped_while_waiting_for_the_token_after_a_401_leaves_the_refresh_running() {
    for k in 0..=3 {
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let endpoint = {
            let hits = hits.clone();
            let gate = gate.clone();
            tower::service_fn(move |_req: Req| {
                let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                let gate = gate.clone();
                async move {
                    if n > 1 {
                        let _p = gate.acquire().await.unwrap();
                    }
                    Ok::<_, BoxError>(
                        Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Full::<Bytes>::from(format!(
                                r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":3600}}"#
                            )))
                            .unwrap(),
                    )
                }
            })
        };
        let tokens =
            ClientCredentials::new(endpoint, "http://auth.test/token", "id", "secret").unwrap();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let client = ClientBuilder::new()
            .without_retry()
            .with_auth(AuthLayer::oauth2(tokens))
            .build(mock);
        let mut a = spawn(client.clone().oneshot(get("/a")));
        let _ = a.poll();
        let (r, send) = timeout(BOUND, async {
            loop {
                let _ = a.poll();
                tokio::task::yield_now().await;
                if let Poll::Ready(Some(r)) = handle.poll_request() {
                    return r;
                }
                advance(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(r.headers()["authorization"], "Bearer tok-1");
        send.send_response(res(401, &[]));
        for _ in 0..k {
            let p = a.poll();
            assert!(p.is_pending(), "k={k}: finished without a new token");
            tokio::task::yield_now().await;
            advance(Duration::from_millis(5)).await;
        }
        let _ = a.poll();
        tokio::task::yield_now().await;
        assert!(
            !matches!(handle.poll_request(), Poll::Ready(Some(_))),
            "k={k}: replayed without a new token"
        );
        drop(a);
        tokio::task::yield_now().await;
        gate.add_permits(100);
        let mut b = spawn(client.clone().oneshot(get("/b")));
        let (r, send) = timeout(BOUND, async {
            loop {
                let _ = b.poll();
                tokio::task::yield_now().await;
                if let Poll::Ready(Some(r)) = handle.poll_request() {
                    return r;
                }
                advance(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("k={k}: the next call never got a token"));
        assert_eq!(
            r.headers()["authorization"],
            "Bearer tok-2",
            "k={k}: the next call did not use the refreshed token"
        );
        send.send_response(res(200, &[]));
        assert_eq!(timeout(BOUND, b).await.unwrap().unwrap().status(), 200);
        assert_eq!(hits.load(Ordering::SeqCst), 2, "k={k}: token requests");
    }
}

/// A quota shared through Redis (4 calls/s, burst 1): a call B waiting for its Redis slot,
/// dropped after k polls (k = 0: never polled; 1: its reservation on its way to Redis; more:
/// waiting for its slot), leaves the next call C its slot: C goes about one interval (250 ms)
/// after the first call, not two. Real time; a 30 ms pause after the drop leaves the background
/// release its round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_waiting_for_a_redis_slot_dropped_at_each_poll_gives_the_slot_back() {
    let Ok(url) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return;
    };
    let quota = Quota::per_second(4).unwrap();
    for k in 0..=3usize {
        let prefix = format!(
            "s52:rl:{}:{k}:{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let remote = RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(prefix);
        let (rl, limits) = RateLimitLayer::new(quota)
            .with_remote(Arc::new(remote))
            .pair();
        let served = Arc::new(AtomicUsize::new(0));
        let svc = {
            let served = served.clone();
            tower::service_fn(move |_req: Req| {
                served.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, BoxError>(res(200, &[])) }
            })
        };
        let client = ClientBuilder::new()
            .without_retry()
            .with_rate_limit(rl)
            .build(svc);
        let t0 = tokio::time::Instant::now();
        client.clone().oneshot(get("/first")).await.unwrap();
        let mut b = spawn(client.clone().oneshot(get("/b")));
        for _ in 0..k {
            assert!(b.poll().is_pending(), "k={k}: B did not wait for its slot");
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        drop(b);
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(limits.waiting(HOST), 0, "k={k}: B is still in line");
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.clone().oneshot(get("/c")).await.unwrap();
        let at = t0.elapsed();
        assert!(
            at < Duration::from_millis(420),
            "k={k}: C went {at:?} after the first call: the dropped waiter's Redis slot was not given back"
        );
    }
}
