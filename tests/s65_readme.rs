#![cfg(feature = "full")]
//! s65: the README, docs/guides/tls.md, docs/guides/reqwest.md, docs/guides/demo.md and the
//! `sturdy-chaos` crate's public API, read literally, against real servers on 127.0.0.1:0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::tls::{https_client_with_roots, CertificateDer};
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs, RetryAfterForm, ServerRateLimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

const BOUND: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("bounded wait ran out")
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(65)
}

fn get(url: String) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

fn post(url: String, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn sturdy_err(e: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**e).expect("a sturdy error in the chain")
}

// ---------------------------------------------------------------------------------------------
// Raw servers
// ---------------------------------------------------------------------------------------------

/// Reads a request head, then resets the connection (RST). Counts connections.
async fn resetter() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    (addr, n)
}

/// Answers every request with a fixed raw HTTP/1.1 response. Counts requests.
async fn raw_answer(resp: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let n3 = n2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                    if let Some(p) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..p + 4);
                        n3.fetch_add(1, Ordering::SeqCst);
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, n)
}

async fn serve_axum(app: axum::Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

// ---------------------------------------------------------------------------------------------
// README
// ---------------------------------------------------------------------------------------------

/// README: "The client is `Clone + Send + Sync`"; the reqwest pieces and the TLS client too.
#[test]
fn s65_readme_composed_clients_are_clone_send_sync() {
    fn check<T: Clone + Send + Sync + 'static>(_: &T) {}
    fn check_ty<T: Clone + Send + Sync + 'static>() {}
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = ClientBuilder::new().build(sturdy_chaos::http_client());
        check(&c);
        let t = ClientBuilder::new().build(sturdy::tls::https_client());
        check(&t);
        let r = ClientBuilder::new()
            .build(sturdy::reqwest::ReqwestService::new(reqwest::Client::new()));
        check(&r);
    });
    check_ty::<sturdy::tls::HttpsClient>();
    check_ty::<sturdy::reqwest::ReqwestService>();
    check_ty::<reqwest_middleware::ClientWithMiddleware>();
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<sturdy::reqwest::SturdyMiddleware>();
}

/// README quick start, run against the chaos server instead of example.com: OAuth2 client
/// credentials over `https_client()` (which "sends plain http:// requests too"), a pinned version,
/// a 503 ridden out under one idempotency key; the token is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_readme_quick_start_against_chaos() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        api_version: Some("2024-06-01".into()),
        idempotency: true,
        fail_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = sturdy::tls::https_client();
    let tokens = sturdy::auth::ClientCredentials::new(
        http.clone(),
        &server.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap()
    .with_scopes(["orders:write"]);
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_deadline(Duration::from_secs(30)))
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .with_version(sturdy::version::VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(http);
    let res = within(
        client
            .clone()
            .oneshot(post(server.url("/orders"), r#"{"item":"book"}"#)),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let res2 = within(client.oneshot(post(server.url("/orders"), r#"{"item":"pen"}"#)))
        .await
        .unwrap();
    assert_eq!(res2.status(), 201);
    let st = server.stats();
    assert_eq!(st.orders_committed, 2);
    assert_eq!(st.server_errors, 1);
    assert_eq!(st.token_requests, 1, "the token is fetched once");
    assert_eq!(st.duplicates_by_payload, 0);
}

/// README: "`gave up after 4 attempts: connection reset by peer`".
#[tokio::test]
async fn s65_readme_gave_up_after_four_resets_says_so() {
    let (addr, conns) = resetter().await;
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(sturdy_chaos::http_client());
    let err = within(c.oneshot(get(format!("http://{addr}/x"))))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection reset by peer"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 4);
    let e = sturdy_err(&err);
    assert_eq!(e.report().unwrap().attempts(), 4);
}

/// README: for a POST "`...; it may have been processed: retry with the same idempotency key
/// 7f0c...`", and the report carries the key the server saw.
#[tokio::test]
async fn s65_readme_post_reset_names_the_key_the_server_saw() {
    let keys = Arc::new(Mutex::new(Vec::<String>::new()));
    let k2 = keys.clone();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let k3 = k2.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => seen.extend_from_slice(&buf[..k]),
                    }
                }
                let text = String::from_utf8_lossy(&seen).to_string();
                for line in text.lines() {
                    if let Some(v) = line
                        .to_ascii_lowercase()
                        .strip_prefix("idempotency-key:")
                        .map(|v| v.trim().to_owned())
                    {
                        let orig = line[line.len() - v.len()..].to_owned();
                        k3.lock().unwrap().push(orig);
                    }
                }
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(sturdy_chaos::http_client());
    let err = within(c.oneshot(post(format!("http://{addr}/orders"), "{}")))
        .await
        .unwrap_err();
    let seen = keys.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "four attempts, each with a key: {seen:?}");
    assert!(seen.iter().all(|k| k == &seen[0]), "one key: {seen:?}");
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!(
            "gave up after 4 attempts: connection reset by peer; it may have been processed: retry with the same idempotency key {}",
            seen[0]
        )
    );
    let e = sturdy_err(&err);
    assert_eq!(
        e.report().unwrap().idempotency_key(),
        Some(seen[0].as_str())
    );
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed
    );
}

