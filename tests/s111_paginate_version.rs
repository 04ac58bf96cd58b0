#![cfg(feature = "full")]
//! Outside round s111: pagination (`sturdy::paginate`), API version pinning
//! (`sturdy::version`) and the agent helpers (`tool_result`, `ErrorSummary`, bounded pages and
//! their cursors), through the public API only. Corners: cursors as a language model mangles
//! them (padding, quotes, a newline, a megabyte), loops through an empty or default port, a
//! `Retry-After` met mid-walk under the retry layer (waited out, and cancelled while it is
//! waited out, over a kept client behind `Buffer` and `ConcurrencyLimit(1)`), the words of a
//! bound that is hit, items JSON cannot hold, integers a `serde_json::Value` cannot hold in a
//! tool result, a server whose next link pins another API version, Sunset dates far past and far
//! future over a walk, tower's own `Timeout` under a pager, a walk dropped mid-body over the
//! wire, a page call cut at every await of a retrying kept client, error chains that never end
//! or run 100,000 deep, and a real json-server 0.17 read by bounded pages through a kept
//! `ClientBuilder` client whose calls are cut at seeded points.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, ErrorKind};
use sturdy::paginate::{JsonCursor, LinkHeader, Paginate};
use sturdy::version::{Notice, VersionLayer};
use tower::{service_fn, Layer, Service, ServiceBuilder, ServiceExt};

const KEY: &[u8] = b"s111-a-shared-cursor-key-of-32-bytes-or-more";

type Log = Arc<Mutex<Vec<String>>>;

fn param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

#[allow(clippy::needless_pass_by_value)]
fn json_resp(v: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::from(v.to_string()))
        .unwrap()
}

/// An in-process API: `f` answers each request (by its URI and the whole request); every URI is
/// logged with its `api-version` header, if any.
fn api<F>(
    log: Log,
    f: F,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static
where
    F: Fn(&Uri) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        let f = f.clone();
        async move {
            log.lock().unwrap().push(req.uri().to_string());
            Ok::<_, Infallible>(f(req.uri()))
        }
    })
}

/// A JSON cursor API over `total` items `0..total`: the cursor is the start index, pages of
/// `?limit=` (capped at `cap`).
fn cursor_answer(uri: &Uri, total: usize, cap: usize) -> Response<Full<Bytes>> {
    let start: usize = param(uri, "cursor").map_or(0, |c| c.parse().unwrap());
    let limit: usize = param(uri, "limit").map_or(cap, |l| l.parse().unwrap());
    let end = (start + limit.min(cap)).min(total);
    let next = if end < total {
        json!(end.to_string())
    } else {
        Value::Null
    };
    json_resp(json!({"data": (start..end).collect::<Vec<_>>(), "next": next}))
}

fn nums(v: &[Value]) -> Vec<u64> {
    v.iter().map(|x| x.as_u64().unwrap()).collect()
}

fn summary_of(err: sturdy::core::Error) -> (ErrorSummary, Value) {
    let boxed: BoxError = Box::new(err);
    let s = ErrorSummary::of(&*boxed);
    let out = tool_result::<Value>(Err(boxed));
    (s, out)
}

fn count(log: &Log, needle: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|u| u.contains(needle))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Tool results of integers JSON can write but a `serde_json::Value` cannot hold.
// ---------------------------------------------------------------------------------------------

/// agents guide: "On success the text is the value as JSON ... and `structuredContent` is
/// `{"result": value}`. A value that cannot be written as JSON (a map whose keys are not strings,
/// say) gives `isError: true` with a text that says so". A `u128` past `u64::MAX` and an `i128`
/// below `i64::MIN` can be written as JSON (serde_json writes them); whatever the result, it is
/// one of the two documented shapes and never a panic, and a success text is the number itself.
#[test]
fn s111_tool_result_of_128_bit_integers_is_one_of_the_documented_shapes() {
    for (v, text) in [
        (
            serde_json::to_string(&u128::MAX).unwrap(),
            u128::MAX.to_string(),
        ),
        (
            serde_json::to_string(&i128::MIN).unwrap(),
            i128::MIN.to_string(),
        ),
    ] {
        // serde_json can write both as JSON text.
        assert_eq!(v, text);
    }
    let outs = [
        tool_result::<u128>(Ok(u128::MAX)),
        tool_result::<i128>(Ok(i128::MIN)),
        tool_result::<Vec<u128>>(Ok(vec![1, u128::from(u64::MAX) + 1])),
    ];
    for out in outs {
        let is_error = out["isError"].as_bool().unwrap();
        let text = out["content"][0]["text"].as_str().unwrap().to_owned();
        assert_eq!(out["content"][0]["type"], "text", "{out}");
        if is_error {
            assert!(out.get("structuredContent").is_none(), "{out}");
            assert!(!text.is_empty(), "{out}");
        } else {
            // agents.md: such a value "is a success with its text only, without
            // `structuredContent`".
            assert!(out.get("structuredContent").is_none(), "{out}");
            assert!(
                text == u128::MAX.to_string()
                    || text == i128::MIN.to_string()
                    || text == format!("[1,{}]", u128::from(u64::MAX) + 1),
                "the text is the value as JSON: {out}"
            );
        }
    }
}

