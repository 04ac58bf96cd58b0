//! API version pinning: the query and header forms as the server receives them, a caller's own
//! version kept, and deprecation notices once per endpoint under concurrency and past the bound.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderValue, Request, Response};
use sturdy::core::ErrorKind;
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, Service, ServiceExt};

type Seen = Arc<Mutex<Vec<Request<()>>>>;

fn echo(
    seen: Seen,
    headers: Vec<(&'static str, HeaderValue)>,
) -> impl Service<
    Request<()>,
    Response = Response<&'static str>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    service_fn(move |req: Request<()>| {
        seen.lock().unwrap().push(req);
        let mut res = Response::builder();
        for (k, v) in &headers {
            res = res.header(*k, v.clone());
        }
        let res = res.body("payload").unwrap();
        async move { Ok::<_, Infallible>(res) }
    })
}

fn pairs(req: &Request<()>) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(&req.uri().to_string()).unwrap();
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

async fn send(layer: &VersionLayer, seen: &Seen, uri: &str) -> Request<()> {
    let svc = layer.clone().layer(echo(seen.clone(), vec![]));
    svc.oneshot(Request::get(uri).body(()).unwrap())
        .await
        .unwrap();
    let req = seen.lock().unwrap().pop().unwrap();
    req
}

#[tokio::test]
async fn agents27_query_pin_is_form_encoded_name_and_value() {
    let seen: Seen = Arc::default();
    let layer = VersionLayer::query("api version", "2024-06 & x=1+é");
    let req = send(
        &layer,
        &seen,
        "http://api.example.com/v1/orders?status=open",
    )
    .await;
    assert_eq!(
        pairs(&req),
        vec![
            ("status".to_owned(), "open".to_owned()),
            ("api version".to_owned(), "2024-06 & x=1+é".to_owned())
        ],
        "{}",
        req.uri()
    );
}

#[tokio::test]
async fn agents27_query_pin_keeps_the_callers_version() {
    let seen: Seen = Arc::default();
    let layer = VersionLayer::query("api-version", "2024-06-01");
    for (uri, expect) in [
        ("http://h/p?api-version=2023-01-01", "2023-01-01"),
        ("http://h/p?x=1&api-version=2023-01-01&y=2", "2023-01-01"),
        // The same name, percent-encoded by the caller.
        ("http://h/p?api%2Dversion=2023-01-01", "2023-01-01"),
    ] {
        let req = send(&layer, &seen, uri).await;
        let versions: Vec<String> = pairs(&req)
            .into_iter()
            .filter(|(k, _)| k == "api-version")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(versions, vec![expect.to_owned()], "{uri} -> {}", req.uri());
    }
    // A name that needs encoding, set by the caller in its encoded form.
    let layer = VersionLayer::query("api version", "new");
    let req = send(&layer, &seen, "http://h/p?api+version=old").await;
    let versions: Vec<(String, String)> = pairs(&req)
        .into_iter()
        .filter(|(k, _)| k == "api version")
        .collect();
    assert_eq!(versions.len(), 1, "{}", req.uri());
    assert_eq!(versions[0].1, "old");
}

#[tokio::test]
async fn agents27_query_pin_on_odd_queries_never_panics() {
    let seen: Seen = Arc::default();
    let layer = VersionLayer::query("v", "1");
    for uri in [
        "http://h/p?",
        "http://h/p?%FF%FE=%00",
        "http://h/p?&&",
        "/relative?x",
        "http://h",
    ] {
        let req = send(&layer, &seen, uri).await;
        let q = req.uri().query().unwrap_or("");
        assert!(q.contains("v=1"), "{uri} -> {}", req.uri());
        assert!(
            q.contains("%FF%FE=%00") || !uri.contains("%FF"),
            "the caller's query changed: {}",
            req.uri()
        );
    }
}

#[tokio::test]
async fn agents27_header_pin_keeps_the_callers_values_and_refuses_bad_names() {
    let seen: Seen = Arc::default();
    let layer = VersionLayer::header("Api-Version", "2024-06-01").unwrap();
    let svc = layer.clone().layer(echo(seen.clone(), vec![]));
    let req = Request::get("http://h/p")
        .header("api-version", "a")
        .header("api-version", "b")
        .body(())
        .unwrap();
    svc.oneshot(req).await.unwrap();
    let got = seen.lock().unwrap().pop().unwrap();
    let values: Vec<_> = got.headers().get_all("api-version").iter().collect();
    assert_eq!(values, vec!["a", "b"]);
    for (name, value) in [
        ("bad name", "v"),
        ("", "v"),
        ("api-version", "a\nb"),
        ("x", "\u{7f}"),
    ] {
        let err = VersionLayer::header(name, value).unwrap_err();
        assert_eq!(err.kind(), &ErrorKind::Config, "{name:?} {value:?}");
    }
}

