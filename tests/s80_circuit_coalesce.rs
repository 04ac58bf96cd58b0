//! s80: outside tests of the circuit breaker, request coalescing and per-host keys, read
//! against docs/guides/circuit.md, docs/guides/coalesce.md, docs/RELIABILITY.md and the
//! crates' rustdoc: documented numbers at their exact edges, rarely used setters at their
//! extremes, and compositions of two features.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::events::{BreakerState, Event};
use sturdy::core::{BoxError, CircuitOpen, ErrorKind, OpenReason};
use tokio::sync::{mpsc, oneshot};
use tower::{Layer, Service, ServiceExt};

// ---------------------------------------------------------------- helpers

/// A small seeded generator (splitmix64).
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

fn top(err: &BoxError) -> &sturdy::core::Error {
    err.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {err}"))
}

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(5), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: did not finish within 5 s"),
    }
}

/// Lets spawned tasks run until they are all parked.
async fn settle() {
    for _ in 0..30 {
        tokio::task::yield_now().await;
    }
}

/// One call through `svc` to `uri` with the API answering `code`; `Err` is the refusal.
async fn call_with<S>(svc: &S, api: &Api, uri: &str, code: u16) -> Result<u16, BoxError>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError> + Clone,
{
    api.set(code);
    svc.clone()
        .oneshot(get(uri))
        .await
        .map(|r| r.status().as_u16())
}

// ---------------------------------------------------------------- a channel body and a manual API

/// A body whose frames the test sends.
#[derive(Debug)]
struct ChanBody(mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx)
    }
}

type Frames = mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>;

fn chan() -> (Frames, ChanBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChanBody(rx))
}

fn whole(data: &[u8]) -> ChanBody {
    let (tx, body) = chan();
    if !data.is_empty() {
        tx.send(Ok(Frame::data(Bytes::copy_from_slice(data))))
            .unwrap();
    }
    drop(tx);
    body
}

/// A pending upstream call: the test answers it.
struct Pending {
    uri: String,
    answer: oneshot::Sender<Result<Response<ChanBody>, BoxError>>,
}

