//! Interop: hedging, adaptive concurrency, coalescing and the circuit breaker against the real
//! HAProxy fault proxies and nginx `limit_req` started by `scripts/interop.sh`.
use crate::interop_common;
use crate::interop_haproxy::{align, ALTERNATING};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::Request;
use http_body_util::Full;
use interop_common::*;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{CircuitOpen, Delivery, ErrorKind};
use sturdy::hedge::HedgeLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

const NORMAL: &str = "STURDY_INTEROP_HAPROXY_NORMAL_URL";
const RESET: &str = "STURDY_INTEROP_HAPROXY_RESET_URL";
const FLAKY_STALL: &str = "STURDY_INTEROP_HAPROXY_FLAKY_STALL_URL";
const STALL: &str = "STURDY_INTEROP_HAPROXY_STALL_URL";
const GATEWAY_TIMEOUT: &str = "STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL";
const TCP_REJECT: &str = "STURDY_INTEROP_HAPROXY_TCP_REJECT_URL";
const BACKEND: &str = "STURDY_INTEROP_BACKEND_URL";
const NGINX: &str = "STURDY_INTEROP_NGINX_URL";

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}-f32-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn hits(backend: &str, path: &str) -> (u64, serde_json::Value) {
    let v = get_json(&format!("{backend}/count?path={path}")).await;
    (v["hits"].as_u64().unwrap_or(0), v["keys"].clone())
}

/// A hedge layer with one key for every host (so warming on one frontend arms another), a
/// fixed 60 ms delay once 5 calls were seen, and a full budget.
fn hedge() -> HedgeLayer<impl Fn(&Request<Full<Bytes>>) -> String + Clone> {
    HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(Duration::from_millis(60), Duration::from_millis(60))
        .with_budget(1.0, 10)
        .unwrap()
        .with_key(|_r: &Request<Full<Bytes>>| "all".to_string())
}

