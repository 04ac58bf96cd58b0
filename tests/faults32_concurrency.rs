//! Adaptive concurrency (`sturdy-concurrency`, docs/guides/concurrency.md) under wire faults:
//! permits come back after aborted, timed-out and panicking calls; resets and stalls move the
//! limit only as documented; hostile settings.
use crate::faults32_util::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, ConcurrencyHandle, LimitReached};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use tower::{Service, ServiceBuilder, ServiceExt};

fn key(h: &ConcurrencyHandle) -> String {
    let all = h.states();
    assert_eq!(
        all.len(),
        1,
        "{:?}",
        all.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    all[0].0.clone()
}

fn core_err(e: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**e)
        .unwrap_or_else(|| panic!("not a sturdy error: {}", chain(&**e)))
}

/// `/stall` never answers (10 s), everything else answers at once.
async fn stall_server() -> Raw {
    raw(Opts::default(), |s| match s.path.as_str() {
        "/stall" | "/panic" => ok_after(10_000, "late"),
        _ => ok_after(0, "ok"),
    })
    .await
}

#[tokio::test]
async fn permits_come_back_after_aborted_timed_out_and_panicking_calls() {
    let raw = stall_server().await;
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(3)
        .with_limits(3, 3)
        .with_max_wait(Duration::ZERO)
        .pair();
    let h = http();
    // The third kind: a call whose inner future panics after the request was sent.
    let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let h = h.clone();
        async move {
            let panic = req.uri().path() == "/panic";
            let fut = h.request(req);
            if panic {
                let _ = tokio::time::timeout(Duration::from_millis(1500), fut).await;
                panic!("inner service panics mid-call");
            }
            fut.await.map_err(std::io::Error::other)
        }
    });
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    // 1: a task aborted while its request stalls on the wire.
    let s1 = svc.clone();
    let stall = raw.url("/stall");
    let aborted = tokio::spawn(async move { s1.oneshot(get(&stall)).await });
    // 2: a call cut by a timeout above the layer.
    let s2 = svc.clone();
    let stall = raw.url("/stall");
    let timed = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_millis(1500), s2.oneshot(get(&stall))).await
    });
    // 3: a call whose future panics.
    let s3 = svc.clone();
    let p = raw.url("/panic");
    let panicking = tokio::spawn(async move { s3.oneshot(get(&p)).await });
    until("three calls on the wire", || raw.seen().len() == 3).await;
    // The limit is full: a fourth call is shed, not sent, and says so.
    let k = key(&handle);
    let st = handle.state(&k).unwrap();
    assert_eq!(
        (st.limit(), st.in_flight()),
        (3, 3),
        "three calls on the wire hold three places"
    );
    let err = svc
        .clone()
        .oneshot(get(&raw.url("/shed")))
        .await
        .unwrap_err();
    let e = core_err(&err);
    assert!(
        matches!(e.kind(), ErrorKind::RateLimited { .. }),
        "{:?}",
        e.kind()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let lr = sturdy::core::find::<LimitReached>(&*err).expect("LimitReached in the chain");
    assert_eq!(lr.limit(), 3);
    assert_eq!(raw.count_path("/shed"), 0);

    aborted.abort();
    assert!(aborted.await.unwrap_err().is_cancelled());
    assert!(timed.await.unwrap().is_err(), "timed out");
    assert!(panicking.await.unwrap_err().is_panic());
    until("every permit back", || {
        handle.state(&k).unwrap().in_flight() == 0
    })
    .await;
    let st = handle.state(&k).unwrap();
    assert_eq!((st.limit(), st.waiting()), (3, 0));
    // Three calls at once go through again (nothing wedged).
    let mut calls = Vec::new();
    for i in 0..3 {
        calls.push(svc.clone().oneshot(get(&raw.url(&format!("/again{i}")))));
    }
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    // The abandoned stalls' connections were closed by the client.
    until(
        "stalled connections closed (aborted, timed out, panicked)",
        || raw.client_closed() == 3,
    )
    .await;
}

