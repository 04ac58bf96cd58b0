//! docs/guides/circuit.md, read literally: the default failure-rate trigger (50 % of the calls of
//! the last 30 s, once there were 100), no streak trigger by default, what is not a failure, the
//! open period (30 s doubling to 5 min, back to 30 s after a close), the message, probes.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitHandle, CircuitState};
use sturdy::core::{find, CircuitOpen, OpenReason};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

const HOST: &str = "api.example.com";

type Svc = tower::util::BoxCloneService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// An API whose status is whatever `status` holds when the call arrives.
fn stack(layer: CircuitBreakerLayer) -> (Svc, CircuitHandle, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let s = status.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let code = s.load(Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::<Bytes>::default());
            *res.status_mut() = StatusCode::from_u16(code).unwrap();
            Ok::<_, BoxError>(res)
        }
    });
    let (layer, handle) = layer.pair();
    let svc = layer.layer(api);
    let svc = tower::util::BoxCloneService::new(svc.map_err(Into::<BoxError>::into));
    (svc, handle, status)
}

fn req() -> Request<Full<Bytes>> {
    Request::get(format!("http://{HOST}/orders"))
        .body(Full::default())
        .unwrap()
}

async fn call(svc: &mut Svc) -> Result<StatusCode, BoxError> {
    svc.ready().await?.call(req()).await.map(|r| r.status())
}

async fn calls(svc: &mut Svc, status: &AtomicU16, code: u16, n: usize) {
    status.store(code, Ordering::SeqCst);
    for _ in 0..n {
        let r = call(svc).await.expect("admitted while closed");
        assert_eq!(r.as_u16(), code);
    }
}

fn is_open(handle: &CircuitHandle) -> bool {
    matches!(handle.state(HOST), Some(CircuitState::Open { .. }))
}

/// circuit.md:6-7: "Opens when at least 50 % of the calls of the last 30 s failed, once there
/// were at least 100": 99 failures in a row do not open it (no streak trigger by default,
/// circuit.md:7-8), the 100th call does.
#[tokio::test(start_paused = true)]
async fn ninety_nine_failures_do_not_open_the_hundredth_does() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new());
    calls(&mut svc, &status, 503, 99).await;
    assert!(!is_open(&handle), "{:?}", handle.state(HOST));
    calls(&mut svc, &status, 503, 1).await;
    assert!(is_open(&handle), "{:?}", handle.state(HOST));
}

/// "at least 50 %": 50 successes then 50 failures (exactly half) open it.
#[tokio::test(start_paused = true)]
async fn exactly_half_failed_over_a_hundred_calls_opens() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new());
    calls(&mut svc, &status, 200, 50).await;
    calls(&mut svc, &status, 500, 50).await;
    assert!(is_open(&handle), "{:?}", handle.state(HOST));
}

/// 51 successes then 49 failures (49 %) leave it closed.
#[tokio::test(start_paused = true)]
async fn forty_nine_percent_over_a_hundred_calls_stays_closed() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new());
    calls(&mut svc, &status, 200, 51).await;
    calls(&mut svc, &status, 500, 49).await;
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// "of the last 30 s": 60 failures, then 31 s later 40 more, are not 100 calls of the last 30 s.
#[tokio::test(start_paused = true)]
async fn failures_older_than_the_window_do_not_count() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new());
    calls(&mut svc, &status, 503, 60).await;
    tokio::time::advance(Duration::from_secs(31)).await;
    calls(&mut svc, &status, 503, 40).await;
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md:15-16: "4xx, 429 and 401 are not failures": 200 of them never open it.
#[tokio::test(start_paused = true)]
async fn client_errors_429_and_401_never_open_it() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new());
    for code in [400, 401, 404, 409, 422, 429] {
        calls(&mut svc, &status, code, 120).await;
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
}

/// circuit.md:22-26: open, `CircuitOpen { retry_in }` at once (the API is not called), open 30 s,
/// reason `Failing`, and the message says "try again in" the wait.
#[tokio::test(start_paused = true)]
async fn open_fails_at_once_for_thirty_seconds_with_a_failing_reason() {
    let calls_seen = Arc::new(AtomicU16::new(0));
    let seen = calls_seen.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::<Bytes>::default());
            *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, BoxError>(res)
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let mut svc = layer.layer(api);
    for _ in 0..3 {
        let _ = svc.ready().await.unwrap().call(req()).await.unwrap();
    }
    assert!(is_open(&handle));
    let before = calls_seen.load(Ordering::SeqCst);
    let err: BoxError = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(
        calls_seen.load(Ordering::SeqCst),
        before,
        "the API was called"
    );
    let open = find::<CircuitOpen>(&*err).expect("a CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Failing);
    assert_eq!(open.retry_in(), Duration::from_secs(30));
    let text = err.to_string();
    assert!(text.contains("try again in 30s"), "{text}");
    assert!(text.contains("failing"), "{text}");
    match handle.state(HOST) {
        Some(CircuitState::Open { retry_in }) => assert_eq!(retry_in, Duration::from_secs(30)),
        other => panic!("{other:?}"),
    }
    tokio::time::advance(Duration::from_secs(29)).await;
    let err: BoxError = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    let open = find::<CircuitOpen>(&*err).expect("still open after 29 s");
    assert_eq!(open.retry_in(), Duration::from_secs(1));
    assert!(err.to_string().contains("try again in 1s"), "{err}");
    assert_eq!(calls_seen.load(Ordering::SeqCst), before);
    tokio::time::advance(Duration::from_secs(1)).await;
    // 30 s after it opened, a call goes through as the probe.
    let res = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(calls_seen.load(Ordering::SeqCst), before + 1);
}

