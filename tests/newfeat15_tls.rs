//! docs/guides/tls.md, "When the certificate is refused", read for certificates the guide does
//! not list by name: one not valid yet, one for client authentication only, an authority's
//! certificate presented as the server's; a breaker counting untrusted handshakes; a server that
//! stalls in the handshake. Loopback servers, real time with millisecond settings.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedKey, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::{classify_error, delivery, describe};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::https_client_with_roots;
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::ClientBuilder;
use tokio::net::TcpListener;
use tower::ServiceExt;

fn cert_with(params: &CertificateParams) -> CertifiedKey<KeyPair> {
    let signing_key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&signing_key).unwrap();
    CertifiedKey { cert, signing_key }
}

fn loopback_params() -> CertificateParams {
    CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap()
}

/// An HTTPS server answering "hello"; counts TCP connections accepted and requests handled.
async fn serve_tls(
    cert: &CertifiedKey<KeyPair>,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let (a, h) = (accepted.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
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
    (addr, accepted, hits)
}

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

fn quick_retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10)).unwrap();
    RetryLayer::new().with_backoff(backoff).with_seed(15)
}

fn attempts(err: &sturdy::core::BoxError) -> u32 {
    err.downcast_ref::<sturdy::core::Error>()
        .and_then(|e| e.report())
        .map(|r| r.attempts())
        .unwrap_or(1)
}

/// A certificate the client refuses, trusted as a root otherwise: what the guide says of a
/// certificate the client does not trust (`Tls`, not sent, not retried, nothing reaches the
/// handler).
async fn refused_certificate_reads_as_untrusted(params: CertificateParams, what: &str) {
    let cert = cert_with(&params);
    let (addr, accepted, hits) = serve_tls(&cert).await;
    let client = https_client_with_roots([cert.cert.der().clone()]).unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        client.clone().oneshot(get(format!("https://{addr}/"))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    let text = describe(&err);
    eprintln!("{what}: {text}");
    assert!(text.starts_with("TLS handshake failed ("), "{what}: {text}");
    assert_eq!(delivery(&err), Delivery::NotSent, "{what}");
    assert_eq!(classify_error(&err), ErrorKind::Tls, "{what}: {text}");
    let stack = ClientBuilder::new().with_retry(quick_retry()).build(client);
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        stack.oneshot(get(format!("https://{addr}/"))),
    )
    .await
    .expect("no hang")
    .unwrap_err();
    assert_eq!(attempts(&err), 1, "{what}: {err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "{what}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// tls.md: "A certificate the client does not trust is `ErrorKind::Tls`: not retryable (it will
/// not fix itself before the certificate or the trusted roots change)". Not valid until 2090.
#[tokio::test]
async fn a_certificate_not_valid_yet_is_a_tls_error_not_retried() {
    let mut params = loopback_params();
    params.not_before = rcgen::date_time_ymd(2090, 1, 1);
    params.not_after = rcgen::date_time_ymd(2091, 1, 1);
    refused_certificate_reads_as_untrusted(params, "not valid yet").await;
}

/// A certificate whose extended key usage allows client authentication only: the client does not
/// trust it to name a server.
#[tokio::test]
async fn a_certificate_for_client_authentication_only_is_a_tls_error_not_retried() {
    let mut params = loopback_params();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    refused_certificate_reads_as_untrusted(params, "client auth only").await;
}

/// An authority's certificate (CA:true) presented as the server's own.
#[tokio::test]
async fn an_authoritys_certificate_presented_as_the_servers_is_a_tls_error_not_retried() {
    let mut params = loopback_params();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    refused_certificate_reads_as_untrusted(params, "CA as end entity").await;
}

/// tls.md: an untrusted certificate is "counted by the circuit breaker as a failure of the
/// dependency". Three refused handshakes open a breaker of three consecutive failures; the fourth
/// call is refused at once without a connection.
#[tokio::test]
async fn untrusted_handshakes_open_the_breaker() {
    let cert = cert_with(&loopback_params());
    let other = cert_with(&loopback_params());
    let (addr, accepted, hits) = serve_tls(&cert).await;
    // The client trusts another certificate only.
    let client = https_client_with_roots([other.cert.der().clone()]).unwrap();
    let stack = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(3))
        .build(client);
    for i in 0..3 {
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            stack.clone().oneshot(get(format!("https://{addr}/"))),
        )
        .await
        .expect("no hang")
        .unwrap_err();
        assert_eq!(classify_error(&*err), ErrorKind::Tls, "call {i}: {err}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    let err = stack
        .clone()
        .oneshot(get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert!(
        matches!(classify_error(&*err), ErrorKind::CircuitOpen { .. }),
        "{err}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

/// A server that accepts the TCP connection and never answers the ClientHello: the attempt
/// timeout ends each attempt, the message names a timeout, and the call ends within its attempts.
#[tokio::test]
async fn a_server_stalling_in_the_handshake_times_out_per_attempt() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let cert = cert_with(&loopback_params());
    let client = https_client_with_roots([cert.cert.der().clone()]).unwrap();
    let stack = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(2))
        .with_attempt_timeout(Duration::from_millis(150))
        .build(client);
    let started = tokio::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        stack.oneshot(get(format!("https://{addr}/"))),
    )
    .await
    .expect("the attempt timeout ends a stalled handshake")
    .unwrap_err();
    let took = started.elapsed();
    eprintln!("stalled: {err} / {} after {took:?}", describe(&*err));
    assert_eq!(classify_error(&*err), ErrorKind::Timeout, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert_eq!(attempts(&err), 2, "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert!(took < Duration::from_secs(3), "{took:?}");
}
