//! Callers dropped at the same moment others arrive, on a multi-threaded runtime in real time
//! (millisecond upstreams): what a dropped caller held must come back however the race falls.
//! coalesce.md: "When the last caller leaves, the upstream call is dropped ... The next
//! identical request starts afresh"; concurrency.md: "A dropped waiting call leaves the line; a
//! dropped call in flight gives its permit back"; ratelimit.md: "If it is dropped ..., it leaves
//! the line"; circuit.md: "A probe whose future is dropped gives its slot back".
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::BoxError;
use tower::{Layer, ServiceExt};

type Req = Request<Full<Bytes>>;

fn req() -> Req {
    Request::get("http://api.test/r")
        .body(Full::default())
        .unwrap()
}

/// A tiny xorshift, seeded: the drop delays of each round.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn slow_api(
    micros: u64,
) -> impl tower::Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future = impl Send>
       + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_r: Req| async move {
        tokio::time::sleep(Duration::from_micros(micros)).await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::from("body")))
    })
}

/// A caller aborted while an identical one arrives: the newcomer always gets the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_coalesce_leave_and_join_race() {
    use sturdy::coalesce::CoalesceLayer;
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(slow_api(800));
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut bad = Vec::new();
    for round in 0..400 {
        let first = tokio::spawn(svc.clone().oneshot(req()));
        tokio::time::sleep(Duration::from_micros(rng.next() % 900)).await;
        let s2 = svc.clone();
        let second = tokio::spawn(async move {
            let res = s2.oneshot(req()).await?;
            let b = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(b)
        });
        if !rng.next().is_multiple_of(3) {
            std::thread::yield_now();
        }
        first.abort();
        match tokio::time::timeout(Duration::from_secs(5), second).await {
            Ok(Ok(Ok(b))) if b == "body" => {}
            Ok(Ok(Ok(b))) => bad.push(format!("round {round}: body {b:?}")),
            Ok(Ok(Err(e))) => bad.push(format!("round {round}: error {e}")),
            Ok(Err(e)) => bad.push(format!("round {round}: task {e}")),
            Err(_) => bad.push(format!("round {round}: hung")),
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(handle.in_flight("api.test"), 0);
    assert!(
        bad.is_empty(),
        "{} of 400: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// Callers with random timeouts under an adaptive limit of 2: afterwards nothing is in flight
/// or waiting, and two calls at once both get a place at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_concurrency_places_come_back_after_racing_drops() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let (layer, h) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 2)
        .with_max_wait(Duration::from_secs(2))
        .pair();
    let svc = layer.layer(slow_api(500));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut tasks = Vec::new();
    for _ in 0..600 {
        let s = svc.clone();
        let cut = Duration::from_micros(rng.next() % 1500);
        tasks.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(cut, s.oneshot(req())).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let st = h.state("api.test").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0), "{st:?}");
    let quick = AdaptiveConcurrencyLayer::new();
    let _ = quick;
    let a = svc.clone().oneshot(req());
    let b = svc.clone().oneshot(req());
    let (a, b) = tokio::time::timeout(Duration::from_millis(500), async { tokio::join!(a, b) })
        .await
        .expect("two calls under a limit of 2 waited");
    assert!(a.is_ok() && b.is_ok());
}

/// Callers with random timeouts in a rate limiter's line (quota 2000/s, burst 1): afterwards
/// nobody is counted as waiting, and a call after a quiet moment goes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_ratelimit_line_empties_after_racing_drops() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    let (layer, h) = RateLimitLayer::new(Quota::per_second(2000).unwrap()).pair();
    let svc = layer.layer(slow_api(100));
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut tasks = Vec::new();
    for _ in 0..800 {
        let s = svc.clone();
        let cut = Duration::from_micros(rng.next() % 2000);
        tasks.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(cut, s.oneshot(req())).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.waiting("api.test"), 0);
    let t = tokio::time::Instant::now();
    svc.clone().oneshot(req()).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
}

/// Half-open probes dropped at random moments: the breaker always admits a new probe, and a
/// probe that answers closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client26_probe_slot_comes_back_after_racing_drops() {
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    let fail = Arc::new(AtomicU32::new(1));
    let f = fail.clone();
    let api = tower::service_fn(move |_r: Req| {
        let s = if f.load(Ordering::SeqCst) == 1 {
            503
        } else {
            200
        };
        async move {
            tokio::time::sleep(Duration::from_micros(700)).await;
            Ok::<_, BoxError>(
                Response::builder()
                    .status(s)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let (layer, h) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_millis(1), Duration::from_millis(1))
        .pair();
    let svc = layer.layer(api);
    let _ = svc.clone().oneshot(req()).await;
    fail.store(0, Ordering::SeqCst);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        let s = svc.clone();
        let cut = Duration::from_micros(rng.next() % 700);
        let _ = tokio::time::timeout(cut, s.oneshot(req())).await;
        if h.state("api.test") == Some(CircuitState::Closed) {
            // Reopen it for the next round.
            fail.store(1, Ordering::SeqCst);
            let _ = svc.clone().oneshot(req()).await;
            fail.store(0, Ordering::SeqCst);
        }
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let res = tokio::time::timeout(Duration::from_millis(500), svc.clone().oneshot(req()))
        .await
        .expect("a probe hung");
    assert!(
        res.is_ok(),
        "no probe admitted after dropped probes: {:?} ({:?})",
        res.err().map(|e| e.to_string()),
        h.state("api.test")
    );
    assert_eq!(h.state("api.test"), Some(CircuitState::Closed));
}