/// circuit.md:22-24: "Open 30 s, doubling on each re-opening up to 5 min, back to 30 s after a
/// close"; circuit.md:29-30: a failed probe reopens at once.
#[tokio::test(start_paused = true)]
async fn the_open_period_doubles_to_five_minutes_and_resets_after_a_close() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new().with_consecutive_failures(1));
    calls(&mut svc, &status, 503, 1).await;
    let mut expected = Duration::from_secs(30);
    for _ in 0..7 {
        match handle.state(HOST) {
            Some(CircuitState::Open { retry_in }) => assert_eq!(retry_in, expected),
            other => panic!("expected open for {expected:?}: {other:?}"),
        }
        tokio::time::advance(expected).await;
        // The probe fails: reopened at once, for twice as long (at most 5 min).
        let r = call(&mut svc).await.expect("the probe is admitted");
        assert_eq!(r, StatusCode::SERVICE_UNAVAILABLE);
        expected = (expected * 2).min(Duration::from_secs(300));
    }
    assert_eq!(expected, Duration::from_secs(300));
    match handle.state(HOST) {
        Some(CircuitState::Open { retry_in }) => assert_eq!(retry_in, Duration::from_secs(300)),
        other => panic!("{other:?}"),
    }
    // Good probes close it; the next opening is 30 s again.
    tokio::time::advance(Duration::from_secs(300)).await;
    status.store(200, Ordering::SeqCst);
    for _ in 0..10 {
        if handle.state(HOST) == Some(CircuitState::Closed) {
            break;
        }
        let _ = call(&mut svc).await;
    }
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
    calls(&mut svc, &status, 503, 1).await;
    match handle.state(HOST) {
        Some(CircuitState::Open { retry_in }) => assert_eq!(retry_in, Duration::from_secs(30)),
        other => panic!("{other:?}"),
    }
}

/// circuit.md:29 and 35: "Half-open: 1 probe at a time" and "0 probes is 1": while one probe is
/// out, the next call is refused with reason `Probing` and `retry_in` zero.
#[tokio::test(start_paused = true)]
async fn half_open_admits_one_probe_and_zero_probes_is_one() {
    for probes in [None, Some(0)] {
        let gate = Arc::new(tokio::sync::Notify::new());
        let fail = Arc::new(AtomicU16::new(1));
        let (g, f) = (gate.clone(), fail.clone());
        let api = service_fn(move |_req: Request<Full<Bytes>>| {
            let (g, failing) = (g.clone(), f.load(Ordering::SeqCst) == 1);
            async move {
                let mut res = Response::new(Full::<Bytes>::default());
                if failing {
                    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                } else {
                    g.notified().await;
                }
                Ok::<_, BoxError>(res)
            }
        });
        let mut layer = CircuitBreakerLayer::new().with_consecutive_failures(1);
        if let Some(k) = probes {
            layer = layer.with_probes(k);
        }
        let (layer, handle) = layer.pair();
        let svc = layer.layer(api);
        let _ = svc.clone().oneshot(req()).await.unwrap();
        assert!(is_open(&handle));
        tokio::time::advance(Duration::from_secs(30)).await;
        fail.store(0, Ordering::SeqCst);
        let probe = tokio::spawn(svc.clone().oneshot(req()));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let err: BoxError = svc.clone().oneshot(req()).await.unwrap_err();
        let open = find::<CircuitOpen>(&*err).expect("refused while the probe is out");
        assert_eq!(open.reason(), OpenReason::Probing, "{probes:?}");
        assert_eq!(open.retry_in(), Duration::ZERO);
        assert!(err.to_string().contains("once they have answered"), "{err}");
        gate.notify_waiters();
        gate.notify_one();
        let res = probe.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

/// circuit.md:26: `Forced` (held open through the handle until released), and the transitions
/// `force_open` / `force_close` through the handle.
#[tokio::test(start_paused = true)]
async fn force_open_holds_it_open_until_force_close() {
    let (mut svc, handle, status) = stack(CircuitBreakerLayer::new());
    calls(&mut svc, &status, 200, 1).await;
    handle.force_open(HOST);
    assert_eq!(handle.state(HOST), Some(CircuitState::ForcedOpen));
    tokio::time::advance(Duration::from_secs(3600)).await;
    let err = call(&mut svc).await.unwrap_err();
    let open = find::<CircuitOpen>(&*err).expect("refused while forced open");
    assert_eq!(open.reason(), OpenReason::Forced);
    handle.force_close(HOST);
    assert_eq!(handle.state(HOST), Some(CircuitState::Closed));
    assert_eq!(call(&mut svc).await.unwrap(), StatusCode::OK);
}
