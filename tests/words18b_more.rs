//! More claims of docs/guides/{idempotency,auth,webhooks}.md read literally: a memory store full
//! of running requests, eviction order and the byte bound; token endpoint failures and their
//! kinds, caches per setter, oversized token responses, a token request whose runtime stopped
//! driving it; the webhook dedup key kept through the timestamp window whatever the TTL; the
//! API key query kept byte for byte; `Send + Sync + Clone` where the docs say so.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::ErrorKind;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use tower::{ServiceBuilder, ServiceExt};

fn counted(runs: Arc<AtomicUsize>, delay: Duration, size: usize) -> Router {
    Router::new().route(
        "/orders",
        post(move || {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                (StatusCode::CREATED, "r".repeat(size))
            }
        }),
    )
}

fn req(key: &str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from("x"))
        .unwrap()
}

async fn answer(app: &Router, key: &str) -> (StatusCode, String, http::HeaderMap) {
    let res = app.clone().oneshot(req(key)).await.unwrap();
    let s = res.status();
    let h = res.headers().clone();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    (s, String::from_utf8_lossy(&b).into_owned(), h)
}

/// "a running request's lock is never evicted, and a store full of running requests answers a
/// new key with 503" (`Retry-After: 1`, the handler does not run).
#[tokio::test(start_paused = true)]
async fn store_full_of_running_requests() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(runs.clone(), Duration::from_secs(10), 1).layer(IdempotencyLayer::new(
        MemoryStore::new(1).unwrap(),
        ByCredentials::default(),
    ));
    let a = app.clone();
    let first = tokio::spawn(async move { answer(&a, "k1").await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let (s, body, h) = answer(&app, "k2").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(h["retry-after"], "1");
    assert!(body.contains(problem::STORE_UNAVAILABLE), "{body}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
}

/// "When the store is full, the completed response that expires first makes room".
#[tokio::test]
async fn eviction_takes_the_first_to_expire() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = counted(runs.clone(), Duration::ZERO, 1).layer(IdempotencyLayer::new(
        MemoryStore::new(2).unwrap(),
        ByCredentials::default(),
    ));
    for k in ["e1", "e2", "e3"] {
        assert_eq!(answer(&app, k).await.0, StatusCode::CREATED);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    let (_, _, h) = answer(&app, "e2").await;
    assert_eq!(
        h.get("idempotent-replayed").map(|v| v.to_str().unwrap()),
        Some("true"),
        "e2 was evicted"
    );
    let (_, _, h) = answer(&app, "e3").await;
    assert_eq!(
        h.get("idempotent-replayed").map(|v| v.to_str().unwrap()),
        Some("true"),
        "e3 was evicted"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// "response the store cannot keep (over a `MemoryStore`'s byte bound) | the handler ran; a 500
/// marker is stored in its place | the response to the first client; 500
/// `…/idempotency-response-too-large` on every retry; the handler is not run again".
#[tokio::test]
async fn response_over_the_store_byte_bound() {
    let runs = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::default().with_max_bytes(4_096).unwrap();
    let app = counted(runs.clone(), Duration::ZERO, 20_000)
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let (s, body, _) = answer(&app, "big").await;
    assert_eq!((s, body.len()), (StatusCode::CREATED, 20_000));
    for _ in 0..2 {
        let (s, body, _) = answer(&app, "big").await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        assert!(body.contains(problem::RESPONSE_TOO_LARGE), "{body}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

fn endpoint(
    status: u16,
    body: String,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let res = Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        async move { Ok::<_, std::convert::Infallible>(res) }
    })
}

/// "A 5xx, 429 or 408 from the token endpoint, a connection failure and a timeout are retryable;
/// `invalid_client` is not." "A 503 from the token endpoint keeps the kind `Server(503)` ...; the
/// message says it was the token endpoint's."
#[tokio::test]
async fn token_endpoint_failure_kinds() {
    for (status, body, retryable) in [
        (500u16, "oops".to_owned(), true),
        (503, "".to_owned(), true),
        (429, r#"{"error":"slow_down"}"#.to_owned(), true),
        (408, "".to_owned(), true),
        (401, r#"{"error":"invalid_client"}"#.to_owned(), false),
        (400, r#"{"error":"invalid_scope"}"#.to_owned(), false),
    ] {
        let c = ClientCredentials::new(
            endpoint(status, body),
            "http://auth.test/token",
            "id",
            "sec",
        )
        .unwrap();
        let e = c.get().await.unwrap_err();
        assert_eq!(e.is_retryable(), retryable, "{status}: {e}");
        assert!(e.to_string().contains("token endpoint"), "{status}: {e}");
        if status == 503 {
            assert_eq!(
                e.kind(),
                &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
            );
        }
    }
    let refused = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        Err::<Response<Full<Bytes>>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
    });
    let c = ClientCredentials::new(refused, "http://auth.test/token", "id", "sec").unwrap();
    let e = c.get().await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
}

/// "`ClientCredentials::with_request_timeout(d)` [30 s] ... Past it the request fails with kind
/// `Timeout`", and a token response too large to be one fails with words, not a hang.
#[tokio::test(start_paused = true)]
async fn request_timeout_and_huge_token_response() {
    let silent = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        std::future::pending::<Result<Response<Full<Bytes>>, std::convert::Infallible>>().await
    });
    let c = ClientCredentials::new(silent, "http://auth.test/token", "id", "sec").unwrap();
    let t0 = tokio::time::Instant::now();
    let e = c.get().await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert_eq!(tokio::time::Instant::now() - t0, Duration::from_secs(30));
    let body = format!(
        r#"{{"access_token":"{}","expires_in":60}}"#,
        "a".repeat(200_000)
    );
    let c =
        ClientCredentials::new(endpoint(200, body), "http://auth.test/token", "id", "sec").unwrap();
    let e = c.get().await.unwrap_err();
    let m = e.to_string();
    assert!(m.contains("http://auth.test/token"), "{m}");
    assert!(m.len() < 1_000, "{} bytes", m.len());
}

/// "A `with_*` setter returns a source with a cache of its own: configure first, then clone."
#[tokio::test]
async fn setters_make_their_own_cache_clones_share() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!(
                r#"{{"access_token":"t{i}","expires_in":3600}}"#
            )))))
        }
    });
    let a = ClientCredentials::new(ep, "http://auth.test/token", "id", "sec").unwrap();
    let a2 = a.clone();
    a.get().await.unwrap();
    a2.get().await.unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 1);
    let b = a.clone().with_scopes(["x"]);
    b.get().await.unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 2);
    a.get().await.unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 2);
}

