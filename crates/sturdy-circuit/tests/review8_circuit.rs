//! Review of the failure-rate check on successes: the CHANGELOG's example, failures that left
//! the window (rate 0.0, the most eager setting), the window's edge, and a breaker closed by
//! hand or by its probes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use sturdy_circuit::{CircuitBreakerLayer, CircuitState};
use sturdy_core::BoxError;
use tower::{service_fn, Layer, Service, ServiceExt};

fn req() -> Request<()> {
    Request::get("http://a/x").body(()).unwrap()
}

/// A dependency that fails while `failing` is set.
fn dep(
    failing: Arc<AtomicBool>,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<()>, BoxError>> + Send,
> + Clone {
    service_fn(move |_r: Request<()>| {
        let s = if failing.load(Ordering::SeqCst) {
            503
        } else {
            200
        };
        async move { Ok::<_, BoxError>(Response::builder().status(s).body(()).unwrap()) }
    })
}

fn is_open(s: Option<CircuitState>) -> bool {
    matches!(s, Some(CircuitState::Open { .. }))
}

#[tokio::test(start_paused = true)]
async fn fifty_one_failures_then_forty_nine_successes_open_on_the_last_success() {
    let failing = Arc::new(AtomicBool::new(true));
    let (layer, h) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(dep(failing.clone()));
    for _ in 0..51 {
        svc.clone().oneshot(req()).await.unwrap();
    }
    failing.store(false, Ordering::SeqCst);
    for i in 0..48 {
        svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(h.state("a"), Some(CircuitState::Closed), "success {i}");
    }
    svc.clone().oneshot(req()).await.unwrap();
    assert!(is_open(h.state("a")), "{:?}", h.state("a"));
}

/// Rate 0.0: any failure in the window opens once the volume is there. A failure that left
/// the window (a stale `last_failure`) must not.
#[tokio::test(start_paused = true)]
async fn a_failure_that_left_the_window_never_opens_on_a_success() {
    let failing = Arc::new(AtomicBool::new(true));
    let (layer, h) = CircuitBreakerLayer::new()
        .with_failure_rate(0.0, Duration::from_secs(1), 10)
        .unwrap()
        .pair();
    let svc = layer.layer(dep(failing.clone()));
    svc.clone().oneshot(req()).await.unwrap();
    failing.store(false, Ordering::SeqCst);
    // Exactly one window later (ten 100 ms buckets), then further on.
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..30 {
        svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(h.state("a"), Some(CircuitState::Closed));
        tokio::time::advance(Duration::from_millis(37)).await;
    }
}

/// The same failure one bucket earlier is still in the window: the volume completed by
/// successes opens it (rate 0.0).
#[tokio::test(start_paused = true)]
async fn a_failure_still_in_the_window_opens_on_the_success_that_completes_the_volume() {
    let failing = Arc::new(AtomicBool::new(true));
    let (layer, h) = CircuitBreakerLayer::new()
        .with_failure_rate(0.0, Duration::from_secs(1), 10)
        .unwrap()
        .pair();
    let svc = layer.layer(dep(failing.clone()));
    svc.clone().oneshot(req()).await.unwrap();
    failing.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_millis(950)).await;
    for _ in 0..8 {
        svc.clone().oneshot(req()).await.unwrap();
    }
    assert_eq!(h.state("a"), Some(CircuitState::Closed));
    svc.clone().oneshot(req()).await.unwrap();
    assert!(is_open(h.state("a")), "{:?}", h.state("a"));
}

/// Failures before a close (by hand, or by the probes) are forgotten: successes afterwards do
/// not reopen the breaker on them.
#[tokio::test(start_paused = true)]
async fn failures_before_a_close_never_reopen_it_on_successes() {
    let failing = Arc::new(AtomicBool::new(true));
    let (layer, h) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::from_secs(30), 10)
        .unwrap()
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(dep(failing.clone()));
    for _ in 0..9 {
        svc.clone().oneshot(req()).await.unwrap();
    }
    assert_eq!(h.state("a"), Some(CircuitState::Closed));
    h.force_close("a");
    failing.store(false, Ordering::SeqCst);
    for _ in 0..20 {
        svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(h.state("a"), Some(CircuitState::Closed));
    }
    // Open by rate, then closed by a probe.
    failing.store(true, Ordering::SeqCst);
    for _ in 0..20 {
        let _ = svc.clone().oneshot(req()).await;
    }
    assert!(is_open(h.state("a")));
    tokio::time::advance(Duration::from_secs(2)).await;
    failing.store(false, Ordering::SeqCst);
    svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(h.state("a"), Some(CircuitState::Closed));
    for _ in 0..20 {
        svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(h.state("a"), Some(CircuitState::Closed));
    }
}

/// The streak trigger counts failures only: successes after a streak just short of it never
/// open the breaker by count.
#[tokio::test(start_paused = true)]
async fn a_success_never_trips_the_streak_trigger() {
    let failing = Arc::new(AtomicBool::new(true));
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let svc = layer.layer(dep(failing.clone()));
    for round in 0..20 {
        failing.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            svc.clone().oneshot(req()).await.unwrap();
        }
        failing.store(false, Ordering::SeqCst);
        svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(h.state("a"), Some(CircuitState::Closed), "round {round}");
    }
}
