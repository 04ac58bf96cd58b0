//! Bodies kept for replay (docs/guides/retry.md defaults, RELIABILITY.md bounds): at the limit
//! and one byte over it, through the retry layer alone and through `ClientBuilder`.
#![cfg(feature = "full")]

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::{Layer, ServiceExt};

use crate::retry28_common::*;

const URL: &str = "http://api.example.com/upload";
const MIB: usize = 1024 * 1024;

fn body_of(n: usize) -> Req {
    let bytes: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    Request::put(URL)
        .body(Full::new(Bytes::from(bytes)))
        .unwrap()
}

fn first_503() -> (Api, Seen) {
    api(|n, _| Ok(if n == 0 { status(503) } else { status(200) }))
}

#[tokio::test(start_paused = true)]
async fn a_body_of_exactly_one_mib_is_replayed_byte_for_byte() {
    let (svc, seen) = first_503();
    let res = RetryLayer::new()
        .layer(svc)
        .oneshot(body_of(MIB))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen.get(0).body.len(), MIB);
    assert_eq!(seen.get(0).body, seen.get(1).body);
}

#[tokio::test(start_paused = true)]
async fn one_byte_over_is_sent_once() {
    let (svc, seen) = first_503();
    let res = RetryLayer::new()
        .layer(svc)
        .oneshot(body_of(MIB + 1))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen.get(0).body.len(), MIB + 1);
}

#[tokio::test(start_paused = true)]
async fn with_body_limit_sets_the_bound() {
    let layer = RetryLayer::new().with_body_limit(10);
    let (svc, seen) = first_503();
    layer.clone().layer(svc).oneshot(body_of(10)).await.unwrap();
    assert_eq!(seen.len(), 2);
    let (svc, seen) = first_503();
    layer.clone().layer(svc).oneshot(body_of(11)).await.unwrap();
    assert_eq!(seen.len(), 1);
    // Zero: only empty bodies are replayed.
    let (svc, seen) = first_503();
    let empty = Request::get(URL).body(Full::default()).unwrap();
    RetryLayer::new()
        .with_body_limit(0)
        .layer(svc)
        .oneshot(empty)
        .await
        .unwrap();
    assert_eq!(seen.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_client_sends_a_large_keyed_post_once() {
    let (svc, seen) = first_503();
    let client = ClientBuilder::new().build(svc);
    let bytes = Bytes::from(vec![b'x'; 2 * MIB]);
    let res = client
        .oneshot(Request::post(URL).body(Full::new(bytes)).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.len(), 1);
    assert!(seen.get(0).headers.contains_key("idempotency-key"));
}
