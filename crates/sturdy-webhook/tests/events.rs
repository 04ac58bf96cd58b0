//! The receiver's events: every delivery's outcome (accepted, duplicate, rejected, queue full)
//! reaches the `on_event` callback and, with the `metrics` feature, a `metrics` recorder.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::routing::post_service;
use axum::Router;
use http::{Request, StatusCode};
use sturdy_core::clock::ManualClock;
use sturdy_core::events::{Event, WebhookOutcome};
use sturdy_webhook::{sign_standard, MemoryQueue, StandardWebhooks, WebhookReceiver};
use tower::ServiceExt;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: u64 = 1_700_000_000;

fn delivery(id: &str, body: &str, secret: &str) -> Request<Body> {
    Request::post("/webhooks/standard")
        .header("webhook-id", id)
        .header("webhook-timestamp", NOW.to_string())
        .header(
            "webhook-signature",
            sign_standard(secret, id, NOW as i64, body.as_bytes()).unwrap(),
        )
        .body(Body::from(body.to_owned()))
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn every_outcome_is_an_event_and_a_count() {
    #[cfg(feature = "metrics")]
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    #[cfg(feature = "metrics")]
    let snap = recorder.snapshotter();
    #[cfg(feature = "metrics")]
    let _guard = metrics::set_default_local_recorder(&recorder);

    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    // Room for two events: the third distinct one finds the queue full.
    let (queue, _events) = MemoryQueue::new(2);
    let clock = Arc::new(ManualClock::at(
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW),
    ));
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue)
        .with_clock(clock)
        .with_route("orders")
        .on_event(move |e| {
            if let Event::WebhookReceived {
                route,
                scheme,
                outcome,
                status,
            } = *e
            {
                s.lock()
                    .unwrap()
                    .push((route.to_owned(), scheme.to_owned(), outcome, status));
            }
        });
    let app = Router::new().route("/webhooks/standard", post_service(receiver));

    let other_secret = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    for (id, secret, expected) in [
        ("msg_1", SECRET, StatusCode::OK),
        ("msg_1", SECRET, StatusCode::OK),
        ("msg_2", other_secret, StatusCode::UNAUTHORIZED),
        ("msg_2", SECRET, StatusCode::OK),
        ("msg_3", SECRET, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let res = app
            .clone()
            .oneshot(delivery(id, "{\"n\":1}", secret))
            .await
            .unwrap();
        assert_eq!(res.status(), expected, "{id}");
    }

    use WebhookOutcome::{Accepted, Duplicate, QueueFull, Rejected};
    let outcomes: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(route, scheme, outcome, status)| {
            assert_eq!((route.as_str(), scheme.as_str()), ("orders", "standard"));
            (*outcome, status.as_u16())
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (Accepted, 200),
            (Duplicate, 200),
            (Rejected, 401),
            (Accepted, 200),
            (QueueFull, 503)
        ]
    );

    #[cfg(feature = "metrics")]
    {
        use metrics_util::debugging::DebugValue;
        let all = snap.snapshot().into_vec();
        let count = |outcome: &str| -> u64 {
            all.iter()
                .filter(|(k, ..)| {
                    let key = k.key();
                    key.name() == "sturdy.webhook.deliveries"
                        && key
                            .labels()
                            .any(|l| l.key() == "sturdy.webhook.outcome" && l.value() == outcome)
                        && key
                            .labels()
                            .any(|l| l.key() == "sturdy.webhook.route" && l.value() == "orders")
                })
                .map(|(.., v)| match v {
                    DebugValue::Counter(n) => *n,
                    other => panic!("{other:?}"),
                })
                .sum()
        };
        assert_eq!(count("accepted"), 2);
        assert_eq!(count("duplicate"), 1);
        assert_eq!(count("rejected"), 1);
        assert_eq!(count("queue_full"), 1);
    }
}
