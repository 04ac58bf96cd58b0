//! s56 outside round: `RedisStreamQueue`, `RedisStreamConsumer` and `RedisIdempotencyStore` on
//! a standalone redis-server of this file's own (ports 17600-17699), stopped, paused, killed and
//! restarted mid-operation; checked against docs/RELIABILITY.md ("Redis backends: failover and
//! partitions") and the crate's rustdoc. Every server is killed by its pid when its guard drops.
#![cfg(feature = "full")]

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use bytes::Bytes;
use sturdy::core::{BoxError, Error as SturdyError, ErrorKind};
use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken, StoredResponse};
use sturdy::redis::{RedisIdempotencyStore, RedisStreamConsumer, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};

const PASSWORD: &str = "s56Pw-Sekr1t-Hunter";
const TTL: Duration = Duration::from_secs(600);

fn unique(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "s56:{tag}:{}:{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn kind(e: &BoxError) -> Option<ErrorKind> {
    e.downcast_ref::<SturdyError>().map(|e| e.kind().clone())
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("body of {id}")))
}

/// A small seeded xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A redis-server of this file's own, on a free port in 17600-17699; killed by its pid on drop.
struct OwnRedis {
    child: Option<Child>,
    port: u16,
    password: Option<&'static str>,
    dir: Option<std::path::PathBuf>,
}

fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < 100, "no free port in 17600-17699");
        let port = 17600 + (n + (std::process::id() % 50) as u16) % 100;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl OwnRedis {
    async fn start(password: Option<&'static str>, aof: bool) -> Option<Self> {
        let port = free_port();
        let dir = if aof {
            let d = std::env::temp_dir().join(format!("s56-aof-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).ok()?;
            Some(d)
        } else {
            None
        };
        let mut this = Self {
            child: None,
            port,
            password,
            dir,
        };
        this.spawn().await?;
        Some(this)
    }

    async fn spawn(&mut self) -> Option<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""]);
        match &self.dir {
            Some(d) => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(d);
            }
            None => {
                cmd.args(["--appendonly", "no", "--dir", "/tmp"]);
            }
        }
        if let Some(pw) = self.password {
            cmd.args(["--requirepass", pw]);
        }
        self.child = Some(
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?,
        );
        for _ in 0..250 {
            if let Some(reply) = self.raw("PING").await {
                if reply.starts_with("+PONG") {
                    return Some(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// One inline command (after AUTH when a password is set); the first reply line.
    async fn raw(&self, cmd: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        let mut text = String::new();
        if let Some(pw) = self.password {
            text.push_str(&format!("AUTH {pw}\r\n"));
        }
        text.push_str(cmd);
        text.push_str("\r\n");
        s.write_all(text.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let mut got = String::new();
        let want = if self.password.is_some() { 2 } else { 1 };
        let read = async {
            while got.matches("\r\n").count() < want {
                let n = s.read(&mut buf).await.ok()?;
                if n == 0 {
                    break;
                }
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            Some(())
        };
        tokio::time::timeout(Duration::from_millis(500), read)
            .await
            .ok()??;
        got.lines().last().map(str::to_owned)
    }

    fn url(&self) -> String {
        match self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn restart(&mut self) {
        self.kill();
        self.spawn().await.expect("redis-server starts again");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        self.kill();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

macro_rules! own_redis {
    ($pw:expr, $aof:expr) => {
        match OwnRedis::start($pw, $aof).await {
            Some(r) => r,
            None => {
                eprintln!("s56: no redis-server, skipped");
                return;
            }
        }
    };
}

async fn consumer(url: &str, stream: &str, name: &str, claim: Duration) -> RedisStreamConsumer {
    RedisStreamConsumer::connect(url, stream.to_owned(), "g", name, claim)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50))
        .with_timeout(Duration::from_millis(300))
}

fn no_secret(e: &BoxError) {
    let text = format!("{e} / {e:?}");
    assert!(!text.contains(PASSWORD), "the password leaked: {text}");
}

/// Checks an error from a Redis that is down: bounded, `Connect`, the documented message, no
/// password (RELIABILITY.md, "Clear errors": "`Connect` (Redis cannot be reached: the command
/// was not sent)", message "Redis cannot be reached (down, restarting or failing over)").
fn down_error<T: std::fmt::Debug>(what: &str, r: Result<T, BoxError>, t0: Instant) {
    let e = r.expect_err(what);
    no_secret(&e);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "{what}: {:?}",
        t0.elapsed()
    );
    assert_eq!(kind(&e), Some(ErrorKind::Connect), "{what}: {e}");
    assert!(
        e.to_string()
            .contains("Redis cannot be reached (down, restarting or failing over)"),
        "{what}: {e}"
    );
}

/// RELIABILITY.md, table row "Redis down or restarting": webhook receipt "fail-closed", webhook
/// handling "`next()` and `ack()` return an error"; row "Redis restarts without persistence":
/// "every queued event and dedup key is gone" / "the consumer group is gone too: a consumer that
/// joined before the restart gets errors (`NOGROUP`) until it joins again"; "Recovery without a
/// restart of the application". On a server with a password (never in a message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_redis_down_then_restart_without_persistence() {
    let mut srv = own_redis!(Some(PASSWORD), false);
    let url = srv.url();
    let stream = unique("down");
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let mut c = consumer(&url, &stream, "c1", Duration::from_millis(300)).await;
    for id in ["e1", "e2", "e3"] {
        assert_eq!(q.push(event(id), TTL).await.unwrap(), Push::Enqueued);
    }
    let d1 = c.next().await.unwrap().expect("e1");
    let d2 = c.next().await.unwrap().expect("e2");
    c.dead_letter(&d2, "poison").await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let de = dead[0].entry.clone();

    srv.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The first command finds the broken connection; any later one must be `Connect`.
    let t0 = Instant::now();
    let first = q.dead_letter_count().await;
    assert!(first.is_err() && t0.elapsed() < Duration::from_secs(3));
    no_secret(&first.unwrap_err());
    let t0 = Instant::now();
    down_error("ack", c.ack(&d1).await, t0);
    let t0 = Instant::now();
    down_error("dead_letter", c.dead_letter(&d1, "x").await, t0);
    let t0 = Instant::now();
    down_error("next", c.next().await, t0);
    let t0 = Instant::now();
    down_error("replay", q.replay_dead_letter(&de).await, t0);
    let t0 = Instant::now();
    down_error("discard", q.discard_dead_letter(&de).await, t0);
    let t0 = Instant::now();
    down_error("dead_letters", q.dead_letters(None, 10).await, t0);
    let t0 = Instant::now();
    down_error("push", q.push(event("e4"), TTL).await, t0);

    srv.restart().await;
    // "once the server is back after a restart ... the same backend objects work again".
    assert_eq!(q.push(event("e4"), TTL).await.unwrap(), Push::Enqueued);
    assert_eq!(q.dead_letter_count().await.unwrap(), 0, "nothing persisted");
    // "a consumer that joined before the restart gets errors (`NOGROUP`) until it joins again"
    let e = c.next().await.expect_err("the group is gone");
    no_secret(&e);
    assert!(e.to_string().contains("NOGROUP"), "{e}");
    let mut c2 = consumer(&url, &stream, "c1", Duration::from_millis(300)).await;
    let d4 = c2.next().await.unwrap().expect("e4 after joining again");
    assert_eq!(d4.event.id, "e4");
    c2.ack(&d4).await.unwrap();
}

/// RELIABILITY.md, row "Redis restarts with `appendonly yes` and `appendfsync always`":
/// "nothing lost; the group and its pending events are back"; "an object that was idle during
/// the restart finds its connection closed with its next command, before writing it; that
/// command goes once more, on a new connection, so it works at once".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_restart_with_aof_keeps_group_pending_and_dead_letters() {
    let mut srv = own_redis!(None, true);
    let url = srv.url();
    let stream = unique("aof");
    let claim = Duration::from_millis(300);
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    let mut c = consumer(&url, &stream, "c1", claim).await;
    for id in ["e1", "e2", "e3", "e4"] {
        assert_eq!(q.push(event(id), TTL).await.unwrap(), Push::Enqueued);
    }
    let d1 = c.next().await.unwrap().unwrap();
    c.ack(&d1).await.unwrap();
    let d2 = c.next().await.unwrap().unwrap();
    let d3 = c.next().await.unwrap().unwrap();
    c.dead_letter(&d3, "bad").await.unwrap();
    assert_eq!(
        (
            d1.event.id.as_str(),
            d2.event.id.as_str(),
            d3.event.id.as_str()
        ),
        ("e1", "e2", "e3")
    );

    srv.restart().await;
    // Idle objects: their first command works at once.
    c.ack(&d2)
        .await
        .expect("ack on the idle consumer after restart");
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);
    assert_eq!(
        q.push(event("e1"), TTL).await.unwrap(),
        Push::Duplicate,
        "dedup keys kept"
    );
    let d4 = c.next().await.unwrap().expect("e4, never taken");
    assert_eq!(d4.event.id, "e4");
    c.ack(&d4).await.unwrap();
    tokio::time::sleep(claim * 2).await;
    let t0 = Instant::now();
    while t0.elapsed() < claim * 2 {
        if let Some(d) = c.next().await.unwrap() {
            panic!("delivered again after its ack: {}", d.event.id);
        }
    }
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event.id, "e3");
    assert!(q.replay_dead_letter(&dead[0].entry).await.unwrap());
    let d = c.next().await.unwrap().expect("the replayed e3");
    assert_eq!((d.event.id.as_str(), d.deliveries), ("e3", 1));
    c.ack(&d).await.unwrap();
}

/// RELIABILITY.md, row "Redis hung (accepts, never answers)": "as above, after the timeout";
/// consumer: "the error comes after the timeout (for `next()`, the wait for a new event comes on
/// top)"; "Clear errors": "`Timeout` (it did not answer in time: it may have run)". Then
/// "the same backend objects work again".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_hung_sigstop_times_out_then_same_objects_work() {
    let srv = own_redis!(Some(PASSWORD), false);
    let url = srv.url();
    let stream = unique("hung");
    let claim = Duration::from_millis(400);
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let mut c = consumer(&url, &stream, "c1", claim).await;
    assert_eq!(q.push(event("e1"), TTL).await.unwrap(), Push::Enqueued);
    let d1 = c.next().await.unwrap().unwrap();

    srv.signal("-STOP");
    let bound = Duration::from_secs(3);
    let check = |what: &str, r: Result<(), BoxError>, t0: Instant| {
        let e = r.expect_err(what);
        no_secret(&e);
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < bound,
            "{what}: {took:?}"
        );
        assert_eq!(kind(&e), Some(ErrorKind::Timeout), "{what}: {e}");
    };
    let t0 = Instant::now();
    check("ack", c.ack(&d1).await, t0);
    let t0 = Instant::now();
    check("next", c.next().await.map(|_| ()), t0);
    let t0 = Instant::now();
    check("push", q.push(event("e2"), TTL).await.map(|_| ()), t0);
    let t0 = Instant::now();
    check("count", q.dead_letter_count().await.map(|_| ()), t0);
    let t0 = Instant::now();
    check("replay", q.replay_dead_letter("1-0").await.map(|_| ()), t0);
    srv.signal("-CONT");

    // The same objects work again; e2 may or may not have been queued ("may have run").
    let t0 = Instant::now();
    let pushed = loop {
        match q.push(event("e2"), TTL).await {
            Ok(p) => break p,
            Err(e) if t0.elapsed() < Duration::from_secs(5) => {
                no_secret(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert!(matches!(pushed, Push::Enqueued | Push::Duplicate));
    let mut seen: HashMap<String, u64> = HashMap::new();
    let t0 = Instant::now();
    while t0.elapsed() < claim * 4 {
        if let Some(d) = c.next().await.unwrap() {
            *seen.entry(d.event.id.clone()).or_default() += 1;
            c.ack(&d).await.unwrap();
        }
    }
    assert_eq!(seen.get("e2"), Some(&1), "{seen:?}");
    assert!(seen.get("e1").copied().unwrap_or(0) <= 1, "{seen:?}");
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
}

/// The same with `CLIENT PAUSE 1500 ALL` (Redis holds every client): bounded errors while
/// paused, then the objects work again; the idempotency store fails closed and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_client_pause_bounded_then_recovers() {
    let srv = own_redis!(None, false);
    let url = srv.url();
    let stream = unique("pause");
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap()
        .with_timeout(Duration::from_millis(200));
    let mut c = consumer(&url, &stream, "c1", Duration::from_millis(300)).await;
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idem"))
        .with_timeout(Duration::from_millis(200));
    assert_eq!(q.push(event("e1"), TTL).await.unwrap(), Push::Enqueued);
    let d1 = c.next().await.unwrap().unwrap();
    assert_eq!(
        srv.raw("CLIENT PAUSE 1500 ALL").await.as_deref(),
        Some("+OK")
    );
    let t0 = Instant::now();
    assert!(c.ack(&d1).await.is_err());
    assert!(q.push(event("e2"), TTL).await.is_err());
    assert!(store
        .begin("k", [1; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .is_err());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(q.push(event("e3"), TTL).await.is_ok());
    assert_eq!(
        store
            .begin("k2", [2; 32], LockToken::random(), Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Started
    );
    c.ack(&d1).await.unwrap();
}

/// Idempotency column: "Redis down": "fail-closed" (the store errs); "Redis restarts without
/// persistence": "every lock and stored response is gone: a retry runs the handler again";
/// the same store object works after the restart ("Recovery without a restart").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_idempotency_down_restart_and_password() {
    let mut srv = own_redis!(Some(PASSWORD), false);
    let url = srv.url();
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("idem"))
        .with_timeout(Duration::from_millis(300));
    let fp = [7u8; 32];
    let resp = StoredResponse {
        status: 201,
        headers: vec![("x".into(), vec![0, 255])],
        body: Bytes::from_static(b"done"),
    };
    let t1 = LockToken::random();
    assert_eq!(
        store
            .begin("k", fp, t1, Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Started
    );
    store
        .complete("k", fp, t1, resp.clone(), TTL)
        .await
        .unwrap();
    assert_eq!(
        store
            .begin("k", fp, LockToken::random(), Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Completed(resp)
    );
    srv.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = store
        .begin("k", fp, LockToken::random(), Duration::from_secs(5))
        .await
        .map_err(|e| no_secret(&e));
    let t0 = Instant::now();
    down_error(
        "begin",
        store
            .begin("k", fp, LockToken::random(), Duration::from_secs(5))
            .await,
        t0,
    );
    let resp2 = StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::new(),
    };
    let t0 = Instant::now();
    down_error(
        "complete",
        store.complete("k", fp, t1, resp2, TTL).await,
        t0,
    );
    let t0 = Instant::now();
    down_error("release", store.release("k", t1).await, t0);
    srv.restart().await;
    assert_eq!(
        store
            .begin("k", fp, LockToken::random(), Duration::from_secs(5))
            .await
            .unwrap(),
        Begin::Started,
        "the stored response is gone after a restart without persistence"
    );
    // Password handling: none, a wrong one.
    let no_pw = format!("redis://127.0.0.1:{}/", srv.port);
    let wrong = format!("redis://:wrong-{PASSWORD}@127.0.0.1:{}/", srv.port);
    // RELIABILITY.md: "a Redis that requires a password reached with none (a stream push)":
    // "`Auth`, \"the user name or password in the URL is missing or wrong\"". Connecting may
    // succeed (no command sent yet); the first operation must then fail so.
    let auth = |what: &str, e: BoxError| {
        no_secret(&e);
        assert_eq!(kind(&e), Some(ErrorKind::Auth), "{what}: {e}");
        assert!(
            e.to_string()
                .contains("the user name or password in the URL is missing or wrong"),
            "{what}: {e}"
        );
    };
    for u in [no_pw, wrong] {
        match RedisIdempotencyStore::connect(&u).await {
            Err(e) => auth("store connect", e),
            Ok(s) => auth(
                "begin",
                s.begin("k", fp, LockToken::random(), Duration::from_secs(5))
                    .await
                    .expect_err("refused"),
            ),
        }
        match RedisStreamQueue::connect(&u, "s56pw").await {
            Err(e) => auth("queue connect", e),
            Ok(q) => auth("push", q.push(event("p"), TTL).await.expect_err("refused")),
        }
        let e = RedisStreamConsumer::connect(&u, "s56pw", "g", "c", TTL)
            .await
            .expect_err("the group cannot be created");
        auth("consumer connect", e);
    }
}

/// `replay_dead_letter` / `discard_dead_letter`: "`Ok(false)` when there is no such dead
/// letter", fed malformed and extreme entry ids (found by this round: replay gave Redis's raw
/// "Invalid stream ID" script error; fixed); `dead_letter`: "at most 1 KiB kept" of the
/// reason; `with_max_deliveries`: "(at least 1)"; names refused with a `Config` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_malformed_ids_long_reason_and_names() {
    let srv = own_redis!(None, false);
    let url = srv.url();
    let stream = unique("odd");
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut c = consumer(&url, &stream, "c1", Duration::from_millis(200))
        .await
        .with_max_deliveries(0);
    let mut wrong = Vec::new();
    for id in [
        "",
        "not-an-id",
        "0-0",
        "1-1",
        "18446744073709551615-18446744073709551615",
        "18446744073709551616-0",
        "-",
        "+",
        "$",
        ">",
        "1-",
        "ключ",
    ] {
        for (op, r) in [
            ("replay", q.replay_dead_letter(id).await),
            ("discard", q.discard_dead_letter(id).await),
        ] {
            match r {
                Ok(false) => {}
                Ok(true) => wrong.push(format!("{op} {id:?}: Ok(true)")),
                Err(e) => wrong.push(format!("{op} {id:?}: {e}")),
            }
        }
    }
    let malformed = wrong.join("\n");
    assert!(q.dead_letters(None, 0).await.unwrap().is_empty());
    assert!(q.dead_letters(None, usize::MAX).await.unwrap().is_empty());

    // with_max_deliveries(0) is 1: delivered once, then dead-lettered.
    assert_eq!(q.push(event("m"), TTL).await.unwrap(), Push::Enqueued);
    let d = c.next().await.unwrap().expect("delivered once");
    assert_eq!(d.deliveries, 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(c.next().await.unwrap().is_none());
    assert_eq!(q.dead_letter_count().await.unwrap(), 1);

    assert_eq!(q.push(event("r"), TTL).await.unwrap(), Push::Enqueued);
    let d = c.next().await.unwrap().expect("r");
    let reason = "ж".repeat(3000);
    c.dead_letter(&d, &reason).await.unwrap();
    let dead = q.dead_letters(None, 10).await.unwrap();
    let r = dead.iter().find(|x| x.event.id == "r").expect("r dead");
    assert!(
        r.reason.len() <= 1024 && !r.reason.is_empty(),
        "{}",
        r.reason.len()
    );
    assert!(reason.starts_with(&r.reason));
    // Paging with the last entry seen ends.
    let after = dead.last().unwrap().entry.clone();
    assert!(q.dead_letters(Some(&after), 10).await.unwrap().is_empty());

    for bad in ["", "a}b", "{x}:dead", "{x}:seen:y"] {
        let e = RedisStreamQueue::connect(&url, bad).await.expect_err(bad);
        assert_eq!(kind(&e), Some(ErrorKind::Config), "{bad}: {e}");
        let e = RedisStreamConsumer::connect(&url, bad, "g", "c", TTL)
            .await
            .expect_err(bad);
        assert_eq!(kind(&e), Some(ErrorKind::Config), "{bad}: {e}");
    }
    assert!(RedisStreamConsumer::connect(&url, "s56ok", "", "c", TTL)
        .await
        .is_err());
    assert!(RedisStreamConsumer::connect(&url, "s56ok", "g", "", TTL)
        .await
        .is_err());
    // Checked last, so that the rest above runs too.
    assert!(
        malformed.is_empty(),
        "docs: \"`Ok(false)` when there is no such dead letter\"; instead:\n{malformed}"
    );
}

/// `next`: "Cancelling it ... loses nothing"; `ack`/`dead_letter`: "The event then stays
/// pending and is delivered again, unless the command reached Redis ..., in which case it may
/// have been done" (delivery is at least once); an event acknowledged (`Ok`) or dead-lettered
/// (`Ok`) "is not delivered again to this group". Futures cut at seeded random points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_cancel_next_ack_dead_letter_loses_nothing() {
    let srv = own_redis!(None, false);
    let url = srv.url();
    let stream = unique("cancel");
    let claim = Duration::from_millis(250);
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut c = consumer(&url, &stream, "c1", claim)
        .await
        .with_timeout(Duration::from_secs(1))
        .with_max_deliveries(1_000);
    let ids: Vec<String> = (0..30).map(|i| format!("ev{i}")).collect();
    for id in &ids {
        assert_eq!(q.push(event(id), TTL).await.unwrap(), Push::Enqueued);
    }
    let mut rng = Rng(0x5eed_5656);
    let mut done: HashSet<String> = HashSet::new(); // ack or dead_letter answered Ok
    let mut dead_ok: HashSet<String> = HashSet::new();
    let cut = |rng: &mut Rng| Duration::from_micros(rng.below(4_000));
    let t0 = Instant::now();
    while done.len() < ids.len() && t0.elapsed() < Duration::from_secs(12) {
        let got = match tokio::time::timeout(cut(&mut rng), c.next()).await {
            Ok(r) => r.unwrap(),
            Err(_) => continue,
        };
        let Some(d) = got else { continue };
        let id = d.event.id.clone();
        assert!(
            !done.contains(&id),
            "{id} delivered after its ack/dead_letter was Ok"
        );
        if rng.below(4) == 0 {
            if let Ok(r) = tokio::time::timeout(cut(&mut rng), c.dead_letter(&d, "cut")).await {
                r.unwrap();
                done.insert(id.clone());
                dead_ok.insert(id);
            }
        } else if let Ok(r) = tokio::time::timeout(cut(&mut rng), c.ack(&d)).await {
            r.unwrap();
            done.insert(id);
        }
    }
    // Drain without cuts: what is still pending comes back after the claim delay.
    let t1 = Instant::now();
    let mut late: Vec<String> = Vec::new();
    while t1.elapsed() < claim * 6 {
        if let Some(d) = c.next().await.unwrap() {
            assert!(!done.contains(&d.event.id), "{} again", d.event.id);
            late.push(d.event.id.clone());
            c.ack(&d).await.unwrap();
            done.insert(d.event.id.clone());
        }
    }
    let dead: HashSet<String> = q
        .dead_letters(None, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.event.id)
        .collect();
    for id in &ids {
        assert!(done.contains(id) || dead.contains(id), "{id} lost");
    }
    for id in &dead_ok {
        assert!(
            dead.contains(id),
            "{id}: dead_letter was Ok, not in the dead letters"
        );
    }
    for id in &late {
        assert!(
            !dead.contains(id),
            "{id} both dead-lettered and delivered again"
        );
    }
}

/// `replay_dead_letter` / `discard_dead_letter` cut at seeded random points: each dead letter
/// ends either in the dead-letter stream or back on the stream, never both, never neither; the
/// replayed ones come out once each, with "a fresh delivery count".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_cancel_replay_and_discard() {
    let srv = own_redis!(None, false);
    let url = srv.url();
    let stream = unique("replay");
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut c = consumer(&url, &stream, "c1", Duration::from_secs(30)).await;
    let ids: Vec<String> = (0..24).map(|i| format!("r{i}")).collect();
    for id in &ids {
        q.push(event(id), TTL).await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        c.dead_letter(&d, "to replay").await.unwrap();
    }
    let dead = q.dead_letters(None, 100).await.unwrap();
    assert_eq!(dead.len(), ids.len());
    let mut rng = Rng(0x56_0001);
    let mut replayed: HashSet<String> = HashSet::new();
    let mut discarded: HashSet<String> = HashSet::new();
    for (i, dl) in dead.iter().enumerate() {
        let discard = i % 3 == 2;
        loop {
            let cut = Duration::from_micros(rng.below(3_000));
            let r = if discard {
                tokio::time::timeout(cut, q.discard_dead_letter(&dl.entry)).await
            } else {
                tokio::time::timeout(cut, q.replay_dead_letter(&dl.entry)).await
            };
            match r {
                Err(_) => continue,
                Ok(r) => {
                    let _ = r.unwrap(); // true, or false when a cut call had done it
                    if discard {
                        discarded.insert(dl.event.id.clone());
                    } else {
                        replayed.insert(dl.event.id.clone());
                    }
                    break;
                }
            }
        }
    }
    assert_eq!(q.dead_letter_count().await.unwrap(), 0);
    let mut got: HashMap<String, u64> = HashMap::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        if let Some(d) = c.next().await.unwrap() {
            assert_eq!(d.deliveries, 1, "fresh delivery count for {}", d.event.id);
            *got.entry(d.event.id.clone()).or_default() += 1;
            c.ack(&d).await.unwrap();
        }
    }
    for id in &replayed {
        assert_eq!(got.get(id), Some(&1), "{id}: {got:?}");
    }
    for id in &discarded {
        assert_eq!(got.get(id), None, "{id} discarded yet delivered");
    }
}

/// `RedisIdempotencyStore` operations cut at seeded random points: no panic, the store still
/// works, and each key ends consistent: a lock a cut `begin` may have taken runs out with its
/// lease ("A lock lives for its lease unless it is renewed, completed or released"), a cut
/// `complete` either stored the response or left the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_cancel_store_operations() {
    let srv = own_redis!(None, false);
    let url = srv.url();
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("cut"));
    let lease = Duration::from_millis(300);
    let resp = StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::from_static(b"ok"),
    };
    let mut rng = Rng(0x56_0002);
    let fp = [9u8; 32];
    for i in 0..20 {
        let key = format!("k{i}");
        let tok = LockToken::random();
        let cut = Duration::from_micros(rng.below(3_000));
        let began = tokio::time::timeout(cut, store.begin(&key, fp, tok, lease)).await;
        let cut = Duration::from_micros(rng.below(3_000));
        match i % 3 {
            0 => {
                let _ = tokio::time::timeout(cut, store.complete(&key, fp, tok, resp.clone(), TTL))
                    .await;
            }
            1 => {
                let _ = tokio::time::timeout(cut, store.release(&key, tok)).await;
            }
            _ => {
                let _ = tokio::time::timeout(cut, store.renew(&key, fp, tok, lease)).await;
            }
        }
        if let Ok(r) = began {
            assert_eq!(r.unwrap(), Begin::Started);
        }
    }
    tokio::time::sleep(lease * 3).await;
    for i in 0..20 {
        let key = format!("k{i}");
        let b = store
            .begin(&key, fp, LockToken::random(), lease)
            .await
            .unwrap();
        match i % 3 {
            0 => assert!(
                b == Begin::Started || b == Begin::Completed(resp.clone()),
                "{key}: {b:?}"
            ),
            _ => assert_eq!(b, Begin::Started, "{key}"),
        }
    }
}

