//! Kept service clones used from several tasks and threads, each called many times, with the
//! circuit breaker and the rate limiter. Against docs/guides/circuit.md ("One breaker per
//! host"; "The layer, its clones and its handles are one set of breakers"), docs/guides/
//! ratelimit.md ("these pause every caller of the host"; "Every clone ... every service they make
//! and every handle share it") and the `Client` rustdoc ("Clones share every layer's state").
//!
//! Real time on a multi-thread runtime (a few hundred milliseconds to about a second each), with
//! in-process services: what is tested is sharing across threads, not timing.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::time::Duration;

use outsider4_common::*;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::{find, CircuitOpen};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

const A: &str = "a.example.com";
const B: &str = "b.example.com";

/// What one task saw: calls that reached the API (and their statuses), and refusals.
#[derive(Debug, Default)]
struct Tally {
    reached: usize,
    open: usize,
    /// Whether a call that reached the API came after a refusal in this task.
    reached_after_open: bool,
}

async fn hammer<S>(mut kept: S, host: &'static str, calls: usize) -> Tally
where
    S: Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = sturdy::core::BoxError,
    >,
{
    let mut t = Tally::default();
    for i in 0..calls {
        let req = get(&format!("http://{host}/orders/{i}"));
        match kept.ready().await {
            Ok(ready) => match ready.call(req).await {
                Ok(res) => {
                    assert!(res.status().is_server_error() || res.status().is_success());
                    t.reached += 1;
                    if t.open > 0 {
                        t.reached_after_open = true;
                    }
                }
                Err(e) => {
                    assert!(
                        find::<CircuitOpen>(&*e).is_some(),
                        "only refusals expected: {}",
                        chain(&*e)
                    );
                    t.open += 1;
                }
            },
            Err(e) => panic!("poll_ready failed: {e}"),
        }
    }
    t
}

fn failing_on_a() -> Api {
    Api::new(|_, req| {
        if req.uri().host() == Some(A) {
            st(503)
        } else {
            st(200)
        }
    })
}

/// Sixteen kept clones of the breaker layer's service, each on its own task, each calling host
/// A 8 times (no clone alone reaches the minimum volume of 100) and host B 4 times. Host A's one
/// breaker opens at the documented threshold (100 calls, all failed), whichever clones saw the
/// failures; the handle sees it open and host B closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_breaker_per_host_counts_every_clone() {
    let api = failing_on_a();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.service());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let kept = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut kept = kept;
            let a = hammer(&mut kept, A, 8).await;
            let b = hammer(&mut kept, B, 4).await;
            (a, b)
        }));
    }
    let (mut reached_a, mut open_a) = (0, 0);
    for t in tasks {
        let (a, b) = tokio::time::timeout(secs(10), t).await.unwrap().unwrap();
        assert!(
            !a.reached_after_open,
            "a call went through after a refusal: {a:?}"
        );
        assert_eq!(b.open, 0, "host B has its own breaker: {b:?}");
        reached_a += a.reached;
        open_a += a.open;
    }
    assert_eq!(reached_a + open_a, 128);
    assert!(
        (100..=100 + 16).contains(&reached_a),
        "A's breaker opened after {reached_a} failures (threshold 100, 16 clones in flight)"
    );
    assert!(
        matches!(handle.state(A), Some(CircuitState::Open { .. })),
        "{:?}",
        handle.state(A)
    );
    assert_eq!(handle.state(B), Some(CircuitState::Closed));
    let states = handle.states();
    assert_eq!(states.len(), 2, "{states:?}");
    // A fresh clone made after the opening is refused too.
    let err = svc
        .clone()
        .oneshot(get(&format!("http://{A}/x")))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
}

/// The same with a streak trigger (`with_consecutive_failures(5)`): four clones each see two
/// failures in turn, and the one breaker opens after five, not after five per clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_streak_is_counted_across_clones() {
    let api = failing_on_a();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(5)
        .pair();
    let svc = layer.layer(api.service());
    let mut clones: Vec<_> = (0..4).map(|_| Some(svc.clone())).collect();
    // Round robin across the kept clones, each call on a task of its own, one at a time.
    let mut reached = 0;
    let mut refused = 0;
    for _round in 0..3 {
        for slot in clones.iter_mut() {
            let mut kept = slot.take().unwrap();
            let task = tokio::spawn(async move {
                let tally = hammer(&mut kept, A, 1).await;
                (tally, kept)
            });
            let (tally, kept) = task.await.unwrap();
            *slot = Some(kept);
            reached += tally.reached;
            refused += tally.open;
        }
    }
    assert_eq!(reached, 5, "opened after the fifth failure in a row");
    assert_eq!(refused, 7);
    assert!(matches!(handle.state(A), Some(CircuitState::Open { .. })));
}

