//! How long a copy is refused, at the far ends of the tolerance: a tolerance of
//! `Duration::MAX` ("tolerance disabled", as in stripe-go's `ts=12345` vector) with an old or
//! negative signed timestamp, on paused time with a wall clock that moves with it.
#![cfg(feature = "full")]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use http::Request;
use sturdy::core::WallClock;
use sturdy::webhook::{
    sign_standard, sign_stripe, MemoryQueue, MemoryReceiver, StandardWebhooks, Stripe, Verifier,
    WebhookReceiver,
};
use tower::ServiceExt;

use crate::hooks31_util::{at, STD_SECRET, STRIPE_SECRET};

/// A wall clock that moves with tokio's (paused) clock.
#[derive(Debug)]
struct Moving {
    origin: SystemTime,
    start: tokio::time::Instant,
}

impl WallClock for Moving {
    fn now(&self) -> SystemTime {
        self.origin + self.start.elapsed()
    }
}

const NOW: i64 = 1_800_000_000;

fn drain(rx: &mut MemoryReceiver) -> usize {
    std::iter::from_fn(|| rx.try_recv()).count()
}

async fn deliver_stripe<Q: sturdy::webhook::EventQueue>(r: &WebhookReceiver<Q>, ts: i64) -> u16 {
    let body = "{\"id\":\"evt_hooks31_old\"}";
    let req = Request::post("/wh")
        .header(
            "stripe-signature",
            sign_stripe(STRIPE_SECRET, ts, body.as_bytes()),
        )
        .body(Body::from(body))
        .unwrap();
    r.clone().oneshot(req).await.unwrap().status().as_u16()
}

async fn deliver_standard<Q: sturdy::webhook::EventQueue>(r: &WebhookReceiver<Q>, ts: i64) -> u16 {
    let body = "{}";
    let req = Request::post("/wh")
        .header("webhook-id", "msg_hooks31_old")
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            sign_standard(STD_SECRET, "msg_hooks31_old", ts, body.as_bytes()).unwrap(),
        )
        .body(Body::from(body))
        .unwrap();
    r.clone().oneshot(req).await.unwrap().status().as_u16()
}

/// The guide: with a signed timestamp, a copy is refused "as long as the copy would pass the
/// timestamp check. The dedup key is kept at least until the timestamp plus the tolerance plus
/// one second ... whatever the dedup TTL". With the tolerance disabled (`Duration::MAX`), a
/// delivery signed at `t=12345` (stripe-go's vector), at 0 or at -1 passes the check forever,
/// so its copy must never be queued again; here the copy a dedup TTL (1 s) later is.
#[tokio::test(start_paused = true)]
async fn hooks31_a_disabled_tolerance_keeps_old_timestamps_deduplicated() {
    for ts in [12_345i64, 0, -1, NOW - 40 * 365 * 86_400] {
        let clock = || {
            Arc::new(Moving {
                origin: at(NOW, 0),
                start: tokio::time::Instant::now(),
            })
        };
        let (q, mut rx) = MemoryQueue::new(10);
        let stripe = WebhookReceiver::new(
            Stripe::new(STRIPE_SECRET)
                .unwrap()
                .with_tolerance(Duration::MAX),
            q,
        )
        .with_dedup_ttl(Duration::from_secs(1))
        .with_clock(clock());
        let (q2, mut rx2) = MemoryQueue::new(10);
        let standard = WebhookReceiver::new(
            StandardWebhooks::new(STD_SECRET)
                .unwrap()
                .with_tolerance(Duration::MAX),
            q2,
        )
        .with_dedup_ttl(Duration::from_secs(1))
        .with_clock(clock());
        assert_eq!(deliver_stripe(&stripe, ts).await, 200);
        assert_eq!(deliver_standard(&standard, ts).await, 200);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            deliver_stripe(&stripe, ts).await,
            200,
            "the copy still verifies"
        );
        assert_eq!(deliver_standard(&standard, ts).await, 200);
        assert_eq!(
            drain(&mut rx),
            1,
            "stripe, t={ts}: the copy was queued again"
        );
        assert_eq!(
            drain(&mut rx2),
            1,
            "standard, t={ts}: the copy was queued again"
        );
    }
}

/// The same through the verifier alone: `fresh_until` is documented as "Until when the
/// verifier would accept this same delivery again"; with `Duration::MAX` the verifier accepts
/// the delivery at any later time, so `fresh_until` must not be before the time of the check.
#[test]
fn hooks31_fresh_until_is_not_in_the_past_for_a_delivery_still_accepted() {
    let v = Stripe::new(STRIPE_SECRET)
        .unwrap()
        .with_tolerance(Duration::MAX);
    let body = b"{\"id\":\"evt_x\"}";
    let mut h = http::HeaderMap::new();
    h.insert(
        "stripe-signature",
        sign_stripe(STRIPE_SECRET, 12_345, body).parse().unwrap(),
    );
    let now = at(NOW, 0);
    let out = v.verify(&h, body, now).unwrap();
    let later = at(NOW + 86_400 * 365, 0);
    assert!(v.verify(&h, body, later).is_ok(), "accepted a year later");
    let fresh = out.fresh_until.expect("a timestamp");
    assert!(
        fresh >= later,
        "fresh_until {fresh:?} is before {later:?}, when it is still accepted"
    );
}

/// The same with the Redis queue, over real time: a dedup TTL of 1 s, the tolerance disabled,
/// a delivery signed at `t=12345`; its copy 1.5 s later still verifies and is appended to the
/// stream a second time.
#[tokio::test]
async fn hooks31_a_disabled_tolerance_keeps_old_timestamps_deduplicated_in_redis() {
    let Some(url) = crate::hooks31_util::redis_url() else {
        return;
    };
    let s = crate::hooks31_util::unique("maxtol");
    let q = sturdy::redis::RedisStreamQueue::connect(&url, &s)
        .await
        .unwrap();
    let r = WebhookReceiver::new(
        Stripe::new(STRIPE_SECRET)
            .unwrap()
            .with_tolerance(Duration::MAX),
        q,
    )
    .with_dedup_ttl(Duration::from_secs(1));
    assert_eq!(deliver_stripe(&r, 12_345).await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(deliver_stripe(&r, 12_345).await, 200);
    assert_eq!(
        crate::hooks31_util::redis_cli(&url, &["XLEN", &s]),
        "1",
        "the copy was appended again"
    );
}
