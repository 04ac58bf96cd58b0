//! Round s49, outside tests of `sturdy::circuit` against docs/guides/circuit.md and the rustdoc
//! of `sturdy_circuit`, on paused time against tower-test's mock and in-process services:
//! setters at their extremes ("Setters never panic; values that cannot work are taken as the
//! nearest that can"), `with_failure_rate` "validated when called", a half-open probe dropped
//! in flight or cut by a timer above ("dropped, not failed"), errors of calls that never reached
//! the dependency (tower's `LoadShed` over a service that is not ready) not counted and the
//! probe's slot given back, 408 against 429, what refusals and events say, and the breaker
//! inside `ClientBuilder` with a deadline ("the retry layer waits for the probe and tries
//! again").
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::delivery;
use sturdy::core::events::Event;
use sturdy::core::{find, BoxError, CallOptions, CircuitOpen, Delivery, ErrorKind, OpenReason};
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

/// A service answering the status in `code` (shared, changeable), counting calls.
fn api(
    code: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Res, Error = Infallible, Future = impl Send> + Clone + Send + Sync
{
    service_fn(move |_r: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        let c = code.load(Ordering::SeqCst) as u16;
        async move { Ok::<_, Infallible>(status(c)) }
    })
}

fn open_err(err: &BoxError) -> &CircuitOpen {
    find::<CircuitOpen>(&**err).unwrap_or_else(|| panic!("not a CircuitOpen: {err}"))
}

/// "Setters never panic; values that cannot work are taken as the nearest that can": open
/// periods of `Duration::MAX` (and doubling past it), of zero, a max below the base, 0 probes,
/// 0 successes, 0 breakers.
#[tokio::test(start_paused = true)]
async fn s49_cb_setter_extremes() {
    let code = Arc::new(AtomicUsize::new(500));
    let calls = Arc::new(AtomicUsize::new(0));

    // Duration::MAX: opens, refuses, and re-opens (doubling) without overflowing.
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::MAX, Duration::MAX)
        .with_probes(0)
        .with_successes_to_close(0)
        .with_max_breakers(0)
        .pair();
    let svc = layer.layer(api(code.clone(), calls.clone()));
    for round in 0..3 {
        assert_eq!(
            svc.clone().oneshot(get(HOST)).await.unwrap().status(),
            500,
            "round {round}"
        );
        let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
        let open = open_err(&err);
        assert_eq!(open.reason(), OpenReason::Failing);
        assert!(open.retry_in() > Duration::from_secs(86_400 * 365));
        assert!(matches!(
            handle.state(HOST),
            Some(CircuitState::Open { .. })
        ));
        assert!(!err.to_string().is_empty());
        handle.force_close(HOST);
    }

    // Zero: the next call after a failure is a probe at once.
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::ZERO, Duration::ZERO)
        .pair();
    let svc = layer.layer(api(code.clone(), calls.clone()));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    code.store(200, Ordering::SeqCst);
    let res = svc.clone().oneshot(get(HOST)).await;
    assert!(
        res.is_ok(),
        "zero open period: a probe goes at once: {res:?}"
    );
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));

    // A max below the base: no panic, a refusal with a finite wait.
    code.store(500, Ordering::SeqCst);
    let layer = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(1));
    let svc = layer.layer(api(code.clone(), calls.clone()));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    assert!(open_err(&err).retry_in() <= Duration::from_secs(10));
}

