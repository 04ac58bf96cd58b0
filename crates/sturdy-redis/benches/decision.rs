//! The time of one Redis round trip per decision, on loopback: a rate-limit decision
//! (`RedisQuota::try_reserve`) and a webhook enqueue, against a single server
//! (`STURDY_REDIS_URL`) and a Redis Cluster (`STURDY_REDIS_CLUSTER_URLS`, node URLs separated by
//! commas). A deployment whose variable is unset is left out.
//!
//! ```sh
//! cargo bench -p sturdy-redis --bench decision -- --warm-up-time 1 --measurement-time 5
//! ```
#![allow(missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use sturdy_ratelimit::Quota;
use sturdy_redis::{RedisConnection, RedisQuota, RedisStreamQueue};
use sturdy_webhook::{EventQueue, WebhookEvent};

fn deployments(rt: &tokio::runtime::Runtime) -> Vec<(&'static str, RedisConnection)> {
    let mut all = Vec::new();
    if let Ok(url) = std::env::var("STURDY_REDIS_URL") {
        all.push((
            "single server",
            rt.block_on(RedisConnection::connect(&url)).unwrap(),
        ));
    }
    if let Ok(urls) = std::env::var("STURDY_REDIS_CLUSTER_URLS") {
        let nodes: Vec<&str> = urls.split(',').filter(|u| !u.is_empty()).collect();
        all.push((
            "cluster",
            rt.block_on(RedisConnection::connect_cluster(nodes))
                .unwrap(),
        ));
    }
    all
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("redis round trip");
    for (name, conn) in deployments(&rt) {
        let quota = RedisQuota::new(conn.clone(), Quota::per_second(1_000_000).unwrap())
            .with_prefix("sturdy-bench:rl");
        group.bench_function(format!("rate-limit decision, {name}"), |b| {
            b.iter(|| {
                rt.block_on(quota.try_reserve("api.example.com", Duration::from_secs(1)))
                    .unwrap()
            });
        });
        let queue = RedisStreamQueue::new(conn.clone(), "{sturdy-bench}:webhooks")
            .unwrap()
            .with_max_backlog(u64::MAX);
        let mut n = 0u64;
        group.bench_function(format!("webhook enqueue, {name}"), |b| {
            b.iter(|| {
                n += 1;
                let e =
                    WebhookEvent::new("standard", format!("evt_{n}"), Bytes::from_static(b"{}"));
                rt.block_on(queue.push(e, Duration::from_secs(60))).unwrap()
            });
        });
        // Leave nothing behind.
        let mut conn = conn;
        rt.block_on(async {
            for key in [
                "{sturdy-bench}:webhooks",
                "sturdy-bench:rl:{api.example.com}:tat",
            ] {
                let _: Result<i64, _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
            }
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
