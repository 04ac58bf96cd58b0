//! Outside tests of per-attempt timeouts and the overall deadline, against README.md,
//! docs/guides/retry.md, docs/PERFORMANCE.md ("The attempt timeout's cost") and the rustdoc of
//! `AttemptTimeoutLayer`, `RetryLayer`, `ClientBuilder` and `CallOptions`.
//!
//! Paused time, in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::time::Duration;

use outsider4_common::*;
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "http://api.example.com";

fn url(path: &str) -> String {
    format!("{HOST}{path}")
}

fn with_options(mut req: http::Request<Body>, opts: CallOptions) -> http::Request<Body> {
    req.extensions_mut().insert(opts);
    req
}

// ------------------------------------------------------------------ AttemptTimeoutLayer alone

/// Rustdoc of `AttemptTimeoutLayer`: "An attempt that runs out of time fails with a
/// `sturdy_core::Error` of kind `Timeout`" and its error "says how long the attempt was given"
/// (`the attempt timed out after 1s`).
#[tokio::test(start_paused = true)]
async fn layer_times_out_a_future_that_never_answers() {
    let api = Api::always(Act::Hang);
    let svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
    let t0 = Instant::now();
    let err = bounded(svc.oneshot(get(&url("/x")))).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(1));
    assert_eq!(err.to_string(), "the attempt timed out after 1s");
    assert_eq!(*sturdy_error(&err).kind(), ErrorKind::Timeout);
}

/// An answer just inside the bound is the answer; one just past it is a timeout at the bound.
/// Both inner futures are pending at their first poll (a timer), which is when the layer makes
/// its own timer (PERFORMANCE.md: "one that waits gets tokio's `Sleep` for the deadline already
/// fixed, so the bound is unchanged").
#[tokio::test(start_paused = true)]
async fn layer_bound_just_before_and_just_after() {
    for (answer_after, ok) in [(999, true), (1_001, false), (1, true), (5_000, false)] {
        let api = Api::always(Act::After(ms(answer_after), 200));
        let svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
        let t0 = Instant::now();
        let res = bounded(svc.oneshot(get(&url("/x")))).await;
        if ok {
            assert_eq!(res.unwrap().status(), 200, "answer after {answer_after} ms");
            assert_eq!(t0.elapsed(), ms(answer_after));
        } else {
            let err = res.unwrap_err();
            assert_eq!(t0.elapsed(), secs(1), "answer after {answer_after} ms");
            assert_eq!(err.to_string(), "the attempt timed out after 1s");
        }
    }
}

/// A future pending at its first poll (and woken at once) answers normally, as does one ready
/// at its first poll.
#[tokio::test(start_paused = true)]
async fn layer_passes_answers_pending_once_or_at_once() {
    for act in [Act::PendingOnce(201), st(201)] {
        let api = Api::always(act.clone());
        let svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
        let res = bounded(svc.oneshot(get(&url("/x")))).await.unwrap();
        assert_eq!(res.status(), 201, "{act:?}");
    }
}

/// PERFORMANCE.md: the layer "fixes each attempt's deadline when the attempt is sent". The
/// attempt is sent at `call`; its future is first polled 600 ms later: the bound still ends
/// 1 s after `call`, whether the inner future is pending for ever, answers at 300 ms or at
/// 500 ms after its first poll.
#[tokio::test(start_paused = true)]
async fn layer_counts_from_call_not_from_first_poll() {
    for (act, ok) in [
        (Act::Hang, false),
        (Act::After(ms(300), 200), true),
        (Act::After(ms(500), 200), false),
    ] {
        let api = Api::always(act.clone());
        let mut svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
        let sent = Instant::now();
        let fut = svc.ready().await.unwrap().call(get(&url("/x")));
        tokio::time::advance(ms(600)).await;
        let res = bounded(fut).await;
        match (ok, res) {
            (true, Ok(r)) => {
                assert_eq!(r.status(), 200);
                assert_eq!(sent.elapsed(), ms(900), "{act:?}");
            }
            (false, Err(e)) => {
                assert_eq!(sent.elapsed(), secs(1), "{act:?}: {e}");
                assert_eq!(e.to_string(), "the attempt timed out after 1s");
            }
            (ok, res) => panic!(
                "{act:?}: expected ok={ok}, got {:?}",
                res.map(|r| r.status())
            ),
        }
    }
}

