#![cfg(feature = "full")]
//! s64 (outside round): hedging (`sturdy-hedge`), the adaptive concurrency limit
//! (`sturdy-concurrency`) and their metrics, against docs/guides/hedge.md,
//! docs/guides/concurrency.md, docs/guides/metrics.md and the crates' rustdoc. Timing runs on
//! paused time over in-process services; metrics are read from a `DebuggingRecorder` set for
//! one current-thread test.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::hedge::HedgeLayer;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A tiny seeded generator (xorshift64*), so drop points are reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Counts futures of the inner service alive now (made, not yet dropped).
#[derive(Clone, Default)]
struct Alive(Arc<AtomicUsize>);

struct AliveGuard(Arc<AtomicUsize>);

impl Alive {
    fn enter(&self) -> AliveGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        AliveGuard(self.0.clone())
    }
    fn now(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A service whose `n`-th call (0-based) takes `latency(n)` and answers `status(n)`; it counts
/// calls made and futures alive.
#[allow(clippy::type_complexity)]
fn timed_service(
    calls: Arc<AtomicUsize>,
    alive: Alive,
    latency: impl Fn(usize) -> Duration + Send + Sync + Clone + 'static,
    status: impl Fn(usize) -> StatusCode + Send + Sync + Clone + 'static,
) -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<()>, Infallible>> + Send,
> + Clone
       + Send {
    service_fn(move |_req: Request<()>| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let guard = alive.enter();
        let d = latency(n);
        let s = status(n);
        async move {
            let _guard = guard;
            if !d.is_zero() {
                tokio::time::sleep(d).await;
            }
            Ok::<_, Infallible>(Response::builder().status(s).body(()).unwrap())
        }
    })
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

#[derive(Debug)]
struct Row {
    name: String,
    labels: BTreeMap<String, String>,
    value: DebugValue,
}

fn rows(s: &Snapshotter) -> Vec<Row> {
    s.snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _unit, _desc, value)| {
            let (_kind, key) = ck.into_parts();
            Row {
                name: key.name().to_owned(),
                labels: key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                value,
            }
        })
        .collect()
}

fn counter_sum(rows: &[Row], name: &str) -> u64 {
    rows.iter()
        .filter(|r| r.name == name)
        .map(|r| match r.value {
            DebugValue::Counter(v) => v,
            _ => 0,
        })
        .sum()
}

fn events_log() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn(&Event<'_>) + Send + Sync + 'static,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (log, move |e: &Event<'_>| {
        let line = format!("{e:?}");
        l.lock().unwrap().push(line);
    })
}

fn logged(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// Warms a hedging client's host with `n` quick calls (10 ms each) so it has a delay.
async fn warm<S>(client: &S, uri: &str, n: usize)
where
    S: Service<Request<()>, Response = Response<()>, Error = BoxError> + Clone,
{
    for _ in 0..n {
        client.clone().oneshot(get(uri)).await.unwrap();
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const OK: fn(usize) -> StatusCode = |_| StatusCode::OK;

// ---------------------------------------------------------------------------------------------
// Hedging
// ---------------------------------------------------------------------------------------------

/// hedge.md: "Over a `ConcurrencyLimit(1)` (or a full limit), the first copy holds the permit,
/// so the hedge waits for one and the first answer wins"; the handle's `hedges()` counts
/// "Second copies sent: the extra requests", and `sturdy.hedge.sent` counts "second copies of
/// slow calls sent". A hedge that never got a permit was never sent.
#[tokio::test(start_paused = true)]
async fn hedge_over_concurrency_limit_one_waits_and_is_not_counted_as_sent() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Alive::default();
    let inner = timed_service(
        calls.clone(),
        alive.clone(),
        |n| if n < 20 { ms(10) } else { ms(1_000) },
        OK,
    );
    let (log, hook) = events_log();
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).on_event(hook).pair();
    let client = layer.layer(tower::limit::ConcurrencyLimit::new(inner, 1));
    let uri = "http://api.example.com/x";
    warm(&client, uri, 20).await;
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());

    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(get(uri)))
        .await
        .expect("the call must not hang")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(start.elapsed(), ms(1_000), "the first copy answered");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        21,
        "no second request reached the service"
    );
    let stats = handle.stats("api.example.com").unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (0, 0), "{stats:?}");
    assert!(
        !logged(&log).iter().any(|l| l.contains("HedgeSent")),
        "{:?}",
        logged(&log)
    );
    assert_eq!(counter_sum(&rows(&snap), "sturdy.hedge.sent"), 0);
    assert_eq!(alive.now(), 0);
    // The permit came back: the next call goes through at once.
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(get(uri)))
        .await
        .unwrap()
        .unwrap();
    assert!(start.elapsed() <= ms(1_100));
}

/// hedge.md: "A call answered without ever waiting (its future ready on the first poll) counts
/// as zero"; "The delay is never shorter than 1 ms". A host whose every answer is immediate has
/// a delay of exactly the lower bound, and a slow call to it is hedged after 1 ms.
#[tokio::test(start_paused = true)]
async fn samples_of_zero_give_the_lower_bound_delay() {
    let slow = Arc::new(AtomicUsize::new(0));
    let s = slow.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let inner = service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let s = s.clone();
        async move {
            // The 33rd call's first copy is slow; every other answer is immediate.
            if i == 32 {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let client = layer.layer(inner);
    warm(&client, "http://zero.test/", 32).await;
    let stats = handle.stats("zero.test").unwrap();
    assert_eq!(stats.samples(), 32);
    assert_eq!(stats.delay(), Some(ms(1)), "{stats:?}");
    let p = handle.latency_percentile("zero.test", 0.95).unwrap();
    assert!(p < ms(1), "{p:?}");

    let start = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        client.clone().oneshot(get("http://zero.test/")),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        start.elapsed(),
        ms(1),
        "hedged after the 1 ms floor; the hedge answered at once"
    );
    let stats = handle.stats("zero.test").unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (1, 1));
}

