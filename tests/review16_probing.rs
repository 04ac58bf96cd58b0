//! The retry layer over a half-open breaker (`OpenReason::Probing`): a call with a deadline looks
//! again every backoff base until its deadline, and those refusals use up neither attempts nor
//! the retry budget (retry crate docs, circuit guide, retry CHANGELOG).
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CallOptions, Delivery};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/items";

/// An API whose answers are picked by the order the requests arrive: `503` for the ones listed
/// in `fail`, never for the ones in `hang`, `200` after `slow` for the ones in `slow_ok`, else
/// `200` at once.
#[derive(Clone)]
struct Script {
    seen: Arc<AtomicUsize>,
    fail: &'static [usize],
    hang: &'static [usize],
    slow_ok: &'static [(usize, u64)],
}

impl Script {
    fn service(
        &self,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let s = self.clone();
        tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let n = s.seen.fetch_add(1, Ordering::SeqCst) + 1;
            let fail = s.fail.contains(&n);
            let hang = s.hang.contains(&n);
            let slow = s.slow_ok.iter().find(|(i, _)| *i == n).map(|(_, ms)| *ms);
            async move {
                if hang {
                    std::future::pending::<()>().await;
                }
                if let Some(ms) = slow {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let status = if fail {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(status)
                        .body(Full::from("x"))
                        .unwrap(),
                )
            }
        })
    }
}

fn get_with(options: CallOptions) -> Request<Full<Bytes>> {
    let mut req = Request::get(U).body(Full::default()).unwrap();
    req.extensions_mut().insert(options);
    req
}

/// A half-open breaker's refusal that lands on the call's last allowed attempt: the docs say it
/// uses up no attempt, so the call keeps looking until the probe closes the breaker.
#[tokio::test(start_paused = true)]
async fn a_probing_refusal_on_the_last_attempt_waits_for_the_probe() {
    // Request 1 (call B's first attempt): 503, opens the breaker for 100 ms.
    // Request 2 (call A, the probe): answers 200 after 3 s, which closes the breaker.
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[],
        slow_ok: &[(2, 3_000)],
    };
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(2)
                .with_backoff(
                    Backoff::exponential(Duration::from_secs(1), Duration::from_secs(1)).unwrap(),
                )
                .without_budget(),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());

    let start = Instant::now();
    let b = tokio::spawn(client.clone().oneshot(get_with(
        CallOptions::new().with_deadline(Duration::from_secs(10)),
    )));
    // B's first attempt got its 503; the breaker is open until 100 ms; B sleeps 1 s.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    // A is the probe, out until 3.2 s. B's second (last) attempt at 1 s meets `Probing`.
    let b = b.await;
    let a = a.await;
    assert!(
        b.is_ok(),
        "call B panicked instead of waiting for the probe: {:?}",
        b.err()
    );
    let b = b.unwrap();
    assert_eq!(b.as_ref().map(|r| r.status()).ok(), Some(StatusCode::OK));
    assert_eq!(a.unwrap().unwrap().status(), StatusCode::OK);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// Same, but through the default of 4 attempts: three counted failures first, then a probing
/// refusal on the fourth.
#[tokio::test(start_paused = true)]
async fn a_probing_refusal_after_three_failures_does_not_panic() {
    // Requests 1..3: call B's attempts, 503 each (the breaker wants 3 in a row); request 4: A,
    // the probe, answers 200 after 3 s.
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1, 2, 3],
        hang: &[],
        slow_ok: &[(4, 3_000)],
    };
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_backoff(
                    Backoff::exponential(Duration::from_secs(1), Duration::from_secs(1)).unwrap(),
                )
                .without_budget(),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(3)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let b = tokio::spawn(client.clone().oneshot(get_with(
        CallOptions::new().with_deadline(Duration::from_secs(20)),
    )));
    // B: 503 at 0, 1 s, 2 s (the third opens the breaker until 2.1 s); A becomes the probe at
    // 2.5 s; B's fourth attempt at 3 s meets `Probing`.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let a = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    let b = b.await;
    let _ = a.await;
    assert!(b.is_ok(), "call B panicked: {:?}", b.err());
    assert_eq!(b.unwrap().unwrap().status(), StatusCode::OK);
}

