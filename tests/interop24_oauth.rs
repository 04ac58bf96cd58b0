//! Interop: the OAuth2 token cache against oauth2-mock-server and the odd token endpoint in
//! front of it, with callers dropped mid-wait and runtimes dropped mid-request.
use crate::interop_common;
use std::time::Duration;

use futures_util::future::join_all;
use interop_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::classify::delivery;
use sturdy::core::{Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{Service, ServiceExt};

const ODD: &str = "STURDY_INTEROP_ODD_TOKEN_URL";
const API: &str = "STURDY_INTEROP_API_URL";
const SECRET: &str = "interop-secret";

fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-i24-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn odd_count(odd: &str, client: &str) -> u64 {
    get_json(&format!("{odd}/count?client={client}")).await["requests"]
        .as_u64()
        .unwrap()
}

/// docs/guides/auth.md: "The token request runs as a task of its own ..., so a caller that gives
/// up does not cancel it for the others". 30 first callers under `Buffer`, each dropped at a
/// different moment (0 to 29 ms) while the token endpoint takes 300 ms, then aborted tasks too:
/// one token request in all, and a later call gets the token it fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_callers_dropped_mid_wait_make_one_token_request() {
    let odd = peer_or_skip!(ODD);
    let api = peer_or_skip!(API);
    let id = unique("slow300");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http());
    let svc = Buffer::new(client, 64);
    let url = format!("{api}/whoami");
    let dropped = (0..30u64).map(|i| {
        let mut svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_millis(i), async {
                svc.ready().await?.call(get(&url)).await
            })
            .await;
        })
    });
    join_all(dropped).await;
    let aborted: Vec<_> = (0..5)
        .map(|_| {
            let mut svc = svc.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let _ = async { svc.ready().await?.call(get(&url)).await }.await;
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for t in aborted {
        t.abort();
    }
    let start = Instant::now();
    let mut last = svc.clone();
    let res = bounded(
        Duration::from_secs(5),
        "the call after the dropped ones",
        async { last.ready().await?.call(get(&url)).await },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    // The request started by the first caller was still running: no new 300 ms wait.
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(odd_count(&odd, &id).await, 1, "one token request");
}

/// docs/guides/auth.md: "if that runtime shuts down mid-request, the next caller starts a new
/// request". A first call on a runtime of its own is waiting for a 400 ms token request when
/// that runtime is dropped; a call on another runtime then gets a token from a new request,
/// within about one token request's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_dropped_mid_token_request_next_caller_starts_anew() {
    let odd = peer_or_skip!(ODD);
    let api = peer_or_skip!(API);
    let id = unique("slow400");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http());
    let url = format!("{api}/whoami");
    {
        let client = client.clone();
        let url = url.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_millis(100), client.oneshot(get(&url)))
                    .await;
            });
            // The token request is a task of this runtime: it goes with it.
            drop(rt);
        })
        .join()
        .unwrap();
    }
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(15),
        "a call after the token request's runtime was dropped",
        client.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    let took = start.elapsed();
    assert_eq!(res.status(), 200);
    eprintln!(
        "after a dropped runtime: {took:?}, {} token requests",
        odd_count(&odd, &id).await
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

/// docs/guides/auth.md: "A cached token needs no wait, so `Duration::ZERO` means 'the cached
/// token or fail at once'", failing with kind `Timeout`, not sent, naming the token endpoint;
/// "The token request goes on, and later callers share it."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_token_timeout_fails_at_once_and_the_request_goes_on() {
    let odd = peer_or_skip!(ODD);
    let api = peer_or_skip!(API);
    let id = unique("slow200");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .without_retry()
        .with_auth(AuthLayer::oauth2(tokens).with_token_timeout(Duration::ZERO))
        .build(http());
    let url = format!("{api}/whoami");
    let start = Instant::now();
    let err = client
        .clone()
        .oneshot(post(&url, "{}"))
        .await
        .expect_err("no cached token");
    let took = start.elapsed();
    eprintln!("zero token timeout: {err}");
    assert!(took < Duration::from_millis(100), "{took:?}");
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("a sturdy error: {}", chain(&*err)));
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{e}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let text = err.to_string();
    assert!(text.contains(&format!("{odd}/token")), "{text}");
    assert!(text.contains("not sent"), "{text}");
    assert!(!text.contains("may have been processed"), "{text}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let res = client.clone().oneshot(get(&url)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(odd_count(&odd, &id).await, 1, "one token request");
}

