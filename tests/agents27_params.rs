//! Query parameters as the server receives them: version pins next to look-alike names,
//! server cursors with reserved characters sent back intact, the caller's own parameters kept;
//! and the wait an agent is told, for every duration.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, CircuitOpen, RateLimited};
use sturdy::paginate::{JsonCursor, OffsetLimit, PageNumber, Paginate};
use sturdy::version::VersionLayer;
use tower::{service_fn, Layer, ServiceExt};

fn pairs(uri: &http::Uri) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(&uri.to_string()).unwrap();
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[tokio::test]
async fn agents27_version_pin_beside_look_alike_parameters() {
    for uri in [
        "http://h/p?xapi-version=1",
        "http://h/p?api-version-old=1",
        "http://h/p?q=api-version%3D1",
        "http://h/p?q=x&api-versions=1",
        "http://h/p?q=api-version=1",
    ] {
        let seen: Arc<Mutex<Option<http::Uri>>> = Arc::default();
        let log = seen.clone();
        let svc =
            VersionLayer::query("api-version", "2024").layer(service_fn(move |req: Request<()>| {
                *log.lock().unwrap() = Some(req.uri().clone());
                async { Ok::<_, Infallible>(Response::new(())) }
            }));
        svc.oneshot(Request::get(uri).body(()).unwrap())
            .await
            .unwrap();
        let got = seen.lock().unwrap().clone().unwrap();
        let versions: Vec<String> = pairs(&got)
            .into_iter()
            .filter(|(k, _)| k == "api-version")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(versions, vec!["2024".to_owned()], "{uri} -> {got}");
    }
}

type Log = Arc<Mutex<Vec<http::Uri>>>;

fn recording(
    log: Log,
    answer: impl Fn(usize) -> Value + Send + Sync + Clone + 'static,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync
       + 'static {
    service_fn(move |req: Request<Full<Bytes>>| {
        let n = {
            let mut l = log.lock().unwrap();
            l.push(req.uri().clone());
            l.len()
        };
        let body = answer(n);
        async move { Ok::<_, Infallible>(Response::new(Full::from(body.to_string()))) }
    })
}

#[tokio::test]
async fn agents27_server_cursor_with_reserved_characters_comes_back_intact() {
    let weird = "a&b=c+d%2F e/é#f?g";
    let log: Log = Arc::default();
    let pager = Paginate::new(
        recording(log.clone(), move |n| {
            if n == 1 {
                json!({ "data": [1], "next": weird })
            } else {
                json!({ "data": [2], "next": null })
            }
        }),
        "http://api.example.com/items?precursor=keep&cursor_id=7",
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let p = pager.page(None, 1).await.unwrap();
    let p = pager.page(p.next_cursor.as_deref(), 1).await.unwrap();
    assert_eq!(p.items, vec![json!(2)]);
    let uris = log.lock().unwrap().clone();
    let second = pairs(&uris[1]);
    let cursors: Vec<&String> = second
        .iter()
        .filter(|(k, _)| k == "cursor")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(cursors, vec![weird], "{}", uris[1]);
    for uri in &uris {
        let p = pairs(uri);
        assert!(p.contains(&("precursor".into(), "keep".into())), "{uri}");
        assert!(p.contains(&("cursor_id".into(), "7".into())), "{uri}");
    }
}

#[tokio::test]
async fn agents27_numbered_and_offset_walks_keep_look_alike_parameters() {
    for offset in [true, false] {
        let log: Log = Arc::default();
        let answer = |n: usize| {
            if n < 3 {
                json!({ "data": [n, n], "total": 4 })
            } else {
                json!({ "data": [], "total": 4 })
            }
        };
        let uri = "http://api.example.com/items?xpage=9&pages=8&offsets=7&limit_hint=6&sort=page";
        let ids: Vec<Value> = if offset {
            let pager = Paginate::builder(
                recording(log.clone(), answer),
                uri,
                OffsetLimit::new("/data").with_total("/total"),
            )
            .with_page_size(2)
            .build()
            .unwrap();
            futures_util::TryStreamExt::try_collect(pager.items())
                .await
                .unwrap()
        } else {
            let pager = Paginate::builder(
                recording(log.clone(), answer),
                uri,
                PageNumber::new("/data").with_total("/total"),
            )
            .with_page_size(2)
            .build()
            .unwrap();
            futures_util::TryStreamExt::try_collect(pager.items())
                .await
                .unwrap()
        };
        assert_eq!(ids.len(), 4);
        for u in log.lock().unwrap().iter() {
            let p = pairs(u);
            for (k, v) in [
                ("xpage", "9"),
                ("pages", "8"),
                ("offsets", "7"),
                ("limit_hint", "6"),
                ("sort", "page"),
            ] {
                assert!(p.contains(&(k.into(), v.into())), "{u}");
            }
        }
    }
}

fn phrase_after<'a>(text: &'a str, marker: &str) -> Option<&'a str> {
    let i = text.find(marker)? + marker.len();
    let rest = &text[i..];
    let end = rest.find([';', '\n', '.']).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[test]
fn agents27_every_wait_reads_the_same_in_message_and_advice() {
    check_waits(&[
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_millis(1),
        Duration::from_millis(999),
        Duration::from_millis(1_500),
        Duration::from_secs(59),
        Duration::from_secs(61),
        Duration::from_secs(125),
        Duration::from_secs(3_600),
        Duration::from_secs(86_400 * 400),
    ]);
}

#[test]
fn agents27_the_largest_waits_read_the_same_in_message_and_advice() {
    check_waits(&[Duration::from_secs(u64::MAX), Duration::MAX]);
}

fn check_waits(waits: &[Duration]) {
    for &d in waits {
        let err: BoxError = Box::new(RateLimited::new(d).with_scope("api.example.com"));
        let s = ErrorSummary::of(&*err);
        assert_eq!(s.kind, "rate_limited");
        let ms = s.retry_after_ms.expect("a wait");
        assert!(u128::from(ms) <= d.as_millis().max(1), "{d:?}: {ms}");
        let out = tool_result::<Value>(Err(err));
        let text = out["content"][0]["text"].as_str().unwrap();
        let said = phrase_after(text, "retry after ").unwrap_or_else(|| panic!("{text}"));
        let advised = phrase_after(text, "Try again in ").unwrap_or_else(|| panic!("{text}"));
        assert_eq!(said, advised, "{d:?}: {text}");
        let err: BoxError = Box::new(CircuitOpen::new("api.example.com", d));
        let s = ErrorSummary::of(&*err);
        assert_eq!(s.kind, "circuit_open");
        assert!(!s.may_have_been_processed);
        let out = tool_result::<Value>(Err(err));
        assert_eq!(out["isError"], true);
    }
}
