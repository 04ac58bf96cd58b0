//! Interop: signature headers from the real Standard Webhooks and Stripe libraries mixed with
//! entries of other versions; a Redis-shared quota and pause against nginx; Deprecation and
//! Sunset reports from a peer of the test's own.
use crate::interop_common;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post_service;
use axum::Router;
use futures_util::future::join_all;
use http::{Request, StatusCode};
use interop_common::*;
use serde_json::json;
use sturdy::core::{SystemClock, WallClock};
use sturdy::ratelimit::{Quota, RateLimitLayer};
use sturdy::redis::RedisQuota;
use sturdy::webhook::{MemoryQueue, MemoryReceiver, StandardWebhooks, Stripe, WebhookReceiver};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const NODE_DIR: &str = "STURDY_INTEROP_NODE_DIR";
const NGINX: &str = "STURDY_INTEROP_NGINX_URL";
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_interop24_stripe_endpoint_secret";

fn now() -> i64 {
    SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(dir: &str, cases: &serde_json::Value) -> Vec<String> {
    let mut child = Command::new("node")
        .arg(format!("{dir}/sign.js"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sign.js: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn standard_app() -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue);
    (Router::new().route("/wh", post_service(receiver)), events)
}

fn stripe_app() -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue);
    (Router::new().route("/wh", post_service(receiver)), events)
}

async fn deliver(app: &Router, headers: &[(&str, String)], body: &str) -> StatusCode {
    let mut req = Request::post("/wh").header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    app.clone()
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap()
        .status()
}

/// docs/guides/webhooks.md: "only the first `MAX_SIGNATURES` (16) `v1` entries of a Standard
/// Webhooks or Stripe header are considered". Entries of other versions (`v1a` asymmetric
/// signatures in Standard Webhooks, `v0` in Stripe, which its own library ignores) are not `v1`
/// entries: 100 of them before the library's real `v1` entry do not hide it.
#[tokio::test]
async fn entries_of_other_versions_do_not_count_against_the_sixteen() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let body = r#"{"id":"evt_versions","type":"x"}"#;
    let sigs = sign(
        &dir,
        &json!([
            {"scheme":"standard","secret":SW_SECRET,"id":"msg_versions","timestamp":ts,"payload":body},
            {"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":ts,"payload":body},
        ]),
    );
    let other = "v1a,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=";
    let mut entries = vec![other.to_string(); 100];
    entries.push(sigs[0].clone());
    let (app, _events) = standard_app();
    let status = deliver(
        &app,
        &[
            ("webhook-id", "msg_versions".to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", entries.join(" ")),
        ],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "100 v1a entries, then the real v1");

    let real_v1 = sigs[1].split(",v1=").nth(1).unwrap();
    let mut parts = vec![format!("t={ts}")];
    parts.extend(std::iter::repeat_n(format!("v0={}", "ab".repeat(32)), 100));
    parts.push(format!("v1={real_v1}"));
    let (app, _events) = stripe_app();
    let status = deliver(&app, &[("stripe-signature", parts.join(","))], body).await;
    assert_eq!(status, StatusCode::OK, "100 v0 entries, then the real v1");
}

/// Stripe's library signs; the header is sent with its entries reordered (`v1` before `t`) and
/// with spaces after the commas: still a Stripe signature header as Stripe's own verifier reads
/// it, so it verifies.
#[tokio::test]
async fn stripe_header_order_and_spaces() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let body = r#"{"id":"evt_order","type":"x"}"#;
    let sigs = sign(
        &dir,
        &json!([{"scheme":"stripe","secret":STRIPE_SECRET,"timestamp":ts,"payload":body}]),
    );
    let real_v1 = sigs[0].split(",v1=").nth(1).unwrap();
    let (app, _events) = stripe_app();
    let status = deliver(
        &app,
        &[("stripe-signature", format!("v1={real_v1},t={ts}"))],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "v1 before t");
}

/// docs/guides/ratelimit.md ("Several processes: Redis"): two limiters sharing one
/// `RedisQuota` (two processes, as far as the quota knows) with a quota just under nginx's
/// 10 r/s (19 per 2 s, no burst): 16 GETs from each at once; every call succeeds, the 32 take
/// the shared pace's time, and nginx refuses only the few that arrival jitter brings closer than
/// its 100 ms (two quotas that were not shared would send twice nginx's rate: about half refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limiters_sharing_a_redis_quota_stay_under_nginx() {
    let base = peer_or_skip!(NGINX);
    let Ok(redis) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("skipped: STURDY_REDIS_URL is not set");
        return;
    };
    let quota = Quota::new(19, Duration::from_secs(2)).unwrap();
    let prefix = format!("interop24:{}:{}", std::process::id(), now());
    let mut clients = vec![];
    let mut wires = vec![];
    for _ in 0..2 {
        let remote = RedisQuota::connect(&redis, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        let (svc, wire) = recorded(http());
        clients.push(
            ClientBuilder::new()
                .with_rate_limit(RateLimitLayer::new(quota).with_remote(Arc::new(remote)))
                .build(svc),
        );
        wires.push(wire);
    }
    let url = format!("{base}/strict/interop24-redis-{prefix}");
    let start = Instant::now();
    let calls = clients.iter().flat_map(|c| {
        (0..16).map({
            let url = url.clone();
            move |_| c.clone().oneshot(get(&url))
        })
    });
    let results = bounded(Duration::from_secs(20), "32 GETs", join_all(calls)).await;
    let took = start.elapsed();
    let refused: usize = wires.iter().map(|w| w.count_status(429)).sum();
    let sent: usize = wires.iter().map(|w| w.len()).sum();
    eprintln!("two limiters on one Redis quota: {sent} requests, {refused} 429s, {took:?}");
    for r in &results {
        assert_eq!(r.as_ref().map(|r| r.status().as_u16()).ok(), Some(200));
    }
    // Slots are 105 ms apart and nginx wants 100: a send woken 5 ms late on a loaded machine
    // arrives too close to the next one. One CI run saw 3 of 35; unshared quotas would see ~16.
    assert!(refused <= 5, "{refused} 429s from nginx");
    // 32 calls at 9.5 per second: about 3.3 s.
    assert!(took >= Duration::from_millis(2800), "{took:?}");
}

