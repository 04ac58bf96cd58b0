//! Cancellation against the Redis backends: every operation dropped at every await (after a
//! given number of polls, or by a timeout of a few microseconds). The next operation on the same
//! object must get its own answer, no key may stay locked that the docs say is released, no
//! slot may be lost, and no webhook event may be lost.

use crate::support;
use support::{backends, unique, Backend};

use std::collections::{BTreeMap, BTreeSet};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use sturdy_idempotency::server::{Begin, Fingerprint, IdempotencyStore, StoredResponse};
use sturdy_ratelimit::{Quota, Reserve};
use sturdy_redis::{RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};
use tokio::time::Instant;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

/// Polls `fut` at most `n` times (yielding in between), then drops it.
async fn poll_then_drop<F: Future>(fut: F, n: usize) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut polls = 0;
    poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => {
            polls += 1;
            if polls >= n {
                Poll::Ready(None)
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    })
    .await
}

/// Drops `fut` at the `i`th cancellation point of a schedule that mixes poll counts and
/// timeouts of a few microseconds to a few milliseconds.
async fn cancel<F: Future>(fut: F, i: usize) -> Option<F::Output> {
    if i.is_multiple_of(2) {
        poll_then_drop(fut, 1 + (i / 2) % 8).await
    } else {
        let micros = u64::try_from((i * 37) % 3000).unwrap();
        tokio::time::timeout(Duration::from_micros(micros), fut)
            .await
            .ok()
    }
}

fn fp(n: u8) -> Fingerprint {
    [n; 32]
}

fn response(body: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::from(body.to_owned()),
    }
}

async fn store(b: &Backend, prefix: &str) -> RedisIdempotencyStore {
    RedisIdempotencyStore::new(b.conn().await).with_prefix(prefix)
}

#[tokio::test]
async fn a_cancelled_store_operation_never_answers_the_next_one() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-cancel-idem");
        let s = store(&b, &prefix).await;
        for k in ["a", "b"] {
            assert_eq!(
                s.begin(k, fp(1), tk(fp(1)), LEASE).await.unwrap(),
                Begin::Started
            );
            s.complete(k, fp(1), tk(fp(1)), response(k), TTL)
                .await
                .unwrap();
        }
        for i in 0..300 {
            let (x, y) = if i % 3 == 0 { ("a", "b") } else { ("b", "a") };
            let _ = cancel(s.begin(x, fp(1), tk(fp(1)), LEASE), i).await;
            assert_eq!(
                s.begin(y, fp(1), tk(fp(1)), LEASE).await.unwrap(),
                Begin::Completed(response(y)),
                "after cancelling begin({x}) at point {i}"
            );
            // A fresh key, then one used with another fingerprint.
            let _ = cancel(s.begin(x, fp(2), tk(fp(2)), LEASE), i + 1).await;
            assert_eq!(
                s.begin(&format!("fresh-{i}"), fp(1), tk(fp(1)), LEASE)
                    .await
                    .unwrap(),
                Begin::Started,
                "point {i}"
            );
            let _ = cancel(s.renew(&format!("fresh-{i}"), fp(1), tk(fp(1)), LEASE), i).await;
            assert_eq!(
                s.begin(y, fp(9), tk(fp(9)), LEASE).await.unwrap(),
                Begin::Mismatch,
                "point {i}"
            );
            let _ = cancel(s.complete(x, fp(3), tk(fp(3)), response("wrong"), TTL), i).await;
            assert!(
                !s.renew(y, fp(1), tk(fp(1)), LEASE).await.unwrap(),
                "point {i}"
            );
        }
        // Nothing a cancelled call sent changed a completed key.
        for k in ["a", "b"] {
            assert_eq!(
                s.begin(k, fp(1), tk(fp(1)), LEASE).await.unwrap(),
                Begin::Completed(response(k))
            );
        }
    }
}

