//! Round s50b, `sturdy-version` from the outside (docs/guides/version.md and the crate docs):
//! `Deprecation` dates from the public structured-field vectors (`@0`, negative, 9999, 0001,
//! the must-fail forms), `Sunset` read leniently (the RFC's own example with a wrong day name,
//! the obsolete HTTP-date forms), once per endpoint under clones and concurrency, the pin kept
//! when the caller set it, and no query secret (an API key the auth layer put in the URI) in the
//! tracing warning or the notice.
#![cfg(feature = "full")]

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use sturdy::version::{Notice, VersionLayer};
use tower::{Layer, Service, ServiceExt};

use crate::s43_util::Logs;

type Notices = Arc<Mutex<Vec<Notice>>>;

/// A layer over an API that answers every request with `headers`, and the notices it reports.
fn stack(
    headers: Vec<(String, String)>,
) -> (
    impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + Sync,
    Notices,
) {
    let notices: Notices = Arc::default();
    let log = notices.clone();
    let headers = Arc::new(headers);
    let api = tower::service_fn(move |_req: Request<()>| {
        let headers = headers.clone();
        async move {
            let mut res = Response::builder().status(200);
            for (k, v) in headers.iter() {
                res = res.header(k.as_str(), v.as_str());
            }
            Ok::<_, Infallible>(res.body(()).unwrap())
        }
    });
    let layer = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n: &Notice| log.lock().unwrap().push(n.clone()));
    (layer.layer(api), notices)
}

async fn one(name: &str, value: &str) -> Vec<Notice> {
    let (svc, notices) = stack(vec![(name.to_owned(), value.to_owned())]);
    svc.oneshot(
        Request::get("http://api.example.com/v1/orders")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    let v = notices.lock().unwrap().clone();
    v
}

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// STANDARDS.md §8.3, httpwg/structured-field-tests `date.json`: the valid dates.
#[tokio::test]
async fn deprecation_structured_field_date_vectors_are_read_exactly() {
    for (value, secs) in [
        ("@0", 0),
        ("@1659578233", 1_659_578_233),
        ("@-1659578233", -1_659_578_233),
        ("@2147483648", 2_147_483_648),
        ("@4294967296", 4_294_967_296),
        ("@253402214400", 253_402_214_400),
        ("@-62135596800", -62_135_596_800),
        ("@-0", 0),
        ("@1688169599", 1_688_169_599),
    ] {
        let n = one("deprecation", value).await;
        assert_eq!(n.len(), 1, "{value}: {n:?}");
        assert_eq!(n[0].deprecation, Some(Some(at(secs))), "{value}");
        assert_eq!(n[0].sunset, None, "{value}");
        assert_eq!(n[0].endpoint, "GET /v1/orders");
    }
}

/// The must-fail forms of `date.json`: never read as a date (no panic either).
#[tokio::test]
async fn deprecation_must_fail_dates_are_not_read_as_dates() {
    for value in [
        "@1659578233.12",
        "@1000000000000000",
        "@-1000000000000000",
        "@",
        "@-",
        "@ 12345678",
        "@abc",
        "garbage",
        "Fri, 31 Dec 99999 23:59:59 GMT",
        "",
    ] {
        let n = one("deprecation", value).await;
        for notice in &n {
            assert!(
                !matches!(notice.deprecation, Some(Some(_))),
                "{value:?} read as a date: {notice:?}"
            );
        }
    }
}

/// The legacy forms the guide names: `true` and an HTTP date.
#[tokio::test]
async fn deprecation_legacy_true_and_http_date() {
    let n = one("deprecation", "true").await;
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].deprecation, Some(None));
    let n = one("deprecation", "Sun, 11 Nov 2018 23:59:59 GMT").await;
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].deprecation, Some(Some(at(1_541_980_799))));
}

/// RFC 8594's own example (a Monday called Saturday), read leniently, and the obsolete
/// HTTP-date forms RFC 9110 §5.6.7 says a recipient must accept.
#[tokio::test]
async fn sunset_is_read_leniently() {
    for (value, secs) in [
        ("Sat, 31 Dec 2018 23:59:59 GMT", 1_546_300_799),
        ("Mon, 31 Dec 2018 23:59:59 GMT", 1_546_300_799),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 784_111_777),
        ("Sun Nov  6 08:49:37 1994", 784_111_777),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 253_402_300_799),
    ] {
        let n = one("sunset", value).await;
        assert_eq!(n.len(), 1, "{value}: {n:?}");
        assert_eq!(n[0].sunset, Some(at(secs)), "{value}");
        assert_eq!(n[0].deprecation, None, "{value}");
    }
}

