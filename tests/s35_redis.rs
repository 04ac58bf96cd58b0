//! sturdy-redis, as an outside user reads its docs: idle objects after a restart (also the
//! consumer, also objects made with `new(conn)`, also many clones at once, also on a cluster),
//! a command cut after it was written runs once and is "may have run", and the error kinds and
//! words of a bad URL, a bad password, a Redis that is down or hung.
//!
//! Every test that restarts, pauses or cuts Redis starts a `redis-server` of its own (loopback,
//! free port); real time with millisecond settings.
#![cfg(feature = "full")]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use sturdy::core::{BoxError, ErrorKind};
use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::{
    RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue,
};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};
use tokio::time::Instant;

use crate::redis30_util::{
    chain_text, cli_at, own_redis_possible, unique, CutProxy, Mode, OwnRedis,
};

const TTL: Duration = Duration::from_secs(600);

fn kind(e: &BoxError) -> ErrorKind {
    sturdy::core::find::<sturdy::core::Error>(&**e)
        .map(|s| s.kind().clone())
        .unwrap_or_else(|| panic!("no sturdy error in {e:?}"))
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from_static(b"{\"n\":1}"))
}

/// Waits (real time) until the client side has seen the old connections close.
async fn let_the_close_arrive() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis of this test's own that keeps its data across a restart (`appendonly yes`,
/// `appendfsync always`), so a consumer group survives it.
struct DurableRedis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl DurableRedis {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("s35-redis-{}", LockToken::random()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut me = Self {
            port: free_port(),
            dir,
            child: None,
        };
        me.launch().await;
        me
    }

