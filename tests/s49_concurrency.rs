//! Round s49, outside tests of `sturdy::concurrency` against docs/guides/concurrency.md and the
//! rustdoc of `sturdy_concurrency`, on paused time against tower-test's mock (the test answers
//! each call): the bounds and setters taken at their extremes ("a minimum of 0 is taken as 1, a
//! maximum below the minimum as the minimum", "both are capped at 1,000,000", "validated"),
//! `LimitReached` after `max_wait` (kind `RateLimited` without a wait, `NotSent`), dropped calls
//! in line and in flight, "fifty 503s from one burst lower the limit once", "other failures ...
//! and dropped calls ... are ignored", "when it goes up again first, the retirement is cancelled,
//! not paid twice", the overflow limit's refusal naming the call's own host, a kept service under
//! `Buffer` and over `ConcurrencyLimit(1)`, and the layer inside `ClientBuilder`.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm, LimitReached};
use sturdy::core::classify::delivery;
use sturdy::core::events::Event;
use sturdy::core::{find, BoxError, Delivery, Error as SturdyError, ErrorKind};
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};
use tower_test::mock;

type Req = Request<()>;
type Res = Response<()>;

const HOST: &str = "api.example.com";

fn get(host: &str) -> Req {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

fn status(code: u16) -> Res {
    Response::builder().status(code).body(()).unwrap()
}

/// Lets spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn limit_reached(err: &BoxError) -> &LimitReached {
    find::<LimitReached>(&**err).unwrap_or_else(|| panic!("no LimitReached in {err}"))
}

/// "a minimum of 0 is taken as 1, a maximum below the minimum as the minimum, and both are capped
/// at 1,000,000"; "The limit a host starts with \[20\], taken into the bounds"; `set_limit`
/// "taken into the bounds"; `with_max_hosts` "(at least 1)"; `with_backoff` "A Config error when
/// `ratio` is not strictly between 0.0 and 1.0". None of these panics.
#[tokio::test(start_paused = true)]
async fn s49_conc_setter_extremes() {
    let ok = || service_fn(|_r: Req| async { Ok::<_, Infallible>(status(200)) });

    let cases: [(usize, usize, Option<usize>, usize); 5] = [
        (0, 0, None, 1),
        (5, 2, None, 5),
        (usize::MAX, usize::MAX, None, 1_000_000),
        (1, 1000, Some(usize::MAX), 1000),
        (3, 7, Some(0), 3),
    ];
    for (min, max, initial, want) in cases {
        let mut layer = AdaptiveConcurrencyLayer::new().with_limits(min, max);
        if let Some(n) = initial {
            layer = layer.with_initial_limit(n);
        }
        let (layer, handle) = layer.with_max_hosts(0).pair();
        let svc = layer.layer(ok());
        svc.oneshot(get(HOST)).await.unwrap();
        assert_eq!(
            handle.limit(HOST),
            Some(want),
            "with_limits({min}, {max}), initial {initial:?}"
        );
    }

    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    layer.layer(ok()).oneshot(get(HOST)).await.unwrap();
    handle.set_limit(HOST, 0);
    assert_eq!(
        handle.limit(HOST),
        Some(1),
        "set_limit 0 is taken as the minimum"
    );
    handle.set_limit(HOST, usize::MAX);
    assert_eq!(
        handle.limit(HOST),
        Some(1000),
        "set_limit past max is the max"
    );

    for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        let err = AdaptiveConcurrencyLayer::new()
            .with_backoff(bad)
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Config),
            "{bad}: {:?}",
            err.kind()
        );
        assert!(!err.to_string().is_empty());
    }
    assert!(AdaptiveConcurrencyLayer::new().with_backoff(0.5).is_ok());
    assert!(AdaptiveConcurrencyLayer::new()
        .with_backoff(f64::MIN_POSITIVE)
        .is_ok());
}

/// `with_max_wait(Duration::MAX)`: a call that finds the limit full waits (no overflow of the
/// clock), and leaves the line when dropped.
#[tokio::test(start_paused = true)]
async fn s49_conc_max_wait_forever_does_not_panic() {
    let (api, mut server) = mock::pair::<Req, Res>();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = layer.layer(api);
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(first.poll());
    let (_r, send) = server.next_request().await.unwrap();
    let mut second = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(second.poll());
    tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
    assert_pending!(second.poll());
    assert_eq!(handle.state(HOST).unwrap().waiting(), 1);
    drop(second);
    assert_eq!(
        handle.state(HOST).unwrap().waiting(),
        0,
        "a dropped waiter leaves"
    );
    send.send_response(status(200));
    assert_ready!(first.poll()).unwrap();
    assert_eq!(handle.state(HOST).unwrap().in_flight(), 0);
}