/// Garbage in `Sunset` (and a huge value) is no panic, and the response is untouched.
#[tokio::test]
async fn hostile_sunset_values_do_not_panic() {
    let big = "9".repeat(64 * 1024);
    for value in [
        "garbage",
        "@123",
        "Fri, 31 Dec 99999 23:59:59 GMT",
        "Fri, 32 Dec 2024 23:59:59 GMT",
        "Fri, 31 Dec 2024 25:61:61 GMT",
        big.as_str(),
    ] {
        let (svc, notices) = stack(vec![("sunset".into(), value.into())]);
        let res = svc
            .oneshot(Request::get("http://api.example.com/x").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.headers()["sunset"], value);
        for n in notices.lock().unwrap().iter() {
            assert!(n.sunset.is_none() || value.contains("Dec 2024"), "{n:?}");
        }
    }
}

/// Both headers on one response make one notice with both dates.
#[tokio::test]
async fn deprecation_and_sunset_together_make_one_notice() {
    let (svc, notices) = stack(vec![
        ("deprecation".into(), "@1688169599".into()),
        ("sunset".into(), "Sun, 30 Jun 2024 23:59:59 GMT".into()),
    ]);
    svc.oneshot(Request::get("http://api.example.com/a").body(()).unwrap())
        .await
        .unwrap();
    let n = notices.lock().unwrap().clone();
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].deprecation, Some(Some(at(1_688_169_599))));
    assert_eq!(n[0].sunset, Some(at(1_719_791_999)));
}

/// "An endpoint is the method and the path, ids included": the query is not part of it, and
/// 64 concurrent clones calling one endpoint report it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clones_report_an_endpoint_once_whatever_its_query() {
    let (svc, notices) = stack(vec![("deprecation".into(), "true".into())]);
    let mut tasks = Vec::new();
    for i in 0..64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let uri = format!("http://api.example.com/v1/orders/7?page={i}");
            svc.oneshot(Request::get(uri).body(()).unwrap())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = notices.lock().unwrap().clone();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].endpoint, "GET /v1/orders/7");
    // Another method and another id are other endpoints.
    let mut svc = svc;
    for (m, p) in [("POST", "/v1/orders/7"), ("GET", "/v1/orders/8")] {
        let req = Request::builder()
            .method(m)
            .uri(format!("http://api.example.com{p}"))
            .body(())
            .unwrap();
        svc.ready().await.unwrap().call(req).await.unwrap();
    }
    assert_eq!(notices.lock().unwrap().len(), 3);
}

/// 10,000 endpoints remembered, then afresh: 12,000 distinct endpoints are each reported
/// exactly once (a new one is never missed), with no panic.
#[tokio::test]
async fn twelve_thousand_endpoints_are_each_reported() {
    let (svc, notices) = stack(vec![("deprecation".into(), "@1".into())]);
    let mut svc = svc;
    for i in 0..12_000 {
        let req = Request::get(format!("http://api.example.com/items/{i}"))
            .body(())
            .unwrap();
        svc.ready().await.unwrap().call(req).await.unwrap();
    }
    let n = notices.lock().unwrap();
    assert_eq!(n.len(), 12_000);
    let distinct: std::collections::HashSet<_> = n.iter().map(|n| n.endpoint.clone()).collect();
    assert_eq!(distinct.len(), 12_000);
}

/// The version layer under an API key in the query (as `AuthLayer::api_key_query` outside it puts it):
/// the warning and the notice name the endpoint without the query, so the key shows nowhere.
#[tokio::test]
async fn the_warning_never_shows_a_query_key() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let (svc, notices) = stack(vec![
        ("deprecation".into(), "@1688169599".into()),
        ("sunset".into(), "Sun, 30 Jun 2024 23:59:59 GMT".into()),
    ]);
    svc.oneshot(
        Request::get(
            "http://user:PW-s50b-1234@api.example.com/v1/things?x=1&api_key=KEY-s50b-9f8e7d6c",
        )
        .body(())
        .unwrap(),
    )
    .await
    .unwrap();
    let text = logs.text();
    assert!(!text.is_empty(), "a tracing warning is expected");
    assert!(text.contains("/v1/things"), "{text}");
    for secret in ["KEY-s50b-9f8e7d6c", "PW-s50b-1234"] {
        assert!(!text.contains(secret), "{secret} in logs: {text}");
        let n = format!("{:?}", notices.lock().unwrap());
        assert!(!n.contains(secret), "{secret} in notice: {n}");
    }
}

