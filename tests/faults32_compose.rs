//! Hedging, adaptive concurrency, coalescing and the breaker composed (ClientBuilder and tower
//! layers), on the wire and on paused time: panics inside `call`, limits changed while calls are
//! in flight, probes refused by LoadShed, overflow breakers, Vegas at a limit of 1.
use crate::faults32_util::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, Algorithm};
use sturdy::core::classify::{delivery, Outcome};
use sturdy::core::{BoxError, CircuitOpen, Delivery, ErrorKind, OpenReason};
use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tower::{Service, ServiceBuilder, ServiceExt};

/// A service whose `call` itself panics (not its future) for paths starting with `/panic`,
/// after sleeping `block` on the thread; otherwise answers 200 after `ms`.
#[derive(Clone)]
struct PanicsInCall {
    block: Duration,
    ms: u64,
    calls: Arc<AtomicUsize>,
    fail: Arc<AtomicUsize>,
}

impl Service<Request<Full<Bytes>>> for PanicsInCall {
    type Response = Response<Full<Bytes>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if req.uri().path().starts_with("/panic") {
            // Deliberately blocks inside `call`, so identical requests join meanwhile.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(self.block);
            panic!("call panics before sending");
        }
        let ms = self.ms;
        let failing = self.fail.load(Ordering::SeqCst) == 1;
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let mut r = Response::new(Full::from("ok"));
            if failing {
                *r.status_mut() = StatusCode::BAD_GATEWAY;
            }
            Ok(r)
        })
    }
}

fn panicky(block: Duration, ms: u64) -> (PanicsInCall, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    (
        PanicsInCall {
            block,
            ms,
            calls: calls.clone(),
            fail: Arc::default(),
        },
        calls,
    )
}

