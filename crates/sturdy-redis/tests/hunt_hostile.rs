//! Hostile values against the Redis backends: enormous and odd keys, binary bodies and header
//! values, durations at their extremes, thousands of keys. Nothing may panic, and every answer
//! must be the one the docs promise (or a clear error).

use crate::support;
use support::{backends, unique, Backend};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sturdy_idempotency::server::{Begin, Fingerprint, IdempotencyStore, StoredResponse};
use sturdy_ratelimit::{Quota, Reserve};
use sturdy_redis::{RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue};
use sturdy_webhook::http::{HeaderMap, HeaderName, HeaderValue};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn fp(n: u8) -> Fingerprint {
    [n; 32]
}

fn every_byte(times: usize) -> Bytes {
    let one: Vec<u8> = (0..=255u8).collect();
    Bytes::from(one.repeat(times))
}

async fn store(b: &Backend, prefix: &str) -> RedisIdempotencyStore {
    RedisIdempotencyStore::new(b.conn().await).with_prefix(prefix)
}

// ---------------------------------------------------------------------------------------------
// Idempotency store

#[tokio::test]
async fn a_binary_response_comes_back_byte_for_byte() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-idem-binary");
        let s1 = store(&b, &prefix).await;
        let s2 = store(&b, &prefix).await;
        let resp = StoredResponse {
            status: 201,
            headers: vec![
                ("x-bin".to_owned(), (0..=255u8).collect()),
                ("x-empty".to_owned(), Vec::new()),
                ("x-bin".to_owned(), b"\xff\xfe\x00\r\n".to_vec()),
            ],
            // 1 MiB of every byte value, the layer's default response limit.
            body: every_byte(4096),
        };
        assert_eq!(
            s1.begin("k", fp(1), tk(fp(1)), LEASE).await.unwrap(),
            Begin::Started
        );
        s1.complete("k", fp(1), tk(fp(1)), resp.clone(), TTL)
            .await
            .unwrap();
        assert_eq!(
            s2.begin("k", fp(1), tk(fp(1)), LEASE).await.unwrap(),
            Begin::Completed(resp)
        );
    }
}

#[tokio::test]
async fn enormous_and_odd_idempotency_keys_are_distinct_keys() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-idem-oddkeys");
        let s1 = store(&b, &prefix).await;
        let s2 = store(&b, &prefix).await;
        let long = "x".repeat(512 * 1024);
        let keys = [
            format!("{long}1"),
            format!("{long}2"),
            "{".to_owned(),
            "}".to_owned(),
            "{}".to_owned(),
            "{a}".to_owned(),
            "{a}b".to_owned(),
            "a:b".to_owned(),
            "a\nb\r\n*1\r\n$4\r\nPING\r\n".to_owned(),
            "\u{0}".to_owned(),
            "é日本\u{10FFFF}".to_owned(),
            String::new(),
            " ".to_owned(),
        ];
        for k in &keys {
            assert_eq!(
                s1.begin(k, fp(1), tk(fp(1)), LEASE).await.unwrap(),
                Begin::Started,
                "{:?}",
                &k[..k.len().min(20)]
            );
        }
        for k in &keys {
            assert_eq!(
                s2.begin(k, fp(1), tk(fp(1)), LEASE).await.unwrap(),
                Begin::InFlight
            );
            assert_eq!(
                s2.begin(k, fp(2), tk(fp(2)), LEASE).await.unwrap(),
                Begin::Mismatch
            );
        }
        for (i, k) in keys.iter().enumerate() {
            let r = StoredResponse {
                status: 200,
                headers: vec![],
                body: Bytes::from(format!("resp-{i}")),
            };
            s1.complete(k, fp(1), tk(fp(1)), r, TTL).await.unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            match s2.begin(k, fp(1), tk(fp(1)), LEASE).await.unwrap() {
                Begin::Completed(r) => assert_eq!(r.body, Bytes::from(format!("resp-{i}"))),
                other => panic!("key #{i}: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_ttl_and_a_lease_of_duration_max_keep_the_entry() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-idem-max");
        let s = store(&b, &prefix).await;
        assert_eq!(
            s.begin("lease-max", fp(1), tk(fp(1)), Duration::MAX)
                .await
                .unwrap(),
            Begin::Started
        );
        assert!(s
            .renew("lease-max", fp(1), tk(fp(1)), Duration::MAX)
            .await
            .unwrap());
        assert_eq!(
            s.begin("lease-max", fp(1), tk(fp(1)), LEASE).await.unwrap(),
            Begin::InFlight
        );
        let r = StoredResponse {
            status: 200,
            headers: vec![],
            body: Bytes::from_static(b"kept"),
        };
        s.complete("lease-max", fp(1), tk(fp(1)), r.clone(), Duration::MAX)
            .await
            .unwrap();
        assert_eq!(
            s.begin("lease-max", fp(1), tk(fp(1)), LEASE).await.unwrap(),
            Begin::Completed(r)
        );
    }
}

