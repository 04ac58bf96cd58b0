#![cfg(feature = "full")]
//! s51b: `sturdy::tls` (feature `tls`) against real rustls servers on 127.0.0.1:0 with rcgen
//! certificates, checked against docs/guides/tls.md: a trusted private authority works, plain
//! `http://` works on the same client, an unknown authority / another name / an expired
//! certificate fail with words that name the cause and say "not sent", without a retry and
//! counted by the breaker; a server that stalls in the handshake is bounded by the attempt
//! timeout; a bad extra root is a `Config` error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, CircuitOpen, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::tls::{https_client_with_roots, CertificateDer, HttpsClient};
use sturdy::ClientBuilder;
use tower::ServiceExt;

struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert,
        issuer: rcgen::Issuer::new(params, key),
    }
}

fn leaf(
    ca: &Ca,
    names: &[&str],
    expired: bool,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn server_config(ca: &Ca, names: &[&str], expired: bool) -> Arc<ServerConfig> {
    let (cert, key) = leaf(ca, names, expired);
    Arc::new(
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
    )
}

struct Srv {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// An HTTPS server answering "hello"; `conns` counts TCP connections, `requests` requests.
async fn serve_tls(config: Arc<ServerConfig>) -> Srv {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c2, r2) = (conns.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let r2 = r2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    r2.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Srv {
        addr,
        conns,
        requests,
    }
}

/// A plain HTTP server answering "plain".
async fn serve_plain() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("plain"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(51)
}

fn trusting(ca: &Ca) -> HttpsClient {
    https_client_with_roots([ca.cert.der().clone()]).unwrap()
}

fn get(url: String) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

async fn call(
    client: &sturdy::Client<hyper::body::Incoming>,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, BoxError> {
    tokio::time::timeout(Duration::from_secs(10), client.clone().oneshot(req))
        .await
        .expect("the call did not end in time")
}

fn sturdy_err(e: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**e).unwrap_or_else(|| panic!("{e} / {e:?}"))
}

/// tls.md: "The client trusts the certificate" given as an extra root; "The client sends plain
/// `http://` requests too".
#[tokio::test]
async fn s51b_tls_trusted_authority_and_plain_http_on_one_client() {
    let auth = ca("s51b trusted");
    let srv = serve_tls(server_config(&auth, &["127.0.0.1", "localhost"], false)).await;
    let plain = serve_plain().await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let res = call(&client, get(format!("https://{}/", srv.addr)))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    let res = call(
        &client,
        get(format!("https://localhost:{}/", srv.addr.port())),
    )
    .await
    .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    let res = call(&client, get(format!("http://{plain}/")))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "plain");
    // A POST through the whole stack (idempotency key, retry) over TLS.
    let req = http::Request::post(format!("https://{}/orders", srv.addr))
        .body(Full::from("{}"))
        .unwrap();
    assert_eq!(call(&client, req).await.unwrap().status(), 200);
    assert_eq!(srv.requests.load(Ordering::SeqCst), 3);
}

/// tls.md: "The retry layer does not retry it; the call fails at once, with the error
/// `TLS handshake failed (invalid peer certificate: UnknownIssuer)`"; "The handshake fails
/// before the request is written, so `classify::delivery` says `Delivery::NotSent`. A
/// certificate the client does not trust is `ErrorKind::Tls`".
#[tokio::test]
async fn s51b_tls_unknown_authority_fails_once_not_sent_with_its_cause() {
    let server_ca = ca("s51b server authority");
    let other = ca("s51b other authority");
    let srv = serve_tls(server_config(&server_ca, &["127.0.0.1"], false)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&other));
    let err = call(&client, get(format!("https://{}/?token=s3cret", srv.addr)))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer)"
    );
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Tls);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(!e.is_retryable());
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1, "retried");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);
    assert!(!format!("{err:?}").contains("s3cret"));
    let summary = sturdy::core::ErrorSummary::of(&*err);
    assert_eq!(summary.kind, "tls");
    assert!(!summary.may_have_been_processed);
    assert!(!summary.retryable);
}