#[tokio::test]
async fn a_panic_inside_inner_call_gives_the_concurrency_permit_back() {
    let (inner, _) = panicky(Duration::ZERO, 0);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    for _ in 0..3 {
        let s = svc.clone();
        let j = tokio::spawn(async move { s.oneshot(get("http://h.example/panic")).await });
        assert!(j.await.unwrap_err().is_panic());
    }
    assert_eq!(handle.state("h.example").unwrap().in_flight(), 0);
    svc.clone()
        .oneshot(get("http://h.example/ok"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_panic_inside_inner_call_does_not_wedge_a_half_open_breaker() {
    // The probe's inner `call` panics: the probe's future is gone, so its slot must come back
    // ("A probe whose future is dropped gives its slot back").
    let (mut inner, _) = panicky(Duration::ZERO, 0);
    inner.fail = Arc::new(AtomicUsize::new(1));
    let fail = inner.fail.clone();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_millis(1), Duration::from_millis(1))
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let r = svc
        .clone()
        .oneshot(get("http://h.example/x"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(matches!(
        handle.state("h.example"),
        Some(CircuitState::Open { .. })
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let s = svc.clone();
    let j = tokio::spawn(async move { s.oneshot(get("http://h.example/panic")).await.map(|_| ()) });
    assert!(j.await.unwrap_err().is_panic());
    fail.store(0, Ordering::SeqCst);
    let r = svc.clone().oneshot(get("http://h.example/x")).await;
    assert!(
        r.is_ok(),
        "after a probe that panicked, the next call must be admitted as a probe: {}",
        r.err().map(|e| chain(&*e)).unwrap_or_default()
    );
    assert_eq!(handle.state("h.example"), Some(CircuitState::Closed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesce_joiners_of_a_call_that_panics_in_call_get_not_sent_not_a_hang() {
    // The first request's inner `call` blocks its thread 300 ms, then panics; identical requests
    // arriving meanwhile join it. Documented: they get an error, delivery NotSent.
    let (inner, calls) = panicky(Duration::from_millis(300), 0);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let s = svc.clone();
    let leader =
        tokio::spawn(async move { s.oneshot(get("http://h.example/panic")).await.map(|_| ()) });
    until("leader inside call", || calls.load(Ordering::SeqCst) == 1).await;
    let joiners: Vec<_> = (0..3)
        .map(|_| {
            let s = svc.clone();
            tokio::spawn(async move { s.oneshot(get("http://h.example/panic")).await.map(|_| ()) })
        })
        .collect();
    assert!(leader.await.unwrap_err().is_panic());
    let mut not_sent = 0;
    for j in joiners {
        match bounded(Duration::from_secs(5), "joiner", j).await {
            Ok(Err(e)) => {
                assert_eq!(delivery(&*e), Delivery::NotSent, "{}", chain(&*e));
                not_sent += 1;
            }
            Ok(Ok(())) => panic!("a joiner got a response from a call that panicked"),
            Err(j) => assert!(j.is_panic(), "joiner: a panic of its own call"),
        }
    }
    assert!(handle.stats().joined() == 0 || not_sent > 0);
}

#[tokio::test(start_paused = true)]
async fn lowering_then_raising_the_limit_in_flight_does_not_pay_twice() {
    // "When the limit goes down while calls are in flight, their permits are retired as they come
    // back; when it goes up again first, the retirement is cancelled, not paid twice."
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let g = g.clone();
            async move {
                g.acquire().await.unwrap().forget();
                Ok::<_, std::io::Error>(Response::new(()))
            }
        }));
    let spawn = |svc: &_| {
        let s = Clone::clone(svc);
        tokio::spawn(async move {
            ServiceExt::oneshot(s, get("http://h.example/"))
                .await
                .map(|_| ())
        })
    };
    let first: Vec<_> = (0..4).map(|_| spawn(&svc)).collect();
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(handle.state("h.example").unwrap().in_flight(), 4);
    handle.set_limit("h.example", 2);
    handle.set_limit("h.example", 4);
    gate.add_permits(4);
    for f in first {
        f.await.unwrap().unwrap();
    }
    let st = handle.state("h.example").unwrap();
    assert_eq!((st.in_flight(), st.limit()), (0, 4));
    // Four at once fit again.
    let again: Vec<_> = (0..4).map(|_| spawn(&svc)).collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        handle.state("h.example").unwrap().in_flight(),
        4,
        "capacity was paid twice"
    );
    gate.add_permits(4);
    for a in again {
        a.await.unwrap().unwrap();
    }
    // And lowering for real retires permits as they come back: only 2 fit afterwards.
    let third: Vec<_> = (0..4).map(|_| spawn(&svc)).collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    handle.set_limit("h.example", 2);
    gate.add_permits(4);
    for t in third {
        t.await.unwrap().unwrap();
    }
    let more: Vec<_> = (0..4).map(|_| spawn(&svc)).collect();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let st = handle.state("h.example").unwrap();
    assert_eq!(
        st.in_flight(),
        st.limit().min(4),
        "more in flight than the limit"
    );
    let admitted = st.in_flight();
    gate.add_permits(4);
    let mut shed = 0;
    for m in more {
        if m.await.unwrap().is_err() {
            shed += 1;
        }
    }
    assert_eq!(shed, 4 - admitted);
}

#[tokio::test(start_paused = true)]
async fn vegas_at_a_limit_of_one_keeps_admitting_calls() {
    // Vegas probes at half the limit; half of 1 must not be 0 (wedged).
    for (min, max, init) in [(1, 1, 1), (1, 3, 1), (1, 1000, 2)] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_algorithm(Algorithm::Vegas)
            .with_limits(min, max)
            .with_initial_limit(init)
            .with_max_wait(Duration::from_secs(1))
            .pair();
        let n = Arc::new(AtomicUsize::new(0));
        let n2 = n.clone();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(tower::service_fn(move |_r: Request<Full<Bytes>>| {
                let i = n2.fetch_add(1, Ordering::SeqCst) as u64;
                async move {
                    tokio::time::sleep(Duration::from_millis(5 + (i % 7) * 3)).await;
                    Ok::<_, std::io::Error>(Response::new(()))
                }
            }));
        for i in 0..400 {
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                svc.clone().oneshot(get("http://h.example/")),
            )
            .await;
            assert!(
                matches!(r, Ok(Ok(_))),
                "Vegas ({min}, {max}, {init}) call {i}: {:?}; state {:?}",
                r.map(|x| x.map(|_| ()).map_err(|e| chain(&*e))),
                handle
                    .state("h.example")
                    .map(|s| (s.limit(), s.in_flight(), s.waiting()))
            );
        }
        assert!(handle.limit("h.example").unwrap() >= 1);
    }
}

#[tokio::test(start_paused = true)]
async fn probe_refused_by_load_shed_gets_its_slot_back() {
    // Half-open: the probe meets LoadShed over a full ConcurrencyLimit(1) (it never reached the
    // dependency): "a probe gets its slot back". The next call is admitted as a probe.
    let fail = Arc::new(AtomicUsize::new(1));
    let f = fail.clone();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .with_classifier(|r: &Result<Response<()>, BoxError>| match r {
            // Every outcome is a failure, whatever it is: still, refusals are not counted.
            Ok(res) if res.status().is_success() => Outcome::Success,
            _ => Outcome::Retryable(ErrorKind::Server(StatusCode::BAD_GATEWAY)),
        })
        .pair();
    let svc = tower::buffer::Buffer::new(
        ServiceBuilder::new()
            .layer(layer)
            .load_shed()
            .concurrency_limit(1)
            .service(tower::service_fn(move |r: Request<Full<Bytes>>| {
                let f = f.clone();
                let g = g.clone();
                async move {
                    if r.uri().path() == "/hold" {
                        g.acquire().await.unwrap().forget();
                    }
                    let failing = f.load(Ordering::SeqCst) == 1;
                    let mut res = Response::new(());
                    if failing {
                        *res.status_mut() = StatusCode::BAD_GATEWAY;
                    }
                    Ok::<_, std::io::Error>(res)
                }
            })),
        16,
    );
    // Shed calls are not failures even for this classifier.
    let mut holder = Box::pin(svc.clone().oneshot(get("http://other.example/hold")));
    tokio::select! {
        r = &mut holder => panic!("the holder answered: {:?}", r.map(|_| ()).map_err(|e| chain(&*e))),
        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
    }
    for _ in 0..5 {
        let e = svc
            .clone()
            .oneshot(get("http://h.example/x"))
            .await
            .unwrap_err();
        assert_eq!(delivery(&*e), Delivery::NotSent);
        assert!(sturdy::core::find::<CircuitOpen>(&*e).is_none());
    }
    assert_eq!(
        handle.state("h.example"),
        Some(CircuitState::Closed),
        "a shed call was counted"
    );
    fail.store(0, Ordering::SeqCst);
    gate.add_permits(1);
    holder.await.unwrap();
    // Open h.example with one failure.
    fail.store(1, Ordering::SeqCst);
    svc.clone()
        .oneshot(get("http://h.example/x"))
        .await
        .unwrap();
    assert!(matches!(
        handle.state("h.example"),
        Some(CircuitState::Open { .. })
    ));
    // Another host holds the concurrency limit; the open period ends.
    fail.store(0, Ordering::SeqCst);
    let mut holder = Box::pin(svc.clone().oneshot(get("http://other.example/hold")));
    tokio::select! {
        r = &mut holder => panic!("the holder answered: {:?}", r.map(|_| ()).map_err(|e| chain(&*e))),
        _ = tokio::time::sleep(Duration::from_millis(1)) => {}
    }
    tokio::time::advance(Duration::from_millis(1100)).await;
    // The probe is shed below the breaker (not sent); the next call must be a probe again,
    // not refused as "probing".
    for i in 0..3 {
        let e = svc
            .clone()
            .oneshot(get("http://h.example/x"))
            .await
            .unwrap_err();
        assert!(
            sturdy::core::find::<CircuitOpen>(&*e).is_none(),
            "call {i}: the shed probe kept its slot: {}",
            chain(&*e)
        );
        assert_eq!(delivery(&*e), Delivery::NotSent);
    }
    gate.add_permits(1);
    holder.await.unwrap();
    svc.clone()
        .oneshot(get("http://h.example/x"))
        .await
        .unwrap();
    assert_eq!(handle.state("h.example"), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn overflow_breaker_names_the_calls_own_host() {
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_max_breakers(1)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|_r: Request<Full<Bytes>>| async {
            let mut r = Response::new(());
            *r.status_mut() = StatusCode::BAD_GATEWAY;
            Ok::<_, std::io::Error>(r)
        }));
    svc.clone().oneshot(get("http://a.example/")).await.unwrap();
    assert!(matches!(
        handle.state("a.example"),
        Some(CircuitState::Open { .. })
    ));
    // b and c share the overflow breaker: b fails and opens it; c is refused with Overflow.
    svc.clone().oneshot(get("http://b.example/")).await.unwrap();
    let e = svc
        .clone()
        .oneshot(get("http://c.example/"))
        .await
        .unwrap_err();
    let o = sturdy::core::find::<CircuitOpen>(&*e).unwrap_or_else(|| panic!("{}", chain(&*e)));
    assert_eq!(o.reason(), OpenReason::Overflow);
    assert!(
        e.to_string().contains("c.example"),
        "names the call's own host: {e}"
    );
    assert!(
        !e.to_string().contains("b.example"),
        "not another host's: {e}"
    );
}

#[tokio::test]
async fn hedged_copies_over_a_limit_of_one_never_overrun_the_host() {
    // ClientBuilder: Hedge above AdaptiveConcurrency(1). "hedging cannot push a host past its
    // limit": the server never sees two requests at once; every call succeeds.
    let cur = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (c2, p2) = (cur.clone(), peak.clone());
    let n = Arc::new(AtomicUsize::new(0));
    let raw = raw(Opts::default(), move |s| {
        if s.path == "/warm" {
            return ok_after(0, "warm");
        }
        let now = c2.fetch_add(1, Ordering::SeqCst) + 1;
        p2.fetch_max(now, Ordering::SeqCst);
        let slow = n.fetch_add(1, Ordering::SeqCst).is_multiple_of(2);
        let c3 = c2.clone();
        // The decision is made before the answer; count down after a while. The answer goes
        // 1 ms after the count-down: two timers of one deadline fire in no set order, and a
        // count-down that ran after its answer made a loaded run count the next sequential
        // call as a second one in flight (CI saw 2 once).
        let ms = if slow { 150 } else { 5 };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            c3.fetch_sub(1, Ordering::SeqCst);
        });
        ok_after(ms + 1, "ok")
    })
    .await;
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(Duration::from_millis(30), Duration::from_millis(30))
        .with_budget(1.0, 10)
        .unwrap()
        .pair();
    let (conc, ch) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_secs(5))
        .pair();
    let (cb, cbh) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let client = ClientBuilder::new()
        .with_hedge(hedge)
        .with_adaptive_concurrency(conc)
        .with_circuit_breaker(cb)
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http());
    for _ in 0..8 {
        client
            .clone()
            .oneshot(get(&raw.url("/warm")))
            .await
            .unwrap();
    }
    for i in 0..10 {
        let r = client
            .clone()
            .oneshot(get(&raw.url(&format!("/c{i}"))))
            .await;
        assert_eq!(r.unwrap_or_else(|e| panic!("{}", chain(&*e))).status(), 200);
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "two requests at once past a limit of 1"
    );
    let k = ch.states()[0].0.clone();
    assert_eq!(ch.state(&k).unwrap().in_flight(), 0);
    assert_eq!(
        cbh.states()[0].1,
        CircuitState::Closed,
        "a dropped hedge is not a breaker failure"
    );
    let _ = hh;
}

