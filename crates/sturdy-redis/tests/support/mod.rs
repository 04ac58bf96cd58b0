//! Shared by the Redis tests.

// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

pub(crate) mod proxy;
pub(crate) mod servers;

use sturdy_redis::RedisConnection;

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The URL of the Redis the test suite started, or `None` to skip; in CI a missing URL fails.
pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("STURDY_REDIS_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if in_ci() => panic!("STURDY_REDIS_URL must be set in CI"),
        _ => {
            eprintln!("STURDY_REDIS_URL is not set: skipping a Redis test");
            None
        }
    }
}

/// The node URLs of the Redis Cluster the test suite started, or `None` to skip; in CI a
/// missing variable fails.
pub(crate) fn cluster_urls() -> Option<Vec<String>> {
    match std::env::var("STURDY_REDIS_CLUSTER_URLS") {
        Ok(u) if !u.trim().is_empty() => Some(
            u.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        ),
        _ if in_ci() => panic!("STURDY_REDIS_CLUSTER_URLS must be set in CI"),
        _ => {
            eprintln!("STURDY_REDIS_CLUSTER_URLS is not set: skipping a Redis Cluster test");
            None
        }
    }
}

/// A Redis deployment a test runs against.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Single(String),
    Cluster(Vec<String>),
}

impl Backend {
    pub(crate) async fn conn(&self) -> RedisConnection {
        match self {
            Self::Single(url) => RedisConnection::connect(url).await.unwrap(),
            Self::Cluster(urls) => RedisConnection::connect_cluster(urls).await.unwrap(),
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Single(_) => "single server",
            Self::Cluster(_) => "cluster",
        }
    }
}

/// Every deployment configured: the single server and the cluster (in CI both must be).
pub(crate) fn backends() -> Vec<Backend> {
    let mut all = Vec::new();
    if let Some(u) = redis_url() {
        all.push(Backend::Single(u));
    }
    if let Some(u) = cluster_urls() {
        all.push(Backend::Cluster(u));
    }
    all
}

/// A name no other test run uses.
pub(crate) fn unique(name: &str) -> String {
    let t = sturdy_core::WallClock::now(&sturdy_core::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sturdy-test:{name}:{}:{t}", std::process::id())
}
