//! Helpers shared by the `retry28_*` tests: a scripted in-process API that records what it saw.
#![cfg(feature = "full")]
#![allow(dead_code)]

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::BoxError;
use tower::util::BoxCloneSyncService;

pub(crate) type Req = Request<Full<Bytes>>;
pub(crate) type Res = Response<Full<Bytes>>;
pub(crate) type Api = BoxCloneSyncService<Req, Res, BoxError>;

/// One request as the scripted API saw it.
#[derive(Clone, Debug)]
pub(crate) struct SeenReq {
    pub(crate) at: tokio::time::Instant,
    pub(crate) method: Method,
    pub(crate) uri: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Every request the scripted API received, in order.
#[derive(Clone, Default, Debug)]
pub(crate) struct Seen(Arc<Mutex<Vec<SeenReq>>>);

impl Seen {
    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
    pub(crate) fn get(&self, i: usize) -> SeenReq {
        self.0.lock().unwrap()[i].clone()
    }
    pub(crate) fn all(&self) -> Vec<SeenReq> {
        self.0.lock().unwrap().clone()
    }
    /// The time between request `i` and request `i + 1`.
    pub(crate) fn gap(&self, i: usize) -> Duration {
        let v = self.0.lock().unwrap();
        v[i + 1].at - v[i].at
    }
}

/// An API answering request number `n` (from 0) with `f(n, &request)`.
pub(crate) fn api<F>(f: F) -> (Api, Seen)
where
    F: Fn(usize, &SeenReq) -> Result<Res, BoxError> + Send + Sync + 'static,
{
    let seen = Seen::default();
    let log = seen.clone();
    let f = Arc::new(f);
    let svc = tower::service_fn(move |req: Req| {
        let log = log.clone();
        let f = f.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let r = SeenReq {
                at: tokio::time::Instant::now(),
                method: parts.method,
                uri: parts.uri.to_string(),
                headers: parts.headers,
                body,
            };
            let n = {
                let mut v = log.0.lock().unwrap();
                v.push(r.clone());
                v.len() - 1
            };
            f(n, &r)
        }
    });
    (BoxCloneSyncService::new(svc), seen)
}

pub(crate) fn status(code: u16) -> Res {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .body(Full::from("body"))
        .unwrap()
}

pub(crate) fn with_retry_after(code: u16, ra: &str) -> Res {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("retry-after", ra)
        .body(Full::from("body"))
        .unwrap()
}

pub(crate) fn reset() -> BoxError {
    Box::new(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "Connection reset by peer (os error 104)",
    ))
}

pub(crate) fn refused() -> BoxError {
    Box::new(io::Error::new(
        io::ErrorKind::ConnectionRefused,
        "Connection refused (os error 111)",
    ))
}

pub(crate) fn get(url: &str) -> Req {
    Request::get(url).body(Full::default()).unwrap()
}

pub(crate) fn post(url: &str, body: &'static str) -> Req {
    Request::post(url).body(Full::from(body)).unwrap()
}

pub(crate) fn req(method: &str, url: &str) -> Req {
    Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url)
        .body(Full::from("x"))
        .unwrap()
}

/// The `sturdy::core::Error` at the top of a call's error.
pub(crate) fn top(err: &BoxError) -> &sturdy::core::Error {
    err.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy Error: {err:?}"))
}
