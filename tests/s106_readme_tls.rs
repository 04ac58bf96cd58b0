#![cfg(feature = "full")]
//! Outside round s106: README.md, docs/guides/tls.md, docs/guides/reqwest.md and the reqwest
//! part of docs/guides/coalesce.md, read literally and tested in the corners earlier rounds
//! left. TLS (rcgen certificates, a rustls server on 127.0.0.1): a revoked certificate (CRL
//! through `https_client_with_config`), expired and missing intermediates, rustls' process-wide
//! default provider, SNI kept as the config says, a host in capitals, an untrusted certificate
//! shared by coalesced callers, the attempt timeout against a slow body. reqwest: redirects from
//! `http` to an `https` target this build's reqwest cannot speak, an `https` URL behind a waiting
//! middleware or a token wait, `same_origin_redirects(0)`, `url()`/`remote_addr()` after a
//! redirect, a `Trace` extension, `from_reqwest_error` on `json`/`bytes` errors, the smallest body
//! limits, coalesced calls whose sender leaves. The README's demo table, reproduced in process
//! against `sturdy-chaos` (all three rows; sturdy's through both reqwest ways in).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sturdy::core::classify::delivery as core_delivery;
use sturdy::core::{Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::tls::{https_client_with_config, https_client_with_roots, CertificateDer};
use sturdy::ClientBuilder;
use sturdy_reqwest::{delivery, find, ReqwestService, SturdyMiddleware};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tower::ServiceExt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the call did not end in time")
}

fn quick_retry() -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(5), Duration::from_millis(20))
                .unwrap(),
        )
        .with_seed(106)
}

fn get(url: String) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

fn post(url: String, body: &'static str) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::from(body))
        .unwrap()
}

fn sturdy_err(e: &BoxError) -> &sturdy::core::Error {
    sturdy::core::find::<sturdy::core::Error>(&**e).expect("a sturdy error in the chain")
}

fn mw(
    make: impl Fn() -> ClientBuilder,
    body_limit: Option<usize>,
) -> reqwest_middleware::ClientWithMiddleware {
    let mut m = SturdyMiddleware::new(move |next| make().with_retry(quick_retry()).build(next));
    if let Some(n) = body_limit {
        m = m.with_body_limit(n);
    }
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(m)
        .build()
}

// ---------------------------------------------------------------------------------------------
// A plain HTTP server whose answers a closure scripts.

#[derive(Clone, Debug)]
struct Hit {
    method: String,
    path: String,
    key: Option<String>,
    body: Bytes,
}

