//! Findings of the read-only audit s105 (what grows without bound, what a hostile value costs),
//! each shown through the public API.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::circuit::{CircuitBreakerLayer, CircuitState};
use tower::{Layer, ServiceExt};

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

/// A breaker that opens on its failure rate keeps that rate while the map is full: a host that
/// failed 8 of its 9 calls, the last a success (no streak), is not forgotten when new hosts
/// arrive past the bound, and its next failure opens it.
#[tokio::test(start_paused = true)]
async fn a_breaker_with_failures_in_its_window_is_not_forgotten_past_the_bound() {
    // a.test answers 500 unless told otherwise; other hosts 200.
    let ok_next = Arc::new(Mutex::new(false));
    let flag = ok_next.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let ok = std::mem::take(&mut *flag.lock().unwrap());
        let host = req.uri().host().unwrap_or_default().to_owned();
        async move {
            let status = if host == "a.test" && !ok {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            let mut res = Response::new(Full::<Bytes>::default());
            *res.status_mut() = status;
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    let (layer, handle) = CircuitBreakerLayer::new()
        .with_failure_rate(0.5, Duration::from_secs(30), 10)
        .unwrap()
        .with_max_breakers(2)
        .pair();
    let svc = layer.layer(api);
    for _ in 0..8 {
        svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    }
    *ok_next.lock().unwrap() = true;
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert_eq!(handle.state("a.test"), Some(CircuitState::Closed));
    // Two new hosts: the map is full; a.test holds failures, so it stays.
    svc.clone().oneshot(get("http://b.test/")).await.unwrap();
    svc.clone().oneshot(get("http://c.test/")).await.unwrap();
    // The tenth call, a failure: 9 of 10 failed.
    svc.clone().oneshot(get("http://a.test/")).await.unwrap();
    assert!(
        matches!(handle.state("a.test"), Some(CircuitState::Open { .. })),
        "{:?} {:?}",
        handle.state("a.test"),
        handle.states()
    );
}

/// A pace learned from a bare 429 is state to keep: once the key has been quiet for longer than
/// one interval, new keys past `with_max_keys` do not forget it.
#[tokio::test(start_paused = true)]
async fn a_learned_pace_is_not_forgotten_as_idle_past_the_bound() {
    use sturdy::ratelimit::RateLimitLayer;
    let (layer, h) = RateLimitLayer::adaptive_only().with_max_keys(3).pair();
    let svc = layer.layer(tower::service_fn(|r: Request<Full<Bytes>>| async move {
        let status = if r.uri().path() == "/bare" { 429 } else { 200 };
        Ok::<_, sturdy::core::BoxError>(
            Response::builder()
                .status(status)
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
    }));
    svc.clone().oneshot(get("http://z.test/")).await.unwrap();
    let _ = svc
        .clone()
        .oneshot(get("http://a.test/bare"))
        .await
        .unwrap();
    // Past the 1 s pause, quiet for less than 16 of the pace's 125 ms intervals.
    tokio::time::advance(Duration::from_millis(1_500)).await;
    let learned = h.learned_pace("a.test");
    assert!(learned.is_some());
    for host in ["b", "c", "d", "e"] {
        let _ = svc
            .clone()
            .oneshot(get(&format!("http://{host}.test/")))
            .await;
    }
    assert_eq!(
        h.learned_pace("a.test"),
        learned,
        "forgotten past the bound"
    );
    // A key never called again does not hold its place for ever: after 16 intervals without a
    // call, a new key past the bound takes it.
    tokio::time::advance(Duration::from_secs(61)).await;
    let _ = svc.clone().oneshot(get("http://f.test/")).await;
    assert_eq!(h.learned_pace("a.test"), None);
}

/// A shared response whose body comes as a million empty DATA frames, then its bytes: every
/// caller gets the bytes (the empty frames are skipped, not kept).
#[tokio::test(start_paused = true)]
async fn a_shared_body_of_empty_frames_is_read_through() {
    use http_body::Frame;
    use http_body_util::BodyExt;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use sturdy::coalesce::CoalesceLayer;

    struct Empties(u32);
    impl http_body::Body for Empties {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0 {
                0 => Poll::Ready(None),
                1 => {
                    self.0 = 0;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"done")))))
                }
                _ => {
                    self.0 -= 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::new()))))
                }
            }
        }
    }
    let api = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, sturdy::core::BoxError>(Response::new(Empties(1_000_001)))
    });
    let svc = CoalesceLayer::new().layer(api);
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("http://a.test/x"))))
        .collect();
    for c in calls {
        let res = c.await.unwrap().unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"done");
    }
}

/// The token request's one resend on a broken connection also holds with reqwest as the token
/// client (`ReqwestService`, which converts reqwest's errors to sturdy's): a token endpoint that
/// closes its first connection after reading the request, without an answer.
#[tokio::test]
async fn a_token_request_cut_by_its_connection_is_sent_again_through_reqwest() {
    use sturdy::auth::ClientCredentials;
    use sturdy::reqwest::ReqwestService;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(Mutex::new(0u32));
    let seen = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let n = {
                let mut c = seen.lock().unwrap();
                *c += 1;
                *c
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                }
                if n == 1 {
                    return;
                }
                let body = r#"{"access_token":"tok-r","token_type":"Bearer","expires_in":60}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    let cc = ClientCredentials::new(
        ReqwestService::new(reqwest::Client::new()),
        &format!("http://{addr}/oauth/token"),
        "client",
        "secret-s105",
    )
    .unwrap();
    let token = tokio::time::timeout(Duration::from_secs(5), cc.get())
        .await
        .expect("within 5 s")
        .unwrap();
    assert_eq!(
        sturdy::auth::ExposeSecret::expose_secret(token.secret()),
        "tok-r"
    );
    assert_eq!(*connections.lock().unwrap(), 2);
}