/// An API whose every call waits for the test's answer.
#[derive(Clone)]
struct Manual {
    pending: Arc<Mutex<Vec<Pending>>>,
    calls: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Manual {
    fn new() -> Self {
        Self {
            pending: Arc::new(Mutex::new(Vec::new())),
            calls: Arc::new(AtomicUsize::new(0)),
            dropped: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn take(&self) -> Pending {
        let mut p = self.pending.lock().unwrap();
        assert!(!p.is_empty(), "no upstream call is pending");
        p.remove(0)
    }
    fn take_last(&self) -> Pending {
        let mut p = self.pending.lock().unwrap();
        p.pop().expect("no upstream call is pending")
    }
    fn waiting(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

impl Service<Request<Full<Bytes>>> for Manual {
    type Response = Response<ChanBody>;
    type Error = BoxError;
    type Future = BoxFut<Result<Response<ChanBody>, BoxError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().push(Pending {
            uri: req.uri().to_string(),
            answer: tx,
        });
        let guard = DropCount(self.dropped.clone());
        Box::pin(async move {
            let _guard = guard;
            match rx.await {
                Ok(r) => r,
                Err(_) => Err("the test dropped the answer".into()),
            }
        })
    }
}

fn ok_with(body: ChanBody) -> Result<Response<ChanBody>, BoxError> {
    Ok(Response::builder().status(200).body(body).unwrap())
}

async fn text<B>(res: Response<B>) -> Result<Bytes, BoxError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    Ok(res
        .into_body()
        .collect()
        .await
        .map_err(Into::into)?
        .to_bytes())
}

// ---------------------------------------------------------------- circuit: numbers at their edges

/// layer.rs `with_failure_rate`: "Opens when at least `rate` (0.0 to 1.0) of the calls in the
/// last `window` failed, once the window holds at least `min_calls` calls". Exactly `rate` of
/// the calls failing opens it for every decimal rate 0.01 ..= 0.99 over 100 calls (and 0.1 ..=
/// 0.9 over 10): `0.3 * 100` is `30.000000000000004` in floating point, which must not make 30
/// failures of 100 fall short of "at least 30 %". One failure fewer does not open it.
#[tokio::test(start_paused = true)]
async fn exactly_the_failure_rate_opens_for_every_decimal_rate() {
    let mut short = Vec::new();
    let mut early = Vec::new();
    for (n, step) in [(100u32, 1u32), (10, 10)] {
        for pct in (step..100).step_by(step as usize) {
            let rate: f64 = format!("0.{pct:02}").parse().unwrap();
            let failures = pct * n / 100;
            for (fails, should_open) in [(failures, true), (failures - 1, false)] {
                let api = Api::new(200);
                let (layer, handle) = CircuitBreakerLayer::new()
                    .with_failure_rate(rate, Duration::from_secs(30), n)
                    .unwrap()
                    .pair();
                let svc = layer.layer(api.clone());
                for _ in 0..(n - fails) {
                    call_with(&svc, &api, "http://r.test/", 200).await.unwrap();
                }
                for _ in 0..fails {
                    call_with(&svc, &api, "http://r.test/", 503).await.unwrap();
                }
                let opened = matches!(handle.state("r.test"), Some(CircuitState::Open { .. }));
                if should_open && !opened {
                    short.push(format!("rate {rate} with {fails}/{n} failed stayed closed"));
                }
                if !should_open && opened {
                    early.push(format!("rate {rate} with {fails}/{n} failed opened"));
                }
                let next = call_with(&svc, &api, "http://r.test/", 200).await;
                assert_eq!(next.is_err(), opened, "rate {rate}, {fails}/{n}");
            }
        }
    }
    assert!(early.is_empty(), "{early:#?}");
    assert!(short.is_empty(), "{short:#?}");
}

/// layer.rs `with_failure_rate`: a `Config` error "when `rate` is not in `0.0..=1.0` or
/// `window` is zero"; circuit.md: "Setters never panic". Every other window, down to one
/// nanosecond and up to `Duration::MAX`, is accepted and works: no panic on the first call,
/// after years of paused time, or for ten thousand calls; a window of a millisecond or more
/// holding ten failures at one instant opens (min_calls 10).
#[tokio::test(start_paused = true)]
async fn failure_rate_windows_from_a_nanosecond_to_duration_max() {
    for rate in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -0.000_001,
        1.000_000_1,
        f64::MAX,
    ] {
        let err = CircuitBreakerLayer::new()
            .with_failure_rate(rate, Duration::from_secs(30), 10)
            .err()
            .unwrap_or_else(|| panic!("rate {rate} was accepted"));
        assert!(matches!(err.kind(), ErrorKind::Config), "{rate}: {err}");
    }
    let Err(err) = CircuitBreakerLayer::new().with_failure_rate(0.5, Duration::ZERO, 10) else {
        panic!("a zero window was accepted");
    };
    assert!(matches!(err.kind(), ErrorKind::Config), "{err}");

    let windows = [
        Duration::from_nanos(1),
        Duration::from_nanos(2),
        Duration::from_nanos(7),
        Duration::from_nanos(999),
        Duration::from_micros(1),
        Duration::from_millis(1),
        Duration::from_secs(1),
        Duration::from_secs(u64::from(u32::MAX)),
        Duration::from_secs(u64::MAX / 2),
        Duration::from_secs(u64::MAX),
        Duration::MAX,
    ];
    for w in windows {
        let api = Api::new(503);
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_failure_rate(0.5, w, 10)
            .unwrap_or_else(|e| panic!("window {w:?}: {e}"))
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let svc = layer.layer(api.clone());
        for _ in 0..10 {
            let _ = call_with(&svc, &api, "http://w.test/", 503).await;
        }
        if w >= Duration::from_millis(1) {
            assert!(
                matches!(handle.state("w.test"), Some(CircuitState::Open { .. })),
                "window {w:?}: 10 of 10 failed at one instant, {:?}",
                handle.state("w.test")
            );
        }
        // Years later, and a long run of mixed calls with small steps of time.
        tokio::time::advance(Duration::from_secs(5 * 365 * 24 * 3600)).await;
        let mut rng = Rng::new(w.as_nanos() as u64);
        for _ in 0..2_000 {
            let code = if rng.below(3) == 0 { 503 } else { 200 };
            let _ = call_with(&svc, &api, "http://w.test/", code).await;
            tokio::time::advance(Duration::from_millis(rng.below(700))).await;
        }
    }
}

/// layer.rs: `with_consecutive_failures(n)` "opens after `n` failures in a row"; the volume
/// `min_calls` is a `u32`. At `u32::MAX` neither trigger can fire within ten thousand failures,
/// and nothing overflows; at 2 the streak opens on the second failure in a row only.
#[tokio::test(start_paused = true)]
async fn streak_and_volume_at_u32_max_and_at_two() {
    let api = Api::new(503);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(u32::MAX)
        .with_failure_rate(1.0, Duration::MAX, u32::MAX)
        .unwrap()
        .pair();
    let svc = layer.layer(api.clone());
    for i in 0..10_000 {
        assert_eq!(
            call_with(&svc, &api, "http://s.test/", 503).await.unwrap(),
            503,
            "call {i}"
        );
    }
    assert_eq!(handle.state("s.test"), Some(CircuitState::Closed));

    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_failure_rate(1.0, Duration::from_secs(30), 1_000)
        .unwrap()
        .pair();
    let svc = layer.layer(api.clone());
    for _ in 0..50 {
        call_with(&svc, &api, "http://s.test/", 503).await.unwrap();
        call_with(&svc, &api, "http://s.test/", 200).await.unwrap();
    }
    assert_eq!(handle.state("s.test"), Some(CircuitState::Closed));
    call_with(&svc, &api, "http://s.test/", 503).await.unwrap();
    call_with(&svc, &api, "http://s.test/", 503).await.unwrap();
    assert!(matches!(
        handle.state("s.test"),
        Some(CircuitState::Open { .. })
    ));
}

/// circuit.md: "Open 30 s": the breaker refuses until the open period has passed, to the
/// nanosecond, and `retry_in` counts down to it; at that instant the next call is a probe.
/// The `Failing` refusal's message says "try again in <retry_in>".
#[tokio::test(start_paused = true)]
async fn the_open_period_ends_at_its_exact_instant() {
    let api = Api::new(503);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(10), Duration::from_secs(10))
        .pair();
    let svc = layer.layer(api.clone());
    call_with(&svc, &api, "http://e.test/", 503).await.unwrap();
    let err = call_with(&svc, &api, "http://e.test/", 200)
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_secs(10));
    assert!(err.to_string().contains("try again in 10s"), "{err}");
    tokio::time::advance(Duration::from_millis(8_500)).await;
    let err = call_with(&svc, &api, "http://e.test/", 200)
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_millis(1_500));
    assert!(err.to_string().contains("try again in 1.5s"), "{err}");
    assert_eq!(
        handle.state("e.test"),
        Some(CircuitState::Open {
            retry_in: Duration::from_millis(1_500)
        })
    );
    tokio::time::advance(Duration::from_millis(1_500) - Duration::from_nanos(1)).await;
    let err = call_with(&svc, &api, "http://e.test/", 200)
        .await
        .unwrap_err();
    assert_eq!(open_of(&err).retry_in(), Duration::from_nanos(1));
    assert_eq!(api.calls(), 1);
    tokio::time::advance(Duration::from_nanos(1)).await;
    assert_eq!(
        call_with(&svc, &api, "http://e.test/", 200).await.unwrap(),
        200
    );
    assert_eq!(handle.state("e.test"), Some(CircuitState::Closed));
}

/// circuit.md: "Open 30 s, doubling on each re-opening up to 5 min"; layer.rs: "No open period
/// is longer than `max`" and a duration past about 30 years is read as 30 years. From a base of
/// one nanosecond and a `max` of `Duration::MAX`, 100 re-openings (2^100 ns is far past any
/// `u64`) never panic and never exceed about 30 years; each period is twice the one before
/// until that cap.
#[tokio::test(start_paused = true)]
async fn a_hundred_reopenings_from_one_nanosecond_never_overflow() {
    let api = Api::new(503);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_nanos(1), Duration::MAX)
        .pair();
    let svc = layer.layer(api.clone());
    let thirty_one_years = Duration::from_secs(31 * 366 * 24 * 3600);
    call_with(&svc, &api, "http://d.test/", 503).await.unwrap();
    let mut last = Duration::ZERO;
    for i in 0..100 {
        let Some(CircuitState::Open { retry_in }) = handle.state("d.test") else {
            panic!("re-opening {i}: {:?}", handle.state("d.test"));
        };
        assert!(retry_in <= thirty_one_years, "re-opening {i}: {retry_in:?}");
        if i > 0 && last < Duration::from_secs(365 * 24 * 3600) {
            assert_eq!(retry_in, last * 2, "re-opening {i}");
        }
        assert!(retry_in >= last, "re-opening {i}: {retry_in:?} < {last:?}");
        last = retry_in;
        tokio::time::advance(retry_in).await;
        // The probe fails: open again, for twice as long.
        assert_eq!(
            call_with(&svc, &api, "http://d.test/", 503).await.unwrap(),
            503,
            "probe {i}"
        );
    }
    assert!(
        last >= Duration::from_secs(29 * 365 * 24 * 3600),
        "{last:?}"
    );
}

