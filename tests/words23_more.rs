//! More claims of the hedge, coalesce and adaptive concurrency docs: failed copies, a panicking
//! leader, handed-off large bodies, limit changes with calls in flight, the waiting line.
#![cfg(feature = "full")]

use std::io;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::{classify::delivery, Delivery, ErrorKind};
use tokio::time::{advance, Instant};
use tokio_test::task::spawn;
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

use crate::words23_layers::{get, hedge, within, Api, Plan, HOST};

async fn warm<S>(svc: &mut S, n: usize)
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    for i in 0..n {
        within(
            "warm",
            svc.ready().await.unwrap().call(get(&format!("/w{i}"))),
        )
        .await
        .unwrap();
    }
}

fn io_kind(err: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    sturdy::core::find::<io::Error>(err).map(io::Error::kind)
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_both_copies_fail_not_sent_never_hides_maybe_processed() {
    // First copy: reset after 100 ms (may have been processed); the hedge: refused at 200 ms.
    let api = Api::new(|uri, n| match (uri.contains("both"), n) {
        (true, 0) => Plan::Fail(100, io::ErrorKind::ConnectionReset),
        (true, _) => Plan::Fail(190, io::ErrorKind::ConnectionRefused),
        _ => Plan::After(10),
    });
    let (layer, handle) = hedge();
    let mut svc = layer.layer(api.clone());
    warm(&mut svc, 20).await;
    let err = within("both fail", svc.ready().await.unwrap().call(get("/both")))
        .await
        .unwrap_err();
    assert_eq!(handle.stats(HOST).unwrap().hedges(), 1);
    assert_eq!(
        io_kind(&*err),
        Some(io::ErrorKind::ConnectionReset),
        "{err}"
    );
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_one_copy_fails_call_waits_for_the_other() {
    let api = Api::new(|uri, n| match (uri.contains("one"), n) {
        (true, 0) => Plan::Fail(100, io::ErrorKind::ConnectionReset),
        (true, _) => Plan::After(300),
        _ => Plan::After(10),
    });
    let (layer, _handle) = hedge();
    let mut svc = layer.layer(api.clone());
    warm(&mut svc, 20).await;
    let res = within("one fails", svc.ready().await.unwrap().call(get("/one")))
        .await
        .expect("the hedge answered after the first copy failed");
    assert_eq!(res.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_dropped_while_hedge_waits_for_limit_one_permit() {
    let api = Api::new(|uri, _| {
        if uri.contains("never") {
            Plan::Never
        } else {
            Plan::After(10)
        }
    });
    let (layer, handle) = hedge();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(api.clone());
    warm(&mut svc, 20).await;
    let mut f = spawn(svc.ready().await.unwrap().call(get("/never")));
    assert!(f.poll().is_pending());
    advance(Duration::from_millis(200)).await;
    assert!(f.poll().is_pending());
    assert_eq!(
        api.live(),
        1,
        "the hedge waits for the permit the first copy holds"
    );
    drop(f);
    assert_eq!(api.live(), 0);
    let start = Instant::now();
    for i in 0..5 {
        within(
            "after",
            svc.ready().await.unwrap().call(get(&format!("/a{i}"))),
        )
        .await
        .unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(handle.stats(HOST).unwrap().hedges() <= 1);
}

#[tokio::test]
async fn words23_coalesce_leader_panics_inside_call_follower_gets_not_sent() {
    let entered = Arc::new(Barrier::new(2));
    let release = Arc::new(Barrier::new(2));
    let (e2, r2) = (entered.clone(), release.clone());
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        if req.uri().path() == "/p" {
            e2.wait();
            r2.wait();
            panic!("the inner service's call panicked");
        }
        async { Ok::<_, io::Error>(Response::new(Full::new(Bytes::from_static(b"x")))) }
    });
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api);
    let mut leader_svc = svc.clone();
    let leader = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            leader_svc.ready().await.unwrap();
        });
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(leader_svc.call(get("/p")));
        }));
        assert!(caught.is_err());
    });
    entered.wait();
    let mut follower_svc = svc.clone();
    let follower = follower_svc.ready().await.unwrap().call(get("/p"));
    release.wait();
    leader.join().unwrap();
    let err = within("follower of a panicked leader", follower)
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(handle.stats().joined(), 1);
    assert_eq!(handle.in_flight(HOST), 0);
    // The next call works.
    let res = within("after", svc.clone().oneshot(get("/ok")))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "x");
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_too_large_body_goes_to_a_follower_when_the_leader_left() {
    let api = Api::new(|_, _| Plan::After(50));
    let (layer, handle) = CoalesceLayer::new().with_max_body(0).pair();
    let mut svc = layer.layer(api.clone());
    let mut leader = spawn(svc.ready().await.unwrap().call(get("/big")));
    assert!(leader.poll().is_pending());
    let follower = svc.ready().await.unwrap().call(get("/big"));
    drop(leader);
    let res = within("follower", follower).await.unwrap();
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "payload"
    );
    let stats = handle.stats();
    assert_eq!(
        api.started(),
        1,
        "the follower took the leader's response: {stats:?}"
    );
    assert_eq!(stats.fallbacks(), 0, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_errors_shared_with_kind_and_message() {
    let api = Api::new(|_, _| Plan::Fail(20, io::ErrorKind::ConnectionReset));
    let svc = CoalesceLayer::new().layer(api.clone());
    let mut joins = Vec::new();
    for _ in 0..50 {
        joins.push(tokio::spawn(svc.clone().oneshot(get("/fail"))));
    }
    for j in joins {
        let err = within("shared failure", j).await.unwrap().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the call shared by identical requests in flight failed: "),
            "{err}"
        );
        assert_eq!(io_kind(&*err), Some(io::ErrorKind::ConnectionReset));
        assert!(sturdy::core::find::<sturdy::coalesce::SharedError>(&*err).is_some());
    }
    assert_eq!(api.started(), 1);
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_waiting_line_is_first_come_first_served() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o2 = order.clone();
    let api = Api::new(move |uri, _| {
        o2.lock()
            .unwrap()
            .push(uri.rsplit('/').next().unwrap().to_owned());
        Plan::After(10)
    });
    let svc = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .layer(api.clone());
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut f = spawn(svc.clone().oneshot(get(&format!("/{i}"))));
        assert!(f.poll().is_pending());
        calls.push(f);
    }
    for f in calls {
        within("in line", f).await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(order, want);
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_max_wait_expiry_reports_limit_reached() {
    let api = Api::new(|uri, _| {
        if uri.contains("never") {
            Plan::Never
        } else {
            Plan::After(10)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_millis(300))
        .pair();
    let svc = layer.layer(api.clone());
    let mut held = spawn(svc.clone().oneshot(get("/never")));
    assert!(held.poll().is_pending());
    let start = Instant::now();
    let err = within("expiry", svc.clone().oneshot(get("/x")))
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(400),
        "{waited:?}"
    );
    let reached = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached");
    assert_eq!((reached.key(), reached.limit()), (HOST, 1));
    assert!(reached.waited() >= Duration::from_millis(300));
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert!(
        matches!(e.kind(), ErrorKind::RateLimited { .. }),
        "{:?}",
        e.kind()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (1, 0));
    drop(held);
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_burst_of_503s_lowers_the_limit_once() {
    let api = Api::new(|_, _| Plan::Status(10, 503));
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api.clone());
    let mut joins = Vec::new();
    for i in 0..20 {
        joins.push(tokio::spawn(svc.clone().oneshot(get(&format!("/{i}")))));
    }
    for j in joins {
        let res = within("503", j).await.unwrap().unwrap();
        assert_eq!(res.status(), 503);
    }
    assert_eq!(handle.limit(HOST), Some(18), "20 × 0.9, once");
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_limit_down_then_up_with_calls_in_flight() {
    let api = Api::new(|_, _| Plan::After(100));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(10)
        .pair();
    let svc = layer.layer(api.clone());
    // Ten in flight.
    let mut first = Vec::new();
    for i in 0..10 {
        let mut f = spawn(svc.clone().oneshot(get(&format!("/a{i}"))));
        assert!(f.poll().is_pending());
        first.push(f);
    }
    assert_eq!(handle.state(HOST).unwrap().in_flight(), 10);
    handle.set_limit(HOST, 2);
    handle.set_limit(HOST, 10);
    for f in first {
        within("first wave", f).await.unwrap();
    }
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.limit(), st.in_flight(), st.waiting()), (10, 0, 0));
    // The retirement was cancelled: ten fit at once again.
    let before = api.max_live();
    let mut second = Vec::new();
    for i in 0..10 {
        let mut f = spawn(svc.clone().oneshot(get(&format!("/b{i}"))));
        assert!(f.poll().is_pending());
        second.push(f);
    }
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (10, 0), "{st:?}");
    for f in second {
        within("second wave", f).await.unwrap();
    }
    assert!(api.max_live() >= before);

    // Down with calls in flight: once they come back, only the new limit fits.
    let mut third = Vec::new();
    for i in 0..10 {
        let mut f = spawn(svc.clone().oneshot(get(&format!("/c{i}"))));
        assert!(f.poll().is_pending());
        third.push(f);
    }
    handle.set_limit(HOST, 3);
    for f in third {
        within("third wave", f).await.unwrap();
    }
    let mut fourth = Vec::new();
    for i in 0..6 {
        let mut f = spawn(svc.clone().oneshot(get(&format!("/d{i}"))));
        assert!(f.poll().is_pending());
        fourth.push(f);
    }
    // The successes of the third wave (admitted under load) may have raised the limit from 3
    // by about one per round trip; whatever it is now, no more than it are in flight.
    let st = handle.state(HOST).unwrap();
    assert!(st.limit() < 6, "{st:?}");
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (st.limit(), 6 - st.limit()),
        "{st:?}"
    );
    for f in fourth {
        within("fourth wave", f).await.unwrap();
    }
    let st = handle.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn words23_hedge_keyed_post_hedged_only_when_allowed() {
    let api = Api::new(|uri, n| {
        if uri.contains("slow") && n == 0 {
            Plan::After(1_000)
        } else {
            Plan::After(10)
        }
    });
    let (layer, handle) = sturdy::hedge::HedgeLayer::new()
        .with_min_samples(5)
        .with_keyed_requests(true)
        .pair();
    let mut svc = layer.layer(api.clone());
    warm(&mut svc, 20).await;
    let post = |path: &str, key: bool| {
        let mut b = Request::post(format!("http://{HOST}{path}"));
        if key {
            b = b.header("idempotency-key", "k-1");
        }
        b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };
    let start = Instant::now();
    within(
        "unkeyed",
        svc.ready().await.unwrap().call(post("/slow/1", false)),
    )
    .await
    .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(1_000),
        "a POST without a key is never hedged"
    );
    let start = Instant::now();
    within(
        "keyed",
        svc.ready().await.unwrap().call(post("/slow/2", true)),
    )
    .await
    .unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    let stats = handle.stats(HOST).unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (1, 1));
    assert_eq!(
        stats.calls(),
        21,
        "the unkeyed POST is not a hedgeable call"
    );
}

