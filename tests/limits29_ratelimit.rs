//! Rate limiting as docs/guides/ratelimit.md and the `sturdy-ratelimit` docs describe it: quotas
//! at their edges, the line and its cancellation, hostile pause headers, bounded keys.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Request, Response, StatusCode};
use sturdy::core::events::Event;
use sturdy::core::{BoxError, RateLimited, WallClock};
use sturdy::ratelimit::{
    DirectLimiter, PauseCapped, PauseSource, Quota, RateLimitLayer, DEFAULT_MAX_PAUSE,
};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

type Resp = Response<()>;

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

fn ok_api(
) -> impl Service<Request<()>, Response = Resp, Error = std::convert::Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    service_fn(|_req: Request<()>| async { Ok::<_, std::convert::Infallible>(Response::new(())) })
}

/// An API answering every call with `status` and the given raw headers.
fn answering(
    status: u16,
    headers: Vec<(&'static str, Vec<u8>)>,
) -> impl Service<Request<()>, Response = Resp, Error = std::convert::Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    let headers = Arc::new(headers);
    service_fn(move |_req: Request<()>| {
        let headers = headers.clone();
        async move {
            let mut res = Response::builder().status(status).body(()).unwrap();
            for (name, value) in headers.iter() {
                res.headers_mut()
                    .append(*name, HeaderValue::from_bytes(value).unwrap());
            }
            Ok::<_, std::convert::Infallible>(res)
        }
    })
}

/// A wall clock stopped at a fixed instant, for HTTP dates and epoch resets.
#[derive(Debug)]
struct Fixed(SystemTime);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn fixed_now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_225_600) // 2026-01-01T00:00:00Z
}

