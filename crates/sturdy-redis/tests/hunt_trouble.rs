//! Server trouble against redis-server processes the tests start on loopback ports of their own
//! (18600 and up): paused past the timeout, killed and restarted, a connection cut after a
//! command ran, full memory, and a password that must never show in an error or a `Debug`.

use crate::support;
use support::servers::{self, Server, TempDir};
use support::unique;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sturdy_core::classify::delivery;
use sturdy_core::{BoxError, Delivery, ErrorKind};
use sturdy_idempotency::server::{Begin, IdempotencyStore, StoredResponse};
use sturdy_ratelimit::{Quota, Reserve};
use sturdy_redis::{
    RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamConsumer, RedisStreamQueue,
};
use sturdy_webhook::{EventQueue, Push, WebhookEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio::time::Instant;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(60);

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from(format!("{{\"id\":\"{id}\"}}")))
}

fn response(body: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: Bytes::from(body.to_owned()),
    }
}

fn kind(e: &BoxError) -> ErrorKind {
    e.downcast_ref::<sturdy_core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {e:?}"))
        .kind()
        .clone()
}

/// Every text an error shows: its Display, its Debug, and those of its sources.
fn all_text(e: &BoxError) -> String {
    let mut out = format!("{e} | {e:?}");
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(s) = cur {
        out.push_str(&format!(" | {s} | {s:?}"));
        cur = s.source();
    }
    out
}

