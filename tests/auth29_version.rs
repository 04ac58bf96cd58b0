//! `sturdy::version` against `docs/guides/version.md` and its crate docs: the pin, the
//! once-per-endpoint notices, hostile header values and composition.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Request, Response};
use sturdy::core::ErrorKind;
use sturdy::version::{Notice, VersionLayer};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::auth29_util::Logs;

type Seen = Arc<Mutex<Vec<Request<()>>>>;

/// An API that answers with the given headers and records each request.
fn api(seen: &Seen, headers: Vec<(&'static str, HeaderValue)>) -> ApiSvc {
    let seen = seen.clone();
    let headers = Arc::new(headers);
    ApiSvc::new(tower::service_fn(move |req: Request<()>| {
        let seen = seen.clone();
        let headers = headers.clone();
        async move {
            seen.lock().unwrap().push(req);
            let mut res = Response::builder().status(299);
            for (k, v) in headers.iter() {
                res = res.header(*k, v.clone());
            }
            Ok(res.body("the body".to_owned()).unwrap())
        }
    }))
}

type ApiSvc =
    tower::util::BoxCloneSyncService<Request<()>, Response<String>, std::convert::Infallible>;

fn notices(layer: VersionLayer) -> (VersionLayer, Arc<Mutex<Vec<Notice>>>) {
    let log: Arc<Mutex<Vec<Notice>>> = Arc::default();
    let l = log.clone();
    (
        layer.on_notice(move |n| l.lock().unwrap().push(n.clone())),
        log,
    )
}

fn pinned() -> VersionLayer {
    VersionLayer::header("api-version", "2024-06-01").unwrap()
}

fn r(method: &str, uri: &str) -> Request<()> {
    Request::builder().method(method).uri(uri).body(()).unwrap()
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap()
}

#[tokio::test]
async fn the_crate_example_reports_once_per_endpoint() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let svc = layer.layer(api(&seen, vec![("deprecation", hv("@1688169599"))]));
    for _ in 0..3 {
        svc.clone()
            .oneshot(r("GET", "http://api.example.com/v1/orders"))
            .await
            .unwrap();
    }
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].endpoint, "GET /v1/orders");
    assert_eq!(
        log[0].deprecation,
        Some(Some(UNIX_EPOCH + Duration::from_secs(1_688_169_599)))
    );
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|q| q.headers()["api-version"] == "2024-06-01"));
}

#[test]
fn invalid_header_names_and_values_are_config_errors_naming_which() {
    for (name, value, which) in [
        ("api version", "2024", "name"),
        ("", "2024", "name"),
        ("api\nversion", "2024", "name"),
        ("api-version", "2024\r\nX-Evil: 1", "value"),
        ("api-version", "2024\0", "value"),
        ("api-version", "2024\u{7f}", "value"),
    ] {
        let err = VersionLayer::header(name, value).expect_err(name);
        assert_eq!(err.kind(), &ErrorKind::Config);
        assert!(err.to_string().contains(which), "{name:?}/{value:?}: {err}");
    }
}

#[tokio::test]
async fn a_version_the_caller_set_is_kept_and_not_doubled() {
    let seen = Seen::default();
    let svc = pinned().layer(api(&seen, vec![]));
    let mut req = r("GET", "http://api.example.com/x");
    req.headers_mut().insert("API-Version", hv("2023-01-01"));
    svc.oneshot(req).await.unwrap();
    let got = seen.lock().unwrap();
    let all: Vec<_> = got[0].headers().get_all("api-version").iter().collect();
    assert_eq!(all, [hv("2023-01-01")]);
}

#[tokio::test]
async fn query_version_is_form_encoded_and_the_callers_query_kept() {
    let seen = Seen::default();
    let svc = VersionLayer::query("api version", "2024 06&x=1").layer(api(&seen, vec![]));
    svc.clone()
        .oneshot(r("GET", "http://api.example.com/p?b=%2F&a=1"))
        .await
        .unwrap();
    svc.clone()
        .oneshot(r("GET", "http://api.example.com/q"))
        .await
        .unwrap();
    let got = seen.lock().unwrap();
    let u0 = got[0].uri().to_string();
    assert!(
        u0 == "http://api.example.com/p?b=%2F&a=1&api+version=2024+06%26x%3D1"
            || u0 == "http://api.example.com/p?b=%2F&a=1&api%20version=2024%2006%26x%3D1",
        "{u0}"
    );
    let u1 = got[1].uri().to_string();
    assert!(u1.starts_with("http://api.example.com/q?api"), "{u1}");
}

