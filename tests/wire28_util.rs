//! Hand-written misbehaving HTTP/1.1 peers on loopback, and the clients the `wire28_*` tests put
//! in front of them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sturdy::core::BoxError;
use sturdy::ratelimit::RateLimitLayer;
use sturdy::retry::{Backoff, RetryLayer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the peer saw.
#[derive(Clone, Default)]
pub(crate) struct Seen {
    /// Connections accepted.
    pub(crate) conns: Arc<AtomicUsize>,
    /// Request heads read in full.
    pub(crate) requests: Arc<AtomicUsize>,
    /// The heads, as text.
    pub(crate) heads: Arc<Mutex<Vec<String>>>,
    /// Connections the client closed (EOF or error seen by `wait_close`).
    pub(crate) closed: Arc<AtomicUsize>,
}

impl Seen {
    pub(crate) fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub(crate) fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
    pub(crate) fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
    /// The values of `name` in every request head, in order.
    pub(crate) fn header_values(&self, name: &str) -> Vec<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.heads()
            .iter()
            .flat_map(|h| {
                h.lines()
                    .filter(|l| l.to_ascii_lowercase().starts_with(&prefix))
                    .map(|l| l[prefix.len()..].trim().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// A hand-written peer listening on 127.0.0.1.
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) seen: Seen,
}

impl Peer {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub(crate) fn authority(&self) -> String {
        self.addr.to_string()
    }
}

/// One accepted connection.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    /// 0 for the first connection the peer accepted.
    pub(crate) index: usize,
    pub(crate) seen: Seen,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads one request (head, then a `Content-Length` body); `None` at EOF or on an error.
    pub(crate) async fn read_request(&mut self) -> Option<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let len = head
                    .lines()
                    .find_map(|l| {
                        let l = l.to_ascii_lowercase();
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    if !self.fill().await {
                        return None;
                    }
                }
                self.buf.drain(..end + 4 + len);
                self.seen.requests.fetch_add(1, Ordering::SeqCst);
                self.seen.heads.lock().unwrap().push(head.clone());
                return Some(head);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads one request head only, leaving its body unread; `None` at EOF or on an error.
    pub(crate) async fn read_head_only(&mut self) -> Option<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                self.seen.requests.fetch_add(1, Ordering::SeqCst);
                self.seen.heads.lock().unwrap().push(head.clone());
                return Some(head);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads whatever comes (at least one byte); false at EOF.
    pub(crate) async fn read_some(&mut self) -> bool {
        self.fill().await
    }

    pub(crate) async fn write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok() && self.stream.flush().await.is_ok()
    }

    /// Writes one byte every `every`.
    pub(crate) async fn drip(&mut self, bytes: &[u8], every: Duration) -> bool {
        for b in bytes {
            if !self.write(&[*b]).await {
                return false;
            }
            tokio::time::sleep(every).await;
        }
        true
    }

    /// Closes with a reset (RST) instead of a FIN.
    pub(crate) fn reset(self) {
        let _ = self.stream.set_zero_linger();
        drop(self.stream);
    }

    /// Keeps the connection open, reading and dropping whatever comes, until the client closes
    /// it; then counts it in `closed`.
    pub(crate) async fn wait_close(mut self) {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.seen.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Starts a peer that runs `f` on every connection it accepts.
pub(crate) async fn peer<F, Fut>(f: F) -> Peer
where
    F: Fn(Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let index = s.conns.fetch_add(1, Ordering::SeqCst);
            let conn = Conn {
                stream,
                index,
                seen: s.clone(),
                buf: Vec::new(),
            };
            tokio::spawn(f(conn));
        }
    });
    Peer { addr, seen }
}

/// A peer that reads each request and answers it with `response` (keeping the connection).
pub(crate) async fn answering(response: &'static [u8]) -> Peer {
    peer(move |mut c| async move {
        while c.read_request().await.is_some() {
            if !c.write(response).await {
                return;
            }
        }
    })
    .await
}

pub(crate) const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

pub(crate) type Hyper = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// A plain hyper-util client.
pub(crate) fn hyper_client() -> Hyper {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// A retry layer with millisecond backoff and a fixed seed.
pub(crate) fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(28)
}

/// The default adaptive limiter with a short default pause (a bare 429 pauses 1 s otherwise).
pub(crate) fn quick_limiter() -> RateLimitLayer {
    RateLimitLayer::adaptive_only().with_default_pause(Duration::from_millis(5))
}

/// The composed client with millisecond settings: retries 2 to 10 ms apart, attempts cut at
/// `attempt`.
pub(crate) fn client(attempt: Duration) -> sturdy::Client<Incoming> {
    sturdy::ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(attempt)
        .build(hyper_client())
}

/// Like [`client`], without idempotency keys (a POST then has none).
pub(crate) fn client_without_keys(attempt: Duration) -> sturdy::Client<Incoming> {
    sturdy::ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(attempt)
        .build(hyper_client())
}

pub(crate) fn get(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

pub(crate) fn post(url: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap()
}

/// Fails the test if `f` takes more than `secs` seconds.
pub(crate) async fn within<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("hung")
}

/// The sturdy error in a chain.
pub(crate) fn sturdy_err(err: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**err).expect("no sturdy error in the chain")
}

/// Every text a caller may show or log of an error: `Display`, `Debug`, the summary and the
/// tool result, and each link of the source chain.
pub(crate) fn every_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{err}\n{err:?}\n");
    let summary = sturdy::core::summary::ErrorSummary::of(err);
    out += &serde_json::to_string(&summary).unwrap();
    out += &summary.advice();
    let mut e = err.source();
    while let Some(s) = e {
        out += &format!("\n{s}\n{s:?}");
        e = s.source();
    }
    out
}

/// A small seeded generator (xorshift64*), so drop points repeat from run to run.
pub(crate) struct Seeded(u64);

impl Seeded {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Waits until `cond` holds (up to 2 s).
pub(crate) async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
