//! Round s42, outside tests of `sturdy::ratelimit` against docs/guides/ratelimit.md and the
//! rustdoc of `sturdy_ratelimit`, on paused time: hostile `Retry-After` values (0, negative,
//! 20 digits, year 9999, a date in the past, 100 KiB, several lines), `RateLimit` and
//! `X-RateLimit-*` resets, the pause cap and `PauseCapped`, `max_wait` refusals, waiters aborted
//! in line giving their places back, a kept service over and under tower's `Buffer` and over
//! `ConcurrencyLimit`, the bound on keys, quotas' timing, what refusals say, `Send`/`Sync`.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use http::{Request, Response, StatusCode};
use sturdy::core::clock::ManualClock;
use sturdy::core::RateLimited;
use sturdy::ratelimit::{PauseCapped, Quota, RateLimitLayer, DEFAULT_MAX_PAUSE};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Req = Request<()>;
type Res = Response<()>;

const HOST: &str = "api.example.com";
/// 2019-06-03T11:00:00Z, the urllib3 vector's `now`.
const NOW: u64 = 1_559_559_600;

fn get(host: &str) -> Req {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

/// What the server answers next: a status and headers (every call answers the current one).
#[derive(Clone, Default)]
struct Script(Arc<Mutex<(u16, Vec<(String, Vec<u8>)>)>>);

impl Script {
    fn set(&self, status: u16, headers: &[(&str, &[u8])]) {
        *self.0.lock().unwrap() = (
            status,
            headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.to_vec()))
                .collect(),
        );
    }
    fn service(
        &self,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        Req,
        Response = Res,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Res, Infallible>> + Send,
    > + Clone {
        let script = self.clone();
        service_fn(move |_req: Req| {
            calls.fetch_add(1, Ordering::SeqCst);
            let (status, headers) = script.0.lock().unwrap().clone();
            let mut b = Response::builder().status(if status == 0 { 200 } else { status });
            for (k, v) in headers {
                b = b.header(k, v);
            }
            let res = b.body(()).unwrap();
            async move { Ok::<_, Infallible>(res) }
        })
    }
}

/// A header pair from text.
fn h(k: &'static str, v: &'static str) -> (&'static str, &'static [u8]) {
    (k, v.as_bytes())
}

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(UNIX_EPOCH + Duration::from_secs(NOW)))
}

/// One response with `headers` on `status` through an adaptive-only layer: the pause the key
/// then has, and the `PauseCapped` the response carried.
async fn pause_after(
    status: u16,
    headers: &[(&str, &[u8])],
) -> (Option<Duration>, Option<PauseCapped>) {
    let script = Script::default();
    script.set(status, headers);
    let (layer, handle) = RateLimitLayer::adaptive_only().with_clock(clock()).pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(res.status().as_u16(), status, "returned as it came");
    let capped = res.extensions().get::<PauseCapped>().cloned();
    (handle.pause(HOST), capped)
}

