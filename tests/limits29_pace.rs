//! What happens when a pause ends, as docs/guides/ratelimit.md describes it: slow start, a release
//! pace, the pace learned from bare 429s, and places given back by released calls that fail,
//! are dropped or panic. Also the hedge delay's sample rules from docs/guides/hedge.md.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::core::{BoxError, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::RateLimitLayer;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

type Plan = Arc<dyn Fn(usize) -> Step + Send + Sync>;

#[derive(Clone, Copy)]
enum Step {
    /// Answer `status` after `ms`, with `retry-after` when given.
    Answer(u64, u16, Option<u64>),
    /// Never answer.
    Hang,
    /// Panic in the response future.
    Panic,
}

/// An API following `plan` per call index; records when each call started and the peak in
/// flight.
#[derive(Clone)]
struct Api {
    n: Arc<AtomicUsize>,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    starts: Arc<Mutex<Vec<Duration>>>,
    origin: Instant,
    plan: Plan,
}

impl Api {
    fn new(plan: impl Fn(usize) -> Step + Send + Sync + 'static) -> Self {
        Self {
            n: Arc::default(),
            now: Arc::default(),
            peak: Arc::default(),
            starts: Arc::default(),
            origin: Instant::now(),
            plan: Arc::new(plan),
        }
    }

    fn service(
        &self,
    ) -> impl Service<Request<()>, Response = Response<()>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let api = self.clone();
        service_fn(move |_r: Request<()>| {
            let i = api.n.fetch_add(1, Ordering::SeqCst);
            api.starts.lock().unwrap().push(api.origin.elapsed());
            let step = (api.plan)(i);
            let now = api.now.clone();
            let peak = api.peak.clone();
            async move {
                let cur = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(cur, Ordering::SeqCst);
                struct Dec(Arc<AtomicUsize>);
                impl Drop for Dec {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _dec = Dec(now);
                match step {
                    Step::Answer(ms, status, ra) => {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        let mut b = Response::builder().status(status);
                        if let Some(ra) = ra {
                            b = b.header("retry-after", ra.to_string());
                        }
                        Ok::<_, BoxError>(b.body(()).unwrap())
                    }
                    Step::Hang => std::future::pending().await,
                    Step::Panic => panic!("the inner service panicked"),
                }
            }
        })
    }

