//! s69: outside tests of the circuit breaker, request coalescing and per-host keys, read
//! against docs/guides/circuit.md, docs/guides/coalesce.md, docs/RELIABILITY.md and the
//! crates' rustdoc.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::{BoxError, CallOptions, CircuitOpen, ErrorKind, OpenReason};
use tower::{service_fn, Layer, Service, ServiceExt};

// ---------------------------------------------------------------- helpers

/// A small seeded generator (splitmix64): the root package has no `rand` dev-dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

fn status(code: u16) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::default())
        .unwrap()
}

type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An in-process API whose status is set by the test and whose calls are counted.
#[derive(Clone, Debug)]
struct Api {
    code: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
}

impl Api {
    fn new(code: u16) -> Self {
        Self {
            code: Arc::new(AtomicU16::new(code)),
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn set(&self, code: u16) {
        self.code.store(code, Ordering::SeqCst);
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFut<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let code = self.code.load(Ordering::SeqCst);
        Box::pin(async move { Ok(status(code)) })
    }
}

fn open_of(err: &BoxError) -> &CircuitOpen {
    sturdy::core::find::<CircuitOpen>(&**err).unwrap_or_else(|| panic!("not a CircuitOpen: {err}"))
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within 5 s"),
    }
}

// ---------------------------------------------------------------- circuit breaker: words

/// circuit.md: "Open 30 s, doubling on each re-opening up to 5 min (`.with_open_duration(base,
/// max)`), back to 30 s after a close." Here base 10 s, max 35 s.
#[tokio::test(start_paused = true)]
async fn open_period_doubles_caps_and_resets_after_close() {
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(35))
        .pair();
    let svc = layer.layer(api.clone());
    let uri = "http://api.example.com/";
    // First failure opens for 10 s.
    let res = svc.clone().oneshot(get(uri)).await.unwrap();
    assert_eq!(res.status(), 500);
    let mut expected = [10u64, 20, 35, 35].into_iter();
    let mut want = expected.next().unwrap();
    loop {
        let err = svc.clone().oneshot(get(uri)).await.unwrap_err();
        let open = open_of(&err);
        assert_eq!(open.reason(), OpenReason::Failing);
        assert_eq!(open.retry_in(), Duration::from_secs(want), "{err}");
        assert!(
            err.to_string().contains(&format!("try again in {want}s")),
            "{err}"
        );
        tokio::time::advance(Duration::from_secs(want)).await;
        // The probe fails: open again, for longer.
        let res = svc.clone().oneshot(get(uri)).await.unwrap();
        assert_eq!(res.status(), 500);
        match expected.next() {
            Some(w) => want = w,
            None => break,
        }
    }
    // Now open for 35 s; the probe after it succeeds and closes.
    tokio::time::advance(Duration::from_secs(35)).await;
    api.set(200);
    let res = svc.clone().oneshot(get(uri)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state("api.example.com"), Some(CircuitState::Closed));
    // Back to 10 s after the close.
    api.set(500);
    svc.clone().oneshot(get(uri)).await.unwrap();
    let err = svc.clone().oneshot(get(uri)).await.unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_secs(10));
}

/// layer.rs: "A window without a failure never opens it, so a `rate` of 0.0 opens on any
/// failure once the window holds `min_calls` calls."
#[tokio::test(start_paused = true)]
async fn failure_rate_zero_opens_on_the_first_failure_only() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.0, Duration::from_secs(30), 10)
        .unwrap()
        .pair();
    let svc = layer.layer(api.clone());
    for _ in 0..50 {
        let res = svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
    api.set(503);
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert!(
        matches!(handle.state("a.test"), Some(CircuitState::Open { .. })),
        "{:?}",
        handle.state("a.test")
    );
}

/// layer.rs: rate 1.0 opens only when every call in the window failed.
#[tokio::test(start_paused = true)]
async fn failure_rate_one_needs_every_call_to_fail() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::from_secs(30), 10)
        .unwrap()
        .pair();
    let svc = layer.layer(api.clone());
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    api.set(500);
    for _ in 0..30 {
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    }
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
    // Once the success has left the 30 s window, ten failures in a row open it.
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..10 {
        let _ = svc.clone().oneshot(get("http://a.test/")).await;
    }
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
}

/// layer.rs: "A `Config` error when `rate` is not in `0.0..=1.0` or `window` is zero."; min_calls
/// 0 is taken as 1.
#[tokio::test(start_paused = true)]
async fn failure_rate_validation_and_min_calls_zero() {
    for rate in [f64::NAN, -0.1, 1.000_001, f64::INFINITY, f64::NEG_INFINITY] {
        let err = CircuitBreakerLayer::new()
            .with_failure_rate(rate, Duration::from_secs(1), 1)
            .unwrap_err();
        assert!(matches!(err.kind(), ErrorKind::Config), "{rate}: {err}");
    }
    let err = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::ZERO, 1)
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Config), "{err}");
    // min_calls 0: the first failure opens (taken as 1).
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::from_secs(30), 0)
        .unwrap()
        .pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
}

/// circuit.md: "Setters never panic; values that cannot work are taken as the nearest that can".
#[tokio::test(start_paused = true)]
async fn absurd_setters_never_panic_and_still_work() {
    let layers = vec![
        CircuitBreakerLayer::new()
            .with_consecutive_failures(u32::MAX)
            .with_probes(u32::MAX)
            .with_successes_to_close(u32::MAX)
            .with_max_breakers(0),
        CircuitBreakerLayer::new()
            .with_open_duration(Duration::MAX, Duration::MAX)
            .with_failure_rate(1.0, Duration::MAX, u32::MAX)
            .unwrap(),
        CircuitBreakerLayer::new()
            .with_open_duration(Duration::ZERO, Duration::ZERO)
            .with_consecutive_failures(1)
            .with_probes(0)
            .with_successes_to_close(0)
            .with_failure_rate(0.0, Duration::from_nanos(1), 1)
            .unwrap(),
        CircuitBreakerLayer::new()
            .with_open_duration(Duration::from_secs(u64::MAX), Duration::from_nanos(1))
            .with_consecutive_failures(1),
    ];
    for (i, layer) in layers.into_iter().enumerate() {
        let api = Api::new(500);
        let handle = layer.handle();
        let svc = layer.layer(api.clone());
        for _ in 0..5 {
            let _ = svc.clone().oneshot(get("http://a.test/")).await;
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let _ = handle.states();
        handle.force_open("a.test");
        let err = svc
            .clone()
            .oneshot(get("http://a.test/"))
            .await
            .unwrap_err();
        let open = open_of(&err);
        assert_eq!(open.reason(), OpenReason::Forced, "layer {i}");
        assert!(
            open.retry_in() <= Duration::from_secs(31 * 365 * 24 * 3600),
            "layer {i}"
        );
        handle.force_close("a.test");
        api.set(200);
        let res = svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        assert_eq!(res.status(), 200, "layer {i}");
    }
}

/// An open period of zero (`with_open_duration(0, 0)`): the breaker opens, and the very next
/// call is a probe (nothing is refused with "try again in 0ms" while no probe is out).
#[tokio::test(start_paused = true)]
async fn zero_open_period_admits_the_next_call_as_a_probe() {
    let api = Api::new(500);
    let (layer, _handle) = CircuitBreakerLayer::new()
        .with_open_duration(Duration::ZERO, Duration::ZERO)
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.clone());
    for i in 0..10 {
        let res = svc.clone().oneshot(get("http://a.test/")).await;
        match res {
            Ok(r) => assert_eq!(r.status(), 500),
            Err(e) => panic!("call {i} refused with a zero open period: {e}"),
        }
    }
    assert_eq!(api.calls(), 10);
}

/// circuit.md: "4xx, 429 and 401 are not failures ... (except 408 Request Timeout, which reads
/// as a timeout and counts as one)".
#[tokio::test(start_paused = true)]
async fn which_statuses_count_as_failures() {
    for (code, counts) in [
        (400u16, false),
        (401, false),
        (403, false),
        (404, false),
        (408, true),
        (409, false),
        (429, false),
        (499, false),
        (500, true),
        (502, true),
        (503, true),
        (504, true),
        (599, true),
        (200, false),
        (204, false),
        (301, false),
    ] {
        let api = Api::new(code);
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .pair();
        let svc = layer.layer(api);
        let res = svc.oneshot(get("http://a.test/")).await.unwrap();
        assert_eq!(res.status().as_u16(), code);
        let open = matches!(handle.state("a.test"), Some(CircuitState::Open { .. }));
        assert_eq!(open, counts, "status {code}: {:?}", handle.state("a.test"));
    }
}

// ---------------------------------------------------------------- circuit breaker: half-open

/// An API whose calls wait on a gate the test opens: a probe held in flight.
#[derive(Clone, Debug)]
struct Gated {
    code: Arc<AtomicU16>,
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Notify>,
    hold: Arc<AtomicBool>,
    /// Calls whose future was dropped before it answered.
    dropped: Arc<AtomicUsize>,
}

