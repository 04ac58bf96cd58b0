#![cfg(feature = "full")]
//! Outside round s108: webhooks and the server-side idempotency store (`sturdy::webhook`,
//! `sturdy::idempotency::server`, `sturdy::redis`), through axum and tower's own layers.
//!
//! Covers the corners earlier rounds left: `running()`/`wait_idle()` with a request that left
//! while the store was still locking its key; the background release after a 5xx that the store
//! refuses (its schedule, and that it stops at the lease); tower-http's `RequestBodyTimeoutLayer`
//! in front of both the receiver and the idempotency layer; a Stripe header that lists two `t=`
//! (signed by the real `stripe` npm signer); a `MemoryQueue` (and a Redis stream) shared by
//! receivers with different dedup TTLs; a queue of capacity 0 shared by two routes; the Redis
//! consumer's and queue's zero settings (`with_wait(0)`, `with_max_backlog(0)`,
//! `with_max_deliveries(0)`); scheme and route names holding `:` and `%` on Redis and Cluster.

use std::convert::Infallible;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use sturdy::core::{BoxError, WallClock};
use sturdy::idempotency::server::{
    problem, Begin, BoxFuture, ByCredentials, Fingerprint, IdempotencyLayer, IdempotencyStore,
    LockToken, MemoryStore, StoredResponse,
};
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{
    sign_github, sign_standard, GenericHmac, GitHub, MemoryQueue, MemoryReceiver, StandardWebhooks,
    Stripe, WebhookEvent, WebhookReceiver,
};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Fixed(SystemTime);

impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

fn clock_at(secs: i64) -> Arc<dyn WallClock> {
    Arc::new(Fixed(UNIX_EPOCH + Duration::from_secs(secs as u64)))
}

const NOW: i64 = 1_800_000_000;
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ST_SECRET: &str = "whsec_s108_stripe_signing_secret";
const GH_SECRET: &str = "It's a Secret to Everybody";

type Answer = (StatusCode, HeaderMap, String);

