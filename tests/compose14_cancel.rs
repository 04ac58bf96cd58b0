//! Cancellation at every await: each layer's response future is polled 0, 1, 2... times and then
//! dropped, and what it held must come back (rate-limit places, concurrency permits, a
//! half-open probe, a coalesced call, both copies of a hedged call).
//!
//! docs/ARCHITECTURE.md: "gives back what a dropped future holds: a probe slot, a rate slot, a
//! token wait."
#![cfg(feature = "full")]

use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tokio::time::{advance, timeout};
use tokio_test::task::{spawn, Spawn};
use tower::limit::ConcurrencyLimit;
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

type Req = Request<Full<Bytes>>;
type Res = Response<Full<Bytes>>;
type Handle = mock::Handle<Req, Res>;
type Send_ = mock::SendResponse<Res>;

const HOST: &str = "api.example.com";
const BOUND: Duration = Duration::from_secs(5);

fn get(i: usize) -> Req {
    Request::get(format!("http://{HOST}/items/{i}"))
        .body(Full::default())
        .unwrap()
}

fn status(s: u16, headers: &[(&str, &str)]) -> Res {
    let mut b = Response::builder().status(s);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::from("x")).unwrap()
}

fn take(handle: &mut Handle) -> Option<(Req, Send_)> {
    match handle.poll_request() {
        Poll::Ready(Some(r)) => Some(r),
        _ => None,
    }
}

/// Polls `f` and advances time by `step` until the mock sees a request, at most `limit` long.
async fn until_request<F: std::future::Future>(
    f: &mut Spawn<F>,
    handle: &mut Handle,
    step: Duration,
    limit: Duration,
) -> Option<(Req, Send_)> {
    let mut waited = Duration::ZERO;
    loop {
        let _ = f.poll();
        if let Some(r) = take(handle) {
            return Some(r);
        }
        if waited >= limit {
            return None;
        }
        advance(step).await;
        waited += step;
    }
}