    async fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        for _ in 0..250 {
            if cli_at(self.port, &["PING"]).trim() == "PONG" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("durable redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}

impl Drop for DurableRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// lib.rs: "after a restart of the server ... the same backend works again without being made
/// anew"; RELIABILITY.md: "an object that was idle during the restart ... works at once". The
/// consumer (its `ack`, its `next`) and the queue, each idle during a restart of a Redis that
/// keeps its data (so the group is still there), each work at their first operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_idle_consumer_ack_and_next_work_at_once_after_a_restart() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = DurableRedis::start().await;
    let stream = format!("{{{}}}", unique("s35-cons"));
    let queue = RedisStreamQueue::connect(&redis.url(), stream.clone())
        .await
        .unwrap();
    let mut worker = RedisStreamConsumer::connect(
        &redis.url(),
        stream.clone(),
        "g",
        "w1",
        Duration::from_secs(60),
    )
    .await
    .unwrap()
    .with_wait(Duration::from_millis(50));
    assert_eq!(
        queue.push(event("evt_1"), TTL).await.unwrap(),
        Push::Enqueued
    );
    let d1 = worker.next().await.unwrap().expect("evt_1");
    assert_eq!(d1.event.id, "evt_1");

    // Round 1: the consumer's first operation after the restart is `ack`.
    redis.restart().await;
    let_the_close_arrive().await;
    let a = worker.ack(&d1).await;
    assert!(a.is_ok(), "ack after restart: {a:?}");

    // Round 2: an event is queued, Redis restarts, the consumer's first operation is `next`.
    assert_eq!(
        queue.push(event("evt_2"), TTL).await.unwrap(),
        Push::Enqueued
    );
    redis.restart().await;
    let_the_close_arrive().await;
    let n = worker.next().await;
    match &n {
        Ok(Some(d)) => assert_eq!(d.event.id, "evt_2"),
        other => panic!("next after restart: {other:?}"),
    }
    worker.ack(&n.unwrap().unwrap()).await.unwrap();

    // Round 3: the queue's first operation is a push.
    redis.restart().await;
    let_the_close_arrive().await;
    let p = queue.push(event("evt_3"), TTL).await;
    assert!(matches!(p, Ok(Push::Enqueued)), "push after restart: {p:?}");
    let d3 = worker.next().await.unwrap().expect("evt_3");
    assert_eq!(d3.event.id, "evt_3");
}

/// The same through one `RedisConnection::connect` shared by backends made with `new(conn)`
/// (and `RedisStreamConsumer::join`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_backends_on_one_connection_work_at_once_after_a_restart() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let conn = RedisConnection::connect(&redis.url()).await.unwrap();
    assert!(!conn.is_cluster());
    let quota = RedisQuota::new(conn.clone(), Quota::per_second(1000).unwrap());
    let store = RedisIdempotencyStore::new(conn.clone());
    let stream = unique("s35-conn");
    let queue = RedisStreamQueue::new(conn.clone(), stream.clone()).unwrap();
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    for round in 0..3 {
        redis.restart().await;
        let_the_close_arrive().await;
        // The group is gone with the data (no persistence); the consumer joins again on the
        // same connection, as RELIABILITY.md says.
        let j = RedisStreamConsumer::join(
            conn.clone(),
            stream.clone(),
            "g",
            "w",
            Duration::from_secs(60),
        )
        .await;
        assert!(j.is_ok(), "round {round}: join: {j:?}");
        let r = quota.try_reserve("k", Duration::ZERO).await;
        assert!(
            matches!(r, Ok(Reserve::Granted { .. })),
            "round {round}: quota: {r:?}"
        );
        let b = store
            .begin(&format!("k{round}"), [9; 32], LockToken::random(), TTL)
            .await;
        assert!(matches!(b, Ok(Begin::Started)), "round {round}: {b:?}");
        let p = queue.push(event(&format!("evt_{round}")), TTL).await;
        assert!(matches!(p, Ok(Push::Enqueued)), "round {round}: {p:?}");
    }
}

/// Many clones used at once right after the restart: every one of their first operations works
/// (none is failed as "may have run", none runs twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_many_clones_at_once_after_a_restart_all_work() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = RedisQuota::connect(&redis.url(), Quota::per_second(100_000).unwrap())
        .await
        .unwrap();
    let store = RedisIdempotencyStore::connect(&redis.url()).await.unwrap();
    let stream = unique("s35-many");
    let queue = RedisStreamQueue::connect(&redis.url(), stream.clone())
        .await
        .unwrap();
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    store
        .begin("warm", [1; 32], LockToken::random(), TTL)
        .await
        .unwrap();
    queue.push(event("evt_warm"), TTL).await.unwrap();
    for round in 0..2 {
        redis.restart().await;
        let_the_close_arrive().await;
        let mut tasks = Vec::new();
        for i in 0..24 {
            let (q, s, u) = (quota.clone(), store.clone(), queue.clone());
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                match i % 3 {
                    0 => {
                        let r = q.try_reserve(&format!("k{i}"), Duration::ZERO).await;
                        if !matches!(r, Ok(Reserve::Granted { .. })) {
                            out.push(format!("quota {i}: {r:?}"));
                        }
                    }
                    1 => {
                        let b = s
                            .begin(&format!("r{round}k{i}"), [2; 32], LockToken::random(), TTL)
                            .await;
                        if !matches!(b, Ok(Begin::Started)) {
                            out.push(format!("store {i}: {b:?}"));
                        }
                    }
                    _ => {
                        let p = u.push(event(&format!("evt_{round}_{i}")), TTL).await;
                        if !matches!(p, Ok(Push::Enqueued)) {
                            out.push(format!("queue {i}: {p:?}"));
                        }
                    }
                }
                out
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        assert!(failures.is_empty(), "round {round}: {failures:#?}");
        let len: usize = redis.cli(&["XLEN", &stream]).trim().parse().unwrap();
        assert_eq!(len, 8, "round {round}: each push once");
    }
}

/// Redis closes the idle connections of its clients (`CLIENT KILL TYPE normal`, as its `timeout`
/// setting or an operator would) without restarting: the same as a restart for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_idle_backends_work_at_once_after_redis_closed_their_connections() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let quota = RedisQuota::connect(&redis.url(), Quota::per_second(1000).unwrap())
        .await
        .unwrap();
    let store = RedisIdempotencyStore::connect(&redis.url()).await.unwrap();
    let queue = RedisStreamQueue::connect(&redis.url(), unique("s35-kill"))
        .await
        .unwrap();
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    store
        .begin("a", [1; 32], LockToken::random(), TTL)
        .await
        .unwrap();
    queue.push(event("evt_a"), TTL).await.unwrap();
    for round in 0..2 {
        let _ = redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
        let_the_close_arrive().await;
        let r = quota.try_reserve("k", Duration::ZERO).await;
        assert!(matches!(r, Ok(Reserve::Granted { .. })), "{round}: {r:?}");
        let b = store
            .begin(&format!("b{round}"), [1; 32], LockToken::random(), TTL)
            .await;
        assert!(matches!(b, Ok(Begin::Started)), "{round}: {b:?}");
        let p = queue.push(event(&format!("evt_b{round}")), TTL).await;
        assert!(matches!(p, Ok(Push::Enqueued)), "{round}: {p:?}");
    }
}

