//! Outside round s77: `sturdy-webhook` (and its Redis Streams queue) judged from its public docs
//! (docs/guides/webhooks.md, docs/RELIABILITY.md, the crates' rustdoc), on angles earlier rounds
//! left: `Verified::with_timestamp` and the verifiers called directly with hostile clocks, a
//! second signature/timestamp header line, custom verifiers (no id, a panic inline or offloaded),
//! setters and callbacks on clones, Stripe ids that are not usable, a body whose size hint lies,
//! the receiver outside a tokio runtime, and the Redis queue: an event's fields byte for byte
//! through the stream, bursts over two connections, a sender cut at seeded points on the wire.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::events::{Event, WebhookOutcome};
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, BoxFuture, EventQueue, GenericHmac, GitHub,
    MemoryQueue, MemoryReceiver, Push, Rejection, SourceAllowlist, StandardWebhooks, Stripe,
    Verified, Verifier, WebhookEvent, WebhookReceiver,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STRIPE_SECRET: &str = "whsec_s77_stripe_endpoint_secret";
const GH_SECRET: &str = "s77 GitHub secret";
const NOW: i64 = 1_700_000_000;

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

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn clock_at(secs: i64) -> Arc<dyn WallClock> {
    Arc::new(Fixed(at(secs)))
}

fn real_now() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A seeded splitmix64 (no `rand` in this package's dev-dependencies).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Req = Request<Full<Bytes>>;

fn sw_req(id: &str, ts: i64, body: &[u8]) -> Req {
    let sig = sign_standard(SW_SECRET, id, ts, body).unwrap();
    Request::post("/wh")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap()
}

fn stripe_req(sig: &str, body: impl Into<Bytes>) -> Req {
    Request::post("/wh")
        .header("stripe-signature", sig)
        .body(Full::new(body.into()))
        .unwrap()
}

fn gh_req(body: impl Into<Bytes>) -> Req {
    let body = body.into();
    Request::post("/wh")
        .header("x-hub-signature-256", sign_github(GH_SECRET, &body))
        .body(Full::new(body))
        .unwrap()
}

async fn send<Q: EventQueue, B>(r: &WebhookReceiver<Q>, req: Request<B>) -> StatusCode
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let resp = tokio::time::timeout(Duration::from_secs(5), r.clone().oneshot(req))
        .await
        .expect("the receiver answered within 5 s")
        .unwrap();
    let status = resp.status();
    let _ = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect()).await;
    status
}

fn drain(events: &mut MemoryReceiver) -> Vec<WebhookEvent> {
    let mut out = Vec::new();
    while let Some(e) = events.try_recv() {
        out.push(e);
    }
    out
}

type Seen = Arc<Mutex<Vec<(String, WebhookOutcome, StatusCode)>>>;

fn outcomes() -> (Seen, impl Fn(&Event<'_>) + Send + Sync + 'static) {
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let f = move |e: &Event<'_>| {
        if let Event::WebhookReceived {
            route,
            outcome,
            status,
            ..
        } = e
        {
            s.lock()
                .unwrap()
                .push((route.to_string(), *outcome, *status));
        }
    };
    (seen, f)
}

fn taken(seen: &Seen) -> Vec<(String, WebhookOutcome, StatusCode)> {
    std::mem::take(&mut *seen.lock().unwrap())
}

