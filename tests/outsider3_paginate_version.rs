//! Third-round outside tests of pagination (docs/guides/paginate.md) and API versions
//! (docs/guides/version.md): link loops, endless and dripping bodies, origin tricks, hostile
//! `page()` limits and cursors, and deprecation notices across many endpoints.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{json, Value};
use sturdy::core::{BoxError, ErrorKind};
use sturdy::paginate::{JsonCursor, LinkHeader, Paginate, MAX_CURSOR_LEN};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, ServiceExt};

type Hits = Arc<Mutex<Vec<String>>>;
type Svc = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<BoxBody<Bytes, BoxError>>,
    BoxError,
>;

fn full(s: String) -> BoxBody<Bytes, BoxError> {
    Full::new(Bytes::from(s)).map_err(|e| match e {}).boxed()
}

/// A Link-header API: `links(path)` gives the page's items and its Link header.
fn link_api(hits: Hits, links: fn(&str) -> (Value, Option<String>)) -> Svc {
    tower::util::BoxCloneSyncService::new(service_fn(move |req: Request<Full<Bytes>>| {
        let hits = hits.clone();
        async move {
            hits.lock().unwrap().push(req.uri().to_string());
            let (items, link) = links(req.uri().path());
            let mut res = Response::builder();
            if let Some(l) = link {
                res = res.header("link", l);
            }
            Ok::<_, BoxError>(res.body(full(items.to_string())).unwrap())
        }
    }))
}

async fn walk(pager: &Paginate<LinkHeader>) -> (Vec<Value>, Option<sturdy::core::Error>) {
    let mut s = pager.items();
    let mut items = Vec::new();
    loop {
        match s.try_next().await {
            Ok(Some(v)) => items.push(v),
            Ok(None) => return (items, None),
            Err(e) => return (items, Some(e)),
        }
    }
}

#[tokio::test]
async fn a_link_loop_yields_each_item_once_then_a_loop_error() {
    let hits: Hits = Arc::default();
    let api = link_api(hits.clone(), |p| match p {
        "/a" => (json!([1, 2]), Some("</b>; rel=next".to_owned())),
        "/b" => (
            json!([3]),
            Some("<http://api.example.com/a>; rel=next".to_owned()),
        ),
        _ => (json!([]), None),
    });
    let pager = Paginate::new(api, "http://api.example.com/a", LinkHeader::new("")).unwrap();
    let (items, err) = tokio::time::timeout(Duration::from_secs(5), walk(&pager))
        .await
        .unwrap();
    assert_eq!(items, vec![json!(1), json!(2), json!(3)]);
    assert_eq!(err.expect("a loop error").kind(), &ErrorKind::Pagination);
    assert_eq!(hits.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_endless_chain_of_new_links_stops_at_max_pages() {
    let hits: Hits = Arc::default();
    let h2 = hits.clone();
    let api =
        tower::util::BoxCloneSyncService::new(service_fn(move |req: Request<Full<Bytes>>| {
            let hits = h2.clone();
            async move {
                let n = {
                    let mut h = hits.lock().unwrap();
                    h.push(req.uri().to_string());
                    h.len()
                };
                Ok::<_, BoxError>(
                    Response::builder()
                        .header("link", format!("</p{n}>; rel=next"))
                        .body(full(json!([n]).to_string()))
                        .unwrap(),
                )
            }
        }));
    let pager = Paginate::builder(api, "http://api.example.com/p0", LinkHeader::new(""))
        .with_max_pages(7)
        .build()
        .unwrap();
    let (items, err) = tokio::time::timeout(Duration::from_secs(5), walk(&pager))
        .await
        .unwrap();
    assert_eq!(items.len(), 7);
    assert_eq!(err.expect("a bound error").kind(), &ErrorKind::Pagination);
    assert_eq!(hits.lock().unwrap().len(), 7);
}

#[tokio::test]
async fn origin_tricks_in_next_links_are_refused() {
    for link in [
        "<http://api.example.com@evil.example.net/x>; rel=next",
        "<http://api.example.com.evil.example.net/x>; rel=next",
        "<https://api.example.com/x>; rel=next",
        "<http://api.example.com:8080/x>; rel=next",
        "<//evil.example.net/x>; rel=next",
        "<file:///etc/passwd>; rel=next",
    ] {
        let hits: Hits = Arc::default();
        let h2 = hits.clone();
        let owned = link.to_owned();
        let api =
            tower::util::BoxCloneSyncService::new(service_fn(move |req: Request<Full<Bytes>>| {
                let (hits, link) = (h2.clone(), owned.clone());
                async move {
                    hits.lock().unwrap().push(req.uri().to_string());
                    Ok::<_, BoxError>(
                        Response::builder()
                            .header("link", link)
                            .body(full("[1]".to_owned()))
                            .unwrap(),
                    )
                }
            }));
        let pager = Paginate::new(api, "http://api.example.com/a", LinkHeader::new("")).unwrap();
        let (items, err) = walk(&pager).await;
        assert_eq!(items, vec![json!(1)], "{link}");
        let err = err.unwrap_or_else(|| panic!("{link}: no error"));
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{link}: {err}");
        assert_eq!(
            hits.lock().unwrap().as_slice(),
            ["http://api.example.com/a"],
            "{link}"
        );
    }
}

/// A page whose head arrives and whose body never ends: `drip` between 1 KiB chunks.
fn endless(drip: Duration) -> Svc {
    tower::util::BoxCloneSyncService::new(service_fn(
        move |_req: Request<Full<Bytes>>| async move {
            let s = futures_util::stream::repeat(()).then(move |()| async move {
                if !drip.is_zero() {
                    tokio::time::sleep(drip).await;
                }
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![b' '; 1024])))
            });
            Ok::<_, BoxError>(Response::new(BodyExt::boxed(StreamBody::new(s))))
        },
    ))
}

