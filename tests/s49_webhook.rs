//! Round s49b, outside tests of the webhook receiver inside axum, against docs/guides/webhooks.md
//! and the rustdoc of `sturdy_webhook`:
//!
//! - cancellation: a delivery dropped while its large body is verified on the blocking pool, or
//!   while its event is being pushed to a slow queue, is never acknowledged, and the sender's
//!   redelivery ends up queued exactly once ("200 only once the event is queued");
//! - a queue that fails answers 503 (`WebhookOutcome::QueueFailed`: "answered 503 so the sender
//!   delivers it again"), and the event callback reports the status sent;
//! - a burst of one delivery sent concurrently is queued once, every copy acknowledged;
//! - the cost claim ("one MAC per configured secret ... however many signature entries its
//!   header lists") with thousands of signature header *lines*, for every scheme;
//! - hostile generic timestamp headers are refused before the body is read;
//! - composition in an axum `Router` served on 127.0.0.1 with tower-http's timeout and body
//!   limit and tower's `GlobalConcurrencyLimitLayer`.
#![cfg(feature = "full")]

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cost_common::fastest;
use axum::body::Body;
use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use sturdy::core::events::{Event, WebhookOutcome};
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, BoxFuture, EventQueue, GenericHmac, GitHub,
    MemoryQueue, MemoryReceiver, Push, StandardWebhooks, Stripe, Verifier, WebhookEvent,
    WebhookReceiver,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const GH_SECRET: &str = "It's a Secret to Everybody";
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const NOW: i64 = 1_700_000_000;

#[derive(Debug)]
struct Fixed(SystemTime);

impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

fn drain(events: &mut MemoryReceiver) -> Vec<WebhookEvent> {
    let mut v = Vec::new();
    while let Some(e) = events.try_recv() {
        v.push(e);
    }
    v
}

fn github_req(body: &[u8]) -> Request<Body> {
    Request::post("/webhooks/github")
        .header("x-hub-signature-256", sign_github(GH_SECRET, body))
        .header("x-github-event", "push")
        .body(Body::from(body.to_vec()))
        .unwrap()
}

async fn answer<Q: EventQueue>(
    rx: &WebhookReceiver<Q>,
    req: Request<Body>,
) -> (StatusCode, HeaderMap, String) {
    let res = rx.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let text = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&text).into_owned(),
    )
}

/// Records every `WebhookReceived` event as (outcome, status).
#[derive(Clone, Default)]
struct Outcomes(Arc<Mutex<Vec<(WebhookOutcome, StatusCode)>>>);

impl Outcomes {
    fn hook(&self) -> impl Fn(&Event<'_>) + Send + Sync + 'static {
        let me = self.clone();
        move |e| {
            if let Event::WebhookReceived {
                outcome, status, ..
            } = e
            {
                me.0.lock().unwrap().push((*outcome, *status));
            }
        }
    }
    fn take(&self) -> Vec<(WebhookOutcome, StatusCode)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Guide, step 4: "a body over 64 KiB (`with_offload_above`) is verified with
/// `tokio::task::spawn_blocking`"; step 5: "200 only once the event is queued". A delivery
/// dropped (its sender hung up) while its 512 KiB body is being verified off the runtime is not
/// acknowledged; whatever the abandoned verification does later, the sender's redelivery is
/// acknowledged and the event reaches the worker exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s49_webhook_drop_mid_offloaded_verify_then_redelivery_is_queued_once() {
    let (q, mut events) = MemoryQueue::new(64);
    let rx = WebhookReceiver::new(GitHub::with_secrets([GH_SECRET, "b", "c"]).unwrap(), q);
    // A seeded body, different per round.
    let mut seed: u64 = 0x5eed_49b0;
    for round in 0..6u64 {
        let body: Vec<u8> = (0..512 * 1024)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                b'a' + (seed % 26) as u8
            })
            .collect();
        // Drop the delivery's future after a few polls (mid-verification, or earlier).
        let mut fut = Box::pin(rx.clone().oneshot(github_req(&body)));
        let polls = 1 + round as usize;
        for _ in 0..polls {
            let woke =
                std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
            if woke.is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(fut);
        // Let any abandoned work finish.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, _, _) = answer(&rx, github_req(&body)).await;
        assert_eq!(status, StatusCode::OK, "round {round}");
        let (status, _, _) = answer(&rx, github_req(&body)).await;
        assert_eq!(status, StatusCode::OK, "round {round}: the duplicate");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let got = drain(&mut events);
        assert_eq!(got.len(), 1, "round {round}: queued {} times", got.len());
        assert_eq!(got[0].body.len(), body.len());
    }
}