/// docs/guides/auth.md: "A call that waits for a token holds that ready service, with what it
/// reserved (a `ConcurrencyLimit` permit, a `Buffer` slot) ... and drops it (and the reservation)
/// if the call is dropped first." `AuthLayer` alone over `Buffer(1)` over `ConcurrencyLimit(1)`:
/// ten callers dropped while they wait for a 400 ms first token; then a call goes through, and
/// so do five more at once: nothing reserved was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_token_waiters_give_back_buffer_slots_and_permits() {
    let odd = peer_or_skip!(ODD);
    let api = peer_or_skip!(API);
    let id = unique("slow400");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let inner = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(http());
    let svc = tower::ServiceBuilder::new()
        .layer(AuthLayer::oauth2(tokens))
        .service(inner);
    let url = format!("{api}/whoami");
    let dropped = (0..10u64).map(|i| {
        let mut svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(20 + 10 * i), async {
                svc.ready().await?.call(get(&url)).await
            })
            .await
            .is_err()
        })
    });
    for d in join_all(dropped).await {
        assert!(d.unwrap(), "dropped while waiting");
    }
    let mut one = svc.clone();
    let res = bounded(
        Duration::from_secs(5),
        "a call after the dropped waiters",
        async { one.ready().await?.call(get(&url)).await },
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    drop(res);
    let more = (0..5).map(|_| {
        let mut svc = svc.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let res = svc.ready().await?.call(get(&url)).await?;
            Ok::<_, sturdy::core::BoxError>(res.status().as_u16())
        })
    });
    for r in bounded(Duration::from_secs(5), "five more", join_all(more)).await {
        assert_eq!(r.unwrap().unwrap_or_else(|e| panic!("{}", chain(&*e))), 200);
    }
    assert_eq!(odd_count(&odd, &id).await, 1, "one token request");
}

/// docs/guides/auth.md: "a failed refresh ... backs off (1 s doubling to 60 s) instead of
/// hammering the endpoint, and a caller with no valid token during the backoff gets the last
/// error at once". Against the odd token endpoint answering 503: a new token request 1 s after
/// the first failure, then not before 2 s after the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_backoff_doubles() {
    let odd = peer_or_skip!(ODD);
    let api = peer_or_skip!(API);
    let id = unique("down");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let svc = tower::Layer::layer(&AuthLayer::oauth2(tokens), http());
    let url = format!("{api}/whoami");
    let call = || {
        let svc = svc.clone();
        let url = url.clone();
        async move { svc.oneshot(get(&url)).await.unwrap_err() }
    };
    let t0 = Instant::now();
    call().await;
    assert_eq!(odd_count(&odd, &id).await, 1);
    tokio::time::sleep_until(t0 + Duration::from_millis(1150)).await;
    call().await;
    let second = Instant::now();
    assert_eq!(odd_count(&odd, &id).await, 2, "a new request after 1 s");
    call().await;
    assert_eq!(odd_count(&odd, &id).await, 2, "at once during the backoff");
    tokio::time::sleep_until(second + Duration::from_millis(1300)).await;
    let t = Instant::now();
    let e = call().await;
    assert!(t.elapsed() < Duration::from_millis(100), "at once");
    assert_eq!(
        odd_count(&odd, &id).await,
        2,
        "still backing off (2 s): {e}"
    );
    tokio::time::sleep_until(second + Duration::from_millis(2200)).await;
    call().await;
    assert_eq!(odd_count(&odd, &id).await, 3, "a new request after 2 s");
}

