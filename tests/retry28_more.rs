//! Promised hooks and methods of the retry layer (its rustdoc): `on_event`, `hold_marks`,
//! `MAX_REPORTED_WAIT`, `Retry::new`/`Retry::layer`, `ServiceBuilderExt::sturdy_retry`, and the
//! refusals of layers below: an open breaker waited out only within a deadline, a local rate
//! limit's wait, both proving the request never left.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sturdy::core::classify::delivery;
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::trace::DelaySource;
use sturdy::core::{find, BoxError, CircuitOpen, Delivery, RateLimited};
use sturdy::retry::{Retry, RetryLayer, MAX_REPORTED_WAIT};
use sturdy::ServiceBuilderExt;
use tower::{Layer, ServiceBuilder, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/orders";

#[derive(Debug, Clone, PartialEq)]
enum Seen2 {
    Scheduled(u32, bool, Duration, DelaySource),
    Stopped(u32, RetryStop),
}

fn recorder() -> (
    Arc<Mutex<Vec<Seen2>>>,
    impl Fn(&Event<'_>) + Send + Sync + 'static,
) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (log, move |e: &Event<'_>| match e {
        Event::RetryScheduled {
            attempt,
            refused,
            delay,
            source,
            host,
            ..
        } => {
            assert_eq!(*host, "api.example.com");
            l.lock()
                .unwrap()
                .push(Seen2::Scheduled(*attempt, *refused, *delay, *source));
        }
        Event::RetryStopped { attempt, stop, .. } => {
            l.lock().unwrap().push(Seen2::Stopped(*attempt, *stop));
        }
        _ => {}
    })
}

#[tokio::test(start_paused = true)]
async fn on_event_reports_each_retry_and_why_it_stopped() {
    let (log, hook) = recorder();
    let (svc, seen) = api(|n, _| {
        Ok(if n == 0 {
            with_retry_after(503, "2")
        } else {
            status(503)
        })
    });
    RetryLayer::new()
        .with_seed(1)
        .with_retry_after_jitter(0.0)
        .on_event(hook)
        .layer(svc)
        .oneshot(get(URL))
        .await
        .unwrap();
    assert_eq!(seen.len(), 4);
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!(
        log[0],
        Seen2::Scheduled(1, false, Duration::from_secs(2), DelaySource::RetryAfter)
    );
    assert!(matches!(
        log[1],
        Seen2::Scheduled(2, false, _, DelaySource::Backoff)
    ));
    assert!(matches!(
        log[2],
        Seen2::Scheduled(3, false, _, DelaySource::Backoff)
    ));
    assert_eq!(log[3], Seen2::Stopped(4, RetryStop::AttemptsExhausted));
    // The delays reported are the sleeps taken.
    if let Seen2::Scheduled(_, _, d, _) = log[1] {
        let gap = seen.gap(1);
        assert!(
            gap.abs_diff(d) < Duration::from_millis(2),
            "slept {gap:?}, reported {d:?}"
        );
    }

    let (log, hook) = recorder();
    let (svc, _) = api(|_, _| Ok(status(503)));
    RetryLayer::new()
        .on_event(hook)
        .layer(svc)
        .oneshot(post(URL, "{}"))
        .await
        .unwrap();
    assert_eq!(
        log.lock().unwrap().clone(),
        [Seen2::Stopped(1, RetryStop::NotIdempotent)]
    );

    let (log, hook) = recorder();
    let (svc, _) = api(|_, _| Ok(with_retry_after(429, "600")));
    let _ = RetryLayer::new()
        .on_event(hook)
        .layer(svc)
        .oneshot(get(URL))
        .await;
    assert_eq!(
        log.lock().unwrap().clone(),
        [Seen2::Stopped(1, RetryStop::WaitTooLong)]
    );
}

