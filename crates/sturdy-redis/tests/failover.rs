//! Failover and restarts: Redis servers started by the test itself, on ports of their own, are
//! killed mid-run. Every backend answers within its bound with a clear error while Redis is
//! gone, acknowledges nothing it did not store, and recovers on the same connection.

use crate::support;
use support::servers::{self, Cluster, Server, TempDir};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy_core::{BoxError, WallClock};
use sturdy_idempotency::server::{
    Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken, StoredResponse,
};
use sturdy_ratelimit::{OnStoreError, Quota, RateLimitLayer, Reserve};
use sturdy_redis::{
    RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue,
};
use sturdy_webhook::{EventQueue, Push, StandardWebhooks, WebhookEvent, WebhookReceiver};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

const SECRET: &str = "whsec_c3R1cmR5LWZhaWxvdmVyLXRlc3Qtc2VjcmV0IQ==";

fn now_secs() -> i64 {
    let t = WallClock::now(&sturdy_core::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(t.as_secs()).unwrap()
}

fn delivery(id: &str) -> Request<Full<Bytes>> {
    let body = format!("{{\"id\":\"{id}\"}}");
    let ts = now_secs();
    let sig = sturdy_webhook::sign_standard(SECRET, id, ts, body.as_bytes()).unwrap();
    Request::post("/webhooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn order(key: &str) -> Request<Full<Bytes>> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{\"item\":\"book\"}")))
        .unwrap()
}

fn call() -> Request<()> {
    Request::get("http://api.example.com/").body(()).unwrap()
}