/// layer.rs: `with_probes(k)` and `with_successes_to_close(m)` take any `u32`. At `u32::MAX`
/// every call of a half-open breaker is a probe, a thousand successes do not close it (it needs
/// `u32::MAX`), and one failure re-opens it; nothing panics or overflows.
#[tokio::test(start_paused = true)]
async fn probes_and_successes_at_u32_max() {
    let api = Api::new(503);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_probes(u32::MAX)
        .with_successes_to_close(u32::MAX)
        .pair();
    let svc = layer.layer(api.clone());
    call_with(&svc, &api, "http://p.test/", 503).await.unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    api.set(200);
    let tasks: Vec<_> = (0..1_000)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://p.test/"))))
        .collect();
    for t in tasks {
        let res = within("probe", t).await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(handle.state("p.test"), Some(CircuitState::HalfOpen));
    assert_eq!(
        call_with(&svc, &api, "http://p.test/", 503).await.unwrap(),
        503
    );
    assert!(matches!(
        handle.state("p.test"),
        Some(CircuitState::Open { .. })
    ));
}

// ---------------------------------------------------------------- circuit: events and handle

fn as_event(s: CircuitState) -> BreakerState {
    match s {
        CircuitState::Closed => BreakerState::Closed,
        CircuitState::Open { .. } => BreakerState::Open,
        CircuitState::HalfOpen => BreakerState::HalfOpen,
        CircuitState::ForcedOpen => BreakerState::ForcedOpen,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Changed(String, BreakerState, BreakerState),
    Rejected(String, Option<String>, Duration),
}

/// layer.rs `on_event`: "an Event for every state change (`CircuitChanged`) and every call
/// refused by an open breaker (`CircuitRejected`)"; events.rs: `CircuitRejected` is "a call
/// refused at once because the breaker is open (or half-open with every probe slot taken)";
/// `on_state_change` "on every state change". The two callbacks see the same changes, in
/// order, through open, half-open (a failed probe), open, half-open, closed, forced open and
/// closed by hand; one `CircuitRejected` per refused call, whatever the reason, with the
/// refusal's `retry_in`.
#[tokio::test(start_paused = true)]
async fn every_change_and_every_refusal_is_one_event() {
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let changes = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let (s, c) = (seen.clone(), changes.clone());
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(2), Duration::from_secs(2))
        .on_event(move |ev| match ev {
            Event::CircuitChanged { key, from, to, .. } => {
                s.lock()
                    .unwrap()
                    .push(Seen::Changed(key.to_string(), *from, *to));
            }
            Event::CircuitRejected {
                key,
                host,
                retry_in,
            } => s.lock().unwrap().push(Seen::Rejected(
                key.to_string(),
                host.map(str::to_owned),
                *retry_in,
            )),
            _ => {}
        })
        .on_state_change(move |key, from, to| {
            c.lock()
                .unwrap()
                .push(Seen::Changed(key.to_string(), as_event(from), as_event(to)));
        })
        .pair();
    let manual = Manual::new();
    let svc = layer.layer(manual.clone());
    let uri = "http://EV.test/";
    let call = |svc: &sturdy::circuit::CircuitBreaker<_, _, _>| svc.clone().oneshot(get(uri));

    // Closed -> Open.
    let f = tokio::spawn(call(&svc));
    settle().await;
    manual
        .take()
        .answer
        .send(Ok(Response::builder()
            .status(500)
            .body(whole(b""))
            .unwrap()))
        .ok();
    assert_eq!(within("first", f).await.unwrap().unwrap().status(), 500);
    // Refused twice while open (retry_in 2 s, then 1 s).
    assert!(call(&svc).await.is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(call(&svc).await.is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    // Open -> HalfOpen: a probe, held; another call is refused (Probing, retry_in zero).
    let probe = tokio::spawn(call(&svc));
    settle().await;
    let err = call(&svc).await.unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Probing);
    manual
        .take()
        .answer
        .send(Ok(Response::builder()
            .status(502)
            .body(whole(b""))
            .unwrap()))
        .ok();
    within("probe", probe).await.unwrap().unwrap();
    // HalfOpen -> Open; after 2 s, HalfOpen -> Closed.
    tokio::time::advance(Duration::from_secs(2)).await;
    let probe = tokio::spawn(call(&svc));
    settle().await;
    manual.take().answer.send(ok_with(whole(b"ok"))).ok();
    within("probe 2", probe).await.unwrap().unwrap();
    // Forced open (a refusal: Forced), then closed by hand.
    handle.force_open("ev.TEST");
    let err = call(&svc).await.unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Forced);
    handle.force_close("EV.test");

    use BreakerState::{Closed, ForcedOpen, HalfOpen, Open};
    let k = || "ev.test".to_owned();
    let h = || Some("ev.test".to_owned());
    let expected_changes = vec![
        Seen::Changed(k(), Closed, Open),
        Seen::Changed(k(), Open, HalfOpen),
        Seen::Changed(k(), HalfOpen, Open),
        Seen::Changed(k(), Open, HalfOpen),
        Seen::Changed(k(), HalfOpen, Closed),
        Seen::Changed(k(), Closed, ForcedOpen),
        Seen::Changed(k(), ForcedOpen, Closed),
    ];
    let changes = changes.lock().unwrap().clone();
    assert_eq!(changes, expected_changes);
    let seen = seen.lock().unwrap().clone();
    let expected = vec![
        Seen::Changed(k(), Closed, Open),
        Seen::Rejected(k(), h(), Duration::from_secs(2)),
        Seen::Rejected(k(), h(), Duration::from_secs(1)),
        Seen::Changed(k(), Open, HalfOpen),
        Seen::Rejected(k(), h(), Duration::ZERO),
        Seen::Changed(k(), HalfOpen, Open),
        Seen::Changed(k(), Open, HalfOpen),
        Seen::Changed(k(), HalfOpen, Closed),
        Seen::Changed(k(), Closed, ForcedOpen),
        Seen::Rejected(k(), h(), Duration::from_secs(2)),
        Seen::Changed(k(), ForcedOpen, Closed),
    ];
    assert_eq!(seen, expected);
}

/// handle.rs `states`: "Every breaker and its state, sorted by key"; the overflow breaker is
/// listed as `*`; layer.rs `with_max_breakers`: "0 is taken as 1".
#[tokio::test(start_paused = true)]
async fn states_are_sorted_and_a_bound_of_zero_keeps_one() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.clone());
    let mut rng = Rng::new(80);
    let mut hosts: Vec<String> = (0..200)
        .map(|i| format!("h{i}.Test:{}", 1000 + i))
        .collect();
    for i in (1..hosts.len()).rev() {
        hosts.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for h in &hosts {
        call_with(&svc, &api, &format!("http://{h}/"), 200)
            .await
            .unwrap();
    }
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), 200);
    assert!(
        keys.iter().all(|k| k == &k.to_ascii_lowercase()),
        "{keys:?}"
    );

    let (layer, handle) = CircuitBreakerLayer::new()
        .with_max_breakers(0)
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.clone());
    // a.test fails and keeps its own breaker (a failing one is not forgotten); the others
    // share the overflow one.
    call_with(&svc, &api, "http://a.test/", 503).await.unwrap();
    call_with(&svc, &api, "http://b.test/", 200).await.unwrap();
    call_with(&svc, &api, "http://c.test/", 200).await.unwrap();
    let keys: Vec<String> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["*", "a.test"]);
    assert!(matches!(
        handle.state("a.test"),
        Some(CircuitState::Open { .. })
    ));
    assert_eq!(handle.state("c.test"), Some(CircuitState::Closed));
}

