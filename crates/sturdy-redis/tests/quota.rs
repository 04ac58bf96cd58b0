//! RedisQuota against the real Redis at STURDY_REDIS_URL (started by scripts/test.sh). When CI
//! sets CI=true, a missing URL is a failure, not a skip.

use crate::support;
use support::{backends, proxy, unique as prefix, Backend};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use sturdy_core::{BoxError, RateLimited};
use sturdy_ratelimit::{OnStoreError, Quota, RateLimitLayer, RemoteQuota, Reserve};
use sturdy_redis::RedisQuota;
use tower::{service_fn, Layer, ServiceExt};

#[tokio::test]
async fn two_instances_share_one_quota() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        two_instances_share_one_quota_on(&b).await;
    }
}

async fn two_instances_share_one_quota_on(b: &Backend) {
    // 10 per minute with a burst of 10: within this test, exactly 10 calls fit, whoever makes them.
    let quota = Quota::per_minute(10).unwrap().with_burst(10).unwrap();
    let p = prefix("share");
    let a = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
    let b = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
    let mut granted = 0;
    let mut denied = Vec::new();
    for i in 0..40 {
        let q = if i % 2 == 0 { &a } else { &b };
        match q
            .try_reserve("api.example.com", Duration::ZERO)
            .await
            .unwrap()
        {
            Reserve::Granted { wait } => {
                assert_eq!(wait, Duration::ZERO);
                granted += 1;
            }
            Reserve::Denied { retry_after } => denied.push(retry_after),
        }
    }
    assert_eq!(granted, 10);
    assert_eq!(denied.len(), 30);
    // The next slot is one interval (6 s) away, give or take the test's own run time.
    assert!(
        denied
            .iter()
            .all(|d| *d > Duration::from_secs(5) && *d <= Duration::from_secs(6)),
        "{denied:?}"
    );
}

/// Braces in a prefix or a key never make two (prefix, key) pairs one quota: prefix `p` with
/// key `t}:{c` and prefix `p:{t}` with key `c` would both be `p:{t}:{c}:tat` written plainly.
#[tokio::test]
async fn braces_in_a_prefix_or_key_never_join_two_quotas() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        braces_in_a_prefix_or_key_never_join_two_quotas_on(&b).await;
    }
}

async fn braces_in_a_prefix_or_key_never_join_two_quotas_on(b: &Backend) {
    // One call a minute: a second grant within the test means a quota of its own.
    let quota = Quota::per_minute(1).unwrap();
    let p = prefix("braces");
    let pairs = [
        (p.clone(), "t}:{c".to_owned()),
        (format!("{p}:{{t}}"), "c".to_owned()),
        (p.clone(), "{t}".to_owned()),
        (p.clone(), "t".to_owned()),
        (p.clone(), String::new()),
    ];
    for (prefix, key) in &pairs {
        let q = RedisQuota::new(b.conn().await, quota).with_prefix(prefix);
        let r = q.try_reserve(key, Duration::ZERO).await.unwrap();
        assert!(
            matches!(r, Reserve::Granted { .. }),
            "prefix {prefix:?}, key {key:?}: {r:?}"
        );
        let r = q.try_reserve(key, Duration::ZERO).await.unwrap();
        assert!(
            matches!(r, Reserve::Denied { .. }),
            "prefix {prefix:?}, key {key:?}: {r:?}"
        );
    }
}

#[tokio::test]
async fn reservations_queue_in_order() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        reservations_queue_in_order_on(&b).await;
    }
}

async fn reservations_queue_in_order_on(b: &Backend) {
    let quota = Quota::per_second(10).unwrap();
    let q = RedisQuota::new(b.conn().await, quota).with_prefix(prefix("queue"));
    let mut waits = Vec::new();
    for _ in 0..5 {
        match q.try_reserve("k", Duration::from_secs(10)).await.unwrap() {
            Reserve::Granted { wait } => waits.push(wait),
            Reserve::Denied { .. } => panic!("within max_wait"),
        }
    }
    // 0, ~100, ~200, ~300, ~400 ms (less the round trips already spent).
    for (i, w) in waits.iter().enumerate() {
        let want = Duration::from_millis(100 * i as u64);
        assert!(
            *w <= want && want - *w < Duration::from_millis(50),
            "slot {i}: {w:?}"
        );
    }
}

#[tokio::test]
async fn two_layers_as_two_processes_admit_the_quota_between_them() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        two_layers_as_two_processes_admit_the_quota_between_them_on(&b).await;
    }
}

