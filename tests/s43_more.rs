//! More checkable sentences of docs/guides/auth.md ("The wait for a token is part of an
//! attempt", the events of `AuthLayer::on_event` and `ClientCredentials::on_event`),
//! docs/guides/agents.md (one idempotency key per call across its retries; `attempts`,
//! `idempotency_key` and the root cause in `ErrorSummary`) and docs/guides/paginate.md
//! (`with_total` when the server caps the page size, `with_header`, `items_as`, the page size on
//! a Link walk's first page, the cursor key kept out of `Debug`). Paused time, in-process.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::auth::AuthLayer;
use sturdy::core::events::Event;
use sturdy::core::{CallOptions, ErrorKind, ErrorSummary};
use sturdy::paginate::{JsonCursor, LinkHeader, OffsetLimit, PageNumber, Paginate};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

use crate::s43_util::{get, own, post, source, status_json, token_json, Answer, Api, Endpoint};

const API: &str = "https://api.example.com/v1/orders";

#[tokio::test(start_paused = true)]
async fn the_token_wait_ends_at_the_shorter_of_the_token_and_attempt_timeouts() {
    // (layer attempt timeout, request options, expected wait)
    let cases: [(Option<u64>, Option<CallOptions>, u64); 5] = [
        (Some(1_000), None, 1_000),
        (
            None,
            Some(CallOptions::new().with_attempt_timeout(Duration::from_millis(500))),
            500,
        ),
        (
            Some(1_000),
            Some(CallOptions::new().with_attempt_timeout(Duration::from_millis(2_000))),
            2_000,
        ),
        (
            Some(1_000),
            Some(CallOptions::new().without_attempt_timeout()),
            3_000,
        ),
        (Some(60_000), None, 3_000),
    ];
    for (layer_attempt, opts, want) in cases {
        let ep = Endpoint::new(Answer::Stall);
        let mut layer =
            AuthLayer::oauth2(source(&ep).with_request_timeout(Duration::from_secs(600)))
                .with_token_timeout(Duration::from_secs(3));
        if let Some(ms) = layer_attempt {
            layer = layer.with_attempt_timeout(Duration::from_millis(ms));
        }
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(Api::default().service());
        let mut req = get(API);
        if let Some(o) = opts.clone() {
            req.extensions_mut().insert(o);
        }
        let start = Instant::now();
        let err = svc.oneshot(req).await.unwrap_err();
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(want),
            "layer {layer_attempt:?}, options {opts:?}: {err}"
        );
        assert_eq!(*own(&err).kind(), ErrorKind::Timeout);
    }
}

#[tokio::test(start_paused = true)]
async fn token_events_tell_fetches_failures_and_401_rejections() {
    let got = Arc::new(Mutex::new(Vec::<String>::new()));
    let (a, b) = (got.clone(), got.clone());
    let ep = Endpoint::new(token_json("t-2", Some("3600")));
    ep.then(token_json("t-1", Some("120")))
        .then(status_json(503, "busy"));
    let src = source(&ep).on_event(move |e: &Event<'_>| {
        let line = match e {
            Event::TokenFetched { endpoint, lifetime } => {
                format!("fetched {endpoint} {}", lifetime.as_secs())
            }
            Event::TokenFailed {
                endpoint,
                retry_in,
                keeping_current,
                ..
            } => {
                format!("failed {endpoint} {} {keeping_current}", retry_in.as_secs())
            }
            other => format!("other {other:?}"),
        };
        a.lock().unwrap().push(line);
    });
    let api = Api::default();
    api.statuses.lock().unwrap().extend([200, 200, 401]);
    let svc = ServiceBuilder::new()
        .layer(
            AuthLayer::oauth2(src.clone()).on_event(move |e: &Event<'_>| {
                if let Event::TokenRejected { host } = e {
                    b.lock().unwrap().push(format!("rejected {host}"));
                }
            }),
        )
        .service(api.service());
    svc.clone().oneshot(get(API)).await.unwrap();
    // Past 120 - 60 s: a background refresh, which fails while the token is still valid.
    tokio::time::sleep(Duration::from_secs(61)).await;
    svc.clone().oneshot(get(API)).await.unwrap();
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The 401 replays with a fresh token.
    let res = svc.oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        *got.lock().unwrap(),
        [
            "fetched auth.example.com 120",
            "failed auth.example.com 1 true",
            "rejected api.example.com",
            "fetched auth.example.com 3600",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn one_idempotency_key_per_call_across_retries_and_the_summary_reports_it() {
    let keys = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = keys.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push(
                req.headers()
                    .get("idempotency-key")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default(),
            );
            // A connection reset after sending: the request may have been processed.
            Err::<Response<Full<Bytes>>, _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            ))
        }
    });
    let client = sturdy::ClientBuilder::new().build(api);
    let err = client.clone().oneshot(post(API, "{}")).await.unwrap_err();
    let keys = keys.lock().unwrap().clone();
    assert!(keys.len() >= 2, "{keys:?}");
    assert!(!keys[0].is_empty());
    assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.attempts, Some(u32::try_from(keys.len()).unwrap()));
    assert_eq!(s.idempotency_key.as_deref(), Some(keys[0].as_str()));
    assert!(s.may_have_been_processed);
    assert!(
        s.message
            .starts_with(&format!("gave up after {} attempts", keys.len())),
        "{}",
        s.message
    );
    assert!(
        s.advice().contains(&format!(
            "send it again only with idempotency key {}",
            keys[0]
        )),
        "{}",
        s.advice()
    );
    // A second call is another logical operation: another key.
    let mut second = Vec::new();
    let api2 = Api::default();
    let c2 = sturdy::ClientBuilder::new().build(api2.service());
    c2.oneshot(post(API, "{}")).await.unwrap();
    second.extend(api2.seen());
    assert_eq!(second.len(), 1);
}

