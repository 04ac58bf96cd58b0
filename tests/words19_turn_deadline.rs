//! docs/guides/ratelimit.md, RELIABILITY.md and the rustdoc of `RateLimitLayer::with_max_wait`,
//! `RetryLayer::with_hold_marks` and `AttemptHold`, read literally: in a `ClientBuilder` stack a
//! call whose turn would come after its deadline is refused at once with `RateLimited` carrying
//! the wait, not sent; under `Buffer`, `ConcurrencyLimit(1)`, hedging, coalescing and the auth
//! replay; dropped at each wait; with hostile deadlines and pauses.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::classify::delivery;
use sturdy::core::hold::AttemptHold;
use sturdy::core::{BoxError, CallOptions, Delivery, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitHandle, RateLimitLayer};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const HOST: &str = "api.example.com";
const U: &str = "http://api.example.com/items";
const TEN: Duration = Duration::from_secs(10);

fn with_deadline(d: Duration) -> Request<Full<Bytes>> {
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(d));
    req
}

fn attempts(err: &BoxError) -> u32 {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .and_then(|e| e.report())
        .expect("a call report")
        .attempts()
}

/// A limiter of one call per 10 s (burst 1) and its handle.
fn one_per_ten() -> (RateLimitLayer, RateLimitHandle) {
    RateLimitLayer::new(Quota::new(1, TEN).unwrap()).pair()
}

/// The checks of "refused at once with `RateLimited` carrying the wait, and it was not sent".
fn assert_refused_at_once(err: &BoxError, t0: Instant, wait_about: Duration) {
    assert!(
        t0.elapsed() < Duration::from_millis(5),
        "not at once: {:?}: {err}",
        t0.elapsed()
    );
    let rl = sturdy::core::find::<RateLimited>(&**err)
        .unwrap_or_else(|| panic!("no RateLimited in the chain of {err}"));
    assert!(
        rl.retry_after() <= wait_about && rl.retry_after() + Duration::from_secs(1) >= wait_about,
        "the wait carried: {:?}, about {wait_about:?}: {err}",
        rl.retry_after()
    );
    assert_eq!(delivery(&**err), Delivery::NotSent, "{err}");
    assert_eq!(attempts(err), 0, "{err}");
    assert!(
        !err.to_string().contains("may have been processed"),
        "{err}"
    );
}

/// ratelimit.md: "A call with a deadline in a `ClientBuilder` stack (`CallOptions::with_deadline`,
/// `RetryLayer::with_deadline`) whose turn would come after that deadline does not wait for it to
/// pass: it is refused at once with `RateLimited` carrying the wait, and it was not sent." The
/// per-request form, with the retry layer's default.
#[tokio::test(start_paused = true)]
async fn a_turn_after_the_per_request_deadline_is_refused_at_once() {
    let api = Api::new(vec![], ok());
    let (rl, handle) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    assert_eq!(api.calls(), 1);
    assert_eq!(handle.waiting(HOST), 0);
}

/// The same sentence, the layer form: `RetryLayer::with_deadline(5 s)` in the builder.
#[tokio::test(start_paused = true)]
async fn a_turn_after_the_layer_deadline_is_refused_at_once() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(19)
                .with_deadline(Duration::from_secs(5)),
        )
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = client.oneshot(get(U)).await.unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    assert_eq!(api.calls(), 1);
}

/// Control for the sentence: a turn that comes before the deadline is waited for, and the call
/// is sent at its turn.
#[tokio::test(start_paused = true)]
async fn a_turn_before_the_deadline_is_waited_for() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let res = client
        .oneshot(with_deadline(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(9_900) && waited <= TEN,
        "{waited:?}"
    );
}

/// RELIABILITY.md: "durations set to `Duration::MAX` (deadlines, ...) | read as about 30 years
/// from now; never a panic": the turn 10 s away fits such a deadline.
#[tokio::test(start_paused = true)]
async fn a_duration_max_deadline_waits_for_the_turn() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let res = client.oneshot(with_deadline(Duration::MAX)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() >= Duration::from_millis(9_900),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 2);
}

