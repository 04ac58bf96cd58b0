//! The public docs of the retry, rate-limit, circuit-breaker and agent-summary pieces, read
//! sentence by sentence against the composed client and each layer alone.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::time::Duration;

use http::{Request, StatusCode};
use outsider_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::summary::ErrorSummary;
use sturdy::core::{BoxError, CallOptions, CircuitOpen, Delivery, OpenReason};
use sturdy::ratelimit::{DirectLimiter, Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";
const U: &str = "http://api.example.com/items";

fn report_of(err: &BoxError) -> sturdy::core::CallReport {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .and_then(|e| e.report())
        .cloned()
        .expect("a call report")
}

fn get_with(options: CallOptions) -> Request<http_body_util::Full<bytes::Bytes>> {
    let mut req = get(U);
    req.extensions_mut().insert(options);
    req
}

/// sturdy-core, `CallReport::new`: "0 when none was sent: a call that ended while it waited, or
/// whose every try was refused before it left"; `CallReport::attempts`: "How many attempts were
/// made (sent on, past every layer that holds or refuses calls)". A breaker forced open refuses
/// the only try before it leaves.
#[tokio::test(start_paused = true)]
async fn a_call_refused_by_an_open_breaker_reports_no_attempt() {
    let api = Api::new(vec![], ok());
    let (breaker, handle) = CircuitBreakerLayer::new().pair();
    let client = ClientBuilder::new()
        .with_circuit_breaker(breaker)
        .build(api.service());
    handle.force_open(HOST);
    let err = client.oneshot(get(U)).await.unwrap_err();
    assert_eq!(api.calls(), 0);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(report_of(&err).attempts(), 0, "{err}");
}

/// The same sentence, for a try the local rate limiter refused: a server asked for a pause of
/// 2 min; the next call is refused at once (its wait would pass `max_wait`) and sent nothing.
#[tokio::test(start_paused = true)]
async fn a_call_refused_by_the_local_rate_limiter_reports_no_attempt() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "120")])], ok());
    let client = ClientBuilder::new().build(api.service());
    let first = client.clone().oneshot(get(U)).await.unwrap_err();
    assert_eq!(report_of(&first).attempts(), 1);
    let err = client.oneshot(get(U)).await.unwrap_err();
    assert_eq!(api.calls(), 1, "the second call was not sent");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(report_of(&err).attempts(), 0, "{err}");
}

/// A breaker that opens on one failure for `open` (doubling up to `max`), under a retry layer
/// with a deadline of 10 minutes.
fn breaker_under_retry(
    api: &Api,
    open: Duration,
    max: Duration,
) -> impl tower::Service<
    Request<http_body_util::Full<bytes::Bytes>>,
    Response = http::Response<http_body_util::Full<bytes::Bytes>>,
    Error = BoxError,
> {
    ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_seed(18)
                .with_deadline(Duration::from_secs(600)),
        )
        .layer(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(open, max),
        )
        .service(api.service())
}

/// docs/guides/circuit.md: "a call that meets an open breaker fails at once unless it has a
/// deadline that the breaker's `retry_in` fits: then the retry layer waits for the probe and
/// tries again"; retry.md: "An open circuit breaker below (`CircuitOpen { retry_in }`) is waited
/// out only when the call has a deadline and `retry_in` ends before it". Control: an open period
/// of 30 s (the default) is waited out.
#[tokio::test(start_paused = true)]
async fn a_30s_open_breaker_is_waited_out_within_the_deadline() {
    let api = Api::new(vec![status(503)], ok());
    let svc = breaker_under_retry(&api, Duration::from_secs(30), Duration::from_secs(300));
    let t0 = Instant::now();
    let res = svc.oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}",
        t0.elapsed()
    );
}

/// The same sentences with an open period of 2 minutes (the breaker's own doubling reaches it
/// after two re-openings), well within a deadline of 10 minutes.
#[tokio::test(start_paused = true)]
async fn a_2min_open_breaker_is_waited_out_within_a_10min_deadline() {
    let api = Api::new(vec![status(503)], ok());
    let svc = breaker_under_retry(&api, Duration::from_secs(120), Duration::from_secs(300));
    let t0 = Instant::now();
    let res = svc.oneshot(get(U)).await;
    let res = res.unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
    assert!(
        t0.elapsed() >= Duration::from_secs(120),
        "{:?}",
        t0.elapsed()
    );
}

