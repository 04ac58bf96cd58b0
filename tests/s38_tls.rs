//! s38: TLS 1.3 refusals and breaks after the request, through `ClientBuilder` over
//! `sturdy::tls::https_client_with_roots`, checked against docs/guides/tls.md ("When the
//! certificate is refused") and crates/sturdy-core/CHANGELOG.md (Unreleased).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery, ErrorKind};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::rustls::{self, ClientConfig, RootCertStore};
use sturdy::tls::{https_client_with_config, https_client_with_roots};
use sturdy::ClientBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

// The certificate authority, leaf certificates and TLS servers of s36.
use crate::s36_tls::{ca, leaf, provider, serve, server_config, Ca};

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

fn client_with_cert(server_ca: &Ca, client_ca: &Ca) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let (cert, key) = leaf(client_ca, &["client.s38"], true);
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .unwrap()
}

fn kind(err: &BoxError) -> Option<ErrorKind> {
    sturdy::core::find::<sturdy::core::Error>(&**err).map(|e| e.kind().clone())
}

/// What a hand-rolled server does once it has read a request.
#[derive(Clone, Copy, Debug)]
enum After {
    /// `shutdown()`: a TLS close_notify, then FIN.
    CloseNotify,
    /// Drop the TCP connection with linger 0 (RST), no TLS alert.
    Reset,
    /// Write a plaintext fatal `access_denied` alert record on the raw TCP stream.
    PlainAlert,
    /// Write an application-data record the client cannot decrypt.
    Garbage,
}

/// A TLS 1.3 server (no client auth) that answers `answer_first` requests on a connection with
/// 200, then reads one more request and ends the connection `after`. Counts requests read.
async fn breaker(ca: &Ca, answer_first: usize, after: After) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(ca, &["127.0.0.1"], false, true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reads = Arc::new(AtomicUsize::new(0));
    let r = reads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let r = r.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut answered = 0;
                loop {
                    // Read one request head (and a small body, if any).
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
                    r.fetch_add(1, Ordering::SeqCst);
                    if answered < answer_first {
                        answered += 1;
                        let _ = tls
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                            .await;
                        let _ = tls.flush().await;
                        continue;
                    }
                    match after {
                        After::CloseNotify => {
                            let _ = tls.shutdown().await;
                        }
                        After::Reset => {
                            let (tcp, _) = tls.into_inner();
                            #[allow(deprecated)]
                            let _ = tcp.set_linger(Some(Duration::ZERO));
                            drop(tcp);
                        }
                        After::PlainAlert => {
                            let (mut tcp, _) = tls.into_inner();
                            let _ = tcp
                                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])
                                .await;
                            let _ = tcp.flush().await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        After::Garbage => {
                            let (mut tcp, _) = tls.into_inner();
                            let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x40];
                            rec.extend_from_slice(&[0xA5; 0x40]);
                            let _ = tcp.write_all(&rec).await;
                            let _ = tcp.flush().await;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    return;
                }
            });
        }
    });
    (addr, reads)
}

/// tls.md, "When the certificate is refused": "That holds for a server that refuses the client
/// too (it wants a client certificate, or does not accept the one it got): with TLS 1.3 ... an
/// alert about the handshake (`CertificateRequired`, `BadCertificate`, `UnknownCA`, ...) is
/// `Connect`, not sent, wherever it arrives", "stay `ErrorKind::Connect` and are retried", and
/// for a POST "`; the request was not sent, so it is safe to send again`". Here the client's
/// certificate is from an authority the server does not trust.
#[tokio::test]
async fn s38_tls13_client_cert_the_server_does_not_accept_get_and_post() {
    let server_ca = ca();
    let other_ca = ca();
    let srv = serve(server_config(&server_ca, &["127.0.0.1"], true, true)).await;
    let http = https_client_with_config(client_with_cert(&server_ca, &other_ca));
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
    let text = err.to_string();
    assert_eq!(kind(&err), Some(ErrorKind::Connect), "GET: {text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "GET: {text}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 3, "GET retried: {text}");
    let err = within(client.oneshot(post(format!("https://{}/orders", srv.addr))))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(kind(&err), Some(ErrorKind::Connect), "POST: {text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "POST: {text}");
    assert!(text.contains("safe to send again"), "POST: {text}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 6, "POST retried: {text}");
    assert_eq!(srv.requests.load(Ordering::SeqCst), 0);
}

/// tls.md, "When the certificate is refused": the TLS 1.3 refusal through
/// `https_client_with_roots` (no client certificate at all) is "`Connect`, not sent", and the
/// error names the refusal (`classify::describe` "names the TLS problem").
#[tokio::test]
async fn s38_tls13_no_client_cert_error_names_the_alert() {
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], true, true)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(2))
        .build(https_client_with_roots(vec![ca.cert.der().clone()]).unwrap());
    let err = within(client.oneshot(post(format!("https://{}/orders", srv.addr))))
        .await
        .unwrap_err();
    let text = err.to_string();
    let desc = sturdy::core::classify::describe(&*err);
    assert_eq!(kind(&err), Some(ErrorKind::Connect), "{text}");
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert!(text.contains("safe to send again"), "{text}");
    assert!(
        desc.contains("CertificateRequired") || desc.to_lowercase().contains("certificate"),
        "{desc}"
    );
    assert_eq!(srv.conns.load(Ordering::SeqCst), 2, "{text}");
}