#[derive(Default)]
struct Tally {
    sent: std::sync::atomic::AtomicU64,
    won: std::sync::atomic::AtomicU64,
    joined: std::sync::atomic::AtomicU64,
    rejected: std::sync::atomic::AtomicU64,
}

fn tally_hook(t: &Arc<Tally>) -> impl Fn(&sturdy::core::events::Event<'_>) + Send + Sync + 'static {
    use std::sync::atomic::Ordering::SeqCst;
    use sturdy::core::events::Event;
    let t = t.clone();
    move |e: &Event<'_>| match e {
        Event::HedgeSent { .. } => {
            t.sent.fetch_add(1, SeqCst);
        }
        Event::HedgeWon { .. } => {
            t.won.fetch_add(1, SeqCst);
        }
        Event::Coalesced { .. } => {
            t.joined.fetch_add(1, SeqCst);
        }
        Event::ConcurrencyRejected { .. } => {
            t.rejected.fetch_add(1, SeqCst);
        }
        _ => {}
    }
}

#[tokio::test(start_paused = true)]
async fn words23_events_match_counters_with_dropped_calls() {
    use std::sync::atomic::Ordering::SeqCst;
    let t = Arc::new(Tally::default());
    let api = Api::new(|uri, n| {
        if uri.contains("never") {
            Plan::Never
        } else if uri.contains("slow") && n == 0 {
            Plan::After(1_000)
        } else {
            Plan::After(10)
        }
    });
    let (hl, hh) = sturdy::hedge::HedgeLayer::new()
        .with_min_samples(5)
        .on_event(tally_hook(&t))
        .pair();
    let (cl, ch) = CoalesceLayer::new().on_event(tally_hook(&t)).pair();
    let mut svc = ServiceBuilder::new()
        .layer(cl)
        .layer(hl)
        .service(api.clone());
    warm(&mut svc, 20).await;
    for i in 0..5 {
        // A slow call whose hedge wins, with a follower.
        let a = svc.ready().await.unwrap().call(get(&format!("/slow/{i}")));
        let b = svc.ready().await.unwrap().call(get(&format!("/slow/{i}")));
        within("slow", a).await.unwrap();
        within("slow follower", b).await.unwrap();
        // A hedged call and its follower, both dropped.
        let mut c = spawn(svc.ready().await.unwrap().call(get(&format!("/never/{i}"))));
        let mut d = spawn(svc.ready().await.unwrap().call(get(&format!("/never/{i}"))));
        assert!(c.poll().is_pending());
        assert!(d.poll().is_pending());
        advance(Duration::from_millis(200)).await;
        assert!(c.poll().is_pending());
        drop(d);
        drop(c);
    }
    assert_eq!(api.live(), 0);
    let hs = hh.stats(HOST).unwrap();
    assert_eq!(t.sent.load(SeqCst), hs.hedges(), "{hs:?}");
    assert_eq!(t.won.load(SeqCst), hs.hedge_wins(), "{hs:?}");
    let cs = ch.stats();
    assert_eq!(t.joined.load(SeqCst), cs.joined(), "{cs:?}");
    assert_eq!(cs.upstream() + cs.joined(), cs.calls(), "{cs:?}");
    assert_eq!(ch.in_flight(HOST), 0);

    // Refused calls: one event each; dropped waiters are not refused.
    let (al, ah) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .on_event(tally_hook(&t))
        .pair();
    let svc = al.layer(api.clone());
    let mut held = spawn(svc.clone().oneshot(get("/never/held")));
    assert!(held.poll().is_pending());
    for i in 0..7 {
        let err = within("refused", svc.clone().oneshot(get(&format!("/r{i}"))))
            .await
            .unwrap_err();
        assert!(sturdy::core::find::<LimitReached>(&*err).is_some());
    }
    assert_eq!(t.rejected.load(SeqCst), 7);
    drop(held);
    let st = ah.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_dropped_calls_say_nothing_about_capacity() {
    for algorithm in [
        sturdy::concurrency::Algorithm::Aimd,
        sturdy::concurrency::Algorithm::Vegas,
    ] {
        let api = Api::new(|_, _| Plan::After(50));
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(algorithm)
            .with_limits(1, 100)
            .with_initial_limit(4)
            .pair();
        let svc = layer.layer(api.clone());
        for round in 0..100 {
            let mut fs = Vec::new();
            for i in 0..4 {
                let mut f = spawn(svc.clone().oneshot(get(&format!("/{round}/{i}"))));
                assert!(f.poll().is_pending());
                fs.push(f);
            }
            advance(Duration::from_millis(20)).await;
            drop(fs);
        }
        let st = handle.state(HOST).unwrap();
        assert_eq!(
            (st.limit(), st.in_flight(), st.waiting()),
            (4, 0, 0),
            "{algorithm:?}: {st:?}"
        );
        assert_eq!(api.live(), 0);
    }
}

fn full_client(
    api: Api,
    attempt: Duration,
) -> sturdy::Client<sturdy::coalesce::ResponseBody<Full<Bytes>>> {
    sturdy::ClientBuilder::new()
        .with_hedge(sturdy::hedge::HedgeLayer::new().with_min_samples(5))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .with_attempt_timeout(attempt)
        .build(api)
}

#[tokio::test(start_paused = true)]
async fn words23_client_attempt_timeout_duration_max() {
    let api = Api::new(crate::words23_layers::slow_once);
    let mut client = full_client(api.clone(), Duration::MAX);
    crate::words23_layers::drive_kept(&mut client, "max", 40).await;
    // A request's own settings at the extremes too.
    for (i, opts) in [
        sturdy::core::CallOptions::new().with_attempt_timeout(Duration::MAX),
        sturdy::core::CallOptions::new().with_deadline(Duration::MAX),
    ]
    .into_iter()
    .enumerate()
    {
        let mut req = get(&format!("/opts/{i}"));
        req.extensions_mut().insert(opts);
        let res = within("options at MAX", client.ready().await.unwrap().call(req))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_client_attempt_timeout_zero_is_bounded() {
    let api = Api::new(|_, _| Plan::After(10));
    let mut client = full_client(api.clone(), Duration::ZERO);
    for i in 0..10 {
        // Whatever the outcome, it comes, and it does not panic.
        let _ = within(
            "zero attempt timeout",
            client.ready().await.unwrap().call(get(&format!("/{i}"))),
        )
        .await;
    }
    let mut req = get("/opts");
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_deadline(Duration::ZERO));
    let _ = within("zero deadline", client.ready().await.unwrap().call(req)).await;
    assert_eq!(api.live(), 0);
}

#[tokio::test(start_paused = true)]
async fn words23_non_finite_settings_are_refused() {
    use sturdy::hedge::HedgeLayer;
    for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, 1.0, -0.0] {
        assert!(
            HedgeLayer::new().with_percentile(p).is_err(),
            "percentile {p}"
        );
    }
    for r in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.1, 1.1] {
        assert!(
            HedgeLayer::new().with_budget(r, 10).is_err(),
            "budget ratio {r}"
        );
    }
    for r in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, 1.0] {
        assert!(
            AdaptiveConcurrencyLayer::new().with_backoff(r).is_err(),
            "backoff {r}"
        );
    }
    // Percentiles out of range read as None.
    let api = Api::new(|_, _| Plan::After(10));
    let (layer, handle) = HedgeLayer::new().pair();
    let mut svc = layer.layer(api);
    warm(&mut svc, 10).await;
    assert!(handle.latency_percentile(HOST, 0.5).is_some());
    for q in [f64::NAN, 0.0, 1.0, -1.0, f64::INFINITY] {
        assert_eq!(handle.latency_percentile(HOST, q), None, "q = {q}");
    }
}

