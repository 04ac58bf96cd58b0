//! `sturdy::circuit` against `docs/guides/circuit.md` and its crate docs: thresholds, open
//! periods, probes, hostile settings, cancellation and composition, on paused time.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::{classify_error, classify_result, delivery, Outcome};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, CircuitOpen, Delivery, ErrorKind, OpenReason};
use tokio::time::{advance, Instant};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::auth29_util::{spawn_call, Logs};

type DepSvc = tower::util::BoxCloneSyncService<Request<()>, Response<()>, BoxError>;

/// A dependency whose status and delay can be changed, counting calls.
#[derive(Clone, Default)]
struct Dep {
    status: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
    delay: Arc<Mutex<Option<Duration>>>,
}

impl Dep {
    fn new(status: u16) -> Self {
        let d = Self::default();
        d.set(status);
        d
    }
    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
    fn delay(&self, d: Option<Duration>) {
        *self.delay.lock().unwrap() = d;
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    /// Status 0 answers with a connection-reset io error; 1 with an error nobody knows.
    fn svc(&self) -> DepSvc {
        let d = self.clone();
        DepSvc::new(tower::service_fn(move |_req: Request<()>| {
            let d = d.clone();
            async move {
                d.calls.fetch_add(1, Ordering::SeqCst);
                let delay = *d.delay.lock().unwrap();
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                match d.status.load(Ordering::SeqCst) {
                    0 => Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "reset",
                    )) as BoxError),
                    1 => Err("something odd".into()),
                    s => Ok(Response::builder().status(s).body(()).unwrap()),
                }
            }
        }))
    }
}

fn req(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

async fn call<S>(svc: &S, host: &str) -> Result<Response<()>, BoxError>
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
{
    svc.clone().oneshot(req(host)).await
}

fn open_err(r: Result<Response<()>, BoxError>) -> CircuitOpen {
    let e = r.expect_err("expected a refusal");
    sturdy::core::find::<CircuitOpen>(&*e)
        .unwrap_or_else(|| panic!("not CircuitOpen: {e}"))
        .clone()
}

fn streak(n: u32) -> CircuitBreakerLayer {
    CircuitBreakerLayer::new().with_consecutive_failures(n)
}

#[tokio::test(start_paused = true)]
async fn the_crate_example_opens_after_100_failing_calls() {
    let dep = Dep::new(502);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.svc());
    for i in 0..99 {
        assert_eq!(
            call(&svc, "api.example.com").await.unwrap().status(),
            502,
            "{i}"
        );
    }
    assert_eq!(handle.state("api.example.com"), Some(CircuitState::Closed));
    call(&svc, "api.example.com").await.unwrap();
    let e = open_err(call(&svc, "api.example.com").await);
    assert_eq!(e.reason(), OpenReason::Failing);
    assert!(matches!(
        handle.state("api.example.com"),
        Some(CircuitState::Open { .. })
    ));
    assert_eq!(dep.calls(), 100);
}

#[tokio::test(start_paused = true)]
async fn fifty_percent_opens_and_forty_nine_does_not() {
    let dep = Dep::new(200);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..51 {
        call(&svc, "a.test").await.unwrap();
    }
    dep.set(500);
    for _ in 0..49 {
        call(&svc, "a.test").await.unwrap();
    }
    assert_eq!(
        handle.state("a.test"),
        Some(CircuitState::Closed),
        "49 % opened it"
    );

    let dep = Dep::new(200);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..50 {
        call(&svc, "b.test").await.unwrap();
    }
    dep.set(500);
    for _ in 0..50 {
        call(&svc, "b.test").await.unwrap();
    }
    assert!(
        matches!(handle.state("b.test"), Some(CircuitState::Open { .. })),
        "50 % of 100 did not open it: {:?}",
        handle.state("b.test")
    );
}

#[tokio::test(start_paused = true)]
async fn failures_older_than_the_window_are_forgotten() {
    let dep = Dep::new(500);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..60 {
        call(&svc, "w.test").await.unwrap();
    }
    advance(Duration::from_secs(31)).await;
    for _ in 0..40 {
        call(&svc, "w.test").await.unwrap();
    }
    assert_eq!(
        handle.state("w.test"),
        Some(CircuitState::Closed),
        "failures from 31 s ago still counted"
    );
}

