//! The Redis Cluster backends' time bounds, without touching the shared cluster's state:
//!
//! - `RedisConnection::connect_cluster`: "within 2 s", "one reachable node is enough"; "Requests
//!   that fail while the cluster moves a slot or promotes a replica are tried again a few times
//!   within each operation's timeout"; "# Errors: ... no node answers in time. The message never
//!   repeats a URL."
//! - RELIABILITY.md, rules for every backend: "Every operation ends within its timeout \[1 s,
//!   `with_timeout`\] ..., whatever Redis does: refuses connections, never answers, or is moving
//!   a slot. Connecting ends within 2 s." and "On a Redis Cluster, a node the cluster client
//!   cannot reach after its own tries (refused, no connection, a broken one) is `Transport`,
//!   never `Connect`".
//! - the idempotency table: a hung store is a 503 after the timeout; the handler does not run.
//!
//! The "cluster" here is a fake node of this file's own on 127.0.0.1:0: it answers the
//! handshake and `CLUSTER SLOTS` (every slot its own), then stalls or resets at the first other
//! command; or a listener that accepts and never answers. The shared cluster is used only as
//! a good seed listed after a silent one (nothing is written to it).
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use sturdy::core::{Error as SturdyError, ErrorKind};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer};
use sturdy::ratelimit::Quota;
use sturdy::redis::{RedisConnection, RedisIdempotencyStore, RedisQuota};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tower::ServiceExt;

fn take_commands(buf: &mut Vec<u8>) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Some((cmd, used)) = parse_one(buf) {
        buf.drain(..used);
        out.push(cmd);
    }
    out
}

fn line_at(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rel = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[at..at + rel], at + rel + 2))
}

fn parse_one(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    if buf.first()? != &b'*' {
        let (line, next) = line_at(buf, 0)?;
        return Some((
            line.split(|b| *b == b' ').map(<[u8]>::to_vec).collect(),
            next,
        ));
    }
    let (line, mut at) = line_at(buf, 1)?;
    let n: usize = std::str::from_utf8(line).ok()?.parse().ok()?;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        if buf.get(at)? != &b'$' {
            return None;
        }
        let (l, next) = line_at(buf, at + 1)?;
        let len: usize = std::str::from_utf8(l).ok()?.parse().ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        parts.push(buf[next..next + len].to_vec());
        at = next + len + 2;
    }
    Some((parts, at))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Node {
    /// Accepts, never answers.
    Silent,
    /// Answers the handshake, then stalls (`CLUSTER SLOTS` too).
    StallAtSlots,
    /// Answers the handshake and `CLUSTER SLOTS`, then stalls.
    StallAfterSlots,
    /// Answers the handshake and `CLUSTER SLOTS`, then resets the connection.
    ResetAfterSlots,
}

/// A fake cluster node; its URL and how many commands past the handshake and the slot map it saw.
async fn node(kind: Node) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let others = Arc::new(AtomicUsize::new(0));
    let seen = others.clone();
    let slots = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:{port}\r\n$40\r\n{}\r\n",
        "a".repeat(40)
    );
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let _ = s.set_zero_linger();
            if kind == Node::Silent {
                held.push(s);
                continue;
            }
            let seen = seen.clone();
            let slots = slots.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut stalled = false;
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    for cmd in take_commands(&mut buf) {
                        let word = |i: usize| {
                            cmd.get(i)
                                .map(|c| String::from_utf8_lossy(c).to_uppercase())
                                .unwrap_or_default()
                        };
                        let reply: Vec<u8> = match (word(0).as_str(), word(1).as_str()) {
                            ("CLIENT" | "SELECT" | "AUTH" | "READONLY", _) => b"+OK\r\n".to_vec(),
                            ("PING", _) => b"+PONG\r\n".to_vec(),
                            ("HELLO", _) => b"-ERR unknown command 'HELLO'\r\n".to_vec(),
                            ("CLUSTER", "SLOTS") if kind != Node::StallAtSlots => {
                                slots.as_bytes().to_vec()
                            }
                            _ => {
                                seen.fetch_add(1, Ordering::SeqCst);
                                if kind == Node::ResetAfterSlots {
                                    return;
                                }
                                stalled = true;
                                Vec::new()
                            }
                        };
                        if !stalled && s.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (format!("redis://127.0.0.1:{port}/"), others)
}

fn kind_of(err: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    sturdy::core::find::<SturdyError>(err).map(|e| e.kind().clone())
}

