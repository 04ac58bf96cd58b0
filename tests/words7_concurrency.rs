//! docs/guides/concurrency.md and sturdy-concurrency's crate docs, read literally: the limit's
//! defaults and bounds, the 30 s wait and the error after it, shedding with a zero wait, the
//! overload signals (once per burst, by 0.9) and the failures that say nothing, AIMD growth only
//! under use, first come first served, dropped callers, a lowered-then-raised limit, and readiness
//! under `Buffer` over `ConcurrencyLimit(1)`. Paused time, in process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::{classify, find, BoxError, Delivery, ErrorKind};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

/// An API whose calls each wait for a permit of `gate`, then answer `status(n)` (or a connect
/// error for 0); records the path of each call in the order they arrive.
#[derive(Clone)]
struct Api {
    gate: Arc<Semaphore>,
    status: Arc<dyn Fn(usize) -> u16 + Send + Sync>,
    order: Arc<Mutex<Vec<String>>>,
    calls: Arc<AtomicUsize>,
}

impl Api {
    fn new(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
            status: Arc::new(status),
            order: Arc::default(),
            calls: Arc::default(),
        }
    }
    fn open(status: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Self {
        let api = Self::new(status);
        api.gate.add_permits(Semaphore::MAX_PERMITS);
        api
    }
    fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
    >;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.order.lock().unwrap().push(req.uri().path().to_owned());
        let status = (self.status)(n);
        let gate = self.gate.clone();
        Box::pin(async move {
            gate.acquire().await.unwrap().forget();
            if status == 0 {
                return Err(
                    Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                        as BoxError,
                );
            }
            Ok(Response::builder()
                .status(status)
                .body(Full::default())
                .unwrap())
        })
    }
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://api.example.com{path}"))
        .body(Full::default())
        .unwrap()
}

const HOST: &str = "api.example.com";

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// concurrency.md:43 and :53-59: the limit starts at 20; a call that finds it full waits up to
/// 30 s, then fails without being sent: kind `RateLimited` (no wait given), delivery `NotSent`,
/// source `LimitReached` (key, limit, how long it waited).
#[tokio::test(start_paused = true)]
async fn the_21st_call_waits_30s_then_fails_not_sent_with_limit_reached() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let api = Api::new(|_| 200);
    let svc = layer.layer(api.clone());
    let mut held = Vec::new();
    for i in 0..20 {
        held.push(tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))));
    }
    settle().await;
    assert_eq!(handle.limit(HOST), Some(20));
    let start = tokio::time::Instant::now();
    let waiter = tokio::spawn(svc.clone().oneshot(get("/late")));
    settle().await;
    let state = handle.state(HOST).unwrap();
    assert_eq!((state.in_flight(), state.waiting()), (20, 1));
    let err = waiter.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy_core::Error");
    assert_eq!(*e.kind(), ErrorKind::RateLimited { retry_after: None });
    assert_eq!(classify::delivery(&*err), Delivery::NotSent);
    let reached = find::<LimitReached>(&*err).expect("LimitReached in the chain");
    assert_eq!((reached.key(), reached.limit()), (HOST, 20));
    assert_eq!(reached.waited(), Duration::from_secs(30));
    assert_eq!(api.calls(), 20);
    api.release(20);
    for h in held {
        h.await.unwrap().unwrap();
    }
}