/// The hex of a `sha256=<hex>` GitHub-style signature of `content` with `secret`: an
/// HMAC-SHA256 computed by the crate's own signer, used for generic schemes.
fn hmac_hex(secret: &str, content: &[u8]) -> String {
    sign_github(secret, content)
        .strip_prefix("sha256=")
        .unwrap()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Verified::with_timestamp and the verifiers with hostile clocks
// ---------------------------------------------------------------------------------------------

/// `Verified::with_timestamp`: "the signed timestamp plus the tolerance's whole seconds plus one
/// second"; with `Duration::MAX` "the latest time a `SystemTime` can hold". At i64's ends and
/// with odd tolerances: no panic, and never a time before the timestamp itself.
#[test]
fn s77_fresh_until_is_timestamp_plus_whole_tolerance_plus_one_and_never_panics() {
    let fu = |ts: i64, tol: Duration| {
        std::panic::catch_unwind(|| Verified::new().with_timestamp(ts, tol))
            .unwrap_or_else(|_| panic!("with_timestamp({ts}, {tol:?}) panicked"))
    };
    for (ts, tol, want) in [
        (NOW, Duration::from_secs(300), NOW + 301),
        (NOW, Duration::from_millis(1_900), NOW + 2),
        (NOW, Duration::from_millis(999), NOW + 1),
        (NOW, Duration::ZERO, NOW + 1),
        (0, Duration::from_secs(1), 2),
    ] {
        let v = fu(ts, tol);
        assert_eq!(v.timestamp, Some(ts));
        assert_eq!(v.fresh_until, Some(at(want)), "ts {ts}, tolerance {tol:?}");
    }
    // Before 1970: at least that long ("the receiver remembers its id at least that long").
    for (ts, tol, least) in [
        (-1, Duration::ZERO, 0),
        (-10_000, Duration::from_secs(5), -9_994),
    ] {
        let v = fu(ts, tol);
        assert!(
            v.fresh_until.unwrap() >= at(least),
            "ts {ts}: {:?}",
            v.fresh_until
        );
    }
    let v = fu(NOW, Duration::MAX);
    let latest = v.fresh_until.expect("a time");
    assert!(
        latest.checked_add(Duration::from_nanos(1)).is_none(),
        "Duration::MAX gives the latest SystemTime, got {latest:?}"
    );
    // The same latest time whatever the timestamp.
    for ts in [i64::MIN, -1, 0, i64::MAX] {
        assert_eq!(fu(ts, Duration::MAX).fresh_until, Some(latest), "ts {ts}");
    }
    // Timestamps at i64's ends with a normal tolerance: no panic, and nothing earlier than the
    // timestamp (a wrap to the past would let a copy through as soon as the key is forgotten).
    for ts in [i64::MAX, i64::MAX - 300, i64::MIN, i64::MIN + 1] {
        for tol in [
            Duration::ZERO,
            Duration::from_secs(300),
            Duration::from_secs(u64::MAX),
        ] {
            let v = fu(ts, tol);
            let Some(until) = v.fresh_until else {
                panic!("ts {ts}, tolerance {tol:?}: fresh_until None for a signed timestamp");
            };
            let stamp = if ts >= 0 {
                UNIX_EPOCH.checked_add(Duration::from_secs(ts as u64))
            } else {
                UNIX_EPOCH.checked_sub(Duration::from_secs(ts.unsigned_abs()))
            };
            if let Some(stamp) = stamp {
                assert!(until > stamp, "ts {ts}, tolerance {tol:?}: {until:?}");
            }
        }
    }
}

/// The three timestamped schemes called directly (`check_headers`, `verify`) with hostile
/// clocks (before 1970, at the epoch, far future, the latest `SystemTime`) and hostile
/// timestamps: no panic ever; with the default tolerance a delivery is accepted exactly when
/// its age is within 5 minutes either way; with `Duration::MAX` any well-signed non-negative
/// timestamp is accepted at any clock.
#[test]
fn s77_verifiers_called_directly_with_hostile_clocks_never_panic() {
    let latest = Verified::new()
        .with_timestamp(0, Duration::MAX)
        .fresh_until
        .unwrap();
    let latest_secs = latest
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i128);
    let clocks: Vec<(String, SystemTime, Option<i128>)> = vec![
        (
            "1970 - 1e11 s".into(),
            at(-100_000_000_000),
            Some(-100_000_000_000),
        ),
        (
            "1969-12-31T23:59:59.5".into(),
            UNIX_EPOCH - Duration::from_millis(500),
            Some(-1),
        ),
        ("the epoch".into(), UNIX_EPOCH, Some(0)),
        ("NOW".into(), at(NOW), Some(NOW as i128)),
        (
            "year 292e9".into(),
            at(i64::MAX - 10),
            Some(i64::MAX as i128 - 10),
        ),
        ("latest SystemTime".into(), latest, latest_secs),
    ];
    let stamps: Vec<i64> = vec![
        i64::MIN,
        -100_000_000_000,
        -1,
        0,
        1,
        NOW - 301,
        NOW - 300,
        NOW,
        NOW + 300,
        NOW + 301,
        i64::MAX - 10,
        i64::MAX,
    ];
    let body = br#"{"id":"evt_s77","object":"event"}"#;
    let mut failures = Vec::new();
    for (tol_name, tol) in [("default", None), ("MAX", Some(Duration::MAX))] {
        let mut sw = StandardWebhooks::new(SW_SECRET).unwrap();
        let mut st = Stripe::new(STRIPE_SECRET).unwrap();
        let mut ge = GenericHmac::new(
            "s77gen",
            HeaderName::from_static("x-s77-signature"),
            "generic-secret",
        )
        .unwrap()
        .with_timestamp_header(HeaderName::from_static("x-s77-timestamp"));
        if let Some(t) = tol {
            sw = sw.with_tolerance(t);
            st = st.with_tolerance(t);
            ge = ge.with_tolerance(t);
        }
        let verifiers: Vec<(&str, Box<dyn Verifier>)> = vec![
            ("standard", Box::new(sw)),
            ("stripe", Box::new(st)),
            ("generic", Box::new(ge)),
        ];
        for &ts in &stamps {
            let mut h_sw = HeaderMap::new();
            h_sw.insert("webhook-id", HeaderValue::from_static("msg_s77"));
            h_sw.insert("webhook-timestamp", ts.to_string().parse().unwrap());
            h_sw.insert(
                "webhook-signature",
                sign_standard(SW_SECRET, "msg_s77", ts, body)
                    .unwrap()
                    .parse()
                    .unwrap(),
            );
            let mut h_st = HeaderMap::new();
            h_st.insert(
                "stripe-signature",
                sign_stripe(STRIPE_SECRET, ts, body).parse().unwrap(),
            );
            let mut h_ge = HeaderMap::new();
            h_ge.insert("x-s77-timestamp", ts.to_string().parse().unwrap());
            let mut content = format!("{ts}.").into_bytes();
            content.extend_from_slice(body);
            h_ge.insert(
                "x-s77-signature",
                hmac_hex("generic-secret", &content).parse().unwrap(),
            );
            for (clock_name, now, now_secs) in &clocks {
                for ((scheme, v), headers) in verifiers.iter().zip([&h_sw, &h_st, &h_ge]) {
                    let what = format!("{scheme} tol {tol_name} ts {ts} at {clock_name}");
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let pre = v.check_headers(headers, *now);
                        let full = v.verify(headers, body, *now);
                        (pre.map(|_| ()), full.map(|v| (v.timestamp, v.fresh_until)))
                    }));
                    let Ok((pre, full)) = run else {
                        failures.push(format!("{what}: panicked"));
                        continue;
                    };
                    let accepted = full.is_ok();
                    if pre.is_err() && accepted {
                        failures.push(format!("{what}: headers refused, verify accepted"));
                    }
                    if let Ok((stamp, _)) = &full {
                        if *stamp != Some(ts) {
                            failures.push(format!("{what}: timestamp {stamp:?}"));
                        }
                    }
                    let expect = match (tol, now_secs) {
                        (Some(_), _) if ts >= 0 => Some(true),
                        (Some(_), _) => None,
                        (None, Some(n)) => Some((n - ts as i128).abs() <= 300),
                        (None, None) => None,
                    };
                    if let Some(e) = expect {
                        if e != accepted {
                            failures.push(format!(
                                "{what}: accepted {accepted}, expected {e} ({:?})",
                                full.as_ref().err().map(|r| (r.status, r.reason.clone()))
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// A second header line
// ---------------------------------------------------------------------------------------------

/// A captured stale Stripe delivery, or a generic one with a timestamp header, resent with a
/// second header line that looks fresh (a fresh `t=` with a made-up `v1`, or a second
/// timestamp line): never 200, never queued, in either order of the lines. (s53 tried this for
/// Standard Webhooks' timestamp line and for two `t=` within one Stripe line.)
#[tokio::test]
async fn s77_a_second_header_line_cannot_refresh_a_stale_signature() {
    let old = NOW - 3_600;
    let body = br#"{"id":"evt_stale_s77","object":"event"}"#;
    let (queue, mut rx) = MemoryQueue::new(100);
    let st = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW));
    let stale = sign_stripe(STRIPE_SECRET, old, body);
    let fresh_fake = format!("t={NOW},v1={}", "ab".repeat(32));
    let fresh_t_only = format!("t={NOW}");
    let mut got = Vec::new();
    for lines in [
        [stale.clone(), fresh_fake.clone()],
        [fresh_fake.clone(), stale.clone()],
        [stale.clone(), fresh_t_only.clone()],
        [fresh_t_only.clone(), stale.clone()],
    ] {
        let mut req = stripe_req(&lines[0], Bytes::from_static(body));
        req.headers_mut()
            .append("stripe-signature", lines[1].parse().unwrap());
        got.push((format!("stripe {lines:?}"), send(&st, req).await));
    }
    let ge = WebhookReceiver::new(
        GenericHmac::new("s77gen", HeaderName::from_static("x-sig"), "generic-secret")
            .unwrap()
            .with_timestamp_header(HeaderName::from_static("x-ts")),
        queue.clone(),
    )
    .with_clock(clock_at(NOW));
    let mut content = format!("{old}.").into_bytes();
    content.extend_from_slice(body);
    let sig = hmac_hex("generic-secret", &content);
    for order in [[old, NOW], [NOW, old]] {
        let req = Request::post("/wh")
            .header("x-sig", &sig)
            .header("x-ts", order[0].to_string())
            .header("x-ts", order[1].to_string())
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        got.push((format!("generic ts lines {order:?}"), send(&ge, req).await));
    }
    // The stale signature alone is 401 (the control).
    got.push((
        "stripe stale alone".into(),
        send(&st, stripe_req(&stale, Bytes::from_static(body))).await,
    ));
    for (what, s) in &got {
        assert_ne!(*s, StatusCode::OK, "{what}: {got:?}");
        assert!(s.is_client_error(), "{what}: {got:?}");
    }
    assert!(drain(&mut rx).is_empty(), "nothing stale queued");
    // And the fresh delivery itself is accepted through the same receivers.
    assert_eq!(
        send(
            &st,
            stripe_req(
                &sign_stripe(STRIPE_SECRET, NOW, body),
                Bytes::from_static(body)
            )
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(drain(&mut rx).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Custom verifiers
// ---------------------------------------------------------------------------------------------

/// A verifier that accepts everything, gives no id, and panics on a body starting `boom`.
#[derive(Debug)]
struct Custom {
    check_panics: bool,
}

impl Verifier for Custom {
    fn scheme(&self) -> &'static str {
        "custom"
    }

    fn check_headers(&self, headers: &HeaderMap, _now: SystemTime) -> Result<(), Rejection> {
        if self.check_panics && headers.contains_key("x-boom") {
            panic!("a verifier bug in check_headers");
        }
        Ok(())
    }

    fn verify(
        &self,
        _headers: &HeaderMap,
        body: &[u8],
        _now: SystemTime,
    ) -> Result<Verified, Rejection> {
        if body.starts_with(b"boom") {
            panic!("a verifier bug in verify");
        }
        Ok(Verified::new())
    }
}

fn plain(body: impl Into<Bytes>) -> Req {
    Request::post("/wh").body(Full::new(body.into())).unwrap()
}

/// `Verified::id`: "`None` lets the receiver use a digest of the body". A custom verifier that
/// gives none: the event's id is `sha256:<hex>` of the body, the same digest the GitHub scheme
/// uses for the same body (`WebhookEvent::id`: "`sha256:<hex>`, a digest of the signed
/// content"); the same body twice is one event, another body another.
#[tokio::test]
async fn s77_a_verifier_without_an_id_is_deduplicated_on_the_body_digest() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let custom = WebhookReceiver::new(
        Custom {
            check_panics: false,
        },
        queue.clone(),
    );
    let gh = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue);
    let body = "the same body, \u{1F980}";
    assert_eq!(send(&custom, plain(body)).await, StatusCode::OK);
    assert_eq!(send(&custom, plain(body)).await, StatusCode::OK);
    assert_eq!(send(&custom, plain("another body")).await, StatusCode::OK);
    assert_eq!(send(&gh, gh_req(body)).await, StatusCode::OK);
    let events = drain(&mut rx);
    assert_eq!(events.len(), 3, "{events:?}");
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    for id in &ids {
        let hex = id.strip_prefix("sha256:").expect("sha256: digest");
        assert_eq!(hex.len(), 64, "{id}");
        assert!(
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
    }
    assert_ne!(ids[0], ids[1], "another body, another id");
    assert_eq!(ids[0], ids[2], "the GitHub digest of the same body");
    assert_eq!(
        (events[0].route.as_str(), events[2].route.as_str()),
        ("custom", "github")
    );
}

/// `WebhookOutcome::Rejected`: "or 500 when the verifier failed to run". A verifier that panics
/// on a body verified off the runtime (over 64 KiB): 500, reported as `Rejected` with 500,
/// nothing queued, and the receiver goes on (the next delivery is 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s77_a_verifier_that_panics_off_the_runtime_is_a_500() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let (seen, hook) = outcomes();
    let r = WebhookReceiver::new(
        Custom {
            check_panics: false,
        },
        queue,
    )
    .on_event(hook);
    let mut big = b"boom".to_vec();
    big.resize(200 * 1024, b'x');
    assert_eq!(
        send(&r, plain(big)).await,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        taken(&seen),
        vec![(
            "custom".to_string(),
            WebhookOutcome::Rejected,
            StatusCode::INTERNAL_SERVER_ERROR
        )]
    );
    assert!(drain(&mut rx).is_empty());
    assert_eq!(
        send(&r, plain(vec![b'y'; 200 * 1024])).await,
        StatusCode::OK
    );
    assert_eq!(drain(&mut rx).len(), 1);
}

/// The same panicking verifier on a small body (verified in place) and in `check_headers`:
/// the receiver's error type is `Infallible`, "every outcome is a response", and a verifier
/// that fails to run is "500": the sender should get a 500 as for a large body, not a dropped
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s77_a_verifier_that_panics_in_place_is_a_500_too() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(Custom { check_panics: true }, queue);
    let mut got = Vec::new();
    for (what, req) in [
        ("verify, small body", plain("boom, small")),
        (
            "check_headers",
            Request::post("/wh")
                .header("x-boom", "1")
                .body(Full::new(Bytes::from_static(b"ok")))
                .unwrap(),
        ),
    ] {
        let r2 = r.clone();
        let task = tokio::spawn(async move { r2.oneshot(req).await.unwrap().status() });
        let res = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("answered");
        got.push((what, res.map_err(|e| e.is_panic())));
    }
    assert!(drain(&mut rx).is_empty());
    assert_eq!(send(&r, plain("fine")).await, StatusCode::OK, "still works");
    for (what, res) in &got {
        assert_eq!(
            *res,
            Ok(StatusCode::INTERNAL_SERVER_ERROR),
            "{what}: Err(true) is a panic out of the response future: {got:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Clones, callbacks
// ---------------------------------------------------------------------------------------------

/// `WebhookReceiver` "# Clone": "A `with_*` setter called on a clone changes that clone only";
/// `on_event` "replaces an earlier callback"; every answered delivery gives one event whose
/// status is the one sent.
#[tokio::test]
async fn s77_setters_and_callbacks_on_a_clone_change_that_clone_only() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let (seen_a, hook_a) = outcomes();
    let (seen_b, hook_b) = outcomes();
    let (seen_c, hook_c) = outcomes();
    let base = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
        .with_clock(clock_at(NOW))
        .on_event(hook_a);
    let small = base
        .clone()
        .with_body_limit(16)
        .with_route("billing")
        .on_event(hook_b)
        .on_event(hook_c);
    let body = [b'z'; 100];
    assert_eq!(
        send(&base, sw_req("msg_1", NOW, &body)).await,
        StatusCode::OK
    );
    assert_eq!(
        send(&small, sw_req("msg_2", NOW, &body)).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // The same id on the other route: its own id space, queued.
    assert_eq!(
        send(&small, sw_req("msg_1", NOW, b"{}")).await,
        StatusCode::OK
    );
    assert_eq!(
        send(&base, sw_req("msg_1", NOW, b"{}")).await,
        StatusCode::OK
    );
    let ev = drain(&mut rx);
    let routes: Vec<(&str, &str)> = ev
        .iter()
        .map(|e| (e.route.as_str(), e.id.as_str()))
        .collect();
    assert_eq!(routes, vec![("standard", "msg_1"), ("billing", "msg_1")]);
    assert_eq!(
        taken(&seen_a),
        vec![
            ("standard".into(), WebhookOutcome::Accepted, StatusCode::OK),
            ("standard".into(), WebhookOutcome::Duplicate, StatusCode::OK),
        ]
    );
    assert!(taken(&seen_b).is_empty(), "replaced by the later callback");
    assert_eq!(
        taken(&seen_c),
        vec![
            (
                "billing".into(),
                WebhookOutcome::Rejected,
                StatusCode::PAYLOAD_TOO_LARGE
            ),
            ("billing".into(), WebhookOutcome::Accepted, StatusCode::OK),
        ]
    );
}

/// A queue that answers what it is told.
#[derive(Debug, Clone)]
struct Scripted {
    inner: MemoryQueue,
    mode: Arc<AtomicUsize>,
}

impl EventQueue for Scripted {
    fn push(&self, event: WebhookEvent, ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        match self.mode.load(Ordering::SeqCst) {
            1 => Box::pin(async { Ok(Push::Full) }),
            2 => Box::pin(async { Err::<Push, BoxError>("store down".into()) }),
            3 => Box::pin(async { Ok(Push::Duplicate) }),
            _ => self.inner.push(event, ttl),
        }
    }
}

/// One `WebhookReceived` per answered delivery, its status the one sent, for every kind of
/// answer: 403, 400, 401, 413, 200 (accepted, duplicate, and a queue's own `Duplicate`), 503
/// (full, failed, each with a `Retry-After` of whole seconds).
#[tokio::test]
async fn s77_every_answer_is_reported_once_with_the_status_sent() {
    let (inner, mut rx) = MemoryQueue::new(100);
    let mode = Arc::new(AtomicUsize::new(0));
    let q = Scripted {
        inner,
        mode: mode.clone(),
    };
    let (seen, hook) = outcomes();
    let r = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), q)
        .with_clock(clock_at(NOW))
        .with_body_limit(64)
        .on_event(hook);
    let walled = r
        .clone()
        .with_source_allowlist(SourceAllowlist::new(["192.0.2.0/24"]).unwrap());
    let mut answers = Vec::new();
    answers.push(send(&walled, sw_req("m403", NOW, b"{}")).await);
    let mut bad = sw_req("m400", NOW, b"{}");
    bad.headers_mut().remove("webhook-timestamp");
    answers.push(send(&r, bad).await);
    answers.push(send(&r, sw_req("m401", NOW - 301, b"{}")).await);
    answers.push(send(&r, sw_req("m413", NOW, &[b'a'; 65])).await);
    answers.push(send(&r, sw_req("m200", NOW, b"{}")).await);
    answers.push(send(&r, sw_req("m200", NOW, b"{}")).await);
    for m in [1, 2, 3] {
        mode.store(m, Ordering::SeqCst);
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            r.clone().oneshot(sw_req(&format!("mq{m}"), NOW, b"{}")),
        )
        .await
        .unwrap()
        .unwrap();
        if resp.status() == StatusCode::SERVICE_UNAVAILABLE {
            let ra = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap_or("").to_string());
            let ok = ra
                .as_deref()
                .is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n >= 1));
            assert!(ok, "mode {m}: Retry-After {ra:?}");
        }
        answers.push(resp.status());
    }
    let s = |n: u16| StatusCode::from_u16(n).unwrap();
    assert_eq!(
        answers,
        [403, 400, 401, 413, 200, 200, 503, 503, 200]
            .map(s)
            .to_vec()
    );
    let reported: Vec<(WebhookOutcome, StatusCode)> =
        taken(&seen).into_iter().map(|(_, o, st)| (o, st)).collect();
    use WebhookOutcome as O;
    assert_eq!(
        reported,
        vec![
            (O::Rejected, s(403)),
            (O::Rejected, s(400)),
            (O::Rejected, s(401)),
            (O::Rejected, s(413)),
            (O::Accepted, s(200)),
            (O::Duplicate, s(200)),
            (O::QueueFull, s(503)),
            (O::QueueFailed, s(503)),
            (O::Duplicate, s(200)),
        ]
    );
    assert_eq!(drain(&mut rx).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Stripe ids
// ---------------------------------------------------------------------------------------------

/// Stripe: "a body without a usable `id` is deduplicated on a digest of the signed `t.body`";
/// "a longer Stripe `id` in the body is not used". Two different events sharing an unusable id
/// (a number, null, true, an object, an array, 257 bytes, an id only inside `data`) are both
/// queued, each under a `sha256:` digest; a usable id (256 bytes, non-ASCII) is used as is.
#[tokio::test]
async fn s77_stripe_unusable_ids_never_merge_two_events() {
    let (queue, mut rx) = MemoryQueue::new(1_000);
    let r =
        WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue).with_clock(clock_at(NOW));
    let long = "e".repeat(257);
    let unusable = [
        "5".to_string(),
        "null".into(),
        "true".into(),
        r#"{"x":1}"#.into(),
        r#"["evt_1"]"#.into(),
        format!("\"{long}\""),
    ];
    let mut failures = Vec::new();
    for (k, id) in unusable.iter().enumerate() {
        for n in 0..2 {
            let body = format!(r#"{{"id":{id},"n":{n},"k":{k}}}"#);
            let s = send(
                &r,
                stripe_req(&sign_stripe(STRIPE_SECRET, NOW, body.as_bytes()), body),
            )
            .await;
            if s != StatusCode::OK {
                failures.push(format!("id {id} n {n}: {s}"));
            }
        }
        let ev = drain(&mut rx);
        if ev.len() != 2 || ev.iter().any(|e| !e.id.starts_with("sha256:")) {
            failures.push(format!(
                "id {id}: {:?}",
                ev.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
            ));
        }
    }
    let ok256 = "f".repeat(256);
    for id in [ok256.as_str(), "évt_ünïcode", "evt with spaces"] {
        let body = format!(r#"{{"id":"{id}","object":"event"}}"#);
        let s = send(
            &r,
            stripe_req(&sign_stripe(STRIPE_SECRET, NOW, body.as_bytes()), body),
        )
        .await;
        let ev = drain(&mut rx);
        if s != StatusCode::OK || ev.len() != 1 || ev[0].id != id {
            failures.push(format!(
                "usable {id}: {s} {:?}",
                ev.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A body with two top-level `id`s (`{"id":"evt_A","id":"evt_B"}`): JSON parsers that keep
/// the last (serde_json's `Value`, JavaScript's `JSON.parse`, what a handler reads) see
/// `evt_B`; the dedup id must not be `evt_A`, or a second event `{"id":"evt_A","id":"evt_C"}`
/// is taken for a copy of an event the handler knows as `evt_B`.
#[tokio::test]
async fn s77_stripe_duplicate_id_keys_do_not_dedup_on_an_id_the_handler_never_sees() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let r =
        WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue).with_clock(clock_at(NOW));
    let mut got = Vec::new();
    for last in ["evt_B", "evt_C"] {
        let body = format!(r#"{{"id":"evt_A","id":"{last}"}}"#);
        let s = send(
            &r,
            stripe_req(&sign_stripe(STRIPE_SECRET, NOW, body.as_bytes()), body),
        )
        .await;
        got.push(s);
    }
    let ev = drain(&mut rx);
    let ids: Vec<String> = ev.iter().map(|e| e.id.clone()).collect();
    assert_eq!(got, vec![StatusCode::OK; 2]);
    assert_eq!(ev.len(), 2, "two events the handler tells apart: {ids:?}");
    for (e, last) in ev.iter().zip(["evt_B", "evt_C"]) {
        let handler_sees: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(handler_sees["id"], last);
        assert!(e.id == last || e.id.starts_with("sha256:"), "{ids:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

/// A request body whose size hint claims 10 bytes (exact) and that yields 64 KiB frames without
/// end: the receiver stops at its limit (413) instead of trusting the hint, and reads at most
/// about the limit.
struct Liar {
    sent: Arc<AtomicUsize>,
}

impl http_body::Body for Liar {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        let n = self.sent.fetch_add(64 * 1024, Ordering::SeqCst);
        if n > 64 * 1024 * 1024 {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'a';
            64 * 1024
        ])))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(10)
    }
}

#[tokio::test]
async fn s77_a_body_whose_size_hint_lies_is_cut_at_the_limit() {
    let (queue, mut rx) = MemoryQueue::new(100);
    let r = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue).with_body_limit(100_000);
    let sent = Arc::new(AtomicUsize::new(0));
    let req = Request::post("/wh")
        .header("x-hub-signature-256", sign_github(GH_SECRET, b"0123456789"))
        .body(Liar { sent: sent.clone() })
        .unwrap();
    let s = send(&r, req).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    let read = sent.load(Ordering::SeqCst);
    assert!(
        read <= 4 * 64 * 1024,
        "read {read} bytes past a 100,000-byte limit"
    );
    assert!(drain(&mut rx).is_empty());
}

/// "Outside a tokio runtime every body is verified in place": a 200 KB GitHub delivery and a
/// Standard Webhooks one driven by a plain executor on a thread with no runtime: 200, queued.
#[test]
fn s77_outside_a_runtime_a_large_body_is_verified_in_place() {
    use std::task::{Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        let start = tokio::time::Instant::now();
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "no answer in 5 s");
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    let outcome = std::thread::spawn(|| {
        let (queue, mut rx) = MemoryQueue::new(10);
        let gh = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone());
        let sw = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue)
            .with_clock(clock_at(NOW));
        let big = vec![b'q'; 200 * 1024];
        let a = block_on(gh.oneshot(gh_req(big.clone()))).unwrap().status();
        let b = block_on(sw.oneshot(sw_req("msg_nort", NOW, &big)))
            .unwrap()
            .status();
        (a, b, drain(&mut rx).len())
    })
    .join();
    let (a, b, n) = outcome.expect("no panic outside a runtime");
    assert_eq!((a, b, n), (StatusCode::OK, StatusCode::OK, 2));
}

// ---------------------------------------------------------------------------------------------
// Redis Streams
// ---------------------------------------------------------------------------------------------

fn redis_url() -> Option<String> {
    std::env::var("STURDY_REDIS_URL").ok()
}

fn redis_addr(url: &str) -> String {
    let rest = url.trim_start_matches("redis://");
    let rest = rest.rsplit('@').next().unwrap();
    rest.split('/').next().unwrap().to_string()
}

fn uniq(tag: &str) -> String {
    let n = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{{s77-{tag}-{}-{n}}}", std::process::id())
}

/// Deletes `keys` with a raw RESP `DEL` (the test's own keys only).
async fn redis_del(url: &str, keys: &[String]) {
    let Ok(mut s) = TcpStream::connect(redis_addr(url)).await else {
        return;
    };
    let mut cmd = format!("*{}\r\n$3\r\nDEL\r\n", keys.len() + 1);
    for k in keys {
        cmd.push_str(&format!("${}\r\n{k}\r\n", k.len()));
    }
    let _ = s.write_all(cmd.as_bytes()).await;
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
}

/// A header map as `(name, [values...])`, names sorted, each name's values in order.
fn header_list(h: &HeaderMap) -> Vec<(String, Vec<Vec<u8>>)> {
    let mut names: Vec<String> = h.keys().map(|k| k.as_str().to_string()).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let vals = h
                .get_all(&n)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            (n, vals)
        })
        .collect()
}

/// `WebhookEvent::body`: "The raw body, exactly as signed"; `headers`: "as the sender sent
/// them". Events pushed straight into the Redis queue with hostile fields (every byte value in
/// the body, an empty body, header values that are not UTF-8 or empty, several values of one
/// name, `:` `%` and non-ASCII in scheme and route, timestamps at i64's ends, a 256-byte id
/// with spaces) come out of the consumer field for field; the same push again is `Duplicate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s77_redis_events_come_out_byte_for_byte() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("bytes");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let queue = RedisStreamQueue::connect(&url, &stream).await.unwrap();
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let mut h1 = HeaderMap::new();
    h1.append(
        "x-a",
        HeaderValue::from_bytes(b"\xff\xfe\x80 obs-text").unwrap(),
    );
    h1.append("x-a", HeaderValue::from_static(""));
    h1.append("x-a", HeaderValue::from_static("second"));
    h1.append("x-a", HeaderValue::from_static("second"));
    h1.append("webhook-id", HeaderValue::from_static("a\tb c"));
    h1.append(
        "x-github-event",
        HeaderValue::from_bytes(b"\xc3\xa9t\xc3\xa9").unwrap(),
    );
    let id256: String = (0..256)
        .map(|i| if i % 7 == 0 { ' ' } else { 'k' })
        .collect();
    let events = vec![
        WebhookEvent::new(
            "sch:e%me",
            "id with spaces\tand tab",
            Bytes::from(all_bytes),
        )
        .with_route("ro:ute%2F\u{e9}")
        .with_timestamp(Some(i64::MIN))
        .with_headers(h1),
        WebhookEvent::new("standard", "msg_empty", Bytes::new()),
        WebhookEvent::new("github", id256.clone(), Bytes::from_static(b"\0\r\n\0"))
            .with_timestamp(Some(i64::MAX)),
        WebhookEvent::new("s", "0", Bytes::from_static(b"{\"a\":1}"))
            .with_route("")
            .with_timestamp(Some(0)),
    ];
    let mut pushed = Vec::new();
    for e in &events {
        pushed.push(
            EventQueue::push(&queue, e.clone(), Duration::from_secs(60))
                .await
                .map_err(|e| e.to_string()),
        );
    }
    let again = EventQueue::push(&queue, events[0].clone(), Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string());
    let mut out = Vec::new();
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(3), consumer.next()).await {
            Ok(Ok(Some(d))) => {
                consumer.ack(&d).await.unwrap();
                out.push(d.event);
            }
            Ok(Ok(None)) => break,
            other => panic!("next: {other:?}"),
        }
    }
    let dead = queue.dead_letter_count().await;
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
    for (k, p) in pushed.iter().enumerate() {
        assert!(matches!(p, Ok(Push::Enqueued)), "push {k}: {p:?}");
    }
    assert!(matches!(again, Ok(Push::Duplicate)), "{again:?}");
    assert_eq!(dead.unwrap(), 0, "nothing dead-lettered");
    assert_eq!(out.len(), events.len());
    for (a, b) in events.iter().zip(&out) {
        assert_eq!(a.scheme, b.scheme);
        assert_eq!(a.route, b.route);
        assert_eq!(a.id, b.id);
        assert_eq!(a.timestamp, b.timestamp, "{}", a.id);
        assert!(
            a.body == b.body,
            "{}: body differs ({} vs {} bytes)",
            a.id,
            a.body.len(),
            b.body.len()
        );
        assert_eq!(header_list(&a.headers), header_list(&b.headers), "{}", a.id);
        assert_eq!(a.dedup_key(), b.dedup_key());
    }
}

