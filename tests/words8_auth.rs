//! docs/guides/auth.md and sturdy-auth's rustdoc, read literally: the static constructors'
//! errors are of kind `Config`, the defaults (`ClientAuth::SecretBasic`, a 30 s token timeout,
//! a 1 MiB replay limit at its exact boundary), "a `with_*` setter returns a source with a cache
//! of its own: configure first, then clone", and the token-wait error's words. Paused time, in
//! process.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, ClientAuth, ClientCredentials};
use sturdy::core::{BoxError, Delivery, ErrorKind};
use tower::{service_fn, Layer, ServiceExt};

const TOKEN_URL: &str = "https://auth.example.com/oauth/token";

/// A token endpoint that counts its requests and answers `t-<n>`, valid an hour.
fn endpoint(
    count: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + 'static {
    service_fn(move |_r: Request<Full<Bytes>>| {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            let body =
                format!(r#"{{"access_token":"t-{n}","token_type":"Bearer","expires_in":3600}}"#);
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::from(body)))
        }
    })
}

/// "Each returns a `Result`: a value that cannot go in a header, an empty query parameter name
/// or a Basic user name with `:` is a `Config` error when the layer is built."
#[test]
fn static_constructor_errors_are_config_errors() {
    let kinds = [
        AuthLayer::bearer("zq-secret\ntoken").unwrap_err(),
        AuthLayer::api_key(HeaderName::from_static("x-api-key"), "zq-secret\rkey").unwrap_err(),
        AuthLayer::api_key_query("", "zq-secret").unwrap_err(),
        AuthLayer::basic("us:er", "zq-secret").unwrap_err(),
    ];
    for e in kinds {
        assert_eq!(e.kind(), &ErrorKind::Config, "{e}");
        assert!(
            !e.to_string().contains("zq-secret"),
            "no secret in the message: {e}"
        );
    }
    assert!(
        AuthLayer::basic("user", "pa:ss").is_ok(),
        "a password may hold ':'"
    );
}

/// Defaults: `ClientAuth::SecretBasic`, a 30 s token timeout.
#[test]
fn defaults_are_secret_basic_and_a_30s_token_timeout() {
    assert_eq!(ClientAuth::default(), ClientAuth::SecretBasic);
    let cc = ClientCredentials::new(endpoint(Arc::default()), TOKEN_URL, "id", "secret").unwrap();
    assert_eq!(
        AuthLayer::oauth2(cc).token_timeout(),
        Duration::from_secs(30)
    );
    assert_eq!(
        AuthLayer::bearer("t").unwrap().token_timeout(),
        Duration::from_secs(30)
    );
}

/// "Clones share one cache. A `with_*` setter returns a source with a cache of its own".
#[tokio::test(start_paused = true)]
async fn a_setter_gives_a_cache_of_its_own_and_clones_share_one() {
    let count = Arc::new(AtomicUsize::new(0));
    let a = ClientCredentials::new(endpoint(count.clone()), TOKEN_URL, "id", "secret").unwrap();
    let b = a.clone();
    a.get().await.unwrap();
    b.get().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1, "clones share one cache");
    let c = a.clone().with_scopes(["orders:read"]);
    c.get().await.unwrap();
    assert_eq!(
        count.load(Ordering::SeqCst),
        2,
        "a setter's source has its own cache"
    );
    let d = a.clone().with_request_timeout(Duration::from_secs(5));
    d.get().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 3);
    a.get().await.unwrap();
    c.get().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

/// "the body is buffered up to 1 MiB for this" (the replay after a 401): a body of exactly
/// 1 MiB is replayed with a fresh token; one byte more is sent once and the 401 returned.
#[tokio::test(start_paused = true)]
async fn a_body_of_exactly_1_mib_is_replayed_after_a_401() {
    for (len, replayed) in [(1024 * 1024, true), (1024 * 1024 + 1, false)] {
        let count = Arc::new(AtomicUsize::new(0));
        let cc =
            ClientCredentials::new(endpoint(count.clone()), TOKEN_URL, "id", "secret").unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let s = seen.clone();
        let api = service_fn(move |req: Request<Full<Bytes>>| {
            let s = s.clone();
            async move {
                let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
                let body = req.into_body().collect().await.unwrap().to_bytes();
                s.fetch_add(1, Ordering::SeqCst);
                let status = if auth == "Bearer t-1" {
                    StatusCode::UNAUTHORIZED
                } else {
                    assert_eq!(body.len(), len, "the replay carries the whole body");
                    StatusCode::OK
                };
                Ok::<_, BoxError>(Response::builder().status(status).body(()).unwrap())
            }
        });
        let svc = AuthLayer::oauth2(cc).layer(api);
        let req = Request::post("https://api.example.com/upload")
            .body(Full::new(Bytes::from(vec![b'x'; len])))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        if replayed {
            assert_eq!(res.status(), StatusCode::OK, "{len} bytes");
            assert_eq!(seen.load(Ordering::SeqCst), 2);
        } else {
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{len} bytes");
            assert_eq!(seen.load(Ordering::SeqCst), 1);
        }
    }
}