/// A cancelled first operation after a restart (dropped at each of its first polls) leaves the
/// backend working: the next operation works and the cancelled one did not leave a slot taken
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_first_operation_after_a_restart_cancelled_at_each_poll() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let quota = RedisQuota::connect(&redis.url(), Quota::per_second(1000).unwrap())
        .await
        .unwrap();
    quota.try_reserve("warm", Duration::ZERO).await.unwrap();
    for polls in 0..4usize {
        redis.restart().await;
        let_the_close_arrive().await;
        {
            let fut = quota.try_reserve("k", Duration::ZERO);
            tokio::pin!(fut);
            let mut n = 0;
            let done = std::future::poll_fn(|cx| {
                if n > polls {
                    return std::task::Poll::Ready(false);
                }
                n += 1;
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(_) => std::task::Poll::Ready(true),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            });
            // Bound it: a Pending poll with no wake would hang the test.
            let _ = tokio::time::timeout(Duration::from_millis(200), done).await;
        }
        let r = quota.try_reserve("after", Duration::ZERO).await;
        assert!(
            matches!(r, Ok(Reserve::Granted { .. })),
            "dropped after {polls} polls: {r:?}"
        );
    }
}

/// RELIABILITY.md: "a command that was written before the connection broke is never sent twice:
/// it fails as 'may have run'". A proxy cuts the connection after the reservation's bytes went
/// through: the error is `Transport`, "may have run", and the quota (burst 3, one slot an
/// hour) lost exactly one slot to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_a_reservation_cut_after_it_was_written_ran_once() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let proxy = CutProxy::start(redis.addr()).await;
    let quota = Quota::new(1, Duration::from_secs(3600))
        .unwrap()
        .with_burst(3)
        .unwrap();
    let remote = RedisQuota::connect(&proxy.url(), quota).await.unwrap();
    assert!(matches!(
        remote.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    proxy.set(Mode::Cut);
    let e = remote.try_reserve("k", Duration::ZERO).await.unwrap_err();
    proxy.set(Mode::Pass);
    let text = chain_text(&*e);
    assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
    assert!(text.contains("may have run"), "{text}");
    // One slot is left if the cut reservation ran once, none if it ran twice.
    let mut next = remote.try_reserve("k", Duration::ZERO).await;
    let t = Instant::now();
    while next.is_err() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        next = remote.try_reserve("k", Duration::ZERO).await;
    }
    assert!(
        matches!(next, Ok(Reserve::Granted { .. })),
        "the third slot: {next:?}"
    );
    assert!(matches!(
        remote.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Denied { .. }
    ));
}

/// The same for a stream push: the event cut after its write is in the stream once, and its
/// redelivery is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_a_push_cut_after_it_was_written_is_in_the_stream_once() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let proxy = CutProxy::start(redis.addr()).await;
    let stream = unique("s35-cut");
    let queue = RedisStreamQueue::connect(&proxy.url(), stream.clone())
        .await
        .unwrap();
    queue.push(event("evt_0"), TTL).await.unwrap();
    proxy.set(Mode::Cut);
    let e = queue.push(event("evt_cut"), TTL).await.unwrap_err();
    proxy.set(Mode::Pass);
    let text = chain_text(&*e);
    assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
    assert!(text.contains("may have run"), "{text}");
    assert_eq!(redis.cli(&["XLEN", &stream]).trim(), "2");
    let mut again = queue.push(event("evt_cut"), TTL).await;
    let t = Instant::now();
    while again.is_err() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        again = queue.push(event("evt_cut"), TTL).await;
    }
    assert!(matches!(again, Ok(Push::Duplicate)), "{again:?}");
    assert_eq!(redis.cli(&["XLEN", &stream]).trim(), "2");
}

/// RELIABILITY.md, "Clear errors": `Auth` when "Redis refused the password or user name in the
/// URL"; the message says it is "missing or wrong"; the password is in no message and no
/// `Debug`, also of the backends that connected with the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_wrong_password_or_user_is_auth_and_never_shown() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    assert_eq!(
        redis
            .cli(&["CONFIG", "SET", "requirepass", "s35-right-pw"])
            .trim(),
        "OK"
    );
    let q = Quota::per_second(10).unwrap();
    for url in [
        format!("redis://:s35-wrong-pw@127.0.0.1:{}/", redis.port),
        format!("redis://nobody:s35-wrong-pw@127.0.0.1:{}/", redis.port),
        format!("redis://nobody:s35-right-pw@127.0.0.1:{}/", redis.port),
    ] {
        let mut errs: Vec<(&str, BoxError)> = Vec::new();
        match RedisQuota::connect(&url, q).await {
            Ok(x) => errs.push((
                "quota",
                x.try_reserve("k", Duration::ZERO).await.unwrap_err(),
            )),
            Err(e) => errs.push(("quota connect", e)),
        }
        match RedisIdempotencyStore::connect(&url).await {
            Ok(s) => errs.push((
                "store",
                s.begin("k", [3; 32], LockToken::random(), TTL)
                    .await
                    .unwrap_err(),
            )),
            Err(e) => errs.push(("store connect", e)),
        }
        match RedisStreamQueue::connect(&url, unique("s35-auth")).await {
            Ok(x) => errs.push(("push", x.push(event("evt"), TTL).await.unwrap_err())),
            Err(e) => errs.push(("queue connect", e)),
        }
        match RedisStreamConsumer::connect(&url, unique("s35-auth"), "g", "w", TTL).await {
            Ok(_) => panic!("a consumer joined with a wrong password"),
            Err(e) => errs.push(("consumer connect", e)),
        }
        for (what, err) in errs {
            let text = chain_text(&*err);
            assert_eq!(kind(&err), ErrorKind::Auth, "{url} {what}: {text}");
            assert!(text.contains("missing or wrong"), "{what}: {text}");
            for pw in ["s35-wrong-pw", "s35-right-pw"] {
                assert!(!text.contains(pw), "{text}");
                assert!(!format!("{err:?}").contains(pw), "{err:?}");
            }
        }
    }
    // The right password: it works, and no Debug shows it.
    let url = format!("redis://:s35-right-pw@127.0.0.1:{}/", redis.port);
    let conn = RedisConnection::connect(&url).await.unwrap();
    let quota = RedisQuota::connect(&url, q).await.unwrap();
    let store = RedisIdempotencyStore::connect(&url).await.unwrap();
    let queue = RedisStreamQueue::connect(&url, unique("s35-ok"))
        .await
        .unwrap();
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    let shown = format!("{conn:?} {quota:?} {store:?} {queue:?}");
    assert!(!shown.contains("s35-right-pw"), "{shown}");
}

