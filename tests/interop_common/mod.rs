//! Shared helpers of the interop tests: the peers' addresses from the environment (set by
//! `scripts/interop.sh`), a hyper-util client that records what the peers answered, and body
//! helpers.
//!
//! A test whose peer is not configured prints a skip line and passes, unless `STURDY_INTEROP=1`
//! is set, in which case a missing peer is a failure.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::core::BoxError;
use tokio::time::Instant;

/// The value of `name`, or `None` after printing a skip line. With `STURDY_INTEROP=1`, a missing
/// value fails the test.
pub fn peer(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            if std::env::var("STURDY_INTEROP").as_deref() == Ok("1") {
                panic!("STURDY_INTEROP=1 but {name} is not set: run scripts/interop.sh");
            }
            eprintln!("skipped: {name} is not set (scripts/interop.sh starts the real peers)");
            None
        }
    }
}

/// Returns from the test when the peer is not configured.
#[macro_export]
macro_rules! peer_or_skip {
    ($name:expr) => {
        match $crate::interop_common::peer($name) {
            Some(v) => v,
            None => return,
        }
    };
}

/// Runs `f` and fails the test if it takes longer than `limit`: nothing may hang.
pub async fn bounded<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after {limit:?}"),
    }
}

/// The plain HTTP/1.1 client the stacks wrap.
pub type Http = HyperClient<HttpConnector, Full<Bytes>>;

/// A hyper-util client for loopback.
pub fn http() -> Http {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    HyperClient::builder(TokioExecutor::new()).build(connector)
}

/// What the peer answered to one request that reached the wire.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: http::Method,
    pub uri: String,
    pub headers: http::HeaderMap,
    /// The status, or the error's text when the exchange failed.
    pub outcome: Result<StatusCode, String>,
    /// How sturdy classifies the error, when the exchange failed.
    pub kind: Option<sturdy::core::ErrorKind>,
    pub sent: Instant,
    pub done: Instant,
}

/// Every request the recorded client sent, in the order they finished.
#[derive(Clone, Debug, Default)]
pub struct Wire(pub Arc<Mutex<Vec<Exchange>>>);

impl Wire {
    pub fn all(&self) -> Vec<Exchange> {
        self.0.lock().unwrap().clone()
    }
    pub fn count_status(&self, status: u16) -> usize {
        self.all()
            .iter()
            .filter(|e| matches!(e.outcome, Ok(s) if s.as_u16() == status))
            .count()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A hyper-util client that records every exchange in `Wire`: the innermost service of a stack,
/// so it sees each attempt as the peer does.
pub fn recorded(
    http: Http,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Incoming>,
            Error = BoxError,
            Future = impl Future<Output = Result<Response<Incoming>, BoxError>> + Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Wire,
) {
    let wire = Wire::default();
    let log = wire.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let http = http.clone();
        let log = log.clone();
        async move {
            let method = req.method().clone();
            let uri = req.uri().to_string();
            let headers = req.headers().clone();
            let sent = Instant::now();
            let res = http.request(req).await;
            let (outcome, kind) = match &res {
                Ok(r) => (Ok(r.status()), None),
                Err(e) => (
                    Err(sturdy::core::classify::describe(e)),
                    Some(sturdy::core::classify::classify_error(e)),
                ),
            };
            log.0.lock().unwrap().push(Exchange {
                method,
                uri,
                headers,
                outcome,
                kind,
                sent,
                done: Instant::now(),
            });
            res.map_err(BoxError::from)
        }
    });
    (svc, wire)
}

/// The whole body of a response, as text.
pub async fn text<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The whole body of a response, as JSON.
pub async fn json<B>(res: Response<B>) -> serde_json::Value
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let t = text(res).await;
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

pub fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

pub fn post(url: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .body(Full::from(body))
        .unwrap()
}

/// GET `url` with a plain client and parse the JSON answer (for the peers' counters).
pub async fn get_json(url: &str) -> serde_json::Value {
    let res = http().request(get(url)).await.unwrap();
    json(res).await
}

/// The error chain as one line, for assertion messages.
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

/// Webhook header values signed by the real sender libraries (interop/sign.js under `dir`, which
/// holds its `node_modules`), one per case of the JSON array `cases`, in order.
pub fn sign(dir: &str, cases: &serde_json::Value) -> Vec<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("node")
        .arg(format!("{dir}/sign.js"))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cases.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sign.js failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON array of header values")
}
