//! Round s42, outside tests of `sturdy::circuit` against docs/guides/circuit.md and the rustdoc
//! of `sturdy_circuit`: every state and transition on paused time (open periods doubling to the
//! cap and back after a close, the failure-rate trigger's volume and window), half-open probe
//! counts, a probe future dropped mid-flight, errors for calls that never reached the
//! dependency, a kept service under tower's `Buffer` and `ConcurrencyLimit(1)`, what the
//! refusals say (reason, key, no userinfo, no query), setters with absurd values, and the
//! types' `Send`/`Sync`.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::{BoxError, CircuitOpen, OpenReason, RateLimited};
use tokio_test::{assert_pending, assert_ready};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_test::mock;

type Req = Request<()>;
type Res = Response<()>;

const HOST: &str = "api.example.com";

fn get(host: &str) -> Req {
    Request::get(format!("http://{host}/v1/items"))
        .body(())
        .unwrap()
}

fn answer(code: u16) -> Res {
    Response::builder().status(code).body(()).unwrap()
}

/// A service answering the status in `code`, counting its calls.
fn api(
    code: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Req,
    Response = Res,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Res, Infallible>> + Send,
> + Clone {
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        let c = code.load(Ordering::SeqCst);
        async move { Ok::<_, Infallible>(answer(c)) }
    })
}

fn open_for(state: Option<CircuitState>) -> Option<Duration> {
    match state {
        Some(CircuitState::Open { retry_in }) => Some(retry_in),
        _ => None,
    }
}

/// Closed -> open on a streak; refusals say `Failing` with the wait and do not call the inner
/// service; each failed probe reopens at once with the open period doubled up to the cap; a good
/// probe closes; the next opening starts again at the base. `on_state_change` sees each move.
#[tokio::test(start_paused = true)]
async fn s42_open_periods_double_to_the_cap_and_reset_after_close() {
    let code = Arc::new(AtomicU16::new(500));
    let calls = Arc::new(AtomicUsize::new(0));
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(40))
        .on_state_change(move |key, from, to| {
            seen.lock().unwrap().push((key.to_owned(), from, to));
        })
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code.clone(), calls.clone()));
    for _ in 0..3 {
        let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(open_for(handle.state(HOST)), Some(Duration::from_secs(10)));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Failing);
    assert_eq!(open.retry_in(), Duration::from_secs(10));
    assert_eq!(open.key(), HOST);
    assert!(err.to_string().contains("try again in 10s"), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "refused calls do not reach it"
    );

    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(open_for(handle.state(HOST)), Some(Duration::from_secs(6)));

    for want in [20, 40, 40, 40] {
        tokio::time::advance(open_for(handle.state(HOST)).unwrap()).await;
        let res = svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            open_for(handle.state(HOST)),
            Some(Duration::from_secs(want)),
            "a failed probe reopens for {want}s"
        );
    }
    code.store(200, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(40)).await;
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));

    code.store(503, Ordering::SeqCst);
    for _ in 0..3 {
        svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    }
    assert_eq!(
        open_for(handle.state(HOST)),
        Some(Duration::from_secs(10)),
        "back to the base period after a close"
    );
    let changes = changes.lock().unwrap();
    assert!(changes.iter().all(|(k, _, _)| k == HOST));
    let moves: Vec<_> = changes
        .iter()
        .map(|(_, from, to)| (kind(*from), kind(*to)))
        .collect();
    assert_eq!(moves.first(), Some(&("closed", "open")));
    assert!(moves.contains(&("open", "half-open")), "{moves:?}");
    assert!(moves.contains(&("half-open", "open")), "{moves:?}");
    assert!(moves.contains(&("half-open", "closed")), "{moves:?}");
    assert_eq!(moves.last(), Some(&("closed", "open")));
}

fn kind(s: CircuitState) -> &'static str {
    match s {
        CircuitState::Closed => "closed",
        CircuitState::Open { .. } => "open",
        CircuitState::HalfOpen => "half-open",
        CircuitState::ForcedOpen => "forced",
    }
}

