//! sturdy-redis after a restart, on a missing password and on a malformed URL.
//!
//! - lib.rs: "after a restart of the server ... the same backend works again without being made
//!   anew". A backend idle while Redis restarts must not fail its first operation afterwards: the
//!   command never reached the dead connection, so it goes on the new one.
//! - The errors name their cause: a malformed URL is `Config`, a missing password `Auth`, and
//!   neither message shows the password.
//!
//! Tests that restart Redis start a `redis-server` of their own; real time, milliseconds.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use sturdy::core::{BoxError, ErrorKind};
use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::{RedisIdempotencyStore, RedisQuota, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};

use crate::redis30_util::{own_redis_possible, unique, OwnRedis};

const TTL: Duration = Duration::from_secs(600);

fn kind_of(e: &BoxError) -> ErrorKind {
    sturdy::core::find::<sturdy::core::Error>(&**e)
        .map(|s| s.kind().clone())
        .unwrap_or_else(|| panic!("no sturdy error in {e:?}"))
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from_static(b"{\"n\":1}"))
}

/// Waits (real time) until the client side has seen the old connections close.
async fn let_the_close_arrive() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s34_idle_backends_work_at_once_after_a_restart() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = Quota::per_second(1000).unwrap();
    let rq = RedisQuota::connect(&redis.url(), quota).await.unwrap();
    let store = RedisIdempotencyStore::connect(&redis.url()).await.unwrap();
    let queue = RedisStreamQueue::connect(&redis.url(), unique("s34-stream"))
        .await
        .unwrap();
    // Each works, then stays idle while Redis restarts.
    assert!(matches!(
        rq.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    let begin = store
        .begin("before", [1; 32], LockToken::random(), TTL)
        .await
        .unwrap();
    assert!(matches!(begin, Begin::Started));
    assert_eq!(
        queue.push(event("evt_before"), TTL).await.unwrap(),
        Push::Enqueued
    );

    for round in 0..2 {
        redis.restart().await;
        let_the_close_arrive().await;
        // The first operation of each, on the same objects, works.
        let r = rq.try_reserve("k", Duration::ZERO).await;
        assert!(
            matches!(r, Ok(Reserve::Granted { .. })),
            "round {round}: quota: {r:?}"
        );
        let key = format!("after-{round}");
        let b = store.begin(&key, [2; 32], LockToken::random(), TTL).await;
        assert!(
            matches!(b, Ok(Begin::Started)),
            "round {round}: store: {b:?}"
        );
        let p = queue.push(event(&format!("evt_{round}")), TTL).await;
        assert!(
            matches!(p, Ok(Push::Enqueued)),
            "round {round}: queue: {p:?}"
        );
    }
}

/// The resend is for a command that never reached the connection only: a Redis that stays
/// down still fails the call, as "cannot be reached", promptly and without a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s34_a_redis_that_stays_down_still_fails_as_unreachable() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = Quota::per_second(1000).unwrap();
    let rq = RedisQuota::connect(&redis.url(), quota)
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    rq.try_reserve("k", Duration::ZERO).await.unwrap();
    redis.kill();
    let_the_close_arrive().await;
    let t = tokio::time::Instant::now();
    let err = rq.try_reserve("k", Duration::ZERO).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let kind = kind_of(&err);
    assert!(
        kind == ErrorKind::Connect || kind == ErrorKind::Timeout,
        "{kind:?}: {err}"
    );
    assert!(!err.to_string().contains("may have run"), "{err}");
}

/// A malformed URL is a mistake in the configuration (`Config`), for every backend, and the
/// message does not repeat the password.
#[tokio::test]
async fn s34_a_malformed_url_is_config_and_hides_the_password() {
    let quota = Quota::per_second(10).unwrap();
    for url in [
        "redis://:s34-secret@127.0.0.1:notaport/",
        "http://:s34-secret@127.0.0.1:6379/",
        "redis://:s34-secret@127.0.0.1:6379/notadb",
        "not a url s34-secret",
        "",
    ] {
        let errs: Vec<BoxError> = vec![
            RedisQuota::connect(url, quota).await.unwrap_err(),
            RedisIdempotencyStore::connect(url).await.unwrap_err(),
            RedisStreamQueue::connect(url, "s34").await.unwrap_err(),
            sturdy::redis::RedisConnection::connect_cluster([url])
                .await
                .unwrap_err(),
        ];
        for err in errs {
            assert_eq!(kind_of(&err), ErrorKind::Config, "{url:?}: {err}");
            assert!(
                err.to_string().starts_with("invalid Redis"),
                "{url:?}: {err}"
            );
            assert!(!err.to_string().contains("s34-secret"), "{err}");
            assert!(!format!("{err:?}").contains("s34-secret"), "{err:?}");
        }
    }
}

