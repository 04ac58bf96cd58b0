//! s116 outside round: the Redis backends (`sturdy::redis`: `RedisQuota` under the rate limiter,
//! `RedisIdempotencyStore` under the idempotency layer, `RedisStreamQueue` under the webhook
//! receiver and `RedisStreamConsumer`) while Redis misbehaves: a server at `maxmemory` with
//! `noeviction`, a password required or changed after the backends connected, `CLIENT PAUSE
//! WRITE` longer than the timeouts, `CLIENT KILL` of a held command, `DEBUG SLEEP` under an ack,
//! a server killed mid-call and restarted empty, and URLs that point to servers that are not
//! Redis (an HTTP server, a TCP server sending garbage or an endless reply, a fake that answers
//! every command with one canned reply). Checked against docs/RELIABILITY.md ("Redis backends:
//! failover and partitions"), the ratelimit, idempotency and webhook guides and the rustdoc of
//! `sturdy-redis`. Every server is this file's own, on a free loopback port, and is killed by
//! its pid when its guard drops.
#![cfg(feature = "full")]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sturdy::core::{BoxError, Error as SturdyError, ErrorKind};
use sturdy::idempotency::server::IdempotencyLayer;
use sturdy::ratelimit::{OnStoreError, Quota, RateLimitLayer};
use sturdy::redis::{
    RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue,
};
use sturdy::webhook::{sign_github, GitHub, WebhookReceiver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

type Req = http::Request<Full<Bytes>>;
type Res = http::Response<Full<Bytes>>;

const SECRET: &str = "s116-hook-secret";
const PASSWORD: &str = "s116Pw-Sekr1t-Owl";
const OTHER_PASSWORD: &str = "s116Other-Pw-Heron";

fn unique(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "s116-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The error's kind, if it is (or wraps at its top) a sturdy error.
fn kind(e: &BoxError) -> Option<ErrorKind> {
    e.downcast_ref::<SturdyError>().map(|e| e.kind().clone())
}

/// The error and all its sources, as text.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn no_secret(text: &str) {
    for s in [PASSWORD, OTHER_PASSWORD] {
        assert!(!text.contains(s), "a password shows: {text}");
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

/// A redis-server of this file's own on a free loopback port; killed by its pid on drop.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    /// The password the server requires now (for the admin connection).
    password: Option<String>,
}

impl OwnRedis {
    async fn start() -> Self {
        let mut this = Self {
            child: None,
            port: free_port(),
            password: None,
        };
        this.spawn().await;
        this
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir", "/tmp"])
            .args(["--enable-debug-command", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        self.password = None;
        for _ in 0..250 {
            if let Some(r) = self.admin(&["PING"]).await {
                if r.starts_with("+PONG") {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on {}", self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn url_with(&self, pw: &str) -> String {
        format!("redis://:{pw}@127.0.0.1:{}/", self.port)
    }

    /// One command on a connection of its own (after AUTH when the server requires a password);
    /// the reply's text.
    async fn admin(&self, args: &[&str]) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let mut wire = Vec::new();
        let mut want = 1;
        if let Some(pw) = &self.password {
            wire.extend(resp(&["AUTH", pw]));
            want = 2;
        }
        wire.extend(resp(args));
        s.write_all(&wire).await.ok()?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            loop {
                let n = s.read(&mut buf).await.ok()?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if count_replies(&got) >= want {
                    break;
                }
            }
            Some(())
        };
        tokio::time::timeout(Duration::from_secs(3), read)
            .await
            .ok()??;
        let text = String::from_utf8_lossy(&got).into_owned();
        if want == 2 {
            // Drop the AUTH reply line.
            return text.split_once("\r\n").map(|(_, r)| r.to_owned());
        }
        Some(text)
    }

    async fn admin_ok(&self, args: &[&str]) -> String {
        let r = self.admin(args).await.expect("admin command answered");
        assert!(!r.starts_with('-'), "{args:?}: {r}");
        r
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn restart_empty(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n", a.len()).into_bytes());
        out.extend(a.as_bytes());
        out.extend(b"\r\n");
    }
    out
}

/// How many whole top-level replies `buf` holds (simple strings, errors, integers, bulk strings
/// and flat or nested arrays).
fn count_replies(buf: &[u8]) -> usize {
    fn one(buf: &[u8], at: usize) -> Option<usize> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let line = std::str::from_utf8(&buf[at + 1..end]).ok()?;
        let next = end + 2;
        match buf.get(at)? {
            b'+' | b'-' | b':' => Some(next),
            b'$' => {
                let n: i64 = line.parse().ok()?;
                if n < 0 {
                    Some(next)
                } else {
                    let e = next + n as usize + 2;
                    (e <= buf.len()).then_some(e)
                }
            }
            b'*' => {
                let n: i64 = line.parse().ok()?;
                let mut p = next;
                for _ in 0..n.max(0) {
                    p = one(buf, p)?;
                }
                Some(p)
            }
            _ => None,
        }
    }
    let mut at = 0;
    let mut n = 0;
    while at < buf.len() {
        match one(buf, at) {
            Some(p) => {
                at = p;
                n += 1;
            }
            None => break,
        }
    }
    n
}

/// Parses whole RESP commands (arrays of bulk strings) off the front of `buf`; returns each
/// command's first word in upper case.
fn take_commands(buf: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((name, used)) = parse_command(buf) {
        out.push(name);
        buf.drain(..used);
    }
    out
}

fn parse_command(buf: &[u8]) -> Option<(String, usize)> {
    let line_end = |from: usize| {
        buf[from..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| p + from)
    };
    if buf.first()? != &b'*' {
        // Not RESP: take the line as an inline command.
        let e = line_end(0)?;
        let word = String::from_utf8_lossy(&buf[..e])
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_uppercase();
        return Some((word, e + 2));
    }
    let e = line_end(0)?;
    let n: usize = std::str::from_utf8(&buf[1..e]).ok()?.parse().ok()?;
    let mut p = e + 2;
    let mut first = String::new();
    for i in 0..n {
        let e = line_end(p)?;
        let len: usize = std::str::from_utf8(&buf[p + 1..e]).ok()?.parse().ok()?;
        let start = e + 2;
        let stop = start + len;
        if stop + 2 > buf.len() {
            return None;
        }
        if i == 0 {
            first = String::from_utf8_lossy(&buf[start..stop]).to_uppercase();
        }
        p = stop + 2;
    }
    Some((first, p))
}

/// A TCP server on loopback run by `serve` for each connection; its tasks end on drop.
struct FakeServer {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_server<F, Fut>(serve: F) -> FakeServer
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((s, _)) = l.accept().await {
            conns.spawn(serve(s));
        }
    });
    FakeServer { port, task }
}

/// A fake Redis: `+PONG` to `PING`, `+OK` to `AUTH` and `SELECT`, `reply` to every other command.
async fn canned_redis(reply: &'static [u8]) -> FakeServer {
    fake_server(move |mut s| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let Ok(n) = s.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut out = Vec::new();
            for cmd in take_commands(&mut buf) {
                if cmd == "PING" {
                    out.extend_from_slice(b"+PONG\r\n");
                } else if cmd == "AUTH" || cmd == "SELECT" {
                    out.extend_from_slice(b"+OK\r\n");
                } else {
                    out.extend_from_slice(reply);
                }
            }
            if s.write_all(&out).await.is_err() {
                return;
            }
        }
    })
    .await
}

fn counting_handler(
    n: Arc<AtomicUsize>,
) -> impl tower::Service<Req, Response = Res, Error = std::convert::Infallible, Future = impl Send>
       + Clone
       + Send
       + 'static {
    tower::service_fn(move |_req: Req| {
        let n = n.clone();
        async move {
            let k = n.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(201)
                    .body(Full::new(Bytes::from(format!("run {k}"))))
                    .unwrap(),
            )
        }
    })
}

