//! docs/guides/version.md and the `sturdy_version` rustdoc, sentence by sentence: the header
//! and query pins (a caller's own version kept, the query form-encoded), `Deprecation` in its
//! three forms and `Sunset`, one report per endpoint (method and path, ids included) through
//! `on_notice` and a `tracing` warning, the response untouched, and the 10,000-endpoint memory
//! that never misses a new endpoint.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use sturdy::core::ErrorKind;
use sturdy::version::{Notice, VersionLayer};
use tower::{Layer, ServiceExt};

use crate::s43_util::Logs;

type Seen = Arc<Mutex<Vec<Request<()>>>>;

/// An API that keeps each request's head and answers with `headers`.
fn api(
    seen: Seen,
    headers: Vec<(&'static str, &'static str)>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = crate::s43_util::Fut<Result<Response<Full<Bytes>>, Infallible>>,
> + Clone
       + Send
       + Sync {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let (parts, _) = req.into_parts();
        seen.lock().unwrap().push(Request::from_parts(parts, ()));
        let mut res = Response::builder().status(299);
        for (k, v) in &headers {
            res = res.header(*k, *v);
        }
        let res = res
            .header("x-other", "kept")
            .body(Full::from("body"))
            .unwrap();
        let fut: crate::s43_util::Fut<Result<Response<Full<Bytes>>, Infallible>> =
            Box::pin(async move { Ok(res) });
        fut
    })
}

fn req(method: Method, uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn the_header_pin_is_set_and_a_callers_own_version_is_kept() {
    let seen = Seen::default();
    let svc = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .layer(api(seen.clone(), vec![]));
    svc.clone()
        .oneshot(req(Method::GET, "https://api.example.com/a"))
        .await
        .unwrap();
    let mut own = req(Method::GET, "https://api.example.com/a");
    own.headers_mut()
        .insert("api-version", "2023-01-01".parse().unwrap());
    svc.oneshot(own).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].headers()["api-version"], "2024-06-01");
    assert_eq!(seen[1].headers().get_all("api-version").iter().count(), 1);
    assert_eq!(seen[1].headers()["api-version"], "2023-01-01");
}

#[test]
fn a_header_name_or_value_that_cannot_go_in_a_header_is_a_config_error() {
    for (n, v) in [
        ("bad name", "1"),
        ("", "1"),
        ("api-version", "a\nb"),
        ("api-version", "x\u{7f}"),
    ] {
        let e = VersionLayer::header(n, v).map(|_| ()).expect_err(n);
        assert_eq!(*e.kind(), ErrorKind::Config, "{n:?} {v:?}: {e}");
    }
}

#[tokio::test]
async fn the_query_pin_is_form_encoded_and_a_callers_own_is_kept() {
    let seen = Seen::default();
    let svc = VersionLayer::query("api version", "2024/06 01&x").layer(api(seen.clone(), vec![]));
    svc.clone()
        .oneshot(req(Method::GET, "https://api.example.com/a?b=%20c&d"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(req(Method::GET, "https://api.example.com/a"))
        .await
        .unwrap();
    svc.oneshot(req(
        Method::GET,
        "https://api.example.com/a?api+version=old",
    ))
    .await
    .unwrap();
    let seen = seen.lock().unwrap();
    let q0 = seen[0].uri().query().unwrap();
    assert!(q0.starts_with("b=%20c&d"), "{q0}");
    assert!(q0.contains("api+version=2024%2F06+01%26x"), "{q0}");
    assert_eq!(seen[1].uri().query(), Some("api+version=2024%2F06+01%26x"));
    assert_eq!(seen[2].uri().query(), Some("api+version=old"));
}

fn notices() -> (Arc<Mutex<Vec<Notice>>>, VersionLayer) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let log = got.clone();
    let layer = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(move |n: &Notice| log.lock().unwrap().push(n.clone()));
    (got, layer)
}

#[tokio::test]
async fn deprecation_in_its_three_forms_and_sunset_are_read() {
    let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_541_980_799);
    let cases: [(
        Vec<(&'static str, &'static str)>,
        Option<Option<SystemTime>>,
        Option<SystemTime>,
    ); 5] = [
        (
            vec![("deprecation", "@1688169599")],
            Some(Some(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_688_169_599),
            )),
            None,
        ),
        (vec![("deprecation", "true")], Some(None), None),
        (
            vec![("deprecation", "Sun, 11 Nov 2018 23:59:59 GMT")],
            Some(Some(date)),
            None,
        ),
        (
            vec![("sunset", "Sun, 11 Nov 2018 23:59:59 GMT")],
            None,
            Some(date),
        ),
        (
            vec![
                ("deprecation", "@1688169599"),
                ("sunset", "Sun, 11 Nov 2018 23:59:59 GMT"),
            ],
            Some(Some(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_688_169_599),
            )),
            Some(date),
        ),
    ];
    for (headers, dep, sunset) in cases {
        let (got, layer) = notices();
        let svc = layer.layer(api(Seen::default(), headers.clone()));
        svc.oneshot(req(Method::GET, "https://api.example.com/v1/x"))
            .await
            .unwrap();
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 1, "{headers:?}");
        assert_eq!(got[0].endpoint, "GET /v1/x");
        assert_eq!(got[0].deprecation, dep, "{headers:?}");
        assert_eq!(got[0].sunset, sunset, "{headers:?}");
    }
}

