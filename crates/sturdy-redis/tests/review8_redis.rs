//! Review of the Redis changes against the real Redis at STURDY_REDIS_URL: lock tokens in the
//! idempotency values (and values written without one), the release after a `begin` whose
//! replicas did not confirm it, and the stream consumer's short reads (timing, RESP3).

use crate::support;
use support::{redis_url, unique};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use sturdy_idempotency::server::{
    Begin, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken, StoredResponse,
};
use sturdy_redis::{RedisConnection, RedisIdempotencyStore, RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};
use tokio::time::Instant;
use tower::ServiceExt;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn hex(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

fn response(body: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::from(body.to_owned()),
    }
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("{{\"id\":\"{id}\"}}")))
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_lock_is_stored_as_fingerprint_and_token() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("r8-format");
    let st = RedisIdempotencyStore::new(RedisConnection::connect(&url).await.unwrap())
        .with_prefix(&prefix);
    let fp = [0xabu8; 32];
    let t = LockToken::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
    assert_eq!(st.begin("k", fp, t, LEASE).await.unwrap(), Begin::Started);
    let mut conn = raw(&url).await;
    let v: String = redis::cmd("GET")
        .arg(format!("{prefix}:k"))
        .query_async(&mut conn)
        .await
        .unwrap();
    // `i:<fingerprint>:<token>:<call>`: the call is new for each `begin` (32 hex digits).
    let (head, call) = v.rsplit_once(':').unwrap();
    assert_eq!(head, format!("i:{}:{t}", hex(&fp)));
    assert_eq!(call.len(), 32, "{v}");
    assert!(call.bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
    // Released only by its token, whatever the fingerprint says.
    st.release("k", LockToken::from_u128(1)).await.unwrap();
    assert_eq!(
        st.begin("k", fp, LockToken::random(), LEASE).await.unwrap(),
        Begin::InFlight
    );
    st.release("k", t).await.unwrap();
    assert_eq!(
        st.begin("k", fp, LockToken::random(), LEASE).await.unwrap(),
        Begin::Started
    );
}

/// A lock written by a version without tokens (`i:<fp>`): the new scripts neither free,
/// renew nor complete it; it runs out with its lease, as the rustdoc says.
#[tokio::test]
async fn a_lock_written_without_a_token_is_left_to_its_lease() {
    let Some(url) = redis_url() else { return };
    let prefix = unique("r8-old");
    let st = RedisIdempotencyStore::new(RedisConnection::connect(&url).await.unwrap())
        .with_prefix(&prefix);
    let fp = [7u8; 32];
    let key = format!("{prefix}:k");
    let old = format!("i:{}", hex(&fp));
    let mut conn = raw(&url).await;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&old)
        .arg("PX")
        .arg(400)
        .query_async(&mut conn)
        .await
        .unwrap();
    let t = LockToken::random();
    assert_eq!(st.begin("k", fp, t, LEASE).await.unwrap(), Begin::InFlight);
    assert_eq!(
        st.begin("k", [8u8; 32], t, LEASE).await.unwrap(),
        Begin::Mismatch
    );
    assert!(!st.renew("k", fp, t, LEASE).await.unwrap());
    st.complete("k", fp, t, response("x"), TTL).await.unwrap();
    st.release("k", t).await.unwrap();
    // A token of all zeros, or the empty tail of the old value: neither matches.
    st.release("k", LockToken::from_u128(0)).await.unwrap();
    let v: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, old, "an old lock was changed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(st.begin("k", fp, t, LEASE).await.unwrap(), Begin::Started);
}

