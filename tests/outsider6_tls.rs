//! Outside tests of `sturdy::tls` against docs/guides/tls.md and the rustdoc of `sturdy::tls`:
//! malformed extra roots, handshake failures that are not about trust (a plain HTTP server, a
//! connection closed mid-handshake, a protocol alert), an expired certificate, the ALPN list of a
//! configuration of one's own, both protocol versions. Loopback servers, real time.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, CertifiedKey, KeyPair};
use sturdy::core::classify::{classify_error, delivery, describe};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ClientConfig, ServerConfig};
use sturdy::tls::{
    https_client, https_client_with_config, https_client_with_roots, webpki_roots, CertificateDer,
    HttpsClient,
};
use sturdy::ClientBuilder;
use tokio::net::TcpListener;
use tower::ServiceExt;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cert_with(params: &CertificateParams) -> CertifiedKey<KeyPair> {
    let signing_key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&signing_key).unwrap();
    CertifiedKey { cert, signing_key }
}

fn loopback_cert() -> CertifiedKey<KeyPair> {
    cert_with(&CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap())
}

fn server_config(
    cert: &CertifiedKey<KeyPair>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> ServerConfig {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    config
}

/// An HTTPS server on loopback answering "hello"; counts the requests its handler saw.
async fn serve_tls(config: ServerConfig) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let h = h.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from("hello"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

/// A plain HTTP server (no TLS) counting the requests its handler saw.
async fn serve_plain() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from("plain"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

fn quick_retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap();
    RetryLayer::new().with_backoff(backoff).with_seed(7)
}

fn attempts(err: &sturdy::core::BoxError) -> u32 {
    err.downcast_ref::<sturdy::core::Error>()
        .and_then(|e| e.report())
        .map(|r| r.attempts())
        .unwrap_or(1)
}

fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}

/// "It is `Clone + Send + Sync`" (tls.md), and `webpki_roots()` is the Mozilla set.
#[tokio::test]
async fn the_client_is_clone_send_sync_and_the_mozilla_set_is_there() {
    let c: HttpsClient = https_client();
    assert_send_sync_clone(&c);
    assert!(webpki_roots().len() > 100, "{}", webpki_roots().len());
}

/// `https_client_with_roots`: "A `Config` error naming the certificate that is not a valid X.509
/// certificate."
#[tokio::test]
async fn a_malformed_extra_root_is_a_config_error_naming_it() {
    let good = loopback_cert();
    let Err(err) = https_client_with_roots([
        good.cert.der().clone(),
        CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]),
        good.cert.der().clone(),
    ]) else {
        panic!("a certificate that is not X.509 is refused");
    };
    eprintln!("malformed root: {err}");
    assert_eq!(err.kind(), &ErrorKind::Config);
    let msg = err.to_string();
    assert!(
        msg.contains('2') || msg.contains("second") || msg.contains('1'),
        "the message does not name which certificate: {msg}"
    );
    // Empty bytes as well.
    let Err(err) = https_client_with_roots([CertificateDer::from(Vec::<u8>::new())]) else {
        panic!("empty bytes are not a certificate");
    };
    assert_eq!(err.kind(), &ErrorKind::Config);
}

/// tls.md: "other handshake failures (an alert, a connection closed mid-handshake) stay
/// `ErrorKind::Connect` and are retried", and "The handshake fails before the request is
/// written, so `classify::delivery` says `Delivery::NotSent`". A server that speaks plain HTTP
/// on the port: the client's hello is not answered with TLS.
#[tokio::test]
async fn a_plain_http_server_behind_https_is_connect_not_sent_and_retried() {
    let (addr, hits) = serve_plain().await;
    let err = https_client()
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    eprintln!("plain server: {} / {}", describe(&err), err);
    assert_eq!(
        classify_error(&err),
        ErrorKind::Connect,
        "{}",
        describe(&err)
    );
    assert_eq!(delivery(&err), Delivery::NotSent);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client());
    let err = client
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert!(attempts(&err) > 1, "not retried: {err}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// A connection closed by the server before the handshake ends.
#[tokio::test]
async fn a_connection_closed_mid_handshake_is_connect_not_sent_and_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = accepts.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            // Read the client hello, then close.
            let mut buf = [0u8; 512];
            let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
            drop(tcp);
        }
    });
    let err = https_client()
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    eprintln!("closed mid-handshake: {}", describe(&err));
    assert_eq!(
        classify_error(&err),
        ErrorKind::Connect,
        "{}",
        describe(&err)
    );
    assert_eq!(delivery(&err), Delivery::NotSent);
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client());
    let before = accepts.load(Ordering::SeqCst);
    let err = client
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert!(attempts(&err) > 1, "not retried: {err}");
    assert!(accepts.load(Ordering::SeqCst) - before > 1);
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

