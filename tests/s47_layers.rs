//! Time bounds of the other layers against a peer that stalls: the circuit breaker's open period
//! (`with_open_duration`) after attempts that time out, and the retry layer waiting for a probe
//! only when the deadline fits it; the coalescing layer's body timeout ("the shared response's
//! body did not arrive within 30s of its head"); the pager's page timeout ("covers the response
//! head and the whole body"); the hedge delay bounds; and, on paused time in process, the rate
//! limiter's `max_wait` and its 5-minute pause cap. Real time on loopback for the sockets.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, CircuitOpen, Delivery, ErrorKind, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::paginate::{JsonCursor, Paginate};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use crate::s47_util::{get, Peer, Phase};

fn fast_retry() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(30)).unwrap(),
    )
}

fn sturdy_kind(err: &BoxError) -> ErrorKind {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .expect("a sturdy error")
        .kind()
        .clone()
}

async fn go<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Result<S::Response, BoxError>
where
    S: Service<Request<Full<Bytes>>, Error = BoxError>,
{
    tokio::time::timeout(Duration::from_secs(3), async {
        svc.ready().await?.call(req).await
    })
    .await
    .expect("hung")
}

fn with(mut req: Request<Full<Bytes>>, o: CallOptions) -> Request<Full<Bytes>> {
    req.extensions_mut().insert(o);
    req
}

/// Two timed-out attempts open the breaker for 300 ms; a call then fails at once, `NotSent`, the
/// peer sees nothing; a call whose deadline cannot fit `retry_in` fails at once; one whose
/// deadline fits waits for the probe and succeeds, through the same kept service.
#[tokio::test]
async fn a_stalling_host_opens_the_breaker_for_the_open_period() {
    let peer = Peer::start(Phase::ReadNoHead).await;
    let client = ClientBuilder::new()
        .with_retry(fast_retry())
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(2)
                .with_open_duration(Duration::from_millis(300), Duration::from_secs(1)),
        )
        .with_attempt_timeout(Duration::from_millis(80))
        .build(sturdy_chaos::http_client());
    let mut svc = ServiceBuilder::new()
        .layer(tower::buffer::BufferLayer::new(4))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1))
        .service(client);
    for _ in 0..2 {
        let err = go(
            &mut svc,
            with(get(&peer.url("/s")), CallOptions::new().without_retries()),
        )
        .await
        .expect_err("stalled");
        assert_eq!(sturdy_kind(&err), ErrorKind::Timeout, "{err}");
    }
    let seen = peer.seen().len();
    let t0 = Instant::now();
    let err = go(
        &mut svc,
        with(get(&peer.url("/s")), CallOptions::new().without_retries()),
    )
    .await
    .expect_err("open");
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("CircuitOpen");
    assert!(open.retry_in() <= Duration::from_millis(300), "{open:?}");
    assert!(open.retry_in() > Duration::ZERO, "{open:?}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("try again in"), "{err}");
    // A deadline shorter than retry_in: fails at once.
    let t1 = Instant::now();
    let err = go(
        &mut svc,
        with(
            get(&peer.url("/s")),
            CallOptions::new().with_deadline(Duration::from_millis(50)),
        ),
    )
    .await
    .expect_err("open");
    assert!(
        t1.elapsed() < Duration::from_millis(40),
        "waited {:?}: {err}",
        t1.elapsed()
    );
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(
        peer.seen().len(),
        seen,
        "an open breaker let a call through"
    );
    // A deadline that fits retry_in: waits for the probe, which the healthy peer answers.
    peer.set(Phase::Healthy);
    let t2 = Instant::now();
    let res = go(
        &mut svc,
        with(
            get(&peer.url("/s")),
            CallOptions::new().with_deadline(Duration::from_secs(1)),
        ),
    )
    .await
    .expect("the probe after the open period");
    assert_eq!(res.status(), 200);
    assert!(
        t2.elapsed() <= Duration::from_millis(900),
        "{:?}",
        t2.elapsed()
    );
}

