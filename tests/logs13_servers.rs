//! The server side's `tracing` events, responses and `Debug`: webhook receivers (their secrets,
//! the MACs they expect), the idempotency layer scoping by credentials, and the Redis backends
//! with a password in their URL, reachable, then gone.
#![cfg(feature = "full")]

use crate::logs13_common;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::BodyExt;
use logs13_common::{b64, clean, closed_port, whole, Capture};
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, GenericHmac, MemoryQueue, StandardWebhooks, Stripe,
    WebhookReceiver,
};
use tower::ServiceExt;

const NOW: i64 = 1_700_000_000;
const STRIPE: &str = "whsec_StripeSecret13";
const GENERIC: &str = "GenericSecret13";

#[derive(Debug)]
struct Fixed;
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW as u64)
    }
}

fn standard_raw() -> String {
    b64(b"StandardSecret13-32-bytes-long!!")
}

async fn deliver<S>(rx: &S, headers: &[(&str, String)], body: &'static [u8]) -> String
where
    S: tower::Service<
            Request<Body>,
            Response = http::Response<http_body_util::Full<Bytes>>,
            Error = std::convert::Infallible,
        > + Clone,
{
    let mut b = Request::post("/hook");
    for (k, v) in headers {
        b = b.header(*k, HeaderValue::from_str(v).unwrap());
    }
    let res = rx
        .clone()
        .oneshot(b.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    format!("{parts:?} {}", String::from_utf8_lossy(&body))
}

/// Stripe, Standard Webhooks and a generic HMAC: valid, tampered, stale and malformed
/// deliveries. Neither the secret nor the MAC the receiver expected shows in an event, a
/// response or `Debug`.
#[tokio::test(flavor = "current_thread")]
async fn webhook_receivers_log_no_secret_and_no_expected_mac() {
    let capture = Capture::default();
    let _guard = capture.install();
    let good: &[u8] = br#"{"id":"evt_13","type":"ping"}"#;
    let tampered: &[u8] = br#"{"id":"evt_13","type":"pong"}"#;
    let stale = NOW - 3_600;
    let whsec = format!("whsec_{}", standard_raw());
    let mut shown = Vec::new();
    let mut expected = Vec::new();

    // Stripe.
    let (q, _events) = MemoryQueue::new(16);
    let rx = WebhookReceiver::new(Stripe::new(STRIPE).unwrap(), q)
        .with_route("stripe")
        .with_clock(Arc::new(Fixed));
    shown.push(format!("{rx:?}"));
    let sig = |ts: i64, body: &[u8]| sign_stripe(STRIPE, ts, body);
    let v1 = |h: String| h.split("v1=").nth(1).unwrap().to_owned();
    expected.push(v1(sig(NOW, tampered)));
    expected.push(v1(sig(stale, good)));
    for (h, body) in [
        (sig(NOW, good), good),
        (sig(NOW, good), good),
        (sig(NOW, good), tampered),
        (sig(stale, good), good),
        (format!("t={NOW},v1=zz"), good),
    ] {
        shown.push(deliver(&rx, &[("stripe-signature", h)], body).await);
    }

    // Standard Webhooks.
    let (q, _events2) = MemoryQueue::new(16);
    let rx = WebhookReceiver::new(StandardWebhooks::new(&whsec).unwrap(), q)
        .with_route("standard")
        .with_clock(Arc::new(Fixed));
    shown.push(format!("{rx:?}"));
    let std_headers = |id: &str, ts: i64, sig: String| {
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ]
    };
    let strip = |s: String| s.trim_start_matches("v1,").to_owned();
    expected.push(strip(
        sign_standard(&whsec, "msg_13", NOW, tampered).unwrap(),
    ));
    expected.push(strip(sign_standard(&whsec, "msg_13", stale, good).unwrap()));
    expected.push(strip(sign_standard(&whsec, "msg_14", NOW, good).unwrap()));
    for (h, body) in [
        (
            std_headers(
                "msg_13",
                NOW,
                sign_standard(&whsec, "msg_13", NOW, good).unwrap(),
            ),
            good,
        ),
        (
            std_headers(
                "msg_13",
                NOW,
                sign_standard(&whsec, "msg_13", NOW, good).unwrap(),
            ),
            tampered,
        ),
        (
            std_headers(
                "msg_13",
                stale,
                sign_standard(&whsec, "msg_13", stale, good).unwrap(),
            ),
            good,
        ),
        // Signed for another id.
        (
            std_headers(
                "msg_14",
                NOW,
                sign_standard(&whsec, "msg_13", NOW, good).unwrap(),
            ),
            good,
        ),
    ] {
        shown.push(deliver(&rx, &h, body).await);
    }

    // A generic HMAC, hex over the body.
    let (q, _events3) = MemoryQueue::new(16);
    let rx = WebhookReceiver::new(
        GenericHmac::new("acme", HeaderName::from_static("x-acme-sig"), GENERIC).unwrap(),
        q,
    )
    .with_route("acme")
    .with_clock(Arc::new(Fixed));
    shown.push(format!("{rx:?}"));
    let hex = |body: &[u8]| {
        sign_github(GENERIC, body)
            .trim_start_matches("sha256=")
            .to_owned()
    };
    expected.push(hex(tampered));
    for (h, body) in [
        (hex(good), good),
        (hex(good), tampered),
        ("0".repeat(64), good),
    ] {
        shown.push(deliver(&rx, &[("x-acme-sig", h)], body).await);
    }

    let logs = capture.text();
    assert!(
        logs.contains("webhook rejected"),
        "events were captured: {logs}"
    );
    let mut secrets = vec![
        STRIPE.to_owned(),
        "StripeSecret13".to_owned(),
        standard_raw(),
        GENERIC.to_owned(),
    ];
    secrets.extend(expected);
    let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
    clean("logs", &logs, &refs);
    for s in &shown {
        clean("webhooks", s, &refs);
    }
}

const IDEM_BEARER: &str = "IdemBearer13";
const IDEM_COOKIE: &str = "IdemCookie13";
const IDEM_APIKEY: &str = "IdemApiKey13";

fn idem_request(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/orders")
        .header("idempotency-key", key)
        .header("authorization", format!("Bearer {IDEM_BEARER}"))
        .header("cookie", format!("session={IDEM_COOKIE}; theme=dark"))
        .header("x-api-key", IDEM_APIKEY)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

async fn read(res: http::Response<Body>) -> String {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    format!("{parts:?} {}", String::from_utf8_lossy(&body))
}

fn orders_app<L>(layer: L) -> axum::Router
where
    L: tower::Layer<axum::routing::Route> + Clone + Send + Sync + 'static,
    L::Service: tower::Service<Request<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as tower::Service<Request<Body>>>::Response: axum::response::IntoResponse + 'static,
    <L::Service as tower::Service<Request<Body>>>::Future: Send + 'static,
{
    use axum::routing::post;
    axum::Router::new()
        .route(
            "/orders",
            post(|body: String| async move { format!("created {}", body.len()) }),
        )
        .layer(layer)
}

/// The server idempotency layer scoping by `Authorization`, `Cookie` and `X-API-Key`: a first
/// call, a replay, a reuse with another body, a response over the limit.
#[tokio::test(flavor = "current_thread")]
async fn idempotency_scoped_by_credentials_logs_none_of_them() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
    let capture = Capture::default();
    let _guard = capture.install();
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let mut shown = vec![format!("{layer:?}")];
    let app = orders_app(layer);
    for (key, body) in [
        ("k-13", "{\"a\":1}"),
        ("k-13", "{\"a\":1}"),
        ("k-13", "{\"a\":2}"),
    ] {
        let res = app.clone().oneshot(idem_request(key, body)).await.unwrap();
        shown.push(read(res).await);
    }
    let small = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default())
        .with_response_limit(2);
    let app = orders_app(small);
    let res = app
        .clone()
        .oneshot(idem_request("k-14", "{\"a\":1}"))
        .await
        .unwrap();
    shown.push(read(res).await);
    let logs = capture.text();
    let all = [IDEM_BEARER, IDEM_COOKIE, IDEM_APIKEY];
    clean("logs", &logs, &all);
    for s in &shown {
        clean("idempotency", s, &all);
    }
}

