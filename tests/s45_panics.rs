//! Today's panic fixes, composed with tower's own layers and driven by a kept service:
//! coalesce catches a panic of the shared call (every caller gets an error naming it, the next
//! request calls afresh, what it held below is given back); a panicking `on_event` hook of the
//! rate limiter or the breaker leaves no place in line and no probe slot held; the breaker's open
//! period doubles all the way to its `max`.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::events::{BreakerState, Event};
use sturdy::core::BoxError;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;

/// `/panic` sleeps 100 ms, then panics while `boom` is set (answers 200 otherwise);
/// `/status/N` answers N.
#[derive(Clone)]
struct Api {
    boom: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
}

impl Api {
    fn new() -> Self {
        Self {
            boom: Arc::new(AtomicBool::new(true)),
            calls: Arc::new(AtomicU32::new(0)),
        }
    }
}

impl Service<Req> for Api {
    type Response = Res;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Res, BoxError>> + Send>>;
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Req) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let path = req.uri().path().to_string();
        let boom = self.boom.load(Ordering::SeqCst);
        Box::pin(async move {
            if path == "/panic" {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if boom {
                    panic!("s45-boom in the shared call");
                }
            }
            let status: u16 = path
                .strip_prefix("/status/")
                .and_then(|s| s.parse().ok())
                .unwrap_or(200);
            Ok(Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(b"ok")))
                .unwrap())
        })
    }
}