/// docs/RELIABILITY.md: "request bodies kept for a replay | 1 MiB (retry, auth's 401 replay);
/// larger or unbounded ones are sent once". A 1.5 MiB POST to an API that answers 401 to every
/// token: sent once, the 401 returned as it is; a small POST then goes with a new token, which
/// the API refuses too before accepting anything with it: kept, and the 401 not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_meeting_a_401_is_sent_once() {
    let oauth = peer_or_skip!("STURDY_INTEROP_OAUTH_URL");
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!("STURDY_INTEROP_STATS_URL");
    let id = unique("big401");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .build(http());
    let big = vec![b'x'; 1536 * 1024];
    let req = http::Request::post(format!("{api}/always-401"))
        .header("idempotency-key", "big-401")
        .body(http_body_util::Full::from(big))
        .unwrap();
    let res = bounded(
        Duration::from_secs(10),
        "a large POST meeting 401",
        client.clone().oneshot(req),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 401);
    let s = get_json(&format!("{stats_url}/stats?client={id}")).await;
    eprintln!("large body, 401: {s}");
    assert_eq!(s["api_401"].as_u64(), Some(1), "sent once: {s}");
    let res = client
        .clone()
        .oneshot(post(&format!("{api}/always-401"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let s = get_json(&format!("{stats_url}/stats?client={id}")).await;
    // The small one came with a second token, refused as the first was before the API accepted
    // any request with it: that token is kept for a second and its 401 returned, not replayed
    // (an API that refuses every token costs a token request per hold, not per call).
    assert_eq!(
        s["api_401"].as_u64(),
        Some(2),
        "the small one sent once, with a new token: {s}"
    );
}

/// Every layer of `ClientBuilder` at once (coalescing, hedging, the adaptive limit, OAuth2 with
/// 2 s tokens, a version pin) under `Buffer`, `Timeout` and `ConcurrencyLimit(4)`, driven for
/// 3 s by 8 tasks each keeping its service (`ready().await?.call(req)`), against the real
/// authorization server and the JWT-checking API: every call answered 200, and tokens are
/// refreshed before they expire ("reused until expiry - min(60 s, lifetime / 2)"), a few in all,
/// not one per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_stack_under_buffer_timeout_and_limit_with_expiring_tokens() {
    let oauth = peer_or_skip!("STURDY_INTEROP_OAUTH_URL");
    let api = peer_or_skip!(API);
    let stats_url = peer_or_skip!("STURDY_INTEROP_STATS_URL");
    let id = unique("ttl2");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let client = ClientBuilder::new()
        .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
        .with_hedge(sturdy::hedge::HedgeLayer::new())
        .with_adaptive_concurrency(sturdy::concurrency::AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::oauth2(tokens))
        .with_version(sturdy::version::VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(http());
    let svc = tower::ServiceBuilder::new()
        .buffer(64)
        .timeout(Duration::from_secs(5))
        .concurrency_limit(4)
        .service(client);
    let end = Instant::now() + Duration::from_secs(3);
    let tasks = (0..8).map(|i| {
        let mut svc = svc.clone();
        let url = format!("{api}/whoami");
        tokio::spawn(async move {
            let mut statuses = vec![];
            while Instant::now() < end {
                let req = if i % 2 == 0 {
                    get(&url)
                } else {
                    post(&url, "{}")
                };
                let r = async {
                    let res = svc.ready().await?.call(req).await?;
                    Ok::<_, sturdy::core::BoxError>(res.status().as_u16())
                }
                .await;
                statuses.push(r.map_err(|e| chain(&*e)));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        })
    });
    let all: Vec<_> = bounded(Duration::from_secs(15), "8 tasks for 3 s", join_all(tasks))
        .await
        .into_iter()
        .flat_map(|r| r.unwrap())
        .collect();
    let failed: Vec<_> = all.iter().filter(|r| **r != Ok(200)).collect();
    let s = get_json(&format!("{stats_url}/stats?client={id}")).await;
    eprintln!("{} calls, {} failed, stats {s}", all.len(), failed.len());
    assert!(failed.is_empty(), "{failed:?}");
    let issued = s["tokens"].as_u64().unwrap();
    assert!((2..=5).contains(&issued), "{s}");
    // A JWT's `exp` has whole seconds: a 2 s token issued at x.9 s is valid for 1.1 s at the
    // API, and its refresh is due 1 s after it arrived; a call in that gap meets a 401, which
    // the layer answers with a new token and one replay (every call above succeeded).
}