#[tokio::test]
async fn waiting_callers_cancelled_at_every_point_leave_the_line() {
    let raw = stall_server().await;
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_secs(20))
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let s = svc.clone();
    let url = raw.url("/stall");
    let holder = tokio::spawn(async move { s.oneshot(get(&url)).await });
    until("holder on the wire", || raw.seen().len() == 1).await;
    let k = key(&handle);
    // 20 waiters, each dropped after a different time.
    let mut waiters = Vec::new();
    for i in 0..20u64 {
        let s = svc.clone();
        let url = raw.url("/w");
        waiters.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(5 * i), s.oneshot(get(&url))).await
        }));
    }
    for w in waiters {
        assert!(
            w.await.unwrap().is_err(),
            "a waiter got through while the holder held the place"
        );
    }
    assert_eq!(
        handle.state(&k).unwrap().waiting(),
        0,
        "dropped waiters left the line"
    );
    holder.abort();
    until("holder's permit back", || {
        handle.state(&k).unwrap().in_flight() == 0
    })
    .await;
    let r = bounded(
        Duration::from_secs(3),
        "next call",
        svc.clone().oneshot(get(&raw.url("/ok"))),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(raw.count_path("/w"), 0, "no dropped waiter was sent");
}

#[tokio::test]
async fn resets_and_refusals_do_not_move_the_limit() {
    // Connections reset before and after the request was read, and refused: "Other failures
    // (a 500, a 404, a connect error) ... say nothing about capacity and are ignored."
    let before = raw(
        Opts {
            reset_on_accept: true,
            ..Opts::default()
        },
        |_| status(200),
    )
    .await;
    let after = raw(Opts::default(), |_| Act::ResetAfterRead(Duration::ZERO)).await;
    let refused = closed_port().await;
    for (what, url) in [
        ("reset on accept", before.url("/x")),
        ("reset after read", after.url("/x")),
        ("refused", format!("http://{refused}/x")),
    ] {
        let (layer, handle) = AdaptiveConcurrencyLayer::new()
            .with_initial_limit(10)
            .pair();
        let svc = ServiceBuilder::new().layer(layer).service(http());
        for _ in 0..30 {
            assert!(svc.clone().oneshot(get(&url)).await.is_err());
        }
        let k = key(&handle);
        let st = handle.state(&k).unwrap();
        assert_eq!((st.limit(), st.in_flight()), (10, 0), "{what}");
    }
}

#[tokio::test]
async fn a_burst_of_503s_lowers_the_limit_once() {
    // "fifty 503s from one burst lower the limit once": 50 calls at once, all answered 503
    // after 100 ms.
    let raw = raw(Opts::default(), |_| status_after(503, 100)).await;
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(50)
        .with_limits(1, 1000)
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let calls: Vec<_> = (0..50)
        .map(|i| svc.clone().oneshot(get(&raw.url(&format!("/b{i}")))))
        .collect();
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    let k = key(&handle);
    assert_eq!(handle.limit(&k), Some(45), "50 x 0.9, once");
}

#[tokio::test]
async fn stalls_cut_by_a_timeout_below_shrink_the_limit_to_the_minimum_not_to_zero() {
    // tower's Timeout under the layer cuts every stalled attempt: an overload signal each round
    // trip. The limit falls, stops at the minimum (0 is taken as 1), and the layer stays usable.
    let raw = stall_server().await;
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(4)
        .with_limits(0, 10)
        .with_max_wait(Duration::from_secs(5))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(20)))
        .service(http());
    for _ in 0..40 {
        let err = svc
            .clone()
            .oneshot(get(&raw.url("/stall")))
            .await
            .unwrap_err();
        assert!(
            sturdy::core::find::<tower::timeout::error::Elapsed>(&*err).is_some(),
            "{}",
            chain(&*err)
        );
    }
    let k = key(&handle);
    let st = handle.state(&k).unwrap();
    assert_eq!(
        st.limit(),
        1,
        "tower's Elapsed is a timeout: the limit falls to the minimum"
    );
    assert_eq!(st.in_flight(), 0);
    let r = svc.clone().oneshot(get(&raw.url("/ok"))).await.unwrap();
    assert_eq!(r.status(), 200);
    until("stalled connections closed", || raw.client_closed() == 40).await;
}

#[tokio::test]
async fn slow_drip_body_is_not_held_by_the_permit_after_the_head() {
    // The permit is "held until the response arrives": the head. A body dripping for a long time
    // after it must not keep the place (otherwise one slow body blocks the host).
    let raw = raw(Opts::default(), |s| match s.path.as_str() {
        "/drip" => Act::Drip {
            body: vec![b'x'; 40],
            every: Duration::from_millis(25),
        },
        _ => ok_after(0, "ok"),
    })
    .await;
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::ZERO)
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let res = svc.clone().oneshot(get(&raw.url("/drip"))).await.unwrap();
    let k = key(&handle);
    assert_eq!(
        handle.state(&k).unwrap().in_flight(),
        0,
        "the head arrived: the place is back"
    );
    let other = svc.clone().oneshot(get(&raw.url("/ok"))).await;
    assert!(other.is_ok(), "a second call while the first body drips");
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 40);
}

