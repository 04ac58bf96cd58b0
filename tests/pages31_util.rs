//! Helpers of the `pages31_*` tests: a small hyper server on 127.0.0.1:0 whose answers a test
//! writes as a closure (hostile Link headers, cursors, bodies that stall or fail), a plain
//! hyper-util client, the interop peers' addresses, and a `tracing` capture.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// What one server saw.
#[derive(Clone, Default)]
pub struct Seen {
    /// The path and query of every request, in arrival order.
    pub hits: Arc<Mutex<Vec<String>>>,
    /// Every request's headers, in arrival order.
    pub headers: Arc<Mutex<Vec<http::HeaderMap>>>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
}

impl Seen {
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
    pub fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
    pub fn headers(&self) -> Vec<http::HeaderMap> {
        self.headers.lock().unwrap().clone()
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct OpenGuard(Arc<AtomicUsize>);
impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `f(request, n)` (n: 0 for the first request) on 127.0.0.1:0.
pub async fn serve<F, Fut>(f: F) -> Server
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let f = Arc::new(f);
    let counter = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let f = f.clone();
            let s = s.clone();
            let counter = counter.clone();
            s.open.fetch_add(1, Ordering::SeqCst);
            let guard = OpenGuard(s.open.clone());
            tokio::spawn(async move {
                let _guard = guard;
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let f = f.clone();
                    let s = s.clone();
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default();
                        s.hits.lock().unwrap().push(pq);
                        s.headers.lock().unwrap().push(req.headers().clone());
                        Ok::<_, Infallible>(f(req, n).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(4 * 1024 * 1024)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, seen, task }
}

pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|e| match e {}).boxed()
}

/// A JSON answer with extra headers.
#[allow(clippy::needless_pass_by_value)]
pub fn json_response(body: serde_json::Value, headers: &[(&str, String)]) -> Response<Body> {
    let mut b = Response::builder()
        .status(200)
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(full(body.to_string())).unwrap()
}

pub fn status(code: u16) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(full("{\"error\":\"nope\"}"))
        .unwrap()
}

/// A body that sends `chunks` and then, if `then_fail`, an error; else stalls forever.
pub fn chunked(chunks: Vec<Bytes>, then_fail: bool) -> Body {
    let head = futures_util::stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))));
    if then_fail {
        let tail = futures_util::stream::once(async { Err(std::io::Error::other("cut")) });
        BodyExt::boxed(StreamBody::new(head.chain(tail)))
    } else {
        BodyExt::boxed(StreamBody::new(head.chain(futures_util::stream::pending())))
    }
}

/// The query parameter `name` of a request.
pub fn param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| v.to_owned())
        })
    })
}

pub type Http = HyperClient<HttpConnector, Full<Bytes>>;

pub fn http() -> Http {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    HyperClient::builder(TokioExecutor::new()).build(c)
}

/// The address of an interop peer, or `None` (the test then passes as skipped) unless
/// `STURDY_INTEROP=1`.
pub fn peer(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var("STURDY_INTEROP").as_deref() != Ok("1"),
                "STURDY_INTEROP=1 but {name} is not set"
            );
            eprintln!("skipped: {name} is not set (scripts/interop.sh starts the peers)");
            None
        }
    }
}

pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after {limit:?}"),
    }
}

/// The error and its whole `source()` chain, one line.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(" <- ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// The `sturdy_core::Error` in a boxed error's chain.
pub fn core_err<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a sturdy::core::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(c) = e.downcast_ref::<sturdy::core::Error>() {
            return Some(c);
        }
        cur = e.source();
    }
    None
}

/// A `tracing` writer that keeps everything, for secret checks.
#[derive(Clone, Default)]
pub struct Logs(pub Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// A subscriber at TRACE level writing here; install it with `set_default`.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let me = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || me.clone())
            .finish()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