/// `with_failure_rate`: "A Config error when `rate` is not in `0.0..=1.0` or `window` is zero";
/// `min_calls` "0 is taken as 1".
#[tokio::test(start_paused = true)]
async fn s49_cb_failure_rate_validation() {
    for (rate, window) in [
        (f64::NAN, Duration::from_secs(1)),
        (-0.01, Duration::from_secs(1)),
        (1.01, Duration::from_secs(1)),
        (f64::INFINITY, Duration::from_secs(1)),
        (0.5, Duration::ZERO),
    ] {
        let err = CircuitBreakerLayer::new()
            .with_failure_rate(rate, window, 10)
            .unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::Config), "{rate} {window:?}");
    }
    // min_calls 0 is 1: one failure opens at rate 1.0.
    let code = Arc::new(AtomicUsize::new(502));
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::MAX, 0)
        .unwrap()
        .pair();
    let svc = layer.layer(api(code, calls.clone()));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert!(matches!(
        handle.state(HOST),
        Some(CircuitState::Open { .. })
    ));
    assert!(svc.oneshot(get(HOST)).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// "4xx, 429 and 401 are not failures ... (except 408 Request Timeout, which reads as a timeout
/// and counts as one)."
#[tokio::test(start_paused = true)]
async fn s49_cb_408_counts_429_401_404_do_not() {
    let code = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api(code.clone(), calls));
    for c in [429, 401, 404, 400, 409, 413] {
        code.store(c, Ordering::SeqCst);
        svc.clone().oneshot(get(HOST)).await.unwrap();
        assert_eq!(handle.state(HOST), Some(CircuitState::Closed), "{c}");
    }
    code.store(408, Ordering::SeqCst);
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert!(matches!(
        handle.state(HOST),
        Some(CircuitState::Open { .. })
    ));
}

/// Half-open: "1 probe at a time; everyone else fails fast" (`Probing`, `retry_in` zero, "try
/// again once they have answered"); "A probe whose future is dropped gives its slot back", here
/// dropped while the dependency holds it.
#[tokio::test(start_paused = true)]
async fn s49_cb_probe_dropped_in_flight_gives_its_slot_back() {
    let (mock_svc, mut server) = mock::pair::<Req, Res>();
    let rejected = Arc::new(AtomicUsize::new(0));
    let r = rejected.clone();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(8))
        .on_event(move |e| {
            if let Event::CircuitRejected { .. } = e {
                r.fetch_add(1, Ordering::SeqCst);
            }
        })
        .pair();
    let svc = layer.layer(mock_svc);
    let mut first = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(first.poll());
    server
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(status(503));
    assert_eq!(assert_ready!(first.poll()).unwrap().status(), 503);
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    assert_eq!(open_err(&err).reason(), OpenReason::Failing);
    assert_eq!(open_err(&err).retry_in(), Duration::from_secs(1));
    let text = err.to_string();
    assert!(
        text.contains(HOST) && text.contains("failing"),
        "names the host and why: {text}"
    );
    tokio::time::advance(Duration::from_secs(1)).await;

    for round in 0..3 {
        let mut probe = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
        assert_pending!(probe.poll());
        let (_req, _send) = server.next_request().await.unwrap();
        assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
        let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
        let open = open_err(&err);
        assert_eq!(open.reason(), OpenReason::Probing, "round {round}");
        assert_eq!(open.retry_in(), Duration::ZERO);
        assert!(err.to_string().contains("once they have answered"), "{err}");
        drop(probe);
    }
    // The slot came back: the next call is the probe, and its success closes.
    let mut probe = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(probe.poll());
    server
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(status(200));
    assert_eq!(assert_ready!(probe.poll()).unwrap().status(), 200);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
    assert_eq!(rejected.load(Ordering::SeqCst), 4);
}