#[tokio::test(start_paused = true)]
async fn promised_methods_exist_and_answer() {
    assert_eq!(MAX_REPORTED_WAIT, Duration::from_secs(300));
    assert_eq!(RetryLayer::new().hold_marks(), None);
    assert_eq!(
        RetryLayer::new().with_hold_marks(true).hold_marks(),
        Some(true)
    );
    assert_eq!(RetryLayer::new().idempotency_header(), "idempotency-key");
    let (svc, seen) = api(|n, _| Ok(if n == 0 { status(503) } else { status(200) }));
    let r = Retry::new(svc.clone());
    assert_eq!(r.oneshot(get(URL)).await.unwrap().status(), 200);
    let r = Retry::<Api>::layer().layer(svc.clone());
    assert_eq!(r.oneshot(get(URL)).await.unwrap().status(), 200);
    let r = ServiceBuilder::new()
        .sturdy_retry(RetryLayer::new())
        .service(svc);
    assert_eq!(r.oneshot(get(URL)).await.unwrap().status(), 200);
    assert_eq!(seen.len(), 4);
}

fn breaker_then_ok(retry_in: Duration) -> (Api, Seen) {
    api(move |n, _| {
        if n == 0 {
            Err(Box::new(CircuitOpen::new("api.example.com", retry_in)) as BoxError)
        } else {
            Ok(status(201))
        }
    })
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_fails_fast_without_a_deadline() {
    let (svc, seen) = breaker_then_ok(Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    let err = RetryLayer::new()
        .layer(svc)
        .oneshot(post(URL, "{}"))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        find::<CircuitOpen>(&*err).unwrap().retry_in(),
        Duration::from_secs(5)
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(top(&err).report().unwrap().attempts(), 0);
    assert!(err.to_string().contains("not sent"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_waited_out_within_a_deadline_even_for_a_post() {
    let (svc, seen) = breaker_then_ok(Duration::from_secs(5));
    let res = RetryLayer::new()
        .with_deadline(Duration::from_secs(60))
        .layer(svc)
        .oneshot(post(URL, "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.len(), 2);
    assert!(seen.gap(0) >= Duration::from_secs(5));
    // 2 minutes under a 10 minute deadline: waited out, not cut by max_retry_after.
    let (svc, seen) = breaker_then_ok(Duration::from_secs(120));
    let res = RetryLayer::new()
        .with_deadline(Duration::from_secs(600))
        .layer(svc)
        .oneshot(get(URL))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(seen.gap(0) >= Duration::from_secs(120));
    // Ending past the deadline: at once.
    let (svc, seen) = breaker_then_ok(Duration::from_secs(5));
    let start = tokio::time::Instant::now();
    let err = RetryLayer::new()
        .with_deadline(Duration::from_secs(3))
        .layer(svc)
        .oneshot(get(URL))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(seen.len(), 1);
    assert!(find::<CircuitOpen>(&*err).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_local_rate_limit_refusal_is_waited_and_proves_not_sent() {
    let (svc, seen) = api(|n, _| {
        if n == 0 {
            Err(
                Box::new(RateLimited::new(Duration::from_secs(2)).with_scope("api.example.com"))
                    as BoxError,
            )
        } else {
            Ok(status(201))
        }
    });
    let res = RetryLayer::new()
        .with_retry_after_jitter(0.0)
        .layer(svc)
        .oneshot(post(URL, "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.len(), 2);
    assert!(seen.gap(0) >= Duration::from_secs(2), "{:?}", seen.gap(0));

    // A refusal asking longer than max_retry_after fails at once with the wait.
    let (svc, seen) = api(|_, _| {
        Err(
            Box::new(RateLimited::new(Duration::from_secs(120)).with_scope("api.example.com"))
                as BoxError,
        )
    });
    let err = RetryLayer::new()
        .layer(svc)
        .oneshot(post(URL, "{}"))
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        find::<RateLimited>(&*err).unwrap().retry_after(),
        Duration::from_secs(120)
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

fn hang() -> impl tower::Service<Req, Response = Res, Error = BoxError, Future = impl Send> + Clone
{
    tower::service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok::<Res, BoxError>(status(200))
    })
}

#[tokio::test(start_paused = true)]
async fn the_retry_layers_own_timeout_is_not_counted_by_a_breaker_below() {
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_attempt_timeout(Duration::from_millis(100))
        .layer(breaker.layer(hang()));
    let err = svc.oneshot(get(URL)).await.unwrap_err();
    assert_eq!(top(&err).report().unwrap().attempts(), 4);
    assert!(
        matches!(
            handle.state("api.example.com"),
            None | Some(CircuitState::Closed)
        ),
        "{:?}",
        handle.state("api.example.com")
    );
}

#[tokio::test(start_paused = true)]
async fn an_attempt_timeout_under_the_breaker_opens_it_and_the_message_counts_the_refusal() {
    use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
    use sturdy::retry::AttemptTimeoutLayer;
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let svc = RetryLayer::new().with_seed(1).layer(
        breaker.layer(AttemptTimeoutLayer::new(Some(Duration::from_millis(100))).layer(hang())),
    );
    let err = svc.oneshot(get(URL)).await.unwrap_err();
    assert!(matches!(
        handle.state("api.example.com"),
        Some(CircuitState::Open { .. })
    ));
    let text = err.to_string();
    assert!(
        text.starts_with(
            "gave up after 2 attempts and 1 refused try: the attempt timed out after 100ms; the try after it was refused before it was sent: "
        ),
        "{text}"
    );
    assert_eq!(top(&err).report().unwrap().attempts(), 2);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(find::<CircuitOpen>(&*err).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_stops_retries_and_the_message_counts_what_was_sent() {
    let (log, hook) = recorder();
    let (svc, seen) = api(|_, _| Err(reset()));
    let err = RetryLayer::new()
        .with_shared_budget(Arc::new(NoRetries))
        .on_event(hook)
        .layer(svc)
        .oneshot(get(URL))
        .await
        .unwrap_err();
    assert_eq!(seen.len(), 1);
    assert_eq!(top(&err).report().unwrap().attempts(), 1);
    let text = err.to_string();
    assert!(!text.contains("4 attempts"), "{text}");
    assert!(text.contains("connection reset by peer"), "{text}");
    assert_eq!(
        log.lock().unwrap().clone(),
        [Seen2::Stopped(1, RetryStop::BudgetExhausted)]
    );
}

struct NoRetries;
impl tower::retry::budget::Budget for NoRetries {
    fn deposit(&self) {}
    fn withdraw(&self) -> bool {
        false
    }
}

#[tokio::test(start_paused = true)]
async fn a_deadline_after_a_503_reports_both_attempts() {
    let (svc, _) = api(|_, _| Ok(status(200)));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let inner = tower::service_fn(move |r: Req| {
        let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let svc = svc.clone();
        async move {
            if n == 0 {
                return Ok(status(503));
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            svc.oneshot(r).await
        }
    });
    let mut r = post(URL, "{}");
    r.headers_mut()
        .insert("idempotency-key", "k-dl2".parse().unwrap());
    let start = tokio::time::Instant::now();
    let err = RetryLayer::new()
        .with_seed(1)
        .with_deadline(Duration::from_secs(3))
        .layer(inner)
        .oneshot(r)
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    let e = top(&err);
    assert_eq!(e.report().unwrap().attempts(), 2);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let text = err.to_string();
    assert!(text.contains("k-dl2"), "{text}");
    assert!(!text.contains("not sent"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_trace_records_the_key_each_attempt_and_each_sleep() {
    use sturdy::core::trace::{Trace, TraceEvent};
    let (svc, seen) = api(|n, _| {
        Ok(match n {
            0 => with_retry_after(429, "1"),
            1 => status(503),
            _ => status(201),
        })
    });
    let client = sturdy::ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(4))
        .build(svc);
    let trace = Trace::new();
    let mut r = post(URL, "{}");
    r.extensions_mut().insert(trace.clone());
    assert_eq!(client.oneshot(r).await.unwrap().status(), 201);
    assert_eq!(seen.len(), 3);
    let events = trace.events();
    let key = seen.get(0).headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TraceEvent::IdempotencyKey(k) if *k == key)),
        "{events:?}"
    );
    let attempts = events
        .iter()
        .filter(|e| matches!(e, TraceEvent::Attempt { .. }))
        .count();
    assert_eq!(attempts, 3, "{events:?}");
    assert!(
        events.iter().any(|e| matches!(
            e,
            TraceEvent::Delay { source: DelaySource::RetryAfter, duration } if *duration >= Duration::from_secs(1)
        )),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            TraceEvent::Delay {
                source: DelaySource::Backoff,
                ..
            }
        )),
        "{events:?}"
    );
}
