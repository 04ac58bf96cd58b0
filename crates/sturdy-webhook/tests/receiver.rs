//! The receiver: dedup, fast acknowledgement with a slow handler, a full queue, limits, and a
//! real loopback delivery.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::routing::post_service;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sturdy_core::clock::ManualClock;
use sturdy_webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use tokio::time::Instant;
use tower::ServiceExt;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: u64 = 1_700_000_000;

fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::at(
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
    ))
}

fn delivery(id: &str, body: &str) -> Request<Body> {
    Request::post("/webhooks/standard")
        .header("webhook-id", id)
        .header("webhook-timestamp", NOW.to_string())
        .header(
            "webhook-signature",
            sign_standard(SECRET, id, NOW as i64, body.as_bytes()).unwrap(),
        )
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn app(queue: MemoryQueue) -> Router {
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue)
        .with_clock(clock())
        .with_body_limit(1024);
    Router::new().route("/webhooks/standard", post_service(receiver))
}

async fn text(res: http::Response<Body>) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn the_same_event_delivered_20_times_concurrently_is_processed_once() {
    let (queue, mut events) = MemoryQueue::new(100);
    let app = app(queue);
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(app.clone().oneshot(delivery("msg_1", "{\"n\":1}"))))
        .collect();
    let mut bodies = Vec::new();
    for c in calls {
        let res = c.await.unwrap().unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        bodies.push(text(res).await);
    }
    assert_eq!(bodies.iter().filter(|b| *b == "ok").count(), 1);
    assert_eq!(bodies.iter().filter(|b| *b == "duplicate").count(), 19);
    let e = events.recv().await.unwrap();
    assert_eq!(e.id, "msg_1");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), events.recv())
            .await
            .is_err(),
        "nothing else queued"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_handler_does_not_slow_the_acknowledgement_and_nothing_is_lost() {
    let (queue, mut events) = MemoryQueue::new(100);
    let app = app(queue);
    let processed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let p = processed.clone();
    let worker = tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            tokio::time::sleep(Duration::from_secs(8)).await; // the handler's real work
            p.lock().unwrap().push(e.id);
        }
    });
    let start = Instant::now();
    for i in 0..10 {
        let t = Instant::now();
        let res = app
            .clone()
            .oneshot(delivery(&format!("msg_{i}"), "{}"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "acknowledged without waiting for the handler"
        );
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(8 * 10 + 1)).await;
    let done = processed.lock().unwrap().clone();
    assert_eq!(
        done,
        (0..10).map(|i| format!("msg_{i}")).collect::<Vec<_>>()
    );
    worker.abort();
}

#[tokio::test]
async fn a_full_queue_answers_503_and_the_redelivery_is_accepted_later() {
    let (queue, mut events) = MemoryQueue::new(2);
    let app = app(queue);
    for i in 0..2 {
        assert_eq!(
            app.clone()
                .oneshot(delivery(&format!("m{i}"), "{}"))
                .await
                .unwrap()
                .status(),
            StatusCode::OK
        );
    }
    let res = app.clone().oneshot(delivery("m2", "{}")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "5");
    events.recv().await.unwrap();
    // The refused event was not remembered as seen: its redelivery is queued, not "duplicate".
    let res = app.clone().oneshot(delivery("m2", "{}")).await.unwrap();
    assert_eq!(text(res).await, "ok");
}

#[tokio::test]
async fn rejections_say_only_invalid_signature() {
    let (queue, _events) = MemoryQueue::new(10);
    let app = app(queue);
    let mut tampered = delivery("m", "{\"amount\":1}");
    *tampered.body_mut() = Body::from("{\"amount\":9}");
    let res = app.clone().oneshot(tampered).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(text(res).await, "invalid signature");

    let missing = Request::post("/webhooks/standard")
        .body(Body::from("{}"))
        .unwrap();
    let res = app.clone().oneshot(missing).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(text(res).await, "invalid signature");

    let stale = Request::post("/webhooks/standard")
        .header("webhook-id", "m")
        .header("webhook-timestamp", (NOW - 600).to_string())
        .header(
            "webhook-signature",
            sign_standard(SECRET, "m", NOW as i64 - 600, b"{}").unwrap(),
        )
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(stale).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    let big = "x".repeat(2_000);
    let res = app.oneshot(delivery("m", &big)).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn delivered_over_loopback() {
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue);
    let app = Router::new().route("/webhooks/standard", post_service(receiver));
    let served = sturdy_chaos::serve(app, sturdy_chaos::Faults::default())
        .await
        .unwrap();
    let now = sturdy_core::WallClock::now(&sturdy_core::SystemClock)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let body = "{\"type\":\"order.paid\"}";
    let req = Request::post(served.url("/webhooks/standard"))
        .header("webhook-id", "msg_wire")
        .header("webhook-timestamp", now.to_string())
        .header(
            "webhook-signature",
            sign_standard(SECRET, "msg_wire", now as i64, body.as_bytes()).unwrap(),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let res = sturdy_chaos::http_client().request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let e = events.recv().await.unwrap();
    assert_eq!((e.id.as_str(), &e.body[..]), ("msg_wire", body.as_bytes()));
}