/// Rustdoc: "`None`: only requests that set one are bounded"; a request may set its own, or none.
#[tokio::test(start_paused = true)]
async fn layer_per_request_override_and_none() {
    // No layer timeout, the request sets 2 s.
    let api = Api::always(Act::Hang);
    let svc = AttemptTimeoutLayer::new(None).layer(api.service());
    let t0 = Instant::now();
    let req = with_options(
        get(&url("/x")),
        CallOptions::new().with_attempt_timeout(secs(2)),
    );
    let err = bounded(svc.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(2));
    assert_eq!(err.to_string(), "the attempt timed out after 2s");

    // Layer 1 s, the request none: a 5 s answer arrives.
    let api = Api::always(Act::After(secs(5), 200));
    let svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
    let req = with_options(
        get(&url("/x")),
        CallOptions::new().without_attempt_timeout(),
    );
    let res = bounded(svc.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
}

// ------------------------------------------------------------------ in ClientBuilder

/// ClientBuilder rustdoc: "a 30 s timeout per attempt"; retry.md: the message names the root
/// cause, `the attempt timed out after 30s`.
#[tokio::test(start_paused = true)]
async fn client_default_attempt_timeout_is_30s() {
    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new().build(api.service());
    let req = with_options(get(&url("/x")), CallOptions::new().without_retries());
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(30));
    assert!(
        err.to_string().contains("the attempt timed out after 30s"),
        "{err}"
    );
    assert_eq!(*sturdy_error(&err).kind(), ErrorKind::Timeout);
    assert_eq!(api.calls(), 1);
}

/// AttemptTimeoutLayer rustdoc: a timed-out attempt is retried by the retry layer above. A GET
/// whose first attempt hangs is retried and succeeds; the second attempt is sent after the 1 s
/// bound plus a backoff of 250 to 750 ms (decorrelated jitter, base 250 ms).
#[tokio::test(start_paused = true)]
async fn client_retries_a_timed_out_get() {
    let api = Api::new(|n, _| if n == 0 { Act::Hang } else { st(200) });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(11))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let t0 = Instant::now();
    let res = bounded(client.oneshot(get(&url("/x")))).await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    let second = seen[1].sent - t0;
    assert!(
        second >= ms(1_250) && second <= ms(1_750),
        "second attempt at {second:?}"
    );
}

