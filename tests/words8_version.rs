//! docs/guides/version.md and sturdy-version's rustdoc, read literally: the `Deprecation` forms
//! (RFC 9745 `@<unix>`, the legacy `true` and HTTP date), `Sunset` as an HTTP date "read
//! leniently" (the RFC's own example, whose day name is wrong, and the obsolete HTTP-date forms
//! RFC 9110 requires recipients to accept), what an endpoint is (method and path, ids included,
//! no query), the validated header constructor and the untouched response. In process.
#![cfg(feature = "full")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, Response};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, ServiceExt};

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Sends one request with `method` `uri` to an API answering the given headers; returns the
/// notices seen so far on a fresh layer.
async fn notices(
    calls: &[(Method, &str)],
    headers: &[(&'static str, &'static str)],
) -> Vec<Notice> {
    let headers: Vec<(&'static str, &'static str)> = headers.to_vec();
    let api = service_fn(move |_req: Request<()>| {
        let headers = headers.clone();
        async move {
            let mut b = Response::builder();
            for (n, v) in headers {
                b = b.header(n, v);
            }
            Ok::<_, std::convert::Infallible>(b.body("body").unwrap())
        }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let client = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n: &Notice| log.lock().unwrap().push(n.clone()))
        .layer(api);
    for (m, uri) in calls {
        let req = Request::builder()
            .method(m.clone())
            .uri(*uri)
            .body(())
            .unwrap();
        let res = client.clone().oneshot(req).await.unwrap();
        assert_eq!(*res.body(), "body");
    }
    let v = seen.lock().unwrap().clone();
    v
}

async fn one(headers: &[(&'static str, &'static str)]) -> Option<Notice> {
    notices(
        &[(Method::GET, "http://api.example.com/v1/orders")],
        headers,
    )
    .await
    .into_iter()
    .next()
}

/// RFC 8594's own example, `Sunset: Sat, 31 Dec 2018 23:59:59 GMT`, names the wrong day
/// (31 Dec 2018 was a Monday); a sunset "read leniently" still gives the date.
#[tokio::test]
async fn the_rfc_8594_example_with_its_wrong_day_name_is_read() {
    let n = one(&[("sunset", "Sat, 31 Dec 2018 23:59:59 GMT")])
        .await
        .expect("a notice");
    assert_eq!(n.sunset, Some(at(1_546_300_799)));
    assert_eq!(n.endpoint, "GET /v1/orders");
    assert_eq!(n.deprecation, None);
}

/// RFC 9110 §5.6.7: "A recipient that parses a timestamp value in an HTTP header field MUST
/// accept all three HTTP-date formats." The guide says `Sunset` is an HTTP date.
#[tokio::test]
async fn a_sunset_in_the_obsolete_http_date_forms_is_read() {
    for v in ["Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
        let n = one(&[("sunset", v)]).await;
        assert_eq!(
            n.and_then(|n| n.sunset),
            Some(at(784_111_777)),
            "Sunset: {v}"
        );
    }
}

/// "Responses carrying `Deprecation` (RFC 9745 `@<unix>`, or the older `true` / HTTP date)":
/// each form, with the structured-field Date vectors of httpwg/structured-field-tests.
#[tokio::test]
async fn every_deprecation_form_is_read_to_its_date() {
    let cases: [(&'static str, Option<Option<SystemTime>>); 7] = [
        ("@1688169599", Some(Some(at(1_688_169_599)))),
        ("@0", Some(Some(at(0)))),
        ("@-0", Some(Some(at(0)))),
        ("@-1659578233", Some(Some(at(-1_659_578_233)))),
        ("@253402214400", Some(Some(at(253_402_214_400)))),
        ("true", Some(None)),
        (
            "Sun, 11 Nov 2018 23:59:59 GMT",
            Some(Some(at(1_541_980_799))),
        ),
    ];
    for (v, want) in cases {
        let n = one(&[("deprecation", v)]).await;
        assert_eq!(n.map(|n| n.deprecation), Some(want), "Deprecation: {v}");
    }
}

/// Values the structured-field tests say must fail are not read as some other date.
#[tokio::test]
async fn malformed_sf_dates_are_not_read_as_another_date() {
    for v in [
        "@1659578233.12",
        "@",
        "@-",
        "@abc",
        "@ 12345678",
        "@1000000000000000",
    ] {
        let n = one(&[("deprecation", v)]).await;
        if let Some(Some(t)) = n.as_ref().and_then(|n| n.deprecation) {
            panic!("Deprecation: {v} read as the date {t:?}");
        }
    }
}

/// "An endpoint is the method and the path, ids included": the query is not part of it.
#[tokio::test]
async fn an_endpoint_is_the_method_and_the_path_not_the_query() {
    let seen = notices(
        &[
            (Method::GET, "http://api.example.com/v1/orders?page=1"),
            (Method::GET, "http://api.example.com/v1/orders?page=2"),
            (Method::GET, "http://api.example.com/v1/orders/1"),
            (Method::GET, "http://api.example.com/v1/orders/2"),
            (Method::POST, "http://api.example.com/v1/orders"),
            (Method::GET, "http://other.example.com/v1/orders"),
        ],
        &[("deprecation", "true")],
    )
    .await;
    let endpoints: Vec<&str> = seen.iter().map(|n| n.endpoint.as_str()).collect();
    assert_eq!(
        endpoints,
        [
            "GET /v1/orders",
            "GET /v1/orders/1",
            "GET /v1/orders/2",
            "POST /v1/orders"
        ]
    );
}

/// One response with both headers gives one notice carrying both.
#[tokio::test]
async fn deprecation_and_sunset_together_are_one_notice() {
    let seen = notices(
        &[
            (Method::GET, "http://api.example.com/v1/orders"),
            (Method::GET, "http://api.example.com/v1/orders"),
        ],
        &[
            ("deprecation", "@1688169599"),
            ("sunset", "Sun, 30 Jun 2024 23:59:59 GMT"),
        ],
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].deprecation, Some(Some(at(1_688_169_599))));
    assert_eq!(seen[0].sunset, Some(at(1_719_791_999)));
}

/// "`VersionLayer::header(..)?` (a `Result`: the name and value must be valid in a header)".
#[test]
fn header_rejects_what_cannot_go_in_a_header() {
    assert!(VersionLayer::header("api version", "1").is_err());
    assert!(VersionLayer::header("", "1").is_err());
    assert!(VersionLayer::header("api-version", "a\nb").is_err());
    assert!(VersionLayer::header("api-version", "a\0b").is_err());
    assert!(VersionLayer::header("Stripe-Version", "2024-06-20").is_ok());
    // `::query` cannot fail, whatever it is given.
    let _ = VersionLayer::query("", "");
    let _ = VersionLayer::query("a&b=c", "x\ny");
}

/// "The response is untouched": status, headers (the notice headers included) and body.
#[tokio::test]
async fn the_response_is_untouched() {
    let api = service_fn(|_req: Request<()>| async {
        Ok::<_, std::convert::Infallible>(
            Response::builder()
                .status(299)
                .header("deprecation", "@1688169599")
                .header("sunset", "garbage")
                .header("x-other", "1")
                .body("payload")
                .unwrap(),
        )
    });
    let client = VersionLayer::query("api-version", "2024-06-01").layer(api);
    let res = client
        .oneshot(Request::get("http://api.example.com/x").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 299);
    assert_eq!(res.headers()["deprecation"], "@1688169599");
    assert_eq!(res.headers()["sunset"], "garbage");
    assert_eq!(res.headers()["x-other"], "1");
    assert_eq!(res.headers().len(), 3);
    assert_eq!(*res.body(), "payload");
}

/// "`::query(name, version)`, which cannot fail": also on a URI without a path, an
/// origin-form URI, and one whose query ends in `&` or is empty.
#[tokio::test]
async fn a_query_version_is_added_to_any_uri() {
    let api = service_fn(|req: Request<()>| async move {
        Ok::<_, std::convert::Infallible>(Response::new(req.uri().to_string()))
    });
    let client = VersionLayer::query("api-version", "2024-06-01").layer(api);
    for (sent, want) in [
        (
            "http://api.example.com",
            "http://api.example.com/?api-version=2024-06-01",
        ),
        ("/v1/orders", "/v1/orders?api-version=2024-06-01"),
        (
            "http://api.example.com/o?",
            "http://api.example.com/o?api-version=2024-06-01",
        ),
        (
            "http://api.example.com/o?a=1&",
            "http://api.example.com/o?a=1&api-version=2024-06-01",
        ),
    ] {
        let res = client
            .clone()
            .oneshot(Request::get(sent).body(()).unwrap())
            .await
            .unwrap();
        let got = res.into_body();
        let ok = got == want || got == want.replace("&api", "&&api");
        assert!(ok, "{sent} became {got}");
    }
}