/// "Past the wait, the call fails without being sent: a `sturdy_core::Error` of kind
/// `RateLimited` (no wait given), delivery `NotSent`, whose source is `LimitReached` (the key,
/// the limit, how long it waited)."
#[tokio::test(start_paused = true)]
async fn s49_conc_limit_reached_after_max_wait() {
    let (api, mut server) = mock::pair::<Req, Res>();
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let seen = rejected.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_millis(100))
        .on_event(move |e| {
            if let Event::ConcurrencyRejected { key, host, limit } = e {
                seen.lock()
                    .unwrap()
                    .push((key.to_string(), host.map(str::to_string), *limit));
            }
        })
        .pair();
    let svc = layer.layer(api);
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(first.poll());
    let (_r, send) = server.next_request().await.unwrap();

    let mut second = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(second.poll());
    assert_eq!(handle.state(HOST).unwrap().waiting(), 1);
    tokio::time::advance(Duration::from_millis(99)).await;
    assert_pending!(second.poll());
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    let err = assert_ready!(second.poll()).unwrap_err();
    let top = find::<SturdyError>(&*err).expect("a sturdy_core::Error");
    assert_eq!(*top.kind(), ErrorKind::RateLimited { retry_after: None });
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let reached = limit_reached(&err);
    assert_eq!(reached.key(), HOST);
    assert_eq!(reached.limit(), 1);
    assert!(!reached.is_shared());
    assert_eq!(reached.waited(), Duration::from_millis(100));
    let text = err.to_string();
    assert!(text.contains(HOST), "the message names the host: {text}");
    assert_eq!(handle.state(HOST).unwrap().waiting(), 0);
    assert_eq!(
        *rejected.lock().unwrap(),
        vec![(HOST.to_string(), Some(HOST.to_string()), 1)]
    );
    send.send_response(status(200));
    assert_ready!(first.poll()).unwrap();
}

/// "A dropped waiting call leaves the line; a dropped call in flight gives its permit back."
/// And first come, first served.
#[tokio::test(start_paused = true)]
async fn s49_conc_dropped_calls_give_places_back() {
    let (api, mut server) = mock::pair::<Req, Res>();
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = layer.layer(api);
    let call = |path: &str| {
        svc.clone().oneshot(
            Request::get(format!("http://{HOST}/{path}"))
                .body(())
                .unwrap(),
        )
    };
    let mut a = tokio_test::task::spawn(call("a"));
    assert_pending!(a.poll());
    let (ra, send_a) = server.next_request().await.unwrap();
    assert_eq!(ra.uri().path(), "/a");
    let mut b = tokio_test::task::spawn(call("b"));
    let mut c = tokio_test::task::spawn(call("c"));
    let mut d = tokio_test::task::spawn(call("d"));
    assert_pending!(b.poll());
    assert_pending!(c.poll());
    assert_pending!(d.poll());
    assert_eq!(handle.state(HOST).unwrap().waiting(), 3);
    drop(b);
    assert_eq!(handle.state(HOST).unwrap().waiting(), 2);
    send_a.send_response(status(200));
    assert_ready!(a.poll()).unwrap();
    assert_pending!(c.poll());
    assert_pending!(d.poll());
    let (rc, _send_c) = server.next_request().await.unwrap();
    assert_eq!(rc.uri().path(), "/c", "first come, first served");
    assert_eq!(handle.state(HOST).unwrap().in_flight(), 1);
    // c is in flight: dropping it gives the permit to d.
    drop(c);
    assert_pending!(d.poll());
    let (rd, send_d) = server.next_request().await.unwrap();
    assert_eq!(rd.uri().path(), "/d");
    send_d.send_response(status(200));
    assert_ready!(d.poll()).unwrap();
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting(), s.limit()), (0, 0, 1));
}