#[tokio::test(start_paused = true)]
async fn open_fails_fast_without_calling_the_dependency_and_says_when() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "down.test").await.unwrap();
    for _ in 0..10 {
        let e = open_err(call(&svc, "down.test").await);
        assert_eq!(e.retry_in(), Duration::from_secs(30));
        assert_eq!(e.key(), "down.test");
        let m = e.to_string();
        assert!(
            m.contains("failing") && m.contains("try again in 30s"),
            "{m}"
        );
    }
    assert_eq!(dep.calls(), 1);
    advance(Duration::from_secs(12)).await;
    let e = open_err(call(&svc, "down.test").await);
    assert_eq!(e.retry_in(), Duration::from_secs(18));
    assert_eq!(
        handle.state("down.test"),
        Some(CircuitState::Open {
            retry_in: Duration::from_secs(18)
        })
    );
    let boxed: BoxError = Box::new(e);
    assert_eq!(delivery(&*boxed), Delivery::NotSent);
    assert_eq!(
        classify_error(&*boxed),
        ErrorKind::CircuitOpen {
            retry_in: Duration::from_secs(18)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_one_probe_and_refuses_the_rest_with_probing() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "p.test").await.unwrap();
    advance(Duration::from_secs(30)).await;
    dep.set(200);
    dep.delay(Some(Duration::from_secs(1)));
    let probe = spawn_call(svc.clone(), req("p.test"));
    tokio::task::yield_now().await;
    assert_eq!(handle.state("p.test"), Some(CircuitState::HalfOpen));
    for _ in 0..5 {
        let e = open_err(call(&svc, "p.test").await);
        assert_eq!(e.reason(), OpenReason::Probing);
        assert_eq!(e.retry_in(), Duration::ZERO);
        assert!(
            e.to_string().contains("try again once they have answered"),
            "{e}"
        );
    }
    assert_eq!(probe.await.unwrap().unwrap(), 200);
    assert_eq!(handle.state("p.test"), Some(CircuitState::Closed));
    assert_eq!(dep.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn open_period_doubles_to_five_minutes_and_returns_to_30s_after_a_close() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "d.test").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..7 {
        let Some(CircuitState::Open { retry_in }) = handle.state("d.test") else {
            panic!("{:?}", handle.state("d.test"));
        };
        seen.push(retry_in.as_secs());
        advance(retry_in).await;
        // The probe fails: reopened at once.
        call(&svc, "d.test").await.unwrap();
    }
    assert_eq!(seen, [30, 60, 120, 240, 300, 300, 300]);
    let Some(CircuitState::Open { retry_in }) = handle.state("d.test") else {
        panic!()
    };
    advance(retry_in).await;
    dep.set(200);
    call(&svc, "d.test").await.unwrap();
    assert_eq!(handle.state("d.test"), Some(CircuitState::Closed));
    dep.set(503);
    call(&svc, "d.test").await.unwrap();
    assert_eq!(
        handle.state("d.test"),
        Some(CircuitState::Open {
            retry_in: Duration::from_secs(30)
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_slot_back() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "q.test").await.unwrap();
    advance(Duration::from_secs(30)).await;
    dep.delay(Some(Duration::from_secs(3600)));
    dep.set(200);
    // Dropped while the dependency works on it.
    let r = tokio::time::timeout(Duration::from_millis(10), call(&svc, "q.test")).await;
    assert!(r.is_err());
    assert_eq!(dep.calls(), 2);
    // Made but never polled, then dropped.
    let mut s = svc.clone();
    s.ready().await.unwrap();
    let fut = s.call(req("q.test"));
    drop(fut);
    dep.delay(None);
    let res = call(&svc, "q.test").await.expect("the probe slot was lost");
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state("q.test"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_not_counted() {
    let dep = Dep::new(503);
    dep.delay(Some(Duration::from_secs(60)));
    let (layer, handle) = streak(1).pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..10 {
        let r = tokio::time::timeout(Duration::from_millis(5), call(&svc, "x.test")).await;
        assert!(r.is_err());
    }
    assert_eq!(handle.state("x.test"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn probes_and_successes_to_close() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).with_probes(2).with_successes_to_close(3).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "m.test").await.unwrap();
    advance(Duration::from_secs(30)).await;
    dep.set(200);
    dep.delay(Some(Duration::from_secs(1)));
    let a = spawn_call(svc.clone(), req("m.test"));
    let b = spawn_call(svc.clone(), req("m.test"));
    tokio::task::yield_now().await;
    assert_eq!(
        open_err(call(&svc, "m.test").await).reason(),
        OpenReason::Probing
    );
    assert!(a.await.unwrap().is_ok() && b.await.unwrap().is_ok());
    assert_eq!(
        handle.state("m.test"),
        Some(CircuitState::HalfOpen),
        "closed after 2 of 3"
    );
    dep.delay(None);
    call(&svc, "m.test").await.unwrap();
    assert_eq!(handle.state("m.test"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn zero_probes_and_zero_successes_are_taken_as_one() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).with_probes(0).with_successes_to_close(0).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "z.test").await.unwrap();
    advance(Duration::from_secs(30)).await;
    dep.set(200);
    assert_eq!(call(&svc, "z.test").await.unwrap().status(), 200);
    assert_eq!(handle.state("z.test"), Some(CircuitState::Closed));
}

#[test]
fn failure_rate_validation_names_the_cause() {
    for rate in [1.01, -0.01, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = CircuitBreakerLayer::new()
            .with_failure_rate(rate, Duration::from_secs(30), 10)
            .expect_err(&format!("{rate}"));
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.to_string().contains("rate"), "{err}");
    }
    let err = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::ZERO, 10)
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config);
    assert!(err.to_string().contains("window"), "{err}");
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::MAX, u32::MAX)
        .is_ok());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(0.0, Duration::from_nanos(1), 0)
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_zero_failure_rate_does_not_open_on_successes() {
    let dep = Dep::new(200);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.0, Duration::from_secs(30), 5)
        .unwrap()
        .pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..20 {
        let _ = call(&svc, "ok.test").await;
    }
    assert_eq!(handle.state("ok.test"), Some(CircuitState::Closed));
    assert_eq!(dep.calls(), 20);
}