/// "if it stops driving the request without shutting down (blocked, no longer polled), the
/// request is given up 10 s after its request timeout: the callers still waiting, and the next
/// to arrive, move to a new one." Real time: about 10 s.
#[test]
fn undriven_runtime_is_given_up_after_grace() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            if i == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                r#"{"access_token":"t","expires_in":3600}"#,
            ))))
        }
    });
    let c = ClientCredentials::new(ep, "http://auth.test/token", "id", "sec")
        .unwrap()
        .with_request_timeout(Duration::from_millis(100));
    // Runtime A starts the request, then is no longer driven (kept alive, never polled again).
    let rt_a = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let c1 = c.clone();
    rt_a.block_on(async move {
        let _ = tokio::time::timeout(Duration::from_millis(5), c1.get()).await;
    });
    let rt_b = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = tokio::time::Instant::now();
    let got = rt_b.block_on(async { tokio::time::timeout(Duration::from_secs(15), c.get()).await });
    let took = t.elapsed();
    assert!(got.expect("still waiting after 15 s").is_ok());
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(12),
        "{took:?}"
    );
    assert_eq!(n.load(Ordering::SeqCst), 2);
    drop(rt_a);
}

/// "`api_key_query(param, key)` ... added to the caller's query (which is kept byte for byte)".
#[tokio::test]
async fn api_key_query_keeps_the_query() {
    let seen = Arc::new(std::sync::Mutex::new(vec![]));
    let s = seen.clone();
    let api = tower::service_fn(move |r: Request<Full<Bytes>>| {
        s.lock().unwrap().push(r.uri().to_string());
        async { Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default())) }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::api_key_query("api_key", "k&1 =").unwrap())
        .service(api);
    for uri in [
        "http://a.test/x?b=2&a=%20x;y",
        "http://a.test/x",
        "http://a.test/x?",
    ] {
        svc.clone()
            .oneshot(Request::get(uri).body(Full::default()).unwrap())
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen[0].starts_with("http://a.test/x?b=2&a=%20x;y&api_key="),
        "{}",
        seen[0]
    );
    assert!(
        seen[0].ends_with("api_key=k%261+%3D") || seen[0].ends_with("api_key=k%261%20%3D"),
        "{}",
        seen[0]
    );
    assert!(
        seen[1].starts_with("http://a.test/x?api_key="),
        "{}",
        seen[1]
    );
}