/// RELIABILITY.md: `Connect`, "Redis cannot be reached (down, restarting or failing over)";
/// "Connecting ends within 2 s". Nothing listens on the port: every way to connect says so,
/// within the bound, without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_redis_down_is_connect_cannot_be_reached() {
    let port = free_port();
    let url = format!("redis://:s35-pw@127.0.0.1:{port}/");
    let q = Quota::per_second(10).unwrap();
    let t = Instant::now();
    let errs: Vec<(&str, BoxError)> = vec![
        ("conn", RedisConnection::connect(&url).await.unwrap_err()),
        (
            "cluster",
            RedisConnection::connect_cluster([url.as_str()])
                .await
                .unwrap_err(),
        ),
        ("quota", RedisQuota::connect(&url, q).await.unwrap_err()),
        (
            "store",
            RedisIdempotencyStore::connect(&url).await.unwrap_err(),
        ),
        (
            "queue",
            RedisStreamQueue::connect(&url, "s35").await.unwrap_err(),
        ),
        (
            "consumer",
            RedisStreamConsumer::connect(&url, "s35", "g", "w", TTL)
                .await
                .unwrap_err(),
        ),
    ];
    assert!(
        t.elapsed() < Duration::from_secs(6 * 2),
        "{:?}",
        t.elapsed()
    );
    for (what, err) in errs {
        let text = chain_text(&*err);
        assert_eq!(kind(&err), ErrorKind::Connect, "{what}: {text}");
        assert!(text.contains("Redis cannot be reached"), "{what}: {text}");
        assert!(!text.contains("s35-pw"), "{text}");
        assert!(!format!("{err:?}").contains("s35-pw"), "{err:?}");
    }
}

/// "Connecting ends within 2 s": a server that accepts and never answers (a hung Redis, or not
/// Redis at all) ends each `connect` within the bound, with an error that does not say the
/// command was not sent... or that names a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_connect_to_a_silent_server_ends_within_two_seconds() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let url = format!("redis://:s35-pw@{addr}/");
    for what in ["conn", "cluster", "quota", "store"] {
        let t = Instant::now();
        let err: BoxError = match what {
            "conn" => RedisConnection::connect(&url).await.unwrap_err(),
            "cluster" => RedisConnection::connect_cluster([url.as_str()])
                .await
                .unwrap_err(),
            "quota" => RedisQuota::connect(&url, Quota::per_second(1).unwrap())
                .await
                .unwrap_err(),
            _ => RedisIdempotencyStore::connect(&url).await.unwrap_err(),
        };
        let took = t.elapsed();
        assert!(took < Duration::from_millis(2600), "{what}: {took:?}");
        let k = kind(&err);
        assert!(
            k == ErrorKind::Timeout || k == ErrorKind::Connect,
            "{what}: {k:?} {}",
            chain_text(&*err)
        );
        assert!(!format!("{err:?}").contains("s35-pw"));
    }
    holder.abort();
}