#[derive(Clone)]
struct Scripted {
    base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Scripted {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    fn count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

type Answer = (u16, Vec<(&'static str, String)>, String);

async fn scripted<F>(answer: F) -> Scripted
where
    F: Fn(usize, &Hit) -> Answer + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let answer = Arc::new(answer);
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let h = h.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        let answer = answer.clone();
                        async move {
                            let method = req.method().to_string();
                            let key = req
                                .headers()
                                .get("idempotency-key")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned);
                            let path = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let hit = Hit {
                                method,
                                path,
                                key,
                                body,
                            };
                            let n = {
                                let mut v = h.lock().unwrap();
                                v.push(hit.clone());
                                v.len()
                            };
                            let (status, headers, body) = answer(n, &hit);
                            let mut res = http::Response::builder().status(status);
                            for (k, v) in headers {
                                res = res.header(k, v);
                            }
                            Ok::<_, Infallible>(res.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Scripted { base, hits }
}

// ---------------------------------------------------------------------------------------------
// reqwest: a redirect from http to an https target. This build's reqwest has no TLS feature,
// so the hop is refused ("scheme is not http"), after the server got the request.

/// reqwest.md, the table: "`is_connect()` for an `https` URL when reqwest has no TLS feature
/// ("scheme is not http") | `Config` | no (`NotSent`); maybe at a redirect's target | no".
/// A POST the server received and answered 303 or 307 with an `https://` Location: the call
/// fails without a retry, as `Config`, and reads "may have been processed" (never "safe to send
/// again"), through `SturdyMiddleware` with `ClientBuilder`'s key.
#[tokio::test]
async fn s106_reqwest_mw_post_redirected_to_https_without_tls_may_have_been_processed() {
    for status in [303u16, 307, 308] {
        let s = scripted(move |_, hit| {
            if hit.path.starts_with("/start") {
                (
                    status,
                    vec![("location", "https://127.0.0.1:9/orders/o_1".to_owned())],
                    String::new(),
                )
            } else {
                (200, vec![], "other".to_owned())
            }
        })
        .await;
        let client = mw(ClientBuilder::new, None);
        let err = within(
            client
                .post(s.url("/start"))
                .header("content-type", "application/json")
                .body(r#"{"item":"book"}"#)
                .send(),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert_eq!(s.count(), 1, "{status}: not retried: {text}");
        assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{status}: {text}");
        assert!(!text.contains("safe to send again"), "{status}: {text}");
        assert!(!text.contains("not sent"), "{status}: {text}");
        let e = find::<sturdy::core::Error>(&err).expect("sturdy's error");
        assert_eq!(e.kind(), &ErrorKind::Config, "{status}: {text}");
        let report = e.report().expect("the retry layer's report");
        assert_eq!(report.attempts(), 1, "{status}: {text}");
    }
}

/// As above through `ReqwestService` at the bottom of `ClientBuilder` (reqwest.md: "Both ways
/// convert every reqwest error at the boundary by the rules of `from_reqwest_error`"; the
/// https-without-TLS row: "maybe at a redirect's target"), for a POST and for a GET.
#[tokio::test]
async fn s106_reqwest_service_redirected_to_https_without_tls_may_have_been_processed() {
    let s = scripted(|_, hit| {
        if hit.path.starts_with("/start") {
            (
                307,
                vec![("location", "https://127.0.0.1:9/next".to_owned())],
                String::new(),
            )
        } else {
            (200, vec![], "other".to_owned())
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    for (i, req) in [
        post(s.url("/start"), r#"{"item":"book"}"#),
        get(s.url("/start")),
    ]
    .into_iter()
    .enumerate()
    {
        let method = req.method().clone();
        let err = within(client.clone().oneshot(req)).await.unwrap_err();
        let text = err.to_string();
        assert_eq!(s.count(), i + 1, "{method}: sent once: {text}");
        assert_eq!(
            core_delivery(&*err),
            Delivery::MaybeProcessed,
            "{method}: {text}"
        );
        assert!(!text.contains("safe to send again"), "{method}: {text}");
        assert_eq!(
            sturdy_err(&err).kind(),
            &ErrorKind::Config,
            "{method}: {text}"
        );
    }
}

/// reqwest.md: "`is_connect()` for an `https` URL when reqwest has no TLS feature | `Config` |
/// no (`NotSent`)": the same https URL asked for directly, through both ways, is not sent,
/// not retried, and reaches no server.
#[tokio::test]
async fn s106_reqwest_https_url_asked_directly_is_config_not_sent_both_ways() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let a = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_tcp, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
        }
    });
    let url = format!("https://{addr}/orders");
    let client = mw(ClientBuilder::new, None);
    let err = within(client.post(&url).body("{}").send())
        .await
        .unwrap_err();
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    assert_eq!(
        find::<sturdy::core::Error>(&err).unwrap().kind(),
        &ErrorKind::Config,
        "{err}"
    );
    let svc = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let err = within(svc.oneshot(post(url, "{}"))).await.unwrap_err();
    assert_eq!(core_delivery(&*err), Delivery::NotSent, "{err}");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Config, "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// TLS with rcgen certificates.

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

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
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert,
        issuer: rcgen::Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, names: &[&str], serial: u64) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Arc<ServerConfig> {
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

struct Srv {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// An HTTPS server; `body_delay` holds the body (content-length 5, "hello") after the head.
async fn serve_tls(config: Arc<ServerConfig>, body_delay: Option<Duration>) -> Srv {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // A hand-rolled HTTP/1.1 answer, so the body can be held back.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tls.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                r2.fetch_add(1, Ordering::SeqCst);
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tls.flush().await;
                if let Some(d) = body_delay {
                    tokio::time::sleep(d).await;
                }
                let _ = tls.write_all(b"hello").await;
                let _ = tls.flush().await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Srv {
        addr,
        conns,
        requests,
    }
}

fn crl(ca: &Ca, revoked: &[u64]) -> rustls::pki_types::CertificateRevocationListDer<'static> {
    let params = rcgen::CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2024, 1, 1),
        next_update: rcgen::date_time_ymd(2099, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from(*s),
                revocation_time: rcgen::date_time_ymd(2024, 6, 1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params.signed_by(&ca.issuer).unwrap().der().clone()
}

/// tls.md: "`https_client_with_config(config)` | whatever your `rustls::ClientConfig` says
/// (client certificates, a custom verifier, ...)"; "A certificate the client does not trust is
/// `ErrorKind::Tls`: not retryable ..."; "The handshake fails before the request is written, so
/// `classify::delivery` says `Delivery::NotSent`"; for a POST "`; the request was not sent, so
/// it is safe to send again`". A certificate revoked by its authority's CRL (rustls' own
/// verifier, given the CRL) is not trusted: one handshake, no request, `Tls`, not sent.
#[tokio::test]
async fn s106_tls_a_revoked_certificate_is_tls_not_sent_and_not_retried() {
    let ca = ca("s106 revoking authority");
    let (cert, key) = leaf(&ca, &["127.0.0.1"], 0x5106);
    let srv = serve_tls(server_config(vec![cert], key), None).await;
    let mut roots = sturdy::tls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(vec![crl(&ca, &[0x5106])])
            .build()
            .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_config(config));

    let err = within(
        client
            .clone()
            .oneshot(get(format!("https://{}/", srv.addr))),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls, "{text}");
    assert_eq!(core_delivery(&*err), Delivery::NotSent, "{text}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1, "not retried: {text}");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0, "{text}");
    assert!(
        text.contains("TLS handshake failed (invalid peer certificate: Revoked)"),
        "{text}"
    );

    let err = within(client.oneshot(post(format!("https://{}/orders", srv.addr), "{}")))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls, "{text}");
    assert_eq!(core_delivery(&*err), Delivery::NotSent, "{text}");
    assert!(
        text.ends_with("; the request was not sent, so it is safe to send again"),
        "{text}"
    );
    assert_eq!(srv.conns.load(Ordering::SeqCst), 2, "{text}");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0, "{text}");
}

/// The same CRL names another serial: the certificate is trusted, the call goes through
/// (so the failure above is the revocation, not the CRL machinery).
#[tokio::test]
async fn s106_tls_a_crl_that_does_not_name_the_certificate_lets_it_through() {
    let ca = ca("s106 authority with a crl");
    let (cert, key) = leaf(&ca, &["127.0.0.1"], 0x7106);
    let srv = serve_tls(server_config(vec![cert], key), None).await;
    let mut roots = sturdy::tls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(vec![crl(&ca, &[0x5106])])
            .build()
            .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    let client = ClientBuilder::new().build(https_client_with_config(config));
    let res = within(client.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
}

/// tls.md: "The configuration names the ring provider itself instead of relying on rustls'
/// process-wide default, so it works in a program that also links rustls with another
/// provider." A process default that can negotiate nothing (no cipher suites) is installed; the
/// constructors that make their own configuration still speak TLS.
#[tokio::test]
async fn s106_tls_the_process_wide_default_provider_is_not_used() {
    let useless = rustls::crypto::CryptoProvider {
        cipher_suites: Vec::new(),
        ..rustls::crypto::ring::default_provider()
    };
    // Only the first install in a process wins; no other test of this file relies on the default.
    let _ = useless.install_default();
    let ca = ca("s106 default-provider authority");
    let (cert, key) = leaf(&ca, &["127.0.0.1"], 1);
    let srv = serve_tls(server_config(vec![cert], key), None).await;
    let client =
        ClientBuilder::new().build(https_client_with_roots([ca.cert.der().clone()]).unwrap());
    let res = within(client.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    // The Mozilla-roots constructor builds too, and does not panic.
    let _ = sturdy::tls::https_client();
}

/// tls.md, the table: "a certificate for another name | ... certificate not valid for name ...".
/// A certificate for `localhost`, called with the host written in another case: DNS names are
/// compared without regard to case, so it is trusted.
#[tokio::test]
async fn s106_tls_a_host_written_in_capitals_matches_its_certificate() {
    let ca = ca("s106 case authority");
    let (cert, key) = leaf(&ca, &["localhost"], 2);
    let srv = serve_tls(server_config(vec![cert], key), None).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots([ca.cert.der().clone()]).unwrap());
    let url = format!("https://LocalHost:{}/", srv.addr.port());
    let res = within(client.oneshot(get(url))).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
}

/// README: "A call returns when the response's head arrives: the attempt timeout and the
/// deadline bound the attempts up to it, not the reading of the body". Over HTTPS, with a
/// 100 ms attempt timeout and a 400 ms deadline, a body held 700 ms after the head is still read
/// whole.
#[tokio::test]
async fn s106_readme_https_attempt_timeout_and_deadline_do_not_cut_the_body() {
    let ca = ca("s106 slow-body authority");
    let (cert, key) = leaf(&ca, &["127.0.0.1"], 3);
    let srv = serve_tls(
        server_config(vec![cert], key),
        Some(Duration::from_millis(700)),
    )
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_deadline(Duration::from_millis(400)))
        .with_attempt_timeout(Duration::from_millis(100))
        .build(https_client_with_roots([ca.cert.der().clone()]).unwrap());
    let res = within(client.oneshot(get(format!("https://{}/", srv.addr))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = within(res.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// reqwest: the attempt timeout against a slow body.

/// A plain HTTP server that sends the head at once and "hello" after `delay`.
async fn slow_body(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let reqs = Arc::new(AtomicUsize::new(0));
    let r = reqs.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = tcp.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                r.fetch_add(1, Ordering::SeqCst);
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = tcp.flush().await;
                tokio::time::sleep(delay).await;
                let _ = tcp.write_all(b"hello").await;
                let _ = tcp.flush().await;
            });
        }
    });
    (base, reqs)
}

/// README: the attempt timeout bounds "the attempts up to [the head], not the reading of the
/// body"; reqwest.md: "An attempt the stack stops waiting for (sturdy's attempt timeout fired) is
/// cancelled". Through `SturdyMiddleware`, an attempt whose head came in time is not cancelled
/// while its body is read: a body held 600 ms behind a 150 ms attempt timeout arrives whole.
#[tokio::test]
async fn s106_reqwest_mw_attempt_timeout_does_not_cut_a_body_after_the_head() {
    let (base, reqs) = slow_body(Duration::from_millis(600)).await;
    let client = mw(
        || ClientBuilder::new().with_attempt_timeout(Duration::from_millis(150)),
        None,
    );
    let res = within(client.get(format!("{base}/slow")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = within(res.bytes()).await;
    assert_eq!(body.expect("the body after the head"), "hello");
    assert_eq!(reqs.load(Ordering::SeqCst), 1);
}

/// As above, with coalescing on (reqwest.md: `ClientBuilder::build` fits; coalesce.md: "The
/// retry layer's deadline ends with the head, so it does not bound this read" and the shared
/// read is bounded at 30 s): the body is still read whole.
#[tokio::test]
async fn s106_reqwest_mw_coalescing_attempt_timeout_does_not_cut_the_shared_body() {
    let (base, reqs) = slow_body(Duration::from_millis(600)).await;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_attempt_timeout(Duration::from_millis(150))
                .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
                .build(next)
        }))
        .build();
    let res = within(client.get(format!("{base}/slow")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = within(res.bytes()).await;
    assert_eq!(body.expect("the body after the head"), "hello");
    assert_eq!(reqs.load(Ordering::SeqCst), 1);
}

/// README, as above, with `ReqwestService` at the bottom of `ClientBuilder`: a 150 ms attempt
/// timeout does not cut a body that arrives 600 ms after the head.
#[tokio::test]
async fn s106_reqwest_service_attempt_timeout_does_not_cut_a_body_after_the_head() {
    let (base, reqs) = slow_body(Duration::from_millis(600)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_attempt_timeout(Duration::from_millis(150))
        .build(ReqwestService::new(reqwest::Client::new()));
    let res = within(client.oneshot(get(format!("{base}/slow"))))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = within(res.into_body().collect()).await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    assert_eq!(reqs.load(Ordering::SeqCst), 1);
}

/// `ResponseBody` rustdoc: "reqwest's timeout while reading is `Timeout`". reqwest.md: "reqwest's
/// `timeout` (on the client or on one request) bounds each attempt". A reqwest client timeout of
/// 200 ms that fires while the body is read gives a `sturdy_core::Error` of kind `Timeout`.
#[tokio::test]
async fn s106_reqwest_service_reqwests_timeout_while_reading_is_a_timeout_error() {
    let (base, _reqs) = slow_body(Duration::from_millis(800)).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(http));
    let res = within(client.oneshot(get(format!("{base}/slow"))))
        .await
        .unwrap();
    let err = within(res.into_body().collect()).await.unwrap_err();
    let e: &(dyn std::error::Error + 'static) = &err;
    let se = sturdy::core::find::<sturdy::core::Error>(e).expect("a sturdy error");
    assert_eq!(se.kind(), &ErrorKind::Timeout, "{err}");
}

// ---------------------------------------------------------------------------------------------
// reqwest: coalescing and a sender that leaves during the retry wait.

/// coalesce.md: "Behind `SturdyMiddleware` (reqwest), a shared call's attempts are sent by the
/// middleware call of the caller who started it, and cannot outlive that caller: when it goes
/// away, ... each caller who joined sends its own request (counted in `fallbacks`)"; "Leaving:
/// a caller that goes away ... leaves the call to the others". The caller that started a shared
/// GET goes away while the retry layer waits after a 503: every caller who joined still gets
/// the 200, none waits forever, and the server sees no more than one request per caller.
#[tokio::test]
async fn s106_reqwest_coalesced_sender_leaving_during_the_retry_wait_loses_no_caller() {
    let s = scripted(|n, _| {
        if n == 1 {
            (503, vec![], "busy".to_owned())
        } else {
            (200, vec![], format!("answer {n}"))
        }
    })
    .await;
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new().pair();
    let layer = Arc::new(Mutex::new(Some(layer)));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            let retry = RetryLayer::new()
                .with_backoff(
                    Backoff::exponential(Duration::from_millis(500), Duration::from_millis(500))
                        .unwrap(),
                )
                .with_seed(106);
            ClientBuilder::new()
                .with_retry(retry)
                .with_coalesce(layer.lock().unwrap().take().expect("built once"))
                .build(next)
        }))
        .build();
    let url = s.url("/shared");
    let leader = tokio::spawn({
        let (c, u) = (client.clone(), url.clone());
        async move { c.get(u).send().await }
    });
    let t0 = Instant::now();
    while s.count() < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the first attempt never came"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let followers: Vec<_> = (0..3)
        .map(|_| {
            let (c, u) = (client.clone(), url.clone());
            tokio::spawn(async move { c.get(u).send().await })
        })
        .collect();
    while handle.stats().joined() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the followers did not join"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(s.count(), 1, "still in the retry wait");
    leader.abort();
    let _ = leader.await;
    for f in followers {
        let res = within(f).await.unwrap().expect("a follower's answer");
        assert_eq!(res.status(), 200);
        let body = within(res.text()).await.unwrap();
        assert!(body.starts_with("answer "), "{body}");
    }
    let hits = s.count();
    assert!(
        (2..=4).contains(&hits),
        "server saw {hits} requests for 4 callers"
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(handle.in_flight("127.0.0.1"), 0);
}

// ---------------------------------------------------------------------------------------------
// reqwest: errors from reqwest directly, and the smallest limits.

/// `from_reqwest_error` rustdoc: "call this function yourself for errors you get from reqwest
/// directly, such as those of `reqwest::Response::json`"; the table: "`is_body()` or
/// `is_decode()` | `Body` | may have been processed"; "neither `Display` nor `Debug` shows an API
/// key passed in a query string".
#[tokio::test]
async fn s106_reqwest_from_reqwest_error_on_a_json_decode_error() {
    let s = scripted(|_, _| {
        (
            200,
            vec![("content-type", "application/json".to_owned())],
            "{not json".to_owned(),
        )
    })
    .await;
    let res = within(
        reqwest::Client::new()
            .get(s.url("/orders?api_key=s106-decode-secret#s106-frag"))
            .send(),
    )
    .await
    .unwrap();
    let err = within(res.json::<serde_json::Value>()).await.unwrap_err();
    assert!(err.is_decode(), "{err:?}");
    let err = sturdy_reqwest::from_reqwest_error(err);
    assert_eq!(err.kind(), &ErrorKind::Body, "{err}");
    assert_eq!(core_delivery(&err), Delivery::MaybeProcessed, "{err}");
    let shown = format!("{err} | {err:?}");
    assert!(!shown.contains("s106-decode-secret"), "{shown}");
    assert!(!shown.contains("s106-frag"), "{shown}");
}

fn stream_of(chunks: Vec<&'static [u8]>) -> reqwest::Body {
    let frames: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = chunks
        .into_iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c))))
        .collect();
    reqwest::Body::wrap(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

/// reqwest.md: "A streaming body ... is read into memory first, up to `with_body_limit`; a
/// longer one fails the call with a `Body` error before anything is sent." At the smallest
/// limit, 0: an empty stream is sent (0 bytes is within 0), one byte is refused, not sent.
#[tokio::test]
async fn s106_reqwest_mw_body_limit_zero_takes_an_empty_stream_and_refuses_one_byte() {
    let s = scripted(|_, _| (201, vec![], "ok".to_owned())).await;
    let client = mw(ClientBuilder::new, Some(0));
    let res = within(
        client
            .post(s.url("/empty"))
            .body(stream_of(vec![b"", b""]))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(s.count(), 1);
    assert!(s.hits()[0].body.is_empty());

    let err = within(
        client
            .post(s.url("/one"))
            .body(stream_of(vec![b"x"]))
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(delivery(&err), Delivery::NotSent, "{err}");
    assert_eq!(
        find::<sturdy::core::Error>(&err).unwrap().kind(),
        &ErrorKind::Body,
        "{err}"
    );
    assert_eq!(s.count(), 1, "nothing more sent: {err}");
}

/// reqwest.md (`ReqwestService`): "One whose exact size is known and at most `with_buffer_limit`
/// is handed to reqwest as bytes, so reqwest can send it again when it follows a 307 or 308
/// redirect; any other body is streamed, and reqwest answers a 307 or 308 for it with the
/// redirect response itself." At the smallest limit, 0: an empty body is followed through the
/// 307, a one-byte body gets the 307 back.
#[tokio::test]
async fn s106_reqwest_service_buffer_limit_zero_follows_an_empty_body_only() {
    let s = scripted(|_, hit| {
        if hit.path == "/moved" {
            (307, vec![("location", "/final".to_owned())], String::new())
        } else {
            (201, vec![], format!("got {}", hit.body.len()))
        }
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()).with_buffer_limit(0));
    let res = within(
        client.clone().oneshot(
            http::Request::post(s.url("/moved"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let hits = s.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(
        (hits[1].method.as_str(), hits[1].path.as_str()),
        ("POST", "/final")
    );

    let res = within(client.oneshot(post(s.url("/moved"), "x")))
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(s.count(), 3);
}

// ---------------------------------------------------------------------------------------------
// The chaos server: README's demo table, in process.

fn demo_knobs() -> sturdy_chaos::Knobs {
    // docs/guides/demo.md: "a fresh chaos server with the same seed (2026). The server answers
    // 15 % of requests with 503, closes the connection of 10 % of the orders it commits before
    // answering, and answers one request with 429 and `Retry-After: 1`. It honours
    // `Idempotency-Key`."
    sturdy_chaos::Knobs {
        seed: 2026,
        error_rate: 0.15,
        reset_after_commit_rate: 0.1,
        rate_limit_next: 1,
        retry_after: sturdy_chaos::RetryAfterForm::Seconds(1),
        idempotency: true,
        ..Default::default()
    }
}

fn demo_retry() -> RetryLayer {
    // demo.md: "`RetryLayer::new().with_backoff(..).with_max_attempts(6)` ... (decorrelated
    // jitter, base 10 ms, cap 200 ms)".
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(10), Duration::from_millis(200))
                .unwrap(),
        )
        .with_max_attempts(6)
        .with_seed(2026)
}

/// README: "sturdy ClientBuilder 200 0 254 200 0 ... sturdy books each order exactly once";
/// demo.md: "The faults are seeded and the orders sequential, so these figures repeat from run
/// to run". The sturdy row, through both reqwest ways in (reqwest.md: "get every sturdy
/// mechanic"): every order gets through, each is committed exactly once, the faults of the demo
/// were met and ridden out.
#[tokio::test]
async fn s106_readme_demo_row_through_reqwest_books_each_order_once() {
    let mw_server = sturdy_chaos::ChaosServer::start(demo_knobs())
        .await
        .unwrap();
    let svc_server = sturdy_chaos::ChaosServer::start(demo_knobs())
        .await
        .unwrap();
    let n = 200;
    let via_mw = async {
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(SturdyMiddleware::new(|next| {
                ClientBuilder::new().with_retry(demo_retry()).build(next)
            }))
            .build();
        let mut failed = Vec::new();
        for i in 0..n {
            let r = client
                .post(mw_server.url("/orders"))
                .json(&serde_json::json!({"item": format!("s106-book-{i}")}))
                .send()
                .await;
            match r {
                Ok(res) if res.status() == 201 => {}
                Ok(res) => failed.push(format!("{i}: {}", res.status())),
                Err(e) => failed.push(format!("{i}: {e}")),
            }
        }
        failed
    };
    let via_svc = async {
        let client = ClientBuilder::new()
            .with_retry(demo_retry())
            .build(ReqwestService::new(reqwest::Client::new()));
        let mut failed = Vec::new();
        for i in 0..n {
            let body = format!(r#"{{"item":"s106-book-{i}"}}"#);
            let req = http::Request::post(svc_server.url("/orders"))
                .header("content-type", "application/json")
                .body(Full::from(body))
                .unwrap();
            match client.clone().oneshot(req).await {
                Ok(res) if res.status() == 201 => {}
                Ok(res) => failed.push(format!("{i}: {}", res.status())),
                Err(e) => failed.push(format!("{i}: {e}")),
            }
        }
        failed
    };
    let (mw_failed, svc_failed) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(via_mw, via_svc)
    })
    .await
    .expect("the demo run ended");
    for (way, failed, server) in [
        ("SturdyMiddleware", mw_failed, &mw_server),
        ("ReqwestService", svc_failed, &svc_server),
    ] {
        let st = server.stats();
        assert!(failed.is_empty(), "{way}: {failed:?}");
        assert_eq!(st.orders_committed, n as u64, "{way}: {st:?}");
        assert_eq!(st.duplicates_by_payload, 0, "{way}: {st:?}");
        assert!(st.server_errors > 0 && st.resets > 0, "{way}: {st:?}");
        assert_eq!(st.rate_limited, 1, "{way}: {st:?}");
        assert_eq!(
            st.replayed, st.resets,
            "{way}: every closed commit replayed by key: {st:?}"
        );
        // The README's row and demo.md's last line: 254 requests; "35 injected 5xx, 18 closed
        // connections and 1 429 ridden out; 18 responses replayed by key".
        assert_eq!(
            (st.api_requests, st.server_errors, st.resets, st.replayed),
            (254, 35, 18, 18),
            "{way}: {st:?}"
        );
    }
}

/// README: "plain hyper client 157 43 200 173 0" and "naive retry loop 200 0 256 220 20";
/// demo.md: the plain client "sends each order once"; the naive loop "sends each order up to 4
/// times, until a 201, with no key and no backoff". What the README says the chaos server does
/// to them, in process.
#[tokio::test]
async fn s106_readme_demo_rows_of_the_plain_client_and_the_naive_loop() {
    for (row, tries) in [("plain", 1usize), ("naive", 4)] {
        let server = sturdy_chaos::ChaosServer::start(demo_knobs())
            .await
            .unwrap();
        let http = sturdy_chaos::http_client();
        let (mut ok, mut failed) = (0u64, 0u64);
        for i in 0..200 {
            let mut done = false;
            for _ in 0..tries {
                let body = format!(r#"{{"item":"s106-book-{i}"}}"#);
                let req = http::Request::post(server.url("/orders"))
                    .header("content-type", "application/json")
                    .body(Full::from(body))
                    .unwrap();
                match within(http.request(req)).await {
                    Ok(res) if res.status() == 201 => {
                        done = true;
                        break;
                    }
                    _ => {}
                }
            }
            if done {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        let st = server.stats();
        let got = (
            ok,
            failed,
            st.api_requests,
            st.orders_committed,
            st.duplicates_by_payload,
        );
        let want = if row == "plain" {
            (157, 43, 200, 173, 0)
        } else {
            (200, 0, 256, 220, 20)
        };
        assert_eq!(got, want, "{row}: {st:?}");
    }
}

/// reqwest.md, the https-without-TLS row ("maybe at a redirect's target") and "its URL keeps
/// scheme, host and path and loses query, fragment and credentials, so an API key in a query
/// string shows in neither `Display` nor `Debug`": the redirect's `https` target carries a
/// password, a key in the query and a fragment; none shows, both ways in; a POST without a key
/// is not sent again.
#[tokio::test]
async fn s106_reqwest_https_redirect_target_secrets_show_nowhere_and_no_keyless_resend() {
    let s = scripted(|_, _| {
        (
            303,
            vec![(
                "location",
                "https://s106user:s106-pw@127.0.0.1:9/o?api_key=s106-loc-key#s106-frag".to_owned(),
            )],
            String::new(),
        )
    })
    .await;
    let secrets = ["s106-pw", "s106-loc-key", "s106-frag"];
    let check = |shown: &str| {
        for secret in secrets {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    };
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .without_idempotency()
                .with_retry(quick_retry())
                .build(next)
        }))
        .build();
    let err = within(client.post(s.url("/start")).body("order").send())
        .await
        .unwrap_err();
    let summary = sturdy::core::summary::ErrorSummary::of(&err);
    check(&format!("{err} | {err:?} | {summary:?}"));
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
    assert_eq!(s.count(), 1, "{err}");

    let svc = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .build(ReqwestService::new(reqwest::Client::new()));
    let err = within(svc.oneshot(post(s.url("/start"), "{}")))
        .await
        .unwrap_err();
    let mut chain = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    while let Some(e) = cur {
        chain.push_str(&format!("{e} / {e:?} // "));
        cur = e.source();
    }
    check(&chain);
    assert_eq!(core_delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(!err.to_string().contains("safe to send again"), "{err}");
    assert_eq!(s.count(), 2, "{err}");
}

/// reqwest.md: "The response is a `reqwest::Response` whose `url()` is the URL it came from
/// and whose `remote_addr()` is the peer's address." A GET redirected to another server (another
/// port) through `SturdyMiddleware`, with and without coalescing (two identical callers): each
/// response names the second server, by URL and by address.
#[tokio::test]
async fn s106_reqwest_mw_url_and_remote_addr_are_the_redirect_targets() {
    let target = scripted(|_, _| (200, vec![], "there".to_owned())).await;
    let to = target.url("/there");
    let origin = scripted(move |_, _| (302, vec![("location", to.clone())], String::new())).await;
    let target_addr: SocketAddr = target.base.trim_start_matches("http://").parse().unwrap();
    let plain = mw(ClientBuilder::new, None);
    let coalescing = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
                .build(next)
        }))
        .build();
    for (name, client) in [("plain", plain), ("coalescing", coalescing)] {
        let (a, b) = tokio::join!(
            client.get(origin.url("/here")).send(),
            client.get(origin.url("/here")).send()
        );
        for res in [a.unwrap(), b.unwrap()] {
            assert_eq!(res.status(), 200, "{name}");
            assert_eq!(res.url().as_str(), target.url("/there"), "{name}");
            assert_eq!(res.remote_addr(), Some(target_addr), "{name}");
            assert_eq!(res.text().await.unwrap(), "there", "{name}");
        }
    }
}

/// coalesce.md: "What is coalesced: GET and HEAD requests ... that carry no `CallOptions` (...
/// such a request goes on its own, under its own)"; reqwest.md: "The request's
/// reqwest-middleware extensions are copied into the `http::Request` the stack sees". Two
/// identical slow GETs at once through a coalescing `SturdyMiddleware`, one with
/// `.with_extension(CallOptions)`: it does not join the other's call.
#[tokio::test]
async fn s106_reqwest_mw_a_request_with_call_options_is_not_coalesced() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new().pair();
    let layer = Mutex::new(Some(layer));
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_coalesce(layer.lock().unwrap().take().unwrap())
                .build(next)
        }))
        .build();
    let first = tokio::spawn({
        let (c, u) = (client.clone(), format!("{base}/slow"));
        async move { c.get(u).send().await }
    });
    let t0 = Instant::now();
    while hits.load(Ordering::SeqCst) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let res = within(
        client
            .get(format!("{base}/slow"))
            .with_extension(sturdy::core::CallOptions::new().without_retries())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.text().await.unwrap(), "slow");
    let res = within(first).await.unwrap().unwrap();
    assert_eq!(res.text().await.unwrap(), "slow");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(handle.stats().joined(), 0);
}

/// coalesce.md: "Leaving: a caller that goes away (its future dropped ...) leaves the call to
/// the others; it goes on." With `ReqwestService` at the bottom (no reqwest-middleware
/// driver), the caller that started a shared GET is aborted mid-flight: the callers who joined
/// get the one response, and the server sees one request.
#[tokio::test]
async fn s106_reqwest_service_coalesced_leader_aborted_mid_flight_the_call_goes_on() {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
                format!("answer {n}")
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(layer)
        .build(ReqwestService::new(reqwest::Client::new()));
    let leader = tokio::spawn(client.clone().oneshot(get(format!("{base}/slow"))));
    let t0 = Instant::now();
    while hits.load(Ordering::SeqCst) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let followers: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client.clone().oneshot(get(format!("{base}/slow")))))
        .collect();
    while handle.stats().joined() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    leader.abort();
    let _ = leader.await;
    for f in followers {
        let res = within(f).await.unwrap().unwrap();
        let body = within(res.into_body().collect()).await.unwrap().to_bytes();
        assert_eq!(body, "answer 1");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(handle.stats().fallbacks(), 0);
}

