//! The circuit breaker (docs/guides/circuit.md) under resets and stalls on the wire, composed
//! with retry, tower's LoadShed/ConcurrencyLimit, and hostile settings on paused time.
use crate::faults32_util::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitHandle, CircuitState};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CircuitOpen, Delivery, ErrorKind, OpenReason};
use sturdy::ClientBuilder;
use tower::{ServiceBuilder, ServiceExt};

fn only_key(h: &CircuitHandle) -> String {
    let all = h.states();
    assert_eq!(all.len(), 1, "{all:?}");
    all[0].0.clone()
}

fn open_of(err: &BoxError) -> &CircuitOpen {
    sturdy::core::find::<CircuitOpen>(&**err)
        .unwrap_or_else(|| panic!("not CircuitOpen: {}", chain(&**err)))
}

#[tokio::test]
async fn resets_before_and_after_read_open_the_breaker_and_it_refuses_without_sending() {
    let before = raw(
        Opts {
            reset_on_accept: true,
            ..Opts::default()
        },
        |_| status(200),
    )
    .await;
    let after = raw(Opts::default(), |_| Act::ResetAfterRead(Duration::ZERO)).await;
    for (what, server) in [("before read", &before), ("after read", &after)] {
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(3)
            .with_open_duration(Duration::from_secs(60), Duration::from_secs(60))
            .pair();
        let svc = ServiceBuilder::new().layer(layer).service(http());
        for _ in 0..3 {
            let err = svc
                .clone()
                .oneshot(get(&server.url("/x")))
                .await
                .unwrap_err();
            assert_ne!(
                delivery(&*err),
                Delivery::NotSent,
                "{what}: a written request: {}",
                chain(&*err)
            );
        }
        let k = only_key(&handle);
        assert!(
            matches!(handle.state(&k), Some(CircuitState::Open { .. })),
            "{what}: {:?}",
            handle.state(&k)
        );
        let accepted = server.accepted.load(Ordering::SeqCst);
        let err = svc
            .clone()
            .oneshot(get(&server.url("/x")))
            .await
            .unwrap_err();
        let open = open_of(&err);
        assert_eq!(open.reason(), OpenReason::Failing);
        assert!(open.retry_in() > Duration::from_secs(50));
        assert_eq!(delivery(&*err), Delivery::NotSent);
        assert!(err.to_string().contains("failing"), "{what}: {err}");
        assert_eq!(
            server.accepted.load(Ordering::SeqCst),
            accepted,
            "{what}: nothing was sent"
        );
    }
}

#[tokio::test]
async fn a_refused_connection_counts_as_a_failure() {
    // "a connect or transport error" is a failure.
    let refused = closed_port().await;
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = format!("http://{refused}/x");
    for _ in 0..2 {
        let err = svc.clone().oneshot(get(&url)).await.unwrap_err();
        assert_eq!(delivery(&*err), Delivery::NotSent);
    }
    let k = only_key(&handle);
    assert!(matches!(handle.state(&k), Some(CircuitState::Open { .. })));
}

