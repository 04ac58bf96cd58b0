//! The reqwest guide: "A `.timeout()` bounds each attempt (each attempt is one reqwest
//! `execute`)", the retry layer's deadline bounds the call, and the README's "a call returns when
//! the response's head arrives". Through `SturdyMiddleware`, a peer that reads and never answers
//! ends the call within the bounds with a truthful delivery; a peer that stalls mid-body is tested
//! against reqwest's own meaning of `.timeout()` (the whole body). Real time on loopback.
#![cfg(feature = "full")]

use std::time::Duration;

use sturdy::core::{CallOptions, Delivery};
use sturdy::reqwest::SturdyMiddleware;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::time::Instant;

use crate::s47_util::{Peer, Phase};

fn client(attempt: Duration) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(
                    RetryLayer::new().with_backoff(
                        Backoff::decorrelated_jitter(
                            Duration::from_millis(10),
                            Duration::from_millis(30),
                        )
                        .unwrap(),
                    ),
                )
                .with_attempt_timeout(attempt)
                .build(next)
        }))
        .build()
}

#[tokio::test]
async fn a_stalled_peer_ends_at_the_request_timeout_and_the_deadline() {
    for phase in [Phase::Silent, Phase::ReadNoHead, Phase::TrickleAll] {
        let peer = Peer::start(phase).await;
        let c = client(Duration::from_secs(5));
        let t0 = Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(3),
            c.post(peer.url("/orders"))
                .json(&serde_json::json!({"item": "book"}))
                .timeout(Duration::from_millis(100))
                .with_extension(
                    CallOptions::new()
                        .with_deadline(Duration::from_millis(350))
                        .with_idempotency_key("s47-rq"),
                )
                .send(),
        )
        .await
        .expect("hung")
        .expect_err("a stalled peer");
        let took = t0.elapsed();
        let text = err.to_string();
        assert!(
            took <= Duration::from_millis(1050),
            "{phase:?}: {took:?}: {text}"
        );
        assert_eq!(
            sturdy::reqwest::delivery(&err),
            Delivery::MaybeProcessed,
            "{phase:?}: {text}"
        );
        assert!(!text.contains("not sent"), "{phase:?}: {text}");
        assert!(text.contains("s47-rq"), "{phase:?}: {text}");
        peer.set(Phase::Healthy);
        let res = tokio::time::timeout(Duration::from_secs(2), c.get(peer.url("/ok")).send())
            .await
            .expect("hung")
            .expect("the next call proceeds");
        assert_eq!(res.text().await.unwrap(), "ok");
    }
}

/// reqwest documents `RequestBuilder::timeout` as covering the whole exchange "until the
/// response body has finished"; the guide keeps `.timeout()` as a thing a request keeps.
#[tokio::test]
async fn a_request_timeout_still_bounds_the_body_read_through_the_middleware() {
    for phase in [Phase::HeadMidBody, Phase::ChunkedStall] {
        let peer = Peer::start(phase).await;
        let c = client(Duration::from_secs(5));
        let res = tokio::time::timeout(
            Duration::from_secs(2),
            c.get(peer.url("/items"))
                .timeout(Duration::from_millis(150))
                .send(),
        )
        .await
        .expect("hung")
        .expect("the head arrives");
        let t0 = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(1), res.bytes()).await;
        let took = t0.elapsed();
        match read {
            Ok(Err(e)) => assert!(e.is_timeout() || e.is_body(), "{phase:?}: {e}"),
            Ok(Ok(b)) => panic!("{phase:?}: a stalled body completed: {b:?}"),
            Err(_) => panic!(
                "{phase:?}: the body read outlived the request's .timeout(150ms) by {took:?}"
            ),
        }
    }
}
