//! HTTPS through `sturdy::tls` against loopback TLS servers with certificates made by the test.

#![cfg(all(feature = "tls", feature = "full"))]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use rcgen::{CertificateParams, CertifiedKey, DnType, KeyPair};
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::classify::{classify_error, delivery, describe};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::ServerConfig;
use sturdy::tls::{https_client, https_client_with_roots, CertificateDer};
use sturdy::version::VersionLayer;
use sturdy::ClientBuilder;
use sturdy_chaos::{ChaosServer, Knobs};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A self-signed certificate for `names`, with its own common name.
fn certificate(common_name: &str, names: &[&str]) -> CertifiedKey<KeyPair> {
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let signing_key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&signing_key).unwrap();
    CertifiedKey { cert, signing_key }
}

fn trust(cert: &CertifiedKey<KeyPair>) -> CertificateDer<'static> {
    cert.cert.der().clone()
}

/// A TLS front on `127.0.0.1:0` that presents `cert` and passes the bytes on to `backend`.
struct TlsFront {
    addr: SocketAddr,
    task: JoinHandle<()>,
    /// The protocol each accepted connection agreed by ALPN (`None`: the client offered none
    /// the server has).
    alpn: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

impl TlsFront {
    async fn start(backend: SocketAddr, cert: &CertifiedKey<KeyPair>) -> Self {
        Self::start_offering(backend, cert, Vec::new()).await
    }