// ---------------------------------------------------------------- circuit under coalescing

/// coalesce.md: "Outermost, so identical calls share one whole outcome ... and every layer below
/// sees one call where one was made." A hundred identical callers sharing one 503 are one
/// failure to the breaker below: with a streak of 3, three such bursts open it, not one; and
/// when it is open, every caller of a burst gets its refusal (kind `CircuitOpen`, not sent),
/// the breaker emitting one `CircuitRejected` for the one call it saw.
#[tokio::test(start_paused = true)]
async fn a_coalesced_burst_is_one_call_to_the_breaker_below() {
    let rejected = Arc::new(AtomicUsize::new(0));
    let r = rejected.clone();
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .on_event(move |ev| {
            if matches!(ev, Event::CircuitRejected { .. }) {
                r.fetch_add(1, Ordering::SeqCst);
            }
        })
        .pair();
    let (coalesce, stats) = CoalesceLayer::new().pair();
    let manual = Manual::new();
    let svc = tower::ServiceBuilder::new()
        .layer(coalesce)
        .layer(breaker)
        .service(manual.clone());
    for burst in 0..3 {
        assert_eq!(
            handle.state("b.test").unwrap_or(CircuitState::Closed),
            CircuitState::Closed
        );
        let tasks: Vec<_> = (0..100)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("http://b.test/x"))))
            .collect();
        settle().await;
        assert_eq!(manual.waiting(), 1, "burst {burst}");
        manual
            .take()
            .answer
            .send(Ok(Response::builder()
                .status(503)
                .body(whole(b"down"))
                .unwrap()))
            .ok();
        for t in tasks {
            let res = within("burst", t).await.unwrap().unwrap();
            assert_eq!(res.status(), 503);
            assert_eq!(text(res).await.unwrap(), "down");
        }
    }
    assert!(matches!(
        handle.state("b.test"),
        Some(CircuitState::Open { .. })
    ));
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://b.test/x"))))
        .collect();
    for t in tasks {
        let err = within("refused", t).await.unwrap().unwrap_err();
        assert!(
            matches!(top(&err).kind(), ErrorKind::CircuitOpen { .. }),
            "{err}"
        );
        // A refusal comes at once: a call nobody joined keeps its own words (since s118).
        let text = err.to_string();
        assert!(
            text.starts_with(
                "the call shared by identical requests in flight failed: circuit open for b.test"
            ) || text.starts_with("circuit open for b.test"),
            "{err}"
        );
        assert_eq!(open_of(&err).key(), "b.test");
        assert_eq!(
            sturdy::core::classify::delivery(&*err),
            sturdy::core::Delivery::NotSent,
            "{err}"
        );
    }
    assert_eq!(manual.calls(), 3);
    assert!(rejected.load(Ordering::SeqCst) <= 100);
    assert!(rejected.load(Ordering::SeqCst) >= 1);
    assert_eq!(stats.stats().upstream() + stats.stats().joined(), 400);
}

// ---------------------------------------------------------------- coalescing: setters at edges

/// coalesce.md: "The response body is read once, into memory, up to 1 MiB (`.with_max_body(bytes)`)"
/// and "a response whose body is larger than the bound ... is not shared. The caller that
/// started the call gets it, streamed ... Every other caller sends its own request". At a bound
/// of 0, an empty body is still shared; a one-byte body is not: the leader gets it, the joiner
/// sends its own; the counters say so (`too_large`, `fallbacks`).
#[tokio::test(start_paused = true)]
async fn a_body_bound_of_zero() {
    let manual = Manual::new();
    let (layer, handle) = CoalesceLayer::new().with_max_body(0).pair();
    let svc = layer.layer(manual.clone());
    let a = tokio::spawn(svc.clone().oneshot(get("http://z.test/empty")));
    settle().await;
    let b = tokio::spawn(svc.clone().oneshot(get("http://z.test/empty")));
    settle().await;
    manual.take().answer.send(ok_with(whole(b""))).ok();
    for t in [a, b] {
        let res = within("empty", t).await.unwrap().unwrap();
        assert!(res.body().is_shared());
        assert_eq!(text(res).await.unwrap(), "");
    }
    let s = handle.stats();
    assert_eq!(
        (s.upstream(), s.joined(), s.too_large()),
        (1, 1, 0),
        "{s:?}"
    );

    let a = tokio::spawn(svc.clone().oneshot(get("http://z.test/one")));
    settle().await;
    let b = tokio::spawn(svc.clone().oneshot(get("http://z.test/one")));
    settle().await;
    manual.take().answer.send(ok_with(whole(b"1"))).ok();
    settle().await;
    // The joiner sent its own request.
    let own = manual.take();
    assert_eq!(own.uri, "http://z.test/one");
    own.answer.send(ok_with(whole(b"2"))).ok();
    let ra = within("leader", a).await.unwrap().unwrap();
    let rb = within("joiner", b).await.unwrap().unwrap();
    assert_eq!(text(ra).await.unwrap(), "1");
    assert_eq!(text(rb).await.unwrap(), "2");
    let s = handle.stats();
    assert_eq!((s.too_large(), s.fallbacks()), (1, 1), "{s:?}");
    assert_eq!(manual.calls(), 3);
}