/// "POST and PATCH are retried only when they carry an `Idempotency-Key` header": without the
/// key layer a timed-out POST is one attempt whose error may have been processed; with it
/// (the default) every attempt is made, each with the same key.
#[tokio::test(start_paused = true)]
async fn client_retries_a_timed_out_post_only_with_a_key() {
    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(RetryLayer::new().with_seed(1))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let t0 = Instant::now();
    let err = bounded(client.oneshot(post(&url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), secs(1));
    assert_eq!(api.calls(), 1, "a POST without a key is not retried");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
    assert!(!err.to_string().contains("safe to send again"), "{err}");

    let api = Api::new(|n, _| if n < 2 { Act::Hang } else { st(201) });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(1))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let res = bounded(client.oneshot(post(&url("/orders"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let seen = api.seen();
    assert_eq!(seen.len(), 3);
    let keys: Vec<_> = seen
        .iter()
        .map(|s| s.headers.get("idempotency-key").cloned())
        .collect();
    assert!(keys[0].is_some());
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
}

/// A request's own attempt timeout wins over the builder's, and the error says the request's.
#[tokio::test(start_paused = true)]
async fn client_request_attempt_timeout_is_the_one_reported() {
    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new()
        .with_attempt_timeout(secs(10))
        .build(api.service());
    let req = with_options(
        get(&url("/x")),
        CallOptions::new()
            .with_attempt_timeout(secs(2))
            .without_retries(),
    );
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(2));
    assert!(
        err.to_string().contains("the attempt timed out after 2s"),
        "{err}"
    );
}

/// `CallOptions::without_attempt_timeout`: "No per-attempt timeout for this request (a long
/// download, say); the deadline, if any, still applies."
#[tokio::test(start_paused = true)]
async fn client_without_attempt_timeout_still_has_the_deadline() {
    let api = Api::always(Act::After(secs(5), 200));
    let client = ClientBuilder::new()
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let req = with_options(
        get(&url("/download")),
        CallOptions::new().without_attempt_timeout(),
    );
    let res = bounded(client.clone().oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(api.calls(), 1);

    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new()
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let req = with_options(
        get(&url("/download")),
        CallOptions::new()
            .without_attempt_timeout()
            .with_deadline(secs(3)),
    );
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(3));
    assert_eq!(api.calls(), 1);
    assert_eq!(*sturdy_error(&err).kind(), ErrorKind::Timeout, "{err}");
}

/// `ClientBuilder::without_attempt_timeout`: "No timeout per attempt (a request can still set
/// one with CallOptions)".
#[tokio::test(start_paused = true)]
async fn client_without_attempt_timeout_request_sets_one() {
    let api = Api::always(Act::After(secs(100), 200));
    let client = ClientBuilder::new()
        .without_attempt_timeout()
        .build(api.service());
    let t0 = Instant::now();
    let res = bounded(client.clone().oneshot(get(&url("/x"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(t0.elapsed(), secs(100));

    let req = with_options(
        get(&url("/x")),
        CallOptions::new()
            .with_attempt_timeout(secs(3))
            .without_retries(),
    );
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(3));
    assert!(err.to_string().contains("timed out after 3s"), "{err}");
}

// ------------------------------------------------------------------ RetryLayer's own timeout

/// `RetryLayer::with_attempt_timeout`: "A timeout for each attempt; a timed-out attempt is
/// retryable". GET retried; POST not without a key; POST retried with one.
#[tokio::test(start_paused = true)]
async fn retry_layer_own_timeout_retries_get_and_keyed_post() {
    let api = Api::new(|n, _| if n == 0 { Act::Hang } else { st(200) });
    let svc = RetryLayer::new()
        .with_seed(5)
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    let res = bounded(svc.oneshot(get(&url("/x")))).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(api.calls(), 2);

    let api = Api::always(Act::Hang);
    let svc = RetryLayer::new()
        .with_seed(5)
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    let t0 = Instant::now();
    let err = bounded(svc.oneshot(post(&url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), secs(1));
    assert_eq!(api.calls(), 1);
    assert_eq!(*sturdy_error(&err).kind(), ErrorKind::Timeout);
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);

    let api = Api::new(|n, _| if n == 0 { Act::Hang } else { st(201) });
    let svc = RetryLayer::new()
        .with_seed(5)
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    let mut req = post(&url("/orders"));
    req.headers_mut()
        .insert("idempotency-key", "order-1".parse().unwrap());
    let res = bounded(svc.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(api.calls(), 2);
}

/// The same bounds for the retry loop's own timer: just before, just after, pending once.
#[tokio::test(start_paused = true)]
async fn retry_layer_own_timeout_bounds() {
    for (act, ok) in [
        (Act::After(ms(999), 200), true),
        (Act::PendingOnce(200), true),
        (Act::After(ms(1_001), 200), false),
        (Act::Hang, false),
    ] {
        let api = Api::always(act.clone());
        let svc = RetryLayer::new()
            .with_max_attempts(1)
            .with_attempt_timeout(secs(1))
            .layer(api.service());
        let t0 = Instant::now();
        let res = bounded(svc.oneshot(get(&url("/x")))).await;
        match (ok, res) {
            (true, Ok(r)) => assert_eq!(r.status(), 200),
            (false, Err(e)) => {
                assert_eq!(t0.elapsed(), secs(1), "{act:?}");
                assert!(e.to_string().contains("timed out after 1s"), "{act:?}: {e}");
            }
            (ok, res) => panic!(
                "{act:?}: expected ok={ok}, got {:?}",
                res.map(|r| r.status())
            ),
        }
    }
}

/// retry.md lists `CallOptions::with_attempt_timeout` / `without_attempt_timeout` among the
/// per-request overrides ("Put a `sturdy_core::CallOptions` in the request's extensions to
/// override the layer for one request"), and the retry layer has its own attempt timeout
/// (`.with_attempt_timeout(d)`, "or `AttemptTimeoutLayer` lower in the stack"). A request's
/// own timeout should win over the retry layer's as it does over `AttemptTimeoutLayer`'s.
#[tokio::test(start_paused = true)]
async fn retry_layer_own_timeout_honours_the_request_override() {
    // The request asks for none: a 5 s answer arrives.
    let api = Api::always(Act::After(secs(5), 200));
    let svc = RetryLayer::new()
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    let req = with_options(
        get(&url("/download")),
        CallOptions::new().without_attempt_timeout(),
    );
    let res = bounded(svc.oneshot(req)).await;
    assert!(
        res.is_ok(),
        "without_attempt_timeout ignored by RetryLayer::with_attempt_timeout: {}",
        res.err().map(|e| e.to_string()).unwrap_or_default()
    );
    assert_eq!(api.calls(), 1);

    // The request asks for 3 s: the attempt is cut at 3 s, not 1 s.
    let api = Api::always(Act::Hang);
    let svc = RetryLayer::new()
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    let req = with_options(
        get(&url("/x")),
        CallOptions::new()
            .with_attempt_timeout(secs(3))
            .without_retries(),
    );
    let t0 = Instant::now();
    let err = bounded(svc.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), secs(3), "{err}");
}

// ------------------------------------------------------------------ counted from when sent

/// The retry loop's own timer is counted from when the attempt is sent, not from when the
/// loop starts waiting for readiness. Under a `ConcurrencyLimit(1)`: call A's first attempt
/// hangs (cut at 1 s), call B (a kept clone, `ready().await?.call(req)`) takes the permit at
/// 1 s and holds it to 1.8 s; A's retry waits for the permit and is sent at 1.8 s, so it is cut
/// at 2.8 s (not 1 s after its backoff ended, which would be 2.25 to 2.75 s).
#[tokio::test(start_paused = true)]
async fn retry_layer_timer_starts_when_sent_after_waiting_for_a_permit() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/slow" {
            Act::After(ms(800), 200)
        } else {
            Act::Hang
        }
    });
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_seed(7)
                .with_max_attempts(2)
                .with_attempt_timeout(secs(1)),
        )
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    check_sent_then_counted(svc, &api).await;
}

/// The same through `ClientBuilder`, whose `AttemptTimeoutLayer` sits under every other layer.
#[tokio::test(start_paused = true)]
async fn client_timer_starts_when_sent_after_waiting_for_a_permit() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/slow" {
            Act::After(ms(800), 200)
        } else {
            Act::Hang
        }
    });
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(7).with_max_attempts(2))
        .with_attempt_timeout(secs(1))
        .build(limited);
    check_sent_then_counted(client, &api).await;
}

