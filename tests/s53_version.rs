//! s53 outside round: docs/guides/version.md and sturdy-version's rustdoc read sentence by
//! sentence; `Deprecation` and `Sunset` at the extremes (year 1, year 9999, malformed, huge,
//! several lines).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, Response};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, ServiceExt};

use crate::logs13_common::Capture;

type Seen = Arc<Mutex<Vec<Notice>>>;
type Reqs = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A client over an API that answers with `headers`; it records each request's URI and its
/// `api-version` header, and the layer's notices.
fn client(
    layer: VersionLayer,
    headers: Vec<(&'static str, String)>,
) -> (
    impl tower::Service<
            Request<()>,
            Response = Response<String>,
            Error = Infallible,
            Future = impl Send,
        > + Clone,
    Seen,
    Reqs,
) {
    let seen: Seen = Arc::default();
    let reqs: Reqs = Arc::default();
    let r2 = reqs.clone();
    let api = service_fn(move |req: Request<()>| {
        r2.lock().unwrap().push((
            req.uri().to_string(),
            req.headers()
                .get_all("api-version")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .reduce(|a, b| format!("{a}|{b}")),
        ));
        let mut b = Response::builder().status(299);
        for (k, v) in &headers {
            b = b.header(*k, v.as_str());
        }
        let resp = b
            .header("x-body", "kept")
            .body("payload".to_owned())
            .unwrap();
        async move { Ok::<_, Infallible>(resp) }
    });
    let s2 = seen.clone();
    let svc = layer
        .on_notice(move |n: &Notice| s2.lock().unwrap().push(n.clone()))
        .layer(api);
    (svc, seen, reqs)
}

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn pinned() -> VersionLayer {
    VersionLayer::header("api-version", "2024-06-01").unwrap()
}

async fn one(headers: Vec<(&'static str, String)>) -> Vec<Notice> {
    let (svc, seen, _) = client(pinned(), headers);
    let resp = svc
        .oneshot(
            Request::get("http://api.example.com/v1/orders")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 299, "the response is untouched");
    assert_eq!(resp.body(), "payload");
    let out = seen.lock().unwrap().clone();
    out
}

#[tokio::test]
async fn s53_the_header_is_pinned_and_a_callers_own_is_kept() {
    let (svc, _seen, reqs) = client(pinned(), vec![]);
    svc.clone()
        .oneshot(Request::get("http://api.example.com/a").body(()).unwrap())
        .await
        .unwrap();
    svc.clone()
        .oneshot(
            Request::get("http://api.example.com/b")
                .header("Api-Version", "2020-01-01")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let r = reqs.lock().unwrap().clone();
    assert_eq!(r[0].1.as_deref(), Some("2024-06-01"));
    assert_eq!(
        r[1].1.as_deref(),
        Some("2020-01-01"),
        "kept, not replaced, not doubled"
    );
}

#[tokio::test]
async fn s53_header_names_and_values_that_cannot_be_headers_are_errors() {
    for (name, value) in [
        ("api version", "1"),
        ("", "1"),
        ("api-version", "a\nb"),
        ("api-version", "a\rb"),
        ("api-version", "\0"),
        ("api:version", "1"),
    ] {
        assert!(
            VersionLayer::header(name, value).is_err(),
            "{name:?} {value:?}"
        );
    }
    let e = VersionLayer::header("bad name", "1").unwrap_err();
    assert!(!e.to_string().is_empty());
}

#[tokio::test]
async fn s53_query_pin_is_form_encoded_and_a_callers_own_is_kept() {
    let (svc, _seen, reqs) = client(VersionLayer::query("api version&x", "a b=c&d"), vec![]);
    svc.clone()
        .oneshot(
            Request::get("http://api.example.com/v1/orders?limit=5")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let (svc2, _s, reqs2) = client(VersionLayer::query("v", "2024-06-01"), vec![]);
    svc2.clone()
        .oneshot(
            Request::get("http://api.example.com/v1/orders?v=2019&x=1")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    svc2.clone()
        .oneshot(
            Request::get("http://api.example.com/v1/orders")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let u = reqs.lock().unwrap()[0].0.clone();
    assert!(u.starts_with("http://api.example.com/v1/orders?"), "{u}");
    assert!(u.contains("limit=5"), "{u}");
    assert!(
        u.contains("api+version%26x=a+b%3Dc%26d") || u.contains("api%20version%26x=a%20b%3Dc%26d"),
        "form-encoded name and value: {u}"
    );
    let r2 = reqs2.lock().unwrap().clone();
    assert!(
        r2[0].0.contains("v=2019") && !r2[0].0.contains("2024-06-01"),
        "{r2:?}"
    );
    assert!(r2[1].0.ends_with("/v1/orders?v=2024-06-01"), "{r2:?}");
}

#[tokio::test]
async fn s53_deprecation_sf_dates_at_the_interop_extremes() {
    for (value, want) in [
        ("@0", at(0)),
        ("@-0", at(0)),
        ("@1688169599", at(1_688_169_599)),
        ("@-1659578233", at(-1_659_578_233)),
        ("@2147483648", at(2_147_483_648)),
        ("@253402214400", at(253_402_214_400)),
        ("@-62135596800", at(-62_135_596_800)),
    ] {
        let n = one(vec![("deprecation", value.to_owned())]).await;
        assert_eq!(n.len(), 1, "{value}");
        assert_eq!(n[0].deprecation, Some(Some(want)), "{value}");
        assert_eq!(n[0].sunset, None, "{value}");
        assert_eq!(n[0].endpoint, "GET /v1/orders");
    }
}

#[tokio::test]
async fn s53_deprecation_legacy_forms() {
    let n = one(vec![("deprecation", "true".into())]).await;
    assert_eq!(n[0].deprecation, Some(None));
    let n = one(vec![(
        "deprecation",
        "Sun, 11 Nov 2018 23:59:59 GMT".into(),
    )])
    .await;
    assert_eq!(n[0].deprecation, Some(Some(at(1_541_980_799))));
}

#[tokio::test]
async fn s53_sunset_at_the_extremes() {
    for (value, want) in [
        // RFC 8594's own example: a wrong day name, read leniently.
        ("Sat, 31 Dec 2018 23:59:59 GMT", at(1_546_300_799)),
        ("Mon, 01 Jan 0001 00:00:00 GMT", at(-62_135_596_800)),
        ("Thu, 01 Jan 1970 00:00:00 GMT", at(0)),
        ("Wed, 31 Dec 1969 23:59:59 GMT", at(-1)),
        ("Fri, 31 Dec 9999 23:59:59 GMT", at(253_402_300_799)),
        // obsolete forms an HTTP date may take (RFC 9110 §5.6.7)
        ("Sunday, 06-Nov-94 08:49:37 GMT", at(784_111_777)),
        ("Sun Nov  6 08:49:37 1994", at(784_111_777)),
    ] {
        let n = one(vec![("sunset", value.to_owned())]).await;
        assert_eq!(n.len(), 1, "{value}");
        assert_eq!(n[0].sunset, Some(want), "{value}");
        assert_eq!(n[0].deprecation, None, "{value}");
    }
}

#[tokio::test]
async fn s53_both_headers_make_one_notice() {
    let n = one(vec![
        ("deprecation", "@1688169599".into()),
        ("sunset", "Sun, 30 Jun 2024 23:59:59 GMT".into()),
    ])
    .await;
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].deprecation, Some(Some(at(1_688_169_599))));
    assert_eq!(n[0].sunset, Some(at(1_719_791_999)));
}

#[tokio::test]
async fn s53_malformed_huge_and_repeated_values_never_panic_and_leave_the_response() {
    let huge_num = format!("@{}", "9".repeat(5_000));
    let huge_date = format!("Sun, 30 Jun 2024 23:59:59 GMT{}", " ".repeat(5_000));
    let cases: Vec<Vec<(&'static str, String)>> = vec![
        vec![("deprecation", "@999999999999999".into())],
        vec![("deprecation", "@-999999999999999".into())],
        vec![("deprecation", "@1000000000000000".into())],
        vec![("deprecation", "@9223372036854775807".into())],
        vec![("deprecation", "@-9223372036854775808".into())],
        vec![("deprecation", "@99999999999999999999999".into())],
        vec![("deprecation", "@1659578233.12".into())],
        vec![("deprecation", "@".into())],
        vec![("deprecation", "@-".into())],
        vec![("deprecation", "@ 12345678".into())],
        vec![("deprecation", "@abc".into())],
        vec![("deprecation", "".into())],
        vec![("deprecation", huge_num.clone())],
        vec![("deprecation", "TRUE".into())],
        vec![("deprecation", "?1".into())],
        vec![("sunset", "Sun, 30 Feb 2024 23:59:59 GMT".into())],
        vec![("sunset", "Sun, 31 Dec 10000 23:59:59 GMT".into())],
        vec![("sunset", "Sun, 01 Jan 0000 00:00:00 GMT".into())],
        vec![("sunset", "Sun, 30 Jun 2024 24:00:00 GMT".into())],
        vec![("sunset", "Sun, 30 Jun 2024 23:59:60 GMT".into())],
        vec![("sunset", "Sun, 30 Jun -2024 23:59:59 GMT".into())],
        vec![(
            "sunset",
            "Sun, 30 Jun 99999999999999999999 23:59:59 GMT".into(),
        )],
        vec![("sunset", "Sun, 30 Jun 2024 23:59:59 UTC".into())],
        vec![("sunset", "2024-06-30T23:59:59Z".into())],
        vec![("sunset", huge_date.clone())],
        vec![
            ("deprecation", "@1".into()),
            ("deprecation", "@2".into()),
            ("sunset", "Sun, 30 Jun 2024 23:59:59 GMT".into()),
            ("sunset", "garbage".into()),
        ],
    ];
    for h in cases {
        let desc = format!("{h:.80?}");
        let (svc, seen, _) = client(pinned(), h.clone());
        let resp = svc
            .oneshot(
                Request::get("http://api.example.com/v1/orders")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 299, "{desc}");
        assert_eq!(resp.headers()["x-body"], "kept", "{desc}");
        for (k, v) in &h {
            assert!(
                resp.headers()
                    .get_all(*k)
                    .iter()
                    .any(|x| x.as_bytes() == v.as_bytes()),
                "{desc}: header {k} untouched"
            );
        }
        assert!(seen.lock().unwrap().len() <= 1, "{desc}");
    }
}

#[tokio::test]
async fn s53_an_endpoint_is_method_and_path_ids_included_query_excluded() {
    let (svc, seen, _) = client(pinned(), vec![("deprecation", "@1".into())]);
    for (m, u) in [
        ("GET", "http://api.example.com/v1/orders?page=1"),
        ("GET", "http://api.example.com/v1/orders?page=2"),
        ("GET", "http://api.example.com/v1/orders"),
        ("POST", "http://api.example.com/v1/orders"),
        ("GET", "http://api.example.com/v1/orders/1"),
        ("GET", "http://api.example.com/v1/orders/2"),
        ("GET", "http://api.example.com/v1/orders/2"),
    ] {
        svc.clone()
            .oneshot(Request::builder().method(m).uri(u).body(()).unwrap())
            .await
            .unwrap();
    }
    let eps: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.endpoint.clone())
        .collect();
    assert_eq!(
        eps,
        [
            "GET /v1/orders",
            "POST /v1/orders",
            "GET /v1/orders/1",
            "GET /v1/orders/2"
        ]
    );
}

#[tokio::test]
async fn s53_past_ten_thousand_endpoints_a_new_one_is_never_missed() {
    let (svc, seen, _) = client(
        pinned(),
        vec![("sunset", "Fri, 31 Dec 9999 23:59:59 GMT".into())],
    );
    for i in 0..10_001 {
        svc.clone()
            .oneshot(
                Request::get(format!("http://api.example.com/v1/orders/{i}"))
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    let n = seen.lock().unwrap().len();
    assert_eq!(n, 10_001, "every new endpoint reported");
    // And the first, forgotten or not, is reported at most once more.
    for _ in 0..3 {
        svc.clone()
            .oneshot(
                Request::get("http://api.example.com/v1/orders/0")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    assert!(seen.lock().unwrap().len() <= 10_002);
}

#[tokio::test]
async fn s53_warning_writes_a_pre_1970_date_as_at_unix() {
    let cap = Capture::default();
    let _g = cap.install();
    let n = one(vec![("sunset", "Mon, 01 Jan 0001 00:00:00 GMT".into())]).await;
    assert_eq!(n.len(), 1);
    let text = cap.text();
    assert!(text.contains("WARN"), "a tracing warning: {text}");
    assert!(text.contains("@-62135596800"), "{text}");
    assert!(text.contains("/v1/orders"), "{text}");
}

#[tokio::test]
async fn s53_no_notice_without_either_header() {
    let n = one(vec![(
        "link",
        "<https://d.example>; rel=\"deprecation\"".into(),
    )])
    .await;
    assert!(n.is_empty(), "{n:?}");
}

#[tokio::test]
async fn s53_year_zero_is_not_a_date() {
    // sturdy_core::headers::parse_http_date_any_year: "Years 1 to 9999." The version layer
    // reads Sunset with it.
    use sturdy::core::headers::parse_http_date_any_year;
    assert!(parse_http_date_any_year(b"Mon, 01 Jan 0001 00:00:00 GMT", "sunset").is_ok());
    assert!(parse_http_date_any_year(b"Fri, 31 Dec 9999 23:59:59 GMT", "sunset").is_ok());
    for v in [
        "Sat, 01 Jan 0000 00:00:00 GMT",
        "Sun, 01 Jan 0000 00:00:00 GMT",
    ] {
        let zero = parse_http_date_any_year(v.as_bytes(), "sunset");
        assert!(zero.is_err(), "{v}: year 0 read as {zero:?}");
    }
    let n = one(vec![("sunset", "Sun, 01 Jan 0000 00:00:00 GMT".into())]).await;
    assert!(n.is_empty(), "year 0 reported: {n:?}");
}
