//! The composed client against peers that answer with malformed HTTP/1.1: broken status lines,
//! HTTP/0.9 junk, headers without a colon, a megabyte of headers, ten thousand headers,
//! contradicting lengths, informational answers before the real one.

use std::time::Duration;
use tokio::time::Instant;

use http_body_util::BodyExt;
use sturdy::core::classify::{classify_error, delivery};
use sturdy::core::{Delivery, ErrorKind};
use tower::ServiceExt;

use crate::wire28_util::*;

const T: Duration = Duration::from_millis(500);

async fn answers_once_then_closes(bytes: Vec<u8>) -> Peer {
    let bytes = std::sync::Arc::new(bytes);
    peer(move |mut c| {
        let bytes = bytes.clone();
        async move {
            if c.read_request().await.is_some() {
                c.write(&bytes).await;
            }
        }
    })
    .await
}

/// What each malformed answer must give: an error within the bound, not "not sent", whose
/// message names something beyond hyper-util's wrapper text.
async fn assert_malformed(bytes: Vec<u8>) -> (sturdy::core::BoxError, Peer) {
    let p = answers_once_then_closes(bytes).await;
    let start = Instant::now();
    let err = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(p.seen.requests() >= 1);
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let msg = err.to_string();
    assert!(!msg.contains("client error (SendRequest)"), "{msg}");
    assert!(!msg.ends_with(": "), "{msg}");
    (err, p)
}

#[tokio::test]
async fn wire28_invalid_status_line_names_the_cause() {
    let (err, p) = assert_malformed(b"HTTP/1.1 abc OK\r\n\r\n".to_vec()).await;
    let msg = err.to_string();
    assert!(msg.to_lowercase().contains("status"), "{msg}");
    // Garbage from the peer is not something a retry fixes on its own; either way bounded.
    assert!(p.seen.requests() <= 4);
    assert!(
        err.to_string()
            .contains("the server sent an invalid HTTP response (invalid HTTP status-code parsed)"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_http09_junk_names_the_cause() {
    let (err, _) = assert_malformed(b"hello there\n".to_vec()).await;
    let msg = err.to_string().to_lowercase();
    assert!(
        msg.contains("invalid") || msg.contains("version") || msg.contains("parse"),
        "{msg}"
    );
    assert!(
        err.to_string()
            .contains("the server sent an invalid HTTP response (invalid HTTP version parsed)"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_header_without_colon_names_the_cause() {
    let (err, _) =
        assert_malformed(b"HTTP/1.1 200 OK\r\nno colon here\r\ncontent-length: 0\r\n\r\n".to_vec())
            .await;
    assert!(err.to_string().to_lowercase().contains("header"), "{err}");
    assert!(
        err.to_string()
            .contains("the server sent an invalid HTTP response (invalid HTTP header parsed)"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_a_megabyte_of_headers_is_refused() {
    let mut bytes = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..1024 {
        bytes.extend_from_slice(format!("x-junk-{i}: ").as_bytes());
        bytes.extend_from_slice(&[b'a'; 1000]);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"content-length: 0\r\n\r\n");
    let (err, _) = assert_malformed(bytes).await;
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("large") || msg.contains("too"), "{msg}");
    assert!(
        err.to_string()
            .contains("the server sent an invalid HTTP response (message head is too large)"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_ten_thousand_headers_are_refused() {
    let mut bytes = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..10_000 {
        bytes.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
    }
    bytes.extend_from_slice(b"content-length: 0\r\n\r\n");
    let (err, _) = assert_malformed(bytes).await;
    let msg = err.to_string().to_lowercase();
    assert!(msg.contains("large") || msg.contains("too"), "{msg}");
    assert!(
        err.to_string()
            .contains("the server sent an invalid HTTP response (message head is too large)"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_contradicting_content_lengths_are_refused() {
    let (err, _) = assert_malformed(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 7\r\n\r\nhello".to_vec(),
    )
    .await;
    assert!(
        err.to_string().to_lowercase().contains("content-length")
            || err.to_string().to_lowercase().contains("length"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("the server sent an invalid HTTP response (invalid content-length parsed)"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_repeated_equal_content_length_is_read() {
    let p = answers_once_then_closes(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
    )
    .await;
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_negative_content_length_is_refused() {
    assert_malformed(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\nhello".to_vec()).await;
}

#[tokio::test]
async fn wire28_chunked_and_content_length_together_do_not_hang() {
    let p = answers_once_then_closes(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    let out = within(5, async {
        match client(T).oneshot(get(&p.url("/a"))).await {
            Ok(res) => res.into_body().collect().await.map(|b| b.to_bytes()).ok(),
            Err(_) => None,
        }
    })
    .await;
    if let Some(body) = out {
        assert_eq!(&body[..], b"hello", "the length header won over chunked");
    }
}

#[tokio::test]
async fn wire28_bad_chunk_size_is_a_body_error() {
    let p = answers_once_then_closes(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
    )
    .await;
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    let err = within(5, res.into_body().collect()).await.unwrap_err();
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_100_continue_before_the_answer_is_skipped() {
    let p = answers_once_then_closes(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
            .to_vec(),
    )
    .await;
    let res = within(5, client(T).oneshot(post(&p.url("/orders"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        &res.into_body().collect().await.unwrap().to_bytes()[..],
        b"ok"
    );
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_103_early_hints_before_the_answer_are_skipped() {
    let p = answers_once_then_closes(
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </b.js>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            .to_vec(),
    )
    .await;
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_endless_early_hints_are_cut_by_the_attempt_timeout() {
    let p = peer(|mut c| async move {
        if c.read_request().await.is_some() {
            loop {
                if !c
                    .write(b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n")
                    .await
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
    .await;
    let mut req = get(&p.url("/a"));
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().without_retries());
    let start = Instant::now();
    let err = within(5, client(Duration::from_millis(150)).oneshot(req))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
}

#[tokio::test]
async fn wire28_a_final_1xx_after_close_is_an_error() {
    // The peer sends only a 100 Continue and closes.
    let (err, _) = assert_malformed(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()).await;
    assert!(classify_error(&*err).is_retryable(), "{err}");
}

#[tokio::test]
async fn wire28_status_beyond_599_is_returned_not_retried() {
    let p =
        answers_once_then_closes(b"HTTP/1.1 799 Odd\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
    let out = within(5, client(T).oneshot(get(&p.url("/a")))).await;
    match out {
        Ok(res) => assert_eq!(res.status().as_u16(), 799),
        Err(err) => assert_eq!(delivery(&*err), Delivery::MaybeProcessed),
    }
    assert_eq!(p.seen.requests(), 1);
}

#[tokio::test]
async fn wire28_response_before_the_request_is_read() {
    // The peer answers 503 on accept, before reading anything, and closes.
    let p = peer(|mut c| async move {
        c.write(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let res = within(5, client_without_keys(T).oneshot(post(&p.url("/pay")))).await;
    // The POST has no key, and the peer answered: one connection only.
    assert_eq!(p.seen.conns(), 1, "{res:?}");
}

#[tokio::test]
async fn wire28_non_utf8_reason_phrase_and_header_values_pass_through() {
    let p = answers_once_then_closes(
        b"HTTP/1.1 200 \xe9t\xe9\r\nx-raw: caf\xe9\r\ncontent-length: 2\r\n\r\nok".to_vec(),
    )
    .await;
    let res = within(5, client(T).oneshot(get(&p.url("/a"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-raw"].as_bytes(), b"caf\xe9");
}
