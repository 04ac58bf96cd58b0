//! sturdy-redis on a Redis Cluster of the test's own: objects idle while primaries restart work
//! again without being made anew, and a command cut after it was written (through a proxy the
//! one-node cluster announces as its address) runs once and is "may have run". Never touches
//! the shared cluster.
#![cfg(feature = "full")]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use bytes::Bytes;
use sturdy::core::{BoxError, ErrorKind};
use sturdy::idempotency::server::{Begin, IdempotencyStore, LockToken};
use sturdy::ratelimit::{Quota, Reserve};
use sturdy::redis::{RedisConnection, RedisIdempotencyStore, RedisQuota, RedisStreamQueue};
use sturdy::webhook::{EventQueue, Push, WebhookEvent};
use tokio::time::Instant;

use crate::cluster32_util::{cli, own_possible, OwnCluster, OWN};
use crate::redis30_util::{chain_text, unique, CutProxy, Mode};

const TTL: Duration = Duration::from_secs(600);

fn kind(e: &BoxError) -> ErrorKind {
    sturdy::core::find::<sturdy::core::Error>(&**e)
        .map(|s| s.kind().clone())
        .unwrap_or_else(|| panic!("no sturdy error in {e:?}"))
}

fn event(id: &str) -> WebhookEvent {
    WebhookEvent::new("standard", id, Bytes::from_static(b"{\"n\":1}"))
}

