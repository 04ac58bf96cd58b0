//! Outside tests of the adaptive concurrency limit and of request coalescing, against
//! docs/guides/concurrency.md, docs/guides/coalesce.md and the crate docs.
use crate::outsider_common;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use outsider_common::*;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::{AdaptiveConcurrencyLayer, LimitReached};
use sturdy::core::classify::delivery;
use sturdy::core::{find, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use tokio::time::Instant;
use tower::{Layer, ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/x";
const H: &str = "api.example.com";

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_limit_waits_then_fails_not_sent() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_secs(60)));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(1, 1)
        .with_max_wait(Duration::from_secs(5))
        .pair();
    let svc = layer.layer(api.service());
    let first = tokio::spawn(svc.clone().oneshot(get(U)));
    settle().await;
    let start = Instant::now();
    let err = svc.clone().oneshot(post(U, "{}")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    let e = find::<sturdy::core::Error>(&*err).unwrap();
    assert!(
        matches!(e.kind(), ErrorKind::RateLimited { retry_after: None }),
        "{:?}",
        e.kind()
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let lr = find::<LimitReached>(&*err).unwrap();
    assert_eq!(
        (lr.key(), lr.limit(), lr.waited()),
        (H, 1, Duration::from_secs(5))
    );
    eprintln!("limit reached: {err}");
    assert_eq!(handle.state(H).unwrap().waiting(), 0);
    assert_eq!(handle.state(H).unwrap().in_flight(), 1);
    first.abort();
    settle().await;
    assert_eq!(
        handle.state(H).unwrap().in_flight(),
        0,
        "an aborted in-flight call kept its permit"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaves_the_line() {
    let api = Api::new(vec![Answer::Slow(Duration::from_secs(2))], ok());
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = layer.layer(api.service());
    let first = tokio::spawn(svc.clone().oneshot(get(U)));
    settle().await;
    let mut waiters = Vec::new();
    for _ in 0..10 {
        waiters.push(tokio::spawn(svc.clone().oneshot(get(U))));
    }
    settle().await;
    assert_eq!(handle.state(H).unwrap().waiting(), 10);
    for w in &waiters {
        w.abort();
    }
    settle().await;
    assert_eq!(handle.state(H).unwrap().waiting(), 0);
    let next = tokio::spawn(svc.clone().oneshot(get(U)));
    first.await.unwrap().unwrap();
    next.await.unwrap().unwrap();
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn fifty_503s_from_one_burst_lower_the_limit_once() {
    let api = Api::new(vec![], after(Duration::from_millis(10), status(503)));
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(100)
        .pair();
    let svc = layer.layer(api.service());
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(svc.clone().oneshot(get(U))));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(handle.limit(H), Some(90));
}

#[tokio::test(start_paused = true)]
async fn odd_limits_do_not_panic_or_deadlock() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(10)));
    for layer in [
        AdaptiveConcurrencyLayer::new().with_limits(0, 0),
        AdaptiveConcurrencyLayer::new().with_limits(5, 1),
        AdaptiveConcurrencyLayer::new().with_initial_limit(0),
        AdaptiveConcurrencyLayer::new().with_initial_limit(usize::MAX),
        AdaptiveConcurrencyLayer::new().with_limits(usize::MAX, usize::MAX),
        AdaptiveConcurrencyLayer::new().with_max_hosts(0),
    ] {
        let svc = layer.layer(api.service());
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::spawn(async move {
                let mut t = Vec::new();
                for _ in 0..5 {
                    t.push(tokio::spawn(svc.clone().oneshot(get(U))));
                }
                for x in t {
                    x.await.unwrap().unwrap();
                }
            }),
        )
        .await;
        assert!(r.expect("deadlock").is_ok(), "a call panicked");
    }
    assert!(
        AdaptiveConcurrencyLayer::new().with_backoff(0.0).is_err()
            || AdaptiveConcurrencyLayer::new().with_backoff(0.0).is_ok()
    );
    assert!(AdaptiveConcurrencyLayer::new()
        .with_backoff(f64::NAN)
        .is_err());
    assert!(AdaptiveConcurrencyLayer::new().with_backoff(1.5).is_err());
}

#[tokio::test(start_paused = true)]
async fn set_limit_by_hand() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(100)));
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let svc = layer.layer(api.service());
    svc.clone().oneshot(get(U)).await.unwrap();
    handle.set_limit(H, 2);
    let start = Instant::now();
    let mut t = Vec::new();
    for _ in 0..4 {
        t.push(tokio::spawn(svc.clone().oneshot(get(U))));
    }
    for x in t {
        x.await.unwrap().unwrap();
    }
    assert_eq!(start.elapsed(), Duration::from_millis(200));
    handle.set_limit(H, 0);
    let r = tokio::time::timeout(Duration::from_secs(40), svc.clone().oneshot(get(U))).await;
    assert!(r.is_ok(), "set_limit(0) locked the host out");
}