const REDIS_PORT: u16 = 18700;
const REDIS_PW: &str = "RedisPw13abc";
const WRONG_PW: &str = "WrongPw13def";

struct RedisServer(std::process::Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_redis() -> RedisServer {
    let server = RedisServer(
        std::process::Command::new("redis-server")
            .args([
                "--port",
                &REDIS_PORT.to_string(),
                "--requirepass",
                REDIS_PW,
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", REDIS_PORT))
            .await
            .is_ok()
        {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis-server did not listen");
}

/// Redis backends whose URL holds a password: connect failures (a closed port, a wrong
/// password), `Debug` of the connected backends, then every layer using them once Redis is
/// gone.
#[tokio::test(flavor = "current_thread")]
async fn redis_urls_password_reaches_no_event_error_or_debug() {
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer};
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    use sturdy::redis::{RedisIdempotencyStore, RedisQuota, RedisStreamQueue};
    let capture = Capture::default();
    let _guard = capture.install();
    let mut server = Some(start_redis().await);
    let good = format!("redis://:{REDIS_PW}@127.0.0.1:{REDIS_PORT}/");
    let named = format!("redis://default:{REDIS_PW}@127.0.0.1:{REDIS_PORT}/0");
    let closed = closed_port();
    let mut shown = Vec::new();
    let quota = Quota::per_second(100).unwrap();

    for url in [
        format!("redis://:{REDIS_PW}@127.0.0.1:{closed}/"),
        format!("redis://:{WRONG_PW}@127.0.0.1:{REDIS_PORT}/"),
        format!("redis://user:{WRONG_PW}@127.0.0.1:{REDIS_PORT}/"),
    ] {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let mut v = Vec::new();
            if let Err(e) = RedisQuota::connect(&url, quota).await {
                v.push(whole(&*e));
            }
            if let Err(e) = RedisIdempotencyStore::connect(&url).await {
                v.push(whole(&*e));
            }
            if let Err(e) = RedisStreamQueue::connect(&url, "logs13").await {
                v.push(whole(&*e));
            }
            v
        })
        .await
        .expect("connects end");
        assert!(!r.is_empty(), "{url}: connects failed");
        shown.extend(r);
    }

    let rq = RedisQuota::connect(&good, quota).await.unwrap();
    let store = RedisIdempotencyStore::connect(&named).await.unwrap();
    let queue = RedisStreamQueue::connect(&good, "logs13").await.unwrap();
    shown.push(format!("{rq:?} {store:?} {queue:?}"));
    let consumer = sturdy::redis::RedisStreamConsumer::connect(
        &named,
        "logs13",
        "g13",
        "w13",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    shown.push(format!("{consumer:?}"));
    let conn = sturdy::redis::RedisConnection::connect(&good)
        .await
        .unwrap();
    shown.push(format!("{conn:?}"));

    let api = tower::service_fn(|_r: Request<http_body_util::Full<Bytes>>| async {
        Ok::<_, sturdy::core::BoxError>(http::Response::new(
            http_body_util::Full::<Bytes>::default(),
        ))
    });
    let rl = RateLimitLayer::new(quota).with_remote(Arc::new(rq));
    shown.push(format!("{rl:?}"));
    let client = sturdy::ClientBuilder::new().with_rate_limit(rl).build(api);
    let layer = IdempotencyLayer::new(store, ByCredentials::default());
    shown.push(format!("{layer:?}"));
    let app = orders_app(layer);
    let whsec = format!("whsec_{}", standard_raw());
    let rx = WebhookReceiver::new(StandardWebhooks::new(&whsec).unwrap(), queue)
        .with_clock(Arc::new(Fixed));
    shown.push(format!("{rx:?}"));
    let body: &[u8] = br#"{"id":"evt_r13"}"#;

    for round in 0..2 {
        if round == 1 {
            drop(server.take());
        }
        let get = Request::get("http://api.example.com/x")
            .body(http_body_util::Full::<Bytes>::default())
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), client.clone().oneshot(get)).await {
            Ok(Ok(res)) => shown.push(format!("{res:?}")),
            Ok(Err(e)) => shown.push(whole(&*e)),
            Err(_) => shown.push("rate limit timed out".into()),
        }
        match tokio::time::timeout(
            Duration::from_secs(10),
            app.clone()
                .oneshot(idem_request(&format!("r-{round}"), "{}")),
        )
        .await
        {
            Ok(res) => shown.push(read(res.unwrap()).await),
            Err(_) => shown.push("idempotency timed out".into()),
        }
        let id = format!("msg_r{round}");
        let h = vec![
            ("webhook-id", id.clone()),
            ("webhook-timestamp", NOW.to_string()),
            (
                "webhook-signature",
                sign_standard(&whsec, &id, NOW, body).unwrap(),
            ),
        ];
        let body: &'static [u8] = br#"{"id":"evt_r13"}"#;
        match tokio::time::timeout(Duration::from_secs(10), deliver(&rx, &h, body)).await {
            Ok(s) => shown.push(s),
            Err(_) => shown.push("webhook timed out".into()),
        }
    }
    let logs = capture.text();
    assert!(
        logs.contains("failed") || logs.contains("could not"),
        "store failures were logged: {logs}"
    );
    let all = [REDIS_PW, WRONG_PW];
    clean("logs", &logs, &all);
    for s in &shown {
        clean("redis", s, &all);
    }
}