/// layer.rs `with_body_timeout`: past it, each caller gets a `Timeout` error ("the shared
/// response's body did not arrive within 30s of its head"). The words name the bound set, not
/// the default: 250ms, 1.5s, 2m.
#[tokio::test(start_paused = true)]
async fn the_body_timeout_message_names_the_bound_set() {
    for (bound, words) in [
        (Duration::from_millis(250), "within 250ms of its head"),
        (Duration::from_millis(1_500), "within 1.5s of its head"),
        (Duration::from_secs(120), "within 2m of its head"),
    ] {
        let manual = Manual::new();
        let svc = CoalesceLayer::new()
            .with_body_timeout(bound)
            .layer(manual.clone());
        let a = tokio::spawn(svc.clone().oneshot(get("http://t.test/")));
        settle().await;
        let b = tokio::spawn(svc.clone().oneshot(get("http://t.test/")));
        settle().await;
        let (frames, body) = chan();
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .unwrap();
        manual.take().answer.send(ok_with(body)).ok();
        for t in [a, b] {
            let out = tokio::time::timeout(bound + Duration::from_secs(5), t)
                .await
                .unwrap_or_else(|_| panic!("{bound:?}: no answer past the body timeout"));
            let err = match out.unwrap() {
                Ok(res) => text(res).await.unwrap_err(),
                Err(e) => e,
            };
            let msg = format!("{err}");
            assert!(msg.contains(words), "{bound:?}: {msg}");
            let kind = sturdy::core::classify::classify_error(&*err);
            assert!(
                format!("{kind:?}").contains("Timeout"),
                "{bound:?}: {kind:?} {msg}"
            );
        }
        drop(frames);
    }
}

/// layer.rs `with_body_timeout(d)`: any `Duration`. `Duration::ZERO` never panics: a body that
/// arrived with the head is shared, one that must be waited for fails at once with `Timeout`.
/// `Duration::MAX` never panics either, and a body an hour late is still shared.
#[tokio::test(start_paused = true)]
async fn body_timeouts_of_zero_and_duration_max() {
    let manual = Manual::new();
    let svc = CoalesceLayer::new()
        .with_body_timeout(Duration::ZERO)
        .layer(manual.clone());
    let a = tokio::spawn(svc.clone().oneshot(get("http://t0.test/")));
    settle().await;
    manual.take().answer.send(ok_with(whole(b"at once"))).ok();
    let res = within("zero, whole", a).await.unwrap().unwrap();
    assert_eq!(text(res).await.unwrap(), "at once");

    let a = tokio::spawn(svc.clone().oneshot(get("http://t0.test/")));
    settle().await;
    let (frames, body) = chan();
    manual.take().answer.send(ok_with(body)).ok();
    let out = within("zero, late", a).await.unwrap();
    let err = match out {
        Ok(res) => text(res).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(err.to_string().contains("did not arrive within"), "{err}");
    drop(frames);

    let svc = CoalesceLayer::new()
        .with_body_timeout(Duration::MAX)
        .layer(manual.clone());
    let a = tokio::spawn(svc.clone().oneshot(get("http://tmax.test/")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://tmax.test/")));
    settle().await;
    let (frames, body) = chan();
    manual.take().answer.send(ok_with(body)).ok();
    settle().await;
    tokio::time::advance(Duration::from_secs(3600)).await;
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"late"))))
        .unwrap();
    drop(frames);
    for t in [a, b] {
        let res = within("max", t).await.unwrap().unwrap();
        assert_eq!(text(res).await.unwrap(), "late");
    }
    assert_eq!(manual.calls(), 3);
}

/// coalesce.md, "Leaving": "a caller that goes away (its future dropped ...) leaves the call to
/// the others; it goes on." The leader's future is made by `call` and dropped without ever
/// being polled: a caller that joined still gets the one response. And a leader dropped
/// unpolled with nobody else leaves nothing in the table.
#[tokio::test(start_paused = true)]
async fn a_leader_never_polled_leaves_the_call_to_the_joiner() {
    let manual = Manual::new();
    let (layer, handle) = CoalesceLayer::new().pair();
    let mut svc = layer.layer(manual.clone());
    let leader = svc.ready().await.unwrap().call(get("http://u.test/x"));
    assert_eq!(handle.in_flight("u.test"), 1);
    let joiner = tokio::spawn(svc.clone().oneshot(get("http://u.test/x")));
    settle().await;
    drop(leader);
    settle().await;
    // Either the call was sent already, or the joiner sends it; one upstream call either way.
    if manual.waiting() == 1 {
        manual.take().answer.send(ok_with(whole(b"one"))).ok();
    }
    let out = within("joiner", joiner).await.unwrap();
    let res = out.unwrap_or_else(|e| panic!("the joiner failed with the leader gone: {e}"));
    assert_eq!(text(res).await.unwrap(), "one");
    assert_eq!(manual.calls(), 1);
    assert_eq!(handle.in_flight("u.test"), 0);

    let leader = svc.ready().await.unwrap().call(get("http://u.test/y"));
    drop(leader);
    settle().await;
    assert_eq!(handle.in_flight("u.test"), 0);
    let again = tokio::spawn(svc.clone().oneshot(get("http://u.test/y")));
    settle().await;
    let p = manual.take_last();
    p.answer.send(ok_with(whole(b"fresh"))).ok();
    let res = within("again", again).await.unwrap().unwrap();
    assert_eq!(text(res).await.unwrap(), "fresh");
}

/// layer.rs `with_key`: "Partitions the tables by `key` instead of by host"; coalesce.md:
/// "`.with_max_hosts(n)` ... past it, ... new hosts share one table". Under the bound two
/// tenants never share a call (each has its own table); past it, tenants B and C, whose
/// requests are identical but for the tenant (kept in an extension, not a header), share one.
#[tokio::test(start_paused = true)]
async fn tenants_past_the_bound_share_one_tenants_response() {
    #[derive(Clone)]
    struct Tenant(&'static str);
    let tenant = |req: &Request<Full<Bytes>>| {
        req.extensions()
            .get::<Tenant>()
            .map_or("none", |t| t.0)
            .to_owned()
    };
    let req = |t: &'static str| {
        let mut r = get("http://t.test/me");
        r.extensions_mut().insert(Tenant(t));
        r
    };
    // Under the bound: two tables, two calls.
    let manual = Manual::new();
    let svc = CoalesceLayer::new().with_key(tenant).layer(manual.clone());
    let b = tokio::spawn(svc.clone().oneshot(req("b")));
    let c = tokio::spawn(svc.clone().oneshot(req("c")));
    settle().await;
    assert_eq!(
        manual.calls(),
        2,
        "two tenants shared a call under the bound"
    );
    while manual.waiting() > 0 {
        manual.take().answer.send(ok_with(whole(b"x"))).ok();
    }
    let _ = within("b", b).await;
    let _ = within("c", c).await;

    // Past the bound.
    let manual = Manual::new();
    let svc = CoalesceLayer::new()
        .with_key(tenant)
        .with_max_hosts(1)
        .layer(manual.clone());
    let a = tokio::spawn(svc.clone().oneshot(req("a")));
    settle().await;
    let b = tokio::spawn(svc.clone().oneshot(req("b")));
    let c = tokio::spawn(svc.clone().oneshot(req("c")));
    settle().await;
    let calls = manual.calls();
    while manual.waiting() > 0 {
        manual.take().answer.send(ok_with(whole(b"x"))).ok();
    }
    for t in [a, b, c] {
        let _ = within("past", t).await;
    }
    assert_eq!(calls, 3, "tenant c got the response made for tenant b");
}

