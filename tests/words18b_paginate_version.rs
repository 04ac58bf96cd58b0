//! docs/guides/paginate.md, docs/guides/version.md and the rustdoc of sturdy-paginate and
//! sturdy-version, read literally: build-time checks, foreign and looping next links, tampered
//! cursors, resuming inside a server page, page sizes, bounds, error kinds; version pinning by
//! header and query, and deprecation notices once per endpoint. In-process services.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::ErrorKind;
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate};
use sturdy::version::VersionLayer;
use tower::{Service, ServiceBuilder, ServiceExt};

type Log = Arc<Mutex<Vec<String>>>;

/// A Link-paginated API of `total` items on host `api.test`: `?page=N&per_page=M`; `next(page)`
/// may override the next link.
fn api(
    total: usize,
    next: impl Fn(usize, usize) -> Option<String> + Send + Sync + 'static,
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync
        + 'static,
    Log,
) {
    let log: Log = Arc::default();
    let l = log.clone();
    let next = Arc::new(next);
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let uri = req.uri().clone();
        l.lock().unwrap().push(uri.to_string());
        let q: Vec<(String, String)> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect();
        let get = |k: &str| {
            q.iter()
                .find(|(a, _)| a == k)
                .and_then(|(_, b)| b.parse::<usize>().ok())
        };
        let page = get("page").unwrap_or(1);
        let per = get("per_page").unwrap_or(5);
        let items: Vec<usize> = ((page - 1) * per..(page * per).min(total)).collect();
        let link = next(page, per).or_else(|| {
            (page * per < total).then(|| {
                format!(
                    "<http://api.test/items?page={}&per_page={per}>; rel=\"next\"",
                    page + 1
                )
            })
        });
        let mut b = Response::builder().header("content-type", "application/json");
        if let Some(l) = link {
            b = b.header("link", l);
        }
        let res = b
            .body(Full::new(Bytes::from(json!(items).to_string())))
            .unwrap();
        async move { Ok::<_, std::convert::Infallible>(res) }
    });
    (svc, log)
}

fn nums(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x.as_u64().unwrap()).collect()
}

/// "`.build()` reports every mistake as an error of kind `Config` before any page is fetched: a
/// bound of zero, a page timeout of zero, a cursor key shorter than 32 bytes, a URI that is not
/// absolute, and strategy mistakes such as a JSON pointer without its leading `/` or an empty
/// query parameter name."
#[test]
fn build_reports_every_mistake() {
    let (svc, log) = api(10, |_, _| None);
    let base = "http://api.test/items";
    let b = || Paginate::builder(svc.clone(), base, LinkHeader::new(""));
    let mut errs = vec![
        b().with_max_pages(0).build().err(),
        b().with_max_items(0).build().err(),
        b().with_page_size(0).build().err(),
        b().with_max_page_bytes(0).build().err(),
        b().with_page_timeout(Duration::ZERO).build().err(),
        b().with_cursor_key([7u8; 31]).build().err(),
        Paginate::builder(svc.clone(), "/items", LinkHeader::new(""))
            .build()
            .err(),
        Paginate::builder(svc.clone(), "api.test/items", LinkHeader::new(""))
            .build()
            .err(),
        Paginate::builder(svc.clone(), base, LinkHeader::new("items"))
            .build()
            .err(),
    ];
    errs.push(Paginate::new(svc.clone(), base, JsonCursor::new("data", "/next")).err());
    errs.push(Paginate::new(svc.clone(), base, JsonCursor::new("/data", "next")).err());
    errs.push(
        Paginate::new(
            svc.clone(),
            base,
            JsonCursor::new("/d", "/n").with_cursor_param(""),
        )
        .err(),
    );
    errs.push(Paginate::new(svc.clone(), base, PageNumber::new("/d").with_total("total")).err());
    errs.push(
        Paginate::new(
            svc.clone(),
            base,
            PageNumber::new("/d").with_params("", "size"),
        )
        .err(),
    );
    errs.push(
        Paginate::new(
            svc.clone(),
            base,
            OffsetLimit::new("/d").with_total("total"),
        )
        .err(),
    );
    errs.push(
        Paginate::new(
            svc.clone(),
            base,
            OffsetLimit::new("/d").with_params("offset", ""),
        )
        .err(),
    );
    errs.push(
        Paginate::new(
            svc.clone(),
            base,
            LinkHeader::new("/d").with_limit_param(""),
        )
        .err(),
    );
    for (i, e) in errs.into_iter().enumerate() {
        let e = e.unwrap_or_else(|| panic!("case {i} built"));
        assert_eq!(e.kind(), &ErrorKind::Config, "case {i}: {e}");
    }
    assert!(b().with_cursor_key([7u8; 32]).build().is_ok());
    assert!(log.lock().unwrap().is_empty());
}