/// Hostile deadlines against a busy limiter: zero and 1 ns are refused at once (the turn is
/// after them) and nothing is sent; no panic, no hang.
#[tokio::test(start_paused = true)]
async fn zero_and_one_nanosecond_deadlines_are_refused_at_once_not_sent() {
    for d in [Duration::ZERO, Duration::from_nanos(1)] {
        let api = Api::new(vec![], ok());
        let (rl, _) = one_per_ten();
        let client = ClientBuilder::new()
            .with_rate_limit(rl)
            .build(api.service());
        client.clone().oneshot(get(U)).await.unwrap();
        let t0 = Instant::now();
        let err = client.oneshot(with_deadline(d)).await.unwrap_err();
        assert!(
            t0.elapsed() < Duration::from_millis(5),
            "{d:?}: {:?}",
            t0.elapsed()
        );
        assert_eq!(api.calls(), 1, "{d:?}");
        assert_eq!(delivery(&*err), Delivery::NotSent, "{d:?}: {err}");
        assert_eq!(attempts(&err), 0, "{d:?}: {err}");
        assert!(
            !err.to_string().contains("may have been processed"),
            "{d:?}: {err}"
        );
    }
}

/// A zero deadline with a free slot: no panic, no hang; whatever it does, its report agrees
/// with what the server saw (0 attempts and `NotSent` when nothing arrived).
#[tokio::test(start_paused = true)]
async fn a_zero_deadline_with_a_free_slot_is_consistent() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    let res = tokio::time::timeout(
        Duration::from_secs(60),
        client.oneshot(with_deadline(Duration::ZERO)),
    )
    .await
    .expect("no hang");
    if let Err(err) = res {
        if api.calls() == 0 {
            assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
            assert_eq!(attempts(&err), 0, "{err}");
        }
    }
}

/// A deadline exactly at the turn: the turn is not *after* the deadline, so the call is not
/// refused for it; whatever follows, it ends by the deadline, and if it was not sent its error
/// says so (it waited for its turn, `Delivery::NotSent`).
#[tokio::test(start_paused = true)]
async fn a_deadline_exactly_at_the_turn_ends_by_the_deadline_and_tells_the_truth() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let res = client.oneshot(with_deadline(TEN)).await;
    assert!(t0.elapsed() <= TEN, "{:?}", t0.elapsed());
    if let Err(err) = res {
        if api.calls() == 1 {
            assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
            assert!(
                !err.to_string().contains("may have been processed"),
                "{err}"
            );
        }
    }
}

