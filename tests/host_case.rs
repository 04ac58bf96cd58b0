//! A host name is case-insensitive (RFC 3986, section 3.2.2): `https://API.Example.com/` and
//! `https://api.example.com/` are one host, so they share one quota, one pause, one breaker, one
//! retry budget and one concurrency limit, and the handles find that state under either
//! spelling. A key chosen with `with_key(..)` is the caller's, case and all. Paused time, in
//! process; the shared Redis quota against the real Redis at `STURDY_REDIS_URL`.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{find, BoxError, CircuitOpen, KeyExtractor, RateLimited};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::redis::RedisQuota;
use sturdy::retry::RetryLayer;
use tower::{service_fn, Layer, Service, ServiceExt};

type Req = Request<Full<Bytes>>;

fn get(uri: &str) -> Req {
    Request::get(uri).body(Full::default()).unwrap()
}

/// An API that answers every call with `status` (and a `Retry-After: 10` on a 429), counting
/// the calls.
fn api(
    status: u16,
    calls: Arc<AtomicUsize>,
) -> impl Service<Req, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send>
       + Clone
       + Send
       + 'static {
    service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::builder().status(status);
            if status == 429 {
                res = res.header("retry-after", "10");
            }
            Ok::<_, BoxError>(res.body(Full::default()).unwrap())
        }
    })
}

#[test]
fn the_default_key_is_the_host_in_lower_case_without_user_info() {
    let req = get("https://User:PW@API.Example.COM:8443/V1/Orders");
    assert_eq!(sturdy::core::ByHost.key(&req), "api.example.com:8443");
    let lower = get("https://api.example.com/");
    assert!(matches!(
        sturdy::core::ByHost.key(&lower),
        std::borrow::Cow::Borrowed("api.example.com")
    ));
    let mut host_header = Request::get("/v1").body(()).unwrap();
    host_header
        .headers_mut()
        .insert(http::header::HOST, "Api.Example.com".parse().unwrap());
    assert_eq!(sturdy::core::ByHost.key(&host_header), "api.example.com");
}

#[tokio::test(start_paused = true)]
async fn one_quota_for_a_host_however_it_is_written() {
    let quota = Quota::per_second(1).unwrap().with_burst(1).unwrap();
    let layer = RateLimitLayer::new(quota).with_max_wait(Duration::ZERO);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(200, calls.clone()));
    svc.clone()
        .oneshot(get("http://API.Example.com/a"))
        .await
        .unwrap();
    let refused = svc
        .clone()
        .oneshot(get("http://api.example.com/b"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*refused).is_some(), "{refused}");
    let refused = svc
        .clone()
        .oneshot(get("http://api.EXAMPLE.com/c"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*refused).is_some(), "{refused}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Another host is another quota.
    svc.oneshot(get("http://other.example.com/")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_custom_key_keeps_its_case() {
    let quota = Quota::per_second(1).unwrap().with_burst(1).unwrap();
    let (layer, handle) = RateLimitLayer::new(quota)
        .with_max_wait(Duration::ZERO)
        .with_key(|req: &Req| {
            req.headers()
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        })
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    for tenant in ["Tenant-A", "tenant-a"] {
        let mut req = get("http://api.example.com/");
        req.headers_mut()
            .insert("x-tenant", tenant.parse().unwrap());
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 429);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "two keys, two quotas");
    assert!(handle.pause("Tenant-A").is_some());
    assert!(handle.pause("tenant-a").is_some());
    assert!(handle.pause("TENANT-A").is_none(), "no such key");
}

#[tokio::test(start_paused = true)]
async fn a_429_pauses_the_host_under_every_spelling_and_the_handle_finds_it() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(100).unwrap())
        .with_max_wait(Duration::ZERO)
        .pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    let res = svc
        .clone()
        .oneshot(get("http://Api.Example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    for spelling in ["api.example.com", "Api.Example.com", "API.EXAMPLE.COM"] {
        let left = handle.pause(spelling).expect(spelling);
        assert!(left > Duration::from_secs(9), "{spelling}: {left:?}");
        assert_eq!(handle.waiting(spelling), 0);
    }
    let refused = svc
        .clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*refused).is_some(), "{refused}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(handle.clear_pause("API.example.com").is_some());
    assert_eq!(handle.pause("api.example.com"), None);
    let paused: Vec<_> = handle.paused().into_iter().map(|(k, _)| k).collect();
    assert!(paused.is_empty(), "{paused:?}");
}

