//! Display Strings (RFC 9651 §3.3.8) where the public parsers expect another item: the
//! idempotency server's `Idempotency-Key` (an sf-string) and the version layer's `Deprecation`
//! (an sf-date). Each must be an error or ignored: never a panic, never a value read out of it.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::idempotency::server::{ByCredentials, IdempotencyLayer, MemoryStore};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, ServiceExt};

fn orders(runs: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/orders",
            post(move || {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    (StatusCode::CREATED, format!("order #{n}"))
                }
            }),
        )
        .layer(IdempotencyLayer::new(
            MemoryStore::default(),
            ByCredentials::default(),
        ))
}

async fn post_with_key(app: &Router, key: &[u8]) -> (StatusCode, String) {
    let r = app
        .clone()
        .oneshot(
            Request::post("/orders")
                .header("authorization", "Bearer c-1")
                .header(
                    "idempotency-key",
                    http::HeaderValue::from_bytes(key).unwrap(),
                )
                .body(axum::body::Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A Display String key is not the sf-string it looks like: `%"k-1"` never shares a slot with
/// `"k-1"` or `k-1` (either way of reading it: refused, or the raw text as an opaque key).
#[tokio::test]
async fn a_display_string_key_is_never_decoded_into_another_key() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(runs.clone());
    let (s, first) = post_with_key(&app, b"\"k-1\"").await;
    assert_eq!(s, StatusCode::CREATED);
    for v in [&br#"%"k-1""#[..], br#"%"k%2d1""#, br#"%"k-1";a=1"#] {
        let (s, body) = post_with_key(&app, v).await;
        assert!(
            s == StatusCode::BAD_REQUEST || (s == StatusCode::CREATED && body != first),
            "{:?}: {s} {body} (the first answer was {first})",
            String::from_utf8_lossy(v)
        );
    }
    // Malformed ones: refused or opaque, never a panic, never the stored answer.
    for v in [
        &br#"%"k-1"#[..],
        br#"%"%C3%A9""#,
        br#"%"%c3""#,
        br#"%"%""#,
        br#""k-1";a=%"x"#,
    ] {
        let (s, body) = post_with_key(&app, v).await;
        assert!(
            s == StatusCode::BAD_REQUEST || (s == StatusCode::CREATED && body != first),
            "{:?}: {s} {body}",
            String::from_utf8_lossy(v)
        );
    }
    // The same Display String key twice is one key, whichever way it is read.
    let runs_before = runs.load(Ordering::SeqCst);
    let (a, ab) = post_with_key(&app, br#"%"k-2""#).await;
    let (b, bb) = post_with_key(&app, br#"%"k-2""#).await;
    assert_eq!(a, b);
    if a == StatusCode::CREATED {
        assert_eq!(ab, bb, "a retry with the same key ran again");
        assert_eq!(runs.load(Ordering::SeqCst), runs_before + 1);
    }
}

/// A parameter holding a Display String no longer makes the key unreadable: `"k-3";x=%"y"`
/// is key `k-3`.
#[tokio::test]
async fn a_display_string_parameter_leaves_the_key_readable() {
    let runs = Arc::new(AtomicUsize::new(0));
    let app = orders(runs.clone());
    let (s, first) = post_with_key(&app, b"\"k-3\"").await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, again) = post_with_key(&app, br#""k-3";x=%"y""#).await;
    assert_eq!((s, again), (StatusCode::CREATED, first));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

async fn notice_for(value: &[u8]) -> Vec<Option<Option<std::time::SystemTime>>> {
    let v = value.to_vec();
    let api = service_fn(move |_req: Request<Full<Bytes>>| {
        let v = v.clone();
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("deprecation", http::HeaderValue::from_bytes(&v).unwrap())
                    .body(Full::new(Bytes::from_static(b"body")))
                    .unwrap(),
            )
        }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let client = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n: &Notice| log.lock().unwrap().push(n.deprecation))
        .layer(api);
    let r = client
        .oneshot(
            Request::get("http://api.example.com/x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.headers()["deprecation"].as_bytes(), value);
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "body");
    let out = seen.lock().unwrap().clone();
    out
}

#[tokio::test]
async fn a_display_string_deprecation_is_ignored() {
    for v in [
        &br#"%"@1688169599""#[..],
        br#"%"1688169599""#,
        br#"%"true""#,
        br#"%"Sun, 30 Jun 2024 23:59:59 GMT""#,
        br#"%"%40""#,
        br#"%"unterminated"#,
        br#"%"%C3%A9""#,
    ] {
        let got = notice_for(v).await;
        assert!(
            got.is_empty(),
            "{:?} read as {got:?}",
            String::from_utf8_lossy(v)
        );
    }
    // A date with a Display String parameter is still the date.
    let got = notice_for(br#"@1688169599;note=%"caf%c3%a9""#).await;
    assert_eq!(
        got,
        vec![Some(Some(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_688_169_599)
        ))]
    );
}
