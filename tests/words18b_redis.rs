//! The Redis parts of docs/guides/idempotency.md and docs/guides/webhooks.md and sturdy-redis's
//! rustdoc, read literally: an unreachable store answers 503 without running the handler and
//! says so without the password; a handler whose client timed out keeps its key in Redis; a
//! webhook acknowledged into the Redis stream survives consumers whose reads are dropped.
//! Against the real Redis at STURDY_REDIS_URL (skipped without it).
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer};
use sturdy::redis::{RedisIdempotencyStore, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{sign_standard, StandardWebhooks, WebhookReceiver};
use tower::{Service, ServiceBuilder, ServiceExt};

fn url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn unique(tag: &str) -> String {
    use std::time::UNIX_EPOCH;
    let n = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("w18b-{tag}-{n}")
}

/// "`RedisIdempotencyStore::connect(url)` ... When Redis cannot be reached" is an error; it does
/// not name the password of the URL and comes within the documented bounds.
#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let t = tokio::time::Instant::now();
    let r = RedisIdempotencyStore::connect(&format!("redis://user:PW-REDIS-1@{dead}/")).await;
    let e = r.map(drop).expect_err("an error");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains("PW-REDIS-1"), "{text}");
    }
    let q = RedisStreamQueue::connect(&format!("redis://:PW-REDIS-2@{dead}/"), "s").await;
    let e = q.map(drop).expect_err("an error");
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains("PW-REDIS-2"), "{text}");
    }
}

/// "client timeout mid-handler | the handler runs to its end in its own task; its response is
/// stored" — with the Redis store (its own prefix), under tower's `Timeout`.
#[tokio::test]
async fn redis_store_keeps_the_key_of_a_timed_out_client() {
    let Some(url) = url() else { return };
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idem"));
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    r.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "done")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_millis(50))
        .service(app);
    let req = || {
        Request::post("/orders")
            .header("idempotency-key", "redis-k1")
            .body(Body::from("x"))
            .unwrap()
    };
    assert!(ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(req())
        .await
        .is_err());
    let res = ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(req())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(res.headers()["retry-after"], "1");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains(problem::IN_FLIGHT));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = ServiceExt::<Request<Body>>::ready(&mut svc)
        .await
        .unwrap()
        .call(req())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// "store unreachable ... | 503, `Retry-After: 1`, `…/idempotency-store-unavailable`; the
/// handler does not run": a Redis store whose server went away.
#[tokio::test]
async fn store_down_is_503_without_running() {
    let Some(url) = url() else { return };
    // A proxy we can cut: connect through it, then close it.
    let upstream: std::net::SocketAddr = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (mut a, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut b = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
    });
    let store = RedisIdempotencyStore::connect(&format!("redis://{proxy}/"))
        .await
        .unwrap()
        .with_prefix(unique("down"))
        .with_timeout(Duration::from_millis(200));
    task.abort();
    let _ = task.await;
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                r.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::CREATED }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    // Whatever the connection manager does with the cut connection, the answer is bounded.
    let res = tokio::time::timeout(
        Duration::from_secs(5),
        app.oneshot(
            Request::post("/orders")
                .header("idempotency-key", "down-1")
                .body(Body::from("x"))
                .unwrap(),
        ),
    )
    .await
    .expect("no answer from a layer whose store is down")
    .unwrap();
    if res.status() == StatusCode::SERVICE_UNAVAILABLE {
        assert_eq!(res.headers()["retry-after"], "1");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains(problem::STORE_UNAVAILABLE));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    } else {
        // The proxy's live connection may still carry the command: then it ran normally.
        assert_eq!(res.status(), StatusCode::CREATED);
    }
}

/// "200 only once the event is queued"; "a `next()` cancelled by a timeout or a `select!` loses
/// nothing (an event a dropped read took is delivered again after the claim delay)".
#[tokio::test]
async fn acknowledged_event_survives_dropped_reads() {
    let Some(url) = url() else { return };
    let stream = unique("stream");
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream.clone(), "g", "c1", Duration::from_millis(300))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(200));
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let receiver = WebhookReceiver::new(StandardWebhooks::new(secret).unwrap(), queue);
    let ts = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let sig = sign_standard(secret, "msg_r1", ts, b"{}").unwrap();
    let req = Request::post("/h")
        .header("webhook-id", "msg_r1")
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Body::from("{}"))
        .unwrap();
    let res = receiver.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // Reads dropped at every await point: a range of short deadlines.
    for us in [1u64, 10, 100, 300, 1_000, 3_000] {
        let _ = tokio::time::timeout(Duration::from_micros(us), consumer.next()).await;
    }
    let mut got = None;
    let t = tokio::time::Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Some(d) = consumer.next().await.unwrap() {
            got = Some(d);
            break;
        }
    }
    let d = got.expect("the acknowledged event was lost");
    assert_eq!(d.event.id, "msg_r1");
    consumer.ack(&d).await.unwrap();
}

/// "Connects to one Redis server at `url` ..., within 2 s"; "a Redis that is down or hung gives
/// a clear error, never a hang": a server that accepts connections and never answers.
#[tokio::test]
async fn hung_redis_on_connect() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(vec![]));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    let url = format!("redis://:PW-HUNG@{addr}/");
    let t = tokio::time::Instant::now();
    let a = RedisIdempotencyStore::connect(&url)
        .await
        .map(drop)
        .expect_err("an error");
    let b = RedisStreamQueue::connect(&url, "s")
        .await
        .map(drop)
        .expect_err("an error");
    let c = RedisStreamConsumer::connect(&url, "s", "g", "c", Duration::from_secs(1))
        .await
        .map(drop)
        .expect_err("an error");
    let d = sturdy::redis::RedisConnection::connect_cluster([url.as_str()])
        .await
        .map(drop)
        .expect_err("an error");
    assert!(
        t.elapsed() < Duration::from_secs(4 * 3),
        "{:?}",
        t.elapsed()
    );
    for e in [a, b, c, d] {
        let m = e.to_string();
        assert!(!m.contains("PW-HUNG"), "{m}");
        assert!(m.contains("Redis"), "{m}");
    }
}
