//! docs/guides/retry.md "What the caller gets" and sturdy-retry's changelog, read literally: a
//! try refused below before it was sent (an open breaker, the local rate limit, a full
//! concurrency limit) is not an attempt, counts against `max_attempts`, and leaves the sent
//! attempt's kind and cause on the call's error, the refusal still in the chain.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CallOptions, CircuitOpen, Delivery, ErrorKind, RateLimited};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";
const U: &str = "http://api.example.com/items";

fn core_err(err: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**err).expect("a sturdy_core::Error")
}

fn attempts(err: &BoxError) -> u32 {
    core_err(err).report().expect("a call report").attempts()
}

fn with_options(
    mut req: Request<Full<bytes::Bytes>>,
    o: CallOptions,
) -> Request<Full<bytes::Bytes>> {
    req.extensions_mut().insert(o);
    req
}

/// The words a refused try must never stand beside "may have been processed".
fn assert_no_not_sent_beside_maybe(msg: &str) {
    if msg.contains("may have been processed") {
        for w in ["not sent", "not made", "not called"] {
            assert!(
                !msg.contains(w),
                "{w:?} beside 'may have been processed': {msg}"
            );
        }
    }
}

/// An adaptive concurrency limit of exactly one that never waits (a full limit refuses at
/// once), under a retry layer, with a counter of the tries that reach the limit.
fn limit_of_one(
    api: &Api,
    retry: RetryLayer,
) -> (
    impl tower::Service<
            Request<Full<bytes::Bytes>>,
            Response = http::Response<Full<bytes::Bytes>>,
            Error = BoxError,
            Future = impl Send,
        > + Clone
        + Send,
    Arc<AtomicUsize>,
) {
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    let svc = ServiceBuilder::new()
        .layer(retry)
        .map_request(move |r: Request<Full<bytes::Bytes>>| {
            t.fetch_add(1, Ordering::SeqCst);
            r
        })
        .layer(
            AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_initial_limit(1)
                .with_max_wait(Duration::ZERO),
        )
        .service(api.service());
    (svc, tries)
}

