//! The page guards of docs/guides/paginate.md over real sockets (127.0.0.1, port 0, real time,
//! millisecond settings): a server that sends the head and stalls the body fails at the page
//! timeout; one that streams an endless body fails with kind `Body` as soon as the page limit
//! is passed, not at the timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, Paginate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A server that answers every request with a chunked head, then `endless` chunks (or none,
/// holding the connection open).
async fn server(endless: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"dat\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if endless {
                    let chunk = format!("1000\r\n{}\r\n", " ".repeat(0x1000));
                    while sock.write_all(chunk.as_bytes()).await.is_ok() {}
                } else {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    format!("http://{addr}/v1/items")
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

#[tokio::test]
async fn a_head_then_a_stalled_body_fails_at_the_page_timeout() {
    let url = server(false).await;
    let pager = Paginate::builder(client(), &url, JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let start = Instant::now();
    let err = pager.page(None, 5).await.map(|_| ()).unwrap_err();
    let took = start.elapsed();
    assert_eq!(*err.kind(), ErrorKind::Timeout, "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn an_endless_body_fails_with_kind_body_once_past_the_limit() {
    let url = server(true).await;
    let pager = Paginate::builder(client(), &url, JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::from_secs(20))
        .with_max_page_bytes(64 * 1024)
        .build()
        .unwrap();
    let start = Instant::now();
    let err = pager.page(None, 5).await.map(|_| ()).unwrap_err();
    assert_eq!(*err.kind(), ErrorKind::Body, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