async fn check_sent_then_counted<S>(svc: S, api: &Api)
where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = sturdy::core::BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let t0 = Instant::now();
    let mut a = svc.clone();
    let fut_a = a.ready().await.unwrap().call(get(&url("/hang")));
    let task_a = tokio::spawn(async move {
        let r = fut_a.await;
        (r, Instant::now())
    });
    tokio::task::yield_now().await;
    let mut b = svc.clone();
    let task_b = tokio::spawn(async move {
        let r = b.ready().await.unwrap().call(get(&url("/slow"))).await;
        (r, Instant::now())
    });
    let (rb, tb) = bounded(task_b).await.unwrap();
    assert_eq!(rb.unwrap().status(), 200);
    assert_eq!(tb - t0, ms(1_800));
    let (ra, ta) = bounded(task_a).await.unwrap();
    let err = ra.unwrap_err();
    let seen = api.seen();
    let sent: Vec<_> = seen.iter().map(|s| (s.uri.clone(), s.sent - t0)).collect();
    assert_eq!(seen.len(), 3, "{sent:?}");
    assert_eq!(
        seen[2].sent - t0,
        ms(1_800),
        "A's retry is sent at 1.8 s: {sent:?}"
    );
    assert_eq!(
        ta - t0,
        ms(2_800),
        "A's retry was sent at 1.8 s and given 1 s; it ended at {:?}: {err} ({sent:?})",
        ta - t0
    );
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
    assert_eq!(sturdy_error(&err).report().unwrap().attempts(), 2, "{err}");
}

/// Four kept clones of a client over `ConcurrencyLimit(1)` (each `ready().await?.call(req)`),
/// every answer taking 800 ms of a 1 s attempt timeout: the calls go one after the other, and
/// none times out, since each attempt's time starts when it is sent.
#[tokio::test(start_paused = true)]
async fn client_over_concurrency_limit_queued_calls_do_not_time_out() {
    let api = Api::always(Act::After(ms(800), 200));
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3))
        .with_attempt_timeout(secs(1))
        .build(limited);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut kept = client.clone();
        tasks.push(tokio::spawn(async move {
            kept.ready()
                .await?
                .call(get(&url(&format!("/item/{i}"))))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(api.calls(), 4, "no attempt timed out: {:?}", api.seen());
    assert_eq!(t0.elapsed(), ms(3_200));
}

/// The same under tower's `Buffer` (the client is called by the buffer's worker when it is
/// ready), callers keeping their buffer handles and calling `ready().await?.call(req)`.
#[tokio::test(start_paused = true)]
async fn client_under_buffer_over_concurrency_limit_queued_calls_do_not_time_out() {
    let api = Api::always(Act::After(ms(800), 200));
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3))
        .with_attempt_timeout(secs(1))
        .build(limited);
    let buffered = tower::buffer::Buffer::new(client, 16);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let mut kept = buffered.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..2 {
                let res = kept
                    .ready()
                    .await?
                    .call(get(&url(&format!("/item/{i}/{j}"))))
                    .await?;
                assert_eq!(res.status(), 200);
            }
            Ok::<_, sturdy::core::BoxError>(())
        }));
    }
    for t in tasks {
        bounded(t).await.unwrap().unwrap();
    }
    assert_eq!(api.calls(), 8, "no attempt timed out");
    assert_eq!(t0.elapsed(), ms(6_400));
}

/// A buffered client over `ConcurrencyLimit(1)`: a hanging call is cut at each attempt's bound
/// and gives its permit back, so a call queued behind it gets through.
#[tokio::test(start_paused = true)]
async fn client_under_buffer_timed_out_attempt_gives_the_permit_back() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/hang" {
            Act::Hang
        } else {
            Act::After(ms(100), 200)
        }
    });
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3).with_max_attempts(1))
        .with_attempt_timeout(secs(1))
        .build(limited);
    let buffered = tower::buffer::Buffer::new(client, 16);
    let t0 = Instant::now();
    let mut a = buffered.clone();
    let ta = tokio::spawn(async move { a.ready().await?.call(get(&url("/hang"))).await });
    tokio::task::yield_now().await;
    let mut b = buffered.clone();
    let tb = tokio::spawn(async move {
        let r = b.ready().await?.call(get(&url("/ok"))).await;
        r.map(|res| (res.status(), Instant::now()))
    });
    let (status, at) = bounded(tb).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(at - t0, ms(1_100));
    let err = bounded(ta).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
}

