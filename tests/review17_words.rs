//! Changed sentences read literally.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use outsider_common::*;
use sturdy::core::hold::AttemptHold;
use sturdy::core::{BoxError, CallOptions};
use sturdy::retry::RetryLayer;
use tower::{ServiceBuilder, ServiceExt};

const U: &str = "http://api.example.com/things";

/// Counts the requests that arrive with a hold mark.
fn marking_probe(
    marked: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        if AttemptHold::of(&req).is_some() {
            marked.fetch_add(1, Ordering::SeqCst);
        }
        async { Ok::<_, BoxError>(Response::new(Full::from("ok"))) }
    })
}

fn with_deadline(mut req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_secs(1)));
    req
}

/// `RetryLayer::with_hold_marks`: "\[false; `sturdy::ClientBuilder` turns it on\]".
#[tokio::test]
async fn marks_are_off_by_default_and_on_in_the_builder() {
    let marked = Arc::new(AtomicUsize::new(0));
    let plain = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .service(marking_probe(marked.clone()));
    plain.oneshot(with_deadline(get(U))).await.unwrap();
    assert_eq!(marked.load(Ordering::SeqCst), 0);
    let client = sturdy::ClientBuilder::new().build(marking_probe(marked.clone()));
    client.oneshot(with_deadline(get(U))).await.unwrap();
    assert_eq!(marked.load(Ordering::SeqCst), 1);
}

/// sturdy-core's CHANGELOG: "`AttemptHold`, the mark a retry layer with hold marks on
/// (`RetryLayer::with_hold_marks`...) puts on each attempt of a call with a deadline". A retry
/// layer as it comes puts none; with marks on, it does.
#[tokio::test]
async fn the_core_changelog_says_which_attempts_are_marked() {
    let marked = Arc::new(AtomicUsize::new(0));
    let plain = ServiceBuilder::new()
        .layer(RetryLayer::new())
        .service(marking_probe(marked.clone()));
    plain.oneshot(with_deadline(get(U))).await.unwrap();
    assert_eq!(marked.load(Ordering::SeqCst), 0);
    let marking = ServiceBuilder::new()
        .layer(RetryLayer::new().with_hold_marks(true))
        .service(marking_probe(marked.clone()));
    marking.oneshot(with_deadline(get(U))).await.unwrap();
    assert_eq!(marked.load(Ordering::SeqCst), 1);
}
