//! Hedged requests as docs/guides/hedge.md and the `sturdy-hedge` docs describe them: what is
//! hedged and when, the budget, which answer wins, cancellation and composition.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::hedge::HedgeLayer;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn req(method: &str, host: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(format!("http://{host}/x"))
        .body(())
        .unwrap()
}

fn get(host: &str) -> Request<()> {
    req("GET", host)
}

type Script = Arc<dyn Fn(usize) -> (u64, Result<u16, ErrorKind>) + Send + Sync>;

/// An API whose n-th call (from 0) waits and answers as `script` says; counts calls started,
/// finished and dropped before finishing.
#[derive(Clone)]
struct Api {
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    script: Script,
}

struct DropGuard(Arc<AtomicUsize>, bool);
impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Api {
    fn new(
        script: impl Fn(usize) -> (u64, Result<u16, ErrorKind>) + Send + Sync + 'static,
    ) -> Self {
        Self {
            started: Arc::default(),
            dropped: Arc::default(),
            script: Arc::new(script),
        }
    }

    fn service(
        &self,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let api = self.clone();
        service_fn(move |_req: Request<()>| {
            let i = api.started.fetch_add(1, Ordering::SeqCst);
            let (ms, out) = (api.script)(i);
            let guard = DropGuard(api.dropped.clone(), false);
            async move {
                let mut guard = guard;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                guard.1 = true;
                match out {
                    Ok(status) => Ok(Response::builder().status(status).body(()).unwrap()),
                    Err(kind) => Err(BoxError::from(sturdy::core::Error::new(kind, "scripted"))),
                }
            }
        })
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
}

/// A layer that hedges after 10 samples, with the given bounds on the delay.
fn quick() -> HedgeLayer {
    HedgeLayer::new().with_min_samples(10)
}

/// Ten fast calls, so the host has a delay (about 10 ms).
async fn warm<S>(svc: &S, host: &str)
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
{
    for _ in 0..10 {
        svc.clone().oneshot(get(host)).await.unwrap();
    }
}

/// Calls 0..10 take 10 ms; call 10 takes `slow` ms; later ones 10 ms.
fn one_slow(slow: u64) -> Api {
    Api::new(move |i| (if i == 10 { slow } else { 10 }, Ok(200)))
}

#[test]
fn settings_are_validated_with_config_errors_naming_them() {
    for p in [0.0, 1.0, -1.0, 1.5, f64::NAN] {
        let err = HedgeLayer::new().with_percentile(p).unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::Config);
        assert!(err.to_string().contains("percentile"), "{err}");
    }
    for r in [-0.1, 1.1, f64::NAN, f64::INFINITY] {
        let err = HedgeLayer::new().with_budget(r, 10).unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::Config);
        assert!(
            err.to_string().contains("budget") || err.to_string().contains("ratio"),
            "{err}"
        );
    }
    assert!(HedgeLayer::new().with_budget(0.0, 0).is_ok());
    assert!(HedgeLayer::new().with_budget(1.0, u32::MAX).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_slow_get_is_hedged_and_the_copy_wins() {
    let api = one_slow(1_000);
    let (layer, handle) = quick().pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    let start = Instant::now();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(40),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(api.started(), 12);
    let s = handle.stats("a.test").unwrap();
    assert_eq!((s.calls(), s.hedges(), s.hedge_wins()), (11, 1, 1));
    assert_eq!(
        api.dropped.load(Ordering::SeqCst),
        1,
        "the slow copy was dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn nothing_is_hedged_before_min_samples() {
    let api = Api::new(|i| (if i == 5 { 1_000 } else { 10 }, Ok(200)));
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..6 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(api.started(), 6);
    let s = handle.stats("a.test").unwrap();
    assert_eq!(s.delay(), None);
    assert_eq!(s.hedges(), 0);
}

#[tokio::test(start_paused = true)]
async fn post_put_delete_patch_are_never_hedged_by_default() {
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let api = one_slow(500);
        let (layer, handle) = quick().pair();
        let svc = layer.layer(api.service());
        warm(&svc, "a.test").await;
        svc.clone()
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri("http://a.test/x")
                    .header("idempotency-key", "k1")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(api.started(), 11, "{method} sent once");
        assert_eq!(
            handle.stats("a.test").unwrap().calls(),
            10,
            "{method} not counted"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn head_and_options_are_hedged() {
    for method in ["HEAD", "OPTIONS"] {
        let api = one_slow(500);
        let svc = quick().layer(api.service());
        warm(&svc, "a.test").await;
        svc.clone().oneshot(req(method, "a.test")).await.unwrap();
        assert_eq!(api.started(), 12, "{method}");
    }
}

#[tokio::test(start_paused = true)]
async fn keyed_post_is_hedged_only_when_allowed_and_keyed() {
    let api = one_slow(500);
    let svc = quick().with_keyed_requests(true).layer(api.service());
    warm(&svc, "a.test").await;
    let keyed = Request::post("http://a.test/x")
        .header("idempotency-key", "k1")
        .body(())
        .unwrap();
    svc.clone().oneshot(keyed).await.unwrap();
    assert_eq!(api.started(), 12, "a keyed POST is hedged");

    let api = one_slow(500);
    let svc = quick().with_keyed_requests(true).layer(api.service());
    warm(&svc, "a.test").await;
    svc.clone().oneshot(req("POST", "a.test")).await.unwrap();
    assert_eq!(api.started(), 11, "a POST without a key is not");
}

#[tokio::test(start_paused = true)]
async fn the_copy_carries_the_headers_and_extensions() {
    #[derive(Clone, Debug, PartialEq)]
    struct Mark(u32);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |r: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        s.lock().unwrap().push((
            r.headers().get("x-t").cloned(),
            r.extensions().get::<Mark>().cloned(),
        ));
        async move {
            let ms = if i == 10 { 500 } else { 10 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, BoxError>(Response::new(()))
        }
    });
    let svc = quick().layer(api);
    for _ in 0..10 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let mut r = get("a.test");
    r.headers_mut().insert("x-t", "v".parse().unwrap());
    r.extensions_mut().insert(Mark(7));
    svc.clone().oneshot(r).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 12);
    assert_eq!(seen[10], seen[11]);
    assert_eq!(seen[11].1, Some(Mark(7)));
}

#[tokio::test(start_paused = true)]
async fn budget_zero_ratio_allows_only_the_burst() {
    let api = Api::new(|i| (if i >= 10 { 500 } else { 10 }, Ok(200)));
    let (layer, handle) = quick().with_budget(0.0, 2).unwrap().pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    for _ in 0..10 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(handle.stats("a.test").unwrap().hedges(), 2);
}

#[tokio::test(start_paused = true)]
async fn budget_zero_burst_never_hedges() {
    let api = Api::new(|i| (if i >= 10 { 500 } else { 10 }, Ok(200)));
    let (layer, handle) = quick().with_budget(1.0, 0).unwrap().pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    for _ in 0..5 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(
        handle.stats("a.test").unwrap().hedges(),
        0,
        "the balance is capped at 0"
    );
}

#[tokio::test(start_paused = true)]
async fn default_budget_bounds_hedges_to_five_percent_plus_ten() {
    // Every call after the first 10 is slow: the budget alone limits hedging.
    let api = Api::new(|i| (if i >= 10 && i % 2 == 0 { 300 } else { 10 }, Ok(200)));
    let (layer, handle) = quick().pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    for _ in 0..200 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    let s = handle.stats("a.test").unwrap();
    let bound = (s.calls() as f64 * 0.05 + 10.0).floor() as u64;
    assert!(
        s.hedges() <= bound,
        "{} hedges of {} calls, bound {bound}",
        s.hedges(),
        s.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn delay_bounds_zero_zero_hedges_at_once_without_panic() {
    let api = one_slow(500);
    let (layer, handle) = quick()
        .with_delay_bounds(Duration::ZERO, Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    let start = Instant::now();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert!(
        start.elapsed() <= Duration::from_millis(11),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(handle.stats("a.test").unwrap().hedges(), 1);
}

#[tokio::test(start_paused = true)]
async fn delay_bounds_duration_max_never_hedges_and_never_panics() {
    let api = one_slow(500);
    let (layer, handle) = quick()
        .with_delay_bounds(Duration::MAX, Duration::MAX)
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    let start = Instant::now();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(500));
    let s = handle.stats("a.test").unwrap();
    assert_eq!(s.hedges(), 0);
    assert!(
        s.delay().is_some_and(|d| d >= Duration::from_secs(3_600)),
        "{:?}",
        s.delay()
    );
}

#[tokio::test(start_paused = true)]
async fn max_below_min_is_taken_as_min() {
    let api = one_slow(500);
    let (layer, handle) = quick()
        .with_delay_bounds(Duration::from_millis(100), Duration::from_millis(1))
        .pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    assert_eq!(
        handle.stats("a.test").unwrap().delay(),
        Some(Duration::from_millis(100))
    );
}

#[tokio::test(start_paused = true)]
async fn window_zero_is_taken_as_one_millisecond() {
    let api = one_slow(500);
    let (layer, handle) = quick().with_window(Duration::ZERO).pair();
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert!(handle.stats("a.test").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_first_copy_failing_before_the_hedge_fails_the_call() {
    let api = Api::new(|i| {
        if i == 10 {
            (2, Err(ErrorKind::Transport))
        } else {
            (10, Ok(200))
        }
    });
    let svc = quick().layer(api.service());
    warm(&svc, "a.test").await;
    let err = svc.clone().oneshot(get("a.test")).await.unwrap_err();
    assert_eq!(
        *sturdy::core::find::<sturdy::core::Error>(&*err)
            .unwrap()
            .kind(),
        ErrorKind::Transport
    );
    assert_eq!(api.started(), 11, "no hedge");
}

#[tokio::test(start_paused = true)]
async fn one_copy_failing_while_the_other_runs_waits_for_the_other() {
    // Call 10 is slow and then fails; its hedge (call 11) answers 200.
    let api = Api::new(|i| match i {
        10 => (40, Err(ErrorKind::Transport)),
        11 => (100, Ok(200)),
        _ => (10, Ok(200)),
    });
    let svc = quick().layer(api.service());
    warm(&svc, "a.test").await;
    let res = svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn both_failing_never_claims_not_sent_if_one_may_have_been_processed() {
    // The first may have been processed (a reset), the later one was never sent (refused).
    let api = Api::new(|i| match i {
        10 => (40, Err(ErrorKind::Transport)),
        11 => (100, Err(ErrorKind::Connect)),
        _ => (10, Ok(200)),
    });
    let svc = quick().layer(api.service());
    warm(&svc, "a.test").await;
    let err = svc.clone().oneshot(get("a.test")).await.unwrap_err();
    assert_ne!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert_eq!(
        *sturdy::core::find::<sturdy::core::Error>(&*err)
            .unwrap()
            .kind(),
        ErrorKind::Transport
    );
}

#[tokio::test(start_paused = true)]
async fn both_failing_returns_the_later_error_otherwise() {
    let api = Api::new(|i| match i {
        10 => (40, Err(ErrorKind::Connect)),
        11 => (100, Err(ErrorKind::Timeout)),
        _ => (10, Ok(200)),
    });
    let svc = quick().layer(api.service());
    warm(&svc, "a.test").await;
    let err = svc.clone().oneshot(get("a.test")).await.unwrap_err();
    assert_eq!(
        *sturdy::core::find::<sturdy::core::Error>(&*err)
            .unwrap()
            .kind(),
        ErrorKind::Timeout
    );
}

#[tokio::test(start_paused = true)]
async fn the_first_response_wins_whatever_its_status() {
    let api = Api::new(|i| match i {
        10 => (500, Ok(200)),
        11 => (5, Ok(503)),
        _ => (10, Ok(200)),
    });
    let svc = quick().layer(api.service());
    warm(&svc, "a.test").await;
    let res = svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(res.status(), 503, "the copy's 503 came first");
}

#[tokio::test(start_paused = true)]
async fn a_hedged_call_dropped_while_both_copies_run_drops_both() {
    let api2 = Api::new(|i| (if i >= 10 { 10_000 } else { 10 }, Ok(200)));
    let svc = quick().layer(api2.service());
    warm(&svc, "a.test").await;
    let call = tokio::spawn(svc.clone().oneshot(get("a.test")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api2.started(), 12, "both copies in flight");
    call.abort();
    let _ = call.await;
    assert_eq!(
        api2.dropped.load(Ordering::SeqCst),
        2,
        "both copies dropped"
    );
}

#[tokio::test(start_paused = true)]
async fn over_concurrency_limit_1_the_hedge_waits_and_the_first_answer_wins() {
    let api = one_slow(300);
    let (layer, handle) = quick().pair();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(api.service());
    let mut kept = svc.clone();
    for _ in 0..10 {
        kept.ready()
            .await
            .unwrap()
            .call(get("a.test"))
            .await
            .unwrap();
    }
    let start = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        kept.ready().await.unwrap().call(get("a.test")),
    )
    .await
    .expect("no deadlock")
    .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(api.started(), 11, "the hedge never got a permit");
    assert_eq!(handle.stats("a.test").unwrap().hedge_wins(), 0);
    // The next calls still go: the hedge's wait for a permit was dropped with the call.
    tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get("a.test")))
        .await
        .expect("the permit was given back")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn under_buffer_many_tasks_finish() {
    let api = Api::new(|i| (if i % 17 == 16 { 200 } else { 10 }, Ok(200)));
    let svc = tower::buffer::Buffer::new(quick().layer(api.service()), 4);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut s = svc.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    s.ready().await.unwrap().call(get("a.test")).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("no deadlock");
}

#[tokio::test(start_paused = true)]
async fn the_inner_error_comes_back_as_it_was() {
    #[derive(Debug)]
    struct Mine;
    impl std::fmt::Display for Mine {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("mine")
        }
    }
    impl std::error::Error for Mine {}
    let svc = HedgeLayer::new().layer(service_fn(|_r: Request<()>| async {
        Err::<Response<()>, Mine>(Mine)
    }));
    let err = svc.oneshot(get("a.test")).await.unwrap_err();
    assert!(err.is::<Mine>(), "boxed as it was: {err}");
}

#[tokio::test(start_paused = true)]
async fn thousands_of_hosts_stay_bounded_with_overflow_listed() {
    let api = Api::new(|_| (0, Ok(200)));
    let (layer, handle) = HedgeLayer::new().with_max_hosts(8).pair();
    let svc = layer.layer(api.service());
    for i in 0..2_000 {
        svc.clone()
            .oneshot(get(&format!("h{i}.test")))
            .await
            .unwrap();
    }
    let all = handle.all();
    assert!(all.len() <= 9, "{}", all.len());
    assert!(all.iter().any(|(k, _)| k == "*"));
}

#[tokio::test(start_paused = true)]
async fn handle_reads_before_and_out_of_range() {
    let api = one_slow(10);
    let (layer, handle) = quick().pair();
    assert!(handle.stats("a.test").is_none());
    assert_eq!(handle.latency_percentile("a.test", 0.5), None);
    let svc = layer.layer(api.service());
    warm(&svc, "a.test").await;
    let s = handle.stats("a.test").unwrap();
    assert_eq!(s.extra_ratio(), 0.0);
    assert_eq!(s.samples(), 10);
    for q in [0.0, 1.0, -1.0, f64::NAN] {
        assert_eq!(handle.latency_percentile("a.test", q), None, "{q}");
    }
    let p50 = handle.latency_percentile("a.test", 0.5).unwrap();
    assert!(
        p50 >= Duration::from_millis(10) && p50 <= Duration::from_micros(11_250),
        "{p50:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn hedge_events_are_sent_and_won() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let api = one_slow(1_000);
    let svc = quick()
        .on_event(move |e: &Event<'_>| match *e {
            Event::HedgeSent { key, host } => {
                s.lock().unwrap().push(format!("sent {key} {host:?}"));
            }
            Event::HedgeWon { key, host } => s.lock().unwrap().push(format!("won {key} {host:?}")),
            _ => {}
        })
        .layer(api.service());
    warm(&svc, "a.test:8080").await;
    svc.clone().oneshot(get("a.test:8080")).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "sent a.test:8080 Some(\"a.test:8080\")",
            "won a.test:8080 Some(\"a.test:8080\")"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_below_hedge_each_copy_takes_a_place_and_gives_it_back() {
    let api = one_slow(1_000);
    let (climit, chandle) = sturdy::concurrency::AdaptiveConcurrencyLayer::new().pair();
    let svc = tower::ServiceBuilder::new()
        .layer(quick())
        .layer(climit)
        .service(api.service());
    warm(&svc, "a.test").await;
    let call = tokio::spawn(svc.clone().oneshot(get("a.test")));
    tokio::time::sleep(Duration::from_millis(15)).await;
    let during = chandle.state("a.test").unwrap().in_flight();
    call.await.unwrap().unwrap();
    assert_eq!(during, 2, "each copy holds a place");
    assert_eq!(
        chandle.state("a.test").unwrap().in_flight(),
        0,
        "the loser's place came back"
    );
}