fn no_url(text: &str, url: &str) {
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    assert!(
        !text.contains(hostport),
        "the message repeats a URL: {text}"
    );
}

#[tokio::test]
async fn connecting_to_a_cluster_that_never_answers_ends_within_two_seconds() {
    for kind in [Node::Silent, Node::StallAtSlots] {
        let (a, _) = node(kind).await;
        let (b, _) = node(kind).await;
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(4),
            RedisConnection::connect_cluster([a.as_str(), b.as_str()]),
        )
        .await
        .unwrap_or_else(|_| panic!("{kind:?}: connect_cluster hung past 4 s"));
        let took = t0.elapsed();
        let Err(err) = r else {
            panic!("{kind:?}: connected to a cluster that never answers")
        };
        let text = format!("{err:#}");
        assert!(
            took <= Duration::from_millis(2600),
            "{kind:?}: within 2 s: {took:?}: {text}"
        );
        no_url(&text, &a);
        no_url(&text, &b);
        assert!(text.contains("Redis"), "{kind:?}: {text}");
        // Nodes that accepted and never answered are not called unreachable.
        let own = err.to_string();
        assert!(own.contains("did not answer"), "{kind:?}: {own}");
        assert!(!own.contains("cannot be reached"), "{kind:?}: {own}");
    }
}

#[tokio::test]
async fn every_backends_connect_cluster_ends_within_two_seconds() {
    let (a, _) = node(Node::Silent).await;
    let quota = Quota::per_second(10).unwrap();
    let t0 = Instant::now();
    let (store, rl) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(4),
            RedisIdempotencyStore::connect_cluster([a.as_str()])
        ),
        tokio::time::timeout(
            Duration::from_secs(4),
            RedisQuota::connect_cluster([a.as_str()], quota)
        ),
    );
    let took = t0.elapsed();
    assert!(store.expect("the store's connect_cluster hung").is_err());
    assert!(rl.expect("the quota's connect_cluster hung").is_err());
    assert!(took <= Duration::from_millis(2600), "{took:?}");
}

/// "one reachable node is enough": a silent seed listed first must not cost more than the
/// connect bound, and the connection works.
#[tokio::test]
async fn a_silent_seed_before_good_ones_still_connects_within_two_seconds() {
    let Ok(urls) = std::env::var("STURDY_REDIS_CLUSTER_URLS") else {
        eprintln!("STURDY_REDIS_CLUSTER_URLS unset: skipped");
        return;
    };
    let (silent, _) = node(Node::Silent).await;
    let mut seeds = vec![silent];
    seeds.extend(urls.split(',').map(str::to_owned));
    let t0 = Instant::now();
    let conn = tokio::time::timeout(
        Duration::from_secs(4),
        RedisConnection::connect_cluster(seeds.iter()),
    )
    .await
    .expect("connect_cluster hung")
    .expect("one reachable node is enough");
    let took = t0.elapsed();
    assert!(took <= Duration::from_millis(2600), "{took:?}");
    assert!(conn.is_cluster());
    let quota = RedisQuota::new(conn, Quota::per_second(1000).unwrap())
        .with_prefix(format!("s48:cl:{}", std::process::id()));
    let paused = tokio::time::timeout(Duration::from_secs(3), quota.try_paused("k"))
        .await
        .expect("an operation hung");
    assert_eq!(paused.unwrap(), None);
}

async fn fake_cluster(kind: Node) -> (RedisConnection, Arc<AtomicUsize>, String) {
    let (url, seen) = node(kind).await;
    let conn = tokio::time::timeout(
        Duration::from_secs(4),
        RedisConnection::connect_cluster([url.as_str()]),
    )
    .await
    .expect("connect_cluster hung")
    .expect("the fake node's slot map was accepted");
    (conn, seen, url)
}

