//! Outside tests of the circuit breaker's window, its half-open probes across kept clones, its
//! count of timed-out attempts, and kept clones after breakers were forgotten. Against
//! docs/guides/circuit.md and the rustdoc of `CircuitBreakerLayer` and `CircuitHandle`. Paused
//! time, in-process services.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::time::Duration;

use outsider4_common::*;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::{find, CircuitOpen, OpenReason};
use sturdy::retry::{AttemptTimeoutLayer, RetryLayer};
use sturdy::ClientBuilder;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const A: &str = "a.example.com";

fn url(host: &str, path: &str) -> String {
    format!("http://{host}{path}")
}

/// Calls `svc` once for `host`: `Ok(status)` when the call reached the API, `Err(reason)` when
/// the breaker refused it. Any other error panics.
async fn call<S>(svc: &mut S, host: &str) -> Result<u16, OpenReason>
where
    S: Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = sturdy::core::BoxError,
    >,
{
    let fut = svc.ready().await.unwrap().call(get(&url(host, "/orders")));
    match bounded(fut).await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => match find::<CircuitOpen>(&*e) {
            Some(open) => Err(open.reason()),
            None => Ok(0),
        },
    }
}

fn is_open(s: Option<CircuitState>) -> bool {
    matches!(s, Some(CircuitState::Open { .. }))
}

// ------------------------------------------------------------------ the window

/// "Opens when at least 50 % of the calls of the last 30 s failed, once there were at least
/// [min_calls]": failures older than the window no longer count, also when the new failure
/// comes exactly one, two or three windows later (the same place in a ring of buckets), or a
/// window and a half later.
#[tokio::test(start_paused = true)]
async fn failures_older_than_the_window_do_not_count() {
    for gap in [
        secs(30),
        secs(60),
        secs(90),
        ms(30_001),
        ms(45_000),
        ms(31_500),
    ] {
        let api = Api::always(st(503));
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_failure_rate(0.5, secs(30), 10)
            .unwrap()
            .pair();
        let mut svc = layer.layer(api.service());
        for _ in 0..9 {
            assert_eq!(call(&mut svc, A).await, Ok(503));
        }
        assert_eq!(handle.state(A), Some(CircuitState::Closed));
        tokio::time::sleep(gap).await;
        assert_eq!(call(&mut svc, A).await, Ok(503));
        assert_eq!(
            handle.state(A),
            Some(CircuitState::Closed),
            "{gap:?} later: one failure in the window, under the 10 calls needed"
        );
        assert_eq!(call(&mut svc, A).await, Ok(503), "{gap:?}: not open yet");
    }
}

/// And within the window they do: 9 failures, then a tenth 29 s later, opens.
#[tokio::test(start_paused = true)]
async fn failures_within_the_window_count() {
    for gap in [Duration::ZERO, secs(1), secs(15), secs(29)] {
        let api = Api::always(st(503));
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_failure_rate(0.5, secs(30), 10)
            .unwrap()
            .pair();
        let mut svc = layer.layer(api.service());
        for _ in 0..9 {
            call(&mut svc, A).await.unwrap();
        }
        tokio::time::sleep(gap).await;
        call(&mut svc, A).await.unwrap();
        assert!(is_open(handle.state(A)), "{gap:?}: {:?}", handle.state(A));
        assert_eq!(call(&mut svc, A).await, Err(OpenReason::Failing));
    }
}

/// Successes spread over time keep the rate under 50 %: one failure and two successes per
/// second for two minutes stays closed.
#[tokio::test(start_paused = true)]
async fn a_steady_rate_under_the_threshold_stays_closed() {
    let api = Api::new(|n, _| if n % 3 == 0 { st(503) } else { st(200) });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, secs(30), 10)
        .unwrap()
        .pair();
    let mut svc = layer.layer(api.service());
    for _ in 0..120 {
        for _ in 0..3 {
            call(&mut svc, A).await.unwrap();
        }
        tokio::time::sleep(ms(1_000)).await;
    }
    assert_eq!(handle.state(A), Some(CircuitState::Closed));
}

// ------------------------------------------------------------------ timeouts are failures

/// circuit.md: "A failure is ... a 5xx, a timeout". Through `ClientBuilder` (the attempt
/// timeout under the breaker), three timed-out attempts open a breaker set to three failures in
/// a row.
#[tokio::test(start_paused = true)]
async fn timed_out_attempts_open_the_breaker_in_the_client() {
    let api = Api::always(Act::Hang);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(layer)
        .with_attempt_timeout(secs(1))
        .build(api.service());
    let mut kept = client.clone();
    for _ in 0..3 {
        assert_eq!(call(&mut kept, A).await, Ok(0));
    }
    assert!(is_open(handle.state(A)), "{:?}", handle.state(A));
    assert_eq!(call(&mut kept, A).await, Err(OpenReason::Failing));
    assert_eq!(api.calls(), 3);
}

