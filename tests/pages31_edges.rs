//! JSON cursors as real APIs send them (numbers, Slack's empty string at the end), and the
//! numbered strategies against json-server's `_page`/`_limit` and `_start`/`_limit`.

use std::time::Duration;

use futures_util::TryStreamExt;
use serde_json::{json, Value};
use sturdy::paginate::{JsonCursor, OffsetLimit, PageNumber, Paginate};

use crate::pages31_util::*;

fn ids(items: &[Value]) -> Vec<u64> {
    items.iter().map(|v| v["id"].as_u64().unwrap()).collect()
}

/// A cursor API whose next cursor is a JSON number (`{"next": 3}`), as many APIs send it: the
/// walk follows it rather than ending early or failing.
#[tokio::test]
async fn pages31_a_numeric_next_cursor_is_followed() {
    let server = serve(|req, _| async move {
        let c: u64 = param(&req, "cursor")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let next = if c < 2 { json!(c + 1) } else { Value::Null };
        json_response(json!({"data": [{"id": c + 1}], "next": next}), &[])
    })
    .await;
    let pager = Paginate::new(
        http(),
        &server.url("/items"),
        JsonCursor::new("/data", "/next"),
    )
    .unwrap();
    let res: Result<Vec<Value>, _> =
        within(Duration::from_secs(10), "walk", pager.items().try_collect()).await;
    match res {
        Ok(items) => assert_eq!(ids(&items), [1, 2, 3]),
        Err(e) => {
            // At least no silent loss: a numeric cursor it cannot follow is an error that says so.
            assert_eq!(e.kind(), &sturdy::core::ErrorKind::Pagination, "{e}");
            panic!("a numeric next cursor is refused: {e}");
        }
    }
}

/// Slack's convention: `"next_cursor": ""` on the last page, and an empty `cursor=` parameter
/// reads as the start. The walk ends there, each item once (an empty string is no cursor).
#[tokio::test]
async fn pages31_an_empty_string_next_cursor_ends_the_walk() {
    let server = serve(|req, _| async move {
        let c = param(&req, "cursor").unwrap_or_default();
        let (items, next) = match c.as_str() {
            "" => (json!([{"id": 1}, {"id": 2}]), "dXNlcjpXMDc"),
            _ => (json!([{"id": 3}]), ""),
        };
        json_response(
            json!({"members": items, "response_metadata": {"next_cursor": next}}),
            &[],
        )
    })
    .await;
    let pager = Paginate::builder(
        http(),
        &server.url("/users.list"),
        JsonCursor::new("/members", "/response_metadata/next_cursor"),
    )
    .with_max_pages(10)
    .build()
    .unwrap();
    let res: Result<Vec<Value>, _> =
        within(Duration::from_secs(10), "walk", pager.items().try_collect()).await;
    let hits = server.seen.hits();
    assert_eq!(
        res.as_ref().map(|v| ids(v)).map_err(|e| e.to_string()),
        Ok(vec![1, 2, 3]),
        "{hits:?}"
    );
    assert_eq!(hits.len(), 2, "{hits:?}");
}

/// `PageNumber` against json-server's `_page`/`_limit`: "stopping on an empty or short page":
/// 100 items in pages of 10 end at the empty 11th page, in pages of 30 at the short 4th.
#[tokio::test]
async fn pages31_page_numbers_against_json_server() {
    let Some(base) = peer("STURDY_INTEROP_JSON_SERVER_URL") else {
        return;
    };
    for (size, pages) in [(10usize, 11usize), (30, 4), (100, 2), (7, 15)] {
        let pager = Paginate::builder(
            http(),
            &format!("{base}/items"),
            PageNumber::new("").with_params("_page", "_limit"),
        )
        .with_page_size(size)
        .build()
        .unwrap();
        let all: Vec<Vec<Value>> = within(
            Duration::from_secs(20),
            "walk",
            pager.pages().map_ok(|p| p.items).try_collect(),
        )
        .await
        .unwrap();
        let flat: Vec<Value> = all.iter().flatten().cloned().collect();
        assert_eq!(ids(&flat), (1..=100).collect::<Vec<_>>(), "size {size}");
        assert!(all.len() <= pages, "size {size}: {} pages", all.len());
        // And bounded pages of another size over the same strategy.
        let mut cursor: Option<String> = None;
        let mut got = Vec::new();
        loop {
            let p = pager.page(cursor.as_deref(), 9).await.unwrap();
            got.extend(ids(&p.items));
            if !p.has_more {
                break;
            }
            cursor = p.next_cursor;
        }
        assert_eq!(got, (1..=100).collect::<Vec<_>>(), "size {size}");
    }
}

