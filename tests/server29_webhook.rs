//! The webhook receiver against its guide and rustdoc: mounted in real axum apps served on
//! loopback, hostile signature headers, timestamps and bodies, deliveries cut off mid-flight,
//! and the words of its rejections and logs.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post_service};
use axum::Router;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, BoxFuture, EventQueue, GenericHmac, GitHub,
    MemoryQueue, MemoryReceiver, Push, SourceAllowlist, StandardWebhooks, Stripe, WebhookEvent,
    WebhookReceiver, MAX_SIGNATURES,
};
use tower::ServiceExt;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER: &str = "whsec_dGhlIG90aGVyIHNlY3JldCBvZiB0aGUgdGVzdHM=";
const STRIPE_SECRET: &str = "whsec_server29_stripe_endpoint_secret";
const NOW: i64 = 1_700_000_000;

#[derive(Debug)]
struct Fixed(i64);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_secs(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.0.unsigned_abs())
        }
    }
}

fn wall_now() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn standard() -> StandardWebhooks {
    StandardWebhooks::new(SECRET).unwrap()
}

fn standard_app(clock: i64) -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(standard(), queue).with_clock(Arc::new(Fixed(clock)));
    (Router::new().route("/wh", post_service(receiver)), events)
}

fn std_req(id: &str, ts: &str, sig: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post("/wh")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts)
        .header("webhook-signature", sig)
        .body(body.into())
        .unwrap()
}

