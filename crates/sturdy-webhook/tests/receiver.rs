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
use sturdy_webhook::{sign_standard, EventQueue, MemoryQueue, StandardWebhooks, WebhookReceiver};
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

async fn text<B>(res: http::Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
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
async fn a_body_stream_that_fails_is_unreadable_not_an_invalid_signature() {
    let (queue, mut events) = MemoryQueue::new(10);
    let app = app(queue);
    let signed = delivery("m-broken", "{\"amount\":1}");
    let (parts, _) = signed.into_parts();
    let res = app
        .oneshot(Request::from_parts(parts, Body::new(Broken)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(text(res).await, "unreadable body");
    assert!(events.try_recv().is_none(), "nothing queued");
}

/// A body whose first frame is an error (a sender's stream cut mid-body).
struct Broken;

impl http_body::Body for Broken {
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        std::task::Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the sender went away",
        ))))
    }
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

// ===== Hostile input: cost, replays, sources =====

mod hostile {
    use super::*;

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::task::{Context, Poll};
    use std::thread::ThreadId;

    use axum::extract::ConnectInfo;
    use bytes::Bytes;
    use http::HeaderMap;
    use http_body::Frame;
    use sturdy_webhook::{
        sign_github, sign_stripe, GenericHmac, GitHub, Rejection, SourceAllowlist, Stripe,
        Verified, Verifier,
    };

    /// A body that records whether anyone tried to read it, and never ends.
    struct Untouched(Arc<AtomicBool>);

    impl http_body::Body for Untouched {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.store(true, Ordering::SeqCst);
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_without_valid_signature_headers_is_refused_before_its_body_is_read() {
        let (queue, _events) = MemoryQueue::new(10);
        let receiver =
            WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue).with_clock(clock());
        let stale = (NOW - 3_600).to_string();
        let cases: [&[(&str, &str)]; 3] = [
            &[],
            &[
                ("webhook-id", "m"),
                ("webhook-timestamp", "soon"),
                ("webhook-signature", "v1,AAAA"),
            ],
            &[
                ("webhook-id", "m"),
                ("webhook-timestamp", &stale),
                ("webhook-signature", "v1,AAAA"),
            ],
        ];
        for headers in cases {
            let read = Arc::new(AtomicBool::new(false));
            let mut req = Request::post("/").body(Untouched(read.clone())).unwrap();
            for (k, v) in headers {
                req.headers_mut().insert(*k, v.parse().unwrap());
            }
            let res = tokio::time::timeout(Duration::from_secs(30), receiver.clone().oneshot(req))
                .await
                .expect("answered without waiting for the body")
                .unwrap();
            assert!(res.status().is_client_error(), "{headers:?}");
            assert!(!read.load(Ordering::SeqCst), "body polled for {headers:?}");
        }
    }

    /// Standard Webhooks, recording the thread each verification ran on.
    #[derive(Debug)]
    struct Recording {
        inner: StandardWebhooks,
        threads: Arc<Mutex<Vec<ThreadId>>>,
    }

    impl Verifier for Recording {
        fn scheme(&self) -> &'static str {
            "standard"
        }

        fn verify(
            &self,
            headers: &HeaderMap,
            body: &[u8],
            now: SystemTime,
        ) -> Result<Verified, Rejection> {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            self.inner.verify(headers, body, now)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_large_body_is_verified_off_the_runtime_thread() {
        let threads = Arc::new(Mutex::new(Vec::new()));
        let (queue, mut events) = MemoryQueue::new(10);
        let verifier = Recording {
            inner: StandardWebhooks::new(SECRET).unwrap(),
            threads: threads.clone(),
        };
        let receiver = WebhookReceiver::new(verifier, queue)
            .with_clock(clock())
            .with_body_limit(1024 * 1024);
        let small = "s".repeat(1_000);
        let large = "l".repeat(200 * 1024);
        for (id, body) in [("small", &small), ("large", &large)] {
            let res = receiver.clone().oneshot(delivery(id, body)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(events.recv().await.unwrap().id, id);
        }
        let runtime = std::thread::current().id();
        let seen = threads.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], runtime, "a small body is verified in place");
        assert_ne!(
            seen[1], runtime,
            "a large body is verified on the blocking pool"
        );
    }

