//! sturdy-redis: "Every operation has a timeout [1 s], and connecting one of 2 s: a Redis that is
//! down or hung gives a clear error, never a hang." A peer that accepts and never reads, one
//! that reads and never answers, and a proxy in front of the test Redis that stops passing
//! answers: connecting and each operation end within their bounds, say so without the URL,
//! and the same backend works again once the proxy passes answers again. Real time on loopback;
//! needs the Redis of `STURDY_REDIS_URL` (skipped without it).
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sturdy::core::ErrorKind;
use sturdy::ratelimit::Quota;
use sturdy::redis::RedisQuota;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::s47_util::{Peer, Phase};

fn redis_addr() -> Option<String> {
    let url = std::env::var("STURDY_REDIS_URL").ok()?;
    let rest = url.strip_prefix("redis://")?;
    Some(rest.trim_end_matches('/').to_string())
}

/// A TCP proxy to Redis whose answers can be held back.
async fn proxy(upstream: String, stalled: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let stalled = stalled.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let mut buf = [0u8; 8192];
                    loop {
                        match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if sw.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                let mut buf = [0u8; 8192];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    while stalled.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    format!("redis://{addr}/")
}

fn redis_url(peer: &Peer) -> String {
    peer.base.replace("http://", "redis://") + "/"
}

#[tokio::test]
async fn connecting_to_a_hung_redis_ends_within_twice_the_timeout() {
    for phase in [Phase::Silent, Phase::ReadNoHead] {
        let peer = Peer::start(phase).await;
        let url = redis_url(&peer);
        let t0 = Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(3),
            sturdy::redis::connect(&url, Duration::from_millis(150)),
        )
        .await
        .expect("connect hung")
        .expect_err("a hung Redis");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(900),
            "{phase:?}: {took:?}: {text}"
        );
        assert!(!text.contains(&url), "{phase:?}: {text}");
        assert!(text.contains("Redis"), "{phase:?}: {text}");
        if let Some(e) = sturdy::core::find::<sturdy::core::Error>(&*err) {
            assert_eq!(e.kind(), &ErrorKind::Timeout, "{phase:?}: {text}");
        }
    }
}

#[tokio::test]
async fn a_backend_connect_to_a_hung_redis_ends_within_two_seconds() {
    let peer = Peer::start(Phase::ReadNoHead).await;
    let quota = Quota::per_second(10).unwrap();
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_millis(4500),
        RedisQuota::connect(&redis_url(&peer), quota),
    )
    .await
    .expect("RedisQuota::connect hung past 4.5 s");
    let took = t0.elapsed();
    let Err(err) = r else {
        panic!("connected to a hung Redis")
    };
    assert!(took <= Duration::from_millis(2600), "{took:?}: {err}");
}

#[tokio::test]
async fn an_operation_on_a_hung_redis_ends_at_its_timeout_and_the_backend_recovers() {
    let Some(up) = redis_addr() else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let stalled = Arc::new(AtomicBool::new(false));
    let url = proxy(up, stalled.clone()).await;
    let quota = RedisQuota::connect(&url, Quota::per_second(10).unwrap())
        .await
        .expect("connect through the proxy")
        .with_prefix("s47:rl")
        .with_timeout(Duration::from_millis(150));
    assert_eq!(quota.try_paused("k").await.unwrap(), None);
    stalled.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(3), quota.try_paused("k"))
        .await
        .expect("a Redis operation hung")
        .expect_err("Redis is hung");
    let took = t0.elapsed();
    let text = err.to_string();
    assert!(took <= Duration::from_millis(450), "{took:?}: {text}");
    assert!(took >= Duration::from_millis(140), "{took:?}: {text}");
    assert!(!text.contains(&url[8..]), "{text}");
    stalled.store(false, Ordering::SeqCst);
    // The same backend answers again (within a couple of tries).
    let t1 = Instant::now();
    let mut last = None;
    while t1.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_secs(1), quota.try_paused("k")).await {
            Ok(Ok(v)) => {
                assert_eq!(v, None);
                last = None;
                break;
            }
            other => last = Some(format!("{other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(last.is_none(), "the backend did not recover: {last:?}");
}

/// The webhook guide ("200 only once the event is queued") and `RedisStreamQueue::with_timeout`
/// ("a Redis that is down or hung gives a clear error (the sender is answered 503 and
/// redelivers), never a hang"): with Redis hung behind the proxy, the sender is answered 503
/// within the queue's timeout, not 200; once Redis answers again, the redelivery is acknowledged
/// 200 and is in the stream once.
#[tokio::test]
async fn a_webhook_is_not_acknowledged_while_its_queue_hangs() {
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    use sturdy::webhook::{sign_github, GitHub, WebhookReceiver};
    use tower::ServiceExt;

    let Some(up) = redis_addr() else {
        eprintln!("STURDY_REDIS_URL unset: skipped");
        return;
    };
    let stalled = Arc::new(AtomicBool::new(false));
    let url = proxy(up.clone(), stalled.clone()).await;
    let name = format!(
        "{{s47-hook-{}}}",
        sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let q = RedisStreamQueue::connect(&url, name.as_str())
        .await
        .expect("connect through the proxy")
        .with_timeout(Duration::from_millis(150));
    let rx = WebhookReceiver::new(GitHub::new("s47-secret").unwrap(), q);
    let body = r#"{"order":47}"#;
    let request = || {
        http::Request::post("/hook")
            .header(
                "x-hub-signature-256",
                sign_github("s47-secret", body.as_bytes()),
            )
            .header("x-github-event", "push")
            .body(axum::body::Body::from(body))
            .unwrap()
    };
    stalled.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(3), rx.clone().oneshot(request()))
        .await
        .expect("the receiver hung on a hung Redis")
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(res.status(), 503, "acknowledged without a queue ({took:?})");
    assert!(took <= Duration::from_millis(450), "{took:?}");
    stalled.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = tokio::time::timeout(Duration::from_secs(3), rx.clone().oneshot(request()))
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(res.status(), 200, "the redelivery was not acknowledged");
    let mut c = RedisStreamConsumer::connect(
        &format!("redis://{up}/"),
        name.as_str(),
        "g",
        "w",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    let mut n = 0;
    for _ in 0..3 {
        if let Some(d) = c.next().await.unwrap() {
            assert_eq!(&d.event.body[..], body.as_bytes());
            c.ack(&d).await.unwrap();
            n += 1;
        }
    }
    assert_eq!(n, 1, "the event is in the stream {n} times");
}