fn signed(id: &str, ts: i64, body: &[u8]) -> String {
    sign_standard(SECRET, id, ts, body).unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, String) {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

fn client() -> HyperClient<HttpConnector, Full<Bytes>> {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

async fn wire(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> (StatusCode, String) {
    let mut b = Request::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    let res: Response<hyper::body::Incoming> = client()
        .request(b.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A generic rejection text, as the guide lists them.
fn generic(body: &str) -> bool {
    ["forbidden", "invalid signature", "payload too large"]
        .iter()
        .any(|t| body.trim() == *t)
}

// ---- composition -------------------------------------------------------------------------

#[derive(Clone)]
struct AppState {
    hits: Arc<AtomicUsize>,
}

async fn health(State(s): State<AppState>) -> String {
    s.hits.fetch_add(1, Ordering::SeqCst);
    "ok".into()
}

#[tokio::test]
async fn receiver_in_a_nested_stateful_app_over_the_wire() {
    let (queue, mut events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(standard(), queue.clone());
    let gh = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), queue);
    let hooks = Router::new()
        .route("/standard", post_service(receiver))
        .route("/github", post_service(gh));
    let state = AppState {
        hits: Arc::new(AtomicUsize::new(0)),
    };
    let app = Router::new()
        .route("/health", get(health))
        .nest("/hooks", hooks)
        .with_state(state.clone());
    let addr = serve(app).await;

    let ts = wall_now();
    let body = Bytes::from_static(br#"{"type":"order.paid"}"#);
    let headers = [
        ("webhook-id", "msg_nested_1".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signed("msg_nested_1", ts, &body)),
    ];
    let (status, _) = wire(addr, "/hooks/standard", &headers, body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    let event = events.recv().await.unwrap();
    assert_eq!(event.scheme, "standard");
    assert_eq!(event.route, "standard");
    assert_eq!(event.id, "msg_nested_1");
    assert_eq!(event.timestamp, Some(ts));
    assert_eq!(event.body, body);
    assert_eq!(event.headers["webhook-id"], "msg_nested_1");

    // The same delivery again: 200, not queued again.
    let (status, _) = wire(addr, "/hooks/standard", &headers, body.clone()).await;
    assert_eq!(status, StatusCode::OK);

    let gh_body = Bytes::from_static(b"{\"zen\":\"hi\"}");
    let gh_headers = [
        ("x-hub-signature-256", sign_github("gh-secret", &gh_body)),
        ("x-github-event", "ping".to_string()),
        ("x-github-delivery", "d-1".to_string()),
    ];
    let (status, _) = wire(addr, "/hooks/github", &gh_headers, gh_body).await;
    assert_eq!(status, StatusCode::OK);
    let event = events.recv().await.unwrap();
    assert_eq!(event.route, "github");
    assert!(events.try_recv().is_none(), "the duplicate was not queued");

    let res = client()
        .get(format!("http://{addr}/health").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(state.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn request_body_limit_outside_cuts_a_chunked_delivery_with_413() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue);
    let app = Router::new()
        .route("/wh", post_service(receiver))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(64));
    let ts = wall_now();
    let body = vec![b'x'; 200];
    let sig = signed("msg_big", ts, &body);
    let stream = futures_util::stream::iter(
        body.chunks(10)
            .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let req = std_req("msg_big", &ts.to_string(), &sig, Body::from_stream(stream));
    let (status, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn timeout_layer_outside_a_slow_queue_loses_nothing_and_duplicates_nothing() {
    let (inner, mut events) = MemoryQueue::new(10);
    let queue = SlowQueue {
        inner,
        delay: Duration::from_millis(150),
        pushes: Arc::new(AtomicUsize::new(0)),
    };
    let receiver = WebhookReceiver::new(standard(), queue.clone());
    let app = Router::new().route("/wh", post_service(receiver)).layer(
        tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(30),
        ),
    );
    let addr = serve(app).await;
    let ts = wall_now();
    let body = Bytes::from_static(b"{\"n\":1}");
    let headers = [
        ("webhook-id", "msg_slow".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signed("msg_slow", ts, &body)),
    ];
    let (status, _) = wire(addr, "/wh", &headers, body.clone()).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "the sender saw no 2xx");
    // The sender redelivers until it gets a 2xx (each attempt may time out again).
    let mut ok = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _) = wire(addr, "/wh", &headers, body.clone()).await;
        if status == StatusCode::OK {
            ok = true;
            break;
        }
    }
    // With a timeout shorter than every push, a 2xx never comes; what matters: queued once or
    // not at all acknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut n = 0;
    while events.try_recv().is_some() {
        n += 1;
    }
    assert!(n <= 1, "queued {n} times");
    if ok {
        assert_eq!(n, 1, "acknowledged but not queued");
    }
}

#[derive(Debug, Clone)]
struct SlowQueue {
    inner: MemoryQueue,
    delay: Duration,
    pushes: Arc<AtomicUsize>,
}

impl EventQueue for SlowQueue {
    fn push(&self, event: WebhookEvent, ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let inner = self.inner.clone();
        let delay = self.delay;
        let pushes = self.pushes.clone();
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            pushes.fetch_add(1, Ordering::SeqCst);
            inner.push(event, ttl).await
        })
    }
}

// ---- cancellation ------------------------------------------------------------------------

#[tokio::test]
async fn delivery_dropped_after_the_signature_check_is_redelivered_once() {
    let (inner, mut events) = MemoryQueue::new(10);
    let queue = SlowQueue {
        inner,
        delay: Duration::from_millis(100),
        pushes: Arc::new(AtomicUsize::new(0)),
    };
    let receiver = WebhookReceiver::new(standard(), queue.clone());
    let app = Router::new().route("/wh", post_service(receiver));
    let ts = wall_now();
    let body = b"{\"x\":1}".to_vec();
    let sig = signed("msg_drop", ts, &body);
    let first = tokio::time::timeout(
        Duration::from_millis(20),
        send(
            &app,
            std_req("msg_drop", &ts.to_string(), &sig, body.clone()),
        ),
    )
    .await;
    assert!(first.is_err(), "the first delivery was cut before its ack");
    let (status, _) = send(
        &app,
        std_req("msg_drop", &ts.to_string(), &sig, body.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut n = 0;
    while events.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 1, "one event, whatever became of the cut delivery");
}

#[tokio::test]
async fn client_disconnect_mid_delivery_over_the_wire_then_redelivery() {
    let (inner, mut events) = MemoryQueue::new(10);
    let queue = SlowQueue {
        inner,
        delay: Duration::from_millis(150),
        pushes: Arc::new(AtomicUsize::new(0)),
    };
    let receiver = WebhookReceiver::new(standard(), queue);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = wall_now();
    let body = Bytes::from_static(b"{\"y\":2}");
    let headers = [
        ("webhook-id", "msg_disc".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signed("msg_disc", ts, &body)),
    ];
    let cut = tokio::time::timeout(
        Duration::from_millis(30),
        wire(addr, "/wh", &headers, body.clone()),
    )
    .await;
    assert!(cut.is_err());
    let (status, _) = wire(addr, "/wh", &headers, body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut n = 0;
    while events.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 1);
}

#[tokio::test]
async fn full_queue_is_503_with_retry_after_and_the_id_is_not_remembered() {
    let (queue, mut events) = MemoryQueue::new(1);
    let receiver = WebhookReceiver::new(standard(), queue);
    let app = Router::new().route("/wh", post_service(receiver));
    let ts = wall_now();
    for (i, want) in [(1, StatusCode::OK), (2, StatusCode::SERVICE_UNAVAILABLE)] {
        let id = format!("msg_full_{i}");
        let res = app
            .clone()
            .oneshot(std_req(&id, &ts.to_string(), &signed(&id, ts, b"{}"), "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), want);
        if want == StatusCode::SERVICE_UNAVAILABLE {
            assert!(res.headers().contains_key("retry-after"));
        }
    }
    events.recv().await.unwrap();
    let (status, _) = send(
        &app,
        std_req(
            "msg_full_2",
            &ts.to_string(),
            &signed("msg_full_2", ts, b"{}"),
            "{}",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.recv().await.unwrap().id, "msg_full_2");
}

// ---- hostile signature headers -------------------------------------------------------------

fn entries(n: usize, valid_at: Option<usize>, valid: &str) -> String {
    let fake = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    (0..n)
        .map(|i| {
            if Some(i) == valid_at {
                valid.to_string()
            } else {
                fake.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn standard_thousands_of_entries_valid_within_the_first_sixteen_passes() {
    let (app, mut events) = standard_app(NOW);
    let sig = signed("msg_many", NOW, b"{}");
    let header = entries(5000, Some(MAX_SIGNATURES - 1), &sig);
    let (status, _) = send(&app, std_req("msg_many", &NOW.to_string(), &header, "{}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.try_recv().is_some());
}

#[tokio::test]
async fn standard_valid_entry_past_the_sixteenth_is_ignored() {
    let (app, mut events) = standard_app(NOW);
    let sig = signed("msg_late", NOW, b"{}");
    let header = entries(5000, Some(MAX_SIGNATURES), &sig);
    let (status, body) = send(&app, std_req("msg_late", &NOW.to_string(), &header, "{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(generic(&body), "{body}");
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn standard_non_v1_entries_do_not_count_toward_the_sixteen() {
    let (app, _events) = standard_app(NOW);
    let sig = signed("msg_v2", NOW, b"{}");
    let mut parts: Vec<String> = (0..100).map(|_| "v2,AAAA".to_string()).collect();
    parts.push(sig);
    let (status, _) = send(
        &app,
        std_req("msg_v2", &NOW.to_string(), &parts.join(" "), "{}"),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the guide counts only `v1` entries toward MAX_SIGNATURES"
    );
}

#[tokio::test]
async fn standard_huge_signature_header_over_the_wire_is_answered() {
    let (queue, _events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = wall_now();
    let body = Bytes::from_static(b"{}");
    let header = format!(
        "{} {}",
        signed("msg_huge", ts, &body),
        entries(3000, None, "")
    );
    assert!(header.len() > 100_000);
    let headers = [
        ("webhook-id", "msg_huge".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", header),
    ];
    let started = tokio::time::Instant::now();
    let (status, _) = wire(addr, "/wh", &headers, body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn duplicated_timestamp_headers_cannot_smuggle_a_stale_signature() {
    let (app, mut events) = standard_app(NOW);
    let stale = NOW - 3600;
    let sig = signed("msg_dup_ts", stale, b"{}");
    let req = Request::post("/wh")
        .header("webhook-id", "msg_dup_ts")
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-timestamp", stale.to_string())
        .header("webhook-signature", &sig)
        .body(Body::from("{}"))
        .unwrap();
    let (status, _) = send(&app, req).await;
    assert_ne!(status, StatusCode::OK);
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn duplicated_id_headers_never_queue_an_unsigned_id() {
    let (app, mut events) = standard_app(NOW);
    let sig = signed("msg_a", NOW, b"{}");
    let req = Request::post("/wh")
        .header("webhook-id", "msg_a")
        .header("webhook-id", "msg_b")
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-signature", &sig)
        .body(Body::from("{}"))
        .unwrap();
    let (status, _) = send(&app, req).await;
    if status == StatusCode::OK {
        assert_eq!(events.try_recv().unwrap().id, "msg_a");
    } else {
        assert!(events.try_recv().is_none());
    }
}

#[tokio::test]
async fn two_signature_header_lines_are_refused_or_verified_not_a_500() {
    let (app, _events) = standard_app(NOW);
    let sig = signed("msg_2l", NOW, b"{}");
    let req = Request::post("/wh")
        .header("webhook-id", "msg_2l")
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-signature", "v1,AAAA")
        .header("webhook-signature", &sig)
        .body(Body::from("{}"))
        .unwrap();
    let (status, _) = send(&app, req).await;
    assert!(
        [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED
        ]
        .contains(&status),
        "{status}"
    );
}

#[tokio::test]
async fn non_ascii_signature_header_is_a_clean_rejection() {
    let (app, _events) = standard_app(NOW);
    let req = Request::post("/wh")
        .header("webhook-id", "msg_na")
        .header("webhook-timestamp", NOW.to_string())
        .header(
            "webhook-signature",
            HeaderValue::from_bytes("v1,é€✓".as_bytes()).unwrap(),
        )
        .body(Body::from("{}"))
        .unwrap();
    let (status, body) = send(&app, req).await;
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
        "{status}"
    );
    assert!(generic(&body), "{body}");
}

#[tokio::test]
async fn webhook_id_rules_from_the_table() {
    let (app, _events) = standard_app(NOW);
    let cafe = HeaderValue::from_bytes("msg_café".as_bytes()).unwrap();
    let req = Request::post("/wh")
        .header("webhook-id", cafe)
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-signature", "v1,AAAA")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::BAD_REQUEST);

    for (id, want) in [
        ("msg.1".to_string(), StatusCode::BAD_REQUEST),
        ("a".repeat(257), StatusCode::BAD_REQUEST),
        ("a".repeat(256), StatusCode::OK),
        ("x".to_string(), StatusCode::OK),
    ] {
        let sig = sign_standard(SECRET, &id, NOW, b"{}").unwrap();
        let (status, _) = send(&app, std_req(&id, &NOW.to_string(), &sig, "{}")).await;
        assert_eq!(status, want, "id of {} bytes", id.len());
    }
    let req = Request::post("/wh")
        .header("webhook-id", "")
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-signature", signed("", NOW, b"{}"))
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::BAD_REQUEST, "empty id");
}

// ---- timestamps ----------------------------------------------------------------------------

#[tokio::test]
async fn tolerance_is_five_minutes_both_ways_to_the_second() {
    let (app, _events) = standard_app(NOW);
    for (off, want) in [
        (-300, StatusCode::OK),
        (300, StatusCode::OK),
        (-302, StatusCode::UNAUTHORIZED),
        (302, StatusCode::UNAUTHORIZED),
    ] {
        let ts = NOW + off;
        let id = format!("msg_tol_{off}");
        let (status, _) = send(
            &app,
            std_req(&id, &ts.to_string(), &signed(&id, ts, b"{}"), "{}"),
        )
        .await;
        assert_eq!(status, want, "offset {off}");
    }
}

#[tokio::test]
async fn extreme_timestamps_are_401_or_400_never_a_panic() {
    let (app, _events) = standard_app(NOW);
    let mut got = Vec::new();
    for ts in [
        0,
        1,
        i64::MAX,
        i64::MAX - 1,
        NOW + 10 * 365 * 86400,
        NOW - 10 * 365 * 86400,
    ] {
        let id = "msg_extreme";
        let (status, body) = send(
            &app,
            std_req(id, &ts.to_string(), &signed(id, ts, b"{}"), "{}"),
        )
        .await;
        assert!(generic(&body), "{body}");
        got.push((ts, status.as_u16()));
    }
    assert!(got.iter().all(|(_, s)| *s == 401), "{got:?}");
    for raw in [
        "9223372036854775808",
        "-9223372036854775809",
        "1e9",
        "1700000000.5",
        " 1700000000",
        "+1700000000",
        "",
        "0x10",
    ] {
        let (status, _) = send(&app, std_req("msg_raw", raw, "v1,AAAA", "{}")).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED,
            "{raw:?}: {status}"
        );
    }
}

#[tokio::test]
async fn negative_timestamps_are_stale_not_malformed() {
    let (app, _events) = standard_app(NOW);
    let mut got = Vec::new();
    for ts in [i64::MIN, i64::MIN + 1, -1] {
        let id = "msg_negative";
        let (status, _) = send(
            &app,
            std_req(id, &ts.to_string(), &signed(id, ts, b"{}"), "{}"),
        )
        .await;
        got.push((ts, status.as_u16()));
    }
    assert!(got.iter().all(|(_, s)| *s == 401), "{got:?}");
}

#[tokio::test]
async fn clock_at_the_edges_of_time_does_not_panic() {
    for clock in [0, 1, 253_402_300_799] {
        let (app, _events) = standard_app(clock);
        for ts in [i64::MIN, i64::MAX, clock] {
            let (status, _) = send(
                &app,
                std_req("msg_c", &ts.to_string(), &signed("msg_c", ts, b""), ""),
            )
            .await;
            assert!(status.as_u16() < 500, "clock {clock} ts {ts}: {status}");
        }
    }
}

#[tokio::test]
async fn stripe_duplicate_t_cannot_replay_a_stale_signature() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue)
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    let stale = NOW - 86400;
    let body = r#"{"id":"evt_stale"}"#;
    let old = sign_stripe(STRIPE_SECRET, stale, body.as_bytes());
    let v1 = old.split(',').find(|p| p.starts_with("v1=")).unwrap();
    for header in [
        format!("t={NOW},t={stale},{v1}"),
        format!("t={stale},t={NOW},{v1}"),
        format!("t={NOW},{v1},t={stale}"),
    ] {
        let req = Request::post("/wh")
            .header("stripe-signature", &header)
            .body(Body::from(body))
            .unwrap();
        let (status, _) = send(&app, req).await;
        assert_ne!(status, StatusCode::OK, "{header}");
    }
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn stripe_many_entries_the_seventeenth_v1_is_ignored() {
    let (queue, _events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue)
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    let body = r#"{"id":"evt_1"}"#;
    let good = sign_stripe(STRIPE_SECRET, NOW, body.as_bytes());
    let v1 = good
        .split(',')
        .find(|p| p.starts_with("v1="))
        .unwrap()
        .to_string();
    let fake = format!("v1={}", "0".repeat(64));
    for (pos, want) in [(15, StatusCode::OK), (16, StatusCode::UNAUTHORIZED)] {
        let mut parts = vec![format!("t={NOW}")];
        for i in 0..4000 {
            parts.push(if i == pos { v1.clone() } else { fake.clone() });
        }
        let req = Request::post("/wh")
            .header("stripe-signature", parts.join(","))
            .body(Body::from(body))
            .unwrap();
        assert_eq!(send(&app, req).await.0, want, "valid entry at {pos}");
    }
}

// ---- bodies ---------------------------------------------------------------------------------

#[tokio::test]
async fn empty_body_is_signed_and_queued() {
    let (app, mut events) = standard_app(NOW);
    let (status, _) = send(
        &app,
        std_req(
            "msg_empty",
            &NOW.to_string(),
            &signed("msg_empty", NOW, b""),
            Body::empty(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.recv().await.unwrap().body.is_empty());
}

#[tokio::test]
async fn body_limit_default_is_one_mib_exactly() {
    let (app, mut events) = standard_app(NOW);
    let at = vec![b'a'; 1024 * 1024];
    let (status, _) = send(
        &app,
        std_req(
            "msg_1m",
            &NOW.to_string(),
            &signed("msg_1m", NOW, &at),
            at.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.recv().await.unwrap().body.len(), 1024 * 1024);
    let over = vec![b'a'; 1024 * 1024 + 1];
    let (status, body) = send(
        &app,
        std_req(
            "msg_1m1",
            &NOW.to_string(),
            &signed("msg_1m1", NOW, &over),
            over.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body.trim(), "payload too large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_megabyte_body_verified_off_thread_over_the_wire() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue).with_body_limit(8 * 1024 * 1024);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = wall_now();
    let body = Bytes::from(vec![b'z'; 6 * 1024 * 1024]);
    let headers = [
        ("webhook-id", "msg_6m".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signed("msg_6m", ts, &body)),
    ];
    let (status, _) = wire(addr, "/wh", &headers, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(events.recv().await.unwrap().body.len(), 6 * 1024 * 1024);
}

#[tokio::test]
async fn many_megabyte_body_over_the_default_limit_gets_413_over_the_wire() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = wall_now();
    let body = Bytes::from(vec![b'z'; 5 * 1024 * 1024]);
    let headers = [
        ("webhook-id", "msg_5m".to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signed("msg_5m", ts, &body)),
    ];
    let mut b = Request::post(format!("http://{addr}/wh"));
    for (k, v) in &headers {
        b = b.header(*k, v.as_str());
    }
    match client().request(b.body(Full::new(body)).unwrap()).await {
        Ok(res) => assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE),
        Err(e) => panic!("no 413 came back: {e}"),
    }
    assert!(events.try_recv().is_none());
}

// ---- dedup, routes ---------------------------------------------------------------------------

#[tokio::test]
async fn two_routes_of_one_scheme_on_one_queue_do_not_share_ids() {
    let (queue, mut events) = MemoryQueue::new(10);
    let a = WebhookReceiver::new(standard(), queue.clone())
        .with_route("billing")
        .with_clock(Arc::new(Fixed(NOW)));
    let b = WebhookReceiver::new(standard(), queue)
        .with_route("shipping")
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new()
        .route("/a", post_service(a))
        .route("/b", post_service(b));
    for path in ["/a", "/b"] {
        let mut req = std_req(
            "msg_same",
            &NOW.to_string(),
            &signed("msg_same", NOW, b"{}"),
            "{}",
        );
        *req.uri_mut() = path.parse().unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::OK);
    }
    let r1 = events.recv().await.unwrap().route;
    let r2 = events.recv().await.unwrap().route;
    assert_eq!((r1.as_str(), r2.as_str()), ("billing", "shipping"));
}

#[tokio::test(start_paused = true)]
async fn short_dedup_ttl_still_refuses_a_copy_within_the_tolerance() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue)
        .with_dedup_ttl(Duration::from_secs(1))
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    let req = || {
        std_req(
            "msg_ttl",
            &NOW.to_string(),
            &signed("msg_ttl", NOW, b"{}"),
            "{}",
        )
    };
    assert_eq!(send(&app, req()).await.0, StatusCode::OK);
    tokio::time::advance(Duration::from_secs(120)).await;
    assert_eq!(send(&app, req()).await.0, StatusCode::OK);
    events.recv().await.unwrap();
    assert!(events.try_recv().is_none(), "the copy was queued again");
}

#[tokio::test]
async fn github_redelivery_under_a_new_delivery_id_is_a_duplicate() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(GitHub::new("gh").unwrap(), queue);
    let app = Router::new().route("/gh", post_service(receiver));
    for d in ["d-1", "d-2"] {
        let req = Request::post("/gh")
            .header("x-hub-signature-256", sign_github("gh", b"{\"a\":1}"))
            .header("x-github-delivery", d)
            .body(Body::from("{\"a\":1}"))
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::OK);
    }
    let e = events.recv().await.unwrap();
    assert_eq!(e.headers["x-github-delivery"], "d-1");
    assert!(events.try_recv().is_none());
}

// ---- source allowlist -------------------------------------------------------------------------

#[tokio::test]
async fn allowlist_without_connect_info_fails_closed() {
    let (queue, _events) = MemoryQueue::new(10);
    let list = SourceAllowlist::new(["127.0.0.1/32"]).unwrap();
    let receiver = WebhookReceiver::new(standard(), queue)
        .with_source_allowlist(list)
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    let (status, body) = send(
        &app,
        std_req("m", &NOW.to_string(), &signed("m", NOW, b"{}"), "{}"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body.trim(), "forbidden");
}

#[tokio::test]
async fn allowlist_over_the_wire_loopback_in_and_out_and_forged_xff_ignored() {
    for (net, xff, want) in [
        ("127.0.0.1/32", None, StatusCode::OK),
        ("10.0.0.0/8", None, StatusCode::FORBIDDEN),
        ("10.0.0.0/8", Some("10.1.2.3"), StatusCode::FORBIDDEN),
    ] {
        let (queue, _events) = MemoryQueue::new(10);
        let list = SourceAllowlist::new([net]).unwrap();
        let receiver = WebhookReceiver::new(standard(), queue).with_source_allowlist(list);
        let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
        let ts = wall_now();
        let body = Bytes::from_static(b"{}");
        let mut headers = vec![
            ("webhook-id", "msg_src".to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", signed("msg_src", ts, &body)),
        ];
        if let Some(x) = xff {
            headers.push(("x-forwarded-for", x.to_string()));
        }
        assert_eq!(
            wire(addr, "/wh", &headers, body).await.0,
            want,
            "{net} {xff:?}"
        );
    }
}

#[test]
fn allowlist_config_mistakes_are_errors() {
    assert!(SourceAllowlist::new(Vec::<&str>::new()).is_err());
    assert!(SourceAllowlist::new(["10.0.0.1/8"]).is_err());
    assert!(SourceAllowlist::new(["10.0.0.0/33"]).is_err());
    assert!(SourceAllowlist::new(["not-a-net"]).is_err());
    assert!(SourceAllowlist::new(["::ffff:0:0/96", "2a0a:a440::/29"]).is_ok());
}

// ---- words: config errors, Debug, logs -----------------------------------------------------------

#[test]
fn empty_secrets_are_refused_when_built() {
    assert!(StandardWebhooks::new("").is_err());
    assert!(StandardWebhooks::new("whsec_").is_err());
    assert!(Stripe::new("").is_err());
    assert!(GitHub::new("").is_err());
    assert!(GenericHmac::new("acme", http::HeaderName::from_static("x-sig"), "").is_err());
}

#[test]
fn config_errors_and_debug_never_show_a_secret() {
    let bad = "whsec_this-is-not*base64-but-secret!!";
    let err = StandardWebhooks::new(bad).unwrap_err();
    let words = format!("{err} {err:?}");
    assert!(!words.contains("this-is-not"), "{words}");
    assert!(!words.is_empty());

    let gh = GitHub::new("gh-very-secret-value").unwrap();
    let st = Stripe::new(STRIPE_SECRET).unwrap();
    let sw = StandardWebhooks::with_secrets([SECRET, OTHER]).unwrap();
    let gen = GenericHmac::new(
        "acme",
        http::HeaderName::from_static("x-sig"),
        "acme-secret-xyz",
    )
    .unwrap();
    let (queue, _events) = MemoryQueue::new(1);
    let recv = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let all = format!("{gh:?} {st:?} {sw:?} {gen:?} {recv:?}");
    for s in [
        "gh-very-secret-value",
        STRIPE_SECRET,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "dGhlIG90aGVyIHNlY3JldCBvZiB0aGUgdGVzdHM",
        "acme-secret-xyz",
    ] {
        assert!(!all.contains(s), "{s} in {all}");
    }
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn rejections_log_a_reason_but_no_secret_or_signature() {
    let logs = Logs::default();
    let sink = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_writer(move || sink.clone())
        .finish();
    let _guard = crate::logs13_common::set_default(sub);

    let (app, _events) = standard_app(NOW);
    let wrong = sign_standard(OTHER, "msg_log", NOW, b"{}").unwrap();
    let (status, body) = send(&app, std_req("msg_log", &NOW.to_string(), &wrong, "{}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body.trim(), "invalid signature");
    let good = signed("msg_log", NOW, b"{}");
    let (status, _) = send(
        &app,
        std_req("msg_log", &(NOW - 9999).to_string(), &good, "{}"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = send(&app, std_req("msg_log", &NOW.to_string(), &good, "{}")).await;
    assert_eq!(status, StatusCode::OK);

    let text = logs.text();
    assert!(!text.trim().is_empty(), "no reason was logged");
    let wrong_b64 = wrong.trim_start_matches("v1,");
    let good_b64 = good.trim_start_matches("v1,");
    for s in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "dGhlIG90aGVyIHNlY3JldCBvZiB0aGUgdGVzdHM",
        wrong_b64,
        good_b64,
    ] {
        assert!(!text.contains(s), "{s} logged:\n{text}");
    }
}

#[tokio::test]
async fn missing_header_is_400_with_a_generic_text() {
    let (app, _events) = standard_app(NOW);
    let req = Request::post("/wh")
        .header("webhook-id", "m")
        .header("webhook-timestamp", NOW.to_string())
        .body(Body::from("{}"))
        .unwrap();
    let (status, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(generic(&body), "{body}");
}

#[tokio::test]
async fn rotation_either_secret_verifies() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(
        StandardWebhooks::with_secrets([SECRET, OTHER]).unwrap(),
        queue,
    )
    .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    for (i, s) in [SECRET, OTHER].iter().enumerate() {
        let id = format!("msg_rot_{i}");
        let sig = sign_standard(s, &id, NOW, b"{}").unwrap();
        assert_eq!(
            send(&app, std_req(&id, &NOW.to_string(), &sig, "{}"))
                .await
                .0,
            StatusCode::OK
        );
    }
    assert!(events.try_recv().is_some() && events.try_recv().is_some());
}

// ---- more hostile values ------------------------------------------------------------------------

#[derive(Debug)]
struct Moving(Arc<std::sync::atomic::AtomicI64>);
impl WallClock for Moving {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0.load(Ordering::SeqCst) as u64)
    }
}

#[tokio::test]
async fn a_body_that_trickles_in_past_the_tolerance_is_401_and_not_queued() {
    let clock = Arc::new(std::sync::atomic::AtomicI64::new(NOW));
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver =
        WebhookReceiver::new(standard(), queue).with_clock(Arc::new(Moving(clock.clone())));
    let app = Router::new().route("/wh", post_service(receiver));
    let body = b"{\"slow\":true}".to_vec();
    let sig = signed("msg_trickle", NOW, &body);
    let (first, rest) = body.split_at(4);
    let (first, rest) = (Bytes::copy_from_slice(first), Bytes::copy_from_slice(rest));
    let c2 = clock.clone();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
        futures_util::stream::once(async move {
            c2.fetch_add(400, Ordering::SeqCst);
            Ok::<_, std::io::Error>(rest)
        }),
    );
    use futures_util::StreamExt;
    let (status, body) = send(
        &app,
        std_req(
            "msg_trickle",
            &NOW.to_string(),
            &sig,
            Body::from_stream(stream),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(generic(&body), "{body}");
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn carried_headers_are_bounded_to_1_kib_and_4_values() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(GitHub::new("gh").unwrap(), queue);
    let app = Router::new().route("/gh", post_service(receiver));
    let mut req = Request::post("/gh")
        .header("x-hub-signature-256", sign_github("gh", b"{}"))
        .header("x-github-event", "e".repeat(2048));
    for i in 0..10 {
        req = req.header("x-github-delivery", format!("d-{i}"));
    }
    let (status, _) = send(&app, req.body(Body::from("{}")).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let e = events.recv().await.unwrap();
    assert!(
        e.headers.get("x-github-event").is_none(),
        "a 2 KiB value is not carried"
    );
    assert_eq!(e.headers.get_all("x-github-delivery").iter().count(), 4);
}

#[test]
fn dedup_keys_of_distinct_triples_never_collide() {
    let k = |s: &str, r: &str, id: &str| {
        WebhookEvent::new(s, id, Bytes::new())
            .with_route(r)
            .dedup_key()
    };
    let keys = [
        k("a:b", "c", "d"),
        k("a", "b:c", "d"),
        k("a", "b", "c:d"),
        k("a%3Ab", "c", "d"),
        k("a", "b%3Ac", "d"),
        k("a:b:c", "", "d"),
        k("", "a:b:c", "d"),
        k("a", "b:c:d", ""),
    ];
    let set: std::collections::HashSet<_> = keys.iter().collect();
    assert_eq!(set.len(), keys.len(), "{keys:?}");
}

#[tokio::test]
async fn a_duplicate_gets_200_even_while_the_queue_is_full() {
    let (queue, mut events) = MemoryQueue::new(1);
    let receiver = WebhookReceiver::new(standard(), queue).with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    let req = || {
        std_req(
            "msg_qfull",
            &NOW.to_string(),
            &signed("msg_qfull", NOW, b"{}"),
            "{}",
        )
    };
    assert_eq!(send(&app, req()).await.0, StatusCode::OK);
    assert_eq!(
        send(&app, req()).await.0,
        StatusCode::OK,
        "a duplicate is acknowledged"
    );
    events.recv().await.unwrap();
    assert!(events.try_recv().is_none());
}

#[tokio::test]
async fn memory_queue_of_capacity_zero_holds_one() {
    let (queue, mut events) = MemoryQueue::new(0);
    let receiver = WebhookReceiver::new(standard(), queue).with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    for (id, want) in [
        ("m0", StatusCode::OK),
        ("m1", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        assert_eq!(
            send(
                &app,
                std_req(id, &NOW.to_string(), &signed(id, NOW, b"{}"), "{}")
            )
            .await
            .0,
            want
        );
    }
    assert_eq!(events.recv().await.unwrap().id, "m0");
}

#[tokio::test]
async fn stripe_ids_long_numeric_or_missing_fall_back_to_a_digest() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue)
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    let long = format!("{{\"id\":\"{}\"}}", "e".repeat(257));
    for body in [
        long.as_str(),
        "{\"id\":42}",
        "not json at all",
        "",
        "{\"id\":\"\"}",
    ] {
        let req = Request::post("/wh")
            .header(
                "stripe-signature",
                sign_stripe(STRIPE_SECRET, NOW, body.as_bytes()),
            )
            .body(Body::from(body.to_string()))
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::OK, "{body}");
        let e = events.recv().await.unwrap();
        assert!(e.id.starts_with("sha256:"), "{body:?} -> {}", e.id);
    }
    let req = Request::post("/wh")
        .header(
            "stripe-signature",
            sign_stripe(STRIPE_SECRET, NOW, br#"{"id":"evt_ok"}"#),
        )
        .body(Body::from(r#"{"id":"evt_ok"}"#))
        .unwrap();
    assert_eq!(send(&app, req).await.0, StatusCode::OK);
    assert_eq!(events.recv().await.unwrap().id, "evt_ok");
}

#[tokio::test]
async fn stripe_future_timestamps_are_refused_too() {
    let (queue, _events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue)
        .with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/wh", post_service(receiver));
    for (off, want) in [
        (301, StatusCode::UNAUTHORIZED),
        (-301, StatusCode::UNAUTHORIZED),
        (299, StatusCode::OK),
    ] {
        let body = format!("{{\"id\":\"evt_f{off}\"}}");
        let req = Request::post("/wh")
            .header(
                "stripe-signature",
                sign_stripe(STRIPE_SECRET, NOW + off, body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap();
        assert_eq!(send(&app, req).await.0, want, "offset {off}");
    }
}

#[tokio::test]
async fn generic_hmac_with_timestamp_dedups_on_signed_content_not_the_event_header() {
    let verifier = GenericHmac::new(
        "acme",
        http::HeaderName::from_static("x-acme-signature"),
        "acme-secret",
    )
    .unwrap()
    .with_timestamp_header(http::HeaderName::from_static("x-acme-timestamp"))
    .with_event_header(http::HeaderName::from_static("x-acme-event-id"));
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(verifier, queue).with_clock(Arc::new(Fixed(NOW)));
    let app = Router::new().route("/acme", post_service(receiver));
    let body = "{\"a\":1}";
    // HMAC-SHA256 hex of `timestamp.body`: what `sign_github` computes over those bytes.
    let signed_github = sign_github("acme-secret", format!("{NOW}.{body}").as_bytes());
    let hex = signed_github.trim_start_matches("sha256=").to_string();
    for ev in ["e-1", "e-2"] {
        let req = Request::post("/acme")
            .header("x-acme-signature", &hex)
            .header("x-acme-timestamp", NOW.to_string())
            .header("x-acme-event-id", ev)
            .body(Body::from(body))
            .unwrap();
        assert_eq!(send(&app, req).await.0, StatusCode::OK);
    }
    let e = events.recv().await.unwrap();
    assert_eq!(e.route, "acme");
    assert!(e.id.starts_with("sha256:"));
    assert_eq!(e.headers["x-acme-event-id"], "e-1");
    assert_eq!(e.timestamp, Some(NOW));
    assert!(
        events.try_recv().is_none(),
        "a copy under a new event id is a duplicate"
    );
}

#[tokio::test]
async fn on_event_reports_each_answer_with_its_status() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let (queue, _events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue)
        .with_clock(Arc::new(Fixed(NOW)))
        .on_event(move |e| {
            if let sturdy::core::events::Event::WebhookReceived { status, route, .. } = e {
                s2.lock()
                    .unwrap()
                    .push((route.to_string(), status.as_u16()));
            }
        });
    let app = Router::new().route("/wh", post_service(receiver));
    let req = || {
        std_req(
            "msg_ev",
            &NOW.to_string(),
            &signed("msg_ev", NOW, b"{}"),
            "{}",
        )
    };
    send(&app, req()).await;
    send(&app, req()).await;
    send(&app, std_req("msg_ev", &NOW.to_string(), "v1,AAAA", "{}")).await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            ("standard".to_string(), 200),
            ("standard".to_string(), 200),
            ("standard".to_string(), 401)
        ]
    );
}

#[tokio::test]
async fn declared_content_length_over_the_limit_is_413_before_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (queue, _events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(standard(), queue).with_body_limit(100);
    let addr = serve(Router::new().route("/wh", post_service(receiver))).await;
    let ts = wall_now();
    let sig = signed("msg_cl", ts, b"");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /wh HTTP/1.1\r\nhost: x\r\nwebhook-id: msg_cl\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\ncontent-length: 1000000000\r\n\r\n0123456789"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The sender announced 1 GB and then stalls: the answer must not wait for the body.
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
        .await
        .expect("answered without waiting for the announced body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test]
async fn idempotency_declared_content_length_over_the_limit_is_413_at_once() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = Router::new()
        .route("/orders", axum::routing::post(|| async { "ok" }))
        .layer(
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
                .with_body_limit(100),
        );
    let addr = serve(app).await;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\nidempotency-key: k-cl\r\ncontent-length: 1000000000\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
        .await
        .expect("answered without waiting for the announced body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

#[tokio::test]
async fn extra_spaces_between_signature_entries_are_skipped_like_the_reference() {
    let (app, _events) = standard_app(NOW);
    let sig = signed("msg_sp", NOW, b"{}");
    let header = format!("v1,AAAA  {sig}");
    let (status, _) = send(&app, std_req("msg_sp", &NOW.to_string(), &header, "{}")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an empty entry between two spaces is skipped"
    );
}