/// The same ids delivered at once, many copies each, through two receivers on two connections
/// of one Redis stream (two "processes" of one route): every copy gets 200 and each id is in
/// the stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s77_redis_bursts_over_two_connections_queue_each_id_once() {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq("burst");
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let now = real_now();
    let mut rs = Vec::new();
    for _ in 0..2 {
        let q = RedisStreamQueue::connect(&url, &stream).await.unwrap();
        rs.push(WebhookReceiver::new(
            StandardWebhooks::new(SW_SECRET).unwrap(),
            q,
        ));
    }
    let mut tasks = Vec::new();
    for copy in 0..6 {
        for id in 0..10 {
            let r = rs[(copy + id) % 2].clone();
            tasks.push(tokio::spawn(async move {
                let req = sw_req(&format!("msg_burst_{id}"), now, b"{\"b\":1}");
                tokio::time::timeout(Duration::from_secs(5), r.oneshot(req))
                    .await
                    .map(|r| r.unwrap().status())
            }));
        }
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let mut ids = Vec::new();
    while let Ok(Ok(Some(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        consumer.ack(&d).await.unwrap();
        ids.push(d.event.id);
    }
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(StatusCode::OK))),
        "{statuses:?}"
    );
    ids.sort();
    let want: Vec<String> = {
        let mut w: Vec<String> = (0..10).map(|i| format!("msg_burst_{i}")).collect();
        w.sort();
        w
    };
    assert_eq!(ids, want);
}