/// A queue whose `push` takes time: `Before` waits, then pushes (a push cut while waiting never
/// reached the queue); `After` pushes, then waits (the push committed, its answer is late, as a
/// Redis reply lost on the way back).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slow {
    Before,
    After,
    Fail,
}

#[derive(Debug, Clone)]
struct SlowQueue {
    inner: MemoryQueue,
    mode: Arc<Mutex<Slow>>,
    delay: Duration,
    pushes: Arc<AtomicUsize>,
}

impl EventQueue for SlowQueue {
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let me = self.clone();
        Box::pin(async move {
            me.pushes.fetch_add(1, Ordering::SeqCst);
            let mode = *me.mode.lock().unwrap();
            match mode {
                Slow::Before => {
                    tokio::time::sleep(me.delay).await;
                    me.inner.push(event, dedup_ttl).await
                }
                Slow::After => {
                    let r = me.inner.push(event, dedup_ttl).await;
                    tokio::time::sleep(me.delay).await;
                    r
                }
                Slow::Fail => Err("queue backend down (s49)".into()),
            }
        })
    }
}

/// "200 only once the event is queued": a delivery whose push is cut (a timeout above the
/// receiver drops it) is never answered 2xx; the redelivery is answered 200 and the worker gets
/// the event once, whether the cut push had reached the queue or not.
#[tokio::test(start_paused = true)]
async fn s49_webhook_cut_push_is_not_acked_and_redelivery_is_queued_once() {
    for mode in [Slow::Before, Slow::After] {
        let (inner, mut events) = MemoryQueue::new(16);
        let q = SlowQueue {
            inner,
            mode: Arc::new(Mutex::new(mode)),
            delay: Duration::from_secs(5),
            pushes: Arc::new(AtomicUsize::new(0)),
        };
        let outcomes = Outcomes::default();
        let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q.clone())
            .on_event(outcomes.hook());
        let body = format!("{{\"mode\":\"{mode:?}\"}}");
        let cut = tokio::time::timeout(
            Duration::from_secs(1),
            rx.clone().oneshot(github_req(body.as_bytes())),
        )
        .await;
        assert!(cut.is_err(), "{mode:?}: the push should still be running");
        assert_eq!(q.pushes.load(Ordering::SeqCst), 1, "{mode:?}");
        assert!(
            outcomes
                .take()
                .iter()
                .all(|(o, _)| *o != WebhookOutcome::Accepted),
            "{mode:?}: a cut delivery reported as accepted"
        );
        // The sender redelivers; this time it waits.
        let (status, _, _) = answer(&rx, github_req(body.as_bytes())).await;
        assert_eq!(status, StatusCode::OK, "{mode:?}");
        let got = drain(&mut events);
        assert_eq!(got.len(), 1, "{mode:?}: queued {} times", got.len());
        let o = outcomes.take();
        let expect = if mode == Slow::Before {
            WebhookOutcome::Accepted
        } else {
            WebhookOutcome::Duplicate
        };
        assert_eq!(o, vec![(expect, StatusCode::OK)], "{mode:?}");
    }
}