async fn layer_run_twice(b: &Backend, ttl: Duration, lease: Duration) -> (Vec<u16>, u32, bool) {
    use axum::routing::post;
    use http::Request;
    use std::sync::atomic::{AtomicU32, Ordering};
    use sturdy_idempotency::server::{ByCredentials, IdempotencyLayer};
    use tower::ServiceExt;

    let prefix = unique("hunt-idem-layer-max");
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    // Both settings are accepted: only "a zero TTL or a lease under 1 ms" is an error.
    let layer = IdempotencyLayer::new(store(b, &prefix).await, ByCredentials::default())
        .with_ttl(ttl)
        .unwrap()
        .with_lease(lease)
        .unwrap();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(move || {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    "created"
                }
            }),
        )
        .layer(layer);
    let req = || {
        Request::post("/orders")
            .header("idempotency-key", "order-1")
            .body(axum::body::Body::from("{}"))
            .unwrap()
    };
    let first = app.clone().oneshot(req()).await.unwrap();
    // Let the layer store the response (tried up to three times, 50 then 100 ms apart).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = app.clone().oneshot(req()).await.unwrap();
    let replayed = second.headers().get("idempotent-replayed").is_some();
    (
        vec![first.status().as_u16(), second.status().as_u16()],
        runs.load(Ordering::SeqCst),
        replayed,
    )
}

#[tokio::test]
async fn the_layer_with_a_lease_of_duration_max_runs_requests() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let (statuses, runs, replayed) =
            layer_run_twice(&b, Duration::from_secs(3600), Duration::MAX).await;
        assert_eq!(statuses, [200, 200]);
        assert_eq!(runs, 1);
        assert!(replayed);
    }
}

#[tokio::test]
async fn the_layer_with_a_ttl_of_duration_max_stores_and_replays() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let (statuses, runs, replayed) =
            layer_run_twice(&b, Duration::MAX, Duration::from_secs(30)).await;
        assert_eq!(statuses, [200, 200]);
        assert_eq!(runs, 1);
        assert!(replayed);
    }
}

#[tokio::test]
async fn the_layer_with_a_ttl_and_lease_of_a_thousand_years_stores_and_replays() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let millennium = Duration::from_secs(1000 * 365 * 86_400);
        let (statuses, runs, replayed) = layer_run_twice(&b, millennium, millennium).await;
        assert_eq!(statuses, [200, 200]);
        assert_eq!(runs, 1);
        assert!(replayed);
    }
}

