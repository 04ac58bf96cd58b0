//! Helpers of the s43 round (outside tests of docs/guides/auth.md, paginate.md, version.md and
//! agents.md): a scripted in-process token endpoint, an API that counts its calls, a tracing
//! capture, and request builders.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

pub(crate) type Fut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the token endpoint answers to one request.
#[derive(Clone, Debug)]
pub(crate) enum Answer {
    /// A status and a body, at once.
    Now(u16, Bytes),
    /// A status and a body after a delay.
    After(Duration, u16, Bytes),
    /// Never answers.
    Stall,
}

/// A 200 with `{"access_token": token, "token_type": "Bearer", "expires_in": expires}`;
/// `expires` is written into the JSON as it is (so it may be any JSON text, or `None` to leave
/// it out).
pub(crate) fn token_json(token: &str, expires: Option<&str>) -> Answer {
    let body = match expires {
        Some(e) => {
            format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{e}}}"#)
        }
        None => format!(r#"{{"access_token":"{token}","token_type":"Bearer"}}"#),
    };
    Answer::Now(200, Bytes::from(body))
}

pub(crate) fn status_json(status: u16, body: &str) -> Answer {
    Answer::Now(status, Bytes::from(body.to_owned()))
}

/// An in-process token endpoint that answers from a script (then the fallback), counting the
/// requests and keeping their bodies.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) calls: Arc<AtomicUsize>,
    pub(crate) bodies: Arc<Mutex<Vec<String>>>,
    /// The `authorization` header of every request (empty when none).
    pub(crate) auths: Arc<Mutex<Vec<String>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
    fallback: Arc<Mutex<Answer>>,
}

impl Endpoint {
    pub(crate) fn new(fallback: Answer) -> Self {
        Self {
            calls: Arc::default(),
            bodies: Arc::default(),
            auths: Arc::default(),
            script: Arc::default(),
            fallback: Arc::new(Mutex::new(fallback)),
        }
    }

    /// Answers `a` to the next request not yet scripted.
    pub(crate) fn then(&self, a: Answer) -> &Self {
        self.script.lock().unwrap().push_back(a);
        self
    }

    pub(crate) fn set_fallback(&self, a: Answer) {
        *self.fallback.lock().unwrap() = a;
    }

    pub(crate) fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The token client: a `service_fn` over this endpoint.
    pub(crate) fn client(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = Fut<Result<Response<Full<Bytes>>, Infallible>>,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            let fut: Fut<Result<Response<Full<Bytes>>, Infallible>> = Box::pin(async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let answer = {
                    let next = this.script.lock().unwrap().pop_front();
                    next.unwrap_or_else(|| this.fallback.lock().unwrap().clone())
                };
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                this.auths.lock().unwrap().push(auth);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                this.bodies
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                let (status, body) = match answer {
                    Answer::Now(s, b) => (s, b),
                    Answer::After(d, s, b) => {
                        tokio::time::sleep(d).await;
                        (s, b)
                    }
                    Answer::Stall => std::future::pending().await,
                };
                Ok(Response::builder()
                    .status(StatusCode::from_u16(status).unwrap())
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap())
            });
            fut
        })
    }
}

pub(crate) const TOKEN_URL: &str = "https://auth.example.com/oauth/token";

/// The source over `ep` with the id `my-client` and the secret `s3cr3t-Client-Secret`.
pub(crate) fn source(ep: &Endpoint) -> sturdy::auth::ClientCredentials {
    sturdy::auth::ClientCredentials::new(ep.client(), TOKEN_URL, "my-client", SECRET).unwrap()
}

pub(crate) const SECRET: &str = "s3cr3t-Client-Secret";

/// An API that records the authorization header of every call and answers with the statuses
/// of its script (then 200).
#[derive(Clone, Default)]
pub(crate) struct Api {
    pub(crate) seen: Arc<Mutex<Vec<String>>>,
    pub(crate) statuses: Arc<Mutex<VecDeque<u16>>>,
    /// When set, every call answers this status.
    pub(crate) always: Arc<Mutex<Option<u16>>>,
    pub(crate) in_flight: Arc<AtomicUsize>,
    pub(crate) peak: Arc<AtomicUsize>,
    pub(crate) delay: Arc<Mutex<Duration>>,
}

impl Api {
    pub(crate) fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future = Fut<Result<Response<Full<Bytes>>, Infallible>>,
    > + Clone
           + Send
           + Sync
           + 'static {
        let this = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let this = this.clone();
            let fut: Fut<Result<Response<Full<Bytes>>, Infallible>> = Box::pin(async move {
                let now = this.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                this.peak.fetch_max(now, Ordering::SeqCst);
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                this.seen.lock().unwrap().push(auth);
                let delay = *this.delay.lock().unwrap();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let status = match *this.always.lock().unwrap() {
                    Some(s) => s,
                    None => this.statuses.lock().unwrap().pop_front().unwrap_or(200),
                };
                this.in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(Response::builder()
                    .status(status)
                    .header("www-authenticate", r#"Bearer error="invalid_token""#)
                    .body(Full::new(Bytes::from_static(b"{}")))
                    .unwrap())
            });
            fut
        })
    }

    pub(crate) fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

pub(crate) fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

pub(crate) fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri).body(Full::from(body)).unwrap()
}

/// The `sturdy_core::Error` in a boxed error.
pub(crate) fn own(err: &sturdy::core::BoxError) -> &sturdy::core::Error {
    err.downcast_ref::<sturdy::core::Error>()
        .unwrap_or_else(|| panic!("not a sturdy_core::Error: {err:?}"))
}

/// The error and every source, joined.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = format!("{err} / {err:?}");
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(&format!(" <- {e} / {e:?}"));
        cur = e.source();
    }
    out
}

/// Every `tracing` event at any level, as text, for as long as the guard lives (this thread).
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub(crate) fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        crate::logs13_common::set_default(subscriber)
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Standard base64 with padding (RFC 4648), for the expected Basic credentials.
pub(crate) fn base64(input: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
