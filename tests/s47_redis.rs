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
        assert!(took <= Duration::from_millis(900), "{phase:?}: {took:?}: {text}");
        assert!(!text.contains(&url) && !text.contains(&peer.base[7..]), "{phase:?}: {text}");
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
    let err = r.err().expect("a hung Redis");
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
