#![cfg(feature = "full")]
//! s51a: the numbers of hedge.md (100 samples before hedging, delay bounds 1 ms to 10 s, the
//! budget of 10), coalesce.md (the 1 MiB shared body) and retry.md's deadline against a
//! `Retry-After`, plus hostile `ClientBuilder` and `CallOptions` durations (zero, `MAX`), on
//! paused time over in-process services.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::{find, CallOptions, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::s51a_util::{get, resp, Api};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// An API whose latency is given by the path: `/ms/<n>` sleeps n ms (0: answers at once).
fn latency_api(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let n: u64 = req
            .uri()
            .path()
            .trim_start_matches("/ms/")
            .parse()
            .unwrap_or(0);
        async move {
            if n > 0 {
                tokio::time::sleep(ms(n)).await;
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    })
}

fn at(path: &str) -> Request<Full<Bytes>> {
    get(&format!("http://h.test{path}"))
}

/// hedge.md: "Nothing is hedged until the recent windows hold 100 samples"; the delay is "the
/// host's 95th-percentile latency", read "as the top of its 12.5 % bucket".
#[tokio::test(start_paused = true)]
async fn s51a_hedge_needs_100_samples_then_hedges_after_p95() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(latency_api(calls.clone()));
    for _ in 0..99 {
        svc.clone().oneshot(at("/ms/10")).await.unwrap();
    }
    assert_eq!(handle.stats("h.test").unwrap().samples(), 99);
    svc.clone().oneshot(at("/ms/1000")).await.unwrap();
    let st = handle.stats("h.test").unwrap();
    assert_eq!(st.hedges(), 0, "99 samples: not hedged");
    // `HedgeStats::delay`: "`None` while the recent windows hold fewer samples than the
    // minimum": with 100, a delay.
    assert_eq!(st.samples(), 100);
    assert!(st.delay().is_some(), "100 samples and no delay: {st:?}");
    for _ in 0..20 {
        svc.clone().oneshot(at("/ms/10")).await.unwrap();
    }
    let d = handle.stats("h.test").unwrap().delay().expect("a delay");
    assert!(d >= ms(10) && d <= ms(12), "delay {d:?}");
    let start = Instant::now();
    svc.clone().oneshot(at("/ms/1000")).await.unwrap();
    assert_eq!(handle.stats("h.test").unwrap().hedges(), 1);
    assert_eq!(start.elapsed(), ms(1000), "the first answer wins");
}

/// hedge.md: "The delay is never shorter than 1 ms nor longer than 10 s"; "A call answered
/// without ever waiting (its future ready on the first poll) counts as zero".
#[tokio::test(start_paused = true)]
async fn s51a_hedge_delay_bounds_1ms_and_10s() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(latency_api(calls.clone()));
    for _ in 0..128 {
        svc.clone().oneshot(at("/ms/0")).await.unwrap();
    }
    assert_eq!(handle.stats("h.test").unwrap().delay(), Some(ms(1)));

    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(latency_api(calls.clone()));
    let all: Vec<_> = (0..128)
        .map(|_| svc.clone().oneshot(at("/ms/20000")))
        .collect();
    for r in futures_util::future::join_all(all).await {
        r.unwrap();
    }
    assert_eq!(handle.stats("h.test").unwrap().delay(), Some(secs(10)));
}

/// hedge.md: "the balance is capped at 10, so hedges stay below `5 % of calls + 10`" and "The
/// budget starts full": with a delay learned, 11 slow calls at once get 10 hedges.
#[tokio::test(start_paused = true)]
async fn s51a_hedge_budget_burst_of_10() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (layer, handle) = HedgeLayer::new().with_budget(0.0, 10).unwrap().pair();
    let svc = layer.layer(latency_api(calls.clone()));
    for _ in 0..128 {
        svc.clone().oneshot(at("/ms/10")).await.unwrap();
    }
    assert!(handle.stats("h.test").unwrap().delay().is_some());
    let slow: Vec<_> = (0..11)
        .map(|_| svc.clone().oneshot(at("/ms/500")))
        .collect();
    for r in futures_util::future::join_all(slow).await {
        r.unwrap();
    }
    assert_eq!(handle.stats("h.test").unwrap().hedges(), 10);
}

