//! A scripted HTTP/1.1 server on loopback (hyper), a TLS variant with rcgen certificates, and
//! the reqwest-middleware clients the `client31_*` tests put in front of it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use sturdy_reqwest::SturdyMiddleware;

/// What the server does with one request.
#[derive(Clone, Debug)]
pub(crate) enum Act {
    /// A status with headers and an empty body.
    Answer(u16, Vec<(&'static str, String)>),
    /// Closes the connection without answering (after reading the request).
    Close,
    /// Never answers.
    Stall,
}

pub(crate) fn ok() -> Act {
    Act::Answer(200, vec![])
}

pub(crate) fn status(code: u16) -> Act {
    Act::Answer(code, vec![])
}

pub(crate) fn with_ra(code: u16, retry_after: &str) -> Act {
    Act::Answer(code, vec![("retry-after", retry_after.to_owned())])
}

/// One request the server read in full.
#[derive(Clone, Debug)]
pub(crate) struct Got {
    pub(crate) method: String,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) at: Instant,
}

pub(crate) struct Srv {
    pub(crate) addr: SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    pub(crate) conns: Arc<AtomicUsize>,
}

impl Srv {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub(crate) fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }
    pub(crate) fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
    pub(crate) fn header_values(&self, name: &str) -> Vec<String> {
        self.got()
            .iter()
            .filter_map(|g| {
                g.headers
                    .get(name)
                    .map(|v| v.to_str().unwrap_or("").to_owned())
            })
            .collect()
    }
}

type HandlerErr = Box<dyn std::error::Error + Send + Sync>;

async fn handle(
    req: http::Request<Incoming>,
    script: Arc<Vec<Act>>,
    got: Arc<Mutex<Vec<Got>>>,
) -> Result<http::Response<Full<Bytes>>, HandlerErr> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let n = {
        let mut g = got.lock().unwrap();
        g.push(Got {
            method: parts.method.to_string(),
            headers: parts.headers.clone(),
            body,
            at: Instant::now(),
        });
        g.len() - 1
    };
    let act = script.get(n).or(script.last()).cloned().unwrap_or_else(ok);
    match act {
        Act::Answer(code, headers) => {
            let mut res = http::Response::new(Full::new(Bytes::from_static(b"{}")));
            *res.status_mut() = http::StatusCode::from_u16(code).unwrap();
            for (k, v) in headers {
                res.headers_mut().insert(k, v.parse().unwrap());
            }
            Ok(res)
        }
        Act::Close => Err("closed on purpose".into()),
        Act::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Err("stalled".into())
        }
    }
}

/// A plain HTTP server answering request `i` with `script[i]` (the last entry afterwards).
pub(crate) async fn serve(script: Vec<Act>) -> Srv {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let (g, c) = (got.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (script, got) = (script.clone(), g.clone());
            let svc =
                hyper::service::service_fn(move |req| handle(req, script.clone(), got.clone()));
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    Srv { addr, got, conns }
}

/// A retry layer with millisecond backoff and a fixed seed.
pub(crate) fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20))
                .unwrap(),
        )
        .with_seed(31)
}

/// reqwest-middleware with a `ClientBuilder` stack (idempotency keys on or off).
pub(crate) fn mw_with(retry: RetryLayer, keys: bool) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            let b = ClientBuilder::new().with_retry(retry);
            if keys {
                b.build(next)
            } else {
                b.without_idempotency().build(next)
            }
        }))
        .build()
}

pub(crate) fn mw(keys: bool) -> reqwest_middleware::ClientWithMiddleware {
    mw_with(quick_retry(), keys)
}

/// Fails the test instead of hanging it.
pub(crate) async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("the call did not end in time")
}

/// A TLS server on 127.0.0.1 with the given certificate; counts TCP connections accepted.
pub(crate) async fn serve_tls(
    cert: rcgen::Certificate,
    key: &rcgen::KeyPair,
) -> (SocketAddr, Arc<AtomicUsize>) {
    use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use sturdy::tls::rustls::{self, ServerConfig};
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let hello = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hello)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// A self-signed certificate for `names`, valid now, or expired in 2001 when `expired`.
pub(crate) fn self_signed(names: &[&str], expired: bool) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    (params.self_signed(&key).unwrap(), key)
}