#[tokio::test]
async fn hedge_losers_are_not_breaker_failures_on_the_wire() {
    // Every first copy stalls; each hedge wins; losers are dropped. A breaker that opens on one
    // failure stays closed, and the server saw every loser's connection closed.
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let raw = raw(Opts::default(), move |s| {
        if s.path == "/warm" {
            return ok_after(0, "warm");
        }
        if seen.lock().unwrap().insert(s.path.clone()) {
            ok_after(5_000, "late")
        } else {
            ok_after(0, "hedge")
        }
    })
    .await;
    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(Duration::from_millis(30), Duration::from_millis(30))
        .with_budget(1.0, 10)
        .unwrap()
        .pair();
    let (cb, cbh) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let client = ClientBuilder::new()
        .with_hedge(hedge)
        .with_circuit_breaker(cb)
        .with_attempt_timeout(Duration::from_secs(10))
        .build(http());
    for _ in 0..8 {
        client
            .clone()
            .oneshot(get(&raw.url("/warm")))
            .await
            .unwrap();
    }
    for i in 0..5 {
        client
            .clone()
            .oneshot(get(&raw.url(&format!("/h{i}"))))
            .await
            .unwrap();
    }
    assert_eq!(hh.all()[0].1.hedge_wins(), 5);
    assert_eq!(cbh.states()[0].1, CircuitState::Closed);
    until("losers closed", || raw.client_closed() == 5).await;
}

