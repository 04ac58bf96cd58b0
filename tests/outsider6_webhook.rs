//! Outside tests of sturdy-webhook against docs/guides/webhooks.md and the rustdoc of
//! `sturdy_webhook`: the oldest and newest timestamps a sender can write, extreme tolerances and
//! dedup TTLs, clocks before 1970, a queue that fails, a body that breaks mid-read, offloaded
//! verification on a current-thread runtime, and the cost of huge signature values.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;
use http::header::HeaderName;
use http::{Request, StatusCode};
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, BoxFuture, EventQueue, GenericHmac, GitHub,
    MemoryQueue, Push, StandardWebhooks, Stripe, WebhookEvent, WebhookReceiver,
};
use tower::ServiceExt;

const NOW: i64 = 1_700_000_000;
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Debug)]
struct Fixed(SystemTime);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn at(secs: i64) -> Arc<Fixed> {
    Arc::new(Fixed(UNIX_EPOCH + Duration::from_secs(secs as u64)))
}

async fn send<Q: EventQueue>(
    rx: &WebhookReceiver<Q>,
    headers: &[(&str, String)],
    body: impl Into<Body>,
) -> (StatusCode, Option<String>) {
    let mut b = Request::post("/hook");
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    let res = rx
        .clone()
        .oneshot(b.body(body.into()).unwrap())
        .await
        .unwrap();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (res.status(), retry)
}

fn stripe_hex(secret: &str, t: i64, body: &[u8]) -> String {
    sign_stripe(secret, t, body)
        .split(',')
        .find_map(|p| p.strip_prefix("v1="))
        .unwrap()
        .to_owned()
}