#[tokio::test]
async fn agents27_deprecation_forms_and_untouched_response() {
    let at = UNIX_EPOCH + Duration::from_secs(1_688_169_599);
    for (dep, sunset, expect_dep, expect_sunset) in [
        (Some("@1688169599"), None, Some(Some(at)), None),
        (Some("true"), None, Some(None), None),
        (
            Some("Fri, 30 Jun 2023 23:59:59 GMT"),
            Some("Fri, 30 Jun 2023 23:59:59 GMT"),
            Some(Some(at)),
            Some(at),
        ),
        (None, Some("Fri, 30 Jun 2023 23:59:59 GMT"), None, Some(at)),
    ] {
        let seen: Seen = Arc::default();
        let notes: Arc<Mutex<Vec<Notice>>> = Arc::default();
        let log = notes.clone();
        let mut headers = vec![];
        if let Some(d) = dep {
            headers.push(("deprecation", HeaderValue::from_static(d)));
        }
        if let Some(s) = sunset {
            headers.push(("sunset", HeaderValue::from_static(s)));
        }
        let svc = VersionLayer::header("api-version", "1")
            .unwrap()
            .on_notice(move |n| log.lock().unwrap().push(n.clone()))
            .layer(echo(seen, headers.clone()));
        let res = svc
            .oneshot(
                Request::delete("http://h/v1/orders/o_9?x=1")
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(*res.body(), "payload");
        for (k, v) in &headers {
            assert_eq!(res.headers()[*k], v);
        }
        let notes = notes.lock().unwrap();
        assert_eq!(notes.len(), 1, "{dep:?} {sunset:?}");
        assert_eq!(notes[0].endpoint, "DELETE /v1/orders/o_9");
        assert_eq!(notes[0].deprecation, expect_dep, "{dep:?}");
        assert_eq!(notes[0].sunset, expect_sunset, "{sunset:?}");
    }
}

#[tokio::test]
async fn agents27_hostile_deprecation_values_never_panic() {
    for raw in [
        &b"@"[..],
        b"@-1",
        b"@99999999999999999999999999",
        b"@18446744073709551615",
        b"@9223372036854775807",
        b"@1.5",
        b"?1",
        b"false",
        b"\xff\xfe",
        b"",
        b"Fri, 31 Dec 9999 23:59:59 GMT",
    ] {
        let seen: Seen = Arc::default();
        let v = HeaderValue::from_bytes(raw).unwrap();
        let svc = VersionLayer::header("api-version", "1")
            .unwrap()
            .on_notice(|_| {})
            .layer(echo(seen, vec![("deprecation", v.clone()), ("sunset", v)]));
        let res = svc
            .oneshot(Request::get("http://h/p").body(()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.headers().get("deprecation").unwrap().as_bytes(), raw);
    }
}

#[tokio::test]
async fn agents27_once_per_endpoint_under_concurrency() {
    let seen: Seen = Arc::default();
    let notes: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = notes.clone();
    let svc = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(move |n| log.lock().unwrap().push(n.endpoint.clone()))
        .layer(echo(
            seen,
            vec![("deprecation", HeaderValue::from_static("@1"))],
        ));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let uri = format!("http://h/v1/items?page={i}");
            svc.oneshot(Request::get(uri).body(()).unwrap())
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    svc.clone()
        .oneshot(Request::post("http://h/v1/items").body(()).unwrap())
        .await
        .unwrap();
    let mut got = notes.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, vec!["GET /v1/items", "POST /v1/items"]);
}

#[tokio::test]
async fn agents27_a_new_endpoint_past_the_bound_is_never_missed() {
    let seen: Seen = Arc::default();
    let notes: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = notes.clone();
    let svc = VersionLayer::header("api-version", "1")
        .unwrap()
        .on_notice(move |n| log.lock().unwrap().push(n.endpoint.clone()))
        .layer(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("sunset", "Fri, 30 Jun 2023 23:59:59 GMT")
                    .body(())
                    .unwrap(),
            )
        }));
    drop(seen);
    for i in 0..10_050 {
        let uri = format!("http://h/v1/orders/o_{i}");
        svc.clone()
            .oneshot(Request::get(uri).body(()).unwrap())
            .await
            .unwrap();
    }
    let got = notes.lock().unwrap().clone();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 10_050, "an endpoint was never reported");
    assert_eq!(got.len(), 10_050, "an endpoint reported twice in a row");
}