struct DropCount(Arc<AtomicUsize>, bool);
impl Drop for DropCount {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Gated {
    fn new(code: u16) -> Self {
        Self {
            code: Arc::new(AtomicU16::new(code)),
            calls: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(tokio::sync::Notify::new()),
            hold: Arc::new(AtomicBool::new(false)),
            dropped: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Service<Request<Full<Bytes>>> for Gated {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = BoxFut<Result<Self::Response, Infallible>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let code = self.code.clone();
        let gate = self.gate.clone();
        let hold = self.hold.load(Ordering::SeqCst);
        let dropped = self.dropped.clone();
        Box::pin(async move {
            let mut guard = DropCount(dropped, false);
            if hold {
                gate.notified().await;
            }
            tokio::task::yield_now().await;
            guard.1 = true;
            Ok(status(code.load(Ordering::SeqCst)))
        })
    }
}

/// circuit.md: "Half-open: 1 probe at a time (`.with_probes(k)`); everyone else fails fast.
/// ... `.with_successes_to_close(m)` good probes close." and the `Probing` words.
#[tokio::test(start_paused = true)]
async fn half_open_admits_k_probes_and_closes_after_m_successes() {
    let api = Gated::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_probes(2)
        .with_successes_to_close(3)
        .pair();
    let svc = layer.layer(api.clone());
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    api.code.store(200, Ordering::SeqCst);
    api.hold.store(true, Ordering::SeqCst);
    let p1 = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    let p2 = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert_eq!(api.calls.load(Ordering::SeqCst), 3);
    let err = svc
        .clone()
        .oneshot(get("http://a.test/"))
        .await
        .unwrap_err();
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Probing);
    assert_eq!(open.retry_in(), Duration::ZERO);
    assert!(
        err.to_string()
            .contains("try again once they have answered"),
        "{err}"
    );
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    api.hold.store(false, Ordering::SeqCst);
    api.gate.notify_waiters();
    within("probes", async {
        assert_eq!(p1.await.unwrap().unwrap().status(), 200);
        assert_eq!(p2.await.unwrap().unwrap().status(), 200);
    })
    .await;
    // Two successes of three: still half-open, a third probe closes.
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    let res = svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// circuit.md: "A probe whose future is dropped gives its slot back." Dropped at seeded points
/// (before its first poll, while the inner call waits, with a timeout, by aborting its task).
#[tokio::test(start_paused = true)]
async fn a_dropped_probe_gives_its_slot_back_at_every_point() {
    let mut rng = Rng::new(0x5169);
    for round in 0..40 {
        let api = Gated::new(500);
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let svc = layer.layer(api.clone());
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        api.hold.store(true, Ordering::SeqCst);
        match rng.below(4) {
            0 => {
                // Made ready and called, never polled.
                let mut s = svc.clone();
                let fut = s.ready().await.unwrap().call(get("http://a.test/"));
                drop(fut);
            }
            1 => {
                let r = tokio::time::timeout(
                    Duration::from_millis(rng.below(50) + 1),
                    svc.clone().oneshot(get("http://a.test/")),
                )
                .await;
                assert!(r.is_err(), "round {round}: the held probe answered");
            }
            2 => {
                let t = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
                for _ in 0..rng.below(5) {
                    tokio::task::yield_now().await;
                }
                t.abort();
                let _ = t.await;
            }
            _ => {
                let mut fut = Box::pin(svc.clone().oneshot(get("http://a.test/")));
                let polls = rng.below(4);
                for _ in 0..polls {
                    let p = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await;
                    assert!(p.is_pending());
                }
                drop(fut);
            }
        }
        // The slot is back: the next call is admitted as a probe, and its success closes.
        api.hold.store(false, Ordering::SeqCst);
        api.code.store(200, Ordering::SeqCst);
        let res = within("next probe", svc.clone().oneshot(get("http://a.test/"))).await;
        let res =
            res.unwrap_or_else(|e| panic!("round {round}: refused after a dropped probe: {e}"));
        assert_eq!(res.status(), 200);
        assert_eq!(
            handle.state("a.test"),
            Some(CircuitState::Closed),
            "round {round}"
        );
    }
}

/// A thousand calls at once, the instant the breaker closed again: all are admitted.
#[tokio::test(start_paused = true)]
async fn a_thousand_calls_at_the_instant_of_closing() {
    let api = Gated::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(api.clone());
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    api.code.store(200, Ordering::SeqCst);
    api.hold.store(true, Ordering::SeqCst);
    let probe = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    tokio::task::yield_now().await;
    api.hold.store(false, Ordering::SeqCst);
    let mut tasks = Vec::new();
    // Spawned before the probe answers; they run after it, on the same scheduler tick.
    api.gate.notify_waiters();
    assert_eq!(probe.await.unwrap().unwrap().status(), 200);
    for _ in 0..1000 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get("http://a.test/"))));
    }
    let mut ok = 0;
    for t in tasks {
        if within("call", t).await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------- circuit breaker: composition

/// circuit.md: "a refused call is not sent to it, and what it reserved in `poll_ready` (a
/// `ConcurrencyLimit`'s permit, a `Buffer`'s slot) is given back at once, so a kept service that
/// was refused does not hold it until its next call." Driven through open, half-open and closed
/// with kept services over `ConcurrencyLimit(1)`.
#[tokio::test(start_paused = true)]
async fn kept_services_over_concurrency_limit_one_through_every_state() {
    let api = Gated::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(tower::limit::ConcurrencyLimit::new(api.clone(), 1));
    let mut k1 = svc.clone();
    let mut k2 = svc.clone();
    // Closed: one failure opens.
    let res = k1.ready().await.unwrap().call(get("http://a.test/")).await;
    assert_eq!(res.unwrap().status(), 500);
    // Open: k1 is refused; its permit is given back, so k2 is ready at once.
    let err = k1
        .ready()
        .await
        .unwrap()
        .call(get("http://a.test/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Failing);
    {
        let mut ready = tokio_test::task::spawn(k2.ready());
        tokio_test::assert_ready!(ready.poll()).unwrap();
    }
    // k2 made ready, then refused too: k1 is ready again.
    let err = k2.call(get("http://a.test/")).await.unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Failing);
    {
        let mut ready = tokio_test::task::spawn(k1.ready());
        tokio_test::assert_ready!(ready.poll()).unwrap();
    }
    // Half-open: k1's probe holds the one permit; k2 waits in poll_ready (honest), then is
    // woken when the probe answers.
    tokio::time::advance(Duration::from_secs(1)).await;
    api.code.store(200, Ordering::SeqCst);
    api.hold.store(true, Ordering::SeqCst);
    let probe = tokio::spawn(k1.call(get("http://a.test/")));
    tokio::task::yield_now().await;
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    let mut ready = tokio_test::task::spawn(k2.ready());
    tokio_test::assert_pending!(ready.poll());
    api.hold.store(false, Ordering::SeqCst);
    api.gate.notify_waiters();
    assert_eq!(within("probe", probe).await.unwrap().unwrap().status(), 200);
    assert!(
        ready.is_woken(),
        "k2 was not woken when the permit came back"
    );
    tokio_test::assert_ready!(ready.poll()).unwrap();
    drop(ready);
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
    let res = within("closed call", k2.call(get("http://a.test/"))).await;
    assert_eq!(res.unwrap().status(), 200);
}

/// The same over tower's `Buffer` (bound 1) and under it, with kept clones; nothing hangs.
#[tokio::test(start_paused = true)]
async fn kept_services_over_and_under_buffer_do_not_hang() {
    for under in [false, true] {
        let api = Api::new(500);
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        type Svc =
            tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;
        let svc: Svc = if under {
            let inner = tower::limit::ConcurrencyLimit::new(layer.layer(api.clone()), 1);
            tower::util::BoxCloneSyncService::new(tower::buffer::Buffer::new(inner, 1))
        } else {
            let inner = tower::buffer::Buffer::new(api.clone(), 1);
            tower::util::BoxCloneSyncService::new(layer.layer(inner))
        };
        let mut kept: Vec<Svc> = (0..4).map(|_| svc.clone()).collect();
        let mut refused = 0;
        for round in 0..40 {
            if round == 20 {
                tokio::time::advance(Duration::from_secs(1)).await;
                api.set(200);
            }
            let k = &mut kept[round % 4];
            let res = within("kept call", async {
                k.ready().await?.call(get("http://a.test/")).await
            })
            .await;
            if res.is_err() {
                refused += 1;
            }
        }
        assert!(refused >= 19, "under={under}: {refused}");
        assert_eq!(
            handle.state("a.test"),
            Some(CircuitState::Closed),
            "under={under}"
        );
    }
}

// ---------------------------------------------------------------- circuit breaker: per host

/// circuit.md: "at most 1,024 ... past it, healthy breakers (closed, with no failure streak)
/// are forgotten first, then new hosts share one overflow breaker", and the `Overflow` words:
/// "the message names the call's own host".
#[tokio::test(start_paused = true)]
async fn overflow_breaker_is_shared_and_named_for_the_callers_host() {
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_max_breakers(2)
        .pair();
    let svc = layer.layer(api.clone());
    // a and b each have a failure streak of one: not healthy, not forgotten.
    for host in ["a.test", "b.test"] {
        svc.clone()
            .oneshot(get(&format!("http://{host}/")))
            .await
            .unwrap();
    }
    // c and d share the overflow breaker; two failures between them open it.
    svc.clone().oneshot(get("http://c.test/")).await.unwrap();
    svc.clone().oneshot(get("http://d.test/")).await.unwrap();
    let err = svc
        .clone()
        .oneshot(get("http://E.test:8080/x"))
        .await
        .unwrap_err();
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Overflow, "{err}");
    assert_eq!(open.key(), "e.test:8080");
    assert!(err.to_string().contains("e.test:8080"), "{err}");
    assert!(!err.to_string().contains("circuit open for *"), "{err}");
    // a and b still have breakers of their own, closed.
    assert_eq!(handle.state("A.test"), Some(CircuitState::Closed));
    assert!(matches!(
        handle.state("e.test:8080"),
        Some(CircuitState::Open { .. })
    ));
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&"*".to_owned()), "{keys:?}");
    assert!(keys.len() <= 3, "{keys:?}");
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "states() is sorted by key");
}

/// 100,000 distinct hosts through one layer: the breakers kept stay bounded (1,024 and the
/// overflow one), and it takes no quadratic time.
#[tokio::test(start_paused = true)]
async fn a_hundred_thousand_hosts_stay_bounded() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let mut svc = layer.layer(api.clone());
    // Real time on purpose: the clock is paused, and this bounds the CPU cost.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    for i in 0..100_000u32 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get(&format!("http://h{i}.test/")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let took = started.elapsed();
    let n = handle.states().len();
    assert!(n <= 1_025, "{n} breakers kept");
    assert!(
        took < Duration::from_secs(20),
        "100,000 hosts took {took:?}"
    );
    assert_eq!(api.calls(), 100_000);
}

