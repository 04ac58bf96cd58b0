//! Breaker behaviour on in-process services with paused time, and on 2 threads.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy_circuit::{CircuitBreakerLayer, CircuitState};
use sturdy_core::{BoxError, CircuitOpen};
use tower::{service_fn, Layer, Service, ServiceExt};

/// A dependency whose health the test flips, counting the calls that reach it.
#[derive(Clone, Default)]
struct Dep {
    healthy: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
    delay: Duration,
}

impl Dep {
    fn down() -> Self {
        Self::default()
    }

    fn slow(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }

    fn heal(&self) {
        self.healthy.store(true, Ordering::SeqCst);
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<()>,
        Response = Response<()>,
        Error = BoxError,
        Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
    > + Clone
           + Send {
        let this = self.clone();
        service_fn(move |_req: Request<()>| {
            let this = this.clone();
            async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                if !this.delay.is_zero() {
                    tokio::time::sleep(this.delay).await;
                }
                let s = if this.healthy.load(Ordering::SeqCst) {
                    200
                } else {
                    503
                };
                Ok(Response::builder().status(s).body(()).unwrap())
            }
        })
    }
}

fn req(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn five_failures_open_and_1000_calls_never_reach_the_server() {
    let dep = Dep::down();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.service());
    for _ in 0..5 {
        assert_eq!(
            svc.clone().oneshot(req("a")).await.unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(
        handle.state("a"),
        Some(CircuitState::Open {
            retry_in: Duration::from_secs(30)
        })
    );
    for _ in 0..1_000 {
        let err = svc.clone().oneshot(req("a")).await.unwrap_err();
        let open = err.downcast_ref::<CircuitOpen>().unwrap();
        assert_eq!(open.key(), "a");
        assert_eq!(open.retry_in(), Duration::from_secs(30));
    }
    assert_eq!(dep.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn after_the_open_period_exactly_one_probe_reaches_the_server() {
    let dep = Dep::slow(Duration::from_millis(100));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.service());
    for _ in 0..5 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    dep.heal();
    let calls: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(req("a"))))
        .collect();
    let mut ok = 0;
    let mut fast_failed = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.is::<CircuitOpen>());
                fast_failed += 1;
            }
        }
    }
    assert_eq!((ok, fast_failed), (1, 99));
    assert_eq!(dep.calls(), 6);
    assert_eq!(handle.state("a"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn k_probes_with_k_configured() {
    let dep = Dep::slow(Duration::from_millis(100));
    let layer = CircuitBreakerLayer::new()
        .with_probes(3)
        .with_successes_to_close(3);
    let svc = layer.layer(dep.service());
    for _ in 0..5 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    dep.heal();
    let calls: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(req("a"))))
        .collect();
    let ok = futures_ok(calls).await;
    assert_eq!(ok, 3);
    assert_eq!(dep.calls(), 5 + 3);
}

