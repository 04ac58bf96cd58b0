//! Interop: hostile and odd values from a peer (a small axum server of the test's own on
//! 127.0.0.1:0): `Retry-After` forms, `Link` headers, long pauses, against the composed client,
//! the rate limiter and the pager.
use crate::interop_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use futures_util::TryStreamExt;
use interop_common::*;
use sturdy::core::ErrorKind;
use sturdy::paginate::{LinkHeader, Paginate};
use sturdy::ratelimit::RateLimitLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// What the handler answers to hit number `n` (from 0) of a path.
type Answer = Arc<dyn Fn(usize, &Uri) -> (StatusCode, Vec<(String, String)>, String) + Send + Sync>;

/// Starts a server on 127.0.0.1:0 that answers every request with `answer(hit, uri)`; returns
/// its base URL and the hit counter.
async fn serve(answer: Answer) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().fallback(move |uri: Uri| {
        let answer = answer.clone();
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (status, headers, body) = answer(n, &uri);
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(&v).unwrap(),
                );
            }
            (status, map, body).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), hits)
}

fn h(k: &str, v: &str) -> (String, String) {
    (k.to_string(), v.to_string())
}

/// docs/guides/retry.md: "A date already past (a server whose clock runs behind ours) asks for
/// no wait at all, so the retry follows almost at once, not after the backoff." Through the
/// default `ClientBuilder` (whose rate limiter also reads `Retry-After` on a 429), a 429 whose
/// `Retry-After` is a date in the past is followed by a quick retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_retry_after_date_on_429_retries_almost_at_once() {
    let (base, hits) = serve(Arc::new(|n, _| {
        if n == 0 {
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![h("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
                String::new(),
            )
        } else {
            (StatusCode::OK, vec![], "ok".into())
        }
    }))
    .await;
    let client = ClientBuilder::new().build(http());
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "a 429 with a past Retry-After date",
        client.oneshot(get(&format!("{base}/past"))),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    let took = start.elapsed();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // Not the 250 ms backoff base, not a 1 s default pause.
    assert!(took < Duration::from_millis(200), "took {took:?}");
}

/// The same for a 503 with a past date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_retry_after_date_on_503_retries_almost_at_once() {
    let (base, hits) = serve(Arc::new(|n, _| {
        if n == 0 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                vec![h("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
                String::new(),
            )
        } else {
            (StatusCode::OK, vec![], "ok".into())
        }
    }))
    .await;
    let client = ClientBuilder::new().build(http());
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "a 503 with a past Retry-After date",
        client.oneshot(get(&format!("{base}/past503"))),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    let took = start.elapsed();
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(took < Duration::from_millis(200), "took {took:?}");
}

/// `Retry-After: 0` on a 429: the server asks for no wait; the default client retries at once
/// and later calls are not held back by a default pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_zero_is_no_wait() {
    let (base, hits) = serve(Arc::new(|n, _| {
        if n == 0 {
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![h("retry-after", "0")],
                String::new(),
            )
        } else {
            (StatusCode::OK, vec![], "ok".into())
        }
    }))
    .await;
    let client = ClientBuilder::new().build(http());
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "a 429 with Retry-After: 0",
        client.clone().oneshot(get(&format!("{base}/zero"))),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    assert_eq!(res.status(), 200);
    let took = start.elapsed();
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(took < Duration::from_millis(200), "took {took:?}");
}