/// The same 128-bit value, read literally: it "can be written as JSON", so it is not an error.
#[test]
fn s111_a_u128_json_can_write_is_a_success() {
    let out = tool_result::<u128>(Ok(u128::MAX));
    assert_eq!(out["isError"], false, "{out}");
    assert_eq!(
        out["content"][0]["text"].as_str().unwrap(),
        u128::MAX.to_string(),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Loops through an empty or a default port.
// ---------------------------------------------------------------------------------------------

/// paginate guide: "Pages are known by the URI they are fetched from (its scheme and host in any
/// case, and the scheme's default port written or not, are one URI). When a page's next cursor
/// leads to a URI already fetched in this walk (the first page's included), the page is yielded
/// and the walk ends with a loop error instead of fetching that URI again". An empty port
/// (`host:`, RFC 3986 allows it and says it means the default) and `HTTPS://HOST:443` are the
/// first page again.
#[tokio::test]
async fn s111_a_next_link_to_the_first_page_with_an_empty_or_default_port_is_a_loop() {
    for (first, back) in [
        (
            "http://api.example.com/items",
            "http://api.example.com/items",
        ),
        (
            "http://api.example.com/items",
            "HTTP://API.example.com:80/items",
        ),
        (
            "http://api.example.com/items",
            "http://api.example.com:/items",
        ),
        (
            "https://api.example.com/items",
            "HTTPS://API.EXAMPLE.COM:443/items",
        ),
        (
            "https://api.example.com/items",
            "https://Api.Example.Com:/items",
        ),
    ] {
        let log: Log = Default::default();
        let back_s = back.to_owned();
        let svc = api(log.clone(), move |uri| {
            let mut r = json_resp(json!([uri.to_string().len()]));
            r.headers_mut().insert(
                "link",
                HeaderValue::from_str(&format!("<{back_s}>; rel=\"next\"")).unwrap(),
            );
            r
        });
        let pager = Paginate::new(svc, first, LinkHeader::new("")).unwrap();
        let mut s = pager.items();
        let mut items = Vec::new();
        let mut err = None;
        while let Some(r) = tokio::time::timeout(Duration::from_secs(2), s.next())
            .await
            .expect("the walk ends")
        {
            match r {
                Ok(v) => items.push(v),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
            assert!(items.len() < 10, "{first} -> {back}: items repeat");
        }
        let err = err.unwrap_or_else(|| panic!("{first} -> {back}: no loop error"));
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
        assert_eq!(items.len(), 1, "{first} -> {back}: {items:?}");
        assert_eq!(log.lock().unwrap().len(), 1, "{first} -> {back}: {log:?}");
        // And in `page()`: the call fails instead of reading page 1 again.
        let log2: Log = Default::default();
        let back_s = back.to_owned();
        let svc = api(log2.clone(), move |_| {
            let mut r = json_resp(json!([1]));
            r.headers_mut().insert(
                "link",
                HeaderValue::from_str(&format!("<{back_s}>; rel=\"next\"")).unwrap(),
            );
            r
        });
        let pager = Paginate::new(svc, first, LinkHeader::new("").without_limit_param()).unwrap();
        let r = pager.page(None, 5).await;
        let err = r.expect_err("a loop inside one call");
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
        let l2 = log2.lock().unwrap().clone();
        assert_eq!(l2.len(), 1, "{first} -> {back}: {err}: {l2:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Retry-After mid-walk under the retry layer, waited out and cancelled.
// ---------------------------------------------------------------------------------------------

/// A cursor API over 30 items, pages of 10, whose page at `cursor=10` answers `status` with
/// `Retry-After: ra` the first `fails` times. Each request's (paused) time is logged.
fn flaky_api(
    log: Log,
    times: Arc<Mutex<Vec<tokio::time::Instant>>>,
    status: u16,
    ra: &'static str,
    fails: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    let left = Arc::new(AtomicUsize::new(fails));
    service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        let times = times.clone();
        let left = left.clone();
        async move {
            log.lock().unwrap().push(req.uri().to_string());
            if param(req.uri(), "cursor") == Some("10") {
                times.lock().unwrap().push(tokio::time::Instant::now());
                if left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("retry-after", ra)
                            .body(Full::from("busy"))
                            .unwrap(),
                    );
                }
            }
            Ok(cursor_answer(req.uri(), 30, 10))
        }
    })
}

/// retry guide: a `Retry-After` on a 429 or a 503 "overrides the backoff: never sooner than
/// asked"; paginate guide: the page timeout covers "retries of the inner stack included". A walk
/// and a bounded page through the retry layer meet a 429 (then a 503) with `Retry-After: 7` on
/// page 2: the page is asked again no sooner than 7 s later, and every item is read once.
#[tokio::test(start_paused = true)]
async fn s111_a_retry_after_mid_walk_is_waited_out_and_every_item_read_once() {
    for status in [429u16, 503] {
        let log: Log = Default::default();
        let times: Arc<Mutex<Vec<tokio::time::Instant>>> = Default::default();
        let svc = flaky_api(log.clone(), times.clone(), status, "7", 1);
        let client = ServiceBuilder::new()
            .layer(sturdy::retry::RetryLayer::new().with_seed(111))
            .service(svc);
        let pager = Paginate::builder(
            client,
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .with_page_size(10)
        .with_page_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
        let all: Vec<Value> = pager
            .items()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(nums(&all), (0..30).collect::<Vec<_>>(), "{status}");
        let t = times.lock().unwrap().clone();
        assert_eq!(t.len(), 2, "{status}: page 2 asked twice: {log:?}");
        let waited = t[1] - t[0];
        assert!(
            waited >= Duration::from_secs(7) && waited <= Duration::from_millis(8_400),
            "{status}: waited {waited:?}"
        );

        // The same through `page()`: 25 items in one call, then the rest.
        times.lock().unwrap().clear();
        let svc = flaky_api(log.clone(), times.clone(), status, "7", 1);
        let client = ServiceBuilder::new()
            .layer(sturdy::retry::RetryLayer::new().with_seed(111))
            .service(svc);
        let pager = Paginate::builder(
            client,
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .with_page_size(10)
        .with_page_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
        let p = pager.page(None, 25).await.unwrap();
        assert_eq!(nums(&p.items), (0..25).collect::<Vec<_>>());
        assert!(p.has_more);
        let p2 = pager.page(p.next_cursor.as_deref(), 25).await.unwrap();
        assert_eq!(nums(&p2.items), (25..30).collect::<Vec<_>>());
        assert!(!p2.has_more);
        assert_eq!(p2.next_cursor, None);
    }
}

/// Cancel at the retry layer's wait: a `page()` call, and a walk, dropped while the retry layer
/// sleeps out a `Retry-After: 30` on page 2 send nothing more, however long one waits after; the
/// kept client (a `Buffer` over `ConcurrencyLimit(1)`) is free for the next call, and the cursor
/// of the last good call still resumes.
#[tokio::test(start_paused = true)]
async fn s111_a_call_dropped_while_the_retry_layer_waits_sends_nothing_more() {
    let log: Log = Default::default();
    let times: Arc<Mutex<Vec<tokio::time::Instant>>> = Default::default();
    // Page 2 is busy for its first two asks; the third is answered.
    let svc = flaky_api(log.clone(), times.clone(), 503, "30", 2);
    let client = ServiceBuilder::new()
        .layer(sturdy::retry::RetryLayer::new().with_seed(111))
        .service(svc);
    let kept = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(client, 1), 4);
    let pager = Paginate::builder(
        kept.clone(),
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let first = pager.page(None, 10).await.unwrap();
    assert_eq!(nums(&first.items), (0..10).collect::<Vec<_>>());
    let cursor = first.next_cursor.clone().unwrap();

    // A call that needs page 2, cut 5 s into the 30 s wait.
    let r = tokio::time::timeout(Duration::from_secs(5), pager.page(Some(&cursor), 10)).await;
    assert!(r.is_err(), "the call was still waiting");
    assert_eq!(count(&log, "cursor=10"), 1);
    tokio::time::advance(Duration::from_secs(120)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        count(&log, "cursor=10"),
        1,
        "nothing is sent after the call is dropped: {log:?}"
    );

    // A walk dropped at the same wait.
    let mut s = pager.items();
    for _ in 0..10 {
        s.next().await.unwrap().unwrap();
    }
    let r = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
    assert!(r.is_err(), "the walk was waiting");
    assert_eq!(count(&log, "cursor=10"), 2);
    drop(s);
    tokio::time::advance(Duration::from_secs(120)).await;
    tokio::task::yield_now().await;
    assert_eq!(count(&log, "cursor=10"), 2, "{log:?}");

    // The kept client serves the next call at once, and the old cursor resumes.
    let mut k = kept.clone();
    let res = tokio::time::timeout(
        Duration::from_secs(1),
        k.ready().await.unwrap().call(
            Request::get("http://api.example.com/items?cursor=20")
                .body(Full::default())
                .unwrap(),
        ),
    )
    .await
    .expect("the concurrency permit was given back")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let p = tokio::time::timeout(Duration::from_secs(1), pager.page(Some(&cursor), 10))
        .await
        .expect("no wait: page 2 is no longer busy")
        .unwrap();
    assert_eq!(nums(&p.items), (10..20).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// Cursors as a language model hands them back.
// ---------------------------------------------------------------------------------------------

/// agents guide: "a cursor the model made up or edited is refused before any request is sent";
/// paginate guide: "A forged, edited or truncated cursor ... is refused before any request is
/// sent. A cursor is at most 16 KiB". Cursors as models mangle them (a trailing newline, quotes
/// around it, base64 padding, standard base64 letters, percent-encoding, a space inside, a
/// megabyte) are refused with kind `Pagination`, no request, short words, and a summary that says
/// not retryable and not processed. The cursor as returned still works after all of them.
#[tokio::test]
async fn s111_cursors_a_model_mangles_are_refused_before_any_request() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| cursor_answer(uri, 100, 10));
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let p = pager.page(None, 15).await.unwrap();
    let c = p.next_cursor.unwrap();
    let sent = log.lock().unwrap().len();
    let mid = c.len() / 2;
    let mut mangled = vec![
        format!("{c}\n"),
        format!(" {c}"),
        format!("\"{c}\""),
        format!("'{c}'"),
        format!("`{c}`"),
        format!("{c}="),
        format!("{c}=="),
        c.replace('-', "+").replace('_', "/"),
        c.replace('-', "%2D").replace('_', "%5F"),
        format!("{} {}", &c[..mid], &c[mid..]),
        format!("{}\n{}", &c[..mid], &c[mid..]),
        format!("cursor={c}"),
        format!("{c}{c}"),
        c.to_uppercase(),
        c.repeat(1 + (1 << 20) / c.len()),
        "\u{feff}".to_owned() + &c,
    ];
    mangled.retain(|m| m != &c);
    for m in &mangled {
        let err = pager
            .page(Some(m), 15)
            .await
            .expect_err(&format!("accepted {m:?}"));
        assert_eq!(err.kind(), &ErrorKind::Pagination, "{m:?}: {err}");
        let words = err.to_string();
        assert!(words.len() < 600, "{} bytes of words", words.len());
        let (s, out) = summary_of(err);
        assert_eq!(s.kind, "pagination", "{out}");
        assert!(!s.retryable, "{out}");
        assert!(!s.may_have_been_processed, "{out}");
        assert_eq!(out["isError"], true);
    }
    assert_eq!(
        log.lock().unwrap().len(),
        sent,
        "no request for a refused cursor"
    );
    let p = pager.page(Some(&c), 15).await.unwrap();
    assert_eq!(nums(&p.items), (15..30).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// The words of a bound that is hit, and items JSON cannot hold.
// ---------------------------------------------------------------------------------------------

/// paginate guide: "a `page()` call that needs more than `max_pages` pages fails", "Each guard
/// ends a walk, or fails a `page()` call, with an error that says what happened", and the bound
/// guards have kind `Pagination`. A call of 30 items over pages of 10 with `max_pages` 2 fails
/// with words naming the bound, which the agent reads as not retryable (trying the same call
/// again meets the same bound), and nothing of it comes back. A call of 20 (exactly two pages)
/// succeeds.
#[tokio::test]
async fn s111_a_page_call_past_max_pages_says_so_and_is_not_retryable() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| cursor_answer(uri, 100, 10));
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .with_max_pages(2)
    .build()
    .unwrap();
    let ok = pager.page(None, 20).await.unwrap();
    assert_eq!(nums(&ok.items), (0..20).collect::<Vec<_>>());
    assert!(ok.has_more);
    let before = log.lock().unwrap().len();
    let err = pager.page(None, 30).await.unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(
        log.lock().unwrap().len() - before <= 2,
        "no third page: {log:?}"
    );
    let words = err.to_string();
    assert!(
        words.contains('2') && words.contains("page"),
        "the words name the bound: {words}"
    );
    let (s, out) = summary_of(err);
    assert!(!s.retryable, "{out}");
    assert!(
        out["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("will not help"),
        "{out}"
    );
}

/// paginate guide: "A page that is not the expected JSON is named by its number". Page 2 holds a
/// number JSON can write but serde_json cannot read (`1e400`): the walk yields page 1's items,
/// then an error of kind `Pagination` naming page 2; a `page()` call that needs page 2 fails as a
/// whole.
#[tokio::test]
async fn s111_a_page_with_a_number_out_of_range_is_named_by_its_number() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        if param(uri, "cursor").is_some() {
            Response::new(Full::from(r#"{"data": [10, 1e400], "next": null}"#))
        } else {
            json_resp(json!({"data": (0..10).collect::<Vec<_>>(), "next": "10"}))
        }
    });
    let pager = Paginate::new(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let got: Vec<_> = pager.items().collect().await;
    assert_eq!(got.len(), 11, "{got:?}");
    assert!(got[..10].iter().all(Result::is_ok));
    let err = got[10].as_ref().unwrap_err();
    assert_eq!(err.kind(), &ErrorKind::Pagination, "{err}");
    assert!(err.to_string().contains("page 2"), "{err}");
    let err = pager.page(None, 15).await.unwrap_err();
    assert!(err.to_string().contains("page 2"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Version pinning over walks.
// ---------------------------------------------------------------------------------------------

fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// version guide: "Responses carrying `Deprecation` ... or `Sunset` (RFC 8594) are reported once
/// per endpoint", "An endpoint is the method and the path, ids included", "The response is
/// untouched". Two link walks under one kept version layer: `/old` (Sunset 1994, its pages
/// `?page=N` one endpoint) and `/new` (Sunset 9999-12-31, deprecated far in the future): two
/// notices in all, with those exact dates, and every item read (the pager still sees its `Link`).
#[tokio::test]
async fn s111_sunsets_far_past_and_far_future_over_walks_are_one_notice_per_endpoint() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let page: usize = param(uri, "page").map_or(1, |p| p.parse().unwrap());
        let mut r = json_resp(json!([page]));
        let h = r.headers_mut();
        if page < 3 {
            h.insert(
                "link",
                HeaderValue::from_str(&format!("<{}?page={}>; rel=\"next\"", uri.path(), page + 1))
                    .unwrap(),
            );
        }
        if uri.path() == "/old" {
            h.insert(
                "sunset",
                HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
            );
        } else {
            h.insert(
                "sunset",
                HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
            );
            h.insert("deprecation", HeaderValue::from_static("@253402300799"));
        }
        r
    });
    let notes: Arc<Mutex<Vec<Notice>>> = Default::default();
    let n2 = notes.clone();
    let client = VersionLayer::header("api-version", "2024-06-01")
        .unwrap()
        .on_notice(move |n| n2.lock().unwrap().push(n.clone()))
        .layer(svc);
    for path in ["/old", "/new", "/old", "/new"] {
        let pager = Paginate::new(
            client.clone(),
            &format!("http://api.example.com{path}"),
            LinkHeader::new("").without_limit_param(),
        )
        .unwrap();
        let all: Vec<Value> = pager
            .items()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(all, [json!(1), json!(2), json!(3)], "{path}");
    }
    let notes = notes.lock().unwrap().clone();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(notes[0].endpoint, "GET /old");
    assert_eq!(notes[0].sunset, Some(at(784_111_777)));
    assert_eq!(notes[0].deprecation, None);
    assert_eq!(notes[1].endpoint, "GET /new");
    assert_eq!(notes[1].sunset, Some(at(253_402_300_799)));
    assert_eq!(notes[1].deprecation, Some(Some(at(253_402_300_799))));
    assert_eq!(log.lock().unwrap().len(), 12);
}

/// version guide: the query pin is set on every request, "a version the caller set is kept".
/// A server whose next links carry another version (`api-version=2023-01-01`, a server that
/// answers another version) has the pager ask page 2 with that version: it is the request's
/// own, so the layer keeps it, once, and does not add its own beside it.
#[tokio::test]
async fn s111_a_next_link_that_pins_another_version_is_sent_with_that_version_once() {
    let log: Log = Default::default();
    let svc = api(log.clone(), |uri| {
        let page: usize = param(uri, "page").map_or(1, |p| p.parse().unwrap());
        let mut r = json_resp(json!([page]));
        if page < 3 {
            r.headers_mut().insert(
                "link",
                HeaderValue::from_str(&format!(
                    "</items?page={}&api-version=2023-01-01>; rel=\"next\"",
                    page + 1
                ))
                .unwrap(),
            );
        }
        r
    });
    let client = VersionLayer::query("api-version", "2024-06-01").layer(svc);
    let pager = Paginate::new(
        client,
        "http://api.example.com/items",
        LinkHeader::new("").without_limit_param(),
    )
    .unwrap();
    let all: Vec<Value> = pager
        .items()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(all.len(), 3);
    let log = log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            "http://api.example.com/items?api-version=2024-06-01",
            "http://api.example.com/items?page=2&api-version=2023-01-01",
            "http://api.example.com/items?page=3&api-version=2023-01-01",
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// A real json-server, through a kept ClientBuilder client, calls cut at seeded points.
// ---------------------------------------------------------------------------------------------

struct JsonServer {
    child: std::process::Child,
    base: String,
    _dir: std::path::PathBuf,
}

impl Drop for JsonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn json_server(n: usize) -> Option<JsonServer> {
    let node_dir = std::env::var("STURDY_INTEROP_NODE_DIR").ok()?;
    let bin = std::path::Path::new(&node_dir).join("node_modules/json-server/lib/cli/bin.js");
    if !bin.exists() {
        eprintln!("skip: no json-server at {}", bin.display());
        return None;
    }
    let dir = std::env::temp_dir().join(format!("s111-json-server-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let items: Vec<Value> = (1..=n)
        .map(|i| json!({"id": i, "name": format!("item {i}")}))
        .collect();
    std::fs::write(dir.join("db.json"), json!({ "items": items }).to_string()).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new("node")
        .arg(&bin)
        .arg("--port")
        .arg(port.to_string())
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--quiet")
        .arg(dir.join("db.json"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let srv = JsonServer {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(srv);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("json-server did not start");
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// agents guide: one client per session, kept for every tool call; `page(cursor, limit)` and its
/// `next_cursor` resume exactly. A real json-server 0.17 (its own absolute `Link` with `_page`
/// and `_limit`) is read by bounded pages of seeded limits through a `ClientBuilder` client
/// (retry and a header version pin) behind `Buffer` and `ConcurrencyLimit(1)`, every call first
/// tried under a seeded timeout of 0 to 3 ms that may cut it at any await, then again with the
/// same cursor: every item comes once, in order, and the kept client serves calls to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s111_json_server_bounded_pages_through_a_kept_client_with_cut_calls() {
    let Some(srv) = json_server(57).await else {
        return;
    };
    let client = sturdy::ClientBuilder::new()
        .with_retry(
            sturdy::retry::RetryLayer::new()
                .with_seed(111)
                .with_backoff(
                    sturdy::retry::Backoff::decorrelated_jitter(
                        Duration::from_millis(1),
                        Duration::from_millis(5),
                    )
                    .unwrap(),
                ),
        )
        .with_version(VersionLayer::header("api-version", "2024-06-01").unwrap())
        .build(hyper_client());
    let kept = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(client, 1), 8);
    let pager = Paginate::builder(
        kept,
        &format!("{}/items?_page=1", srv.base),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_timeout(Duration::from_secs(5))
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let mut seed: u64 = 111;
    let mut rnd = move |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    let mut cursor: Option<String> = None;
    let mut got: Vec<u64> = Vec::new();
    let mut cut = 0;
    for _ in 0..200 {
        let limit = 1 + usize::try_from(rnd(13)).unwrap();
        let cut_at = Duration::from_micros(rnd(3_000));
        if tokio::time::timeout(cut_at, pager.page(cursor.as_deref(), limit))
            .await
            .is_err()
        {
            cut += 1;
        }
        let p = tokio::time::timeout(Duration::from_secs(5), pager.page(cursor.as_deref(), limit))
            .await
            .expect("the kept client still serves")
            .unwrap();
        assert!(p.items.len() <= limit);
        got.extend(p.items.iter().map(|v| v["id"].as_u64().unwrap()));
        assert_eq!(p.has_more, p.next_cursor.is_some());
        if !p.has_more {
            break;
        }
        cursor = p.next_cursor;
    }
    assert_eq!(got, (1..=57).collect::<Vec<_>>(), "{cut} calls were cut");
}

// ---------------------------------------------------------------------------------------------
// A wait met mid-walk without a retry layer, and tower's own timeout under the pager.
// ---------------------------------------------------------------------------------------------

/// paginate guide: "A 429 or 503 with `Retry-After` also says how long to wait (capped at 5
/// minutes): `RateLimited` in the error's chain, so `ErrorSummary::retry_after_ms` and a tool
/// result carry it." Mid-walk (page 2), as seconds, as an HTTP date far in the future, and as
/// an HTTP date long past: the walk yields page 1's items, then one error whose summary is
/// retryable with a wait of at most 5 minutes (the far date: exactly 5 minutes); the past date
/// is no wait, never a wait longer than the server asked.
#[tokio::test(start_paused = true)]
async fn s111_a_wait_met_mid_walk_reaches_the_agent_capped() {
    for (status, ra, want) in [
        (429u16, "7", Some(7_000u64)),
        (503, "Fri, 31 Dec 9999 23:59:59 GMT", Some(300_000)),
        (429, "Sun, 06 Nov 1994 08:49:37 GMT", None),
    ] {
        let log: Log = Default::default();
        let times: Arc<Mutex<Vec<tokio::time::Instant>>> = Default::default();
        let svc = flaky_api(log.clone(), times, status, ra, 1);
        let pager = Paginate::builder(
            svc,
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .with_page_size(10)
        .build()
        .unwrap();
        let got: Vec<_> = pager.items().collect().await;
        assert_eq!(got.len(), 11, "{ra}: {got:?}");
        assert!(got[..10].iter().all(Result::is_ok));
        let err = match got.into_iter().nth(10).unwrap() {
            Err(e) => e,
            Ok(v) => panic!("{ra}: {v}"),
        };
        let (s, out) = summary_of(err);
        assert!(s.retryable, "{ra}: {out}");
        let ms = s.retry_after_ms;
        match want {
            Some(w) => assert_eq!(ms, Some(w), "{ra}: {out}"),
            None => assert!(ms.unwrap_or(0) <= 1_000, "{ra}: {out}"),
        }
        let text = out["content"][0]["text"].as_str().unwrap();
        assert!(!text.contains("9999"), "{ra}: {text}");
        let hours = text.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| {
            w.len() > 1 && w.ends_with('h') && w[..w.len() - 1].bytes().all(|b| b.is_ascii_digit())
        });
        assert!(!hours, "never a wait in hours: {text}");
    }
}

/// README: layers compose with tower's own (`Timeout`), and agents guide: `ErrorSummary::of`
/// "gives the same facts for any error (sturdy's own, hyper's, io's, anything with a `source()`
/// chain)" with kind `timeout` among them. tower's `Timeout` under a pager, over a page that never
/// comes: the page fails, and the agent reads a timeout that trying again may cure.
#[tokio::test(start_paused = true)]
async fn s111_towers_timeout_under_a_pager_reads_as_a_timeout() {
    let svc = service_fn(|req: Request<Full<Bytes>>| async move {
        if param(req.uri(), "cursor").is_some() {
            std::future::pending::<()>().await;
        }
        Ok::<_, Infallible>(cursor_answer(req.uri(), 30, 10))
    });
    let client = ServiceBuilder::new()
        .timeout(Duration::from_secs(3))
        .service(svc);
    let pager = Paginate::builder(
        client,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .build()
    .unwrap();
    let t0 = tokio::time::Instant::now();
    let err = pager.page(None, 15).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "timeout", "{out}");
    assert!(s.retryable, "{out}");
}

// ---------------------------------------------------------------------------------------------
// Dropped mid-page over the wire; cut at every await of a retrying kept client.
// ---------------------------------------------------------------------------------------------

struct Guard(Arc<AtomicUsize>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// paginate guide: a walk is lazy ("the next page only when the stream is polled"); brief: "a
/// stream dropped mid-page (does anything keep running?)". An axum server sends page 2's body a
/// chunk every 10 ms; the walk's stream is dropped while that body is being read: the server's
/// body stream is dropped soon after (the connection is let go, nothing keeps reading it), and no
/// page 3 is asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s111_a_walk_dropped_mid_body_lets_the_server_go() {
    let dropped = Arc::new(AtomicUsize::new(0));
    let hits: Log = Default::default();
    let (d2, h2) = (dropped.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/items",
        axum::routing::get(move |uri: Uri| {
            let d = d2.clone();
            let h = h2.clone();
            async move {
                h.lock().unwrap().push(uri.to_string());
                if param(&uri, "cursor").is_none() {
                    return axum::response::Response::new(axum::body::Body::from(
                        json!({"data": [0, 1], "next": "2"}).to_string(),
                    ));
                }
                let guard = Guard(d);
                let head = futures_util::stream::once(async {
                    Ok::<_, Infallible>(Bytes::from_static(b"{\"data\": [2"))
                });
                let tail = futures_util::stream::unfold(guard, |g| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    Some((Ok::<_, Infallible>(Bytes::from_static(b", 3")), g))
                });
                axum::response::Response::new(axum::body::Body::from_stream(head.chain(tail)))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let pager = Paginate::builder(
        hyper_client(),
        &format!("http://{addr}/items"),
        JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_secs(10))
    .build()
    .unwrap();
    let mut s = pager.items();
    assert_eq!(s.next().await.unwrap().unwrap(), 0);
    assert_eq!(s.next().await.unwrap().unwrap(), 1);
    // Page 2 starts, its body never ends: cut the walk 100 ms in.
    assert!(tokio::time::timeout(Duration::from_millis(100), s.next())
        .await
        .is_err());
    assert_eq!(dropped.load(Ordering::SeqCst), 0, "page 2 was being read");
    drop(s);
    let t0 = tokio::time::Instant::now();
    while dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the server still streams page 2 to nobody"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(hits.lock().unwrap().len(), 2, "{hits:?}");
    server.abort();
}

/// brief: "cancel at every await", over "the retry layer and a kept client". A `page()` call
/// through a kept client (`Buffer` over `ConcurrencyLimit(1)` over a `RetryLayer`) meets a 503
/// with `Retry-After: 2` on page 2 and a 429 with `Retry-After: 3` on page 3, each once per call;
/// it is cut at every quarter second from 0 to 12 s (inside each request, each wait and each
/// retry). After every cut, a call with the same cursor reads exactly the same items, the kept
/// client is never stuck, and a cut call sends no request after it was cut.
#[tokio::test(start_paused = true)]
async fn s111_a_page_call_cut_at_every_await_of_a_retrying_kept_client() {
    let log: Log = Default::default();
    let busy = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let (l2, b2) = (log.clone(), busy.clone());
    let svc = service_fn(move |req: Request<Full<Bytes>>| {
        let log = l2.clone();
        let busy = b2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let uri = req.uri().to_string();
            log.lock().unwrap().push(uri);
            let c = param(req.uri(), "cursor").map(str::to_owned);
            // Each of pages 2 and 3 is busy once, then answers, then is busy again.
            if let Some(c) = c.filter(|c| c == "10" || c == "20") {
                let mut b = busy.lock().unwrap();
                if b.insert(c.clone()) {
                    let (st, ra) = if c == "10" { (503, "2") } else { (429, "3") };
                    return Ok::<_, Infallible>(
                        Response::builder()
                            .status(st)
                            .header("retry-after", ra)
                            .body(Full::from("busy"))
                            .unwrap(),
                    );
                }
                b.remove(&c);
            }
            Ok(cursor_answer(req.uri(), 40, 10))
        }
    });
    let client = ServiceBuilder::new()
        .layer(sturdy::retry::RetryLayer::new().with_seed(111))
        .service(svc);
    let kept = tower::buffer::Buffer::new(tower::limit::ConcurrencyLimit::new(client, 1), 4);
    let pager = Paginate::builder(
        kept,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let want = pager.page(None, 35).await.unwrap();
    assert_eq!(nums(&want.items), (0..35).collect::<Vec<_>>());
    for step in 0..48u64 {
        let cut = Duration::from_millis(250 * step);
        let r = tokio::time::timeout(cut, pager.page(None, 35)).await;
        let sent = log.lock().unwrap().len();
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert_eq!(
            log.lock().unwrap().len(),
            sent,
            "cut at {cut:?}: a request after the cut"
        );
        if let Ok(r) = r {
            assert_eq!(r.unwrap(), want, "cut at {cut:?}");
        }
        let again = tokio::time::timeout(Duration::from_secs(60), pager.page(None, 35))
            .await
            .unwrap_or_else(|_| panic!("cut at {cut:?}: the kept client is stuck"))
            .unwrap();
        assert_eq!(again, want, "cut at {cut:?}");
        let rest = pager.page(again.next_cursor.as_deref(), 35).await.unwrap();
        assert_eq!(nums(&rest.items), (35..40).collect::<Vec<_>>());
    }
}

/// paginate guide: "Each guard ends a walk, or fails a `page()` call, with an error that says what
/// happened"; agents guide: `retryable` is "whether trying again unchanged may succeed". What an
/// agent reads when each bound of a bounded page is hit: time (kind `timeout`, retryable, the
/// page and the timeout named), bytes (kind `body`, not retryable, the limit named), items in a
/// walk (kind `pagination`, not retryable, the bound named). Past `max_items`, `page()` returns
/// the bound's worth with a cursor to continue.
#[tokio::test(start_paused = true)]
async fn s111_the_words_of_each_bound_an_agent_meets() {
    fn pager_to(page2: &'static str) -> Paginate<JsonCursor> {
        let svc = service_fn(move |req: Request<Full<Bytes>>| async move {
            if param(req.uri(), "cursor") == Some("10") {
                if page2 == "stall" {
                    std::future::pending::<()>().await;
                }
                return Ok::<_, Infallible>(json_resp(
                    json!({"data": vec![7; 5000], "next": null}),
                ));
            }
            Ok(cursor_answer(req.uri(), 30, 10))
        });
        Paginate::builder(
            svc,
            "http://api.example.com/items",
            JsonCursor::new("/data", "/next"),
        )
        .with_page_size(10)
        .with_max_page_bytes(1000)
        .with_page_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
    }
    let t0 = tokio::time::Instant::now();
    let err = pager_to("stall").page(None, 15).await.unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "timeout", "{out}");
    assert!(s.retryable, "{out}");
    assert!(
        s.message.contains("page 2") && s.message.contains("5s"),
        "{out}"
    );

    let err = pager_to("big").page(None, 15).await.unwrap_err();
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "body", "{out}");
    assert!(!s.retryable, "{out}");
    assert!(
        s.message.contains("page 2") && s.message.contains("1000"),
        "{out}"
    );

    let svc = service_fn(|req: Request<Full<Bytes>>| async move {
        Ok::<_, Infallible>(cursor_answer(req.uri(), 30, 10))
    });
    let pager = Paginate::builder(
        svc,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .with_max_items(15)
    .build()
    .unwrap();
    let got: Vec<_> = pager.items().collect().await;
    assert_eq!(got.len(), 16);
    let err = got.into_iter().find_map(Result::err).unwrap();
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "pagination", "{out}");
    assert!(!s.retryable, "{out}");
    assert!(s.message.contains("15"), "{out}");
    let p = pager.page(None, 100).await.unwrap();
    assert_eq!(nums(&p.items), (0..15).collect::<Vec<_>>());
    assert!(p.has_more);
    let rest = pager.page(p.next_cursor.as_deref(), 100).await.unwrap();
    assert_eq!(nums(&rest.items), (15..30).collect::<Vec<_>>());
    assert!(!rest.has_more);
}

/// ratelimit guide: a 429's wait pauses every caller of the host, and "A call whose wait for the
/// pause would exceed its `max_wait` fails at once with `RateLimited`"; retry guide: a
/// `Retry-After` longer than 60 s "is not slept: ... the call fails at once with a `RateLimited {
/// retry_after }`"; agents guide: "may have been processed ... is false only when no attempt of
/// the call reached the server (... a local rate limit ...)". A session's kept `ClientBuilder`
/// client under a pager: page 2 answers 429 `Retry-After: 120`; the agent is told 2 minutes at
/// once; asking again at once is refused without a request (not processed, a wait of at most
/// 2 minutes); after the wait, the same cursor reads on.
#[tokio::test(start_paused = true)]
async fn s111_a_long_wait_on_a_session_client_refuses_the_next_call_without_sending() {
    let log: Log = Default::default();
    let times: Arc<Mutex<Vec<tokio::time::Instant>>> = Default::default();
    let svc = flaky_api(log.clone(), times, 429, "120", 1);
    let client = sturdy::ClientBuilder::new()
        .with_retry(sturdy::retry::RetryLayer::new().with_seed(111))
        .build(svc);
    let pager = Paginate::builder(
        client,
        "http://api.example.com/items",
        JsonCursor::new("/data", "/next"),
    )
    .with_page_size(10)
    .with_cursor_key(KEY)
    .build()
    .unwrap();
    let first = pager.page(None, 10).await.unwrap();
    let c = first.next_cursor.unwrap();
    let t0 = tokio::time::Instant::now();
    let err = pager.page(Some(&c), 10).await.unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "rate_limited", "{out}");
    assert_eq!(s.retry_after_ms, Some(120_000), "{out}");
    assert_eq!(count(&log, "cursor=10"), 1);

    tokio::time::advance(Duration::from_secs(10)).await;
    let t1 = tokio::time::Instant::now();
    let err = pager.page(Some(&c), 10).await.unwrap_err();
    assert!(t1.elapsed() < Duration::from_secs(1), "{:?}", t1.elapsed());
    let (s, out) = summary_of(err);
    assert_eq!(s.kind, "rate_limited", "{out}");
    assert!(!s.may_have_been_processed, "{out}");
    let ms = s.retry_after_ms.expect("a wait");
    assert!((100_000..=120_000).contains(&ms), "{out}");
    assert_eq!(count(&log, "cursor=10"), 1, "nothing sent: {log:?}");

    tokio::time::advance(Duration::from_secs(111)).await;
    let p = tokio::time::timeout(Duration::from_secs(30), pager.page(Some(&c), 10))
        .await
        .expect("after the wait")
        .unwrap();
    assert_eq!(nums(&p.items), (10..20).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// Error chains: one that is its own cause, one 100,000 deep.
// ---------------------------------------------------------------------------------------------

/// An error whose `source()` is itself (a buggy third-party error type).
#[derive(Debug)]
struct SelfSource;
impl std::fmt::Display for SelfSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an error that is its own cause")
    }
}
impl std::error::Error for SelfSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self)
    }
}

/// An error chain of any depth.
#[derive(Debug)]
struct Deep(Option<Box<Self>>, usize);
impl std::fmt::Display for Deep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "level {}", self.1)
    }
}
impl std::error::Error for Deep {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .as_deref()
            .map(|d| d as &(dyn std::error::Error + 'static))
    }
}

/// Runs `f` on its own thread and runtime (paused time); the receiver gets its answer.
fn spawn_run<F, Fut>(f: F) -> std::sync::mpsc::Receiver<String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = String>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let _ = tx.send(rt.block_on(f()));
    });
    rx
}

/// The answer, or `None` when it has not come by `deadline` (the thread is then left behind).
#[allow(clippy::disallowed_methods)] // real time on purpose: a hang is what is measured
fn by(rx: &std::sync::mpsc::Receiver<String>, deadline: std::time::Instant) -> Option<String> {
    rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        .ok()
}

fn self_source_api() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = impl Send + 'static,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(|_req: Request<Full<Bytes>>| async move {
        Err::<Response<Full<Bytes>>, BoxError>(Box::new(SelfSource))
    })
}