/// `WebhookOutcome::QueueFailed`: "Verified, but the queue failed: answered 503 so the sender
/// delivers it again"; the receiver's docs: "Every rejection answers a short generic text". The
/// failure's text (which may name a backend) is not sent; the callback reports the 503; when
/// the queue is back, the redelivery is queued.
#[tokio::test(start_paused = true)]
async fn s49_webhook_failing_queue_answers_503_and_redelivery_is_queued() {
    let (inner, mut events) = MemoryQueue::new(16);
    let q = SlowQueue {
        inner,
        mode: Arc::new(Mutex::new(Slow::Fail)),
        delay: Duration::ZERO,
        pushes: Arc::new(AtomicUsize::new(0)),
    };
    let outcomes = Outcomes::default();
    let rx =
        WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q.clone()).on_event(outcomes.hook());
    let body = b"{\"action\":\"queue-down\"}";
    let (status, _headers, text) = answer(&rx, github_req(body)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !text.contains("s49"),
        "the queue's error reached the sender: {text:?}"
    );
    assert!(text.len() < 64, "not a short generic text: {text:?}");
    assert_eq!(
        outcomes.take(),
        vec![(WebhookOutcome::QueueFailed, StatusCode::SERVICE_UNAVAILABLE)]
    );
    assert!(drain(&mut events).is_empty());
    *q.mode.lock().unwrap() = Slow::Before;
    let (status, _, _) = answer(&rx, github_req(body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1);
    assert_eq!(
        outcomes.take(),
        vec![(WebhookOutcome::Accepted, StatusCode::OK)]
    );
}

/// Step 5 and `EventQueue`: "of concurrent pushes of one key, exactly one is `Enqueued`". 64
/// copies of one Standard Webhooks delivery, sent at once from several tasks on two worker
/// threads: every copy is acknowledged with 200, the worker gets the event once, and the
/// callback says one accepted, 63 duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s49_webhook_concurrent_burst_of_one_delivery_is_queued_once() {
    let (q, mut events) = MemoryQueue::new(1024);
    let outcomes = Outcomes::default();
    let now = NOW;
    let rx = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(Arc::new(Fixed(at(now))))
        .on_event(outcomes.hook());
    for round in 0..5 {
        let id = format!("msg_burst_{round}");
        let body = format!("{{\"round\":{round}}}");
        let sig = sign_standard(SW_SECRET, &id, now, body.as_bytes()).unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(64));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (rx, id, sig, body, start) = (
                rx.clone(),
                id.clone(),
                sig.clone(),
                body.clone(),
                start.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let req = Request::post("/hook")
                    .header("webhook-id", id)
                    .header("webhook-timestamp", now.to_string())
                    .header("webhook-signature", sig)
                    .body(Body::from(body))
                    .unwrap();
                start.wait().await;
                rx.oneshot(req).await.unwrap().status()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
        assert_eq!(drain(&mut events).len(), 1, "round {round}");
        let o = outcomes.take();
        let accepted = o
            .iter()
            .filter(|(x, _)| *x == WebhookOutcome::Accepted)
            .count();
        let dup = o
            .iter()
            .filter(|(x, _)| *x == WebhookOutcome::Duplicate)
            .count();
        assert_eq!((accepted, dup), (1, 63), "round {round}: {o:?}");
    }
}

