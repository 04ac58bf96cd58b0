//! Outside tests of the pace a rate limiter learns from bare 429s (docs/guides/ratelimit.md,
//! "A pace learned from bare 429s"), on paused time against in-process services.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy::core::RateLimited;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::util::{BoxCloneService, BoxCloneSyncService};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

type Api = BoxCloneSyncService<Request<()>, Response<()>, Infallible>;

/// What the API saw: (ms since start, host).
type Log = Arc<Mutex<Vec<(u128, String)>>>;

/// An in-process API whose n-th call (from 0) answers `answer(n)`, after `latency`.
fn api(
    t0: Instant,
    latency: Duration,
    answer: impl Fn(usize) -> Response<()> + Send + Sync + 'static,
) -> (Api, Log) {
    let log: Log = Arc::default();
    let n = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let l = log.clone();
    let svc = tower::service_fn(move |req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let host = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        l.lock().unwrap().push((t0.elapsed().as_millis(), host));
        let res = answer(i);
        async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            Ok::<_, Infallible>(res)
        }
    });
    (BoxCloneSyncService::new(svc), log)
}

fn status(s: u16) -> Response<()> {
    Response::builder().status(s).body(()).unwrap()
}

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

fn times(log: &Log, host: &str) -> Vec<u128> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(_, h)| h == host)
        .map(|(t, _)| *t)
        .collect()
}

fn gaps(t: &[u128]) -> Vec<u128> {
    t.windows(2).map(|w| w[1] - w[0]).collect()
}

/// "the first bare 429 of a pause sets a pace of one call per eighth of the pause (125 ms after
/// the default 1 s pause)"; "from then on every call of the key takes its slot at that pace".
#[tokio::test(start_paused = true)]
async fn first_bare_429_pauses_1s_then_paces_125ms() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    let res = svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(handle.pause("a.test"), Some(Duration::from_secs(1)));

    // Sequential calls, one after the other's answer.
    for _ in 0..3 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    // Calls at once, waiting in line.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move { s.oneshot(get("a.test")).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    let t = times(&log, "a.test");
    assert_eq!(t[0], 0);
    assert_eq!(
        t[1], 1000,
        "the first call after the pause leaves when it ends: {t:?}"
    );
    assert_eq!(t[2], 1125, "then one call per 125 ms: {t:?}");
    // Each success makes the pace a sixteenth faster: 125, ~118, ~110, ...
    let g = gaps(&t[1..]);
    for w in g.windows(2) {
        let ratio = w[1] as f64 / w[0] as f64;
        assert!(
            (0.92..=0.96).contains(&ratio),
            "a sixteenth faster per success: {t:?}"
        );
    }
}

/// "a bare 429 to a call sent at that pace halves the rate and pauses the key for one interval of
/// the new pace only"; "every other answer ... makes the pace a sixteenth faster".
#[tokio::test(start_paused = true)]
async fn bare_429_at_the_pace_halves_it_and_pauses_one_interval() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n <= 1 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap(); // t=0: 429, pause 1 s, pace 125 ms
    let res = svc.clone().oneshot(get("a.test")).await.unwrap(); // t=1 s: 429 at the pace
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(t0.elapsed(), Duration::from_secs(1));
    assert_eq!(
        handle.pause("a.test"),
        Some(Duration::from_millis(250)),
        "one interval of the halved pace"
    );
    for _ in 0..3 {
        assert_eq!(
            svc.clone().oneshot(get("a.test")).await.unwrap().status(),
            StatusCode::OK
        );
    }
    let t = times(&log, "a.test");
    assert_eq!(t[..3], [0, 1000, 1250], "{t:?}");
    let g = gaps(&t[2..]);
    // 250 ms (the slot taken with the halved pace), then a sixteenth faster per success.
    assert_eq!(g[0], 250, "{t:?}");
    assert!((230..=240).contains(&g[1]), "{t:?}");
}

/// Three calls in flight (each takes 10 ms) all get a bare 429, at 10, 11 and 12 ms.
async fn three_in_flight_429s() -> (
    Instant,
    Log,
    sturdy::ratelimit::RateLimitHandle,
    BoxCloneSyncService<Request<()>, Response<()>, tower::BoxError>,
) {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::from_millis(10), |n| {
        status(if n <= 2 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i)).await;
            s.oneshot(get("a.test")).await
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap().unwrap().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    let boxed = BoxCloneSyncService::new(svc);
    (t0, log, handle, boxed)
}