/// retry.md: "a try that a layer below refused before it was sent (...) counts against
/// `max_attempts` but is not an attempt"; "`report()` gives the number of attempts (sent on, so
/// 0 when every try was refused)". A call whose every try meets a full concurrency limit: it
/// tries `max_attempts` times, sends nothing and reports 0 attempts.
#[tokio::test(start_paused = true)]
async fn every_try_refused_by_a_full_limit_reports_zero_attempts_and_stops_at_max_attempts() {
    let api = Api::new(vec![Answer::Hang], ok());
    let (svc, tries) = limit_of_one(&api, RetryLayer::new().with_seed(19).with_max_attempts(3));
    let holder = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/hold")));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(api.calls(), 1, "the holder is in flight");
    tries.store(0, Ordering::SeqCst);

    let err = svc.oneshot(get(U)).await.unwrap_err();
    assert_eq!(api.calls(), 1, "nothing more was sent");
    assert_eq!(
        tries.load(Ordering::SeqCst),
        3,
        "refused tries count against max_attempts: {err}"
    );
    assert_eq!(attempts(&err), 0, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let msg = err.to_string();
    assert!(
        !msg.contains("3 attempts"),
        "refused tries called attempts: {msg}"
    );
    assert!(msg.contains("refused"), "{msg}");
    holder.abort();
}

/// retry.md's own example: "`gave up after 1 attempt and 1 refused try: 503 Service Unavailable;
/// the try after it was refused before it was sent: the concurrency limit for api.example.com (1
/// call at once) stayed full for 0ms; ...`". "When the last try was refused after an attempt
/// that was sent, the kind and the root cause are that attempt's".
#[tokio::test(start_paused = true)]
async fn a_503_then_a_full_limit_reads_as_the_guide_example() {
    let api = Api::new(vec![status(503), Answer::Hang], ok());
    let (svc, tries) = limit_of_one(&api, RetryLayer::new().with_seed(19).with_max_attempts(2));
    let call = tokio::spawn(svc.clone().oneshot(get(U)));
    while api.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The 503 came back; before the retry (at least one backoff base away) another call takes
    // the only place and keeps it.
    let holder = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/hold")));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(api.calls(), 2, "the holder is in flight");

    let err = call.await.unwrap().unwrap_err();
    assert_eq!(api.calls(), 2, "the retry was not sent");
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "gave up after 1 attempt and 1 refused try: 503 Service Unavailable; the try after it \
             was refused before it was sent: the concurrency limit for api.example.com (1 call \
             at once) stayed full for 0ms"
        ),
        "{msg}"
    );
    assert_eq!(
        core_err(&err).kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert_eq!(attempts(&err), 1, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    assert!(sturdy::core::find::<LimitReached>(&*err).is_some(), "{msg}");
    assert_no_not_sent_beside_maybe(&msg);
    holder.abort();
}

/// retry.md: "When the last try was refused after an attempt that was sent, the kind and the
/// root cause are that attempt's, and the refusal is still in the chain (`find::<RateLimited>`
/// or `find::<CircuitOpen>` gives its wait)"; for a POST "`...; it may have been processed:
/// retry with the same idempotency key <key>`". A breaker that opens on the first 503.
#[tokio::test(start_paused = true)]
async fn a_post_whose_retry_meets_the_open_breaker_names_the_503_and_its_key() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .build(api.service());
    let err = client.oneshot(post(U, "{}")).await.unwrap_err();
    assert_eq!(api.calls(), 1);
    let msg = err.to_string();
    let key = api.seen()[0].headers["idempotency-key"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        core_err(&err).kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert_eq!(attempts(&err), 1, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    assert!(msg.contains("1 attempt and 1 refused try"), "{msg}");
    assert!(msg.contains("503"), "{msg}");
    assert!(
        msg.contains(&format!(
            "may have been processed: retry with the same idempotency key {key}"
        )),
        "{msg}"
    );
    assert!(!msg.contains("safe to send again"), "{msg}");
    assert_no_not_sent_beside_maybe(&msg);
    let open = sturdy::core::find::<CircuitOpen>(&*err).expect("the refusal in the chain");
    assert!(
        open.retry_in() > Duration::from_secs(25),
        "{:?}",
        open.retry_in()
    );
    assert_eq!(core_err(&err).idempotency_key(), Some(key.as_str()));
}

/// The same sentence for the local rate limit: a quota of one call per 2 minutes; the first
/// attempt is sent and answered 503; the retry is refused by the limiter with a wait (longer
/// than `max_retry_after`, so not slept). Kind: the 503's; `find::<RateLimited>` gives the wait.
#[tokio::test(start_paused = true)]
async fn a_503_then_a_local_rate_limit_refusal_keeps_the_503_kind_and_the_wait_in_the_chain() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(120)).unwrap(),
        ))
        .build(api.service());
    let t0 = Instant::now();
    let err = client.oneshot(get(U)).await.unwrap_err();
    assert_eq!(api.calls(), 1);
    let msg = err.to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "{:?}: {msg}",
        t0.elapsed()
    );
    assert_eq!(
        core_err(&err).kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert_eq!(attempts(&err), 1, "{msg}");
    assert!(msg.contains("1 attempt and 1 refused try"), "{msg}");
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("the refusal in the chain");
    assert!(
        rl.retry_after() > Duration::from_secs(100) && rl.retry_after() <= Duration::from_secs(120),
        "{:?}",
        rl.retry_after()
    );
    assert_no_not_sent_beside_maybe(&msg);
}

/// The same, for a POST refused by the rate limit after a sent attempt: the text never says "not
/// sent" beside "may have been processed", and `ErrorSummary` says it may have been processed.
#[tokio::test(start_paused = true)]
async fn a_post_refused_by_the_rate_limit_after_a_sent_attempt_reads_may_have_been_processed() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(120)).unwrap(),
        ))
        .build(api.service());
    let err = client.oneshot(post(U, "x")).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("may have been processed"), "{msg}");
    assert_no_not_sent_beside_maybe(&msg);
    let s = sturdy::core::ErrorSummary::of(&*err);
    assert!(s.may_have_been_processed, "{s:?}");
    assert_no_not_sent_beside_maybe(&s.advice());
}

