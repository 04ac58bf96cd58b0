//! The composed client against peers that stall: accept and never read, read and never answer,
//! send a head and stall the body, drip a byte every 10 ms. What the attempt timeout, the
//! deadline and the circuit breaker bound.

use std::time::Duration;
use tokio::time::Instant;

use http_body_util::BodyExt;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, CircuitOpen, Delivery, ErrorKind};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::wire28_util::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

async fn never_reads() -> Peer {
    peer(|c| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(c);
    })
    .await
}

async fn reads_never_answers() -> Peer {
    peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await
}

#[tokio::test]
async fn wire28_accept_never_read_each_attempt_cut_by_the_attempt_timeout() {
    let p = never_reads().await;
    let start = Instant::now();
    let err = within(5, client(MS(100)).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert_eq!(p.seen.conns(), 4);
    assert!(took >= MS(400) && took < MS(1500), "{took:?}");
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 100ms"
    );
    // The request was written to a socket the peer accepted: it may have been read.
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_listener_that_never_accepts_is_bounded_too() {
    // The kernel completes the handshake of a listener that never calls accept.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let start = Instant::now();
    let err = within(5, client(MS(80)).oneshot(get(&format!("http://{addr}/a"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < MS(1500));
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    drop(listener);
}

#[tokio::test]
async fn wire28_read_never_answer_post_without_key_sent_once() {
    let p = reads_never_answers().await;
    let err = within(
        5,
        client_without_keys(MS(100)).oneshot(post(&p.url("/pay"))),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(
        msg.starts_with("the attempt timed out after 100ms"),
        "{msg}"
    );
    assert!(msg.contains("may have been processed"), "{msg}");
    // The abandoned attempt's connection is closed, not left open at the peer.
    assert!(eventually(|| p.seen.closed() == 1).await);
}

#[tokio::test]
async fn wire28_read_never_answer_keyed_post_retried_with_one_key() {
    let p = reads_never_answers().await;
    let err = within(5, client(MS(60)).oneshot(post(&p.url("/pay"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    let keys = p.seen.header_values("idempotency-key");
    assert!(keys.iter().all(|k| k == &keys[0]) && keys.len() == 4);
    assert_eq!(sturdy_err(&err).idempotency_key(), Some(keys[0].as_str()));
    assert!(
        eventually(|| p.seen.closed() == 4).await,
        "{}",
        p.seen.closed()
    );
}

#[tokio::test]
async fn wire28_layer_deadline_bounds_a_stall_without_attempt_timeout() {
    let p = reads_never_answers().await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_deadline(MS(250)))
        .with_rate_limit(quick_limiter())
        .without_attempt_timeout()
        .build(hyper_client());
    let start = Instant::now();
    let err = within(5, client.oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(took >= MS(240) && took < MS(800), "{took:?}");
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_request_deadline_bounds_retries_of_a_stall() {
    let p = reads_never_answers().await;
    let mut req = get(&p.url("/a"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(MS(300)));
    let start = Instant::now();
    let err = within(5, client(MS(100)).oneshot(req)).await.unwrap_err();
    let took = start.elapsed();
    assert!(took < MS(800), "{took:?}");
    assert!(p.seen.requests() <= 3, "{}", p.seen.requests());
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
}

#[tokio::test]
async fn wire28_head_then_stalled_body_returns_the_head_and_leaves_the_body_to_the_caller() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                .await;
            c.wait_close().await;
        }
    })
    .await;
    let res = within(2, client(MS(100)).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Documented: the deadline and the attempt timeout bound the call until the head arrives.
    let read = tokio::time::timeout(MS(300), res.into_body().collect()).await;
    assert!(read.is_err(), "the stalled body ended");
    assert_eq!(p.seen.requests(), 1);
    assert!(eventually(|| p.seen.closed() == 1).await);
}

const DRIPPED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-slow: yes\r\n\r\nok";

async fn dripping() -> Peer {
    peer(|mut c| async move {
        while c.read_request().await.is_some() {
            if !c.drip(DRIPPED, MS(10)).await {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn wire28_drip_fed_head_is_cut_by_the_attempt_timeout() {
    let p = dripping().await;
    let start = Instant::now();
    let err = within(5, client(MS(120)).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < MS(1500));
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 120ms"
    );
}

#[tokio::test]
async fn wire28_drip_fed_head_within_the_timeout_succeeds_once() {
    let p = dripping().await;
    let res = within(5, client(MS(3000)).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.headers()["x-slow"], "yes");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_drip_fed_head_under_a_deadline_ends_at_the_deadline() {
    let p = dripping().await;
    let mut req = get(&p.url("/a"));
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(MS(200)));
    let start = Instant::now();
    let err = within(5, client(MS(3000)).oneshot(req)).await.unwrap_err();
    let took = start.elapsed();
    assert!(took >= MS(190) && took < MS(600), "{took:?}");
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
}

#[tokio::test]
async fn wire28_breaker_opens_on_attempt_timeouts_and_stops_connecting() {
    let p = reads_never_answers().await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(2))
        .with_attempt_timeout(MS(60))
        .build(hyper_client());
    let err = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.conns(), 2, "{err}");
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert!(
        err.to_string()
            .starts_with("gave up after 2 attempts and 1 refused try: "),
        "{err}"
    );
    // The next call fails at once, sends nothing, and says so.
    let start = Instant::now();
    let err = within(5, client.clone().oneshot(post(&p.url("/b"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < MS(300));
    assert_eq!(p.seen.conns(), 2);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert!(err.to_string().contains("safe to send again"), "{err}");
}

#[tokio::test]
async fn wire28_many_callers_against_a_stall_all_end_by_the_timeout() {
    let p = reads_never_answers().await;
    let client = client(MS(80));
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..20 {
        let c = client.clone();
        let url = p.url(&format!("/r{i}"));
        let mut req = get(&url);
        req.extensions_mut()
            .insert(CallOptions::new().without_retries());
        calls.push(tokio::spawn(async move { c.oneshot(req).await }));
    }
    for call in calls {
        let err = within(5, call).await.unwrap().unwrap_err();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    }
    assert!(start.elapsed() < MS(1500));
    assert_eq!(p.seen.requests(), 20);
    assert!(
        eventually(|| p.seen.closed() == 20).await,
        "{}",
        p.seen.closed()
    );
}
