//! s36: `sturdy::tls` against loopback rustls servers with rcgen certificates, checked against
//! docs/guides/tls.md and the rustdoc of `sturdy::tls`: client certificates, servers that refuse
//! or break the handshake, hostile roots, secrets in error text, composition with tower's
//! layers and cancellation, and the metrics a TLS failure records.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use sturdy::core::classify::{delivery, describe};
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::server::WebPkiClientVerifier;
use sturdy::tls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use sturdy::tls::{
    https_client, https_client_with_config, https_client_with_roots, CertificateDer,
};
use sturdy::ClientBuilder;
use tokio::io::AsyncReadExt;
use tower::{Service, ServiceExt};

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) struct Ca {
    pub(crate) cert: rcgen::Certificate,
    pub(crate) issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

pub(crate) fn ca() -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "s36 test authority");
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

/// A leaf for `names` signed by `ca`, for server or client authentication.
pub(crate) fn leaf(
    ca: &Ca,
    names: &[&str],
    client: bool,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

pub(crate) fn server_config(
    ca: &Ca,
    names: &[&str],
    client_auth: bool,
    tls13: bool,
) -> Arc<ServerConfig> {
    let (cert, key) = leaf(ca, names, false);
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13 {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12]
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap();
    let builder = if client_auth {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    Arc::new(builder.with_single_cert(vec![cert], key).unwrap())
}

/// Counts TCP connections accepted and requests answered.
pub(crate) struct Srv {
    pub(crate) addr: SocketAddr,
    pub(crate) conns: Arc<AtomicUsize>,
    pub(crate) requests: Arc<AtomicUsize>,
}

pub(crate) async fn serve(config: Arc<ServerConfig>) -> Srv {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(listener, acceptor)
}

pub(crate) fn serve_on(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Srv {
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (conns.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let r = r.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let hello = hyper::service::service_fn(move |_req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hello)
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

/// A server that reads the ClientHello and then `end`s the connection its own way.
async fn handshake_breaker(reset: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = tcp.read(&mut buf).await;
                if reset {
                    #[allow(deprecated)]
                    let _ = tcp.set_linger(Some(Duration::ZERO));
                    drop(tcp);
                } else {
                    // Stall: hold the connection and never answer.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    drop(tcp);
                }
            });
        }
    });
    (addr, conns)
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(5), Duration::from_millis(10)).unwrap(),
        )
        .with_seed(36)
}

fn get(url: String) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

fn post(url: String) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the call did not end in time")
}

/// The whole chain of an error, Display and Debug.
fn all_text(err: &BoxError) -> String {
    let mut out = format!("{err} {err:?}");
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
    while let Some(e) = cur {
        out.push_str(&format!(" | {e} {e:?}"));
        cur = e.source();
    }
    out
}

fn client_config_with_client_cert(ca: &Ca) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let (cert, key) = leaf(ca, &["client.s36"], true);
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .unwrap()
}

/// tls.md, table: "`https_client_with_config(config)` | whatever your `rustls::ClientConfig`
/// says (client certificates, a custom verifier, another provider)".
#[tokio::test]
async fn s36_tls_client_certificate_through_with_config_reaches_a_mutual_tls_server() {
    let ca = ca();
    for tls13 in [true, false] {
        let srv = serve(server_config(&ca, &["127.0.0.1"], true, tls13)).await;
        let http = https_client_with_config(client_config_with_client_cert(&ca));
        let client = ClientBuilder::new().build(http);
        let res = within(client.oneshot(get(format!("https://{}/", srv.addr))))
            .await
            .unwrap_or_else(|e| panic!("tls13={tls13}: {e}"));
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
        assert_eq!(srv.requests.load(Ordering::SeqCst), 1);
    }
}

/// tls.md, "When the certificate is refused": "The handshake fails before the request is
/// written, so `classify::delivery` says `Delivery::NotSent`. ... other handshake failures (an
/// alert, a connection closed mid-handshake) stay `ErrorKind::Connect` and are retried."
/// Here the server refuses the client (no client certificate) with an alert, over TLS 1.2.
#[tokio::test]
async fn s36_tls_server_refusing_the_client_tls12_is_connect_not_sent_and_retried() {
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], true, false)).await;
    let http = https_client_with_roots(vec![ca.cert.der().clone()]).unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(3))
        .build(http);
    let err = within(client.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap_err();
    let text = err.to_string();
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Connect, "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 3, "{text}");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);
    assert!(text.contains("TLS handshake failed"), "{text}");
}

