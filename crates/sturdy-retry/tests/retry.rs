//! Retry behaviour on in-process services with paused time.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy_core::clock::ManualClock;
use sturdy_core::headers::format_http_date;
use sturdy_core::{BoxError, ErrorKind, RateLimited, Trace, TraceEvent};
use sturdy_retry::{Backoff, RetryLayer};
use tokio::time::Instant;
use tower::{service_fn, Layer, Service, ServiceExt};

type Reply = Result<Response<()>, BoxError>;

/// An API that answers from a script (then 200) and logs when each call arrived and its body.
#[derive(Clone, Default)]
struct Api {
    script: Arc<Mutex<VecDeque<Reply>>>,
    log: Arc<Mutex<Vec<(Instant, Bytes)>>>,
}

impl Api {
    fn new(script: Vec<Reply>) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into())),
            ..Self::default()
        }
    }

    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<()>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send {
        let this = self.clone();
        service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                this.log.lock().unwrap().push((Instant::now(), body));
                this.script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(|| Ok(status(200)))
            }
        })
    }

    fn calls(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn gaps(&self) -> Vec<Duration> {
        let log = self.log.lock().unwrap();
        log.windows(2).map(|w| w[1].0 - w[0].0).collect()
    }
}

fn status(s: u16) -> Response<()> {
    Response::builder().status(s).body(()).unwrap()
}

fn with_retry_after(s: u16, v: &str) -> Response<()> {
    Response::builder()
        .status(s)
        .header("retry-after", v)
        .body(())
        .unwrap()
}

fn get() -> Request<Full<Bytes>> {
    Request::get("http://api.example.com/orders")
        .body(Full::default())
        .unwrap()
}

fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("http://api.example.com/orders");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::from(r#"{"amount":100}"#)).unwrap()
}

fn layer() -> RetryLayer {
    RetryLayer::new().with_seed(42)
}

#[tokio::test(start_paused = true)]
async fn two_503s_then_200_takes_three_attempts_within_jitter_bounds() {
    let api = Api::new(vec![Ok(status(503)), Ok(status(503))]);
    let res = layer().layer(api.service()).oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 3);
    let gaps = api.gaps();
    let base = Duration::from_millis(250);
    assert!(
        gaps[0] >= base && gaps[0] <= base * 3,
        "first sleep {:?}",
        gaps[0]
    );
    assert!(
        gaps[1] >= base && gaps[1] <= gaps[0] * 3,
        "second sleep {:?} after {:?}",
        gaps[1],
        gaps[0]
    );
}