#[tokio::test]
async fn a_shared_body_that_stalls_after_its_head_ends_at_the_coalescing_body_timeout() {
    for phase in [Phase::HeadMidBody, Phase::ChunkedStall] {
        let peer = Peer::start(phase).await;
        let client = ClientBuilder::new()
            .with_retry(fast_retry())
            .with_coalesce(CoalesceLayer::new().with_body_timeout(Duration::from_millis(150)))
            .with_attempt_timeout(Duration::from_secs(1))
            .build(sturdy_chaos::http_client());
        let t0 = Instant::now();
        let (a, b) = tokio::join!(
            tokio::time::timeout(
                Duration::from_secs(3),
                client.clone().oneshot(get(&peer.url("/c")))
            ),
            tokio::time::timeout(
                Duration::from_secs(3),
                client.clone().oneshot(get(&peer.url("/c")))
            ),
        );
        let took = t0.elapsed();
        assert!(took <= Duration::from_millis(450), "{phase:?}: {took:?}");
        for r in [a, b] {
            let err = r.expect("hung").expect_err("the body never came");
            let text = err.to_string();
            assert_eq!(sturdy_kind(&err), ErrorKind::Timeout, "{phase:?}: {text}");
            assert!(text.contains("150ms"), "{phase:?}: {text}");
            assert!(text.contains("head"), "{phase:?}: {text}");
            // The head came: the request was certainly received.
            assert_eq!(
                delivery(&*err),
                Delivery::MaybeProcessed,
                "{phase:?}: {text}"
            );
        }
        assert_eq!(peer.seen().len(), 1, "{phase:?}: not shared");
        peer.set(Phase::Healthy);
        let res = tokio::time::timeout(
            Duration::from_secs(2),
            client.clone().oneshot(get(&peer.url("/c"))),
        )
        .await
        .expect("hung")
        .expect("the next call proceeds");
        let body = tokio::time::timeout(Duration::from_secs(1), res.into_body().collect())
            .await
            .expect("hung")
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}

/// "the timeout covers the response head and the whole body, so a server that sends the head
/// and then stalls the body cannot hang a walk" - at each phase of the stall.
#[tokio::test]
async fn a_page_that_stalls_at_any_phase_ends_at_the_page_timeout() {
    for phase in [
        Phase::Silent,
        Phase::ReadNoHead,
        Phase::HeadMidBody,
        Phase::ChunkedStall,
        Phase::TrickleBody,
        Phase::TrickleAll,
    ] {
        let peer = Peer::start(phase).await;
        let client = ClientBuilder::new()
            .with_retry(fast_retry())
            .build(sturdy_chaos::http_client());
        let pager = Paginate::builder(
            client,
            &peer.url("/items"),
            JsonCursor::new("/data", "/next"),
        )
        .with_page_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
        let t0 = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(3), pager.page(None, 5))
            .await
            .expect("page() hung")
            .expect_err("a stalled page");
        let took = t0.elapsed();
        assert!(
            took <= Duration::from_millis(600),
            "{phase:?}: {took:?}: {err}"
        );
        assert!(
            took >= Duration::from_millis(180),
            "{phase:?}: {took:?}: {err}"
        );
        assert_eq!(err.kind(), &ErrorKind::Timeout, "{phase:?}: {err}");
        assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{phase:?}: {err}");
    }
}

/// The page timeout's message names the duration it waited.
#[tokio::test]
async fn a_page_timeout_names_its_duration() {
    let peer = Peer::start(Phase::HeadMidBody).await;
    let client = ClientBuilder::new().build(sturdy_chaos::http_client());
    let pager = Paginate::builder(
        client,
        &peer.url("/items"),
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_millis(200))
    .build()
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(3), pager.page(None, 5))
        .await
        .expect("page() hung")
        .expect_err("a stalled page");
    assert!(err.to_string().contains("200ms"), "{err}");
}

/// "The delay is never shorter than 1 ms nor longer than 10 s (`.with_delay_bounds(min, max)`)":
/// with bounds of 60..100 ms, a first copy that stalls is hedged between them, and the call ends
/// with the second copy's answer.
#[tokio::test]
async fn a_stalled_first_copy_is_hedged_within_the_delay_bounds() {
    let peer = Peer::start(Phase::Healthy).await;
    let svc = ServiceBuilder::new()
        .layer(
            HedgeLayer::new()
                .with_min_samples(5)
                .with_delay_bounds(Duration::from_millis(60), Duration::from_millis(100)),
        )
        .service(sturdy_chaos::http_client());
    for _ in 0..40 {
        let res = tokio::time::timeout(
            Duration::from_secs(1),
            svc.clone().oneshot(get(&peer.url("/h"))),
        )
        .await
        .expect("hung")
        .unwrap();
        let _ = res.into_body().collect().await;
    }
    peer.set(Phase::ReadNoHead);
    let n0 = peer.seen().len();
    let watcher = {
        let peer = peer.clone();
        tokio::spawn(async move {
            while peer.seen().len() == n0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            peer.set(Phase::Healthy);
            Instant::now()
        })
    };
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(2),
        svc.clone().oneshot(get(&peer.url("/h"))),
    )
    .await
    .expect("no hedge rescued the stalled copy")
    .unwrap();
    let took = t0.elapsed();
    assert_eq!(res.status(), 200);
    assert!(
        took >= Duration::from_millis(55),
        "hedged too soon: {took:?}"
    );
    assert!(
        took <= Duration::from_millis(300),
        "hedged too late: {took:?}"
    );
    assert_eq!(peer.seen().len(), n0 + 2);
    let _ = watcher.await;
}