/// Garbage `Retry-After` values on 503s: never a panic, the call ends within bounded time
/// (the backoff, not a wait the value seems to ask for), and the server is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_retry_after_values_are_bounded() {
    let values = [
        "-1",
        "1.5",
        "99999999999999999999999999999999999999",
        "Mon, 01 Jan 0001 00:00:00 GMT",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "\u{7f}",
        "1, 2",
        "0x10",
        "",
        "1e3",
    ];
    for v in values {
        let value = v.to_string();
        let (base, hits) = serve(Arc::new(move |n, _| {
            if n == 0 {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    vec![h("retry-after", &value)],
                    String::new(),
                )
            } else {
                (StatusCode::OK, vec![], "ok".into())
            }
        }))
        .await;
        let client = ClientBuilder::new().build(http());
        let start = Instant::now();
        let out = bounded(
            Duration::from_secs(8),
            "a 503 with a garbage Retry-After",
            client.oneshot(get(&format!("{base}/garbage"))),
        )
        .await;
        let took = start.elapsed();
        match out {
            Ok(res) => assert_eq!(res.status(), 200, "{v:?}"),
            Err(e) => {
                // A huge wait is refused at once with RateLimited: that must be the reason.
                let e = e
                    .downcast_ref::<sturdy::core::Error>()
                    .expect("sturdy error");
                assert!(
                    matches!(e.kind(), ErrorKind::RateLimited { .. }),
                    "{v:?}: {e}"
                );
                assert_eq!(hits.load(Ordering::SeqCst), 1);
            }
        }
        assert!(took < Duration::from_secs(5), "{v:?} took {took:?}");
    }
}

/// docs/guides/ratelimit.md: "Every pause learned from a response is at most `max_pause`" and
/// "The call that received the long pause gets its response as it came, with a `PauseCapped` in
/// the response extensions ... later callers wait at most the cap."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_pause_is_capped_on_the_wire() {
    let (base, hits) = serve(Arc::new(|n, _| {
        if n == 0 {
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![h("retry-after", "99999999999999999999")],
                String::new(),
            )
        } else {
            (StatusCode::OK, vec![], "ok".into())
        }
    }))
    .await;
    let layer = RateLimitLayer::adaptive_only().with_max_pause(Duration::from_millis(300));
    let svc = layer.layer(http());
    let url = format!("{base}/capped");
    let first = svc.clone().oneshot(get(&url)).await.unwrap();
    assert_eq!(first.status(), 429);
    assert!(
        first
            .extensions()
            .get::<sturdy::ratelimit::PauseCapped>()
            .is_some(),
        "the capped pause is reported on the response that asked for it"
    );
    let start = Instant::now();
    let second = bounded(
        Duration::from_secs(5),
        "the call after a capped pause",
        svc.clone().oneshot(get(&url)),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    let took = start.elapsed();
    assert_eq!(second.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(900),
        "waited {took:?}, the cap is 300 ms"
    );
}

fn page_body(page: usize) -> String {
    let items: Vec<String> = (0..3)
        .map(|i| format!("{{\"id\":{}}}", page * 3 + i + 1))
        .collect();
    format!("[{}]", items.join(","))
}

fn page_of(uri: &Uri) -> usize {
    uri.query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("p="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn walk(base: &str, path: &str) -> Result<Vec<u64>, sturdy::core::Error> {
    let pager = Paginate::builder(
        ClientBuilder::new().build(http()),
        &format!("{base}{path}?p=0"),
        LinkHeader::new("").without_limit_param(),
    )
    .with_page_timeout(Duration::from_secs(5))
    .build()
    .unwrap();
    let items: Vec<serde_json::Value> = bounded(
        Duration::from_secs(10),
        "a walk over odd Link headers",
        pager.items().try_collect(),
    )
    .await?;
    Ok(items.iter().map(|v| v["id"].as_u64().unwrap()).collect())
}

/// RFC 8288 3.3: relation types are compared case-insensitively, and `rel` may hold several
/// relation types separated by spaces. Three pages whose next links say `rel="NEXT"` and
/// `rel="prev next"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_relations_case_and_lists() {
    let (base, _) = serve(Arc::new(|_, uri| {
        let p = page_of(uri);
        let mut headers = vec![];
        if p == 0 {
            headers.push(h("link", "</odd?p=1>; rel=\"NEXT\""));
        } else if p == 1 {
            headers.push(h("link", "</odd?p=0>; rel=\"prev next\"; title=\"x\""));
            headers[0] = h(
                "link",
                "</odd?p=0>; rel=\"prev first\", </odd?p=2>; rel=\"last next\"",
            );
        }
        (StatusCode::OK, headers, page_body(p))
    }))
    .await;
    let ids = walk(&base, "/odd").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, (1..=9).collect::<Vec<u64>>());
}

