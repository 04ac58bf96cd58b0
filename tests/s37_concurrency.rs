//! s37: the adaptive concurrency limit (`sturdy-concurrency`, docs/guides/concurrency.md and its
//! rustdoc) tested from outside, on paused time against in-process services.

#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm, LimitReached};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tower::{service_fn, Layer, Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

/// Answers `status` after `wait` ms; counts calls started.
fn api(
    wait: u64,
    status: u16,
    started: Arc<AtomicUsize>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |_req: Request<()>| {
        started.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(wait)).await;
            Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
        }
    })
}

fn core_err(err: &BoxError) -> &sturdy::core::Error {
    err.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("a sturdy_core::Error: {err:?}"))
}

/// `AdaptiveConcurrencyLayer::with_max_wait`: "How long a call waits for a place when its host's
/// limit is full [30 s]". A wait of `Duration::MAX` (hostile) must simply wait: no panic, the call
/// goes out once a place frees, and the waiter count goes back to zero.
#[tokio::test(start_paused = true)]
async fn s37_a_max_wait_of_duration_max_waits_without_panicking() {
    let started = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = layer.layer(api(100_000, 200, started.clone()));
    let first = tokio::spawn(svc.clone().oneshot(get("api.example.com")));
    tokio::task::yield_now().await;
    let mut second = tokio_test::task::spawn(svc.clone().oneshot(get("api.example.com")));
    tokio_test::assert_pending!(second.poll());
    assert_eq!(handle.state("api.example.com").unwrap().waiting(), 1);
    tokio::time::advance(ms(60_000)).await;
    tokio_test::assert_pending!(second.poll());
    first.await.unwrap().unwrap();
    assert!(second.is_woken());
    let res = tokio::time::timeout(Duration::from_secs(200), second)
        .await
        .expect("the waiting call was served")
        .unwrap();
    assert_eq!(res.status(), 200);
    let st = handle.state("api.example.com").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert_eq!(started.load(Ordering::SeqCst), 2);
}

/// docs/guides/concurrency.md: "Past the wait, the call fails without being sent: a
/// `sturdy_core::Error` of kind `RateLimited` (no wait given), delivery `NotSent`, whose source is
/// `LimitReached` (the key, the limit, how long it waited). A maximum wait of zero sheds load" and
/// `on_event`: "for every call refused (`ConcurrencyRejected`)". The error's words name the key and
/// the limit.
#[tokio::test(start_paused = true)]
async fn s37_a_shed_call_says_rate_limited_not_sent_and_names_key_and_limit() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = events.clone();
    let started = Arc::new(AtomicUsize::new(0));
    let svc = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 2)
        .with_max_wait(Duration::ZERO)
        .on_event(move |e| {
            if let Event::ConcurrencyRejected { key, host, limit } = e {
                e2.lock().unwrap().push(format!("{key} {host:?} {limit}"));
            }
        })
        .layer(api(50, 200, started.clone()));
    let a = tokio::spawn(svc.clone().oneshot(get("api.example.com:8443")));
    let b = tokio::spawn(svc.clone().oneshot(get("api.example.com:8443")));
    tokio::task::yield_now().await;
    let err = svc
        .clone()
        .oneshot(get("api.example.com:8443"))
        .await
        .unwrap_err();
    let core = core_err(&err);
    assert_eq!(*core.kind(), ErrorKind::RateLimited { retry_after: None });
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{err}"
    );
    let reached = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!(
        (reached.key(), reached.limit(), reached.waited()),
        ("api.example.com:8443", 2, Duration::ZERO)
    );
    let text = format!("{err}");
    let chain = format!("{text} / {reached}");
    assert!(
        chain.contains("api.example.com:8443") && chain.contains('2'),
        "{chain}"
    );
    assert_eq!(
        *events.lock().unwrap(),
        ["api.example.com:8443 Some(\"api.example.com:8443\") 2"]
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        2,
        "the shed call was not sent"
    );
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