/// Honest values are kept as sent; absurd ones are stored as the 5-minute cap with a
/// `PauseCapped` saying what was asked, what was applied and which header.
#[tokio::test(start_paused = true)]
async fn s42_retry_after_values_and_the_cap() {
    let cap = DEFAULT_MAX_PAUSE;
    assert_eq!(cap, Duration::from_secs(300));
    let secs = Duration::from_secs;
    let cases: Vec<(u16, Vec<(&str, &[u8])>, Duration)> = vec![
        (429, vec![h("retry-after", "120")], secs(120)),
        (503, vec![h("retry-after", "7")], secs(7)),
        (429, vec![h("retry-after", "300")], secs(300)),
        (429, vec![h("retry-after", "99999999999999999999")], cap),
        (
            429,
            vec![h("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
            cap,
        ),
        // An hour after the clock, in the three formats a recipient must accept.
        (
            429,
            vec![h("retry-after", "Mon, 03 Jun 2019 11:30:12 GMT")],
            secs(1812),
        ),
        (
            429,
            vec![h("retry-after", "Monday, 03-Jun-19 11:30:12 GMT")],
            secs(1812),
        ),
        (
            429,
            vec![h("retry-after", "Mon Jun  3 11:30:12 2019")],
            secs(1812),
        ),
        (
            429,
            vec![h("retry-after", "Mon, 03 Jun 2019 11:02:00 GMT")],
            secs(120),
        ),
        (200, vec![h("ratelimit", "\"default\";r=0;t=50")], secs(50)),
        (
            200,
            vec![h("ratelimit", "\"default\";r=0;t=99999999999")],
            cap,
        ),
        (
            200,
            vec![
                h("x-ratelimit-remaining", "0"),
                h("x-ratelimit-reset", "99999999999"),
            ],
            cap,
        ),
    ];
    for (status, headers, want) in cases {
        let (pause, capped) = pause_after(status, &headers).await;
        let raw = want;
        let want = want.min(cap);
        assert_eq!(pause, Some(want), "{status} {headers:?}");
        if want == cap && headers.iter().all(|(_, v)| *v != b"300".as_slice()) {
            let c = capped.unwrap_or_else(|| panic!("{headers:?}: no PauseCapped"));
            assert_eq!(c.applied(), cap);
            assert!(c.asked() > cap, "{headers:?}: asked {:?}", c.asked());
            if raw > cap && raw < Duration::from_secs(10_000) {
                assert_eq!(c.asked(), raw, "{headers:?}");
            }
        } else if want < cap {
            assert!(capped.is_none(), "{headers:?}");
        }
    }
}

/// Values that ask for no wait: `Retry-After: 0`, a date in the past or equal to now; a
/// `RateLimit` with quota left; malformed `RateLimit` fields (ignored, as the draft says) on a
/// 200. None of them pauses for longer than the default bare-429 pause, and on a 200 none
/// pauses at all.
#[tokio::test(start_paused = true)]
async fn s42_retry_after_that_asks_for_no_wait() {
    for v in [
        "0",
        "Fri, 31 Dec 1999 23:59:59 GMT",
        "Mon, 03 Jun 2019 11:00:00 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
    ] {
        let (pause, capped) = pause_after(429, &[("retry-after", v.as_bytes())]).await;
        assert!(
            pause.unwrap_or_default() <= Duration::from_secs(1),
            "{v}: {pause:?}"
        );
        assert!(capped.is_none());
    }
    for v in [
        "\"default\";r=5;t=50",
        "\"default\";r=-1;t=50",
        "\"default\";r=0;t=-5",
        "\"default\";r=0;t=5.5",
        "default;r=0;t=50",
        "\"default\";r=0;t=\"50\"",
        "\"default\";r=0;t=50,,",
        "(((",
    ] {
        let (pause, _) = pause_after(200, &[("ratelimit", v.as_bytes())]).await;
        assert_eq!(pause, None, "{v}");
    }
}

/// Malformed `Retry-After` on a 429 (negative, a sign, a fraction, 100 KiB of digits or of
/// junk, bytes outside ASCII): never a panic, never more than the cap; and a 429 whose only
/// wait header is unreadable is at least paused like a bare 429.
#[tokio::test(start_paused = true)]
async fn s42_hostile_retry_after_values() {
    let huge_digits = vec![b'9'; 100 * 1024];
    let huge_junk = vec![b'x'; 100 * 1024];
    let mut values: Vec<&[u8]> = [
        "-1",
        "-99999999999999999999",
        "+1",
        "1.5",
        "1e9",
        " 42 ",
        "0x10",
        "Fri, 31 Dec 9999 23:59:59 GMT, 5",
        "Sun, 31 Feb 2019 11:30:12 GMT",
        "Mon, 03 Jun 2019 25:61:61 GMT",
    ]
    .iter()
    .map(|v| v.as_bytes())
    .collect();
    values.push(&[0xb2]);
    values.push(&huge_digits);
    values.push(&huge_junk);
    for v in values {
        // CPU time spent parsing, which the paused clock does not see.
        #[allow(clippy::disallowed_methods)]
        let started = std::time::Instant::now();
        let (pause, _) = pause_after(429, &[("retry-after", v)]).await;
        let shown = String::from_utf8_lossy(&v[..v.len().min(40)]).into_owned();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{shown}: parsing took {:?}",
            started.elapsed()
        );
        let p = pause.unwrap_or_else(|| panic!("{shown}: a 429 did not pause"));
        assert!(p <= DEFAULT_MAX_PAUSE, "{shown}: {p:?}");
    }
}

/// Several `Retry-After` lines, and 1,000 of them: no panic, at most the cap, paused.
#[tokio::test(start_paused = true)]
async fn s42_many_retry_after_lines() {
    let (pause, _) = pause_after(429, &[h("retry-after", "5"), h("retry-after", "10")]).await;
    let p = pause.expect("paused");
    assert!(
        p >= Duration::from_secs(5) && p <= Duration::from_secs(10),
        "{p:?}"
    );
    let many: Vec<(&str, &[u8])> = (0..1_000)
        .map(|i| {
            (
                "retry-after",
                if i % 2 == 0 {
                    "99999999999999999999".as_bytes()
                } else {
                    "junk".as_bytes()
                },
            )
        })
        .collect();
    // CPU time spent parsing, which the paused clock does not see.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let (pause, _) = pause_after(429, &many).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(pause.expect("paused") <= DEFAULT_MAX_PAUSE);
}

/// `with_max_pause(ZERO)` turns pauses off; a smaller cap is applied to what the header asks.
#[tokio::test(start_paused = true)]
async fn s42_max_pause_setting() {
    for (cap, want) in [
        (Duration::ZERO, None),
        (Duration::from_secs(30), Some(Duration::from_secs(30))),
    ] {
        let script = Script::default();
        script.set(429, &[h("retry-after", "120")]);
        let (layer, handle) = RateLimitLayer::adaptive_only().with_max_pause(cap).pair();
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(script.service(Arc::new(AtomicUsize::new(0))));
        let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            handle.pause(HOST).filter(|d| !d.is_zero()),
            want,
            "cap {cap:?}"
        );
    }
}