/// A next link whose URI holds commas and semicolons inside its angle brackets, and a `Link`
/// header split over two header lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_targets_with_commas_and_split_headers() {
    let (base, _) = serve(Arc::new(|_, uri| {
        let p = page_of(uri);
        let mut headers = vec![];
        if p == 0 {
            headers.push(h("link", "</c?p=1&f=a,b;c>; rel=\"next\""));
        } else if p == 1 {
            headers.push(h("link", "</c?p=0>; rel=\"prev\""));
            headers.push(h("link", "</c?p=2>; rel=next"));
        }
        (StatusCode::OK, headers, page_body(p))
    }))
    .await;
    let ids = walk(&base, "/c").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, (1..=9).collect::<Vec<u64>>());
}

/// docs/RELIABILITY.md: "`next_link`, which pagination uses, reads past them [100 links] and
/// keeps only the next link". 5,000 other links before the next one, on every page: followed,
/// in bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_links_before_next() {
    let (base, _) = serve(Arc::new(|_, uri| {
        let p = page_of(uri);
        let mut links: Vec<String> = (0..5000)
            .map(|i| format!("</other/{i}>; rel=\"item\""))
            .collect();
        if p < 2 {
            links.push(format!("</many?p={}>; rel=\"next\"", p + 1));
        }
        (
            StatusCode::OK,
            vec![h("link", &links.join(", "))],
            page_body(p),
        )
    }))
    .await;
    let start = Instant::now();
    let ids = walk(&base, "/many").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, (1..=9).collect::<Vec<u64>>());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

/// A page whose `Link` header is 200 KiB of garbage (no `<`, unbalanced quotes): the walk ends
/// after that page (no next link), quickly, without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_link_header_ends_the_walk() {
    let (base, _) = serve(Arc::new(|_, uri| {
        let p = page_of(uri);
        let junk = "rel=\"next; ,;;\"\"<<>".repeat(10_000);
        (StatusCode::OK, vec![h("link", &junk)], page_body(p))
    }))
    .await;
    let start = Instant::now();
    let ids = walk(&base, "/junk").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

/// `parse_link` and `next_link` follow "the Appendix B algorithm" of RFC 8288 (sturdy-core's
/// rustdoc), which parses each `Link` field line on its own (B.1: "For each field_value in
/// field_values: ... Append each member of value_links to links"): a malformed first line (say
/// one a proxy or a CDN added) does not hide the `next` link of a second line, so the walk goes
/// on to every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_link_line_does_not_hide_the_next_line() {
    // The parsers themselves, on the same two field lines.
    let mut headers = http::HeaderMap::new();
    headers.append("link", "preload; </style.css>".parse().unwrap());
    headers.append("link", "</lines?p=1>; rel=\"next\"".parse().unwrap());
    let uri = "http://127.0.0.1:1/lines?p=0";
    assert_eq!(
        sturdy::core::headers::next_link(&headers, uri).as_deref(),
        Some("http://127.0.0.1:1/lines?p=1"),
        "next_link"
    );
    assert_eq!(
        sturdy::core::headers::parse_link(&headers, uri).len(),
        1,
        "parse_link"
    );
    // A first line of a lone comma (an empty list element) has the same effect.
    let mut headers = http::HeaderMap::new();
    headers.append("link", ",".parse().unwrap());
    headers.append("link", "</lines?p=1>; rel=\"next\"".parse().unwrap());
    assert_eq!(
        sturdy::core::headers::next_link(&headers, uri).as_deref(),
        Some("http://127.0.0.1:1/lines?p=1"),
        "next_link after a line \",\""
    );

    let (base, _) = serve(Arc::new(|_, uri| {
        let p = page_of(uri);
        let mut headers = vec![h("link", "preload; </style.css>")];
        if p < 2 {
            headers.push(h("link", &format!("</lines?p={}>; rel=\"next\"", p + 1)));
        }
        (StatusCode::OK, headers, page_body(p))
    }))
    .await;
    let ids = walk(&base, "/lines")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ids,
        (1..=9).collect::<Vec<u64>>(),
        "the walk ended after the first page: the next link on the second Link line was not read"
    );
}

