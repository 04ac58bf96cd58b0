//! docs/guides/reqwest.md, read as a reqwest user adopting the newer layers through
//! `SturdyMiddleware`: errors of a middleware further down the chain, a redirect loop whose URLs
//! carry a key, credentials reqwest turned into headers, bodies above and below the replay limit,
//! hedged and coalesced calls going down the chain. Loopback servers, real time with millisecond
//! settings.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use reqwest_middleware::{Next, Result as MwResult};
use sturdy::coalesce::CoalesceLayer;
use sturdy::core::{Delivery, ErrorKind};
use sturdy::hedge::HedgeLayer;
use sturdy::reqwest::{delivery, find, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new().with_seed(15).with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap(),
    )
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn attempts(err: &reqwest_middleware::Error) -> u32 {
    find::<sturdy::core::Error>(err)
        .and_then(|e| e.report())
        .map(|r| r.attempts())
        .unwrap_or(1)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("no hang")
}

static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// A middleware after sturdy that refuses every request with its own reason.
fn egress_policy<'a>(
    _req: reqwest::Request,
    _ext: &'a mut http::Extensions,
    _next: Next<'a>,
) -> futures_util::future::BoxFuture<'a, MwResult<reqwest::Response>> {
    Box::pin(async move {
        REFUSED.fetch_add(1, Ordering::SeqCst);
        Err(reqwest_middleware::Error::middleware(
            std::io::Error::other("blocked by the egress policy"),
        ))
    })
}

/// reqwest.md: the errors of the rest of the chain are "other middlewares' classified by their
/// `source()` chain", and a failed call's "text is the sturdy message": the reason a middleware
/// further down gave is in what the caller reads.
#[tokio::test]
async fn a_middleware_further_down_that_refuses_is_named_in_the_message() {
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(egress_policy)
        .build();
    let err = within(
        client
            .get(format!("http://127.0.0.1:{}/orders", closed_port()))
            .send(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    eprintln!(
        "refused by a middleware: {msg} / {:?} / attempts {}",
        delivery(&err),
        attempts(&err)
    );
    assert!(msg.contains("blocked by the egress policy"), "{msg}");
    assert_eq!(attempts(&err) as usize, REFUSED.load(Ordering::SeqCst));
}

/// reqwest.md: "its URL keeps scheme, host and path and loses query, fragment and credentials,
/// so an API key in a query string shows in neither `Display` nor `Debug`", for a redirect loop
/// whose every hop carries the key.
#[tokio::test]
async fn a_redirect_loop_carrying_a_key_shows_it_nowhere() {
    let app = Router::new().route(
        "/loop",
        get(|| async {
            (
                StatusCode::FOUND,
                [("location", "/loop?api_key=TOPSECRET_REDIRECT")],
            )
        }),
    );
    let base = serve(app).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    let err = within(
        client
            .get(format!("{base}/loop?api_key=TOPSECRET_FIRST"))
            .send(),
    )
    .await
    .unwrap_err();
    let all = format!("{err} {err:?}");
    eprintln!("redirect loop: {err}");
    assert!(!all.contains("TOPSECRET"), "{all}");
    assert_eq!(
        find::<sturdy::core::Error>(&err).unwrap().kind(),
        &ErrorKind::Other
    );
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
}

/// Credentials reqwest turns into an `Authorization` header (URL user info, `.basic_auth`,
/// `.bearer_auth`) show in neither `Display` nor `Debug` of a failed call, not even base64'd.
#[tokio::test]
async fn credentials_reqwest_moved_into_headers_are_not_in_errors() {
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    let port = closed_port();
    let err = within(
        client
            .get(format!("http://user:hunter2@127.0.0.1:{port}/me"))
            .send(),
    )
    .await
    .unwrap_err();
    let all = format!("{err} {err:?}");
    assert!(!all.contains("hunter2"), "{all}");
    assert!(!all.contains("dXNlcjpodW50ZXIy"), "{all}");
    let err = within(
        client
            .get(format!("http://127.0.0.1:{port}/me"))
            .bearer_auth("tok_TOPSECRET")
            .send(),
    )
    .await
    .unwrap_err();
    let all = format!("{err} {err:?}");
    assert!(!all.contains("TOPSECRET"), "{all}");
    // reqwest follows redirects out of sturdy's sight, so a connect error may be on a redirect's
    // target after the server got the request (reqwest.md): may have been processed.
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Option<String>, usize, u64)>>>);

/// Answers 503 to every POST, recording the idempotency key, body length and a checksum.
async fn always_503(
    State(seen): State<Seen>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    let sum = body.iter().map(|b| *b as u64).sum();
    seen.0.lock().unwrap().push((key, body.len(), sum));
    StatusCode::SERVICE_UNAVAILABLE
}

fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// reqwest.md: "A streaming body ... is read into memory first ... Whether a retry replays a body
/// is the retry layer's decision: bodies up to its `with_body_limit` [1 MiB] are replayed, a
/// larger one is sent once." A streamed 512 KiB POST is replayed whole with one key; a streamed
/// 2 MiB POST is sent once.
#[tokio::test]
async fn streamed_bodies_are_replayed_whole_up_to_the_limit_and_sent_once_above() {
    let seen = Seen::default();
    let app = Router::new()
        .route("/orders", any(always_503))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(seen.clone());
    let base = serve(app).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    for (len, want) in [(512 * 1024, 4usize), (2 * 1024 * 1024, 1)] {
        seen.0.lock().unwrap().clear();
        let data = patterned(len);
        let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = data
            .chunks(10_000)
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = reqwest::Body::wrap(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        ));
        let res = within(client.post(format!("{base}/orders")).body(body).send())
            .await
            .unwrap();
        assert_eq!(res.status(), 503);
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(seen.len(), want, "{len} bytes");
        let sum: u64 = data.iter().map(|b| *b as u64).sum();
        for (key, got_len, got_sum) in &seen {
            assert_eq!((*got_len, *got_sum), (len, sum), "the body sent whole");
            assert_eq!(key, &seen[0].0, "one key for every attempt");
            assert!(key.is_some());
        }
    }
}

