//! `HedgeLayer`'s time bounds from the outside, on paused time against in-process services:
//!
//! - `HedgeLayer::new`: "never sooner than 1 ms nor later than 10 s after it was sent".
//! - `with_delay_bounds`: "Bounds the delay before a hedge, whatever the percentile says
//!   \[1 ms, 10 s\]. A `max` below `min` is taken as `min`."
//! - hedge guide: the histogram has "log-linear buckets of 12.5 % from 1 µs to 4.7 h" ("larger
//!   values land in the last bucket", crate docs of the histogram), "It is recomputed every 16
//!   samples and when a window turns"; `HedgeHandle::latency_percentile`: "`None` without samples
//!   or for a percentile out of range".
//! - `with_budget`: "A Config error when `ratio` is not in `0.0..=1.0`"; `with_percentile`:
//!   "when `percentile` is not strictly between 0 and 1".
//! - service docs: over a `ConcurrencyLimit(1)` "the hedge waits for a permit and the first
//!   answer wins"; the guide: "A dropped call drops both copies".
//!
//! Latencies far past the histogram's range (a day), hostile settings (`Duration::MAX`, NaN,
//! `u32::MAX`, `u64::MAX`), and a kept service under `Buffer` and `ConcurrencyLimit(1)` whose
//! calls are dropped at seeded moments.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::core::ErrorKind;
use sturdy::hedge::{HedgeHandle, HedgeLayer};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";
const DAY: Duration = Duration::from_secs(86_400);

/// A service whose invocation `i` takes `plan(i)`; it records when each invocation started.
#[derive(Clone)]
struct Api {
    plan: Arc<Mutex<Box<dyn Fn(usize) -> Duration + Send>>>,
    starts: Arc<Mutex<Vec<Instant>>>,
    done: Arc<AtomicUsize>,
}