/// An empty `Link` field line, or one of spaces only, before the line holding `next`: no link
/// is malformed there, so the next link is found.
#[test]
fn an_empty_link_line_before_the_next_line() {
    for first in ["", " "] {
        let mut headers = http::HeaderMap::new();
        headers.append("link", first.parse().unwrap());
        headers.append("link", "</lines?p=1>; rel=\"next\"".parse().unwrap());
        assert_eq!(
            sturdy::core::headers::next_link(&headers, "http://127.0.0.1:1/lines?p=0").as_deref(),
            Some("http://127.0.0.1:1/lines?p=1"),
            "first line {first:?}"
        );
    }
}

/// `Link` forms RFC 8288 allows (Appendix B.2 and B.3: optional whitespace around `;` and `=`,
/// parameter names case-insensitive, quoted values holding `,` and `;`, extended parameters,
/// a trailing `;`): each one's `next` link is found; a repeated `rel` keeps its first value.
#[test]
fn link_forms_rfc_8288_allows() {
    let uri = "http://127.0.0.1:1/list?p=1";
    let next = "http://127.0.0.1:1/p2";
    let cases: [(&str, Option<&str>); 12] = [
        ("<p2>; title=\"a, b\"; rel=\"next\"", Some(next)),
        ("<p2>; rel = \"next\"", Some(next)),
        ("<p2>; REL=\"next\"", Some(next)),
        ("<p2>;rel=next", Some(next)),
        ("<p2>; rel=\"next\";", Some(next)),
        (
            "<p1>; rel=\"prev\"; title=\"x;y\", <p2>; rel=\"next\"",
            Some(next),
        ),
        (
            "<p2>; title*=UTF-8''%e2%82%ac%20rates; rel=\"next\"",
            Some(next),
        ),
        ("<p2>; rel=\"next\", <p3>; rel=\"next\"", Some(next)),
        ("<p2>; rel=next; rel=prev", Some(next)),
        ("<p2>; rel=prev; rel=next", None),
        ("  <p2>  ;  rel=\"next\"  ", Some(next)),
        ("<p2>;\trel=\"next\"", Some(next)),
    ];
    let mut wrong = vec![];
    for (value, want) in cases {
        let mut headers = http::HeaderMap::new();
        headers.append("link", value.parse().unwrap());
        let got = sturdy::core::headers::next_link(&headers, uri);
        if got.as_deref() != want {
            wrong.push(format!("{value:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// docs/guides/paginate.md: "A next link to another origin is refused". An origin's scheme and
/// host are case-insensitive (RFC 3986 6.2.2.1, RFC 6454): a next link spelling the first
/// page's origin as `HTTP://LOCALHOST:<port>` is the same origin, and is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_link_with_the_same_origin_in_other_case_is_followed() {
    let port = Arc::new(std::sync::OnceLock::<u16>::new());
    let p2 = port.clone();
    let (base, _) = serve(Arc::new(move |_, uri| {
        let p = page_of(uri);
        let mut headers = vec![];
        if p < 2 {
            let port = p2.get().unwrap();
            headers.push(h(
                "link",
                &format!("<HTTP://LOCALHOST:{port}/case?p={}>; rel=\"next\"", p + 1),
            ));
        }
        (StatusCode::OK, headers, page_body(p))
    }))
    .await;
    let p: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    port.set(p).unwrap();
    let ids = walk(&format!("http://localhost:{p}"), "/case")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ids, (1..=9).collect::<Vec<u64>>());
}

/// The three HTTP date formats for the same instant, 2027-03-04 05:06:07 UTC, read as the same
/// time (the module docs: "All three formats are accepted (IMF-fixdate, RFC 850, asctime)").
/// RFC 850's two-digit year `27` is 2027 (RFC 9110 5.6.7: a two-digit year is read as the most
/// recent year with those digits that is not more than 50 years in the future).
#[test]
fn http_date_formats_read_alike() {
    use sturdy::core::headers::parse_http_date;
    let want = UNIX_EPOCH + Duration::from_secs(1_804_136_767);
    for v in [
        "Thu, 04 Mar 2027 05:06:07 GMT",
        "Thursday, 04-Mar-27 05:06:07 GMT",
        "Thu Mar  4 05:06:07 2027",
    ] {
        assert_eq!(
            parse_http_date(v.as_bytes(), "retry-after").ok(),
            Some(want),
            "{v:?}"
        );
    }
}

/// A 503 whose `Retry-After` is an RFC 850 date (two-digit year) 3 s ahead: the default
/// client waits until then (2 to 3 s: the date has whole seconds) before the retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc_850_retry_after_on_the_wire() {
    use sturdy::core::WallClock;
    let now = sturdy::core::SystemClock.now();
    let at = now + Duration::from_secs(3);
    let fixdate = sturdy::core::headers::format_http_date(at);
    // "Thu, 04 Mar 2027 05:06:07 GMT" -> "Thursday, 04-Mar-27 05:06:07 GMT"
    let parts: Vec<&str> = fixdate.split(' ').collect();
    let day = match parts[0] {
        "Mon," => "Monday",
        "Tue," => "Tuesday",
        "Wed," => "Wednesday",
        "Thu," => "Thursday",
        "Fri," => "Friday",
        "Sat," => "Saturday",
        _ => "Sunday",
    };
    let rfc850 = format!(
        "{day}, {}-{}-{} {} GMT",
        parts[1],
        parts[2],
        &parts[3][2..],
        parts[4]
    );
    let value = rfc850.clone();
    let (base, hits) = serve(Arc::new(move |n, _| {
        if n == 0 {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                vec![h("retry-after", &value)],
                String::new(),
            )
        } else {
            (StatusCode::OK, vec![], "ok".into())
        }
    }))
    .await;
    let client = ClientBuilder::new().build(http());
    let start = Instant::now();
    let res = bounded(
        Duration::from_secs(10),
        "a 503 with an RFC 850 Retry-After",
        client.oneshot(get(&format!("{base}/rfc850"))),
    )
    .await
    .unwrap_or_else(|e| panic!("{}", chain(&*e)));
    let took = start.elapsed();
    eprintln!("Retry-After: {rfc850}: retried after {took:?}");
    assert_eq!(res.status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert!(took >= Duration::from_millis(1900), "{rfc850}: {took:?}");
}

/// `next_link` "reads past [MAX_LINKS] links": also when they come as 500 field lines of one
/// link each, the `next` link on the last line is found; `parse_link` keeps `MAX_LINKS`.
#[test]
fn next_link_past_many_field_lines() {
    let mut headers = http::HeaderMap::new();
    for i in 0..500 {
        headers.append(
            "link",
            format!("</item/{i}>; rel=\"item\"").parse().unwrap(),
        );
    }
    headers.append("link", "</list?p=2>; rel=\"next\"".parse().unwrap());
    assert_eq!(
        sturdy::core::headers::next_link(&headers, "http://127.0.0.1:1/list?p=1").as_deref(),
        Some("http://127.0.0.1:1/list?p=2")
    );
    assert_eq!(
        sturdy::core::headers::parse_link(&headers, "http://127.0.0.1:1/list?p=1").len(),
        sturdy::core::headers::MAX_LINKS
    );
}