/// "Every operation ends within its timeout": a hung Redis (`CLIENT PAUSE ... ALL`) ends every
/// operation of every backend within its `with_timeout` (150 ms here), as `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_every_operation_ends_within_its_timeout_on_a_hung_redis() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let limit = Duration::from_millis(150);
    let stream = unique("s35-hung");
    let quota = RedisQuota::connect(&redis.url(), Quota::per_second(10).unwrap())
        .await
        .unwrap()
        .with_timeout(limit);
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_timeout(limit);
    let queue = RedisStreamQueue::connect(&redis.url(), stream.clone())
        .await
        .unwrap()
        .with_timeout(limit);
    let mut worker =
        RedisStreamConsumer::connect(&redis.url(), stream, "g", "w", Duration::from_secs(60))
            .await
            .unwrap()
            .with_timeout(limit)
            .with_wait(Duration::from_millis(20));
    queue.push(event("evt_1"), TTL).await.unwrap();
    let d = worker.next().await.unwrap().unwrap();
    redis.pause(4000);
    let mut report = Vec::new();
    macro_rules! bounded {
        ($what:expr, $fut:expr) => {{
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(3), $fut).await;
            let took = t.elapsed();
            match r {
                Err(_) => report.push(format!("{}: hung", $what)),
                Ok(Ok(_)) => report.push(format!("{}: answered while paused", $what)),
                Ok(Err(e)) => {
                    let k = kind(&e);
                    if took > Duration::from_millis(900) || k != ErrorKind::Timeout {
                        report.push(format!("{}: {took:?} {k:?} {}", $what, chain_text(&*e)));
                    }
                }
            }
        }};
    }
    bounded!("reserve", quota.try_reserve("k", Duration::ZERO));
    bounded!("pause", quota.try_pause("k", Duration::from_secs(1)));
    bounded!("paused", quota.try_paused("k"));
    bounded!("clear", quota.try_clear_pause("k"));
    bounded!("release", quota.try_release("k"));
    bounded!("begin", store.begin("k", [1; 32], LockToken::random(), TTL));
    bounded!("push", queue.push(event("evt_2"), TTL));
    bounded!("dead_letters", queue.dead_letters(None, 10));
    bounded!("dead_letter_count", queue.dead_letter_count());
    bounded!("ack", worker.ack(&d));
    bounded!("next", worker.next());
    redis.unpause();
    assert!(report.is_empty(), "{report:#?}");
}

/// Hostile URLs: a TLS URL, a unix socket that is not there, a port past 65535, a bracket left
/// open, a password with percent-escapes; each is `Config` ("invalid Redis URL: ...") or
/// `Connect` ("Redis cannot be reached"), ends within the connect bound, and never shows the
/// password. No node at all is `Config`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_hostile_urls_are_config_or_connect_and_hide_the_password() {
    let dead = free_port();
    for url in [
        format!("rediss://:s35-pw@127.0.0.1:{dead}/"),
        "redis+unix:///nonexistent/s35.sock?pass=s35-pw".to_owned(),
        "unix:///nonexistent/s35.sock?pass=s35-pw".to_owned(),
        "redis://:s35-pw@127.0.0.1:99999/".to_owned(),
        "redis://:s35-pw@[::1/".to_owned(),
        format!("redis://:s35-pw%40%2F@127.0.0.1:{dead}/"),
        format!("redis://u:s35-pw@127.0.0.1:{dead}/0?protocol=resp9"),
    ] {
        let t = Instant::now();
        let errs: Vec<BoxError> = vec![
            RedisConnection::connect(&url).await.unwrap_err(),
            RedisConnection::connect_cluster([url.as_str()])
                .await
                .unwrap_err(),
        ];
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{url}: {:?}",
            t.elapsed()
        );
        for err in errs {
            let text = chain_text(&*err);
            let k = kind(&err);
            match k {
                ErrorKind::Config => assert!(text.contains("invalid Redis"), "{url}: {text}"),
                ErrorKind::Connect => {
                    assert!(text.contains("Redis cannot be reached"), "{url}: {text}");
                }
                other => panic!("{url}: {other:?}: {text}"),
            }
            assert!(!text.contains("s35-pw"), "{url}: {text}");
            assert!(!format!("{err:?}").contains("s35-pw"), "{url}: {err:?}");
        }
    }
    let none: [&str; 0] = [];
    let err = RedisConnection::connect_cluster(none).await.unwrap_err();
    assert_eq!(kind(&err), ErrorKind::Config, "{err}");
}