/// "An attempt cut by a timer above the breaker (the retry layer's own `with_attempt_timeout`)
/// is dropped, not failed": a half-open probe cut by tower's `Timeout` above leaves the breaker
/// half-open with its slot free.
#[tokio::test(start_paused = true)]
async fn s49_cb_probe_cut_by_a_timer_above_is_not_a_failure() {
    let slow = Arc::new(AtomicBool::new(false));
    let fail = Arc::new(AtomicBool::new(true));
    let (s, f) = (slow.clone(), fail.clone());
    let api = service_fn(move |_r: Req| {
        let slow = s.load(Ordering::SeqCst);
        let fail = f.load(Ordering::SeqCst);
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok::<_, Infallible>(status(if fail { 500 } else { 200 }))
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(60))
        .pair();
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .layer(layer)
        .service(api);
    svc.clone().oneshot(get(HOST)).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    slow.store(true, Ordering::SeqCst);
    fail.store(false, Ordering::SeqCst);
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    assert_eq!(
        handle.state(HOST),
        Some(CircuitState::HalfOpen),
        "a probe cut above is dropped: still half-open"
    );
    slow.store(false, Ordering::SeqCst);
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// "an error for a call that never reached the dependency is not counted at all (neither
/// failure nor success, and a probe gets its slot back): ... a full concurrency limit (sturdy's,
/// or tower's `LoadShed` over a service that is not ready)".
#[tokio::test(start_paused = true)]
async fn s49_cb_load_shed_refusals_are_not_counted() {
    let (mock_svc, mut server) = mock::pair::<Req, Res>();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .load_shed()
        .service(mock_svc);
    server.allow(0);
    for _ in 0..5 {
        let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
        assert!(err.is::<tower::load_shed::error::Overloaded>(), "{err}");
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));

    // Open it with a real failure, then let the probe meet the shed.
    server.allow(1);
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(call.poll());
    server
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(status(500));
    assert_ready!(call.poll()).unwrap();
    assert!(matches!(
        handle.state(HOST),
        Some(CircuitState::Open { .. })
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    server.allow(0);
    for _ in 0..3 {
        let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
        assert!(
            err.is::<tower::load_shed::error::Overloaded>(),
            "the probe slot came back each time, so each call is a probe: {err}"
        );
    }
    assert_ne!(handle.state(HOST), Some(CircuitState::Closed));
    server.allow(1);
    let mut probe = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(probe.poll());
    server
        .next_request()
        .await
        .unwrap()
        .1
        .send_response(status(200));
    assert_ready!(probe.poll()).unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// Events: "`.on_state_change(|key, from, to| ..)` and `tracing` events on every change"; on_event
/// `CircuitChanged` with `open_for` the period (30 s, then doubled), `CircuitRejected`; the
/// handle's `force_open` gives `Forced` with the longest open period as `retry_in`.
#[tokio::test(start_paused = true)]
async fn s49_cb_events_and_forced_open() {
    let code = Arc::new(AtomicUsize::new(500));
    let calls = Arc::new(AtomicUsize::new(0));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let opens = Arc::new(Mutex::new(Vec::new()));
    let (c, o) = (changes.clone(), opens.clone());
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .on_state_change(move |key, from, to| {
            c.lock().unwrap().push(format!("{key}: {from:?} -> {to:?}"));
        })
        .on_event(move |e| {
            if let Event::CircuitChanged { open_for, host, .. } = e {
                o.lock()
                    .unwrap()
                    .push((*open_for, host.map(str::to_string)));
            }
        })
        .pair();
    let svc = layer.layer(api(code.clone(), calls.clone()));
    svc.clone().oneshot(get(HOST)).await.unwrap();
    svc.clone().oneshot(get(HOST)).await.unwrap();
    assert_eq!(changes.lock().unwrap().len(), 1);
    assert_eq!(
        opens.lock().unwrap()[0],
        (Some(Duration::from_secs(30)), Some(HOST.to_string()))
    );
    tokio::time::advance(Duration::from_secs(30)).await;
    // The probe fails: reopened at once, for 60 s.
    svc.clone().oneshot(get(HOST)).await.unwrap();
    let err = svc.clone().oneshot(get(HOST)).await.unwrap_err();
    assert_eq!(open_err(&err).retry_in(), Duration::from_secs(60));
    let last_open = opens
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|(d, _)| *d)
        .unwrap();
    assert_eq!(last_open, Duration::from_secs(60));

    handle.force_open("other.example");
    let err = svc.clone().oneshot(get("other.example")).await.unwrap_err();
    let open = open_err(&err);
    assert_eq!(open.reason(), OpenReason::Forced);
    assert_eq!(open.retry_in(), Duration::from_secs(300));
    assert_eq!(
        handle.state("other.example"),
        Some(CircuitState::ForcedOpen)
    );
    assert!(err.to_string().contains("other.example"), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    handle.force_close("other.example");
    code.store(200, Ordering::SeqCst);
    svc.clone().oneshot(get("other.example")).await.unwrap();
    let log = changes.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.starts_with("other.example")),
        "forced changes are state changes too: {log:?}"
    );
}

fn full_get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}{path}"))
        .body(Full::default())
        .unwrap()
}