/// The default trigger: 50 % of the last 30 s, once there were 100 calls. 99 failures keep it
/// closed; the 100th opens it. Half and half opens it; 49 of 100 does not. Failures older than
/// the window no longer count. No streak trigger by default.
#[tokio::test(start_paused = true)]
async fn s42_default_failure_rate_volume_and_window() {
    async fn run(pattern: &[(u16, usize)], gap: Option<(usize, Duration)>) -> Option<CircuitState> {
        let code = Arc::new(AtomicU16::new(200));
        let calls = Arc::new(AtomicUsize::new(0));
        let (layer, handle) = CircuitBreakerLayer::new().pair();
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .service(api(code.clone(), calls));
        for (i, (status, n)) in pattern.iter().enumerate() {
            if let Some((at, d)) = gap {
                if at == i {
                    tokio::time::advance(d).await;
                }
            }
            code.store(*status, Ordering::SeqCst);
            for _ in 0..*n {
                let _ = svc.ready().await.unwrap().call(get(HOST)).await;
            }
        }
        handle.state(HOST)
    }
    assert_eq!(run(&[(500, 99)], None).await, Some(CircuitState::Closed));
    assert!(open_for(run(&[(500, 100)], None).await).is_some());
    assert!(open_for(run(&[(200, 50), (500, 50)], None).await).is_some());
    assert_eq!(
        run(&[(200, 51), (500, 49)], None).await,
        Some(CircuitState::Closed)
    );
    // 60 failures, then a minute later 45 successes and 40 failures: the old ones are out of the
    // window (85 calls in it: under the volume).
    assert_eq!(
        run(
            &[(500, 60), (200, 45), (500, 40)],
            Some((1, Duration::from_secs(60)))
        )
        .await,
        Some(CircuitState::Closed)
    );
}

/// 4xx, 429 and 401 are not failures, even with a streak trigger of 1.
#[tokio::test(start_paused = true)]
async fn s42_client_errors_do_not_open() {
    let code = Arc::new(AtomicU16::new(429));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_failure_rate(0.1, Duration::from_secs(30), 1)
        .unwrap()
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code.clone(), Arc::new(AtomicUsize::new(0))));
    for status in [429, 401, 400, 404, 409, 422] {
        code.store(status, Ordering::SeqCst);
        for _ in 0..20 {
            svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
        }
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// Half-open with `with_probes(2)` and `with_successes_to_close(3)`: two probes out at once, a
/// third call refused at once as `Probing` with `retry_in` zero; as probes answer, new ones are
/// admitted; the third good probe closes.
#[tokio::test(start_paused = true)]
async fn s42_half_open_admits_k_probes_and_closes_after_m() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_probes(2)
        .with_successes_to_close(3)
        .pair();
    let (inner, mut mock) = mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);

    let mut first = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(first.poll());
    let (_, send) = mock.next_request().await.unwrap();
    send.send_response(answer(502));
    assert_ready!(first.poll()).unwrap();
    assert!(open_for(handle.state(HOST)).is_some());

    tokio::time::advance(Duration::from_secs(1)).await;
    let mut p1 = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let mut p2 = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(p1.poll());
    assert_pending!(p2.poll());
    assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    let (_, s1) = mock.next_request().await.unwrap();
    let (_, s2) = mock.next_request().await.unwrap();

    let mut p3 = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    let err = assert_ready!(p3.poll()).unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Probing);
    assert_eq!(open.retry_in(), Duration::ZERO);

    s1.send_response(answer(200));
    assert_ready!(p1.poll()).unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    let mut p4 = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(p4.poll());
    let (_, s4) = mock.next_request().await.unwrap();
    s2.send_response(answer(204));
    assert_ready!(p2.poll()).unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    s4.send_response(answer(200));
    assert_ready!(p4.poll()).unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// "A probe whose future is dropped gives its slot back": a probe dropped while the dependency
/// has not answered leaves the breaker half-open with its slot free, and the next call is the
/// new probe (it reaches the dependency); a good answer to it closes the breaker.
#[tokio::test(start_paused = true)]
async fn s42_dropped_probe_does_not_wedge_half_open() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(2), Duration::from_secs(2))
        .pair();
    let (inner, mut mock) = mock::pair::<Req, Res>();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let mut fail = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(fail.poll());
    mock.next_request()
        .await
        .unwrap()
        .1
        .send_response(answer(500));
    assert_ready!(fail.poll()).unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;

    for round in 0..3 {
        let mut probe = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
        assert_pending!(probe.poll());
        let (_req, _send) = mock.next_request().await.unwrap();
        let mut other = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
        let err = assert_ready!(other.poll()).unwrap_err();
        assert_eq!(
            err.downcast_ref::<CircuitOpen>().map(CircuitOpen::reason),
            Some(OpenReason::Probing),
            "round {round}"
        );
        drop(probe);
        assert_eq!(handle.state(HOST), Some(CircuitState::HalfOpen));
    }
    let mut probe = tokio_test::task::spawn(svc.clone().oneshot(get(HOST)));
    assert_pending!(probe.poll());
    mock.next_request()
        .await
        .unwrap()
        .1
        .send_response(answer(200));
    assert_ready!(probe.poll()).unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// An error for a call that never reached the dependency (a local `RateLimited`) is neither a