async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn server(port: u16, extra: &[&str]) -> (Server, TempDir) {
    assert!(servers::available(), "redis-server is needed");
    let dir = TempDir::new(&format!("hunt-{port}"));
    let s = Server::start(&dir.0, port, extra).await;
    (s, dir)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_times_out_clearly_and_the_next_answers_are_right() {
    let (srv, _dir) = server(18610, &[]).await;
    let url = srv.url();
    let t = Duration::from_millis(200);
    let conn = RedisConnection::connect(&url).await.unwrap();
    let store = RedisIdempotencyStore::new(conn.clone())
        .with_prefix(unique("pause-idem"))
        .with_timeout(t);
    let quota = RedisQuota::new(conn.clone(), Quota::per_second(100).unwrap())
        .with_prefix(unique("pause-rl"))
        .with_timeout(t);
    let queue = RedisStreamQueue::new(conn.clone(), "{pause}")
        .unwrap()
        .with_timeout(t);
    let mut consumer = RedisStreamConsumer::join(conn.clone(), "{pause}", "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(10))
        .with_timeout(t);
    assert_eq!(
        store
            .begin("done", [1; 32], tk([1; 32]), LEASE)
            .await
            .unwrap(),
        Begin::Started
    );
    store
        .complete("done", [1; 32], tk([1; 32]), response("done"), TTL)
        .await
        .unwrap();
    quota
        .try_pause("paused", Duration::from_secs(60))
        .await
        .unwrap();

    let mut admin = raw(&url).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1200)
        .arg("ALL")
        .query_async(&mut admin)
        .await
        .unwrap();
    let paused_at = Instant::now();
    let mut errors: Vec<(&str, BoxError)> = Vec::new();
    let started = Instant::now();
    errors.push((
        "begin",
        store
            .begin("during", [1; 32], tk([1; 32]), LEASE)
            .await
            .unwrap_err(),
    ));
    errors.push(("paused", quota.try_paused("free").await.unwrap_err()));
    errors.push((
        "reserve",
        quota
            .try_reserve("free", Duration::ZERO)
            .await
            .map(|_| ())
            .unwrap_err(),
    ));
    errors.push((
        "push",
        queue
            .push(event("during"), TTL)
            .await
            .map(|_| ())
            .unwrap_err(),
    ));
    errors.push(("next", consumer.next().await.map(|_| ()).unwrap_err()));
    let took = started.elapsed();
    assert!(took < Duration::from_millis(5 * 200 + 400), "{took:?}");
    for (what, e) in &errors {
        eprintln!("{what}: {e}");
        assert_eq!(kind(e), ErrorKind::Timeout, "{what}: {e:?}");
        // The command was sent: it may well run once Redis answers again.
        assert_eq!(delivery(&**e), Delivery::MaybeProcessed, "{what}: {e:?}");
    }
    tokio::time::sleep_until(paused_at + Duration::from_millis(1300)).await;
    // Each answer is the one to its own command, not a late one to a timed-out command.
    for i in 0..3 {
        assert_eq!(
            store
                .begin("done", [1; 32], tk([1; 32]), LEASE)
                .await
                .unwrap(),
            Begin::Completed(response("done"))
        );
        assert_eq!(quota.try_paused("free").await.unwrap(), None);
        assert!(quota.try_paused("paused").await.unwrap().is_some());
        assert_eq!(
            store
                .begin("fresh", [2; 32], tk([2; 32]), LEASE)
                .await
                .map(|_| ())
                .ok(),
            Some(())
        );
        let id = format!("after-{i}");
        assert_eq!(queue.push(event(&id), TTL).await.unwrap(), Push::Enqueued);
        assert_eq!(queue.push(event(&id), TTL).await.unwrap(), Push::Duplicate);
        let d = consumer.next().await.unwrap().expect("an event");
        assert_eq!(d.event.body, event(&d.event.id).body);
        consumer.ack(&d).await.unwrap();
    }
    eprintln!(
        "the push that timed out, sent again: {:?}",
        queue.push(event("during"), TTL).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_a_clear_error_and_the_same_objects_recover() {
    let (mut srv, _dir) = server(18620, &["--appendonly", "yes", "--appendfsync", "always"]).await;
    let url = srv.url();
    let conn = RedisConnection::connect(&url).await.unwrap();
    let store = RedisIdempotencyStore::new(conn.clone()).with_prefix("kill-idem");
    let quota =
        RedisQuota::new(conn.clone(), Quota::per_second(100).unwrap()).with_prefix("kill-rl");
    let queue = RedisStreamQueue::new(conn.clone(), "{kill}").unwrap();
    let mut consumer = RedisStreamConsumer::join(conn.clone(), "{kill}", "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(10));
    assert_eq!(
        store.begin("k", [1; 32], tk([1; 32]), LEASE).await.unwrap(),
        Begin::Started
    );
    assert_eq!(
        queue.push(event("before"), TTL).await.unwrap(),
        Push::Enqueued
    );

    srv.kill().await;
    let started = Instant::now();
    let mut errors: Vec<(&str, BoxError)> = Vec::new();
    errors.push((
        "begin",
        store
            .begin("x", [1; 32], tk([1; 32]), LEASE)
            .await
            .unwrap_err(),
    ));
    errors.push((
        "reserve",
        quota
            .try_reserve("k", Duration::ZERO)
            .await
            .map(|_| ())
            .unwrap_err(),
    ));
    errors.push((
        "push",
        queue.push(event("x"), TTL).await.map(|_| ()).unwrap_err(),
    ));
    errors.push(("next", consumer.next().await.map(|_| ()).unwrap_err()));
    errors.push((
        "new connection",
        RedisConnection::connect(&url)
            .await
            .map(|_| ())
            .unwrap_err(),
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for (what, e) in &errors {
        eprintln!("{what}: {e} [{:?}]", kind(e));
        // Connect when the command was refused at connect time; Transport when it was written
        // to a connection found broken (a multiplexed connection cannot tell whether its bytes
        // left, so "may have run").
        match kind(e) {
            ErrorKind::Connect => assert!(
                e.to_string().contains("Redis cannot be reached"),
                "{what}: {e}"
            ),
            ErrorKind::Transport => assert!(
                e.to_string()
                    .contains("the connection to Redis broke before its answer"),
                "{what}: {e}"
            ),
            other => panic!("{what}: {other:?}: {e:?}"),
        }
    }

    srv.restart().await;
    let back = Instant::now();
    loop {
        match store.begin("k", [1; 32], tk([1; 32]), LEASE).await {
            Ok(b) => {
                assert_eq!(b, Begin::InFlight);
                break;
            }
            Err(e) => assert!(back.elapsed() < Duration::from_secs(3), "not back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("back after {:?}", back.elapsed());
    assert!(matches!(
        quota.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    assert_eq!(
        queue.push(event("after"), TTL).await.unwrap(),
        Push::Enqueued
    );
    let mut ids = Vec::new();
    while let Some(d) = consumer.next().await.unwrap() {
        consumer.ack(&d).await.unwrap();
        ids.push(d.event.id);
    }
    assert_eq!(ids, ["before", "after"]);
}

/// A proxy in front of one Redis that can swallow Redis's replies and then cut every
/// connection: the command ran, the client never hears of it.
struct Cutter {
    url: String,
    mute: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Cutter {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let mute = Arc::new(AtomicBool::new(false));
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (m, t) = (mute.clone(), tasks.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let m = m.clone();
                let down = tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    while let Ok(n @ 1..) = sr.read(&mut buf).await {
                        if m.load(Ordering::SeqCst) {
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut t = t.lock().unwrap();
                t.push(up.abort_handle());
                t.push(down.abort_handle());
            }
        });
        Self { url, mute, tasks }
    }

    /// Swallows replies from now on.
    fn mute(&self) {
        self.mute.store(true, Ordering::SeqCst);
    }

    /// Closes every connection made so far and forwards replies again.
    fn cut(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.mute.store(false, Ordering::SeqCst);
    }
}

/// Runs `op` through a proxy that lets the command reach Redis, swallows the reply and cuts the
/// connection; returns the error.
async fn cut_after_it_ran<T>(
    cutter: &Cutter,
    store: &RedisIdempotencyStore,
    op: impl std::future::Future<Output = Result<T, BoxError>> + Send + 'static,
) -> BoxError
where
    T: std::fmt::Debug + Send + 'static,
{
    // The shared connection is up (after an earlier cut) before replies are swallowed.
    let start = Instant::now();
    while store
        .begin("warm", [1; 32], tk([1; 32]), LEASE)
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the connection did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cutter.mute();
    let task = tokio::spawn(op);
    tokio::time::sleep(Duration::from_millis(150)).await;
    cutter.cut();
    task.await.unwrap().unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_ran_is_never_reported_as_not_sent() {
    let (srv, _dir) = server(18625, &[]).await;
    let cutter = Cutter::start(format!("127.0.0.1:{}", srv.port)).await;
    let conn = RedisConnection::connect(&cutter.url).await.unwrap();
    let mut check = raw(&srv.url()).await;
    let store = RedisIdempotencyStore::new(conn.clone()).with_prefix("cut-idem");
    let queue = RedisStreamQueue::new(conn.clone(), "{cut}").unwrap();
    let quota = RedisQuota::new(conn.clone(), Quota::per_minute(1).unwrap()).with_prefix("cut-rl");
    let mut report = Vec::new();
    // Every script known to Redis first, so that each operation below is one command.
    store
        .begin("warm", [1; 32], tk([1; 32]), LEASE)
        .await
        .unwrap();
    queue.push(event("warm"), TTL).await.unwrap();
    quota.try_reserve("warm", Duration::ZERO).await.unwrap();

    let s = store.clone();
    let e = cut_after_it_ran(&cutter, &store, async move {
        s.begin("k", [1; 32], tk([1; 32]), LEASE).await
    })
    .await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("cut-idem*")
        .query_async(&mut check)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "the lock was taken");
    report.push(("begin", e));

    let q = queue.clone();
    let e = cut_after_it_ran(
        &cutter,
        &store,
        async move { q.push(event("e"), TTL).await },
    )
    .await;
    let len: u64 = redis::cmd("XLEN")
        .arg("{cut}")
        .query_async(&mut check)
        .await
        .unwrap();
    assert_eq!(len, 2, "the event was appended");
    report.push(("push", e));

    let q2 = quota.clone();
    let e = cut_after_it_ran(&cutter, &store, async move {
        q2.try_reserve("k", Duration::ZERO).await
    })
    .await;
    report.push(("reserve", e));

    // The same objects work again, with the right answers.
    let back = Instant::now();
    loop {
        match store.begin("k", [1; 32], tk([1; 32]), LEASE).await {
            Ok(b) => {
                assert_eq!(b, Begin::InFlight);
                break;
            }
            Err(e) => assert!(back.elapsed() < Duration::from_secs(3), "not back: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queue.push(event("e"), TTL).await.unwrap(), Push::Duplicate);
    assert!(matches!(
        quota.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Denied { .. }
    ));

    for (what, e) in &report {
        eprintln!("{what}: {e} [{:?}, {:?}]", kind(e), delivery(&**e));
    }
    for (what, e) in &report {
        assert_eq!(
            delivery(&**e),
            Delivery::MaybeProcessed,
            "{what} ran, but: {e:?}"
        );
        assert_ne!(kind(e), ErrorKind::Connect, "{what} ran, but: {e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_gives_a_clear_error_and_no_half_state() {
    let (srv, _dir) = server(
        18630,
        &["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"],
    )
    .await;
    let conn = RedisConnection::connect(&srv.url()).await.unwrap();
    let queue = RedisStreamQueue::new(conn.clone(), "{full}").unwrap();
    let store = RedisIdempotencyStore::new(conn.clone()).with_prefix("full-idem");
    let big = Bytes::from(vec![b'x'; 256 * 1024]);
    let mut pushed = 0;
    let err = loop {
        let e = WebhookEvent::new("standard", format!("e{pushed}"), big.clone());
        match queue.push(e, TTL).await {
            Ok(Push::Enqueued) => pushed += 1,
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        assert!(pushed < 200, "maxmemory never reached");
    };
    eprintln!("after {pushed} events: {err}");
    assert!(all_text(&err).contains("OOM"), "{}", all_text(&err));
    // The refused event's id is not remembered: its redelivery is taken once memory is back.
    let refused = WebhookEvent::new("standard", format!("e{pushed}"), Bytes::from_static(b"{}"));
    let e = store.begin("k", [1; 32], tk([1; 32]), LEASE).await;
    eprintln!("begin on a full Redis: {e:?}");
    let mut admin = raw(&srv.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(queue.push(refused, TTL).await.unwrap(), Push::Enqueued);
}

// ---------------------------------------------------------------------------------------------
// Passwords

const PASSWORD: &str = "Hunter2-s3cret-PW";

fn leaks(text: &str) -> bool {
    text.contains(PASSWORD) || text.contains("Hunter2") || text.contains("s3cret")
}

async fn errors_with_password_urls(port: u16) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let urls = [
        format!("redis://:{PASSWORD}@127.0.0.1:{port}/"),
        format!("redis://default:{PASSWORD}@127.0.0.1:{port}/"),
        format!("redis://:{PASSWORD}-wrong@127.0.0.1:{port}/"),
        format!("redis://nobody:{PASSWORD}@127.0.0.1:{port}/"),
        format!("redis://:{PASSWORD}@127.0.0.1:1/"),
        format!("redis://:{PASSWORD}@127.0.0.1:99999/"),
        format!("redis://:{PASSWORD}@[::1/"),
        format!("redis://:{PASSWORD}@127.0.0.1:{port}/notadb"),
        format!("rediss://:{PASSWORD}@127.0.0.1:{port}/"),
        format!("http://:{PASSWORD}@127.0.0.1:{port}/"),
        format!(
            "redis://:{}@127.0.0.1:{port}/",
            PASSWORD.replace('-', "%2D")
        ),
    ];
    for url in &urls {
        let shown = url.replace(PASSWORD, "<pw>");
        if let Err(e) = RedisConnection::connect(url).await {
            out.push((format!("connect {shown}"), all_text(&e)));
        }
        if let Err(e) = RedisConnection::connect_cluster([url.as_str()]).await {
            out.push((format!("connect_cluster {shown}"), all_text(&e)));
        }
        if !url.contains("-wrong") {
            continue;
        }
        if let Err(e) = RedisIdempotencyStore::connect(url).await {
            out.push((format!("store {shown}"), all_text(&e)));
        }
        if let Err(e) = RedisQuota::connect(url, Quota::per_second(1).unwrap()).await {
            out.push((format!("quota {shown}"), all_text(&e)));
        }
        if let Err(e) = RedisStreamQueue::connect(url, "{pw}").await {
            out.push((format!("queue {shown}"), all_text(&e)));
        }
        if let Err(e) = RedisStreamConsumer::connect(url, "{pw}", "g", "w", TTL).await {
            out.push((format!("consumer {shown}"), all_text(&e)));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_url_never_shows() {
    let port = 18640;
    let (mut srv, _dir) = server(port, &[]).await;
    let mut admin = raw(&srv.url()).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}/");
    let conn = RedisConnection::connect(&url).await.unwrap();
    let store = RedisIdempotencyStore::connect(&url).await.unwrap();
    let quota = RedisQuota::connect(&url, Quota::per_second(1).unwrap())
        .await
        .unwrap();
    let queue = RedisStreamQueue::connect(&url, "{pw}").await.unwrap();
    let mut consumer = RedisStreamConsumer::connect(&url, "{pw}", "g", "w", TTL)
        .await
        .unwrap()
        .with_wait(Duration::from_millis(10));
    let debugs = [
        format!("{conn:?}"),
        format!("{store:?}"),
        format!("{quota:?}"),
        format!("{queue:?}"),
        format!("{consumer:?}"),
    ];
    for d in &debugs {
        assert!(!leaks(d), "{d}");
    }
    let t = Instant::now();
    let mut texts = errors_with_password_urls(port).await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    srv.kill().await;
    let t = Instant::now();
    if let Err(e) = store.begin("k", [1; 32], tk([1; 32]), LEASE).await {
        texts.push(("begin, Redis down".into(), all_text(&e)));
    }
    if let Err(e) = quota.try_reserve("k", Duration::ZERO).await {
        texts.push(("reserve, Redis down".into(), all_text(&e)));
    }
    if let Err(e) = queue.push(event("e"), TTL).await {
        texts.push(("push, Redis down".into(), all_text(&e)));
    }
    if let Err(e) = consumer.next().await {
        texts.push(("next, Redis down".into(), all_text(&e)));
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let t = Instant::now();
    for url in [
        format!("redis://:{PASSWORD}@127.0.0.1:{port}/"),
        format!("redis://user:{PASSWORD}@127.0.0.1:{port}/"),
    ] {
        if let Err(e) = RedisConnection::connect(&url).await {
            texts.push(("connect, Redis down".into(), all_text(&e)));
        }
        if let Err(e) = RedisConnection::connect_cluster([url]).await {
            texts.push(("connect_cluster, Redis down".into(), all_text(&e)));
        }
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(texts.len() > 20, "{texts:#?}");
    for (what, text) in &texts {
        eprintln!("{what}: {}", text.replace(PASSWORD, "<PASSWORD>"));
    }
    for (what, text) in &texts {
        assert!(
            !leaks(text),
            "{what}: {}",
            text.replace(PASSWORD, "<PASSWORD>")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cluster_password_is_not_called_unreachable() {
    // A cluster of one node that serves every slot, with a password.
    let port = 18645;
    let (srv, _dir) = server(
        port,
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes-18645.conf",
        ],
    )
    .await;
    let mut admin = raw(&srv.url()).await;
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query_async(&mut admin)
        .await
        .unwrap();
    let start = Instant::now();
    loop {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async(&mut admin)
            .await
            .unwrap();
        if info.contains("cluster_state:ok") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "{info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query_async(&mut admin)
        .await
        .unwrap();
    let good = format!("redis://:{PASSWORD}@127.0.0.1:{port}/");
    let conn = RedisConnection::connect_cluster([good.as_str()])
        .await
        .unwrap();
    let store = RedisIdempotencyStore::new(conn).with_prefix("pw-cluster");
    assert_eq!(
        store.begin("k", [1; 32], tk([1; 32]), LEASE).await.unwrap(),
        Begin::Started
    );

    let wrong = format!("redis://:not-the-password@127.0.0.1:{port}/");
    let single = RedisConnection::connect(&wrong).await.unwrap_err();
    let cluster = RedisConnection::connect_cluster([wrong.as_str()])
        .await
        .unwrap_err();
    eprintln!("one server: {single} [{:?}]", kind(&single));
    eprintln!("cluster: {cluster} [{:?}]", kind(&cluster));
    // As for one server: an authentication failure, not an outage that will pass.
    assert_ne!(kind(&single), ErrorKind::Connect);
    assert_ne!(kind(&cluster), ErrorKind::Connect, "{cluster:?}");
    assert!(
        !cluster.to_string().contains("cannot be reached"),
        "{cluster}"
    );
}

/// The lock token of the execution a fingerprint stands for in these tests: one execution per
/// fingerprint, as the store's fencing was before tokens.
#[allow(dead_code)]
fn tk(fp: sturdy_idempotency::server::Fingerprint) -> sturdy_idempotency::server::LockToken {
    let mut b = [0u8; 16];
    b.copy_from_slice(&fp[..16]);
    sturdy_idempotency::server::LockToken::from_u128(u128::from_le_bytes(b))
}