// ---------------------------------------------------------------------------------------------
// TLS: what the client's own configuration says, and a refusal shared by coalesced callers.

/// A TLS server that waits `accept_delay` before the handshake, records the SNI each
/// connection sent, and answers "hello".
async fn serve_tls_recording(
    config: Arc<ServerConfig>,
    accept_delay: Duration,
) -> (Srv, Arc<Mutex<Vec<Option<String>>>>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let snis: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let (c2, r2, s2) = (conns.clone(), requests.clone(), snis.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c2.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let (r2, s2) = (r2.clone(), s2.clone());
            tokio::spawn(async move {
                tokio::time::sleep(accept_delay).await;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                s2.lock()
                    .unwrap()
                    .push(tls.get_ref().1.server_name().map(str::to_owned));
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
    (
        Srv {
            addr,
            conns,
            requests,
        },
        snis,
    )
}

/// tls.md: "`https_client_with_config(config)` | whatever your `rustls::ClientConfig` says ...;
/// its ALPN list is replaced by `http/1.1`" (only the ALPN list). A configuration that turns SNI
/// off sends none; the constructors that make their own configuration send the host name.
#[tokio::test]
async fn s106_tls_with_config_keeps_the_configs_own_sni_setting() {
    let ca = ca("s106 sni authority");
    let (cert, key) = leaf(&ca, &["localhost"], 4);
    let (srv, snis) = serve_tls_recording(server_config(vec![cert], key), Duration::ZERO).await;
    let url = format!("https://localhost:{}/", srv.addr.port());

    let client =
        ClientBuilder::new().build(https_client_with_roots([ca.cert.der().clone()]).unwrap());
    let res = within(client.oneshot(get(url.clone()))).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");

    let mut roots = sturdy::tls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_sni = false;
    let client = ClientBuilder::new().build(https_client_with_config(config));
    let res = within(client.oneshot(get(url))).await.unwrap();
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");

    assert_eq!(
        *snis.lock().unwrap(),
        vec![Some("localhost".to_owned()), None]
    );
}

/// coalesce.md: "Errors are shared too: ... each caller gets a `sturdy_core::Error` whose kind
/// and delivery are the shared error's ..., with the message "the call shared by identical
/// requests in flight failed: <the error>"", "the caller's error carries a copy" of the
/// `CallReport`; tls.md: an untrusted certificate is `Tls`, `NotSent`, not retried, and reads
/// `TLS handshake failed (invalid peer certificate: UnknownIssuer)`. Three identical GETs over
/// HTTPS through a coalescing `ClientBuilder` meet a server whose certificate is not trusted.
#[tokio::test]
async fn s106_tls_an_untrusted_certificate_shared_by_coalesced_callers() {
    let trusted = ca("s106 trusted authority");
    let other = ca("s106 other authority");
    let (cert, key) = leaf(&other, &["127.0.0.1"], 5);
    let (srv, _snis) =
        serve_tls_recording(server_config(vec![cert], key), Duration::from_millis(300)).await;
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new().pair();
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(layer)
        .build(https_client_with_roots([trusted.cert.der().clone()]).unwrap());
    let url = format!("https://{}/", srv.addr);
    let first = tokio::spawn(client.clone().oneshot(get(url.clone())));
    let t0 = Instant::now();
    while srv.conns.load(Ordering::SeqCst) < 1 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let followers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.clone().oneshot(get(url.clone()))))
        .collect();
    while handle.stats().joined() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = within(first).await.unwrap().map(|_| ()).unwrap_err();
    let text = first.to_string();
    assert!(
        text.contains("TLS handshake failed (invalid peer certificate: UnknownIssuer)"),
        "{text}"
    );
    assert_eq!(sturdy_err(&first).kind(), &ErrorKind::Tls, "{text}");
    assert_eq!(core_delivery(&*first), Delivery::NotSent, "{text}");
    for f in followers {
        let err = within(f).await.unwrap().map(|_| ()).unwrap_err();
        let text = err.to_string();
        assert_eq!(
            text,
            "the call shared by identical requests in flight failed: TLS handshake failed (invalid peer certificate: UnknownIssuer)"
        );
        let e = sturdy_err(&err);
        assert_eq!(e.kind(), &ErrorKind::Tls, "{text}");
        assert_eq!(core_delivery(&*err), Delivery::NotSent, "{text}");
        assert_eq!(e.report().map(|r| r.attempts()), Some(1), "{text}");
        assert!(!e.kind().is_retryable(), "{text}");
    }
    assert_eq!(srv.conns.load(Ordering::SeqCst), 1);
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);
}