async fn two_layers_as_two_processes_admit_the_quota_between_them_on(b: &Backend) {
    let quota = Quota::per_minute(6).unwrap().with_burst(6).unwrap();
    let p = prefix("layers");
    let calls = Arc::new(AtomicU32::new(0));
    let mut layers = Vec::new();
    for _ in 0..2 {
        let remote = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
        layers.push(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote))
                .with_max_wait(Duration::ZERO),
        );
    }
    let mut limited = 0;
    for i in 0..20 {
        let c = calls.clone();
        let api = service_fn(move |_r: Request<()>| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(())) }
        });
        let svc = layers[i % 2].layer(api);
        match svc
            .oneshot(Request::get("http://api.example.com/").body(()).unwrap())
            .await
        {
            Ok(_) => {}
            Err(e) => {
                assert!(e.is::<RateLimited>(), "{e}");
                limited += 1;
            }
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(limited, 14);
}

#[tokio::test]
async fn pauses_are_shared_and_never_shortened() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        pauses_are_shared_and_never_shortened_on(&b).await;
    }
}

async fn pauses_are_shared_and_never_shortened_on(b: &Backend) {
    let quota = Quota::per_second(100).unwrap();
    let p = prefix("pause");
    let a = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
    let b = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
    a.try_pause("k", Duration::from_secs(30)).await.unwrap();
    b.try_pause("k", Duration::from_secs(2)).await.unwrap();
    match b.try_reserve("k", Duration::from_secs(1)).await.unwrap() {
        Reserve::Denied { retry_after } => {
            assert!(retry_after > Duration::from_secs(29), "{retry_after:?}");
        }
        Reserve::Granted { .. } => panic!("the key is paused"),
    }
    // Through the trait, as the layer uses it.
    let dyn_b: Arc<dyn RemoteQuota> = Arc::new(b);
    assert!(matches!(
        dyn_b.reserve("other", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
}

/// A port where nothing listens, and one that accepts and never answers.
#[tokio::test]
async fn redis_down_is_a_clear_error_not_a_hang() {
    let closed = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let start = tokio::time::Instant::now();
    let err = RedisQuota::connect(&format!("redis://{closed}/"), Quota::per_second(1).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("could not connect to Redis"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));

    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            kept.push(s);
        }
    });
    let start = tokio::time::Instant::now();
    let err = RedisQuota::connect(&format!("redis://{addr}/"), Quota::per_second(1).unwrap())
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(err.to_string().contains("Redis"), "{err}");
    hold.abort();
}

#[tokio::test]
async fn the_layer_chooses_fail_open_or_fail_closed() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        the_layer_chooses_fail_open_or_fail_closed_on(&b).await;
    }
}

async fn the_layer_chooses_fail_open_or_fail_closed_on(b: &Backend) {
    // A quota whose every decision fails in Redis: its state key holds the wrong type, so the
    // script's GET errors (WRONGTYPE). Deterministic, unlike a race against a timeout.
    let p = prefix("fail");
    let mut raw = b.conn().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{p}:{{a}}:tat"))
        .arg("f")
        .arg("v")
        .query_async(&mut raw)
        .await
        .unwrap();
    let q = RedisQuota::new(b.conn().await, Quota::per_second(1).unwrap()).with_prefix(p);
    assert!(q.try_reserve("a", Duration::ZERO).await.is_err());
    let remote: Arc<dyn RemoteQuota> = Arc::new(q);
    let api = service_fn(|_r: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let open = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_remote(remote.clone())
        .layer(api);
    assert!(open
        .oneshot(Request::get("http://a/").body(()).unwrap())
        .await
        .is_ok());
    let api = service_fn(|_r: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let closed = RateLimitLayer::new(Quota::per_second(1).unwrap())
        .with_remote(remote)
        .with_on_store_error(OnStoreError::Fail)
        .layer(api);
    let err = closed
        .oneshot(Request::get("http://a/").body(()).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("rate-limit store failed"), "{err}");
    // Refused before sending, and not the destination's fault.
    assert!(sturdy_core::classify::delivery(&*err).proves_not_sent());
    assert!(!sturdy_core::classify::concerns_destination(&*err));
}

/// The time to live of a raw Redis key, in milliseconds.
async fn pttl(b: &Backend, key: &str) -> i64 {
    let mut raw = b.conn().await;
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut raw)
        .await
        .unwrap()
}

const FIVE_MINUTES_MS: i64 = 300_000;

#[tokio::test]
async fn hostile_pauses_never_live_longer_than_the_cap_in_redis() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        hostile_pauses_never_live_longer_than_the_cap_in_redis_on(&b).await;
    }
}

