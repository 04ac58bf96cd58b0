//! s37: hedging (`sturdy-hedge`, docs/guides/hedge.md and its rustdoc) tested from outside, on
//! paused time against in-process services.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::events::Event;
use sturdy::core::BoxError;
use sturdy::hedge::HedgeLayer;
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

/// A request body that counts its clones.
#[derive(Debug)]
struct CountBody(Arc<AtomicUsize>);

impl Clone for CountBody {
    fn clone(&self) -> Self {
        self.0.fetch_add(1, Ordering::SeqCst);
        Self(self.0.clone())
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A service whose n-th call (from 0) sleeps `script(n)` ms, then answers 200; counts calls
/// started and futures dropped before they answered.
#[derive(Clone)]
struct Api {
    started: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    script: Arc<dyn Fn(usize) -> u64 + Send + Sync>,
}

struct Guard(Arc<AtomicUsize>, bool);
impl Drop for Guard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Api {
    fn new(script: impl Fn(usize) -> u64 + Send + Sync + 'static) -> Self {
        Self {
            started: Arc::default(),
            dropped: Arc::default(),
            script: Arc::new(script),
        }
    }

    fn service<B: Send + 'static>(
        &self,
    ) -> impl Service<Request<B>, Response = Response<()>, Error = BoxError, Future = impl Send>
           + Clone
           + Send
           + 'static {
        let api = self.clone();
        service_fn(move |_req: Request<B>| {
            let i = api.started.fetch_add(1, Ordering::SeqCst);
            let wait = (api.script)(i);
            let guard = Guard(api.dropped.clone(), false);
            async move {
                let mut guard = guard;
                if wait > 0 {
                    tokio::time::sleep(ms(wait)).await;
                }
                guard.1 = true;
                Ok::<_, BoxError>(Response::new(()))
            }
        })
    }

    fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

/// docs/guides/hedge.md: "A call keeps a copy of its request only when the host has a delay and a
/// whole token at the moment of the call". A POST, a GET before the host has a delay and a GET
/// with no token keep no copy (the body is never cloned); a GET with both keeps one.
#[tokio::test(start_paused = true)]
async fn s37_a_copy_is_kept_only_with_a_delay_and_a_token() {
    let clones = Arc::new(AtomicUsize::new(0));
    let body = || CountBody(clones.clone());
    let api = Api::new(|_| 10);
    let (layer, handle) = HedgeLayer::new().with_min_samples(5).pair();
    let svc = layer.layer(api.service::<CountBody>());
    let req = |m: &str| {
        Request::builder()
            .method(m)
            .uri("http://api.example.com/x")
            .body(body())
            .unwrap()
    };
    for _ in 0..5 {
        svc.clone().oneshot(req("GET")).await.unwrap();
    }
    assert_eq!(clones.load(Ordering::SeqCst), 0, "GETs before the delay");
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());
    svc.clone().oneshot(req("POST")).await.unwrap();
    assert_eq!(clones.load(Ordering::SeqCst), 0, "a POST is never copied");
    svc.clone().oneshot(req("GET")).await.unwrap();
    assert_eq!(
        clones.load(Ordering::SeqCst),
        1,
        "a GET with delay and token"
    );

    // No token: ratio 0 and burst 0.
    clones.store(0, Ordering::SeqCst);
    let svc = HedgeLayer::new()
        .with_min_samples(5)
        .with_budget(0.0, 0)
        .unwrap()
        .layer(api.service::<CountBody>());
    for _ in 0..8 {
        svc.clone().oneshot(req("GET")).await.unwrap();
    }
    assert_eq!(clones.load(Ordering::SeqCst), 0, "no token, no copy");
}

/// docs/guides/hedge.md: "Nothing is hedged until the recent windows hold 100 samples
/// (`.with_min_samples(n)`)" and `HedgeStats::delay`: "`None` while the recent windows hold
/// fewer samples than the minimum". At exactly n samples the delay is there, for n = 5, 37, 100.
#[tokio::test(start_paused = true)]
async fn s37_the_delay_appears_at_exactly_min_samples() {
    for n in [5u64, 37, 100] {
        let api = Api::new(|_| 10);
        let (layer, handle) = HedgeLayer::new().with_min_samples(n).pair();
        let svc = layer.layer(api.service::<()>());
        for i in 0..n {
            svc.clone()
                .oneshot(get("http://api.example.com/x"))
                .await
                .unwrap();
            let stats = handle.stats("api.example.com").unwrap();
            if i + 1 < n {
                assert_eq!(stats.delay(), None, "n={n} after {} samples", i + 1);
            } else {
                assert_eq!(stats.samples(), n);
                assert!(stats.delay().is_some(), "n={n}: no delay at {n} samples");
            }
        }
    }
}