// ---------------------------------------------------------------- batch 2

/// coalesce.md: "a relative URI, as an axum app forwards, is compared with its `Host` header
/// whatever the key headers"; layer.rs `with_ignored_headers`: "Two requests are identical when
/// every header matches except these". Naming `Host` among the ignored headers does not make
/// relative requests to two hosts identical, also in the one table hosts past `with_max_hosts`
/// share. Absolute URIs that differ only in a `Host` header the layer ignores do share; a HEAD
/// never joins a GET.
#[tokio::test(start_paused = true)]
async fn an_ignored_host_header_still_tells_relative_requests_apart() {
    let manual = Manual::new();
    let svc = CoalesceLayer::new()
        .with_ignored_headers([http::header::HOST])
        .with_max_hosts(1)
        .layer(manual.clone());
    let rel = |host: &'static str| {
        let mut r = get("/v1/me");
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static(host));
        r
    };
    let first = tokio::spawn(svc.clone().oneshot(rel("first.test")));
    settle().await;
    let b = tokio::spawn(svc.clone().oneshot(rel("b.test")));
    settle().await;
    let c = tokio::spawn(svc.clone().oneshot(rel("c.test")));
    settle().await;
    let calls = manual.calls();
    while manual.waiting() > 0 {
        let p = manual.take();
        p.answer.send(ok_with(whole(b"x"))).ok();
    }
    for t in [first, b, c] {
        within("rel", t).await.unwrap().unwrap();
    }
    assert_eq!(
        calls, 3,
        "a relative request to c.test joined one to b.test"
    );

    // Absolute URIs: the Host header is ignored, so these two are identical.
    let svc = CoalesceLayer::new()
        .with_ignored_headers([http::header::HOST])
        .layer(manual.clone());
    let abs = |host: &'static str, method: http::Method| {
        let mut r = get("http://abs.test/v1");
        *r.method_mut() = method;
        r.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static(host));
        r
    };
    let before = manual.calls();
    let a = tokio::spawn(svc.clone().oneshot(abs("x.test", http::Method::GET)));
    settle().await;
    let b = tokio::spawn(svc.clone().oneshot(abs("y.test", http::Method::GET)));
    let h = tokio::spawn(svc.clone().oneshot(abs("x.test", http::Method::HEAD)));
    settle().await;
    assert_eq!(
        manual.calls() - before,
        2,
        "GET+GET shared, HEAD on its own"
    );
    while manual.waiting() > 0 {
        manual.take().answer.send(ok_with(whole(b""))).ok();
    }
    for t in [a, b, h] {
        within("abs", t).await.unwrap().unwrap();
    }
}

/// layer.rs (both crates) `on_event`: "replaces an earlier callback". Coalescing: one
/// `Coalesced` event per joined request (as many as `stats().joined()`), with its method and
/// the host's key in lower case.
#[tokio::test(start_paused = true)]
async fn on_event_replaces_and_counts_every_join() {
    let first = Arc::new(AtomicUsize::new(0));
    let second = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let (f, s) = (first.clone(), second.clone());
    let (layer, handle) = CoalesceLayer::new()
        .on_event(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        })
        .on_event(move |ev| {
            if let Event::Coalesced { key, method, .. } = ev {
                s.lock()
                    .unwrap()
                    .push((key.to_string(), method.to_string()));
            }
        })
        .pair();
    let manual = Manual::new();
    let svc = layer.layer(manual.clone());
    let mut tasks = Vec::new();
    for _ in 0..11 {
        let mut r = get("http://CO.Test/h");
        *r.method_mut() = http::Method::HEAD;
        tasks.push(tokio::spawn(svc.clone().oneshot(r)));
    }
    settle().await;
    assert_eq!(manual.calls(), 1);
    manual.take().answer.send(ok_with(whole(b""))).ok();
    for t in tasks {
        within("head", t).await.unwrap().unwrap();
    }
    assert_eq!(first.load(Ordering::SeqCst), 0, "the replaced callback ran");
    let seen = second.lock().unwrap().clone();
    assert_eq!(seen.len() as u64, handle.stats().joined());
    assert_eq!(seen.len(), 10);
    assert!(
        seen.iter().all(|(k, m)| k == "co.test" && m == "HEAD"),
        "{seen:?}"
    );

    // The breaker's on_event replaces too.
    let first = Arc::new(AtomicUsize::new(0));
    let second = Arc::new(AtomicUsize::new(0));
    let (f, s) = (first.clone(), second.clone());
    let api = Api::new(503);
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .on_event(move |_| {
            f.fetch_add(1, Ordering::SeqCst);
        })
        .on_event(move |_| {
            s.fetch_add(1, Ordering::SeqCst);
        })
        .layer(api.clone());
    call_with(&svc, &api, "http://cb.test/", 503).await.unwrap();
    assert!(call_with(&svc, &api, "http://cb.test/", 200).await.is_err());
    assert_eq!(first.load(Ordering::SeqCst), 0);
    assert_eq!(second.load(Ordering::SeqCst), 2, "one change, one refusal");
}

/// handle.rs `state`: for a key past `max_breakers`, "that is the overflow breaker it shares
/// with the other keys past the bound (listed as `*`)"; `force_close`: "the overflow breaker
/// the other keys past the bound share is left as it is (`force_close("*")` resets that
/// one)"; circuit.md: `Overflow` "... the message names the call's own host".
#[tokio::test(start_paused = true)]
async fn force_close_star_resets_the_overflow_breaker() {
    let api = Api::new(503);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_max_breakers(1)
        .with_consecutive_failures(1)
        .pair();
    let svc = layer.layer(api.clone());
    // a.test takes the one place (it fails, so it is not forgotten).
    call_with(&svc, &api, "http://a.test/", 503).await.unwrap();
    // b.test fails into the overflow breaker; c.test is refused with it.
    call_with(&svc, &api, "http://b.test/", 503).await.unwrap();
    let err = call_with(&svc, &api, "http://C.test/", 200)
        .await
        .unwrap_err();
    let open = open_of(&err);
    assert_eq!(open.reason(), OpenReason::Overflow, "{err}");
    assert_eq!(open.key(), "c.test");
    assert!(err.to_string().contains("c.test"), "{err}");
    assert!(matches!(handle.state("*"), Some(CircuitState::Open { .. })));
    // force_close of c.test gives c.test a closed breaker of its own; b.test stays refused.
    handle.force_close("c.test");
    assert_eq!(
        call_with(&svc, &api, "http://c.test/", 200).await.unwrap(),
        200
    );
    assert!(call_with(&svc, &api, "http://b.test/", 200).await.is_err());
    // force_close("*") resets the shared one: d.test (past the bound) goes through.
    handle.force_close("*");
    assert_eq!(handle.state("*"), Some(CircuitState::Closed));
    assert_eq!(
        call_with(&svc, &api, "http://d.test/", 200).await.unwrap(),
        200
    );
    assert_eq!(
        call_with(&svc, &api, "http://b.test/", 200).await.unwrap(),
        200
    );
}