#[tokio::test]
async fn a_zero_lease_or_ttl_given_to_the_store_never_panics() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-idem-zero");
        let s = store(&b, &prefix).await;
        let _ = s.begin("z", fp(1), tk(fp(1)), Duration::ZERO).await;
        let _ = s.renew("z", fp(1), tk(fp(1)), Duration::ZERO).await;
        let r = StoredResponse {
            status: 200,
            headers: vec![],
            body: Bytes::new(),
        };
        let _ = s.complete("z", fp(1), tk(fp(1)), r, Duration::ZERO).await;
        let _ = s.release("z", tk(fp(1))).await;
        // And the store still answers correctly afterwards.
        assert_eq!(
            s.begin("after", fp(1), tk(fp(1)), LEASE).await.unwrap(),
            Begin::Started
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_keys_each_start_exactly_once() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-idem-many");
        // 6,000 operations at once: on a loaded machine the last of them may wait past the
        // default 1 s for their turn on the connection. What is checked is exactly once.
        let s1 = Arc::new(
            store(&b, &prefix)
                .await
                .with_timeout(Duration::from_secs(20)),
        );
        let s2 = Arc::new(
            store(&b, &prefix)
                .await
                .with_timeout(Duration::from_secs(20)),
        );
        let mut tasks = Vec::new();
        for i in 0..3000u32 {
            for s in [s1.clone(), s2.clone()] {
                tasks.push(tokio::spawn(async move {
                    s.begin(&format!("key-{i}"), fp(7), tk(fp(7)), LEASE)
                        .await
                        .unwrap()
                }));
            }
        }
        let mut started = 0;
        for t in tasks {
            match t.await.unwrap() {
                Begin::Started => started += 1,
                Begin::InFlight => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(started, 3000);
    }
}

// ---------------------------------------------------------------------------------------------
// Quota

fn granted(r: Reserve) -> Duration {
    match r {
        Reserve::Granted { wait } => wait,
        Reserve::Denied { retry_after } => panic!("denied, retry after {retry_after:?}"),
    }
}

#[tokio::test]
async fn a_max_wait_of_duration_max_grants_a_far_slot() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisQuota::new(b.conn().await, Quota::per_minute(1).unwrap())
            .with_prefix(unique("hunt-rl-maxwait"));
        assert_eq!(
            granted(q.try_reserve("k", Duration::ZERO).await.unwrap()),
            Duration::ZERO
        );
        match q.try_reserve("k", Duration::ZERO).await.unwrap() {
            Reserve::Denied { retry_after } => {
                assert!(retry_after > Duration::from_secs(55), "{retry_after:?}");
            }
            other => panic!("{other:?}"),
        }
        // A slot a minute away is "no more than max_wait from now" for any larger max_wait.
        let wait = granted(q.try_reserve("k", Duration::from_secs(3600)).await.unwrap());
        assert!(wait > Duration::from_secs(55), "{wait:?}");
        let wait = granted(q.try_reserve("k", Duration::MAX).await.unwrap());
        assert!(wait > Duration::from_secs(115), "{wait:?}");
    }
}

#[tokio::test]
async fn quotas_at_the_extremes_never_panic() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-rl-extreme");
        let quotas = [
            Quota::new(1, Duration::MAX).unwrap(),
            Quota::new(1, Duration::MAX)
                .unwrap()
                .with_burst(u32::MAX)
                .unwrap(),
            Quota::new(1, Duration::MAX).unwrap().with_burst(2).unwrap(),
            Quota::new(u32::MAX, Duration::MAX).unwrap(),
            Quota::per_second(1).unwrap().with_burst(u32::MAX).unwrap(),
        ];
        for (i, quota) in quotas.into_iter().enumerate() {
            let q = RedisQuota::new(b.conn().await, quota).with_prefix(format!("{prefix}:{i}"));
            for max_wait in [Duration::ZERO, Duration::from_secs(1), Duration::MAX] {
                for _ in 0..3 {
                    let r = q.try_reserve("k", max_wait).await;
                    eprintln!("quota #{i}, max wait {max_wait:?}: {r:?}");
                    r.unwrap();
                }
            }
            q.try_release("k").await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_one_per_forever_quota_with_burst_two_admits_two_then_refuses() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let quota = Quota::new(1, Duration::MAX).unwrap().with_burst(2).unwrap();
        let q = RedisQuota::new(b.conn().await, quota).with_prefix(unique("hunt-rl-forever"));
        assert_eq!(
            granted(q.try_reserve("k", Duration::ZERO).await.unwrap()),
            Duration::ZERO
        );
        assert_eq!(
            granted(q.try_reserve("k", Duration::ZERO).await.unwrap()),
            Duration::ZERO
        );
        match q.try_reserve("k", Duration::ZERO).await.unwrap() {
            Reserve::Denied { retry_after } => {
                assert!(retry_after > Duration::from_secs(86_400), "{retry_after:?}");
            }
            other => panic!("a third call in a burst of two: {other:?}"),
        }
    }
}