/// An axum server with the Redis queue, on 127.0.0.1: each delivery is first sent and cut at a
/// seeded point (inside the head, inside the body, whole but the connection dropped without
/// reading, or whole and read), then sent again whole. Every whole delivery is answered 200,
/// and each id is in the stream exactly once: nothing acknowledged that was not stored,
/// nothing stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s77_redis_wire_sender_cut_at_seeded_points_stores_each_once() {
    wire_cuts(false, 77).await;
}

/// The same behind tower's `Buffer` + `ConcurrencyLimit(1)` + a 2 s timeout in the router (axum's
/// `HandleErrorLayer` turning their errors into 503): a cut connection whose future is dropped
/// while it holds or waits for the one place gives it back; every redelivery is still 200 and
/// each id is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s77_redis_wire_cuts_under_buffer_and_concurrency_limit_one() {
    wire_cuts(true, 78).await;
}

async fn wire_cuts(composed: bool, seed: u64) {
    let Some(url) = redis_url() else { return };
    use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
    let stream = uniq(if composed { "wirec" } else { "wire" });
    let mut consumer =
        RedisStreamConsumer::connect(&url, &stream, "g", "c1", Duration::from_secs(30))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    let queue = RedisStreamQueue::connect(&url, &stream).await.unwrap();
    let receiver = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue);
    let app = if composed {
        let svc = tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                |_: BoxError| async { StatusCode::SERVICE_UNAVAILABLE },
            ))
            .buffer(16)
            .concurrency_limit(1)
            .timeout(Duration::from_secs(2))
            .service(receiver);
        axum::Router::new().route("/wh", axum::routing::post_service(svc))
    } else {
        axum::Router::new().route("/wh", axum::routing::post_service(receiver))
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let now = real_now();
    let mut rng = Rng(seed);
    let raw = |id: &str, body: &[u8]| -> (Vec<u8>, usize) {
        let sig = sign_standard(SW_SECRET, id, now, body).unwrap();
        let mut v = format!(
            "POST /wh HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\nwebhook-id: {id}\r\n\
             webhook-timestamp: {now}\r\nwebhook-signature: {sig}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let head = v.len();
        v.extend_from_slice(body);
        (v, head)
    };
    async fn status_of(addr: SocketAddr, bytes: &[u8], cut: usize, read: bool) -> Option<u16> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(&bytes[..cut]).await.ok()?;
        if !read {
            return None;
        }
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        let text = String::from_utf8_lossy(&buf);
        text.split(' ').nth(1)?.parse().ok()
    }
    let mut problems = Vec::new();
    let n = 24;
    for i in 0..n {
        let id = format!("msg_wire_{i}");
        let body = format!(
            "{{\"i\":{i},\"pad\":\"{}\"}}",
            "p".repeat(rng.below(3_000) as usize)
        );
        let (bytes, head) = raw(&id, body.as_bytes());
        let mode = rng.below(4);
        let (cut, read) = match mode {
            0 => (1 + rng.below(head as u64 - 1) as usize, false),
            1 => (
                head + rng.below((bytes.len() - head) as u64) as usize,
                false,
            ),
            2 => (bytes.len(), false),
            _ => (bytes.len(), true),
        };
        let first = status_of(addr, &bytes, cut, read).await;
        if read && first != Some(200) {
            problems.push(format!("{id}: first whole delivery {first:?}"));
        }
        let again = status_of(addr, &bytes, bytes.len(), true).await;
        if again != Some(200) {
            problems.push(format!("{id} (mode {mode}): redelivery {again:?}"));
        }
    }
    let mut ids = Vec::new();
    while let Ok(Ok(Some(d))) = tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
    {
        consumer.ack(&d).await.unwrap();
        ids.push(d.event.id);
    }
    server.abort();
    redis_del(&url, &[stream.clone(), format!("{stream}:dead")]).await;
    assert!(problems.is_empty(), "{problems:?}");
    ids.sort();
    let mut want: Vec<String> = (0..n).map(|i| format!("msg_wire_{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "each id stored once");
}

// ---------------------------------------------------------------------------------------------
// Malformed signatures: refused before the body
// ---------------------------------------------------------------------------------------------

/// Standard base64 with padding (no `base64` in this package's dev-dependencies).
fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A body that never yields and records whether it was polled.
struct Never(Arc<AtomicUsize>);

impl http_body::Body for Never {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Poll::Pending
    }
}

/// Step 2 of the guide: "400 for missing or malformed headers (a signature that does not decode
/// to the 32 bytes of an HMAC-SHA256 included), 401 for ... a Standard Webhooks header without a
/// `v1` entry that decodes to 32 bytes", all "before the body is read". Signatures one byte
/// short or long, in hex and base64, for every scheme, with a body that never comes: each is
/// answered at once (the body never polled) with its documented status.
#[tokio::test]
async fn s77_signatures_of_the_wrong_length_are_refused_before_the_body() {
    let b64 = |n: usize| b64(&vec![7u8; n]);
    let hex = |n: usize| "ab".repeat(n);
    let (queue, mut rx) = MemoryQueue::new(10);
    let sw = WebhookReceiver::new(StandardWebhooks::new(SW_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW));
    let st = WebhookReceiver::new(Stripe::new(STRIPE_SECRET).unwrap(), queue.clone())
        .with_clock(clock_at(NOW));
    let gh = WebhookReceiver::new(GitHub::new(GH_SECRET).unwrap(), queue.clone());
    let gen_hex = WebhookReceiver::new(
        GenericHmac::new("s77hex", HeaderName::from_static("x-sig"), "generic-secret").unwrap(),
        queue.clone(),
    );
    let gen_b64 = WebhookReceiver::new(
        GenericHmac::new("s77b64", HeaderName::from_static("x-sig"), "generic-secret")
            .unwrap()
            .with_prefix("v1=")
            .with_encoding(sturdy::webhook::Encoding::Base64),
        queue,
    );
    let mut cases: Vec<(
        String,
        WebhookReceiver<MemoryQueue>,
        Vec<(&str, String)>,
        u16,
    )> = Vec::new();
    for n in [0, 1, 31, 33, 64] {
        cases.push((
            format!("standard v1 of {n} bytes"),
            sw.clone(),
            vec![
                ("webhook-id", "msg_len".into()),
                ("webhook-timestamp", NOW.to_string()),
                ("webhook-signature", format!("v1,{}", b64(n))),
            ],
            401,
        ));
        cases.push((
            format!("stripe v1 of {n} bytes"),
            st.clone(),
            vec![("stripe-signature", format!("t={NOW},v1={}", hex(n)))],
            400,
        ));
        cases.push((
            format!("github of {n} bytes"),
            gh.clone(),
            vec![("x-hub-signature-256", format!("sha256={}", hex(n)))],
            400,
        ));
        cases.push((
            format!("generic hex of {n} bytes"),
            gen_hex.clone(),
            vec![("x-sig", hex(n))],
            400,
        ));
        cases.push((
            format!("generic base64 of {n} bytes"),
            gen_b64.clone(),
            vec![("x-sig", format!("v1={}", b64(n)))],
            400,
        ));
    }
    // One odd hex digit more or less.
    cases.push((
        "github 63 hex digits".into(),
        gh.clone(),
        vec![("x-hub-signature-256", format!("sha256={}", &hex(32)[1..]))],
        400,
    ));
    cases.push((
        "generic 65 hex digits".into(),
        gen_hex.clone(),
        vec![("x-sig", format!("{}a", hex(32)))],
        400,
    ));
    let mut failures = Vec::new();
    for (what, r, headers, want) in cases {
        let polled = Arc::new(AtomicUsize::new(0));
        let mut req = Request::post("/wh");
        for (k, v) in &headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(Never(polled.clone())).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), r.oneshot(req)).await;
        match got {
            Err(_) => failures.push(format!("{what}: waited for the body")),
            Ok(resp) => {
                let s = resp.unwrap().status().as_u16();
                let ok = if want == 401 { s == 401 } else { s == 400 };
                if !ok || polled.load(Ordering::SeqCst) != 0 {
                    failures.push(format!(
                        "{what}: {s} (documented {want}), body polled {} times",
                        polled.load(Ordering::SeqCst)
                    ));
                }
            }
        }
    }
    assert!(drain(&mut rx).is_empty());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