    fn github(delivery_id: &str, body: &str) -> Request<Body> {
        Request::post("/webhooks/github")
            .header("x-hub-signature-256", sign_github("gh", body.as_bytes()))
            .header("x-github-event", "issues")
            .header("x-github-delivery", delivery_id)
            .header("x-github-hook-id", "42")
            .body(Body::from(body.to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn a_github_delivery_resent_under_a_new_delivery_id_is_a_duplicate() {
        let (queue, mut events) = MemoryQueue::new(10);
        let app = Router::new().route(
            "/webhooks/github",
            post_service(WebhookReceiver::new(GitHub::new("gh").unwrap(), queue)),
        );
        let body = r#"{"action":"opened","issue":{"number":1}}"#;
        let first = app.clone().oneshot(github("d-1", body)).await.unwrap();
        assert_eq!(text(first).await, "ok");
        for copy in ["d-2", "d-3", "anything"] {
            let res = app.clone().oneshot(github(copy, body)).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(text(res).await, "duplicate", "{copy}");
        }
        let e = events.recv().await.unwrap();
        // What the handler needs: GitHub's headers, as sent.
        assert_eq!(e.headers["x-github-event"], "issues");
        assert_eq!(e.headers["x-github-delivery"], "d-1");
        assert_eq!(e.headers["x-github-hook-id"], "42");
        assert_eq!(e.timestamp, None);
        assert!(events.try_recv().is_none(), "queued once");
        // Another event is not a duplicate.
        let other = app
            .oneshot(github("d-9", r#"{"action":"closed"}"#))
            .await
            .unwrap();
        assert_eq!(text(other).await, "ok");
    }

    #[tokio::test]
    async fn a_generic_delivery_resent_under_a_new_event_id_header_is_a_duplicate() {
        let (queue, mut events) = MemoryQueue::new(10);
        let generic = GenericHmac::new("acme", "x-acme-signature".parse().unwrap(), "k")
            .unwrap()
            .with_prefix("sha256=")
            .with_event_header("x-acme-event-id".parse().unwrap());
        let receiver = WebhookReceiver::new(generic, queue);
        let body = "{}";
        let sig = sign_github("k", body.as_bytes());
        for (i, id) in ["e-1", "e-2"].iter().enumerate() {
            let req = Request::post("/")
                .header("x-acme-signature", &sig)
                .header("x-acme-event-id", *id)
                .body(Body::from(body))
                .unwrap();
            let res = receiver.clone().oneshot(req).await.unwrap();
            assert_eq!(text(res).await, ["ok", "duplicate"][i]);
        }
        let e = events.recv().await.unwrap();
        assert_eq!(e.headers["x-acme-event-id"], "e-1");
        assert!(events.try_recv().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_is_refused_for_as_long_as_its_timestamp_would_pass() {
        let (queue, mut events) = MemoryQueue::new(10);
        let wall = clock();
        let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue)
            .with_clock(wall.clone())
            .with_dedup_ttl(Duration::from_secs(1));
        let res = receiver
            .clone()
            .oneshot(delivery("m1", "{}"))
            .await
            .unwrap();
        assert_eq!(text(res).await, "ok");
        // Well past the dedup TTL, still within the 5-minute tolerance.
        tokio::time::advance(Duration::from_secs(299)).await;
        wall.advance(Duration::from_secs(299));
        let res = receiver
            .clone()
            .oneshot(delivery("m1", "{}"))
            .await
            .unwrap();
        assert_eq!(text(res).await, "duplicate");
        // Once the timestamp is stale the copy is refused by the signature check instead.
        tokio::time::advance(Duration::from_secs(2)).await;
        wall.advance(Duration::from_secs(2));
        let res = receiver.oneshot(delivery("m1", "{}")).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        events.recv().await.unwrap();
        assert!(events.try_recv().is_none());
    }

    /// A queue whose pushes reach the memory queue `delay` after the receiver made them, as a
    /// slow round trip to Redis would.
    #[derive(Debug, Clone)]
    struct SlowQueue {
        inner: MemoryQueue,
        delay_ms: Arc<std::sync::atomic::AtomicU64>,
    }

    impl EventQueue for SlowQueue {
        fn push(
            &self,
            event: sturdy_webhook::WebhookEvent,
            dedup_ttl: Duration,
        ) -> sturdy_webhook::BoxFuture<Result<sturdy_webhook::Push, sturdy_core::BoxError>>
        {
            let inner = self.inner.clone();
            let delay =
                Duration::from_millis(self.delay_ms.load(std::sync::atomic::Ordering::SeqCst));
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                inner.push(event, dedup_ttl).await
            })
        }
    }

    /// A copy checked against the clock in the last instant of its window, whose push reaches
    /// the queue after the window ended, still finds the first delivery's key (however short the
    /// dedup TTL): it is a duplicate, not a second event.
    #[tokio::test(start_paused = true)]
    async fn a_copy_checked_at_the_end_of_the_window_that_reaches_the_queue_after_it_is_a_duplicate(
    ) {
        let (queue, mut events) = MemoryQueue::new(10);
        let wall = clock();
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let slow = SlowQueue {
            inner: queue,
            delay_ms: delay_ms.clone(),
        };
        let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), slow)
            .with_clock(wall.clone())
            .with_dedup_ttl(Duration::from_millis(1));
        let res = receiver
            .clone()
            .oneshot(delivery("edge", "{}"))
            .await
            .unwrap();
        assert_eq!(text(res).await, "ok");
        // 300.9 s after the signed time ("300 s old": within the 5-minute tolerance), on both
        // clocks; the copy's push then takes 5 s to reach the queue.
        let at = Duration::from_millis(300_900);
        tokio::time::advance(at).await;
        wall.advance(at);
        delay_ms.store(5_000, std::sync::atomic::Ordering::SeqCst);
        let res = receiver
            .clone()
            .oneshot(delivery("edge", "{}"))
            .await
            .unwrap();
        assert_eq!(text(res).await, "duplicate");
        events.recv().await.unwrap();
        assert!(events.try_recv().is_none(), "queued twice");
    }

    #[tokio::test]
    async fn events_carry_the_verified_timestamp_and_routes_have_their_own_id_space() {
        let (queue, mut events) = MemoryQueue::new(10);
        let make = |route: &str| {
            WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue.clone())
                .with_clock(clock())
                .with_route(route)
        };
        let app = Router::new()
            .route("/a", post_service(make("tenant-a")))
            .route("/b", post_service(make("tenant-b")));
        for path in ["/a", "/b"] {
            let mut req = delivery("msg_same", "{}");
            *req.uri_mut() = path.parse().unwrap();
            assert_eq!(text(app.clone().oneshot(req).await.unwrap()).await, "ok");
        }
        let a = events.recv().await.unwrap();
        let b = events.recv().await.unwrap();
        assert_eq!(
            (a.route.as_str(), b.route.as_str()),
            ("tenant-a", "tenant-b")
        );
        for e in [&a, &b] {
            assert_eq!((e.scheme.as_str(), e.id.as_str()), ("standard", "msg_same"));
            assert_eq!(e.timestamp, Some(NOW as i64));
            assert_eq!(e.headers["webhook-id"], "msg_same");
            assert_eq!(e.headers["webhook-timestamp"], NOW.to_string());
        }
        // Within one route the id is still a duplicate.
        let mut req = delivery("msg_same", "{}");
        *req.uri_mut() = "/a".parse().unwrap();
        assert_eq!(text(app.oneshot(req).await.unwrap()).await, "duplicate");
    }

    #[tokio::test]
    async fn a_stripe_event_and_a_standard_event_with_one_id_do_not_collide() {
        let (queue, mut events) = MemoryQueue::new(10);
        let stripe =
            WebhookReceiver::new(Stripe::new("k").unwrap(), queue.clone()).with_clock(clock());
        let body = r#"{"id":"evt_1"}"#;
        let req = Request::post("/")
            .header(
                "stripe-signature",
                sign_stripe("k", NOW as i64, body.as_bytes()),
            )
            .body(Body::from(body))
            .unwrap();
        assert_eq!(text(stripe.oneshot(req).await.unwrap()).await, "ok");
        let sw =
            WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue).with_clock(clock());
        assert_eq!(
            text(sw.oneshot(delivery("evt_1", body)).await.unwrap()).await,
            "ok"
        );
        assert_eq!(events.recv().await.unwrap().scheme, "stripe");
        assert_eq!(events.recv().await.unwrap().scheme, "standard");
    }

