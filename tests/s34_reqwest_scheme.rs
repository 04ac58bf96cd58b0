//! sturdy-reqwest: a builder error is "may have been processed" only when reqwest raised it
//! while following a redirect. A reqwest-middleware below `SturdyMiddleware` that waits before
//! handing the request on (a token fetch, a rate limiter) must not make a request reqwest
//! refuses outright (an `ftp:` URL) read as a redirect's. A scripted hyper server on
//! 127.0.0.1:0, real time with millisecond settings.
#![cfg(feature = "full")]

use std::time::Duration;

use futures_util::future::BoxFuture;
use http::Extensions;
use reqwest_middleware::Next;
use sturdy::core::{Delivery, ErrorKind};
use sturdy::reqwest::{delivery, find, SturdyMiddleware};
use sturdy::ClientBuilder;

use crate::mix32_util::*;

/// Waits a few milliseconds (as a token fetch or a limiter would) before the rest of the chain.
fn waits<'a>(
    req: reqwest::Request,
    extensions: &'a mut Extensions,
    next: Next<'a>,
) -> BoxFuture<'a, reqwest_middleware::Result<reqwest::Response>> {
    Box::pin(async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        next.run(req, extensions).await
    })
}

fn waiting_chain() -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(waits)
        .build()
}

/// error.rs: "reqwest raises them before anything is sent (an unknown scheme ...)": `Config`,
/// not sent, whatever a later middleware does first.
#[tokio::test]
async fn s34_bad_scheme_behind_a_waiting_middleware_is_not_sent() {
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let err = within(
            10,
            waiting_chain()
                .request(method.clone(), "ftp://127.0.0.1/orders?api_key=s34-secret")
                .body("order")
                .send(),
        )
        .await
        .unwrap_err();
        assert_eq!(delivery(&err), Delivery::NotSent, "{method}: {err}");
        let e = find::<sturdy::core::Error>(&err).expect("a sturdy error in the chain");
        assert_eq!(e.kind(), &ErrorKind::Config, "{method}: {e}");
        let text = e.to_string();
        assert!(text.starts_with("invalid request"), "{method}: {text}");
        assert!(!text.contains("redirect"), "{method}: {text}");
        assert!(!format!("{err:?}").contains("s34-secret"), "{err:?}");
    }
}

/// The other side stays true behind the same middleware: a POST answered 303 to `ftp:` was
/// received, so it may have been processed, and the message says it was a redirect.
#[tokio::test]
async fn s34_redirect_to_a_bad_scheme_behind_a_waiting_middleware_may_have_been_processed() {
    let s = scripted(|_hit, _| async move {
        respond(303, &[("location", "ftp://127.0.0.1/orders/o_1")], "")
    })
    .await;
    let err = within(
        10,
        waiting_chain().post(s.url("/start")).body("order").send(),
    )
    .await
    .unwrap_err();
    assert_eq!(s.count(), 1, "not resent: {err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error in the chain");
    assert!(
        e.to_string().starts_with("could not follow a redirect"),
        "{e}"
    );
}