/// Inside `ClientBuilder`: "a call that meets an open breaker fails at once unless it has a
/// deadline that the breaker's `retry_in` fits: then the retry layer waits for the probe and
/// tries again".
#[tokio::test(start_paused = true)]
async fn s49_cb_client_deadline_waits_for_the_probe() {
    let down = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let (d, c) = (down.clone(), calls.clone());
    let http = service_fn(move |_r: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        let code = if d.load(Ordering::SeqCst) { 500 } else { 200 };
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(code)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(2), Duration::from_secs(2))
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(http);
    let mut once = full_get("/");
    once.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = client.clone().oneshot(once).await.unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(matches!(
        handle.state(HOST),
        Some(CircuitState::Open { .. })
    ));
    down.store(false, Ordering::SeqCst);

    // Without a deadline: at once, not sent.
    let start = tokio::time::Instant::now();
    let err = client.clone().oneshot(full_get("/")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // With a deadline the 2 s fit: it waits for the probe and succeeds.
    let mut req = full_get("/");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// The composed breaker under `Buffer`, over `ConcurrencyLimit(1)` and `Timeout`, kept and
/// cloned, with a dependency that fails half the time: no deadlock, and the types are
/// `Send + Sync + Clone`.
#[tokio::test(start_paused = true)]
async fn s49_cb_composed_kept_and_cloned() {
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    let api = service_fn(move |_r: Req| {
        let i = count.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(if i.is_multiple_of(3) {
                500
            } else {
                5
            }))
            .await;
            Ok::<_, Infallible>(status(if i.is_multiple_of(2) { 503 } else { 200 }))
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .with_open_duration(Duration::from_millis(50), Duration::from_millis(200))
        .with_probes(2)
        .pair();
    let svc = ServiceBuilder::new()
        .buffer(4)
        .layer(layer)
        .timeout(Duration::from_millis(100))
        .concurrency_limit(1)
        .service(api);
    fn assert_traits<T: Send + Sync + Clone + 'static>(_: &T) {}
    assert_traits(&svc);
    let mut tasks = Vec::new();
    for i in 0..16usize {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = 0;
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis((i as u64 * 7) % 30)).await;
                let _ = svc.ready().await.unwrap().call(get(HOST)).await;
                outcomes += 1;
            }
            outcomes
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 10);
    }
    // Whatever state it ended in, it recovers when the dependency does.
    tokio::time::advance(Duration::from_secs(1)).await;
    let _ = handle.states();
}

/// "A half-open breaker's refusal (`Probing`, `retry_in` zero ...) is looked at again every
/// backoff base (250 ms by default) for as long as the deadline allows; such a refusal sent
/// nothing, so it uses up neither an attempt nor the retry budget."
#[tokio::test(start_paused = true)]
async fn s49_cb_client_probing_refusal_waits_within_the_deadline() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let http = service_fn(move |_r: Request<Full<Bytes>>| {
        let i = c.fetch_add(1, Ordering::SeqCst);
        async move {
            let code = match i {
                0 => 500,
                1 => {
                    // The probe takes 2 s.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    200
                }
                _ => 200,
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(code)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(http);
    let mut once = full_get("/");
    once.extensions_mut()
        .insert(CallOptions::new().without_retries());
    client.clone().oneshot(once).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let probe = tokio::spawn(client.clone().oneshot(full_get("/probe")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    let start = tokio::time::Instant::now();
    let mut req = full_get("/waiter");
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(10)));
    let res = client.clone().oneshot(req).await;
    let waited = start.elapsed();
    assert!(res.is_ok(), "{res:?}");
    assert!(
        waited >= Duration::from_millis(1990) && waited <= Duration::from_millis(2300),
        "looked at again every 250 ms until the probe answered: {waited:?}"
    );
    assert_eq!(probe.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

/// "at most 1,024 (`.with_max_breakers(n)`); past it, healthy breakers ... are forgotten
/// first, then new hosts share one overflow breaker": 5,000 failing hosts keep at most 1,025
/// breakers.
#[tokio::test(start_paused = true)]
async fn s49_cb_thousands_of_failing_hosts_stay_bounded() {
    let code = Arc::new(AtomicUsize::new(500));
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api(code, calls));
    for i in 0..5000 {
        let _ = svc.clone().oneshot(get(&format!("h{i}.example"))).await;
    }
    let n = handle.states().len();
    assert!(n <= 1025, "{n} breakers kept");
}