/// Runs `f`, asserting it returns within `bound`.
async fn within<T>(bound: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    let start = Instant::now();
    let out = f.await;
    assert!(
        start.elapsed() <= bound,
        "{what} took {:?} (bound {bound:?})",
        start.elapsed()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_survived_by_every_backend_on_the_same_connection() {
    if !servers::available() {
        return;
    }
    let dir = TempDir::new("restart");
    let port = servers::free_ports(1)[0];
    // Durable: every write is on disk before Redis answers, so a crash loses nothing it
    // acknowledged.
    let mut redis = Server::start(
        &dir.0,
        port,
        &["--appendonly", "yes", "--appendfsync", "always"],
    )
    .await;
    let conn = RedisConnection::connect(&redis.url()).await.unwrap();

    let quota = Quota::per_second(1_000).unwrap();
    let remote = Arc::new(RedisQuota::new(conn.clone(), quota));
    let ok = service_fn(|_r: Request<()>| async { Ok::<_, BoxError>(Response::new(())) });
    let open = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .layer(ok);
    let closed = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .with_on_store_error(OnStoreError::Fail)
        .layer(ok);

    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let handler = service_fn(move |_req: Request<Full<Bytes>>| {
        r.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(StatusCode::CREATED)
                    .body(Full::new(Bytes::from_static(b"order o_1")))
                    .unwrap(),
            )
        }
    });
    let store = RedisIdempotencyStore::new(conn.clone());
    let app = IdempotencyLayer::new(store, ByCredentials::default()).layer(handler);

    let queue = RedisStreamQueue::new(conn.clone(), "{webhooks}").unwrap();
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let mut consumer = RedisStreamConsumer::join(
        conn.clone(),
        "{webhooks}",
        "g",
        "w",
        Duration::from_secs(30),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(20));

    // Up: an order, two events, a decision.
    let res = app.clone().oneshot(order("k1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    for id in ["evt_1", "evt_2"] {
        let res = receiver.clone().oneshot(delivery(id)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert!(matches!(
        remote
            .try_reserve("api.example.com", Duration::ZERO)
            .await
            .unwrap(),
        Reserve::Granted { .. }
    ));

    // Down (a crash): each backend answers within its bound, and says so.
    redis.kill().await;
    let bound = Duration::from_millis(2_500);
    let res = within(
        bound,
        "the receiver",
        receiver.clone().oneshot(delivery("evt_3")),
    )
    .await
    .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "not acknowledged: not stored"
    );
    assert!(res.headers().contains_key("retry-after"));
    let res = within(
        bound,
        "the idempotency layer",
        app.clone().oneshot(order("k2")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("idempotency-store-unavailable"),
        "{body:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the handler did not run without its store"
    );
    within(bound, "the fail-open limiter", open.clone().oneshot(call()))
        .await
        .expect("fail-open lets the call through");
    let e = within(
        bound,
        "the fail-closed limiter",
        closed.clone().oneshot(call()),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("rate-limit store failed"), "{e}");
    let e = within(bound, "the consumer", consumer.next())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("Redis"), "{e}");

    // Back (same port, same files), and the same objects work again, with nothing lost.
    redis.restart().await;
    let start = Instant::now();
    loop {
        let res = receiver.clone().oneshot(delivery("evt_3")).await.unwrap();
        if res.status() == StatusCode::OK {
            break;
        }
        // A bound on "recovers by itself", generous for a loaded machine: the connection's
        // reconnection backoff grew while the server was down.
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no recovery: {}",
            res.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got = Vec::new();
    while let Some(d) = consumer.next().await.unwrap() {
        got.push(d.event.id.clone());
        consumer.ack(&d).await.unwrap();
    }
    assert_eq!(
        got,
        ["evt_1", "evt_2", "evt_3"],
        "every acknowledged event survived"
    );
    let res = app.clone().oneshot(order("k1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(
        res.headers().contains_key("idempotent-replayed"),
        "the stored response survived"
    );
    let res = app.clone().oneshot(order("k2")).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(runs.load(Ordering::SeqCst), 2, "k1 once, k2 once");
    closed
        .clone()
        .oneshot(call())
        .await
        .expect("decisions again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_run_fails_over_and_every_backend_recovers() {
    if !servers::available() {
        return;
    }
    let mut cluster = Cluster::start(1_000).await;
    let conn = RedisConnection::connect_cluster(cluster.urls())
        .await
        .unwrap();
    // Every key in one slot, so that the one primary killed holds them all.
    let stream = "{fo}:events";
    let quota =
        RedisQuota::new(conn.clone(), Quota::per_second(10_000).unwrap()).with_prefix("{fo}:rl");
    let store = RedisIdempotencyStore::new(conn.clone())
        .with_prefix("{fo}:idem")
        .with_replication(1, Duration::from_millis(500));
    let queue = RedisStreamQueue::new(conn.clone(), stream)
        .unwrap()
        .with_replication(1, Duration::from_millis(500));
    let mut consumer =
        RedisStreamConsumer::join(conn.clone(), stream, "g", "w", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(10));
    let victim = cluster.primary_of("fo").await;

    // One operation of each backend per round, until a while after the kill.
    let bound = Duration::from_millis(2_000);
    let fp = [7u8; 32];
    let lease = Duration::from_secs(30);
    let mut enqueued = BTreeSet::new();
    let mut completed = BTreeSet::new();
    let mut failed_rounds = Vec::new();
    let mut killed_at = None;
    let mut restarted = false;
    let mut ok_since_kill = 0;
    let start = Instant::now();
    for round in 0u32.. {
        if killed_at.is_none() && start.elapsed() > Duration::from_millis(300) {
            cluster.nodes[victim].kill().await;
            killed_at = Some(Instant::now());
        }
        // Once its replica has taken over, the dead node comes back (as an operator or a
        // supervisor would restart it) and rejoins as the new primary's replica: until then,
        // writes that must reach a replica cannot be confirmed, and fail.
        if !restarted && killed_at.is_some_and(|t| t.elapsed() > Duration::from_millis(2_500)) {
            cluster.nodes[victim].restart().await;
            restarted = true;
        }
        let mut errors = Vec::new();
        let id = format!("evt_{round}");
        let ev = WebhookEvent::new("standard", &id, Bytes::from(format!("{round}")));
        match within(bound, "enqueue", queue.push(ev, Duration::from_secs(600))).await {
            Ok(Push::Enqueued) => {
                enqueued.insert(id);
            }
            Ok(other) => panic!("{other:?}"),
            Err(e) => errors.push(e.to_string()),
        }
        let key = format!("k{round}");
        let token = LockToken::random();
        match within(bound, "begin", store.begin(&key, fp, token, lease)).await {
            Ok(Begin::Started) => {
                let resp = StoredResponse {
                    status: 201,
                    headers: Vec::new(),
                    body: Bytes::from_static(b"order"),
                };
                match within(
                    bound,
                    "complete",
                    store.complete(&key, fp, token, resp, lease),
                )
                .await
                {
                    Ok(()) => {
                        completed.insert(key);
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            Ok(other) => panic!("{key}: {other:?}"),
            Err(e) => errors.push(e.to_string()),
        }
        if let Err(e) = within(bound, "reserve", quota.try_reserve("api", Duration::ZERO)).await {
            errors.push(e.to_string());
        }
        if killed_at.is_some() {
            if errors.is_empty() {
                ok_since_kill += 1;
            } else {
                ok_since_kill = 0;
                let since = killed_at.map(|t| t.elapsed());
                failed_rounds.push((round, since, errors));
            }
            if ok_since_kill >= 20 {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "no recovery after the failover: {:?}",
            failed_rounds.last()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let outage = killed_at.unwrap().elapsed();
    eprintln!(
        "{} failed rounds; recovered within {outage:?} of the kill",
        failed_rounds.len()
    );
    for r in &failed_rounds {
        eprintln!("{r:?}");
    }
    assert!(!failed_rounds.is_empty(), "the kill was noticed");
    // The promoted replica serves the slot now, on the same connection.
    let new_primary = cluster.primary_of("fo").await;
    assert_ne!(new_primary, victim);
    // Every event the queue acknowledged is there (replicated before it was acknowledged),
    // and comes out once.
    let mut got = BTreeMap::new();
    while let Some(d) = consumer.next().await.unwrap() {
        *got.entry(d.event.id.clone()).or_insert(0) += 1;
        consumer.ack(&d).await.unwrap();
    }
    let missing: Vec<_> = enqueued
        .iter()
        .filter(|id| !got.contains_key(*id))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(got.values().all(|n| *n == 1));
    // Every stored response is still there.
    for key in &completed {
        assert!(
            matches!(
                store
                    .begin(key, fp, LockToken::random(), lease)
                    .await
                    .unwrap(),
                Begin::Completed(_)
            ),
            "{key}: its stored response was lost"
        );
    }
    assert!(matches!(
        quota.try_reserve("api", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
}