/// After a capped pause, a later caller waits at most the cap (with a `max_wait` above it) and
/// then reaches the server; with the default 30 s `max_wait` it is refused at once with a
/// `RateLimited` carrying the wait, naming the host, and the server is not called.
#[tokio::test(start_paused = true)]
async fn s42_later_callers_wait_at_most_the_cap() {
    let script = Script::default();
    script.set(429, &[h("retry-after", "99999999999999999999")]);
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let patient = layer.clone().with_max_wait(Duration::from_secs(400));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(script.service(calls.clone()));
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(handle.pause(HOST), Some(DEFAULT_MAX_PAUSE));
    script.set(200, &[]);

    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), DEFAULT_MAX_PAUSE);
    assert!(err.to_string().contains(HOST), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let mut patient = ServiceBuilder::new()
        .layer(patient)
        .service(script.service(calls.clone()));
    let start = Instant::now();
    let res = patient
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), DEFAULT_MAX_PAUSE);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A later, shorter reset never cuts a pause short.
#[tokio::test(start_paused = true)]
async fn s42_shorter_reset_does_not_cut_a_pause() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let (inner, mut mock) = tower_test::mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    let (_, send_a) = mock.next_request().await.unwrap();
    let (_, send_b) = mock.next_request().await.unwrap();
    send_b.send_response(
        Response::builder()
            .header("ratelimit", "\"p\";r=0;t=60")
            .body(())
            .unwrap(),
    );
    assert_ready!(b.poll()).unwrap();
    assert_eq!(handle.pause(HOST), Some(Duration::from_secs(60)));
    // The answer to a call sent before the pause, with a shorter reset.
    send_a.send_response(
        Response::builder()
            .status(429)
            .header("retry-after", "5")
            .body(())
            .unwrap(),
    );
    assert_eq!(assert_ready!(a.poll()).unwrap().status(), 429);
    assert_eq!(handle.pause(HOST), Some(Duration::from_secs(60)));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(handle.pause(HOST), Some(Duration::from_secs(50)));
}

