//! `sturdy::tls` (hyper-rustls) against a loopback TLS server with rcgen certificates:
//! trusted, untrusted, wrong name, expired, and what the errors say.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sturdy::core::classify::delivery;
use sturdy::core::{Delivery, ErrorKind};
use sturdy::tls::{https_client, https_client_with_roots, CertificateDer};
use sturdy::ClientBuilder;
use tower::ServiceExt;

use crate::client31_util::*;

fn get(url: String) -> http::Request<Full<Bytes>> {
    http::Request::get(url).body(Full::default()).unwrap()
}

async fn call(
    client: &sturdy::Client<hyper::body::Incoming>,
    req: http::Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, sturdy::core::BoxError> {
    within(10, client.clone().oneshot(req)).await
}

#[test]
fn client31_https_client_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<sturdy::tls::HttpsClient>();
}

#[tokio::test]
async fn client31_tls_trusted_ip_and_localhost() {
    let (cert, key) = self_signed(&["127.0.0.1", "localhost"], false);
    let der = cert.der().clone();
    let (addr, _) = serve_tls(cert, &key).await;
    let client = ClientBuilder::new().build(https_client_with_roots(vec![der]).unwrap());
    for host in ["127.0.0.1", "localhost"] {
        let res = call(&client, get(format!("https://{host}:{}/", addr.port())))
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "hello");
    }
}

#[tokio::test]
async fn client31_tls_untrusted_not_retried_named_not_sent() {
    let (cert, key) = self_signed(&["127.0.0.1"], false);
    let (addr, conns) = serve_tls(cert, &key).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client());
    let err = call(&client, get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer)"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Tls);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "a TLS refusal is not retried"
    );
}

#[tokio::test]
async fn client31_tls_untrusted_post_says_safe_to_send_again() {
    let (cert, key) = self_signed(&["127.0.0.1"], false);
    let (addr, _) = serve_tls(cert, &key).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client());
    let req = http::Request::post(format!("https://{addr}/orders"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let err = call(&client, req).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: UnknownIssuer); the request was not sent, so it is safe to send again"
    );
}

#[tokio::test]
async fn client31_tls_wrong_name_message_as_documented() {
    let (cert, key) = self_signed(&["api.example.com"], false);
    let der = cert.der().clone();
    let (addr, conns) = serve_tls(cert, &key).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots(vec![der]).unwrap());
    let err = call(&client, get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "TLS handshake failed (invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"api.example.com\"))"
    );
    assert_eq!(delivery(&*err), Delivery::NotSent);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn client31_tls_expired_is_tls_not_retried_and_says_expired() {
    let (cert, key) = self_signed(&["127.0.0.1"], true);
    let der = cert.der().clone();
    let (addr, conns) = serve_tls(cert, &key).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client_with_roots(vec![der]).unwrap());
    let err = call(&client, get(format!("https://{addr}/")))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("TLS handshake failed (invalid peer certificate: "),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("expired"), "{msg}");
    assert_eq!(delivery(&*err), Delivery::NotSent);
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Tls, "{msg}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[test]
fn client31_tls_bad_root_is_config_error_naming_the_certificate() {
    let bad = CertificateDer::from(b"not a certificate".to_vec());
    let err = https_client_with_roots(vec![bad]).unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Config);
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[tokio::test]
async fn client31_tls_client_sends_plain_http_too() {
    let s = serve(vec![ok()]).await;
    let client = ClientBuilder::new().build(https_client());
    let res = call(&client, get(s.url("/plain"))).await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn client31_tls_server_speaking_plain_http_is_not_tls_kind() {
    // An https:// URL to a plain HTTP server: the handshake fails on garbage, which the docs
    // class as another handshake failure (Connect, retried), not an untrusted certificate.
    let s = serve(vec![ok()]).await;
    let client = ClientBuilder::new()
        .with_retry(quick_retry())
        .build(https_client());
    let err = call(&client, get(format!("https://{}/", s.addr)))
        .await
        .unwrap_err();
    assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert_eq!(e.kind(), &ErrorKind::Connect, "{err}");
    assert_eq!(s.count(), 0);
}
