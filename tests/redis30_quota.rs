//! `RedisQuota` read from docs/guides/ratelimit.md ("Several processes: Redis"), the sturdy-redis
//! rustdoc (key layout, timeouts) and docs/RELIABILITY.md ("Redis backends"): several processes
//! on one prefix, a Redis that is down, hung, restarted or cut mid-command, Redis Cluster keys
//! with braces, hostile keys and durations, and composition with tower's layers over the wire.
//! Skipped unless STURDY_REDIS_URL (STURDY_REDIS_CLUSTER_URLS for the cluster) is set; the
//! tests that kill, pause or restart Redis start their own `redis-server`.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::ratelimit::{OnStoreError, Quota, RateLimitLayer, Reserve};
use sturdy::redis::{RedisConnection, RedisQuota};
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use crate::redis30_util::{
    chain_text, client, cluster_urls, own_redis_possible, redis_url, serve, unique, CutProxy, Mode,
    OwnRedis,
};

/// Whether any `sturdy_core::Error` in `e`'s chain has `kind`.
fn has_kind(e: &(dyn std::error::Error + 'static), kind: &ErrorKind) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(s) = x.downcast_ref::<sturdy::core::Error>() {
            if s.kind() == kind {
                return true;
            }
        }
        cur = x.source();
    }
    false
}

type Calls = Arc<AtomicUsize>;

fn counting() -> (
    Calls,
    impl Service<
            Request<()>,
            Response = Response<()>,
            Error = Infallible,
            Future = impl std::future::Future<Output = Result<Response<()>, Infallible>>
                         + Send
                         + 'static,
        > + Clone
        + Send
        + 'static,
) {
    let calls = Calls::default();
    let c = calls.clone();
    let svc = service_fn(move |_req: Request<()>| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    (calls, svc)
}

fn get(host: &str) -> Request<()> {
    Request::get(format!("http://{host}/x")).body(()).unwrap()
}

/// Compile-time: the shared handles are `Send + Sync + Clone` (and `'static`), so they can be
/// kept in an `Arc`, an axum state or many tasks.
#[test]
fn redis30_handles_are_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    fn send<T: Send + 'static>() {}
    check::<RedisQuota>();
    check::<RedisConnection>();
    check::<sturdy::redis::RedisIdempotencyStore>();
    check::<sturdy::redis::RedisStreamQueue>();
    send::<sturdy::redis::RedisStreamConsumer>();
    check::<sturdy::redis::Delivery>();
    check::<sturdy::redis::DeadLetter>();
}

/// "processes that share a quota share a prefix": three "processes" (each its own connection,
/// its own `RedisQuota` and its own `RateLimitLayer`), each calling an axum app over the wire
/// through a hyper-util client from many tasks, together keep the quota as the server counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_three_processes_over_the_wire_keep_one_quota() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("procs");
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let a2 = arrivals.clone();
    let app = axum::Router::new().route(
        "/x",
        axum::routing::get(move || {
            let a = a2.clone();
            async move {
                a.lock().unwrap().push(Instant::now());
                "ok"
            }
        }),
    );
    let addr = serve(app).await;
    // 20 per second, burst 4: one every 50 ms.
    let quota = Quota::per_second(20).unwrap().with_burst(4).unwrap();
    let start = Instant::now();
    let run_for = Duration::from_millis(1200);
    let mut tasks = Vec::new();
    for _process in 0..3 {
        let remote = RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(&prefix);
        let svc = ServiceBuilder::new()
            .layer(
                RateLimitLayer::new(quota)
                    .with_remote(Arc::new(remote))
                    .with_on_store_error(OnStoreError::Fail)
                    .with_max_wait(Duration::from_millis(300)),
            )
            .service(client());
        for _ in 0..6 {
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let mut sent = 0u32;
                while start.elapsed() < run_for {
                    let req = Request::get(format!("http://{addr}/x"))
                        .body(Full::<Bytes>::default())
                        .unwrap();
                    match svc.ready().await {
                        Ok(s) => match s.call(req).await {
                            Ok(r) => {
                                assert_eq!(r.status(), StatusCode::OK);
                                sent += 1;
                            }
                            Err(e) => {
                                // Refused by the quota (a wait past max_wait) only.
                                assert!(
                                    sturdy::core::find::<sturdy::core::RateLimited>(&*e).is_some(),
                                    "{}",
                                    chain_text(&*e)
                                );
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                        },
                        Err(e) => panic!("{e}"),
                    }
                }
                sent
            }));
        }
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await.unwrap();
    }
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len() as u32, sent);
    let first = *arrivals.iter().min().unwrap();
    let last = *arrivals.iter().max().unwrap();
    let span = last - first;
    // GCRA: at most the burst plus one per interval of the span (+2 for timing at the edges).
    let allowed = 4 + (span.as_millis() / 50) as u32 + 2;
    assert!(
        sent <= allowed,
        "{sent} calls in {span:?} through three processes; the quota allows {allowed}"
    );
    assert!(sent >= 10, "the quota was not used: {sent}");
}