/// ratelimit.md: "A waiting call reserves nothing. If it is dropped (a timeout above it, an
/// aborted task), it leaves the line and the calls behind it move up". A call with a 20 s
/// deadline waits for its turn at 10 s and is dropped at 1 s; the next call, with a deadline of
/// 11 s, gets the turn at 10 s (had the dropped call kept its place, its turn would be at 20 s,
/// after its deadline, and it would be refused).
#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_waiting_for_its_turn_keeps_nothing() {
    let api = Api::new(vec![], ok());
    let (rl, handle) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let dropped = tokio::time::timeout(
        Duration::from_secs(1),
        client
            .clone()
            .oneshot(with_deadline(Duration::from_secs(20))),
    )
    .await;
    assert!(dropped.is_err(), "it was still waiting");
    assert_eq!(handle.waiting(HOST), 0);
    let res = client
        .oneshot(with_deadline(Duration::from_secs(11)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(t0.elapsed() <= TEN, "{:?}", t0.elapsed());
    assert_eq!(api.calls(), 2);
}

/// ratelimit.md: "a refused call is retried after the wait the refusal carries (within the
/// retry layer's attempts, budget, deadline and `max_retry_after`...), so with zero `max_wait`
/// the *call* may still wait, in the retry layer's sleep". Dropped in that sleep, it keeps
/// nothing: the next call gets the slot at 10 s.
#[tokio::test(start_paused = true)]
async fn a_call_dropped_in_the_retry_sleep_after_a_refusal_keeps_nothing() {
    let api = Api::new(vec![], ok());
    let (rl, _) = RateLimitLayer::new(Quota::new(1, TEN).unwrap())
        .with_max_wait(Duration::ZERO)
        .pair();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let sleeper = tokio::spawn(
        client
            .clone()
            .oneshot(with_deadline(Duration::from_secs(60))),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!sleeper.is_finished(), "it sleeps out the refusal's wait");
    sleeper.abort();
    let _ = sleeper.await;
    let res = client
        .oneshot(with_deadline(Duration::from_secs(12)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() <= Duration::from_secs(12),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 2);
}

/// ratelimit.md "Pauses are capped": "a bogus value (`Retry-After: 99999999999999999999`, ...)
/// costs at most five minutes". A pause of `Retry-After: 99999999999`, then a call with a 10 s
/// deadline (and a `max_wait` of 1 h, so only the deadline refuses it): refused at once with the
/// capped wait, not the server's; a call with a 10 min deadline waits the 5 min cap and is sent.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_pause_is_refused_by_the_deadline_with_the_capped_wait() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "99999999999")])], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::from_secs(3_600)))
        .build(api.service());
    let first = client.clone().oneshot(get(U)).await.unwrap_err();
    // `with_max_retry_after`: "The wait that error reports is the server's, capped at
    // `MAX_REPORTED_WAIT` (5 min)".
    let asked = sturdy::core::find::<RateLimited>(&*first).expect("RateLimited");
    assert!(
        asked.retry_after() <= sturdy::retry::MAX_REPORTED_WAIT,
        "{:?}",
        asked.retry_after()
    );
    let t0 = Instant::now();
    let err = client
        .clone()
        .oneshot(with_deadline(Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, Duration::from_secs(300));
    assert_eq!(api.calls(), 1);

    let res = client
        .oneshot(with_deadline(Duration::from_secs(600)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() <= Duration::from_secs(301),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(290),
        "{:?}",
        t0.elapsed()
    );
}

/// The same with a `Retry-After` date in year 9999: capped at 5 min, refused at once under a
/// 1 min deadline with a wait of at most 5 min.
#[tokio::test(start_paused = true)]
async fn a_far_future_date_pause_is_refused_by_the_deadline_with_the_capped_wait() {
    let api = Api::new(
        vec![status_h(
            503,
            &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
        )],
        ok(),
    );
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::from_secs(3_600)))
        .build(api.service());
    let _ = client.clone().oneshot(get(U)).await.unwrap_err();
    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, Duration::from_secs(300));
    assert_eq!(api.calls(), 1);
}