#[tokio::test]
async fn stalls_cut_under_the_breaker_open_it_stalls_cut_above_do_not() {
    let raw = raw(Opts::default(), |_| ok_after(10_000, "late")).await;
    // Above: the caller's own timeout drops the call; dropped calls are not counted.
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    for _ in 0..5 {
        let r = tokio::time::timeout(
            Duration::from_millis(50),
            svc.clone().oneshot(get(&raw.url("/above"))),
        )
        .await;
        assert!(r.is_err());
    }
    let k = only_key(&handle);
    assert_eq!(
        handle.state(&k),
        Some(CircuitState::Closed),
        "dropped calls are not failures"
    );
    // Under: ClientBuilder's attempt timeout sits under the breaker.
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(layer)
        .with_attempt_timeout(Duration::from_millis(50))
        .build(http());
    for _ in 0..2 {
        let err = client
            .clone()
            .oneshot(get(&raw.url("/under")))
            .await
            .unwrap_err();
        assert_eq!(
            sturdy::core::classify::classify_error(&*err),
            ErrorKind::Timeout,
            "{}",
            chain(&*err)
        );
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
    let k = only_key(&handle);
    assert!(
        matches!(handle.state(&k), Some(CircuitState::Open { .. })),
        "{:?}",
        handle.state(&k)
    );
    let err = client
        .clone()
        .oneshot(get(&raw.url("/under")))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(raw.count_path("/under"), 2);
    until("cut attempts' connections closed", || {
        raw.client_closed() == 7
    })
    .await;
}

#[tokio::test]
async fn half_open_probe_stalled_then_dropped_gives_its_slot_back() {
    // Real time, ms settings: open for 150 ms; the probe stalls, others are refused with
    // Probing (retry_in zero); the probe is dropped; the next call is admitted as a probe.
    let fail = Arc::new(AtomicUsize::new(1));
    let f = fail.clone();
    let raw = raw(Opts::default(), move |s| {
        match (f.load(Ordering::SeqCst), s.path.as_str()) {
            (1, _) => status(503),
            (_, "/probe") => ok_after(10_000, "late"),
            _ => ok_after(0, "ok"),
        }
    })
    .await;
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_millis(150), Duration::from_millis(150))
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    for _ in 0..2 {
        let r = svc.clone().oneshot(get(&raw.url("/f"))).await.unwrap();
        assert_eq!(r.status(), 503);
    }
    let k = only_key(&handle);
    assert!(matches!(handle.state(&k), Some(CircuitState::Open { .. })));
    fail.store(0, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = svc.clone();
    let url = raw.url("/probe");
    let probe = tokio::spawn(async move { s.oneshot(get(&url)).await });
    until("probe on the wire", || raw.count_path("/probe") == 1).await;
    assert_eq!(handle.state(&k), Some(CircuitState::HalfOpen));
    let err = svc
        .clone()
        .oneshot(get(&raw.url("/other")))
        .await
        .unwrap_err();
    let open = open_of(&err);
    assert_eq!(
        (open.reason(), open.retry_in()),
        (OpenReason::Probing, Duration::ZERO)
    );
    assert!(err.to_string().contains("once they have answered"), "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(raw.count_path("/other"), 0);
    probe.abort();
    let _ = probe.await;
    until("probe connection closed", || raw.client_closed() == 1).await;
    let r = svc.clone().oneshot(get(&raw.url("/ok"))).await.unwrap();
    assert_eq!(r.status(), 200, "the next call was admitted as a probe");
    assert_eq!(handle.state(&k), Some(CircuitState::Closed));
}

#[tokio::test]
async fn four_xx_and_429_from_the_peer_are_not_failures() {
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/429" => Act::Answer {
            status: 429,
            body: vec![],
            delay: Duration::ZERO,
            close: false,
            headers: vec![("retry-after".into(), "99999999999999999999".into())],
        },
        "/401" => status(401),
        _ => status(404),
    })
    .await;
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    for p in ["/429", "/401", "/404"] {
        for _ in 0..5 {
            svc.clone().oneshot(get(&raw.url(p))).await.unwrap();
        }
    }
    let k = only_key(&handle);
    assert_eq!(handle.state(&k), Some(CircuitState::Closed));
}

#[tokio::test]
async fn load_shed_refusals_under_the_breaker_are_not_counted() {
    // "a full concurrency limit (... tower's LoadShed over a service that is not ready)" is not
    // counted. One call holds ConcurrencyLimit(1) on a stall; 20 others are shed.
    let raw = raw(Opts::default(), |_| ok_after(10_000, "late")).await;
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = tower::buffer::Buffer::new(
        ServiceBuilder::new()
            .layer(layer)
            .load_shed()
            .concurrency_limit(1)
            .service(http()),
        32,
    );
    let s = svc.clone();
    let url = raw.url("/hold");
    let holder = tokio::spawn(async move { s.oneshot(get(&url)).await });
    until("holder on the wire", || raw.seen().len() == 1).await;
    for _ in 0..20 {
        let err = svc
            .clone()
            .oneshot(get(&raw.url("/shed")))
            .await
            .unwrap_err();
        assert_eq!(delivery(&*err), Delivery::NotSent, "{}", chain(&*err));
    }
    let k = only_key(&handle);
    assert_eq!(handle.state(&k), Some(CircuitState::Closed));
    holder.abort();
}

#[tokio::test]
async fn retry_meeting_an_open_breaker_after_a_reset_does_not_say_not_sent() {
    // The first attempt is reset after the server read it (may have been processed), which opens
    // the breaker (one failure); the retry meets the open breaker. The call's error must not say
    // the request was never sent.
    let raw = raw(Opts::default(), |_| Act::ResetAfterRead(Duration::ZERO)).await;
    let client = ClientBuilder::new()
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http());
    let err = bounded(
        Duration::from_secs(10),
        "call",
        client.clone().oneshot(get(&raw.url("/once"))),
    )
    .await
    .unwrap_err();
    assert_eq!(raw.count_path("/once"), 1);
    assert_eq!(
        delivery(&*err),
        Delivery::MaybeProcessed,
        "the first attempt was written: {}",
        chain(&*err)
    );
}

