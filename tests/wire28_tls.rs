//! The composed client over `sturdy::tls` HTTPS clients against hostile TLS peers on loopback:
//! a certificate for another name, an expired one, an untrusted one, a plain-HTTP server on the
//! HTTPS port, a handshake that stalls, and a TLS peer that drops the connection after reading.

use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::classify::delivery;
use sturdy::core::{CircuitOpen, Delivery, ErrorKind};
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::tls::{https_client, https_client_with_roots, CertificateDer, HttpsClient};
use sturdy::ClientBuilder;
use tokio::io::AsyncReadExt;
use tower::ServiceExt;

use crate::wire28_util::*;

const T: Duration = Duration::from_millis(500);

struct Cert {
    der: CertificateDer<'static>,
    config: ServerConfig,
}

fn cert(names: &[&str], expired: bool) -> Cert {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
            .unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    }
    let c = params.self_signed(&key).unwrap();
    let pk = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![c.der().clone()], pk)
            .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Cert {
        der: c.der().clone(),
        config,
    }
}

/// A TLS peer: after the handshake, `answer` decides what happens (true: serve "hello" with
/// hyper; false: read the request head and drop the connection without `close_notify`).
async fn tls_peer(config: ServerConfig, answer: bool) -> Peer {
    tls_peer_then(config, answer, false).await
}