/// The oldest and newest timestamps a sender can write: `i64::MIN`, `i64::MAX`, and values past
/// them. "400 for missing or malformed headers, 401 for a stale or future timestamp": never 200,
/// never a panic (an overflow in `now - t`), for every scheme with a timestamp.
#[tokio::test]
async fn the_oldest_and_newest_timestamps_are_refused_without_panicking() {
    let body = r#"{"id":"evt_1"}"#;
    let stamps = [
        i64::MIN.to_string(),
        (i64::MIN + 1).to_string(),
        i64::MAX.to_string(),
        "-9223372036854775809".to_owned(),
        "9223372036854775808".to_owned(),
        "18446744073709551616".to_owned(),
        "0".to_owned(),
        "-0".to_owned(),
    ];
    for t in &stamps {
        // Stripe.
        let (q, mut events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(Stripe::new("sk_test").unwrap(), q).with_clock(at(NOW));
        let v1 = stripe_hex("sk_test", NOW, body.as_bytes());
        let (st, _) = send(&rx, &[("stripe-signature", format!("t={t},v1={v1}"))], body).await;
        assert!(st == 400 || st == 401, "stripe t={t}: {st}");
        assert!(events.try_recv().is_none());
        // Standard Webhooks.
        let (q, mut events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(at(NOW));
        let sig = sign_standard(WHSEC, "msg_1", NOW, body.as_bytes()).unwrap();
        let (st, _) = send(
            &rx,
            &[
                ("webhook-id", "msg_1".to_owned()),
                ("webhook-timestamp", t.clone()),
                ("webhook-signature", sig),
            ],
            body,
        )
        .await;
        assert!(st == 400 || st == 401, "standard t={t}: {st}");
        assert!(events.try_recv().is_none());
        // A generic scheme with a timestamp header.
        let (q, mut events) = MemoryQueue::new(10);
        let v = GenericHmac::new(
            "acme",
            HeaderName::from_static("x-acme-signature"),
            "sekret",
        )
        .unwrap()
        .with_timestamp_header(HeaderName::from_static("x-acme-timestamp"));
        let rx = WebhookReceiver::new(v, q).with_clock(at(NOW));
        let (st, _) = send(
            &rx,
            &[
                (
                    "x-acme-signature",
                    stripe_hex("sekret", NOW, body.as_bytes()),
                ),
                ("x-acme-timestamp", t.clone()),
            ],
            body,
        )
        .await;
        assert!(st == 400 || st == 401, "generic t={t}: {st}");
        assert!(events.try_recv().is_none());
    }
}

/// A tolerance of `Duration::MAX` ("both directions") and extreme timestamps: no overflow panic
/// when the receiver works out until when to remember the id ("the signed timestamp plus the
/// tolerance"), and a copy is still a duplicate.
#[tokio::test]
async fn a_huge_tolerance_does_not_overflow() {
    for t in [NOW, i64::MAX, 0, i64::MIN + 1] {
        let (q, mut events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(
            Stripe::new("sk_test")
                .unwrap()
                .with_tolerance(Duration::MAX),
            q,
        )
        .with_clock(at(NOW));
        let body = format!(r#"{{"id":"evt_{t}"}}"#);
        let sig = sign_stripe("sk_test", t, body.as_bytes());
        let (st, _) = send(&rx, &[("stripe-signature", sig.clone())], body.clone()).await;
        assert!(
            st == 200 || st == 400 || st == 401,
            "stripe t={t}, tolerance MAX: {st}"
        );
        if st == 200 {
            assert!(events.try_recv().is_some());
            let (st, _) = send(&rx, &[("stripe-signature", sig)], body).await;
            assert_eq!(st, 200);
            assert!(
                events.try_recv().is_none(),
                "t={t}: a copy was queued twice"
            );
        }
        let (q, _events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(
            StandardWebhooks::new(WHSEC)
                .unwrap()
                .with_tolerance(Duration::MAX),
            q,
        )
        .with_clock(at(NOW));
        let sig = sign_standard(WHSEC, "msg_x", t, b"{}").unwrap();
        let (st, _) = send(
            &rx,
            &[
                ("webhook-id", "msg_x".to_owned()),
                ("webhook-timestamp", t.to_string()),
                ("webhook-signature", sig),
            ],
            "{}",
        )
        .await;
        assert!(
            st == 200 || st == 400 || st == 401,
            "standard t={t}, tolerance MAX: {st}"
        );
    }
}

/// A tolerance of zero: exactly now is fresh, one second off either way is not.
#[tokio::test]
async fn a_zero_tolerance_accepts_exactly_now() {
    for (t, ok) in [(NOW, true), (NOW - 1, false), (NOW + 1, false)] {
        let (q, _events) = MemoryQueue::new(10);
        let rx = WebhookReceiver::new(
            Stripe::new("sk_test")
                .unwrap()
                .with_tolerance(Duration::ZERO),
            q,
        )
        .with_clock(at(NOW));
        let body = format!(r#"{{"id":"evt_{t}"}}"#);
        let sig = sign_stripe("sk_test", t, body.as_bytes());
        let (st, _) = send(&rx, &[("stripe-signature", sig)], body).await;
        assert_eq!(st == 200, ok, "t = now {:+}: {st}", t - NOW);
    }
}

/// `with_dedup_ttl(Duration::MAX)`: "How long dedup keys are remembered" — forever is a fair
/// thing to ask; no overflow panic, and a copy is refused.
#[tokio::test]
async fn a_dedup_ttl_of_duration_max_does_not_overflow() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q)
        .with_dedup_ttl(Duration::MAX)
        .with_clock(at(NOW));
    let body = r#"{"zen":"x"}"#;
    let sig = sign_github("gh-secret", body.as_bytes());
    let (st, _) = send(&rx, &[("x-hub-signature-256", sig.clone())], body).await;
    assert_eq!(st, 200);
    assert!(events.try_recv().is_some());
    let (st, _) = send(&rx, &[("x-hub-signature-256", sig)], body).await;
    assert_eq!(st, 200);
    assert!(events.try_recv().is_none());
    // And with a signed timestamp: the larger of the TTL and timestamp + tolerance.
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(Stripe::new("sk_test").unwrap(), q)
        .with_dedup_ttl(Duration::MAX)
        .with_clock(at(NOW));
    let body = r#"{"id":"evt_ttl"}"#;
    let sig = sign_stripe("sk_test", NOW, body.as_bytes());
    let (st, _) = send(&rx, &[("stripe-signature", sig.clone())], body).await;
    assert_eq!(st, 200);
    assert!(events.try_recv().is_some());
    let (st, _) = send(&rx, &[("stripe-signature", sig)], body).await;
    assert_eq!(st, 200);
    assert!(events.try_recv().is_none());
}

/// A clock before 1970 (a badly set machine): deliveries are refused as from the future, nothing
/// panics.
#[tokio::test]
async fn a_clock_before_1970_refuses_without_panicking() {
    let (q, mut events) = MemoryQueue::new(10);
    let clock = Arc::new(Fixed(UNIX_EPOCH - Duration::from_secs(86_400)));
    let rx = WebhookReceiver::new(Stripe::new("sk_test").unwrap(), q).with_clock(clock);
    let body = r#"{"id":"evt_1"}"#;
    let sig = sign_stripe("sk_test", NOW, body.as_bytes());
    let (st, _) = send(&rx, &[("stripe-signature", sig)], body).await;
    assert_eq!(st, 401);
    assert!(events.try_recv().is_none());
    // A clock far in the future, past what i64 seconds can say.
    let (q, _events) = MemoryQueue::new(10);
    let far = UNIX_EPOCH.checked_add(Duration::from_secs(u64::MAX / 2));
    if let Some(far) = far {
        let rx = WebhookReceiver::new(Stripe::new("sk_test").unwrap(), q)
            .with_clock(Arc::new(Fixed(far)));
        let sig = sign_stripe("sk_test", NOW, body.as_bytes());
        let (st, _) = send(&rx, &[("stripe-signature", sig)], body).await;
        assert_eq!(st, 401);
    }
}

/// A queue that fails (a store that is down).
#[derive(Debug, Default)]
struct Broken {
    pushes: AtomicUsize,
}

impl EventQueue for Broken {
    fn push(&self, _event: WebhookEvent, _ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        self.pushes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err("store down".into()) })
    }
}

/// lib.rs: "queues it, and answers 2xx only once it is queued". A queue that fails gets no 2xx
/// (the sender redelivers), and the answer does not leak the store's error.
#[tokio::test]
async fn a_failing_queue_is_never_acknowledged() {
    let q = Arc::new(Broken::default());
    #[derive(Debug)]
    struct Shared(Arc<Broken>);
    impl EventQueue for Shared {
        fn push(&self, e: WebhookEvent, ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
            self.0.push(e, ttl)
        }
    }
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), Shared(q.clone()));
    let body = r#"{"zen":"y"}"#;
    let sig = sign_github("gh-secret", body.as_bytes());
    for _ in 0..2 {
        let res = rx
            .clone()
            .oneshot(
                Request::post("/hook")
                    .header("x-hub-signature-256", sig.clone())
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let st = res.status();
        assert!(!st.is_success(), "{st}");
        assert!(st.is_server_error(), "{st}: the sender should redeliver");
        let text = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert!(!String::from_utf8_lossy(&text).contains("store down"));
    }
    // The id was not remembered: the redelivery reached the queue again.
    assert_eq!(q.pushes.load(Ordering::SeqCst), 2);
}

/// A body that breaks mid-read (the sender hung up): not queued, not acknowledged with 200.
#[tokio::test]
async fn a_body_that_breaks_mid_read_is_not_queued() {
    let (q, mut events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q);
    let body = r#"{"zen":"z"}"#;
    let sig = sign_github("gh-secret", body.as_bytes());
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"zen\"")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "gone",
        )),
    ];
    let broken = Body::from_stream(futures_util::stream::iter(chunks));
    let res = rx
        .clone()
        .oneshot(
            Request::post("/hook")
                .header("x-hub-signature-256", sig)
                .body(broken)
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(!res.status().is_success(), "{}", res.status());
    assert!(events.try_recv().is_none());
}