/// "answers to calls that were in flight when a pause began change nothing": the pace stays one
/// call per 125 ms (not halved by the other two 429s).
#[tokio::test(start_paused = true)]
async fn answers_of_calls_in_flight_do_not_halve_the_pace() {
    let (_t0, log, _handle, svc) = three_in_flight_429s().await;
    svc.clone().oneshot(get("a.test")).await.unwrap();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let t = times(&log, "a.test");
    assert!((1010..=1012).contains(&t[3]), "{t:?}");
    assert_eq!(t[4] - t[3], 125, "{t:?}");
}

/// "bare 429s that answer calls in flight when a pause began change nothing" (ratelimit.md): the
/// first bare 429 arrived at 10 ms and paused the key until 1010 ms; the answers of the two calls
/// that were in flight when that pause began (at 11 and 12 ms) leave its end there. (They moved
/// it to 1012 ms.)
#[tokio::test(start_paused = true)]
async fn answers_of_calls_in_flight_do_not_move_the_pause() {
    let (t0, log, handle, svc) = three_in_flight_429s().await;
    let left = handle.pause("a.test").unwrap();
    assert_eq!(t0.elapsed() + left, Duration::from_millis(1010), "{left:?}");
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(times(&log, "a.test")[3], 1010);
}

/// "under one call per millisecond it is forgotten, and the key runs free again".
#[tokio::test(start_paused = true)]
async fn the_pace_is_forgotten_after_enough_successes() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let svc = RateLimitLayer::adaptive_only().layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    for _ in 0..150 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let t = times(&log, "a.test");
    let g = gaps(&t[1..]);
    for w in g.windows(2) {
        assert!(
            w[1] <= w[0],
            "the pace only gets faster on successes: {g:?}"
        );
    }
    // ln(125)/ln(17/16) is about 80 successes.
    let free_from = g.iter().position(|&x| x == 0).expect("forgotten");
    assert!((70..=95).contains(&free_from), "{free_from}: {g:?}");
    // Then 20 calls at once all leave at once.
    let now = t0.elapsed().as_millis();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move { s.oneshot(get("a.test")).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let t = times(&log, "a.test");
    assert!(t[t.len() - 20..].iter().all(|&x| x == now), "{t:?}");
}

/// "`handle.clear_pause(key)` forgets it too."
#[tokio::test(start_paused = true)]
async fn clear_pause_forgets_the_pace() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(handle.clear_pause("a.test"), Some(Duration::from_secs(1)));
    assert_eq!(handle.pause("a.test"), None);
    for _ in 0..5 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(times(&log, "a.test"), vec![0; 6]);
}

/// "A 429 or 503 that says how long to wait (`Retry-After`, `RateLimit`, `X-RateLimit-*`) sets a
/// pause, not a pace: the server said when."
#[tokio::test(start_paused = true)]
async fn a_429_with_a_wait_header_sets_a_pause_not_a_pace() {
    for (code, name, value) in [
        (429, "retry-after", "1"),
        (503, "retry-after", "1"),
        (429, "ratelimit", "\"default\";r=0;t=1"),
        (429, "x-ratelimit-remaining", "0"),
    ] {
        let t0 = Instant::now();
        let (api, log) = api(t0, Duration::ZERO, move |n| {
            let mut b = Response::builder().status(if n == 0 { code } else { 200 });
            if n == 0 {
                b = b.header(name, value);
                if name == "x-ratelimit-remaining" {
                    b = b.header("x-ratelimit-reset", "1");
                }
            }
            b.body(()).unwrap()
        });
        let (layer, handle) = RateLimitLayer::adaptive_only().pair();
        let svc = layer.layer(api);
        svc.clone().oneshot(get("a.test")).await.unwrap();
        assert_eq!(
            handle.pause("a.test"),
            Some(Duration::from_secs(1)),
            "{name}"
        );
        for _ in 0..5 {
            svc.clone().oneshot(get("a.test")).await.unwrap();
        }
        assert_eq!(
            times(&log, "a.test"),
            vec![0, 1000, 1000, 1000, 1000, 1000],
            "{code} {name}: {value}"
        );
    }
}