/// "The dedup key is kept at least until the timestamp plus the tolerance plus one second ...
/// whatever the dedup TTL": a Stripe copy within the window is refused after a 1 s TTL ran out.
#[tokio::test]
async fn dedup_outlives_a_short_ttl_within_the_window() {
    use sturdy::webhook::{sign_stripe, MemoryQueue, Stripe, WebhookReceiver};
    let now = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (q, mut rx) = MemoryQueue::new(10);
    let r = WebhookReceiver::new(Stripe::new("whsec_x").unwrap(), q)
        .with_dedup_ttl(Duration::from_secs(1));
    let body = r#"{"id":"evt_ttl"}"#;
    let send = || {
        Request::post("/s")
            .header(
                "stripe-signature",
                sign_stripe("whsec_x", now, body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap()
    };
    assert_eq!(
        r.clone().oneshot(send()).await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        r.clone().oneshot(send()).await.unwrap().status(),
        StatusCode::OK
    );
    assert!(rx.try_recv().is_some());
    assert!(
        rx.try_recv().is_none(),
        "a copy within the timestamp window was queued again"
    );
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

/// "It is `Clone + Send + Sync`" (`ReqwestService`, `sturdy::Client`, the HTTPS client); the
/// server pieces and pagers can be shared the same way.
#[tokio::test]
async fn shared_values_are_send_sync_clone() {
    let rs = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    assert_send_sync_clone(&rs);
    let client = sturdy::ClientBuilder::new().build(rs.clone());
    assert_send_sync_clone(&client);
    assert_send_sync_clone(&sturdy::tls::https_client());
    let c = ClientCredentials::new(rs, "http://auth.test/token", "id", "sec").unwrap();
    assert_send_sync_clone(&c);
    let p = sturdy::paginate::Paginate::new(
        client,
        "http://a.test/x",
        sturdy::paginate::LinkHeader::new(""),
    )
    .unwrap();
    assert_send_sync_clone(&p);
    let (q, _rx) = sturdy::webhook::MemoryQueue::new(1);
    let w = sturdy::webhook::WebhookReceiver::new(sturdy::webhook::GitHub::new("s").unwrap(), q);
    assert_send_sync_clone(&w);
    let l = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    assert_send_sync_clone(&l);
}

/// "Each caller gets its own error; the cause several waiters share (an io or hyper error, for
/// instance) is its `source()`."
#[tokio::test]
async fn shared_cause_is_each_callers_source() {
    let refused = tower::service_fn(|_r: Request<Full<Bytes>>| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err::<Response<Full<Bytes>>, _>(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ))
    });
    let c = ClientCredentials::new(refused, "http://auth.test/token", "id", "sec").unwrap();
    let (a, b) = tokio::join!(c.get(), c.get());
    for e in [a.unwrap_err(), b.unwrap_err()] {
        let mut src = std::error::Error::source(&e);
        let mut found = false;
        while let Some(s) = src {
            if s.downcast_ref::<std::io::Error>().is_some() {
                found = true;
            }
            src = s.source();
        }
        assert!(found, "no io::Error under {e}");
        assert!(
            sturdy::core::find::<std::io::Error>(&e).is_some(),
            "find: no io::Error under {e}"
        );
    }
}

/// "its response is stored 24 h" (`with_ttl`), and "While the handler runs, the task renews the
/// lock every third of the lease ..., so a handler slower than the lease keeps its key."
#[tokio::test(start_paused = true)]
async fn ttl_and_lease_renewal() {
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_ttl(Duration::from_secs(10))
        .unwrap()
        .with_lease(Duration::from_secs(3))
        .unwrap();
    let app = counted(runs.clone(), Duration::from_secs(8), 1).layer(layer);
    let a = app.clone();
    let first = tokio::spawn(async move { answer(&a, "tl").await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (s, body, _) = answer(&app, "tl").await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "a handler slower than its lease lost its key: {body}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    // Stored at t = 8 s for 10 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (_, _, h) = answer(&app, "tl").await;
    assert_eq!(
        h.get("idempotent-replayed").map(|v| v.to_str().unwrap()),
        Some("true")
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a = app.clone();
    let again = tokio::spawn(async move { answer(&a, "tl").await });
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (s, _, h) = again.await.unwrap();
    assert_eq!(s, StatusCode::CREATED);
    assert!(h.get("idempotent-replayed").is_none());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
