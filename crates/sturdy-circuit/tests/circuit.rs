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

/// A breaker that opens on 5 failures in a row, to keep these tests short.
fn streak() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new().with_consecutive_failures(5)
}

fn req(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn five_failures_open_and_1000_calls_never_reach_the_server() {
    let dep = Dep::down();
    let (layer, handle) = streak().pair();
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
    let (layer, handle) = streak().pair();
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
    let layer = streak().with_probes(3).with_successes_to_close(3);
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
    let (layer, handle) = streak()
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
    let (layer, handle) = streak().pair();
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
    // Alternate success and failure: 50 % failures, never two in a row.
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
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::from_secs(30), 20)
        .unwrap()
        .pair();
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
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::from_secs(30), 20)
        .unwrap()
        .pair();
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
        let (layer, handle) = streak().pair();
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
    let (layer, handle) = streak().pair();
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
    let layer = streak().with_classifier(|r: &Result<Response<()>, BoxError>| match r {
        Ok(r) if r.status() == 404 => {
            sturdy_core::Outcome::Permanent(sturdy_core::ErrorKind::Server(StatusCode::NOT_FOUND))
        }
        other => sturdy_core::classify::classify_result(other),
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
    let (layer, handle) = streak().pair();
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
    let (layer, handle) = streak().pair();
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
    let layer = streak()
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
        let layer = streak()
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

/// "Stays open `base` the first time, doubling on each re-opening up to `max`": from 1 ms, the
/// period doubles until it reaches 5 min (it stopped at 2^16 ms, about 65 s, and never reached
/// the `max` it was given).
#[tokio::test(start_paused = true)]
async fn the_open_period_doubles_all_the_way_to_its_max() {
    let dep = Dep::down();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_millis(1), Duration::from_secs(300))
        .pair();
    let svc = layer.layer(dep.service());
    let mut periods = Vec::new();
    for _ in 0..22 {
        // The failed call (the first, then each probe) opens it again.
        svc.clone().oneshot(req("a")).await.unwrap();
        let Some(CircuitState::Open { retry_in }) = handle.state("a") else {
            panic!("not open: {:?}", handle.state("a"));
        };
        periods.push(retry_in);
        tokio::time::advance(retry_in + Duration::from_millis(1)).await;
    }
    let ms = Duration::from_millis;
    assert_eq!(&periods[..4], &[ms(1), ms(2), ms(4), ms(8)]);
    assert_eq!(periods[16], ms(65_536));
    assert_eq!(periods[17], ms(131_072));
    assert_eq!(periods[18], ms(262_144));
    assert_eq!(&periods[19..], &[Duration::from_secs(300); 3]);
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
            sturdy_circuit::DefaultClassify,
        >,
    >();
    assert_send::<
        sturdy_circuit::ResponseFuture<
            <Mock as Service<Request<()>>>::Future,
            sturdy_circuit::DefaultClassify,
        >,
    >();
    assert_send_sync_clone::<sturdy_circuit::CircuitHandle>();
}

#[tokio::test(start_paused = true)]
async fn a_refusal_goes_to_the_trace() {
    let dep = Dep::down();
    let svc = streak().layer(dep.service());
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

/// A dependency that fails a fixed share of calls, spread evenly and deterministically.
fn flaky(
    failure_per_mille: u32,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
> + Clone
       + Send {
    let n = Arc::new(AtomicU32::new(0));
    service_fn(move |_req: Request<()>| {
        // A multiplicative hash spreads the failures without a pattern a window could align with.
        let i = n.fetch_add(1, Ordering::SeqCst).wrapping_mul(2_654_435_761) % 1_000;
        async move {
            let status = if i < failure_per_mille { 503 } else { 200 };
            Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn stock_defaults_ride_out_a_flaky_api_and_cut_off_a_dead_one() {
    // 30 % of calls fail, 10,000 calls over 100 s: the breaker never opens.
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(flaky(300));
    let mut refused = 0;
    for i in 0..10_000 {
        if svc.clone().oneshot(req("a")).await.is_err() {
            refused += 1;
        }
        if i % 100 == 99 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    }
    assert_eq!(refused, 0);
    assert_eq!(handle.state("a"), Some(CircuitState::Closed));

    // A dead API: after the minimum volume the breaker opens, and the next 1,000 calls fail at
    // once without reaching it.
    let dep = Dep::down();
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.service());
    for _ in 0..100 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    assert!(matches!(handle.state("a"), Some(CircuitState::Open { .. })));
    for _ in 0..1_000 {
        let err = svc.clone().oneshot(req("a")).await.unwrap_err();
        assert!(err.is::<CircuitOpen>());
    }
    assert_eq!(dep.calls(), 100);
}

#[tokio::test(start_paused = true)]
async fn setters_after_a_pair_or_a_clone_keep_one_set_of_breakers() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let clone = layer.clone();
    // Configured after the handle and the clone were taken: all three still agree.
    let layer = layer.with_consecutive_failures(2).with_probes(2);
    let dep = Dep::down();
    let svc = layer.layer(dep.service());
    for _ in 0..2 {
        svc.clone().oneshot(req("a")).await.unwrap();
    }
    assert!(matches!(handle.state("a"), Some(CircuitState::Open { .. })));
    assert!(matches!(
        clone.handle().state("a"),
        Some(CircuitState::Open { .. })
    ));
    handle.force_close("a");
    assert_eq!(
        svc.clone().oneshot(req("a")).await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn invalid_settings_are_reported_when_configured() {
    for (rate, window) in [(-0.1, 30), (1.5, 30), (f64::NAN, 30), (0.5, 0)] {
        let err = CircuitBreakerLayer::new()
            .with_failure_rate(rate, Duration::from_secs(window), 10)
            .unwrap_err();
        assert_eq!(err.kind(), &sturdy_core::ErrorKind::Config);
    }
    // Values that cannot work are taken as the nearest that can, never a panic.
    let _ = CircuitBreakerLayer::new()
        .with_probes(0)
        .with_successes_to_close(0)
        .with_max_breakers(0)
        .with_consecutive_failures(0);
}

/// Errors for calls that never reached the dependency (a local rate limit, a token that could
/// not be had) are neither failures nor successes: they do not open the breaker, and in the
/// half-open state they do not close it (the probe's slot goes back).
#[tokio::test(start_paused = true)]
async fn refusals_made_before_the_dependency_are_not_counted() {
    use sturdy_core::{Error, ErrorKind, RateLimited};
    let mode = Arc::new(Mutex::new("fail"));
    let m = mode.clone();
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .layer(service_fn(move |_req: Request<()>| {
            let m = *m.lock().unwrap();
            async move {
                match m {
                    "fail" => Ok(Response::builder().status(503).body(()).unwrap()),
                    "limited" => Err::<Response<()>, BoxError>(Box::new(RateLimited::new(
                        Duration::from_secs(1),
                    ))),
                    "no token" => Err::<Response<()>, BoxError>(Box::new(
                        Error::new(
                            ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
                            "token endpoint down",
                        )
                        .with_cause_elsewhere(),
                    )),
                    _ => Ok(Response::new(())),
                }
            }
        }));
    let req = || Request::get("http://api.example.com/").body(()).unwrap();
    // Local refusals and token failures, many of them: the breaker stays closed.
    for m in ["limited", "no token"] {
        *mode.lock().unwrap() = m;
        for _ in 0..10 {
            let _ = svc.clone().oneshot(req()).await;
        }
    }
    *mode.lock().unwrap() = "fail";
    let _ = svc.clone().oneshot(req()).await;
    let _ = svc.clone().oneshot(req()).await;
    let err = svc.clone().oneshot(req()).await.unwrap_err();
    assert!(err.is::<CircuitOpen>(), "{err}");
    // Half-open: a probe refused by a local layer neither closes nor reopens the breaker.
    tokio::time::advance(Duration::from_secs(31)).await;
    *mode.lock().unwrap() = "no token";
    let err = svc.clone().oneshot(req()).await.unwrap_err();
    assert!(!err.is::<CircuitOpen>(), "the probe was admitted: {err}");
    *mode.lock().unwrap() = "ok";
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the probe's slot went back");
}

/// A half-open breaker whose probe is out, and a forced-open breaker, say so in their refusals.
#[tokio::test(start_paused = true)]
async fn refusals_say_why() {
    use sturdy_core::OpenReason;
    let dep = Dep::slow(Duration::from_secs(5));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(dep.service());
    let req = || Request::get("http://api.example.com/").body(()).unwrap();
    let _ = svc.clone().oneshot(req()).await;
    let open = svc.clone().oneshot(req()).await.unwrap_err();
    let open = open.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.reason(), OpenReason::Failing);
    tokio::time::advance(Duration::from_secs(31)).await;
    let probe = tokio::spawn(svc.clone().oneshot(req()));
    tokio::task::yield_now().await;
    let refused = svc.clone().oneshot(req()).await.unwrap_err();
    let refused = refused.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(refused.reason(), OpenReason::Probing);
    assert!(refused.to_string().contains("half-open"), "{refused}");
    assert!(!refused.to_string().contains("0ms"), "{refused}");
    let _ = probe.await;
    handle.force_open("api.example.com");
    let forced = svc.clone().oneshot(req()).await.unwrap_err();
    let forced = forced.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(forced.reason(), OpenReason::Forced);
    assert!(!forced.to_string().contains("has been failing"), "{forced}");
}

/// A hook of the user's that panics when the breaker lets a probe through must not keep the
/// probe's slot: every later call would be refused as "probing" until someone reset the breaker
/// by hand.
#[tokio::test(start_paused = true)]
async fn a_panicking_hook_at_half_open_does_not_keep_the_probe_slot() {
    use std::sync::atomic::AtomicBool;
    let dep = Dep::down();
    let panic_once = Arc::new(AtomicBool::new(true));
    let armed = panic_once.clone();
    let layer = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .on_event(move |e| {
            if let sturdy_core::events::Event::CircuitChanged { to, .. } = e {
                if *to == sturdy_core::events::BreakerState::HalfOpen
                    && armed.swap(false, Ordering::SeqCst)
                {
                    panic!("a hook's bug");
                }
            }
        });
    let svc = layer.layer(dep.service());
    svc.clone().oneshot(req("a")).await.unwrap();
    tokio::time::advance(Duration::from_millis(1_100)).await;
    let panicked = tokio::spawn(svc.clone().oneshot(req("a"))).await;
    assert!(panicked.unwrap_err().is_panic());
    // The next call is admitted as the probe (and, the dependency being healthy, closes it).
    dep.heal();
    let res = svc.clone().oneshot(req("a")).await;
    assert_eq!(res.unwrap().status(), StatusCode::OK);
}