/// `from_reqwest_error` rustdoc: "call this function yourself for errors you get from reqwest
/// directly"; "`is_timeout()`: one of reqwest's own timeouts | `Timeout` | may have been
/// processed", checked before `is_body()`. A reqwest client timeout that fires while
/// `Response::bytes` reads a held body.
#[tokio::test]
async fn s106_reqwest_from_reqwest_error_on_a_body_read_timeout_is_timeout() {
    let (base, _) = slow_body(Duration::from_millis(800)).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let res = within(
        client
            .get(format!("{base}/slow?api_key=s106-body-key"))
            .send(),
    )
    .await
    .unwrap();
    let err = within(res.bytes()).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    let err = sturdy_reqwest::from_reqwest_error(err);
    assert_eq!(err.kind(), &ErrorKind::Timeout, "{err}");
    assert_eq!(core_delivery(&err), Delivery::MaybeProcessed, "{err}");
    assert!(!format!("{err} {err:?}").contains("s106-body-key"));
}

/// Waits a few milliseconds (as a token fetch or a limiter would) before the rest of the chain.
fn waits<'a>(
    req: reqwest::Request,
    extensions: &'a mut http::Extensions,
    next: reqwest_middleware::Next<'a>,
) -> futures_util::future::BoxFuture<'a, reqwest_middleware::Result<reqwest::Response>> {
    Box::pin(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        next.run(req, extensions).await
    })
}