/// Per-host keys read from hostile requests: case, port as written, IPv6, userinfo, a `Host`
/// header with a path and query, a 64 KiB `Host` header, a non-text `Host` header, a port past
/// 65535; none panics, none leaks the secret, the handle finds each in any case.
#[tokio::test(start_paused = true)]
async fn breaker_keys_from_hostile_hosts() {
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.clone());
    let call = |req: Request<Full<Bytes>>| svc.clone().oneshot(req);
    // Absolute URIs.
    for (uri, key) in [
        (
            "http://user:SECRET@API.Example.com:8443/v1",
            "api.example.com:8443",
        ),
        ("http://[::ABCD]:8080/", "[::abcd]:8080"),
        ("http://xn--bcher-kva.EXAMPLE/", "xn--bcher-kva.example"),
        ("http://Big.test:99999/", "big.test:99999"),
    ] {
        let req = Request::get(uri).body(Full::default()).unwrap();
        call(req).await.unwrap();
        assert!(
            matches!(handle.state(key), Some(CircuitState::Open { .. })),
            "{uri}: {:?}",
            handle.states()
        );
        let upper = key.to_ascii_uppercase();
        assert!(handle.state(&upper).is_some(), "{upper}");
        let err = call(Request::get(uri).body(Full::default()).unwrap())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(key), "{err}");
        assert!(!format!("{err} {err:?}").contains("SECRET"), "{err:?}");
    }
    // A relative URI: the Host header, cut at what an authority cannot hold.
    let mut req = get("/v1/orders");
    req.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_static("user:SECRET@Rel.Example.com:81/x?api_key=SECRET"),
    );
    call(req).await.unwrap();
    assert!(
        handle.state("rel.example.com:81").is_some(),
        "{:?}",
        handle.states()
    );
    for (k, _) in handle.states() {
        assert!(!k.contains("SECRET"), "{k}");
    }
    // The URI's authority wins over the Host header.
    let mut req = get("http://uri.test/");
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_static("header.test"));
    call(req).await.unwrap();
    assert!(handle.state("uri.test").is_some());
    assert!(handle.state("header.test").is_none());
    // 64 KiB of host name in the Host header.
    let long = "A".repeat(64 * 1024);
    let mut req = get("/");
    req.headers_mut()
        .insert(http::header::HOST, HeaderValue::from_str(&long).unwrap());
    call(req).await.unwrap();
    assert!(handle.state(&long.to_ascii_lowercase()).is_some());
    // Not text: the empty key.
    let mut req = get("/");
    req.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_bytes(b"caf\xe9.test").unwrap(),
    );
    call(req).await.unwrap();
    assert!(handle.state("").is_some(), "{:?}", handle.states().len());
}

// ---------------------------------------------------------------- coalescing

type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Shape {
    /// `body` bytes in 64 KiB frames.
    Ok,
    /// 100 bytes, then an error.
    FailsMidStream,
    /// An error instead of a response.
    Error,
}

/// An API for coalescing: counts calls, holds each until the gate opens (when `hold` is set),
/// echoes the request's headers in a response header, answers `body` bytes.
#[derive(Clone, Debug)]
struct Shared {
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Notify>,
    hold: Arc<AtomicBool>,
    body: usize,
    shape: Shape,
    /// Upstream futures dropped before they answered.
    dropped: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Shared {
    fn new(body: usize, shape: Shape) -> Self {
        Self {
            calls: Arc::new(AtomicUsize::new(0)),
            gate: Arc::new(tokio::sync::Notify::new()),
            hold: Arc::new(AtomicBool::new(true)),
            body,
            shape,
            dropped: Arc::new(AtomicUsize::new(0)),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.gate.notify_waiters();
    }
}

fn describe_headers<B>(req: &Request<B>) -> String {
    let mut s = format!("{} {}", req.method(), req.uri());
    for (n, v) in req.headers() {
        s.push_str(&format!("|{n}={v:?}"));
    }
    s
}

impl Service<Request<Full<Bytes>>> for Shared {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFut<Result<Response<Body>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.seen.lock().unwrap().push(describe_headers(&req));
        let this = self.clone();
        Box::pin(async move {
            let mut guard = DropCount(this.dropped.clone(), false);
            while this.hold.load(Ordering::SeqCst) {
                let notified = this.gate.notified();
                if !this.hold.load(Ordering::SeqCst) {
                    break;
                }
                notified.await;
            }
            guard.1 = true;
            let echo = HeaderValue::from_str(&format!("call-{n}")).unwrap();
            let body: Body = match this.shape {
                Shape::Error => {
                    return Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "reset by the test",
                    )) as BoxError)
                }
                Shape::Ok => {
                    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                    let mut left = this.body;
                    let mut frames = Vec::new();
                    while left > 0 {
                        let take = left.min(chunk.len());
                        frames.push(Ok::<_, BoxError>(http_body::Frame::data(
                            chunk.slice(..take),
                        )));
                        left -= take;
                    }
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
                }
                Shape::FailsMidStream => {
                    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = vec![
                        Ok(http_body::Frame::data(Bytes::from(vec![b'y'; 100]))),
                        Err(Box::new(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "body cut by the test",
                        ))),
                    ];
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
                }
            };
            Ok(Response::builder()
                .status(200)
                .header("x-call", echo)
                .body(body)
                .unwrap())
        })
    }
}

/// Lets spawned tasks run until they are all parked.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// coalesce.md, "Leaving": "a caller that goes away (its future dropped, a timeout above it)
/// leaves the call to the others; it goes on." The leader (the caller that started the call)
/// included, at seeded points; the others get the answer from one upstream call.
#[tokio::test(start_paused = true)]
async fn waiters_aborted_at_seeded_points_leave_the_call_to_the_others() {
    let mut rng = Rng::new(69);
    for round in 0..30 {
        let api = Shared::new(1000, Shape::Ok);
        let (layer, handle) = CoalesceLayer::new().pair();
        let svc = layer.layer(api.clone());
        let n = 2 + rng.below(10) as usize;
        let mut tasks = Vec::new();
        for _ in 0..n {
            tasks.push(tokio::spawn(
                svc.clone().oneshot(get("http://api.test/report")),
            ));
            settle().await;
        }
        assert_eq!(api.calls(), 1, "round {round}");
        // Abort a seeded subset, the leader (task 0) most often among them, leaving one at least.
        let mut kept = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let abort = (i == 0 && rng.below(3) != 0) || rng.below(3) == 0;
            if abort && !(i == n - 1 && kept.is_empty()) {
                t.abort();
                let _ = t.await;
            } else {
                kept.push(t);
            }
        }
        settle().await;
        assert_eq!(
            api.dropped.load(Ordering::SeqCst),
            0,
            "round {round}: cancelled"
        );
        api.release();
        for t in kept {
            let res = within("waiter", t)
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(res.headers()["x-call"], "call-0");
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 1000, "round {round}");
        }
        assert_eq!(api.calls(), 1, "round {round}");
        assert_eq!(handle.in_flight("api.test"), 0, "round {round}");
    }
}

/// coalesce.md: "When the last caller leaves, the upstream call is dropped, which cancels it,
/// and it leaves the table ... The next identical request starts afresh."
#[tokio::test(start_paused = true)]
async fn when_every_caller_leaves_the_call_is_cancelled_and_forgotten() {
    let api = Shared::new(10, Shape::Ok);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api.clone());
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/x"))))
        .collect();
    settle().await;
    assert_eq!(handle.in_flight("API.test"), 1);
    for t in tasks {
        t.abort();
        let _ = t.await;
    }
    settle().await;
    assert_eq!(api.dropped.load(Ordering::SeqCst), 1);
    assert_eq!(handle.in_flight("api.test"), 0);
    api.release();
    let res = within("fresh", svc.clone().oneshot(get("http://api.test/x")))
        .await
        .unwrap();
    assert_eq!(res.headers()["x-call"], "call-1");
}

/// coalesce.md, "Above the bound": a 10 MiB body (over the 1 MiB bound) goes, streamed and
/// whole, to the caller that started the call; every other caller sends its own request.
#[tokio::test(start_paused = true)]
async fn a_ten_mib_body_goes_to_the_leader_and_the_others_send_their_own() {
    let api = Shared::new(10 << 20, Shape::Ok);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api.clone());
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/big"))))
        .collect();
    settle().await;
    assert_eq!(api.calls(), 1);
    api.release();
    let mut from_leader = 0;
    for t in tasks {
        let res = within("big", t).await.unwrap().unwrap();
        if res.headers()["x-call"] == "call-0" {
            from_leader += 1;
        }
        let body = within("big body", res.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), 10 << 20);
    }
    assert_eq!(from_leader, 1);
    assert_eq!(api.calls(), 4);
    let stats = handle.stats();
    assert_eq!(stats.too_large(), 1);
    assert_eq!(stats.fallbacks(), 3);
    assert_eq!(stats.joined(), 3);
}

/// coalesce.md: "A body that fails while being read is an error of kind `Body`, shared the same
/// way", with the message "the call shared by identical requests in flight failed: <the error>".
#[tokio::test(start_paused = true)]
async fn a_body_failing_mid_stream_is_a_body_error_for_every_caller() {
    let api = Shared::new(0, Shape::FailsMidStream);
    let svc = CoalesceLayer::new().layer(api.clone());
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/cut"))))
        .collect();
    settle().await;
    api.release();
    for t in tasks {
        let err = within("cut", t).await.unwrap().unwrap_err();
        let e = err
            .downcast_ref::<sturdy::core::Error>()
            .unwrap_or_else(|| panic!("not a sturdy Error: {err:?}"));
        assert!(matches!(e.kind(), ErrorKind::Body), "{err}: {:?}", e.kind());
        assert!(
            err.to_string()
                .starts_with("the call shared by identical requests in flight failed: "),
            "{err}"
        );
        assert!(sturdy::core::find::<sturdy::coalesce::SharedError>(&*err).is_some());
    }
    assert_eq!(api.calls(), 1);
}

