//! s54: outside tests of sturdy-redis against its rustdoc and the guides that mention Redis.

use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use sturdy_ratelimit::{Quota, Reserve};
use sturdy_redis::{RedisConnection, RedisQuota, RedisStreamQueue};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};

fn url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn unique(tag: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let n = h.finish();
    format!("s54:{tag}:{n}:{}", std::process::id())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A throwaway redis-server of this test's own; killed (by its pid) when dropped.
struct OwnRedis {
    child: Child,
    port: u16,
}

impl OwnRedis {
    async fn start() -> Option<Self> {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--bind", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let this = Self { child, port };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Some(this);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quota_1() -> Quota {
    Quota::per_second(1).unwrap().with_burst(1).unwrap()
}

async fn granted(q: &RedisQuota, key: &str) -> bool {
    matches!(
        q.try_reserve(key, Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    )
}

#[tokio::test]
async fn s54_connect_refused_names_cause_and_hides_password() {
    let port = free_port();
    let url = format!("redis://:s54Hunter2Secret@127.0.0.1:{port}/");
    let t0 = Instant::now();
    let err = RedisConnection::connect(&url).await.err().unwrap();
    let text = format!("{err} / {err:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(!text.contains("s54Hunter2Secret"), "{text}");
    assert!(!text.contains(&url), "{text}");
    let err = RedisQuota::connect(&url, quota_1()).await.err().unwrap();
    let text = format!("{err} / {err:?}");
    assert!(!text.contains("s54Hunter2Secret"), "{text}");
    let err = sturdy_redis::RedisIdempotencyStore::connect(&url)
        .await
        .err()
        .unwrap();
    assert!(!format!("{err} / {err:?}").contains("s54Hunter2Secret"));
    let err = RedisStreamQueue::connect(&url, "s54").await.err().unwrap();
    assert!(!format!("{err} / {err:?}").contains("s54Hunter2Secret"));
}

#[tokio::test]
async fn s54_wrong_password_hides_password() {
    let Some(base) = url() else { return };
    let url = base.replacen("redis://", "redis://:s54WrongPassw0rd@", 1);
    let res = RedisConnection::connect(&url).await;
    if let Err(err) = res {
        let text = format!("{err} / {err:?}");
        assert!(!text.contains("s54WrongPassw0rd"), "{text}");
    }
}

#[tokio::test]
async fn s54_hung_listener_connect_is_bounded() {
    // Accepts connections and never answers: connecting must end within its bound (2 s).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let t0 = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(8),
        RedisConnection::connect(&format!("redis://:pw54@127.0.0.1:{port}/")),
    )
    .await
    .expect("connect to a hung server must not hang");
    let err = res.err().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    let text = err.to_string();
    assert!(text.contains("could not connect to Redis"), "{text}");
    assert!(!text.contains("pw54"), "{text}");
    hold.abort();
}

#[tokio::test]
async fn s54_quota_one_slot_then_denied_and_keys_apart() {
    let Some(url) = url() else { return };
    let q = RedisQuota::connect(&url, quota_1())
        .await
        .unwrap()
        .with_prefix(unique("q"));
    assert!(granted(&q, "a").await);
    match q.try_reserve("a", Duration::ZERO).await.unwrap() {
        Reserve::Denied { retry_after } => {
            assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}");
        }
        other => panic!("{other:?}"),
    }
    // Odd keys: empty, braces, huge, unicode: each is a limiter of its own.
    let huge = "k".repeat(100_000);
    for key in ["", "{", "}", "{}", "t}:{c", "a:{b}", "ключ", huge.as_str()] {
        assert!(granted(&q, key).await, "first for {key:.20}");
        assert!(!granted(&q, key).await, "second for {key:.20}");
    }
}

#[tokio::test]
async fn s54_quota_brace_prefix_key_do_not_collide() {
    // docs: prefix `p` with key `t}:{c` would otherwise be prefix `p:{t}` with key `c`.
    let Some(url) = url() else { return };
    let p = unique("p");
    let conn = RedisConnection::connect(&url).await.unwrap();
    let a = RedisQuota::new(conn.clone(), quota_1()).with_prefix(p.clone());
    let b = RedisQuota::new(conn, quota_1()).with_prefix(format!("{p}:{{t}}"));
    assert!(granted(&a, "t}:{c").await);
    assert!(granted(&b, "c").await, "two limiters shared one slot");
}

#[tokio::test]
async fn s54_pause_capped_and_cleared() {
    let Some(url) = url() else { return };
    let q = RedisQuota::connect(&url, quota_1())
        .await
        .unwrap()
        .with_prefix(unique("pause"));
    assert_eq!(q.try_paused("k").await.unwrap(), None);
    assert_eq!(q.try_clear_pause("k").await.unwrap(), None);
    q.try_pause("k", Duration::MAX).await.unwrap();
    let left = q.try_paused("k").await.unwrap().expect("paused");
    assert!(left <= Duration::from_secs(300), "{left:?}");
    assert!(left > Duration::from_secs(290), "{left:?}");
    // A shorter pause never cuts a longer one.
    q.try_pause("k", Duration::from_millis(10)).await.unwrap();
    assert!(q.try_paused("k").await.unwrap().unwrap() > Duration::from_secs(290));
    let had = q
        .try_clear_pause("k")
        .await
        .unwrap()
        .expect("had time left");
    assert!(had <= Duration::from_secs(300), "{had:?}");
    assert_eq!(q.try_paused("k").await.unwrap(), None);
    // Zero pause: nothing to share.
    q.try_pause("z", Duration::ZERO).await.unwrap();
    // try_pause: "A `duration` of zero pauses nothing (nothing is written)".
    assert_eq!(q.try_paused("z").await.unwrap(), None);
    // "one under a millisecond pauses for a millisecond".
    q.try_pause("u", Duration::from_micros(300)).await.unwrap();
    let u = q.try_paused("u").await.unwrap();
    assert!(u.is_none_or(|d| d <= Duration::from_millis(1)), "{u:?}");
}

#[tokio::test]
async fn s54_max_pause_zero_shares_no_pause_and_removes_found() {
    let Some(url) = url() else { return };
    let p = unique("mp0");
    let conn = RedisConnection::connect(&url).await.unwrap();
    let writer = RedisQuota::new(conn.clone(), quota_1()).with_prefix(p.clone());
    let zero = RedisQuota::new(conn, quota_1())
        .with_prefix(p)
        .with_max_pause(Duration::ZERO);
    zero.try_pause("k", Duration::from_secs(10)).await.unwrap();
    assert_eq!(writer.try_paused("k").await.unwrap(), None);
    writer
        .try_pause("k", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(writer.try_paused("k").await.unwrap().is_some());
    // "ones found are removed" by the next decision or pause.
    let _ = zero.try_reserve("k", Duration::ZERO).await.unwrap();
    assert_eq!(writer.try_paused("k").await.unwrap(), None);
}

#[tokio::test]
async fn s54_smaller_cap_cuts_longer_pause() {
    let Some(url) = url() else { return };
    let p = unique("cut");
    let conn = RedisConnection::connect(&url).await.unwrap();
    let big = RedisQuota::new(conn.clone(), quota_1())
        .with_prefix(p.clone())
        .with_max_pause(Duration::from_secs(3600));
    let small = RedisQuota::new(conn, quota_1())
        .with_prefix(p)
        .with_max_pause(Duration::from_secs(2));
    big.try_pause("k", Duration::from_secs(3000)).await.unwrap();
    assert!(big.try_paused("k").await.unwrap().unwrap() > Duration::from_secs(2000));
    let _ = small.try_reserve("k", Duration::ZERO).await.unwrap();
    let left = big.try_paused("k").await.unwrap();
    assert!(left.is_none_or(|d| d <= Duration::from_secs(2)), "{left:?}");
    // try_paused itself: never more than the cap.
    big.try_pause("j", Duration::from_secs(3000)).await.unwrap();
    let seen = small.try_paused("j").await.unwrap();
    assert!(seen.is_none_or(|d| d <= Duration::from_secs(2)), "{seen:?}");
}

#[tokio::test]
async fn s54_release_gives_slot_back() {
    let Some(url) = url() else { return };
    let q = RedisQuota::connect(&url, Quota::per_second(1).unwrap().with_burst(1).unwrap())
        .await
        .unwrap()
        .with_prefix(unique("rel"));
    assert!(granted(&q, "k").await);
    assert!(!granted(&q, "k").await);
    assert!(q.try_release("k").await.unwrap());
    assert!(granted(&q, "k").await, "the slot given back is free again");
    // Never before now: a fresh key has nothing to give back.
    assert!(!q.try_release("fresh").await.unwrap());
    assert!(granted(&q, "fresh").await);
}

#[tokio::test]
async fn s54_duration_max_quota_and_waits() {
    let Some(url) = url() else { return };
    let quota = Quota::new(1, Duration::MAX);
    let Ok(quota) = quota else { return };
    let q = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(unique("max"))
        .with_timeout(Duration::MAX)
        .with_max_pause(Duration::MAX);
    assert!(matches!(
        q.try_reserve("k", Duration::MAX).await.unwrap(),
        Reserve::Granted { .. }
    ));
    let second = q.try_reserve("k", Duration::ZERO).await.unwrap();
    assert!(matches!(second, Reserve::Denied { .. }), "{second:?}");
    q.try_pause("k", Duration::MAX).await.unwrap();
    assert!(q.try_paused("k").await.unwrap().is_some());
}

#[tokio::test]
async fn s54_stopped_server_quota_times_out_then_recovers() {
    let Some(own) = OwnRedis::start().await else {
        return;
    };
    let q = RedisQuota::connect(&own.url(), quota_1())
        .await
        .unwrap()
        .with_prefix(unique("stop"))
        .with_timeout(Duration::from_millis(200));
    assert!(granted(&q, "k").await);
    own.signal("-STOP");
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), q.try_reserve("x", Duration::ZERO))
        .await
        .expect("a hung Redis must not hang the caller");
    assert!(res.is_err(), "{res:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    own.signal("-CONT");
    // Reconnects / continues by itself.
    let mut ok = false;
    for _ in 0..30 {
        if let Ok(Reserve::Granted { .. }) = q.try_reserve("y", Duration::ZERO).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the quota works again after the server resumed");
}

#[tokio::test]
async fn s54_killed_server_errors_then_restart_recovers() {
    let Some(mut own) = OwnRedis::start().await else {
        return;
    };
    let port = own.port;
    let q = RedisQuota::connect(&own.url(), quota_1())
        .await
        .unwrap()
        .with_prefix(unique("kill"))
        .with_timeout(Duration::from_millis(300));
    assert!(granted(&q, "k").await);
    let _ = own.child.kill();
    let _ = own.child.wait();
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), q.try_reserve("x", Duration::ZERO))
        .await
        .expect("no hang");
    assert!(res.is_err());
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // Restart on the same port.
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    own.child = child;
    let mut ok = false;
    for _ in 0..40 {
        if let Ok(Reserve::Granted { .. }) = q.try_reserve("y", Duration::ZERO).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the same RedisQuota works again after a restart");
}

#[tokio::test]
async fn s54_stream_names_refused() {
    let Some(url) = url() else { return };
    let err = RedisStreamQueue::connect(&url, "").await.err().unwrap();
    assert!(!err.to_string().is_empty());
    let err = RedisStreamQueue::connect(&url, "abc}def")
        .await
        .err()
        .unwrap();
    assert!(!err.to_string().is_empty());
    assert!(
        RedisStreamQueue::connect(&url, format!("{{{}}}", unique("ok")))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn s54_stream_backlog_full_and_dedup() {
    let Some(url) = url() else { return };
    let q = RedisStreamQueue::connect(&url, unique("bl"))
        .await
        .unwrap()
        .with_max_backlog(2);
    let ttl = Duration::from_secs(60);
    let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::from_static(b"{}"));
    assert_eq!(q.push(ev("1"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(ev("1"), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(q.push(ev("2"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(ev("3"), ttl).await.unwrap(), Push::Full);
    // A full queue did not remember "3": once room is made it is taken. (Not checked here.)
    assert_eq!(q.push(ev("3"), ttl).await.unwrap(), Push::Full);
    // Duration::MAX and zero dedup TTLs are accepted.
    let q2 = RedisStreamQueue::connect(&url, unique("ttl"))
        .await
        .unwrap();
    assert_eq!(
        q2.push(ev("a"), Duration::MAX).await.unwrap(),
        Push::Enqueued
    );
    assert_eq!(
        q2.push(ev("a"), Duration::MAX).await.unwrap(),
        Push::Duplicate
    );
    let r = q2.push(ev("b"), Duration::ZERO).await;
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test]
async fn s54_stream_backlog_zero_is_at_least_one() {
    let Some(url) = url() else { return };
    let q = RedisStreamQueue::connect(&url, unique("bl0"))
        .await
        .unwrap()
        .with_max_backlog(0);
    let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::from_static(b"{}"));
    let ttl = Duration::from_secs(60);
    assert_eq!(q.push(ev("1"), ttl).await.unwrap(), Push::Enqueued);
    assert_eq!(q.push(ev("2"), ttl).await.unwrap(), Push::Full);
}

#[tokio::test]
async fn s54_dead_letters_empty_and_unknown_entries() {
    let Some(url) = url() else { return };
    let q = RedisStreamQueue::connect(&url, unique("dl")).await.unwrap();
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    assert!(q.dead_letters(None, 5000).await.unwrap().is_empty());
    assert!(!q.replay_dead_letter("1-1").await.unwrap());
    assert!(!q.discard_dead_letter("1-1").await.unwrap());
}

#[test]
fn s54_backends_are_send_sync_clone() {
    fn check<T: Send + Sync + 'static>() {}
    check::<RedisQuota>();
    check::<RedisConnection>();
    check::<RedisStreamQueue>();
    check::<sturdy_redis::RedisIdempotencyStore>();
    fn clone<T: Clone>() {}
    clone::<RedisConnection>();
}

type Req = http::Request<http_body_util::Full<Bytes>>;
type Res = http::Response<http_body_util::Full<Bytes>>;

fn counting_handler(
    n: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> impl tower::Service<Req, Response = Res, Error = std::convert::Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Req| {
        let n = n.clone();
        async move {
            let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(201)
                    .body(http_body_util::Full::new(Bytes::from(format!("run {k}"))))
                    .unwrap(),
            )
        }
    })
}

fn post(key: &str) -> Req {
    http::Request::post("http://api.test/orders")
        .header("idempotency-key", key)
        .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn s54_idempotency_replay_then_store_down_is_503() {
    use http_body_util::BodyExt;
    use sturdy_idempotency::server::IdempotencyLayer;
    use tower::{Layer, ServiceExt};
    let Some(own) = OwnRedis::start().await else {
        return;
    };
    let store = sturdy_redis::RedisIdempotencyStore::connect(&own.url())
        .await
        .unwrap()
        .with_prefix(unique("idem"))
        .with_timeout(Duration::from_millis(200));
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let svc = IdempotencyLayer::new(store, |_: &http::request::Parts| "client".to_string())
        .layer(counting_handler(runs.clone()));
    let key = "k".repeat(200);
    let a = svc.clone().oneshot(post(&key)).await.unwrap();
    assert_eq!(a.status(), 201);
    let a = a.into_body().collect().await.unwrap().to_bytes();
    let b = svc.clone().oneshot(post(&key)).await.unwrap();
    assert_eq!(b.status(), 201);
    assert_eq!(b.into_body().collect().await.unwrap().to_bytes(), a);
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);

    own.signal("-STOP");
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(post("new54")))
        .await
        .expect("a hung store must not hang the request")
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("idempotency-store-unavailable"), "{body}");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    own.signal("-CONT");
}

#[tokio::test]
async fn s54_ratelimit_store_down_allow_by_default_fail_on_request() {
    use std::sync::Arc;
    use sturdy_ratelimit::{OnStoreError, RateLimitLayer};
    use tower::{Layer, ServiceExt};
    let Some(own) = OwnRedis::start().await else {
        return;
    };
    let quota = Quota::per_second(100).unwrap();
    let remote = RedisQuota::connect(&own.url(), quota)
        .await
        .unwrap()
        .with_prefix(unique("rlstop"))
        .with_timeout(Duration::from_millis(150));
    let remote = Arc::new(remote);
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let allow = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .layer(counting_handler(runs.clone()));
    let fail = RateLimitLayer::new(quota)
        .with_remote(remote)
        .with_on_store_error(OnStoreError::Fail)
        .layer(counting_handler(runs.clone()));
    assert_eq!(
        allow.clone().oneshot(post("x")).await.unwrap().status(),
        201
    );
    own.signal("-STOP");
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), allow.clone().oneshot(post("x")))
        .await
        .expect("no hang");
    assert_eq!(res.unwrap().status(), 201, "Allow lets the call through");
    let res = tokio::time::timeout(Duration::from_secs(5), fail.clone().oneshot(post("x")))
        .await
        .expect("no hang");
    let err = res.expect_err("Fail fails the call");
    assert!(!err.to_string().is_empty());
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
    own.signal("-CONT");
}