/// "100 callers aborted in line cost the next caller nothing (it waits one interval, not
/// 100)": quota 10/s burst 1; 100 waiters polled into line then dropped; `waiting` goes back to
/// 0 and the next caller goes one interval after the first call.
#[tokio::test(start_paused = true)]
async fn s42_aborted_waiters_give_their_places_back() {
    let script = Script::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(10).unwrap()).pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(script.service(calls.clone()));
    let start = Instant::now();
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let mut waiters: Vec<_> = (0..100)
        .map(|_| tokio_test::task::spawn(svc.clone().oneshot(get(HOST))))
        .collect();
    for w in &mut waiters {
        assert_pending!(w.poll());
    }
    assert_eq!(handle.waiting(HOST), 100);
    drop(waiters);
    assert_eq!(handle.waiting(HOST), 0);
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(100));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Aborted as spawned tasks, halfway through their wait.
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(svc.clone().oneshot(get(HOST))))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(handle.waiting(HOST), 50);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        assert!(t.await.unwrap_err().is_cancelled());
    }
    assert_eq!(handle.waiting(HOST), 0);
    let before = Instant::now();
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert!(
        before.elapsed() <= Duration::from_millis(100),
        "{:?}",
        before.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// A waiter dropped while the key is paused also leaves the line.
#[tokio::test(start_paused = true)]
async fn s42_aborted_waiter_in_a_pause_leaves_the_line() {
    let script = Script::default();
    script.set(429, &[h("retry-after", "10")]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    script.set(200, &[]);
    let mut w: Vec<_> = (0..10)
        .map(|_| tokio_test::task::spawn(svc.clone().oneshot(get(HOST))))
        .collect();
    for t in &mut w {
        assert_pending!(t.poll());
    }
    assert_eq!(handle.waiting(HOST), 10);
    w.truncate(1);
    assert_eq!(handle.waiting(HOST), 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    let res = assert_ready!(w[0].poll()).unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// Quotas on paused time: the guide's 10/s burst 5 (5 at once, then one every 100 ms), a
/// per-minute quota, and `max_wait` refusing at once a call whose turn is too far, counting the
/// calls ahead, with a `RateLimited` carrying the wait. Invalid quotas are errors.
#[tokio::test(start_paused = true)]
async fn s42_quota_timing() {
    assert!(Quota::per_second(0).is_err());
    assert!(Quota::new(1, Duration::ZERO).is_err());
    assert!(Quota::per_second(1).unwrap().with_burst(0).is_err());
    assert!(Quota::new(1, Duration::MAX).is_ok());
    assert!(Quota::per_second(u32::MAX)
        .unwrap()
        .with_burst(u32::MAX)
        .is_ok());

    let script = Script::default();
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            Quota::per_second(10).unwrap().with_burst(5).unwrap(),
        ))
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    let start = Instant::now();
    let mut at = Vec::new();
    for _ in 0..8 {
        svc.clone().oneshot(get(HOST)).await.unwrap();
        at.push(start.elapsed().as_millis());
    }
    assert_eq!(at, [0, 0, 0, 0, 0, 100, 200, 300]);

    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(Quota::per_minute(6).unwrap())
                .with_max_wait(Duration::from_secs(60)),
        )
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    let start = Instant::now();
    for _ in 0..4 {
        svc.clone().oneshot(get(HOST)).await.unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_secs(30));

    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(Quota::per_second(10).unwrap())
                .with_max_wait(Duration::from_millis(250)),
        )
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    let mut c = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let err = assert_ready!(c.poll()).unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_millis(300));
    // Zero max_wait: never waits.
    let svc0 = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO))
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    svc0.clone().oneshot(get(HOST)).await.unwrap();
    let mut d = tokio_test::task::spawn(svc0.clone().oneshot(get(HOST)));
    assert!(assert_ready!(d.poll()).unwrap_err().is::<RateLimited>());
}