/// Below the retry layer: a retried call gives its place back while it sleeps.
#[tokio::test(start_paused = true)]
async fn a_retry_sleeping_does_not_hold_a_place() {
    let api = Api::new(vec![status_h(503, &[("retry-after", "5")])], ok());
    let (layer, handle) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let svc = ServiceBuilder::new()
        .layer(RetryLayer::new().with_seed(1))
        .layer(layer)
        .service(api.service());
    let a = tokio::spawn(svc.clone().oneshot(get(U)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(handle.state(H).unwrap().in_flight(), 0);
    let start = Instant::now();
    svc.clone()
        .oneshot(get("http://api.example.com/other"))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    a.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn identical_gets_share_one_call_and_credentials_split_them() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(100)));
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api.service());
    let mk = |auth: &str, trace: &str| {
        Request::get(U)
            .header("authorization", auth)
            .header("traceparent", trace)
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let mut t = Vec::new();
    for i in 0..10 {
        t.push(tokio::spawn(
            svc.clone().oneshot(mk("Bearer a", &format!("00-{i}"))),
        ));
    }
    t.push(tokio::spawn(svc.clone().oneshot(mk("Bearer b", "00-x"))));
    for x in t {
        let res = x.await.unwrap().unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"slow ok");
    }
    assert_eq!(api.calls(), 2);
    assert_eq!(handle.stats().joined(), 9);
}

#[tokio::test(start_paused = true)]
async fn a_get_with_a_body_and_a_post_are_not_coalesced() {
    let api = Api::new(vec![], Answer::Slow(Duration::from_millis(100)));
    let svc = CoalesceLayer::new().layer(api.service());
    let mut t = Vec::new();
    for _ in 0..3 {
        t.push(tokio::spawn(svc.clone().oneshot(
            Request::get(U).body(Full::from("{\"q\":1}")).unwrap(),
        )));
        t.push(tokio::spawn(svc.clone().oneshot(post(U, "{}"))));
    }
    for x in t {
        x.await.unwrap().unwrap();
    }
    assert_eq!(api.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn shared_errors_keep_kind_and_chain() {
    let api = Api::new(
        vec![after(
            Duration::from_millis(50),
            Answer::Io(std::io::ErrorKind::ConnectionReset),
        )],
        ok(),
    );
    let svc = CoalesceLayer::new().layer(api.service());
    let a = tokio::spawn(svc.clone().oneshot(get(U)));
    let b = tokio::spawn(svc.clone().oneshot(get(U)));
    let ea = a.await.unwrap().unwrap_err();
    let eb = b.await.unwrap().unwrap_err();
    assert_eq!(api.calls(), 1);
    for e in [&ea, &eb] {
        eprintln!("shared error: {e}");
        assert!(find::<std::io::Error>(&**e).is_some(), "{e}");
        let ours = find::<sturdy::core::Error>(&**e).unwrap();
        assert_eq!(ours.kind(), &ErrorKind::Transport, "{e}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_last_caller_leaving_cancels_the_upstream_call() {
    let api = Api::new(vec![Answer::Hang], ok());
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = layer.layer(api.service());
    let a = tokio::spawn(svc.clone().oneshot(get(U)));
    let b = tokio::spawn(svc.clone().oneshot(get(U)));
    settle().await;
    assert_eq!(handle.in_flight(H), 1);
    a.abort();
    b.abort();
    settle().await;
    assert_eq!(handle.in_flight(H), 0);
    svc.clone().oneshot(get(U)).await.unwrap();
    assert_eq!(api.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_response_over_the_bound_goes_to_the_leader_and_others_send_their_own() {
    let big = "y".repeat(4096);
    let big2 = big.clone();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let big = big2.clone();
        n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok::<_, sturdy::core::BoxError>(http::Response::new(Full::<Bytes>::from(big)))
        }
    });
    let (layer, handle) = CoalesceLayer::new().with_max_body(1024).pair();
    let svc = layer.layer(inner);
    let a = tokio::spawn(svc.clone().oneshot(get(U)));
    let b = tokio::spawn(svc.clone().oneshot(get(U)));
    for x in [a, b] {
        let body = x
            .await
            .unwrap()
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body.len(), big.len());
    }
    assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 2);
    let st = handle.stats();
    eprintln!(
        "stats: calls {} upstream {} joined {} too_large {} fallbacks {}",
        st.calls(),
        st.upstream(),
        st.joined(),
        st.too_large(),
        st.fallbacks()
    );
    assert!(st.too_large() >= 1);
}

#[tokio::test(start_paused = true)]
async fn coalesce_over_retry_shares_the_retried_outcome() {
    let api = Api::new(
        vec![after(Duration::from_millis(20), status(503))],
        Answer::Slow(Duration::from_millis(20)),
    );
    let retry = RetryLayer::new().with_seed(3).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(100))
            .unwrap(),
    );
    let svc = ServiceBuilder::new()
        .layer(CoalesceLayer::new())
        .layer(retry)
        .service(api.service());
    let mut t = Vec::new();
    for _ in 0..200 {
        t.push(tokio::spawn(svc.clone().oneshot(get(U))));
    }
    for x in t {
        assert_eq!(x.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(api.calls(), 2);
}