#[tokio::test]
async fn each_endpoint_method_and_path_ids_included_is_reported_once_and_the_response_untouched() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let (got, layer) = notices();
    let svc = layer.layer(api(Seen::default(), vec![("deprecation", "true")]));
    for (m, u) in [
        (Method::GET, "https://api.example.com/v1/orders/1"),
        (Method::GET, "https://api.example.com/v1/orders/1?page=2"),
        (Method::GET, "https://api.example.com/v1/orders/1"),
        (Method::GET, "https://api.example.com/v1/orders/2"),
        (Method::POST, "https://api.example.com/v1/orders/1"),
        (Method::GET, "https://other.example.com/v1/orders/1"),
    ] {
        let res = svc.clone().oneshot(req(m, u)).await.unwrap();
        assert_eq!(res.status().as_u16(), 299);
        assert_eq!(res.headers()["deprecation"], "true");
        assert_eq!(res.headers()["x-other"], "kept");
        assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "body");
    }
    let eps: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.endpoint.clone())
        .collect();
    assert_eq!(
        eps,
        ["GET /v1/orders/1", "GET /v1/orders/2", "POST /v1/orders/1"]
    );
    let text = logs.text();
    assert_eq!(
        text.lines().filter(|l| l.contains("WARN")).count(),
        3,
        "{text}"
    );
    assert!(!text.contains("page=2"), "{text}");
}

#[tokio::test]
async fn past_10000_endpoints_no_new_deprecation_is_missed() {
    let (got, layer) = notices();
    let svc = layer.layer(api(Seen::default(), vec![("deprecation", "true")]));
    for i in 0..10_001 {
        svc.clone()
            .oneshot(req(
                Method::GET,
                &format!("https://api.example.com/v1/o/{i}"),
            ))
            .await
            .unwrap();
    }
    assert_eq!(got.lock().unwrap().len(), 10_001);
    // The newest one is still remembered.
    svc.oneshot(req(Method::GET, "https://api.example.com/v1/o/10000"))
        .await
        .unwrap();
    assert_eq!(got.lock().unwrap().len(), 10_001);
}

#[test]
fn the_layer_and_its_service_are_send_sync_and_debug_without_surprises() {
    fn send_sync_clone<T: Send + Sync + Clone + std::fmt::Debug>() {}
    send_sync_clone::<VersionLayer>();
    type Inner = tower::util::BoxCloneSyncService<
        Request<Full<Bytes>>,
        Response<Full<Bytes>>,
        sturdy::core::BoxError,
    >;
    fn send_sync<T: Send + Sync>() {}
    send_sync::<sturdy::version::Version<Inner>>();
}

#[tokio::test]
async fn a_callers_own_query_version_in_another_encoding_is_kept_too() {
    let seen = Seen::default();
    let svc = VersionLayer::query("api version", "2").layer(api(seen.clone(), vec![]));
    svc.oneshot(req(
        Method::GET,
        "https://api.example.com/a?api%20version=1",
    ))
    .await
    .unwrap();
    assert_eq!(
        seen.lock().unwrap()[0].uri().query(),
        Some("api%20version=1")
    );
}

#[tokio::test]
async fn header_names_as_apis_spell_them_are_accepted() {
    for name in ["API-Version", "Stripe-Version", "X-GitHub-Api-Version"] {
        let seen = Seen::default();
        let svc = VersionLayer::header(name, "2024-06-20")
            .unwrap()
            .layer(api(seen.clone(), vec![]));
        svc.oneshot(req(Method::GET, "https://api.example.com/a"))
            .await
            .unwrap();
        assert_eq!(
            seen.lock().unwrap()[0].headers()[name.to_ascii_lowercase().as_str()],
            "2024-06-20"
        );
    }
}
