//! docs/guides/retry.md, "What the caller gets": `report()` says "whether any attempt may have
//! been processed", and a POST's message says "the request was not sent, so it is safe to send
//! again" "only when no attempt could have reached the server". A call whose first attempt
//! reached a server that closed without answering, and whose later attempts were refused, may
//! have been processed: asked through `classify::delivery`, `sturdy_reqwest::delivery`, the
//! report and the message. Loopback, real time with millisecond settings.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sturdy::core::classify::delivery as delivery_of;
use sturdy::core::Delivery;
use sturdy::reqwest::{delivery, find, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_seed(15).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    )
}

/// A server that takes one connection, reads the request, closes without answering, and stops
/// listening: every later connection is refused.
async fn once_then_gone() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        drop(l);
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        let _ = s.shutdown().await;
    });
    addr
}

#[tokio::test]
async fn a_post_that_reached_the_server_once_then_was_refused_may_have_been_processed_hyper() {
    let addr = once_then_gone().await;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let client = ClientBuilder::new().with_retry(quick_retry()).build(http);
    let req = Request::post(format!("http://{addr}/orders"))
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), client.oneshot(req))
        .await
        .expect("no hang")
        .unwrap_err();
    let msg = err.to_string();
    eprintln!("hyper: {msg}");
    let e = err.downcast_ref::<sturdy::core::Error>().unwrap();
    let report = e.report().unwrap();
    assert!(report.attempts() >= 2, "{msg}");
    assert_eq!(report.delivery(), Delivery::MaybeProcessed, "{msg}");
    assert_eq!(delivery_of(&*err), Delivery::MaybeProcessed, "{msg}");
    assert!(!msg.contains("not sent"), "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
}

#[tokio::test]
async fn a_post_that_reached_the_server_once_then_was_refused_may_have_been_processed_reqwest() {
    let addr = once_then_gone().await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        client
            .post(format!("http://{addr}/orders"))
            .body(r#"{"item":"book"}"#)
            .send(),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    let msg = err.to_string();
    eprintln!("reqwest: {msg}");
    let report = find::<sturdy::core::Error>(&err).unwrap().report().unwrap();
    assert!(report.attempts() >= 2, "{msg}");
    assert_eq!(report.delivery(), Delivery::MaybeProcessed, "{msg}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{msg}");
    assert!(!msg.contains("not sent"), "{msg}");
}

/// coalesce.md: "each caller gets a `sturdy_core::Error` whose kind and delivery are the shared
/// error's (as the shared classification reads them)". Coalescing around the whole client: the
/// shared error is the retry layer's, which may have been processed (the first attempt reached the
/// server); every caller who shared it reads the same.
#[tokio::test]
async fn callers_sharing_a_call_that_may_have_been_processed_are_told_so() {
    use sturdy::coalesce::CoalesceLayer;
    let addr = once_then_gone().await;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(CoalesceLayer::new())
        .build(http);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let req = Request::get(format!("http://{addr}/orders"))
                .body(Full::default())
                .unwrap();
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    let mut seen = Vec::new();
    for t in tasks {
        let err = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap_err();
        seen.push((err.to_string(), delivery_of(&*err)));
    }
    eprintln!("{seen:#?}");
    for (msg, d) in &seen {
        assert_eq!(*d, Delivery::MaybeProcessed, "{msg}");
    }
}
