//! The idempotency conformance suite against the real Redis at STURDY_REDIS_URL, with two
//! connections as two app instances would hold.

use sturdy_idempotency::server::conformance;
use sturdy_redis::RedisIdempotencyStore;

fn redis_url() -> Option<String> {
    match std::env::var("STURDY_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("STURDY_REDIS_URL must be set in CI")
        }
        _ => {
            eprintln!("STURDY_REDIS_URL is not set: skipping a Redis test");
            None
        }
    }
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite_across_two_instances() {
    let Some(url) = redis_url() else { return };
    let a = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix("sturdy-test:idem");
    let b = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix("sturdy-test:idem");
    conformance::run(a, b).await;
}