/// Rate limit with a quota: waiters dropped after 0, 1 or 2 polls leave the line; the caller
/// behind them goes one interval after the first call, not after the dropped ones' turns.
#[tokio::test(start_paused = true)]
async fn rate_limit_waiters_dropped_at_each_poll_leave_the_line() {
    for polls in 0..3 {
        let (layer, limits) = RateLimitLayer::new(Quota::per_second(10).unwrap()).pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let mut svc = layer.layer(mock);
        let mut first = spawn(svc.ready().await.unwrap().call(get(0)));
        let (_r, send) = until_request(&mut first, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap();
        send.send_response(status(200, &[]));
        assert!(first.poll().is_ready());
        let start = tokio::time::Instant::now();

        let mut dropped: Vec<_> = (1..6)
            .map(|i| spawn(svc.ready_oneshot_now().call(get(i))))
            .collect();
        for _ in 0..polls {
            for d in &mut dropped {
                assert!(d.poll().is_pending());
            }
            advance(Duration::from_millis(10)).await;
        }
        drop(dropped);
        assert_eq!(
            limits.waiting(HOST),
            0,
            "after {polls} polls the dropped waiters are still in line"
        );
        let mut last = spawn(svc.ready_oneshot_now().call(get(9)));
        let (_r, send) = until_request(&mut last, &mut handle, Duration::from_millis(5), BOUND)
            .await
            .expect("the last caller never went");
        let waited = start.elapsed();
        assert!(
            waited <= Duration::from_millis(110),
            "after 5 waiters dropped at poll {polls}, the next caller waited {waited:?}"
        );
        send.send_response(status(200, &[]));
    }
}

/// A place handed to a waiter that is dropped before it sees it must pass to the next waiter.
/// docs/guides/ratelimit.md: "a released call gives its place back when it finishes, fails, is
/// dropped or panics."
#[tokio::test(start_paused = true)]
async fn a_released_waiter_dropped_before_it_runs_passes_its_place_on() {
    let (layer, limits) = RateLimitLayer::adaptive_only().pair();
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let mut svc = layer.layer(mock);
    let mut first = spawn(svc.ready_oneshot_now().call(get(0)));
    let (_r, send) = until_request(&mut first, &mut handle, Duration::from_millis(1), BOUND)
        .await
        .unwrap();
    send.send_response(status(429, &[("retry-after", "1")]));
    let res = timeout(BOUND, first).await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(limits.pause(HOST).is_some());

    let mut w1 = spawn(svc.ready_oneshot_now().call(get(1)));
    let mut w2 = spawn(svc.ready_oneshot_now().call(get(2)));
    assert!(w1.poll().is_pending());
    assert!(w2.poll().is_pending());
    assert_eq!(limits.waiting(HOST), 2);
    // The pause ends; slow start lets one call out (the first in line), which is dropped
    // before it is polled again.
    advance(Duration::from_millis(1100)).await;
    drop(w1);
    let got = until_request(
        &mut w2,
        &mut handle,
        Duration::from_millis(20),
        Duration::from_secs(3),
    )
    .await;
    let waiting = limits.waiting(HOST);
    assert!(
        got.is_some(),
        "the second waiter never went after the first, released, was dropped (waiting: {waiting})"
    );
    got.unwrap().1.send_response(status(200, &[]));
    assert!(timeout(BOUND, w2).await.unwrap().is_ok());
}

/// Adaptive concurrency, limit 1: a call dropped in flight gives its permit back, a waiter
/// dropped at any step leaves the line, and one handed the permit but dropped passes it on.
#[tokio::test(start_paused = true)]
async fn concurrency_permits_and_waiters_come_back_when_dropped() {
    let (layer, limits) = AdaptiveConcurrencyLayer::new().pair();
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let mut svc = layer.layer(mock);
    // Make the host known, then set its limit to 1.
    let mut warm = spawn(svc.ready_oneshot_now().call(get(0)));
    let (_r, send) = until_request(&mut warm, &mut handle, Duration::from_millis(1), BOUND)
        .await
        .unwrap();
    send.send_response(status(200, &[]));
    timeout(BOUND, warm).await.unwrap().unwrap();
    limits.set_limit(HOST, 1);

    // In flight, dropped before its answer: the permit comes back.
    let mut a = spawn(svc.ready_oneshot_now().call(get(1)));
    let (_r, _send_a) = until_request(&mut a, &mut handle, Duration::from_millis(1), BOUND)
        .await
        .unwrap();
    let mut b = spawn(svc.ready_oneshot_now().call(get(2)));
    let mut c = spawn(svc.ready_oneshot_now().call(get(3)));
    assert!(b.poll().is_pending());
    assert!(c.poll().is_pending());
    let st = limits.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (1, 2));
    drop(a);
    // b was handed the permit; drop it before it runs: c must get it.
    drop(b);
    let got = until_request(
        &mut c,
        &mut handle,
        Duration::from_millis(5),
        Duration::from_secs(1),
    )
    .await;
    let st = limits.state(HOST).unwrap();
    let (_r, send_c) = got.unwrap_or_else(|| {
        panic!(
            "the last waiter never went: in flight {}, waiting {}",
            st.in_flight(),
            st.waiting()
        )
    });
    send_c.send_response(status(200, &[]));
    timeout(BOUND, c).await.unwrap().unwrap();
    let st = limits.state(HOST).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

/// A half-open probe dropped after 0 or 1 polls, or after its answer arrived but before its
/// future saw it, gives its slot back: the next call is the next probe, not `CircuitOpen`.
#[tokio::test(start_paused = true)]
async fn a_dropped_half_open_probe_does_not_wedge_the_breaker() {
    for case in 0..3 {
        let (layer, breaker) = CircuitBreakerLayer::new()
            .with_consecutive_failures(1)
            .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
            .pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let mut svc = layer.layer(mock);
        let mut fail = spawn(svc.ready_oneshot_now().call(get(0)));
        let (_r, send) = until_request(&mut fail, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap();
        send.send_response(status(500, &[]));
        timeout(BOUND, fail).await.unwrap().unwrap();
        assert!(matches!(
            breaker.state(HOST),
            Some(CircuitState::Open { .. })
        ));
        advance(Duration::from_millis(1001)).await;

        let mut probe = spawn(svc.ready_oneshot_now().call(get(1)));
        match case {
            0 => {}
            1 => {
                assert!(probe.poll().is_pending());
            }
            _ => {
                let (_r, send) =
                    until_request(&mut probe, &mut handle, Duration::from_millis(1), BOUND)
                        .await
                        .unwrap();
                send.send_response(status(200, &[]));
            }
        }
        drop(probe);
        let _ = take(&mut handle);
        let state = breaker.state(HOST);
        let mut next = spawn(svc.ready_oneshot_now().call(get(2)));
        let got = until_request(
            &mut next,
            &mut handle,
            Duration::from_millis(1),
            Duration::from_millis(50),
        )
        .await;
        let Some((_r, send)) = got else {
            let err = timeout(BOUND, next).await.unwrap().unwrap_err();
            panic!("case {case}: after the probe was dropped ({state:?}) the next call got: {err}");
        };
        send.send_response(status(200, &[]));
        timeout(BOUND, next).await.unwrap().unwrap();
        assert_eq!(
            breaker.state(HOST),
            Some(CircuitState::Closed),
            "case {case}"
        );
    }
}

/// The caller that started a coalesced call is dropped after 0, 1 or 2 polls: the one who
/// joined still gets the response, and the table is empty afterwards.
#[tokio::test(start_paused = true)]
async fn a_dropped_coalesce_leader_leaves_the_call_to_the_follower() {
    for polls in 0..3 {
        let (layer, coalesce) = CoalesceLayer::new().pair();
        let (mock, mut handle) = mock::pair::<Req, Res>();
        let mut svc = layer.layer(mock);
        let mut leader = spawn(svc.ready_oneshot_now().call(get(1)));
        let mut follower = spawn(svc.ready_oneshot_now().call(get(1)));
        for _ in 0..polls {
            let _ = leader.poll();
        }
        assert!(follower.poll().is_pending());
        drop(leader);
        let got = until_request(
            &mut follower,
            &mut handle,
            Duration::from_millis(1),
            Duration::from_millis(50),
        )
        .await;
        let (_r, send) = got.unwrap_or_else(|| {
            panic!("polls {polls}: the follower's call never reached the service")
        });
        send.send_response(status(200, &[]));
        let res = timeout(BOUND, follower)
            .await
            .unwrap_or_else(|_| panic!("polls {polls}: the follower hung"))
            .unwrap_or_else(|e| panic!("polls {polls}: the follower failed: {e}"));
        assert_eq!(res.status(), StatusCode::OK);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"x");
        assert_eq!(coalesce.in_flight(HOST), 0, "polls {polls}");
        assert_eq!(coalesce.stats().upstream(), 1, "polls {polls}");
        assert!(take(&mut handle).is_none());
    }
}

/// Every caller of a coalesced call goes: the upstream call is dropped and the next identical
/// request starts afresh.
#[tokio::test(start_paused = true)]
async fn a_coalesced_call_nobody_waits_for_is_cancelled() {
    let (layer, coalesce) = CoalesceLayer::new().pair();
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let mut svc = layer.layer(mock);
    let mut a = spawn(svc.ready_oneshot_now().call(get(1)));
    let mut b = spawn(svc.ready_oneshot_now().call(get(1)));
    let (_r, send_old) = until_request(&mut a, &mut handle, Duration::from_millis(1), BOUND)
        .await
        .unwrap();
    assert!(b.poll().is_pending());
    drop(a);
    drop(b);
    assert_eq!(coalesce.in_flight(HOST), 0);
    send_old.send_response(status(200, &[]));
    assert_eq!(coalesce.in_flight(HOST), 0);
    let mut c = spawn(svc.ready_oneshot_now().call(get(1)));
    let (_r, send) = until_request(&mut c, &mut handle, Duration::from_millis(1), BOUND)
        .await
        .expect("a new identical request joined a call nobody waited for");
    send.send_response(status(200, &[]));
    timeout(BOUND, c).await.unwrap().unwrap();
}

/// A hedged call dropped after both copies were sent gives back both places of the
/// `ConcurrencyLimit(2)` below it.
#[tokio::test(start_paused = true)]
async fn a_dropped_hedged_call_drops_both_copies() {
    let (layer, hedges) = HedgeLayer::new()
        .with_min_samples(16)
        .with_delay_bounds(Duration::from_millis(10), Duration::from_millis(10))
        .pair();
    let (mock, mut handle) = mock::pair::<Req, Res>();
    let limited = ConcurrencyLimit::new(mock, 2);
    let mut svc = layer.layer(limited.clone());
    for i in 0..40 {
        let mut f = spawn(svc.ready().await.unwrap().call(get(i)));
        let (_r, send) = until_request(&mut f, &mut handle, Duration::from_millis(1), BOUND)
            .await
            .unwrap();
        advance(Duration::from_millis(2)).await;
        send.send_response(status(200, &[]));
        timeout(BOUND, f).await.unwrap().unwrap();
    }
    let delay = hedges.stats(HOST).and_then(|s| s.delay());
    assert_eq!(
        delay,
        Some(Duration::from_millis(10)),
        "the hedge delay after warming"
    );

    let mut call = spawn(svc.ready().await.unwrap().call(get(100)));
    let (_r1, _s1) = until_request(&mut call, &mut handle, Duration::from_millis(1), BOUND)
        .await
        .unwrap();
    let (_r2, _s2) = until_request(
        &mut call,
        &mut handle,
        Duration::from_millis(2),
        Duration::from_millis(50),
    )
    .await
    .expect("no hedge was sent");
    assert_eq!(hedges.stats(HOST).unwrap().hedges(), 1);
    drop(call);
    let mut x = limited.clone();
    let mut y = limited.clone();
    timeout(Duration::from_millis(10), x.ready())
        .await
        .expect("a permit of a dropped hedged call was kept")
        .unwrap();
    timeout(Duration::from_millis(10), y.ready())
        .await
        .expect("a permit of a dropped hedged call was kept")
        .unwrap();
}

/// A service made ready at once (the mock is always ready here) for one call.
trait ReadyNow<R>: Service<R> + Sized {
    fn ready_oneshot_now(&mut self) -> &mut Self;
}

impl<S: Service<Req>> ReadyNow<Req> for S {
    fn ready_oneshot_now(&mut self) -> &mut Self {
        let mut t = spawn(());
        let r = t.enter(|cx, _| self.poll_ready(cx));
        assert!(
            matches!(r, Poll::Ready(Ok(()))),
            "the service was not ready"
        );
        self
    }
}