/// reqwest.md: "`is_connect()` for an `https` URL when reqwest has no TLS feature | `Config` | no
/// (`NotSent`); maybe at a redirect's target", and "A request whose own URL reqwest refuses (an
/// `ftp:` URL handed to sturdy's middleware) was never sent, however long a middleware below
/// sturdy's waited before handing it on". An `https` URL this reqwest cannot speak, handed to a
/// middleware below sturdy's that waits first: still not sent, and the message does not speak of
/// a redirect.
#[tokio::test]
async fn s106_reqwest_https_url_behind_a_waiting_middleware_is_not_sent() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .with(waits)
        .build();
    let mut got = Vec::new();
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let err = within(
            client
                .request(method.clone(), format!("https://{addr}/orders"))
                .body("order")
                .send(),
        )
        .await
        .unwrap_err();
        let e = find::<sturdy::core::Error>(&err).expect("sturdy's error");
        got.push((method, e.kind().clone(), delivery(&err), err.to_string()));
    }
    drop(l);
    for (method, kind, delivered, text) in &got {
        assert_eq!(delivered, &Delivery::NotSent, "{method}: {got:?}");
        assert_eq!(kind, &ErrorKind::Config, "{method}: {got:?}");
        assert!(!text.contains("redirect"), "{method}: {got:?}");
    }
}

