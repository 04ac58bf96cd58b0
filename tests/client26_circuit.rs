//! The circuit breaker's open periods and thresholds read literally (docs/guides/circuit.md):
//! "Open 30 s, doubling on each re-opening up to 5 min ..., back to 30 s after a close", "at
//! least 50 % of the calls of the last 30 s", `.with_successes_to_close(m)`, and the handle's
//! `force_close` ("Resets key's breaker to closed, forgetting its failures"). Paused time.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitHandle, CircuitState};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, CircuitOpen, OpenReason};
use tower::{Layer, ServiceExt};

const HOST: &str = "api.test";

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.test/x")
        .body(Full::default())
        .unwrap()
}

/// An API whose health the test switches.
#[derive(Clone, Default)]
struct Api(Arc<AtomicBool>);

impl Api {
    fn set_failing(&self, f: bool) {
        self.0.store(f, Ordering::SeqCst);
    }
    fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send {
        let f = self.0.clone();
        tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let failing = f.load(Ordering::SeqCst);
            async move {
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(if failing { 503 } else { 200 })
                        .body(Full::default())
                        .unwrap(),
                )
            }
        })
    }
}

fn open_for(h: &CircuitHandle) -> Option<Duration> {
    match h.state(HOST) {
        Some(CircuitState::Open { retry_in }) => Some(retry_in),
        _ => None,
    }
}

/// Open periods as the `CircuitChanged` events report them.
fn recorder() -> (
    Arc<Mutex<Vec<Duration>>>,
    impl Fn(&Event<'_>) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |e: &Event<'_>| {
        if let Event::CircuitChanged {
            open_for: Some(d), ..
        } = e
        {
            s.lock().unwrap().push(*d);
        }
    })
}

#[tokio::test(start_paused = true)]
async fn client26_open_period_doubles_to_five_minutes_and_resets_after_a_close() {
    let api = Api::default();
    let (seen, rec) = recorder();
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .on_event(rec)
        .pair();
    let svc = layer.layer(api.service());
    api.set_failing(true);
    let _ = svc.clone().oneshot(get()).await.unwrap();
    let mut periods = vec![open_for(&h).unwrap()];
    // Each probe fails: the breaker reopens for twice as long, up to 5 min.
    for _ in 0..6 {
        tokio::time::advance(*periods.last().unwrap() + Duration::from_millis(1)).await;
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 503, "the probe went through");
        periods.push(open_for(&h).unwrap());
    }
    let secs: Vec<u64> = periods
        .iter()
        .map(|d| d.as_secs_f64().round() as u64)
        .collect();
    assert_eq!(secs, [30, 60, 120, 240, 300, 300, 300]);
    // A probe that succeeds closes it; the next opening is 30 s again.
    api.set_failing(false);
    tokio::time::advance(Duration::from_secs(301)).await;
    svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(h.state(HOST), Some(CircuitState::Closed));
    api.set_failing(true);
    let _ = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(open_for(&h).map(|d| d.as_secs()), Some(30));
    let events: Vec<u64> = seen.lock().unwrap().iter().map(|d| d.as_secs()).collect();
    assert_eq!(events, [30, 60, 120, 240, 300, 300, 300, 30]);
}

/// `force_close` is a close: "back to 30 s after a close".
#[tokio::test(start_paused = true)]
async fn client26_force_close_resets_the_open_period_to_30s() {
    let api = Api::default();
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.service());
    api.set_failing(true);
    let _ = svc.clone().oneshot(get()).await.unwrap();
    for _ in 0..3 {
        let d = open_for(&h).unwrap();
        tokio::time::advance(d + Duration::from_millis(1)).await;
        let _ = svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(open_for(&h).map(|d| d.as_secs()), Some(240));
    h.force_close(HOST);
    assert_eq!(h.state(HOST), Some(CircuitState::Closed));
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), 503, "closed: the call goes through");
    assert_eq!(
        open_for(&h).map(|d| d.as_secs()),
        Some(30),
        "the first opening after a (forced) close lasts 30 s"
    );
}

/// A forced opening and its release leave the next ordinary opening at 30 s too.
#[tokio::test(start_paused = true)]
async fn client26_force_open_then_close_then_trip_is_30s() {
    let api = Api::default();
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.service());
    h.force_open(HOST);
    let err = svc.clone().oneshot(get()).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().expect("CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Forced);
    assert_eq!(h.state(HOST), Some(CircuitState::ForcedOpen));
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(
        svc.clone().oneshot(get()).await.is_err(),
        "held until released"
    );
    h.force_close(HOST);
    api.set_failing(true);
    let _ = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(open_for(&h).map(|d| d.as_secs()), Some(30));
}

/// "at least 50 % of the calls ... once there were at least 100": exactly 50 of 100, in either
/// order, opens it; 49 of 100 does not.
#[tokio::test(start_paused = true)]
async fn client26_exactly_half_of_a_hundred_opens() {
    for (first_failing, fails, oks, opens) in [
        (true, 50, 50, true),
        (false, 50, 50, true),
        (true, 49, 51, false),
        (false, 49, 51, false),
        (true, 100, 0, true),
    ] {
        let api = Api::default();
        let (layer, h) = CircuitBreakerLayer::new().pair();
        let svc = layer.layer(api.service());
        let order: Vec<bool> = if first_failing {
            std::iter::repeat_n(true, fails)
                .chain(std::iter::repeat_n(false, oks))
                .collect()
        } else {
            std::iter::repeat_n(false, oks)
                .chain(std::iter::repeat_n(true, fails))
                .collect()
        };
        for (i, f) in order.iter().enumerate() {
            api.set_failing(*f);
            let r = svc.clone().oneshot(get()).await;
            assert!(r.is_ok(), "call {i} of {fails}/{oks} refused early");
        }
        let state = h.state(HOST);
        assert_eq!(
            matches!(state, Some(CircuitState::Open { .. })),
            opens,
            "{fails} failures and {oks} successes (failures first: {first_failing}): {state:?}"
        );
    }
}

/// `.with_successes_to_close(3)`: three good probes close it, one at a time; a failed one
/// among them reopens at once.
#[tokio::test(start_paused = true)]
async fn client26_successes_to_close_counts_probes() {
    let api = Api::default();
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_successes_to_close(3)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(8))
        .pair();
    let svc = layer.layer(api.service());
    api.set_failing(true);
    let _ = svc.clone().oneshot(get()).await.unwrap();
    tokio::time::advance(Duration::from_millis(1001)).await;
    api.set_failing(false);
    for i in 0..2 {
        let res = svc.clone().oneshot(get()).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            h.state(HOST),
            Some(CircuitState::HalfOpen),
            "after {} good probes",
            i + 1
        );
    }
    api.set_failing(true);
    let _ = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(
        open_for(&h).map(|d| d.as_secs()),
        Some(2),
        "a failed probe reopens at once, for twice as long"
    );
    tokio::time::advance(Duration::from_millis(2001)).await;
    api.set_failing(false);
    for _ in 0..3 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(h.state(HOST), Some(CircuitState::Closed));
}
