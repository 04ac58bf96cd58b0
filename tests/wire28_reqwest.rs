//! reqwest through `SturdyMiddleware` (and `ReqwestService`) against hand-written peers that
//! close, reset, stall and answer garbage: the attempts the peer sees, the message, the delivery
//! answer, and secrets kept out of every error text.

use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sturdy::core::{CallOptions, Delivery, ErrorKind, RateLimited};
use sturdy::ClientBuilder;
use sturdy_reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use tower::ServiceExt;

use crate::wire28_util::*;

fn mw(attempt: Duration, keys: bool) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            let b = ClientBuilder::new()
                .with_retry(quick_retry())
                .with_rate_limit(quick_limiter())
                .with_attempt_timeout(attempt);
            if keys {
                b.build(next)
            } else {
                b.without_idempotency().build(next)
            }
        }))
        .build()
}

const T: Duration = Duration::from_millis(500);

async fn closes_after_reading() -> Peer {
    peer(|mut c| async move {
        c.read_request().await;
    })
    .await
}

#[tokio::test]
async fn wire28_reqwest_close_after_reading_get_retried_and_named() {
    let p = closes_after_reading().await;
    let err = within(5, mw(T, true).get(p.url("/a")).send())
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the connection closed before the response was complete"
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Transport);
    assert_eq!(e.report().unwrap().attempts(), 4);
}

#[tokio::test]
async fn wire28_reqwest_keyed_post_retried_with_one_key() {
    let p = closes_after_reading().await;
    let err = within(
        5,
        mw(T, true)
            .post(p.url("/orders"))
            .body(r#"{"item":"book"}"#)
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    let keys = p.seen.header_values("idempotency-key");
    assert!(
        keys.len() == 4 && keys.iter().all(|k| k == &keys[0]),
        "{keys:?}"
    );
    let summary = sturdy::core::summary::ErrorSummary::of(&err);
    assert_eq!(summary.idempotency_key.as_deref(), Some(keys[0].as_str()));
    assert_eq!(summary.attempts, Some(4));
    assert!(summary.may_have_been_processed);
}

#[tokio::test]
async fn wire28_reqwest_post_without_key_sent_once() {
    let p = closes_after_reading().await;
    let err = within(5, mw(T, false).post(p.url("/pay")).body("x").send())
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert!(err.to_string().contains("may have been processed"), "{err}");
}

#[tokio::test]
async fn wire28_reqwest_reset_after_reading_names_the_reset() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let err = within(5, mw(T, true).get(p.url("/a")).send())
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );
}

#[tokio::test]
async fn wire28_reqwest_invalid_status_line_is_bounded_and_named() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 abc OK\r\n\r\n").await;
        }
    })
    .await;
    let err = within(5, mw(T, true).get(p.url("/a")).send())
        .await
        .unwrap_err();
    assert!(p.seen.requests() >= 1);
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(!msg.contains("error sending request"), "{msg}");
    assert!(msg.to_lowercase().contains("status"), "{msg}");
}

#[tokio::test]
async fn wire28_reqwest_stall_cut_by_the_attempt_timeout_and_connection_closed() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let start = Instant::now();
    let err = within(
        5,
        mw(Duration::from_millis(80), true).get(p.url("/a")).send(),
    )
    .await
    .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the attempt timed out after 80ms"
    );
    // Each abandoned attempt's request is dropped by reqwest, which closes its connection.
    assert!(
        eventually(|| p.seen.closed() == 4).await,
        "{}",
        p.seen.closed()
    );
}

#[tokio::test]
async fn wire28_reqwest_own_timeout_bounds_each_attempt() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.wait_close().await;
    })
    .await;
    let err = within(
        5,
        mw(T, true)
            .get(p.url("/a"))
            .timeout(Duration::from_millis(60))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_reqwest_huge_retry_after_reports_five_minutes() {
    let p = answering(
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 99999999999999999999\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let err = within(5, mw(T, true).get(p.url("/a")).send())
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(
        find::<RateLimited>(&err).unwrap().retry_after(),
        Duration::from_secs(300)
    );
    assert_eq!(
        err.to_string(),
        format!("rate limited by {}; retry after 5m", p.authority())
    );
}

#[tokio::test]
async fn wire28_reqwest_early_hints_then_answer() {
    let p = answering(
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let res = within(5, mw(T, true).get(p.url("/a")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ok");
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_reqwest_truncated_body_is_an_error_for_the_caller_not_a_retry() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nshort")
                .await;
        }
    })
    .await;
    let res = within(5, mw(T, true).get(p.url("/a")).send())
        .await
        .unwrap();
    assert!(within(5, res.bytes()).await.is_err());
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_reqwest_secrets_kept_out_of_errors() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let url = format!(
        "http://wireuser:pw-SECRET-1@{}/a?api_key=SECRET-2&x=1",
        p.addr
    );
    let err = within(
        5,
        mw(T, true)
            .get(&url)
            .bearer_auth("tok-SECRET-3")
            .header("x-api-key", "SECRET-4")
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    let mut texts = every_text(&err);
    texts += &format!("{:?}", find::<sturdy::core::Error>(&err));
    for secret in ["SECRET-1", "SECRET-2", "SECRET-3", "SECRET-4", "wireuser"] {
        assert!(!texts.contains(secret), "{secret} in {texts}");
    }
}

#[tokio::test]
async fn wire28_reqwest_service_under_the_builder_against_a_reset() {
    let p = peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(T)
        .build(ReqwestService::new(reqwest::Client::new()));
    let req = http::Request::post(p.url("/orders"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = within(5, client.oneshot(req)).await.unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed
    );
    assert!(
        err.to_string()
            .starts_with("gave up after 4 attempts: connection reset by peer"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_reqwest_service_stalled_body_left_to_the_caller() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
                .await;
            c.wait_close().await;
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_attempt_timeout(Duration::from_millis(100))
        .build(ReqwestService::new(reqwest::Client::new()));
    let mut req = http::Request::get(p.url("/a"))
        .body(Full::<Bytes>::default())
        .unwrap();
    req.extensions_mut().insert(CallOptions::new());
    let res = within(2, client.oneshot(req)).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(250), res.into_body().collect()).await;
    assert!(read.is_err());
    assert_eq!(p.seen.requests(), 1);
}
