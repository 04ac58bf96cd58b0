//! The retry layer over a half-open breaker (`OpenReason::Probing`): the retry CHANGELOG says
//! "refusals of a half-open breaker that a call waits out are not counted as attempts (messages,
//! `CallReport`)", and the circuit guide "such a refusal sent nothing, so it uses up neither an
//! attempt nor the retry budget".
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use outsider_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::events::{Event, RetryStop};
use sturdy::core::{CallOptions, CircuitOpen, Delivery, OpenReason};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::{timeout, Instant};
use tower::{ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/items";
const LIMIT: Duration = Duration::from_secs(60);

type Events = Arc<Mutex<Vec<String>>>;

fn get_with(options: CallOptions) -> Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get(U);
    req.extensions_mut().insert(options);
    req
}

/// A retry layer with a backoff of exactly 250 ms, recording its events; a breaker that opens
/// on one failure for `open` (doubling on each reopening up to `max_open`).
fn stack(
    api: &Api,
    open: Duration,
    max_open: Duration,
) -> (
    impl tower::Service<
            Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = sturdy::core::BoxError,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Events,
) {
    let events: Events = Arc::default();
    let ev = events.clone();
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_backoff(
                    Backoff::exponential(Duration::from_millis(250), Duration::from_millis(250))
                        .unwrap(),
                )
                .on_event(move |e| {
                    let s = match e {
                        Event::RetryScheduled { attempt, .. } => format!("scheduled {attempt}"),
                        Event::RetryStopped { attempt, stop, .. } => {
                            format!("stopped {attempt} {}", stop.as_str())
                        }
                        _ => return,
                    };
                    ev.lock().unwrap().push(s);
                }),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(open, max_open),
        )
        .service(api.service());
    (svc, events)
}

/// Opens the breaker with a 503 and, once it is half-open, sends a probe that hangs at the API
/// (or answers as `probe` says). Returns the probe's task.
async fn half_open_with_probe_out<S>(
    api: &Api,
    svc: &S,
    open: Duration,
    probe: Answer,
) -> tokio::task::JoinHandle<()>
where
    S: tower::Service<
            Request<http_body_util::Full<bytes::Bytes>>,
            Response = http::Response<http_body_util::Full<bytes::Bytes>>,
            Error = sturdy::core::BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    api.push(status(503));
    let first = svc
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(open + Duration::from_millis(10)).await;
    api.push(probe);
    let probe = svc
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()));
    let task = tokio::spawn(async move {
        let _ = probe.await;
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    task
}

fn attempts_of(err: &sturdy::core::BoxError) -> u32 {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .and_then(|e| e.report())
        .map(|r| r.attempts())
        .expect("a call report")
}

/// A deadline shorter than the backoff base: the call meets the probe's refusal, cannot look
/// again, and ends. It sent nothing, and the refusal is not an attempt.
#[tokio::test(start_paused = true)]
async fn a_deadline_shorter_than_the_backoff_base_reports_no_attempt() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_millis(100);
    let (svc, _events) = stack(&api, open, open);
    let probe = half_open_with_probe_out(&api, &svc, open, Answer::Hang).await;
    let seen = api.calls();
    let err = timeout(
        LIMIT,
        svc.clone().oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_millis(200)),
        )),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(api.calls(), seen, "the call sent nothing");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(attempts_of(&err), 0, "{err}");
    probe.abort();
}

/// A call that waits for a probe that never answers, until its deadline: every look was
/// refused, nothing was sent; the report must not count any of the refusals.
#[tokio::test(start_paused = true)]
async fn a_call_waiting_out_a_probe_until_its_deadline_reports_no_attempt() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_millis(100);
    let (svc, events) = stack(&api, open, open);
    let probe = half_open_with_probe_out(&api, &svc, open, Answer::Hang).await;
    let seen = api.calls();
    events.lock().unwrap().clear();
    let start = Instant::now();
    let err = timeout(
        LIMIT,
        svc.clone().oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(1)),
        )),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert!(start.elapsed() <= Duration::from_secs(1));
    assert_eq!(api.calls(), seen, "the call sent nothing");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(
        attempts_of(&err),
        0,
        "{err}; events {:?}",
        events.lock().unwrap()
    );
    probe.abort();
}

/// One attempt answered 503, then the retries meet the probe of another call until the
/// deadline: one attempt was made, and the message and report say one.
#[tokio::test(start_paused = true)]
async fn one_answered_attempt_then_probe_refusals_report_one_attempt() {
    let api = Api::new(vec![status(503)], ok());
    let open = Duration::from_millis(100);
    let (svc, events) = stack(&api, open, open);
    // Call A: its first attempt gets the 503 that opens the breaker.
    let a = tokio::spawn(svc.clone().oneshot(get_with(
        CallOptions::new().with_deadline(Duration::from_secs(2)),
    )));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(api.calls(), 1);
    // Another call becomes the probe and hangs (before A's retry at 250 ms).
    api.push(Answer::Hang);
    let probe = tokio::spawn(
        svc.clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    let err = timeout(LIMIT, a)
        .await
        .expect("no hang")
        .unwrap()
        .unwrap_err();
    assert_eq!(api.calls(), 2, "A sent one request, the probe one");
    let text = err.to_string();
    assert_eq!(
        attempts_of(&err),
        1,
        "{text}; events {:?}",
        events.lock().unwrap()
    );
    assert!(!text.contains("2 attempts"), "{text}");
    probe.abort();
}

/// Events and metrics: `RetryScheduled` is "an attempt failed in a way worth trying again" and
/// `sturdy.retry.retries` counts "failed attempts that are retried". A call that waits out a
/// probe and then succeeds with its only request made no failed attempt.
#[tokio::test(start_paused = true)]
async fn looks_past_a_probe_are_not_reported_as_retried_attempts() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_millis(100);
    let (svc, events) = stack(&api, open, open);
    let probe =
        half_open_with_probe_out(&api, &svc, open, after(Duration::from_secs(2), ok())).await;
    let seen = api.calls();
    events.lock().unwrap().clear();
    let res = timeout(
        LIMIT,
        svc.clone().oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(5)),
        )),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), seen + 1, "one request of the call");
    let ev = events.lock().unwrap().clone();
    assert!(
        ev.is_empty(),
        "events of a call with no failed attempt: {ev:?}"
    );
    probe.await.unwrap();
}