#[tokio::test]
async fn many_tasks_drive_a_kept_breaker_under_resets() {
    // 30 tasks, ready().call() on a kept Buffer(Breaker(client)); every request is reset. The
    // breaker opens, every task ends, refusals are NotSent and sent ones are not.
    let raw = raw(Opts::default(), |_| {
        Act::ResetAfterRead(Duration::from_millis(5))
    })
    .await;
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(5)
        .pair();
    let svc = tower::buffer::Buffer::new(ServiceBuilder::new().layer(layer).service(http()), 64);
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let mut s = svc.clone();
            let url = raw.url(&format!("/t{i}"));
            tokio::spawn(async move {
                use tower::Service;
                let mut refused = 0;
                for _ in 0..5 {
                    let err = s.ready().await.unwrap().call(get(&url)).await.unwrap_err();
                    if sturdy::core::find::<CircuitOpen>(&*err).is_some() {
                        assert_eq!(delivery(&*err), Delivery::NotSent);
                        refused += 1;
                    } else {
                        assert_eq!(
                            delivery(&*err),
                            Delivery::MaybeProcessed,
                            "{}",
                            chain(&*err)
                        );
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        refused += bounded(Duration::from_secs(20), "task", t).await.unwrap();
    }
    assert!(refused > 0);
    assert_eq!(
        raw.seen().len() + refused,
        150,
        "every call either reached the server or was refused"
    );
    let k = only_key(&handle);
    assert!(matches!(handle.state(&k), Some(CircuitState::Open { .. })));
}

fn mock(
    fail: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<()>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let failing = fail.load(Ordering::SeqCst) == 1;
        async move {
            let mut r = Response::new(());
            if failing {
                *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            Ok::<_, BoxError>(r)
        }
    })
}

#[tokio::test(start_paused = true)]
async fn huge_open_durations_do_not_overflow() {
    let fail = Arc::new(AtomicUsize::new(1));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::MAX, Duration::MAX)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(mock(fail.clone()));
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    let err = svc
        .clone()
        .oneshot(get("http://h.example/"))
        .await
        .unwrap_err();
    assert!(open_of(&err).retry_in() > Duration::from_secs(365 * 86_400));
    tokio::time::advance(Duration::from_secs(86_400 * 365 * 100)).await;
    assert!(matches!(
        handle.state("h.example"),
        Some(CircuitState::Open { .. })
    ));
    // Forced close resets; reopening doubles MAX: still no overflow.
    handle.force_close("h.example");
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    assert!(svc.clone().oneshot(get("http://h.example/")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn zero_open_duration_and_zero_probes_still_probe_and_close() {
    let fail = Arc::new(AtomicUsize::new(1));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::ZERO, Duration::ZERO)
        .with_probes(0)
        .with_successes_to_close(0)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(mock(fail.clone()));
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    fail.store(0, Ordering::SeqCst);
    tokio::time::advance(Duration::from_millis(1)).await;
    let r = svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(handle.state("h.example"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn open_period_doubles_up_to_max_and_resets_after_close() {
    let fail = Arc::new(AtomicUsize::new(1));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_millis(100), Duration::from_millis(350))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(mock(fail.clone()));
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let err = svc
            .clone()
            .oneshot(get("http://h.example/"))
            .await
            .unwrap_err();
        let d = open_of(&err).retry_in();
        seen.push(d);
        tokio::time::advance(d).await;
        // the probe fails: reopen
        svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    }
    let ms: Vec<u128> = seen.iter().map(|d| d.as_millis()).collect();
    assert_eq!(ms, vec![100, 200, 350, 350], "{seen:?}");
    // Close, then the next opening is back at the base.
    let err = svc
        .clone()
        .oneshot(get("http://h.example/"))
        .await
        .unwrap_err();
    tokio::time::advance(open_of(&err).retry_in()).await;
    fail.store(0, Ordering::SeqCst);
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    assert_eq!(handle.state("h.example"), Some(CircuitState::Closed));
    fail.store(1, Ordering::SeqCst);
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    let err = svc
        .clone()
        .oneshot(get("http://h.example/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_millis(100));
}

#[test]
fn failure_rate_is_validated() {
    for (r, w) in [
        (-0.1, Duration::from_secs(1)),
        (1.1, Duration::from_secs(1)),
        (f64::NAN, Duration::from_secs(1)),
        (0.5, Duration::ZERO),
    ] {
        assert!(
            CircuitBreakerLayer::new()
                .with_failure_rate(r, w, 10)
                .is_err(),
            "{r} {w:?}"
        );
    }
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::MAX, u32::MAX)
        .is_ok());
}