/// coalesce.md: "Errors are shared too", each caller's error holds the original in its chain.
#[tokio::test(start_paused = true)]
async fn a_failed_shared_call_reaches_every_caller_with_its_cause() {
    let api = Shared::new(0, Shape::Error);
    let svc = CoalesceLayer::new().layer(api.clone());
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/err"))))
        .collect();
    settle().await;
    api.release();
    for t in tasks {
        let err = within("err", t).await.unwrap().unwrap_err();
        let io = sturdy::core::find::<std::io::Error>(&*err).expect("io error in the chain");
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("reset by the test"), "{err}");
    }
    assert_eq!(api.calls(), 1);
}

/// Whether `b`, sent while `a` is in flight, joins `a`'s call.
async fn joins<S>(svc: &S, api: &Shared, a: Request<Full<Bytes>>, b: Request<Full<Bytes>>) -> bool
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    api.hold.store(true, Ordering::SeqCst);
    let before = api.calls();
    let ta = tokio::spawn(svc.clone().oneshot(a));
    settle().await;
    let tb = tokio::spawn(svc.clone().oneshot(b));
    settle().await;
    let calls = api.calls() - before;
    api.release();
    let ra = within("a", ta).await.unwrap();
    let rb = within("b", tb).await.unwrap();
    assert!(ra.is_ok() && rb.is_ok());
    settle().await;
    calls == 1
}

fn with_headers(method: &str, uri: &str, headers: &[(&str, &[u8])]) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::default())
        .unwrap();
    for (n, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    req
}

/// coalesce.md, "Identical": method, URI as written, headers in any order across names, the
/// values of one name in the same order; the per-request ids ignored by default;
/// `with_key_headers` compares only the named ones; `with_ignored_headers([])` compares all.
#[tokio::test(start_paused = true)]
async fn what_makes_two_requests_identical() {
    let api = Shared::new(3, Shape::Ok);
    let svc = CoalesceLayer::new().layer(api.clone());
    let u = "http://api.test/x?q=1";
    let cases: Vec<(&str, Request<Full<Bytes>>, Request<Full<Bytes>>, bool)> = vec![
        (
            "order across names",
            with_headers("GET", u, &[("accept", b"a"), ("x-k", b"b")]),
            with_headers("GET", u, &[("x-k", b"b"), ("accept", b"a")]),
            true,
        ),
        (
            "order within a name",
            with_headers("GET", u, &[("x-k", b"1"), ("x-k", b"2")]),
            with_headers("GET", u, &[("x-k", b"2"), ("x-k", b"1")]),
            false,
        ),
        (
            "ids ignored",
            with_headers(
                "GET",
                u,
                &[
                    ("x-request-id", b"1"),
                    ("traceparent", b"00-a"),
                    ("baggage", b"k=1"),
                    ("tracestate", b"a=1"),
                    ("x-correlation-id", b"c1"),
                ],
            ),
            with_headers(
                "GET",
                u,
                &[("x-request-id", b"2"), ("x-correlation-id", b"c2")],
            ),
            true,
        ),
        (
            "authorization differs",
            with_headers("GET", u, &[("authorization", b"Bearer a")]),
            with_headers("GET", u, &[("authorization", b"Bearer b")]),
            false,
        ),
        (
            "one has a header the other has not",
            with_headers("GET", u, &[("range", b"bytes=0-1")]),
            with_headers("GET", u, &[]),
            false,
        ),
        (
            "empty header value vs none",
            with_headers("GET", u, &[("x-k", b"")]),
            with_headers("GET", u, &[]),
            false,
        ),
        (
            "HEAD vs GET",
            with_headers("HEAD", u, &[]),
            with_headers("GET", u, &[]),
            false,
        ),
        (
            "query differs",
            with_headers("GET", "http://api.test/x?q=1", &[]),
            with_headers("GET", "http://api.test/x?q=2", &[]),
            false,
        ),
        (
            "empty query vs none",
            with_headers("GET", "http://api.test/x?", &[]),
            with_headers("GET", "http://api.test/x", &[]),
            false,
        ),
        (
            "host case is two calls",
            with_headers("GET", "http://API.test/x", &[]),
            with_headers("GET", "http://api.test/x", &[]),
            false,
        ),
        (
            "scheme differs",
            with_headers("GET", "https://api.test/x", &[]),
            with_headers("GET", "http://api.test/x", &[]),
            false,
        ),
        (
            "port written vs not",
            with_headers("GET", "http://api.test:80/x", &[]),
            with_headers("GET", "http://api.test/x", &[]),
            false,
        ),
        (
            "value split across two names",
            with_headers("GET", u, &[("a", b"1"), ("ab", b"2")]),
            with_headers("GET", u, &[("a", b"1a"), ("b", b"2")]),
            false,
        ),
    ];
    for (what, a, b, expected) in cases {
        assert_eq!(joins(&svc, &api, a, b).await, expected, "{what}");
    }
    // with_key_headers: only Authorization counts.
    let svc = CoalesceLayer::new()
        .with_key_headers([http::header::AUTHORIZATION])
        .layer(api.clone());
    let a = with_headers("GET", u, &[("authorization", b"t"), ("accept", b"a")]);
    let b = with_headers("GET", u, &[("authorization", b"t"), ("accept", b"b")]);
    assert!(joins(&svc, &api, a, b).await);
    let a = with_headers("GET", u, &[("authorization", b"t")]);
    let b = with_headers("GET", u, &[("authorization", b"u")]);
    assert!(!joins(&svc, &api, a, b).await);
    // with_ignored_headers([]): the ids count too.
    let svc = CoalesceLayer::new()
        .with_ignored_headers(Vec::<http::HeaderName>::new())
        .layer(api.clone());
    let a = with_headers("GET", u, &[("x-request-id", b"1")]);
    let b = with_headers("GET", u, &[("x-request-id", b"2")]);
    assert!(!joins(&svc, &api, a, b).await);
}

/// "Keys are compared in full (not by hash)": seeded random header sets over a tiny alphabet
/// rich in separators; two requests share a call exactly when the documented rule says they
/// are identical.
#[tokio::test(start_paused = true)]
async fn no_two_different_requests_share_a_call_seeded() {
    const NAMES: [&str; 5] = ["a", "b", "ab", "x-request-id", "c"];
    const BYTES: [u8; 12] = [
        b'a', b'b', b':', b' ', b'\t', b',', b'=', b'|', b';', 0x80, 0xff, b'\\',
    ];
    const URIS: [&str; 5] = [
        "http://api.test/x",
        "http://api.test/x?",
        "http://api.test/x?a",
        "http://api.test/xa",
        "http://api.test/x?a:b",
    ];
    type Hs = Vec<(String, Vec<u8>)>;
    fn random_headers(rng: &mut Rng) -> Hs {
        let n = rng.below(4) as usize;
        (0..n)
            .map(|_| {
                let name = NAMES[rng.below(NAMES.len() as u64) as usize].to_owned();
                let len = rng.below(4) as usize;
                let mut v: Vec<u8> = (0..len)
                    .map(|_| BYTES[rng.below(BYTES.len() as u64) as usize])
                    .collect();
                // A header value may not start or end with whitespace in a way http keeps
                // unchanged on the wire; keep them, HeaderValue accepts them.
                if v.first() == Some(&b' ') {
                    v[0] = b'a';
                }
                (name, v)
            })
            .collect()
    }
    fn canonical(uri: &str, hs: &Hs) -> (String, std::collections::BTreeMap<String, Vec<Vec<u8>>>) {
        let mut m: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
        for (n, v) in hs {
            if n == "x-request-id" {
                continue;
            }
            m.entry(n.clone()).or_default().push(v.clone());
        }
        (uri.to_owned(), m)
    }
    fn build(uri: &str, hs: &Hs) -> Request<Full<Bytes>> {
        let pairs: Vec<(&str, &[u8])> =
            hs.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
        with_headers("GET", uri, &pairs)
    }
    let api = Shared::new(1, Shape::Ok);
    let svc = CoalesceLayer::new().layer(api.clone());
    let mut rng = Rng::new(0x69c0);
    let mut merged = 0;
    for i in 0..1500 {
        let ua = URIS[rng.below(URIS.len() as u64) as usize];
        let ha = random_headers(&mut rng);
        // B: a mutation of A most of the time, so near misses are common.
        let (ub, hb) = match rng.below(6) {
            0 => (
                URIS[rng.below(URIS.len() as u64) as usize],
                random_headers(&mut rng),
            ),
            1 => (ua, ha.clone()),
            2 => {
                let mut hb = ha.clone();
                if hb.len() >= 2 {
                    let j = rng.below(hb.len() as u64 - 1) as usize;
                    // Move the last byte of one value to the front of the next.
                    if let Some(c) = hb[j].1.pop() {
                        hb[j + 1].1.insert(0, c);
                    }
                }
                (ua, hb)
            }
            3 => {
                let mut hb = ha.clone();
                hb.reverse();
                (ua, hb)
            }
            4 => {
                let mut hb = ha.clone();
                if let Some(h) = hb.first_mut() {
                    // Move the value's first byte onto the name.
                    if h.0 == "a" && h.1.first() == Some(&b'b') {
                        h.0 = "ab".into();
                        h.1.remove(0);
                    } else {
                        h.1.push(b'a');
                    }
                }
                (ua, hb)
            }
            _ => {
                let mut hb = ha.clone();
                hb.push(("x-request-id".into(), b"zz".to_vec()));
                (ua, hb)
            }
        };
        let identical = canonical(ua, &ha) == canonical(ub, &hb);
        let shared = joins(&svc, &api, build(ua, &ha), build(ub, &hb)).await;
        assert_eq!(shared, identical, "pair {i}: {ua} {ha:?} / {ub} {hb:?}");
        if shared {
            merged += 1;
        }
    }
    assert!(merged > 100, "{merged}");
}