fn req(path: &str) -> Req {
    Request::get(format!("http://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(" | ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

const LONG: Duration = Duration::from_secs(60);

/// Coalesce over ConcurrencyLimit(n): five identical GETs share a call that panics while it
/// runs. Every caller (the polling one included) gets an error naming the panic, no task
/// panics, the permit below comes back, and the next identical request calls afresh. (Over
/// ConcurrencyLimit(1) the callers wait for the permit in `poll_ready`, one at a time, so each
/// makes its own call.)
#[tokio::test(start_paused = true)]
async fn coalesced_panic_fails_every_caller_and_the_next_calls_afresh() {
    for limit in [1usize, 5, 64] {
        coalesced_panic_round(limit).await;
    }
}

async fn coalesced_panic_round(limit: usize) {
    let api = Api::new();
    let svc = CoalesceLayer::new().layer(ConcurrencyLimitLayer::new(limit).layer(api.clone()));
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let r = s.ready().await?.call(req("/panic")).await;
            r.map(|_| ())
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        let r = tokio::time::timeout(LONG, t)
            .await
            .expect("a caller hung")
            .expect("the panic reached a caller's task");
        let e = r.expect_err("a panicked call answered");
        let text = chain(&*e);
        assert!(
            text.contains("panicked while running it: s45-boom in the shared call"),
            "{text}"
        );
        let core = sturdy::core::find::<sturdy::core::Error>(&*e).expect("a sturdy error");
        assert_eq!(
            core.delivery(),
            Some(sturdy::core::Delivery::MaybeProcessed),
            "{text}"
        );
    }
    let first = api.calls.load(Ordering::SeqCst);
    if limit >= 5 {
        assert_eq!(first, 1, "one shared call");
    }
    // The next identical request calls afresh (and gets the permit below).
    api.boom.store(false, Ordering::SeqCst);
    let mut kept = svc.clone();
    let res = tokio::time::timeout(LONG, async {
        kept.ready().await.unwrap().call(req("/panic")).await
    })
    .await
    .expect("the next request hung (permit or table entry held)")
    .expect("the next request failed");
    assert_eq!(res.status(), 200);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    assert_eq!(api.calls.load(Ordering::SeqCst), first + 1);
}

/// The same, with the leader's future dropped at seeded points before the panic: the joiners
/// still get the error, and nothing hangs.
#[tokio::test(start_paused = true)]
async fn coalesced_panic_after_the_leader_left_still_fails_the_joiners() {
    for cut_ms in [0u64, 1, 50, 99] {
        let api = Api::new();
        let svc = CoalesceLayer::new().layer(ConcurrencyLimitLayer::new(1).layer(api.clone()));
        let mut leader_svc = svc.clone();
        let leader = tokio::spawn(async move {
            let _ = leader_svc.ready().await?.call(req("/panic")).await;
            Ok::<_, BoxError>(())
        });
        tokio::task::yield_now().await;
        let mut joiners = Vec::new();
        for _ in 0..3 {
            let mut s = svc.clone();
            joiners.push(tokio::spawn(async move {
                s.ready().await?.call(req("/panic")).await.map(|_| ())
            }));
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(cut_ms)).await;
        leader.abort();
        for j in joiners {
            let r = tokio::time::timeout(LONG, j)
                .await
                .unwrap_or_else(|_| panic!("cut {cut_ms}: a joiner hung"))
                .unwrap_or_else(|e| panic!("cut {cut_ms}: joiner task panicked: {e}"));
            let e = r.expect_err("a panicked call answered");
            let text = chain(&*e);
            assert!(text.contains("s45-boom"), "cut {cut_ms}: {text}");
        }
        api.boom.store(false, Ordering::SeqCst);
        let mut kept = svc.clone();
        let res = tokio::time::timeout(LONG, async {
            kept.ready().await.unwrap().call(req("/panic")).await
        })
        .await
        .unwrap_or_else(|_| panic!("cut {cut_ms}: next request hung"))
        .unwrap();
        assert_eq!(res.status(), 200);
    }
}

/// A rate limiter whose `on_event` hook panics when a call begins to wait: the next caller of
/// the key is not left behind the dead call's place. Over ConcurrencyLimit(1), kept service.
#[tokio::test(start_paused = true)]
async fn ratelimit_hook_panic_on_wait_leaves_no_place_held() {
    let api = Api::new();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .on_event(move |e| {
            if matches!(e, Event::RateLimitWaited { .. }) && a.swap(false, Ordering::SeqCst) {
                panic!("s45 hook panic");
            }
        })
        .pair();
    let svc = layer.layer(ConcurrencyLimitLayer::new(1).layer(api.clone()));
    let mut kept = svc.clone();
    // The first call takes the slot.
    let res = kept
        .ready()
        .await
        .unwrap()
        .call(req("/status/200"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // The second waits: its hook panics in its own task.
    let mut s2 = svc.clone();
    let t = tokio::spawn(async move {
        let _ = s2.ready().await?.call(req("/status/200")).await;
        Ok::<_, BoxError>(())
    });
    let joined = tokio::time::timeout(LONG, t)
        .await
        .expect("panicked call hung");
    assert!(joined.is_err(), "the hook panic should reach its task");
    assert!(!armed.load(Ordering::SeqCst), "the hook never ran");
    // The third and fourth get through within their turns.
    for i in 0..2 {
        let res = tokio::time::timeout(Duration::from_secs(5), async {
            kept.ready().await.unwrap().call(req("/status/200")).await
        })
        .await
        .unwrap_or_else(|_| panic!("call {i} after the hook panic hung"))
        .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(handle.waiting("api.test"), 0);
}

/// A breaker whose `on_event` hook panics when a probe is let through: the probe slot is not
/// kept, so the next call probes (and closes the breaker) instead of being refused.
#[tokio::test(start_paused = true)]
async fn circuit_hook_panic_on_probe_leaves_no_probe_slot_held() {
    let api = Api::new();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_probes(1)
        .with_successes_to_close(1)
        .on_event(move |e| {
            if let Event::CircuitChanged { to, .. } = e {
                if *to == BreakerState::HalfOpen && a.swap(false, Ordering::SeqCst) {
                    panic!("s45 breaker hook panic");
                }
            }
        })
        .pair();
    let svc = layer.layer(ConcurrencyLimitLayer::new(1).layer(api.clone()));
    let mut kept = svc.clone();
    let r = kept.ready().await.unwrap().call(req("/status/500")).await;
    assert!(matches!(r, Ok(ref res) if res.status() == 500), "{r:?}");
    assert!(matches!(
        handle.state("api.test"),
        Some(CircuitState::Open { .. })
    ));
    tokio::time::advance(Duration::from_millis(1_001)).await;
    let mut s2 = svc.clone();
    let t = tokio::spawn(async move {
        let _ = s2.ready().await?.call(req("/status/200")).await;
        Ok::<_, BoxError>(())
    });
    let joined = tokio::time::timeout(LONG, t).await.expect("probe hung");
    assert!(!armed.load(Ordering::SeqCst), "the hook never ran");
    let _ = joined;
    // Whatever the panicking probe did, the next call is let through.
    let r = tokio::time::timeout(LONG, async {
        kept.ready().await.unwrap().call(req("/status/200")).await
    })
    .await
    .expect("hung");
    let res = r.unwrap_or_else(|e| panic!("refused after a hook panic: {}", chain(&*e)));
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state("api.test"), Some(CircuitState::Closed));
}

/// `with_open_duration(1 ms, 5 min)`: the open period doubles on each re-opening all the way to
/// 5 min (it stopped at 2^16 ms, about 65 s, before).
#[tokio::test(start_paused = true)]
async fn circuit_open_period_doubles_to_its_max() {
    let api = Api::new();
    let periods = Arc::new(Mutex::new(Vec::new()));
    let p = periods.clone();
    let layer = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_millis(1), Duration::from_secs(300))
        .on_event(move |e| {
            if let Event::CircuitChanged {
                to: BreakerState::Open,
                open_for: Some(d),
                ..
            } = e
            {
                p.lock().unwrap().push(*d);
            }
        });
    let mut kept = layer.layer(api.clone());
    for _ in 0..25 {
        let _ = kept.ready().await.unwrap().call(req("/status/500")).await;
        let last = *periods.lock().unwrap().last().unwrap();
        tokio::time::advance(last + Duration::from_millis(1)).await;
    }
    let got = periods.lock().unwrap().clone();
    assert!(got.len() >= 20, "{got:?}");
    for (i, d) in got.iter().enumerate() {
        let want = sturdy::core::clock::doubled(
            Duration::from_millis(1),
            u32::try_from(i).unwrap(),
            Duration::from_secs(300),
        );
        assert_eq!(*d, want, "opening {i}: {got:?}");
    }
    assert_eq!(*got.last().unwrap(), Duration::from_secs(300));
}

/// Through the rate limiter: a 429 with `X-RateLimit-Remaining: 0` and a decimal Unix time or an
/// RFC 3339 reset pauses the host until then (42.5 s), not for 54 years capped at 5 minutes.
#[tokio::test(start_paused = true)]
async fn ratelimit_pauses_until_a_decimal_or_rfc3339_reset() {
    use sturdy::core::clock::ManualClock;
    let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_903_600);
    for reset in ["1764903642.5", "2025-12-05T03:00:42.500Z", "1764903642500"] {
        let (layer, handle) = RateLimitLayer::adaptive_only()
            .with_clock(Arc::new(ManualClock::at(now)))
            .pair();
        let inner = tower::service_fn(move |_r: Req| async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(429)
                    .header("x-ratelimit-remaining", "0")
                    .header("x-ratelimit-reset", reset)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        });
        let mut kept = layer.layer(inner);
        let _ = kept.ready().await.unwrap().call(req("/x")).await;
        let p = handle
            .pause("api.test")
            .unwrap_or_else(|| panic!("{reset}: no pause"));
        assert!(
            p > Duration::from_secs(40) && p <= Duration::from_millis(42_500),
            "{reset}: paused {p:?}"
        );
    }
}

/// coalesce CHANGELOG: "the caller's error's own text no longer appends its source's text (each
/// level of its `source()` chain still says what it is)". A caught panic's error says the panic's
/// words once in its own text; the chain below it still holds the shared error.
#[tokio::test(start_paused = true)]
async fn coalesced_panic_own_text_says_its_words_once() {
    let api = Api::new();
    let mut svc = CoalesceLayer::new().layer(api.clone());
    let e = svc
        .ready()
        .await
        .unwrap()
        .call(req("/panic"))
        .await
        .expect_err("panicked");
    let own = e.to_string();
    assert_eq!(own.matches("panicked while running it").count(), 1, "{own}");
    assert!(
        sturdy::core::find::<sturdy::coalesce::SharedError>(&*e).is_some(),
        "{}",
        chain(&*e)
    );
}

/// A response body that panics when read.
struct PanicBody;
impl http_body::Body for PanicBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        panic!("s45 body panic");
    }
}