/// The limiter as a kept service (`ready().await?.call(req)`) in several tasks, over and under
/// tower's `Buffer`: every call goes, spaced by the quota, nothing deadlocks.
#[tokio::test(start_paused = true)]
async fn s42_kept_service_over_and_under_buffer() {
    for order in 0..2 {
        let script = Script::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = RateLimitLayer::new(Quota::per_second(10).unwrap());
        let start = Instant::now();
        let mut tasks = Vec::new();
        if order == 0 {
            let svc = ServiceBuilder::new()
                .buffer(2)
                .layer(layer)
                .service(script.service(calls.clone()));
            for _ in 0..4 {
                let mut svc = svc.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..5 {
                        svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
                    }
                }));
            }
        } else {
            let svc = ServiceBuilder::new()
                .layer(layer)
                .buffer(2)
                .service(script.service(calls.clone()));
            for _ in 0..4 {
                let mut svc = svc.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..5 {
                        svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
                    }
                }));
            }
        }
        let all = futures_util::future::join_all(tasks);
        for t in tokio::time::timeout(Duration::from_secs(600), all)
            .await
            .unwrap_or_else(|_| panic!("order {order}: deadlocked"))
        {
            t.unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 20);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(1_900),
            "order {order}"
        );
    }
}

/// "over a concurrency limit of `n`, at most `n` calls wait in the line and the others wait for
/// a permit": 10 tasks over `ConcurrencyLimit(2)`, quota 1/s.
#[tokio::test(start_paused = true)]
async fn s42_over_concurrency_limit_at_most_n_wait_in_line() {
    let script = Script::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_secs(60))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(2)
        .service(script.service(calls.clone()));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
            })
        })
        .collect();
    let mut most = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        most = most.max(handle.waiting(HOST));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(most <= 2, "{most} calls waited in line over a limit of 2");
    assert_eq!(calls.load(Ordering::SeqCst), 10);
}

/// Per-host state is bounded: past `with_max_keys`, the keys share one overflow limiter, listed
/// as `*`; its refusal names it.
#[tokio::test(start_paused = true)]
async fn s42_keys_are_bounded() {
    let script = Script::default();
    script.set(429, &[h("retry-after", "60")]);
    let (layer, handle) = RateLimitLayer::adaptive_only().with_max_keys(4).pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer.with_max_wait(Duration::ZERO))
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    let mut refused = None;
    for i in 0..1_000 {
        let host = format!("h{i}.example.com");
        match svc.ready().await.unwrap().call(get(&host)).await {
            Ok(_) => {}
            Err(e) => {
                if refused.is_none() {
                    refused = Some(e.to_string());
                }
            }
        }
    }
    let paused = handle.paused();
    assert!(paused.len() <= 5, "{} keys paused", paused.len());
    if paused.iter().any(|(k, _)| k == "*") {
        let text = refused.expect("a call past the bound met the overflow pause");
        assert!(text.contains("overflow limiter"), "{text}");
    }
}

/// Refusals name the host, not the URI's userinfo or query, in `Display` and `Debug`; the
/// handle's keys carry no userinfo.
#[tokio::test(start_paused = true)]
async fn s42_refusals_hold_no_secrets() {
    let script = Script::default();
    script.set(429, &[h("retry-after", "60")]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    let uri = "https://bob:s3cr3t-s42@api.example.com:8443/pay?api_key=QUERYSECRET";
    let req = || Request::get(uri).body(()).unwrap();
    svc.ready().await.unwrap().call(req()).await.unwrap();
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(text.contains("api.example.com:8443"), "{text}");
        for secret in ["s3cr3t", "bob", "QUERYSECRET", "/pay"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    let keys: Vec<_> = handle.paused().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com:8443"]);
    assert!(handle.pause("api.example.com:8443").is_some());
}

/// The layer, its handle, the service and its future can be shared by many tasks.
#[test]
fn s42_ratelimit_types_are_send_and_sync() {
    fn both<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap()).pair();
    both(&layer);
    both(&handle);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(Script::default().service(Arc::new(AtomicUsize::new(0))));
    both(&svc);
    send(&svc.oneshot(get(HOST)));
    let _ = format!("{handle:?}");
}

fn res(status: u16, headers: &[(&str, &str)]) -> Res {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap()
}

/// "calls already waiting in line are told as soon as such a pause arrives": two calls wait
/// for quota slots when an answer asks for a pause longer than their `max_wait`; both fail at
/// once with `RateLimited`, without reaching the server.
#[tokio::test(start_paused = true)]
async fn s42_waiting_calls_are_told_when_a_long_pause_arrives() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_secs(5))
        .pair();
    let (inner, mut mock) = tower_test::mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(a.poll());
    let (_, send_a) = mock.next_request().await.unwrap();
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let mut c = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(b.poll());
    assert_pending!(c.poll());
    assert_eq!(handle.waiting(HOST), 2);
    send_a.send_response(res(429, &[("retry-after", "120")]));
    assert_eq!(assert_ready!(a.poll()).unwrap().status(), 429);
    tokio::task::yield_now().await;
    assert!(
        b.is_woken() || c.is_woken(),
        "the waiting calls were not woken"
    );
    for (name, t) in [("b", &mut b), ("c", &mut c)] {
        let err = assert_ready!(t.poll()).unwrap_err();
        let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
        assert!(
            limited.retry_after() >= Duration::from_secs(119),
            "{name}: {err}"
        );
    }
    assert_eq!(handle.waiting(HOST), 0);
}

