//! Outside tests of the circuit breaker against docs/guides/circuit.md and the crate docs.
use crate::outsider_common;
use std::time::Duration;

use outsider_common::*;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::core::classify::delivery;
use sturdy::core::{find, CallOptions, CircuitOpen, Delivery};
use sturdy::retry::RetryLayer;
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/x";
const H: &str = "api.example.com";

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

fn open_after(n: u32) -> CircuitBreakerLayer {
    CircuitBreakerLayer::new().with_consecutive_failures(n)
}

#[tokio::test(start_paused = true)]
async fn streak_opens_and_fails_fast_without_calling() {
    let api = Api::new(vec![], status(502));
    let (layer, handle) = open_after(3).pair();
    let svc = layer.layer(api.service());
    for _ in 0..3 {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
    let err = svc.clone().oneshot(get(U)).await.unwrap_err();
    let open = find::<CircuitOpen>(&*err).expect("CircuitOpen");
    assert_eq!(open.retry_in(), Duration::from_secs(30));
    assert_eq!(api.calls(), 3);
    assert!(matches!(handle.state(H), Some(CircuitState::Open { .. })));
    eprintln!("open message: {err}");
}

#[tokio::test(start_paused = true)]
async fn default_does_not_open_on_a_streak_below_min_volume() {
    let api = Api::new(vec![], status(502));
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.service());
    for _ in 0..99 {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
    assert_eq!(handle.state(H), Some(CircuitState::Closed));
    svc.clone().oneshot(get(U)).await.unwrap();
    assert!(matches!(handle.state(H), Some(CircuitState::Open { .. })));
}

#[tokio::test(start_paused = true)]
async fn four_xx_and_429_are_not_failures() {
    let api = Api::new(vec![], status(404));
    let (layer, handle) = open_after(2).pair();
    let svc = layer.layer(api.service());
    for _ in 0..5 {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
    api.set_fallback(status(429));
    for _ in 0..5 {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
    api.set_fallback(status(401));
    for _ in 0..5 {
        svc.clone().oneshot(get(U)).await.unwrap();
    }
    assert_eq!(handle.state(H), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn open_period_doubles_to_five_minutes_and_resets_after_close() {
    let api = Api::new(vec![], status(502));
    let (layer, handle) = open_after(1).pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    let mut expected = 30;
    for _ in 0..6 {
        let CircuitState::Open { retry_in } = handle.state(H).unwrap() else {
            panic!()
        };
        assert_eq!(
            retry_in,
            Duration::from_secs(expected),
            "{:?}",
            handle.state(H)
        );
        tokio::time::advance(retry_in).await;
        // Probe fails: re-opens, doubled.
        svc.clone().oneshot(get(U)).await.unwrap();
        expected = (expected * 2).min(300);
    }
    let CircuitState::Open { retry_in } = handle.state(H).unwrap() else {
        panic!()
    };
    tokio::time::advance(retry_in).await;
    api.set_fallback(ok());
    svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(handle.state(H), Some(CircuitState::Closed));
    api.set_fallback(status(502));
    svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(
        handle.state(H),
        Some(CircuitState::Open {
            retry_in: Duration::from_secs(30)
        })
    );
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_one_probe_and_a_dropped_probe_gives_its_slot_back() {
    let api = Api::new(vec![status(502), Answer::Hang], ok());
    let (layer, handle) = open_after(1).pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    let probe = tokio::spawn(svc.clone().oneshot(get(U)));
    settle().await;
    assert_eq!(handle.state(H), Some(CircuitState::HalfOpen));
    let err = svc.clone().oneshot(get(U)).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some());
    eprintln!(
        "half-open refusal: {err}; retry_in {:?}",
        find::<CircuitOpen>(&*err).unwrap().retry_in()
    );
    probe.abort();
    settle().await;
    // The slot is free: the next call is the probe, and it closes the breaker.
    let res = svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(handle.state(H), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn successes_to_close_and_probes() {
    let api = Api::new(
        vec![
            status(502),
            Answer::Slow(Duration::from_millis(100)),
            Answer::Slow(Duration::from_millis(300)),
        ],
        ok(),
    );
    let (layer, handle) = open_after(1)
        .with_probes(2)
        .with_successes_to_close(2)
        .pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    tokio::time::advance(Duration::from_secs(30)).await;
    let a = tokio::spawn(svc.clone().oneshot(get(U)));
    let b = tokio::spawn(svc.clone().oneshot(get(U)));
    settle().await;
    let c = svc.clone().oneshot(get(U)).await;
    assert!(c.is_err(), "a third call while 2 probes run must fail fast");
    a.await.unwrap().unwrap();
    assert_eq!(handle.state(H), Some(CircuitState::HalfOpen));
    b.await.unwrap().unwrap();
    assert_eq!(handle.state(H), Some(CircuitState::Closed));
}

#[tokio::test(start_paused = true)]
async fn force_open_and_close() {
    let api = Api::new(vec![], ok());
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    handle.force_open(H);
    assert_eq!(handle.state(H), Some(CircuitState::ForcedOpen));
    let err = svc.clone().oneshot(get(U)).await.unwrap_err();
    assert!(find::<CircuitOpen>(&*err).is_some());
    eprintln!("forced open: {err}");
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(svc.clone().oneshot(get(U)).await.is_err());
    handle.force_close(H);
    svc.clone().oneshot(get(U)).await.unwrap();
    // A host never seen.
    handle.force_open("never.example.com");
    let err = svc.clone().oneshot(get("http://never.example.com/")).await;
    assert!(
        err.is_err(),
        "force_open on a host not seen yet must hold it open"
    );
}

#[tokio::test(start_paused = true)]
async fn failure_rate_validation() {
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(1.5, Duration::from_secs(1), 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(-0.1, Duration::from_secs(1), 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(f64::NAN, Duration::from_secs(1), 1)
        .is_err());
    assert!(CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::ZERO, 1)
        .is_err());
}

#[tokio::test(start_paused = true)]
async fn odd_settings_do_not_panic() {
    let api = Api::new(vec![], ok());
    let svc = CircuitBreakerLayer::new()
        .with_failure_rate(0.0, Duration::from_secs(1), 0)
        .unwrap()
        .layer(api.service());
    for _ in 0..3 {
        let _ = svc.clone().oneshot(get(U)).await;
    }
    api.set_fallback(status(500));
    for (base, max) in [
        (Duration::ZERO, Duration::ZERO),
        (Duration::from_secs(100), Duration::from_secs(1)),
    ] {
        let svc = CircuitBreakerLayer::new()
            .with_open_duration(base, max)
            .with_consecutive_failures(1)
            .layer(api.service());
        for _ in 0..3 {
            let _ = svc.clone().oneshot(get(U)).await;
        }
    }
}

/// "Setters never panic; values that cannot work are taken as the nearest that can." A very long
/// open period (a user asking for "open until I say so") once panicked on the request that
/// opened the breaker (`overflow when adding duration to instant`).
#[tokio::test(start_paused = true)]
async fn huge_open_duration_does_not_panic() {
    let api = Api::new(vec![], status(500));
    let svc = CircuitBreakerLayer::new()
        .with_open_duration(Duration::MAX, Duration::MAX)
        .with_consecutive_failures(1)
        .layer(api.service());
    let out = tokio::spawn(async move {
        let _ = svc.clone().oneshot(get(U)).await;
        let _ = svc.clone().oneshot(get(U)).await;
    })
    .await;
    assert!(
        out.is_ok(),
        "a call panicked with with_open_duration(Duration::MAX, Duration::MAX)"
    );
}

#[tokio::test(start_paused = true)]
async fn hundred_year_open_duration_does_not_panic() {
    let api = Api::new(vec![], status(500));
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    let svc = CircuitBreakerLayer::new()
        .with_open_duration(century, century)
        .with_consecutive_failures(1)
        .layer(api.service());
    let out = tokio::spawn(async move {
        let _ = svc.clone().oneshot(get(U)).await;
        let _ = svc.clone().oneshot(get(U)).await;
    })
    .await;
    assert!(out.is_ok(), "a call panicked with a 100-year open duration");
}

#[tokio::test(start_paused = true)]
async fn retry_waits_out_the_breaker_when_the_deadline_fits() {
    let api = Api::new(vec![status(502)], ok());
    let (breaker, handle) = open_after(1).pair();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(1))
        .layer(breaker)
        .service(api.service());
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    svc.clone().oneshot(req).await.unwrap();
    assert!(matches!(handle.state(H), Some(CircuitState::Open { .. })));
    // Without deadline: fails at once.
    let start = Instant::now();
    let err = svc.clone().oneshot(get(U)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert!(find::<CircuitOpen>(&*err).is_some());
    assert_eq!(delivery(&*err), Delivery::NotSent);
    eprintln!("no deadline: {err}");
    // With a deadline that fits: waits and succeeds.
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(40)));
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(start.elapsed() >= Duration::from_secs(30));
}

/// Several callers with deadlines meet one open breaker. The guide: "the retry layer waits for
/// the probe and tries again". All should succeed once the probe closes the breaker.
#[tokio::test(start_paused = true)]
async fn several_callers_wait_for_the_probe() {
    let api = Api::new(vec![status(502)], Answer::Slow(Duration::from_millis(200)));
    let (breaker, handle) = open_after(1).pair();
    let svc = ServiceBuilder::new()
        .layer(
            RetryLayer::new()
                .with_seed(1)
                .with_deadline(Duration::from_secs(45)),
        )
        .layer(breaker)
        .service(api.service());
    let mut req = get(U);
    req.extensions_mut()
        .insert(CallOptions::new().without_retries());
    svc.clone().oneshot(req).await.unwrap();
    assert!(matches!(handle.state(H), Some(CircuitState::Open { .. })));
    let mut tasks = Vec::new();
    for _ in 0..5 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get(U))));
    }
    let mut failed = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(res) => assert_eq!(res.status(), 200),
            Err(e) => failed.push(e.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "callers with a 45 s deadline failed: {failed:?} (calls {})",
        api.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn post_refused_by_open_breaker_says_not_sent() {
    let api = Api::new(vec![status(502)], ok());
    let (breaker, _handle) = open_after(1).pair();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(1))
        .layer(breaker)
        .service(api.service());
    svc.clone().oneshot(post(U, "{}")).await.unwrap();
    let err = svc.clone().oneshot(post(U, "{}")).await.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let msg = err.to_string();
    eprintln!("POST open: {msg}");
    assert!(msg.contains("not sent"), "{msg}");
}

/// Documented: "past it, healthy breakers are forgotten, then new keys share one overflow
/// breaker". Past the bound, a host that never failed may be refused because unrelated hosts
/// did; the refusal names the host called and says that it shares the overflow breaker (it once
/// said "circuit open for *: it has been failing").
#[tokio::test(start_paused = true)]
async fn overflow_breaker_refusal_names_the_host_and_the_overflow() {
    let api = Api::new(vec![], status(502));
    let (layer, handle) = open_after(1).with_max_breakers(2).pair();
    let svc = layer.layer(api.service());
    for i in 0..5 {
        let _ = svc
            .clone()
            .oneshot(get(&format!("http://h{i}.example.com/")))
            .await;
    }
    eprintln!("states: {:?}", handle.states());
    api.set_fallback(ok());
    let r = svc
        .clone()
        .oneshot(get("http://healthy.example.com/"))
        .await;
    if let Err(e) = r {
        let open = sturdy::core::find::<sturdy::core::CircuitOpen>(&*e).expect("a CircuitOpen");
        assert_eq!(open.reason(), sturdy::core::OpenReason::Overflow);
        let msg = e.to_string();
        assert!(
            msg.contains("healthy.example.com") && msg.contains("overflow"),
            "{msg}"
        );
        assert!(!msg.contains("for *"), "{msg}");
    }
}

#[tokio::test(start_paused = true)]
async fn setter_after_pair_applies_to_all() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let layer = layer.with_consecutive_failures(1);
    let api = Api::new(vec![], status(502));
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    assert!(matches!(handle.state(H), Some(CircuitState::Open { .. })));
}