/// The same with the layers alone: `AttemptTimeoutLayer` under the breaker.
#[tokio::test(start_paused = true)]
async fn timed_out_attempts_open_the_breaker_with_the_timeout_layer_below() {
    let api = Api::always(Act::Hang);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .layer(AttemptTimeoutLayer::new(Some(secs(1))))
        .service(api.service());
    for _ in 0..3 {
        assert_eq!(call(&mut svc, A).await, Ok(0));
    }
    assert!(is_open(handle.state(A)));
}

/// retry.md and circuit.md: the retry layer's own `.with_attempt_timeout(d)` cuts an attempt
/// above the breaker, which sees it dropped, not failed, and does not count it; the same timeout
/// as `AttemptTimeoutLayer` under the breaker is a failure it counts.
#[tokio::test(start_paused = true)]
async fn the_retry_layers_own_timer_sits_above_the_breaker_and_is_not_counted() {
    let api = Api::always(Act::Hang);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_max_attempts(1)
                .with_attempt_timeout(secs(1)),
        )
        .layer(layer)
        .service(api.service());
    for _ in 0..5 {
        let _ = call(&mut svc, A).await;
    }
    assert!(
        !is_open(handle.state(A)),
        "attempts cut above the breaker are not counted: {:?}",
        handle.state(A)
    );
    assert_eq!(api.calls(), 5);

    // The timer under the breaker: three timeouts open it.
    let api = Api::always(Act::Hang);
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let mut svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_max_attempts(1))
        .layer(layer)
        .layer(AttemptTimeoutLayer::new(Some(secs(1))))
        .service(api.service());
    for _ in 0..5 {
        let _ = call(&mut svc, A).await;
    }
    assert!(is_open(handle.state(A)), "{:?}", handle.state(A));
    assert_eq!(
        api.calls(),
        3,
        "the breaker cut the hanging API off after three"
    );
}

// ------------------------------------------------------------------ half-open across clones

/// "Half-open: 1 probe at a time; everyone else fails fast" (reason `Probing`, `retry_in`
/// zero), counted across kept clones on several tasks; "A probe whose future is dropped gives
/// its slot back"; a probe that times out (a failure) "reopens at once", for 60 s ("doubling on
/// each re-opening").
#[tokio::test(start_paused = true)]
async fn one_probe_across_clones_and_a_timed_out_probe_reopens() {
    // Failing until told otherwise: 503 at once, then probes hang.
    let api = Api::new(|n, _| if n < 3 { st(503) } else { Act::Hang });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(layer)
        .with_attempt_timeout(secs(5))
        .build(api.service());
    let mut kept: Vec<_> = (0..4).map(|_| client.clone()).collect();
    for k in kept.iter_mut().take(3) {
        assert_eq!(call(k, A).await, Ok(503));
    }
    assert_eq!(
        handle.state(A),
        Some(CircuitState::Open { retry_in: secs(30) })
    );
    tokio::time::sleep(secs(30)).await;

    // Four clones at once: one probe goes (and hangs), three are refused as probing.
    let mut tasks = Vec::new();
    for (i, mut k) in kept.drain(..).enumerate() {
        tasks.push(tokio::spawn(async move {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            let r = call(&mut k, A).await;
            (r, k)
        }));
    }
    // The refused ones answer at once; the probe times out after 5 s.
    tokio::time::sleep(ms(10)).await;
    assert_eq!(api.calls(), 4, "one probe reached the API");
    assert_eq!(handle.state(A), Some(CircuitState::HalfOpen));
    let mut results = Vec::new();
    for t in tasks {
        let (r, k) = t.await.unwrap();
        results.push(r);
        kept.push(k);
    }
    let probing = results
        .iter()
        .filter(|r| **r == Err(OpenReason::Probing))
        .count();
    assert_eq!(probing, 3, "{results:?}");
    assert!(results.contains(&Ok(0)), "the probe timed out: {results:?}");
    assert_eq!(
        handle.state(A),
        Some(CircuitState::Open { retry_in: secs(60) }),
        "a failed probe reopens at once, for twice as long"
    );

    // After 60 s, a probe whose future is dropped gives its slot back.
    tokio::time::sleep(secs(60)).await;
    let mut k = kept.pop().unwrap();
    let fut = k.ready().await.unwrap().call(get(&url(A, "/orders")));
    let dropped = tokio::time::timeout(ms(100), fut).await;
    assert!(dropped.is_err(), "the probe was still running");
    assert_eq!(api.calls(), 5);
    let mut other = kept.pop().unwrap();
    let fut = other.ready().await.unwrap().call(get(&url(A, "/orders")));
    let second = tokio::time::timeout(ms(100), fut).await;
    assert!(
        second.is_err(),
        "the next call is admitted as the probe (and hangs), not refused: {:?}",
        second.map(|r| r.map(|res| res.status()).map_err(|e| e.to_string()))
    );
    assert_eq!(api.calls(), 6);
}