/// failure nor a success: the streak trigger ignores it, and a probe that meets it gives its
/// slot back (still half-open, the next call is admitted as a probe).
#[tokio::test(start_paused = true)]
async fn s42_local_refusals_are_not_counted() {
    let mode = Arc::new(AtomicU16::new(0));
    let m = mode.clone();
    let inner = service_fn(move |_req: Req| {
        let mode = m.load(Ordering::SeqCst);
        async move {
            match mode {
                0 => Err::<Res, BoxError>(
                    RateLimited::new(Duration::from_secs(1))
                        .with_scope(HOST)
                        .into(),
                ),
                code => Ok(answer(code)),
            }
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let mut svc = ServiceBuilder::new().layer(layer).service(inner);
    for _ in 0..20 {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(get(HOST))
            .await
            .unwrap_err();
        assert!(err.downcast_ref::<RateLimited>().is_some(), "{err}");
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
    mode.store(500, Ordering::SeqCst);
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert!(open_for(handle.state(HOST)).is_some());
    tokio::time::advance(Duration::from_secs(1)).await;
    mode.store(0, Ordering::SeqCst);
    for _ in 0..5 {
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(get(HOST))
            .await
            .unwrap_err();
        assert!(
            err.downcast_ref::<RateLimited>().is_some(),
            "the probe slot came back, so the next call is a probe again: {err}"
        );
    }
    mode.store(200, Ordering::SeqCst);
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// A kept service driven with `ready().await?.call(req)` in several tasks through tower's
/// `Buffer`, over the breaker, over `ConcurrencyLimit(1)`; and the breaker over
/// `ConcurrencyLimit(1)` over `Buffer`. With failures opening the breaker and refused calls in
/// between, every task finishes (no deadlock: paused time would jump to the guard timeout), and
/// at most one call is ever in the dependency.
#[tokio::test(start_paused = true)]
async fn s42_kept_service_under_buffer_and_concurrency_limit_does_not_deadlock() {
    for order in 0..2 {
        let calls = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (c, f, p) = (calls.clone(), in_flight.clone(), peak.clone());
        let inner = service_fn(move |_req: Req| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            let f = f.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(3)).await;
                f.fetch_sub(1, Ordering::SeqCst);
                // Failing in runs of five every twenty calls.
                let code = if n % 20 < 5 { 500 } else { 200 };
                Ok::<_, Infallible>(answer(code))
            }
        });
        let layer = CircuitBreakerLayer::new()
            .with_consecutive_failures(3)
            .with_open_duration(Duration::from_millis(20), Duration::from_millis(40));
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        if order == 0 {
            let svc = ServiceBuilder::new()
                .buffer(8)
                .layer(layer)
                .concurrency_limit(1)
                .service(inner);
            for _ in 0..4 {
                let (mut svc, refused) = (svc.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..50 {
                        match svc.ready().await.unwrap().call(get(HOST)).await {
                            Ok(_) => {}
                            Err(e) if e.is::<CircuitOpen>() => {
                                refused.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }));
            }
        } else {
            let svc = ServiceBuilder::new()
                .layer(layer)
                .concurrency_limit(1)
                .buffer(8)
                .service(inner);
            for _ in 0..4 {
                let (mut svc, refused) = (svc.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..50 {
                        match svc.ready().await.unwrap().call(get(HOST)).await {
                            Ok(_) => {}
                            Err(e) if e.is::<CircuitOpen>() => {
                                refused.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }));
            }
        }
        let all = futures_util::future::join_all(tasks);
        let done = tokio::time::timeout(Duration::from_secs(600), all)
            .await
            .unwrap_or_else(|_| panic!("order {order}: deadlocked"));
        for d in done {
            d.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 1, "order {order}");
        assert_eq!(
            calls.load(Ordering::SeqCst) + refused.load(Ordering::SeqCst),
            200,
            "order {order}: each call either went or was refused"
        );
        assert!(
            refused.load(Ordering::SeqCst) > 0,
            "order {order}: it opened"
        );
    }
}

/// Refusals name the host and the cause, never the URI's `user:password@` or its query, in
/// `Display` and in `Debug`; the handle's keys carry no userinfo either.
#[tokio::test(start_paused = true)]
async fn s42_refusals_name_the_host_without_secrets() {
    let code = Arc::new(AtomicU16::new(500));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code, Arc::new(AtomicUsize::new(0))));
    let uri = "http://alice:hunter2-s42@api.example.com:8443/v1/pay?token=QUERYSECRET&x=1";
    let req = || Request::get(uri).body(()).unwrap();
    svc.ready().await.unwrap().call(req()).await.unwrap();
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(text.contains("api.example.com:8443"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("alice"), "{text}");
        assert!(!text.contains("QUERYSECRET"), "{text}");
        assert!(!text.contains("/v1/pay"), "{text}");
    }
    let keys: Vec<_> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com:8443"]);

    handle.force_open("api.example.com:8443");
    let err = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.reason(), OpenReason::Forced);
    assert!(!err.to_string().contains("hunter2"));
    assert_eq!(
        handle.state("api.example.com:8443"),
        Some(CircuitState::ForcedOpen)
    );
    tokio::time::advance(Duration::from_secs(3_600)).await;
    assert_eq!(
        handle.state("api.example.com:8443"),
        Some(CircuitState::ForcedOpen),
        "held open until released"
    );
    handle.force_close("api.example.com:8443");
    assert_eq!(
        handle.state("api.example.com:8443"),
        Some(CircuitState::Closed)
    );
}

/// Past `with_max_breakers`, new hosts share the overflow breaker; when it has been failing, a
/// refusal says `Overflow` and names the call's own host.
#[tokio::test(start_paused = true)]
async fn s42_overflow_refusal_names_the_calls_own_host() {
    let code = Arc::new(AtomicU16::new(500));
    let (layer, _handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_max_breakers(1)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code, Arc::new(AtomicUsize::new(0))));
    // a.example.com fails and is kept (not healthy); b and c share the overflow breaker.
    for _ in 0..2 {
        svc.ready()
            .await
            .unwrap()
            .call(get("a.example.com"))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let _ = svc.ready().await.unwrap().call(get("b.example.com")).await;
    }
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get("c.example.com"))
        .await
        .unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Overflow);
    assert_eq!(open.key(), "c.example.com");
    assert!(err.to_string().contains("c.example.com"), "{err}");
}