#[tokio::test]
async fn keys_whose_hash_tag_would_be_empty_work_on_every_backend() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-rl-tags");
        let quota = Quota::per_minute(1).unwrap();
        for key in ["}", "}x", "{", "{}", "", "a}b{c}", "}{", "{{}}"] {
            for pfx in [
                prefix.clone(),
                format!("{prefix}{{}}"),
                format!("{prefix}{{"),
            ] {
                let q = RedisQuota::new(b.conn().await, quota).with_prefix(pfx.clone());
                let r = q.try_reserve(key, Duration::ZERO).await;
                assert!(
                    matches!(r, Ok(Reserve::Granted { .. })),
                    "key {key:?}, prefix {pfx:?}: {r:?}"
                );
                q.try_pause(key, Duration::from_secs(5))
                    .await
                    .unwrap_or_else(|e| panic!("key {key:?}, prefix {pfx:?}: {e}"));
                let left = q.try_paused(key).await.unwrap();
                assert!(left.is_some(), "key {key:?}, prefix {pfx:?}");
                // The pause holds decisions back.
                let r = q.try_reserve(key, Duration::ZERO).await.unwrap();
                assert!(matches!(r, Reserve::Denied { .. }), "{key:?}: {r:?}");
                assert!(q.try_clear_pause(key).await.unwrap().is_some());
                let _ = q.try_release(key).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn enormous_quota_keys_with_a_common_prefix_are_distinct() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisQuota::new(b.conn().await, Quota::per_minute(1).unwrap())
            .with_prefix(unique("hunt-rl-long"));
        let long = "h".repeat(256 * 1024);
        let (a, c) = (format!("{long}a"), format!("{long}c"));
        granted(q.try_reserve(&a, Duration::ZERO).await.unwrap());
        granted(q.try_reserve(&c, Duration::ZERO).await.unwrap());
        assert!(matches!(
            q.try_reserve(&a, Duration::ZERO).await.unwrap(),
            Reserve::Denied { .. }
        ));
    }
}

#[tokio::test]
async fn a_pause_of_duration_max_is_capped_and_a_max_cap_never_errs() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-rl-pausemax");
        let q = RedisQuota::new(b.conn().await, Quota::per_second(10).unwrap())
            .with_prefix(prefix.clone());
        q.try_pause("k", Duration::MAX).await.unwrap();
        let left = q.try_paused("k").await.unwrap().unwrap();
        assert!(left <= Duration::from_secs(300), "{left:?}");
        // A cap of Duration::MAX: "read as about 30 years", never an error or a panic.
        let big = RedisQuota::new(b.conn().await, Quota::per_second(10).unwrap())
            .with_prefix(format!("{prefix}:big"))
            .with_max_pause(Duration::MAX);
        big.try_pause("k", Duration::MAX).await.unwrap();
        let left = big.try_paused("k").await.unwrap().unwrap();
        assert!(left > Duration::from_secs(86_400), "{left:?}");
        let r = big.try_reserve("k", Duration::ZERO).await.unwrap();
        assert!(matches!(r, Reserve::Denied { .. }), "{r:?}");
    }
}

#[tokio::test]
async fn a_zero_cap_removes_pauses_found() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-rl-zerocap");
        let quota = Quota::per_second(10).unwrap();
        let normal = RedisQuota::new(b.conn().await, quota).with_prefix(prefix.clone());
        let zero = RedisQuota::new(b.conn().await, quota)
            .with_prefix(prefix.clone())
            .with_max_pause(Duration::ZERO);
        // Zero: pauses are not shared...
        zero.try_pause("k", Duration::from_secs(10)).await.unwrap();
        assert_eq!(normal.try_paused("k").await.unwrap(), None);
        // ...and ones found are removed.
        normal
            .try_pause("k", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(normal.try_paused("k").await.unwrap().is_some());
        let r = zero.try_reserve("k", Duration::ZERO).await.unwrap();
        assert!(matches!(r, Reserve::Granted { .. }), "{r:?}");
        assert_eq!(normal.try_paused("k").await.unwrap(), None);
    }
}

#[tokio::test]
async fn a_release_without_a_grant_adds_no_slot() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let quota = Quota::per_minute(2).unwrap().with_burst(2).unwrap();
        let q = RedisQuota::new(b.conn().await, quota).with_prefix(unique("hunt-rl-release"));
        for _ in 0..5 {
            assert!(!q.try_release("k").await.unwrap());
        }
        granted(q.try_reserve("k", Duration::ZERO).await.unwrap());
        granted(q.try_reserve("k", Duration::ZERO).await.unwrap());
        assert!(matches!(
            q.try_reserve("k", Duration::ZERO).await.unwrap(),
            Reserve::Denied { .. }
        ));
        // One release after two grants gives one back, never more.
        assert!(q.try_release("k").await.unwrap());
        granted(q.try_reserve("k", Duration::ZERO).await.unwrap());
        assert!(matches!(
            q.try_reserve("k", Duration::ZERO).await.unwrap(),
            Reserve::Denied { .. }
        ));
    }
}

