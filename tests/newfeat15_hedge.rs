//! docs/guides/hedge.md, "When" and "How much", read for time: the two rotating windows of 10 s
//! that make the delay follow a host ("covers the last 10 to 20 s"), a host that goes quiet, a
//! budget spent by calls that all saw a token when they started, and a loser dropped the moment
//! the other copy answers. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use tower::{service_fn, Layer, ServiceExt};

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// Counts requests and dropped-before-answer futures; latency in ms set from outside.
#[derive(Clone, Default)]
struct Api {
    latency_ms: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    slow_next: Arc<AtomicBool>,
}

struct Guard(Arc<AtomicUsize>, bool);
impl Drop for Guard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Api {
    fn new(ms: u64) -> Self {
        let api = Self::default();
        api.latency_ms.store(ms, Ordering::SeqCst);
        api
    }
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let api = self.clone();
        service_fn(move |_r: Request<Full<Bytes>>| {
            api.calls.fetch_add(1, Ordering::SeqCst);
            let ms = if api.slow_next.swap(false, Ordering::SeqCst) {
                10_000
            } else {
                api.latency_ms.load(Ordering::SeqCst)
            };
            let cancelled = api.cancelled.clone();
            async move {
                let mut guard = Guard(cancelled, false);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.1 = true;
                Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
            }
        })
    }
}

/// `n` calls at once.
async fn burst<S>(svc: &S, n: usize)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    svc.oneshot(get("http://api.example.com/")),
                )
                .await
                .expect("no hang")
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// "over two rotating windows of 10 s ... so it follows a host whose latency changes and covers
/// the last 10 to 20 s": a host at 10 ms that moves to 100 ms and stays there for 30 s has a
/// delay near 100 ms, not 10 ms.
#[tokio::test(start_paused = true)]
async fn the_delay_follows_a_host_whose_latency_changes() {
    let api = Api::new(10);
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..8 {
        burst(&svc, 16).await;
    }
    let before = handle.stats("api.example.com").unwrap().delay().unwrap();
    assert!(before < Duration::from_millis(20), "{before:?}");
    api.latency_ms.store(100, Ordering::SeqCst);
    for _ in 0..300 {
        burst(&svc, 16).await;
    }
    let after = handle.stats("api.example.com").unwrap().delay().unwrap();
    eprintln!("delay before {before:?}, after {after:?}");
    assert!(
        after >= Duration::from_millis(100) && after < Duration::from_millis(130),
        "{after:?}"
    );
}

/// "Nothing is hedged until the recent windows hold 100 samples": a host that had its samples,
/// then no call for 25 s (longer than both windows), holds none in its recent windows. Its next
/// slow call is not hedged on a delay learned 25 s ago.
#[tokio::test(start_paused = true)]

async fn a_host_quiet_for_longer_than_both_windows_is_not_hedged_on_old_samples() {
    let api = Api::new(10);
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..8 {
        burst(&svc, 16).await;
    }
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());
    tokio::time::sleep(Duration::from_secs(25)).await;
    api.latency_ms.store(500, Ordering::SeqCst);
    let calls_before = api.calls.load(Ordering::SeqCst);
    burst(&svc, 1).await;
    let s = handle.stats("api.example.com").unwrap();
    eprintln!("after 25 s quiet: {s:?}");
    assert_eq!(
        api.calls.load(Ordering::SeqCst) - calls_before,
        1,
        "a call was hedged on samples older than both windows: {s:?}"
    );
}