// ------------------------------------------------------------------ forgotten breakers

/// `with_max_breakers`: "past it, healthy breakers are forgotten, then new keys share one
/// overflow breaker". A kept clone that called host A before A's breaker was forgotten must
/// still count its failures in the one breaker for A that the handle and the other clones see.
#[tokio::test(start_paused = true)]
async fn a_kept_clone_after_its_hosts_breaker_was_forgotten() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/fail" {
            st(503)
        } else {
            st(200)
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(3)
        .with_max_breakers(2)
        .pair();
    let svc = layer.layer(api.service());
    let mut keeper = svc.clone();
    let mut other = svc.clone();
    // The keeper has called A (healthy).
    let ok = keeper
        .ready()
        .await
        .unwrap()
        .call(get(&url(A, "/ok")))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    tokio::time::sleep(secs(40)).await;
    // Other hosts come and go through another clone.
    for host in [
        "b.example.com",
        "c.example.com",
        "d.example.com",
        "e.example.com",
    ] {
        let res = other
            .ready()
            .await
            .unwrap()
            .call(get(&url(host, "/ok")))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(secs(40)).await;
    }
    // Now A fails three times in a row, seen by the keeper.
    for _ in 0..3 {
        let res = keeper
            .ready()
            .await
            .unwrap()
            .call(get(&url(A, "/fail")))
            .await;
        assert_eq!(res.unwrap().status(), 503);
    }
    let state = handle.state(A);
    let refused = other.ready().await.unwrap().call(get(&url(A, "/ok"))).await;
    let fresh = svc.clone().oneshot(get(&url(A, "/ok"))).await;
    assert!(
        refused.is_err() && fresh.is_err(),
        "A failed 3 times in a row through the keeper; the handle says {state:?}, another kept \
         clone got {:?}, a fresh clone got {:?}",
        refused.map(|r| r.status()),
        fresh.map(|r| r.status())
    );
    assert!(is_open(state), "{state:?}");
}

// ------------------------------------------------------------------ cheap claims