fn ok_service(
    hits: Arc<AtomicUsize>,
    first: u16,
    retry_after: &'static str,
) -> tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, Infallible> {
    tower::util::BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let n = hits.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::from("ok"));
            if n == 0 && first != 200 {
                *res.status_mut() = http::StatusCode::from_u16(first).unwrap();
                res.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static(retry_after));
            }
            Ok(res)
        }
    }))
}

/// `max_wait` counts the calls ahead: with one call per 100 ms and a 250 ms bound, the 2nd and
/// 3rd wait their turn, the 4th is refused at once with the wait it would have had.
#[tokio::test(start_paused = true)]
async fn max_wait_refuses_at_once_a_turn_past_it() {
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(Quota::per_second(10).unwrap().with_burst(1).unwrap())
                .with_max_wait(Duration::from_millis(250)),
        )
        .service(ok_service(hits.clone(), 200, ""));
    let t0 = Instant::now();
    svc.clone().oneshot(get("http://h.test/a")).await.unwrap();
    let a = tokio::spawn(svc.clone().oneshot(get("http://h.test/a")));
    let b = tokio::spawn(svc.clone().oneshot(get("http://h.test/a")));
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    let t1 = Instant::now();
    let err = svc
        .clone()
        .oneshot(get("http://h.test/a"))
        .await
        .expect_err("a turn past max_wait");
    assert_eq!(t1.elapsed(), Duration::ZERO, "the refusal waited");
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert!(rl.retry_after() > Duration::from_millis(250), "{rl:?}");
    assert!(rl.retry_after() <= Duration::from_millis(310), "{rl:?}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert!(
        t0.elapsed() <= Duration::from_millis(210),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

/// "every caller paused on 429 ... (capped at 5 min)": a Retry-After of a day pauses later
/// callers of the host for at most 5 minutes.
#[tokio::test(start_paused = true)]
async fn a_pause_of_a_day_is_capped_at_five_minutes() {
    let hits = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::adaptive_only().with_max_wait(Duration::from_secs(3600)))
        .service(ok_service(hits.clone(), 429, "86400"));
    let res = svc.clone().oneshot(get("http://h.test/a")).await.unwrap();
    assert_eq!(res.status(), 429);
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(3600),
        svc.clone().oneshot(get("http://h.test/a")),
    )
    .await
    .expect("paused past the hour")
    .unwrap();
    assert_eq!(res.status(), 200);
    let took = t0.elapsed();
    assert!(took <= Duration::from_secs(301), "{took:?}");
    assert!(took >= Duration::from_secs(299), "{took:?}");
}

/// The concurrency guide: "A call that finds its host's limit full waits in line ... for up to
/// 30 s (`.with_max_wait(d)`) ... Past the wait, the call fails without being sent: ... kind
/// `RateLimited` ..., delivery `NotSent`", and "a dropped call in flight gives its permit back".
/// A first call stalls on the peer, holding the host's only permit; the second gives up at the
/// wait; once the first is dropped, the next call proceeds.
#[tokio::test]
async fn a_call_behind_a_stalled_one_gives_up_at_max_wait_and_the_permit_comes_back() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let peer = Peer::start(Phase::ReadNoHead).await;
    let svc = ServiceBuilder::new()
        .layer(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_initial_limit(1)
                .with_max_wait(Duration::from_millis(150)),
        )
        .service(sturdy_chaos::http_client());
    let first = tokio::spawn(svc.clone().oneshot(get(&peer.url("/slow"))));
    while peer.seen().is_empty() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t0 = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(2),
        svc.clone().oneshot(get(&peer.url("/next"))),
    )
    .await
    .expect("the wait in line hung")
    .expect_err("the limit is full");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(140), "{took:?}: {err}");
    assert!(took <= Duration::from_millis(450), "{took:?}: {err}");
    assert!(
        matches!(sturdy_kind(&err), ErrorKind::RateLimited { .. }),
        "{err}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("150ms"), "names the wait: {err}");
    assert_eq!(peer.seen().len(), 1, "the refused call was sent");
    first.abort();
    let _ = first.await;
    peer.set(Phase::Healthy);
    let res = tokio::time::timeout(
        Duration::from_secs(2),
        svc.clone().oneshot(get(&peer.url("/after"))),
    )
    .await
    .expect("the dropped call kept its permit")
    .unwrap();
    assert_eq!(res.status(), 200);
}