/// docs/guides/hedge.md: "A call answered without ever waiting (its future ready on the first
/// poll) counts as zero" and "The delay is never shorter than 1 ms nor longer than 10 s
/// (`.with_delay_bounds(min, max)`)": instant answers give the lower bound as the delay.
#[tokio::test(start_paused = true)]
async fn s37_instant_answers_count_as_zero_and_give_the_minimum_delay() {
    let api = Api::new(|_| 0);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(20)
        .with_delay_bounds(ms(7), Duration::from_secs(1))
        .pair();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..20 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    let stats = handle.stats("api.example.com").unwrap();
    assert_eq!(stats.samples(), 20);
    assert_eq!(stats.delay(), Some(ms(7)));
    assert_eq!(
        handle.latency_percentile("api.example.com", 0.95),
        Some(Duration::ZERO)
    );
}

/// docs/guides/hedge.md: "The delay is never shorter than 1 ms nor longer than 10 s
/// (`.with_delay_bounds(min, max)`)": slow hosts get the upper bound.
#[tokio::test(start_paused = true)]
async fn s37_the_delay_is_capped_by_the_upper_bound() {
    let api = Api::new(|_| 2_000);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(3)
        .with_delay_bounds(ms(1), ms(50))
        .pair();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..3 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    assert_eq!(
        handle.stats("api.example.com").unwrap().delay(),
        Some(ms(50))
    );

    // Default bounds: a host taking 20 s gets 10 s.
    let api = Api::new(|_| 20_000);
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(3)
        .with_window(Duration::from_secs(600))
        .pair();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..3 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    assert_eq!(
        handle.stats("api.example.com").unwrap().delay(),
        Some(Duration::from_secs(10))
    );
}

/// `HedgeHandle::latency_percentile`: "A percentile (strictly between 0.0 and 1.0) ... `None`
/// without samples or for a percentile out of range."
#[tokio::test(start_paused = true)]
async fn s37_latency_percentile_out_of_range_is_none() {
    let api = Api::new(|_| 10);
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service::<()>());
    assert_eq!(handle.latency_percentile("api.example.com", 0.5), None);
    for _ in 0..4 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    for q in [
        0.0,
        1.0,
        -0.5,
        1.5,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ] {
        assert_eq!(
            handle.latency_percentile("api.example.com", q),
            None,
            "q={q}"
        );
    }
    let p = handle.latency_percentile("api.example.com", 0.5).unwrap();
    assert!(p >= ms(10) && p <= ms(12), "{p:?}");
    assert_eq!(handle.latency_percentile("other.example.com", 0.5), None);
}

/// `HedgeHandle::stats`: "The figures of `key` (the host, `authority` form such as
/// `api.example.com:8080`)"; `HedgeStats::calls`: "Hedgeable calls seen (GET, HEAD, OPTIONS ...)";
/// `extra_ratio`: "0.0 before the first call".
#[tokio::test(start_paused = true)]
async fn s37_stats_are_keyed_by_authority_and_count_hedgeable_calls_only() {
    let api = Api::new(|_| 1);
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service::<()>());
    assert!(handle.stats("api.example.com:8080").is_none());
    assert!(handle.all().is_empty());
    for m in ["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"] {
        let req = Request::builder()
            .method(m)
            .uri("http://api.example.com:8080/x")
            .body(())
            .unwrap();
        svc.clone().oneshot(req).await.unwrap();
    }
    let stats = handle
        .stats("api.example.com:8080")
        .expect("keyed by authority");
    assert_eq!(stats.calls(), 3);
    assert_eq!(stats.hedges(), 0);
    assert_eq!(stats.extra_ratio(), 0.0);
    assert!(handle.stats("api.example.com").is_none());
    let keys: Vec<String> = handle.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com:8080"]);
}