#[tokio::test]
async fn query_version_the_caller_set_is_kept() {
    let seen = Seen::default();
    let svc = VersionLayer::query("api-version", "2024-06-01").layer(api(&seen, vec![]));
    svc.oneshot(r(
        "GET",
        "http://api.example.com/p?api-version=2023-01-01&z=1",
    ))
    .await
    .unwrap();
    assert_eq!(
        seen.lock().unwrap()[0].uri().to_string(),
        "http://api.example.com/p?api-version=2023-01-01&z=1"
    );
}

#[tokio::test]
async fn deprecation_forms_and_sunset_are_read() {
    let cases: Vec<(
        Vec<(&'static str, HeaderValue)>,
        Option<Option<SystemTime>>,
        Option<SystemTime>,
    )> = vec![
        (vec![("deprecation", hv("true"))], Some(None), None),
        (
            vec![("deprecation", hv("Sun, 11 Nov 2018 23:59:59 GMT"))],
            Some(Some(UNIX_EPOCH + Duration::from_secs(1_541_980_799))),
            None,
        ),
        (
            vec![("sunset", hv("Sat, 31 Dec 2033 23:59:59 GMT"))],
            None,
            Some(UNIX_EPOCH + Duration::from_secs(2_019_686_399)),
        ),
        (
            vec![
                ("deprecation", hv("@1688169599")),
                ("sunset", hv("Sat, 31 Dec 2033 23:59:59 GMT")),
            ],
            Some(Some(UNIX_EPOCH + Duration::from_secs(1_688_169_599))),
            Some(UNIX_EPOCH + Duration::from_secs(2_019_686_399)),
        ),
    ];
    for (headers, dep, sunset) in cases {
        let seen = Seen::default();
        let (layer, log) = notices(pinned());
        let svc = layer.layer(api(&seen, headers.clone()));
        svc.oneshot(r("DELETE", "http://api.example.com/v2/items/7"))
            .await
            .unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1, "{headers:?}");
        assert_eq!(log[0].endpoint, "DELETE /v2/items/7");
        assert_eq!(log[0].deprecation, dep, "{headers:?}");
        assert_eq!(log[0].sunset, sunset, "{headers:?}");
    }
}

#[tokio::test]
async fn endpoints_are_method_and_path_ids_included_without_query_or_host() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let svc = layer.layer(api(&seen, vec![("deprecation", hv("true"))]));
    for (m, u) in [
        ("GET", "http://a.example.com/o/1"),
        ("GET", "http://a.example.com/o/2"),
        ("GET", "http://a.example.com/o/1?page=2"),
        ("GET", "http://b.example.com/o/1"),
        ("POST", "http://a.example.com/o/1"),
    ] {
        svc.clone().oneshot(r(m, u)).await.unwrap();
    }
    let eps: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.endpoint.clone())
        .collect();
    assert_eq!(eps, ["GET /o/1", "GET /o/2", "POST /o/1"]);
}

#[tokio::test]
async fn the_response_is_untouched() {
    let seen = Seen::default();
    let svc = pinned().layer(api(
        &seen,
        vec![
            ("deprecation", hv("@1")),
            ("sunset", hv("garbage")),
            ("x-other", hv("kept")),
        ],
    ));
    let res = svc
        .oneshot(r("GET", "http://api.example.com/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 299);
    assert_eq!(res.headers()["deprecation"], "@1");
    assert_eq!(res.headers()["sunset"], "garbage");
    assert_eq!(res.headers()["x-other"], "kept");
    assert_eq!(res.headers().len(), 3);
    assert_eq!(res.into_body(), "the body");
}

#[tokio::test(flavor = "current_thread")]
async fn hostile_deprecation_values_never_panic_under_a_subscriber() {
    let logs = Logs::default();
    let _g = logs.capture();
    let long = "9".repeat(100_000);
    let values: Vec<HeaderValue> = vec![
        hv("@999999999999999"),
        hv("@-99999999999"),
        hv("@-1"),
        hv("@18446744073709551616"),
        hv("@9223372036854775807"),
        hv("@-9223372036854775808"),
        hv("@"),
        hv("@abc"),
        hv("@1.5"),
        hv("false"),
        hv("TRUE"),
        hv(""),
        hv("Mon, 01 Jan 0001 00:00:00 GMT"),
        hv("Fri, 31 Dec 9999 23:59:59 GMT"),
        hv("Sat, 01 Jan 10000 00:00:00 GMT"),
        HeaderValue::from_bytes(&[0xff, 0xfe, b'@', 0x80]).unwrap(),
        HeaderValue::from_str(&format!("@{long}")).unwrap(),
    ];
    for (i, v) in values.into_iter().enumerate() {
        let seen = Seen::default();
        let (layer, log) = notices(pinned());
        let svc = layer.layer(api(
            &seen,
            vec![("deprecation", v.clone()), ("sunset", v.clone())],
        ));
        let res = svc
            .oneshot(r("GET", &format!("http://api.example.com/h/{i}")))
            .await
            .unwrap();
        assert_eq!(res.headers()["deprecation"], v);
        let log = log.lock().unwrap();
        assert!(log.len() <= 1);
        if let Some(n) = log.first() {
            let _ = format!("{n:?}");
        }
    }
    let _ = logs.text();
}

#[tokio::test(flavor = "current_thread")]
async fn a_far_future_deprecation_is_read_and_logged_as_year_9999() {
    let logs = Logs::default();
    let _g = logs.capture();
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let svc = layer.layer(api(&seen, vec![("deprecation", hv("@999999999999999"))]));
    svc.oneshot(r("GET", "http://api.example.com/far"))
        .await
        .unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 1, "not reported");
    // Read as it is; only its formatting is clamped.
    assert_eq!(
        log[0].deprecation,
        Some(Some(UNIX_EPOCH + Duration::from_secs(999_999_999_999_999)))
    );
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("GET /far"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("9999"), "{line}");
}

/// A four-digit year below 100 is not a two-digit RFC 850 year: `Sunset: Mon, 01 Jan 0001` is
/// year 1 (reported as that date since round s50b), never 2001.
#[tokio::test]
async fn a_sunset_in_year_1_is_year_1_not_2001() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let svc = layer.layer(api(
        &seen,
        vec![("sunset", hv("Mon, 01 Jan 0001 00:00:00 GMT"))],
    ));
    svc.oneshot(r("GET", "http://api.example.com/s"))
        .await
        .unwrap();
    let log = log.lock().unwrap();
    let year_1 = UNIX_EPOCH - Duration::from_secs(62_135_596_800);
    assert!(
        log.iter().all(|n| n.sunset == Some(year_1)),
        "year 1 read as another date: {:?}",
        log.first()
    );
}