// ---------------------------------------------------------------- batch 2: circuit

/// Runs `f` on a thread of its own with a current-thread runtime, paused clock; fails if it
/// does not finish in 10 s of real time (a deadlock on a std lock cannot be cut by a tokio
/// timeout).
fn on_own_thread<F, Fut>(what: &'static str, f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(f())));
        let _ = tx.send(r.err().map(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        }));
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(None) => {}
        Ok(Some(panic)) => panic!("{what}: panicked: {panic}"),
        Err(_) => panic!("{what}: hung (deadlock?)"),
    }
}

/// layer.rs: "Calls `f(key, from, to)` on every state change (after the breaker's lock is
/// released)": a callback may use the handle (read every state, force a breaker) without a
/// deadlock; `on_event` likewise.
#[test]
fn state_change_callbacks_may_use_the_handle() {
    on_own_thread("on_state_change", || async {
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (handle.clone(), seen.clone());
        let layer = layer.on_state_change(move |key, from, to| {
            let n = h.states().len();
            let now = h.state(key);
            s.lock()
                .unwrap()
                .push(format!("{key} {from:?}->{to:?} {n} {now:?}"));
        });
        let (h2, events) = (handle.clone(), Arc::new(AtomicUsize::new(0)));
        let e2 = events.clone();
        let layer = layer.on_event(move |ev| {
            let _ = h2.states();
            if matches!(
                ev,
                sturdy::core::events::Event::CircuitRejected { .. }
                    | sturdy::core::events::Event::CircuitChanged { .. }
            ) {
                e2.fetch_add(1, Ordering::SeqCst);
            }
        });
        let api = Api::new(500);
        let svc = layer.layer(api.clone());
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        let _ = svc
            .clone()
            .oneshot(get("http://a.test/"))
            .await
            .unwrap_err();
        tokio::time::advance(Duration::from_secs(1)).await;
        api.set(200);
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        handle.force_open("a.test");
        handle.force_close("a.test");
        let seen = seen.lock().unwrap().clone();
        assert!(seen.len() >= 3, "{seen:?}");
        // open, reject, half-open, closed: four events at least.
        assert!(events.load(Ordering::SeqCst) >= 4);
    });
}

/// A callback that forces the breaker from inside a state change does not deadlock either.
#[test]
fn a_callback_forcing_the_breaker_does_not_deadlock() {
    on_own_thread("force in callback", || async {
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .pair();
        let h = handle.clone();
        let layer = layer.on_state_change(move |key, _from, to| {
            if matches!(to, CircuitState::Open { .. }) {
                h.force_close(key);
            }
        });
        let svc = layer.layer(Api::new(500));
        for _ in 0..3 {
            svc.clone().oneshot(get("http://a.test/")).await.unwrap();
        }
    });
}

/// circuit.md: "Opens when at least 50 % of the calls of the last 30 s failed, once there were
/// at least 100". Calls 29 s apart are both in the last 30 s; calls 31 s apart are not.
#[tokio::test(start_paused = true)]
async fn the_window_is_the_last_thirty_seconds() {
    // 50 failures, 29 s, 50 failures: 100 calls in the last 30 s, all failed.
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.clone());
    for _ in 0..50 {
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(29)).await;
    for _ in 0..50 {
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    }
    assert!(
        matches!(handle.state("a.test"), Some(CircuitState::Open { .. })),
        "100 failures within 29 s: {:?}",
        handle.state("a.test")
    );
    // 99 failures, 31 s, 1 failure: only one call in the last 30 s.
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.clone());
    for _ in 0..99 {
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    }
    tokio::time::advance(Duration::from_secs(31)).await;
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// layer.rs: "a breaker forced open reports `max` as its `retry_in`"; circuit.md: "back to
/// 30 s after a close" (a `force_close` is a close); the handle finds hosts in any case.
#[tokio::test(start_paused = true)]
async fn forced_breakers_and_reset_after_force_close() {
    let api = Api::new(500);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(35))
        .pair();
    let svc = layer.layer(api.clone());
    handle.force_open("API.test");
    let err = svc
        .clone()
        .oneshot(get("http://api.TEST/"))
        .await
        .unwrap_err();
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Forced);
    assert_eq!(open.retry_in(), Duration::from_secs(35));
    assert!(
        err.to_string().contains("forced open through its handle"),
        "{err}"
    );
    assert_eq!(handle.state("api.test"), Some(CircuitState::ForcedOpen));
    // Forced open stays open past any period.
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(svc.clone().oneshot(get("http://api.test/")).await.is_err());
    assert_eq!(api.calls(), 0);
    handle.force_close("Api.Test");
    // Two openings: 10 s, then 20 s.
    svc.clone().oneshot(get("http://api.test/")).await.unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    svc.clone().oneshot(get("http://api.test/")).await.unwrap();
    let err = svc
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_secs(20));
    // A reset by hand, then a failure: 10 s again.
    handle.force_close("api.test");
    svc.clone().oneshot(get("http://api.test/")).await.unwrap();
    let err = svc
        .clone()
        .oneshot(get("http://api.test/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_secs(10), "{err}");
}

/// circuit.md: "Whatever the classifier says, an error for a call that never reached the
/// dependency is not counted at all (neither failure nor success, and a probe gets its slot
/// back)".
#[tokio::test(start_paused = true)]
async fn a_probe_that_never_reached_the_dependency_gives_its_slot_back() {
    let mode = Arc::new(AtomicU16::new(500));
    let m = mode.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let code = m.load(Ordering::SeqCst);
        async move {
            match code {
                0 => Err::<Response<Full<Bytes>>, BoxError>(Box::new(
                    sturdy::core::Error::new(ErrorKind::Timeout, "no access token within 5s")
                        .with_cause_elsewhere(),
                )),
                c => Ok(status(c)),
            }
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_classifier(|_r: &Result<Response<Full<Bytes>>, BoxError>| {
            // A classifier that calls everything a failure.
            sturdy::core::Outcome::Retryable(ErrorKind::Server(StatusCode::BAD_GATEWAY))
        })
        .pair();
    let svc = layer.layer(api);
    mode.store(200, Ordering::SeqCst);
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
    tokio::time::advance(Duration::from_secs(1)).await;
    // The probe is refused below, before it left: not counted, and the slot is back.
    mode.store(0, Ordering::SeqCst);
    for _ in 0..3 {
        let err = svc
            .clone()
            .oneshot(get("http://a.test/"))
            .await
            .unwrap_err();
        assert!(
            sturdy::core::find::<CircuitOpen>(&*err).is_none(),
            "the probe's slot was not given back: {err}"
        );
        assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    }
}

/// Events carry the host by default and `None` with a custom key; a rejected call is an event.
#[tokio::test(start_paused = true)]
async fn events_name_the_host_or_only_the_key() {
    for custom in [false, true] {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s = seen.clone();
        let layer = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .on_event(move |ev| {
                let line = match ev {
                    sturdy::core::events::Event::CircuitChanged { key, host, .. } => {
                        format!("changed {key} {host:?}")
                    }
                    sturdy::core::events::Event::CircuitRejected {
                        key,
                        host,
                        retry_in,
                        ..
                    } => {
                        format!("rejected {key} {host:?} {retry_in:?}")
                    }
                    _ => return,
                };
                s.lock().unwrap().push(line);
            });
        let api = Api::new(500);
        let uri = "http://user:pw@Tenant.test:81/";
        if custom {
            let svc = layer
                .with_key(|_r: &Request<Full<Bytes>>| "Tenant-A".to_owned())
                .layer(api);
            svc.clone().oneshot(get(uri)).await.unwrap();
            svc.clone().oneshot(get(uri)).await.unwrap_err();
        } else {
            let svc = layer.layer(api);
            svc.clone().oneshot(get(uri)).await.unwrap();
            svc.clone().oneshot(get(uri)).await.unwrap_err();
        }
        let seen = seen.lock().unwrap().clone();
        let want = if custom {
            ["changed Tenant-A None", "rejected Tenant-A None 30s"]
        } else {
            [
                "changed tenant.test:81 Some(\"tenant.test:81\")",
                "rejected tenant.test:81 Some(\"tenant.test:81\") 30s",
            ]
        };
        assert_eq!(seen, want, "custom={custom}");
    }
}

// ---------------------------------------------------------------- batch 2: coalescing

/// What passes through untouched: a GET with a body, a POST, and a request with `CallOptions`
/// (which also does not start a call that a plain identical request could join).
#[tokio::test(start_paused = true)]
async fn what_is_not_coalesced() {
    let api = Shared::new(3, Shape::Ok);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api.clone());
    let body_get = || {
        Request::get("http://api.test/search")
            .body(Full::new(Bytes::from_static(b"{\"q\":1}")))
            .unwrap()
    };
    assert!(
        !joins(&svc, &api, body_get(), body_get()).await,
        "GET with a body"
    );
    let post = || {
        Request::post("http://api.test/x")
            .body(Full::default())
            .unwrap()
    };
    assert!(!joins(&svc, &api, post(), post()).await, "POST");
    let with_opts = || {
        let mut r = get("http://api.test/x");
        r.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
        r
    };
    assert!(
        !joins(&svc, &api, with_opts(), with_opts()).await,
        "options, options"
    );
    assert!(
        !joins(&svc, &api, with_opts(), get("http://api.test/x")).await,
        "a plain request joined a call made under another request's CallOptions"
    );
    assert!(
        !joins(&svc, &api, get("http://api.test/x"), with_opts()).await,
        "a request with CallOptions joined a plain call"
    );
    assert_eq!(handle.stats().joined(), 0);
}

/// coalesce.md: the body bound, read literally: a body of exactly the bound is shared, one
/// byte more is not (by what arrived: the test's bodies have no size hint).
#[tokio::test(start_paused = true)]
async fn the_body_bound_is_inclusive() {
    for (size, shared) in [(0usize, true), (100, true), (101, false)] {
        let api = Shared::new(size, Shape::Ok);
        let (layer, handle) = CoalesceLayer::new().with_max_body(100).pair();
        let svc = layer.layer(api.clone());
        let a = tokio::spawn(svc.clone().oneshot(get("http://api.test/b")));
        settle().await;
        let b = tokio::spawn(svc.clone().oneshot(get("http://api.test/b")));
        settle().await;
        api.release();
        for t in [a, b] {
            let res = within("bound", t).await.unwrap().unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), size);
        }
        assert_eq!(api.calls(), if shared { 1 } else { 2 }, "size {size}");
        assert_eq!(
            handle.stats().too_large(),
            u64::from(!shared),
            "size {size}"
        );
    }
}