impl Api {
    fn new(f: impl Fn(usize) -> Duration + Send + 'static) -> Self {
        Self {
            plan: Arc::new(Mutex::new(Box::new(f))),
            starts: Arc::new(Mutex::new(Vec::new())),
            done: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn set(&self, f: impl Fn(usize) -> Duration + Send + 'static) {
        *self.plan.lock().unwrap() = Box::new(f);
    }
    fn invoked(&self) -> usize {
        self.starts.lock().unwrap().len()
    }
    fn start_of(&self, i: usize) -> Instant {
        self.starts.lock().unwrap()[i]
    }
    fn service(
        &self,
    ) -> impl Service<
        Request<()>,
        Response = Response<()>,
        Error = std::convert::Infallible,
        Future = impl std::future::Future<Output = Result<Response<()>, std::convert::Infallible>>
                     + Send
                     + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        tower::service_fn(move |_req: Request<()>| {
            let i = {
                let mut s = me.starts.lock().unwrap();
                s.push(Instant::now());
                s.len() - 1
            };
            let d = (me.plan.lock().unwrap())(i);
            let done = me.done.clone();
            async move {
                tokio::time::sleep(d).await;
                done.fetch_add(1, Ordering::SeqCst);
                Ok(Response::new(()))
            }
        })
    }
}

fn get() -> Request<()> {
    Request::get(format!("http://{HOST}/orders/1"))
        .body(())
        .unwrap()
}

/// `n` calls at once, all answered together after `d`: `n` samples of `d` in one window.
async fn warm_together<S>(svc: &S, n: usize)
where
    S: Service<Request<()>, Response = Response<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Debug + Send,
{
    let mut calls = Vec::new();
    for _ in 0..n {
        calls.push(tokio::spawn(svc.clone().oneshot(get())));
    }
    for c in calls {
        c.await.unwrap().unwrap();
    }
}

fn delay(h: &HedgeHandle) -> Option<Duration> {
    h.stats(HOST).and_then(|s| s.delay())
}

/// One slow call (its first copy takes `slow`, its hedge 1 ms): when its hedge was sent,
/// counted from the call's start, and how long the call took.
async fn hedge_after<S>(api: &Api, svc: &S, slow: Duration) -> (Option<Duration>, Duration)
where
    S: Service<Request<()>, Response = Response<()>> + Clone,
    S::Error: std::fmt::Debug,
{
    let first = api.invoked();
    api.set(move |i| {
        if i == first {
            slow
        } else {
            Duration::from_millis(1)
        }
    });
    let t0 = Instant::now();
    svc.clone().oneshot(get()).await.unwrap();
    let took = t0.elapsed();
    let hedged = (api.invoked() > first + 1).then(|| api.start_of(first + 1) - t0);
    (hedged, took)
}

// ---------------------------------------------------------------------------------------------
// The cap.

#[tokio::test(start_paused = true)]
async fn latencies_of_a_day_give_a_delay_of_at_most_ten_seconds() {
    let api = Api::new(|_| DAY);
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    // 160 samples (the delay is recomputed every 16): all a day, far past the histogram's 4.7 h.
    warm_together(&svc, 160).await;
    let d = delay(&h).expect("a delay after 160 samples");
    assert!(d <= Duration::from_secs(10), "above the 10 s cap: {d:?}");
    assert!(
        d >= Duration::from_secs(9),
        "the percentile is hours, capped at 10 s: {d:?}"
    );
    let (hedged, took) = hedge_after(&api, &svc, DAY).await;
    let hedged = hedged.expect("a call a day slow was not hedged");
    assert!(
        hedged <= Duration::from_secs(10) + Duration::from_millis(2),
        "hedged after {hedged:?}"
    );
    assert!(
        took <= Duration::from_secs(10) + Duration::from_millis(10),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_set_cap_holds_for_latencies_past_the_histogram() {
    let api = Api::new(|_| DAY);
    let cap = Duration::from_millis(2500);
    let (layer, h) = HedgeLayer::new()
        .with_delay_bounds(Duration::from_millis(1), cap)
        .pair();
    let svc = layer.layer(api.service());
    warm_together(&svc, 160).await;
    assert_eq!(delay(&h), Some(cap));
    for _ in 0..5 {
        let (hedged, took) = hedge_after(&api, &svc, DAY).await;
        let hedged = hedged.expect("not hedged");
        assert!(
            hedged <= cap + Duration::from_millis(2),
            "hedged after {hedged:?}"
        );
        assert!(took <= cap + Duration::from_millis(10), "{took:?}");
    }
}

/// With no cap to speak of (`Duration::MAX`), latencies past the histogram land in its last
/// bucket ("from 1 µs to about 4.7 hours (larger values land in the last bucket)"): the delay
/// and the percentile are at most about 4.7 h, never a day, and nothing panics.
#[tokio::test(start_paused = true)]
async fn an_unbounded_cap_gives_the_top_of_the_histogram_at_most() {
    let api = Api::new(|_| DAY);
    let (layer, h) = HedgeLayer::new()
        .with_delay_bounds(Duration::ZERO, Duration::MAX)
        .pair();
    let svc = layer.layer(api.service());
    warm_together(&svc, 160).await;
    let five_hours = Duration::from_secs(5 * 3600);
    let p = h.latency_percentile(HOST, 0.5).expect("a percentile");
    assert!(p <= five_hours, "the percentile of the top bucket: {p:?}");
    let d = delay(&h).expect("a delay");
    assert!(d <= five_hours, "the delay: {d:?}");
    assert!(d >= Duration::from_secs(4 * 3600), "the delay: {d:?}");
    let (hedged, _) = hedge_after(&api, &svc, DAY).await;
    let hedged = hedged.expect("not hedged");
    assert!(
        hedged <= d + Duration::from_millis(2),
        "{hedged:?} vs {d:?}"
    );
}

/// The cap holds when the percentile is set to its extremes.
#[tokio::test(start_paused = true)]
async fn extreme_percentiles_stay_within_the_bounds() {
    for q in [f64::MIN_POSITIVE, 1e-9, 0.5, 1.0 - f64::EPSILON] {
        let api = Api::new(|i| Duration::from_millis(1 + (i as u64 % 7) * 3_600_000));
        let (layer, h) = HedgeLayer::new()
            .with_percentile(q)
            .unwrap_or_else(|e| panic!("{q}: {e}"))
            .with_delay_bounds(Duration::from_millis(3), Duration::from_millis(700))
            // One window for the whole warm-up, whose answers spread over six hours.
            .with_window(Duration::from_secs(86_400))
            .pair();
        let svc = layer.layer(api.service());
        warm_together(&svc, 160).await;
        let d = delay(&h).unwrap_or_else(|| panic!("{q}: no delay"));
        assert!(
            d >= Duration::from_millis(3) && d <= Duration::from_millis(700),
            "{q}: {d:?}"
        );
    }
}

/// A `max` below `min` is taken as `min`, with latencies past the histogram as well.
#[tokio::test(start_paused = true)]
async fn max_below_min_is_min_with_huge_latencies() {
    let api = Api::new(|_| DAY);
    let (layer, h) = HedgeLayer::new()
        .with_delay_bounds(Duration::from_millis(400), Duration::from_millis(1))
        .pair();
    let svc = layer.layer(api.service());
    warm_together(&svc, 160).await;
    assert_eq!(delay(&h), Some(Duration::from_millis(400)));
    let (hedged, _) = hedge_after(&api, &svc, DAY).await;
    let hedged = hedged.expect("not hedged");
    assert!(
        hedged >= Duration::from_millis(400) && hedged <= Duration::from_millis(402),
        "{hedged:?}"
    );
}

/// After a window of day-long calls, a host that turns quick gets a quick delay again once
/// the old window is gone ("covers the last 10 to 20 s"), never above the cap meanwhile.
#[tokio::test(start_paused = true)]
async fn the_delay_follows_a_host_that_recovers_and_stays_capped() {
    let api = Api::new(|_| DAY);
    let (layer, h) = HedgeLayer::new().with_window(Duration::from_secs(1)).pair();
    let svc = layer.layer(api.service());
    warm_together(&svc, 160).await;
    assert!(delay(&h).unwrap() <= Duration::from_secs(10));
    api.set(|_| Duration::from_millis(5));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        svc.clone().oneshot(get()).await.unwrap();
        if let Some(d) = delay(&h) {
            assert!(d <= Duration::from_secs(10), "{d:?}");
        }
    }
    let d = delay(&h).expect("a delay");
    assert!(
        d <= Duration::from_millis(7),
        "still on the old window: {d:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile settings.

#[test]
fn nan_and_infinite_settings_are_config_errors() {
    for r in [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1e-300,
        1.0 + f64::EPSILON,
    ] {
        let err = HedgeLayer::new()
            .with_budget(r, 1)
            .err()
            .unwrap_or_else(|| panic!("with_budget({r}) was accepted"));
        assert_eq!(*err.kind(), ErrorKind::Config, "{r}");
    }
    for q in [f64::NAN, f64::INFINITY, 0.0, 1.0, -0.0] {
        let err = HedgeLayer::new()
            .with_percentile(q)
            .err()
            .unwrap_or_else(|| panic!("with_percentile({q}) was accepted"));
        assert_eq!(*err.kind(), ErrorKind::Config, "{q}");
    }
}

#[tokio::test(start_paused = true)]
async fn percentiles_out_of_range_are_none() {
    let api = Api::new(|_| Duration::from_millis(5));
    let (layer, h) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    warm_together(&svc, 20).await;
    assert!(h.latency_percentile(HOST, 0.5).is_some());
    for q in [f64::NAN, 0.0, 1.0, -0.5, 2.0, f64::INFINITY] {
        assert_eq!(h.latency_percentile(HOST, q), None, "{q}");
    }
    assert_eq!(h.latency_percentile("other.example.com", 0.5), None);
}

/// A burst of `u32::MAX` with a ratio of 1.0, and `u64::MAX` samples required: no overflow, no
/// panic; the first never spends more than one hedge per call plus the burst, the second never
/// hedges.
#[tokio::test(start_paused = true)]
async fn huge_budget_and_sample_counts_do_not_overflow() {
    let api = Api::new(|_| Duration::from_millis(10));
    let (layer, h) = HedgeLayer::new()
        .with_budget(1.0, u32::MAX)
        .unwrap()
        .with_min_samples(1)
        .with_delay_bounds(Duration::from_millis(1), Duration::from_millis(1))
        .pair();
    let svc = layer.layer(api.service());
    for _ in 0..50 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let s = h.stats(HOST).unwrap();
    assert!(
        s.hedges() <= s.calls(),
        "{} hedges for {} calls",
        s.hedges(),
        s.calls()
    );
    assert!(
        s.hedges() >= 40,
        "a full budget and a 1 ms delay: {} hedges",
        s.hedges()
    );

    let api = Api::new(|_| Duration::from_millis(10));
    let (layer, h) = HedgeLayer::new()
        .with_min_samples(u64::MAX)
        .with_delay_bounds(Duration::ZERO, Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    for _ in 0..50 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let s = h.stats(HOST).unwrap();
    assert_eq!((s.hedges(), s.delay()), (0, None));
}

// ---------------------------------------------------------------------------------------------
// Composition: a kept service over Buffer and ConcurrencyLimit(1), calls dropped.

#[tokio::test(start_paused = true)]
async fn a_kept_service_over_a_limit_of_one_survives_dropped_hedged_calls() {
    let api = Api::new(|_| Duration::from_millis(10));
    let (layer, h) = HedgeLayer::new()
        .with_min_samples(1)
        .with_budget(1.0, 1_000)
        .unwrap()
        .with_delay_bounds(Duration::from_millis(10), Duration::from_millis(10))
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .buffer(4)
        .concurrency_limit(1)
        .service(api.service());
    for _ in 0..20 {
        svc.ready().await.unwrap().call(get()).await.unwrap();
    }
    assert!(delay(&h).is_some());
    // Slow first copies (a day), dropped at seeded moments around the hedge delay: each drop
    // must give the permit back, or the next call waits a day.
    let mut seed = 0x5eed_u64;
    for round in 0..12 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let cut = Duration::from_micros((seed >> 33) % 30_000);
        api.set(|_| DAY);
        let fut = svc.ready().await.unwrap().call(get());
        let r = tokio::time::timeout(cut, fut).await;
        assert!(
            r.is_err(),
            "round {round}: a day-long call answered within {cut:?}"
        );
        api.set(|_| Duration::from_millis(2));
        let t0 = Instant::now();
        let fut = svc.ready().await.unwrap().call(get());
        tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .unwrap_or_else(|_| {
                panic!("round {round} (cut at {cut:?}): the permit was not given back")
            })
            .unwrap();
        assert!(
            t0.elapsed() <= Duration::from_millis(50),
            "round {round}: {:?}",
            t0.elapsed()
        );
    }
    let s = h.stats(HOST).unwrap();
    assert!(s.hedges() <= s.calls());
}

/// `with_window` and `with_delay_bounds` below a microsecond (not zero): no division by zero,
/// no panic, calls still answered.
#[tokio::test(start_paused = true)]
async fn sub_microsecond_hedge_settings_do_not_panic() {
    for d in [Duration::from_nanos(1), Duration::from_nanos(999)] {
        let (layer, h) = HedgeLayer::new()
            .with_window(d)
            .with_delay_bounds(d, d)
            .with_min_samples(1)
            .pair();
        let svc = layer.layer(tower::service_fn(|_r: Request<()>| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        for _ in 0..40 {
            svc.clone()
                .oneshot(Request::get("http://h.example/").body(()).unwrap())
                .await
                .unwrap();
        }
        let s = h.stats("h.example").unwrap();
        assert_eq!(s.calls(), 40, "{d:?}");
        assert!(s.hedges() <= 40, "{d:?}");
    }
}