/// Callers waiting for a probe that succeeds all go through once the breaker closes, each with
/// one request, within their deadlines.
#[tokio::test(start_paused = true)]
async fn waiting_callers_go_through_when_the_probe_succeeds() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_millis(100);
    let (svc, _events) = stack(&api, open, open);
    let probe =
        half_open_with_probe_out(&api, &svc, open, after(Duration::from_millis(700), ok())).await;
    let seen = api.calls();
    let start = Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(svc.clone().oneshot(get_with(
                CallOptions::new().with_deadline(Duration::from_secs(3)),
            )))
        })
        .collect();
    for c in calls {
        let res = timeout(LIMIT, c).await.expect("no hang").unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(api.calls(), seen + 5);
    probe.await.unwrap();
}

/// The probe fails while a caller waits: the breaker reopens for longer than the caller has
/// left. The caller stops at once (not at its deadline), never sent anything, and the stop is
/// `past_deadline`.
#[tokio::test(start_paused = true)]
async fn a_probe_that_fails_and_reopens_past_the_deadline_ends_the_wait() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_secs(1);
    let (svc, events) = stack(&api, open, Duration::from_secs(8));
    let probe = half_open_with_probe_out(
        &api,
        &svc,
        open,
        after(Duration::from_millis(300), status(503)),
    )
    .await;
    let seen = api.calls();
    events.lock().unwrap().clear();
    let start = Instant::now();
    let err = timeout(
        LIMIT,
        svc.clone().oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_millis(1500)),
        )),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(700), "{took:?}");
    assert_eq!(api.calls(), seen, "the call sent nothing");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("the breaker's refusal");
    assert_eq!(open.reason(), OpenReason::Failing, "{err}");
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev.last()
            .map(String::as_str)
            .map(|s| s.ends_with("past_deadline")),
        Some(true),
        "{ev:?}"
    );
    // (The probe's own call, without retries, stops with attempts_exhausted.)
    assert_eq!(
        ev.iter()
            .filter(|e| e.contains(RetryStop::PastDeadline.as_str()))
            .count(),
        1,
        "{ev:?}"
    );
    probe.await.unwrap();
}

/// The call's `Trace`: `TraceEvent::Attempt` is "an attempt finished", `TraceEvent::Rejected`
/// "a layer refused the call without calling the service". A call that waits out a probe and
/// then succeeds with its one request made one attempt: its trace holds one `Attempt`.
#[tokio::test(start_paused = true)]
async fn a_trace_of_a_call_that_waited_for_the_probe_holds_one_attempt() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_millis(100);
    let (svc, _events) = stack(&api, open, open);
    let probe =
        half_open_with_probe_out(&api, &svc, open, after(Duration::from_secs(1), ok())).await;
    let trace = sturdy::core::Trace::new();
    let mut req = get_with(CallOptions::new().with_deadline(Duration::from_secs(5)));
    req.extensions_mut().insert(trace.clone());
    let res = timeout(LIMIT, svc.clone().oneshot(req))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let attempts: Vec<_> = trace
        .events()
        .into_iter()
        .filter_map(|e| match e {
            sturdy::core::TraceEvent::Attempt { number, outcome } => Some((number, outcome)),
            _ => None,
        })
        .collect();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    probe.await.unwrap();
}

/// `with_max_retry_after` is "the longest `Retry-After` this client sleeps"; the circuit guide
/// says a half-open refusal "is looked at again every backoff base ... for as long as the
/// deadline allows". A client that sleeps no `Retry-After` longer than 100 ms still waits for a
/// probe that answers within its deadline.
#[tokio::test(start_paused = true)]
async fn a_short_max_retry_after_does_not_stop_waiting_for_the_probe() {
    let api = Api::new(vec![], ok());
    let open = Duration::from_millis(100);
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_retry_after(Duration::from_millis(100))
                .with_backoff(
                    Backoff::exponential(Duration::from_millis(250), Duration::from_millis(250))
                        .unwrap(),
                ),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(open, open),
        )
        .service(api.service());
    let probe =
        half_open_with_probe_out(&api, &svc, open, after(Duration::from_millis(600), ok())).await;
    let out = timeout(
        LIMIT,
        svc.clone().oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(3)),
        )),
    )
    .await
    .expect("no hang");
    match out {
        Ok(res) => assert_eq!(res.status(), StatusCode::OK),
        Err(e) => panic!("gave up while the probe was out: {e}"),
    }
    probe.await.unwrap();
}