/// A bare 429 pauses 1 s and teaches a pace of one call per eighth of it (125 ms); a bare 429
/// that answers a call sent before the pause changes nothing; `clear_pause` ends the pause now
/// and forgets the pace.
#[tokio::test(start_paused = true)]
async fn s42_bare_429_pause_and_pace() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let (inner, mut mock) = tower_test::mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    let (_, sa) = mock.next_request().await.unwrap();
    let (_, sb) = mock.next_request().await.unwrap();
    sa.send_response(res(429, &[]));
    assert_ready!(a.poll()).unwrap();
    assert_eq!(handle.pause(HOST), Some(Duration::from_secs(1)));
    assert_eq!(handle.learned_pace(HOST), Some(Duration::from_millis(125)));
    tokio::time::advance(Duration::from_millis(300)).await;
    sb.send_response(res(429, &[]));
    assert_ready!(b.poll()).unwrap();
    assert_eq!(
        handle.pause(HOST),
        Some(Duration::from_millis(700)),
        "a bare 429 to a call sent before the pause changes nothing"
    );
    assert_eq!(handle.learned_pace(HOST), Some(Duration::from_millis(125)));
    assert_eq!(handle.clear_pause(HOST), Some(Duration::from_millis(700)));
    assert_eq!(handle.pause(HOST), None);
    assert_eq!(handle.learned_pace(HOST), None);
}

/// With `adaptive_only()`, the calls that waited for a pause leave by slow start: one when it
/// ends, then two after its success, then four.
#[tokio::test(start_paused = true)]
async fn s42_slow_start_after_a_pause() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let (inner, mut mock) = tower_test::mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(first.poll());
    mock.next_request()
        .await
        .unwrap()
        .1
        .send_response(res(429, &[("retry-after", "2")]));
    assert_ready!(first.poll()).unwrap();
    let mut line: Vec<_> = (0..7)
        .map(|_| tokio_test::task::spawn(svc.clone().oneshot(get(HOST))))
        .collect();
    for t in &mut line {
        assert_pending!(t.poll());
    }
    assert_eq!(handle.waiting(HOST), 7);
    tokio::time::advance(Duration::from_secs(2)).await;
    let mut done = [false; 7];
    let mut released = Vec::new();
    for _ in 0..3 {
        for (i, t) in line.iter_mut().enumerate() {
            if !done[i] && t.poll().is_ready() {
                done[i] = true;
            }
        }
        let mut got = Vec::new();
        while let Ok(Some(r)) =
            tokio::time::timeout(Duration::from_millis(1), mock.next_request()).await
        {
            got.push(r);
        }
        released.push(got.len());
        for (_, send) in got {
            send.send_response(res(200, &[]));
        }
        for (i, t) in line.iter_mut().enumerate() {
            if !done[i] && t.poll().is_ready() {
                done[i] = true;
            }
        }
    }
    assert_eq!(released, [1, 2, 4]);
}