/// A token endpoint that takes `delay` to answer.
async fn slow_token_endpoint(delay: Duration) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/oauth/token",
        axum::routing::post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                (
                    [("content-type", "application/json")],
                    r#"{"access_token":"s106-token","token_type":"Bearer","expires_in":3600}"#,
                )
            }
        }),
    );
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth/token", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, hits)
}

/// reqwest.md: "`is_connect()` for an `https` URL when reqwest has no TLS feature | `Config` | no
/// (`NotSent`); maybe at a redirect's target"; auth.md: "The wait for a token is part of an
/// attempt". An `https` URL this reqwest cannot speak, in a stack whose auth layer first waits
/// 50 ms for a token (no other middleware): the request itself went nowhere, through both ways
/// in.
#[tokio::test]
async fn s106_reqwest_https_url_after_a_token_wait_is_not_sent() {
    let (token_url, token_hits) = slow_token_endpoint(Duration::from_millis(50)).await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/orders", l.local_addr().unwrap());
    let token_url2 = token_url.clone();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(move |next| {
            let tokens = sturdy::auth::ClientCredentials::new(
                ReqwestService::new(reqwest::Client::new()),
                &token_url2,
                "id",
                "secret",
            )
            .unwrap();
            ClientBuilder::new()
                .with_retry(quick_retry())
                .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
                .build(next)
        }))
        .build();
    let err = within(client.get(&url).send()).await.unwrap_err();
    let mw_got = (
        find::<sturdy::core::Error>(&err).map(|e| e.kind().clone()),
        delivery(&err),
        err.to_string(),
    );

    let tokens = sturdy::auth::ClientCredentials::new(
        ReqwestService::new(reqwest::Client::new()),
        &token_url,
        "id",
        "secret",
    )
    .unwrap();
    let svc = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(ReqwestService::new(reqwest::Client::new()));
    let err = within(svc.oneshot(get(url))).await.unwrap_err();
    let svc_got = (
        Some(sturdy_err(&err).kind().clone()),
        core_delivery(&*err),
        err.to_string(),
    );
    assert_eq!(token_hits.load(Ordering::SeqCst), 2);
    for (way, got) in [("SturdyMiddleware", &mw_got), ("ReqwestService", &svc_got)] {
        assert_eq!(got.0, Some(ErrorKind::Config), "{way}: {got:?}");
        assert_eq!(got.1, Delivery::NotSent, "{way}: {got:?}");
        assert!(!got.2.contains("redirect"), "{way}: {got:?}");
    }
    drop(l);
}