/// "Past it the call fails with a `sturdy_core::Error` of kind `Timeout` (retryable) naming the
/// token endpoint, e.g. `no access token from the token endpoint
/// https://auth.example.com/oauth/token within 30s; the request was not sent. Retryable: ...`"
#[tokio::test(start_paused = true)]
async fn the_token_wait_error_reads_as_the_guide_prints_it() {
    let silent = service_fn(|_r: Request<Full<Bytes>>| async {
        std::future::pending::<()>().await;
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let cc = ClientCredentials::new(silent, TOKEN_URL, "id", "secret")
        .unwrap()
        .with_request_timeout(Duration::from_secs(60));
    let api = service_fn(|_r: Request<Full<Bytes>>| async { Ok::<_, BoxError>(Response::new(())) });
    let svc = AuthLayer::oauth2(cc).layer(api);
    let err = svc
        .oneshot(
            Request::post("https://api.example.com/orders")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let e = err
        .downcast_ref::<sturdy::core::Error>()
        .expect("a sturdy error");
    assert_eq!(e.kind(), &ErrorKind::Timeout);
    assert!(e.is_retryable());
    assert!(
        e.to_string().starts_with(
            "no access token from the token endpoint https://auth.example.com/oauth/token within 30s; the request was not sent. Retryable: "
        ),
        "{e}"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert!(e.cause_is_elsewhere());
}

/// "headers are marked sensitive": every static header the layer inserts.
#[tokio::test]
async fn every_static_credential_header_is_marked_sensitive() {
    let layers = [
        ("authorization", AuthLayer::bearer("tok").unwrap()),
        (
            "x-api-key",
            AuthLayer::api_key(HeaderName::from_static("x-api-key"), "key").unwrap(),
        ),
        ("authorization", AuthLayer::basic("user", "pw").unwrap()),
    ];
    for (name, layer) in layers {
        let api = service_fn(move |req: Request<Full<Bytes>>| async move {
            let v = req.headers().get(name).expect("the header is set").clone();
            assert!(v.is_sensitive(), "{name} is not marked sensitive");
            Ok::<_, BoxError>(Response::new(()))
        });
        layer
            .layer(api)
            .oneshot(
                Request::get("https://api.example.com/")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    // Basic: RFC 7617, `user:password` in base64.
    let api = service_fn(|req: Request<Full<Bytes>>| async move {
        assert_eq!(req.headers()["authorization"], "Basic dXNlcjpwOnc=");
        Ok::<_, BoxError>(Response::new(()))
    });
    AuthLayer::basic("user", "p:w")
        .unwrap()
        .layer(api)
        .oneshot(
            Request::get("https://api.example.com/")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
}

/// `api_key_query`: "added to the caller's query (which is kept byte for byte)", also on a URI
/// without a path or with an empty query.
#[tokio::test]
async fn a_query_api_key_is_added_to_any_uri() {
    for (sent, want) in [
        ("http://api.example.com", "http://api.example.com/?key=k1"),
        (
            "http://api.example.com/o?",
            "http://api.example.com/o?key=k1",
        ),
        (
            "http://api.example.com/o?b=2&a=%41",
            "http://api.example.com/o?b=2&a=%41&key=k1",
        ),
    ] {
        let api = service_fn(move |req: Request<Full<Bytes>>| async move {
            assert_eq!(req.uri().to_string(), want, "{sent}");
            Ok::<_, BoxError>(Response::new(()))
        });
        AuthLayer::api_key_query("key", "k1")
            .unwrap()
            .layer(api)
            .oneshot(Request::get(sent).body(Full::default()).unwrap())
            .await
            .unwrap();
    }
}