#[tokio::test]
async fn timeouts_at_the_extremes_never_panic() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let prefix = unique("hunt-timeouts");
        let quota = Quota::per_second(10).unwrap();
        for t in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let q = RedisQuota::new(b.conn().await, quota)
                .with_prefix(prefix.clone())
                .with_timeout(t);
            let s = store(&b, &prefix).await.with_timeout(t);
            let queue = RedisStreamQueue::new(b.conn().await, unique("hunt-timeouts-q"))
                .unwrap()
                .with_timeout(t);
            let results = [
                q.try_reserve("k", Duration::ZERO).await.map(|_| ()),
                s.begin(&format!("{t:?}"), fp(1), tk(fp(1)), LEASE)
                    .await
                    .map(|_| ()),
                queue
                    .push(WebhookEvent::new("standard", "e", Bytes::new()), TTL)
                    .await
                    .map(|_| ()),
            ];
            for r in results {
                if let Err(e) = r {
                    eprintln!("timeout {t:?}: {e}");
                    let e = e
                        .downcast_ref::<sturdy_core::Error>()
                        .unwrap_or_else(|| panic!("not a sturdy error: {e:?}"));
                    assert_eq!(*e.kind(), sturdy_core::ErrorKind::Timeout, "{e}");
                }
            }
            if t == Duration::MAX {
                // Read as a long time: everything works.
                assert!(q.try_reserve("k2", Duration::ZERO).await.is_ok());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Webhook queue

fn hostile_event(id: &str) -> WebhookEvent {
    let mut headers = HeaderMap::new();
    headers.insert(
        HeaderName::from_static("x-obs"),
        HeaderValue::from_bytes(b"caf\xe9 \x80\xff").unwrap(),
    );
    headers.append(
        HeaderName::from_static("x-obs"),
        HeaderValue::from_static("second"),
    );
    headers.insert(
        HeaderName::from_static("webhook-id"),
        HeaderValue::from_static("{weird}:id"),
    );
    WebhookEvent::new("gen:eric%", id, every_byte(4 * 4096))
        .with_route("ro:ute%3A")
        .with_timestamp(Some(i64::MIN))
        .with_headers(headers)
}

#[tokio::test]
async fn hostile_events_come_out_exactly_as_they_went_in() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-wh-hostile");
        // The 8 MiB event can take longer than the default 1 s on a loaded machine (a clean CI
        // run timed out once): this test is about bytes, not time.
        let q = RedisStreamQueue::new(b.conn().await, &s)
            .unwrap()
            .with_timeout(Duration::from_secs(30));
        let mut c =
            RedisStreamConsumer::join(b.conn().await, &s, "g", "w", Duration::from_secs(60))
                .await
                .unwrap()
                .with_wait(Duration::from_millis(20))
                .with_timeout(Duration::from_secs(30));
        let ids = [
            "a".repeat(256),
            "{x}".to_owned(),
            "}".to_owned(),
            "line\nbreak\r\n".to_owned(),
            "\u{0}nul".to_owned(),
            "日本".to_owned(),
        ];
        let mut sent = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let mut e = hostile_event(id);
            if i % 2 == 1 {
                e = e.with_timestamp(Some(i64::MAX));
            }
            if i == 2 {
                // 8 MiB of binary body: larger than any receiver default, still an event.
                e.body = every_byte(8 * 4096 * 4);
            }
            assert_eq!(
                q.push(e.clone(), TTL).await.unwrap(),
                Push::Enqueued,
                "{id:?}"
            );
            assert_eq!(
                q.push(e.clone(), TTL).await.unwrap(),
                Push::Duplicate,
                "{id:?}"
            );
            sent.push(e);
        }
        for e in &sent {
            let d = c.next().await.unwrap().expect("an event");
            assert_eq!(&d.event, e);
            assert_eq!(d.deliveries, 1);
            c.ack(&d).await.unwrap();
        }
        assert!(c.next().await.unwrap().is_none());
    }
}