/// The shared response's body is read by the shared call: a body that panics while it is read
/// is a panic while the shared call runs, caught for every caller; the next request calls
/// afresh. Under tower's Timeout layer, with a kept service.
#[tokio::test(start_paused = true)]
async fn a_body_that_panics_while_shared_is_caught_for_every_caller() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |_r: Req| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok::<_, BoxError>(if n == 0 {
                Response::new(http_body_util::Either::Left(PanicBody))
            } else {
                Response::new(http_body_util::Either::Right(Full::new(
                    Bytes::from_static(b"fine"),
                )))
            })
        }
    });
    let svc = tower::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(
        CoalesceLayer::new()
            .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)).layer(inner)),
    );
    // Joined in this task (the body's future is not `Send`-general enough for a spawn): an
    // uncaught panic would fail the test itself.
    let futs = (0..4).map(|_| {
        let mut s = svc.clone();
        async move { s.ready().await?.call(req("/b")).await.map(|_| ()) }
    });
    let all = tokio::time::timeout(LONG, futures_util::future::join_all(futs))
        .await
        .expect("a caller hung");
    for r in all {
        let e = r.expect_err("a panicked body answered");
        assert!(chain(&*e).contains("s45 body panic"), "{}", chain(&*e));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one shared call");
    let mut kept = svc.clone();
    let res = kept.ready().await.unwrap().call(req("/b")).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "fine");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The retry layer, with `Backoff::exponential(1 ns, 1 s)` and 70 attempts against a service
