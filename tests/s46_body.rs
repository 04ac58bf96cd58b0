//! README and the retry guide: "a call returns when the response's head arrives: the attempt
//! timeout and the deadline bound the attempts up to it, not the reading of the body". A raw
//! server on loopback sends a head and two of ten promised body bytes, then stalls: the default
//! stack returns the response in time, and its body read is the caller's to bound. Real time,
//! millisecond settings.
#![cfg(feature = "full")]

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use sturdy::core::CallOptions;
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Answers every connection with a head and 2 of 10 body bytes, then holds it open.
async fn stalling_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = sock
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
                    .await;
                let _ = sock.flush().await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn the_call_returns_at_the_head_and_the_body_read_is_the_callers_to_bound() {
    let base = stalling_server().await;
    let client = ClientBuilder::new().build(sturdy_chaos::http_client());
    let mut req = Request::get(format!("{base}/items"))
        .body(Full::<Bytes>::default())
        .unwrap();
    req.extensions_mut().insert(
        CallOptions::new()
            .with_attempt_timeout(Duration::from_millis(100))
            .with_deadline(Duration::from_millis(200)),
    );
    let res = tokio::time::timeout(Duration::from_secs(5), client.oneshot(req))
        .await
        .expect("the call returns when the head arrives")
        .expect("a 200 head");
    assert_eq!(res.status(), 200);
    // Past the attempt timeout and the deadline, the body is still being read: neither cut it.
    let read = tokio::time::timeout(Duration::from_millis(400), res.into_body().collect()).await;
    assert!(read.is_err(), "the stalled body read ended: {read:?}");
}