/// "A delivery costs one MAC per configured secret (one SHA-256 pass over the body each),
/// however many signature entries its header lists": the entries spread over 4,000 header
/// *lines* (each line one wrong signature) instead of one line, for every scheme, with a
/// 1 MiB body and three secrets. Checked loosely: under 3 times the cost of one line. A scheme
/// may refuse repeated lines outright (400), which costs nothing; none may answer 5xx.
#[test]
fn s49_webhook_thousands_of_signature_lines_cost_about_one() {
    let body = vec![b'q'; 1024 * 1024];
    let t = at(NOW);
    let lines = 4_000;
    type Build = Box<dyn Fn(usize) -> HeaderMap>;
    let wrong_hex = "ab".repeat(32);
    let cases: Vec<(&str, Box<dyn Verifier>, Build)> = vec![
        (
            "github",
            Box::new(GitHub::with_secrets([GH_SECRET, "s2", "s3"]).unwrap()),
            Box::new({
                let w = format!("sha256={wrong_hex}");
                move |n| {
                    let mut h = HeaderMap::new();
                    for _ in 0..n {
                        h.append("x-hub-signature-256", HeaderValue::from_str(&w).unwrap());
                    }
                    h
                }
            }),
        ),
        (
            "stripe",
            Box::new(Stripe::with_secrets(["a_s49", "b_s49", "c_s49"]).unwrap()),
            Box::new({
                let w = format!("t={NOW},v1={wrong_hex}");
                move |n| {
                    let mut h = HeaderMap::new();
                    for _ in 0..n {
                        h.append("stripe-signature", HeaderValue::from_str(&w).unwrap());
                    }
                    h
                }
            }),
        ),
        (
            "standard",
            Box::new(
                StandardWebhooks::with_secrets([
                    SW_SECRET,
                    "whsec_c2VjcmV0LXR3by1zNDktdGVzdC12YWx1ZQ==",
                    "whsec_c2VjcmV0LXRocmVlLXM0OS12YWx1ZXM=",
                ])
                .unwrap(),
            ),
            Box::new(|n| {
                let mut h = HeaderMap::new();
                h.insert("webhook-id", HeaderValue::from_static("msg_lines"));
                h.insert("webhook-timestamp", HeaderValue::from(NOW));
                for _ in 0..n {
                    h.append(
                        "webhook-signature",
                        HeaderValue::from_static("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="),
                    );
                }
                h
            }),
        ),
        (
            "generic",
            Box::new(
                GenericHmac::with_secrets(
                    "acme",
                    HeaderName::from_static("x-acme-signature"),
                    ["g1", "g2", "g3"],
                )
                .unwrap()
                .with_timestamp_header(HeaderName::from_static("x-acme-timestamp")),
            ),
            Box::new({
                let w = wrong_hex;
                move |n| {
                    let mut h = HeaderMap::new();
                    h.insert("x-acme-timestamp", HeaderValue::from(NOW));
                    for _ in 0..n {
                        h.append("x-acme-signature", HeaderValue::from_str(&w).unwrap());
                    }
                    h
                }
            }),
        ),
    ];
    for (name, v, build) in cases {
        let (one, many) = (build(1), build(lines));
        let r1 = v.verify(&one, &body, t);
        let rn = v.verify(&many, &body, t);
        let s1 = r1.expect_err("wrong signature accepted").status;
        let sn = rn.expect_err("wrong signatures accepted").status;
        assert!(
            s1.is_client_error() && sn.is_client_error(),
            "{name}: {s1} {sn}"
        );
        let t1 = fastest(5, || {
            let _ = v.verify(&one, &body, t);
        });
        let tn = fastest(5, || {
            let _ = v.verify(&many, &body, t);
        });
        assert!(
            tn < t1 * 3 + Duration::from_millis(2),
            "{name}: {lines} signature lines took {tn:?}, one line {t1:?}"
        );
    }
}

/// A body that records whether it was polled.
fn watched(polled: Arc<AtomicBool>) -> Body {
    let s = futures_util::stream::once(async move {
        polled.store(true, Ordering::SeqCst);
        Ok::<_, std::io::Error>(Bytes::from_static(b"{}"))
    });
    Body::from_stream(s)
}