/// Resets in the forms vendors use and the draft's own vectors: `X-RateLimit-Reset` as seconds
/// or as an epoch near the clock; a `RateLimit` list naming two policies (the exhausted one
/// pauses); a `pk` byte sequence with non-canonical pad bits (the draft's own example, which
/// RFC 9651 says not to fail on); `Retry-After` on a 200 is not a pause.
#[tokio::test(start_paused = true)]
async fn s42_reset_forms_and_draft_vectors() {
    let epoch_30 = (NOW + 30).to_string();
    let epoch: &'static str = Box::leak(epoch_30.into_boxed_str());
    let secs = Duration::from_secs;
    let cases: Vec<(u16, Vec<(&str, &[u8])>, Option<Duration>)> = vec![
        (
            200,
            vec![
                h("x-ratelimit-remaining", "0"),
                h("x-ratelimit-reset", "30"),
            ],
            Some(secs(30)),
        ),
        (
            429,
            vec![
                h("x-ratelimit-remaining", "0"),
                h("x-ratelimit-reset", epoch),
            ],
            Some(secs(30)),
        ),
        (
            200,
            vec![h(
                "ratelimit",
                "\"burst\";r=0;t=10, \"daily\";r=500;t=86000",
            )],
            Some(secs(10)),
        ),
        (
            200,
            vec![h("ratelimit", "\"peruser\";r=0;t=20;pk=:cHsdsRa894==:")],
            Some(secs(20)),
        ),
        (
            200,
            vec![h("ratelimit", "\"default\";r=0;t=30;pk=:dHJpYWwxMjEzMjM=:")],
            Some(secs(30)),
        ),
        (200, vec![h("retry-after", "120")], None),
        (
            200,
            vec![
                h("x-ratelimit-remaining", "5"),
                h("x-ratelimit-reset", "30"),
            ],
            None,
        ),
    ];
    for (status, headers, want) in cases {
        let (pause, _) = pause_after(status, &headers).await;
        assert_eq!(pause, want, "{status} {headers:?}");
    }
}

/// Bare 503s pause nothing by default, and 1 s with `with_bare_503_pauses(true)`; a 503 with
/// `Retry-After` pauses either way.
#[tokio::test(start_paused = true)]
async fn s42_bare_503_pauses_only_when_asked() {
    for (bare, headers, want) in [
        (false, vec![], None),
        (true, vec![], Some(Duration::from_secs(1))),
        (
            false,
            vec![h("retry-after", "4")],
            Some(Duration::from_secs(4)),
        ),
    ] {
        let script = Script::default();
        script.set(503, &headers);
        let (layer, handle) = RateLimitLayer::adaptive_only()
            .with_bare_503_pauses(bare)
            .pair();
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(script.service(Arc::new(AtomicUsize::new(0))));
        svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
        assert_eq!(
            handle.pause(HOST),
            want,
            "bare 503 pauses: {bare}, {headers:?}"
        );
    }
}

/// "A waiting call holds what the inner service reserved in `poll_ready` (a buffer slot) until
/// it goes": over `Buffer(1)`, a call waiting in line holds the one slot, so a second kept
/// service is not ready; once the waiting call is dropped, the slot is free again.
#[tokio::test(start_paused = true)]
async fn s42_dropped_waiter_over_buffer_frees_the_slot() {
    let script = Script::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap()).pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .buffer(1)
        .service(script.service(calls.clone()));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let mut a = svc.clone();
    a.ready().await.unwrap();
    let mut waiting = tokio_test::task::spawn(a.call(get(HOST)));
    assert_pending!(waiting.poll());
    assert_eq!(handle.waiting(HOST), 1);
    let mut b = svc.clone();
    let mut b_ready = tokio_test::task::spawn(async move {
        b.ready().await.unwrap();
        b
    });
    tokio::task::yield_now().await;
    assert!(
        b_ready.poll().is_pending(),
        "the slot is held by the waiting call"
    );
    drop(waiting);
    drop(a);
    tokio::task::yield_now().await;
    let std::task::Poll::Ready(mut b) = b_ready.poll() else {
        panic!("the dropped waiter did not free its buffer slot");
    };
    assert_eq!(handle.waiting(HOST), 0);
    let start = Instant::now();
    b.call(get(HOST)).await.unwrap();
    assert!(start.elapsed() <= Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Slow start: "a released call gives its place back when it finishes, fails, is dropped or
/// panics". The one call released after a pause is dropped while at the server; the next one
/// in line is released instead of the line waiting forever.
#[tokio::test(start_paused = true)]
async fn s42_slow_start_released_call_dropped_gives_its_place_back() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(60))
        .pair();
    let (inner, mut mock) = tower_test::mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(first.poll());
    mock.next_request()
        .await
        .unwrap()
        .1
        .send_response(res(429, &[("retry-after", "2")]));
    assert_ready!(first.poll()).unwrap();
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_pending!(a.poll());
    assert_pending!(b.poll());
    let (_req, _send) = mock.next_request().await.expect("one released");
    assert!(
        tokio::time::timeout(Duration::from_millis(1), mock.next_request())
            .await
            .is_err(),
        "only one is released first"
    );
    // The released call is dropped at the server (whichever of a and b it was).
    drop(a);
    let _ = b.poll();
    let got = tokio::time::timeout(Duration::from_millis(1), mock.next_request()).await;
    let next = match got {
        Ok(Some(r)) => Some(r),
        _ => {
            // b may have been the released one: then a's drop changed nothing, and b still waits
            // for its answer.
            None
        }
    };
    if let Some((_, send)) = next {
        send.send_response(res(200, &[]));
        assert_ready!(b.poll()).unwrap();
    } else {
        drop(_send);
    }
    assert_eq!(handle.waiting(HOST), 0);
}

