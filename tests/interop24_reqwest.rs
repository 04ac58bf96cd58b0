//! Interop: `sturdy-reqwest` (`SturdyMiddleware` and `ReqwestService`) against HAProxy's fault
//! frontends: what is retried, what the error says about delivery, and that nothing hangs.
use crate::interop_common;
use std::time::Duration;

use crate::interop_haproxy::{align, ALTERNATING};
use interop_common::*;
use sturdy::core::{Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_reqwest::{delivery, find, SturdyMiddleware};
use tokio::time::Instant;

const RESET: &str = "STURDY_INTEROP_HAPROXY_RESET_URL";
const COMMIT_DROP: &str = "STURDY_INTEROP_HAPROXY_COMMIT_DROP_URL";
const STALL: &str = "STURDY_INTEROP_HAPROXY_STALL_URL";
const TCP_REJECT: &str = "STURDY_INTEROP_HAPROXY_TCP_REJECT_URL";
const GATEWAY_TIMEOUT: &str = "STURDY_INTEROP_HAPROXY_GATEWAY_TIMEOUT_URL";
const BACKEND: &str = "STURDY_INTEROP_BACKEND_URL";

fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "/{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn fast_retry() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20)).unwrap(),
    )
}

async fn processed(backend: &str, path: &str) -> serde_json::Value {
    get_json(&format!("{backend}/count?path={path}")).await
}

/// A reqwest-middleware client over `$builder` with a fast retry.
macro_rules! client_with {
    ($builder:expr) => {
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(SturdyMiddleware::new(|next| {
                $builder.with_retry(fast_retry()).build(next)
            }))
            .build()
    };
}

/// An unkeyed POST whose answer HAProxy drops after the origin processed it, through
/// `SturdyMiddleware` with a reqwest `.timeout()`: one attempt, processed once, and the error
/// says it may have been processed (docs/guides/reqwest.md: `is_timeout()` is "maybe").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_unkeyed_post_after_a_dropped_answer() {
    let base = peer_or_skip!(COMMIT_DROP);
    let backend = peer_or_skip!(BACKEND);
    let _serial = ALTERNATING.lock().await;
    align(&base, true).await;
    let client = client_with!(ClientBuilder::new().without_idempotency());
    let path = unique("rq-commit-unkeyed");
    let err = bounded(
        Duration::from_secs(10),
        "reqwest unkeyed POST, answer dropped",
        client
            .post(format!("{base}{path}"))
            .timeout(Duration::from_millis(400))
            .json(&serde_json::json!({"order": 1}))
            .send(),
    )
    .await
    .unwrap_err();
    eprintln!("reqwest unkeyed POST, dropped answer: {err}");
    let seen = processed(&backend, &path).await;
    assert_eq!(seen["hits"], 1, "not retried: {seen}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
    let text = err.to_string();
    assert!(text.contains("may have been processed"), "{text}");
    assert!(!text.contains("not sent"), "{text}");
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{e}");
    align(&base, true).await;
}

/// The same with the default key: retried under one key, answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_keyed_post_after_a_dropped_answer() {
    let base = peer_or_skip!(COMMIT_DROP);
    let backend = peer_or_skip!(BACKEND);
    let _serial = ALTERNATING.lock().await;
    align(&base, true).await;
    let client = client_with!(ClientBuilder::new());
    let path = unique("rq-commit-keyed");
    let res = bounded(
        Duration::from_secs(10),
        "reqwest keyed POST, first answer dropped",
        client
            .post(format!("{base}{path}"))
            .timeout(Duration::from_millis(400))
            .json(&serde_json::json!({"order": 2}))
            .send(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), 200);
    let seen = processed(&backend, &path).await;
    assert_eq!(seen["hits"], 2, "{seen}");
    assert_eq!(seen["keys"].as_object().unwrap().len(), 1, "{seen}");
}

