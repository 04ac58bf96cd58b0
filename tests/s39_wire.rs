//! s39: the whole stack, every optional layer on, on the wire (real time, loopback, millisecond
//! settings): orders through sturdy-chaos's faults committed once (hyper client and reqwest's
//! `SturdyMiddleware`), and servers that stall or reset mid-response.

#![cfg(feature = "full")]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::{classify, BoxError, Delivery, ErrorKind};
use sturdy::hedge::HedgeLayer;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs, RetryAfterForm};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn knobs() -> Knobs {
    Knobs {
        seed: 39,
        idempotency: true,
        require_auth: true,
        api_version: Some("2024-06-01".into()),
        error_rate: 0.2,
        reset_after_commit_rate: 0.15,
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Seconds(0),
        latency: ms(1),
        ..Knobs::default()
    }
}

/// Builds the whole stack, every optional layer on, around `http`.
fn stack<S, Rb>(server: &ChaosServer, http: S) -> sturdy::Client<sturdy::coalesce::ResponseBody<Rb>>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Rb>> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Rb: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    Rb::Error: Into<BoxError>,
{
    let tokens = ClientCredentials::new(
        sturdy_chaos::http_client(),
        &server.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_max_attempts(10)
                .with_backoff(Backoff::decorrelated_jitter(ms(2), ms(20)).unwrap()),
        )
        .with_hedge(
            HedgeLayer::new()
                .with_min_samples(10)
                .with_keyed_requests(true),
        )
        .with_rate_limit(RateLimitLayer::adaptive_only())
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_auth(AuthLayer::oauth2(tokens))
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .with_attempt_timeout(Duration::from_secs(2))
        .with_coalesce(CoalesceLayer::new())
        .build(http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s39_wire_orders_through_every_fault_are_committed_once() {
    let server = ChaosServer::start(knobs()).await.unwrap();
    let client = stack(&server, sturdy_chaos::http_client());
    let mut tasks = Vec::new();
    for i in 0..30 {
        let c = client.clone();
        let url = server.url("/orders");
        tasks.push(tokio::spawn(async move {
            let req = Request::post(url)
                .header("content-type", "application/json")
                .body(Full::from(format!(r#"{{"item":"book","n":{i}}}"#)))
                .unwrap();
            c.oneshot(req).await.map(|r| r.status().as_u16())
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().map_err(|e| e.to_string()));
    }
    let st = server.stats();
    assert!(statuses.iter().all(|s| *s == Ok(201)), "{statuses:?}");
    assert_eq!(st.orders_committed, 30, "{st:?}");
    assert_eq!(st.duplicates_by_payload, 0, "{st:?}");
    assert_eq!(st.tokens_issued, 1, "{st:?}");
    assert!(st.server_errors + st.resets > 0, "no faults met: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s39_wire_reqwest_middleware_full_stack_commits_once() {
    use sturdy::reqwest::SturdyMiddleware;
    let server = ChaosServer::start(knobs()).await.unwrap();
    let url = server.url("");
    let srv = Arc::new(server);
    let srv2 = srv.clone();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| stack(&srv2, next)))
        .build();
    let mut ok = 0;
    for i in 0..20 {
        let res = client
            .post(format!("{url}/orders"))
            .json(&serde_json::json!({"item": "pen", "n": i}))
            .send()
            .await;
        match res {
            Ok(r) if r.status() == 201 => ok += 1,
            Ok(r) => panic!("order {i}: {}", r.status()),
            Err(e) => panic!("order {i}: {e}"),
        }
    }
    let st = srv.stats();
    assert_eq!(ok, 20);
    assert_eq!(st.orders_committed, 20, "{st:?}");
    assert_eq!(st.duplicates_by_payload, 0, "{st:?}");
    assert_eq!(st.tokens_issued, 1, "{st:?}");
}

/// A raw HTTP/1.1 server: for each connection, reads the request head (recording its
/// `idempotency-key`) and then does `act` on the socket.
async fn raw_server<F, Fut>(act: F) -> (String, Arc<Mutex<Vec<Option<String>>>>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = keys.clone();
    let act = Arc::new(act);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let k = k.clone();
            let act = act.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_lowercase();
                let key = head.lines().find_map(|l| {
                    l.strip_prefix("idempotency-key:")
                        .map(|v| v.trim().to_owned())
                });
                k.lock().unwrap().push(key);
                act(s).await;
            });
        }
    });
    (format!("http://{addr}"), keys)
}

/// A server with no token endpoint: the stack without auth.
fn stack_no_auth(
    body_timeout: Duration,
    attempt_timeout: Duration,
) -> sturdy::Client<sturdy::coalesce::ResponseBody<hyper::body::Incoming>> {
    ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_max_attempts(2)
                .with_backoff(Backoff::decorrelated_jitter(ms(2), ms(10)).unwrap()),
        )
        .with_hedge(HedgeLayer::new().with_keyed_requests(true))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_version(VersionLayer::header("api-version", "1").unwrap())
        .with_attempt_timeout(attempt_timeout)
        .with_coalesce(CoalesceLayer::new().with_body_timeout(body_timeout))
        .build(sturdy_chaos::http_client())
}

