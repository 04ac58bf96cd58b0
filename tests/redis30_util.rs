//! Helpers of the redis30 tests: where Redis is, a Redis server of a test's own (to kill, pause
//! or restart), a TCP proxy that cuts a connection after a command went through, axum apps
//! served on 127.0.0.1:0 and a hyper-util client.
#![cfg(feature = "full")]
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::idempotency::server::LockToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The shared Redis, or `None` (the test is skipped).
pub(crate) fn redis_url() -> Option<String> {
    let u = std::env::var("STURDY_REDIS_URL").ok();
    if u.is_none() {
        eprintln!("STURDY_REDIS_URL not set: skipped");
    }
    u
}

/// The shared Redis Cluster's nodes, or `None` (the test is skipped).
pub(crate) fn cluster_urls() -> Option<Vec<String>> {
    let u = std::env::var("STURDY_REDIS_CLUSTER_URLS").ok();
    if u.is_none() {
        eprintln!("STURDY_REDIS_CLUSTER_URLS not set: skipped");
    }
    u.map(|s| s.split(',').map(str::to_owned).collect())
}

/// Whether a test may start a Redis server of its own.
pub(crate) fn own_redis_possible() -> bool {
    let on_path = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !on_path {
        eprintln!("redis-server not on PATH: skipped");
        return false;
    }
    if std::env::var("STURDY_REDIS_URL").is_err() {
        eprintln!("STURDY_REDIS_URL not set: skipped");
        return false;
    }
    true
}

/// A name no other test (or run) uses.
pub(crate) fn unique(what: &str) -> String {
    format!("redis30:{what}:{}", LockToken::random())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis server of this test's own on a free loopback port, without persistence; killed when
/// dropped.
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    pub(crate) async fn start() -> Self {
        let mut me = Self {
            port: free_port(),
            child: None,
        };
        me.launch().await;
        me
    }

    async fn launch(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        for _ in 0..250 {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("own redis-server did not start");
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL, and wait for the process to be gone.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: no persistence).
    pub(crate) async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// A command through `redis-cli`; its output.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        cli_at(self.port, args)
    }

    /// `CLIENT PAUSE ms ALL`: every client is held (a hung Redis) for `ms`.
    pub(crate) fn pause(&self, ms: u64) {
        let out = self.cli(&["CLIENT", "PAUSE", &ms.to_string(), "ALL"]);
        assert_eq!(out.trim(), "OK", "{out}");
    }

    pub(crate) fn unpause(&self) {
        let _ = self.cli(&["CLIENT", "UNPAUSE"]);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command through `redis-cli` against the Redis on 127.0.0.1:`port`.
pub(crate) fn cli_at(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => format!("redis-cli failed: {e}"),
    }
}

/// The port of a `redis://127.0.0.1:port/` URL.
pub(crate) fn port_of(url: &str) -> u16 {
    url.trim_start_matches("redis://")
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// What the proxy does with what it is given.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// Forwards both ways.
    Pass,
    /// Forwards the client's next bytes to Redis, then closes both sides before any answer: a
    /// connection that broke after its command was sent.
    Cut,
}

/// A TCP proxy in front of Redis.
pub(crate) struct CutProxy {
    pub(crate) addr: SocketAddr,
    mode: watch::Sender<Mode>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CutProxy {
    pub(crate) async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, rx) = watch::channel(Mode::Pass);
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let t2 = tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let rx = rx.clone();
                let h = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    pump(client, server, rx).await;
                });
                t2.lock().unwrap().push(h);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self { addr, mode, tasks }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    pub(crate) fn set(&self, m: Mode) {
        self.mode.send_replace(m);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

async fn pump(mut client: TcpStream, mut server: TcpStream, mode: watch::Receiver<Mode>) {
    let mut a = vec![0u8; 64 * 1024];
    let mut b = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            n = client.read(&mut a) => {
                let Ok(n) = n else { return };
                if n == 0 || server.write_all(&a[..n]).await.is_err() {
                    return;
                }
                if *mode.borrow() == Mode::Cut {
                    // Let Redis run it, then break the connection before its answer.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    return;
                }
            }
            n = server.read(&mut b) => {
                let Ok(n) = n else { return };
                if n == 0 || *mode.borrow() == Mode::Cut {
                    return;
                }
                if client.write_all(&b[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Serves `app` on 127.0.0.1:0; its address.
pub(crate) async fn serve(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

pub(crate) type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub(crate) fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// A POST over the wire; status, headers and the whole body.
pub(crate) async fn post(
    c: &Client,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let mut b = Request::post(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// The `type` of a problem JSON body ("" when there is none).
pub(crate) fn problem_type(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// Every message of an error and its sources, joined by " | ".
pub(crate) fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(" | ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The `sturdy_core::Error` kind of `e`, if it is one (or wraps one).
pub(crate) fn kind_of(e: &(dyn std::error::Error + 'static)) -> Option<sturdy::core::ErrorKind> {
    sturdy::core::find::<sturdy::core::Error>(e).map(|e| e.kind().clone())
}