#[tokio::test]
async fn coalesce_over_the_full_stack_cancelled_leader_and_idle_close() {
    // ClientBuilder with every layer: a leader cancelled mid-call, followers on; the server
    // closes idle keep-alive connections in between.
    let raw = raw(
        Opts {
            idle_close: Some(Duration::from_millis(20)),
            ..Opts::default()
        },
        |_| ok_after(200, "shared"),
    )
    .await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_coalesce(cl)
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_attempt_timeout(Duration::from_secs(5))
        .build(http());
    for round in 0..3 {
        let url = raw.url(&format!("/r{round}"));
        let c = client.clone();
        let u = url.clone();
        let leader = tokio::spawn(async move { c.oneshot(get(&u)).await.map(|_| ()) });
        until("leader on the wire", || {
            raw.count_path(&format!("/r{round}")) == 1
        })
        .await;
        let followers: Vec<_> = (0..5)
            .map(|_| {
                let c = client.clone();
                let u = url.clone();
                tokio::spawn(async move { c.oneshot(get(&u)).await.map(|_| ()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        leader.abort();
        for f in followers {
            bounded(Duration::from_secs(5), "follower", f)
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{}", chain(&*e)));
        }
        assert_eq!(raw.count_path(&format!("/r{round}")), 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(ch.stats().joined() >= 15);
}
