//! s38: `RedisIdempotencyStore` against the real Redis at `STURDY_REDIS_URL`, checked against
//! its rustdoc ("`i:<fingerprint>:<lock token>:<call>` while its request runs ... one written by
//! a version without call ids, `i:<fingerprint>:<lock token>`, is still renewed, completed and
//! released by its token") and crates/sturdy-redis/CHANGELOG.md (Unreleased).

#![cfg(feature = "full")]

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken, StoredResponse};
use sturdy::redis::RedisIdempotencyStore;

fn url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn cli(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .arg("--raw")
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

fn hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("content-type".to_owned(), b"application/json".to_vec())],
        body: Bytes::from_static(b"{\"id\":38}"),
    }
}

const LEASE: Duration = Duration::from_secs(30);

/// IdempotencyStore contract: "of many concurrent `begin`s for one key, exactly one gets
/// [`Begin::Started`]"; RELIABILITY.md "each `begin` writes an id of its own into the lock, so
/// it tells its own lock from any other, even one with the same lock token": 16 concurrent
/// begins with ONE fixed token give one `Started`, 15 `InFlight`; the value is
/// `i:<fingerprint>:<lock token>:<call>`; renew, complete and release by that token work.
#[tokio::test]
async fn s38_redis_concurrent_begins_with_one_token_start_once() {
    let Some(url) = url() else { return };
    let prefix = format!("s38:{}", LockToken::random());
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let fp = [0x38u8; 32];
    let token = LockToken::random();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.begin("k1", fp, token, LEASE).await
        }));
    }
    let mut started = 0;
    let mut inflight = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Begin::Started => started += 1,
            Begin::InFlight => inflight += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((started, inflight), (1, 15));
    let rkey = format!("{prefix}:k1");
    let value = cli(&url, &["GET", &rkey]);
    let parts: Vec<&str> = value.split(':').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "i", "{value}");
    assert_eq!(parts[1], hex(&fp), "{value}");
    assert_eq!(parts[2], token.to_string(), "{value}");
    assert!(
        !parts[3].is_empty() && parts[3].chars().all(|c| c.is_ascii_hexdigit()),
        "{value}"
    );
    // renew by the token
    assert!(store.renew("k1", fp, token, LEASE).await.unwrap());
    // another token changes nothing
    let other = LockToken::random();
    assert!(!store.renew("k1", fp, other, LEASE).await.unwrap());
    store.release("k1", other).await.unwrap();
    assert_eq!(
        cli(&url, &["GET", &rkey]),
        value,
        "another token released it"
    );
    // complete by the token
    store
        .complete("k1", fp, token, response(), LEASE)
        .await
        .unwrap();
    let stored = cli(&url, &["GET", &rkey]);
    assert!(stored.starts_with(&format!("d:{}:", hex(&fp))), "{stored}");
    assert_eq!(
        store.begin("k1", fp, token, LEASE).await.unwrap(),
        Begin::Completed(response())
    );
    // release by the token of a fresh lock
    assert_eq!(
        store.begin("k2", fp, token, LEASE).await.unwrap(),
        Begin::Started
    );
    store.release("k2", token).await.unwrap();
    assert_eq!(cli(&url, &["EXISTS", &format!("{prefix}:k2")]), "0");
    cli(&url, &["DEL", &rkey]);
}