/// "A next link to another origin is refused unless `.with_foreign_origin_allowed(true)`".
#[tokio::test]
async fn foreign_next_link() {
    let (svc, log) = api(10, |page, _| {
        (page == 1).then(|| "<http://evil.test/steal>; rel=\"next\"".to_owned())
    });
    let pager = Paginate::new(svc.clone(), "http://api.test/items", LinkHeader::new("")).unwrap();
    let mut items = vec![];
    let mut pages = pager.items();
    let err = loop {
        match pages.try_next().await {
            Ok(Some(v)) => items.push(v),
            Ok(None) => panic!("the foreign link was followed or ignored"),
            Err(e) => break e,
        }
    };
    assert_eq!(nums(&items), [0, 1, 2, 3, 4]);
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(log.lock().unwrap().iter().all(|u| !u.contains("evil")));
    let allowed = Paginate::builder(svc, "http://api.test/items", LinkHeader::new(""))
        .with_foreign_origin_allowed(true)
        .build()
        .unwrap();
    let _ = allowed.items().try_collect::<Vec<_>>().await;
    assert!(log.lock().unwrap().iter().any(|u| u.contains("evil.test")));
}

/// "When a page's next cursor leads to a URI already fetched in this walk (the first page's
/// included), the page is yielded and the walk ends with a loop error ...: no item is yielded
/// twice."
#[tokio::test]
async fn looping_next_link() {
    let (svc, log) = api(100, |page, per| {
        (page == 2).then(|| format!("<http://api.test/items?page=1&per_page={per}>; rel=\"next\""))
    });
    let pager = Paginate::builder(
        svc,
        "http://api.test/items?page=1&per_page=5",
        LinkHeader::new("").without_limit_param(),
    )
    .build()
    .unwrap();
    let mut items = vec![];
    let mut s = pager.items();
    let err = loop {
        match s.try_next().await {
            Ok(Some(v)) => items.push(v),
            Ok(None) => panic!("no loop error"),
            Err(e) => break e,
        }
    };
    assert_eq!(nums(&items), (0..10).collect::<Vec<u64>>());
    assert_eq!(err.kind(), &ErrorKind::Pagination);
    assert!(err.to_string().contains("loop"), "{err}");
    assert_eq!(log.lock().unwrap().len(), 2);
}