/// Step 2: "400 for missing or malformed headers, 401 for a stale or future timestamp", checked
/// "before the body is read", for a generic scheme with a timestamp header: hostile values
/// (exponent forms, overflow, signs, fractions, hex, blanks, far past and future) are refused
/// with 400 or 401 without polling the body and without queueing.
#[tokio::test]
async fn s49_webhook_generic_hostile_timestamps_refused_before_the_body() {
    let (q, mut events) = MemoryQueue::new(16);
    let rx = WebhookReceiver::new(
        GenericHmac::new("acme", HeaderName::from_static("x-acme-signature"), "gs49")
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-acme-timestamp")),
        q,
    )
    .with_clock(Arc::new(Fixed(at(NOW))));
    let sig = "ab".repeat(32);
    let far_future = (NOW + 301).to_string();
    let far_past = (NOW - 301).to_string();
    let huge = "9".repeat(400);
    let values: Vec<(&str, &[u16])> = vec![
        ("1e30", &[400, 401]),
        ("1.7e9", &[400, 401]),
        ("-1", &[401]),
        ("-9223372036854775808", &[401]),
        ("9223372036854775807", &[401]),
        ("9223372036854775808", &[400, 401]),
        (&huge, &[400, 401]),
        ("0x6553f100", &[400]),
        ("", &[400]),
        ("abc", &[400]),
        ("1700000000.5", &[400, 401]),
        (&far_future, &[401]),
        (&far_past, &[401]),
    ];
    for (v, allowed) in values {
        let polled = Arc::new(AtomicBool::new(false));
        let req = Request::post("/hook")
            .header("x-acme-signature", sig.as_str())
            .header("x-acme-timestamp", v)
            .body(watched(polled.clone()))
            .unwrap();
        let (status, _, text) = answer(&rx, req).await;
        assert!(
            allowed.contains(&status.as_u16()),
            "timestamp {v:?}: {status} {text:?}"
        );
        assert!(!polled.load(Ordering::SeqCst), "timestamp {v:?}: body read");
    }
    // No timestamp header at all: a missing header, 400.
    let polled = Arc::new(AtomicBool::new(false));
    let req = Request::post("/hook")
        .header("x-acme-signature", sig.as_str())
        .body(watched(polled.clone()))
        .unwrap();
    assert_eq!(answer(&rx, req).await.0, StatusCode::BAD_REQUEST);
    assert!(!polled.load(Ordering::SeqCst));
    assert!(drain(&mut events).is_empty());
}

/// The Stripe scheme: "deduplicated on the `id` of the verified body (so Stripe's own retries,
/// which are signed again with a new timestamp, are recognised)". A Stripe event whose `id`
/// comes first and whose `data` nests deeper than a typical JSON parser's recursion limit
/// (200 levels): the event is the same, re-signed 10 s later; it must be a duplicate.
#[tokio::test]
async fn s49_webhook_stripe_deep_body_keeps_its_id() {
    let secret = "whsec_s49_deep";
    let (q, mut events) = MemoryQueue::new(16);
    let clock = Arc::new(sturdy::core::clock::ManualClock::at(at(NOW)));
    let rx = WebhookReceiver::new(Stripe::new(secret).unwrap(), q).with_clock(clock.clone());
    let depth = 200;
    let body = format!(
        "{{\"id\":\"evt_s49_deep\",\"object\":\"event\",\"data\":{}{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let send = |ts: i64| {
        Request::post("/hook")
            .header("stripe-signature", sign_stripe(secret, ts, body.as_bytes()))
            .body(Body::from(body.clone()))
            .unwrap()
    };
    assert_eq!(answer(&rx, send(NOW)).await.0, StatusCode::OK);
    clock.advance(Duration::from_secs(10));
    assert_eq!(answer(&rx, send(NOW + 10)).await.0, StatusCode::OK);
    let got = drain(&mut events);
    let ids: Vec<&str> = got.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["evt_s49_deep"],
        "a Stripe retry of a deep event was queued again, or the id is not the body's"
    );
}