#[tokio::test]
async fn an_operation_on_a_hung_cluster_node_ends_at_its_timeout() {
    let (conn, seen, url) = fake_cluster(Node::StallAfterSlots).await;
    let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap())
        .with_timeout(Duration::from_millis(250));
    for op in 0..3 {
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(4), async {
            match op {
                0 => quota.try_reserve("k", Duration::ZERO).await.map(|_| ()),
                1 => quota.try_paused("k").await.map(|_| ()),
                _ => quota.try_release("k").await.map(|_| ()),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("operation {op} hung past 4 s"));
        let took = t0.elapsed();
        let err = r.expect_err("a hung node answered");
        let text = format!("{err:#}");
        assert!(
            took >= Duration::from_millis(200),
            "op {op}: {took:?}: {text}"
        );
        assert!(
            took <= Duration::from_millis(900),
            "op {op}: the 250 ms timeout: {took:?}: {text}"
        );
        assert_eq!(kind_of(&*err), Some(ErrorKind::Timeout), "op {op}: {text}");
        no_url(&text, &url);
    }
    assert!(seen.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn the_default_operation_timeout_on_a_cluster_is_one_second() {
    let (conn, _, _) = fake_cluster(Node::StallAfterSlots).await;
    let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap());
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(4), quota.try_paused("k"))
        .await
        .expect("an operation with the default timeout hung past 4 s");
    let took = t0.elapsed();
    let err = r.expect_err("a hung node answered");
    assert!(took >= Duration::from_millis(900), "{took:?}: {err}");
    assert!(
        took <= Duration::from_millis(1800),
        "default [1 s]: {took:?}: {err}"
    );
}

