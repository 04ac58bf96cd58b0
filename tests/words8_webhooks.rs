//! docs/guides/webhooks.md and sturdy-webhook's rustdoc, read literally: the guide's first
//! example, the generic texts of rejections, the dedup key's encoding, the source allowlist at
//! its bounds (32 trusted hops, `Forwarded` node forms), and the Redis Streams queue: poison
//! events after 5 deliveries, the dead-letter stream's name, replay and discard, the wait of
//! `next()`, and a hung Redis that must give an error, never a hang. Standard Webhooks vector
//! SW-1 from /work/shared/vectors. In process, plus the real Redis.
#![cfg(feature = "full")]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::post_service;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use sturdy::core::WallClock;
use sturdy::redis::{RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{
    sign_github, sign_standard, sign_stripe, ForwardedHeader, GitHub, MemoryQueue, SourceAllowlist,
    StandardWebhooks, Stripe, WebhookEvent, WebhookReceiver, MAX_FORWARDED_HOPS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SW_TS: i64 = 1_614_265_330;
const SW_BODY: &str = r#"{"test": 2432232314}"#;

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

fn now_s() -> i64 {
    sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn text(res: http::Response<Full<Bytes>>) -> (u16, String) {
    let status = res.status().as_u16();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The guide's first example, with a `handle` of our own: Stripe through `post_service`.
#[tokio::test]
async fn the_guides_first_example_receives_a_stripe_event() {
    let secret = "whsec_stripe_test".to_owned();
    let (tx, mut done) = tokio::sync::mpsc::channel(1);
    let handle = move |e: WebhookEvent| {
        let tx = tx.clone();
        async move { tx.send(e.id).await.unwrap() }
    };

    let (queue, mut events) = MemoryQueue::new(10_000);
    let receiver = WebhookReceiver::new(Stripe::new(&secret).unwrap(), queue);
    let app = Router::new().route("/webhooks/stripe", post_service(receiver));
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            handle(e).await;
        }
    });

    let body = r#"{"id":"evt_123","type":"charge.succeeded"}"#;
    let req = Request::post("/webhooks/stripe")
        .header(
            "stripe-signature",
            sign_stripe(&secret, now_s(), body.as_bytes()),
        )
        .body(Body::from(body))
        .unwrap();
    assert_eq!(app.oneshot(req).await.unwrap().status(), 200);
    assert_eq!(done.recv().await.unwrap(), "evt_123");
}

/// "Every rejection answers a short generic text (`forbidden`, `invalid signature`, `payload too
/// large`)": 400, 401, 403 and 413 each answer one of them and nothing about the reason.
#[tokio::test]
async fn each_rejection_answers_one_of_the_generic_texts() {
    let (queue, _events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(StandardWebhooks::new(WHSEC).unwrap(), queue)
        .with_clock(at(SW_TS))
        .with_body_limit(16);
    let sig = sign_standard(WHSEC, SW_ID, SW_TS, SW_BODY.as_bytes()).unwrap();
    let mk = |id: &str, ts: &str, sig: &str, body: &'static str| {
        Request::post("/hook")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts)
            .header("webhook-signature", sig)
            .body(Body::from(body))
            .unwrap()
    };
    let generic = ["forbidden", "invalid signature", "payload too large"];
    // 400: malformed timestamp.
    let (s, t) = text(
        rx.clone()
            .oneshot(mk(SW_ID, "hello", &sig, SW_BODY))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 400);
    assert!(generic.contains(&t.trim()), "400 answered {t:?}");
    // 401: stale timestamp.
    let stale = (SW_TS - 301).to_string();
    let (s, t) = text(
        rx.clone()
            .oneshot(mk(SW_ID, &stale, &sig, SW_BODY))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);
    assert!(generic.contains(&t.trim()), "401 answered {t:?}");
    // 413: over the body limit.
    let (s, t) = text(
        rx.clone()
            .oneshot(mk(SW_ID, &SW_TS.to_string(), &sig, SW_BODY))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, t.trim()), (413, "payload too large"));
    // 403: not from the allowlist.
    let (queue, _events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(GitHub::new("s").unwrap(), queue)
        .with_source_allowlist(SourceAllowlist::new(["192.0.2.0/24"]).unwrap());
    let mut req = Request::post("/hook")
        .header("x-hub-signature-256", sign_github("s", b"{}"))
        .body(Body::from("{}"))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(
        "198.51.100.1:4000".parse::<SocketAddr>().unwrap(),
    ));
    let (s, t) = text(rx.oneshot(req).await.unwrap()).await;
    assert_eq!((s, t.trim()), (403, "forbidden"));
}