/// A call that waits in the rate limiter for a server-asked pause is not yet sent: its attempt
/// timer starts when it leaves the limiter.
#[tokio::test(start_paused = true)]
async fn client_wait_for_a_pause_is_not_part_of_the_attempt() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "3")])
        } else {
            Act::After(ms(800), 200)
        }
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(2))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let t0 = Instant::now();
    let a = tokio::spawn(client.clone().oneshot(get(&url("/a"))));
    tokio::time::sleep(ms(500)).await;
    let res = bounded(client.clone().oneshot(get(&url("/b"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(bounded(a).await.unwrap().unwrap().status(), 200);
    let seen = api.seen();
    let b = seen.iter().find(|s| s.uri.ends_with("/b")).unwrap();
    assert!(b.sent - t0 >= secs(3), "B sent at {:?}", b.sent - t0);
    assert_eq!(
        seen.iter().filter(|s| s.uri.ends_with("/b")).count(),
        1,
        "B's only attempt did not time out"
    );
}

// ------------------------------------------------------------------ the overall deadline

/// retry.md: "`.with_deadline(d)` bounds attempts and sleeps together; no sleep is started
/// that would end past it, and an attempt still running at the deadline is abandoned"; the
/// error's `report()` "gives the number of attempts" and its message names them.
#[tokio::test(start_paused = true)]
async fn deadline_cuts_an_attempt_in_flight_and_names_the_attempts() {
    for seed in 0..8 {
        let api = Api::always(Act::Hang);
        let svc = RetryLayer::new()
            .with_seed(seed)
            .with_attempt_timeout(secs(1))
            .with_deadline(ms(2_200))
            .layer(api.service());
        let t0 = Instant::now();
        let err = bounded(svc.oneshot(get(&url("/x")))).await.unwrap_err();
        assert_eq!(t0.elapsed(), ms(2_200), "seed {seed}: {err}");
        let made = api.calls();
        assert_eq!(
            made, 2,
            "seed {seed}: 0-1 s, then 1.25-1.75 s to the deadline"
        );
        let e = sturdy_error(&err);
        assert_eq!(*e.kind(), ErrorKind::Timeout, "{err}");
        assert_eq!(e.report().unwrap().attempts() as usize, made, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("deadline"), "{msg}");
        assert!(
            msg.contains(&format!("{made} attempts")) || msg.contains(&format!("attempt {made}")),
            "the message names the attempts: {msg}"
        );
        assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    }
}

/// "No sleep is started that would end past it": the first attempt is cut at 1 s; the shortest
/// backoff (250 ms) would end past a 1.2 s deadline, so the call fails at 1 s.
#[tokio::test(start_paused = true)]
async fn deadline_no_sleep_is_started_past_it() {
    for seed in 0..8 {
        let api = Api::always(Act::Hang);
        let svc = RetryLayer::new()
            .with_seed(seed)
            .with_attempt_timeout(secs(1))
            .with_deadline(ms(1_200))
            .layer(api.service());
        let t0 = Instant::now();
        let err = bounded(svc.oneshot(get(&url("/x")))).await.unwrap_err();
        assert_eq!(t0.elapsed(), secs(1), "seed {seed}: {err}");
        assert_eq!(api.calls(), 1);
        let e = sturdy_error(&err);
        assert_eq!(e.report().unwrap().attempts(), 1, "{err}");
        assert!(err.to_string().contains("timed out after 1s"), "{err}");
    }
}

/// The same deadline given per request (`CallOptions::with_deadline`), through `ClientBuilder`
/// (attempt timeout 1 s): the call ends at the deadline with both attempts counted.
#[tokio::test(start_paused = true)]
async fn request_deadline_through_client_builder() {
    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(4))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let req = with_options(get(&url("/x")), CallOptions::new().with_deadline(ms(2_200)));
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), ms(2_200), "{err}");
    assert_eq!(api.calls(), 2);
    let e = sturdy_error(&err);
    assert_eq!(e.report().unwrap().attempts(), 2, "{err}");
    assert!(err.to_string().contains("deadline"), "{err}");
}

