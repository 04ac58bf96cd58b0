//! Helpers of the mix32 tests: a scripted hyper server on 127.0.0.1:0 that records every
//! request it gets and answers each from a closure, and small shared settings.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sturdy::retry::{Backoff, RetryLayer};

pub(crate) type RespBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// One request the scripted server got, body read in full.
#[derive(Clone, Debug)]
pub(crate) struct Hit {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) path_and_query: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Hit {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }
}

/// A scripted server: its address and what it got.
#[derive(Clone)]
pub(crate) struct Scripted {
    pub(crate) addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Scripted {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub(crate) fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
    pub(crate) fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
}

pub(crate) fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into())
        .map_err(|e: Infallible| match e {})
        .boxed_unsync()
}

pub(crate) fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<RespBody> {
    let mut b = Response::builder().status(StatusCode::from_u16(status).unwrap());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(full(body)).unwrap()
}

/// Starts a server whose every request is answered by `f(hit, index)`, `index` counting the
/// requests before it (from 0).
pub(crate) async fn scripted<F, Fut>(f: F) -> Scripted
where
    F: Fn(Hit, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<RespBody>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let f = Arc::new(f);
    let h2 = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let f = f.clone();
            let hits = h2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let f = f.clone();
                    let hits = hits.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let hit = Hit {
                            method: parts.method.to_string(),
                            path: parts.uri.path().to_owned(),
                            path_and_query: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.as_str().to_owned())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                        };
                        let index = {
                            let mut h = hits.lock().unwrap();
                            h.push(hit.clone());
                            h.len() - 1
                        };
                        Ok::<_, Infallible>(f(hit, index).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Scripted { addr, hits }
}

pub(crate) fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(32)
}

/// Bounds a real-time wait generously: a hang fails the test instead of the whole run.
pub(crate) async fn within<F: Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("did not finish in time")
}

pub(crate) fn redis_url() -> Option<String> {
    match std::env::var("STURDY_REDIS_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("skipped: STURDY_REDIS_URL is not set");
            None
        }
    }
}

pub(crate) fn unique(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    use sturdy::core::WallClock;
    let t = sturdy::core::SystemClock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("mix32:{what}:{t}:{}", N.fetch_add(1, Ordering::Relaxed))
}