/// RedisIdempotencyStore rustdoc: "one written by a version without call ids,
/// `i:<fingerprint>:<lock token>`, is still renewed, completed and released by its token". A
/// lock written by hand in that format: another token cannot touch it, a `begin` finds it
/// `InFlight`, and its own token renews, completes and (on another key) releases it.
#[tokio::test]
async fn s38_redis_a_lock_without_call_id_is_renewed_completed_released_by_its_token() {
    let Some(url) = url() else { return };
    let prefix = format!("s38:{}", LockToken::random());
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let fp = [0xA7u8; 32];
    let token = LockToken::random();
    let other = LockToken::random();
    let old = format!("i:{}:{}", hex(&fp), token);
    let (k1, k2) = (format!("{prefix}:old1"), format!("{prefix}:old2"));
    cli(&url, &["SET", &k1, &old, "PX", "5000"]);
    cli(&url, &["SET", &k2, &old, "PX", "5000"]);

    assert_eq!(
        store.begin("old1", fp, other, LEASE).await.unwrap(),
        Begin::InFlight
    );
    assert!(!store.renew("old1", fp, other, LEASE).await.unwrap());
    store.release("old1", other).await.unwrap();
    assert_eq!(cli(&url, &["GET", &k1]), old);

    // renew by its token: the lease goes to 30 s
    assert!(store.renew("old1", fp, token, LEASE).await.unwrap());
    let pttl: i64 = cli(&url, &["PTTL", &k1]).parse().unwrap();
    assert!(pttl > 10_000, "renewed lease: {pttl} ms");
    // complete by its token
    store
        .complete("old1", fp, token, response(), LEASE)
        .await
        .unwrap();
    let stored = cli(&url, &["GET", &k1]);
    assert!(stored.starts_with(&format!("d:{}:", hex(&fp))), "{stored}");
    assert_eq!(
        store.begin("old1", fp, other, LEASE).await.unwrap(),
        Begin::Completed(response())
    );
    // release by its token
    store.release("old2", token).await.unwrap();
    assert_eq!(
        cli(&url, &["EXISTS", &k2]),
        "0",
        "{}",
        cli(&url, &["GET", &k2])
    );
    cli(&url, &["DEL", &k1, &k2]);
}

/// RedisIdempotencyStore rustdoc: the old-format lock is "still renewed ... by its token"; and
/// `begin`: "An entry with another fingerprint is a [`Begin::Mismatch`], whatever its token".
/// A `begin` with the old lock's own token (a retry of that execution would draw a new one, but
/// a resend carries the same) and the same fingerprint must not answer `Started` over a lock
/// it cannot tell is its own... the doc says a call id tells "its own lock from any other, even
/// one with the same lock token": the old lock has no call id, so it is not this `begin`'s.
#[tokio::test]
async fn s38_redis_old_format_lock_with_same_token_is_in_flight_and_other_fingerprint_mismatch() {
    let Some(url) = url() else { return };
    let prefix = format!("s38:{}", LockToken::random());
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(prefix.clone());
    let fp = [0x11u8; 32];
    let token = LockToken::random();
    let k = format!("{prefix}:old3");
    let old = format!("i:{}:{}", hex(&fp), token);
    cli(&url, &["SET", &k, &old, "PX", "5000"]);
    assert_eq!(
        store
            .begin("old3", [0x22u8; 32], token, LEASE)
            .await
            .unwrap(),
        Begin::Mismatch
    );
    assert_eq!(
        store.begin("old3", fp, token, LEASE).await.unwrap(),
        Begin::InFlight
    );
    assert_eq!(cli(&url, &["GET", &k]), old);
    cli(&url, &["DEL", &k]);
}

/// RELIABILITY.md, "A command sent twice on a cluster": "an idempotency `begin` finds the lock
/// it took itself, and answers that it started (each `begin` writes an id of its own into the
/// lock, so it tells its own lock from any other, even one with the same lock token)"; on the
/// cluster at `STURDY_REDIS_CLUSTER_URLS`, 12 concurrent begins with one token: one `Started`.
#[tokio::test]
async fn s38_redis_cluster_concurrent_begins_with_one_token_start_once() {
    let Ok(urls) = std::env::var("STURDY_REDIS_CLUSTER_URLS") else {
        return;
    };
    let nodes: Vec<String> = urls
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let prefix = format!("s38:{}", LockToken::random());
    let store = RedisIdempotencyStore::connect_cluster(nodes)
        .await
        .unwrap()
        .with_prefix(prefix);
    let fp = [0x5Cu8; 32];
    let token = LockToken::random();
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.begin("c1", fp, token, LEASE).await
        }));
    }
    let mut started = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Begin::Started => started += 1,
            Begin::InFlight => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(started, 1);
    assert!(store.renew("c1", fp, token, LEASE).await.unwrap());
    store.release("c1", token).await.unwrap();
    assert_eq!(
        store.begin("c1", fp, token, LEASE).await.unwrap(),
        Begin::Started,
        "released by its token"
    );
    store.release("c1", token).await.unwrap();
}