/// coalesce.md: "If the caller that started the call has gone, the first other caller to look
/// gets the response instead."
#[tokio::test(start_paused = true)]
async fn too_large_with_the_leader_gone_goes_to_the_first_other_caller() {
    let api = Shared::new(2 << 20, Shape::Ok);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api.clone());
    let leader = tokio::spawn(svc.clone().oneshot(get("http://api.test/big")));
    settle().await;
    let others: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/big"))))
        .collect();
    settle().await;
    leader.abort();
    let _ = leader.await;
    settle().await;
    api.release();
    let mut got_call0 = 0;
    for t in others {
        let res = within("other", t).await.unwrap().unwrap();
        if res.headers()["x-call"] == "call-0" {
            got_call0 += 1;
        }
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 2 << 20);
    }
    assert_eq!(got_call0, 1);
    assert_eq!(api.calls(), 3, "1 shared call + 2 of their own");
    assert_eq!(handle.stats().fallbacks(), 2);
}

/// coalesce.md: "past 30 s from the head ..., each caller gets a `Timeout` error ("the shared
/// response's body did not arrive within 30s of its head")"; a custom bound names itself; a
/// bound of `Duration::MAX` does not panic.
#[tokio::test(start_paused = true)]
async fn a_stalled_shared_body_times_out_in_the_documented_words() {
    for (layer, words) in [
        (CoalesceLayer::new(), Some("within 30s of its head")),
        (
            CoalesceLayer::new().with_body_timeout(Duration::from_millis(250)),
            Some("within 250ms of its head"),
        ),
        (CoalesceLayer::new().with_body_timeout(Duration::MAX), None),
    ] {
        let stalled = service_fn(|_req: Request<Full<Bytes>>| async {
            let frames = futures_util::StreamExt::chain(
                futures_util::stream::iter(vec![Ok::<_, BoxError>(http_body::Frame::data(
                    Bytes::from_static(b"head"),
                ))]),
                futures_util::stream::pending(),
            );
            let body: Body = http_body_util::StreamBody::new(frames).boxed();
            Ok::<_, BoxError>(Response::new(body))
        });
        let svc = layer.layer(stalled);
        let tasks: Vec<_> = (0..3)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/stall"))))
            .collect();
        match words {
            Some(words) => {
                for t in tasks {
                    let err = tokio::time::timeout(Duration::from_secs(60), t)
                        .await
                        .expect("no timeout within 60 s")
                        .unwrap()
                        .unwrap_err();
                    assert!(err.to_string().contains(words), "{err}");
                    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
                    assert!(matches!(e.kind(), ErrorKind::Timeout), "{err}");
                }
            }
            None => {
                tokio::time::advance(Duration::from_secs(3600)).await;
                settle().await;
                for t in &tasks {
                    assert!(!t.is_finished());
                }
                for t in tasks {
                    t.abort();
                }
            }
        }
    }
}

/// coalesce.md: "every caller gets the status, headers, extensions and a `ResponseBody` over
/// the same bytes (and trailers)".
#[tokio::test(start_paused = true)]
async fn extensions_and_trailers_reach_every_caller() {
    #[derive(Clone, Debug, PartialEq)]
    struct Tag(u32);
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc"));
        let frames = vec![
            Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"payload"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let body: Body =
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut res = Response::new(body);
        res.extensions_mut().insert(Tag(7));
        Ok::<_, BoxError>(res)
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/t"))))
        .collect();
    for t in tasks {
        let res = within("t", t).await.unwrap().unwrap();
        assert_eq!(res.extensions().get::<Tag>(), Some(&Tag(7)));
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(collected.to_bytes(), "payload");
    }
    assert_eq!(handle.stats().upstream(), 1);
}

/// coalesce.md, "Per host": "at most 1,024 tables (`.with_max_hosts(n)`)"; the handle's
/// `in_flight` of a host past the bound is the overflow table's; the `Coalesced` event's key is
/// `*` there. Identical requests to two hosts in one table never share.
#[tokio::test(start_paused = true)]
async fn hosts_past_the_bound_share_a_table_not_calls() {
    let keys = Arc::new(Mutex::new(Vec::<String>::new()));
    let k = keys.clone();
    let api = Shared::new(3, Shape::Ok);
    let (layer, handle) = CoalesceLayer::new()
        .with_max_hosts(1)
        .on_event(move |ev| {
            if let sturdy::core::events::Event::Coalesced { key, host, .. } = ev {
                k.lock().unwrap().push(format!("{key} {host:?}"));
            }
        })
        .pair();
    let svc = layer.layer(api.clone());
    let uris = [
        "http://a.test/x",
        "http://b.test/x",
        "http://c.test/x",
        "http://c.test/x",
    ];
    let tasks: Vec<_> = uris
        .iter()
        .map(|u| tokio::spawn(svc.clone().oneshot(get(u))))
        .collect();
    settle().await;
    assert_eq!(api.calls(), 3);
    assert_eq!(handle.in_flight("A.test"), 1);
    assert_eq!(
        handle.in_flight("c.test"),
        2,
        "b and c share the overflow table"
    );
    api.release();
    for t in tasks {
        within("t", t).await.unwrap().unwrap();
    }
    let keys = keys.lock().unwrap().clone();
    assert_eq!(keys, ["* Some(\"c.test\")"]);
    // 100,000 hosts, one call each: nothing is left in flight, and it is quick.
    api.hold.store(false, Ordering::SeqCst);
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(api.clone());
    // Real time on purpose: the clock is paused, and this bounds the CPU cost.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    for i in 0..100_000u32 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(get(&format!("http://h{i}.test/")))
            .await
            .unwrap();
        drop(res);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(handle.in_flight("h99999.test"), 0);
}

// ---------------------------------------------------------------- batch 3: forgotten breakers

/// circuit.md: healthy breakers are forgotten past `with_max_breakers`, and "Keys forced open
/// or closed by hand ... get a breaker of their own even past the bound"; handle.rs:
/// `force_open`: "its breaker stays open until `force_close`". A kept service whose last call
/// went to a host whose breaker was since forgotten must still obey the handle for that host.
#[tokio::test(start_paused = true)]
async fn a_kept_service_obeys_force_open_after_its_breaker_was_forgotten() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new().with_max_breakers(1).pair();
    let svc = layer.layer(api.clone());
    let mut kept = svc.clone();
    // kept's last call is to a.test (its breaker: closed, healthy).
    kept.ready()
        .await
        .unwrap()
        .call(get("http://a.test/"))
        .await
        .unwrap();
    // b.test takes the one place: a.test's healthy breaker is forgotten.
    svc.clone().oneshot(get("http://b.test/")).await.unwrap();
    handle.force_open("a.test");
    assert_eq!(handle.state("a.test"), Some(CircuitState::ForcedOpen));
    // A fresh clone is refused; so must the kept one be.
    let fresh = svc.clone().oneshot(get("http://a.test/")).await;
    assert!(
        fresh.is_err(),
        "a fresh clone was let through a forced-open breaker"
    );
    let before = api.calls();
    let kept_res = kept
        .ready()
        .await
        .unwrap()
        .call(get("http://a.test/"))
        .await;
    assert!(
        kept_res.is_err(),
        "the kept service called a.test through a breaker forced open"
    );
    assert_eq!(api.calls(), before);
}

/// The same with failures: a kept service's failures to a host whose breaker was forgotten
/// and made again are seen by the handle, and open the breaker the handle reports.
#[tokio::test(start_paused = true)]
async fn a_kept_service_counts_into_the_breaker_the_handle_sees() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_max_breakers(1)
        .with_consecutive_failures(3)
        .pair();
    let svc = layer.layer(api.clone());
    let mut kept = svc.clone();
    kept.ready()
        .await
        .unwrap()
        .call(get("http://a.test/"))
        .await
        .unwrap();
    svc.clone().oneshot(get("http://b.test/")).await.unwrap();
    // a.test is forgotten; b.test is healthy too. Now a.test fails through the kept service.
    api.set(503);
    for _ in 0..3 {
        let _ = kept
            .ready()
            .await
            .unwrap()
            .call(get("http://a.test/"))
            .await;
    }
    let state = handle.state("a.test");
    assert!(
        matches!(state, Some(CircuitState::Open { .. })),
        "three failures in a row to a.test, the handle says {state:?}"
    );
    let refused = svc.clone().oneshot(get("http://a.test/")).await;
    assert!(refused.is_err(), "a fresh clone still calls a.test");
}

// ---------------------------------------------------------------- ClientBuilder

fn assert_send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}