/// A pace is per key: "a key also learns a pace from bare 429s".
#[tokio::test(start_paused = true)]
async fn a_pace_is_per_key() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let svc = RateLimitLayer::adaptive_only().layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    for _ in 0..5 {
        svc.clone().oneshot(get("b.test")).await.unwrap();
        svc.clone().oneshot(get("a.test:8443")).await.unwrap();
    }
    assert_eq!(times(&log, "b.test"), vec![0; 5]);
    // "a.test:8443" is another key than "a.test" (the authority as written).
    assert_eq!(times(&log, "a.test:8443"), vec![0; 5]);
    assert_eq!(times(&log, "a.test"), vec![0]);
}

/// "without a quota (...) a key also learns a pace": with a quota of our own, a bare 429 pauses
/// 1 s and then the quota paces the calls, not 125 ms.
#[tokio::test(start_paused = true)]
async fn with_a_quota_no_pace_is_learned() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1000).unwrap()).pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(handle.pause("a.test"), Some(Duration::from_secs(1)));
    for _ in 0..5 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let t = times(&log, "a.test");
    assert_eq!(t[1], 1000, "{t:?}");
    assert!(gaps(&t[1..]).iter().all(|&g| g <= 1), "{t:?}");
}

/// `with_release_pace` spaces the calls released after a pause; the guide says that without a
/// quota a key learns a pace from bare 429s, so the release pace does not turn learning off.
/// Here: what the later, sequential calls see.
#[tokio::test(start_paused = true)]
async fn with_a_release_pace_sequential_calls_after_the_pause() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let svc = RateLimitLayer::adaptive_only()
        .with_release_pace(Duration::from_millis(10))
        .layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    for _ in 0..3 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let t = times(&log, "a.test");
    assert_eq!(t[1], 1000, "{t:?}");
    // Either the learned pace (about 125 ms) or none; never something in between.
    let g = gaps(&t[1..]);
    assert!(
        g.iter().all(|&x| x == 0) || g.iter().all(|&x| (100..=125).contains(&x)),
        "{g:?}"
    );
}

/// `with_default_pause(d)`: the pace is an eighth of the pause ("one call per eighth of the
/// pause").
#[tokio::test(start_paused = true)]
async fn the_pace_is_an_eighth_of_a_custom_default_pause() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let svc = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::from_millis(800))
        .layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(times(&log, "a.test")[..3], [0, 800, 900]);
}

/// A zero default pause: a bare 429 pauses nothing, and no pace under 1 ms is kept.
#[tokio::test(start_paused = true)]
async fn a_zero_default_pause_learns_nothing() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::ZERO)
        .pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(handle.pause("a.test"), None);
    for _ in 0..3 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(times(&log, "a.test"), vec![0; 4]);
}

/// A server that answers every call with a bare 429, forever. "Every pause learned from a
/// response is at most `max_pause`: 5 minutes by default" and "a bogus value ... costs at most
/// five minutes": the wait between two calls (pause or pace) must stay within the 5 minute cap,
/// and no pause reads longer than it.
#[tokio::test(start_paused = true)]
async fn bare_429_forever_never_spaces_calls_more_than_max_pause() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |_| status(429));
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(3600))
        .pair();
    let svc = layer.layer(api);
    for _ in 0..30 {
        let res = tokio::time::timeout(
            Duration::from_secs(3 * 3600),
            svc.clone().oneshot(get("a.test")),
        )
        .await
        .expect("bounded")
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        let p = handle.pause("a.test").unwrap_or_default();
        assert!(p <= Duration::from_secs(300), "pause {p:?}");
    }
    let g = gaps(&times(&log, "a.test"));
    let worst = g.iter().max().copied().unwrap();
    assert!(
        worst <= 300_000,
        "a wait of {worst} ms between calls: {g:?}"
    );
}