/// The pause one response with `status` and `headers` leaves on `api.test`, and that response.
async fn pause_after(
    status: u16,
    headers: Vec<(&'static str, Vec<u8>)>,
) -> (Option<Duration>, Resp) {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_clock(Arc::new(Fixed(fixed_now())))
        .pair();
    let res = layer
        .layer(answering(status, headers))
        .oneshot(get("api.test"))
        .await
        .unwrap();
    (handle.pause("api.test"), res)
}

fn rate_limited(err: &BoxError) -> &RateLimited {
    sturdy::core::find::<RateLimited>(&**err)
        .unwrap_or_else(|| panic!("a RateLimited in the chain: {err}"))
}

// ---------------------------------------------------------------- quotas

#[test]
fn quota_refuses_zero_calls_zero_period_and_zero_burst_naming_each() {
    let calls = Quota::new(0, Duration::from_secs(1))
        .unwrap_err()
        .to_string();
    let period = Quota::new(1, Duration::ZERO).unwrap_err().to_string();
    let per_second = Quota::per_second(0).unwrap_err().to_string();
    let per_minute = Quota::per_minute(0).unwrap_err().to_string();
    let burst = Quota::per_second(1)
        .unwrap()
        .with_burst(0)
        .unwrap_err()
        .to_string();
    for m in [&calls, &per_second, &per_minute] {
        assert!(m.contains("call"), "names the calls: {m}");
    }
    assert!(period.contains("period"), "names the period: {period}");
    assert!(burst.contains("burst"), "names the burst: {burst}");
}

#[test]
fn quota_doc_sentence_burst_5_then_every_100ms() {
    let q = Quota::per_second(10).unwrap().with_burst(5).unwrap();
    assert_eq!(q.interval(), Duration::from_millis(100));
    assert_eq!(q.burst(), 5);
    assert_eq!(
        Quota::per_minute(1).unwrap().interval(),
        Duration::from_secs(60)
    );
    assert_eq!(Quota::per_second(1).unwrap().burst(), 1, "a burst of 1");
}

#[test]
fn quota_of_u32_max_per_second_is_accepted() {
    // `per_second`: "When `calls` is 0." `new`: "When `calls` is 0 or `period` is zero."
    let q = Quota::per_second(u32::MAX).expect("u32::MAX calls per second is not 0");
    assert!(
        q.interval() >= Duration::from_nanos(1),
        "{:?}",
        q.interval()
    );
    Quota::new(u32::MAX, Duration::from_secs(1)).expect("neither zero calls nor a zero period");
}

#[test]
fn quota_of_u32_max_over_a_long_period_and_burst_is_accepted() {
    let q = Quota::new(u32::MAX, Duration::MAX).unwrap();
    assert!(q.interval() > Duration::ZERO);
    let q = Quota::per_second(1_000_000_000)
        .unwrap()
        .with_burst(u32::MAX)
        .unwrap();
    assert_eq!(q.interval(), Duration::from_nanos(1));
    assert_eq!(q.burst(), u32::MAX);
}

#[tokio::test(start_paused = true)]
async fn quota_of_a_billion_a_second_lets_a_thousand_calls_through_without_waiting() {
    let q = Quota::per_second(1_000_000_000)
        .unwrap()
        .with_burst(u32::MAX)
        .unwrap();
    let svc = RateLimitLayer::new(q)
        .with_max_wait(Duration::ZERO)
        .layer(ok_api());
    let start = Instant::now();
    for _ in 0..1000 {
        svc.clone().oneshot(get("api.test")).await.unwrap();
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn quota_one_per_duration_max_lets_the_burst_through_then_refuses() {
    let q = Quota::new(1, Duration::MAX).unwrap().with_burst(2).unwrap();
    let svc = RateLimitLayer::new(q).layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(1), svc.clone().oneshot(get("api.test")))
        .await
        .expect("refused at once, not held")
        .unwrap_err();
    let wait = rate_limited(&err).retry_after();
    assert!(
        wait > Duration::from_secs(20 * 365 * 86_400),
        "about 30 years: {wait:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn doc_example_fifteen_calls_take_one_second() {
    let client = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(
            Quota::per_second(10).unwrap().with_burst(5).unwrap(),
        ))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(8))
        .service(ok_api());
    let start = Instant::now();
    for _ in 0..15 {
        client
            .clone()
            .oneshot(get("api.example.com"))
            .await
            .unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_leave_in_order_at_the_quota_pace() {
    let svc =
        RateLimitLayer::new(Quota::per_second(10).unwrap().with_burst(5).unwrap()).layer(ok_api());
    let start = Instant::now();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..15 {
        let svc = svc.clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(get("api.test")).await.unwrap();
            order.lock().unwrap().push((i, start.elapsed()));
        }));
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let ids: Vec<_> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(ids, (0..15).collect::<Vec<_>>(), "first come, first served");
    for (i, at) in order {
        let expected = Duration::from_millis(100 * (i.max(4) as u64 - 4));
        assert_eq!(at, expected, "call {i}");
    }
}

// ---------------------------------------------------------------- max_wait

#[tokio::test(start_paused = true)]
async fn zero_max_wait_never_waits_and_carries_the_wait() {
    let svc = RateLimitLayer::new(Quota::per_second(10).unwrap())
        .with_max_wait(Duration::ZERO)
        .layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let start = Instant::now();
    let err = svc.clone().oneshot(get("api.test")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(rate_limited(&err).retry_after(), Duration::from_millis(100));
    let text = err.to_string();
    assert!(
        text.contains("api.test") && text.contains("retry after 100ms"),
        "names the host and the wait: {text}"
    );
}

#[tokio::test(start_paused = true)]
async fn max_wait_counts_the_calls_ahead_in_line() {
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_millis(2_500))
        .layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let a = tokio::spawn(svc.clone().oneshot(get("api.test")));
    let b = tokio::spawn(svc.clone().oneshot(get("api.test")));
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    let start = Instant::now();
    let err = svc.clone().oneshot(get("api.test")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "fails at once");
    let wait = rate_limited(&err).retry_after();
    assert!(
        wait >= Duration::from_millis(2_500) && wait <= Duration::from_secs(3),
        "two ahead of it, so about 3 s: {wait:?}"
    );
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_wait_duration_max_does_not_panic() {
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::MAX)
        .layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let start = Instant::now();
    svc.clone().oneshot(get("api.test")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn setters_at_extremes_never_panic() {
    let layer = RateLimitLayer::adaptive_only()
        .with_max_wait(Duration::MAX)
        .with_default_pause(Duration::MAX)
        .with_max_pause(Duration::MAX)
        .with_release_pace(Duration::MAX)
        .with_max_keys(0);
    layer.layer(ok_api()).oneshot(get("a.test")).await.unwrap();
    let layer = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_release_pace(Duration::ZERO)
        .with_max_keys(usize::MAX);
    layer.layer(ok_api()).oneshot(get("a.test")).await.unwrap();
}

// ---------------------------------------------------------------- cancellation

#[tokio::test(start_paused = true)]
async fn hundred_aborted_waiters_cost_the_next_caller_nothing() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_secs(1_000))
        .pair();
    let svc = layer.layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let waiters: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("api.test"))))
        .collect();
    for _ in 0..1_000 {
        if handle.waiting("api.test") == 100 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(handle.waiting("api.test"), 100);
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        assert!(w.await.unwrap_err().is_cancelled());
    }
    assert_eq!(
        handle.waiting("api.test"),
        0,
        "the aborted calls left the line"
    );
    let start = Instant::now();
    svc.clone().oneshot(get("api.test")).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "one interval, not 101"
    );
}