/// hedge.md: buckets "from 1 µs to 4.7 h"; "The delay is never ... longer than 10 s". Latencies
/// of two days neither overflow nor panic: the delay is the 10 s ceiling, and with a ceiling of
/// 30 days it is the histogram's last bucket (about 4.7 h).
#[tokio::test(start_paused = true)]
async fn latencies_of_days_cap_the_delay() {
    for (max, lo, hi) in [
        (
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::from_secs(10),
        ),
        (
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(4 * 3_600),
            Duration::from_secs(5 * 3_600),
        ),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = timed_service(
            calls.clone(),
            Alive::default(),
            |_| Duration::from_secs(2 * 86_400),
            OK,
        );
        let (layer, handle) = HedgeLayer::new()
            .with_min_samples(16)
            .with_delay_bounds(ms(1), max)
            .pair();
        let client = layer.layer(inner);
        let mut tasks = Vec::new();
        for _ in 0..16 {
            tasks.push(tokio::spawn(
                client.clone().oneshot(get("http://days.test/")),
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let stats = handle.stats("days.test").unwrap();
        assert_eq!(stats.hedges(), 0, "no delay before the samples");
        let d = stats.delay().expect("16 samples give a delay");
        assert!(d >= lo && d <= hi, "max {max:?}: delay {d:?}");
        let p = handle.latency_percentile("days.test", 0.5).unwrap();
        assert!(p <= Duration::from_secs(5 * 3_600), "{p:?}");
    }
}

/// Hostile settings: the largest delay bounds and window. A hedge "never longer than" the
/// bound: with a bound of `Duration::MAX` no hedge comes due, and arming that timer must not
/// overflow (panic) on the call's start instant.
#[tokio::test(start_paused = true)]
async fn largest_delay_bounds_and_window_do_not_panic() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        |n| if n < 16 { ms(10) } else { ms(500) },
        OK,
    );
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(16)
        .with_delay_bounds(Duration::MAX, Duration::MAX)
        .with_window(Duration::MAX)
        .with_budget(1.0, u32::MAX)
        .unwrap()
        .pair();
    let client = layer.layer(inner);
    warm(&client, "http://max.test/", 16).await;
    let stats = handle.stats("max.test").unwrap();
    assert_eq!(stats.samples(), 16);
    let start = Instant::now();
    let r = tokio::spawn(client.clone().oneshot(get("http://max.test/")))
        .await
        .expect("a call with the largest delay bound must not panic");
    r.unwrap();
    assert_eq!(start.elapsed(), ms(500));
    assert_eq!(handle.stats("max.test").unwrap().hedges(), 0);
}

/// Zero bounds and a zero window ("Zero is taken as 1 ms"): a call is hedged at once, one
/// answer comes back, nothing is left running.
#[tokio::test(start_paused = true)]
async fn zero_delay_bounds_hedge_at_once_and_leave_nothing_running() {
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Alive::default();
    let inner = timed_service(calls.clone(), alive.clone(), |_| ms(10), OK);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(1)
        .with_delay_bounds(Duration::ZERO, Duration::ZERO)
        .with_window(Duration::ZERO)
        .pair();
    let client = layer.layer(inner);
    for _ in 0..40 {
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.clone().oneshot(get("http://zero-bounds.test/")),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(alive.now(), 0);
    }
    let stats = handle.stats("zero-bounds.test").unwrap();
    assert!(stats.hedges() <= stats.calls(), "{stats:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst) as u64,
        stats.calls() + stats.hedges()
    );
}

/// `with_percentile` and `with_budget` are "validated": NaN, infinities and the ends are a
/// `Config` error, never accepted.
#[test]
fn hostile_percentile_and_budget_are_config_errors() {
    for p in [
        f64::NAN,
        0.0,
        1.0,
        -0.5,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        let err = HedgeLayer::new().with_percentile(p).unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::Config, "{p}");
    }
    for r in [f64::NAN, -0.01, 1.01, f64::INFINITY] {
        let err = HedgeLayer::new().with_budget(r, 10).unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::Config, "{r}");
    }
    for r in [0.0, 1.0] {
        assert!(HedgeLayer::new().with_budget(r, 0).is_ok());
    }
    for r in [f64::NAN, 0.0, 1.0, -1.0, 2.0] {
        let err = AdaptiveConcurrencyLayer::new().with_backoff(r).unwrap_err();
        assert_eq!(*err.kind(), ErrorKind::Config, "{r}");
    }
}

/// hedge.md: "Each hedgeable call adds 0.05 of a hedge, each hedge spends one, and the balance
/// is capped at 10, so hedges stay below `5 % of calls + 10`". 3,000 calls that are all slow
/// enough to hedge.
#[tokio::test(start_paused = true)]
async fn budget_holds_over_thousands_of_calls() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(calls.clone(), Alive::default(), |_| ms(50), OK);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(1)
        .with_delay_bounds(ms(1), ms(1))
        .pair();
    let client = layer.layer(inner);
    let n = 3_000u64;
    for _ in 0..n {
        client
            .clone()
            .oneshot(get("http://budget.test/"))
            .await
            .unwrap();
    }
    let stats = handle.stats("budget.test").unwrap();
    assert_eq!(stats.calls(), n);
    let cap = n as f64 * 0.05 + 10.0;
    assert!(stats.hedges() as f64 <= cap, "{stats:?}");
    assert!(
        stats.hedges() as f64 >= cap - 15.0,
        "the budget is used: {stats:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst) as u64, n + stats.hedges());
    assert!(stats.extra_ratio() <= 0.05 + 10.0 / n as f64);
}