/// The same doc sentences, over TLS 1.3 (the default of both sides): "other handshake failures
/// (an alert, ...) stay `ErrorKind::Connect` and are retried", "the handshake fails before the
/// request is written, so ... `Delivery::NotSent`"; for a POST, "`; the request was not sent, so
/// it is safe to send again`" is what a refused handshake says.
#[tokio::test]
async fn s36_tls_server_refusing_the_client_tls13_is_connect_not_sent_and_retried() {
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], true, true)).await;
    let http = https_client_with_roots(vec![ca.cert.der().clone()]).unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(3))
        .without_idempotency()
        .build(http);
    let err = within(
        client
            .clone()
            .oneshot(get(format!("https://{}/", srv.addr))),
    )
    .await
    .unwrap_err();
    let get_text = err.to_string();
    let get_kind = sturdy::core::find::<sturdy::core::Error>(&*err).map(|e| e.kind().clone());
    let get_delivery = delivery(&*err);
    let get_conns = srv.conns.load(Ordering::SeqCst);
    let err = within(client.oneshot(post(format!("https://{}/orders", srv.addr))))
        .await
        .unwrap_err();
    let post_text = err.to_string();
    assert_eq!(
        srv.requests.load(Ordering::SeqCst),
        0,
        "the server never read one"
    );
    assert_eq!(
        (get_kind, get_delivery, get_conns),
        (Some(ErrorKind::Connect), Delivery::NotSent, 3),
        "GET: {get_text}"
    );
    assert!(
        post_text.contains("safe to send again"),
        "POST: {post_text}"
    );
}

/// tls.md: "other handshake failures (an alert, a connection closed mid-handshake) stay
/// `ErrorKind::Connect` and are retried"; the server here resets the connection (RST) after
/// reading the ClientHello.
#[tokio::test]
async fn s36_tls_reset_mid_handshake_is_connect_not_sent_and_retried() {
    let (addr, conns) = handshake_breaker(true).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(3))
        .build(https_client());
    let err = within(client.oneshot(get(format!("https://{addr}/"))))
        .await
        .unwrap_err();
    let text = err.to_string();
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Connect, "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert_eq!(conns.load(Ordering::SeqCst), 3, "{text}");
}

/// tls.md, table: `https_client_with_roots(extra)` "can fail: a `Config` error naming a
/// certificate that is not valid X.509"; rustdoc: "A `Config` error naming the certificate that
/// is not a valid X.509 certificate." The second of three, PEM text given as if it were DER (a
/// common mistake), must be named as the second.
#[test]
fn s36_tls_the_bad_one_of_several_roots_is_named() {
    let ca = ca();
    let good = ca.cert.der().clone();
    let pem_as_der = CertificateDer::from(ca.cert.pem().into_bytes());
    let err = https_client_with_roots(vec![good.clone(), pem_as_der, good]).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config);
    let text = err.to_string();
    assert!(text.contains("#2"), "{text}");
    assert!(!text.contains("#1") && !text.contains("#3"), "{text}");
    // No roots at all is no error: the Mozilla set is still trusted.
    assert!(https_client_with_roots(Vec::new()).is_ok());
}

/// README / tls.md: the client "is `Clone + Send + Sync`"; README: "keep one in axum `State` or
/// an `Arc`, and clone it per call": a call over HTTPS runs on a spawned task of a multi-thread
/// runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s36_tls_the_composed_https_client_is_send_sync_and_calls_from_spawned_tasks() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>(_: &T) {}
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1", "localhost"], false, true)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots(vec![ca.cert.der().clone()]).unwrap());
    send_sync_clone(&client);
    let shared = Arc::new(client);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = shared.clone();
        let host = if i % 2 == 0 { "127.0.0.1" } else { "LOCALHOST" };
        let url = format!("https://{host}:{}/", srv.addr.port());
        tasks.push(tokio::spawn(
            async move { (*c).clone().oneshot(get(url)).await },
        ));
    }
    for t in tasks {
        let res = within(t).await.unwrap().unwrap();
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
}

/// tls.md: a certificate for the name called is trusted (the guide's own example names
/// `127.0.0.1`); here the IPv6 loopback, `https://[::1]:port/`, with a certificate for `::1`.
#[tokio::test]
async fn s36_tls_ipv6_literal_host_is_verified_against_an_ip_certificate() {
    let Ok(listener) = tokio::net::TcpListener::bind("[::1]:0").await else {
        return; // no IPv6 loopback here
    };
    let ca = ca();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&ca, &["::1"], false, true));
    let srv = serve_on(listener, acceptor);
    let client =
        ClientBuilder::new().build(https_client_with_roots(vec![ca.cert.der().clone()]).unwrap());
    let res = within(client.oneshot(get(format!("https://[::1]:{}/", srv.addr.port()))))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(res.status(), 200);
}

