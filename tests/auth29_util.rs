//! Helpers for the auth29 tests of auth, circuit breaking and version pinning: in-process and
//! loopback token endpoints and APIs, and a capture of every `tracing` line.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::ClientCredentials;
use sturdy::core::BoxError;
use tower::util::BoxCloneSyncService;

pub(crate) type Req = Request<Full<Bytes>>;
pub(crate) type Res = Response<Full<Bytes>>;
pub(crate) type Svc = BoxCloneSyncService<Req, Res, BoxError>;

pub(crate) const TOKEN_URL: &str = "https://auth.example.com/oauth/token";
pub(crate) const SECRET: &str = "cs-SUPERSECRET-91x";

/// What a token endpoint or an API saw.
#[derive(Clone, Default)]
pub(crate) struct Seen {
    calls: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<String>>>,
    headers: Arc<Mutex<Vec<HeaderMap>>>,
    uris: Arc<Mutex<Vec<String>>>,
    times: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl Seen {
    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    pub(crate) fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
    pub(crate) fn headers(&self) -> Vec<HeaderMap> {
        self.headers.lock().unwrap().clone()
    }
    pub(crate) fn uris(&self) -> Vec<String> {
        self.uris.lock().unwrap().clone()
    }
    pub(crate) fn times(&self) -> Vec<tokio::time::Instant> {
        self.times.lock().unwrap().clone()
    }
    pub(crate) fn auths(&self) -> Vec<String> {
        self.headers()
            .iter()
            .map(|h| {
                h.get("authorization")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default()
            })
            .collect()
    }
    /// Records a request; returns its number, from 1.
    async fn record(&self, req: Req) -> usize {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.bodies
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&bytes).into_owned());
        self.headers.lock().unwrap().push(parts.headers);
        self.uris.lock().unwrap().push(parts.uri.to_string());
        self.times.lock().unwrap().push(tokio::time::Instant::now());
        self.calls.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// One answer of an in-process peer.
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: String,
    pub(crate) delay: Option<Duration>,
    pub(crate) headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub(crate) fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            delay: None,
            headers: Vec::new(),
        }
    }
    pub(crate) fn after(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    /// Never answers.
    pub(crate) fn never() -> Self {
        Self::new(200, "").after(Duration::from_secs(100 * 365 * 86_400))
    }
}

/// A token response with `expires_in` as given (raw JSON text), or without it.
pub(crate) fn token_body(token: &str, expires_in: Option<&str>) -> String {
    match expires_in {
        Some(e) => {
            format!(r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{e}}}"#)
        }
        None => format!(r#"{{"access_token":"{token}","token_type":"Bearer"}}"#),
    }
}

/// `t-<n>` valid for `secs`.
pub(crate) fn tok(n: usize, secs: i64) -> Reply {
    Reply::new(200, token_body(&format!("t-{n}"), Some(&secs.to_string())))
}

/// An in-process peer that answers call `n` (from 1) with `f(n, &request headers)`.
pub(crate) fn peer(
    seen: &Seen,
    f: impl Fn(usize, &HeaderMap) -> Reply + Send + Sync + 'static,
) -> Svc {
    let seen = seen.clone();
    let f = Arc::new(f);
    BoxCloneSyncService::new(tower::service_fn(move |req: Req| {
        let seen = seen.clone();
        let f = f.clone();
        async move {
            let headers = req.headers().clone();
            let n = seen.record(req).await;
            let reply = f(n, &headers);
            if let Some(d) = reply.delay {
                tokio::time::sleep(d).await;
            }
            let mut res = Response::builder().status(StatusCode::from_u16(reply.status).unwrap());
            for (k, v) in reply.headers {
                res = res.header(k, v);
            }
            Ok::<_, BoxError>(res.body(Full::from(reply.body)).unwrap())
        }
    }))
}