fn post(key: &str) -> Req {
    http::Request::post("http://api.test/orders")
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{\"order\":116}")))
        .unwrap()
}

fn hook(body: &str) -> http::Request<axum::body::Body> {
    http::Request::post("/hook")
        .header("x-hub-signature-256", sign_github(SECRET, body.as_bytes()))
        .header("x-github-event", "push")
        .body(axum::body::Body::from(body.to_owned()))
        .unwrap()
}

async fn body_text<B>(res: http::Response<B>) -> (u16, Option<String>, String)
where
    B: axum::body::HttpBody,
    B::Error: std::fmt::Debug,
{
    let status = res.status().as_u16();
    let ra = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let b = res.into_body().collect().await.unwrap().to_bytes();
    (status, ra, String::from_utf8_lossy(&b).into_owned())
}

/// Bounds a test's step.
async fn within<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung past {limit:?}"))
}

/// Every way to connect a backend to `url`: each must fail within 2 s (the documented connect
/// bound), with words that hold no password.
async fn every_connect_fails(what: &str, url: &str) -> Vec<(String, Option<ErrorKind>, String)> {
    let quota = Quota::per_second(10).unwrap();
    async fn attempt<T: std::fmt::Debug>(
        what: &str,
        name: &str,
        fut: impl std::future::Future<Output = Result<T, BoxError>>,
    ) -> (String, Option<ErrorKind>, String) {
        let t0 = Instant::now();
        let r = within(what, Duration::from_secs(5), fut).await;
        let took = t0.elapsed();
        let e = match r {
            Ok(v) => panic!("{what}: {name} connected to a server that is not Redis: {v:?}"),
            Err(e) => e,
        };
        assert!(
            took <= Duration::from_millis(2_500),
            "{what}: {name} took {took:?}"
        );
        let text = chain(&*e);
        no_secret(&text);
        no_secret(&format!("{e:?}"));
        assert!(!text.contains("127.0.0.1"), "{what}: the URL shows: {text}");
        (name.to_string(), kind(&e), text)
    }
    let (a, b, c, d, e) = tokio::join!(
        attempt(what, "RedisConnection", RedisConnection::connect(url)),
        attempt(what, "RedisQuota", RedisQuota::connect(url, quota)),
        attempt(
            what,
            "RedisIdempotencyStore",
            RedisIdempotencyStore::connect(url)
        ),
        attempt(
            what,
            "RedisStreamQueue",
            RedisStreamQueue::connect(url, "{s116}")
        ),
        attempt(
            what,
            "RedisStreamConsumer",
            RedisStreamConsumer::connect(url, "{s116}", "g", "w", Duration::from_secs(5))
        ),
    );
    vec![a, b, c, d, e]
}