/// handle.rs `stats().calls()`: "Requests that could be coalesced (GET and HEAD with an empty
/// body)"; coalesce.md: a request with `CallOptions` "goes on its own". A POST, a GET with a
/// body and a GET with `CallOptions` are not counted and never join.
#[tokio::test(start_paused = true)]
async fn what_the_calls_counter_counts() {
    let manual = Manual::new();
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(manual.clone());
    let mut post = get("http://n.test/");
    *post.method_mut() = http::Method::POST;
    let with_body = Request::get("http://n.test/")
        .body(Full::new(Bytes::from_static(b"q")))
        .unwrap();
    let mut with_opts = get("http://n.test/");
    with_opts
        .extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_deadline(Duration::from_secs(5)));
    let mut tasks = Vec::new();
    for r in [post, with_body, with_opts] {
        tasks.push(tokio::spawn(svc.clone().oneshot(r)));
        settle().await;
    }
    tasks.push(tokio::spawn(svc.clone().oneshot(get("http://n.test/"))));
    settle().await;
    assert_eq!(manual.calls(), 4, "nothing joined anything");
    while manual.waiting() > 0 {
        manual.take().answer.send(ok_with(whole(b""))).ok();
    }
    for t in tasks {
        within("n", t).await.unwrap().unwrap();
    }
    let s = handle.stats();
    assert_eq!((s.calls(), s.upstream(), s.joined()), (1, 1, 0), "{s:?}");
}

/// layer.rs `with_open_duration`: "a breaker forced open reports `max` as its `retry_in`";
/// retry.md: an open breaker is waited out only when "the call has a deadline and `retry_in`
/// ends before it", and "a try that a layer below refused before it was sent ... counts against
/// `max_attempts`". With `max` zero, a forced breaker's refusal says `retry_in` zero: a call
/// with a deadline through `ClientBuilder` must still end (refused, `Forced`), after at most
/// `max_attempts` tries, not loop on zero-length waits. Run on its own thread, bounded in real
/// time, so a loop shows as a failure.
#[test]
fn a_forced_breaker_with_a_zero_max_does_not_spin_the_retry_layer() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let out = rt.block_on(async {
            let refused = Arc::new(AtomicUsize::new(0));
            let r = refused.clone();
            let api = Api::new(200);
            let (breaker, handle) = CircuitBreakerLayer::new()
                .with_open_duration(Duration::ZERO, Duration::ZERO)
                .on_event(move |ev| {
                    if matches!(ev, Event::CircuitRejected { .. }) {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .pair();
            let client = sturdy::ClientBuilder::new()
                .with_circuit_breaker(breaker)
                .build(api.clone());
            handle.force_open("f.test");
            let mut req = get("http://f.test/");
            req.extensions_mut()
                .insert(sturdy::core::CallOptions::new().with_deadline(Duration::from_secs(10)));
            let res = client.oneshot(req).await;
            let err = match res {
                Ok(r) => return Err(format!("went through: {}", r.status())),
                Err(e) => e,
            };
            let reason = sturdy::core::find::<CircuitOpen>(&*err).map(CircuitOpen::reason);
            Ok((
                reason,
                refused.load(Ordering::SeqCst),
                api.calls(),
                err.to_string(),
            ))
        });
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the call did not end within 10 s of real time");
    let (reason, refused, calls, msg) = out.unwrap();
    assert_eq!(reason, Some(OpenReason::Forced), "{msg}");
    assert_eq!(calls, 0);
    assert!(refused <= 4, "{refused} refusals: {msg}");
}

/// A body that declares an exact size it does not have: a server's `Content-Length` is what
/// the peer says.
#[derive(Debug)]
struct Lying {
    hint: u64,
    sent: bool,
}

impl http_body::Body for Lying {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.sent {
            return Poll::Ready(None);
        }
        self.sent = true;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"hello")))))
    }
    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.hint)
    }
}

/// coalesce.md: "The response body is read once, into memory, up to 1 MiB
/// (`.with_max_body(bytes)`)", "(by its size hint, or once more than the bound has arrived)".
/// With the bound at `usize::MAX`, a body declaring `u64::MAX` or a terabyte (and sending five
/// bytes) is read as what arrives: no panic, no allocation of what the peer declared; both
/// callers get the five bytes. At the default bound, such a hint is "larger than the bound":
/// the leader gets it streamed.
#[tokio::test(start_paused = true)]
async fn a_body_that_declares_a_terabyte() {
    for hint in [u64::MAX, 1 << 40, (1 << 20) + 1] {
        let lying = tower::service_fn(move |_req: Request<Full<Bytes>>| async move {
            Ok::<_, Infallible>(Response::new(Lying { hint, sent: false }))
        });
        let (layer, handle) = CoalesceLayer::new().with_max_body(usize::MAX).pair();
        let svc = layer.layer(lying);
        let a = tokio::spawn(svc.clone().oneshot(get("http://big.test/")));
        let b = tokio::spawn(svc.clone().oneshot(get("http://big.test/")));
        for t in [a, b] {
            let res = within("big", t).await.unwrap().unwrap();
            assert_eq!(text(res).await.unwrap(), "hello", "hint {hint}");
        }
        assert_eq!(handle.stats().too_large(), 0);

        let (layer, handle) = CoalesceLayer::new().pair();
        let svc = layer.layer(lying);
        let res = within("default", svc.oneshot(get("http://big.test/")))
            .await
            .unwrap();
        assert!(!res.body().is_shared());
        assert_eq!(text(res).await.unwrap(), "hello", "hint {hint}");
        assert_eq!(handle.stats().too_large(), 1);
    }
}