/// Sends one raw HTTP/1.1 request on a fresh connection and returns the status (0 if the
/// connection closed without one).
async fn raw(addr: std::net::SocketAddr, head: &str, body: &[u8], pause: Option<Duration>) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    if let Some(p) = pause {
        // Half the body, then a pause, then the rest (a sender that trickles).
        let half = body.len() / 2;
        s.write_all(&body[..half]).await.unwrap();
        tokio::time::sleep(p).await;
        let _ = s.write_all(&body[half..]).await;
    } else {
        s.write_all(body).await.unwrap();
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Composition as the guide advises, on a real socket: the receiver mounted with
/// `post_service` in a `Router` under tower-http's `RequestBodyLimitLayer` (smaller than the
/// receiver's 1 MiB), its `TimeoutLayer` (the body read "has no time limit of the receiver's:
/// put a body timeout in front") and tower's `GlobalConcurrencyLimitLayer`. A delivery over the
/// outer limit gets 413, one that trickles past the timeout gets 408; neither is queued, and
/// the sender's redelivery of the trickled one is queued once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s49_webhook_in_router_under_tower_http_limits_on_a_socket() {
    let (q, mut events) = MemoryQueue::new(64);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q);
    fn assert_traits<T: Clone + Send + Sync + 'static>(_: &T) {}
    assert_traits(&rx);
    let app = axum::Router::new()
        .route("/webhooks/github", axum::routing::post_service(rx))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(4))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(4096))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_millis(300),
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service())
            .await
            .unwrap();
    });
    let head = |body: &[u8]| {
        format!(
            "POST /webhooks/github HTTP/1.1\r\nhost: x\r\nx-hub-signature-256: {}\r\n\
             x-github-event: push\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            sign_github(GH_SECRET, body),
            body.len()
        )
    };
    let big = vec![b'b'; 8192];
    assert_eq!(raw(addr, &head(&big), &big, None).await, 413);
    let body = b"{\"zen\":\"trickle s49\",\"pad\":\"..............................\"}".to_vec();
    assert_eq!(
        raw(addr, &head(&body), &body, Some(Duration::from_millis(800))).await,
        408
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        drain(&mut events).is_empty(),
        "a timed-out delivery was queued"
    );
    assert_eq!(raw(addr, &head(&body), &body, None).await, 200);
    assert_eq!(raw(addr, &head(&body), &body, None).await, 200);
    let got = drain(&mut events);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].headers["x-github-event"], "push");
    server.abort();
}

/// "The dedup key is kept at least until the timestamp plus the tolerance plus one second ...,
/// whatever the dedup TTL": with a timestamp 299 s in the *future* (accepted: the tolerance
/// holds "both directions"), that is 600 s from now. A copy sent 500 s later still passes the
/// timestamp check (it is 201 s old), so it must be refused as a duplicate, with a dedup TTL of
/// one second. The same with a generic scheme's timestamp header, and with a 50-year tolerance
/// (a copy ten years later).
#[tokio::test(start_paused = true)]
async fn s49_webhook_future_timestamp_copy_is_remembered_until_it_goes_stale() {
    use sturdy::core::clock::ManualClock;
    let (q, mut events) = MemoryQueue::new(16);
    let wall = Arc::new(ManualClock::at(at(NOW)));
    let sw = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q.clone())
        .with_clock(wall.clone())
        .with_dedup_ttl(Duration::from_secs(1));
    let acme = WebhookReceiver::new(
        GenericHmac::new("acme", HeaderName::from_static("x-acme-signature"), "gs49")
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-acme-timestamp")),
        q.clone(),
    )
    .with_clock(wall.clone())
    .with_dedup_ttl(Duration::from_secs(1));
    let ts = NOW + 299;
    let body = b"{\"future\":true}";
    let sw_req = || {
        Request::post("/hook")
            .header("webhook-id", "msg_future_s49")
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                sign_standard(SW_SECRET, "msg_future_s49", ts, body).unwrap(),
            )
            .body(Body::from(&body[..]))
            .unwrap()
    };
    let acme_req = || {
        let mut signed = format!("{ts}.").into_bytes();
        signed.extend_from_slice(body);
        // The generic scheme signs `timestamp.body` with HMAC-SHA256, hex: the GitHub signer
        // computes exactly that MAC over the signed content.
        let sig = sign_github("gs49", &signed);
        Request::post("/hook")
            .header("x-acme-signature", sig.trim_start_matches("sha256="))
            .header("x-acme-timestamp", ts.to_string())
            .body(Body::from(&body[..]))
            .unwrap()
    };
    assert_eq!(answer(&sw, sw_req()).await.0, StatusCode::OK);
    assert_eq!(answer(&acme, acme_req()).await.0, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 2);
    for step in [300u64, 200] {
        tokio::time::advance(Duration::from_secs(step)).await;
        wall.advance(Duration::from_secs(step));
        assert_eq!(answer(&sw, sw_req()).await.0, StatusCode::OK);
        assert_eq!(answer(&acme, acme_req()).await.0, StatusCode::OK);
        let again: Vec<String> = drain(&mut events).into_iter().map(|e| e.route).collect();
        assert!(
            again.is_empty(),
            "{step} s on: copies queued again on {again:?} while their timestamp still passes"
        );
    }
    // Past timestamp + tolerance: stale.
    tokio::time::advance(Duration::from_secs(102)).await;
    wall.advance(Duration::from_secs(102));
    assert_eq!(answer(&sw, sw_req()).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(answer(&acme, acme_req()).await.0, StatusCode::UNAUTHORIZED);

    // A 50-year tolerance: a copy ten years on passes the timestamp check, so it is a duplicate.
    let years = Duration::from_secs(86_400 * 365 * 50);
    let long = WebhookReceiver::new(
        StandardWebhooks::new(SW_SECRET)
            .unwrap()
            .with_tolerance(years),
        q,
    )
    .with_route("long")
    .with_clock(wall.clone())
    .with_dedup_ttl(Duration::from_secs(1));
    let now = wall.now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let req = || {
        Request::post("/hook")
            .header("webhook-id", "msg_long_s49")
            .header("webhook-timestamp", now.to_string())
            .header(
                "webhook-signature",
                sign_standard(SW_SECRET, "msg_long_s49", now, body).unwrap(),
            )
            .body(Body::from(&body[..]))
            .unwrap()
    };
    assert_eq!(answer(&long, req()).await.0, StatusCode::OK);
    let decade = Duration::from_secs(86_400 * 365 * 10);
    tokio::time::advance(decade).await;
    wall.advance(decade);
    assert_eq!(answer(&long, req()).await.0, StatusCode::OK);
    assert_eq!(
        drain(&mut events).len(),
        1,
        "a copy ten years on was queued again"
    );
}

