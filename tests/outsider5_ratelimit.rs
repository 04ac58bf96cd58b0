//! Outside tests of the rate limiter's release window, remote quotas and hostile headers,
//! against docs/guides/ratelimit.md and the rustdoc of `RateLimitLayer` and `RemoteQuota`.
//! Paused time, in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use outsider4_common::*;
use sturdy::core::{find, BoxError, RateLimited};
use sturdy::ratelimit::{
    BoxFuture as RFuture, Quota, RateLimitHandle, RateLimitLayer, RemoteQuota, Reserve,
    DEFAULT_MAX_PAUSE,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const KEY: &str = "api.example.com";

fn url(path: &str) -> String {
    format!("http://{KEY}{path}")
}

fn limited(
    api: &Api,
    layer: RateLimitLayer,
) -> (
    impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = impl Send>
        + Clone
        + Send
        + 'static,
    RateLimitHandle,
) {
    let (layer, handle) = layer.pair();
    (layer.layer(api.service()), handle)
}

fn sent_at(api: &Api, t0: Instant) -> Vec<(String, Duration)> {
    api.seen()
        .iter()
        .map(|s| {
            (
                s.uri
                    .trim_start_matches("http://api.example.com")
                    .to_owned(),
                s.sent - t0,
            )
        })
        .collect()
}

/// "with `adaptive_only()`, by slow start: one call leaves when the pause ends; each released
/// call that gets an answer other than 429 or 503 lets one more out, so 1, 2, 4, 8... leave one
/// round trip apart".
#[tokio::test(start_paused = true)]
async fn slow_start_after_a_retry_after_pause_releases_1_2_4() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "1")])
        } else {
            Act::After(ms(100), 200)
        }
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    assert_eq!(
        bounded(svc.clone().oneshot(get(&url("/p"))))
            .await
            .unwrap()
            .status(),
        429
    );
    let mut tasks = Vec::new();
    for i in 0..7 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get(&url(&format!("/w{i}")))),
        ));
        tokio::task::yield_now().await;
    }
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting(KEY), 7);
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap().unwrap().status(), 200);
    }
    let mut times: Vec<Duration> = sent_at(&api, t0)[1..].iter().map(|s| s.1).collect();
    times.sort();
    assert_eq!(
        times,
        vec![
            ms(1000),
            ms(1100),
            ms(1100),
            ms(1200),
            ms(1200),
            ms(1200),
            ms(1200)
        ],
        "{:?}",
        sent_at(&api, t0)
    );
}

/// Same after a bare 429 (the default pause, 1 s): the calls waiting for it leave, none fails,
/// and the first of them leaves when the pause ends.
#[tokio::test(start_paused = true)]
async fn after_a_bare_429_the_waiting_calls_all_get_through() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st(429)
        } else {
            Act::After(ms(50), 200)
        }
    });
    let (svc, _handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    assert_eq!(
        bounded(svc.clone().oneshot(get(&url("/p"))))
            .await
            .unwrap()
            .status(),
        429
    );
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get(&url(&format!("/w{i}")))),
        ));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap().unwrap().status(), 200);
    }
    let sent = sent_at(&api, t0);
    assert_eq!(sent[1].1, secs(1), "{sent:?}");
}

/// "one still waiting when its `max_wait` has passed fails then with `RateLimited` (suggesting
/// the default pause), also when a released call never answers".
#[tokio::test(start_paused = true)]
async fn a_waiter_behind_a_released_call_that_never_answers_leaves_at_max_wait() {
    let api = Api::new(|n, _| match n {
        0 => st_h(429, &[("retry-after", "1")]),
        1 => Act::Hang,
        _ => st(200),
    });
    let (svc, _handle) = limited(
        &api,
        RateLimitLayer::adaptive_only()
            .with_max_wait(secs(5))
            .with_default_pause(secs(3)),
    );
    assert_eq!(
        bounded(svc.clone().oneshot(get(&url("/p"))))
            .await
            .unwrap()
            .status(),
        429
    );
    let hung = tokio::spawn(svc.clone().oneshot(get(&url("/hang"))));
    tokio::task::yield_now().await;
    let t = Instant::now();
    let err = bounded(svc.clone().oneshot(get(&url("/w"))))
        .await
        .unwrap_err();
    assert_eq!(t.elapsed(), secs(5), "left at its max_wait");
    let rl = find::<RateLimited>(&*err).unwrap_or_else(|| panic!("{}", chain(&*err)));
    assert_eq!(rl.retry_after(), secs(3), "suggesting the default pause");
    hung.abort();
}