/// tls.md: "(for a POST or PATCH the message goes on with what to do next: `; the request was
/// not sent, so it is safe to send again`)".
#[tokio::test]
async fn s51b_tls_unknown_authority_post_says_safe_to_send_again() {
    let server_ca = ca("s51b server authority");
    let other = ca("s51b other authority");
    let srv = serve_tls(server_config(&server_ca, &["127.0.0.1"], false)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&other));
    let req = http::Request::post(format!("https://{}/orders", srv.addr))
        .body(Full::from("{}"))
        .unwrap();
    let err = call(&client, req).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer); the request was not sent, so it is safe to send again"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1);
}

/// tls.md, the table: "a certificate for another name | `TLS handshake failed (invalid peer
/// certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for
/// DnsName("api.example.com"))`".
#[tokio::test]
async fn s51b_tls_wrong_name_reads_as_the_guide_says() {
    let auth = ca("s51b trusted");
    let srv = serve_tls(server_config(&auth, &["api.example.com"], false)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let err = call(&client, get(format!("https://{}/", srv.addr)))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"TLS handshake failed (invalid peer certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for DnsName("api.example.com"))"#
    );
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1, "retried");
}

/// tls.md: a certificate the client does not trust fails the handshake, `ErrorKind::Tls`, not
/// sent, and "`classify::describe` names the TLS problem". An expired certificate from a trusted
/// authority is one the client does not trust.
#[tokio::test]
async fn s51b_tls_expired_certificate_names_the_cause_and_is_not_sent() {
    let auth = ca("s51b trusted");
    let srv = serve_tls(server_config(&auth, &["127.0.0.1"], true)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let err = call(&client, get(format!("https://{}/", srv.addr)))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("TLS handshake failed (invalid peer certificate: "),
        "{text}"
    );
    assert!(text.to_lowercase().contains("expired"), "{text}");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls, "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1, "retried");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);
}

/// tls.md: an untrusted certificate is "counted by the circuit breaker as a failure of the
/// dependency"; circuit.md: open means "`CircuitOpen` at once, and the inner service is not
/// called".
#[tokio::test]
async fn s51b_tls_untrusted_certificates_open_the_breaker() {
    let server_ca = ca("s51b server authority");
    let other = ca("s51b other authority");
    let srv = serve_tls(server_config(&server_ca, &["127.0.0.1"], false)).await;
    let (cb, handle) = CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .with_open_duration(Duration::from_secs(30), Duration::from_secs(30))
        .pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_circuit_breaker(cb)
        .build(trusting(&other));
    for _ in 0..2 {
        let err = call(&client, get(format!("https://{}/", srv.addr)))
            .await
            .unwrap_err();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls);
    }
    assert!(
        matches!(
            handle.state(&srv.addr.to_string()),
            Some(sturdy::circuit::CircuitState::Open { .. })
        ),
        "{:?}",
        handle.states()
    );
    let err = call(&client, get(format!("https://{}/", srv.addr)))
        .await
        .unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 2);
}

/// A listener that accepts TCP connections and never says a word (a stalled handshake).
async fn silent() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (addr, conns)
}