/// retry.md: "A date already past ... asks for no wait at all": no pause follows, so a call
/// with a 1 s deadline right after is sent at once.
#[tokio::test(start_paused = true)]
async fn a_past_date_pauses_nothing_and_a_short_deadline_goes_through() {
    let api = Api::new(
        vec![status_h(
            429,
            &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
        )],
        ok(),
    );
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .build(api.service());
    let res = client.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let t0 = Instant::now();
    let res = client
        .oneshot(with_deadline(Duration::from_secs(1)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
}

/// ratelimit.md "Where it sits": "It may sit over or under tower's `Buffer`, `ConcurrencyLimit`
/// ... and be driven by `oneshot` or by a kept service". The client over a `ConcurrencyLimit(1)`,
/// kept and driven by `ready().await?.call(req)`: a call refused at once for its deadline gives
/// the permit back; the next call, without a deadline, is sent at its turn.
#[tokio::test(start_paused = true)]
async fn over_a_concurrency_limit_of_one_a_refused_call_keeps_no_permit() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let http = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(api.service());
    let mut client = ClientBuilder::new().with_rate_limit(rl).build(http);
    client.ready().await.unwrap().call(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = client
        .ready()
        .await
        .unwrap()
        .call(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    let res = tokio::time::timeout(Duration::from_secs(20), async {
        client.ready().await.unwrap().call(get(U)).await
    })
    .await
    .expect("the permit came back")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(t0.elapsed() <= TEN, "{:?}", t0.elapsed());
}

/// The same under tower's `Buffer(1)` over a `ConcurrencyLimit(1)` around the client, kept.
#[tokio::test(start_paused = true)]
async fn under_buffer_and_a_limit_of_one_a_refused_call_keeps_no_slot() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    let mut outer = ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(client);
    outer.ready().await.unwrap().call(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = outer
        .ready()
        .await
        .unwrap()
        .call(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    let res = tokio::time::timeout(Duration::from_secs(20), async {
        outer.ready().await.unwrap().call(get(U)).await
    })
    .await
    .expect("the buffer slot and the permit came back")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

/// Under `Buffer` and a limit of one, a call waiting for its turn (deadline 20 s) is dropped at
/// 1 s: the next caller, kept and driven by `ready().await?.call(req)`, is not delayed past the
/// turn at 10 s.
#[tokio::test(start_paused = true)]
async fn under_buffer_a_call_dropped_in_line_delays_nobody() {
    let api = Api::new(vec![], ok());
    let (rl, handle) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    let mut outer = ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(client);
    outer.ready().await.unwrap().call(get(U)).await.unwrap();
    let t0 = Instant::now();
    let fut = outer
        .ready()
        .await
        .unwrap()
        .call(with_deadline(Duration::from_secs(20)));
    assert!(tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .is_err());
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting(HOST), 0);
    let res = tokio::time::timeout(Duration::from_secs(30), async {
        outer
            .ready()
            .await
            .unwrap()
            .call(with_deadline(Duration::from_secs(11)))
            .await
    })
    .await
    .expect("no hang")
    .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(t0.elapsed() <= TEN, "{:?}", t0.elapsed());
}

/// With coalescing on (coalesce.md: a request that carries `CallOptions` "goes on its own, under
/// its own"), the per-request deadline still refuses at once; with the layer's deadline,
/// identical calls share one call, and each of them gets the refusal at once, not sent.
#[tokio::test(start_paused = true)]
async fn with_coalescing_the_deadline_refusal_is_at_once_for_every_sharer() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_seed(19)
                .with_deadline(Duration::from_secs(5)),
        )
        .with_rate_limit(rl)
        .with_coalesce(CoalesceLayer::new())
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let err = client
        .clone()
        .oneshot(with_deadline(Duration::from_secs(3)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get(U))))
        .collect();
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(
            t0.elapsed() < Duration::from_millis(5),
            "{:?}: {err}",
            t0.elapsed()
        );
        assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
        assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    }
    assert_eq!(api.calls(), 1);
}

/// ratelimit.md's sentence holds "in a `ClientBuilder` stack"; the builder's hedging sits
/// between the retry layer and the limiter. A warmed hedge (min samples 1), a busy limiter and a
/// call with a 5 s deadline: refused at once, nothing sent.
#[tokio::test(start_paused = true)]
async fn with_hedging_on_the_deadline_refusal_is_still_at_once() {
    let api = Api::new(vec![], ok());
    let (rl, _) = RateLimitLayer::new(Quota::new(1, TEN).unwrap().with_burst(3).unwrap()).pair();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_hedge(HedgeLayer::new().with_min_samples(1))
        .with_rate_limit(rl)
        .build(api.service());
    for _ in 0..3 {
        client.clone().oneshot(get(U)).await.unwrap();
    }
    let sent = api.calls();
    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(5),
        "{:?}: {err}",
        t0.elapsed()
    );
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(api.calls(), sent);
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
}