/// hedge.md: the second copy goes down the rest of the chain like any attempt; reqwest.md:
/// "Attempts run concurrently when the stack makes them concurrently". A slow first copy is beaten
/// by the hedge and the call answers long before the first copy would have.
#[tokio::test]
async fn a_hedged_call_through_the_middleware_answers_with_the_faster_copy() {
    #[derive(Clone, Default)]
    struct Api {
        slow_next: Arc<AtomicBool>,
        calls: Arc<AtomicUsize>,
    }
    async fn handler(State(api): State<Api>) -> &'static str {
        api.calls.fetch_add(1, Ordering::SeqCst);
        if api.slow_next.swap(false, Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "slow"
        } else {
            tokio::time::sleep(Duration::from_millis(3)).await;
            "fast"
        }
    }
    let api = Api::default();
    let base = serve(
        Router::new()
            .route("/orders", get(handler))
            .with_state(api.clone()),
    )
    .await;
    let (hedge, handle) = HedgeLayer::new().pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_hedge(hedge)
                .build(next)
        }))
        .build();
    let host = base.trim_start_matches("http://").to_owned();
    for _ in 0..130 {
        let res = within(client.get(format!("{base}/orders")).send())
            .await
            .unwrap();
        assert_eq!(res.text().await.unwrap(), "fast");
    }
    let delay = handle.stats(&host).and_then(|s| s.delay());
    eprintln!("hedge delay {delay:?}");
    assert!(delay.is_some(), "{:?}", handle.all());
    let before = api.calls.load(Ordering::SeqCst);
    api.slow_next.store(true, Ordering::SeqCst);
    let started = tokio::time::Instant::now();
    let res = within(client.get(format!("{base}/orders")).send())
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(res.text().await.unwrap(), "fast");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(api.calls.load(Ordering::SeqCst) - before, 2);
    assert_eq!(handle.stats(&host).unwrap().hedge_wins(), 1);
}

/// reqwest.md: "`ClientBuilder::build` fits, and so does a `tower::ServiceBuilder` with any sturdy
/// layers". A `ClientBuilder` with coalescing builds a `sturdy::Client<ResponseBody<_>>`: it fits
/// as it is (this compiles).
#[test]
fn a_client_builder_with_coalescing_fits_the_middleware() {
    let _middleware = SturdyMiddleware::new(|next| {
        ClientBuilder::new()
            .with_coalesce(CoalesceLayer::new())
            .build(next)
    });
}

/// coalesce.md with reqwest: identical GETs in flight share one request; different bearer
/// tokens never share a response.
#[tokio::test]
async fn identical_reqwest_calls_coalesce_and_different_tokens_do_not() {
    #[derive(Clone, Default)]
    struct Api(Arc<AtomicUsize>);
    async fn handler(State(api): State<Api>, headers: HeaderMap) -> String {
        api.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        headers
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }
    let api = Api::default();
    let base = serve(
        Router::new()
            .route("/me", get(handler))
            .with_state(api.clone()),
    )
    .await;
    let (coalesce, handle) = CoalesceLayer::new().pair();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_coalesce(coalesce)
                .build(next)
        }))
        .build();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/me");
            let token = if i % 2 == 0 { "alice" } else { "bob" };
            tokio::spawn(async move {
                let res = client.get(url).bearer_auth(token).send().await.unwrap();
                assert_eq!(res.status(), 200);
                (token, res.text().await.unwrap())
            })
        })
        .collect();
    for t in tasks {
        let (token, body) = within(t).await.unwrap();
        assert_eq!(body, format!("Bearer {token}"));
    }
    eprintln!("{:?}", handle.stats());
    assert_eq!(api.0.load(Ordering::SeqCst), 2);
}

/// reqwest.md, "Timeouts": "reqwest's `timeout` ... bounds each attempt ... The whole call,
/// retries and waits included, is bounded by the retry layer's deadline
/// (`RetryLayer::with_deadline`)." A server that takes 2 s, a reqwest timeout of 80 ms, a
/// deadline of 200 ms: the call ends near 200 ms, and says it timed out.
#[tokio::test]
async fn the_retry_deadline_bounds_a_call_of_reqwest_timeouts() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/slow",
        get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(2)).await;
                "late"
            }
        }),
    );
    let base = serve(app).await;
    let retry = quick_retry().with_deadline(Duration::from_millis(200));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .build();
    let started = tokio::time::Instant::now();
    let err = within(
        client
            .get(format!("{base}/slow"))
            .timeout(Duration::from_millis(80))
            .send(),
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    let msg = err.to_string();
    eprintln!(
        "deadline: {msg} after {took:?}, {} requests",
        hits.load(Ordering::SeqCst)
    );
    assert!(took < Duration::from_millis(600), "{took:?}");
    assert!(msg.contains("timed out"), "{msg}");
    assert_eq!(
        find::<sturdy::core::Error>(&err).unwrap().kind(),
        &ErrorKind::Timeout
    );
    assert!((2..=3).contains(&hits.load(Ordering::SeqCst)));
}
