//! Outside test: with a remote (Redis) quota, a key learns no pace from bare 429s (the guide:
//! "without a quota (`adaptive_only()`, the `ClientBuilder` default), a key also learns a pace").
//! Real time, loopback Redis from `STURDY_REDIS_URL`, millisecond settings.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use tower::{Layer, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_quota_learns_no_pace_from_bare_429s() {
    let Ok(url) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return;
    };
    tokio::time::timeout(Duration::from_secs(20), async move {
        let quota = Quota::per_second(10_000).unwrap();
        let remote = sturdy::redis::RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(format!("outsider2:pace:{}", std::process::id()));
        let n = Arc::new(AtomicUsize::new(0));
        let api = tower::service_fn(move |_req: Request<()>| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .status(if i == 0 { 429 } else { 200 })
                        .body(())
                        .unwrap(),
                )
            }
        });
        let svc = RateLimitLayer::new(quota)
            .with_remote(Arc::new(remote))
            .with_default_pause(Duration::from_millis(400))
            .layer(api);
        let get = || Request::get("http://redis-pace.test/").body(()).unwrap();
        svc.clone().oneshot(get()).await.unwrap();
        let t0 = tokio::time::Instant::now();
        svc.clone().oneshot(get()).await.unwrap();
        let after_pause = t0.elapsed();
        assert!(after_pause >= Duration::from_millis(350), "{after_pause:?}");
        // A learned pace would space these by 50 ms (an eighth of 400 ms).
        let t1 = tokio::time::Instant::now();
        for _ in 0..5 {
            svc.clone().oneshot(get()).await.unwrap();
        }
        assert!(
            t1.elapsed() < Duration::from_millis(150),
            "{:?}",
            t1.elapsed()
        );
    })
    .await
    .expect("bounded");
}