/// reqwest.md: "the request's reqwest-middleware extensions are copied into the `http::Request`
/// the stack sees, so ... `.with_extension(trace)` (a `sturdy_core::Trace`) reach the layers";
/// trace rustdoc: "the deciding layers (auth, circuit, client idempotency keys, rate limit,
/// retry) append `TraceEvent`s to it". A POST answered 503, 503, 201 through
/// `SturdyMiddleware`: the caller's trace names the key the server saw on every attempt, three
/// attempts and the two waits between them; a GET to a refused port records its four attempts
/// without the key in its query.
#[tokio::test]
async fn s106_reqwest_mw_a_trace_given_as_an_extension_records_the_call() {
    use sturdy::core::{Trace, TraceEvent};
    let s = scripted(|n, _| {
        if n <= 2 {
            (503, vec![], "busy".to_owned())
        } else {
            (201, vec![], "created".to_owned())
        }
    })
    .await;
    let client = mw(ClientBuilder::new, None);
    let trace = Trace::new();
    let res = within(
        client
            .post(s.url("/orders"))
            .body("order")
            .with_extension(trace.clone())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let hits = s.hits();
    assert_eq!(hits.len(), 3);
    let key = hits[0].key.clone().expect("a key on the first attempt");
    assert!(
        hits.iter().all(|h| h.key.as_deref() == Some(key.as_str())),
        "{hits:?}"
    );
    let events = trace.events();
    let keys: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::IdempotencyKey(k) => Some(k.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(keys, vec![key], "{events:?}");
    let attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            TraceEvent::Attempt { number, .. } => Some(*number),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![1, 2, 3], "{events:?}");
    let delays = events
        .iter()
        .filter(|e| matches!(e, TraceEvent::Delay { .. }))
        .count();
    assert_eq!(delays, 2, "{events:?}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let trace = Trace::new();
    let err = within(
        client
            .get(format!("http://127.0.0.1:{port}/x?api_key=s106-trace-key"))
            .with_extension(trace.clone())
            .send(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 4 attempts: connection refused"
    );
    let events = trace.events();
    let attempts = events
        .iter()
        .filter(|e| matches!(e, TraceEvent::Attempt { .. }))
        .count();
    assert_eq!(attempts, 4, "{events:?}");
    assert!(
        !format!("{events:?}").contains("s106-trace-key"),
        "{events:?}"
    );
}

fn assert_clone_send_sync<T: Clone + Send + Sync + 'static>(_: &T) {}

/// README: "The client is `Clone + Send + Sync`: keep one in axum `State` or an `Arc`, and clone
/// it per call. Every layer keeps tower's readiness contract, so the client ... can sit under a
/// `Buffer` ... driven by `oneshot` or a kept `ready().await?.call(req)`." With every layer of the
/// builder on (coalesce, hedge, adaptive concurrency, auth, version) over the HTTPS client and
/// over `ReqwestService`, and inside `SturdyMiddleware`: the types are `Clone + Send + Sync`, and
/// the HTTPS one answers as a kept service under `Buffer`, from spawned tasks.
#[tokio::test]
async fn s106_readme_every_layer_on_is_clone_send_sync_and_kept_under_buffer() {
    use tower::Service;
    let ca = ca("s106 full-stack authority");
    let (cert, key) = leaf(&ca, &["127.0.0.1"], 6);
    let (srv, _) = serve_tls_recording(server_config(vec![cert], key), Duration::ZERO).await;
    let https = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
        .with_hedge(sturdy::hedge::HedgeLayer::new())
        .with_adaptive_concurrency(sturdy::concurrency::AdaptiveConcurrencyLayer::new())
        .with_auth(sturdy::auth::AuthLayer::bearer("s106-token").unwrap())
        .with_version(sturdy::version::VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(https_client_with_roots([ca.cert.der().clone()]).unwrap());
    assert_clone_send_sync(&https);
    let reqw = ClientBuilder::new()
        .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
        .with_hedge(sturdy::hedge::HedgeLayer::new())
        .with_adaptive_concurrency(sturdy::concurrency::AdaptiveConcurrencyLayer::new())
        .build(ReqwestService::new(reqwest::Client::new()));
    assert_clone_send_sync(&reqw);
    let mwc = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_coalesce(sturdy::coalesce::CoalesceLayer::new())
                .with_hedge(sturdy::hedge::HedgeLayer::new())
                .with_adaptive_concurrency(sturdy::concurrency::AdaptiveConcurrencyLayer::new())
                .build(next)
        }))
        .build();
    assert_clone_send_sync(&mwc);

    let kept = tower::buffer::Buffer::new(https, 4);
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let mut svc = kept.clone();
            let url = format!("https://{}/{i}", srv.addr);
            tokio::spawn(async move {
                let req = if i % 2 == 0 {
                    get(url)
                } else {
                    post(url, "{}")
                };
                let res = svc.ready().await?.call(req).await?;
                let body = res.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>(body)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(within(t).await.unwrap().unwrap(), "hello");
    }
    assert_eq!(srv.requests.load(Ordering::SeqCst), 6);
}

/// `same_origin_redirects` rustdoc: "follows at most `max` redirects, and only while they stay
/// on the origin ...: a redirect to another origin is not followed, and the caller gets the
/// `3xx` response itself, `Location` included"; "More than `max` redirects on the origin fail as
/// reqwest's own limit does (`is_redirect()`, "could not follow a redirect: too many redirects
/// (more than 10)" once converted, with this policy's `max`)"; reqwest.md: `is_redirect()` is
/// `Other`, may have been processed, not retried. At the smallest `max`, 0.
#[tokio::test]
async fn s106_reqwest_same_origin_redirects_zero() {
    let other = scripted(|_, _| (200, vec![], "other".to_owned())).await;
    let to_other = other.url("/steal");
    let s = scripted(move |_, hit| match hit.path.as_str() {
        "/home" => (302, vec![("location", "/final".to_owned())], String::new()),
        "/away" => (307, vec![("location", to_other.clone())], String::new()),
        _ => (200, vec![], "final".to_owned()),
    })
    .await;
    let http = reqwest::Client::builder()
        .redirect(sturdy_reqwest::same_origin_redirects(0))
        .build()
        .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(http)
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry()).build(next)
        }))
        .build();
    // To another origin: handed back, whatever the count.
    let res = within(client.get(s.url("/away")).header("x-api-key", "k").send())
        .await
        .unwrap();
    assert_eq!(res.status(), 307);
    assert_eq!(other.count(), 0);
    // On the origin: one redirect is more than 0.
    let err = within(client.get(s.url("/home")).send()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "could not follow a redirect: too many redirects (more than 0)"
    );
    let e = find::<sturdy::core::Error>(&err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Other, "{err}");
    assert_eq!(delivery(&err), Delivery::MaybeProcessed, "{err}");
    let hits = s.hits();
    assert_eq!(
        hits.iter().filter(|h| h.path == "/home").count(),
        1,
        "not retried: {hits:?}"
    );
    assert!(hits.iter().all(|h| h.path != "/final"), "{hits:?}");
}