async fn futures_ok(calls: Vec<tokio::task::JoinHandle<Result<Response<()>, BoxError>>>) -> usize {
    let mut ok = 0;
    for c in calls {
        if c.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_longer_and_a_good_probe_closes() {
    let dep = Dep::down();
    let changes = Arc::new(Mutex::new(Vec::new()));
    let log = changes.clone();
    let (layer, handle) = CircuitBreakerLayer::new()
        .on_state_change(move |key, from, to| log.lock().unwrap().push((key.to_owned(), from, to)))
        .pair();
    let svc = layer.layer(dep.service());
    for _ in 0..5 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    // The probe fails: open again, for 60 s this time.
    assert_eq!(
        svc.clone().oneshot(req("a")).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        handle.state("a"),
        Some(CircuitState::Open {
            retry_in: Duration::from_secs(60)
        })
    );
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(svc.clone().oneshot(req("a")).await.is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    dep.heal();
    assert_eq!(
        svc.clone().oneshot(req("a")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(handle.state("a"), Some(CircuitState::Closed));
    assert_eq!(dep.calls(), 7);
    let seen: Vec<_> = changes
        .lock()
        .unwrap()
        .iter()
        .map(|(_, _, to)| *to)
        .collect();
    assert_eq!(
        seen,
        [
            CircuitState::Open {
                retry_in: Duration::from_secs(30)
            },
            CircuitState::HalfOpen,
            CircuitState::Open {
                retry_in: Duration::from_secs(60)
            },
            CircuitState::HalfOpen,
            CircuitState::Closed,
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn host_a_failing_does_not_open_host_b() {
    let dep = Dep::down();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.service());
    for _ in 0..5 {
        svc.clone().oneshot(req("a.example")).await.unwrap();
    }
    dep.heal();
    assert_eq!(
        svc.clone()
            .oneshot(req("b.example"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert!(matches!(
        handle.state("a.example"),
        Some(CircuitState::Open { .. })
    ));
    assert_eq!(handle.state("b.example"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn failure_rate_opens_at_the_threshold_not_before_the_minimum() {
    // Alternate success and failure: never 5 in a row, 50 % failures.
    let n = Arc::new(AtomicU32::new(0));
    let counter = n.clone();
    let svc = service_fn(move |_req: Request<()>| {
        let i = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(if i % 2 == 1 { 500 } else { 200 })
                    .body(())
                    .unwrap(),
            )
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(svc);
    for i in 0..19 {
        svc.clone().oneshot(req("a")).await.unwrap();
        assert_eq!(
            handle.state("a"),
            Some(CircuitState::Closed),
            "after {} calls",
            i + 1
        );
    }
    // Call 20 fails: 10 of 20 failed, the threshold is met.
    svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 20);
    assert!(
        matches!(handle.state("a"), Some(CircuitState::Open { .. })),
        "{:?}",
        handle.state("a")
    );
}

#[tokio::test(start_paused = true)]
async fn old_failures_leave_the_window() {
    let n = Arc::new(AtomicU32::new(0));
    let counter = n.clone();
    let svc = service_fn(move |_req: Request<()>| {
        let i = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(if i.is_multiple_of(2) { 500 } else { 200 })
                    .body(())
                    .unwrap(),
            )
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(svc);
    for _ in 0..18 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(31)).await;
    for _ in 0..4 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    assert_eq!(handle.state("a"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn client_errors_and_429_are_not_failures() {
    for status in [400, 404, 422, 429] {
        let svc = service_fn(move |_req: Request<()>| async move {
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        });
        let (layer, handle) = CircuitBreakerLayer::new().pair();
        let svc = layer.layer(svc);
        for _ in 0..50 {
            svc.clone().oneshot(req("a")).await.unwrap();
        }
        assert_eq!(handle.state("a"), Some(CircuitState::Closed), "{status}");
    }
}

#[tokio::test(start_paused = true)]
async fn errors_count_by_kind_and_the_classifier_can_be_replaced() {
    let refused = service_fn(|_req: Request<()>| async {
        Err::<Response<()>, BoxError>(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )))
    });
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(refused);
    for _ in 0..5 {
        assert!(svc
            .clone()
            .oneshot(req("a"))
            .await
            .unwrap_err()
            .to_string()
            .contains("refused"));
    }
    assert!(matches!(handle.state("a"), Some(CircuitState::Open { .. })));

    // A classifier that also counts 404 (say, a dependency that loses its routes when it dies).
    let not_found = service_fn(|_req: Request<()>| async {
        Ok::<_, BoxError>(Response::builder().status(404).body(()).unwrap())
    });
    let layer = CircuitBreakerLayer::new().with_classifier(|r: &Result<Response<()>, BoxError>| {
        r.as_ref().map_or(true, |r| r.status() == 404)
    });
    let handle = layer.handle();
    let svc = layer.layer(not_found);
    for _ in 0..5 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    assert!(matches!(handle.state("a"), Some(CircuitState::Open { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_slot_back() {
    let dep = Dep::slow(Duration::from_secs(10));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.service());
    for _ in 0..5 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    // The probe is abandoned by a caller-side timeout.
    let probe =
        tokio::time::timeout(Duration::from_millis(10), svc.clone().oneshot(req("a"))).await;
    assert!(probe.is_err());
    assert_eq!(handle.state("a"), Some(CircuitState::HalfOpen));
    dep.heal();
    let dep_fast = dep.clone();
    drop(dep_fast);
    // The next caller becomes the probe instead of failing fast forever.
    let next = tokio::spawn(svc.clone().oneshot(req("a")));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(next.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(handle.state("a"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn force_open_isolates_and_force_close_resets() {
    let dep = Dep::down();
    dep.heal();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.service());
    handle.force_open("a");
    tokio::time::advance(Duration::from_secs(3_600)).await;
    assert!(svc
        .clone()
        .oneshot(req("a"))
        .await
        .unwrap_err()
        .is::<CircuitOpen>());
    assert_eq!(handle.state("a"), Some(CircuitState::ForcedOpen));
    handle.force_close("a");
    assert_eq!(
        svc.clone().oneshot(req("a")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        handle.states(),
        vec![("a".to_owned(), CircuitState::Closed)]
    );
}

#[tokio::test(start_paused = true)]
async fn custom_keys_and_the_bound_on_breakers() {
    let dep = Dep::down();
    let layer = CircuitBreakerLayer::new()
        .with_max_breakers(4)
        .with_key(|r: &Request<()>| r.uri().path().to_owned());
    let handle = layer.handle();
    let svc = layer.layer(dep.service());
    for i in 0..100 {
        let _ = svc
            .clone()
            .oneshot(Request::get(format!("http://h/{i}")).body(()).unwrap())
            .await;
    }
    // Each breaker saw a failure, so none is idle: 4 keys kept, every later key in the overflow.
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["*", "/0", "/1", "/2", "/3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_probes_than_allowed_on_two_threads() {
    // Real time, millisecond scale: open for 20 ms, then 2 threads race to probe.
    for _round in 0..20 {
        let dep = Dep::slow(Duration::from_millis(5));
        let in_flight = Arc::new(AtomicU32::new(0));
        let max_seen = Arc::new(AtomicU32::new(0));
        let (f, m) = (in_flight.clone(), max_seen.clone());
        let inner = dep.service();
        let counting = service_fn(move |r: Request<()>| {
            let (f, m, mut inner) = (f.clone(), m.clone(), inner.clone());
            async move {
                let now = f.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                let out = inner.call(r).await;
                f.fetch_sub(1, Ordering::SeqCst);
                out
            }
        });
        let layer = CircuitBreakerLayer::new()
            .with_open_duration(Duration::from_millis(20), Duration::from_millis(20))
            .with_probes(2);
        let svc = layer.layer(counting);
        for _ in 0..5 {
            svc.clone().oneshot(req("a")).await.unwrap();
        }
        max_seen.store(0, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(25)).await;
        let tasks: Vec<_> = (0..64)
            .map(|_| tokio::spawn(svc.clone().oneshot(req("a"))))
            .collect();
        for t in tasks {
            let _ = t.await.unwrap();
        }
        assert!(
            max_seen.load(Ordering::SeqCst) <= 2,
            "{} probes at once",
            max_seen.load(Ordering::SeqCst)
        );
    }
}

#[test]
fn traits() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>() {}
    type Mock = tower_test::mock::Mock<Request<()>, Response<()>>;
    assert_send_sync_clone::<CircuitBreakerLayer>();
    assert_send_sync_clone::<
        sturdy_circuit::CircuitBreaker<
            Mock,
            sturdy_circuit::ByHost,
            sturdy_circuit::DefaultFailure,
        >,
    >();
    assert_send::<
        sturdy_circuit::ResponseFuture<
            <Mock as Service<Request<()>>>::Future,
            sturdy_circuit::DefaultFailure,
        >,
    >();
    assert_send_sync_clone::<sturdy_circuit::CircuitHandle>();
}

#[tokio::test(start_paused = true)]
async fn a_refusal_goes_to_the_trace() {
    let dep = Dep::down();
    let svc = CircuitBreakerLayer::new().layer(dep.service());
    for _ in 0..5 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    let trace = sturdy_core::Trace::new();
    let mut r = req("a");
    r.extensions_mut().insert(trace.clone());
    assert!(svc.clone().oneshot(r).await.is_err());
    assert!(
        matches!(&trace.events()[..], [sturdy_core::TraceEvent::Rejected { reason }] if reason.starts_with("circuit open for a")),
        "{:?}",
        trace.events()
    );
}
