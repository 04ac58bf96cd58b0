//! Interop: `sturdy-webhook` verifying deliveries signed by the real sender libraries, the npm
//! packages `standardwebhooks` (`Webhook#sign`) and `stripe`
//! (`stripe.webhooks.generateTestHeaderString`), run through `interop/sign.js` with node.
//! `STURDY_INTEROP_NODE_DIR` names the directory holding `sign.js` and its `node_modules`.
//!
//! Also the public vectors of `/work/shared/vectors/STANDARDS.md` (Standard Webhooks SW-1 and
//! its negatives), checked against both the real library and sturdy.
use crate::interop_common;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post_service;
use axum::Router;
use http::{Request, StatusCode};
use interop_common::*;
use serde_json::json;
use sturdy::core::{SystemClock, WallClock};
use sturdy::webhook::{
    sign_standard, sign_stripe, MemoryQueue, MemoryReceiver, StandardWebhooks, Stripe,
    WebhookReceiver,
};
use tower::ServiceExt;

const NODE_DIR: &str = "STURDY_INTEROP_NODE_DIR";

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_OTHER: &str = "whsec_dGhlIG90aGVyIHNlY3JldCBvZiB0aGUgdGVzdHM=";
const STRIPE_SECRET: &str = "whsec_interop_stripe_endpoint_secret_1";
const STRIPE_OTHER: &str = "whsec_interop_stripe_endpoint_secret_2";

fn now() -> i64 {
    SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn standard_app(verifier: StandardWebhooks) -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(verifier, queue);
    (Router::new().route("/wh", post_service(receiver)), events)
}

fn stripe_app(verifier: Stripe) -> (Router, MemoryReceiver) {
    let (queue, events) = MemoryQueue::new(100);
    let receiver = WebhookReceiver::new(verifier, queue);
    (Router::new().route("/wh", post_service(receiver)), events)
}

