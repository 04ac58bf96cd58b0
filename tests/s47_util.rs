//! Helpers of the s47 tests: a raw loopback peer that stalls at a chosen phase of an HTTP/1.1
//! exchange (before reading, after reading the request, mid-body, mid-chunk, trickling), and
//! turns healthy when told to; it logs every request head it read.
#![cfg(feature = "full")]
#![allow(dead_code)]

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where the peer stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Phase {
    /// Answers every request with `200` and the body `ok`, keeping the connection alive.
    Healthy = 0,
    /// Accepts the connection and never reads from it.
    Silent = 1,
    /// Reads the request head, never answers.
    ReadNoHead = 2,
    /// Sends a head promising 10 bytes and 2 of them, then holds the socket.
    HeadMidBody = 3,
    /// Sends a chunked head and one chunk, then holds the socket.
    ChunkedStall = 4,
    /// Sends the whole response one byte every 50 ms (head included).
    TrickleAll = 5,
    /// Sends the head at once, then a 20-byte body one byte every 50 ms.
    TrickleBody = 6,
    /// Sends a token response head (JSON) and half its body, then holds the socket.
    TokenHeadMidBody = 7,
    /// Answers with a valid OAuth2 token response.
    Token = 8,
    /// Answers with a valid OAuth2 token response whose lifetime is 2 s.
    TokenShort = 9,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Silent,
            2 => Self::ReadNoHead,
            3 => Self::HeadMidBody,
            4 => Self::ChunkedStall,
            5 => Self::TrickleAll,
            6 => Self::TrickleBody,
            7 => Self::TokenHeadMidBody,
            8 => Self::Token,
            9 => Self::TokenShort,
            _ => Self::Healthy,
        }
    }
}

/// One request head the peer read.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) key: Option<String>,
}

#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) base: String,
    phase: Arc<AtomicU8>,
    accepts: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl Peer {
    pub(crate) async fn start(phase: Phase) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = Self {
            base: format!("http://{addr}"),
            phase: Arc::new(AtomicU8::new(phase as u8)),
            accepts: Arc::default(),
            log: Arc::default(),
        };
        let p = peer.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                p.accepts.fetch_add(1, Ordering::SeqCst);
                let p = p.clone();
                tokio::spawn(async move { p.serve(sock).await });
            }
        });
        peer
    }

    pub(crate) fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Connections accepted so far.
    pub(crate) fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Request heads read so far.
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// Request heads read so far that carried this idempotency key.
    pub(crate) fn with_key(&self, key: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.key.as_deref() == Some(key))
            .count()
    }

    async fn serve(&self, mut sock: TcpStream) {
        if Phase::from_u8(self.phase.load(Ordering::SeqCst)) == Phase::Silent {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let mut buf = Vec::new();
        loop {
            // Read one request head (and a body of content-length bytes).
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let mut lines = head.split("\r\n");
            let first = lines.next().unwrap_or_default().to_string();
            let mut parts = first.split(' ');
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let mut key = None;
            let mut len = 0usize;
            for l in lines {
                if let Some((n, v)) = l.split_once(':') {
                    let n = n.trim().to_ascii_lowercase();
                    if n == "idempotency-key" {
                        key = Some(v.trim().to_string());
                    } else if n == "content-length" {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 4096];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..head_end + len);
            self.log.lock().unwrap().push(Seen { method, path, key });
            let hold = || tokio::time::sleep(Duration::from_secs(30));
            match Phase::from_u8(self.phase.load(Ordering::SeqCst)) {
                Phase::Healthy => {
                    if sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Phase::Token | Phase::TokenShort => {
                    let body = if Phase::from_u8(self.phase.load(Ordering::SeqCst)) == Phase::Token
                    {
                        r#"{"access_token":"tok-1","token_type":"Bearer","expires_in":3600}"#
                    } else {
                        r#"{"access_token":"tok-s","token_type":"Bearer","expires_in":2}"#
                    };
                    let res = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if sock.write_all(res.as_bytes()).await.is_err() {
                        return;
                    }
                }
                Phase::Silent | Phase::ReadNoHead => {
                    hold().await;
                    return;
                }
                Phase::HeadMidBody => {
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nab")
                        .await;
                    let _ = sock.flush().await;
                    hold().await;
                    return;
                }
                Phase::ChunkedStall => {
                    let _ = sock
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n",
                        )
                        .await;
                    let _ = sock.flush().await;
                    hold().await;
                    return;
                }
                Phase::TokenHeadMidBody => {
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 64\r\n\r\n{\"access_token\":\"tok")
                        .await;
                    let _ = sock.flush().await;
                    hold().await;
                    return;
                }
                Phase::TrickleAll => {
                    for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" {
                        if sock.write_all(&[*b]).await.is_err() {
                            return;
                        }
                        let _ = sock.flush().await;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                Phase::TrickleBody => {
                    if sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    for b in b"abcdefghijklmnopqrst" {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if sock.write_all(&[*b]).await.is_err() {
                            return;
                        }
                        let _ = sock.flush().await;
                    }
                }
            }
        }
    }
}

pub(crate) fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

pub(crate) fn post(url: &str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap()
}

/// A seeded xorshift for reproducible "random" moments.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}
