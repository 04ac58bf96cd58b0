//! docs/guides/ratelimit.md's "Several processes: Redis" section and sturdy-redis's rustdoc on
//! `RedisQuota`, read literally: the guide's snippet, pauses published to Redis and capped
//! there, a longer pause written by another process cut by the next decision,
//! `try_paused`/`try_clear_pause`, and a hung Redis (bounded, let through by default, failed
//! with `OnStoreError::Fail`). Also the guide's handle snippet and a closure key. Real Redis.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::core::BoxError;
use sturdy::ratelimit::{OnStoreError, Quota, RateLimitLayer};
use sturdy::redis::RedisQuota;
use tower::{service_fn, Layer, ServiceExt};

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

fn unique(what: &str) -> String {
    let t = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("words8-{what}-{t:x}-{}", std::process::id())
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

/// The guide's snippet, as written: `quota` is used twice.
#[tokio::test]
async fn the_guides_redis_snippet_compiles_and_shares_a_quota() -> Result<(), BoxError> {
    let url = redis_url();
    let url = url.as_str();
    let quota = Quota::per_second(1)?.with_burst(1)?;
    let remote = RedisQuota::connect(url, quota)
        .await?
        .with_prefix(unique("snippet"));
    let layer = RateLimitLayer::new(quota).with_remote(Arc::new(remote.clone()));
    let layer = layer.with_max_wait(Duration::ZERO);

    // Two "processes": two layers, one Redis quota.
    let other = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote))
        .with_max_wait(Duration::ZERO);
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    layer
        .layer(api)
        .oneshot(get("http://api.example.com/"))
        .await?;
    let refused = other
        .layer(api)
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap_err();
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*refused).is_some(),
        "{refused}"
    );
    Ok(())
}

/// "Pauses are published to Redis and capped there too (`RedisQuota::with_max_pause`, 5
/// minutes by default)": a 429 asking for 10 minutes pauses every process for 5.
#[tokio::test]
async fn a_servers_long_pause_is_published_to_redis_capped_at_5_minutes() {
    let quota = Quota::per_second(100).unwrap();
    let remote = RedisQuota::connect(&redis_url(), quota)
        .await
        .unwrap()
        .with_prefix(unique("publish"));
    let layer = RateLimitLayer::new(quota).with_remote(Arc::new(remote.clone()));
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(429)
                .header("retry-after", "600")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let res = layer
        .layer(api)
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let mut left = None;
    for _ in 0..20 {
        left = remote.try_paused("api.example.com").await.unwrap();
        if left.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = left.expect("the pause is published to Redis");
    assert!(
        left > Duration::from_secs(290) && left <= Duration::from_secs(300),
        "{left:?}"
    );
    // `try_clear_pause` ends it for every process and says what was left.
    let had = remote.try_clear_pause("api.example.com").await.unwrap();
    assert!(
        had.is_some_and(|d| d <= Duration::from_secs(300)),
        "{had:?}"
    );
    assert_eq!(remote.try_paused("api.example.com").await.unwrap(), None);
    assert_eq!(
        remote.try_clear_pause("api.example.com").await.unwrap(),
        None
    );
}

/// "a longer one written by another process is cut to it by the next decision"
#[tokio::test]
async fn a_longer_pause_written_by_another_process_is_cut_by_the_next_decision() {
    let quota = Quota::per_second(100).unwrap();
    let prefix = unique("cut");
    let lenient = RedisQuota::connect(&redis_url(), quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone())
        .with_max_pause(Duration::from_secs(3600));
    lenient
        .try_pause("k", Duration::from_secs(1800))
        .await
        .unwrap();
    let left = lenient.try_paused("k").await.unwrap().unwrap();
    assert!(left > Duration::from_secs(1700), "{left:?}");

    let strict = RedisQuota::connect(&redis_url(), quota)
        .await
        .unwrap()
        .with_prefix(prefix);
    // "never more than the cap", even before a decision.
    let seen = strict.try_paused("k").await.unwrap().unwrap();
    assert!(seen <= Duration::from_secs(300), "{seen:?}");
    let _ = strict.try_reserve("k", Duration::ZERO).await.unwrap();
    // Now the key itself is cut: the lenient process sees the cap too.
    let after = lenient.try_paused("k").await.unwrap().unwrap();
    assert!(after <= Duration::from_secs(300), "{after:?}");
}

/// A Redis that accepts connections and never answers.
async fn hung_redis() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    format!("redis://{addr}/")
}