#[tokio::test]
async fn a_cancelled_quota_operation_never_answers_the_next_one() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisQuota::new(b.conn().await, Quota::per_second(1000).unwrap())
            .with_prefix(unique("hunt-cancel-rl"));
        q.try_pause("paused", Duration::from_secs(60))
            .await
            .unwrap();
        for i in 0..300 {
            let _ = cancel(q.try_paused("paused"), i).await;
            assert_eq!(q.try_paused("free").await.unwrap(), None, "point {i}");
            let _ = cancel(q.try_paused("free"), i + 1).await;
            assert!(q.try_paused("paused").await.unwrap().is_some(), "point {i}");
            let _ = cancel(q.try_reserve("free", Duration::ZERO), i).await;
            let r = q.try_reserve("paused", Duration::ZERO).await.unwrap();
            assert!(matches!(r, Reserve::Denied { .. }), "point {i}: {r:?}");
            let _ = cancel(q.try_reserve("paused", Duration::ZERO), i).await;
            assert!(
                q.try_clear_pause("free").await.unwrap().is_none(),
                "point {i}"
            );
        }
    }
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("{{\"id\":\"{id}\"}}")))
}

#[tokio::test]
async fn a_cancelled_push_never_duplicates_or_answers_the_next_push() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-cancel-push");
        let q = RedisStreamQueue::new(b.conn().await, &s).unwrap();
        let mut c = RedisStreamConsumer::join(b.conn().await, &s, "g", "w", TTL)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(10));
        for i in 0..150 {
            let id = format!("e{i}");
            let first = cancel(q.push(event(&id), TTL), i).await;
            let again = q.push(event(&id), TTL).await.unwrap();
            match first {
                Some(r) => {
                    assert_eq!(r.unwrap(), Push::Enqueued);
                    assert_eq!(again, Push::Duplicate, "{id}");
                }
                None => assert!(matches!(again, Push::Enqueued | Push::Duplicate), "{id}"),
            }
            assert_eq!(
                q.push(event(&format!("f{i}")), TTL).await.unwrap(),
                Push::Enqueued,
                "point {i}"
            );
        }
        let mut seen = BTreeMap::new();
        while let Some(d) = c.next().await.unwrap() {
            assert_eq!(d.event.body, event(&d.event.id).body);
            *seen.entry(d.event.id.clone()).or_insert(0) += 1;
            c.ack(&d).await.unwrap();
        }
        assert_eq!(seen.len(), 300);
        assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_next_or_ack_loses_no_event() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-cancel-next");
        let q = RedisStreamQueue::new(b.conn().await, &s).unwrap();
        let claim = Duration::from_millis(150);
        // Cancelled calls that had taken an event count as deliveries: allow many.
        let mut c = RedisStreamConsumer::join(b.conn().await, &s, "g", "w", claim)
            .await
            .unwrap()
            .with_max_deliveries(1000)
            .with_wait(Duration::from_millis(10));
        let mut maybe_acked = BTreeSet::new();
        let all: BTreeSet<String> = (0..25).map(|i| format!("n{i}")).collect();
        for id in &all {
            assert_eq!(q.push(event(id), TTL).await.unwrap(), Push::Enqueued);
        }
        let mut done = BTreeSet::new();
        let start = Instant::now();
        let mut i = 0;
        while done.union(&maybe_acked).count() < all.len()
            && start.elapsed() < Duration::from_millis(2500)
        {
            i += 1;
            let _ = cancel(c.next(), i).await;
            let Some(d) = c.next().await.unwrap() else {
                continue;
            };
            assert_eq!(
                d.event.body,
                event(&d.event.id).body,
                "a reply for another call"
            );
            if d.deliveries == 1 {
                assert!(
                    !done.contains(&d.event.id),
                    "{} delivered twice",
                    d.event.id
                );
            }
            if i % 3 == 0 {
                // A cancelled ack: the event is either acknowledged or delivered again.
                if cancel(c.ack(&d), i).await.is_some() {
                    done.insert(d.event.id.clone());
                } else {
                    maybe_acked.insert(d.event.id.clone());
                }
            } else {
                c.ack(&d).await.unwrap();
                done.insert(d.event.id.clone());
            }
        }
        // Then calls that run to the end, as a consumer's do once cancellations stop: every
        // event still pending comes out within a claim delay or two. (A cancelled `next` whose
        // script reached Redis claims an entry and restarts its claim delay, as documented, so
        // while every round cancels one call an entry can wait for long on a loaded machine:
        // the loop above ends at its time bound, not with every event out.)
        let drain = Instant::now();
        while done.union(&maybe_acked).count() < all.len()
            && drain.elapsed() < Duration::from_secs(5)
        {
            let Some(d) = c.next().await.unwrap() else {
                continue;
            };
            assert_eq!(d.event.body, event(&d.event.id).body);
            c.ack(&d).await.unwrap();
            done.insert(d.event.id.clone());
        }
        let missing: Vec<_> = all
            .difference(&done)
            .filter(|id| !maybe_acked.contains(*id))
            .collect();
        if !missing.is_empty() {
            let mut conn = b.conn().await;
            let pending: redis::Value = redis::cmd("XPENDING")
                .arg(&s)
                .arg("g")
                .query_async(&mut conn)
                .await
                .unwrap();
            let len: u64 = redis::cmd("XLEN")
                .arg(&s)
                .query_async(&mut conn)
                .await
                .unwrap();
            let dead = q.dead_letters(None, 100).await.unwrap();
            panic!(
                "events lost after {i} rounds: {missing:?}; stream length {len}; pending {pending:?}; dead letters {:?}",
                dead.iter().map(|d| (&d.event.id, d.deliveries, &d.reason)).collect::<Vec<_>>()
            );
        }
        assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    }
}