#[tokio::test]
async fn a_dedup_ttl_of_duration_max_remembers_the_key() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisStreamQueue::new(b.conn().await, unique("hunt-wh-ttlmax")).unwrap();
        let e = WebhookEvent::new("standard", "max", Bytes::from_static(b"{}"));
        assert_eq!(
            q.push(e.clone(), Duration::MAX).await.unwrap(),
            Push::Enqueued
        );
        assert_eq!(q.push(e, Duration::MAX).await.unwrap(), Push::Duplicate);
    }
}

const SECRET: &str = "whsec_aHVudC1zZWNyZXQtZm9yLXRoZS1yZWRpcy10ZXN0cw==";

fn delivery(id: &str) -> http::Request<axum::body::Body> {
    let body = format!("{{\"id\":\"{id}\"}}");
    let ts = i64::try_from(
        sturdy_core::WallClock::now(&sturdy_core::SystemClock)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let sig = sturdy_webhook::sign_standard(SECRET, id, ts, body.as_bytes()).unwrap();
    http::Request::post("/webhooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(axum::body::Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn a_receiver_with_a_dedup_ttl_of_duration_max_accepts_deliveries() {
    use sturdy_webhook::{StandardWebhooks, WebhookReceiver};
    use tower::ServiceExt;
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisStreamQueue::new(b.conn().await, unique("hunt-wh-recv-ttlmax")).unwrap();
        let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), q)
            .with_dedup_ttl(Duration::MAX);
        let first = receiver.clone().oneshot(delivery("evt-1")).await.unwrap();
        assert_eq!(first.status(), http::StatusCode::OK);
        let again = receiver.clone().oneshot(delivery("evt-1")).await.unwrap();
        assert_eq!(again.status(), http::StatusCode::OK);
    }
}

#[tokio::test]
async fn tiny_dedup_ttls_enqueue() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let q = RedisStreamQueue::new(b.conn().await, unique("hunt-wh-ttl")).unwrap();
        let z = WebhookEvent::new("standard", "zero", Bytes::from_static(b"{}"));
        let r = q.push(z, Duration::ZERO).await;
        assert!(matches!(r, Ok(Push::Enqueued)), "{r:?}");
        let n = WebhookEvent::new("standard", "nano", Bytes::from_static(b"{}"));
        let r = q.push(n, Duration::from_nanos(1)).await;
        assert!(matches!(r, Ok(Push::Enqueued)), "{r:?}");
        let y = WebhookEvent::new("standard", "millennium", Bytes::from_static(b"{}"));
        let millennium = Duration::from_secs(1000 * 365 * 86_400);
        assert_eq!(q.push(y.clone(), millennium).await.unwrap(), Push::Enqueued);
        assert_eq!(q.push(y, millennium).await.unwrap(), Push::Duplicate);
    }
}

#[tokio::test]
async fn stream_names_without_a_usable_hash_tag_are_refused() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let base = unique("hunt-wh-names");
        // "When the stream name is empty or has a `}` but no hash tag".
        for bad in [
            "{}".to_owned(),
            format!("{base}}}"),
            format!("}}{{{base}"),
            format!("{base}{{}}"),
        ] {
            let r = RedisStreamQueue::new(b.conn().await, bad.as_str());
            assert!(r.is_err(), "{bad:?} was accepted");
            let r = RedisStreamConsumer::join(b.conn().await, bad.as_str(), "g", "w", TTL).await;
            assert!(r.is_err(), "{bad:?} was accepted by a consumer");
        }
        for good in [
            format!("{{{base}}}"),
            format!("x}}{{{base}}}"),
            format!("{{{{{base}}}"),
        ] {
            let q = RedisStreamQueue::new(b.conn().await, good.as_str())
                .unwrap_or_else(|e| panic!("{good:?}: {e}"));
            let mut c = RedisStreamConsumer::join(b.conn().await, good.as_str(), "g", "w", TTL)
                .await
                .unwrap_or_else(|e| panic!("{good:?}: {e}"))
                .with_wait(Duration::from_millis(10));
            let e = WebhookEvent::new("standard", "1", Bytes::from_static(b"{}"));
            assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued, "{good:?}");
            let d = c.next().await.unwrap().expect("the event");
            c.dead_letter(&d, "bad").await.unwrap();
            assert_eq!(q.dead_letter_count().await.unwrap(), 1, "{good:?}");
        }
    }
}