/// `with_replication`'s rustdoc and docs/RELIABILITY.md: when fewer replicas confirm a
/// `begin`, "the layer then answers 503 without running the handler (for `begin`; the lock
/// stays until its lease ends)". The new background release after a failed `begin` frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_its_replicas_did_not_confirm_is_released_and_a_retry_runs() {
    let Some(url) = redis_url() else { return };
    // The test Redis has no replica: WAIT 1 answers 0 after the replication timeout.
    let prefix = unique("r8-repl");
    let runs = Arc::new(AtomicU32::new(0));
    let app = |st: RedisIdempotencyStore| {
        let r = runs.clone();
        Router::new()
            .route(
                "/orders",
                post(move || {
                    r.fetch_add(1, Ordering::SeqCst);
                    async { StatusCode::CREATED }
                }),
            )
            .layer(IdempotencyLayer::new(st, ByCredentials::default()))
    };
    let conn = RedisConnection::connect(&url).await.unwrap();
    let replicated = RedisIdempotencyStore::new(conn.clone())
        .with_prefix(&prefix)
        .with_replication(1, Duration::from_millis(20));
    let plain = RedisIdempotencyStore::new(conn).with_prefix(&prefix);
    let order = || {
        Request::post("/orders")
            .header("idempotency-key", "k-repl")
            .body(Body::from("{}"))
            .unwrap()
    };
    let res = app(replicated).oneshot(order()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut c = raw(&url).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let res = app(plain).oneshot(order()).await.unwrap();
    assert_eq!(
        (res.status(), keys.len()),
        (StatusCode::CREATED, 0),
        "documented: the lock is released in the background (keys left: {keys:?})"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// An empty stream: `next` answers `None` after its wait, not much later, and asks Redis a
/// bounded number of times; a wait of zero answers at once; an event pushed while it waits is
/// seen within about 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polling_consumer_keeps_to_its_wait_and_sees_a_late_event_soon() {
    let Some(url) = redis_url() else { return };
    let conn = RedisConnection::connect(&url).await.unwrap();
    let s = unique("r8-poll");
    let q = RedisStreamQueue::new(conn.clone(), &s).unwrap();
    let mut c = RedisStreamConsumer::join(conn.clone(), &s, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(300));
    let t = Instant::now();
    assert!(c.next().await.unwrap().is_none());
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(1),
        "{took:?}"
    );

    let mut zero = RedisStreamConsumer::join(conn.clone(), &s, "g", "z", TTL)
        .await
        .unwrap()
        .with_wait(Duration::ZERO);
    let t = Instant::now();
    assert!(zero.next().await.unwrap().is_none());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    // Past the doubling (5, 10, 20, 40, 80, then 100 ms apart): seen within about 100 ms.
    let mut long = RedisStreamConsumer::join(conn.clone(), &s, "g", "l", TTL)
        .await
        .unwrap()
        .with_wait(Duration::MAX);
    let waiting = tokio::spawn(async move {
        let d = long.next().await;
        (Instant::now(), d)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pushed = Instant::now();
    assert_eq!(q.push(event("late"), TTL).await.unwrap(), Push::Enqueued);
    let (seen, d) = tokio::time::timeout(Duration::from_secs(2), waiting)
        .await
        .expect("a wait of Duration::MAX never saw the event")
        .unwrap();
    assert_eq!(d.unwrap().unwrap().event.id, "late");
    let lag = seen - pushed;
    // Reads are at most 100 ms apart; the rest is scheduling on a loaded machine.
    assert!(lag < Duration::from_millis(400), "{lag:?}");
}

/// The consumer on a RESP3 connection: `XREADGROUP` answers a map, and nothing is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_polling_consumer_reads_resp3_answers() {
    let Some(url) = redis_url() else { return };
    let resp3 = if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    };
    let conn = RedisConnection::connect(&resp3).await.unwrap();
    let s = unique("r8-resp3");
    let q = RedisStreamQueue::new(conn.clone(), &s).unwrap();
    let mut c = RedisStreamConsumer::join(conn.clone(), &s, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(300));
    assert!(c.next().await.unwrap().is_none());
    for i in 0..5 {
        assert_eq!(
            q.push(event(&format!("e{i}")), TTL).await.unwrap(),
            Push::Enqueued
        );
    }
    for i in 0..5 {
        let d = c.next().await.unwrap().expect("an event on RESP3");
        assert_eq!(d.event.id, format!("e{i}"));
        assert_eq!(d.deliveries, 1);
        c.ack(&d).await.unwrap();
    }
    // One pushed while it waits.
    let q2 = q.clone();
    let push = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(120)).await;
        q2.push(event("mid"), TTL).await.unwrap()
    });
    let d = c.next().await.unwrap().expect("the event pushed mid-wait");
    assert_eq!(d.event.id, "mid");
    assert_eq!(push.await.unwrap(), Push::Enqueued);
    assert!(q.dead_letters(None, 0).await.unwrap().is_empty());
}