/// "`page(cursor, limit)` returns `{ items, has_more, next_cursor }`; the cursor is opaque and
/// resumes exactly after the last item returned, even inside a server page"; in `page()` the
/// page size asked is "`min(limit, 100)`".
#[tokio::test]
async fn bounded_pages_resume_inside_a_server_page() {
    let (svc, log) = api(23, |_, _| None);
    let pager = Paginate::new(svc.clone(), "http://api.test/items", LinkHeader::new("")).unwrap();
    let mut got = vec![];
    let mut cursor: Option<String> = None;
    let mut calls = 0;
    loop {
        calls += 1;
        let p = pager.page(cursor.as_deref(), 7).await.unwrap();
        assert!(p.items.len() <= 7);
        got.extend(nums(&p.items));
        if !p.has_more {
            assert!(p.next_cursor.is_none());
            break;
        }
        cursor = p.next_cursor;
        assert!(calls < 10);
    }
    assert_eq!(got, (0..23).collect::<Vec<u64>>());
    assert!(
        log.lock().unwrap()[0].contains("per_page=7"),
        "{:?}",
        log.lock().unwrap()
    );
    log.lock().unwrap().clear();
    // A server that returns only 5 per page: a limit of 3 resumes inside its page.
    let (svc5, _) = api(12, |_, _| None);
    let capped = tower::service_fn(move |mut req: Request<Full<Bytes>>| {
        let q = req.uri().query().unwrap_or("");
        let q: String = q
            .split('&')
            .map(|p| {
                if p.starts_with("per_page=") {
                    "per_page=5".to_owned()
                } else {
                    p.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("&");
        *req.uri_mut() = format!("http://api.test/items?{q}").parse().unwrap();
        svc5.clone().oneshot(req)
    });
    let pager = Paginate::new(capped, "http://api.test/items", LinkHeader::new("")).unwrap();
    let mut got = vec![];
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let p = pager.page(cursor.as_deref(), 3).await.unwrap();
        got.extend(nums(&p.items));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(got, (0..12).collect::<Vec<u64>>());
    // Limit 500: 100 asked.
    let (svc, log) = api(3, |_, _| None);
    let pager = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    pager.page(None, 500).await.unwrap();
    assert!(
        log.lock().unwrap()[0].contains("per_page=100"),
        "{:?}",
        log.lock().unwrap()
    );
}

/// "A forged, edited or truncated cursor, one from another pager ..., or one from another
/// endpoint, is refused before any request is sent. A cursor is at most 16 KiB"; the same key
/// given with `with_cursor_key` makes cursors portable.
#[tokio::test]
async fn cursors_not_returned_by_this_pager() {
    let (svc, log) = api(30, |_, _| None);
    let key = [9u8; 32];
    let mk = |uri: &str, key: Option<[u8; 32]>| {
        let b = Paginate::builder(svc.clone(), uri, LinkHeader::new(""));
        match key {
            Some(k) => b.with_cursor_key(k),
            None => b,
        }
        .build()
        .unwrap()
    };
    let a = mk("http://api.test/items", Some(key));
    let c = a.page(None, 4).await.unwrap().next_cursor.unwrap();
    let before = log.lock().unwrap().len();
    let mut bad: Vec<String> = vec![];
    let mut flipped = c.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    bad.push(String::from_utf8(flipped).unwrap());
    bad.push(c[..c.len() - 1].to_owned());
    bad.push(format!("{c}A"));
    bad.push(String::new());
    bad.push("x".repeat(17 * 1024));
    bad.push("\u{0}\u{ff}".to_owned());
    for b in &bad {
        let e = a.page(Some(b), 4).await.unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}");
        assert!(
            e.to_string().len() < 2_000,
            "the message repeats the cursor: {} bytes",
            e.to_string().len()
        );
    }
    let other = mk("http://api.test/items", None);
    assert!(other.page(Some(&c), 4).await.is_err());
    let other_endpoint = mk("http://api.test/other", Some(key));
    assert!(other_endpoint.page(Some(&c), 4).await.is_err());
    assert_eq!(
        log.lock().unwrap().len(),
        before,
        "a request went out for a refused cursor"
    );
    let twin = mk("http://api.test/items", Some(key));
    assert_eq!(
        nums(&twin.page(Some(&c), 4).await.unwrap().items),
        [4, 5, 6, 7]
    );
}

/// "A page that is not the expected JSON is named by its number; a page that answered an error
/// status fails with the kind of that status"; "More than `max_pages` pages ... ends a walk with
/// an error after the items before the bound".
#[tokio::test]
async fn bad_pages_and_bounds() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        let path = req.uri().path().to_owned();
        async move {
            let (status, body) = match (path.as_str(), i) {
                ("/bad", 2) => (200, "{not json".to_owned()),
                ("/down", _) => (503, "{}".to_owned()),
                _ => (200, "[1,2]".to_owned()),
            };
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(status)
                    .header("link", format!("<{path}?p={i}>; rel=\"next\""))
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
        }
    });
    let p = Paginate::new(svc.clone(), "http://api.test/bad", LinkHeader::new("")).unwrap();
    let e = p.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert!(e.to_string().contains('2'), "the page is not named: {e}");
    let p = Paginate::new(svc.clone(), "http://api.test/down", LinkHeader::new("")).unwrap();
    let e = p.items().try_collect::<Vec<_>>().await.unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
        "{e}"
    );
    let p = Paginate::builder(svc, "http://api.test/endless", LinkHeader::new(""))
        .with_max_pages(3)
        .build()
        .unwrap();
    let mut s = p.items();
    let mut got = 0;
    let e = loop {
        match s.try_next().await {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("an endless walk ended without error"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, 6);
    assert_eq!(e.kind(), &ErrorKind::Pagination, "{e}");
}

/// A Link header of thousands of links with the next link last: followed, in bounded time.
#[tokio::test]
async fn huge_link_header() {
    let links: Vec<String> = (0..5_000)
        .map(|i| format!("<http://api.test/x{i}>; rel=\"item\""))
        .collect();
    let big = links.join(", ");
    let (svc, log) = api(10, move |page, per| {
        (page == 1)
            .then(|| format!("{big}, <http://api.test/items?page=2&per_page={per}>; rel=\"next\""))
    });
    let p = Paginate::new(svc, "http://api.test/items", LinkHeader::new("")).unwrap();
    let t = tokio::time::Instant::now();
    let all = p.items().try_collect::<Vec<_>>().await.unwrap();
    assert_eq!(all.len(), 10);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(log.lock().unwrap().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Versions

type Seen = Arc<Mutex<Vec<Request<Full<Bytes>>>>>;

fn version_api(
    dep: &'static [(&'static str, &'static str)],
) -> (
    impl Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone,
    Seen,
) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        s.lock().unwrap().push(req);
        let mut b = Response::builder();
        for (k, v) in dep {
            b = b.header(*k, *v);
        }
        let res = b.body(Full::new(Bytes::from_static(b"body"))).unwrap();
        async move { Ok::<_, std::convert::Infallible>(res) }
    });
    (svc, seen)
}