async fn broken_after_request(after: After, answer_first: usize) {
    let ca = ca();
    let (addr, reads) = breaker(&ca, answer_first, after).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(3))
        .without_idempotency()
        .build(https_client_with_roots(vec![ca.cert.der().clone()]).unwrap());
    for _ in 0..answer_first {
        let res = within(client.clone().oneshot(get(format!("https://{addr}/warm"))))
            .await
            .unwrap_or_else(|e| panic!("{after:?}: warm-up: {e}"));
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
    let before = reads.load(Ordering::SeqCst);
    let err = within(client.oneshot(post(format!("https://{addr}/orders"))))
        .await
        .unwrap_err();
    let text = err.to_string();
    let got = (
        kind(&err),
        delivery(&*err),
        reads.load(Ordering::SeqCst) - before,
    );
    assert_ne!(got.1, Delivery::NotSent, "{after:?}: {got:?}: {text}");
    assert_ne!(
        got.0,
        Some(ErrorKind::Connect),
        "{after:?}: {got:?}: {text}"
    );
    assert!(!text.contains("safe to send again"), "{after:?}: {text}");
    assert_eq!(
        got.2, 1,
        "{after:?}: a POST that was read is not sent again: {text}"
    );
}

/// tls.md: the refusal is `Connect`, not sent, because "the server never reads" the request;
/// Delivery::MaybeProcessed: "a connection broke after the request was written". A server that
/// took the handshake, read the POST and then sent close_notify must not read as not sent.
#[tokio::test]
async fn s38_tls13_close_notify_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::CloseNotify, 0).await;
}

/// As above (Delivery::MaybeProcessed: "a connection broke after the request was written"):
/// a reset after the server read the POST.
#[tokio::test]
async fn s38_tls13_reset_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::Reset, 0).await;
}

/// core CHANGELOG: "`classify_error` reads a connection broken by data it could not read (... a
/// corrupt TLS record after the request) as `Transport`"; a record the client cannot decrypt
/// after the server read the POST is not "not sent" (even though `DecryptError` is in the list
/// of handshake alerts).
#[tokio::test]
async fn s38_tls13_corrupt_record_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::Garbage, 0).await;
}

/// tls.md: the alert is "not sent" because "the server never reads" the request. A server that
/// read the POST and then writes a plaintext fatal `access_denied` alert record must not make
/// the POST read as not sent.
#[tokio::test]
async fn s38_tls13_plaintext_alert_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::PlainAlert, 0).await;
}

/// Pooled connection: Delivery::MaybeProcessed "a connection broke after the request was
/// written"; a kept-alive TLS 1.3 connection that answered one GET, then read a POST and sent
/// close_notify.
#[tokio::test]
async fn s38_tls13_pooled_close_notify_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::CloseNotify, 1).await;
}

/// Pooled connection, reset after reading the POST.
#[tokio::test]
async fn s38_tls13_pooled_reset_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::Reset, 1).await;
}

/// Pooled connection, plaintext `access_denied` alert after reading the POST.
#[tokio::test]
async fn s38_tls13_pooled_plaintext_alert_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::PlainAlert, 1).await;
}

/// Pooled connection, corrupt record after reading the POST.
#[tokio::test]
async fn s38_tls13_pooled_corrupt_record_after_reading_the_request_is_maybe_processed() {
    broken_after_request(After::Garbage, 1).await;
}

/// metrics.md: `sturdy.retry.retries` "failed tries that are retried" with `error.type` among
/// "`connect`, `tls`, `transport`"; tls.md: the TLS 1.3 refusal "is `Connect`, not sent ...
/// and [is] retried". A POST through the default `ClientBuilder` (which sets an idempotency key)
/// refused by a TLS 1.3 server: 2 retries counted as `connect` for method POST, none as
/// `transport`, and the final error still says it was not sent.
#[tokio::test]
async fn s38_tls13_refusal_counts_retries_as_connect() {
    use metrics_util::debugging::DebuggingRecorder;
    let rec = DebuggingRecorder::new();
    let snap = rec.snapshotter();
    let _g = metrics::set_default_local_recorder(&rec);
    let ca = ca();
    let srv = serve(server_config(&ca, &["127.0.0.1"], true, true)).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry().with_max_attempts(3))
        .build(https_client_with_roots(vec![ca.cert.der().clone()]).unwrap());
    let err = within(client.oneshot(post(format!("https://{}/orders", srv.addr))))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{text}");
    assert!(text.contains("safe to send again"), "{text}");
    assert_eq!(srv.conns.load(Ordering::SeqCst), 3, "{text}");
    let retries: Vec<(Vec<(String, String)>, String)> = snap
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(ck, _, _, v)| {
            let (_, key) = ck.into_parts();
            (key.name() == "sturdy.retry.retries").then(|| {
                (
                    key.labels()
                        .map(|l| (l.key().to_owned(), l.value().to_owned()))
                        .collect(),
                    format!("{v:?}"),
                )
            })
        })
        .collect();
    assert_eq!(retries.len(), 1, "{retries:?}");
    let (labels, value) = &retries[0];
    assert!(
        labels.contains(&("error.type".to_owned(), "connect".to_owned())),
        "{labels:?}"
    );
    assert!(
        labels.contains(&("http.request.method".to_owned(), "POST".to_owned())),
        "{labels:?}"
    );
    assert_eq!(value, "Counter(2)", "{labels:?}");
}