/// `WebhookEvent::dedup_key`: "`:` and `%` in the scheme and route names are percent-encoded,
/// so distinct triples never give one key."
#[test]
fn distinct_scheme_route_id_triples_never_share_a_dedup_key() {
    let k = |scheme: &str, route: &str, id: &str| {
        WebhookEvent::new(scheme.to_owned(), id.to_owned(), Bytes::new())
            .with_route(route.to_owned())
            .dedup_key()
    };
    let triples = [
        ("a:b", "c", "d"),
        ("a", "b:c", "d"),
        ("a", "b", "c:d"),
        ("a%3Ab", "c", "d"),
        ("a%253Ab", "c", "d"),
        ("a", "b%3Ac", "d"),
        ("", "a:b:c", "d"),
        ("a:b:c", "", "d"),
    ];
    let keys: Vec<String> = triples.iter().map(|(s, r, i)| k(s, r, i)).collect();
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            assert_ne!(
                keys[i], keys[j],
                "{:?} and {:?} share a key",
                triples[i], triples[j]
            );
        }
    }
    // The route defaults to the scheme's name.
    let e = WebhookEvent::new("github", "x", Bytes::new());
    assert_eq!(e.route, "github");
}

/// "more than 32 trusted hops make the source unknown": 32 are walked, 33 are not.
#[test]
fn thirty_two_trusted_hops_are_walked_and_thirty_three_are_not() {
    assert_eq!(MAX_FORWARDED_HOPS, 32);
    let list = SourceAllowlist::new(["192.30.252.0/22"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap();
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let chain = |hops: usize| {
        let mut parts = vec!["192.30.252.7".to_owned()];
        parts.extend((0..hops).map(|i| format!("10.0.1.{}", i + 1)));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", parts.join(", ").parse().unwrap());
        h
    };
    // The peer itself is one trusted hop; the header lists `hops` more.
    let ok: Vec<usize> = (28..36).filter(|&n| list.allows(peer, &chain(n))).collect();
    assert!(
        ok.contains(&30),
        "a long chain within the bound is walked: {ok:?}"
    );
    let max_ok = *ok.iter().max().unwrap();
    assert!(
        (31..=32).contains(&max_ok),
        "the bound is 32 trusted hops; walked up to {max_ok}"
    );
    assert!(!list.allows(peer, &chain(40)));
    assert_eq!(list.source(peer, &chain(40)), None);
}

/// `Forwarded` (RFC 7239): quoted IPv6 nodes with ports are addresses; obfuscated nodes and
/// `unknown` make the source unknown.
#[test]
fn forwarded_nodes_of_every_form() {
    let list = SourceAllowlist::new(["192.30.252.0/22", "2a0a:a440::/29"])
        .unwrap()
        .with_trusted_proxies(["10.0.0.0/8"])
        .unwrap()
        .with_forwarded_header(ForwardedHeader::Forwarded);
    let peer: IpAddr = "10.0.0.1".parse().unwrap();
    let h = |v: &str| {
        let mut h = HeaderMap::new();
        h.insert("forwarded", v.parse().unwrap());
        h
    };
    let cases = [
        ("for=192.30.252.7", true),
        ("for=\"192.30.252.7:4711\"", true),
        ("for=\"[2a0a:a440::1]\"", true),
        ("for=\"[2a0a:a440::1]:4711\"", true),
        ("For=192.30.252.7;proto=https;by=10.0.0.1", true),
        ("for=192.30.252.7, for=10.0.0.2", true),
        ("for=_hidden", false),
        ("for=unknown", false),
        ("for=\"_gazonk\", for=10.0.0.2", false),
        ("for=203.0.113.1", false),
    ];
    for (v, want) in cases {
        assert_eq!(list.allows(peer, &h(v)), want, "Forwarded: {v}");
    }
    // An IPv4-mapped IPv6 proxy peer is a trusted proxy too.
    let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
    assert!(list.allows(mapped, &h("for=192.30.252.7")));
}

fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

fn unique(what: &str) -> String {
    let t = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("words8-{what}-{t:x}-{}", std::process::id())
}

/// One RESP command over a fresh connection, answered as raw text.
async fn redis_raw(args: &[&str]) -> String {
    let url = redis_url();
    let hostport = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let mut s = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn push_one(queue: RedisStreamQueue, body: &'static str) {
    let rx = WebhookReceiver::new(GitHub::new("s").unwrap(), queue);
    let req = Request::post("/hook")
        .header("x-hub-signature-256", sign_github("s", body.as_bytes()))
        .body(Body::from(body))
        .unwrap();
    assert_eq!(rx.oneshot(req).await.unwrap().status(), 200);
}

/// "Poison events: after `with_max_deliveries` \[5\] deliveries without an ack, an event moves to
/// the dead-letter stream `{<stream>}:dead` ... instead of coming back"; `dead_letters` lists
/// it (event, group, deliveries, reason); `replay_dead_letter` puts it back with a fresh count;
/// `discard_dead_letter` deletes it.
#[tokio::test]
async fn a_poison_event_is_dead_lettered_after_5_deliveries_and_replayed_with_a_fresh_count() {
    let stream = unique("poison");
    let queue = RedisStreamQueue::connect(&redis_url(), stream.clone())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect(
        &redis_url(),
        stream.clone(),
        "g",
        "w1",
        Duration::from_millis(20),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    push_one(queue.clone(), r#"{"poison":1}"#).await;

    let mut counts = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        if let Some(d) = c.next().await.unwrap() {
            counts.push(d.deliveries);
        }
    }
    assert_eq!(counts, [1, 2, 3, 4, 5], "five deliveries, then no more");
    assert_eq!(queue.dead_letter_count().await.unwrap(), 1);
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].group, "g");
    assert_eq!(dead[0].deliveries, 5);
    assert_eq!(dead[0].event.body, Bytes::from_static(br#"{"poison":1}"#));
    // The dead-letter stream's name.
    let exists = redis_raw(&["EXISTS", &format!("{{{stream}}}:dead")]).await;
    assert_eq!(exists.trim(), ":1", "{{{stream}}}:dead");

    assert!(queue.replay_dead_letter(&dead[0].entry).await.unwrap());
    let back = c.next().await.unwrap().expect("the replayed event");
    assert_eq!(back.deliveries, 1, "a fresh count");
    c.dead_letter(&back, "unparseable").await.unwrap();
    let dead = queue.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "unparseable");
    assert!(queue.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert!(!queue.discard_dead_letter(&dead[0].entry).await.unwrap());
    assert_eq!(queue.dead_letter_count().await.unwrap(), 0);
}

/// "(`<stream>:dead` when the name has a hash tag, such as `{webhooks}`)"
#[tokio::test]
async fn a_hash_tagged_stream_keeps_its_dead_letters_in_stream_dead() {
    let stream = format!("{{{}}}", unique("tagged"));
    let queue = RedisStreamQueue::connect(&redis_url(), stream.clone())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect(
        &redis_url(),
        stream.clone(),
        "g",
        "w1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    push_one(queue.clone(), r#"{"tagged":1}"#).await;
    let d = c.next().await.unwrap().unwrap();
    c.dead_letter(&d, "bad").await.unwrap();
    let exists = redis_raw(&["EXISTS", &format!("{stream}:dead")]).await;
    assert_eq!(exists.trim(), ":1", "{stream}:dead");
}

/// "`next()` ... short reads look for a new one ... for up to the wait \[500 ms\]": an empty
/// stream answers `None` after about half a second, not at once and not much later.
#[tokio::test]
async fn next_on_an_empty_stream_waits_about_500ms_by_default() {
    let stream = unique("wait");
    let mut c =
        RedisStreamConsumer::connect(&redis_url(), stream, "g", "w1", Duration::from_secs(60))
            .await
            .unwrap();
    let t0 = tokio::time::Instant::now();
    assert!(c.next().await.unwrap().is_none());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

/// "Every Redis operation is bounded \[1 s, `with_timeout` on the queue and on the consumer\]: a
/// Redis that is down or hung gives a clear error, never a hang." A Redis that hangs
/// once connected costs a delivery at most the timeout, then 503.
#[tokio::test]
async fn a_hung_redis_gives_an_error_within_the_timeout_never_a_hang() {
    let (url, hang) = hangable_redis().await;
    let queue = RedisStreamQueue::connect(&url, unique("hang"))
        .await
        .unwrap();
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let rx = WebhookReceiver::new(GitHub::new("s").unwrap(), queue);
    let req = Request::post("/hook")
        .header("x-hub-signature-256", sign_github("s", b"{}"))
        .body(Body::from("{}"))
        .unwrap();
    let t1 = tokio::time::Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(3), rx.oneshot(req))
        .await
        .expect("the push hangs")
        .unwrap();
    assert_eq!(res.status(), 503);
    let took = t1.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

/// A TCP proxy to the real Redis that can be made to hang: once `hang` is set, nothing more is
/// forwarded either way (the connections stay open).
async fn hangable_redis() -> (String, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::AtomicBool;
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let hang = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let h = hang.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut r, mut w) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                ),
                (Box::new(sr) as _, Box::new(cw) as _),
            ] {
                let h = h.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if h.load(std::sync::atomic::Ordering::SeqCst) {
                            continue;
                        }
                        if w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (format!("redis://{addr}/"), hang)
}

/// The same for a consumer: `next` on a Redis that hangs ends with an error within the
/// timeout (plus the wait), not a hang.
#[tokio::test]
async fn a_hung_redis_fails_a_consumers_next_instead_of_hanging() {
    let (url, hang) = hangable_redis().await;
    let mut c =
        RedisStreamConsumer::connect(&url, unique("hangc"), "g", "w", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50));
    assert!(c.next().await.unwrap().is_none());
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(3), c.next())
        .await
        .expect("next() hangs");
    let e = r.unwrap_err();
    assert!(!e.to_string().is_empty());
    assert!(
        t0.elapsed() < Duration::from_millis(1600),
        "{:?}",
        t0.elapsed()
    );
}

/// A verifier that accepts everything and notes the thread it ran on.
#[derive(Debug, Default, Clone)]
struct Where(Arc<std::sync::Mutex<Vec<std::thread::ThreadId>>>);

impl sturdy::webhook::Verifier for Where {
    fn scheme(&self) -> &'static str {
        "where"
    }
    fn verify(
        &self,
        _headers: &HeaderMap,
        body: &[u8],
        _now: SystemTime,
    ) -> Result<sturdy::webhook::Verified, sturdy::webhook::Rejection> {
        self.0.lock().unwrap().push(std::thread::current().id());
        Ok(sturdy::webhook::Verified::new().with_id(format!("len-{}", body.len())))
    }
}

/// "Inside a tokio runtime, a body over 64 KiB (`with_offload_above`) is verified with
/// `tokio::task::spawn_blocking`, off the runtime's worker threads": 64 KiB exactly is verified
/// in place, one byte more elsewhere.
#[tokio::test(flavor = "current_thread")]
async fn a_body_over_64_kib_is_verified_off_the_runtime_thread() {
    assert_eq!(sturdy::webhook::DEFAULT_OFFLOAD_ABOVE, 64 * 1024);
    let seen = Where::default();
    let (queue, _events) = MemoryQueue::new(10);
    let rx = WebhookReceiver::new(seen.clone(), queue);
    let me = std::thread::current().id();
    for len in [64 * 1024, 64 * 1024 + 1] {
        let req = Request::post("/hook")
            .body(Body::from(vec![b'x'; len]))
            .unwrap();
        assert_eq!(rx.clone().oneshot(req).await.unwrap().status(), 200);
    }
    let threads = seen.0.lock().unwrap().clone();
    assert_eq!(threads.len(), 2);
    assert_eq!(threads[0], me, "64 KiB is verified in place");
    assert_ne!(
        threads[1], me,
        "past 64 KiB it is verified off the runtime's thread"
    );
}

/// `MemoryQueue::new`: "remembering at most 100,000 dedup keys (past that, the oldest is
/// forgotten first)".
#[tokio::test]
async fn the_memory_queue_forgets_the_oldest_of_100_001_keys_first() {
    use sturdy::webhook::{EventQueue, Push};
    let (queue, _events) = MemoryQueue::new(200_000);
    let ttl = Duration::from_secs(3600);
    let ev = |i: usize| WebhookEvent::new("github", format!("id-{i}"), Bytes::new());
    for i in 0..100_001 {
        assert_eq!(queue.push(ev(i), ttl).await.unwrap(), Push::Enqueued, "{i}");
    }
    assert_eq!(queue.push(ev(100_000), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(queue.push(ev(2), ttl).await.unwrap(), Push::Duplicate);
    assert_eq!(
        queue.push(ev(0), ttl).await.unwrap(),
        Push::Enqueued,
        "the oldest key was forgotten"
    );
}

/// `RedisStreamConsumer::ack`: "When Redis fails or does not answer in time ... unless the
/// command reached Redis before the failure (a `Timeout`, or a `Transport` error ...), in which
/// case it may have been done": an ack Redis never answers is a `Timeout` that does not say
/// "not sent", within the operation timeout.
#[tokio::test]
async fn an_ack_redis_never_answers_is_a_timeout_that_may_have_been_done() {
    let (url, hang) = hangable_redis().await;
    let stream = unique("ackhang");
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect(&url, stream, "g", "w", Duration::from_secs(60))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50))
        .with_timeout(Duration::from_millis(300));
    push_one(queue, r#"{"ack":1}"#).await;
    let d = c.next().await.unwrap().expect("the event");
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(2), c.ack(&d))
        .await
        .expect("ack hangs")
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    let se = sturdy::core::find::<sturdy::core::Error>(&*e).expect("a sturdy error");
    assert_eq!(se.kind(), &sturdy::core::ErrorKind::Timeout, "{e}");
    assert_ne!(
        sturdy::core::classify::delivery(&*e),
        sturdy::core::Delivery::NotSent,
        "{e}"
    );
}

/// "Several consumer groups may read one stream, each getting every event. `ack` deletes an
/// entry only when no other group still needs it (not read yet, or held unacknowledged). A group
/// sees the entries still in the stream when it is created."
#[tokio::test]
async fn each_group_gets_every_event_and_the_last_ack_deletes_it() {
    let stream = unique("groups");
    let url = redis_url();
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let join = |g: &'static str| {
        let (url, stream) = (url.clone(), stream.clone());
        async move {
            RedisStreamConsumer::connect(&url, stream, g, "w", Duration::from_secs(60))
                .await
                .unwrap()
                .with_wait(Duration::from_millis(30))
        }
    };
    let mut g1 = join("g1").await;
    let mut g2 = join("g2").await;
    push_one(queue.clone(), r#"{"groups":1}"#).await;
    let xlen = || {
        let stream = stream.clone();
        async move { redis_raw(&["XLEN", &stream]).await }
    };

    let d1 = g1.next().await.unwrap().expect("g1 gets it");
    g1.ack(&d1).await.unwrap();
    assert_eq!(xlen().await.trim(), ":1", "g2 has not read it yet");
    // A group made now still sees it.
    let mut g3 = join("g3").await;
    let d2 = g2.next().await.unwrap().expect("g2 gets it too");
    assert_eq!(d2.event.body, d1.event.body);
    g2.ack(&d2).await.unwrap();
    assert_eq!(xlen().await.trim(), ":1", "g3 has not read it yet");
    let d3 = g3
        .next()
        .await
        .unwrap()
        .expect("g3 sees what is still there");
    g3.ack(&d3).await.unwrap();
    assert_eq!(xlen().await.trim(), ":0", "the last ack deleted it");
    let mut g4 = join("g4").await;
    assert!(
        g4.next().await.unwrap().is_none(),
        "nothing left for a later group"
    );
}

/// A TCP proxy to the real Redis that counts the commands' writes from client to server.
async fn counting_redis() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::AtomicUsize;
    use tokio::io::AsyncWriteExt as _;
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let ups = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let u = ups.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let u = u.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    u.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (format!("redis://{addr}/"), ups)
}

/// "Each `next()` is one round trip to Redis when an event is waiting (one script claims or
/// reads it)".
#[tokio::test]
async fn next_with_an_event_waiting_is_one_round_trip() {
    let (url, ups) = counting_redis().await;
    let stream = unique("trip");
    let queue = RedisStreamQueue::connect(&redis_url(), stream.clone())
        .await
        .unwrap();
    let mut c = RedisStreamConsumer::connect(&url, stream, "g", "w", Duration::from_secs(60))
        .await
        .unwrap()
        .with_wait(Duration::from_millis(30));
    // Warm up: scripts loaded, nothing waiting.
    assert!(c.next().await.unwrap().is_none());
    push_one(queue, r#"{"trip":1}"#).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let before = ups.load(std::sync::atomic::Ordering::SeqCst);
    let d = c.next().await.unwrap().expect("the event");
    let trips = ups.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert_eq!(trips, 1, "round trips for one waiting event");
    c.ack(&d).await.unwrap();
}
