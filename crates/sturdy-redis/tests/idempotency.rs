//! The idempotency conformance suite against the real Redis at STURDY_REDIS_URL, with two
//! connections as two app instances would hold.

mod support;
use support::redis_url;

use sturdy_idempotency::server::conformance;
use sturdy_redis::RedisIdempotencyStore;

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