/// "the limit is multiplied by 0.9 ..., at most once per round trip. A call admitted before the
/// last decrease cannot cause another one, so fifty 503s from one burst lower the limit once."
#[tokio::test(start_paused = true)]
async fn s49_conc_one_burst_of_503s_lowers_the_limit_once() {
    let (api, mut server) = mock::pair::<Req, Res>();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .on_event(move |e| {
            if let Event::ConcurrencyLimitChanged { from, to, .. } = e {
                seen.lock().unwrap().push((*from, *to));
            }
        })
        .pair();
    let svc = layer.layer(api);
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut t = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
        assert_pending!(t.poll());
        calls.push(t);
    }
    let mut sends = Vec::new();
    for _ in 0..20 {
        sends.push(server.next_request().await.unwrap().1);
    }
    assert_eq!(handle.state(HOST).unwrap().in_flight(), 20);
    for s in sends {
        s.send_response(status(503));
    }
    for mut t in calls {
        assert_eq!(assert_ready!(t.poll()).unwrap().status(), 503);
    }
    assert_eq!(handle.limit(HOST), Some(18), "20 x 0.9, once");
    assert_eq!(*changes.lock().unwrap(), vec![(20, 18)]);
}

/// "Other failures (a 500, a 404, a connect error) and dropped calls say nothing about capacity
/// and are ignored." AIMD "does not grow while unused".
#[tokio::test(start_paused = true)]
async fn s49_conc_other_failures_and_idle_successes_leave_the_limit() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let api = service_fn(move |_r: Req| {
        let i = count.fetch_add(1, Ordering::SeqCst);
        async move {
            match i % 4 {
                0 => Ok::<_, BoxError>(status(500)),
                1 => Ok(status(404)),
                2 => Err(BoxError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "refused",
                ))),
                _ => Ok(status(200)),
            }
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api);
    for _ in 0..200 {
        let _ = svc.clone().oneshot(get(HOST)).await;
    }
    assert_eq!(handle.limit(HOST), Some(20));
}

/// "When the limit goes down while calls are in flight, their permits are retired as they come
/// back; when it goes up again first, the retirement is cancelled, not paid twice."
#[tokio::test(start_paused = true)]
async fn s49_conc_retirement_cancelled_when_the_limit_goes_back_up() {
    for (down, up) in [(5usize, 10usize), (5, 12), (1, 10), (9, 10)] {
        let (api, mut server) = mock::pair::<Req, Res>();
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 100)
            .with_initial_limit(10)
            .pair();
        let svc = layer.layer(api);
        let mut calls = Vec::new();
        for _ in 0..10 {
            let mut t = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
            assert_pending!(t.poll());
            calls.push(t);
        }
        let mut sends = Vec::new();
        for _ in 0..10 {
            sends.push(server.next_request().await.unwrap().1);
        }
        handle.set_limit(HOST, down);
        assert_eq!(handle.state(HOST).unwrap().in_flight(), 10);
        handle.set_limit(HOST, up);
        // Answer with 404s: they say nothing about capacity.
        for s in sends {
            s.send_response(status(404));
        }
        for mut t in calls {
            assert_ready!(t.poll()).unwrap();
        }
        let s = handle.state(HOST).unwrap();
        assert_eq!((s.limit(), s.in_flight()), (up, 0), "down {down}, up {up}");
        // Exactly `up` calls get in at once now, and the next waits.
        let mut calls = Vec::new();
        for _ in 0..up + 1 {
            let mut t = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
            assert_pending!(t.poll());
            calls.push(t);
        }
        settle().await;
        let s = handle.state(HOST).unwrap();
        assert_eq!(
            (s.in_flight(), s.waiting()),
            (up, 1),
            "down {down}, up {up}: the limit in force after the retirement was cancelled"
        );
        drop(calls);
        drop(server);
    }
}

/// Past `with_max_hosts`, hosts share the overflow limit: "`LimitReached::key`: the call's own,
/// also past the layer's bound"; `is_shared`; the event "names the limit's key and the call's
/// host".
#[tokio::test(start_paused = true)]
async fn s49_conc_overflow_refusal_names_the_calls_own_host() {
    let (api, mut server) = mock::pair::<Req, Res>();
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let seen = rejected.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_hosts(1)
        .with_max_wait(Duration::ZERO)
        .on_event(move |e| {
            if let Event::ConcurrencyRejected { key, host, .. } = e {
                seen.lock()
                    .unwrap()
                    .push((key.to_string(), host.map(str::to_string)));
            }
        })
        .pair();
    let svc = layer.layer(api);
    let mut a = tokio_test::task::spawn(svc.clone().oneshot(get("a.example")));
    assert_pending!(a.poll());
    let _ra = server.next_request().await.unwrap();
    let mut b = tokio_test::task::spawn(svc.clone().oneshot(get("b.example")));
    assert_pending!(b.poll());
    let _rb = server.next_request().await.unwrap();
    let err = svc.clone().oneshot(get("c.example")).await.unwrap_err();
    let reached = limit_reached(&err);
    assert_eq!(reached.key(), "c.example");
    assert!(reached.is_shared());
    assert!(
        err.to_string().contains("c.example"),
        "the message names the call's host: {err}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(
        *rejected.lock().unwrap(),
        vec![("*".to_string(), Some("c.example".to_string()))]
    );
    assert_eq!(handle.state("c.example").unwrap().in_flight(), 1);
    drop((a, b));
}