/// A TCP proxy to the real Redis that can be made to hang: once `hang` is set, nothing more is
/// forwarded either way (the connections stay open).
async fn hangable_redis() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::AtomicBool;
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let hang = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = hang.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut r, mut w) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(sr) as _, Box::new(cw) as _),
            ] {
                let h = h.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if h.load(std::sync::atomic::Ordering::SeqCst) {
                            continue;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (format!("redis://{addr}/"), hang)
}

/// "a Redis that is down or hung gives a clear error, never a hang": connecting to a Redis that
/// never answers ends with an error that says so (after 2 s: see the report).
#[tokio::test]
async fn connecting_to_a_hung_redis_ends_with_a_clear_error() {
    let url = hung_redis().await;
    let t0 = tokio::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        RedisQuota::connect(&url, Quota::per_second(10).unwrap()),
    )
    .await
    .expect("connect hangs");
    let e = r.unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    assert!(e.to_string().contains("did not answer"), "{e}");
}

/// "Every operation has a timeout \[1 s\]: a Redis that is down or hung gives a clear error,
/// never a hang. What the rate limiter then does is its `with_on_store_error` choice (let calls
/// through by default, or fail them)." Redis hangs after the connection was made.
#[tokio::test]
async fn a_redis_that_hangs_is_bounded_by_1s_let_through_by_default_and_failed_on_request() {
    let quota = Quota::per_second(10).unwrap();
    let (url, hang) = hangable_redis().await;
    let remote = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(unique("hung"));
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let api = service_fn(move |_r: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    });
    let allow = RateLimitLayer::new(quota).with_remote(Arc::new(remote.clone()));
    allow
        .layer(api.clone())
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    hang.store(true, Ordering::SeqCst);
    let t1 = tokio::time::Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(3),
        allow
            .layer(api.clone())
            .oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("a hung Redis holds the call");
    assert!(res.is_ok(), "let through by default: {res:?}");
    let took = t1.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "bounded by the 1 s timeout: {took:?}"
    );

    let fail = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote.with_timeout(Duration::from_millis(100))))
        .with_on_store_error(OnStoreError::Fail);
    let err = tokio::time::timeout(
        Duration::from_secs(2),
        fail.layer(api).oneshot(get("http://api.example.com/")),
    )
    .await
    .expect("a hung Redis holds the call")
    .unwrap_err();
    assert!(!err.to_string().is_empty());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the failed call was not sent"
    );
}

/// The guide's handle snippet compiles and reads as commented.
#[tokio::test(start_paused = true)]
async fn the_guides_handle_snippet_reads_pauses_and_the_pace() {
    let (layer, handle) = RateLimitLayer::adaptive_only().pair();
    let left: Option<Duration> = handle.pause("api.example.com"); // Option<Duration> left
    assert_eq!(left, None);
    assert!(handle.paused().is_empty()); // every paused key
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(
            Response::builder()
                .status(429)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    });
    let res = layer
        .layer(api)
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let p = handle
        .pause("api.example.com")
        .expect("paused by a bare 429");
    assert!(
        p > Duration::from_millis(900) && p <= Duration::from_secs(1),
        "{p:?}"
    );
    assert_eq!(handle.paused().len(), 1);
    assert_eq!(handle.waiting("api.example.com"), 0); // calls in line
    assert_eq!(
        handle.learned_pace("api.example.com"),
        Some(Duration::from_millis(125))
    );
    assert!(handle.clear_pause("api.example.com").is_some()); // ends it now
    assert_eq!(handle.pause("api.example.com"), None);
    assert_eq!(
        handle.learned_pace("api.example.com"),
        None,
        "clear_pause forgets the pace"
    );
}

/// "`.with_key(|req: &Request<B>| token_of(req))` for per-credential quotas".
#[tokio::test(start_paused = true)]
async fn a_closure_key_gives_per_credential_quotas() {
    fn token_of<B>(req: &Request<B>) -> String {
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
    let layer = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_max_wait(Duration::ZERO)
        .with_key(|req: &Request<Full<Bytes>>| token_of(req));
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let svc = layer.layer(api);
    let with = |t: &str| {
        Request::get("http://api.example.com/")
            .header("authorization", t)
            .body(Full::default())
            .unwrap()
    };
    svc.clone().oneshot(with("a")).await.unwrap();
    svc.clone().oneshot(with("b")).await.unwrap();
    assert!(svc.clone().oneshot(with("a")).await.is_err());
}

/// A TCP proxy to the real Redis that counts the commands' writes from client to server.
async fn counting_redis() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let ups = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let u = ups.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let u = u.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    u.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (format!("redis://{addr}/"), ups)
}

/// "One Lua script per decision (one round trip)": a call through a layer with a Redis quota
/// costs one round trip once the scripts are loaded.
#[tokio::test]
async fn a_decision_is_one_round_trip() {
    let (url, ups) = counting_redis().await;
    let quota = Quota::per_second(1000).unwrap();
    let remote = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(unique("trip"));
    let api = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let svc = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote))
        .layer(api);
    svc.clone()
        .oneshot(get("http://api.example.com/"))
        .await
        .unwrap();
    for _ in 0..5 {
        let before = ups.load(Ordering::SeqCst);
        svc.clone()
            .oneshot(get("http://api.example.com/"))
            .await
            .unwrap();
        assert_eq!(ups.load(Ordering::SeqCst) - before, 1);
    }
}