async fn send<Q, B>(r: &WebhookReceiver<Q>, req: Request<B>) -> Answer
where
    WebhookReceiver<Q>:
        Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone,
{
    let resp = tokio::time::timeout(Duration::from_secs(5), r.clone().oneshot(req))
        .await
        .expect("the receiver answered within 5 s")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn drain(events: &mut MemoryReceiver) -> Vec<WebhookEvent> {
    let mut out = Vec::new();
    while let Some(e) = events.try_recv() {
        out.push(e);
    }
    out
}

fn sw_signed(id: &str, ts: i64, body: &str) -> Request<Full<Bytes>> {
    let sig = sign_standard(SW_SECRET, id, ts, body.as_bytes()).unwrap();
    Request::post("/hooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn gh_signed(body: &str) -> Request<Full<Bytes>> {
    Request::post("/hooks")
        .header(
            "x-hub-signature-256",
            sign_github(GH_SECRET, body.as_bytes()),
        )
        .header("x-github-event", "push")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn node_dir() -> Option<String> {
    let d = std::env::var("STURDY_INTEROP_NODE_DIR").ok()?;
    std::path::Path::new(&d)
        .join("sign.js")
        .exists()
        .then_some(d)
}

/// Signs `cases` with the real npm signers (interop/sign.js).
fn node_sign(dir: &str, cases: &serde_json::Value) -> Vec<String> {
    let mut child = Command::new("node")
        .arg("sign.js")
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sign.js failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn cluster_urls() -> Option<Vec<String>> {
    let v = std::env::var("STURDY_REDIS_CLUSTER_URLS").ok()?;
    Some(v.split(',').map(str::to_string).collect())
}

fn uniq(tag: &str) -> String {
    let n = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{{s108-{tag}-{}-{n}}}", std::process::id())
}

/// A body whose first chunk comes at once and whose rest never does.
fn stalled_body(first: &'static [u8]) -> Body {
    let s = futures_util::stream::iter(vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(
        first,
    )))])
    .chain(futures_util::stream::pending());
    Body::new(StreamBody::new(s))
}

use futures_util::StreamExt as _;

async fn read_resp<B>(resp: Response<B>) -> (StatusCode, HeaderMap, String)
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let b = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

fn problem_type(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["type"].as_str().unwrap_or_default().to_string()
}

fn order(key: &str, body: &'static str) -> Request<Body> {
    Request::post("/orders")
        .header("authorization", "Bearer s108")
        .header("idempotency-key", key)
        .body(Body::from(body))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Idempotency: stores of our own (public trait) around a MemoryStore
// ---------------------------------------------------------------------------------------------

/// A MemoryStore whose `begin` waits for a permit, and whose `release` fails `fail_releases`
/// times; it records when each `release` was called.
#[derive(Debug, Clone)]
struct Gated {
    inner: MemoryStore,
    gate: Arc<tokio::sync::Semaphore>,
    gated: Arc<std::sync::atomic::AtomicBool>,
    begins: Arc<AtomicUsize>,
    fail_releases: Arc<AtomicUsize>,
    releases: Arc<Mutex<Vec<Instant>>>,
}

impl Gated {
    fn new() -> Self {
        Self {
            inner: MemoryStore::default(),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            gated: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            begins: Arc::new(AtomicUsize::new(0)),
            fail_releases: Arc::new(AtomicUsize::new(0)),
            releases: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl IdempotencyStore for Gated {
    fn begin(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<Begin, BoxError>> {
        let this = self.clone();
        let key = key.to_string();
        Box::pin(async move {
            this.begins.fetch_add(1, Ordering::SeqCst);
            if this.gated.load(Ordering::SeqCst) {
                this.gate.acquire().await.unwrap().forget();
            }
            this.inner.begin(&key, fingerprint, token, lease).await
        })
    }
    fn renew(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        lease: Duration,
    ) -> BoxFuture<Result<bool, BoxError>> {
        self.inner.renew(key, fingerprint, token, lease)
    }
    fn complete(
        &self,
        key: &str,
        fingerprint: Fingerprint,
        token: LockToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> BoxFuture<Result<(), BoxError>> {
        self.inner.complete(key, fingerprint, token, response, ttl)
    }
    fn release(&self, key: &str, token: LockToken) -> BoxFuture<Result<(), BoxError>> {
        self.releases.lock().unwrap().push(Instant::now());
        let fail = self
            .fail_releases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async {
                Err::<(), BoxError>("s108: the store refuses the release".into())
            });
        }
        self.inner.release(key, token)
    }
}

/// An app whose handler counts its runs, sleeps `sleep` (paused time) and answers 201, or 503
/// for the body `fail`.
fn counting_app<St: IdempotencyStore + Clone>(
    layer: IdempotencyLayer<St>,
    sleep: Duration,
) -> (Router, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move |body: Bytes| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(sleep).await;
                    if &body[..] == b"fail" {
                        (StatusCode::SERVICE_UNAVAILABLE, "down".to_string())
                    } else {
                        (
                            StatusCode::CREATED,
                            format!("made {}", String::from_utf8_lossy(&body)),
                        )
                    }
                }
            }),
        )
        .layer(layer);
    (app, runs)
}

/// `running()`: "How many keyed requests are running in tasks of their own right now ..., with
/// the background releases of keys whose request went away before its handler ran";
/// `wait_idle()`: "Resolves once no keyed request is running". Guide: "client gone while the
/// store is locking the key (before the handler starts): the handler does not run; the store's
/// answer is awaited in the background and, if it locked the key, the key is released".
#[tokio::test(start_paused = true)]
async fn s108_running_and_wait_idle_count_a_release_for_a_client_gone_during_begin() {
    let store = Gated::new();
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default());
    let (app, runs) = counting_app(layer.clone(), Duration::from_secs(5));

    // Idle: nothing counted, wait_idle resolves at once.
    assert_eq!(layer.running(), 0);
    tokio::time::timeout(Duration::from_millis(1), layer.wait_idle())
        .await
        .expect("wait_idle resolves at once when idle");

    // A client that goes away while `begin` is held.
    store.gated.store(true, Ordering::SeqCst);
    let mut fut = Box::pin(app.clone().oneshot(order("k-gone", "a")));
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut fut)
        .await
        .is_err());
    assert_eq!(store.begins.load(Ordering::SeqCst), 1, "begin was sent");
    drop(fut);
    tokio::task::yield_now().await;
    assert_eq!(
        layer.running(),
        1,
        "the background release of a key whose request left during begin is counted"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), layer.wait_idle())
            .await
            .is_err(),
        "wait_idle waits for that background release"
    );
    // The store answers: the key was locked, and is released in the background.
    store.gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(1), layer.wait_idle())
        .await
        .expect("wait_idle resolves once the release is done");
    assert_eq!(layer.running(), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the handler never ran");
    store.gated.store(false, Ordering::SeqCst);
    let (s, _, b) = read_resp(app.clone().oneshot(order("k-gone", "a")).await.unwrap()).await;
    assert_eq!(
        (s, b.as_str()),
        (StatusCode::CREATED, "made a"),
        "the key is free"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // A handler running in its own task: counted once; refusals and replays never are.
    let h = tokio::spawn(app.clone().oneshot(order("k-run", "b")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(layer.running(), 1);
    let (s, hd, b) = read_resp(app.clone().oneshot(order("k-run", "b")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(hd["retry-after"], "1");
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    let (s, _, b) = read_resp(app.clone().oneshot(order("k-run", "c")).await.unwrap()).await;
    assert_eq!(
        (s, problem_type(&b).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, problem::KEY_REUSED)
    );
    assert_eq!(layer.running(), 1, "409 and 422 start nothing");
    let mut idle = Box::pin(layer.wait_idle());
    assert!(tokio::time::timeout(Duration::from_secs(1), &mut idle)
        .await
        .is_err());
    let (s, _, _) = read_resp(h.await.unwrap().unwrap()).await;
    assert_eq!(s, StatusCode::CREATED);
    tokio::time::timeout(Duration::from_millis(1), &mut idle)
        .await
        .expect("the same wait_idle future resolves once the handler ended");
    assert_eq!(layer.running(), 0);
    let (s, hd, _) = read_resp(app.clone().oneshot(order("k-run", "b")).await.unwrap()).await;
    assert_eq!(
        (s, hd["idempotent-replayed"].to_str().unwrap()),
        (StatusCode::CREATED, "true")
    );
    assert_eq!(layer.running(), 0);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Guide, per failure: "handler returns 5xx: ... the key is released before the response goes
/// out (a release the store fails is tried again in the background, 50 ms apart doubling to
/// 1 s, until the lease ends) | ... while a failed release is tried again, a retry gets 409 with
/// `Retry-After`".
#[tokio::test(start_paused = true)]
async fn s108_a_refused_release_after_a_5xx_gives_409_then_the_retry_runs() {
    let store = Gated::new();
    store.fail_releases.store(3, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_lease(Duration::from_secs(10))
        .unwrap();
    let (app, runs) = counting_app(layer.clone(), Duration::ZERO);

    let t0 = Instant::now();
    let (s, _, b) = read_resp(app.clone().oneshot(order("k-5xx", "fail")).await.unwrap()).await;
    assert_eq!((s, b.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "down"));
    let (s, hd, b) = read_resp(app.clone().oneshot(order("k-5xx", "fail")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(hd.contains_key("retry-after"));
    assert_eq!(problem_type(&b), problem::IN_FLIGHT);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let at: Vec<u128> = {
        let r = store.releases.lock().unwrap();
        r.iter().map(|t| t.duration_since(t0).as_millis()).collect()
    };
    assert_eq!(at.len(), 4, "three refused, the fourth done: {at:?}");
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    let (s, _, _) = read_resp(app.clone().oneshot(order("k-5xx", "fail")).await.unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "the retry ran");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Same row, read literally: after the refused release, the tries in the background are
/// "50 ms apart doubling to 1 s": 50, 100, 200, 400, 800, 1000 ms after each other.
///
/// Resolved in the guide: the first background try comes at once, then 50 ms apart doubling
/// ("tried again in the background, at once, then 50 ms apart doubling to 1 s").
#[tokio::test(start_paused = true)]
async fn s108_release_tries_after_a_5xx_are_50_ms_apart_from_the_first() {
    let store = Gated::new();
    store.fail_releases.store(usize::MAX, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_lease(Duration::from_secs(3))
        .unwrap();
    let (app, _runs) = counting_app(layer, Duration::ZERO);
    let t0 = Instant::now();
    let (s, _, _) = read_resp(app.oneshot(order("k-gaps", "fail")).await.unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let at: Vec<u128> = store
        .releases
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.duration_since(t0).as_millis())
        .collect();
    let gaps: Vec<u128> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps[..6], [0, 50, 100, 200, 400, 800], "tries at {at:?}");
}

/// Same row: the tries stop "until the lease ends", and then the key is free.
#[tokio::test(start_paused = true)]
async fn s108_a_release_that_always_fails_stops_at_the_lease_and_the_key_frees() {
    let store = Gated::new();
    store.fail_releases.store(usize::MAX, Ordering::SeqCst);
    let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_lease(Duration::from_secs(3))
        .unwrap();
    let (app, runs) = counting_app(layer.clone(), Duration::ZERO);
    let t0 = Instant::now();
    let (s, _, _) = read_resp(app.clone().oneshot(order("k-lease", "fail")).await.unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let at: Vec<u128> = store
        .releases
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.duration_since(t0).as_millis())
        .collect();
    assert!(
        at.iter().all(|&ms| ms <= 3_000),
        "no release tried after the 3 s lease: {at:?}"
    );
    assert!(at.len() >= 5, "tried while the lease lasted: {at:?}");
    tokio::time::timeout(Duration::from_secs(1), layer.wait_idle())
        .await
        .expect("nothing left running");
    store.fail_releases.store(0, Ordering::SeqCst);
    let (s, _, _) = read_resp(app.clone().oneshot(order("k-lease", "ok")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "after the lease the key is free");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Guide: "body over the limit ... (the read has no time limit of the layer's: put tower-http's
/// `RequestBodyTimeoutLayer` in front)"; problem::UNREADABLE_BODY: "400: the request body could
/// not be read". Webhooks: "`unreadable body` with 400 when the body stream itself failed".
/// Neither keeps anything: the full request sent again runs once / is queued once.
#[tokio::test(start_paused = true)]
async fn s108_a_body_timeout_in_front_is_an_unreadable_body_and_keeps_nothing() {
    use tower_http::timeout::RequestBodyTimeout;

    // Idempotency.
    let layer = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let (app, runs) = counting_app(layer.clone(), Duration::ZERO);
    let svc = RequestBodyTimeout::new(app, Duration::from_millis(200));
    let req = Request::post("/orders")
        .header("authorization", "Bearer s108")
        .header("idempotency-key", "k-slow")
        .body(stalled_body(b"par"))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(req))
        .await
        .expect("the body timeout ends the read")
        .unwrap();
    let (s, hd, b) = read_resp(resp).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(hd["content-type"], "application/problem+json");
    assert_eq!(problem_type(&b), problem::UNREADABLE_BODY);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let resp = svc.clone().oneshot(order("k-slow", "par")).await.unwrap();
    let (s, _, b) = read_resp(resp).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "made par"));
    assert_eq!(layer.running(), 0);

    // Webhooks.
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW));
    let hook = RequestBodyTimeout::new(receiver.clone(), Duration::from_millis(200));
    let body = "{\"slow\":true}";
    let sig = sign_standard(SW_SECRET, "msg_slow", NOW, body.as_bytes()).unwrap();
    let req = Request::post("/hooks")
        .header("webhook-id", "msg_slow")
        .header("webhook-timestamp", NOW.to_string())
        .header("webhook-signature", sig)
        .body(stalled_body(b"{\"slow\""))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), hook.clone().oneshot(req))
        .await
        .expect("the body timeout ends the read")
        .unwrap();
    let (parts, b) = resp.into_parts();
    let b = b.collect().await.unwrap().to_bytes();
    assert_eq!(
        (parts.status, &b[..]),
        (StatusCode::BAD_REQUEST, &b"unreadable body"[..])
    );
    assert!(drain(&mut events).is_empty());
    let (s, _, _) = send(&receiver, sw_signed("msg_slow", NOW, body)).await;
    assert_eq!(s, StatusCode::OK, "the id was not remembered");
    assert_eq!(drain(&mut events).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Webhooks: Stripe header with two timestamps (real signer)
// ---------------------------------------------------------------------------------------------

/// Guide: "a signed timestamp within the tolerance \[5 minutes, both directions\] ... 401 for a
/// stale or future timestamp". A stale delivery signed by the real `stripe` library, with a
/// fresh `t=` added before or after its own, must not pass: either the fresh `t` is the one
/// signed (it is not) or the stale one is the one checked (it is stale).
#[tokio::test]
async fn s108_stripe_header_with_a_second_fresh_t_never_revives_a_stale_delivery() {
    let Some(dir) = node_dir() else {
        eprintln!("skip: STURDY_INTEROP_NODE_DIR not set");
        return;
    };
    let body = r#"{"id":"evt_s108_two_t","object":"event"}"#;
    let stale = NOW - 3_600;
    let future = NOW + 3_600;
    let signed = node_sign(
        &dir,
        &serde_json::json!([
            {"scheme":"stripe","secret":ST_SECRET,"timestamp":stale,"payload":body},
            {"scheme":"stripe","secret":ST_SECRET,"timestamp":NOW,"payload":body},
            {"scheme":"stripe","secret":ST_SECRET,"timestamp":future,"payload":body},
        ]),
    );
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver =
        WebhookReceiver::new(Stripe::new(ST_SECRET).unwrap(), queue).with_clock(clock_at(NOW));
    let req = |sig: &str| {
        Request::post("/hooks")
            .header("stripe-signature", sig)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    for (what, sig) in [
        (
            "stale signed, fresh t after",
            format!("{},t={NOW}", signed[0]),
        ),
        (
            "fresh t before a stale signed",
            format!("t={NOW},{}", signed[0]),
        ),
        (
            "future signed, fresh t after",
            format!("{},t={NOW}", signed[2]),
        ),
        (
            "fresh t before a future signed",
            format!("t={NOW},{}", signed[2]),
        ),
    ] {
        let (s, _, text) = send(&receiver, req(&sig)).await;
        assert!(
            s == StatusCode::UNAUTHORIZED || s == StatusCode::BAD_REQUEST,
            "{what}: {s} {text}"
        );
        assert!(drain(&mut events).is_empty(), "{what}: nothing queued");
    }
    // The real signer's fresh header alone is accepted, and the event queued once.
    let (s, _, _) = send(&receiver, req(&signed[1])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Webhooks: one queue, several receivers
// ---------------------------------------------------------------------------------------------

/// Guide: "Events are deduplicated per scheme and route, so two routes sharing a queue never
/// share an id space"; "give each receiver that shares a queue with another receiver of the same
/// scheme its own name, or their event ids share one space"; GitHub: "a copy is refused ...
/// while the digest is remembered, that is the dedup TTL". Two GitHub receivers on one
/// `MemoryQueue` and one route name, TTLs 1 s and 1 h: a key is remembered for the TTL of the
/// receiver that took it.
#[tokio::test(start_paused = true)]
async fn s108_memory_queue_shared_by_receivers_with_different_ttls() {
    let (queue, mut events) = MemoryQueue::new(100);
    let short = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone())
        .with_dedup_ttl(Duration::from_secs(1));
    let long = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone())
        .with_dedup_ttl(Duration::from_secs(3_600));
    let other_route = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue)
        .with_route("github-2")
        .with_dedup_ttl(Duration::from_secs(3_600));

    // Taken by the short one: a duplicate through the long one while remembered ...
    assert_eq!(send(&short, gh_signed("b1")).await.0, StatusCode::OK);
    assert_eq!(send(&long, gh_signed("b1")).await.0, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1, "one route name, one id space");
    // ... but another route has its own id space.
    assert_eq!(send(&other_route, gh_signed("b1")).await.0, StatusCode::OK);
    let e = drain(&mut events);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].route, "github-2");

    // Taken by the long one (1 h): still a duplicate through the short one 2 s later.
    assert_eq!(send(&long, gh_signed("b2")).await.0, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(send(&short, gh_signed("b2")).await.0, StatusCode::OK);
    assert!(
        drain(&mut events).is_empty(),
        "a key the 1 h receiver took is remembered 1 h, whichever receiver sees the copy"
    );

    // Taken by the short one (1 s): forgotten after it, then taken for 1 h by the long one.
    assert_eq!(send(&short, gh_signed("b3")).await.0, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(send(&long, gh_signed("b3")).await.0, StatusCode::OK);
    assert_eq!(drain(&mut events).len(), 1, "the 1 s key was forgotten");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(send(&short, gh_signed("b3")).await.0, StatusCode::OK);
    assert!(drain(&mut events).is_empty(), "now held for 1 h");
}

async fn count(c: &mut RedisStreamConsumer) -> usize {
    let mut n = 0;
    while let Some(d) = c.next().await.unwrap() {
        c.ack(&d).await.unwrap();
        n += 1;
    }
    n
}

/// The same, on one Redis stream (real time, TTLs of 150 ms and 1 h).
#[tokio::test]
async fn s108_redis_stream_shared_by_receivers_with_different_ttls() {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("ttls");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream.clone(), "g", "c1", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let short = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone())
        .with_dedup_ttl(Duration::from_millis(150));
    let long = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone())
        .with_dedup_ttl(Duration::from_secs(3_600));
    assert_eq!(send(&long, gh_signed("r2")).await.0, StatusCode::OK);
    assert_eq!(count(&mut consumer).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&short, gh_signed("r2")).await.0, StatusCode::OK);
    assert_eq!(
        count(&mut consumer).await,
        0,
        "the 1 h key holds against the short receiver"
    );

    assert_eq!(send(&short, gh_signed("r3")).await.0, StatusCode::OK);
    assert_eq!(count(&mut consumer).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&long, gh_signed("r3")).await.0, StatusCode::OK);
    assert_eq!(
        count(&mut consumer).await,
        1,
        "the 150 ms key was forgotten"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(send(&short, gh_signed("r3")).await.0, StatusCode::OK);
    assert_eq!(count(&mut consumer).await, 0, "now held for 1 h");
}

/// `MemoryQueue::new`: "A queue holding at most `capacity` events (0 is taken as 1 ...)";
/// guide: "a full queue gets 503 with `Retry-After` and the id is not remembered, so the
/// redelivery is accepted". Two routes share it.
#[tokio::test]
async fn s108_memory_queue_of_capacity_zero_shared_by_two_routes() {
    let (queue, mut events) = MemoryQueue::new(0);
    let a = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
        .with_route("a")
        .with_clock(clock_at(NOW));
    let b = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_route("b")
        .with_clock(clock_at(NOW));
    assert_eq!(send(&a, sw_signed("m1", NOW, "{}")).await.0, StatusCode::OK);
    let (s, h, _) = send(&b, sw_signed("m1", NOW, "{}")).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "capacity 0 holds one event"
    );
    assert!(h.contains_key("retry-after"), "{h:?}");
    let first = events.try_recv().unwrap();
    assert_eq!((first.route.as_str(), first.id.as_str()), ("a", "m1"));
    let (s, _, _) = send(&b, sw_signed("m1", NOW, "{}")).await;
    assert_eq!(s, StatusCode::OK, "the refused id was not remembered");
    let second = events.try_recv().unwrap();
    assert_eq!(second.route, "b");
    assert_eq!(send(&a, sw_signed("m1", NOW, "{}")).await.0, StatusCode::OK);
    assert_eq!(send(&b, sw_signed("m1", NOW, "{}")).await.0, StatusCode::OK);
    assert!(events.try_recv().is_none(), "both remembered now");
}

// ---------------------------------------------------------------------------------------------
// Redis Streams: zero settings
// ---------------------------------------------------------------------------------------------

/// `with_max_backlog`: "(at least 1)"; `with_max_deliveries`: "(at least 1)"; `with_wait`:
/// "How long `next` waits for a new event before answering `None`"; `next`: "When an event is
/// waiting this costs one round trip". So with zeros: one event fits, a second gets 503 and is
/// not remembered; a waiting event is returned by a `next()` that does not wait; one not
/// acknowledged goes to the dead letters after its one delivery; then there is room again.
#[tokio::test]
async fn s108_redis_zero_backlog_wait_and_deliveries_read_as_documented() {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("zeros");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap()
        .with_max_backlog(0);
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream.clone(), "g", "c1", Duration::from_millis(100))
            .await
            .unwrap()
            .with_wait(Duration::ZERO)
            .with_max_deliveries(0);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW));
    assert_eq!(
        send(&receiver, sw_signed("z1", NOW, "1")).await.0,
        StatusCode::OK
    );
    let (s, h, _) = send(&receiver, sw_signed("z2", NOW, "2")).await;
    assert_eq!(
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "a backlog of 0 holds one"
    );
    assert!(h.contains_key("retry-after"));

    let t = Instant::now();
    let d = consumer
        .next()
        .await
        .unwrap()
        .expect("a waiting event, even with a zero wait");
    assert_eq!((d.event.id.as_str(), d.deliveries), ("z1", 1));
    assert!(consumer.next().await.unwrap().is_none());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = consumer.next().await.unwrap();
    assert!(
        again.is_none(),
        "one delivery allowed: dead-lettered, {again:?}"
    );
    assert_eq!(queue.dead_letter_count().await.unwrap(), 1);
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!((dead[0].event.id.as_str(), dead[0].deliveries), ("z1", 1));

    assert_eq!(
        send(&receiver, sw_signed("z2", NOW, "2")).await.0,
        StatusCode::OK,
        "room again, and z2 was not remembered"
    );
    let d = consumer.next().await.unwrap().expect("z2");
    assert_eq!(d.event.id, "z2");
    consumer.ack(&d).await.unwrap();
    assert!(queue.discard_dead_letter(&dead[0].entry).await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// Dedup across schemes and routes with `:` and `%` in the names, on Redis and Cluster
// ---------------------------------------------------------------------------------------------

/// `WebhookEvent::dedup_key`: "`:` and `%` in the scheme and route names are percent-encoded,
/// so distinct triples never give one key"; the guide: "Events are deduplicated per scheme and
/// route". Generic schemes whose (name, route) pairs would join to one string, sharing a
/// stream, each queue the same body once; a copy through each is a duplicate.
async fn colon_names_on(queue: RedisStreamQueue, mut consumer: RedisStreamConsumer) {
    let hdr = HeaderName::from_static("x-sig");
    let mk = |name: &'static str, route: &str| {
        WebhookReceiver::new(
            GenericHmac::new(name, hdr.clone(), GH_SECRET).unwrap(),
            queue.clone(),
        )
        .with_route(route)
    };
    let receivers = [
        mk("x", "y:z"),
        mk("x:y", "z"),
        mk("x%3Ay", "z"),
        mk("x", "y%3Az"),
        mk("x", "y"),
    ];
    let body = "same body";
    let sig = sign_github(GH_SECRET, body.as_bytes());
    let sig = sig.trim_start_matches("sha256=").to_string();
    let req = || {
        Request::post("/hooks")
            .header("x-sig", sig.clone())
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    for r in &receivers {
        assert_eq!(send(r, req()).await.0, StatusCode::OK);
    }
    for r in &receivers {
        assert_eq!(send(r, req()).await.0, StatusCode::OK);
    }
    let mut got = Vec::new();
    while let Some(d) = consumer.next().await.unwrap() {
        got.push((d.event.scheme.clone(), d.event.route.clone()));
        consumer.ack(&d).await.unwrap();
    }
    got.sort();
    let mut want: Vec<(String, String)> = [
        ("x", "y:z"),
        ("x:y", "z"),
        ("x%3Ay", "z"),
        ("x", "y%3Az"),
        ("x", "y"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want, "each (scheme, route) once");
}

#[tokio::test]
async fn s108_redis_colon_and_percent_names_never_share_ids() {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("colons");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let consumer = RedisStreamConsumer::connect(&url, stream, "g", "c", Duration::from_secs(60))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50));
    colon_names_on(queue, consumer).await;
}

#[tokio::test]
async fn s108_cluster_colon_and_percent_names_never_share_ids() {
    let Some(urls) = cluster_urls() else {
        eprintln!("skip: STURDY_REDIS_CLUSTER_URLS not set");
        return;
    };
    let stream = uniq("colons-c").replace(['{', '}'], "");
    let queue = RedisStreamQueue::connect_cluster(urls.clone(), stream.clone())
        .await
        .unwrap();
    let consumer =
        RedisStreamConsumer::connect_cluster(urls, stream, "g", "c", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    colon_names_on(queue, consumer).await;
}

// ---------------------------------------------------------------------------------------------
// A Redis of this test's own, frozen while `begin` is on its way
// ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `redis-server --port N --save '' --appendonly no` on a free port; killed on drop.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    async fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "own redis never came up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Guide, per failure: "store down when the request arrives | 503 `…/idempotency-store-unavailable`,
/// `Retry-After: 1`; the handler does not run; if the store's `begin` may have locked the key
/// before failing (a timeout ...), the lock is released in the background, tried again ...
/// while the store still fails | 503; a later retry with the same key runs normally once the
/// store answers again (or gets 409 for the moment the release is on its way)"; and "client
/// gone while the store is locking the key: ... the store's answer is awaited in the background
/// and, if it locked the key, the key is released". A Redis frozen (SIGSTOP) under both, then
/// thawed: its queued `SET NX` locks each key for the 20 s lease; both must be free again well
/// before the lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s108_own_redis_frozen_during_begin_then_thawed_frees_both_keys() {
    let redis = OwnRedis::start().await;
    let store = sturdy::redis::RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_prefix(uniq("frozen"))
        .with_timeout(Duration::from_millis(200));
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_lease(Duration::from_secs(20))
        .unwrap();
    let (app, runs) = counting_app(layer.clone(), Duration::ZERO);
    let (s, _, _) = read_resp(app.clone().oneshot(order("k-warm", "w")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED);

    redis.signal("-STOP");
    let t0 = Instant::now();
    let (s, h, b) = read_resp(app.clone().oneshot(order("k-frozen", "x")).await.unwrap()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(h["retry-after"], "1");
    assert_eq!(problem_type(&b), problem::STORE_UNAVAILABLE);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let mut left = Box::pin(app.clone().oneshot(order("k-left", "y")));
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut left)
        .await
        .is_err());
    drop(left);
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.signal("-CONT");

    tokio::time::timeout(Duration::from_secs(5), layer.wait_idle())
        .await
        .expect("idle once Redis answers");
    for (key, body, want) in [("k-frozen", "x", "made x"), ("k-left", "y", "made y")] {
        let t1 = Instant::now();
        let last = loop {
            let a = read_resp(app.clone().oneshot(order(key, body)).await.unwrap()).await;
            if !(a.0 == StatusCode::CONFLICT || a.0 == StatusCode::SERVICE_UNAVAILABLE)
                || t1.elapsed() > Duration::from_secs(5)
            {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            (last.0, last.2.as_str()),
            (StatusCode::CREATED, want),
            "{key}: still held 5 s after Redis came back"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster: a dead consumer's events, claimed by two racing consumers
// ---------------------------------------------------------------------------------------------

/// Guide: "Consumers of one group share the work; ... an event left unacknowledged for the claim
/// delay is delivered again, and `Delivery::deliveries` counts the deliveries"; consumer docs:
/// "each event going to one of them". A consumer takes 20 events and dies; two consumers then
/// race: each of the 20 comes out once, with `deliveries == 2`, and a new event once, with 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s108_cluster_a_dead_consumers_events_are_claimed_once_by_racing_consumers() {
    let Some(urls) = cluster_urls() else {
        eprintln!("skip: STURDY_REDIS_CLUSTER_URLS not set");
        return;
    };
    let stream = uniq("race");
    let claim = Duration::from_millis(300);
    let queue = RedisStreamQueue::connect_cluster(urls.clone(), stream.clone())
        .await
        .unwrap();
    let join = |name: &'static str| {
        let urls = urls.clone();
        let stream = stream.clone();
        async move {
            RedisStreamConsumer::connect_cluster(urls, stream, "g", name, claim)
                .await
                .unwrap()
                .with_wait(Duration::from_millis(50))
        }
    };
    let mut dead = join("dead").await;
    let b = join("b").await;
    let c = join("c").await;
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW));
    for i in 0..20 {
        let id = format!("e{i}");
        assert_eq!(
            send(&receiver, sw_signed(&id, NOW, &id)).await.0,
            StatusCode::OK
        );
    }
    for _ in 0..20 {
        let d = dead
            .next()
            .await
            .unwrap()
            .expect("taken by the consumer that dies");
        assert_eq!(d.deliveries, 1);
    }
    drop(dead);
    tokio::time::sleep(claim + Duration::from_millis(100)).await;
    assert_eq!(
        send(&receiver, sw_signed("fresh", NOW, "f")).await.0,
        StatusCode::OK
    );

    let work = |mut w: RedisStreamConsumer| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            let mut empty = 0;
            while empty < 3 {
                match w.next().await.unwrap() {
                    Some(d) => {
                        empty = 0;
                        got.push((d.event.id.clone(), d.deliveries));
                        w.ack(&d).await.unwrap();
                    }
                    None => empty += 1,
                }
            }
            got
        })
    };
    let (hb, hc) = (work(b), work(c));
    let mut all = hb.await.unwrap();
    all.extend(hc.await.unwrap());
    all.sort();
    let mut want: Vec<(String, u64)> = (0..20).map(|i| (format!("e{i}"), 2)).collect();
    want.push(("fresh".into(), 1));
    want.sort();
    assert_eq!(all, want);
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
}