/// hedge.md: "A dropped call drops both copies." Calls dropped at seeded points (before the
/// hedge, while both copies run, just as one answers) leave no inner future running, and the
/// counters stay consistent; later calls work.
#[tokio::test(start_paused = true)]
async fn calls_dropped_at_seeded_points_leave_nothing_running() {
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Alive::default();
    let lat = Arc::new(Mutex::new(Rng::new(64)));
    let l2 = lat.clone();
    let inner = timed_service(
        calls.clone(),
        alive.clone(),
        move |n| {
            if n < 16 {
                ms(10)
            } else {
                let v = l2.lock().unwrap().below(40);
                ms(v)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(16)
        .with_budget(1.0, 10)
        .unwrap()
        .pair();
    let client = layer.layer(inner);
    warm(&client, "http://drop.test/", 16).await;
    let mut rng = Rng::new(7);
    let mut finished = 0u64;
    for _ in 0..300 {
        let cut = ms(rng.below(30));
        if tokio::time::timeout(cut, client.clone().oneshot(get("http://drop.test/")))
            .await
            .is_ok()
        {
            finished += 1;
        }
        assert_eq!(alive.now(), 0, "a dropped call left a copy running");
    }
    let stats = handle.stats("drop.test").unwrap();
    assert!(stats.hedge_wins() <= stats.hedges(), "{stats:?}");
    assert!(stats.hedges() <= stats.calls(), "{stats:?}");
    assert!(finished > 0 && finished < 300, "{finished}");
    tokio::time::timeout(
        Duration::from_secs(5),
        client.clone().oneshot(get("http://drop.test/")),
    )
    .await
    .unwrap()
    .unwrap();
}

/// A first copy that answers at the very instant its hedge comes due: exactly one response,
/// the other copy dropped, nothing left running, the counters consistent.
#[tokio::test(start_paused = true)]
async fn first_copy_answering_as_the_hedge_is_due_gives_one_answer() {
    let delay = Arc::new(Mutex::new(ms(10)));
    let d2 = delay.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let alive = Alive::default();
    let inner = timed_service(
        calls.clone(),
        alive.clone(),
        move |n| if n < 16 { ms(10) } else { *d2.lock().unwrap() },
        OK,
    );
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let client = layer.layer(inner);
    warm(&client, "http://edge.test/", 16).await;
    // Paused time fires timers on whole milliseconds: the hedge comes due at the delay rounded
    // up, the instant the first copy answers.
    let due = handle.stats("edge.test").unwrap().delay().unwrap();
    let due = ms(due.as_nanos().div_ceil(1_000_000) as u64);
    *delay.lock().unwrap() = due;
    for _ in 0..5 {
        let before = calls.load(Ordering::SeqCst);
        let start = Instant::now();
        let res = tokio::time::timeout(
            Duration::from_secs(5),
            client.clone().oneshot(get("http://edge.test/")),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            start.elapsed(),
            due,
            "the first copy's answer, not a later one"
        );
        assert!(calls.load(Ordering::SeqCst) - before <= 2);
        assert_eq!(alive.now(), 0);
    }
    let stats = handle.stats("edge.test").unwrap();
    assert_eq!(stats.hedge_wins(), 0, "{stats:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst) as u64,
        stats.calls() + stats.hedges()
    );
}

/// hedge.md, "What is hedged": GET, HEAD and OPTIONS; other methods only with an
/// `Idempotency-Key` header and `.with_keyed_requests(true)` ("not a blank one"); "Everything
/// else passes through untouched". The handle's `calls()` counts hedgeable calls only.
#[tokio::test(start_paused = true)]
async fn only_safe_or_keyed_requests_are_hedged() {
    for keyed in [false, true] {
        let calls = Arc::new(AtomicUsize::new(0));
        // The first copy of each case is slow, any second copy quick.
        let slow_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sn = slow_next.clone();
        let inner = timed_service(
            calls.clone(),
            Alive::default(),
            move |_| {
                if sn.swap(false, Ordering::SeqCst) {
                    ms(1_000)
                } else {
                    ms(10)
                }
            },
            OK,
        );
        let (layer, handle) = HedgeLayer::new()
            .with_min_samples(16)
            .with_window(Duration::from_secs(3_600))
            .with_keyed_requests(keyed)
            .pair();
        let client = layer.layer(inner);
        warm(&client, "http://m.test/", 16).await;
        let cases: Vec<(&str, Option<&str>, bool)> = vec![
            ("POST", None, false),
            ("PUT", None, false),
            ("DELETE", None, false),
            ("PATCH", None, false),
            ("POST", Some("   "), false),
            ("POST", Some(""), false),
            ("POST", Some("\t"), false),
            ("POST", Some("k-1"), keyed),
            ("PATCH", Some("k-2"), keyed),
            ("HEAD", None, true),
            ("OPTIONS", None, true),
        ];
        for (method, key, hedged) in cases {
            let before = handle.stats("m.test").unwrap();
            let mut b = Request::builder().method(method).uri("http://m.test/");
            if let Some(k) = key {
                b = b.header("idempotency-key", k);
            }
            let n0 = calls.load(Ordering::SeqCst);
            slow_next.store(true, Ordering::SeqCst);
            let start = Instant::now();
            client.clone().oneshot(b.body(()).unwrap()).await.unwrap();
            let after = handle.stats("m.test").unwrap();
            let sent = calls.load(Ordering::SeqCst) - n0;
            let what = format!("{method} key={key:?} keyed={keyed}");
            if hedged {
                assert_eq!(sent, 2, "{what}");
                assert_eq!(after.hedges(), before.hedges() + 1, "{what}");
                assert_eq!(after.calls(), before.calls() + 1, "{what}");
            } else {
                assert_eq!(sent, 1, "{what}");
                assert_eq!(start.elapsed(), ms(1_000), "{what}");
                assert_eq!(after.hedges(), before.hedges(), "{what}");
                assert_eq!(
                    after.calls(),
                    before.calls(),
                    "{what}: not a hedgeable call"
                );
            }
        }
    }
}

/// Composition: the hedging service under tower's `Buffer`, driven as a kept service with
/// `ready().await?.call(req)`, and over a `Buffer(1)` whose clone the hedge must drive to
/// readiness. Nothing hangs; slow calls are still hedged.
#[tokio::test(start_paused = true)]
async fn hedge_under_and_over_buffer_as_a_kept_service() {
    // Under Buffer.
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        |n| {
            if n < 16 || n % 2 == 1 {
                ms(10)
            } else {
                ms(1_000)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let hedged = layer.layer(inner);
    warm(&hedged, "http://buf.test/", 16).await;
    let mut kept = tower::buffer::Buffer::new(hedged, 1);
    let mut futs = Vec::new();
    for _ in 0..8 {
        let svc = tokio::time::timeout(Duration::from_secs(5), kept.ready())
            .await
            .expect("Buffer over Hedge: ready must not hang")
            .unwrap();
        futs.push(tokio::spawn(svc.call(get("http://buf.test/"))));
    }
    for f in futs {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
    }
    assert!(handle.stats("buf.test").unwrap().hedges() >= 1);

    // Over Buffer(1).
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        |n| {
            if n < 16 || n % 2 == 1 {
                ms(10)
            } else {
                ms(1_000)
            }
        },
        OK,
    );
    let buffered = tower::buffer::Buffer::new(
        tower::util::BoxService::new(inner.map_err(BoxError::from)),
        1,
    );
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let mut kept = layer.layer(buffered);
    warm(&kept, "http://buf2.test/", 16).await;
    let start = Instant::now();
    let f = kept.ready().await.unwrap().call(get("http://buf2.test/"));
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .expect("Hedge over Buffer(1): no hang")
        .unwrap();
    assert!(start.elapsed() < ms(100), "hedged: {:?}", start.elapsed());
    assert_eq!(handle.stats("buf2.test").unwrap().hedge_wins(), 1);
}

/// metrics.md: `sturdy.hedge.sent` and `sturdy.hedge.won` carry `server.address` and
/// `server.port`, "Never the `user:password@` part, never a path or a query", the name "in
/// lower case"; after `with_key(..)` "their metrics carry no `server.*` labels at all".
#[tokio::test(start_paused = true)]
async fn hedge_metrics_labels_are_the_host_only() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let uri = "http://alice:s3cr3t@API.Example.COM:8443/orders/42?token=t0k3n";
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        |n| {
            if n < 16 || n % 2 == 1 {
                ms(10)
            } else {
                ms(1_000)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let client = layer.layer(inner);
    warm(&client, uri, 16).await;
    for _ in 0..3 {
        client.clone().oneshot(get(uri)).await.unwrap();
    }
    let stats = handle.stats("api.example.com:8443").unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (3, 3), "{stats:?}");
    let r = rows(&snap);
    assert_eq!(counter_sum(&r, "sturdy.hedge.sent"), 3);
    assert_eq!(counter_sum(&r, "sturdy.hedge.won"), 3);
    for row in r.iter().filter(|r| r.name.starts_with("sturdy.hedge.")) {
        let want: BTreeMap<String, String> = [
            ("server.address".to_owned(), "api.example.com".to_owned()),
            ("server.port".to_owned(), "8443".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(row.labels, want, "{row:?}");
    }

    // A custom key: no server.* labels, and the key is no label.
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g2 = metrics::set_default_local_recorder(&rec);
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        |n| {
            if n < 16 || n % 2 == 1 {
                ms(10)
            } else {
                ms(1_000)
            }
        },
        OK,
    );
    let layer = HedgeLayer::new()
        .with_min_samples(16)
        .with_key(|_req: &Request<()>| "tenant-secret-7".to_owned());
    let client = layer.layer(inner);
    warm(&client, uri, 16).await;
    client.clone().oneshot(get(uri)).await.unwrap();
    let r = rows(&snap);
    assert_eq!(counter_sum(&r, "sturdy.hedge.sent"), 1, "{r:?}");
    for row in r.iter().filter(|r| r.name.starts_with("sturdy.hedge.")) {
        assert!(row.labels.is_empty(), "{row:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Adaptive concurrency
// ---------------------------------------------------------------------------------------------

/// concurrency.md: "waits in line ... for up to 30 s (`.with_max_wait(d)`)". The largest wait
/// there is must not overflow the deadline (panic): the call waits, then goes when a place
/// frees.
#[tokio::test(start_paused = true)]
async fn huge_max_wait_waits_without_panicking() {
    for wait in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::from_secs(1 << 40),
    ] {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = timed_service(calls.clone(), Alive::default(), |_| ms(100), OK);
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(1, 1)
            .with_max_wait(wait)
            .pair();
        let client = layer.layer(inner);
        let start = Instant::now();
        let a = tokio::spawn(client.clone().oneshot(get("http://wait.test/")));
        tokio::task::yield_now().await;
        let b = tokio::spawn(client.clone().oneshot(get("http://wait.test/")));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        let st = handle.state("wait.test").unwrap();
        assert_eq!((st.in_flight(), st.waiting()), (1, 1), "{wait:?}");
        a.await.unwrap().unwrap();
        b.await
            .expect("a waiting call with a huge max_wait must not panic")
            .unwrap();
        assert_eq!(start.elapsed(), ms(200), "{wait:?}");
        let st = handle.state("wait.test").unwrap();
        assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    }
}

/// concurrency.md: "A maximum wait of zero sheds load instead: a call that finds the limit
/// full fails at once", "a `sturdy_core::Error` of kind `RateLimited` (no wait given), delivery
/// `NotSent`, whose source is `LimitReached` (the key, the limit, how long it waited)".
/// metrics.md: `sturdy.concurrency.rejections` with `server.address`, `server.port`, no
/// secret, path or query anywhere.
#[tokio::test(start_paused = true)]
async fn zero_wait_refusal_error_and_metric() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let uri = "http://bob:hunter2@Shed.Example.com:9443/a/b?api_key=zzz";
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(calls.clone(), Alive::default(), |_| ms(100), OK);
    let (log, hook) = events_log();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .on_event(hook)
        .pair();
    let client = layer.layer(inner);
    let a = tokio::spawn(client.clone().oneshot(get(uri)));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = client.clone().oneshot(get(uri)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "fails at once");
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy Error");
    assert_eq!(*e.kind(), ErrorKind::RateLimited { retry_after: None });
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    let reached = sturdy::core::find::<LimitReached>(&*err).unwrap();
    assert_eq!(reached.key(), "shed.example.com:9443");
    assert_eq!((reached.limit(), reached.waited()), (1, Duration::ZERO));
    assert!(!reached.is_shared());
    let text = format!("{err} | {err:?} | {reached} | {reached:?}");
    for secret in ["hunter2", "bob", "api_key", "zzz", "/a/b"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the refused call was not sent"
    );
    a.await.unwrap().unwrap();
    assert_eq!(
        handle.state("shed.example.com:9443").unwrap().in_flight(),
        0
    );

    let r = rows(&snap);
    assert_eq!(counter_sum(&r, "sturdy.concurrency.rejections"), 1, "{r:?}");
    for row in &r {
        for v in row.labels.values() {
            for secret in ["hunter2", "bob", "api_key", "zzz", "/a/b"] {
                assert!(!v.contains(secret), "{row:?}");
            }
        }
    }
    let rej = r
        .iter()
        .find(|r| r.name == "sturdy.concurrency.rejections")
        .unwrap();
    assert_eq!(
        rej.labels.get("server.address").map(String::as_str),
        Some("shed.example.com")
    );
    assert_eq!(
        rej.labels.get("server.port").map(String::as_str),
        Some("9443")
    );
    assert_eq!(
        logged(&log)
            .iter()
            .filter(|l| l.contains("ConcurrencyRejected"))
            .count(),
        1
    );
}

/// concurrency.md: "A dropped waiting call leaves the line". Waiters dropped by a timeout keep
/// no place: the handle shows nobody waiting, and a later waiter is served as soon as the call
/// in flight ends, not after ghosts.
#[tokio::test(start_paused = true)]
async fn dropped_waiters_leave_the_line() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(calls.clone(), Alive::default(), |_| ms(100), OK);
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let client = layer.layer(inner);
    let start = Instant::now();
    let a = tokio::spawn(client.clone().oneshot(get("http://line.test/")));
    tokio::task::yield_now().await;
    let mut waiters = Vec::new();
    for _ in 0..5 {
        let c = client.clone();
        waiters.push(tokio::spawn(async move {
            tokio::time::timeout(ms(10), c.oneshot(get("http://line.test/"))).await
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(handle.state("line.test").unwrap().waiting(), 5);
    for w in waiters {
        assert!(w.await.unwrap().is_err(), "timed out while waiting");
    }
    let st = handle.state("line.test").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (1, 0), "{st:?}");
    // An aborted waiter too.
    let aborted = tokio::spawn(client.clone().oneshot(get("http://line.test/")));
    tokio::task::yield_now().await;
    assert_eq!(handle.state("line.test").unwrap().waiting(), 1);
    aborted.abort();
    let _ = aborted.await;
    assert_eq!(handle.state("line.test").unwrap().waiting(), 0);

    let b = tokio::spawn(client.clone().oneshot(get("http://line.test/")));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(start.elapsed(), ms(200), "b went as soon as a ended");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let st = handle.state("line.test").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

/// Composition: the adaptive limit under tower's `Buffer`, driven as a kept service with
/// `ready().await?.call(req)`; calls wait in line in their futures and all finish.
#[tokio::test(start_paused = true)]
async fn adaptive_limit_under_buffer_as_a_kept_service() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(calls.clone(), Alive::default(), |_| ms(50), OK);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_secs(1))
        .pair();
    let mut kept = tower::buffer::Buffer::new(layer.layer(inner), 1);
    let start = Instant::now();
    let mut futs = Vec::new();
    for _ in 0..6 {
        let svc = tokio::time::timeout(Duration::from_secs(5), kept.ready())
            .await
            .expect("ready must not hang")
            .unwrap();
        futs.push(tokio::spawn(svc.call(get("http://kept.test/"))));
    }
    for f in futs {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap();
    }
    assert_eq!(start.elapsed(), ms(300), "one at a time");
    let st = handle.state("kept.test").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

/// concurrency.md: "waits in line (first come, first served)".
#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    let inner = service_fn(move |req: Request<()>| {
        let tag = req.uri().path().to_owned();
        o.lock().unwrap().push(tag);
        async move {
            tokio::time::sleep(ms(10)).await;
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let client = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .layer(inner);
    let mut tasks = Vec::new();
    for i in 0..8 {
        tasks.push(tokio::spawn(
            client
                .clone()
                .oneshot(get(&format!("http://fifo.test/{i}"))),
        ));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let got = order.lock().unwrap().clone();
    let want: Vec<String> = (0..8).map(|i| format!("/{i}")).collect();
    assert_eq!(got, want);
}

/// concurrency.md: "A handle sets a host's limit by hand (`handle.set_limit(host, n)`)"; the
/// handle finds a host "in any case"; the limit "stays between 1 and 1,000"; ConcurrencyHandle
/// docs: a change "is reported like any other: a `ConcurrencyLimitChanged` event ... and so
/// the `sturdy.concurrency.limit` gauge".
#[tokio::test(start_paused = true)]
async fn set_limit_in_any_case_clamped_and_reported() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let calls = Arc::new(AtomicUsize::new(0));
    // 500s: ignored by the limit, so it stays where the handle put it.
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        |_| ms(100),
        |_| StatusCode::INTERNAL_SERVER_ERROR,
    );
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = layer.layer(inner);
    handle.set_limit("API.Case.TEST", 1);
    assert_eq!(handle.limit("api.case.test"), Some(1));
    assert_eq!(handle.limit("API.CASE.test"), Some(1));
    let start = Instant::now();
    let a = tokio::spawn(client.clone().oneshot(get("http://api.case.test/")));
    let b = tokio::spawn(client.clone().oneshot(get("http://Api.Case.Test/")));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(
        start.elapsed(),
        ms(200),
        "the hand-set limit of 1 applied to both"
    );
    assert_eq!(handle.states().len(), 1, "{:?}", handle.states());

    let gauge = |snap: &Snapshotter| {
        rows(snap)
            .into_iter()
            .filter(|r| r.name == "sturdy.concurrency.limit")
            .map(|r| match r.value {
                DebugValue::Gauge(v) => (r.labels, v.into_inner()),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>()
    };
    let g = gauge(&snap);
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(
        g[0].0.get("server.address").map(String::as_str),
        Some("api.case.test")
    );
    assert_eq!(g[0].1, 1.0);

    handle.set_limit("api.case.test", 0);
    assert_eq!(handle.limit("api.case.test"), Some(1), "a minimum of 1");
    handle.set_limit("api.case.test", usize::MAX);
    assert_eq!(
        handle.limit("api.case.test"),
        Some(1_000),
        "a maximum of 1,000"
    );
    let g = gauge(&snap);
    assert_eq!(g[0].1, 1_000.0, "{g:?}");
}

/// concurrency.md: "a minimum of 0 is taken as 1, a maximum below the minimum as the minimum";
/// "`.with_initial_limit(n)`" is "taken into the bounds"; both "capped at 1,000,000".
#[tokio::test(start_paused = true)]
async fn limit_bounds_are_taken_as_documented() {
    let cases: Vec<(usize, usize, Option<usize>, usize)> = vec![
        (0, 0, None, 1),
        (5, 2, None, 5),
        (0, 1_000, Some(0), 1),
        (1, 10, Some(usize::MAX), 10),
        (usize::MAX, usize::MAX, None, 1_000_000),
        (1, usize::MAX, Some(usize::MAX), 1_000_000),
    ];
    for (min, max, initial, want) in cases {
        let mut layer = AdaptiveConcurrencyLayer::new().with_limits(min, max);
        if let Some(i) = initial {
            layer = layer.with_initial_limit(i);
        }
        let (layer, handle) = layer.pair();
        // A 500 says nothing about capacity: the limit read is the one the host started with.
        let client = layer.layer(timed_service(
            Arc::default(),
            Alive::default(),
            |_| Duration::ZERO,
            |_| StatusCode::INTERNAL_SERVER_ERROR,
        ));
        client.oneshot(get("http://bounds.test/")).await.unwrap();
        assert_eq!(
            handle.limit("bounds.test"),
            Some(want),
            "with_limits({min}, {max}), initial {initial:?}"
        );
    }
}

/// concurrency.md: the limit "stays between" its bounds: a long run of 503s, each its own
/// round trip, brings it down to the minimum and no lower, and a call still gets through; a
/// loaded run of successes brings it up to the maximum and no higher, and the server never
/// sees more calls at once than that.
#[tokio::test(start_paused = true)]
async fn floor_and_ceiling_hold() {
    for min in [0usize, 3] {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = timed_service(
            calls.clone(),
            Alive::default(),
            |_| ms(5),
            |_| StatusCode::SERVICE_UNAVAILABLE,
        );
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_limits(min, 1_000)
            .pair();
        let client = layer.layer(inner);
        for _ in 0..100 {
            let res = client
                .clone()
                .oneshot(get("http://floor.test/"))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(handle.limit("floor.test"), Some(min.max(1)), "min {min}");
    }

    let peak = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let (p, n) = (peak.clone(), now.clone());
    let inner = service_fn(move |_req: Request<()>| {
        let (p, n) = (p.clone(), n.clone());
        async move {
            let c = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(ms(10)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 6)
        .with_initial_limit(2)
        .pair();
    let client = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                c.clone()
                    .oneshot(get("http://ceiling.test/"))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(handle.limit("ceiling.test"), Some(6));
    assert!(
        peak.load(Ordering::SeqCst) <= 6,
        "{}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(peak.load(Ordering::SeqCst), 6);
}

/// concurrency.md: "Both treat a 429, a 503, a 504 or a timeout (the kinds `RateLimited`,
/// `Timeout` and `Server(503 | 504)` ...) as an overload signal: the limit is multiplied by
/// 0.9"; "Other failures (a 500, a 404, a connect error) and dropped calls say nothing about
/// capacity and are ignored." The gauge and the event follow the change.
#[tokio::test(start_paused = true)]
async fn overload_signals_and_others() {
    enum Out {
        Status(u16),
        Timeout,
        Refused,
        Dropped,
    }
    let cases = [
        (Out::Status(429), true),
        (Out::Status(503), true),
        (Out::Status(504), true),
        (Out::Timeout, true),
        (Out::Status(500), false),
        (Out::Status(502), false),
        (Out::Status(404), false),
        (Out::Status(200), false),
        (Out::Refused, false),
        (Out::Dropped, false),
    ];
    for (i, (out, signal)) in cases.into_iter().enumerate() {
        let rec = DebuggingRecorder::new();
        let snap = rec.snapshotter();
        let _g = metrics::set_default_local_recorder(&rec);
        let host = format!("sig{i}.test");
        let kind = match out {
            Out::Status(s) => s as i32,
            Out::Timeout => -1,
            Out::Refused => -2,
            Out::Dropped => -3,
        };
        let inner = service_fn(move |_req: Request<()>| async move {
            tokio::time::sleep(ms(10)).await;
            match kind {
                -1 => {
                    Err::<Response<()>, BoxError>(Box::new(tower::timeout::error::Elapsed::new()))
                }
                -2 => Err(BoxError::from(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "refused",
                ))),
                -3 => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Response::new(()))
                }
                s => Ok(Response::builder().status(s as u16).body(()).unwrap()),
            }
        });
        let (log, hook) = events_log();
        let (layer, handle) = AdaptiveConcurrencyLayer::new().on_event(hook).pair();
        let client = layer.layer(inner);
        let uri = format!("http://{host}/");
        let _ = tokio::time::timeout(ms(100), client.clone().oneshot(get(&uri))).await;
        let want = if signal { 18 } else { 20 };
        assert_eq!(handle.limit(&host), Some(want), "case {i}");
        let st = handle.state(&host).unwrap();
        assert_eq!(st.in_flight(), 0, "case {i}");
        let changed: Vec<String> = logged(&log)
            .into_iter()
            .filter(|l| l.contains("ConcurrencyLimitChanged"))
            .collect();
        let gauges: Vec<f64> = rows(&snap)
            .into_iter()
            .filter(|r| r.name == "sturdy.concurrency.limit")
            .map(|r| match r.value {
                DebugValue::Gauge(v) => v.into_inner(),
                _ => f64::NAN,
            })
            .collect();
        if signal {
            assert_eq!(changed.len(), 1, "case {i}: {changed:?}");
            assert!(
                changed[0].contains("20") && changed[0].contains("18"),
                "{changed:?}"
            );
            assert_eq!(gauges, vec![18.0], "case {i}");
        } else {
            assert!(changed.is_empty(), "case {i}: {changed:?}");
            assert!(gauges.is_empty(), "case {i}: {gauges:?}");
        }
    }
}

/// concurrency.md: AIMD "each success adds `1 / limit` while at least half of the limit was in
/// use when the call was admitted, so the limit grows by about one per round trip under load
/// and does not grow while unused". metrics.md: the adaptive limit emits "whenever a success
/// raises its whole number of calls".
#[tokio::test(start_paused = true)]
async fn aimd_grows_under_load_only() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let inner = timed_service(Arc::default(), Alive::default(), |_| ms(10), OK);
    let (log, hook) = events_log();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .on_event(hook)
        .pair();
    let client = layer.layer(inner);
    // One call at a time: a quarter of the limit in use, never half.
    for _ in 0..50 {
        client
            .clone()
            .oneshot(get("http://idle.test/"))
            .await
            .unwrap();
    }
    assert_eq!(handle.limit("idle.test"), Some(4));
    assert!(logged(&log).is_empty(), "{:?}", logged(&log));

    // Four callers in a loop: the limit is full, so it grows about one per round trip.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                c.clone().oneshot(get("http://busy.test/")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let limit = handle.limit("busy.test").unwrap();
    assert!(limit > 4, "{limit}");
    let ups = logged(&log)
        .iter()
        .filter(|l| l.contains("ConcurrencyLimitChanged"))
        .count();
    assert_eq!(
        ups,
        limit - 4,
        "one event per whole step: {:?}",
        logged(&log)
    );
    let g: Vec<f64> = rows(&snap)
        .into_iter()
        .filter(|r| r.name == "sturdy.concurrency.limit")
        .map(|r| match r.value {
            DebugValue::Gauge(v) => v.into_inner(),
            _ => f64::NAN,
        })
        .collect();
    assert_eq!(g, vec![limit as f64]);
}

/// metrics.md: past `with_max_hosts`, "the events of that state (... a limit that moved)
/// carry `server.address` `*` and no `server.port`"; "a call refused by a full concurrency
/// limit ... keep key `*` and carry the call's own host". LimitReached: `key()` is "the call's
/// own", `is_shared()` says it was the shared limit.
#[tokio::test(start_paused = true)]
async fn overflow_limit_refusals_carry_the_calls_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);

    let inner = timed_service(Arc::default(), Alive::default(), |_| ms(100), OK);
    let (log, hook) = events_log();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 10)
        .with_initial_limit(1)
        .with_max_wait(Duration::ZERO)
        .with_max_hosts(1)
        .on_event(hook)
        .pair();
    let client = layer.layer(inner);
    let a = tokio::spawn(client.clone().oneshot(get("http://a.test:81/")));
    tokio::task::yield_now().await;
    let b = tokio::spawn(client.clone().oneshot(get("http://b.test:82/")));
    tokio::task::yield_now().await;
    let err = client
        .clone()
        .oneshot(get("http://C.test:83/"))
        .await
        .unwrap_err();
    let reached = sturdy::core::find::<LimitReached>(&*err).unwrap();
    assert_eq!(reached.key(), "c.test:83");
    assert!(reached.is_shared());
    // The shared limit moved by hand while a.test holds the one slot: its gauge is `*` with
    // no port.
    handle.set_limit("d.test", 3);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();

    let rej: Vec<String> = logged(&log)
        .into_iter()
        .filter(|l| l.contains("ConcurrencyRejected"))
        .collect();
    assert_eq!(rej.len(), 1, "{rej:?}");
    assert!(rej[0].contains("\"*\""), "{rej:?}");
    assert!(rej[0].contains("c.test:83"), "{rej:?}");
    let r = rows(&snap);
    let row = r
        .iter()
        .find(|r| r.name == "sturdy.concurrency.rejections")
        .unwrap();
    assert_eq!(
        row.labels.get("server.address").map(String::as_str),
        Some("c.test")
    );
    assert_eq!(
        row.labels.get("server.port").map(String::as_str),
        Some("83")
    );
    assert!(
        handle.state("zzz.test").is_some(),
        "a host past the bound reads the shared limit"
    );

    let r = rows(&snap);
    let g: Vec<&Row> = r
        .iter()
        .filter(|r| r.name == "sturdy.concurrency.limit")
        .collect();
    assert!(
        g.iter().any(
            |r| r.labels.get("server.address").map(String::as_str) == Some("*")
                && !r.labels.contains_key("server.port")
        ),
        "{g:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// More words
// ---------------------------------------------------------------------------------------------

/// hedge.md: "A call whose first copy a layer below still holds back when the hedge comes due
/// (... the adaptive concurrency limit's line ...) is not hedged while it waits: a second copy
/// would wait in the same line." concurrency.md: "Below the hedging layer, each hedged copy
/// takes a place of its own, so hedging cannot push a host past its limit."
#[tokio::test(start_paused = true)]
async fn hedge_over_a_full_adaptive_limit_does_not_queue_a_second_copy() {
    let slow_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sn = slow_next.clone();
    let peak = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let (p, n) = (peak.clone(), now.clone());
    let inner = service_fn(move |req: Request<()>| {
        let (p, n) = (p.clone(), n.clone());
        let d = if req.method() == http::Method::POST {
            Duration::from_secs(10)
        } else if sn.swap(false, Ordering::SeqCst) {
            ms(1_000)
        } else {
            ms(10)
        };
        async move {
            let c = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(d).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let (climit, chandle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        // 500-free successes would grow a limit; 1..=1 keeps it at one.
        .pair();
    let (hlayer, hhandle) = HedgeLayer::new().with_min_samples(16).pair();
    let client = hlayer.layer(climit.layer(inner));
    warm(&client, "http://line2.test/", 16).await;
    assert!(hhandle.stats("line2.test").unwrap().delay().is_some());

    let post = Request::post("http://line2.test/").body(()).unwrap();
    let x = tokio::spawn(client.clone().oneshot(post));
    tokio::task::yield_now().await;
    let start = Instant::now();
    slow_next.store(true, Ordering::SeqCst);
    let g = tokio::spawn(client.clone().oneshot(get("http://line2.test/")));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let st = chandle.state("line2.test").unwrap();
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (1, 1),
        "one copy in line: {st:?}"
    );
    assert_eq!(hhandle.stats("line2.test").unwrap().hedges(), 0);
    x.await.unwrap().unwrap();
    let res = tokio::time::timeout(Duration::from_secs(30), g)
        .await
        .expect("no hang")
        .unwrap();
    res.unwrap();
    assert!(
        start.elapsed() <= Duration::from_secs(11),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(peak.load(Ordering::SeqCst), 1, "never past the limit");
    let st = chandle.state("line2.test").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0), "{st:?}");
}

/// hedge.md: "A call keeps a copy of its request only when the host has a delay and a whole
/// token at the moment of the call; a hedge that finds the budget spent when it is due is not
/// sent." "The budget starts full" (burst 10). Thirty slow calls at once: at most the burst
/// plus their deposits are hedged.
#[tokio::test(start_paused = true)]
async fn a_burst_of_slow_calls_spends_at_most_the_burst() {
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = slow.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        move |_| {
            if s2.load(Ordering::SeqCst) {
                ms(1_000)
            } else {
                ms(10)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(16)
        .with_window(Duration::from_secs(3_600))
        .pair();
    let client = layer.layer(inner);
    warm(&client, "http://burst.test/", 16).await;
    slow.store(true, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..30 {
        tasks.push(tokio::spawn(
            client.clone().oneshot(get("http://burst.test/")),
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = handle.stats("burst.test").unwrap();
    // 10 to start with, plus 0.05 per call: 46 calls deposit 2.3, which the cap may eat.
    assert!(stats.hedges() >= 10 && stats.hedges() <= 12, "{stats:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst) as u64,
        stats.calls() + stats.hedges()
    );
    // The handle finds the host in any case.
    let upper = handle.stats("BURST.Test").expect("any case");
    assert_eq!(upper.calls(), stats.calls());
}

/// metrics.md: "After `with_key(..)` their keys may be anything (a tenant, a token), so their
/// metrics carry no `server.*` labels at all" — the adaptive limit's gauge and refusals.
#[tokio::test(start_paused = true)]
async fn custom_key_concurrency_metrics_carry_no_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let inner = timed_service(
        Arc::default(),
        Alive::default(),
        |_| ms(100),
        |_| StatusCode::SERVICE_UNAVAILABLE,
    );
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .with_key(|_req: &Request<()>| "Tenant-Token-XYZ".to_owned())
        .pair();
    let client = layer.layer(inner);
    let a = tokio::spawn(client.clone().oneshot(get("http://keyed.test:7/")));
    tokio::task::yield_now().await;
    let err = client
        .clone()
        .oneshot(get("http://keyed.test:7/"))
        .await
        .unwrap_err();
    assert_eq!(
        sturdy::core::find::<LimitReached>(&*err).unwrap().key(),
        "Tenant-Token-XYZ"
    );
    a.await.unwrap().unwrap();
    handle.set_limit("Tenant-Token-XYZ", 1);
    assert_eq!(handle.limit("Tenant-Token-XYZ"), Some(1));
    assert_eq!(handle.limit("tenant-token-xyz"), None, "kept as given");
    let r = rows(&snap);
    assert_eq!(counter_sum(&r, "sturdy.concurrency.rejections"), 1, "{r:?}");
    for row in r
        .iter()
        .filter(|r| r.name.starts_with("sturdy.concurrency."))
    {
        assert!(row.labels.is_empty(), "{row:?}");
    }
}

/// concurrency.md: "Past the wait, the call fails without being sent: ... `LimitReached` (the
/// key, the limit, how long it waited)"; "A call admitted before the last decrease cannot
/// cause another one, so fifty 503s from one burst lower the limit once."
#[tokio::test(start_paused = true)]
async fn wait_bound_error_and_one_decrease_per_burst() {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(calls.clone(), Alive::default(), |_| ms(100), OK);
    let client = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(ms(30))
        .layer(inner);
    let a = tokio::spawn(client.clone().oneshot(get("http://waited.test/")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(get("http://waited.test/"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), ms(30));
    let reached = sturdy::core::find::<LimitReached>(&*err).unwrap();
    assert_eq!(reached.waited(), ms(30));
    let text = err.to_string();
    assert!(
        text.contains("waited.test") && text.contains("30ms"),
        "the message names the key and the wait: {text}"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    a.await.unwrap().unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let inner = timed_service(
        Arc::default(),
        Alive::default(),
        |_| ms(10),
        |_| StatusCode::SERVICE_UNAVAILABLE,
    );
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let client = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(
            client.clone().oneshot(get("http://burst503.test/")),
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        handle.limit("burst503.test"),
        Some(18),
        "one decrease for one burst"
    );
}

/// concurrency.md, Vegas: "its first window ... runs at half the limit". Twenty callers at
/// once against a fresh host with the initial limit of 20: the server sees at most 10.
#[tokio::test(start_paused = true)]
async fn vegas_first_window_runs_at_half_the_limit() {
    let peak = Arc::new(AtomicUsize::new(0));
    let now = Arc::new(AtomicUsize::new(0));
    let (p, n) = (peak.clone(), now.clone());
    let inner = service_fn(move |_req: Request<()>| {
        let (p, n) = (p.clone(), n.clone());
        async move {
            let c = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(ms(10)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(Response::new(()))
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_algorithm(sturdy::concurrency::Algorithm::Vegas)
        .pair();
    let client = layer.layer(inner);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        tasks.push(tokio::spawn(
            client.clone().oneshot(get("http://vegas.test/")),
        ));
    }
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let st = handle.state("vegas.test").unwrap();
    assert_eq!(st.limit(), 20, "{st:?}");
    assert_eq!(st.in_flight(), 10, "{st:?}");
    assert_eq!(st.waiting(), 10, "{st:?}");
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(peak.load(Ordering::SeqCst), 10);
}

/// metrics.md: "The events of one call (a hedge sent or won ...) keep `key` `*` and carry the
/// call's own host"; the handle lists the shared state "as `*`" and `stats` of a host past the
/// bound gives "those of the overflow state".
#[tokio::test(start_paused = true)]
async fn overflow_hedge_events_carry_the_calls_host() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let slow_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sn = slow_next.clone();
    let inner = timed_service(
        Arc::default(),
        Alive::default(),
        move |_| {
            if sn.swap(false, Ordering::SeqCst) {
                ms(1_000)
            } else {
                ms(10)
            }
        },
        OK,
    );
    let (log, hook) = events_log();
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(16)
        .with_max_hosts(1)
        .on_event(hook)
        .pair();
    let client = layer.layer(inner);
    warm(&client, "http://first.test/", 16).await;
    warm(&client, "http://Second.test:9/", 16).await;
    slow_next.store(true, Ordering::SeqCst);
    let start = Instant::now();
    client
        .clone()
        .oneshot(get("http://second.test:9/p?q=1"))
        .await
        .unwrap();
    assert!(start.elapsed() < ms(100));
    let keys: Vec<String> = handle.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, vec!["*".to_owned(), "first.test".to_owned()]);
    assert_eq!(handle.stats("second.test:9").unwrap().hedges(), 1);
    let sent: Vec<String> = logged(&log)
        .into_iter()
        .filter(|l| l.contains("HedgeSent"))
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        sent[0].contains("\"*\"") && sent[0].contains("second.test:9"),
        "{sent:?}"
    );
    let r = rows(&snap);
    let row = r.iter().find(|r| r.name == "sturdy.hedge.sent").unwrap();
    assert_eq!(
        row.labels.get("server.address").map(String::as_str),
        Some("second.test")
    );
    assert_eq!(row.labels.get("server.port").map(String::as_str), Some("9"));
}

/// hedge.md: "Calls that end in an error are not recorded; a response is, whatever its status
/// (a quick 503 counts as a quick answer)."
#[tokio::test(start_paused = true)]
async fn errors_are_not_samples_and_statuses_are() {
    let n = Arc::new(AtomicUsize::new(0));
    let inner = service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(ms(5)).await;
            if i.is_multiple_of(2) {
                Err::<Response<()>, BoxError>("boom".into())
            } else {
                Ok(Response::builder().status(503).body(()).unwrap())
            }
        }
    });
    let (layer, handle) = HedgeLayer::new().pair();
    let client = layer.layer(inner);
    for _ in 0..20 {
        let _ = client.clone().oneshot(get("http://mixed.test/")).await;
    }
    let stats = handle.stats("mixed.test").unwrap();
    assert_eq!(stats.calls(), 20);
    assert_eq!(stats.samples(), 10, "{stats:?}");
}

/// hedge.md: the histogram covers "the last 10 to 20 s"; the handle's `delay()` is `None`
/// "while the recent windows hold fewer samples than the minimum (no call is hedged then)". A
/// host quiet for 25 s has no delay, and its next slow call is not hedged on a stale one.
#[tokio::test(start_paused = true)]
async fn a_quiet_host_forgets_its_delay() {
    let slow_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sn = slow_next.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        move |_| {
            if sn.swap(false, Ordering::SeqCst) {
                ms(1_000)
            } else {
                ms(10)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let client = layer.layer(inner);
    warm(&client, "http://quiet.test/", 16).await;
    assert!(handle.stats("quiet.test").unwrap().delay().is_some());
    tokio::time::sleep(Duration::from_secs(25)).await;
    let stats = handle.stats("quiet.test").unwrap();
    assert_eq!(stats.delay(), None, "{stats:?}");
    slow_next.store(true, Ordering::SeqCst);
    let start = Instant::now();
    client
        .clone()
        .oneshot(get("http://quiet.test/"))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), ms(1_000), "not hedged on a stale delay");
    assert_eq!(handle.stats("quiet.test").unwrap().hedges(), 0);
}

/// hedge.md: "the second copy is a clone of the request, headers and extensions included";
/// "When one copy fails with an error while the other is still running, the call waits for
/// the other."
#[tokio::test(start_paused = true)]
async fn the_copy_carries_headers_and_extensions_and_an_error_waits_for_the_other() {
    #[derive(Clone, Debug, PartialEq)]
    struct Tag(u32);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let inner = service_fn(move |req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let line = format!(
            "{:?} {:?}",
            req.headers().get("x-trace"),
            req.extensions().get::<Tag>()
        );
        s2.lock().unwrap().push(line);
        async move {
            match i {
                0..16 => {
                    tokio::time::sleep(ms(10)).await;
                    Ok(Response::new(()))
                }
                // The first copy: slow, then an answer.
                16 => {
                    tokio::time::sleep(ms(1_000)).await;
                    Ok(Response::builder().status(201).body(()).unwrap())
                }
                // The hedge: fails quickly.
                _ => {
                    tokio::time::sleep(ms(5)).await;
                    Err::<Response<()>, BoxError>("hedge broke".into())
                }
            }
        }
    });
    let (layer, handle) = HedgeLayer::new().with_min_samples(16).pair();
    let client = layer.layer(inner);
    warm(&client, "http://copy.test/", 16).await;
    let mut req = Request::get("http://copy.test/")
        .header("x-trace", "abc")
        .body(())
        .unwrap();
    req.extensions_mut().insert(Tag(7));
    let start = Instant::now();
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED, "the first copy's answer");
    assert_eq!(start.elapsed(), ms(1_000));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 18);
    assert_eq!(seen[16], seen[17], "the copy is the same request");
    assert!(
        seen[17].contains("abc") && seen[17].contains("Tag(7)"),
        "{seen:?}"
    );
    let stats = handle.stats("copy.test").unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (1, 0));
}

/// HedgeLayer and AdaptiveConcurrencyLayer docs: "Every service the layer makes shares the
/// per-host state (one `Arc`), and so do the layer's clones and its handles." Two services
/// made from one layer share one limit: two calls on two services at once, limit 1.
#[tokio::test(start_paused = true)]
async fn services_of_one_layer_share_one_limit() {
    let inner = timed_service(
        Arc::default(),
        Alive::default(),
        |_| ms(100),
        |_| StatusCode::INTERNAL_SERVER_ERROR,
    );
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let one = layer.layer(inner.clone());
    let two = layer.clone().layer(inner);
    let a = tokio::spawn(one.oneshot(get("http://shared.test/")));
    tokio::task::yield_now().await;
    let err = two.oneshot(get("http://shared.test/")).await.unwrap_err();
    assert!(sturdy::core::find::<LimitReached>(&*err).is_some());
    assert_eq!(handle.state("shared.test").unwrap().in_flight(), 1);
    a.await.unwrap().unwrap();
}

/// AdaptiveConcurrency docs, Backpressure: "A call refused at once (no wait allowed) gives
/// back what the inner service reserved in `poll_ready` (a `ConcurrencyLimit`'s permit ...) at
/// once, so a kept service that was refused holds nothing until its next call."
#[tokio::test(start_paused = true)]
async fn a_refused_kept_service_holds_no_inner_permit() {
    let inner = timed_service(Arc::default(), Alive::default(), |_| ms(100), OK);
    let inner = tower::limit::ConcurrencyLimit::new(inner, 2);
    let client = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .layer(inner);
    let a = tokio::spawn(client.clone().oneshot(get("http://kept2.test/")));
    tokio::task::yield_now().await;
    let mut kept = client.clone();
    let svc = kept.ready().await.unwrap();
    assert!(svc.call(get("http://kept2.test/")).await.is_err());
    // The kept service was refused: its inner permit is back, so another clone is ready now.
    let mut other = client.clone();
    let ready = tokio::time::timeout(ms(10), other.ready()).await;
    assert!(
        ready.is_ok(),
        "the refused kept service still holds the inner permit"
    );
    drop(other);
    a.await.unwrap().unwrap();
    // And the kept service works again.
    tokio::time::timeout(Duration::from_secs(1), async {
        kept.ready()
            .await
            .unwrap()
            .call(get("http://kept2.test/"))
            .await
    })
    .await
    .unwrap()
    .unwrap();
}

/// hedge.md: "Each hedgeable call adds 0.05 of a hedge, each hedge spends one"; `hedges()`
/// counts "Second copies sent". Hedges that came due over a full `ConcurrencyLimit(1)` and
/// were never sent (the first copy answered while they waited for the permit) spend nothing:
/// the budget, shared by every service of the layer, still pays for a hedge afterwards.
#[tokio::test(start_paused = true)]
async fn hedges_never_sent_spend_no_budget() {
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = slow.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        move |_| {
            if s2.swap(false, Ordering::SeqCst) {
                ms(1_000)
            } else {
                ms(10)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(16)
        .with_window(Duration::from_secs(3_600))
        .pair();
    let free = layer.layer(inner.clone());
    let limited = layer.layer(tower::limit::ConcurrencyLimit::new(inner, 1));
    warm(&free, "http://spend.test/", 16).await;
    for _ in 0..15 {
        slow.store(true, Ordering::SeqCst);
        let start = Instant::now();
        limited
            .clone()
            .oneshot(get("http://spend.test/"))
            .await
            .unwrap();
        assert_eq!(start.elapsed(), ms(1_000));
    }
    let stats = handle.stats("spend.test").unwrap();
    assert_eq!(stats.hedges(), 0, "{stats:?}");
    // Calls dropped while their hedge waits for the permit spend nothing either.
    for _ in 0..5 {
        slow.store(true, Ordering::SeqCst);
        let r =
            tokio::time::timeout(ms(500), limited.clone().oneshot(get("http://spend.test/"))).await;
        assert!(r.is_err());
    }
    slow.store(true, Ordering::SeqCst);
    let start = Instant::now();
    free.clone()
        .oneshot(get("http://spend.test/"))
        .await
        .unwrap();
    assert!(
        start.elapsed() < ms(100),
        "no budget left for a hedge after hedges that were never sent: {:?}, {:?}",
        start.elapsed(),
        handle.stats("spend.test")
    );
    assert_eq!(handle.stats("spend.test").unwrap().hedges(), 1);
}

/// metrics.md: past the bound, "the events of that state (a pause, a breaker's transition, a
/// limit that moved) carry `server.address` `*` and no `server.port`" — a limit moved by an
/// overloaded call of a host past the bound, not by hand.
#[tokio::test(start_paused = true)]
async fn overflow_limit_moved_by_a_503_is_labelled_star() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let inner = service_fn(|req: Request<()>| async move {
        let slow = req.uri().host() == Some("held.test");
        tokio::time::sleep(if slow { ms(1_000) } else { ms(10) }).await;
        let status = if slow { 200 } else { 503 };
        Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_max_hosts(1).pair();
    let client = layer.layer(inner);
    let held = tokio::spawn(client.clone().oneshot(get("http://held.test:1/")));
    tokio::task::yield_now().await;
    let res = client
        .clone()
        .oneshot(get("http://past.test:2/"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    held.await.unwrap().unwrap();
    assert_eq!(handle.limit("*"), Some(18), "{:?}", handle.states());
    let r = rows(&snap);
    let g: Vec<&Row> = r
        .iter()
        .filter(|r| r.name == "sturdy.concurrency.limit")
        .collect();
    assert_eq!(g.len(), 1, "{g:?}");
    assert_eq!(
        g[0].labels.get("server.address").map(String::as_str),
        Some("*"),
        "{g:?}"
    );
    assert!(!g[0].labels.contains_key("server.port"), "{g:?}");
}

/// HedgeLayer::with_min_samples: "0 is taken as 1"; with_idempotency_header: the header
/// `with_keyed_requests` looks for.
#[tokio::test(start_paused = true)]
async fn min_samples_zero_and_a_custom_key_header() {
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = slow.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = timed_service(
        calls.clone(),
        Alive::default(),
        move |_| {
            if s2.swap(false, Ordering::SeqCst) {
                ms(1_000)
            } else {
                ms(10)
            }
        },
        OK,
    );
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(0)
        .with_keyed_requests(true)
        .with_idempotency_header(http::HeaderName::from_static("x-op-id"))
        .pair();
    let client = layer.layer(inner);
    assert!(handle.stats("hdr.test").is_none());
    client
        .clone()
        .oneshot(get("http://hdr.test/"))
        .await
        .unwrap();
    assert!(
        handle.stats("hdr.test").unwrap().delay().is_some(),
        "one sample is enough"
    );
    for (name, hedged) in [("x-op-id", true), ("idempotency-key", false)] {
        slow.store(true, Ordering::SeqCst);
        let req = Request::post("http://hdr.test/")
            .header(name, "op-1")
            .body(())
            .unwrap();
        let start = Instant::now();
        client.clone().oneshot(req).await.unwrap();
        assert_eq!(start.elapsed() < ms(100), hedged, "{name}");
    }
}