/// A token endpoint that counts its requests and answers a one-hour token `tok-<n>`.
fn token_endpoint() -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok(Response::builder()
                .header("content-type", "application/json")
                .body(Full::from(format!(
                    r#"{{"access_token":"tok-{i}","token_type":"Bearer","expires_in":3600}}"#
                )))
                .unwrap())
        }
    });
    (svc, n)
}

/// With OAuth2 on: a call refused for its deadline by the limiter (which sits above auth) does
/// not ask for a token; a call whose attempt was answered 401 and replayed with a fresh token
/// (auth.md: "the token is invalidated, a new one fetched, the request replayed once") leaves
/// nothing behind: the next call with a deadline its turn does not fit is refused at once.
#[tokio::test(start_paused = true)]
async fn with_the_auth_replay_the_next_deadline_refusal_is_at_once_and_fetches_no_token() {
    let api = Api::new(vec![status(401)], ok());
    let (tokens, fetched) = token_endpoint();
    let cc = ClientCredentials::new(tokens, "http://127.0.0.1:9/token", "id", "secret").unwrap();
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .with_auth(AuthLayer::oauth2(cc))
        .build(api.service());
    let res = client
        .clone()
        .oneshot(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2, "the 401 was replayed");
    assert_eq!(fetched.load(Ordering::SeqCst), 2);
    let seen = api.seen();
    assert_eq!(seen[1].headers["authorization"], "Bearer tok-2");

    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        2,
        "no token for a refused call"
    );
    assert_eq!(api.calls(), 2);
}

/// `AttemptHold::until`: "A mark that says the attempt is not held, for a call that must have
/// its answer by `deadline`"; `deadline()`: "The call's deadline, if it has one ... `None` after
/// a `fan_out`"; `with_max_wait`: "A call whose attempt carries its deadline (a
/// `sturdy_core::hold::AttemptHold` ...) waits no later than that deadline: if its turn would
/// come after it, it fails at once the same way." The limiter alone, with a hand-made mark.
#[tokio::test(start_paused = true)]
async fn a_hand_made_mark_with_a_deadline_makes_the_limiter_refuse_at_once() {
    let api = Api::new(vec![], ok());
    let svc = RateLimitLayer::new(Quota::new(1, TEN).unwrap()).layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();

    let now = Instant::now();
    let hold = AttemptHold::until(now + Duration::from_secs(5));
    assert_eq!(hold.deadline(), Some(now + Duration::from_secs(5)));
    assert_eq!(hold.held_for(), None);
    let mut req = get(U);
    req.extensions_mut().insert(hold.clone());
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert!(
        now.elapsed() < Duration::from_millis(5),
        "{:?}",
        now.elapsed()
    );
    let rl = sturdy::core::find::<RateLimited>(&*err).expect("RateLimited");
    assert!(
        rl.retry_after() > Duration::from_secs(9),
        "{:?}",
        rl.retry_after()
    );
    assert_eq!(api.calls(), 1);

    // After a fan-out the mark has no deadline, and the call waits for its turn.
    let fanned = AttemptHold::until(now + Duration::from_secs(5));
    fanned.fan_out();
    assert_eq!(fanned.deadline(), None);
    let mut req = get(U);
    req.extensions_mut().insert(fanned);
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        now.elapsed() >= Duration::from_millis(9_900),
        "{:?}",
        now.elapsed()
    );
}