/// The same kept clones called from OS threads, each with a runtime of its own, through the
/// composed client (no retries, so each call is one attempt): the breaker opens at the threshold
/// and the handle sees it.
#[test]
fn client_clones_on_threads_share_one_breaker() {
    let api = failing_on_a();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(layer)
        .build(api.service());
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let kept = client.clone();
                s.spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(async move {
                            let mut kept = kept;
                            let mut total = Tally::default();
                            // Many calls per clone, in small groups so the threads interleave.
                            for _ in 0..10 {
                                let t = hammer(&mut kept, A, 4).await;
                                total.reached += t.reached;
                                total.open += t.open;
                                total.reached_after_open |=
                                    t.reached_after_open || (t.reached > 0 && total.open > t.open);
                                tokio::task::yield_now().await;
                            }
                            total
                        })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let reached: usize = tallies.iter().map(|t| t.reached).sum();
    let open: usize = tallies.iter().map(|t| t.open).sum();
    assert_eq!(reached + open, 160);
    assert!(
        (100..=104).contains(&reached),
        "the breaker opened after {reached} failures: {tallies:?}"
    );
    for t in &tallies {
        assert!(!t.reached_after_open, "{tallies:?}");
    }
    assert!(matches!(handle.state(A), Some(CircuitState::Open { .. })));
}

/// A `force_open` through the handle stops every kept clone at once, on every task, and
/// `force_close` lets them all through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_steers_every_clone() {
    let api = Api::always(st(200));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.service());
    let mut kept: Vec<_> = (0..6).map(|_| svc.clone()).collect();
    for k in kept.iter_mut() {
        assert_eq!(hammer(k, A, 3).await.reached, 3);
    }
    handle.force_open(A);
    assert_eq!(handle.state(A), Some(CircuitState::ForcedOpen));
    let mut tasks = Vec::new();
    for k in kept.drain(..) {
        tasks.push(tokio::spawn(async move {
            let mut k = k;
            let t = hammer(&mut k, A, 5).await;
            (t, k)
        }));
    }
    let mut back = Vec::new();
    for t in tasks {
        let (tally, k) = t.await.unwrap();
        assert_eq!(tally.open, 5, "{tally:?}");
        back.push(k);
    }
    handle.force_close(A);
    for k in back.iter_mut() {
        assert_eq!(hammer(k, A, 2).await.reached, 2);
    }
}

// ------------------------------------------------------------------ the rate limiter