#[tokio::test]
async fn no_headers_no_notice() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let svc = layer.layer(api(&seen, vec![("x-deprecated", hv("true"))]));
    svc.oneshot(r("GET", "http://api.example.com/n"))
        .await
        .unwrap();
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn past_ten_thousand_endpoints_a_new_one_is_never_missed() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let mut svc = layer.layer(api(&seen, vec![("deprecation", hv("true"))]));
    for i in 0..10_050 {
        svc.ready()
            .await
            .unwrap()
            .call(r("GET", &format!("http://api.example.com/e/{i}")))
            .await
            .unwrap();
    }
    assert_eq!(log.lock().unwrap().len(), 10_050);
}

#[tokio::test(flavor = "current_thread")]
async fn a_notice_is_a_tracing_warning_naming_the_endpoint() {
    let logs = Logs::default();
    let _g = logs.capture();
    let seen = Seen::default();
    let svc = pinned().layer(api(
        &seen,
        vec![("sunset", hv("Sat, 31 Dec 2033 23:59:59 GMT"))],
    ));
    svc.oneshot(r("PATCH", "http://api.example.com/v1/thing/9"))
        .await
        .unwrap();
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("PATCH /v1/thing/9"))
        .unwrap_or_else(|| panic!("no line names the endpoint: {text}"));
    assert!(line.contains("WARN"), "{line}");
}

#[tokio::test]
async fn many_tasks_one_endpoint_one_notice() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let svc = layer.layer(api(&seen, vec![("deprecation", hv("true"))]));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = svc.clone();
        tasks.push(tokio::spawn(async move {
            s.oneshot(r("GET", "http://api.example.com/same"))
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn under_buffer_limit_and_timeout_with_a_kept_service() {
    let seen = Seen::default();
    let (layer, log) = notices(pinned());
    let inner = ServiceBuilder::new()
        .layer(layer)
        .concurrency_limit(1)
        .service(api(&seen, vec![("deprecation", hv("true"))]));
    let mut svc = ServiceBuilder::new()
        .timeout(Duration::from_secs(1))
        .service(tower::buffer::Buffer::new(inner, 2));
    for i in 0..10 {
        svc.ready()
            .await
            .unwrap()
            .call(r("GET", &format!("http://api.example.com/k/{}", i % 3)))
            .await
            .unwrap();
    }
    assert_eq!(log.lock().unwrap().len(), 3);
    assert_eq!(seen.lock().unwrap().len(), 10);
}

fn assert_send_sync_clone<T: Send + Sync + Clone>(_: &T) {}

#[test]
fn layer_and_service_are_send_sync_clone() {
    let seen = Seen::default();
    let layer = pinned();
    assert_send_sync_clone(&layer);
    let svc = layer.layer(api(&seen, vec![]));
    assert_send_sync_clone(&svc);
    assert_send_sync_clone(&VersionLayer::query("v", "1"));
}