/// "A call keeps a copy of its request only when the host has a delay and a whole token at the
/// moment of the call; a hedge that finds the budget spent when it is due is not sent." Twenty
/// slow calls start together with a budget of 2: at most 2 hedges (plus what 20 × 0.05 adds).
#[tokio::test(start_paused = true)]
async fn slow_calls_that_all_saw_a_token_send_no_more_hedges_than_the_budget() {
    let api = Api::new(10);
    let (layer, handle) = HedgeLayer::new().with_budget(0.05, 2).unwrap().pair();
    let svc = layer.layer(api.service());
    for _ in 0..8 {
        burst(&svc, 16).await;
    }
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());
    api.latency_ms.store(500, Ordering::SeqCst);
    let calls_before = api.calls.load(Ordering::SeqCst);
    burst(&svc, 20).await;
    let extra = api.calls.load(Ordering::SeqCst) - calls_before - 20;
    let s = handle.stats("api.example.com").unwrap();
    eprintln!("{s:?}, extra {extra}");
    assert!(extra <= 3, "{extra} hedges with a burst of 2");
    assert_eq!(s.hedges() as usize, extra);
}

/// "the first answer wins and the other copy is dropped, which cancels it": the slow first
/// copy is dropped as soon as the hedge answers, not when the caller is done with the response.
#[tokio::test(start_paused = true)]
async fn the_loser_is_dropped_when_the_winner_answers() {
    let api = Api::new(10);
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..8 {
        burst(&svc, 16).await;
    }
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());
    assert_eq!(api.cancelled.load(Ordering::SeqCst), 0);
    // The next first copy takes 10 s; the copy sent after the delay takes 10 ms.
    api.slow_next.store(true, Ordering::SeqCst);
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        svc.clone().oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("the hedge answers");
    let res = res.unwrap();
    assert_eq!(handle.stats("api.example.com").unwrap().hedge_wins(), 1);
    assert_eq!(
        api.cancelled.load(Ordering::SeqCst),
        1,
        "the loser was dropped once the winner answered"
    );
    drop(res);
}

/// "Each hedgeable call adds 0.05 of a hedge": calls that are not hedgeable (POSTs) add nothing.
/// With a burst of 1, the one token is spent by the first slow GET; a thousand POSTs later, the
/// next slow GET finds no whole token and is not hedged.
#[tokio::test(start_paused = true)]
async fn calls_that_are_not_hedgeable_add_nothing_to_the_budget() {
    let api = Api::new(10);
    let (layer, handle) = HedgeLayer::new().with_budget(0.05, 1).unwrap().pair();
    let svc = layer.layer(api.service());
    for _ in 0..8 {
        burst(&svc, 16).await;
    }
    api.slow_next.store(true, Ordering::SeqCst);
    burst(&svc, 1).await;
    assert_eq!(handle.stats("api.example.com").unwrap().hedges(), 1);
    for _ in 0..1000 {
        let post = Request::post("http://api.example.com/")
            .body(Full::default())
            .unwrap();
        svc.clone().oneshot(post).await.unwrap();
    }
    api.slow_next.store(true, Ordering::SeqCst);
    burst(&svc, 1).await;
    let s = handle.stats("api.example.com").unwrap();
    assert_eq!(s.hedges(), 1, "POSTs filled the budget: {s:?}");
}

/// hedge.md and concurrency.md: below the hedging layer "each hedged copy takes a place of its
/// own, so hedging cannot push a host past its limit", and "When one copy fails with an error
/// while the other is still running, the call waits for the other". With a limit of one that
/// sheds (no wait), the hedge is refused and the call still gets the first copy's answer.
#[tokio::test(start_paused = true)]
async fn a_hedge_refused_by_a_full_adaptive_limit_leaves_the_first_copy_to_answer() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let api = Api::new(10);
    let (hedge, handle) = HedgeLayer::new().pair();
    let (limit, limits) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_initial_limit(1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = hedge.layer(limit.layer(api.service()));
    for _ in 0..130 {
        burst(&svc, 1).await;
    }
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());
    let before = api.calls.load(Ordering::SeqCst);
    api.slow_next.store(true, Ordering::SeqCst);
    let res = tokio::time::timeout(
        Duration::from_secs(30),
        svc.clone().oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("no hang");
    assert!(res.is_ok(), "{:?}", res.err().map(|e| e.to_string()));
    assert_eq!(api.calls.load(Ordering::SeqCst) - before, 1);
    let state = limits.state("api.example.com").unwrap();
    assert_eq!(state.in_flight(), 0);
}
