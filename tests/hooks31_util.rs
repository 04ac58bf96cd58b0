//! Helpers of the hooks31 round: clocks, a served axum app, raw HTTP/1.1 exchanges, Redis
//! names, and a queue that holds its pushes until released.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use sturdy::core::{BoxError, WallClock};
use sturdy::webhook::{BoxFuture, EventQueue, MemoryQueue, Push, WebhookEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

pub const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const STD_OTHER: &str = "whsec_aG9va3MzMSByb3RhdGVkIHNlY3JldCAzMiBieXRlcyE=";
pub const STRIPE_SECRET: &str = "whsec_hooks31_stripe_endpoint_secret";

/// The wall clock, in whole seconds.
pub fn now_s() -> i64 {
    sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A time `secs` (may be negative) plus `nanos` after the epoch.
pub fn at(secs: i64, nanos: u32) -> SystemTime {
    let base = if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    };
    base + Duration::from_nanos(u64::from(nanos))
}

/// A fixed wall clock.
#[derive(Debug, Clone, Copy)]
pub struct Fixed(pub SystemTime);
impl WallClock for Fixed {
    fn now(&self) -> SystemTime {
        self.0
    }
}

/// Serves `app` on 127.0.0.1, port 0, with the peer address as `ConnectInfo`.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

/// A request head for `path` with `headers` and a `Content-Length` of `len`.
pub fn head(path: &str, headers: &[(&str, &[u8])], len: usize) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len}\r\n")
        .into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    out
}

/// Sends `bytes` and reads the whole answer (the server closes: `connection: close`).
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP/1.1 answer (0 when there is none).
pub fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The body of a raw HTTP/1.1 answer.
pub fn body_of(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

/// The shared Redis, or `None` after a skip line.
pub fn redis_url() -> Option<String> {
    match std::env::var("STURDY_REDIS_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("skipped: STURDY_REDIS_URL is not set");
            None
        }
    }
}

/// A fresh hash-tagged stream name.
pub fn unique(what: &str) -> String {
    let n = sturdy::core::SystemClock
        .now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{{hooks31-{what}-{n}-{}}}", std::process::id())
}

/// `redis-cli -u url args...`, its standard output trimmed.
pub fn redis_cli(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A queue whose pushes each wait for a permit before reaching the inner queue, counting the
/// pushes started and finished.
#[derive(Debug, Clone)]
pub struct Gated<Q> {
    pub inner: Q,
    pub gate: Arc<Semaphore>,
    pub started: Arc<AtomicUsize>,
    pub finished: Arc<AtomicUsize>,
}

impl<Q> Gated<Q> {
    pub fn new(inner: Q) -> Self {
        Self {
            inner,
            gate: Arc::new(Semaphore::new(0)),
            started: Arc::default(),
            finished: Arc::default(),
        }
    }
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }
    pub fn finished(&self) -> usize {
        self.finished.load(Ordering::SeqCst)
    }
}

impl<Q: EventQueue + Clone> EventQueue for Gated<Q> {
    fn push(&self, event: WebhookEvent, dedup_ttl: Duration) -> BoxFuture<Result<Push, BoxError>> {
        let me = self.clone();
        Box::pin(async move {
            me.started.fetch_add(1, Ordering::SeqCst);
            me.gate.acquire().await.unwrap().forget();
            let r = me.inner.push(event, dedup_ttl).await;
            me.finished.fetch_add(1, Ordering::SeqCst);
            r
        })
    }
}

/// A memory queue behind a gate.
pub fn gated_memory(capacity: usize) -> (Gated<MemoryQueue>, sturdy::webhook::MemoryReceiver) {
    let (q, rx) = MemoryQueue::new(capacity);
    (Gated::new(q), rx)
}
