//! Raw HTTP/1.1 over TCP for the server11 tests: requests written byte by byte, responses read
//! by hand (Content-Length or chunked), so a test can stop anywhere a hostile or unlucky client
//! would.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Serves `app` with axum on 127.0.0.1, port 0.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A response read off the wire.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    pub fn problem_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        v["type"].as_str().unwrap_or("").to_owned()
    }
}

/// A client connection that keeps what it read past one response (pipelining).
pub struct Conn {
    pub s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        Self { s, buf: Vec::new() }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes).await
    }

    /// Writes `bytes` one at a time, `gap` apart.
    pub async fn trickle(&mut self, bytes: &[u8], gap: Duration) -> std::io::Result<()> {
        for b in bytes {
            self.s.write_all(std::slice::from_ref(b)).await?;
            tokio::time::sleep(gap).await;
        }
        Ok(())
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads the status line and headers only (the body stays unread).
    pub async fn read_head(&mut self) -> Option<Resp> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = head.split("\r\n");
                let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                return Some(Resp {
                    status,
                    headers,
                    body: Vec::new(),
                });
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads one whole response; `None` when the connection closes first. Interim 1xx
    /// responses are skipped.
    pub async fn read_response(&mut self) -> Option<Resp> {
        let mut r = loop {
            let r = self.read_head().await?;
            if r.status >= 200 {
                break r;
            }
        };
        if let Some(len) = r.header("content-length") {
            let len: usize = len.parse().ok()?;
            while self.buf.len() < len {
                if !self.fill().await {
                    return None;
                }
            }
            r.body = self.buf.drain(..len).collect();
        } else if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(e) = find(&self.buf, b"\r\n") {
                        break e;
                    }
                    if !self.fill().await {
                        return None;
                    }
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    if !self.fill().await {
                        return None;
                    }
                }
                r.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
                if size == 0 {
                    break;
                }
            }
        } else if r.status != 204 && r.status != 304 {
            while self.fill().await {}
            r.body = std::mem::take(&mut self.buf);
        }
        Some(r)
    }

    /// Reads one response within `limit`, else `None`.
    pub async fn response_within(&mut self, limit: Duration) -> Option<Resp> {
        tokio::time::timeout(limit, self.read_response())
            .await
            .ok()
            .flatten()
    }

    /// Whether the server closed the connection (EOF or reset) within `limit`, discarding
    /// anything it sent.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sends one whole request on a fresh connection and reads its response.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<Resp> {
    let mut c = Conn::open(addr).await;
    c.write(request).await.ok()?;
    c.response_within(Duration::from_secs(5)).await
}

/// Polls `cond` every 10 ms until it holds, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(ms(10)).await;
    }
}

pub fn redis_url() -> String {
    std::env::var("STURDY_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:17379/".to_owned())
}

/// A name no other test run uses.
pub fn unique(what: &str) -> String {
    let t = sturdy::core::WallClock::now(&sturdy::core::clock::SystemClock)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("server11-{what}-{t:x}-{}", std::process::id())
}