/// A deadline shorter than the attempt timeout cuts the first attempt.
#[tokio::test(start_paused = true)]
async fn deadline_shorter_than_the_attempt_timeout() {
    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new()
        .with_attempt_timeout(secs(10))
        .build(api.service());
    let req = with_options(get(&url("/x")), CallOptions::new().with_deadline(ms(500)));
    let t0 = Instant::now();
    let err = bounded(client.oneshot(req)).await.unwrap_err();
    assert_eq!(t0.elapsed(), ms(500));
    assert_eq!(api.calls(), 1);
    let e = sturdy_error(&err);
    assert_eq!(*e.kind(), ErrorKind::Timeout);
    assert_eq!(e.report().unwrap().attempts(), 1, "{err}");
    assert!(
        !err.to_string().contains("timed out after 10s"),
        "the attempt was not given 10 s: {err}"
    );
}

/// The deadline also cuts a `Retry-After` sleep that would end past it (503, `Retry-After: 2`,
/// deadline 1 s): not slept, the call fails at once with `RateLimited` in its chain.
#[tokio::test(start_paused = true)]
async fn deadline_cuts_a_retry_after_sleep() {
    let api = Api::always(st_h(503, &[("retry-after", "2")]));
    let svc = RetryLayer::new()
        .with_attempt_timeout(secs(1))
        .with_deadline(secs(1))
        .layer(api.service());
    let t0 = Instant::now();
    let res = bounded(svc.oneshot(get(&url("/x")))).await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(api.calls(), 1);
    let err = res.expect_err("retry.md: past the deadline, a 503 fails at once");
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some(),
        "{}",
        chain(&*err)
    );
}

// ------------------------------------------------------------------ more edges of the lazy timer

/// The attempt's future is first polled after its bound has already passed, and the inner
/// future is pending: it fails at that first poll, not a whole timeout later.
#[tokio::test(start_paused = true)]
async fn first_poll_after_the_bound_fails_at_once() {
    let api = Api::always(Act::Hang);
    let mut svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
    let fut = svc.ready().await.unwrap().call(get(&url("/x")));
    tokio::time::advance(secs(3)).await;
    let t = Instant::now();
    let err = bounded(fut).await.unwrap_err();
    assert_eq!(t.elapsed(), Duration::ZERO, "{err}");
    assert_eq!(err.to_string(), "the attempt timed out after 1s");
}

/// A response future polled once in one task and then awaited in another (its timer was made
/// at the first poll, with the first task's waker) still times out at its bound.
#[tokio::test(start_paused = true)]
async fn a_future_moved_to_another_task_after_its_first_poll_still_times_out() {
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx).is_pending())
        })
        .await
    }
    // AttemptTimeoutLayer.
    let api = Api::always(Act::Hang);
    let mut svc = AttemptTimeoutLayer::new(Some(secs(1))).layer(api.service());
    let mut fut = Box::pin(svc.ready().await.unwrap().call(get(&url("/x"))));
    assert!(poll_once(&mut fut).await);
    let t = Instant::now();
    let err = bounded(tokio::spawn(fut)).await.unwrap().unwrap_err();
    assert_eq!(t.elapsed(), secs(1));
    assert!(err.to_string().contains("timed out after 1s"), "{err}");

    // The retry layer's own timer.
    let api = Api::always(Act::Hang);
    let mut svc = RetryLayer::new()
        .with_max_attempts(1)
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    let mut fut = Box::pin(svc.ready().await.unwrap().call(get(&url("/x"))));
    assert!(poll_once(&mut fut).await);
    let t = Instant::now();
    let err = bounded(tokio::spawn(fut)).await.unwrap().unwrap_err();
    assert_eq!(t.elapsed(), secs(1));
    assert!(err.to_string().contains("timed out after 1s"), "{err}");

    // The composed client.
    let api = Api::always(Act::Hang);
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(1))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let mut kept = client.clone();
    let mut fut = Box::pin(kept.ready().await.unwrap().call(get(&url("/x"))));
    assert!(poll_once(&mut fut).await);
    let t = Instant::now();
    let err = bounded(tokio::spawn(fut)).await.unwrap().unwrap_err();
    assert_eq!(t.elapsed(), secs(1));
    assert!(err.to_string().contains("timed out after 1s"), "{err}");
}