// ---------------------------------------------------------------------------------------------
// Sub-millisecond TTLs on Redis
// ---------------------------------------------------------------------------------------------

/// `with_dedup_ttl`: "How long dedup keys are remembered"; a zero TTL still queues (earlier
/// rounds). A TTL under a millisecond is not zero and not an error anywhere: a GitHub delivery
/// through the Redis queue must be queued (200), not refused by Redis for an expiry of 0 ms.
#[tokio::test]
async fn s108_redis_sub_millisecond_dedup_ttl_still_queues() {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("subms");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream, "g", "c", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    for ttl in [Duration::from_nanos(1), Duration::from_micros(999)] {
        let r = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone())
            .with_dedup_ttl(ttl);
        let body = format!("sub-ms {ttl:?}");
        let (s, _, text) = send(&r, gh_signed(&body)).await;
        assert_eq!(s, StatusCode::OK, "{ttl:?}: {text}");
        assert_eq!(count(&mut consumer).await, 1, "{ttl:?}");
    }
}

/// `with_ttl`: "How long responses are kept \[24 h\]. Errors: When `ttl` is zero." A TTL under a
/// millisecond is accepted, so the layer must work with it on Redis: the response is kept for
/// (at most) that long, never turned into a lock held for the 20 s lease. Guide: only "when the
/// store cannot keep even the marker (Redis down) does the key stay locked until its lease ends".
#[tokio::test]
async fn s108_redis_sub_millisecond_response_ttl_never_holds_the_key_for_the_lease() {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let store = sturdy::redis::RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(uniq("subms-idem"));
    let layer = IdempotencyLayer::new(store, ByCredentials::default())
        .with_ttl(Duration::from_micros(500))
        .unwrap()
        .with_lease(Duration::from_secs(20))
        .unwrap();
    let (app, runs) = counting_app(layer, Duration::ZERO);
    let (s, _, b) = read_resp(app.clone().oneshot(order("k-subms", "a")).await.unwrap()).await;
    assert_eq!((s, b.as_str()), (StatusCode::CREATED, "made a"));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, _, b) = read_resp(app.clone().oneshot(order("k-subms", "a")).await.unwrap()).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert!(runs.load(Ordering::SeqCst) >= 1);
}

