//! Helpers of the `faults32_*` tests: a raw TCP HTTP/1.1 server on 127.0.0.1:0 that misbehaves
//! on purpose (resets before and after reading a request, stalls mid-head and mid-body, slow
//! drips, closes idle keep-alive connections) and records what it read and which connections
//! the client closed.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What the server does with one request it has read.
#[derive(Clone, Debug)]
pub(crate) enum Act {
    /// Answers `status` with `body` after `delay` (keep-alive unless `close`).
    Answer {
        status: u16,
        body: Vec<u8>,
        delay: Duration,
        close: bool,
        headers: Vec<(String, String)>,
    },
    /// Waits `delay` (or until the client closes), then resets the connection (RST).
    ResetAfterRead(Duration),
    /// Closes the connection (FIN) without an answer.
    CloseAfterRead,
    /// Sends part of the head, then waits until the client closes.
    StallHeaders,
    /// Sends a head declaring `declared` bytes and `sent` of them, then waits until the client
    /// closes.
    StallBody { declared: usize, sent: usize },
    /// Sends `body` one byte every `every` (Content-Length declared).
    Drip { body: Vec<u8>, every: Duration },
}

/// An answer after `ms` milliseconds.
pub(crate) fn ok_after(ms: u64, body: &str) -> Act {
    Act::Answer {
        status: 200,
        body: body.as_bytes().to_vec(),
        delay: Duration::from_millis(ms),
        close: false,
        headers: vec![],
    }
}

/// A status at once.
pub(crate) fn status(code: u16) -> Act {
    Act::Answer {
        status: code,
        body: b"{}".to_vec(),
        delay: Duration::ZERO,
        close: false,
        headers: vec![],
    }
}

/// A status after `ms`.
pub(crate) fn status_after(code: u16, ms: u64) -> Act {
    Act::Answer {
        status: code,
        body: b"{}".to_vec(),
        delay: Duration::from_millis(ms),
        close: false,
        headers: vec![],
    }
}

/// One request the server read.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The connection's number (0 for the first accepted).
    pub conn: usize,
    /// The request's number on the server (0 for the first).
    pub index: usize,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the server treats connections.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Opts {
    /// Resets every connection as soon as it is accepted, before reading anything.
    pub reset_on_accept: bool,
    /// Closes a keep-alive connection that stays idle this long between requests.
    pub idle_close: Option<Duration>,
}

/// A running raw server.
#[derive(Clone)]
pub(crate) struct Raw {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub accepted: Arc<AtomicUsize>,
    /// Connections whose handler is still running (open from the server's side).
    pub open: Arc<AtomicUsize>,
    /// Connections on which the server saw the client close (EOF or reset) while it stalled or
    /// waited.
    pub client_closed: Arc<AtomicUsize>,
}

impl Raw {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub(crate) fn count(&self, method: &str, path: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .count()
    }
    pub(crate) fn count_path(&self, path: &str) -> usize {
        self.seen().iter().filter(|s| s.path == path).count()
    }
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
    pub(crate) fn client_closed(&self) -> usize {
        self.client_closed.load(Ordering::SeqCst)
    }
}

type Decide = Arc<dyn Fn(&Seen) -> Act + Send + Sync>;

/// Starts a raw server; `decide` picks what to do with each request.
pub(crate) async fn raw(opts: Opts, decide: impl Fn(&Seen) -> Act + Send + Sync + 'static) -> Raw {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw = Raw {
        addr: listener.local_addr().unwrap(),
        seen: Arc::default(),
        accepted: Arc::default(),
        open: Arc::default(),
        client_closed: Arc::default(),
    };
    let decide: Decide = Arc::new(decide);
    let r = raw.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let conn = r.accepted.fetch_add(1, Ordering::SeqCst);
            if opts.reset_on_accept {
                rst(&stream);
                drop(stream);
                continue;
            }
            r.open.fetch_add(1, Ordering::SeqCst);
            let r2 = r.clone();
            let d = decide.clone();
            tokio::spawn(async move {
                connection(stream, conn, opts, &r2, &d).await;
                r2.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    raw
}

/// Waits `d` or until the peer closes; true when the peer closed.
async fn wait_or_closed(stream: &mut TcpStream, d: Duration) -> bool {
    let mut b = [0u8; 64];
    let deadline = Instant::now() + d;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return false,
            n = stream.read(&mut b) => match n {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            },
        }
    }
}

async fn connection(mut stream: TcpStream, conn: usize, opts: Opts, r: &Raw, decide: &Decide) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read one head.
        let end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let read = stream.read(&mut chunk);
            let n = match (opts.idle_close, buf.is_empty()) {
                (Some(idle), true) => match tokio::time::timeout(idle, read).await {
                    Ok(n) => n,
                    Err(_) => return, // idle: close (FIN)
                },
                _ => read.await,
            };
            match n {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..len).collect();
        let seen = {
            let mut all = r.seen.lock().unwrap();
            let s = Seen {
                method,
                path,
                headers,
                body,
                conn,
                index: all.len(),
            };
            all.push(s.clone());
            s
        };
        match decide(&seen) {
            Act::Answer {
                status,
                body,
                delay,
                close,
                headers,
            } => {
                if !delay.is_zero() && wait_or_closed(&mut stream, delay).await {
                    r.client_closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\ncontent-type: application/json\r\n",
                    body.len()
                );
                for (n, v) in headers {
                    out.push_str(&format!("{n}: {v}\r\n"));
                }
                if close {
                    out.push_str("connection: close\r\n");
                }
                out.push_str("\r\n");
                let mut bytes = out.into_bytes();
                bytes.extend_from_slice(&body);
                if stream.write_all(&bytes).await.is_err() {
                    return;
                }
                if close {
                    return;
                }
            }
            Act::ResetAfterRead(delay) => {
                if !delay.is_zero() && wait_or_closed(&mut stream, delay).await {
                    r.client_closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                rst(&stream);
                return;
            }
            Act::CloseAfterRead => return,
            Act::StallHeaders => {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: applic")
                    .await;
                if wait_or_closed(&mut stream, Duration::from_secs(60)).await {
                    r.client_closed.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            Act::StallBody { declared, sent } => {
                let mut out =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {declared}\r\n\r\n").into_bytes();
                out.extend(std::iter::repeat_n(b'x', sent));
                let _ = stream.write_all(&out).await;
                if wait_or_closed(&mut stream, Duration::from_secs(60)).await {
                    r.client_closed.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            Act::Drip { body, every } => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if stream.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for b in body {
                    if wait_or_closed(&mut stream, every).await {
                        r.client_closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    if stream.write_all(&[b]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Makes the close of `s` a reset (RST): SO_LINGER 0 (which does not block).
#[allow(deprecated)]
fn rst(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A port on 127.0.0.1 where nothing listens (a connect is refused).
pub(crate) async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// The plain HTTP/1.1 client.
pub(crate) type Http = HyperClient<HttpConnector, Full<Bytes>>;

pub(crate) fn http() -> Http {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    HyperClient::builder(TokioExecutor::new()).build(c)
}

pub(crate) fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

pub(crate) fn req(method: &str, url: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::from("{\"a\":1}"))
        .unwrap()
}

/// Waits (real time, up to 10 s) until `cond` holds.
pub(crate) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fails the test if `f` takes longer than `limit` (nothing may hang).
pub(crate) async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after {limit:?}"),
    }
}

/// The error chain as one line.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(" <- ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