#[tokio::test(start_paused = true)]
async fn timeout_above_a_waiting_call_gives_its_place_back() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap()).pair();
    let svc = tower::ServiceBuilder::new()
        .timeout(Duration::from_millis(300))
        .layer(layer)
        .service(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    // Three calls time out in line (at 0.3, 0.6 and 0.9 s, before the next slot at 1 s).
    for _ in 0..3 {
        let err = svc.clone().oneshot(get("api.test")).await.unwrap_err();
        assert!(err.is::<tower::timeout::error::Elapsed>(), "{err}");
    }
    assert_eq!(handle.waiting("api.test"), 0);
    // At 1.5 s the slot at 1 s is free: the timed-out calls reserved nothing.
    tokio::time::advance(Duration::from_millis(600)).await;
    let start = Instant::now();
    svc.clone().oneshot(get("api.test")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn ready_but_never_called_service_reserves_no_slot() {
    let svc = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::ZERO)
        .layer(ok_api());
    let mut idle = svc.clone();
    ServiceExt::<Request<()>>::ready(&mut idle).await.unwrap();
    // The ready clone holds nothing: another caller takes the slot.
    svc.clone().oneshot(get("api.test")).await.unwrap();
    // The ready clone, called now, finds the slot gone and is refused at once.
    let err = idle.call(get("api.test")).await.unwrap_err();
    assert_eq!(rate_limited(&err).retry_after(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn dropped_response_future_before_its_first_poll_keeps_nothing() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap()).pair();
    let svc = layer.layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    for _ in 0..10 {
        let mut s = svc.clone();
        ServiceExt::<Request<()>>::ready(&mut s).await.unwrap();
        let fut = s.call(get("api.test"));
        drop(fut);
    }
    assert_eq!(handle.waiting("api.test"), 0);
    let start = Instant::now();
    svc.clone().oneshot(get("api.test")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_head_of_the_line_moves_the_next_up() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap()).pair();
    let svc = layer.layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let head = tokio::spawn(svc.clone().oneshot(get("api.test")));
    tokio::task::yield_now().await;
    let start = Instant::now();
    let second = tokio::spawn(svc.clone().oneshot(get("api.test")));
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting("api.test"), 2);
    tokio::time::advance(Duration::from_millis(500)).await;
    head.abort();
    second.await.unwrap().unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "the second took the head's slot"
    );
}

// ---------------------------------------------------------------- composition

#[tokio::test(start_paused = true)]
async fn kept_service_under_buffer_in_a_loop() {
    let rl = RateLimitLayer::new(Quota::per_second(10).unwrap()).layer(ok_api());
    let mut svc = tower::buffer::Buffer::new(rl, 4);
    let start = Instant::now();
    for _ in 0..20 {
        svc.ready()
            .await
            .unwrap()
            .call(get("api.test"))
            .await
            .unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_millis(1_900));
}

#[tokio::test(start_paused = true)]
async fn buffer_over_ratelimit_from_many_tasks() {
    let rl = RateLimitLayer::new(Quota::per_second(100).unwrap()).layer(ok_api());
    let svc = tower::buffer::Buffer::new(rl, 2);
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let mut svc = svc.clone();
            let done = done.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    svc.ready()
                        .await
                        .unwrap()
                        .call(get("api.test"))
                        .await
                        .unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("no deadlock");
    assert_eq!(done.load(Ordering::SeqCst), 100);
    assert!(start.elapsed() >= Duration::from_millis(990));
}

#[tokio::test(start_paused = true)]
async fn ratelimit_under_buffer_under_ratelimit_kept_and_shared() {
    // RateLimit over Buffer over a slow API.
    let slow = service_fn(|_req: Request<()>| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Ok::<_, std::convert::Infallible>(Response::new(()))
    });
    let buffered = tower::buffer::Buffer::new(slow, 1);
    let svc = RateLimitLayer::new(Quota::per_second(20).unwrap()).layer(buffered);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    svc.ready()
                        .await
                        .unwrap()
                        .call(get("api.test"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("no deadlock");
}

#[tokio::test(start_paused = true)]
async fn over_concurrency_limit_1_a_kept_service_and_many_tasks_finish() {
    let slow = service_fn(|_req: Request<()>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, std::convert::Infallible>(Response::new(()))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(Quota::per_second(50).unwrap()))
        .concurrency_limit(1)
        .service(slow);
    let mut kept = svc.clone();
    for _ in 0..5 {
        kept.ready()
            .await
            .unwrap()
            .call(get("api.test"))
            .await
            .unwrap();
    }
    drop(kept);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for _ in 0..3 {
                    svc.ready()
                        .await
                        .unwrap()
                        .call(get("api.test"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(tasks),
    )
    .await
    .expect("no deadlock");
}

#[tokio::test(start_paused = true)]
async fn under_global_concurrency_limit_at_most_n_wait_in_line() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap()).pair();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(2))
        .service(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("api.test"))))
        .collect();
    let mut max_waiting = 0;
    for _ in 0..12 {
        tokio::task::yield_now().await;
        max_waiting = max_waiting.max(handle.waiting("api.test"));
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    assert!(max_waiting <= 2, "at most n wait in line: {max_waiting}");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("finishes")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn ready_then_dropped_under_concurrency_limit_1_releases_the_permit() {
    let svc = tower::ServiceBuilder::new()
        .layer(RateLimitLayer::new(Quota::per_second(10).unwrap()))
        .concurrency_limit(1)
        .service(ok_api());
    for _ in 0..3 {
        let mut s = svc.clone();
        ServiceExt::<Request<()>>::ready(&mut s).await.unwrap();
        drop(s);
    }
    tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(get("api.test")))
        .await
        .expect("the permit was given back")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn two_layers_from_one_new_share_one_quota() {
    let batch = RateLimitLayer::new(Quota::per_second(1).unwrap());
    let interactive = batch.clone().with_max_wait(Duration::ZERO);
    let b = batch.layer(ok_api());
    let i = interactive.layer(ok_api());
    b.clone().oneshot(get("api.test")).await.unwrap();
    let err = i.clone().oneshot(get("api.test")).await.unwrap_err();
    assert_eq!(rate_limited(&err).retry_after(), Duration::from_secs(1));
    // with_key shares the state too.
    let keyed = batch
        .clone()
        .with_max_wait(Duration::ZERO)
        .with_key(|_req: &Request<()>| "api.test".to_string());
    let err = keyed
        .layer(ok_api())
        .oneshot(get("other.test"))
        .await
        .unwrap_err();
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some());
}