// ---------------------------------------------------------------------------------------------
// A panic or an `Err` whose release the store refuses
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Boom {
    runs: Arc<AtomicUsize>,
    panic: bool,
}

impl Service<Request<Body>> for Boom {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let runs = self.runs.clone();
        let panic = self.panic;
        Box::pin(async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if n == 0 {
                if panic {
                    panic!("s108 handler panics");
                }
                return Err::<Response<Body>, BoxError>("s108 handler fails".into());
            }
            Ok(Response::builder()
                .status(201)
                .body(Body::from(body))
                .unwrap())
        })
    }
}

/// Module docs: "A handler that panics, fails (`Err`), or answers a status that is not stored
/// releases its key before its answer goes out, so a retry that follows at once runs"; guide:
/// a release the store fails (after a 5xx) "is tried again in the background ... until the
/// lease ends ... (while a failed release is tried again, a retry gets 409 with
/// `Retry-After`)". The same store refusing the release after a panic or an `Err`: the key must
/// not stay held for the whole 20 s lease once the store takes releases again.
#[tokio::test(start_paused = true)]
async fn s108_a_refused_release_after_a_panic_or_err_is_tried_again() {
    for panic in [false, true] {
        let store = Gated::new();
        store.fail_releases.store(2, Ordering::SeqCst);
        let layer = IdempotencyLayer::new(store.clone(), ByCredentials::default())
            .with_lease(Duration::from_secs(20))
            .unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let svc = tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(Boom {
                runs: runs.clone(),
                panic,
            });
        let first = tokio::spawn(svc.clone().oneshot(order("k-boom", "x")));
        let out = first.await;
        match (panic, out) {
            (true, Err(e)) => assert!(e.is_panic(), "{e}"),
            (false, Ok(Err(e))) => assert!(e.to_string().contains("s108 handler fails"), "{e}"),
            (p, other) => panic!("panic={p}: {:?}", other.map(|r| r.map(|x| x.status()))),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = svc.clone().oneshot(order("k-boom", "x")).await.unwrap();
        let (s, _, b) = read_resp(r).await;
        assert_eq!(
            (s, b.as_str()),
            (StatusCode::CREATED, "x"),
            "panic={panic}: the retry 2 s later runs (releases tried at {:?})",
            store.releases.lock().unwrap().len()
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}

// ---------------------------------------------------------------------------------------------
// A sender's re-signed retry, then a copy of that retry
// ---------------------------------------------------------------------------------------------

/// A wall clock moved by the test, in step with paused tokio time.
#[derive(Debug, Clone)]
struct Movable(Arc<Mutex<SystemTime>>);

impl WallClock for Movable {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

impl Movable {
    fn at(secs: i64) -> Self {
        Self(Arc::new(Mutex::new(
            UNIX_EPOCH + Duration::from_secs(secs as u64),
        )))
    }
    async fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
        tokio::time::advance(d).await;
    }
}

/// Guide, "How long a copy is refused": "Schemes with a signed timestamp (Standard Webhooks,
/// Stripe, ...): as long as the copy would pass the timestamp check. The dedup key is kept at
/// least until the timestamp plus the tolerance plus one second ... and a minute more, whatever
/// the dedup TTL". Standard Webhooks and Stripe retry an event under the same id, signed again
/// with a new timestamp: the retry is a duplicate, and a copy of the retry passes the timestamp
/// check until the retry's own timestamp plus the tolerance, so it must stay refused that long,
/// past the first delivery's window, with a short dedup TTL.
async fn copy_of_resigned_retry(scheme: &str) {
    let Some(dir) = node_dir() else {
        eprintln!("skip: STURDY_INTEROP_NODE_DIR not set");
        return;
    };
    let body = r#"{"id":"evt_s108_retry","object":"event"}"#;
    let t1 = NOW;
    let t2 = NOW + 240;
    let sigs = node_sign(
        &dir,
        &serde_json::json!([
            {"scheme":"stripe","secret":ST_SECRET,"timestamp":t1,"payload":body},
            {"scheme":"stripe","secret":ST_SECRET,"timestamp":t2,"payload":body},
            {"scheme":"standard","secret":SW_SECRET,"id":"msg_s108_retry","timestamp":t1,"payload":body},
            {"scheme":"standard","secret":SW_SECRET,"id":"msg_s108_retry","timestamp":t2,"payload":body},
        ]),
    );
    {
        let clock = Movable::at(NOW);
        let (queue, mut events) = MemoryQueue::new(10);
        let receiver = match scheme {
            "stripe" => WebhookReceiver::new(Stripe::new(ST_SECRET).unwrap(), queue),
            _ => WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue),
        }
        .with_dedup_ttl(Duration::from_secs(1))
        .with_clock(Arc::new(clock.clone()));
        let req = |n: usize| {
            let b = Request::post("/hooks");
            let b = if scheme == "stripe" {
                b.header("stripe-signature", &sigs[n])
            } else {
                b.header("webhook-id", "msg_s108_retry")
                    .header("webhook-timestamp", [t1, t2][n].to_string())
                    .header("webhook-signature", &sigs[2 + n])
            };
            b.body(Full::new(Bytes::from(body))).unwrap()
        };
        assert_eq!(send(&receiver, req(0)).await.0, StatusCode::OK);
        assert_eq!(drain(&mut events).len(), 1, "{scheme}: first delivery");
        clock.advance(Duration::from_secs(240)).await;
        assert_eq!(send(&receiver, req(1)).await.0, StatusCode::OK);
        assert!(
            drain(&mut events).is_empty(),
            "{scheme}: the retry is a duplicate"
        );
        // 400 s after t1: the first window (t1 + 300 + 1 + 60) is over; the retry's copy is
        // 160 s old and passes the timestamp check.
        clock.advance(Duration::from_secs(160)).await;
        let (s, _, text) = send(&receiver, req(1)).await;
        assert_eq!(s, StatusCode::OK, "{scheme}: {text}");
        assert!(
            drain(&mut events).is_empty(),
            "{scheme}: a copy of the retry, within its own window, was queued a second time"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn s108_memory_standard_copy_of_a_resigned_retry_is_refused_in_its_window() {
    copy_of_resigned_retry("standard").await;
}

#[tokio::test(start_paused = true)]
async fn s108_memory_stripe_copy_of_a_resigned_retry_is_refused_in_its_window() {
    copy_of_resigned_retry("stripe").await;
}

/// One raw RESP command to the standalone Redis; the first line of the reply.
async fn redis_line(url: &str, args: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url
        .trim_start_matches("redis://")
        .rsplit('@')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).trim().to_string()
}

/// The same promise on the Redis queue, read through its documented key layout
/// (`<base>:seen:<dedup key>`, expiring with the dedup TTL): with the receiver's clock 290 s
/// past a first delivery's timestamp, its key has about 71 s to live (300 + 1 + 60 - 290); a
/// re-signed retry 10 s old is a duplicate and passes the timestamp check for another 291 s, so
/// after it the key must live about 351 s.
async fn redis_copy_of_resigned_retry(scheme: &str) {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("resigned");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream.clone(), "g", "c", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let body = r#"{"id":"evt_s108_redis_retry","object":"event"}"#;
    let (t1, t2) = (NOW, NOW + 280);
    let receiver = match scheme {
        "stripe" => WebhookReceiver::new(Stripe::new(ST_SECRET).unwrap(), queue.clone()),
        _ => WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone()),
    }
    .with_dedup_ttl(Duration::from_secs(1))
    .with_clock(clock_at(NOW + 290));
    let (id, req): (&str, Box<dyn Fn(i64) -> Request<Full<Bytes>>>) = if scheme == "stripe" {
        (
            "evt_s108_redis_retry",
            Box::new(move |t| {
                Request::post("/hooks")
                    .header(
                        "stripe-signature",
                        sturdy::webhook::sign_stripe(ST_SECRET, t, body.as_bytes()),
                    )
                    .body(Full::new(Bytes::from(body)))
                    .unwrap()
            }),
        )
    } else {
        (
            "msg_s108_redis_retry",
            Box::new(move |t| sw_signed("msg_s108_redis_retry", t, body)),
        )
    };
    let key = format!(
        "{stream}:seen:{}",
        WebhookEvent::new(scheme, id, Bytes::new()).dedup_key()
    );
    let pttl = |k: String| {
        let url = url.clone();
        async move {
            let l = redis_line(&url, &["PTTL", &k]).await;
            l.trim_start_matches(':').parse::<i64>().unwrap()
        }
    };
    assert_eq!(send(&receiver, req(t1)).await.0, StatusCode::OK);
    assert_eq!(count(&mut consumer).await, 1);
    let first = pttl(key.clone()).await;
    assert!(
        (60_000..=72_000).contains(&first),
        "{scheme}: first key ttl {first} ms ({key})"
    );
    assert_eq!(send(&receiver, req(t2)).await.0, StatusCode::OK);
    assert_eq!(
        count(&mut consumer).await,
        0,
        "{scheme}: the retry is a duplicate"
    );
    let after = pttl(key.clone()).await;
    let _ = redis_line(&url, &["DEL", &key, &stream]).await;
    assert!(
        after >= 340_000,
        "{scheme}: after the retry the key lives {after} ms, but the retry's copy passes for 291 s"
    );
}

#[tokio::test]
async fn s108_redis_standard_copy_of_a_resigned_retry_is_refused_in_its_window() {
    redis_copy_of_resigned_retry("standard").await;
}

#[tokio::test]
async fn s108_redis_stripe_copy_of_a_resigned_retry_is_refused_in_its_window() {
    redis_copy_of_resigned_retry("stripe").await;
}

// ---------------------------------------------------------------------------------------------
// One MemoryStore under two layers with different TTLs
// ---------------------------------------------------------------------------------------------

/// Guide, "Stores": "When the store is full, the completed response that expires first makes
/// room"; `MemoryStore`: "the completed response that expires first goes (the oldest, with one
/// TTL)". With two TTLs the oldest is not the one that expires first.
#[tokio::test(start_paused = true)]
async fn s108_a_full_memory_store_evicts_what_expires_first_not_the_oldest() {
    let store = MemoryStore::new(2).unwrap();
    let long = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_ttl(Duration::from_secs(3_600))
        .unwrap();
    let short = IdempotencyLayer::new(store.clone(), ByCredentials::default())
        .with_ttl(Duration::from_secs(60))
        .unwrap();
    let (long_app, long_runs) = counting_app(long, Duration::ZERO);
    let (short_app, short_runs) = counting_app(short, Duration::ZERO);
    let (s, _, _) = read_resp(
        long_app
            .clone()
            .oneshot(order("k-old-long", "a"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    tokio::time::advance(Duration::from_secs(1)).await;
    let (s, _, _) = read_resp(
        short_app
            .clone()
            .oneshot(order("k-new-short", "b"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(store.len(), 2);
    tokio::time::advance(Duration::from_secs(1)).await;
    // A third key: the store is full; the short one (expires at 61 s) goes, not the older one.
    let (s, _, _) = read_resp(
        long_app
            .clone()
            .oneshot(order("k-third", "c"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(store.len(), 2);
    let (s, h, b) = read_resp(
        long_app
            .clone()
            .oneshot(order("k-old-long", "a"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (
            s,
            h.get("idempotent-replayed")
                .map(|v| v.to_str().unwrap().to_string())
        ),
        (StatusCode::CREATED, Some("true".to_string())),
        "the response that expires last was kept: {b}"
    );
    assert_eq!(long_runs.load(Ordering::SeqCst), 2);
    let (s, h, _) = read_resp(
        short_app
            .clone()
            .oneshot(order("k-new-short", "b"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(
        !h.contains_key("idempotent-replayed"),
        "the one that expires first made room"
    );
    assert_eq!(short_runs.load(Ordering::SeqCst), 2);
}

/// Guide: "The dedup key is kept at least until the timestamp plus the tolerance plus one
/// second ... and a minute more, whatever the dedup TTL". A delivery dated 299 s ahead (within
/// the tolerance both ways) passes until 600 s from now, so its copy 599 s later is refused,
/// in memory and in Redis (key kept about 660 s).
#[tokio::test(start_paused = true)]
async fn s108_a_future_dated_delivery_is_remembered_through_its_whole_window() {
    let clock = Movable::at(NOW);
    let (queue, mut events) = MemoryQueue::new(10);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_dedup_ttl(Duration::from_secs(1))
        .with_clock(Arc::new(clock.clone()));
    let ts = NOW + 299;
    assert_eq!(
        send(&receiver, sw_signed("msg_future", ts, "f")).await.0,
        StatusCode::OK
    );
    assert_eq!(drain(&mut events).len(), 1);
    clock.advance(Duration::from_secs(599)).await;
    assert_eq!(
        send(&receiver, sw_signed("msg_future", ts, "f")).await.0,
        StatusCode::OK
    );
    assert!(
        drain(&mut events).is_empty(),
        "the copy 599 s later is a duplicate"
    );
    clock.advance(Duration::from_secs(2)).await;
    let (s, _, text) = send(&receiver, sw_signed("msg_future", ts, "f")).await;
    assert_eq!(
        (s, text.as_str()),
        (StatusCode::UNAUTHORIZED, "invalid signature"),
        "stale now"
    );
}

#[tokio::test]
async fn s108_redis_a_future_dated_delivery_key_lives_through_its_window() {
    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("future");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_dedup_ttl(Duration::from_secs(1))
        .with_clock(clock_at(NOW));
    assert_eq!(
        send(&receiver, sw_signed("msg_future", NOW + 299, "f"))
            .await
            .0,
        StatusCode::OK
    );
    let key = format!(
        "{stream}:seen:{}",
        WebhookEvent::new("standard", "msg_future", Bytes::new()).dedup_key()
    );
    let l = redis_line(&url, &["PTTL", &key]).await;
    let _ = redis_line(&url, &["DEL", &key, &stream]).await;
    let ttl: i64 = l.trim_start_matches(':').parse().unwrap();
    assert!((650_000..=661_000).contains(&ttl), "{ttl} ms");
}

/// Guide, step 5: "Dedup and queue: deduplicated per scheme and route ..., then queued. ... a
/// duplicate gets 200 and is not queued again; a full queue gets 503". Dedup comes first: a copy
/// of the event that filled the queue is a duplicate (200), not a 503 that makes the sender
/// deliver it again and again; a new event still gets 503.
#[tokio::test]
async fn s108_a_duplicate_of_the_event_that_filled_the_queue_is_200() {
    let (queue, mut events) = MemoryQueue::new(1);
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW));
    assert_eq!(
        send(&receiver, sw_signed("msg_fill", NOW, "1")).await.0,
        StatusCode::OK
    );
    let (s, _, text) = send(&receiver, sw_signed("msg_fill", NOW, "1")).await;
    assert_eq!(s, StatusCode::OK, "memory: {text}");
    assert_eq!(
        send(&receiver, sw_signed("msg_new", NOW, "2")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(drain(&mut events).len(), 1);

    let Some(url) = redis_url() else {
        eprintln!("skip: STURDY_REDIS_URL not set");
        return;
    };
    let stream = uniq("fill");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap()
        .with_max_backlog(1);
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream.clone(), "g", "c", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW));
    assert_eq!(
        send(&receiver, sw_signed("msg_fill", NOW, "1")).await.0,
        StatusCode::OK
    );
    let (s, _, text) = send(&receiver, sw_signed("msg_fill", NOW, "1")).await;
    assert_eq!(s, StatusCode::OK, "redis: {text}");
    assert_eq!(
        send(&receiver, sw_signed("msg_new", NOW, "2")).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(count(&mut consumer).await, 1);
}

/// `running()`: "Shared by the layer's clones and the services it made". A clone configured
/// further (`with_lease`, `with_require_key`) is still a clone: the original counts its
/// handlers, and its `wait_idle` waits for them.
#[tokio::test(start_paused = true)]
async fn s108_running_is_shared_by_clones_configured_further() {
    let base = IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default());
    let configured = base
        .clone()
        .with_lease(Duration::from_secs(60))
        .unwrap()
        .with_require_key(true);
    let (app, _runs) = counting_app(configured.clone(), Duration::from_secs(5));
    let h = tokio::spawn(app.clone().oneshot(order("k-clone", "a")));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(configured.running(), 1);
    assert_eq!(base.running(), 1, "the original counts its clone's handler");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), base.wait_idle())
            .await
            .is_err(),
        "and waits for it"
    );
    let _ = h.await.unwrap().unwrap();
    assert_eq!(base.running(), 0);
}
