//! Shared helpers of the outsider tests: a scripted in-process API that records what it saw.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::BoxError;
use tokio::time::Instant;

/// One scripted answer.
#[derive(Clone, Debug)]
pub enum Answer {
    /// A response with status, headers and body.
    Status(u16, Vec<(&'static str, String)>, &'static str),
    /// An io error of this kind (after the request was seen).
    Io(std::io::ErrorKind),
    /// Sleep that long, then answer 200.
    Slow(std::time::Duration),
    /// Never answer.
    Hang,
    /// Sleep that long, then give the inner answer.
    After(std::time::Duration, Box<Self>),
}

pub fn after(d: std::time::Duration, a: Answer) -> Answer {
    Answer::After(d, Box::new(a))
}

pub fn ok() -> Answer {
    Answer::Status(200, vec![], "ok")
}
pub fn status(s: u16) -> Answer {
    Answer::Status(s, vec![], "")
}
pub fn status_h(s: u16, h: &[(&'static str, &str)]) -> Answer {
    Answer::Status(s, h.iter().map(|(k, v)| (*k, v.to_string())).collect(), "")
}

/// What the API saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

/// A scripted API: answers in order, then the fallback forever.
#[derive(Clone, Debug)]
pub struct Api {
    script: Arc<Mutex<VecDeque<Answer>>>,
    fallback: Arc<Mutex<Answer>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Api {
    pub fn new(script: Vec<Answer>, fallback: Answer) -> Self {
        Self {
            script: Arc::new(Mutex::new(script.into())),
            fallback: Arc::new(Mutex::new(fallback)),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }
    pub fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn set_fallback(&self, a: Answer) {
        *self.fallback.lock().unwrap() = a;
    }
    pub fn push(&self, a: Answer) {
        self.script.lock().unwrap().push_back(a);
    }

    /// A tower service over this script.
    pub fn service(
        &self,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + Sync
           + 'static {
        let api = self.clone();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                api.seen.lock().unwrap().push(Seen {
                    method: parts.method.clone(),
                    uri: parts.uri.to_string(),
                    headers: parts.headers.clone(),
                    body,
                    at: Instant::now(),
                });
                let answer = api
                    .script
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or_else(|| api.fallback.lock().unwrap().clone());
                answer_to(answer).await
            }
        })
    }
}

pub fn answer_to(
    answer: Answer,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>,
> {
    Box::pin(answer_inner(answer))
}

async fn answer_inner(answer: Answer) -> Result<Response<Full<Bytes>>, BoxError> {
    match answer {
        Answer::After(d, a) => {
            tokio::time::sleep(d).await;
            answer_to(*a).await
        }
        Answer::Status(s, headers, body) => {
            let mut b = Response::builder().status(StatusCode::from_u16(s).unwrap());
            for (k, v) in headers {
                b = b.header(k, v);
            }
            Ok(b.body(Full::from(body)).unwrap())
        }
        Answer::Io(kind) => {
            Err(Box::new(std::io::Error::new(kind, "scripted io error")) as BoxError)
        }
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            Ok(Response::new(Full::from("slow ok")))
        }
        Answer::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

pub fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}
pub fn post(uri: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(uri).body(Full::from(body)).unwrap()
}

/// Every error's Display along its chain.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push(e.to_string());
        cur = e.source();
    }
    out
}