/// `AdaptiveConcurrencyLayer::with_limits`: "A `min` of 0 is taken as 1 ..., a `max` below `min`
/// as `min`, and both are capped at 1,000,000"; `with_initial_limit`: "taken into the bounds";
/// `ConcurrencyHandle::set_limit`: "(taken into the bounds)".
#[tokio::test(start_paused = true)]
async fn s37_limits_set_by_hand_and_initial_limits_are_taken_into_the_bounds() {
    let started = Arc::new(AtomicUsize::new(0));
    let (_l, h) = AdaptiveConcurrencyLayer::new().with_limits(0, 0).pair();
    h.set_limit("a", 0);
    assert_eq!(h.limit("a"), Some(1));
    h.set_limit("a", 7);
    assert_eq!(h.limit("a"), Some(1));

    let (_l, h) = AdaptiveConcurrencyLayer::new().with_limits(10, 5).pair();
    h.set_limit("a", 3);
    assert_eq!(h.limit("a"), Some(10));
    h.set_limit("a", 50);
    assert_eq!(h.limit("a"), Some(10));

    let (_l, h) = AdaptiveConcurrencyLayer::new()
        .with_limits(usize::MAX, usize::MAX)
        .pair();
    h.set_limit("a", 1);
    assert_eq!(h.limit("a"), Some(1_000_000));

    let (_l, h) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, usize::MAX)
        .pair();
    h.set_limit("a", usize::MAX);
    assert_eq!(h.limit("a"), Some(1_000_000));

    // Defaults: between 1 and 1,000.
    let (_l, h) = AdaptiveConcurrencyLayer::new().pair();
    h.set_limit("a", 5_000);
    assert_eq!(h.limit("a"), Some(1_000));
    h.set_limit("a", 0);
    assert_eq!(h.limit("a"), Some(1));

    for (initial, want) in [(0usize, 2usize), (100, 8), (5, 5)] {
        let (layer, h) = AdaptiveConcurrencyLayer::new()
            .with_limits(2, 8)
            .with_initial_limit(initial)
            .pair();
        let svc = layer.layer(api(1, 200, started.clone()));
        assert_eq!(h.limit("api.example.com"), None, "no limit before a call");
        svc.oneshot(get("api.example.com")).await.unwrap();
        assert_eq!(h.limit("api.example.com"), Some(want), "initial {initial}");
    }
}

/// docs/guides/concurrency.md: "the limit is multiplied by 0.9 (`.with_backoff(ratio)`)" and
/// `on_event`: "whenever a key's limit changes (`ConcurrencyLimitChanged`, the whole number of
/// calls)". One 503 from the initial 20 reports 20 -> 18.
#[tokio::test(start_paused = true)]
async fn s37_an_overload_signal_reports_the_change_from_and_to() {
    let events: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let e2 = events.clone();
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .on_event(move |e| {
            if let Event::ConcurrencyLimitChanged { from, to, .. } = e {
                e2.lock().unwrap().push((*from, *to));
            }
        })
        .pair();
    let svc = layer.layer(api(10, 503, Arc::default()));
    let res = svc.oneshot(get("api.example.com")).await.unwrap();
    assert_eq!(res.status(), 503, "the response comes back as it is");
    assert_eq!(h.limit("api.example.com"), Some(18));
    assert_eq!(*events.lock().unwrap(), [(20, 18)]);
}

/// docs/guides/concurrency.md: "Other failures ... and dropped calls say nothing about capacity
/// and are ignored" and "a dropped call in flight gives its permit back". Fifty calls in flight
/// dropped at once: the limit stays, nothing stays in flight.
#[tokio::test(start_paused = true)]
async fn s37_dropped_calls_in_flight_give_places_back_and_move_nothing() {
    let (layer, h) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api(10_000, 200, Arc::default()));
    let mut calls = Vec::new();
    for _ in 0..50 {
        let mut c = tokio_test::task::spawn(svc.clone().oneshot(get("api.example.com")));
        tokio_test::assert_pending!(c.poll());
        calls.push(c);
    }
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.limit(), st.in_flight(), st.waiting()), (20, 20, 30));
    // Drop the waiters first, then the calls in flight, in an odd order.
    let inflight: Vec<_> = calls.drain(..20).collect();
    drop(calls);
    assert_eq!(h.state("api.example.com").unwrap().waiting(), 0);
    for c in inflight.into_iter().rev() {
        drop(c);
    }
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.limit(), st.in_flight(), st.waiting()), (20, 0, 0));
}