/// Items 0..total, at most `cap` a page whatever is asked, with the total in the body.
fn capped(
    total: usize,
    cap: usize,
    numbered: bool,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send
       + Sync {
    tower::service_fn(move |req: Request<Full<Bytes>>| {
        let q: Vec<(String, String)> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let num = |k: &str| {
            q.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.parse::<usize>().unwrap())
        };
        let start = if numbered {
            (num("page").unwrap_or(1) - 1) * num("per_page").unwrap_or(20).min(cap)
        } else {
            num("offset").unwrap_or(0)
        };
        let size = if numbered {
            num("per_page")
        } else {
            num("limit")
        }
        .unwrap_or(20)
        .min(cap);
        let end = (start + size).min(total);
        let data: Vec<usize> = (start.min(end)..end).collect();
        let body = json!({"data": data, "total": total}).to_string();
        async move { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body))) }
    })
}

#[tokio::test(start_paused = true)]
async fn with_total_walks_every_item_when_the_server_caps_the_page_size() {
    let pager = Paginate::new(
        capped(23, 5, true),
        API,
        PageNumber::new("/data").with_total("/total"),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all, (0..23).map(|i| json!(i)).collect::<Vec<_>>());
    let pager = Paginate::new(
        capped(23, 5, false),
        API,
        OffsetLimit::new("/data").with_total("/total"),
    )
    .unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 23);
    // Without a total, a short page ends the walk (5 < the 20 asked).
    let pager = Paginate::new(capped(23, 5, false), API, OffsetLimit::new("/data")).unwrap();
    let all: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(all.len(), 5);
}

#[tokio::test(start_paused = true)]
async fn headers_go_with_every_page_and_items_as_names_a_bad_item() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        log.lock()
            .unwrap()
            .push(req.headers().get("x-tenant").cloned());
        let body = match req.uri().query().unwrap_or("") {
            q if q.contains("cursor=2") => {
                json!({"data": [{"id": 3}, {"id": "four"}], "next": null})
            }
            _ => json!({"data": [{"id": 1}, {"id": 2}], "next": "2"}),
        };
        async move { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from(body.to_string()))) }
    });
    #[derive(serde::Deserialize, Debug)]
    struct Item {
        #[allow(dead_code)]
        id: u32,
    }
    let pager = Paginate::builder(svc, API, JsonCursor::new("/data", "/next"))
        .with_header(
            HeaderName::from_static("x-tenant"),
            HeaderValue::from_static("t7"),
        )
        .build()
        .unwrap();
    let mut s = pager.items_as::<Item>();
    let mut n = 0;
    let err = loop {
        match s.try_next().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("no error for the bad item"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, 3);
    assert_eq!(*err.kind(), ErrorKind::Pagination);
    assert!(err.to_string().contains("item 4"), "{err}");
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|h| h.as_ref().is_some_and(|v| v == "t7")));
}

#[tokio::test(start_paused = true)]
async fn a_link_walks_first_page_asks_per_page_only_when_a_size_is_set() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        log.lock().unwrap().push(req.uri().to_string());
        async { Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("[1]"))) }
    });
    let plain = Paginate::new(svc.clone(), API, LinkHeader::new("")).unwrap();
    let _: Vec<Value> = plain.items().try_collect().await.unwrap();
    let sized = Paginate::builder(
        svc.clone(),
        API,
        LinkHeader::new("").with_limit_param("size"),
    )
    .with_page_size(50)
    .build()
    .unwrap();
    let _: Vec<Value> = sized.items().try_collect().await.unwrap();
    plain.page(None, 250).await.unwrap();
    let none = Paginate::new(svc, API, LinkHeader::new("").without_limit_param()).unwrap();
    none.page(None, 10).await.unwrap();
    assert_eq!(
        *asked.lock().unwrap(),
        [
            API.to_owned(),
            format!("{API}?size=50"),
            format!("{API}?per_page=100"),
            API.to_owned()
        ]
    );
}

#[test]
fn the_cursor_key_never_appears_in_debug() {
    let svc = tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("[]")))
    });
    let key = [0x5au8; 40];
    let b = Paginate::builder(svc, API, LinkHeader::new("")).with_cursor_key(key);
    let shown = format!("{b:?}");
    let pager = b.build().unwrap();
    let shown = format!("{shown} {pager:?}");
    for needle in ["ZZZZ", "5a5a", "5A5A", "90, 90"] {
        assert!(!shown.contains(needle), "{shown}");
    }
}