/// `AttemptHold::until` with a deadline already past, and with the far future: a past deadline
/// refuses a call that would wait at all; a deadline years away lets it wait.
#[tokio::test(start_paused = true)]
async fn hand_made_marks_with_a_past_or_far_deadline() {
    let api = Api::new(vec![], ok());
    let svc = RateLimitLayer::new(Quota::new(1, TEN).unwrap()).layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    let now = Instant::now();
    let mut req = get(U);
    req.extensions_mut().insert(AttemptHold::until(now));
    let err = svc.clone().oneshot(req).await.unwrap_err();
    assert!(sturdy::core::find::<RateLimited>(&*err).is_some(), "{err}");
    assert_eq!(api.calls(), 1);

    let far = now + Duration::from_secs(60 * 60 * 24 * 365 * 30);
    let mut req = get(U);
    req.extensions_mut().insert(AttemptHold::until(far));
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        now.elapsed() >= Duration::from_millis(9_900),
        "{:?}",
        now.elapsed()
    );
}

/// ratelimit.md: "if its turn would come later than `max_wait` (30 s ...), counting the calls
/// ahead of it"; the deadline sentence reads the same turn. One call per 10 s: B (deadline 15 s)
/// waits for the turn at 10 s; C (deadline 15 s) is behind B, its turn at 20 s, so it is refused
/// at once with a wait of about 20 s; B is then sent at 10 s.
#[tokio::test(start_paused = true)]
async fn the_turn_counts_the_calls_ahead_in_line() {
    let api = Api::new(vec![], ok());
    let (rl, handle) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    let b = tokio::spawn(
        client
            .clone()
            .oneshot(with_deadline(Duration::from_secs(15))),
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(handle.waiting(HOST), 1);
    let t1 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(15)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t1, Duration::from_secs(20));
    let res = b.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(t0.elapsed() <= TEN, "{:?}", t0.elapsed());
    assert_eq!(api.calls(), 2);
}