/// An alert: the server speaks only TLS 1.3, the client's own configuration only TLS 1.2.
#[tokio::test]
async fn a_protocol_alert_is_connect_not_sent() {
    let cert = loopback_cert();
    let (addr, hits) = serve_tls(server_config(
        &cert,
        &[&rustls::version::TLS13],
        &[b"http/1.1"],
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let err = https_client_with_config(config)
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    eprintln!("alert: {}", describe(&err));
    assert_eq!(
        classify_error(&err),
        ErrorKind::Connect,
        "{}",
        describe(&err)
    );
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// "The constructors that make the rustls configuration themselves use the ring crypto provider
/// and TLS 1.2 and 1.3": a server of either version alone is reached.
#[tokio::test]
async fn servers_of_tls12_only_and_tls13_only_are_reached() {
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let cert = loopback_cert();
        let (addr, hits) = serve_tls(server_config(&cert, &[version], &[])).await;
        let client = https_client_with_roots([cert.cert.der().clone()]).unwrap();
        let res = client
            .oneshot(get(format!("https://{addr}/")))
            .await
            .unwrap_or_else(|e| panic!("{version:?}: {}", describe(&e)));
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }
}

/// `https_client_with_config`: "Its ALPN protocols are replaced by `http/1.1`." A configuration
/// that offers only `h2` still reaches a server that insists on `http/1.1`.
#[tokio::test]
async fn the_alpn_of_ones_own_configuration_is_replaced_by_http11() {
    let cert = loopback_cert();
    let (addr, _hits) = serve_tls(server_config(
        &cert,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"http/1.1"],
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let res = https_client_with_config(config)
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(res.version(), http::Version::HTTP_11);
}

/// tls.md: "A certificate the client does not trust is `ErrorKind::Tls`: not retryable (it will
/// not fix itself before the certificate or the trusted roots change)". An expired certificate,
/// otherwise trusted, will not fix itself either.
#[tokio::test]
async fn an_expired_certificate_is_a_tls_error_not_retried() {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2001, 1, 1);
    params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    let cert = cert_with(&params);
    let (addr, hits) = serve_tls(server_config(
        &cert,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[],
    ))
    .await;
    let client = https_client_with_roots([cert.cert.der().clone()]).unwrap();
    let err = client
        .clone()
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    eprintln!("expired: {}", describe(&err));
    assert!(
        describe(&err).starts_with("TLS handshake failed ("),
        "{}",
        describe(&err)
    );
    assert_eq!(delivery(&err), Delivery::NotSent);
    assert_eq!(classify_error(&err), ErrorKind::Tls);
    let stack = ClientBuilder::new().with_retry(quick_retry()).build(client);
    let err = stack
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(attempts(&err), 1, "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// A call through the whole stack over HTTPS, with a kept service driven many times, and the
/// same client used for plain HTTP: clones share one pool, nothing deadlocks.
#[tokio::test]
async fn one_client_for_https_and_http_through_a_kept_stack() {
    use tower::Service;
    let cert = loopback_cert();
    let (tls_addr, tls_hits) = serve_tls(server_config(
        &cert,
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[b"http/1.1"],
    ))
    .await;
    let (plain_addr, plain_hits) = serve_plain().await;
    let http = https_client_with_roots([cert.cert.der().clone()]).unwrap();
    let mut stack = tower::ServiceBuilder::new()
        .buffer(1)
        .concurrency_limit(1)
        .service(ClientBuilder::new().build(http.clone()));
    for i in 0..10 {
        let url = if i % 2 == 0 {
            format!("https://{tls_addr}/")
        } else {
            format!("http://{plain_addr}/")
        };
        let res = tokio::time::timeout(
            Duration::from_secs(2),
            stack.ready().await.unwrap().call(get(url)),
        )
        .await
        .expect("a kept stack call hung")
        .unwrap();
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(tls_hits.load(Ordering::SeqCst), 5);
    assert_eq!(plain_hits.load(Ordering::SeqCst), 5);
}