#[tokio::test(start_paused = true)]
async fn with_max_keys_after_the_first_call_changes_nothing() {
    let layer = RateLimitLayer::adaptive_only().with_max_keys(2);
    let (layer, handle) = layer.pair();
    let svc = layer.clone().layer(answering(429, vec![]));
    svc.clone().oneshot(get("a.test")).await.unwrap();
    let bigger = layer.with_max_keys(100).layer(answering(429, vec![]));
    for i in 0..10 {
        bigger
            .clone()
            .oneshot(get(&format!("h{i}.test")))
            .await
            .unwrap();
    }
    assert!(
        handle.paused().len() <= 3,
        "still 2 + overflow: {:?}",
        handle.paused()
    );
}

// ---------------------------------------------------------------- DirectLimiter

#[tokio::test(start_paused = true)]
async fn direct_limiter_doc_example() {
    let limiter = DirectLimiter::new(Quota::per_second(2).unwrap());
    assert!(limiter.check().is_ok());
    let err = limiter.check().unwrap_err();
    assert_eq!(err.retry_after(), Duration::from_millis(500));
    let start = Instant::now();
    limiter.until_ready(Duration::from_secs(1)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn direct_limiter_reserve_is_kept_whether_used_or_not() {
    let limiter = DirectLimiter::new(Quota::per_second(10).unwrap());
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::ZERO
    );
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::from_millis(100)
    );
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::from_millis(200)
    );
    // Too far: refused, nothing reserved.
    let err = limiter.reserve(Duration::from_millis(250)).unwrap_err();
    assert_eq!(err.retry_after(), Duration::from_millis(300));
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::from_millis(300)
    );
}

#[tokio::test(start_paused = true)]
async fn direct_limiter_check_refuses_while_someone_waits_in_line() {
    let limiter = Arc::new(DirectLimiter::new(Quota::per_second(1).unwrap()));
    limiter.check().unwrap();
    let l = limiter.clone();
    let waiter = tokio::spawn(async move { l.until_ready(Duration::from_secs(5)).await });
    tokio::task::yield_now().await;
    tokio::time::advance(Duration::from_millis(1_000)).await;
    // The slot is free now, but a waiter is in line: check does not jump ahead of it.
    let checked = limiter.check();
    waiter.await.unwrap().unwrap();
    assert!(checked.is_err(), "check jumped the line");
}