/// docs/guides/agents.md: `retry_after_ms` is "when the server, a limiter or a breaker said
/// when"; circuit.md: a half-open breaker's refusal is "`Probing` (half-open, its probes out:
/// 'try again once they have answered', `retry_in` zero)", and "nobody knows when the probe will
/// answer". The summary an agent reads must not tell it to try again in 0 ms.
#[tokio::test(start_paused = true)]
async fn a_probing_refusal_does_not_tell_an_agent_to_try_again_at_once() {
    let api = Api::new(vec![status(503), Answer::Hang], ok());
    let svc = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .with_open_duration(Duration::from_secs(1), Duration::from_secs(1))
        .layer(api.service());
    let first = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(api.calls(), 2, "the probe is out");
    let err = svc.oneshot(get(U)).await.unwrap_err();
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("a CircuitOpen");
    assert_eq!(open.reason(), OpenReason::Probing);
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "circuit_open");
    assert!(!s.may_have_been_processed);
    let advice = s.advice();
    assert!(!advice.contains("Try again in 0"), "{advice}");
    assert_eq!(s.retry_after_ms, None, "{advice}");
    probe.abort();
}

/// retry.md: "A date already past (a server whose clock runs behind ours) asks for no wait at
/// all, so the retry follows almost at once, not after the backoff."
#[tokio::test(start_paused = true)]
async fn a_past_retry_after_date_retries_almost_at_once() {
    for code in [429u16, 503] {
        let api = Api::new(
            vec![status_h(
                code,
                &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
            )],
            ok(),
        );
        let svc = RetryLayer::new().with_seed(7).layer(api.service());
        let res = svc.oneshot(get(U)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let seen = api.seen();
        assert_eq!(seen.len(), 2);
        let gap = seen[1].at - seen[0].at;
        // The backoff base is 250 ms; the Retry-After jitter is at most a fifth of it.
        assert!(gap <= Duration::from_millis(50), "{code}: {gap:?}");
    }
}

/// retry.md: "Attempts: `.with_max_attempts(n)` \[4\] (0 is taken as 1)"; `CallOptions` says the
/// same of its own `with_max_attempts`.
#[tokio::test(start_paused = true)]
async fn zero_attempts_are_taken_as_one_in_the_layer_and_per_request() {
    let api = Api::new(vec![], status(503));
    let res = RetryLayer::new()
        .with_max_attempts(0)
        .layer(api.service())
        .oneshot(get(U))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1);

    let api = Api::new(vec![], status(503));
    let res = RetryLayer::new()
        .layer(api.service())
        .oneshot(get_with(CallOptions::new().with_max_attempts(0)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.calls(), 1);
}

/// ratelimit.md: "Every pause learned from a response is at most `max_pause` ... zero turns
/// pauses off". A 429 with `Retry-After: 10` then pauses nobody.
#[tokio::test(start_paused = true)]
async fn a_zero_max_pause_turns_pauses_off() {
    let api = Api::new(
        vec![
            status_h(429, &[("retry-after", "10")]),
            status_h(200, &[("ratelimit", "\"default\";r=0;t=30")]),
        ],
        ok(),
    );
    let (layer, handle) = RateLimitLayer::adaptive_only()
        .with_max_pause(Duration::ZERO)
        .pair();
    let svc = layer.layer(api.service());
    let t0 = Instant::now();
    for _ in 0..4 {
        let _ = svc.clone().oneshot(get(U)).await.unwrap();
        assert_eq!(handle.pause(HOST), None);
    }
    assert_eq!(api.calls(), 4);
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert!(handle.paused().is_empty());
}

/// ratelimit.md: "`DirectLimiter` is the same decision without a service ...: `check()` takes a
/// free slot, `until_ready(max_wait)` waits in the same kind of line, and `reserve(max_wait)`
/// books a future slot for the caller (kept whether used or not)".
#[tokio::test(start_paused = true)]
async fn the_direct_limiter_checks_reserves_and_waits() {
    let limiter = DirectLimiter::new(Quota::per_second(10).unwrap());
    assert!(limiter.check().is_ok());
    let refused = limiter.check().unwrap_err();
    assert_eq!(refused.retry_after(), Duration::from_millis(100));
    // Booked slots are kept: each reservation is one interval further.
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::from_millis(100)
    );
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::from_millis(200)
    );
    // Past max_wait: refused, nothing booked.
    assert!(limiter.reserve(Duration::from_millis(250)).is_err());
    assert_eq!(
        limiter.reserve(Duration::from_secs(1)).unwrap(),
        Duration::from_millis(300)
    );
    let t0 = Instant::now();
    limiter.until_ready(Duration::from_secs(1)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_millis(400));
    assert!(limiter.until_ready(Duration::ZERO).await.is_err());
}