/// A kept service (`ready().await?.call(req)`) and clones, under `Buffer` and over
/// `ConcurrencyLimit(1)`, with a `Timeout` above dropping some calls in line: everything ends,
/// nothing is kept, and the composed service is `Send + Sync + Clone`.
#[tokio::test(start_paused = true)]
async fn s49_conc_composed_under_buffer_over_concurrency_limit() {
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let api = service_fn(move |_r: Req| {
        let count = count.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            count.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Infallible>(status(200))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_limits(1, 1)
        .pair();
    let svc = ServiceBuilder::new()
        .buffer(8)
        .timeout(Duration::from_millis(35))
        .layer(layer)
        .concurrency_limit(1)
        .service(api);
    fn assert_traits<T: Send + Sync + Clone + 'static>(_: &T) {}
    assert_traits(&svc);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                svc.ready().await?.call(get(HOST)).await
            } else {
                svc.oneshot(get(HOST)).await
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert!(ok >= 3, "some calls went through: {ok}");
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (0, 0), "nothing kept");
    // A later call is not delayed by anything left behind.
    let start = tokio::time::Instant::now();
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(10));
}

/// Vegas with answers at once (zero latency) and answers a day long: no panic, the limit stays
/// in its bounds.
#[tokio::test(start_paused = true)]
async fn s49_conc_vegas_with_zero_and_day_long_latencies() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let api = service_fn(move |_r: Req| {
        let i = count.fetch_add(1, Ordering::SeqCst);
        async move {
            if i >= 400 && i.is_multiple_of(7) {
                tokio::time::sleep(Duration::from_secs(86_400)).await;
            }
            Ok::<_, Infallible>(status(200))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_limits(2, 50)
        .pair();
    let svc = layer.layer(api);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                svc.clone().oneshot(get(HOST)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let limit = handle.limit(HOST).unwrap();
    assert!((2..=50).contains(&limit), "{limit}");
}

/// Inside `ClientBuilder` without retry: a call the full limit refuses is `RateLimited`,
/// `NotSent`, and the circuit breaker does not count it (even with a streak trigger of 1).
#[tokio::test(start_paused = true)]
async fn s49_conc_in_client_builder_refusal_not_counted_by_breaker() {
    use bytes::Bytes;
    use http_body_util::Full;
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
    });
    let (breaker, breakers) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(breaker)
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_max_wait(Duration::ZERO),
        )
        .build(api);
    let req = || {
        Request::get(format!("http://{HOST}/"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let first = tokio::spawn(client.clone().oneshot(req()));
    settle().await;
    for _ in 0..3 {
        let err = client.clone().oneshot(req()).await.unwrap_err();
        assert!(find::<LimitReached>(&*err).is_some(), "{err}");
        assert_eq!(delivery(&*err), Delivery::NotSent);
    }
    assert!(matches!(
        breakers.state(HOST),
        Some(CircuitState::Closed) | None
    ));
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
}

/// `set_limit`: "Sets `key`'s limit by hand (taken into the bounds); it adapts from there. A
/// change is reported like any other: a `ConcurrencyLimitChanged` event". Raised while calls
/// wait, the new places are theirs at once, in order.
#[tokio::test(start_paused = true)]
async fn s49_conc_set_limit_up_lets_waiters_in_at_once() {
    let (api, mut server) = mock::pair::<Req, Res>();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 10)
        .with_initial_limit(1)
        .on_event(move |e| {
            if let Event::ConcurrencyLimitChanged { key, from, to, .. } = e {
                seen.lock().unwrap().push((key.to_string(), *from, *to));
            }
        })
        .pair();
    let svc = layer.layer(api);
    let call = |path: &str| {
        svc.clone().oneshot(
            Request::get(format!("http://{HOST}/{path}"))
                .body(())
                .unwrap(),
        )
    };
    let mut a = tokio_test::task::spawn(call("a"));
    assert_pending!(a.poll());
    let (_ra, send_a) = server.next_request().await.unwrap();
    let mut waiters: Vec<_> = ["b", "c", "d"]
        .iter()
        .map(|p| {
            let mut t = tokio_test::task::spawn(call(p));
            assert_pending!(t.poll());
            t
        })
        .collect();
    assert_eq!(handle.state(HOST).unwrap().waiting(), 3);
    handle.set_limit(HOST, 3);
    for t in &mut waiters {
        assert_pending!(t.poll());
    }
    settle().await;
    let (rb, _sb) = server.next_request().await.unwrap();
    let (rc, _sc) = server.next_request().await.unwrap();
    assert_eq!((rb.uri().path(), rc.uri().path()), ("/b", "/c"));
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.limit(), s.in_flight(), s.waiting()), (3, 3, 1));
    assert_eq!(
        *changes.lock().unwrap(),
        vec![(HOST.to_string(), 1, 3)],
        "set_limit is reported"
    );
    send_a.send_response(status(200));
    assert_ready!(a.poll()).unwrap();
    assert_pending!(waiters[2].poll());
    let (rd, _sd) = server.next_request().await.unwrap();
    assert_eq!(rd.uri().path(), "/d");
}