/// `SourceAllowlist`: "`X-Forwarded-For` ... Its addresses are walked from the right, trusted
/// proxies skipped; the first other address is the source ... an entry it prepends sits left
/// of the address your proxy appended"; "more than 32 trusted hops make the source unknown"
/// (`MAX_FORWARDED_HOPS`: "The most trusted-proxy entries skipped from the right"). Header
/// values on several lines are one list (RFC 9110 5.3), so a client's own line stays left of
/// the line the proxy added; a header of 100,000 entries is answered at once.
#[test]
fn s49_webhook_forwarded_for_lines_and_hops() {
    use std::net::IpAddr;
    use sturdy::webhook::{ForwardedHeader, SourceAllowlist, MAX_FORWARDED_HOPS};
    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let proxy: IpAddr = "10.0.0.1".parse().unwrap();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let xff = |lines: &[&str]| {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
        }
        h
    };
    // A client's forged line, then the line the proxy added with the client's real address.
    let forged = xff(&["192.30.252.7", "203.0.113.9"]);
    assert_eq!(list.source(proxy, &forged), Some(ip("203.0.113.9")));
    assert!(
        !list.allows(proxy, &forged),
        "a forged first line let the delivery in"
    );
    let genuine = xff(&["192.30.252.7", "10.1.2.3"]);
    assert_eq!(list.source(proxy, &genuine), Some(ip("192.30.252.7")));
    // 32 trusted entries right of the sender are skipped; 33 are too many.
    let hops = |n: usize| {
        let mut v = vec!["192.30.252.7".to_owned()];
        v.extend((0..n).map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1)));
        xff(&[v.join(", ").as_str()])
    };
    assert_eq!(
        list.source(proxy, &hops(MAX_FORWARDED_HOPS)),
        Some(ip("192.30.252.7"))
    );
    assert_eq!(list.source(proxy, &hops(MAX_FORWARDED_HOPS + 1)), None);
    // 100,000 entries: bounded work either way.
    let many_untrusted = vec!["203.0.113.1"; 100_000].join(", ");
    let many_trusted = vec!["10.9.9.9"; 100_000].join(", ");
    let t = tokio::time::Instant::now();
    assert_eq!(
        list.source(proxy, &xff(&[many_untrusted.as_str()])),
        Some(ip("203.0.113.1"))
    );
    assert_eq!(list.source(proxy, &xff(&[many_trusted.as_str()])), None);
    let lines: Vec<&str> = vec!["10.9.9.9"; 20_000];
    assert_eq!(list.source(proxy, &xff(&lines)), None);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    // RFC 7239 `Forwarded`: parameters, quoting, case, several lines.
    let fwd = SourceAllowlist::new(["192.30.252.0/22", "2001:db8:cafe::/48"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap()
        .with_forwarded_header(ForwardedHeader::Forwarded);
    let f = |lines: &[&str]| {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("forwarded", HeaderValue::from_str(l).unwrap());
        }
        h
    };
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (
            vec!["for=192.30.252.7;proto=https;by=10.0.0.1"],
            Some("192.30.252.7"),
        ),
        (
            vec!["For=\"[2001:db8:cafe::17]:4711\""],
            Some("2001:db8:cafe::17"),
        ),
        (vec!["for=192.30.252.7, for=10.1.2.3"], Some("192.30.252.7")),
        (
            vec!["for=192.30.252.7", "for=203.0.113.9"],
            Some("203.0.113.9"),
        ),
        (vec!["for=_hidden"], None),
        (vec!["for=unknown"], None),
    ];
    for (lines, want) in cases {
        let got = fwd.source(proxy, &f(&lines));
        assert_eq!(got, want.map(ip), "Forwarded: {lines:?}");
    }
}