/// README: "no retried POST without an idempotency key"; a 503 "after the last attempt, comes
/// back as the response itself".
#[tokio::test]
async fn s65_readme_post_without_key_is_sent_once_and_503_is_the_response() {
    let (addr, n) =
        raw_answer("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .without_idempotency()
        .build(sturdy_chaos::http_client());
    let res = within(
        c.clone()
            .oneshot(post(format!("http://{addr}/orders"), "{}")),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(
        n.load(Ordering::SeqCst),
        1,
        "a POST without a key is sent once"
    );
    // A GET is retried, and the last 503 is the response.
    let res = within(c.oneshot(get(format!("http://{addr}/orders"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(n.load(Ordering::SeqCst), 5, "1 + 4 attempts");
}

/// README: "the client ... can sit under a `Buffer` or over a `ConcurrencyLimit`, driven by
/// `oneshot` or a kept `ready().await?.call(req)`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_readme_client_under_buffer_over_concurrency_limit_kept_service() {
    let server = ChaosServer::start(Knobs {
        idempotency: true,
        fail_next: 3,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let http = tower::ServiceBuilder::new()
        .concurrency_limit(1)
        .service(sturdy_chaos::http_client());
    let client = ClientBuilder::new().with_retry(quick_retry()).build(http);
    let buffered = tower::buffer::Buffer::new(client, 1);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut svc = buffered.clone();
        let url = server.url("/orders");
        tasks.push(tokio::spawn(async move {
            let body = Full::new(Bytes::from(format!(r#"{{"item":"n{i}"}}"#)));
            let req = http::Request::post(url)
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            res.status()
        }));
    }
    for t in tasks {
        assert_eq!(within(t).await.unwrap(), 201);
    }
    assert_eq!(server.stats().orders_committed, 8);
}

/// README: `.sturdy_retry(..)` with `sturdy::ServiceBuilderExt` exists and retries.
#[tokio::test]
async fn s65_readme_service_builder_ext_sturdy_retry() {
    use sturdy::ServiceBuilderExt;
    let (addr, n) =
        raw_answer("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
    let svc = tower::ServiceBuilder::new()
        .sturdy_retry(quick_retry())
        .service(sturdy_chaos::http_client());
    let res = within(svc.oneshot(get(format!("http://{addr}/"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(n.load(Ordering::SeqCst), 4);
}

/// README: "A call returns when the response's head arrives: the attempt timeout and the deadline
/// bound the attempts up to it, not the reading of the body".
#[tokio::test]
async fn s65_readme_head_returns_body_is_the_callers_to_bound() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            });
        }
    });
    let c = ClientBuilder::new()
        .with_retry(quick_retry().with_deadline(Duration::from_millis(200)))
        .with_attempt_timeout(Duration::from_millis(100))
        .build(sturdy_chaos::http_client());
    let res = within(c.oneshot(get(format!("http://{addr}/"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let read = tokio::time::timeout(Duration::from_millis(400), res.into_body().collect()).await;
    assert!(read.is_err(), "the body read is the caller's to bound");
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn self_signed(names: &[&str]) -> (rcgen::CertifiedKey<rcgen::KeyPair>, Arc<ServerConfig>) {
    let cert = rcgen::generate_simple_self_signed(
        names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    (cert, Arc::new(config))
}

struct TlsSrv {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    reqs: Arc<AtomicUsize>,
    alpn: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

/// A hyper HTTP/1 server behind tokio-rustls; counts TCP connections, requests and the ALPN
/// protocol each handshake chose.
async fn serve_tls(config: Arc<ServerConfig>) -> TlsSrv {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let reqs = Arc::new(AtomicUsize::new(0));
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let (c2, r2, a2) = (conns.clone(), reqs.clone(), alpn.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let r3 = r2.clone();
            let a3 = a2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let proto = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                a3.lock().unwrap().push(proto);
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        r3.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let path = req.uri().path().to_owned();
                            if path == "/oauth/token" {
                                let body = r#"{"access_token":"tok","token_type":"Bearer","expires_in":3600}"#;
                                return Ok::<_, Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "application/json")
                                        .body(Full::new(Bytes::from_static(body.as_bytes())))
                                        .unwrap(),
                                );
                            }
                            Ok(http::Response::new(Full::new(Bytes::from("hello"))))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    TlsSrv {
        addr,
        conns,
        reqs,
        alpn,
    }
}

/// tls.md, the guide's own example: a self-signed certificate for 127.0.0.1 through the stack.
#[tokio::test]
async fn s65_tls_guide_self_signed_example() {
    use sturdy::tls::rustls::pki_types::pem::PemObject;
    let (cert, config) = self_signed(&["127.0.0.1"]);
    let srv = serve_tls(config).await;
    let pem = cert.cert.pem();
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let client = ClientBuilder::new().build(https_client_with_roots(roots).unwrap());
    let res = within(client.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    assert_eq!(
        srv.alpn.lock().unwrap().clone(),
        vec![None],
        "a server with no ALPN list"
    );
}

/// tls.md: "clones share one connection pool: make one, clone it for `ClientBuilder::build` and
/// for `ClientCredentials::new`". The token request and the API calls then share a connection.
#[tokio::test]
async fn s65_tls_clones_share_one_pool_token_and_api() {
    let (cert, config) = self_signed(&["127.0.0.1"]);
    let srv = serve_tls(config).await;
    let http = https_client_with_roots([cert.cert.der().clone()]).unwrap();
    let tokens = sturdy::auth::ClientCredentials::new(
        http.clone(),
        &format!("https://{}/oauth/token", srv.addr),
        "id",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(http.clone());
    for _ in 0..3 {
        let res = within(
            client
                .clone()
                .oneshot(get(format!("https://{}/a", srv.addr))),
        )
        .await
        .unwrap();
        let _ = res.into_body().collect().await.unwrap();
    }
    // A plain clone of the raw client too.
    let res = within(http.clone().request(get(format!("https://{}/b", srv.addr))))
        .await
        .unwrap();
    let _ = res.into_body().collect().await.unwrap();
    assert_eq!(
        srv.reqs.load(Ordering::SeqCst),
        5,
        "1 token + 4 API requests"
    );
    assert_eq!(
        srv.conns.load(Ordering::SeqCst),
        1,
        "clones share one pool: one TLS connection for all"
    );
}

/// tls.md: "HTTP/1.1 (ALPN `http/1.1`)": a server offering h2 and http/1.1 negotiates http/1.1;
/// `https_client_with_config`'s "ALPN list is replaced by `http/1.1`".
#[tokio::test]
async fn s65_tls_alpn_is_http11_even_when_config_asks_h2() {
    let (cert, config) = self_signed(&["127.0.0.1"]);
    let mut config = Arc::try_unwrap(config).ok().unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let srv = serve_tls(Arc::new(config)).await;
    // Default constructor.
    let c = https_client_with_roots([cert.cert.der().clone()]).unwrap();
    let res = within(c.request(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.version(), http::Version::HTTP_11);
    // with_config, asking for h2 only.
    let mut roots = sturdy::tls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut cc = sturdy::tls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"h2".to_vec()];
    let c = sturdy::tls::https_client_with_config(cc);
    let res = within(c.request(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.version(), http::Version::HTTP_11);
    assert_eq!(
        srv.alpn.lock().unwrap().clone(),
        vec![Some(b"http/1.1".to_vec()), Some(b"http/1.1".to_vec())]
    );
}

/// tls.md: "other handshake failures (an alert ...) stay `ErrorKind::Connect` and are retried",
/// not sent. A server that speaks only h2 refuses the client's `http/1.1` with an alert.
#[tokio::test]
async fn s65_tls_h2_only_server_alert_is_connect_not_sent_retried() {
    let (cert, config) = self_signed(&["127.0.0.1"]);
    let mut config = Arc::try_unwrap(config).ok().unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let srv = serve_tls(Arc::new(config)).await;
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots([cert.cert.der().clone()]).unwrap());
    let err = within(c.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap_err();
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Connect, "{err}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::NotSent,
        "{err}"
    );
    assert_eq!(e.report().unwrap().attempts(), 4, "{err}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 4);
    assert_eq!(srv.reqs.load(Ordering::SeqCst), 0);
    assert!(
        err.to_string().starts_with("gave up after 4 attempts: "),
        "{err}"
    );
}

/// tls.md: a certificate for another name reads exactly as the table says, through the whole
/// stack, once, not retried.
#[tokio::test]
async fn s65_tls_wrong_name_table_wording() {
    let (cert, config) = self_signed(&["api.example.com"]);
    let srv = serve_tls(config).await;
    let c = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots([cert.cert.der().clone()]).unwrap());
    let err = within(c.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap_err();
    assert_eq!(
        sturdy::core::classify::describe(&*err),
        r#"TLS handshake failed (invalid peer certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for DnsName("api.example.com"))"#
    );
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls);
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1, "not retried");
}

/// tls.md: `webpki_roots()` "returns the Mozilla set as a `RootCertStore` to add to"; a client
/// built from it plus a private root via `https_client_with_config` reaches the private server.
#[tokio::test]
async fn s65_tls_webpki_roots_plus_private_root_with_config() {
    let mut roots = sturdy::tls::webpki_roots();
    assert!(roots.len() > 50, "the Mozilla set: {}", roots.len());
    let (cert, config) = self_signed(&["127.0.0.1"]);
    let srv = serve_tls(config).await;
    roots.add(cert.cert.der().clone()).unwrap();
    let cc = sturdy::tls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let c = ClientBuilder::new().build(sturdy::tls::https_client_with_config(cc));
    let res = within(c.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// tls.md: `https_client_with_roots(extra)` fails with "a `Config` error naming a certificate that
/// is not valid X.509": with a good one first, the second (bad) one is the one named.
#[test]
fn s65_tls_bad_extra_root_error_names_which() {
    let (cert, _) = self_signed(&["127.0.0.1"]);
    let bad = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let err = https_client_with_roots([cert.cert.der().clone(), bad]).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("certificate #2"),
        "names the bad certificate: {msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// reqwest
// ---------------------------------------------------------------------------------------------

fn mw_client(
    reqwest: reqwest::Client,
    retry: RetryLayer,
) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest)
        .with(sturdy::reqwest::SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .build()
}

/// reqwest.md, first example, with the hidden lines: two 503s then the order, one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_reqwest_guide_middleware_example() {
    let server = ChaosServer::start(Knobs {
        fail_next: 2,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = server.url("");
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let res = within(
        client
            .post(format!("{base}/orders"))
            .json(&serde_json::json!({"item": "book"}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.url().path(), "/orders");
    assert_eq!(res.remote_addr(), Some(server.addr()));
    assert_eq!(server.stats().orders_committed, 1);
    assert_eq!(server.stats().server_errors, 2);
}

/// reqwest.md, second example: the refused port, its text, kind, attempts, delivery and the
/// reqwest error in the chain.
#[tokio::test]
async fn s65_reqwest_guide_refused_example() {
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = within(client.get(format!("http://127.0.0.1:{port}/orders")).send())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Connect);
    assert_eq!(e.report().unwrap().attempts(), 4);
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::MaybeProcessed);
    assert!(sturdy::reqwest::find::<reqwest::Error>(&err)
        .unwrap()
        .is_connect());
}

/// reqwest.md: "A POST ... does not resend a POST or PATCH that has no key" after a reqwest
/// connect error; with `ClientBuilder`'s key it is retried.
#[tokio::test]
async fn s65_reqwest_refused_post_without_key_sent_once() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let retry = quick_retry();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy::reqwest::SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(retry)
                .without_idempotency()
                .build(next)
        }))
        .build();
    let err = within(
        client
            .post(format!("http://127.0.0.1:{port}/orders"))
            .body("{}")
            .send(),
    )
    .await
    .unwrap_err();
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.report().unwrap().attempts(), 1, "{err}");
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::MaybeProcessed);
}

/// reqwest.md: "`.timeout()` bounds each attempt ... `gave up after 4 attempts: timed out
/// (reqwest's timeout)`".
#[tokio::test]
async fn s65_reqwest_request_timeout_bounds_each_attempt() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let base = serve_axum(axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            h2.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }
        }),
    ))
    .await;
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let start = tokio::time::Instant::now();
    let err = within(
        client
            .get(format!("{base}/slow"))
            .timeout(Duration::from_millis(60))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: timed out (reqwest's timeout)"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Timeout);
}

/// A streaming body of `n` chunks of 512 bytes, with no size hint.
fn streamed(n: usize) -> reqwest::Body {
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = (0..n)
        .map(|_| Ok(http_body::Frame::data(Bytes::from(vec![b'a'; 512]))))
        .collect();
    reqwest::Body::wrap(http_body_util::StreamBody::new(futures_util::stream::iter(
        chunks,
    )))
}

/// reqwest.md: "A streaming body ... is read into memory first, up to `with_body_limit`; a longer
/// one fails the call with a `Body` error before anything is sent."
#[tokio::test]
async fn s65_reqwest_streaming_body_over_limit_is_body_error_not_sent() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let base = serve_axum(axum::Router::new().route(
        "/up",
        axum::routing::post(move |b: Bytes| {
            h2.fetch_add(1, Ordering::SeqCst);
            async move { b.len().to_string() }
        }),
    ))
    .await;
    let retry = quick_retry();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(
            sturdy::reqwest::SturdyMiddleware::new(move |next| {
                ClientBuilder::new().with_retry(retry).build(next)
            })
            .with_body_limit(1024),
        )
        .build();
    let body = streamed(4);
    let err = within(client.post(format!("{base}/up")).body(body).send())
        .await
        .unwrap_err();
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::NotSent, "{err}");
    // At the limit exactly: sent.
    let body = streamed(2);
    let res = within(client.post(format!("{base}/up")).body(body).send())
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "1024");
}

/// reqwest.md: `same_origin_redirects(n)`: "`too many redirects (more than n)`"; the rustdoc:
/// "fail as reqwest's own limit does (`is_redirect()`)".
#[tokio::test]
async fn s65_reqwest_same_origin_redirect_limit_words() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let base = serve_axum(axum::Router::new().route(
        "/loop/{n}",
        axum::routing::get(move |axum::extract::Path(n): axum::extract::Path<u32>| {
            h2.fetch_add(1, Ordering::SeqCst);
            async move { axum::response::Redirect::temporary(&format!("/loop/{}", n + 1)) }
        }),
    ))
    .await;
    let rc = reqwest::Client::builder()
        .redirect(sturdy::reqwest::same_origin_redirects(2))
        .build()
        .unwrap();
    let client = mw_client(rc, quick_retry());
    let err = within(client.get(format!("{base}/loop/0")).send())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "could not follow a redirect: too many redirects (more than 2)"
    );
    assert!(sturdy::reqwest::find::<reqwest::Error>(&err)
        .unwrap()
        .is_redirect());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "the first + 2 followed; not retried"
    );
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::MaybeProcessed);
}

/// reqwest.md: the reqwest error's "URL keeps scheme, host and path and loses query, fragment and
/// credentials, so an API key in a query string shows in neither `Display` nor `Debug`".
#[tokio::test]
async fn s65_reqwest_error_hides_query_and_credentials() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let err = within(
        client
            .get(format!(
                "http://user:pa55word@127.0.0.1:{port}/orders?api_key=SEKRET123#fragXYZ"
            ))
            .send(),
    )
    .await
    .unwrap_err();
    let texts = [format!("{err}"), format!("{err:?}"), format!("{err:#?}")];
    for t in &texts {
        for secret in ["SEKRET123", "pa55word", "fragXYZ"] {
            assert!(!t.contains(secret), "{secret} in {t}");
        }
    }
    let re = sturdy::reqwest::find::<reqwest::Error>(&err).unwrap();
    let u = re.url().unwrap();
    assert_eq!(u.path(), "/orders");
    assert_eq!(u.query(), None);
    assert_eq!(u.password(), None);
    // The chain, walked by hand, too.
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(s) = src {
        let d = format!("{s} {s:?}");
        assert!(!d.contains("SEKRET123") && !d.contains("pa55word"), "{d}");
        src = s.source();
    }
}

/// reqwest.md: "The request's reqwest-middleware extensions are copied into the `http::Request`
/// the stack sees": `CallOptions::without_retries` sent through `.with_extension`.
#[tokio::test]
async fn s65_reqwest_call_options_extension_reaches_the_stack() {
    let (addr, n) =
        raw_answer("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let res = within(
        client
            .get(format!("http://{addr}/"))
            .with_extension(sturdy::core::CallOptions::new().without_retries())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(n.load(Ordering::SeqCst), 1);
    let res = within(client.get(format!("http://{addr}/")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(n.load(Ordering::SeqCst), 5);
}

/// reqwest.md: ReqwestService example with the chaos server requiring auth, and the URL in the
/// response's extensions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_reqwest_service_guide_example() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let base = server.url("");
    let http = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    let tokens = sturdy::auth::ClientCredentials::new(
        http.clone(),
        &format!("{base}/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(http);
    let res = within(client.oneshot(post(format!("{base}/orders"), r#"{"item":"book"}"#)))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(
        res.extensions().get::<reqwest::Url>().unwrap().path(),
        "/orders"
    );
    let order = res.into_body().collect().await.unwrap().to_bytes();
    assert!(order.starts_with(b"{"));
    assert_eq!(server.stats().token_requests, 1);
}

/// reqwest: a 429 with `Retry-After: 1` through the middleware is waited out (about 1 s, never
/// sooner), as through the hyper stack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_reqwest_429_retry_after_is_honoured() {
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let start = tokio::time::Instant::now();
    let res = within(
        client
            .post(server.url("/orders"))
            .json(&serde_json::json!({"item": "x"}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert!(
        start.elapsed() >= Duration::from_millis(990),
        "{:?}",
        start.elapsed()
    );
    let reqs = server.requests();
    let api: Vec<_> = reqs
        .iter()
        .filter(|r| r.path.starts_with("/orders"))
        .collect();
    assert_eq!(api.len(), 2);
    assert!(api[1].at - api[0].at >= Duration::from_millis(990));
}

// ---------------------------------------------------------------------------------------------
// sturdy-chaos
// ---------------------------------------------------------------------------------------------

async fn raw_send(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    req: http::Request<Full<Bytes>>,
) -> http::Response<Bytes> {
    let res = within(c.request(req)).await.unwrap();
    let (parts, body) = res.into_parts();
    let b = body.collect().await.unwrap().to_bytes();
    http::Response::from_parts(parts, b)
}

/// sturdy-chaos Knobs: "They are checked in this order: capacity, latency, API version, auth,
/// server quota, the next-N and random 429s, the next-N and random 5xx": a request refused for
/// its version or its auth does not use up a next-N 429 or 5xx.
#[tokio::test]
async fn s65_chaos_fault_order_version_then_auth_then_429_then_5xx() {
    let server = ChaosServer::start(Knobs {
        api_version: Some("v1".into()),
        require_auth: true,
        rate_limit_next: 1,
        fail_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    // No version, no token: 400 (version first).
    let r = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(r.status(), 400);
    // Version, no token: 401.
    let r = raw_send(
        &c,
        http::Request::get(server.url("/orders"))
            .header("api-version", "v1")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), 401);
    let st = server.stats();
    assert_eq!((st.rate_limited, st.server_errors), (0, 0));
    // A token.
    let tok = raw_send(
        &c,
        http::Request::post(server.url("/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials&client_id=client&client_secret=secret",
            )))
            .unwrap(),
    )
    .await;
    assert_eq!(tok.status(), 200, "{:?}", tok.body());
    let v: serde_json::Value = serde_json::from_slice(tok.body()).unwrap();
    let token = v["access_token"].as_str().unwrap().to_owned();
    let authed = || {
        http::Request::get(server.url("/orders"))
            .header("api-version", "v1")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(raw_send(&c, authed()).await.status(), 429);
    assert_eq!(raw_send(&c, authed()).await.status(), 503);
    assert_eq!(raw_send(&c, authed()).await.status(), 200);
    // /health is never faulted.
    server.update(|k| {
        k.fail_next = 5;
        k.error_rate = 1.0;
    });
    let r = raw_send(&c, get(server.url("/health"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.body(), "ok");
}

/// sturdy-chaos `RetryAfterForm::Date`: "`Retry-After: <HTTP date>`, this far in the future (HTTP
/// dates have whole seconds, so the wait a client computes may be up to a second shorter)".
#[tokio::test]
async fn s65_chaos_retry_after_date_form() {
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Date(Duration::from_secs(30)),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    #[allow(clippy::disallowed_methods)] // the server's clock is the wall clock
    let before = SystemTime::now();
    let r = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(r.status(), 429);
    let ra = r.headers()["retry-after"].to_str().unwrap().to_owned();
    let date = httpdate_parse(&ra);
    let wait = date.duration_since(before).unwrap_or_default();
    assert!(
        wait >= Duration::from_secs(29) && wait <= Duration::from_secs(31),
        "{ra}: {wait:?}"
    );
    assert_eq!(server.stats().rate_limited, 1);
}

fn httpdate_parse(s: &str) -> SystemTime {
    // Parse an IMF-fixdate with sturdy's own total parser, as a client would.
    sturdy::core::headers::parse_http_date(s.as_bytes(), "retry-after").expect("an HTTP date")
}

/// sturdy-chaos: `ServerRateLimit`: "at most `limit` requests per fixed `window`; the rest get 429
/// with `Retry-After` and `RateLimit` headers".
#[tokio::test]
async fn s65_chaos_server_quota_headers() {
    let server = ChaosServer::start(Knobs {
        server_rate_limit: Some(ServerRateLimit {
            limit: 2,
            window: Duration::from_secs(60),
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    assert_eq!(raw_send(&c, get(server.url("/orders"))).await.status(), 200);
    assert_eq!(raw_send(&c, get(server.url("/orders"))).await.status(), 200);
    let r = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    assert!(r.headers().contains_key("ratelimit"), "{:?}", r.headers());
    assert_eq!(server.stats().rate_limited, 1);
}

/// sturdy-chaos: "Honour `Idempotency-Key` on `POST /orders`: a repeat replays the first response
/// with `Idempotent-Replayed: true`; the same key with another payload gets 422"; with idempotency
/// off, `duplicates_by_key` counts.
#[tokio::test]
async fn s65_chaos_idempotency_knob() {
    let server = ChaosServer::start(Knobs {
        idempotency: true,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let keyed = |body: &'static str| {
        http::Request::post(server.url("/orders"))
            .header("content-type", "application/json")
            .header("idempotency-key", "k-65")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let a = raw_send(&c, keyed(r#"{"item":"a"}"#)).await;
    assert_eq!(a.status(), 201);
    let b = raw_send(&c, keyed(r#"{"item":"a"}"#)).await;
    assert_eq!(b.status(), 201);
    assert_eq!(b.headers()["idempotent-replayed"], "true");
    assert_eq!(a.body(), b.body());
    let d = raw_send(&c, keyed(r#"{"item":"b"}"#)).await;
    assert_eq!(d.status(), 422);
    let st = server.stats();
    assert_eq!((st.orders_committed, st.replayed), (1, 1));

    server.update(|k| k.idempotency = false);
    let e = raw_send(&c, keyed(r#"{"item":"c"}"#)).await;
    assert_eq!(e.status(), 201);
    let st = server.stats();
    assert_eq!(st.orders_committed, 2);
    assert_eq!(st.duplicates_by_key, 1);
}

/// sturdy-chaos: reset-after-commit: "the client sees an error, the side effect stands"; the
/// request log's status is "0 when the connection was closed instead".
#[tokio::test]
async fn s65_chaos_reset_after_commit_logs_status_zero() {
    let server = ChaosServer::start(Knobs {
        reset_after_commit_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let r = within(c.request(post(server.url("/orders"), r#"{"item":"a"}"#))).await;
    assert!(r.is_err());
    assert_eq!(server.stats().orders_committed, 1);
    assert_eq!(server.stats().resets, 1);
    let log = server.requests();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, 0);
    assert_eq!(log[0].method, http::Method::POST);
    assert_eq!(log[0].path, "/orders");
    assert_eq!(server.orders().len(), 1);
}

/// sturdy-chaos `serve`: "Fraction of requests answered 503 before the app sees them", and
/// `requests_with_key`: "How many requests arrived (before any fault) carrying
/// `Idempotency-Key: key`".
#[tokio::test]
async fn s65_chaos_serve_wraps_an_app() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/x",
        axum::routing::post(move || {
            s2.fetch_add(1, Ordering::SeqCst);
            async { "done" }
        }),
    );
    let served = sturdy_chaos::serve(
        app,
        sturdy_chaos::Faults {
            error_rate: 1.0,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(served.addr().ip().to_string(), "127.0.0.1");
    let c = sturdy_chaos::http_client();
    let r = raw_send(
        &c,
        http::Request::post(served.url("/x"))
            .header("idempotency-key", "kk")
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status(), 503);
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert_eq!(served.requests_with_key("kk"), 1);
    let st = served.stats();
    assert_eq!((st.requests, st.errors), (1, 1));
}

/// sturdy-chaos `Capacity`: "answered 503 at once when `k > shed_above`".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_chaos_capacity_sheds() {
    let server = ChaosServer::start(Knobs {
        latency: Duration::from_millis(300),
        capacity: Some(sturdy_chaos::Capacity {
            limit: 1,
            shed_above: 1,
        }),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let c2 = c.clone();
    let url = server.url("/orders");
    let first = tokio::spawn(async move { raw_send(&c2, get(url)).await.status() });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = tokio::time::Instant::now();
    let second = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(second.status(), 503);
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "at once: {:?}",
        start.elapsed()
    );
    assert_eq!(within(first).await.unwrap(), 200);
    assert_eq!(server.stats().shed, 1);
    assert_eq!(server.stats().peak_in_flight, 2);
}

// ---------------------------------------------------------------------------------------------
// More reqwest
// ---------------------------------------------------------------------------------------------

type MwFuture<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a,
    >,
>;

/// A reqwest middleware that counts what passes through it.
struct Count(Arc<AtomicUsize>);

impl reqwest_middleware::Middleware for Count {
    fn handle<'l0, 'l1, 'l2, 'at>(
        &'l0 self,
        req: reqwest::Request,
        extensions: &'l1 mut http::Extensions,
        next: reqwest_middleware::Next<'l2>,
    ) -> MwFuture<'at>
    where
        'l0: 'at,
        'l1: 'at,
        'l2: 'at,
        Self: 'at,
    {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(next.run(req, extensions))
    }
}

/// reqwest.md: "Middlewares added before it see each call once; middlewares added after it see
/// every attempt."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_reqwest_middlewares_before_see_once_after_see_every_attempt() {
    let server = ChaosServer::start(Knobs {
        fail_next: 2,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let before = Arc::new(AtomicUsize::new(0));
    let after = Arc::new(AtomicUsize::new(0));
    let retry = quick_retry();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(Count(before.clone()))
        .with(sturdy::reqwest::SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .with(Count(after.clone()))
        .build();
    let res = within(
        client
            .post(server.url("/orders"))
            .json(&serde_json::json!({"item": "x"}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(before.load(Ordering::SeqCst), 1);
    assert_eq!(after.load(Ordering::SeqCst), 3);
}

async fn slow_counter(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let base = serve_axum(axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            h2.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                "done"
            }
        }),
    ))
    .await;
    (base, hits)
}

/// reqwest.md: "a request that has [a `.timeout()`] is never coalesced with another
/// (`with_coalesce`): it is sent on its own, under its own timeout."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_reqwest_timeout_request_is_never_coalesced() {
    let (base, hits) = slow_counter(Duration::from_millis(300)).await;
    let retry = quick_retry();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(sturdy::reqwest::SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(retry)
                .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
                .build(next)
        }))
        .build();
    // Sanity: two identical GETs without a timeout share one upstream call.
    let (a, b) = tokio::join!(
        client.get(format!("{base}/slow")).send(),
        client.get(format!("{base}/slow")).send()
    );
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.unwrap().status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "coalesced");
    // One with a short timeout beside one without: each on its own, the short one times out.
    let c2 = client.clone();
    let url = format!("{base}/slow");
    let plain = tokio::spawn(async move { c2.get(url).send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = tokio::time::Instant::now();
    let timed = within(
        client
            .get(format!("{base}/slow"))
            .timeout(Duration::from_millis(50))
            .with_extension(sturdy::core::CallOptions::new().without_retries())
            .send(),
    )
    .await;
    assert!(timed.is_err(), "the timed request timed out on its own");
    assert!(
        start.elapsed() < Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(within(plain).await.unwrap().unwrap(), 200);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "the timed one was sent on its own"
    );
}

async fn redirecting(to: &'static str) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h2 = hits.clone();
    let base = serve_axum(
        axum::Router::new()
            .route(
                "/a",
                axum::routing::post(move || {
                    h2.fetch_add(1, Ordering::SeqCst);
                    async move { axum::response::Redirect::temporary(to) }
                }),
            )
            .route("/b", axum::routing::post(|b: Bytes| async move { b })),
    )
    .await;
    (base, hits)
}

/// reqwest.md, `ReqwestService`: "One whose exact size is known and at most `with_buffer_limit`
/// \[1 MiB\] is handed to reqwest as bytes, so reqwest can send it again when it follows a 307 or
/// 308 redirect; any other body is streamed, and reqwest answers a 307 or 308 for it with the
/// redirect response itself."
#[tokio::test]
async fn s65_reqwest_service_bodies_and_307() {
    let (base, _) = redirecting("/b").await;
    let svc = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    let res = within(svc.clone().oneshot(post(format!("{base}/a"), "hello-body")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "hello-body"
    );
    // Over the buffer limit: streamed, the 307 comes back.
    let small = sturdy::reqwest::ReqwestService::new(reqwest::Client::new()).with_buffer_limit(4);
    let res = within(small.oneshot(post(format!("{base}/a"), "hello-body")))
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    // No exact size: streamed, the 307 comes back.
    let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> =
        vec![Ok(http_body::Frame::data(Bytes::from_static(b"hello")))];
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
    let req = http::Request::post(format!("{base}/a")).body(body).unwrap();
    let res = within(svc.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 307);
}

/// reqwest.md: "A request whose own URL reqwest refuses (an `ftp:` URL handed to sturdy's
/// middleware) was never sent ...: `Config`, `invalid request: ...`, not sent."
#[tokio::test]
async fn s65_reqwest_ftp_url_is_config_not_sent() {
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let err = within(client.get("ftp://127.0.0.1/orders").send())
        .await
        .unwrap_err();
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("invalid request: "), "{err}");
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::NotSent, "{err}");
    // Through ReqwestService too.
    let svc = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    let err = within(svc.oneshot(get("ftp://127.0.0.1/orders".into())))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config, "{err}");
    assert_eq!(sturdy::core::classify::delivery(&err), Delivery::NotSent);
}

/// reqwest.md: a redirect to a URL reqwest cannot use: "`could not follow a redirect: the server
/// answered with a redirect to a URL reqwest cannot use (URL scheme is not allowed)`", `Other`,
/// may have been processed, not retried.
#[tokio::test]
async fn s65_reqwest_redirect_to_ftp_words() {
    let (base, hits) = redirecting("ftp://127.0.0.1/x").await;
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let err = within(client.post(format!("{base}/a")).body("x").send())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "could not follow a redirect: the server answered with a redirect to a URL reqwest cannot use (URL scheme is not allowed)"
        ),
        "{msg}"
    );
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Other);
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// reqwest.md: "`the connection closed before the response was complete`", retried for a GET.
#[tokio::test]
async fn s65_reqwest_closed_before_response_words() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n2.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 8192];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            drop(s);
        }
    });
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let err = within(client.get(format!("http://{addr}/x")).send())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: the connection closed before the response was complete"
    );
    assert_eq!(n.load(Ordering::SeqCst), 4);
}

// ---------------------------------------------------------------------------------------------
// More README claims
// ---------------------------------------------------------------------------------------------

/// README table (auth): "401 refreshes once and replays (a body of known size within the replay
/// limit, 1 MiB by default)"; chaos `revoke_tokens`: "the next API call with one gets 401".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_readme_auth_replay_limit_one_mib() {
    let server = ChaosServer::start(Knobs {
        require_auth: true,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let http = sturdy_chaos::http_client();
    // The token endpoint gets a pool of its own: the server closes the connection on which it
    // answered the 1 MiB POST 401 without reading it, and a token POST (no key, so not retried)
    // that drew that connection from a shared pool failed with a broken pipe now and then.
    let tokens = sturdy::auth::ClientCredentials::new(
        sturdy_chaos::http_client(),
        &server.url("/oauth/token"),
        "client",
        "secret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(http);
    let body_of = |len: usize| {
        let pad = len - r#"{"item":""}"#.len();
        let s = format!(r#"{{"item":"{}"}}"#, "a".repeat(pad));
        assert_eq!(s.len(), len);
        http::Request::post(server.url("/orders"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(s)))
            .unwrap()
    };
    let warm = within(
        client
            .clone()
            .oneshot(post(server.url("/orders"), r#"{"item":"w"}"#)),
    )
    .await
    .unwrap();
    assert_eq!(warm.status(), 201);
    server.revoke_tokens();
    let res = within(client.clone().oneshot(body_of(1 << 20)))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        201,
        "1 MiB exactly is replayed after the refresh"
    );
    assert_eq!(server.stats().token_requests, 2);
    server.revoke_tokens();
    let res = within(client.clone().oneshot(body_of((1 << 20) + 1)))
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "one byte more is sent once");
    assert_eq!(server.stats().orders_committed, 2);
}

/// README: "rate limited by api.example.com; retry after 2m" through `ClientBuilder`, and
/// "every caller paused on 429": the next call is not sent during the pause; after it, it is.
#[tokio::test(start_paused = true)]
async fn s65_readme_429_two_minutes_pauses_the_host() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let api = tower::service_fn(move |_req: http::Request<Full<Bytes>>| {
        let k = n2.fetch_add(1, Ordering::SeqCst);
        async move {
            let res = if k == 0 {
                http::Response::builder()
                    .status(429)
                    .header("retry-after", "120")
                    .body(Full::<Bytes>::default())
                    .unwrap()
            } else {
                http::Response::new(Full::<Bytes>::default())
            };
            Ok::<_, Infallible>(res)
        }
    });
    let c = ClientBuilder::new().with_retry(quick_retry()).build(api);
    let err = c
        .clone()
        .oneshot(get("http://api.example.com/x".into()))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "rate limited by api.example.com; retry after 2m"
    );
    assert!(sturdy::core::find::<sturdy::core::RateLimited>(&*err).is_some());
    let start = tokio::time::Instant::now();
    let err2 = c
        .clone()
        .oneshot(get("http://api.example.com/y".into()))
        .await
        .unwrap_err();
    assert!(
        sturdy::core::find::<sturdy::core::RateLimited>(&*err2).is_some(),
        "{err2}"
    );
    assert!(
        start.elapsed() <= Duration::from_secs(31),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(n.load(Ordering::SeqCst), 1, "not sent during the pause");
    assert_eq!(sturdy::core::classify::delivery(&*err2), Delivery::NotSent);
    tokio::time::advance(Duration::from_secs(121)).await;
    let res = c
        .oneshot(get("http://api.example.com/z".into()))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// tls.md: "The constructors that make the rustls configuration themselves use ... TLS 1.2 and
/// 1.3": a TLS 1.2-only server and a TLS 1.3-only server both answer.
#[tokio::test]
async fn s65_tls_12_and_13_only_servers() {
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[v])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let srv = serve_tls(Arc::new(config)).await;
        let c =
            ClientBuilder::new().build(https_client_with_roots([cert.cert.der().clone()]).unwrap());
        let res = within(c.oneshot(get(format!("https://{}/", srv.addr))))
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{v:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Extensions, bodies and summaries through reqwest
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
struct Marker(usize);

/// Below sturdy: numbers each attempt in its extensions.
struct Mark(Arc<AtomicUsize>);

impl reqwest_middleware::Middleware for Mark {
    fn handle<'l0, 'l1, 'l2, 'at>(
        &'l0 self,
        req: reqwest::Request,
        extensions: &'l1 mut http::Extensions,
        next: reqwest_middleware::Next<'l2>,
    ) -> MwFuture<'at>
    where
        'l0: 'at,
        'l1: 'at,
        'l2: 'at,
        Self: 'at,
    {
        let k = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        extensions.insert(Marker(k));
        Box::pin(next.run(req, extensions))
    }
}

/// Above sturdy: records the marker the call's extensions hold when the call ends.
struct Look(Arc<Mutex<Option<Marker>>>);

impl reqwest_middleware::Middleware for Look {
    fn handle<'l0, 'l1, 'l2, 'at>(
        &'l0 self,
        req: reqwest::Request,
        extensions: &'l1 mut http::Extensions,
        next: reqwest_middleware::Next<'l2>,
    ) -> MwFuture<'at>
    where
        'l0: 'at,
        'l1: 'at,
        'l2: 'at,
        Self: 'at,
    {
        let seen = self.0.clone();
        Box::pin(async move {
            let res = next.run(req, extensions).await;
            *seen.lock().unwrap() = extensions.get::<Marker>().cloned();
            res
        })
    }
}

/// reqwest.md: "when the call ends, the call's extensions are replaced by those of the last
/// attempt that finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s65_reqwest_call_extensions_are_the_last_attempts() {
    let server = ChaosServer::start(Knobs {
        fail_next: 2,
        idempotency: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let seen = Arc::new(Mutex::new(None));
    let retry = quick_retry();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(Look(seen.clone()))
        .with(sturdy::reqwest::SturdyMiddleware::new(move |next| {
            ClientBuilder::new().with_retry(retry).build(next)
        }))
        .with(Mark(Arc::new(AtomicUsize::new(0))))
        .build();
    let res = within(
        client
            .post(server.url("/orders"))
            .json(&serde_json::json!({"item": "x"}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(seen.lock().unwrap().clone(), Some(Marker(3)));
    // A failed call too.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    *seen.lock().unwrap() = None;
    let err = within(client.get(format!("http://127.0.0.1:{port}/")).send()).await;
    assert!(err.is_err());
    assert_eq!(
        seen.lock().unwrap().clone(),
        Some(Marker(7)),
        "3 + 4 attempts"
    );
}

/// reqwest.md: "A failed call is `reqwest_middleware::Error::Middleware` holding the stack's
/// error ... `ErrorSummary::of(&err)` and `tool_result` read it as they read any error".
#[tokio::test]
async fn s65_reqwest_error_summary_reads_the_middleware_error() {
    let client = mw_client(reqwest::Client::new(), quick_retry());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = within(client.get(format!("http://127.0.0.1:{port}/")).send())
        .await
        .unwrap_err();
    assert!(
        matches!(err, reqwest_middleware::Error::Middleware(_)),
        "{err:?}"
    );
    let s = sturdy::core::summary::ErrorSummary::of(&err);
    assert_eq!(s.attempts, Some(4));
    assert_eq!(s.message, "gave up after 4 attempts: connection refused");
    assert!(s.may_have_been_processed);
    let v = sturdy::core::summary::tool_result::<()>(Err(Box::new(err)));
    let text = v.to_string();
    assert!(text.contains("gave up after 4 attempts"), "{text}");
}

/// reqwest.md: "`ResponseBody` is reqwest's body whose read errors are `sturdy_core::Error`s".
#[tokio::test]
async fn s65_reqwest_service_body_read_error_is_sturdy_error() {
    // A server that sends the head and 3 of 100 bytes, then closes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = vec![0u8; 8192];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await;
            drop(s);
        }
    });
    let svc = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    let res = within(svc.oneshot(get(format!("http://{addr}/"))))
        .await
        .unwrap();
    let err = within(res.into_body().collect()).await.unwrap_err();
    let _: &sturdy::core::Error = &err;
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
    assert!(
        err.to_string()
            .starts_with("could not read the response body"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// More sturdy-chaos
// ---------------------------------------------------------------------------------------------

/// sturdy-chaos `Stats::requests`: "Every request, on every route", `api_requests`: "API requests
/// (`/orders...`)", `page_requests`: "GET requests for lists of orders (any pagination style)".
#[tokio::test]
async fn s65_chaos_stats_count_what_they_say() {
    let server = ChaosServer::start(Knobs {
        orders: 5,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    for p in [
        "/health",
        "/counter",
        "/orders?limit=2",
        "/orders/link?page=1&per_page=2",
        "/orders/pages?page=1&per_page=2",
        "/orders/offset?offset=0&limit=2",
        "/orders/o_1",
    ] {
        let r = raw_send(&c, get(server.url(p))).await;
        assert_eq!(r.status(), 200, "{p}: {:?}", r.body());
    }
    let st = server.stats();
    assert_eq!(st.requests, 7);
    assert_eq!(st.api_requests, 5);
    assert_eq!(st.page_requests, 4);
    assert_eq!(server.requests().len(), 7);
}

/// sturdy-chaos: cursor pagination `{"data": [...], "next_cursor": "c40" | null}`, and the other
/// styles' documented shapes.
#[tokio::test]
async fn s65_chaos_pagination_shapes() {
    let server = ChaosServer::start(Knobs {
        orders: 45,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let r = raw_send(&c, get(server.url("/orders?limit=40"))).await;
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 40);
    assert_eq!(v["next_cursor"], "c40");
    let r = raw_send(&c, get(server.url("/orders?cursor=c40&limit=40"))).await;
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 5);
    assert!(v["next_cursor"].is_null());
    let r = raw_send(&c, get(server.url("/orders/link?page=1&per_page=20"))).await;
    let link = r.headers()["link"].to_str().unwrap().to_owned();
    assert!(
        link.contains(r#"rel="next""#) && link.starts_with("</"),
        "{link}"
    );
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 20);
    let r = raw_send(&c, get(server.url("/orders/pages?page=3&per_page=20"))).await;
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 5);
    assert_eq!(
        (
            v["page"].as_u64(),
            v["per_page"].as_u64(),
            v["total"].as_u64()
        ),
        (Some(3), Some(20), Some(45))
    );
    let r = raw_send(&c, get(server.url("/orders/offset?offset=40&limit=20"))).await;
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 5);
    assert_eq!(
        (
            v["offset"].as_u64(),
            v["limit"].as_u64(),
            v["total"].as_u64()
        ),
        (Some(40), Some(20), Some(45))
    );
}

/// sturdy-chaos: hostile page parameters (0, u64::MAX, negative, garbage) never panic the server
/// or hang it; it keeps answering.
#[tokio::test]
async fn s65_chaos_hostile_page_parameters() {
    let server = ChaosServer::start(Knobs {
        orders: 3,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let max = u64::MAX;
    for p in [
        "/orders?limit=0".to_owned(),
        format!("/orders?limit={max}"),
        "/orders?cursor=zzz".to_owned(),
        format!("/orders?cursor=c{max}"),
        "/orders/link?page=0&per_page=0".to_owned(),
        format!("/orders/link?page={max}&per_page={max}"),
        format!("/orders/pages?page={max}&per_page={max}"),
        "/orders/pages?page=-1&per_page=-5".to_owned(),
        format!("/orders/offset?offset={max}&limit={max}"),
        "/orders/%FF%FE".to_owned(),
    ] {
        let r = within(c.request(get(server.url(&p)))).await;
        let r = r.unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(r.status().as_u16() < 500, "{p}: {}", r.status());
    }
    assert_eq!(raw_send(&c, get(server.url("/health"))).await.status(), 200);
}

/// sturdy-chaos: `RetryAfterForm::Absent`: "No `Retry-After` header"; `error_status` changes the
/// injected status; `deprecation` and `sunset` headers as documented.
#[tokio::test]
async fn s65_chaos_more_knobs() {
    let sunset = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
    let server = ChaosServer::start(Knobs {
        rate_limit_next: 1,
        retry_after: RetryAfterForm::Absent,
        fail_next: 1,
        error_status: 502,
        deprecation: Some(1_700_000_000),
        sunset: Some(sunset),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let r = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(r.status(), 429);
    assert!(!r.headers().contains_key("retry-after"));
    let r = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(r.status(), 502);
    let r = raw_send(&c, get(server.url("/orders"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["deprecation"], "@1700000000");
    assert_eq!(
        r.headers()["sunset"],
        sturdy::core::headers::format_http_date(sunset).as_str()
    );
    let st = server.stats();
    assert_eq!((st.rate_limited, st.server_errors), (1, 1));
}

/// sturdy-chaos `Knobs::seed`: "Seed of the server's random choices": two servers with one seed
/// fault the same requests.
#[tokio::test]
async fn s65_chaos_seeded_faults_repeat() {
    let mut runs = Vec::new();
    for _ in 0..2 {
        let server = ChaosServer::start(Knobs {
            seed: 2026,
            error_rate: 0.3,
            rate_limit_rate: 0.1,
            ..Knobs::default()
        })
        .await
        .unwrap();
        let c = sturdy_chaos::http_client();
        let mut statuses = Vec::new();
        for _ in 0..40 {
            statuses.push(
                raw_send(&c, get(server.url("/orders")))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1]);
    assert!(runs[0].contains(&503) && runs[0].contains(&200));
}

/// sturdy-chaos: token knobs: "The next N token requests get 503"; "Answer every token request
/// with this status and raw body instead"; `token_expires_in: Some(Value::Null)` "omits it".
#[tokio::test]
async fn s65_chaos_token_knobs() {
    let server = ChaosServer::start(Knobs {
        token_fail_next: 1,
        token_expires_in: Some(serde_json::Value::Null),
        ..Knobs::default()
    })
    .await
    .unwrap();
    let c = sturdy_chaos::http_client();
    let tok = || {
        http::Request::post(server.url("/oauth/token"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from_static(
                b"grant_type=client_credentials&client_id=client&client_secret=secret",
            )))
            .unwrap()
    };
    assert_eq!(raw_send(&c, tok()).await.status(), 503);
    let r = raw_send(&c, tok()).await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    assert!(v.get("expires_in").is_none(), "{v}");
    server.update(|k| k.token_response = Some((400, "nope".into())));
    let r = raw_send(&c, tok()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.body(), "nope");
    assert_eq!(server.stats().token_requests, 3);
    // Faults of the API do not apply to /oauth/token.
    server.update(|k| {
        k.token_response = None;
        k.fail_next = 3;
    });
    assert_eq!(raw_send(&c, tok()).await.status(), 200);
}

/// sturdy-chaos `/counter`: 428 without `If-Match`, 412 when stale, 200 when current.
#[tokio::test]
async fn s65_chaos_counter_contract() {
    let server = ChaosServer::start(Knobs::default()).await.unwrap();
    let c = sturdy_chaos::http_client();
    let r = raw_send(&c, get(server.url("/counter"))).await;
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
    let value = v["value"].as_i64().unwrap();
    let put = |m: Option<&str>| {
        let mut b =
            http::Request::put(server.url("/counter")).header("content-type", "application/json");
        if let Some(m) = m {
            b = b.header("if-match", m);
        }
        b.body(Full::new(Bytes::from(format!(
            r#"{{"value":{}}}"#,
            value + 1
        ))))
        .unwrap()
    };
    assert_eq!(raw_send(&c, put(None)).await.status(), 428);
    assert_eq!(raw_send(&c, put(Some(&etag))).await.status(), 200);
    assert_eq!(raw_send(&c, put(Some(&etag))).await.status(), 412);
    assert_eq!(server.counter().value, value + 1);
}