/// "a version the caller set is kept": the header in any case; the query pin form-encoded,
/// and a caller's own value of that parameter kept, once.
#[tokio::test]
async fn the_callers_version_is_kept() {
    let seen: Arc<Mutex<Vec<Request<()>>>> = Arc::default();
    let log = seen.clone();
    let api = tower::service_fn(move |req: Request<()>| {
        log.lock().unwrap().push(req);
        async { Ok::<_, Infallible>(Response::new(())) }
    });
    let svc = VersionLayer::header("API-Version", "2024-06-01")
        .unwrap()
        .layer(api.clone());
    svc.clone()
        .oneshot(
            Request::get("http://a.example/x")
                .header("api-version", "2020-01-01")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    svc.oneshot(Request::get("http://a.example/x").body(()).unwrap())
        .await
        .unwrap();
    {
        let s = seen.lock().unwrap();
        let v0: Vec<_> = s[0].headers().get_all("api-version").iter().collect();
        assert_eq!(v0, ["2020-01-01"]);
        assert_eq!(s[1].headers()["api-version"], "2024-06-01");
    }
    seen.lock().unwrap().clear();
    let svc = VersionLayer::query("api version", "2024 06&01").layer(api);
    svc.clone()
        .oneshot(Request::get("http://a.example/x?a=1").body(()).unwrap())
        .await
        .unwrap();
    svc.oneshot(
        Request::get("http://a.example/x?api+version=mine&b=2")
            .body(())
            .unwrap(),
    )
    .await
    .unwrap();
    let s = seen.lock().unwrap();
    let q0 = s[0].uri().query().unwrap().to_owned();
    assert!(q0.starts_with("a=1&"), "{q0}");
    assert!(
        q0.ends_with("api+version=2024+06%2601") || q0.ends_with("api%20version=2024%2006%2601"),
        "{q0}"
    );
    assert_eq!(s[1].uri().query(), Some("api+version=mine&b=2"));
}

/// Header pins that cannot go in a header are `Config` errors, never panics.
#[test]
fn header_pins_that_cannot_be_sent_are_config_errors() {
    for (name, value) in [
        ("api version", "1"),
        ("", "1"),
        ("api-version", "a\nb"),
        ("api-version", "a\rb"),
        ("api-version", "a\0b"),
    ] {
        let err = VersionLayer::header(name, value).unwrap_err();
        assert_eq!(
            err.kind(),
            &sturdy::core::ErrorKind::Config,
            "{name:?} {value:?}"
        );
    }
}

/// Found a fault in round s50b (fixed): a valid HTTP date before 1970 in `Sunset` or in a legacy `Deprecation` is
/// dropped: the response is not reported at all, while `Deprecation: @-1659578233` (1917) is.
/// docs/guides/version.md: "Responses carrying `Deprecation` (RFC 9745 `@<unix>`, or the older
/// `true` / HTTP date) or `Sunset` (RFC 8594) are reported once per endpoint".
#[tokio::test]
async fn fault_pre_1970_http_dates_are_not_reported() {
    let mut missed = Vec::new();
    for (name, value, secs) in [
        ("sunset", "Mon, 01 Jan 1900 00:00:00 GMT", -2_208_988_800i64),
        ("sunset", "Wed, 31 Dec 1969 23:59:59 GMT", -1),
        (
            "deprecation",
            "Mon, 01 Jan 1900 00:00:00 GMT",
            -2_208_988_800,
        ),
        ("deprecation", "Wed, 31 Dec 1969 23:59:59 GMT", -1),
    ] {
        let n = one(name, value).await;
        let got = n.first().and_then(|n| {
            if name == "sunset" {
                n.sunset
            } else {
                n.deprecation.flatten()
            }
        });
        if got != Some(at(secs)) {
            missed.push(format!("{name}: {value} -> {n:?}"));
        }
    }
    assert!(missed.is_empty(), "not reported: {missed:#?}");
}

/// `@999999999999999` and its negative (structured-field "can fail": the syntactic maximum)
/// are no panic either way.
#[tokio::test]
async fn syntactic_extremes_do_not_panic() {
    for value in ["@999999999999999", "@-999999999999999"] {
        let _ = one("deprecation", value).await;
    }
}

/// "an HTTP date, read leniently": the draft RFC 9745 example (`UTC` for `GMT`), a lower-case
/// zone, doubled spaces and a missing day name are read.
#[tokio::test]
async fn sunset_leniency_beyond_imf_fixdate() {
    let mut missed = Vec::new();
    for value in [
        "Sun, 30 Jun 2024 23:59:59 UTC",
        "Sun, 30 Jun 2024 23:59:59 gmt",
        "Sun,  30 Jun 2024 23:59:59 GMT",
        "30 Jun 2024 23:59:59 GMT",
        " Sun, 30 Jun 2024 23:59:59 GMT ",
    ] {
        let n = one("sunset", value).await;
        if n.first().and_then(|n| n.sunset) != Some(at(1_719_791_999)) {
            missed.push(value);
        }
    }
    assert!(missed.is_empty(), "not read: {missed:?}");
}