/// docs/guides/ratelimit.md: "Pauses are published to Redis". nginx's `/retry-after/` answers
/// limiter A with 429 `Retry-After: 1`; limiter B, sharing the Redis quota, holds its next call
/// (made 100 ms later) until that pause ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_from_nginx_reaches_the_other_limiter_through_redis() {
    let base = peer_or_skip!(NGINX);
    let Ok(redis) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("skipped: STURDY_REDIS_URL is not set");
        return;
    };
    let quota = Quota::per_second(1000).unwrap().with_burst(100).unwrap();
    let prefix = format!("interop24p:{}:{}", std::process::id(), now());
    let layer = |remote: RedisQuota| RateLimitLayer::new(quota).with_remote(Arc::new(remote));
    let a = layer(
        RedisQuota::connect(&redis, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone()),
    )
    .layer(http());
    let b = layer(
        RedisQuota::connect(&redis, quota)
            .await
            .unwrap()
            .with_prefix(prefix.clone()),
    )
    .layer(http());
    let url = format!("{base}/retry-after/interop24-redis-pause-{prefix}");
    // Burst 5 at nginx: the 7th call or so is refused with Retry-After: 1.
    let mut paused_at = None;
    for _ in 0..12 {
        let res = a.clone().oneshot(get(&url)).await.unwrap();
        if res.status() == 429 {
            paused_at = Some(Instant::now());
            break;
        }
    }
    let paused_at = paused_at.expect("nginx refused one of 12 quick calls");
    // The pause may reach Redis after A's caller has its 429: give it a moment.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = bounded(
        Duration::from_secs(5),
        "limiter B's call during A's pause",
        b.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    let waited = paused_at.elapsed();
    eprintln!("B's call came back after {waited:?}: {}", res.status());
    assert!(
        waited >= Duration::from_millis(900),
        "B did not wait for A's pause: {waited:?}"
    );
    assert_eq!(res.status(), 200);
}

/// docs/guides/version.md: "Responses carrying `Deprecation` ... or `Sunset` ... are reported
/// once per endpoint ... An endpoint is the method and the path, ids included". Two paths, each
/// called three times with different queries, and a POST to one of them: three reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deprecation_reported_once_per_method_and_path() {
    let app = Router::new().fallback(|| async {
        (
            [
                ("deprecation", "@1700000000"),
                ("sunset", "Wed, 01 Jan 2031 00:00:00 GMT"),
            ],
            "ok",
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let version = sturdy::version::VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n| log.lock().unwrap().push(format!("{n:?}")));
    let client = ClientBuilder::new().with_version(version).build(http());
    for path in ["/orders/1", "/orders/2"] {
        for q in ["", "?page=2", "?page=3"] {
            let res = client
                .clone()
                .oneshot(get(&format!("http://{addr}{path}{q}")))
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
        }
    }
    let res = client
        .clone()
        .oneshot(post(&format!("http://{addr}/orders/1"), "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:#?}");
}

/// Two instances of an axum app, each with `IdempotencyLayer` over one `RedisIdempotencyStore`
/// (the real Redis), and ten `ClientBuilder` clients sending the same order under one key
/// (`CallOptions::with_idempotency_key`) to either instance at once: the handler runs once
/// ("the store's atomic lock lets exactly one execution start, across every instance sharing
/// the store"), the others get 409 with `Retry-After: 1`, wait and get the stored response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_across_two_instances_on_redis() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer};
    use sturdy::redis::RedisIdempotencyStore;
    let Ok(redis) = std::env::var("STURDY_REDIS_URL") else {
        eprintln!("skipped: STURDY_REDIS_URL is not set");
        return;
    };
    let runs = Arc::new(AtomicUsize::new(0));
    let prefix = format!("interop24:idem:{}:{}", std::process::id(), now());
    let mut bases = vec![];
    for _ in 0..2 {
        let store = RedisIdempotencyStore::connect(&redis)
            .await
            .unwrap()
            .with_prefix(prefix.clone());
        let runs = runs.clone();
        let app = Router::new()
            .route(
                "/orders",
                axum::routing::post(move |body: String| {
                    let runs = runs.clone();
                    async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        (
                            StatusCode::CREATED,
                            format!("{{\"run\":{n},\"body\":{body}}}"),
                        )
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store, ByCredentials::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        bases.push(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }
    let key = format!("order-{prefix}");
    let calls = (0..10).map(|i| {
        let client = ClientBuilder::new().build(http());
        let url = format!("{}/orders", bases[i % 2]);
        let key = key.clone();
        async move {
            let mut req = post(&url, r#"{"item":"book"}"#);
            req.extensions_mut()
                .insert(sturdy::core::CallOptions::new().with_idempotency_key(key));
            let res = client.oneshot(req).await?;
            let status = res.status();
            let replayed = res.headers().contains_key("idempotent-replayed");
            Ok::<_, sturdy::core::BoxError>((status, replayed, json(res).await))
        }
    });
    let results = bounded(Duration::from_secs(15), "ten keyed POSTs", join_all(calls)).await;
    let mut replays = 0;
    for r in results {
        let (status, replayed, body) = r.unwrap_or_else(|e| panic!("{}", chain(&*e)));
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["run"], 1, "{body}");
        replays += replayed as usize;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(replays, 9, "nine stored responses");
}