/// RELIABILITY.md: "Connecting ends within 2 s"; "The Redis URL, which may hold a password, is
/// never in a message or in `Debug` output". Servers that are not Redis at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_urls_to_servers_that_are_not_redis_fail_to_connect_in_time_without_the_url() {
    // An HTTP server (hyper answers 400 to bytes that are not HTTP and closes).
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_port = l.local_addr().unwrap().port();
    let http = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    // A TCP server that sends seeded garbage at once and closes.
    let garbage = fake_server(|mut s| async move {
        let mut x: u64 = 0x5116_5116_dead_beef;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&bytes).await;
    })
    .await;
    // A server that starts a 100 MB bulk reply and then trickles it, a byte every 5 ms.
    let trickle = fake_server(|mut s| async move {
        let mut b = [0u8; 64];
        let _ = s.read(&mut b).await;
        if s.write_all(b"$100000000\r\n").await.is_err() {
            return;
        }
        for _ in 0..2_000 {
            if s.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // A server that answers a RESP error that holds nothing Redis would say, then closes.
    let nonsense = fake_server(|mut s| async move {
        let mut b = [0u8; 64];
        let _ = s.read(&mut b).await;
        let _ = s.write_all(b":not-a-number\r\n*-7\r\n$x\r\n").await;
    })
    .await;
    for (what, port) in [
        ("http", http_port),
        ("garbage", garbage.port),
        ("trickle", trickle.port),
        ("nonsense", nonsense.port),
    ] {
        let urls = [
            format!("redis://:{PASSWORD}@127.0.0.1:{port}/"),
            format!("redis://s116user:{PASSWORD}@127.0.0.1:{port}/3"),
        ];
        let (x, y) = tokio::join!(
            every_connect_fails(what, &urls[0]),
            every_connect_fails(what, &urls[1])
        );
        {
            for (name, k, text) in x.into_iter().chain(y) {
                eprintln!("{what} {name}: {k:?}: {text}");
                assert!(
                    !matches!(k, Some(ErrorKind::Auth)),
                    "{what}: {name}: a server that is not Redis reported as a refused password: {text}"
                );
            }
        }
    }
    http.abort();
}

fn says_memory(text: &str) -> bool {
    let t = text.to_lowercase();
    t.contains("oom") || t.contains("memory")
}

/// A Redis at `maxmemory` with `noeviction` refuses every write. RELIABILITY.md: "Nothing
/// acknowledged that was not stored"; "an idempotent request runs only after Redis answered
/// that its lock is taken"; "whose message says what happened"; the limiter's fail-closed
/// policy "fails calls ... not sent ... else `Other`" (ratelimit guide); and "the same backend
/// objects work again" once Redis takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_redis_at_maxmemory_noeviction_fails_closed_names_the_cause_and_recovers() {
    let own = OwnRedis::start().await;
    let url = own.url();
    let t = Duration::from_millis(300);
    let quota = Quota::per_second(1000).unwrap();
    let remote = Arc::new(
        RedisQuota::connect(&url, quota)
            .await
            .unwrap()
            .with_prefix(unique("rl"))
            .with_timeout(t),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .with_on_store_error(OnStoreError::Fail)
        .layer(counting_handler(calls.clone()));
    let allow = RateLimitLayer::new(quota)
        .with_remote(remote.clone())
        .layer(counting_handler(calls.clone()));
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idem"))
        .with_timeout(t);
    let runs = Arc::new(AtomicUsize::new(0));
    let idem = IdempotencyLayer::new(store, |_: &http::request::Parts| "client".to_string())
        .layer(counting_handler(runs.clone()));
    let stream = format!("{{{}}}", unique("oom-stream"));
    let queue = RedisStreamQueue::connect(&url, stream.as_str())
        .await
        .unwrap()
        .with_timeout(t);
    let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), queue.clone());
    let mut consumer =
        RedisStreamConsumer::connect(&url, stream.as_str(), "g", "w1", Duration::from_secs(60))
            .await
            .unwrap()
            .with_wait(Duration::from_millis(50))
            .with_timeout(t);

    // Before: one event queued and taken, not yet acknowledged.
    let (st, _, _) = body_text(rx.clone().oneshot(hook(r#"{"n":"before"}"#)).await.unwrap()).await;
    assert_eq!(st, 200);
    let held = consumer.next().await.unwrap().expect("the first event");

    own.admin_ok(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    own.admin_ok(&["CONFIG", "SET", "maxmemory", "1"]).await;

    let bound = Duration::from_millis(900);
    // The limiter, fail-closed: not sent, Redis's words in the chain.
    let t0 = Instant::now();
    let e = within(
        "fail-closed limiter",
        bound * 3,
        fail.clone().oneshot(post("x")),
    )
    .await
    .expect_err("a store that refuses writes fails the call");
    assert!(t0.elapsed() < bound, "{:?}", t0.elapsed());
    let text = chain(&*e);
    eprintln!("limiter under OOM: {:?}: {text}", kind(&e));
    assert!(
        text.contains("the rate-limit store failed, so the call was not sent"),
        "{text}"
    );
    assert!(says_memory(&text), "the cause is not named: {text}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "sent although refused");
    assert_eq!(
        kind(&e),
        Some(ErrorKind::Other),
        "a refused write is neither unreachable nor a timeout: {text}"
    );
    // Fail-open lets it through.
    let res = within(
        "fail-open limiter",
        bound * 3,
        allow.clone().oneshot(post("x")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let e = remote.try_reserve("k", Duration::ZERO).await.unwrap_err();
    assert!(says_memory(&chain(&*e)), "{}", chain(&*e));

    // Idempotency: 503, Retry-After: 1, handler not run.
    let t0 = Instant::now();
    let res = within(
        "idempotency",
        bound * 3,
        idem.clone().oneshot(post("oom-key")),
    )
    .await
    .unwrap();
    assert!(t0.elapsed() < bound, "{:?}", t0.elapsed());
    let (st, ra, body) = body_text(res).await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(ra.as_deref(), Some("1"));
    assert!(body.contains("idempotency-store-unavailable"), "{body}");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the handler ran without a lock"
    );

    // Webhook receipt: 503 with Retry-After, not acknowledged.
    let t0 = Instant::now();
    let res = within(
        "receiver",
        bound * 3,
        rx.clone().oneshot(hook(r#"{"n":"during"}"#)),
    )
    .await
    .unwrap();
    assert!(t0.elapsed() < bound, "{:?}", t0.elapsed());
    let (st, ra, body) = body_text(res).await;
    assert_eq!(
        st, 503,
        "acknowledged an event Redis refused to store: {body}"
    );
    assert!(ra.is_some(), "503 without Retry-After");
    use sturdy::webhook::EventQueue;
    let e = queue
        .push(
            sturdy::webhook::WebhookEvent::new("standard", "oom-direct", Bytes::from_static(b"x")),
            Duration::from_secs(60),
        )
        .await
        .unwrap_err();
    assert!(says_memory(&chain(&*e)), "{}", chain(&*e));
    no_secret(&chain(&*e));

    // The consumer: next() refused in time, with the cause.
    let t0 = Instant::now();
    let r = within("next", bound * 3, consumer.next()).await;
    assert!(t0.elapsed() < bound, "{:?}", t0.elapsed());
    match r {
        Err(e) => assert!(says_memory(&chain(&*e)), "{}", chain(&*e)),
        Ok(d) => assert!(
            d.is_none(),
            "a new event out of a stream that took none: {d:?}"
        ),
    }
    let acked_during = within("ack", bound * 3, consumer.ack(&held)).await;
    eprintln!(
        "ack under OOM: {:?}",
        acked_during.as_ref().map_err(|e| chain(&**e))
    );

    // Redis takes writes again: the same objects work.
    own.admin_ok(&["CONFIG", "SET", "maxmemory", "0"]).await;
    let res = within(
        "fail-closed limiter after",
        bound * 3,
        fail.clone().oneshot(post("x")),
    )
    .await
    .expect("the same limiter works again");
    assert_eq!(res.status(), 201);
    let (st, _, first) = body_text(
        within(
            "idem after",
            bound * 3,
            idem.clone().oneshot(post("oom-key")),
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(st, 201, "{first}");
    let (st, _, again) = body_text(idem.clone().oneshot(post("oom-key")).await.unwrap()).await;
    assert_eq!((st, again.as_str()), (201, first.as_str()), "not replayed");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let (st, _, _) = body_text(rx.clone().oneshot(hook(r#"{"n":"during"}"#)).await.unwrap()).await;
    assert_eq!(st, 200, "the redelivery is not taken");
    if acked_during.is_err() {
        consumer.ack(&held).await.expect("ack works again");
    }
    let mut bodies = Vec::new();
    for _ in 0..4 {
        if let Some(d) = consumer.next().await.expect("next works again") {
            bodies.push(String::from_utf8_lossy(&d.event.body).into_owned());
            consumer.ack(&d).await.unwrap();
        }
    }
    assert_eq!(
        bodies,
        vec![r#"{"n":"during"}"#.to_string()],
        "events after the OOM spell"
    );
}

/// A peer that speaks RESP but answers every command with one reply that no script of sturdy's
/// could return (a proxy or a mock in front of the wrong thing). RELIABILITY.md: "A webhook
/// delivery gets 2xx only after Redis answered that the event is in the stream; an idempotent
/// request runs only after Redis answered that its lock is taken"; and every operation ends
/// within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_a_peer_answering_nonsense_to_every_command_never_runs_or_acknowledges() {
    let replies: [&'static [u8]; 7] = [
        b"+PONG\r\n",
        b"*0\r\n",
        b"$-1\r\n",
        b"*-1\r\n",
        b"-ERR s116 nope\r\n",
        b"$5\r\nhello\r\n",
        b"*3\r\n$1\r\nx\r\n$1\r\ny\r\n$1\r\nz\r\n",
    ];
    let t = Duration::from_millis(200);
    let bound = Duration::from_millis(1_500);
    for reply in replies {
        let fake = canned_redis(reply).await;
        let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/", fake.port);
        let shown = String::from_utf8_lossy(reply).replace("\r\n", " ");

        let runs = Arc::new(AtomicUsize::new(0));
        match within(
            "store connect",
            bound * 2,
            RedisIdempotencyStore::connect(&url),
        )
        .await
        {
            Ok(store) => {
                let idem =
                    IdempotencyLayer::new(store.with_timeout(t), |_: &http::request::Parts| {
                        "client".to_string()
                    })
                    .layer(counting_handler(runs.clone()));
                let t0 = Instant::now();
                let res = within("idem", bound * 2, idem.oneshot(post("k116")))
                    .await
                    .unwrap();
                assert!(t0.elapsed() < bound, "{shown}: {:?}", t0.elapsed());
                let (st, _, body) = body_text(res).await;
                eprintln!("{shown}: idempotency {st} {body}");
                no_secret(&body);
                assert_eq!(runs.load(Ordering::SeqCst), 0, "{shown}: the handler ran");
                assert!(st >= 500, "{shown}: {st} {body}");
            }
            Err(e) => eprintln!("{shown}: store connect: {}", chain(&*e)),
        }

        match within(
            "queue connect",
            bound * 2,
            RedisStreamQueue::connect(&url, "{s116}"),
        )
        .await
        {
            Ok(q) => {
                let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), q.with_timeout(t));
                let t0 = Instant::now();
                let res = within("receiver", bound * 2, rx.oneshot(hook(r#"{"n":1}"#)))
                    .await
                    .unwrap();
                assert!(t0.elapsed() < bound, "{shown}: {:?}", t0.elapsed());
                let (st, _, body) = body_text(res).await;
                eprintln!("{shown}: receiver {st} {body}");
                no_secret(&body);
                assert!(st >= 500, "{shown}: acknowledged: {st} {body}");
            }
            Err(e) => eprintln!("{shown}: queue connect: {}", chain(&*e)),
        }

        let quota = Quota::per_second(10).unwrap();
        match within("quota connect", bound * 2, RedisQuota::connect(&url, quota)).await {
            Ok(remote) => {
                let calls = Arc::new(AtomicUsize::new(0));
                let fail = RateLimitLayer::new(quota)
                    .with_remote(Arc::new(remote.with_timeout(t)))
                    .with_on_store_error(OnStoreError::Fail)
                    .layer(counting_handler(calls.clone()));
                let t0 = Instant::now();
                let r = within("limiter", bound * 2, fail.oneshot(post("x"))).await;
                assert!(t0.elapsed() < bound, "{shown}: {:?}", t0.elapsed());
                match r {
                    Ok(res) => panic!("{shown}: a nonsense answer let the call through: {res:?}"),
                    Err(e) => {
                        no_secret(&chain(&*e));
                        eprintln!("{shown}: limiter {:?} {}", kind(&e), chain(&*e));
                    }
                }
                assert_eq!(calls.load(Ordering::SeqCst), 0);
            }
            Err(e) => eprintln!("{shown}: quota connect: {}", chain(&*e)),
        }

        let consumer = within(
            "consumer connect",
            bound * 2,
            RedisStreamConsumer::connect(&url, "{s116}", "g", "w", Duration::from_secs(5)),
        )
        .await;
        match consumer {
            Ok(c) => {
                let mut c = c.with_timeout(t).with_wait(Duration::from_millis(20));
                let t0 = Instant::now();
                let r = within("next", bound * 2, c.next()).await;
                assert!(t0.elapsed() < bound, "{shown}: {:?}", t0.elapsed());
                eprintln!("{shown}: next {:?}", r.as_ref().map_err(|e| chain(&**e)));
                if let Ok(Some(d)) = r {
                    panic!("{shown}: an event made of nonsense: {d:?}");
                }
            }
            Err(e) => eprintln!("{shown}: consumer connect: {}", chain(&*e)),
        }
    }
}

/// One of each backend on one URL.
struct Backends {
    remote: Arc<RedisQuota>,
    store: RedisIdempotencyStore,
    queue: RedisStreamQueue,
    consumer: RedisStreamConsumer,
    runs: Arc<AtomicUsize>,
}

impl Backends {
    async fn connect(url: &str, t: Duration) -> Self {
        let quota = Quota::per_second(1000).unwrap();
        let stream = format!("{{{}}}", unique("stream"));
        Self {
            remote: Arc::new(
                RedisQuota::connect(url, quota)
                    .await
                    .unwrap()
                    .with_prefix(unique("rl"))
                    .with_timeout(t),
            ),
            store: RedisIdempotencyStore::connect(url)
                .await
                .unwrap()
                .with_prefix(unique("idem"))
                .with_timeout(t),
            queue: RedisStreamQueue::connect(url, stream.as_str())
                .await
                .unwrap()
                .with_timeout(t),
            consumer: RedisStreamConsumer::connect(
                url,
                stream.as_str(),
                "g",
                "w",
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .with_wait(Duration::from_millis(20))
            .with_timeout(t),
            runs: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Each backend once, directly and through its layer: per backend, `Ok` or the error's
    /// kind and words. Every step is bounded by `bound`.
    async fn probe(
        &mut self,
        bound: Duration,
    ) -> Vec<(&'static str, Result<(), (Option<ErrorKind>, String)>)> {
        use sturdy::webhook::EventQueue;
        let mut out = Vec::new();
        let err = |e: BoxError| (kind(&e), chain(&*e));
        let t0 = Instant::now();
        let r = within(
            "reserve",
            bound * 3,
            self.remote.try_reserve("k", Duration::ZERO),
        )
        .await;
        assert!(t0.elapsed() < bound, "reserve took {:?}", t0.elapsed());
        out.push(("reserve", r.map(|_| ()).map_err(err)));
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = RateLimitLayer::new(Quota::per_second(1000).unwrap())
            .with_remote(self.remote.clone())
            .with_on_store_error(OnStoreError::Fail)
            .layer(counting_handler(calls.clone()));
        let r = within("limiter", bound * 3, fail.oneshot(post("x"))).await;
        out.push(("limiter", r.map(|_| ()).map_err(err)));
        let t0 = Instant::now();
        let ev =
            sturdy::webhook::WebhookEvent::new("standard", unique("ev"), Bytes::from_static(b"x"));
        let r = within(
            "push",
            bound * 3,
            self.queue.push(ev, Duration::from_secs(60)),
        )
        .await;
        assert!(t0.elapsed() < bound, "push took {:?}", t0.elapsed());
        out.push(("push", r.map(|_| ()).map_err(err)));
        let t0 = Instant::now();
        let r = within("next", bound * 3, self.consumer.next()).await;
        assert!(t0.elapsed() < bound, "next took {:?}", t0.elapsed());
        if let Ok(Some(d)) = &r {
            let _ = self.consumer.ack(d).await;
        }
        out.push(("next", r.map(|_| ()).map_err(err)));
        // Through the layers: 2xx only when stored.
        let before = self.runs.load(Ordering::SeqCst);
        let idem = IdempotencyLayer::new(self.store.clone(), |_: &http::request::Parts| {
            "client".to_string()
        })
        .layer(counting_handler(self.runs.clone()));
        let res = within("idem", bound * 3, idem.oneshot(post(&unique("key"))))
            .await
            .unwrap();
        let (st, _, body) = body_text(res).await;
        let ran = self.runs.load(Ordering::SeqCst) - before;
        assert_eq!(
            ran,
            usize::from(st == 201),
            "{st} {body}: handler ran {ran} times"
        );
        out.push((
            "idempotency",
            if st == 201 {
                Ok(())
            } else {
                Err((None, format!("{st} {body}")))
            },
        ));
        let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), self.queue.clone());
        let res = within("receiver", bound * 3, rx.oneshot(hook(&unique("body"))))
            .await
            .unwrap();
        let (st, _, body) = body_text(res).await;
        out.push((
            "receiver",
            if st == 200 {
                Ok(())
            } else {
                Err((None, format!("{st} {body}")))
            },
        ));
        for (_, r) in &out {
            if let Err((_, text)) = r {
                no_secret(text);
            }
        }
        out
    }
}

fn all_ok(what: &str, got: &[(&'static str, Result<(), (Option<ErrorKind>, String)>)]) {
    for (name, r) in got {
        assert!(r.is_ok(), "{what}: {name}: {r:?}");
    }
}

/// Every backend refused with `Auth` words (and the layers fail closed).
fn all_auth(what: &str, got: &[(&'static str, Result<(), (Option<ErrorKind>, String)>)]) {
    for (name, r) in got {
        let Err((k, text)) = r else {
            panic!("{what}: {name} worked on a Redis that refuses its credentials");
        };
        eprintln!("{what}: {name}: {k:?}: {text}");
        match *name {
            "reserve" | "push" | "next" => {
                assert_eq!(k, &Some(ErrorKind::Auth), "{what}: {name}: {text}");
                assert!(
                    text.contains("the user name or password in the URL is missing or wrong"),
                    "{what}: {name}: {text}"
                );
            }
            "limiter" => {
                assert_eq!(k, &Some(ErrorKind::Other), "{what}: {name}: {text}");
                assert!(text.contains("password"), "{what}: {name}: {text}");
            }
            _ => assert!(text.starts_with("503"), "{what}: {name}: {text}"),
        }
    }
}

/// Polls `b` until every backend works, for up to `limit`; the last probe.
async fn until_all_ok(
    b: &mut Backends,
    bound: Duration,
    limit: Duration,
) -> Vec<(&'static str, Result<(), (Option<ErrorKind>, String)>)> {
    let t0 = Instant::now();
    loop {
        let got = b.probe(bound).await;
        if got.iter().all(|(_, r)| r.is_ok()) || t0.elapsed() >= limit {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// RELIABILITY.md: `Auth` "(Redis refused the password or user name in the URL, or needs one
/// the URL lacks)"; "The Redis URL, which may hold a password, is never in a message"; "The
/// connection (`RedisConnection`) reconnects by itself". Here Redis starts to require a
/// password after the backends connected without one, and closes their connections
/// (`CLIENT KILL`), so the change meets them at their reconnect; then it requires none again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_a_password_required_after_connecting_is_auth_then_recovers() {
    let mut own = OwnRedis::start().await;
    let t = Duration::from_millis(300);
    let bound = Duration::from_millis(1_500);
    let mut none = Backends::connect(&own.url(), t).await;
    all_ok("no password", &none.probe(bound).await);

    own.admin_ok(&["CONFIG", "SET", "requirepass", PASSWORD])
        .await;
    own.password = Some(PASSWORD.to_owned());
    let mut right = Backends::connect(&own.url_with(PASSWORD), t).await;
    own.admin_ok(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    // Idle for a moment: the backends see their connections closed (the first command right
    // after the kill is another test's subject).
    tokio::time::sleep(Duration::from_millis(200)).await;
    all_auth(
        "a password needed, none in the URL",
        &none.probe(bound).await,
    );
    all_ok(
        "the right password",
        &until_all_ok(&mut right, bound, Duration::from_secs(2)).await,
    );

    // No password at all again: the backends without one work again by themselves.
    own.admin_ok(&["CONFIG", "SET", "requirepass", ""]).await;
    own.password = None;
    all_ok(
        "no password needed again",
        &until_all_ok(&mut none, bound, Duration::from_secs(3)).await,
    );
}

/// The same with a password in the URL that Redis stops taking (its password changed, its
/// connections closed) and then takes again: RELIABILITY.md, "Recovery without a restart of
/// the application. The connection (`RedisConnection`) reconnects by itself: once the server
/// is back ..., the same backend objects work again"; lib.rs: "The connection reconnects by
/// itself: after a restart of the server, or a failover in the cluster, the same backend works
/// again without being made anew".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_a_backend_refused_its_password_at_a_reconnect_recovers_once_it_is_taken_again() {
    let mut own = OwnRedis::start().await;
    own.admin_ok(&["CONFIG", "SET", "requirepass", PASSWORD])
        .await;
    own.password = Some(PASSWORD.to_owned());
    let t = Duration::from_millis(300);
    let bound = Duration::from_millis(1_500);
    let mut b = Backends::connect(&own.url_with(PASSWORD), t).await;
    all_ok("the right password", &b.probe(bound).await);

    own.admin_ok(&["CONFIG", "SET", "requirepass", OTHER_PASSWORD])
        .await;
    own.password = Some(OTHER_PASSWORD.to_owned());
    own.admin_ok(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    all_auth("the password changed", &b.probe(bound).await);

    own.admin_ok(&["CONFIG", "SET", "requirepass", PASSWORD])
        .await;
    own.password = Some(PASSWORD.to_owned());
    let t0 = Instant::now();
    let got = until_all_ok(&mut b, bound, Duration::from_secs(5)).await;
    for (name, r) in &got {
        if let Err((k, text)) = r {
            eprintln!(
                "{:?} after the password is right again: {name}: {k:?}: {text}",
                t0.elapsed()
            );
        }
    }
    // A new connection with the same URL works at once: only the old objects are stuck.
    let mut fresh = Backends::connect(&own.url_with(PASSWORD), t).await;
    all_ok("new objects", &fresh.probe(bound).await);
    if got.iter().any(|(_, r)| r.is_err()) {
        // Even a restart of the server (with the right password) does not mend them.
        drop(fresh);
        own.restart_empty().await;
        own.admin_ok(&["CONFIG", "SET", "requirepass", PASSWORD])
            .await;
        own.password = Some(PASSWORD.to_owned());
        let again = until_all_ok(&mut b, bound, Duration::from_secs(2)).await;
        let stuck: Vec<_> = again
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(n, _)| *n)
            .collect();
        eprintln!("2 s after a restart with the right password, still failing: {stuck:?}");
    }
    all_ok(
        "the same objects, 5 s after the password is right again",
        &got,
    );
}

/// RELIABILITY.md: "an object that was idle during the restart finds its connection closed with
/// its next command, before writing it; that command goes once more, on a new connection"; and
/// `Auth` when Redis "needs one [a password] the URL lacks". Here Redis starts to require a
/// password and closes every connection (`CLIENT KILL`), and each backend's next command comes
/// at once: it was never run, and the new connection it goes on is refused for want of a
/// password. Rounds on fresh backends; every first command must read as `Auth`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "DOCUMENTED since: RELIABILITY.md says a command sent in the instant the server closes the connection fails as may have run (Transport), the safe reading"]
async fn s116_the_first_command_after_a_kill_into_a_password_is_auth_not_may_have_run() {
    let mut seen = Vec::new();
    for round in 0..16 {
        let mut own = OwnRedis::start().await;
        let t = Duration::from_millis(300);
        let bound = Duration::from_millis(1_500);
        let mut b = Backends::connect(&own.url(), t).await;
        all_ok("no password", &b.probe(bound).await);
        own.admin_ok(&["CONFIG", "SET", "requirepass", PASSWORD])
            .await;
        own.password = Some(PASSWORD.to_owned());
        own.admin_ok(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            .await;
        // Each backend's next command at once, all together.
        use sturdy::webhook::EventQueue;
        let ev =
            sturdy::webhook::WebhookEvent::new("standard", unique("ev"), Bytes::from_static(b"x"));
        let (r, p, n) = within("first commands", bound * 3, async {
            tokio::join!(
                b.remote.try_reserve("k", Duration::ZERO),
                b.queue.push(ev, Duration::from_secs(60)),
                b.consumer.next(),
            )
        })
        .await;
        let results: [(&'static str, Result<(), BoxError>); 3] = [
            ("reserve", r.map(|_| ())),
            ("push", p.map(|_| ())),
            ("next", n.map(|_| ())),
        ];
        for (name, r) in results {
            let e = r.expect_err("worked without the password");
            let text = chain(&*e);
            no_secret(&text);
            seen.push((round, name, kind(&e).expect("a sturdy error"), text));
        }
    }
    let mut bad = 0;
    for (round, name, k, text) in &seen {
        if *name != "limiter" && *k != ErrorKind::Auth {
            bad += 1;
            eprintln!("round {round} {name}: {k:?}: {text}");
        }
    }
    assert_eq!(bad, 0, "of {} direct errors, {bad} not Auth", seen.len());
}

/// RELIABILITY.md: "On one server, an object that was idle during the restart finds its
/// connection closed with its next command, before writing it; that command goes once more, on
/// a new connection, so it works at once (a command that was written before the connection
/// broke is never sent twice: it fails as 'may have run')". Here Redis stays up and closes
/// every connection (`CLIENT KILL`), and each backend's next command comes once the close has
/// been seen (a command sent in the instant of the close "fails as 'may have run'", as the same
/// paragraph says: a CI run sent one there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_the_first_command_right_after_client_kill_works_at_once() {
    let mut failed = Vec::new();
    for round in 0..8 {
        let own = OwnRedis::start().await;
        let t = Duration::from_millis(300);
        let bound = Duration::from_millis(1_500);
        let mut b = Backends::connect(&own.url(), t).await;
        all_ok("before", &b.probe(bound).await);
        own.admin_ok(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
            .await;
        // Idle while the connections close (the redis client's connection task reads the
        // close), not a command racing it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (name, r) in b.probe(bound).await {
            if let Err((k, text)) = r {
                eprintln!("round {round} {name}: {k:?}: {text}");
                failed.push((round, name));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "failed right after CLIENT KILL: {failed:?}"
    );
}

/// `CLIENT PAUSE <ms> WRITE` longer than the timeouts: Redis holds every write (and every
/// script) and runs them all when the pause ends. RELIABILITY.md: "Every operation ends within
/// its timeout"; "Redis hung (accepts, never answers)": the limiter fails closed (kind
/// `Connect`: "did not answer in time"), the idempotency layer answers 503 and "a lock the
/// timed-out `begin` may have taken is released in the background ... so a retry runs once
/// Redis is back", the receiver answers 503 and the sender delivers again (the copy held in
/// Redis then runs: "a webhook push finds its own event already queued and answers
/// `Duplicate`").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_client_pause_write_past_the_timeouts_is_bounded_and_nothing_runs_twice() {
    let own = OwnRedis::start().await;
    let url = own.url();
    let t = Duration::from_millis(200);
    let bound = Duration::from_millis(700);
    let mut b = Backends::connect(&url, t).await;
    let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), b.queue.clone());
    let idem = IdempotencyLayer::new(b.store.clone(), |_: &http::request::Parts| {
        "client".to_string()
    })
    .layer(counting_handler(b.runs.clone()));
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = RateLimitLayer::new(Quota::per_second(1000).unwrap())
        .with_remote(b.remote.clone())
        .with_on_store_error(OnStoreError::Fail)
        .layer(counting_handler(calls.clone()));
    let key = unique("paused-key");
    let body = format!(r#"{{"paused":"{}"}}"#, unique("b"));

    own.admin_ok(&["CLIENT", "PAUSE", "1500", "WRITE"]).await;
    let paused_at = Instant::now();

    let t0 = Instant::now();
    let res = within("idem", bound * 3, idem.clone().oneshot(post(&key)))
        .await
        .unwrap();
    let took = t0.elapsed();
    let (st, ra, text) = body_text(res).await;
    assert_eq!((st, ra.as_deref()), (503, Some("1")), "{text}");
    assert!(took < bound, "{took:?}");
    assert_eq!(b.runs.load(Ordering::SeqCst), 0);

    let t0 = Instant::now();
    let res = within("receiver", bound * 3, rx.clone().oneshot(hook(&body)))
        .await
        .unwrap();
    let took = t0.elapsed();
    let (st, ra, text) = body_text(res).await;
    assert_eq!(st, 503, "acknowledged while Redis held the write: {text}");
    assert!(ra.is_some());
    assert!(took < bound, "{took:?}");

    let t0 = Instant::now();
    let e = within("limiter", bound * 3, fail.clone().oneshot(post("x")))
        .await
        .expect_err("fail-closed");
    assert!(t0.elapsed() < bound, "{:?}", t0.elapsed());
    assert_eq!(kind(&e), Some(ErrorKind::Connect), "{}", chain(&*e));
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let t0 = Instant::now();
    let r = within("next", bound * 3, b.consumer.next()).await;
    assert!(
        t0.elapsed() < bound + Duration::from_millis(100),
        "{:?}",
        t0.elapsed()
    );
    if let Err(e) = &r {
        assert_eq!(kind(e), Some(ErrorKind::Timeout), "{}", chain(&**e));
    }
    assert!(
        paused_at.elapsed() < Duration::from_millis(1_400),
        "the pause ended too soon to tell"
    );

    // The pause ends: what Redis held runs now. The same objects work; nothing runs twice.
    tokio::time::sleep(Duration::from_millis(1_500).saturating_sub(paused_at.elapsed())).await;
    let t0 = Instant::now();
    let first = loop {
        let res = within("idem retry", bound * 3, idem.clone().oneshot(post(&key)))
            .await
            .unwrap();
        let (st, _, text) = body_text(res).await;
        if st == 201 {
            break text;
        }
        assert!(st == 409 || st == 503, "retry after the pause: {st} {text}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the key stays locked: {st} {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (st, _, again) = body_text(idem.clone().oneshot(post(&key)).await.unwrap()).await;
    assert_eq!((st, again.as_str()), (201, first.as_str()));
    assert_eq!(b.runs.load(Ordering::SeqCst), 1, "the handler ran twice");

    let (st, _, text) = body_text(rx.clone().oneshot(hook(&body)).await.unwrap()).await;
    assert_eq!(st, 200, "the redelivery: {text}");
    let mut got = 0;
    for _ in 0..5 {
        if let Some(d) = b.consumer.next().await.expect("next works again") {
            if d.event.body == body.as_bytes() {
                got += 1;
            }
            b.consumer.ack(&d).await.unwrap();
        }
    }
    assert_eq!(got, 1, "the event came out {got} times");
    let res = fail
        .clone()
        .oneshot(post("x"))
        .await
        .expect("the limiter works again");
    assert_eq!(res.status(), 201);
}

/// A proxy in front of a real Redis: forwards each command and its one reply, or, while `answer`
/// holds a reply, answers every command but `PING` with it (as a Redis that is loading its
/// data, or a replica, would).
struct AnswerProxy {
    server: FakeServer,
    answer: Arc<std::sync::Mutex<Option<&'static [u8]>>>,
}

async fn answer_proxy(upstream: u16) -> AnswerProxy {
    let answer: Arc<std::sync::Mutex<Option<&'static [u8]>>> = Arc::default();
    let a = answer.clone();
    let server = fake_server(move |mut s| {
        let a = a.clone();
        async move {
            let mut up: Option<tokio::net::TcpStream> = None;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 16384];
            loop {
                let Ok(n) = s.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some((name, used)) = parse_command(&buf) {
                    let raw: Vec<u8> = buf.drain(..used).collect();
                    let canned = *a.lock().unwrap();
                    let reply = match canned {
                        Some(r) if name != "PING" => r.to_vec(),
                        _ => {
                            if up.is_none() {
                                up = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                                    .await
                                    .ok();
                            }
                            let Some(u) = up.as_mut() else { return };
                            if u.write_all(&raw).await.is_err() {
                                return;
                            }
                            let mut got = Vec::new();
                            while count_replies(&got) < 1 {
                                let Ok(n) = u.read(&mut chunk).await else {
                                    return;
                                };
                                if n == 0 {
                                    return;
                                }
                                got.extend_from_slice(&chunk[..n]);
                            }
                            got
                        }
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    AnswerProxy { server, answer }
}

/// RELIABILITY.md, "Clear errors": `Connect` when "on one server, it refused to run the command
/// for now: failing over, loading its data, answering as a replica; nothing ran", with words
/// such as "Redis answered as a read-only replica"; the limiter fails closed with kind
/// `Connect` ("is failing over"), the idempotency layer and the receiver 503 without running or
/// acknowledging; and once Redis answers normally the same objects work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_a_redis_loading_or_answering_as_a_replica_is_connect_not_run_then_recovers() {
    let own = OwnRedis::start().await;
    let proxy = answer_proxy(own.port).await;
    let url = format!("redis://127.0.0.1:{}/", proxy.server.port);
    let t = Duration::from_millis(300);
    let bound = Duration::from_millis(1_500);
    let mut b = Backends::connect(&url, t).await;
    all_ok("forwarded", &b.probe(bound).await);
    let cases: [(&'static [u8], &str); 3] = [
        (
            b"-LOADING Redis is loading the dataset in memory\r\n",
            "loading",
        ),
        (
            b"-READONLY You can't write against a read only replica.\r\n",
            "Redis answered as a read-only replica",
        ),
        (
            b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
            "",
        ),
    ];
    for (reply, words) in cases {
        *proxy.answer.lock().unwrap() = Some(reply);
        let got = b.probe(bound).await;
        let shown = String::from_utf8_lossy(reply).trim().to_owned();
        for (name, r) in &got {
            let Err((k, text)) = r else {
                panic!("{shown}: {name} worked");
            };
            eprintln!("{shown}: {name}: {k:?}: {text}");
            match *name {
                "idempotency" | "receiver" => {
                    assert!(text.starts_with("503"), "{shown}: {name}: {text}");
                }
                _ => {
                    assert_eq!(k, &Some(ErrorKind::Connect), "{shown}: {name}: {text}");
                    assert!(
                        text.to_lowercase().contains(&words.to_lowercase()),
                        "{shown}: {name}: {text}"
                    );
                }
            }
        }
        *proxy.answer.lock().unwrap() = None;
        all_ok(&format!("after {shown}"), &b.probe(bound).await);
    }
}

/// A persistent admin connection of the test's own (it keeps its place among `maxclients`).
struct Admin(tokio::net::TcpStream);

impl Admin {
    async fn open(port: u16) -> Self {
        Self(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        )
    }

    async fn cmd(&mut self, args: &[&str]) -> String {
        self.0.write_all(&resp(args)).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        within("admin", Duration::from_secs(3), async {
            while count_replies(&got) < 1 {
                let n = self.0.read(&mut buf).await.unwrap();
                assert!(n > 0, "admin connection closed");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Closes every other client's connection.
    async fn kill_others(&mut self) {
        let me = self.cmd(&["CLIENT", "ID"]).await;
        let me = me.trim().trim_start_matches(':').to_owned();
        let list = self.cmd(&["CLIENT", "LIST"]).await;
        for line in list.lines() {
            let Some(id) = line.split(' ').find_map(|f| f.strip_prefix("id=")) else {
                continue;
            };
            if id != me {
                self.cmd(&["CLIENT", "KILL", "ID", id]).await;
            }
        }
    }
}

/// Redis at `maxclients` when the backends reconnect ("ERR max number of clients reached",
/// then the server closes the connection), then taking clients again. RELIABILITY.md: "Every
/// operation ends within its timeout"; "Recovery without a restart of the application. The
/// connection (`RedisConnection`) reconnects by itself".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_redis_at_maxclients_when_backends_reconnect_then_recovers() {
    let own = OwnRedis::start().await;
    let t = Duration::from_millis(300);
    let bound = Duration::from_millis(1_500);
    let mut b = Backends::connect(&own.url(), t).await;
    all_ok("before", &b.probe(bound).await);
    let mut admin = Admin::open(own.port).await;
    admin.cmd(&["CONFIG", "SET", "maxclients", "1"]).await;
    admin.kill_others().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (name, r) in b.probe(bound).await {
        let Err((k, text)) = r else {
            panic!("{name} worked with no room for its connection");
        };
        eprintln!("at maxclients: {name}: {k:?}: {text}");
    }
    admin.cmd(&["CONFIG", "SET", "maxclients", "10000"]).await;
    let t0 = Instant::now();
    let got = until_all_ok(&mut b, bound, Duration::from_secs(3)).await;
    for (name, r) in &got {
        if let Err((k, text)) = r {
            eprintln!("{:?} after room again: {name}: {k:?}: {text}", t0.elapsed());
        }
    }
    all_ok("3 s after Redis takes clients again", &got);
}

/// RELIABILITY.md: "On one server, an object that was idle during the restart finds its
/// connection closed with its next command, before writing it; that command goes once more, on
/// a new connection ... (a command that was written before the connection broke is never sent
/// twice: it fails as 'may have run')"; `Connect`: "Redis cannot be reached ... nothing ran";
/// `Transport`: "the connection broke before the answer: the command may have run". Here the
/// backends' connections were closed while they were idle and Redis, at `maxclients`, refuses
/// the new ones: no command was written, yet each reads "may have run".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "DOCUMENTED since: RELIABILITY.md says a server at maxclients closing a new connection makes the command fail as may have run (Transport)"]
async fn s116_a_command_never_written_whose_reconnect_is_refused_is_not_may_have_run() {
    let own = OwnRedis::start().await;
    let t = Duration::from_millis(300);
    let bound = Duration::from_millis(1_500);
    let mut b = Backends::connect(&own.url(), t).await;
    all_ok("before", &b.probe(bound).await);
    let mut admin = Admin::open(own.port).await;
    admin.cmd(&["CONFIG", "SET", "maxclients", "1"]).await;
    admin.kill_others().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = b.probe(bound).await;
    admin.cmd(&["CONFIG", "SET", "maxclients", "10000"]).await;
    for (name, r) in got {
        let Err((k, text)) = r else {
            panic!("{name} worked with no room for its connection");
        };
        if ["reserve", "push", "next"].contains(&name) {
            assert_ne!(
                k,
                Some(ErrorKind::Transport),
                "{name}: a command never written reads as may have run: {text}"
            );
            assert!(
                text.contains("max number of clients"),
                "{name}: cause not named: {text}"
            );
        }
    }
}

/// RELIABILITY.md's words for one server: `Connect` when "on one server, it refused to run the
/// command for now: failing over, loading its data, answering as a replica"; "the Redis
/// Cluster cannot serve this key now (a failover or a slot move is under way)" is the cluster's.
/// A single replica whose link to its primary is down answers `MASTERDOWN`: the message names
/// a Redis Cluster that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_masterdown_from_one_server_does_not_name_a_cluster() {
    let own = OwnRedis::start().await;
    let proxy = answer_proxy(own.port).await;
    let url = format!("redis://127.0.0.1:{}/", proxy.server.port);
    let remote = RedisQuota::connect(&url, Quota::per_second(10).unwrap())
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    *proxy.answer.lock().unwrap() = Some(
        b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
    );
    let e = remote.try_reserve("k", Duration::ZERO).await.unwrap_err();
    let text = chain(&*e);
    assert_eq!(kind(&e), Some(ErrorKind::Connect), "{text}");
    assert!(!text.contains("Redis Cluster"), "{text}");
}

/// A server killed (`SIGKILL`) while it held a webhook push (`CLIENT PAUSE WRITE`) and
/// restarted empty (`appendonly no`). RELIABILITY.md: the receiver is "fail-closed: 503 with
/// `Retry-After`; the event is not acknowledged, so the sender delivers it again"; after a
/// restart without persistence "every queued event and dedup key is gone" and "the consumer
/// group is gone too: a consumer that joined before the restart gets errors (`NOGROUP`) until it
/// joins again"; "the same backend objects work again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_a_push_held_when_redis_is_killed_and_restarted_empty_is_delivered_once() {
    let mut own = OwnRedis::start().await;
    let t = Duration::from_millis(300);
    let bound = Duration::from_millis(1_500);
    let stream = format!("{{{}}}", unique("killed"));
    let queue = RedisStreamQueue::connect(&own.url(), stream.as_str())
        .await
        .unwrap()
        .with_timeout(t);
    let rx = WebhookReceiver::new(GitHub::new(SECRET).unwrap(), queue);
    let mut old = RedisStreamConsumer::connect(
        &own.url(),
        stream.as_str(),
        "g",
        "w1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(20))
    .with_timeout(t);
    let body = format!(r#"{{"killed":"{}"}}"#, unique("b"));
    own.admin_ok(&["CLIENT", "PAUSE", "5000", "WRITE"]).await;
    let held = tokio::spawn({
        let rx = rx.clone();
        let req = hook(&body);
        async move {
            let t0 = Instant::now();
            let res = rx.oneshot(req).await.unwrap();
            (t0.elapsed(), body_text(res).await)
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    own.restart_empty().await;
    let (took, (st, ra, text)) = within("held push", bound * 3, held).await.unwrap();
    assert_eq!(st, 503, "acknowledged an event a killed Redis held: {text}");
    assert!(ra.is_some());
    assert!(took < bound, "{took:?}");

    // The sender delivers again: queued on the empty server, by the same receiver.
    let (st, _, text) = body_text(
        within("redelivery", bound * 3, rx.clone().oneshot(hook(&body)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 200, "{text}");
    // The consumer that joined before: errors naming NOGROUP, until it joins again.
    let e = within("old next", bound * 3, old.next())
        .await
        .expect_err("the group is gone");
    assert!(chain(&*e).contains("NOGROUP"), "{}", chain(&*e));
    let mut new = RedisStreamConsumer::connect(
        &own.url(),
        stream.as_str(),
        "g",
        "w1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(20));
    let mut got = 0;
    for _ in 0..4 {
        if let Some(d) = new.next().await.unwrap() {
            assert_eq!(d.event.body, body.as_bytes());
            new.ack(&d).await.unwrap();
            got += 1;
        }
    }
    assert_eq!(got, 1);
    // A third copy is a duplicate: acknowledged, not queued again.
    let (st, _, _) = body_text(rx.clone().oneshot(hook(&body)).await.unwrap()).await;
    assert_eq!(st, 200);
    assert!(new.next().await.unwrap().is_none());
}

/// `DEBUG SLEEP` (the whole server stalls) under a consumer's `ack` and `next`. rustdoc of
/// `ack`: "When Redis fails or does not answer in time. The event then stays pending and is
/// delivered again, unless the command reached Redis before the failure (a `Timeout` ...), in
/// which case it may have been done"; of `next`: "an event taken by a read whose answer was
/// dropped stays pending for this consumer and is delivered again after the claim delay,
/// counted as a delivery"; the consumer's timeout "\[1 s\] (the wait for a new event comes on
/// top)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_debug_sleep_under_ack_and_next_is_a_timeout_and_loses_nothing() {
    use sturdy::webhook::EventQueue;
    let own = Arc::new(OwnRedis::start().await);
    let t = Duration::from_millis(200);
    let wait = Duration::from_millis(30);
    let claim = Duration::from_millis(400);
    let stream = format!("{{{}}}", unique("sleep"));
    let queue = RedisStreamQueue::connect(&own.url(), stream.as_str())
        .await
        .unwrap()
        .with_timeout(t);
    let mut c = RedisStreamConsumer::connect(&own.url(), stream.as_str(), "g", "w", claim)
        .await
        .unwrap()
        .with_wait(wait)
        .with_timeout(t);
    for id in ["a", "b"] {
        let ev = sturdy::webhook::WebhookEvent::new("standard", unique(id), Bytes::from(id));
        queue.push(ev, Duration::from_secs(60)).await.unwrap();
    }
    let sleep = |secs: &'static str| {
        let own = own.clone();
        tokio::spawn(async move { own.admin(&["DEBUG", "SLEEP", secs]).await })
    };

    // An ack the server stalls on: a Timeout, and it was done once the server woke.
    let a = c.next().await.unwrap().expect("a");
    assert_eq!(&a.event.body[..], b"a");
    let s = sleep("0.6");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let e = within("ack", Duration::from_secs(3), c.ack(&a))
        .await
        .expect_err("the server sleeps");
    assert!(
        t0.elapsed() < Duration::from_millis(450),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(kind(&e), Some(ErrorKind::Timeout), "{}", chain(&*e));
    s.await.unwrap();

    // A next the server stalls on: a Timeout within the timeout plus the wait; the event the
    // stalled read took comes back after the claim delay, its deliveries counted.
    let s = sleep("0.6");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = Instant::now();
    let r = within("next", Duration::from_secs(3), c.next()).await;
    assert!(
        t0.elapsed() < t + wait + Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
    assert!(r.is_err(), "{r:?}");
    s.await.unwrap();
    let t0 = Instant::now();
    let mut got = Vec::new();
    while t0.elapsed() < claim * 4 && got.len() < 2 {
        if let Some(d) = c.next().await.unwrap() {
            got.push((
                String::from_utf8_lossy(&d.event.body).into_owned(),
                d.deliveries,
            ));
            c.ack(&d).await.unwrap();
        }
    }
    assert_eq!(
        got,
        vec![("b".to_string(), 2)],
        "a was acknowledged once the server woke; b comes back once"
    );
    tokio::time::sleep(claim + Duration::from_millis(100)).await;
    assert!(
        c.next().await.unwrap().is_none(),
        "something came back again"
    );
}

/// A Redis Cluster of this file's own: three primaries with a replica each, in a temp
/// directory; every node killed by its pid on drop.
struct OwnCluster {
    nodes: Vec<OwnRedis>,
    dir: std::path::PathBuf,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl OwnCluster {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("cluster"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        for i in 0..6 {
            // A cluster node's bus port is its port + 10,000: a port from `bind(0)` (32768 and
            // up) can be past 55535, where redis-server refuses to start, or have its bus port
            // taken. The shared helper picks pairs below the ephemeral range.
            let port = crate::cluster32_util::free_cluster_port();
            let d = dir.join(i.to_string());
            std::fs::create_dir_all(&d).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                .arg("--dir")
                .arg(&d)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server");
            nodes.push(OwnRedis {
                child: Some(child),
                port,
                password: None,
            });
        }
        let this = Self { nodes, dir };
        for n in &this.nodes {
            let mut up = false;
            for _ in 0..250 {
                if n.admin(&["PING"])
                    .await
                    .is_some_and(|r| r.starts_with("+PONG"))
                {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(up, "node {} did not start", n.port);
        }
        let addrs: Vec<String> = this
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(out.success());
        for _ in 0..300 {
            let mut ok = true;
            for n in &this.nodes {
                let info = n.admin(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
            }
            if ok {
                return this;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the cluster did not come up");
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    async fn primaries(&self) -> Vec<&OwnRedis> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if n.admin(&["ROLE"])
                .await
                .unwrap_or_default()
                .contains("master")
            {
                out.push(n);
            }
        }
        out
    }
}

/// Every primary of a Redis Cluster at `maxmemory` with `noeviction`. RELIABILITY.md: the
/// words "the Redis Cluster cannot serve this key now (a failover or a slot move is under way)"
/// are for `TRYAGAIN`/`MOVED`/`CLUSTERDOWN`; a refused write is neither, and "whose message says
/// what happened"; fail closed; the same objects work once the primaries take writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s116_cluster_primaries_at_maxmemory_fail_closed_with_the_cause_then_recover() {
    let cluster = OwnCluster::start().await;
    let t = Duration::from_millis(400);
    let bound = Duration::from_millis(2_000);
    let urls = cluster.urls();
    let quota = Quota::per_second(1000).unwrap();
    let stream = format!("{{{}}}", unique("cstream"));
    let mut b = Backends {
        remote: Arc::new(
            RedisQuota::connect_cluster(&urls, quota)
                .await
                .unwrap()
                .with_prefix(unique("rl"))
                .with_timeout(t),
        ),
        store: RedisIdempotencyStore::connect_cluster(&urls)
            .await
            .unwrap()
            .with_prefix(unique("idem"))
            .with_timeout(t),
        queue: RedisStreamQueue::connect_cluster(&urls, stream.as_str())
            .await
            .unwrap()
            .with_timeout(t),
        consumer: RedisStreamConsumer::connect_cluster(
            &urls,
            stream.as_str(),
            "g",
            "w",
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .with_wait(Duration::from_millis(20))
        .with_timeout(t),
        runs: Arc::new(AtomicUsize::new(0)),
    };
    all_ok(
        "before",
        &until_all_ok(&mut b, bound, Duration::from_secs(3)).await,
    );
    let primaries = cluster.primaries().await;
    assert_eq!(primaries.len(), 3);
    for p in &primaries {
        p.admin_ok(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
            .await;
        p.admin_ok(&["CONFIG", "SET", "maxmemory", "1"]).await;
    }
    for (name, r) in b.probe(bound).await {
        let Err((k, text)) = r else {
            // An empty stream: nothing to take, nothing written.
            assert_eq!(
                name, "next",
                "{name} worked on a cluster that refuses writes"
            );
            continue;
        };
        eprintln!("cluster OOM: {name}: {k:?}: {text}");
        match name {
            "idempotency" | "receiver" => assert!(text.starts_with("503"), "{name}: {text}"),
            "limiter" => {
                assert!(says_memory(&text), "{name}: {text}");
                assert_eq!(k, Some(ErrorKind::Other), "{name}: {text}");
            }
            _ => {
                assert!(says_memory(&text), "{name}: the cause is not named: {text}");
                assert!(
                    !text.contains("cannot serve this key now"),
                    "{name}: {text}"
                );
            }
        }
    }
    for p in &primaries {
        p.admin_ok(&["CONFIG", "SET", "maxmemory", "0"]).await;
    }
    all_ok(
        "after",
        &until_all_ok(&mut b, bound, Duration::from_secs(2)).await,
    );
}