/// lib.rs: "after a restart of the server, or a failover in the cluster, the same backend works
/// again without being made anew". Every primary of an own cluster is restarted (quickly, no
/// failover) while the backends are idle; each backend works again, and (as on one server) at
/// its first operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_backends_idle_while_primaries_restart_work_again() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let conn = RedisConnection::connect_cluster(&urls).await.unwrap();
    assert!(conn.is_cluster());
    let quota = RedisQuota::new(conn.clone(), Quota::per_second(1000).unwrap());
    let store = RedisIdempotencyStore::connect_cluster(&urls).await.unwrap();
    let queue = RedisStreamQueue::connect_cluster(&urls, format!("{{{}}}", unique("s35c")))
        .await
        .unwrap();
    // Keys on every primary: a few quota keys of different slots.
    let keys: Vec<String> = (0..12).map(|i| format!("key{i}")).collect();
    for k in &keys {
        quota.try_reserve(k, Duration::ZERO).await.unwrap();
    }
    store
        .begin("warm", [1; 32], LockToken::random(), TTL)
        .await
        .unwrap();
    queue.push(event("evt_warm"), TTL).await.unwrap();

    let primaries: Vec<u16> = crate::cluster32_util::cluster_nodes(cluster.ports[0])
        .into_iter()
        .filter(|n| n.primary && !n.failed)
        .map(|n| n.port)
        .collect();
    assert_eq!(primaries.len(), 3);
    for p in &primaries {
        cluster.restart(*p).await;
    }
    cluster.wait_ok(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The first operation of each object.
    let mut first_failures = Vec::new();
    for k in &keys {
        let r = quota.try_reserve(k, Duration::ZERO).await;
        if !matches!(r, Ok(Reserve::Granted { .. })) {
            first_failures.push(format!("quota {k}: {r:?}"));
        }
    }
    let b = store
        .begin("after", [1; 32], LockToken::random(), TTL)
        .await;
    if !matches!(b, Ok(Begin::Started)) {
        first_failures.push(format!("store: {b:?}"));
    }
    let p = queue.push(event("evt_after"), TTL).await;
    if !matches!(p, Ok(Push::Enqueued)) {
        first_failures.push(format!("queue: {p:?}"));
    }
    // Works again within a few seconds in any case.
    let t = Instant::now();
    loop {
        let mut ok = true;
        for k in &keys {
            ok &= quota.try_reserve(k, Duration::ZERO).await.is_ok();
        }
        ok &= store
            .begin(
                &format!("later{}", LockToken::random()),
                [1; 32],
                LockToken::random(),
                TTL,
            )
            .await
            .is_ok();
        ok &= queue
            .push(event(&format!("evt_{}", LockToken::random())), TTL)
            .await
            .is_ok();
        if ok {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the cluster backends do not work again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(first_failures.is_empty(), "{first_failures:#?}");
}

/// A proxy that cuts one connection once: the next script call (`EVAL`/`EVALSHA`) after `arm`
/// goes through to Redis, then that connection is closed before Redis's answer; every other connection (the client's
/// reconnects included) passes.
struct OnceProxy {
    addr: std::net::SocketAddr,
    armed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl OnceProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let a2 = armed.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let armed = a2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let mut a = vec![0u8; 64 * 1024];
                    let mut b = vec![0u8; 64 * 1024];
                    loop {
                        tokio::select! {
                            n = client.read(&mut a) => {
                                let Ok(n) = n else { return };
                                if n == 0 || server.write_all(&a[..n]).await.is_err() {
                                    return;
                                }
                                let script = a[..n].windows(4).any(|w| w.eq_ignore_ascii_case(b"EVAL"));
                                if script && armed.swap(false, Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(30)).await;
                                    return;
                                }
                            }
                            n = server.read(&mut b) => {
                                let Ok(n) = n else { return };
                                if n == 0 || client.write_all(&b[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        Self { addr, armed, task }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }
}

impl Drop for OnceProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A one-node Redis Cluster reached only through a proxy: the node announces the proxy's
/// address, so the cluster client's every connection goes through it.
struct ProxiedNode {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    proxy: CutProxy,
    once: OnceProxy,
}

fn free_low_port() -> u16 {
    crate::cluster32_util::free_cluster_port()
}

impl ProxiedNode {
    async fn start() -> Self {
        let port = free_low_port();
        let proxy = CutProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        let once = OnceProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        Self::launch(port, proxy, once).await
    }

    /// `announce_once`: the node announces the cut-once proxy instead of the cut proxy.
    async fn start_once() -> Self {
        let port = free_low_port();
        let proxy = CutProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        let once = OnceProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        let announce = once.addr.port();
        Self::launch_announcing(port, proxy, once, announce).await
    }

    /// A node that announces its own port (no proxy on the way).
    async fn start_plain() -> Self {
        let port = free_low_port();
        let proxy = CutProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        let once = OnceProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await;
        Self::launch_announcing(port, proxy, once, port).await
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

    async fn launch(port: u16, proxy: CutProxy, once: OnceProxy) -> Self {
        let announce = proxy.addr.port();
        Self::launch_announcing(port, proxy, once, announce).await
    }

    async fn launch_announcing(port: u16, proxy: CutProxy, once: OnceProxy, announce: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("s35-node-{}", LockToken::random()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                dir.join("nodes.conf").to_str().unwrap(),
                "--cluster-announce-ip",
                "127.0.0.1",
                "--cluster-announce-port",
                &announce.to_string(),
                "--dir",
                dir.to_str().unwrap(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let me = Self {
            child: Some(child),
            dir,
            port,
            proxy,
            once,
        };
        for _ in 0..250 {
            if cli(port, &["PING"]).trim() == "PONG" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = cli(port, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert_eq!(out.trim(), "OK", "{out}");
        let t = Instant::now();
        while !cli(port, &["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "one-node cluster not ok"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me
    }
}

impl Drop for ProxiedNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// RELIABILITY.md, rules "that hold for every backend": `Transport` is "the connection broke
/// before the answer: the command may have run"; and "a command that was written before the
/// connection broke is never sent twice". On a cluster: the reservation cut after its write
/// took one slot (burst 3, one an hour), not one per resend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_reservation_cut_after_it_was_written_ran_once() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start().await;
    let quota = Quota::new(1, Duration::from_secs(3600))
        .unwrap()
        .with_burst(3)
        .unwrap();
    let remote = RedisQuota::connect_cluster([node.proxy.url()], quota)
        .await
        .unwrap();
    assert!(matches!(
        remote.try_reserve("k", Duration::ZERO).await.unwrap(),
        Reserve::Granted { .. }
    ));
    node.proxy.set(Mode::Cut);
    let r = remote.try_reserve("k", Duration::ZERO).await;
    node.proxy.set(Mode::Pass);
    // What ran, read on the node itself: the TAT key's value tells how many slots are taken.
    let e = match r {
        Err(e) => e,
        Ok(v) => panic!("a cut reservation answered {v:?}"),
    };
    let text = chain_text(&*e);
    let mut next = remote.try_reserve("k", Duration::ZERO).await;
    let t = Instant::now();
    while next.is_err() && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        next = remote.try_reserve("k", Duration::ZERO).await;
    }
    assert!(
        matches!(next, Ok(Reserve::Granted { .. })),
        "the third slot is gone: the cut reservation ran more than once ({text}); {next:?}"
    );
    assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
    assert!(text.contains("may have run"), "{text}");
    let _ = node.port;
}

/// The same for a stream push on the cluster: once in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_push_cut_after_it_was_written_is_in_the_stream_once() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start().await;
    let stream = format!("{{{}}}", unique("s35-cc"));
    let queue = RedisStreamQueue::connect_cluster([node.proxy.url()], stream.clone())
        .await
        .unwrap();
    queue.push(event("evt_0"), TTL).await.unwrap();
    node.proxy.set(Mode::Cut);
    let r = queue.push(event("evt_cut"), TTL).await;
    node.proxy.set(Mode::Pass);
    let len = cli(node.port, &["XLEN", &stream]);
    assert_eq!(len.trim(), "2", "{r:?}");
    let e = r.expect_err("a cut push answered");
    let text = chain_text(&*e);
    assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
    assert!(text.contains("may have run"), "{text}");
}

/// RELIABILITY.md, "A command sent twice on a cluster": the cluster client sends a command again
/// when its connection broke, "a rate-limit reservation takes two slots (the quota is spent
/// faster, never overrun)". The connection that carried the reservation breaks once, right after
/// it was written; every reconnect passes. Burst 3, one an hour: never more than 3 granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_reservation_cut_once_is_resent_and_never_overruns() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start_once().await;
    let quota = Quota::new(1, Duration::from_secs(3600))
        .unwrap()
        .with_burst(3)
        .unwrap();
    let remote = RedisQuota::connect_cluster([node.once.url()], quota)
        .await
        .unwrap();
    let granted = |r: &Result<Reserve, BoxError>| matches!(r, Ok(Reserve::Granted { .. }));
    let first = remote.try_reserve("k", Duration::ZERO).await;
    assert!(granted(&first), "{first:?}");
    node.once.arm();
    let r = remote.try_reserve("k", Duration::ZERO).await;
    match &r {
        Ok(_) => {}
        Err(e) => {
            let text = chain_text(&**e);
            assert_eq!(kind(e), ErrorKind::Transport, "{text}");
            assert!(text.contains("may have run"), "{text}");
        }
    }
    let mut total = 1 + usize::from(granted(&r));
    for _ in 0..5 {
        let next = remote.try_reserve("k", Duration::ZERO).await;
        assert!(next.is_ok(), "{next:?}");
        total += usize::from(granted(&next));
    }
    assert!(total <= 3, "{total} slots granted of a burst of 3");
}

/// The same for a stream push with a single cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_push_cut_once_is_in_the_stream_once_and_may_have_run() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start_once().await;
    let stream = format!("{{{}}}", unique("s35-co"));
    let queue = RedisStreamQueue::connect_cluster([node.once.url()], stream.clone())
        .await
        .unwrap();
    queue.push(event("evt_0"), TTL).await.unwrap();
    node.once.arm();
    let r = queue.push(event("evt_cut"), TTL).await;
    let len = cli(node.port, &["XLEN", &stream]);
    assert_eq!(len.trim(), "2", "{r:?}");
    // RELIABILITY.md, "A command sent twice on a cluster": a resent push "finds its own event
    // already queued and answers `Duplicate`"; or the error says it may have run.
    match r {
        Ok(Push::Duplicate | Push::Enqueued) => {}
        Ok(other) => panic!("{other:?}"),
        Err(e) => {
            let text = chain_text(&*e);
            assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
            assert!(text.contains("may have run"), "{text}");
        }
    }
}

/// The store's contract (sturdy-idempotency `IdempotencyStore`): "`begin` is atomic: of many
/// concurrent `begin`s for one key, exactly one gets `Begin::Started`". One `begin`, whose
/// connection to the cluster node broke once after it was written: it is `Started`, or an error
/// that says it may have run, never `InFlight` for its own lock (the layer would answer its own
/// request "in progress" while the lock it took lives on for the lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_begin_cut_once_is_never_in_flight_for_its_own_lock() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start_once().await;
    let store = RedisIdempotencyStore::connect_cluster([node.once.url()])
        .await
        .unwrap();
    store
        .begin("warm", [1; 32], LockToken::random(), TTL)
        .await
        .unwrap();
    node.once.arm();
    let b = store.begin("k", [2; 32], LockToken::random(), TTL).await;
    eprintln!(
        "s35 begin after a cut: {:?}",
        b.as_ref().map_err(|e| chain_text(&**e))
    );
    match b {
        // RELIABILITY.md, "A command sent twice on a cluster": a resent `begin` "finds the lock
        // it took itself, and answers that it started".
        Ok(Begin::Started) => {}
        Err(e) => {
            let text = chain_text(&*e);
            assert_eq!(kind(&e), ErrorKind::Transport, "{text}");
            assert!(text.contains("may have run"), "{text}");
        }
        Ok(other) => panic!("one begin, and it is not Started: {other:?}"),
    }
}

/// RELIABILITY.md, "Redis down" on a cluster (its only node died): every backend fails within
/// its timeout, in words that say Redis cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_node_down_is_connect_cannot_be_reached() {
    if !own_possible() {
        return;
    }
    let mut node = ProxiedNode::start_plain().await;
    let limit = Duration::from_millis(400);
    let urls = [node.url()];
    let quota = RedisQuota::connect_cluster(urls.clone(), Quota::per_second(100).unwrap())
        .await
        .unwrap()
        .with_timeout(limit);
    let store = RedisIdempotencyStore::connect_cluster(urls.clone())
        .await
        .unwrap()
        .with_timeout(limit);
    let queue = RedisStreamQueue::connect_cluster(urls, "{s35down}")
        .await
        .unwrap()
        .with_timeout(limit);
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    store
        .begin("k", [1; 32], LockToken::random(), TTL)
        .await
        .unwrap();
    queue.push(event("evt_1"), TTL).await.unwrap();
    node.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first operation after the death may be "may have run" (see redis30); the next ones
    // find Redis down.
    let _ = quota.try_reserve("k", Duration::ZERO).await;
    let _ = store.begin("j", [1; 32], LockToken::random(), TTL).await;
    let _ = queue.push(event("evt_2"), TTL).await;
    let mut report = Vec::new();
    for round in 0..2 {
        let t = Instant::now();
        let errs: Vec<(&str, BoxError)> = vec![
            (
                "quota",
                quota.try_reserve("k", Duration::ZERO).await.unwrap_err(),
            ),
            (
                "store",
                store
                    .begin("k2", [1; 32], LockToken::random(), TTL)
                    .await
                    .unwrap_err(),
            ),
            ("queue", queue.push(event("evt_3"), TTL).await.unwrap_err()),
        ];
        if t.elapsed() > Duration::from_millis(3 * 900) {
            report.push(format!("{round}: took {:?}", t.elapsed()));
        }
        for (what, e) in errs {
            let text = chain_text(&*e);
            let k = kind(&e);
            // RELIABILITY.md: on a cluster, a node the client cannot reach after its own tries
            // is `Transport`, "Redis cannot be reached ... an earlier try may have run" (the
            // cluster client resends, so it cannot say the command never ran); a refused
            // connection seen as such is `Connect`.
            let words = text.contains("Redis cannot be reached");
            let ok = match k {
                ErrorKind::Connect => words,
                ErrorKind::Transport => words && text.contains("may have run"),
                _ => false,
            };
            if !ok {
                report.push(format!("{round} {what}: {k:?}: {text}"));
            }
        }
    }
    assert!(report.is_empty(), "{report:#?}");
}

/// "Every operation ends within its timeout": a hung one-node cluster (`CLIENT PAUSE ... ALL`)
/// ends every operation within `with_timeout` (150 ms), as `Timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_hung_node_every_operation_ends_within_its_timeout() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start_plain().await;
    let limit = Duration::from_millis(150);
    let urls = [node.url()];
    let quota = RedisQuota::connect_cluster(urls.clone(), Quota::per_second(100).unwrap())
        .await
        .unwrap()
        .with_timeout(limit);
    let store = RedisIdempotencyStore::connect_cluster(urls.clone())
        .await
        .unwrap()
        .with_timeout(limit);
    let queue = RedisStreamQueue::connect_cluster(urls, "{s35hung}")
        .await
        .unwrap()
        .with_timeout(limit);
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    let out = cli(node.port, &["CLIENT", "PAUSE", "3000", "ALL"]);
    assert_eq!(out.trim(), "OK");
    let mut report = Vec::new();
    for what in ["quota", "store", "queue"] {
        let t = Instant::now();
        let r: Result<(), BoxError> = match what {
            "quota" => quota.try_reserve("k", Duration::ZERO).await.map(|_| ()),
            "store" => store
                .begin("k", [1; 32], LockToken::random(), TTL)
                .await
                .map(|_| ()),
            _ => queue.push(event("evt_h"), TTL).await.map(|_| ()),
        };
        let took = t.elapsed();
        match r {
            Ok(()) => report.push(format!("{what}: answered while paused")),
            Err(e) => {
                let k = kind(&e);
                if took > Duration::from_millis(900) || k != ErrorKind::Timeout {
                    report.push(format!("{what}: {took:?} {k:?} {}", chain_text(&*e)));
                }
            }
        }
    }
    let _ = cli(node.port, &["CLIENT", "UNPAUSE"]);
    assert!(report.is_empty(), "{report:#?}");
}

/// RELIABILITY.md table: "a cluster primary dies, until a replica takes over: as for Redis down,
/// for the keys of that primary's slots": "Redis cannot be reached", `Transport` on a cluster
/// (the cluster client's resends: see "Clear errors") (or, once the cluster flagged it, "the
/// Redis Cluster cannot serve this key now"). Asked in the first second after the kill, before
/// any failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_primary_just_died_is_cannot_be_reached() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let quota = RedisQuota::connect_cluster(&urls, Quota::per_second(1000).unwrap())
        .await
        .unwrap();
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    let primary = cluster.primary_of_key("{k}");
    cluster.kill(primary.port);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = quota.try_reserve("k", Duration::ZERO).await;
    let e = quota.try_reserve("k", Duration::ZERO).await.unwrap_err();
    let text = chain_text(&*e);
    let k = kind(&e);
    // RELIABILITY.md: a node the cluster client cannot reach after its own tries is
    // `Transport`, "Redis cannot be reached ... an earlier try may have run".
    assert!(
        (k == ErrorKind::Transport
            && text.contains("Redis cannot be reached")
            && text.contains("may have run"))
            || text.contains("the Redis Cluster cannot serve this key now"),
        "{k:?}: {text}"
    );
}

/// CHANGELOG: "Refused credentials are `Auth` on a cluster too"; RELIABILITY.md: the message says
/// the user name or password is "missing or wrong", and no password is shown. A one-node
/// cluster that requires a password, reached with none, a wrong one and the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_missing_or_wrong_password_is_auth() {
    if !own_possible() {
        return;
    }
    let node = ProxiedNode::start_plain().await;
    let out = cli(node.port, &["CONFIG", "SET", "requirepass", "s35-cl-pw"]);
    assert_eq!(out.trim(), "OK", "{out}");
    for url in [
        format!("redis://127.0.0.1:{}/", node.port),
        format!("redis://:s35-bad-pw@127.0.0.1:{}/", node.port),
    ] {
        let err = match RedisQuota::connect_cluster([url.as_str()], Quota::per_second(1).unwrap())
            .await
        {
            Ok(q) => q.try_reserve("k", Duration::ZERO).await.unwrap_err(),
            Err(e) => e,
        };
        let text = chain_text(&*err);
        assert_eq!(kind(&err), ErrorKind::Auth, "{url}: {text}");
        assert!(text.contains("missing or wrong"), "{text}");
        assert!(!format!("{text} {err:?}").contains("s35-bad-pw"), "{text}");
    }
    let url = format!("redis://:s35-cl-pw@127.0.0.1:{}/", node.port);
    let conn = RedisConnection::connect_cluster([url.as_str()])
        .await
        .unwrap();
    let q = RedisQuota::new(conn.clone(), Quota::per_second(1).unwrap());
    q.try_reserve("k", Duration::ZERO).await.unwrap();
    assert!(!format!("{conn:?} {q:?}").contains("s35-cl-pw"));
}

/// RELIABILITY.md, "Clear errors": `Connect` means "the command was not sent". A reservation
/// written to a cluster node that then dies before it answers (held by `CLIENT PAUSE`, then
/// killed): the cluster client tries again and finds the node gone, and the error must not say
/// the command was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_node_dying_under_a_written_command_is_not_not_sent() {
    if !own_possible() {
        return;
    }
    let mut node = ProxiedNode::start_plain().await;
    let quota = RedisQuota::connect_cluster([node.url()], Quota::per_second(100).unwrap())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(3));
    quota.try_reserve("k", Duration::ZERO).await.unwrap();
    let out = cli(node.port, &["CLIENT", "PAUSE", "5000", "ALL"]);
    assert_eq!(out.trim(), "OK", "{out}");
    let call = {
        let quota = quota.clone();
        tokio::spawn(async move { quota.try_reserve("k", Duration::ZERO).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.kill();
    let e = call.await.unwrap().unwrap_err();
    let text = chain_text(&*e);
    eprintln!("S35DYING {:?}: {text}", kind(&e));
    assert_ne!(kind(&e), ErrorKind::Connect, "{text}");
    assert!(text.contains("may have run"), "{text}");
}

/// The same on a cluster of three primaries with a replica each: the primary that holds the
/// key dies under a written reservation. Whatever the cluster client meets when it tries again
/// (a refused connection, no connection), the error must not say the command was not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s35_cluster_primary_dying_under_a_written_command_is_not_not_sent() {
    if !own_possible() {
        return;
    }
    let _one = OWN.lock().await;
    let mut cluster = OwnCluster::start().await;
    let urls = cluster.urls();
    let quota = RedisQuota::connect_cluster(&urls, Quota::per_second(100).unwrap())
        .await
        .unwrap()
        .with_timeout(Duration::from_secs(1));
    quota.try_reserve("dying", Duration::ZERO).await.unwrap();
    let primary = cluster.primary_of_key("dying");
    let out = cli(primary.port, &["CLIENT", "PAUSE", "5000", "ALL"]);
    assert_eq!(out.trim(), "OK", "{out}");
    let call = {
        let quota = quota.clone();
        tokio::spawn(async move { quota.try_reserve("dying", Duration::ZERO).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kill(primary.port);
    // Ok: a replica promoted in time and the resend ran there (allowed by RELIABILITY.md).
    let Err(e) = call.await.unwrap() else {
        return;
    };
    let text = chain_text(&*e);
    eprintln!("S35PRIMARY {:?}: {text}", kind(&e));
    assert_ne!(kind(&e), ErrorKind::Connect, "{text}");
}