/// Found a fault in round s49b (fixed). The guide: "`X-Forwarded-For` (or `Forwarded`, with
/// `with_forwarded_header(ForwardedHeader::Forwarded)`) is read only when the peer is one of
/// your trusted proxies ... So a client cannot forge its way in"; `ForwardedHeader::Forwarded`:
/// "`Forwarded: for=client, for=proxy1` (RFC 7239)". In RFC 7239 a parameter value may be a
/// quoted-string, commas included, and proxies quote values they copy from the request: the
/// `host` parameter is "the original value of the Host request header field". A client that
/// sends `Host: x,for=192.30.252.7;y=` through a trusted proxy writing
/// `for=<client>;host="<Host>"` gets the element
/// `for=203.0.113.9;host="x,for=192.30.252.7;y="`, which is one element whose `for` is the
/// client (203.0.113.9, not allowed). The delivery must be refused with 403.
#[tokio::test]
async fn s49_webhook_forwarded_quoted_comma_cannot_inject_a_source() {
    use sturdy::webhook::{ForwardedHeader, SourceAllowlist};
    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap()
        .with_forwarded_header(ForwardedHeader::Forwarded);
    let (q, mut events) = MemoryQueue::new(8);
    let rx = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), q).with_source_allowlist(list);
    let peer: std::net::SocketAddr = "10.0.0.1:40000".parse().unwrap();
    let mut statuses = Vec::new();
    for element in [
        // The proxy's own element, the client's Host copied into a quoted `host`.
        "for=203.0.113.9;host=\"x,for=192.30.252.7;y=\"",
        "for=203.0.113.9;host=\"x, for=192.30.252.7\";proto=https",
        "for=203.0.113.9;by=\"x,for=192.30.252.7;y=\"",
    ] {
        let mut req = github_req(b"{\"zen\":\"forwarded\"}");
        req.headers_mut()
            .insert("forwarded", HeaderValue::from_str(element).unwrap());
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let (status, _, text) = answer(&rx, req).await;
        statuses.push((element, status, text));
    }
    let queued = drain(&mut events).len();
    assert!(
        statuses.iter().all(|(_, s, _)| *s == StatusCode::FORBIDDEN) && queued == 0,
        "a client-quoted address was taken as the source: {statuses:?}, {queued} queued"
    );
}
