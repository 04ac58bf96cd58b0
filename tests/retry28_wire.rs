//! The composed client on real loopback sockets in real time (docs/guides/demo.md,
//! docs/guides/idempotency.md): resets after commit, injected 5xx and 429s from `sturdy-chaos`,
//! refused connections, servers that stall or reset, and the server idempotency layer behind
//! `sturdy_chaos::serve`.
#![cfg(feature = "full")]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use axum::routing::post;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::{Client, ClientBuilder};
use sturdy_chaos::{ChaosServer, Faults, Knobs, RetryAfterForm};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::retry28_common::top;

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_seed(2026).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(20)).unwrap(),
    )
}

fn client() -> Client<hyper::body::Incoming> {
    ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(6))
        .build(sturdy_chaos::http_client())
}

fn order(url: String, n: usize) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::from(format!("{{\"item\":\"book\",\"n\":{n}}}")))
        .unwrap()
}

#[tokio::test]
async fn a_reset_after_commit_is_answered_from_the_store_once() {
    let server = ChaosServer::start(Knobs {
        reset_after_commit_next: 2,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let res = client()
        .oneshot(order(server.url("/orders"), 1))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let stats = server.stats();
    assert_eq!(stats.orders_committed, 1);
    assert_eq!(stats.resets, 1);
    assert_eq!(stats.replayed, 1);
    assert_eq!(stats.api_requests, 2);
    let log = server.requests();
    assert_eq!(log[0].status, 0, "the reset is logged with status 0");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(!body.is_empty());
}

#[tokio::test]
async fn injected_503s_and_a_429_are_ridden_out() {
    let server = ChaosServer::start(Knobs {
        fail_next: 3,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let res = client()
        .oneshot(order(server.url("/orders"), 1))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(server.stats().api_requests, 4);
    assert_eq!(server.stats().orders_committed, 1);

    server.update(|k| {
        k.rate_limit_next = 1;
        k.retry_after = RetryAfterForm::Seconds(1);
    });
    let start = Instant::now();
    let res = client()
        .oneshot(order(server.url("/orders"), 2))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let log = server.requests();
    let n = log.len();
    let gap = log[n - 1].at - log[n - 2].at;
    assert_eq!(log[n - 2].status, 429);
    assert!(
        gap >= Duration::from_millis(1000),
        "came back after {gap:?}"
    );
    assert!(
        start.elapsed() < Duration::from_millis(1800),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_zero_retry_after_is_retried_promptly() {
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(0),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    let res = client()
        .oneshot(
            Request::get(server.url("/orders/o_1"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    // o_1 may not exist; what matters is that the 429 was retried at once.
    assert_ne!(res.status(), 429);
    assert_eq!(server.stats().api_requests, 2);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn without_keys_a_reset_post_is_not_retried_and_not_called_unsent() {
    let server = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .build(sturdy_chaos::http_client());
    let err = c
        .oneshot(order(server.url("/orders"), 1))
        .await
        .unwrap_err();
    assert_eq!(server.stats().api_requests, 1);
    assert_eq!(server.stats().orders_committed, 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let text = err.to_string();
    assert!(!text.contains("not sent"), "{text}");
    assert!(
        !text.contains("client error"),
        "a hyper wrapper instead of the cause: {text}"
    );
}

#[tokio::test]
async fn refused_connections_are_retried_and_said_unsent() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let c = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .build(sturdy_chaos::http_client());
    let err = c
        .oneshot(order(format!("http://127.0.0.1:{port}/orders"), 1))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("gave up after"), "{text}");
    assert!(text.contains("connection refused"), "{text}");
    assert!(
        text.ends_with("the request was not sent, so it is safe to send again"),
        "{text}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(top(&err).report().unwrap().delivery(), Delivery::NotSent);
}

/// A server that reads requests and never answers; counts connections.
async fn stalling() -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), conns)
}

#[tokio::test]
async fn a_stalling_server_is_cut_per_attempt() {
    let (base, conns) = stalling().await;
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let start = Instant::now();
    let err = c
        .oneshot(
            Request::get(format!("{base}/slow"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 100ms"
    );
    assert_eq!(*top(&err).kind(), ErrorKind::Timeout);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert_eq!(conns.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_deadline_bounds_a_stalling_server() {
    let (base, _) = stalling().await;
    let c = ClientBuilder::new()
        .with_retry(quick_retry().with_deadline(Duration::from_millis(300)))
        .build(sturdy_chaos::http_client());
    let start = Instant::now();
    let mut r = order(format!("{base}/orders"), 1);
    r.headers_mut()
        .insert("idempotency-key", "dl-wire".parse().unwrap());
    let err = c.oneshot(r).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "{took:?}"
    );
    assert_eq!(*top(&err).kind(), ErrorKind::Timeout);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(err.to_string().contains("dl-wire"), "{err}");
}

#[tokio::test]
async fn a_server_that_resets_every_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.set_zero_linger();
            drop(s);
        }
    });
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(sturdy_chaos::http_client());
    let err = c
        .oneshot(
            Request::get(format!("http://{addr}/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );
    assert_eq!(*top(&err).kind(), ErrorKind::Transport);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_one_client_each_order_once() {
    let server = ChaosServer::start(Knobs {
        seed: 7,
        error_rate: 0.2,
        reset_after_commit_rate: 0.2,
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = Arc::new(client());
    let mut tasks = Vec::new();
    for n in 0..40 {
        let c = c.clone();
        let url = server.url("/orders");
        tasks.push(tokio::spawn(async move {
            (*c).clone().oneshot(order(url, n)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().map(|r| r.status() == 201).unwrap_or(false) {
            ok += 1;
        }
    }
    let stats = server.stats();
    assert_eq!(stats.duplicates_by_payload, 0);
    assert_eq!(stats.orders_committed, 40);
    assert_eq!(ok, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sturdy_server_layer_behind_faults_commits_each_order_once() {
    let committed = Arc::new(Mutex::new(Vec::<String>::new()));
    let c2 = committed.clone();
    let app = axum::Router::new()
        .route(
            "/orders",
            post(move |body: String| {
                let c = c2.clone();
                async move {
                    c.lock().unwrap().push(body.clone());
                    (http::StatusCode::CREATED, body)
                }
            }),
        )
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_require_key(true),
        );
    let served = sturdy_chaos::serve(
        app,
        Faults {
            seed: 11,
            error_rate: 0.2,
            reset_after_rate: 0.3,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let c = client();
    let mut keys = Vec::new();
    for n in 0..25 {
        let mut r = order(served.url("/orders"), n);
        let key = format!("order-{n}");
        r.headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        let res: Result<_, BoxError> = c.clone().oneshot(r).await;
        assert_eq!(res.unwrap().status(), 201, "order {n}");
        keys.push(key);
    }
    let got = committed.lock().unwrap().clone();
    assert_eq!(got.len(), 25);
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), 25);
    let stats = served.stats();
    assert!(stats.resets > 0 && stats.errors > 0, "{stats:?}");
    for k in &keys {
        assert!(served.requests_with_key(k) >= 1);
    }
    assert_eq!(
        keys.iter()
            .map(|k| served.requests_with_key(k))
            .sum::<u64>(),
        stats.requests
    );
}