/// events.rs: what an event carries "is safe to log and to label with: hosts (the authority,
/// never the `user:password@` part) ... Never a secret, a full URL, a query"; README: "Errors
/// say what happened"; an untrusted certificate's error, with secrets in the URL, names the
/// cause and none of the secrets.
#[tokio::test]
async fn s36_tls_refused_certificate_error_names_the_cause_and_no_url_secret() {
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], false, true)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client());
    let url = format!(
        "https://alice:hunter2pw@{}/v1/orders?access_token=tok3n5ecret",
        srv.addr
    );
    let err = within(client.oneshot(get(url))).await.unwrap_err();
    let text = all_text(&err);
    assert!(
        err.to_string()
            .starts_with("TLS handshake failed (invalid peer certificate: UnknownIssuer)"),
        "{err}"
    );
    for secret in ["hunter2pw", "tok3n5ecret", "alice"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(
        describe(&*err).contains("UnknownIssuer"),
        "{}",
        describe(&*err)
    );
}

/// metrics.md: `sturdy.auth.token.failures` has label `error.type`, which is "`tls`" among the
/// short names; tls.md: "The same client can fetch OAuth2 tokens from an https:// endpoint." A
/// token endpoint with an untrusted certificate is a `tls` failure of the token endpoint's host,
/// and the client secret shows nowhere.
#[tokio::test]
async fn s36_tls_untrusted_token_endpoint_counts_a_tls_token_failure_without_the_secret() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let ca = ca();
    let auth_srv = serve(server_config(&ca, &["127.0.0.1"], false, true)).await;
    let http = https_client();
    let tokens = sturdy::auth::ClientCredentials::new(
        http.clone(),
        format!("https://{}/oauth/token", auth_srv.addr).as_str(),
        "s36-client",
        "cl1ent5ecret",
    )
    .unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(1))
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(http);
    let err = within(client.oneshot(get("http://127.0.0.1:9/x".to_owned())))
        .await
        .unwrap_err();
    let text = all_text(&err);
    assert!(!text.contains("cl1ent5ecret"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    let port = auth_srv.addr.port().to_string();
    let rs: Vec<_> = snap
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, v)| {
            let (_, key) = ck.into_parts();
            let labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, v)
        })
        .collect();
    let failures: Vec<_> = rs
        .iter()
        .filter(|r| r.0 == "sturdy.auth.token.failures")
        .collect();
    assert!(!failures.is_empty(), "{rs:?}");
    for f in &failures {
        let has = |k: &str, v: &str| f.1.iter().any(|(a, b)| a == k && b == v);
        assert!(
            has("server.address", "127.0.0.1") && has("server.port", &port),
            "{f:?}"
        );
        assert!(has("error.type", "tls"), "{f:?}");
        assert!(matches!(f.2, DebugValue::Counter(n) if n >= 1));
    }
}

/// metrics.md: the breaker counts failures ("breaker state changes", labels `server.address`,
/// `server.port`); tls.md: an untrusted certificate is "not retryable ..., counted by the circuit
/// breaker as a failure of the dependency". No retry is counted, and `sturdy.retry.stopped`
/// ("retryable failures that were not retried") counts nothing either.
#[tokio::test]
async fn s36_tls_untrusted_certificate_metrics_open_the_breaker_and_count_no_retry() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], false, true)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_circuit_breaker(
            sturdy::circuit::CircuitBreakerLayer::new().with_consecutive_failures(2),
        )
        .build(https_client());
    for _ in 0..2 {
        let err = within(
            client
                .clone()
                .oneshot(get(format!("https://{}/", srv.addr))),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }
    let port = srv.addr.port().to_string();
    let rs: Vec<_> = snap
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(ck, _, _, v)| {
            let (_, key) = ck.into_parts();
            let labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, v)
        })
        .collect();
    let names: Vec<&str> = rs.iter().map(|r| r.0.as_str()).collect();
    assert!(!names.contains(&"sturdy.retry.retries"), "{rs:?}");
    assert!(!names.contains(&"sturdy.retry.stopped"), "{rs:?}");
    let open = rs.iter().find(|r| {
        r.0 == "sturdy.circuit.transitions"
            && r.1
                .contains(&("sturdy.circuit.state".to_owned(), "open".to_owned()))
    });
    let Some(open) = open else {
        panic!("no transition to open: {rs:?}")
    };
    assert!(open
        .1
        .contains(&("server.address".to_owned(), "127.0.0.1".to_owned())));
    assert!(open.1.contains(&("server.port".to_owned(), port)));
}

