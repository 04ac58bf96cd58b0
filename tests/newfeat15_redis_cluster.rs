//! docs/guides/ratelimit.md, "Several processes: Redis", on a Redis Cluster: "the keys of one
//! limiter share a hash tag, so each decision runs on one node", for limiter keys of any text
//! (`with_key` keys "may be anything": braces, nothing, long, not ASCII), and pauses capped
//! "there too". Runs when `STURDY_REDIS_CLUSTER_URLS` names the nodes (comma-separated);
//! otherwise it passes without checking anything.
#![cfg(feature = "full")]

use std::time::Duration;

use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::RedisQuota;

fn nodes() -> Option<Vec<String>> {
    let urls = std::env::var("STURDY_REDIS_CLUSTER_URLS").ok()?;
    let v: Vec<String> = urls
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    (!v.is_empty()).then_some(v)
}

fn prefix(name: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    // A fresh name per run: the seed of a new `RandomState` is random.
    let t = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("newfeat15:{name}:{}:{t:x}", std::process::id())
}

async fn quota(nodes: &[String], prefix: &str) -> RedisQuota {
    RedisQuota::connect_cluster(
        nodes.to_vec(),
        Quota::new(2, Duration::from_secs(60))
            .unwrap()
            .with_burst(2)
            .unwrap(),
    )
    .await
    .unwrap()
    .with_prefix(prefix)
}

fn granted(r: &Reserve) -> bool {
    matches!(r, Reserve::Granted { .. })
}

/// Two processes share a quota of 2 per minute for each of many hostile keys, pause and clear it;
/// no operation fails with a cross-slot error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_keys_of_any_text_work_on_a_cluster() {
    let Some(nodes) = nodes() else {
        eprintln!("STURDY_REDIS_CLUSTER_URLS is not set: skipped");
        return;
    };
    let p = prefix("keys");
    let a = quota(&nodes, &p).await;
    let b = quota(&nodes, &p).await;
    let long = "k".repeat(10_000);
    let keys: Vec<&str> = vec![
        "api.example.com",
        "}",
        "}x",
        "{",
        "{}",
        "}{",
        "a}b",
        "{tenant}",
        "{}}",
        "",
        "ключ",
        &long,
    ];
    let mut failures = Vec::new();
    for key in keys {
        let shown = if key.len() > 20 { "<10k>" } else { key };
        let step = async {
            let r1 = a.try_reserve(key, Duration::ZERO).await?;
            let r2 = b.try_reserve(key, Duration::ZERO).await?;
            let r3 = a.try_reserve(key, Duration::ZERO).await?;
            if !(granted(&r1) && granted(&r2) && !granted(&r3)) {
                return Err(format!("not one shared quota: {r1:?} {r2:?} {r3:?}").into());
            }
            b.try_pause(key, Duration::from_secs(3600)).await?;
            let left = a.try_paused(key).await?;
            match left {
                Some(d) if d <= Duration::from_secs(300) && d > Duration::from_secs(290) => {}
                other => return Err(format!("pause seen by the other: {other:?}").into()),
            }
            let cleared = a.try_clear_pause(key).await?;
            if cleared.is_none() || b.try_paused(key).await?.is_some() {
                return Err(format!("clear: {cleared:?}").into());
            }
            let released = b.try_release(key).await?;
            if !released {
                return Err("release gave nothing back".into());
            }
            Ok::<_, sturdy::core::BoxError>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), step).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{shown:?}: {e}")),
            Err(_) => failures.push(format!("{shown:?}: hung")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// "a pause key found with a longer time to live (written with a larger cap) is cut to it by the
/// next decision or pause", across processes on a cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_longer_pause_written_by_another_process_is_cut_to_the_cap() {
    let Some(nodes) = nodes() else {
        eprintln!("STURDY_REDIS_CLUSTER_URLS is not set: skipped");
        return;
    };
    let p = prefix("cap");
    let long_cap = quota(&nodes, &p)
        .await
        .with_max_pause(Duration::from_secs(3600));
    let short_cap = quota(&nodes, &p)
        .await
        .with_max_pause(Duration::from_secs(60));
    long_cap
        .try_pause("api.example.com", Duration::from_secs(1800))
        .await
        .unwrap();
    let seen = short_cap.try_paused("api.example.com").await.unwrap();
    assert!(
        matches!(seen, Some(d) if d <= Duration::from_secs(60)),
        "{seen:?}"
    );
    let _ = short_cap
        .try_reserve("api.example.com", Duration::ZERO)
        .await
        .unwrap();
    let after = long_cap.try_paused("api.example.com").await.unwrap();
    assert!(
        matches!(after, Some(d) if d <= Duration::from_secs(60)),
        "{after:?}"
    );
}