async fn hostile_pauses_never_live_longer_than_the_cap_in_redis_on(b: &Backend) {
    let p = prefix("cap");
    let q = RedisQuota::new(b.conn().await, Quota::per_second(10).unwrap()).with_prefix(&p);
    // Asked for 584 billion years: stored as 5 minutes.
    q.try_pause("a", Duration::from_secs(u64::MAX))
        .await
        .unwrap();
    let ttl = pttl(b, &format!("{p}:{{a}}:pause")).await;
    assert!(
        ttl > FIVE_MINUTES_MS - 5_000 && ttl <= FIVE_MINUTES_MS,
        "{ttl}"
    );
    let left = q.try_paused("a").await.unwrap().unwrap();
    assert!(
        left <= Duration::from_secs(300) && left > Duration::from_secs(295),
        "{left:?}"
    );

    // A pause key written by someone else with a centuries-long TTL is cut to the cap by the
    // next decision, which waits at most the cap.
    let mut raw = b.conn().await;
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:{{b}}:pause"))
        .arg("1")
        .arg("PX")
        .arg(10_i64.pow(15))
        .query_async(&mut raw)
        .await
        .unwrap();
    match q.try_reserve("b", Duration::ZERO).await.unwrap() {
        Reserve::Denied { retry_after } => {
            assert!(retry_after <= Duration::from_secs(300), "{retry_after:?}");
            assert!(retry_after > Duration::from_secs(295), "{retry_after:?}");
        }
        Reserve::Granted { .. } => panic!("b is paused"),
    }
    let ttl = pttl(b, &format!("{p}:{{b}}:pause")).await;
    assert!(ttl <= FIVE_MINUTES_MS, "{ttl}");
    // A longer pause request does not extend past the cap either.
    q.try_pause("b", Duration::from_secs(86_400)).await.unwrap();
    assert!(pttl(b, &format!("{p}:{{b}}:pause")).await <= FIVE_MINUTES_MS);

    // A smaller cap is configurable, and applies to what is already there.
    let short = RedisQuota::new(b.conn().await, Quota::per_second(10).unwrap())
        .with_prefix(&p)
        .with_max_pause(Duration::from_secs(10));
    short.try_pause("b", Duration::from_secs(60)).await.unwrap();
    assert!(pttl(b, &format!("{p}:{{b}}:pause")).await <= 10_000);
}

#[tokio::test]
async fn a_hostile_retry_after_seen_by_the_layer_is_shared_capped() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_hostile_retry_after_seen_by_the_layer_is_shared_capped_on(&b).await;
    }
}

async fn a_hostile_retry_after_seen_by_the_layer_is_shared_capped_on(b: &Backend) {
    let p = prefix("layer-cap");
    let quota = Quota::per_second(10).unwrap();
    let remote = Arc::new(RedisQuota::new(b.conn().await, quota).with_prefix(&p));
    let api = service_fn(|_r: Request<()>| async {
        let res = Response::builder()
            .status(429)
            .header("retry-after", "99999999999999999999")
            .body(())
            .unwrap();
        Ok::<_, BoxError>(res)
    });
    let svc = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .layer(api);
    let res = svc
        .oneshot(Request::get("http://api.example.com/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    // The pause is published in the background: wait for it (bounded).
    let mut left = None;
    for _ in 0..200 {
        left = remote.try_paused("api.example.com").await.unwrap();
        if left.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let left = left.expect("the pause reached Redis");
    assert!(
        left <= Duration::from_secs(300) && left > Duration::from_secs(295),
        "{left:?}"
    );
    let ttl = pttl(b, &format!("{p}:{{api.example.com}}:pause")).await;
    assert!(ttl <= FIVE_MINUTES_MS, "{ttl}");
}

#[tokio::test]
async fn a_pause_can_be_read_and_cleared_for_every_process() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        a_pause_can_be_read_and_cleared_for_every_process_on(&b).await;
    }
}

async fn a_pause_can_be_read_and_cleared_for_every_process_on(b: &Backend) {
    let p = prefix("clear");
    let quota = Quota::per_second(10).unwrap();
    let a = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
    let b = RedisQuota::new(b.conn().await, quota).with_prefix(&p);
    assert_eq!(a.try_paused("k").await.unwrap(), None);
    assert_eq!(a.try_clear_pause("k").await.unwrap(), None);
    a.try_pause("k", Duration::from_secs(60)).await.unwrap();
    assert!(matches!(
        b.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Denied { .. }
    ));
    let left = b.try_clear_pause("k").await.unwrap().unwrap();
    assert!(
        left > Duration::from_secs(55) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    assert_eq!(a.try_paused("k").await.unwrap(), None);
    assert_eq!(
        a.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Granted {
            wait: Duration::ZERO
        }
    );
    // Through the trait, as a handle's user would.
    a.try_pause("k", Duration::from_secs(60)).await.unwrap();
    let dyn_a: Arc<dyn RemoteQuota> = Arc::new(a.clone());
    dyn_a.clear_pause("k").await.unwrap();
    assert_eq!(a.try_paused("k").await.unwrap(), None);
}

#[tokio::test]
async fn an_unused_slot_is_given_back() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        an_unused_slot_is_given_back_on(&b).await;
    }
}