#[tokio::test(start_paused = true)]
async fn rate_one_needs_every_call_to_fail() {
    let dep = Dep::new(200);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::from_secs(30), 10)
        .unwrap()
        .pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "r.test").await.unwrap();
    dep.set(500);
    for _ in 0..20 {
        call(&svc, "r.test").await.unwrap();
    }
    assert_eq!(handle.state("r.test"), Some(CircuitState::Closed));
    let dep = Dep::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::from_secs(30), 10)
        .unwrap()
        .pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..10 {
        call(&svc, "r.test").await.unwrap();
    }
    assert!(matches!(
        handle.state("r.test"),
        Some(CircuitState::Open { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn huge_min_calls_and_streaks_never_open_and_never_panic() {
    let dep = Dep::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::MAX, u32::MAX)
        .unwrap()
        .with_consecutive_failures(u32::MAX)
        .pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..300 {
        call(&svc, "h.test").await.unwrap();
    }
    advance(Duration::from_secs(86_400 * 365 * 200)).await;
    call(&svc, "h.test").await.unwrap();
    assert_eq!(handle.state("h.test"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_streak_trigger_needs_failures_in_a_row_and_zero_turns_it_off() {
    let dep = Dep::new(500);
    let (layer, handle) = streak(3).pair();
    let svc = layer.layer(dep.svc());
    for s in [500, 500, 200, 500, 500] {
        dep.set(s);
        call(&svc, "s.test").await.unwrap();
    }
    assert_eq!(handle.state("s.test"), Some(CircuitState::Closed));
    call(&svc, "s.test").await.unwrap();
    assert!(matches!(
        handle.state("s.test"),
        Some(CircuitState::Open { .. })
    ));

    let dep = Dep::new(500);
    let (layer, handle) = streak(0).pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..99 {
        call(&svc, "s.test").await.unwrap();
    }
    assert_eq!(handle.state("s.test"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn open_duration_max_is_about_thirty_years_and_never_panics() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1)
        .with_open_duration(Duration::MAX, Duration::MAX)
        .pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "max.test").await.unwrap();
    let e = open_err(call(&svc, "max.test").await);
    let years = e.retry_in().as_secs_f64() / (365.25 * 86_400.0);
    assert!((25.0..=35.0).contains(&years), "{years} years");
    let _ = e.to_string();
    assert!(matches!(
        handle.state("max.test"),
        Some(CircuitState::Open { .. })
    ));
    handle.force_open("max.test");
    let e = open_err(call(&svc, "max.test").await);
    assert_eq!(e.reason(), OpenReason::Forced);
    let _ = format!("{e} {:?}", handle.states());
    advance(Duration::from_secs(86_400 * 365 * 40)).await;
    handle.force_close("max.test");
    dep.set(200);
    call(&svc, "max.test").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn zero_open_duration_probes_at_once() {
    let dep = Dep::new(503);
    let svc = streak(1)
        .with_open_duration(Duration::ZERO, Duration::ZERO)
        .layer(dep.svc());
    call(&svc, "zero.test").await.unwrap();
    dep.set(200);
    let r = call(&svc, "zero.test").await;
    match r {
        Ok(res) => assert_eq!(res.status(), 200),
        Err(e) => panic!("a zero open period refused: {e}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_max_below_the_base_does_not_panic() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1)
        .with_open_duration(Duration::from_secs(60), Duration::from_secs(10))
        .pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "mb.test").await.unwrap();
    let Some(CircuitState::Open { retry_in }) = handle.state("mb.test") else {
        panic!()
    };
    assert!(
        retry_in == Duration::from_secs(10) || retry_in == Duration::from_secs(60),
        "{retry_in:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn clocks_advanced_by_centuries() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "c.test").await.unwrap();
    advance(Duration::from_secs(86_400 * 365 * 300)).await;
    dep.set(200);
    call(&svc, "c.test").await.unwrap();
    assert_eq!(handle.state("c.test"), Some(CircuitState::Closed));
    // A closed breaker with failures in its window, then 500 years.
    let dep = Dep::new(500);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.svc());
    for _ in 0..99 {
        call(&svc, "c2.test").await.unwrap();
    }
    advance(Duration::from_secs(86_400 * 365 * 500)).await;
    let start = Instant::now();
    call(&svc, "c2.test").await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        handle.state("c2.test"),
        Some(CircuitState::Closed),
        "old failures counted"
    );
}

#[tokio::test(start_paused = true)]
async fn four_hundreds_429_and_401_are_not_failures_but_5xx_and_errors_are() {
    for s in [400u16, 401, 403, 404, 409, 422, 429] {
        let dep = Dep::new(s);
        let (layer, handle) = streak(1).pair();
        let svc = layer.layer(dep.svc());
        for _ in 0..5 {
            call(&svc, "n.test").await.unwrap();
        }
        assert_eq!(handle.state("n.test"), Some(CircuitState::Closed), "{s}");
    }
    for s in [0u16, 1, 500, 502, 503, 504] {
        let dep = Dep::new(s);
        let (layer, handle) = streak(1).pair();
        let svc = layer.layer(dep.svc());
        let _ = call(&svc, "f.test").await;
        assert!(
            matches!(handle.state("f.test"), Some(CircuitState::Open { .. })),
            "{s} not a failure"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_timeout_under_the_breaker_is_a_failure() {
    let dep = Dep::new(200);
    dep.delay(Some(Duration::from_secs(10)));
    let (layer, handle) = streak(1).pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .timeout(Duration::from_secs(1))
        .service(dep.svc());
    assert!(call(&svc, "t.test").await.is_err());
    assert!(matches!(
        handle.state("t.test"),
        Some(CircuitState::Open { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn load_shed_refusals_are_not_counted() {
    let dep = Dep::new(200);
    dep.delay(Some(Duration::from_secs(5)));
    let (layer, handle) = streak(1).pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .load_shed()
        .concurrency_limit(1)
        .service(dep.svc());
    let held = spawn_call(svc.clone(), req("ls.test"));
    tokio::task::yield_now().await;
    for _ in 0..5 {
        assert!(call(&svc, "ls.test").await.is_err());
    }
    assert_eq!(handle.state("ls.test"), Some(CircuitState::Closed));
    assert!(held.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn force_open_and_force_close() {
    let dep = Dep::new(200);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep.svc());
    handle.force_open("f.test");
    let e = open_err(call(&svc, "f.test").await);
    assert_eq!(e.reason(), OpenReason::Forced);
    assert_eq!(e.retry_in(), Duration::from_secs(300));
    assert_eq!(handle.state("f.test"), Some(CircuitState::ForcedOpen));
    advance(Duration::from_secs(3600)).await;
    assert_eq!(
        open_err(call(&svc, "f.test").await).reason(),
        OpenReason::Forced
    );
    handle.force_close("f.test");
    assert_eq!(call(&svc, "f.test").await.unwrap().status(), 200);
    assert_eq!(dep.calls(), 1);
    assert!(handle.state("never.test").is_none());
    call(&svc, "b.test").await.unwrap();
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["b.test", "f.test"]);
}

#[tokio::test(start_paused = true)]
async fn state_change_callback_events_and_tracing() {
    let logs = Logs::default();
    let _g = logs.capture();
    let changes: Arc<Mutex<Vec<String>>> = Arc::default();
    let events: Arc<Mutex<Vec<String>>> = Arc::default();
    let (c, e) = (changes.clone(), events.clone());
    let dep = Dep::new(503);
    let svc = streak(1)
        .on_state_change(move |k, from, to| {
            c.lock().unwrap().push(format!("{k} {from:?} -> {to:?}"));
        })
        .on_event(move |ev| match ev {
            Event::CircuitChanged {
                key,
                host,
                from,
                to,
                ..
            } => e.lock().unwrap().push(format!(
                "changed {key} {host:?} {} {}",
                from.as_str(),
                to.as_str()
            )),
            Event::CircuitRejected { key, .. } => e.lock().unwrap().push(format!("rejected {key}")),
            _ => {}
        })
        .layer(dep.svc());
    call(&svc, "cb.test").await.unwrap();
    let _ = call(&svc, "cb.test").await;
    advance(Duration::from_secs(30)).await;
    dep.set(200);
    call(&svc, "cb.test").await.unwrap();
    let ch = changes.lock().unwrap().clone();
    assert_eq!(ch.len(), 3, "{ch:?}");
    assert!(ch[0].starts_with("cb.test Closed -> Open"), "{ch:?}");
    assert!(
        ch[1].starts_with("cb.test Open") && ch[1].ends_with("-> HalfOpen"),
        "{ch:?}"
    );
    assert!(ch[2].ends_with("HalfOpen -> Closed"), "{ch:?}");
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev,
        [
            "changed cb.test Some(\"cb.test\") closed open",
            "rejected cb.test",
            "changed cb.test Some(\"cb.test\") open half_open",
            "changed cb.test Some(\"cb.test\") half_open closed",
        ]
    );
    let text = logs.text();
    assert!(
        text.matches("cb.test").count() >= 3,
        "no tracing event per change: {text}"
    );
}

#[tokio::test(start_paused = true)]
async fn past_max_breakers_healthy_ones_are_forgotten_then_new_hosts_share_the_overflow() {
    let dep = Dep::new(200);
    let (layer, handle) = streak(1).with_max_breakers(2).pair();
    let svc = layer.layer(dep.svc());
    for h in ["a.test", "b.test", "c.test", "d.test"] {
        call(&svc, h).await.unwrap();
    }
    assert!(handle.states().len() <= 2, "{:?}", handle.states());
    // Two failing hosts fill the bound; the next host shares the overflow breaker.
    dep.set(503);
    call(&svc, "x.test").await.unwrap();
    call(&svc, "y.test").await.unwrap();
    call(&svc, "z.test").await.unwrap();
    let e = open_err(call(&svc, "w.test").await);
    assert_eq!(e.reason(), OpenReason::Overflow);
    assert!(e.to_string().contains("w.test"), "{e}");
    assert_eq!(e.key(), "w.test");
    assert!(matches!(
        handle.state("w.test"),
        Some(CircuitState::Open { .. })
    ));
    // Forcing one host past the bound open isolates it alone.
    handle.force_close("*");
    dep.set(200);
    handle.force_open("v.test");
    assert_eq!(
        open_err(call(&svc, "v.test").await).reason(),
        OpenReason::Forced
    );
    assert_eq!(call(&svc, "u.test").await.unwrap().status(), 200);
}

#[tokio::test(start_paused = true)]
async fn zero_max_breakers_still_works() {
    let dep = Dep::new(200);
    let svc = streak(1).with_max_breakers(0).layer(dep.svc());
    for h in ["a.test", "b.test"] {
        assert_eq!(call(&svc, h).await.unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn a_setter_after_pair_applies_to_all_but_earlier_services_keep_theirs() {
    let dep = Dep::new(503);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let early = layer.layer(dep.svc());
    let layer = layer.with_consecutive_failures(1);
    let late = layer.layer(dep.svc());
    call(&late, "set.test").await.unwrap();
    assert!(matches!(
        handle.state("set.test"),
        Some(CircuitState::Open { .. })
    ));
    for _ in 0..5 {
        call(&early, "early.test").await.unwrap();
    }
    assert!(
        handle.state("early.test").is_none(),
        "the handle sees the old breakers"
    );
    let _ = early;
}

#[tokio::test(start_paused = true)]
async fn with_key_chooses_breakers_and_events_carry_no_host() {
    let hosts: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let h2 = hosts.clone();
    let dep = Dep::new(503);
    let (layer, handle) = streak(1)
        .on_event(move |e| {
            if let Event::CircuitChanged { host, .. } = e {
                h2.lock().unwrap().push(host.map(str::to_owned));
            }
        })
        .with_key(|r: &Request<()>| r.uri().path().to_owned())
        .pair();
    let svc = layer.layer(dep.svc());
    call(&svc, "one.test").await.unwrap();
    assert!(matches!(
        handle.state("/x"),
        Some(CircuitState::Open { .. })
    ));
    assert!(open_err(call(&svc, "two.test").await).key() == "/x");
    assert_eq!(*hosts.lock().unwrap(), [None]);
}

#[tokio::test(start_paused = true)]
async fn the_classifier_example_counts_a_degraded_200() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_classifier(|r: &Result<Response<()>, BoxError>| match r {
            Ok(res) if res.headers().contains_key("x-degraded") => {
                Outcome::Retryable(ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE))
            }
            other => classify_result(other),
        })
        .pair();
    let svc = layer.layer(tower::service_fn(|_r: Request<()>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .header("x-degraded", "1")
                .body(())
                .unwrap(),
        )
    }));
    call(&svc, "deg.test").await.unwrap();
    call(&svc, "deg.test").await.unwrap();
    assert!(matches!(
        handle.state("deg.test"),
        Some(CircuitState::Open { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn under_buffer_from_many_tasks() {
    let dep = Dep::new(200);
    dep.delay(Some(Duration::from_millis(10)));
    let (layer, handle) = streak(3).pair();
    let svc = tower::buffer::Buffer::new(layer.layer(dep.svc()), 4);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let svc = svc.clone();
        tasks.push(spawn_call(
            svc,
            req(if i % 2 == 0 { "e.test" } else { "o.test" }),
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    dep.set(503);
    for _ in 0..3 {
        svc.clone().oneshot(req("e.test")).await.unwrap();
    }
    let err = svc.clone().oneshot(req("e.test")).await.unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(handle.state("o.test"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn over_concurrency_limit_one_with_a_kept_service() {
    let dep = Dep::new(200);
    dep.delay(Some(Duration::from_millis(5)));
    let (layer, handle) = streak(2).pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .timeout(Duration::from_secs(1))
        .service(dep.svc());
    for i in 0..20 {
        dep.set(if i % 2 == 0 { 503 } else { 200 });
        let r = svc
            .ready()
            .await
            .unwrap()
            .call(req("k.test"))
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), if i % 2 == 0 { 503 } else { 200 });
    }
    assert_eq!(handle.state("k.test"), Some(CircuitState::Closed));
    dep.set(503);
    for _ in 0..2 {
        svc.ready()
            .await
            .unwrap()
            .call(req("k.test"))
            .await
            .unwrap();
    }
    // Refused calls do not touch the limit: the kept service goes on.
    for _ in 0..5 {
        let e = svc
            .ready()
            .await
            .unwrap()
            .call(req("k.test"))
            .await
            .unwrap_err();
        assert!(sturdy::core::find::<CircuitOpen>(&*e).is_some());
    }
    advance(Duration::from_secs(30)).await;
    dep.set(200);
    assert_eq!(
        svc.ready()
            .await
            .unwrap()
            .call(req("k.test"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_dropped_under_a_buffer_and_limit_does_not_stick() {
    let dep = Dep::new(503);
    let (layer, handle) = streak(1).pair();
    let svc = tower::buffer::Buffer::new(
        ServiceBuilder::new()
            .layer(layer)
            .concurrency_limit(1)
            .service(dep.svc()),
        2,
    );
    svc.clone().oneshot(req("bd.test")).await.unwrap();
    advance(Duration::from_secs(30)).await;
    dep.delay(Some(Duration::from_secs(600)));
    let r = tokio::time::timeout(
        Duration::from_millis(50),
        svc.clone().oneshot(req("bd.test")),
    )
    .await;
    assert!(r.is_err());
    dep.delay(None);
    dep.set(200);
    let r = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(req("bd.test")))
        .await
        .expect("stuck after a dropped probe");
    assert_eq!(r.unwrap().status(), 200);
    assert_eq!(handle.state("bd.test"), Some(CircuitState::Closed));
}

fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}

#[test]
fn the_service_and_layer_are_send_sync_clone() {
    let dep = Dep::new(200);
    let layer = CircuitBreakerLayer::new();
    assert_send_sync_clone(&layer);
    let svc = layer.layer(dep.svc());
    assert_send_sync_clone(&svc);
    let (_, handle) = CircuitBreakerLayer::new().pair();
    assert_send_sync_clone(&handle);
    let _ = format!("{handle:?}");
}