/// "Open 30 s, doubling on each re-opening up to 5 min, back to 30 s after a close"; the
/// message of a refusal says when to try again.
#[tokio::test(start_paused = true)]
async fn open_period_doubles_and_resets_after_a_close() {
    let api = Api::new(|_, req| {
        if req.uri().path() == "/ok" {
            st(200)
        } else {
            st(503)
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let mut svc = layer.layer(api.service());
    for _ in 0..2 {
        assert_eq!(call_path(&mut svc, "/fail").await, Ok(503));
    }
    let open = |s| matches!(s, Some(CircuitState::Open { retry_in }) if retry_in == secs(30));
    assert!(open(handle.state(A)), "{:?}", handle.state(A));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(get(&url(A, "/ok")))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("try again in 30s"), "{err}");
    // Probe fails: 60 s. Probe fails again: 120 s.
    for expected in [60, 120, 240, 300, 300] {
        tokio::time::sleep(handle_retry_in(&handle)).await;
        assert_eq!(call_path(&mut svc, "/fail").await, Ok(503));
        assert_eq!(
            handle.state(A),
            Some(CircuitState::Open {
                retry_in: secs(expected)
            })
        );
    }
    // A good probe closes; the next opening is 30 s again.
    tokio::time::sleep(handle_retry_in(&handle)).await;
    assert_eq!(call_path(&mut svc, "/ok").await, Ok(200));
    assert_eq!(handle.state(A), Some(CircuitState::Closed));
    for _ in 0..2 {
        assert_eq!(call_path(&mut svc, "/fail").await, Ok(503));
    }
    assert!(open(handle.state(A)), "{:?}", handle.state(A));
}

fn handle_retry_in(handle: &sturdy::circuit::CircuitHandle) -> Duration {
    match handle.state(A) {
        Some(CircuitState::Open { retry_in }) => retry_in,
        other => panic!("not open: {other:?}"),
    }
}

async fn call_path<S>(svc: &mut S, path: &str) -> Result<u16, OpenReason>
where
    S: Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = sturdy::core::BoxError,
    >,
{
    let fut = svc.ready().await.unwrap().call(get(&url(A, path)));
    match bounded(fut).await {
        Ok(res) => Ok(res.status().as_u16()),
        Err(e) => Err(find::<CircuitOpen>(&*e)
            .unwrap_or_else(|| panic!("{e}"))
            .reason()),
    }
}

/// "an error for a call that never reached the dependency is not counted at all ... a local
/// rate-limit refusal": in `ClientBuilder`, calls the limiter refuses during a pause (zero
/// `max_wait`, no retries) leave the breaker closed; "4xx, 429 ... are not failures".
#[tokio::test(start_paused = true)]
async fn local_rate_limit_refusals_are_not_failures() {
    let api = Api::new(|n, _| {
        if n == 0 {
            st_h(429, &[("retry-after", "10")])
        } else {
            st(200)
        }
    });
    let (breaker, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = ClientBuilder::new()
        .without_retry()
        .with_circuit_breaker(breaker)
        .with_rate_limit(
            sturdy::ratelimit::RateLimitLayer::adaptive_only().with_max_wait(Duration::ZERO),
        )
        .build(api.service());
    let mut kept = client.clone();
    assert_eq!(call(&mut kept, A).await, Ok(429));
    for _ in 0..5 {
        let err = kept
            .ready()
            .await
            .unwrap()
            .call(get(&url(A, "/x")))
            .await
            .unwrap_err();
        assert!(find::<sturdy::core::RateLimited>(&*err).is_some(), "{err}");
    }
    assert_eq!(handle.state(A), Some(CircuitState::Closed));
    assert_eq!(api.calls(), 1);
}

/// "values that cannot work are taken as the nearest that can (0 probes is 1)"; 0 successes to
/// close is 1.
#[tokio::test(start_paused = true)]
async fn zero_probes_is_one_probe() {
    let api = Api::new(|n, _| {
        if n < 2 {
            st(503)
        } else {
            Act::After(secs(1), 200)
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_probes(0)
        .with_successes_to_close(0)
        .pair();
    let svc = layer.layer(api.service());
    for _ in 0..2 {
        svc.clone().oneshot(get(&url(A, "/x"))).await.unwrap();
    }
    tokio::time::sleep(secs(30)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get(&url(A, "/x"))));
    tokio::task::yield_now().await;
    let err = svc.clone().oneshot(get(&url(A, "/x"))).await.unwrap_err();
    assert_eq!(
        find::<CircuitOpen>(&*err).map(CircuitOpen::reason),
        Some(OpenReason::Probing)
    );
    assert_eq!(bounded(probe).await.unwrap().unwrap().status(), 200);
    assert_eq!(handle.state(A), Some(CircuitState::Closed));
}

// ------------------------------------------------------------------ setters after pair()

/// circuit.md: "The layer, its clones and its handles are one set of breakers: a setter called
/// after a clone or a `pair()` applies to all of them". Setters called after `pair()` and after
/// a clone: services made afterwards from the layer and from the clone share the breakers, and
/// the handle sees them.
#[tokio::test(start_paused = true)]
async fn setters_after_pair_and_clone_apply_to_all() {
    let api = Api::always(st(503));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let early_clone = layer.clone();
    let layer = layer.with_consecutive_failures(2);
    let mut from_layer = layer.layer(api.service());
    let mut from_clone = early_clone.layer(api.service());
    assert_eq!(call(&mut from_layer, A).await, Ok(503));
    assert_eq!(call(&mut from_clone, A).await, Ok(503));
    assert!(is_open(handle.state(A)), "{:?}", handle.state(A));
    assert_eq!(call(&mut from_layer, A).await, Err(OpenReason::Failing));
    assert_eq!(call(&mut from_clone, A).await, Err(OpenReason::Failing));
}

/// The same for the setters that change the layer's type: `with_key` and `with_classifier`
/// called after `pair()`; the handle sees the breakers of the services made afterwards.
#[tokio::test(start_paused = true)]
async fn with_key_and_with_classifier_after_pair_are_seen_by_the_handle() {
    let api = Api::always(st(409));
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let layer = layer
        .with_key(|req: &http::Request<Body>| {
            req.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned()
        })
        .with_classifier(
            |r: &Result<http::Response<Body>, sturdy::core::BoxError>| match r {
                Ok(res) if res.status() == 409 => sturdy::core::Outcome::Retryable(
                    sturdy::core::ErrorKind::Server(http::StatusCode::SERVICE_UNAVAILABLE),
                ),
                other => sturdy::core::classify::classify_result(other),
            },
        );
    let svc = layer.layer(api.service());
    for _ in 0..2 {
        let req = http::Request::get(url(A, "/x"))
            .header("x-tenant", "t-1")
            .body(Body::default())
            .unwrap();
        assert_eq!(
            bounded(svc.clone().oneshot(req)).await.unwrap().status(),
            409
        );
    }
    let req = http::Request::get(url(A, "/x"))
        .header("x-tenant", "t-1")
        .body(Body::default())
        .unwrap();
    let err = bounded(svc.clone().oneshot(req)).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert!(
        is_open(handle.state("t-1")),
        "the handle taken before with_key/with_classifier: {:?} ({:?})",
        handle.state("t-1"),
        handle.states()
    );
}