/// The breaker and coalescing in a `ClientBuilder` stack (in-process API, paused time): an open
/// breaker's refusal reaches every coalesced caller as a `CircuitOpen`, in the breaker's words
/// and with its host; the API is not called while it is open; after the open period one call
/// closes it for all.
#[tokio::test(start_paused = true)]
async fn builder_breaker_and_coalescing_together() {
    let api = Api::new(503);
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_secs(5), Duration::from_secs(5))
        .pair();
    let (coalesce, stats) = CoalesceLayer::new().pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(breaker)
        .with_coalesce(coalesce)
        .build(api.clone());
    assert_send_sync(&client);
    for _ in 0..2 {
        let res = client
            .clone()
            .oneshot(get("http://API.test/r"))
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
    }
    assert!(matches!(
        handle.state("api.test"),
        Some(CircuitState::Open { .. })
    ));
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://api.test/r"))))
        .collect();
    for t in tasks {
        let err = within("refused", t).await.unwrap().unwrap_err();
        let open = open_of(&err);
        assert_eq!(open.reason(), OpenReason::Failing);
        assert_eq!(open.key(), "api.test");
        assert!(err.to_string().contains("api.test"), "{err}");
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            sturdy::core::Delivery::NotSent,
            "{err}"
        );
    }
    assert_eq!(api.calls(), 2);
    tokio::time::advance(Duration::from_secs(5)).await;
    api.set(200);
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client.clone().oneshot(get("http://api.test/r"))))
        .collect();
    let mut ok = 0;
    for t in tasks {
        if let Ok(res) = within("after", t).await.unwrap() {
            assert_eq!(res.status(), 200);
            ok += 1;
        }
    }
    assert!(ok >= 1);
    assert_eq!(handle.state("api.test"), Some(CircuitState::Closed));
    let s = stats.stats();
    assert!(s.calls() >= 40, "{s:?}");
}

/// client.rs: "put it under `Buffer` or a concurrency limit, drive it with `oneshot` or keep it
/// and call `ready().await?.call(req)`". Kept clones of a whole client under `Buffer` and
/// `ConcurrencyLimit(1)` while its breaker opens, half-opens and closes: no hang.
#[tokio::test(start_paused = true)]
async fn builder_client_under_buffer_and_limit_through_breaker_states() {
    let api = Api::new(500);
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(2), Duration::from_secs(2))
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .with_coalesce(CoalesceLayer::new())
        .build(api.clone());
    let limited = tower::limit::ConcurrencyLimit::new(client, 1);
    let buffered = tower::buffer::Buffer::new(limited, 1);
    let mut kept: Vec<_> = (0..3).map(|_| buffered.clone()).collect();
    let mut mix = Rng::new(7);
    for round in 0..60 {
        if round == 30 {
            api.set(200);
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        let k = &mut kept[mix.below(3) as usize];
        let res = within("kept client", async {
            k.ready().await?.call(get("http://api.test/")).await
        })
        .await;
        if round > 30 {
            assert!(res.is_ok(), "round {round}: {:?}", res.err());
        }
    }
    assert_eq!(handle.state("api.test"), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------- over the wire

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// An axum server on 127.0.0.1:0 whose `/slow` takes 200 ms and `/big` answers 10 MiB, `/down`
/// 503; every request counted.
async fn axum_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use axum::routing::get as route;
    let hits = Arc::new(AtomicUsize::new(0));
    let (h1, h2, h3) = (hits.clone(), hits.clone(), hits.clone());
    let app = axum::Router::new()
        .route(
            "/slow",
            route(move || {
                h1.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    "slow answer"
                }
            }),
        )
        .route(
            "/big",
            route(move || {
                h2.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    vec![b'z'; 10 << 20]
                }
            }),
        )
        .route(
            "/down",
            route(move || {
                h3.fetch_add(1, Ordering::SeqCst);
                async { (StatusCode::SERVICE_UNAVAILABLE, "down") }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

#[tokio::test]
async fn wire_fifty_identical_gets_one_request() {
    let (addr, hits) = axum_server().await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = sturdy::ClientBuilder::new()
        .with_coalesce(layer)
        .build(hyper_client());
    let uri = format!("http://{addr}/slow");
    let tasks: Vec<_> = (0..50)
        .map(|_| tokio::spawn(client.clone().oneshot(get(&uri))))
        .collect();
    for t in tasks {
        let res = within("wire", t).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "slow answer");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().joined(), 49);
}

#[tokio::test]
async fn wire_a_ten_mib_body_is_not_shared_and_each_gets_it_whole() {
    let (addr, hits) = axum_server().await;
    let (layer, handle) = CoalesceLayer::new().pair();
    let client = sturdy::ClientBuilder::new()
        .with_coalesce(layer)
        .build(hyper_client());
    let uri = format!("http://{addr}/big");
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(client.clone().oneshot(get(&uri))))
        .collect();
    for t in tasks {
        let res = within("wire big", t).await.unwrap().unwrap();
        let body = within("wire big body", res.into_body().collect())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), 10 << 20);
    }
    let s = handle.stats();
    assert_eq!(
        hits.load(Ordering::SeqCst) as u64,
        1 + s.fallbacks(),
        "{s:?}"
    );
    assert_eq!(s.too_large(), 1);
}

#[tokio::test]
async fn wire_an_open_breaker_stops_the_requests() {
    let (addr, hits) = axum_server().await;
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(breaker)
        .build(hyper_client());
    let uri = format!("http://{addr}/down");
    let mut refused = 0;
    for _ in 0..10 {
        match within("down", client.clone().oneshot(get(&uri))).await {
            Ok(res) => assert_eq!(res.status(), 503),
            Err(e) => {
                assert_eq!(open_of(&e).key(), addr.to_string());
                refused += 1;
            }
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(refused, 7);
    assert!(matches!(
        handle.state(&addr.to_string()),
        Some(CircuitState::Open { .. })
    ));
}

/// A raw server that answers `Content-Length: 1000` with 100 bytes after 150 ms, then closes:
/// every coalesced caller gets a `Body` error, from one connection.
#[tokio::test]
async fn wire_a_body_cut_short_is_one_body_error_for_every_caller() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                let _ = s.write_all(&[b'q'; 100]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let client = sturdy::ClientBuilder::new()
        .with_coalesce(CoalesceLayer::new())
        .build(hyper_client());
    let uri = format!("http://{addr}/cut");
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(client.clone().oneshot(get(&uri))))
        .collect();
    for t in tasks {
        let err = within("cut", t).await.unwrap().unwrap_err();
        let e = err
            .downcast_ref::<sturdy::core::Error>()
            .expect("a sturdy Error");
        assert!(matches!(e.kind(), ErrorKind::Body), "{err}: {:?}", e.kind());
        assert!(
            err.to_string()
                .starts_with("the call shared by identical requests in flight failed: "),
            "{err}"
        );
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------- batch 4

/// Requests that differ only in the URI's `user:password@` carry different credentials: they
/// are not identical (the URI as written), and the password shows in no event.
#[tokio::test(start_paused = true)]
async fn userinfo_is_part_of_the_identity_and_never_shown() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let api = Shared::new(3, Shape::Ok);
    let svc = CoalesceLayer::new()
        .on_event(move |ev| s.lock().unwrap().push(format!("{ev:?}")))
        .layer(api.clone());
    let a = get("http://u:PASSWORD_A@api.test/x");
    let b = get("http://u:PASSWORD_B@api.test/x");
    assert!(!joins(&svc, &api, a, b).await);
    let a = get("http://u:PASSWORD_A@api.test/x");
    let b = get("http://u:PASSWORD_A@api.test/x");
    assert!(joins(&svc, &api, a, b).await);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].contains("PASSWORD"), "{seen:?}");
}

/// circuit.md: "A failure is ... a timeout (from a timer under the breaker:
/// `AttemptTimeoutLayer`, as `ClientBuilder` places it) ... An attempt cut by a timer above the
/// breaker ... is dropped, not failed, and a dropped call is not counted".
#[tokio::test(start_paused = true)]
async fn builder_attempt_timeouts_count_and_deadlines_do_not() {
    let hang = || {
        service_fn(|_req: Request<Full<Bytes>>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(status(200))
        })
    };
    // The builder's attempt timeout (under the breaker): two timeouts open it.
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_attempt_timeout(Duration::from_millis(100))
        .with_circuit_breaker(breaker)
        .build(hang());
    for _ in 0..2 {
        let err = within("t", client.clone().oneshot(get("http://a.test/")))
            .await
            .unwrap_err();
        let e = sturdy::core::find::<sturdy::core::Error>(&*err);
        assert!(
            matches!(e.map(|e| e.kind()), Some(ErrorKind::Timeout)),
            "{err}"
        );
    }
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
    // A request's own attempt timeout is that timer too.
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .without_attempt_timeout()
        .with_circuit_breaker(breaker)
        .build(hang());
    for _ in 0..2 {
        let mut req = get("http://a.test/");
        req.extensions_mut()
            .insert(CallOptions::new().with_attempt_timeout(Duration::from_millis(100)));
        within("t", client.clone().oneshot(req)).await.unwrap_err();
    }
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
    // A caller's timeout above the client: dropped, not counted.
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .without_attempt_timeout()
        .with_circuit_breaker(breaker)
        .build(hang());
    for _ in 0..5 {
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            client.clone().oneshot(get("http://a.test/")),
        )
        .await;
        assert!(r.is_err());
    }
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// A probe whose inner future panics: the task dies, the future is dropped, the slot is back.
#[tokio::test(start_paused = true)]
async fn a_probe_that_panics_gives_its_slot_back() {
    let mode = Arc::new(AtomicU16::new(500));
    let m = mode.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let code = m.load(Ordering::SeqCst);
        async move {
            tokio::task::yield_now().await;
            if code == 0 {
                panic!("the probe blew up");
            }
            Ok::<_, Infallible>(status(code))
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(api);
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    mode.store(0, Ordering::SeqCst);
    let t = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    assert!(t.await.unwrap_err().is_panic());
    mode.store(200, Ordering::SeqCst);
    let res = svc.clone().oneshot(get("http://a.test/")).await;
    assert!(
        res.is_ok(),
        "refused after a panicked probe: {:?}",
        res.err()
    );
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// coalesce.md: "A panic later, while the shared call's future is polled ... is caught: every
/// caller of that call ... gets an error ("... a layer or service below panicked while running
/// it: <the panic's message>", delivery: may have been processed), and the next identical
/// request makes a call of its own."
#[tokio::test(start_paused = true)]
async fn a_shared_future_that_panics_fails_every_caller_in_words() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if n == 0 {
                panic!("boom at the bottom");
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    });
    let svc = CoalesceLayer::new().layer(api);
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://api.test/p"))))
        .collect();
    for t in tasks {
        let err = within("panic", t)
            .await
            .expect("the caller's task itself panicked")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("panicked while running it: boom at the bottom"),
            "{text}"
        );
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            sturdy::core::Delivery::MaybeProcessed,
            "{text}"
        );
    }
    let res = svc.clone().oneshot(get("http://api.test/p")).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
}