/// RELIABILITY.md table, "Redis down": for the consumer, "`next()` and `ack()` return an
/// error" (`Connect`, "cannot be reached", within the bound); for the queue, the push fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_consumer_and_queue_on_a_redis_that_is_down_fail_clearly() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let stream = unique("s35-down");
    let limit = Duration::from_millis(300);
    let queue = RedisStreamQueue::connect(&redis.url(), stream.clone())
        .await
        .unwrap()
        .with_timeout(limit);
    let mut worker =
        RedisStreamConsumer::connect(&redis.url(), stream, "g", "w", Duration::from_secs(60))
            .await
            .unwrap()
            .with_timeout(limit)
            .with_wait(Duration::from_millis(20));
    queue.push(event("evt_1"), TTL).await.unwrap();
    let d = worker.next().await.unwrap().unwrap();
    redis.kill();
    let_the_close_arrive().await;
    // The first operation after the death may be either word (see redis30); the next ones say
    // Redis cannot be reached.
    let _ = worker.ack(&d).await;
    let t = Instant::now();
    let errs: Vec<(&str, BoxError)> = vec![
        ("ack", worker.ack(&d).await.unwrap_err()),
        ("next", worker.next().await.unwrap_err()),
        ("push", queue.push(event("evt_2"), TTL).await.unwrap_err()),
    ];
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    for (what, err) in errs {
        let text = chain_text(&*err);
        let k = kind(&err);
        assert!(
            k == ErrorKind::Connect || k == ErrorKind::Timeout,
            "{what}: {k:?}: {text}"
        );
        if k == ErrorKind::Connect {
            assert!(text.contains("Redis cannot be reached"), "{what}: {text}");
        }
    }
}

/// A replica of an own primary (no persistence); killed when dropped. It runs in a directory of
/// its own: a replica writes the primary's snapshot to `dump.rdb` in its directory when it
/// syncs, which would otherwise be the package's root.
struct Replica {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Replica {
    async fn start(primary: u16) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("s35-replica-{}", LockToken::random()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                dir.to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--replicaof",
                "127.0.0.1",
                &primary.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let me = Self {
            port,
            dir,
            child: Some(child),
        };
        me.wait_up().await;
        me
    }