    /// A front whose server offers `alpn` (in its order of preference).
    async fn start_offering(
        backend: SocketAddr,
        cert: &CertifiedKey<KeyPair>,
        alpn: Vec<Vec<u8>>,
    ) -> Self {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
        let config = ServerConfig::builder_with_provider(Arc::new(
            sturdy::tls::rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![trust(cert)], key)
        .unwrap();
        let mut config = config;
        config.alpn_protocols = alpn;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_task = seen.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let seen = seen_by_task.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let agreed = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    seen.lock().unwrap().push(agreed);
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self {
            addr,
            task,
            alpn: seen,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn retry() -> RetryLayer {
    let backoff =
        Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(20)).unwrap();
    RetryLayer::new().with_backoff(backoff).with_seed(5)
}

fn get(url: String) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

#[tokio::test]
async fn a_call_through_the_stack_over_https_succeeds() {
    let chaos = ChaosServer::start(Knobs {
        fail_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let cert = certificate("api", &["127.0.0.1", "localhost"]);
    let front = TlsFront::start(chaos.addr(), &cert).await;
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(https_client_with_roots([trust(&cert)]).unwrap());
    let res = client
        .oneshot(
            Request::post(front.url("/orders"))
                .header("content-type", "application/json")
                .body(Full::from(r#"{"item":"book"}"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "{body:?}");
    // The 503 was retried over a new TLS connection or the same one: one order either way.
    assert_eq!(chaos.stats().orders_committed, 1);
    assert_eq!(chaos.stats().server_errors, 1);
}

#[tokio::test]
async fn the_readme_quick_start_runs_over_https() {
    let chaos = ChaosServer::start(Knobs {
        require_auth: true,
        api_version: Some("2024-06-01".into()),
        fail_next: 1,
        ..Knobs::default()
    })
    .await
    .unwrap();
    let cert = certificate("api", &["127.0.0.1"]);
    let front = TlsFront::start(chaos.addr(), &cert).await;

    // As in the README, with the test's certificate trusted and loopback URLs.
    let http = https_client_with_roots([trust(&cert)]).unwrap();
    let tokens =
        ClientCredentials::new(http.clone(), &front.url("/oauth/token"), "client", "secret")
            .unwrap()
            .with_scopes(["orders:write"]);
    let client = ClientBuilder::new()
        .with_retry(retry().with_deadline(Duration::from_secs(30)))
        .with_auth(AuthLayer::oauth2(tokens))
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(http);
    let req = Request::post(front.url("/orders"))
        .body(Full::from(r#"{"item":"book"}"#))
        .unwrap();
    let res = client.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let st = chaos.stats();
    assert_eq!((st.tokens_issued, st.orders_committed), (1, 1));
}

/// The docs: "HTTP/1.1 (ALPN `http/1.1`)", and `https_client_with_config`'s "ALPN list is
/// replaced by `http/1.1`". A server that prefers h2 agrees on http/1.1 (it would agree on
/// nothing if the client offered nothing).
#[tokio::test]
async fn the_client_offers_http_1_1_by_alpn() {
    let chaos = ChaosServer::start(Knobs::default()).await.unwrap();
    let cert = certificate("api", &["127.0.0.1"]);
    let front = TlsFront::start_offering(
        chaos.addr(),
        &cert,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
    .await;
    let res = https_client_with_roots([trust(&cert)])
        .unwrap()
        .oneshot(get(front.url("/health")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // A config of one's own that asks for h2 is given http/1.1 instead.
    let mut roots = sturdy::tls::rustls::RootCertStore::empty();
    roots.add(trust(&cert)).unwrap();
    let mut config = sturdy::tls::rustls::ClientConfig::builder_with_provider(Arc::new(
        sturdy::tls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let res = sturdy::tls::https_client_with_config(config)
        .oneshot(get(front.url("/health")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        *front.alpn.lock().unwrap(),
        vec![Some(b"http/1.1".to_vec()), Some(b"http/1.1".to_vec())]
    );
}

#[tokio::test]
async fn plain_http_goes_through_the_same_client() {
    let chaos = ChaosServer::start(Knobs::default()).await.unwrap();
    let res = https_client()
        .oneshot(get(chaos.url("/health")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_tls_error_and_nothing_is_sent() {
    let chaos = ChaosServer::start(Knobs::default()).await.unwrap();
    let served = certificate("served", &["127.0.0.1"]);
    let other = certificate("other", &["127.0.0.1"]);
    let front = TlsFront::start(chaos.addr(), &served).await;

    // Trusting another certificate.
    let err = https_client_with_roots([trust(&other)])
        .unwrap()
        .oneshot(get(front.url("/health")))
        .await
        .unwrap_err();
    assert_eq!(
        describe(&err),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer)"
    );
    assert_eq!(classify_error(&err), ErrorKind::Tls);
    assert_eq!(delivery(&err), Delivery::NotSent);

    // Trusting only the Mozilla roots, through the whole stack: not retried, it cannot help.
    let client = ClientBuilder::new()
        .with_retry(retry())
        .build(https_client());
    let err = client.oneshot(get(front.url("/health"))).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("TLS handshake failed (invalid peer certificate: UnknownIssuer)"),
        "{msg}"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(
        err.downcast_ref::<sturdy::core::Error>()
            .unwrap()
            .report()
            .unwrap()
            .attempts(),
        1
    );
    assert_eq!(chaos.stats().requests, 0);
}

#[tokio::test]
async fn a_certificate_for_another_name_is_a_tls_error() {
    let chaos = ChaosServer::start(Knobs::default()).await.unwrap();
    let cert = certificate("api", &["api.example.com"]);
    let front = TlsFront::start(chaos.addr(), &cert).await;
    let err = https_client_with_roots([trust(&cert)])
        .unwrap()
        .oneshot(get(front.url("/health")))
        .await
        .unwrap_err();
    let words = describe(&err);
    assert!(words.starts_with("TLS handshake failed ("), "{words}");
    assert!(words.contains("certificate"), "{words}");
    assert!(words.contains("127.0.0.1"), "{words}");
    assert_eq!(classify_error(&err), ErrorKind::Tls);
    assert_eq!(chaos.stats().requests, 0);
}

#[cfg(feature = "tls-native-roots")]
#[tokio::test]
async fn the_systems_roots_do_not_trust_a_self_signed_certificate() {
    let chaos = ChaosServer::start(Knobs::default()).await.unwrap();
    let cert = certificate("api", &["127.0.0.1"]);
    let front = TlsFront::start(chaos.addr(), &cert).await;
    match sturdy::tls::https_client_with_native_roots() {
        Ok(client) => {
            let err = client.oneshot(get(front.url("/health"))).await.unwrap_err();
            assert!(
                describe(&err).starts_with("TLS handshake failed ("),
                "{err}"
            );
        }
        // A machine without a certificate store says so.
        Err(e) => assert_eq!(e.kind(), &ErrorKind::Config),
    }
}