/// docs/guides/hedge.md: "the second goes to a clone, driven to readiness when the hedge is
/// due" and `Armed`'s contract that a hedge whose service fails is not sent; "Errors: none of its
/// own". A clone whose `poll_ready` fails when the hedge is due sends no hedge, and the first copy
/// still answers the call.
#[tokio::test(start_paused = true)]
async fn s37_a_hedge_whose_clone_fails_readiness_leaves_the_first_copy_to_answer() {
    let (mock, mut mh) = tower_test::mock::pair::<Request<()>, Response<()>>();
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(3)
        .with_delay_bounds(ms(5), ms(5))
        .pair();
    let svc = layer.layer(mock);
    // Warm: three answered calls.
    for _ in 0..3 {
        mh.allow(1);
        let call = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/x")));
        let (_req, send) = mh.next_request().await.unwrap();
        send.send_response(Response::new(()));
        call.await.unwrap().unwrap();
    }
    assert_eq!(
        handle.stats("api.example.com").unwrap().delay(),
        Some(ms(5))
    );
    mh.allow(1);
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get("http://api.example.com/x")));
    tokio_test::assert_pending!(call.poll());
    let (_req, send) = mh.next_request().await.unwrap();
    mh.send_error("pool closed");
    tokio::time::advance(ms(6)).await;
    tokio_test::assert_pending!(call.poll());
    tokio::time::advance(ms(6)).await;
    tokio_test::assert_pending!(call.poll());
    send.send_response(Response::builder().status(203).body(()).unwrap());
    let res = tokio_test::assert_ready!(call.poll()).expect("the first copy answers");
    assert_eq!(res.status(), 203);
    assert_eq!(handle.stats("api.example.com").unwrap().hedges(), 0);
}

/// docs/guides/hedge.md: "A dropped call drops both copies" and (Where it goes) "the loser is
/// dropped, which gives its slot and its place back". Over an adaptive concurrency limit, a hedged
/// call dropped while both copies run gives both places back.
#[tokio::test(start_paused = true)]
async fn s37_dropping_a_hedged_call_with_both_copies_in_flight_frees_both_places() {
    let api = Api::new(|i| if i < 5 { 10 } else { 10_000 });
    let (conc, ch) = AdaptiveConcurrencyLayer::new().pair();
    let (layer, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .pair();
    let svc = layer.layer(conc.layer(api.service::<()>()));
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get("http://api.example.com/x")));
    tokio_test::assert_pending!(call.poll());
    tokio::time::advance(ms(25)).await;
    tokio_test::assert_pending!(call.poll());
    assert_eq!(api.started(), 7, "first copy and hedge started");
    assert_eq!(hh.stats("api.example.com").unwrap().hedges(), 1);
    assert_eq!(ch.state("api.example.com").unwrap().in_flight(), 2);
    drop(call);
    assert_eq!(api.dropped(), 2, "both copies dropped");
    assert_eq!(ch.state("api.example.com").unwrap().in_flight(), 0);
    assert_eq!(ch.limit("api.example.com"), Some(20), "a drop says nothing");
}

/// `HedgeLayer::with_idempotency_header`: "The header `with_keyed_requests` looks for
/// [`idempotency-key`]": with another header named, a POST keyed under the default name is not
/// hedged and one keyed under the named header is.
#[tokio::test(start_paused = true)]
async fn s37_keyed_requests_follow_the_configured_header() {
    let api = Api::new(|i| if i == 5 || i == 6 { 1_000 } else { 10 });
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .with_keyed_requests(true)
        .with_idempotency_header(http::HeaderName::from_static("x-op-key"))
        .pair();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    let post = |h: &str| {
        Request::post("http://api.example.com/x")
            .header(h, "op-1")
            .body(())
            .unwrap()
    };
    let start = Instant::now();
    svc.clone().oneshot(post("idempotency-key")).await.unwrap();
    assert!(start.elapsed() >= ms(1_000), "not hedged");
    assert_eq!(api.started(), 6);
    let start = Instant::now();
    svc.clone().oneshot(post("x-op-key")).await.unwrap();
    assert!(start.elapsed() < ms(100), "hedged: {:?}", start.elapsed());
    assert_eq!(api.started(), 8);
    assert_eq!(handle.stats("api.example.com").unwrap().hedges(), 1);
}