#[tokio::test]
async fn zero_bounds_are_taken_as_one() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-wh-zero");
        let q = RedisStreamQueue::new(b.conn().await, &s)
            .unwrap()
            .with_max_backlog(0);
        let mut c =
            RedisStreamConsumer::join(b.conn().await, &s, "g", "w", Duration::from_millis(50))
                .await
                .unwrap()
                .with_max_deliveries(0)
                .with_wait(Duration::from_millis(10));
        let ev = |id: &str| WebhookEvent::new("standard", id, Bytes::from_static(b"{}"));
        assert_eq!(q.push(ev("1"), TTL).await.unwrap(), Push::Enqueued);
        assert_eq!(q.push(ev("2"), TTL).await.unwrap(), Push::Full);
        let d = c.next().await.unwrap().expect("the event");
        assert_eq!(d.deliveries, 1);
        // Not acknowledged: with at most one delivery, it is dead-lettered, not delivered again.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(c.next().await.unwrap().is_none());
        assert_eq!(q.dead_letter_count().await.unwrap(), 1);
    }
}

#[tokio::test]
async fn dead_letter_listing_and_replay_of_missing_or_malformed_entries() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-wh-dead");
        let q = RedisStreamQueue::new(b.conn().await, &s).unwrap();
        let mut c = RedisStreamConsumer::join(b.conn().await, &s, "g", "w", TTL)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(10));
        let e = WebhookEvent::new("standard", "d", Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
        let d = c.next().await.unwrap().unwrap();
        // "with `reason` (at most 1 KiB kept)".
        c.dead_letter(&d, &"r".repeat(1 << 20)).await.unwrap();
        let dead = q.dead_letters(None, 10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].reason.len() <= 1024, "{}", dead[0].reason.len());
        // "`Ok(false)` when there is no such dead letter."
        assert!(!q.replay_dead_letter("0-1").await.unwrap());
        assert!(!q.discard_dead_letter("0-1").await.unwrap());
        // The original entry's id names no dead letter, unless the two streams happened to give
        // the same id (both written in the same millisecond, both first in it).
        if dead[0].original_entry != dead[0].entry {
            assert!(!q.replay_dead_letter(&dead[0].original_entry).await.unwrap());
        }
        for bogus in ["not-an-id", "", "18446744073709551615-18446744073709551615"] {
            let r = q.replay_dead_letter(bogus).await;
            eprintln!("replay {bogus:?}: {r:?}");
            assert!(!matches!(r, Ok(true)), "{bogus:?}");
            let r = q.discard_dead_letter(bogus).await;
            assert!(!matches!(r, Ok(true)), "{bogus:?}");
            let r = q.dead_letters(Some(bogus), 10).await;
            eprintln!("list after {bogus:?}: {r:?}");
        }
        assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
        let d = c.next().await.unwrap().expect("replayed");
        assert_eq!(d.deliveries, 1);
    }
}

#[tokio::test]
async fn listing_dead_letters_with_any_count_lists_at_most_that_many() {
    for b in backends() {
        eprintln!("on the {}", b.name());
        let s = unique("hunt-wh-deadcount");
        let q = RedisStreamQueue::new(b.conn().await, &s).unwrap();
        let mut c = RedisStreamConsumer::join(b.conn().await, &s, "g", "w", TTL)
            .await
            .unwrap()
            .with_wait(Duration::from_millis(10));
        let e = WebhookEvent::new("standard", "d", Bytes::from_static(b"{}"));
        assert_eq!(q.push(e, TTL).await.unwrap(), Push::Enqueued);
        let d = c.next().await.unwrap().unwrap();
        c.dead_letter(&d, "bad").await.unwrap();
        let mut answers = Vec::new();
        for n in [
            0,
            1,
            1001,
            1 << 40,
            usize::MAX / 2,
            usize::MAX / 2 + 1,
            usize::MAX,
        ] {
            let r = q.dead_letters(None, n).await;
            answers.push((n, r.map(|v| v.len()).map_err(|e| e.to_string())));
        }
        eprintln!("{answers:#?}");
        for (n, r) in answers {
            assert_eq!(r, Ok(n.min(1)), "count {n}");
        }
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