/// concurrency.md:43-45: "the limit starts at 20 ... and stays between 1 and 1,000 (a minimum of
/// 0 is taken as 1, a maximum below the minimum as the minimum)".
#[tokio::test(start_paused = true)]
async fn the_limit_stays_within_its_bounds() {
    let cases: Vec<(AdaptiveConcurrencyLayer, usize)> = vec![
        (
            AdaptiveConcurrencyLayer::new().with_initial_limit(5000),
            1000,
        ),
        (AdaptiveConcurrencyLayer::new().with_initial_limit(0), 1),
        (AdaptiveConcurrencyLayer::new().with_limits(0, 0), 1),
        (AdaptiveConcurrencyLayer::new().with_limits(10, 5), 10),
        (AdaptiveConcurrencyLayer::new().with_limits(0, 3), 3),
    ];
    for (i, (layer, want)) in cases.into_iter().enumerate() {
        // Read the limit while the first call is in flight, before a success can raise it.
        let (layer, handle) = layer.pair();
        let api = Api::new(|_| 200);
        let first = tokio::spawn(layer.layer(api.clone()).oneshot(get("/")));
        settle().await;
        assert_eq!(handle.limit(HOST), Some(want), "case {i}");
        api.release(1);
        first.await.unwrap().unwrap();
    }
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(Api::open(|_| 200));
    svc.clone().oneshot(get("/")).await.unwrap();
    handle.set_limit(HOST, 1_000_000);
    assert!(
        handle.limit(HOST).unwrap() <= 1000,
        "{:?}",
        handle.limit(HOST)
    );
    handle.set_limit(HOST, 0);
    assert!(handle.limit(HOST).unwrap() >= 1, "{:?}", handle.limit(HOST));
}

/// concurrency.md:18-23: a 429, 503, 504 or timeout multiplies the limit by 0.9, "at most once per
/// round trip ... fifty 503s from one burst lower the limit once"; "Other failures (a 500, a 404,
/// a connect error) ... are ignored".
#[tokio::test(start_paused = true)]
async fn one_burst_of_503s_lowers_the_limit_once_and_other_failures_say_nothing() {
    for code in [503u16, 504, 429] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let api = Api::new(move |_| code);
        let svc = layer.layer(api.clone());
        let burst: Vec<_> = (0..20)
            .map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))))
            .collect();
        settle().await;
        api.release(20);
        for b in burst {
            b.await.unwrap().unwrap();
        }
        assert_eq!(handle.limit(HOST), Some(18), "{code}");
    }
    for code in [500u16, 404, 0] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
        let svc = layer.layer(Api::open(move |_| code));
        for i in 0..50 {
            let _ = svc.clone().oneshot(get(&format!("/{i}"))).await;
        }
        assert_eq!(handle.limit(HOST), Some(20), "{code}");
    }
    // with_backoff is validated: strictly between 0 and 1.
    for bad in [0.0, 1.0, 1.5, -0.1, f64::NAN] {
        assert!(
            AdaptiveConcurrencyLayer::new().with_backoff(bad).is_err(),
            "{bad}"
        );
    }
    assert!(AdaptiveConcurrencyLayer::new().with_backoff(0.5).is_ok());
}

/// concurrency.md:25-27: AIMD: "each success adds `1 / limit` while at least half of the limit
/// was in use when the call was admitted ... does not grow while unused".
#[tokio::test(start_paused = true)]
async fn aimd_grows_by_one_per_round_trip_under_load_only() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_initial_limit(4).pair();
    let api = Api::new(|_| 200);
    let svc = layer.layer(api.clone());
    // 16 callers at once: the limit is in use throughout; each round trip adds about one.
    let burst: Vec<_> = (0..16)
        .map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))))
        .collect();
    settle().await;
    for _ in 0..16 {
        api.release(1);
        settle().await;
    }
    for b in burst {
        b.await.unwrap().unwrap();
    }
    let grown = handle.limit(HOST).unwrap();
    assert!((6..=8).contains(&grown), "{grown}");
    // One at a time, the limit does not grow.
    for i in 0..50 {
        api.release(1);
        svc.clone()
            .oneshot(get(&format!("/solo/{i}")))
            .await
            .unwrap();
    }
    assert_eq!(handle.limit(HOST), Some(grown));
}

