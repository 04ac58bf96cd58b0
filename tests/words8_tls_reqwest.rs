//! docs/guides/tls.md and docs/guides/reqwest.md, read literally where other tests do not reach:
//! the second row of "the cause reads" (a certificate for another name), refused at once and
//! never retried; and the reqwest middleware's default streaming-body limit of 16 MiB at its
//! exact boundary, "before anything is sent". Real loopback servers.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use sturdy::core::classify::{classify_error, delivery, describe};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::reqwest::{find, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::tls::https_client_with_roots;
use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sturdy::tls::rustls::{self, ServerConfig};
use sturdy::ClientBuilder;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// An HTTPS server on loopback whose certificate names `name`; counts TCP connections.
async fn serve_tls_named(name: &str) -> (std::net::SocketAddr, Arc<AtomicUsize>, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let der = cert.cert.der().to_vec();
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
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let hello = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), hello)
                    .await;
            });
        }
    });
    (addr, conns, der)
}

/// tls.md, "the cause reads": "a certificate for another name | `TLS handshake failed (invalid
/// peer certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for
/// DnsName("api.example.com"))`"; kind `Tls`, `NotSent`, and "The retry layer does not retry
/// it; the call fails at once".
#[tokio::test]
async fn a_certificate_for_another_name_reads_as_the_guide_says_and_is_not_retried() {
    let (addr, conns, der) = serve_tls_named("api.example.com").await;
    let http = https_client_with_roots([sturdy::tls::CertificateDer::from(der)]).unwrap();
    let retry = RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(5)).unwrap(),
    );
    let client = ClientBuilder::new().with_retry(retry).build(http.clone());
    let req = Request::get(format!("https://{addr}/"))
        .body(Full::default())
        .unwrap();
    let err = client.oneshot(req).await.unwrap_err();
    let want = r#"TLS handshake failed (invalid peer certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for DnsName("api.example.com"))"#;
    assert_eq!(describe(&*err), want);
    assert!(err.to_string().starts_with(want), "{err}");
    assert_eq!(classify_error(&*err), ErrorKind::Tls);
    assert_eq!(delivery(&*err), Delivery::NotSent);
    assert_eq!(conns.load(Ordering::SeqCst), 1, "not retried");
}

/// A streaming body of `len` bytes in 1 MiB chunks.
fn streaming(len: usize) -> reqwest::Body {
    let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
    let mut frames = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        frames.push(Ok::<_, Infallible>(http_body::Frame::data(
            chunk.slice(..n),
        )));
        left -= n;
    }
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)))
}

/// reqwest.md: "A streaming body (`reqwest::Body::wrap`, multipart) is read into memory first, up
/// to `with_body_limit` \[16 MiB\]; a longer one fails the call with a `Body` error before
/// anything is sent."
#[tokio::test]
async fn a_streaming_body_of_16_mib_is_sent_and_one_byte_more_is_not() {
    let got = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let g = got.clone();
    let app = axum::Router::new().route(
        "/upload",
        axum::routing::put(move |body: axum::body::Body| {
            let g = g.clone();
            async move {
                let n = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes().len())
                    .unwrap_or(0);
                g.lock().unwrap().push(n);
                "ok"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().build(next)
        }))
        .build();
    let limit = 16 * 1024 * 1024;
    let res = client
        .put(format!("http://{addr}/upload"))
        .body(streaming(limit))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*got.lock().unwrap(), [limit]);

    let err = client
        .put(format!("http://{addr}/upload"))
        .body(streaming(limit + 1))
        .send()
        .await
        .unwrap_err();
    let e = find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::NotSent);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(got.lock().unwrap().len(), 1, "nothing was sent");
}

/// A listener whose accept queue is full: a new connection's handshake never completes.
async fn full_backlog() -> (
    std::net::SocketAddr,
    Vec<std::net::TcpStream>,
    tokio::net::TcpListener,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::task::spawn_blocking(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100))
        })
        .await
        .unwrap()
        {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    (addr, held, listener)
}

/// reqwest.md's table: "`is_connect()`: refused, DNS, other TLS handshake failures, connect
/// timeout | `Connect` | maybe", the checks in that order (a connect timeout is also
/// `is_timeout()`), and the message `timed out while connecting`.
#[tokio::test]
async fn a_connect_timeout_is_connect_and_reads_timed_out_while_connecting() {
    let (addr, _held, _listener) = full_backlog().await;
    let http = sturdy::reqwest::ReqwestService::new(
        reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(100))
            .build()
            .unwrap(),
    );
    let req = Request::post(format!("http://{addr}/orders"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let err = http.oneshot(req).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(err.kind(), &ErrorKind::Connect, "{err}");
    // reqwest follows redirects out of sturdy's sight, so a connect error may be on a redirect's
    // target after the server got the request (reqwest.md): may have been processed.
    assert_eq!(delivery(&err), Delivery::MaybeProcessed);
    assert_eq!(err.to_string(), "timed out while connecting");
}

/// reqwest.md: "It builds with reqwest 0.13 and reqwest-middleware 0.5, and re-exports both
/// (`sturdy_reqwest::reqwest`, `sturdy_reqwest::reqwest_middleware`)": the re-exports are the
/// very crates a user depends on.
#[test]
fn the_reexported_reqwest_crates_are_the_users_own() {
    let client: sturdy::reqwest::reqwest::Client = reqwest::Client::new();
    let _: reqwest_middleware::ClientWithMiddleware =
        sturdy::reqwest::reqwest_middleware::ClientBuilder::new(client).build();
}

/// A request body that fails after its head (and a first chunk) went out reached the server:
/// `ReqwestService`'s error must not say it was never sent.
#[tokio::test]
async fn a_request_body_that_breaks_mid_send_is_not_called_not_sent() {
    let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = axum::Router::new().route(
        "/upload",
        axum::routing::post(move |body: axum::body::Body| {
            let tx = tx.clone();
            async move {
                tx.send(()).unwrap();
                let _ = body.collect().await;
                "ok"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let (body_tx, body_rx) =
        tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let body = StreamBody::new(stream);
    let http = sturdy::reqwest::ReqwestService::new(reqwest::Client::new());
    let req = Request::post(format!("http://{addr}/upload"))
        .body(body)
        .unwrap();
    let call = tokio::spawn(http.oneshot(req));
    body_tx
        .send(Ok(http_body::Frame::data(Bytes::from_static(
            b"first chunk",
        ))))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), heads.recv())
        .await
        .expect("the server saw the request")
        .unwrap();
    body_tx
        .send(Err(std::io::Error::other("the body broke")))
        .await
        .unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_ne!(
        delivery(&err),
        Delivery::NotSent,
        "{err} ({:?})",
        err.kind()
    );
}

/// tls.md: "It is `Clone + Send + Sync`, and clones share one connection pool": two clones
/// calling one server one after the other use one connection.
#[tokio::test]
async fn clones_of_the_https_client_share_one_connection_pool() {
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let hello = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("hello"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hello)
                    .await;
            });
        }
    });
    let http = sturdy::tls::https_client();
    for client in [http.clone(), http.clone(), http] {
        let res = client
            .oneshot(
                Request::get(format!("http://{addr}/"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "one pool, one connection");
}