/// README: "AttemptTimeout -> per attempt"; ClientBuilder: "The timeout of each attempt
/// \[30 s\]". A server that accepts and stalls in the TLS handshake is cut at the attempt
/// timeout, each attempt, and the call ends.
#[tokio::test]
async fn s51b_tls_a_stalled_handshake_is_bounded_by_the_attempt_timeout() {
    let (addr, conns) = silent().await;
    let auth = ca("s51b trusted");
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(2))
        .with_attempt_timeout(Duration::from_millis(150))
        .build(trusting(&auth));
    let t = Instant::now();
    let err = call(&client, get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(290), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string().starts_with("gave up after 2 attempts: "),
        "{err}"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

/// The same with a per-request attempt timeout (`CallOptions::with_attempt_timeout`) and no
/// retries: one attempt, cut at its own timeout.
#[tokio::test]
async fn s51b_tls_a_stalled_handshake_is_bounded_by_the_requests_own_timeout() {
    let (addr, conns) = silent().await;
    let auth = ca("s51b trusted");
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let mut req = get(format!("https://{addr}/"));
    req.extensions_mut().insert(
        sturdy::core::CallOptions::new()
            .without_retries()
            .with_attempt_timeout(Duration::from_millis(120)),
    );
    let t = Instant::now();
    let err = call(&client, req).await.unwrap_err();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

/// tls.md: `https_client_with_roots(extra)` "can fail: a `Config` error naming a certificate
/// that is not valid X.509".
#[tokio::test]
async fn s51b_tls_a_bad_extra_root_is_a_config_error() {
    let good = ca("s51b good").cert.der().clone();
    let bad = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    let err = https_client_with_roots([good, bad])
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config, "{err}");
    assert!(!err.to_string().is_empty());
}

/// A listener that reads the client's first bytes, then closes the connection (a handshake cut
/// short by the server).
async fn closer() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            let _ = tcp.read(&mut buf).await;
            drop(tcp);
        }
    });
    (addr, conns)
}

/// tls.md: "other handshake failures (an alert, a connection closed mid-handshake) stay
/// `ErrorKind::Connect` and are retried"; "The handshake fails before the request is written,
/// so `classify::delivery` says `Delivery::NotSent`".
#[tokio::test]
async fn s51b_tls_a_handshake_closed_by_the_server_is_connect_retried_not_sent() {
    let (addr, conns) = closer().await;
    let auth = ca("s51b trusted");
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let err = call(&client, get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Connect, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(conns.load(Ordering::SeqCst), 4, "{err}");
    assert!(
        err.to_string().starts_with("gave up after 4 attempts: "),
        "{err}"
    );
    // A POST: retried too (ClientBuilder gives it a key), and "not sent" in its words.
    let req = http::Request::post(format!("https://{addr}/orders"))
        .body(Full::from("{}"))
        .unwrap();
    let err = call(&client, req).await.unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(
        err.to_string()
            .ends_with("; the request was not sent, so it is safe to send again"),
        "{err}"
    );
    assert_eq!(conns.load(Ordering::SeqCst), 8);
}

/// An `https://` URL to a server that speaks plain HTTP: the handshake fails (not a trust
/// problem): `Connect`, not sent.
#[tokio::test]
async fn s51b_tls_https_to_a_plain_http_server_is_a_handshake_failure_not_sent() {
    let plain = serve_plain().await;
    let auth = ca("s51b trusted");
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let err = call(&client, get(format!("https://{plain}/")))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_ne!(sturdy_err(&err).kind(), &ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// tls.md: `https_client_with_config(config)`: "its ALPN list is replaced by `http/1.1`".
#[tokio::test]
async fn s51b_tls_with_config_offers_only_http11() {
    let auth = ca("s51b trusted");
    let (cert, key) = leaf(&auth, &["127.0.0.1"], false);
    let mut sc =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Option<Vec<u8>>>::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            s2.lock()
                .unwrap()
                .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc),
            );
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(auth.cert.der().clone()).unwrap();
    let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cc.alpn_protocols = vec![b"h2".to_vec()];
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(sturdy::tls::https_client_with_config(cc));
    let res = call(&client, get(format!("https://{addr}/")))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    assert_eq!(*seen.lock().unwrap(), [Some(b"http/1.1".to_vec())]);
}

/// reqwest.md / retry.md: "The whole call, retries and waits included, is bounded by the retry
/// layer's deadline": a stalled handshake under a 300 ms deadline (attempt timeout 30 s).
#[tokio::test]
async fn s51b_tls_a_stalled_handshake_is_bounded_by_the_deadline() {
    let (addr, _conns) = silent().await;
    let auth = ca("s51b trusted");
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(trusting(&auth));
    let mut req = get(format!("https://{addr}/"));
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().with_deadline(Duration::from_millis(300)));
    let t = Instant::now();
    let err = call(&client, req).await.unwrap_err();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout, "{err}");
}