/// `HedgeLayer::on_event`: "Calls `f` with an Event for every second copy sent (`HedgeSent`) and
/// every second copy that answered first (`HedgeWon`)"; `with_key`: "Events then carry the key but
/// no host (`host: None`)". A hedge that loses emits `HedgeSent` only.
#[tokio::test(start_paused = true)]
async fn s37_events_with_a_custom_key_and_a_losing_hedge() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    // Call 5 takes 30 ms (hedged at 20, copy takes 1 s: the first wins); call 7 takes 1 s
    // (hedged at 20, the copy takes 10 ms: the hedge wins).
    let api = Api::new(|i| match i {
        5 => 30,
        6 => 1_000,
        7 => 1_000,
        _ => 10,
    });
    let layer = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .on_event(move |e| {
            let line = match e {
                Event::HedgeSent { key, host } => format!("sent {key} {host:?}"),
                Event::HedgeWon { key, host } => format!("won {key} {host:?}"),
                _ => return,
            };
            s.lock().unwrap().push(line);
        })
        .with_key(|_req: &Request<()>| "tenant-7".to_string());
    let handle = layer.handle();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    svc.clone()
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["sent tenant-7 None"]);
    svc.clone()
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "sent tenant-7 None",
            "sent tenant-7 None",
            "won tenant-7 None"
        ]
    );
    let stats = handle.stats("tenant-7").unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (2, 1));
}

/// docs/guides/hedge.md: "over two rotating windows of 10 s ..., so it follows a host whose
/// latency changes and covers the last 10 to 20 s" and "Nothing is hedged until the recent
/// windows hold 100 samples (`.with_min_samples(n)`)". After 25 s of quiet the recent windows
/// hold nothing: the delay reads None and the next slow call is not hedged.
#[tokio::test(start_paused = true)]
async fn s37_after_a_quiet_spell_nothing_is_hedged_until_samples_come_back() {
    let api = Api::new(|i| if i == 5 { 1_000 } else { 10 });
    let (layer, handle) = HedgeLayer::new().with_min_samples(5).pair();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    assert!(handle.stats("api.example.com").unwrap().delay().is_some());
    tokio::time::advance(Duration::from_secs(25)).await;
    let stats = handle.stats("api.example.com").unwrap();
    assert_eq!((stats.samples(), stats.delay()), (0, None));
    let start = Instant::now();
    svc.clone()
        .oneshot(get("http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(api.started(), 6, "no hedge on a forgotten delay");
    assert!(start.elapsed() >= ms(1_000));
    assert_eq!(handle.stats("api.example.com").unwrap().hedges(), 0);
}

/// docs/guides/hedge.md: "at most 1,024 hosts (`.with_max_hosts(n)`; hosts with no call in the
/// last two windows are forgotten first; past the bound, new hosts share one overflow state,
/// listed as `*` by `handle.all()`)".
#[tokio::test(start_paused = true)]
async fn s37_host_bound_overflow_then_forgetting_quiet_hosts() {
    let api = Api::new(|_| 10);
    let (layer, handle) = HedgeLayer::new()
        .with_max_hosts(1)
        .with_window(Duration::from_secs(1))
        .pair();
    let svc = layer.layer(api.service::<()>());
    svc.clone()
        .oneshot(get("http://a.example.com/"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(get("http://b.example.com/"))
        .await
        .unwrap();
    let keys: Vec<String> = handle.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["*", "a.example.com"]);
    assert_eq!(
        handle.stats("b.example.com").unwrap().calls(),
        1,
        "overflow"
    );
    tokio::time::advance(Duration::from_secs(5)).await;
    svc.clone()
        .oneshot(get("http://c.example.com/"))
        .await
        .unwrap();
    let all = handle.all();
    let keys: Vec<&str> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"c.example.com"), "{keys:?}");
    assert!(!keys.contains(&"a.example.com"), "{keys:?}");
}

/// docs/guides/hedge.md: "A call keeps a copy of its request only when the host has a delay and a
/// whole token at the moment of the call; a hedge that finds the budget spent when it is due is
/// not sent." Two slow calls at once with one token: both keep a copy, one hedge is sent.
#[tokio::test(start_paused = true)]
async fn s37_one_token_two_slow_calls_one_hedge() {
    let api = Api::new(|i| if i == 5 || i == 6 { 1_000 } else { 10 });
    let (layer, handle) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .with_budget(0.0, 1)
        .unwrap()
        .pair();
    let svc = layer.layer(api.service::<()>());
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    let a = svc.clone().oneshot(get("http://api.example.com/x"));
    let b = svc.clone().oneshot(get("http://api.example.com/x"));
    let start = Instant::now();
    let (ra, rb) = tokio::join!(a, b);
    ra.unwrap();
    rb.unwrap();
    assert_eq!(handle.stats("api.example.com").unwrap().hedges(), 1);
    assert_eq!(api.started(), 8);
    assert!(start.elapsed() >= ms(1_000), "the unhedged one waited");
}

/// docs/guides/hedge.md: "A dropped call drops both copies"; concurrency.md: "A dropped waiting
/// call leaves the line; a dropped call in flight gives its permit back". Over an adaptive limit
/// of one, a hedged call dropped at each point (before its first poll, while the hedge timer
/// runs, while the hedge waits in line for a place) leaves nothing in flight or waiting.
#[tokio::test(start_paused = true)]
async fn s37_a_hedged_call_dropped_at_every_point_leaves_nothing() {
    let api = Api::new(|i| if i < 5 { 10 } else { 10_000 });
    let (conc, ch) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let (layer, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .with_budget(1.0, 10)
        .unwrap()
        .pair();
    let svc = layer.layer(conc.layer(api.service::<()>()));
    for _ in 0..5 {
        svc.clone()
            .oneshot(get("http://api.example.com/x"))
            .await
            .unwrap();
    }
    let idle = |what: &str| {
        let st = ch.state("api.example.com").unwrap();
        assert_eq!((st.in_flight(), st.waiting()), (0, 0), "{what}");
    };
    // Before the first poll.
    drop(svc.clone().oneshot(get("http://api.example.com/x")));
    idle("before the first poll");
    // While the hedge timer runs.
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get("http://api.example.com/x")));
    tokio_test::assert_pending!(call.poll());
    tokio::time::advance(ms(10)).await;
    tokio_test::assert_pending!(call.poll());
    assert_eq!(ch.state("api.example.com").unwrap().in_flight(), 1);
    drop(call);
    idle("while the hedge timer runs");
    // While the hedge waits in line behind the first copy.
    let mut call = tokio_test::task::spawn(svc.clone().oneshot(get("http://api.example.com/x")));
    tokio_test::assert_pending!(call.poll());
    tokio::time::advance(ms(25)).await;
    tokio_test::assert_pending!(call.poll());
    let st = ch.state("api.example.com").unwrap();
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (1, 1),
        "the hedge waits in line"
    );
    assert_eq!(hh.stats("api.example.com").unwrap().hedges(), 1);
    drop(call);
    idle("while the hedge waits in line");
    assert_eq!(
        api.dropped(),
        api.started() - 5,
        "every copy started was dropped"
    );
}