/// docs/guides/concurrency.md: "A call that finds its host's limit full waits in line ...,
/// holding the service `poll_ready` made ready, which it calls once it has a place, without
/// polling readiness again." Over a tower-test mock (which panics on a call without readiness),
/// the waiting call is sent on the service it was given once the first call answers.
#[tokio::test(start_paused = true)]
async fn s37_a_waiting_call_is_sent_on_the_service_made_ready() {
    let (mock, mut mh) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let (layer, h) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let mut svc = layer.layer(mock);
    mh.allow(1);
    tokio_test::assert_ready_ok!(tokio_test::task::spawn(()).enter(|cx, _| svc.poll_ready(cx)));
    let mut first = tokio_test::task::spawn(svc.call(get("api.example.com")));
    tokio_test::assert_pending!(first.poll());
    mh.allow(1);
    tokio_test::assert_ready_ok!(tokio_test::task::spawn(()).enter(|cx, _| svc.poll_ready(cx)));
    let mut second = tokio_test::task::spawn(svc.call(get("api.example.com")));
    tokio_test::assert_pending!(second.poll());
    assert_eq!(h.state("api.example.com").unwrap().waiting(), 1);
    let (_r, send) = mh.next_request().await.unwrap();
    send.send_response(Response::new(()));
    tokio_test::assert_ready_ok!(first.poll());
    // No further readiness allowed: the second call must use the ready service it holds.
    mh.allow(0);
    tokio_test::assert_pending!(second.poll());
    let (_r, send) = mh.next_request().await.expect("the waiting call was sent");
    send.send_response(Response::new(()));
    tokio_test::assert_ready_ok!(second.poll());
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

/// `Algorithm::Vegas` / `LimitState::baseline`: "The no-load latency Vegas measures against, once
/// it has one." None before any window, then the service's latency after some calls.
#[tokio::test(start_paused = true)]
async fn s37_vegas_baseline_is_none_before_a_window_then_the_latency() {
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .with_initial_limit(4)
        .pair();
    let svc = layer.layer(api(10, 200, Arc::default()));
    svc.clone().oneshot(get("api.example.com")).await.unwrap();
    assert_eq!(h.state("api.example.com").unwrap().baseline(), None);
    for _ in 0..40 {
        svc.clone().oneshot(get("api.example.com")).await.unwrap();
    }
    let b = h.state("api.example.com").unwrap().baseline();
    assert!(
        b.is_some_and(|b| b >= ms(9) && b <= ms(12)),
        "baseline {b:?}"
    );
    // AIMD never has one.
    let (layer, h) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api(10, 200, Arc::default()));
    for _ in 0..40 {
        svc.clone().oneshot(get("api.example.com")).await.unwrap();
    }
    assert_eq!(h.state("api.example.com").unwrap().baseline(), None);
}

type Http = Response<Full<Bytes>>;

/// README/`ClientBuilder`: the adaptive limit sits above the attempt timeout, and
/// docs/guides/concurrency.md: "Both treat a 429, a 503, a 504 or a timeout ... as an overload
/// signal". An attempt cut by the builder's attempt timeout lowers the limit 20 -> 18, fails with
/// kind `Timeout`, and gives its place back.
#[tokio::test(start_paused = true)]
async fn s37_builder_attempt_timeout_is_an_overload_signal() {
    let (layer, h) = AdaptiveConcurrencyLayer::new().pair();
    let http = service_fn(|_req: Request<Full<Bytes>>| async {
        std::future::pending::<()>().await;
        Ok::<Http, Infallible>(Response::new(Full::default()))
    });
    let client = ClientBuilder::new()
        .without_retry()
        .with_adaptive_concurrency(layer)
        .with_attempt_timeout(ms(100))
        .build(http);
    let req = Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let kind = sturdy::core::classify::classify_error(&*err);
    assert!(matches!(kind, ErrorKind::Timeout), "{kind:?}: {err}");
    assert_eq!(h.limit("api.example.com"), Some(18));
    assert_eq!(h.state("api.example.com").unwrap().in_flight(), 0);
}

/// docs/guides/concurrency.md: "Below the retry layer, each attempt takes a place; a retried call
/// gives its place back while it sleeps."
#[tokio::test(start_paused = true)]
async fn s37_builder_retried_call_holds_no_place_while_it_sleeps() {
    let (layer, h) = AdaptiveConcurrencyLayer::new().pair();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let http = service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(5)).await;
            let status = if i == 0 { 503 } else { 200 };
            Ok::<Http, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::default())
                    .unwrap(),
            )
        }
    });
    let client = ClientBuilder::new()
        .with_adaptive_concurrency(layer)
        .build(http);
    let req = Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap();
    let mut call = tokio_test::task::spawn(client.oneshot(req));
    tokio_test::assert_pending!(call.poll());
    assert_eq!(h.state("api.example.com").unwrap().in_flight(), 1);
    tokio::time::advance(ms(6)).await;
    tokio_test::assert_pending!(call.poll());
    assert_eq!(n.load(Ordering::SeqCst), 1, "sleeping before the retry");
    assert_eq!(
        h.state("api.example.com").unwrap().in_flight(),
        0,
        "no place held while sleeping"
    );
    let res = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("retried")
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(n.load(Ordering::SeqCst), 2);
    assert_eq!(h.state("api.example.com").unwrap().in_flight(), 0);
}