/// One kept clone of the client meets a 429 with `Retry-After: 1`; kept clones on other tasks
/// (each called five times) all wait for that pause before their first call reaches the API,
/// and the handle sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_every_clone_on_every_task() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "1")])
        } else {
            st(200)
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_rate_limit(layer)
        .build(api.service());
    let mut first = client.clone();
    let res = first
        .ready()
        .await
        .unwrap()
        .call(get(&format!("http://{A}/p")))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let paused_at = Instant::now();
    let left = handle.pause(A).expect("paused");
    assert!(left > ms(900) && left <= secs(1), "{left:?}");
    let mut tasks = Vec::new();
    for t in 0..6 {
        let mut kept = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let res = kept
                    .ready()
                    .await?
                    .call(get(&format!("http://{A}/t{t}/{i}")))
                    .await?;
                assert_eq!(res.status(), 200);
            }
            Ok::<_, sturdy::core::BoxError>(())
        }));
    }
    for t in tasks {
        tokio::time::timeout(secs(5), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let seen = api.seen();
    assert_eq!(seen.len(), 31);
    for s in &seen[1..] {
        assert!(
            s.sent + ms(20) >= paused_at + left,
            "{} sent {:?} before the pause ended",
            s.uri,
            (paused_at + left) - s.sent
        );
    }
    assert_eq!(handle.pause(A), None);
    // After the pause, every clone goes at once.
    let t = Instant::now();
    first
        .ready()
        .await
        .unwrap()
        .call(get(&format!("http://{A}/after")))
        .await
        .unwrap();
    assert!(t.elapsed() < ms(100));
}

/// A quota shared by kept clones on several tasks: 6 clones × 10 calls at 100 per second with a
/// burst of 1 take at least 590 ms together, not 90 ms (which each clone's own quota would
/// give).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_is_shared_by_every_clone() {
    let api = Api::always(st(200));
    let layer = RateLimitLayer::new(Quota::per_second(100).unwrap().with_burst(1).unwrap());
    let svc = layer.layer(api.service());
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..6 {
        let mut kept = svc.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let res = kept
                    .ready()
                    .await?
                    .call(get(&format!("http://{A}/q{t}/{i}")))
                    .await?;
                assert_eq!(res.status(), 200);
            }
            Ok::<_, sturdy::core::BoxError>(())
        }));
    }
    for t in tasks {
        tokio::time::timeout(secs(10), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let took = t0.elapsed();
    assert!(took >= ms(590), "60 calls at 100/s burst 1 took {took:?}");
    assert!(took < secs(5), "{took:?}");
    let mut sent: Vec<Duration> = api.seen().iter().map(|s| s.sent - t0).collect();
    sent.sort();
    for w in sent.windows(11) {
        assert!(
            w[10] - w[0] >= ms(80),
            "11 calls within {:?}: {sent:?}",
            w[10] - w[0]
        );
    }
}

// ------------------------------------------------------------------ races across threads

/// "Half-open: 1 probe at a time; everyone else fails fast", with eight kept clones on a
/// multi-thread runtime hammering a host whose every probe fails after 20 ms (so the breaker
/// goes open, half-open, open ... for half a second): the API never has two calls in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_at_a_time_across_threads() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let api = Api::new(|n, _| {
        if n < 3 {
            st(503)
        } else {
            Act::After(ms(20), 503)
        }
    });
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let inner = api.service();
    let (f, m) = (in_flight.clone(), most.clone());
    let counted = tower::service_fn(move |req: http::Request<Body>| {
        let now = f.fetch_add(1, Ordering::SeqCst) + 1;
        m.fetch_max(now, Ordering::SeqCst);
        let fut = inner.clone().oneshot(req);
        let f = f.clone();
        async move {
            let r = fut.await;
            f.fetch_sub(1, Ordering::SeqCst);
            r
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .with_open_duration(ms(30), ms(30))
        .pair();
    let svc = layer.layer(counted);
    let mut first = svc.clone();
    hammer(&mut first, A, 3).await;
    assert!(matches!(handle.state(A), Some(CircuitState::Open { .. })));
    let until = Instant::now() + ms(500);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut kept = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut reached = 0;
            while Instant::now() < until {
                let fut = kept
                    .ready()
                    .await
                    .unwrap()
                    .call(get(&format!("http://{A}/probe")));
                match fut.await {
                    Ok(_) => reached += 1,
                    Err(e) => assert!(find::<CircuitOpen>(&*e).is_some(), "{e}"),
                }
                tokio::task::yield_now().await;
            }
            reached
        }));
    }
    let mut probes = 0;
    for t in tasks {
        probes += tokio::time::timeout(secs(10), t).await.unwrap().unwrap();
    }
    assert!(probes >= 3, "some probes were admitted: {probes}");
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two probes in flight at once ({probes} probes)"
    );
}

/// A pause learned from a bare 429 is shared by every clone on every thread, also while other
/// clones make calls on other threads as fast as they can (each of their decisions sees the
/// previous pause over): 200 rounds of "429, then a call that must wait for the pause". The
/// pause is 8 ms (`with_default_pause`), whose pace (1 ms) the next success forgets, so each
/// round starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pause_is_not_lost_to_decisions_on_other_threads() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let api = Api::new(|_, req| {
        if req.uri().path().starts_with("/p/") {
            st(429)
        } else {
            st(200)
        }
    });
    let (layer, _handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(ms(8))
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .without_circuit_breaker()
        .with_rate_limit(layer)
        .build(api.service());
    let stop = Arc::new(AtomicBool::new(false));
    let mut busy = Vec::new();
    for t in 0..2 {
        let mut kept = client.clone();
        let stop = stop.clone();
        busy.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = kept
                    .ready()
                    .await
                    .unwrap()
                    .call(get(&format!("http://{A}/busy/{t}/{i}")))
                    .await;
                assert!(r.is_ok());
                i += 1;
                if i.is_multiple_of(16) {
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut kept = client.clone();
    let mut violations = Vec::new();
    let t0 = Instant::now();
    for round in 0..200 {
        let p = format!("http://{A}/p/{round}");
        let res = kept.ready().await.unwrap().call(get(&p)).await.unwrap();
        assert_eq!(res.status(), 429);
        let c = format!("http://{A}/check/{round}");
        let res = kept.ready().await.unwrap().call(get(&c)).await.unwrap();
        assert_eq!(res.status(), 200);
        let gap = api.last_sent(&c).unwrap() - api.last_sent(&p).unwrap();
        if gap < ms(7) {
            violations.push((round, gap));
        }
        if t0.elapsed() > secs(4) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        tokio::time::timeout(secs(5), b).await.unwrap().unwrap();
    }
    assert!(
        violations.is_empty(),
        "calls sent inside an 8 ms pause (round, gap after the 429's request): {violations:?}"
    );
}
