//! sturdy-reqwest with hedging, coalescing and adaptive concurrency against loopback servers
//! that answer, stall or reset: real time, ms-scale settings.
#![cfg(feature = "full")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sturdy::coalesce::CoalesceLayer;
use sturdy::concurrency::AdaptiveConcurrencyLayer;
use sturdy::core::Delivery;
use sturdy::hedge::HedgeLayer;
use sturdy::reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::time::{timeout, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};

const BOUND: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Hits {
    total: AtomicUsize,
    seen: Mutex<HashMap<String, usize>>,
}

/// A hyper server: `/ok` answers "ok" at once, `/slow` after 150 ms, `/stall` after 30 s,
/// `/once/..` stalls 30 s the first time a URI is seen and answers at once after that.
async fn hyper_server() -> (SocketAddr, Arc<Hits>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(Hits::default());
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        async move {
                            h.total.fetch_add(1, SeqCst);
                            let uri = req.uri().to_string();
                            let n = {
                                let mut seen = h.seen.lock().unwrap();
                                let e = seen.entry(uri.clone()).or_insert(0);
                                *e += 1;
                                *e - 1
                            };
                            let path = req.uri().path().to_owned();
                            let wait = if path.starts_with("/slow") {
                                150
                            } else if path.starts_with("/stall")
                                || (path.starts_with("/once") && n == 0)
                            {
                                30_000
                            } else {
                                0
                            };
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// A server that reads a request and resets the connection (RST) without answering.
async fn reset_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                h.fetch_add(1, SeqCst);
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
            });
        }
    });
    (addr, hits)
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20)).unwrap(),
    )
}

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match timeout(BOUND, f).await {
        Ok(out) => out,
        Err(_) => panic!("no answer within {BOUND:?}: {what}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_coalesces_identical_gets_with_every_layer() {
    let (addr, hits) = hyper_server().await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_hedge(HedgeLayer::new())
                .with_adaptive_concurrency(al)
                .with_coalesce(cl)
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/slow/report");
    let calls = (0..200).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let res = client.get(url).send().await.unwrap();
            assert_eq!(res.status(), 200);
            res.text().await.unwrap()
        }
    });
    let bodies = within("200 identical GETs", futures_util::future::join_all(calls)).await;
    assert!(bodies.iter().all(|b| b == "ok"));
    assert!(
        hits.total.load(SeqCst) <= 2,
        "server saw {}",
        hits.total.load(SeqCst)
    );
    assert_eq!(ch.stats().calls(), 200);
    let host = addr.to_string();
    let st = ah.state(&host).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_stalled_server_times_out_and_gives_back() {
    let (addr, _hits) = hyper_server().await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().with_limits(1, 4).pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_adaptive_concurrency(al)
                .with_coalesce(cl)
                .with_attempt_timeout(Duration::from_millis(100))
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/stall");
    let calls = (0..20).map(|i| {
        let client = client.clone();
        // Half identical, half distinct.
        let url = if i % 2 == 0 {
            url.clone()
        } else {
            format!("{url}/{i}")
        };
        async move {
            client
                .get(url)
                .timeout(Duration::from_millis(100))
                .send()
                .await
                .unwrap_err()
        }
    });
    let start = Instant::now();
    let errs = within("stalled calls", futures_util::future::join_all(calls)).await;
    assert!(start.elapsed() < Duration::from_secs(15));
    for err in &errs {
        let e = find::<sturdy::core::Error>(err).expect("a sturdy error in the chain");
        assert_eq!(delivery(err), Delivery::MaybeProcessed, "{e}");
    }
    let host = addr.to_string();
    let st = ah.state(&host).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert_eq!(ch.in_flight(&host), 0);
    let res = within(
        "a call after",
        client.get(format!("http://{addr}/ok")).send(),
    )
    .await
    .unwrap();
    assert_eq!(res.text().await.unwrap(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_reset_server_shared_error() {
    let (addr, hits) = reset_server().await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_hedge(HedgeLayer::new())
                .with_adaptive_concurrency(al)
                .with_coalesce(cl)
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/orders");
    let calls = (0..20).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move { client.get(url).send().await.unwrap_err() }
    });
    let errs = within(
        "calls to a resetting server",
        futures_util::future::join_all(calls),
    )
    .await;
    for err in &errs {
        let text = err.to_string();
        assert!(
            text.contains("the call shared by identical requests in flight failed"),
            "{text}"
        );
        assert!(
            find::<sturdy::coalesce::SharedError>(err).is_some(),
            "{text}"
        );
        assert_eq!(delivery(err), Delivery::MaybeProcessed, "{text}");
    }
    assert!(hits.load(SeqCst) <= 8, "server saw {}", hits.load(SeqCst));
    let host = addr.to_string();
    let st = ah.state(&host).unwrap();
    assert_eq!((st.in_flight(), st.waiting()), (0, 0));
    assert_eq!(ch.in_flight(&host), 0);
}

fn get(addr: SocketAddr, path: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(Full::default())
        .unwrap()
}

async fn call<S>(svc: &mut S, req: http::Request<Full<Bytes>>) -> Result<S::Response, S::Error>
where
    S: Service<http::Request<Full<Bytes>>>,
{
    svc.ready().await?.call(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_reqwest_service_under_hedge_hedge_wins_over_a_stall() {
    let (addr, hits) = hyper_server().await;
    let (hl, hh) = HedgeLayer::new()
        .with_min_samples(5)
        .with_delay_bounds(Duration::from_millis(30), Duration::from_millis(30))
        .pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().pair();
    let mut svc = ServiceBuilder::new()
        .layer(hl)
        .layer(al)
        .service(ReqwestService::new(reqwest::Client::new()));
    for i in 0..10 {
        let res = within("warm", call(&mut svc, get(addr, &format!("/ok/{i}"))))
            .await
            .unwrap();
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
    let start = Instant::now();
    let res = within("hedged", call(&mut svc, get(addr, "/once/1")))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let stats = hh.stats(&addr.to_string()).unwrap();
    assert_eq!((stats.hedges(), stats.hedge_wins()), (1, 1));
    let st = ah.state(&addr.to_string()).unwrap();
    assert_eq!(
        (st.in_flight(), st.waiting()),
        (0, 0),
        "the loser gave its place back"
    );
    assert_eq!(hits.total.load(SeqCst), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_reqwest_client_dropped_mid_flight_gives_back() {
    let (addr, _hits) = hyper_server().await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_hedge(HedgeLayer::new())
        .with_adaptive_concurrency(al)
        .with_coalesce(cl)
        .build(ReqwestService::new(reqwest::Client::new()));
    for _ in 0..3 {
        let dropped = timeout(
            Duration::from_millis(100),
            client.clone().oneshot(get(addr, "/stall")),
        )
        .await;
        assert!(
            dropped.is_err(),
            "the stalled call was dropped by the timeout"
        );
        let st = ah.state(&addr.to_string()).unwrap();
        assert_eq!((st.in_flight(), st.waiting()), (0, 0));
        assert_eq!(ch.in_flight(&addr.to_string()), 0);
        // The single place is free: a call goes through at once.
        let res = within("after a drop", client.clone().oneshot(get(addr, "/ok")))
            .await
            .unwrap();
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_reqwest_client_kept_under_buffer_and_limit_one() {
    let (addr, _hits) = hyper_server().await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_hedge(HedgeLayer::new().with_min_samples(5))
        .with_adaptive_concurrency(AdaptiveConcurrencyLayer::new().with_limits(1, 1))
        .with_coalesce(CoalesceLayer::new())
        .build(ReqwestService::new(reqwest::Client::new()));
    let svc = ServiceBuilder::new()
        .buffer(8)
        .concurrency_limit(1)
        .service(client);
    let mut joins = Vec::new();
    for t in 0..4 {
        let mut svc = svc.clone();
        joins.push(tokio::spawn(async move {
            for i in 0..15 {
                let path = if i % 3 == 0 {
                    "/ok/same".to_owned()
                } else {
                    format!("/ok/{t}/{i}")
                };
                let res = svc
                    .ready()
                    .await
                    .unwrap()
                    .call(get(addr, &path))
                    .await
                    .unwrap();
                assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "ok");
            }
        }));
    }
    for j in joins {
        within("kept task", j).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_and_service_are_send_sync_clone() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}
    fn send_sync<T: Send + Sync + 'static>(_: &T) {}
    let svc = ReqwestService::new(reqwest::Client::new());
    send_sync_clone(&svc);
    let mw = SturdyMiddleware::new(|next| {
        ClientBuilder::new()
            .with_coalesce(CoalesceLayer::new())
            .build(next)
    });
    send_sync(&mw);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(mw)
        .build();
    send_sync_clone(&client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_call_dropped_mid_flight_gives_back() {
    let (addr, _hits) = hyper_server().await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let (al, ah) = AdaptiveConcurrencyLayer::new().with_limits(1, 1).pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_hedge(HedgeLayer::new())
                .with_adaptive_concurrency(al)
                .with_coalesce(cl)
                .build(next)
        }))
        .build();
    let host = addr.to_string();
    for round in 0..3 {
        // A leader and a follower, both dropped by a timeout above them.
        let url = format!("http://{addr}/stall/{round}");
        let both = futures_util::future::join(client.get(&url).send(), client.get(&url).send());
        assert!(timeout(Duration::from_millis(150), both).await.is_err());
        let st = ah.state(&host).unwrap();
        assert_eq!((st.in_flight(), st.waiting()), (0, 0), "round {round}");
        assert_eq!(ch.in_flight(&host), 0, "round {round}");
        let res = within(
            "after a drop",
            client.get(format!("http://{addr}/ok")).send(),
        )
        .await
        .unwrap();
        assert_eq!(res.text().await.unwrap(), "ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_follower_with_shorter_timeout_keeps_its_timeout() {
    let (addr, _hits) = hyper_server().await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_coalesce(CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/stall/t");
    // Alone, the same request fails with a timeout in well under 3 s.
    let alone = timeout(
        Duration::from_secs(3),
        client
            .get(format!("{url}/alone"))
            .timeout(Duration::from_millis(100))
            .send(),
    )
    .await
    .expect("alone, the request's timeout holds")
    .unwrap_err();
    assert!(
        matches!(
            find::<sturdy::core::Error>(&alone).unwrap().kind(),
            sturdy::core::ErrorKind::Timeout
        ),
        "{alone}"
    );
    let leader = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { client.get(url).timeout(Duration::from_secs(8)).send().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Four attempts of 100 ms and short backoffs: well under 3 s.
    let follower = timeout(
        Duration::from_secs(3),
        client.get(&url).timeout(Duration::from_millis(100)).send(),
    )
    .await;
    leader.abort();
    let err = follower
        .expect(
            "a request's .timeout() bounds each attempt, yet the follower had no answer after 3 s",
        )
        .unwrap_err();
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert!(
        matches!(e.kind(), sturdy::core::ErrorKind::Timeout),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn words23_middleware_call_options_are_not_coalesced() {
    let (addr, hits) = hyper_server().await;
    let (cl, ch) = CoalesceLayer::new().pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_coalesce(cl)
                .build(next)
        }))
        .build();
    let url = format!("http://{addr}/slow/opts");
    let calls = (0..10).map(|_| {
        client
            .get(&url)
            .with_extension(sturdy::core::CallOptions::new().without_retries())
            .send()
    });
    let results = within("with options", futures_util::future::join_all(calls)).await;
    for r in results {
        assert_eq!(r.unwrap().text().await.unwrap(), "ok");
    }
    assert_eq!(hits.total.load(SeqCst), 10);
    assert_eq!(ch.stats().joined(), 0);
}