    async fn wait_up(&self) {
        let t = Instant::now();
        while !cli_at(self.port, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(t.elapsed() < Duration::from_secs(15), "replica link not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `with_replication` sends the script and `WAIT` "in the same round trip" (a pipeline): an
/// idle store and queue with it work at their first operation after the primary restarted (and
/// its replica is back), as the backends without it do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_replicated_backends_work_at_once_after_a_restart() {
    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let replica = Replica::start(redis.port).await;
    // What is checked is that the connections work at once after the restart; the replica's
    // confirmation is given 5 s, as a busy CI machine delayed it past 500 ms once.
    let store = RedisIdempotencyStore::connect(&redis.url())
        .await
        .unwrap()
        .with_replication(1, Duration::from_secs(5));
    let queue = RedisStreamQueue::connect(&redis.url(), unique("s35-repl"))
        .await
        .unwrap()
        .with_replication(1, Duration::from_secs(5));
    assert!(matches!(
        store
            .begin("a", [1; 32], LockToken::random(), TTL)
            .await
            .unwrap(),
        Begin::Started
    ));
    assert_eq!(
        queue.push(event("evt_a"), TTL).await.unwrap(),
        Push::Enqueued
    );
    for round in 0..2 {
        redis.restart().await;
        replica.wait_up().await;
        // The replica's own "link up" may still be the old link's, read before it saw the
        // primary go: wait until the restarted primary counts it online (synced).
        let t = Instant::now();
        while !cli_at(redis.port, &["INFO", "replication"]).contains("state=online") {
            assert!(t.elapsed() < Duration::from_secs(15), "replica not online");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let_the_close_arrive().await;
        let b = store
            .begin(&format!("b{round}"), [1; 32], LockToken::random(), TTL)
            .await;
        assert!(matches!(b, Ok(Begin::Started)), "{round}: {b:?}");
        let p = queue.push(event(&format!("evt_b{round}")), TTL).await;
        assert!(matches!(p, Ok(Push::Enqueued)), "{round}: {p:?}");
    }
}

/// The pipelined push (`with_replication`) cut after it was written: `Transport`, "may have
/// run", in the stream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_a_replicated_push_cut_after_it_was_written_is_in_the_stream_once() {
    if !own_redis_possible() {
        return;
    }
    let redis = OwnRedis::start().await;
    let _replica = Replica::start(redis.port).await;
    let proxy = CutProxy::start(redis.addr()).await;
    let stream = unique("s35-replcut");
    let queue = RedisStreamQueue::connect(&proxy.url(), stream.clone())
        .await
        .unwrap()
        .with_replication(1, Duration::from_millis(500));
    queue.push(event("evt_0"), TTL).await.unwrap();
    proxy.set(Mode::Cut);
    let e = queue.push(event("evt_cut"), TTL).await.unwrap_err();
    proxy.set(Mode::Pass);
    let text = chain_text(&*e);
    assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
    assert!(text.contains("may have run"), "{text}");
    assert_eq!(redis.cli(&["XLEN", &stream]).trim(), "2");
}

/// End to end, RELIABILITY.md's fixed row: "a backend idle while its Redis restarts, then one
/// operation ... works" (before: "an idempotent request got 503"). An axum app under the
/// `IdempotencyLayer` and a fail-closed `RateLimitLayer` with the Redis quota, idle during the
/// restart: the first request after it is answered by the handler, and the first limited call
/// goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_layers_over_idle_backends_answer_the_first_request_after_a_restart() {
    use std::sync::Arc;
    use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer};
    use sturdy::ratelimit::{OnStoreError, RateLimitLayer};
    use tower::ServiceExt;

    if !own_redis_possible() {
        return;
    }
    let mut redis = OwnRedis::start().await;
    let store = RedisIdempotencyStore::connect(&redis.url()).await.unwrap();
    let router = axum::Router::new()
        .route(
            "/orders",
            axum::routing::post(|| async { (http::StatusCode::CREATED, "made") }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    let addr = crate::redis30_util::serve(router).await;
    let c = crate::redis30_util::client();
    let quota = Quota::per_second(1000).unwrap();
    let remote = RedisQuota::connect(&redis.url(), quota).await.unwrap();
    let limited = tower::ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(quota)
                .with_remote(Arc::new(remote))
                .with_on_store_error(OnStoreError::Fail),
        )
        .service(tower::service_fn(|_req: http::Request<String>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
        }));
    let call = |svc: &_| {
        let svc: &tower::util::BoxCloneService<
            http::Request<String>,
            http::Response<String>,
            BoxError,
        > = svc;
        svc.clone().oneshot(
            http::Request::get("http://api.s35.test/x")
                .body(String::new())
                .unwrap(),
        )
    };
    let limited = tower::util::BoxCloneService::new(limited.map_err(Into::<BoxError>::into));
    call(&limited).await.unwrap();
    let h = [("idempotency-key", "s35-k0"), ("authorization", "Bearer t")];
    let (st, _, _) = crate::redis30_util::post(&c, addr, "/orders", &h, "{}")
        .await
        .unwrap();
    assert_eq!(st, 201);
    for round in 0..2 {
        redis.restart().await;
        let_the_close_arrive().await;
        let key = format!("s35-k{}", round + 1);
        let h = [
            ("idempotency-key", key.as_str()),
            ("authorization", "Bearer t"),
        ];
        let (st, _, body) = crate::redis30_util::post(&c, addr, "/orders", &h, "{}")
            .await
            .unwrap();
        assert_eq!(st, 201, "{round}: {}", String::from_utf8_lossy(&body));
        let r = call(&limited).await;
        assert!(r.is_ok(), "{round}: {:?}", r.err().map(|e| chain_text(&*e)));
    }
}

/// CHANGELOG (Unreleased): "the streams `x` and `{x}` had one key base ... While one of them
/// exists, a push to the other now fails with a `Config` error naming both"; "The twin name
/// given as the queue's own dead-letter stream (`with_dead_letter_stream`) is not another queue
/// and is not refused"; "`dead_letters(_, 0)` answers an empty list".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_twin_stream_names_are_refused_by_name() {
    let Some(url) = crate::redis30_util::redis_url() else {
        return;
    };
    let plain = unique("s35twin");
    let tagged = format!("{{{plain}}}");
    let a = RedisStreamQueue::connect(&url, plain.clone())
        .await
        .unwrap();
    assert_eq!(a.push(event("evt_1"), TTL).await.unwrap(), Push::Enqueued);
    let b = RedisStreamQueue::connect(&url, tagged.clone())
        .await
        .unwrap();
    let err = b.push(event("evt_1"), TTL).await.unwrap_err();
    let text = chain_text(&*err);
    assert_eq!(kind(&err), ErrorKind::Config, "{text}");
    assert!(text.contains(&plain) && text.contains(&tagged), "{text}");
    assert!(a.dead_letters(None, 0).await.unwrap().is_empty());
    // The twin as the dead-letter stream of the plain queue is not refused.
    let c = RedisStreamQueue::connect(&url, plain.clone())
        .await
        .unwrap()
        .with_dead_letter_stream(tagged.clone());
    assert_eq!(c.push(event("evt_2"), TTL).await.unwrap(), Push::Enqueued);
}

/// CHANGELOG: "`RedisQuota` keys of a prefix or key with a brace in it are written in hex
/// inside the tag ...: prefix `p` with key `t}:{c` and prefix `p:{t}` with key `c` were one
/// quota." Each pair has its own quota now (burst 1, one call an hour each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_brace_prefixes_and_keys_are_separate_quotas() {
    let Some(url) = crate::redis30_util::redis_url() else {
        return;
    };
    let quota = Quota::new(1, Duration::from_secs(3600)).unwrap();
    let p = unique("s35p");
    let one = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(p.clone());
    let two = RedisQuota::connect(&url, quota)
        .await
        .unwrap()
        .with_prefix(format!("{p}:{{t}}"));
    assert!(matches!(
        one.try_reserve("t}:{c", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    let r = two.try_reserve("c", Duration::ZERO).await.unwrap();
    assert!(matches!(r, Reserve::Granted { .. }), "one quota: {r:?}");
    // And each is still a quota.
    assert!(matches!(
        one.try_reserve("t}:{c", Duration::ZERO).await.unwrap(),
        Reserve::Denied { .. }
    ));
}

/// CHANGELOG: "durations past about 30 years (`Duration::MAX` leases, TTLs, dedup TTLs, pauses,
/// quota periods) are sent to Redis as 30 years, instead of values Redis refuses".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_duration_max_everywhere_is_accepted() {
    let Some(url) = crate::redis30_util::redis_url() else {
        return;
    };
    let q = Quota::new(1, Duration::MAX).unwrap();
    let quota = RedisQuota::connect(&url, q)
        .await
        .unwrap()
        .with_prefix(unique("s35max"))
        .with_max_pause(Duration::MAX);
    assert!(matches!(
        quota.try_reserve("k", Duration::MAX).await.unwrap(),
        Reserve::Granted { .. }
    ));
    assert!(matches!(
        quota.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Denied { .. }
    ));
    quota.try_pause("k", Duration::MAX).await.unwrap();
    let left = quota.try_paused("k").await.unwrap().expect("paused");
    let thirty_one_years = Duration::from_secs(31 * 366 * 24 * 3600);
    assert!(left <= thirty_one_years, "{left:?}");
    assert!(quota.try_clear_pause("k").await.unwrap().is_some());
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("s35max"));
    assert!(matches!(
        store
            .begin("k", [1; 32], LockToken::random(), Duration::MAX)
            .await
            .unwrap(),
        Begin::Started
    ));
    let queue = RedisStreamQueue::connect(&url, unique("s35max"))
        .await
        .unwrap();
    assert_eq!(
        queue.push(event("evt_max"), Duration::MAX).await.unwrap(),
        Push::Enqueued
    );

    // The timeouts given to the connection and the operations, at their largest (they doubled
    // and added them unchecked, which panicked). No replica is asked for: with one, WAIT would
    // rightly wait as long as it was told.
    sturdy::redis::connect(&url, Duration::MAX).await.unwrap();
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix(unique("s35max2"))
        .with_timeout(Duration::MAX)
        .with_replication(0, Duration::MAX);
    let t = LockToken::random();
    assert!(matches!(
        store.begin("k", [2; 32], t, Duration::MAX).await.unwrap(),
        Begin::Started
    ));
    let done = sturdy::idempotency::server::StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::new(),
    };
    store
        .complete("k", [2; 32], t, done, Duration::MAX)
        .await
        .unwrap();
    let queue = RedisStreamQueue::connect(&url, unique("s35max2"))
        .await
        .unwrap()
        .with_timeout(Duration::MAX)
        .with_replication(0, Duration::MAX);
    assert_eq!(
        queue.push(event("evt_max2"), Duration::MAX).await.unwrap(),
        Push::Enqueued
    );
}

