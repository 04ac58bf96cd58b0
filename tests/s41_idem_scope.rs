//! s41: docs/guides/idempotency.md on what tells two requests apart (the fingerprint, the client
//! scope) and on the client layer's methods, tried with values whose bytes run together when
//! concatenated; in process, on paused time.

#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::core::BoxError;
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::ClientBuilder;
use tower::{service_fn, ServiceExt};

/// An app under the layer, at any path, whose handler counts its runs and answers
/// `run <n>`.
fn app(runs: &Arc<AtomicUsize>, layer: IdempotencyLayer<MemoryStore>) -> Router {
    let r = runs.clone();
    Router::new()
        .fallback(move || {
            let r = r.clone();
            async move {
                let n = r.fetch_add(1, Ordering::SeqCst);
                (StatusCode::CREATED, format!("run {n}"))
            }
        })
        .layer(layer)
}

async fn send(app: &Router, r: Request<Body>) -> (StatusCode, bool, String) {
    let res = app.clone().oneshot(r).await.unwrap();
    let replayed = res.headers().contains_key("idempotent-replayed");
    let status = res.status();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, String::from_utf8_lossy(&b).into_owned())
}

fn build(
    method: &str,
    uri: &str,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("idempotency-key", "same-key");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(Body::from(body)).unwrap()
}

/// idempotency.md, table: "same key, another method, path, query or body | 422"; "The
/// fingerprint is SHA-256 over the method, the path and query ... and the body". Pairs whose
/// path, query and body spell the same bytes when run together (`/ab` + `c` against `/a` +
/// `bc`, `/o?x` + `` against `/o` + `?x`, `/o?a=1` + `&b` against `/o?a=1&b` + ``) are different
/// requests: the second is 422, never the first one's response.
#[tokio::test(start_paused = true)]
async fn s41_fingerprint_parts_do_not_run_together() {
    let pairs: &[((&str, &str, &'static str), (&str, &str, &'static str))] = &[
        (("POST", "/ab", "c"), ("POST", "/a", "bc")),
        (("POST", "/o?x", ""), ("POST", "/o", "?x")),
        (("POST", "/o?a=1", "&b"), ("POST", "/o?a=1&b", "")),
        (("POST", "/o", ""), ("POST", "/o?", "")),
        (("PATCH", "/o", "x"), ("POST", "/o", "x")),
    ];
    for (a, b) in pairs {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            &runs,
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        );
        let (s, _, body) = send(&app, build(a.0, a.1, &[("authorization", "t")], a.2)).await;
        assert_eq!((s, body.as_str()), (StatusCode::CREATED, "run 0"), "{a:?}");
        let (s, replayed, body) = send(&app, build(b.0, b.1, &[("authorization", "t")], b.2)).await;
        assert!(
            !replayed,
            "{b:?} after {a:?} under one key was answered with the first's response: {s} {body}"
        );
        assert_eq!(
            s,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{b:?} after {a:?}: {body}"
        );
    }
}

/// idempotency.md, "Client scope": "`ByCredentials::default()` reads `Authorization`,
/// `Proxy-Authorization`, `X-API-Key`, `API-Key`, `X-Auth-Token`, `X-Access-Token` and `Cookie`;
/// two requests share a key space only when all of them are equal" and "one client never gets
/// another's stored response". Credentials whose values run together, or the same value in
/// another header, are other clients: each runs its own handler under the same key.
#[tokio::test(start_paused = true)]
async fn s41_scope_values_do_not_run_together() {
    type H = &'static [(&'static str, &'static str)];
    let pairs: &[(H, H)] = &[
        (
            &[("authorization", "a"), ("x-api-key", "bc")],
            &[("authorization", "ab"), ("x-api-key", "c")],
        ),
        (&[("authorization", "k1")], &[("x-api-key", "k1")]),
        (&[("x-auth-token", "k1")], &[("x-access-token", "k1")]),
        (&[("api-key", "k1")], &[("proxy-authorization", "k1")]),
        (&[("cookie", "k1")], &[("authorization", "k1")]),
        (
            &[("authorization", "a,b")],
            &[("authorization", "a"), ("authorization", "b")],
        ),
        (&[("x-api-key", "")], &[]),
    ];
    for (a, b) in pairs {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = app(
            &runs,
            IdempotencyLayer::new(MemoryStore::default(), ByCredentials::default()),
        );
        let (s, _, _) = send(&app, build("POST", "/orders", a, "{}")).await;
        assert_eq!(s, StatusCode::CREATED, "{a:?}");
        let (s, replayed, body) = send(&app, build("POST", "/orders", b, "{}")).await;
        assert!(
            !replayed && runs.load(Ordering::SeqCst) == 2,
            "client {b:?} got client {a:?}'s stored response: {s} {body}"
        );
    }
}