/// circuit.rs service docs: "`poll_ready` is the inner service's. An open breaker never shows in
/// `poll_ready`: the call is rejected in `call` with a ready `CircuitOpen` error and the inner
/// service is not called." Driven by hand over tower-test's mock.
#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services_through_every_state() {
    use tokio_test::{assert_pending, assert_ready, assert_ready_ok};
    let (mock, mut h) = tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .pair();
    let mut svc = tower_test::mock::Spawn::new(layer.layer(mock));
    h.allow(0);
    assert_pending!(svc.poll_ready::<Request<Full<Bytes>>>());
    handle.force_open("m.test");
    assert_pending!(svc.poll_ready::<Request<Full<Bytes>>>());
    h.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
    let mut refused = tokio_test::task::spawn(svc.call(get("http://m.test/")));
    let err = assert_ready!(refused.poll()).unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Forced);
    assert_pending!(h.poll_request());
    handle.force_close("m.test");
    // The refused call did not use the allowance: the inner service is ready again.
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
    let mut fut = tokio_test::task::spawn(svc.call(get("http://m.test/")));
    assert_pending!(fut.poll());
    let (_req, send) = assert_ready!(h.poll_request()).unwrap();
    send.send_response(status(500));
    assert_eq!(assert_ready!(fut.poll()).unwrap().status(), 500);
    assert!(matches!(
        handle.state("m.test"),
        Some(CircuitState::Open { .. })
    ));
    // Open: poll_ready is still the mock's (pending without an allowance).
    assert_pending!(svc.poll_ready::<Request<Full<Bytes>>>());
    h.allow(1);
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
    let mut refused = tokio_test::task::spawn(svc.call(get("http://m.test/")));
    let err = assert_ready!(refused.poll()).unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Failing);
    tokio::time::advance(Duration::from_secs(1)).await;
    // Half-open: the probe goes to the ready mock; a second call is refused, Probing.
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
    let mut probe = tokio_test::task::spawn(svc.call(get("http://m.test/")));
    assert_pending!(probe.poll());
    h.allow(1);
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
    let mut second = tokio_test::task::spawn(svc.call(get("http://m.test/")));
    let err = assert_ready!(second.poll()).unwrap_err();
    assert_eq!(open_of(&err).reason(), OpenReason::Probing);
    let (_req, send) = assert_ready!(h.poll_request()).unwrap();
    send.send_response(status(200));
    assert_eq!(assert_ready!(probe.poll()).unwrap().status(), 200);
    assert_eq!(handle.state("m.test"), Some(CircuitState::Closed));
    assert_ready_ok!(svc.poll_ready::<Request<Full<Bytes>>>());
}

// ---------------------------------------------------------------- batch 3

/// layer.rs `with_failure_rate`: "Opens when at least `rate` ... of the calls in the last
/// `window` failed, once the window holds at least `min_calls` calls"; circuit.md: "values that
/// cannot work are taken as the nearest that can". A window of 2 ms can work, and a failure
/// 6 ms ago (three windows back) is not in the last 2 ms: with `min_calls` 2, one failure now
/// and one then do not open it.
#[tokio::test(start_paused = true)]
#[ignore = "DOCUMENTED since: with_failure_rate says a window under 10 ms acts as 10 ms (ten buckets of at least 1 ms)"]
async fn a_two_millisecond_window_forgets_a_failure_six_milliseconds_old() {
    let api = Api::new(503);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(1.0, Duration::from_millis(2), 2)
        .unwrap()
        .pair();
    let svc = layer.layer(api.clone());
    call_with(&svc, &api, "http://win.test/", 503)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_millis(6)).await;
    call_with(&svc, &api, "http://win.test/", 503)
        .await
        .unwrap();
    assert_eq!(
        handle.state("win.test"),
        Some(CircuitState::Closed),
        "two failures 6 ms apart opened a breaker whose window is 2 ms"
    );
}

/// `with_max_breakers(usize::MAX)` and `with_max_hosts(usize::MAX)`: "Setters never panic";
/// a bound that large is no bound, and nothing is allocated for it up front.
#[tokio::test(start_paused = true)]
async fn bounds_of_usize_max() {
    let api = Api::new(200);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_max_breakers(usize::MAX)
        .pair();
    let svc = CoalesceLayer::new()
        .with_max_hosts(usize::MAX)
        .with_max_body(usize::MAX)
        .layer(layer.layer(api.clone()));
    for i in 0..3_000 {
        let res = svc
            .clone()
            .oneshot(get(&format!("http://m{i}.test/")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(handle.states().len(), 3_000);
}

/// The two features together: coalescing over a half-open breaker, whose one probe is the
/// shared call. circuit.md: "A probe whose future is dropped gives its slot back"; coalesce.md:
/// "When the last caller leaves, the upstream call is dropped, which cancels it". Every caller
/// of the shared probe leaves, at seeded points: the probe's slot comes back, so the next call
/// is a probe (not refused as `Probing` for ever), and its success closes the breaker.
#[tokio::test(start_paused = true)]
async fn every_caller_of_a_shared_probe_leaves_and_the_slot_comes_back() {
    let mut rng = Rng::new(8080);
    for round in 0..20 {
        let manual = Manual::new();
        let (breaker, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let (coalesce, stats) = CoalesceLayer::new().pair();
        let svc = tower::ServiceBuilder::new()
            .layer(coalesce)
            .layer(breaker)
            .service(manual.clone());
        // Open it.
        let first = tokio::spawn(svc.clone().oneshot(get("http://hp.test/")));
        settle().await;
        manual
            .take()
            .answer
            .send(Ok(Response::builder()
                .status(500)
                .body(whole(b""))
                .unwrap()))
            .ok();
        within("open", first).await.unwrap().unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        // Half-open: n identical callers share the probe.
        let n = 2 + rng.below(20) as usize;
        let mut tasks: Vec<_> = (0..n)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("http://hp.test/"))))
            .collect();
        settle().await;
        assert_eq!(manual.calls(), 2, "round {round}");
        assert_eq!(handle.state("hp.test"), Some(CircuitState::HalfOpen));
        // Leave in a seeded order, with seeded pauses.
        while !tasks.is_empty() {
            let i = rng.below(tasks.len() as u64) as usize;
            tasks.swap_remove(i).abort();
            if rng.below(2) == 0 {
                settle().await;
            }
        }
        settle().await;
        assert_eq!(stats.in_flight("hp.test"), 0, "round {round}");
        // The slot is back: the next call is a probe, and it closes the breaker.
        let next = tokio::spawn(svc.clone().oneshot(get("http://hp.test/")));
        settle().await;
        assert_eq!(
            manual.calls(),
            3,
            "round {round}: the next call was not sent as a probe"
        );
        manual.take_last().answer.send(ok_with(whole(b"up"))).ok();
        let res = within("next", next)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(text(res).await.unwrap(), "up");
        assert_eq!(handle.state("hp.test"), Some(CircuitState::Closed));
    }
}
