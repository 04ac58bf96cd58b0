#![cfg(feature = "full")]
//! Helpers of the s51a round (the numbers and defaults the docs state, and the words of errors):
//! a scripted in-process API that logs when each request came, request builders, and a small
//! real HTTP server on loopback.

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::BoxError;
use tokio::time::Instant;

pub(crate) type Resp = Response<Full<Bytes>>;
type Script = dyn Fn(usize, &http::request::Parts) -> Result<Resp, BoxError> + Send + Sync;

/// An in-process API: answers request `n` (0-based) with `script(n, parts)`, after reading the
/// body; logs the instant of each request (tokio's clock) and its headers.
#[derive(Clone)]
pub(crate) struct Api {
    script: Arc<Script>,
    pub(crate) log: Arc<Mutex<Vec<(Instant, http::request::Parts, Bytes)>>>,
}

impl Api {
    pub(crate) fn new(
        script: impl Fn(usize, &http::request::Parts) -> Result<Resp, BoxError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            script: Arc::new(script),
            log: Arc::default(),
        }
    }

    /// Answers every request with `status` and the given headers.
    pub(crate) fn always(status: u16, headers: &'static [(&'static str, &'static str)]) -> Self {
        Self::new(move |_, _| Ok(resp(status, headers)))
    }

    pub(crate) fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The instants of the requests, as offsets from `start`.
    pub(crate) fn offsets(&self, start: Instant) -> Vec<Duration> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _, _)| t.duration_since(start))
            .collect()
    }

    pub(crate) fn header(&self, i: usize, name: &str) -> Option<String> {
        self.log.lock().unwrap()[i]
            .1
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub(crate) fn service<B>(
        &self,
    ) -> impl tower::Service<
        Request<B>,
        Response = Resp,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let me = self.clone();
        tower::service_fn(move |r: Request<B>| {
            let me = me.clone();
            async move {
                let (parts, body) = r.into_parts();
                let body = body.collect().await.map_err(Into::into)?.to_bytes();
                let n = {
                    let mut log = me.log.lock().unwrap();
                    log.push((Instant::now(), parts.clone(), body));
                    log.len() - 1
                };
                (me.script)(n, &parts)
            }
        })
    }
}

pub(crate) fn resp(status: u16, headers: &[(&str, &str)]) -> Resp {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

pub(crate) fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::new(Bytes::new())).unwrap()
}

pub(crate) fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// The whole `Display` chain of an error, joined by " | ".
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(" | ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// A hyper server on 127.0.0.1:0 that answers each request with `f(n)` (0-based request count).
/// Returns its address.
pub(crate) async fn serve(
    f: impl Fn(usize, Request<hyper::body::Incoming>) -> Resp + Send + Sync + 'static,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let f = Arc::new(f);
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let f = f.clone();
            let n = n.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let r = f(i, req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}