/// A call whose deadline ends while the probe is still out: nothing was sent by it, and the
/// retry docs promise "4 attempts in all"; the refusals "use up neither attempts".
#[tokio::test(start_paused = true)]
async fn refusals_while_probing_are_not_reported_as_attempts() {
    // Request 1: an earlier call's 503 opens the breaker; request 2: the probe, which hangs.
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[2],
        slow_ok: &[],
    };
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let first = client
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;

    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(3)),
        ))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() <= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        script.seen.load(Ordering::SeqCst),
        2,
        "the call sent nothing"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let own = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
    let report = own.report().expect("a call report");
    let text = err.to_string();
    assert!(
        report.attempts() <= 4,
        "report says {} attempts; message: {text}",
        report.attempts()
    );
    probe.abort();
}

/// The refusals use no retry budget: a budget that allows no retry at all still lets the call
/// wait for the probe, and succeed once it closes the breaker.
#[tokio::test(start_paused = true)]
async fn an_empty_retry_budget_still_waits_for_the_probe() {
    // Request 1: 503 (opens the breaker); request 2: the probe, 200 after 1 s.
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[],
        slow_ok: &[(2, 1_000)],
    };
    let client = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_budget(Duration::from_secs(10), 0, 0.0)
                .unwrap(),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let first = client
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    let res = client
        .clone()
        .oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(5)),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The probe answers at about 1.16 s; the call looks again every 250 ms.
    assert!(
        start.elapsed() <= Duration::from_millis(1_500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(probe.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(script.seen.load(Ordering::SeqCst), 3);
}

/// Many callers waiting on the same probe send nothing while it is out, and each sends once
/// when it closes.
#[tokio::test(start_paused = true)]
async fn many_waiting_callers_send_nothing_while_the_probe_is_out() {
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[],
        slow_ok: &[(2, 2_000)],
    };
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let _ = client
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut callers = Vec::new();
    for _ in 0..50 {
        callers.push(tokio::spawn(client.clone().oneshot(get_with(
            CallOptions::new().with_deadline(Duration::from_secs(10)),
        ))));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        script.seen.load(Ordering::SeqCst),
        2,
        "nothing sent while probing"
    );
    for c in callers {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(probe.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(script.seen.load(Ordering::SeqCst), 52);
}

/// A call that asked for a single attempt (`without_retries`) with a deadline meets a half-open
/// breaker: whether it waits for the probe or fails with the refusal, it must return an error or
/// a response, not panic.
#[tokio::test(start_paused = true)]
async fn a_single_attempt_call_with_a_deadline_over_a_probing_breaker_returns_the_refusal() {
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[],
        slow_ok: &[(2, 1_000)],
    };
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let _ = client
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let one = tokio::spawn(
        client.clone().oneshot(get_with(
            CallOptions::new()
                .without_retries()
                .with_deadline(Duration::from_secs(5)),
        )),
    );
    let one = one.await;
    assert!(one.is_ok(), "the call panicked: {:?}", one.err());
    let err = one.unwrap().expect_err("refused while the probe is out");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(script.seen.load(Ordering::SeqCst), 2, "nothing sent");
    let _ = probe.await;
}

/// A request whose body is too large to keep for a replay (one attempt only) meets a half-open
/// breaker under a deadline.
#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_replayed_over_a_probing_breaker_returns_the_refusal() {
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[],
        slow_ok: &[(2, 1_000)],
    };
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new().with_body_limit(4))
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let _ = client
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut req = Request::put(U)
        .body(Full::from("a body longer than four bytes"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(5)));
    let one = tokio::spawn(client.clone().oneshot(req));
    let one = one.await;
    assert!(one.is_ok(), "the call panicked: {:?}", one.err());
    let err = one.unwrap().expect_err("refused while the probe is out");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("replay"), "{err}");
    let _ = probe.await;
}

/// The words of that refusal for a GET with an empty body that asked for one attempt: the
/// reason it was not retried is the caller's single attempt, not its body.
#[tokio::test(start_paused = true)]
async fn a_single_attempt_refusal_does_not_blame_an_empty_body() {
    let script = Script {
        seen: Arc::new(AtomicUsize::new(0)),
        fail: &[1],
        hang: &[2],
        slow_ok: &[],
    };
    let client = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .service(script.service());
    let _ = client
        .clone()
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = client
        .clone()
        .oneshot(get_with(
            CallOptions::new()
                .without_retries()
                .with_deadline(Duration::from_secs(5)),
        ))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(!text.contains("body was not kept"), "{text}");
    probe.abort();
}