/// How long a push and a begin take on a connection whose clone a consumer waits on with
/// `wait`.
async fn beside_a_waiting_consumer(b: &Backend, wait: Duration) -> Result<Duration, String> {
    let conn = b.conn().await;
    let s = unique("hunt-cancel-shared");
    let mut c = RedisStreamConsumer::join(conn.clone(), &s, "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(wait);
    // Another stream in the same hash slot (on a cluster, the same node).
    let q = RedisStreamQueue::new(conn.clone(), format!("{{{s}}}:other")).unwrap();
    let st = RedisIdempotencyStore::new(conn.clone()).with_prefix(unique("hunt-cancel-sh"));
    let waiting = tokio::spawn(async move {
        let r = c.next().await;
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let pushed = q.push(event("x"), TTL).await.map_err(|e| e.to_string());
    let begun = st
        .begin("k", fp(1), tk(fp(1)), LEASE)
        .await
        .map_err(|e| e.to_string());
    let took = t.elapsed();
    let (_c, r) = waiting.await.unwrap();
    assert!(r.unwrap().is_none());
    eprintln!("wait {wait:?}: push {pushed:?}, begin {begun:?}, {took:?}");
    pushed?;
    begun?;
    Ok(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_consumer_does_not_stall_others_on_its_connection() {
    let mut results = Vec::new();
    for b in backends() {
        // A wait longer than the operations' timeout (with the default 500 ms, a push beside it
        // takes up to 500 ms instead of one round trip).
        for wait in [Duration::from_millis(1200)] {
            let r = beside_a_waiting_consumer(&b, wait).await;
            results.push((b.name(), wait, r));
        }
    }
    // Redis is healthy: each operation answers at once, not after the consumer's wait.
    for (name, wait, r) in results {
        assert!(
            r.as_ref()
                .is_ok_and(|took| *took < Duration::from_millis(200)),
            "{name}, beside a consumer waiting {wait:?}: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_pushed_after_a_cancelled_wait_reaches_the_next_call() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-cancel-wait");
        let q = RedisStreamQueue::new(b.conn().await, &s).unwrap();
        let claim = Duration::from_millis(700);
        let mut c = RedisStreamConsumer::join(b.conn().await, &s, "g", "w", claim)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(300));
        // Cancelled while it waits for a new event.
        assert!(tokio::time::timeout(Duration::from_millis(50), c.next())
            .await
            .is_err());
        assert_eq!(q.push(event("late"), TTL).await.unwrap(), Push::Enqueued);
        let t = Instant::now();
        let mut got = None;
        while got.is_none() && t.elapsed() < Duration::from_millis(2500) {
            got = c.next().await.unwrap();
        }
        let d = got.expect("the event is not lost");
        eprintln!(
            "delivered after {:?}, delivery {}",
            t.elapsed(),
            d.deliveries
        );
        assert_eq!(d.event.id, "late");
    }
}

// ---------------------------------------------------------------------------------------------
// Through the layers

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_waiters_give_their_redis_slots_back() {
    use sturdy_ratelimit::RateLimitLayer;
    use tower::{service_fn, Layer, ServiceExt};

    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-cancel-layer-rl");
        let quota = Quota::new(1, Duration::from_millis(200)).unwrap();
        let remote = RedisQuota::new(b.conn().await, quota).with_prefix(prefix.clone());
        let probe = RedisQuota::new(b.conn().await, quota).with_prefix(prefix.clone());
        let layer = RateLimitLayer::new(quota)
            .with_remote(Arc::new(remote))
            .with_max_wait(Duration::from_secs(30));
        let svc = layer.layer(service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        }));
        let req = || {
            http::Request::get("http://api.example.com/")
                .body(())
                .unwrap()
        };
        svc.clone().oneshot(req()).await.unwrap();
        let key = "api.example.com";
        assert!(
            matches!(
                probe.try_reserve(key, Duration::ZERO).await.unwrap(),
                Reserve::Denied { .. }
            ),
            "the layer's key is not {key:?}"
        );
        for i in 0..60 {
            let _ = cancel(svc.clone().oneshot(req()), i).await;
        }
        // The layer gives unused grants back in the background.
        tokio::time::sleep(Duration::from_millis(300)).await;
        match probe
            .try_reserve(key, Duration::from_secs(60))
            .await
            .unwrap()
        {
            Reserve::Granted { wait } => {
                assert!(
                    wait <= Duration::from_millis(200),
                    "slots lost: wait {wait:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_at_any_point_leaves_its_key_usable() {
    use axum::routing::post;
    use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer};
    use tower::ServiceExt;

    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-cancel-layer-idem");
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let layer = IdempotencyLayer::new(store(&b, &prefix).await, ByCredentials::default())
            .with_lease(Duration::from_secs(20))
            .unwrap();
        let app = axum::Router::new()
            .route(
                "/orders",
                post(move || {
                    let r = r.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        r.fetch_add(1, Ordering::SeqCst);
                        "created"
                    }
                }),
            )
            .layer(layer);
        let req = |key: &str| {
            http::Request::post("/orders")
                .header("idempotency-key", key)
                .body(axum::body::Body::from("{}"))
                .unwrap()
        };
        let n = 60;
        for i in 0..n {
            let _ = cancel(app.clone().oneshot(req(&format!("k{i}"))), i).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut statuses = BTreeMap::new();
        for i in 0..n {
            let resp = app.clone().oneshot(req(&format!("k{i}"))).await.unwrap();
            statuses
                .entry(resp.status().as_u16())
                .or_insert_with(Vec::new)
                .push(i);
        }
        assert_eq!(
            statuses.keys().copied().collect::<Vec<_>>(),
            [200],
            "{statuses:?}"
        );
        assert_eq!(
            runs.load(Ordering::SeqCst),
            n as u32,
            "a handler ran twice or never"
        );
    }
}

/// The lock token of the execution a fingerprint stands for in these tests: one execution per
/// fingerprint, as the store's fencing was before tokens.
#[allow(dead_code)]
fn tk(fp: sturdy_idempotency::server::Fingerprint) -> sturdy_idempotency::server::LockToken {
    let mut b = [0u8; 16];
    b.copy_from_slice(&fp[..16]);
    sturdy_idempotency::server::LockToken::from_u128(u128::from_le_bytes(b))
}