/// CHANGELOG: "a cancelled `next` no longer takes an event on the server after its caller has
/// gone". A `next` waiting for an event is dropped at several points of its wait; an event
/// pushed afterwards goes to the group's other consumer at once (none is left pending on the
/// dropped one's name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_a_cancelled_next_takes_no_event() {
    let Some(url) = crate::redis30_util::redis_url() else {
        return;
    };
    let stream = unique("s35-cancel");
    let mut w1 = RedisStreamConsumer::connect(&url, stream.clone(), "g", "w1", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(400));
    let mut w2 = RedisStreamConsumer::connect(&url, stream.clone(), "g", "w2", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(50));
    let queue = RedisStreamQueue::connect(&url, stream.clone())
        .await
        .unwrap();
    for (i, after) in [1u64, 7, 30, 120].into_iter().enumerate() {
        let _ = tokio::time::timeout(Duration::from_millis(after), w1.next()).await;
        let id = format!("evt_c{i}");
        assert_eq!(queue.push(event(&id), TTL).await.unwrap(), Push::Enqueued);
        // Give a leftover read of w1, if any, the time to take it.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let d = w2.next().await.unwrap();
        assert_eq!(
            d.as_ref().map(|d| d.event.id.clone()),
            Some(id.clone()),
            "dropped after {after} ms: the event went elsewhere"
        );
        w2.ack(&d.unwrap()).await.unwrap();
    }
    let pending = crate::redis30_util::cli_at(
        crate::redis30_util::port_of(&url),
        &["XPENDING", &stream, "g"],
    );
    assert!(pending.starts_with('0'), "{pending}");
}