/// "`VersionLayer::header("api-version", "2024-06-01")?` (a `Result`: the name and value must
/// be valid in a header; or `::query(name, version)`, which cannot fail: both are form-encoded)
/// pins the version on every request (a version the caller set is kept)".
#[tokio::test]
async fn pins_by_header_and_query() {
    assert_eq!(
        VersionLayer::header("api version", "1").unwrap_err().kind(),
        &ErrorKind::Config
    );
    assert_eq!(
        VersionLayer::header("api-version", "1\n2")
            .unwrap_err()
            .kind(),
        &ErrorKind::Config
    );
    let (svc, seen) = version_api(&[]);
    let h = ServiceBuilder::new()
        .layer(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .service(svc.clone());
    h.clone()
        .oneshot(
            Request::get("http://a.test/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    h.clone()
        .oneshot(
            Request::get("http://a.test/x")
                .header("api-version", "2020-01-01")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let q = ServiceBuilder::new()
        .layer(VersionLayer::query("api version", "2024-06-01 & x=y"))
        .service(svc);
    for uri in [
        "http://a.test/x",
        "http://a.test/x?b=2&a=1",
        "http://a.test/x?api+version=old",
    ] {
        q.clone()
            .oneshot(Request::get(uri).body(Full::default()).unwrap())
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].headers()["api-version"], "2024-06-01");
    let kept: Vec<_> = seen[1].headers().get_all("api-version").iter().collect();
    assert_eq!(kept, ["2020-01-01"]);
    assert_eq!(
        seen[2].uri().query(),
        Some("api+version=2024-06-01+%26+x%3Dy")
    );
    assert_eq!(
        seen[3].uri().query(),
        Some("b=2&a=1&api+version=2024-06-01+%26+x%3Dy")
    );
    assert_eq!(seen[4].uri().query(), Some("api+version=old"));
}

/// "Responses carrying `Deprecation` (RFC 9745 `@<unix>`, or the older `true` / HTTP date) or
/// `Sunset` (RFC 8594) are reported once per endpoint ... The response is untouched. An endpoint
/// is the method and the path, ids included".
#[tokio::test]
async fn notices_once_per_endpoint() {
    for (headers, want_dep, want_sunset) in [
        (
            &[("deprecation", "@1700000000")][..],
            Some(Some(1_700_000_000u64)),
            None,
        ),
        (&[("deprecation", "true")][..], Some(None), None),
        (
            &[("deprecation", "Sun, 11 Nov 2018 23:59:59 GMT")][..],
            Some(Some(1_541_980_799)),
            None,
        ),
        (
            &[("sunset", "Wed, 11 Nov 2026 11:11:11 GMT")][..],
            None,
            Some(1_794_395_471u64),
        ),
    ] {
        let leaked: &'static [(&'static str, &'static str)] =
            Box::leak(headers.to_vec().into_boxed_slice());
        let (svc, _) = version_api(leaked);
        let notices = Arc::new(Mutex::new(vec![]));
        let n = notices.clone();
        let v = ServiceBuilder::new()
            .layer(
                VersionLayer::header("api-version", "1")
                    .unwrap()
                    .on_notice(move |x| n.lock().unwrap().push(x.clone())),
            )
            .service(svc);
        for (m, uri) in [
            ("GET", "http://a.test/orders/1"),
            ("GET", "http://a.test/orders/1?x=2"),
            ("POST", "http://a.test/orders/1"),
            ("GET", "http://a.test/orders/2"),
            ("GET", "http://a.test/orders/1"),
        ] {
            let res = v
                .clone()
                .oneshot(
                    Request::builder()
                        .method(m)
                        .uri(uri)
                        .body(Full::default())
                        .unwrap(),
                )
                .await
                .unwrap();
            for (k, val) in headers {
                assert_eq!(res.headers()[*k], *val, "the response was touched");
            }
        }
        let notices = notices.lock().unwrap();
        let eps: Vec<_> = notices.iter().map(|n| n.endpoint.clone()).collect();
        assert_eq!(
            eps,
            ["GET /orders/1", "POST /orders/1", "GET /orders/2"],
            "{headers:?}"
        );
        let secs =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(
            notices[0].deprecation.map(|d| d.map(secs)),
            want_dep,
            "{headers:?}"
        );
        assert_eq!(notices[0].sunset.map(secs), want_sunset, "{headers:?}");
    }
}

/// "the layer remembers 10,000 of them, and past that starts afresh, so a new deprecation is
/// never missed".
#[tokio::test]
async fn never_misses_a_new_endpoint() {
    let (svc, _) = version_api(&[("deprecation", "@1700000000")]);
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let v = ServiceBuilder::new()
        .layer(VersionLayer::query("v", "1").on_notice(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        }))
        .service(svc);
    for i in 0..10_050 {
        v.clone()
            .oneshot(
                Request::get(format!("http://a.test/e/{i}"))
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    assert_eq!(count.load(Ordering::SeqCst), 10_050);
}