/// retry.md: "When the last try was refused after an attempt that was sent, the kind and the
/// root cause are that attempt's, and the refusal is still in the chain"; "find a type anywhere
/// in the chain ... (the retry layer's error wraps the last attempt's)". An io reset on the sent
/// attempt, then the breaker open: the message names the reset, and `find::<std::io::Error>`
/// should reach it as it does when every attempt was sent (control below).
#[tokio::test(start_paused = true)]
async fn a_reset_then_an_open_breaker_names_the_reset() {
    let api = Api::new(vec![Answer::Io(std::io::ErrorKind::ConnectionReset)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .build(api.service());
    let err = client.oneshot(get(U)).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(api.calls(), 1);
    assert_eq!(attempts(&err), 1, "{msg}");
    assert!(msg.contains("1 attempt and 1 refused try"), "{msg}");
    assert!(
        !matches!(core_err(&err).kind(), ErrorKind::CircuitOpen { .. }),
        "{msg}"
    );
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{msg}");
    assert!(
        sturdy::core::find::<std::io::Error>(&*err).is_some(),
        "{:?}",
        chain(&*err)
    );
    assert_no_not_sent_beside_maybe(&msg);
}

/// retry.md: "`report()` gives the number of attempts (sent on, so 0 when every try was
/// refused)". Per request `CallOptions::with_max_attempts(1)` and a breaker forced open: the
/// only try is refused, so 0 attempts, and the text does not speak of "1 attempt".
#[tokio::test(start_paused = true)]
async fn a_forced_open_breaker_with_one_try_allowed_reports_zero_attempts() {
    let api = Api::new(vec![], ok());
    let (breaker, handle) = CircuitBreakerLayer::new().pair();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(breaker)
        .build(api.service());
    handle.force_open(HOST);
    let err = client
        .oneshot(with_options(
            get(U),
            CallOptions::new().with_max_attempts(1),
        ))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(api.calls(), 0);
    assert_eq!(attempts(&err), 0, "{msg}");
    assert!(!msg.contains("1 attempt"), "{msg}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
}

/// sturdy-retry changelog: "A deadline's error no longer calls a refused try 'the last
/// attempt'"; retry.md: the kind and cause are the sent attempt's. A 503, then tries refused by
/// a full limit until the call's deadline (1 s) passes: one attempt reported, the text never
/// says "not sent" beside "may have been processed".
#[tokio::test(start_paused = true)]
async fn a_deadline_after_a_503_and_refused_tries_counts_one_attempt() {
    let api = Api::new(vec![status(503), Answer::Hang], ok());
    let (svc, tries) = limit_of_one(&api, RetryLayer::new().with_seed(19));
    let req = with_options(
        get(U),
        CallOptions::new()
            .with_deadline(Duration::from_secs(1))
            .with_max_attempts(1_000),
    );
    let call = tokio::spawn(svc.clone().oneshot(req));
    while api.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let holder = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/hold")));
    let t0 = Instant::now();
    let err = call.await.unwrap().unwrap_err();
    assert!(t0.elapsed() <= Duration::from_secs(1), "{:?}", t0.elapsed());
    let msg = err.to_string();
    assert!(tries.load(Ordering::SeqCst) >= 3, "{msg}");
    assert_eq!(api.calls(), 2, "{msg}");
    assert_eq!(attempts(&err), 1, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    assert!(
        !msg.contains("attempts"),
        "only one attempt was sent: {msg}"
    );
    assert_no_not_sent_beside_maybe(&msg);
    holder.abort();
}

/// Control for the test above: retry.md "find a type anywhere in the chain with
/// `sturdy_core::find::<RateLimited>(&*err)` (the retry layer's error wraps the last
/// attempt's)": with every try sent (no breaker), the reset's io error is in the chain.
#[tokio::test(start_paused = true)]
async fn resets_on_every_attempt_keep_the_io_error_in_the_chain() {
    let api = Api::new(vec![], Answer::Io(std::io::ErrorKind::ConnectionReset));
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .without_circuit_breaker()
        .build(api.service());
    let err = client.oneshot(get(U)).await.unwrap_err();
    assert_eq!(api.calls(), 4);
    assert!(
        sturdy::core::find::<std::io::Error>(&*err).is_some(),
        "{:?}",
        chain(&*err)
    );
}

/// retry.md: "counts against `max_attempts` but is not an attempt: the message counts it apart
/// (`gave up after 1 attempt and 1 refused try: ...`)". With three tries, a 503 and then two
/// tries refused by a full limit: "1 attempt and 2 refused tries".
#[tokio::test(start_paused = true)]
async fn two_refused_tries_are_counted_apart_in_the_plural() {
    let api = Api::new(vec![status(503), Answer::Hang], ok());
    let (svc, tries) = limit_of_one(&api, RetryLayer::new().with_seed(19).with_max_attempts(3));
    let call = tokio::spawn(svc.clone().oneshot(get(U)));
    while api.calls() < 1 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let holder = tokio::spawn(svc.clone().oneshot(get("http://api.example.com/hold")));
    let err = call.await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert_eq!(tries.load(Ordering::SeqCst), 4, "{msg}");
    assert!(
        msg.starts_with("gave up after 1 attempt and 2 refused tries: 503 Service Unavailable"),
        "{msg}"
    );
    assert_eq!(attempts(&err), 1, "{msg}");
    holder.abort();
}

/// Refused tries count against `max_attempts`, also those of an open breaker waited out under a
/// deadline (circuit.md): a 503, the breaker open (refused), its 30 s waited out, the probe
/// answered 503 again, the breaker re-opened for 60 s (refused): four tries, the most allowed.
/// The call ends then, without sleeping 60 s for a try it may not make, and counts 2 attempts
/// and 2 refused tries; its kind is the 503's.
#[tokio::test(start_paused = true)]
async fn open_breaker_refusals_under_a_deadline_use_up_max_attempts() {
    let api = Api::new(vec![status(503), status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(30), Duration::from_secs(300)),
        )
        .build(api.service());
    let t0 = Instant::now();
    let err = client
        .oneshot(with_options(
            get(U),
            CallOptions::new().with_deadline(Duration::from_secs(600)),
        ))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert_eq!(api.calls(), 2, "{msg}");
    assert!(
        t0.elapsed() >= Duration::from_secs(30),
        "{:?}: {msg}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "{:?}: {msg}",
        t0.elapsed()
    );
    assert!(
        msg.starts_with("gave up after 2 attempts and 2 refused tries: 503"),
        "{msg}"
    );
    assert_eq!(attempts(&err), 2, "{msg}");
    assert_eq!(
        core_err(&err).kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{msg}");
}

/// With `max_attempts(2)`, a 503 and the breaker's refusal use both tries: a call with a long
/// deadline has no try left, so it does not sleep out the open period for nothing (retry.md: a
/// wait "with no attempt left is not slept").
#[tokio::test(start_paused = true)]
async fn with_no_try_left_an_open_breaker_is_not_waited_out() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
        .build(api.service());
    let t0 = Instant::now();
    let res = client
        .oneshot(with_options(
            get(U),
            CallOptions::new()
                .with_deadline(Duration::from_secs(600))
                .with_max_attempts(2),
        ))
        .await;
    let waited = t0.elapsed();
    match res {
        Ok(r) => panic!("a third try was made: {} after {waited:?}", r.status()),
        Err(err) => {
            assert_eq!(api.calls(), 1, "{err}");
            assert!(
                waited < Duration::from_secs(30),
                "slept {waited:?} for no try: {err}"
            );
        }
    }
}

/// Where the two changes meet: a 503 on the sent attempt, then a retry whose turn under the
/// local quota would come after the call's deadline, refused at once by the limiter. retry.md:
/// "When the last try was refused after an attempt that was sent, the kind and the root cause
/// are that attempt's, and the refusal is still in the chain (`find::<RateLimited>` ... gives
/// its wait)"; ratelimit.md: the call "does not wait for it to pass".
#[tokio::test(start_paused = true)]
async fn a_503_then_a_turn_past_the_deadline_keeps_the_503_and_ends_at_once() {
    let api = Api::new(vec![status(503)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(20)).unwrap(),
        ))
        .build(api.service());
    let t0 = Instant::now();
    let err = client
        .oneshot(with_options(
            post(U, "x"),
            CallOptions::new().with_deadline(Duration::from_secs(10)),
        ))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "{:?}: {msg}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 1);
    assert_eq!(
        core_err(&err).kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{msg}"
    );
    assert_eq!(attempts(&err), 1, "{msg}");
    assert!(msg.contains("1 attempt and 1 refused try"), "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
    assert_no_not_sent_beside_maybe(&msg);
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("the refusal in the chain");
    assert!(
        rl.retry_after() > Duration::from_secs(15),
        "{:?}",
        rl.retry_after()
    );
}

/// retry.md: a try refused "before it was sent (..., no token) counts against `max_attempts`
/// but is not an attempt"; auth.md: "A call that failed for want of a token never reached the
/// API: its error says `Delivery::NotSent`". A token endpoint that answers 503 every time: the
/// call sends nothing and reports 0 attempts.
#[tokio::test(start_paused = true)]
async fn tries_refused_for_want_of_a_token_are_not_attempts() {
    let api = Api::new(vec![], ok());
    let tokens = Api::new(vec![], status(503));
    let cc = sturdy::auth::ClientCredentials::new(
        tokens.service(),
        "http://127.0.0.1:9/token",
        "id",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_auth(sturdy::auth::AuthLayer::oauth2(cc))
        .build(api.service());
    let err = client.oneshot(get(U)).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(api.calls(), 0);
    assert!(tokens.calls() >= 1);
    assert_eq!(attempts(&err), 0, "{msg}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{msg}");
    assert!(
        !msg.contains("attempts"),
        "refused tries called attempts: {msg}"
    );
}

/// A call cut by its deadline (`CallOptions::with_deadline`) while its last try was a refusal:
/// a POST answered 503 with `Retry-After: 2`, whose retry meets a half-open breaker whose probe
/// (another call) hangs; circuit.md: such a refusal "is looked at again every backoff base ...
/// for as long as the deadline allows; such a refusal sent nothing, so it uses up neither an
/// attempt nor the retry budget". The deadline's error counts the one sent attempt, keeps the
/// refusal findable, and never says "not sent" beside "may have been processed" (changelog: "A
/// deadline's error no longer calls a refused try 'the last attempt'").
#[tokio::test(start_paused = true)]
async fn a_deadline_ending_while_a_probe_is_out_counts_the_sent_attempt_only() {
    let api = Api::new(
        vec![status_h(503, &[("retry-after", "2")]), Answer::Hang],
        ok(),
    );
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .without_rate_limit()
        .with_circuit_breaker(
            CircuitBreakerLayer::new()
                .with_consecutive_failures(1)
                .with_open_duration(Duration::from_secs(1), Duration::from_secs(1)),
        )
        .build(api.service());
    let t0 = Instant::now();
    let call = tokio::spawn(client.clone().oneshot(with_options(
        post(U, "x"),
        CallOptions::new().with_deadline(Duration::from_secs(5)),
    )));
    tokio::time::sleep(Duration::from_millis(1_001)).await;
    assert_eq!(api.calls(), 1);
    let mut probe_req = get("http://api.example.com/probe");
    probe_req
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let probe = tokio::spawn(client.clone().oneshot(probe_req));
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(api.calls(), 2, "the probe is out");
    let err = call.await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(t0.elapsed() <= Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "{:?}: {msg}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 2);
    assert_eq!(attempts(&err), 1, "{msg}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
    assert_no_not_sent_beside_maybe(&msg);
    assert!(!msg.contains("attempts"), "one attempt was sent: {msg}");
    assert!(
        sturdy::core::find::<CircuitOpen>(&*err).is_some(),
        "{:?}",
        chain(&*err)
    );
    probe.abort();
}

/// The same sentence as the breaker case above, for the local rate limit: an io reset on the
/// sent attempt, then the retry refused by a quota whose next slot is 2 min away. The message
/// names the reset; `find::<std::io::Error>` should reach it.
#[tokio::test(start_paused = true)]
async fn a_reset_then_a_rate_limit_refusal_keeps_the_reset_in_the_chain() {
    let api = Api::new(vec![Answer::Io(std::io::ErrorKind::ConnectionReset)], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::new(
            Quota::new(1, Duration::from_secs(120)).unwrap(),
        ))
        .build(api.service());
    let err = client.oneshot(get(U)).await.unwrap_err();
    let msg = err.to_string();
    assert_eq!(api.calls(), 1);
    assert!(msg.contains("connection reset"), "{msg}");
    assert!(msg.contains("1 attempt and 1 refused try"), "{msg}");
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{msg}");
    assert!(
        sturdy::core::find::<std::io::Error>(&*err).is_some(),
        "{:?}",
        chain(&*err)
    );
}