/// RELIABILITY.md: "a rate-limit pause known to end after the deadline is refused at once
/// instead, with `RateLimited`". A `Retry-After: 20` pause: a call with a 10 s deadline is
/// refused at once carrying about 20 s; one with a 25 s deadline waits and is sent at 20 s.
#[tokio::test(start_paused = true)]
async fn a_server_pause_past_the_deadline_is_refused_at_once_and_one_within_is_waited() {
    let api = Api::new(vec![status_h(429, &[("retry-after", "20")])], ok());
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .build(api.service());
    let mut first = get(U);
    first
        .extensions_mut()
        .insert(CallOptions::new().without_retries());
    let _ = client.clone().oneshot(first).await;
    let t0 = Instant::now();
    let err = client
        .clone()
        .oneshot(with_deadline(Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, Duration::from_secs(20));
    let res = client
        .oneshot(with_deadline(Duration::from_secs(25)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    let at = t0.elapsed();
    assert!(
        at >= Duration::from_millis(19_900) && at <= Duration::from_secs(21),
        "{at:?}"
    );
    assert_eq!(api.calls(), 2);
}

/// ratelimit.md "Pauses are capped": "an epoch reset in year 5138" costs at most five minutes.
/// `X-RateLimit-Remaining: 0` with a reset of 99999999999 (epoch seconds): a call with a 1 min
/// deadline is refused at once, with a wait of at most 5 min.
#[tokio::test(start_paused = true)]
async fn an_epoch_reset_in_year_5138_is_refused_by_the_deadline_with_the_capped_wait() {
    let api = Api::new(
        vec![status_h(
            200,
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "99999999999"),
            ],
        )],
        ok(),
    );
    let client = ClientBuilder::new()
        .with_rate_limit(RateLimitLayer::adaptive_only().with_max_wait(Duration::from_secs(3_600)))
        .build(api.service());
    let res = client.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let t0 = Instant::now();
    let err = client
        .oneshot(with_deadline(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert_refused_at_once(&err, t0, Duration::from_secs(300));
    assert_eq!(api.calls(), 1);
}

/// RELIABILITY.md: "`Duration::MAX` leases, TTLs and pauses ...; `Quota::new(1, Duration::MAX)`
/// with a burst | ... | 30 years; the burst, then refused", and "durations set to
/// `Duration::MAX` (deadlines, ...) | read as about 30 years from now; never a panic". A quota
/// of one call per `Duration::MAX`, a second call with a `Duration::MAX` deadline, with the
/// default `max_wait` and with `max_wait` of `Duration::MAX`: never a panic; the first is
/// refused at once without being sent.
#[tokio::test(start_paused = true)]
async fn duration_max_everywhere_never_panics() {
    for max_wait in [None, Some(Duration::MAX)] {
        let api = Api::new(vec![], ok());
        let mut layer = RateLimitLayer::new(Quota::new(1, Duration::MAX).unwrap());
        if let Some(w) = max_wait {
            layer = layer.with_max_wait(w);
        }
        let client = ClientBuilder::new()
            .with_retry(RetryLayer::new().with_seed(19))
            .with_rate_limit(layer)
            .build(api.service());
        client.clone().oneshot(get(U)).await.unwrap();
        let t0 = Instant::now();
        let res = tokio::spawn(client.oneshot(with_deadline(Duration::MAX)))
            .await
            .unwrap_or_else(|e| panic!("max_wait {max_wait:?}: the call panicked: {e}"));
        if max_wait.is_none() {
            let err = res.unwrap_err();
            assert!(
                t0.elapsed() < Duration::from_millis(5),
                "{:?}",
                t0.elapsed()
            );
            assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
            assert_eq!(api.calls(), 1);
        } else if let Err(err) = res {
            if api.calls() == 1 {
                assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
            }
        }
    }
}

/// Hedging fans an attempt out, so its copies carry no deadline (`AttemptHold::deadline`:
/// "`None` after a `fan_out`") and a hedged copy waits in line; ratelimit.md: "If it is dropped
/// ..., it leaves the line and the calls behind it move up". The first copy answers while the
/// hedge waits for its turn: the hedge is dropped, the line is empty, and the next call (with a
/// deadline its turn fits only if nothing was kept) goes at the turn.
#[tokio::test(start_paused = true)]
async fn a_hedge_waiting_in_line_is_dropped_when_the_first_copy_answers_and_keeps_nothing() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(10)));
    let quota = Quota::new(1, TEN).unwrap().with_burst(2).unwrap();
    let (rl, handle) = RateLimitLayer::new(quota).pair();
    let (hedge, hedges) = HedgeLayer::new().with_min_samples(1).pair();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_seed(19))
        .with_hedge(hedge)
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let t0 = Instant::now();
    api.push(Answer::Slow(Duration::from_millis(500)));
    let res = client
        .clone()
        .oneshot(with_deadline(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let stats = hedges.stats(HOST).expect("stats");
    assert_eq!(stats.hedges(), 1, "the hedge fired and waited in line");
    tokio::task::yield_now().await;
    assert_eq!(handle.waiting(HOST), 0, "the dropped hedge left the line");
    let res = client
        .oneshot(with_deadline(Duration::from_secs(12)))
        .await
        .unwrap_or_else(|e| panic!("after {:?}: {e}", t0.elapsed()));
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        t0.elapsed() <= Duration::from_secs(11),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(api.calls(), 3, "the hedge was never sent");
}

/// ratelimit.md: "For a call that must never wait, also turn retries off for it
/// (`CallOptions::without_retries()`)"; with a deadline too, the turn after the deadline is
/// refused at once, not waited for.
#[tokio::test(start_paused = true)]
async fn without_retries_and_with_a_deadline_the_turn_after_it_is_refused_at_once() {
    let api = Api::new(vec![], ok());
    let (rl, _) = one_per_ten();
    let client = ClientBuilder::new()
        .with_rate_limit(rl)
        .build(api.service());
    client.clone().oneshot(get(U)).await.unwrap();
    let mut req = get(U);
    req.extensions_mut().insert(
        CallOptions::new()
            .without_retries()
            .with_deadline(Duration::from_secs(5)),
    );
    let t0 = Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert_refused_at_once(&err, t0, TEN);
    assert_eq!(api.calls(), 1);
}