/// `with_key_headers` leaves the `Host` header out, and two relative requests for two hosts
/// (told apart only by their `Host` header) each have a table of their own ("Per host: each
/// host ... has its own table of calls in flight"); past `with_max_hosts`, the hosts share
/// one table, where one host's response went to a caller of the other (fixed: a relative URI's
/// `Host` is part of the identity whatever the key headers).
#[tokio::test(start_paused = true)]
async fn relative_requests_to_two_hosts_past_the_bound_share_a_call() {
    let api = Shared::new(3, Shape::Ok);
    let svc = CoalesceLayer::new()
        .with_key_headers([http::header::AUTHORIZATION])
        .with_max_hosts(1)
        .layer(api.clone());
    let rel = |host: &'static str| {
        let mut r = get("/v1/me");
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static(host));
        r
    };
    // first.test takes the one table; b.test and c.test share the overflow one.
    let hold = tokio::spawn(svc.clone().oneshot(rel("first.test")));
    settle().await;
    let b = rel("b.test");
    let c = rel("c.test");
    let shared = joins(&svc, &api, b, c).await;
    api.release();
    let _ = hold.await;
    assert!(!shared, "a request to c.test got the response b.test gave");
}

/// Within one host's table, with `with_key_headers`, two hosts can never meet; the default
/// (every header counts) keeps relative requests to two hosts apart even in the overflow table.
#[tokio::test(start_paused = true)]
async fn relative_requests_to_two_hosts_by_default_never_share() {
    let api = Shared::new(3, Shape::Ok);
    let svc = CoalesceLayer::new().with_max_hosts(1).layer(api.clone());
    let rel = |host: &'static str| {
        let mut r = get("/v1/me");
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static(host));
        r
    };
    let hold = tokio::spawn(svc.clone().oneshot(rel("first.test")));
    settle().await;
    assert!(!joins(&svc, &api, rel("b.test"), rel("c.test")).await);
    api.release();
    let _ = hold.await;
}

/// An API whose every call waits for its own release, with its own status.
#[derive(Clone, Debug, Default)]
struct Manual {
    waiting: Arc<Mutex<Vec<tokio::sync::oneshot::Sender<u16>>>>,
}

impl Manual {
    fn answer_oldest(&self, code: u16) {
        let tx = self.waiting.lock().unwrap().remove(0);
        let _ = tx.send(code);
    }
    fn pending(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }
}

impl Service<Request<Full<Bytes>>> for Manual {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = BoxFut<Result<Self::Response, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting.lock().unwrap().push(tx);
        Box::pin(async move {
            let code = rx.await?;
            Ok(status(code))
        })
    }
}

/// circuit.md: "A failed probe reopens at once" and "Open ... 30 s": a second probe of the
/// same half-open period that succeeds after the first failed does not close the breaker it
/// reopened.
#[tokio::test(start_paused = true)]
async fn a_late_probe_success_does_not_close_a_reopened_breaker() {
    let api = Manual::default();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(10))
        .with_probes(2)
        .pair();
    let svc = layer.layer(api.clone());
    let first = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    settle().await;
    api.answer_oldest(500);
    first.await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let p1 = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    let p2 = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    settle().await;
    assert_eq!(api.pending(), 2);
    api.answer_oldest(500);
    p1.await.unwrap().unwrap();
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
    api.answer_oldest(200);
    p2.await.unwrap().unwrap();
    let state = handle.state("a.test");
    assert!(
        matches!(state, Some(CircuitState::Open { .. })),
        "the late probe's success turned a reopened breaker into {state:?}"
    );
}

/// A call admitted while the breaker was closed, answering while it is half-open, is not a
/// probe: its success neither closes the breaker nor takes a probe's place.
#[tokio::test(start_paused = true)]
async fn a_call_from_before_the_opening_is_not_a_probe() {
    let api = Manual::default();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(10))
        .pair();
    let svc = layer.layer(api.clone());
    let old = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    let failing = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    settle().await;
    // The old call waits; the second fails and opens.
    let tx_old = api.waiting.lock().unwrap().remove(0);
    api.answer_oldest(500);
    failing.await.unwrap().unwrap();
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
    tokio::time::advance(Duration::from_secs(10)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    settle().await;
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    let _ = tx_old.send(200);
    old.await.unwrap().unwrap();
    let state = handle.state("a.test");
    assert_eq!(
        state,
        Some(CircuitState::HalfOpen),
        "a call from before the opening closed the breaker while its probe is out"
    );
    // The probe is still the only one: another call is refused as Probing.
    let err = svc
        .clone()
        .oneshot(get("http://a.test/"))
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Probing);
    api.answer_oldest(200);
    probe.await.unwrap().unwrap();
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// A failure of a call from before the opening, answering while the breaker is half-open, does
/// not reopen it under its probe either (it says nothing new: the breaker opened on it).
#[tokio::test(start_paused = true)]
async fn a_stale_failure_does_not_reopen_a_half_open_breaker() {
    let api = Manual::default();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(10))
        .pair();
    let svc = layer.layer(api.clone());
    let old = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    let failing = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    settle().await;
    let tx_old = api.waiting.lock().unwrap().remove(0);
    api.answer_oldest(500);
    failing.await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get("http://a.test/")));
    settle().await;
    let _ = tx_old.send(500);
    old.await.unwrap().unwrap();
    assert_eq!(handle.state("a.test"), Some(CircuitState::HalfOpen));
    api.answer_oldest(200);
    probe.await.unwrap().unwrap();
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
}

/// key.rs: `ByHost`: the URI's authority without `user:password@`, else the `Host` header's,
/// in lower case; "The port is part of the key as written". The rate limiter's keys, read
/// through refusals: one host written five ways is one quota.
#[tokio::test(start_paused = true)]
async fn rate_limit_keys_are_hosts_in_any_case_and_spelling() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let quota = Quota::per_second(1).unwrap().with_burst(1).unwrap();
    let api = Api::new(200);
    let svc = RateLimitLayer::new(quota)
        .with_max_wait(Duration::ZERO)
        .layer(api.clone());
    let rel = |host: &'static str| {
        let mut r = get("/v1");
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static(host));
        r
    };
    let same = vec![
        get("http://api.test/"),
        get("http://API.TEST/x"),
        get("http://u:pw@Api.Test/y?q=1"),
        rel("Api.Test"),
        rel("api.test/path?api_key=SECRET"),
    ];
    let mut refused = Vec::new();
    for (i, req) in same.into_iter().enumerate() {
        let r = svc.clone().oneshot(req).await;
        if let Err(e) = &r {
            assert!(!e.to_string().contains("SECRET"), "{e}");
        }
        refused.push((i, r.is_err()));
    }
    assert_eq!(
        refused,
        [(0, false), (1, true), (2, true), (3, true), (4, true)],
        "one host, one quota"
    );
    // The port as written, and IPv6 in any case.
    assert!(svc
        .clone()
        .oneshot(get("http://api.test:80/"))
        .await
        .is_ok());
    assert!(svc
        .clone()
        .oneshot(get("http://[::AB]:8080/"))
        .await
        .is_ok());
    assert!(svc
        .clone()
        .oneshot(get("http://[::ab]:8080/"))
        .await
        .is_err());
}

/// service.rs (coalesce): "A request that joins a call in flight does not use it: that ready
/// service is dropped at once, which gives back what it reserved (a `ConcurrencyLimit`
/// permit)". Over `ConcurrencyLimit(2)`: a leader and a joiner, then a third, different
/// request is ready at once.
#[tokio::test(start_paused = true)]
async fn a_joiner_gives_its_permit_back_at_once() {
    let api = Shared::new(3, Shape::Ok);
    let svc = CoalesceLayer::new().layer(tower::limit::ConcurrencyLimit::new(api.clone(), 2));
    let mut leader = svc.clone();
    let mut joiner = svc.clone();
    let mut third = svc.clone();
    leader.ready().await.unwrap();
    let lf = tokio::spawn(leader.call(get("http://api.test/x")));
    settle().await;
    joiner.ready().await.unwrap();
    let jf = tokio::spawn(joiner.call(get("http://api.test/x")));
    settle().await;
    assert_eq!(api.calls(), 1);
    {
        let mut ready = tokio_test::task::spawn(third.ready());
        tokio_test::assert_ready!(ready.poll()).unwrap();
    }
    let tf = tokio::spawn(third.call(get("http://api.test/other")));
    settle().await;
    assert_eq!(api.calls(), 2);
    api.release();
    for t in [lf, jf, tf] {
        within("permit", t).await.unwrap().unwrap();
    }
}