    fn starts(&self) -> Vec<Duration> {
        self.starts.lock().unwrap().clone()
    }
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn slow_start_releases_one_then_doubles_per_round_trip() {
    let api = Api::new(|i| {
        if i == 0 {
            Step::Answer(0, 429, Some(1))
        } else {
            Step::Answer(10, 200, None)
        }
    });
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let tasks: Vec<_> = (0..15)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let starts: Vec<_> = api.starts()[1..]
        .iter()
        .map(|d| d.as_millis() as u64)
        .collect();
    // 1 at 1000 ms, 2 at 1010, 4 at 1020, 8 at 1030 (one round trip, 10 ms, apart).
    let mut expect = vec![1000];
    expect.extend([1010; 2]);
    expect.extend([1020; 4]);
    expect.extend([1030; 8]);
    assert_eq!(starts, expect);
}

#[tokio::test(start_paused = true)]
async fn a_release_pace_spaces_the_waiting_calls() {
    let api = Api::new(|i| {
        if i == 0 {
            Step::Answer(0, 429, Some(1))
        } else {
            Step::Answer(0, 200, None)
        }
    });
    let svc = RateLimitLayer::adaptive_only()
        .with_release_pace(Duration::from_millis(100))
        .layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let starts: Vec<_> = api.starts()[1..].iter().map(|d| d.as_millis()).collect();
    assert_eq!(starts, [1000, 1100, 1200, 1300, 1400]);
}

#[tokio::test(start_paused = true)]
async fn a_zero_release_pace_lets_all_go_at_once() {
    let api = Api::new(|i| {
        if i == 0 {
            Step::Answer(0, 429, Some(1))
        } else {
            Step::Answer(10, 200, None)
        }
    });
    let svc = RateLimitLayer::adaptive_only()
        .with_release_pace(Duration::ZERO)
        .layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let tasks: Vec<_> = (0..6)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(api.peak.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn a_released_call_that_is_dropped_gives_its_place_back() {
    let api = Api::new(|i| match i {
        0 => Step::Answer(0, 429, Some(1)),
        1 => Step::Hang,
        _ => Step::Answer(10, 200, None),
    });
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let first = tokio::spawn(svc.clone().oneshot(get("a.test")));
    settle().await;
    let rest: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        api.starts().len(),
        2,
        "slow start: the hanging call is out alone"
    );
    first.abort();
    let _ = first.await;
    let start = Instant::now();
    for t in rest {
        t.await.unwrap().unwrap();
    }
    assert!(
        start.elapsed() <= Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_released_call_that_panics_gives_its_place_back() {
    let api = Api::new(|i| match i {
        0 => Step::Answer(0, 429, Some(1)),
        1 => Step::Panic,
        _ => Step::Answer(10, 200, None),
    });
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let first = tokio::spawn(svc.clone().oneshot(get("a.test")));
    settle().await;
    let rest: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    assert!(first.await.unwrap_err().is_panic());
    let start = Instant::now();
    for t in rest {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("not stuck behind the panicked call")
            .unwrap()
            .unwrap();
    }
    assert!(
        start.elapsed() <= Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_released_call_that_fails_gives_its_place_back() {
    let api = Api::new(|i| match i {
        0 => Step::Answer(0, 429, Some(1)),
        1 => Step::Answer(10, 500, None),
        _ => Step::Answer(10, 200, None),
    });
    let svc = RateLimitLayer::adaptive_only().layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("not stuck")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn zero_max_wait_during_a_pause_is_refused_with_the_time_left() {
    let api = Api::new(|i| {
        if i == 0 {
            Step::Answer(0, 429, Some(10))
        } else {
            Step::Answer(0, 200, None)
        }
    });
    let layer = RateLimitLayer::adaptive_only();
    layer
        .clone()
        .layer(api.service())
        .oneshot(get("a.test"))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(4)).await;
    let err = layer
        .with_max_wait(Duration::ZERO)
        .layer(api.service())
        .oneshot(get("a.test"))
        .await
        .unwrap_err();
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert_eq!(rl.retry_after(), Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn a_bare_429_at_the_learned_pace_halves_the_rate() {
    let api = Api::new(|i| {
        if i <= 1 {
            Step::Answer(0, 429, None)
        } else {
            Step::Answer(0, 200, None)
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(
        handle.learned_pace("a.test"),
        Some(Duration::from_millis(125))
    );
    // The next call waits out the pause, is sent at the pace and meets a bare 429 again.
    svc.clone().oneshot(get("a.test")).await.unwrap();
    assert_eq!(
        handle.learned_pace("a.test"),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        handle.pause("a.test"),
        Some(Duration::from_millis(250)),
        "paused for one interval of the new pace only"
    );
}

#[tokio::test(start_paused = true)]
async fn halving_stops_at_one_call_per_pause() {
    let api = Api::new(|_| Step::Answer(0, 429, None));
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api.service());
    for _ in 0..12 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(handle.learned_pace("a.test"), Some(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn a_success_makes_the_pace_a_sixteenth_faster() {
    let api = Api::new(|i| {
        if i == 0 {
            Step::Answer(0, 429, None)
        } else {
            Step::Answer(0, 200, None)
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get("a.test")).await.unwrap();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let pace = handle.learned_pace("a.test").unwrap();
    assert!(
        pace >= Duration::from_micros(117_000) && pace <= Duration::from_micros(117_700),
        "125 ms a sixteenth faster: {pace:?}"
    );
    // Many successes: under 1 ms the pace is forgotten.
    for _ in 0..200 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(handle.learned_pace("a.test"), None);
}

#[tokio::test(start_paused = true)]
async fn bare_429s_answering_calls_sent_before_the_pause_change_nothing() {
    let api = Api::new(|i| Step::Answer(10 + i as u64, 429, None));
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api.service());
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("a.test"))))
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // The first 429 came back at 10 ms and paused 1 s; the others (11 to 14 ms) changed nothing.
    assert_eq!(
        handle.learned_pace("a.test"),
        Some(Duration::from_millis(125))
    );
    let left = handle.pause("a.test").unwrap();
    assert_eq!(left, Duration::from_millis(1_010 - 14));
}

#[tokio::test(start_paused = true)]
async fn hedge_failed_calls_are_not_recorded() {
    let api = Api::new(|i| {
        if i % 2 == 0 {
            Step::Answer(5, 200, None)
        } else {
            Step::Answer(5, 500, None)
        }
    });
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..10 {
        let _ = svc.clone().oneshot(get("a.test")).await;
    }
    // A 500 is an answer (a response), so all ten are recorded; errors are not.
    assert_eq!(handle.stats("a.test").unwrap().samples(), 10);
    let err_api = service_fn(|_r: Request<()>| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Err::<Response<()>, BoxError>("down".into())
    });
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(err_api);
    for _ in 0..10 {
        let _ = svc.clone().oneshot(get("a.test")).await;
    }
    assert_eq!(handle.stats("a.test").map_or(0, |s| s.samples()), 0);
}

#[tokio::test(start_paused = true)]
async fn hedge_needs_one_hundred_samples_by_default() {
    let api = Api::new(|_| Step::Answer(5, 200, None));
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..99 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(handle.stats("a.test").unwrap().delay(), None);
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let delay = handle.stats("a.test").unwrap().delay();
    assert!(
        delay.is_some_and(|d| d >= Duration::from_millis(5) && d <= Duration::from_micros(5_700)),
        "the p95 of 5 ms calls, to the top of its bucket: {delay:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn hedge_instant_answers_count_zero_and_the_delay_is_the_minimum() {
    let (layer, handle) = HedgeLayer::new().with_min_samples(10).pair();
    let svc = layer.layer(service_fn(|_r: Request<()>| async {
        Ok::<_, BoxError>(Response::new(()))
    }));
    for _ in 0..10 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert_eq!(
        handle.stats("a.test").unwrap().delay(),
        Some(Duration::from_millis(1))
    );
}

#[tokio::test(start_paused = true)]
async fn hedge_delay_is_forgotten_after_two_quiet_windows() {
    let api = Api::new(|_| Step::Answer(5, 200, None));
    let (layer, handle) = HedgeLayer::new().with_min_samples(10).pair();
    let svc = layer.layer(api.service());
    for _ in 0..10 {
        svc.clone().oneshot(get("a.test")).await.unwrap();
    }
    assert!(handle.stats("a.test").unwrap().delay().is_some());
    tokio::time::advance(Duration::from_secs(25)).await;
    assert_eq!(handle.stats("a.test").map(|s| s.delay()), Some(None));
}