/// "A call that waited for a Redis slot and was dropped ... gives the slot back (`try_release`:
/// the next free slot moves back one interval)": a call cut by tower's `Timeout` while it waits
/// does not cost the next caller a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_waiting_call_cut_by_timeout_gives_its_slot_back() {
    let Some(url) = redis_url() else { return };
    let quota = Quota::new(1, Duration::from_millis(600)).unwrap();
    let remote = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(unique("release"));
    let (calls, inner) = counting();
    let layer = RateLimitLayer::new(quota)
        .with_remote(Arc::new(remote))
        .with_on_store_error(OnStoreError::Fail);
    let svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(150))
        .layer(layer.clone())
        .service(inner.clone());
    let patient = ServiceBuilder::new().layer(layer).service(inner);
    let t0 = Instant::now();
    svc.clone().oneshot(get("a.test")).await.unwrap();
    // The next slot is 600 ms away: this one is cut by the timeout while it waits.
    let e = svc.clone().oneshot(get("a.test")).await.unwrap_err();
    assert!(e.is::<tower::timeout::error::Elapsed>(), "{e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Its slot was given back: this one goes at the first free slot (600 ms), not the next.
    patient.oneshot(get("a.test")).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(
        took < Duration::from_millis(1050),
        "the dropped call's slot was lost: the third call went after {took:?}"
    );
    assert!(took >= Duration::from_millis(500), "{took:?}");
}

/// The layer under tower's `Buffer`, `ConcurrencyLimit(1)` and `Timeout`, driven as a kept
/// service from 40 tasks: nothing panics or hangs, and the calls that went stay within the
/// quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_under_buffer_limit_and_timeout_from_many_tasks() {
    let Some(url) = redis_url() else { return };
    let quota = Quota::per_second(40).unwrap().with_burst(2).unwrap();
    let remote = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(unique("compose"));
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .timeout(Duration::from_millis(400))
        .concurrency_limit(1)
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote))
                .with_on_store_error(OnStoreError::Fail),
        )
        .service(inner);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let s = svc.ready().await?;
            s.call(get("c.test")).await.map(|_| ())
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r: Result<(), BoxError> = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a task hung")
            .unwrap();
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                let text = chain_text(&*e);
                assert!(
                    e.is::<tower::timeout::error::Elapsed>()
                        || sturdy::core::find::<sturdy::core::RateLimited>(&*e).is_some(),
                    "{text}"
                );
            }
        }
    }
    let span = t0.elapsed();
    let n = calls.load(Ordering::SeqCst);
    assert_eq!(n, ok);
    let allowed = 2 + (span.as_millis() / 25) as usize + 2;
    assert!(n <= allowed, "{n} calls in {span:?}, allowed {allowed}");
    assert!(n >= 5, "{n}");
}