async fn deliver_standard(
    app: &Router,
    id: &str,
    ts: i64,
    signature: &str,
    body: &str,
) -> StatusCode {
    let req = Request::post("/wh")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

async fn deliver_stripe(app: &Router, signature: &str, body: &str) -> StatusCode {
    let req = Request::post("/wh")
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

fn payloads() -> Vec<String> {
    vec![
        r#"{"type":"invoice.paid","data":{"amount":1200}}"#.to_string(),
        "{\n  \"type\": \"user.created\",\n  \"name\": \"Zoë 漢字 🎉\"\n}\n".to_string(),
        "not json at all, with a trailing space ".to_string(),
        // Over the receiver's 64 KiB offload threshold.
        format!(r#"{{"type":"bulk","data":"{}"}}"#, "x".repeat(200 * 1024)),
    ]
}

/// The real library's signatures verify; the events carry the id, timestamp and exact body.
#[tokio::test]
async fn standard_webhooks_library_signatures_verify() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let bodies = payloads();
    let cases: Vec<_> = bodies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            json!({"scheme": "standard", "secret": SW_SECRET, "id": format!("msg_interop_{i}"), "timestamp": ts, "payload": p})
        })
        .collect();
    let sigs = sign(&dir, &json!(cases));
    let (app, mut events) = standard_app(StandardWebhooks::new(SW_SECRET).unwrap());
    for (i, (body, sig)) in bodies.iter().zip(&sigs).enumerate() {
        // sturdy's own signer agrees with the library byte for byte.
        let ours =
            sign_standard(SW_SECRET, &format!("msg_interop_{i}"), ts, body.as_bytes()).unwrap();
        assert_eq!(
            &ours, sig,
            "sign_standard matches the library for payload {i}"
        );
        let status = bounded(
            Duration::from_secs(10),
            "delivery",
            deliver_standard(&app, &format!("msg_interop_{i}"), ts, sig, body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "payload {i}");
        let event = events.try_recv().expect("queued");
        assert_eq!(event.id, format!("msg_interop_{i}"));
        assert_eq!(event.timestamp, Some(ts));
        assert_eq!(event.body.as_ref(), body.as_bytes());
    }
    // A redelivery (same id, same signature) is acknowledged and not queued again.
    let status = deliver_standard(&app, "msg_interop_0", ts, &sigs[0], &bodies[0]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(events.try_recv().is_none(), "a duplicate is not queued");
}

/// Tampered bodies, a wrong secret, an old or future timestamp, a swapped id: all rejected.
#[tokio::test]
async fn standard_webhooks_rejections() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let body = r#"{"type":"invoice.paid","amount":1200}"#;
    let cases = json!([
        {"scheme": "standard", "secret": SW_SECRET, "id": "msg_a", "timestamp": ts, "payload": body},
        {"scheme": "standard", "secret": SW_OTHER, "id": "msg_b", "timestamp": ts, "payload": body},
        {"scheme": "standard", "secret": SW_SECRET, "id": "msg_c", "timestamp": ts - 600, "payload": body},
        {"scheme": "standard", "secret": SW_SECRET, "id": "msg_d", "timestamp": ts + 600, "payload": body},
    ]);
    let sigs = sign(&dir, &cases);
    let (app, mut events) = standard_app(StandardWebhooks::new(SW_SECRET).unwrap());
    let tampered = body.replace("1200", "9200");
    assert_eq!(
        deliver_standard(&app, "msg_a", ts, &sigs[0], &tampered).await,
        StatusCode::UNAUTHORIZED,
        "tampered body"
    );
    assert_eq!(
        deliver_standard(&app, "msg_a", ts, &sigs[0], &format!("{body} ")).await,
        StatusCode::UNAUTHORIZED,
        "one trailing space"
    );
    assert_eq!(
        deliver_standard(&app, "msg_other", ts, &sigs[0], body).await,
        StatusCode::UNAUTHORIZED,
        "another id under the same signature"
    );
    assert_eq!(
        deliver_standard(&app, "msg_a", ts + 1, &sigs[0], body).await,
        StatusCode::UNAUTHORIZED,
        "another timestamp under the same signature"
    );
    assert_eq!(
        deliver_standard(&app, "msg_b", ts, &sigs[1], body).await,
        StatusCode::UNAUTHORIZED,
        "signed with another secret"
    );
    assert_eq!(
        deliver_standard(&app, "msg_c", ts - 600, &sigs[2], body).await,
        StatusCode::UNAUTHORIZED,
        "10 minutes old"
    );
    assert_eq!(
        deliver_standard(&app, "msg_d", ts + 600, &sigs[3], body).await,
        StatusCode::UNAUTHORIZED,
        "10 minutes ahead"
    );
    assert!(events.try_recv().is_none(), "nothing queued");
    // The untampered one still passes.
    assert_eq!(
        deliver_standard(&app, "msg_a", ts, &sigs[0], body).await,
        StatusCode::OK
    );
}

/// Rotation: a receiver with the old and the new secret accepts either; a header listing an
/// old signature, an asymmetric `v1a` entry and the new one passes.
#[tokio::test]
async fn standard_webhooks_rotation_and_mixed_entries() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let body = r#"{"type":"rotated"}"#;
    let cases = json!([
        {"scheme": "standard", "secret": SW_SECRET, "id": "msg_r", "timestamp": ts, "payload": body},
        {"scheme": "standard", "secret": SW_OTHER, "id": "msg_r", "timestamp": ts, "payload": body},
        {"scheme": "standard", "secret": SW_OTHER, "id": "msg_s", "timestamp": ts, "payload": body},
    ]);
    let sigs = sign(&dir, &cases);
    let (app, mut events) =
        standard_app(StandardWebhooks::with_secrets([SW_SECRET, SW_OTHER]).unwrap());
    assert_eq!(
        deliver_standard(&app, "msg_s", ts, &sigs[2], body).await,
        StatusCode::OK
    );
    assert!(events.try_recv().is_some());
    let (app, mut events) = standard_app(StandardWebhooks::new(SW_OTHER).unwrap());
    let header = format!(
        "{} v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5BdqzCInXqYXFymVJaA7AZdpXwVLPo3mNl8EM+m7TBAg== {}",
        sigs[0], sigs[1]
    );
    assert_eq!(
        deliver_standard(&app, "msg_r", ts, &header, body).await,
        StatusCode::OK
    );
    assert!(events.try_recv().is_some());
}

/// The secret without its `whsec_` prefix, as the library also takes it.
#[tokio::test]
async fn standard_webhooks_secret_without_prefix() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let bare = SW_SECRET.strip_prefix("whsec_").unwrap();
    let body = r#"{"type":"bare"}"#;
    let sigs = sign(
        &dir,
        &json!([{"scheme": "standard", "secret": bare, "id": "msg_bare", "timestamp": ts, "payload": body}]),
    );
    let (app, _events) = standard_app(StandardWebhooks::new(bare).unwrap());
    assert_eq!(
        deliver_standard(&app, "msg_bare", ts, &sigs[0], body).await,
        StatusCode::OK
    );
}

/// SW-1 from the public vectors: the library reproduces it, and sturdy verifies it (with a
/// tolerance wide enough for its 2021 timestamp); the SW-neg values are refused.
#[tokio::test]
async fn standard_webhooks_public_vectors() {
    let dir = peer_or_skip!(NODE_DIR);
    let (id, ts, payload) = (
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1_614_265_330_i64,
        r#"{"test": 2432232314}"#,
    );
    let expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    let sigs = sign(
        &dir,
        &json!([{"scheme": "standard", "secret": SW_SECRET, "id": id, "timestamp": ts, "payload": payload}]),
    );
    assert_eq!(sigs[0], expected, "the library reproduces SW-1");
    let wide = Duration::from_secs((now() - ts + 3_600) as u64);
    let (app, _events) = standard_app(
        StandardWebhooks::new(SW_SECRET)
            .unwrap()
            .with_tolerance(wide),
    );
    assert_eq!(
        deliver_standard(&app, id, ts, expected, payload).await,
        StatusCode::OK
    );
    let (app, _events) = standard_app(
        StandardWebhooks::new(SW_SECRET)
            .unwrap()
            .with_tolerance(wide),
    );
    for bad in [
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
        "v1,dawfeoifkpqwoekfpqoekf",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLawdd",
        "v1,",
        "v1,g0hM9",
    ] {
        let status = deliver_standard(&app, id, ts, bad, payload).await;
        assert!(
            status == StatusCode::UNAUTHORIZED || status == StatusCode::BAD_REQUEST,
            "{bad}: {status}"
        );
    }
    // Over the public SW-1 vector, with the default 5-minute tolerance: too old.
    let (app, _events) = standard_app(StandardWebhooks::new(SW_SECRET).unwrap());
    assert_eq!(
        deliver_standard(&app, id, ts, expected, payload).await,
        StatusCode::UNAUTHORIZED
    );
}