#[tokio::test]
async fn s39_wire_get_stalled_after_headers_times_out_naming_the_body() {
    let (base, _) = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let client = stack_no_auth(ms(200), Duration::from_secs(5));
    let t0 = tokio::time::Instant::now();
    let req = Request::get(format!("{base}/page"))
        .body(Full::default())
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), client.oneshot(req))
        .await
        .expect("the stalled body was not bounded")
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("no sturdy Error");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("body"), "{err}");
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed, "{err}");
}

#[tokio::test]
async fn s39_wire_get_reset_mid_body_is_a_body_error_maybe_processed() {
    let (base, _) = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            .await;
        let _ = s.flush().await;
        drop(s);
    })
    .await;
    let client = stack_no_auth(ms(2_000), Duration::from_secs(5));
    let req = Request::get(format!("{base}/page"))
        .body(Full::default())
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), client.oneshot(req))
        .await
        .expect("hung")
        .unwrap_err();
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("no sturdy Error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
    assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let msg = err.to_string();
    assert!(!msg.trim().is_empty());
}

#[tokio::test]
async fn s39_wire_post_stalled_before_headers_reports_the_key_it_sent() {
    let (base, keys) = raw_server(|s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let client = stack_no_auth(ms(2_000), ms(150));
    let req = Request::post(format!("{base}/orders"))
        .body(Full::from(r#"{"a":1}"#))
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), client.oneshot(req))
        .await
        .expect("hung")
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("not one sturdy Error");
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{err}");
    let report = e.report().expect("no CallReport");
    assert_eq!(report.attempts(), 2, "{err}");
    assert_eq!(report.delivery(), Delivery::MaybeProcessed);
    let sent: HashSet<_> = keys.lock().unwrap().iter().cloned().collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let key = sent.into_iter().next().unwrap().expect("no key sent");
    assert_eq!(report.idempotency_key(), Some(key.as_str()));
    let msg = err.to_string();
    assert!(msg.contains("timed out"), "{msg}");
    assert!(msg.contains(&key), "{msg}");
    assert!(msg.contains("may have been processed"), "{msg}");
}

#[tokio::test]
async fn s39_wire_post_reset_mid_body_is_not_hidden() {
    let (base, keys) = raw_server(|mut s| async move {
        let _ = s
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 100\r\n\r\n0123")
            .await;
        drop(s);
    })
    .await;
    let client = stack_no_auth(ms(2_000), Duration::from_secs(5));
    let req = Request::post(format!("{base}/orders"))
        .body(Full::from(r#"{"a":1}"#))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 201);
    let body = http_body_util::BodyExt::collect(res.into_body()).await;
    assert!(body.is_err(), "a truncated body read as complete");
    assert_eq!(keys.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn s39_wire_coalesced_callers_share_a_reset_as_a_clear_error() {
    let (base, keys) = raw_server(|s| async move {
        tokio::time::sleep(ms(30)).await;
        drop(s);
    })
    .await;
    let client = stack_no_auth(ms(2_000), Duration::from_secs(5));
    let mut futs = Vec::new();
    for _ in 0..5 {
        let req = Request::get(format!("{base}/same"))
            .body(Full::default())
            .unwrap();
        futs.push(client.clone().oneshot(req));
    }
    let all = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(futs))
        .await
        .expect("hung");
    for r in all {
        let err = r.unwrap_err();
        let e = sturdy::core::find::<sturdy::core::Error>(&*err).expect("no sturdy Error");
        assert!(
            matches!(e.kind(), ErrorKind::Transport | ErrorKind::Connect),
            "{:?}: {err}",
            e.kind()
        );
        assert_eq!(classify::delivery(&*err), Delivery::MaybeProcessed, "{err}");
        assert!(sturdy::core::find::<hyper::Error>(&*err).is_some(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("2 attempts"), "{msg}");
    }
    assert_eq!(
        keys.lock().unwrap().len(),
        2,
        "the callers did not share the call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s39_wire_server_quota_with_ratelimit_headers_all_get_through() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        api_version: Some("2024-06-01".into()),
        server_rate_limit: Some(sturdy_chaos::ServerRateLimit {
            limit: 10,
            window: ms(200),
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = stack(&server, sturdy_chaos::http_client());
    let mut futs = Vec::new();
    for i in 0..40 {
        let req = Request::get(server.url(&format!("/orders/o_{i}")))
            .body(Full::default())
            .unwrap();
        futs.push(client.clone().oneshot(req));
    }
    let all = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(futs),
    )
    .await
    .expect("hung");
    let mut bad = Vec::new();
    for r in all {
        match r {
            Ok(res) if res.status() == 429 => bad.push("429".to_owned()),
            Ok(_) => {}
            Err(e) => bad.push(e.to_string()),
        }
    }
    let st = server.stats();
    assert!(bad.is_empty(), "{bad:?}; {st:?}");
    // The first burst of 40 meets a quota of 10: 30 refusals. After that the client paces by
    // the headers; windows that do not line up with the server's cost a few more (40 in all
    // in one CI run). A client that ignored them would retry each call at its backoff until it
    // gave up, which `bad` catches.
    assert!(st.rate_limited <= 60, "{st:?}");
}

#[tokio::test]
async fn s39_wire_reqwest_request_with_its_own_timeout_is_not_coalesced() {
    use sturdy::reqwest::SturdyMiddleware;
    let server = ChaosServer::start(Knobs {
        latency: ms(50),
        orders: 3,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_hedge(HedgeLayer::new())
                .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
                .with_coalesce(CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let url = server.url("/orders/o_1");
    let futs = (0..3).map(|_| client.get(&url).send());
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    let shared = server.stats().api_requests;
    assert_eq!(shared, 1, "identical GETs were not coalesced");
    let futs = (0..3).map(|_| client.get(&url).timeout(Duration::from_secs(5)).send());
    for r in futures_util::future::join_all(futs).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(server.stats().api_requests - shared, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s39_wire_hedged_post_against_sturdys_server_layer_commits_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let commits = Arc::new(AtomicUsize::new(0));
    let slow_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c2, s2) = (commits.clone(), slow_next.clone());
    let app = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(move |body: String| {
                let (c, s) = (c2.clone(), s2.clone());
                async move {
                    let slow = s.swap(false, Ordering::SeqCst);
                    tokio::time::sleep(if slow { ms(400) } else { ms(3) }).await;
                    c.fetch_add(1, Ordering::SeqCst);
                    (http::StatusCode::CREATED, body)
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });

    let (hedge, hh) = HedgeLayer::new()
        .with_min_samples(10)
        .with_keyed_requests(true)
        .pair();
    let client = ClientBuilder::new()
        .with_retry(
            RetryLayer::new().with_backoff(Backoff::decorrelated_jitter(ms(5), ms(20)).unwrap()),
        )
        .with_hedge(hedge)
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new())
        .with_coalesce(CoalesceLayer::new())
        .build(sturdy_chaos::http_client());
    let url = format!("http://{addr}/orders");
    for i in 0..30 {
        let req = Request::post(&url)
            .body(Full::from(format!("warm {i}")))
            .unwrap();
        assert_eq!(client.clone().oneshot(req).await.unwrap().status(), 201);
    }
    assert_eq!(commits.load(Ordering::SeqCst), 30);
    assert!(hh
        .stats(&addr.to_string())
        .and_then(|s| s.delay())
        .is_some());
    let hedges_before = hh.stats(&addr.to_string()).unwrap().hedges();
    slow_next.store(true, Ordering::SeqCst);
    let req = Request::post(&url).body(Full::from("the order")).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(req))
        .await
        .expect("hung")
        .unwrap();
    assert_eq!(res.status(), 201);
    tokio::time::sleep(ms(500)).await;
    assert_eq!(
        commits.load(Ordering::SeqCst),
        31,
        "the order was committed twice"
    );
    assert!(hh.stats(&addr.to_string()).unwrap().hedges() > hedges_before);
}
