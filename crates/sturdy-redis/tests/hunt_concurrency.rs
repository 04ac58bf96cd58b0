//! Concurrency against the Redis backends: independent clients (each with its own connection,
//! as separate processes would have) share a quota, a store and a queue, and the promised totals
//! hold exactly.

use crate::support;
use support::{backends, unique, Backend};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sturdy_idempotency::server::{Begin, IdempotencyStore, StoredResponse};
use sturdy_ratelimit::{Quota, Reserve};
use sturdy_redis::{RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};
use tokio::time::Instant;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

async fn quotas(b: &Backend, quota: Quota, prefix: &str, n: usize) -> Vec<Arc<RedisQuota>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(
            RedisQuota::new(b.conn().await, quota).with_prefix(prefix),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_admit_exactly_the_burst_at_once() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        // 5 per 5 s, burst 5: one slot a second after the burst.
        let quota = Quota::new(5, Duration::from_secs(5))
            .unwrap()
            .with_burst(5)
            .unwrap();
        let clients = quotas(&b, quota, &unique("hunt-conc-burst"), 3).await;
        let mut tasks = Vec::new();
        for c in &clients {
            for _ in 0..40 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    c.try_reserve("api", Duration::ZERO).await.unwrap()
                }));
            }
        }
        let mut granted = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Reserve::Granted { .. }) {
                granted += 1;
            }
        }
        assert_eq!(granted, 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_waiting_get_distinct_evenly_spaced_slots() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let quota = Quota::new(1, Duration::from_millis(40)).unwrap();
        let clients = quotas(&b, quota, &unique("hunt-conc-spaced"), 3).await;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in &clients {
            for _ in 0..15 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let asked = Instant::now();
                    match c.try_reserve("api", Duration::from_secs(10)).await.unwrap() {
                        Reserve::Granted { wait } => asked + wait - start,
                        other => panic!("{other:?}"),
                    }
                }));
            }
        }
        let mut at = Vec::new();
        for t in tasks {
            at.push(t.await.unwrap());
        }
        at.sort();
        for w in at.windows(2) {
            // Slots are 40 ms apart; the local measure of when each was asked adds jitter.
            assert!(
                w[1] - w[0] >= Duration::from_millis(25),
                "two slots {:?} apart: {at:?}",
                w[1] - w[0]
            );
        }
        let span = *at.last().unwrap() - at[0];
        assert!(span >= Duration::from_millis(44 * 40 - 100), "{span:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_slots_are_reused_once_across_clients() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let quota = Quota::new(4, Duration::from_secs(40))
            .unwrap()
            .with_burst(4)
            .unwrap();
        let clients = quotas(&b, quota, &unique("hunt-conc-release"), 3).await;
        for _ in 0..4 {
            assert!(matches!(
                clients[0].try_reserve("api", Duration::ZERO).await.unwrap(),
                Reserve::Granted { .. }
            ));
        }
        // Two slots given back, then 3 clients × 10 ask at once: exactly two more.
        assert!(clients[1].try_release("api").await.unwrap());
        assert!(clients[2].try_release("api").await.unwrap());
        let mut tasks = Vec::new();
        for c in &clients {
            for _ in 0..10 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    c.try_reserve("api", Duration::ZERO).await.unwrap()
                }));
            }
        }
        let mut granted = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Reserve::Granted { .. }) {
                granted += 1;
            }
        }
        assert_eq!(granted, 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_across_instances_start_exactly_once() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-conc-idem");
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(Arc::new(
                RedisIdempotencyStore::new(b.conn().await).with_prefix(&prefix),
            ));
        }
        for round in 0..5 {
            let key = format!("k{round}");
            let mut tasks = Vec::new();
            for (i, s) in stores.iter().enumerate() {
                for j in 0..20u8 {
                    let (s, key) = (s.clone(), key.clone());
                    // Two payloads race for the key.
                    let fp = [u8::from(i == 0 && j % 2 == 0); 32];
                    tasks.push(tokio::spawn(async move {
                        (fp, s.begin(&key, fp, tk(fp), LEASE).await.unwrap())
                    }));
                }
            }
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.push(t.await.unwrap());
            }
            let winners: Vec<_> = outcomes
                .iter()
                .filter(|(_, r)| *r == Begin::Started)
                .map(|(fp, _)| *fp)
                .collect();
            assert_eq!(winners.len(), 1, "{outcomes:?}");
            let w = winners[0];
            for (fp, r) in &outcomes {
                if *r != Begin::Started {
                    let want = if *fp == w {
                        Begin::InFlight
                    } else {
                        Begin::Mismatch
                    };
                    assert_eq!(*r, want);
                }
            }
            // A loser's late calls change nothing.
            let loser = [u8::from(w[0] == 0); 32];
            let resp = |b: &'static str| StoredResponse {
                status: 200,
                headers: vec![],
                body: Bytes::from_static(b.as_bytes()),
            };
            assert!(!stores[1]
                .renew(&key, loser, tk(loser), LEASE)
                .await
                .unwrap());
            let _ = stores[1]
                .complete(&key, loser, tk(loser), resp("loser"), TTL)
                .await;
            let _ = stores[2].release(&key, tk(loser)).await;
            assert_eq!(
                stores[2].begin(&key, w, tk(w), LEASE).await.unwrap(),
                Begin::InFlight
            );
            if round % 2 == 0 {
                stores[0]
                    .complete(&key, w, tk(w), resp("winner"), TTL)
                    .await
                    .unwrap();
                assert_eq!(
                    stores[1].begin(&key, w, tk(w), LEASE).await.unwrap(),
                    Begin::Completed(resp("winner"))
                );
            } else {
                // Released: exactly one of many can take it again.
                stores[0].release(&key, tk(w)).await.unwrap();
                let mut tasks = Vec::new();
                for s in &stores {
                    for _ in 0..10 {
                        let (s, key) = (s.clone(), key.clone());
                        tasks.push(tokio::spawn(async move {
                            s.begin(&key, w, tk(w), LEASE).await.unwrap()
                        }));
                    }
                }
                let mut started = 0;
                for t in tasks {
                    if t.await.unwrap() == Begin::Started {
                        started += 1;
                    }
                }
                assert_eq!(started, 1);
            }
        }
    }
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("{{\"id\":\"{id}\"}}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_one_event_enqueue_it_once() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-conc-push");
        let mut queues = Vec::new();
        for _ in 0..3 {
            queues.push(Arc::new(RedisStreamQueue::new(b.conn().await, &s).unwrap()));
        }
        let mut tasks = Vec::new();
        for round in 0..10 {
            for q in &queues {
                for _ in 0..10 {
                    let q = q.clone();
                    tasks.push(tokio::spawn(async move {
                        (
                            round,
                            q.push(event(&format!("e{round}")), TTL).await.unwrap(),
                        )
                    }));
                }
            }
        }
        let mut enqueued = BTreeMap::new();
        for t in tasks {
            let (round, r) = t.await.unwrap();
            if r == Push::Enqueued {
                *enqueued.entry(round).or_insert(0) += 1;
            } else {
                assert_eq!(r, Push::Duplicate);
            }
        }
        assert_eq!(enqueued.len(), 10);
        assert!(enqueued.values().all(|n| *n == 1), "{enqueued:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_share_the_work_and_a_dead_ones_events_come_back_after_the_claim_delay() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-conc-consumers");
        let claim = Duration::from_millis(400);
        let q = RedisStreamQueue::new(b.conn().await, &s).unwrap();
        let mut consumers = Vec::new();
        for name in ["a", "b", "c"] {
            consumers.push(
                RedisStreamConsumer::join(b.conn().await, &s, "g", name, claim)
                    .await
                    .unwrap()
                    .with_wait(Duration::from_millis(20)),
            );
        }
        for i in 0..30 {
            assert_eq!(
                q.push(event(&format!("e{i}")), TTL).await.unwrap(),
                Push::Enqueued
            );
        }
        // "a" takes three and dies without acknowledging them.
        let mut dead = BTreeSet::new();
        for _ in 0..3 {
            let d = consumers[0].next().await.unwrap().unwrap();
            dead.insert(d.event.id.clone());
        }
        let taken_at = Instant::now();
        drop(consumers.remove(0));
        // "b" and "c" share the rest, concurrently; each event once.
        let mut handles = Vec::new();
        for mut c in consumers {
            handles.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(d) = c.next().await.unwrap() {
                    got.push((d.event.id.clone(), d.deliveries, Instant::now()));
                    c.ack(&d).await.unwrap();
                }
                (c, got)
            }));
        }
        let mut seen = BTreeMap::new();
        let mut rest = Vec::new();
        for h in handles {
            let (c, got) = h.await.unwrap();
            for (id, n, _) in got {
                assert_eq!(n, 1);
                assert!(seen.insert(id, 1).is_none(), "delivered twice");
            }
            rest.push(c);
        }
        assert_eq!(seen.len(), 27);
        assert!(
            dead.iter().all(|id| !seen.contains_key(id)),
            "taken over before the claim delay"
        );
        // After the claim delay, the dead consumer's three come back, once each, counted twice.
        tokio::time::sleep_until(taken_at + claim + Duration::from_millis(50)).await;
        let mut back = BTreeSet::new();
        for c in &mut rest {
            while let Some(d) = c.next().await.unwrap() {
                assert_eq!(d.deliveries, 2);
                assert!(
                    back.insert(d.event.id.clone()),
                    "delivered twice after the claim"
                );
                c.ack(&d).await.unwrap();
            }
        }
        assert_eq!(back, dead);
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