/// docs/guides/hedge.md: "over two rotating windows of 10 s ..., so it ... covers the last 10 to
/// 20 s"; `HedgeStats::samples`: "Latencies in the current and the previous window."
#[tokio::test(start_paused = true)]
async fn s37_samples_cover_the_current_and_the_previous_window() {
    let api = Api::new(|_| 10);
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api.service::<()>());
    let call = || svc.clone().oneshot(get("http://api.example.com/x"));
    for _ in 0..5 {
        call().await.unwrap();
    }
    let samples = || handle.stats("api.example.com").unwrap().samples();
    assert_eq!(samples(), 5);
    tokio::time::advance(Duration::from_secs(11)).await;
    for _ in 0..3 {
        call().await.unwrap();
    }
    assert_eq!(samples(), 8, "current and previous window");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(samples(), 3, "the first window is gone");
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(samples(), 0, "both gone");
}

/// `Event::HedgeSent`: "host: The host, when the layer keys by host (the default)"; hedge.md:
/// "past the bound, new hosts share one overflow state, listed as `*`". A hedge of a host past
/// the bound is reported with that host.
#[tokio::test(start_paused = true)]
async fn s37_a_hedge_past_the_host_bound_is_reported_with_its_host() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let api = Api::new(move |_| {
        // The 11th call (the first copy of b's slow call) is slow.
        if n.fetch_add(1, Ordering::SeqCst) == 10 {
            1_000
        } else {
            10
        }
    });
    let layer = HedgeLayer::new()
        .with_max_hosts(1)
        .with_min_samples(5)
        .with_delay_bounds(ms(20), ms(20))
        .on_event(move |e| {
            if let Event::HedgeSent { key, host } = e {
                s.lock().unwrap().push(format!("{key} {host:?}"));
            }
        });
    let svc = layer.layer(api.service::<()>());
    for host in ["a", "b"] {
        for _ in 0..5 {
            svc.clone()
                .oneshot(get(&format!("http://{host}.example.com/x")))
                .await
                .unwrap();
        }
    }
    svc.clone()
        .oneshot(get("http://b.example.com/x"))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("b.example.com"), "{seen:?}");
}