/// HAProxy reads the whole request and resets the connection (`http-request reject`): through
/// reqwest, an unkeyed POST is not retried (the request was written) and the error says it may
/// have been processed; a GET is retried to the last attempt and says how many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_resets_post_once_get_four_times() {
    let base = peer_or_skip!(RESET);
    let client = client_with!(ClientBuilder::new().without_idempotency());
    let err = bounded(
        Duration::from_secs(10),
        "reqwest unkeyed POST to the reset frontend",
        client
            .post(format!("{base}/rq-reset-post"))
            .json(&serde_json::json!({"order": 3}))
            .send(),
    )
    .await
    .unwrap_err();
    eprintln!("reqwest POST, reset: {err}");
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.report().map(|r| r.attempts()), Some(1), "{err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("may have been processed"), "{err}");

    let err = bounded(
        Duration::from_secs(10),
        "reqwest GET to the reset frontend",
        client.get(format!("{base}/rq-reset-get")).send(),
    )
    .await
    .unwrap_err();
    eprintln!("reqwest GET, reset: {err}");
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.report().map(|r| r.attempts()), Some(4), "{err}");
    assert!(
        err.to_string().starts_with("gave up after 4 attempts: "),
        "{err}"
    );
    assert!(e.is_retryable(), "{err}");
}

/// TCP reset at accept, through reqwest: an unkeyed POST is retried only while each attempt
/// was proved not sent; the final error's delivery agrees with its text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_tcp_reject_delivery_is_truthful() {
    let base = peer_or_skip!(TCP_REJECT);
    let client = client_with!(ClientBuilder::new().without_idempotency());
    let err = bounded(
        Duration::from_secs(10),
        "reqwest unkeyed POST to the TCP reject frontend",
        client
            .post(format!("{base}/rq-tcp"))
            .json(&serde_json::json!({"order": 4}))
            .send(),
    )
    .await
    .unwrap_err();
    eprintln!("reqwest POST, tcp reject: {err}");
    let text = err.to_string();
    match delivery(&err) {
        Delivery::NotSent => {
            assert!(text.contains("not sent"), "{text}");
            assert!(!text.contains("may have been processed"), "{text}");
        }
        Delivery::MaybeProcessed => {
            assert!(text.contains("may have been processed"), "{text}");
            // Earlier attempts may have been refused during the connect (proved not sent, so
            // retried); the last one may have been written, and nothing follows it.
            let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
            assert!(e.report().map(|r| r.attempts()).unwrap_or(0) <= 4, "{text}");
            assert!(!text.contains("not sent"), "{text}");
        }
        other => panic!("{other:?}: {text}"),
    }
}

/// A stall behind HAProxy, through reqwest: the builder's attempt timeout and the retry
/// deadline bound the call; the message names the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_stall_is_bounded_by_the_deadline() {
    let base = peer_or_skip!(STALL);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(fast_retry().with_deadline(Duration::from_millis(900)))
                .with_attempt_timeout(Duration::from_millis(200))
                .build(next)
        }))
        .build();
    let start = Instant::now();
    let err = bounded(
        Duration::from_secs(5),
        "reqwest GET to the stall frontend",
        client.get(format!("{base}/rq-stall")).send(),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    eprintln!("reqwest GET, stall: {err} after {took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
}

/// HAProxy's 504 after 300 ms, through reqwest: a GET is retried and the last 504 returned as
/// the response (a final response is the server's last word); an unkeyed POST gets it after one
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_gateway_timeout_is_returned() {
    let base = peer_or_skip!(GATEWAY_TIMEOUT);
    let client = client_with!(ClientBuilder::new().without_idempotency());
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "reqwest GET to the 504 frontend",
        client.get(format!("{base}/rq-504")).send(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), 504);
    assert!(start.elapsed() >= Duration::from_millis(1200), "4 attempts");
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "reqwest POST to the 504 frontend",
        client.post(format!("{base}/rq-504-post")).body("{}").send(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), 504);
    assert!(start.elapsed() < Duration::from_millis(900), "one attempt");
}
