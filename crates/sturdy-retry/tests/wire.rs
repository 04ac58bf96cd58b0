//! Retry against the chaos server over real loopback connections, in real time with
//! millisecond-scale backoff.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use sturdy_chaos::{http_client, ChaosServer, Knobs, RetryAfterForm};
use sturdy_retry::{Backoff, RetryLayer};
use tower::{Layer, ServiceExt};

fn fast() -> RetryLayer {
    RetryLayer::new().with_seed(7).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(50)).unwrap(),
    )
}

fn order(server: &ChaosServer, n: usize, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(server.url("/orders")).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::from(format!(r#"{{"item":"book","n":{n}}}"#)))
        .unwrap()
}

#[tokio::test]
async fn reset_after_commit_with_a_key_is_retried_and_commits_once() {
    let server = ChaosServer::start(Knobs {
        idempotency: true,
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = fast().layer(http_client());
    let res = client
        .oneshot(order(&server, 1, Some("order-1")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_eq!(res.headers()["idempotent-replayed"], "true");
    let st = server.stats();
    assert_eq!(
        (
            st.orders_committed,
            st.resets,
            st.replayed,
            st.duplicates_by_payload
        ),
        (1, 1, 1, 0)
    );
}

#[tokio::test]
async fn reset_after_commit_without_a_key_is_not_retried() {
    let server = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = fast().layer(http_client());
    let err = client.oneshot(order(&server, 1, None)).await.unwrap_err();
    assert_eq!(
        sturdy_core::classify::classify_error(&*err),
        sturdy_core::ErrorKind::Transport
    );
    // The error says what happened and what the caller may do; it never claims "not sent".
    assert_eq!(
        sturdy_core::classify::delivery(&*err),
        sturdy_core::Delivery::MaybeProcessed
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("the connection closed before")
            && msg.contains("(not retried: a POST without an idempotency key")
            && msg.ends_with(
                "it may have been processed: check before sending it again, or it may happen twice"
            ),
        "{msg}"
    );
    assert_eq!(server.stats().orders_committed, 1);
    assert_eq!(server.stats().api_requests, 1);
}

#[tokio::test]
async fn injected_5xx_are_ridden_out() {
    let server = ChaosServer::start(Knobs {
        fail_next: 2,
        orders: 3,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = fast().layer(http_client());
    let res = client
        .oneshot(
            Request::get(server.url("/orders"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(server.stats().api_requests, 3);
}

#[tokio::test]
async fn many_posts_with_keys_under_faults_commit_exactly_once_each() {
    let server = ChaosServer::start(Knobs {
        idempotency: true,
        error_rate: 0.1,
        reset_after_commit_rate: 0.1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = fast()
        .with_max_attempts(8)
        .without_budget()
        .layer(http_client());
    for n in 0..100 {
        let res = client
            .clone()
            .oneshot(order(&server, n, Some(&format!("key-{n}"))))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED, "order {n}");
    }
    let st = server.stats();
    assert_eq!(st.orders_committed, 100);
    assert_eq!(st.duplicates_by_payload, 0);
    assert!(st.resets > 0 && st.server_errors > 0, "{st:?}");
}

#[tokio::test]
async fn a_429_with_retry_after_is_honoured_over_the_wire() {
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(1),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = fast().layer(http_client());
    let start = tokio::time::Instant::now();
    let res = client
        .oneshot(
            Request::get(server.url("/orders"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(start.elapsed() >= Duration::from_secs(1));
    let log = server.requests();
    assert_eq!(log.len(), 2);
    assert!(log[1].at - log[0].at >= Duration::from_millis(990));

    // Two minutes are not waited for (the client sleeps at most 60 s): the caller is told.
    server.update(|k| {
        k.rate_limit_next = 1;
        k.retry_after = RetryAfterForm::Seconds(120);
    });
    let client = fast().layer(http_client());
    let err = client
        .oneshot(
            Request::get(server.url("/orders"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        sturdy_core::find::<sturdy_core::RateLimited>(&*err)
            .unwrap()
            .retry_after(),
        Duration::from_secs(120)
    );
}

/// A server that reads a request and answers with a TCP reset.
async fn resetting_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.readable().await;
                let _ = sock.try_read(&mut buf);
                // Linger 0: closing sends RST instead of FIN.
                #[allow(deprecated)]
                let _ = sock.set_linger(Some(Duration::ZERO));
                drop(sock);
            });
        }
    });
    addr
}

#[tokio::test]
async fn errors_name_the_root_cause_in_plain_words() {
    // A reset connection.
    let addr = resetting_server().await;
    let err = fast()
        .layer(http_client())
        .oneshot(
            Request::get(format!("http://{addr}/orders"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );

    // Nobody listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = fast()
        .layer(http_client())
        .oneshot(order_to(closed, Some("k-refused")))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused; the request was not sent, so it is safe \
         to send again"
    );
    assert_eq!(
        sturdy_core::classify::delivery(&*err),
        sturdy_core::Delivery::NotSent
    );
}

fn order_to(addr: std::net::SocketAddr, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(format!("http://{addr}/orders"));
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::from("{}")).unwrap()
}