/// The same server, with the default `max_wait` (30 s): every call is answered (the 429 comes
/// back as it is) within the default pause, and 60 calls take about a minute.
#[tokio::test(start_paused = true)]
async fn bare_429_forever_each_call_ends_within_a_pause() {
    let t0 = Instant::now();
    let (api, _log) = api(t0, Duration::ZERO, |_| status(429));
    let svc = RateLimitLayer::adaptive_only().layer(api);
    for _ in 0..60 {
        let asked = Instant::now();
        match svc.clone().oneshot(get("a.test")).await {
            Ok(res) => assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS),
            Err(e) => {
                let rl = sturdy::core::find::<RateLimited>(&*e).expect("RateLimited");
                assert!(rl.retry_after() <= Duration::from_secs(300), "{e}");
            }
        }
        assert!(asked.elapsed() <= Duration::from_secs(1));
    }
    assert!(
        t0.elapsed() <= Duration::from_secs(61),
        "{:?}",
        t0.elapsed()
    );
}

/// "a bare 429 to a call sent at that pace halves the rate, down to one call per pause"
/// (ratelimit.md, RELIABILITY.md): against a server that answers every call with a bare 429, the
/// calls are 1 s, 250 ms, 500 ms, 1 s, 1 s... apart. (The floor was not in the docs.)
#[tokio::test(start_paused = true)]
async fn every_bare_429_at_the_pace_halves_it_down_to_one_call_per_pause() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |_| status(429));
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(3600))
        .layer(api);
    for _ in 0..6 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let g = gaps(&times(&log, "a.test"));
    assert_eq!(g, vec![1000, 250, 500, 1000, 1000], "{g:?}");
}

/// Alternating 429 and 200: the pace settles (halved per 429, a sixteenth faster per 200), and
/// the calls keep going at a bounded pace.
#[tokio::test(start_paused = true)]
async fn alternating_429_and_200_stays_bounded() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n % 2 == 0 { 429 } else { 200 })
    });
    let svc = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(3600))
        .layer(api);
    for _ in 0..40 {
        tokio::time::timeout(
            Duration::from_secs(3600),
            svc.clone().oneshot(get("a.test")),
        )
        .await
        .expect("bounded")
        .unwrap();
    }
    let g = gaps(&times(&log, "a.test"));
    let worst = g.iter().max().copied().unwrap();
    assert!(worst <= 300_000, "{g:?}");
}

/// Bare 503s are not bare 429s by default: the guide's pace is learned "from bare 429s".
#[tokio::test(start_paused = true)]
async fn bare_503s_teach_no_pace() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 503 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(handle.pause("a.test"), None, "a 503 without Retry-After");
    for _ in 0..3 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(times(&log, "a.test"), vec![0; 4]);
}

/// With `with_bare_503_pauses(true)` (nginx's `limit_req` refuses with 503 by default), a bare 503
/// is read as a bare 429: it pauses the key for the default second and teaches it a pace.
#[tokio::test(start_paused = true)]
async fn bare_503s_teach_a_pace_like_bare_429s() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 503 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_bare_503_pauses(true)
        .pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(
        handle.pause("a.test"),
        Some(Duration::from_secs(1)),
        "a 503 without Retry-After"
    );
    assert_eq!(
        handle.learned_pace("a.test"),
        Some(Duration::from_millis(125))
    );
    for _ in 0..3 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let at = times(&log, "a.test");
    assert_eq!(at[0], 0);
    assert!(
        at[1] >= 1_000,
        "the next call waits out the pause, then the pace (ms): {at:?}"
    );
}

/// Thousands of keys each learning a pace: a call of a fresh key past the bound still goes, and
/// the handle never reports a pause longer than asked.
#[tokio::test(start_paused = true)]
async fn thousands_of_keys_learning_a_pace() {
    let t0 = Instant::now();
    let (api, _log) = api(t0, Duration::ZERO, |_| status(429));
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    for i in 0..3000 {
        let res = svc.clone().oneshot(get(&format!("h{i}.test"))).await;
        // Past 1,024 keys, new keys share the overflow limiter: it may refuse or make wait.
        match res {
            Ok(r) => assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS),
            Err(e) => assert!(sturdy::core::find::<RateLimited>(&*e).is_some(), "{e}"),
        }
    }
    assert!(
        t0.elapsed() <= Duration::from_secs(31),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        handle.paused().len() <= 1025 + 1,
        "{}",
        handle.paused().len()
    );
    for (_, d) in handle.paused() {
        assert!(d <= Duration::from_secs(1));
    }
}