/// coalesce.md: "The response body is read once, into memory, up to 1 MiB"; "a response whose
/// body is larger than the bound ... is not shared. ... Every other caller sends its own
/// request".
#[tokio::test(start_paused = true)]
async fn s51a_coalesce_shares_exactly_1mib_not_more() {
    const MIB: usize = 1024 * 1024;
    for (size, upstream) in [(MIB, 1usize), (MIB + 1, 2)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let c2 = calls.clone();
        let api = tower::service_fn(move |_r: Request<Full<Bytes>>| {
            c2.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(secs(1)).await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(vec![b'x'; size]))))
            }
        });
        let (layer, handle) = CoalesceLayer::new().pair();
        let svc = layer.layer(api);
        let a = tokio::spawn(svc.clone().oneshot(get("http://c.test/x")));
        let b = tokio::spawn(svc.clone().oneshot(get("http://c.test/x")));
        for h in [a, b] {
            let res = h.await.unwrap().unwrap();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), size);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            upstream,
            "body of {size} bytes"
        );
        if upstream == 2 {
            assert_eq!(handle.stats().too_large(), 1);
        }
    }
}

/// retry.md: "Deadline: `.with_deadline(d)` bounds attempts and sleeps together; no sleep is
/// started that would end past it"; a `Retry-After` "past the deadline ... is not slept: on a
/// 429 or a 503 the call fails at once with a `RateLimited`".
#[tokio::test(start_paused = true)]
async fn s51a_deadline_against_retry_after() {
    for (ra, deadline, retried) in [("4", secs(5), true), ("6", secs(5), false)] {
        let api = Api::new(move |n, _| {
            Ok(if n == 0 {
                resp(503, &[("retry-after", ra)])
            } else {
                resp(200, &[])
            })
        });
        let svc = RetryLayer::new()
            .with_seed(1)
            .with_retry_after_jitter(0.0)
            .layer(api.service::<Full<Bytes>>());
        let mut req = get("http://a.test/x");
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(deadline));
        let start = Instant::now();
        let r = svc.oneshot(req).await;
        if retried {
            assert_eq!(r.unwrap().status(), 200);
            assert_eq!(start.elapsed(), secs(4));
        } else {
            let err = r.unwrap_err();
            assert_eq!(start.elapsed(), Duration::ZERO);
            assert_eq!(find::<RateLimited>(&*err).unwrap().retry_after(), secs(6));
        }
    }
}

/// RELIABILITY.md: "durations set to `Duration::MAX` (deadlines, timeouts, open periods, hedge
/// delays) | read as about 30 years from now; never a panic"; zero durations must not hang or
/// panic either.
#[tokio::test(start_paused = true)]
async fn s51a_client_builder_hostile_durations() {
    let api = Api::always(200, &[]);
    let client = ClientBuilder::new()
        .with_attempt_timeout(Duration::MAX)
        .with_retry(
            RetryLayer::new()
                .with_deadline(Duration::MAX)
                .with_max_retry_after(Duration::MAX)
                .with_attempt_timeout(Duration::MAX),
        )
        .with_hedge(
            HedgeLayer::new()
                .with_delay_bounds(Duration::MAX, Duration::MAX)
                .with_window(Duration::MAX),
        )
        .build(api.service::<Full<Bytes>>());
    assert_eq!(
        client
            .clone()
            .oneshot(get("http://a.test/x"))
            .await
            .unwrap()
            .status(),
        200
    );
    for opts in [
        CallOptions::new().with_deadline(Duration::MAX),
        CallOptions::new().with_attempt_timeout(Duration::MAX),
        CallOptions::new().with_deadline(Duration::ZERO),
        CallOptions::new().with_attempt_timeout(Duration::ZERO),
        CallOptions::new().with_max_attempts(u32::MAX),
    ] {
        let mut req = get("http://a.test/x");
        req.extensions_mut().insert(opts.clone());
        let r = tokio::time::timeout(secs(3600), client.clone().oneshot(req)).await;
        assert!(r.is_ok(), "{opts:?}: hung");
    }
    let zero = ClientBuilder::new()
        .with_attempt_timeout(Duration::ZERO)
        .build(api.service::<Full<Bytes>>());
    let r = tokio::time::timeout(secs(3600), zero.oneshot(get("http://a.test/x"))).await;
    assert!(r.is_ok(), "a zero attempt timeout hung");
}
