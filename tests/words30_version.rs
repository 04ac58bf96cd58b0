//! docs/guides/version.md, read literally: the pinned version (header or query, form-encoded,
//! the caller's own kept), notices once per endpoint (method and path, ids included, not the
//! query), the formats of `Deprecation` and `Sunset`, the 10,000-endpoint memory.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, BoxError, Layer, Service, ServiceExt};

type Seen = Arc<Mutex<Vec<Request<()>>>>;

/// An API that records each request's head and answers with `headers`.
fn api(
    seen: Seen,
    headers: Vec<(&'static str, &'static str)>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    service_fn(move |req: Request<Full<Bytes>>| {
        let (parts, _) = req.into_parts();
        seen.lock().unwrap().push(Request::from_parts(parts, ()));
        let headers = headers.clone();
        async move {
            let mut res = Response::builder().status(299);
            for (n, v) in headers {
                res = res.header(n, v);
            }
            Ok::<_, BoxError>(res.body(Full::from("body")).unwrap())
        }
    })
}

fn get(uri: &str) -> Request<Full<Bytes>> {
    Request::get(uri).body(Full::default()).unwrap()
}

fn notices() -> (
    Arc<Mutex<Vec<Notice>>>,
    impl Fn(&Notice) + Send + Sync + 'static,
) {
    let all: Arc<Mutex<Vec<Notice>>> = Arc::default();
    let a = all.clone();
    (all, move |n: &Notice| a.lock().unwrap().push(n.clone()))
}

/// version.md:53-55: the header pins the version on every request; a version the caller set
/// is kept.
#[tokio::test]
async fn header_pins_the_version_and_keeps_the_callers() {
    let seen = Seen::default();
    let svc = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .layer(api(seen.clone(), vec![]));
    svc.clone().oneshot(get("http://h/a")).await.unwrap();
    let mut mine = get("http://h/b");
    mine.headers_mut()
        .insert("API-Version", "2020-01-01".parse().unwrap());
    svc.clone().oneshot(mine).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].headers()["api-version"], "2024-06-01");
    let values: Vec<_> = seen[1].headers().get_all("api-version").iter().collect();
    assert_eq!(
        values,
        ["2020-01-01"],
        "the caller's version was not kept alone"
    );
}

/// version.md:53-54: "a `Result`: the name and value must be valid in a header".
#[test]
fn header_with_a_bad_name_or_value_is_an_error() {
    assert!(VersionLayer::header("api version", "1").is_err());
    assert!(VersionLayer::header("", "1").is_err());
    assert!(VersionLayer::header("api-version", "1\r\nx: y").is_err());
    assert!(VersionLayer::header("api-version", "2024-06-01").is_ok());
}

/// version.md:54: "`::query(name, version)`, which cannot fail: both are form-encoded"; the
/// caller's query is kept, and a version the caller set in the query is kept.
#[tokio::test]
async fn query_form_encodes_name_and_version_and_keeps_the_callers() {
    let seen = Seen::default();
    let svc = VersionLayer::query("api version", "2024 06&x=1").layer(api(seen.clone(), vec![]));
    svc.clone().oneshot(get("http://h/a?page=2")).await.unwrap();
    let seen_uri = seen.lock().unwrap()[0].uri().to_string();
    assert_eq!(seen_uri, "http://h/a?page=2&api+version=2024+06%26x%3D1");

    let seen = Seen::default();
    let svc = VersionLayer::query("api-version", "2024-06-01").layer(api(seen.clone(), vec![]));
    svc.clone()
        .oneshot(get("http://h/a?api-version=2020-01-01"))
        .await
        .unwrap();
    svc.clone().oneshot(get("http://h/a")).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].uri().query(), Some("api-version=2020-01-01"));
    assert_eq!(seen[1].uri().query(), Some("api-version=2024-06-01"));
}

/// version.md:55-58: reported once per endpoint, "the method and the path, ids included"; the
/// response is untouched.
#[tokio::test]
async fn a_notice_per_method_and_path_not_per_query() {
    let (all, hook) = notices();
    let seen = Seen::default();
    let svc = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(hook)
        .layer(api(
            seen,
            vec![("deprecation", "@1700000000"), ("x-keep", "1")],
        ));
    for uri in [
        "http://h/orders/1?x=1",
        "http://h/orders/1?x=2",
        "http://h/orders/1",
        "http://h/orders/2",
    ] {
        let res = svc.clone().oneshot(get(uri)).await.unwrap();
        assert_eq!(res.status().as_u16(), 299);
        assert_eq!(res.headers()["deprecation"], "@1700000000");
        assert_eq!(res.headers()["x-keep"], "1");
    }
    let post = Request::post("http://h/orders/1")
        .body(Full::default())
        .unwrap();
    svc.clone().oneshot(post).await.unwrap();
    let all = all.lock().unwrap();
    let endpoints: Vec<&str> = all.iter().map(|n| n.endpoint.as_str()).collect();
    assert_eq!(
        endpoints,
        ["GET /orders/1", "GET /orders/2", "POST /orders/1"],
        "{all:?}"
    );
    assert_eq!(
        all[0].deprecation,
        Some(Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)))
    );
    assert_eq!(all[0].sunset, None);
}

/// version.md:56: `Deprecation` as RFC 9745 `@<unix>`, the older `true`, or an HTTP date;
/// `Sunset` (RFC 8594) as an HTTP date.
#[tokio::test]
async fn deprecation_and_sunset_formats_are_read() {
    let cases: [(&str, &str, Option<Option<SystemTime>>, Option<SystemTime>); 3] = [
        ("deprecation", "true", Some(None), None),
        (
            "deprecation",
            "Sun, 11 Nov 2018 23:59:59 GMT",
            Some(Some(UNIX_EPOCH + Duration::from_secs(1_541_980_799))),
            None,
        ),
        (
            "sunset",
            "Sat, 31 Dec 2050 23:59:59 GMT",
            None,
            Some(UNIX_EPOCH + Duration::from_secs(2_556_143_999)),
        ),
    ];
    for (name, value, deprecation, sunset) in cases {
        let (all, hook) = notices();
        let svc = VersionLayer::query("v", "1")
            .on_notice(hook)
            .layer(api(Seen::default(), vec![(name, value)]));
        svc.oneshot(get("http://h/x")).await.unwrap();
        let all = all.lock().unwrap();
        assert_eq!(all.len(), 1, "{name}: {value}");
        assert_eq!(all[0].deprecation, deprecation, "{name}: {value}");
        assert_eq!(all[0].sunset, sunset, "{name}: {value}");
    }
}

/// version.md:58-60: "the layer remembers 10,000 of them, and past that starts afresh, so a new
/// deprecation is never missed": each of 10,000 endpoints once, even when all are asked twice,
/// and the 10,001st still reported.
#[tokio::test]
async fn ten_thousand_endpoints_are_remembered_and_a_new_one_is_never_missed() {
    let (all, hook) = notices();
    let svc = VersionLayer::query("v", "1").on_notice(hook).layer(api(
        Seen::default(),
        vec![("sunset", "Sat, 31 Dec 2050 23:59:59 GMT")],
    ));
    for round in 0..2 {
        for i in 0..10_000 {
            svc.clone()
                .oneshot(get(&format!("http://h/items/{i}")))
                .await
                .unwrap();
        }
        assert_eq!(all.lock().unwrap().len(), 10_000, "round {round}");
    }
    svc.clone()
        .oneshot(get("http://h/items/new"))
        .await
        .unwrap();
    let all = all.lock().unwrap();
    assert_eq!(all.len(), 10_001);
    assert_eq!(all[10_000].endpoint, "GET /items/new");
}
