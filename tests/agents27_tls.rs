//! TLS on loopback with rcgen certificates: what the docs say an untrusted, misnamed or
//! broken handshake reads like, how often it is tried, and the roots and configuration given.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sturdy::core::classify::delivery;
use sturdy::core::summary::ErrorSummary;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::tls::{
    https_client, https_client_with_config, https_client_with_roots, CertificateDer,
};
use sturdy::ClientBuilder;
use tower::ServiceExt;

fn quick() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(10))
                .unwrap(),
        )
        .with_seed(3)
}

struct Tls {
    addr: std::net::SocketAddr,
    accepts: Arc<AtomicUsize>,
}

fn server_config(names: &[&str], alpn: &[&[u8]]) -> (ServerConfig, CertificateDer<'static>) {
    let cert = rcgen::generate_simple_self_signed(
        names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (config, cert.cert.der().clone())
}

/// Serves "hello" over TLS with `config`; `None`: accepts and closes at once.
async fn serve(config: Option<ServerConfig>) -> Tls {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let count = accepts.clone();
    let acceptor = config.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let Some(acceptor) = acceptor.clone() else {
                drop(tcp);
                continue;
            };
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let hello = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        "hello",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hello)
                    .await;
            });
        }
    });
    Tls { addr, accepts }
}

async fn call(
    http: sturdy::tls::HttpsClient,
    url: String,
) -> Result<http::Response<hyper::body::Incoming>, BoxError> {
    let client = ClientBuilder::new().with_retry(quick()).build(http);
    let req = http::Request::get(url).body(Full::default()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.oneshot(req))
        .await
        .expect("hung")
}

#[tokio::test]
async fn agents27_untrusted_certificate_fails_once_not_sent_not_retryable() {
    let (config, _) = server_config(&["127.0.0.1"], &[b"http/1.1"]);
    let tls = serve(Some(config)).await;
    let err = call(
        https_client(),
        format!("https://{}/orders?api_key=SECRET", tls.addr),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer)"
    );
    assert_eq!(tls.accepts.load(Ordering::SeqCst), 1, "retried");
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Tls);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "tls");
    assert!(!s.retryable);
    assert!(!s.may_have_been_processed);
    assert!(!format!("{err:?}").contains("SECRET"));
    assert!(!serde_json::to_string(&s).unwrap().contains("SECRET"));
}

#[tokio::test]
async fn agents27_misnamed_certificate_reads_as_documented() {
    let (config, der) = server_config(&["api.example.com"], &[b"http/1.1"]);
    let tls = serve(Some(config)).await;
    let err = call(
        https_client_with_roots(vec![der]).unwrap(),
        format!("https://{}/orders", tls.addr),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"api.example.com\"))"
    );
    assert_eq!(tls.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

#[tokio::test]
async fn agents27_closed_mid_handshake_is_connect_and_retried() {
    let tls = serve(None).await;
    let err = call(https_client(), format!("https://{}/orders", tls.addr))
        .await
        .unwrap_err();
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Connect, "{err}");
    assert_eq!(tls.accepts.load(Ordering::SeqCst), 4, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(
        err.to_string().starts_with("gave up after 4 attempts: "),
        "{err}"
    );
}

#[tokio::test]
async fn agents27_roots_that_are_not_certificates_are_a_config_error() {
    for bad in [
        vec![],
        vec![0u8],
        vec![0x30, 0x03, 1, 2, 3],
        vec![0xff; 300],
    ] {
        let err = https_client_with_roots(vec![CertificateDer::from(bad.clone())]).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{bad:?}: {err}");
        assert!(!err.to_string().is_empty());
    }
    // The second of three is named.
    let (_, good) = server_config(&["a"], &[]);
    let err = https_client_with_roots(vec![
        good.clone(),
        CertificateDer::from(vec![1u8, 2, 3]),
        good,
    ])
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains('1') || text.contains("second") || text.contains('2'),
        "{text}"
    );
}

#[tokio::test]
async fn agents27_config_alpn_is_replaced_by_http11() {
    let (config, der) = server_config(&["127.0.0.1"], &[b"http/1.1"]);
    let tls = serve(Some(config)).await;
    let mut roots = sturdy::tls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client_config = sturdy::tls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client_config.alpn_protocols = vec![b"h2".to_vec()];
    let res = call(
        https_client_with_config(client_config),
        format!("https://{}/", tls.addr),
    )
    .await
    .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
}

#[tokio::test]
async fn agents27_https_client_sends_plain_http_too() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "plain" }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let res = call(https_client(), format!("http://{addr}/"))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "plain");
}