/// Setters never panic on absurd values; validation errors for bad rates; 0 probes is 1; an
/// open period of `Duration::MAX` does not overflow.
#[tokio::test(start_paused = true)]
async fn s42_setters_take_absurd_values() {
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(f64::NAN, Duration::from_secs(1), 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(1.5, Duration::from_secs(1), 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(-0.1, Duration::from_secs(1), 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::ZERO, 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::MAX, 0)
        .is_ok());
    let _ = CircuitBreakerLayer::new()
        .with_open_duration(Duration::ZERO, Duration::ZERO)
        .with_max_breakers(0)
        .with_consecutive_failures(u32::MAX);

    let code = Arc::new(AtomicU16::new(500));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_probes(0)
        .with_successes_to_close(0)
        .with_open_duration(Duration::MAX, Duration::MAX)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code.clone(), Arc::new(AtomicUsize::new(0))));
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    assert!(err.is::<CircuitOpen>());
    let _ = err.to_string();
    assert!(open_for(handle.state(HOST)).is_some());

    // Base above max: no panic, and it opens.
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(60), Duration::from_secs(1))
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code, Arc::new(AtomicUsize::new(0))));
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    assert!(open_for(handle.state(HOST)).is_some());
}

/// The layer, its handle, the service and its future can be used from many tasks.
#[test]
fn s42_circuit_types_are_send_and_sync() {
    fn both<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    both(&layer);
    both(&handle);
    let svc = ServiceBuilder::new().layer(layer).service(api(
        Arc::new(AtomicU16::new(200)),
        Arc::new(AtomicUsize::new(0)),
    ));
    both(&svc);
    let fut = svc.oneshot(get(HOST));
    send(&fut);
    let e: BoxError = CircuitOpen::new(HOST, Duration::from_secs(1)).into();
    both(&e);
    let _ = format!("{handle:?}");
}

/// "past it, healthy breakers (closed, with no failure streak) are forgotten first": with room
/// for two, a failing host is kept while healthy hosts come and go, and its open breaker still
/// refuses.
#[tokio::test(start_paused = true)]
async fn s42_max_breakers_forgets_healthy_ones_first() {
    let code = Arc::new(AtomicU16::new(500));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_max_breakers(2)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(code.clone(), Arc::new(AtomicUsize::new(0))));
    for _ in 0..2 {
        svc.ready()
            .await
            .unwrap()
            .call(get("bad.example.com"))
            .await
            .unwrap();
    }
    assert!(open_for(handle.state("bad.example.com")).is_some());
    code.store(200, Ordering::SeqCst);
    for i in 0..50 {
        let host = format!("ok{i}.example.com");
        svc.ready().await.unwrap().call(get(&host)).await.unwrap();
    }
    assert!(handle.states().len() <= 3, "{:?}", handle.states());
    assert!(open_for(handle.state("bad.example.com")).is_some());
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get("bad.example.com"))
        .await
        .unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().map(CircuitOpen::reason),
        Some(OpenReason::Failing)
    );
}