/// README: "the client ... can sit under a `Buffer` or over a `ConcurrencyLimit`, driven by ...
/// a kept `ready().await?.call(req)`". A caller that gives up on a call stuck in a TLS
/// handshake (the server stalls) must free its place: the next call through the same
/// `ConcurrencyLimit(1)` goes through.
#[tokio::test]
async fn s36_tls_a_dropped_call_stuck_in_the_handshake_frees_the_concurrency_limit() {
    let ca = ca();
    let good = serve(server_config(&ca, &["127.0.0.1"], false, true)).await;
    let (stall, stall_conns) = handshake_breaker(false).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots(vec![ca.cert.der().clone()]).unwrap());
    let mut svc = tower::ServiceBuilder::new()
        .buffer(4)
        .concurrency_limit(1)
        .service(client);
    let stuck = tokio::time::timeout(Duration::from_millis(300), async {
        svc.ready()
            .await
            .unwrap()
            .call(get(format!("https://{stall}/")))
            .await
    })
    .await;
    assert!(stuck.is_err(), "the stalled handshake answered: {stuck:?}");
    assert_eq!(stall_conns.load(Ordering::SeqCst), 1);
    let res = within(async {
        svc.ready()
            .await
            .unwrap()
            .call(get(format!("https://{}/", good.addr)))
            .await
    })
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
}

/// tls.md: "Every constructor returns a `sturdy::tls::HttpsClient`: a
/// `hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>`" and
/// "`webpki_roots()` returns the Mozilla set as a `RootCertStore` to add to": the Mozilla set
/// plus one's own authority, through `https_client_with_config`, trusts the authority's server.
#[tokio::test]
async fn s36_tls_webpki_roots_plus_an_authority_through_with_config() {
    use hyper_util::client::legacy::connect::HttpConnector;
    let _typed: hyper_util::client::legacy::Client<
        sturdy::tls::HttpsConnector<HttpConnector>,
        Full<Bytes>,
    > = https_client();
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], false, false)).await;
    let mut roots = sturdy::tls::webpki_roots();
    let mozilla = roots.len();
    roots.add(ca.cert.der().clone()).unwrap();
    assert_eq!(roots.len(), mozilla + 1);
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = ClientBuilder::new().build(https_client_with_config(config));
    let res = within(client.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// metrics.md, table: `sturdy.auth.token.failures` counts "failed token requests" with
/// `error.type` (`timeout` among the short names); auth rustdoc: "Each token request is bounded
/// by `with_request_timeout` [30 s] whatever the client does". A token endpoint that stalls in
/// the TLS handshake ends the call in time, as a timeout of the token endpoint's host.
#[tokio::test]
async fn s36_tls_token_endpoint_stalling_in_the_handshake_is_a_timed_token_failure() {
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let (stall, conns) = handshake_breaker(false).await;
    let http = https_client();
    let tokens = sturdy::auth::ClientCredentials::new(
        http.clone(),
        format!("https://{stall}/oauth/token").as_str(),
        "s36-client",
        "cl1ent5ecret",
    )
    .unwrap()
    .with_request_timeout(Duration::from_millis(200));
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(1))
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(http);
    let start = tokio::time::Instant::now();
    let err = within(client.oneshot(get("http://127.0.0.1:9/x".to_owned())))
        .await
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(conns.load(Ordering::SeqCst) >= 1);
    let text = all_text(&err);
    assert!(!text.contains("cl1ent5ecret"), "{text}");
    assert!(text.to_lowercase().contains("token"), "{err}");
    let port = stall.port().to_string();
    let failures: Vec<_> = snap
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(ck, _, _, v)| {
            let (_, key) = ck.into_parts();
            (key.name() == "sturdy.auth.token.failures").then(|| {
                let labels: Vec<(String, String)> = key
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                (labels, v)
            })
        })
        .collect();
    assert!(!failures.is_empty(), "no token failure counted");
    for (labels, _) in &failures {
        let has = |k: &str, v: &str| labels.iter().any(|(a, b)| a == k && b == v);
        assert!(has("server.port", &port), "{labels:?}");
        assert!(has("error.type", "timeout"), "{labels:?}");
    }
}