/// retry.md: "for a POST or PATCH the message says what to do next: `...; the request was not
/// sent, so it is safe to send again` only when no attempt could have reached the server,
/// otherwise `...; it may have been processed: retry with the same idempotency key <key>`". A
/// keyed POST whose first attempt was answered 503 and whose second found the adaptive
/// concurrency limit full: its one message must not also say the call was not sent.
#[tokio::test(start_paused = true)]
async fn a_post_answered_then_refused_by_a_full_limit_never_reads_not_sent() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    let api = Api::new(vec![status(503), Answer::Hang], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(3))
        .with_adaptive_concurrency(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_max_wait(Duration::ZERO),
        )
        .build(api.service());
    let mut req = post(U, "{\"item\":1}");
    req.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(2));
    let call = tokio::spawn(client.clone().oneshot(req));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(api.calls(), 1, "the first attempt was answered 503");
    // Someone else takes the only place while the POST sleeps before its retry.
    let other = tokio::spawn(client.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(api.calls(), 2);
    let err = call.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
    assert!(text.contains("it may have been processed"), "{text}");
    assert!(!text.contains("not sent"), "{text}");
    other.abort();
}

/// retry.md: "`...; the request was not sent, so it is safe to send again` only when no attempt
/// could have reached the server, otherwise `...; it may have been processed`". A deadline of
/// zero: whatever the client does, what it says must match what the API saw.
#[tokio::test(start_paused = true)]
async fn a_zero_deadline_says_what_the_api_saw() {
    for slow in [false, true] {
        let api = Api::new(
            vec![],
            if slow {
                Answer::Slow(Duration::from_millis(5))
            } else {
                ok()
            },
        );
        let client = ClientBuilder::new().build(api.service());
        let mut req = post(U, "{}");
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(Duration::ZERO));
        let t0 = Instant::now();
        let out = client.oneshot(req).await;
        assert!(
            t0.elapsed() <= Duration::from_millis(5),
            "{:?}",
            t0.elapsed()
        );
        match out {
            Ok(res) => assert_eq!(api.calls(), 1, "{}", res.status()),
            Err(err) => {
                let text = err.to_string();
                if api.calls() == 0 {
                    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
                    assert!(!text.contains("may have been processed"), "{text}");
                } else {
                    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
                    assert!(!text.contains("not sent"), "{text}");
                }
            }
        }
    }
}

/// ratelimit.md: "Inside `sturdy::ClientBuilder` the retry layer sits above the limiter, and
/// `RateLimited` is retryable: a refused call is retried after the wait the refusal carries
/// (within the retry layer's attempts, budget, deadline and `max_retry_after`)". A server asked
/// for 90 s; a call with a 5-minute deadline that the limiter refuses (its wait passes
/// `max_wait`) fails at once under the default `max_retry_after` (60 s), as the server's own
/// `Retry-After: 90` would, and is retried after the pause when `max_retry_after` allows it.
#[tokio::test(start_paused = true)]
async fn a_refused_call_is_retried_after_the_refusals_wait_within_its_deadline() {
    for max_retry_after in [None, Some(Duration::from_secs(120))] {
        let api = Api::new(vec![status_h(429, &[("retry-after", "90")])], ok());
        let retry = match max_retry_after {
            Some(m) => RetryLayer::new().with_max_retry_after(m),
            None => RetryLayer::new(),
        };
        let client = ClientBuilder::new().with_retry(retry).build(api.service());
        let first = client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries()))
            .await
            .unwrap_err();
        assert!(sturdy::core::find::<sturdy::core::RateLimited>(&*first).is_some());
        let t0 = Instant::now();
        let out = client
            .oneshot(get_with(
                CallOptions::new().with_deadline(Duration::from_secs(300)),
            ))
            .await;
        if max_retry_after.is_none() {
            let err = out.unwrap_err();
            assert_eq!(t0.elapsed(), Duration::ZERO);
            assert_eq!(api.calls(), 1, "{err}");
            let rl = sturdy::core::find::<sturdy::core::RateLimited>(&*err).expect("RateLimited");
            assert!(rl.retry_after() >= Duration::from_secs(89), "{err}");
            assert_eq!(report_of(&err).attempts(), 0, "{err}");
            continue;
        }
        let res = out.unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            t0.elapsed() >= Duration::from_secs(89),
            "{:?}",
            t0.elapsed()
        );
    }
}