/// that always answers 503: each scheduled delay is `min(1 s, 2^(retry - 1) ns)`, past retry 32
/// too, and the paused clock moves by their sum. Over ConcurrencyLimit(1), a kept service.
#[tokio::test(start_paused = true)]
async fn retry_sleeps_double_past_retry_32_to_the_cap() {
    use sturdy::retry::{Backoff, RetryLayer};
    let delays = Arc::new(Mutex::new(Vec::new()));
    let d = delays.clone();
    let cap = Duration::from_secs(1);
    let layer = RetryLayer::new()
        .with_max_attempts(70)
        .without_budget()
        .with_backoff(Backoff::exponential(Duration::from_nanos(1), cap).unwrap())
        .on_event(move |e| {
            if let Event::RetryScheduled { delay, .. } = e {
                d.lock().unwrap().push(*delay);
            }
        });
    let api = Api::new();
    let mut kept = layer.layer(ConcurrencyLimitLayer::new(1).layer(api.clone()));
    let started = tokio::time::Instant::now();
    let r = kept.ready().await.unwrap().call(req("/status/503")).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(r, Ok(ref res) if res.status() == 503) || r.is_err(),
        "{r:?}"
    );
    assert_eq!(api.calls.load(Ordering::SeqCst), 70);
    let got = delays.lock().unwrap().clone();
    assert_eq!(got.len(), 69);
    let mut sum = Duration::ZERO;
    for (i, d) in got.iter().enumerate() {
        let want =
            sturdy::core::clock::doubled(Duration::from_nanos(1), u32::try_from(i).unwrap(), cap);
        assert_eq!(*d, want, "retry {}", i + 1);
        sum += want;
    }
    assert!(elapsed >= sum, "{elapsed:?} < {sum:?}");
}

/// Waiting calls cut at seeded points by tower's Timeout (some while waiting in line, one with a
/// panicking hook): none keeps a place; the line is empty after, and the next call's turn comes.
#[tokio::test(start_paused = true)]
async fn ratelimit_waiters_cut_at_seeded_points_leave_no_place() {
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(2).unwrap())
        .on_event(move |e| {
            if matches!(e, Event::RateLimitWaited { .. }) && a.swap(false, Ordering::SeqCst) {
                panic!("s45 hook panic");
            }
        })
        .pair();
    let api = Api::new();
    let svc = layer.layer(ConcurrencyLimitLayer::new(1).layer(api.clone()));
    let mut seed: u64 = 0x45_45_45;
    let mut tasks = Vec::new();
    for _ in 0..30 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let cut = Duration::from_millis(seed % 3_000);
        let s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = tower::timeout::TimeoutLayer::new(cut).layer(s);
            let _ = t.ready().await?.call(req("/status/200")).await;
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(LONG, t)
            .await
            .expect("a cut call hung");
    }
    assert!(!armed.load(Ordering::SeqCst));
    assert_eq!(handle.waiting("api.test"), 0);
    let mut kept = svc.clone();
    let res = tokio::time::timeout(Duration::from_secs(3), async {
        kept.ready().await.unwrap().call(req("/status/200")).await
    })
    .await
    .expect("the next call waited past its turn")
    .unwrap();
    assert_eq!(res.status(), 200);
}

/// Panic payloads other than `&str`: a formatted `String` is named; any other payload still
/// fails every caller (no hang) and the next request calls afresh.
#[tokio::test(start_paused = true)]
async fn coalesced_panics_of_any_payload_fail_every_caller() {
    for payload in 0..2u8 {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let inner = tower::service_fn(move |_r: Req| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if n == 0 {
                    if payload == 0 {
                        panic!("{}", format!("s45 formatted {}", 7));
                    }
                    std::panic::panic_any(42u32);
                }
                Ok::<_, BoxError>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        });
        let svc = CoalesceLayer::new().layer(inner);
        let futs = (0..3).map(|_| {
            let mut s = svc.clone();
            async move { s.ready().await?.call(req("/p")).await.map(|_| ()) }
        });
        let all = tokio::time::timeout(LONG, futures_util::future::join_all(futs))
            .await
            .expect("a caller hung");
        for r in all {
            let e = r.expect_err("a panicked call answered");
            let text = chain(&*e);
            assert!(text.contains("panicked while running it"), "{text}");
            if payload == 0 {
                assert!(text.contains("s45 formatted 7"), "{text}");
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let mut kept = svc.clone();
        let res = kept.ready().await.unwrap().call(req("/p")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