/// RELIABILITY.md, "Redis down or restarting": fail-closed, "the call fails at once, not sent,
/// with 'the rate-limit store failed, so the call was not sent' ... and Redis's error as its
/// source"; fail-open, the call goes through. Both within the 2.5 s the failover test allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_killed_redis_fails_closed_not_sent_or_lets_through() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = Quota::per_second(10).unwrap();
    let remote = Arc::new(RedisQuota::connect(&redis.url(), quota).await.unwrap());
    let (calls, inner) = counting();
    let closed = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(remote.clone())
                .with_on_store_error(OnStoreError::Fail),
        )
        .service(inner.clone());
    let open = ServiceBuilder::new()
        .layer(RateLimitLayer::new(quota).with_remote(remote.clone()))
        .service(inner);
    closed.clone().oneshot(get("k.test")).await.unwrap();
    redis.kill();
    // The first operation meets the dead connection (see the test after this one).
    let t = Instant::now();
    let e = closed.clone().oneshot(get("k.test")).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(delivery(&*e), Delivery::NotSent, "{}", chain_text(&*e));
    let t = Instant::now();
    let e = closed.clone().oneshot(get("k.test")).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let text = chain_text(&*e);
    assert!(
        text.contains("the rate-limit store failed, so the call was not sent"),
        "{text}"
    );
    assert!(
        text.contains("Redis cannot be reached (down, restarting or failing over)"),
        "the source should say what Redis is doing: {text}"
    );
    assert_eq!(delivery(&*e), Delivery::NotSent, "{text}");
    assert!(!text.contains("may have run"), "{text}");
    let before = calls.load(Ordering::SeqCst);
    let t = Instant::now();
    open.oneshot(get("k.test")).await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    // "Recovery without a restart of the application": the same objects work again.
    redis.restart().await;
    let t = Instant::now();
    loop {
        match closed.clone().oneshot(get("k.test")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "no recovery: {}",
                    chain_text(&*e)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// RELIABILITY.md, "Clear errors": `Connect` is "Redis cannot be reached: the command was not
/// sent"; `Transport` is "the connection broke before the answer: the command may have run".
/// Redis is SIGKILLed while idle; the next operation may find the dead connection only when it
/// writes ("broken pipe"). The client library reports that write's failure to every command on
/// the connection, sent or not, so sturdy cannot prove this one was not sent and says "may have
/// run": the safe side, never a "not sent" that could be false. Answered: either error is
/// right here, and each names its cause; the operation after it finds Redis unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_the_first_operation_after_redis_died_names_its_cause() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = Quota::per_second(10).unwrap();
    let remote = RedisQuota::connect(&redis.url(), quota).await.unwrap();
    remote.try_reserve("k", Duration::ZERO).await.unwrap();
    redis.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = remote.try_reserve("k", Duration::ZERO).await.unwrap_err();
    let text = chain_text(&*e);
    if has_kind(&*e, &ErrorKind::Connect) {
        assert!(
            text.contains("Redis cannot be reached (down, restarting or failing over)"),
            "{text}"
        );
    } else {
        assert!(has_kind(&*e, &ErrorKind::Transport), "{text}");
        assert!(text.contains("may have run"), "{text}");
    }
    let e = remote.try_reserve("k", Duration::ZERO).await.unwrap_err();
    let text = chain_text(&*e);
    assert!(
        text.contains("Redis cannot be reached (down, restarting or failing over)"),
        "{text}"
    );
}

/// RELIABILITY.md, "Redis hung (accepts, never answers)": "as above, after the timeout [1 s]".
/// A Redis held by `CLIENT PAUSE` gives a `Timeout` within the bound, never a hang; once it is
/// back, the quota works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_paused_redis_is_a_timeout_within_the_bound() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let quota = Quota::per_second(10).unwrap();
    let remote = RedisQuota::connect(&redis.url(), quota).await.unwrap();
    assert!(matches!(
        remote.try_reserve("p", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    let (_calls, inner) = counting();
    let closed = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote.clone()))
                .with_on_store_error(OnStoreError::Fail),
        )
        .service(inner);
    redis.pause(2500);
    let t = Instant::now();
    let e = closed.clone().oneshot(get("p.test")).await.unwrap_err();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    let text = chain_text(&*e);
    assert!(has_kind(&*e, &ErrorKind::Timeout), "{text}");
    assert!(
        text.contains("the rate-limit store failed, so the call was not sent"),
        "{text}"
    );
    let t = Instant::now();
    let e = remote.try_paused("p").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    assert!(has_kind(&*e, &ErrorKind::Timeout), "{}", chain_text(&*e));
    redis.unpause();
    let t = Instant::now();
    loop {
        match closed.clone().oneshot(get("p.test")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(5), "{}", chain_text(&*e));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// RELIABILITY.md, "Clear errors": a connection that broke after the command was sent is
/// `Transport`, "the connection to Redis broke before its answer, so the command may have run",
/// never `Connect` ("not sent"). Then the same quota works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_connection_cut_after_the_command_is_transport_may_have_run() {
    let Some(url) = redis_url() else { return };
    let target = crate::redis30_util::port_of(&url);
    let proxy = CutProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], target))).await;
    let quota = Quota::per_second(10).unwrap();
    let remote = RedisQuota::connect(&proxy.url(), quota)
        .await
        .unwrap()
        .with_prefix(unique("cut"));
    remote.try_reserve("k", Duration::ZERO).await.unwrap();
    proxy.set(Mode::Cut);
    let e = remote.try_reserve("k", Duration::ZERO).await.unwrap_err();
    let text = chain_text(&*e);
    assert!(has_kind(&*e, &ErrorKind::Transport), "{text}");
    assert!(
        text.contains(
            "the connection to Redis broke before its answer, so the command may have run"
        ),
        "{text}"
    );
    assert!(!text.contains("cannot be reached"), "{text}");
    proxy.set(Mode::Pass);
    let t = Instant::now();
    while remote.try_reserve("k2", Duration::ZERO).await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The key layout: "`<prefix>:{<key>}:tat`, `<prefix>:{<key>}:pause` ... one slot because the