#[tokio::test]
async fn a_cluster_node_that_resets_gives_transport_within_the_timeout() {
    let (conn, seen, url) = fake_cluster(Node::ResetAfterSlots).await;
    let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap())
        .with_timeout(Duration::from_millis(400));
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(4),
        quota.try_reserve("k", Duration::ZERO),
    )
    .await
    .expect("hung past 4 s");
    let took = t0.elapsed();
    let err = r.expect_err("a node that resets answered");
    let text = format!("{err:#}");
    assert!(
        took <= Duration::from_millis(1100),
        "the 400 ms timeout: {took:?}: {text}"
    );
    no_url(&text, &url);
    let kind = kind_of(&*err);
    // A reset after the command was written: "may have run" (`Transport`), or the timeout if the
    // client kept trying; never `Connect` ("not sent").
    assert!(
        kind == Some(ErrorKind::Transport) || kind == Some(ErrorKind::Timeout),
        "{kind:?}: {text}"
    );
    assert!(seen.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn the_idempotency_layer_over_a_hung_cluster_node_answers_503_in_time() {
    for kind in [Node::StallAfterSlots, Node::ResetAfterSlots] {
        let (conn, _, _) = fake_cluster(kind).await;
        let store = RedisIdempotencyStore::new(conn).with_timeout(Duration::from_millis(300));
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let app: axum::Router = axum::Router::new()
            .route(
                "/orders",
                axum::routing::post(move || {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        StatusCode::CREATED
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store, ByCredentials::default()));
        let t0 = Instant::now();
        let res = tokio::time::timeout(
            Duration::from_secs(4),
            app.oneshot(
                Request::post("/orders")
                    .header("idempotency-key", "k")
                    .body(axum::body::Body::from("x"))
                    .unwrap(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{kind:?}: the layer hung"))
        .unwrap();
        let took = t0.elapsed();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{kind:?}");
        assert_eq!(res.headers().get("retry-after").unwrap(), "1", "{kind:?}");
        assert!(
            took <= Duration::from_millis(1000),
            "{kind:?}: the 300 ms timeout: {took:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 0, "{kind:?}");
    }
}

/// A fake cluster node that answers the handshake and the slot map (every slot its own), then
/// every other command with `reply` (made from the node's own port).
async fn scripted_node(
    reply: impl Fn(u16) -> String + Send + 'static,
) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let reply = reply(port);
    let others = Arc::new(AtomicUsize::new(0));
    let seen = others.clone();
    let slots = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:{port}\r\n$40\r\n{}\r\n",
        "b".repeat(40)
    );
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            let slots = slots.clone();
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    for cmd in take_commands(&mut buf) {
                        let word = |i: usize| {
                            cmd.get(i)
                                .map(|c| String::from_utf8_lossy(c).to_uppercase())
                                .unwrap_or_default()
                        };
                        let out: String = match (word(0).as_str(), word(1).as_str()) {
                            ("CLIENT" | "SELECT" | "AUTH" | "READONLY", _) => "+OK\r\n".into(),
                            ("PING", _) => "+PONG\r\n".into(),
                            ("HELLO", _) => "-ERR unknown command 'HELLO'\r\n".into(),
                            ("CLUSTER", "SLOTS") => slots.clone(),
                            _ => {
                                seen.fetch_add(1, Ordering::SeqCst);
                                reply.clone()
                            }
                        };
                        if s.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (format!("redis://127.0.0.1:{port}/"), others)
}

async fn scripted_cluster(
    reply: impl Fn(u16) -> String + Send + 'static,
) -> (RedisConnection, Arc<AtomicUsize>) {
    let (url, seen) = scripted_node(reply).await;
    let conn = tokio::time::timeout(
        Duration::from_secs(4),
        RedisConnection::connect_cluster([url.as_str()]),
    )
    .await
    .expect("connect_cluster hung")
    .expect("the fake node's slot map was accepted");
    (conn, seen)
}

/// RELIABILITY.md: a slot move "that lasts longer ... fails with 'the Redis Cluster cannot serve
/// this key now'", each operation within its timeout; the node answers `TRYAGAIN` or
/// `CLUSTERDOWN` for ever.
#[tokio::test]
async fn a_node_that_never_stops_answering_tryagain_or_clusterdown_fails_in_time_and_says_so() {
    for reply in [
        "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        "-CLUSTERDOWN The cluster is down\r\n",
    ] {
        let (conn, seen) = scripted_cluster(move |_| reply.to_owned()).await;
        let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap())
            .with_timeout(Duration::from_millis(400));
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(4),
            quota.try_reserve("k", Duration::ZERO),
        )
        .await
        .unwrap_or_else(|_| panic!("{reply:?}: hung past 4 s"));
        let took = t0.elapsed();
        let err = r.expect_err("a node that cannot serve answered");
        let text = format!("{err:#}");
        assert!(
            took <= Duration::from_millis(1100),
            "{reply:?}: the 400 ms timeout: {took:?}: {text}"
        );
        assert!(
            text.contains("cannot serve this key now")
                || kind_of(&*err) == Some(ErrorKind::Timeout),
            "{reply:?}: {text}"
        );
        assert_ne!(
            kind_of(&*err),
            Some(ErrorKind::Connect),
            "{reply:?}: {text}"
        );
        assert!(seen.load(Ordering::SeqCst) >= 1, "{reply:?}");
    }
}

/// A node that redirects every command to itself (`MOVED` for ever), or to a node that never
/// answers: "follows `MOVED`/`ASK` redirections" and "tried again a few times within each
/// operation's timeout": the operation still ends at its timeout.
#[tokio::test]
async fn endless_or_hung_redirections_end_at_the_operation_timeout() {
    let (silent, _) = node(Node::Silent).await;
    let silent_port: u16 = silent
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let cases: Vec<(&str, Box<dyn Fn(u16) -> String + Send>)> = vec![
        (
            "moved to itself",
            Box::new(|p| format!("-MOVED 866 127.0.0.1:{p}\r\n")),
        ),
        (
            "ask to itself",
            Box::new(|p| format!("-ASK 866 127.0.0.1:{p}\r\n")),
        ),
        (
            "moved to a silent node",
            Box::new(move |_| format!("-MOVED 866 127.0.0.1:{silent_port}\r\n")),
        ),
        (
            "ask to a silent node",
            Box::new(move |_| format!("-ASK 866 127.0.0.1:{silent_port}\r\n")),
        ),
    ];
    for (name, reply) in cases {
        let (conn, _) = scripted_cluster(reply).await;
        let store =
            RedisIdempotencyStore::new(conn.clone()).with_timeout(Duration::from_millis(400));
        let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap())
            .with_timeout(Duration::from_millis(400));
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(4), quota.try_paused("k"))
            .await
            .unwrap_or_else(|_| panic!("{name}: hung past 4 s"));
        let took = t0.elapsed();
        let err = r.expect_err("a redirection loop answered");
        let text = format!("{err:#}");
        assert!(
            took <= Duration::from_millis(1100),
            "{name}: the 400 ms timeout: {took:?}: {text}"
        );
        assert_ne!(kind_of(&*err), Some(ErrorKind::Connect), "{name}: {text}");

        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let app: axum::Router = axum::Router::new()
            .route(
                "/orders",
                axum::routing::post(move || {
                    let r = r.clone();
                    async move {
                        r.fetch_add(1, Ordering::SeqCst);
                        StatusCode::CREATED
                    }
                }),
            )
            .layer(IdempotencyLayer::new(store, ByCredentials::default()));
        let t1 = Instant::now();
        let res = tokio::time::timeout(
            Duration::from_secs(4),
            app.oneshot(
                Request::post("/orders")
                    .header("idempotency-key", "k")
                    .body(axum::body::Body::from("x"))
                    .unwrap(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: the layer hung"))
        .unwrap();
        let took = t1.elapsed();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{name}");
        assert!(took <= Duration::from_millis(1100), "{name}: {took:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 0, "{name}");
    }
}

/// A node answering as a read-only replica or while loading: the documented words, in time.
#[tokio::test]
async fn readonly_and_loading_answers_are_named_and_bounded() {
    for (reply, words) in [
        (
            "-READONLY You can't write against a read only replica.\r\n",
            "read-only replica",
        ),
        (
            "-LOADING Redis is loading the dataset in memory\r\n",
            "loading",
        ),
        (
            "-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n",
            "",
        ),
    ] {
        let (conn, _) = scripted_cluster(move |_| reply.to_owned()).await;
        let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap())
            .with_timeout(Duration::from_millis(400));
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(4),
            quota.try_reserve("k", Duration::ZERO),
        )
        .await
        .unwrap_or_else(|_| panic!("{reply:?}: hung past 4 s"));
        let took = t0.elapsed();
        let err = r.expect_err("answered");
        let text = format!("{err:#}");
        assert!(
            took <= Duration::from_millis(1100),
            "{reply:?}: {took:?}: {text}"
        );
        assert!(
            text.contains(words) || kind_of(&*err) == Some(ErrorKind::Timeout),
            "{reply:?}: {text}"
        );
    }
}

/// A seed that answers the handshake and a slot map giving every slot to `owner` (a port on
/// 127.0.0.1), and stalls on anything else.
async fn map_node(owner: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let slots = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:{owner}\r\n$40\r\n{}\r\n",
        "c".repeat(40)
    );
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let slots = slots.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut stalled = false;
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    for cmd in take_commands(&mut buf) {
                        let word = |i: usize| {
                            cmd.get(i)
                                .map(|c| String::from_utf8_lossy(c).to_uppercase())
                                .unwrap_or_default()
                        };
                        let out: String = match (word(0).as_str(), word(1).as_str()) {
                            ("CLIENT" | "SELECT" | "AUTH" | "READONLY", _) => "+OK\r\n".into(),
                            ("PING", _) => "+PONG\r\n".into(),
                            ("HELLO", _) => "-ERR unknown command 'HELLO'\r\n".into(),
                            ("CLUSTER", "SLOTS") => slots.clone(),
                            _ => {
                                stalled = true;
                                String::new()
                            }
                        };
                        if !stalled && s.write_all(out.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let _ = port;
    format!("redis://127.0.0.1:{port}/")
}

/// A slot map whose owner never answers, or refuses connections: connecting ends within 2 s,
/// each operation within its timeout, and a node that cannot be reached after the client's
/// own tries is "`Transport`, never `Connect`" (RELIABILITY.md, clear errors).
#[tokio::test]
async fn a_slot_owner_that_hangs_or_refuses_is_bounded_and_never_connect() {
    let (silent, _) = node(Node::Silent).await;
    let silent_port: u16 = silent
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    for (name, owner) in [
        ("silent owner", silent_port),
        ("refusing owner", closed_port),
    ] {
        let seed = map_node(owner).await;
        let t0 = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(4),
            RedisConnection::connect_cluster([seed.as_str()]),
        )
        .await
        .unwrap_or_else(|_| panic!("{name}: connect_cluster hung past 4 s"));
        let took = t0.elapsed();
        assert!(
            took <= Duration::from_millis(2600),
            "{name}: within 2 s: {took:?}"
        );
        let conn = match r {
            Ok(c) => c,
            Err(e) => {
                let text = format!("{e:#}");
                no_url(&text, &seed);
                continue;
            }
        };
        let quota = RedisQuota::new(conn, Quota::per_second(10).unwrap())
            .with_timeout(Duration::from_millis(400));
        let t1 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(4), quota.try_paused("k"))
            .await
            .unwrap_or_else(|_| panic!("{name}: an operation hung past 4 s"));
        let took = t1.elapsed();
        let err = r.expect_err("an unreachable owner answered");
        let text = format!("{err:#}");
        assert!(
            took <= Duration::from_millis(1100),
            "{name}: the 400 ms timeout: {took:?}: {text}"
        );
        assert_ne!(
            kind_of(&*err),
            Some(ErrorKind::Connect),
            "{name}: reads as not sent: {text}"
        );
        if name == "refusing owner" {
            assert!(
                kind_of(&*err) == Some(ErrorKind::Transport)
                    || kind_of(&*err) == Some(ErrorKind::Timeout),
                "{name}: {text}"
            );
        }
    }
}