#[tokio::test]
async fn hedge_wins_over_a_copy_stalled_in_haproxy_and_the_origin_sees_one() {
    let flaky = peer_or_skip!(FLAKY_STALL);
    let normal = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let _serial = ALTERNATING.lock().await;
    let (layer, handle) = hedge().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    for _ in 0..8 {
        svc.clone()
            .oneshot(get(&format!("{normal}/{}", unique("warm"))))
            .await
            .unwrap();
    }
    align(&flaky, true).await;
    let path = format!("/{}", unique("hedged"));
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(5),
        "hedged GET",
        svc.clone().oneshot(get(&format!("{flaky}{path}"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert!(start.elapsed() < Duration::from_secs(3));
    let st = handle.stats("all").unwrap();
    assert_eq!((st.hedges(), st.hedge_wins()), (1, 1));
    // The first copy sat in the black hole: only the hedge reached the origin.
    assert_eq!(hits(&backend, &path).await.0, 1);
}

#[tokio::test]
async fn slow_posts_through_haproxy_reach_the_origin_once() {
    let normal = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let (layer, handle) = hedge().pair();
    let svc = ServiceBuilder::new().layer(layer.clone()).service(http());
    for _ in 0..8 {
        svc.clone()
            .oneshot(get(&format!("{normal}/{}", unique("warm"))))
            .await
            .unwrap();
    }
    // A POST without a key, then one from ClientBuilder (with a key): 300 ms each, 5x the
    // delay; neither is duplicated.
    let plain = format!("/{}", unique("slow-300"));
    svc.clone()
        .oneshot(post(&format!("{normal}{plain}"), "{}"))
        .await
        .unwrap();
    let client = ClientBuilder::new().with_hedge(layer).build(http());
    let keyed = format!("/{}", unique("slow-300"));
    client
        .clone()
        .oneshot(post(&format!("{normal}{keyed}"), "{}"))
        .await
        .unwrap();
    assert_eq!(hits(&backend, &plain).await.0, 1, "plain POST duplicated");
    let (n, keys) = hits(&backend, &keyed).await;
    assert_eq!(n, 1, "ClientBuilder POST duplicated: {keys}");
    // Control: a slow GET is hedged (both copies reach the origin).
    let g = format!("/{}", unique("slow-300"));
    svc.clone()
        .oneshot(get(&format!("{normal}{g}")))
        .await
        .unwrap();
    assert_eq!(hits(&backend, &g).await.0, 2);
    assert_eq!(handle.stats("all").unwrap().hedges(), 1);
}

#[tokio::test]
async fn breaker_opens_on_haproxy_resets_and_504s_and_refusals_are_not_sent() {
    for var in [RESET, TCP_REJECT, GATEWAY_TIMEOUT] {
        let base = peer_or_skip!(var);
        let (layer, handle) = CircuitBreakerLayer::new()
            .with_consecutive_failures(3)
            .with_open_duration(Duration::from_secs(60), Duration::from_secs(60))
            .pair();
        let svc = ServiceBuilder::new().layer(layer).service(http());
        for _ in 0..3 {
            match bounded(
                Duration::from_secs(5),
                var,
                svc.clone().oneshot(get(&format!("{base}/x"))),
            )
            .await
            {
                Ok(res) => assert_eq!(res.status(), 504, "{var}"),
                Err(e) => assert_ne!(
                    sturdy::core::classify::classify_error(&*e),
                    ErrorKind::Other,
                    "{var}: {}",
                    chain(&*e)
                ),
            }
        }
        let states = handle.states();
        assert_eq!(states.len(), 1);
        assert!(
            matches!(states[0].1, CircuitState::Open { .. }),
            "{var}: {states:?}"
        );
        let err = svc
            .clone()
            .oneshot(get(&format!("{base}/x")))
            .await
            .unwrap_err();
        assert!(
            sturdy::core::find::<CircuitOpen>(&*err).is_some(),
            "{var}: {}",
            chain(&*err)
        );
        assert_eq!(delivery(&*err), Delivery::NotSent);
    }
}

#[tokio::test]
async fn adaptive_limit_lowers_once_on_an_nginx_429_burst_and_stays_usable() {
    let nginx = peer_or_skip!(NGINX);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_initial_limit(40)
        .with_max_wait(Duration::ZERO)
        .pair();
    let (inner, wire) = recorded(http());
    let svc = ServiceBuilder::new().layer(layer).service(inner);
    let url = format!("{nginx}/burst/{}", unique("c"));
    let calls: Vec<_> = (0..30).map(|_| svc.clone().oneshot(get(&url))).collect();
    let mut limited = 0;
    for r in join_all(calls).await {
        if r.unwrap().status() == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 20, "nginx limited {limited} of 30");
    assert_eq!(wire.len(), 30);
    let states = handle.states();
    assert_eq!(states.len(), 1);
    let st = &states[0].1;
    assert_eq!(
        (st.limit(), st.in_flight()),
        (36, 0),
        "40 x 0.9, once for the burst"
    );
}

#[tokio::test]
async fn concurrency_permits_come_back_from_haproxy_stalls() {
    let stall = peer_or_skip!(STALL);
    let normal = peer_or_skip!(NORMAL);
    let (layer, handle) = AdaptiveConcurrencyLayer::new()
        .with_limits(2, 2)
        .with_max_wait(Duration::ZERO)
        .with_key(|_r: &Request<Full<Bytes>>| "one".to_string())
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let calls: Vec<_> = (0..2)
        .map(|_| {
            tokio::time::timeout(
                Duration::from_millis(300),
                svc.clone().oneshot(get(&format!("{stall}/s"))),
            )
        })
        .collect();
    let shed = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        svc.clone().oneshot(get(&format!("{normal}/n"))).await
    };
    let (stalled, shed) = tokio::join!(join_all(calls), shed);
    assert!(stalled.iter().all(|r| r.is_err()));
    let err = shed.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{}", chain(&*err));
    assert_eq!(handle.state("one").unwrap().in_flight(), 0);
    let res = svc
        .clone()
        .oneshot(get(&format!("{normal}/{}", unique("after"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn coalescing_through_haproxy_one_origin_hit_per_credential() {
    let normal = peer_or_skip!(NORMAL);
    let backend = peer_or_skip!(BACKEND);
    let (layer, handle) = CoalesceLayer::new().pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let path = format!("/{}", unique("slow-200"));
    let url = format!("{normal}{path}");
    let mk = |who: &str| {
        Request::get(&url)
            .header("authorization", format!("Bearer {who}"))
            .body(Full::default())
            .unwrap()
    };
    let calls: Vec<_> = (0..40)
        .map(|i| {
            svc.clone()
                .oneshot(mk(if i % 2 == 0 { "alice" } else { "bob" }))
        })
        .collect();
    for r in join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(hits(&backend, &path).await.0, 2, "one per credential");
    assert_eq!(handle.stats().joined(), 38);
}

#[tokio::test]
async fn coalesced_body_stalled_behind_haproxy_times_out_for_everyone() {
    let normal = peer_or_skip!(NORMAL);
    let (layer, _h) = CoalesceLayer::new()
        .with_body_timeout(Duration::from_millis(300))
        .pair();
    let svc = ServiceBuilder::new().layer(layer).service(http());
    let url = format!("{normal}/stall-body-{}", unique("b"));
    let calls: Vec<_> = (0..10).map(|_| svc.clone().oneshot(get(&url))).collect();
    let rs = bounded(Duration::from_secs(5), "stalled body", join_all(calls)).await;
    for r in rs {
        let err = r.unwrap_err();
        assert_eq!(
            sturdy::core::classify::classify_error(&*err),
            ErrorKind::Timeout,
            "{}",
            chain(&*err)
        );
        assert!(err.to_string().contains("did not arrive within"), "{err}");
    }
}