/// `OffsetLimit` against json-server's `_start`/`_limit` slices.
#[tokio::test]
async fn pages31_offsets_against_json_server() {
    let Some(base) = peer("STURDY_INTEROP_JSON_SERVER_URL") else {
        return;
    };
    let pager = Paginate::builder(
        http(),
        &format!("{base}/items"),
        OffsetLimit::new("").with_params("_start", "_limit"),
    )
    .with_page_size(25)
    .build()
    .unwrap();
    let all: Vec<Value> = within(Duration::from_secs(20), "walk", pager.items().try_collect())
        .await
        .unwrap();
    assert_eq!(ids(&all), (1..=100).collect::<Vec<_>>());
    let first = pager.page(None, 40).await.unwrap();
    assert_eq!(ids(&first.items), (1..=40).collect::<Vec<_>>());
    let rest = pager.page(first.next_cursor.as_deref(), 100).await.unwrap();
    assert_eq!(ids(&rest.items), (41..=100).collect::<Vec<_>>());
    assert!(!rest.has_more);
}

/// "`Duration::ZERO` means 'the cached token or fail at once'", and "The token request goes
/// on, and later callers share it": against the odd token endpoint answering after 300 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_zero_token_timeout_fails_at_once_and_the_request_goes_on() {
    use sturdy::auth::{AuthLayer, ClientCredentials};
    use tower::{Layer, ServiceExt};
    let (Some(odd), Some(api)) = (
        peer("STURDY_INTEROP_ODD_TOKEN_URL"),
        peer("STURDY_INTEROP_API_URL"),
    ) else {
        return;
    };
    let id = format!("slow300-pages31-zero-{}", std::process::id());
    let tokens = ClientCredentials::new(
        http(),
        &format!("{odd}/token"),
        id.clone(),
        "interop-secret",
    )
    .unwrap();
    let svc = AuthLayer::oauth2(tokens)
        .with_token_timeout(Duration::ZERO)
        .layer(http());
    let req = || {
        http::Request::get(format!("{api}/whoami"))
            .body(http_body_util::Full::default())
            .unwrap()
    };
    let started = tokio::time::Instant::now();
    let err = svc.clone().oneshot(req()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    let c = core_err(&*err).unwrap();
    assert_eq!(c.kind(), &sturdy::core::ErrorKind::Timeout, "{c}");
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        sturdy::core::Delivery::NotSent
    );
    assert!(c.to_string().contains("not sent"), "{c}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    let b = {
        use http_body_util::BodyExt;
        let res = http()
            .request(
                http::Request::get(format!("{odd}/count?client={id}"))
                    .body(http_body_util::Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        res.into_body().collect().await.unwrap().to_bytes()
    };
    let count: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(count["requests"], 1, "{count}");
}

/// `api_key_query`: "appended to the caller's query. A parameter of that name already there
/// ... is removed, so a request carries one key, the layer's; every other pair of the query is
/// kept byte for byte". (Asked as a doubt first, when the docs said only "kept byte for byte";
/// answered by the docs.)
#[tokio::test]
async fn pages31_api_key_query_keeps_the_callers_query_byte_for_byte() {
    use std::sync::{Arc, Mutex};
    use sturdy::auth::AuthLayer;
    use tower::{Layer, ServiceExt};
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let s = seen.clone();
    let api = tower::service_fn(
        move |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
            s.lock().unwrap().push(req.uri().to_string());
            async { Ok::<_, std::convert::Infallible>(http::Response::new(())) }
        },
    );
    let svc = AuthLayer::api_key_query("key", "k/+ &=y")
        .unwrap()
        .layer(api);
    for uri in [
        "http://api.example.com/a",
        "http://api.example.com/a?",
        "http://api.example.com/a?x=%2F&y=+&z&x=1",
        "http://api.example.com/a?key=caller",
    ] {
        svc.clone()
            .oneshot(
                http::Request::get(uri)
                    .body(http_body_util::Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let key = "key=k%2F%2B+%26%3Dy";
    let key_alt = "key=k%2F%2B%20%26%3Dy";
    let ok = |got: &str, prefix: &str| {
        got == format!("{prefix}{key}") || got == format!("{prefix}{key_alt}")
    };
    assert!(ok(&seen[0], "http://api.example.com/a?"), "{seen:?}");
    assert!(
        ok(&seen[1], "http://api.example.com/a?") || ok(&seen[1], "http://api.example.com/a?&"),
        "{seen:?}"
    );
    assert!(
        ok(&seen[2], "http://api.example.com/a?x=%2F&y=+&z&x=1&"),
        "{seen:?}"
    );
    assert!(ok(&seen[3], "http://api.example.com/a?"), "{seen:?}");
    assert!(!seen[3].contains("caller"), "{seen:?}");
}