#[tokio::test(start_paused = true)]
async fn words23_adaptive_overflow_key_past_the_host_bound() {
    let api = Api::new(|uri, _| {
        if uri.contains("never") {
            Plan::Never
        } else {
            Plan::After(10)
        }
    });
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_max_hosts(1).pair();
    let svc = layer.layer(api.clone());
    let req = |host: &str, path: &str| {
        Request::get(format!("http://{host}{path}"))
            .body(Full::default())
            .unwrap()
    };
    let mut held = spawn(svc.clone().oneshot(req("a.example.com", "/never")));
    assert!(held.poll().is_pending());
    within("b", svc.clone().oneshot(req("b.example.com", "/")))
        .await
        .unwrap();
    handle.set_limit("c.example.com", 7);
    assert_eq!(handle.limit("*"), Some(7), "{:?}", handle.states());
    assert_eq!(handle.limit("a.example.com"), Some(20));
    drop(held);
    let st = handle.state("a.example.com").unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn words23_coalesce_over_buffer_one_followers_give_the_slot_back() {
    let api = Api::new(|_, _| Plan::After(100));
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(tower::buffer::Buffer::new(api.clone(), 1));
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut s = svc.clone();
        let ready = tokio::time::timeout(Duration::from_millis(5), s.ready())
            .await
            .unwrap_or_else(|_| panic!("caller {i} waited for a Buffer slot"))
            .unwrap();
        calls.push(ready.call(get("/x")));
    }
    for f in calls {
        let res = within("identical over Buffer(1)", f).await.unwrap();
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            "payload"
        );
    }
    assert_eq!(api.started(), 1);
    let stats = handle.stats();
    assert_eq!((stats.upstream(), stats.joined()), (1, 19));
}