/// A Redis that requires a password, reached with none: every backend's first operation is
/// `Auth`, and says the password is missing or wrong, even a stream push (which Redis answers
/// with a protocol error before authentication).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s34_no_password_for_a_redis_that_requires_one_is_auth() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    assert_eq!(
        redis
            .cli(&["CONFIG", "SET", "requirepass", "s34-pass"])
            .trim(),
        "OK"
    );
    let url = redis.url();
    let quota = Quota::per_second(10).unwrap();
    let mut errs: Vec<(&str, BoxError)> = Vec::new();
    match RedisQuota::connect(&url, quota).await {
        Ok(q) => errs.push((
            "quota",
            q.try_reserve("k", Duration::ZERO).await.unwrap_err(),
        )),
        Err(e) => errs.push(("quota connect", e)),
    }
    match RedisIdempotencyStore::connect(&url).await {
        Ok(s) => errs.push((
            "store",
            s.begin("k", [3; 32], LockToken::random(), TTL)
                .await
                .unwrap_err(),
        )),
        Err(e) => errs.push(("store connect", e)),
    }
    match RedisStreamQueue::connect(&url, unique("s34-auth")).await {
        Ok(q) => errs.push(("push", q.push(event("evt_auth"), TTL).await.unwrap_err())),
        Err(e) => errs.push(("queue connect", e)),
    }
    for (what, err) in errs {
        assert_eq!(kind_of(&err), ErrorKind::Auth, "{what}: {err}");
        assert!(
            err.to_string().contains("missing or wrong"),
            "{what}: {err}"
        );
    }
    // Redis password reset for the process's own kill: nothing else uses this server.
}

/// `RedisConnection::connect` and every backend's `connect`: "Errors: ... Redis refuses the
/// credentials: an `Auth` error, also for a Redis that requires a password reached with none".
/// Before, a Redis that requires a password accepted the connection without one, `connect`
/// succeeded, and only the first operation said the password was missing. With the right
/// password each connects and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s34_connect_without_a_required_password_is_auth_at_once() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    assert_eq!(
        redis
            .cli(&["CONFIG", "SET", "requirepass", "s34-connect-pass"])
            .trim(),
        "OK"
    );
    let url = redis.url();
    let quota = Quota::per_second(10).unwrap();
    let errs: Vec<(&str, BoxError)> = vec![
        (
            "RedisConnection",
            sturdy::redis::RedisConnection::connect(&url)
                .await
                .unwrap_err(),
        ),
        (
            "connect",
            sturdy::redis::connect(&url, Duration::from_secs(1))
                .await
                .unwrap_err(),
        ),
        ("quota", RedisQuota::connect(&url, quota).await.unwrap_err()),
        (
            "store",
            RedisIdempotencyStore::connect(&url).await.unwrap_err(),
        ),
        (
            "queue",
            RedisStreamQueue::connect(&url, unique("s34-connect"))
                .await
                .unwrap_err(),
        ),
    ];
    for (what, err) in errs {
        assert_eq!(kind_of(&err), ErrorKind::Auth, "{what}: {err}");
        assert!(
            err.to_string()
                .starts_with("could not connect to Redis: Redis refused the credentials"),
            "{what}: {err}"
        );
        assert!(
            err.to_string().contains("missing or wrong"),
            "{what}: {err}"
        );
    }
    let right = format!("redis://:s34-connect-pass@127.0.0.1:{}/", redis.port);
    let q = RedisQuota::connect(&right, quota).await.unwrap();
    assert!(matches!(
        q.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    sturdy::redis::connect(&right, Duration::from_secs(1))
        .await
        .unwrap();
}