#[tokio::test(start_paused = true)]
async fn one_breaker_for_a_host_however_it_is_written() {
    let (layer, handle) = CircuitBreakerLayer::new().pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(200, calls.clone()));
    handle.force_open("API.Example.com");
    let refused = svc
        .clone()
        .oneshot(get("https://api.example.com/v1"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*refused).is_some(), "{refused}");
    let refused = svc
        .clone()
        .oneshot(get("https://Api.example.COM/v1"))
        .await
        .unwrap_err();
    assert!(find::<CircuitOpen>(&*refused).is_some(), "{refused}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let states = handle.states();
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(states[0].0, "api.example.com");
    assert!(matches!(
        handle.state("API.EXAMPLE.COM"),
        Some(CircuitState::ForcedOpen)
    ));
    handle.force_close("Api.Example.Com");
    assert_eq!(handle.state("api.example.com"), Some(CircuitState::Closed));
    svc.oneshot(get("https://API.example.com/v1"))
        .await
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A budget of 10 retries (1 a second over 10 s, no share of the calls): 20 failing calls to
/// one host written two ways get 10 retries between them, not 10 each.
#[tokio::test(start_paused = true)]
async fn one_retry_budget_for_a_host_however_it_is_written() {
    let layer = RetryLayer::new()
        .with_max_attempts(2)
        .with_budget(Duration::from_secs(10), 1, 0.0)
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(503, calls.clone()));
    for i in 0..20 {
        let host = if i % 2 == 0 { "A.Example" } else { "a.example" };
        let res = svc
            .clone()
            .oneshot(get(&format!("http://{host}/")))
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 30, "20 calls and 10 retries");
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_and_hedge_handles_find_a_host_in_any_case() {
    let (layer, handle) = AdaptiveConcurrencyLayer::new().pair();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(200, calls.clone()));
    svc.clone()
        .oneshot(get("http://Api.Example.com/"))
        .await
        .unwrap();
    assert!(handle.limit("api.example.com").is_some());
    assert!(handle.state("API.EXAMPLE.COM").is_some());
    handle.set_limit("API.example.com", 3);
    assert_eq!(handle.limit("api.example.com"), Some(3));
    let keys: Vec<_> = handle.states().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com"]);

    let (layer, handle) = HedgeLayer::new().pair();
    let svc = layer.layer(api(200, calls.clone()));
    svc.clone()
        .oneshot(get("http://Api.Example.com/"))
        .await
        .unwrap();
    svc.oneshot(get("http://api.example.com/")).await.unwrap();
    let stats = handle.stats("API.Example.COM").expect("one host");
    assert_eq!(stats.calls(), 2);
    let keys: Vec<_> = handle.all().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["api.example.com"]);
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

/// Two processes sharing a Redis quota, one writing the host in capitals: one quota.
#[tokio::test]
async fn a_shared_redis_quota_is_one_quota_however_the_host_is_written() -> Result<(), BoxError> {
    let quota = Quota::per_second(1)?.with_burst(1)?;
    let t = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)?
        .as_nanos();
    let remote = RedisQuota::connect(&redis_url(), quota)
        .await?
        .with_prefix(format!("host-case-{t:x}-{}", std::process::id()));
    let one = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote.clone()))
        .with_max_wait(Duration::ZERO);
    let other = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote))
        .with_max_wait(Duration::ZERO);
    let calls = Arc::new(AtomicUsize::new(0));
    one.layer(api(200, calls.clone()))
        .oneshot(get("http://api.example.com/"))
        .await?;
    let refused = other
        .layer(api(200, calls.clone()))
        .oneshot(get("http://API.EXAMPLE.COM/"))
        .await
        .unwrap_err();
    assert!(find::<RateLimited>(&*refused).is_some(), "{refused}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    Ok(())
}

/// A handle taken before `with_key(..)` looks the custom keys up as given, too.
#[tokio::test(start_paused = true)]
async fn a_handle_taken_before_with_key_keeps_the_custom_keys_case() {
    let (layer, handle) = RateLimitLayer::new(Quota::per_second(100).unwrap())
        .with_max_wait(Duration::ZERO)
        .pair();
    let layer = layer.with_key(|req: &Req| {
        req.headers()
            .get("x-tenant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer.layer(api(429, calls.clone()));
    let mut req = get("http://api.example.com/");
    req.headers_mut()
        .insert("x-tenant", "Tenant-A".parse().unwrap());
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 429);
    assert!(handle.pause("Tenant-A").is_some());
    assert!(handle.pause("tenant-a").is_none());
}