    fn from(peer: &str, xff: Option<&str>) -> Request<Body> {
        let mut req = delivery("msg_src", "{}");
        req.extensions_mut()
            .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
        if let Some(v) = xff {
            req.headers_mut()
                .insert("x-forwarded-for", v.parse().unwrap());
        }
        req
    }

    #[tokio::test]
    async fn only_allowlisted_sources_are_queued_and_forwarded_headers_only_count_from_trusted_proxies(
    ) {
        let (queue, mut events) = MemoryQueue::new(10);
        let list = SourceAllowlist::new(["192.30.252.0/22", "2a0a:a440::/29"])
            .unwrap()
            .with_trusted_proxies(["10.0.0.0/8"])
            .unwrap();
        let receiver = WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue)
            .with_clock(clock())
            .with_source_allowlist(list);
        let denied = [
            // Straight from an attacker, forging the header: the header is not read.
            from("203.0.113.9:5000", Some("192.30.252.10")),
            from("[2001:db8::1]:443", Some("2a0a:a440::1")),
            // Through our proxy, the attacker's forged entry on the left: the right-most
            // untrusted address is the attacker.
            from("10.0.0.1:5000", Some("192.30.252.10, 203.0.113.9")),
            // Through our proxy without a header: the proxy itself is the source.
            from("10.0.0.1:5000", None),
            // An unreadable entry: unknown source.
            from("10.0.0.1:5000", Some("unknown")),
            // No peer address at all: fail closed.
            delivery("msg_src", "{}"),
        ];
        for req in denied {
            let res = receiver.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::FORBIDDEN);
            assert_eq!(text(res).await, "forbidden");
        }
        assert!(events.try_recv().is_none(), "nothing denied is queued");
        for (i, req) in [
            from("192.30.252.10:5000", None),
            from("[2a0a:a440::1]:443", Some("203.0.113.9")),
            from("10.0.0.1:5000", Some("203.0.113.9, 192.30.253.1, 10.2.3.4")),
        ]
        .into_iter()
        .enumerate()
        {
            let res = receiver.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK, "case {i}");
        }
        assert_eq!(events.recv().await.unwrap().id, "msg_src");
    }

    #[tokio::test]
    async fn the_allowlist_uses_the_real_peer_address_over_loopback() {
        let (queue, mut events) = MemoryQueue::new(10);
        let make = |allowed: &str| {
            WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue.clone())
                .with_route(allowed.to_owned())
                .with_source_allowlist(SourceAllowlist::new([allowed]).unwrap())
        };
        let app = Router::new()
            .route("/loopback", post_service(make("127.0.0.0/8")))
            .route("/private", post_service(make("10.0.0.0/8")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });
        let now = sturdy_core::WallClock::now(&sturdy_core::SystemClock)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let send = |path: &str| {
            let sig = sign_standard(SECRET, "msg_wire", now as i64, b"{}").unwrap();
            Request::post(format!("http://{addr}{path}"))
                .header("webhook-id", "msg_wire")
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", sig)
                .header("x-forwarded-for", "10.1.2.3")
                .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
                .unwrap()
        };
        let client = sturdy_chaos::http_client();
        let res = client.request(send("/private")).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::FORBIDDEN,
            "a forged header does not help"
        );
        let res = client.request(send("/loopback")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(events.recv().await.unwrap().route, "127.0.0.0/8");
        assert!(events.try_recv().is_none());
        server.abort();
    }

    #[tokio::test]
    async fn setters_work_on_a_clone_and_change_that_clone_only() {
        let (queue, _events) = MemoryQueue::new(10);
        let original =
            WebhookReceiver::new(StandardWebhooks::new(SECRET).unwrap(), queue).with_clock(clock());
        let kept = original.clone();
        let small = original
            .with_body_limit(10)
            .with_dedup_ttl(Duration::from_secs(1))
            .with_route("other")
            .with_offload_above(0);
        let body = "x".repeat(100);
        let res = small.oneshot(delivery("m", &body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let res = kept.oneshot(delivery("m", &body)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    /// Collects what `tracing` writes.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rejection_reasons_go_to_tracing_and_never_to_the_caller_or_a_secret_anywhere() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        // A second subscriber registered for the whole process: while only one is, tracing-core
        // asks the default subscriber of whichever thread reaches a call site first, and a test
        // thread without one would mark the call site "never" for this test too.
        static KEPT: std::sync::OnceLock<tracing::Dispatch> = std::sync::OnceLock::new();
        KEPT.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
        let _guard = tracing::subscriber::set_default(subscriber);

        let (queue, _events) = MemoryQueue::new(10);
        let list = SourceAllowlist::new(["127.0.0.0/8"]).unwrap();
        let gh = WebhookReceiver::new(GitHub::new("gh-super-secret").unwrap(), queue.clone());
        let guarded = gh.clone().with_source_allowlist(list);
        let forged = Request::post("/")
            .header("x-hub-signature-256", sign_github("wrong", b"{}"))
            .body(Body::from("{}"))
            .unwrap();
        let res = gh.clone().oneshot(forged).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(text(res).await, "invalid signature");
        let unsigned = Request::post("/").body(Body::from("{}")).unwrap();
        let res = gh.clone().oneshot(unsigned).await.unwrap();
        assert_eq!(text(res).await, "invalid signature");
        let res = guarded.clone().oneshot(github("d", "{}")).await.unwrap();
        assert_eq!(text(res).await, "forbidden");

        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            logs.contains("X-Hub-Signature-256 does not match"),
            "{logs}"
        );
        assert!(
            logs.contains("missing x-hub-signature-256 header"),
            "{logs}"
        );
        assert!(logs.contains("peer address is unknown"), "{logs}");
        let debug = format!("{gh:?} {guarded:?} {queue:?}");
        for text in [&logs, &debug] {
            assert!(!text.contains("gh-super-secret"), "{text}");
        }
    }
}

#[test]
fn traits() {
    fn clone_send_sync<T: Clone + Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    clone_send_sync::<WebhookReceiver<MemoryQueue>>();
    clone_send_sync::<MemoryQueue>();
    clone_send_sync::<sturdy_webhook::SourceAllowlist>();
    send::<sturdy_webhook::ResponseFuture>();
}

#[test]
fn a_memory_queue_of_capacity_zero_holds_one_event_and_never_panics() {
    let (q, _rx) = MemoryQueue::new(0);
    assert!(format!("{q:?}").contains("capacity: 1"), "{q:?}");
}

/// "`usize::MAX` is as good as unbounded": the largest capacity is taken, not a panic (tokio's
/// channel panics past `usize::MAX >> 3`), and events go in and come out.
#[tokio::test]
async fn a_memory_queue_of_capacity_usize_max_works() {
    let (q, mut rx) = MemoryQueue::new(usize::MAX);
    for id in ["evt_1", "evt_2", "evt_1"] {
        q.push(
            sturdy_webhook::WebhookEvent::new("standard", id, bytes::Bytes::from_static(b"{}")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    assert_eq!(rx.try_recv().map(|e| e.id).as_deref(), Some("evt_1"));
    assert_eq!(rx.try_recv().map(|e| e.id).as_deref(), Some("evt_2"));
    assert!(rx.try_recv().is_none());
}