#[tokio::test(start_paused = true)]
async fn works_with_tower_test_mock() {
    let (mock, mut handle) = tower_test::mock::pair::<Request<Full<Bytes>>, Response<()>>();
    let svc = layer().layer(mock);
    let call = tokio::spawn(svc.oneshot(get()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(status(502));
    let (req, send) = handle.next_request().await.unwrap();
    assert_eq!(req.uri(), "http://api.example.com/orders");
    send.send_response(status(204));
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_overrides_backoff_never_sooner() {
    let api = Api::new(vec![Ok(with_retry_after(429, "2"))]);
    let res = layer().layer(api.service()).oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let gap = api.gaps()[0];
    assert!(
        gap >= Duration::from_secs(2) && gap <= Duration::from_millis(2_400),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_is_read_against_the_wall_clock() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = Arc::new(ManualClock::at(now));
    let api = Api::new(vec![Ok(with_retry_after(
        503,
        &format_http_date(now + Duration::from_secs(3)),
    ))]);
    let res = layer()
        .with_clock(clock)
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let gap = api.gaps()[0];
    assert!(
        gap >= Duration::from_secs(3) && gap <= Duration::from_millis(3_600),
        "{gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_an_hour_fails_at_once_with_rate_limited() {
    let api = Api::new(vec![Ok(with_retry_after(429, "3600"))]);
    let start = Instant::now();
    let err = layer()
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "no sleep");
    let rl = sturdy_core::find::<RateLimited>(&*err).expect("RateLimited");
    // The server's hour is reported capped at MAX_REPORTED_WAIT.
    assert_eq!(rl.retry_after(), sturdy_retry::MAX_REPORTED_WAIT);
    assert_eq!(
        err.to_string(),
        "rate limited by api.example.com; retry after 5m"
    );
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_with_no_attempt_left_fails_with_rate_limited() {
    let api = Api::new(vec![
        Ok(with_retry_after(429, "1")),
        Ok(with_retry_after(429, "1")),
    ]);
    let err = layer()
        .with_max_attempts(2)
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(sturdy_core::find::<RateLimited>(&*err).is_some());
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn permanent_outcomes_are_not_retried() {
    for s in [400, 401, 403, 404, 409, 422, 501] {
        let api = Api::new(vec![Ok(status(s))]);
        let res = layer().layer(api.service()).oneshot(get()).await.unwrap();
        assert_eq!(res.status().as_u16(), s);
        assert_eq!(api.calls(), 1, "{s}");
    }
}

#[tokio::test(start_paused = true)]
async fn every_retryable_status_is_retried() {
    for s in [408, 425, 429, 500, 502, 503, 504] {
        let api = Api::new(vec![Ok(status(s))]);
        let res = layer().layer(api.service()).oneshot(get()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{s}");
        assert_eq!(api.calls(), 2, "{s}");
    }
}

#[tokio::test(start_paused = true)]
async fn post_needs_an_idempotency_key() {
    let api = Api::new(vec![Ok(status(503)), Ok(status(503))]);
    let res = layer()
        .layer(api.service())
        .oneshot(post(None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1);

    let api = Api::new(vec![Ok(status(503)), Ok(status(503))]);
    let res = layer()
        .layer(api.service())
        .oneshot(post(Some("k-1")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 3);
    // Every attempt sent the same bytes.
    let log = api.log.lock().unwrap();
    assert!(log
        .iter()
        .all(|(_, b)| b == &Bytes::from_static(br#"{"amount":100}"#)));
}

#[tokio::test(start_paused = true)]
async fn post_without_key_is_retried_only_when_it_never_left() {
    let refused: BoxError = Box::new(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"));
    let api = Api::new(vec![Err(refused)]);
    let res = layer()
        .layer(api.service())
        .oneshot(post(None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);

    let reset: BoxError = Box::new(io::Error::new(io::ErrorKind::ConnectionReset, "reset"));
    let api = Api::new(vec![Err(reset)]);
    let err = layer()
        .layer(api.service())
        .oneshot(post(None))
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert!(err.to_string().contains("reset"));
}

#[tokio::test(start_paused = true)]
async fn exhausted_errors_say_how_many_attempts_and_why() {
    let reset = || -> Reply {
        Err(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection reset by peer",
        )))
    };
    let api = Api::new(vec![reset(), reset(), reset(), reset(), reset()]);
    let err = layer()
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 4);
    let e = err
        .downcast_ref::<sturdy_core::Error>()
        .expect("sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Transport);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );
}

/// The budget keeps its bound after a host was idle for a century (the windows that passed are
/// forgotten at once, not one by one: a call after a long idle costs what any call does), and it
/// follows tokio's clock: the reserve spent in an outage is back one ttl later.
#[tokio::test(start_paused = true)]
async fn the_budget_after_a_century_idle_and_one_ttl_later() {
    let outage = || Api::new((0..1_000).map(|_| Ok(status(503))).collect());
    let api = outage();
    let svc = layer()
        .with_budget(Duration::from_secs(1), 5, 0.0)
        .unwrap()
        .layer(api.service());
    svc.clone().oneshot(get()).await.unwrap();
    api.script.lock().unwrap().clear();
    tokio::time::advance(Duration::from_secs(100 * 365 * 86_400)).await;
    for s in (0..1_000).map(|_| Ok(status(503))) {
        api.script.lock().unwrap().push_back(s);
    }
    let before = api.calls();
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 503);
    }
    // A reserve of 5 retries per second over a ttl of 1 s, no share of calls: 20 calls, 5
    // retries.
    assert_eq!(api.calls() - before, 20 + 5);
    // One ttl later the reserve is there again.
    tokio::time::advance(Duration::from_secs(1)).await;
    let before = api.calls();
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(api.calls() - before, 20 + 5);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_an_outage_across_100_concurrent_callers() {
    // A dead server: every call is a 503. Without a budget 100 callers would make 400 attempts.
    let api = Api::new((0..1_000).map(|_| Ok(status(503))).collect());
    let svc = layer()
        .with_budget(Duration::from_secs(10), 1, 0.1)
        .unwrap()
        .layer(api.service());
    let calls: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        assert_eq!(
            c.await.unwrap().unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    // A budget of (10 s, 1/s, 10 %): a reserve of 10 retries plus 10 % of 100 calls.
    let attempts = api.calls();
    assert!(
        (100..=100 + 10 + 10 + 1).contains(&attempts),
        "{attempts} attempts"
    );

    // The defaults (10/s, 20 %) still keep it far below 400.
    let api = Api::new((0..1_000).map(|_| Ok(status(503))).collect());
    let svc = layer().layer(api.service());
    let calls: Vec<_> = (0..100)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert!(
        api.calls() <= 100 + 100 + 20 + 1,
        "{} attempts",
        api.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn budgets_are_per_host() {
    let api = Api::new((0..1_000).map(|_| Ok(status(503))).collect());
    let svc = layer()
        .with_budget(Duration::from_secs(10), 1, 0.1)
        .unwrap()
        .layer(api.service());
    for _ in 0..30 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    let spent = api.calls();
    // Host A's budget is gone; host B still gets its retries.
    let other = Request::get("http://other.example.com/")
        .body(Full::default())
        .unwrap();
    svc.clone().oneshot(other).await.unwrap();
    assert_eq!(api.calls() - spent, 4);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_is_never_exceeded() {
    let api = Api::new((0..100).map(|_| Ok(status(503))).collect());
    let start = Instant::now();
    let res = layer()
        .with_max_attempts(100)
        .with_deadline(Duration::from_secs(2))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        start.elapsed() <= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(api.calls() > 2);

    // A Retry-After past the deadline is not slept.
    let api = Api::new(vec![Ok(with_retry_after(503, "5"))]);
    let start = Instant::now();
    let err = layer()
        .with_deadline(Duration::from_secs(2))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(
        sturdy_core::find::<RateLimited>(&*err)
            .unwrap()
            .retry_after(),
        Duration::from_secs(5)
    );
    assert_eq!(start.elapsed(), Duration::ZERO);

    // A Retry-After within the deadline, with jitter, still ends before it.
    let api = Api::new(vec![
        Ok(with_retry_after(503, "2")),
        Ok(with_retry_after(503, "0")),
    ]);
    let start = Instant::now();
    let _ = layer()
        .with_deadline(Duration::from_millis(2_100))
        .layer(api.service())
        .oneshot(get())
        .await;
    assert!(start.elapsed() <= Duration::from_millis(2_100));
}

#[tokio::test(start_paused = true)]
async fn a_slow_attempt_is_cut_at_the_deadline() {
    let slow = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, BoxError>(status(200))
    });
    let start = Instant::now();
    let err = layer()
        .with_deadline(Duration::from_secs(1))
        .layer(slow)
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(
        err.downcast_ref::<sturdy_core::Error>().unwrap().kind(),
        &ErrorKind::Timeout
    );
    assert_eq!(
        err.to_string(),
        "the overall deadline of 1s passed during attempt 1"
    );
}

#[tokio::test(start_paused = true)]
async fn per_attempt_timeout_is_retryable() {
    let calls = Arc::new(Mutex::new(0));
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = {
            let mut g = c.lock().unwrap();
            *g += 1;
            *g
        };
        async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok::<_, BoxError>(status(200))
        }
    });
    let start = Instant::now();
    let res = layer()
        .with_attempt_timeout(Duration::from_secs(1))
        .layer(svc)
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(*calls.lock().unwrap(), 2);
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_body_too_large_to_replay_is_sent_once() {
    let api = Api::new(vec![Ok(status(503))]);
    let res = layer()
        .with_body_limit(4)
        .layer(api.service())
        .oneshot(post(Some("k")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn attempts_and_delays_go_to_the_trace() {
    let api = Api::new(vec![Ok(status(503)), Ok(with_retry_after(429, "1"))]);
    let trace = Trace::new();
    let mut req = get();
    req.extensions_mut().insert(trace.clone());
    layer().layer(api.service()).oneshot(req).await.unwrap();
    let ev = trace.events();
    assert_eq!(ev.len(), 5, "{ev:?}");
    assert!(
        matches!(&ev[0], TraceEvent::Attempt { number: 1, outcome } if outcome.starts_with("503"))
    );
    assert!(matches!(
        &ev[3],
        TraceEvent::Delay {
            source: sturdy_core::trace::DelaySource::RetryAfter,
            ..
        }
    ));
    assert!(matches!(&ev[4], TraceEvent::Attempt { number: 3, .. }));
}

#[tokio::test(start_paused = true)]
async fn other_backoffs() {
    let api = Api::new(vec![Ok(status(500)), Ok(status(500)), Ok(status(500))]);
    let b = Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
    layer()
        .with_backoff(b)
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(
        api.gaps(),
        [
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(400)
        ]
    );
}

#[test]
fn decorrelated_jitter_spreads_clients_apart() {
    use rand::{Rng, SeedableRng};
    // 10,000 clients fail at the same instant; where do their first two retries land?
    let b = Backoff::default();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2024);
    let base = 250.0;
    let mut first = [0u32; 10];
    let mut second = [0u32; 20];
    for _ in 0..10_000 {
        let d1 = b.delay(1, None, rng.random());
        let d2 = b.delay(2, Some(d1), rng.random());
        let ms1 = d1.as_secs_f64() * 1_000.0;
        first[(((ms1 - base) / (2.0 * base)) * 10.0).min(9.0) as usize] += 1;
        let at2 = ms1 + d2.as_secs_f64() * 1_000.0; // in [500, 3000] ms
        second[((at2 - 2.0 * base) / (10.0 * base) * 20.0).clamp(0.0, 19.0) as usize] += 1;
    }
    // The first retry is uniform over [base, 3 base]: every tenth holds 10 % +- 2.
    for (i, c) in first.iter().enumerate() {
        assert!((800..=1_200).contains(c), "first retry bucket {i}: {c}");
    }
    // The second retry is spread over 500..3000 ms: no 125 ms slot holds more than 15 % of the
    // clients (a synchronized retry would put 100 % in one slot).
    let max = *second.iter().max().unwrap();
    assert!(max <= 1_500, "second retry spike: {second:?}");
    assert!(
        second.iter().filter(|c| **c > 0).count() >= 15,
        "{second:?}"
    );
}

#[test]
fn traits() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync_clone::<RetryLayer>();
    assert_send_sync_clone::<
        sturdy_retry::Retry<tower_test::mock::Mock<Request<Full<Bytes>>, Response<()>>>,
    >();
    assert_send::<
        sturdy_retry::ResponseFuture<
            tower_test::mock::Mock<Request<Full<Bytes>>, Response<()>>,
            Full<Bytes>,
            (),
        >,
    >();
    let _ = Method::GET;
}

fn conflict_in_flight() -> Response<()> {
    Response::builder()
        .status(409)
        .header("retry-after", "1")
        .header("content-type", "application/problem+json")
        .body(())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_409_in_flight_is_retried_only_with_an_idempotency_key_and_a_retry_after() {
    // The first request with this key is still running on the server: wait and ask again.
    let api = Api::new(vec![Ok(conflict_in_flight()), Ok(conflict_in_flight())]);
    let start = Instant::now();
    let res = layer()
        .layer(api.service())
        .oneshot(post(Some("k-409")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 3);
    assert!(start.elapsed() >= Duration::from_secs(2));

    // Without a key the 409 is a real conflict; without Retry-After too.
    let api = Api::new(vec![Ok(conflict_in_flight())]);
    let res = layer()
        .layer(api.service())
        .oneshot(post(None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(api.calls(), 1);
    let api = Api::new(vec![Ok(status(409))]);
    let res = layer()
        .layer(api.service())
        .oneshot(post(Some("k")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(api.calls(), 1);
}

fn open(retry_in: u64) -> Reply {
    Err(Box::new(sturdy_core::CircuitOpen::new(
        "api.example.com",
        Duration::from_secs(retry_in),
    )))
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_is_waited_out_when_it_fits_the_deadline() {
    let api = Api::new(vec![open(2)]);
    let start = Instant::now();
    let res = layer()
        .with_deadline(Duration::from_secs(10))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_secs(2));

    // Past the deadline, or without one: fail at once.
    for layer in [layer().with_deadline(Duration::from_secs(1)), layer()] {
        let api = Api::new(vec![open(2)]);
        let start = Instant::now();
        let err = layer.layer(api.service()).oneshot(get()).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(sturdy_core::find::<sturdy_core::CircuitOpen>(&*err).is_some());
        assert_eq!(api.calls(), 1);
    }
}

#[tokio::test(start_paused = true)]
async fn the_final_error_speaks_for_every_attempt() {
    use sturdy_core::classify::delivery;
    use sturdy_core::Delivery;
    // Attempt 1 may have committed (its connection broke); the try after it met an open breaker,
    // which refused it before it was sent: one attempt, whose outcome is the call's, and the
    // refusal after it (still the source, so its wait can be found).
    let reset: Reply = Err(Box::new(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "reset",
    )));
    let api = Api::new(vec![reset, open(30)]);
    let err = layer()
        .layer(api.service())
        .oneshot(post(Some("key-7")))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let e = err.downcast_ref::<sturdy_core::Error>().unwrap();
    let report = e.report().unwrap();
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.idempotency_key(), Some("key-7"));
    assert_eq!(e.idempotency_key(), Some("key-7"));
    assert!(matches!(e.kind(), ErrorKind::Transport), "{:?}", e.kind());
    let open = sturdy_core::find::<sturdy_core::CircuitOpen>(&*err).expect("the refusal");
    assert_eq!(open.retry_in(), Duration::from_secs(30));
    assert_eq!(
        err.to_string(),
        "gave up after 1 attempt and 1 refused try: connection reset by peer; the try after it \
         was refused before it was sent: the circuit breaker for api.example.com is open for \
         30s; it may have been processed: retry with the same idempotency key key-7"
    );

    // The overflow breaker's refusal says it is the shared breaker, not this host's own.
    let overflow: Reply = Err(Box::new(
        sturdy_core::CircuitOpen::new("api.example.com", Duration::from_secs(30))
            .with_reason(sturdy_core::OpenReason::Overflow),
    ));
    let reset: Reply = Err(Box::new(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "reset",
    )));
    let api = Api::new(vec![reset, overflow]);
    let err = layer()
        .layer(api.service())
        .oneshot(post(Some("key-o")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "the try after it was refused before it was sent: the overflow circuit breaker, \
             which api.example.com shares with the hosts past the most breakers kept, is open \
             for 30s"
        ),
        "{err}"
    );

    // Every attempt refused before it left: the error says so, and it is true.
    let refused = || -> Reply {
        Err(Box::new(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "refused",
        )))
    };
    let api = Api::new(vec![refused(), refused(), refused(), refused()]);
    let err = layer()
        .layer(api.service())
        .oneshot(post(Some("key-8")))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused; the request was not sent, so it is safe \
         to send again"
    );

    // A 503 answer counts as possibly processed even when the last attempt never connected.
    let api = Api::new(vec![Ok(status(503)), refused(), refused(), refused()]);
    let err = layer()
        .layer(api.service())
        .oneshot(post(Some("key-9")))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(err
        .to_string()
        .ends_with("retry with the same idempotency key key-9"));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_error_carries_the_call_report() {
    let slow = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, BoxError>(status(200))
    });
    let err = layer()
        .with_deadline(Duration::from_secs(1))
        .layer(slow)
        .oneshot(post(Some("key-d")))
        .await
        .unwrap_err();
    let e = err.downcast_ref::<sturdy_core::Error>().unwrap();
    assert_eq!(e.idempotency_key(), Some("key-d"));
    assert_eq!(
        sturdy_core::classify::delivery(&*err),
        sturdy_core::Delivery::MaybeProcessed
    );
    assert_eq!(
        err.to_string(),
        "the overall deadline of 1s passed during attempt 1; it may have been processed: retry \
         with the same idempotency key key-d"
    );
}

#[tokio::test(start_paused = true)]
async fn per_request_options_override_the_layer() {
    use sturdy_core::CallOptions;
    // No retries for this one request.
    let api = Api::new(vec![Ok(status(503))]);
    let mut req = get();
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = layer().layer(api.service()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1);

    // More attempts than the layer's, for this one request.
    let api = Api::new((0..6).map(|_| Ok(status(503))).collect());
    let mut req = get();
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(7));
    let res = layer().layer(api.service()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 7);

    // A deadline for this one request.
    let slow = service_fn(|_req: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, BoxError>(status(200))
    });
    let mut req = get();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(1_500)));
    let start = Instant::now();
    let err = layer().layer(slow).oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(1_500));
    assert!(err
        .to_string()
        .starts_with("the overall deadline of 1.5s passed"));
}

#[test]
fn invalid_budgets_are_refused_when_configured() {
    for (ttl, pct) in [
        (0, 0.2),
        (61, 0.2),
        (10, -1.0),
        (10, 1_001.0),
        (10, f32::NAN),
    ] {
        let err = RetryLayer::new()
            .with_budget(Duration::from_secs(ttl), 10, pct)
            .unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{ttl} {pct}");
    }
    assert!(RetryLayer::new()
        .with_budget(Duration::from_secs(1), 0, 0.0)
        .is_ok());
}

#[tokio::test(start_paused = true)]
async fn the_deadline_error_names_the_last_failure_and_counts_the_attempt_in_flight() {
    // Attempt 1: connection reset at once; attempt 2 hangs until the deadline cuts it.
    let n = Arc::new(Mutex::new(0));
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let n = n.clone();
        async move {
            let i = {
                let mut n = n.lock().unwrap();
                *n += 1;
                *n
            };
            if i == 1 {
                return Err::<Response<()>, BoxError>(Box::new(io::Error::from(
                    io::ErrorKind::ConnectionReset,
                )));
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(status(200))
        }
    });
    let err = layer()
        .with_deadline(Duration::from_secs(2))
        .layer(api)
        .oneshot(post(Some("key-n")))
        .await
        .unwrap_err();
    let e = err.downcast_ref::<sturdy_core::Error>().unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(e.report().unwrap().attempts(), 2, "{err}");
    let text = err.to_string();
    assert!(
        text.starts_with(
            "the overall deadline of 2s passed during attempt 2; the attempt before it: "
        ),
        "{text}"
    );
    assert!(text.contains("reset"), "the cause is named: {text}");
    // The earlier attempt's error is in the chain.
    assert!(sturdy_core::find::<io::Error>(&*err).is_some(), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn a_service_that_fails_to_become_ready_for_a_retry_still_gets_the_calls_error() {
    // Ready once; after the first attempt (a reset: it may have been processed), poll_ready fails.
    #[derive(Clone)]
    struct Flaky(Arc<Mutex<u32>>);
    impl Service<Request<Full<Bytes>>> for Flaky {
        type Response = Response<()>;
        type Error = BoxError;
        type Future = std::future::Ready<Result<Response<()>, BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            if *self.0.lock().unwrap() == 0 {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Ready(Err("the pool is closed".into()))
            }
        }
        fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
            *self.0.lock().unwrap() += 1;
            std::future::ready(Err(Box::new(io::Error::from(
                io::ErrorKind::ConnectionReset,
            ))))
        }
    }
    let err = layer()
        .layer(Flaky(Arc::default()))
        .oneshot(post(Some("key-r")))
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy_core::Error>()
        .expect("one sturdy error");
    let report = e.report().expect("a report");
    assert_eq!(report.attempts(), 1);
    assert_eq!(report.delivery(), sturdy_core::Delivery::MaybeProcessed);
    assert_eq!(report.idempotency_key(), Some("key-r"));
    let text = err.to_string();
    assert!(text.contains("the pool is closed"), "{text}");
    assert!(
        text.ends_with("retry with the same idempotency key key-r"),
        "{text}"
    );
}

fn probing() -> Reply {
    Err(Box::new(
        sturdy_core::CircuitOpen::new("api.example.com", Duration::ZERO)
            .with_reason(sturdy_core::OpenReason::Probing),
    ))
}

/// A half-open breaker refuses everyone but its probe, with `retry_in` zero: a call with a
/// deadline looks again every backoff base until the probe has answered, and those refusals
/// (nothing was sent) do not use up its 4 attempts.
#[tokio::test(start_paused = true)]
async fn a_call_with_a_deadline_waits_out_a_running_probe_without_using_attempts() {
    let api = Api::new((0..6).map(|_| probing()).collect());
    let start = Instant::now();
    let res = layer()
        .with_deadline(Duration::from_secs(10))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 7);
    for gap in api.gaps() {
        assert!(gap >= Duration::from_millis(250), "{:?}", api.gaps());
    }
    assert!(start.elapsed() < Duration::from_secs(10));

    // Without a deadline, the refusal is the answer at once.
    let api = Api::new(vec![probing()]);
    let err = layer()
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 1);
    assert!(
        sturdy_core::find::<sturdy_core::CircuitOpen>(&*err).is_some(),
        "{err}"
    );

    // Refused until the deadline: it ends by then, with the breaker's words.
    let api = Api::new((0..1000).map(|_| probing()).collect());
    let start = Instant::now();
    let err = layer()
        .with_deadline(Duration::from_secs(2))
        .layer(api.service())
        .oneshot(get())
        .await
        .unwrap_err();
    assert!(
        start.elapsed() <= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("half-open"), "{err}");
}

/// A POST without a key is not retried; when the server answered it 429 or 503 with a
/// `Retry-After`, the call ends as a `RateLimited` error carrying that wait, as it does when no
/// attempt is left (retry.md: "the caller always learns how long the server asked it to wait").
#[tokio::test(start_paused = true)]
async fn a_keyless_post_told_to_wait_ends_as_rate_limited() {
    for s in [429, 503] {
        let api = Api::new(vec![Ok(with_retry_after(s, "7"))]);
        let err = layer()
            .layer(api.service())
            .oneshot(post(None))
            .await
            .expect_err("a RateLimited error");
        assert_eq!(api.calls(), 1);
        let rl = sturdy_core::find::<RateLimited>(&*err).expect("RateLimited in the chain");
        assert_eq!(rl.retry_after(), Duration::from_secs(7), "{err}");
        let text = err.to_string();
        assert!(text.contains("not retried"), "{text}");
    }
    // Without a Retry-After the response comes back as it is.
    let api = Api::new(vec![Ok(status(503))]);
    let res = layer()
        .layer(api.service())
        .oneshot(post(None))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
}

/// The same rule when the retry budget is spent or the body was not kept: the wait asked for is
/// not slept, so the call ends as `RateLimited` carrying it.
#[tokio::test(start_paused = true)]
async fn a_wait_not_slept_for_want_of_budget_or_body_ends_as_rate_limited() {
    // No budget left: a reserve of 0 and no share of calls.
    let api = Api::new(vec![Ok(with_retry_after(429, "3"))]);
    let err = layer()
        .with_budget(Duration::from_secs(1), 0, 0.0)
        .unwrap()
        .layer(api.service())
        .oneshot(get())
        .await
        .expect_err("a RateLimited error");
    assert_eq!(api.calls(), 1);
    let rl = sturdy_core::find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(rl.retry_after(), Duration::from_secs(3), "{err}");
    assert!(err.to_string().contains("budget"), "{err}");

    // A body larger than the replay limit: sent once.
    let api = Api::new(vec![Ok(with_retry_after(503, "3"))]);
    let err = layer()
        .with_body_limit(2)
        .layer(api.service())
        .oneshot(post(Some("k-1")))
        .await
        .expect_err("a RateLimited error");
    assert_eq!(api.calls(), 1);
    let rl = sturdy_core::find::<RateLimited>(&*err).expect("RateLimited in the chain");
    assert_eq!(rl.retry_after(), Duration::from_secs(3), "{err}");
    assert!(
        err.to_string()
            .contains("larger than the replay limit of 2 bytes, or of unknown size"),
        "{err}"
    );
}

/// A body with trailers; `From<Bytes>` (what a replay is built from) has none.
struct Trailed {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl From<Bytes> for Trailed {
    fn from(b: Bytes) -> Self {
        Self {
            data: Some(b),
            trailers: None,
        }
    }
}

impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(d))));
        }
        std::task::Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

fn trailed(trailers: &[(&'static str, &'static str)]) -> Request<Trailed> {
    let mut map = http::HeaderMap::new();
    for (k, v) in trailers {
        map.insert(*k, http::HeaderValue::from_static(v));
    }
    Request::put("http://api.example.com/blob")
        .body(Trailed {
            data: Some(Bytes::from_static(b"payload")),
            trailers: Some(map),
        })
        .unwrap()
}

/// A replay is built from the body's bytes and cannot carry trailers: a body of known size with
/// trailers is refused before it is sent (it was sent without them, silently), and goes out
/// whole with retries off. Empty trailers carry nothing and do not count.
#[tokio::test(start_paused = true)]
async fn a_body_with_trailers_is_refused_unsent_not_sent_without_them() {
    let seen: Arc<Mutex<Vec<Option<http::HeaderMap>>>> = Arc::default();
    let api = {
        let seen = seen.clone();
        service_fn(move |req: Request<Trailed>| {
            let seen = seen.clone();
            async move {
                let c = req.into_body().collect().await.unwrap();
                seen.lock().unwrap().push(c.trailers().cloned());
                Ok::<_, BoxError>(status(200))
            }
        })
    };
    let svc = RetryLayer::new().layer(api);
    let err = svc
        .clone()
        .oneshot(trailed(&[("x-checksum", "abc123")]))
        .await
        .unwrap_err();
    let e = sturdy_core::find::<sturdy_core::Error>(&*err).expect("a sturdy error");
    assert_eq!(*e.kind(), ErrorKind::Body);
    assert!(e.to_string().contains("trailers"), "{e}");
    assert!(e.to_string().contains("without_retries"), "{e}");
    assert_eq!(
        sturdy_core::classify::delivery(&*err),
        sturdy_core::Delivery::NotSent
    );
    assert!(seen.lock().unwrap().is_empty(), "nothing sent");

    let mut req = trailed(&[("x-checksum", "abc123")]);
    req.extensions_mut()
        .insert(sturdy_core::CallOptions::new().without_retries());
    svc.clone().oneshot(req).await.unwrap();
    let got = seen.lock().unwrap().pop().flatten().expect("trailers sent");
    assert_eq!(got["x-checksum"], "abc123");

    svc.oneshot(trailed(&[])).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// A POST whose own key is not UTF-8 text: the key is retried with, the report cannot show it
/// (`idempotency_key` is `None`) but says it was carried, so an agent's advice is to send it
/// again with that key, not to check first; on the error and on a final failed response alike.
#[tokio::test(start_paused = true)]
async fn a_key_that_is_not_utf8_is_reported_as_carried() {
    let key = http::HeaderValue::from_bytes(b"caf\xe9-\xff").unwrap();
    let post = || {
        let mut r = Request::post("http://api.example.com/orders")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        r.headers_mut().insert("idempotency-key", key.clone());
        r
    };
    let reset = || -> Reply {
        Err(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "reset",
        )))
    };
    let api = Api::new(vec![reset(), reset(), reset(), reset()]);
    let err = RetryLayer::new()
        .layer(api.service())
        .oneshot(post())
        .await
        .unwrap_err();
    assert_eq!(api.calls(), 4);
    let report = sturdy_core::find::<sturdy_core::Error>(&*err)
        .and_then(sturdy_core::Error::report)
        .expect("a report");
    assert_eq!(report.idempotency_key(), None);
    assert!(report.carried_idempotency_key());
    let advice = sturdy_core::summary::ErrorSummary::of(&*err).advice();
    assert!(
        advice.contains("send it again only with the idempotency key it carried"),
        "{advice}"
    );

    let api = Api::new(vec![
        Ok(status(503)),
        Ok(status(503)),
        Ok(status(503)),
        Ok(status(503)),
    ]);
    let res = RetryLayer::new()
        .layer(api.service())
        .oneshot(post())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    let report = res
        .extensions()
        .get::<sturdy_core::CallReport>()
        .expect("a report");
    assert!(report.carried_idempotency_key() && report.idempotency_key().is_none());
}