/// Vegas: "its first window, and one window in every 100, runs at half the limit": of 20 calls
/// made at once against the initial limit of 20, 10 go and 10 wait.
#[tokio::test(start_paused = true)]
async fn s49_conc_vegas_first_window_runs_at_half_the_limit() {
    let (api, server) = mock::pair::<Req, Res>();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let svc = layer.layer(api);
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut t = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
        assert_pending!(t.poll());
        calls.push(t);
    }
    settle().await;
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (10, 10));
    drop(calls);
    drop(server);
}

/// "at most 1,024 hosts (`.with_max_hosts(n)`)": 5,000 hosts with a call in flight each keep at
/// most 1,025 limits.
#[tokio::test(start_paused = true)]
async fn s49_conc_thousands_of_busy_hosts_stay_bounded() {
    let api = service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok::<_, Infallible>(status(200))
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = layer.layer(api);
    let mut tasks = Vec::new();
    for i in 0..5000 {
        tasks.push(tokio::spawn(
            svc.clone().oneshot(get(&format!("h{i}.example"))),
        ));
    }
    settle().await;
    let n = handle.states().len();
    assert!(n <= 1025, "{n} limits kept");
    for t in tasks {
        let _ = t.await.unwrap();
    }
}

/// "Below the retry layer, each attempt takes a place; a retried call gives its place back
/// while it sleeps": with a limit of 1 in `ClientBuilder`, a call whose first attempt got a 503
/// does not hold the place during its backoff, so another call goes meanwhile.
#[tokio::test(start_paused = true)]
async fn s49_conc_in_client_builder_retry_sleep_gives_the_place_back() {
    use bytes::Bytes;
    use http_body_util::Full;
    let n = Arc::new(AtomicUsize::new(0));
    let order = Arc::new(Mutex::new(Vec::new()));
    let (c, o) = (n.clone(), order.clone());
    let api = service_fn(move |r: Request<Full<Bytes>>| {
        let i = c.fetch_add(1, Ordering::SeqCst);
        o.lock()
            .unwrap()
            .push((r.uri().path().to_string(), tokio::time::Instant::now()));
        async move {
            let code = if i == 0 { 503 } else { 200 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(code)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_adaptive_concurrency(layer)
        .build(api);
    let req = |p: &str| {
        Request::get(format!("http://{HOST}/{p}"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let start = tokio::time::Instant::now();
    let retried = tokio::spawn(client.clone().oneshot(req("retried")));
    settle().await;
    assert_eq!(n.load(Ordering::SeqCst), 1, "first attempt answered 503");
    assert_eq!(
        handle.state(HOST).unwrap().in_flight(),
        0,
        "place given back"
    );
    let other = client.clone().oneshot(req("other")).await;
    assert!(other.is_ok(), "{other:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(retried.await.unwrap().unwrap().status(), StatusCode::OK);
    let paths: Vec<String> = order
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(paths, vec!["/retried", "/other", "/retried"]);
}