/// `replay_dead_letter(entry)`: "Puts the dead letter `entry` back on the stream" and
/// "`Ok(false)` when there is no such dead letter"; `discard_dead_letter(entry)`: "Deletes the
/// dead letter `entry` for good". Range words that are no entry id (`-`, `+`, `0`) must not
/// act on some other dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s56_range_words_touch_no_other_dead_letter() {
    let srv = own_redis!(None, false);
    let url = srv.url();
    let stream = unique("range");
    let q = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    let mut c = consumer(&url, &stream, "c1", TTL).await;
    for id in ["a", "b"] {
        q.push(event(id), TTL).await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        c.dead_letter(&d, "x").await.unwrap();
    }
    let dead = q.dead_letters(None, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    // (A bare millisecond part, `<ms>`, is Redis's shorthand of `<ms>-0` and replays that
    // entry: not checked here.)
    let mut acted = Vec::new();
    for word in ["-", "+", "0", "0-0"] {
        if word == dead[0].entry || word == dead[1].entry {
            continue;
        }
        if let Ok(true) = q.replay_dead_letter(word).await {
            acted.push(format!("replay {word:?} answered true"));
        }
        if let Ok(true) = q.discard_dead_letter(word).await {
            acted.push(format!("discard {word:?} answered true"));
        }
    }
    let left = q.dead_letter_count().await.unwrap();
    assert!(
        acted.is_empty() && left == 2,
        "dead letters left {left} of 2: {acted:?}"
    );
}