/// "A waiting call reserves nothing. If it is dropped (...), it leaves the line": under a learned
/// pace, 100 aborted waiters cost the next caller nothing.
#[tokio::test(start_paused = true)]
async fn aborted_waiters_under_a_pace_leave_no_debt() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    // The pause ends at 1 s; one call goes then.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    svc.clone().oneshot(get("a.test")).await.unwrap();
    // 100 callers queue at the pace, then are aborted; 100 more are dropped mid-wait.
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move { s.oneshot(get("a.test")).await }));
    }
    let mut futs: Vec<_> = (0..100)
        .map(|_| Box::pin(svc.clone().oneshot(get("a.test"))))
        .collect();
    for f in &mut futs {
        assert!(futures_util::FutureExt::now_or_never(f.as_mut()).is_none());
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        handle.waiting("a.test") >= 100,
        "{}",
        handle.waiting("a.test")
    );
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(futs);
    assert_eq!(handle.waiting("a.test"), 0);
    let asked = t0.elapsed();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let waited = t0.elapsed() - asked;
    assert!(waited <= Duration::from_millis(125), "{waited:?}");
    // The API saw none of the aborted calls.
    assert_eq!(times(&log, "a.test").len(), 3);
}

/// Dropping a waiter while it waits for the pause (not the pace) costs nothing either.
#[tokio::test(start_paused = true)]
async fn dropped_waiters_during_the_pause_leave_no_debt() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::ZERO, |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let svc = RateLimitLayer::adaptive_only().layer(api);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    for _ in 0..50 {
        let _ = tokio::time::timeout(Duration::from_millis(5), svc.clone().oneshot(get("a.test")))
            .await;
    }
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(times(&log, "a.test"), vec![0, 1000]);
}

/// Under tower's Buffer(1), a kept service driven by `ready().await?.call(req)` from several
/// tasks with a learned pace in effect: no deadlock, the pace holds.
#[tokio::test(start_paused = true)]
async fn buffer_over_ratelimit_with_a_learned_pace_does_not_deadlock() {
    let t0 = Instant::now();
    let (api, log) = api(t0, Duration::from_millis(1), |n| {
        status(if n == 0 { 429 } else { 200 })
    });
    let svc = ServiceBuilder::new()
        .buffer(1)
        .layer(RateLimitLayer::adaptive_only())
        .service(api);
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 2)).await;
            for _ in 0..3 {
                let r = s.ready().await?.call(get("a.test")).await?;
                let _ = r;
            }
            Ok::<_, tower::BoxError>(())
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no deadlock")
            .unwrap()
            .unwrap();
    }
    let t = times(&log, "a.test");
    assert_eq!(t.len(), 24);
    // After the first 429: paced from 125 ms, a sixteenth faster per success.
    assert_eq!(t[2] - t[1], 125, "{t:?}");
    for w in gaps(&t[1..]).windows(2) {
        assert!(w[1] <= w[0] && w[1] * 17 >= w[0] * 15, "{t:?}");
    }
}

/// RateLimit over ConcurrencyLimit(1) and under it, kept services, a learned pace: no deadlock.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_1_around_a_learned_pace_does_not_deadlock() {
    for over in [false, true] {
        let t0 = Instant::now();
        let (api, log) = api(t0, Duration::from_millis(3), |n| {
            status(if n == 0 { 429 } else { 200 })
        });
        let svc: BoxCloneService<Request<()>, Response<()>, tower::BoxError> = if over {
            BoxCloneService::new(
                ServiceBuilder::new()
                    .concurrency_limit(1)
                    .layer(RateLimitLayer::adaptive_only())
                    .service(api)
                    .map_err(Into::into),
            )
        } else {
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(RateLimitLayer::adaptive_only())
                    .concurrency_limit(1)
                    .service(api)
                    .map_err(Into::into),
            )
        };
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let mut s = svc.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..3 {
                    s.ready().await?.call(get("a.test")).await?;
                }
                Ok::<_, tower::BoxError>(())
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("no deadlock")
                .unwrap()
                .unwrap();
        }
        assert_eq!(times(&log, "a.test").len(), 18, "over: {over}");
    }
}
