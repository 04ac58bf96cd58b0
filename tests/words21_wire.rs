//! Webhook ids with '.', bodies cut by an outer tower-http `RequestBodyLimitLayer` (webhooks and
//! the idempotency server), and `CallOptions` idempotency keys with control characters, against
//! real axum servers on loopback and through the composed client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use axum::routing::{post, post_service};
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::{find, BoxError, CallOptions, Error};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{problem, ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::retry::RetryLayer;
use sturdy::webhook::{
    sign_standard, MemoryQueue, MemoryReceiver, StandardWebhooks, WebhookReceiver,
};
use sturdy::ClientBuilder;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_http::limit::RequestBodyLimitLayer;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A request body sent in chunks, without a length (so hyper sends it chunked), optionally
/// never ending after its chunks.
struct Chunked {
    chunks: VecDeque<Bytes>,
    hang: bool,
}

impl Chunked {
    fn new(data: &[u8], chunk: usize) -> Self {
        Self {
            chunks: data
                .chunks(chunk.max(1))
                .map(Bytes::copy_from_slice)
                .collect(),
            hang: false,
        }
    }
    fn hanging(data: &[u8]) -> Self {
        Self {
            chunks: [Bytes::copy_from_slice(data)].into_iter().collect(),
            hang: true,
        }
    }
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            None if self.hang => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        !self.hang && self.chunks.is_empty()
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn now() -> i64 {
    sturdy::core::WallClock::now(&sturdy::core::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn send_chunked(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: Chunked,
) -> (StatusCode, HeaderMap, Bytes) {
    let client = HyperClient::builder(TokioExecutor::new()).build_http::<Chunked>();
    let mut req = Request::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let res = client.request(req.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

fn standard_headers(id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", ts.to_string()),
        (
            "webhook-signature",
            sign_standard(SECRET, id, ts, body).unwrap(),
        ),
        ("content-type", "application/json".to_owned()),
    ]
}

async fn standard_receiver(limit: Option<usize>) -> (SocketAddr, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let mut app = Router::new().route("/wh", post_service(receiver));
    if let Some(n) = limit {
        app = app.layer(RequestBodyLimitLayer::new(n));
    }
    (serve(app).await, events)
}

/// The re-cut delivery of RELIABILITY.md: a signed delivery with id `msg` and body `<ts2>.B` is
/// accepted; the same signed bytes resent as id `msg.<ts>` and body `B` get 400 and are not queued.
#[tokio::test]
async fn words21_standard_recut_delivery_refused_400() {
    let (addr, mut events) = standard_receiver(None).await;
    let ts = now();
    let ts2 = now();
    let body = format!("{ts2}.{{\"type\":\"invoice.paid\"}}");
    let (status, _, _) = send_chunked(
        addr,
        "/wh",
        &standard_headers("msg", ts, body.as_bytes()),
        Chunked::new(body.as_bytes(), 7),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.try_recv().is_some());
    // The same signature, re-cut.
    let sig = sign_standard(SECRET, "msg", ts, body.as_bytes()).unwrap();
    let recut_body = b"{\"type\":\"invoice.paid\"}";
    let headers = vec![
        ("webhook-id", format!("msg.{ts}")),
        ("webhook-timestamp", ts2.to_string()),
        ("webhook-signature", sig),
    ];
    let (status, _, _) = send_chunked(addr, "/wh", &headers, Chunked::new(recut_body, 64)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(events.try_recv().is_none());
}

/// Ids with a '.' anywhere (leading, trailing, only dots), correctly signed: 400, never queued.
/// Ids without one (up to 256 bytes, `%2E`, a fullwidth stop) are accepted; 257 bytes are not.
#[tokio::test]
async fn words21_standard_dotted_ids_refused_others_accepted() {
    let (addr, mut events) = standard_receiver(None).await;
    for id in [
        ".",
        "...",
        ".msg",
        "msg.",
        "a.b",
        "msg_1.",
        &format!("{}.", "x".repeat(255)),
    ] {
        let body = format!("{{\"id\":\"{}\"}}", id.len());
        let (status, _, _) = send_chunked(
            addr,
            "/wh",
            &standard_headers(id, now(), body.as_bytes()),
            Chunked::new(body.as_bytes(), 3),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "id {id:?}");
        assert!(events.try_recv().is_none(), "id {id:?} queued");
    }
    for id in ["msg%2E1", "msg\u{ff0e}1", &"y".repeat(256)] {
        let body = b"{}";
        let (status, _, _) = send_chunked(
            addr,
            "/wh",
            &standard_headers(id, now(), body),
            Chunked::new(body, 1),
        )
        .await;
        // A non-ASCII id may be refused as malformed; a dotless ASCII one must be accepted.
        if id.is_ascii() {
            assert_eq!(status, StatusCode::OK, "id {id:?}");
            let ev = events.try_recv().expect("queued");
            assert_eq!(ev.id, id);
        } else {
            assert_ne!(status, StatusCode::UNAUTHORIZED, "id {id:?}");
        }
    }
    let long = "z".repeat(257);
    let (status, _, _) = send_chunked(
        addr,
        "/wh",
        &standard_headers(&long, now(), b"{}"),
        Chunked::new(b"{}", 1),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// The dotted id is refused on the headers, before the body is read: a body that never ends
/// still gets its 400 at once.
#[tokio::test]
async fn words21_dotted_id_refused_before_body_read() {
    let (addr, mut events) = standard_receiver(None).await;
    let ts = now();
    let body = b"{\"partial\":";
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        send_chunked(
            addr,
            "/wh",
            &standard_headers("evt.1", ts, body),
            Chunked::hanging(body),
        ),
    )
    .await
    .expect("answered without reading the whole body");
    assert_eq!(out.0, StatusCode::BAD_REQUEST);
    assert!(events.try_recv().is_none());
}

/// A chunked delivery cut by tower-http's `RequestBodyLimitLayer` outside the receiver: 413
/// `payload too large`, not 400 or 401, and not queued; at the limit exactly, accepted. Chunk
/// sizes drawn from a seeded generator.
#[tokio::test]
async fn words21_webhook_outer_limit_cut_is_413() {
    let (addr, mut events) = standard_receiver(Some(1000)).await;
    let mut seed: u64 = 0x2121_2121;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (i, size) in [1001usize, 1024, 5000, 64 * 1024].into_iter().enumerate() {
        let body = vec![b'a'; size];
        let chunk = 1 + (next() % 700) as usize;
        let (status, _, text) = send_chunked(
            addr,
            "/wh",
            &standard_headers(&format!("msg_big_{i}"), now(), &body),
            Chunked::new(&body, chunk),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "size {size}, chunk {chunk}: {text:?}"
        );
        assert_eq!(&text[..], b"payload too large");
        assert!(events.try_recv().is_none());
    }
    let body = vec![b'b'; 1000];
    let chunk = 1 + (next() % 300) as usize;
    let (status, _, _) = send_chunked(
        addr,
        "/wh",
        &standard_headers("msg_exact", now(), &body),
        Chunked::new(&body, chunk),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.try_recv().is_some());
}

/// The receiver's own, smaller limit inside a larger outer one: still 413, and a body under
/// both is accepted. A cut body is not remembered: the same id, delivered whole, is queued.
#[tokio::test]
async fn words21_webhook_inner_and_outer_limits_and_redelivery() {
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver =
        WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue).with_body_limit(500);
    let app = Router::new()
        .route("/wh", post_service(receiver))
        .layer(RequestBodyLimitLayer::new(800));
    let addr = serve(app).await;
    let big = vec![b'c'; 700];
    let (status, _, _) = send_chunked(
        addr,
        "/wh",
        &standard_headers("msg_inner", now(), &big),
        Chunked::new(&big, 100),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let huge = vec![b'c'; 900];
    let (status, _, _) = send_chunked(
        addr,
        "/wh",
        &standard_headers("msg_inner", now(), &huge),
        Chunked::new(&huge, 100),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let small = vec![b'c'; 400];
    let (status, _, _) = send_chunked(
        addr,
        "/wh",
        &standard_headers("msg_inner", now(), &small),
        Chunked::new(&small, 100),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ev = events.try_recv().expect("queued");
    assert_eq!(ev.id, "msg_inner");
    assert_eq!(ev.body.len(), 400);
}

fn idempotent_app(calls: Arc<AtomicU32>, outer_limit: usize) -> Router {
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    Router::new()
        .route(
            "/orders",
            post(move |headers: HeaderMap, body: Bytes| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let key = headers
                        .get("idempotency-key")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    (StatusCode::CREATED, format!("{key}|{}", body.len()))
                }
            }),
        )
        .layer(layer)
        .layer(RequestBodyLimitLayer::new(outer_limit))
}

/// The idempotency server under an outer `RequestBodyLimitLayer`: a chunked body cut by it is
/// 413 `request-body-too-large`, the handler does not run, and the key is left free: the same
/// key with a body under the limit runs once and is then replayed.
#[tokio::test]
async fn words21_idempotency_server_outer_limit_cut_is_413_and_key_free() {
    let calls = Arc::new(AtomicU32::new(0));
    let addr = serve(idempotent_app(calls.clone(), 1000)).await;
    let headers = vec![("idempotency-key", "key-413".to_owned())];
    for size in [1001usize, 4096, 100_000] {
        let body = vec![b'x'; size];
        let (status, h, text) =
            send_chunked(addr, "/orders", &headers, Chunked::new(&body, 333)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{size}: {text:?}");
        let json: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(json["type"], problem::BODY_TOO_LARGE, "{json}");
        assert_eq!(
            h.get("content-type").unwrap(),
            "application/problem+json",
            "{h:?}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let body = vec![b'x'; 10];
    let (status, _, text) = send_chunked(addr, "/orders", &headers, Chunked::new(&body, 3)).await;
    assert_eq!(status, StatusCode::CREATED, "{text:?}");
    let (status, h, text2) = send_chunked(addr, "/orders", &headers, Chunked::new(&body, 5)).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(h.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(text, text2);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A `CallOptions` key with CR LF, through the composed client to a real sturdy idempotency
/// server: sent as its digest (`sturdy-sha256-<hex>`), the same on a resend, so the second call
/// is a replay.
#[tokio::test]
async fn words21_control_char_key_over_wire_is_same_request_on_resend() {
    let calls = Arc::new(AtomicU32::new(0));
    let addr = serve(idempotent_app(calls.clone(), 1 << 20)).await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ClientBuilder::new().build(http);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let mut req = Request::post(format!("http://{addr}/orders"))
            .body(Full::from("{\"sku\":1}"))
            .unwrap();
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key("a\r\nb"));
        let res = client.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        bodies.push(res.into_body().collect().await.unwrap().to_bytes());
    }
    assert_eq!(
        &bodies[0][..],
        &b"sturdy-sha256-18745f36a05e29072709042d6062ce54f1b08ff36c27ba80c39f81fb010c8ce2|9"[..]
    );
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

type Req = Request<Full<Bytes>>;

/// Records the idempotency-key header value of every attempt; answers per `statuses`.
fn recording_api(
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    statuses: Vec<StatusCode>,
) -> impl Service<
    Req,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send,
> + Clone
       + Send
       + Sync
       + 'static {
    let statuses = Arc::new(statuses);
    service_fn(move |req: Req| {
        let n = {
            let mut s = seen.lock().unwrap();
            s.push(
                req.headers()
                    .get("idempotency-key")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default(),
            );
            s.len() - 1
        };
        let status = *statuses.get(n).unwrap_or(&StatusCode::OK);
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    })
}

/// Every retry of a POST keyed with control characters carries the same key (its digest), and
/// the retry layer retries it (the header is set, so the POST is keyed). DEL and NUL count as
/// control characters too.
#[tokio::test(start_paused = true)]
async fn words21_control_char_key_same_on_every_retry() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = recording_api(
        seen.clone(),
        vec![StatusCode::SERVICE_UNAVAILABLE, StatusCode::BAD_GATEWAY],
    );
    let mut client = ClientBuilder::new().build(api);
    let mut req = Request::post("http://api.example.com/pay")
        .body(Full::from("{}"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("x\u{7f}%\0\ny"));
    let res = client.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3);
    for v in seen.iter() {
        assert_eq!(
            v.as_slice(),
            &b"sturdy-sha256-fe72e1b9544061724d32f7364652ae69e1bc3d7eb56f2179b45a64ef49d25d70"[..]
        );
    }
}

/// The key a failed call reports (its message and `CallReport`) names the request that was
/// sent: resending with it gives the same header value, and the message holds no raw CR or LF.
#[tokio::test(start_paused = true)]
async fn words21_control_char_key_reported_key_names_same_request() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = recording_api(seen.clone(), vec![StatusCode::SERVICE_UNAVAILABLE; 10]);
    let mut client = ServiceBuilder::new()
        .layer(IdempotencyKeyLayer::new())
        .layer(RetryLayer::new().with_max_attempts(1))
        .service(service_fn(move |req: Req| {
            let mut api = api.clone();
            async move {
                let _ = api.ready().await?.call(req).await?;
                Err::<Response<Full<Bytes>>, BoxError>(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                )))
            }
        }));
    let mut req = Request::post("http://api.example.com/pay")
        .body(Full::from("{}"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_idempotency_key("k\r\nSet-Cookie: x=1"));
    let err = client.ready().await.unwrap().call(req).await.unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\r') && !msg.contains('\n'), "{msg:?}");
    let reported = find::<Error>(&*err)
        .and_then(Error::idempotency_key)
        .expect("the key is reported")
        .to_owned();
    assert!(msg.contains(&reported), "{msg}");
    let mut again = Request::post("http://api.example.com/pay")
        .body(Full::from("{}"))
        .unwrap();
    again
        .extensions_mut()
        .insert(CallOptions::new().with_idempotency_key(reported.clone()));
    let _ = client.ready().await.unwrap().call(again).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0], seen[1],
        "resending with the reported key {reported:?}"
    );
}

/// Two different keys must not name one request: `a\r\nb` (encoded) and the literal key
/// `a%0D%0Ab` are two keys, so they must not go out as one header value (a server would replay
/// the first's response to the second).
#[tokio::test(start_paused = true)]
async fn words21_encoded_key_does_not_collide_with_literal_key() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut client = ClientBuilder::new().build(recording_api(seen.clone(), vec![]));
    for key in ["a\r\nb", "a%0D%0Ab"] {
        let mut req = Request::post("http://api.example.com/pay")
            .body(Full::from("{}"))
            .unwrap();
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        client.ready().await.unwrap().call(req).await.unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_ne!(
        seen[0],
        seen[1],
        "{:?}",
        seen.iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect::<Vec<_>>()
    );
}

/// The same collision end to end: against a real sturdy idempotency server, the second
/// (distinct) key's order is answered with the first one's stored response, and its handler
/// never runs.
#[tokio::test]
async fn words21_encoded_key_collision_replays_other_order_over_wire() {
    let calls = Arc::new(AtomicU32::new(0));
    let addr = serve(idempotent_app(calls.clone(), 1 << 20)).await;
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let client = ClientBuilder::new().build(http);
    let mut replayed = Vec::new();
    for key in ["a\r\nb", "a%0D%0Ab"] {
        let mut req = Request::post(format!("http://{addr}/orders"))
            .body(Full::from("{\"sku\":1}"))
            .unwrap();
        req.extensions_mut()
            .insert(CallOptions::new().with_idempotency_key(key));
        let res = client.clone().oneshot(req).await.unwrap();
        replayed.push(res.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "replayed: {replayed:?}");
}

/// The same outer cut for the Stripe and GitHub schemes: 413, never 401 `invalid signature`.
#[tokio::test]
async fn words21_stripe_and_github_outer_limit_cut_is_413() {
    use sturdy::webhook::{sign_github, sign_stripe, GitHub, Stripe};
    let (q1, mut e1) = MemoryQueue::new(10);
    let (q2, mut e2) = MemoryQueue::new(10);
    let app = Router::new()
        .route(
            "/stripe",
            post_service(WebhookReceiver::new(
                Stripe::new("whsec_stripe21").unwrap(),
                q1,
            )),
        )
        .route(
            "/github",
            post_service(WebhookReceiver::new(
                GitHub::new("gh-secret-21").unwrap(),
                q2,
            )),
        )
        .layer(RequestBodyLimitLayer::new(256));
    let addr = serve(app).await;
    for size in [257usize, 300, 10_000] {
        let body = format!("{{\"id\":\"evt_{size}\",\"pad\":\"{}\"}}", "p".repeat(size));
        let b = body.as_bytes();
        let (status, _, text) = send_chunked(
            addr,
            "/stripe",
            &[("stripe-signature", sign_stripe("whsec_stripe21", now(), b))],
            Chunked::new(b, 50),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "stripe {size}: {text:?}"
        );
        let (status, _, text) = send_chunked(
            addr,
            "/github",
            &[
                ("x-hub-signature-256", sign_github("gh-secret-21", b)),
                ("x-github-event", "push".to_owned()),
                ("x-github-delivery", format!("d-{size}")),
            ],
            Chunked::new(b, 50),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "github {size}: {text:?}"
        );
    }
    assert!(e1.try_recv().is_none());
    assert!(e2.try_recv().is_none());
    // Under the limit both are accepted.
    let b = b"{\"id\":\"evt_ok\"}";
    let (s1, _, _) = send_chunked(
        addr,
        "/stripe",
        &[("stripe-signature", sign_stripe("whsec_stripe21", now(), b))],
        Chunked::new(b, 4),
    )
    .await;
    let (s2, _, _) = send_chunked(
        addr,
        "/github",
        &[
            ("x-hub-signature-256", sign_github("gh-secret-21", b)),
            ("x-github-event", "push".to_owned()),
        ],
        Chunked::new(b, 4),
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
}