/// agents guide: "`ErrorSummary::of(&*err)` gives the same facts for any error (sturdy's own,
/// hyper's, io's, anything with a `source()` chain)"; README: any `Service<Request<B>>` can be
/// the HTTP client. An error type whose `source()` returns itself (a chain that never ends) is
/// summarised, and a call through the retry layer, the `ClientBuilder` client or a pager over a
/// client that fails with it returns: none of them hangs.
#[test]
#[allow(clippy::disallowed_methods)] // real time on purpose: a hang is what is measured
fn s111_an_error_that_is_its_own_source_never_hangs() {
    let summary = spawn_run(|| async { format!("{:?}", ErrorSummary::of(&SelfSource)) });
    let retry = spawn_run(|| async {
        let c = ServiceBuilder::new()
            .layer(sturdy::retry::RetryLayer::new().with_seed(111))
            .service(self_source_api());
        let r = c
            .oneshot(
                Request::get("http://api.example.com/x")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        format!("{:?}", r.map(|_| ()))
    });
    let client = spawn_run(|| async {
        let c = sturdy::ClientBuilder::new().build(self_source_api());
        let r = c
            .oneshot(
                Request::get("http://api.example.com/x")
                    .body(Full::default())
                    .unwrap(),
            )
            .await;
        format!("{:?}", r.map(|_| ()))
    });
    let pager = spawn_run(|| async {
        let p = Paginate::new(
            self_source_api(),
            "http://api.example.com/x",
            JsonCursor::new("/data", "/next"),
        )
        .unwrap();
        format!("{:?}", p.page(None, 3).await.map(|_| ()))
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let (summary, retry, client, pager) = (
        by(&summary, deadline),
        by(&retry, deadline),
        by(&client, deadline),
        by(&pager, deadline),
    );
    assert!(
        summary.is_some() && retry.is_some() && client.is_some() && pager.is_some(),
        "returned: summary {summary:?}, retry {retry:?}, client {client:?}, pager {pager:?}"
    );
}

/// The same facts for a finite chain 100,000 errors deep: read quickly (well under a second),
/// without overflowing the stack, as kind `other` with the outermost words.
#[test]
#[allow(clippy::disallowed_methods)] // real time on purpose: the cost of the walk is measured
fn s111_a_chain_a_hundred_thousand_deep_is_summarised() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(move || {
            let mut d = Deep(None, 0);
            for i in 1..100_000 {
                d = Deep(Some(Box::new(d)), i);
            }
            let t = std::time::Instant::now();
            let s = ErrorSummary::of(&d);
            let _ = tx.send((s.kind, s.message.clone(), t.elapsed()));
            // Dropping a 100,000-deep box chain recurses; leak it instead.
            std::mem::forget(d);
        })
        .unwrap();
    let (kind, message, took) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("summarised");
    assert_eq!(kind, "other");
    assert!(message.starts_with("level 99999"), "{message}");
    assert!(took < Duration::from_secs(1), "{took:?}");
}