/// docs/guides/concurrency.md: "Past the wait, the call fails ... whose source is `LimitReached`
/// (the key, the limit, how long it waited)" and `on_event`: "for every call refused
/// (`ConcurrencyRejected`)". A call that waited 100 ms and gave up is refused like a shed one.
#[tokio::test(start_paused = true)]
async fn s37_a_call_refused_after_waiting_says_how_long_and_is_reported() {
    let events = Arc::new(AtomicUsize::new(0));
    let e2 = events.clone();
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(ms(100))
        .on_event(move |e| {
            if matches!(e, Event::ConcurrencyRejected { .. }) {
                e2.fetch_add(1, Ordering::SeqCst);
            }
        })
        .pair();
    let svc = layer.layer(api(1_000, 200, Arc::default()));
    let first = tokio::spawn(svc.clone().oneshot(get("api.example.com")));
    tokio::task::yield_now().await;
    let start = tokio::time::Instant::now();
    let err = svc
        .clone()
        .oneshot(get("api.example.com"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), ms(100));
    let reached = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!(reached.waited(), ms(100));
    assert!(err.to_string().contains("100ms"), "{err}");
    assert_eq!(events.load(Ordering::SeqCst), 1, "ConcurrencyRejected");
    assert_eq!(h.state("api.example.com").unwrap().waiting(), 0);
    first.await.unwrap().unwrap();
}

/// docs/guides/concurrency.md: "A call that finds its host's limit full waits in line ... for up
/// to 30 s (`.with_max_wait(d)`)" and "a dropped call in flight gives its permit back". A place
/// that frees at the very instant the wait runs out: whatever the waiter gets, no permit is lost
/// and the next call goes straight through.
#[tokio::test(start_paused = true)]
async fn s37_a_place_freed_as_the_wait_runs_out_loses_no_permit() {
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(ms(100))
        .pair();
    let started = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(100, 200, started.clone()));
    let first = svc.clone().oneshot(get("api.example.com"));
    let second = svc.clone().oneshot(get("api.example.com"));
    let (a, b) = tokio::join!(first, second);
    a.unwrap();
    let _ = b;
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    let start = tokio::time::Instant::now();
    svc.clone().oneshot(get("api.example.com")).await.unwrap();
    assert_eq!(start.elapsed(), ms(100), "went straight through");
}

/// docs/guides/concurrency.md: "A handle sets a host's limit by hand (`handle.set_limit(host,
/// n)`); it adapts from there." Raising the limit lets the calls waiting in line go at once.
#[tokio::test(start_paused = true)]
async fn s37_raising_the_limit_by_hand_lets_waiters_in() {
    let (layer, h) = AdaptiveConcurrencyLayer::new().with_initial_limit(1).pair();
    let svc = layer.layer(api(10_000, 200, Arc::default()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get("api.example.com"))));
        tokio::task::yield_now().await;
    }
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.limit(), st.in_flight(), st.waiting()), (1, 1, 3));
    h.set_limit("api.example.com", 4);
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.limit(), st.in_flight(), st.waiting()), (4, 4, 0));
    for t in tasks {
        t.abort();
    }
}

/// docs/guides/concurrency.md (Vegas): "The no-load latency cannot be seen while the server
/// queues, so the mode probes for it: its first window, and one window in every 100, runs at half
/// the limit". With a limit of 20, twenty calls at once start with ten in flight.
#[tokio::test(start_paused = true)]
async fn s37_vegas_first_window_runs_at_half_the_limit() {
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(Algorithm::Vegas)
        .pair();
    let svc = layer.layer(api(50, 200, Arc::default()));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get("api.example.com"))));
    }
    for _ in 0..5 {
        tokio::task::yield_now().await;
    }
    let st = h.state("api.example.com").unwrap();
    assert_eq!((st.limit(), st.in_flight(), st.waiting()), (20, 10, 10));
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// `Event::ConcurrencyRejected`: "host: The host, when the layer keys by host (the default)";
/// `LimitReached::key`: "The host (or key) whose limit was full"; README: "Errors say what
/// happened". A host past the host bound shares the overflow limit `*`; when its call is
/// refused, the event's host and the error's words should still name the host called, not `*`.
#[tokio::test(start_paused = true)]
async fn s37_a_refusal_past_the_host_bound_names_the_host_called() {
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let e2 = events.clone();
    let svc = AdaptiveConcurrencyLayer::new()
        .with_max_hosts(1)
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .on_event(move |e| {
            if let Event::ConcurrencyRejected { key, host, .. } = e {
                e2.lock().unwrap().push(format!("{key} {host:?}"));
            }
        })
        .layer(api(1_000, 200, Arc::default()));
    let a = tokio::spawn(svc.clone().oneshot(get("a.example.com")));
    let b = tokio::spawn(svc.clone().oneshot(get("b.example.com")));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(get("c.example.com")).await.unwrap_err();
    let events = events.lock().unwrap().clone();
    let text = err.to_string();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(events, ["* Some(\"c.example.com\")"], "error: {text}");
    assert!(text.contains("c.example.com"), "{text}");
}