/// hash tag `{<key>}`". Keys a `with_key` closure may return (an API token, a tenant name) can
/// hold braces; a key starting with `}` makes the tag empty, and Redis then hashes each whole
/// key to its own slot. On a Redis Cluster every operation of every such key must still work.
#[tokio::test]
async fn redis30_cluster_keys_and_prefixes_with_braces_work() {
    let Some(nodes) = cluster_urls() else { return };
    let quota = Quota::per_second(1000).unwrap();
    let keys = [
        "", "}", "}x", "}{", "{}", "{", "a}b", "{a}", "x{}", "}}{{", "{{}}", "\u{0}", ":tat",
    ];
    let prefixes = ["{}", "x{}", "}", "{", "{a}{}", ""];
    for prefix in prefixes {
        let p = format!("{}{prefix}", unique("c"));
        let remote = RedisQuota::connect_cluster(&nodes, quota)
            .await
            .unwrap()
            .with_prefix(p.clone());
        for key in keys {
            let what = format!("prefix {p:?} key {key:?}");
            let r = remote.try_reserve(key, Duration::from_secs(1)).await;
            assert!(
                matches!(r, Ok(Reserve::Granted { .. })),
                "reserve, {what}: {:?}",
                r.map_err(|e| chain_text(&*e))
            );
            remote
                .try_pause(key, Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("pause, {what}: {}", chain_text(&*e)));
            let left = remote
                .try_paused(key)
                .await
                .unwrap_or_else(|e| panic!("paused, {what}: {}", chain_text(&*e)));
            assert!(left.is_some(), "{what}");
            // A paused key refuses now, on every node.
            let r = remote.try_reserve(key, Duration::ZERO).await;
            assert!(
                matches!(r, Ok(Reserve::Denied { .. })),
                "paused, {what}: {:?}",
                r.map_err(|e| chain_text(&*e))
            );
            remote
                .try_clear_pause(key)
                .await
                .unwrap_or_else(|e| panic!("clear, {what}: {}", chain_text(&*e)));
            remote
                .try_release(key)
                .await
                .unwrap_or_else(|e| panic!("release, {what}: {}", chain_text(&*e)));
        }
    }
}