/// As [`tls_peer`]; with `junk`, after reading the request the peer writes bytes that are no
/// TLS record on the raw TCP connection, then closes it.
async fn tls_peer_then(config: ServerConfig, answer: bool, junk: bool) -> Peer {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    peer(move |c| {
        let acceptor = acceptor.clone();
        async move {
            let seen = c.seen.clone();
            let Ok(mut tls) = acceptor.accept(c.stream).await else {
                return;
            };
            if answer {
                let hello = hyper::service::service_fn(move |_req| {
                    seen.requests
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from("hello"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hello)
                    .await;
            } else {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                seen.requests
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                seen.heads
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got).into_owned());
                if junk {
                    use tokio::io::AsyncWriteExt;
                    let _ = tls
                        .get_mut()
                        .0
                        .write_all(b"\x15\x03\x03\x00\x02\x02\x50HTTP/1.1 200 OK\r\n\r\n")
                        .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Dropped: a TCP FIN with no TLS close_notify.
            }
        }
    })
    .await
}

fn https_url(p: &Peer, path: &str) -> String {
    format!("https://{}{path}", p.addr)
}

fn over(http: HttpsClient) -> sturdy::Client<hyper::body::Incoming> {
    ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(T)
        .build(http)
}

fn over_without_keys(http: HttpsClient) -> sturdy::Client<hyper::body::Incoming> {
    ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(T)
        .build(http)
}

fn post_to(url: &str) -> http::Request<Full<Bytes>> {
    post(url)
}

#[tokio::test]
async fn wire28_tls_certificate_for_another_name_fails_once_not_sent() {
    let c = cert(&["api.example.com"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer(c.config, true).await;
    let client = over(https_client_with_roots(roots).unwrap());
    let err = within(5, client.oneshot(post_to(&https_url(&p, "/orders"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.conns(), 1);
    assert_eq!(p.seen.requests(), 0);
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "TLS handshake failed (invalid peer certificate: certificate not valid for name \"127.0.0.1\""
        ),
        "{msg}"
    );
    assert!(
        msg.ends_with("; the request was not sent, so it is safe to send again"),
        "{msg}"
    );
}

#[tokio::test]
async fn wire28_tls_expired_certificate_fails_once_not_retryable() {
    let c = cert(&["127.0.0.1"], true);
    let roots = vec![c.der.clone()];
    let p = tls_peer(c.config, true).await;
    let client = over(https_client_with_roots(roots).unwrap());
    let err = within(5, client.oneshot(get(&https_url(&p, "/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.conns(), 1);
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Tls);
    assert!(!e.is_retryable());
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(
        err.to_string()
            .starts_with("TLS handshake failed (invalid peer certificate: certificate expired"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_tls_self_signed_against_the_mozilla_roots() {
    let c = cert(&["127.0.0.1"], false);
    let p = tls_peer(c.config, true).await;
    let err = within(5, over(https_client()).oneshot(get(&https_url(&p, "/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.conns(), 1);
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer)"
    );
}

#[tokio::test]
async fn wire28_tls_trusted_certificate_works_through_the_stack() {
    let c = cert(&["127.0.0.1"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer(c.config, true).await;
    let res = within(
        5,
        over(https_client_with_roots(roots).unwrap()).oneshot(post_to(&https_url(&p, "/o"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(p.seen.requests(), 1);
}

async fn plain_http_peer() -> Peer {
    peer(|mut c| async move {
        // Whatever arrives (a ClientHello), answer as a plain HTTP server would.
        if c.read_some().await {
            c.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        }
    })
    .await
}

#[tokio::test]
async fn wire28_tls_plain_http_server_on_the_https_port_is_a_connect_failure() {
    let p = plain_http_peer().await;
    let err = within(5, over(https_client()).oneshot(get(&https_url(&p, "/a"))))
        .await
        .unwrap_err();
    assert_eq!(p.seen.conns(), 4, "{err}");
    assert_eq!(p.seen.requests(), 0);
    let e = sturdy_err(&err);
    assert_eq!(e.kind(), &ErrorKind::Connect, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let msg = err.to_string();
    assert!(
        msg.starts_with("gave up after 4 attempts: TLS handshake failed ("),
        "{msg}"
    );
}

#[tokio::test]
async fn wire28_tls_plain_http_server_on_the_https_port_post_without_key_is_retried() {
    // A handshake that fails proves the request never left: even a POST without a key goes
    // again.
    let p = plain_http_peer().await;
    let err = within(
        5,
        over_without_keys(https_client()).oneshot(post_to(&https_url(&p, "/pay"))),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.conns(), 4, "{err}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert!(
        err.to_string()
            .ends_with("the request was not sent, so it is safe to send again"),
        "{err}"
    );
}

#[tokio::test]
async fn wire28_tls_handshake_stall_is_cut_by_the_attempt_timeout() {
    let p = peer(|mut c| async move {
        c.read_some().await;
        c.wait_close().await;
    })
    .await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(Duration::from_millis(80))
        .build(https_client());
    let start = Instant::now();
    let err = within(5, client.oneshot(get(&https_url(&p, "/a"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(p.seen.conns(), 4);
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Timeout);
    assert!(
        eventually(|| p.seen.closed() == 4).await,
        "{}",
        p.seen.closed()
    );
}

#[tokio::test]
async fn wire28_tls_handshake_stall_post_is_a_timeout_said_conservatively() {
    // Documented: a timeout may have been processed, so a keyless POST is not sent again.
    let p = peer(|mut c| async move {
        c.read_some().await;
        c.wait_close().await;
    })
    .await;
    let client = ClientBuilder::new()
        .without_idempotency()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_attempt_timeout(Duration::from_millis(80))
        .build(https_client());
    let err = within(5, client.oneshot(post_to(&https_url(&p, "/pay"))))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert_eq!(p.seen.conns(), 1);
}

#[tokio::test]
async fn wire28_tls_peer_dropping_after_the_request_get_is_retried() {
    let c = cert(&["127.0.0.1"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer(c.config, false).await;
    let err = within(
        5,
        over(https_client_with_roots(roots).unwrap()).oneshot(get(&https_url(&p, "/a"))),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 4, "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(sturdy_err(&err).kind().is_retryable());
}

#[tokio::test]
async fn wire28_tls_peer_dropping_after_the_request_post_without_key_sent_once() {
    let c = cert(&["127.0.0.1"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer(c.config, false).await;
    let err = within(
        5,
        over_without_keys(https_client_with_roots(roots).unwrap())
            .oneshot(post_to(&https_url(&p, "/pay"))),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 1, "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed);
    assert!(err.to_string().contains("may have been processed"), "{err}");
}

#[tokio::test]
async fn wire28_tls_untrusted_certificates_open_the_breaker() {
    let c = cert(&["127.0.0.1"], false);
    let p = tls_peer(c.config, true).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .with_rate_limit(quick_limiter())
        .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(2))
        .with_attempt_timeout(T)
        .build(https_client());
    for _ in 0..2 {
        let err = within(5, client.clone().oneshot(get(&https_url(&p, "/a"))))
            .await
            .unwrap_err();
        assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Tls);
    }
    assert_eq!(p.seen.conns(), 2);
    let err = within(5, client.clone().oneshot(get(&https_url(&p, "/a"))))
        .await
        .unwrap_err();
    assert!(sturdy::core::find::<CircuitOpen>(&*err).is_some(), "{err}");
    assert_eq!(p.seen.conns(), 2);
    assert_eq!(delivery(&*err), Delivery::NotSent);
}

#[tokio::test]
async fn wire28_tls_garbage_after_the_handshake_start() {
    // The peer answers the ClientHello with random bytes (seeded).
    let p = peer(|mut c| async move {
        if c.read_some().await {
            let mut rng = Seeded::new(0x28 + c.index as u64);
            let junk: Vec<u8> = (0..4096).map(|_| rng.below(256) as u8).collect();
            c.write(&junk).await;
        }
    })
    .await;
    let start = Instant::now();
    let err = within(5, over(https_client()).oneshot(get(&https_url(&p, "/a"))))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    assert!(err.to_string().contains("TLS handshake failed"), "{err}");
}

#[tokio::test]
async fn wire28_tls_record_junk_after_the_request_is_not_read_as_a_handshake_failure() {
    // The handshake completed and the request was read; what follows is not a valid record.
    // The request reached the peer: never "not sent", and a keyless POST is not sent again.
    let c = cert(&["127.0.0.1"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer_then(c.config, false, true).await;
    let err = within(
        5,
        over_without_keys(https_client_with_roots(roots).unwrap())
            .oneshot(post_to(&https_url(&p, "/pay"))),
    )
    .await
    .unwrap_err();
    assert_eq!(p.seen.requests(), 1, "{err}");
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert!(err.to_string().contains("may have been processed"), "{err}");
}

#[tokio::test]
async fn wire28_tls_record_junk_after_the_request_names_the_cause() {
    let c = cert(&["127.0.0.1"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer_then(c.config, false, true).await;
    let mut req = get(&https_url(&p, "/a"));
    req.extensions_mut()
        .insert(sturdy::core::CallOptions::new().without_retries());
    let err = within(
        5,
        over(https_client_with_roots(roots).unwrap()).oneshot(req),
    )
    .await
    .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    let msg = err.to_string();
    assert_ne!(msg, "connection error");
    assert!(msg.contains("decrypt"), "{msg}");
}

#[tokio::test]
async fn wire28_tls_record_junk_after_the_request_get_is_retried() {
    let c = cert(&["127.0.0.1"], false);
    let roots = vec![c.der.clone()];
    let p = tls_peer_then(c.config, false, true).await;
    let err = within(
        5,
        over(https_client_with_roots(roots).unwrap()).oneshot(get(&https_url(&p, "/a"))),
    )
    .await
    .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::MaybeProcessed, "{err}");
    assert_eq!(sturdy_err(&err).kind(), &ErrorKind::Transport, "{err}");
    assert_eq!(p.seen.requests(), 4, "{err}");
}