/// A service whose `call` panics for `/panic-call`, whose future panics for `/panic-fut`, and
/// which answers 200 after 100 ms otherwise (a 429 with Retry-After: 1 for `/p`).
fn panicky(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future = BoxFut>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Body>| -> BoxFut {
        calls.fetch_add(1, Ordering::SeqCst);
        match req.uri().path() {
            "/p" => Box::pin(async { Ok(response(429, &[("retry-after", "1".into())])) }),
            "/panic-call" => panic!("the inner call panicked on purpose"),
            "/panic-fut" => Box::pin(async {
                tokio::time::sleep(ms(10)).await;
                panic!("the inner future panicked on purpose")
            }),
            _ => Box::pin(async {
                tokio::time::sleep(ms(100)).await;
                Ok(response(200, &[]))
            }),
        }
    })
}

/// "a released call gives its place back when it finishes, fails, is dropped or panics": the
/// one call let out by slow start panics (in the inner `call`, or in its future); the next in
/// line still leaves, without waiting for its max_wait.
#[tokio::test(start_paused = true)]
async fn a_released_call_that_panics_gives_its_place_back() {
    for path in ["/panic-call", "/panic-fut"] {
        let calls = Arc::new(AtomicUsize::new(0));
        let (layer, handle) = RateLimitLayer::adaptive_only()
            .with_max_wait(secs(20))
            .pair();
        let svc = layer.layer(panicky(calls.clone()));
        let t0 = Instant::now();
        assert_eq!(
            svc.clone().oneshot(get(&url("/p"))).await.unwrap().status(),
            429
        );
        let first = tokio::spawn(svc.clone().oneshot(get(&url(path))));
        tokio::task::yield_now().await;
        let second = tokio::spawn(svc.clone().oneshot(get(&url("/ok"))));
        tokio::task::yield_now().await;
        assert_eq!(handle.waiting(KEY), 2, "{path}");
        assert!(bounded(first).await.unwrap_err().is_panic(), "{path}");
        let res = bounded(second).await.unwrap();
        let res = res.unwrap_or_else(|e| panic!("{path}: {}", chain(&*e)));
        assert_eq!(res.status(), 200, "{path}");
        assert!(
            t0.elapsed() < secs(2),
            "{path}: the call behind the panicked one waited {:?}",
            t0.elapsed()
        );
    }
}