/// ratelimit.md: "Zero `max_wait`: the layer never waits ... For a call that must never wait,
/// also turn retries off for it (`CallOptions::without_retries()`)".
#[tokio::test(start_paused = true)]
async fn zero_max_wait_without_retries_never_waits_in_the_client() {
    let api = Api::new(vec![], ok());
    let client = ClientBuilder::new()
        .with_rate_limit(
            RateLimitLayer::new(Quota::per_second(1).unwrap()).with_max_wait(Duration::ZERO),
        )
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = client
        .oneshot(get_with(CallOptions::new().without_retries()))
        .await
        .unwrap_err();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(api.calls(), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(
        err.to_string(),
        format!("rate limited by {HOST}; retry after 1s")
    );
}

/// hedge.md: "Each copy then is an attempt that the breaker admits and counts, that takes a rate
/// slot and a place under the concurrency limit ...; the loser is dropped, which gives its slot
/// and its place back (an abandoned attempt is not a breaker failure)".
#[tokio::test(start_paused = true)]
async fn a_hedge_loser_gives_its_place_back_and_is_no_breaker_failure() {
    use sturdy::concurrency::AdaptiveConcurrencyLayer;
    use sturdy::hedge::HedgeLayer;
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(10)));
    let (hedge, hedges) = HedgeLayer::new().with_min_samples(10).pair();
    let (breaker, breakers) = CircuitBreakerLayer::new()
        .with_consecutive_failures(1)
        .pair();
    let (limit, limits) = AdaptiveConcurrencyLayer::new().pair();
    let client = ClientBuilder::new()
        .with_hedge(hedge)
        .with_circuit_breaker(breaker)
        .with_adaptive_concurrency(limit)
        .build(api.service());
    for _ in 0..20 {
        client.clone().oneshot(get(U)).await.unwrap();
    }
    assert!(hedges.stats(HOST).and_then(|s| s.delay()).is_some());
    for _ in 0..3 {
        api.push(Answer::Slow(Duration::from_secs(5)));
        let t0 = Instant::now();
        let res = client.clone().oneshot(get(U)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }
    let stats = hedges.stats(HOST).unwrap();
    assert!(stats.hedge_wins() >= 3, "{stats:?}");
    assert_eq!(
        breakers.state(HOST),
        Some(sturdy::circuit::CircuitState::Closed)
    );
    let state = limits.state(HOST).unwrap();
    assert_eq!((state.in_flight(), state.waiting()), (0, 0), "{state:?}");
}

/// retry.md: for a POST, "`...; it may have been processed: retry with the same idempotency key
/// <key>`" once an attempt could have reached the server; circuit.md: a half-open breaker's
/// refusal "sent nothing, so it uses up neither an attempt". A keyed POST answered 503 (which
/// opens the breaker), then refused by its half-open breaker until the deadline: one attempt was
/// made and it was answered 503; the message must not describe a refusal as that attempt, nor
/// say the call was not made.
#[tokio::test(start_paused = true)]
async fn a_post_answered_then_waiting_out_a_probe_names_its_real_last_attempt() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(9))
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_millis(100), Duration::from_millis(100)),
        )
        .build(api.service());
    let mut req = post(U, "{\"item\":1}");
    req.headers_mut()
        .insert("idempotency-key", "order-1".parse().unwrap());
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(2)));
    let call = tokio::spawn(client.clone().oneshot(req));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(api.calls(), 1);
    // Another call becomes the probe and hangs.
    api.push(Answer::Hang);
    let probe = tokio::spawn(
        client
            .clone()
            .oneshot(get_with(CallOptions::new().without_retries())),
    );
    let err = call.await.unwrap().unwrap_err();
    let text = err.to_string();
    assert_eq!(api.calls(), 2, "{text}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{text}");
    assert_eq!(report_of(&err).attempts(), 1, "{text}");
    assert!(text.contains("order-1"), "{text}");
    assert!(!text.contains("not made"), "{text}");
    assert!(!text.contains("not called"), "{text}");
    assert!(text.contains("503"), "the attempt that was made: {text}");
    probe.abort();
}

/// docs/guides/agents.md: "`retry_after_ms`: when the server, a limiter or a breaker said when";
/// the forced breaker's own message says "it stays open until the handle releases it". The
/// summary's advice must not name a time the breaker did not give.
#[tokio::test(start_paused = true)]
async fn a_forced_open_refusal_does_not_tell_an_agent_a_time() {
    let api = Api::new(vec![], ok());
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.service());
    handle.force_open(HOST);
    let err = svc.oneshot(get(U)).await.unwrap_err();
    let out = sturdy::core::summary::tool_result::<serde_json::Value>(Err(err));
    let text = out["content"][0]["text"].as_str().unwrap().to_owned();
    assert!(text.contains("until the handle releases it"), "{text}");
    assert!(!text.contains("Try again in"), "{text}");
}
