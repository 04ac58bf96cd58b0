//! Helpers of the outsider4 tests: an in-process API whose answer to each call is chosen by a
//! closure, and which records when each call was sent and what it carried.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::core::BoxError;
use tokio::time::Instant;

pub type Body = Full<Bytes>;
pub type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// How the API answers one call.
#[derive(Clone, Debug)]
pub enum Act {
    /// At once, with this status and headers.
    Status(u16, Vec<(&'static str, String)>),
    /// After this long (measured from the first poll of the call's future).
    After(Duration, u16),
    /// After this long, with this status and headers.
    Late(Duration, u16, Vec<(&'static str, String)>),
    /// Pending at the first poll (waking itself), then at once with this status.
    PendingOnce(u16),
    /// Never.
    Hang,
    /// An io error of this kind, at once.
    Io(std::io::ErrorKind),
}

pub fn st(code: u16) -> Act {
    Act::Status(code, vec![])
}

pub fn st_h(code: u16, h: &[(&'static str, &str)]) -> Act {
    Act::Status(code, h.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
}

pub fn late(d: Duration, code: u16, h: &[(&'static str, &str)]) -> Act {
    Act::Late(
        d,
        code,
        h.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
    )
}

/// One call as the API saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    /// When the service's `call` was made.
    pub sent: Instant,
}

type Script = dyn Fn(usize, &Request<Body>) -> Act + Send + Sync;

/// A scripted API: `script(n, &req)` decides the answer to the n-th call (from 0).
#[derive(Clone)]
pub struct Api {
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Api {
    pub fn new(script: impl Fn(usize, &Request<Body>) -> Act + Send + Sync + 'static) -> Self {
        Self {
            script: Arc::new(script),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn always(act: Act) -> Self {
        Self::new(move |_, _| act.clone())
    }

    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// When the last call to `uri` was sent, if any (without copying the record).
    pub fn last_sent(&self, uri: &str) -> Option<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter().rev().find(|s| s.uri == uri).map(|s| s.sent)
    }

    /// The service (cheap to clone; every clone records into this API).
    pub fn service(
        &self,
    ) -> impl tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = BoxError,
        Future = BoxFut,
    > + Clone
           + Send
           + Sync
           + 'static {
        let api = self.clone();
        tower::service_fn(move |req: Request<Body>| -> BoxFut {
            let n = {
                let mut seen = api.seen.lock().unwrap();
                seen.push(Seen {
                    method: req.method().clone(),
                    uri: req.uri().to_string(),
                    headers: req.headers().clone(),
                    sent: Instant::now(),
                });
                seen.len() - 1
            };
            let act = (api.script)(n, &req);
            Box::pin(async move {
                match act {
                    Act::Status(code, headers) => Ok(response(code, &headers)),
                    Act::After(d, code) => {
                        tokio::time::sleep(d).await;
                        Ok(response(code, &[]))
                    }
                    Act::Late(d, code, headers) => {
                        tokio::time::sleep(d).await;
                        Ok(response(code, &headers))
                    }
                    Act::PendingOnce(code) => {
                        PendingOnce(false).await;
                        Ok(response(code, &[]))
                    }
                    Act::Hang => std::future::pending().await,
                    Act::Io(kind) => {
                        Err(Box::new(std::io::Error::new(kind, "scripted")) as BoxError)
                    }
                }
            })
        })
    }
}

pub fn response(code: u16, headers: &[(&'static str, String)]) -> Response<Body> {
    let mut res = Response::new(Body::default());
    *res.status_mut() = StatusCode::from_u16(code).unwrap();
    for (k, v) in headers {
        res.headers_mut().insert(*k, v.parse().unwrap());
    }
    res
}

/// Pending once (waking itself at once), then ready.
struct PendingOnce(bool);

impl Future for PendingOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::default()).unwrap()
}

pub fn post(uri: &str) -> Request<Body> {
    Request::post(uri)
        .body(Body::from(r#"{"item":"book"}"#))
        .unwrap()
}

/// The `sturdy::core::Error` of a call's error (the outermost one in the chain).
pub fn sturdy_error(err: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .unwrap_or_else(|| panic!("no sturdy::core::Error in the chain of {err}"))
}

/// The whole chain of an error, for messages.
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

/// Bounds a paused-time test: a future that never ends fails the test instead of hanging it.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(3600), f)
        .await
        .expect("the call never ended (an hour of paused time)")
}

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