#[tokio::test]
async fn kept_service_under_buffer_loadshed_and_concurrency_limit_one() {
    // 30 tasks drive Buffer(LoadShed(ConcurrencyLimit(1)(Adaptive(client)))) with
    // ready().call(); half of the requests are reset after read. Each task gets an answer or
    // an error (overloaded or the reset), and everything is given back at the end.
    let raw = raw(Opts::default(), |s| {
        if s.index % 2 == 0 {
            Act::ResetAfterRead(Duration::from_millis(5))
        } else {
            ok_after(5, "ok")
        }
    })
    .await;
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_max_wait(Duration::ZERO)
        .pair();
    let inner = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(1)
        .layer(layer)
        .service(http());
    let svc = tower::buffer::Buffer::new(inner, 64);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut s = svc.clone();
        let url = raw.url(&format!("/t{i}"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                let r = s.ready().await.unwrap().call(get(&url)).await;
                if r.is_ok() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if bounded(Duration::from_secs(20), "task", t).await.unwrap() {
            ok += 1;
        }
    }
    assert!(ok > 0);
    let k = key(&handle);
    let st = handle.state(&k).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert!(st.limit() >= 1);
}

#[tokio::test(start_paused = true)]
async fn hostile_limits_and_waits() {
    // Bounds are capped at 1,000,000; set_limit stays within them; a maximum wait of
    // Duration::MAX does not overflow an instant.
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(usize::MAX, usize::MAX)
        .with_initial_limit(usize::MAX)
        .with_max_wait(Duration::MAX)
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|_r: Request<Full<Bytes>>| async {
            Ok::<_, BoxError>(Response::new(()))
        }));
    svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    let k = key(&handle);
    assert!(
        handle.limit(&k).unwrap() <= 1_000_000,
        "capped: {:?}",
        handle.limit(&k)
    );

    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 5)
        .with_max_wait(Duration::MAX)
        .pair();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let g = g.clone();
            async move {
                let _p = g.acquire().await.unwrap();
                Ok::<_, std::io::Error>(Response::new(()))
            }
        }));
    handle.set_limit("h.example", 0);
    assert_eq!(
        handle.limit("h.example"),
        Some(2),
        "set_limit(0) is taken into the bounds"
    );
    handle.set_limit("h.example", usize::MAX);
    assert_eq!(handle.limit("h.example"), Some(5));
    handle.set_limit("h.example", 2);
    let mut calls = Vec::new();
    for _ in 0..3 {
        let s = svc.clone();
        calls.push(tokio::spawn(async move {
            s.oneshot(get("http://h.example/")).await
        }));
    }
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let st = handle.state("h.example").unwrap();
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (2, 1),
        "the third waits (Duration::MAX)"
    );
    gate.add_permits(3);
    for c in calls {
        c.await.unwrap().unwrap();
    }
}

#[test]
fn backoff_ratio_is_validated() {
    for r in [0.0, 1.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
        assert!(
            AdaptiveConcurrencyLayer::new().with_backoff(r).is_err(),
            "ratio {r}"
        );
    }
    assert!(AdaptiveConcurrencyLayer::new().with_backoff(0.5).is_ok());
}

#[tokio::test(start_paused = true)]
async fn many_timeouts_in_a_row_on_paused_time_never_reach_zero() {
    // 500 calls, all timing out (a sturdy Timeout error), sequential and concurrent: the limit
    // stays >= 1 and the layer admits calls afterwards.
    let fail = Arc::new(AtomicUsize::new(1));
    let f = fail.clone();
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(0, 100)
        .with_max_wait(Duration::from_secs(1))
        .pair();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(move |_r: Request<Full<Bytes>>| {
            let failing = f.load(Ordering::SeqCst) == 1;
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if failing {
                    Err::<Response<()>, BoxError>(Box::new(sturdy::core::Error::new(
                        ErrorKind::Timeout,
                        "cut",
                    )))
                } else {
                    Ok(Response::new(()))
                }
            }
        }));
    for _ in 0..10 {
        let calls: Vec<_> = (0..50)
            .map(|_| svc.clone().oneshot(get("http://h.example/")))
            .collect();
        let _ = futures_util::future::join_all(calls).await;
    }
    assert_eq!(handle.limit("h.example"), Some(1));
    fail.store(0, Ordering::SeqCst);
    for _ in 0..50 {
        svc.clone().oneshot(get("http://h.example/")).await.unwrap();
    }
    let st = handle.state("h.example").unwrap();
    assert_eq!(st.in_flight(), 0);
}
