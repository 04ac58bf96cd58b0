//! Setters configure a layer value; the limiter state stays one, whatever is cloned or taken
//! before or after. Paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sturdy_core::clock::ManualClock;
use sturdy_core::RateLimited;
use sturdy_ratelimit::{ByHost, OnStoreError, Quota, RateLimitLayer};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use crate::support;
use support::{get, status_with, Api};

fn one_per_second() -> RateLimitLayer {
    RateLimitLayer::new(Quota::per_second(1).unwrap())
}

/// Every setter, with values at the edges.
fn every_setter(layer: RateLimitLayer) -> RateLimitLayer {
    layer
        .with_max_wait(Duration::from_secs(10))
        .with_default_pause(Duration::MAX)
        .with_max_pause(Duration::from_secs(60))
        .with_release_pace(Duration::ZERO)
        .with_release_pace(Duration::MAX)
        .with_on_store_error(OnStoreError::Fail)
        .with_clock(Arc::new(ManualClock::at(SystemTime::UNIX_EPOCH)))
        .with_max_keys(0)
        .with_max_keys(usize::MAX)
        .with_key(ByHost)
}

#[tokio::test(start_paused = true)]
async fn setters_after_a_clone_a_service_and_a_handle_keep_one_state() {
    let api = Api::default();
    let layer = one_per_second();
    let early_clone = layer.clone();
    let early_service = layer.layer(api.service());
    let (layer, handle) = layer.pair();
    let late = every_setter(layer).layer(api.service());
    let start = Instant::now();

    early_service.clone().oneshot(get("a")).await.unwrap();
    late.clone().oneshot(get("a")).await.unwrap();
    early_clone
        .layer(api.service())
        .oneshot(get("a"))
        .await
        .unwrap();
    late.oneshot(get("a")).await.unwrap();
    // One quota of 1/s between all of them.
    let secs: Vec<Duration> = (0..4).map(Duration::from_secs).collect();
    assert_eq!(api.since(start), secs);
    assert!(handle.paused().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_handle_taken_first_sees_pauses_from_services_made_after_setters() {
    let api = Api::with(vec![status_with(429, &[("retry-after", "5")])]);
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let svc = layer
        .with_max_wait(Duration::ZERO)
        .with_key(|r: &http::Request<()>| r.uri().host().unwrap_or("").to_owned())
        .layer(api.service());
    svc.clone().oneshot(get("a")).await.unwrap();
    assert_eq!(handle.pause("a"), Some(Duration::from_secs(5)));
    handle.clear_pause("a");
    svc.oneshot(get("a")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn layers_from_one_limiter_may_differ_in_settings_and_share_the_quota() {
    let api = Api::default();
    let base = one_per_second();
    let interactive = base
        .clone()
        .with_max_wait(Duration::ZERO)
        .layer(api.service());
    let batch = base
        .with_max_wait(Duration::from_secs(60))
        .layer(api.service());
    let start = Instant::now();
    batch.clone().oneshot(get("a")).await.unwrap();
    let err = interactive.oneshot(get("a")).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<RateLimited>().unwrap().retry_after(),
        Duration::from_secs(1)
    );
    batch.oneshot(get("a")).await.unwrap();
    assert_eq!(api.since(start), [Duration::ZERO, Duration::from_secs(1)]);
}

#[tokio::test(start_paused = true)]
async fn the_key_bound_is_set_before_the_first_call_and_kept_after() {
    let api = Api::with(vec![
        status_with(429, &[("retry-after", "30")]),
        status_with(429, &[("retry-after", "30")]),
    ]);
    // One key at most: a second busy key shares the overflow state "*".
    let (layer, handle) = RateLimitLayer::adaptive_only().with_max_keys(1).pair();
    let svc = layer.clone().layer(api.service());
    svc.clone().oneshot(get("a")).await.unwrap();
    // Too late to change the bound: nothing changes, nothing panics.
    let svc = layer.with_max_keys(100).layer(api.service());
    svc.clone().oneshot(get("b")).await.unwrap();
    let mut paused: Vec<String> = handle.paused().into_iter().map(|(k, _)| k).collect();
    paused.sort();
    assert_eq!(paused, ["*", "a"]);
}