async fn an_unused_slot_is_given_back_on(b: &Backend) {
    let quota = Quota::per_minute(1).unwrap();
    let q = RedisQuota::new(b.conn().await, quota).with_prefix(prefix("release"));
    let long = Duration::from_secs(600);
    assert!(matches!(
        q.try_reserve("k", long).await.unwrap(),
        Reserve::Granted { wait } if wait.is_zero()
    ));
    let first = match q.try_reserve("k", long).await.unwrap() {
        Reserve::Granted { wait } => wait,
        Reserve::Denied { .. } => panic!("within max_wait"),
    };
    assert!(first > Duration::from_secs(59), "{first:?}");
    // That caller gives up: its slot goes back, and the next caller gets it, not the one after.
    assert!(q.try_release("k").await.unwrap());
    let next = match q.try_reserve("k", long).await.unwrap() {
        Reserve::Granted { wait } => wait,
        Reserve::Denied { .. } => panic!("within max_wait"),
    };
    assert!(next <= first && next > Duration::from_secs(59), "{next:?}");
    // Nothing reserved ahead: nothing to give back.
    let idle = RedisQuota::new(b.conn().await, quota).with_prefix(prefix("release-idle"));
    assert!(!idle.try_release("k").await.unwrap());
}

#[tokio::test]
async fn one_round_trip_per_decision() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        one_round_trip_per_decision_on(&b).await;
    }
}

async fn one_round_trip_per_decision_on(b: &Backend) {
    let (conn, p) = proxy::counted(b).await;
    // Ten a second: twenty reservations reach two seconds ahead, so the release below still
    // finds one to give back on a machine that stalls (the clock is real here).
    let slow = Quota::per_second(10).unwrap();
    let q = RedisQuota::new(conn.clone(), slow).with_prefix(prefix("trips"));
    // The first use of a script on a node may cost a second command (the node learns it).
    q.try_reserve("api.example.com", Duration::ZERO)
        .await
        .unwrap();
    q.try_release("api.example.com").await.unwrap();
    let before = proxy::sent(&p);
    for _ in 0..20 {
        q.try_reserve("api.example.com", Duration::from_secs(10))
            .await
            .unwrap();
    }
    assert_eq!(proxy::sent(&p) - before, 20, "one command per decision");
    let before = proxy::sent(&p);
    assert!(q.try_release("api.example.com").await.unwrap());
    assert_eq!(proxy::sent(&p) - before, 1, "one command per release");

    // Through the layer: one decision, one command, per call. Its own prefix (the same key, so
    // the same slot, whose node knows the script) and a quota that does not make it wait.
    let quota = Quota::per_second(1_000).unwrap();
    let remote = Arc::new(RedisQuota::new(conn, quota).with_prefix(prefix("trips-layer")));
    let svc = RateLimitLayer::new(quota)
        .with_remote(remote)
        .with_max_wait(Duration::from_secs(1))
        .layer(service_fn(|_r: Request<()>| async {
            Ok::<_, BoxError>(Response::new(()))
        }));
    let before = proxy::sent(&p);
    for _ in 0..10 {
        svc.clone()
            .oneshot(Request::get("http://api.example.com/").body(()).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(proxy::sent(&p) - before, 10, "one command per call");
}

#[tokio::test]
async fn an_empty_key_keeps_its_state_in_one_slot() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisQuota::new(b.conn().await, Quota::per_second(10).unwrap())
            .with_prefix(prefix("empty"));
        // Redis ignores an empty hash tag ("{}"): the two keys still share a slot.
        q.try_pause("", Duration::from_secs(30)).await.unwrap();
        assert!(matches!(
            q.try_reserve("", Duration::ZERO).await.unwrap(),
            Reserve::Denied { .. }
        ));
        assert!(q.try_clear_pause("").await.unwrap().is_some());
        assert!(matches!(
            q.try_reserve("", Duration::ZERO).await.unwrap(),
            Reserve::Granted { .. }
        ));
    }
}