#[tokio::test(start_paused = true)]
async fn an_endless_fast_body_stops_at_the_page_limit() {
    let pager = Paginate::builder(
        endless(Duration::ZERO),
        "http://api.example.com/a",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_page_bytes(64 * 1024)
    .build()
    .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), pager.page(None, 5))
        .await
        .expect("bounded")
        .unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Body, "{e}");
}

#[tokio::test(start_paused = true)]
async fn a_dripping_body_stops_at_the_page_timeout() {
    let pager = Paginate::builder(
        endless(Duration::from_millis(500)),
        "http://api.example.com/a",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(3))
    .build()
    .unwrap();
    let start = tokio::time::Instant::now();
    let e = pager.page(None, 5).await.unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::Timeout, "{e}");
    assert!(start.elapsed() <= Duration::from_millis(3_500));
}

fn cursor_api(calls: Arc<AtomicUsize>) -> Svc {
    tower::util::BoxCloneSyncService::new(service_fn(move |req: Request<Full<Bytes>>| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            let start: usize = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("cursor=")))
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let end = (start + 10).min(35);
            let next = if end < 35 {
                json!(end.to_string())
            } else {
                Value::Null
            };
            let body = json!({ "data": (start..end).collect::<Vec<_>>(), "next": next });
            Ok::<_, BoxError>(Response::new(full(body.to_string())))
        }
    }))
}

#[tokio::test]
async fn hostile_page_limits_and_cursors() {
    let calls = Arc::new(AtomicUsize::new(0));
    let pager = Paginate::builder(
        cursor_api(calls.clone()),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_max_items(12)
    .build()
    .unwrap();
    // usize::MAX is honoured up to max_items.
    let p = pager.page(None, usize::MAX).await.unwrap();
    assert_eq!(p.items.len(), 12);
    assert!(p.has_more);
    // 0 is taken as 1 (or refused), never a panic or an empty page with has_more forever.
    match pager.page(None, 0).await {
        Ok(p) => assert!(!p.items.is_empty() || !p.has_more),
        Err(e) => assert_eq!(e.kind(), &ErrorKind::Config),
    }
    let before = calls.load(Ordering::SeqCst);
    let huge = "A".repeat(MAX_CURSOR_LEN + 1);
    for c in [huge.as_str(), "", "\u{0}", "é", &"x".repeat(MAX_CURSOR_LEN)] {
        let e = pager.page(Some(c), 5).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "no request for a forged cursor"
    );
    // A real cursor still resumes exactly.
    let c = p.next_cursor.unwrap();
    let p2 = pager.page(Some(&c), 3).await.unwrap();
    assert_eq!(p2.items, vec![json!(12), json!(13), json!(14)]);
}

fn deprecated_api() -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("deprecation", "@1688169599")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
    })
}

#[tokio::test]
async fn every_deprecated_endpoint_is_reported_even_after_many_others() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let client = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n: &Notice| log.lock().unwrap().push(n.endpoint.clone()))
        .layer(deprecated_api());
    // A REST API with ids in its paths: each order is an endpoint (method and path).
    for i in 0..10_000 {
        client
            .clone()
            .oneshot(
                Request::get(format!("http://api.example.com/v1/orders/{i}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    // Then another endpoint is deprecated: the caller must hear of it.
    client
        .clone()
        .oneshot(
            Request::post("http://api.example.com/v1/payments")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().any(|e| e == "POST /v1/payments"),
        "POST /v1/payments was never reported ({} notices)",
        seen.len()
    );
}

#[tokio::test]
async fn hostile_deprecation_values_leave_the_response_untouched() {
    let values: Vec<Vec<u8>> = vec![
        b"@99999999999999999999999".to_vec(),
        b"@-9223372036854775808".to_vec(),
        b"@".to_vec(),
        vec![b'@'; 64 * 1024],
        b"\xff\xfe".to_vec(),
        b"true, false".to_vec(),
    ];
    for v in values {
        let v2 = v.clone();
        let api = service_fn(move |_req: Request<Full<Bytes>>| {
            let v = v2.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("deprecation", http::HeaderValue::from_bytes(&v).unwrap())
                        .header("sunset", http::HeaderValue::from_bytes(&v).unwrap())
                        .body(Full::new(Bytes::from_static(b"body")))
                        .unwrap(),
                )
            }
        });
        let client = VersionLayer::query("api-version", "2024-06-01")
            .on_notice(|_n: &Notice| {})
            .layer(api);
        let r = client
            .oneshot(
                Request::get("http://api.example.com/x")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.headers()["deprecation"].as_bytes(), v.as_slice());
        assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "body");
    }
}
