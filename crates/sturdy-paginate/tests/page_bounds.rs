//! Every page read is bounded in time (head and body) and in size: a server that stalls or
//! streams forever cannot hang a walk or a bounded page.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::{stream, StreamExt, TryStreamExt};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use sturdy_chaos::http_client;
use sturdy_core::ErrorKind;
use sturdy_paginate::{JsonCursor, Paginate};
use tokio::time::Instant;
use tower::{service_fn, ServiceExt};

/// A real server on loopback that sends the head and the first bytes of the body, then nothing,
/// forever.
async fn stalling_server() -> String {
    let app = Router::new().route(
        "/items",
        get(|| async {
            let body =
                stream::once(async { Ok::<_, Infallible>(Bytes::from_static(b"{\"data\":[1,2,")) })
                    .chain(stream::pending());
            (
                [("content-type", "application/json")],
                Body::from_stream(body),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/items")
}

#[tokio::test]
async fn a_real_server_that_stalls_the_body_is_cut_off_by_the_page_timeout() {
    let url = stalling_server().await;
    let head_received = Arc::new(AtomicBool::new(false));
    let flag = head_received.clone();
    let client = http_client().map_response(move |r| {
        flag.store(true, Ordering::SeqCst);
        r
    });
    let pager = Paginate::builder(client, &url, JsonCursor::new("/data", "/next"))
        .with_page_timeout(Duration::from_millis(150))
        .build()
        .unwrap();

    let started = Instant::now();
    let walk = tokio::time::timeout(
        Duration::from_secs(10),
        pager.items().try_collect::<Vec<_>>(),
    )
    .await
    .expect("the walk hung on a body that never ends");
    let e = walk.unwrap_err();
    let took = started.elapsed();
    assert!(
        head_received.load(Ordering::SeqCst),
        "the head arrived; the body stalled"
    );
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(
        e.to_string(),
        "page 1 (/items) did not arrive within 150ms (the page timeout covers the response head and the whole body); the server stalled, or raise with_page_timeout"
    );
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // The bounded page of an agent tool too.
    let e = tokio::time::timeout(Duration::from_secs(10), pager.page(None, 10))
        .await
        .expect("page() hung on a body that never ends")
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
}

type Stalled = StreamBody<
    std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>,
>;

/// A body that sends one chunk and then never ends.
fn stalled_body() -> Stalled {
    StreamBody::new(Box::pin(
        stream::once(async { Ok(Frame::data(Bytes::from_static(b"{\"data\":["))) })
            .chain(stream::pending()),
    ))
}

#[tokio::test(start_paused = true)]
async fn a_stalled_body_fails_at_exactly_the_page_timeout() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(stalled_body()))
    });
    let pager = Paginate::builder(
        api,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let started = Instant::now();
    let e = pager.page(None, 10).await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e
        .to_string()
        .starts_with("page 1 (/x) did not arrive within 5s"));
}

#[tokio::test(start_paused = true)]
async fn by_default_a_page_may_take_sixty_seconds_head_and_body() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(stalled_body()))
    });
    let pager = Paginate::new(
        api,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let started = Instant::now();
    let e = pager.items().try_next().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    assert_eq!(e.kind(), &ErrorKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn a_head_that_never_comes_fails_at_the_page_timeout() {
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        std::future::pending::<()>().await;
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("[]")))
    });
    let pager = Paginate::builder(
        api,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_millis(2_500))
    .build()
    .unwrap();
    let started = Instant::now();
    let e = pager.items().try_next().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_millis(2_500));
    assert_eq!(e.kind(), &ErrorKind::Timeout);
}

#[tokio::test]
async fn a_body_that_never_ends_is_cut_off_at_the_size_limit() {
    // 64 KiB chunks, ready at once, forever: no timeout would fire before memory ran out.
    let api = service_fn(|_req: Request<Full<Bytes>>| async {
        let chunks = stream::repeat_with(|| {
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b' '; 64 * 1024])))
        });
        Ok::<_, Infallible>(Response::new(StreamBody::new(chunks)))
    });
    let pager = Paginate::builder(
        api,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_page_bytes(1024 * 1024)
    .build()
    .unwrap();
    let e = pager.items().try_next().await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Body);
    assert_eq!(
        e.to_string(),
        "page 1 (/x) is larger than the 1048576-byte page limit; ask for smaller pages or raise with_max_page_bytes"
    );
}

#[tokio::test]
async fn a_body_at_the_size_limit_is_read() {
    let body = r#"{"data":[1,2,3]}"#;
    let api = service_fn(move |_req: Request<Full<Bytes>>| async move {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body)))
    });
    let pager = Paginate::builder(
        api,
        "http://api.example.com/x",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_page_bytes(body.len())
    .build()
    .unwrap();
    let items: Vec<serde_json::Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(items.len(), 3);
}

#[tokio::test]
async fn a_page_that_cannot_connect_names_the_cause_not_the_clients_wrapper() {
    // A port nothing listens on: hyper-util's error reads "client error (Connect)", which names
    // no cause; the page's error names the refusal.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pager = Paginate::builder(
        http_client(),
        &format!("http://{addr}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .build()
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), pager.page(None, 10))
        .await
        .expect("a refused connection answers at once")
        .unwrap_err();
    let text = e.to_string();
    assert_eq!(e.kind(), &ErrorKind::Connect, "{text}");
    assert_eq!(text, "page 1 (/items) failed: connection refused");
    assert!(sturdy_core::find::<std::io::Error>(&e).is_some(), "{text}");
}