/// concurrency.md:53-56: "waits in line (first come, first served) ... A dropped waiting call
/// leaves the line; a dropped call in flight gives its permit back"; :59-60: a maximum wait of
/// zero sheds load.
#[tokio::test(start_paused = true)]
async fn the_line_is_first_come_first_served_and_dropped_callers_leave_it() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let api = Api::new(|_| 200);
    let svc = layer.layer(api.clone());
    let first = tokio::spawn(svc.clone().oneshot(get("/first")));
    settle().await;
    let mut waiters = Vec::new();
    for i in 0..4 {
        waiters.push(tokio::spawn(svc.clone().oneshot(get(&format!("/w{i}")))));
        settle().await;
    }
    assert_eq!(handle.state(HOST).unwrap().waiting(), 4);
    waiters.remove(1).abort();
    settle().await;
    assert_eq!(handle.state(HOST).unwrap().waiting(), 3);
    // The one in flight is dropped: its permit goes to the first in line.
    first.abort();
    settle().await;
    api.release(10);
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let order = api.order.lock().unwrap().clone();
    assert_eq!(order, ["/first", "/w0", "/w2", "/w3"]);

    let shed = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .layer(Api::new(|_| 200));
    let busy = tokio::spawn(shed.clone().oneshot(get("/busy")));
    settle().await;
    let start = tokio::time::Instant::now();
    let err = shed.clone().oneshot(get("/shed")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(find::<LimitReached>(&*err).is_some());
    busy.abort();
}

/// concurrency.md:61-62: "When the limit goes down while calls are in flight, their permits are
/// retired as they come back; when it goes up again first, the retirement is cancelled, not paid
/// twice."
#[tokio::test(start_paused = true)]
async fn a_limit_lowered_then_raised_in_flight_is_not_paid_twice() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_initial_limit(4).pair();
    let api = Api::new(|_| 200);
    let svc = layer.layer(api.clone());
    let calls: Vec<_> = (0..4)
        .map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))))
        .collect();
    settle().await;
    handle.set_limit(HOST, 2);
    handle.set_limit(HOST, 4);
    api.release(4);
    for c in calls {
        c.await.unwrap().unwrap();
    }
    let limit = handle.limit(HOST).unwrap();
    assert!(limit >= 4, "{limit}");
    let next: Vec<_> = (0..4)
        .map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/n{i}")))))
        .collect();
    settle().await;
    assert_eq!(handle.state(HOST).unwrap().in_flight(), 4);
    api.release(4);
    for c in next {
        c.await.unwrap().unwrap();
    }

    // Lowered while in flight: once they are back, only the new limit is admitted.
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_initial_limit(4).pair();
    let api = Api::new(|_| 200);
    let svc = layer.layer(api.clone());
    let calls: Vec<_> = (0..4)
        .map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))))
        .collect();
    settle().await;
    handle.set_limit(HOST, 2);
    api.release(4);
    for c in calls {
        c.await.unwrap().unwrap();
    }
    // Their successes may raise it again (they were admitted with the limit in use).
    let limit = handle.limit(HOST).unwrap();
    assert!(limit < 4, "{limit}");
    let next: Vec<_> = (0..4)
        .map(|i| tokio::spawn(svc.clone().oneshot(get(&format!("/n{i}")))))
        .collect();
    settle().await;
    let s = handle.state(HOST).unwrap();
    assert_eq!((s.in_flight(), s.waiting()), (limit, 4 - limit));
    api.release(4);
    for c in next {
        c.await.unwrap().unwrap();
    }
}

/// concurrency.md:50-55: the permit is taken in `call`, "never reserved in `poll_ready`, whose
/// readiness is the inner service's"; a waiting call holds the ready service and calls it once it
/// has a place. Kept, under `Buffer`, over `ConcurrencyLimit(1)`.
#[tokio::test(start_paused = true)]
async fn a_kept_service_under_buffer_over_concurrency_limit_one_does_not_deadlock() {
    let api = Api::open(|n| if n % 5 == 0 { 503 } else { 200 });
    let svc = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .layer(tower::limit::ConcurrencyLimit::new(api.clone(), 1));
    let buffered = tower::buffer::Buffer::new(svc, 4);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut kept = buffered.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                kept.ready().await?.call(get(&format!("/{t}/{i}"))).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    })
    .await
    .expect("no deadlock");
    assert_eq!(api.calls(), 20);
}