/// tls.md: "A certificate the client does not trust is `ErrorKind::Tls`: not retryable (it will
/// not fix itself before the certificate or the trusted roots change)"; "The handshake fails
/// before the request is written, so `classify::delivery` says `Delivery::NotSent`". Chains
/// under a trusted root: a leaf whose intermediate expired, and a leaf sent without its
/// intermediate, are refused once, as `Tls`, not sent; the same leaf with a valid intermediate
/// in the chain is trusted.
#[tokio::test]
async fn s106_tls_chains_with_an_expired_or_missing_intermediate_are_tls_not_sent() {
    let root = ca("s106 root");
    let mk_intermediate = |expired: bool| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "s106 intermediate");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &root.issuer).unwrap();
        Ca {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    };
    let mut results = Vec::new();
    for case in ["valid", "expired intermediate", "missing intermediate"] {
        let inter = mk_intermediate(case == "expired intermediate");
        let (cert, key) = leaf(&inter, &["127.0.0.1"], 7);
        let chain = if case == "missing intermediate" {
            vec![cert]
        } else {
            vec![cert, inter.cert.der().clone()]
        };
        let srv = serve_tls(server_config(chain, key), None).await;
        let client = ClientBuilder::new()
            .with_retry(quick_retry())
            .build(https_client_with_roots([root.cert.der().clone()]).unwrap());
        let got = within(client.oneshot(get(format!("https://{}/", srv.addr)))).await;
        results.push((case, got.map(|r| r.status()), srv));
    }
    for (case, got, srv) in results {
        if case == "valid" {
            assert_eq!(got.unwrap(), 200);
            continue;
        }
        let err = got.unwrap_err();
        let text = err.to_string();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls, "{case}: {text}");
        assert_eq!(core_delivery(&*err), Delivery::NotSent, "{case}: {text}");
        assert!(text.starts_with("TLS handshake failed ("), "{case}: {text}");
        assert_eq!(srv.conns.load(Ordering::SeqCst), 1, "{case}: {text}");
        assert_eq!(srv.requests.load(Ordering::SeqCst), 0, "{case}: {text}");
    }
}