/// Each attempt gets a fresh bound: the first hangs (cut at 1 s), the retry answers 900 ms
/// after it is sent and is not cut.
#[tokio::test(start_paused = true)]
async fn a_retry_gets_its_own_whole_bound() {
    let script = |n: usize, _: &http::Request<Body>| {
        if n == 0 {
            Act::Hang
        } else {
            Act::After(ms(900), 200)
        }
    };
    let api = Api::new(script);
    let svc = RetryLayer::new()
        .with_seed(1)
        .with_attempt_timeout(secs(1))
        .layer(api.service());
    assert_eq!(
        bounded(svc.oneshot(get(&url("/x"))))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(api.calls(), 2);

    let api = Api::new(script);
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(1))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    assert_eq!(
        bounded(client.oneshot(get(&url("/x"))))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(api.calls(), 2);
}

/// One kept service called many times, each answer 1 ms inside or outside the bound: every
/// call is judged by its own bound.
#[tokio::test(start_paused = true)]
async fn a_kept_client_called_many_times_judges_each_attempt_alone() {
    let api = Api::new(|n, _| {
        if n % 2 == 0 {
            Act::After(ms(999), 200)
        } else {
            Act::After(ms(1_001), 200)
        }
    });
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_max_attempts(1))
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let mut kept = client.clone();
    for i in 0..20 {
        let t = Instant::now();
        let res = bounded(kept.ready().await.unwrap().call(get(&url("/x")))).await;
        if i % 2 == 0 {
            assert_eq!(res.unwrap().status(), 200, "call {i}");
            assert_eq!(t.elapsed(), ms(999));
        } else {
            let err = res.unwrap_err();
            assert_eq!(t.elapsed(), secs(1), "call {i}: {err}");
        }
    }
}

/// RELIABILITY.md: durations set to `Duration::MAX` are "read as about 30 years from now; never
/// a panic". Here with inner futures that are pending at their first poll, so the attempt's
/// timer is made.
#[tokio::test(start_paused = true)]
async fn huge_attempt_timeouts_with_a_pending_inner_do_not_panic() {
    for act in [Act::PendingOnce(200), Act::After(ms(10), 200)] {
        for which in ["layer", "retry", "client", "options"] {
            let api = Api::always(act.clone());
            let a = api.clone();
            let run = tokio::spawn(async move {
                let req = get(&url("/x"));
                match which {
                    "layer" => AttemptTimeoutLayer::new(Some(Duration::MAX))
                        .layer(a.service())
                        .oneshot(req)
                        .await
                        .map(|r| r.status()),
                    "retry" => RetryLayer::new()
                        .with_attempt_timeout(Duration::MAX)
                        .layer(a.service())
                        .oneshot(req)
                        .await
                        .map(|r| r.status()),
                    "client" => ClientBuilder::new()
                        .with_attempt_timeout(Duration::MAX)
                        .build(a.service())
                        .oneshot(req)
                        .await
                        .map(|r| r.status()),
                    _ => ClientBuilder::new()
                        .build(a.service())
                        .oneshot(with_options(
                            req,
                            CallOptions::new()
                                .with_attempt_timeout(Duration::MAX)
                                .with_deadline(Duration::MAX),
                        ))
                        .await
                        .map(|r| r.status()),
                }
            });
            let res = bounded(run).await;
            assert!(
                matches!(res, Ok(Ok(s)) if s == 200),
                "{which} {act:?}: {:?}",
                res.map(|r| r.map_err(|e| e.to_string()))
            );
        }
    }
}

/// The message says how long the attempt was given, for a timeout that is not a whole number
/// of seconds too.
#[tokio::test(start_paused = true)]
async fn the_message_says_a_fractional_timeout() {
    let api = Api::always(Act::Hang);
    let svc = AttemptTimeoutLayer::new(Some(ms(1_500))).layer(api.service());
    let err = bounded(svc.oneshot(get(&url("/x")))).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg == "the attempt timed out after 1.5s" || msg == "the attempt timed out after 1500ms",
        "{msg}"
    );
    let api = Api::always(Act::Hang);
    let svc = AttemptTimeoutLayer::new(Some(ms(250))).layer(api.service());
    let err = bounded(svc.oneshot(get(&url("/x")))).await.unwrap_err();
    assert_eq!(err.to_string(), "the attempt timed out after 250ms");
}

/// retry.md: the deadline "bounds attempts and sleeps together". A retry that waits for the
/// inner service's readiness (a `ConcurrencyLimit(1)` whose permit another caller holds for
/// 10 s) is cut at the deadline too, and the error counts only the attempt that was sent.
#[tokio::test(start_paused = true)]
async fn deadline_cuts_a_retry_waiting_for_readiness() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/hold" {
            Act::After(secs(10), 200)
        } else {
            st(503)
        }
    });
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(1))
        .service(api.service());
    let svc = RetryLayer::new()
        .with_seed(3)
        .with_deadline(ms(2_500))
        .layer(limited.clone());
    let t0 = Instant::now();
    // A's first attempt: 503 at once; then B takes the permit for 10 s.
    let mut a = svc.clone();
    let fut_a = a.ready().await.unwrap().call(get(&url("/a")));
    let task_a = tokio::spawn(fut_a);
    tokio::task::yield_now().await;
    let mut holder = limited.clone();
    let hold =
        tokio::spawn(async move { holder.ready().await.unwrap().call(get(&url("/hold"))).await });
    let err = bounded(task_a).await.unwrap().unwrap_err();
    assert_eq!(t0.elapsed(), ms(2_500), "{err}");
    assert_eq!(
        api.seen().iter().filter(|s| s.uri.ends_with("/a")).count(),
        1
    );
    let e = sturdy_error(&err);
    assert_eq!(*e.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(e.report().unwrap().attempts(), 1, "{err}");
    assert!(err.to_string().contains("deadline"), "{err}");
    hold.abort();
}

