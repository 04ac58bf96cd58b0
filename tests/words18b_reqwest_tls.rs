//! docs/guides/reqwest.md, docs/guides/tls.md and sturdy-reqwest's rustdoc, read literally: URL
//! credentials in no error text, the streaming body limit, 307 with known-size and streamed
//! bodies, redirect loops and reqwest's timeout in the retry layer's words, the response's URL
//! and peer; TLS roots that are not certificates and the name-mismatch message. Loopback only.
#![cfg(feature = "full")]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{any, post};
use axum::Router;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::reqwest::{ReqwestService, SturdyMiddleware};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;
use tower::ServiceExt;

async fn serve(app: Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn quick_retry(n: u32) -> RetryLayer {
    RetryLayer::new()
        .with_backoff(
            Backoff::decorrelated_jitter(Duration::from_millis(2), Duration::from_millis(5))
                .unwrap(),
        )
        .with_max_attempts(n)
}

fn app(hits: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/a",
            post(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/b")]) }),
        )
        .route("/b", post(|body: Bytes| async move { body }))
        .route(
            "/loop",
            any(|| async { (StatusCode::FOUND, [("location", "/loop")]) }),
        )
        .route(
            "/slow",
            any(|| async {
                tokio::time::sleep(Duration::from_millis(400)).await;
                "late"
            }),
        )
        .route("/echo", post(|body: Bytes| async move { body }))
        .layer(axum::middleware::from_fn_with_state(
            hits,
            |State(h): State<Arc<AtomicUsize>>,
             req: axum::extract::Request,
             next: axum::middleware::Next| async move {
                h.fetch_add(1, Ordering::SeqCst);
                next.run(req).await.into_response()
            },
        ))
}

/// "its URL keeps scheme, host and path and loses query, fragment and credentials, so an API key
/// in a query string shows in neither `Display` nor `Debug`" — through `ReqwestService` alone,
/// under `ClientBuilder`, and through `SturdyMiddleware`.
#[tokio::test]
async fn url_secrets_in_no_error_text() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://alice:PW-SECRET@{dead}/orders?api_key=Q-SECRET#frag-SECRET");
    let rs = ReqwestService::new(reqwest::Client::new());
    let e1 = rs
        .clone()
        .oneshot(Request::get(&url).body(Full::<Bytes>::default()).unwrap())
        .await
        .unwrap_err();
    let client = ClientBuilder::new().with_retry(quick_retry(2)).build(rs);
    let e2 = client
        .oneshot(Request::get(&url).body(Full::<Bytes>::default()).unwrap())
        .await
        .unwrap_err();
    let mw = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry(2)).build(next)
        }))
        .build();
    let e3 = mw.get(&url).send().await.unwrap_err();
    // reqwest follows redirects out of sturdy's sight, so a connect error may be on a redirect's
    // target after the server got the request (reqwest.md): may have been processed.
    assert_eq!(sturdy::reqwest::delivery(&e3), Delivery::MaybeProcessed);
    let texts = [
        e1.to_string(),
        format!("{e1:?}"),
        e2.to_string(),
        format!("{e2:?}"),
        e3.to_string(),
        format!("{e3:?}"),
    ];
    for t in &texts {
        for s in ["PW-SECRET", "Q-SECRET", "frag-SECRET"] {
            assert!(!t.contains(s), "{s} shows in {t}");
        }
    }
    assert!(texts[2].contains("connection refused"), "{}", texts[2]);
}

/// "A streaming body ... is read into memory first, up to `with_body_limit` [16 MiB]; a longer
/// one fails the call with a `Body` error before anything is sent."
#[tokio::test]
async fn streamed_body_over_the_limit() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(hits.clone())).await;
    let mw = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| ClientBuilder::new().build(next)).with_body_limit(10))
        .build();
    let stream =
        futures_util::stream::iter((0..8).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"12345")))
        }));
    let err = mw
        .post(format!("http://{addr}/echo"))
        .body(reqwest::Body::wrap(StreamBody::new(stream)))
        .send()
        .await
        .unwrap_err();
    let e = sturdy::reqwest::find::<sturdy::core::Error>(&err).expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Body, "{err}");
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::NotSent);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // Within the limit it goes through.
    let stream =
        futures_util::stream::iter((0..2).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"12345")))
        }));
    let res = mw
        .post(format!("http://{addr}/echo"))
        .body(reqwest::Body::wrap(StreamBody::new(stream)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "1234512345");
}