/// idempotency.md, "Client scope": "`.with_cookies(["session_id"])` reads only the named
/// cookies". The same session with other cookies around it (in another order, on two `Cookie`
/// lines) is one client; `xsession_id=` or `session_id` spelled as another cookie's value is
/// not that session.
#[tokio::test(start_paused = true)]
async fn s41_named_cookie_scope() {
    let runs = Arc::new(AtomicUsize::new(0));
    let shared = app(
        &runs,
        IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default().with_cookies(["session_id"]),
        ),
    );
    let (s, _, _) = send(
        &shared,
        build("POST", "/o", &[("cookie", "session_id=abc; _ga=1")], "{}"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    for same in [
        &[("cookie", "_ga=2; session_id=abc")][..],
        &[("cookie", "_ga=3"), ("cookie", "session_id=abc")][..],
    ] {
        let (_, replayed, body) = send(&shared, build("POST", "/o", same, "{}")).await;
        assert!(replayed, "{same:?} is the same session: {body}");
    }
    for other in [
        &[("cookie", "session_id=abd; _ga=1")][..],
        &[("cookie", "xsession_id=abc")][..],
        &[("cookie", "_ga=session_id=abc")][..],
        &[("cookie", "_ga=1")][..],
    ] {
        // A fresh store each time: requests without the named cookie share one scope.
        let runs = Arc::new(AtomicUsize::new(0));
        let fresh = app(
            &runs,
            IdempotencyLayer::new(
                MemoryStore::default(),
                ByCredentials::default().with_cookies(["session_id"]),
            ),
        );
        send(
            &fresh,
            build("POST", "/o", &[("cookie", "session_id=abc")], "{}"),
        )
        .await;
        let (_, replayed, body) = send(&fresh, build("POST", "/o", other, "{}")).await;
        assert!(
            !replayed && runs.load(Ordering::SeqCst) == 2,
            "{other:?} was taken for session abc: {body}"
        );
    }
}

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Method, Vec<Vec<u8>>)>>>);

impl Seen {
    fn service(
        &self,
        status: u16,
    ) -> impl tower::Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
           + Send
           + Sync
           + 'static {
        let me = self.clone();
        service_fn(move |r: Request<Full<Bytes>>| {
            let me = me.clone();
            async move {
                let n = {
                    let mut v = me.0.lock().unwrap();
                    v.push((
                        r.method().clone(),
                        r.headers()
                            .get_all("idempotency-key")
                            .iter()
                            .map(|v| v.as_bytes().to_vec())
                            .collect(),
                    ));
                    v.len()
                };
                let s = if n == 1 { status } else { 200 };
                Ok::<_, BoxError>(
                    Response::builder()
                        .status(s)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            }
        })
    }
}

/// idempotency.md, "Client": "`.with_header(name)` and `.with_methods([..])` change the header
/// and the methods". With `.with_methods([Method::PUT])` in a `ClientBuilder`, a POST gets no
/// key (so its 503 is not retried) and a PUT gets one, the same on its retry.
#[tokio::test(start_paused = true)]
async fn s41_client_with_methods_changes_which_calls_get_a_key() {
    let seen = Seen::default();
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .build(seen.service(503));
    let r = Request::post("http://api.example.com/o")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = client.clone().oneshot(r).await.unwrap();
    assert_eq!(res.status(), 503);
    {
        let v = seen.0.lock().unwrap();
        assert_eq!(v.len(), 1, "the unkeyed POST was sent again");
        assert!(v[0].1.is_empty(), "the POST got a key: {:?}", v[0].1);
    }
    let seen = Seen::default();
    let client = ClientBuilder::new()
        .with_idempotency(IdempotencyKeyLayer::new().with_methods([Method::PUT]))
        .build(seen.service(503));
    let r = Request::put("http://api.example.com/o")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = client.oneshot(r).await.unwrap();
    assert_eq!(res.status(), 200);
    let v = seen.0.lock().unwrap();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].1.len(), 1, "the PUT got no key");
    assert_eq!(v[0].1, v[1].1, "one key for both attempts");
}

/// idempotency.md, "Client": "`.with_header(name)` ... change the header"; a key the caller
/// already put in that header is kept.
#[tokio::test(start_paused = true)]
async fn s41_client_keeps_a_callers_key_in_a_custom_header() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let http = service_fn(move |r: Request<Full<Bytes>>| {
        let seen = seen2.clone();
        async move {
            seen.lock().unwrap().push(
                r.headers()
                    .get_all("x-op-id")
                    .iter()
                    .map(|v| v.as_bytes().to_vec())
                    .collect::<Vec<_>>(),
            );
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::new())))
        }
    });
    let client = ClientBuilder::new()
        .with_idempotency(
            IdempotencyKeyLayer::new().with_header(HeaderName::from_static("x-op-id")),
        )
        .build(http);
    let r = Request::post("http://api.example.com/o")
        .header("x-op-id", "mine-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.oneshot(r).await.unwrap();
    assert_eq!(seen.lock().unwrap()[0], vec![b"mine-1".to_vec()]);
}