/// "Inside a tokio runtime, a body over 64 KiB (`with_offload_above`) is verified with
/// `tokio::task::spawn_blocking`": on a current-thread runtime too, and with a threshold of 0.
#[tokio::test(flavor = "current_thread")]
async fn offloaded_verification_works_on_a_current_thread_runtime() {
    for offload in [0usize, 1024, usize::MAX] {
        let (q, mut events) = MemoryQueue::new(10);
        let rx =
            WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q).with_offload_above(offload);
        let body = vec![b'a'; 200 * 1024];
        let sig = sign_github("gh-secret", &body);
        let (st, _) = send(&rx, &[("x-hub-signature-256", sig)], body).await;
        assert_eq!(st, 200, "offload above {offload}");
        assert!(events.try_recv().is_some());
    }
}

/// "A delivery without well-formed, fresh signature headers costs no body read" and the header
/// scan stays cheap: a 1 MiB GitHub signature value, a 1 MiB Standard Webhooks header of one
/// entry, and a 1 MiB generic signature, each answered quickly.
#[tokio::test]
async fn huge_signature_values_are_refused_quickly() {
    let huge_hex = format!("sha256={}", "ab".repeat(512 * 1024));
    let (q, _e) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q);
    let start = tokio::time::Instant::now();
    let (st, _) = send(&rx, &[("x-hub-signature-256", huge_hex.clone())], "{}").await;
    assert!(st == 400 || st == 401, "{st}");
    let (q, _e) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), q).with_clock(at(NOW));
    let (st, _) = send(
        &rx,
        &[
            ("webhook-id", "m".to_owned()),
            ("webhook-timestamp", NOW.to_string()),
            ("webhook-signature", format!("v1,{}", "A".repeat(1 << 20))),
        ],
        "{}",
    )
    .await;
    assert!(st == 400 || st == 401, "{st}");
    let (q, _e) = MemoryQueue::new(10);
    let v = GenericHmac::new("acme", HeaderName::from_static("x-sig"), "sekret").unwrap();
    let rx = WebhookReceiver::new(v, q);
    let (st, _) = send(&rx, &[("x-sig", "0".repeat(1 << 20))], "{}").await;
    assert!(st == 400 || st == 401, "{st}");
    // Three 1 MiB values in a debug build: a scan that were quadratic in them would take hours,
    // so a generous bound that a loaded machine keeps.
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// The receiver is `Clone + Send + Sync` and its error type is `Infallible` ("every outcome is a
/// response"); under `Buffer(1)` and `ConcurrencyLimit(1)`, a kept service answers many
/// deliveries in a row.
#[tokio::test]
async fn a_kept_receiver_under_buffer_and_a_limit_of_one() {
    use tower::Service;
    fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}
    let (q, mut events) = MemoryQueue::new(100);
    let rx = WebhookReceiver::new(GitHub::new("gh-secret").unwrap(), q);
    assert_send_sync_clone(&rx);
    let _: fn(
        &mut WebhookReceiver<MemoryQueue>,
        Request<Body>,
    ) -> <WebhookReceiver<MemoryQueue> as Service<Request<Body>>>::Future = Service::call;
    let mut svc = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(rx);
    for i in 0..20 {
        let body = format!(r#"{{"n":{i}}}"#);
        let sig = sign_github("gh-secret", body.as_bytes());
        let req = Request::post("/hook")
            .header("x-hub-signature-256", sig)
            .body(Body::from(body))
            .unwrap();
        let res =
            tokio::time::timeout(Duration::from_secs(2), svc.ready().await.unwrap().call(req))
                .await
                .expect("a kept receiver hung")
                .unwrap();
        assert_eq!(res.status(), 200);
    }
    let mut n = 0;
    while events.try_recv().is_some() {
        n += 1;
    }
    assert_eq!(n, 20);
}