/// Stripe's library signatures verify (the secret used as is, `whsec_` included); sturdy's
/// `sign_stripe` matches it; Stripe's retries of one event (new timestamp) are deduplicated on
/// the body's id.
#[tokio::test]
async fn stripe_library_signatures_verify() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let event = r#"{"id":"evt_interop_1","object":"event","type":"payment_intent.succeeded"}"#;
    let mut bodies = payloads();
    bodies.push(event.to_string());
    let mut cases: Vec<_> = bodies
        .iter()
        .map(
            |p| json!({"scheme": "stripe", "secret": STRIPE_SECRET, "timestamp": ts, "payload": p}),
        )
        .collect();
    // Stripe's retry of the same event, signed later.
    cases.push(
        json!({"scheme": "stripe", "secret": STRIPE_SECRET, "timestamp": ts + 5, "payload": event}),
    );
    let sigs = sign(&dir, &json!(cases));
    let (app, mut events) = stripe_app(Stripe::new(STRIPE_SECRET).unwrap());
    for (i, (body, sig)) in bodies.iter().zip(&sigs).enumerate() {
        assert_eq!(
            &sign_stripe(STRIPE_SECRET, ts, body.as_bytes()),
            sig,
            "sign_stripe matches the library for payload {i}"
        );
        let status = bounded(
            Duration::from_secs(10),
            "delivery",
            deliver_stripe(&app, sig, body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "payload {i}");
        let e = events.try_recv().expect("queued");
        assert_eq!(e.body.as_ref(), body.as_bytes());
        assert_eq!(e.timestamp, Some(ts));
    }
    assert_eq!(
        deliver_stripe(&app, &sigs[bodies.len()], event).await,
        StatusCode::OK
    );
    assert!(
        events.try_recv().is_none(),
        "the retry of evt_interop_1 is a duplicate"
    );
}

/// Tampered, wrong secret, old, future: rejected. A header with two `v1` entries (Stripe sends
/// one per active secret during a roll) and a `v0` entry passes when one matches.
#[tokio::test]
async fn stripe_rejections_and_rolled_secrets() {
    let dir = peer_or_skip!(NODE_DIR);
    let ts = now();
    let body = r#"{"id":"evt_interop_2","object":"event","type":"charge.refunded"}"#;
    let cases = json!([
        {"scheme": "stripe", "secret": STRIPE_SECRET, "timestamp": ts, "payload": body},
        {"scheme": "stripe", "secret": STRIPE_OTHER, "timestamp": ts, "payload": body},
        {"scheme": "stripe", "secret": STRIPE_SECRET, "timestamp": ts - 600, "payload": body},
        {"scheme": "stripe", "secret": STRIPE_SECRET, "timestamp": ts + 600, "payload": body},
    ]);
    let sigs = sign(&dir, &cases);
    let (app, mut events) = stripe_app(Stripe::new(STRIPE_SECRET).unwrap());
    let tampered = body.replace("refunded", "captured");
    assert_eq!(
        deliver_stripe(&app, &sigs[0], &tampered).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        deliver_stripe(&app, &sigs[1], body).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        deliver_stripe(&app, &sigs[2], body).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        deliver_stripe(&app, &sigs[3], body).await,
        StatusCode::UNAUTHORIZED
    );
    // A timestamp edited in the header.
    let edited = sigs[0].replacen(&format!("t={ts}"), &format!("t={}", ts + 1), 1);
    assert_eq!(
        deliver_stripe(&app, &edited, body).await,
        StatusCode::UNAUTHORIZED
    );
    assert!(events.try_recv().is_none());

    // Both secrets' signatures in one header, plus a v0 entry: the receiver knowing either passes.
    let other_v1 = sigs[1].split(",v1=").nth(1).unwrap();
    let rolled = format!(
        "{},v1={other_v1},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39",
        sigs[0]
    );
    let (app, mut events) = stripe_app(Stripe::new(STRIPE_OTHER).unwrap());
    assert_eq!(deliver_stripe(&app, &rolled, body).await, StatusCode::OK);
    assert!(events.try_recv().is_some());
    let (app, _events) = stripe_app(Stripe::with_secrets([STRIPE_SECRET, STRIPE_OTHER]).unwrap());
    assert_eq!(deliver_stripe(&app, &sigs[1], body).await, StatusCode::OK);
}