/// The key layout says an empty key "gets a hex tag instead" (`{x<hex>.}:tat`). That tag's
/// text is a key a caller can pass too: it must be another quota, not the empty key's.
#[tokio::test]
async fn redis30_the_empty_key_and_its_hex_spelling_are_two_quotas() {
    let Some(url) = redis_url() else { return };
    let port = crate::redis30_util::port_of(&url);
    let prefix = unique("hex");
    let quota = Quota::new(1, Duration::from_secs(3600)).unwrap();
    let remote = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    assert!(matches!(
        remote.try_reserve("", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    let hex: String = prefix.bytes().map(|b| format!("{b:02x}")).collect();
    let keys = crate::redis30_util::cli_at(port, &["--scan", "--pattern", &format!("{{x{hex}*")]);
    let key = keys
        .lines()
        .next()
        .expect("the empty key's tat key")
        .to_owned();
    // `{x<hex of the prefix>.<hex of the key>}:tat`: a tag a caller could spell as a key.
    let inner = key
        .strip_prefix('{')
        .and_then(|k| k.strip_suffix("}:tat"))
        .unwrap_or_else(|| panic!("layout: {key}"))
        .to_owned();
    assert!(!inner.is_empty());
    let r = remote.try_reserve(&inner, Duration::ZERO).await.unwrap();
    assert!(
        matches!(r, Reserve::Granted { .. }),
        "the key {inner:?} shares the empty key's quota ({key}): {r:?}"
    );
}

/// "processes that share a quota share a prefix": two applications on two prefixes have two
/// quotas. A key with braces (from a `with_key` closure over a client's token) under one
/// prefix must not land on another prefix's keys.
#[tokio::test]
async fn redis30_a_braced_key_does_not_reach_into_another_prefix() {
    let Some(url) = redis_url() else { return };
    let base = unique("nest");
    let quota = Quota::new(1, Duration::from_secs(3600)).unwrap();
    let a = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(base.clone());
    let b = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(format!("{base}:{{t}}"));
    // Application b's quota for key "c".
    assert!(matches!(
        b.try_reserve("c", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    // Application a, a client whose key is "t}:{c".
    let r = a.try_reserve("t}:{c", Duration::ZERO).await.unwrap();
    assert!(
        matches!(r, Reserve::Granted { .. }),
        "a key of prefix {base:?} used the quota of prefix {base:?}:{{t}}: {r:?}"
    );
}

/// Hostile keys and durations: a 64 KiB key, control characters, a wait and a pause of
/// `Duration::MAX`, a quota of one call per `Duration::MAX`. No error, no panic; the pause is at
/// most the cap.
#[tokio::test]
async fn redis30_hostile_keys_and_durations() {
    let Some(url) = redis_url() else { return };
    let big = "k".repeat(64 * 1024);
    let ctl = "a\r\n\u{0}\u{7f}b";
    let quota = Quota::new(1, Duration::MAX).unwrap().with_burst(2).unwrap();
    let remote = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(unique("hostile"));
    for key in [big.as_str(), ctl] {
        for _ in 0..2 {
            assert!(matches!(
                remote.try_reserve(key, Duration::MAX).await.unwrap(),
                Reserve::Granted { wait } if wait.is_zero()
            ));
        }
        let r = remote.try_reserve(key, Duration::ZERO).await.unwrap();
        assert!(matches!(r, Reserve::Denied { .. }), "{r:?}");
        remote.try_pause(key, Duration::MAX).await.unwrap();
        let left = remote.try_paused(key).await.unwrap().unwrap();
        assert!(left <= Duration::from_secs(300), "{left:?}");
        assert!(remote.try_clear_pause(key).await.unwrap().is_some());
        assert_eq!(remote.try_paused(key).await.unwrap(), None);
    }
    // A pause of zero and of one nanosecond: no error.
    remote.try_pause("z", Duration::ZERO).await.unwrap();
    remote
        .try_pause("z", Duration::from_nanos(1))
        .await
        .unwrap();
}

/// "A call that waited for a Redis slot and was dropped, or that a pause overtook, gives the
/// slot back". A reservation whose answer timed out (Redis hung) fails the call, not sent; when
/// Redis wakes up the script may still run and take a slot that no call will use. The docs are
/// silent on this case; a demanding user expects the quota not to lose a slot to a call that
/// never went: right after Redis is back, a call with no wait allowed goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_reservation_that_timed_out_does_not_lose_the_slot() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let quota = Quota::new(1, Duration::from_secs(20)).unwrap();
    let remote = RedisQuota::connect(&redis.url(), quota).await.unwrap();
    remote.try_paused("warm").await.unwrap();
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote))
                .with_on_store_error(OnStoreError::Fail)
                .with_max_wait(Duration::ZERO),
        )
        .service(inner);
    redis.pause(1500);
    let e = svc.clone().oneshot(get("lost.test")).await.unwrap_err();
    assert_eq!(delivery(&*e), Delivery::NotSent);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let r = svc.clone().oneshot(get("lost.test")).await;
    assert!(
        r.is_ok(),
        "no call went in the last 20 s, yet: {}",
        r.err().map(|e| chain_text(&*e)).unwrap_or_default()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// "Connecting ends within 2 s" / "Every operation ends within its timeout ... whatever Redis
/// does: ... never answers". Connecting each backend to a Redis that accepts but is held by
/// `CLIENT PAUSE` (the consumer also creates its group) ends with an error within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_connecting_to_a_hung_redis_ends_within_the_bound() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let url = redis.url();
    // Long enough for four connects that each wait their whole bound (2 s) for the `PING` that
    // ends a connect, and then some.
    redis.pause(12_000);
    let bound = Duration::from_millis(3500);
    let t = Instant::now();
    let r = RedisQuota::connect(&url, Quota::per_second(1).unwrap()).await;
    assert!(t.elapsed() < bound, "quota: {:?}", t.elapsed());
    if let Ok(q) = r {
        // Connected lazily: the first operation is bounded instead.
        let t = Instant::now();
        assert!(q.try_paused("k").await.is_err());
        assert!(
            t.elapsed() < Duration::from_millis(1800),
            "{:?}",
            t.elapsed()
        );
    }
    let t = Instant::now();
    let r = sturdy::redis::RedisIdempotencyStore::connect(&url).await;
    assert!(t.elapsed() < bound, "store: {:?}", t.elapsed());
    drop(r);
    let t = Instant::now();
    let r =
        sturdy::redis::RedisStreamConsumer::connect(&url, "s", "g", "w", Duration::from_secs(5))
            .await;
    assert!(t.elapsed() < bound, "consumer: {:?}", t.elapsed());
    assert!(
        r.is_err(),
        "the group cannot have been created on a hung Redis"
    );
    let t = Instant::now();
    let r = sturdy::redis::RedisStreamQueue::connect(&url, "s").await;
    assert!(t.elapsed() < bound, "queue: {:?}", t.elapsed());
    drop(r);
    redis.unpause();
}

/// Redis restarted mid-run (without persistence) under 8 tasks calling through a fail-closed
/// layer: every call ends within the bound, each failure is the documented "not sent" store
/// failure, and calls go again after the restart, on the same objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_a_restart_mid_run_under_load() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = Quota::per_second(1000).unwrap();
    let remote = RedisQuota::connect(&redis.url(), quota).await.unwrap();
    let (calls, inner) = counting();
    let svc = ServiceBuilder::new()
        .buffer(32)
        .timeout(Duration::from_secs(5))
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote))
                .with_on_store_error(OnStoreError::Fail),
        )
        .service(inner);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok_after, mut failed) = (0u32, 0u32);
            while start.elapsed() < Duration::from_millis(4000) {
                let t = Instant::now();
                let r = match svc.ready().await {
                    Ok(s) => s.call(get("r.test")).await,
                    Err(e) => Err(e),
                };
                assert!(
                    t.elapsed() < Duration::from_millis(2500),
                    "{:?}",
                    t.elapsed()
                );
                match r {
                    Ok(_) if start.elapsed() > Duration::from_millis(3000) => ok_after += 1,
                    Ok(_) => {}
                    Err(e) => {
                        failed += 1;
                        let text = chain_text(&*e);
                        assert!(
                            text.contains("the rate-limit store failed, so the call was not sent"),
                            "{text}"
                        );
                        assert_eq!(delivery(&*e), Delivery::NotSent, "{text}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok_after, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.restart().await;
    let (mut ok_after, mut failed) = (0, 0);
    for t in tasks {
        let (a, f) = t.await.unwrap();
        ok_after += a;
        failed += f;
    }
    assert!(
        ok_after > 0,
        "no call went after the restart ({failed} failed)"
    );
    assert!(calls.load(Ordering::SeqCst) > 0);
}

/// The quota shared through a Redis Cluster by three connections, with a key starting with `}`
/// (whose tag Redis would ignore): reservations that go at once stay within the burst plus one
/// per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis30_three_cluster_connections_keep_one_quota_for_a_brace_key() {
    let Some(nodes) = cluster_urls() else { return };
    let prefix = unique("clq");
    let quota = Quota::per_second(10).unwrap().with_burst(3).unwrap();
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..3 {
        let q = RedisQuota::connect_cluster(&nodes, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut granted = 0u32;
            while start.elapsed() < Duration::from_millis(1000) {
                if let Reserve::Granted { wait } =
                    q.try_reserve("}tok", Duration::ZERO).await.unwrap()
                {
                    assert!(wait.is_zero());
                    granted += 1;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            granted
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.unwrap();
    }
    let span = start.elapsed();
    let allowed = 3 + (span.as_millis() / 100) as u32 + 1;
    assert!(
        granted <= allowed,
        "{granted} in {span:?}, allowed {allowed}"
    );
    assert!(granted >= 3, "{granted}");
}
