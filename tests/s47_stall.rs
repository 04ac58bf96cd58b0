//! README ("a call returns when the response's head arrives: the attempt timeout and the deadline
//! bound the attempts up to it, not the reading of the body"), the retry guide's deadline and
//! attempt timeout, and `CallOptions::with_deadline`: a raw loopback peer stalls at each phase
//! (accepts and never reads, reads and never answers, trickles the head, sends a head and part of
//! a body, one chunk). Checked: the call ends within the bound (3x margin), its kind, delivery and
//! message are truthful, the same kept service (under `ConcurrencyLimit(1)` and `Buffer`) serves
//! the next call, and a call dropped at a seeded moment sends nothing more. Real time.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{CallOptions, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use crate::s47_util::{get, post, Peer, Phase, Rng};

type Kept = BoxCloneSyncService<Request<Full<Bytes>>, Response<hyper::body::Incoming>, BoxError>;

fn fast_retry() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(30)).unwrap(),
    )
}

/// The default stack with fast backoff, under a concurrency limit of one and a buffer.
fn kept(retry: RetryLayer, attempt: Duration) -> Kept {
    let client = ClientBuilder::new()
        .with_retry(retry)
        .with_attempt_timeout(attempt)
        .build(sturdy_chaos::http_client());
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(tower::buffer::BufferLayer::new(4))
            .layer(tower::limit::ConcurrencyLimitLayer::new(1))
            .service(client),
    )
}

async fn call(
    svc: &mut Kept,
    req: Request<Full<Bytes>>,
    bound: Duration,
) -> Result<Response<hyper::body::Incoming>, BoxError> {
    tokio::time::timeout(bound, async { svc.ready().await?.call(req).await })
        .await
        .expect("the call hung past the test's bound")
}

/// After a stall, the peer turns healthy and the same kept service must serve a call.
async fn next_call_proceeds(svc: &mut Kept, peer: &Peer) {
    peer.set(Phase::Healthy);
    let res = call(svc, get(&peer.url("/ok")), Duration::from_secs(2))
        .await
        .expect("the next call through the kept service failed");
    assert_eq!(res.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(1), res.into_body().collect())
        .await
        .expect("healthy body hung")
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"ok");
}

fn pre_head_phases() -> [Phase; 3] {
    [Phase::Silent, Phase::ReadNoHead, Phase::TrickleAll]
}

#[tokio::test]
async fn a_stall_before_the_head_ends_at_the_per_request_deadline_as_a_truthful_timeout() {
    for phase in pre_head_phases() {
        let peer = Peer::start(phase).await;
        let mut svc = kept(fast_retry(), Duration::from_millis(100));
        let mut req = post(&peer.url("/orders"));
        req.extensions_mut().insert(
            CallOptions::new()
                .with_deadline(Duration::from_millis(300))
                .with_idempotency_key("s47-deadline-1"),
        );
        let t0 = Instant::now();
        let err = call(&mut svc, req, Duration::from_secs(4))
            .await
            .expect_err("a stalled peer answered");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(900),
            "{phase:?}: {took:?}: {text}"
        );
        assert!(
            took >= Duration::from_millis(250),
            "{phase:?}: ended early {took:?}: {text}"
        );
        let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
        assert_eq!(e.kind(), &ErrorKind::Timeout, "{phase:?}: {text}");
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{phase:?}: {text}"
        );
        assert!(!text.contains("not sent"), "{phase:?}: {text}");
        assert!(
            text.contains("s47-deadline-1"),
            "{phase:?}: names the key: {text}"
        );
        assert!(
            text.contains("300ms") || text.contains("100ms"),
            "{phase:?}: names the duration: {text}"
        );
        next_call_proceeds(&mut svc, &peer).await;
    }
}

#[tokio::test]
async fn a_stall_before_the_head_ends_at_the_layer_deadline() {
    for phase in pre_head_phases() {
        let peer = Peer::start(phase).await;
        let mut svc = kept(
            fast_retry().with_deadline(Duration::from_millis(250)),
            Duration::from_secs(30),
        );
        let t0 = Instant::now();
        let err = call(&mut svc, get(&peer.url("/items")), Duration::from_secs(4))
            .await
            .expect_err("a stalled peer answered");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(750),
            "{phase:?}: {took:?}: {text}"
        );
        let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
        assert_eq!(e.kind(), &ErrorKind::Timeout, "{phase:?}: {text}");
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{phase:?}: {text}"
        );
        assert!(
            text.contains("250ms"),
            "{phase:?}: names the deadline: {text}"
        );
        next_call_proceeds(&mut svc, &peer).await;
    }
}