/// "One whose exact size is known and at most `with_buffer_limit` [1 MiB] is handed to reqwest
/// as bytes, so reqwest can send it again when it follows a 307 or 308 redirect; any other body
/// is streamed, and reqwest answers a 307 or 308 for it with the redirect response itself."
#[tokio::test]
async fn redirect_307_with_known_and_streamed_bodies() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(hits)).await;
    let rs = ReqwestService::new(reqwest::Client::new());
    let res = rs
        .clone()
        .oneshot(
            Request::post(format!("http://{addr}/a"))
                .body(Full::new(Bytes::from("payload")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.extensions().get::<reqwest::Url>().unwrap().path(), "/b");
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "payload"
    );
    let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
        Bytes::from_static(b"payload"),
    ))]);
    let res = rs
        .clone()
        .oneshot(
            Request::post(format!("http://{addr}/a"))
                .body(StreamBody::new(stream))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
    // A known size over the buffer limit is streamed too.
    let small = rs.with_buffer_limit(3);
    let res = small
        .oneshot(
            Request::post(format!("http://{addr}/a"))
                .body(Full::new(Bytes::from("payload")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TEMPORARY_REDIRECT);
}

/// "`is_redirect()`: too many redirects | `Other` | maybe | no" with the message `could not
/// follow a redirect: too many redirects`; "`timed out (reqwest's timeout)`" after the retry
/// layer's summary.
#[tokio::test]
async fn redirect_loop_and_reqwest_timeout_in_words() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(hits.clone())).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry(3))
        .build(ReqwestService::new(reqwest::Client::new()));
    let err = client
        .clone()
        .oneshot(
            Request::get(format!("http://{addr}/loop"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let m = err.to_string();
    assert!(
        m.contains("could not follow a redirect: too many redirects"),
        "{m}"
    );
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Other, "{m}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        11,
        "retried, or not 10 redirects"
    );

    let timed = ClientBuilder::new()
        .with_retry(quick_retry(2))
        .build(ReqwestService::new(
            reqwest::Client::builder()
                .timeout(Duration::from_millis(50))
                .build()
                .unwrap(),
        ));
    let err = timed
        .oneshot(
            Request::get(format!("http://{addr}/slow"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gave up after 2 attempts: timed out (reqwest's timeout)"
    );
}

/// "A `.timeout()` bounds each attempt"; "The response is a `reqwest::Response` whose `url()` is
/// the URL it came from and whose `remote_addr()` is the peer's address."
#[tokio::test]
async fn middleware_timeout_url_and_peer() {
    let hits = Arc::new(AtomicUsize::new(0));
    let addr = serve(app(hits.clone())).await;
    let mw = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new().with_retry(quick_retry(3)).build(next)
        }))
        .build();
    let started = tokio::time::Instant::now();
    let err = mw
        .get(format!("http://{addr}/slow"))
        .timeout(Duration::from_millis(40))
        .send()
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().starts_with("gave up after 3 attempts"),
        "{err}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let res = mw
        .post(format!("http://{addr}/a"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.url().path(), "/b");
    assert_eq!(res.remote_addr(), Some(addr));
}

/// "`https_client_with_roots(extra)` | ... | a `Config` error naming a certificate that is not
/// valid X.509".
#[test]
fn roots_that_are_not_certificates() {
    use sturdy::tls::CertificateDer;
    let good = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).unwrap();
    let certs = vec![
        good.cert.der().clone(),
        CertificateDer::from(vec![1u8, 2, 3]),
    ];
    let e = sturdy::tls::https_client_with_roots(certs).unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Config);
    assert!(e.to_string().contains("#2"), "which certificate? {e}");
}

/// The guide's table: "a certificate for another name | `TLS handshake failed (invalid peer
/// certificate: certificate not valid for name "127.0.0.1"; certificate is only valid for
/// DnsName("api.example.com"))`"; not retried; `Delivery::NotSent`.
#[tokio::test]
async fn name_mismatch_in_words() {
    use hyper_util::rt::TokioIo;
    use sturdy::tls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use sturdy::tls::rustls::{self, ServerConfig};
    let cert = rcgen::generate_simple_self_signed(vec!["api.example.com".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let h = handshakes.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("hi"))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc),
            );
        }
    });
    let client = ClientBuilder::new()
        .with_retry(quick_retry(4))
        .build(sturdy::tls::https_client_with_roots([cert.cert.der().clone()]).unwrap());
    let err = client
        .oneshot(
            Request::get(format!("https://{addr}/"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"api.example.com\"))"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert_eq!(handshakes.load(Ordering::SeqCst), 1);
}

/// "it can be the token client of `ClientCredentials`" and "Messages name the token URL without
/// its user info or query": a refused token request through reqwest shows neither, in `Display`
/// or `Debug`, on the token error or on the call's.
#[tokio::test]
async fn token_errors_through_reqwest_hide_url_secrets() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let rs = ReqwestService::new(reqwest::Client::new());
    let tokens = sturdy::auth::ClientCredentials::new(
        rs.clone(),
        &format!("http://bob:TOK-PW@{dead}/token?client_assertion=TOK-Q"),
        "id",
        "TOK-SECRET",
    )
    .unwrap();
    let e = tokens.get().await.unwrap_err();
    let client = ClientBuilder::new()
        .with_retry(quick_retry(2))
        .with_auth(sturdy::auth::AuthLayer::oauth2(tokens))
        .build(rs);
    let call = client
        .oneshot(
            Request::get(format!("http://{dead}/x"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    for t in [
        e.to_string(),
        format!("{e:?}"),
        call.to_string(),
        format!("{call:?}"),
    ] {
        for s in ["TOK-PW", "TOK-Q", "TOK-SECRET", "bob"] {
            assert!(!t.contains(s), "{s} in {t}");
        }
    }
    assert!(e.is_retryable(), "{e}");
}