/// The same with the released call's task aborted: the call behind it leaves (within its
/// `max_wait`), so the line does not stall.
#[tokio::test(start_paused = true)]
async fn s42_slow_start_aborted_released_task_unblocks_the_line() {
    let (layer, _handle) = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::from_secs(60))
        .pair();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    // The first call after the pause hangs; later ones answer at once.
    let inner = service_fn(move |_req: Req| {
        let n = s.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Ok::<_, Infallible>(res(429, &[("retry-after", "2")]));
            }
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Ok(res(200, &[]))
        }
    });
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let hung = tokio::spawn(svc.clone().oneshot(get(HOST)));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let behind = tokio::spawn(svc.clone().oneshot(get(HOST)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the hung call was released first"
    );
    hung.abort();
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(120), behind)
        .await
        .expect("the call behind the aborted one never left")
        .unwrap()
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

/// A `RateLimit` field split over two field lines (an SF List may be, RFC 9651 §3.1): the
/// exhausted policy on the second line pauses, as it does on one line.
#[tokio::test(start_paused = true)]
async fn s42_ratelimit_field_split_over_lines() {
    let (one, _) = pause_after(200, &[h("ratelimit", "\"a\";r=5;t=10, \"b\";r=0;t=20")]).await;
    assert_eq!(one, Some(Duration::from_secs(20)));
    let (two, _) = pause_after(
        200,
        &[
            h("ratelimit", "\"a\";r=5;t=10"),
            h("ratelimit", "\"b\";r=0;t=20"),
        ],
    )
    .await;
    assert_eq!(two, Some(Duration::from_secs(20)));
}

/// Past `with_max_keys`, the handle answers for a key of the overflow with the shared limiter,
/// and `clear_pause` of one of them clears the pause of all.
#[tokio::test(start_paused = true)]
async fn s42_overflow_keys_share_one_pause() {
    let script = Script::default();
    let (layer, handle) = RateLimitLayer::adaptive_only().with_max_keys(2).pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(script.service(Arc::new(AtomicUsize::new(0))));
    // Two keys kept busy (paused), so they are not idle.
    script.set(429, &[h("retry-after", "100")]);
    for host in ["k1.example.com", "k2.example.com", "k3.example.com"] {
        svc.ready().await.unwrap().call(get(host)).await.unwrap();
    }
    if handle.paused().iter().any(|(k, _)| k == "*") {
        assert!(
            handle.pause("k4.example.com").is_some(),
            "k4 shares the overflow"
        );
        handle.clear_pause("k4.example.com");
        assert!(
            handle.pause("k3.example.com").is_none(),
            "{:?}",
            handle.paused()
        );
        assert!(!handle.paused().iter().any(|(k, _)| k == "*"));
    }
    assert!(handle.paused().len() <= 3);
}