/// "A waiting call reserves nothing. If it is dropped (a timeout above it, an aborted task), it
/// leaves the line and the calls behind it move up": with a quota and with a pause, callers
/// dropped at each point of their wait cost the next caller nothing.
#[tokio::test(start_paused = true)]
async fn dropped_waiters_give_their_place_back() {
    // A quota of one per second: one call takes the slot, ten wait and are dropped.
    let api = Api::always(st(200));
    let (svc, handle) = limited(&api, RateLimitLayer::new(Quota::per_second(1).unwrap()));
    assert_eq!(
        svc.clone().oneshot(get(&url("/a"))).await.unwrap().status(),
        200
    );
    let mut waiters = Vec::new();
    for _ in 0..10 {
        let mut f = Box::pin(svc.clone().oneshot(get(&url("/w"))));
        assert!(f.as_mut().now_or_never().is_none());
        waiters.push(f);
    }
    assert_eq!(handle.waiting(KEY), 10);
    // Half dropped at once, half after waiting a while.
    waiters.truncate(5);
    tokio::time::advance(ms(500)).await;
    for w in waiters.iter_mut() {
        assert!(w.as_mut().now_or_never().is_none());
    }
    drop(waiters);
    assert_eq!(handle.waiting(KEY), 0);
    let t = Instant::now();
    assert_eq!(
        bounded(svc.clone().oneshot(get(&url("/next"))))
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        t.elapsed() <= ms(500),
        "the next call waited {:?}",
        t.elapsed()
    );

    // A pause with slow start: waiters dropped before and after the pause ended.
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "1")])
        } else {
            Act::After(ms(100), 200)
        }
    });
    let (svc, handle) = limited(&api, RateLimitLayer::adaptive_only());
    let t0 = Instant::now();
    assert_eq!(
        svc.clone().oneshot(get(&url("/p"))).await.unwrap().status(),
        429
    );
    let mut waiters = Vec::new();
    for _ in 0..6 {
        let mut f = Box::pin(svc.clone().oneshot(get(&url("/w"))));
        assert!(f.as_mut().now_or_never().is_none());
        waiters.push(f);
    }
    tokio::time::advance(ms(1000)).await;
    // The pause has ended: the first waiter may have been let out (its place in the window);
    // drop them all, polled or not.
    for w in waiters.iter_mut().take(3) {
        let _ = w.as_mut().now_or_never();
    }
    drop(waiters);
    assert_eq!(handle.waiting(KEY), 0);
    let res = bounded(svc.clone().oneshot(get(&url("/next"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(
        t0.elapsed() <= ms(1100),
        "the call after the dropped waiters was held: {:?}",
        t0.elapsed()
    );
}

/// A remote quota in this process whose answers take 100 ms to arrive, and which counts what the
/// layer asks of it.
#[derive(Debug, Default)]
struct SlowStore {
    wait: Duration,
    reserves: AtomicUsize,
    granted: AtomicUsize,
    released: AtomicUsize,
}

impl RemoteQuota for SlowStore {
    fn reserve(&self, _key: &str, _max_wait: Duration) -> RFuture<Result<Reserve, BoxError>> {
        self.reserves.fetch_add(1, Ordering::SeqCst);
        self.granted.fetch_add(1, Ordering::SeqCst);
        let wait = self.wait;
        Box::pin(async move {
            tokio::time::sleep(ms(100)).await;
            Ok(Reserve::Granted { wait })
        })
    }

    fn release(&self, _key: &str) -> RFuture<Result<(), BoxError>> {
        self.released.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

/// "A call that waited for a Redis slot and was dropped ... gives the slot back"; `release`:
/// "The layer calls it once per unused grant, in the background". Dropped while the grant is on
/// its way, and dropped while waiting for a granted slot: one release each; a used grant: none.
#[tokio::test(start_paused = true)]
async fn a_remote_grant_whose_caller_was_dropped_is_given_back() {
    for (wait, drop_after) in [(Duration::ZERO, ms(50)), (secs(2), ms(500))] {
        let store = Arc::new(SlowStore {
            wait,
            ..SlowStore::default()
        });
        let api = Api::always(st(200));
        let layer = RateLimitLayer::new(Quota::per_second(10).unwrap()).with_remote(store.clone());
        let svc = layer.layer(api.service());
        let mut f = Box::pin(svc.clone().oneshot(get(&url("/a"))));
        assert!(f.as_mut().now_or_never().is_none());
        tokio::time::advance(drop_after).await;
        assert!(f.as_mut().now_or_never().is_none());
        drop(f);
        // Let background work run (in paused time).
        tokio::time::sleep(secs(5)).await;
        assert_eq!(api.calls(), 0);
        assert_eq!(
            store.released.load(Ordering::SeqCst),
            1,
            "wait {wait:?}, dropped after {drop_after:?}: the grant was not given back"
        );
        // A used grant is not given back.
        let res = bounded(svc.clone().oneshot(get(&url("/b")))).await.unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(secs(5)).await;
        assert_eq!(store.released.load(Ordering::SeqCst), 1, "wait {wait:?}");
    }
}

/// "Every pause learned from a response is at most `max_pause`"; "no panics on bad input":
/// hostile Retry-After and RateLimit values never panic, never pause longer than the cap, and
/// garbage pauses for no more than the default pause.
#[tokio::test(start_paused = true)]
async fn hostile_pause_headers_are_capped_and_never_panic() {
    let cases: Vec<(u16, &'static str, &'static str)> = vec![
        (429, "retry-after", "99999999999999999999"),
        (429, "retry-after", "18446744073709551615"),
        (429, "retry-after", "18446744073709551616"),
        (503, "retry-after", "-5"),
        (429, "retry-after", "-99999999999999999999"),
        (429, "retry-after", "abc"),
        (429, "retry-after", "1e9"),
        (429, "retry-after", "1.5"),
        (429, "retry-after", " 7 "),
        (429, "retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        (429, "retry-after", "Thu, 01 Jan 1970 00:00:00 GMT"),
        (429, "retry-after", "Sat, 32 Foo 2024 99:99:99 GMT"),
        (200, "ratelimit", "\"p\";r=0;t=99999999999999999999999"),
        (200, "ratelimit", "\"p\";r=0;t=-1"),
        (200, "ratelimit", "\"p\";r=-1;t=5"),
        (200, "ratelimit", "\"p\";r=0;t=1e400"),
        (200, "ratelimit", ";;;==\"\"r=0"),
        (200, "x-ratelimit-remaining", "0"),
        (200, "x-ratelimit-remaining", "-1"),
        (200, "x-ratelimit-remaining", "99999999999999999999999"),
    ];
    for (code, name, value) in cases {
        let api = Api::new(move |n, _| {
            if n == 0 {
                Act::Status(code, vec![(name, value.to_owned())])
            } else {
                st(200)
            }
        });
        let (svc, handle) = limited(
            &api,
            RateLimitLayer::adaptive_only().with_max_wait(secs(3600)),
        );
        let res = bounded(svc.clone().oneshot(get(&url("/p")))).await.unwrap();
        assert_eq!(res.status().as_u16(), code, "{name}: {value}");
        let pause = handle.pause(KEY).unwrap_or_default();
        assert!(
            pause <= DEFAULT_MAX_PAUSE,
            "{name}: {value} paused {pause:?}"
        );
        let t = Instant::now();
        let res = bounded(svc.clone().oneshot(get(&url("/next"))))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{name}: {value}");
        assert!(
            t.elapsed() <= DEFAULT_MAX_PAUSE,
            "{name}: {value} waited {:?}",
            t.elapsed()
        );
    }
}

/// Hostile `X-RateLimit-Reset` values with `Remaining: 0` (seconds, epoch, garbage, negative,
/// huge): no panic, waits capped.
#[tokio::test(start_paused = true)]
async fn hostile_reset_values_are_capped() {
    for reset in [
        "99999999999999999999",
        "-1",
        "garbage",
        "1e12",
        "99999999999",
        "0",
        "",
        "4294967296",
        "18446744073709551615",
    ] {
        let api = Api::new(move |n, _| {
            if n == 0 {
                Act::Status(
                    200,
                    vec![
                        ("x-ratelimit-remaining", "0".to_owned()),
                        ("x-ratelimit-reset", reset.to_owned()),
                    ],
                )
            } else {
                st(200)
            }
        });
        let (svc, handle) = limited(
            &api,
            RateLimitLayer::adaptive_only().with_max_wait(secs(3600)),
        );
        assert_eq!(
            bounded(svc.clone().oneshot(get(&url("/p"))))
                .await
                .unwrap()
                .status(),
            200
        );
        let pause = handle.pause(KEY).unwrap_or_default();
        assert!(pause <= DEFAULT_MAX_PAUSE, "reset {reset:?}: {pause:?}");
        let t = Instant::now();
        assert_eq!(
            bounded(svc.clone().oneshot(get(&url("/n"))))
                .await
                .unwrap()
                .status(),
            200
        );
        assert!(
            t.elapsed() <= DEFAULT_MAX_PAUSE,
            "reset {reset:?}: {:?}",
            t.elapsed()
        );
    }
}

/// "It may sit over or under tower's `Buffer`, `ConcurrencyLimit` ... and be driven by ... a
/// kept service": kept services over `ConcurrencyLimit(1)` and under `Buffer`, through a pause.
#[tokio::test(start_paused = true)]
async fn kept_services_over_concurrency_limit_one_and_under_buffer_through_a_pause() {
    for over_limit in [true, false] {
        let api = Api::new(|n, _| {
            if n == 0 {
                st_h(429, &[("retry-after", "1")])
            } else {
                Act::After(ms(10), 200)
            }
        });
        let layer = RateLimitLayer::adaptive_only();
        let svc = if over_limit {
            tower::util::BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(layer)
                    .concurrency_limit(1)
                    .service(api.service()),
            )
        } else {
            tower::util::BoxCloneService::new(
                ServiceBuilder::new()
                    .buffer(2)
                    .layer(layer)
                    .service(api.service()),
            )
        };
        let mut first = svc.clone();
        let res = first
            .ready()
            .await
            .unwrap()
            .call(get(&url("/p")))
            .await
            .unwrap();
        assert_eq!(res.status(), 429);
        let mut tasks = Vec::new();
        for i in 0..5 {
            let mut s = svc.clone();
            tasks.push(tokio::spawn(async move {
                s.ready().await?.call(get(&url(&format!("/k{i}")))).await
            }));
        }
        for t in tasks {
            let res = bounded(t).await.unwrap().unwrap();
            assert_eq!(res.status(), 200, "over_limit={over_limit}");
        }
        assert_eq!(api.calls(), 6);
    }
}

/// A remote store that answers with absurd waits (a store is a peer too: "every value learned
/// from a peer is capped").
#[derive(Debug)]
struct AbsurdStore(Reserve);

impl RemoteQuota for AbsurdStore {
    fn reserve(&self, _key: &str, _max_wait: Duration) -> RFuture<Result<Reserve, BoxError>> {
        let r = self.0;
        Box::pin(async move { Ok(r) })
    }
}

/// A grant past the call's `max_wait` (a store that breaks `reserve`'s contract, "no more than
/// `max_wait` from now", or `Duration::MAX`), or a refusal with `Duration::MAX`, neither panics
/// nor holds the call past its `max_wait`: `with_max_wait` is "The longest a call waits for its
/// turn (a slot, the end of a pause) [30 s]; a call that would wait longer fails at once with
/// `RateLimited`".
#[tokio::test(start_paused = true)]
async fn absurd_remote_answers_do_not_panic_or_hold_a_call_past_max_wait() {
    let mut failures = Vec::new();
    for answer in [
        Reserve::Denied {
            retry_after: Duration::MAX,
        },
        Reserve::Granted { wait: secs(600) },
        Reserve::Granted {
            wait: secs(u64::MAX / 2),
        },
        Reserve::Granted {
            wait: Duration::MAX,
        },
    ] {
        let api = Api::always(st(200));
        let layer = RateLimitLayer::new(Quota::per_second(10).unwrap())
            .with_max_wait(secs(30))
            .with_remote(Arc::new(AbsurdStore(answer)));
        let svc = layer.layer(api.service());
        let t = Instant::now();
        let out = tokio::spawn(svc.oneshot(get(&url("/a"))));
        match tokio::time::timeout(secs(3600), out).await {
            Err(_) => failures.push(format!("{answer:?}: still waiting after an hour")),
            Ok(Err(e)) => failures.push(format!("{answer:?}: panicked: {e}")),
            Ok(Ok(out)) => {
                if t.elapsed() > secs(30) {
                    failures.push(format!("{answer:?}: held {:?}", t.elapsed()));
                }
                if let Err(e) = out {
                    if find::<RateLimited>(&*e).is_none() {
                        failures.push(format!("{answer:?}: {}", chain(&*e)));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