/// "No sleep is started that would end past it", with a `Retry-After` whose jitter (up to
/// +20 %) may reach past the deadline: 503 with `Retry-After: 2`, deadline 2.2 s. The retry is
/// either made before the deadline (never sooner than 2 s) or not slept at all; a sleep cut by
/// the deadline (a call that ends at 2.2 s with one attempt) is what the sentence rules out.
#[tokio::test(start_paused = true)]
async fn a_jittered_retry_after_never_sleeps_into_the_deadline() {
    for seed in 0..30 {
        let api = Api::new(|n, _| {
            if n == 0 {
                st_h(503, &[("retry-after", "2")])
            } else {
                st(200)
            }
        });
        let svc = RetryLayer::new()
            .with_seed(seed)
            .with_deadline(ms(2_200))
            .layer(api.service());
        let t0 = Instant::now();
        let res = bounded(svc.oneshot(get(&url("/x")))).await;
        let took = t0.elapsed();
        match res {
            Ok(r) => {
                assert_eq!(r.status(), 200);
                let second = api.seen()[1].sent - t0;
                assert!(
                    second >= secs(2) && second < ms(2_200),
                    "seed {seed}: retried at {second:?}"
                );
            }
            Err(e) => {
                assert_eq!(
                    took,
                    Duration::ZERO,
                    "seed {seed}: slept {took:?} and then failed: {e}"
                );
                assert_eq!(api.calls(), 1);
            }
        }
    }
}

/// `ConcurrencyLimit(1)` over the client, kept clones (`ready().await?.call(req)`), and the same
/// under `Buffer`: a call whose attempts hang holds the permit through its retries; the call
/// queued behind it is sent when it ends, and its 800 ms answer is inside its own 1 s bound.
#[tokio::test(start_paused = true)]
async fn concurrency_limit_over_the_client_with_kept_clones_and_buffer() {
    for buffered in [false, true] {
        let api = Api::new(|_, req| {
            if req.uri().path() == "/hang" {
                Act::Hang
            } else {
                Act::After(ms(800), 200)
            }
        });
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(8).with_max_attempts(2))
            .with_attempt_timeout(secs(1))
            .build(api.service());
        let limited = ServiceBuilder::new()
            .layer(ConcurrencyLimitLayer::new(1))
            .service(client);
        let svc = tower::util::BoxCloneService::new(limited);
        let svc = if buffered {
            tower::util::BoxCloneService::new(tower::buffer::Buffer::new(svc, 8))
        } else {
            svc
        };
        let t0 = Instant::now();
        let mut a = svc.clone();
        let ta = tokio::spawn(async move {
            let r = a.ready().await?.call(get(&url("/hang"))).await;
            r.map(|res| res.status())
        });
        tokio::task::yield_now().await;
        let mut b = svc.clone();
        let tb = tokio::spawn(async move {
            let r = b.ready().await?.call(get(&url("/ok"))).await;
            r.map(|res| (res.status(), Instant::now()))
        });
        let err = bounded(ta).await.unwrap().unwrap_err();
        assert!(err.to_string().contains("timed out after 1s"), "{err}");
        let a_done = t0.elapsed();
        assert!(
            a_done >= ms(2_250) && a_done <= ms(2_750),
            "buffered {buffered}: two 1 s attempts and a backoff: {a_done:?}"
        );
        let (status, at) = bounded(tb).await.unwrap().unwrap();
        assert_eq!(status, 200, "buffered {buffered}");
        assert_eq!(at - t0, a_done + ms(800), "buffered {buffered}");
        assert_eq!(api.calls(), 3, "buffered {buffered}");
    }
}

/// Both timers at once (the retry layer's own and the builder's `AttemptTimeoutLayer`): the
/// shorter one cuts the attempt, and the message says the bound that fired.
#[tokio::test(start_paused = true)]
async fn the_shorter_of_two_attempt_timeouts_fires_and_is_named() {
    for (retry_s, builder_s) in [(2, 5), (5, 1)] {
        let api = Api::always(Act::Hang);
        let client = ClientBuilder::new()
            .with_retry(
                RetryLayer::new()
                    .with_max_attempts(1)
                    .with_attempt_timeout(secs(retry_s)),
            )
            .with_attempt_timeout(secs(builder_s))
            .build(api.service());
        let t0 = Instant::now();
        let err = bounded(client.oneshot(get(&url("/x")))).await.unwrap_err();
        let shorter = retry_s.min(builder_s);
        assert_eq!(t0.elapsed(), secs(shorter), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("the attempt timed out after {shorter}s")),
            "{err}"
        );
    }
}