/// A token endpoint answering call `n` with `f(n)`.
pub(crate) fn endpoint(seen: &Seen, f: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Svc {
    peer(seen, move |n, _| f(n))
}

/// Client credentials for `my-client` / [`SECRET`] at [`TOKEN_URL`] through `client`.
pub(crate) fn creds(client: Svc) -> ClientCredentials {
    ClientCredentials::new(client, TOKEN_URL, "my-client", SECRET).unwrap()
}

/// An API answering 200 to `Bearer ok-token`s as `f` says, recording what it saw.
pub(crate) fn api(seen: &Seen, f: impl Fn(usize, &str) -> u16 + Send + Sync + 'static) -> Svc {
    peer(seen, move |n, h| {
        let auth = h
            .get("authorization")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        Reply::new(f(n, &auth), format!("answer {n}"))
    })
}

/// A `GET` to the API host.
pub(crate) fn get(path: &str) -> Req {
    Request::get(format!("http://api.example.com{path}"))
        .body(Full::default())
        .unwrap()
}

/// The error as a `sturdy_core::Error`, or a panic naming what it was.
pub(crate) fn sturdy_err(err: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**err)
        .unwrap_or_else(|| panic!("not a sturdy error: {err:?} / {err}"))
}

/// Every `tracing` line written while the guard lives (this thread only; use a current-thread
/// runtime so the tasks the layers spawn run here too).
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    pub(crate) fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || logs.clone())
            .finish();
        crate::logs13_common::set_default(sub)
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

/// What a loopback server answers: status, headers and body chunks with pauses.
pub(crate) type Handler =
    Arc<dyn Fn(usize, http::request::Parts, Bytes) -> WireReply + Send + Sync + 'static>;

/// One answer on the wire.
pub(crate) struct WireReply {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    /// The body: chunks, each sent after its pause. A pause of `None` stalls forever.
    pub(crate) chunks: Vec<(Option<Duration>, Bytes)>,
}

impl WireReply {
    pub(crate) fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            chunks: vec![(Some(Duration::ZERO), body.into())],
        }
    }
}

/// A real HTTP/1 server on 127.0.0.1 port 0; returns its address and what it saw.
pub(crate) async fn serve(seen: Seen, handler: Handler) -> SocketAddr {
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let handler = handler.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let (parts, body) = req.into_parts();
                            let bytes = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let n = seen
                                .record(Request::from_parts(
                                    parts.clone(),
                                    Full::new(bytes.clone()),
                                ))
                                .await;
                            let reply = handler(n, parts, bytes);
                            let (tx, rx) = tokio::sync::mpsc::channel::<
                                Result<Frame<Bytes>, std::io::Error>,
                            >(4);
                            tokio::spawn(async move {
                                for (pause, chunk) in reply.chunks {
                                    match pause {
                                        Some(p) => tokio::time::sleep(p).await,
                                        None => std::future::pending::<()>().await,
                                    }
                                    if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                                        return;
                                    }
                                }
                            });
                            let body = http_body_util::StreamBody::new(
                                futures_util::stream::unfold(rx, |mut rx| async move {
                                    rx.recv().await.map(|item| (item, rx))
                                }),
                            );
                            let mut res = Response::builder().status(reply.status);
                            for (k, v) in reply.headers {
                                res = res.header(k, v);
                            }
                            Ok::<_, std::convert::Infallible>(res.body(body).unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A hyper-util client for loopback, with bodies of `Full<Bytes>`.
pub(crate) fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// `svc.oneshot(req)` as a boxed, sendable future of the status or the error's text, for
/// `tokio::spawn`.
pub(crate) fn spawn_call<S, R, B>(svc: S, req: R) -> tokio::task::JoinHandle<Result<u16, String>>
where
    R: Send + 'static,
    S: tower::Service<R, Response = Response<B>> + Send + 'static,
    S::Future: Send,
    S::Error: std::fmt::Display,
    B: Send + 'static,
{
    use tower::ServiceExt;
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = Result<u16, String>> + Send>> =
        Box::pin(async move {
            svc.oneshot(req)
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        });
    tokio::spawn(fut)
}

/// Polls `fut` once.
pub(crate) async fn poll_once<F: std::future::Future + Unpin>(
    fut: &mut F,
) -> std::task::Poll<F::Output> {
    std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *fut).poll(cx))).await
}