/// "a setter called after a clone or a `pair()` applies to all of them; services made earlier
/// keep the settings": a service made before `with_consecutive_failures(1)` on a clone does not
/// open on one failure; one made after it does.
#[tokio::test(start_paused = true)]
async fn s42_setters_after_clone_apply_to_later_services_only() {
    let code = Arc::new(AtomicU16::new(500));
    let layer = CircuitBreakerLayer::new();
    let handle = layer.handle();
    let mut early = ServiceBuilder::new()
        .layer(layer.clone())
        .service(api(code.clone(), Arc::new(AtomicUsize::new(0))));
    let later_layer = layer.clone().with_consecutive_failures(1);
    let mut late = ServiceBuilder::new()
        .layer(later_layer)
        .service(api(code, Arc::new(AtomicUsize::new(0))));
    early
        .ready()
        .await
        .unwrap()
        .call(get("early.example.com"))
        .await
        .unwrap();
    late.ready()
        .await
        .unwrap()
        .call(get("late.example.com"))
        .await
        .unwrap();
    assert!(matches!(
        handle.state("early.example.com"),
        None | Some(CircuitState::Closed)
    ));
    assert!(open_for(handle.state("late.example.com")).is_some());
    // The early service kept the default (no streak trigger): a second failure still goes.
    let res = early
        .ready()
        .await
        .unwrap()
        .call(get("early.example.com"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

/// "An attempt cut by a timer above the breaker ... is dropped, not failed, and a dropped call
/// is not counted"; a timeout under the breaker is a failure.
#[tokio::test(start_paused = true)]
async fn s42_timer_above_is_not_counted_timer_below_is() {
    let slow = service_fn(|_req: Req| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        Ok::<_, Infallible>(answer(200))
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let above = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .layer(layer)
        .service(slow);
    for _ in 0..5 {
        assert!(above.clone().oneshot(get(HOST)).await.is_err());
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));

    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let below = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_secs(1))
        .service(slow);
    assert!(below.clone().oneshot(get(HOST)).await.is_err());
    assert!(
        open_for(handle.state(HOST)).is_some(),
        "{:?}",
        handle.state(HOST)
    );
}

/// A forced breaker's refusal carries "the longest open period" as `retry_in` and says
/// `Forced`; the inner service is not called.
#[tokio::test(start_paused = true)]
async fn s42_forced_open_retry_in_is_the_longest_period() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_open_duration(Duration::from_secs(7), Duration::from_secs(90))
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(api(Arc::new(AtomicU16::new(200)), calls.clone()));
    handle.force_open(HOST);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get(HOST))
        .await
        .unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.reason(), OpenReason::Forced);
    assert_eq!(open.retry_in(), Duration::from_secs(90));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// A probe future dropped before it was ever polled gives its slot back too; and a probe
/// cancelled while queued in tower's `Buffer` above the breaker does not wedge it.
#[tokio::test(start_paused = true)]
async fn s42_probe_dropped_unpolled_or_in_buffer_does_not_wedge() {
    let code = Arc::new(AtomicU16::new(500));
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(api(code.clone(), calls.clone()));
    svc.ready().await.unwrap().call(get(HOST)).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..3 {
        let fut = svc.ready().await.unwrap().call(get(HOST));
        drop(fut);
    }
    code.store(200, Ordering::SeqCst);
    let res = svc.ready().await.unwrap().call(get(HOST)).await;
    assert!(res.is_ok(), "{:?}", res.err().map(|e| e.to_string()));
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));

    // Through a Buffer: open it again, then cancel probes while they sit in the buffer.
    code.store(500, Ordering::SeqCst);
    let buffered = ServiceBuilder::new()
        .buffer(4)
        .layer(layer)
        .service(api(code.clone(), calls.clone()));
    buffered.clone().oneshot(get(HOST)).await.unwrap();
    assert!(open_for(handle.state(HOST)).is_some());
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..3 {
        let mut f = tokio_test::task::spawn(buffered.clone().oneshot(get(HOST)));
        let _ = f.poll();
        drop(f);
        tokio::task::yield_now().await;
    }
    code.store(200, Ordering::SeqCst);
    let res = tokio::time::timeout(Duration::from_secs(60), buffered.clone().oneshot(get(HOST)))
        .await
        .expect("hung");
    match res {
        Ok(r) => assert_eq!(r.status(), StatusCode::OK),
        Err(e) => panic!("a cancelled buffered probe wedged the breaker: {e}"),
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}
