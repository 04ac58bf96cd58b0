//! `RedisIdempotencyStore::with_replication` against a primary with a real replica, a store
//! pointed at a read-only replica, and a replica that goes away (RELIABILITY.md "Writes a
//! failover could lose"). Starts its own throwaway `redis-server`s on free loopback ports;
//! skipped when `redis-server` is not installed.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::post;
use axum::Router;
use http::{Request, StatusCode};
use sturdy::idempotency::server::{
    problem, ByCredentials, IdempotencyLayer, IdempotencyStore, LockToken,
};
use sturdy::redis::RedisIdempotencyStore;
use tower::ServiceExt;

use crate::retry28_redis::resp;

/// A `redis-server` child, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(replica_of: Option<SocketAddr>) -> Option<Server> {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("retry28-redis-{port}-{}", LockToken::random()));
    std::fs::create_dir_all(&dir).ok()?;
    let mut cmd = Command::new("redis-server");
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(p) = replica_of {
        cmd.args(["--replicaof", &p.ip().to_string(), &p.port().to_string()]);
    }
    let Ok(child) = cmd.spawn() else {
        eprintln!("redis-server not found: skipped");
        return None;
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = Server {
        child,
        addr,
        _dir: tempdir::Dir(dir),
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Some(server);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis-server on {addr} did not start");
}

async fn wait_linked(primary: SocketAddr) {
    for _ in 0..300 {
        let info = resp(primary, &["INFO", "replication"]).await;
        let text = String::from_utf8_lossy(&info[0]).into_owned();
        if text.contains("connected_slaves:1") && text.contains("state=online") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the replica did not come online");
}

type Hits = Arc<AtomicUsize>;

fn app(store: RedisIdempotencyStore) -> (Router, Hits) {
    let hits = Hits::default();
    let h = hits.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "created")
                }
            }),
        )
        .layer(IdempotencyLayer::new(store, ByCredentials::default()));
    (app, hits)
}

async fn send(app: &Router, key: &str) -> (StatusCode, http::HeaderMap, String) {
    let r = Request::post("/orders")
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap();
    let res = app.clone().oneshot(r).await.unwrap();
    let (p, b) = res.into_parts();
    let b = axum::body::to_bytes(b, usize::MAX).await.unwrap();
    (
        p.status,
        p.headers,
        String::from_utf8_lossy(&b).into_owned(),
    )
}

#[tokio::test]
async fn replication_to_a_live_replica_then_to_none() {
    let Some(primary) = start(None).await else {
        return;
    };
    let Some(replica) = start(Some(primary.addr)).await else {
        return;
    };
    wait_linked(primary.addr).await;
    let url = format!("redis://{}/", primary.addr);
    let store = RedisIdempotencyStore::connect(&url)
        .await
        .unwrap()
        .with_prefix("retry28:replica")
        .with_replication(1, Duration::from_millis(1000));
    let (app, hits) = app(store.clone());
    assert_eq!(send(&app, "r-1").await.0, 201);
    let again = send(&app, "r-1").await;
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // The replica has the stored response.
    let keys = resp(replica.addr, &["KEYS", "retry28:replica:*"]).await;
    assert_eq!(keys.len(), 1, "{keys:?}");

    // A store on the replica itself: writes are refused, and said so.
    let on_replica = RedisIdempotencyStore::connect(&format!("redis://{}/", replica.addr))
        .await
        .unwrap()
        .with_prefix("retry28:replica");
    let err = on_replica
        .begin("ro", [1; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Redis answered as a read-only replica"),
        "{err}"
    );
    let (ro_app, ro_hits) = app_on(on_replica);
    let got = send(&ro_app, "ro-2").await;
    assert_eq!(got.0, 503, "{}", got.2);
    assert!(got.2.contains(problem::STORE_UNAVAILABLE));
    assert_eq!(ro_hits.load(Ordering::SeqCst), 0);

    // The replica goes away: new locks are refused, within the wait.
    drop(replica);
    let start_at = tokio::time::Instant::now();
    let err = store
        .begin("gone", [2; 32], LockToken::random(), Duration::from_secs(5))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(start_at.elapsed() < Duration::from_millis(2500));
    assert!(
        err.to_string().contains(
            "the write reached the Redis primary, but only 0 of the 1 replicas asked for confirmed it"
        ),
        "{err}"
    );
    let got = send(&app, "r-3").await;
    assert_eq!(got.0, 503, "{}", got.2);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

fn app_on(store: RedisIdempotencyStore) -> (Router, Hits) {
    app(store)
}
