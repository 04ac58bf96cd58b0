//! The composed client over hyper-util against peers that close or reset the connection at every
//! moment of an exchange: what is retried, what the error says, and how delivery is classified.

use std::time::Duration;

use http_body_util::BodyExt;
use sturdy::core::classify::delivery;
use sturdy::core::{Delivery, ErrorKind};
use tower::ServiceExt;

use crate::wire28_util::*;

const T: Duration = Duration::from_millis(500);

async fn closes_after_reading() -> Peer {
    peer(|mut c| async move {
        c.read_request().await;
    })
    .await
}

async fn resets_after_reading() -> Peer {
    peer(|mut c| async move {
        c.read_request().await;
        c.reset();
    })
    .await
}

#[tokio::test]
async fn wire28_close_before_reading_get_is_retried_and_named() {
    let p = peer(|c| async move { drop(c) }).await;
    let err = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: "),
        "{msg} (connections: {})",
        p.seen.conns()
    );
    assert_eq!(p.seen.conns(), 4);
    assert!(!msg.contains("client error"), "{msg}");
    assert!(sturdy_err(&err).kind().is_retryable());
}

#[tokio::test]
async fn wire28_close_after_reading_get_retried_maybe_processed() {
    let p = closes_after_reading().await;
    let err = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Transport);
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.starts_with("gave up after 4 attempts: "), "{msg}");
    assert!(
        msg.contains("closed before the response was complete"),
        "{msg}"
    );
}

#[tokio::test]
async fn wire28_close_after_reading_post_without_key_sent_once() {
    let p = closes_after_reading().await;
    let err = within(5, client_without_keys(T).oneshot(post(&p.url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1, "a POST without a key was retried");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.contains("may have been processed"), "{msg}");
    assert!(!msg.contains("safe to send again"), "{msg}");
    assert_eq!(sturdy_err(&err).report().unwrap().attempts(), 1);
}

#[tokio::test]
async fn wire28_close_after_reading_post_with_key_retried_with_one_key() {
    let p = closes_after_reading().await;
    let err = within(5, client(T).oneshot(post(&p.url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    let keys = p.seen.header_values("idempotency-key");
    assert_eq!(keys.len(), 4);
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
    let e = sturdy_err(&err);
    assert_eq!(e.idempotency_key(), Some(keys[0].as_str()));
    let msg = err.to_string();
    assert!(
        msg.ends_with(&format!(
            "it may have been processed: retry with the same idempotency key {}",
            keys[0]
        )),
        "{msg}"
    );
}

#[tokio::test]
async fn wire28_reset_after_reading_get_names_the_reset() {
    let p = resets_after_reading().await;
    let err = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Transport);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_reset_after_reading_post_without_key_not_retried() {
    let p = resets_after_reading().await;
    let err = within(5, client_without_keys(T).oneshot(post(&p.url("/pay"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.starts_with("connection reset by peer"), "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
}

async fn cut_response(bytes: &'static [u8]) -> Peer {
    peer(move |mut c| async move {
        if c.read_request().await.is_some() {
            c.write(bytes).await;
        }
    })
    .await
}

#[tokio::test]
async fn wire28_close_mid_status_line_get_retried() {
    let p = cut_response(b"HTTP/1.1 20").await;
    let err = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 4);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    let msg = err.to_string();
    assert!(msg.starts_with("gave up after 4 attempts: "), "{msg}");
    assert!(
        msg.contains("closed before the response was complete"),
        "{msg}"
    );
}

#[tokio::test]
async fn wire28_close_mid_headers_post_without_key_sent_once() {
    let p = cut_response(b"HTTP/1.1 200 OK\r\ncontent-type: appl").await;
    let err = within(5, client_without_keys(T).oneshot(post(&p.url("/orders"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(err.to_string().contains("may have been processed"), "{err}");
}

#[tokio::test]
async fn wire28_body_shorter_than_content_length_is_a_body_error_not_a_retry() {
    let p = cut_response(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..").await;
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let err = within(5, res.into_body().collect()).await.unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    let kind = sturdy::core::classify::classify_error(&err);
    assert!(
        matches!(kind, ErrorKind::Transport | ErrorKind::Body),
        "{kind:?}: {err}"
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
}

#[tokio::test]
async fn wire28_truncated_chunked_body_ends_in_an_error() {
    let p =
        cut_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nab")
            .await;
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    let err = within(5, res.into_body().collect()).await.unwrap_err();
    assert_eq!(p.seen.requests(), 1);
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert!(!sturdy::core::classify::describe(&err).is_empty());
}

#[tokio::test]
async fn wire28_connection_close_after_full_response_next_call_opens_another() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    })
    .await;
    let client = client(T);
    for _ in 0..3 {
        let res = within(5, client.clone().oneshot(post(&p.url("/orders"))))
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(p.seen.requests(), 3);
    assert_eq!(p.seen.conns(), 3);
}

/// The first connection answers one request and keeps alive, then resets on the next request
/// it reads; later connections answer normally.
async fn stale_after_one() -> Peer {
    peer(|mut c| async move {
        if c.index == 0 {
            if c.read_request().await.is_some() {
                c.write(OK).await;
            }
            if c.read_request().await.is_some() {
                c.reset();
            }
            return;
        }
        while c.read_request().await.is_some() {
            if !c.write(OK).await {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn wire28_keepalive_reset_on_reuse_get_recovers_on_a_new_connection() {
    let p = stale_after_one().await;
    let client = client(T);
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    let res = within(5, client.clone().oneshot(get(&p.url("/b"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 3);
    assert_eq!(p.seen.conns(), 2);
}

#[tokio::test]
async fn wire28_keepalive_reset_on_reuse_post_without_key_is_not_resent() {
    let p = stale_after_one().await;
    let client = client_without_keys(T);
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    let err = within(5, client.clone().oneshot(post(&p.url("/pay"))))
        .await
        .unwrap_err();
    // The POST reached the peer on the reused connection: not "not sent", and not sent again.
    assert_eq!(p.seen.requests(), 2);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(err.to_string().contains("may have been processed"), "{err}");
}

#[tokio::test]
async fn wire28_keepalive_reset_on_reuse_keyed_post_resent_with_the_same_key() {
    let p = stale_after_one().await;
    let client = client(T);
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    let res = within(5, client.clone().oneshot(post(&p.url("/pay"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let keys = p.seen.header_values("idempotency-key");
    assert_eq!(keys.len(), 2, "{:?}", p.seen.heads());
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test]
async fn wire28_idle_connection_closed_by_peer_is_not_a_failure_for_a_post() {
    // The peer answers, then closes the idle connection a little later (a FIN, as servers do
    // at their keep-alive timeout); the next POST must go out on a fresh connection.
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            c.write(OK).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let client = client_without_keys(T);
    let res = within(5, client.clone().oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let res = within(5, client.clone().oneshot(post(&p.url("/pay"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 2);
}