#[tokio::test(start_paused = true)]
async fn direct_limiter_aborted_waiters_leave_the_line() {
    let limiter = Arc::new(DirectLimiter::new(
        Quota::per_second(20).unwrap().with_burst(5).unwrap(),
    ));
    for _ in 0..5 {
        limiter.check().unwrap();
    }
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let l = limiter.clone();
            tokio::spawn(async move { l.until_ready(Duration::from_secs(100)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    for w in &waiters {
        w.abort();
    }
    for w in waiters {
        let _ = w.await;
    }
    let start = Instant::now();
    limiter.until_ready(Duration::from_secs(100)).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(50));
}

#[tokio::test(start_paused = true)]
async fn direct_limiter_until_ready_refuses_at_once_past_max_wait() {
    let limiter = DirectLimiter::new(Quota::per_second(1).unwrap());
    limiter.check().unwrap();
    let start = Instant::now();
    let err = limiter
        .until_ready(Duration::from_millis(500))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(err.retry_after(), Duration::from_secs(1));
}

// ---------------------------------------------------------------- hostile pause headers

#[tokio::test(start_paused = true)]
async fn retry_after_twenty_nines_is_capped_at_five_minutes_and_reported() {
    let (pause, res) =
        pause_after(429, vec![("retry-after", b"99999999999999999999".to_vec())]).await;
    assert_eq!(pause, Some(DEFAULT_MAX_PAUSE));
    assert_eq!(DEFAULT_MAX_PAUSE, Duration::from_secs(300));
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "returned as it came"
    );
    let capped = res.extensions().get::<PauseCapped>().expect("PauseCapped");
    assert_eq!(capped.applied(), Duration::from_secs(300));
    assert!(capped.asked() > Duration::from_secs(300));
    assert_eq!(capped.source(), PauseSource::RetryAfter);
}

#[tokio::test(start_paused = true)]
async fn retry_after_of_100_kb_of_digits_is_capped_quickly() {
    let value = vec![b'9'; 100 * 1024];
    // CPU time spent reading the header: the tokio clock is paused here.
    #[allow(clippy::disallowed_methods)]
    let wall = std::time::Instant::now();
    let (pause, res) = pause_after(429, vec![("retry-after", value)]).await;
    assert!(
        wall.elapsed() < Duration::from_secs(1),
        "{:?}",
        wall.elapsed()
    );
    assert_eq!(pause, Some(DEFAULT_MAX_PAUSE));
    assert!(res.extensions().get::<PauseCapped>().is_some());
}

#[tokio::test(start_paused = true)]
async fn retry_after_of_100_kb_of_garbage_is_a_bare_429() {
    let value = b"x,".repeat(50 * 1024);
    let (pause, _) = pause_after(429, vec![("retry-after", value)]).await;
    assert_eq!(pause, Some(Duration::from_secs(1)), "the default pause");
}

#[tokio::test(start_paused = true)]
async fn retry_after_negative_is_not_a_wait() {
    let (pause, res) = pause_after(429, vec![("retry-after", b"-5".to_vec())]).await;
    assert_eq!(pause, Some(Duration::from_secs(1)), "read as a bare 429");
    assert!(res.extensions().get::<PauseCapped>().is_none());
}

#[tokio::test(start_paused = true)]
async fn retry_after_fractional_is_not_seconds() {
    let (pause, _) = pause_after(429, vec![("retry-after", b"2.5".to_vec())]).await;
    assert_eq!(pause, Some(Duration::from_secs(1)), "read as a bare 429");
}

#[tokio::test(start_paused = true)]
async fn retry_after_non_ascii_bytes_do_not_panic() {
    let (pause, _) = pause_after(429, vec![("retry-after", vec![0xff, b'1', 0xe9])]).await;
    assert_eq!(pause, Some(Duration::from_secs(1)));
    let (pause, _) = pause_after(429, vec![("retry-after", "３０".as_bytes().to_vec())]).await;
    assert_eq!(
        pause,
        Some(Duration::from_secs(1)),
        "full-width digits are not digits"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_in_year_9999_is_capped() {
    let (pause, res) = pause_after(
        503,
        vec![("retry-after", b"Fri, 31 Dec 9999 23:59:59 GMT".to_vec())],
    )
    .await;
    assert_eq!(pause, Some(DEFAULT_MAX_PAUSE));
    assert!(res.extensions().get::<PauseCapped>().is_some());
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_in_the_past_does_not_pause_long() {
    let (pause, _) = pause_after(
        429,
        vec![("retry-after", b"Fri, 31 Dec 1999 23:59:59 GMT".to_vec())],
    )
    .await;
    assert!(
        pause.is_none_or(|p| p <= Duration::from_secs(1)),
        "a date gone by asks for no wait: {pause:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_thirty_seconds_ahead_pauses_thirty_seconds() {
    let at = httpdate_of(fixed_now() + Duration::from_secs(30));
    let (pause, _) = pause_after(429, vec![("retry-after", at.into_bytes())]).await;
    assert_eq!(pause, Some(Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn retry_after_obsolete_date_formats_are_accepted() {
    // RFC 9110: recipients MUST accept the three formats. With the clock in 2026, a date in
    // 1994 is in the past: no long pause, and no panic.
    for v in [
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "Sun, 06 Nov 1994 08:49:37 GMT",
    ] {
        let (pause, _) = pause_after(429, vec![("retry-after", v.as_bytes().to_vec())]).await;
        assert!(
            pause.is_none_or(|p| p <= Duration::from_secs(1)),
            "{v}: {pause:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_repeated_fields_pause_for_one_of_them() {
    let (pause, _) = pause_after(
        429,
        vec![
            ("retry-after", b"5".to_vec()),
            ("retry-after", b"10".to_vec()),
        ],
    )
    .await;
    assert!(
        pause == Some(Duration::from_secs(5)) || pause == Some(Duration::from_secs(10)),
        "{pause:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_a_200_does_not_pause() {
    let (pause, _) = pause_after(200, vec![("retry-after", b"30".to_vec())]).await;
    assert_eq!(pause, None);
}

#[tokio::test(start_paused = true)]
async fn retry_after_on_a_503_pauses_even_without_bare_503_pauses() {
    let (pause, _) = pause_after(503, vec![("retry-after", b"2".to_vec())]).await;
    assert_eq!(pause, Some(Duration::from_secs(2)));
}

#[tokio::test(start_paused = true)]
async fn bare_503_pauses_only_when_asked() {
    let (pause, _) = pause_after(503, vec![]).await;
    assert_eq!(pause, None, "off by default");
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_bare_503_pauses(true)
        .pair();
    layer
        .layer(answering(503, vec![]))
        .oneshot(get("api.test"))
        .await
        .unwrap();
    assert_eq!(handle.pause("api.test"), Some(Duration::from_secs(1)));
}

#[tokio::test(start_paused = true)]
async fn ratelimit_draft_vectors() {
    let cases: [(u16, &str, Option<Duration>); 5] = [
        (200, "\"default\";r=0;t=50", Some(Duration::from_secs(50))),
        (200, "\"default\";r=50;t=30", None),
        (
            301,
            "\"problemPolicy\";r=0;t=10",
            Some(Duration::from_secs(10)),
        ),
        (200, "\"default\";r=999;pk=:dHJpYWwxMjEzMjM=:", None),
        (200, "\"somepolicy\";r=10000;t=10", None),
    ];
    for (status, value, expected) in cases {
        let (pause, _) = pause_after(status, vec![("ratelimit", value.as_bytes().to_vec())]).await;
        assert_eq!(pause, expected, "{status} RateLimit: {value}");
    }
}

#[tokio::test(start_paused = true)]
async fn ratelimit_with_a_huge_reset_is_capped() {
    let (pause, res) = pause_after(
        200,
        vec![("ratelimit", b"\"default\";r=0;t=99999999999".to_vec())],
    )
    .await;
    assert_eq!(pause, Some(DEFAULT_MAX_PAUSE));
    assert_eq!(
        res.extensions()
            .get::<PauseCapped>()
            .map(PauseCapped::source),
        Some(PauseSource::RateLimit)
    );
}

#[tokio::test(start_paused = true)]
async fn ratelimit_malformed_fields_are_ignored() {
    for v in [
        "\"default\";r=-1;t=50",
        "\"default\";r=0;t=-50",
        "\"default\";r=0;t=1.5",
        "default;r=0;t=50",
        "\"default\";r=0;t=50,,",
        "\u{e9}",
    ] {
        let (pause, _) = pause_after(200, vec![("ratelimit", v.as_bytes().to_vec())]).await;
        assert_eq!(pause, None, "malformed RateLimit must be ignored: {v}");
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_takes_precedence_over_ratelimit() {
    // The draft: "If a response contains both the RateLimit and Retry-After fields, the
    // Retry-After field MUST take precedence".
    let (pause, _) = pause_after(
        429,
        vec![
            ("retry-after", b"5".to_vec()),
            ("ratelimit", b"\"default\";r=0;t=50".to_vec()),
        ],
    )
    .await;
    assert_eq!(pause, Some(Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_variants_pause_on_any_status() {
    let reset = (fixed_now() + Duration::from_secs(40))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    for (remaining, reset_name) in [
        ("x-ratelimit-remaining", "x-ratelimit-reset"),
        ("x-rate-limit-remaining", "x-rate-limit-reset"),
        ("ratelimit-remaining", "ratelimit-reset"),
    ] {
        let (pause, _) = pause_after(
            403,
            vec![
                (remaining, b"0".to_vec()),
                (reset_name, reset.clone().into_bytes()),
            ],
        )
        .await;
        assert!(
            pause.is_some_and(|p| p > Duration::ZERO && p <= Duration::from_secs(40)),
            "{remaining} 0 with {reset_name} {reset}: {pause:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_remaining_nonzero_does_not_pause() {
    let (pause, _) = pause_after(
        200,
        vec![
            ("x-ratelimit-remaining", b"5".to_vec()),
            ("x-ratelimit-reset", b"30".to_vec()),
        ],
    )
    .await;
    assert_eq!(pause, None);
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_epoch_reset_in_year_5138_is_capped() {
    let (pause, res) = pause_after(
        200,
        vec![
            ("x-ratelimit-remaining", b"0".to_vec()),
            ("x-ratelimit-reset", b"99999999999".to_vec()),
        ],
    )
    .await;
    assert_eq!(pause, Some(DEFAULT_MAX_PAUSE));
    assert_eq!(
        res.extensions()
            .get::<PauseCapped>()
            .map(PauseCapped::source),
        Some(PauseSource::XRateLimit)
    );
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_reset_in_the_past_does_not_pause_long() {
    let (pause, _) = pause_after(
        429,
        vec![
            ("x-ratelimit-remaining", b"0".to_vec()),
            ("x-ratelimit-reset", b"1000000000".to_vec()),
        ],
    )
    .await;
    assert!(
        pause.is_none_or(|p| p <= Duration::from_secs(1)),
        "{pause:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn x_ratelimit_remaining_negative_or_huge_do_not_panic() {
    for rem in ["-1", "18446744073709551616", "0.0", "0, 0"] {
        let _ = pause_after(
            200,
            vec![
                ("x-ratelimit-remaining", rem.as_bytes().to_vec()),
                ("x-ratelimit-reset", b"30".to_vec()),
            ],
        )
        .await;
    }
}

#[tokio::test(start_paused = true)]
async fn max_pause_zero_never_pauses() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::ZERO)
        .pair();
    let svc = layer.layer(answering(429, vec![("retry-after", b"10".to_vec())]));
    svc.clone().oneshot(get("api.test")).await.unwrap();
    assert_eq!(handle.pause("api.test"), None);
    let start = Instant::now();
    svc.clone().oneshot(get("api.test")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn default_pause_duration_max_is_held_to_max_pause() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_default_pause(Duration::MAX)
        .pair();
    layer
        .layer(answering(429, vec![]))
        .oneshot(get("api.test"))
        .await
        .unwrap();
    assert_eq!(handle.pause("api.test"), Some(DEFAULT_MAX_PAUSE));
}

#[tokio::test(start_paused = true)]
async fn a_later_shorter_reset_never_cuts_a_pause_short() {
    let n = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(10 * (i as u64 + 1))).await;
            let ra = if i == 0 { "10" } else { "2" };
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(429)
                    .header("retry-after", ra)
                    .body(())
                    .unwrap(),
            )
        }
    });
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(api);
    let a = tokio::spawn(svc.clone().oneshot(get("api.test")));
    let b = tokio::spawn(svc.clone().oneshot(get("api.test")));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let left = handle.pause("api.test").unwrap();
    assert!(left > Duration::from_secs(9), "still about 10 s: {left:?}");
}

#[tokio::test(start_paused = true)]
async fn waiting_calls_are_told_at_once_when_a_pause_past_their_max_wait_arrives() {
    let n = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(429)
                        .header("retry-after", "120")
                        .body(())
                        .unwrap(),
                );
            }
            Ok(Response::new(()))
        }
    });
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_secs(10))
        .pair();
    let svc = layer.layer(api);
    let first = tokio::spawn(svc.clone().oneshot(get("api.test")));
    tokio::task::yield_now().await;
    let waiter = tokio::spawn(svc.clone().oneshot(get("api.test")));
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting("api.test"), 1);
    let start = Instant::now();
    first.await.unwrap().unwrap();
    let err = waiter.await.unwrap().unwrap_err();
    assert!(
        start.elapsed() <= Duration::from_millis(60),
        "told as soon as the pause arrived"
    );
    assert!(rate_limited(&err).retry_after() >= Duration::from_secs(100));
}

#[tokio::test(start_paused = true)]
async fn bare_429_then_handle_reports_learned_pace_and_clear_forgets_it() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    layer
        .layer(answering(429, vec![]))
        .oneshot(get("api.test"))
        .await
        .unwrap();
    assert_eq!(handle.pause("api.test"), Some(Duration::from_secs(1)));
    assert_eq!(
        handle.learned_pace("api.test"),
        Some(Duration::from_millis(125))
    );
    assert_eq!(handle.clear_pause("api.test"), Some(Duration::from_secs(1)));
    assert_eq!(handle.pause("api.test"), None);
    assert_eq!(
        handle.learned_pace("api.test"),
        None,
        "forgotten with the pause"
    );
    assert_eq!(handle.clear_pause("api.test"), None);
}

#[tokio::test(start_paused = true)]
async fn with_a_quota_a_bare_429_learns_no_pace() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(100).unwrap()).pair();
    layer
        .layer(answering(429, vec![]))
        .oneshot(get("api.test"))
        .await
        .unwrap();
    assert_eq!(handle.pause("api.test"), Some(Duration::from_secs(1)));
    assert_eq!(handle.learned_pace("api.test"), None);
}

#[tokio::test(start_paused = true)]
async fn callers_after_a_pause_leave_at_the_quota_pace() {
    let n = Arc::new(AtomicUsize::new(0));
    let api = service_fn(move |_req: Request<()>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if i == 0 {
                Response::builder()
                    .status(429)
                    .header("retry-after", "2")
                    .body(())
                    .unwrap()
            } else {
                Response::new(())
            };
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let svc = RateLimitLayer::new(Quota::per_second(10).unwrap()).layer(api);
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let start = Instant::now();
    let times = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let svc = svc.clone();
            let times = times.clone();
            tokio::spawn(async move {
                svc.oneshot(get("api.test")).await.unwrap();
                times.lock().unwrap().push(start.elapsed());
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let mut times = times.lock().unwrap().clone();
    times.sort();
    for (i, t) in times.iter().enumerate() {
        assert_eq!(
            *t,
            Duration::from_millis(2_000 + 100 * i as u64),
            "call {i}"
        );
    }
}

// ---------------------------------------------------------------- keys

#[tokio::test(start_paused = true)]
async fn thousands_of_hosts_keep_the_paused_list_bounded() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(answering(429, vec![("retry-after", b"60".to_vec())]));
    // Past the bound the hosts share the overflow limiter, paused by the first of them: later
    // ones are refused (their wait, 60 s, is past max_wait), which is what the guide says.
    let mut refused = 0;
    for i in 0..3_000 {
        if svc
            .clone()
            .oneshot(get(&format!("h{i}.test")))
            .await
            .is_err()
        {
            refused += 1;
        }
    }
    assert!(
        refused <= 3_000 - 1_025,
        "only hosts past the bound: {refused}"
    );
    let paused = handle.paused();
    assert!(
        paused.len() <= 1_025,
        "at most 1,024 keys and the overflow: {}",
        paused.len()
    );
    assert!(
        paused.iter().any(|(k, _)| k == "*"),
        "the overflow is listed as *"
    );
}

#[tokio::test(start_paused = true)]
async fn refusal_past_the_bound_names_the_overflow_limiter() {
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_keys(2)
        .with_max_wait(Duration::ZERO)
        .pair();
    let paused = layer
        .clone()
        .layer(answering(429, vec![("retry-after", b"30".to_vec())]));
    for h in ["a.test", "b.test", "c.test"] {
        paused.clone().oneshot(get(h)).await.unwrap();
    }
    let err = layer
        .layer(ok_api())
        .oneshot(get("d.test"))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(
            "rate limited by the overflow limiter shared by the keys past the most limiters kept"
        ),
        "{text}"
    );
    assert!(
        handle.pause("zzz.test").is_some(),
        "the handle answers with the overflow's pause"
    );
    handle.clear_pause("d.test");
    assert_eq!(
        handle.pause("c.test"),
        None,
        "clearing one clears all past the bound"
    );
}

#[tokio::test(start_paused = true)]
async fn default_key_is_the_authority_with_port_and_no_userinfo() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer.layer(answering(429, vec![("retry-after", b"30".to_vec())]));
    svc.clone()
        .oneshot(
            Request::get("http://user:secret@api.test:8443/x")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let keys: Vec<_> = handle.paused().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.test:8443"]);
    // No authority: the Host header.
    svc.clone()
        .oneshot(
            Request::get("/x")
                .header("host", "h.test")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(handle.pause("h.test").is_some());
}

// ---------------------------------------------------------------- events

#[tokio::test(start_paused = true)]
async fn events_wait_refuse_pause_carry_key_and_host() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let layer = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::from_millis(1_500))
        .on_event(move |e: &Event<'_>| {
            let line = match *e {
                Event::RateLimitWaited { key, host, wait } => {
                    format!("wait {key} {host:?} {wait:?}")
                }
                Event::RateLimitRefused { key, host, wait } => {
                    format!("refused {key} {host:?} {wait:?}")
                }
                Event::RateLimitPaused {
                    key, pause, capped, ..
                } => format!("paused {key} {pause:?} {capped}"),
                _ => return,
            };
            s.lock().unwrap().push(line);
        });
    let svc = layer.clone().layer(ok_api());
    svc.clone().oneshot(get("api.test")).await.unwrap();
    let w = tokio::spawn(svc.clone().oneshot(get("api.test")));
    tokio::task::yield_now().await;
    let _ = svc.clone().oneshot(get("api.test")).await.unwrap_err();
    w.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            "wait api.test Some(\"api.test\") 1s",
            "refused api.test Some(\"api.test\") 2s",
        ]
    );
}

fn httpdate_of(t: SystemTime) -> String {
    // IMF-fixdate by hand: enough for the test's dates.
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{weekday}, {d:02} {month} {y} {h:02}:{m:02}:{s:02} GMT")
}

#[tokio::test(start_paused = true)]
async fn ratelimit_split_over_two_field_lines_is_one_list() {
    // RFC 9651 §3.1: a list may be split over several field lines.
    let (pause, _) = pause_after(
        200,
        vec![
            ("ratelimit", b"\"a\";r=5;t=1".to_vec()),
            ("ratelimit", b"\"b\";r=0;t=20".to_vec()),
        ],
    )
    .await;
    assert_eq!(pause, Some(Duration::from_secs(20)));
}

#[tokio::test(start_paused = true)]
async fn ratelimit_policy_alone_does_not_pause() {
    let (pause, _) = pause_after(
        200,
        vec![(
            "ratelimit-policy",
            b"\"burst\";q=100;w=60,\"daily\";q=1000;w=86400".to_vec(),
        )],
    )
    .await;
    assert_eq!(pause, None);
}

#[tokio::test(start_paused = true)]
async fn ratelimit_of_100_kb_of_items_is_read_in_linear_time() {
    let mut value = b"\"p\";r=1;t=1,".repeat(100 * 1024 / 12);
    value.extend_from_slice(b"\"last\";r=0;t=7");
    // CPU time spent reading the header: the tokio clock is paused here.
    #[allow(clippy::disallowed_methods)]
    let wall = std::time::Instant::now();
    let (pause, _) = pause_after(200, vec![("ratelimit", value)]).await;
    assert!(
        wall.elapsed() < Duration::from_secs(1),
        "{:?}",
        wall.elapsed()
    );
    assert!(
        pause.is_none() || pause == Some(Duration::from_secs(7)),
        "{pause:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_with_surrounding_spaces_is_read() {
    let (pause, _) = pause_after(429, vec![("retry-after", b" 5 ".to_vec())]).await;
    assert_eq!(pause, Some(Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn retry_after_with_a_sign_is_not_seconds() {
    let (pause, _) = pause_after(429, vec![("retry-after", b"+5".to_vec())]).await;
    assert_eq!(pause, Some(Duration::from_secs(1)), "read as a bare 429");
}