#[tokio::test]
async fn a_stall_before_the_head_ends_at_the_attempt_timeout_with_no_retry() {
    for phase in pre_head_phases() {
        let peer = Peer::start(phase).await;
        let mut svc = kept(fast_retry(), Duration::from_millis(150));
        let mut req = post(&peer.url("/orders"));
        req.extensions_mut().insert(
            CallOptions::new()
                .without_retries()
                .with_idempotency_key("s47-once"),
        );
        let t0 = Instant::now();
        let err = call(&mut svc, req, Duration::from_secs(4))
            .await
            .expect_err("a stalled peer answered");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(450),
            "{phase:?}: {took:?}: {text}"
        );
        let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("a sturdy error");
        assert_eq!(e.kind(), &ErrorKind::Timeout, "{phase:?}: {text}");
        assert_eq!(
            delivery(&*err),
            Delivery::MaybeProcessed,
            "{phase:?}: {text}"
        );
        assert!(!text.contains("not sent"), "{phase:?}: {text}");
        assert!(text.contains("timed out"), "{phase:?}: {text}");
        assert!(
            text.contains("150ms"),
            "{phase:?}: names the duration: {text}"
        );
        if phase != Phase::Silent {
            assert_eq!(peer.with_key("s47-once"), 1, "{phase:?}");
        }
        next_call_proceeds(&mut svc, &peer).await;
    }
}

/// "No more": the head arrives at once, so the call returns; the body read that follows is the
/// caller's and the stack does not cut it at the deadline or the attempt timeout.
#[tokio::test]
async fn a_stall_after_the_head_returns_the_response_and_leaves_the_body_to_the_caller() {
    for phase in [Phase::HeadMidBody, Phase::ChunkedStall] {
        let peer = Peer::start(phase).await;
        let mut svc = kept(
            fast_retry().with_deadline(Duration::from_millis(200)),
            Duration::from_millis(100),
        );
        let t0 = Instant::now();
        let res = call(&mut svc, get(&peer.url("/items")), Duration::from_secs(2))
            .await
            .expect("the head arrived");
        assert!(t0.elapsed() < Duration::from_millis(300), "{phase:?}");
        assert_eq!(res.status(), 200);
        let mut body = res.into_body();
        let first = tokio::time::timeout(Duration::from_millis(500), body.frame())
            .await
            .expect("the first bytes were sent")
            .expect("a frame")
            .expect("no error");
        assert_eq!(
            first.into_data().unwrap(),
            Bytes::from_static(b"ab"),
            "{phase:?}"
        );
        // Past the deadline and the attempt timeout, the read is still open: not cut.
        let more = tokio::time::timeout(Duration::from_millis(400), body.frame()).await;
        assert!(more.is_err(), "{phase:?}: the stalled body ended: {more:?}");
        // Holding the stalled body does not hold the concurrency permit: the next call goes.
        next_call_proceeds(&mut svc, &peer).await;
        drop(body);
    }
}

#[tokio::test]
async fn a_body_trickled_past_the_deadline_is_read_whole() {
    let peer = Peer::start(Phase::TrickleBody).await;
    let mut svc = kept(
        fast_retry().with_deadline(Duration::from_millis(150)),
        Duration::from_millis(100),
    );
    let res = call(&mut svc, get(&peer.url("/items")), Duration::from_secs(2))
        .await
        .expect("the head arrived at once");
    let t0 = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(3), res.into_body().collect())
        .await
        .expect("the trickled body never ended")
        .expect("the stack cut the body it promised not to bound")
        .to_bytes();
    assert_eq!(&body[..], b"abcdefghijklmnopqrst");
    assert!(t0.elapsed() >= Duration::from_millis(800));
    next_call_proceeds(&mut svc, &peer).await;
}

/// A POST with an idempotency key is dropped at a seeded moment while the peer stalls (each
/// attempt timing out and being retried): once dropped, no further attempt reaches the peer, and
/// the next call through the same kept service proceeds.
#[tokio::test]
async fn a_call_dropped_during_a_stall_sends_nothing_more() {
    let mut rng = Rng(0x0547_2026);
    for (i, phase) in [Phase::ReadNoHead, Phase::TrickleAll, Phase::Silent]
        .into_iter()
        .enumerate()
    {
        let peer = Peer::start(phase).await;
        let mut svc = kept(fast_retry(), Duration::from_millis(80));
        let key = format!("s47-drop-{i}");
        let mut req = post(&peer.url("/orders"));
        req.extensions_mut().insert(
            CallOptions::new()
                .with_deadline(Duration::from_secs(3))
                .with_max_attempts(20)
                .with_idempotency_key(key.clone()),
        );
        let at = Duration::from_millis(rng.between(20, 400));
        let r = tokio::time::timeout(at, async { svc.ready().await?.call(req).await }).await;
        assert!(
            r.is_err(),
            "{phase:?}: the call ended before the drop at {at:?}"
        );
        // An attempt written just before the drop may be read by the peer just after it: the
        // count is taken once that has settled. (A TCP connect the client's pool began before the
        // drop may still complete after it, with no request on it: hyper-util finishes connects
        // in the background, and no doc sentence says otherwise, so connections are not counted.)
        tokio::time::sleep(Duration::from_millis(30)).await;
        let seen = peer.with_key(&key);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            peer.with_key(&key),
            seen,
            "{phase:?}: an attempt after the drop at {at:?}"
        );
        next_call_proceeds(&mut svc, &peer).await;
        assert_eq!(peer.with_key(&key), seen, "{phase:?}");
    }
}
